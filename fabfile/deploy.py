"""Releases: deploy a ref, roll back, list releases, break a stale lock."""

from invoke import task

from deploy_kit import deploy as deploy_lib
from deploy_kit import history, ui

from ._stage import STAGE_HELP, load_stage


def _say(console):
    def say(host, message):
        prefix = f"[bold]{host}[/] " if host else ""
        console.print(f"[cyan]>[/] {prefix}{ui.escape(message)}")
    return say


@task(help={"stage": STAGE_HELP, "ref": "git branch, tag or commit to deploy (default: app.ref)"})
def deploy(c, stage=None, ref=None):
    """Ship a release, migrate, switch, restart workers then Beat, verify; roll back by itself."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        outcome = deploy_lib.deploy(chosen, ref=ref, say=_say(console))
        console.print(ui.timings_table(outcome))
        console.print(f"deployed {outcome.release} ({outcome.sha[:10]}) to stage {chosen.name}: verified")


@task(help={"stage": STAGE_HELP, "to": "release to put back (default: the previous good one)"})
def rollback(c, stage=None, to=None):
    """Put the previous good release (or --to RELEASE) back: switch, restart, verify, record."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        outcome = deploy_lib.rollback(chosen, to=to, say=_say(console))
        console.print(ui.timings_table(outcome))
        console.print(f"rolled back stage {chosen.name} to {outcome.release}: verified")


@task(help={"stage": STAGE_HELP})
def releases(c, stage=None):
    """List the releases on every host: name, sha, ref, age, current, bad."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        for host, rows in history.release_rows(chosen).items():
            console.print(ui.table(host, ("release", "sha", "ref", "age", "current", "bad"), rows))


@task(help={"stage": STAGE_HELP, "yes": "break the lock without asking"})
def unlock(c, stage=None, yes=False):
    """Show who holds the deploy lock and break it (after asking, or with --yes)."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        holders = history.lock_holders(chosen)
        if not holders:
            console.print("no host holds the lock")
            return
        for host, holder in holders.items():
            console.print(f"{host}: held by {holder.get('who')} from {holder.get('from')} since "
                          f"{holder.get('since')} ({holder.get('action')} of {holder.get('ref')})", markup=False)
        if not yes:
            import sys
            if not sys.stdin.isatty():
                raise deploy_lib.UsageError("breaking the lock needs confirmation: rerun with --yes")
            if console.input("Break the lock? Only if that deploy is dead. [y/N] ").strip().lower() not in ("y", "yes"):
                console.print("lock kept")
                return
        history.break_lock(chosen, list(holders))
        console.print(f"lock broken on {', '.join(holders)}")
