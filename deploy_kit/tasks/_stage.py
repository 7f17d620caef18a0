"""The flags every task shares, and the help text that goes with them."""

from deploy_kit import config
from deploy_kit.config import Stage

STAGE_HELP = "stage of hosts.toml to act on (default: its default_stage, or its only stage)"


def load_stage(stage: str | None) -> Stage:
    return config.load().stage(stage)
