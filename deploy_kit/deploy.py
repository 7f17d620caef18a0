"""`fab deploy` and `fab rollback`: the lifecycle, one phase after the other, on one connection per host.

    lock       take the app's lock on every host (mkdir, atomic)  } one round trip
    check      the `fab check` preflight                          }
    release    pack the ref once here; on each host: unpack, build or reuse the virtualenv,
               check the release as the service would run it      (one round trip)
    migrate    `manage.py migrate` once, on the migrate host, before the switch
    cutover    on each host, detached from SSH (`remote/cutover.py`): switch, restart workers,
               verify with a real task, restart Beat; roll back by itself on failure.
               Hosts without Beat first, then the Beat host.
    finish     record history, clean up old releases, release the lock (one round trip)

A failure before the cutover changes nothing that runs. A failure during it rolls every host
back to the previous release. Each step's duration is kept for the closing table.
"""

from __future__ import annotations

import getpass
import json
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from deploy_kit import checks, hostfacts, journal, release, releases, units, wheels
from deploy_kit.config import Host, Stage
from deploy_kit.errors import (
    EXIT_LOCKED,
    EXIT_ROLLBACK_FAILED,
    EXIT_ROLLED_BACK,
    DeployKitError,
    HostError,
    HostsFailed,
    PreflightFailed,
    RemoteCommandError,
)
from deploy_kit.hostfacts import HostFacts
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost

q = shlex.quote
CACHE_DIR = Path.home() / ".cache" / "deploy-kit"
Say = Callable[[str, str], None]  # (host or "", message)


class Locked(DeployKitError):
    """Another deploy or rollback holds the lock."""

    exit_code = EXIT_LOCKED


class DeployFailed(DeployKitError):
    """The deploy failed after the switch; `rolled_back` says where the hosts ended."""

    def __init__(self, message: str, rolled_back: bool):
        super().__init__(message)
        self.exit_code = EXIT_ROLLED_BACK if rolled_back else EXIT_ROLLBACK_FAILED


@dataclass
class Outcome:
    release: str = ""
    sha: str = ""
    result: str = ""
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # host -> step -> seconds
    notes: list[str] = field(default_factory=list)


def lock_info(action: str, ref: str) -> dict[str, str]:
    return {"who": getpass.getuser(), "from": socket.gethostname(), "action": action, "ref": ref,
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def _timed(outcome: Outcome, host: str, step: str, started: float) -> None:
    outcome.timings.setdefault(host, {})[step] = round(time.monotonic() - started, 2)


def _lock_and_probe(session: Session, stage: Stage, info: dict[str, str], outcome: Outcome,
                    check: bool) -> dict[str, HostFacts]:
    def one(remote: RemoteHost) -> HostFacts | DeployKitError:
        started = time.monotonic()
        try:
            facts = hostfacts.gather(remote, stage, check=check, lock=info)
        except DeployKitError as exc:
            return exc
        _timed(outcome, remote.name, "lock+check", started)
        return facts

    found = session.each(one, what="locking and checking hosts")
    failed = {h: e for h, e in found.items() if isinstance(e, DeployKitError)}
    facts = {h: f for h, f in found.items() if isinstance(f, HostFacts)}
    taken = [h for h, f in facts.items() if f.lock and f.lock.acquired]
    if failed:  # give back the locks this run took, then report
        unlock(session, stage, taken)
        if len(found) == 1:
            raise next(iter(failed.values()))
        raise HostsFailed("locking and checking hosts", failed, list(facts))
    held = {h: f.lock.holder for h, f in facts.items() if f.lock and not f.lock.acquired}
    if held:
        unlock(session, stage, taken)
        lines = [f"  {host}: held by {h.get('who')} from {h.get('from')} since {h.get('since')} "
                 f"({h.get('action', 'deploy')} of {h.get('ref', '?')})" for host, h in held.items()]
        raise Locked(f"another deploy or rollback holds the lock of {stage.app.name}:\n" + "\n".join(lines)
                     + f"\nWait for it, or if it is dead: `fab unlock --stage {stage.name}`")
    return facts


def unlock(session: Session, stage: Stage, hosts: list[str]) -> None:
    lock = release.state_dir(stage.app) / "lock"
    script = f"rm -rf {q(str(lock))}\n"
    targets = set(hosts)
    session.each(lambda r: r.run_script(script, sudo=True, what="releasing the lock") if r.name in targets
                 else None, what="releasing the lock")


def _finish(session: Session, stage: Stage, record: dict[str, object], current: dict[str, str | None],
            facts: dict[str, HostFacts], outcome: Outcome, cleanup: bool, unlock_hosts: bool = True) -> None:
    """History line, cleanup and unlock, in one round trip per host."""
    app = stage.app
    state = release.state_dir(app)

    def one(remote: RemoteHost) -> None:
        started = time.monotonic()
        host_record = dict(record, host=remote.name, durations=outcome.timings.get(remote.name, {}))
        lines = [f"printf '%s\\n' {q(json.dumps(host_record))} >> {q(str(state / 'history.jsonl'))}"]
        if cleanup:
            listing = list(facts[remote.name].releases)
            new = str(record.get("release", ""))
            if new and new not in {r.name for r in listing}:
                listing.append(hostfacts.ReleaseInfo(new, False, record.get("result") != "success", {}))
            for name in releases.to_delete(listing, current.get(remote.name), app.keep_releases):
                lines.append(f"rm -rf {q(str(app.releases_dir / name))}")
        if unlock_hosts:
            lines.append(f"rm -rf {q(str(state / 'lock'))}")
        remote.run_script("\n".join(lines) + "\n", sudo=True, what="recording and cleaning up")
        _timed(outcome, remote.name, "finish", started)

    session.each(one, what="finishing")


def current_release(facts: HostFacts) -> str | None:
    current = facts.path("current")
    if current is None or current.target is None or not current.resolves:
        return None
    return Path(current.target).name


def _cutover_params(stage: Stage, host: Host, target: str, previous: str | None, mode: str,
                    run_id: str) -> dict[str, object]:
    app = stage.app
    workers = stage.workers_on(host)
    return {
        "id": run_id, "mode": mode, "target": target, "previous": previous,
        "app": {"name": app.name, "celery_app": app.celery_app},
        "releases_dir": str(app.releases_dir), "current": str(app.current_link),
        "workers": [{"unit": w.unit(app), "service": w.name} for w in workers],
        "beat_unit": stage.beat.unit(app) if stage.beat and stage.beat.host == host.name else None,
        "verify": {"task": stage.verify.task, "timeout": stage.verify.timeout},
        "verify_queue": units.verify_queue("{service}", "{host}"),
        "service_environment": list(units.service_environment(stage)),
        "venv": units.VENV,
        "stop_timeout": max([units.stop_timeout(stage, w) for w in workers] or [stage.systemd.stop_margin]),
        "state_file": str(release.state_dir(app) / "cutover.json"),
        "mark_bad_on_failure": mode == "deploy",
    }


def _launch_cutover(remote: RemoteHost, stage: Stage, params: dict[str, object]) -> None:
    """Start the cutover on the host under systemd-run, detached from this SSH session."""
    app = stage.app
    state = release.state_dir(app)
    agent = resources.files("deploy_kit.remote").joinpath("cutover.py").read_text()
    program = f"{agent}\nmain(json.loads({json.dumps(json.dumps(params))}))\n"
    unit = f"{app.name}-cutover-{params['id']}"
    script = (f"install -d -m 0700 {q(str(state))}\n"
              f"cat > {q(str(state / 'cutover-run.py'))} <<'DEPLOY_KIT_EOF'\n{program}DEPLOY_KIT_EOF\n"
              f"rm -f {q(str(params['state_file']))}\n"
              f"systemd-run --quiet --collect --unit={q(unit)} --description='deploy-kit cutover of {app.name}' "
              f"{q(str(app.python))} {q(str(state / 'cutover-run.py'))}\n")
    remote.run_script(script, sudo=True, what="starting the cutover")


def _follow_cutover(session: Session, name: str, stage: Stage, params: dict[str, object], say: Say,
                    outcome: Outcome, deadline: float) -> dict[str, object]:
    """Poll the host's state file until the cutover ends; report each step as it completes.

    The cutover runs on the host by itself: a dropped connection only pauses the polling,
    which reconnects and goes on."""
    app = stage.app
    unit = f"{app.name}-cutover-{params['id']}"
    # Unit state first, then the file: a cutover that ends in between is read as ended, not dead.
    script = (f"systemctl is-active {q(unit)} || true\nprintf -- '---\\n'\n"
              f"cat {q(str(params['state_file']))} 2>/dev/null || echo '{{}}'\n")
    reported = 0
    last: dict[str, object] = {}
    started = time.monotonic()
    lost = False
    while True:
        try:
            out = session.remote(name).run_script(script, sudo=True, what="following the cutover", timeout=30).stdout
            if lost:
                say(name, "connection back; the cutover went on meanwhile")
                lost = False
        except DeployKitError as exc:
            if not lost:
                say(name, f"lost the connection ({getattr(exc, 'reason', exc)}); the cutover goes on "
                          "on the host, reconnecting")
                lost = True
            if time.monotonic() > deadline:
                return dict(last, status="unknown", rollback_failure="the host could not be reached again")
            time.sleep(2)
            session.reconnect(name)
            continue
        active, _, text = out.partition("---\n")
        try:
            last = json.loads(text.strip() or "{}")
        except ValueError:
            last = {}
        steps = last.get("steps", [])
        for step in steps[reported:]:
            if step.get("ok") is None:
                break
            mark = "ok" if step["ok"] else "FAILED"
            say(name, f"{step['name']}: {mark} {step.get('detail', '')}".rstrip())
            outcome.timings.setdefault(name, {})[step["name"]] = round(
                step.get("ended", 0) - step.get("started", 0), 2)
            reported += 1
        status = last.get("status")
        running = active.strip() in ("active", "activating")
        if status in ("done", "rolled_back", "fell_back", "rollback_failed"):
            return last
        if not running and status == "running":
            return dict(last, status="unknown", rollback_failure="the cutover process died mid-way")
        if not running and not last and time.monotonic() - started > 15:
            return {"status": "not_started", "failure": "the cutover did not start on the host"}
        if time.monotonic() > deadline:
            return dict(last, status="unknown",
                        rollback_failure="the cutover did not finish in time; it may still be running")
        time.sleep(0.5)


def _cutover(session: Session, stage: Stage, targets: dict[str, str], previous: dict[str, str | None],
             mode: str, run_id: str, say: Say, outcome: Outcome) -> dict[str, dict[str, object]]:
    """Run the cutover on hosts without Beat first, then on the Beat host; stop at the first wave
    that fails. Returns each host's final state."""
    beat_host = stage.beat.host if stage.beat else None
    waves = [[h for h in stage.hosts if h.name != beat_host and h.name in targets],
             [h for h in stage.hosts if h.name == beat_host and h.name in targets]]
    # Worst case on a host: two restarts (warm shutdowns) and two verifications, forward and back.
    workers = max((len(stage.workers_on(h)) for h in stage.hosts), default=1)
    longest_stop = max(units.stop_timeout(stage, w) for w in stage.workers)
    one_pass = longest_stop + 120 + (stage.verify.timeout + 30) * (workers + 1)
    budget = 2 * one_pass + 60
    results: dict[str, dict[str, object]] = {}
    for wave in waves:
        if not wave:
            continue
        names = {h.name for h in wave}
        params = {h.name: _cutover_params(stage, h, targets[h.name], previous.get(h.name), mode, run_id)
                  for h in wave}

        def one(remote: RemoteHost, names: set[str] = names,
                params: dict[str, dict[str, object]] = params) -> dict[str, object]:
            if remote.name not in names:
                return {}
            watched = list(units.units_for(stage, remote.host))
            with journal.Tail(remote, stage, watched, since=time.time() - 1,
                              show=lambda item: _show_journal(say, item)):
                try:
                    _launch_cutover(remote, stage, params[remote.name])
                except DeployKitError as exc:
                    return {"status": "not_started", "failure": getattr(exc, "reason", str(exc))}
                return _follow_cutover(session, remote.name, stage, params[remote.name], say, outcome,
                                       time.monotonic() + budget)

        for host, state in session.each(one, what="cutover").items():
            if host in names:
                results[host] = state
        if any(s.get("status") != "done" for s in results.values()):
            break
    return results


def _show_journal(say: Say, item: journal.JournalLine | journal.HostEvent) -> None:
    """Journal lines of the units while they restart and verify, as they happen."""
    if isinstance(item, journal.HostEvent):
        say(item.host, f"journal: {item.message}")
        return
    if journal.is_banner(item.message):
        return
    say(item.host, f"  | {item.unit}: {item.message}")
    hint = journal.hint_for(item.message)
    if hint and item.priority <= 4 or hint and "Error" in item.message:
        say(item.host, f"  | hint: {hint}")


def deploy(stage: Stage, *, ref: str | None, say: Say, now: datetime | None = None) -> Outcome:
    """The whole `fab deploy`; raises PreflightFailed, Locked or DeployFailed with the details."""
    outcome = Outcome()
    ref = ref or stage.app.ref
    now = now or datetime.now(UTC)
    run_id = now.strftime("%Y%m%d%H%M%S")
    started = time.monotonic()
    with Session(stage) as session:
        say("", f"locking and checking {len(stage.hosts)} host(s)")
        facts = _lock_and_probe(session, stage, lock_info("deploy", ref), outcome, check=True)
        record: dict[str, object] = {"action": "deploy", "ref": ref, "who": getpass.getuser(),
                                     "from": socket.gethostname(), "when": now.isoformat(timespec="seconds")}
        current = {h: current_release(f) for h, f in facts.items()}
        try:
            failed = [(h, c) for h in stage.hosts for c in checks.evaluate(stage, h, facts[h.name]) if c.failed]
            if failed:
                raise PreflightFailed("preflight failed, nothing was changed:\n" + "\n".join(
                    f"  {h.name}: {c.name}: {c.detail} (fix: {c.fix})" for h, c in failed))
            say("", "preflight passed on every host")

            t = time.monotonic()
            source = release.read_source(stage.app, ref, now, CACHE_DIR)
            outcome.release, outcome.sha = source.name, source.sha
            record.update(release=source.name, sha=source.sha)
            say("", f"release {source.name}: {ref} at {source.sha[:10]} ({len(source.archive) // 1024} KiB packed)")
            houses = {key: wheels.Wheelhouse(source.requirements, wheels.Target.from_facts(f.target), CACHE_DIR,
                                             source.constraints)
                      for key, f in facts.items()}
            for host, house in houses.items():
                if stage.app.install == "wheels" and not _reuses_env(facts[host], source):
                    house.files()  # fetch once here, before any host waits on it
            _timed(outcome, "(local)", "pack+wheels", t)

            def build(remote: RemoteHost) -> release.Built:
                t0 = time.monotonic()
                host_facts = facts[remote.name]
                built = release.build_on(remote, stage, source, houses[remote.name], set(host_facts.wheels),
                                         send_wheels=stage.app.install == "wheels"
                                         and not _reuses_env(host_facts, source),
                                         python_version=host_facts.target.get("python", ""))
                _timed(outcome, remote.name, "release", t0)
                env = "environment reused" if built.reused_env else "new environment"
                say(remote.name, f"built {built.name} ({env}, {built.wheels_sent} wheel(s) sent, "
                                 f"{built.bytes_sent // 1024} KiB)")
                return built

            try:
                built_on = list(session.each(build, what="building the release"))
            except HostsFailed as exc:
                _discard(session, stage, source.name, exc.succeeded)
                raise
            except DeployKitError:
                _discard(session, stage, source.name, [])
                raise

            migrate_host = stage.migrate_host
            t = time.monotonic()
            try:
                _migrate(session.remotes[migrate_host.name], stage, source.name)
            except DeployKitError:
                _discard(session, stage, source.name, built_on)
                raise
            _timed(outcome, migrate_host.name, "migrate", t)
            say(migrate_host.name, "migrations applied")
        except BaseException as exc:
            # Nothing was switched: record why, release the lock, leave `current` as it was.
            record.update(result="preflight failed" if isinstance(exc, PreflightFailed) else "failed",
                          error=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                          seconds=round(time.monotonic() - started, 1))
            try:
                _finish(session, stage, record, current, facts, outcome, cleanup=False)
            except DeployKitError:
                unlock(session, stage, list(facts))
            raise

        targets = {h.name: source.name for h in stage.hosts}
        results = _cutover(session, stage, targets, current, "deploy", run_id, say, outcome)
        failed_hosts = [h for h, s in results.items() if s.get("status") != "done"]
        if failed_hosts:
            _stage_rollback(session, stage, results, current, run_id, say, outcome, source.name)
        live = _live(results, current)
        consistent = all(s.get("status") in _SETTLED for s in results.values())
        known = all(s.get("status") in (*_SETTLED, "fell_back") for s in results.values())
        outcome.result = "success" if not failed_hosts else "rolled back" if consistent else "rollback failed"
        record.update(result="success" if not failed_hosts else "failed",
                      seconds=round(time.monotonic() - started, 1))
        _finish(session, stage, record, live, facts, outcome, cleanup=not failed_hosts, unlock_hosts=known)
        if failed_hosts:
            raise _failure("deploy", results, source.name, current, live, consistent=consistent, known=known)
    return outcome


# Where a host's cutover can end, and what the host runs then.
_SETTLED = ("done", "rolled_back", "not_started")  # known: on the target (done) or where it was before


def _live(results: dict[str, dict[str, object]], current: dict[str, str | None]) -> dict[str, str | None]:
    """The release each host runs now, as its cutover reported it (unchanged when not attempted)."""
    live: dict[str, str | None] = dict(current)
    for host, state in results.items():
        if "live" in state:
            live[host] = str(state["live"]) or None
    return live


def _reuses_env(facts: HostFacts, source: release.Source) -> bool:
    current = current_release(facts)
    if current is None:
        return False
    info = next((r for r in facts.releases if r.name == current), None)
    return info is not None and info.env_key == release.host_env_key(source, facts.target.get("python", ""))


def _discard(session: Session, stage: Stage, name: str, built_on: list[str]) -> None:
    """Remove a release that never went live (a host failed before the switch): the complete one
    only where this deploy built it (a same-named one elsewhere is not ours), half-built ones anywhere."""
    path = stage.app.releases_dir / name
    building = stage.app.releases_dir / f".{name}.building"

    def one(remote: RemoteHost) -> None:
        doomed = [building] + ([path] if remote.name in built_on else [])
        remote.run_script("rm -rf " + " ".join(q(str(p)) for p in doomed) + "\n", sudo=True,
                          what="removing the unused release")

    session.each(one, what="discarding the release")


def _migrate(remote: RemoteHost, stage: Stage, name: str) -> None:
    app = stage.app
    directory = app.releases_dir / name
    props = units.run_as_service_options(stage)
    script = (f"systemd-run --quiet --wait --pipe --collect --service-type=exec {props} "
              f"-p WorkingDirectory={q(str(directory))} -- {q(str(directory / units.VENV / 'bin/python'))} "
              "manage.py migrate --noinput 2>&1\n")
    try:
        remote.run_script(script, sudo=True, what="manage.py migrate", timeout=1800)
    except RemoteCommandError as exc:
        raise HostError(remote.name, "migrations failed; current is untouched on every host:\n"
                        + "\n".join("    " + line for line in exc.output.strip().splitlines()[-20:])) from None


def _stage_rollback(session: Session, stage: Stage, results: dict[str, dict[str, object]],
                    current: dict[str, str | None], run_id: str, say: Say, outcome: Outcome, bad: str) -> None:
    """A host failed: the hosts that did switch go back too, so the stage runs one release."""
    switched = [h for h, s in results.items() if s.get("status") == "done"]
    if switched:
        say("", f"rolling back {', '.join(switched)} too, so every host runs the same release")
        back = {h: current[h] for h in switched if current[h]}
        fresh = [h for h in switched if not current[h]]  # first deploy: back to no release at all
        if fresh:
            _unswitch(session, stage, fresh)
            for host in fresh:
                results[host].update(status="rolled_back", live="")
        results.update(_cutover(session, stage, back, {h: bad for h in back}, "rollback", run_id + "r",
                                say, outcome))
        for host in back:
            if results[host].get("status") == "done":
                results[host]["status"] = "rolled_back"
    marker = stage.app.releases_dir / bad / ".deploy-kit"
    session.each(lambda r: r.run_script(f"[ -d {q(str(marker.parent))} ] && install -d {q(str(marker))} && "
                                        f"touch {q(str(marker / 'BAD'))} || true\n", sudo=True,
                                        what="marking the release bad"), what="marking the release bad")


def _unswitch(session: Session, stage: Stage, hosts: list[str]) -> None:
    def one(remote: RemoteHost) -> None:
        if remote.name in hosts:
            names = " ".join(q(u) for u in units.units_for(stage, remote.host))
            remote.run_script(f"systemctl stop {names}\nrm -f {q(str(stage.app.current_link))}\n", sudo=True,
                              what="returning to no release", timeout=600)
    session.each(one, what="returning to no release")


def _failure(action: str, results: dict[str, dict[str, object]], name: str, current: dict[str, str | None],
             live: dict[str, str | None], *, consistent: bool, known: bool) -> DeployFailed:
    """One message saying, per host, what it runs now and why the cutover failed."""
    lines = [f"{action} of {name} failed:" if action == "deploy" else f"rollback to {name} failed:"]
    for host in sorted(set(current) | set(results)):
        state = results.get(host, {"status": "not_started"})
        status = state.get("status")
        now = live.get(host) or "no release"
        if status in ("rollback_failed", "unknown"):
            lines.append(f"  {host}: STATE UNKNOWN ({state.get('rollback_failure')}); `current` points to {now}: "
                         "check `fab status` and the journal there now")
        elif status == "fell_back":
            lines.append(f"  {host}: could not switch, stayed on {now} (verified)")
        elif status == "done" and action == "deploy":
            lines.append(f"  {host}: on {now}")
        elif status == "done":
            lines.append(f"  {host}: on {now} (the rollback worked here)")
        elif status == "not_started":
            lines.append(f"  {host}: untouched, on {now}")
        else:
            lines.append(f"  {host}: back on {now}")
        if state.get("failure"):
            lines.append(f"      cause: {state['failure']}")
        journal = [line for line in state.get("journal", []) if _interesting(line)]
        for line in journal[-8:]:
            lines.append(f"      | {line}")
    if action == "deploy":
        lines.append(f"release {name} is marked bad and kept for inspection")
    if not consistent:
        lines.append("the hosts do not all run the same release: act now (`fab status`, then `fab rollback "
                     "--to RELEASE` or a new deploy)")
    if not known:
        lines.append("the lock is kept so nobody deploys over this: once the hosts are checked, `fab unlock`")
    return DeployFailed("\n".join(lines), rolled_back=consistent and action == "deploy")


_CAUSES = ("Error", "error", "Exception", "Traceback", "denied", "refused", "Improperly", "No module")


def _interesting(line: str) -> bool:
    return any(word in line for word in _CAUSES)


def rollback(stage: Stage, *, to: str | None, say: Say) -> Outcome:
    """Put a previous good release back on every host: switch, restart in order, verify, record."""
    outcome = Outcome()
    now = datetime.now(UTC)
    run_id = now.strftime("%Y%m%d%H%M%S")
    started = time.monotonic()
    with Session(stage) as session:
        facts = _lock_and_probe(session, stage, lock_info("rollback", to or "previous"), outcome, check=False)
        current = {h: current_release(f) for h, f in facts.items()}
        try:
            targets = {h: releases.rollback_target(f.releases, current[h], to) for h, f in facts.items()}
        except DeployKitError:
            unlock(session, stage, list(facts))
            raise
        for host, target in targets.items():
            say(host, f"rolling back from {current[host]} to {target}")
            warning = _migration_warning(facts[host], current[host], target)
            if warning:
                outcome.notes.append(f"{host}: {warning}")
                say(host, f"warning: {warning}")
        results = _cutover(session, stage, targets, current, "rollback", run_id, say, outcome)
        failed = [h for h, s in results.items() if s.get("status") != "done"] + \
            [h for h in targets if h not in results]
        live = _live(results, current)
        known = all(s.get("status") in (*_SETTLED, "fell_back") for s in results.values())
        outcome.release = next(iter(targets.values()))
        outcome.result = "success" if not failed else "failed"
        record = {"action": "rollback", "release": outcome.release, "from_release": next(iter(current.values())),
                  "who": getpass.getuser(), "from": socket.gethostname(), "when": now.isoformat(timespec="seconds"),
                  "result": outcome.result, "seconds": round(time.monotonic() - started, 1)}
        _finish(session, stage, record, live, facts, outcome, cleanup=False, unlock_hosts=known)
        if failed:
            raise _failure("rollback", results, outcome.release, current, live, consistent=False, known=known)
    return outcome


def _migration_warning(facts: HostFacts, leaving: str | None, target: str) -> str:
    by_name = {r.name: r for r in facts.releases}
    left = set(by_name[leaving].revision.get("migrations", [])) if leaving in by_name else set()
    kept = set(by_name[target].revision.get("migrations", [])) if target in by_name else set()
    extra = sorted(left - kept)
    if not extra:
        return ""
    return (f"{leaving} has migrations {target} lacks ({', '.join(extra[:5])}{'...' if len(extra) > 5 else ''}); "
            "they stay applied (deploy-kit never reverses migrations): the old code must cope with the new schema")


@dataclass(frozen=True)
class PlannedStep:
    host: str
    phase: str
    description: str
    command: str = ""


def plan(stage: Stage, *, ref: str | None, now: datetime | None = None) -> tuple[release.Source, list[PlannedStep]]:
    """What `fab deploy` would do on each host, with its commands, built by the same functions the
    real run uses; nothing is run on any host (only the local repository is read)."""
    ref = ref or stage.app.ref
    now = now or datetime.now(UTC)
    source = release.read_source(stage.app, ref, now, CACHE_DIR)
    app = stage.app
    lock_dir = release.state_dir(app) / "lock"
    steps: list[PlannedStep] = []
    props = units.run_as_service_options(stage)
    beat_last = sorted(stage.hosts, key=lambda h: bool(stage.beat and stage.beat.host == h.name))
    for host in beat_last:
        name = host.name
        steps.append(PlannedStep(name, "lock", f"mkdir {lock_dir} (atomic) with who/where/when/ref; "
                                 "refused when it exists", f"mkdir {q(str(lock_dir))}"))
        steps.append(PlannedStep(name, "check", "the `fab check` probes (as root, broker and app as the service)",
                     f"sudo -n {q(str(app.python))} - < deploy_kit/remote/hostprobe.py"))
        wheels_note = ("wheels for the host's Python that it lacks" if app.install == "wheels"
                       else "no wheels (hosts install from their index)")
        steps.append(PlannedStep(name, "release", f"send {len(source.archive) // 1024} KiB of code ({ref} at "
                                 f"{source.sha[:10]}) + {wheels_note}; build {app.releases_dir / source.name}",
                                 release.build_script(stage, source)))
        if host.name == stage.migrate_host.name:
            directory = app.releases_dir / source.name
            steps.append(PlannedStep(name, "migrate", "migrations, once per stage, before the switch",
                                     f"systemd-run --wait --pipe {props} -p WorkingDirectory={directory} -- "
                                     f"{directory / units.VENV / 'bin/python'} manage.py migrate --noinput"))
        service_units = [w.unit(app) for w in stage.workers_on(host)]
        steps.append(PlannedStep(name, "switch", "atomic: a new symlink renamed over current (detached "
                                 "under systemd-run, progress in .deploy-kit/cutover.json)",
                                 f"ln -s releases/{source.name} {app.current_link}.deploy-kit-tmp && "
                                 f"mv -T {app.current_link}.deploy-kit-tmp {app.current_link}"))
        steps.append(PlannedStep(name, "restart", "warm shutdown (running tasks finish), start from the new release",
                                 "systemctl restart " + " ".join(service_units)))
        for worker in stage.workers_on(host):
            steps.append(PlannedStep(name, "verify", f"worker {worker.name!r}: {stage.verify.task} must complete "
                                     f"within {stage.verify.timeout:.0f}s on this worker's own queue",
                                     f"send {stage.verify.task} to {units.verify_queue(worker.name, name)} "
                                     "(node's hostname) and wait for its result"))
        if stage.beat and stage.beat.host == name:
            steps.append(PlannedStep(name, "restart", "Beat, after the workers",
                                     f"systemctl restart {stage.beat.unit(app)}"))
        steps.append(PlannedStep(name, "rollback", "only on failure: switch back, restart, verify, mark "
                                 f"{source.name} bad"))
        steps.append(PlannedStep(name, "finish", f"append to history.jsonl, keep {app.keep_releases} good releases, "
                                 "remove half-built ones, unlock", f"rm -rf {q(str(lock_dir))}"))
    return source, steps
