"""Runs ON a host, as the service (its user, env file and sandbox, under `systemd-run`), with the
Python the service runs: the checks that only the service's own view can answer.

    broker          CELERY_BROKER_URL reaches the broker (with kombu if the Python has it,
                    else a plain Redis PING or AMQP handshake), credentials never printed
    app NAME        the Celery app NAME imports and registers its tasks
    release NAME Q  a new release's check, in one Python: `manage.py check` as manage.py runs
                    it, then the Celery app imports, then (Q: a JSON list of queues) the task
                    names waiting there that it does not register (`release_program()`)

Each prints one last line, `ok DETAIL` or `fail DETAIL`, and exits 0 or 1 (`hostlib.as_service`
reads it). The service's Python has no deploy_kit package: `program()` ships this module with
hostlib in one text. Python 3.8+, stdlib only (kombu and celery are used when present).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import socket
import ssl
import sys
import traceback
from urllib.parse import unquote, urlsplit

from deploy_kit.remote import hostlib

PORTS = {"redis": 6379, "rediss": 6380, "amqp": 5672, "amqps": 5671}


def broker(url: str) -> tuple:
    """(ok, detail) for the broker at `url`; the detail never holds a part of its credentials."""
    if not url:
        return False, "CELERY_BROKER_URL is empty in the service's environment"
    problem = hostlib.url_problem(url, "CELERY_BROKER_URL")
    if problem:
        return False, problem
    try:
        import kombu
    except ImportError:
        kombu = None
    if kombu is not None:
        try:
            with kombu.Connection(url, connect_timeout=5) as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
            return True, "connected with kombu as the service"
        except Exception as exc:  # noqa: BLE001 - every failure is the answer
            return False, f"{type(exc).__name__}: {exc}"
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    port = parts.port or PORTS.get(scheme, 0)
    if not parts.hostname or not port:
        return False, f"cannot probe a {scheme!r} broker URL without kombu"
    try:
        with socket.create_connection((parts.hostname, port), timeout=5) as raw:
            sock = ssl.create_default_context().wrap_socket(raw, server_hostname=parts.hostname) \
                if scheme in ("rediss", "amqps") else raw
            if scheme.startswith("redis"):
                return _redis(sock, unquote(parts.username or ""), unquote(parts.password or ""))
            if scheme.startswith("amqp"):
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                if sock.recv(1) != b"\x01":
                    return False, "no AMQP handshake"
            return True, "broker port answers as the service"
    except Exception as exc:  # noqa: BLE001
        return False, f"{parts.hostname}:{port}: {exc}"


def _redis(sock: socket.socket, user: str, password: str) -> tuple:
    def command(*args: str) -> str:
        data = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        sock.sendall(data.encode())
        return sock.recv(512).decode(errors="replace").strip()

    if password:
        reply = command("AUTH", user, password) if user else command("AUTH", password)
        if not reply.startswith("+OK"):
            return False, "redis refused the password: " + reply.lstrip("-")
    reply = command("PING")
    if reply != "+PONG":
        return False, "redis answered PING with " + reply.lstrip("-")
    return True, "redis answered PING as the service"


def app(name: str) -> tuple:
    """(ok, detail): the Celery app imports, with its tasks, as the service would start it."""
    try:
        from celery.app.utils import find_app

        found = find_app(name)
        found.loader.import_default_modules()
        return True, f"{len(found.tasks)} tasks registered"
    except BaseException as exc:  # noqa: BLE001 - an import may raise anything, even SystemExit
        lines = str(exc).splitlines()
        return False, f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def release(celery_app: str, queues: list) -> tuple:
    """(ok, detail): the Celery app imports in a fresh interpreter, as a worker starts it; then
    `manage.py check` runs in this process as manage.py runs it (its messages go to stdout and
    stderr); then the queued task names the app lacks. The detail of a success is JSON:
    {"tasks", "unregistered": {name: count}} or, when the queues could not be read,
    {"tasks", "queued_error"}."""
    ok, detail = app(celery_app)
    if not ok:
        return False, f"the Celery app -A {celery_app} does not import: {detail}"
    argv = sys.argv
    sys.argv = ["manage.py", "check", "--fail-level", "ERROR"]
    try:
        runpy.run_path("manage.py", run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            return False, "manage.py check"
    except BaseException:  # noqa: BLE001 - e.g. an ImportError in the settings: show where
        traceback.print_exc()
        return False, "manage.py check"
    finally:
        sys.argv = argv
    found: dict = {"tasks": detail}
    if queues:
        try:
            from celery.app.utils import find_app

            celery_agent = importlib.import_module("deploy_kit.remote.celery_agent")  # shipped by the build only
            found["unregistered"] = json.loads(celery_agent.unregistered(find_app(celery_app), queues))
        except Exception as exc:  # noqa: BLE001 - the broker may be down: the deploy decides
            found["queued_error"] = f"{type(exc).__name__}: {exc}"
    return True, json.dumps(found)


RESULT = "deploy-kit-release-check: "  # marks the release check's answer among the project's output


def main(argv: list) -> None:
    url = os.environ.get("CELERY_BROKER_URL", "").strip()
    secrets = hostlib.env_secrets()
    try:
        if argv[0] == "broker":
            ok, detail = broker(url)
        elif argv[0] == "release":
            ok, detail = release(argv[1], json.loads(argv[2]))
        else:
            ok, detail = app(argv[1])
    except BaseException as exc:  # noqa: BLE001 - a bug here must still answer, masked
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    answer = ("ok " if ok else "fail ") + hostlib.hide(detail, secrets)
    if argv[0] != "release":
        print(answer)
        sys.exit(0 if ok else 1)
    print(RESULT + answer)  # the project's code ran here: nothing it left (atexit, threads) prints after it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)


def program() -> str:
    """This module and hostlib as one text for `python -c TEXT broker` or `... app NAME`."""
    sources = [(name, hostlib.source_of(name)) for name in ("contracts", "hostlib", "probes")]
    return hostlib.bundle(sources, "module.main(sys.argv[1:])\n")


def release_program() -> str:
    """The release check's text, with the Celery agent's queue reading: it travels on stdin
    (`python -c hostlib.READ_PROGRAM release APP QUEUES`)."""
    agent = importlib.import_module("deploy_kit.remote.celery_agent")  # shipped with the build program, or here
    sources = [(name, hostlib.source_of(name)) for name in (*agent.SHIPPED, "probes")]
    return hostlib.bundle(sources, "module.main(sys.argv[1:])\n")

