"""The errors deploy-kit raises, each saying what went wrong in the user's terms.

Every error carries the exit code the command line ends with, so the task layer
turns any of them into one message and a documented exit status, never a
traceback:

    DeployKitError              base; exit code 1
    ├── ConfigError             hosts.toml is missing or invalid; exit code 2
    ├── UsageError              a bad flag or argument on the command line; exit code 2
    ├── HostError               one host could not be reached or a command failed; exit code 7
    │   ├── ConnectError        SSH could not connect or the host key is unknown/wrong
    │   ├── SudoError           the SSH user cannot sudo without a password
    │   └── RemoteCommandError  a remote command exited non-zero (host, command, code, output tail)
    ├── HostsFailed             several hosts failed; lists each host's outcome; exit code 7
    ├── ReleaseError            the release could not be made here (git); exit code 9
    │   └── WheelError          the wheels for the hosts could not be fetched
    ├── PreflightFailed         a `fab check` check failed; nothing was changed; exit code 3
    ├── Locked                  another deploy, rollback or setup holds the lock; exit code 4
    ├── DeployFailed            the cutover failed; exit code 5 (every host back) or 6 (not)
    └── SandboxError            the sandbox hosts could not be booted or torn down; exit code 8

Exit codes reserved for later phases are listed in EXIT_CODES so that the README
and `--help` texts read them from one place.
"""

from __future__ import annotations

from collections.abc import Mapping

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_PREFLIGHT = 3
EXIT_LOCKED = 4
EXIT_ROLLED_BACK = 5
EXIT_ROLLBACK_FAILED = 6
EXIT_HOST = 7
EXIT_SANDBOX = 8
EXIT_RELEASE = 9

EXIT_CODES: Mapping[int, str] = {
    EXIT_OK: "success",
    EXIT_ERROR: "unexpected error",
    EXIT_CONFIG: "invalid configuration or command-line usage",
    EXIT_PREFLIGHT: "a preflight check failed; nothing was changed",
    EXIT_LOCKED: "another deploy, rollback or setup holds the lock",
    EXIT_ROLLED_BACK: "the deploy failed and every host was rolled back",
    EXIT_ROLLBACK_FAILED: "the deploy failed and the rollback failed too: act now",
    EXIT_HOST: "a host could not be reached or a remote command failed",
    EXIT_SANDBOX: "the sandbox hosts could not be booted or torn down",
    EXIT_RELEASE: "the release could not be made on this machine (git, wheels); nothing was changed",
}


class DeployKitError(Exception):
    """Base of every error deploy-kit raises on purpose."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(DeployKitError):
    """The configuration file is missing, unreadable or invalid."""

    exit_code = EXIT_CONFIG


class UsageError(DeployKitError):
    """A flag or argument given on the command line makes no sense."""

    exit_code = EXIT_CONFIG


class HostError(DeployKitError):
    """Something failed on, or on the way to, one host."""

    exit_code = EXIT_HOST

    def __init__(self, host: str, message: str):
        super().__init__(f"{host}: {message}")
        self.host = host
        self.reason = message


class ConnectError(HostError):
    """SSH could not connect, authenticate, or trust the host key."""


class SudoError(HostError):
    """The SSH user cannot use sudo without a password on the host."""


class RemoteCommandError(HostError):
    """A command run on a host exited with a non-zero status."""

    def __init__(self, host: str, what: str, exit_code: int, output: str):
        tail = "\n".join(output.strip().splitlines()[-15:])
        detail = f"{what} failed with exit code {exit_code}"
        if tail:
            detail += ":\n" + _indent(tail)
        super().__init__(host, detail)
        self.what = what
        self.remote_exit_code = exit_code
        self.output = output


class HostsFailed(DeployKitError):
    """One or more hosts failed while others may have succeeded."""

    exit_code = EXIT_HOST

    def __init__(self, what: str, failures: Mapping[str, BaseException], succeeded: list[str]):
        lines = [f"{what} failed on {len(failures)} host(s):"]
        for host, error in failures.items():
            reason = error.reason if isinstance(error, HostError) else str(error)
            lines.append(f"  {host}: {reason}")
        if succeeded:
            lines.append(f"  succeeded on: {', '.join(succeeded)}")
        super().__init__("\n".join(lines))
        self.failures = dict(failures)
        self.succeeded = list(succeeded)


class PreflightFailed(DeployKitError):
    """A preflight check failed on some host; nothing was changed."""

    exit_code = EXIT_PREFLIGHT


class ReleaseError(DeployKitError):
    """The release could not be made from the repository (git, wheel download); nothing changed."""

    exit_code = EXIT_RELEASE


class WheelError(ReleaseError):
    """The wheels for the hosts could not be fetched."""


class Locked(DeployKitError):
    """Another deploy or rollback holds the lock."""

    exit_code = EXIT_LOCKED


class DeployFailed(DeployKitError):
    """The cutover failed; `rolled_back` says whether every host is back where it was (exit 5) or
    not (exit 6: act now)."""

    def __init__(self, message: str, rolled_back: bool):
        super().__init__(message)
        self.rolled_back = rolled_back
        self.exit_code = EXIT_ROLLED_BACK if rolled_back else EXIT_ROLLBACK_FAILED


class SandboxError(DeployKitError):
    """The sandbox hosts could not be booted, inspected or torn down."""

    exit_code = EXIT_SANDBOX


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())
