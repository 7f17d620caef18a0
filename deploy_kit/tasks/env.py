"""The app's env file on the hosts (secrets): set, unset and show keys without echoing values."""

import getpass
import sys

from invoke import task

from deploy_kit import envfile, ui

from ._stage import STAGE_HELP, load_stage

HOST_HELP = "only this host (default: every host of the stage)"


def _hosts(chosen, host):
    return [chosen.host(host)] if host else None


@task(name="set", help={"assignment": "KEY=VALUE, or KEY alone to type the value unseen",
                        "stage": STAGE_HELP, "host": HOST_HELP})
def set_(c, assignment, stage=None, host=None):
    """Set one key in the env file on every host (the value is never printed)."""
    console = ui.make_console()
    with ui.user_errors():
        key, value = envfile.parse_assignment(assignment)
        chosen = load_stage(stage)
        if value is None:
            if sys.stdin.isatty():
                value = getpass.getpass(f"{key} (input hidden): ")
            else:
                value = sys.stdin.readline().rstrip("\n")
            envfile.check_value(key, value)
        results = envfile.edit(chosen, _hosts(chosen, host), set_values={key: value})
        changed = sorted(h for h, r in results.items() if key in r.changed)
        same = sorted(h for h, r in results.items() if key in r.unchanged)
        if changed:
            console.print(f"set {key} on {', '.join(changed)} (value hidden); restart the services "
                          "(next `fab deploy`) to load it", markup=False)
        if same:
            console.print(f"{key} already had that value on {', '.join(same)}", markup=False)


@task(help={"key": "the key to remove", "stage": STAGE_HELP, "host": HOST_HELP})
def unset(c, key, stage=None, host=None):
    """Remove one key from the env file on every host."""
    console = ui.make_console()
    with ui.user_errors():
        envfile.check_key(key)
        chosen = load_stage(stage)
        results = envfile.edit(chosen, _hosts(chosen, host), unset=[key])
        removed = sorted(h for h, r in results.items() if key in r.changed)
        absent = sorted(h for h, r in results.items() if key in r.absent)
        if removed:
            console.print(f"removed {key} on {', '.join(removed)}", markup=False)
        if absent:
            console.print(f"{key} was not set on {', '.join(absent)}", markup=False)


@task(help={"stage": STAGE_HELP, "host": HOST_HELP, "reveal": "print the values (secrets!)"})
def show(c, stage=None, host=None, reveal=False):
    """Show the env file's keys on every host, values masked unless --reveal."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        results = envfile.edit(chosen, _hosts(chosen, host), reveal=reveal)
        console.print(ui.env_table(chosen.name, results, reveal))
