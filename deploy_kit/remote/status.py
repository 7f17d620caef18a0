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

from deploy_kit.remote import contracts, hostlib, queues

LIVE = ("active", "activating", "deactivating", "reloading")


def node_of(unit: str, host: str) -> str:
    """Celery's node name of a worker unit: NAME.RELEASE@HOST (an instance) or NAME@HOST (older units)."""
    name = unit.split("-worker-", 1)[1].rsplit(".service", 1)[0]
    return name.replace("@", ".") + "@" + host


def revision(path: str) -> dict:
    """A release's REVISION ({} when it is missing or unreadable)."""
    try:
        with open(path) as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def last_history(path: str):
    """The last history line (`contracts.HistoryLine`, as JSON data); None when there is none,
    {"unreadable": why} when it cannot be read or parsed."""
    try:
        with open(path) as handle:
            lines = [line for line in handle.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"unreadable": exc.strerror or str(exc)}
    if not lines:
        return None
    try:
        return contracts.HistoryLine.from_json(lines[-1]).to_data()
    except (ValueError, TypeError, KeyError) as exc:
        return {"unreadable": f"a torn or foreign line ({exc})"}


def main(params: dict) -> None:
    out: dict = {"current": None, "revision": {}, "units": {}, "ping": {}}
    current = params["current"]
    if os.path.islink(current):
        out["current"] = os.path.basename(os.readlink(current))
        out["revision"] = revision(os.path.join(current, "REVISION"))
    units = list(params["units"])
    units += [u for u, active in hostlib.list_units(params["patterns"]).items() if active in LIVE and u not in units]
    for unit in units:
        out["units"][unit] = hostlib.show(unit, "ActiveState,SubState,ActiveEnterTimestamp,NRestarts,MainPID,"
                                                "LoadState")
    for unit in params["units"]:  # Beat: the release its process runs, whatever `current` says
        pid = out["units"][unit].get("MainPID", "0")
        try:
            out.setdefault("runs", {})[unit] = os.path.basename(os.readlink(f"/proc/{pid}/cwd")) if pid != "0" else ""
        except OSError:
            out.setdefault("runs", {})[unit] = ""
    holder = hostlib.read_lock(params["state_dir"])
    out["lock"] = holder.to_data() if holder else None
    out["last"] = last_history(os.path.join(params["state_dir"], contracts.HISTORY))
    out["cutovers"] = list(hostlib.list_units([params["app"] + "-cutover-*"], "active,activating"))
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
