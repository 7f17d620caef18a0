"""Runs ON a host, as root, with the host's own python3 (stdlib only, Python 3.8+): gathers in one
round trip everything `fab setup` and `fab check` need to know, and prints it as one JSON object.

It changes nothing on the host. It never prints a secret: of the env file it reports key names
only, and error texts from broker probes are masked. deploy-kit ships it with
`deploy_kit.remote.program`.
"""

from __future__ import annotations

import fnmatch
import grp
import json
import os
import pwd
import socket
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from deploy_kit.remote import contracts, hostlib, probes


def lstat(path: str) -> dict | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    kind = "link" if stat.S_ISLNK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "file"
    result = {"type": kind, "owner": _user(info.st_uid), "group": _group(info.st_gid),
              "mode": f"{stat.S_IMODE(info.st_mode):04o}"}
    if kind == "link":
        result["target"] = os.readlink(path)
        result["resolves"] = os.path.exists(path)
    return result


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def env_keys(path: str) -> list:
    """Names of the keys that have a non-empty value (values are never read out)."""
    try:
        with open(path) as handle:
            return [key for key, value in hostlib.env_values(handle.read()).items() if hostlib.is_set(value)]
    except OSError:
        return []


def as_service(params: dict, args: list, with_release: bool) -> dict:
    """Run a probe (`probes.py`) the way the units run the app: systemd-run with the same user,
    env file, working directory and sandboxing, so "works in my shell" cannot hide a failure."""
    python = params["release_python"] if with_release else params["python"]
    directory = params["paths"]["current"] if with_release else "/"
    return hostlib.as_service(params["service_environment"], directory, [python, "-c", hostlib.READ_PROGRAM, *args],
                              stdin=hostlib.program_line(probes.program()))


def target() -> dict:
    """What wheels this host's Python can install (for the control machine's pip download)."""
    import platform
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    return {"python": platform.python_version(), "machine": platform.machine(),
            "glibc": libc.split()[-1] if libc.startswith("glibc") else ""}


def releases(directory: str) -> list:
    """Every release directory with its REVISION and whether it is marked bad or half-built."""
    found = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        entry = {"name": name, "building": name.startswith(".") and name.endswith((".building", ".deleting")),
                 "bad": os.path.exists(os.path.join(path, contracts.STATE_DIR, contracts.BAD)), "revision": {},
                 "mtime": os.stat(path).st_mtime}
        try:
            with open(os.path.join(path, "REVISION")) as handle:
                entry["revision"] = json.load(handle)
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(path, contracts.STATE_DIR, contracts.ENV_KEY)) as handle:
                entry["env_key"] = handle.read().strip()
        except OSError:
            entry["env_key"] = ""
        found.append(entry)
    return found


def live_log(path: str, keep: int = 500) -> list:
    """The live log's last lines, parsed; a torn or foreign line is skipped."""
    try:
        with open(path) as handle:
            lines = handle.readlines()[-keep:]
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(asdict(contracts.LiveEvent.from_json(line)))
        except (ValueError, TypeError):
            continue
    return events


def main(params: dict) -> None:
    app = params["app"]
    facts: dict = {"python": sys.version.split()[0], "target": target(), "hostname": socket.gethostname()}
    try:
        user = pwd.getpwnam(app["user"])
        facts["user"] = {"name": user.pw_name, "uid": user.pw_uid, "group": _group(user.pw_gid),
                         "groups": sorted(g.gr_name for g in grp.getgrall() if user.pw_name in g.gr_mem)}
    except KeyError:
        facts["user"] = None
    try:
        facts["group"] = {"name": grp.getgrnam(app["group"]).gr_name}
    except KeyError:
        facts["group"] = None
    facts["paths"] = {name: lstat(path) for name, path in params["paths"].items()}
    with ThreadPoolExecutor(max_workers=4) as pool:
        # The slow probes (Python start-ups as the service, `du`) run while the rest is read.
        slow = start_slow_checks(pool, params, facts) if params.get("check") else {}
        facts["releases"] = releases(params["paths"]["releases"])
        facts["live"] = live_log(os.path.join(params["state_dir"], contracts.LIVE_LOG))
        wheel_dir = os.path.join(params["state_dir"], "wheels")
        facts["wheels"] = sorted(os.listdir(wheel_dir)) if os.path.isdir(wheel_dir) else []
        if params.get("lock") and os.path.isdir(params["paths"]["deploy_to"]):
            facts["lock"] = hostlib.take_lock(params["state_dir"], params["lock"])
        elif params.get("lock"):  # a host never set up: nothing there to protect, nothing to create
            facts["lock"] = {"acquired": True, "holder": params["lock"]}
        unit_dir = params["unit_dir"]
        facts["units"] = {}
        for name in sorted(os.listdir(unit_dir)):
            if any(fnmatch.fnmatch(name, pattern) for pattern in params["unit_patterns"]):
                with open(os.path.join(unit_dir, name)) as handle:
                    facts["units"][name] = handle.read()
        current = facts["paths"].get("current") or {}
        release = os.path.basename(current.get("target", "").rstrip("/")) if current.get("resolves") else ""
        wanted = [n.replace("@.", f"@{release}.") if "@." in n and release else n for n in params["wanted_units"]]
        params["wanted_units"] = [n for n in wanted if "@." not in n]  # a template's state is its live instance's
        facts["instances"] = instances(params["unit_patterns"])
        facts["cutovers"] = cutovers(app["name"])
        states = {}
        for name in sorted(set(facts["units"]) | set(params["wanted_units"])):
            _, enabled, _ = hostlib.run(["systemctl", "is-enabled", name])
            _, active, _ = hostlib.run(["systemctl", "is-active", name])
            states[name] = {"enabled": enabled.strip() or "not-found", "active": active.strip() or "unknown"}
        facts["unit_state"] = states
        if params.get("check"):
            facts.update(check_facts(params, facts, slow))
    print(json.dumps(facts))


def instances(patterns: list) -> dict:
    """Every loaded or enabled instance of the app's template units: {unit: {active, enabled}}."""
    found = {unit: {"active": active, "enabled": False}
             for unit, active in hostlib.list_units(patterns).items() if "@" in unit}
    wants = "/etc/systemd/system/multi-user.target.wants"
    for name in sorted(os.listdir(wants)) if os.path.isdir(wants) else []:
        if "@" in name and any(fnmatch.fnmatch(name, p) for p in patterns):
            found.setdefault(name, {"active": "inactive", "enabled": False})["enabled"] = True
    return found


def cutovers(app_name: str) -> list:
    """The app's detached cutovers still running here (`APP-cutover-*`): a deploy or rollback must
    not start while one runs. When systemd cannot say, a name that says so (the run is refused)."""
    code, out, err = hostlib.run(["systemctl", "list-units", "--plain", "--no-legend", "--state=active,activating",
                                  f"{app_name}-cutover-*"])
    if code != 0:
        return [f"(systemctl list-units failed: {(err or out).strip()[:200]})"]
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def free_kb(releases_dir: str) -> int:
    """Room where releases are written (`releases/` may be a filesystem of its own; before the first
    deploy, the nearest directory that exists)."""
    probe_dir = releases_dir
    while not os.path.exists(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    vfs = os.statvfs(probe_dir)
    return vfs.f_bavail * vfs.f_frsize // 1024


def start_slow_checks(pool: ThreadPoolExecutor, params: dict, facts: dict) -> dict:
    """`fab check`'s slow probes, started on `pool`: each Python start-up as the service (the
    broker, kombu's; with the current release, its `celery --version` and the app's import), and
    the current release's size. `check_facts` reads their results."""
    app, paths, current = params["app"], params["paths"], facts["paths"].get("current") or {}
    has_release = bool(current.get("resolves") and os.path.exists(params["release_python"]))
    slow: dict = {"has_release": has_release}
    if current.get("resolves"):
        slow["du"] = pool.submit(hostlib.run, ["du", "-sk", os.path.realpath(paths["current"])], timeout=60)
    if facts["user"] is not None and facts["group"] is not None and facts["paths"].get("env_file") is not None:
        slow["broker"] = pool.submit(as_service, params, ["broker"], has_release)  # kombu's, not the app's
        if has_release and params.get("current_app", True):
            slow["runs"] = pool.submit(hostlib.run, ["runuser", "-u", app["user"], "--", params["release_python"],
                                                     "-m", "celery", "--version"])
            slow["imports"] = pool.submit(as_service, params, ["app", app["celery_app"]], True)
    return slow


def check_facts(params: dict, facts: dict, slow: dict) -> dict:
    app = params["app"]
    paths = params["paths"]
    result: dict = {"readable": {}, "loaded": {}}
    if facts["user"] is not None:
        for name in ("deploy_to", "releases", "shared", "current", "env_file"):
            if facts["paths"].get(name) is not None:
                test = ["test", "-r", paths[name]]
                if name != "env_file":
                    test += ["-a", "-x", paths[name]]
                code, _, _ = hostlib.run(["runuser", "-u", app["user"], "--", *test])
                result["readable"][name] = code == 0
    result["env_keys"] = env_keys(paths["env_file"])
    result["disk_free_kb"] = free_kb(paths["releases"])
    result["release_kb"] = 0  # (its place among the keys; the `du` started early says more below)
    with open("/proc/sys/fs/nr_open") as handle:
        result["nr_open"] = int(handle.read())
    for name in params["wanted_units"]:
        result["loaded"][name] = hostlib.show(name, "LimitNOFILE,TimeoutStopUSec,NeedDaemonReload,LoadState")
    result["release_python"] = slow["has_release"]
    result["current_app"] = params.get("current_app", True)  # else a deploy: its build checks the new one
    code, out, _ = slow["du"].result() if "du" in slow else (1, "", "")
    if code == 0:
        result["release_kb"] = int(out.split()[0])
    if "runs" in slow:
        result["release_runs"] = slow["runs"].result()[0] == 0
        result["app_import"] = slow["imports"].result()
    if "broker" in slow:
        result["broker"] = slow["broker"].result()
    return result
