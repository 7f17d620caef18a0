"""The command line turns bad input into one message and a documented exit code, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_kit import sandbox
from deploy_kit.errors import EXIT_CODES, SandboxError, UsageError

from .samples import STAGE

ROOT = Path(__file__).resolve().parents[2]
FAB = Path(sys.executable).with_name("fab")


def fab(*args, config_file, program=FAB):
    """Run fab (or deploy-kit) on this checkout's deploy_kit (not the one the virtualenv has installed)."""
    env = dict(os.environ, DEPLOY_KIT_CONFIG=str(config_file), PYTHONPATH=str(ROOT))
    return subprocess.run([str(program), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_fab_list_shows_every_task_with_help():
    proc = subprocess.run([str(FAB), "--list"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in ("hosts", "sandbox.up", "sandbox.down", "sandbox.status"):
        line = next(line for line in proc.stdout.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split()) > 1, f"{name} has no help line"


@pytest.mark.parametrize("content, expected", [
    ("[stages.x\n", "not valid TOML"),
    ('[stages.prod]\n[[stages.prod.hosts]]\naddress = "h"\n[stages.prod.app]\nname = "a"\n'
     'repo = "r"\ncelery_app = "a"\ndeploy_to = "rel"\n[[stages.prod.workers]]\nname = "w"\n',
     "stages.prod.app.deploy_to: must be an absolute path"),
])
def test_bad_config_exits_2_with_one_message(tmp_path, content, expected):
    path = tmp_path / "hosts.toml"
    path.write_text(content)
    proc = fab("hosts", config_file=path)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_missing_config_file(tmp_path):
    proc = fab("hosts", "--stage", "prod", config_file=tmp_path / "absent.toml")
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "hosts.example.toml" in proc.stderr


def test_unknown_stage_is_a_usage_error(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text((ROOT / "hosts.example.toml").read_text())
    proc = fab("hosts", "--stage", "prodution", config_file=path)
    assert proc.returncode == 2
    assert "did you mean 'production'?" in proc.stderr


def test_sandbox_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxError) as info:
        sandbox.require_host_machine()
    assert "need root" in str(info.value) and "sudo fab sandbox.up" in str(info.value)


def test_sandbox_name_is_checked():
    with pytest.raises(UsageError) as info:
        sandbox.Sandbox("Bad_Name")
    assert "must be 1-9 lowercase letters" in str(info.value) and info.value.exit_code == 2


def test_every_exit_code_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} |" in readme, f"exit code {code} ({meaning}) is not in the README"


def test_a_non_number_of_sandbox_hosts_is_a_usage_error(tmp_path):
    proc = fab("sandbox.up", "--hosts", "two", config_file=tmp_path / "hosts.toml")
    assert proc.returncode == 2
    assert "--hosts takes a number of hosts, got 'two'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "hosts.toml").exists()


def test_a_task_stops_on_sigint_even_when_started_with_sigint_ignored():
    """`fab logs &` from a script inherits SIGINT as ignored; the task installs its own handling."""
    import signal
    import subprocess
    import sys

    code = ("import signal, sys, time\n"
            "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
            "from deploy_kit import ui\n"
            "try:\n"
            "    with ui.user_errors():\n"
            "        print('ready', flush=True)\n"
            "        time.sleep(30)\n"
            "except BaseException as exc:\n"
            "    print(type(exc).__name__, getattr(exc, 'code', ''), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert out.strip() == "Exit 130"  # "interrupted", the documented exit of a Ctrl-C


def test_a_hosts_toml_that_is_not_utf8_is_a_clear_error(tmp_path):
    from deploy_kit import config
    from deploy_kit.errors import ConfigError

    bad = tmp_path / "hosts.toml"
    bad.write_bytes(b'# ok\ndefault_stage = "x\xff"\n')
    with pytest.raises(ConfigError) as info:
        config.load(bad)
    assert str(info.value) == f"{bad}: line 2 is not UTF-8 (byte 0xff). Fix: save the file as UTF-8"


def test_no_git_on_this_machine_is_a_release_error(monkeypatch):
    import subprocess

    from deploy_kit import release
    from deploy_kit.errors import ReleaseError

    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(ReleaseError) as info:
        release._git("/srv/repo", "rev-parse", "HEAD")
    assert "git is not installed" in str(info.value) and info.value.exit_code == 9


def test_an_unwritable_cache_is_a_release_error(tmp_path, monkeypatch):
    from deploy_kit import runner
    from deploy_kit.errors import ReleaseError
    from deploy_kit.remote.contracts import Mode

    from .samples import stage_of

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr(runner, "CACHE_DIR", blocker / "cache")
    stage = stage_of()
    run = runner.Run(stage, Mode.DEPLOY, lambda host, message: None, ref="main")
    monkeypatch.setattr(runner.release, "read_source", lambda *a: (blocker / "cache" / "x").mkdir(parents=True))
    with pytest.raises(ReleaseError) as info:
        run.pack({}, lambda f, s: False)
    assert "Fix: make" in str(info.value) and info.value.exit_code == 9


# A stage whose known_hosts file does not exist: a task that got as far as SSH ends in exit 7 at once,
# without a packet sent; exit 2 proves the flag was refused before any host was reached.
UNREACHABLE = (STAGE.replace("10.0.0.5", "192.0.2.5").replace("10.0.0.6", "192.0.2.6")
               + '[stages.prod.ssh]\nknown_hosts = "absent_known_hosts"\nconnect_timeout = 1\n')


@pytest.mark.parametrize("args, expected", [
    (("logs", "-n", "abc"), "-n takes a number of lines, got 'abc'"),
    (("logs", "-n", "-5"), "-n takes a number of lines, got '-5'"),
    (("logs", "--service", "nosuch"), "no service named 'nosuch' in stage 'prod' (services: default, beat)"),
    (("logs", "--host", "nosuch"), "no host named 'nosuch'"),
    (("rollback", "--to", "bad name"), "--to takes a release name such as 2026-11-24-120000"),
    (("rollback", "--plan", "--to", "2026-11-24-120000\n"), "--to takes a release name"),
    (("deploy", "--ref", "main; reboot"), "--ref must be a git branch, tag or commit"),
    (("deploy", "--plan", "--ref", "--upload-pack=x"), "not starting with '-'"),
    (("deploy", "--stage", "prodd"), "did you mean 'prod'?"),
    (("sandbox.up", "--hosts", "-1"), "--hosts takes a number of hosts, got '-1'"),
    (("sandbox.up", "--hosts", "\u00b2"), "--hosts takes a number of hosts, got '\u00b2'"),
    (("sandbox.up", "--hosts", "0"), "--hosts must be between 1 and"),
    (("sandbox.up", "--broker", "kafka"), "--broker must be one of redis, rabbitmq, got 'kafka'"),
    (("sandbox.down", "--stage", "Bad"), "sandbox name 'Bad' must be 1-9 lowercase letters"),
    (("env.set", "BAD KEY=x"), "'BAD KEY' is not a valid variable name"),
    (("env.set", "KEY=a\nb"), "the value of KEY spans several lines"),
    (("env.unset", "KEY\n"), "'KEY\\n' is not a valid variable name"),
    (("env.show", "--host", "nosuch"), "no host named 'nosuch'"),
    (("init", "--directory", "/nonexistent/dir"), "is not a directory"),
])
def test_a_bad_flag_value_exits_2_before_any_host_is_reached(tmp_path, args, expected):
    path = tmp_path / "hosts.toml"
    path.write_text(UNREACHABLE)
    proc = fab(*args, config_file=path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "known_hosts").exists()


UNPARSABLE = [
    (("deploy", "--nosuch"), "No idea what '--nosuch' is!"),
    (("--nosuch",), "No idea what '--nosuch' is!"),
    (("nosuch",), "No idea what 'nosuch' is!"),
    (("setup", "--yes", "please"), "No idea what 'please' is!"),
    (("deploy", "--ref"), "needed value and was not given one"),
    (("env.set",), "did not receive required positional arguments: 'assignment'"),
]


@pytest.mark.parametrize("args, expected", UNPARSABLE)
def test_a_command_line_that_does_not_parse_exits_2_with_the_fix(tmp_path, args, expected):
    path = tmp_path / "hosts.toml"
    path.write_text(UNREACHABLE)
    proc = fab(*args, config_file=path, program=FAB.with_name("deploy-kit"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
    assert "deploy-kit --help TASK" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, expected", UNPARSABLE)
def test_under_fab_a_command_line_that_does_not_parse_exits_1_as_fabric_reports_it(tmp_path, args, expected):
    """What the README documents for `fab`: Invoke's Program ends every parse error with 1 (hard-coded
    in `Program.run`), and parses the core flags before it imports the fabfile, so nothing a fabfile
    or deploy_kit.tasks can do short of patching Fabric's program changes it. Should Fabric ever
    exit 2 here, this test says so and the README's exit codes are to be updated."""
    path = tmp_path / "hosts.toml"
    path.write_text(UNREACHABLE)
    proc = fab(*args, config_file=path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1  # Fabric's one line, no fix
    assert "Traceback" not in proc.stderr and not (tmp_path / "known_hosts").exists()
