"""`fab logs` on two real hosts: merged live journals, filters, reconnect from the cursor, clean Ctrl-C."""

import json
import os
import queue
import secrets
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from deploy_kit import units

from .conftest import FAB, H1, H2, ROOT, TEST_SANDBOX, call_task, commit, current_release, fab, in_container, on_host


class Follower:
    """`fab logs` running in the background, its stdout read line by line."""

    def __init__(self, config_file, *args):
        env = dict(os.environ, DEPLOY_KIT_CONFIG=str(config_file), COLUMNS="200")
        self.proc = subprocess.Popen([str(FAB), "logs", "--stage", TEST_SANDBOX, "--json", *args], cwd=ROOT,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def wait_for(self, predicate, timeout=60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            self.seen.append(item)
            if predicate(item):
                return item
        raise AssertionError(f"no matching line within {timeout}s; seen: {self.seen[-5:]}")

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, self.proc.stderr.read()


def echo_on(stage, index: int, text: str) -> None:
    """Make the worker of host `index` log `text`: a task sent to that worker's own queue."""
    host = stage.hosts[index].name
    release = current_release(stage, 0)  # every host runs it; asked of host 0, which stays reachable
    queue = units.private_queue(stage, stage.workers[0], release, host)
    assert call_task(stage, 0, "ledger.tasks.echo", [text], queue=queue) == repr(text)


def marker() -> str:
    return f"marker-{secrets.token_hex(4)}"


def test_lines_from_every_host_arrive_prefixed_with_host_and_unit(deployed, sandbox_config):
    follower = Follower(sandbox_config)
    try:
        time.sleep(2)  # the streams start with the last lines; new ones follow
        marks = [marker(), marker()]
        for index, text in enumerate(marks):
            echo_on(deployed, index, text)
        for index, text in enumerate(marks):
            line = follower.wait_for(lambda item, text=text: text in item["message"])
            assert line["host"] == deployed.hosts[index].name
            release = current_release(deployed, index)
            assert line["unit"] == f"exampleapp-worker-default@{release}"  # the instance: its release
            assert line["priority"] == 4  # logged at warning level
            datetime.fromisoformat(line["timestamp"])
    finally:
        code, stderr = follower.stop()
    assert code == 0 and "Traceback" not in stderr


def test_a_stream_started_before_a_deploy_shows_the_instance_the_deploy_starts(deployed, sandbox_config, app_repo):
    """journalctl resolves `-u 'X@*.service'` once, when it starts: a stream started before a
    deploy must still show the new release's instance, in `fab logs` and in the deploy's own
    live journal. The plain pattern runs beside it on the first host, to show why."""
    old_style = "exampleapp-e2e-old-style-journal"
    on_host(deployed, 0, f"systemd-run --unit={old_style} -p StandardOutput=file:/run/old-style.log "
                         "journalctl -u 'exampleapp-worker-default@*.service' -o cat --follow -n 0")
    follower = Follower(sandbox_config, "--service", "default")
    try:
        time.sleep(2)
        commit(app_repo, {"ledger/logs.txt": f"{time.time()}\n"}, "a release for the stream to follow")
        deployed_proc = fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True, timeout=900)
        release = current_release(deployed, 0)
        text = marker()
        echo_on(deployed, 0, text)
        line = follower.wait_for(lambda item: text in item["message"])
        assert line["host"] == H1 and line["unit"] == f"exampleapp-worker-default@{release}"
    finally:
        code, stderr = follower.stop()
        old_log = on_host(deployed, 0, f"systemctl stop {old_style}; cat /run/old-style.log; rm -f /run/old-style.log")
    assert code == 0 and "Traceback" not in stderr
    assert f"| exampleapp-worker-default@{release}: " in deployed_proc.stdout  # the deploy's live journal
    # Why: the same pattern, started before the deploy, never shows the new instance's lines.
    assert text not in old_log, old_log[-2000:]


def test_filters_work_as_documented(deployed, sandbox_config):
    text = marker()
    before = (datetime.now(UTC) - timedelta(seconds=2)).strftime("%Y-%m-%d %H:%M:%S UTC")
    echo_on(deployed, 1, text)
    time.sleep(1)
    after = (datetime.now(UTC) + timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S UTC")  # whole seconds
    time.sleep(1.5)

    def lines(*args):
        proc = fab("logs", "--stage", TEST_SANDBOX, "--no-follow", "--json", *args, config_file=sandbox_config,
                   check=True)
        return [json.loads(line) for line in proc.stdout.splitlines()]

    found = lines("--grep", text)
    release = current_release(deployed, 1)
    assert found and {(x["host"], x["unit"]) for x in found} == {(H2, f"exampleapp-worker-default@{release}")}
    assert all(text in x["message"] for x in found)  # the echo and the "succeeded" lines
    only = lines("--host", H2, "--service", "reports", "-n", "5")
    assert only and {x["host"] for x in only} == {H2}
    assert {x["unit"].split("@")[0] for x in only} == {"exampleapp-worker-reports"}
    assert len(lines("-n", "1", "--service", "default")) == 2  # the last line of each host
    assert not lines("--since", after, "--grep", text)
    assert lines("--since", before, "--grep", text)
    beat = lines("--service", "beat", "-n", "3")
    assert beat and {x["host"] for x in beat} == {H1}  # Beat runs on one host only
    plain = fab("logs", "--stage", TEST_SANDBOX, "--no-follow", "--grep", text, config_file=sandbox_config,
                check=True).stdout
    assert plain.startswith(f"{H2} exampleapp-worker-default@{release} ") and text in plain
    bad = fab("logs", "--stage", TEST_SANDBOX, "--service", "nope", config_file=sandbox_config)
    assert bad.returncode == 2 and "no service named 'nope'" in bad.stderr
    pattern = fab("logs", "--stage", TEST_SANDBOX, "--grep", "(", config_file=sandbox_config, timeout=60)
    assert pattern.returncode == 7 and "Bad pattern" in pattern.stderr  # ends, even when following


def test_hint_for_a_classic_failure(deployed, sandbox_config):
    on_host(deployed, 1, "systemd-cat -t exampleapp-test echo never-mind")  # not our unit: filtered out
    text = f"ModuleNotFoundError: No module named 'payments_sdk' {marker()}"
    echo_on(deployed, 1, text)
    time.sleep(1)
    plain = fab("logs", "--stage", TEST_SANDBOX, "--no-follow", "--grep", "payments_sdk", "-n", "1",
                config_file=sandbox_config, check=True).stdout
    assert "hint: a module is missing from the release's virtualenv" in plain
    assert "never-mind" not in plain


def test_a_host_whose_sshd_stops_resumes_from_its_cursor(deployed, sandbox_config):
    follower = Follower(sandbox_config, "--host", H2, "--service", "default")
    try:
        time.sleep(2)
        first = marker()
        echo_on(deployed, 1, first)
        follower.wait_for(lambda item: first in item["message"])
        in_container(H2, "systemctl stop ssh.socket ssh.service 2>/dev/null; pkill -f '[s]shd: deploy' || true")
        during = [marker(), marker()]
        for text in during:  # written while the host is unreachable over SSH
            echo_on(deployed, 1, text)
        time.sleep(3)
        in_container(H2, "systemctl start ssh.service")
        for text in during:
            follower.wait_for(lambda item, text=text: text in item["message"], timeout=90)
        after = marker()
        echo_on(deployed, 1, after)
        follower.wait_for(lambda item: after in item["message"])
    finally:
        code, stderr = follower.stop()
    messages = [item["message"] for item in follower.seen]
    for text in (first, *during, after):  # each echo exactly once: nothing skipped, nothing repeated
        assert sum(f"echo: {text}" in m for m in messages) == 1, f"{text}: {messages}"
    entries = [(item["timestamp"], item["message"]) for item in follower.seen]
    assert len(entries) == len(set(entries))
    assert stderr.count("unreachable") == 1 and "reconnected" in stderr
    assert code == 0, stderr


@pytest.mark.parametrize("index", [0, 1])
def test_ctrl_c_leaves_no_journalctl_running(deployed, sandbox_config, index):
    follower = Follower(sandbox_config)
    text = marker()
    time.sleep(2)
    echo_on(deployed, index, text)
    follower.wait_for(lambda item: text in item["message"])
    assert on_host(deployed, index, "pgrep -c -x journalctl || true").strip() == "1"
    code, stderr = follower.stop()
    assert code == 0 and "Traceback" not in stderr
    time.sleep(1)
    for host in (0, 1):
        assert on_host(deployed, host, "pgrep -c -x journalctl || true").strip() == "0"
