"""What the user sees: the Rich console, progress lines, tables, and errors turned into exit codes.

The console is made once at the edge (a task) and passed in; the library never
creates its own. When stdout is not a terminal Rich prints plain text, which
reads well in CI logs.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from invoke.exceptions import Exit
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from deploy_kit.checks import HostChecks
from deploy_kit.envfile import EditResult
from deploy_kit.errors import DeployKitError
from deploy_kit.journal import HostEvent, JournalLine, hint_for
from deploy_kit.runner import Outcome

__all__ = ["escape", "indent", "make_console", "sayer", "table", "user_errors"]


def make_console() -> Console:
    return Console(highlight=False, soft_wrap=not sys.stdout.isatty())


def sayer(console: Console) -> Callable[[str], None]:
    """A function printing one progress line, as the library's `say` callbacks expect."""
    def say(message: str) -> None:
        console.print(f"[bold cyan]>[/] {escape(message)}")
    return say


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    result = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*(str(cell) for cell in row))
    return result


def interruptible() -> None:
    """Ctrl-C (SIGINT) and a supervisor's SIGTERM end a task as KeyboardInterrupt, however it was
    started: a process started in the background by a non-interactive shell inherits SIGINT as
    ignored, and Python then installs no handler of its own."""
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn deploy-kit's errors into one message and its documented exit code (no traceback)."""
    interruptible()
    try:
        yield
    except DeployKitError as exc:
        raise Exit(f"error: {exc}", code=exc.exit_code) from None
    except KeyboardInterrupt:
        raise Exit("interrupted", code=130) from None


def timings_table(outcome: Outcome) -> Table:
    """Seconds per step and host, as the deploy measured them."""
    steps: list[str] = []
    for per_host in outcome.timings.values():
        steps += [s for s in per_host if s not in steps]
    grid = Table(title="timings (s)", title_justify="left")
    grid.add_column("step")
    for host in outcome.timings:
        grid.add_column(host, justify="right")
    for step in steps:
        grid.add_row(escape(step), *(f"{outcome.timings[h].get(step, ''):}" for h in outcome.timings))
    return grid


_STATUS_STYLE = {"pass": "green", "FAIL": "bold red", "skip": "dim"}


def print_checks(console: Console, results: Sequence[HostChecks]) -> None:
    """One table per host: each check, its result, and for a failure the cause and the fix."""
    for result in results:
        grid = Table(title=f"{result.host.name} ({result.host.address})", title_justify="left")
        grid.add_column("check")
        grid.add_column("result")
        grid.add_column("detail / fix", overflow="fold")
        for check in result.checks:
            style = _STATUS_STYLE.get(check.status, "")
            detail = check.detail + (f"\nfix: {check.fix}" if check.fix else "")
            grid.add_row(check.name, f"[{style}]{check.status}[/]", escape(detail))
        console.print(grid)


def env_table(stage: str, results: Mapping[str, EditResult], reveal: bool) -> Table:
    """Keys by host; a value shows as set/empty (and whether hosts agree) unless revealed."""
    hosts = list(results)
    keys: list[str] = []
    for result in results.values():
        keys += [k for k in result.keys if k not in keys]
    grid = Table(title=f"env file, stage {stage}" + (" (values REVEALED)" if reveal else " (values hidden)"),
                 title_justify="left")
    grid.add_column("key")
    for host in hosts:
        grid.add_column(host, overflow="fold")
    if not reveal and len(hosts) > 1:
        grid.add_column("hosts agree")
    for key in keys:
        cells = []
        prints = set()
        for host in hosts:
            state = results[host].keys.get(key)
            if state is None:
                cells.append("(absent)")
                prints.add(None)
            elif reveal:
                cells.append(escape(state.value or ""))
            else:
                cells.append("set (hidden)" if state.set else "(empty)")
                prints.add(state.fingerprint)
        if not reveal and len(hosts) > 1:
            cells.append("yes" if len(prints) == 1 else "[bold red]no[/]")
        grid.add_row(key, *cells)
    return grid


_HOST_COLOURS = ("cyan", "magenta", "green", "blue", "yellow", "bright_cyan", "bright_magenta", "bright_green")


def host_colours(hosts: Sequence[str]) -> dict[str, str]:
    """A stable colour per host: its position in the stage."""
    return {host: _HOST_COLOURS[i % len(_HOST_COLOURS)] for i, host in enumerate(hosts)}


def print_journal_item(console: Console, item: JournalLine | HostEvent, colours: Mapping[str, str]) -> None:
    """One journal line, prefixed with host and unit; warnings stand out; classic failures get a hint."""
    if isinstance(item, HostEvent):
        style = "bold red" if item.error else "bold green"
        console.print(f"[{style}]! {escape(item.host)}: {escape(item.message)}[/]")
        return
    colour = colours.get(item.host, "white")
    text = escape(item.message)
    if item.priority <= 3:  # the label keeps it visible in plain (uncoloured) output too
        text = f"[bold red]ERROR {text}[/]"
    elif item.priority == 4:
        text = f"[yellow]WARNING {text}[/]"
    stamp = item.timestamp.strftime("%H:%M:%S")
    console.print(f"[{colour}]{escape(item.host)}[/] [dim]{escape(item.unit)} {stamp}[/] {text}")
    hint = hint_for(item.message)
    if hint:
        console.print(f"  [bold yellow]hint:[/] {escape(hint)}")


class DeployDisplay:
    """Progress of a deploy: one line per event, and on a terminal a live table of each host's
    current step under them. When stdout is not a terminal: the lines only, plain."""

    def __init__(self, console: Console, hosts: Sequence[str]):
        self.console = console
        self.steps: dict[str, str] = {host: "waiting" for host in hosts}
        self.colours = host_colours(list(hosts))
        self.live: Live | None = None

    def __enter__(self) -> DeployDisplay:
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=8, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def _render(self) -> Table:
        grid = Table.grid(padding=(0, 2))
        for host, step in self.steps.items():
            grid.add_row(f"[bold {self.colours[host]}]{escape(host)}[/]", escape(step))
        return grid

    def say(self, host: str, message: str) -> None:
        if host:
            colour = self.colours.get(host, "white")
            self.console.print(f"[cyan]>[/] [bold {colour}]{escape(host)}[/] {escape(message)}")
            if not message.startswith("  |"):
                self.steps[host] = message
        else:
            self.console.print(f"[cyan]>[/] {escape(message)}")
            for name in self.steps:
                self.steps[name] = message
        if self.live is not None:
            self.live.update(self._render())
