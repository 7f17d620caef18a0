"""Runs ON a host, as root: asks the Celery agent, as the service with a release's Python, a few
requests in one go (`fab queues`, `fab status`, the summary after a deploy, the task-name check
of a new release) and prints one JSON object: {"answers": [detail, ...]} or {"error": "..."}.

    params: releases_dir, current, venv, service_environment, app.celery_app,
            release (None: the current one), requests ([{"op": ...}, ...])
"""

from __future__ import annotations

import json
import os

from deploy_kit.remote.agent_client import Agent, StepFailed


def ask(params: dict, requests: list) -> list:
    """Each request's answer, in order; StepFailed naming the first that failed."""
    release = params.get("release")
    if not release:
        if not os.path.islink(params["current"]):
            raise StepFailed("no release is live on this host yet: `fab deploy` first")
        release = os.path.basename(os.readlink(params["current"]))
    agent = Agent(params, release, purpose="report")
    try:
        agent.ask(None, 90)
        return [agent.ask(request, 60) for request in requests]
    finally:
        agent.close()


def main(params: dict) -> None:
    try:
        print(json.dumps({"answers": ask(params, params["requests"])}))
    except StepFailed as exc:
        print(json.dumps({"error": str(exc)}))
