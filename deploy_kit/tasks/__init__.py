"""deploy-kit: deploy Django apps whose Celery workers and Beat run as systemd services.

Run `fab --list` (or `deploy-kit --list`) for the tasks and `fab --help TASK` for one task's
flags. The configuration is read from $DEPLOY_KIT_CONFIG, or ./hosts.toml.

In your project, a `fabfile.py` of one line gets every task (`fab init` writes it):

    from deploy_kit.tasks import ns  # noqa: F401

Add tasks of your own beside them with `ns.add_task(...)`.
"""

from invoke import Collection

from . import check, deploy, env, init, inventory, logs, queues, sandbox, setup

ns = Collection()
ns.add_task(init.init)
ns.add_task(inventory.hosts)
ns.add_task(setup.setup)
ns.add_task(check.check)
ns.add_task(deploy.deploy)
ns.add_task(deploy.rollback)
ns.add_task(deploy.releases)
ns.add_task(deploy.unlock)
ns.add_task(deploy.status)
ns.add_task(logs.logs)
ns.add_task(queues.queues)
ns.add_collection(Collection.from_module(env))
ns.add_collection(Collection.from_module(sandbox))
