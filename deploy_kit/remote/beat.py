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
        its CPU time still), then still run `BEAT_SETTLE`s. Without the banner in the journal
        (CELERY_QUIET, a journald that keeps no info lines), idle the whole watch. Within the
        verification timeout; a Beat alive then without either has run that long, said so."""
        invocation = self.systemctl("show", unit, "-p", "InvocationID", "--value").strip()
        timeout, watch = float(self.p["verify"]["timeout"]), float(self.p["watch"])
        bound = time.monotonic() + timeout
        bannered, ready, cpu, idle_since = False, 0.0, None, 0.0
        while True:
            time.sleep(0.2)
            now, info = time.monotonic(), self.show(unit)
            if info.get("ActiveState") != "active" or info.get("MainPID") != pid:
                raise StepFailed(f"{unit} stopped after it started ({info.get('ActiveState')}/"
                                 f"{info.get('SubState')}); see its journal")
            was, cpu = cpu, self.cpu_time(pid)
            idle = cpu is not None and cpu == was
            idle_since = (idle_since or now) if idle else 0.0
            if ready:
                if now >= ready:
                    return (f"Beat runs from releases/{release} (loaded its scheduler, idle, ran "
                            f"{waits.BEAT_SETTLE}s more)")
            elif bannered and idle:
                ready = now + waits.BEAT_SETTLE
            elif idle_since and now - idle_since >= watch:  # its banner unseen (CELERY_QUIET, journald's level)
                return (f"Beat runs from releases/{release} (idle for {watch:g}s; its banner never showed in "
                        "the journal)")
            elif now >= bound:
                why = "still busy" if bannered else "still busy, its banner never showed in the journal"
                return f"Beat runs from releases/{release} (ran {timeout:.0f}s, {why})"
            elif not bannered:
                bannered = BANNER in self.beat_log(unit, invocation, pid)

    @staticmethod
    def cpu_time(pid: str) -> int | None:
        """The CPU time (clock ticks, every thread) of a process asleep, or None when it runs, waits
        for a disk or is gone: two equal readings 0.2s apart tell a process that is idle."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[11]) + int(fields[12]) if fields[0] == "S" else None

    def beat_log(self, unit: str, invocation: str, pid: str) -> str:
        this_start = f"_SYSTEMD_INVOCATION_ID={invocation}" if invocation else f"_SYSTEMD_UNIT={unit}"
        return self.journalctl(this_start, f"_PID={pid}", lines=5000)  # the banner comes early
