"""The probes run as the service (`remote/probes.py`), shipped as one text with hostlib."""

import json
import subprocess
import sys

import pytest

from deploy_kit.remote import hostlib, probes


def run_probe(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-c", probes.program(), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(tmp_path), **(env or {})})


def test_the_app_probe_imports_a_real_celery_app_and_counts_its_tasks(tmp_path):
    (tmp_path / "shop.py").write_text("from celery import Celery\napp = Celery('shop')\n\n"
                                      "@app.task\ndef ping():\n    return 'pong'\n")
    done = run_probe(tmp_path, "app", "shop")
    assert done.returncode == 0 and done.stdout.startswith("ok ") and "tasks registered" in done.stdout


def test_the_app_probe_names_the_import_error_and_masks_the_broker_password(tmp_path):
    (tmp_path / "shop.py").write_text("import os\n"
                                      "raise RuntimeError('cannot reach ' + os.environ['CELERY_BROKER_URL'])\n")
    done = run_probe(tmp_path, "app", "shop", env={"CELERY_BROKER_URL": "redis://:hunter2-secret@db:6379/0"})
    assert done.returncode == 1 and done.stdout.startswith("fail RuntimeError: cannot reach redis://")
    assert "hunter2" not in done.stdout + done.stderr


def test_the_broker_probe_says_an_empty_url_is_the_problem(tmp_path):
    done = run_probe(tmp_path, "broker")
    assert done.returncode == 1 and "CELERY_BROKER_URL is empty" in done.stdout


def _project(tmp_path, check_fails=False):
    """A tiny Django project with a Celery app: manage.py sets its settings as manage.py files do."""
    (tmp_path / "manage.py").write_text(
        "import os, sys\n"
        "def main():\n"
        "    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'proj.settings')\n"
        "    from django.core.management import execute_from_command_line\n"
        "    execute_from_command_line(sys.argv)\n"
        "if __name__ == '__main__':\n    main()\n")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "__init__.py").write_text("")
    (tmp_path / "proj" / "settings.py").write_text(
        "SECRET_KEY = 'x'\nINSTALLED_APPS = ['proj']\nDATABASES = {}\nUSE_TZ = True\n")
    (tmp_path / "proj" / "apps.py").write_text(
        "from django.apps import AppConfig\nfrom django.core import checks\n"
        "class ProjConfig(AppConfig):\n    name = 'proj'\n"
        "@checks.register()\ndef broken(app_configs, **kwargs):\n"
        f"    return [checks.Error('the settings are broken', id='proj.E001')] if {check_fails} else []\n")
    (tmp_path / "proj" / "celery.py").write_text(
        "from celery import Celery\napp = Celery('proj')\n@app.task\ndef hello():\n    return 1\n")


@pytest.mark.parametrize("check_fails", [False, True])
def test_the_release_check_runs_manage_py_check_and_imports_the_app_in_one_python(tmp_path, check_fails):
    _project(tmp_path, check_fails)
    proc = subprocess.run([sys.executable, "-c", hostlib.READ_PROGRAM, "release", "proj.celery", "[]"],
                          input=hostlib.program_line(probes.release_program()), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin"})
    last = proc.stdout.strip().splitlines()[-1].removeprefix(probes.RESULT)
    if check_fails:
        assert proc.returncode == 1 and last == "fail manage.py check" and "proj.E001" in proc.stderr
    else:
        assert proc.returncode == 0 and last.startswith("ok ")
        assert json.loads(last[3:])["tasks"].endswith("tasks registered")


def test_a_celery_app_that_needs_django_set_up_fails_as_its_worker_would(tmp_path):
    """A worker imports the Celery app before anything sets Django up: so does the release check."""
    _project(tmp_path)
    (tmp_path / "proj" / "celery.py").write_text(
        "from django.apps import apps\napps.check_apps_ready()\nfrom celery import Celery\napp = Celery('proj')\n")
    proc = subprocess.run([sys.executable, "-c", hostlib.READ_PROGRAM, "release", "proj.celery", "[]"],
                          input=hostlib.program_line(probes.release_program()), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "proj.settings"})  # the env file's
    last = proc.stdout.strip().splitlines()[-1].removeprefix(probes.RESULT)
    assert proc.returncode == 1 and "does not import" in last and "AppRegistryNotReady" in last
