"""`fab init`: what it finds in a Django project, what it writes, and that it never overwrites."""

import subprocess
import tomllib
from pathlib import Path

import pytest

from deploy_kit import config, init
from deploy_kit.errors import UsageError

MANAGE = 'import os\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", "{name}.settings")\n'
CELERY = "from celery import Celery\n\napp = Celery('{name}')\n"


def project(tmp_path: Path, layout: dict[str, str]) -> Path:
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


def test_manage_py_at_the_top_and_the_app_in_proj_celery(tmp_path):
    root = project(tmp_path, {"manage.py": MANAGE.format(name="shop"), "shop/celery.py": CELERY.format(name="shop"),
                              "requirements.txt": "celery\n"})
    found = init.detect(root)
    assert (found.path, found.name, found.celery_app, found.requirements) == ("", "shop", "shop.celery",
                                                                            "requirements.txt")
    assert found.missing == []


def test_manage_py_in_a_subdirectory_and_the_app_in_celery_app(tmp_path):
    root = project(tmp_path, {"backend/manage.py": MANAGE.format(name="My_Site"),
                              "backend/mysite/celery_app.py": CELERY.format(name="x"),
                              "backend/requirements.txt": "celery\n",
                              ".venv/lib/celery.py": CELERY.format(name="not-this")})
    found = init.detect(root)
    assert (found.path, found.name, found.celery_app) == ("backend", "my_site", "mysite.celery_app")


def test_nothing_found_names_each_key_to_fill(tmp_path):
    root = project(tmp_path, {"README.md": "hello\n"})
    found = init.detect(root)
    assert [m.split(":")[0] for m in found.missing] == ["app.path", "app.name", "app.celery_app",
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
