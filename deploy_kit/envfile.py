"""The app's env file on each host (systemd EnvironmentFile=): its template, and edits that never
echo a secret.

Values travel only inside the SSH channel, in the program's stdin (never in a command line,
so never in `ps` or the journal) and are written by a small Python program on the host,
atomically, keeping the file root-owned, mode 0640, group-readable by the service group.
Showing the file transfers no value unless asked to: the host answers with "set/empty" and
a salted fingerprint, so hosts can be compared without revealing anything.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass

from deploy_kit import remote
from deploy_kit.config import App, Host, Stage
from deploy_kit.errors import UsageError
from deploy_kit.session import Session

REQUIRED_KEYS = ("DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@%+,=-]*\Z")


def template(app: App) -> str:
    keys = "".join(f"{key}=\n" for key in REQUIRED_KEYS)
    return (f"# Environment of {app.name}'s Celery services, loaded by systemd (EnvironmentFile=).\n"
            "# Holds secrets: root-owned, mode 0640. Edit with `fab env.set KEY=VALUE`,\n"
            "# `fab env.unset KEY`, and read with `fab env.show` (values masked).\n" + keys)


def parse_assignment(text: str) -> tuple[str, str | None]:
    """`KEY=VALUE` -> (KEY, VALUE); a bare `KEY` -> (KEY, None): the value is asked for."""
    key, sep, value = text.partition("=")
    key = key.strip()
    check_key(key)
    if not sep:
        return key, None
    check_value(key, value)
    return key, value


def check_key(key: str) -> None:
    if not _KEY.match(key):
        raise UsageError(f"{key!r} is not a valid variable name (letters, digits and '_', not "
                         "starting with a digit)")


def check_value(key: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"the value of {key} spans several lines; env files hold one line per "
                         "variable")


def render_line(key: str, value: str) -> str:
    """One EnvironmentFile line; quoted when the value holds anything but plain characters."""
    if _PLAIN.match(value):
        return f"{key}={value}"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'{key}="{escaped}"'


@dataclass(frozen=True)
class KeyState:
    set: bool
    fingerprint: str
    value: str | None = None


@dataclass(frozen=True)
class EditResult:
    missing_file: bool
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    absent: tuple[str, ...]
    keys: dict[str, KeyState]


def edit_program(app: App, *, set_values: dict[str, str] | None = None, unset: list[str] | None = None,
                 reveal: bool = False, salt: str | None = None) -> str:
    """The host program that applies the edits (or none, to read) and reports key states."""
    set_values = set_values or {}
    params = {
        "path": str(app.env_file),
        "group": app.group,
        "set": {k: _b64(render_line(k, v)) for k, v in set_values.items()},
        "values": {k: _b64(v) for k, v in set_values.items()},
        "unset": list(unset or []),
        "reveal": reveal,
        "salt": salt or secrets.token_hex(8),
    }
    return remote.program("envedit", params)


def parse_result(output: str) -> EditResult:
    data = json.loads(output)
    if data.get("error") == "missing":
        return EditResult(True, (), (), (), {})
    keys = {k: KeyState(bool(v["set"]), v["fingerprint"], v.get("value"))
            for k, v in ((k, data["keys"][k]) for k in data["order"])}
    return EditResult(False, tuple(data["changed"]), tuple(data["unchanged"]), tuple(data["absent"]), keys)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def edit(stage: Stage, hosts: list[Host] | None = None, *, set_values: dict[str, str] | None = None,
         unset: list[str] | None = None, reveal: bool = False) -> dict[str, EditResult]:
    """Apply the edits (or only read, when none are given) on every chosen host at once."""
    salt = secrets.token_hex(8)  # one salt for all hosts, so fingerprints compare across hosts
    program = edit_program(stage.app, set_values=set_values, unset=unset, reveal=reveal, salt=salt)
    with Session(stage, hosts) as session:
        results = session.each(
            lambda r: parse_result(r.run_python(program, str(stage.app.python), sudo=True,
                                                what="editing the env file", timeout=60).stdout),
            what="env file")
    missing = [name for name, result in results.items() if result.missing_file]
    if missing:
        raise UsageError(f"{stage.app.env_file} does not exist on {', '.join(missing)}. "
                         f"Fix: run `fab setup --stage {stage.name}` first")
    return results
