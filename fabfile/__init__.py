"""deploy-kit's own tasks: the collection shipped in the package (`deploy_kit.tasks`).

Run `fab --list` for the tasks and `fab --help TASK` for one task's flags.
"""

import sys
from pathlib import Path

try:
    import deploy_kit  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy_kit.tasks import ns  # noqa: E402, F401
