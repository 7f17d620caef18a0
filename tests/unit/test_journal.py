"""Journal lines: parsing `journalctl -o json`, hints on classic failures, the remote command."""

import json

from deploy_kit import journal

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
    assert "-u a.service -u b.service" in command and "--grep Error" in command
    # The outer sh -c quoting of the inner quote: exactly one way, so the host sees one argument.
    assert "--since '\"'\"'10 min ago'\"'\"'" in command
    pattern = journal.journal_command(["a@*.service"], grep="x y", follow=False)
    assert pattern.endswith(" -u 'a@*.service' --grep 'x y'")  # no sh -c wrapper when not following
    assert "cat <&3" in command and "kill $j" in command and "--follow" in command
    resumed = journal.journal_command(["a.service"], since="10 min ago", lines=5, after_cursor="s=1")
    assert "--after-cursor s=1" in resumed and "--since" not in resumed and "-n 5" not in resumed
    listing = journal.journal_command(["a.service"], lines=3, follow=False)
    assert "--follow" not in listing and "-n 3" in listing and "cat <&3" not in listing
