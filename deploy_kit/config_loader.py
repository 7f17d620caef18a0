"""Read hosts.toml's tables into the objects of `config.py`, reporting every problem at once."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from deploy_kit.config import (
    SHARED_TABLES,
    App,
    Beat,
    Config,
    Host,
    SSHSettings,
    Stage,
    SystemdSettings,
    Verify,
    WorkerService,
    _unknown,
)
from deploy_kit.config_checks import (
    _HOST_NAME,
    _NAME,
    _QUEUE,
    _absolute,
    _address,
    _at_least,
    _local_file,
    _login,
    _loglevel,
    _merge,
    _module,
    _name_check,
    _not_empty,
    _port,
    _positive,
    _Problems,
    _ref,
    _relative_paths,
    _repo,
    _roles,
    _service_account,
    _string_list,
    _Table,
)


class Loader:
    def __init__(self, file: Path):
        self.file = file
        self.problems = _Problems(file)

    def local_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.file.parent / path).absolute()

    def config(self, data: dict[str, Any]) -> Config:
        top = _Table(data, "", self.problems)
        default_stage = top.get("default_stage", str, None)
        stages_raw = top.get("stages", dict, None)
        shared = {name: top.get(name, list if name == "workers" else dict, None) for name in SHARED_TABLES}
        top.unknown_keys()
        if stages_raw is None and "stages" not in data:
            self.problems.add("stages", "no stages defined. Fix: add a [stages.NAME] table per "
                              "environment, see hosts.example.toml")
        stages: dict[str, Stage] = {}
        for name, raw in (stages_raw or {}).items():
            if not _NAME.match(name):
                self.problems.add(f"stages.{name}", _name_check("stage name")(name) or "")
                continue
            stage = self.stage(name, raw, shared)
            if stage is not None:
                stages[name] = stage
        if default_stage is not None and stages_raw is not None and default_stage not in stages_raw:
            self.problems.add("default_stage", _unknown("stage", default_stage, list(stages_raw), "stages"))
        self.problems.raise_if_any()
        return Config(path=self.file, stages=stages, default_stage=default_stage)

    def section(self, stage: str, name: str, own_raw: dict[str, Any], shared: dict[str, Any],
                required: bool) -> _Table | None:
        own_path = f"stages.{stage}.{name}"
        if name not in own_raw and shared.get(name) is None:
            if required:
                self.problems.add(own_path, f"missing table. Fix: add [{own_path}] (or a shared [{name}] "
                                  "at the top), see hosts.example.toml")
                return None
            return _Table({}, own_path, self.problems)
        merged, origins = _merge(shared.get(name), own_raw.get(name), name, own_path)
        return _Table(merged, own_path, self.problems, origins)

    def stage(self, name: str, raw: Any, shared: dict[str, Any]) -> Stage | None:
        table = _Table(raw, f"stages.{name}", self.problems)
        allowed = ("hosts", "parallel", *SHARED_TABLES)
        table.unknown_keys(allowed)
        before = len(self.problems.items)
        parallel = table.get("parallel", int, 10, check=_positive)
        hosts = self.hosts(name, table.data.get("hosts"))
        ssh = self.ssh(self.section(name, "ssh", table.data, shared, required=False))
        app = self.app(self.section(name, "app", table.data, shared, required=True))
        workers = self.workers(name, table.data, shared, hosts)
        beat = self.beat(name, self.section(name, "beat", table.data, shared, required=False), hosts)
        verify = self.verify(self.section(name, "verify", table.data, shared, required=False))
        systemd = self.systemd(self.section(name, "systemd", table.data, shared, required=False))
        if len(self.problems.items) != before or None in (hosts, ssh, app, workers, verify, systemd):
            return None
        return Stage(name=name, hosts=hosts, ssh=ssh, app=app, workers=workers, beat=beat,
                     verify=verify, systemd=systemd, parallel=parallel)

    def hosts(self, stage: str, raw: Any) -> tuple[Host, ...] | None:
        path = f"stages.{stage}.hosts"
        if raw is None:
            self.problems.add(path, f"no hosts. Fix: add at least one [[{path}]] with an address")
            return None
        if not isinstance(raw, list) or not raw:
            self.problems.add(path, f"must be a non-empty list of [[{path}]] tables")
            return None
        hosts: list[Host] = []
        names: set[str] = set()
        for index, item in enumerate(raw):
            t = _Table(item, f"{path}[{index}]", self.problems)
            address = t.get("address", str, check=_address, hint='"203.0.113.10"')
            host_name = t.get("name", str, address or f"host{index + 1}",
                              check=lambda v: None if _HOST_NAME.match(v) else
                              f"must be a name of letters, digits, '.', '_' or '-', got {v!r}")
            port = t.get("port", int, 22, check=_port)
            user = t.get("user", str, "deploy", check=_login)
            roles = t.get("roles", list, ["worker"], check=_roles)
            t.unknown_keys()
            if host_name in names:
                self.problems.add(f"{path}[{index}].name", f"host name {host_name!r} is used twice "
                                  "in this stage; give each host a distinct name")
            names.add(host_name or "")
            if None in (address, host_name, port, user, roles):
                continue
            hosts.append(Host(name=host_name, address=address, port=port, user=user, roles=tuple(roles)))
        self._single_role(path, hosts, "beat", "Celery Beat must run on one host only, or periodic "
                          "tasks run twice")
        self._single_role(path, hosts, "migrate", "migrations run once per stage")
        return tuple(hosts) if len(hosts) == len(raw) else None

    def _single_role(self, path: str, hosts: list[Host], role: str, why: str) -> None:
        holders = [h.name for h in hosts if role in h.roles]
        if len(holders) > 1:
            self.problems.add(path, f"{len(holders)} hosts have the {role!r} role "
                              f"({', '.join(holders)}); {why}. Fix: keep it on one host")

    def ssh(self, t: _Table | None) -> SSHSettings | None:
        if t is None:
            return None
        known_hosts = t.get("known_hosts", str, "~/.ssh/known_hosts", check=_local_file)
        identity = t.get("identity_file", str, None, check=_local_file)
        timeout = t.get("connect_timeout", (int, float), 10.0, check=_positive)
        t.unknown_keys()
        if known_hosts is None or timeout is None:
            return None
        return SSHSettings(known_hosts=self.local_path(known_hosts),
                           identity_file=self.local_path(identity) if identity else None,
                           connect_timeout=float(timeout))

    def app(self, t: _Table | None) -> App | None:
        if t is None:
            return None
        name = t.get("name", str, check=_name_check("app name"), hint='"myapp"')
        repo = t.get("repo", str, check=_repo, hint='"git@example.com:acme/myapp.git"')
        ref = t.get("ref", str, "HEAD", check=_ref)
        subdir = t.get("path", str, "", check=lambda v: None if not v.startswith("/") and ".." not in v
                       else f"must be a directory inside the repository, got {v!r}")
        celery_app = t.get("celery_app", str, check=_module, hint='"myproject"')
        deploy_to = t.get("deploy_to", str, f"/srv/{name}" if name else None, check=_absolute)
        user = t.get("user", str, name, check=_service_account("user"))
        group = t.get("group", str, user, check=_service_account("group"))
        env_file = t.get("env_file", str, f"/etc/{name}/{name}.env" if name else None, check=_absolute)
        keep = t.get("keep_releases", int, 5, check=_at_least(2, "the current and the previous "
                                                               "release are always kept"))
        requirements = t.get("requirements", str, "requirements.txt", check=_not_empty)
        python = t.get("python", str, "/usr/bin/python3", check=_absolute)
        linked_dirs = t.get("linked_dirs", list, [], check=_relative_paths)
        linked_files = t.get("linked_files", list, [], check=_relative_paths)
        install = t.get("install", str, "wheels", check=lambda v: None if v in ("wheels", "index") else
                        f"must be 'wheels' (built here and sent) or 'index' (hosts use their own package "
                        f"index), got {v!r}")
        installer = t.get("installer", str, "uv", check=lambda v: None if v in ("uv", "pip") else
                          f"must be 'uv' (sent with the wheels; pip when it fails) or 'pip', got {v!r}")
        t.unknown_keys()
        values = (name, repo, ref, subdir, celery_app, deploy_to, user, group, env_file, keep,
                  requirements, python, linked_dirs, linked_files, install, installer)
        if None in values:
            return None
        if PurePosixPath(env_file).is_relative_to(PurePosixPath(deploy_to) / "releases"):
            self.problems.add(t.where("env_file"), "must not live inside a release directory "
                              "(it would be lost on the next deploy)")
            return None
        if "://" not in repo and ":" not in repo.split("/")[0]:
            repo = str(self.local_path(repo))
        return App(name=name, repo=repo, ref=ref, path=subdir.strip("/"), celery_app=celery_app,
                   deploy_to=PurePosixPath(deploy_to), user=user, group=group,
                   env_file=PurePosixPath(env_file), keep_releases=keep, requirements=requirements,
                   python=PurePosixPath(python), linked_dirs=tuple(p.strip("/") for p in linked_dirs),
                   linked_files=tuple(linked_files), install=install, installer=installer)

    def workers(self, stage: str, own: dict[str, Any], shared: dict[str, Any],
                hosts: tuple[Host, ...] | None) -> tuple[WorkerService, ...] | None:
        base = "workers" if "workers" not in own else f"stages.{stage}.workers"
        raw = own.get("workers", shared.get("workers"))
        if raw is None:
            self.problems.add(f"stages.{stage}.workers", "no worker services. Fix: add at least one "
                              "[[workers]] with a name and its queues, see hosts.example.toml")
            return None
        if not isinstance(raw, list) or not raw:
            self.problems.add(base, "must be a non-empty list of [[workers]] tables")
            return None
        host_names = [h.name for h in hosts or ()]
        default_hosts = [h.name for h in hosts or () if "worker" in h.roles]
        services: list[WorkerService] = []
        seen: set[str] = set()
        for index, item in enumerate(raw):
            t = _Table(item, f"{base}[{index}]", self.problems)
            name = t.get("name", str, check=_name_check("worker service name"), hint='"default"')
            queues = t.get("queues", list, ["celery"], check=_string_list("queue", _QUEUE))
            concurrency = t.get("concurrency", int, 2, check=_positive)
            time_limit = t.get("time_limit", int, 300, check=_positive)
            loglevel = t.get("loglevel", str, "INFO", check=_loglevel)
            on = t.get("hosts", list, default_hosts, check=_string_list("host"))
            handover = t.get("handover", bool, True)
            mingle = t.get("mingle", bool, True)
            gossip = t.get("gossip", bool, True)
            t.unknown_keys()
            if name is not None:
                if name in seen:
                    self.problems.add(f"{base}[{index}].name", f"worker service {name!r} is defined "
                                      "twice; each service needs its own name (it names its unit)")
                    name = None
                seen.add(name or "")
            if on is not None and hosts is not None:
                for host in on:
                    if host not in host_names:
                        self.problems.add(t.where("hosts"), _unknown("host", host, host_names,
                                                                    f"stage {stage!r}"))
                        on = None
                        break
                else:
                    if not on:
                        self.problems.add(f"{base}[{index}]", "runs on no host: no host of stage "
                                          f"{stage!r} has the 'worker' role. Fix: give a host "
                                          "roles = [\"worker\"] or list hosts = [...] here")
                        on = None
            if None in (name, queues, concurrency, time_limit, loglevel, on, handover, mingle, gossip):
                continue
            services.append(WorkerService(name=name, queues=tuple(queues), hosts=tuple(on),
                                          concurrency=concurrency, time_limit=time_limit,
                                          loglevel=loglevel.upper(), handover=handover, mingle=mingle,
                                          gossip=gossip))
        return tuple(services) if len(services) == len(raw) else None

    def beat(self, stage: str, t: _Table | None, hosts: tuple[Host, ...] | None) -> Beat | None:
        if t is None:
            return None
        loglevel = t.get("loglevel", str, "INFO", check=_loglevel)
        t.unknown_keys()
        holders = [h.name for h in hosts or () if "beat" in h.roles]
        if len(holders) != 1 or loglevel is None:
            if t.data and hosts is not None and not holders:
                self.problems.add(t.path, "Beat settings are given but no host has the 'beat' role. "
                                  "Fix: add \"beat\" to the roles of exactly one host")
            return None
        return Beat(host=holders[0], loglevel=loglevel.upper())

    def verify(self, t: _Table | None) -> Verify | None:
        if t is None:
            return None
        task = t.get("task", str, "celery.accumulate", check=_module)
        timeout = t.get("timeout", (int, float), 60.0, check=_positive)
        watch = t.get("watch", (int, float), 3.0, check=_positive)
        t.unknown_keys()
        if None in (task, timeout, watch):
            return None
        return Verify(task=task, timeout=float(timeout), watch=float(watch))

    def systemd(self, t: _Table | None) -> SystemdSettings | None:
        if t is None:
            return None
        nofile = t.get("limit_nofile", int, 65536, check=_at_least(1024, "Celery needs file "
                                                                   "descriptors for its pool"))
        margin = t.get("stop_margin", int, 30, check=_positive)
        broker_unit = t.get("broker_unit", str, None,
                            check=lambda v: None if re.match(r"^[\w@.:-]+\.service\Z", v)
                            else f"must be a unit name such as 'redis-server.service', got {v!r}")
        t.unknown_keys()
        if nofile is None or margin is None:
            return None
        return SystemdSettings(limit_nofile=nofile, stop_margin=margin, broker_unit=broker_unit)

