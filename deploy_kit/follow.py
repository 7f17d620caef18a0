"""Start a host's cutover detached from SSH (under systemd-run) and follow its state file.

The cutover runs on the host by itself (`remote/cutover.py`); from here we only read
`.deploy-kit/cutover.json` until it ends. A dropped connection pauses the reading, which
reconnects and goes on; what cannot be read is UNKNOWN, never guessed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deploy_kit import journal, plan
from deploy_kit import remote as host_programs
from deploy_kit.errors import DeployKitError, HostError, RemoteCommandError
from deploy_kit.release import state_dir
from deploy_kit.remote import contracts as waits
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode
from deploy_kit.ssh import RemoteHost, quote

if TYPE_CHECKING:
    from deploy_kit.runner import Run

S = CutoverStatus
STARTUP_GRACE = 15  # seconds a started cutover may take to write its first state
ENDED = ("inactive", "failed")  # what `systemctl is-active` says of a unit that ended (or never ran)


def budget(params: dict[str, Any]) -> float:
    """How long a cutover can take at worst, from the cutover's own named waits (`contracts`):
    the forward pass and the way back, each step at its longest, then a margin for the launch."""
    workers = params["workers"]
    n, queues = len(workers), sum(len(w["queues"]) for w in workers)
    verify, stop, watch = float(params["verify"]["timeout"]), float(params["stop_timeout"]), float(params["watch"])
    w = waits
    beat = w.SYSTEMCTL + stop + verify + verify + watch + w.BEAT_SETTLE  # wait_beat, then watch_beat
    forward = (n * (stop + w.STOP_MARGIN + 4 * w.SYSTEMCTL)  # start (a restart in place stops the old unit first)
               + w.AGENT_START + verify + n * (verify + w.VERIFY_MARGIN)  # the agent's greeting, a task per worker
               + n * (w.SYSTEMCTL + w.SYNC_REVOKED) + queues * w.REMOTE_CONTROL  # join
               + watch + 2 * n * w.SYSTEMCTL  # watch (its last crash checks may end past its deadline)
               + queues * w.REMOTE_CONTROL_QUICK  # retire: cancel_consumer, then per worker list, handoff, stop,
               + n * (3 * w.SYSTEMCTL + w.HANDOFF + 2 * w.REMOTE_CONTROL_QUICK)  # disable, discard its queue
               + (w.REPORT if params.get("report") else 0)  # retire: the queue summary, on one host
               + w.SYSTEMCTL  # switch
               + beat)  # Beat: restart (queued), the old one's stop, start, its start logged, watch
    back = (w.SYSTEMCTL  # the journal
            + queues * w.REMOTE_CONTROL_QUICK + n * (w.STOP_MARGIN + 5 * w.SYSTEMCTL + w.REMOTE_CONTROL_QUICK)
            + w.RESTORE + w.AGENT_CLOSE  # give back
            + beat)  # Beat back: the same
    return forward + back + LAUNCH


LAUNCH = 60  # seconds for the launch script itself (install, the guard, writing the program, systemd-run)


REFUSED = "refused: "  # how a launch the host's guard refused is told (nothing of this run started there)
_GUARD = 3  # the launch script's exit code when another cutover runs (or it cannot tell)


def _launch_script(params: dict[str, object], unit: str, app_name: str, python: str, state: str,
                   guard: str = "") -> str:
    """Start the cutover under systemd-run, unless one of this app still runs on the host (or
    systemd cannot say: then it refuses too), or `guard` (the lock check) ends the script."""
    program = host_programs.program("cutover", params)
    pattern = quote(app_name + "-cutover-*")
    return (f"install -d -m 0700 {quote(state)}\n"
            # Never two cutovers of one app at once: an earlier one may still run (a lost deploy).
            f"if ! running=$(systemctl list-units --plain --no-legend --state=active,activating {pattern}); then\n"
            f"  echo '{REFUSED}systemd could not list the cutovers of {app_name} on this host, so another may "
            f"run: nothing was started' >&2; exit {_GUARD}\nfi\n"
            f"if [ -n \"$running\" ]; then\n"
            f"  echo \"{REFUSED}another cutover of {app_name} is still running on this host (${{running%% *}}): it "
            f"ends by itself (\\`fab status\\` shows it); nothing of this run was started\" >&2; exit {_GUARD}\nfi\n"
            f"{guard}"
            f"cat > {quote(state + '/cutover-run.py')} <<'DEPLOY_KIT_EOF'\n{program}DEPLOY_KIT_EOF\n"
            f"rm -f {quote(str(params['state_file']))}\n"
            f"systemd-run --quiet --collect --unit={quote(unit)} --description={quote('deploy-kit cutover')} "
            f"{quote(python)} {quote(state + '/cutover-run.py')}\n")


def _follow_script(unit: str, path: str, journal_words: list[str] | None = None, since: float = 0.0) -> str:
    """Print `ACTIVE-STATE STATE-JSON` each time either changes, and every 5 s anyway (a silent
    link is noticed, a reader that went away ends this loop), until the unit has ended. The
    unit's state is read first, then the file: a cutover that ends in between is read as ended,
    not dead. Only `inactive` or `failed` end it (an empty answer of a busy systemd does not).
    With `journal_words` (`journal.journalctl`), the units' journal lines go to standard error
    meanwhile, from `since` (the host's clock; by default a second before this script starts),
    and end with the loop (or with the channel: the loop's next line then finds no reader)."""
    journal = ""
    if journal_words:
        window = [] if "--after-cursor" in journal_words else \
            ["--since", f"@{int(since)}" if since else '"@$(( $(date +%s) - 1 ))"']
        words = " ".join([*(quote(w) for w in journal_words), *window])
        journal = (f"{words} --follow >&2 & journal=$!\n"
                   "trap 'kill $journal 2>/dev/null || true' EXIT\ntrap 'exit 1' PIPE HUP TERM\n")
    return (f"{journal}prev=''; n=0\nwhile :; do\n"
            f"  a=$(systemctl is-active {quote(unit)} 2>/dev/null || true)\n"
            f"  s=$(cat {quote(path)} 2>/dev/null || true)\n"
            f"  if [ \"$a $s\" != \"$prev\" ] || [ $((n % 25)) -eq 0 ]; then\n"
            f"    printf '%s %s\\n' \"$a\" \"$s\"; prev=\"$a $s\"\n  fi\n  n=$((n + 1))\n"
            f"  case \"$a\" in inactive|failed) exit 0 ;; *) sleep 0.2 ;; esac\n"
            f"done\n")


def cutover(run: Run, remote: RemoteHost, action: plan.Cutover) -> CutoverState:
    """Launch the host's cutover and follow it on the same channel: the host prints each change
    of its state file as it happens, and the journal lines of the units it moves (one round
    trip, no polling)."""
    stage, params = run.stage, action.params
    unit = f"{stage.app.name}-cutover-{params['id']}"
    if params["phase"] == "beat":
        watched = [str(params["beat_unit"])]
    else:
        # Every instance's own lines, and systemd's about the one this cutover starts (`journal.matches`).
        watched = [u for w in params["workers"] for u in (w["template"].replace("@.", "@*."), w["legacy"],
                                                          w["template"].replace("@.", f"@{params['target']}."))]
    blank = CutoverState(id=str(params["id"]), mode=Mode(params["mode"]), target=str(params["target"]),
                         previous=params.get("previous"), status=S.NOT_STARTED,  # type: ignore[arg-type]
                         hand_back=bool(params.get("hand_back")))
    deadline = time.monotonic() + budget(params)
    progress = Progress(run, remote.name, blank, watched)
    state = str(state_dir(stage.app) / waits.CUTOVER_STATE)
    try:
        remote.run_script(_launch_script(params, unit, stage.app.name, str(stage.app.python),
                                         str(state_dir(stage.app)), plan.lock_guard(stage, run.token))
                          + progress.script(unit, state), sudo=True, what="starting the cutover",
                          timeout=budget(params), on_line=progress.feed, on_err_line=progress.journal)
    except RemoteCommandError as exc:  # refused, or systemd-run failed; else the follow loop: read again
        if not progress.seen:
            return _refused(blank, exc)
    except HostError as exc:  # the connection dropped, perhaps after systemd-run started it: it
        progress.launch_lost = not progress.seen  # runs by itself, so read it again
        progress.lost(exc)
    try:
        return _follow(run, remote.name, lambda: progress.script(unit, state), progress, deadline)
    except DeployKitError as exc:  # anything else of ours: never a guess
        return _unknown(progress.last, f"the cutover could not be followed: {exc}")


def _refused(blank: CutoverState, exc: RemoteCommandError) -> CutoverState:
    """The launch failed before the cutover started. Refused by the guard (another cutover runs,
    or the lock is no longer this run's): UNKNOWN, so the lock is kept and the release is not
    marked bad; any other failure (systemd-run, a full disk): not started."""
    said = (exc.output.strip().splitlines() or [""])[-1]
    if exc.remote_exit_code in (_GUARD, plan.LOCK_LOST) and said.startswith((REFUSED, "lock lost:")):
        why = said if said.startswith(REFUSED) else REFUSED + said
        return CutoverState(**{**blank.__dict__, "status": S.UNKNOWN, "rollback_failure": why})
    return CutoverState(**{**blank.__dict__, "failure": exc.reason})


def refused(state: CutoverState) -> bool:
    """The host's guard refused this run's cutover: nothing of it ran there."""
    return state.status == S.UNKNOWN and state.rollback_failure.startswith(REFUSED)


class Progress:
    """What the host has said of its cutover so far; each completed step is reported once, each
    journal line of `watched` shown once."""

    def __init__(self, run: Run, host: str, blank: CutoverState, watched: list[str] | None = None):
        self.run, self.host, self.last = run, host, blank
        self.seen, self.running, self.reported, self.connection_lost = False, True, 0, False
        self.has_state = False  # the cutover wrote its state file (it started)
        self.launch_lost = False  # the connection dropped before the launch said a word
        self.noted = ""  # the running step's progress note, said once
        self.started = time.monotonic()
        self.watched = watched or []  # no unit here: no journal (never the whole one)
        self.cursor: str | None = None  # of the last journal line shown: a new reading goes on after it
        self.journal_failed = False  # journalctl said it cannot follow (said once)

    def script(self, unit: str, path: str) -> str:
        """The host's loop that prints the state (and the journal) from where this reading is."""
        if not self.watched:
            return _follow_script(unit, path)
        return _follow_script(unit, path, journal.journalctl(self.watched, after_cursor=self.cursor),
                              since=self.last.started - 1 if self.has_state else 0.0)

    def journal(self, line: str) -> bool:
        """A line of the host's standard error: shown if it is a journal line (True), else kept."""
        try:
            entry = journal.parse_line(self.host, line)
        except Exception:  # noqa: BLE001 - a line we cannot read never stops the following
            return False
        if entry is None and line.startswith("journalctl:"):  # e.g. an option this systemd lacks
            if self.journal_failed:  # said once, not again after each reconnect
                return True
            self.journal_failed = True
            self.run.say(self.host, f"the units' journal cannot be followed from here ({line.strip()}); "
                                    "on the host, `journalctl -u UNIT` shows it")
            return True
        if entry is None:
            return False
        self.cursor = entry.cursor
        _show(self.run, entry)
        return True

    def feed(self, line: str) -> None:
        active, _, text = line.partition(" ")
        self.seen, self.running = True, active not in ENDED
        state = _parse(text, self.last.id)
        if state is None:
            return
        self.last, self.has_state = state, True
        for step in state.steps[self.reported:]:
            if step.ok is None:
                if step.detail and step.detail != self.noted:  # what a long step waits for
                    self.run.say(self.host, f"{step.name}: {step.detail}")
                    self.noted = step.detail
                break
            self.run.say(self.host, f"{step.name}: {'ok' if step.ok else 'FAILED'} {step.detail}".rstrip())
            self.run.outcome.timings.setdefault(self.host, {})[step.name] = step.seconds
            self.reported += 1

    def lost(self, exc: DeployKitError) -> None:
        if not self.connection_lost:
            self.run.say(self.host, f"lost the connection ({getattr(exc, 'reason', exc)}); the cutover goes on "
                                    "on the host, reconnecting")
            self.connection_lost = True

    def back(self) -> None:
        if self.connection_lost:
            self.run.say(self.host, "connection back; the cutover went on meanwhile")
            self.connection_lost = False

    def outcome(self) -> CutoverState | None:
        """The end, once known: this run's finished state, or UNKNOWN when the cutover ended
        without one; None while it runs."""
        if self.last.status.finished:
            return self.last
        if self.running:
            return None
        if self.has_state:
            return _unknown(self.last, "the cutover process died mid-way")
        if time.monotonic() - self.started > STARTUP_GRACE:
            return _unknown(self.last, "the answer to the launch was lost and no state of this run appeared: the "
                            "cutover may have started" if self.launch_lost
                            else "the cutover ended without writing its state (disk full?)")
        return None


def _follow(run: Run, host: str, script: Callable[[], str], progress: Progress, deadline: float) -> CutoverState:
    """Until the cutover ends: read the host's account again (after a dropped connection, or while
    a cutover that ended has not yet shown its state)."""
    assert run.session is not None
    while True:
        ended = progress.outcome()
        if ended is not None:
            return ended
        if time.monotonic() > deadline:
            return _unknown(progress.last, "the host could not be reached again" if progress.connection_lost
                            else "the cutover did not finish in time; it may still be running")
        if progress.connection_lost:
            time.sleep(2)
            run.session.reconnect(host)
        try:
            run.session.remote(host).run_script(script(), sudo=True, what="following the cutover",
                                                timeout=max(deadline - time.monotonic(), 1), on_line=progress.feed,
                                                on_err_line=progress.journal)
            progress.back()
        except DeployKitError as exc:
            progress.lost(exc)
            continue
        if progress.outcome() is None and not progress.connection_lost:
            time.sleep(0.5)


def _parse(text: str, run_id: str) -> CutoverState | None:
    """This run's state, or None (not written yet, or another run's file)."""
    try:
        state = CutoverState.from_json(text.strip())
    except (ValueError, KeyError, TypeError):
        return None
    return state if state.id == run_id else None


def _unknown(state: CutoverState, why: str) -> CutoverState:
    return CutoverState(**{**state.__dict__, "status": S.UNKNOWN, "rollback_failure": why})


def _show(run: Run, item: journal.JournalLine) -> None:
    """Journal lines of the units while the cutover moves them, as they happen."""
    if journal.is_banner(item.message):
        return
    run.say(item.host, f"  | {item.unit}: {item.message}")
    hint = journal.hint_for(item.message)
    if hint and (item.priority <= 4 or "Error" in item.message):
        run.say(item.host, f"  | hint: {hint}")
