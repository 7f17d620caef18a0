"""The env file: assignments from the command line, its lines, and the edit program run on a local file."""

import dataclasses
import grp
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_kit import config, envfile
from deploy_kit.errors import UsageError

SECRET = "redis://:s3cr3t-pa55@10.0.0.9:6379/0"

ORIGINAL = """\
# Environment of shop's Celery services
DJANGO_SETTINGS_MODULE=shop.settings
# the broker, with its password
CELERY_BROKER_URL=redis://:old@10.0.0.9:6379/0
SENTRY_DSN=
"""


def app_for(env_file: Path, group: str = "shop") -> config.App:
    text = f"""
[stages.prod]
[[stages.prod.hosts]]
address = "10.0.0.5"
[stages.prod.app]
name = "shop"
repo = "git@example.com:acme/shop.git"
celery_app = "shop"
env_file = "{env_file}"
[[stages.prod.workers]]
name = "default"
"""
    app = config.parse(text, Path("/x/hosts.toml")).stage("prod").app
    # The edit program chowns the file to root:GROUP; the test's own group stands in for the service group
    # (hosts.toml refuses "root", which is the group of a test run as root).
    return dataclasses.replace(app, group=group)


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "shop.env"
    path.write_text(ORIGINAL)
    path.chmod(0o600)
    return path


@pytest.fixture
def own_group():
    if os.geteuid() != 0:
        pytest.skip("the edit program chowns the env file to root (os.fchown(fd, 0, gid)), which needs root")
    return grp.getgrgid(os.getgid()).gr_name


def run(program: str) -> str:
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def edit(path: Path, group: str = "shop", **kwargs) -> tuple[envfile.EditResult, str]:
    kwargs.setdefault("salt", "x")
    output = run(envfile.edit_program(app_for(path, group), **kwargs))
    return envfile.parse_result(output), output


# --- command-line assignments and env file lines -------------------------------------------------

def test_parse_assignment_with_a_value():
    assert envfile.parse_assignment("CELERY_BROKER_URL=redis://h:6379/0") == ("CELERY_BROKER_URL",
                                                                              "redis://h:6379/0")


def test_parse_assignment_keeps_equal_signs_in_the_value():
    assert envfile.parse_assignment("TOKEN=a=b==") == ("TOKEN", "a=b==")


def test_parse_assignment_bare_key_asks_for_the_value():
    assert envfile.parse_assignment("SECRET_KEY") == ("SECRET_KEY", None)


def test_parse_assignment_empty_value():
    assert envfile.parse_assignment("SENTRY_DSN=") == ("SENTRY_DSN", "")


@pytest.mark.parametrize("text", ["1KEY=x", "MY-KEY=x", "=x", "MY KEY=x", "KÉ=x", ""])
def test_parse_assignment_refuses_invalid_names(text):
    with pytest.raises(UsageError, match="is not a valid variable name"):
        envfile.parse_assignment(text)


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b"])
def test_parse_assignment_refuses_multi_line_values(value):
    with pytest.raises(UsageError, match="spans several lines") as info:
        envfile.parse_assignment(f"KEY={value}")
    assert value not in str(info.value)  # the value is never echoed


@pytest.mark.parametrize("value", ["shop.settings", "redis://:pw@10.0.0.9:6379/0", "a,b+c%d", "", "x=y"])
def test_render_line_leaves_plain_values_unquoted(value):
    assert envfile.render_line("K", value) == f"K={value}"


@pytest.mark.parametrize("value, line", [
    ("two words", 'K="two words"'),
    ('say "hi"', 'K="say \\"hi\\""'),
    ("$HOME", 'K="\\$HOME"'),
    ("back\\slash", 'K="back\\\\slash"'),
    ("`id`", 'K="\\`id\\`"'),
    ("it's", 'K="it\'s"'),
    ("#not-a-comment", 'K="#not-a-comment"'),
])
def test_render_line_quotes_and_escapes_other_values(value, line):
    assert envfile.render_line("K", value) == line


def test_template_lists_the_required_keys_empty():
    template = envfile.template(app_for(Path("/etc/shop/shop.env")))
    lines = template.splitlines()
    for key in envfile.REQUIRED_KEYS:
        assert f"{key}=" in lines
    assert envfile.REQUIRED_KEYS == ("DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL")
    assert all(line.startswith("#") or line.endswith("=") for line in lines)


# --- the edit program, run on a local file ------------------------------------------------------

def test_reading_reports_keys_without_values(env_file):
    result, output = edit(env_file)
    assert not result.missing_file and result.changed == ()
    assert list(result.keys) == ["DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL", "SENTRY_DSN"]
    assert result.keys["CELERY_BROKER_URL"].set and not result.keys["SENTRY_DSN"].set
    assert all(state.value is None for state in result.keys.values())
    assert "old" not in output and "shop.settings" not in output
    assert env_file.read_text() == ORIGINAL  # reading changes nothing


def test_missing_file_is_reported(tmp_path):
    result, _ = edit(tmp_path / "absent.env")
    assert result.missing_file


def test_set_replaces_the_line_in_place_keeping_comments_and_order(env_file, own_group):
    result, _ = edit(env_file, own_group, set_values={"CELERY_BROKER_URL": SECRET})
    assert result.changed == ("CELERY_BROKER_URL",)
    assert env_file.read_text() == ORIGINAL.replace("redis://:old@10.0.0.9:6379/0", SECRET)


def test_set_adds_a_new_key_at_the_end(env_file, own_group):
    result, _ = edit(env_file, own_group, set_values={"SECRET_KEY": "two words"})
    assert result.changed == ("SECRET_KEY",)
    assert env_file.read_text() == ORIGINAL + 'SECRET_KEY="two words"\n'
    assert list(result.keys)[-1] == "SECRET_KEY"


def test_unset_removes_the_line_only(env_file, own_group):
    result, _ = edit(env_file, own_group, unset=["SENTRY_DSN", "NOT_THERE"])
    assert result.changed == ("SENTRY_DSN",)
    assert result.absent == ("NOT_THERE",)
    assert env_file.read_text() == ORIGINAL.replace("SENTRY_DSN=\n", "")
    assert "SENTRY_DSN" not in result.keys


def test_setting_the_same_value_again_changes_nothing(env_file, own_group):
    edit(env_file, own_group, set_values={"CELERY_BROKER_URL": SECRET})
    before = env_file.read_text()
    result, _ = edit(env_file, own_group, set_values={"CELERY_BROKER_URL": SECRET})
    assert result.changed == () and result.unchanged == ("CELERY_BROKER_URL",)
    assert env_file.read_text() == before


def test_edited_file_is_private_and_owned_by_root_and_the_group(env_file, own_group):
    env_file.chmod(0o644)
    edit(env_file, own_group, set_values={"DJANGO_SETTINGS_MODULE": "shop.settings.prod"})
    info = env_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_uid == 0 and info.st_gid == grp.getgrnam(own_group).gr_gid
    assert not [p for p in env_file.parent.iterdir() if p.name.startswith(".env.")]  # no temporary left


def test_output_never_holds_the_secret(env_file, own_group):
    result, output = edit(env_file, own_group, set_values={"CELERY_BROKER_URL": SECRET})
    assert SECRET not in output and "s3cr3t" not in output
    assert result.keys["CELERY_BROKER_URL"].value is None
    assert SECRET in env_file.read_text()
    _, output = edit(env_file, own_group)
    assert "s3cr3t" not in output


def test_reveal_returns_the_values(env_file, own_group):
    edit(env_file, own_group, set_values={"CELERY_BROKER_URL": SECRET})
    result, output = edit(env_file, reveal=True)
    assert result.keys["CELERY_BROKER_URL"].value == SECRET
    assert result.keys["DJANGO_SETTINGS_MODULE"].value == "shop.settings"
    assert SECRET in output


@pytest.mark.parametrize("value", ['say "hi"', "$HOME and `id`", "back\\slash", "  padded  ", "it's"])
def test_quoted_values_read_back_as_written(env_file, own_group, value):
    edit(env_file, own_group, set_values={"SECRET_KEY": value})
    result, _ = edit(env_file, reveal=True)
    assert result.keys["SECRET_KEY"].value == value


def test_fingerprints_compare_values_without_revealing_them(env_file, tmp_path):
    other = tmp_path / "other.env"
    other.write_text("CELERY_BROKER_URL=redis://:old@10.0.0.9:6379/0\nDJANGO_SETTINGS_MODULE=elsewhere\n")
    mine, _ = edit(env_file)
    theirs, _ = edit(other)
    assert mine.keys["CELERY_BROKER_URL"].fingerprint == theirs.keys["CELERY_BROKER_URL"].fingerprint
    assert mine.keys["DJANGO_SETTINGS_MODULE"].fingerprint != theirs.keys["DJANGO_SETTINGS_MODULE"].fingerprint
    salted, _ = edit(env_file, salt="y")
    assert salted.keys["CELERY_BROKER_URL"].fingerprint != mine.keys["CELERY_BROKER_URL"].fingerprint


def test_fingerprint_of_a_value_set_matches_the_one_read_back(env_file, own_group):
    written, _ = edit(env_file, own_group, set_values={"CELERY_BROKER_URL": SECRET})
    read, _ = edit(env_file)
    assert written.keys["CELERY_BROKER_URL"] == read.keys["CELERY_BROKER_URL"]


def test_program_carries_values_only_encoded():
    program = envfile.edit_program(app_for(Path("/etc/shop/shop.env")), set_values={"K": SECRET}, salt="x")
    assert SECRET not in program
    import ast

    params = json.loads(ast.literal_eval(program.rsplit(".main(json.loads(", 1)[1].removesuffix("))\n")))
    assert params["path"] == "/etc/shop/shop.env" and params["group"] == "shop"
    assert params["salt"] == "x" and params["unset"] == [] and params["reveal"] is False


def test_set_collapses_a_key_defined_twice_into_one_line(env_file, own_group):
    env_file.write_text(ORIGINAL + "DJANGO_SETTINGS_MODULE=shop.settings.old\n")
    result, _ = edit(env_file, own_group, set_values={"DJANGO_SETTINGS_MODULE": "shop.settings.prod"})
    assert result.changed == ("DJANGO_SETTINGS_MODULE",)
    assert env_file.read_text() == ORIGINAL.replace("=shop.settings\n", "=shop.settings.prod\n")


def test_env_show_and_check_read_every_form_alike(env_file, own_group):
    """One rule (hostlib) for `fab env.show` and the check's probe: export, quotes, comments, blanks."""
    from deploy_kit.remote import hostprobe

    env_file.write_text("# comment\n; another\nexport DJANGO_SETTINGS_MODULE=shop.settings\n"
                        "CELERY_BROKER_URL='redis://:p#w@h:6379/0'\nEMPTY=\nQUOTED_EMPTY=\"\"\n"
                        "  SPACED = \"a b\"\nBLANKS=\"  \"\nnot a line\n")
    shown, _ = edit(env_file, own_group)
    set_keys = {k for k, v in shown.keys.items() if v.set}
    assert set_keys == set(hostprobe.env_keys(str(env_file))) == {
        "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL", "SPACED"}  # BLANKS="  " is missing for both
    assert set(shown.keys) == {"DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL", "EMPTY", "QUOTED_EMPTY", "SPACED",
                               "BLANKS"}
