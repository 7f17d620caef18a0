"""`fab check`: every failing check names its cause and its fix, from recorded probe output."""

import json

import pytest

from deploy_kit import checks, config, hostfacts, units

from .samples import BEAT, INSTANCE, RELEASE, STAGE, WORKER, stage_of  # noqa: F401


def directory(owner: str) -> dict:
    return {"type": "dir", "owner": owner, "group": "shop", "mode": "0750"}


def _live(unit: str) -> str:
    """What the probe reports a template's state under: the current release's instance."""
    return unit.replace("@.", "@2026-11-24-120000.")


def healthy(stage: config.Stage, host: config.Host) -> dict:
    """What `fab check`'s probe prints for a host set up and deployed to."""
    rendered = units.units_for(stage, host)
    return {
        "python": "3.11.2",
        "target": {"python": "3.11.2", "machine": "x86_64", "glibc": "2.36"},
        "user": {"name": "shop", "uid": 998, "group": "shop"},
        "group": {"name": "shop"},
        "paths": {
            "deploy_to": directory("root"),
            "releases": directory("root"),
            "shared": directory("shop"),
            "current": {"type": "link", "owner": "root", "group": "root", "mode": "0777",
                        "target": RELEASE, "resolves": True},
            "env_dir": directory("root"),
            "env_file": {"type": "file", "owner": "root", "group": "shop", "mode": "0640"},
        },
        "releases": [{"name": "2026-11-24-120000", "building": False, "bad": False,
                      "revision": {"sha": "0123456789abcdef", "ref": "main"}}],
        "wheels": ["celery-5.4.0-py3-none-any.whl"],
        "units": {n: u.content for n, u in rendered.items()},
        "unit_state": {_live(n): {"enabled": "enabled", "active": "active"} for n in rendered},
        "instances": {_live(n): {"enabled": True, "active": "active"} for n in rendered if "@" in n},
        "readable": {"deploy_to": True, "releases": True, "shared": True, "current": True, "env_file": True},
        "env_keys": ["DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL"],
        "disk_free_kb": 20 * 1024 * 1024,
        "release_kb": 80 * 1024,
        "nr_open": 1048576,
        "loaded": {n: {"LimitNOFILE": "65536", "TimeoutStopUSec": "5min 30s" if "worker" in n else "30s",
                       "NeedDaemonReload": "no", "LoadState": "loaded"} for n in map(_live, rendered)},
        "release_python": True,
        "release_runs": True,
        "broker": {"ok": True, "detail": "redis answered PING as the service"},
        "app_import": {"ok": True, "detail": "12 tasks registered"},
    }


def evaluate(data: dict, host: str = "web1", text: str = STAGE) -> dict[str, checks.Check]:
    stage = stage_of(text)
    rows = checks.evaluate(stage, stage.host(host), hostfacts.parse(json.dumps(data)))
    return {row.name: row for row in rows}


def failed(rows: dict[str, checks.Check], name: str) -> checks.Check:
    row = rows[name]
    assert row.status == checks.FAIL, row
    assert row.failed
    assert row.detail, f"{name} fails without a cause"
    assert row.fix, f"{name} fails without a fix"
    return row


def only_failure(rows: dict[str, checks.Check]) -> checks.Check:
    bad = [row for row in rows.values() if row.failed]
    assert len(bad) == 1, bad
    return failed(rows, bad[0].name)


@pytest.mark.parametrize("host", ["web1", "web2"])
def test_healthy_host_passes_every_check(host):
    stage = stage_of()
    rows = evaluate(healthy(stage, stage.host(host)), host)
    assert {name: row.status for name, row in rows.items() if row.status != checks.PASS} == {}
    assert list(rows) == ["ssh", "sudo", "service user", "service group", "deploy_to", "releases dir",
                          "shared dir", "current release", "celery in release", "env file", "env keys",
                          "broker", "celery app", "units", "workers", "beat", "stop timeout", "disk space",
                          "open files"]


def test_healthy_host_without_a_release_only_skips_what_needs_one():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["paths"]["current"] = None
    data.update(releases=[], release_python=False, release_runs=None, app_import=None, release_kb=0)
    rows = evaluate(data)
    assert not [row for row in rows.values() if row.failed]
    skipped = {name for name, row in rows.items() if row.status == checks.SKIP}
    assert skipped == {"current release", "celery in release", "celery app", "workers"}


def test_env_file_with_wrong_mode():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["paths"]["env_file"]["mode"] = "0644"
    row = only_failure(evaluate(data))
    assert row.name == "env file"
    assert "is root:shop 0644, expected root:shop 0640" in row.detail
    assert row.fix == "run `fab setup --stage prod`"


def test_env_file_missing():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["paths"]["env_file"] = None
    rows = evaluate(data)
    row = failed(rows, "env file")
    assert "/etc/shop/shop.env does not exist" in row.detail
    assert rows["env keys"].status == checks.SKIP


def test_missing_env_key_says_which_and_how_to_set_it():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["env_keys"] = ["DJANGO_SETTINGS_MODULE"]
    row = only_failure(evaluate(data))
    assert row.name == "env keys"
    assert row.detail == "CELERY_BROKER_URL not set in /etc/shop/shop.env"
    assert row.fix == "`fab env.set CELERY_BROKER_URL=...`"


def test_every_missing_env_key_is_listed():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["env_keys"] = []
    row = failed(evaluate(data), "env keys")
    assert "DJANGO_SETTINGS_MODULE, CELERY_BROKER_URL" in row.detail
    assert row.fix == "`fab env.set DJANGO_SETTINGS_MODULE=...` and `fab env.set CELERY_BROKER_URL=...`"


def test_broker_probe_failure():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["broker"] = {"ok": False, "detail": "redis refused the password: WRONGPASS"}
    row = only_failure(evaluate(data))
    assert row.name == "broker"
    assert row.detail == "unreachable as the service: redis refused the password: WRONGPASS"
    assert "CELERY_BROKER_URL" in row.fix


def test_app_import_failure():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["app_import"] = {"ok": False, "detail": "ModuleNotFoundError: No module named 'shop'"}
    row = only_failure(evaluate(data))
    assert row.name == "celery app"
    assert row.detail == "-A shop fails as the service: ModuleNotFoundError: No module named 'shop'"
    assert "app.celery_app" in row.fix and "DJANGO_SETTINGS_MODULE" in row.fix


def test_a_deploys_probe_leaves_the_current_release_alone_and_says_the_build_checks_the_new_one():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data.update(current_app=False, release_runs=None, app_import=None)
    rows = evaluate(data)
    assert not any(c.failed for c in rows.values())
    for name in ("celery in release", "celery app"):
        assert rows[name].status == checks.SKIP and "new release" in rows[name].detail


def test_unit_that_differs_from_hosts_toml():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["units"][WORKER] += "# local edit\n"
    row = only_failure(evaluate(data))
    assert row.name == "units"
    assert row.detail == f"differ from hosts.toml: {WORKER}"
    assert row.fix.startswith("run `fab setup --stage prod`") and "diff" in row.fix


def test_unit_not_installed():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    del data["units"][BEAT]
    row = failed(evaluate(data), "units")
    assert row.detail == f"not installed: {BEAT}"
    assert row.fix == "run `fab setup --stage prod`"


def test_unit_changed_on_disk_but_not_reloaded():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["loaded"][INSTANCE]["NeedDaemonReload"] = "yes"
    row = only_failure(evaluate(data))
    assert row.name == "units" and WORKER in row.detail
    assert "systemctl daemon-reload" in row.fix


def test_beat_enabled_on_a_host_without_the_beat_role():
    stage = stage_of()
    data = healthy(stage, stage.host("web2"))
    data["unit_state"][BEAT] = {"enabled": "enabled", "active": "active"}
    row = only_failure(evaluate(data, "web2"))
    assert row.name == "beat"
    assert "Beat belongs on web1" in row.detail and "run twice" in row.detail
    assert row.fix == "run `fab setup --stage prod`"


def test_beat_running_but_disabled_on_a_non_beat_host_also_fails():
    stage = stage_of()
    data = healthy(stage, stage.host("web2"))
    data["unit_state"][BEAT] = {"enabled": "disabled", "active": "active"}
    assert only_failure(evaluate(data, "web2")).name == "beat"


def test_beat_not_enabled_on_its_beat_host():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["unit_state"][BEAT]["enabled"] = "disabled"
    row = only_failure(evaluate(data))
    assert row.name == "beat"
    assert row.detail == f"{BEAT} is not enabled here (its beat host)"


def test_beat_enabled_while_no_host_has_the_beat_role():
    text = STAGE.replace('roles = ["worker", "beat", "migrate"]', 'roles = ["worker", "migrate"]')
    stage = stage_of(text)
    data = healthy(stage, stage.host("web1"))
    data["unit_state"][BEAT] = {"enabled": "enabled", "active": "active"}
    row = only_failure(evaluate(data, text=text))
    assert row.name == "beat"
    assert "no host has the 'beat' role" in row.detail


def test_stop_timeout_lower_than_the_task_time_limit():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["loaded"][INSTANCE]["TimeoutStopUSec"] = "1min 30s"
    row = only_failure(evaluate(data))
    assert row.name == "stop timeout"
    assert f"{INSTANCE} stops after 90 s but its tasks may run 300 s" in row.detail
    assert "killed" in row.detail


def test_stop_timeout_of_a_unit_not_loaded_is_not_judged():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["loaded"][INSTANCE].update(TimeoutStopUSec="1s", LoadState="not-found")
    assert evaluate(data)["stop timeout"].status == checks.PASS


def test_limit_nofile_above_the_kernel_maximum():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["nr_open"] = 32768
    row = only_failure(evaluate(data))
    assert row.name == "open files"
    assert "LimitNOFILE=65536 exceeds the kernel's fs.nr_open=32768" in row.detail
    assert "systemd.limit_nofile" in row.fix


def test_loaded_unit_with_another_limit_nofile():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["loaded"][INSTANCE]["LimitNOFILE"] = "1024"
    row = only_failure(evaluate(data))
    assert row.name == "open files"
    assert row.detail == f"expected 65536: {INSTANCE} runs with 1024"


def test_low_disk_space():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["disk_free_kb"] = 100 * 1024
    row = only_failure(evaluate(data))
    assert row.name == "disk space"
    assert row.detail == "100 MB free under /srv/shop/releases, a release needs about 512 MB"
    assert "keep_releases" in row.fix


def test_disk_space_needs_twice_a_large_release():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data.update(release_kb=1024 * 1024, disk_free_kb=1536 * 1024)
    assert "needs about 2048 MB" in failed(evaluate(data), "disk space").detail


def test_missing_service_account_and_directories():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data.update(user=None, group=None)
    data["paths"]["shared"] = None
    rows = evaluate(data)
    assert failed(rows, "service user").detail == "user shop does not exist"
    assert failed(rows, "service group").detail == "group shop does not exist"
    assert failed(rows, "shared dir").detail == "/srv/shop/shared does not exist"


def test_directory_with_the_wrong_owner_or_unreadable():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["paths"]["releases"]["owner"] = "deploy"
    data["readable"]["shared"] = False
    rows = evaluate(data)
    assert "owned by deploy:shop, expected root:shop" in failed(rows, "releases dir").detail
    assert "shop cannot read /srv/shop/shared" in failed(rows, "shared dir").detail


def test_current_link_pointing_nowhere():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["paths"]["current"]["resolves"] = False
    row = failed(evaluate(data), "current release")
    assert row.detail == f"/srv/shop/current points to {RELEASE}, which does not exist"
    assert "fab rollback --stage prod" in row.fix


def test_release_without_its_virtualenv():
    stage = stage_of()
    data = healthy(stage, stage.host("web1"))
    data["release_python"] = False
    row = only_failure(evaluate(data))
    assert row.name == "celery in release"
    assert "/srv/shop/current/.venv/bin/python does not exist" in row.detail
    assert "fab deploy --stage prod" in row.fix


@pytest.mark.parametrize("text, seconds", [
    ("1min 30s", 90),
    ("5min 30s", 330),
    ("500ms", 0.5),
    ("30s", 30),
    ("1h 2min 3s", 3723),
    ("2d", 172800),
    ("1.5s", 1.5),
    ("250us", 0.00025),
])
def test_parse_timespan(text, seconds):
    assert checks.parse_timespan(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["infinity", "", "  "])
def test_parse_timespan_without_a_limit(text):
    assert checks.parse_timespan(text) is None


def test_parse_timespan_understands_weeks():
    assert checks.parse_timespan("1w 30s") == pytest.approx(7 * 86400 + 30)


def test_stop_timeout_of_a_week_long_time_limit_passes():
    text = STAGE + "time_limit = 604800\n"
    stage = stage_of(text)
    data = healthy(stage, stage.host("web1"))
    data["loaded"][INSTANCE]["TimeoutStopUSec"] = "1w 30s"  # what systemctl shows for TimeoutStopSec=604830
    assert evaluate(data, text=text)["stop timeout"].status == checks.PASS


def test_the_current_release_instance_must_start_at_boot():
    data = healthy(stage_of(), stage_of().host("web1"))
    data["instances"][INSTANCE]["enabled"] = False
    row = only_failure(evaluate(data))
    assert row.name == "workers"
    assert row.detail == f"{INSTANCE} is not enabled: it will not start at boot"
    assert row.fix == "run `fab setup --stage prod`"


def test_an_older_instance_enabled_at_boot_too_fails():
    data = healthy(stage_of(), stage_of().host("web1"))
    data["instances"]["shop-worker-default@2026-11-20-080000.service"] = {"enabled": True, "active": "inactive"}
    row = only_failure(evaluate(data))
    assert row.name == "workers" and "2026-11-20-080000.service also start" in row.detail


def test_a_plain_unit_of_older_deploy_kits_is_fine_until_the_next_deploy():
    data = healthy(stage_of(), stage_of().host("web1"))
    del data["instances"][INSTANCE]
    data["unit_state"]["shop-worker-default.service"] = {"enabled": "enabled", "active": "active"}
    rows = evaluate(data)
    assert rows["workers"].status == checks.PASS and "next deploy hands it over" in rows["workers"].detail


def test_the_room_for_a_release_is_measured_where_releases_are_written(tmp_path, monkeypatch):
    """releases/ may be a filesystem of its own (a mount): its room is what a release needs."""
    import os
    from types import SimpleNamespace

    from deploy_kit.remote import hostprobe

    asked = []
    monkeypatch.setattr(hostprobe.os, "statvfs", lambda path: asked.append(path) or SimpleNamespace(
        f_bavail=10, f_frsize=4096))
    releases = tmp_path / "srv" / "releases"
    assert hostprobe.free_kb(str(releases)) == 40 and asked == [str(tmp_path)]  # before the first deploy
    os.makedirs(releases)
    hostprobe.free_kb(str(releases))
    assert asked[-1] == str(releases)


def test_two_worker_hosts_with_the_same_hostname_fail_the_preflight():
    """They would share the node names and the private verification queue: each host's row says
    which host it collides with, under what name, and how to fix it."""
    stage = stage_of()
    facts = {h.name: hostfacts.parse(json.dumps(dict(healthy(stage, h), hostname="app"))) for h in stage.hosts}
    rows = checks.stage_checks(stage, facts)
    assert set(rows) == {"web1", "web2"} and all(r[0].failed and r[0].name == "hostname" for r in rows.values())
    assert "web1 and web2 both call themselves 'app'" in rows["web1"][0].detail
    assert "hostnamectl set-hostname" in rows["web2"][0].fix
    apart = {h: hostfacts.parse(json.dumps(dict(healthy(stage, stage.host(h)), hostname=h))) for h in facts}
    assert checks.stage_checks(stage, apart) == {}


def test_a_deploy_to_hosts_sharing_a_hostname_stops_in_its_preflight(monkeypatch):
    from deploy_kit import lifecycle
    from deploy_kit.errors import PreflightFailed

    from .test_lifecycle import NOW, FakeRun

    monkeypatch.setattr(lifecycle, "Run", FakeRun)
    FakeRun.facts_override = {"web1": {"hostname": "app"}, "web2": {"hostname": "app"}}
    FakeRun.held, FakeRun.cutover_status = set(), {}
    try:
        with pytest.raises(PreflightFailed, match="web2: hostname: web2 and web1 both call themselves 'app'"):
            lifecycle.deploy(stage_of(), ref="main", say=lambda h, m: None, now=NOW)
    finally:
        FakeRun.facts_override = {}


def test_the_probe_lists_the_cutovers_still_running_and_refuses_when_systemd_cannot_say(monkeypatch):
    from deploy_kit.remote import hostprobe
    answers = {"ok": (0, "shop-cutover-20261124 loaded active running deploy-kit cutover\n", ""),
               "none": (0, "", ""), "broken": (1, "", "Failed to connect to bus")}
    for case, expected in (("ok", ["shop-cutover-20261124"]), ("none", [])):
        monkeypatch.setattr(hostprobe.hostlib, "run", lambda argv, case=case, **k: answers[case])
        assert hostprobe.cutovers("shop") == expected
    monkeypatch.setattr(hostprobe.hostlib, "run", lambda argv, **k: answers["broken"])
    assert hostprobe.cutovers("shop") == ["(systemctl list-units failed: Failed to connect to bus)"]
    assert hostfacts.parse(json.dumps({"cutovers": ["shop-cutover-1"], "hostname": "h"})).cutovers == \
        ("shop-cutover-1",)
