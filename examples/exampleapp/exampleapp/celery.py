"""The Celery app: configured from Django's settings (CELERY_* names), tasks found in installed apps.

Workers start it with `celery -A exampleapp worker`.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleapp.settings")

app = Celery("exampleapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
