"""`deploy-kit`: the same tasks as `fab` with deploy-kit's collection, for projects without a fabfile.

    deploy-kit --list
    deploy-kit deploy --stage production
"""

from fabric import Config, Executor
from fabric.main import Fab

from deploy_kit import __version__
from deploy_kit.tasks import ns

program = Fab(name="deploy-kit", binary="deploy-kit", version=__version__, namespace=ns, executor_class=Executor,
              config_class=Config)


def main() -> None:
    program.run()
