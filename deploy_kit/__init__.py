"""deploy-kit: deploy Django apps whose Celery workers and Beat run as hardened systemd services."""

__version__ = "0.1.0"
