"""`fab queues` on the two-host sandbox stage: depths and unacknowledged counts match the messages
sent from this machine to the sandbox broker, a worker killed while it holds messages leaves them
stranded until `fab queues --restore` returns them (each then completes once), and queued tasks
the new release lacks stop `fab deploy --strict` before anything switched.
"""

import json
import time

import pytest
from celery import Celery

from deploy_kit.sandbox import Sandbox

from .conftest import H1, H2, TEST_SANDBOX, current_release, fab, on_host, wait_for


@pytest.fixture(scope="module")
def stage(deployed):
    return deployed


@pytest.fixture(scope="module")
def broker():
    url = Sandbox(TEST_SANDBOX).broker_url()
    app = Celery("e2e-queues", broker=url, backend=url)
    yield app
    app.close()


def queues_json(config_file) -> dict:
    proc = fab("queues", "--stage", TEST_SANDBOX, "--json", config_file=config_file, check=True)
    return json.loads(proc.stdout)


def row(report: dict, name: str) -> dict:
    return next(q for q in report["queues"] if q["name"] == name)


def workers(stage, service: str, action: str) -> None:
    release = current_release(stage, 0)
    for index in (0, 1):
        on_host(stage, index, f"systemctl {action} exampleapp-worker-{service}@{release}.service")


def done_counts(stage, tag: str) -> dict[str, int]:
    """How many times each `slow` task of `tag` completed, in the journals of both hosts."""
    counts: dict[str, int] = {}
    for index in (0, 1):
        found = on_host(stage, index, "journalctl -u 'exampleapp-worker-*' -o cat --no-pager --since '-10min' "
                                      f"| grep -o 'slow done {tag}-[0-9]*' || true")
        for line in found.splitlines():
            counts[line.split()[-1]] = counts.get(line.split()[-1], 0) + 1
    return counts


def unacked() -> int:
    import redis

    return redis.Redis.from_url(Sandbox(TEST_SANDBOX).broker_url()).hlen("unacked")


def test_depths_unacked_consumers_and_workers_match_the_messages_sent(stage, sandbox_config, broker):
    release = current_release(stage, 0)
    workers(stage, "reports", "stop")
    try:
        for _ in range(5):
            broker.send_task("ledger.tasks.summarize", queue="reports")
        running = [broker.send_task("ledger.tasks.slow", args=[10, f"depth-{n}"], queue="celery") for n in range(2)]
        wait_for(lambda: unacked() == 2, what="the two slow tasks to be taken")
        time.sleep(2.5)  # older than the agent's settle time: held by a live worker, not stranded
        report = queues_json(sandbox_config)
        plain = fab("queues", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True).stdout
    finally:
        workers(stage, "reports", "start")
    assert set(report) == {"queues", "workers"}
    reports, celery = row(report, "reports"), row(report, "celery")
    assert (reports["waiting"], reports["unacked"], reports["consumers"]) == (5, 0, [])
    assert (celery["waiting"], celery["unacked"], celery["stranded"]) == (0, 2, 0)
    assert celery["oldest_unacked_s"] >= 2
    assert sorted(celery["consumers"]) == [f"default.{release}@{H1}", f"default.{release}@{H2}"]
    assert not any(q["name"].startswith("deploy-kit.") for q in report["queues"])  # no private queue
    nodes = {w["node"]: w for w in report["workers"]}
    assert set(nodes) == {f"{s}.{release}@{TEST_SANDBOX}{i}" for s in ("default",) for i in (1, 2)}  # reports stopped
    assert all(set(w) >= {"node", "host", "release", "active", "reserved", "succeeded", "failed"}
               for w in nodes.values())
    assert {w["release"] for w in nodes.values()} == {release}
    assert sum(w["active"] for w in nodes.values()) == 2 and nodes[f"default.{release}@{H1}"]["host"] == H1
    assert "queue reports: no worker consumes it (5 waiting)" in plain
    assert [r.get(timeout=30) for r in running] == [10, 10]
    wait_for(lambda: row(queues_json(sandbox_config), "reports")["waiting"] == 0, 60, "the reports queue to drain")
    status = fab("status", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True).stdout
    assert f"queue reports: 0 waiting, 0 unacked, consumed by reports.{release}@{H1}" in status


def test_messages_of_a_killed_worker_are_stranded_until_restore_and_then_complete_once(stage, sandbox_config,
                                                                                     broker):
    release = current_release(stage, 0)
    tag = f"k{time.time_ns()}"
    sent = [broker.send_task("ledger.tasks.slow", args=[15, f"{tag}-{n}"], queue="celery") for n in range(4)]
    wait_for(lambda: unacked() == 4, what="both workers to hold two messages each")
    on_host(stage, 0, f"systemctl kill -s KILL exampleapp-worker-default@{release}.service")
    time.sleep(3)  # the dead worker's messages are older than the agent's settle time
    report = queues_json(sandbox_config)
    assert row(report, "celery")["unacked"] == 4 and row(report, "celery")["stranded"] == 2
    plain = fab("queues", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True).stdout
    assert "2 message(s) held by a worker that is gone" in plain and "fab queues --restore" in plain
    restored = fab("queues", "--stage", TEST_SANDBOX, "--restore", config_file=sandbox_config, check=True).stdout
    assert "returned 2 message(s) a dead worker held to their queues" in restored
    assert [r.get(timeout=90) for r in sent] == [15] * 4
    wait_for(lambda: unacked() == 0, 30, "nothing left unacknowledged")
    counts = done_counts(stage, tag)
    assert counts == {f"{tag}-{n}": 1 for n in range(4)}, counts
    assert row(queues_json(sandbox_config), "celery")["stranded"] == 0


def test_queued_tasks_the_new_release_lacks_stop_a_strict_deploy_before_the_switch(stage, sandbox_config, broker):
    import redis

    release = current_release(stage, 0)
    nodes = [f"reports.{release}@{TEST_SANDBOX}{i}" for i in (1, 2)]  # they keep running (the preflight wants them),
    broker.control.cancel_consumer("reports", destination=nodes, reply=True, timeout=5)  # but take nothing
    try:
        for _ in range(3):
            broker.send_task("ledger.tasks.retired", queue="reports")
        proc = fab("deploy", "--stage", TEST_SANDBOX, "--strict", config_file=sandbox_config, timeout=900)
    finally:
        redis.Redis.from_url(Sandbox(TEST_SANDBOX).broker_url()).delete("reports")
        broker.control.add_consumer("reports", destination=nodes, reply=True, timeout=5)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "ledger.tasks.retired (3 message(s))" in proc.stdout + proc.stderr
    assert [current_release(stage, i) for i in (0, 1)] == [release, release]
