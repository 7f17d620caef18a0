"""How the control machine reads a host's cutover (`follow.py`): a lost launch is UNKNOWN, never
"not started"; a state file of another run is never taken for this one's; a refused launch is."""

import shutil
import types

from deploy_kit import follow, journal, plan
from deploy_kit.errors import HostError, RemoteCommandError
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode
from deploy_kit.runner import Outcome

from .samples import ONE_HOST, stage_of

NEW, OLD = "2026-11-24-123000", "2026-11-24-120000"


class Remote:
    """Answers the launch with `launch` (an exception, or the lines the host prints as it follows)
    and each later reading with the next of `polls` (lines of `ACTIVE STATE-JSON`)."""

    name = "web2"

    def __init__(self, launch=(), polls=()):
        self.launch, self.polls = launch, list(polls)

    def run_script(self, script, *, on_line=None, on_err_line=None, **kwargs):
        self.scripts = [*getattr(self, "scripts", []), script]
        if kwargs.get("what") == "starting the cutover":
            if isinstance(self.launch, Exception):
                raise self.launch
            lines = self.launch
        else:
            lines = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        for line in lines:
            if line.startswith("{"):  # a journal line, on standard error
                assert on_err_line(line)
            else:
                on_line(line)
        return types.SimpleNamespace(stdout="")


def follow_with(remote, monkeypatch):
    stage = stage_of()
    monkeypatch.setattr(follow.time, "sleep", lambda s: None)
    said = []
    session = types.SimpleNamespace(remote=lambda name: remote, reconnect=lambda name: None)
    run = types.SimpleNamespace(stage=stage, session=session, outcome=Outcome(), say=lambda h, m: said.append(m),
                                token="t0k3n")
    action = plan.Cutover(plan.cutover_params(stage, stage.host("web2"), NEW, OLD, Mode.DEPLOY, "run1"), "web2")
    return follow.cutover(run, remote, action), said


def state(run_id, status):
    return CutoverState(id=run_id, mode=Mode.DEPLOY, target=NEW, previous=OLD, status=status).to_json()


def test_a_launch_whose_answer_is_lost_is_unknown_not_not_started(monkeypatch):
    """The connection drops before the host said a word, and no state of this run ever appears."""
    monkeypatch.setattr(follow, "STARTUP_GRACE", -1)
    found, _ = follow_with(Remote(launch=HostError("web2", "the SSH connection failed: reset"),
                                  polls=[["inactive "]]), monkeypatch)
    assert found.status == CutoverStatus.UNKNOWN and "may have started" in found.rollback_failure


def test_a_launch_whose_connection_drops_is_followed_after_reconnecting(monkeypatch):
    """systemd-run started the cutover, then the connection dropped: it runs by itself, so the
    follower reconnects and reads it to its end instead of giving up."""
    found, said = follow_with(Remote(launch=HostError("web2", "the SSH connection failed: reset"),
                                     polls=[[f"inactive {state('run1', CutoverStatus.DONE)}"]]), monkeypatch)
    assert found.status == CutoverStatus.DONE
    assert any("lost the connection" in m for m in said) and any("connection back" in m for m in said)


def test_a_launch_refused_because_another_cutover_runs_is_unknown_not_not_started(monkeypatch):
    """Nothing of this run started there, but the host is not free: the lock is kept (UNKNOWN) and
    the refusal is told as it is, so the release is not marked bad."""
    refused = RemoteCommandError("web2", "starting the cutover", 3, follow.REFUSED + "another cutover of shop "
                                 "is still running on this host (shop-cutover-1): it ends by itself")
    found, _ = follow_with(Remote(launch=refused), monkeypatch)
    assert found.status == CutoverStatus.UNKNOWN and follow.refused(found)
    assert "another cutover" in found.rollback_failure and not found.steps


def test_a_launch_that_lost_the_lock_is_refused(monkeypatch):
    lost = RemoteCommandError("web2", "starting the cutover", 4, "lock lost: the deploy lock of shop here is no "
                              "longer this run's")
    found, _ = follow_with(Remote(launch=lost), monkeypatch)
    assert follow.refused(found) and "lock lost" in found.rollback_failure


def test_a_launch_that_failed_otherwise_is_not_started(monkeypatch):
    failed = RemoteCommandError("web2", "starting the cutover", 1, "Failed to start transient service unit")
    found, _ = follow_with(Remote(launch=failed), monkeypatch)
    assert found.status == CutoverStatus.NOT_STARTED and "transient" in found.failure


def test_another_runs_state_file_is_never_read_as_this_ones(monkeypatch):
    """An older run's "done" sits in the file while this run's unit has died: unknown, not done."""
    older = state("older", CutoverStatus.DONE)
    polls = [[f"active {older}"], [f"active {older}", f"inactive {older}"]]
    monkeypatch.setattr(follow, "STARTUP_GRACE", -1)
    found, _ = follow_with(Remote(polls=polls), monkeypatch)
    assert found.status == CutoverStatus.UNKNOWN and found.id == "run1"


def test_this_runs_state_file_ends_the_following(monkeypatch):
    lines = [f"active {state('run1', CutoverStatus.RUNNING)}", f"inactive {state('run1', CutoverStatus.DONE)}"]
    found, _ = follow_with(Remote(launch=lines), monkeypatch)
    assert found.status == CutoverStatus.DONE


def test_a_connection_lost_while_following_is_read_again_after_reconnecting(monkeypatch):
    class Dropping(Remote):
        def run_script(self, script, *, on_line=None, on_err_line=None, **kwargs):
            if kwargs.get("what") == "starting the cutover":
                self.scripts = [script]
                on_line(f"active {state('run1', CutoverStatus.RUNNING)}")
                on_err_line(journal_entry("s=c1", "worker ready"))
                raise HostError("web2", "the SSH connection failed: reset")
            return super().run_script(script, on_line=on_line, on_err_line=on_err_line, **kwargs)

    remote = Dropping(polls=[[journal_entry("s=c2", "Warm shutdown"), f"inactive {state('run1', CutoverStatus.DONE)}"]])
    found, said = follow_with(remote, monkeypatch)
    assert found.status == CutoverStatus.DONE
    assert any("lost the connection" in m for m in said) and any("connection back" in m for m in said)
    # The journal goes on after the last line shown, on the channel that follows the state.
    assert [m for m in said if "|" in m] == ["  | shop-worker-default: worker ready",
                                             "  | shop-worker-default: Warm shutdown"]
    assert "--since" in remote.scripts[0] and "--after-cursor s=c1 --no-tail --follow" in remote.scripts[1]


def journal_entry(cursor, message):
    import json
    return json.dumps({"__CURSOR": cursor, "MESSAGE": message, "_SYSTEMD_UNIT": "shop-worker-default.service",
                       "PRIORITY": "6", "__REALTIME_TIMESTAMP": "1700000000000000"})


def test_the_follow_script_prints_each_change_once_until_the_unit_ends(tmp_path):
    """The host side, run by bash with a fake systemctl: a line per change, then it ends."""
    import os
    import subprocess
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers = tmp_path / "answers"
    answers.write_text("active\nactive\nactive\ninactive\n")
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\nhead -1 {answers}; sed -i 1d {answers}\n")
    (bin_dir / "systemctl").chmod(0o755)
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    (bin_dir / "sleep").chmod(0o755)
    path = tmp_path / "cutover.json"
    path.write_text("{}")
    out = subprocess.run(["bash", "-c", follow._follow_script("u", str(path))], capture_output=True, text=True,
                         env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), timeout=30).stdout
    assert out.splitlines() == ["active {}", "inactive {}"]


def fake_host(tmp_path, systemctl_answers: str):
    """A bin directory with a fake systemctl (one answer per call, the last one repeated), a
    no-op sleep, and a journalctl that records its words and pid, prints one entry and waits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers = tmp_path / "answers"
    answers.write_text(systemctl_answers)
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\nhead -1 {answers}\n"
                                       f"[ $(wc -l < {answers}) -gt 1 ] && sed -i 1d {answers}\nexit 0\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    (bin_dir / "journalctl").write_text(f"#!/bin/sh\necho \"$*\" > {tmp_path}/words; echo $$ > {tmp_path}/pid\n"
                                        "echo '{\"__CURSOR\": \"c1\", \"MESSAGE\": \"ready\"}'\nexec /bin/sleep 60\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def gone(pid: int) -> bool:
    import os
    import time
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_the_follow_script_streams_the_journal_on_stderr_and_stops_it_with_the_loop(tmp_path):
    import os
    import subprocess
    bin_dir = fake_host(tmp_path, "active\nactive\ninactive\n")
    path = tmp_path / "cutover.json"
    path.write_text("{}")
    script = follow._follow_script("u", str(path), journal.journalctl(["a.service"]))
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), timeout=30)
    assert done.returncode == 0 and done.stdout.splitlines() == ["active {}", "inactive {}"]
    assert journal.parse_line("h", done.stderr.splitlines()[0]).message == "ready"
    assert "--since @" in (tmp_path / "words").read_text()  # the host's clock, a second back
    assert gone(int((tmp_path / "pid").read_text()))  # journalctl ends with the loop


def test_the_follow_scripts_journal_ends_when_the_reader_goes_away(tmp_path):
    """The laptop is gone: the loop's next line finds no reader, and journalctl is stopped with it."""
    import os
    import subprocess
    bin_dir = fake_host(tmp_path, "active\n")
    path = tmp_path / "cutover.json"
    path.write_text("{}")
    script = follow._follow_script("u", str(path), journal.journalctl(["a.service"], after_cursor="c0"))
    loop = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + script], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert loop.stdout.readline() == b"active {}\n"
    for _ in range(50):
        if (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip():
            break
        subprocess.run(["/bin/sleep", "0.1"])
    loop.stdout.close()
    assert loop.wait(timeout=30) != 0
    assert "--after-cursor c0" in (tmp_path / "words").read_text()
    assert gone(int((tmp_path / "pid").read_text()))


def launch_guard(tmp_path, systemctl: str, holder: dict | None):
    """Run the launch script with bash against a fake `systemctl` (its body: `systemctl`) and a fake
    `systemd-run` that only records it ran; the lock holder file as given."""
    import json
    import os
    import subprocess
    import sys

    from .samples import STAGE
    stage = stage_of(STAGE.replace('celery_app = "shop"', f'celery_app = "shop"\ndeploy_to = "{tmp_path}"\n'
                                   f'python = "{sys.executable}"'))
    state_dir = tmp_path / ".deploy-kit"
    if holder is not None:
        (state_dir / "lock").mkdir(parents=True)
        (state_dir / "lock" / "holder.json").write_text(json.dumps(holder))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "started"
    for name, body in (("systemctl", systemctl), ("systemd-run", f"touch {started}")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    params = dict(plan.cutover_params(stage, stage.host("web2"), NEW, OLD, Mode.DEPLOY, "run1"),
                  state_file=str(state_dir / "cutover.json"))
    script = follow._launch_script(params, "shop-cutover-run1", "shop", sys.executable, str(state_dir),
                                   plan.lock_guard(stage, "t0k3n"))
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), timeout=30)
    return done, started.exists()


def test_the_launch_guard_starts_the_cutover_when_none_runs_and_the_lock_is_this_runs(tmp_path):
    done, started = launch_guard(tmp_path, "exit 0", {"token": "t0k3n"})
    assert done.returncode == 0 and started, done.stderr


def test_the_launch_guard_refuses_while_another_cutover_runs(tmp_path):
    done, started = launch_guard(tmp_path, "echo 'shop-cutover-20261124 loaded active running deploy-kit cutover'",
                                 {"token": "t0k3n"})
    assert (done.returncode, started) == (3, False)
    assert done.stderr.startswith(follow.REFUSED) and "shop-cutover-20261124)" in done.stderr


def test_the_launch_guard_refuses_when_systemd_cannot_list_the_cutovers(tmp_path):
    done, started = launch_guard(tmp_path, "echo 'Failed to connect to bus' >&2; exit 1", {"token": "t0k3n"})
    assert (done.returncode, started) == (3, False)
    assert done.stderr.splitlines()[-1].startswith(follow.REFUSED) and "could not list" in done.stderr


def test_the_launch_guard_refuses_when_the_lock_is_no_longer_this_runs(tmp_path):
    for holder in ({"token": "another-run"}, None):  # taken by another run; broken by `fab unlock`
        done, started = launch_guard(tmp_path, "exit 0", holder)
        assert (done.returncode, started) == (plan.LOCK_LOST, False)
        assert done.stderr.startswith("lock lost:") and not (tmp_path / ".deploy-kit" / "cutover-run.py").exists()
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()


def test_the_budget_covers_every_named_wait_of_the_cutover_both_ways():
    """The control machine never calls a cutover UNKNOWN while the cutover is still within its own
    timeouts (`contracts`, used by `remote/cutover.py`): the forward pass and the way back, each
    wait at its longest, for Beat, one worker and several with several queues."""
    from deploy_kit.remote import contracts as c

    stage = stage_of(ONE_HOST)  # web1's cutover reads the queue summary too
    for phase in ("workers", "beat"):
        params = plan.cutover_params(stage, stage.host("web1"), "new", "old", Mode.DEPLOY, "r1", phase, report=True)
        for workers in (params["workers"], [], params["workers"] * 3):
            for queues in (["a"], ["a", "b", "c"]):
                p = dict(params, workers=[dict(w, queues=queues) for w in workers])
                n, q = len(p["workers"]), len(p["workers"]) * len(queues)
                verify, watch, stop = p["verify"]["timeout"], p["watch"], p["stop_timeout"]
                start = n * (stop + c.STOP_MARGIN) + n * c.SYSTEMCTL * 4  # the olds, a drain, start, show
                greet = verify + c.AGENT_START
                tasks = n * (verify + c.VERIFY_MARGIN)
                join = n * (c.SYSTEMCTL + c.SYNC_REVOKED) + q * c.REMOTE_CONTROL  # the olds, their revoked ids
                retire = q * c.REMOTE_CONTROL_QUICK + n * (3 * c.SYSTEMCTL + c.HANDOFF + 2 * c.REMOTE_CONTROL_QUICK) \
                    + (c.REPORT if p["report"] else 0)
                beat = c.SYSTEMCTL + stop + 2 * verify + watch + c.BEAT_SETTLE  # stop_timeout: Beat's own
                forward = start + greet + tasks + join + watch + 2 * n * c.SYSTEMCTL + retire + c.SYSTEMCTL + beat
                give_back = (q * c.REMOTE_CONTROL_QUICK + n * (c.STOP_MARGIN + 5 * c.SYSTEMCTL + c.REMOTE_CONTROL_QUICK)
                             + c.RESTORE + c.AGENT_CLOSE)
                back = c.SYSTEMCTL + give_back + beat
                assert follow.budget(p) >= forward + back, (phase, n, queues)

    assert c.RESTORE == c.RESTORE_WAIT + c.RESTORE_SETTLE + c.REMOTE_CONTROL


def test_a_running_steps_progress_note_is_said_once_and_its_end_as_usual():
    """The start of an instance that still drains can wait minutes: its note is said as it runs."""
    from deploy_kit.remote.contracts import Step

    said = []
    run = types.SimpleNamespace(outcome=Outcome(), say=lambda h, m: said.append(m))
    progress = follow.Progress(run, "web2", CutoverState(id="run1", mode=Mode.ROLLBACK, target=OLD, previous=NEW))
    waiting = CutoverState(id="run1", mode=Mode.ROLLBACK, target=OLD, previous=NEW,
                           steps=[Step("start", 1.0, detail="w@x.service is still draining")])
    for _ in range(3):  # the host repeats its state every 5 s
        progress.feed(f"active {waiting.to_json()}")
    waiting.steps[0].ok, waiting.steps[0].ended, waiting.steps[0].detail = True, 2.0, "started w@x.service"
    progress.feed(f"active {waiting.to_json()}")
    assert said == ["start: w@x.service is still draining", "start: ok started w@x.service"]


def test_a_journalctl_that_cannot_follow_is_said_and_the_following_goes_on():
    said = []
    run = types.SimpleNamespace(outcome=Outcome(), say=lambda h, m: said.append((h, m)))
    progress = follow.Progress(run, "web2", CutoverState(id="run1", mode=Mode.DEPLOY, target=NEW, previous=OLD),
                               watched=["shop-worker-default@*.service"])
    assert progress.journal("journalctl: unrecognized option '--output-fields'\n")
    assert said == [("web2", "the units' journal cannot be followed from here (journalctl: unrecognized option "
                              "'--output-fields'); on the host, `journalctl -u UNIT` shows it")]
    assert not progress.journal("bash: some other complaint") and len(said) == 1  # kept in the channel's stderr
    assert progress.journal("journalctl: unrecognized option '--output-fields'") and len(said) == 1  # a reconnect
