"""Loading hosts.toml: the example file loads, and every kind of mistake gets its own clear message."""

import json
from pathlib import Path, PurePosixPath

import pytest

from deploy_kit import config
from deploy_kit.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parents[2]
FILE = Path("/etc/deploy/hosts.toml")

MINIMAL = """
[stages.prod]
[[stages.prod.hosts]]
address = "10.0.0.5"
[stages.prod.app]
name = "shop"
repo = "git@example.com:acme/shop.git"
celery_app = "shop"
[[stages.prod.workers]]
name = "default"
"""


def parse(text: str) -> config.Config:
    return config.parse(text, FILE)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


def test_example_file_loads_with_every_stage():
    loaded = config.load(ROOT / "hosts.example.toml")
    assert set(loaded.stages) == {"staging", "production"}
    production = loaded.stage("production")
    assert production.app.ref == "production"  # stage override
    assert production.app.keep_releases == 10
    assert production.app.deploy_to == PurePosixPath("/srv/myapp")  # shared default
    assert [w.name for w in production.workers] == ["default", "reports"]
    assert production.workers[0].hosts == ("web1", "web2")
    assert production.beat is not None and production.beat.host == "web1"
    assert production.units_on(production.host("web2")) == (
        "myapp-worker-default@.service", "myapp-worker-reports@.service")
    assert "myapp-beat.service" in production.units_on(production.host("web1"))
    assert loaded.stage(None).name == "staging"  # default_stage


def test_minimal_stage_gets_documented_defaults():
    stage = parse(MINIMAL).stage(None)
    host = stage.hosts[0]
    assert (host.name, host.port, host.user, host.roles) == ("10.0.0.5", 22, "deploy", ("worker",))
    app = stage.app
    assert app.deploy_to == PurePosixPath("/srv/shop")
    assert (app.user, app.group) == ("shop", "shop")
    assert app.env_file == PurePosixPath("/etc/shop/shop.env")
    assert app.ref == "HEAD" and app.keep_releases == 5
    assert stage.workers[0].queues == ("celery",)
    assert stage.beat is None
    assert stage.verify.task == "celery.accumulate"
    assert stage.migrate_host is host
    assert stage.ssh.known_hosts == Path("~/.ssh/known_hosts").expanduser()


def test_relative_local_paths_are_anchored_at_the_config_file():
    text = MINIMAL.replace('repo = "git@example.com:acme/shop.git"', 'repo = "../shop"')
    text += '[stages.prod.ssh]\nknown_hosts = "keys/known_hosts"\n'
    stage = parse(text).stage("prod")
    assert stage.app.repo == "/etc/deploy/../shop"
    assert stage.ssh.known_hosts == Path("/etc/deploy/keys/known_hosts")


def test_relative_deploy_to():
    text = MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\ndeploy_to = "srv/shop"')
    message = error_of(text)
    assert str(FILE) in message
    assert "stages.prod.app.deploy_to" in message
    assert "must be an absolute path, got 'srv/shop'" in message
    assert "'/srv/shop'" in message


def test_root_service_user_is_refused():
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\nuser = "root"'))
    assert "stages.prod.app.user" in message and "must not be root" in message


def test_root_group_is_refused():
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\ngroup = "root"'))
    assert "stages.prod.app.group" in message and "must not be root" in message


def test_two_beat_hosts_in_one_stage():
    text = MINIMAL.replace('address = "10.0.0.5"', 'address = "10.0.0.5"\nroles = ["worker", "beat"]')
    text += '[[stages.prod.hosts]]\naddress = "10.0.0.6"\nroles = ["beat"]\n'
    message = error_of(text)
    assert "stages.prod.hosts" in message
    assert "2 hosts have the 'beat' role (10.0.0.5, 10.0.0.6)" in message
    assert "periodic tasks run twice" in message


def test_duplicate_worker_service_names():
    text = MINIMAL + '[[stages.prod.workers]]\nname = "default"\nqueues = ["other"]\n'
    message = error_of(text)
    assert "stages.prod.workers[1].name" in message
    assert "'default' is defined twice" in message


def test_unknown_key_with_a_close_match_suggests_it():
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\nkeep_release = 3'))
    assert "stages.prod.app.keep_release: unknown key. Did you mean 'keep_releases'?" in message


def test_secret_looking_key_points_to_the_env_file():
    text = MINIMAL.replace('celery_app = "shop"',
                           'celery_app = "shop"\nbroker_url = "redis://:pw@x/0"')
    message = error_of(text)
    assert "Secrets never go in hosts.toml" in message and "fab env.set BROKER_URL" in message
    assert "pw@" not in message  # the secret itself is never echoed


def test_repo_url_with_a_password_is_refused_without_echoing_it():
    message = error_of(MINIMAL.replace("git@example.com:acme/shop.git",
                                       "https://bot:hunter2@example.com/acme/shop.git"))
    assert "stages.prod.app.repo" in message and "password or token" in message
    assert "hunter2" not in message


def test_repo_url_with_a_token_as_user_name_is_refused_without_echoing_it():
    message = error_of(MINIMAL.replace("git@example.com:acme/shop.git",
                                       "https://ghp_tok3n0123456789@github.com/acme/shop.git"))
    assert "password or token" in message and "ghp_tok3n" not in message
    for fine in ("ssh://git@example.com/acme/shop.git", "https://example.com/acme/shop.git"):
        assert config.parse(MINIMAL.replace("git@example.com:acme/shop.git", fine), Path("/x/hosts.toml"))


def test_wrong_type_names_what_was_expected():
    message = error_of(MINIMAL.replace('address = "10.0.0.5"', 'address = "10.0.0.5"\nport = "22"'))
    assert "stages.prod.hosts[0].port: expected an integer, got '22'" in message


def test_missing_required_key_says_how_to_add_it():
    message = error_of(MINIMAL.replace('celery_app = "shop"\n', ""))
    assert "stages.prod.app.celery_app: required key is missing. Fix: add celery_app =" in message


def test_every_problem_is_reported_at_once():
    text = MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\nuser = "root"\nkeep_releases = 1')
    message = error_of(text)
    assert "2 problems" in message
    assert "must not be root" in message and "at least 2" in message


def test_unknown_role_and_worker_host():
    text = MINIMAL.replace('address = "10.0.0.5"', 'address = "10.0.0.5"\nroles = ["wroker"]')
    message = error_of(text)
    assert "unknown role 'wroker'; did you mean 'worker'?" in message
    text = MINIMAL + 'hosts = ["10.0.0.9"]\n'
    message = error_of(text)
    assert "stages.prod.workers[0].hosts" in message and "no host named '10.0.0.9'" in message


def test_shared_table_errors_name_the_shared_key_path():
    text = '[app]\ndeploy_to = "relative"\n' + MINIMAL
    message = error_of(text)
    assert "app.deploy_to: must be an absolute path" in message
    assert "stages.prod.app.deploy_to" not in message


def test_stage_overrides_shared_table_key_by_key():
    text = '[app]\nkeep_releases = 7\nrequirements = "req/base.txt"\n' + MINIMAL.replace(
        'celery_app = "shop"', 'celery_app = "shop"\nkeep_releases = 3')
    app = parse(text).stage("prod").app
    assert app.keep_releases == 3 and app.requirements == "req/base.txt"


def test_invalid_toml_names_the_line():
    message = error_of("[stages.prod\n")
    assert str(FILE) in message and "not valid TOML" in message and "line 1" in message


def test_no_stages():
    assert "no stages defined" in error_of('default_stage = "x"\n')


def test_default_stage_must_exist():
    message = error_of('default_stage = "prodution"\n' + MINIMAL)
    assert "default_stage" in message and "did you mean 'prod'?" in message


def test_unknown_stage_on_the_command_line():
    loaded = parse(MINIMAL)
    with pytest.raises(UsageError) as info:
        loaded.stage("prd")
    assert "no stage named 'prd'; did you mean 'prod'?" in str(info.value)


def test_several_stages_without_default_needs_a_flag():
    loaded = parse(MINIMAL + MINIMAL.replace("stages.prod", "stages.staging"))
    with pytest.raises(UsageError) as info:
        loaded.stage(None)
    assert "pass --stage NAME" in str(info.value)


def test_missing_file_says_where_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOY_KIT_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError) as info:
        config.load()
    message = str(info.value)
    assert str(tmp_path / "nope.toml") in message and "$DEPLOY_KIT_CONFIG" in message
    assert "hosts.example.toml" in message


def test_worker_without_any_worker_host():
    text = MINIMAL.replace('address = "10.0.0.5"', 'address = "10.0.0.5"\nroles = ["migrate"]')
    assert "runs on no host" in error_of(text)


def test_linked_paths_must_stay_inside_the_release():
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\nlinked_dirs = ["/var/media"]'))
    assert "stages.prod.app.linked_dirs" in message and "must be relative to the release" in message
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\nlinked_files = ["../x"]'))
    assert "stages.prod.app.linked_files" in message


def test_install_mode_is_wheels_or_index():
    assert parse(MINIMAL).stage("prod").app.install == "wheels"
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\ninstall = "pypi"'))
    assert "must be 'wheels'" in message and "'index'" in message


def test_installer_is_uv_or_pip_and_a_bad_one_is_named_with_the_choices():
    assert parse(MINIMAL).stage("prod").app.installer == "uv"
    pip = parse(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\ninstaller = "pip"'))
    assert pip.stage("prod").app.installer == "pip"
    message = error_of(MINIMAL.replace('celery_app = "shop"', 'celery_app = "shop"\ninstaller = "poetry"'))
    assert "stages.prod.app.installer" in message and "'uv'" in message and "'pip'" in message and "poetry" in message


def test_paths_that_would_break_units_or_scripts_are_refused():
    for bad in ("/srv/my app", "/srv/app%h", "/srv/it's"):
        message = error_of(MINIMAL.replace('celery_app = "shop"', f'celery_app = "shop"\ndeploy_to = "{bad}"'))
        assert "stages.prod.app.deploy_to" in message and "may hold only letters" in message


@pytest.mark.parametrize("path", ["media'; rm -rf /", "a b", "$(id)", "x\ny", "50%"])
def test_linked_paths_that_would_need_quoting_are_refused(path):
    text = MINIMAL.replace('celery_app = "shop"', f'celery_app = "shop"\nlinked_files = [{json.dumps(path)}]')
    with pytest.raises(ConfigError) as caught:
        config.parse(text, Path("/x/hosts.toml"))
    assert "linked_files" in str(caught.value) and "letters, digits" in str(caught.value)
