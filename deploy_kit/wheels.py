"""Wheels for a host's Python, fetched on the control machine (hosts need no package index).

`pip download` runs here with the host's Python version, ABI and platform, into a cache
keyed by requirements and target, so an unchanged deploy downloads nothing. pip evaluates the
environment markers with this machine's Python, so what only the host's needs (redis wants
async-timeout before Python 3.11.3; Debian 12 has 3.11.2) is added: the requirements' lines and
the fetched wheels' metadata are read again with the host's markers (`needed_on`).
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy_kit.errors import WheelError


@dataclass(frozen=True)
class Target:
    python: str  # "3.11.2"
    machine: str  # "x86_64"
    glibc: str  # "2.36"

    @classmethod
    def from_facts(cls, facts: dict[str, str]) -> Target:
        return cls(facts.get("python", ""), facts.get("machine", ""), facts.get("glibc", ""))

    @property
    def key(self) -> str:
        return f"cp{self.python.replace('.', '_')}-{self.machine}-glibc{self.glibc}"

    def pip_args(self) -> list[str]:
        major, minor = self.python.split(".")[:2]
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp",
                "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
        if self.glibc:  # pip takes only the platforms named: each glibc this one runs wheels of
            glibc_major, glibc_minor = (int(n) for n in self.glibc.split(".")[:2])
            for minor in range(glibc_minor if glibc_major == 2 else 40, 4, -1):
                args += ["--platform", f"manylinux_2_{minor}_{self.machine}"]
                legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
                args += ["--platform", f"{legacy}_{self.machine}"] if legacy else []
        args += ["--platform", f"linux_{self.machine}", "--platform", "any"]
        return args

    def markers(self) -> dict[str, str]:
        """The environment markers of a CPython `python` on Linux `machine`."""
        major, minor = self.python.split(".")[:2]
        return {**default_environment(), "python_version": f"{major}.{minor}", "python_full_version": self.python,
                "implementation_name": "cpython", "implementation_version": self.python,
                "platform_python_implementation": "CPython", "platform_machine": self.machine,
                "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix"}


def requirement_lines(requirements: str) -> list[tuple[str, str]]:
    """(requirement, its options such as `--hash=...`) of each requirement of a requirements
    file's text: continuations joined, comments, option lines and URLs left out."""
    found = []
    for line in re.sub(r"\\\n", " ", requirements).splitlines():
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if line and not line.startswith("-") and "://" not in line:
            requirement, _, options = line.partition(" --")
            found.append((requirement.strip(), " ".join(f"--{options}".split()) if options else ""))
    return found


def needed_on(target: Target, directory: Path, requirements: str = "", here: dict[str, str] | None = None) -> list[str]:
    """The requirements (of `requirements`' lines, and of the wheels in `directory`) that the
    target's markers select and this machine's (`here`) did not, and that no wheel there provides,
    as requirements file lines. With hashes (pip then wants a hash for each) only the file's own
    lines, their hashes kept. One behind an extra is left out: the host's build asks for it."""
    have = {canonicalize_name(w.name.split("-", 1)[0]) for w in directory.glob("*.whl")}
    lines = requirement_lines(requirements)
    hashed = any("--hash" in options for _, options in lines)
    for wheel in [] if hashed else sorted(directory.glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as archive:
                name = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
                metadata = HeaderParser().parsestr(archive.read(name).decode("utf-8", "replace"))
        except (OSError, StopIteration, zipfile.BadZipFile):
            continue
        lines += [(r, "") for r in metadata.get_all("Requires-Dist") or []]
    env, here, missing = target.markers(), default_environment() if here is None else here, []
    for line, options in lines:
        try:
            req = Requirement(line)
            if req.marker is None or "extra" in str(req.marker) or canonicalize_name(req.name) in have:
                continue
            wanted = req.marker.evaluate(env) and not req.marker.evaluate(here)
        except Exception:  # noqa: BLE001 - InvalidRequirement, or a marker an older packaging cannot compare
            continue
        if wanted:
            req.marker = None
            missing.append(f"{req} {options}".strip())
    return sorted(set(missing))


COMPLETE = "with the host's markers\n"  # a cache directory's `.complete`: nothing more to fetch


# The installer sent with the wheels (app.installer = "uv"): one static binary, and the pip and
# setuptools it puts in each new virtualenv, as `python -m venv` would.
UV = "uv==0.13.9\npip\nsetuptools"


class Wheelhouse:
    """The wheels one requirements file needs on one kind of host, and with `installer` (the
    requirements UV) the installer's wheels (none when it has no wheel for the host: pip then)."""

    def __init__(self, requirements: str, target: Target, cache_dir: Path,
                 constraints: dict[str, str] | None = None, installer: str = ""):
        self.requirements = requirements
        self.constraints = dict(constraints or {})
        self.target = target
        self.cache_dir = cache_dir
        self.installer = installer
        self._installer: list[Path] | None = None

    @property
    def hashed(self) -> bool:
        """The requirements carry hashes: pip then wants one for every requirement it installs."""
        return any("--hash" in options for _, options in requirement_lines(self.requirements))

    def installer_wheels(self) -> list[Path]:
        """uv's wheel and the seeds' (fetched once); none when uv has no wheel for the host."""
        if self._installer is None:
            try:
                self._installer = Wheelhouse(self.installer, self.target, self.cache_dir)._wheels([]) \
                    if self.installer else []
            except WheelError:  # e.g. a platform it has no wheel for: the host's pip installs
                self._installer = []
        return self._installer

    def installer_wheel(self) -> Path | None:
        """uv's own wheel, when there is one for the host."""
        return next((w for w in self.installer_wheels() if w.name.startswith("uv-")), None)

    def files(self, extra: list[str] | None = None) -> list[Path]:
        """The app's wheels (with `extra` requirements), then the installer's."""
        return [*self._wheels(extra), *(self.installer_wheels() if self.installer_wheel() else [])]

    def _wheels(self, extra: list[str] | None) -> list[Path]:
        extra = list(extra or [])
        parts = [self.requirements, *extra, *(f"{k}\n{v}" for k, v in sorted(self.constraints.items()))]
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        directory = self.cache_dir / "wheels" / self.target.key / digest
        done = directory / ".complete"
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two deploys at once: one downloads, the other waits for it
            if not done.exists() or done.read_text() != COMPLETE:  # (or made before the host's markers counted)
                self._download(directory, extra)
                done.write_text(COMPLETE)
        return sorted(directory.glob("*.whl"))

    def _download(self, directory: Path, extra: list[str]) -> None:
        for name, text in self.constraints.items():
            (directory / name).write_text(text)
        for _ in range(5):  # each round may bring wheels whose own requirements the host's markers select
            self._pip_download(directory, extra)
            more = [r for r in needed_on(self.target, directory, self.requirements) if r not in extra]
            if not more:
                return
            extra = [*extra, *more]

    def _pip_download(self, directory: Path, extra: list[str]) -> None:
        requirements = directory / "requirements.txt"
        requirements.write_text(self.requirements + "".join(f"\n{r}" for r in extra) + "\n")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--dest", str(directory), *self.target.pip_args(), "-r", str(requirements)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(line for line in proc.stderr.splitlines()
                             if not line.startswith("WARNING: Location"))[-1500:]
            raise WheelError(f"could not fetch wheels for Python {self.target.python} on "
                             f"{self.target.machine}:\n{tail}\nFix: make sure every requirement has a "
                             "wheel on your package index (pure-Python sdists: build and publish a wheel)")
