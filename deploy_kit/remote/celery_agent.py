"""The Celery side of a handover, run as the service with the target release's Python.

The cutover program starts this once per host (under `systemd-run --pipe`, with the unit's
user, env file and sandbox) while the new workers start, so Celery is imported and the broker
connected by the time they are ready. It reads one JSON request per line on stdin and answers
one JSON line each: `{"ok": true|false, "detail": "..."}`. It never prints a secret.

    {"op": "verify", "task", "queue", "timeout", "nonce"}     a real task on a private queue
    {"op": "add_consumer", "queue", "node"}                     the node consumes `queue` too
    {"op": "cancel_consumer", "queue", "node"}                  ... and no more
    {"op": "handoff", "nodes", "timeout", "since"}              wait until the nodes started every task
                                                                they took (none reserved), then their
                                                                warm shutdowns return nothing late
    {"op": "queues", "node"}                                    what the node consumes now
    {"op": "sync_revoked", "olds", "node", "everyone"}          the node learns the revoked task ids the
                                                                old nodes know (mingle's sync, sent);
                                                                `everyone`: every node's when they are
                                                                silent or gone
    {"op": "discard_queue", "queue"}                            delete a private queue, and what a
                                                                killed worker held of it (Redis)
    {"op": "restore_stranded", "queues"}                        put back what dead workers held (Redis;
                                                                RabbitMQ does it by itself)
    {"op": "nodes"}                                             the nodes that answer a broadcast in 1.5 s
    {"op": "report", "queues", "nodes"}                         depths, unacked, stranded, workers (JSON);
                                                                of `nodes` (found a moment earlier), else
                                                                of those that answer a broadcast
    {"op": "unregistered", "queues"}                            waiting task names the app lacks (JSON)

Redis and RabbitMQ (kombu's `amqp` transport) are read each its own way: Redis's lists and its
`unacked` hash directly; RabbitMQ's ready counts with a passive queue.declare, its unacknowledged
counts from its management API (AMQP does not tell them), its waiting task names by taking the
first messages without acknowledging them and closing the channel, which puts them back.

The cutover program and `remote/queues.py` speak to it through `agent_client.Agent` (re-exported
here, with `StepFailed`), which ships this file to the service's Python (`program()`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

from deploy_kit.remote import hostlib

# DEPLOY_KIT_RABBITMQ_API: RabbitMQ's management API, when it is not at the broker's host on port
# 15672 (15671 over TLS) with the broker's user, e.g. https://monitor:PASSWORD@mq.internal:15671/api/
SECRETS = hostlib.env_secrets()


def say(ok: bool, detail: str, request_id: object = None) -> None:
    answer = {"ok": ok, "detail": hostlib.hide(detail, SECRETS)}
    if request_id is not None:  # the request it answers (one given up on may still be answered late)
        answer["id"] = request_id
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def queues_of(app, node: str) -> list:
    replies = app.control.inspect(destination=[node], timeout=3).active_queues() or {}
    return sorted(q["name"] for q in replies.get(node, []))


def handoff(app, nodes: list, timeout: float, since: float) -> str:
    """Workers that stopped consuming still hold what they took and had not started (reserved);
    a warm shutdown does not run those, and returns them to the queue only when it ends (after
    its longest running task). On Redis a BRPOP sent before the cancel may still take a message
    until its own timeout (kombu's `polling_interval`, 1 s): while the worker's loop runs, kombu
    puts that one back at once; from its warm shutdown on, only when the shutdown ends. So wait
    out that BRPOP first (counted from `since`, the host's `time.monotonic()` when the nodes were
    told to stop consuming: what the caller did meanwhile shortens the wait), then until no node holds a task it has not
    started (bounded; tasks with an ETA or countdown stay with it until it ends, as with any
    warm shutdown)."""
    with app.connection_for_write() as connection:
        redis = connection.transport.driver_type == "redis"
    if redis:
        interval = float((app.conf.broker_transport_options or {}).get("polling_interval") or 1)
        time.sleep(max(0.0, since + interval + 0.2 - time.monotonic()))
    deadline = time.monotonic() + timeout
    while True:
        replies = app.control.inspect(destination=list(nodes), timeout=1).reserved() or {}
        held = {node: len(replies[node]) for node in nodes if replies.get(node)}
        silent = [node for node in nodes if node not in replies]
        if not held and not silent:
            return "no task is held by " + ", ".join(nodes)
        if time.monotonic() > deadline:
            raise StillHeld("; ".join([*(f"{node} still holds {n} task(s) it has not started (its pool is busy)"
                                         for node, n in held.items()),
                                       *(f"{node} did not say what it holds" for node in silent)]))
        time.sleep(0.1)


def sync_revoked(app, olds: list, node: str, everyone: bool) -> str:
    """What Celery's mingle does at a worker's start, done for it: a new instance starts without
    mingle (about 1 s saved) and, before it takes a user task, gets the task ids the old nodes
    know as revoked (their `inspect revoked`), through the same `hello` command mingle sends (ids
    only, oldest first; `revoke` would touch the result backend for each). With `everyone` (it
    started without mingle), when an old node is silent or gone: every node that answers within
    1 s, as mingle asks them. The node must take them (asked again, as a reply can be lost)."""
    replies = (app.control.inspect(destination=list(olds), timeout=3).revoked() or {}) if olds else {}
    silent = [old for old in olds if old not in replies]
    if everyone and (silent or not olds):
        replies.update({n: ids for n, ids in (app.control.inspect(timeout=1).revoked() or {}).items() if n != node})
    ids = list(dict.fromkeys(task_id for ids in replies.values() for task_id in ids or []))
    deadline = time.monotonic() + 15
    while ids and node not in (app.control.inspect(destination=[node], timeout=3).hello(
            f"deploy-kit@{socket.gethostname()}", ids) or {}):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node} did not take the {len(ids)} revoked task id(s) of {', '.join(replies)}")
    asked, said = ", ".join(sorted(replies)), f" ({', '.join(silent)} did not answer)" if silent else ""
    if not ids:
        return f"{node}: no revoked task id to pass on ({f'{asked} knew none' if asked else 'no node answered'}){said}"
    return f"{node} knows the {len(ids)} revoked task id(s) of {asked}{said}"


def discard_queue(app, queue: str) -> str:
    """Delete a private queue nobody will consume again. On Redis, a worker killed while it held a
    message keeps it in the `unacked` hash until the visibility timeout (an hour): drop those of
    this queue too, so nothing of it lingers in the broker."""
    dropped = 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        if connection.transport.driver_type == "redis":
            for tag, routing_key, _task, _taken in unacked(channel):
                if routing_key == queue:
                    channel.client.hdel(channel.unacked_key, tag)
                    channel.client.zrem(channel.unacked_index_key, tag)
                    dropped += 1
        channel.queue_delete(queue)
    return f"deleted {queue}" + (f" and {dropped} message(s) a killed worker held" if dropped else "")


def survey(app, timeout: float = 1.5, known: list | None = None) -> dict:
    """Every live worker (those that answer a broadcast within `timeout`; or the `known` ones, found
    a moment earlier, asked by name: done as soon as they all answered): the queues it consumes,
    the ids of the tasks it runs and holds (with an ETA or countdown too: a live worker holds those
    unacked until they are due), its counts, and whether every one answered each question."""
    consumes = app.control.inspect(destination=known, timeout=5 if known else timeout).active_queues() or {}
    nodes = sorted(consumes)
    inspect = app.control.inspect(destination=nodes, timeout=5)
    replies = [(method() or {}) if nodes else {}
               for method in (inspect.active, inspect.reserved, inspect.scheduled, inspect.stats)]
    active, reserved, scheduled, stats = replies
    workers = {node: {"queues": sorted(q["name"] for q in consumes[node]),
                      "active": len(active.get(node, [])), "reserved": len(reserved.get(node, [])),
                      "processed": sum((stats.get(node) or {}).get("total", {}).values())
                      if node in stats else None} for node in nodes}
    live = {t.get("id") for tasks in [*active.values(), *reserved.values()] for t in tasks}
    live |= {(t.get("request") or {}).get("id") for tasks in scheduled.values() for t in tasks}
    return {"workers": workers, "live": live,  # a known node that is silent now may hold messages too
            "complete": set(active) == set(reserved) == set(scheduled) == set(nodes) >= set(known or [])}


def unacked(channel) -> list:
    """(tag, routing key, task id, when it was taken) of every message Redis holds for a consumer."""
    client = channel.client
    taken = dict(client.zrange(channel.unacked_index_key, 0, -1, withscores=True))
    found = []
    for tag, raw in client.hgetall(channel.unacked_key).items():
        try:
            message, _exchange, routing_key = json.loads(raw)
            task_id = message.get("headers", {}).get("id") or message["properties"].get("correlation_id")
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        found.append((tag, routing_key, task_id, taken.get(tag)))
    return found


def stranded(held: list, live: set, queues: list, cutoff: float) -> list:
    """The held messages of `queues` no live worker holds, taken before `cutoff` (one it took in
    the last seconds may not show in its active or reserved tasks yet)."""
    return [h for h in held if h[1] in queues and h[2] not in live and h[3] is not None and h[3] <= cutoff]


RETURNS_BY_ITSELF = ("RabbitMQ puts back by itself what a worker held when the worker's connection closes (at "
                     "once for a killed worker, after the heartbeat timeout for a host that vanished): "
                     "nothing is left stranded, nothing to return")


def restore_stranded(app, queues: list, settle: float = 2.0) -> str:
    """Return to their queues the messages that no live worker holds. Redis keeps what a worker
    took in its `unacked` hash until the visibility timeout (an hour by default), even when that
    worker died; a message a live worker holds shows in its `active` or `reserved` tasks."""
    with app.connection_for_write() as connection:
        if connection.transport.driver_type == "amqp":
            return RETURNS_BY_ITSELF
        if connection.transport.driver_type != "redis":
            return f"stranded messages are read on Redis only; nothing done on {connection.transport.driver_type}"
        found = survey(app)
        if not found["complete"]:  # a silent worker's tasks would look stranded: touch nothing
            return "not every live worker answered; nothing returned (the visibility timeout will)"
        channel = connection.default_channel
        lost = stranded(unacked(channel), found["live"], queues, time.time() - settle)
        for tag, *_ in lost:
            channel.qos.restore_by_tag(tag, leftmost=True)
    return f"returned {len(lost)} message(s) a dead worker held to their queues"


def report(app, queues: list, settle: float = 2.0, nodes: list | None = None) -> str:
    """Per queue: messages waiting, held unacknowledged (and the oldest's age), stranded (held by
    no live worker; None when a worker did not answer); per live worker: its queues and counts.
    As JSON text, read without consuming anything."""
    found = survey(app, known=nodes)
    now = time.time()
    rows = {q: {"waiting": 0, "unacked": None, "oldest_unacked_s": None, "stranded": None} for q in queues}
    notes = []
    with app.connection_for_write() as connection:
        for queue in queues:
            with contextlib.suppress(Exception), connection.channel() as channel:  # one channel each: on
                # RabbitMQ a queue nobody declared yet (it holds nothing) closes the channel that asked
                rows[queue]["waiting"] = channel.queue_declare(queue=queue, passive=True).message_count
        channel = connection.default_channel
        if connection.transport.driver_type == "amqp":
            api = ManagementAPI(connection)
            for queue in queues:
                try:
                    rows[queue]["unacked"] = int((api.queue(queue) or {}).get("messages_unacknowledged") or 0)
                except ManagementUnavailable as exc:
                    notes.append(f"unacked unknown: {exc}")
                    break
        if connection.transport.driver_type == "redis":
            held = unacked(channel)
            lost = stranded(held, found["live"], queues, now - settle) if found["complete"] else None
            if lost and nodes:  # held by a node that was not found a moment earlier? Ask everyone
                found = survey(app)
                lost = stranded(held, found["live"], queues, now - settle) if found["complete"] else None
            for queue in queues:
                times = [h[3] for h in held if h[1] == queue and h[3] is not None]
                rows[queue].update(unacked=sum(1 for h in held if h[1] == queue),
                                   oldest_unacked_s=round(now - min(times), 1) if times else None,
                                   stranded=None if lost is None else sum(1 for h in lost if h[1] == queue))
    return json.dumps({"queues": rows, "workers": found["workers"], "complete": found["complete"],
                       "transport": connection.transport.driver_type, "notes": notes})


def unregistered(app, queues: list, limit: int = 10000) -> str:
    """Task names of the messages waiting in `queues` that this app does not register, with how
    many messages each (the first `limit` of each queue; nothing is consumed: peeked on Redis
    with LRANGE, taken and put back on RabbitMQ, see `peek_amqp`). JSON text."""
    counts: dict = {}
    with app.connection_for_write() as connection:
        if connection.transport.driver_type == "redis":
            channel = connection.default_channel
            names = [task_name(raw, None) for queue in queues for pri in channel.priority_steps
                     for raw in channel.client.lrange(channel._q_for_pri(queue, pri), 0, limit - 1)]
        elif connection.transport.driver_type == "amqp":
            names = [name for queue in queues for name in peek_amqp(connection, queue, limit)]
        else:
            names = []
    for name in names:
        if name is not None and name not in app.tasks:
            counts[name] = counts.get(name, 0) + 1
    return json.dumps(counts)


def task_name(body, headers) -> str | None:
    """The task a message asks for: in its headers (Celery's protocol 2) or its body (protocol 1);
    None when it is no Celery task message. On Redis the headers are inside the body's JSON."""
    try:
        if headers is None:
            message = json.loads(body)
            headers, body = message.get("headers") or {}, message.get("body")
        if headers.get("task"):
            return str(headers["task"])
        return str(json.loads(body)["task"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def peek_amqp(connection, queue: str, limit: int) -> list:
    """The task names of the first `limit` messages waiting in a RabbitMQ queue. AMQP cannot browse
    a queue: each message is taken without acknowledging it, and closing the channel puts them all
    back, each at its place (RabbitMQ marks them `redelivered`, which Celery ignores unless
    worker_deduplicate_successful_tasks is on). A quorum queue counts every return against its
    delivery limit, so only classic queues are peeked (as the management API tells, when it does)."""
    try:
        kind = (ManagementAPI(connection).queue(queue) or {}).get("type", "classic")
    except ManagementUnavailable:
        kind = "classic"  # Celery's default queues; the API is only asked to spare quorum queues
    if kind != "classic":
        return []
    names = []
    channel = connection.channel()
    try:
        for _ in range(limit):
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                break
            names.append(task_name(message.body, message.headers or {}))
    except Exception:  # noqa: BLE001 - a queue nobody declared yet has nothing waiting
        pass
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return names


class ManagementUnavailable(Exception):
    """RabbitMQ's management API did not answer; the text says why and what to do, with no secret."""


class ManagementAPI:
    """RabbitMQ's management HTTP API, read with the broker's own user (or DEPLOY_KIT_RABBITMQ_API)."""

    def __init__(self, connection, timeout: float = 5.0):
        import base64
        from urllib.parse import unquote, urlsplit

        url = os.environ.get("DEPLOY_KIT_RABBITMQ_API", "").strip()
        if url:
            parts = urlsplit(url)
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            self.base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
        else:
            tls = bool(connection.ssl) or connection.transport_cls == "amqps"  # amqps:// leaves .ssl unset
            user, password = connection.userid or "guest", connection.password or "guest"
            self.base = f"{'https' if tls else 'http'}://{connection.hostname}:{15671 if tls else 15672}/api"
        self.where = self.base.split("://", 1)[1]  # host:port/path, never the user
        self.vhost = connection.virtual_host or "/"
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def queue(self, name: str) -> dict | None:
        """The API's view of queue `name` (None: no such queue); ManagementUnavailable otherwise."""
        import urllib.error
        import urllib.request
        from urllib.parse import quote

        request = urllib.request.Request(f"{self.base}/queues/{quote(self.vhost, safe='')}/{quote(name, safe='')}",
                                         headers={"Authorization": self.auth})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            fix = ("give the broker's user the `monitoring` tag (rabbitmqctl set_user_tags USER monitoring)"
                   if exc.code in (401, 403) else "look at the broker's log")
            raise ManagementUnavailable(f"RabbitMQ's management API at {self.where} answered HTTP {exc.code}. "
                                        f"Fix: {fix}, or set DEPLOY_KIT_RABBITMQ_API in the env file") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ManagementUnavailable(
                f"RabbitMQ's management API at {self.where} did not answer ({reason}). Fix: enable it on the "
                "broker (rabbitmq-plugins enable rabbitmq_management) and let the hosts reach its port, or set "
                "DEPLOY_KIT_RABBITMQ_API in the env file to where it is") from None


class Unanswered(Exception):
    """The verification had no answer, for a reason said in the user's terms."""


class StillHeld(Exception):
    """A worker that stopped consuming still holds tasks it has not started."""


def ignores_results(app, name: str) -> bool:
    task = app.tasks.get(name)
    return bool(getattr(task, "ignore_result", None) if task is not None else app.conf.task_ignore_result)


def handle(app, request: dict) -> str:
    op = request["op"]
    if op == "verify":
        echo = request["task"] == "celery.accumulate"  # built in to every app: returns its arguments
        nonce = request["nonce"]
        args = {"args": [nonce] if echo else [], "queue": request["queue"]}
        try:  # ask for the result even where the app ignores results (Celery 5.1+ honours it per call)
            result = app.send_task(request["task"], ignore_result=False, **args)
        except TypeError:
            result = app.send_task(request["task"], **args)
        unseen = Unanswered(
            f"no result for {request['task']}, and the app ignores results (task_ignore_result or the task's "
            "ignore_result): a worker may have run it unseen. Fix: upgrade to Celery 5.1+ (which stores it "
            "when asked), or set [verify] task to a task of yours with ignore_result=False")
        try:
            value = result.get(timeout=float(request["timeout"]), propagate=True, disable_sync_subtasks=False)
        except Exception as exc:
            if type(exc).__name__ == "TimeoutError" and ignores_results(app, request["task"]):
                raise unseen from None
            raise
        if echo and value is None and ignores_results(app, request["task"]):
            raise unseen
        if echo and list(value) != [nonce]:
            raise RuntimeError(f"celery.accumulate answered {value!r} instead of echoing {nonce!r}")
        return "echoed the nonce" if echo else repr(value)[:80]
    node, queue = request.get("node", ""), request.get("queue", "")
    if op == "add_consumer":
        deadline = time.monotonic() + 15  # a reply can be lost while many nodes answer broadcasts
        while True:
            app.control.add_consumer(queue, destination=[node], reply=True, timeout=3)
            if queue in queues_of(app, node):
                return f"{node} consumes {queue}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node} did not confirm it consumes {queue}")
            time.sleep(0.5)
    if op == "cancel_consumer":
        app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=5)
        return f"{node} no longer consumes {queue}"
    if op == "handoff":
        return handoff(app, request["nodes"], float(request["timeout"]), float(request["since"]))
    if op == "queues":
        return ",".join(queues_of(app, node))
    if op == "sync_revoked":
        return sync_revoked(app, request["olds"], node, bool(request.get("everyone")))
    if op == "discard_queue":
        return discard_queue(app, queue)
    if op == "restore_stranded":
        return restore_stranded(app, request["queues"])
    if op == "nodes":
        return ",".join(sorted(app.control.inspect(timeout=1.5).ping() or {}))
    if op == "report":
        return report(app, request["queues"], nodes=request.get("nodes"))
    if op == "unregistered":
        return unregistered(app, request["queues"])
    raise ValueError(f"unknown request {op!r}")


def failure(exc: Exception) -> str:
    """What went wrong, in the user's terms: a broker that cannot be reached says so."""
    name = type(exc).__name__
    if isinstance(exc, (Unanswered, StillHeld)):  # said in the user's terms already
        return str(exc)
    if name == "TimeoutError":
        return "no worker completed the task in time"
    if name in ("OperationalError", "ConnectionError") or isinstance(exc, ConnectionError):  # kombu's, redis's
        return f"the broker cannot be reached ({name}: {exc})"
    return f"{name}: {exc}"


def main(celery_app: str, purpose: str = "handover") -> None:
    """Greet, then answer each request line; a handover needs a result backend, a report does not."""
    problem = hostlib.url_problem(os.environ.get("CELERY_BROKER_URL", ""), "CELERY_BROKER_URL")
    if problem:
        say(False, problem)
        return
    try:
        from celery.app.utils import find_app
        from celery.backends.base import DisabledBackend

        app = find_app(celery_app)
        if purpose == "handover" and isinstance(app.backend, DisabledBackend):
            say(False, "the app has no result backend: set CELERY_RESULT_BACKEND so a deploy can see its "
                       "verification task complete")
            return
    except Exception as exc:  # noqa: BLE001 - reported to the cutover, which fails the step
        say(False, f"{type(exc).__name__}: {exc}")
        return
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
    except Exception as exc:  # noqa: BLE001
        say(False, failure(exc))
        return
    say(True, "ready")
    for line in sys.stdin:
        request = json.loads(line)
        request_id = request.get("id")
        try:
            say(True, handle(app, request), request_id)
        except Unanswered as exc:
            say(False, str(exc), request_id)
        except Exception as exc:  # noqa: BLE001
            say(False, failure(exc), request_id)


def program() -> str:
    """This module and hostlib as one text that runs `main(CELERY_APP, PURPOSE)` on the service's Python,
    which has no deploy_kit package."""
    sources = [(name, hostlib.source_of(name)) for name in SHIPPED]
    return hostlib.bundle(sources, "module.main(*sys.argv[1:])\n")


SHIPPED = ("contracts", "hostlib", "agent_client", "celery_agent")  # what this module needs, in load order

# The client side lives in agent_client (loaded before this module); the cutover imports it from here.
from deploy_kit.remote.agent_client import Agent, StepFailed  # noqa: E402, F401
