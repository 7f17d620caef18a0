"""Release arithmetic (pure): which release to roll back to, and which ones cleanup deletes.

What went live decides, not the names: the cutover appends every move of `current` to the
host's live log (`LiveEvent`). A rollback goes to the release that was live before the current
one, skipping the ones a rollback left; so rolling back twice goes two steps back, and a
rollback is undone with `fab rollback --to` the release it left (a roll forward, which leaves
nothing behind). A release that never went
live (its deploy failed or was cut off before the switch) is never a rollback target and is
deleted by cleanup; a bad one (a deploy was rolled back from it) is kept for inspection a
while; a half-built one is always removed. Releases from before the log existed (by the
host's clock) count as having gone live in name order.
"""

from __future__ import annotations

from collections.abc import Sequence

from deploy_kit.errors import UsageError
from deploy_kit.hostfacts import ReleaseInfo
from deploy_kit.release import is_release_name
from deploy_kit.remote.contracts import LiveEvent, Mode


def good(releases: Sequence[ReleaseInfo]) -> list[str]:
    return sorted(r.name for r in releases if not r.bad and not r.building and is_release_name(r.name))


def _legacy(releases: Sequence[ReleaseInfo], events: Sequence[LiveEvent]) -> list[str]:
    """Good releases from before the live log, in name order: all of them where there is no log;
    none where it began with a first deploy; else those it never names that were on the host
    when it began (by the host's own clock, never by names: a deployer's clock may be wrong)."""
    if not events:
        return good(releases)
    first = events[0]
    if not first.previous:
        return []
    mentioned = {e.release for e in events} | {e.previous for e in events if e.previous}
    made = {r.name: r.mtime for r in releases}
    return [n for n in good(releases) if n not in mentioned and made[n] <= first.when]


def _before_log(events: Sequence[LiveEvent], current: str | None) -> str | None:
    """The release that was current when the log began (or is, without a log)."""
    return events[0].previous if events else current


def lineage(releases: Sequence[ReleaseInfo], events: Sequence[LiveEvent], current: str | None) -> list[str]:
    """The good releases that went live, the most recently live first."""
    legacy, pre = _legacy(releases, events), _before_log(events, current)
    # Before the log, a release newer than the one then current can only be one a rollback left.
    order = [n for n in legacy if pre and n > pre] + [n for n in legacy if not pre or n <= pre]
    for event in events:
        order += [event.previous] if event.previous and event.previous not in order else []
        order.append(event.release)
    if current:
        order.append(current)
    exists = set(good(releases))
    seen: list[str] = []
    for name in reversed(order):
        if name in exists and name not in seen:
            seen.append(name)
    return seen


def rolled_back_from(releases: Sequence[ReleaseInfo], events: Sequence[LiveEvent], current: str | None) -> set[str]:
    """Releases a rollback left for an older deploy that have not gone live again since (a
    rollback `--to` a newer release rolls forward: it leaves nothing behind)."""
    legacy, pre = _legacy(releases, events), _before_log(events, current)
    deployed = {name: i - len(legacy) for i, name in enumerate(legacy)}  # legacy: in name order, first
    left = {n for n in legacy if pre and n > pre}
    for i, event in enumerate(events):
        if event.previous:
            deployed.setdefault(event.previous, -1)
        if event.mode == Mode.DEPLOY.value:
            deployed.setdefault(event.release, i)
        left.discard(event.release)
        if event.mode == Mode.ROLLBACK.value and event.previous and \
                deployed.get(event.release, -1) < deployed[event.previous]:
            left.add(event.previous)
    return left


def previous_live(releases: Sequence[ReleaseInfo], events: Sequence[LiveEvent], current: str | None) -> str | None:
    """The default rollback target: the release live before `current`, not one a rollback left."""
    left = rolled_back_from(releases, events, current)
    return next((n for n in lineage(releases, events, current) if n != current and n not in left), None)


def rollback_target(releases: Sequence[ReleaseInfo], current: str | None, to: str | None = None,
                    events: Sequence[LiveEvent] = (), went_live: bool | None = None) -> str:
    """The release this host goes to: `to` (checked; `to == current` is no move here), or the one
    live before `current`. `went_live`: whether `to` went live anywhere in the stage."""
    if current is None:
        raise UsageError("there is no current release to roll back from; deploy first")
    if to is not None:
        found = {r.name: r for r in releases}
        if to not in found:
            raise UsageError(f"release {to!r} does not exist (releases: {', '.join(good(releases)) or 'none'})")
        if found[to].bad:
            raise UsageError(f"release {to!r} is marked bad (a deploy was rolled back from it); pick a good one")
        if found[to].building:
            raise UsageError(f"release {to!r} was never completed")
        if to == current:
            return to
        if not (went_live if went_live is not None else to in lineage(releases, events, current)):
            raise UsageError(f"release {to!r} never went live (the deploy that built it did not reach the "
                             "switch); deploy its ref instead")
        return to
    target = previous_live(releases, events, current)
    if target is None:
        left = sorted(rolled_back_from(releases, events, current) & set(good(releases)))
        undo = f" (a rollback left {', '.join(left)}: `fab rollback --to {left[-1]}` puts it back)" if left else ""
        raise UsageError(f"nothing to roll back to: no release went live before {current}{undo}")
    return target


def to_delete(releases: Sequence[ReleaseInfo], current: str | None, keep: int,
              events: Sequence[LiveEvent] = ()) -> list[str]:
    """Releases cleanup removes: all but the `keep` most recently live good ones, never `current`
    nor the rollback target; releases that never went live; bad ones once they are older than
    every kept release; half-built ones."""
    keep_names = set(lineage(releases, events, current)[:keep])
    if current:
        keep_names.add(current)
    previous = previous_live(releases, events, current)
    if previous:
        keep_names.add(previous)
    oldest_kept = min(keep_names) if keep_names else None
    doomed = []
    for release in releases:
        if release.name in keep_names:
            continue
        if release.building:
            doomed.append(release.name)
        elif release.bad:
            if oldest_kept is not None and release.name < oldest_kept:
                doomed.append(release.name)
        elif is_release_name(release.name):
            doomed.append(release.name)
    return sorted(doomed)
