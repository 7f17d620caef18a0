"""Settings of the example app. Everything host-specific or secret comes from the environment,
which systemd loads from the env file (EnvironmentFile=) that `fab setup` creates:

    DJANGO_SECRET_KEY       required
    CELERY_BROKER_URL       required, e.g. redis://:password@localhost:6379/0 or
                            amqp://user:password@localhost:5672// (RabbitMQ)
    CELERY_RESULT_BACKEND   optional, defaults to the broker URL on Redis, rpc:// on RabbitMQ
    DATABASE_URL            optional, sqlite:////abs/path.sqlite3 (default: db.sqlite3 beside
                            the code) or postgres://user:password@host:5432/name
    DJANGO_DEBUG            optional, "1" to turn debug on
"""

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def required(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ImproperlyConfigured(
            f"{name} is not set: add it to the app's env file (fab env.set {name}=...)"
        )
    return value


def database(url: str) -> dict:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:////srv/app/shared/db.sqlite3 -> /srv/app/shared/db.sqlite3
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": unquote(parts.path) or ":memory:"}
    if parts.scheme in ("postgres", "postgresql"):
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    raise ImproperlyConfigured(f"DATABASE_URL: unsupported scheme {parts.scheme!r}")


SECRET_KEY = required("DJANGO_SECRET_KEY")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "ledger",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "exampleapp.urls"
TEMPLATES: list[dict] = []
DATABASES = {
    "default": database(os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"))
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"journal": {"()": "exampleapp.journal.JournalFormatter", "fmt": "%(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "journal"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}

# Celery: read by exampleapp/celery.py (namespace "CELERY").
CELERY_BROKER_URL = required("CELERY_BROKER_URL")
# RabbitMQ is no result store: Celery sends results back to the caller over it instead (rpc://).
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or (
    "rpc://" if CELERY_BROKER_URL.startswith(("amqp", "pyamqp")) else CELERY_BROKER_URL
)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ACKS_LATE = True  # the tasks below are idempotent: re-run them if a worker dies
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_TIME_LIMIT = 300
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_ROUTES = {"ledger.tasks.summarize": {"queue": "reports"}}
CELERY_BEAT_SCHEDULE = {
    "heartbeat": {"task": "ledger.tasks.heartbeat", "schedule": 30.0},
}
