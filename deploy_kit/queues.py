"""`fab queues`: the stage's queues and workers as the broker and Celery's remote control see them.

Read from ONE host (the first with workers) in one round trip: `remote/queues.py` runs the Celery
agent as the service with the release's Python and asks it for a report (`celery_agent.report`).
The rest is pure: the report parsed into rows, the problems (a queue nobody consumes, messages
stranded by a dead worker, a depth that keeps growing), the JSON shape, the short summary that
`fab deploy`, `fab rollback` and `fab status` print.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from deploy_kit import remote as remote_programs
from deploy_kit import units
from deploy_kit.config import Host, Stage
from deploy_kit.errors import HostError, UsageError
from deploy_kit.ssh import RemoteHost


@dataclass(frozen=True)
class QueueRow:
    name: str
    waiting: int
    unacked: int | None  # None: the broker does not say (RabbitMQ without its management API)
    oldest_unacked_s: float | None  # None: nothing held, or the broker does not say (RabbitMQ)
    consumers: tuple[str, ...]  # Celery node names
    stranded: int | None  # held by no live worker; None: unknown (a worker did not answer), or not
    # a thing on this broker (RabbitMQ puts back what a closed connection held)


@dataclass(frozen=True)
class WorkerRow:
    node: str
    host: str
    release: str | None  # None: a node name without a release (not a deploy-kit instance)
    active: int
    reserved: int
    processed: int | None  # tasks it took since it started, whatever their outcome (stats()['total'])
    succeeded: None = None  # Celery's remote control counts no outcomes: always None (see README)
    failed: None = None


@dataclass(frozen=True)
class Report:
    queues: tuple[QueueRow, ...]
    workers: tuple[WorkerRow, ...]
    complete: bool  # every live worker answered
    broker: str = "redis"  # kombu's transport: "redis", "amqp" (RabbitMQ), ...
    notes: tuple[str, ...] = ()  # what the broker could not tell, with the fix


def queue_names(stage: Stage) -> list[str]:
    """The worker services' queues (not the private verification ones), in hosts.toml's order."""
    return list(dict.fromkeys(q for w in stage.workers for q in w.queues))


def reporter(stage: Stage) -> Host:
    """The host the report is read from: the first with workers."""
    for host in stage.hosts:
        if stage.workers_on(host):
            return host
    raise UsageError(f"stage {stage.name} has no host with workers: nothing to report")


def agent_params(stage: Stage, requests: list[dict[str, Any]], release: str | None = None) -> dict[str, Any]:
    """What `remote/queues.py` needs to run the agent as the service and ask it `requests`."""
    app = stage.app
    return {"releases_dir": str(app.releases_dir), "current": str(app.current_link), "venv": units.VENV,
            "service_environment": list(units.service_environment(stage)),
            "app": {"name": app.name, "celery_app": app.celery_app}, "release": release, "requests": requests}


def ask(remote: RemoteHost, stage: Stage, requests: list[dict[str, Any]], release: str | None = None) -> list[str]:
    """The Celery agent's answers to `requests`, run as the service with `release`'s Python
    (default: the current one), in one round trip."""
    result = remote.run_python(remote_programs.program("queues", agent_params(stage, requests, release)),
                               str(stage.app.python), sudo=True, what="asking the Celery agent", timeout=180)
    lines = result.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise HostError(remote.name, "the Celery agent gave no answer: " + (result.stderr.strip()[-300:]
                                                                             or "no output")) from None
    if "error" in data:
        raise HostError(remote.name, f"the Celery agent failed: {data['error']}")
    return list(data["answers"])


def report_request(stage: Stage) -> dict[str, Any]:
    return {"op": "report", "queues": queue_names(stage)}


def node_parts(node: str) -> tuple[str, str | None]:
    """(host, release) of a node name NAME.RELEASE@HOST (release None for NAME@HOST)."""
    name, _, host = node.rpartition("@")
    _service, dot, release = name.partition(".")
    return host, release if dot else None


def parse(detail: str) -> Report:
    """The agent's report (JSON text) as rows."""
    data = json.loads(detail)
    workers = data.get("workers", {})
    queues = tuple(QueueRow(name, int(q.get("waiting") or 0), q.get("unacked"), q.get("oldest_unacked_s"),
                            tuple(n for n in sorted(workers) if name in workers[n].get("queues", ())),
                            q.get("stranded"))
                   for name, q in data.get("queues", {}).items())
    rows = tuple(WorkerRow(node, *node_parts(node), int(w.get("active", 0)), int(w.get("reserved", 0)),
                           w.get("processed")) for node, w in sorted(workers.items()))
    return Report(queues, rows, bool(data.get("complete", True)), str(data.get("transport") or "redis"),
                  tuple(str(n) for n in data.get("notes", ())))


def to_json(report: Report) -> dict[str, Any]:
    """The object `fab queues --json` prints."""
    return {"queues": [{**asdict(q), "consumers": list(q.consumers)} for q in report.queues],
            "workers": [asdict(w) for w in report.workers]}


def problems(stage: Stage, report: Report) -> list[str]:
    """Each problem in one line: its cause and its fix (pure)."""
    found = []
    for q in report.queues:
        services = ", ".join(w.name for w in stage.workers if q.name in w.queues)
        if not q.consumers:
            found.append(f"queue {q.name}: no worker consumes it ({q.waiting} waiting). Fix: start worker service "
                         f"{services} (`fab status --stage {stage.name}` shows its units; `fab deploy` starts them)")
        if q.stranded:
            found.append(f"queue {q.name}: {q.stranded} message(s) held by a worker that is gone, stranded until "
                         f"Redis's visibility timeout (an hour). Fix: `fab queues --restore --stage {stage.name}`")
    found += report.notes
    if not report.complete and report.broker == "redis":
        found.append("not every worker answered in time, so stranded messages cannot be told from held ones. "
                     "Fix: look again in a moment")
    return found


def growing(samples: Sequence[Report], window: int = 3) -> list[str]:
    """Queues whose depth grew at every one of the last `window` samples, with the fix (pure)."""
    if len(samples) < window:
        return []
    recent = samples[-window:]
    found = []
    for q in recent[-1].queues:
        depths = [next((r.waiting for r in s.queues if r.name == q.name), 0) for s in recent]
        if all(b > a for a, b in zip(depths, depths[1:], strict=False)):
            found.append(f"queue {q.name} grows: {' -> '.join(map(str, depths))} waiting over {window} samples. "
                         "Fix: more workers or concurrency for its service, or look for a stuck task (`fab logs`)")
    return found


def said(stage: Stage, detail: str) -> list[str]:
    """What a run ends with, from the agent's report (JSON text): a line per queue, then each problem."""
    report = parse(detail)
    return [*summary(report), *(f"PROBLEM: {p}" for p in problems(stage, report))]


def summary(report: Report) -> list[str]:
    """One line per queue: waiting, unacked, consumers (after a deploy or rollback, in `fab status`)."""
    return [f"queue {q.name}: {q.waiting} waiting, {'?' if q.unacked is None else q.unacked} unacked, "
            f"consumed by {', '.join(q.consumers) or 'NO WORKER'}" for q in report.queues]


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"
