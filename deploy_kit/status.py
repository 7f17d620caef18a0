"""`fab status`: per host, the current release, each service's state, a worker ping, the lock and the
last deploy, gathered by one program per host (`remote/status.py`, read-only) and parsed purely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deploy_kit import queues, release, remote, units
from deploy_kit.config import Host, Stage
from deploy_kit.remote.contracts import HistoryLine, LockHolder
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost


@dataclass(frozen=True)
class ServiceState:
    unit: str
    active: str
    since: str
    restarts: str


@dataclass(frozen=True)
class HostStatus:
    host: Host
    current: str | None
    revision: dict[str, Any]
    services: tuple[ServiceState, ...]
    ping: dict[str, str]  # worker unit -> "pong" or "no reply"
    lock: LockHolder | None
    last: HistoryLine | str | None = field(default=None)  # the last history line, or why it is unreadable
    cutovers: tuple[str, ...] = ()  # detached cutovers still running on the host
    runs: dict[str, str] = field(default_factory=dict)  # Beat's unit -> the release its process runs
    queues: queues.Report | str | None = None  # on the reporting host: the report, or why there is none


def program(stage: Stage, host: Host) -> str:
    app = stage.app
    params = {
        "current": str(app.current_link),
        "units": [stage.beat.unit(app)] if stage.beat and stage.beat.host == host.name else [],
        "patterns": [p for w in stage.workers_on(host) for p in (w.unit(app).replace("@.", "@*."),
                                                                   w.legacy_unit(app))],
        "state_dir": str(release.state_dir(app)),
        "app": app.name,
        "python": str(units.python(app)),
        "celery_app": app.celery_app,
        "service_environment": list(units.service_environment(stage)),
        "agent": queues.agent_params(stage, [queues.report_request(stage)])
        if stage.workers_on(host) and host == queues.reporter(stage) else None,
    }
    return remote.program("status", params)


def parse(host: Host, output: str) -> HostStatus:
    data = json.loads(output)
    services = tuple(
        ServiceState(unit, f"{info.get('ActiveState', '?')}/{info.get('SubState', '?')}"
                     if info.get("LoadState") != "not-found" else "not installed",
                     info.get("ActiveEnterTimestamp", "") or "-", info.get("NRestarts", "-"))
        for unit, info in data["units"].items())
    found = data.get("queues")
    report = queues.parse(found["answers"][-1]) if isinstance(found, dict) and "answers" in found else \
        found.get("error", "no answer") if isinstance(found, dict) else None
    lock = LockHolder.from_data(data["lock"]) if data.get("lock") else None
    return HostStatus(host, data.get("current"), data.get("revision", {}), services, data.get("ping", {}),
                      lock, last_history(data.get("last")), tuple(data.get("cutovers", ())), data.get("runs", {}),
                      report)


def last_history(found: Any) -> HistoryLine | str | None:
    """The last history line as the host read it (`remote/status.py`), or why it cannot be read."""
    if not found:
        return None
    if "unreadable" in found:
        return str(found["unreadable"])
    try:
        return HistoryLine.from_data(found)
    except (ValueError, TypeError) as exc:
        return f"a line this deploy-kit cannot read ({exc})"


def unfinished(stage: Stage, hosts: list[HostStatus]) -> list[str]:
    """What a cut-off deploy or rollback left for the next one to finish, each with its fix (pure)."""
    found = []
    fix = (f"`fab deploy --stage {stage.name}` moves every host and Beat to a new release, or "
           f"`fab rollback --stage {stage.name} --to RELEASE` to one of these")
    running = [h.host.name for h in hosts if h.cutovers]
    if running:
        return [f"a cutover still runs on {', '.join(running)}: it ends by itself; look again in a moment"]
    currents = {h.host.name: h.current or "none" for h in hosts}
    if len(set(currents.values())) > 1:
        found.append("the hosts run different releases (" + ", ".join(f"{h}: {c}" for h, c in currents.items())
                     + f"): a deploy or rollback was cut off. Fix: {fix}")
    for h in hosts:
        for unit, runs in h.runs.items():
            if runs and h.current and runs != h.current:
                found.append(f"{h.host.name}: {unit} still runs {runs}, though current is {h.current}: "
                             f"a deploy was cut off before Beat moved. Fix: `fab deploy --stage {stage.name}`")
    if found and any(h.lock for h in hosts):
        found.append(f"the lock is still held by the run that was cut off: `fab unlock --stage {stage.name}` first")
    return found


def gather(stage: Stage) -> list[HostStatus]:
    def one(remote: RemoteHost) -> HostStatus:
        result = remote.run_python(program(stage, remote.host), str(stage.app.python), sudo=True,
                                   what="reading the status", timeout=90)
        return parse(remote.host, result.stdout)

    with Session(stage) as session:
        found = session.each(one, what="status")
    return [found[h.name] for h in stage.hosts]
