"""The probes run as the service (`remote/probes.py`), shipped as one text with hostlib."""

import subprocess
import sys

from deploy_kit.remote import probes


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
