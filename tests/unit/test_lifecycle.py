"""The lifecycle with a fake runner: the steps a deploy executes are the steps `--plan` prints,
and every failure path does what the decision table says (no host needed)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest

from deploy_kit import hostfacts, lifecycle, queues, release
from deploy_kit import remote as host_programs
from deploy_kit.errors import DeployFailed, HostsFailed, Locked, PreflightFailed, UsageError
from deploy_kit.plan import Build, Cutover, Finish, Phase, Probe, Queues, Script
from deploy_kit.remote.contracts import UNREAD, CutoverState, CutoverStatus, HistoryLine, LockHolder, Mode, Result
from deploy_kit.runner import Run

from .samples import ONE_HOST, STAGE, stage_of
from .test_checks import healthy

NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
NEW = "2026-11-24-123000"
OLD = "2026-11-24-120000"


class FakeSession:
    def __init__(self, hosts):
        self.hosts = hosts

    def revive(self, names):
        pass

    def each(self, work, *, what, only=None, all_at_once=False):
        from deploy_kit import parallel  # the real fan-out: one host's error, or HostsFailed naming each
        self.waves = [*getattr(self, "waves", []), (what, all_at_once)]
        chosen = [h for h in self.hosts if only is None or h.name in only]
        return parallel.each(chosen, work, name=lambda h: h.name, what=what)

    def remote(self, name):
        return next(h for h in self.hosts if h.name == name)


def holder_of(who: str, since: str, token: str) -> LockHolder:
    return LockHolder(who=who, host="laptop", action="deploy", ref="main", since=since, token=token)


class FakeRun(Run):
    """A Run whose steps are answered from canned host states instead of SSH."""

    cutover_status: dict[str, CutoverStatus] = {}  # by host, or "host:cutover id"
    rollback_status: dict[str, CutoverStatus] = {}
    live_override: dict[str, str] = {}  # "host:cutover id" -> the release it reports live
    held: set[str] = set()
    facts_override: dict[str, dict] = {}
    unregistered: dict[str, int] = {}
    report = json.dumps({"queues": {"default": {"waiting": 2, "unacked": 0, "stranded": 0}},
                         "workers": {"default.new@web1": {"queues": ["default"]}}, "complete": True})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.token = "t0k3n"
        self.holder.token = self.token
        self.holder.since = NOW.isoformat(timespec="seconds")

    def connected(self):
        self.session = FakeSession(self.stage.hosts)
        import contextlib
        return contextlib.nullcontext(self)

    def _queue_summary(self, remote):
        self.summarized = True
        return ["queues: fine"]

    def pack(self, facts, reuses):
        self.source = release.Source(name=NEW, sha="f" * 40, ref=self.ref, archive=b"x" * 4096,
                                     requirements="celery\n", revision={})
        return {h: ("celery-5.5.0-py3-none-any.whl",) for h in facts}

    def perform(self, remote, step):
        action = step.action
        if isinstance(action, Probe):
            data = dict(healthy(self.stage, remote), **self.facts_override.get(remote.name, {}))
            if action.params["lock"]:
                holder = {"who": "bob", "from": "ci"} if remote.name in self.held else action.params["lock"]
                data["lock"] = {"acquired": remote.name not in self.held, "holder": holder}
            return hostfacts.parse(json.dumps(data))
        if isinstance(action, Build):
            return self.built(release.Built(remote.name, action.release, action.reuse_env, len(action.wheels), 1,
                                            dict(self.unregistered) if action.queues else None))
        if isinstance(action, Cutover):
            mode = Mode(action.params["mode"])
            table = self.cutover_status if mode == Mode.DEPLOY else self.rollback_status
            status = table.get(f"{remote.name}:{action.params['id']}", table.get(remote.name, CutoverStatus.DONE))
            live = action.params["target"] if status == CutoverStatus.DONE else action.params["previous"]
            live = self.live_override.get(f"{remote.name}:{action.params['id']}", live)
            return CutoverState(id=action.params["id"], mode=mode, target=action.params["target"],
                                previous=action.params["previous"], status=status, live=live,
                                failure="" if status == CutoverStatus.DONE else "verify failed",
                                queues=self.report if action.params.get("report") else "")
        if isinstance(action, Queues):  # the real step, over a fake agent (`queues.ask` in `fake`)
            return Run.perform(self, remote, step)
        return None


@pytest.fixture
def fake(monkeypatch):
    FakeRun.cutover_status, FakeRun.rollback_status, FakeRun.held, FakeRun.facts_override = {}, {}, set(), {}
    FakeRun.live_override = {}
    FakeRun.unregistered = {}
    monkeypatch.setattr(queues, "ask", lambda remote, stage, requests, release=None: ["{}"])
    runs = []

    def make(*args, **kwargs):
        run = FakeRun(*args, **kwargs)
        runs.append(run)
        return run

    monkeypatch.setattr(lifecycle, "Run", make)
    return runs


def say(host, message):
    pass


def test_the_deploy_executes_exactly_the_plan(fake):
    stage = stage_of()
    printed = lifecycle.plan(stage, ref="main", say=say, now=NOW)
    probe = fake[-1].executed
    assert [s.phase for s in probe] == [Phase.LOCK, Phase.LOCK]  # --plan ran only the probe,
    assert all(s.action.params["lock"] is None for s in probe)  # read-only: no lock taken
    lifecycle.deploy(stage, ref="main", say=say, now=NOW)
    assert fake[-1].executed == list(printed.steps)  # the very objects, in the same order
    assert [s.phase for s in printed.steps] == [Phase.LOCK] * 2 + [Phase.RELEASE] * 2 + \
        [Phase.MIGRATE] + [Phase.CUTOVER] * 2 + [Phase.SUMMARY] + [Phase.BEAT] + [Phase.FINISH] * 2
    assert not any(s.action.params["report"] for s in printed.steps if s.phase == Phase.CUTOVER)
    # One host with workers: its cutover reads the queues during its retire (no step of its own).
    alone = lifecycle.plan(stage_of(ONE_HOST), ref="main", say=say, now=NOW)
    assert [s.phase for s in alone.steps] == [Phase.LOCK, Phase.RELEASE, Phase.MIGRATE, Phase.CUTOVER, Phase.BEAT,
                                              Phase.FINISH]
    assert alone.steps[3].action.params["report"] == ["celery"]


def test_the_plan_says_per_host_what_will_happen(fake):
    stage = stage_of()
    printed = "\n".join(lifecycle.plan(stage, ref="main", say=say).render())
    for host in ("web1", "web2"):
        for phase in ("lock", "check", "release", "start", "verify", "join", "watch", "retire", "switch", "finish"):
            assert f"{host} {phase}:" in printed
    assert printed.count("manage.py migrate") == 1
    assert "deploy-kit.shop.prod.default.2026-11-24-123000@web2" in printed  # web2's own new worker
    assert "web1 restart beat:" in printed and "web2 restart beat:" not in printed
    assert f"{NEW[:4]}" in printed and "celery-5.5.0-py3-none-any.whl" in printed
    assert "new environment installed by uv (pip where uv cannot); wheels sent: celery-5.5.0" in printed
    assert "shop-beat.service" in printed
    back = printed[printed.index("web2 only if the cutover fails: cutover: rollback: hand the workers back"):]
    assert "web2 start: shop-worker-default@2026-11-24-120000.service beside the running instance, consuming " \
           "celery at once (it ran when this run began: no new proof" in back  # the hand-back needs no broker


@pytest.mark.parametrize("app, says", [
    ({"installer": "pip"}, "new environment installed by pip; wheels sent: celery-5.5.0"),
    ({"install": "index"}, "new environment installed by pip from the package index")])
def test_the_plan_says_who_installs_a_new_environment(fake, app, says):
    from dataclasses import replace

    stage = stage_of()
    stage = replace(stage, app=replace(stage.app, **app))
    assert says in "\n".join(lifecycle.plan(stage, ref="main", say=say).render())


def test_a_failed_host_brings_the_other_back_and_exits_5(fake):
    FakeRun.cutover_status = {"web2": CutoverStatus.ROLLED_BACK}
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 5
    run = fake[-1]
    back = [s for s in run.executed if isinstance(s.action, Cutover) and s.action.params["mode"] == "rollback"]
    assert [(s.host, s.action.params["target"], s.action.params["previous"]) for s in back] == [("web1", OLD, NEW)]
    marks = [s for s in run.executed if s.phase == Phase.MARK_BAD]
    assert {s.host for s in marks} == {"web1", "web2"}
    bad = run.finish_params("web1", marks[0].action)["mark_bad"]  # what `hostlib.mark_bad` writes, as the cutover
    assert bad["release_dir"].endswith(f"/releases/{NEW}") and bad["id"] == run.run_id and bad["reason"]
    assert run.history.result is Result.FAILED and run.outcome.result is Result.ROLLED_BACK
    finish = [s.action for s in run.executed if s.phase == Phase.FINISH]
    assert finish and all(f.unlock and not f.delete for f in finish)  # no cleanup after a failure
    assert "web1: back on" in str(caught.value) and "web2: back on" in str(caught.value)


def test_an_unknown_host_keeps_the_lock_and_exits_6(fake):
    FakeRun.cutover_status = {"web2": CutoverStatus.UNKNOWN}
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 6
    finish = [s.action for s in fake[-1].executed if s.phase == Phase.FINISH]
    assert finish and not any(f.unlock for f in finish)
    assert "fab unlock" in str(caught.value) and "STATE UNKNOWN" in str(caught.value)


def test_a_failed_way_back_is_exit_6(fake):
    FakeRun.cutover_status = {"web2": CutoverStatus.ROLLED_BACK}
    FakeRun.rollback_status = {"web1": CutoverStatus.ROLLBACK_FAILED}
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 6


RUN = NOW.strftime("%Y%m%d%H%M%S")  # the run's id; its Beat step's is RUN + "b", its way back's RUN + "r" and "rb"


def rolled_back_with_web2_failing(fake) -> tuple[DeployFailed, list]:
    on_new_after_old()
    FakeRun.rollback_status = {**FakeRun.rollback_status, "web2": CutoverStatus.FELL_BACK}
    printed = lifecycle.rollback_plan(stage_of(), to=None, say=say, now=NOW)
    assert {s.action.params["id"] for s in printed.on_failure} == {RUN + "r", RUN + "rb"}
    with pytest.raises(DeployFailed) as caught:
        lifecycle.rollback(stage_of(), to=None, say=say, now=NOW)
    assert caught.value.exit_code == 6  # the stage did not get where it was asked to
    ran = [s for s in fake[-1].executed if s.phase in (Phase.BEAT, Phase.CUTOVER)]
    back = [s for s in printed.on_failure if s.host == "web1"]
    assert ran[3:] == back  # what --plan printed as the way back, the very steps
    assert [(s.phase, s.action.params["target"], s.action.params["hand_back"]) for s in back] == \
        [(Phase.CUTOVER, NEW, True), (Phase.BEAT, NEW, False)]  # the workers hand back, then Beat
    return caught.value, ran


def test_a_rollback_that_fails_on_one_host_hands_the_others_and_beat_back(fake):
    failed, ran = rolled_back_with_web2_failing(fake)
    assert [(s.host, s.phase) for s in ran[:3]] == [("web1", Phase.BEAT), ("web1", Phase.CUTOVER),
                                                    ("web2", Phase.CUTOVER)]
    text = str(failed)
    assert "web1: back on " + NEW in text and f"web2: could not switch, stayed on {NEW}" in text
    assert "every host runs the release it ran before this rollback" in text and "act now" not in text
    finish = [s.action for s in fake[-1].executed if s.phase == Phase.FINISH]
    assert finish and all(f.unlock for f in finish)


def test_a_rollback_whose_beat_cannot_go_back_says_so_and_keeps_the_lock(fake):
    FakeRun.rollback_status = {f"web1:{RUN}rb": CutoverStatus.FELL_BACK}
    failed, _ = rolled_back_with_web2_failing(fake)
    text = str(failed)
    assert f"Beat could not go back (verify failed): it runs {OLD}" in text and "act now" in text
    finish = [s.action for s in fake[-1].executed if s.phase == Phase.FINISH]
    assert finish and not any(f.unlock for f in finish)


def test_a_rollback_whose_hand_back_fails_is_split_and_says_act_now(fake):
    """web1's hand-back fails (it stays on the rollback's target): the stage is split, and Beat
    stays with web1's `current`; the message says so, not that every host runs what it ran."""
    on_new_after_old()
    FakeRun.rollback_status = {"web2": CutoverStatus.FELL_BACK, f"web1:{RUN}r": CutoverStatus.FELL_BACK}
    FakeRun.live_override = {f"web1:{RUN}r": OLD}
    with pytest.raises(DeployFailed) as caught:
        lifecycle.rollback(stage_of(), to=None, say=say, now=NOW)
    ran = [(s.host, s.action.params["id"]) for s in fake[-1].executed if s.phase in (Phase.BEAT, Phase.CUTOVER)]
    assert ran[3:] == [("web1", RUN + "r")]  # no Beat back: its host's workers did not go back
    text = str(caught.value)
    assert caught.value.exit_code == 6 and "act now" in text and "every host runs" not in text


def test_a_rollback_whose_beat_host_fails_brings_beat_and_its_current_back(fake):
    """Beat's step moved web1's `current` first; web1's workers then fail (they never left NEW):
    Beat goes back with the others, and web1 is said to run NEW, as it does."""
    on_new_after_old()
    FakeRun.rollback_status = {f"web1:{RUN}": CutoverStatus.FELL_BACK}
    FakeRun.live_override = {f"web1:{RUN}": OLD}  # `current` as Beat's step left it
    with pytest.raises(DeployFailed) as caught:
        lifecycle.rollback(stage_of(), to=None, say=say, now=NOW)
    ran = [(s.host, s.action.params["id"]) for s in fake[-1].executed if s.phase in (Phase.BEAT, Phase.CUTOVER)]
    assert ran[3:] == [("web2", RUN + "r"), ("web1", RUN + "rb")]
    text = str(caught.value)
    assert f"web1: could not switch, stayed on {NEW}" in text and f"web2: back on {NEW}" in text
    assert "every host runs the release it ran before this rollback" in text


def test_a_rollback_without_a_beat_move_brings_no_beat_back(fake):
    on_new_after_old()
    FakeRun.facts_override["web1"]["paths"]["current"]["target"] = f"releases/{OLD}"  # web1 is there already
    printed = lifecycle.rollback_plan(stage_of(), to=OLD, say=say, now=NOW)
    assert [(s.host, s.phase) for s in printed.on_failure] == [("web2", Phase.CUTOVER)]


def test_a_failed_preflight_changes_nothing_and_releases_the_lock(fake):
    FakeRun.facts_override = {"web2": {"broker": {"ok": False, "detail": "connection refused"}}}
    with pytest.raises(PreflightFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert "web2" in str(caught.value) and "connection refused" in str(caught.value)
    run = fake[-1]
    assert {s.phase for s in run.executed} == {Phase.LOCK, Phase.FINISH}
    assert all(s.action == Finish(unlock=True, history=True) for s in run.executed if s.phase == Phase.FINISH)
    assert run.history.result is Result.PREFLIGHT_FAILED


def test_a_lock_held_elsewhere_is_refused_and_ours_released(fake):
    FakeRun.held = {"web2"}
    with pytest.raises(Locked) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 4 and "web2: held by bob from ci" in str(caught.value)
    released = [s for s in fake[-1].executed if s.phase == Phase.FINISH]
    assert {s.host for s in released} == {"web1", "web2"}
    assert all(s.action == Finish(unlock=True, history=False) for s in released)


def test_a_first_deploy_that_fails_returns_to_no_release(fake):
    FakeRun.facts_override = {h: {"paths": dict(healthy(stage_of(), stage_of().host(h))["paths"], current=None),
                                  "release_python": False, "release_runs": None, "app_import": None}
                              for h in ("web1", "web2")}
    FakeRun.cutover_status = {"web2": CutoverStatus.ROLLED_BACK}
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    undone = [s for s in fake[-1].executed if s.phase == Phase.UNDO]
    assert [s.host for s in undone] == ["web1"] and isinstance(undone[0].action, Script)
    assert "rm -f /srv/shop/current" in undone[0].action.text
    assert caught.value.exit_code == 5


def on_new_after_old() -> None:
    """Both hosts run NEW, with OLD before it."""
    FakeRun.facts_override = {h: {"releases": [
        {"name": OLD, "building": False, "bad": False, "revision": {}},
        {"name": NEW, "building": False, "bad": False, "revision": {}}],
        "paths": dict(healthy(stage_of(), stage_of().host(h))["paths"],
                      current={"type": "link", "owner": "root", "group": "root", "mode": "0777",
                               "target": f"releases/{NEW}", "resolves": True})} for h in ("web1", "web2")}


def test_rollback_goes_to_the_previous_good_release(fake):
    on_new_after_old()
    result = lifecycle.rollback(stage_of(), to=None, say=say)
    assert result.release == OLD
    cut = [s for s in fake[-1].executed if s.phase == Phase.CUTOVER]
    assert {(s.action.params["target"], s.action.params["previous"], s.action.params["mode"]) for s in cut} == \
        {(OLD, NEW, "rollback")}


def test_each_host_records_its_own_move_in_the_history(fake):
    """Hosts a cut-off run left on different releases: a plain rollback refuses (each host's own
    previous would keep them apart); with --to, each history line names that host's own origin."""
    on_new_after_old()
    older = "2026-11-23-120000"
    for host in ("web1", "web2"):
        facts = FakeRun.facts_override[host]
        facts["releases"] = [{"name": older, "building": False, "bad": False, "revision": {}}, *facts["releases"]]
    web2 = FakeRun.facts_override["web2"]
    web2["paths"] = dict(web2["paths"], current=dict(web2["paths"]["current"], target=f"releases/{OLD}"))
    with pytest.raises(UsageError, match="the hosts run different releases .*--to RELEASE"):
        lifecycle.rollback(stage_of(), to=None, say=say, now=NOW)
    lifecycle.rollback(stage_of(), to=older, say=say, now=NOW)
    finish = {s.host: s.action for s in fake[-1].executed if s.phase == Phase.FINISH}
    assert (finish["web1"].previous, finish["web1"].release) == (NEW, older)
    assert (finish["web2"].previous, finish["web2"].release) == (OLD, older)
    text = fake[-1].finish_params("web2", finish["web2"])["history"]["line"]
    line = HistoryLine.from_json(text)
    assert (line.action, line.from_release, line.release, line.host) == (Mode.ROLLBACK, OLD, older, "web2")
    assert line.result is Result.SUCCESS and fake[-1].outcome.result is Result.SUCCESS
    assert (json.loads(text)["action"], json.loads(text)["result"]) == ("rollback", "success")  # the JSON as before
    assert HistoryLine.from_json(text) == line and f"{line.action}: {line.result}" == "rollback: success"


def test_the_rollback_executes_exactly_its_plan(fake):
    on_new_after_old()
    printed = lifecycle.rollback_plan(stage_of(), to=None, say=say, now=NOW)
    lifecycle.rollback(stage_of(), to=None, say=say, now=NOW)
    assert fake[-1].executed == list(printed.steps)  # the very objects, in the same order
    assert [s.phase for s in printed.steps] == [Phase.LOCK] * 2 + [Phase.BEAT] + [Phase.CUTOVER] * 2 + \
        [Phase.SUMMARY] + [Phase.FINISH] * 2  # Beat first on the way back; the queues read while it finishes


def test_a_failed_migration_discards_the_release_everywhere_and_unlocks(fake, monkeypatch):
    from deploy_kit.errors import HostError

    def perform(self, remote, step):
        if step.phase == Phase.MIGRATE:
            raise HostError(remote.name, "migrations failed; current is untouched on every host")
        return FakeRun.perform_canned(self, remote, step)

    monkeypatch.setattr(FakeRun, "perform_canned", FakeRun.perform, raising=False)
    monkeypatch.setattr(FakeRun, "perform", perform)
    with pytest.raises(HostError):
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    undone = [s for s in fake[-1].executed if s.phase == Phase.UNDO]
    assert {s.host for s in undone} == {"web1", "web2"}
    assert all(s.action.delete == (f".{NEW}.building", NEW) for s in undone)  # built here: removed
    assert [s.action for s in fake[-1].executed if s.phase == Phase.FINISH] == [Finish()] * 2


def test_finish_releases_the_lock_even_when_the_history_line_cannot_be_written(tmp_path):
    """A full disk after a successful deploy: old releases go, the lock goes, the line is a warning."""
    stage = stage_of(STAGE.replace('celery_app = "shop"', f'celery_app = "shop"\ndeploy_to = "{tmp_path}"'))
    run = Run(stage, Mode.DEPLOY, say, ref="main", now=NOW)
    state = tmp_path / ".deploy-kit"
    (state / "lock").mkdir(parents=True)
    (state / "lock" / "holder.json").write_text(json.dumps({"token": run.token}))
    (state / "history.jsonl").mkdir()  # any write error, as a full disk gives
    (tmp_path / "releases" / OLD).mkdir(parents=True)
    params = run.finish_params("web1", Finish((OLD,), unlock=True, history=True, release=NEW, previous=OLD))
    program = host_programs.program("finish", params)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "the history line could not be written" in json.loads(done.stdout)["warnings"][0]
    assert not (state / "lock").exists() and not (tmp_path / "releases" / OLD).exists()


def test_finish_never_removes_a_lock_another_run_holds(tmp_path):
    stage = stage_of(STAGE.replace('celery_app = "shop"', f'celery_app = "shop"\ndeploy_to = "{tmp_path}"'))
    run = Run(stage, Mode.DEPLOY, say, ref="main", now=NOW)
    (tmp_path / ".deploy-kit/lock").mkdir(parents=True)
    (tmp_path / ".deploy-kit/lock/holder.json").write_text(json.dumps({"token": "someone-else"}))
    program = host_programs.program("finish", run.finish_params("web1", Finish(history=False)))
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True)
    assert (tmp_path / ".deploy-kit/lock/holder.json").exists()


def interrupting(monkeypatch, times: int, signum: int = signal.SIGINT) -> list[str]:
    """Each host's cutover sends this process `signum` `times` times in all (a user's Ctrl-C, or
    SIGTERM from a CI job that is cancelled)."""
    sent: list[str] = []
    real = FakeRun.perform

    def perform(self, remote, step):
        if isinstance(step.action, Cutover) and len(sent) < times:
            sent.append(remote.name)
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the signal is handled in the main thread, which waits for this one
        return real(self, remote, step)

    monkeypatch.setattr(FakeRun, "perform", perform)
    return sent


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_first_ctrl_c_during_the_cutover_waits_for_the_hosts_and_finishes(fake, monkeypatch, signum):
    """A first Ctrl-C, or the SIGTERM of a cancelled CI job: Beat, finish and the summary still run."""
    interrupting(monkeypatch, 1, signum)
    before = signal.getsignal(signal.SIGINT)  # whatever the suite was started with (SIG_IGN in the background)
    before_term = signal.getsignal(signal.SIGTERM)
    said = []
    result = lifecycle.deploy(stage_of(), ref="main", say=lambda h, m: said.append(m), now=NOW)
    assert result.result == "success" and any("waiting for it to end" in m for m in said)
    assert {s.host for s in fake[-1].executed if s.phase == Phase.FINISH} == {"web1", "web2"}  # recorded, unlocked
    assert any(s.phase == Phase.BEAT for s in fake[-1].executed)  # the stage ends on one release
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is before_term


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_ctrl_c_leaves_at_once(fake, monkeypatch, signum):
    interrupting(monkeypatch, 2, signum)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_probe_that_fails_on_one_host_leaves_no_lock_on_any(fake, monkeypatch):
    """web2's probe times out after web1's took the lock: every host gets the token-checked release."""
    from deploy_kit.errors import HostError

    real = FakeRun.perform

    def perform(self, remote, step):
        if isinstance(step.action, Probe) and remote.name == "web2":
            raise HostError("web2", "probing the host did not finish within 180 s")
        return real(self, remote, step)

    monkeypatch.setattr(FakeRun, "perform", perform)
    with pytest.raises(HostsFailed, match="web2: probing the host did not finish"):
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    released = [s for s in fake[-1].executed if s.phase == Phase.FINISH]
    assert {s.host for s in released} == {"web1", "web2"}
    assert all(s.action == Finish(unlock=True, history=False) for s in released)


def test_a_ctrl_c_during_the_build_lets_it_finish_then_discards_and_unlocks(fake, monkeypatch):
    real = FakeRun.perform
    sent = []

    def perform(self, remote, step):
        if isinstance(step.action, Build) and not sent:
            sent.append(remote.name)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        return real(self, remote, step)

    monkeypatch.setattr(FakeRun, "perform", perform)
    said = []
    with pytest.raises(KeyboardInterrupt):
        lifecycle.deploy(stage_of(), ref="main", say=lambda h, m: said.append(m), now=NOW)
    run = fake[-1]
    assert any("the builds and migrations finish first" in m for m in said)
    assert [s.phase for s in run.executed if s.phase == Phase.MIGRATE] == [Phase.MIGRATE]  # never cut
    assert {s.host for s in run.executed if s.phase == Phase.UNDO} == {"web1", "web2"}
    assert not any(s.phase == Phase.CUTOVER for s in run.executed)


def test_parallel_work_is_left_at_once_on_ctrl_c(monkeypatch):
    from deploy_kit import parallel

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = threading.Event()
    try:
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            parallel.each([1, 2], lambda item: done.wait(30), name=str, what="waiting")
        assert not done.is_set()  # it left while the work still ran
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)


def test_a_split_stage_is_made_whole_with_rollback_to_one_of_its_releases(fake):
    """web1 on NEW, web2 on OLD (a cut-off run): `--to OLD` moves web1 only; Beat is put on OLD too."""
    on_new_after_old()
    web2 = FakeRun.facts_override["web2"]
    web2["paths"] = dict(web2["paths"], current=dict(web2["paths"]["current"], target=f"releases/{OLD}"))
    lifecycle.rollback(stage_of(), to=OLD, say=say, now=NOW)
    executed = fake[-1].executed
    assert [s.host for s in executed if s.phase == Phase.CUTOVER] == ["web1"]
    assert [s.host for s in executed if s.phase == Phase.BEAT] == ["web1"]
    finish = {s.host: s.action for s in executed if s.phase == Phase.FINISH}
    assert (finish["web1"].previous, finish["web1"].release) == (NEW, OLD) and finish["web2"].release == ""
    with pytest.raises(UsageError, match=f"every host already runs {OLD}"):
        FakeRun.facts_override["web1"]["paths"] = web2["paths"]
        lifecycle.rollback(stage_of(), to=OLD, say=say, now=NOW)


def test_queued_tasks_the_new_release_lacks_warn_or_with_strict_stop_before_anything_switched(fake):
    FakeRun.unregistered = {"shop.tasks.gone": 3}
    said = []
    lifecycle.deploy(stage_of(), ref="main", say=lambda host, message: said.append(message), now=NOW)
    assert any("shop.tasks.gone (3 message(s))" in m and m.startswith("warning:") for m in said)
    assert fake[-1].summarized  # the queue summary after the deploy, read while Beat moved
    said.clear()
    lifecycle.deploy(stage_of(ONE_HOST), ref="main", say=lambda host, message: said.append(message), now=NOW)
    # The one host's cutover read it during its retire: said at the end, no round trip of its own.
    assert said[-1] == "queue default: 2 waiting, 0 unacked, consumed by default.new@web1"
    assert not hasattr(fake[-1], "summarized")
    with pytest.raises(PreflightFailed, match=r"shop.tasks.gone \(3 message"):
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW, strict=True)
    run = fake[-1]
    assert not any(s.phase in (Phase.MIGRATE, Phase.CUTOVER) for s in run.executed)
    assert {s.phase for s in run.executed} == {Phase.LOCK, Phase.RELEASE, Phase.UNDO, Phase.FINISH}
    assert [s.host for s in run.executed if s.phase == Phase.RELEASE and s.action.queues] == ["web1"]  # one asked


def test_two_runs_that_each_took_half_the_stage_settle_on_the_older(monkeypatch):
    """Two runs started together each won the lock on one host: the younger yields at once and
    releases its half, the older probes the refused host again and goes on."""
    from deploy_kit import runner
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    stage = stage_of()
    older = holder_of("a", "2026-11-24T12:30:00+00:00", "aaaa")
    younger = holder_of("b", "2026-11-24T12:30:00+00:00", "bbbb")  # same second: token decides
    locks = {"web1": older, "web2": younger}

    def probe_as(holder):
        def probe(hosts):
            facts = {}
            for host in hosts:
                if host not in locks:
                    locks[host] = holder
                held = locks[host]
                data = dict(healthy(stage, stage.host(host)), lock={"acquired": held is holder,
                                                                    "holder": held.to_data()})
                facts[host] = hostfacts.parse(json.dumps(data))
            return facts
        return probe

    with pytest.raises(Locked):
        runner.take_locks(stage, younger, probe_as(younger))
    del locks["web2"]  # what the younger's caller does: it releases what it took
    facts = runner.take_locks(stage, older, probe_as(older))
    assert all(f.lock.acquired for f in facts.values()) and locks == {"web1": older, "web2": older}


def test_a_run_refused_by_an_older_holder_or_everywhere_is_refused_at_once(monkeypatch):
    from deploy_kit import runner
    naps = []
    monkeypatch.setattr(runner.time, "sleep", naps.append)
    stage = stage_of()
    mine = holder_of("me", "2026-11-24T12:30:00+00:00", "mmmm")
    stale = holder_of("dead", "2026-11-20T08:00:00+00:00", "dddd")
    newer = holder_of("new", "2026-11-24T12:31:00+00:00", "nnnn")
    for locks in ({"web1": mine, "web2": stale}, {"web1": newer, "web2": newer},
                  {"web1": mine, "web2": LockHolder.from_data({"who": "x"})}):
        def probe(hosts, locks=locks):
            return {h: hostfacts.parse(json.dumps(dict(healthy(stage, stage.host(h)), lock={
                "acquired": locks[h] is mine, "holder": locks[h].to_data()}))) for h in hosts}
        with pytest.raises(Locked) as caught:
            runner.take_locks(stage, mine, probe)
        assert "fab unlock --stage" in str(caught.value)
    assert naps == []


def test_the_older_run_waits_only_so_long_for_a_younger_that_never_lets_go(monkeypatch):
    from deploy_kit import runner
    clock = [0.0]
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(runner.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    stage = stage_of()
    mine = holder_of("me", "2026-11-24T12:30:00+00:00", "mmmm")
    pending = LockHolder.unreadable(fresh=True)
    locks = {"web1": mine, "web2": pending}

    def probe(hosts):
        return {h: hostfacts.parse(json.dumps(dict(healthy(stage, stage.host(h)), lock={
            "acquired": locks[h] is mine, "holder": locks[h].to_data()}))) for h in hosts}
    with pytest.raises(Locked):
        runner.take_locks(stage, mine, probe)
    assert runner.CONTENDED_WAIT <= clock[0] <= runner.CONTENDED_WAIT + 1


def failing(monkeypatch, phase: Phase, hosts=("web2",), beat: CutoverStatus | None = None):
    """The hosts of `hosts` cannot be reached for the steps of `phase`; Beat's cutover ends `beat`."""
    from deploy_kit.errors import HostError
    real = FakeRun.perform

    def perform(self, remote, step):
        if step.phase == phase and remote.name in hosts:
            raise HostError(remote.name, "the SSH connection failed: reset")
        if beat is not None and step.phase == Phase.BEAT:
            state = real(self, remote, step)
            return CutoverState(**{**state.__dict__, "status": beat, "live": step.action.params["previous"],
                                   "failure": "Beat does not run"})
        return real(self, remote, step)

    monkeypatch.setattr(FakeRun, "perform", perform)


def test_a_host_that_cannot_be_finished_after_a_success_is_a_note_not_exit_7(fake, monkeypatch):
    """The stage runs the new release, verified: a host that cannot then be recorded or unlocked is
    a warning naming it and what to do (exit 0), not an exit 7 that reads like a failed deploy."""
    failing(monkeypatch, Phase.FINISH)
    said = []
    result = lifecycle.deploy(stage_of(), ref="main", say=lambda h, m: said.append(f"{h} {m}"), now=NOW)
    assert result.result == "success"
    note = "web2: not recorded/unlocked: the SSH connection failed: reset; `fab status --stage prod` shows it, " \
           "`fab unlock` once checked"
    assert result.notes == [note] and any(note in m for m in said)


def test_a_host_that_cannot_be_finished_after_a_failure_keeps_the_exit_5_summary(fake, monkeypatch):
    FakeRun.cutover_status = {"web2": CutoverStatus.ROLLED_BACK}
    failing(monkeypatch, Phase.FINISH)
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 5
    message = str(caught.value)
    assert "web1: back on" in message and "web2: back on" in message
    assert "note: web2: not recorded/unlocked: the SSH connection failed" in message and "fab unlock" in message


def test_a_host_that_cannot_be_marked_bad_keeps_the_exit_5_summary(fake, monkeypatch):
    FakeRun.cutover_status = {"web2": CutoverStatus.ROLLED_BACK}
    failing(monkeypatch, Phase.MARK_BAD)
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 5 and "web1: back on" in str(caught.value)
    assert f"note: web2: {NEW} could not be marked bad" in str(caught.value)
    assert all(s.action.unlock for s in fake[-1].executed if s.phase == Phase.FINISH)  # the stage is known


def test_a_first_deploy_host_that_cannot_return_to_no_release_is_unknown_exit_6(fake, monkeypatch):
    FakeRun.facts_override = {h: {"paths": dict(healthy(stage_of(), stage_of().host(h))["paths"], current=None),
                                  "release_python": False, "release_runs": None, "app_import": None}
                              for h in ("web1", "web2")}
    FakeRun.cutover_status = {"web2": CutoverStatus.ROLLED_BACK}
    failing(monkeypatch, Phase.UNDO, hosts=("web1",))
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 6
    assert "web1: STATE UNKNOWN (could not return to no release: the SSH connection failed" in str(caught.value)
    assert not any(s.action.unlock for s in fake[-1].executed if s.phase == Phase.FINISH)  # the lock is kept


def test_beat_that_fails_hands_every_host_back(fake, monkeypatch):
    """Every host's workers took over, then Beat failed: `outcome.to_roll_back` names them all."""
    failing(monkeypatch, Phase.FINISH, hosts=(), beat=CutoverStatus.ROLLED_BACK)
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    back = [s.host for s in fake[-1].executed
            if isinstance(s.action, Cutover) and s.action.params["mode"] == "rollback"]
    assert back == ["web1", "web2"] and caught.value.exit_code == 5


def test_a_failed_release_of_the_locks_after_a_preflight_names_the_host(fake, monkeypatch):
    FakeRun.facts_override = {"web2": {"broker": {"ok": False, "detail": "connection refused"}}}
    failing(monkeypatch, Phase.FINISH)
    said = []
    with pytest.raises(PreflightFailed):
        lifecycle.deploy(stage_of(), ref="main", say=lambda h, m: said.append(m), now=NOW)
    lifecycle.release_locks(fake[-1])
    assert any(m.startswith("the lock may be left on web2 (the SSH connection failed: reset): `fab status "
                            "--stage prod` shows it, `fab unlock` clears it") for m in said)


def test_a_running_cutover_is_refused_at_the_lock_before_anything_is_built(fake):
    FakeRun.facts_override = {"web2": {"cutovers": ["shop-cutover-20261124120000"]}}
    with pytest.raises(Locked) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    assert caught.value.exit_code == 4
    assert "web2: shop-cutover-20261124120000" in str(caught.value) and "fab status --stage prod" in str(caught.value)
    run = fake[-1]
    assert {s.phase for s in run.executed} == {Phase.LOCK, Phase.FINISH}  # nothing built, our locks released
    assert all(s.action == Finish(unlock=True, history=False) for s in run.executed if s.phase == Phase.FINISH)
    with pytest.raises(Locked):
        on_new_after_old()
        FakeRun.facts_override["web1"]["cutovers"] = ["shop-cutover-20261124120000"]
        lifecycle.rollback(stage_of(), to=None, say=say, now=NOW)


def test_a_launch_refused_because_another_cutover_runs_keeps_the_lock_and_marks_nothing_bad(fake, monkeypatch):
    from deploy_kit import follow
    real = FakeRun.perform

    def perform(self, remote, step):
        state = real(self, remote, step)
        if step.phase == Phase.CUTOVER and remote.name == "web2" and step.action.params["mode"] == "deploy":
            return CutoverState(**{**state.__dict__, "status": CutoverStatus.UNKNOWN, "live": OLD, "failure": "",
                                   "rollback_failure": follow.REFUSED + "another cutover of shop is still running"})
        return state

    monkeypatch.setattr(FakeRun, "perform", perform)
    with pytest.raises(DeployFailed) as caught:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    run = fake[-1]
    assert caught.value.exit_code == 6 and "another cutover of shop is still running" in str(caught.value)
    assert not any(s.phase == Phase.MARK_BAD for s in run.executed)
    assert f"release {NEW} is not marked bad" in str(caught.value)
    assert [s.host for s in run.executed if s.phase == Phase.CUTOVER and s.action.params["mode"] == "rollback"] \
        == ["web1"]  # the host that took over goes back
    assert not any(s.action.unlock for s in run.executed if s.phase == Phase.FINISH)  # the lock is kept


def test_the_migration_runs_only_while_the_lock_is_this_runs(fake, tmp_path, monkeypatch):
    """The migrate script's guard, run by bash against a lock another run took (and none at all):
    exit 4, "lock lost", the migration never started; the runner makes it a Locked error."""
    from deploy_kit import plan
    from deploy_kit.errors import RemoteCommandError
    stage = stage_of(STAGE.replace('celery_app = "shop"', f'celery_app = "shop"\ndeploy_to = "{tmp_path}"\n'
                                   f'python = "{sys.executable}"'))
    script = plan.migrate_script(stage, NEW, "t0k3n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemd-run").write_text(f"#!/bin/sh\ntouch {tmp_path / 'migrated'}\n")
    (bin_dir / "systemd-run").chmod(0o755)
    lock = tmp_path / ".deploy-kit" / "lock"
    lock.mkdir(parents=True)
    for holder, code in (("another-run", 4), ("t0k3n", 0)):
        (lock / "holder.json").write_text(json.dumps({"who": "x", "token": holder}))
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True,
                              env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), timeout=30)
        assert done.returncode == code and (tmp_path / "migrated").exists() == (code == 0), done.stderr
    assert done.returncode == 0

    class Remote:
        name = "web1"

        def run_script(self, text, **kwargs):
            raise RemoteCommandError("web1", "migrate", 4, "lock lost: the deploy lock of shop here is no longer "
                                     "this run's")

    run = Run(stage_of(), Mode.DEPLOY, say, ref="main", now=NOW)
    with pytest.raises(Locked, match="web1: lock lost"):
        run._script(Remote(), lifecycle.Step("web1", Phase.MIGRATE, "migrate", Script(script)), Script(script))


def test_a_run_that_lost_its_lock_before_the_migration_changes_nothing_more(fake, monkeypatch):
    real = FakeRun.perform

    def perform(self, remote, step):
        if step.phase == Phase.MIGRATE:
            raise Locked(f"{remote.name}: lock lost: the deploy lock of shop here is no longer this run's")
        return real(self, remote, step)

    monkeypatch.setattr(FakeRun, "perform", perform)
    said = []
    with pytest.raises(Locked, match="lock lost"):
        lifecycle.deploy(stage_of(), ref="main", say=lambda h, m: said.append(m), now=NOW)
    run = fake[-1]
    assert not any(s.phase in (Phase.CUTOVER, Phase.BEAT) for s in run.executed)
    assert "the lock is no longer this run's and was left as it is" in said[-1]
    assert "lock lost" in run.history.error


def local_stage(tmp_path, monkeypatch):
    """The sample stage on a real git repository here, packed by the real `Run.pack`."""
    from deploy_kit import runner

    repo = tmp_path / "shop"
    repo.mkdir()
    (repo / "requirements.txt").write_text("celery==5.5.0\n")
    for argv in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True)
    monkeypatch.setattr(FakeRun, "pack", Run.pack)
    monkeypatch.setattr(runner, "CACHE_DIR", tmp_path / "cache")
    return stage_of(STAGE.replace('repo = "git@example.com:acme/shop.git"', f'repo = "{repo}"'))


def shown_as_the_task_layer_shows_it(stage):
    """What `fab deploy` prints and exits with: `ui.user_errors` around the deploy."""
    from invoke import Exit

    from deploy_kit import ui
    with pytest.raises(Exit) as caught, ui.user_errors():
        lifecycle.deploy(stage, ref="HEAD", say=say, now=NOW)
    return caught.value.code, str(caught.value.message)


def nothing_changed_and_unlocked(run):
    assert {s.phase for s in run.executed} <= {Phase.LOCK, Phase.UNDO, Phase.FINISH}  # nothing built or switched
    assert all(s.action.unlock for s in run.executed if s.phase == Phase.FINISH)
    assert run.history.result is Result.FAILED


def test_a_failed_git_archive_exits_9_with_its_cause_and_changes_nothing(fake, tmp_path, monkeypatch):
    stage = local_stage(tmp_path, monkeypatch)
    real = release._run_git

    def git(argv):
        if "archive" in argv:
            return subprocess.CompletedProcess(argv, 128, b"", b"fatal: not a valid object name")
        return real(argv)
    monkeypatch.setattr(release, "_run_git", git)
    code, message = shown_as_the_task_layer_shows_it(stage)
    assert code == 9 and message.startswith("error: git archive --format=tar.gz ") and "not a valid object" in message
    assert "Traceback" not in message
    nothing_changed_and_unlocked(fake[-1])


def test_a_failed_pip_download_exits_9_with_its_cause_and_changes_nothing(fake, tmp_path, monkeypatch):
    from deploy_kit import wheels

    stage = local_stage(tmp_path, monkeypatch)
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: Location 'x' is ignored\n"
                                         "ERROR: No matching distribution found for celery==5.5.0\n")
    real = subprocess.run
    monkeypatch.setattr(wheels.subprocess, "run", lambda argv, **kw: failed if "pip" in argv else real(argv, **kw))
    code, message = shown_as_the_task_layer_shows_it(stage)
    assert code == 9 and message.startswith("error: could not fetch wheels for Python ")
    assert "No matching distribution found for celery==5.5.0" in message and "WARNING: Location" not in message
    assert "Fix: make sure every requirement has a wheel" in message and "Traceback" not in message
    nothing_changed_and_unlocked(fake[-1])


SETTLED = [s for s in CutoverStatus if s != CutoverStatus.RUNNING]  # what a followed cutover ends as


def recorded(params: dict, status: CutoverStatus) -> CutoverState:
    """A host's state file as its cutover program leaves it, read back by the follower."""
    live = params["target"] if status == CutoverStatus.DONE else params["previous"]
    failure = "" if status == CutoverStatus.DONE else "verify: no worker completed the task in time"
    return CutoverState.from_json(
        f'{{"id": "{params["id"]}", "mode": "{params["mode"]}", "target": "{params["target"]}", '
        f'"previous": "{params["previous"]}", "status": "{status.value}", "step": "verify", "steps": [], '
        f'"journal": [], "started": 1764590000.0, "pid": 4242, "live": "{live}", "failure": "{failure}", '
        f'"rollback_failure": "{"" if status != CutoverStatus.ROLLBACK_FAILED else "give back: broker down"}"}}')


@pytest.mark.parametrize("web1", SETTLED, ids=lambda s: f"web1={s.value}")
@pytest.mark.parametrize("web2", SETTLED, ids=lambda s: f"web2={s.value}")
def test_the_decision_table_for_every_pair_of_host_results(fake, monkeypatch, web1, web2):
    """Every combination of two hosts' recorded cutover results: who hands back, whether the
    lock is kept, the exit code. The hosts whose workers took over go back when another did not;
    the stage exits 5 when every host is back where it was, 6 otherwise; the lock is kept while a
    host's state is not known."""
    results = {"web1": web1, "web2": web2}

    original = FakeRun.perform
    monkeypatch.setattr(FakeRun, "perform", lambda self, remote, step: recorded(
        step.action.params, results[remote.name]) if isinstance(step.action, Cutover)
        and step.action.params["mode"] == "deploy" else original(self, remote, step))

    ok = web1 == web2 == CutoverStatus.DONE
    back = [] if ok else sorted(h for h, s in results.items() if s == CutoverStatus.DONE)
    after = {h: CutoverStatus.ROLLED_BACK if h in back else s for h, s in results.items()}
    code = 0 if ok else 5 if all(s in (CutoverStatus.ROLLED_BACK, CutoverStatus.NOT_STARTED)
                                 for s in after.values()) else 6
    unlocked = all(s not in (CutoverStatus.ROLLBACK_FAILED, CutoverStatus.UNKNOWN) for s in after.values())
    if ok:
        lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    else:
        with pytest.raises(DeployFailed) as caught:
            lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
        assert caught.value.exit_code == code
    run = fake[-1]
    handed_back = [s.host for s in run.executed if isinstance(s.action, Cutover)
                   and s.action.params["mode"] == "rollback"]
    assert handed_back == back
    assert [s.action.unlock for s in run.executed if s.phase == Phase.FINISH] == [unlocked] * 2
    assert any(s.phase == Phase.BEAT for s in run.executed) == ok  # Beat moves only after every host took over


def test_the_cutover_runs_on_every_host_at_once_whatever_parallel_says(fake, monkeypatch):
    """`parallel` bounds connecting, building and finishing; the cutover is one wave (a batch that
    waited for another would leave the stage split meanwhile)."""
    from deploy_kit import parallel, session

    lifecycle.deploy(stage_of(), ref="main", say=say, now=NOW)
    waves = fake[-1].session.waves
    assert [once for what, once in waves if what == "cutover"] == [True, True]  # the workers, then Beat
    assert not any(once for what, once in waves if what != "cutover")
    limits = []
    monkeypatch.setattr(parallel, "each", lambda items, work, **kw: limits.append(kw["limit"]) or {})
    real = session.Session.__new__(session.Session)  # the real Session.each, over two hosts
    real.stage = stage_of()
    real.hosts, real.remotes = real.stage.hosts, {h.name: h for h in real.stage.hosts}
    real.each(lambda r: None, what="building")
    real.each(lambda r: None, what="cutover", all_at_once=True)
    assert limits == [real.stage.parallel, 2]


def test_a_queue_summary_the_cutover_could_not_read_is_unknown_and_a_failed_deploy_reads_it_after_the_way_back(fake):
    FakeRun.report = UNREAD + "the broker cannot be reached"
    said = []
    lifecycle.deploy(stage_of(ONE_HOST), ref="main", say=lambda host, message: said.append(message), now=NOW)
    assert said[-1] == "queues: unknown (the broker cannot be reached)"
    FakeRun.report = "{}"
    FakeRun.cutover_status = {"web1": CutoverStatus.ROLLED_BACK}
    with pytest.raises(DeployFailed):
        lifecycle.deploy(stage_of(ONE_HOST), ref="main", say=say, now=NOW)
    assert fake[-1].summarized  # read alongside the finish, once the stage is back: what the cutover read is gone
