"""`fab setup` planning: what a host needs, from what its probe saw (no host involved)."""

import json

from deploy_kit import config, envfile, hostfacts, setup, units

from .samples import BEAT, INSTANCE, RELEASE, STAGE, WORKER, stage_of  # noqa: F401


def directory(owner: str, group: str, mode: str = "0750") -> dict:
    return {"type": "dir", "owner": owner, "group": group, "mode": mode}


def bare(wanted: list[str]) -> dict:
    """What the probe prints for a freshly installed host."""
    return {
        "python": "3.11.2",
        "target": {"python": "3.11.2", "machine": "x86_64", "glibc": "2.36"},
        "user": None,
        "group": None,
        "paths": {k: None for k in ("deploy_to", "releases", "shared", "current", "env_dir", "env_file")},
        "releases": [],
        "wheels": [],
        "units": {},
        "unit_state": {n: {"enabled": "not-found", "active": "inactive"} for n in wanted},
    }


def ready(stage: config.Stage, host: config.Host, *, released: bool = True) -> dict:
    """What the probe prints for a host that matches hosts.toml (after setup and one deploy)."""
    rendered = units.units_for(stage, host)
    data = bare(list(rendered))
    data.update(
        user={"name": "shop", "uid": 998, "group": "shop"},
        group={"name": "shop"},
        paths={
            "deploy_to": directory("root", "shop"),
            "releases": directory("root", "shop"),
            "shared": directory("shop", "shop"),
            "current": ({"type": "link", "owner": "root", "group": "root", "mode": "0777",
                         "target": RELEASE, "resolves": True} if released else None),
            "env_dir": directory("root", "shop"),
            "env_file": {"type": "file", "owner": "root", "group": "shop", "mode": "0640"},
        },
        units={n: u.content for n, u in rendered.items()},
        unit_state={n: {"enabled": "enabled", "active": "active"} for n in rendered if "@" not in n},
        instances={n.replace("@.", "@2026-11-24-120000."): {"enabled": True, "active": "active"}
                   for n in rendered if "@" in n and released},
    )
    return data


def plan(data: dict, host: str = "web1") -> setup.HostPlan:
    stage = stage_of()
    return setup.plan_host(stage, stage.host(host), hostfacts.parse(json.dumps(data)))


def summaries(result: setup.HostPlan) -> list[str]:
    return [c.summary for c in result.changes]


def test_bare_host_gets_everything_in_order():
    result = plan(bare([WORKER, BEAT]))
    assert summaries(result) == [
        "create group shop",
        "create user shop (system account, no login, no home)",
        "create deploy_to /srv/shop (root:shop 0750)",
        "create releases dir /srv/shop/releases (root:shop 0750)",
        "create shared dir /srv/shop/shared (shop:shop 0750)",
        "create env file dir /etc/shop (root:shop 0750)",
        "create env file /etc/shop/shop.env (root:shop 0640, keys DJANGO_SETTINGS_MODULE, CELERY_BROKER_URL empty)",
        f"install unit {WORKER}",
        f"install unit {BEAT}",
        "reload systemd",
        f"enable {BEAT} at boot",  # a worker's instance is enabled by the deploy that starts it
    ]
    assert result.consent_needed == ()
    assert result.notes == ("services start after the first release exists (`fab deploy`)",)


def test_bare_host_scripts_create_a_locked_down_service_account():
    script = plan(bare([WORKER, BEAT])).script()
    assert "groupadd --system shop" in script
    assert ("useradd --system --gid shop --home-dir /nonexistent --no-create-home "
            "--shell /usr/sbin/nologin shop") in script
    assert "install -d -o root -g shop -m 0750 /srv/shop\n" in script
    assert "install -d -o shop -g shop -m 0750 /srv/shop/shared\n" in script
    assert "chown root:shop /etc/shop/shop.env" in script
    assert "systemctl daemon-reload" in script
    assert f"systemctl enable --quiet {BEAT}" in script
    assert "systemctl start" not in script and "systemctl restart" not in script


def test_bare_host_env_file_is_the_template_with_private_mode():
    stage = stage_of()
    change = next(c for c in plan(bare([WORKER, BEAT])).changes if c.summary.startswith("create env file /"))
    assert envfile.template(stage.app) in change.script
    assert "chmod 0640 /etc/shop/shop.env.deploy-kit.tmp && mv -f /etc/shop/shop.env.deploy-kit.tmp " \
        "/etc/shop/shop.env" in change.script


def test_bare_host_units_are_written_as_rendered():
    stage = stage_of()
    rendered = units.units_for(stage, stage.host("web1"))
    result = plan(bare([WORKER, BEAT]))
    for name, unit in rendered.items():
        change = next(c for c in result.changes if c.summary == f"install unit {name}")
        assert unit.content in change.script
        assert f"/etc/systemd/system/{name}" in change.script


def test_host_that_already_matches_needs_no_change():
    stage = stage_of()
    for host in stage.hosts:
        result = plan(ready(stage, host), host.name)
        assert result.changes == (), summaries(result)
        assert result.notes == ()


def test_matching_host_without_a_release_only_gets_the_note():
    stage = stage_of()
    result = plan(ready(stage, stage.host("web1"), released=False))
    assert result.changes == ()
    assert result.notes == ("services start after the first release exists (`fab deploy`)",)


def test_unit_that_differs_is_replaced_only_with_consent_and_a_diff():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["units"][WORKER] = data["units"][WORKER].replace("RestartSec=5", "RestartSec=30")
    result = plan(data)
    change = next(c for c in result.changes if c.summary.startswith(f"replace unit {WORKER}"))
    assert change.needs_consent
    assert result.consent_needed == (change,)
    assert change.diff.startswith(f"--- {WORKER} (on the host)\n+++ {WORKER} (from hosts.toml)\n")
    assert "-RestartSec=30\n" in change.diff and "+RestartSec=5\n" in change.diff
    assert "reload systemd" in summaries(result)


def test_changed_unit_is_restarted_when_a_release_is_live():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["units"][WORKER] = data["units"][WORKER].replace("RestartSec=5", "RestartSec=30")
    result = plan(data)
    assert summaries(result)[-1] == f"restart {INSTANCE} to apply the new unit"
    assert result.changes[-1].script == f"systemctl restart {INSTANCE}"
    assert summaries(result).index("reload systemd") < summaries(result).index(
        f"restart {INSTANCE} to apply the new unit")


def test_changed_unit_is_not_restarted_before_the_first_release():
    stage = stage_of()
    data = ready(stage, stage.host("web1"), released=False)
    data["units"][WORKER] = data["units"][WORKER].replace("RestartSec=5", "RestartSec=30")
    result = plan(data)
    assert not any(s.startswith("restart") for s in summaries(result))


def test_stopped_unit_is_started_when_a_release_is_live():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["unit_state"][BEAT]["active"] = "failed"
    result = plan(data)
    assert summaries(result) == [f"start {BEAT}"]


def test_stale_managed_unit_is_removed_with_consent():
    stage = stage_of()
    data = ready(stage, stage.host("web2"))
    beat_content = units.beat_unit(stage).content  # web2 no longer has the beat role
    data["units"][BEAT] = beat_content
    data["unit_state"][BEAT] = {"enabled": "enabled", "active": "active"}
    result = plan(data, "web2")
    change = next(c for c in result.changes if c.summary.startswith(f"remove unit {BEAT}"))
    assert change.needs_consent
    assert f"systemctl disable --now --quiet {BEAT}" in change.script
    assert f"rm -f /etc/systemd/system/{BEAT}" in change.script
    assert change.diff and "-Description=shop Celery Beat\n" in change.diff
    assert "reload systemd" in summaries(result)


def test_unmanaged_unit_matching_the_pattern_is_left_alone_with_a_note():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["units"]["shop-worker-legacy.service"] = "[Unit]\nDescription=hand made\n"
    data["unit_state"]["shop-worker-legacy.service"] = {"enabled": "enabled", "active": "active"}
    result = plan(data)
    assert result.changes == ()
    assert result.notes == ("shop-worker-legacy.service looks like this app's but was not made by "
                            "deploy-kit; left alone",)


def test_env_file_with_wrong_mode_is_fixed_not_rewritten():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["paths"]["env_file"]["mode"] = "0644"
    result = plan(data)
    assert summaries(result) == ["fix env file permissions (root:shop 0644 -> root:shop 0640)"]
    script = result.changes[0].script
    assert script == "chown root:shop /etc/shop/shop.env && chmod 0640 /etc/shop/shop.env"
    assert "cat >" not in script  # the secrets in it are kept


def test_directory_with_wrong_owner_is_fixed():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["paths"]["shared"] = directory("root", "root", "0755")
    result = plan(data)
    assert summaries(result) == ["fix shared dir /srv/shop/shared: root:root 0755 -> shop:shop 0750"]
    assert result.changes[0].script == "install -d -o shop -g shop -m 0750 /srv/shop/shared"


def test_installed_but_disabled_unit_is_enabled():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["instances"][INSTANCE]["enabled"] = False
    result = plan(data)
    assert summaries(result) == [f"enable {INSTANCE} at boot"]


def test_a_plain_unit_of_older_deploy_kits_keeps_serving_until_the_next_deploy_hands_over():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    del data["instances"][INSTANCE]
    data["units"]["shop-worker-default.service"] = units.MANAGED_MARKER + " (an older deploy-kit)\n"
    data["unit_state"]["shop-worker-default.service"] = {"enabled": "enabled", "active": "active"}
    result = plan(data)
    assert result.changes == ()  # neither stopped nor removed, and no instance started beside it
    assert "next `fab deploy` hands its queues over" in result.notes[0]


def test_a_plain_unit_a_handover_retired_is_removed_without_asking():
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    data["units"]["shop-worker-default.service"] = units.MANAGED_MARKER + " (an older deploy-kit)\n"
    data["unit_state"]["shop-worker-default.service"] = {"enabled": "disabled", "active": "inactive"}
    result = plan(data)
    assert summaries(result) == ["remove unit shop-worker-default.service (retired by a handover)",
                                 "reload systemd"]
    assert result.consent_needed == ()


def test_an_older_instance_enabled_at_boot_is_disabled_as_fab_check_tells():
    """`fab check` fails when another release's instance would start at boot too, and its fix is
    `fab setup`: setup disables it (and leaves it running, if it runs or drains)."""
    stage = stage_of()
    data = ready(stage, stage.host("web1"))
    older = "shop-worker-default@2026-11-20-080000.service"
    data["instances"][older] = {"enabled": True, "active": "active"}
    result = plan(data)
    assert summaries(result) == [f"disable {older} at boot (not the current release's)"]
    assert result.changes[0].script == f"systemctl disable --quiet {older}"
    assert result.consent_needed == ()
    data["instances"][older]["enabled"] = False
    assert plan(data).changes == ()  # once disabled, nothing more
