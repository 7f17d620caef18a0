"""What several host programs need, in one place: the env file's one reading rule, running a
command as the service (the unit's user, env file and sandbox), and `systemctl show`.

Also the deploy lock: taken with mkdir (atomic), its holder (`contracts.LockHolder`) in a file
beside it; a run releases it only while the holder carries that run's token.

Runs on hosts (Python 3.8+, stdlib only) and on the control machine alike: `fab env.show`,
`fab check` and the units themselves read an env file by the same rule.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def env_value(raw: str) -> str:
    """A value as systemd's EnvironmentFile= reads it: "double" (backslash escapes), 'single', or bare."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        out, i, body = [], 0, raw[1:-1]
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                i += 1
            out.append(body[i])
            i += 1
        return "".join(out)
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    return raw


def env_entries(lines: list) -> list:
    """(line number, key, value) of every assignment: blank lines and `#`/`;` comments skipped,
    `export KEY=...` read as KEY (systemd accepts it), the value unquoted."""
    found = []
    for number, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith(("#", ";")) or "=" not in text:
            continue
        key, value = text.split("=", 1)
        key = key.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        if _KEY.match(key):
            found.append((number, key, env_value(value)))
    return found


def env_values(text: str) -> dict:
    """KEY -> value of an env file's text (the last assignment of a key wins, as in systemd)."""
    return {key: value for _, key, value in env_entries(text.splitlines())}


def service_argv(properties: list, directory: str, argv: list, *, pipe: bool = True) -> list:
    """`systemd-run` running `argv` as the units run the app: their user, env file and sandboxing
    (`properties`: the units' [Service] settings), in `directory` instead of `current`."""
    props = []
    for setting in properties:
        if setting.startswith("WorkingDirectory="):
            setting = "WorkingDirectory=" + directory
        props += ["-p", setting]
    return ["systemd-run", "--quiet", "--wait", *(["--pipe"] if pipe else []), "--collect",
            "--service-type=exec", *props, "--", *argv]


def run(argv: list, stdin: str | None = None, timeout: float = 60) -> tuple:
    """(exit code, stdout, stderr); 127 when it could not run or did not end in time."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def as_service(properties: list, directory: str, argv: list, timeout: float = 60, runner=run) -> dict:
    """Run a program as the service; it prints `ok DETAIL` or `fail DETAIL` last: {ok, detail}."""
    code, out, err = runner(service_argv(properties, directory, argv), timeout=timeout)
    text = (out.strip() or err.strip() or "no output").splitlines()[-1]
    if text.startswith("ok "):
        return {"ok": True, "detail": text[3:]}
    return {"ok": False, "detail": text[5:] if text.startswith("fail ") else text, "exit_code": code}


def parse_show(text: str) -> dict:
    """`systemctl show -p A,B` output as {A: ..., B: ...}."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def show(unit: str, properties: str, runner=run) -> dict:
    _, out, _ = runner(["systemctl", "show", unit, "-p", properties])
    return parse_show(out)


def take_lock(state_dir: str, holder: dict) -> dict:
    """mkdir is atomic: exactly one deploy or rollback gets the lock; the others see its holder."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    lock = os.path.join(state_dir, "lock")
    try:
        os.mkdir(lock, 0o700)
    except FileExistsError:
        try:
            with open(os.path.join(lock, "holder.json")) as handle:
                found = json.load(handle)
        except (OSError, ValueError):
            found = {"who": "unknown (no holder file)"}
        return {"acquired": False, "holder": found}
    with open(os.path.join(lock, "holder.json"), "w") as handle:
        json.dump(holder, handle)
    return {"acquired": True, "holder": holder}
