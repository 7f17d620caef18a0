"""What each host of a stage is: reached over verified SSH, probed with one script, parsed purely.

`fab hosts` uses it to show that every host answers before anything is set up.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy_kit import parallel
from deploy_kit.config import Host, Stage
from deploy_kit.errors import DeployKitError
from deploy_kit.ssh import connect

PROBE_SCRIPT = """\
echo "hostname=$(hostname)"
echo "os=$(. /etc/os-release && echo "$PRETTY_NAME")"
echo "systemd=$(systemctl is-system-running 2>/dev/null || true)"
echo "systemd_version=$(systemctl --version | sed -n '1s/^systemd \\([0-9]*\\).*/\\1/p')"
echo "python=$({python} -c 'import platform; print(platform.python_version())' 2>/dev/null \\
    || echo missing)"
echo "sudo=$(sudo -n true 2>/dev/null && echo yes || echo no)"
echo "journal=$(journalctl -n 0 --quiet >/dev/null 2>&1 && echo yes || echo no)"
"""


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    os: str
    systemd: str
    systemd_version: str
    python: str
    sudo: bool
    journal: bool


@dataclass(frozen=True)
class HostReport:
    host: Host
    facts: HostFacts | None
    error: str | None = None


def parse_facts(output: str) -> HostFacts:
    """Parse PROBE_SCRIPT's `key=value` lines; missing keys read as empty."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return HostFacts(
        hostname=values.get("hostname", ""),
        os=values.get("os", ""),
        systemd=values.get("systemd", "") or "unknown",
        systemd_version=values.get("systemd_version", ""),
        python=values.get("python", "missing"),
        sudo=values.get("sudo") == "yes",
        journal=values.get("journal") == "yes",
    )


def probe(stage: Stage) -> list[HostReport]:
    """One SSH connection and one round trip per host, all hosts at once; failures are reported,
    not raised, so the table shows every host."""
    script = PROBE_SCRIPT.format(python=stage.app.python)

    def one(host: Host) -> HostReport:
        try:
            with connect(host, stage.ssh) as remote:
                result = remote.run_script(script, what="probe", timeout=30)
            return HostReport(host, parse_facts(result.stdout))
        except DeployKitError as exc:
            return HostReport(host, None, getattr(exc, "reason", str(exc)))

    reports = parallel.each(stage.hosts, one, name=lambda h: h.name, what="probing hosts",
                            limit=stage.parallel)
    return [reports[h.name] for h in stage.hosts]
