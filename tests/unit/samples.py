"""A two-host stage shared by the unit tests that plan and check hosts from recorded probe output."""

from pathlib import Path

from deploy_kit import config

STAGE = """
[stages.prod]
[[stages.prod.hosts]]
name = "web1"
address = "10.0.0.5"
roles = ["worker", "beat", "migrate"]
[[stages.prod.hosts]]
name = "web2"
address = "10.0.0.6"
[stages.prod.app]
name = "shop"
repo = "git@example.com:acme/shop.git"
celery_app = "shop"
[[stages.prod.workers]]
name = "default"
"""

ONE_HOST = STAGE.replace('[[stages.prod.hosts]]\nname = "web2"\naddress = "10.0.0.6"\n', "")  # web1 alone

WORKER = "shop-worker-default@.service"  # the template unit file
INSTANCE = "shop-worker-default@2026-11-24-120000.service"  # the current release's instance
BEAT = "shop-beat.service"
RELEASE = "/srv/shop/releases/2026-11-24-120000"


def stage_of(text: str = STAGE) -> config.Stage:
    return config.parse(text, Path("/x/hosts.toml")).stage("prod")
