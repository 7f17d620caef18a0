"""`fab check`: every reason a deploy would fail under systemd, found before anything changes.

The host is probed once (`hostfacts`, as root, with the broker and app-import probes run
through `systemd-run` under the service's own user, env file, working directory and
sandboxing); `evaluate` turns the facts into one row per check, each failure with its cause
and its fix (pure, tested with recorded facts). `fab deploy` runs the same checks first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from deploy_kit import envfile, hostfacts, units
from deploy_kit.config import Host, Stage
from deploy_kit.errors import DeployKitError, HostError, SudoError
from deploy_kit.hostfacts import HostFacts
from deploy_kit.session import Session

PASS, FAIL, SKIP = "pass", "FAIL", "skip"
MIN_FREE_KB = 512 * 1024
# A deploy's probe leaves the current release's app alone: a release that fails to import must not
# stop the deploy that fixes it, and the one that matters is checked by the build.
NEW_RELEASE_CHECKED = "a deploy checks the new release's instead (its build imports it as the service)"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str = ""
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass(frozen=True)
class HostChecks:
    host: Host
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.failed)


def _ok(name: str, detail: str = "") -> Check:
    return Check(name, PASS, detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, FAIL, detail, fix)


def _skip(name: str, detail: str) -> Check:
    return Check(name, SKIP, detail)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(month|min|ms|us|y|w|d|h|s)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600, "d": 86400, "w": 604800,
                 "month": 2629800, "y": 31557600}


def parse_timespan(text: str) -> float | None:
    """Seconds in a systemd time span as `systemctl show` prints it ("1min 30s"); None for infinity."""
    text = text.strip()
    if not text or text == "infinity":
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))


def _groups_of(facts: HostFacts) -> set[str]:
    user = facts.user or {}
    return {str(user.get("group", "")), *user.get("groups", [])}


def evaluate(stage: Stage, host: Host, facts: HostFacts) -> tuple[Check, ...]:
    """One row per check for `host`, from what the probe saw (pure)."""
    app = stage.app
    paths = hostfacts.paths(stage)
    setup_fix = f"run `fab setup --stage {stage.name}`"
    rows: list[Check] = [_ok("ssh", "connected, host key verified"), _ok("sudo", "passwordless sudo works")]

    user_ok = facts.user is not None
    if not user_ok:
        rows.append(_fail("service user", f"user {app.user} does not exist", setup_fix))
    elif app.group not in _groups_of(facts):
        rows.append(_fail("service user", f"{app.user} is not in group {app.group}, so it cannot read the "
                          "releases or the env file", setup_fix))
    else:
        rows.append(_ok("service user", f"{app.user} exists, in group {app.group}"))
    rows.append(_ok("service group", f"{app.group} exists") if facts.group else
                _fail("service group", f"group {app.group} does not exist", setup_fix))

    for key, label, owner in (("deploy_to", "deploy_to", "root"), ("releases", "releases dir", "root"),
                              ("shared", "shared dir", app.user)):
        info = facts.path(key)
        if info is None:
            rows.append(_fail(label, f"{paths[key]} does not exist", setup_fix))
        elif info.type != "dir":
            rows.append(_fail(label, f"{paths[key]} is a {info.type}, not a directory",
                              f"move it away, then {setup_fix}"))
        elif (info.owner, info.group) != (owner, app.group):
            rows.append(_fail(label, f"{paths[key]} is owned by {info.owner}:{info.group}, expected "
                              f"{owner}:{app.group}", setup_fix))
        elif user_ok and facts.readable.get(key) is False:
            rows.append(_fail(label, f"{app.user} cannot read {paths[key]} (mode {info.mode})", setup_fix))
        else:
            rows.append(_ok(label, f"{paths[key]} {info.owner}:{info.group} {info.mode}"))

    current = facts.path("current")
    has_release = current is not None and current.resolves
    if current is None:
        rows.append(_skip("current release", "no release yet: `fab deploy` creates the first"))
    elif current.type != "link":
        rows.append(_fail("current release", f"{paths['current']} is a {current.type}, not a symlink",
                          "move it away; deploy-kit switches releases with a symlink"))
    elif not current.resolves:
        rows.append(_fail("current release", f"{paths['current']} points to {current.target}, "
                          "which does not exist", f"`fab rollback --stage {stage.name}` to a release "
                          "that exists"))
    elif user_ok and facts.readable.get("current") is False:
        rows.append(_fail("current release", f"{app.user} cannot read {current.target}",
                          f"make it readable by group {app.group}"))
    else:
        rows.append(_ok("current release", f"-> {current.target}"))

    venv_python = units.python(app)
    if not has_release:
        rows.append(_skip("celery in release", "no release yet"))
    elif not facts.current_app:
        rows.append(_skip("celery in release", NEW_RELEASE_CHECKED))
    elif not facts.release_python:
        rows.append(_fail("celery in release", f"{venv_python} does not exist: the release has no "
                          "virtualenv where the units expect it", f"redeploy (`fab deploy --stage {stage.name}`)"))
    elif facts.release_runs is False:
        rows.append(_fail("celery in release", f"{app.user} cannot run `{venv_python} -m celery`",
                          f"make the release readable by group {app.group} and redeploy"))
    else:
        rows.append(_ok("celery in release", f"{app.user} runs {venv_python} -m celery"))

    env = facts.path("env_file")
    env_path = paths["env_file"]
    if env is None:
        rows.append(_fail("env file", f"{env_path} does not exist (units load it with EnvironmentFile=)",
                          setup_fix))
    elif (env.owner, env.group, env.mode) != ("root", app.group, "0640"):
        rows.append(_fail("env file", f"{env_path} is {env.owner}:{env.group} {env.mode}, expected "
                          f"root:{app.group} 0640", setup_fix))
    elif user_ok and facts.readable.get("env_file") is False:
        rows.append(_fail("env file", f"{app.user} cannot read {env_path}", setup_fix))
    else:
        rows.append(_ok("env file", f"{env_path} root:{app.group} 0640"))

    if env is None:
        rows.append(_skip("env keys", "no env file"))
    else:
        missing = [k for k in envfile.REQUIRED_KEYS if k not in facts.env_keys]
        rows.append(_ok("env keys", ", ".join(envfile.REQUIRED_KEYS) + " set") if not missing else
                    _fail("env keys", f"{', '.join(missing)} not set in {env_path}",
                          " and ".join(f"`fab env.set {k}=...`" for k in missing)))

    if facts.broker is None:
        rows.append(_skip("broker", "needs the service user and the env file"))
    elif facts.broker.ok:
        rows.append(_ok("broker", facts.broker.detail))
    else:
        rows.append(_fail("broker", f"unreachable as the service: {facts.broker.detail}",
                          "check CELERY_BROKER_URL (`fab env.set CELERY_BROKER_URL=...`), that the "
                          "broker runs, and that this host may reach it"))

    if facts.app_import is None:
        rows.append(_skip("celery app", "no release yet" if not has_release else
                          NEW_RELEASE_CHECKED if not facts.current_app else "needs the env file"))
    elif facts.app_import.ok:
        rows.append(_ok("celery app", f"-A {app.celery_app} imports as the service: {facts.app_import.detail}"))
    else:
        rows.append(_fail("celery app", f"-A {app.celery_app} fails as the service: {facts.app_import.detail}",
                          "fix app.celery_app in hosts.toml, DJANGO_SETTINGS_MODULE in the env file, "
                          "or the code"))

    rows.append(_units_check(stage, host, facts, setup_fix))
    rows.append(_workers_check(stage, host, facts, setup_fix))
    rows.append(_beat_check(stage, host, facts, setup_fix))
    rows.append(_stop_timeout_check(stage, host, facts, setup_fix))

    need = max(MIN_FREE_KB, 2 * facts.release_kb)
    rows.append(_ok("disk space", f"{facts.disk_free_kb // 1024} MB free") if facts.disk_free_kb >= need else
                _fail("disk space", f"{facts.disk_free_kb // 1024} MB free under {app.releases_dir}, a release "
                      f"needs about {need // 1024} MB", "free space, or lower keep_releases"))

    rows.append(_nofile_check(stage, host, facts, setup_fix))
    return tuple(rows)


def stage_checks(stage: Stage, facts: Mapping[str, HostFacts]) -> dict[str, tuple[Check, ...]]:
    """The checks that need every host's facts at once (pure): two hosts with workers that name
    themselves alike would share their workers' node names and private verification queues, so
    one could answer the other's verification. A failing row for each host involved."""
    named: dict[str, list[str]] = {}
    for host in stage.hosts:
        found = facts.get(host.name)
        if found is not None and found.hostname and stage.workers_on(host):
            named.setdefault(found.hostname, []).append(host.name)
    rows: dict[str, tuple[Check, ...]] = {}
    for hostname, hosts in named.items():
        for host in hosts if len(hosts) > 1 else ():
            others = ", ".join(h for h in hosts if h != host)
            rows[host] = (_fail("hostname", f"{host} and {others} both call themselves {hostname!r}: their "
                                f"workers would share the Celery node names (NAME.RELEASE@{hostname}) and the "
                                "private verification queues, so one host could answer the other's verification",
                                f"give each host of stage {stage.name} its own hostname (`hostnamectl "
                                "set-hostname NAME` on the host), then run this again"),)
    return rows


def _units_check(stage: Stage, host: Host, facts: HostFacts, setup_fix: str) -> Check:
    wanted = units.units_for(stage, host)
    if not wanted:
        return _skip("units", "no services on this host")
    missing = [n for n in wanted if n not in facts.units]
    differ = [n for n in wanted if n in facts.units and facts.units[n] != wanted[n].content]
    stale = [n for n in wanted if facts.loaded.get(_live(n, facts), {}).get("NeedDaemonReload") == "yes"]
    if missing:
        return _fail("units", f"not installed: {', '.join(missing)}", setup_fix)
    if differ:
        return _fail("units", f"differ from hosts.toml: {', '.join(differ)}",
                     f"{setup_fix} (shows the diff, asks before replacing)")
    if stale:
        return _fail("units", f"changed on disk but not reloaded: {', '.join(stale)}",
                     "run `systemctl daemon-reload` on the host, or " + setup_fix)
    return _ok("units", f"{len(wanted)} installed, as rendered")


def _live(unit: str, facts: HostFacts) -> str:
    """A template's live unit is the current release's instance; any other unit is itself."""
    current = facts.path("current")
    if "@." not in unit or current is None or current.target is None:
        return unit
    return unit.replace("@.", f"@{current.target.rstrip('/').rsplit('/', 1)[-1]}.")


def _workers_check(stage: Stage, host: Host, facts: HostFacts, setup_fix: str) -> Check:
    """Exactly the current release's instance of each worker service runs and starts at boot."""
    workers = stage.workers_on(host)
    current = facts.path("current")
    if not workers:
        return _skip("workers", "no worker services on this host")
    if current is None or not current.resolves:
        return _skip("workers", "no release yet")
    problems, fine = [], []
    for worker in workers:
        legacy = facts.unit_state.get(worker.legacy_unit(stage.app), {})
        if legacy.get("active") == "active":
            fine.append(f"{worker.legacy_unit(stage.app)} (the next deploy hands it over to an instance)")
            continue
        want = _live(worker.unit(stage.app), facts)
        state = facts.instances.get(want, {})
        if not state.get("enabled"):
            problems.append(f"{want} is not enabled: it will not start at boot")
        elif state.get("active") != "active":
            problems.append(f"{want} is not running ({state.get('active', 'inactive')})")
        others = [u for u, s in facts.instances.items() if s.get("enabled") and u != want
                  and u.startswith(worker.unit(stage.app).split("@")[0] + "@")]
        if others:
            problems.append(f"{', '.join(others)} also start at boot: an older release would serve too")
        if state.get("enabled") and state.get("active") == "active" and not others:
            fine.append(want)
    if problems:
        return _fail("workers", "; ".join(problems), setup_fix)
    return _ok("workers", "running and enabled at boot: " + ", ".join(fine))


def _beat_check(stage: Stage, host: Host, facts: HostFacts, setup_fix: str) -> Check:
    if stage.beat is None:
        unit = f"{stage.app.name}-beat.service"
        if facts.unit_state.get(unit, {}).get("enabled") == "enabled":
            return _fail("beat", f"{unit} is enabled but no host has the 'beat' role", setup_fix)
        return _skip("beat", "no host has the 'beat' role")
    unit = stage.beat.unit(stage.app)
    state = facts.unit_state.get(unit, {})
    enabled = state.get("enabled") == "enabled"
    if stage.beat.host == host.name:
        if not enabled:
            return _fail("beat", f"{unit} is not enabled here (its beat host)", setup_fix)
        return _ok("beat", f"enabled here only (state: {state.get('active', 'unknown')})")
    if enabled or state.get("active") == "active":
        return _fail("beat", f"{unit} is enabled or running here too, but Beat belongs on "
                     f"{stage.beat.host}: periodic tasks would run twice", setup_fix)
    return _ok("beat", f"not here (runs on {stage.beat.host})")


def _stop_timeout_check(stage: Stage, host: Host, facts: HostFacts, setup_fix: str) -> Check:
    too_low = []
    for worker in stage.workers_on(host):
        loaded = facts.loaded.get(_live(worker.unit(stage.app), facts), {})
        if loaded.get("LoadState") != "loaded":
            continue
        seconds = parse_timespan(loaded.get("TimeoutStopUSec", ""))
        if seconds is not None and seconds < worker.time_limit:
            too_low.append(f"{_live(worker.unit(stage.app), facts)} stops after {seconds:.0f} s but its tasks may run "
                           f"{worker.time_limit} s")
    if too_low:
        return _fail("stop timeout", "; ".join(too_low) + " (running tasks would be killed)", setup_fix)
    if not stage.workers_on(host):
        return _skip("stop timeout", "no workers on this host")
    return _ok("stop timeout", "TimeoutStopSec covers each service's task time limit")


def _nofile_check(stage: Stage, host: Host, facts: HostFacts, setup_fix: str) -> Check:
    wanted = stage.systemd.limit_nofile
    if facts.nr_open and wanted > facts.nr_open:
        return _fail("open files", f"LimitNOFILE={wanted} exceeds the kernel's fs.nr_open={facts.nr_open}: "
                     "the units would not start", "lower systemd.limit_nofile in hosts.toml")
    wrong = [f"{name} runs with {loaded.get('LimitNOFILE')}"
             for name, loaded in facts.loaded.items()
             if loaded.get("LoadState") == "loaded" and loaded.get("LimitNOFILE") not in (str(wanted), None)]
    if wrong:
        return _fail("open files", f"expected {wanted}: {'; '.join(wrong)}", setup_fix)
    return _ok("open files", f"LimitNOFILE={wanted} (kernel allows {facts.nr_open})")


def run(stage: Stage, hosts: list[Host] | None = None) -> list[HostChecks]:
    """Check every host; an unreachable host or one without sudo gets its own failing rows."""
    chosen = list(hosts or stage.hosts)
    results: dict[str, HostChecks] = {}
    seen: dict[str, HostFacts] = {}
    with Session(stage, chosen, require_all=False) as session:
        for name, error in session.unreachable.items():
            host = stage.host(name)
            results[name] = HostChecks(host, (_fail("ssh", _reason(error), "see the cause"),))

        def one(remote) -> HostChecks:
            try:
                facts = hostfacts.gather(remote, stage, check=True)
            except SudoError as exc:
                return HostChecks(remote.host, (_ok("ssh", "connected, host key verified"),
                                                _fail("sudo", exc.reason, "see the cause")))
            except DeployKitError as exc:
                return HostChecks(remote.host, (_ok("ssh", "connected, host key verified"),
                                                _fail("probe", _reason(exc), "see the cause")))
            seen[remote.name] = facts
            return HostChecks(remote.host, evaluate(stage, remote.host, facts))

        results.update(session.each(one, what="checking hosts"))
    for name, rows in stage_checks(stage, seen).items():
        results[name] = HostChecks(results[name].host, (*results[name].checks, *rows))
    return [results[h.name] for h in chosen]


def _reason(error: BaseException) -> str:
    return error.reason if isinstance(error, HostError) else str(error)
