"""The base root filesystem of sandbox hosts: Debian 12 built once with debootstrap, then cached.

Every sandbox host boots from a read-only copy of this tree under its own
overlay, so hosts start clean and booting one costs seconds, not a debootstrap.
What only some sandboxes need (RabbitMQ) is a layer over the base, built the
first time it is asked for and stacked under the host's overlay: the base,
and so the default sandbox, never pays for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from deploy_kit.errors import SandboxError

SUITE = "bookworm"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
    "redis-server", "iproute2", "sudo", "procps", "libpam-systemd",
)
SSH_USER = "deploy"
RABBITMQ_USER = "deploykit"  # the broker user of a RabbitMQ sandbox
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE_DIR = Path(os.environ.get("DEPLOY_KIT_CACHE", "/var/cache/deploy-kit"))

# Changes to the host image after debootstrap; bump REVISION when they change.
REVISION = "3"
_CUSTOMIZE = f"""
set -eu
useradd --create-home --shell /bin/bash {SSH_USER}
install -d -m 0700 -o {SSH_USER} -g {SSH_USER} /home/{SSH_USER}/.ssh
echo '{SSH_USER} ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/{SSH_USER}
chmod 0440 /etc/sudoers.d/{SSH_USER}
rm -f /etc/ssh/ssh_host_*
cat > /etc/ssh/sshd_config.d/deploy-kit-sandbox.conf <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
EOF
# redis listens on the sandbox network too (password set per sandbox in sandbox.conf)
echo 'include /etc/redis/sandbox.conf' >> /etc/redis/redis.conf
: > /etc/machine-id
mkdir -p /var/log/journal
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \\
            systemd-networkd-wait-online.service; do
    ln -sf /dev/null /etc/systemd/system/$unit
done
apt-get clean
rm -rf /var/lib/apt/lists/*
"""


# Layers over the base: the Debian packages each adds and its customisation (run in a chroot).
LAYERS = {
    # The management plugin is what `fab queues` reads unacknowledged counts from (its HTTP API).
    "rabbitmq": (("rabbitmq-server",),
                 "echo '[rabbitmq_management].' > /etc/rabbitmq/enabled_plugins\n"
                 "ln -sf /dev/null /etc/systemd/system/redis-server.service\n"),
}
_NO_START = "#!/bin/sh\n# packages installed while the layer is built must not start their services\nexit 101\n"


def mirror() -> str:
    return os.environ.get("DEPLOY_KIT_DEBIAN_MIRROR", DEFAULT_MIRROR)


def base_dir() -> Path:
    """The cached tree for the current package list and customisation."""
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} {REVISION} {_CUSTOMIZE}".encode()).hexdigest()
    return CACHE_DIR / "rootfs" / f"{SUITE}-{key[:12]}"


def ensure_base(say: Callable[[str], None]) -> Path:
    """The base tree, built now when it is not cached yet (about a minute)."""
    target = base_dir()
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `sandbox.up` at once build it once
        if (target / ".complete").exists():
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        say(f"building the base image of the sandbox hosts with debootstrap ({SUITE}, once, "
            "about a minute)")
        try:
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                  str(partial), mirror()], "debootstrap")
            _run(["chroot", str(partial), "/bin/sh", "-c", _CUSTOMIZE], "customising the image")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        (partial / ".complete").write_text(REVISION)
        partial.rename(target)
        for stale in target.parent.glob(f"{SUITE}-*"):
            if stale != target and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return target


def layer_dir(name: str) -> Path:
    """The cached layer `name` (an overlay upper directory) over the current base."""
    packages, customize = LAYERS[name]
    key = hashlib.sha256(f"{' '.join(packages)} {customize}".encode()).hexdigest()
    return base_dir().with_name(f"{base_dir().name}.{name}-{key[:12]}")


def ensure_layers(names: tuple[str, ...], say: Callable[[str], None]) -> list[Path]:
    """The base tree and the layers `names` over it, topmost first (overlayfs' `lowerdir` order);
    each built now when it is not cached yet (the RabbitMQ layer: about 15 s)."""
    base = ensure_base(say)
    return [*(_ensure_layer(name, base, say) for name in reversed(names)), base]


def _ensure_layer(name: str, base: Path, say: Callable[[str], None]) -> Path:
    target = layer_dir(name)
    if (target / ".complete").exists():
        return target
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        packages, customize = LAYERS[name]
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        upper, work, merged = (partial / d for d in ("upper", "work", "merged"))
        for directory in (upper, work, merged):
            directory.mkdir(parents=True)
        say(f"adding {', '.join(packages)} to the sandbox image as the {name!r} layer (once)")
        try:
            _run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={base},upperdir={upper},workdir={work}",
                  str(merged)], f"mounting the {name} layer")
            try:
                (merged / "usr/sbin/policy-rc.d").write_text(_NO_START)
                (merged / "usr/sbin/policy-rc.d").chmod(0o755)
                shutil.copyfile("/etc/resolv.conf", merged / "etc/resolv.conf")  # apt resolves the mirror
                script = (f"set -eu\nexport DEBIAN_FRONTEND=noninteractive\napt-get update -qq\n"
                          f"apt-get install -y -qq --no-install-recommends {' '.join(packages)}\n{customize}"
                          "apt-get clean\nrm -rf /var/lib/apt/lists/*\n")
                _run(["chroot", str(merged), "/bin/sh", "-c", script], f"installing {' '.join(packages)}")
            finally:
                subprocess.run(["umount", str(merged)], capture_output=True)
        except BaseException:
            if not is_mounted(merged):
                shutil.rmtree(partial, ignore_errors=True)
            raise
        for made in ("usr/sbin/policy-rc.d", "etc/resolv.conf"):  # the base's own come through again
            (upper / made).unlink(missing_ok=True)
        (upper / ".complete").write_text(REVISION)
        upper.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
        for stale in target.parent.glob(f"{base.name}.{name}-*"):
            if stale != target and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return target


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split(" ")[1] == target for line in mounts)


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise SandboxError(f"{argv[0]} is not installed. Fix: apt-get install debootstrap "
                           "systemd-container") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        hint = ""
        if any(sign in tail for sign in ("Failed getting release file", "Couldn't download", "Failed to fetch",
                                          "Temporary failure resolving")):
            hint = (f"\nFix: make sure {mirror()} is reachable, or set DEPLOY_KIT_DEBIAN_MIRROR "
                    "to a Debian mirror you can reach")
        raise SandboxError(f"{what} failed (exit code {proc.returncode}):\n{tail}{hint}")
