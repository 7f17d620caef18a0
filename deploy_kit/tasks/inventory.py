"""Who is in a stage: every host, reached over SSH with its host key checked."""

from invoke import task

from deploy_kit import inventory, ui
from deploy_kit.errors import HostError

from ._stage import STAGE_HELP, load_stage


@task(help={"stage": STAGE_HELP})
def hosts(c, stage=None):
    """List the stage's hosts and prove each answers over SSH (host key checked)."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        reports = inventory.probe(chosen)
        rows = []
        for report in reports:
            host, facts = report.host, report.facts
            units = ", ".join(chosen.units_on(host)) or "-"
            if facts is None:
                rows.append((host.name, f"{host.user}@{host.address}:{host.port}",
                             ", ".join(host.roles), f"FAILED: {report.error}", "-", "-", units))
            else:
                rows.append((host.name, f"{host.user}@{host.address}:{host.port}",
                             ", ".join(host.roles), "ok", f"{facts.systemd} (systemd "
                             f"{facts.systemd_version})", facts.python, units))
        console.print(ui.table(f"stage {chosen.name}",
                               ("host", "ssh", "roles", "reached", "systemd", "python", "units"),
                               rows))
        failed = [r.host.name for r in reports if r.facts is None]
        if failed:
            raise HostError(", ".join(failed), "could not be reached (see the table above)")
