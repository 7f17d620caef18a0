"""One sandbox host: an overlay on the base image, a network namespace, a veth link, a booted container.

Each step that creates something has its undo in `teardown`, which works from
what exists on the machine (mounts, namespaces, links, processes), not from what
we remember, so a crashed `sandbox.up` is cleaned up just as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deploy_kit.errors import SandboxError
from deploy_kit.sandbox.rootfs import RABBITMQ_USER, SSH_USER, is_mounted


@dataclass(frozen=True)
class Machine:
    name: str
    address: str
    gateway: str
    bridge: str
    state_dir: Path

    @property
    def netns(self) -> str:
        return f"dk-{self.name}"

    @property
    def veth(self) -> str:
        return f"dk-{self.name}"

    @property
    def root(self) -> Path:
        return self.state_dir / "root"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "nspawn.pid"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    @property
    def host_key(self) -> Path:
        return self.root / "etc/ssh/ssh_host_ed25519_key"

    # --- bring up -------------------------------------------------------------------------------

    def prepare(self, lowers: list[Path], authorized_key: str, password: str, broker: str = "redis") -> None:
        """Mount the overlay on the image (its layers, topmost first), make the host's identity
        (hostname, SSH host key, authorized key) and the configuration of the broker it serves
        (`broker`: "redis", "rabbitmq" or "none")."""
        for sub in ("upper", "work", "root"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={':'.join(map(str, lowers))},upperdir={self.state_dir / 'upper'},"
           f"workdir={self.state_dir / 'work'}",
           str(self.root), what=f"mounting the overlay of {self.name}")
        etc = self.root / "etc"
        (etc / "hostname").write_text(self.name + "\n")
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name}\n"
                                   f"{self.address}\t{self.name}\n::1\tlocalhost ip6-localhost\n")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{self.name}",
           "-f", str(self.host_key), what="generating the SSH host key")
        ssh_dir = self.root / "home" / SSH_USER / ".ssh"
        uid, gid = _ids(self.root, SSH_USER)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(authorized_key.strip() + "\n")
        os.chown(keys, uid, gid)
        keys.chmod(0o600)
        if broker == "rabbitmq":
            # The user exists from the first boot on (each host's database starts empty); the
            # management API (for `fab queues`) refreshes its counts every second instead of five.
            self._private_conf(etc / "rabbitmq" / "rabbitmq.conf", "rabbitmq",
                               f"loopback_users = none\ndefault_user = {RABBITMQ_USER}\ndefault_pass = {password}\n"
                               "default_user_tags.administrator = true\ncollect_statistics_interval = 1000\n")
        elif broker == "redis":
            self._private_conf(etc / "redis" / "sandbox.conf", "redis", f"bind * -::*\nrequirepass {password}\n")
        if broker != "rabbitmq" and (etc / "rabbitmq").is_dir():  # the image has it; this host serves none
            (etc / "systemd/system/rabbitmq-server.service").symlink_to("/dev/null")

    def _private_conf(self, path: Path, group: str, text: str) -> None:
        """A configuration file holding the broker's password: root:GROUP 0640."""
        path.write_text(text)
        os.chown(path, 0, _ids(self.root, group)[1])
        path.chmod(0o640)

    def plug_network(self) -> None:
        """A network namespace joined to the sandbox bridge by a veth pair; no default route."""
        sh("ip", "netns", "add", self.netns, what="creating the network namespace")
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns,
           what="creating the veth link")
        sh("ip", "link", "set", self.veth, "master", self.bridge, "up", what="plugging the veth link")
        sh("ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0",
           what="addressing the host")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up", what="raising eth0")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up", what="raising lo")

    def boot(self) -> subprocess.Popen[bytes]:
        """Start the container with systemd as PID 1, in its own session so it outlives us."""
        argv = ["systemd-nspawn", "--quiet", "-D", str(self.root), "--register=no", "--keep-unit",
                "-b", "-M", self.name, f"--network-namespace-path=/run/netns/{self.netns}",
                "--console=read-only"]
        preexec = None
        if Path("/run/systemd/system").is_dir():  # systemd is PID 1: give the container its own scope
            argv = ["systemd-run", "--scope", "--quiet", f"--unit=deploy-kit-{self.name}", "--", *argv]
        else:
            cgroups = self.cgroups()
            for directory in cgroups:
                directory.mkdir(parents=True, exist_ok=True)

            def preexec() -> None:  # in the child, before exec: move into the container's own cgroups
                for directory in cgroups:
                    (directory / "cgroup.procs").write_text(str(os.getpid()))

        with open(self.console_log, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, preexec_fn=preexec)
        self.pid_file.write_text(str(proc.pid))
        return proc

    def cgroups(self) -> list[Path]:
        """Where this container's cgroup tree lives when no systemd manages this machine.

        systemd-nspawn --keep-unit roots the container's cgroups at its own cgroup; containers
        started from one shell would share it and trample each other's units. Each gets its own.
        """
        base = Path("/sys/fs/cgroup")
        if (base / "cgroup.controllers").exists():  # unified hierarchy only
            roots = [base]
        else:  # hybrid or legacy: the named systemd hierarchy, plus the unified one when mounted
            roots = [p for p in (base / "unified", base / "systemd") if p.is_dir()]
        return [root / "deploy-kit" / self.name for root in roots]

    def wait_for_ssh(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SandboxError(f"{self.name}: the container stopped while booting:\n"
                                   f"{self.console_tail()}")
            try:
                with socket.create_connection((self.address, 22), timeout=1) as sock:
                    if sock.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SandboxError(f"{self.name}: sshd did not answer within {timeout:.0f} s:\n"
                           f"{self.console_tail()}")

    def public_host_key(self) -> str:
        key_type, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"{key_type} {key}"

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])

    # --- inspect and tear down --------------------------------------------------------------------

    def pid(self) -> int | None:
        """The pid of this host's systemd-nspawn, when it is running."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if _is_nspawn_of(pid, self.name) else None

    def teardown(self) -> None:
        """Power off and remove everything of this host; safe to call on a half-built host."""
        pid = self.pid() or _find_nspawn(self.name)
        if pid is not None:
            _stop(pid, self.name)
        # Whatever is still in the container's cgroups outlived its nspawn (a container whose
        # shutdown hung, a crashed `up`): kill it, or it would run on unseen.
        _kill_cgroup_members(self.cgroups())
        if is_mounted(self.root):
            sh("umount", str(self.root), what=f"unmounting {self.root}", check=False)
            if is_mounted(self.root):
                sh("umount", "-l", str(self.root), what=f"unmounting {self.root}")
        for directory in self.cgroups():
            _remove_cgroup(directory)
        if netns_exists(self.netns):
            sh("ip", "netns", "del", self.netns, what="removing the network namespace")
        if link_exists(self.veth):  # usually gone with the namespace that held its peer
            sh("ip", "link", "del", self.veth, what="removing the veth link", check=False)
            if link_exists(self.veth) and not _wait_gone(self.veth):
                raise SandboxError(f"{self.name}: the network link {self.veth} could not be removed")
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.state_dir)], check=False)


def sh(*argv: str, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise SandboxError(f"{what}: {argv[0]} is not installed. Fix: apt-get install "
                           "systemd-container debootstrap iproute2 openssh-client") from None
    if check and proc.returncode != 0:
        raise SandboxError(f"{what} failed: `{' '.join(argv)}` exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _remove_cgroup(directory: Path, timeout: float = 10) -> None:
    """Remove a cgroup tree bottom-up (cgroupfs directories go with rmdir once empty); the
    container's last processes may take a moment to leave it, so retry for a while."""
    deadline = time.monotonic() + timeout
    while directory.is_dir():
        for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                            reverse=True):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            directory.rmdir()
        if not directory.is_dir() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if directory.is_dir():
        raise SandboxError(f"the cgroup {directory} could not be removed (processes still in it?)")


def _wait_gone(link: str, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while link_exists(link):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return 0, int(fields[2])
    raise SandboxError(f"the base image has no user or group {user!r}; rebuild it "
                       "(delete the cache under /var/cache/deploy-kit/rootfs)")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_nspawn_of(pid: int, machine: str) -> bool:
    argv = _cmdline(pid)
    return bool(argv) and argv[0].endswith("systemd-nspawn") and "-M" in argv \
        and argv[argv.index("-M") + 1:argv.index("-M") + 2] == [machine]


def _find_nspawn(machine: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _is_nspawn_of(int(entry.name), machine):
            return int(entry.name)
    return None


def _stop(pid: int, machine: str, timeout: float = 20) -> None:
    """SIGTERM asks nspawn to power the container off cleanly; if that hangs, SIGKILL the
    container's init (which ends its whole PID namespace), then nspawn."""
    init = _children(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_nspawn_of(pid, machine):
            _reap(pid)
            return
        _reap(pid)
        time.sleep(0.1)
    for child in init:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        _reap(pid)
        if not _is_nspawn_of(pid, machine):
            return
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_cgroup_members(directories: list[Path], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = set()
        for directory in directories:
            if directory.is_dir():
                for procs in directory.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        members |= {int(p) for p in procs.read_text().split()}
        if not members:
            return
        for member in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signal.SIGKILL)
        time.sleep(0.2)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


