"""End-to-end fixtures: real sandbox hosts (systemd-nspawn, sshd, systemd, journald, redis).

The sandbox used here is called "dktest", so a developer's own "sandbox" keeps
running while the suite runs. Every sandbox a test boots is torn down afterwards,
whatever happened.
"""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from celery import Celery

from deploy_kit import config, units
from deploy_kit.sandbox import Sandbox
from deploy_kit.ssh import connect

ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")
# One sandbox per pytest-xdist worker (gw0: "dktest", gw1: "dktestb", ...); each file runs on one.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
TEST_SANDBOX = "dktest" + ("" if _WORKER == 0 else chr(ord("a") + _WORKER))
H1, H2 = f"{TEST_SANDBOX}1", f"{TEST_SANDBOX}2"  # its two hosts


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


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="e2e", GIT_AUTHOR_EMAIL="e2e@example.invalid",
               GIT_COMMITTER_NAME="e2e", GIT_COMMITTER_EMAIL="e2e@example.invalid")
    return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit(repo: Path, changes: dict[str, str | None], message: str) -> str:
    """Change files of the example app (None deletes) and commit; returns the new sha."""
    for name, content in changes.items():
        path = repo / APP_DIR / name
        if content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


APP_DIR = "examples/exampleapp"


def make_app_repo(directory: Path) -> Path:
    """A git repository holding a copy of the example app, for tests to commit to."""
    shutil.copytree(ROOT / APP_DIR, directory / APP_DIR,
                    ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    git(directory, "init", "-q", "-b", "main")
    commit(directory, {}, "example app v1")
    return directory


def boot(name: str, hosts: int, directory: Path, broker: str = "redis") -> tuple[Sandbox, Path, Path]:
    repo = make_app_repo(directory / "repo")
    config_file = directory / "hosts.toml"
    box = Sandbox(name)
    box.up(hosts, config_file, say, repo_root=repo, broker=broker)
    return box, config_file, repo


def result_backend(broker_url: str) -> str:
    """Where a test's own Celery app reads results: the broker on Redis; RabbitMQ sends them back."""
    return "rpc://" if broker_url.startswith("amqp") else broker_url


def prepare_env(box: Sandbox, config_file: Path, stage: str) -> None:
    """What a user does after `fab setup`: put the broker URL and settings in the env file."""
    for assignment in ("DJANGO_SETTINGS_MODULE=exampleapp.settings", "DJANGO_SECRET_KEY=e2e-not-secret",
                       "DATABASE_URL=sqlite:////srv/exampleapp/shared/db.sqlite3"):
        fab("env.set", assignment, "--stage", stage, config_file=config_file, check=True)
    fab("env.set", "CELERY_BROKER_URL", "--stage", stage, config_file=config_file, check=True,
        stdin=box.broker_url() + "\n")


def on_host(stage, index: int, script: str, sudo: bool = True, check: bool = True) -> str:
    with connect(stage.hosts[index], stage.ssh) as remote:
        return remote.run_script(script, sudo=sudo, what="test script", check=check).stdout


def as_service(stage, index: int, code: str) -> str:
    """Python `code` run on the host as the service, in the current release: what it printed."""
    command = units.as_service_command(stage, str(stage.app.current_link),
                                       [str(units.python(stage.app)), "-c", code])
    return on_host(stage, index, command + "\n").strip()


def call_task(stage, index: int, task: str, args: list | None = None, timeout: int = 30,
              queue: str | None = None) -> str:
    """Send a task from the host, as the service would, and return its result's repr."""
    return as_service(stage, index, "import json, sys\nfrom exampleapp.celery import app\n"
                      f"print(repr(app.send_task({task!r}, args={args or []!r}, queue={queue!r})"
                      f".get(timeout={timeout})))\n")


def wait_for(predicate, timeout: float = 60, what: str = ""):
    """`predicate()`'s first true value, asked every 0.5 s; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def current_release(stage, index: int) -> str:
    return on_host(stage, index, f"readlink {stage.app.current_link} || true").strip().removeprefix("releases/")


@pytest.fixture(scope="session")
def sandbox_config(tmp_path_factory):
    """A two-host sandbox and the configuration file holding its stage (its app: a git repo
    with a copy of the example app that tests commit to)."""
    directory = tmp_path_factory.mktemp(TEST_SANDBOX)
    box = Sandbox(TEST_SANDBOX)
    try:
        box, config_file, _repo = boot(TEST_SANDBOX, 2, directory)
        yield config_file
    finally:
        box.down(say)


@pytest.fixture(scope="session")
def app_repo(sandbox_config):
    return sandbox_config.parent / "repo"


@pytest.fixture(scope="session")
def stage(sandbox_config):
    return config.load(sandbox_config).stage(TEST_SANDBOX)


def fab(*args: str, config_file: Path | None = None, check: bool = False, stdin: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the `fab` command line as a user would, from the repository root."""
    env = dict(os.environ, COLUMNS="200")
    if config_file is not None:
        env["DEPLOY_KIT_CONFIG"] = str(config_file)
    proc = subprocess.run([str(FAB), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin if stdin is not None else "")
    if check and proc.returncode != 0:
        raise AssertionError(f"fab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def in_container(machine_name: str, command: str) -> str:
    """Run a command inside a sandbox host without SSH (for tests that cut SSH off)."""
    from deploy_kit.sandbox.machine import _find_nspawn

    nspawn = _find_nspawn(machine_name)
    assert nspawn is not None, f"{machine_name} is not running"
    init = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()[0]
    proc = subprocess.run(["nsenter", "-t", init, "-m", "-u", "-i", "-n", "-p", "--", "/bin/sh", "-c", command],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"in {machine_name}: {command!r} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def deployed(sandbox_config):
    """The test sandbox with the example app set up and deployed (deploys only when needed)."""
    stage = config.load(sandbox_config).stage(TEST_SANDBOX)
    if not current_release(stage, 0):
        fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
        prepare_env(Sandbox(TEST_SANDBOX), sandbox_config, TEST_SANDBOX)
        fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True, timeout=900)
    return stage


class Producer:
    """Sends `ledger.tasks.probe` to the default queue every `interval` seconds until stopped; with
    `slow_every`, every so many tasks one runs for `slow` seconds."""

    def __init__(self, interval: float = 0.1, slow_every: int = 0, slow: float = 3.0, sandbox: str = TEST_SANDBOX):
        self.interval, self.slow_every, self.slow = interval, slow_every, slow
        url = Sandbox(sandbox).broker_url()
        self.app = Celery("e2e-producer", broker=url, backend=result_backend(url))
        self.tag = f"p{time.time_ns()}"
        self.sent: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        n = 0
        while not self.stop.is_set():
            args = [f"{self.tag}-{n}"] + ([self.slow] if self.slow_every and n % self.slow_every == 0 else [])
            self.sent.append((time.time(), self.app.send_task("ledger.tasks.probe", args=args, queue="celery")))
            n += 1
            time.sleep(self.interval)

    def long(self, seconds: float):
        return self.app.send_task("ledger.tasks.probe", args=[f"{self.tag}-long", seconds], queue="celery")

    def __enter__(self):
        self.thread.start()
        time.sleep(1)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)

    def results(self, timeout: float = 120) -> list[dict]:
        return [r.get(timeout=timeout) for _, r in self.sent]


def ran_counts(stage, tag: str, expected: int = 0) -> dict[str, int]:
    """How many times each probe of `tag` ran, in the journals of every host of the stage. With
    `expected` (how many were sent), read again for up to 15 s until each shows at least once:
    a line journald has not written yet is not a task that never ran (a second run still shows)."""
    deadline = time.monotonic() + 15
    while True:
        counts: dict[str, int] = {}
        for index in range(len(stage.hosts)):
            lines = on_host(stage, index, f"journalctl -u 'exampleapp-worker-*' -o cat --no-pager --since '-10min' "
                                          f"| grep -o 'probe {tag}-[0-9a-z]* ran' || true")
            for line in lines.split():
                if line.startswith(tag):
                    counts[line] = counts.get(line, 0) + 1
        if len(counts) >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(1)
