"""Sandbox hosts: real Debian 12 machines booted on this one with systemd-nspawn, for demos and tests.

A sandbox called NAME holds hosts NAME1..NAMEn. Each is a container with systemd
as PID 1, sshd, journald and a broker (redis, or rabbitmq-server with
`broker="rabbitmq"`) on the first host, in its own network namespace, joined by a
veth pair to a bridge on this machine (10.199.K.0/24; this machine is .1, host i
is .10+i). `up` writes a stage called NAME into the configuration file, with a
dedicated SSH key and a known_hosts holding the hosts' real keys. `down` removes
every process, mount, namespace and link it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy_kit import parallel
from deploy_kit.config import Host, SSHSettings
from deploy_kit.errors import ConnectError, DeployKitError, SandboxError, UsageError
from deploy_kit.sandbox import rootfs, stage
from deploy_kit.sandbox.machine import Machine, link_exists, netns_exists, sh
from deploy_kit.sandbox.rootfs import RABBITMQ_USER
from deploy_kit.ssh import connect

STATE_ROOT = Path(os.environ.get("DEPLOY_KIT_SANDBOX_DIR", "/var/lib/deploy-kit/sandbox"))
DEFAULT_NAME = "sandbox"
BROKERS = ("redis", "rabbitmq")
MAX_HOSTS = 20
SUBNET = "10.199.{index}.0/24"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,8}\Z")

Say = Callable[[str], None]


@dataclass(frozen=True)
class HostStatus:
    name: str
    address: str
    running: bool
    ssh: str
    systemd: str


class Sandbox:
    """The sandbox called `name` and the files that describe it on this machine."""

    def __init__(self, name: str = DEFAULT_NAME, state_root: Path | None = None):
        if not _NAME.match(name):
            raise UsageError(f"sandbox name {name!r} must be 1-9 lowercase letters or digits, "
                             "starting with a letter (it names hosts and network links)")
        self.name = name
        self.dir = (state_root or STATE_ROOT) / name

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def identity_file(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def redis_password_file(self) -> Path:
        """The broker's password, Redis's or RabbitMQ's (the file kept its first name)."""
        return self.dir / "redis-password"

    @property
    def broker(self) -> str:
        """The broker of the stage: "redis" (the default) or "rabbitmq"."""
        try:
            return str(json.loads(self.state_file.read_text()).get("broker", "redis"))
        except (OSError, ValueError):
            return "redis"

    @property
    def bridge(self) -> str:
        return f"dkbr-{self.name}"

    def ssh_settings(self) -> SSHSettings:
        return SSHSettings(known_hosts=self.known_hosts, identity_file=self.identity_file,
                           connect_timeout=10.0)

    def broker_url(self, db: int = 0) -> str:
        """The URL of the broker on the first host (holds the password: never print it); `db` is
        Redis's database number (RabbitMQ's sandbox has one virtual host, `/`)."""
        first, password = self.machines()[0], self.redis_password_file.read_text().strip()
        if self.broker == "rabbitmq":
            return f"amqp://{RABBITMQ_USER}:{password}@{first.address}:5672//"
        return f"redis://:{password}@{first.address}:6379/{db}"

    def machines(self) -> list[Machine]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        gateway = state["gateway"]
        return [Machine(name=h["name"], address=h["address"], gateway=gateway, bridge=self.bridge,
                        state_dir=self.dir / "hosts" / h["name"]) for h in state["hosts"]]

    def is_up(self) -> bool:
        return any(m.pid() for m in self.machines())

    def hosts(self) -> list[Host]:
        roles = [("worker", "beat", "migrate")] + [("worker",)] * MAX_HOSTS
        return [Host(name=m.name, address=m.address, user=rootfs.SSH_USER, roles=r)
                for m, r in zip(self.machines(), roles, strict=False)]

    # --- up ---------------------------------------------------------------------------------------

    def up(self, count: int, config_file: Path, say: Say, repo_root: Path | None = None,
           broker: str = "redis") -> list[Host]:
        """Boot `count` fresh hosts and write the stage; on any failure leave nothing behind."""
        if not 1 <= count <= MAX_HOSTS:
            raise UsageError(f"--hosts must be between 1 and {MAX_HOSTS}, got {count}")
        if broker not in BROKERS:
            raise UsageError(f"--broker must be one of {', '.join(BROKERS)}, got {broker!r}")
        require_host_machine()
        if self.state_file.exists() or self._leftovers():
            say(f"sandbox {self.name!r} exists: tearing it down first so every host starts clean")
            self.down(say)
        lowers = rootfs.ensure_layers(("rabbitmq",) if broker == "rabbitmq" else (), say)
        try:
            self._create(count, lowers, broker, say)
            hosts = self.hosts()
            say(f"writing stage {self.name!r} to {config_file}")
            stage.write(config_file, self.name, stage.render(self.name, hosts, self.ssh_settings(),
                                                             repo_root or stage.repo_root(), broker))
            return hosts
        except BaseException as exc:
            say("boot failed: removing what was made")
            try:
                self.down(lambda _msg: None)
            except DeployKitError as cleanup:
                raise SandboxError(f"{exc}\nand the clean-up failed too: {cleanup}") from None
            raise

    def _create(self, count: int, lowers: list[Path], broker: str, say: Say) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        with open(self.dir.parent / ".subnets.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two sandboxes booting at once never take one subnet
            index = self._free_subnet()
            net = ipaddress.ip_network(SUBNET.format(index=index))
            gateway = str(net.network_address + 1)
            names = [f"{self.name}{i}" for i in range(1, count + 1)]
            state = {"name": self.name, "subnet": str(net), "gateway": gateway, "broker": broker,
                     "hosts": [{"name": n, "address": str(net.network_address + 10 + i)}
                               for i, n in enumerate(names, start=1)]}
            self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        for path in (self.identity_file, Path(f"{self.identity_file}.pub")):
            path.unlink(missing_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"deploy-kit-{self.name}",
           "-f", str(self.identity_file), what="generating the sandbox SSH key")
        authorized = Path(f"{self.identity_file}.pub").read_text()
        password = secrets.token_urlsafe(24)
        self.redis_password_file.write_text(password + "\n")
        self.redis_password_file.chmod(0o600)

        sh("ip", "link", "add", self.bridge, "type", "bridge", what="creating the sandbox bridge")
        sh("ip", "addr", "add", f"{gateway}/{net.prefixlen}", "dev", self.bridge,
           what="addressing the sandbox bridge")
        sh("ip", "link", "set", self.bridge, "up", what="raising the sandbox bridge")

        machines = self.machines()
        say(f"booting {count} host(s): {', '.join(f'{m.name} ({m.address})' for m in machines)}")

        def boot(machine: Machine) -> None:  # every host runs Redis (as ever); only the first RabbitMQ
            serves = broker if broker == "redis" or machine == machines[0] else "none"
            machine.prepare(lowers, authorized, password, serves)
            machine.plug_network()
            machine.wait_for_ssh(machine.boot())

        parallel.each(machines, boot, name=lambda m: m.name, what="booting sandbox hosts", limit=8)
        self.known_hosts.write_text("".join(f"{m.address} {m.public_host_key()}\n" for m in machines))
        parallel.each(machines, self._wait_until_running, name=lambda m: m.name,
                      what="checking sandbox hosts", limit=8)
        say("all hosts are up: systemd running, sshd answering with the recorded host keys")

    def _wait_until_running(self, machine: Machine) -> None:
        host = Host(name=machine.name, address=machine.address, user=rootfs.SSH_USER)
        # Until systemd-user-sessions has run, /run/nologin refuses every login but root's:
        # sshd answers yet authentication fails. Retry for a while before calling it a failure.
        deadline = time.monotonic() + 60
        while True:
            try:
                remote = connect(host, self.ssh_settings())
                break
            except ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with remote:
            result = remote.run_script(
                "state=$(timeout 90 systemctl is-system-running --wait || true)\n"
                'echo "$state"\n'
                '[ "$state" = running ] || systemctl --failed --no-legend --plain\n',
                what="waiting for systemd to finish booting", timeout=120)
        lines = result.stdout.strip().splitlines()
        if not lines or lines[0] != "running":
            raise SandboxError(f"{machine.name}: systemd is {lines[0] if lines else 'silent'} "
                               f"after boot; failed units: {' '.join(lines[1:]) or 'none listed'}\n"
                               f"{machine.console_tail()}")

    def _free_subnet(self) -> int:
        taken: set[int] = set()
        for other in self.dir.parent.glob("*/state.json"):
            if other != self.state_file:
                try:
                    taken.add(int(json.loads(other.read_text())["subnet"].split(".")[2]))
                except (OSError, ValueError, KeyError, IndexError):
                    continue
        in_use = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                                text=True).stdout
        for index in range(0, 256):
            if index not in taken and f" 10.199.{index}." not in in_use:
                return index
        raise SandboxError("no free 10.199.x.0/24 network for a new sandbox; remove old ones "
                           "with `fab sandbox.down --name NAME`")

    # --- down -------------------------------------------------------------------------------------

    def down(self, say: Say) -> list[str]:
        """Stop and remove every host, then the bridge and the sandbox's files. Idempotent."""
        require_host_machine()
        removed: list[str] = []
        machines = {m.name: m for m in self.machines()}
        hosts_dir = self.dir / "hosts"
        if hosts_dir.is_dir():  # hosts of a crashed `up` that never reached state.json
            for leftover in hosts_dir.iterdir():
                machines.setdefault(leftover.name, Machine(leftover.name, "", "", self.bridge, leftover))
        for name in _leftover_namespaces(self.name) + _leftover_cgroups(self.name):
            machines.setdefault(name, Machine(name, "", "", self.bridge, hosts_dir / name))
        errors: list[str] = []
        for machine in machines.values():
            try:
                machine.teardown()
                removed.append(machine.name)
            except DeployKitError as exc:
                errors.append(str(exc))
        if link_exists(self.bridge):
            sh("ip", "link", "del", self.bridge, what="removing the sandbox bridge")
        for directory in Machine(self.name, "", "", self.bridge, self.dir).cgroups():
            with contextlib.suppress(OSError):  # still in use by another sandbox: it stays
                directory.parent.rmdir()
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise SandboxError("could not remove everything:\n" + "\n".join(errors))
        if removed:
            say(f"sandbox {self.name!r} is down: removed {', '.join(sorted(removed))}")
        else:
            say(f"sandbox {self.name!r} was not running; nothing to remove")
        return removed

    def _leftovers(self) -> bool:
        return link_exists(self.bridge) or bool(_leftover_namespaces(self.name) or _leftover_cgroups(self.name))

    # --- status -----------------------------------------------------------------------------------

    def status(self) -> list[HostStatus]:
        machines = self.machines()

        def probe(machine: Machine) -> HostStatus:
            running = machine.pid() is not None
            ssh_state, systemd = "-", "-"
            if running:
                host = Host(name=machine.name, address=machine.address, user=rootfs.SSH_USER)
                try:
                    with connect(host, self.ssh_settings()) as remote:
                        out = remote.run_script("systemctl is-system-running || true",
                                                what="systemctl", timeout=15).stdout
                    ssh_state, systemd = "ok (host key verified)", out.strip() or "unknown"
                except DeployKitError as exc:
                    ssh_state = f"failed: {getattr(exc, 'reason', exc)}"
            return HostStatus(machine.name, machine.address, running, ssh_state, systemd)

        results = parallel.each(machines, probe, name=lambda m: m.name, what="sandbox status")
        return [results[m.name] for m in machines]


def _leftover_cgroups(sandbox: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(sandbox)}\d+$")
    found = set()
    for directory in Machine(sandbox, "", "", "", Path("/")).cgroups():
        if directory.parent.is_dir():
            found |= {p.name for p in directory.parent.iterdir() if p.is_dir() and pattern.match(p.name)}
    return sorted(found)


def _leftover_namespaces(sandbox: str) -> list[str]:
    base = Path("/run/netns")
    if not base.is_dir():
        return []
    pattern = re.compile(rf"^dk-{re.escape(sandbox)}\d+$")
    return [p.name[3:] for p in base.iterdir() if pattern.match(p.name)]


def require_host_machine() -> None:
    """Sandbox hosts need root on a Debian-family machine with nspawn, debootstrap and iproute2."""
    if os.geteuid() != 0:
        raise SandboxError("sandbox hosts need root (they use systemd-nspawn, network namespaces and "
                           "overlay mounts). Fix: run this as root, e.g. `sudo fab sandbox.up`")
    if not Path("/etc/debian_version").exists():
        raise SandboxError("sandbox hosts need a Debian-family machine (they are built with "
                           "debootstrap from Debian's packages)")
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "ip", "ssh-keygen")
               if shutil.which(tool) is None]
    if missing:
        raise SandboxError(f"missing tools: {', '.join(missing)}. Fix: apt-get install "
                           "systemd-container debootstrap iproute2 openssh-client")


__all__ = ["Sandbox", "HostStatus", "require_host_machine", "netns_exists"]
