"""Runs ON a host, inside the cutover (`cutover.py`): the Beat phase's steps. Python 3.8+, stdlib only.

Beat runs on one host and must never run twice: its restart is queued (the old Beat's stop may
take its whole TimeoutStopSec, e.g. without a broker), then it must run from the target release,
bounded by Beat's stop timeout plus the verify timeout. Then the process of that start must show
that it loaded its scheduler (its banner), get to its tick loop (idle) and still run a second.
"""

from __future__ import annotations

import os
import time

from deploy_kit.remote import contracts as waits
from deploy_kit.remote.agent_client import StepFailed

BANNER = ". maxinterval -> "  # the last line of Beat's banner, printed once it loaded its scheduler class
POLL = 0.1  # how often Beat's watch looks at it: its unit, /proc, and (until its banner) the journal, ~3 ms each
IDLE_POLLS = 2  # idle: the same CPU time, asleep, over this many polls (0.2 s)


class BeatSteps:
    """Mixed into `cutover.Cutover`, whose `p` (params), `systemctl`, `show`, `quietly` and
    `journalctl` it uses."""

    def restart_beat(self) -> str:
        """Queued, not waited for here: Beat's stop can last its whole TimeoutStopSec (without a
        broker it may not stop before systemd kills it); `wait_beat` bounds stop and start."""
        unit = self.p["beat_unit"]
        self.quietly("reset-failed", unit)  # a `failed` seen from now on is this start's
        self.systemctl("restart", "--no-block", unit)
        return f"{unit} restarting"

    def wait_beat(self, release: str) -> str:
        unit = self.p["beat_unit"]
        want = os.path.realpath(os.path.join(self.p["releases_dir"], release))
        bound = float(self.p["stop_timeout"]) + float(self.p["verify"]["timeout"])  # the old one's stop, then a start
        deadline, info = time.monotonic() + bound, {}
        while time.monotonic() < deadline:
            info = self.show(unit)
            if info.get("ActiveState") == "failed":
                raise StepFailed(f"{unit} failed to start; see its journal")
            pid = info.get("MainPID", "0")
            if info.get("ActiveState") == "active" and pid != "0":
                try:
                    if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == want:
                        return self.watch_beat(unit, pid, release)
                except OSError:
                    pass
            time.sleep(0.2)
        raise StepFailed(f"Beat does not run from releases/{release} after {bound:.0f}s (the old one's stop and a "
                         f"start; {unit} is {info.get('ActiveState')}/{info.get('SubState')})")

    def watch_beat(self, unit: str, pid: str, release: str) -> str:
        """Beat started is not Beat running: it imports the app (seconds; more on a busy host),
        loads its scheduler class and prints its banner (at every loglevel: a class it cannot
        load kills it first), sets its scheduler up, then sleeps in its tick loop. So the process
        of this start must print its banner (this invocation's, this PID's), then be idle (asleep,
        its CPU time still, over 0.2 s from the poll that saw the banner on), then still run
        `BEAT_SETTLE`s. Without the banner in the journal (CELERY_QUIET, a journald that keeps no
        info lines), idle the whole watch. Within the verification timeout; a Beat alive then
        without either has run that long, said so."""
        invocation = self.systemctl("show", unit, "-p", "InvocationID", "--value").strip()
        timeout, watch = float(self.p["verify"]["timeout"]), float(self.p["watch"])
        bound = time.monotonic() + timeout
        bannered_at, ready, idle_since, readings = None, 0.0, 0.0, []
        while True:  # every POLL; the settle's end exactly
            time.sleep(max(0.0, min(POLL, ready - time.monotonic())) if ready else POLL)
            now, info = time.monotonic(), self.show(unit)
            if info.get("ActiveState") != "active" or info.get("MainPID") != pid:
                raise StepFailed(f"{unit} stopped after it started ({info.get('ActiveState')}/"
                                 f"{info.get('SubState')}); see its journal")
            readings = [*readings, (now, self.cpu_time(pid))][-IDLE_POLLS - 1:]
            # Idle: asleep, its CPU time still, at this poll and the IDLE_POLLS before it.
            idle = len(readings) > IDLE_POLLS and readings[0][1] is not None and len({c for _, c in readings}) == 1
            idle_since = (idle_since or now) if idle else 0.0
            if ready:
                if now >= ready:
                    return (f"Beat runs from releases/{release} (loaded its scheduler, idle, ran "
                            f"{waits.BEAT_SETTLE}s more)")
            elif bannered_at is not None and idle:
                if readings[0][0] >= bannered_at:  # idle since the poll that saw its banner
                    ready = now + waits.BEAT_SETTLE
                # else idle, not yet over IDLE_POLLS since its banner: the next poll tells
            elif idle_since and now - idle_since >= watch:  # its banner unseen (CELERY_QUIET, journald's level)
                return (f"Beat runs from releases/{release} (idle for {watch:g}s; its banner never showed in "
                        "the journal)")
            elif now >= bound:
                why = "still busy" if bannered_at is not None else "still busy, its banner never showed in the journal"
                return f"Beat runs from releases/{release} (ran {timeout:.0f}s, {why})"
            elif bannered_at is None and BANNER in self.beat_log(unit, invocation, pid):
                bannered_at = now

    @staticmethod
    def cpu_time(pid: str) -> int | None:
        """The CPU time (clock ticks, every thread) of a process asleep, or None when it runs, waits
        for a disk or is gone: equal readings over 0.2 s (IDLE_POLLS) tell a process that is idle."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[11]) + int(fields[12]) if fields[0] == "S" else None

    def beat_log(self, unit: str, invocation: str, pid: str) -> str:
        this_start = f"_SYSTEMD_INVOCATION_ID={invocation}" if invocation else f"_SYSTEMD_UNIT={unit}"
        return self.journalctl(this_start, f"_PID={pid}", lines=5000)  # the banner comes early
