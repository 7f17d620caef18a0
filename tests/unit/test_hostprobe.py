"""The host probe (`remote/hostprobe.py`) run here on a directory tree and a fake `systemctl`:
the lock it takes or is refused, the check facts it reports, read back by `hostfacts.parse`."""

import json
import threading

import pytest

from deploy_kit import hostfacts, units
from deploy_kit.remote import hostlib, hostprobe
from deploy_kit.remote.contracts import LockHolder

from .samples import stage_of

RELEASE = "2026-11-24-120000"


class FakeHost:
    """Answers the commands the probe runs; records them."""

    def __init__(self):
        self.ran = []

    def __call__(self, argv, stdin=None, timeout=60):
        self.ran.append(argv)
        if argv[:2] == ["systemctl", "is-enabled"]:
            return 0, "enabled\n", ""
        if argv[:2] == ["systemctl", "is-active"]:
            return 0, "active\n", ""
        if argv[:2] == ["systemctl", "show"]:
            return 0, "LimitNOFILE=65536\nTimeoutStopUSec=5min 30s\nNeedDaemonReload=no\nLoadState=loaded\n", ""
        if argv[:2] == ["systemctl", "list-units"]:
            return 0, f"shop-worker-default@{RELEASE}.service loaded active running Celery\n", ""
        if argv[0] == "systemd-run":  # a probe as the service: the broker, the app import
            return 0, "ok broker answered\n" if "broker" in argv else "ok shop imported\n", ""
        if argv[0] == "du":
            return 0, f"1234\t{argv[-1]}\n", ""
        return 0, "", ""  # runuser: readable, celery --version


@pytest.fixture
def probe(tmp_path, monkeypatch, capsys):
    stage = stage_of()
    host = FakeHost()
    monkeypatch.setattr(hostlib, "run", host)
    deploy_to = tmp_path / "srv" / "shop"
    release = deploy_to / "releases" / RELEASE
    (release / units.VENV / "bin").mkdir(parents=True)
    (release / units.VENV / "bin" / "python").write_text("")
    (deploy_to / "shared").mkdir()
    (deploy_to / "current").symlink_to(f"releases/{RELEASE}")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shop.env").write_text('DJANGO_SETTINGS_MODULE=shop.settings\nBLANK="  "\n')
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "shop-worker-default@.service").write_text("[Service]\n")

    def run(lock=None, check=True, current_app=True):
        params = hostfacts.params(stage, stage.host("web1"), check, lock, current_app=current_app)
        params["app"].update(user="root", group="root")
        params["paths"] = {"deploy_to": str(deploy_to), "releases": str(deploy_to / "releases"),
                           "shared": str(deploy_to / "shared"), "current": str(deploy_to / "current"),
                           "env_dir": str(tmp_path / "etc"), "env_file": str(tmp_path / "etc" / "shop.env")}
        params.update(state_dir=str(deploy_to / ".deploy-kit"), unit_dir=str(tmp_path / "units"),
                      python="/usr/bin/python3",
                      release_python=str(deploy_to / "current" / units.VENV / "bin" / "python"))
        hostprobe.main(json.loads(json.dumps(params)))  # as it travels
        return hostfacts.parse(capsys.readouterr().out)

    return run, host, deploy_to


def holder(who: str, token: str) -> LockHolder:
    return LockHolder(who=who, host="laptop", action="deploy", ref="main", since="2026-11-24T12:30:00+00:00",
                      token=token)


def test_the_probe_takes_the_lock_once_and_names_its_holder_to_the_next(probe):
    run, _, deploy_to = probe
    first = run(holder("alice", "a1"), check=False)
    assert first.lock.acquired and first.lock.holder == holder("alice", "a1")
    second = run(holder("bob", "b2"), check=False)
    assert not second.lock.acquired and second.lock.holder == holder("alice", "a1")
    assert "held by alice from laptop" in second.lock.holder.describe()
    (deploy_to / ".deploy-kit" / "lock" / "holder.json").write_text("{torn")
    torn = run(holder("bob", "b2"), check=False)
    assert not torn.lock.acquired and not torn.lock.holder.readable and torn.lock.holder.fresh
    assert run(None, check=False).lock is None  # a read-only probe takes nothing


def test_the_check_facts_come_from_the_host_as_the_service_sees_it(probe):
    run, host, deploy_to = probe
    hostlib.mark_bad(str(deploy_to / "releases" / RELEASE), "r0", "verify failed")
    facts = run(check=True)
    assert facts.env_keys == ("DJANGO_SETTINGS_MODULE",)  # BLANK="  " is not set
    assert facts.readable == {name: True for name in ("deploy_to", "releases", "shared", "current", "env_file")}
    assert facts.broker.ok and facts.broker.detail == "broker answered"
    assert facts.app_import.ok and facts.release_python and facts.release_runs
    assert facts.release_kb == 1234 and facts.disk_free_kb > 0 and facts.nr_open > 0
    assert [(r.name, r.bad) for r in facts.releases] == [(RELEASE, True)]
    assert facts.instances == {f"shop-worker-default@{RELEASE}.service": {"active": "active", "enabled": False}}
    assert facts.paths["current"].target == f"releases/{RELEASE}" and facts.paths["current"].resolves
    assert "shop-worker-default@.service" in facts.units
    as_service = [argv for argv in host.ran if argv[0] == "systemd-run"]
    assert len(as_service) == 2 and all("--wait" in argv for argv in as_service)


def test_a_deploys_probe_runs_only_the_broker_probe_as_the_service(probe):
    run, host, deploy_to = probe
    facts = run(check=True, current_app=False)
    assert facts.broker.ok and not facts.current_app
    assert facts.app_import is None and facts.release_runs is None
    as_service = [argv for argv in host.ran if argv[0] == "systemd-run"]
    # With the release's Python (kombu: every broker URL the app's), never the app itself.
    release_python = str(deploy_to / "current" / units.VENV / "bin" / "python")
    assert len(as_service) == 1 and "broker" in as_service[0] and release_python in as_service[0]
    assert not any("--version" in argv for argv in host.ran)


def test_the_slow_probes_run_while_the_rest_is_read(probe, monkeypatch):
    """Each probe as the service is a Python start-up (a few tenths of a second): they start
    first, so the lock, the releases and the units' states are read meanwhile."""
    run, host, _ = probe
    started, overlapped = threading.Event(), []

    def fake(argv, stdin=None, timeout=60):
        if argv[0] == "systemd-run":
            started.set()
        elif argv[:2] == ["systemctl", "is-enabled"]:
            overlapped.append(started.wait(5))  # before, the probes ran only after every unit's state
        return host(argv, stdin, timeout)

    monkeypatch.setattr(hostlib, "run", fake)
    facts = run(check=True)
    assert overlapped and all(overlapped) and facts.broker.ok and facts.release_kb == 1234
