"""Journal lines: parsing `journalctl -o json`, hints on classic failures, the remote command."""

import json
import queue
import threading
from types import SimpleNamespace

import pytest
from invoke import Context, Exit

from deploy_kit import journal, ui
from deploy_kit.errors import EXIT_HOST, ConnectError
from deploy_kit.tasks import logs as logs_task

from . import samples

ENTRY = {"__CURSOR": "s=abc;i=1", "__REALTIME_TIMESTAMP": "1764000000000000", "PRIORITY": "4",
         "_SYSTEMD_UNIT": "shop-worker-default.service", "MESSAGE": "ledger.tasks: echo: hi"}


def test_parse_a_recorded_line():
    line = journal.parse_line("web1", json.dumps(ENTRY))
    assert (line.host, line.unit, line.priority, line.message, line.cursor) == (
        "web1", "shop-worker-default", 4, "ledger.tasks: echo: hi", "s=abc;i=1")
    assert line.timestamp.year == 2025
    assert json.loads(line.as_json())["unit"] == "shop-worker-default"


def test_parse_binary_messages_and_systemd_lines():
    entry = dict(ENTRY, MESSAGE=list(b"caf\xc3\xa9"), _SYSTEMD_UNIT="init.scope", UNIT="shop-beat.service")
    line = journal.parse_line("web1", json.dumps(entry))
    assert line.message == "café" and line.unit == "shop-beat"
    assert journal.parse_line("web1", "not json") is None
    assert journal.parse_line("web1", json.dumps({"MESSAGE": "no cursor"})) is None


def test_hints_for_the_classic_failures():
    assert "virtualenv" in journal.hint_for("ModuleNotFoundError: No module named 'payments'")
    assert "env file" in journal.hint_for("django.core.exceptions.ImproperlyConfigured: SECRET_KEY")
    assert "service user" in journal.hint_for("PermissionError: [Errno 13] Permission denied: '/srv/x'")
    assert "broker" in journal.hint_for("Cannot connect to redis://:**@10.0.0.1:6379/0: Error 111 connecting")
    assert "credentials" in journal.hint_for("redis.exceptions.AuthenticationError: WRONGPASS invalid password")
    assert journal.hint_for("Task ledger.tasks.echo succeeded") is None


def test_banner_lines_are_noise_but_tracebacks_are_not():
    for line in (" -------------- default@web1 v5.7.0", "--- ***** ----- ", "[tasks]", "  . ledger.tasks.echo",
                 "                .> celery exchange=celery(direct)", ""):
        assert journal.is_banner(line), line
    for line in ('  File "/srv/app/ledger/tasks.py", line 3, in <module>', "celery.apps.worker: default@web1 ready.",
                 "ModuleNotFoundError: No module named 'x'"):
        assert not journal.is_banner(line), line


def test_the_follow_command_ends_with_its_channel_and_filters_on_the_host():
    command = journal.journal_command(["a.service", "b.service"], since="10 min ago", grep="Error", follow=True)
    assert command.startswith("sudo -n -- /bin/sh -c ")
    assert "_SYSTEMD_UNIT=a.service + UNIT=a.service _PID=1 + COREDUMP_UNIT=a.service + _SYSTEMD_UNIT=b.service" \
        in command and "--grep Error" in command
    # The outer sh -c quoting of the inner quote: exactly one way, so the host sees one argument.
    assert "--since '\"'\"'10 min ago'\"'\"'" in command
    pattern = journal.journal_command(["a@*.service"], grep="x y", follow=False)
    assert pattern.endswith(" SYSLOG_IDENTIFIER=a --grep 'x y'")  # no sh -c wrapper when not following
    assert "cat <&3" in command and "kill $j" in command and "--follow" in command
    resumed = journal.journal_command(["a.service"], since="10 min ago", lines=5, after_cursor="s=1")
    assert "--after-cursor s=1" in resumed and "--since" not in resumed and "-n 5" not in resumed
    listing = journal.journal_command(["a.service"], lines=3, follow=False)
    assert "--follow" not in listing and "-n 3" in listing and "cat <&3" not in listing


# HostStream over fake connections: each channel replays its lines, then ends with an exit
# status, or without one (None): the connection dropped, as paramiko reports it (-1).

class FakeChannel:
    def __init__(self, lines, status, stderr=b"", hold=False):
        self.chunks = [json.dumps(line).encode() + b"\n" for line in lines]
        self.status, self.stderr, self.command = status, stderr, None
        self.closed = threading.Event()
        if not hold:  # a held channel, like a followed journal, ends when it is closed
            self.closed.set()

    def exec_command(self, command):
        self.command = command

    def recv(self, size):
        if self.chunks:
            return self.chunks.pop(0)
        self.closed.wait()
        return b""

    def recv_exit_status(self):
        return -1 if self.status is None else self.status

    def recv_stderr(self, size):
        return self.stderr

    def close(self):
        self.closed.set()


class FakeHosts:
    """`journal.connect` for one host: each call takes the next outcome, a channel (one SSH
    connection running one journalctl) or an exception (the host cannot be reached)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.channels = []

    def connect(self, host, ssh):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        self.channels.append(outcome)
        transport = SimpleNamespace(is_active=lambda: True, open_session=lambda timeout: outcome)
        return SimpleNamespace(connection=SimpleNamespace(transport=transport), close=lambda: None)

    def commands(self):
        return [channel.command for channel in self.channels]


def entry(i):
    return dict(ENTRY, __CURSOR=f"s=abc;i={i}", MESSAGE=f"line {i}")


def listing(monkeypatch, hosts, stop_at_a_line=False, **options):
    """Run one host's stream to its end (or stop it at its first line); its items, in order."""
    monkeypatch.setattr(journal, "connect", hosts.connect)
    stage = samples.stage_of()
    out = queue.Queue()
    options = {"since": None, "lines": None, "grep": None, "follow": False, **options}
    stream = journal.HostStream(stage.host("web1"), stage, out, units=["a.service"], backoff=0, max_backoff=0,
                                **options)
    items = []
    for item in journal.merged([stream], out):
        items.append(item)
        if stop_at_a_line and isinstance(item, journal.JournalLine):
            stream.stop()
    return items


def messages(items):
    return [item.message for item in items if isinstance(item, journal.JournalLine)]


def test_a_listing_resumes_from_its_cursor_when_the_connection_drops(monkeypatch):
    hosts = FakeHosts(FakeChannel([entry(1), entry(2)], None), FakeChannel([entry(3), entry(4)], 0))
    items = listing(monkeypatch, hosts)
    assert messages(items) == ["line 1", "line 2", "line 3", "line 4"]
    assert "--after-cursor 's=abc;i=2'" in hosts.commands()[1]
    assert not any(isinstance(item, journal.HostEvent) and item.fatal for item in items)


def test_a_listing_that_cannot_resume_is_reported_incomplete(monkeypatch):
    gone = ConnectError("web1", "connection refused")
    hosts = FakeHosts(FakeChannel([entry(1)], None), *[gone] * journal.LISTING_RESUMES)
    items = listing(monkeypatch, hosts)
    assert messages(items) == ["line 1"]
    fatal = [item.message for item in items if isinstance(item, journal.HostEvent) and item.fatal]
    assert fatal == ["incomplete: cut after 1 line (connection refused)"]
    assert not hosts.outcomes  # every try of the budget was used, and no more


def test_a_drop_before_the_first_line_repeats_the_request_exactly(monkeypatch):
    hosts = FakeHosts(FakeChannel([], None), FakeChannel([entry(1), entry(2), entry(3)], 0))
    items = listing(monkeypatch, hosts, lines=3, since="10 min ago")
    assert messages(items) == ["line 1", "line 2", "line 3"]
    first, again = hosts.commands()
    assert again == first and "-n 3" in first


def test_a_drop_after_some_lines_resumes_after_them_for_the_rest_of_the_window(monkeypatch):
    # Asked for the last 3 lines; 1 was shown. The resumed listing also holds a line written since:
    # the window is the one of the first request, so it ends after 2 more.
    hosts = FakeHosts(FakeChannel([entry(1)], None), FakeChannel([entry(2), entry(3), entry(4)], 0))
    items = listing(monkeypatch, hosts, lines=3)
    assert messages(items) == ["line 1", "line 2", "line 3"]
    resumed = hosts.commands()[1]
    assert "--after-cursor 's=abc;i=1'" in resumed and "-n 3" not in resumed


def test_following_retries_an_unreachable_host_until_it_answers(monkeypatch):
    hosts = FakeHosts(ConnectError("web1", "no route to host"), FakeChannel([entry(1)], None, hold=True))
    items = listing(monkeypatch, hosts, stop_at_a_line=True, follow=True)
    events = [(item.message, item.error, item.fatal) for item in items if isinstance(item, journal.HostEvent)]
    assert events == [
        ("unreachable (no route to host); retrying with backoff, the other hosts keep streaming", True, False),
        ("reconnected; resuming after the last line shown", False, False)]
    assert messages(items) == ["line 1"] and "--follow" in hosts.commands()[0]


def test_no_follow_reports_an_unreachable_host_once_and_ends(monkeypatch, capsys):
    """web2 cannot be reached: web1's lines are printed, web2 is named once, the exit code is 7."""
    # Should web2 be retried, its second outcome ends its stream with an error rather than hang the test.
    outcomes = {"web1": FakeHosts(FakeChannel([entry(1), entry(2)], 0)),
                "web2": FakeHosts(ConnectError("web2", "no route to host"), RuntimeError("retried"))}
    monkeypatch.setattr(journal, "connect", lambda host, ssh: outcomes[host.name].connect(host, ssh))
    monkeypatch.setattr(logs_task, "load_stage", lambda name: samples.stage_of())
    monkeypatch.setattr(ui, "interruptible", lambda: None)
    with pytest.raises(Exit) as info:
        logs_task.logs(Context(), follow=False)
    assert info.value.code == EXIT_HOST
    assert str(info.value.message).count("web2: unreachable: no route to host") == 1
    out = capsys.readouterr().out
    assert "line 1" in out and "line 2" in out


def test_every_instance_of_a_worker_service_is_matched_even_one_started_later():
    """journalctl resolves `-u 'X@*.service'` once, when it starts: a stream started before a
    deploy would miss the new instance. Its SyslogIdentifier, the same for every instance, does not."""
    from deploy_kit import units

    stage = samples.stage_of()
    host = stage.host("web1")
    argv = journal.matches(journal.units_for(stage, host, ["default"]))
    assert not any(word == "-u" or "*" in word for word in argv)
    unit = units.worker_unit(stage, stage.workers[0]).content
    identifier = next(line for line in unit.splitlines() if line.startswith("SyslogIdentifier="))
    assert identifier.replace("SyslogIdentifier=", "SYSLOG_IDENTIFIER=") in argv
    legacy = stage.workers[0].legacy_unit(stage.app)
    assert argv[argv.index(f"_SYSTEMD_UNIT={legacy}") - 1] == "+"  # OR-ed: each term alone is enough


def test_odd_journal_fields_are_read_never_raised():
    """journald sends a field an entry has twice as an array, a non-UTF-8 one as bytes."""
    odd = {"__CURSOR": "s=1", "MESSAGE": ["first", "second"], "SYSLOG_IDENTIFIER": ["a", "b"],
           "PRIORITY": [51], "__REALTIME_TIMESTAMP": "x"}
    line = journal.parse_line("web1", json.dumps(odd))
    assert (line.message, line.unit, line.priority) == ("first\nsecond", "a\nb", 3)
    assert journal.parse_line("web1", json.dumps({"__CURSOR": ["s=1"]})) is None


def test_stderr_lines_a_reader_takes_are_left_out_and_only_newlines_end_a_line():
    from deploy_kit.ssh import _Lines

    taken = []
    lines = _Lines(lambda text: taken.append(text) or text.startswith("{"))
    for chunk in (b'{"a": "x\xe2\x80\xa8y"}\nrefused: ', b"another cutover runs\n{\"b\"", b": 1}"):
        lines.add(chunk)
    assert lines.end() == b"refused: another cutover runs\n"
    assert taken == ['{"a": "x\u2028y"}', "refused: another cutover runs", '{"b": 1}']
