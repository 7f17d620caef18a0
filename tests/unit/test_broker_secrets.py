"""No part of a broker password ever reaches output: the broker probe that `fab check` and the
deploy preflight run as the service, and the Celery agent of a handover, fed hostile URLs
(passwords with unencoded / # ? @, percent signs, spaces, base64): the probe with kombu faked
to quote the URL in its error, without kombu, and against a fake Redis that quotes the AUTH
command back. Runs the programs' texts locally."""

import json
import socket
import subprocess
import sys
import threading
from urllib.parse import quote, unquote

import pytest

from deploy_kit.remote import celery_agent, hostlib, probes

# Mixed case and digits, so that no run of four of their characters is an English word of the output.
PASSWORDS = ["Xk9/qZ#wRt?8vQ", "pQ@Ss/Wz#rD?x7", "q3+Z/Kw9Lm8Vt==", "Gh 7qZx 9Bv", "a%2Fb%zzQw9/Jk",
             "Tr0ub4dorQ", "Jk8@Mn3Vq", "Pq7#Rs9Tu", "Mz4?Ny6Wq"]
TEMPLATES = ["redis://:{pw}@127.0.0.1:{port}/0", "rediss://:{pw}@127.0.0.1:{port}/0",
             "redis://default:{pw}@127.0.0.1:{port}/0", "amqp://guest:{pw}@127.0.0.1:{port}//",
             "amqp://guest:{pw}@127.0.0.1:{port}/vhost?heartbeat=5"]

# A kombu whose connection error quotes the URL and the password every way a library might.
LOUD_KOMBU = '''
from urllib.parse import quote, unquote
class Connection:
    def __init__(self, url, **kwargs):
        self.url = url
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def ensure_connection(self, **kwargs):
        password = self.url.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[-1]
        raise ConnectionError("cannot reach %s as %s or %s or %s" % (self.url, password, unquote(password),
                                                                    quote(password, safe="")))
'''


def pieces(password: str) -> set[str]:
    """Every run of four characters of the password, as written and percent-decoded or -encoded."""
    forms = {password, quote(password, safe="")} | {unquote(password)}
    return {form[i:i + 4].lower() for form in forms for i in range(len(form) - 3)}


def assert_hidden(output: str, password: str) -> None:
    shown = sorted(p for p in pieces(password) if p in output.lower())
    assert not shown, f"{shown} of the password in {output!r}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe(tmp_path, url: str, kombu: str = "raise ImportError('no kombu')\n") -> str:
    """Run the broker probe as the service would, with CELERY_BROKER_URL=url: stdout and stderr."""
    (tmp_path / "kombu.py").write_text(kombu)
    proc = subprocess.run([sys.executable, "-c", probes.program(), "broker"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env={"CELERY_BROKER_URL": url, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and proc.stdout.startswith("fail ")
    return proc.stdout + proc.stderr


def hostile(port: int) -> list[tuple[str, str]]:
    return [(pw, t.format(pw=pw, port=port)) for pw in PASSWORDS for t in TEMPLATES]


@pytest.mark.parametrize("password, url", hostile(6379))
def test_mask_url_and_url_secrets_cover_the_whole_password(password, url):
    assert_hidden(hostlib.mask_url(url), password)
    assert hostlib.mask_url(url).endswith("@127.0.0.1:6379" + url.rsplit(":6379", 1)[1])
    text = f"error: {url} / {password} / {unquote(password)} / {quote(password, safe='')}"
    assert_hidden(hostlib.hide(text, hostlib.url_secrets(url)), password)


def test_every_password_of_a_failover_list_is_a_secret():
    url = "amqp://u:Tr0ub4dor@h1:5672//;amqp://u:Qw7%2Fzx9k@h2:5672//"
    assert {"Tr0ub4dor", "Qw7%2Fzx9k", "Qw7/zx9k"} <= hostlib.url_secrets(url)
    assert_hidden(hostlib.hide(f"{url} / Tr0ub4dor", hostlib.url_secrets(url)), "Tr0ub4dor")
    assert_hidden(hostlib.hide("redis://:Tr0ub;4dor@host:6379/0", hostlib.url_secrets("redis://:Tr0ub;4dor@host")),
                  "Tr0ub;4dor")


def test_mask_url_leaves_a_url_without_credentials_alone():
    assert hostlib.mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert hostlib.url_secrets("redis://127.0.0.1:6379/0") == set()
    assert hostlib.mask_url("amqp://user:p@ss/w#rd@host:5672//") == "amqp://***@host:5672//"


@pytest.mark.parametrize("url, says", [
    ("redis://:ab/cd#ef?gh@10.0.0.1:6379/0", "the password of X holds an unencoded / # or ?"),
    ("amqp://user:p@ss/w#rd@host:5672//", "the password of X holds an unencoded / # or ?"),
    ("amqp://user:Tr0ub4dor@host:56x2//", "the port of X is not a number"),
    ("redis://:Tr0[ub4dor@host:6379/0", "X is not a valid URL"),
    ("redis://:p%40ss%2Fw%23rd@host:6379/0", ""),
    ("amqp://user:p@ss@host:5672//", ""),
    ("amqp://u:Tr0ub4dor@h1:5672//;amqp://u:Tr0ub4dor@h2:5672//", ""),
    ("sentinel://:Tr0ub4dor@h1:26379;sentinel://:Tr0ub4dor@h2:26379", ""),
    ("redis://:Tr0ub;4dor@host:6379/0", "the port of X is not a number"),
])
def test_url_problem_names_what_clients_would_misread_without_quoting_it(url, says):
    problem = hostlib.url_problem(url, "X")
    assert problem.startswith(says) if says else problem == ""
    assert "Tr0" not in problem and "ss/w" not in problem and "cd#" not in problem
    if says:
        assert "%2F" in problem and "%23" in problem


@pytest.mark.parametrize("password, url", hostile(0))
def test_the_probe_without_kombu_never_shows_the_password(tmp_path, password, url):
    url = url.replace(":0/", f":{closed_port()}/")
    assert_hidden(probe(tmp_path, url), password)


@pytest.mark.parametrize("password, url", hostile(0))
def test_the_probe_masks_a_kombu_error_that_quotes_the_url(tmp_path, password, url):
    url = url.replace(":0/", f":{closed_port()}/")
    output = probe(tmp_path, url, LOUD_KOMBU)
    assert_hidden(output, password)
    if not hostlib.url_problem(url, "CELERY_BROKER_URL"):
        assert "ConnectionError: cannot reach " in output and "://***@127.0.0.1:" in output


def test_the_probe_reports_a_misread_password_and_a_bad_port_without_quoting_them(tmp_path):
    output = probe(tmp_path, "amqp://user:Tr0ub4dor#Qx@127.0.0.1:5672//")
    assert output.startswith("fail the password of CELERY_BROKER_URL holds an unencoded / # or ?")
    output = probe(tmp_path, "amqp://user:Tr0ub4dorQ@127.0.0.1:56x2//")
    assert output.startswith("fail the port of CELERY_BROKER_URL is not a number (if the password")
    assert_hidden(output, "Tr0ub4dorQ")


def test_the_probe_masks_what_redis_quotes_back_of_the_auth_command(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo():
        for _ in PASSWORDS:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"-ERR got " + conn.recv(512).replace(b"\r\n", b" ") + b"\r\n")

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        for password in PASSWORDS:
            url = f"redis://default:{quote(password, safe='')}@127.0.0.1:{port}/0"
            output = probe(tmp_path, url)
            assert output.startswith("fail redis refused the password: ERR got *3 $4 AUTH")
            assert_hidden(output, password)
    finally:
        server.close()


@pytest.mark.parametrize("password, url", [(pw, TEMPLATES[i % len(TEMPLATES)].format(pw=pw, port=6379))
                                           for i, pw in enumerate(PASSWORDS)])
def test_the_celery_agent_never_shows_the_password(tmp_path, password, url):
    """The agent's own program text (hostlib shipped along), with an app whose import quotes the URLs."""
    (tmp_path / "loudapp.py").write_text("import os\nraise RuntimeError(os.environ['CELERY_BROKER_URL'] + ' ' + "
                                         "os.environ['CELERY_RESULT_BACKEND'])\n")
    env = {"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url.replace("amqp", "rpc"), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", celery_agent.program(), "loudapp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    answer = json.loads(proc.stdout.splitlines()[0])
    assert answer["ok"] is False
    assert_hidden(proc.stdout + proc.stderr, password)
    if not hostlib.url_problem(url, "CELERY_BROKER_URL"):
        assert answer["detail"].startswith("RuntimeError: ") and "://***@127.0.0.1:6379" in answer["detail"]
