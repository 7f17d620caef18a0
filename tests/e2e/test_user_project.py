"""deploy-kit used as a user would: the built wheel installed in a fresh virtualenv outside this
checkout, `fab init` in the user's own Django project, then setup, env, check, deploy,
rollback and logs from that project's directory, with `fab` and with the `deploy-kit` command.

The project is a copy of the example app in a new git repository; it deploys to a one-host
sandbox of its own ("dkuser").
"""

import os
import shutil
import subprocess
import sys

import pytest

from deploy_kit.sandbox import Sandbox

from .conftest import ROOT, git, say

NAME = "dkuser"


def run(venv, command, cwd, *args, stdin=None, check=True, timeout=900):
    proc = subprocess.run([str(venv / "bin" / command), *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={k: v for k, v in os.environ.items()
                                                           if k != "DEPLOY_KIT_CONFIG"})
    if check:
        assert proc.returncode == 0, f"{command} {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    base = tmp_path_factory.mktemp(NAME)
    box = Sandbox(NAME)
    try:
        scratch = base / "sandbox.toml"
        box.up(1, scratch, say, repo_root=ROOT)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(base / "dist"), str(ROOT)],
                       check=True, capture_output=True)
        wheel = next((base / "dist").glob("deploy_kit-*.whl"))
        venv = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                       check=True, capture_output=True)
        project = base / "shop"
        shutil.copytree(ROOT / "examples/exampleapp", project,
                        ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
        git(project.parent, "init", "-q", "-b", "main", str(project))
        git(project, "add", "-A")
        git(project, "commit", "-q", "-m", "the user's project")
        # The sandbox's hosts and SSH settings, as the user would describe their servers.
        block = scratch.read_text()
        hosts = block[block.index(f"[stages.{NAME}]"):block.index(f"[stages.{NAME}.app]")]
        yield venv, project, hosts, box
    finally:
        box.down(say)


def test_the_wheel_ships_the_tasks_and_the_host_programs(user):
    venv, _project, _hosts, _box = user
    listing = subprocess.run([str(venv / "bin/python"), "-c", "import deploy_kit, pathlib; "
                              "p = pathlib.Path(deploy_kit.__file__).parent; "
                              "print(sorted(str(f.relative_to(p)) for f in p.rglob('*.py')))"],
                             capture_output=True, text=True, check=True).stdout
    for name in ("tasks/__init__.py", "tasks/deploy.py", "remote/cutover.py", "remote/celery_agent.py", "init.py"):
        assert name in listing


def test_init_then_the_whole_workflow_from_the_users_project(user):
    venv, project, hosts, box = user
    first = run(venv, "deploy-kit", project, "init")  # no fabfile yet: `fab` has no tasks to run
    assert "wrote fabfile.py" in first.stdout and "wrote hosts.toml" in first.stdout
    assert "found app.celery_app = exampleapp.celery" in first.stdout
    again = run(venv, "fab", project, "init")  # the fabfile it wrote gives `fab` every task
    assert "left fabfile.py alone" in again.stdout and "left hosts.toml alone" in again.stdout
    with (project / "hosts.toml").open("a") as handle:
        handle.write("\n" + hosts)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "deploy configuration")
    stage = ("--stage", NAME)
    run(venv, "fab", project, "setup", *stage, "--yes")
    run(venv, "fab", project, "env.set", "CELERY_BROKER_URL", *stage, stdin=box.broker_url() + "\n")
    for assignment in ("DJANGO_SETTINGS_MODULE=exampleapp.settings", "DJANGO_SECRET_KEY=e2e-not-secret",
                       "DATABASE_URL=sqlite:////srv/exampleapp/shared/db.sqlite3"):
        run(venv, "deploy-kit", project, "env.set", assignment, *stage)
    run(venv, "fab", project, "check", *stage)
    deployed = run(venv, "fab", project, "deploy", *stage)
    assert "verified" in deployed.stdout
    (project / "ledger" / "note.txt").write_text("second release\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "a change")
    run(venv, "deploy-kit", project, "deploy", *stage)
    back = run(venv, "fab", project, "rollback", *stage)
    assert "rolled back" in back.stdout
    logs = run(venv, "deploy-kit", project, "logs", *stage, "--no-follow", "-n", "5")
    assert "exampleapp-worker-default@" in logs.stdout
    listed = run(venv, "deploy-kit", project, "--list")
    assert "deploy" in listed.stdout and "init" in listed.stdout
    refused = run(venv, "deploy-kit", project, "deploy", "--stage", "nope", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
