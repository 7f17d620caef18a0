"""deploy-kit: deploy Django apps whose Celery workers and Beat run as systemd services.

Run `fab --list` for the tasks and `fab --help TASK` for one task's flags. The
configuration is read from $DEPLOY_KIT_CONFIG, or ./hosts.toml.
"""

import sys
from pathlib import Path

from invoke import Collection

try:
    import deploy_kit  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from . import check, deploy, env, inventory, logs, sandbox, setup  # noqa: E402

ns = Collection()
ns.add_task(inventory.hosts)
ns.add_task(setup.setup)
ns.add_task(check.check)
ns.add_task(deploy.deploy)
ns.add_task(deploy.rollback)
ns.add_task(deploy.releases)
ns.add_task(deploy.unlock)
ns.add_task(deploy.status)
ns.add_task(logs.logs)
ns.add_collection(Collection.from_module(env))
ns.add_collection(Collection.from_module(sandbox))
