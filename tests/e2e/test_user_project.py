"""deploy-kit used as a user would (issue 13's Tests): the built wheel installed in a fresh virtualenv
outside this checkout, init in the user's own Django project, then setup, env.set, check, deploy,
rollback and logs --no-follow from that project's directory, each with `fab` and with the
`deploy-kit` command.

The project is a new git repository holding a copy of the example app in `backend/` (manage.py
there, as in many repositories with a frontend beside it); init runs in backend/, so this also
proves that `repo` and `path` written from a subdirectory ship the right tree. It deploys to a
one-host sandbox of its own ("dkuser").
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from deploy_kit.sandbox import Sandbox

from .conftest import ROOT, git, say

NAME = "dkuser"
DEPLOYED = rf"deployed (\S+) \(\w+\) to stage {NAME}: verified"


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
        repository = base / "shop"
        project = repository / "backend"
        shutil.copytree(ROOT / "examples/exampleapp", project,
                        ignore=shutil.ignore_patterns("__pycache__", "*.sqlite3"))
        (repository / "frontend").mkdir()
        (repository / "frontend/package.json").write_text("{}\n")
        git(base, "init", "-q", "-b", "main", str(repository))
        git(repository, "add", "-A")
        git(repository, "commit", "-q", "-m", "the user's project")
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
    # init: `deploy-kit init` first (without a fabfile `fab` has no tasks), then `fab init` through
    # the fabfile it wrote, which leaves both files alone.
    wrote = run(venv, "deploy-kit", project, "init").stdout
    assert "wrote fabfile.py" in wrote and "wrote hosts.toml" in wrote
    assert "found app.celery_app = exampleapp.celery" in wrote
    assert "found app.repo = .." in wrote and "found app.path = backend" in wrote
    again = run(venv, "fab", project, "init")
    assert "left fabfile.py alone" in again.stdout and "left hosts.toml alone" in again.stdout
    with (project / "hosts.toml").open("a") as handle:  # the generated file, pointed at the sandbox host
        handle.write("\n" + hosts)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "deploy configuration")
    stage = ("--stage", NAME)

    # setup: fab, then deploy-kit (idempotent: nothing left to change)
    run(venv, "fab", project, "setup", *stage, "--yes")
    same = run(venv, "deploy-kit", project, "setup", *stage, "--yes")
    assert "no change" in same.stdout and "change(s)" not in same.stdout

    # env.set: fab (the value read unseen from stdin), then deploy-kit (KEY=VALUE)
    run(venv, "fab", project, "env.set", "CELERY_BROKER_URL", *stage, stdin=box.broker_url() + "\n")
    for assignment in ("DJANGO_SETTINGS_MODULE=exampleapp.settings", "DJANGO_SECRET_KEY=e2e-not-secret",
                       "DATABASE_URL=sqlite:////srv/exampleapp/shared/db.sqlite3"):
        run(venv, "deploy-kit", project, "env.set", assignment, *stage)

    # check: both
    run(venv, "fab", project, "check", *stage)
    run(venv, "deploy-kit", project, "check", *stage)

    # deploy: fab, then a change deployed with deploy-kit
    one = run(venv, "fab", project, "deploy", *stage).stdout
    first_release = re.search(DEPLOYED, one)
    assert first_release, one
    (project / "ledger" / "note.txt").write_text("second release\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "a change")
    second = run(venv, "deploy-kit", project, "deploy", *stage).stdout
    second_release = re.search(DEPLOYED, second)
    assert second_release, second
    # One host with workers: its cutover read the queue summary during the retire (no round trip of its own).
    summary = rf"queue \S+: \d+ waiting, \d+ unacked, consumed by \S+\.{second_release.group(1)}@"
    assert re.search(summary, second), second

    # rollback: fab goes back to the first release, deploy-kit undoes it (`--to` the release it left)
    back = run(venv, "fab", project, "rollback", *stage)
    assert f"rolled back stage {NAME} to {first_release.group(1)}: verified" in back.stdout
    assert re.search(rf"queue \S+: \d+ waiting, \d+ unacked, consumed by \S+\.{first_release.group(1)}@", back.stdout)
    forth = run(venv, "deploy-kit", project, "rollback", *stage, "--to", second_release.group(1))
    assert f"rolled back stage {NAME} to {second_release.group(1)}: verified" in forth.stdout

    # logs --no-follow: both, the worker's journal of the sandbox host
    for program in ("fab", "deploy-kit"):
        logs = run(venv, program, project, "logs", *stage, "--service", "default", "--no-follow", "-n", "5")
        assert "exampleapp-worker-default@" in logs.stdout, f"{program} logs:\n{logs.stdout}"

    listed = run(venv, "deploy-kit", project, "--list")
    assert "deploy" in listed.stdout and "init" in listed.stdout
    refused = run(venv, "deploy-kit", project, "deploy", "--stage", "nope", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
