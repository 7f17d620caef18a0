"""`fab queues` from the Celery agent's report: rows, problems, the JSON shape, growth (no host needed)."""

import json

from deploy_kit import queues
from deploy_kit.remote import celery_agent

from . import samples
from .samples import stage_of

STAGE = samples.STAGE + """queues = ["celery", "mail"]
[[stages.prod.workers]]
name = "reports"
queues = ["reports", "mail"]
"""
NODE = "default.2026-11-24-120000@web1"


def agent_report(**queues_seen):
    """What `celery_agent.report` answers: a default worker on web1, an old-style node on web2."""
    rows = {"celery": {"waiting": 4, "unacked": 2, "oldest_unacked_s": 12.5, "stranded": 0},
            "mail": {"waiting": 0, "unacked": 0, "oldest_unacked_s": None, "stranded": 0},
            "reports": {"waiting": 7, "unacked": 3, "oldest_unacked_s": 95.0, "stranded": 3}}
    rows.update(queues_seen)
    return json.dumps({"queues": rows, "complete": True, "transport": "redis", "workers": {
        NODE: {"queues": ["celery", "mail", "deploy-kit.shop.prod.default.2026-11-24-120000@web1"],
               "active": 2, "reserved": 1, "processed": 40},
        "default@web2": {"queues": ["celery"], "active": 0, "reserved": 0, "processed": None}}})


def test_the_report_becomes_rows_with_consumers_and_releases():
    report = queues.parse(agent_report())
    celery, mail, reports = report.queues
    assert (celery.name, celery.waiting, celery.unacked, celery.oldest_unacked_s) == ("celery", 4, 2, 12.5)
    assert celery.consumers == ("default.2026-11-24-120000@web1", "default@web2")
    assert mail.consumers == (NODE,) and reports.consumers == ()
    assert [(w.node, w.host, w.release, w.active, w.reserved, w.processed) for w in report.workers] == [
        (NODE, "web1", "2026-11-24-120000", 2, 1, 40), ("default@web2", "web2", None, 0, 0, None)]


def test_the_json_is_one_object_of_queues_and_workers_with_every_field():
    data = queues.to_json(queues.parse(agent_report()))
    assert set(data) == {"queues", "workers"}
    assert set(data["queues"][0]) >= {"name", "waiting", "unacked", "oldest_unacked_s", "consumers"}
    assert data["queues"][0]["consumers"] == ["default.2026-11-24-120000@web1", "default@web2"]
    assert set(data["workers"][0]) >= {"node", "host", "release", "active", "reserved", "succeeded", "failed"}
    assert data["workers"][0]["failed"] is None and data["workers"][0]["succeeded"] is None
    assert json.loads(json.dumps(data)) == data


def test_a_queue_nobody_consumes_and_stranded_messages_each_name_cause_and_fix():
    stage = stage_of(STAGE)
    found = queues.problems(stage, queues.parse(agent_report()))
    assert len(found) == 2
    assert found[0].startswith("queue reports: no worker consumes it (7 waiting)") and "reports" in found[0]
    assert "3 message(s) held by a worker that is gone" in found[1]
    assert "`fab queues --restore --stage prod`" in found[1]


def test_a_worker_that_did_not_answer_is_said_instead_of_guessing_stranded():
    data = json.loads(agent_report())
    data["complete"] = False
    for row in data["queues"].values():
        row["stranded"] = None
    found = queues.problems(stage_of(STAGE), queues.parse(json.dumps(data)))
    assert not any("gone" in p for p in found) and "not every worker answered" in found[-1]


def test_a_depth_that_grows_at_every_sample_stands_out_and_a_dip_resets_it():
    def sample(depth):
        return queues.parse(agent_report(celery={"waiting": depth, "unacked": 0, "stranded": 0}))

    assert queues.growing([sample(1), sample(2)]) == []  # too few samples to say
    found = queues.growing([sample(1), sample(2), sample(5)])
    assert len(found) == 1 and found[0].startswith("queue celery grows: 1 -> 2 -> 5 waiting")
    assert queues.growing([sample(1), sample(3), sample(3)]) == []
    assert queues.growing([sample(9), sample(1), sample(2), sample(4)]) != []  # the last three count


def test_the_summary_says_per_queue_waiting_unacked_and_consumers():
    lines = queues.summary(queues.parse(agent_report()))
    assert lines[0] == "queue celery: 4 waiting, 2 unacked, consumed by default.2026-11-24-120000@web1, default@web2"
    assert lines[2] == "queue reports: 7 waiting, 3 unacked, consumed by NO WORKER"


def test_the_stage_queues_leave_out_the_private_ones_and_the_report_comes_from_the_first_worker_host():
    stage = stage_of(STAGE)
    assert queues.queue_names(stage) == ["celery", "mail", "reports"]
    assert queues.reporter(stage).name == "web1"
    assert queues.report_request(stage) == {"op": "report", "queues": ["celery", "mail", "reports"]}


def test_stranded_is_what_no_live_worker_holds_of_the_asked_queues_taken_before_the_cutoff():
    held = [("t1", "celery", "a", 100.0), ("t2", "celery", "b", 100.0), ("t3", "other", "c", 100.0),
            ("t4", "celery", "d", 199.0), ("t5", "celery", "e", None)]
    assert celery_agent.stranded(held, {"b"}, ["celery"], cutoff=150.0) == [("t1", "celery", "a", 100.0)]


def test_node_names_split_into_host_and_release():
    assert queues.node_parts("reports.2026-11-24-120000@web2") == ("web2", "2026-11-24-120000")
    assert queues.node_parts("celery@box") == ("box", None)


def test_on_rabbitmq_what_the_broker_cannot_tell_is_a_note_with_its_fix_not_a_guess():
    data = json.loads(agent_report(reports={"waiting": 7, "unacked": None, "oldest_unacked_s": None,
                                            "stranded": None}))
    data.update(transport="amqp", complete=False,
                notes=["unacked unknown: RabbitMQ's management API at mq:15672/api did not answer (refused). Fix: x"])
    report = queues.parse(json.dumps(data))
    assert report.broker == "amqp" and report.queues[2].unacked is None
    found = queues.problems(stage_of(STAGE), report)
    assert found[-1].startswith("unacked unknown: RabbitMQ's management API") and "Fix:" in found[-1]
    assert not any("not every worker answered" in p for p in found)  # stranded is Redis's matter only
    assert "queue reports: 7 waiting, ? unacked" in queues.summary(report)[2]


def test_task_names_are_read_from_either_protocol_and_foreign_messages_are_skipped():
    from base64 import b64encode

    v2 = json.dumps({"headers": {"task": "shop.tasks.a", "id": "1"}, "body": "W10=", "properties": {}})
    v1_body = json.dumps({"task": "shop.tasks.old", "id": "2", "args": []})
    assert celery_agent.task_name(v2, None) == "shop.tasks.a"  # Redis: the whole message is the JSON
    assert celery_agent.task_name(json.dumps({"headers": {}, "body": v1_body}), None) == "shop.tasks.old"
    assert celery_agent.task_name(b'[[], {}, {}]', {"task": "shop.tasks.b"}) == "shop.tasks.b"  # AMQP headers
    assert celery_agent.task_name(v1_body.encode(), {}) == "shop.tasks.old"
    assert celery_agent.task_name(b64encode(b"not json"), {}) is None
    assert celery_agent.task_name("plain", None) is None
