"""Preflight: every reason a deploy would fail under systemd, found before anything changes."""

from invoke import task

from deploy_kit import checks, ui
from deploy_kit.errors import PreflightFailed

from ._stage import STAGE_HELP, load_stage


@task(help={"stage": STAGE_HELP})
def check(c, stage=None):
    """Check every host for what would make a deploy fail; changes nothing (exit 3 on failure)."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        results = checks.run(chosen)
        ui.print_checks(console, results)
        failed = [(r.host.name, c.name) for r in results for c in r.failed]
        if failed:
            raise PreflightFailed(f"{len(failed)} check(s) failed: "
                                  + ", ".join(f"{name} on {host}" for host, name in failed))
        console.print(f"all checks passed on {len(results)} host(s)")
