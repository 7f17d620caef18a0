"""The host library every host program shares: one env-file rule, one way to run as the service,
one `systemctl show` parser, the lock (with tmp_path and a fake runner; no host needed)."""

import json
import os

import pytest

from deploy_kit.remote import hostlib
from deploy_kit.remote.contracts import LockHolder


def test_env_file_forms_read_as_systemd_reads_them():
    text = ("# a comment\n; another\n\nexport A=1\nB='two words'\nC=\"say \\\"hi\\\" \\\\ok\"\nD=\n"
            "  E = spaced \nnot an assignment\n9BAD=x\nB=last wins\n")
    assert hostlib.env_values(text) == {"A": "1", "B": "last wins", "C": 'say "hi" \\ok', "D": "", "E": "spaced"}
    assert [n for n, _k, _v in hostlib.env_entries(text.splitlines())] == [3, 4, 5, 6, 7, 10]


def test_service_argv_runs_as_the_units_run_in_the_given_directory():
    argv = hostlib.service_argv(["User=shop", "WorkingDirectory=/srv/shop/current", "ProtectSystem=strict"],
                                "/srv/shop/releases/R", ["python", "-c", "print(1)"])
    assert argv == ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec",
                    "-p", "User=shop", "-p", "WorkingDirectory=/srv/shop/releases/R", "-p", "ProtectSystem=strict",
                    "--", "python", "-c", "print(1)"]


def test_as_service_reads_the_last_ok_or_fail_line():
    seen = []

    def runner(argv, stdin=None, timeout=60):
        seen.append((argv, stdin))
        return 1, "noise\nfail redis refused the password\n", ""

    result = hostlib.as_service(["User=shop"], "/", ["python", "-c", "x"], runner=runner, stdin="the program")
    assert result == {"ok": False, "detail": "redis refused the password", "exit_code": 1}
    assert seen[0][0][:2] == ["systemd-run", "--quiet"] and seen[0][1] == "the program"
    ok = hostlib.as_service([], "/", ["true"], runner=lambda argv, stdin=None, timeout=60: (0, "ok 12 tasks\n", ""))
    assert ok == {"ok": True, "detail": "12 tasks"}


def test_systemctl_show_is_parsed_once_for_everyone():
    assert hostlib.parse_show("ActiveState=active\nSubState=running\nExecMainStatus=\nbroken\n") == \
        {"ActiveState": "active", "SubState": "running", "ExecMainStatus": ""}
    shown = hostlib.show("x.service", "ActiveState", runner=lambda argv: (0, "ActiveState=failed\n", ""))
    assert shown == {"ActiveState": "failed"}


def test_the_lock_goes_to_one_run_and_names_its_holder(tmp_path):
    state = str(tmp_path / ".deploy-kit")
    mine = {"who": "alice", "host": "laptop", "action": "deploy", "ref": "main", "since": "t", "token": "a1"}
    assert hostlib.take_lock(state, mine) == {"acquired": True, "holder": mine}
    assert json.loads((tmp_path / ".deploy-kit" / "lock" / "holder.json").read_text()) == mine  # LockHolder's JSON
    other = dict(mine, who="bob", token="b2")
    assert hostlib.take_lock(state, other) == {"acquired": False, "holder": mine}
    (tmp_path / ".deploy-kit" / "lock" / "holder.json").write_text("{not json")
    refused = hostlib.take_lock(state, other)["holder"]
    assert LockHolder.from_data(refused) == LockHolder.unreadable(fresh=True)


def test_the_lock_is_released_only_by_its_own_run_and_read_by_one_rule(tmp_path):
    state = str(tmp_path / ".deploy-kit")
    assert hostlib.read_lock(state) is None
    hostlib.take_lock(state, {"who": "alice", "token": "t1"})
    assert hostlib.read_lock(state) == LockHolder("alice", "?", "?", "?", "?", "t1")
    assert hostlib.release_lock(state, "t2") is False and hostlib.read_lock(state) is not None
    assert hostlib.release_lock(state, "t1") is True and hostlib.read_lock(state) is None
    os.makedirs(os.path.join(state, "lock"))  # a lock without its holder file: being taken this instant,
    assert hostlib.read_lock(state) == LockHolder.unreadable(fresh=True)
    os.utime(os.path.join(state, "lock"), (0, 0))  # or left by a crash mid-take
    assert hostlib.read_lock(state) == LockHolder.unreadable(fresh=False)
    assert hostlib.release_lock(state, "t1") is False


def test_an_unreadable_holder_is_described_one_way_everywhere(tmp_path):
    """hostlib (take, read), the laptop's parsers and `fab status` all say the same of it."""
    from deploy_kit import history
    from deploy_kit import status as status_lib
    from deploy_kit.remote import status

    state = tmp_path / ".deploy-kit"
    (state / "lock").mkdir(parents=True)
    (state / "lock" / "holder.json").write_text("[1, 2]")  # JSON, but not a holder
    read = hostlib.read_lock(str(state))
    assert read.describe() == "held, holder unknown (no readable holder file)" and not read.readable
    shown = json.dumps({"holder": read.to_data(), "cutovers": []})
    assert history.parse_lock_state(shown).holder.describe() == read.describe()
    assert status_lib.last_history(None) is None
    assert LockHolder.from_data(json.loads(json.dumps(read.to_data()))) == read
    (state / "history.jsonl").write_text('{"action": "deploy", "result": "success", "when": "w", "who": "a"}\n{torn')
    assert "unreadable" in status.last_history(str(state / "history.jsonl"))


def test_fab_unlock_breaks_the_lock_whoever_holds_it_and_says_what_runs(tmp_path, monkeypatch, capsys):
    from deploy_kit import history
    from deploy_kit.remote import lock

    state = str(tmp_path / ".deploy-kit")
    hostlib.take_lock(state, {"who": "alice", "token": "t1"})
    listed = "shop-cutover-1.service loaded active running deploy-kit cutover\n"
    monkeypatch.setattr(hostlib, "run", lambda argv, **kw: (0, listed if "list-units" in argv else "", ""))
    lock.main({"state_dir": state, "app": "shop"})
    seen = history.parse_lock_state(capsys.readouterr().out)
    assert seen.holder.who == "alice" and seen.cutovers == ("shop-cutover-1.service",)
    lock.main({"state_dir": state, "app": "shop", "break": True})
    assert history.parse_lock_state(capsys.readouterr().out).holder is None and hostlib.read_lock(state) is None
    assert hostlib.break_lock(state) is False


def test_list_units_is_parsed_once_for_everyone():
    out = ("shop-worker-default@2026-11-24-120000.service loaded active running Celery\n"
           "shop-worker-default@2026-11-23-120000.service loaded deactivating stop-sigterm Celery\n"
           "shop-beat.service not-found inactive dead shop-beat.service\n\nbroken\n")
    asked = []
    found = hostlib.list_units(["shop-*"], "active,activating", runner=lambda argv: asked.append(argv) or (0, out, ""))
    assert found == {"shop-worker-default@2026-11-24-120000.service": "active",
                     "shop-worker-default@2026-11-23-120000.service": "deactivating",
                     "shop-beat.service": "inactive"}
    assert asked == [["systemctl", "list-units", "--plain", "--no-legend", "--all", "shop-*",
                      "--state=active,activating"]]


def test_a_release_is_marked_bad_with_when_which_run_and_why_once(tmp_path):
    """One mark for the cutover and the stage's way back: the first one, with its reason, stays."""
    release = tmp_path / "releases" / "2026-11-24-120000"
    assert hostlib.mark_bad(str(release), "r1", "gone") is False and not release.exists()  # not on this host
    release.mkdir(parents=True)
    assert hostlib.mark_bad(str(release), "r1", "verify failed") is True
    assert hostlib.mark_bad(str(release), "r2", "the stage was handed back") is False
    mark = json.loads((release / ".deploy-kit" / "BAD").read_text())
    assert mark["id"] == "r1" and mark["reason"] == "verify failed" and mark["when"] > 0


def test_a_value_of_blanks_is_not_set():
    assert [hostlib.is_set(v) for v in ("", "  ", "\t", "x", " x ")] == [False, False, False, True, True]


def test_a_dollar_in_a_command_reaches_the_service_as_written():
    """systemd expands $NAME and ${NAME} in what it runs: every `$` goes as `$$`."""
    argv = hostlib.service_argv([], "/srv", ["python", "-c", 'print(f"${len(x)}$HOME$$")'])
    assert argv[-1] == 'print(f"$${len(x)}$$HOME$$$$")'


def test_a_lock_whose_holder_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    """A full disk while the holder file is written: no lock without a holder (nobody could release it)."""
    state = str(tmp_path / ".deploy-kit")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hostlib.contracts.LockHolder, "to_json", full)
    with pytest.raises(OSError):
        hostlib.take_lock(state, {"who": "alice", "token": "t1"})
    assert hostlib.read_lock(state) is None
