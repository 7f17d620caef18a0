"""What is on the hosts: releases, the lock, past deploys (read-only, one round trip per host)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from deploy_kit import hostfacts, releases
from deploy_kit.config import Stage
from deploy_kit.hostfacts import HostFacts, ReleaseInfo
from deploy_kit.plan import current_release
from deploy_kit.release import state_dir
from deploy_kit.remote.contracts import LockHolder
from deploy_kit.session import Session
from deploy_kit.ssh import quote


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
    holder_text, _, units = output.partition("---\n")
    holder = None
    if holder_text.strip():
        try:
            holder = LockHolder.from_json(holder_text)
        except (ValueError, TypeError):
            holder = LockHolder.unreadable()
    return LockState(holder, tuple(line.split()[0] for line in units.splitlines() if line.strip()))


def lock_states(stage: Stage) -> dict[str, LockState]:
    """Who holds the lock on each host, and which cutover still runs there (one round trip)."""
    path = state_dir(stage.app) / "lock" / "holder.json"
    script = (f"cat {quote(path)} 2>/dev/null || true\nprintf -- '---\\n'\n"
              f"systemctl list-units --plain --no-legend --state=active,activating "
              f"{quote(stage.app.name + '-cutover-*')} || true\n")
    with Session(stage) as session:
        found = session.each(lambda r: r.run_script(script, sudo=True, what="reading the lock").stdout,
                             what="reading the lock")
    return {host: parse_lock_state(out) for host, out in found.items()}


def break_lock(stage: Stage, hosts: list[str]) -> None:
    """Remove the lock whoever holds it (`fab unlock`, after the user confirmed)."""
    script = f"rm -rf {quote(state_dir(stage.app) / 'lock')}\n"
    with Session(stage) as session:
        session.each(lambda r: r.run_script(script, sudo=True, what="breaking the lock") if r.name in hosts
                     else None, what="breaking the lock")
