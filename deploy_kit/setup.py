"""`fab setup`: make a bare host ready to run the app's Celery services, idempotently.

Take the deploy lock and probe every host (one round trip; a held lock refuses: setup never
restarts a unit under a running deploy), plan the changes as plain data (pure: `plan_host`),
show them, ask before replacing a unit that differs from what the configuration renders,
then apply each host's plan as one script (one more round trip). A second run finds
nothing to do and says so.

Ownership on the host:
    deploy_to/, releases/   root:GROUP 0750  (code is not writable by the service)
    shared/                 USER:GROUP 0750  (the one place the service writes)
    env dir                 root:GROUP 0750, env file root:GROUP 0640 (created once, never overwritten)
"""

from __future__ import annotations

import contextlib
import difflib
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from deploy_kit import envfile, hostfacts, remote, runner, units
from deploy_kit.config import Host, Stage
from deploy_kit.errors import DeployKitError, UsageError
from deploy_kit.hostfacts import HostFacts
from deploy_kit.release import state_dir
from deploy_kit.session import Session
from deploy_kit.ssh import RemoteHost

q = shlex.quote


@dataclass(frozen=True)
class Change:
    summary: str
    script: str
    diff: str = ""
    needs_consent: bool = False


@dataclass(frozen=True)
class HostPlan:
    host: Host
    changes: tuple[Change, ...]
    notes: tuple[str, ...] = ()

    @property
    def consent_needed(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.needs_consent)

    def script(self) -> str:
        return "\n".join(c.script for c in self.changes) + "\n"


@dataclass
class SetupReport:
    plans: dict[str, HostPlan] = field(default_factory=dict)
    applied: bool = False


def _dir_change(path: str, info: hostfacts.PathInfo | None, owner: str, group: str, mode: str,
                label: str) -> Change | None:
    wanted = f"{owner}:{group} {mode}"
    if info is not None and info.type == "dir" and (info.owner, info.group, info.mode) == (owner, group, mode):
        return None
    if info is not None and info.type != "dir":
        raise UsageError(f"{path} exists but is a {info.type}, not a directory; move it away first")
    if info is None:
        summary = f"create {label} {path} ({wanted})"
    else:
        summary = f"fix {label} {path}: {info.owner}:{info.group} {info.mode} -> {wanted}"
    return Change(summary, f"install -d -o {q(owner)} -g {q(group)} -m {mode} {q(path)}")


def write_file_script(path: str, content: str, mode: str = "0644") -> str:
    """Write `content` atomically (temporary file + rename in the same directory)."""
    delimiter = "DEPLOY_KIT_EOF"
    assert delimiter not in content
    tmp = f"{path}.deploy-kit.tmp"
    return (f"cat > {q(tmp)} <<'{delimiter}'\n{content}{delimiter}\n"
            f"chmod {mode} {q(tmp)} && mv -f {q(tmp)} {q(path)}")


def unit_diff(name: str, installed: str, rendered: str) -> str:
    return "".join(difflib.unified_diff(installed.splitlines(keepends=True),
                                        rendered.splitlines(keepends=True),
                                        fromfile=f"{name} (on the host)", tofile=f"{name} (from hosts.toml)"))


def plan_host(stage: Stage, host: Host, facts: HostFacts) -> HostPlan:
    """Everything `host` needs to match the configuration, as ordered changes (pure)."""
    app = stage.app
    paths = hostfacts.paths(stage)
    changes: list[Change] = []
    notes: list[str] = []
    if facts.group is None:
        changes.append(Change(f"create group {app.group}", f"groupadd --system {q(app.group)}"))
    if facts.user is None:
        changes.append(Change(
            f"create user {app.user} (system account, no login, no home)",
            f"useradd --system --gid {q(app.group)} --home-dir /nonexistent --no-create-home "
            f"--shell /usr/sbin/nologin {q(app.user)}"))
    elif app.group not in {facts.user.get("group"), *facts.user.get("groups", [])}:
        changes.append(Change(f"add user {app.user} to group {app.group}",
                              f"usermod -a -G {q(app.group)} {q(app.user)}"))
    for key, owner, mode, label in (("deploy_to", "root", "0750", "deploy_to"),
                                    ("releases", "root", "0750", "releases dir"),
                                    ("shared", app.user, "0750", "shared dir"),
                                    ("env_dir", "root", "0750", "env file dir")):
        change = _dir_change(paths[key], facts.path(key), owner, app.group, mode, label)
        if change:
            changes.append(change)
    env = facts.path("env_file")
    if env is None:
        script = write_file_script(paths["env_file"], envfile.template(app), "0640")
        script += f"\nchown root:{q(app.group)} {q(paths['env_file'])}"
        changes.append(Change(f"create env file {paths['env_file']} (root:{app.group} 0640, "
                              f"keys {', '.join(envfile.REQUIRED_KEYS)} empty)", script))
    elif (env.owner, env.group, env.mode) != ("root", app.group, "0640"):
        changes.append(Change(
            f"fix env file permissions ({env.owner}:{env.group} {env.mode} -> root:{app.group} 0640)",
            f"chown root:{q(app.group)} {q(paths['env_file'])} && chmod 0640 {q(paths['env_file'])}"))

    wanted = units.units_for(stage, host)
    reload_needed = False
    for name, unit in wanted.items():
        installed = facts.units.get(name)
        if installed == unit.content:
            continue
        reload_needed = True
        if installed is None:
            changes.append(Change(f"install unit {name}", write_file_script(str(unit.path), unit.content)))
        else:
            changes.append(Change(f"replace unit {name} (differs from hosts.toml)",
                                  write_file_script(str(unit.path), unit.content),
                                  diff=unit_diff(name, installed, unit.content), needs_consent=True))
    release = _current_release(facts)
    legacy = {w.legacy_unit(app): w for w in stage.workers_on(host)}
    for name, installed in facts.units.items():
        if name in wanted:
            continue
        if not installed.startswith(units.MANAGED_MARKER):
            notes.append(f"{name} looks like this app's but was not made by deploy-kit; left alone")
            continue
        if name in legacy and facts.unit_state.get(name, {}).get("active") == "active":
            notes.append(f"{name} (restart in place) keeps serving until the next `fab deploy` hands its queues "
                         f"over to {legacy[name].instance(app, '<release>')}")
            continue
        reload_needed = True
        path = q(str(units.UNIT_DIR / name))
        retired = name in legacy  # a plain unit of older deploy-kits that a handover already stopped
        why = "retired by a handover" if retired else "no longer in hosts.toml for this host"
        changes.append(Change(f"remove unit {name} ({why})",
                              f"systemctl disable --now --quiet {q(name)} || true\nrm -f {path}",
                              diff="" if retired else unit_diff(name, installed, ""), needs_consent=not retired))
    if reload_needed:
        changes.append(Change("reload systemd", "systemctl daemon-reload"))
    # What runs: the current release's instance of each worker service (none before a first
    # deploy, and none while a plain unit of older deploy-kits still serves), and Beat.
    serving = [w for w in stage.workers_on(host)
               if facts.unit_state.get(w.legacy_unit(app), {}).get("active") != "active"]
    running = {w.instance(app, release): w.unit(app) for w in serving} if release else {}
    if stage.beat and stage.beat.host == host.name:
        running[stage.beat.unit(app)] = stage.beat.unit(app)  # enabled before a release: it waits for one
    to_enable = [n for n in running if not _enabled(facts, n)]
    if to_enable:
        changes.append(Change(f"enable {', '.join(to_enable)} at boot",
                              f"systemctl enable --quiet {' '.join(q(n) for n in to_enable)}"))
    # Only the current release's instance starts at boot (what `fab check` asks): another release's
    # instance left enabled (a cutover cut off) is disabled; one that still runs or drains goes on.
    templates = {w.unit(app).split("@")[0] + "@" for w in serving}
    to_disable = sorted(n for n, state in facts.instances.items() if state.get("enabled") and n not in running
                        and n.split("@")[0] + "@" in templates) if release else []
    if to_disable:
        changes.append(Change(f"disable {', '.join(to_disable)} at boot (not the current release's)",
                              f"systemctl disable --quiet {' '.join(q(n) for n in to_disable)}"))
    if release:
        changed = [n for n, file in running.items() if facts.units.get(file) != wanted[file].content]
        # A template's instance of another release never runs by mistake: only current's starts.
        stopped = [n for n in running if n not in changed and _active(facts, n) != "active"]
        if changed:
            changes.append(Change(f"restart {', '.join(changed)} to apply the new unit",
                                  f"systemctl restart {' '.join(q(n) for n in changed)}"))
        if stopped:
            changes.append(Change(f"start {', '.join(stopped)}",
                                  f"systemctl start {' '.join(q(n) for n in stopped)}"))
    elif wanted:
        notes.append("services start after the first release exists (`fab deploy`)")
    return HostPlan(host, tuple(changes), tuple(notes))


def _current_release(facts: HostFacts) -> str | None:
    current = facts.path("current")
    if current is None or current.target is None or not current.resolves:
        return None
    return current.target.rstrip("/").rsplit("/", 1)[-1]


def _enabled(facts: HostFacts, unit: str) -> bool:
    if "@" in unit:
        return bool(facts.instances.get(unit, {}).get("enabled"))
    return facts.unit_state.get(unit, {}).get("enabled") == "enabled" and unit in facts.units


def _active(facts: HostFacts, unit: str) -> str:
    if "@" in unit:
        return str(facts.instances.get(unit, {}).get("active", "inactive"))
    return facts.unit_state.get(unit, {}).get("active", "unknown")


def run(stage: Stage, *, say: Callable[[str], None], show: Callable[[str, HostPlan], None],
        confirm: Callable[[str], bool], assume_yes: bool, interactive: bool) -> SetupReport:
    """Plan and apply `fab setup` on every host of `stage`."""
    holder = runner.new_holder("setup", "-", datetime.now(UTC))
    unlock = remote.program("finish", {"state_dir": str(state_dir(stage.app)), "token": holder.token})
    with Session(stage) as session:
        try:
            facts = runner.take_locks(stage, holder, lambda hosts: session.each(
                lambda r: hostfacts.gather(r, stage, check=False, lock=holder),
                what="locking and probing hosts", only=hosts))
            return _run(stage, session, facts, say=say, show=show, confirm=confirm, assume_yes=assume_yes,
                        interactive=interactive)
        finally:  # best effort: only where the lock is still this run's
            with contextlib.suppress(DeployKitError):
                session.each(lambda r: r.run_python(unlock, str(stage.app.python), sudo=True,
                                                    what="releasing the lock"), what="releasing the lock")


def _run(stage: Stage, session: Session, facts: dict[str, HostFacts], *, say: Callable[[str], None],
         show: Callable[[str, HostPlan], None], confirm: Callable[[str], bool], assume_yes: bool,
         interactive: bool) -> SetupReport:
    report = SetupReport()
    for host in stage.hosts:
        report.plans[host.name] = plan_host(stage, host, facts[host.name])
        show(host.name, report.plans[host.name])
    risky = [(h, c) for h, p in report.plans.items() for c in p.consent_needed]
    if risky and not assume_yes:
        listing = ", ".join(f"{c.summary.split(' (')[0]} on {h}" for h, c in risky)
        if not interactive:
            raise UsageError(f"{listing}: the unit on the host differs from what hosts.toml "
                             "renders (diff above). Nothing was changed. Rerun with --yes to "
                             "replace it, or update hosts.toml to match")
        if not confirm(f"Replace: {listing}?"):
            say("nothing changed: the units on the hosts were kept")
            return report
    todo = {h: p for h, p in report.plans.items() if p.changes}
    if not todo:
        say("every host already matches hosts.toml: no change")
        return report

    def apply(remote: RemoteHost) -> None:
        plan = todo.get(remote.name)
        if plan is not None:
            remote.run_script(plan.script(), sudo=True, what="applying the setup", timeout=300)

    session.each(apply, what="setting up hosts")
    report.applied = True
    return report
