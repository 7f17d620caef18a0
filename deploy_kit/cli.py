"""`deploy-kit`: the same tasks as `fab` with deploy-kit's collection, for projects without a fabfile.

    deploy-kit --list
    deploy-kit deploy --stage production
"""

from fabric import Config, Executor
from fabric.main import Fab

from deploy_kit.tasks import ns

VERSION = "0.1.0"

program = Fab(name="deploy-kit", binary="deploy-kit", version=VERSION, namespace=ns, executor_class=Executor,
              config_class=Config)


def main() -> None:
    program.run()
