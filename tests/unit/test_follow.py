"""How the control machine reads a host's cutover (`follow.py`): a lost launch is UNKNOWN, never
"not started"; a state file of another run is never taken for this one's; a refused launch is."""

import contextlib
import types

from deploy_kit import follow, plan
from deploy_kit.errors import HostError, RemoteCommandError
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode
from deploy_kit.runner import Outcome

from .samples import stage_of

NEW, OLD = "2026-11-24-123000", "2026-11-24-120000"


class Remote:
    """Answers the launch with `launch` (an exception, or the lines the host prints as it follows)
    and each later reading with the next of `polls` (lines of `ACTIVE STATE-JSON`)."""

    name = "web2"

    def __init__(self, launch=(), polls=()):
        self.launch, self.polls = launch, list(polls)

    def run_script(self, script, *, on_line=None, **kwargs):
        if kwargs.get("what") == "starting the cutover":
            if isinstance(self.launch, Exception):
                raise self.launch
            lines = self.launch
        else:
            lines = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        for line in lines:
            on_line(line)
        return types.SimpleNamespace(stdout="")


def follow_with(remote, monkeypatch):
    stage = stage_of()
    monkeypatch.setattr(follow.journal, "Tail", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(follow.time, "sleep", lambda s: None)
    said = []
    session = types.SimpleNamespace(remote=lambda name: remote, reconnect=lambda name: None)
    run = types.SimpleNamespace(stage=stage, session=session, outcome=Outcome(), say=lambda h, m: said.append(m))
    action = plan.Cutover(plan.cutover_params(stage, stage.host("web2"), NEW, OLD, Mode.DEPLOY, "run1"), "web2")
    return follow.cutover(run, remote, action), said


def state(run_id, status):
    return CutoverState(id=run_id, mode=Mode.DEPLOY, target=NEW, previous=OLD, status=status).to_json()


def test_a_launch_whose_answer_is_lost_is_unknown_not_not_started(monkeypatch):
    found, _ = follow_with(Remote(launch=HostError("web2", "the SSH connection failed: reset")), monkeypatch)
    assert found.status == CutoverStatus.UNKNOWN and "may have started" in found.rollback_failure


def test_a_launch_refused_because_another_cutover_runs_is_not_started(monkeypatch):
    refused = RemoteCommandError("web2", "starting the cutover", 3, "another cutover of shop is still running")
    found, _ = follow_with(Remote(launch=refused), monkeypatch)
    assert found.status == CutoverStatus.NOT_STARTED and "another cutover" in found.failure


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
        def run_script(self, script, *, on_line=None, **kwargs):
            if kwargs.get("what") == "starting the cutover":
                on_line(f"active {state('run1', CutoverStatus.RUNNING)}")
                raise HostError("web2", "the SSH connection failed: reset")
            return super().run_script(script, on_line=on_line, **kwargs)

    found, said = follow_with(Dropping(polls=[[f"inactive {state('run1', CutoverStatus.DONE)}"]]), monkeypatch)
    assert found.status == CutoverStatus.DONE
    assert any("lost the connection" in m for m in said) and any("connection back" in m for m in said)


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
