"""The flags every task shares, the help text that goes with them, and the reading of flag values."""

from collections.abc import Callable

from deploy_kit import config
from deploy_kit.config import Stage
from deploy_kit.errors import UsageError

STAGE_HELP = "stage of hosts.toml to act on (default: its default_stage, or its only stage)"


def load_stage(stage: str | None) -> Stage:
    return config.load().stage(stage)


def count(flag: str, value: object, what: str) -> int:
    """A flag's whole number (0 or more), read here so that a typo is a message, not a traceback."""
    text = str(value)
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{flag} takes a number of {what}, got {text!r}")
    return int(text)


def checked(flag: str, value: str | None, check: Callable[[str], str | None]) -> str | None:
    """A flag's value, or a UsageError naming the flag when `check` finds it wrong (before any host is reached)."""
    problem = check(value) if value is not None else None
    if problem:
        raise UsageError(f"{flag} {problem}")
    return value
