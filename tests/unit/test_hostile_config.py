"""Hostile hosts.toml files: loading one either gives values safe in units and scripts, or a ConfigError.

Hypothesis mutates a valid stage (wrong types, unknown keys, missing tables, huge values, shell and
systemd metacharacters, non-UTF-8 bytes, deep nesting) and loads it as the command line does.
"""

import copy
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy_kit import config, units
from deploy_kit.errors import EXIT_CONFIG, DeployKitError

from .test_cli_errors import fab

BASE: dict[str, Any] = {
    "default_stage": "prod",
    "verify": {"task": "celery.accumulate", "timeout": 60, "watch": 3.0},
    "stages": {"prod": {
        "parallel": 10,
        "hosts": [
            {"name": "web1", "address": "10.0.0.5", "port": 22, "user": "deploy",
             "roles": ["worker", "beat", "migrate"]},
            {"name": "web2", "address": "web2.example.com"},
        ],
        "ssh": {"known_hosts": "~/.ssh/known_hosts", "identity_file": "keys/id", "connect_timeout": 5},
        "app": {"name": "shop", "repo": "git@example.com:acme/shop.git", "ref": "main", "path": "src",
                "celery_app": "shop.celery:app", "deploy_to": "/srv/shop", "user": "shop", "group": "shop",
                "env_file": "/etc/shop/shop.env", "keep_releases": 5, "requirements": "requirements.txt",
                "python": "/usr/bin/python3", "linked_dirs": ["media"], "linked_files": ["local.py"],
                "install": "wheels"},
        "workers": [{"name": "default", "queues": ["celery", "mail"], "concurrency": 2, "time_limit": 300,
                     "loglevel": "INFO", "hosts": ["web1", "web2"], "handover": True, "mingle": True,
                     "gossip": False}],
        "beat": {"loglevel": "INFO"},
        "systemd": {"limit_nofile": 65536, "stop_margin": 30, "broker_unit": "redis-server.service"},
    }},
}


class Raw(str):
    """TOML text written as is: what no Python value serialises to (a 5000-digit integer...)."""


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(data: dict[str, Any]) -> str:
    return "".join(f"{toml_string(key)} = {toml_value(value)}\n" for key, value in data.items())


# Strings that mean something to a shell, to systemd or to a path, and names that are no names.
HOSTILE_TEXT = ["", " ", "shop app", "shop;id", "$(id)", "`id`", "a'b", 'a"b', "a\nb", "shop\n", "\r", "\t",
                "%n", "%i", "100%", "..", "../etc", "/srv/../etc", "/srv/a b", "a\\b", "-rf", "--upload-pack=x:y",
                "~nosuchuser/x", "\x00", "é", "ℌ", "\u202e", "*", "a|b", "a&b", "<x>", "{a}", "x" * 100_000, "/",
                ".", "./", "root", "0", "HEAD..main", "main@{u}", "shop:app;x", "/srv/shop%i"]
METACHARS = " \t\n\r;$()`'\"|&<>*?[]{}!#\\%\x00"

hostile_strings = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.text(alphabet=st.sampled_from(list(METACHARS) + list("ab/.-_~")), max_size=12),
    st.text(max_size=20),
    st.builds(lambda ok, bad: ok + bad, st.sampled_from(["shop", "/srv/shop", "media", "celery"]),
              st.sampled_from(list(METACHARS))),
)
hostile_numbers = st.one_of(
    st.integers(), st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**4000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([Raw("9" * 5000), Raw("1e999"), Raw("0x7fffffffffffffffff")]),
)
hostile_scalars = st.one_of(hostile_strings, hostile_numbers, st.booleans(),
                            st.sampled_from([Raw("1979-05-27T07:32:00Z"), Raw("07:32:00"), Raw("1979-05-27")]))
hostile_values = st.one_of(
    hostile_scalars,
    st.lists(hostile_scalars, max_size=4),
    st.dictionaries(hostile_strings, hostile_scalars, max_size=3),
    st.integers(1, 3000).map(lambda depth: Raw("[" * depth + "]" * depth)),
    st.integers(1, 3000).map(lambda depth: Raw("{a = " * depth + "1" + "}" * depth)),
)


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key and list index of the document, tables before their keys."""
    paths = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        paths += key_paths(child, (*prefix, key))
    return paths


PATHS = key_paths(BASE)


def parent_of(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(key_paths(data) or [("stages",)]))
        if not path or path not in key_paths(data):
            continue
        parent = parent_of(data, path)
        action = draw(st.sampled_from(["replace", "replace", "delete", "unknown key", "rename"]))
        if action == "replace":
            parent[path[-1]] = draw(hostile_values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "unknown key" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(hostile_strings)] = draw(hostile_values)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(hostile_strings)] = parent.pop(path[-1])
    return toml_document(data)


whole_files = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.builds(lambda text, at, junk: text[:at] + junk + text[at:],
              st.just(toml_document(BASE).encode()), st.integers(0, 2000),
              st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\xed\xa0\x80", b"\x00", b"\n[stages\n"])),
    st.builds(lambda text, at: text[:at], st.just(toml_document(BASE).encode()), st.integers(0, 2000)),
)

SHELL_UNSAFE = re.compile(r"[\s;$()`'\"|&<>*?\[\]{}!#\\%\x00-\x1f\x7f]")


def assert_safe(stage: config.Stage) -> None:
    """Every name and path that reaches a shell or a unit file holds nothing a shell or systemd reads."""
    app = stage.app
    names = [stage.name, app.name, app.user, app.group, app.celery_app, app.ref, *app.linked_dirs,
             *app.linked_files, *(h.name for h in stage.hosts), *(h.address for h in stage.hosts),
             *(h.user for h in stage.hosts)]
    for worker in stage.workers:
        names += [worker.name, *worker.queues, *worker.hosts]
    paths = [app.deploy_to, app.env_file, app.python]
    for value in [*names, *map(str, paths)]:
        assert value and not SHELL_UNSAFE.search(value) and not value.startswith("-"), value
    for path in [*paths, *map(PurePosixPath, app.linked_dirs + app.linked_files)]:
        assert ".." not in path.parts and path.parts, path
    for host in stage.hosts:
        for unit in units.units_for(stage, host).values():
            for line in unit.content.splitlines():  # each line one setting: nothing smuggled in
                assert re.match(r"^(#.*|\[[A-Za-z]+\]|[A-Za-z]+=.*|)$", line), line
            left = unit.content.replace("%%h", "").replace("%i", "").replace("%H", "")
            assert "%" not in left, "a systemd specifier came from hosts.toml"


def load_as_the_cli_does(path: Path) -> None:
    try:
        loaded = config.load(path)
        stages = [loaded.stage(name) for name in loaded.stages]
        loaded.stage(None)
    except DeployKitError as exc:
        assert exc.exit_code == EXIT_CONFIG and str(exc).strip(), repr(exc)
        return
    for stage in stages:
        assert_safe(stage)


BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


def test_the_base_document_loads_and_is_safe(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text(toml_document(BASE))
    stage = config.load(path).stage(None)
    assert stage.app.linked_files == ("local.py",) and stage.workers[0].gossip is False
    assert_safe(stage)


@BOUNDED
@given(document=mutated_documents())
def test_a_mutated_stage_loads_safe_or_is_a_config_error(tmp_path, document):
    path = tmp_path / "hosts.toml"
    path.write_text(document, encoding="utf-8")
    load_as_the_cli_does(path)


@BOUNDED
@given(content=whole_files)
def test_garbage_files_are_a_config_error(tmp_path, content):
    path = tmp_path / "hosts.toml"
    path.write_bytes(content)
    load_as_the_cli_does(path)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text_is_valid_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("any") / "hosts.toml"
    path.write_text(text, encoding="utf-8")
    load_as_the_cli_does(path)


@pytest.mark.parametrize("key, value, expected", [
    ("name", '"shop\\n"', "app name 'shop\\n' must start with a lowercase letter"),
    ("ref", '"main; rm -rf ~"', "stages.prod.app.ref: must be a git branch, tag or commit"),
    ("repo", '"--upload-pack=touch /tmp/x:y"', "git would read an option"),
    ("linked_dirs", '["."]', "must be a list of paths inside the release, got '.' in it"),
    ("deploy_to", '"/srv/shop%i"', "may hold only letters, digits"),
    ("keep_releases", "9" * 30, "must be a finite number of sane size"),
])
def test_a_hostile_value_is_named_with_its_key(key, value, expected):
    data = copy.deepcopy(BASE)
    data["stages"]["prod"]["app"][key] = Raw(value)
    with pytest.raises(DeployKitError) as info:
        config.parse(toml_document(data), Path("/x/hosts.toml"))
    assert expected in str(info.value) and info.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe\x00garbage", "is not UTF-8"),
    (b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deep"),
    (b"parallel = " + b"9" * 5000, "integer too long"),
    (toml_document(BASE).replace('"10.0.0.5"', '"10.0.0.5; $(reboot)"').encode(), "must be a host name or an IP"),
    (toml_document(BASE).replace('"~/.ssh/known_hosts"', '"~nosuchuser/kh"').encode(), "no such user's home"),
])
def test_the_command_line_says_one_line_and_exits_2(tmp_path, content, expected):
    path = tmp_path / "hosts.toml"
    path.write_bytes(content)
    proc = fab("hosts", config_file=path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr, proc.stderr
