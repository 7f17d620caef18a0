"""The cutover program (`remote/cutover.py`) against a fake systemctl and a fake Celery agent:
what it asks of systemd and Celery, and where each failure leaves the host (no host needed)."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from deploy_kit import plan
from deploy_kit.remote import cutover, hostprobe
from deploy_kit.remote.celery_agent import StepFailed
from deploy_kit.remote.contracts import LIVE_LOG, UNREAD, CutoverState, CutoverStatus, LiveEvent, Mode

from .samples import STAGE, stage_of

OLD, NEW = "2026-11-24-120000", "2026-11-24-123000"
UNIT = "shop-worker-default@{}.service"


class FakeSystemd:
    """Just enough of systemctl: units with a state, and every command that was run."""

    def __init__(self, running: dict[str, str]):
        self.units = {name: {"ActiveState": state, "SubState": "running", "NRestarts": "0", "MainPID": "42"}
                      for name, state in running.items()}
        self.calls: list[list[str]] = []
        self.crash_on_start: set[str] = set()  # units that crash as they start
        self.refuse_start: set[str] = set()  # units whose start job fails

    def __call__(self, argv, timeout=60):
        self.calls.append(argv)
        out, code = "", 0
        if argv[0] == "systemctl":
            verb, args = argv[1], [a for a in argv[2:] if not a.startswith("-")]
            if verb == "start" and self.refuse_start & set(args):
                return subprocess.CompletedProcess(argv, 1, "", "Job failed")
            if verb == "start":
                for name in args:
                    self.units[name] = {"ActiveState": "active", "SubState": "running", "NRestarts": "0",
                                        "MainPID": "99"}
                    if name in self.crash_on_start:
                        self.crash(name)
            elif verb in ("stop", "kill"):
                for name in args:
                    self.units.setdefault(name, {})["ActiveState"] = "inactive"
            elif verb == "show":
                info = self.units.get(args[0], {"ActiveState": "inactive"})
                out = "".join(f"{k}={v}\n" for k, v in info.items())
            elif verb == "list-units":
                out = "".join(f"{n} loaded {i['ActiveState']} running x\n" for n, i in self.units.items()
                              if any(n.startswith(p.split("*")[0].split("@")[0]) for p in args))
        return subprocess.CompletedProcess(argv, code, out, "")

    def crash(self, name: str) -> None:
        self.units[name].update(ActiveState="activating", SubState="auto-restart", NRestarts="1")

    def verbs(self) -> list[str]:
        return [" ".join(a for a in c[1:]) for c in self.calls if c[0] == "systemctl" and c[1] not in
                ("show", "list-units")]


class FakeAgent:
    """The Celery agent: answers each request as the test says."""

    fail: dict[str, str] = {}
    answers: dict[str, str] = {"queues": "celery"}  # what an op answers ("ok" when not named)
    requests: list[dict] = []
    on_request = None

    def __init__(self, params, release):
        self.release = release

    def ask(self, request, timeout, alive=lambda: ""):
        FakeAgent.requests.append(request or {"op": "hello"})
        if FakeAgent.on_request:
            FakeAgent.on_request(request or {"op": "hello"})
        op = (request or {}).get("op", "hello")
        reason = alive()
        if reason:
            raise StepFailed(reason)
        if op in FakeAgent.fail:
            raise StepFailed(FakeAgent.fail[op])
        return FakeAgent.answers.get(op, "ok")

    def close(self):
        pass


@pytest.fixture
def host(tmp_path, monkeypatch):
    stage = stage_of()
    releases = tmp_path / "releases"
    for name in (OLD, NEW):
        (releases / name).mkdir(parents=True)
    os.symlink(f"releases/{OLD}", tmp_path / "current")
    FakeAgent.fail, FakeAgent.requests, FakeAgent.on_request = {}, [], None
    FakeAgent.answers = {"queues": "celery"}
    monkeypatch.setattr(cutover, "Agent", FakeAgent)
    monkeypatch.setattr(cutover.time, "sleep", lambda s: None)

    def params(mode=Mode.DEPLOY, target=NEW, previous=OLD, phase="workers", watch=0.0):
        p = plan.cutover_params(stage, stage.host("web2"), target, previous, mode, "run1", phase)
        p.update(releases_dir=str(releases), current=str(tmp_path / "current"), watch=watch,
                 state_file=str(tmp_path / "cutover.json"), run_dir=str(tmp_path / "run"))
        return p

    return tmp_path, params


def run_program(monkeypatch, systemd, params) -> CutoverState:
    monkeypatch.setattr(cutover, "run", systemd)
    code = cutover.Cutover(params).run()
    with open(params["state_file"]) as handle:
        state = CutoverState.from_json(handle.read())
    assert code == (0 if state.status == CutoverStatus.DONE else 1)
    return state


def test_a_handover_proves_the_new_worker_before_the_old_one_drains(host, monkeypatch):
    tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    narrowed = []
    FakeAgent.on_request = lambda r: narrowed.append(os.path.exists(tmp / "run" / f"default@{NEW}.env"))
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.DONE and state.live == NEW
    assert [s.name for s in state.steps] == ["start", "verify", "join", "watch", "retire", "switch"]
    ops = [r["op"] for r in FakeAgent.requests]
    assert ops[:2] == ["hello", "verify"] and ops.index("add_consumer") < ops.index("cancel_consumer")
    assert narrowed[1] is True and narrowed[-1] is False  # private queue only until it joined
    assert os.readlink(tmp / "current") == f"releases/{NEW}"
    verbs = systemd.verbs()
    assert verbs.index(f"start {UNIT.format(NEW)}") < verbs.index(f"stop --no-block {UNIT.format(OLD)}")
    assert f"disable --quiet {UNIT.format(OLD)}" in verbs and f"enable --quiet {UNIT.format(NEW)}" in verbs
    assert not any(v.startswith("kill") for v in verbs)


def test_a_handover_starts_without_mingle_and_syncs_the_revoked_ids_of_the_old_node_before_it_joins(host, monkeypatch):
    tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    handover_file = tmp / "run" / f"default@{NEW}.env"
    seen = []
    FakeAgent.on_request = lambda r: seen.append(handover_file.read_text() if handover_file.exists() else "")
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.DONE
    assert "DEPLOY_KIT_HANDOVER_OPTIONS=--without-mingle\n" in seen[0]  # this start only: the file goes at the join
    ops = [r["op"] for r in FakeAgent.requests]
    assert ops.index("sync_revoked") < ops.index("add_consumer")  # before its first user task
    sync = next(r for r in FakeAgent.requests if r["op"] == "sync_revoked")
    assert sync["olds"] == [f"default.{OLD}@{cutover.socket.gethostname()}"]
    assert sync["node"] == f"default.{NEW}@{cutover.socket.gethostname()}" and sync["everyone"]


def test_an_instance_started_without_mingle_whose_old_one_is_gone_at_the_join_asks_every_node(host, monkeypatch):
    _tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.on_request = lambda r: systemd.units[UNIT.format(OLD)].update(ActiveState="inactive") \
        if r["op"] == "verify" else None  # it crashed, or was stopped by hand
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.DONE
    sync = next(r for r in FakeAgent.requests if r["op"] == "sync_revoked")
    assert sync["olds"] == [] and sync["everyone"]


def test_a_crash_in_the_join_fails_it_and_the_instance_stops_warm(host, monkeypatch):
    """A crash once it may have taken user tasks: it comes back without the synced ids, so the join
    fails; it stops warm and what it held returns, as after a crash in the watch."""
    _tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.on_request = lambda r: systemd.crash(UNIT.format(NEW)) if r["op"] == "add_consumer" else None
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.ROLLED_BACK and "crashed" in state.failure
    assert not next(s for s in state.steps if s.name == "join").ok
    assert "watch" not in [s.name for s in state.steps] and "restore_stranded" in [r["op"] for r in FakeAgent.requests]
    assert f"stop --no-block {UNIT.format(NEW)}" in systemd.verbs()  # warm: it may hold user tasks


@pytest.mark.parametrize("case", ["no older instance", "mingle = false", "handover = false"])
def test_a_start_with_nothing_to_sync_from_keeps_mingle_as_configured(host, monkeypatch, case):
    tmp, params = host
    p = params()
    p["workers"][0].update({"mingle = false": {"mingle": False}, "handover = false": {"handover": False}}.get(case, {}))
    systemd = FakeSystemd({} if case == "no older instance" else {UNIT.format(OLD): "active"})
    handover_file, seen = tmp / "run" / f"default@{NEW}.env", []
    FakeAgent.on_request = lambda r: seen.append(handover_file.read_text() if handover_file.exists() else "")
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE
    assert "DEPLOY_KIT_HANDOVER_OPTIONS" not in seen[0]
    synced = [r for r in FakeAgent.requests if r["op"] == "sync_revoked"]
    assert bool(synced) == (case == "mingle = false")  # the old node's ids are worth having all the same


def test_a_step_of_the_wall_clock_neither_shortens_the_watch_nor_shows_in_the_step_times(host, monkeypatch):
    """NTP steps the clock, or a paused VM resumes: every wait on the host runs on the monotonic
    clock, so the new worker is still watched for the whole watch, and each step's time is its own."""
    _tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    mono, wall = [0.0], [1000.0]
    monkeypatch.setattr(cutover.time, "monotonic", lambda: mono[0])
    monkeypatch.setattr(cutover.time, "time", lambda: wall.__setitem__(0, wall[0] + 3600) or wall[0])  # jumps
    monkeypatch.setattr(cutover.time, "sleep", lambda s: mono.__setitem__(0, mono[0] + s))
    state = run_program(monkeypatch, systemd, params(watch=3.0))
    assert state.status == CutoverStatus.DONE, state.failure
    watch = next(s for s in state.steps if s.name == "watch")
    assert watch.seconds == 3.0 and "ran 3.0s" in watch.detail
    assert all(s.seconds <= 3.0 for s in state.steps)
    checks = [c for c in systemd.calls if c[1:2] == ["show"] and UNIT.format(NEW) in c]
    assert len(checks) >= 10  # a reading every 0.3 s, and one at the end


class FailingSystemd(FakeSystemd):
    """A systemctl whose VERB of the units named fails."""

    def __init__(self, running, verb, units):
        super().__init__(running)
        self.verb, self.failing = verb, set(units)

    def __call__(self, argv, timeout=60):
        if argv[0] == "systemctl" and argv[1] == self.verb and self.failing & set(argv[2:]):
            self.calls.append(argv)
            return subprocess.CompletedProcess(argv, 1, "", f"Failed to {self.verb} unit")
        return super().__call__(argv, timeout)


def test_a_retire_that_fails_after_the_cancel_has_the_old_worker_consume_again(host, monkeypatch):
    """Told to stop consuming, then the retire fails before its warm shutdown began: the old
    instance takes its queues again (remote control), so the release it runs still serves."""
    _tmp, params = host
    systemd = FailingSystemd({UNIT.format(OLD): "active"}, "disable", [UNIT.format(OLD)])
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.ROLLED_BACK and state.live == OLD, state.rollback_failure
    old_node = f"default.{OLD}@{os.uname().nodename}"
    asked = [(r["op"], r.get("node")) for r in FakeAgent.requests]
    assert asked.index(("cancel_consumer", old_node)) < asked.index(("add_consumer", old_node))
    assert not any(v.startswith("stop") and UNIT.format(OLD) in v for v in systemd.verbs())
    assert f"consuming again: {UNIT.format(OLD)}" in state.steps[-2].detail

    def no_answer_for_the_old_node(request):
        if request.get("op") == "add_consumer" and request.get("node") == old_node:
            raise StepFailed("no answer within 30s")

    FakeAgent.requests.clear()  # an agent that cannot: a restart (warm shutdown, then a fresh start)
    FakeAgent.on_request = no_answer_for_the_old_node
    systemd = FailingSystemd({UNIT.format(OLD): "active"}, "disable", [UNIT.format(OLD)])
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.ROLLED_BACK and f"{UNIT.format(OLD)} (restarted)" in state.steps[-2].detail
    assert f"restart --no-block {UNIT.format(OLD)}" in systemd.verbs()


def test_giving_back_starts_every_old_instance_even_when_one_cannot_be_enabled(host, monkeypatch):
    _tmp, params = host
    systemd = FailingSystemd({UNIT.format(OLD): "active", "shop-worker-default.service": "active"}, "enable",
                             ["shop-worker-default.service"])
    program = cutover.Cutover(params())
    monkeypatch.setattr(cutover, "run", systemd)
    worker = program.p["workers"][0]
    program.retired = [(worker, "shop-worker-default.service"), (worker, UNIT.format(OLD))]
    with pytest.raises(StepFailed, match="enable"):
        program.give_back()
    verbs = systemd.verbs()
    assert "start --no-block shop-worker-default.service" in verbs and f"start --no-block {UNIT.format(OLD)}" in verbs


def test_a_failed_verification_kills_the_new_worker_at_once_and_leaves_the_old_serving(host, monkeypatch):
    tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.fail = {"verify": "no worker completed the task in time"}
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.ROLLED_BACK and state.live == OLD
    assert "no worker completed" in state.failure
    verbs = systemd.verbs()
    assert f"kill --signal=SIGKILL {UNIT.format(NEW)}" in verbs  # it held no user task
    assert not any(UNIT.format(OLD) in v for v in verbs)  # the old one was never touched
    assert os.readlink(tmp / "current") == f"releases/{OLD}"
    assert (tmp / "releases" / NEW / ".deploy-kit" / "BAD").exists()
    assert {"op": "discard_queue", "queue": f"deploy-kit.shop.prod.default.{NEW}@{os.uname().nodename}"} \
        in FakeAgent.requests


def test_a_crash_during_the_watch_hands_back_and_returns_what_it_held(host, monkeypatch):
    tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.on_request = lambda r: systemd.crash(UNIT.format(NEW)) if r["op"] == "add_consumer" else None
    state = run_program(monkeypatch, systemd, params(watch=1.0))
    assert state.status == CutoverStatus.ROLLED_BACK and "crashed" in state.failure
    ops = [r["op"] for r in FakeAgent.requests]
    assert "cancel_consumer" in ops and "restore_stranded" in ops
    verbs = systemd.verbs()
    assert f"stop --no-block {UNIT.format(NEW)}" in verbs  # warm: it may hold user tasks
    assert not any(v.startswith(("stop", "disable")) and UNIT.format(OLD) in v for v in verbs)


def test_a_failed_rollback_falls_back_to_the_release_it_ran(host, monkeypatch):
    tmp, params = host
    os.unlink(tmp / "current")
    os.symlink(f"releases/{NEW}", tmp / "current")
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    FakeAgent.fail = {"verify": "no worker completed the task in time"}
    state = run_program(monkeypatch, systemd, params(Mode.ROLLBACK, target=OLD, previous=NEW))
    assert state.status == CutoverStatus.FELL_BACK and state.live == NEW
    assert not (tmp / "releases" / OLD / ".deploy-kit" / "BAD").exists()  # a rollback marks nothing bad


def test_beat_moves_with_current_and_goes_back_when_it_fails(host, monkeypatch):
    tmp, params = host
    systemd = FakeSystemd({"shop-beat.service": "active"})
    monkeypatch.setattr(cutover.Cutover, "wait_beat", lambda self, release: (_ for _ in ()).throw(
        StepFailed("Beat does not run")) if release == NEW else "ok")
    state = run_program(monkeypatch, systemd, params(phase="beat"))
    assert state.status == CutoverStatus.ROLLED_BACK
    assert [s.name for s in state.steps][:3] == ["switch", "restart beat", "wait for beat"]
    assert os.readlink(tmp / "current") == f"releases/{OLD}"
    assert systemd.verbs().count("restart --no-block shop-beat.service") == 2


def test_a_beat_that_does_not_stop_is_given_up_within_its_stop_timeout(host, monkeypatch):
    """Without a broker the old Beat may not stop before systemd kills it: the restart is queued,
    and waiting for it is bounded by Beat's stop timeout plus the verification timeout."""
    tmp, params = host
    systemd = FakeSystemd({"shop-beat.service": "active"})
    clock = [1000.0]
    monkeypatch.setattr(cutover.time, "time", lambda: clock[0])
    monkeypatch.setattr(cutover.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cutover.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    real = systemd.__call__

    def stuck(argv, timeout=60):
        done = real(argv, timeout)
        if argv[:2] == ["systemctl", "restart"]:
            systemd.units["shop-beat.service"].update(ActiveState="deactivating", SubState="stop-sigterm")
        return done

    p = params(phase="beat")
    state = run_program(monkeypatch, stuck, p)
    bound = p["stop_timeout"] + p["verify"]["timeout"]
    assert state.status == CutoverStatus.ROLLBACK_FAILED
    assert f"after {bound:.0f}s" in state.failure and "deactivating/stop-sigterm" in state.failure
    waits = [s for s in state.steps if s.name.startswith("wait for beat")]
    assert len(waits) == 2 and all(bound <= s.ended - s.started < bound + 5 for s in waits)
    assert os.readlink(tmp / "current") == f"releases/{OLD}"  # the way back still moved `current`


def test_the_state_file_is_this_runs_and_typed(host, monkeypatch):
    tmp, params = host
    state = run_program(monkeypatch, FakeSystemd({}), params())
    data = json.loads((tmp / "cutover.json").read_text())
    assert data["id"] == "run1" and data["status"] == "done" and data["mode"] == "deploy"
    assert state.steps[0].ok is True and state.steps[0].ended >= state.steps[0].started


def test_steps_describe_what_the_program_runs(host, monkeypatch):
    _tmp, params = host
    described = plan.handover_lines(params(), "web2")
    assert [name for name, _ in described] == ["start", "verify", "join", "watch", "retire", "switch", "on failure"]
    assert f"deploy-kit.shop.prod.default.{NEW}@web2" in " ".join(d for _, d in described)
    ran = run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), params())
    assert [s.name for s in ran.steps] == [name for name, _ in described[:-1]]  # --plan shows what runs


def hand_back(params, watch=0.0):
    """A failed deploy's way back on a host whose workers took over: NEW runs, OLD drained."""
    p = params(Mode.ROLLBACK, target=OLD, previous=NEW, watch=watch)
    p["hand_back"] = True
    return p


def on_new(tmp):
    os.unlink(tmp / "current")
    os.symlink(f"releases/{NEW}", tmp / "current")


def test_a_hand_back_without_a_broker_still_puts_the_release_the_host_ran_back(host, monkeypatch):
    """The broker stopped after this host's workers took over and another host failed: no proof
    and no remote control can work, yet the host must end on the release it ran (CI once ended
    split: this host's way back verified, failed, and stayed on the failed release)."""
    tmp, params = host
    on_new(tmp)
    (tmp / "run").mkdir()
    (tmp / "run" / f"default@{OLD}.env").write_text("DEPLOY_KIT_QUEUES=stale\n")
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    down = "Error 111 connecting to 10.0.0.1:6379. Connection refused."
    FakeAgent.fail = {op: down for op in ("hello", "verify", "add_consumer", "cancel_consumer", "handoff",
                                          "discard_queue", "report", "restore_stranded")}
    p = hand_back(params)
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE and state.live == OLD, state.failure
    described = plan.handover_lines(p, "web2")
    assert [s.name for s in state.steps] == [name for name, _ in described[:-1]] == \
        ["start", "confirm", "watch", "retire", "switch"]  # --plan shows what runs
    assert not (tmp / "run" / f"default@{OLD}.env").exists()  # the real queues from its start
    verbs = systemd.verbs()
    assert verbs.index(f"start {UNIT.format(OLD)}") < verbs.index(f"stop --no-block {UNIT.format(NEW)}")
    assert f"enable --quiet {UNIT.format(OLD)}" in verbs and f"disable --quiet {UNIT.format(NEW)}" in verbs
    assert "not confirmed (Error 111" in state.steps[1].detail
    assert "not told to stop consuming first (Error 111" in state.steps[3].detail
    assert [r["op"] for r in FakeAgent.requests] == ["hello"]  # nothing more asked of an agent that ended
    assert os.readlink(tmp / "current") == f"releases/{OLD}"


def test_a_hand_back_with_a_broker_confirms_its_instances_consume_then_retires_the_failed_release(host, monkeypatch):
    tmp, params = host
    on_new(tmp)
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    state = run_program(monkeypatch, systemd, hand_back(params))
    assert state.status == CutoverStatus.DONE and state.live == OLD, state.failure
    assert state.steps[1].detail == f"consuming again: default.{OLD}@{os.uname().nodename}"
    ops = [r["op"] for r in FakeAgent.requests]
    assert ops[:2] == ["hello", "queues"] and ops.index("queues") < ops.index("cancel_consumer") < ops.index("handoff")
    assert "verify" not in ops and "add_consumer" not in ops


def test_a_hand_back_whose_instance_does_not_consume_fails_and_the_failed_release_serves_on(host, monkeypatch):
    tmp, params = host
    on_new(tmp)
    clock = [1000.0]
    monkeypatch.setattr(cutover.time, "time", lambda: clock[0])
    monkeypatch.setattr(cutover.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cutover.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    FakeAgent.answers = {"queues": "other"}
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    p = hand_back(params)
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.FELL_BACK and state.live == NEW and state.hand_back  # said as such
    assert f"does not consume celery after {p['verify']['timeout']:.0f}s" in state.failure
    verbs = systemd.verbs()
    assert f"stop --no-block {UNIT.format(OLD)}" in verbs and not any(UNIT.format(NEW) in v for v in verbs)


def test_a_hand_back_whose_start_fails_leaves_the_failed_release_serving(host, monkeypatch):
    tmp, params = host
    on_new(tmp)
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    systemd.refuse_start.add(UNIT.format(OLD))
    state = run_program(monkeypatch, systemd, hand_back(params))
    assert state.status == CutoverStatus.FELL_BACK and "Job failed" in state.failure and state.live == NEW
    verbs = systemd.verbs()
    assert f"stop --no-block {UNIT.format(OLD)}" in verbs  # warm: it may have taken a task
    assert not any(UNIT.format(NEW) in v for v in verbs)


def test_a_hand_back_of_a_restart_in_place_worker_stops_the_failed_release_first(host, monkeypatch):
    tmp, params = host
    on_new(tmp)
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    p = hand_back(params)
    p["workers"][0]["handover"] = False
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE and state.live == OLD, state.failure
    verbs = systemd.verbs()
    assert verbs.index(f"stop {UNIT.format(NEW)}") < verbs.index(f"start {UNIT.format(OLD)}")  # the queue waits
    assert f"stop --no-block {UNIT.format(NEW)}" not in verbs and f"disable --quiet {UNIT.format(NEW)}" in verbs
    assert "stopped at the start already" in dict(plan.handover_lines(p))["retire"]


def test_a_hand_back_to_an_instance_still_draining_waits_for_its_drain(host, monkeypatch):
    tmp, params = host
    on_new(tmp)
    systemd = DrainingSystemd({UNIT.format(NEW): "active"}, UNIT.format(OLD), polls=5)
    p = hand_back(params)
    systemd.run_dir = p["run_dir"]
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE and state.live == OLD, state.failure
    assert systemd.narrowed_at_start == [False]  # the real queues at once
    assert systemd.verbs().count(f"start {UNIT.format(OLD)}") == 1


def test_a_hand_back_whose_instance_crashes_stops_it_warm_and_leaves_the_host_as_it_was(host, monkeypatch):
    tmp, params = host
    on_new(tmp)
    systemd = FakeSystemd({UNIT.format(NEW): "active"})
    systemd.crash_on_start.add(UNIT.format(OLD))
    state = run_program(monkeypatch, systemd, hand_back(params, watch=1.0))
    assert state.status == CutoverStatus.FELL_BACK and "crashed" in state.failure and state.live == NEW
    verbs = systemd.verbs()
    assert f"stop --no-block {UNIT.format(OLD)}" in verbs  # it took from the real queues: warm
    assert not any(v.startswith("kill") for v in verbs)
    assert not any(UNIT.format(NEW) in v for v in verbs)  # the instance that serves was never touched


def test_restart_in_place_stops_the_old_worker_first_and_starts_it_again_on_failure(host, monkeypatch):
    tmp, params = host
    p = params()
    p["workers"][0]["handover"] = False
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.fail = {"verify": "no worker completed the task in time"}
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.ROLLED_BACK
    verbs = systemd.verbs()
    assert verbs.index(f"stop {UNIT.format(OLD)}") < verbs.index(f"start {UNIT.format(NEW)}")  # the queue waits
    assert "add_consumer" not in [r["op"] for r in FakeAgent.requests]  # verified on its private queue only
    assert f"kill --signal=SIGKILL {UNIT.format(NEW)}" in verbs  # it held no user task: at once
    assert verbs[-2:] == [f"enable --quiet {UNIT.format(OLD)}", f"start --no-block {UNIT.format(OLD)}"]


def test_restart_in_place_leaves_no_older_instance_to_start_at_boot(host, monkeypatch):
    _tmp, params = host
    p = params()
    p["workers"][0]["handover"] = False
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE
    verbs = systemd.verbs()
    assert f"disable --quiet {UNIT.format(OLD)}" in verbs and f"enable --quiet {UNIT.format(NEW)}" in verbs
    assert {"op": "discard_queue", "queue": f"deploy-kit.shop.prod.default.{OLD}@{os.uname().nodename}"} \
        in FakeAgent.requests


def test_beat_that_stops_right_after_its_start_is_a_failure(host, monkeypatch):
    """Beat loads its scheduler after it started: a process that is gone within the watch fails."""
    _tmp, params = host
    systemd = FakeSystemd({"shop-beat.service": "active"})
    monkeypatch.setattr(cutover, "run", systemd)
    program = cutover.Cutover(params(phase="beat", watch=1.0))
    monkeypatch.setattr(program, "cpu_time", lambda pid: 1)
    ticks = iter(range(1000))
    monkeypatch.setattr(cutover.time, "monotonic", lambda: next(ticks) * 0.1)
    monkeypatch.setattr(cutover.time, "sleep", lambda s: systemd.crash("shop-beat.service"))
    with pytest.raises(StepFailed, match="stopped after it started"):
        program.watch_beat("shop-beat.service", "42", NEW)


def test_restart_in_place_joins_the_real_queues_only_once_verified(host, monkeypatch):
    tmp, params = host
    p = params()
    p["workers"][0]["handover"] = False
    narrowed = []
    FakeAgent.on_request = lambda r: narrowed.append((r["op"], os.path.exists(tmp / "run" / f"default@{NEW}.env")))
    state = run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), p)
    assert state.status == CutoverStatus.DONE
    assert ("verify", True) in narrowed and narrowed.index(("verify", True)) < \
        [op for op, _ in narrowed].index("add_consumer")


def live_log(tmp) -> list[LiveEvent]:
    path = tmp / LIVE_LOG
    return [LiveEvent.from_json(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_move_of_current_is_appended_to_the_live_log(host, monkeypatch):
    tmp, params = host
    run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), params())
    monkeypatch.setattr(cutover.Cutover, "wait_beat", lambda self, release: "ok")
    run_program(monkeypatch, FakeSystemd({"shop-beat.service": "active"}), params(phase="beat"))  # no move
    assert [(e.previous, e.release, e.mode, e.run) for e in live_log(tmp)] == [(OLD, NEW, "deploy", "run1")]
    hostprobe_events = hostprobe.live_log(str(tmp / LIVE_LOG))
    assert hostprobe_events == [asdict(e) for e in live_log(tmp)]


def test_a_switch_it_cannot_record_does_not_happen_while_nothing_else_moved(host, monkeypatch):
    """A host without workers (or Beat's phase): the switch is the first thing; unrecorded, it stops."""
    tmp, params = host
    (tmp / LIVE_LOG).mkdir()  # any write error: a full disk, a read-only file system
    state = run_program(monkeypatch, FakeSystemd({}), dict(params(), workers=[]))
    assert state.status == CutoverStatus.ROLLED_BACK and "cannot record the switch" in state.failure
    assert os.readlink(tmp / "current") == f"releases/{OLD}"


def test_once_the_old_workers_retired_the_switch_happens_even_unrecorded(host, monkeypatch):
    tmp, params = host
    (tmp / LIVE_LOG).mkdir()
    state = run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), params())
    assert state.status == CutoverStatus.DONE and os.readlink(tmp / "current") == f"releases/{NEW}"
    assert "not in the live log" in state.steps[-1].detail


def test_a_failure_after_the_retire_brings_the_old_workers_back_and_at_boot(host, monkeypatch):
    tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    monkeypatch.setattr(cutover.Cutover, "switch", lambda self, name, strict=True: (_ for _ in ()).throw(
        StepFailed("rename failed")) if name == NEW else "ok")
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.ROLLED_BACK
    verbs = systemd.verbs()
    assert verbs.index(f"disable --quiet {UNIT.format(OLD)}") < verbs.index(f"enable --quiet {UNIT.format(OLD)}")
    assert f"start --no-block {UNIT.format(OLD)}" in verbs and f"disable --quiet {UNIT.format(NEW)}" in verbs


def test_a_torn_line_never_merges_with_the_next(host, monkeypatch):
    tmp, params = host
    (tmp / LIVE_LOG).write_text('{"release": "2026-11-2')  # a crash in the middle of a write
    run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), params())
    assert [e["release"] for e in hostprobe.live_log(str(tmp / LIVE_LOG))] == [NEW]


def test_a_way_back_does_not_wait_for_the_live_log(host, monkeypatch):
    tmp, params = host
    monkeypatch.setattr(cutover.Cutover, "wait_beat", lambda self, release: (_ for _ in ()).throw(
        StepFailed("Beat does not run")) if release == NEW else "ok")
    real = cutover.Cutover.record_live

    def full_after_first(self, name, strict):  # the disk fills up after the switch forward
        real(self, name, strict)
        if (tmp / LIVE_LOG).is_file():
            (tmp / LIVE_LOG).unlink()
            (tmp / LIVE_LOG).mkdir()

    monkeypatch.setattr(cutover.Cutover, "record_live", full_after_first)
    state = run_program(monkeypatch, FakeSystemd({"shop-beat.service": "active"}), params(phase="beat"))
    assert state.status == CutoverStatus.ROLLED_BACK and os.readlink(tmp / "current") == f"releases/{OLD}"


def test_a_host_without_workers_only_moves_current(host, monkeypatch):
    """A host that only migrates: no unit is started or asked, `current` moves with the stage."""
    tmp, params = host
    p = dict(params(), workers=[])
    assert [name for name, _ in plan.handover_lines(p, "web3")] == ["switch"]
    systemd = FakeSystemd({})
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE and [s.name for s in state.steps] == ["switch"]
    assert systemd.verbs() == [] and FakeAgent.requests == []
    assert os.readlink(tmp / "current") == f"releases/{NEW}"


def test_a_host_without_units_that_fails_never_reads_the_whole_journal(host, monkeypatch):
    """journalctl with no -u is the whole host journal: a failed host without units reads none."""
    tmp, params = host
    p = dict(params(), workers=[])
    monkeypatch.setattr(cutover.Cutover, "switch", lambda self, name, strict=True: (_ for _ in ()).throw(
        StepFailed("cannot switch")) if name == NEW else "ok")
    systemd = FakeSystemd({})
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.ROLLED_BACK and state.journal == []
    journals = [c for c in systemd.calls if c[0] == "journalctl"]
    assert all("-u" in c for c in journals)  # never the whole journal (and here: not read at all)
    assert cutover.Cutover(p).journal() == []


def test_following_a_host_without_units_streams_no_journal():
    """journalctl with no -u shows the whole journal: a host without units follows none."""
    from deploy_kit import follow

    progress = follow.Progress(None, "web2", None, watched=[])
    assert "journalctl" not in progress.script("shop-cutover-r1", "/srv/shop/.deploy-kit/cutover.json")


def test_every_host_gets_a_cutover_step_even_one_without_workers():
    stage = stage_of(STAGE.replace('[stages.prod.app]', '[[stages.prod.hosts]]\nname = "db1"\naddress = "10.0.0.7"\n'
                                   'roles = ["migrate"]\n[stages.prod.app]').replace(
                                       'roles = ["worker", "beat", "migrate"]', 'roles = ["worker", "beat"]'))
    targets = {h.name: NEW for h in stage.hosts}
    steps = plan.cutover_steps(stage, targets, {h: OLD for h in targets}, Mode.DEPLOY, "r1")
    assert [s.host for s in steps] == ["web1", "web2", "db1"]
    assert steps[-1].action.params["workers"] == [] and stage.migrate_host.name == "db1"


def test_restart_in_place_is_watched_once_it_serves_alone(host, monkeypatch):
    """A restarted worker that crashes on its first real task: the old one is started again."""
    _tmp, params = host
    p = params(watch=1.0)
    p["workers"][0]["handover"] = False
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.on_request = lambda r: systemd.crash(UNIT.format(NEW)) if r["op"] == "add_consumer" else None
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.ROLLED_BACK and "crashed" in state.failure
    assert f"start --no-block {UNIT.format(OLD)}" in systemd.verbs()


def test_a_broker_gone_at_the_retire_still_switches_and_says_the_old_worker_was_not_told(host, monkeypatch):
    """The new worker was verified and watched; the broker then stops answering: the old worker
    cannot be told to stop consuming, its warm shutdown stops it, and the step says so."""
    tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.fail = {"cancel_consumer": "no answer within 15s", "discard_queue": "no answer within 15s"}
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.DONE and state.live == NEW
    retire = next(s for s in state.steps if s.name == "retire")
    assert retire.ok and f"{UNIT.format(OLD)} could not be told to stop consuming first (no answer" in retire.detail
    assert f"stop --no-block {UNIT.format(OLD)}" in systemd.verbs()


def test_the_stage_way_back_marks_bad_as_the_cutover_does_and_keeps_its_reason(host, monkeypatch):
    """One BAD mark (`hostlib.mark_bad`): the cutover's (with its failure) and the one the stage's
    way back writes through `remote/finish.py` on a host whose cutover succeeded hold the same keys."""
    from deploy_kit.remote import finish, hostlib

    tmp, params = host
    FakeAgent.fail = {"verify": "no worker completed the task in time"}
    run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), params())
    by_cutover = json.loads((tmp / "releases" / NEW / ".deploy-kit" / "BAD").read_text())
    assert "no worker completed" in by_cutover["reason"] and by_cutover["id"] == "run1"
    finish.finish({"mark_bad": {"release_dir": str(tmp / "releases" / NEW), "id": "r2", "reason": "handed back"}})
    assert json.loads((tmp / "releases" / NEW / ".deploy-kit" / "BAD").read_text()) == by_cutover  # first stays
    assert finish.finish({"mark_bad": {"release_dir": str(tmp / "releases" / OLD), "id": "r2",
                                       "reason": "handed back"}}) == []
    by_finish = json.loads((tmp / "releases" / OLD / ".deploy-kit" / "BAD").read_text())
    assert set(by_finish) == set(by_cutover) and by_finish["reason"] == "handed back"
    assert hostprobe.releases(str(tmp / "releases"))[0]["bad"]
    assert hostlib.mark_bad(str(tmp / "releases" / "gone"), "r2", "x") is False


class DrainingSystemd(FakeSystemd):
    """A unit still draining from an earlier handover (`deactivating`) for `polls` of its state.
    As systemd does, a start meanwhile is queued until the drain ends: `systemctl start` blocks
    past its timeout, and the queued job starts the unit later unless a stop replaces it."""

    def __init__(self, running: dict[str, str], draining: str, polls: int):
        super().__init__(running)
        self.units[draining] = {"ActiveState": "deactivating", "SubState": "stop-sigterm", "NRestarts": "0",
                                "MainPID": "42"}
        self.draining, self.polls, self.queued = draining, polls, False
        self.narrowed_at_start: list[bool] = []
        self.run_dir = ""

    def __call__(self, argv, timeout=60):
        args = [a for a in argv[2:] if not a.startswith("-")] if argv[0] == "systemctl" else []
        if self.draining in args and self.units[self.draining]["ActiveState"] == "deactivating":
            if argv[1] == "show":
                self.polls -= 1
                if self.polls < 0:
                    self.drained()
            elif argv[1] == "start":
                self.calls.append(argv)
                self.queued = True
                raise subprocess.TimeoutExpired(argv, timeout)
            elif argv[1] == "stop":
                self.queued = False  # a stop job replaces the queued start; the drain goes on
            elif argv[1] == "kill":
                raise AssertionError("killed a draining worker: its running user tasks die with it")
        if argv[:2] == ["systemctl", "start"] and self.draining in args:
            self.narrowed_at_start.append(os.path.exists(os.path.join(self.run_dir, f"default@{OLD}.env")))
        return super().__call__(argv, timeout)

    def drained(self) -> None:
        self.units[self.draining].update(ActiveState="inactive", SubState="dead")
        if self.queued:  # the queued start runs now, whether anyone still wants it or not
            self.narrowed_at_start.append(os.path.exists(os.path.join(self.run_dir, f"default@{OLD}.env")))
            super().__call__(["systemctl", "start", self.draining])


def test_a_rollback_to_an_instance_still_draining_waits_for_its_drain_then_hands_over(host, monkeypatch):
    """`fab rollback` right after a deploy: the old instance still finishes a long task. Its start
    waits for the drain (no start job queued behind it), then the handover goes on as usual."""
    tmp, params = host
    os.unlink(tmp / "current")
    os.symlink(f"releases/{NEW}", tmp / "current")
    systemd = DrainingSystemd({UNIT.format(NEW): "active"}, UNIT.format(OLD), polls=5)
    p = params(Mode.ROLLBACK, target=OLD, previous=NEW)
    systemd.run_dir = p["run_dir"]
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.DONE and state.live == OLD, state.failure
    assert systemd.narrowed_at_start == [True]  # it starts on its private queue only
    verbs = systemd.verbs()
    assert verbs.count(f"start {UNIT.format(OLD)}") == 1
    assert verbs.index(f"start {UNIT.format(OLD)}") < verbs.index(f"stop --no-block {UNIT.format(NEW)}")


def test_a_drain_that_outlasts_the_stop_timeout_starts_nothing_later(host, monkeypatch):
    """The drain does not end in time: the step fails with the reason, the draining worker is
    neither killed nor left with a start queued behind it, and the current release serves."""
    tmp, params = host
    os.unlink(tmp / "current")
    os.symlink(f"releases/{NEW}", tmp / "current")
    systemd = DrainingSystemd({UNIT.format(NEW): "active"}, UNIT.format(OLD), polls=10 ** 6)
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(cutover.time, "monotonic", lambda: next(clock) * 1.0)
    p = params(Mode.ROLLBACK, target=OLD, previous=NEW)
    systemd.run_dir = p["run_dir"]
    notes = []
    real_save = cutover.Cutover.save
    monkeypatch.setattr(cutover.Cutover, "save", lambda self: notes.append(
        self.state.steps[-1].detail if self.state.steps else "") or real_save(self))
    state = run_program(monkeypatch, systemd, p)
    assert state.status == CutoverStatus.FELL_BACK and state.live == NEW
    assert f"{UNIT.format(OLD)} still drains after 360s" in state.failure
    assert any("is still draining" in n for n in notes)  # said while it waits
    systemd.drained()  # the drain ends after the cutover gave up
    assert systemd.units[UNIT.format(OLD)]["ActiveState"] == "inactive"  # nothing starts it later
    assert systemd.units[UNIT.format(NEW)]["ActiveState"] == "active" and systemd.narrowed_at_start == []
    assert not (tmp / "run" / f"default@{OLD}.env").exists()


def test_a_start_that_times_out_is_given_back_so_its_queued_job_never_starts_it_later(host, monkeypatch):
    """`systemctl start` gave up (its 60 s) while systemd still holds the start job: the unit was
    recorded before the start, so the give-back stops it (a stop replaces the queued start)."""
    _tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    real = systemd.__call__

    def slow_start(argv, timeout=60):
        if argv[:2] == ["systemctl", "start"] and UNIT.format(NEW) in argv:
            systemd.calls.append(argv)
            raise subprocess.TimeoutExpired(argv, timeout)
        return real(argv, timeout)

    state = run_program(monkeypatch, slow_start, params())
    assert state.status == CutoverStatus.ROLLED_BACK and "timed out" in state.failure
    verbs = systemd.verbs()
    assert f"stop {UNIT.format(NEW)}" in verbs and f"disable --quiet {UNIT.format(NEW)}" in verbs
    assert not any(UNIT.format(OLD) in v for v in verbs)  # the old one serves on, untouched


def test_the_retire_lets_the_old_worker_start_what_it_took_before_it_stops_it(host, monkeypatch):
    """After cancel_consumer the old worker still holds what it prefetched; its warm shutdown would
    return those only at its end. The retire waits for the handoff first; a busy pool is named and
    the old worker stops anyway."""
    _tmp, params = host
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    asked = []
    FakeAgent.on_request = lambda r: asked.append((r["op"], list(systemd.verbs())))
    state = run_program(monkeypatch, systemd, params())
    assert state.status == CutoverStatus.DONE
    ops = [op for op, _ in asked]
    assert ops.index("cancel_consumer") < ops.index("handoff")
    handoff = next(r for r in FakeAgent.requests if r["op"] == "handoff")
    assert [n.rsplit("@", 1)[0] for n in handoff["nodes"]] == [f"default.{OLD}"]
    assert f"stop --no-block {UNIT.format(OLD)}" not in dict(asked)["handoff"]  # not stopped before

    FakeAgent.requests.clear()
    FakeAgent.on_request = None
    FakeAgent.fail = {"handoff": "w.old@h still holds 2 task(s) it has not started (its pool is busy)"}
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    state = run_program(monkeypatch, systemd, params())
    retire = next(s for s in state.steps if s.name == "retire")
    assert state.status == CutoverStatus.DONE and retire.ok
    assert "still holds 2 task(s)" in retire.detail and "returns to its queue when its warm shutdown" in retire.detail
    assert f"stop --no-block {UNIT.format(OLD)}" in systemd.verbs()


@pytest.mark.parametrize("answer", ["silent", "crash"])
def test_finding_the_nodes_during_the_watch_never_hides_a_crash_nor_fails_the_run(host, monkeypatch, answer):
    _tmp, params = host
    monkeypatch.setattr(cutover.waits, "FIND_NODES_WATCH", 0)  # the watch is 1 s here
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    FakeAgent.fail = {"nodes": "no answer within 1s"}
    if answer == "crash":
        FakeAgent.on_request = lambda r: systemd.crash(UNIT.format(NEW)) if r["op"] == "nodes" else None
    state = run_program(monkeypatch, systemd, dict(params(watch=1.0), report=["default"]))
    if answer == "crash":
        assert state.status == CutoverStatus.ROLLED_BACK and "crashed" in state.failure
        assert not next(s for s in state.steps if s.name == "watch").ok
    else:  # the summary makes its own broadcast
        assert state.status == CutoverStatus.DONE
        assert next(r for r in FakeAgent.requests if r["op"] == "report")["nodes"] is None


def test_a_watch_too_short_to_find_the_nodes_leaves_the_summary_its_own_broadcast(host, monkeypatch):
    _tmp, params = host
    state = run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}),
                        dict(params(watch=1.0), report=["default"]))
    assert state.status == CutoverStatus.DONE and "nodes" not in [r["op"] for r in FakeAgent.requests]
    assert next(r for r in FakeAgent.requests if r["op"] == "report")["nodes"] is None
    lines = dict(plan.handover_lines(dict(params(watch=1.0), report=["default"])))
    assert "nodes are found" not in lines["watch"] and "the nodes that answer" in lines["retire"]


def test_the_reporting_hosts_retire_reads_the_queues_while_the_old_nodes_last_fetch_ends(host, monkeypatch):
    """One host's cutover reads the queue summary the run ends with (no round trip, no Python of
    its own): after the cancel, before the handoff, which counts its wait from the cancel; a
    summary it cannot read is said unread, never a failure."""
    _tmp, params = host
    monkeypatch.setattr(cutover.waits, "FIND_NODES_WATCH", 0)  # the watch is 0 s here
    systemd = FakeSystemd({UNIT.format(OLD): "active"})
    p = dict(params(), report=["default"])
    cancelled_at = []
    FakeAgent.on_request = lambda r: r.get("op") == "cancel_consumer" and cancelled_at.append(time.monotonic())
    state = run_program(monkeypatch, systemd, p)
    FakeAgent.on_request = None
    ops = [r["op"] for r in FakeAgent.requests]
    assert state.status == CutoverStatus.DONE and state.queues == "ok"
    assert ops.index("cancel_consumer") < ops.index("report") < ops.index("handoff")
    report, handoff = (next(r for r in FakeAgent.requests if r["op"] == op) for op in ("report", "handoff"))
    assert report["queues"] == ["default"] and cancelled_at[0] <= handoff["since"] <= time.monotonic()
    # the nodes it asks were found during the watch (no 1.5 s broadcast of its own in the retire)
    assert ops.index("add_consumer") < ops.index("nodes") < ops.index("cancel_consumer")
    assert report["nodes"] == ["ok"]  # what the fake agent answered to "nodes"

    FakeAgent.requests.clear()
    FakeAgent.fail = {"report": "the broker cannot be reached"}
    state = run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), p)
    assert state.status == CutoverStatus.DONE and state.queues == UNREAD + "the broker cannot be reached"

    FakeAgent.requests.clear()
    state = run_program(monkeypatch, FakeSystemd({UNIT.format(OLD): "active"}), params())  # another host
    assert state.queues == "" and "report" not in [r["op"] for r in FakeAgent.requests]


BANNER = "celery beat v5.7.0 is starting.\n    . scheduler -> celery.beat.PersistentScheduler\n" \
         "    . maxinterval -> 5.00 minutes (300s)\n"


def beat_program(host, monkeypatch, shown=(None, None), busy_until=0.0, dies_at=None):
    """watch_beat on a fake clock: this start's banner is in the journal from `shown[0]` (until
    `shown[1]`), its process uses CPU until `busy_until` and is gone at `dies_at`."""
    _tmp, params = host
    systemd = FakeSystemd({"shop-beat.service": "active"})
    now, reads = [0.0], []

    def run(argv, timeout=60):
        if argv[0] == "journalctl":
            reads.append(argv)
            seen = shown[0] is not None and shown[0] <= now[0] < (shown[1] or 1e9)
            return subprocess.CompletedProcess(argv, 0, BANNER if seen else "", "")
        if argv[:2] == ["systemctl", "show"] and "InvocationID" in argv:
            return subprocess.CompletedProcess(argv, 0, "abc123\n", "")
        return systemd(argv, timeout)

    def sleep(s):
        now[0] = round(now[0] + s, 3)
        if dies_at is not None and now[0] >= dies_at:
            systemd.crash("shop-beat.service")

    monkeypatch.setattr(cutover, "run", run)
    p = params(phase="beat", watch=3.0)
    p["verify"]["timeout"] = 15
    program = cutover.Cutover(p)
    monkeypatch.setattr(program, "cpu_time", lambda pid: 100 + int(min(now[0], busy_until) * 100))
    monkeypatch.setattr(cutover.time, "time", lambda: now[0])
    monkeypatch.setattr(cutover.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(cutover.time, "sleep", sleep)
    return program, now, reads


@pytest.mark.parametrize("shown, busy_until, ready_at", [
    ((0.5, None), 0.0, 1.7), ((2.9, None), 0.0, 4.1), ((0.5, None), 2.0, 3.2), ((0.5, 0.7), 2.0, 3.2),
    ((3.2, None), 0.0, 4.4),  # idle all along: its banner, seen just before the watch would end without it, counts
    ((14.9, None), 14.0, 16.1)])  # its banner seen just before the verification timeout: the settle still runs
def test_beat_runs_once_it_printed_its_banner_went_idle_and_ran_on(host, monkeypatch, shown, busy_until, ready_at):
    """Beat's proof, at any loglevel: this start's banner (its scheduler class loaded), its process
    idle (asleep in the tick loop), and a second more; however late either comes, within the
    verification timeout. A banner seen once counts, whatever the journal shows later."""
    program, now, reads = beat_program(host, monkeypatch, shown, busy_until)
    assert program.watch_beat("shop-beat.service", "42", NEW) == \
        f"Beat runs from releases/{NEW} (loaded its scheduler, idle, ran 1s more)"
    assert now[0] == pytest.approx(ready_at)  # idle over 0.2 s from the poll that saw the banner, 1 s more exactly
    assert "_PID=42" in reads[0] and "_SYSTEMD_INVOCATION_ID=abc123" in reads[0]
    assert all(r[r.index("-n") + 1] == "5000" for r in reads)  # the banner comes early: not only the last lines


def test_a_beat_that_dies_loading_its_scheduler_late_is_a_failure(host, monkeypatch):
    """On a busy host Beat may take longer than any fixed watch to import the app; a scheduler
    class it cannot load kills it before its banner: however late, a failure."""
    program, now, _reads = beat_program(host, monkeypatch, busy_until=20, dies_at=6.0)
    with pytest.raises(StepFailed, match="stopped after it started"):
        program.watch_beat("shop-beat.service", "42", NEW)
    program, now, _reads = beat_program(host, monkeypatch, shown=(1.0, None), busy_until=20, dies_at=2.5)
    with pytest.raises(StepFailed, match="stopped after it started"):  # or after its banner, still busy
        program.watch_beat("shop-beat.service", "42", NEW)
    program, now, _reads = beat_program(host, monkeypatch, shown=(14.9, None), busy_until=14.0, dies_at=15.6)
    with pytest.raises(StepFailed, match="stopped after it started"):  # in the settle the timeout did not cut short
        program.watch_beat("shop-beat.service", "42", NEW)


@pytest.mark.parametrize("shown, busy_until, why", [
    ((None, None), 99.0, "still busy, its banner never showed in the journal"), ((1.0, None), 99.0, "still busy")])
def test_a_beat_that_never_shows_it_is_ready_has_run_the_verification_timeout(host, monkeypatch, shown,
                                                                              busy_until, why):
    program, now, _reads = beat_program(host, monkeypatch, shown, busy_until)
    assert program.watch_beat("shop-beat.service", "42", NEW) == f"Beat runs from releases/{NEW} (ran 15s, {why})"
    assert 15 <= now[0] < 15.5


def test_a_beat_whose_banner_the_journal_never_shows_is_idle_the_whole_watch(host, monkeypatch):
    """CELERY_QUIET=1 in the env file, or a journald that keeps no info lines: no banner. Then the
    process must stay idle the whole watch (a busy moment starts it again), not the timeout."""
    program, now, _reads = beat_program(host, monkeypatch, busy_until=2.0)
    assert program.watch_beat("shop-beat.service", "42", NEW) == \
        f"Beat runs from releases/{NEW} (idle for 3s; its banner never showed in the journal)"
    assert 5.2 <= now[0] <= 5.45


def test_a_beat_the_proc_file_cannot_tell_idle_is_still_busy(host, monkeypatch):
    program, now, _reads = beat_program(host, monkeypatch, (0.5, None))
    monkeypatch.setattr(program, "cpu_time", lambda pid: None)  # running, in a disk wait, or unreadable
    assert program.watch_beat("shop-beat.service", "42", NEW) == f"Beat runs from releases/{NEW} (ran 15s, still busy)"


def test_cpu_time_reads_this_process_only_asleep():
    from deploy_kit.remote.beat import BeatSteps

    assert BeatSteps.cpu_time(str(os.getpid())) is None  # it runs, reading its own stat
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.time() + 10
        while BeatSteps.cpu_time(str(sleeper.pid)) is None and time.time() < deadline:
            time.sleep(0.05)
        assert isinstance(BeatSteps.cpu_time(str(sleeper.pid)), int)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert BeatSteps.cpu_time(str(sleeper.pid)) is None  # gone


def test_a_journalctl_that_fails_is_read_as_no_line(host, monkeypatch):
    _tmp, params = host

    def run(argv, timeout=60):
        raise subprocess.TimeoutExpired(argv, timeout)

    monkeypatch.setattr(cutover, "run", run)
    assert cutover.Cutover(params(phase="beat")).journalctl("_PID=1") == ""


def test_the_plan_says_how_beat_is_proven():
    stage = stage_of()
    params = plan.cutover_params(stage, stage.host(stage.beat.host), NEW, OLD, Mode.DEPLOY, "r1", "beat")
    assert "until it printed its banner (its scheduler class loaded) and went idle, then 1s more (without the " \
           "banner in the journal: idle 3.0s); one still busy after 60.0s has run that long" \
           in dict(plan.handover_lines(params))["wait for beat"]


def test_cleanup_hides_each_release_at_once_and_removes_it_in_the_background(tmp_path, monkeypatch):
    """A deploy never waits for `rm -rf` of a virtualenv: the release is renamed .NAME.deleting
    (no listing counts it) and removed by a transient unit; where systemd-run fails, here and now."""
    from deploy_kit.remote import finish

    releases = tmp_path / "releases"
    for name in (OLD, ".2026-11-24-110000.deleting"):  # a removal cut off earlier is taken up again
        (releases / name / ".venv").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemd-run").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/ran\n")
    (bin_dir / "systemd-run").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    doomed = [str(releases / OLD), str(releases / ".2026-11-24-110000.deleting"), str(releases / "gone")]
    assert finish.finish({"delete": doomed, "cleanup_unit": "shop-cleanup-r1"}) == []
    assert sorted(os.listdir(releases)) == [".2026-11-24-110000.deleting", f".{OLD}.deleting"]
    assert (tmp_path / "ran").read_text().strip() == (
        "--quiet --collect --unit=shop-cleanup-r1 --description=deploy-kit cleanup rm -rf --one-file-system -- "
        f"{releases}/.{OLD}.deleting {releases}/.2026-11-24-110000.deleting")
    (bin_dir / "systemd-run").write_text("#!/bin/sh\nexit 1\n")
    assert finish.finish({"delete": [f"{releases}/.{OLD}.deleting"], "cleanup_unit": "u"}) == []
    assert os.listdir(releases) == [".2026-11-24-110000.deleting"]  # removed here instead


def test_a_release_being_removed_is_listed_as_such_and_cleaned_up_again():
    from deploy_kit import history, releases
    from deploy_kit.hostfacts import ReleaseInfo

    trash = ReleaseInfo(".2026-11-24-110000.deleting", True, False, {})
    assert releases.to_delete([trash, ReleaseInfo(NEW, False, False, {})], NEW, 5) == [trash.name]
    assert history.release_state(types_facts(), trash, NEW) == "being removed"


def types_facts():
    import types
    return types.SimpleNamespace(releases=(), live=())
