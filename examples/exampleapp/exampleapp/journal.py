"""Log lines with their priority for journald: under systemd (JOURNAL_STREAM set), each line
starts with a printk-style prefix such as <4>, which journald turns into the line's priority,
so `journalctl -p warning` and `fab logs` can tell warnings and errors apart."""

import logging
import os

PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def __init__(self, fmt=None, datefmt=None, style="%", inner=None, **kwargs):
        super().__init__(fmt, datefmt, style, **kwargs)
        self.inner = inner
        self.enabled = bool(os.environ.get("JOURNAL_STREAM"))

    def format(self, record):
        text = self.inner.format(record) if self.inner else super().format(record)
        if not self.enabled:
            return text
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def use_journal_priorities(logger, *args, **kwargs):
    """Celery's after_setup_logger hook: wrap the handlers' formatters."""
    for handler in logger.handlers:
        if not isinstance(handler.formatter, JournalFormatter):
            handler.setFormatter(JournalFormatter(inner=handler.formatter or logging.Formatter()))
