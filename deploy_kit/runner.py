"""The one runner: executes the steps of a plan over one connection per host, and nothing else.

A `Run` is the context every phase needs (the stage, the connections, the run's id and lock
token, the output, the timings); `execute()` runs a list of steps, the hosts in parallel and
each host's steps in order, and keeps what it ran in `executed` (tests compare it with the plan).
"""

from __future__ import annotations

import getpass
import json
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deploy_kit import follow, hostfacts, queues, release, wheels
from deploy_kit import remote as host_programs
from deploy_kit.config import Stage
from deploy_kit.errors import DeployKitError, HostError, Locked, PreflightFailed, ReleaseError, RemoteCommandError
from deploy_kit.hostfacts import HostFacts
from deploy_kit.plan import LOCK_LOST, Build, Cutover, Finish, Phase, Probe, Queues, Script, Step
from deploy_kit.remote.contracts import HISTORY, UNREAD, CutoverState, HistoryLine, LockHolder, Mode, Result
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost

CACHE_DIR = Path.home() / ".cache" / "deploy-kit"
Say = Callable[[str, str], None]  # (host or "", message)


@dataclass
class Outcome:
    """What the user is shown at the end: the release, its sha, seconds per step and host."""

    release: str = ""
    sha: str = ""
    result: Result | None = None
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def new_holder(action: str, ref: str, now: datetime) -> LockHolder:
    """Who takes the deploy lock, with a token of its own (only its holder removes the lock)."""
    return LockHolder(who=getpass.getuser(), host=socket.gethostname(), action=action, ref=ref,
                      since=now.isoformat(timespec="seconds"), token=secrets.token_hex(8))


CONTENDED_WAIT = 15.0  # seconds the older of two runs that started together waits for the younger to yield


def take_locks(stage: Stage, holder: LockHolder, probe: Callable[[list[str]], dict[str, HostFacts]]
               ) -> dict[str, HostFacts]:
    """Lock and probe every host with `probe(host names)`; Locked when another run holds a lock.

    Two runs that start at the same moment can each win the lock on part of the stage. Both then
    see the other's holder, and both rank the two the same way (when the run started, then its
    token): the younger yields (Locked, and its caller releases what it took), the older probes
    the hosts it was refused again until the younger has let go (at most CONTENDED_WAIT seconds).
    A run refused everywhere, or by an older holder, is refused at once."""
    facts = probe([h.name for h in stage.hosts])
    deadline = time.monotonic() + CONTENDED_WAIT
    while True:
        refused = {h: f.lock.holder for h, f in facts.items() if f.lock and not f.lock.acquired}
        if not refused:
            return facts
        if (len(refused) == len(facts) or time.monotonic() > deadline
                or not all(other.younger_than(holder) for other in refused.values())):
            raise locked_error(stage, refused)
        time.sleep(0.3)
        facts.update(probe(sorted(refused)))


def locked_error(stage: Stage, refused: dict[str, LockHolder]) -> Locked:
    """Who holds the lock on which host, and what to do."""
    lines = [f"  {host}: {h.describe()}" for host, h in refused.items()]
    return Locked(f"another deploy, rollback or setup holds the lock of {stage.app.name}:\n" + "\n".join(lines)
                  + f"\nWait for it, or if it is dead: `fab unlock --stage {stage.name}`")


class Run:
    """One deploy or rollback: what every phase needs, in one place."""

    def __init__(self, stage: Stage, mode: Mode, say: Say, *, ref: str, now: datetime | None = None):
        self.stage, self.mode, self.say, self.ref = stage, mode, say, ref
        self.now = now or datetime.now(UTC)
        self.run_id = self.now.strftime("%Y%m%d%H%M%S")
        self.holder = new_holder(mode.value, ref, self.now)
        self.token = self.holder.token
        self.history = HistoryLine(action=mode, result=None, when=self.now.isoformat(timespec="seconds"),
                                   who=getpass.getuser(), ref=ref, origin=socket.gethostname())
        self.outcome = Outcome()
        self.executed: list[Step] = []
        self.started = time.monotonic()
        self.session: Session | None = None
        self.source: release.Source | None = None
        self.houses: dict[str, wheels.Wheelhouse] = {}
        self.facts: dict[str, HostFacts] = {}

    @contextmanager
    def shielded(self, waiting: str, *, stop_after: bool) -> Iterator[None]:
        """A first Ctrl-C or SIGTERM does not cut what runs on the hosts half-way: it says what it
        waits for (`waiting`), and, with `stop_after`, ends the run as interrupted once the block is
        done (its cleanup runs then). A second one leaves at once (`fab status` says what is left)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        asked: list[int] = []

        def handler(signum: int, frame: object) -> None:
            if asked:
                raise KeyboardInterrupt
            asked.append(signum)
            self.say("", f"interrupted: {waiting} (interrupt again to leave now; `fab status` then shows what "
                         "is left)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        if asked and stop_after:
            raise KeyboardInterrupt

    @contextmanager
    def connected(self) -> Iterator[Run]:
        with Session(self.stage) as session:
            self.session = session
            yield self

    # --- executing steps ----------------------------------------------------------------------

    def execute(self, steps: Sequence[Step], *, what: str = "", all_at_once: bool = False) -> dict[str, Any]:
        """Run `steps`: hosts in parallel (at most `parallel` at a time, or `all_at_once`), each
        host's in order; each host's last result. HostsFailed (or the one host's error) when any
        host failed."""
        self.executed.extend(steps)
        mine: dict[str, list[Step]] = {}
        for step in steps:
            mine.setdefault(step.host, []).append(step)

        def one(remote: RemoteHost) -> Any:
            result = None
            for step in mine.get(remote.name, []):
                started = time.monotonic()
                result = self.perform(remote, step)
                self.timed(remote.name, str(step.phase), started)
            return result

        assert self.session is not None
        self.session.revive(mine)  # a connection that dropped during a long phase is made anew
        return self.session.each(one, what=what or (str(steps[0].phase) if steps else "nothing"), only=mine,
                                 all_at_once=all_at_once)

    def perform(self, remote: RemoteHost, step: Step) -> Any:
        action = step.action
        if isinstance(action, Probe):
            return hostfacts.probe(remote, action.params)
        if isinstance(action, Build):
            return self._build(remote, action)
        if isinstance(action, Script):
            return self._script(remote, step, action)
        if isinstance(action, Cutover):
            return follow.cutover(self, remote, action)
        if isinstance(action, Queues):
            return self._queue_summary(remote)
        if isinstance(action, Finish):
            return self._finish(remote, action)
        raise TypeError(f"no way to run {action!r}")

    def timed(self, host: str, step: str, started: float) -> None:
        self.outcome.timings.setdefault(host, {})[step] = round(time.monotonic() - started, 2)

    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 1)

    # --- what each kind of step does ----------------------------------------------------------

    def pack(self, facts: dict[str, HostFacts], reuses: Callable[[HostFacts, release.Source], bool]
             ) -> dict[str, tuple[str, ...]]:
        """Pack the ref here, fetch the wheels the hosts lack; the wheel names each host would get."""
        try:
            return self._pack(facts, reuses)
        except OSError as exc:  # the cache of mirrors and wheels
            raise ReleaseError(f"cannot write {exc.filename or CACHE_DIR}: {exc.strerror}. Fix: make "
                               f"{CACHE_DIR} writable (or set HOME)") from None

    def _pack(self, facts: dict[str, HostFacts], reuses: Callable[[HostFacts, release.Source], bool]
              ) -> dict[str, tuple[str, ...]]:
        started = time.monotonic()
        source = self.source = release.read_source(self.stage.app, self.ref, self.now, CACHE_DIR)
        self.outcome.release, self.outcome.sha = source.name, source.sha
        self.history.release, self.history.sha = source.name, source.sha
        self.say("", f"release {source.name}: {self.ref} at {source.sha[:10]} ({len(source.archive) // 1024} "
                     "KiB packed)")
        sent: dict[str, tuple[str, ...]] = {}
        for host, f in facts.items():
            app = self.stage.app
            house = self.houses[host] = wheels.Wheelhouse(
                source.requirements, wheels.Target.from_facts(f.target), CACHE_DIR, source.constraints,
                installer=wheels.UV if app.install == "wheels" and app.installer == "uv" else "")
            if self.stage.app.install == "wheels" and not reuses(f, source):
                sent[host] = tuple(w.name for w in house.files() if w.name not in f.wheels)
        self.timed("(local)", "pack+wheels", started)
        return sent

    def _build(self, remote: RemoteHost, action: Build) -> release.Built:
        assert self.source is not None
        facts = self.facts[remote.name]
        built = release.build_on(remote, self.stage, self.source, self.houses[remote.name], set(facts.wheels),
                                 send_wheels=self.stage.app.install == "wheels" and not action.reuse_env,
                                 python_version=action.python, queues=action.queues, planned=action.wheels)
        return self.built(built)

    def built(self, built: release.Built) -> release.Built:
        env = "environment reused" if built.reused_env else "new environment"
        self.say(built.host, f"built {built.name} ({env}, {built.wheels_sent} wheel(s) sent, "
                             f"{built.bytes_sent // 1024} KiB)")
        return built

    def _script(self, remote: RemoteHost, step: Step, action: Script) -> Any:
        try:
            result = remote.run_script(action.text, sudo=True, what=step.summary, timeout=1800)
        except RemoteCommandError as exc:
            said = (exc.output.strip().splitlines() or [""])[-1]
            if exc.remote_exit_code == LOCK_LOST and said.startswith("lock lost:"):  # the guard: nothing ran
                raise Locked(f"{remote.name}: {said}") from None
            if step.phase != Phase.MIGRATE:
                raise
            raise HostError(remote.name, "migrations failed; current is untouched on every host:\n"
                            + "\n".join("    " + line for line in exc.output.strip().splitlines()[-20:])) from None
        if step.phase == Phase.MIGRATE:
            self.say(remote.name, "migrations applied")
        return result

    def finish_params(self, host: str, action: Finish) -> dict[str, Any]:
        """What `remote/finish.py` does on `host`: delete, record this host's own move, unlock."""
        app = self.stage.app
        params: dict[str, Any] = {"delete": [str(app.releases_dir / name) for name in action.delete],
                                  "cleanup_unit": f"{app.name}-cleanup-{self.run_id}-{secrets.token_hex(3)}",
                                  "state_dir": str(release.state_dir(app)),
                                  "token": self.token if action.unlock else ""}
        if action.mark_bad:
            params["mark_bad"] = {"release_dir": str(app.releases_dir / action.mark_bad), "id": self.run_id,
                                  "reason": "a host or Beat failed during the cutover: the stage was handed back"}
        if action.history:
            moved = {"release": action.release, "from_release": action.previous or None} if action.release else {}
            line = HistoryLine(**{**self.history.__dict__, **moved, "host": host, "seconds": self.seconds(),
                                  "durations": self.outcome.timings.get(host, {})})
            params["history"] = {"path": str(release.state_dir(app) / HISTORY), "line": line.to_json()}
        return params

    def _finish(self, remote: RemoteHost, action: Finish) -> list[str]:
        result = remote.run_python(host_programs.program("finish", self.finish_params(remote.name, action)),
                                   str(self.stage.app.python), sudo=True, what="finishing")
        warnings = [str(w) for w in json.loads(result.stdout.strip().splitlines()[-1])["warnings"]]
        for warning in warnings:  # never a reason to keep the lock of a run that is over
            self.say(remote.name, f"warning: {warning}")
            self.outcome.notes.append(f"{remote.name}: {warning}")
        return warnings

    def cutover(self, steps: Sequence[Step]) -> dict[str, CutoverState]:
        """Run cutover steps on all their hosts at once, whatever `parallel` says (one wave: a
        batch waiting for another would leave the stage split meanwhile); a host whose follower
        failed is UNKNOWN."""
        return self.execute(steps, what="cutover", all_at_once=True)

    # --- the queues: one round trip on one host (`queues.py`) -----------------------------------

    def alongside(self, steps: Sequence[Step]) -> Callable[[bool], None]:
        """Start the queue summary's `steps` in the background (they never fail the run); the
        function returned waits for them and says what they found (or, given False, stays silent)."""
        found: dict[str, Any] = {}

        def read() -> None:
            try:
                found.update(self.execute(steps, what="reading the queues"))
            except BaseException as exc:  # noqa: BLE001 - the summary never fails the run
                found[""] = [f"queues: unknown ({exc})"]

        worker = threading.Thread(target=read, daemon=True)
        worker.start()

        def wait(say: bool = True) -> None:
            worker.join()
            for lines in found.values() if say else ():
                for line in lines:
                    self.say("", line)
        return wait

    def _queue_summary(self, remote: RemoteHost) -> list[str]:
        """Per queue, what waits, what is held and who consumes it; never fails the run."""
        try:
            return queues.said(self.stage, queues.ask(remote, self.stage, [queues.report_request(self.stage)])[-1])
        except (DeployKitError, ValueError, KeyError) as exc:
            return [f"queues: unknown ({exc})"]

    def read_by_cutover(self, results: Mapping[str, CutoverState]) -> Callable[[bool], None] | None:
        """The queue summary a cutover read during its retire (`plan.reported`), as `alongside`
        gives it; None when no cutover of these read it."""
        detail = next((s.queues for s in results.values() if s.queues), "")
        if not detail:
            return None
        try:
            lines = [f"queues: unknown ({detail.removeprefix(UNREAD)})"] if detail.startswith(UNREAD) \
                else queues.said(self.stage, detail)
        except (ValueError, KeyError, TypeError) as exc:
            lines = [f"queues: unknown ({exc})"]

        def say(say: bool = True) -> None:
            for line in lines if say else ():
                self.say("", line)
        return say

    def queued_tasks(self, steps: Sequence[Step], built: dict[str, release.Built]) -> None:
        """What the build that was asked found in the queues: messages waiting for a task the new
        release does not register would fail on it. A warning naming each task and how many (with
        `strict`, a failed preflight: nothing switched)."""
        for step in steps:
            if isinstance(step.action, Build) and step.action.queues:
                self._queued(built[step.host], step.action.strict)

    def _queued(self, built: release.Built, strict: bool) -> None:
        if built.queued_error or built.unregistered is None:
            why = built.queued_error or "the release check did not say"
            if strict:
                raise PreflightFailed(f"preflight failed, nothing was switched: the queued tasks could not be "
                                      f"compared with the new release's: {why}")
            self.say("", f"warning: the queued tasks could not be compared with the new release's: {why}")
            return
        missing = built.unregistered
        if not missing:
            return
        text = ("the queues hold tasks the new release does not register (its workers would reject them): "
                + ", ".join(f"{name} ({count} message(s))" for name, count in sorted(missing.items()))
                + ". Fix: deploy a release that still registers them until the queues are empty")
        if strict:
            raise PreflightFailed(f"preflight failed, nothing was switched: {text}")
        self.outcome.notes.append(text)
        self.say("", f"warning: {text}")
