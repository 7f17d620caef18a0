"""Release arithmetic (pure): which release to roll back to, and which ones cleanup deletes.

Releases sort by name (UTC timestamps), never by mtime. A bad release (one a deploy rolled
back from) is kept for inspection for a while but is never a rollback target and never
counts as one of the good releases cleanup keeps; a half-built one is always removed.
"""

from __future__ import annotations

from collections.abc import Sequence

from deploy_kit.errors import UsageError
from deploy_kit.hostfacts import ReleaseInfo
from deploy_kit.release import is_release_name


def good(releases: Sequence[ReleaseInfo]) -> list[str]:
    return sorted(r.name for r in releases if not r.bad and not r.building and is_release_name(r.name))


def previous_good(releases: Sequence[ReleaseInfo], current: str | None) -> str | None:
    """The newest good release older than `current` (the default rollback target)."""
    older = [name for name in good(releases) if current is None or name < current]
    return older[-1] if older else None


def rollback_target(releases: Sequence[ReleaseInfo], current: str | None, to: str | None = None) -> str:
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
            raise UsageError(f"release {to!r} is already current")
        return to
    target = previous_good(releases, current)
    if target is None:
        raise UsageError(f"nothing to roll back to: no good release older than {current}")
    return target


def to_delete(releases: Sequence[ReleaseInfo], current: str | None, keep: int) -> list[str]:
    """Releases cleanup removes: all but the `keep` newest good ones, never `current` nor the
    previous good one; bad ones once they are older than every kept good release; half-built ones."""
    keep_names = set(good(releases)[-keep:])
    if current:
        keep_names.add(current)
    previous = previous_good(releases, current)
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
