"""The rules a value of hosts.toml must follow, and the typed reader of one table (`_Table`).

Each rule returns None when the value is fine, or what is wrong with it in the user's terms.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from deploy_kit.config import ROLES
from deploy_kit.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}\Z")
_POSIX_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?\Z")
_QUEUE = re.compile(r"^[A-Za-z0-9_.:-]+\Z")
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_ADDRESS = re.compile(r"^[A-Za-z0-9_.:][A-Za-z0-9_.:-]*\Z")  # a DNS name, an IPv4 or IPv6 address
_LOGIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]*\Z")
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./~^@+-]*\Z")  # what `git rev-parse` reads, HEAD~1 too
_SECRET_KEY = re.compile(r"(pass|secret|token|credential|broker_url|_url$|api_key|private)", re.I)
# A password in any URL; over HTTP(S) any user name too (there it is a token: `https://TOKEN@host/...`).
_URL_WITH_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]+@|https?://[^/@\s]+@)", re.I)


class _Problems:
    def __init__(self, file: Path):
        self.file = file
        self.items: list[str] = []

    def add(self, key_path: str, message: str) -> None:
        self.items.append(f"{key_path}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise ConfigError(f"{self.file}: {self.items[0]}")
        listing = "\n".join(f"  - {item}" for item in self.items)
        raise ConfigError(f"{self.file}: {len(self.items)} problems:\n{listing}")


_MISSING = object()


class _Table:
    """One TOML table being read: hands out typed values and reports what is wrong with them."""

    def __init__(self, data: Any, path: str, problems: _Problems, origins: Mapping[str, str] | None = None):
        self.path = path
        self.problems = problems
        self.origins = dict(origins or {})
        self.seen: set[str] = set()
        if not isinstance(data, dict):
            problems.add(path, f"must be a table, got {_describe(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def where(self, key: str) -> str:
        base = self.origins.get(key, self.path)
        return f"{base}.{key}" if base else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *,
            check: Callable[[Any], str | None] | None = None, hint: str = "") -> Any:
        """The value at `key`; None (after reporting) when missing or wrong."""
        self.seen.add(key)
        if key not in self.data:
            if default is _MISSING:
                fix = f" Fix: add {key} = {hint}" if hint else ""
                self.problems.add(self.where(key), f"required key is missing.{fix}")
                return None
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.problems.add(self.where(key), f"expected {expected}, got {_describe(value)}")
            return None
        if isinstance(value, int | float) and not -2**63 <= value < 2**63:  # nan compares false too
            self.problems.add(self.where(key), f"must be a finite number of sane size, got {_describe(value)}")
            return None
        if check is not None:
            message = check(value)
            if message:
                self.problems.add(self.where(key), message)
                return None
        return value

    def unknown_keys(self, allowed: tuple[str, ...] | None = None) -> None:
        known = set(allowed) if allowed is not None else self.seen
        for key in self.data:
            if key in known:
                continue
            message = "unknown key."
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            if close:
                message += f" Did you mean {close[0]!r}?"
            elif _SECRET_KEY.search(key):
                message += (" Secrets never go in hosts.toml: keep them in the env file on the hosts "
                            f"(`fab env.set {key.upper()}=...`).")
            else:
                message += f" Known keys here: {', '.join(sorted(known))}."
            self.problems.add(self.where(key), message)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def _merge(defaults: Any, own: Any, default_path: str, own_path: str) -> tuple[Any, dict[str, str]]:
    """A stage's table merged over the shared one, with the key path each value came from."""
    if not isinstance(defaults, dict) or not isinstance(own, dict):
        chosen = own if own is not None else defaults
        return chosen, {}
    merged = dict(defaults)
    origins = {key: default_path for key in defaults}
    for key, value in own.items():
        merged[key] = value
        origins[key] = own_path
    return merged, origins


# --- value checks: each returns a message, or None when the value is fine --------------------------

def _name_check(what: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if _NAME.match(value):
            return None
        suggestion = re.sub(r"[^a-z0-9_-]+", "-", value.lower()).strip("-_") or "myapp"
        if not suggestion[0].isalpha():
            suggestion = "x" + suggestion
        return (f"{what} {value!r} must start with a lowercase letter and hold only a-z, 0-9, '-' "
                f"and '_' (it names units and paths); for example {suggestion[:40]!r}")
    return check


_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+\Z")


def _absolute(value: str) -> str | None:
    path = PurePosixPath(value)
    if not path.is_absolute():
        return f"must be an absolute path, got {value!r}. Fix: write it as {'/' + value.lstrip('./')!r}"
    if path == PurePosixPath("/") or ".." in path.parts:
        return f"must be an absolute path of its own, not / and without '..', got {value!r}"
    if not _SAFE_PATH.match(value):
        # It ends up in unit files (where % and spaces mean something) and shell scripts.
        return (f"may hold only letters, digits and . _ / + - (it goes into systemd units and scripts), "
                f"got {value!r}")
    return None


def _service_account(what: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value == "root" or value == "0":
            return (f"the service {what} must not be root (a compromised task would own the host). "
                    "Fix: use a dedicated account such as the app's name")
        if not _POSIX_NAME.match(value):
            return (f"{value!r} is not a valid {what} name: use lowercase letters, digits, '-' and '_', "
                    "starting with a letter, at most 32 characters")
        return None
    return check


def _positive(value: int | float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _at_least(minimum: int, why: str) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if value >= minimum else f"must be at least {minimum} ({why}), got {value}"
    return check


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"must be a TCP port between 1 and 65535, got {value}"


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _local_file(value: str) -> str | None:
    """A path on this machine, `~` or `~user` allowed."""
    try:
        Path(value).expanduser()
    except RuntimeError:
        return f"{value!r} starts with ~user, but this machine has no such user's home"
    return _not_empty(value)


def _address(value: str) -> str | None:
    if _ADDRESS.match(value):
        return None
    return f"must be a host name or an IP address, such as '203.0.113.10', got {value!r}"


def _login(value: str) -> str | None:
    if _LOGIN.match(value):
        return None
    return f"must be an SSH login name (letters, digits, '.', '_', '@' and '-'), got {value!r}"


def _ref(value: str) -> str | None:
    if _REF.match(value) and ".." not in value:
        return None
    return (f"must be a git branch, tag or commit (letters, digits and . _ / ~ ^ @ + -, not starting "
            f"with '-', no '..'), got {value!r}")


def _module(value: str) -> str | None:
    if _MODULE.match(value):
        return None
    return f"must be a Python import path as given to `celery -A`, such as 'myproject', got {value!r}"


def _repo(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if _URL_WITH_PASSWORD.match(value):
        return ("holds a password or token; secrets never go in hosts.toml. Fix: use an SSH URL "
                "with a deploy key, or a git credential helper")
    if value.startswith("-"):
        return f"must be a git URL or a path, not start with '-' (git would read an option), got {value!r}"
    return _local_file(value)


def _loglevel(value: str) -> str | None:
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    return None if value.upper() in levels else f"must be one of {', '.join(levels)}, got {value!r}"


def _string_list(what: str, pattern: re.Pattern[str] | None = None) -> Callable[[list[Any]], str | None]:
    def check(value: list[Any]) -> str | None:
        if not value:
            return f"must list at least one {what}"
        for item in value:
            if not isinstance(item, str) or not item:
                return f"must be a list of {what} names (strings), got {_describe(item)} in it"
            if pattern is not None and not pattern.match(item):
                return f"{item!r} is not a valid {what} name (letters, digits, '.', '_', ':' and '-')"
        if len(set(value)) != len(value):
            return f"lists the same {what} twice"
        return None
    return check


def _relative_paths(value: list[Any]) -> str | None:
    for item in value:
        if not isinstance(item, str) or not PurePosixPath(item).parts:
            return f"must be a list of paths inside the release, got {_describe(item)} in it"
        if item.startswith("/") or ".." in PurePosixPath(item).parts:
            return f"{item!r} must be relative to the release (it is linked to the same path under shared/)"
        if not _SAFE_PATH.match(item):
            return (f"{item!r} holds characters a path in a shell script or unit file would need quoting for; "
                    "use letters, digits and . _ / + - only")
    return None


def _roles(value: list[Any]) -> str | None:
    message = _string_list("role")(value)
    if message:
        return message
    for role in value:
        if role not in ROLES:
            close = difflib.get_close_matches(role, ROLES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"unknown role {role!r}{hint} (roles: {', '.join(ROLES)})"
    return None
