"""What a deploy or a rollback does on each host, as plain typed objects (pure).

Built from the configuration plus what the read-only probe found on each host. `--plan`
prints these very objects; the runner (`runner.py`) executes them and nothing else.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from deploy_kit import hostfacts, queues, releases, units
from deploy_kit.config import Host, Stage
from deploy_kit.errors import UsageError
from deploy_kit.hostfacts import HostFacts, ReleaseInfo
from deploy_kit.release import Source, host_env_key, state_dir
from deploy_kit.remote import contracts as waits
from deploy_kit.remote.contracts import BAD, CUTOVER_STATE, HISTORY, STATE_DIR, LiveEvent, LockHolder, Mode

q = shlex.quote
Line = tuple[str, str]  # (a step's name, or "" for a line of detail; text)


class Phase(StrEnum):
    LOCK = "lock+check"
    RELEASE = "release"
    MIGRATE = "migrate"
    CUTOVER = "cutover"
    BEAT = "beat"
    FINISH = "finish"
    SUMMARY = "queues"  # what waits, what is held, who consumes (never fails the run; said at the end)
    UNDO = "undo"  # only when something failed: back to no release, discard a release
    MARK_BAD = "mark bad"


@dataclass(frozen=True)
class Probe:
    """The host probe (`remote/hostprobe.py`): takes the lock when its params hold one (its slow
    `fab check` probes, which change nothing, start first and run meanwhile)."""

    params: dict[str, Any]

    def lines(self) -> list[Line]:
        lock, check = self.params.get("lock"), self.params["check"]
        return [*([("lock", f"mkdir {self.params['state_dir']}/lock (atomic), holder {lock['who']} from "
                    f"{lock['host']}; refused while another run holds it")] if lock else []),
                ("check", "every `fab check` probe but the current release's Celery app (the build imports "
                 "the new release's as the service); the broker as the service" if check
                 else "read the releases and the units (no checks)"),
                ("", "python3 - < deploy_kit/remote/hostprobe.py (as root; one round trip)")]


@dataclass(frozen=True)
class Build:
    """Send the code (and the wheels the host lacks) and build releases/NAME there."""

    release: str
    reuse_env: bool
    wheels: tuple[str, ...]
    python: str  # the host's Python version, part of the environment's key
    queues: tuple[str, ...] = ()  # (one host) compare the task names waiting there with the release's
    strict: bool = False  # ... and a task it lacks is an error, not a warning
    installer: str = "pip"  # who installs a new environment: "uv" (pip where it cannot), "pip", "pip (index)"

    def lines(self) -> list[Line]:
        by = "uv (pip where uv cannot)" if self.installer == "uv" else self.installer
        env = "reuse the current release's environment (hard links)" if self.reuse_env else \
            (f"new environment installed by {by}; wheels sent: {', '.join(self.wheels) or 'none (the host has them)'}"
             if self.installer != "pip (index)" else "new environment installed by pip from the package index")
        queued = [("", f"... and the task names waiting in {', '.join(self.queues)} against those it registers "
                       f"({'an error' if self.strict else 'a warning'} for any it lacks)")] if self.queues else []
        return [("", f"unpack, {env}"), ("", "release check as the service, in one Python: manage.py check; "
                                             "import the Celery app"), *queued,
                ("", f"rename .{self.release}.building to {self.release}")]


@dataclass(frozen=True)
class Script:
    """A bash script run as root on the host, in one round trip (exactly this text)."""

    text: str

    def lines(self) -> list[Line]:
        return [("", line) for line in self.text.rstrip("\n").splitlines()]


def handover_lines(params: dict[str, Any], hostname: str = "") -> list[Line]:
    """The (name, description) of each step the cutover program (`remote/cutover.py`) runs with
    these params when nothing fails, as `--plan` shows them (a test compares them with a run)."""
    target = params["target"]
    if params.get("phase") == "beat":
        timeout, stop = params["verify"]["timeout"], params["stop_timeout"]
        return [("switch", f"current -> releases/{target} (a new symlink renamed over it: atomic)"),
                ("restart beat", f"systemctl restart --no-block {params['beat_unit']} (queued: the old Beat's stop "
                                 f"may take its TimeoutStopSec, {stop}s)"),
                ("wait for beat", f"until Beat runs from releases/{target} (within {stop + timeout}s), then until it "
                                  f"printed its banner (its scheduler class loaded) and went idle, then "
                                  f"{waits.BEAT_SETTLE}s more (without the banner in the journal: idle "
                                  f"{params['watch']}s); one still busy after {timeout}s has run that long")]
    workers = params["workers"]
    if not workers:
        return [("switch", f"current -> releases/{target} (atomic rename; no worker runs on this host)")]

    def new(w: dict[str, Any]) -> str:
        return w["template"].replace("@.", f"@{target}.")

    def queue(w: dict[str, Any]) -> str:
        return w["private_queue"].replace("{host}", hostname or "{host}").replace("%i", target)

    if params.get("hand_back"):
        in_place = [w["service"] for w in workers if not w["handover"]]
        return [
            ("start", "; ".join(new(w) + (" beside the running instance" if w["handover"] else
                                          " once the running instance stopped (restart in place: the queue waits)")
                                + f", consuming {', '.join(w['queues'])} at once" for w in workers)
             + f" (it ran when this run began: no new proof; one still draining is waited for first, at most "
               f"{params['stop_timeout']}s + {waits.STOP_MARGIN}s)"),
            ("confirm", f"each instance consumes its queues again, asked by remote control within "
                        f"{params['verify']['timeout']}s (if the broker cannot be reached, nothing can be "
                        "confirmed: the watch decides)"),
            ("watch", f"the instances keep running for {params['watch']}s"),
            ("retire", f"the instances of {params['previous']} stop taking tasks, start what they took already, and "
                       "drain in the background (warm shutdown)" + (f"; {', '.join(in_place)}: stopped at the start "
                                                                    "already" if in_place else "")),
            ("switch", f"current -> releases/{target} (atomic rename); enable the instances"),
            ("on failure", "stop them (warm shutdown: they may hold user tasks); the instances of "
                           f"{params['previous']} start again (one still draining once its drain ended); nothing is "
                           "marked bad"),
        ]
    found_nodes = bool(params.get("report")) and float(params["watch"]) >= waits.FIND_NODES_WATCH
    found = [
        ("start", "; ".join(f"{new(w)} beside the running instance, consuming only {queue(w)}"
                            + (" (if an older instance runs: without mingle, about 1 s sooner, the join gives it the "
                               "revoked task ids instead)" if w["mingle"] else "")
                            if w["handover"]
                            else f"{new(w)} once the old instance stopped (restart in place: the queue waits), "
                                 f"consuming only {queue(w)}" for w in workers)
         + f" (one of that release still draining is waited for first, at most {params['stop_timeout']}s + "
           f"{waits.STOP_MARGIN}s)"),
        ("verify", f"{params['verify']['task']} must complete within {params['verify']['timeout']}s on "
                   + ", ".join(queue(w) for w in workers)),
        ("join", "; ".join((f"{new(w)} gets the revoked task ids the older instance knows (if one runs; every "
                             "node's if it is silent and mingle was skipped), then " if w["handover"]
                            else f"{new(w)} ") + f"consumes {', '.join(w['queues'])} too (confirmed)"
                           for w in workers)),
        ("watch", f"the new instances keep running for {params['watch']}s" + (
            "; meanwhile the live Celery nodes are found (a 1.5 s broadcast) for the queue summary" if found_nodes
            else "")),
        ("retire", "the older instances stop taking tasks, start what they took already, and drain in the "
                   "background (warm shutdown)" + (f"; meanwhile the queue summary is read from "
                                                   f"{'those nodes' if found_nodes else 'the nodes that answer'} "
                                                   f"(waiting, unacked, consumers of {', '.join(params['report'])}), "
                                                   "said at the end" if params.get("report") else "")),
    ]
    found.append(("switch", f"current -> releases/{target} (atomic rename); enable the new instances"))
    back = f", mark {target} bad" if params.get("mark_bad_on_failure") else ""
    found.append(("on failure", f"stop the new instances at once; the old ones keep serving (one told to stop "
                                f"taking tasks takes its queues again){back}"))
    return found


@dataclass(frozen=True)
class Cutover:
    """The detached cutover program (`remote/cutover.py`) under systemd-run, followed from here."""

    params: dict[str, Any]
    hostname: str  # as the host's worker names its verification queue (the sandbox's is its name)

    def lines(self) -> list[Line]:
        return [("", f"systemd-run --unit={self.params['app']['name']}-cutover-{self.params['id']} python3 "
                 f"deploy_kit/remote/cutover.py (detached from SSH; progress in {STATE_DIR}/{CUTOVER_STATE})"),
                *handover_lines(self.params, self.hostname)]


@dataclass(frozen=True)
class Finish:
    """`remote/finish.py`: remove old releases, mark one bad, append the history line (written when
    it runs), release the lock; what cannot be removed or written is a warning, never a kept lock."""

    delete: tuple[str, ...] = ()
    unlock: bool = True
    history: bool = True
    release: str = ""  # what the history line records for this host: the release it went to
    previous: str = ""  # and the one it left
    mark_bad: str = ""  # a release a deploy was rolled back from (`hostlib.mark_bad`, as the cutover does)

    def lines(self) -> list[Line]:
        moved = f" ({self.previous or 'none'} -> {self.release})" if self.release else ""
        return [*([("", f"mark releases/{self.mark_bad} bad ({self.mark_bad}/{STATE_DIR}/{BAD}: when, run, why)")]
                  if self.mark_bad else []),
                *([("", f"append the history line{moved} to {STATE_DIR}/{HISTORY}")] if self.history else []),
                *(("", f"remove releases/{name} (renamed .{name.lstrip('.')}.deleting at once, removed in the "
                       "background)") for name in self.delete),
                *([("", "release the lock (only while it is this run's)")] if self.unlock else [])]


@dataclass(frozen=True)
class Queues:
    """The Celery agent as the service on one host (`remote/queues.py`): what waits, what is held
    and who consumes it, after the run (never fails it)."""

    queues: tuple[str, ...]

    def lines(self) -> list[Line]:
        return [("", f"queue summary: waiting, unacked, consumers of {', '.join(self.queues)}")]


Action = Probe | Build | Script | Cutover | Finish | Queues


@dataclass(frozen=True)
class Step:
    host: str
    phase: Phase
    summary: str
    action: Action


@dataclass(frozen=True)
class Plan:
    mode: Mode
    release: str
    steps: tuple[Step, ...]
    on_failure: tuple[Step, ...] = field(default=())

    def phase(self, phase: Phase) -> list[Step]:
        return [s for s in self.steps if s.phase == phase]

    def render(self) -> Iterable[str]:
        for title, steps in (("", self.steps), ("only if the cutover fails: ", self.on_failure)):
            for step in steps:
                yield f"{step.host} {title}{step.phase}: {step.summary}"
                for name, text in step.action.lines():
                    yield f"{step.host} {name}: {text}" if name else f"    {text}"


# --- builders ------------------------------------------------------------------------------


def current_release(facts: HostFacts) -> str | None:
    current = facts.path("current")
    if current is None or current.target is None or not current.resolves:
        return None
    return current.target.rstrip("/").rsplit("/", 1)[-1]


def lock_steps(stage: Stage, holder: LockHolder | None, *, check: bool) -> list[Step]:
    what = "take the lock and run every `fab check` probe" if check else "take the lock, read the releases"
    return [Step(h.name, Phase.LOCK, what if holder else "read-only probe",
                 Probe(hostfacts.params(stage, h, check, holder, current_app=False))) for h in stage.hosts]


def reuses_env(facts: HostFacts, source: Source) -> bool:
    info = next((r for r in facts.releases if r.name == current_release(facts)), None)
    return info is not None and info.env_key == host_env_key(source, facts.target.get("python", ""))


LOCK_LOST = 4  # the exit code of a script that found the deploy lock no longer this run's
_HOLDS_LOCK = ("import json, sys\ntry:\n    token = json.load(open(sys.argv[1])).get('token')\n"
               "except (OSError, ValueError, AttributeError):\n    token = None\nsys.exit(token != sys.argv[2])")


def lock_guard(stage: Stage, token: str) -> str:
    """Bash that ends the script (exit LOCK_LOST, "lock lost", nothing changed) unless the deploy
    lock's holder carries `token`: a run that stalled while someone ran `fab unlock` (and another
    run took the lock) never migrates or starts a cutover under the other run."""
    holder = state_dir(stage.app) / "lock" / "holder.json"
    lost = (f"lock lost: the deploy lock of {stage.app.name} here is no longer this run's (broken by `fab unlock`, "
            f"perhaps taken by another run); this run changes nothing more here. `fab status --stage {stage.name}` "
            "shows who holds it")
    return (f"if ! {q(str(stage.app.python))} -c {q(_HOLDS_LOCK)} {q(str(holder))} {q(token)}; then\n"
            f"  echo {q(lost)} >&2; exit {LOCK_LOST}\nfi\n")


def migrate_script(stage: Stage, release: str, token: str) -> str:
    directory = stage.app.releases_dir / release
    return lock_guard(stage, token) + units.as_service_command(
        stage, str(directory), [str(directory / units.VENV / "bin/python"), "manage.py", "migrate",
                                "--noinput"]) + " 2>&1\n"


def cutover_params(stage: Stage, host: Host, target: str, previous: str | None, mode: Mode, run_id: str,
                   phase: str = "workers", report: bool = False, hand_back: bool = False) -> dict[str, Any]:
    """The cutover program's parameters: the workers' handover on a host, or Beat on its host;
    with `report`, the reporting host's cutover also reads the queue summary the run ends with;
    with `hand_back`, a failed deploy's or rollback's way back to the release the host ran when
    the run began (no new proof)."""
    app = stage.app
    workers = stage.workers_on(host) if phase == "workers" else ()
    return {
        "id": run_id, "mode": mode.value, "phase": phase, "target": target, "previous": previous,
        "app": {"name": app.name, "celery_app": app.celery_app},
        "releases_dir": str(app.releases_dir), "current": str(app.current_link), "venv": units.VENV,
        "workers": [{"service": w.name, "template": w.unit(app), "legacy": w.legacy_unit(app),
                     "queues": list(w.queues), "handover": w.handover, "mingle": w.mingle,
                     "private_queue": units.private_queue(stage, w, "%i", "{host}")} for w in workers],
        "beat_unit": stage.beat.unit(app) if phase == "beat" and stage.beat else None,
        "verify": {"task": stage.verify.task, "timeout": stage.verify.timeout}, "watch": stage.verify.watch,
        "service_environment": list(units.service_environment(stage)),
        "stop_timeout": max([units.stop_timeout(stage, w) for w in workers] or [stage.systemd.stop_margin]),
        "state_file": str(state_dir(app) / CUTOVER_STATE),
        "run_dir": str(units.RUN_DIR / app.name),
        "mark_bad_on_failure": mode == Mode.DEPLOY and phase == "workers",
        "report": queues.queue_names(stage) if report and workers and reads_queues(stage, host) else [],
        "hand_back": hand_back,
    }


def reads_queues(stage: Stage, host: Host) -> bool:
    """Whether `host`'s cutover reads the queue summary: only when it is the one host with workers
    (elsewhere the other hosts' cutovers still run while it retires; then a step of its own,
    once every host's workers moved)."""
    return [h.name for h in stage.hosts if stage.workers_on(h)] == [host.name]


def cutover_steps(stage: Stage, targets: Mapping[str, str], previous: Mapping[str, str | None], mode: Mode,
                  run_id: str, report: bool = False, hand_back: bool = False) -> list[Step]:
    """The workers' handover on every host of `targets` at once (with `report`, the one host with
    workers also reads the queue summary: `reads_queues`; `hand_back`: see `cutover_params`)."""
    verb = "hand the workers back" if hand_back else "hand the workers over"
    return [Step(h.name, Phase.CUTOVER, f"{mode.value}: {verb} to {targets[h.name]} "
                 f"(from {previous.get(h.name) or 'none'})",
                 Cutover(cutover_params(stage, h, targets[h.name], previous.get(h.name), mode, run_id,
                                        report=report, hand_back=hand_back), h.name))
            for h in stage.hosts if h.name in targets]


def reported(steps: Iterable[Step]) -> bool:
    """One of these cutover steps reads the queue summary (no separate round trip for it then)."""
    return any(isinstance(s.action, Cutover) and s.action.params.get("report") for s in steps)


def beat_steps(stage: Stage, targets: Mapping[str, str], previous: Mapping[str, str | None], mode: Mode,
               run_id: str, back: bool = False) -> list[Step]:
    """Beat on its one host: after every host's workers in a deploy, before them in a rollback
    (`back`: after the workers a failed rollback handed back)."""
    if stage.beat is None or stage.beat.host not in targets:
        return []
    host = stage.host(stage.beat.host)
    when = "after every host's workers" if mode == Mode.DEPLOY else "after the workers handed back" if back else \
        "first, so it sends no task the old release lacks"
    return [Step(host.name, Phase.BEAT, f"Beat moves to {targets[host.name]}, {when}",
                 Cutover(cutover_params(stage, host, targets[host.name], previous.get(host.name), mode,
                                        run_id + "b", "beat"), host.name))]


def cleanup(stage: Stage, facts: HostFacts, new: str) -> tuple[str, ...]:
    """What cleanup deletes once `new` is live (never `current` nor the previous good one)."""
    listing = list(facts.releases)
    if new not in {r.name for r in listing}:
        listing.append(ReleaseInfo(new, False, False, {}))
    events = (*facts.live, LiveEvent(new, current_release(facts) or "", Mode.DEPLOY.value))
    return tuple(releases.to_delete(listing, new, stage.app.keep_releases, events))


def finish_steps(stage: Stage, hosts: Iterable[str], *, delete: Mapping[str, tuple[str, ...]] | None = None,
                 unlock: bool = True, history: bool = True,
                 moves: Mapping[str, tuple[str | None, str]] | None = None) -> list[Step]:
    """Record (each host's own move: the release it left, the one it went to), clean up, unlock."""
    summary = "record, clean up, unlock" if history else "release the lock"
    moved = moves or {}
    return [Step(h, Phase.FINISH, summary, Finish((delete or {}).get(h, ()), unlock, history,
                                                  moved[h][1] if h in moved else "",
                                                  (moved[h][0] or "") if h in moved else ""))
            for h in hosts]


def summary_steps(stage: Stage, alongside: str = "") -> list[Step]:
    """One round trip on the reporting host: what the queues hold after the run (or after the
    workers' cutover, read `alongside` the next step and said at the end)."""
    when = f"after the cutover, read alongside {alongside}" if alongside else "after the run"
    return [Step(queues.reporter(stage).name, Phase.SUMMARY, f"the queues {when}",
                 Queues(tuple(queues.queue_names(stage))))]


def deploy(stage: Stage, facts: Mapping[str, HostFacts], source: Source, run_id: str,
           wheels: Mapping[str, tuple[str, ...]], strict: bool = False, token: str = "") -> Plan:
    """Everything after the lock and the checks, from what the probe found on each host; the
    migration runs only while the lock carries this run's `token`."""
    app = stage.app
    current = {h: current_release(f) for h, f in facts.items()}
    steps: list[Step] = []
    asked = queues.reporter(stage).name  # one host compares the queued task names with the release's
    for host in stage.hosts:
        f = facts[host.name]
        reuse = app.install == "wheels" and reuses_env(f, source)
        steps.append(Step(host.name, Phase.RELEASE, f"build {app.releases_dir / source.name} from {source.ref} "
                          f"at {source.sha[:10]} ({len(source.archive) // 1024} KiB of code)",
                          Build(source.name, reuse, () if reuse else wheels.get(host.name, ()),
                                f.target.get("python", ""),
                                tuple(queues.queue_names(stage)) if host.name == asked else (), strict,
                                app.installer if app.install == "wheels" else "pip (index)")))
    steps.append(Step(stage.migrate_host.name, Phase.MIGRATE, "migrations, once per stage, before the switch",
                      Script(migrate_script(stage, source.name, token))))
    targets = {h.name: source.name for h in stage.hosts}
    steps += cutover_steps(stage, targets, current, Mode.DEPLOY, run_id, report=True)
    steps += [] if reported(steps) else summary_steps(stage, alongside="Beat")
    steps += beat_steps(stage, targets, current, Mode.DEPLOY, run_id)
    steps += finish_steps(stage, [h.name for h in stage.hosts],
                          delete={h: cleanup(stage, f, source.name) for h, f in facts.items()},
                          moves={h: (c, source.name) for h, c in current.items()})
    back = {h: c for h, c in current.items() if c}
    on_failure = cutover_steps(stage, back, targets, Mode.ROLLBACK, run_id + "r", hand_back=True)
    on_failure += [Step(h, Phase.UNDO, "first deploy: back to no release",
                        Script(unswitch_script(stage, h, source.name))) for h, c in current.items() if not c]
    on_failure += [Step(h.name, Phase.MARK_BAD, f"mark {source.name} bad",
                        Finish(unlock=False, history=False, mark_bad=source.name)) for h in stage.hosts]
    return Plan(Mode.DEPLOY, source.name, tuple(steps), tuple(on_failure))


def rollback(stage: Stage, facts: Mapping[str, HostFacts], run_id: str, to: str | None) -> Plan:
    current = {h: current_release(f) for h, f in facts.items()}
    if to is None and len(set(current.values())) > 1:  # each host's own previous would keep them apart
        raise UsageError("the hosts run different releases (" + ", ".join(f"{h}: {c or 'none'}" for h, c in
                         current.items()) + "): a deploy or rollback was cut off. Name the release every "
                         "host goes to: `fab rollback --to RELEASE`, or deploy again")
    went_live = None if to is None else any(to in releases.lineage(f.releases, f.live, current[h])
                                            for h, f in facts.items())  # live on one host is enough
    targets = {h: releases.rollback_target(f.releases, current[h], to, f.live, went_live) for h, f in facts.items()}
    if len(set(targets.values())) > 1:  # histories that differ would leave the stage split
        raise UsageError("the hosts would go to different releases (" + ", ".join(
            f"{h}: {t}" for h, t in targets.items()) + "): their histories differ. Name one: "
            "`fab rollback --to RELEASE`")
    moving = {h: t for h, t in targets.items() if t != current[h]}  # a host already there stays
    if not moving:
        raise UsageError(f"every host already runs {to}")
    steps = beat_steps(stage, targets, current, Mode.ROLLBACK, run_id)
    steps += cutover_steps(stage, moving, current, Mode.ROLLBACK, run_id, report=True)
    steps += [] if reported(steps) else summary_steps(stage, alongside="the finish")
    steps += finish_steps(stage, [h.name for h in stage.hosts], moves={h: (current[h], t) for h, t in moving.items()})
    # A host failed: the hosts that moved hand back, then Beat, so the stage runs what it ran.
    back = {h: c for h, c in current.items() if h in moving and c}
    on_failure = cutover_steps(stage, back, targets, Mode.ROLLBACK, run_id + "r", hand_back=True)
    on_failure += beat_steps(stage, back, targets, Mode.ROLLBACK, run_id + "r", back=True)
    return Plan(Mode.ROLLBACK, next(iter(targets.values()), ""), tuple(steps), tuple(on_failure))


def migration_warning(facts: HostFacts, leaving: str | None, target: str) -> str:
    """Migrations the release we leave has and the target lacks: they stay applied."""
    by_name = {r.name: r for r in facts.releases}
    left = set(by_name[leaving].revision.get("migrations", [])) if leaving in by_name else set()
    kept = set(by_name[target].revision.get("migrations", [])) if target in by_name else set()
    extra = sorted(left - kept)
    if not extra:
        return ""
    return (f"{leaving} has migrations {target} lacks ({', '.join(extra[:5])}{'...' if len(extra) > 5 else ''}); "
            "they stay applied (deploy-kit never reverses migrations): the old code must cope with the new schema")


# --- the scripts of the failure path -------------------------------------------------------


def discard(release: str, built_here: bool) -> Finish:
    """Remove a release that never went live: the complete one only where this run built it."""
    return Finish((f".{release}.building", *([release] if built_here else [])), unlock=False, history=False)


def unswitch_script(stage: Stage, host: str, release: str) -> str:
    """A first deploy that failed elsewhere: stop what it started here, leave no release live."""
    on = stage.host(host)
    names = [w.instance(stage.app, release) for w in stage.workers_on(on)]
    names += [stage.beat.unit(stage.app)] if stage.beat and stage.beat.host == host else []
    stop = f"systemctl disable --now --quiet {' '.join(q(n) for n in names)} || true\n" if names else ""
    return stop + f"rm -f {q(str(stage.app.current_link))}\n"
