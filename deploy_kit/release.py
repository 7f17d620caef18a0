"""Releases: named once on the control machine, packed once, built on every host in one round trip.

A release is the chosen ref of the app's git repository (`git archive`, never a working
tree) plus its own virtualenv, built on the host from wheels sent with it (hosts need no
package index). When the requirements are unchanged from the current release, the host
reuses that release's environment (hard links), so the step costs next to nothing.

On the host (deploy_to):
    releases/NAME/              the code, REVISION, .venv/ (root:GROUP, group-readable)
    releases/.NAME.building/    a release being built; renamed to NAME only when complete
    .deploy-kit/wheels/         wheels already sent, so the next deploy sends only new ones
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import posixpath
import re
import shlex
import socket
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from deploy_kit import remote as remote_programs
from deploy_kit import units, wheels
from deploy_kit.config import App, Stage
from deploy_kit.errors import HostError, ReleaseError, RemoteCommandError, UsageError
from deploy_kit.remote.contracts import STATE_DIR, BuildOutcome, BuildStatus
from deploy_kit.ssh import RemoteHost

NAME_FORMAT = "%Y-%m-%d-%H%M%S"
_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}-\d{6}\Z", re.ASCII)
q = shlex.quote


def release_name(now: datetime) -> str:
    """Sortable by name, the same on every host: computed once, in UTC."""
    return now.astimezone(UTC).strftime(NAME_FORMAT)


def is_release_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclass(frozen=True)
class Source:
    """What one deploy ships: the same bytes to every host."""

    name: str
    sha: str
    ref: str
    archive: bytes  # tar.gz of the app directory at `sha`
    requirements: str  # flattened: nested `-r` files inlined, `-c` files renamed constraints-N.txt
    revision: dict[str, str]
    constraints: dict[str, str] = field(default_factory=dict)

    @property
    def env_key(self) -> str:
        return env_key(self.requirements, self.constraints)

    def requirement_files(self) -> dict[str, str]:
        return {"requirements.txt": self.requirements, **self.constraints}


def env_key(requirements: str, constraints: dict[str, str] | None = None) -> str:
    """Identifies the virtualenv a release needs: same requirements, same environment."""
    text = requirements + "".join(f"\n--{name}--\n{body}" for name, body in sorted((constraints or {}).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_INCLUDE = re.compile(r"^\s*(-r|--requirement|-c|--constraint)(?:\s+|=)(\S+)\s*$")


def flatten_requirements(path: str, read: Callable[[str], str]) -> tuple[str, dict[str, str]]:
    """The requirements file at `path` with nested `-r` files inlined and `-c` files collected
    (as constraints-N.txt), so it installs from one directory. `read(path)` reads a repo file."""
    constraints: dict[str, str] = {}

    def expand(current: str, seen: tuple[str, ...]) -> list[str]:
        if current in seen:
            raise UsageError(f"{current} includes itself through -r")
        lines = []
        for line in read(current).splitlines():
            match = _INCLUDE.match(line)
            if not match:
                lines.append(line)
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(current), match.group(2)))
            if match.group(1) in ("-r", "--requirement"):
                lines += expand(target, (*seen, current))
            else:
                name = f"constraints-{len(constraints) + 1}.txt"
                constraints[name] = "\n".join(expand(target, (*seen, current))) + "\n"
                lines.append(f"-c {name}")
        return lines

    return "\n".join(expand(path, ())) + "\n", constraints


_MIGRATION = re.compile(r"(?:^|/)([^/]+)/migrations/(\d{4}[^/]*)\.py$")


def migrations(files: Iterable[str]) -> list[str]:
    """Django migrations in a file listing, as "app.0001_initial" (to warn before a rollback)."""
    return sorted(f"{m.group(1)}.{m.group(2)}" for m in map(_MIGRATION.search, files) if m)


def _run_git(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", *argv], capture_output=True)
    except FileNotFoundError:
        raise ReleaseError("git is not installed on this machine: deploy-kit packs releases with `git "
                           "archive`. Fix: install git") from None


def _git(repo: str, *args: str, binary: bool = False) -> bytes:
    proc = _run_git(["-C", repo, *args])
    if proc.returncode != 0:
        raise ReleaseError(f"git {' '.join(args)} failed in {repo}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def local_repository(app: App, cache_dir: Path) -> str:
    """A local git directory holding the app's history: the repo itself when it is local,
    otherwise a bare mirror kept up to date in `cache_dir`."""
    if Path(app.repo).is_dir():
        return app.repo
    mirror = cache_dir / "repos" / (hashlib.sha256(app.repo.encode()).hexdigest()[:16] + ".git")
    if mirror.is_dir():
        _git(str(mirror), "remote", "update", "--prune")
    else:
        mirror.parent.mkdir(parents=True, exist_ok=True)
        proc = _run_git(["clone", "--quiet", "--mirror", app.repo, str(mirror)])
        if proc.returncode != 0:
            raise ReleaseError(f"cannot clone {app.repo}: {proc.stderr.decode(errors='replace').strip()}")
    return str(mirror)


def read_source(app: App, ref: str, now: datetime, cache_dir: Path) -> Source:
    """Resolve `ref`, pack the app directory with `git archive`, read its requirements."""
    repo = local_repository(app, cache_dir)
    try:
        sha = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip()
    except ReleaseError:
        raise UsageError(f"ref {ref!r} does not exist in {app.repo}") from None
    tree = f"{sha}:{app.path}" if app.path else sha
    requirements_path = f"{app.path}/{app.requirements}" if app.path else app.requirements
    def read(path: str) -> str:
        try:
            return _git(repo, "show", f"{sha}:{path}").decode()
        except ReleaseError:
            raise UsageError(f"{path} does not exist at {ref} ({sha[:10]}) in {app.repo}; "
                             "set app.requirements (and app.path) in hosts.toml") from None

    requirements, constraints = flatten_requirements(requirements_path, read)
    archive = _git(repo, "archive", "--format=tar.gz", tree, binary=True)
    files = _git(repo, "ls-tree", "-r", "--name-only", tree).decode().splitlines()
    name = release_name(now)
    revision = {"release": name, "sha": sha, "ref": ref, "who": getpass.getuser(),
                "from": socket.gethostname(), "when": now.astimezone(UTC).isoformat(timespec="seconds"),
                "env_key": env_key(requirements, constraints), "migrations": migrations(files)}
    return Source(name=name, sha=sha, ref=ref, archive=archive, requirements=requirements, revision=revision,
                  constraints=constraints)


def bundle(source: Source, wheel_files: Iterable[Path], program: str) -> bytes:
    """One tar stream with the code, the wheels the host lacks, and the build program."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("code.tar.gz", source.archive)
        add("REVISION", (json.dumps(source.revision, indent=2) + "\n").encode())
        for name, text in source.requirement_files().items():
            add(name, text.encode())
        add("build.py", program.encode())
        for wheel in wheel_files:
            add(f"wheels/{wheel.name}", wheel.read_bytes())
    return out.getvalue()


def host_env_key(source: Source, python_version: str) -> str:
    """The environment a release needs on a host: its requirements and the host's Python."""
    return f"{source.env_key}-py{python_version}"


def build_params(stage: Stage, source: Source, wheels_sent: bool = True, python_version: str = "",
                 allow_reuse: bool = True, queues: tuple[str, ...] = (), installer: str = "") -> dict[str, object]:
    """What the build program (`remote/build.py`) needs to build releases/NAME on a host."""
    app = stage.app
    return {
        "name": source.name, "releases_dir": str(app.releases_dir), "current": str(app.current_link),
        "cache": str(state_dir(app) / "wheels"), "install": app.install, "venv": VENV,
        "python": str(app.python), "env_key": host_env_key(source, python_version),
        "allow_reuse": allow_reuse, "wheels_sent": wheels_sent,
        "user": app.user, "group": app.group, "shared_dir": str(app.shared_dir),
        "linked_dirs": list(app.linked_dirs), "linked_files": list(app.linked_files),
        "celery_app": app.celery_app, "service_environment": list(units.service_environment(stage)),
        "queues": list(queues), "installer": installer,  # uv's wheel in the cache, or "" (pip)
    }


VENV = units.VENV


def state_dir(app: App) -> PurePosixPath:
    return app.deploy_to / STATE_DIR


@dataclass(frozen=True)
class Built:
    host: str
    name: str
    reused_env: bool
    wheels_sent: int
    bytes_sent: int
    unregistered: dict[str, int] | None = None  # queued task names it lacks (the host that was asked)
    queued_error: str = ""


def read_outcome(stdout: str) -> BuildOutcome:
    """The build's last line on stdout; a build that died before writing it failed."""
    lines = stdout.strip().splitlines()
    try:
        return BuildOutcome.from_json(lines[-1]) if lines else BuildOutcome(BuildStatus.FAILED)
    except (ValueError, KeyError, TypeError):
        return BuildOutcome(BuildStatus.FAILED)


def build_on(remote: RemoteHost, stage: Stage, source: Source, wheelhouse: wheels.Wheelhouse,
             host_wheels: set[str], *, send_wheels: bool = True, python_version: str = "",
             queues: tuple[str, ...] = (), timeout: float = 900, planned: tuple[str, ...] | None = None) -> Built:
    """Send the bundle and build the release on one host in one round trip. Another one only when
    the host cannot reuse the environment it was expected to, when its pip finds a distribution
    this machine's resolver could not know the host needs, or when the release fails its check
    in a reused environment (then it is built afresh once). `planned`: the wheels the plan said
    this host gets (`--plan` printed them): the first attempt sends those, no other."""
    extra: list[str] = []
    sent = sent_bytes = 0  # over every attempt
    allow_reuse = True
    for attempt in range(6):
        files = [w for w in wheelhouse.files(extra) if w.name not in host_wheels] if send_wheels else []
        if attempt == 0 and planned is not None:
            files = [w for w in files if w.name in planned]
        uv = wheelhouse.installer_wheel() if send_wheels else None
        params = build_params(stage, source, wheels_sent=send_wheels, python_version=python_version,
                              allow_reuse=allow_reuse, queues=queues, installer=uv.name if uv else "")
        payload = bundle(source, files, remote_programs.program("build", params))
        command = ("sudo -n -- /bin/bash -c " + q(
            'set -euo pipefail; d=$(mktemp -d); trap \'rm -rf "$d"\' EXIT; '
            f'tar -x -C "$d"; {q(str(stage.app.python))} "$d/build.py" "$d"'))
        result = remote.run(command, payload, sudo=True, what=f"building release {source.name}",
                            timeout=timeout, check=False)
        outcome, sent, sent_bytes = read_outcome(result.stdout), sent + len(files), sent_bytes + len(payload)
        if outcome.status == BuildStatus.BUILT:
            return Built(remote.name, source.name, outcome.reused_env, sent, sent_bytes,
                         outcome.unregistered, outcome.queued_error)
        if outcome.status == BuildStatus.NEEDS_WHEELS and not send_wheels:
            send_wheels = True
        elif outcome.status == BuildStatus.MISSING_DISTRIBUTION and outcome.missing and wheelhouse.hashed:
            raise HostError(remote.name, f"pip there wants {outcome.missing}, which the requirements file does not "
                            "list, and its hashes make pip want a hash for every requirement (nothing was "
                            f"switched). Fix: regenerate it for the hosts' Python {python_version or 'version'} (e.g. "
                            "`pip-compile --generate-hashes` run with that Python), or add the requirement with its "
                            "hash, then deploy again")
        elif outcome.status == BuildStatus.MISSING_DISTRIBUTION and outcome.missing:
            extra.append(outcome.missing)
            host_wheels |= {w.name for w in files}
        elif outcome.status == BuildStatus.CHECK_FAILED and allow_reuse and outcome.reused_env:
            allow_reuse, send_wheels = False, stage.app.install == "wheels"  # maybe the reused env is stale
        elif outcome.status == BuildStatus.CHECK_FAILED:
            raise HostError(remote.name, "the new release fails its check (nothing was switched):\n"
                            + "\n".join("    " + line for line in result.stderr.strip().splitlines()[-25:]))
        elif outcome.status == BuildStatus.NO_SPACE:
            raise HostError(remote.name, f"{outcome.detail}; nothing was switched. Fix: free space there "
                            "(`fab releases` lists the releases kept; lower keep_releases), then deploy again")
        elif outcome.status == BuildStatus.EXISTS:
            raise HostError(remote.name, f"release {source.name} already exists on this host")
        else:
            raise RemoteCommandError(remote.name, f"building release {source.name}", result.exit_code,
                                     result.stderr or result.stdout)
    raise HostError(remote.name, f"pip on the host still misses distributions after adding {extra}")
