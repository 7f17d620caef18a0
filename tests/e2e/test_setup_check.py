"""`fab setup`, `fab check` and `fab env.*` on a real bare host: hardened units, protected env file,
and every check failing for its real cause, then passing once fixed.

The tests of this module run in order on one fresh sandbox host of their own ("dkset").
"""

import re

import pytest

from deploy_kit import config

from .conftest import boot, call_task, fab, on_host, prepare_env, say

NAME = "dkset"
UNITS = ("exampleapp-worker-default@.service", "exampleapp-worker-reports@.service", "exampleapp-beat.service")


def live(unit: str, release: str) -> str:
    """A worker template's instance for `release` (what runs); Beat is itself."""
    return unit.replace("@.", f"@{release}.")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    box = None
    try:
        box, config_file, repo = boot(NAME, 1, tmp_path_factory.mktemp(NAME))
        stage = config.load(config_file).stage(NAME)
        yield box, config_file, stage
    finally:
        if box is not None:
            box.down(say)


def run(host, *args, **kwargs):
    _box, config_file, _stage = host
    return fab(*args, "--stage", NAME, config_file=config_file, **kwargs)


def check_rows(output: str) -> dict[str, str]:
    """check name -> pass/FAIL/skip, from `fab check`'s table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and cells[1] in ("pass", "FAIL", "skip") and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_setup_turns_a_bare_host_into_one_ready_for_the_services(host):
    _box, _config_file, stage = host
    first = run(host, "setup", check=True)
    for expected in ("create group exampleapp", "create user exampleapp", "create env file",
                     *(f"install unit {u}" for u in UNITS), "services start after the first release"):
        assert expected in first.stdout
    listing = on_host(stage, 0, "stat -c '%n %U:%G %a' /srv/exampleapp /srv/exampleapp/releases "
                      "/srv/exampleapp/shared /etc/exampleapp /etc/exampleapp/exampleapp.env\n"
                      "getent passwd exampleapp | cut -d: -f7\n"
                      "systemctl is-enabled exampleapp-beat.service")
    assert listing.splitlines() == [
        "/srv/exampleapp root:exampleapp 750", "/srv/exampleapp/releases root:exampleapp 750",
        "/srv/exampleapp/shared exampleapp:exampleapp 750", "/etc/exampleapp root:exampleapp 750",
        "/etc/exampleapp/exampleapp.env root:exampleapp 640", "/usr/sbin/nologin",
        "enabled"]  # a worker's instance is enabled by the deploy that starts it
    second = run(host, "setup", check=True)
    assert f"{NAME}1: no change" in second.stdout
    assert "every host already matches hosts.toml: no change" in second.stdout


def test_check_names_the_missing_env_keys_and_the_broker(host):
    proc = run(host, "check")
    assert proc.returncode == 3
    rows = check_rows(proc.stdout)
    assert rows["env keys"] == "FAIL" and rows["broker"] == "FAIL"
    assert rows["units"] == "pass" and rows["env file"] == "pass" and rows["service user"] == "pass"
    assert "fab env.set CELERY_BROKER_URL=..." in proc.stdout
    assert "check(s) failed" in proc.stderr and "Traceback" not in proc.stderr


def test_env_set_show_never_echo_a_secret(host):
    box, config_file, stage = host
    prepare_env(box, config_file, NAME)
    password = box.redis_password_file.read_text().strip()
    shown = run(host, "env.show", check=True)
    assert "CELERY_BROKER_URL" in shown.stdout and "set (hidden)" in shown.stdout
    assert password not in shown.stdout + shown.stderr
    revealed = run(host, "env.show", "--reveal", check=True)
    assert password in revealed.stdout
    journal = on_host(stage, 0, "journalctl --no-pager -o cat | grep -c -F -- " + password + " || true")
    assert journal.strip() == "0"
    content = on_host(stage, 0, "cat /etc/exampleapp/exampleapp.env")
    assert "DJANGO_SETTINGS_MODULE=exampleapp.settings" in content
    assert content.startswith("# Environment of exampleapp")  # the template's comments are kept
    rows = check_rows(run(host, "check", check=True).stdout)
    assert rows["env keys"] == "pass" and rows["broker"] == "pass"


def test_check_fails_on_a_readable_env_file_and_setup_fixes_it(host):
    _box, _config_file, stage = host
    on_host(stage, 0, "chmod 0644 /etc/exampleapp/exampleapp.env")
    proc = run(host, "check")
    assert proc.returncode == 3
    assert check_rows(proc.stdout)["env file"] == "FAIL"
    assert "expected root:exampleapp 0640" in proc.stdout
    fixed = run(host, "setup", check=True)
    assert "fix env file permissions" in fixed.stdout
    assert check_rows(run(host, "check", check=True).stdout)["env file"] == "pass"


def test_check_fails_when_the_broker_is_unreachable_as_the_service(host):
    box, _config_file, _stage = host
    closed = box.broker_url().replace(":6379/", ":6390/")
    run(host, "env.set", "CELERY_BROKER_URL", check=True, stdin=closed + "\n")
    proc = run(host, "check")
    assert proc.returncode == 3
    assert check_rows(proc.stdout)["broker"] == "FAIL"
    assert re.search(r"refused|Errno 111", proc.stdout)
    assert box.redis_password_file.read_text().strip() not in proc.stdout
    run(host, "env.set", "CELERY_BROKER_URL", check=True, stdin=box.broker_url() + "\n")
    assert check_rows(run(host, "check", check=True).stdout)["broker"] == "pass"


def test_a_unit_edited_on_the_host_is_shown_and_replaced_only_with_consent(host):
    _box, _config_file, stage = host
    unit = "/etc/systemd/system/exampleapp-worker-default@.service"
    on_host(stage, 0, f"sed -i 's/^KillMode=mixed/KillMode=control-group/' {unit} && systemctl daemon-reload")
    proc = run(host, "check")
    assert check_rows(proc.stdout)["units"] == "FAIL" and "differ from hosts.toml" in proc.stdout
    refused = run(host, "setup")
    assert refused.returncode == 2
    assert "-KillMode=control-group" in refused.stdout and "+KillMode=mixed" in refused.stdout
    assert "Nothing was changed" in refused.stderr and "--yes" in refused.stderr
    assert "KillMode=control-group" in on_host(stage, 0, f"cat {unit}")
    run(host, "setup", "--yes", check=True)
    assert "KillMode=mixed" in on_host(stage, 0, f"cat {unit}")
    assert check_rows(run(host, "check", check=True).stdout)["units"] == "pass"


def test_first_deploy_then_every_check_passes(host):
    deployed = run(host, "deploy", timeout=600)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    rows = check_rows(run(host, "check", check=True).stdout)
    assert rows["celery app"] == "pass" and rows["celery in release"] == "pass"
    assert rows["current release"] == "pass"
    assert "FAIL" not in rows.values()


def test_units_rate_ok_in_systemd_analyze_and_verify_cleanly(host):
    _box, _config_file, stage = host
    release = on_host(stage, 0, "readlink /srv/exampleapp/current").strip().removeprefix("releases/")
    for unit in (live(u, release) for u in UNITS):
        security = on_host(stage, 0, f"systemd-analyze security --no-pager {unit}")
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", security)
        assert level, security[-500:]
        assert float(level.group(1)) <= 2.0, f"{unit}: {level.group(0)}"
        assert level.group(2) == "OK"
        verify = on_host(stage, 0, f"systemd-analyze verify {unit} 2>&1", check=False)
        assert verify.strip() == "", f"{unit}: {verify}"


def test_the_worker_started_from_the_generated_unit_consumes_tasks(host):
    _box, _config_file, stage = host
    release = on_host(stage, 0, "readlink /srv/exampleapp/current").strip().removeprefix("releases/")
    state = on_host(stage, 0, f"systemctl show exampleapp-worker-default@{release} -p ActiveState,User,KillMode "
                              "--value")
    assert sorted(state.split()) == ["active", "exampleapp", "mixed"]
    entry_id = call_task(stage, 0, "ledger.tasks.record_entry", ["deposit", 5])
    assert int(entry_id) >= 1
    assert call_task(stage, 0, "ledger.tasks.summarize") == "{'entries': 1, 'total': 5}"  # reports queue


def test_check_finds_a_misspelled_celery_app(host):
    _box, config_file, _stage = host
    broken = config_file.with_name("misspelled.toml")
    broken.write_text(config_file.read_text().replace('celery_app = "exampleapp"', 'celery_app = "exampleap"'))
    proc = fab("check", "--stage", NAME, config_file=broken)
    assert proc.returncode == 3
    assert check_rows(proc.stdout)["celery app"] == "FAIL"
    assert "exampleap" in proc.stdout and "ModuleNotFoundError" in proc.stdout


def test_check_finds_a_missing_settings_module(host):
    run(host, "env.unset", "DJANGO_SETTINGS_MODULE", check=True)
    proc = run(host, "check")
    assert proc.returncode == 3
    assert check_rows(proc.stdout)["env keys"] == "FAIL" and "DJANGO_SETTINGS_MODULE" in proc.stdout
    run(host, "env.set", "DJANGO_SETTINGS_MODULE=exampleapp.settings", check=True)
    assert run(host, "check").returncode == 0
