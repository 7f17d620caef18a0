"""What runs on hosts is sent as one text per program (`remote.program`): every module it imports
must travel with it (`needs()` picks them with a regex), and all of it must run on the hosts'
oldest Python (3.8), with nothing but the standard library."""

import ast
import base64
import json
import os
import subprocess
import sys
import zlib
from importlib import resources
from pathlib import Path

import pytest

from deploy_kit import remote
from deploy_kit.remote import celery_agent, hostlib, probes

PROGRAMS = sorted(p.stem for p in resources.files(remote).iterdir()
                  if p.name.endswith(".py") and p.name != "__init__.py")
OLDEST = Path(os.path.expanduser("~/.pyenv/versions/3.8.18/bin/python3"))  # a real 3.8 where there is one
PYTHON = str(OLDEST) if OLDEST.exists() else sys.executable


def shipped(text: str) -> list:
    """The (name, source) pairs a program text carries."""
    packed = text.split("module = _deploy_kit_load(", 1)[1].split(")\n", 1)[0]
    return json.loads(zlib.decompress(base64.b85decode(ast.literal_eval(packed))).decode())


def loaded_only(text: str) -> str:
    """The program without its last line (the call of `main`): it loads every module, runs nothing."""
    head, tail = text.rstrip("\n").rsplit("\n", 1)
    assert tail.startswith("module.main(")
    return head + "\nprint(sorted(m for m in sys.modules if m.startswith('deploy_kit.')))\n"


def bare(text: str, tmp_path) -> subprocess.CompletedProcess:
    """`python3 -c TEXT` with no site-packages, no PYTHONPATH, no deploy_kit anywhere on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([PYTHON, "-I", "-S", "-c", text], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_bare_interpreter_has_no_deploy_kit(tmp_path):
    assert bare("import deploy_kit", tmp_path).returncode != 0


def test_every_host_module_is_python_3_8_syntax():
    assert {"cutover", "hostprobe", "status", "lock", "finish", "hostlib", "contracts"} <= set(PROGRAMS)
    for name in PROGRAMS:
        ast.parse(remote.source(name), filename=f"{name}.py", feature_version=(3, 8))


@pytest.mark.parametrize("name", [n for n in PROGRAMS if "def main(" in remote.source(n)])
def test_every_program_as_shipped_loads_on_a_bare_python(name, tmp_path):
    text = remote.program(name, {})
    ast.parse(text, feature_version=(3, 8))
    for module, source in shipped(text):
        compile(ast.parse(source, feature_version=(3, 8)), f"<deploy-kit {module}>", "exec")
    proc = bare(loaded_only(text), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"deploy_kit.remote.{name}" in proc.stdout


@pytest.mark.parametrize("text", [probes.program(), probes.release_program(), celery_agent.program()],
                         ids=["probes", "release check", "celery agent"])
def test_the_programs_a_host_program_starts_load_on_a_bare_python_too(text, tmp_path):
    """Shipped again by a host program to the service's Python (`hostlib.source_of`)."""
    text = text.replace("module.main(*sys.argv[1:])", "module.main(0)").replace(
        "module.main(sys.argv[1:])", "module.main(0)")
    proc = bare(loaded_only(text), tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_the_agents_program_on_its_stdin_runs_its_requests_and_fits_a_pipe_buffer(tmp_path):
    """The agent's program comes as the first line of its stdin (`hostlib.READ_PROGRAM`, as every
    shipped program run as the service), its requests after it; whole, it fits a pipe's buffer, so
    writing it never waits for the agent."""
    first = hostlib.program_line(celery_agent.program())
    assert len(first.encode()) < 65536
    program = first.replace("module.main(*sys.argv[1:])", "print(sys.stdin.readline().strip())")
    proc = subprocess.run([sys.executable, "-I", "-c", hostlib.READ_PROGRAM], input=program + "a request\n",
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "a request\n", proc.stderr
    assert not set(";$\n") & set(hostlib.READ_PROGRAM)  # what systemd cannot read back from a unit file


def test_the_readme_layout_names_every_host_module():
    layout = (Path(__file__).resolve().parents[2] / "README.md").read_text().split("## Layout", 1)[1]
    remote_part = layout.split("- `deploy_kit/remote/`", 1)[1].split("\n- ", 1)[0]
    assert [name for name in PROGRAMS if f"`{name}.py`" not in remote_part] == []
