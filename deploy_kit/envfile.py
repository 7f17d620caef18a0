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

from deploy_kit.config import App, Host, Stage
from deploy_kit.errors import UsageError
from deploy_kit.session import Session

REQUIRED_KEYS = ("DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN = re.compile(r"^[A-Za-z0-9_./:@%+,=-]*$")


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


# Runs on the host as root. Prints JSON with key names and fingerprints only.
EDIT_PROGRAM = r'''
import base64, grp, hashlib, json, os, sys, tempfile
P = json.loads(PARAMS)
path, group = P["path"], P["group"]
def decode(v):
    return base64.b64decode(v).decode()
def parse_value(raw):
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        out, i, body = [], 0, raw[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                i += 1
            out.append(body[i]); i += 1
        return "".join(out)
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    return raw
try:
    with open(path) as fh:
        lines = fh.read().splitlines()
except FileNotFoundError:
    print(json.dumps({"error": "missing"})); sys.exit(0)
values, index = {}, {}
for n, line in enumerate(lines):
    s = line.strip()
    if s and not s.startswith(("#", ";")) and "=" in s:
        k, v = s.split("=", 1)
        k = k.strip()
        if k.startswith("export "):
            k = k[7:].strip()
        values[k] = parse_value(v)
        index.setdefault(k, []).append(n)
result = {"changed": [], "unchanged": [], "absent": []}
drop = set()
for key, line in P.get("set", {}).items():
    new = decode(P["values"][key])
    if key in index:
        if values[key] == new and len(index[key]) == 1:
            result["unchanged"].append(key); continue
        lines[index[key][0]] = decode(line)
        drop.update(index[key][1:])
    else:
        lines.append(decode(line))
    result["changed"].append(key)
for key in P.get("unset", []):
    if key in index:
        drop.update(index[key]); result["changed"].append(key)
    else:
        result["absent"].append(key)
if result["changed"]:
    text = "\n".join(l for n, l in enumerate(lines) if n not in drop) + "\n"
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".env.")
    try:
        os.fchown(fd, 0, grp.getgrnam(group).gr_gid)
        os.fchmod(fd, 0o640)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush(); os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp); raise
show = {}
for key, value in values.items():
    if key in P.get("unset", []) and key in result["changed"]:
        continue
    show[key] = value
for key in P.get("set", {}):
    show[key] = decode(P["values"][key])
report = {}
for key, value in show.items():
    entry = {"set": bool(value), "fingerprint": hashlib.sha256((P["salt"] + value).encode()).hexdigest()[:10]}
    if P.get("reveal"):
        entry["value"] = value
    report[key] = entry
result["keys"] = report
result["order"] = list(show)
print(json.dumps(result))
'''


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
    return f"PARAMS = {json.dumps(json.dumps(params))}\n{EDIT_PROGRAM}"


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
