"""Sandbox hosts are real machines: SSH with verified host keys, systemd, journald, redis, sudo."""

import secrets
from dataclasses import replace

import pytest

from deploy_kit.errors import ConnectError
from deploy_kit.ssh import connect

from .conftest import TEST_SANDBOX, fab


def test_ssh_with_host_key_checking_reaches_systemd_and_journald(stage):
    for host in stage.hosts:
        marker = f"deploy-kit-e2e-{secrets.token_hex(4)}"
        with connect(host, stage.ssh) as remote:
            result = remote.run_script(
                "systemctl is-system-running\n"
                "cat /proc/1/comm\n"
                f"logger -t dk-e2e {marker}\n"
                # journald needs a moment to index the line it was just given
                f"for _ in $(seq 50); do journalctl -t dk-e2e -o cat | grep -q {marker} && break; "
                "sleep 0.1; done\n"
                "journalctl -t dk-e2e -o cat --no-pager\n"
                "hostname\n",
                what="probe")
        lines = result.stdout.splitlines()
        assert lines[0] == "running"
        assert lines[1] == "systemd"  # systemd is PID 1, not a stand-in
        assert marker in lines
        assert lines[-1] == host.name


def test_each_host_runs_redis_python_venv_and_passwordless_sudo(stage):
    host = stage.hosts[0]
    with connect(host, stage.ssh) as remote:
        result = remote.run_script(
            "systemctl is-active redis-server\n"
            "python3 -m venv /tmp/venv-check && /tmp/venv-check/bin/python -c 'print(\"venv ok\")'\n"
            "id -un\n",
            sudo=True, what="probe")
    assert result.stdout.splitlines() == ["active", "venv ok", "root"]


def test_hosts_reach_each_others_redis_with_the_sandbox_password(stage, sandbox_config):
    from deploy_kit.sandbox import Sandbox

    url = Sandbox(TEST_SANDBOX).broker_url()
    password = url.split(":")[2].split("@")[0]
    first, second = stage.hosts
    with connect(second, stage.ssh) as remote:
        result = remote.run_script(
            f"python3 - <<'EOF'\n"
            "import socket\n"
            f"s = socket.create_connection(('{first.address}', 6379), timeout=5)\n"
            f"s.sendall(b'AUTH {password}\\r\\nPING\\r\\n')\n"
            "import time; time.sleep(0.3)\n"
            "print(s.recv(100).decode().split())\n"
            "EOF\n",
            what="redis ping")
    assert "+PONG" in result.stdout


def test_unknown_host_key_is_refused(stage, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    ssh = replace(stage.ssh, known_hosts=empty)
    with pytest.raises(ConnectError) as info:
        connect(stage.hosts[0], ssh)
    assert "is not in" in str(info.value) and "ssh-keyscan" in str(info.value)


def test_changed_host_key_is_refused(stage, tmp_path):
    first, second = stage.hosts
    lines = stage.ssh.known_hosts.read_text().splitlines()
    key_of_second = next(line.split(" ", 1)[1] for line in lines if line.startswith(second.address + " "))
    forged = tmp_path / "known_hosts"
    forged.write_text(f"{first.address} {key_of_second}\n")  # first's address, second's key
    with pytest.raises(ConnectError) as info:
        connect(first, replace(stage.ssh, known_hosts=forged))
    assert "does NOT match" in str(info.value)


def test_fab_hosts_shows_every_host_reached(sandbox_config, stage):
    proc = fab("hosts", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    for host in stage.hosts:
        assert host.name in proc.stdout
    assert proc.stdout.count("running") == len(stage.hosts)
    assert "3.11" in proc.stdout


def test_fab_sandbox_status_reports_running_hosts(sandbox_config, stage):
    proc = fab("sandbox.status", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    assert proc.stdout.count("host key verified") == len(stage.hosts)


def test_unreachable_host_is_reported_without_traceback(sandbox_config, tmp_path):
    broken = tmp_path / "hosts.toml"
    broken.write_text(sandbox_config.read_text().replace(".11\"", ".99\"").replace(
        "connect_timeout = 10.0", "connect_timeout = 2"))
    proc = fab("hosts", "--stage", TEST_SANDBOX, config_file=broken)
    assert proc.returncode == 7
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "could not be reached" in proc.stderr
