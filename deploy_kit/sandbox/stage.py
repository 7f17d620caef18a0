"""The sandbox stage in the configuration file: rendered from the booted hosts, kept in a marked block.

`sandbox.up` replaces only the block between its markers, so the user's own
stages and comments stay as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from deploy_kit.config import Host, SSHSettings

EXAMPLE_APP = Path("examples/exampleapp")


def begin_marker(name: str) -> str:
    return f"# >>> stage {name!r}: written by `fab sandbox.up`, replaced on each run; edit at will, " \
           "but edits are lost >>>"


def end_marker(name: str) -> str:
    return f"# <<< stage {name!r} <<<"


def repo_root() -> Path:
    """The deploy-kit checkout this code runs from; its example app is what the sandbox deploys."""
    return Path(__file__).resolve().parents[2]


def _toml(value: object) -> str:
    # JSON strings, numbers, booleans and lists of them are valid TOML values.
    return json.dumps(value)


BROKER_UNITS = {"redis": "redis-server.service", "rabbitmq": "rabbitmq-server.service"}


def render(name: str, hosts: Sequence[Host], ssh: SSHSettings, repo: Path, broker: str = "redis") -> str:
    lines = [
        begin_marker(name),
        f"[stages.{name}]",
        "",
        f"[stages.{name}.ssh]",
        f"known_hosts = {_toml(str(ssh.known_hosts))}",
        f"identity_file = {_toml(str(ssh.identity_file))}",
        f"connect_timeout = {_toml(ssh.connect_timeout)}",
    ]
    for host in hosts:
        lines += [
            "",
            f"[[stages.{name}.hosts]]",
            f"name = {_toml(host.name)}",
            f"address = {_toml(host.address)}",
            f"port = {host.port}",
            f"user = {_toml(host.user)}",
            f"roles = {_toml(list(host.roles))}",
        ]
    lines += [
        "",
        f"[stages.{name}.app]",
        'name = "exampleapp"',
        f"repo = {_toml(str(repo))}",
        'ref = "HEAD"',
        f"path = {_toml(str(EXAMPLE_APP))}",
        'celery_app = "exampleapp"',
        'deploy_to = "/srv/exampleapp"',
        'user = "exampleapp"',
        'group = "exampleapp"',
        'env_file = "/etc/exampleapp/exampleapp.env"',
        "keep_releases = 5",
        'requirements = "requirements.txt"',
        'python = "/usr/bin/python3"',
        "linked_dirs = []",
        "linked_files = []",
        'install = "wheels"',
        "",
        f"[[stages.{name}.workers]]",
        'name = "default"',
        'queues = ["celery"]',
        "concurrency = 2",
        "time_limit = 60",
        "",
        f"[[stages.{name}.workers]]",
        'name = "reports"',
        'queues = ["reports"]',
        "concurrency = 1",
        "time_limit = 120",
        "",
        f"[stages.{name}.verify]",
        'task = "celery.accumulate"',
        "timeout = 60",
        "",
        f"[stages.{name}.systemd]",
        f"broker_unit = {_toml(BROKER_UNITS[broker])}",
        end_marker(name),
    ]
    return "\n".join(lines) + "\n"


def write(config_file: Path, name: str, block: str) -> None:
    """Put `block` in place of the stage's previous block, or append it; atomically."""
    try:
        text = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ("# deploy-kit configuration: see hosts.example.toml for every key.\n"
                "# Add your own stages (staging, production, ...) next to the sandbox one.\n")
    text = replace_block(text, name, block)
    tmp = config_file.with_name(f".{config_file.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, config_file)


def replace_block(text: str, name: str, block: str) -> str:
    begin, end = begin_marker(name), end_marker(name)
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == begin]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == end]
    if starts and ends and ends[0] > starts[0]:
        return "".join(lines[:starts[0]]) + block + "".join(lines[ends[0] + 1:])
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "") + block
