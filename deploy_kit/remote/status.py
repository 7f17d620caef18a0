"""Runs ON a host, as root, read-only: what `fab status` shows of it, as one JSON object.

The current release and its REVISION, the release Beat's process runs, every unit of the app
that runs or drains (each worker instance, Beat, plain units of older deploy-kits), a ping of
each running worker (Celery's `inspect ping`, as the service), the lock holder, the last
history line, the detached cutovers still running, and on the first host with workers the
queues' report (`remote/queues.py`).
"""

from __future__ import annotations

import json
import os
import socket

from deploy_kit.remote import hostlib, queues

LIVE = ("active", "activating", "deactivating", "reloading")


def node_of(unit: str, host: str) -> str:
    """Celery's node name of a worker unit: NAME.RELEASE@HOST (an instance) or NAME@HOST (older units)."""
    name = unit.split("-worker-", 1)[1].rsplit(".service", 1)[0]
    return name.replace("@", ".") + "@" + host


def listed(patterns: list, states: str = "") -> list:
    argv = ["systemctl", "list-units", "--plain", "--no-legend", "--all", *patterns]
    _, out, _ = hostlib.run(argv + ([f"--state={states}"] if states else []))
    return [line.split() for line in out.splitlines() if line.strip()]


def read_json(path: str, last_line: bool = False):
    try:
        with open(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        return None
    except OSError:
        return {"who": "unknown"}
    lines = text.splitlines()
    try:
        return json.loads(lines[-1] if last_line else text) if lines else None
    except ValueError:
        return {"who": "unknown"}


def main(params: dict) -> None:
    out: dict = {"current": None, "revision": {}, "units": {}, "ping": {}}
    current = params["current"]
    if os.path.islink(current):
        out["current"] = os.path.basename(os.readlink(current))
        out["revision"] = read_json(os.path.join(current, "REVISION")) or {}
    units = list(params["units"])
    units += [p[0] for p in listed(params["patterns"]) if len(p) >= 3 and p[2] in LIVE and p[0] not in units]
    for unit in units:
        out["units"][unit] = hostlib.show(unit, "ActiveState,SubState,ActiveEnterTimestamp,NRestarts,MainPID,"
                                                "LoadState")
    for unit in params["units"]:  # Beat: the release its process runs, whatever `current` says
        pid = out["units"][unit].get("MainPID", "0")
        try:
            out.setdefault("runs", {})[unit] = os.path.basename(os.readlink(f"/proc/{pid}/cwd")) if pid != "0" else ""
        except OSError:
            out.setdefault("runs", {})[unit] = ""
    out["lock"] = hostlib.read_lock(params["state_dir"])
    out["last"] = read_json(os.path.join(params["state_dir"], "history.jsonl"), last_line=True)
    out["cutovers"] = [p[0] for p in listed([params["app"] + "-cutover-*"], "active,activating")]
    workers = [u for u in out["units"] if "-worker-" in u and out["units"][u].get("ActiveState") == "active"]
    if out["current"] and workers and os.path.exists(params["python"]):
        host = socket.gethostname()
        _, text, _ = hostlib.run(hostlib.service_argv(
            params["service_environment"], current,
            [params["python"], "-m", "celery", "-A", params["celery_app"], "inspect", "ping",
             "-d", ",".join(node_of(u, host) for u in workers), "--timeout", "3", "--json"]), timeout=40)
        try:
            replies = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
        except ValueError:
            replies = {}
        out["ping"] = {unit: "pong" if node_of(unit, host) in replies else "no reply" for unit in workers}
    if params.get("agent") and out["current"]:  # the reporting host: the queues, as `fab queues` reads them
        try:
            out["queues"] = {"answers": queues.ask(params["agent"], params["agent"]["requests"])}
        except queues.StepFailed as exc:
            out["queues"] = {"error": str(exc)}
    print(json.dumps(out))
