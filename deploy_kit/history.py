"""What is on the hosts: releases, the lock, past deploys (read-only, one round trip per host)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from deploy_kit import hostfacts, releases
from deploy_kit import remote as host_programs
from deploy_kit.config import Stage
from deploy_kit.hostfacts import HostFacts, ReleaseInfo
from deploy_kit.plan import current_release
from deploy_kit.release import state_dir
from deploy_kit.remote.contracts import LockHolder
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost


def age(when: str, now: datetime | None = None) -> str:
    """'3d 2h', '5m', ... since an ISO timestamp (pure)."""
    try:
        then = datetime.fromisoformat(when)
    except (TypeError, ValueError):
        return "?"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)  # deploy-kit writes UTC; a bare timestamp is read as UTC
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def release_rows(stage: Stage) -> dict[str, list[tuple[str, ...]]]:
    with Session(stage) as session:
        facts = session.each(lambda r: hostfacts.gather(r, stage, check=False), what="listing releases")
    rows: dict[str, list[tuple[str, ...]]] = {}
    for host in stage.hosts:
        f = facts[host.name]
        current = current_release(f)
        rows[host.name] = [
            (r.name, r.revision.get("sha", "")[:10], r.revision.get("ref", ""), age(r.revision.get("when", "")),
             "yes" if r.name == current else "", release_state(f, r, current))
            for r in sorted(f.releases, key=lambda r: r.name, reverse=True)]
    return rows


def release_state(facts: HostFacts, info: ReleaseInfo, current: str | None) -> str:
    """BAD, half-built, never live (cleanup deletes it), rolled back from, or nothing (pure)."""
    if info.name.endswith(".deleting"):  # `remote/finish.py`: still being removed (or cut off: the next cleanup)
        return "being removed"
    if info.bad or info.building:
        return "BAD" if info.bad else "half-built"
    if info.name not in releases.lineage(facts.releases, facts.live, current):
        return "never live"
    return "rolled back from" if info.name in releases.rolled_back_from(facts.releases, facts.live, current) else ""


@dataclass(frozen=True)
class LockState:
    """One host's deploy lock, and the cutovers still running there (they end by themselves)."""

    holder: LockHolder | None
    cutovers: tuple[str, ...] = ()


def parse_lock_state(output: str) -> LockState:
    """What `remote/lock.py` printed (its last line)."""
    data = json.loads(output.strip().splitlines()[-1])
    holder = LockHolder.from_data(data["holder"]) if data.get("holder") else None
    return LockState(holder, tuple(data.get("cutovers", ())))


def lock_states(stage: Stage, *, breaking: list[str] | None = None) -> dict[str, LockState]:
    """Who holds the lock on each host, and which cutover still runs there (one round trip); on
    the hosts in `breaking`, the lock is removed first, whoever holds it (`fab unlock`, confirmed)."""
    def one(remote: RemoteHost) -> LockState:
        params = {"state_dir": str(state_dir(stage.app)), "app": stage.app.name,
                  "break": remote.name in (breaking or ())}
        result = remote.run_python(host_programs.program("lock", params), str(stage.app.python), sudo=True,
                                   what="breaking the lock" if params["break"] else "reading the lock")
        return parse_lock_state(result.stdout)

    with Session(stage) as session:
        return session.each(one, what="reading the lock", only=breaking)


def break_lock(stage: Stage, hosts: list[str]) -> None:
    """Remove the lock whoever holds it (`fab unlock`, after the user confirmed)."""
    lock_states(stage, breaking=hosts)
