"""What a host looks like, as `fab setup` and `fab check` see it: one probe, one round trip.

The probe is `remote/hostprobe.py`, run on the host by its own python3 as root; this module
builds its parameters and parses its JSON into plain objects (pure, tested with recorded output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deploy_kit import remote, units
from deploy_kit.config import Host, Stage
from deploy_kit.errors import HostError
from deploy_kit.remote.contracts import STATE_DIR, LiveEvent, LockHolder
from deploy_kit.ssh import RemoteHost


@dataclass(frozen=True)
class PathInfo:
    type: str
    owner: str
    group: str
    mode: str
    target: str | None = None
    resolves: bool = True


@dataclass(frozen=True)
class Probe:
    """The outcome of one probe run as the service would run it (broker, app import)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class ReleaseInfo:
    name: str
    building: bool
    bad: bool
    revision: dict[str, str]
    env_key: str = ""
    mtime: float = 0.0  # when it was made, by the host's clock


@dataclass(frozen=True)
class LockState:
    acquired: bool
    holder: LockHolder


@dataclass(frozen=True)
class HostFacts:
    python: str
    user: dict[str, Any] | None
    group: dict[str, Any] | None
    paths: dict[str, PathInfo | None]
    units: dict[str, str]
    unit_state: dict[str, dict[str, str]]
    target: dict[str, str] = field(default_factory=dict)
    releases: tuple[ReleaseInfo, ...] = ()
    wheels: frozenset[str] = frozenset()
    lock: LockState | None = None
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)  # unit -> {active, enabled}
    live: tuple[LiveEvent, ...] = ()  # the live log: what went live, oldest first
    cutovers: tuple[str, ...] = ()  # the app's detached cutovers still running (`APP-cutover-*` units)
    hostname: str = ""  # as the host names itself (its workers' node names and private queues)
    # Only filled by a probe made for `fab check`:
    readable: dict[str, bool] = field(default_factory=dict)
    env_keys: tuple[str, ...] = ()
    disk_free_kb: int = 0
    release_kb: int = 0
    nr_open: int = 0
    loaded: dict[str, dict[str, str]] = field(default_factory=dict)
    release_python: bool = False
    release_runs: bool | None = None
    broker: Probe | None = None
    app_import: Probe | None = None
    current_app: bool = True  # False: the current release's Celery app was left alone (a deploy's probe)

    def path(self, name: str) -> PathInfo | None:
        return self.paths.get(name)


def paths(stage: Stage) -> dict[str, str]:
    app = stage.app
    return {
        "deploy_to": str(app.deploy_to),
        "releases": str(app.releases_dir),
        "shared": str(app.shared_dir),
        "current": str(app.current_link),
        "env_dir": str(app.env_file.parent),
        "env_file": str(app.env_file),
    }


def params(stage: Stage, host: Host, check: bool, lock: LockHolder | None = None,
           current_app: bool = True) -> dict[str, Any]:
    """With `check`, every `fab check` probe; without `current_app`, not those of the current
    release's Celery app (a deploy: its build runs the new release's as the service instead)."""
    app = stage.app
    wanted = units.units_for(stage, host)
    return {
        "app": {"name": app.name, "user": app.user, "group": app.group, "celery_app": app.celery_app},
        "paths": paths(stage),
        "unit_dir": str(units.UNIT_DIR),
        "unit_patterns": list(units.managed_pattern(app)),
        "wanted_units": list(wanted),
        "service_environment": list(units.service_environment(stage)),
        "python": str(app.python),
        "release_python": str(units.python(app)),
        "check": check,
        "current_app": current_app,
        "state_dir": str(app.deploy_to / STATE_DIR),
        "lock": lock.to_data() if lock else None,
    }


def program(params: dict[str, Any]) -> str:
    return remote.program("hostprobe", params)


def parse(output: str) -> HostFacts:
    data = json.loads(output)

    def probe(value: dict[str, Any] | None) -> Probe | None:
        return None if value is None else Probe(bool(value["ok"]), str(value.get("detail", "")))

    return HostFacts(
        python=data.get("python", ""),
        user=data.get("user"),
        group=data.get("group"),
        paths={k: PathInfo(**v) if v else None for k, v in data.get("paths", {}).items()},
        units=data.get("units", {}),
        unit_state=data.get("unit_state", {}),
        target=data.get("target", {}),
        releases=tuple(ReleaseInfo(r["name"], bool(r["building"]), bool(r["bad"]), r.get("revision", {}),
                                   r.get("env_key", ""), float(r.get("mtime", 0.0)))
                       for r in data.get("releases", [])),
        wheels=frozenset(data.get("wheels", [])),
        lock=LockState(bool(data["lock"]["acquired"]), LockHolder.from_data(data["lock"]["holder"]))
        if data.get("lock") else None,
        instances=data.get("instances", {}),
        live=tuple(LiveEvent(**e) for e in data.get("live", [])),
        cutovers=tuple(data.get("cutovers", ())),
        hostname=str(data.get("hostname", "")),
        readable=data.get("readable", {}),
        env_keys=tuple(data.get("env_keys", ())),
        disk_free_kb=int(data.get("disk_free_kb", 0)),
        release_kb=int(data.get("release_kb", 0)),
        nr_open=int(data.get("nr_open", 0)),
        loaded=data.get("loaded", {}),
        release_python=bool(data.get("release_python", False)),
        release_runs=data.get("release_runs"),
        broker=probe(data.get("broker")),
        app_import=probe(data.get("app_import")),
        current_app=bool(data.get("current_app", True)),
    )


def gather(remote: RemoteHost, stage: Stage, *, check: bool, lock: LockHolder | None = None) -> HostFacts:
    """Probe the host; with `lock`, first take the app's deploy lock there (same round trip)."""
    return probe(remote, params(stage, remote.host, check, lock))


def probe(remote: RemoteHost, probe_params: dict[str, Any]) -> HostFacts:
    result = remote.run_python(program(probe_params), probe_params["python"], sudo=True,
                               what="probing the host", timeout=180)
    try:
        return parse(result.stdout)
    except (ValueError, KeyError, TypeError) as exc:
        raise HostError(remote.name, f"the host probe printed something unexpected ({exc}): "
                        f"{result.stdout[-300:]!r}") from None
