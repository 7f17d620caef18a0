"""The base root filesystem of sandbox hosts: Debian 12 built once with debootstrap, then cached.

Every sandbox host boots from a read-only copy of this tree under its own
overlay, so hosts start clean and booting one costs seconds, not a debootstrap.
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
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
              str(partial), mirror()], "debootstrap", partial)
        _run(["chroot", str(partial), "/bin/sh", "-c", _CUSTOMIZE], "customising the image", partial)
        (partial / ".complete").write_text(REVISION)
        partial.rename(target)
        for stale in target.parent.glob(f"{SUITE}-*"):
            if stale != target and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return target


def _run(argv: list[str], what: str, partial: Path) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise SandboxError(f"{argv[0]} is not installed. Fix: apt-get install debootstrap "
                           "systemd-container") from None
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        hint = ""
        if "Failed getting release file" in tail or "Couldn't download" in tail:
            hint = (f"\nFix: make sure {mirror()} is reachable, or set DEPLOY_KIT_DEBIAN_MIRROR "
                    "to a Debian mirror you can reach")
        raise SandboxError(f"{what} failed (exit code {proc.returncode}):\n{tail}{hint}")
