"""`fab status`: per host, the current release, each service's state, a worker ping, the lock and the
last deploy, gathered by one program per host (read-only) and parsed purely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deploy_kit import release, units
from deploy_kit.config import Host, Stage
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost

# Runs on the host as root (stdlib only); prints one JSON object.
STATUS_PROGRAM = r'''
import json, os, socket, subprocess
P = json.loads(PARAMS)
def run(argv, timeout=20):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, ""
out = {"current": None, "revision": {}, "units": {}, "lock": None, "last": None, "ping": {}, "cutovers": []}
current = P["current"]
if os.path.islink(current):
    out["current"] = os.path.basename(os.readlink(current))
    try:
        with open(os.path.join(current, "REVISION")) as handle:
            out["revision"] = json.load(handle)
    except (OSError, ValueError):
        pass
_, running = run(["systemctl", "list-units", "--plain", "--no-legend", "--state=active,activating",
                  P["app"] + "-cutover-*"])
out["cutovers"] = [line.split()[0] for line in running.splitlines() if line.strip()]
units = list(P["units"])
_, listed = run(["systemctl", "list-units", "--plain", "--no-legend", "--all", *P["patterns"]])
for line in listed.splitlines():  # every instance that runs or drains, and plain units of older deploy-kits
    parts = line.split()
    if len(parts) >= 3 and parts[2] in ("active", "activating", "deactivating", "reloading") and parts[0] not in units:
        units.append(parts[0])
for unit in units:
    _, text = run(["systemctl", "show", unit, "-p",
                   "ActiveState,SubState,ActiveEnterTimestamp,NRestarts,MainPID,LoadState"])
    out["units"][unit] = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
try:
    with open(os.path.join(P["state_dir"], "lock", "holder.json")) as handle:
        out["lock"] = json.load(handle)
except FileNotFoundError:
    pass
except (OSError, ValueError):
    out["lock"] = {"who": "unknown"}
try:
    with open(os.path.join(P["state_dir"], "history.jsonl")) as handle:
        lines = handle.read().splitlines()
    if lines:
        out["last"] = json.loads(lines[-1])
except (OSError, ValueError):
    pass
def node_of(unit, host):
    name = unit.split("-worker-", 1)[1].rsplit(".service", 1)[0]  # NAME@RELEASE, or NAME (older units)
    return name.replace("@", ".") + "@" + host
workers = [u for u in out["units"] if "-worker-" in u and out["units"][u].get("ActiveState") == "active"]
if out["current"] and workers and os.path.exists(P["python"]):
    props = []
    for setting in P["service_environment"]:
        props += ["-p", setting]
    host = socket.gethostname()
    nodes = ",".join(node_of(u, host) for u in workers)
    code, text = run(["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec", *props,
                      "--", P["python"], "-m", "celery", "-A", P["celery_app"], "inspect", "ping",
                      "-d", nodes, "--timeout", "3", "--json"], timeout=40)
    try:
        replies = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
    except ValueError:
        replies = {}
    for unit in workers:
        out["ping"][unit] = "pong" if node_of(unit, host) in replies else "no reply"
print(json.dumps(out))
'''


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
    lock: dict[str, Any] | None
    last: dict[str, Any] | None = field(default=None)
    cutovers: tuple[str, ...] = ()  # detached cutovers still running on the host


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
    }
    return f"PARAMS = {json.dumps(json.dumps(params))}\n{STATUS_PROGRAM}"


def parse(host: Host, output: str) -> HostStatus:
    data = json.loads(output)
    services = tuple(
        ServiceState(unit, f"{info.get('ActiveState', '?')}/{info.get('SubState', '?')}"
                     if info.get("LoadState") != "not-found" else "not installed",
                     info.get("ActiveEnterTimestamp", "") or "-", info.get("NRestarts", "-"))
        for unit, info in data["units"].items())
    return HostStatus(host, data.get("current"), data.get("revision", {}), services, data.get("ping", {}),
                      data.get("lock"), data.get("last"), tuple(data.get("cutovers", ())))


def gather(stage: Stage) -> list[HostStatus]:
    def one(remote: RemoteHost) -> HostStatus:
        result = remote.run_python(program(stage, remote.host), str(stage.app.python), sudo=True,
                                   what="reading the status", timeout=90)
        return parse(remote.host, result.stdout)

    with Session(stage) as session:
        found = session.each(one, what="status")
    return [found[h.name] for h in stage.hosts]
