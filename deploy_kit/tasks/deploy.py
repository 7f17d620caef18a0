"""Releases: deploy a ref, roll back, list releases, break a stale lock."""

import sys

from invoke import task

from deploy_kit import history, lifecycle, queues, ui
from deploy_kit.config_checks import _ref
from deploy_kit.errors import Locked, UsageError
from deploy_kit.release import is_release_name

from ._stage import STAGE_HELP, checked, load_stage


@task(help={"stage": STAGE_HELP, "ref": "git branch, tag or commit to deploy (default: app.ref)",
            "plan": "probe the hosts read-only and print the steps the deploy would run, per host",
            "strict": "queued tasks the new release does not register fail the deploy before the switch "
                      "(exit 3) instead of a warning"})
def deploy(c, stage=None, ref=None, plan=False, strict=False):
    """Ship a release, migrate, hand the workers over on every host, then Beat; roll back by itself."""
    with ui.user_errors():
        checked("--ref", ref, _ref)
    _run(stage, plan, lambda s, say: lifecycle.plan(s, ref=ref, say=say, strict=strict),
         lambda s, say: lifecycle.deploy(s, ref=ref, say=say, strict=strict),
         lambda s, o: f"deployed {o.release} ({o.sha[:10]}) to stage {s.name}: verified")


@task(help={"stage": STAGE_HELP, "to": "release to put back (default: the one live before the current one)",
            "plan": "probe the hosts read-only and print the steps the rollback would run, per host"})
def rollback(c, stage=None, to=None, plan=False):
    """Put back the release live before the current one (or --to RELEASE): the same handover, Beat first."""
    with ui.user_errors():
        checked("--to", to, _release)
    _run(stage, plan, lambda s, say: lifecycle.rollback_plan(s, to=to, say=say),
         lambda s, say: lifecycle.rollback(s, to=to, say=say),
         lambda s, o: f"rolled back stage {s.name} to {o.release}: verified")


def _release(value: str) -> str | None:
    if is_release_name(value):
        return None
    return f"takes a release name such as 2026-11-24-120000 (`fab releases` lists them), got {value!r}"


def _run(stage, plan_only, make_plan, run, done) -> None:
    """`--plan` prints the steps the run would execute; otherwise run them with live output."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        if plan_only:
            the_plan = make_plan(chosen, lambda host, message: None)
            console.print(f"plan: {the_plan.mode.value} of stage {chosen.name} to release {the_plan.release}; "
                          "nothing is run (these are the steps that run)", markup=False)
            for line in the_plan.render():
                console.print(line, markup=False, highlight=False)
            return
        with ui.DeployDisplay(console, [h.name for h in chosen.hosts]) as display:
            outcome = run(chosen, display.say)
        console.print(ui.timings_table(outcome))
        for note in outcome.notes:  # said as they happened; repeated here, where a CI log ends
            console.print(f"note: {note}", markup=False, highlight=False)
        console.print(done(chosen, outcome))


@task(help={"stage": STAGE_HELP})
def releases(c, stage=None):
    """List the releases on every host: name, sha, ref, age, current, state (bad, never live...)."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        for host, rows in history.release_rows(chosen).items():
            console.print(ui.table(host, ("release", "sha", "ref", "age", "current", "state"), rows))


@task(help={"stage": STAGE_HELP, "yes": "break the lock without asking"})
def unlock(c, stage=None, yes=False):
    """Show who holds the deploy lock and break it (after asking, or with --yes)."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        states = history.lock_states(chosen)
        running = {host: state.cutovers for host, state in states.items() if state.cutovers}
        if running:
            raise Locked("a cutover still runs, and ends by itself (it finishes or rolls back): "
                         + "; ".join(f"{host}: {', '.join(units)}" for host, units in running.items())
                         + f". Wait for it (`fab status --stage {chosen.name}`), then `fab unlock`")
        holders = {host: state.holder for host, state in states.items() if state.holder}
        if not holders:
            console.print("no host holds the lock")
            return
        for host, holder in holders.items():
            console.print(f"{host}: {holder.describe()}", markup=False)
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError("breaking the lock needs confirmation: rerun with --yes")
            if console.input("Break the lock? Only if that deploy is dead. [y/N] ").strip().lower() not in ("y", "yes"):
                console.print("lock kept")
                return
        history.break_lock(chosen, list(holders))
        console.print(f"lock broken on {', '.join(holders)}")


@task(help={"stage": STAGE_HELP})
def status(c, stage=None):
    """Per host: current release and age, each service's state, worker ping, lock, last deploy."""
    from deploy_kit import status as status_lib

    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        hosts = status_lib.gather(chosen)
        for host in hosts:
            revision = host.revision
            head = (f"{host.host.name}: current {host.current or 'none'}"
                    + (f" ({revision.get('sha', '')[:10]} {revision.get('ref', '')}, "
                       f"{history.age(revision.get('when', ''))} old)" if host.current else ""))
            console.print(head, markup=False, style="bold")
            rows = [(s.unit, "draining" if s.active.startswith("deactivating") else s.active, s.since, s.restarts,
                     host.ping.get(s.unit, "")) for s in host.services]
            console.print(ui.table("", ("unit", "state", "active since", "restarts", "ping"), rows))
            if host.lock:
                console.print(f"  LOCKED: {host.lock.describe()}", markup=False)
            for unit in host.cutovers:
                console.print(f"  a cutover still runs here ({unit}): it finishes or rolls back by itself",
                              markup=False)
            if isinstance(host.last, str):
                console.print(f"  last deploy: unknown (history line unreadable: {host.last})", markup=False)
            elif host.last:
                last = host.last
                console.print(f"  last {last.action}: {last.result or '?'} of {last.release} by {last.who} at "
                              f"{last.when}", markup=False)
        for problem in status_lib.unfinished(chosen, hosts):
            console.print(f"UNFINISHED: {problem}", markup=False, style="bold red")
        for host in hosts:
            if isinstance(host.queues, str):
                console.print(f"queues (read on {host.host.name}): unknown: {host.queues}", markup=False)
            elif host.queues is not None:
                for line in [*queues.summary(host.queues), *(f"PROBLEM: {p}" for p in queues.problems(
                        chosen, host.queues))]:
                    console.print(line, markup=False, style="bold red" if line.startswith("PROBLEM") else "")
