"""The journals of the app's units on many hosts, as one merged live stream.

One `journalctl -o json` per host, on a channel of that host's SSH connection, filtered on
the host (units, --since, -n, --grep), so only the wanted lines cross the network. Each
line carries its journal cursor: a host that drops is reported once, reconnected with
backoff, and resumed after the last line shown, with nothing duplicated or skipped. A listing
(no follow) is finished the same way, within LISTING_RESUMES tries, or reported incomplete; a
host it cannot reach at all is reported unreachable at once. The remote journalctl is tied
to the channel's stdin, so it ends as soon as the channel does (Ctrl-C, a closed
connection): no journalctl is left running on a host.

`fab logs` uses this code; `fab deploy` shows the same lines (`journalctl`, `parse_line`) on
the channel that follows each cutover (`follow.py`).
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shlex
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import paramiko

from deploy_kit.config import Host, Stage
from deploy_kit.errors import DeployKitError
from deploy_kit.ssh import RemoteHost, connect

q = shlex.quote

# How many times a listing (no follow) cut by a dropped connection is resumed before the host is
# reported incomplete: 1+2+4+8+10 s of backoff.
LISTING_RESUMES = 5

# The classic reasons a Celery worker fails under systemd, and what each usually means.
HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"ModuleNotFoundError|ImportError|No module named"),
     "a module is missing from the release's virtualenv, or `celery -A` names the wrong module"),
    (re.compile(r"ImproperlyConfigured"),
     "a Django setting is missing or wrong: check the env file (`fab env.show`) and DJANGO_SETTINGS_MODULE"),
    (re.compile(r"Permission denied|PermissionError|EACCES"),
     "the service user may not read or write a path: `fab check` shows owners and modes"),
    (re.compile(r"[Cc]onnection refused|Error 111|Cannot connect to (redis|amqp)|Name or service not known"),
     "the broker does not answer: check CELERY_BROKER_URL and that the broker runs"),
    (re.compile(r"WRONGPASS|invalid password|NOAUTH|Authentication required|ACCESS_REFUSED|AuthenticationError"),
     "the broker refuses the credentials in CELERY_BROKER_URL"),
)


_BANNER = re.compile(r"^(\s|-|_|\*|\[tasks\]|\[queues\]|\[config\]|LocalTime ->|Configuration ->|celery beat v)")
_TRACE = re.compile(r'File "|Error|Exception|Traceback|refused|denied')


def is_banner(message: str) -> bool:
    """A line of Celery's start-up banner (versions, queues, task list): noise while deploying.
    Traceback lines, which also start with spaces, are never banner."""
    return not message.strip() or (bool(_BANNER.match(message)) and not _TRACE.search(message))


def hint_for(message: str) -> str | None:
    for pattern, hint in HINTS:
        if pattern.search(message):
            return hint
    return None


@dataclass(frozen=True)
class JournalLine:
    host: str
    unit: str
    timestamp: datetime
    priority: int
    message: str
    cursor: str

    def as_json(self) -> str:
        return json.dumps({"host": self.host, "unit": self.unit, "timestamp": self.timestamp.isoformat(),
                           "priority": self.priority, "message": self.message})


@dataclass(frozen=True)
class HostEvent:
    """Something about a host's stream itself (dropped, reconnected), not a journal line."""

    host: str
    message: str
    error: bool = True
    fatal: bool = False  # the host's stream ended for good (a bad option, no sudo)


def matches(units: Iterable[str]) -> list[str]:
    """journalctl matches (OR-ed) for `units`. Not `-u 'APP-worker-NAME@*.service'`: journalctl
    resolves a pattern once, against the units its journal knows when it starts, so a stream
    started before a deploy would never show the instance the deploy starts. Every instance of
    a worker service logs under the service's SyslogIdentifier (`units.py`), whatever its
    release: that identifier stands for the pattern. A unit named in full gets what `-u` gives
    (its processes, systemd's messages about it, its core dumps)."""
    terms: list[list[str]] = []
    for unit in units:
        if unit.endswith("@*.service"):
            terms.append([f"SYSLOG_IDENTIFIER={unit.removesuffix('@*.service')}"])
        else:
            terms += [[f"_SYSTEMD_UNIT={unit}"], [f"UNIT={unit}", "_PID=1"], [f"COREDUMP_UNIT={unit}"]]
    return [word for i, term in enumerate(terms) for word in ([] if i == 0 else ["+"]) + term]


def journalctl(units: Iterable[str], *, after_cursor: str | None = None) -> list[str]:
    """journalctl's words for the JSON lines of `units` (`parse_line` reads them), from after
    `after_cursor` when given; the caller adds the window (--since, -n) and --follow."""
    argv = ["journalctl", "--no-pager", "-o", "json", "--output-fields="
            "MESSAGE,PRIORITY,_SYSTEMD_UNIT,UNIT,SYSLOG_IDENTIFIER,__REALTIME_TIMESTAMP,__CURSOR",
            *matches(units)]
    return argv + ["--after-cursor", after_cursor, "--no-tail"] if after_cursor else argv


def journal_command(units: Iterable[str], *, since: str | None = None, lines: int | None = None,
                    grep: str | None = None, follow: bool = True, after_cursor: str | None = None) -> str:
    """The remote command: journalctl as root, ended as soon as the SSH channel closes."""
    argv = journalctl(units, after_cursor=after_cursor)
    if not after_cursor:
        if since:
            argv += ["--since", since]
        if lines is not None:
            argv += ["-n", str(lines)]
        elif since is None and follow:
            argv += ["-n", "10"]
    if grep:
        argv += ["--grep", grep]
    if follow:
        argv.append("--follow")
    journal = " ".join(q(a) for a in argv)
    if not follow:
        return f"sudo -n -- {journal}"
    # The watchdog: when the channel closes, stdin ends, and journalctl is killed with it.
    # (fd 3: a background job's stdin would otherwise be /dev/null, ending at once.)
    # (The watchdog must not hold stdout open, or a journalctl that ends by itself never shows EOF.)
    inner = (f"exec 3<&0; {journal} <&- & j=$!; "
             "(cat <&3 >/dev/null; kill $j 2>/dev/null) >/dev/null 2>&1 & wait $j")
    return f"sudo -n -- /bin/sh -c {q(inner)}"


def parse_line(host: str, raw: str | bytes) -> JournalLine | None:
    """One line of `journalctl -o json` (pure); None for what is not a journal entry."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("__CURSOR"), str):
        return None
    message = _text(entry.get("MESSAGE"))
    unit = _text(entry.get("_SYSTEMD_UNIT")) or _text(entry.get("UNIT")) or _text(entry.get("SYSLOG_IDENTIFIER")) \
        or "?"
    if unit in ("init.scope",) and _text(entry.get("UNIT")):
        unit = _text(entry.get("UNIT"))
    try:
        stamp = datetime.fromtimestamp(int(_text(entry.get("__REALTIME_TIMESTAMP")) or "0") / 1e6, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        stamp = datetime.fromtimestamp(0, UTC)
    try:
        priority = int(_text(entry.get("PRIORITY")) or 6)
    except (TypeError, ValueError):
        priority = 6
    return JournalLine(host, unit.removesuffix(".service"), stamp, priority, message, entry["__CURSOR"])


def _text(value: object) -> str:
    """A journal field as text: journald sends a non-UTF-8 value as an array of bytes, and a field
    an entry has more than once as an array of its values."""
    if value is None:
        return ""
    if isinstance(value, list):
        if all(isinstance(b, int) and 0 <= b < 256 for b in value):
            return bytes(value).decode(errors="replace")
        return "\n".join(_text(v) for v in value)
    return str(value)


class HostStream(threading.Thread):
    """Follows (or lists) one host's journal into `out`; reconnects by itself unless `remote` was given."""

    def __init__(self, host: Host, stage: Stage, out: queue.Queue[object], *, units: list[str],
                 since: str | None, lines: int | None, grep: str | None, follow: bool,
                 remote: RemoteHost | None = None, backoff: float = 1.0, max_backoff: float = 10.0):
        super().__init__(name=f"journal-{host.name}", daemon=True)
        self.host, self.stage, self.out = host, stage, out
        self.units, self.since, self.lines, self.grep, self.follow = units, since, lines, grep, follow
        self.remote = remote
        self.own_connection = remote is None
        self.cursor: str | None = None  # of the last line shown: a resume starts after it
        self.shown = 0
        self.stopping = threading.Event()
        self.channel: paramiko.Channel | None = None
        self.first_backoff, self.max_backoff = backoff, max_backoff

    def stop(self) -> None:
        self.stopping.set()
        channel = self.channel
        if channel is not None:
            with contextlib.suppress(Exception):  # its connection may be dead already
                channel.close()

    def run(self) -> None:
        try:
            self._follow()
        finally:
            if self.own_connection:
                self._drop_connection()
            self.out.put(None)  # this host is done, whatever happened

    def _follow(self) -> None:
        backoff = self.first_backoff
        down = False
        reached = False  # a listing only resumes on a host it reached once
        tries = 0  # resumes of a listing since its last new line
        while not self.stopping.is_set():
            shown = self.shown
            try:
                if self.remote is None:
                    self.remote = connect(self.host, self.stage.ssh)
                reached = True
                if down:
                    self.out.put(HostEvent(self.host.name, "reconnected; resuming after the last line shown",
                                           error=False))
                    down = False
                backoff = self.first_backoff
                self._stream()
                if not self.follow or self.stopping.is_set():
                    break
                raise ConnectionError("the journal stream ended")
            except (DeployKitError, paramiko.SSHException, OSError, EOFError, ConnectionError) as exc:
                if self.stopping.is_set():
                    break
                if not self.own_connection:
                    self.out.put(HostEvent(self.host.name, f"journal stream lost: {_reason(exc)}"))
                    break
                if self.shown > shown:
                    tries = 0
                if not self.follow and (not reached or tries == LISTING_RESUMES):
                    self.out.put(HostEvent(self.host.name, self._failed_listing(reached, exc), fatal=True))
                    break
                tries += 1
                if not down:
                    ahead = ("retrying with backoff, the other hosts keep streaming" if self.follow
                             else "retrying with backoff to finish the listing")
                    self.out.put(HostEvent(self.host.name, f"unreachable ({_reason(exc)}); {ahead}"))
                    down = True
                self._drop_connection()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    def _failed_listing(self, reached: bool, exc: BaseException) -> str:
        """Why a listing ends unfinished: the host was never reached, or it was cut and not resumed."""
        if not reached:
            return f"unreachable: {_reason(exc)}"
        return f"incomplete: cut after {self.shown} line{'' if self.shown == 1 else 's'} ({_reason(exc)})"

    def _drop_connection(self) -> None:
        if self.remote is not None and self.own_connection:
            with contextlib.suppress(Exception):  # closing a dead connection may fail in many ways
                self.remote.close()
            self.remote = None

    def _stream(self) -> None:
        """One journalctl on a new channel, until it ends by itself or is stopped; ConnectionError
        when the connection drops first. Resumed (after a line was shown), it starts after that
        line and lists no more than the rest of the first request's -n window; before any line,
        it repeats that request as it was."""
        assert self.remote is not None
        command = journal_command(self.units, since=self.since, lines=self.lines, grep=self.grep,
                                  follow=self.follow, after_cursor=self.cursor)
        transport = self.remote.connection.transport
        if transport is None or not transport.is_active():
            raise ConnectionError("the SSH connection is closed")
        channel = transport.open_session(timeout=15)
        self.channel = channel
        try:
            channel.exec_command(command)
            buffer = b""
            while not self.stopping.is_set():
                data = channel.recv(65536)
                if not data:
                    break
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    line = parse_line(self.host.name, raw)
                    if line is not None:
                        self.cursor = line.cursor
                        self.shown += 1
                        self.out.put(line)
                        if not self.follow and self.lines is not None and self.shown >= self.lines:
                            return  # the window is complete (a resumed listing runs past it)
            if self.stopping.is_set():
                return
            status = channel.recv_exit_status()  # -1: the channel closed without one, the connection dropped
            if status == -1:
                raise ConnectionError("the connection dropped")
            # Any other status ends it: journalctl exits 1 when --grep matched nothing.
            error = channel.recv_stderr(4096).decode(errors="replace").strip() if status != 0 else ""
            if "sudo:" in error and "password" in error:  # retrying would not help
                self.out.put(HostEvent(self.host.name, f"sudo asks {self.host.user} for a password: "
                                       "allow it passwordless sudo to read the journal", fatal=True))
                self.stopping.set()
            elif error:
                self.out.put(HostEvent(self.host.name, f"journalctl failed: {error}", fatal=True))
                self.stopping.set()
        finally:
            self.channel = None
            with contextlib.suppress(Exception):
                channel.close()


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


def merged(streams: list[HostStream], out: queue.Queue[object]) -> Iterator[JournalLine | HostEvent]:
    """Lines and host events from every stream as they arrive, until every stream is done."""
    for stream in streams:
        stream.start()
    running = len(streams)
    while running:
        item = out.get()
        if item is None:
            running -= 1
            continue
        yield item  # type: ignore[misc]


def units_for(stage: Stage, host: Host, services: list[str] | None) -> list[str]:
    """The host's units, narrowed to the named worker services (or "beat"): every instance of a
    worker service (both while a handover runs), and its plain unit from older deploy-kits."""
    app = stage.app
    chosen = []
    for worker in stage.workers_on(host):
        if not services or worker.name in services:
            chosen += [worker.unit(app).replace("@.", "@*."), worker.legacy_unit(app)]
    if stage.beat and stage.beat.host == host.name and (not services or "beat" in services):
        chosen.append(stage.beat.unit(app))
    return chosen


def check_services(stage: Stage, services: list[str]) -> None:
    from deploy_kit.errors import UsageError

    known = [w.name for w in stage.workers] + (["beat"] if stage.beat else [])
    for name in services:
        if name not in known:
            raise UsageError(f"no service named {name!r} in stage {stage.name!r} (services: {', '.join(known)})")


def stream(stage: Stage, *, hosts: list[Host], services: list[str] | None, since: str | None,
           lines: int | None, grep: str | None, follow: bool) -> tuple[list[HostStream], Iterator[object]]:
    out: queue.Queue[object] = queue.Queue()
    streams = []
    for host in hosts:
        host_units = units_for(stage, host, services)
        if host_units:
            streams.append(HostStream(host, stage, out, units=host_units, since=since, lines=lines, grep=grep,
                                      follow=follow))
    return streams, merged(streams, out)
