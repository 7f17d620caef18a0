"""`deploy-kit`: the same tasks as `fab` with deploy-kit's collection, for projects without a fabfile.

    deploy-kit --list
    deploy-kit deploy --stage production
"""

from collections.abc import Iterator
from contextlib import contextmanager

from fabric import Config, Executor
from fabric.main import Fab
from invoke.exceptions import Exit, ParseError

from deploy_kit import __version__
from deploy_kit.errors import EXIT_CONFIG
from deploy_kit.tasks import ns


@contextmanager
def _usage() -> Iterator[None]:
    """A command line Invoke cannot parse (unknown flag or task, missing value) is a usage error: exit 2."""
    try:
        yield
    except ParseError as exc:
        raise Exit(f"error: {exc} Fix: `deploy-kit --list` shows the tasks, `deploy-kit --help TASK` "
                   "a task's flags", code=EXIT_CONFIG) from None


class DeployKit(Fab):
    def parse_core(self, argv: list[str] | None) -> None:
        with _usage():
            super().parse_core(argv)

    def parse_tasks(self) -> None:
        with _usage():
            super().parse_tasks()


program = DeployKit(name="deploy-kit", binary="deploy-kit", version=__version__, namespace=ns,
                    executor_class=Executor, config_class=Config)


def main() -> None:
    program.run()
