"""Load and validate hosts.toml into plain, immutable objects (Config, Stage, Host, ...).

Everything is checked at load time; every problem is reported with the file, the
key path, what was expected and how to fix it, all problems at once. Secrets are
never accepted here: they live in the env file on each host.

Tables at the top level (`ssh`, `app`, `workers`, `beat`, `verify`, `systemd`)
are defaults shared by every stage; a stage's own tables override them key by
key (`workers` is a list and is replaced whole).

This module holds the objects and `load`; `config_loader.py` reads the tables and
`config_checks.py` holds the rules each value must follow.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from deploy_kit.errors import ConfigError, UsageError

CONFIG_ENV_VAR = "DEPLOY_KIT_CONFIG"
DEFAULT_CONFIG = "hosts.toml"

ROLES = ("worker", "beat", "migrate")
SHARED_TABLES = ("ssh", "app", "workers", "beat", "verify", "systemd")

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
    installer: str = "uv"  # with install = "wheels": "uv" (sent as a wheel, pip if it fails) or "pip"

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
            f"{file}: no such file ({source} location). Fix: run `deploy-kit init` in your Django "
            "project (it writes a documented hosts.toml; hosts.example.toml shows every key), point "
            f"{CONFIG_ENV_VAR} at your file, or run `fab sandbox.up` to get a sandbox stage"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        line = file.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}: line {line} is not UTF-8 (byte 0x{exc.object[exc.start]:02x}). Fix: save "
                          "the file as UTF-8") from None
    return parse(text, file)


def parse(text: str, file: Path) -> Config:
    """Validate the TOML text of `file` (the path only appears in messages and anchors paths)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits; arrays nested thousands deep
        raise ConfigError(f"{file}: not valid TOML for deploy-kit: it holds an integer too long or "
                          "values nested too deep to read") from None
    from deploy_kit.config_loader import Loader  # it builds the objects defined here

    return Loader(file).config(data)


def _unknown(kind: str, name: str, known: list[str], where: str) -> str:
    message = f"{where}: no {kind} named {name!r}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean {close[0]!r}?"
    if known:
        message += f" ({kind}s: {', '.join(known)})"
    return message
