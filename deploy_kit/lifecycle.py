"""`fab deploy` and `fab rollback`, phase by phase: this module is the whole flow.

    deploy                                            rollback
    lock+check  lock every host; every check probe    lock+check  lock every host; read releases
    release     pack once here; build on each host;   beat        Beat first, on its host
                one also checks the queued tasks      cutover     the workers move back on
    migrate     once, on the migrate host                         every host at once; if one
    cutover     every host at once, detached:                     fails, the others and Beat
                the new release's workers prove                   return to what they ran
                themselves, then take over; if one    queues      read while the run finishes
                host fails, the others hand back      finish      history, unlock
    queues      read while Beat moves
    beat        Beat, on its host, after every host
    finish      history, cleanup, unlock

The queue summary is said last. On a stage with one host with workers, that host's cutover
reads it during its retire (no step of its own); else it is read once every host's workers
moved.

A failure before the cutover changes nothing that runs (undo: discard the release, record,
unlock). A first Ctrl-C lets what runs on the hosts finish (builds, migrations, the cutover);
a second one leaves at once. Each phase is a list of plan steps (`plan.py`) that the runner executes; `--plan`
prints the same steps, built from a read-only probe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from deploy_kit import checks, follow, outcome
from deploy_kit import plan as plans
from deploy_kit.config import Stage
from deploy_kit.errors import DeployKitError, HostsFailed, Locked, PreflightFailed
from deploy_kit.hostfacts import HostFacts
from deploy_kit.plan import Phase, Plan, Step
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode, Result
from deploy_kit.runner import Outcome, Run, Say, take_locks

WAIT_FOR_HOSTS = "the cutover runs on the hosts by itself; waiting for it to end so the stage ends on one release"


def deploy(stage: Stage, *, ref: str | None, say: Say, now: datetime | None = None,
           strict: bool = False) -> Outcome:
    run = Run(stage, Mode.DEPLOY, say, ref=ref or stage.app.ref, now=now)
    with run.connected():
        facts = lock_and_check(run, check=True)
        try:
            preflight(run, facts)
            wheels = run.pack(facts, plans.reuses_env)
            the_plan = plans.deploy(stage, facts, run.source, run.run_id, wheels, strict,  # type: ignore[arg-type]
                                    run.token)
            with run.shielded("the builds and migrations finish first, then the release is discarded",
                              stop_after=True):  # a migration is never cut half-way
                built = run.execute(the_plan.phase(Phase.RELEASE), what="building the release")
                run.queued_tasks(the_plan.phase(Phase.RELEASE), built)
                run.execute(the_plan.phase(Phase.MIGRATE))
        except BaseException as exc:
            undo(run, facts, exc)
            raise
        with run.shielded(WAIT_FOR_HOSTS, stop_after=False):  # the hosts finish by themselves: wait for them
            results = run.cutover(the_plan.phase(Phase.CUTOVER))  # on one host, it reads the queues too
            summary, beat = None, {}
            if outcome.verdict(Mode.DEPLOY, results).ok:
                queues = the_plan.phase(Phase.SUMMARY)  # (a stage's one host with workers read them already)
                summary = run.alongside(queues) if queues else None  # read while Beat moves
                beat = run.cutover(the_plan.phase(Phase.BEAT))
            marked_bad = False
            if not outcome.verdict(Mode.DEPLOY, {**results, **beat}).ok:
                results, marked_bad = roll_back(run, the_plan, results, beat)
            return finish(run, the_plan, results, facts, summary, marked_bad=marked_bad)


def rollback(stage: Stage, *, to: str | None, say: Say, now: datetime | None = None) -> Outcome:
    run = Run(stage, Mode.ROLLBACK, say, ref=to or "previous", now=now)
    with run.connected():
        facts = lock_and_check(run, check=False)
        try:
            the_plan = plans.rollback(stage, facts, run.run_id, to)
        except BaseException:
            release_locks(run)
            raise
        for step in the_plan.phase(Phase.CUTOVER):
            leaving, target = step.action.params["previous"], step.action.params["target"]  # type: ignore[union-attr]
            say(step.host, f"rolling back from {leaving} to {target}")
            warning = plans.migration_warning(facts[step.host], leaving, target)
            if warning:
                run.outcome.notes.append(f"{step.host}: {warning}")
                say(step.host, f"warning: {warning}")
        run.outcome.release = run.history.release = the_plan.release  # each host records its own move
        with run.shielded(WAIT_FOR_HOSTS, stop_after=False):
            beat = run.cutover(the_plan.phase(Phase.BEAT))
            results = run.cutover(the_plan.phase(Phase.CUTOVER)) if outcome.verdict(Mode.ROLLBACK, beat).ok else {}
            if not outcome.verdict(Mode.ROLLBACK, {**beat, **results}).ok:
                results, _ = roll_back(run, the_plan, results, beat)
            return finish(run, the_plan, {**beat, **results}, facts)


def plan(stage: Stage, *, ref: str | None, say: Say, now: datetime | None = None, strict: bool = False) -> Plan:
    """What `fab deploy` would run, from a read-only probe of every host; nothing is changed."""
    run = Run(stage, Mode.DEPLOY, say, ref=ref or stage.app.ref, now=now)
    with run.connected():
        facts = run.facts = run.execute(plans.lock_steps(stage, None, check=True), what="probing hosts")
        wheels = run.pack(facts, plans.reuses_env)
        the_plan = plans.deploy(stage, facts, run.source, run.run_id, wheels, strict,  # type: ignore[arg-type]
                                    run.token)
    lock = plans.lock_steps(stage, run.holder, check=True)
    return Plan(the_plan.mode, the_plan.release, (*lock, *the_plan.steps), the_plan.on_failure)


def rollback_plan(stage: Stage, *, to: str | None, say: Say, now: datetime | None = None) -> Plan:
    """What `fab rollback` would run, from a read-only probe of every host; nothing is changed."""
    run = Run(stage, Mode.ROLLBACK, say, ref=to or "previous", now=now)
    with run.connected():
        facts = run.execute(plans.lock_steps(stage, None, check=False), what="probing hosts")
    the_plan = plans.rollback(stage, facts, run.run_id, to)
    lock = plans.lock_steps(stage, run.holder, check=False)
    return Plan(the_plan.mode, the_plan.release, (*lock, *the_plan.steps), the_plan.on_failure)


# --- the phases' edges: the lock, the checks, the one failure path -------------------------


def lock_and_check(run: Run, *, check: bool) -> dict[str, HostFacts]:
    """Take the lock on every host and probe it (one round trip); no lock of ours survives a failure."""
    steps = plans.lock_steps(run.stage, run.holder, check=check)
    try:
        facts = take_locks(run.stage, run.holder, lambda hosts: run.execute(
            [s for s in steps if s.host in hosts], what="locking and checking"))
        running = {h: f.cutovers for h, f in facts.items() if f.cutovers}
        if running:  # a lost run's cutover: it ends by itself; starting another would race it
            raise Locked(f"a cutover of {run.stage.app.name} still runs (or systemd cannot say), nothing was "
                         "changed:\n" + "\n".join(f"  {h}: {', '.join(units)}" for h, units in running.items())
                         + "\nIt finishes or rolls back by itself: wait for it (`fab status --stage "
                         f"{run.stage.name}` shows it), then run this again")
    except BaseException:
        release_locks(run)
        raise
    run.facts = facts
    currents = {h: plans.current_release(f) or "none" for h, f in facts.items()}
    if len(set(currents.values())) > 1:
        run.say("", "note: the hosts run different releases (" + ", ".join(f"{h}: {c}" for h, c in currents.items())
                + "), as a cut-off run leaves them; this run moves every host")
    return facts


def preflight(run: Run, facts: Mapping[str, HostFacts]) -> None:
    across = checks.stage_checks(run.stage, facts)
    failed = [(h, c) for h in run.stage.hosts for c in (*checks.evaluate(run.stage, h, facts[h.name]),
                                                        *across.get(h.name, ())) if c.failed]
    if failed:
        raise PreflightFailed("preflight failed, nothing was changed:\n" + "\n".join(
            f"  {h.name}: {c.name}: {c.detail} (fix: {c.fix})" for h, c in failed))
    run.say("", "preflight passed on every host")


def release_locks(run: Run) -> None:
    """Best effort: the lock is removed only where it still carries this run's token; a host where
    that fails is named, with how to find and clear what may be left."""
    failed = attempt(run, plans.finish_steps(run.stage, [h.name for h in run.stage.hosts], history=False),
                     what="releasing the lock")
    if failed:
        run.say("", f"the lock may be left on {', '.join(sorted(failed))} ({'; '.join(failed.values())}): "
                    f"`fab status --stage {run.stage.name}` shows it, `fab unlock` clears it")


def attempt(run: Run, steps: Sequence[Step], *, what: str) -> dict[str, str]:
    """Run `steps` where a failure must not hide how the run ended: {host: cause} of the hosts
    where they failed (empty when none did)."""
    try:
        run.execute(steps, what=what)
    except DeployKitError as exc:
        if isinstance(exc, HostsFailed):
            return {h: getattr(e, "reason", str(e)) for h, e in exc.failures.items()}
        hosts = sorted({s.host for s in steps})
        return {getattr(exc, "host", hosts[0] if len(hosts) == 1 else "a host"): getattr(exc, "reason", str(exc))}
    return {}


def undo(run: Run, facts: Mapping[str, HostFacts], exc: BaseException) -> None:
    """Nothing was switched: discard the release, record why, release the lock."""
    run.history.result = Result.PREFLIGHT_FAILED if isinstance(exc, PreflightFailed) else Result.FAILED
    run.history.error = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    steps: list[Step] = []
    if isinstance(exc, KeyboardInterrupt):
        run.say("", "interrupted before the switch: discarding the release, releasing the lock")
    if run.source is not None:  # what this run made: the release where the probe did not see it
        name = run.source.name
        steps += [Step(h, Phase.UNDO, "discard the release",
                       plans.discard(name, name not in {r.name for r in f.releases})) for h, f in facts.items()]
    steps += plans.finish_steps(run.stage, list(facts))
    failed = attempt(run, steps, what="undoing")
    if failed:
        release_locks(run)
        run.say("", f"nothing was switched; on {', '.join(sorted(failed))} the release could not be discarded and "
                    f"the lock may be left: `fab status --stage {run.stage.name}` shows it, `fab unlock` clears it")
        return
    if isinstance(exc, Locked):  # the lock was lost: the finish left it to whoever holds it now
        run.say("", "nothing was switched: this run's release was discarded; the lock is no longer this run's "
                    "and was left as it is")
        return
    run.say("", "nothing was switched: every host runs the release it ran; this run's release was discarded and "
                "the lock released (deploy again once the cause is fixed)")


def roll_back(run: Run, the_plan: Plan, results: Mapping[str, CutoverState],
              beat: Mapping[str, CutoverState]) -> tuple[dict[str, CutoverState], bool]:
    """A host failed (or Beat did): the hosts whose workers took over hand back too, so the stage
    runs one release. In a deploy, Beat's own step already went back on its host; in a rollback
    (Beat first) Beat that moved goes back after them, once every host's workers are back. A
    deploy's release is marked bad only where a host found a fault in it (never for a launch
    refused or not started); whether it was marked is returned with each host's final state. A
    host that cannot be reached for this is a note (or, for a first deploy's way back, UNKNOWN),
    never an error hiding the rest."""
    hosts = outcome.to_roll_back(results, beat)
    if hosts:
        run.say("", f"handing {', '.join(hosts)} back too, so every host runs the same release")
    final = dict(results)
    returned = run.cutover([s for s in the_plan.on_failure if s.phase == Phase.CUTOVER and s.host in hosts])
    for host, state in returned.items():
        final[host] = state
        if state.status == CutoverStatus.DONE:
            state.status = CutoverStatus.ROLLED_BACK
    beat = dict(beat)
    workers_back = all(s.status == CutoverStatus.ROLLED_BACK for s in returned.values()) and all(
        s.status in (CutoverStatus.FELL_BACK, CutoverStatus.NOT_STARTED) for h, s in final.items() if h not in returned)
    moved = [s for s in the_plan.on_failure if s.phase == Phase.BEAT and workers_back and beat.get(s.host) and
             beat[s.host].status == CutoverStatus.DONE]  # a rollback's Beat: only once every host's workers are back
    for host, state in run.cutover(moved).items():  # a rollback's Beat, which moved first, follows them
        if state.status == CutoverStatus.DONE:
            state.status = CutoverStatus.ROLLED_BACK
            if host in final:  # Beat's step moved that host's `current` (its workers' state says where from)
                final[host] = CutoverState(**{**final[host].__dict__, "live": state.live})
        elif state.status == CutoverStatus.FELL_BACK:  # it stayed on the rollback's target
            state = CutoverState(**{**state.__dict__, "status": CutoverStatus.ROLLBACK_FAILED,
                                    "rollback_failure": f"Beat could not go back ({state.failure}): it runs "
                                                        f"{state.live or 'no release'}"})
        beat[host] = state
    fresh = [s for s in the_plan.on_failure if s.phase == Phase.UNDO and s.host in hosts]
    stuck = attempt(run, fresh, what="returning to no release")
    for step in fresh:
        undone = {"status": CutoverStatus.UNKNOWN, "rollback_failure": f"could not return to no release: "
                  f"{stuck[step.host]}"} if step.host in stuck else {"status": CutoverStatus.ROLLED_BACK, "live": ""}
        final[step.host] = CutoverState(**{**results[step.host].__dict__, **undone})
    for host, state in beat.items():  # Beat that could not go back outweighs its workers' way back
        if state.status not in (CutoverStatus.DONE, CutoverStatus.ROLLED_BACK):
            final[host] = state
        final.setdefault(host, state)  # a Beat host without workers to move
    ran = [*results.values(), *beat.values()]
    faulty = any(s.status not in (CutoverStatus.DONE, CutoverStatus.NOT_STARTED) and not follow.refused(s)
                 for s in ran)
    refused = {h for h, s in [*results.items(), *beat.items()] if follow.refused(s)}
    marking = [s for s in the_plan.on_failure if s.phase == Phase.MARK_BAD and s.host not in refused] if faulty else []
    for host, cause in attempt(run, marking, what="marking the release bad").items():
        run.outcome.notes.append(f"{host}: {the_plan.release} could not be marked bad ({cause}); `fab releases "
                                 f"--stage {run.stage.name}` shows it, `fab rollback` never targets a release "
                                 "that did not go live")
    return final, bool(marking)


def finish(run: Run, the_plan: Plan, results: Mapping[str, CutoverState],
           facts: Mapping[str, HostFacts], summary: Callable[[bool], None] | None = None, *,
           marked_bad: bool = True) -> Outcome:
    """Record, clean up (only after a success), unlock while every host's state is known; then
    say the queue summary: the one the cutover of a stage's one host with workers read during
    its retire, or the one read alongside Beat (`summary`), or else one read alongside this
    finish (after a failure always: what was read before the way back is no longer true). A host
    that cannot be recorded or unlocked is a note: a stage that ended on the new release is
    still a success (exit 0, the note says the lock may be left), and a failed one still ends
    with its summary (exit 5 or 6), never with exit 7."""
    decided = outcome.verdict(run.mode, results)
    run.outcome.result = Result.SUCCESS if decided.ok else Result.ROLLED_BACK if decided.consistent else Result.FAILED
    run.history.result = Result.SUCCESS if decided.ok else Result.FAILED
    run.history.seconds = run.seconds()
    if not decided.ok and summary is not None:
        summary(False)
    summary = (summary or run.read_by_cutover(results)) if decided.ok else None
    if summary is None:
        summary = run.alongside(the_plan.phase(Phase.SUMMARY) if decided.ok else plans.summary_steps(run.stage))
    steps = the_plan.phase(Phase.FINISH) if decided.ok else \
        plans.finish_steps(run.stage, list(facts), unlock=decided.known)
    for host, cause in attempt(run, steps, what="finishing").items():
        note = (f"{host}: not recorded/unlocked: {cause}; `fab status --stage {run.stage.name}` shows it, "
                "`fab unlock` once checked")
        run.outcome.notes.append(note)
        run.say(host, f"warning: {note}")
    summary(True)
    if not decided.ok:
        before = {h: plans.current_release(f) for h, f in facts.items()}
        raise outcome.failure(run.mode, results, the_plan.release, before, marked_bad=marked_bad,
                              notes=run.outcome.notes)
    return run.outcome
