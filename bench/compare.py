"""deploy-kit side by side with the classic manual procedure, on real sandbox hosts.

    flock /tmp/dk-e2e.lock .venv/bin/python bench/compare.py [--runs 5] [--hosts 1] [--scaling]
    .venv/bin/python bench/compare.py --render          # BENCHMARKS.md from bench/results/latest.json

Boots a sandbox (`--stage dkbench`), runs `fab setup`, fills the env file, and deploys the
example app two ways on the same host:

- deploy-kit: `lifecycle.deploy`, in this process (so its SSH traffic is counted);
- the baseline: the classic procedure done literally with Fabric, one `Connection.run`/`sudo`
  per step on one connection, under /srv/baseline (`baseline-worker.service` and
  `baseline-beat.service`, classic units, a shared virtualenv, `systemctl restart`).

Both use the same env file, so the same broker. The baseline worker consumes a queue of its
own (`baseline`), so both sides stay up side by side without taking each other's tasks: each
side's probe sends to the queue that side serves (deploy-kit: the app's default `celery`).

Measured per deploy: wall time; per host, SSH connections (paramiko `Transport.start_client`),
round trips (channels opened, `Transport.open_channel`), bytes sent (`Channel.send` plus the
command lines of `exec_command`); deploy-kit's seconds per phase; and the longest wait of a
task: a thread here sends `ledger.tasks.probe` every 100 ms through the sandbox broker and
compares each send time with the start time the task returns (same kernel clock). Then a
failed deploy (pool children hang at start-up, short verification timeout) and, with
`--scaling`, a warm deploy on 1, 2, 4 and 8 hosts. Results merge into
bench/results/latest.json (keys measured now replace the old ones) and BENCHMARKS.md is
rendered from it. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "latest.json"
MARKDOWN = ROOT / "BENCHMARKS.md"
APP_DIR = "examples/exampleapp"
BASELINE = "/srv/baseline"
BASELINE_QUEUE = "baseline"
SCALING_HOSTS = (1, 2, 4, 8)
HANG = '''

# A release whose pool children hang at start-up: its main process still takes messages.
from celery.signals import worker_process_init  # noqa: E402


@worker_process_init.connect
def _hang(**kwargs):
    import time
    time.sleep(3600)
'''
q = shlex.quote


# --- pure parts: summaries and the report (tests/unit/test_bench.py) ---------------------------


def summarize(values: Iterable[float]) -> dict[str, float | int] | None:
    """{"median", "min", "max", "n"} of some seconds, rounded to 0.01; None when there are none."""
    values = [float(v) for v in values]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def median_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return round(statistics.median(values), 2) if values else None


def merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The previous results with what this run measured in place (dicts of figures merge one
    level deep, so a scaling run for 8 hosts keeps the figure for 4)."""
    merged = dict(old)
    if (old.get("control_measured_at_hosts") or 0) > (new.get("control_measured_at_hosts") or 0):
        new = {k: v for k, v in new.items() if not k.startswith("control_")}  # keep the figure at more hosts
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key == "hosts_wall_s":
            merged[key] = {**merged[key], **{k: v for k, v in value.items() if v is not None}}
        else:
            merged[key] = value
    return merged


def _figure(value: Any) -> float | None:
    if isinstance(value, dict):
        return value.get("median")
    return value


def _show(value: Any, unit: str) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, dict):
        if value.get("median") is None:
            return "not measured"
        spread = f" ({_num(value['min'])}–{_num(value['max'])}, n={value['n']})" if value["n"] > 1 else \
            f" (n={value['n']})"
        return f"{_num(value['median'])} {unit}{spread}".replace("  ", " ")
    return f"{_num(value)} {unit}".strip()


def _num(value: float) -> str:
    if isinstance(value, float) and abs(value) < 1000:
        return f"{value:.2f}"
    return f"{round(value):,}"


def ratio(ours: Any, theirs: Any) -> str:
    """deploy-kit's figure over the baseline's, as "0.42×"; "—" when either is missing or zero."""
    a, b = _figure(ours), _figure(theirs)
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


ROWS = (  # (label, deploy-kit key, baseline key, unit)
    ("warm deploy, wall time (one-file change)", "warm_s", "baseline_warm_s", "s"),
    ("cold deploy, wall time (new environment)", "cold_s", "baseline_cold_s", "s"),
    ("longest wait of a task during a warm deploy (a long task at the handover in the wait runs)", "longest_wait_s",
     "baseline_longest_wait_s", "s"),
    ("SSH connections per host, warm deploy", "connections_per_host", "baseline_connections_per_host", ""),
    ("SSH round trips (channels) per host, warm deploy", "round_trips_per_host", "baseline_round_trips_per_host",
     ""),
    ("… of which cutover progress polls (they only wait)", "progress_polls_per_host", None, ""),
    ("bytes sent per host, one-file change", "bytes_one_file_change", "baseline_bytes_one_file_change", "B"),
    ("bytes sent per host, full release (cold)", "bytes_full_release", "baseline_bytes_full_release", "B"),
    ("failed deploy, start to end (rolled back)", "failed_deploy_s", None, "s"),
    ("failed deploy, failed verification to end", "failed_after_verify_s", None, "s"),
)


STARTUP_LABELS = {"default": "mingle and gossip on (Celery's default)", "without_mingle": "`mingle = false`",
                  "without_mingle_gossip": "`mingle = false`, `gossip = false`"}
STARTUP_FLAGS = {"default": [], "without_mingle": ["--without-mingle"],
                 "without_mingle_gossip": ["--without-mingle", "--without-gossip"]}
READY = re.compile(r"^(\d+\.\d+) .* ready\.$")


def ready_after(started: float, journal: str) -> float | None:
    """Seconds from `started` to the first `... ready.` line of a `journalctl -o short-unix` text."""
    for line in journal.splitlines():
        found = READY.match(line.strip())
        if found:
            return round(float(found.group(1)) - started, 2)
    return None


def failed_verification_to_end(states: Iterable[Mapping[str, Any]], ended: float) -> float | None:
    """Seconds from the first failed `verify` step (the hosts' cutover.json, their clock) to the
    deploy's end (`ended`, time.time() here: sandbox hosts share this machine's clock)."""
    failed = [step["ended"] for state in states for step in state.get("steps", [])
              if step.get("name") == "verify" and step.get("ok") is False and step.get("ended")]
    return round(ended - min(failed), 2) if failed else None


def render_markdown(results: Mapping[str, Any]) -> str:
    """BENCHMARKS.md: each figure beside the baseline's and their ratio, the machine, the date."""
    machine = results.get("machine") or {}
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bench/compare.py` from [bench/results/latest.json](bench/results/latest.json); "
        "do not edit by hand. The baseline is the classic manual procedure done literally with Fabric "
        "on the same host (one command per step on one connection, a shared virtualenv, "
        "`systemctl restart` of classic units); see the README's \"Benchmark\" section.",
        "",
        f"- date: {results.get('date', 'unknown')}"
        + (f" (host scaling: {results['scaling_date']})" if results.get("scaling_date") else ""),
        f"- machine: {machine.get('cpus', '?')} CPU(s), Linux {machine.get('kernel', '?')}, "
        f"Python {machine.get('python', '?')}; sandbox hosts are systemd-nspawn containers on it",
        f"- warm runs: interleaved (deploy-kit, baseline, ...), each after a one-file commit; "
        f"hosts: {results.get('hosts', 1)}",
        "",
        "| figure | deploy-kit | baseline | ratio (deploy-kit / baseline) |",
        "| --- | --- | --- | --- |",
    ]
    for label, ours, theirs, unit in ROWS:
        if ours == "progress_polls_per_host" and results.get(ours) is None:
            continue
        if ours == "failed_after_verify_s" and results.get(ours) is None:
            continue
        if ours == "failed_deploy_s" and results.get("verify_timeout_s") is not None:
            label += f", verification timeout {_num(results['verify_timeout_s'])} s"
        theirs_value = results.get(theirs) if theirs else None
        lines.append(f"| {label} | {_show(results.get(ours), unit)} | "
                     f"{_show(theirs_value, unit) if theirs else '—'} | "
                     f"{ratio(results.get(ours), theirs_value) if theirs else '—'} |")
    phases = results.get("phases_s") or {}
    if phases:
        lines += ["", "deploy-kit's warm deploy per phase (median over the runs, slowest host; the cutover's own "
                      "steps, as the host reports them, are listed before its total):", "",
                  "| phase | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {_num(seconds)} |" for name, seconds in phases.items()]
    installers = results.get("new_environment_s") or {}
    if installers:
        lines += ["", "A requirements change: a new environment, built on the host from wheels it already has, "
                      "installed by uv (sent as a wheel, the default) or by pip (`installer = \"pip\"`), one deploy "
                      "each:", "", "| installer | deploy, seconds | of which the release (build and check) |",
                  "| --- | --- | --- |"]
        lines += [f"| {name} | {_show(v.get('wall_s'), 's')} | {_show(v.get('release_s'), 's')} |"
                  for name, v in installers.items()]
    startup = results.get("startup_ready_s") or {}
    if startup:
        lines += ["", "A worker's start-up: from `systemd-run` of a worker as the units run it (the release's "
                      "Python, the service's user, env file and sandbox) to Celery's `ready.` line in the host's "
                      "journal, with the other workers of the stage running (median over interleaved runs):", "",
                  "| start-up | seconds |", "| --- | --- |"]
        lines += [f"| {STARTUP_LABELS.get(name, name)} | {_show(value, 's')} |" for name, value in startup.items()]
    scaling = results.get("hosts_wall_s") or {}
    if scaling:
        lines += ["", "Warm deploy wall time by number of hosts (one sandbox per count; every host is a container on "
                      "this machine, so at 4 and 8 hosts they share its CPUs with each other and with the deploy):",
                  "", "| hosts | seconds |", "| --- | --- |"]
        lines += [f"| {n} | {_show(scaling.get(n), 's')} |" for n in sorted(scaling, key=int)]
        rss, cpu = results.get("control_peak_rss_mb"), results.get("control_cpu_s")
        if rss is not None or cpu is not None:
            largest = max((int(n) for n, v in scaling.items() if v is not None), default=None)
            at = results.get("control_measured_at_hosts", largest)
            lines += ["", f"Control machine at {at} hosts: peak RSS {_show(rss, 'MB')} (the benchmark process's "
                          "lifetime maximum, so it includes the first, cold deploy to those hosts, which sends each "
                          f"host the wheels), CPU time of the warm deploy {_show(cpu, 's')} (this process and its "
                          "children)."]
    lines += ["", "Waits are measured by a probe task sent every 100 ms from this machine to the queue each side "
                  "serves, in every warm run and in separate wait runs that first send one long task "
                  f"({LONG_TASK_S} s), which still runs on the old release at the handover or the restart (a "
                  "restart in place waits for it, so those runs are kept out of the wall times); the longest wait "
                  "is the worst over all of them. Round trips count "
                  "every SSH channel opened (deploy-kit's cutover progress polls included); bytes count what was "
                  "written to the channels, command lines included.", ""]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


# --- instrumentation: paramiko, per host ------------------------------------------------------


class Meter:
    """Counts SSH connections, channels and bytes sent per host by patching paramiko."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: dict[str, str] = {}  # address -> host name
        self.connections: Counter[str] = Counter()
        self.channels: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.polls: Counter[str] = Counter()  # deploy-kit's cutover progress polls (among the channels)

    def reset(self) -> None:
        with self.lock:
            self.connections.clear(), self.channels.clear(), self.sent.clear(), self.polls.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            hosts = set(self.connections) | set(self.channels) | set(self.sent)
            return {h: {"connections": self.connections[h], "round_trips": self.channels[h],
                        "bytes": self.sent[h], "polls": self.polls[h]} for h in sorted(hosts)}

    def _host(self, transport: Any) -> str:
        try:
            address = transport.getpeername()[0]
        except Exception:  # noqa: BLE001 - a closed socket: count it somewhere visible
            return "unknown"
        return self.names.get(address, address)

    def _add(self, counter: Counter[str], transport: Any, n: int) -> None:
        host = self._host(transport)
        with self.lock:
            counter[host] += n

    def install(self) -> None:
        import paramiko

        meter = self
        start_client, open_channel = paramiko.Transport.start_client, paramiko.Transport.open_channel
        send, exec_command = paramiko.Channel.send, paramiko.Channel.exec_command

        def counted_start(self, *args, **kwargs):
            meter._add(meter.connections, self, 1)
            return start_client(self, *args, **kwargs)

        def counted_open(self, *args, **kwargs):
            meter._add(meter.channels, self, 1)
            return open_channel(self, *args, **kwargs)

        def counted_send(self, s):
            n = send(self, s)
            meter._add(meter.sent, self.transport, n)
            return n

        def counted_exec(self, command):
            meter._add(meter.sent, self.transport, len(command.encode() if isinstance(command, str) else command))
            return exec_command(self, command)

        from deploy_kit import ssh

        run = ssh.RemoteHost.run

        def counted_run(self, command, stdin, **kwargs):
            if kwargs.get("what") == "following the cutover":
                with meter.lock:
                    meter.polls[self.name] += 1
            return run(self, command, stdin, **kwargs)

        ssh.RemoteHost.run = counted_run
        paramiko.Transport.start_client = counted_start
        paramiko.Transport.open_channel = counted_open
        paramiko.Channel.send = counted_send
        paramiko.Channel.exec_command = counted_exec


METER = Meter()


# --- the probe: how long a task waits while a deploy runs --------------------------------------


LONG_TASK_S = 12  # a task sent as the deploy starts, so it still runs on the old release at the handover


class Prober:
    """Sends `ledger.tasks.probe` every 100 ms to `queue`; `longest()` is the longest time a task
    waited between its send and its start. With `long`, it first sends one long task (`LONG_TASK_S`), which
    still runs on the old release when the deploy hands over or restarts: a restart in place
    waits for it, a handover lets it finish on the old instance while the new one serves."""

    def __init__(self, app: Any, queue: str, long: bool = False):
        self.app, self.queue, self.with_long = app, queue, long
        self.sent: list[tuple[float, Any]] = []
        self.long: Any = None
        self.long_ran_on = ""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.sent.append((time.time(), self.app.send_task("ledger.tasks.probe", args=[f"bench-{n}"],
                                                              queue=self.queue)))
            n += 1
            self.stop.wait(0.1)

    def __enter__(self) -> Prober:
        if self.with_long:
            self.long = self.app.send_task("ledger.tasks.probe", args=["bench-long", LONG_TASK_S], queue=self.queue)
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def longest(self, timeout: float = 180) -> float:
        waits, ran_on = [], []
        for sent, result in self.sent:
            answer = result.get(timeout=timeout)
            waits.append(answer["started"] - sent)
            ran_on.append(Path(answer["release"]).name)
            result.forget()
        if waits:  # when the worst one was sent, from the first send (0.5 s before the deploy began), and where it ran
            worst = waits.index(max(waits))
            self.late = [(round(sent - self.sent[0][0], 2), round(wait, 2), on) for (sent, _), wait, on in
                         zip(self.sent, waits, ran_on, strict=True) if wait > 0.5]
            self.worst_at = f"{self.sent[worst][0] - self.sent[0][0]:.2f} s, ran on {ran_on[worst]}"
        if self.long is not None:  # it completed (never lost), on the release that ran it
            self.long_ran_on = Path(self.long.get(timeout=timeout + LONG_TASK_S)["release"]).name
            self.long.forget()
        return round(max(waits), 2) if waits else 0.0


# --- the sandbox and the app repository --------------------------------------------------------


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid")
    return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True).stdout.decode()


def commit(repo: Path, changes: Mapping[str, str], message: str) -> str:
    for name, content in changes.items():
        path = repo / APP_DIR / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def one_file_change(repo: Path, n: int) -> str:
    return commit(repo, {"ledger/bench.txt": f"change {n} at {time.time()}\n"}, f"bench: one-file change {n}")


def make_app_repo(directory: Path) -> Path:
    repo = directory / "repo"
    shutil.copytree(ROOT / APP_DIR, repo / APP_DIR, ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
    git(repo, "init", "-q", "-b", "main")
    commit(repo, {}, "example app v1")
    return repo


def fab(config_file: Path, *args: str, stdin: str = "") -> None:
    env = dict(os.environ, DEPLOY_KIT_CONFIG=str(config_file), COLUMNS="200")
    proc = subprocess.run([str(Path(sys.executable).with_name("fab")), *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"fab {' '.join(args)} exited {proc.returncode}:\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def boot(name: str, hosts: int, directory: Path) -> tuple[Any, Path, Path]:
    """A fresh sandbox of `hosts` hosts, set up (`fab setup`) with its env file filled in."""
    from deploy_kit.sandbox import Sandbox

    repo = directory / "repo" if (directory / "repo").exists() else make_app_repo(directory)
    config_file = directory / "hosts.toml"
    box = Sandbox(name)
    box.up(hosts, config_file, say, repo_root=repo)
    fab(config_file, "setup", "--stage", name, "--yes")
    for assignment in ("DJANGO_SETTINGS_MODULE=exampleapp.settings", "DJANGO_SECRET_KEY=bench-not-secret",
                       "DATABASE_URL=sqlite:////srv/exampleapp/shared/db.sqlite3"):
        fab(config_file, "env.set", assignment, "--stage", name)
    fab(config_file, "env.set", "CELERY_BROKER_URL", "--stage", name, stdin=box.broker_url() + "\n")
    METER.names.update({h.address: h.name for h in box.hosts()})
    return box, config_file, repo


def load_stage(config_file: Path, name: str) -> Any:
    from deploy_kit import config

    return config.load(config_file).stage(name)


# --- the two ways of deploying -----------------------------------------------------------------


def per_host(counts: Mapping[str, Mapping[str, int]], hosts: Iterable[str]) -> dict[str, dict[str, int]]:
    return {h: dict(counts.get(h, {"connections": 0, "round_trips": 0, "bytes": 0, "polls": 0})) for h in hosts}


def deploykit(stage: Any, prober_app: Any | None = None, long: bool = False) -> dict[str, Any]:
    """One `fab deploy`, in this process: wall time, per-host traffic, per-phase seconds, longest wait."""
    from deploy_kit import lifecycle

    METER.reset()
    probe = Prober(prober_app, "celery", long) if prober_app is not None else contextlib.nullcontext()
    with probe:
        started = time.monotonic()
        said: list[tuple[float, str]] = []
        outcome = lifecycle.deploy(stage, ref=None, say=lambda host, message: said.append((time.time(), message)))
        wall = time.monotonic() - started
    traffic = per_host(METER.snapshot(), [h.name for h in stage.hosts])
    run = {"wall": round(wall, 2), "release": outcome.release, "traffic": traffic, "timings": outcome.timings,
           "longest_wait": probe.longest() if prober_app is not None else None}
    if getattr(probe, "late", None):  # when the steps ended and what they said (the retire's handoff): why
        say(f"tasks that waited more than 0.5 s (sent at, waited, ran on): {probe.late}; the deploy said: "
            + "; ".join(f"{when - probe.sent[0][0]:+.2f} s {message}" for when, message in said
                        if not message.lstrip().startswith("|") or "Canceling" in message or "shutdown" in message))
    say(f"deploy-kit {outcome.release}: {wall:.2f} s, " + ", ".join(
        f"{h}: {t['connections']} conn, {t['round_trips']} channels ({t['polls']} polls), {t['bytes'] / 1024:.0f} KiB"
        for h, t in traffic.items()) + (f", longest wait {run['longest_wait']:.2f} s (sent at "
                                        f"+{getattr(probe, 'worst_at', '')}), the {LONG_TASK_S} s task ran on "
                                        f"{getattr(probe, 'long_ran_on', '')}" if prober_app else ""))
    return run


class Baseline:
    """The classic manual procedure, literally: one Fabric command per step, on one connection."""

    def __init__(self, stage: Any, repo: Path):
        self.stage, self.repo, self.host = stage, repo, stage.hosts[0]
        self.app = stage.app
        self.wheels: list[Path] = []

    def units(self) -> dict[str, str]:
        app = self.app
        common = (f"[Unit]\nDescription={{what}} of {app.name} (baseline: the classic procedure)\n"
                  "After=network-online.target redis-server.service\nWants=network-online.target\n\n"
                  f"[Service]\nType=simple\nUser={app.user}\nGroup={app.group}\n"
                  f"WorkingDirectory={BASELINE}/current\nEnvironmentFile={app.env_file}\n"
                  "ExecStart={exec_start}\nRestart=always\nKillMode=mixed\n\n"
                  "[Install]\nWantedBy=multi-user.target\n")
        celery = f"{BASELINE}/venv/bin/celery -A {app.celery_app}"
        return {
            "baseline-worker.service": common.format(
                what="Celery worker", exec_start=f"{celery} worker -Q {BASELINE_QUEUE} -n baseline@%%h "
                                                 "--concurrency 2 --loglevel INFO"),
            "baseline-beat.service": common.format(what="Celery Beat", exec_start=f"{celery} beat --loglevel INFO"),
        }

    def connect(self) -> Any:
        from deploy_kit.ssh import connect

        return connect(self.host, self.stage.ssh).connection  # a fabric.Connection, host key checked

    def setup(self) -> None:
        """Not measured: the app dir, the units, and the wheels for the host's Python fetched here."""
        from deploy_kit import wheels
        from deploy_kit.runner import CACHE_DIR

        c = self.connect()
        try:
            out = c.run("python3 -c 'import os, platform; print(platform.python_version(), platform.machine(), "
                        "os.confstr(\"CS_GNU_LIBC_VERSION\").split()[-1])'", hide=True, in_stream=False).stdout
            python, machine, glibc = out.split()
            requirements = (self.repo / self.app.path / self.app.requirements).read_text()
            house = wheels.Wheelhouse(requirements, wheels.Target(python, machine, glibc), CACHE_DIR)
            self.wheels = self._complete(c, house, requirements)
            c.sudo(f"install -d -o {q(self.app.user)} -g {q(self.app.group)} {BASELINE}/releases {BASELINE}/shared",
                   hide=True, in_stream=False)
            for name, text in self.units().items():
                c.put(io.BytesIO(text.encode()), f"/tmp/{name}")
                c.sudo(f"mv /tmp/{name} /etc/systemd/system/{name}", hide=True, in_stream=False)
            c.sudo("systemctl daemon-reload", hide=True, in_stream=False)
            c.sudo("systemctl enable baseline-worker baseline-beat", hide=True, in_stream=False)
        finally:
            c.close()

    def _complete(self, c: Any, house: Any, requirements: str) -> list[Path]:
        """The wheels pip on the host needs: this machine's resolver may miss some (markers on the
        host's full Python version), so try on the host (`pip install --dry-run`) and add what it
        misses, as deploy-kit does when it builds."""
        trial, extra, sent = "/tmp/baseline-trial", [], set()
        c.run(f"rm -rf {trial} && mkdir -p {trial}/wheels", hide=True, in_stream=False)
        c.put(io.BytesIO(requirements.encode()), f"{trial}/requirements.txt")
        c.run(f"python3 -m venv {trial}/venv", hide=True, in_stream=False)
        try:
            for _attempt in range(6):
                files = house.files(extra)
                for wheel in files:
                    if wheel.name not in sent:
                        c.put(str(wheel), f"{trial}/wheels/{wheel.name}")
                        sent.add(wheel.name)
                result = c.run(f"{trial}/venv/bin/pip install --dry-run --disable-pip-version-check --no-index "
                               f"--find-links {trial}/wheels -r {trial}/requirements.txt", hide=True,
                               in_stream=False, warn=True)
                if result.ok:
                    return files
                match = re.search(r"No matching distribution found for ([^ ]*)", result.stderr)
                if not match:
                    raise SystemExit(f"pip on the host fails with the wheels from here:\n{result.stderr}")
                extra.append(re.sub(r"[^A-Za-z0-9._=<>!~+-]", "", match.group(1)))
            raise SystemExit(f"pip on the host still misses distributions after adding {extra}")
        finally:
            c.run(f"rm -rf {trial}", hide=True, in_stream=False)

    def reset_cold(self) -> None:
        """What a cold deploy starts from: no virtualenv, no releases, no wheels on the host."""
        c = self.connect()
        try:
            c.sudo("systemctl stop baseline-worker baseline-beat", hide=True, in_stream=False)
            c.sudo(f"rm -rf {BASELINE}/venv {BASELINE}/wheels {BASELINE}/current", hide=True, in_stream=False)
            c.sudo(f"find {BASELINE}/releases -mindepth 1 -delete", hide=True, in_stream=False)
        finally:
            c.close()

    def deploy(self, *, cold: bool, prober_app: Any | None = None, long: bool = False) -> dict[str, Any]:
        METER.reset()
        name = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        release = f"{BASELINE}/releases/{name}"
        probe = Prober(prober_app, BASELINE_QUEUE, long) if prober_app is not None else contextlib.nullcontext()
        with probe:
            started = time.monotonic()
            self._steps(name, release, cold)
            wall = time.monotonic() - started
        traffic = per_host(METER.snapshot(), [self.host.name])
        run = {"wall": round(wall, 2), "release": name, "traffic": traffic,
               "longest_wait": probe.longest() if prober_app is not None else None}
        t = traffic[self.host.name]
        say(f"baseline {name} ({'cold' if cold else 'warm'}): {wall:.2f} s, {t['connections']} conn, "
            f"{t['round_trips']} channels, {t['bytes'] / 1024:.0f} KiB"
            + (f", longest wait {run['longest_wait']:.2f} s, the {LONG_TASK_S} s task ran on "
               f"{getattr(probe, 'long_ran_on', '')}" if prober_app else ""))
        return run

    def _steps(self, name: str, release: str, cold: bool) -> None:
        app = self.app
        archive = subprocess.run(["git", "-C", str(self.repo), "archive", "--format=tar.gz",
                                  f"HEAD:{app.path}"], check=True, capture_output=True).stdout
        c = self.connect()

        def sudo(command: str, user: str | None = None) -> None:
            c.sudo(command, user=user, hide=True, in_stream=False)

        as_service = (f"set -a; . {q(str(app.env_file))}; set +a; cd {{dir}} && "
                      f"exec {BASELINE}/venv/bin/python {{argv}}")
        try:
            c.put(io.BytesIO(archive), f"/tmp/{name}.tar.gz")
            if cold:
                c.run(f"mkdir -p /tmp/wheels-{name}", hide=True, in_stream=False)
                for wheel in self.wheels:
                    c.put(str(wheel), f"/tmp/wheels-{name}/{wheel.name}")
                sudo(f"mv /tmp/wheels-{name} {BASELINE}/wheels")
            sudo(f"mkdir -p {release}")
            sudo(f"tar -xzf /tmp/{name}.tar.gz -C {release}")
            sudo(f"chown -R {q(app.user)}:{q(app.group)} {release}")
            if cold:
                sudo(f"{q(str(app.python))} -m venv {BASELINE}/venv")
            sudo(f"{BASELINE}/venv/bin/pip install --quiet --disable-pip-version-check --no-index "
                 f"--find-links {BASELINE}/wheels -r {release}/{q(app.requirements)}")
            sudo("bash -c " + q(as_service.format(dir=release, argv="manage.py migrate --noinput")), user=app.user)
            sudo(f"ln -sfn {release} {BASELINE}/current.tmp")
            sudo(f"mv -T {BASELINE}/current.tmp {BASELINE}/current")
            sudo("systemctl restart baseline-worker")
            sudo("systemctl restart baseline-beat")
            code = ("from exampleapp.celery import app; print(app.send_task('ledger.tasks.echo', "
                    f"args=['baseline {name}'], queue={BASELINE_QUEUE!r}).get(timeout=60))")
            sudo("bash -c " + q(as_service.format(dir=f"{BASELINE}/current", argv="-c " + q(code))), user=app.user)
            sudo(f"rm -f /tmp/{name}.tar.gz")
            sudo(f"sh -c 'cd {BASELINE}/releases && ls -1 | sort | head -n -5 | xargs -r rm -rf'")
        finally:
            c.close()


# --- the runs ----------------------------------------------------------------------------------


def compare(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    from celery import Celery

    from deploy_kit.errors import DeployKitError

    box, config_file, repo = boot(args.stage, args.hosts, directory)
    stage = load_stage(config_file, args.stage)
    url = box.broker_url()
    prober_app = Celery("bench-probe", broker=url, backend=url)
    baseline = Baseline(stage, repo)

    baseline.setup()  # fetches the wheels here first: neither cold deploy pays for pip download
    say("cold deploys: deploy-kit's first on the fresh sandbox, then the baseline's from nothing")
    cold = deploykit(stage)
    baseline.reset_cold()
    baseline_cold = baseline.deploy(cold=True)

    say("a requirements change (a new environment, the wheels already on the host): pip, then uv")
    requirements = repo / APP_DIR / stage.app.requirements
    installers = {}
    for installer in ("pip", "uv"):
        commit(repo, {stage.app.requirements: requirements.read_text() + f"# bench: built with {installer}\n"},
               f"bench: a requirements change ({installer})")
        text = config_file.read_text().replace('celery_app = "exampleapp"',
                                               f'celery_app = "exampleapp"\ninstaller = "{installer}"', 1)
        variant = config_file.with_name(f"installer-{installer}.toml")
        variant.write_text(text)
        run = deploykit(load_stage(variant, args.stage))
        installers[installer] = {"wall_s": run["wall"], "release_s": max(t.get("release", 0.0)
                                                                         for t in run["timings"].values())}

    say("warm-up: one warm deploy each (not counted)")
    change = 0
    for side in ("deploy-kit", "baseline"):
        change += 1
        one_file_change(repo, change)
        deploykit(stage, prober_app) if side == "deploy-kit" else baseline.deploy(cold=False, prober_app=prober_app)

    warm, baseline_warm = [], []
    for run in range(1, args.runs + 1):
        say(f"warm run {run} of {args.runs}")
        change += 1
        one_file_change(repo, change)
        warm.append(deploykit(stage, prober_app))
        change += 1
        one_file_change(repo, change)
        baseline_warm.append(baseline.deploy(cold=False, prober_app=prober_app))

    waits, baseline_waits = [], []  # apart from the warm runs: a restart in place waits for the long task
    for run in range(1, args.wait_runs + 1):
        say(f"wait run {run} of {args.wait_runs}: a {LONG_TASK_S} s task runs on the old release at the handover")
        change += 1
        one_file_change(repo, change)
        waits.append(deploykit(stage, prober_app, long=True))
        change += 1
        one_file_change(repo, change)
        baseline_waits.append(baseline.deploy(cold=False, prober_app=prober_app, long=True))

    startup = startup_times(stage, args.startup_runs)

    say(f"failed deploy: pool children hang at start-up, verification timeout {args.verify_timeout} s")
    celery_py = repo / APP_DIR / "exampleapp" / "celery.py"
    source = celery_py.read_text()
    commit(repo, {"exampleapp/celery.py": source + HANG}, "bench: pool children hang at start-up")
    text = config_file.read_text()
    marker = 'task = "celery.accumulate"\ntimeout = 60'
    if marker not in text:
        raise SystemExit(f"cannot set the verification timeout: {marker!r} is not in {config_file}")
    tight = config_file.with_name("verify-short.toml")
    tight.write_text(text.replace(marker, f'task = "celery.accumulate"\ntimeout = {args.verify_timeout}'))
    started = time.monotonic()
    try:
        lifecycle_deploy(load_stage(tight, args.stage))
        raise SystemExit("the failing release deployed: the failed-deploy figure would be meaningless")
    except DeployKitError as exc:
        failed_s, ended = round(time.monotonic() - started, 2), time.time()
        say(f"failed deploy ended in {failed_s:.2f} s with exit code {exc.exit_code}")
    states = [json.loads(on_host(stage, h, f"cat {stage.app.deploy_to}/.deploy-kit/cutover.json"))
              for h in stage.hosts]
    after_verify_s = failed_verification_to_end(states, ended)
    steps = ", ".join(f"{s['name']} {(s.get('ended') or ended) - s['started']:.2f} s"
                      for s in states[0].get("steps", []))
    say(f"... of which {after_verify_s} s from the failed verification to the end (the cutover's steps: {steps}; "
        f"it ended {ended - max((s.get('ended') or 0 for s in states[0].get('steps', [])), default=ended):.2f} s "
        "before the deploy)")
    commit(repo, {"exampleapp/celery.py": source}, "bench: revert the hang")

    hosts = [h.name for h in stage.hosts]
    first = hosts[0]

    def traffic(runs: list[dict[str, Any]], key: str) -> float | None:
        return median_or_none(max(r["traffic"][h][key] for h in r["traffic"]) for r in runs)

    phases: dict[str, list[float]] = {}
    for r in warm:
        steps: dict[str, float] = {}
        for host_steps in r["timings"].values():
            for step, seconds in host_steps.items():
                steps[step] = max(steps.get(step, 0.0), seconds)
        for step, seconds in steps.items():
            phases.setdefault(step, []).append(seconds)
    return {
        "hosts": len(hosts),
        "warm_s": summarize(r["wall"] for r in warm),
        "baseline_warm_s": summarize(r["wall"] for r in baseline_warm),
        "cold_s": summarize([cold["wall"]]),
        "baseline_cold_s": summarize([baseline_cold["wall"]]),
        "round_trips_per_host": traffic(warm, "round_trips"),
        "connections_per_host": traffic(warm, "connections"),
        "progress_polls_per_host": traffic(warm, "polls"),
        "bytes_one_file_change": traffic(warm, "bytes"),
        "bytes_full_release": max(cold["traffic"][h]["bytes"] for h in hosts),
        "baseline_round_trips_per_host": traffic(baseline_warm, "round_trips"),
        "baseline_connections_per_host": traffic(baseline_warm, "connections"),
        "baseline_bytes_one_file_change": traffic(baseline_warm, "bytes"),
        "baseline_bytes_full_release": baseline_cold["traffic"][first]["bytes"],
        "longest_wait_s": max(r["longest_wait"] for r in warm + waits) if warm + waits else None,
        "baseline_longest_wait_s": max(r["longest_wait"] for r in baseline_warm + baseline_waits)
        if baseline_warm + baseline_waits else None,
        "longest_wait_per_run_s": [r["longest_wait"] for r in warm],
        "baseline_longest_wait_per_run_s": [r["longest_wait"] for r in baseline_warm],
        "longest_wait_long_task_per_run_s": [r["longest_wait"] for r in waits],
        "baseline_longest_wait_long_task_per_run_s": [r["longest_wait"] for r in baseline_waits],
        "failed_deploy_s": failed_s,
        "failed_after_verify_s": after_verify_s,
        **({"startup_ready_s": startup} if startup else {}),
        "verify_timeout_s": args.verify_timeout,
        "new_environment_s": installers,
        "phases_s": {step: median_or_none(v) for step, v in phases.items()},
    }


def on_host(stage: Any, host: Any, script: str) -> str:
    from deploy_kit.ssh import connect

    with connect(host, stage.ssh) as remote:
        return remote.run_script(script, sudo=True, what="benchmark script", check=True).stdout


def startup_script(stage: Any, host: Any, unit: str, flags: list[str]) -> str:
    """Start a worker of the first service as its unit would (the current release's Python, the
    service's user, env file and sandbox; a node and a queue of its own), wait for its `ready.`
    line, stop it; print the start time, then the unit's journal (`short-unix`)."""
    from deploy_kit import units
    from deploy_kit.remote import hostlib

    worker = stage.workers_on(host)[0]
    argv = [str(units.python(stage.app)), "-m", "celery", "-A", stage.app.celery_app, "worker",
            "-n", f"{unit}@{host.name}", "-Q", f"{unit}@{host.name}", "-c", str(worker.concurrency),
            "--loglevel=INFO", *flags]
    run = [a for a in hostlib.service_argv(list(units.service_environment(stage)), str(stage.app.current_link),
                                           argv, pipe=False) if a != "--wait"]
    run.insert(1, f"--unit={unit}")
    journal = f"journalctl -u {unit} -o short-unix --no-pager"
    return (f"started=$(date +%s.%N)\n{shlex.join(run)}\n"
            f"for i in $(seq 600); do {journal} | grep -q ' ready\\.$' && break; sleep 0.1; done\n"
            f"systemctl stop {unit} || true\necho \"$started\"\n{journal}\n")


def startup_times(stage: Any, runs: int) -> dict[str, Any]:
    """Seconds from a worker's start to `ready.`, per set of start-up flags, runs interleaved."""
    if runs <= 0:
        return {}
    host = next(h for h in stage.hosts if stage.workers_on(h))
    times: dict[str, list[float]] = {name: [] for name in STARTUP_FLAGS}
    for run in range(runs):
        for name, flags in STARTUP_FLAGS.items():
            unit = f"dk-startup-bench-{name.replace('_', '-')}-{run}-{time.time_ns()}"
            started, _, journal = on_host(stage, host, startup_script(stage, host, unit, flags)).partition("\n")
            seconds = ready_after(float(started), journal)
            if seconds is None:
                raise SystemExit(f"{unit} never said ready:\n{journal[-3000:]}")
            times[name].append(seconds)
            say(f"start-up {name}: ready after {seconds:.2f} s")
    return {name: summarize(values) for name, values in times.items()}


def lifecycle_deploy(stage: Any) -> Any:
    from deploy_kit import lifecycle

    return lifecycle.deploy(stage, ref=None, say=lambda host, message: None)


def scaling(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """A warm deploy on a fresh sandbox of each size; the control machine's cost at the largest."""
    walls: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    counts = sorted(args.scaling_hosts)
    for n in counts:
        say(f"scaling: {n} host(s)")
        box, config_file, repo = boot(args.stage, n, directory)
        stage = load_stage(config_file, args.stage)
        lifecycle_deploy(stage)  # the cold first deploy, not counted
        one_file_change(repo, 1000 + n)
        self_before, children_before = resource.getrusage(resource.RUSAGE_SELF), \
            resource.getrusage(resource.RUSAGE_CHILDREN)
        run = deploykit(stage)
        self_after, children_after = resource.getrusage(resource.RUSAGE_SELF), \
            resource.getrusage(resource.RUSAGE_CHILDREN)
        walls[str(n)] = run["wall"]
        if n == counts[-1]:
            cpu = sum(getattr(after, f) - getattr(before, f) for before, after in
                      ((self_before, self_after), (children_before, children_after)) for f in ("ru_utime", "ru_stime"))
            extra = {"control_peak_rss_mb": round(self_after.ru_maxrss / 1024, 1), "control_cpu_s": round(cpu, 2),
                     "control_measured_at_hosts": n}
        box.down(say)
    return {"hosts_wall_s": {str(n): walls.get(str(n)) for n in SCALING_HOSTS} | walls, **extra}


def write(results: Mapping[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    MARKDOWN.write_text(render_markdown(results))
    say(f"wrote {RESULTS.relative_to(ROOT)} and {MARKDOWN.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="dkbench", help="sandbox and stage name (default: dkbench)")
    parser.add_argument("--runs", type=int, default=5, help="warm deploys of each side (default: 5)")
    parser.add_argument("--hosts", type=int, default=1, help="hosts of the comparison's sandbox (default: 1)")
    parser.add_argument("--verify-timeout", type=int, default=15, help="for the failed deploy (default: 15 s)")
    parser.add_argument("--startup-runs", type=int, default=3,
                        help="worker start-ups timed with each set of flags, mingle/gossip on and off (default: 3; "
                             "0 skips them)")
    parser.add_argument("--scaling", action="store_true", help="also a warm deploy on 1, 2, 4 and 8 hosts")
    parser.add_argument("--scaling-hosts", type=lambda s: [int(x) for x in s.split(",")], default=list(SCALING_HOSTS),
                        help="host counts for --scaling (default: 1,2,4,8)")
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison (with --scaling)")
    parser.add_argument("--wait-runs", type=int, default=2,
                        help=f"deploys of each side with a {LONG_TASK_S} s task running at the handover (default: 2)")
    parser.add_argument("--keep", action="store_true", help="leave the sandbox up afterwards (to look at its hosts)")
    parser.add_argument("--render", action="store_true", help="only render BENCHMARKS.md from latest.json")
    args = parser.parse_args(argv)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.render:
        MARKDOWN.write_text(render_markdown(old))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench/compare.py boots sandbox hosts: run it as root (after ./scripts/bootstrap)")
    from deploy_kit.sandbox import Sandbox

    METER.install()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))  # tear down
    new: dict[str, Any] = {}
    directory = Path(tempfile.mkdtemp(prefix="dkbench-"))
    try:
        if not args.no_compare:
            new.update(compare(args, directory))
        if args.scaling:
            new.update(scaling(args, directory))
    finally:
        if args.keep:
            say(f"sandbox {args.stage!r} is kept (--keep); its stage file: {directory}/hosts.toml; take it down "
                f"with: fab sandbox.down --stage {args.stage}")
        else:
            Sandbox(args.stage).down(say)
            shutil.rmtree(directory, ignore_errors=True)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    new.update({"scaling_date": now} if args.no_compare else {"date": now}, machine=machine_info())
    results = merge(old, new)
    for key in ("hosts_wall_s",):
        results.setdefault(key, {str(n): None for n in SCALING_HOSTS})
    for key in ("control_peak_rss_mb",):
        results.setdefault(key, None)
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
