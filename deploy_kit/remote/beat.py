"""Runs ON a host, inside the cutover (`cutover.py`): the Beat phase's steps. Python 3.8+, stdlib only.

Beat runs on one host and must never run twice: its restart is queued (the old Beat's stop may
take its whole TimeoutStopSec, e.g. without a broker), then it must run from the target release,
bounded by Beat's stop timeout plus the verify timeout. Then the process of that start must still
run a second after it logged that it starts its scheduler (without that line: after the watch).
"""

from __future__ import annotations

import os
import time

from deploy_kit.remote import contracts as waits
from deploy_kit.remote.agent_client import StepFailed

STARTING = "beat: Starting..."  # Celery's Beat logs it at INFO, then sets up its scheduler


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
        deadline, info = time.time() + bound, {}
        while time.time() < deadline:
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
        """Beat started is not Beat running: it imports the app, logs "beat: Starting..." and sets
        up its scheduler right after. The same process must still run `BEAT_SETTLE`s after that
        line (at INFO or DEBUG; this start's line, matched by its invocation and PID), or, without
        the line (a quieter loglevel, logging sent elsewhere), after the watch, as ever."""
        says = bool(self.p.get("beat_logs_start"))
        invocation = self.systemctl("show", unit, "-p", "InvocationID", "--value").strip() if says else ""
        deadline = time.time() + float(self.p["watch"])
        logged = 0.0
        while time.time() < deadline:
            time.sleep(0.2)
            info = self.show(unit)
            if info.get("ActiveState") != "active" or info.get("MainPID") != pid:
                raise StepFailed(f"{unit} stopped after it started ({info.get('ActiveState')}/"
                                 f"{info.get('SubState')}); see its journal")
            if says and not logged and STARTING in self.beat_log(unit, invocation, pid):
                logged = time.time()
                deadline = logged + waits.BEAT_SETTLE
        ran = f"started its scheduler, ran {waits.BEAT_SETTLE}s more" if logged else f"ran {self.p['watch']}s"
        return f"Beat runs from releases/{release} ({ran})"

    def beat_log(self, unit: str, invocation: str, pid: str) -> str:
        this_start = f"_SYSTEMD_INVOCATION_ID={invocation}" if invocation else f"_SYSTEMD_UNIT={unit}"
        return self.journalctl(this_start, f"_PID={pid}")
