"""The example app's Celery tasks: a normal one, one for the reports queue, one run by Beat."""

import logging
import os
import socket
import time
from pathlib import Path

from celery import shared_task
from django.db.models import Sum

from .models import Entry

logger = logging.getLogger(__name__)


@shared_task
def record_entry(kind: str, amount: int) -> int:
    """Write one ledger entry; returns its id."""
    entry = Entry.objects.create(kind=kind, amount=amount)
    logger.info("recorded %s entry %s of %s", kind, entry.pk, amount)
    return entry.pk


@shared_task
def summarize() -> dict:
    """Totals per ledger; routed to the "reports" queue."""
    return {"entries": Entry.objects.count(), "total": Entry.objects.aggregate(t=Sum("amount"))["t"] or 0}


@shared_task
def heartbeat() -> str:
    """Run by Celery Beat every 30 s: proves Beat and a worker are alive (logs only, so it
    works on every host even when each sandbox host has its own SQLite file)."""
    logger.info("heartbeat from pid %s in %s", os.getpid(), Path(__file__).resolve().parent.parent)
    return "ok"


@shared_task
def slow(seconds: float, tag: str = "") -> float:
    """Sleep, to show that a restart lets running tasks finish (warm shutdown)."""
    logger.info("slow start %s in pid %s", tag, os.getpid())
    time.sleep(seconds)
    logger.info("slow done %s", tag)
    return seconds


@shared_task
def release() -> str:
    """The directory of the code this worker runs: which release consumed the task."""
    return str(Path(__file__).resolve().parent.parent)


@shared_task
def echo(text: str) -> str:
    """Log `text` at warning level and return it (shows up in `fab logs`)."""
    logger.warning("echo: %s", text)
    return text


@shared_task
def probe(tag: str, seconds: float = 0) -> dict:
    """Which release ran this, on which host, and when it started; sleeps `seconds` first (the
    deploy tests and the benchmark send these while a deploy runs)."""
    started = time.time()
    logger.info("probe %s ran", tag)
    time.sleep(seconds)
    return {"release": str(Path(__file__).resolve().parent.parent), "host": socket.gethostname(), "started": started}
