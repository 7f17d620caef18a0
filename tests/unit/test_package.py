"""One task collection, shipped in the package: `fab` here, `fab` in a user's project (fabfile.py) and
the `deploy-kit` command all run `deploy_kit.tasks.ns`, and the wheel carries it."""

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import fabfile
from deploy_kit import cli, tasks

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_fabfile_the_command_and_the_package_share_one_collection():
    assert fabfile.ns is tasks.ns and cli.program.namespace is tasks.ns
    env = {k: v for k, v in os.environ.items() if k != "DEPLOY_KIT_CONFIG"}
    listings = [subprocess.run([str(BIN / program), "--list"], cwd=ROOT, capture_output=True, text=True,
                               check=True, env=env).stdout for program in ("fab", "deploy-kit")]
    fab, deploy_kit = (listing.split("\n", 1) for listing in listings)  # "Available tasks:" / "Subcommands:"
    assert fab[1] == deploy_kit[1] and "init" in fab[1] and "env.set" in fab[1]


def test_the_package_config_ships_the_tasks_and_the_example_configuration():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["scripts"]["deploy-kit"] == "deploy_kit.cli:main"
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["deploy_kit*"]
    assert "hosts.example.toml" in config["tool"]["setuptools"]["package-data"]["deploy_kit"]


def test_the_built_wheel_holds_the_tasks_the_host_programs_and_the_example(tmp_path):
    # About 5 s: pip builds in an isolated environment from the configured (local) indexes.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=120)
    wheel = next(tmp_path.glob("deploy_kit-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("deploy_kit/tasks/__init__.py", "deploy_kit/tasks/init.py", "deploy_kit/tasks/deploy.py",
                 "deploy_kit/cli.py", "deploy_kit/init.py", "deploy_kit/hosts.example.toml",
                 "deploy_kit/remote/cutover.py"):
        assert name in names
    assert not any(name.startswith(("fabfile/", "tests/", "examples/")) for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "deploy-kit = deploy_kit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
