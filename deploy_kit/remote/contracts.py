"""The typed contracts between the control machine and the programs that run on hosts.

Each file or line the two sides exchange has one definition here, with one parser, used on
both sides: the cutover state file, the deploy lock's holder, the outcome of a release build
and the history line. Statuses are enums, never bare strings. Runs on hosts too: Python 3.8+,
stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of `data` that are fields of dataclass `cls` (newer writers may add keys)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _load(text: str) -> dict[str, Any]:
    return _object(json.loads(text))


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


class _Text(str, Enum):
    """A status that reads as its value everywhere: in JSON, in f-strings (Python 3.8 to 3.13)."""

    def __str__(self) -> str:
        return str(self.value)


# Where the control machine and the host programs keep their state: deploy_to/STATE_DIR/...
STATE_DIR = ".deploy-kit"  # in deploy_to; each release has one too (releases/NAME/.deploy-kit)
CUTOVER_STATE = "cutover.json"  # the cutover's state file (`CutoverState`)
HISTORY = "history.jsonl"  # one `HistoryLine` per deploy or rollback and host
LOCK = "lock"  # the deploy lock: a directory, taken with mkdir
LOCK_HOLDER = "holder.json"  # in LOCK: its `LockHolder`
BAD = "BAD"  # in releases/NAME/.deploy-kit: a deploy was rolled back from it (`hostlib.mark_bad`)
ENV_KEY = "env-key"  # in releases/NAME/.deploy-kit: the key of the environment it was built with
# In a worker instance's handover file (/run/deploy-kit/APP/SERVICE@RELEASE.env, read by its unit
# until it joins the real queues): worker options of that start only (mingle off: the join syncs it)
HANDOVER_OPTIONS = "DEPLOY_KIT_HANDOVER_OPTIONS"

# The cutover's waits (`remote/cutover.py`), in seconds, each named once: `follow.budget` adds
# them up, so the control machine never gives up on a cutover that is within its own timeouts.
SYSTEMCTL = 60  # one systemctl call (start, restart, enable, disable, stop --no-block), or journalctl
STOP_MARGIN = 30  # a stop that waits: an old unit stopped in place (beyond its TimeoutStopSec), or a killed one
AGENT_START = 30  # the Celery agent's start (systemd-run, Python, the app): budget slack; its greeting waits `verify`
VERIFY_MARGIN = 10  # a verification task's answer, beyond the verify timeout
REMOTE_CONTROL = 30  # one remote-control call that must succeed (add_consumer, per queue)
REMOTE_CONTROL_QUICK = 15  # one best-effort call (cancel_consumer per queue, discarding a private queue)
FIND_NODES_WATCH = 2  # the shortest watch that finds the live nodes for the queue summary (a 1.5 s broadcast)
SYNC_REVOKED = 25  # join: the old nodes' revoked ids (3 s), every node's if they are silent (1 s), given (15 s)
BEAT_SETTLE = 1  # Beat must still run this long once it printed its banner and went idle
REPORT = 15  # retire, on the host that reports the queues: reading them (the nodes found in the watch, or a 1.5 s
# broadcast; then one question to them each, done once all answered; a broadcast more if a message looks stranded)
HANDOFF = 3  # retire: how long an old instance that stopped consuming may take to start what it took before
RESTORE_WAIT = 10  # giving back: how long the drained workers may take to end
RESTORE_SETTLE = 2  # then, so a message a live worker just took shows in its reserved tasks
RESTORE = RESTORE_WAIT + RESTORE_SETTLE + REMOTE_CONTROL  # ... then returning what they stranded (restore_stranded)
AGENT_CLOSE = 10  # the agent's exit once its stdin closes


UNREAD = "unread: "  # CutoverState.queues: the queues could not be read, and why


class CutoverStatus(_Text):
    """How a host's cutover stands, as its state file (or the control machine) says."""

    RUNNING = "running"  # the cutover program is at work
    DONE = "done"  # the host runs the target release, verified
    ROLLED_BACK = "rolled_back"  # a deploy failed; the host is back on the previous release, verified
    FELL_BACK = "fell_back"  # a rollback failed; the host stayed on the release it ran, verified
    ROLLBACK_FAILED = "rollback_failed"  # neither the target nor the previous release could be verified
    UNKNOWN = "unknown"  # the control machine lost track: the truth is on the host
    NOT_STARTED = "not_started"  # nothing was started on the host (known for certain)

    @property
    def settled(self) -> bool:
        """The host runs a known, verified release (or was never touched)."""
        return self in (CutoverStatus.DONE, CutoverStatus.ROLLED_BACK, CutoverStatus.FELL_BACK,
                        CutoverStatus.NOT_STARTED)

    @property
    def finished(self) -> bool:
        """The cutover program wrote its last word."""
        return self not in (CutoverStatus.RUNNING, CutoverStatus.UNKNOWN, CutoverStatus.NOT_STARTED)


class Mode(_Text):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


@dataclass
class Step:
    """One step of a cutover: None in `ok` while it runs."""

    name: str
    started: float
    ended: float | None = None
    ok: bool | None = None
    detail: str = ""

    @property
    def seconds(self) -> float:
        return round((self.ended or self.started) - self.started, 2)


@dataclass
class CutoverState:
    """The state file `deploy_to/.deploy-kit/cutover.json`, rewritten after every step."""

    id: str
    mode: Mode
    target: str
    previous: str | None
    status: CutoverStatus = CutoverStatus.RUNNING
    step: str = ""
    steps: list[Step] = field(default_factory=list)
    journal: list[str] = field(default_factory=list)
    started: float = 0.0
    pid: int = 0
    live: str | None = None  # the release `current` points to at the end ("" = none)
    failure: str = ""  # why the forward pass failed
    rollback_failure: str = ""  # why the way back failed too
    queues: str = ""  # the queue summary read during the retire (`celery_agent.report`), or UNREAD + why
    hand_back: bool = False  # the way back of a run that failed elsewhere (`cutover.py`), not the run's own move

    def to_json(self) -> str:
        data = asdict(self)
        data["mode"], data["status"] = self.mode.value, self.status.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> CutoverState:
        data = _known(cls, _load(text))
        data["mode"] = Mode(data["mode"])
        data["status"] = CutoverStatus(data.get("status", "running"))
        data["steps"] = [Step(**_known(Step, s)) for s in data.get("steps", [])]
        return cls(**data)


@dataclass
class LockHolder:
    """Who holds an app's deploy lock (`deploy_to/.deploy-kit/lock/holder.json`).

    `token` is unique to one run: a run releases the lock only while it still holds that
    token, so a run that stalled and resumed never removes a newer holder's lock. A lock whose
    holder file cannot be read is `unreadable()`; `fresh` then says it was taken seconds ago (its
    file is being written this instant) rather than left by a run that died while taking it."""

    who: str
    host: str  # the machine the deploy runs from
    action: str
    ref: str
    since: str
    token: str = ""
    fresh: bool = False  # only of an unreadable holder; never written to the holder file

    UNREADABLE = "unknown (no readable holder file)"

    @property
    def readable(self) -> bool:
        return self.who != self.UNREADABLE

    def describe(self) -> str:
        if not self.readable:
            return f"held, holder {self.UNREADABLE}"
        return f"held by {self.who} from {self.host} since {self.since} ({self.action} of {self.ref})"

    def younger_than(self, other: LockHolder) -> bool:
        """Started after `other` (one whose holder file is being written counts as just started):
        two runs rank each other the same way, by when they started, then by token. One that does
        not say when it started counts as the oldest."""
        if self.fresh:
            return True

        def rank(holder: LockHolder) -> tuple[str, str]:
            return ("" if holder.since == "?" else holder.since, holder.token)
        return rank(self) > rank(other)

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.fresh:
            del data["fresh"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_data())

    @classmethod
    def from_data(cls, data: Any) -> LockHolder:
        data = dict(_object(data))
        if "host" not in data and "from" in data:  # holder files written before the token existed
            data["host"] = data["from"]
        data = _known(cls, data)
        for name in ("who", "host", "action", "ref", "since"):
            data[name] = str(data.get(name, "?"))
        data["token"], data["fresh"] = str(data.get("token", "")), bool(data.get("fresh", False))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> LockHolder:
        return cls.from_data(json.loads(text))

    @classmethod
    def unreadable(cls, fresh: bool = False) -> LockHolder:
        return cls(who=cls.UNREADABLE, host="?", action="?", ref="?", since="?", fresh=fresh)


class BuildStatus(_Text):
    BUILT = "built"
    EXISTS = "exists"  # a release of that name is already on the host
    NEEDS_WHEELS = "needs_wheels"  # the environment could not be reused and no wheels came with it
    MISSING_DISTRIBUTION = "missing_distribution"  # pip wants a distribution that was not sent
    CHECK_FAILED = "check_failed"  # the release does not pass its check as the service
    NO_SPACE = "no_space"  # the filesystem of releases/ filled up while the release was written
    FAILED = "failed"


@dataclass
class BuildOutcome:
    """What the build program on a host printed as its last line."""

    status: BuildStatus
    reused_env: bool = False
    missing: str = ""  # the distribution pip could not find (MISSING_DISTRIBUTION)
    detail: str = ""  # the tail of the failing command's output (secrets masked)
    unregistered: dict | None = None  # queued task names the release lacks: {name: messages} (asked host)
    queued_error: str = ""  # why the queued tasks could not be compared (asked host)

    def to_json(self) -> str:
        data = asdict(self)
        data["status"] = self.status.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> BuildOutcome:
        data = _known(cls, _load(text))
        data["status"] = BuildStatus(data["status"])
        return cls(**data)


class Result(_Text):
    """How a deploy or rollback ended (`HistoryLine.result`; what the user is told)."""

    SUCCESS = "success"
    FAILED = "failed"
    PREFLIGHT_FAILED = "preflight failed"  # nothing was changed
    ROLLED_BACK = "rolled back"  # every host is back where it was (the user's outcome only)


@dataclass
class HistoryLine:
    """One line of `deploy_to/.deploy-kit/history.jsonl`: one deploy or rollback on one host."""

    action: Mode
    result: Result | None  # None while the run is under way (never written so)
    when: str
    who: str
    host: str = ""
    release: str = ""
    sha: str = ""
    ref: str = ""
    origin: str = ""  # the machine the deploy ran from
    from_release: str | None = None
    seconds: float = 0.0
    durations: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        data["action"], data["result"] = self.action.value, self.result.value if self.result else ""
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_data())

    @classmethod
    def from_data(cls, data: Any) -> HistoryLine:
        data = dict(_object(data))
        if "origin" not in data and "from" in data:  # lines written before this definition
            data["origin"] = data["from"]
        data = _known(cls, data)
        for name in ("when", "who"):
            data[name] = str(data.get(name, ""))
        data["action"] = Mode(data.get("action", ""))
        data["result"] = Result(data["result"]) if data.get("result") else None
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HistoryLine:
        return cls.from_data(json.loads(text))


LIVE_LOG = "live.jsonl"  # in deploy_to/.deploy-kit: every change of `current`, appended by the cutover


@dataclass
class LiveEvent:
    """One line of the live log: `current` moved from `previous` to `release` on this host.

    The log, not the releases' names, says what went live and in which order: rollback targets
    and cleanup follow it (a release that never went live is neither)."""

    release: str
    previous: str = ""
    mode: str = Mode.DEPLOY.value
    run: str = ""
    when: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LiveEvent:
        data = _known(cls, _load(text))
        data.setdefault("release", "")
        for name in ("release", "previous", "mode", "run"):
            if not isinstance(data.get(name, ""), str):
                raise ValueError(f"{name} is not a string")
        if not isinstance(data.get("when", 0.0), (int, float)):
            raise ValueError("when is not a number")
        return cls(**data)
