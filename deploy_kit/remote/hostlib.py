"""What several host programs need, in one place: the env file's one reading rule, running a
command as the service (the unit's user, env file and sandbox), `systemctl show` and
`systemctl list-units`, and marking a release bad.

Also the deploy lock: taken with mkdir (atomic), its holder (`contracts.LockHolder`) in a file
beside it; a run releases it only while the holder carries that run's token (`fab unlock`
breaks it whoever holds it).

And what never lets a URL's credentials out (`url_secrets`, `hide`, `mask_url`), and the loader
that ships host modules inside one program text (`bundle`), here so a host program can ship
this module again to the Python it starts (the broker probe, the Celery agent).

Runs on hosts (Python 3.8+, stdlib only) and on the control machine alike: `fab env.show`,
`fab check` and the units themselves read an env file by the same rule.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from urllib.parse import quote, unquote, urlsplit

from deploy_kit.remote import contracts

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")

LOADER = '''import base64, json, sys, types, zlib
def _deploy_kit_load(sources):
    if isinstance(sources, str):  # compressed: json of [(name, source)], zlib, base85
        sources = json.loads(zlib.decompress(base64.b85decode(sources)).decode())
    for name in ("deploy_kit", "deploy_kit.remote"):
        package = sys.modules.setdefault(name, types.ModuleType(name))
        package.__path__ = []
    for name, source in sources:
        module = types.ModuleType("deploy_kit.remote." + name)
        module.__file__ = "<deploy-kit %s>" % name
        module.__source__ = source
        sys.modules[module.__name__] = module
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        setattr(sys.modules["deploy_kit.remote"], name, module)
    return module
'''

_ENCODE = "percent-encode them: / as %2F, # as %23, ? as %3F, @ as %40, ; as %3B"


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


def is_set(value: str) -> bool:
    """A key counts as set when its value holds more than blanks (`A=`, `A=""` and `A="  "` do not):
    `fab env.show` and `fab check` say the same of every key."""
    return bool(value.strip())


# How a shipped program (the probes, the release check, the Celery agent) runs as the service:
# `python -c READ_PROGRAM ARGS...`, its text as the first line of its stdin (`program_line`; what
# follows is its own input). Never the text on the command line: systemd-run writes that into a
# transient unit file that systemd reads again at every daemon-reload while it runs, and warns
# about what it cannot read back (a newline, a `;`, a `$`), line by line.
READ_PROGRAM = "exec(__import__('json').loads(__import__('sys').stdin.readline()))"


def program_line(text: str) -> str:
    return json.dumps(text) + "\n"


def service_argv(properties: list, directory: str, argv: list, *, pipe: bool = True) -> list:
    """`systemd-run` running `argv` as the units run the app: their user, env file and sandboxing
    (`properties`: the units' [Service] settings), in `directory` instead of `current`."""
    props = []
    for setting in properties:
        if setting.startswith("WorkingDirectory="):
            setting = "WorkingDirectory=" + directory
        props += ["-p", setting]
    # systemd substitutes $NAME and ${NAME} in a command line when it runs it: `$$` is a literal `$`
    # (a program passed with -c would otherwise lose every `${...}` in its text).
    return ["systemd-run", "--quiet", "--wait", *(["--pipe"] if pipe else []), "--collect",
            "--service-type=exec", *props, "--", *(arg.replace("$", "$$") for arg in argv)]


def run(argv: list, stdin: str | None = None, timeout: float = 60) -> tuple:
    """(exit code, stdout, stderr); 127 when it could not run or did not end in time."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, "", str(exc)
    return proc.returncode, proc.stdout, proc.stderr


def as_service(properties: list, directory: str, argv: list, timeout: float = 60, runner=None,
               stdin: str | None = None) -> dict:
    """Run a program as the service; it prints `ok DETAIL` or `fail DETAIL` last: {ok, detail}."""
    code, out, err = (runner or run)(service_argv(properties, directory, argv), stdin=stdin, timeout=timeout)
    text = (out.strip() or err.strip() or "no output").splitlines()[-1]
    if text.startswith("ok "):
        return {"ok": True, "detail": text[3:]}
    return {"ok": False, "detail": text[5:] if text.startswith("fail ") else text, "exit_code": code}


def parse_show(text: str) -> dict:
    """`systemctl show -p A,B` output as {A: ..., B: ...}."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def show(unit: str, properties: str, runner=None) -> dict:
    _, out, _ = (runner or run)(["systemctl", "show", unit, "-p", properties])
    return parse_show(out)


def parse_units(text: str) -> dict:
    """`systemctl list-units --plain --no-legend` output as {unit: its ACTIVE state}, in order."""
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            found[parts[0]] = parts[2]
    return found


def list_units(patterns: list, states: str = "", every: bool = True, runner=None) -> dict:
    """The units matching `patterns` ({unit: active state}); `every`: loaded but inactive ones too,
    `states`: only those in these states (`active,activating`)."""
    argv = ["systemctl", "list-units", "--plain", "--no-legend", *(["--all"] if every else []), *patterns]
    _, out, _ = (runner or run)(argv + ([f"--state={states}"] if states else []))
    return parse_units(out)


def append_line(path: str, line: str) -> None:
    """Append one line in one write, fsynced; after a line torn by a crash (no final newline),
    a newline first, so the torn line never merges with this one. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        torn = False
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                torn = handle.read(1) != b"\n"
        os.write(fd, (("\n" if torn else "") + line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_bad(release_dir: str, run_id: str, reason: str) -> bool:
    """Mark a release bad (`fab releases` shows it, cleanup and rollback skip it): its
    `.deploy-kit/BAD` holds when, which run and why. The first mark stays (it has the real reason);
    a release that is not on this host is left alone. True when this call wrote it."""
    if not os.path.isdir(release_dir):
        return False
    marker = os.path.join(release_dir, contracts.STATE_DIR, contracts.BAD)
    if os.path.exists(marker):
        return False
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as handle:
        json.dump({"when": time.time(), "id": run_id, "reason": reason}, handle)
    return True


def _lock_dir(state_dir: str) -> str:
    return os.path.join(state_dir, contracts.LOCK)


def read_lock(state_dir: str):
    """The lock's holder (`contracts.LockHolder`), None when it is not held; `LockHolder.unreadable`
    when its file is missing or torn."""
    lock = _lock_dir(state_dir)
    if not os.path.isdir(lock):
        return None
    try:
        with open(os.path.join(lock, contracts.LOCK_HOLDER)) as handle:
            return contracts.LockHolder.from_json(handle.read())
    except (OSError, ValueError, TypeError):  # being written this instant (`fresh`), or left by a run that died then
        try:
            fresh = time.time() - os.stat(lock).st_mtime < 10
        except OSError:
            fresh = False
        return contracts.LockHolder.unreadable(fresh)


def release_lock(state_dir: str, token: str) -> bool:
    """Remove the lock only while its holder carries `token` (a fencing token): a run that stalled
    and resumed never removes the lock of the run that came after it."""
    holder = read_lock(state_dir)
    if holder is None or not token or holder.token != token:
        return False
    shutil.rmtree(_lock_dir(state_dir), ignore_errors=True)
    return True


def break_lock(state_dir: str) -> bool:
    """Remove the lock whoever holds it (`fab unlock`, once the user confirmed); True if it was held."""
    lock = _lock_dir(state_dir)
    held = os.path.isdir(lock)
    shutil.rmtree(lock, ignore_errors=True)
    return held


def take_lock(state_dir: str, holder: dict) -> dict:
    """mkdir is atomic: exactly one deploy or rollback gets the lock; the others see its holder.
    `holder` and the answer's holder are `LockHolder.to_data()` (they travel as JSON)."""
    mine = contracts.LockHolder.from_data(holder)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    lock = _lock_dir(state_dir)
    try:
        os.mkdir(lock, 0o700)
    except FileExistsError:
        found = read_lock(state_dir) or contracts.LockHolder.unreadable()
        return {"acquired": False, "holder": found.to_data()}
    path = os.path.join(lock, contracts.LOCK_HOLDER)
    try:
        with open(path + ".tmp", "w") as handle:
            handle.write(mine.to_json())
        os.replace(path + ".tmp", path)
    except BaseException:  # a full disk: no lock without a holder (nobody could release it)
        shutil.rmtree(lock, ignore_errors=True)
        raise
    return {"acquired": True, "holder": mine.to_data()}


def bundle(sources: list, tail: str) -> str:
    """Python text that loads `sources` [(NAME, text)] as deploy_kit.remote.NAME, then runs `tail`
    (where `module` is the last of them): runs on a python3 that has no deploy_kit package."""
    packed = base64.b85encode(zlib.compress(json.dumps(sources).encode(), 9)).decode()
    return f"{LOADER}module = _deploy_kit_load({packed!r})\n{tail}"


def source_of(name: str) -> str:
    """The text of deploy_kit.remote.NAME (loaded already): as shipped in a program, or its file."""
    module = sys.modules["deploy_kit.remote." + name]
    shipped = getattr(module, "__source__", None)
    if shipped:
        return shipped
    with open(module.__file__) as handle:
        return handle.read()


def _split_url(url: str) -> tuple:
    """(`scheme://`, user info, the rest): the user info runs to the LAST `@`, so a password with
    an unencoded / # ? or @ is cut out whole (urlsplit would end it at the first / # or ?)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    return scheme + sep, userinfo if at else "", host if at else rest


def mask_url(url: str) -> str:
    """The URL with its whole user info (user and password) shown as `***`."""
    head, userinfo, rest = _split_url(url)
    return head + "***@" + rest if userinfo else url


SECRET_URLS = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DEPLOY_KIT_RABBITMQ_API")


def env_secrets() -> set:
    """The secrets in the URLs of this process's environment (the service's, under systemd-run)."""
    return set().union(*(url_secrets(os.environ.get(name, "")) for name in SECRET_URLS))


def url_secrets(url: str) -> set:
    """Every text that output must never show of a URL: its user info and its password, each raw,
    percent-decoded and percent-encoded (as a client library may print them); of the whole URL
    and of each of a failover list's (`URL;URL`, as Celery reads it)."""
    found = set()
    for one in {url, *url.split(";")}:
        userinfo = _split_url(one)[1]
        for part in (userinfo, userinfo.partition(":")[2]):
            found |= {form for raw in (part, unquote(part)) for form in (raw, quote(raw, safe=""))}
    return {secret for secret in found if secret}


def hide(text: str, secrets) -> str:
    """`text` with every secret replaced by `***`, the longest first (so no part of one is left)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def url_problem(url: str, name: str) -> str:
    """Why clients (urllib, kombu, redis-py) would misread the URL in variable `name` (each URL of
    a `URL;URL` failover list), or "". Never quotes the URL: what they misread is part of the password."""
    for one in url.split(";"):
        try:
            parts = urlsplit(one)
        except ValueError:
            return f"{name} is not a valid URL (if the password holds / # ? @ ; [ or ], {_ENCODE}, [ as %5B, ] as %5D)"
        if parts.netloc.rpartition("@")[0] != _split_url(one)[1]:
            return (f"the password of {name} holds an unencoded / # or ?, so Celery would read part of it as "
                    f"the host: {_ENCODE}")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            return f"the port of {name} is not a number (if the password holds / # ? ; or @, {_ENCODE})"
    return ""
