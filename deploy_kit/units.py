"""The systemd units of an app, rendered from the configuration (pure: same config, same bytes).

One template unit per worker service (`APP-worker-NAME@.service`) whose instances are
releases: `APP-worker-NAME@2026-11-24-120000.service` runs that release's code from its own
directory, whatever `current` says, so a deploy starts the new release's worker beside the
old one and hands the queues over (`remote/cutover.py`). One plain unit for Beat on its single
host, through `current`. They follow the Celery and systemd documentation, plus the hardening
that rates them "OK" in `systemd-analyze security`:

- Type=simple with the worker in the foreground, from the release's own virtualenv.
- An instance consumes its service's queues plus a private queue of its own; while it
  proves itself during a handover, a file in /run narrows that to the private queue only
  (gone at reboot, so an instance that boots consumes its real queues).
- KillMode=mixed: only the main process gets SIGTERM and does a warm shutdown,
  so prefork children finish their tasks instead of dying with WorkerLostError.
- TimeoutStopSec = the service's task time limit + a margin, so systemd never
  kills a worker that is still finishing a task.
- The interpreter is started as `python -m celery`, not the `celery` script, so a
  copied virtualenv (reused between releases) works without fixing shebangs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

from deploy_kit.config import App, Host, Stage, WorkerService
from deploy_kit.remote import hostlib
from deploy_kit.remote.contracts import HANDOVER_OPTIONS

UNIT_DIR = PurePosixPath("/etc/systemd/system")
MANAGED_MARKER = "# Managed by deploy-kit"
VENV = ".venv"

# Sandboxing shared by every unit. Each line is documented in systemd.exec(5); together they
# rate about 1.1 "OK" in `systemd-analyze security` (measured on systemd 252).
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "PrivateUsers=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "ProcSubset=pid",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "RemoveIPC=yes",
    "KeyringMode=private",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
    "UMask=0027",
)


@dataclass(frozen=True)
class Unit:
    name: str
    content: str
    # The [Service] settings that shape the process's environment, reused by `fab check`
    # to run its probes exactly as the service would run.
    environment: tuple[str, ...]

    @property
    def path(self) -> PurePosixPath:
        return UNIT_DIR / self.name


def python(app: App) -> PurePosixPath:
    """The interpreter of the current release's virtualenv."""
    return app.current_link / VENV / "bin" / "python"


RUN_DIR = PurePosixPath("/run/deploy-kit")


def private_queue(stage: Stage, worker: WorkerService, release: str = "%i", hostname: str = "%H") -> str:
    """A queue only one worker instance consumes (unique to app, stage, service, release and host):
    a deploy sends its verification task there, so the answer proves that this very worker runs."""
    return f"deploy-kit.{stage.app.name}.{stage.name}.{worker.name}.{release}@{hostname}"


def node_name(worker: WorkerService, release: str = "%i", hostname: str = "%%h") -> str:
    """Celery's node name of an instance: readable, and unique while two releases run side by side."""
    return f"{worker.name}.{release}@{hostname}"


def handover_file(app: App, worker: WorkerService, release: str = "%i") -> PurePosixPath:
    """While it exists, the instance consumes its private queue only (see the module's docstring)."""
    return RUN_DIR / app.name / f"{worker.name}@{release}.env"


def beat_schedule(app: App) -> PurePosixPath:
    return PurePosixPath("/var/lib") / app.name / "celerybeat-schedule"


def stop_timeout(stage: Stage, worker: WorkerService) -> int:
    return worker.time_limit + stage.systemd.stop_margin


def service_environment(stage: Stage) -> tuple[str, ...]:
    """User, paths and sandboxing: what a process of the app's services runs under."""
    app = stage.app
    return (
        f"User={app.user}",
        f"Group={app.group}",
        f"WorkingDirectory={app.current_link}",
        f"EnvironmentFile={app.env_file}",
        "Environment=PYTHONUNBUFFERED=1",
        f"ReadWritePaths={app.shared_dir}",
        f"StateDirectory={app.name}",
        "StateDirectoryMode=0750",
        f"LimitNOFILE={stage.systemd.limit_nofile}",
        *HARDENING,
    )


def as_service_command(stage: Stage, directory: str, argv: list[str]) -> str:
    """A shell command running `argv` as the services run: their user, env file and sandbox, in
    `directory` (a release not yet live has its own). The same systemd-run the host programs use."""
    return shlex.join(hostlib.service_argv(list(service_environment(stage)), directory, argv))


def _render(stage: Stage, description: str, identifier: str, exec_start: str, stop_timeout: int,
            directory: PurePosixPath | None = None, extra: tuple[str, ...] = ()) -> str:
    app = stage.app
    directory = directory or app.current_link
    environment = [f"WorkingDirectory={directory}" if p.startswith("WorkingDirectory=") else p
                   for p in service_environment(stage)]
    dependencies = ["network-online.target"]
    if stage.systemd.broker_unit:
        dependencies.append(stage.systemd.broker_unit)
    lines = [
        f"{MANAGED_MARKER} from hosts.toml (stage {stage.name!r}); `fab setup` replaces it,",
        "# `fab check` reports local changes. Edit hosts.toml instead.",
        "[Unit]",
        f"Description={description}",
        "Documentation=https://docs.celeryq.dev/en/stable/userguide/daemonizing.html",
        f"Wants={' '.join(dependencies)}",
        f"After={' '.join(dependencies)}",
        f"ConditionPathExists={directory}",
        "",
        "[Service]",
        "Type=simple",
        *environment,
        *extra,
        f"ExecStart={exec_start}",
        "Restart=on-failure",
        "RestartSec=5",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={stop_timeout}",
        f"SyslogIdentifier={identifier}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def worker_unit(stage: Stage, worker: WorkerService) -> Unit:
    """The template unit of a worker service; `%i`, the instance, is a release name."""
    app = stage.app
    directory = app.releases_dir / "%i"
    queues = ",".join([*worker.queues, private_queue(stage, worker)])
    skip = "".join(f" --without-{name}" for name, on in (("mingle", worker.mingle), ("gossip", worker.gossip))
                   if not on)
    exec_start = (f"{directory / VENV / 'bin/python'} -m celery -A {app.celery_app} worker -n {node_name(worker)} "
                  "-Q ${DEPLOY_KIT_QUEUES} "
                  f"-c {worker.concurrency} --time-limit={worker.time_limit} --loglevel={worker.loglevel}{skip} "
                  f"${HANDOVER_OPTIONS}")  # empty but in a handover: no argument
    description = f"{app.name} Celery worker {worker.name!r}, release %i (queues: {', '.join(worker.queues)})"
    content = _render(stage, description, f"{app.name}-worker-{worker.name}", exec_start,
                      stop_timeout(stage, worker), directory,
                      (f"Environment=DEPLOY_KIT_QUEUES={queues}", f"Environment={HANDOVER_OPTIONS}=",
                       f"EnvironmentFile=-{handover_file(app, worker)}"))
    return Unit(worker.unit(app), content, service_environment(stage))


def beat_unit(stage: Stage) -> Unit:
    app = stage.app
    assert stage.beat is not None
    name = stage.beat.unit(app)
    exec_start = (f"{python(app)} -m celery -A {app.celery_app} beat -s {beat_schedule(app)} "
                  f"--loglevel={stage.beat.loglevel}")
    content = _render(stage, f"{app.name} Celery Beat", name.removesuffix(".service"), exec_start,
                      stage.systemd.stop_margin)
    return Unit(name, content, service_environment(stage))


def units_for(stage: Stage, host: Host) -> dict[str, Unit]:
    """Every unit `host` runs, by unit name, in restart order (workers, then Beat)."""
    units = {w.unit(stage.app): worker_unit(stage, w) for w in stage.workers_on(host)}
    if stage.beat and stage.beat.host == host.name:
        unit = beat_unit(stage)
        units[unit.name] = unit
    return units


def managed_pattern(app: App) -> tuple[str, str]:
    """Glob patterns of unit names this app's units can have, to find ones no longer wanted."""
    return (f"{app.name}-worker-*.service", f"{app.name}-beat.service")
