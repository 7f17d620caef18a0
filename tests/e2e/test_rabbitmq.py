"""Everything deploy-kit does with the broker, on RabbitMQ: one sandbox host of its own ("dkrabbit",
booted once with `broker="rabbitmq"`: rabbitmq-server with its management plugin, Redis masked)
gets `fab setup`, `fab check`, a first deploy, a deploy and a rollback with the handover under a
stream of tasks (each runs exactly once), `fab queues` (depths and unacked match the messages sent),
a worker SIGKILLed while it holds messages (RabbitMQ puts them back by itself, each completes once)
and the preflight's check of queued task names (peeked, and left in the queue).

The tests of this module run in order; each leaves the stage deployed and healthy.
"""

import json
import re
import time

import pytest
from celery import Celery

from deploy_kit import config

from .conftest import (
    Producer,
    boot,
    call_task,
    commit,
    current_release,
    fab,
    on_host,
    prepare_env,
    ran_counts,
    say,
    wait_for,
)

NAME = "dkrabbit"
HOST = f"{NAME}1"


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    box = None
    try:
        box, config_file, repo = boot(NAME, 1, tmp_path_factory.mktemp(NAME), broker="rabbitmq")
        yield box, config_file, repo, config.load(config_file).stage(NAME)
    finally:
        if box is not None:
            box.down(say)


@pytest.fixture(scope="module")
def broker(rabbit):
    app = Celery("e2e-rabbitmq", broker=rabbit[0].broker_url(), backend="rpc://")
    yield app
    app.close()


def run(rabbit, *args, **kwargs):
    return fab(*args, "--stage", NAME, config_file=rabbit[1], timeout=900, **kwargs)


def queues_json(rabbit) -> dict:
    return json.loads(run(rabbit, "queues", "--json", check=True).stdout)


def row(report: dict, name: str) -> dict:
    return next(q for q in report["queues"] if q["name"] == name)


def ready(broker, queue: str) -> int:
    """Messages waiting in `queue`, asked of RabbitMQ from this machine (passive declare)."""
    with broker.connection_for_write() as connection, connection.channel() as channel:
        return channel.queue_declare(queue=queue, passive=True).message_count


def worker(stage, service: str) -> str:
    return f"exampleapp-worker-{service}@{current_release(stage, 0)}.service"


def test_setup_check_and_a_first_deploy_work_on_rabbitmq(rabbit):
    box, _config_file, _repo, stage = rabbit
    run(rabbit, "setup", "--yes", check=True)
    assert "Wants=network-online.target rabbitmq-server.service" in on_host(
        stage, 0, "cat /etc/systemd/system/exampleapp-worker-default@.service")
    prepare_env(box, rabbit[1], NAME)
    checked = run(rabbit, "check", check=True)
    assert re.search(r"broker\s+│\s+pass", checked.stdout), checked.stdout  # the AMQP probe, as the service
    deployed = run(rabbit, "deploy", check=True)
    assert "verified" in deployed.stdout
    password = box.redis_password_file.read_text().strip()
    assert password not in checked.stdout + checked.stderr + deployed.stdout + deployed.stderr
    release = current_release(stage, 0)
    assert call_task(stage, 0, "ledger.tasks.release") == repr(f"/srv/exampleapp/releases/{release}")
    # The broker is RabbitMQ, nothing else: Redis does not even run on the host.
    assert on_host(stage, 0, "systemctl is-active rabbitmq-server redis-server || true").split() == [
        "active", "inactive"]
    journal = on_host(stage, 0, "journalctl -u 'exampleapp-worker-*' -o cat --no-pager | grep -c 'Connected to amqp'")
    assert int(journal) >= 2


def test_a_deploy_and_a_rollback_hand_over_and_every_task_runs_exactly_once(rabbit):
    _box, _config_file, repo, stage = rabbit
    old = current_release(stage, 0)
    commit(repo, {"ledger/handover.txt": f"{time.time()}\n"}, "a one-file change")
    with Producer(interval=0.05, sandbox=NAME) as producer:
        deployed = run(rabbit, "deploy")
        new = current_release(stage, 0)
        rolled = run(rabbit, "rollback")
        time.sleep(1)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    for step in ("start", "verify", "join", "retire", "switch"):
        assert f"{HOST} {step}: ok" in deployed.stdout, (step, deployed.stdout)
    assert new != old and current_release(stage, 0) == old
    assert re.search(r"queue celery: \d+ waiting, \d+ unacked, consumed by default\.", deployed.stdout)  # summary
    sent = len(producer.sent)
    counts = wait_for(lambda: (c := ran_counts(stage, producer.tag)) and len(c) >= sent and c, 90,
                      "every probe sent to have run")
    assert sent >= 100 and all(counts.get(f"{producer.tag}-{n}") == 1 for n in range(sent)), \
        {k: v for k, v in counts.items() if v != 1}
    assert on_host(stage, 0, f"systemctl is-active exampleapp-worker-default@{new}.service || true").strip() \
        in ("inactive", "unknown")  # the rolled-back release's worker retired


def test_queues_report_waiting_unacked_and_consumers_as_sent(rabbit, broker):
    stage = rabbit[3]
    release = current_release(stage, 0)
    # Beat stops too: its heartbeat (every 30 s, to celery) would wait behind the two slow tasks, which hold both
    # of the one worker's slots (prefetch 1), and show as a third message.
    on_host(stage, 0, f"systemctl stop {worker(stage, 'reports')} exampleapp-beat.service")
    try:
        for _ in range(5):
            broker.send_task("ledger.tasks.summarize", queue="reports")
        for n in range(2):
            broker.send_task("ledger.tasks.slow", args=[20, f"depth-{n}"], queue="celery")
        # The management API refreshes its counts every second on the sandbox (every 5 s by default).
        report = wait_for(lambda: (r := queues_json(rabbit)) and row(r, "celery")["unacked"] == 2 and r, 30,
                          "the two slow tasks to show as unacknowledged")
        plain = run(rabbit, "queues", check=True).stdout
    finally:
        on_host(stage, 0, f"systemctl start {worker(stage, 'reports')} exampleapp-beat.service")
    reports, celery = row(report, "reports"), row(report, "celery")
    assert (reports["waiting"], reports["unacked"], reports["consumers"]) == (5, 0, [])
    assert (celery["waiting"], celery["unacked"], celery["consumers"]) == (0, 2, [f"default.{release}@{HOST}"])
    assert celery["stranded"] is None and celery["oldest_unacked_s"] is None  # RabbitMQ tells neither
    nodes = {w["node"]: w for w in report["workers"]}
    assert set(nodes) == {f"default.{release}@{HOST}"}  # reports is stopped
    assert (nodes[f"default.{release}@{HOST}"]["active"], nodes[f"default.{release}@{HOST}"]["release"]) == (2, release)
    assert "queue reports: no worker consumes it (5 waiting)" in plain and "none (RabbitMQ)" in plain
    wait_for(lambda: row(queues_json(rabbit), "reports")["waiting"] == 0, 60, "the reports queue to drain")


def test_a_killed_worker_strands_nothing_because_rabbitmq_puts_its_messages_back(rabbit, broker):
    stage = rabbit[3]
    unit = worker(stage, "default")
    wait_for(lambda: row(queues_json(rabbit), "celery")["unacked"] == 0, 60, "the earlier slow tasks to end")
    tag = f"k{time.time_ns()}"

    def ran(what: str) -> dict[str, int]:
        out = on_host(stage, 0, "journalctl -u 'exampleapp-worker-*' -o cat --no-pager "
                                f"| grep -o 'slow {what} {tag}-[0-9]*' || true")
        return {t: out.split().count(t) for t in (f"{tag}-0", f"{tag}-1")}

    for n in range(2):
        broker.send_task("ledger.tasks.slow", args=[5, f"{tag}-{n}"], queue="celery")
    wait_for(lambda: all(ran("start").values()), 30, "the worker to run both")
    # SIGKILL, and no restart: what comes back comes back from the broker alone.
    on_host(stage, 0, f"systemctl kill -s KILL {unit}; systemctl stop {unit}")
    wait_for(lambda: ready(broker, "celery") == 2, 30, "RabbitMQ to put both back (no visibility timeout)")
    report = queues_json(rabbit)
    assert (row(report, "celery")["waiting"], row(report, "celery")["consumers"]) == (2, [])
    restored = run(rabbit, "queues", "--restore", check=True).stdout
    assert "RabbitMQ puts back by itself" in restored and "nothing to return" in restored
    on_host(stage, 0, f"systemctl start {unit}")
    wait_for(lambda: all(ran("done").values()), 60, "the worker to run them again")
    assert ran("start") == {f"{tag}-0": 2, f"{tag}-1": 2}  # the killed run, and the one after it
    assert ran("done") == {f"{tag}-0": 1, f"{tag}-1": 1}
    wait_for(lambda: row(queues_json(rabbit), "celery")["unacked"] == 0, 30, "nothing left unacknowledged")


def test_queued_tasks_the_new_release_lacks_are_named_and_left_in_their_queue(rabbit, broker):
    stage = rabbit[3]
    release = current_release(stage, 0)
    node = f"reports.{release}@{HOST}"
    broker.control.cancel_consumer("reports", destination=[node], reply=True, timeout=5)
    try:
        for _ in range(3):
            broker.send_task("ledger.tasks.retired", queue="reports")
        strict = run(rabbit, "deploy", "--strict")
        left = ready(broker, "reports")
    finally:
        with broker.connection_for_write() as connection, connection.channel() as channel:
            channel.queue_purge("reports")
        broker.control.add_consumer("reports", destination=[node], reply=True, timeout=5)
    assert strict.returncode == 3, strict.stdout + strict.stderr
    assert "ledger.tasks.retired (3 message(s))" in strict.stdout + strict.stderr
    assert left == 3  # peeked, then put back: nothing consumed
    assert current_release(stage, 0) == release
