"""Sandbox hosts: real Debian 12 machines booted on this one with systemd-nspawn (needs root)."""

from invoke import task

from deploy_kit import config, ui
from deploy_kit.sandbox import BROKERS, DEFAULT_NAME, Sandbox

from ._stage import count

STAGE_HELP = f"name of the sandbox and of the stage it writes (default: {DEFAULT_NAME})"


@task(help={"hosts": "how many hosts to boot (default: 1)", "stage": STAGE_HELP,
            "broker": f"the stage's broker on the first host: {' or '.join(BROKERS)} (default: redis; "
                      "rabbitmq adds rabbitmq-server to the image the first time, about 15 s)"})
def up(c, hosts="1", stage=DEFAULT_NAME, broker="redis"):
    """Boot fresh sandbox hosts and write their stage into hosts.toml."""
    console = ui.make_console()
    with ui.user_errors():
        number = count("--hosts", hosts, "hosts")
        path = config.config_path()
        booted = Sandbox(stage).up(number, path, ui.sayer(console), broker=broker)
        console.print(ui.table(f"sandbox {stage}", ("host", "address", "ssh user", "roles"),
                               [(h.name, h.address, h.user, ", ".join(h.roles)) for h in booted]))
        console.print(f"Use it with --stage {stage}, e.g. `fab hosts --stage {stage}`; its broker is "
                      f"{broker} on {booted[0].name}; remove it with `fab sandbox.down`.")


@task(help={"stage": STAGE_HELP})
def down(c, stage=DEFAULT_NAME):
    """Stop the sandbox hosts and remove every process, mount, namespace and link they used."""
    console = ui.make_console()
    with ui.user_errors():
        Sandbox(stage).down(ui.sayer(console))


@task(help={"stage": STAGE_HELP})
def status(c, stage=DEFAULT_NAME):
    """Show each sandbox host: running, reachable over SSH, systemd state."""
    console = ui.make_console()
    with ui.user_errors():
        rows = Sandbox(stage).status()
        if not rows:
            console.print(f"sandbox {stage!r} is not running; start it with `fab sandbox.up`")
            return
        console.print(ui.table(f"sandbox {stage}", ("host", "address", "running", "ssh", "systemd"),
                               [(r.name, r.address, "yes" if r.running else "no", r.ssh, r.systemd)
                                for r in rows]))
