"""`sandbox.up` and `sandbox.down` as a user runs them: down leaves nothing behind."""

import os
import subprocess
from pathlib import Path

from .conftest import fab

NAME = "dklife"


def _traces(name: str) -> dict[str, list[str]]:
    procs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"systemd-nspawn") and f"-M{name}".encode() in b"".join(argv):
                procs.append(entry.name)
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
              if f"/sandbox/{name}/" in line.split()[1]]
    netns = [n for n in os.listdir("/run/netns")] if Path("/run/netns").is_dir() else []
    return {
        "processes": procs,
        "mounts": mounts,
        "namespaces": [n for n in netns if n.startswith(f"dk-{name}")],
        "links": [n for n in os.listdir("/sys/class/net") if name in n],
        "state": [str(p) for p in Path("/var/lib/deploy-kit/sandbox").glob(f"{name}/*")],
        "cgroups": [str(p) for root in ("unified", "systemd", "")
                    for p in Path("/sys/fs/cgroup", root, "deploy-kit").glob(f"{name}*")],
        # every process of the containers, whoever its parent is now (an orphaned init counts)
        # (zombies are gone already; only PID 1 can reap those of processes it inherited)
        "container processes": [line for line in subprocess.run(
            ["ps", "-eo", "pid,stat,comm,cgroup"], capture_output=True, text=True).stdout.splitlines()
            if f"deploy-kit/{name}" in line and line.split()[1][0] != "Z"],
    }


def test_up_then_down_leaves_nothing_behind(tmp_path):
    config_file = tmp_path / "hosts.toml"
    config_file.write_text('# my own notes stay\ndefault_stage = "dklife"\n')
    try:
        up = fab("sandbox.up", "--stage", NAME, "--hosts", "1", config_file=config_file, check=True)
        assert "dklife1" in up.stdout
        running = _traces(NAME)
        assert running["processes"] and running["mounts"] and running["namespaces"] and running["links"]
        assert running["cgroups"]
        text = config_file.read_text()
        assert text.startswith("# my own notes stay\n")
        assert "[stages.dklife]" in text
        # a second `up` replaces the hosts and the stage block, it does not add another
        fab("sandbox.up", "--stage", NAME, "--hosts", "1", config_file=config_file, check=True)
        assert config_file.read_text().count("[stages.dklife]") == 1
        fab("hosts", config_file=config_file, check=True)
    finally:
        down = fab("sandbox.down", "--stage", NAME, config_file=config_file)
    assert down.returncode == 0, down.stderr
    assert "is down" in down.stdout
    assert _traces(NAME) == {"processes": [], "mounts": [], "namespaces": [], "links": [], "state": [],
                             "cgroups": [], "container processes": []}
    again = fab("sandbox.down", "--stage", NAME, config_file=config_file, check=True)
    assert "nothing to remove" in again.stdout
