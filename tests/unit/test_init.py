"""`fab init`: what it finds in a Django project, what it writes, and that it never overwrites."""

import io
import os
import subprocess
import sys
import tarfile
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy_kit import config, init, release
from deploy_kit.errors import UsageError

MANAGE = 'import os\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", "{name}.settings")\n'
CELERY = "from celery import Celery\n\napp = Celery('{name}')\n"


COOKIECUTTER_CELERY = ('import os\n\nfrom celery import Celery\n\n'
                       'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")\n\n'
                       'app = Celery("myproj")\n')
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def project(tmp_path: Path, layout: dict[str, str]) -> Path:
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


def commit_all(root: Path) -> None:
    env = {**os.environ, **GIT_ENV}
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", "project"], check=True, env=env)


def packed(hosts_toml: Path, tmp_path: Path) -> tuple[list[str], str]:
    """What a deploy with this configuration would ship: the files of the archive and the requirements."""
    app = config.load(hosts_toml).stage("staging").app
    source = release.read_source(app, "HEAD", datetime.now(UTC), tmp_path / "cache")
    with tarfile.open(fileobj=io.BytesIO(source.archive)) as archive:
        return sorted(archive.getnames()), source.requirements


BACKEND = {"backend/manage.py": MANAGE.format(name="shop"), "backend/shop/celery.py": CELERY.format(name="shop"),
           "backend/requirements.txt": "celery\n", "frontend/package.json": "{}\n", "README.md": "hi\n"}


def test_manage_py_at_the_top_and_the_app_in_proj_celery(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop"), "shop/celery.py": CELERY.format(name="shop"),
                              "requirements.txt": "celery\n"})
    found = init.detect(root)
    assert (found.path, found.name, found.celery_app, found.requirements) == ("", "shop", "shop.celery",
                                                                            "requirements.txt")
    assert found.missing == []


def test_manage_py_in_a_subdirectory_and_the_app_in_celery_app(tmp_path):
    root = project(tmp_path, {"backend/manage.py": MANAGE.format(name="My_Site"),
                              "backend/mysite/celery_app.py": CELERY.format(name="My_Site"),
                              "backend/requirements.txt": "celery\n",
                              ".venv/lib/celery.py": CELERY.format(name="not-this")})
    found = init.detect(root)
    assert (found.path, found.name, found.celery_app) == ("backend", "my_site", "mysite.celery_app")


def test_nothing_found_names_each_key_to_fill(tmp_path):
    root = project(tmp_path, {"README.md": "hello\n"})
    found = init.detect(root)
    assert [m.split(":")[0] for m in found.missing] == ["app.path", "app.celery_app", "app.name",
                                                         "app.requirements"]


def test_written_files_load_and_point_at_this_repository(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop"), "shop/celery.py": CELERY.format(name="shop"),
                              "requirements.txt": "celery\n"})
    written, kept, _found = init.write(root)
    assert written == ["fabfile.py", "hosts.toml"] and kept == []
    text = (root / "hosts.toml").read_text()
    app = tomllib.loads(text)["app"]
    assert (app["repo"], app["name"], app["celery_app"], app["path"]) == (".", "shop", "shop.celery", "")
    assert app["deploy_to"] == "/srv/shop" and app["user"] == "shop"
    stage = config.load(root / "hosts.toml").stage("staging")
    assert stage.app.repo == str(root)  # "." is this file's directory, wherever fab runs
    assert "from deploy_kit.tasks import ns" in (root / "fabfile.py").read_text()


def test_existing_files_are_left_alone(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop"), "hosts.toml": "# mine\n"})
    written, kept, _found = init.write(root)
    assert written == ["fabfile.py"] and kept == ["hosts.toml"]
    assert (root / "hosts.toml").read_text() == "# mine\n"


def test_outside_a_git_repository_is_refused_with_the_fix(tmp_path):
    with pytest.raises(UsageError) as caught:
        init.write(tmp_path)
    assert "not inside a git repository" in str(caught.value) and "git init" in str(caught.value)
    assert caught.value.exit_code == 2


def test_init_in_the_subdirectory_holding_manage_py_ships_that_directory(tmp_path):
    root = project(tmp_path / "repo", BACKEND)
    written, _kept, found = init.write(root / "backend")
    assert written == ["fabfile.py", "hosts.toml"] and not (root / "hosts.toml").exists()
    commit_all(root)
    app = tomllib.loads((root / "backend/hosts.toml").read_text())["app"]
    assert (app["repo"], app["path"], found.repo) == ("..", "backend", "..")
    files, requirements = packed(root / "backend/hosts.toml", tmp_path)
    assert "manage.py" in files and "shop/celery.py" in files  # backend/'s tree, at the archive's top
    assert not any(name.startswith(("backend", "frontend", "README")) for name in files)
    assert requirements.strip() == "celery"


def test_init_directory_writes_there_with_repo_relative_to_that_directory(tmp_path):
    root = project(tmp_path / "repo", {**BACKEND, "deploy/.keep": ""})
    written, _kept, _found = init.write(root / "deploy")  # `init --directory deploy`, run from anywhere
    assert written == ["fabfile.py", "hosts.toml"]
    commit_all(root)
    app = tomllib.loads((root / "deploy/hosts.toml").read_text())["app"]
    assert (app["repo"], app["path"]) == ("..", "backend")
    files, _requirements = packed(root / "deploy/hosts.toml", tmp_path)
    assert "manage.py" in files and not any(name.startswith("backend") for name in files)


def test_init_at_the_top_ships_the_manage_py_subdirectory(tmp_path):
    root = project(tmp_path / "repo", BACKEND)
    init.write(root)
    commit_all(root)
    app = tomllib.loads((root / "hosts.toml").read_text())["app"]
    assert (app["repo"], app["path"]) == (".", "backend")
    files, _requirements = packed(root / "hosts.toml", tmp_path)
    assert "manage.py" in files and "shop/celery.py" in files


def test_the_manage_py_under_the_directory_init_runs_in_comes_first(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="old"), "apps/new/manage.py": MANAGE.format(name="new")})
    assert init.detect(root).path == ""
    assert init.detect(root, near=root / "apps/new").path == "apps/new"


def test_cookiecutter_django_takes_the_name_from_celery_not_from_the_settings_package(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.replace("{name}.settings", "config.settings.local"),
                              "config/celery_app.py": COOKIECUTTER_CELERY, "config/settings/local.py": "",
                              "requirements.txt": "celery\n"})
    found = init.detect(root)
    assert (found.name, found.celery_app) == ("myproj", "config.celery_app")


def test_celery_dot_celery_is_found_too(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop"),
                              "shop/celery.py": "import celery\n\napp = celery.Celery(\"shopper\")\n"})
    found = init.detect(root)
    assert (found.name, found.celery_app) == ("shopper", "shop.celery")


def test_the_written_copy_reads_as_the_configuration_not_as_an_example(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop"), "shop/celery.py": CELERY.format(name="shop")})
    init.write(root)
    text = (root / "hosts.toml").read_text()
    assert "Copy this file" not in text and "`fab init`" not in text
    assert text.startswith("# Written by deploy-kit's `init`")
    assert "resolves\n# against this file's directory" in text


def test_the_fabfile_shows_how_to_add_a_task_and_that_way_works(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop")})
    init.write(root)
    text = (root / "fabfile.py").read_text()
    assert "ns.add_task" in text
    # Uncomment the example (below the first bare "#"), as a user would: `fab --list` then shows it.
    lines = text.splitlines()
    example = lines.index("#")
    lines[example:] = [line.removeprefix("#").removeprefix(" ") for line in lines[example:]]
    (root / "fabfile.py").write_text("\n".join(lines) + "\n")
    listed = subprocess.run([str(Path(sys.executable).with_name("fab")), "--list"], cwd=root, capture_output=True,
                            text=True, env={k: v for k, v in os.environ.items() if k != "DEPLOY_KIT_CONFIG"})
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("  ")]
    assert "tests" in names and "deploy" in names and "env.set" in names
