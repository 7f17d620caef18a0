"""The Celery agent's verification against a real Celery app and worker (in-memory broker)."""

import subprocess
import sys
import time

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from deploy_kit.remote import celery_agent


@pytest.fixture
def app():
    app = Celery("shop", broker="memory://", backend="cache+memory://")
    app.conf.task_ignore_result = True  # the app ignores results: a verification must still see one
    return app


def verify(app, queue="celery"):
    return celery_agent.handle(app, {"op": "verify", "task": "celery.accumulate", "queue": queue,
                                     "timeout": 10, "nonce": "n0nce"})


def test_verification_passes_for_an_app_that_ignores_results(app):
    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        assert verify(app) == "echoed the nonce"


def test_an_unanswered_verification_says_the_app_ignores_results(app, monkeypatch):
    """A Celery that cannot ask for a result per call: the timeout names the cause and the fix."""
    real = app.send_task

    def old_send_task(name, **options):
        if "ignore_result" in options:
            raise TypeError("unexpected keyword argument 'ignore_result'")
        return real(name, ignore_result=True, **options)

    monkeypatch.setattr(app, "send_task", old_send_task)
    with start_worker(app, perform_ping_check=False, shutdown_timeout=10), \
            pytest.raises(celery_agent.Unanswered, match="the app ignores results.*Celery 5.1"):
        celery_agent.handle(app, {"op": "verify", "task": "celery.accumulate", "queue": "celery",
                                  "timeout": 1, "nonce": "n0nce"})


def test_the_report_counts_waiting_messages_and_names_the_live_consumers(app):
    from deploy_kit import queues

    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        app.send_task("shop.tasks.later", queue="other")
        app.send_task("shop.tasks.later", queue="other")
        report = queues.parse(celery_agent.report(app, ["celery", "other"]))
    celery, other = report.queues
    assert (celery.waiting, celery.consumers) == (0, tuple(w.node for w in report.workers))
    assert (other.waiting, other.consumers, other.unacked) == (2, (), None)  # unacked: Redis only
    assert report.complete and report.workers[0].active == 0


def test_the_report_asks_the_nodes_found_a_moment_earlier_and_is_incomplete_without_one(app):
    from deploy_kit import queues

    with start_worker(app, perform_ping_check=False, shutdown_timeout=10) as worker:
        assert celery_agent.handle(app, {"op": "nodes"}) == worker.hostname
        found = queues.parse(celery_agent.handle(app, {"op": "report", "queues": ["celery"],
                                                       "nodes": [worker.hostname]}))
        gone = queues.parse(celery_agent.report(app, ["celery"], nodes=[worker.hostname, "gone@host"]))
    assert found.complete and [w.node for w in found.workers] == [worker.hostname]
    assert not gone.complete and [w.node for w in gone.workers] == [worker.hostname]


def test_the_revoked_ids_of_an_old_node_are_given_with_mingles_own_hello(app):
    with start_worker(app, perform_ping_check=False, shutdown_timeout=10) as worker:
        app.control.revoke("a-revoked-task-id")
        said = celery_agent.handle(app, {"op": "sync_revoked", "olds": [worker.hostname], "node": worker.hostname})
        everyone = celery_agent.sync_revoked(app, [], worker.hostname, everyone=True)  # no other node answers
    assert said == f"{worker.hostname} knows the 1 revoked task id(s) of {worker.hostname}"
    assert everyone == f"{worker.hostname}: no revoked task id to pass on (no node answered)"


def test_the_late_answer_of_a_request_given_up_on_never_answers_the_next(tmp_path):
    """A request that found no answer in time (the broker gone) may still be answered later: that
    answer is skipped, and the next request gets its own."""
    late = ("import json, sys\n"
            "first = json.loads(sys.stdin.readline())\n"  # answered only once the second came
            "second = json.loads(sys.stdin.readline())\n"
            "for r, text in ((first, 'first'), (second, 'second')):\n"
            "    print(json.dumps({'ok': True, 'detail': text, 'id': r['id']}), flush=True)\n")
    agent = celery_agent.Agent.__new__(celery_agent.Agent)
    agent.proc = subprocess.Popen([sys.executable, "-c", late], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1)
    agent.asked = 0
    try:
        with pytest.raises(celery_agent.StepFailed, match="no answer"):
            agent.ask({"op": "cancel_consumer"}, 0.5)
        assert agent.ask({"op": "discard_queue"}, 30) == "second"
    finally:
        agent.close()


def test_an_agent_that_ended_fails_the_request_it_is_sent_and_says_why():
    """The agent ends at once when it cannot reach the broker; what is asked of it afterwards (the
    giving back's clean-up) fails as a step, never as a broken pipe."""
    agent = celery_agent.Agent.__new__(celery_agent.Agent)
    agent.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stderr.write('gone\\n')"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  bufsize=1)
    agent.asked = 0
    agent.proc.wait()
    try:
        with pytest.raises(celery_agent.StepFailed, match="the Celery agent ended: gone"):
            agent.ask({"op": "discard_queue", "queue": "q"}, 30)  # a broken pipe, or no answer: it ended
    finally:
        agent.close()


def test_a_broker_that_cannot_be_reached_is_named():
    from kombu.exceptions import OperationalError

    refused = OperationalError("Error 111 connecting to 10.0.0.1:6379. Connection refused.")
    assert celery_agent.failure(refused).startswith("the broker cannot be reached (OperationalError: Error 111")
    assert celery_agent.failure(ConnectionRefusedError(111, "refused")).startswith("the broker cannot be reached")
    assert celery_agent.failure(ValueError("x")) == "ValueError: x"


def test_a_handoff_waits_until_the_node_started_what_it_took_and_says_what_it_still_holds(app):
    """After cancel_consumer the old node still holds what it prefetched: the retire lets it start
    those before the warm shutdown (which would return them only at its end); a busy pool is named."""
    import threading

    gate = threading.Event()

    @app.task(name="shop.tasks.block")
    def block():
        gate.wait(20)

    app.conf.task_ignore_result = False
    with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, shutdown_timeout=10) as worker:
        node = worker.hostname
        assert celery_agent.handoff(app, [node], 1, time.monotonic()) == f"no task is held by {node}"
        first, second = block.delay(), block.delay()  # one runs, one waits in the node: reserved
        for _ in range(50):
            if (app.control.inspect(destination=[node], timeout=1).reserved() or {}).get(node):  # None: late
                break
        with pytest.raises(celery_agent.StillHeld, match=r"still holds 1 task\(s\) it has not started"):
            celery_agent.handoff(app, [node], 1, time.monotonic())
        with pytest.raises(celery_agent.StillHeld, match="gone@nowhere did not say what it holds"):
            celery_agent.handoff(app, [node, "gone@nowhere"], 0.5, time.monotonic())
        assert celery_agent.failure(celery_agent.StillHeld("x")) == "x"
        threading.Timer(0.5, gate.set).start()  # the pool frees: the reserved one starts
        assert celery_agent.handoff(app, [node], 10, time.monotonic()) == f"no task is held by {node}"
        first.get(timeout=10), second.get(timeout=10)


def test_a_task_a_live_worker_holds_until_its_eta_is_live_never_stranded(app):
    """A live worker holds a task with a countdown unacknowledged until it is due: the survey counts
    it as held (else a restore of the stranded would put it back, and it would run twice)."""
    with start_worker(app, perform_ping_check=False, shutdown_timeout=10):
        later = app.send_task("celery.accumulate", args=[1], countdown=60)
        try:
            for _ in range(10):  # on a busy machine a reply may come after the survey's wait: ask again
                found = celery_agent.survey(app)
                if later.id in found["live"] and found["complete"]:
                    break
            assert later.id in found["live"] and found["complete"]
        finally:
            later.revoke()


def scripted_agent(program: str, asked: int = 0):
    """The agent client speaking to `program` (Python) instead of the Celery agent."""
    from deploy_kit.remote.agent_client import Agent

    agent = Agent.__new__(Agent)
    agent.proc = subprocess.Popen([sys.executable, "-c", "import sys, json, time\n" + program], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    agent.asked, agent.pending = asked, b""
    return agent


def test_two_answers_in_one_read_are_both_seen_a_late_one_then_the_awaited_one():
    """A request given up on is answered late, together with the next one's answer: both arrive
    in one read. The next request gets its answer at once (none is left unseen in a buffer)."""
    agent = scripted_agent(
        "sys.stdin.readline(); sys.stdin.readline()\n"
        "sys.stdout.write(json.dumps({'ok': True, 'detail': 'late', 'id': 1}) + '\\n' + "
        "json.dumps({'ok': True, 'detail': 'this one', 'id': 2}) + '\\n'); sys.stdout.flush()\ntime.sleep(30)", asked=1)
    agent.proc.stdin.write('{"op": "report", "id": 1}\n')
    try:
        started = time.time()
        assert agent.ask({"op": "queues"}, 10) == "this one"
        assert time.time() - started < 5
    finally:
        agent.proc.kill()
        agent.proc.wait()


@pytest.mark.parametrize("written", [False, True])
def test_an_agent_that_could_not_start_says_why_to_the_first_request(written):
    """The agent greets with its failure (the broker cannot be reached) and ends. A request sent
    without waiting for the greeting (a hand-back's first one) fails with that cause, whether it
    could still be written or found the agent gone, not with "the Celery agent ended"."""
    from deploy_kit.remote.agent_client import StepFailed

    agent = scripted_agent("sys.stdout.write(json.dumps({'ok': False, 'detail': "
                           "'the broker cannot be reached (Error 111)'}) + '\\n'); sys.stdout.flush()")
    if written:
        agent.proc.wait()
    with pytest.raises(StepFailed, match=r"^the broker cannot be reached \(Error 111\)$"):
        agent.ask({"op": "cancel_consumer", "queue": "celery", "node": "n"}, 10)
    agent.proc.wait()


def test_stray_output_of_the_app_is_not_taken_for_an_answer():
    """What the app prints on the agent's stdout (text, or JSON that is no answer) is skipped."""
    agent = scripted_agent("print('importing settings'); print(1); print('[]')\n"
                           "print(json.dumps({'ok': True, 'detail': 'ready'}))\n"
                           "sys.stdin.readline(); print('{\"x\": 1}')\n"
                           "print(json.dumps({'ok': True, 'detail': 'celery', 'id': 1})); sys.stdout.flush()\n"
                           "time.sleep(30)")
    try:
        assert agent.ask(None, 10) == "ready"
        assert agent.ask({"op": "queues", "node": "n"}, 10) == "celery"
    finally:
        agent.proc.kill()
        agent.proc.wait()
