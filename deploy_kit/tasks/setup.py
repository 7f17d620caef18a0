"""Make hosts ready: service user, directories, env file and hardened systemd units."""

import sys

from invoke import task
from rich.syntax import Syntax

from deploy_kit import setup as setup_lib
from deploy_kit import ui

from ._stage import STAGE_HELP, load_stage


@task(help={"stage": STAGE_HELP, "yes": "replace units that differ from hosts.toml without asking"})
def setup(c, stage=None, yes=False):
    """Set hosts up to run the app's workers and Beat as hardened systemd services (idempotent)."""
    console = ui.make_console()
    say = ui.sayer(console)

    def show(host, plan):
        if not plan.changes:
            console.print(f"[bold]{host}[/]: no change")
        else:
            console.print(f"[bold]{host}[/]: {len(plan.changes)} change(s)")
            for change in plan.changes:
                console.print(f"  - {change.summary}", markup=False)
                if change.diff:
                    console.print(Syntax(change.diff, "diff", theme="ansi_dark"))
        for note in plan.notes:
            console.print(f"  note: {note}", markup=False)

    def confirm(question):
        return console.input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    with ui.user_errors():
        chosen = load_stage(stage)
        report = setup_lib.run(chosen, say=say, show=show, confirm=confirm, assume_yes=yes,
                               interactive=sys.stdin.isatty())
        if report.applied:
            say(f"stage {chosen.name} is set up: run `fab check --stage {chosen.name}` next")
