"""Load and validate hosts.toml into plain, immutable objects (Config, Stage, Host, ...).

Everything is checked at load time; every problem is reported with the file, the
key path, what was expected and how to fix it, all problems at once. Secrets are
never accepted here: they live in the env file on each host.

Tables at the top level (`ssh`, `app`, `workers`, `beat`, `verify`, `systemd`)
are defaults shared by every stage; a stage's own tables override them key by
key (`workers` is a list and is replaced whole).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from deploy_kit.errors import ConfigError, UsageError

CONFIG_ENV_VAR = "DEPLOY_KIT_CONFIG"
DEFAULT_CONFIG = "hosts.toml"

ROLES = ("worker", "beat", "migrate")
SHARED_TABLES = ("ssh", "app", "workers", "beat", "verify", "systemd")

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
_POSIX_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$")
_QUEUE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SECRET_KEY = re.compile(r"(pass|secret|token|credential|broker_url|_url$|api_key|private)", re.I)
_URL_WITH_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]+@", re.I)


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    port: int = 22
    user: str = "deploy"
    roles: tuple[str, ...] = ("worker",)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.user}@{self.address}:{self.port})"


@dataclass(frozen=True)
class SSHSettings:
    known_hosts: Path
    identity_file: Path | None = None
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class App:
    name: str
    repo: str
    celery_app: str
    deploy_to: PurePosixPath
    user: str
    group: str
    env_file: PurePosixPath
    ref: str = "HEAD"
    path: str = ""
    keep_releases: int = 5
    requirements: str = "requirements.txt"
    python: PurePosixPath = PurePosixPath("/usr/bin/python3")
    linked_dirs: tuple[str, ...] = ()
    linked_files: tuple[str, ...] = ()
    install: str = "wheels"

    @property
    def releases_dir(self) -> PurePosixPath:
        return self.deploy_to / "releases"

    @property
    def shared_dir(self) -> PurePosixPath:
        return self.deploy_to / "shared"

    @property
    def current_link(self) -> PurePosixPath:
        return self.deploy_to / "current"


@dataclass(frozen=True)
class WorkerService:
    name: str
    queues: tuple[str, ...]
    hosts: tuple[str, ...]
    concurrency: int = 2
    time_limit: int = 300
    loglevel: str = "INFO"
    handover: bool = True  # False: restart in place (one worker at a time, the queue waits)
    mingle: bool = True  # False: skip the ~1 s start-up sync with other workers (revoked ids)
    gossip: bool = True  # False: do not follow other workers' events

    def unit(self, app: App) -> str:
        """The template unit; each release runs as its instance (`instance()`)."""
        return f"{app.name}-worker-{self.name}@.service"

    def instance(self, app: App, release: str) -> str:
        return f"{app.name}-worker-{self.name}@{release}.service"

    def legacy_unit(self, app: App) -> str:
        """The plain unit of deploy-kit before handovers: retired by the next deploy."""
        return f"{app.name}-worker-{self.name}.service"


@dataclass(frozen=True)
class Beat:
    host: str
    loglevel: str = "INFO"

    def unit(self, app: App) -> str:
        return f"{app.name}-beat.service"


@dataclass(frozen=True)
class Verify:
    task: str = "celery.accumulate"
    timeout: float = 60.0
    watch: float = 3.0  # seconds a new worker must run on the real queues before the old one drains


@dataclass(frozen=True)
class SystemdSettings:
    limit_nofile: int = 65536
    stop_margin: int = 30
    broker_unit: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    hosts: tuple[Host, ...]
    ssh: SSHSettings
    app: App
    workers: tuple[WorkerService, ...]
    beat: Beat | None
    verify: Verify = field(default_factory=Verify)
    systemd: SystemdSettings = field(default_factory=SystemdSettings)
    parallel: int = 10

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise UsageError(_unknown("host", name, [h.name for h in self.hosts], f"stage {self.name!r}"))

    @property
    def migrate_host(self) -> Host:
        for host in self.hosts:
            if "migrate" in host.roles:
                return host
        return self.hosts[0]

    def workers_on(self, host: Host) -> tuple[WorkerService, ...]:
        return tuple(w for w in self.workers if host.name in w.hosts)

    def units_on(self, host: Host) -> tuple[str, ...]:
        units = [w.unit(self.app) for w in self.workers_on(host)]
        if self.beat and self.beat.host == host.name:
            units.append(self.beat.unit(self.app))
        return tuple(units)


@dataclass(frozen=True)
class Config:
    path: Path
    stages: Mapping[str, Stage]
    default_stage: str | None = None

    def stage(self, name: str | None = None) -> Stage:
        """The stage called `name`, or the default one when `name` is None."""
        if name is None:
            if self.default_stage:
                name = self.default_stage
            elif len(self.stages) == 1:
                name = next(iter(self.stages))
            else:
                raise UsageError(
                    f"{self.path}: several stages ({', '.join(self.stages)}) and no default_stage; "
                    "pass --stage NAME or set default_stage at the top of the file"
                )
        if name not in self.stages:
            raise UsageError(_unknown("stage", name, list(self.stages), str(self.path)))
        return self.stages[name]


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the configuration lives: the argument, $DEPLOY_KIT_CONFIG, or ./hosts.toml."""
    raw = explicit or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG
    return Path(raw).expanduser().absolute()


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the configuration file; raise ConfigError naming every problem."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        source = f"${CONFIG_ENV_VAR}" if (path is None and os.environ.get(CONFIG_ENV_VAR)) else "default"
        raise ConfigError(
            f"{file}: no such file ({source} location). Fix: copy hosts.example.toml to hosts.toml "
            f"and edit it, point {CONFIG_ENV_VAR} at your file, or run `fab sandbox.up` "
            "to get a sandbox stage"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it: {exc.strerror}") from None
    return parse(text, file)


def parse(text: str, file: Path) -> Config:
    """Validate the TOML text of `file` (the path only appears in messages and anchors paths)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return _Loader(file).config(data)


class _Problems:
    def __init__(self, file: Path):
        self.file = file
        self.items: list[str] = []

    def add(self, key_path: str, message: str) -> None:
        self.items.append(f"{key_path}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise ConfigError(f"{self.file}: {self.items[0]}")
        listing = "\n".join(f"  - {item}" for item in self.items)
        raise ConfigError(f"{self.file}: {len(self.items)} problems:\n{listing}")


_MISSING = object()


class _Table:
    """One TOML table being read: hands out typed values and reports what is wrong with them."""

    def __init__(self, data: Any, path: str, problems: _Problems, origins: Mapping[str, str] | None = None):
        self.path = path
        self.problems = problems
        self.origins = dict(origins or {})
        self.seen: set[str] = set()
        if not isinstance(data, dict):
            problems.add(path, f"must be a table, got {_describe(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def where(self, key: str) -> str:
        base = self.origins.get(key, self.path)
        return f"{base}.{key}" if base else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *,
            check: Callable[[Any], str | None] | None = None, hint: str = "") -> Any:
        """The value at `key`; None (after reporting) when missing or wrong."""
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                fix = f" Fix: add {key} = {hint}" if hint else ""
                self.problems.add(self.where(key), f"required key is missing.{fix}")
                return None
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.problems.add(self.where(key), f"expected {expected}, got {_describe(value)}")
            return None
        if check is not None:
            message = check(value)
            if message:
                self.problems.add(self.where(key), message)
                return None
        return value

    def unknown_keys(self, allowed: tuple[str, ...] | None = None) -> None:
        known = set(allowed) if allowed is not None else self.seen
        for key in self.data:
            if key in known:
                continue
            message = "unknown key."
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            if close:
                message += f" Did you mean {close[0]!r}?"
            elif _SECRET_KEY.search(key):
                message += (" Secrets never go in hosts.toml: keep them in the env file on the hosts "
                            f"(`fab env.set {key.upper()}=...`).")
            else:
                message += f" Known keys here: {', '.join(sorted(known))}."
            self.problems.add(self.where(key), message)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _unknown(kind: str, name: str, known: list[str], where: str) -> str:
    message = f"{where}: no {kind} named {name!r}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if known:
        message += f" ({kind}s: {', '.join(known)})"
    return message


def _merge(defaults: Any, own: Any, default_path: str, own_path: str) -> tuple[Any, dict[str, str]]:
    """A stage's table merged over the shared one, with the key path each value came from."""
    if not isinstance(defaults, dict) or not isinstance(own, dict):
        chosen = own if own is not None else defaults
        return chosen, {}
    merged = dict(defaults)
    origins = {key: default_path for key in defaults}
    for key, value in own.items():
        merged[key] = value
        origins[key] = own_path
    return merged, origins


# --- value checks: each returns a message, or None when the value is fine --------------------------

def _name_check(what: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if _NAME.match(value):
            return None
        suggestion = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-_") or "myapp"
        if not suggestion[0].isalpha():
            suggestion = "x" + suggestion
        return (f"{what} {value!r} must start with a lowercase letter and hold only a-z, 0-9, '-' "
                f"and '_' (it names units and paths); for example {suggestion[:40]!r}")
    return check


_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")


def _absolute(value: str) -> str | None:
    path = PurePosixPath(value)
    if not path.is_absolute():
        return f"must be an absolute path, got {value!r}. Fix: write it as {'/' + value.lstrip('./')!r}"
    if path == PurePosixPath("/") or ".." in path.parts:
        return f"must be an absolute path of its own, not / and without '..', got {value!r}"
    if not _SAFE_PATH.match(value):
        # It ends up in unit files (where % and spaces mean something) and shell scripts.
        return (f"may hold only letters, digits and . _ / + - (it goes into systemd units and scripts), "
                f"got {value!r}")
    return None


def _service_account(what: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value == "root" or value == "0":
            return (f"the service {what} must not be root (a compromised task would own the host). "
                    "Fix: use a dedicated account such as the app's name")
        if not _POSIX_NAME.match(value):
            return (f"{value!r} is not a valid {what} name: use lowercase letters, digits, '-' and '_', "
                    "starting with a letter, at most 32 characters")
        return None
    return check


def _positive(value: int | float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _at_least(minimum: int, why: str) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if value >= minimum else f"must be at least {minimum} ({why}), got {value}"
    return check


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be a TCP port between 1 and 65535, got {value}"


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _module(value: str) -> str | None:
    if _MODULE.match(value):
        return None
    return f"must be a Python import path as given to `celery -A`, such as 'myproject', got {value!r}"


def _repo(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if _URL_WITH_PASSWORD.match(value):
        return ("holds a password or token; secrets never go in hosts.toml. Fix: use an SSH URL "
                "with a deploy key, or a git credential helper")
    return None


def _loglevel(value: str) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    return None if value.upper() in levels else f"must be one of {', '.join(levels)}, got {value!r}"


def _string_list(what: str, pattern: re.Pattern[str] | None = None) -> Callable[[list[Any]], str | None]:
    def check(value: list[Any]) -> str | None:
        if not value:
            return f"must list at least one {what}"
        for item in value:
            if not isinstance(item, str) or not item:
                return f"must be a list of {what} names (strings), got {_describe(item)} in it"
            if pattern is not None and not pattern.match(item):
                return f"{item!r} is not a valid {what} name (letters, digits, '.', '_', ':' and '-')"
        if len(set(value)) != len(value):
            return f"lists the same {what} twice"
        return None
    return check


class _Loader:
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
            address = t.get("address", str, check=_not_empty, hint='"203.0.113.10"')
            host_name = t.get("name", str, address or f"host{index + 1}",
                              check=lambda v: None if _HOST_NAME.match(v) else
                              f"must be a name of letters, digits, '.', '_' or '-', got {v!r}")
            port = t.get("port", int, 22, check=_port)
            user = t.get("user", str, "deploy", check=_not_empty)
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
        known_hosts = t.get("known_hosts", str, "~/.ssh/known_hosts", check=_not_empty)
        identity = t.get("identity_file", str, None, check=_not_empty)
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
        ref = t.get("ref", str, "HEAD", check=_not_empty)
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
        t.unknown_keys()
        values = (name, repo, ref, subdir, celery_app, deploy_to, user, group, env_file, keep,
                  requirements, python, linked_dirs, linked_files, install)
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
                   linked_files=tuple(linked_files), install=install)

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
                            check=lambda v: None if re.match(r"^[\w@.:-]+\.service$", v)
                            else f"must be a unit name such as 'redis-server.service', got {v!r}")
        t.unknown_keys()
        if nofile is None or margin is None:
            return None
        return SystemdSettings(limit_nofile=nofile, stop_margin=margin, broker_unit=broker_unit)


def _relative_paths(value: list[Any]) -> str | None:
    for item in value:
        if not isinstance(item, str) or not item.strip("/"):
            return f"must be a list of paths inside the release, got {_describe(item)} in it"
        if item.startswith("/") or ".." in PurePosixPath(item).parts:
            return f"{item!r} must be relative to the release (it is linked to the same path under shared/)"
    return None


def _roles(value: list[Any]) -> str | None:
    message = _string_list("role")(value)
    if message:
        return message
    for role in value:
        if role not in ROLES:
            close = difflib.get_close_matches(role, ROLES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown role {role!r}{hint} (roles: {', '.join(ROLES)})"
    return None
