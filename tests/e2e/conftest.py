"""End-to-end fixtures: real sandbox hosts (systemd-nspawn, sshd, systemd, journald, redis).

The sandbox used here is called "dktest", so a developer's own "sandbox" keeps
running while the suite runs. Every sandbox a test boots is torn down afterwards,
whatever happened.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_kit import config
from deploy_kit.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
TEST_SANDBOX = "dktest"


def _can_boot() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in ("systemd-nspawn", "debootstrap", "ip", "ssh-keygen") if not shutil.which(t)]
    return f"missing {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session", autouse=True)
def _sandbox_machine():
    reason = _can_boot()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"end-to-end tests cannot run on CI: {reason}")
        pytest.skip(f"end-to-end tests {reason} (run as root after ./scripts/bootstrap)")


def say(message: str) -> None:
    print(f"[sandbox] {message}")


@pytest.fixture(scope="session")
def sandbox_config(tmp_path_factory):
    """A two-host sandbox and the configuration file holding its stage."""
    path = tmp_path_factory.mktemp("config") / "hosts.toml"
    box = Sandbox(TEST_SANDBOX)
    try:
        box.up(2, path, say, repo_root=ROOT)
        yield path
    finally:
        box.down(say)


@pytest.fixture(scope="session")
def stage(sandbox_config):
    return config.load(sandbox_config).stage(TEST_SANDBOX)


def fab(*args: str, config_file: Path | None = None, check: bool = False,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the `fab` command line as a user would, from the repository root."""
    env = dict(os.environ, COLUMNS="200")
    if config_file is not None:
        env["DEPLOY_KIT_CONFIG"] = str(config_file)
    proc = subprocess.run([str(FAB), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
