"""How a stage ends, decided from each host's cutover result (pure: the decision table).

    every host DONE                         success, exit 0, lock released
    a host failed, the others back          exit 5 (deploy) : every host runs what it ran before
                                            exit 6 (rollback): the same, said so
    a host's state unknown or mixed         exit 6          : act now; lock kept while unknown

A deploy whose cutover failed on some host rolls the hosts that switched back (`to_roll_back`),
so the stage runs one release; so does a rollback (and its Beat, which moved first). A rollback
that failed somewhere is always exit 6: the stage did not get where the user asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deploy_kit.errors import EXIT_OK, EXIT_ROLLBACK_FAILED, EXIT_ROLLED_BACK, DeployFailed
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode

S = CutoverStatus
# The host runs the release it ran before the deploy (or was never touched): its old workers never
# stopped, or a hand-back started them again and confirmed them where the broker allowed it.
_BACK = (S.ROLLED_BACK, S.NOT_STARTED)
# The host runs a known, verified release; the lock can go.
_KNOWN = (S.DONE, S.ROLLED_BACK, S.FELL_BACK, S.NOT_STARTED)


@dataclass(frozen=True)
class Verdict:
    ok: bool  # every host runs the target release, verified
    consistent: bool  # ok, or every host is back where it was
    known: bool  # every host's state is known: the lock is released
    exit_code: int


def to_roll_back(results: Mapping[str, CutoverState], beat: Mapping[str, CutoverState] | None = None) -> list[str]:
    """The hosts whose workers switched, when another host (or Beat) failed: they go back too."""
    if all(s.status == S.DONE for s in [*results.values(), *(beat or {}).values()]):
        return []
    return sorted(h for h, s in results.items() if s.status == S.DONE)


def verdict(mode: Mode, results: Mapping[str, CutoverState]) -> Verdict:
    statuses = [s.status for s in results.values()]
    ok = all(s == S.DONE for s in statuses)
    known = all(s in _KNOWN for s in statuses)
    if ok:
        return Verdict(True, True, True, EXIT_OK)
    consistent = mode == Mode.DEPLOY and all(s in _BACK for s in statuses)
    return Verdict(False, consistent, known, EXIT_ROLLED_BACK if consistent else EXIT_ROLLBACK_FAILED)


def live(results: Mapping[str, CutoverState], before: Mapping[str, str | None]) -> dict[str, str | None]:
    """The release each host runs now, as its cutover reported it (unchanged when not reported)."""
    now: dict[str, str | None] = dict(before)
    for host, state in results.items():
        if state.live is not None:
            now[host] = state.live or None
    return now


_CAUSES = ("Error", "error", "Exception", "Traceback", "denied", "refused", "Improperly", "No module")


def _host_line(mode: Mode, state: CutoverState, now: str) -> str:
    status = state.status
    if status in (S.ROLLBACK_FAILED, S.UNKNOWN):
        why = state.rollback_failure or state.failure or "no word from the host"
        return f"STATE UNKNOWN ({why}); `current` points to {now}: check `fab status` and the journal there now"
    if status == S.FELL_BACK and state.hand_back:  # it had taken over; then another host or Beat failed
        return f"could not hand back, so it stays on {now}, which it verified in this run"
    if status == S.FELL_BACK:
        return f"could not switch, stayed on {now} (verified)"
    if status == S.DONE:
        return f"on {now}" if mode == Mode.DEPLOY else f"on {now} (the rollback worked here)"
    if status == S.NOT_STARTED:
        return f"untouched, on {now}"
    return f"back on {now}"


def failure(mode: Mode, results: Mapping[str, CutoverState], release: str,
            before: Mapping[str, str | None], *, marked_bad: bool = True, notes: Sequence[str] = ()) -> DeployFailed:
    """One message saying, per host, what it runs now and why its cutover failed (then `notes`:
    what the run could not do after it, such as recording or unlocking a host)."""
    decided = verdict(mode, results)
    now = live(results, before)
    lines = [f"deploy of {release} failed:" if mode == Mode.DEPLOY else f"rollback to {release} failed:"]
    for host in sorted(set(before) | set(results)):
        state = results.get(host) or CutoverState(id="", mode=mode, target=release, previous=None,
                                                  status=S.NOT_STARTED)
        lines.append(f"  {host}: {_host_line(mode, state, now.get(host) or 'no release')}")
        if state.failure:
            lines.append(f"      cause: {state.failure}")
        lines += [f"      | {line}" for line in [x for x in state.journal if any(w in x for w in _CAUSES)][-8:]]
    if mode == Mode.DEPLOY:
        lines.append(f"release {release} is marked bad and kept for inspection" if marked_bad else
                     f"release {release} is not marked bad: no host found a fault in it (kept)")
    if mode == Mode.ROLLBACK and decided.known and all(now.get(h) == before.get(h) for h in before):
        lines.append("every host runs the release it ran before this rollback")
    elif not decided.consistent:
        lines.append("the hosts do not all run the same release: act now (`fab status`, then `fab rollback "
                     "--to RELEASE` or a new deploy)")
    if not decided.known:
        lines.append("the lock is kept so nobody deploys over this: once the hosts are checked, `fab unlock`")
    lines += [f"note: {note}" for note in notes]
    return DeployFailed("\n".join(lines), rolled_back=decided.consistent)
