"""Runs ON a host, as root, detached from SSH (under `systemd-run`): the part of a deploy or a
rollback that must never stop half-way. Python 3.8+, stdlib only.

Phase "workers" (every host at once): for each worker service, a handover
    start    the target release's instance beside the one that runs, on its private queue only
    verify   a real task sent to that private queue must complete (the old one serves meanwhile)
    join     the new instance consumes the service's real queues too (remote control, confirmed)
    watch    it must keep running for a few seconds
    retire   the old instance stops taking tasks and drains in the background (warm shutdown)
then `current` moves to the target (atomic rename) and the instance is enabled at boot.
A service with `handover = false` restarts in place instead (stop the old, then start, verify
and join the new: the queue waits, but verification is never starved by user tasks).
A hand-back (`hand_back`: in a deploy or a rollback, another host or Beat failed after this
host's workers moved) starts the release this host ran when the run began, on the real queues
at once and without a new proof: it was live minutes ago, and what failed may be the broker
every proof needs.
    confirm  each instance consumes its queues again (remote control); without a broker nothing
             can be confirmed, or asked of the agent later: the watch decides
then watch, retire the instances of the release it leaves and switch, as above. A host never
stays on that release because the broker went away.

Phase "beat" (its one host: after every host's workers in a deploy, before them in a rollback):
    switch `current`, restart Beat (queued: its stop may take its whole TimeoutStopSec), wait until it
    runs from the target and still does after the watch; all of it bounded by stop timeout + verify timeout.

Failure before the join: the new instance is killed at once (it held no user task); the old
one never stopped. Failure during the watch: the new instance leaves the real queues and
stops; a warm shutdown returns what it held to the queue. Either way the host runs what it
ran, and a deploy marks the target bad. A hand-back that fails stops its instances warm (they
consumed the real queues from their start) and starts again what it stopped or retired; it
marks nothing bad. Progress goes to a JSON state file (`contracts`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

from deploy_kit.remote import contracts as waits
from deploy_kit.remote import hostlib
from deploy_kit.remote.beat import BeatSteps
from deploy_kit.remote.celery_agent import Agent, StepFailed
from deploy_kit.remote.contracts import (
    HANDOVER_OPTIONS,
    LIVE_LOG,
    UNREAD,
    CutoverState,
    CutoverStatus,
    LiveEvent,
    Mode,
    Step,
)


def run(argv: list, timeout: float = waits.SYSTEMCTL) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class Cutover(BeatSteps):
    def __init__(self, params: dict):
        self.p = params
        self.host = socket.gethostname()
        self.state = CutoverState(id=params["id"], mode=Mode(params["mode"]), target=params["target"],
                                  previous=params.get("previous"), started=time.time(), pid=os.getpid(),
                                  hand_back=bool(params.get("hand_back")))
        self.started_units: list = []  # new instances this run started (stopped again on failure)
        self.stopped: list = []  # (worker, old unit) a restart in place stopped (started again on failure)
        self.retired: list = []  # (worker, old unit) retired by this run (started again on failure)
        self.cancelled: list = []  # (worker, old unit) told to stop consuming (consume again on failure)
        self.stopping: list = []  # old units whose warm shutdown this run began
        self.joined: list = []  # (worker, node) that joined the real queues (a hand-back's: from their start)
        self.unmingled: list = []  # new instances started without mingle: the join syncs their revoked ids
        self.nodes: list | None = None  # the live Celery nodes, found during the watch (for the queue summary)
        self.unreachable = ""  # why a hand-back's agent could not start: nothing more is asked of it
        self.restarts: dict = {}
        self.agent: Agent | None = None

    # --- state file ---------------------------------------------------------------------------

    def save(self) -> None:
        """Best effort: a full disk must not stop a rollback half-way (the follower then reports
        the host's state as unknown)."""
        path = self.p["state_file"]
        tmp = f"{path}.{self.p['id']}.tmp"
        try:
            with open(tmp, "w") as handle:
                handle.write(self.state.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError:
            pass

    def step(self, name: str, action, *args):
        entry, began = Step(name=name, started=time.time()), time.monotonic()
        self.state.step = name
        self.state.steps.append(entry)
        self.save()
        try:
            detail = action(*args)
            entry.ok, entry.detail = True, detail or ""
            return detail
        except StepFailed as exc:
            entry.ok, entry.detail = False, str(exc)
            raise
        except Exception as exc:  # a bug or an unexpected host state: still end consistent
            entry.ok, entry.detail = False, f"{type(exc).__name__}: {exc}"
            raise StepFailed(entry.detail) from exc
        finally:
            entry.ended = entry.started + (time.monotonic() - began)  # a step of the clock is no step's time
            self.save()

    # --- systemd ------------------------------------------------------------------------------

    def systemctl(self, *args: str, timeout: float = waits.SYSTEMCTL) -> str:
        proc = run(["systemctl", *args], timeout=timeout)
        if proc.returncode != 0:
            raise StepFailed("systemctl {}: {}".format(" ".join(args), (proc.stderr or proc.stdout).strip()))
        return proc.stdout

    def quietly(self, *args: str) -> None:
        """A systemctl call whose failure changes nothing (e.g. reset-failed of a unit that did not fail)."""
        run(["systemctl", *args])

    def show(self, unit: str) -> dict:
        return hostlib.parse_show(self.systemctl("show", unit, "-p", "MainPID,ActiveState,SubState,NRestarts"))

    def crashed(self, units: list) -> str:
        for unit in units:
            info = self.show(unit)
            if info.get("ActiveState") in ("failed", "inactive") or info.get("SubState") == "auto-restart" or \
                    info.get("NRestarts", "0") != self.restarts.get(unit, info.get("NRestarts", "0")):
                return f"{unit} crashed ({info.get('ActiveState')}/{info.get('SubState')}); see its journal"
        return ""

    def running(self, worker: dict) -> list:
        """The worker's units that run now: its instances and the plain unit of older deploy-kits."""
        pattern = worker["template"].replace("@.", "@*.")
        out = self.systemctl("list-units", "--plain", "--no-legend", "--all", pattern, worker["legacy"])
        return [u for u, state in hostlib.parse_units(out).items() if state in ("active", "activating", "reloading")]

    def olds(self, worker: dict, unit: str) -> list:
        """The worker's units that run now beside `unit` (the older instances a handover retires)."""
        return [old for old in self.running(worker) if old != unit]

    def instance(self, worker: dict, release: str) -> str:
        return worker["template"].replace("@.", f"@{release}.")

    def node(self, worker: dict, unit: str) -> str:
        if unit == worker["legacy"]:
            return f"{worker['service']}@{self.host}"
        release = unit.split("@", 1)[1].rsplit(".service", 1)[0]
        return f"{worker['service']}.{release}@{self.host}"

    def handover_file(self, worker: dict, release: str) -> str:
        return os.path.join(self.p["run_dir"], f"{worker['service']}@{release}.env")

    # --- the steps ----------------------------------------------------------------------------

    def start(self, release: str, workers: list) -> str:
        units = []
        os.makedirs(self.p["run_dir"], mode=0o755, exist_ok=True)
        for worker in workers:
            unit = self.instance(worker, release)
            if self.p.get("hand_back"):  # the real queues at once: it may take user tasks from its start
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.handover_file(worker, release))
                self.joined.append((worker, self.node(worker, unit)))
            else:
                with open(self.handover_file(worker, release), "w") as handle:  # its private queue, until it joins
                    handle.write(f"DEPLOY_KIT_QUEUES={self.private_queue(worker, release)}\n")
                    if worker["mingle"] and worker["handover"] and self.olds(worker, unit):
                        handle.write(f"{HANDOVER_OPTIONS}=--without-mingle\n")  # the join syncs it instead
                        self.unmingled.append(unit)
            if not worker["handover"]:
                for old in self.running(worker):  # restart in place: the queue waits
                    if old != unit:
                        self.stopped.append((worker, old))  # before the stop: one that times out starts again too
                        self.systemctl("stop", old, timeout=self.p["stop_timeout"] + waits.STOP_MARGIN)
            self.wait_drained(unit)
            self.started_units.append(unit)  # before the start: a start that fails half-way is given back too
            self.systemctl("start", unit)  # Type=simple: returns once the process runs
            units.append(unit)
        self.agent = Agent(self.p, release)
        self.restarts.update({u: self.show(u).get("NRestarts", "0") for u in units})
        return "started " + ", ".join(units)

    def wait_drained(self, unit: str) -> None:
        """The target's instance may still drain from an earlier handover (a rollback right after
        a deploy): a start now would be queued by systemd until its tasks finish, outlast
        systemctl's timeout and start it later, unasked. Wait for the drain instead (at most
        TimeoutStopSec, then systemd kills it); no start job is queued meanwhile, so a failure or
        a killed cutover leaves nothing to start later. The old release serves all along."""
        if self.show(unit).get("ActiveState") != "deactivating":
            return
        limit = float(self.p["stop_timeout"]) + waits.STOP_MARGIN
        self.note(f"{unit} is still draining (finishing its running tasks, at most {limit:.0f}s); "
                  "it starts once it stopped, the current release serves meanwhile")
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.show(unit).get("ActiveState") != "deactivating":
                return
        raise StepFailed(f"{unit} still drains after {limit:.0f}s; it was not started")

    def note(self, text: str) -> None:
        """Progress of the running step, shown while it runs (its detail, replaced when it ends)."""
        self.state.steps[-1].detail = text
        self.save()

    def private_queue(self, worker: dict, release: str) -> str:
        return worker["private_queue"].replace("{host}", self.host).replace("%i", release)

    def verify(self, release: str, workers: list) -> str:
        assert self.agent is not None
        timeout = float(self.p["verify"]["timeout"])
        units = [self.instance(w, release) for w in workers]
        self.agent.ask(None, timeout, alive=lambda: self.crashed(units))
        done = []
        for worker in workers:
            nonce = f"deploy-kit verify {self.p['id']}-{self.host}-{worker['service']}"
            done.append(worker["service"] + " " + self.agent.ask(
                {"op": "verify", "task": self.p["verify"]["task"], "queue": self.private_queue(worker, release),
                 "timeout": timeout, "nonce": nonce}, timeout + waits.VERIFY_MARGIN, alive=lambda: self.crashed(units)))
        return "; ".join(done)

    def confirm(self, release: str, workers: list) -> str:
        """A hand-back's check, instead of a proof: once the agent is up, each instance consumes its
        real queues within the verification timeout. An agent that cannot start (the broker cannot
        be reached, say) confirms nothing, and is asked nothing more; the watch still runs."""
        assert self.agent is not None
        timeout = float(self.p["verify"]["timeout"])
        units = [self.instance(w, release) for w in workers]
        try:
            self.agent.ask(None, timeout, alive=lambda: self.crashed(units))
        except StepFailed as exc:
            crash = self.crashed(units)
            if crash:
                raise StepFailed(crash) from None
            self.unreachable = str(exc)
            return f"not confirmed ({exc}); the watch decides"
        deadline, confirmed = time.monotonic() + timeout, []
        for worker in workers:
            node = self.node(worker, self.instance(worker, release))
            while True:
                consumed = self.agent.ask({"op": "queues", "node": node}, waits.REMOTE_CONTROL,
                                          alive=lambda: self.crashed(units)).split(",")
                lacking = [q for q in worker["queues"] if q not in consumed]
                if not lacking:
                    break
                if time.monotonic() > deadline:
                    raise StepFailed(f"{node} does not consume {', '.join(lacking)} after {timeout:.0f}s")
                time.sleep(0.5)
            confirmed.append(node)
        return "consuming again: " + ", ".join(confirmed)

    def join(self, release: str, workers: list) -> str:
        assert self.agent is not None
        synced = []
        for worker in workers:
            unit = self.instance(worker, release)
            node, alive = self.node(worker, unit), (lambda units=[unit]: self.crashed(units))
            olds = [self.node(worker, old) for old in self.olds(worker, unit)] if worker["handover"] else []
            if olds or unit in self.unmingled:  # before its first user task: what mingle would have brought
                synced.append(self.agent.ask({"op": "sync_revoked", "olds": olds, "node": node,
                                              "everyone": unit in self.unmingled}, waits.SYNC_REVOKED, alive))
            # From its first add_consumer on it may hold user tasks: on a failure it stops warm, and what
            # it held returns to the queue. A crash meanwhile (it would come back unsynced) fails the join.
            self.joined.append((worker, node))
            for queue in worker["queues"]:
                self.agent.ask({"op": "add_consumer", "queue": queue, "node": node}, waits.REMOTE_CONTROL, alive)
            # From now on a restart of the instance (crash, reboot) consumes the real queues.
            os.unlink(self.handover_file(worker, release))
        return "; ".join([*synced, "joined " + ", ".join(node for _, node in self.joined)])

    def watch(self, release: str, workers: list) -> str:
        units = [self.instance(w, release) for w in workers]  # restart in place too: it serves alone now
        deadline = time.monotonic() + float(self.p["watch"])
        if self.p.get("report") and float(self.p["watch"]) >= waits.FIND_NODES_WATCH:
            self.find_nodes(units, deadline)
        while time.monotonic() < deadline:
            crash = self.crashed(units)
            if crash:
                raise StepFailed(crash)
            time.sleep(max(0.0, min(0.3, deadline - time.monotonic())))
        crash = self.crashed(units)  # once more at the end: the watch ends on a reading, not a sleep
        if crash:
            raise StepFailed(crash)
        return f"ran {self.p['watch']}s on the real queues without a crash"

    def find_nodes(self, units: list, deadline: float) -> None:
        """Meanwhile (its crash checks go on), which Celery nodes answer a broadcast (1.5 s): the
        queue summary then asks just them, each question ending once they all answered. Best
        effort: without an answer by the watch's end, the summary makes its own broadcast."""
        assert self.agent is not None
        crash = []

        def alive() -> str:
            crash.append(self.crashed(units))
            return crash[-1]

        try:
            found = self.agent.ask({"op": "nodes"}, max(0.1, deadline - time.monotonic()), alive=alive)
            self.nodes = [n for n in found.split(",") if n] or None
        except StepFailed:
            if crash and crash[-1]:
                raise

    def retire(self, release: str, workers: list) -> str:
        """The older instances stop taking tasks, start what they took already, and drain; none
        starts at boot any more (one a restart in place stopped already included)."""
        assert self.agent is not None
        olds, untold = [], []  # (worker, unit, told to stop consuming)
        for worker in workers:
            for old in self.running(worker) + [u for w, u in self.stopped if w is worker]:
                if old != self.instance(worker, release) and all(old != u for _, u, _ in olds):
                    olds.append((worker, old, (worker, old) not in self.stopped and self.cancel(worker, old, untold)))
        told, since = [self.node(w, u) for w, u, t in olds if t], time.monotonic()
        if self.unreachable and olds:
            untold.append(f"they were not told to stop consuming first ({self.unreachable}): their warm shutdowns "
                          "stop them")
        self.retired += [(worker, old) for worker, old, _ in olds]  # from now on a failure starts them again
        if olds:  # in one call, one daemon-reload (meanwhile the fetch the old nodes sent before the cancel ends)
            self.systemctl("disable", "--quiet", *(old for _, old, _ in olds))
        if self.p.get("report"):  # as that fetch ends, and while the old nodes still answer (not once stopped:
            self.state.queues = self.read_queues(self.p["report"])  # each question to a gone node waits 5 s)
        untold += self.handoff(told, since) if told else []
        draining = [old for worker, old, _ in olds if (worker, old) not in self.stopped]
        if draining:
            self.systemctl("stop", "--no-block", *draining)  # they drain in the background
            self.stopping += draining
        for worker, old, _ in olds:
            if old != worker["legacy"]:
                self.discard_private(worker, old.split("@", 1)[1].rsplit(".service", 1)[0])
        return "; ".join(["draining " + (", ".join(u for _, u, _ in olds) or "nothing (no older instance ran)"),
                          *untold])

    def cancel(self, worker: dict, old: str, untold: list) -> bool:
        """Best effort: the warm shutdown stops consuming anyway."""
        if self.unreachable:
            return False
        self.cancelled.append((worker, old))  # before the first: one that times out may have been done
        for queue in worker["queues"]:
            try:
                self.agent.ask({"op": "cancel_consumer", "queue": queue, "node": self.node(worker, old)},
                               waits.REMOTE_CONTROL_QUICK)
            except StepFailed as exc:
                untold.append(f"{old} could not be told to stop consuming first ({exc}); its warm shutdown stops it")
                return False
        return True

    def read_queues(self, queues: list) -> str:
        """The queue summary the run ends with (`celery_agent.report`), read by this cutover's agent
        once the old instances stopped consuming; never a reason to fail."""
        assert self.agent is not None
        try:
            return self.agent.ask({"op": "report", "queues": queues, "nodes": self.nodes}, waits.REPORT)
        except Exception as exc:  # noqa: BLE001 - StepFailed, or an answer it could not read
            return f"{UNREAD}{exc}"

    def handoff(self, nodes: list, since: float) -> list:
        """Before the warm shutdowns: what the nodes took before they stopped consuming (at `since`)
        starts there (best effort, as cancel_consumer: what one still holds returns when it ends)."""
        assert self.agent is not None
        try:
            self.agent.ask({"op": "handoff", "nodes": nodes, "timeout": waits.HANDOFF, "since": since},
                           waits.HANDOFF + waits.REMOTE_CONTROL_QUICK)
            return []
        except StepFailed as exc:
            return [f"{exc}; what an instance still holds returns to its queue when its warm shutdown ends"]

    def switch(self, name: str, strict: bool = True) -> str:
        target = os.path.join(self.p["releases_dir"], name)
        if not os.path.isdir(target):
            raise StepFailed(f"release {name} does not exist on this host")
        unrecorded = self.record_live(name, strict) if self.live() != name else ""
        current = self.p["current"]
        tmp = f"{current}.deploy-kit-tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", name), tmp)
        os.replace(tmp, current)  # rename(2): atomic, never a moment without `current`
        return f"current -> releases/{name}{unrecorded}"

    def record_live(self, name: str, strict: bool) -> str:
        """Append to the live log before `current` moves, in one write (a line torn by a crash
        never merges with the next). Strict (nothing touched yet): a switch it cannot record does
        not happen. Otherwise (the workers took over already, or a way back) the switch goes on:
        an unrecorded move only leaves `current` itself as the latest live release."""
        event = LiveEvent(name, self.live(), self.p["mode"], self.p["id"], time.time())
        path = os.path.join(os.path.dirname(self.p["state_file"]), LIVE_LOG)
        try:
            hostlib.append_line(path, event.to_json())
        except OSError as exc:
            if strict:
                raise StepFailed(f"cannot record the switch to {name} ({exc.strerror}); current is unchanged") \
                    from None
            return f" (not in the live log: {exc.strerror})"
        return ""

    def enable(self, release: str, workers: list) -> str:
        units = [self.instance(w, release) for w in workers]
        if units:
            self.systemctl("enable", "--quiet", *units)
        return self.switch(release, strict=not units)  # once the old ones retired, the switch must happen

    # --- giving back --------------------------------------------------------------------------

    def give_back(self) -> str:
        """Stop what this run started; the old instances serve again (they never stopped, or take
        their queues again, or start again)."""
        again = self.consume_again()
        for worker, node in [] if self.unreachable else self.joined:
            for queue in worker["queues"]:
                try:
                    self.agent.ask({"op": "cancel_consumer", "queue": queue, "node": node}, waits.REMOTE_CONTROL_QUICK)
                except (StepFailed, AttributeError):
                    break
        stopped, draining = [], []
        for unit in self.started_units:
            worker = next(w for w in self.p["workers"] if self.instance(w, self.p["target"]) == unit)
            joined = any(w is worker for w, _ in self.joined)
            if not joined:  # it held no user task: at once, whatever TimeoutStopSec says
                run(["systemctl", "kill", "--signal=SIGKILL", unit])
                run(["systemctl", "stop", unit], timeout=waits.STOP_MARGIN)
            else:  # it may hold user tasks: a warm shutdown returns what it reserved to the queue
                self.systemctl("stop", "--no-block", unit)
                draining.append((worker, unit))
            run(["systemctl", "reset-failed", unit])
            stopped.append(unit)
        detail = self.restore(draining) if draining else ""
        for worker in self.p["workers"]:
            path = self.handover_file(worker, self.p["target"])
            if os.path.exists(path):
                os.unlink(path)
            self.discard_private(worker, self.p["target"])
        for unit in self.started_units:  # enabled by a switch that then failed: never at boot
            run(["systemctl", "disable", "--quiet", unit])
        restarted, problems = list(dict.fromkeys(old for _, old in self.stopped + self.retired)), []
        for old in restarted:  # stopped by a restart in place, or retired: it serves again, and at boot
            for verb in (("enable", "--quiet"), ("start", "--no-block")):  # a draining one starts once stopped
                try:
                    self.systemctl(*verb, old)
                except StepFailed as exc:  # the others still start
                    problems.append(str(exc))
        if problems:
            raise StepFailed("; ".join(problems))
        return "stopped " + (", ".join(stopped) or "nothing") + \
            ("; started " + ", ".join(restarted) if restarted else "") + \
            ("; consuming again: " + ", ".join(again) if again else "") + (f"; {detail}" if detail else "")

    def consume_again(self) -> list:
        """The old instances told to stop consuming whose warm shutdown never began (the retire
        failed in between): they take their queues again by remote control, their running tasks
        untouched; without an agent that can, a restart (warm shutdown, then a fresh start)."""
        again = []
        for worker, old in self.cancelled:
            if old in self.stopping:
                continue
            try:
                if self.agent is None or self.unreachable:
                    raise StepFailed(self.unreachable or "no agent")
                for queue in worker["queues"]:
                    self.agent.ask({"op": "add_consumer", "queue": queue, "node": self.node(worker, old)},
                                   waits.REMOTE_CONTROL)
                again.append(old)
            except StepFailed:
                run(["systemctl", "restart", "--no-block", old])
                again.append(f"{old} (restarted)")
        return again

    def restore(self, draining: list) -> str:
        """A worker that joined the real queues and died (or was stopped) may have left messages
        in the broker that only come back after its visibility timeout: once it is gone, put back
        what no live worker holds. One still finishing a task is left to its warm shutdown."""
        deadline = time.monotonic() + waits.RESTORE_WAIT
        while time.monotonic() < deadline:
            if all(self.show(u).get("ActiveState") in ("inactive", "failed") for _, u in draining):
                time.sleep(waits.RESTORE_SETTLE)  # so a message a live worker just took shows in its reserved tasks
                queues = sorted({q for w, _ in draining for q in w["queues"]})
                try:
                    if self.agent is None or self.unreachable:
                        return ""
                    return self.agent.ask({"op": "restore_stranded", "queues": queues}, waits.REMOTE_CONTROL)
                except StepFailed as exc:
                    return f"could not return its messages: {exc}"
            time.sleep(0.3)
        return "it still finishes a task: its warm shutdown returns what it reserved"

    def discard_private(self, worker: dict, release: str) -> None:
        """Best effort: a private queue nobody consumes again leaves nothing behind in the broker."""
        if self.agent is None or self.unreachable:
            return
        with contextlib.suppress(StepFailed):
            self.agent.ask({"op": "discard_queue", "queue": self.private_queue(worker, release)},
                           waits.REMOTE_CONTROL_QUICK)

    def mark_bad(self, name: str) -> str:
        hostlib.mark_bad(os.path.join(self.p["releases_dir"], name), self.p["id"], self.state.failure)
        return f"release {name} marked bad"

    def journal(self) -> list:
        units = [w["template"].replace("@.", "@*.") for w in self.p["workers"]]
        units += [self.p["beat_unit"]] if self.p.get("beat_unit") else []
        if not units:  # journalctl without -u reads the whole host journal: nothing of ours to show
            return []
        argv = ["journalctl", "--no-pager", "-o", "short-iso", "-n", "60", "--since", f"@{int(self.state.started)}"]
        for unit in units:
            argv += ["-u", unit]
        return run(argv).stdout.splitlines()[-60:]

    def journalctl(self, *args: str, lines: int = 50) -> str:
        """The messages (only) of the last journal entries that match `args`; "" when journalctl fails."""
        try:
            return run(["journalctl", "--no-pager", "-q", "-o", "cat", "-n", str(lines), *args], timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    def live(self) -> str:
        try:
            return os.path.basename(os.readlink(self.p["current"]))
        except OSError:
            return ""

    # --- the sequence -------------------------------------------------------------------------

    def forward(self) -> None:
        target, workers = self.p["target"], self.p["workers"]
        if self.p.get("phase") == "beat":
            self.step("switch", self.switch, target)
            self.step("restart beat", self.restart_beat)
            self.step("wait for beat", self.wait_beat, target)
            return
        if not workers:  # e.g. a host that only migrates: its `current` moves with the stage
            self.step("switch", self.switch, target)
            return
        self.step("start", self.start, target, workers)
        if self.p.get("hand_back"):
            self.step("confirm", self.confirm, target, workers)
        else:
            self.step("verify", self.verify, target, workers)
            self.step("join", self.join, target, workers)
        self.step("watch", self.watch, target, workers)
        self.step("retire", self.retire, target, workers)
        self.step("switch", self.enable, target, workers)

    def backward(self) -> None:
        previous = self.p.get("previous")
        if self.p.get("phase") == "beat":
            if previous:
                self.step("switch back", self.switch, previous, False)
                self.step("restart beat (back)", self.restart_beat)
                self.step("wait for beat (back)", self.wait_beat, previous)
            return
        self.step("give back", self.give_back)

    def run(self) -> int:
        self.save()
        try:
            self.forward()
            self.state.status, self.state.live = CutoverStatus.DONE, self.live()
        except Exception as exc:  # StepFailed, or anything unexpected: the host must still end consistent
            self.state.failure = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
        if self.state.status == CutoverStatus.DONE:
            self.close_agent()
            self.save()
            return 0
        self.save()
        try:
            self.state.journal = self.journal()
        except Exception:  # noqa: BLE001 - the journal is a courtesy; giving back is not
            self.state.journal = []
        try:
            self.backward()
            # In a deploy, staying on `previous` is a rollback; in a rollback it is a failure.
            self.state.status = CutoverStatus.ROLLED_BACK if self.state.mode == Mode.DEPLOY \
                else CutoverStatus.FELL_BACK
        except Exception as exc:  # noqa: BLE001
            self.state.status = CutoverStatus.ROLLBACK_FAILED
            self.state.rollback_failure = str(exc)
        self.close_agent()
        if self.p.get("mark_bad_on_failure"):
            with contextlib.suppress(StepFailed):
                self.step("mark bad", self.mark_bad, self.p["target"])
        self.state.live = self.live()
        self.save()
        return 1

    def close_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()


def main(params: dict) -> None:
    sys.exit(Cutover(params).run())
