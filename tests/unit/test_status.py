"""`fab status` says what a cut-off deploy or rollback left unfinished, and how to finish it."""

from deploy_kit import status

from .samples import BEAT, stage_of

NEW, OLD = "2026-11-24-123000", "2026-11-24-120000"


def host(name, current, *, beat_runs=None, lock=None, cutovers=()):
    stage = stage_of()
    return status.HostStatus(stage.host(name), current, {}, (), {}, lock, None, tuple(cutovers),
                             {BEAT: beat_runs} if beat_runs is not None else {})


def test_a_consistent_stage_has_nothing_unfinished():
    assert status.unfinished(stage_of(), [host("web1", NEW, beat_runs=NEW), host("web2", NEW)]) == []


def test_hosts_on_different_releases_and_a_beat_left_behind_are_named_with_the_fix():
    found = status.unfinished(stage_of(), [host("web1", NEW, beat_runs=OLD, lock={"who": "ci"}), host("web2", OLD)])
    assert f"web1: {NEW}, web2: {OLD}" in found[0] and "`fab deploy --stage prod`" in found[0]
    assert f"{BEAT} still runs {OLD}, though current is {NEW}" in found[1]
    assert "`fab unlock --stage prod` first" in found[2]


def test_a_cutover_that_still_runs_is_waited_for_not_finished():
    found = status.unfinished(stage_of(), [host("web1", NEW, cutovers=["shop-cutover-1"]), host("web2", OLD)])
    assert len(found) == 1 and "ends by itself" in found[0]


def test_the_reporting_host_brings_the_queues_report_and_another_host_none():
    import json

    from .test_queues import agent_report

    stage = stage_of()
    base = {"current": NEW, "units": {}, "ping": {}}
    parsed = status.parse(stage.host("web1"), json.dumps({**base, "queues": {"answers": [agent_report()]}}))
    assert [q.name for q in parsed.queues.queues] == ["celery", "mail", "reports"]
    failed = status.parse(stage.host("web1"), json.dumps({**base, "queues": {"error": "no release is live"}}))
    assert failed.queues == "no release is live"
    assert status.parse(stage.host("web2"), json.dumps(base)).queues is None
    assert "agent" in status.program(stage, stage.host("web1")) and '"agent": null' in status.program(
        stage, stage.host("web2"))


def test_the_host_reads_the_last_history_line_and_the_lock_typed_and_fab_status_shows_them(tmp_path):
    """`remote/status.py` parses the last line with HistoryLine (an old line with `from` too) and the
    holder with LockHolder; `status.parse` reads both back typed; a torn line is said, not guessed."""
    import json

    from deploy_kit.remote import hostlib
    from deploy_kit.remote import status as on_host
    from deploy_kit.remote.contracts import HistoryLine, LockHolder, Mode, Result

    old = {"action": "deploy", "result": "success", "when": "2026-11-24T12:30:00+00:00", "who": "alice",
           "from": "laptop", "release": NEW}
    (tmp_path / "history.jsonl").write_text("{}\n" + json.dumps(old) + "\n")
    hostlib.take_lock(str(tmp_path), {"who": "bob", "host": "ci", "action": "rollback", "ref": "x", "since": "t"})
    last = on_host.last_history(str(tmp_path / "history.jsonl"))
    assert last["origin"] == "laptop" and last["action"] == "deploy" and last["result"] == "success"
    holder = hostlib.read_lock(str(tmp_path))
    base = {"current": NEW, "units": {}, "ping": {}, "last": last, "lock": holder.to_data()}
    parsed = status.parse(stage_of().host("web1"), json.dumps(base))
    assert isinstance(parsed.last, HistoryLine) and (parsed.last.action, parsed.last.result) == \
        (Mode.DEPLOY, Result.SUCCESS)
    assert f"last {parsed.last.action}: {parsed.last.result}" == "last deploy: success"  # what `fab status` prints
    assert parsed.lock == holder == LockHolder("bob", "ci", "rollback", "x", "t")
    (tmp_path / "history.jsonl").write_text(json.dumps(old) + "\n{torn")
    torn = status.parse(stage_of().host("web1"), json.dumps({**base, "lock": None, "last": on_host.last_history(
        str(tmp_path / "history.jsonl"))}))
    assert isinstance(torn.last, str) and "torn" in torn.last and torn.lock is None
    assert on_host.last_history(str(tmp_path / "none.jsonl")) is None


def test_an_instance_still_finishing_its_tasks_after_a_handover_shows_as_draining(monkeypatch):
    """`fab status` during a handover's drain: the new instance serves, the old one (systemd's
    `deactivating`: a warm shutdown finishing its running tasks) shows as draining, both listed."""
    import io
    import json

    from invoke import Context
    from rich.console import Console

    from deploy_kit import ui
    from deploy_kit.tasks import deploy as deploy_tasks

    stage = stage_of()
    new, old = f"shop-worker-default@{NEW}.service", f"shop-worker-default@{OLD}.service"
    recorded = {  # what remote/status.py printed on a host right after a deploy (trimmed)
        "current": NEW, "revision": {}, "lock": None, "last": None, "cutovers": [],
        "units": {new: {"ActiveState": "active", "SubState": "running", "ActiveEnterTimestamp":
                        "Tue 2026-11-24 12:30:05 UTC", "NRestarts": "0", "MainPID": "812", "LoadState": "loaded"},
                  old: {"ActiveState": "deactivating", "SubState": "stop-sigterm", "ActiveEnterTimestamp":
                        "Tue 2026-11-24 12:00:04 UTC", "NRestarts": "0", "MainPID": "377", "LoadState": "loaded"}},
        "ping": {new: "pong"}}
    parsed = status.parse(stage.host("web2"), json.dumps(recorded))
    out = io.StringIO()
    monkeypatch.setattr(deploy_tasks, "load_stage", lambda name: stage)
    monkeypatch.setattr(status, "gather", lambda chosen: [parsed])
    monkeypatch.setattr(ui, "make_console", lambda: Console(file=out, width=160, color_system=None))
    deploy_tasks.status(Context())
    rows = {unit: next(line for line in out.getvalue().splitlines() if unit in line) for unit in (new, old)}
    assert "draining" in rows[old] and "deactivating" not in rows[old]
    assert "active/running" in rows[new] and "pong" in rows[new] and "draining" not in rows[new]
