"""RabbitMQ's management API as the Celery agent reads it: where it looks, what each answer means,
and that no credential shows in what it says (a real HTTP server on the loopback, no broker)."""

import base64
import http.server
import json
import threading

import pytest
from kombu import Connection

from deploy_kit.remote import celery_agent

PASSWORD = "s3cr%2Ft-pw"


class Broker(http.server.BaseHTTPRequestHandler):
    """Answers like the management API: one queue, `celery`, for the right user only."""

    def do_GET(self):  # noqa: N802 - http.server's name
        expected = "Basic " + base64.b64encode(b"dk:s3cr/t-pw").decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.end_headers()
            return
        if self.path != "/api/queues/%2F/celery":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"name": "celery", "type": "classic", "messages_unacknowledged": 3}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def api_port():
    server = http.server.HTTPServer(("127.0.0.1", 0), Broker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def api(monkeypatch, port, user="dk", password=PASSWORD):
    monkeypatch.setenv("DEPLOY_KIT_RABBITMQ_API", f"http://{user}:{password}@127.0.0.1:{port}/api/")
    return celery_agent.ManagementAPI(Connection("amqp://other:pw@mq.internal:5672//"))


def test_by_default_it_is_at_the_brokers_host_with_the_brokers_user(monkeypatch):
    monkeypatch.delenv("DEPLOY_KIT_RABBITMQ_API", raising=False)
    plain = celery_agent.ManagementAPI(Connection("amqp://dk:pw@mq.internal:5672/shop"))
    assert (plain.base, plain.vhost) == ("http://mq.internal:15672/api", "shop")
    assert plain.auth == "Basic " + base64.b64encode(b"dk:pw").decode()
    tls = celery_agent.ManagementAPI(Connection("amqps://dk:pw@mq.internal:5671//"))
    assert (tls.base, tls.vhost) == ("https://mq.internal:15671/api", "/")


def test_a_queue_is_read_a_missing_one_is_none(monkeypatch, api_port):
    management = api(monkeypatch, api_port)
    assert management.queue("celery")["messages_unacknowledged"] == 3
    assert management.queue("reports") is None


def test_a_refused_user_or_no_api_names_the_fix_and_never_a_credential(monkeypatch, api_port):
    with pytest.raises(celery_agent.ManagementUnavailable) as refused:
        api(monkeypatch, api_port, password="wrong-pw").queue("celery")
    assert "HTTP 401" in str(refused.value) and "monitoring" in str(refused.value)
    with pytest.raises(celery_agent.ManagementUnavailable) as closed:
        api(monkeypatch, 1).queue("celery")
    assert "did not answer" in str(closed.value) and "rabbitmq_management" in str(closed.value)
    for text in (str(refused.value), str(closed.value)):
        assert "wrong-pw" not in text and "s3cr" not in text and "127.0.0.1:" in text
