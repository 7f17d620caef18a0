"""SSH to the hosts of a stage: one verified Fabric connection per host, and batched remote scripts.

Fabric's Connection trusts any host key by default (AutoAddPolicy, no known_hosts);
deploy-kit never does: every connection loads the stage's known_hosts file and
rejects unknown or changed keys. Each phase sends its commands as one shell
script over the connection it already holds, so a phase costs one round trip.
"""

from __future__ import annotations

import select
import shlex
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fabric
import paramiko

from deploy_kit.config import Host, SSHSettings
from deploy_kit.errors import ConnectError, HostError, RemoteCommandError, SudoError

SCRIPT_PREAMBLE = "set -euo pipefail\nexport LC_ALL=C.UTF-8\n"
DEAD_AFTER = 30  # seconds of unacknowledged data after which a silent host's connection is dead


@dataclass(frozen=True)
class ScriptResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class RemoteHost:
    """An open, host-key-verified SSH connection to one host of a stage."""

    def __init__(self, host: Host, connection: fabric.Connection):
        self.host = host
        self.connection = connection

    @property
    def name(self) -> str:
        return self.host.name

    def run_script(self, script: str, *, sudo: bool = False, what: str = "remote script",
                   timeout: float | None = 600, check: bool = True,
                   on_line: Callable[[str], None] | None = None,
                   on_err_line: Callable[[str], bool] | None = None) -> ScriptResult:
        """Run `script` with bash on the host in one round trip (the script travels on stdin,
        so nothing in it shows up in the remote process list); `on_line` sees each line of its
        output as it arrives, `on_err_line` each line of its standard error (a line it takes,
        returning True, is left out of the result's stderr)."""
        command = "/bin/bash -s" if not sudo else "sudo -n -- /bin/bash -s"
        return self.run(command, SCRIPT_PREAMBLE + script, sudo=sudo, what=what, timeout=timeout,
                        check=check, on_line=on_line, on_err_line=on_err_line)

    def run_python(self, program: str, python: str = "/usr/bin/python3", *, sudo: bool = False,
                   what: str = "remote probe", timeout: float | None = 600,
                   check: bool = True) -> ScriptResult:
        """Run a Python program on the host in one round trip (the program travels on stdin)."""
        command = f"{quote(python)} -" if not sudo else f"sudo -n -- {quote(python)} -"
        return self.run(command, program, sudo=sudo, what=what, timeout=timeout, check=check)

    def run(self, command: str, stdin: str | bytes, *, sudo: bool, what: str, timeout: float | None,
            check: bool = True, on_line: Callable[[str], None] | None = None,
            on_err_line: Callable[[str], bool] | None = None) -> ScriptResult:
        """Run `command` with `stdin` as its input, in one round trip; RemoteCommandError on failure."""
        payload = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            code, out, err = _exec(self.connection.transport, command, payload, timeout, on_line, on_err_line)
        except TimeoutError:
            raise HostError(self.name, f"{what} did not finish within {timeout:.0f} s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            raise HostError(self.name, f"{what}: the SSH connection failed: {reason}") from None
        result = ScriptResult(code, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and code != 0:
            if sudo and code == 1 and "sudo:" in result.stderr and "password" in result.stderr:
                raise SudoError(self.name, f"sudo asks {self.host.user} for a password. Fix: allow "
                                "that user passwordless sudo (NOPASSWD) on this host")
            raise RemoteCommandError(self.name, what, code, result.stderr or result.stdout)
        return result

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> RemoteHost:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(host: Host, ssh: SSHSettings) -> RemoteHost:
    """Open one SSH connection to `host`, trusting only keys in the stage's known_hosts file."""
    known_hosts = Path(ssh.known_hosts)
    if not known_hosts.is_file():
        raise ConnectError(host.name, f"the known_hosts file {known_hosts} does not exist, so the "
                           "host key cannot be checked. Fix: set ssh.known_hosts in hosts.toml to a "
                           "file that holds this host's key")
    connect_kwargs: dict[str, object] = {"banner_timeout": ssh.connect_timeout,
                                         "auth_timeout": ssh.connect_timeout}
    if ssh.identity_file is not None:
        if not Path(ssh.identity_file).is_file():
            raise ConnectError(host.name, f"the identity file {ssh.identity_file} does not exist. "
                               "Fix: correct ssh.identity_file in hosts.toml")
        connect_kwargs.update(key_filename=str(ssh.identity_file), look_for_keys=False,
                              allow_agent=False)
    config = fabric.Config(ssh_config=paramiko.SSHConfig())  # never read ~/.ssh/config
    connection = fabric.Connection(host.address, user=host.user, port=host.port, config=config,
                                   connect_kwargs=connect_kwargs)
    client = connection.client
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.load_host_keys(str(known_hosts))
    except (OSError, paramiko.SSHException) as exc:
        raise ConnectError(host.name, f"cannot read known_hosts file {known_hosts}: {exc}") from None
    sock = _tcp_connect(host, ssh.connect_timeout)
    connection.connect_kwargs["sock"] = sock
    try:
        connection.open()
    except paramiko.BadHostKeyException as exc:
        sock.close()
        raise ConnectError(host.name, f"the host key of {host.address} does NOT match the one in "
                           f"{known_hosts} (got {exc.key.get_name()} "
                           f"{exc.key.fingerprint}). This may be an attack or a reinstalled "
                           "host. Fix: verify the new key out of band, then replace its line "
                           "in known_hosts") from None
    except paramiko.SSHException as exc:
        sock.close()
        text = str(exc)
        if "not found in known_hosts" in text:
            raise ConnectError(host.name, f"the host key of {_hostport(host)} is not in {known_hosts}. "
                               "Fix: check the key's fingerprint out of band, then add it, e.g. "
                               f"`ssh-keyscan -p {host.port} {host.address} >> {known_hosts}`") from None
        if isinstance(exc, paramiko.AuthenticationException):
            key = f" with {ssh.identity_file}" if ssh.identity_file else ""
            raise ConnectError(host.name, f"SSH authentication failed for {host.user}{key}. Fix: "
                               "install the public key in that user's ~/.ssh/authorized_keys") from None
        raise ConnectError(host.name, f"SSH handshake with {_hostport(host)} failed: {text}") from None
    except (OSError, EOFError) as exc:
        sock.close()
        raise ConnectError(host.name, f"SSH handshake with {_hostport(host)} failed: {exc}") from None
    # Keepalives notice a host that vanished without closing the connection.
    connection.transport.set_keepalive(15)
    return RemoteHost(host, connection)


def _hostport(host: Host) -> str:
    return f"{host.address}:{host.port}"


def _tcp_connect(host: Host, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host.address, host.port), timeout=timeout)
    except TimeoutError:
        raise ConnectError(host.name, f"{_hostport(host)} did not answer within {timeout:.0f} s "
                           "(host down or a firewall drops SSH)") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConnectError(host.name, f"cannot reach {_hostport(host)}: {reason}. Fix: check the "
                           "address and port in hosts.toml and that sshd runs there") from None
    # Paramiko leaves Nagle on; small SSH packets then wait for ACKs (measured 64 ms -> 22 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A host that stops answering without closing TCP is given up within about 45 s: SSH
    # keepalives (every 15 s) that stay unacknowledged for DEAD_AFTER, or TCP keepalives on an idle link.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                          ("TCP_USER_TIMEOUT", DEAD_AFTER * 1000)):
        if hasattr(socket, option):  # Linux; elsewhere the SSH keepalives and phase timeouts remain
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def _exec(transport: paramiko.Transport, command: str, stdin: bytes, timeout: float | None,
          on_line: Callable[[str], None] | None = None,
          on_err_line: Callable[[str], bool] | None = None) -> tuple[int, bytes, bytes]:
    channel = transport.open_session(timeout=30)
    out, err = _Lines(on_line), _Lines(on_err_line)
    try:
        channel.exec_command(command)
        channel.sendall(stdin)
        channel.shutdown_write()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while channel.recv_ready():
                out.add(channel.recv(65536))
            while channel.recv_stderr_ready():
                err.add(channel.recv_stderr(65536))
            if channel.exit_status_ready() and channel.eof_received:
                break
            if channel.closed or not transport.is_active():  # the connection died under us
                raise EOFError("the connection closed before the command finished")
            wait = 1.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError
            select.select([channel], [], [], wait)
        while channel.recv_ready():  # what arrived with the end of the command
            out.add(channel.recv(65536))
        while channel.recv_stderr_ready():
            err.add(channel.recv_stderr(65536))
        return channel.recv_exit_status(), out.end(), err.end()
    finally:
        channel.close()


class _Lines:
    """One output stream of a command: each complete line goes to `see` as it arrives (a line
    `see` takes, returning True, is not kept); what is kept is the stream's text."""

    def __init__(self, see: Callable[[str], bool | None] | None):
        self.see, self.kept, self.pending = see, bytearray(), bytearray()

    def add(self, data: bytes) -> None:
        if self.see is None:
            self.kept += data
            return
        self.pending += data
        if b"\n" in self.pending:
            end = self.pending.rindex(b"\n") + 1
            self._give(bytes(self.pending[:end]))
            del self.pending[:end]

    def _give(self, data: bytes) -> None:
        assert self.see is not None
        for raw in data.splitlines(keepends=True):  # bytes: only \n, \r and \r\n end a line
            if not self.see(raw.decode(errors="replace").rstrip("\r\n")):
                self.kept += raw

    def end(self) -> bytes:
        if self.see is not None and self.pending:
            self._give(bytes(self.pending))
            self.pending.clear()
        return bytes(self.kept)


def quote(value: object) -> str:
    """Quote one value for the remote shell."""
    return shlex.quote(str(value))
