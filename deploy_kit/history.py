"""What is on the hosts: releases, the lock, past deploys (read-only, one round trip per host)."""

from __future__ import annotations

from datetime import UTC, datetime

from deploy_kit import hostfacts
from deploy_kit.config import Stage
from deploy_kit.plan import current_release
from deploy_kit.release import state_dir
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost, quote


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
             "yes" if r.name == current else "", "BAD" if r.bad else ("half-built" if r.building else ""))
            for r in sorted(f.releases, key=lambda r: r.name, reverse=True)]
    return rows


def lock_holders(stage: Stage) -> dict[str, dict[str, str]]:
    path = state_dir(stage.app) / "lock" / "holder.json"

    def one(remote: RemoteHost) -> str:
        return remote.run_script(f"cat {quote(path)} 2>/dev/null || true\n", sudo=True, what="reading the lock").stdout

    import json
    with Session(stage) as session:
        found = session.each(one, what="reading the lock")
    holders = {}
    for host, text in found.items():
        if text.strip():
            try:
                holders[host] = json.loads(text)
            except ValueError:
                holders[host] = {"who": "unknown"}
    return holders


def break_lock(stage: Stage, hosts: list[str]) -> None:
    """Remove the lock whoever holds it (`fab unlock`, after the user confirmed)."""
    script = f"rm -rf {quote(state_dir(stage.app) / 'lock')}\n"
    with Session(stage) as session:
        session.each(lambda r: r.run_script(script, sudo=True, what="breaking the lock") if r.name in hosts
                     else None, what="breaking the lock")
