"""The Celery app: configured from Django's settings (CELERY_* names), tasks found in installed apps.

Workers start it with `celery -A exampleapp worker`.
"""

import os

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger

from .journal import use_journal_priorities

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleapp.settings")

app = Celery("exampleapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

after_setup_logger.connect(use_journal_priorities)
after_setup_task_logger.connect(use_journal_priorities)
