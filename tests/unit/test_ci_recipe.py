"""The CI recipe (examples/ci): the script parses, refuses to install an unpinned deploy-kit, and the
GitHub Actions example is valid YAML that pins deploy-kit and calls the script where users copy it."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/ci/deploy.sh"
WORKFLOW = ROOT / "examples/ci/github-actions.yml"
SECRETS = {"DEPLOY_SSH_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----",
           "DEPLOY_KNOWN_HOSTS": "web1 ssh-ed25519 AAAAfake", "DEPLOY_STAGE": "staging-ci"}
PINNED = re.compile(r"^git\+[a-z]+://.+@[0-9a-f]{40}$|\.whl$")

# Stands in for python3: `python3 -m venv DIR` makes a DIR/bin with a pip and a deploy-kit that
# append their arguments (and, for deploy-kit, the key file's mode) to $CALLS.
FAKE_PYTHON = """#!/bin/sh
echo "python3 $*" >> "$CALLS"
[ "$1 $2" = "-m venv" ] || exit 1
mkdir -p "$3/bin"
printf '#!/bin/sh\\necho "pip $*" >> "$CALLS"\\n' > "$3/bin/pip"
printf '#!/bin/sh\\necho "deploy-kit $* key=$(stat -c %%a .ci-ssh/id)" >> "$CALLS"\\n' > "$3/bin/deploy-kit"
chmod +x "$3/bin/pip" "$3/bin/deploy-kit"
"""


def run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    (fake / "python3").write_text(FAKE_PYTHON)
    (fake / "python3").chmod(0o755)
    repo = tmp_path / "project"
    if not (repo / ".git").exists():
        (repo / "backend").mkdir(parents=True)
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
    calls = tmp_path / "calls"
    calls.write_text("")
    environ = {"PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(tmp_path), "CALLS": str(calls), **env}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=repo, env=environ, capture_output=True, text=True,
                          timeout=30)
    return proc, calls.read_text().splitlines()


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert SCRIPT.stat().st_mode & stat.S_IXUSR


def test_without_deploy_kit_it_refuses_before_installing_anything(tmp_path):
    proc, calls = run(tmp_path, **SECRETS)
    assert proc.returncode != 0
    assert "DEPLOY_KIT" in proc.stderr and "pinned wheel or git URL" in proc.stderr
    assert calls == [] and not (tmp_path / "project/.ci-ssh").exists()


@pytest.mark.parametrize("value", ["deploy-kit", "git+https://github.com/acme/deploy-kit.git",
                                   "git+ssh://git@github.com/acme/deploy-kit.git@main"])
def test_a_bare_name_or_an_unpinned_url_is_refused(tmp_path, value):
    proc, calls = run(tmp_path, DEPLOY_KIT=value, **SECRETS)
    assert proc.returncode == 2 and "pinned to a full commit sha" in proc.stderr
    assert calls == []


def test_a_pinned_url_is_installed_apart_and_the_key_lives_only_during_the_job(tmp_path):
    url = "git+https://github.com/acme/deploy-kit.git@" + "a" * 40
    proc, calls = run(tmp_path, DEPLOY_KIT=url, DEPLOY_DIR="backend", GITHUB_SHA="abc123", **SECRETS)
    assert proc.returncode == 0, proc.stderr
    assert calls[0].startswith("python3 -m venv ") and calls[1].endswith(url)
    assert calls[2:] == ["deploy-kit check --stage staging-ci key=600",
                         "deploy-kit deploy --stage staging-ci --ref abc123 key=600"]
    assert not (tmp_path / "project/backend/.ci-ssh").exists()  # written beside hosts.toml, then removed


def _workflow() -> dict:
    text = WORKFLOW.read_text()
    assert "\t" not in text
    try:
        import yaml
    except ModuleNotFoundError:  # no PyYAML here: read the one step's env and run by hand
        step_env = dict(re.findall(r"^\s{10}(\w+): (.+?)(?:\s+#.*)?$", text, re.M))
        runs = re.findall(r"^\s+run: (.+)$", text, re.M)
        return {"env": step_env, "run": runs[-1], "text": text}
    steps = yaml.safe_load(text)["jobs"]["deploy"]["steps"]
    step = next(s for s in steps if s.get("name") == "deploy")
    return {"env": step["env"], "run": step["run"], "text": text}


def test_the_workflow_pins_deploy_kit_and_runs_the_copied_script():
    workflow = _workflow()
    assert PINNED.search(workflow["env"]["DEPLOY_KIT"])
    assert workflow["run"] == "ci/deploy.sh" and "./examples/ci/deploy.sh" not in workflow["text"]
    assert workflow["env"]["DEPLOY_STAGE"] == "staging-ci"
    assert workflow["env"]["DEPLOY_SSH_KEY"] == "${{ secrets.DEPLOY_SSH_KEY }}"


def test_a_wheel_path_is_taken_from_where_the_job_runs_even_with_deploy_dir(tmp_path):
    (tmp_path / "project/dist").mkdir(parents=True)
    wheel = tmp_path / "project/dist/deploy_kit-0.1.0-py3-none-any.whl"
    wheel.write_text("")
    proc, calls = run(tmp_path, DEPLOY_KIT="dist/" + wheel.name, DEPLOY_DIR="backend", **SECRETS)
    assert proc.returncode == 0, proc.stderr
    assert calls[1].endswith(f" {wheel}")
    missing, calls = run(tmp_path, DEPLOY_KIT="dist/nope.whl", **SECRETS)
    assert missing.returncode == 2 and "no such wheel file" in missing.stderr and calls == []
