"""Runs ON a host, inside the cutover (`cutover.py`): the Beat phase's steps. Python 3.8+, stdlib only.

Beat runs on one host and must never run twice: its restart is queued (the old Beat's stop may
take its whole TimeoutStopSec, e.g. without a broker), then it must run from the target release
and still run after the watch; the wait is bounded by Beat's stop timeout plus the verify timeout.
"""

from __future__ import annotations

import os
import time

from deploy_kit.remote.agent_client import StepFailed


class BeatSteps:
    """Mixed into `cutover.Cutover`, whose `p` (params), `systemctl`, `show` and `quietly` it uses."""

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
        """Beat started is not Beat running: it loads its scheduler and schedule after the start.
        The same process must still run after the watch."""
        deadline = time.time() + float(self.p["watch"])
        while time.time() < deadline:
            time.sleep(0.3)
            info = self.show(unit)
            if info.get("ActiveState") != "active" or info.get("MainPID") != pid:
                raise StepFailed(f"{unit} stopped after it started ({info.get('ActiveState')}/"
                                 f"{info.get('SubState')}); see its journal")
        return f"Beat runs from releases/{release} (ran {self.p['watch']}s)"
