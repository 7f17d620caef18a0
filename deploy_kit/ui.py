"""What the user sees: the Rich console, progress lines, tables, and errors turned into exit codes.

The console is made once at the edge (a task) and passed in; the library never
creates its own. When stdout is not a terminal Rich prints plain text, which
reads well in CI logs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from invoke.exceptions import Exit
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploy_kit.errors import DeployKitError


def make_console() -> Console:
    return Console(highlight=False, soft_wrap=not sys.stdout.isatty())


def sayer(console: Console) -> Callable[[str], None]:
    """A function printing one progress line, as the library's `say` callbacks expect."""
    def say(message: str) -> None:
        console.print(f"[bold cyan]>[/] {escape(message)}")
    return say


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    result = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*(str(cell) for cell in row))
    return result


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn deploy-kit's errors into one message and its documented exit code (no traceback)."""
    try:
        yield
    except DeployKitError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=130) from None
