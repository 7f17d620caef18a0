"""`fab deploy`, `fab rollback`, `fab releases`, `fab unlock` on a two-host sandbox stage with the
example app: verified cut-over, automatic rollback, untouched `current` on early failures.

The tests of this module run in order; each leaves the stage deployed and healthy.
"""

import json
import re
import time
from datetime import datetime, timedelta

import pytest

from deploy_kit import config, units
from deploy_kit.sandbox import Sandbox

from .conftest import H1, H2, TEST_SANDBOX, as_service, call_task, commit, current_release, fab, on_host, prepare_env

TASKS = "ledger/tasks.py"
VERSION_TASK = '''

@shared_task
def version() -> str:
    return "{version}"
'''


@pytest.fixture(scope="module")
def stage(sandbox_config):
    fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    prepare_env(Sandbox(TEST_SANDBOX), sandbox_config, TEST_SANDBOX)
    return config.load(sandbox_config).stage(TEST_SANDBOX)


def deploy(sandbox_config, *args):
    return fab("deploy", "--stage", TEST_SANDBOX, *args, config_file=sandbox_config, timeout=900)


def tasks_source(app_repo) -> str:
    return (app_repo / "examples/exampleapp" / TASKS).read_text()


def releases_on(stage, index):
    out = on_host(stage, index, f"ls {stage.app.releases_dir}")
    return sorted(out.split())


def consumers_of_the_real_queues(stage) -> dict[tuple[str, str], list[str]]:
    """Per (worker service, host): the Celery nodes of that host consuming any of the service's real
    queues, asked with Celery's remote control (`inspect active_queues`) from the first host, as the
    service. A draining old instance has left them (it may still answer, on its private queue)."""
    argv = [str(units.python(stage.app)), "-m", "celery", "-A", stage.app.celery_app,
            "inspect", "active_queues", "--json", "--timeout", "2"]
    out = on_host(stage, 0, units.as_service_command(stage, str(stage.app.current_link), argv) + "\n")
    replies = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    found: dict[tuple[str, str], list[str]] = {}
    for host in stage.hosts:
        for worker in stage.workers_on(host):
            found[(worker.name, host.name)] = sorted(
                node for node, queues in replies.items() if node.endswith(f"@{host.name}")
                and set(worker.queues) & {q["name"] for q in queues})
            for node in found[(worker.name, host.name)]:  # and it consumes all of them
                assert set(worker.queues) <= {q["name"] for q in replies[node]}, (node, replies[node])
    return found


def assert_one_instance_consumes_the_real_queues(stage) -> None:
    """Every host on one release (`current`), and for each worker service on each host exactly one
    node consumes the real queues: the instance of the release `current` points to."""
    releases = [current_release(stage, i) for i in range(len(stage.hosts))]
    expected = {(w.name, h.name): [units.node_name(w, release, h.name)]
                for h, release in zip(stage.hosts, releases, strict=True) for w in stage.workers_on(h)}
    assert consumers_of_the_real_queues(stage) == expected


def test_first_deploy_on_a_fresh_setup(stage, sandbox_config):
    proc = deploy(sandbox_config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout and "new environment" in proc.stdout
    first = current_release(stage, 0)
    assert first == current_release(stage, 1)  # one release name for all hosts
    for index in (0, 1):
        assert call_task(stage, index, "ledger.tasks.release") == repr(f"/srv/exampleapp/releases/{first}")


def test_beat_runs_on_its_one_host_only(stage):
    assert on_host(stage, 0, "systemctl is-active exampleapp-beat").strip() == "active"
    assert on_host(stage, 1, "systemctl is-active exampleapp-beat || true").strip() in ("inactive", "unknown")
    unit_file = "/etc/systemd/system/exampleapp-beat.service"
    assert on_host(stage, 1, f"test -e {unit_file} && echo yes || echo no").strip() == "no"


def test_second_deploy_runs_the_new_commit_even_over_a_release_that_no_longer_imports(stage, sandbox_config,
                                                                                       app_repo):
    before = current_release(stage, 0)
    started = on_host(stage, 0, "date +%s").strip()
    revoked = f"deploy-kit-test-revoked-{started}"  # revoked before the deploy: the new workers must know it
    as_service(stage, 0, f"from exampleapp.celery import app\napp.control.revoke({revoked!r})\n")
    # The current release's app no longer imports (its workers run on, loaded long ago): the deploy
    # that replaces it must not be stopped by it; the build checks the new release's instead.
    celery_py = f"{stage.app.releases_dir}/{before}/exampleapp/celery.py"
    on_host(stage, 0, f"cp -p {celery_py} /root/celery.py.kept && echo 'raise RuntimeError(\"broken\")' >> {celery_py}")
    sha = commit(app_repo, {TASKS: tasks_source(app_repo) + VERSION_TASK.format(version="v2")}, "add version")
    try:
        proc = deploy(sandbox_config)
    finally:
        on_host(stage, 0, f"cp -p /root/celery.py.kept {celery_py}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # They started without mingle (about 1 s sooner) and were given the old nodes' revoked ids instead.
    new_nodes = {units.node_name(w, current_release(stage, i), h.name)
                 for i, h in enumerate(stage.hosts) for w in stage.workers_on(h)}
    knows = json.loads(as_service(stage, 0, "import json\nfrom exampleapp.celery import app\n"
                                            f"print(json.dumps({{n: {revoked!r} in ids for n, ids in "
                                            "(app.control.inspect(timeout=2).revoked() or {}).items()}))\n"
                                  ).splitlines()[-1])
    assert {n for n in new_nodes if knows.get(n)} == new_nodes, knows
    for index in (0, 1):
        journal = on_host(stage, index, f"journalctl -q --no-pager -o cat --since @{started} "
                                        f"-u '{stage.app.name}-worker-*'")
        assert "sync with deploy-kit@" in journal and "mingle: searching for neighbors" not in journal, journal
    assert "environment reused" in proc.stdout  # same requirements: no pip install
    assert sha[:10] in proc.stdout
    assert current_release(stage, 0) != before
    for index in (0, 1):
        assert call_task(stage, index, "ledger.tasks.version") == "'v2'"
        # The agent's program came on its stdin: systemd had no program text to warn about at each reload.
        warnings = on_host(stage, index, f"journalctl -q --no-pager --since @{started} | "
                                         r"grep -E 'transient/run-u[0-9]+\.service:[0-9]+:' || true")
        assert warnings.strip() == "", warnings


def test_a_release_that_breaks_the_worker_is_rolled_back_by_itself(stage, sandbox_config, app_repo):
    good = current_release(stage, 0)
    source = tasks_source(app_repo)
    # Imports fine for `manage.py check`, fails only in the worker process: caught after the switch.
    broken = source.replace('logger = logging.getLogger(__name__)',
                            'logger = logging.getLogger(__name__)\n'
                            'import sys\nif "worker" in sys.argv:\n'
                            '    raise ModuleNotFoundError("No module named \'payments_sdk\'")\n')
    commit(app_repo, {TASKS: broken}, "worker-only breakage")
    proc = deploy(sandbox_config)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "ModuleNotFoundError" in proc.stderr
    # The new instance's journal lines were shown as they came, on the channel following the cutover.
    assert re.search(r"\| exampleapp-worker-default@\S+: .*ModuleNotFoundError", proc.stdout), proc.stdout
    assert f"back on {good}" in proc.stderr
    for index in (0, 1):
        assert current_release(stage, index) == good
        assert call_task(stage, index, "ledger.tasks.version") == "'v2'"  # the old workers consume again
    listing = fab("releases", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True).stdout
    assert "BAD" in listing
    commit(app_repo, {TASKS: source}, "revert the breakage")


def test_a_release_that_does_not_import_stops_before_the_switch(stage, sandbox_config, app_repo):
    good = current_release(stage, 0)
    source = tasks_source(app_repo)
    commit(app_repo, {TASKS: source + "\nimport payments_sdk  # not installed\n"}, "broken import")
    proc = deploy(sandbox_config)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "fails its check" in proc.stderr and "payments_sdk" in proc.stderr
    assert [current_release(stage, i) for i in (0, 1)] == [good, good]
    assert all(not name.endswith(".building") for name in releases_on(stage, 0))
    commit(app_repo, {TASKS: source}, "revert broken import")


def test_a_failing_migration_leaves_current_untouched(stage, sandbox_config, app_repo):
    good = current_release(stage, 0)
    before = releases_on(stage, 0)
    migration = ("from django.db import migrations\n\n\ndef fail(apps, schema_editor):\n"
                 "    raise RuntimeError('migration 0002 cannot run')\n\n\n"
                 "class Migration(migrations.Migration):\n    dependencies = [('ledger', '0001_initial')]\n"
                 "    operations = [migrations.RunPython(fail)]\n")
    commit(app_repo, {"ledger/migrations/0002_fail.py": migration}, "failing migration")
    proc = deploy(sandbox_config)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert "migrations failed; current is untouched" in proc.stderr
    assert "migration 0002 cannot run" in proc.stderr
    assert [current_release(stage, i) for i in (0, 1)] == [good, good]
    assert releases_on(stage, 0) == before  # the unused release is gone
    commit(app_repo, {"ledger/migrations/0002_fail.py": None}, "drop the failing migration")


def test_rollback_follows_what_went_live_and_rolling_back_twice_goes_two_steps_back(stage, sandbox_config):
    proc = deploy(sandbox_config)
    assert proc.returncode == 0, proc.stderr
    latest = current_release(stage, 0)
    live = [json.loads(line)["release"] for line in on_host(stage, 0, "cat /srv/exampleapp/.deploy-kit/live.jsonl")
            .splitlines()]
    assert live[-1] == latest
    previous = [n for n in live if n != latest][-1]
    # A release that never went live (a deploy cut off after its build) and sorts between the two.
    stray = (datetime.strptime(latest, "%Y-%m-%d-%H%M%S") - timedelta(seconds=1)).strftime("%Y-%m-%d-%H%M%S")
    assert previous < stray < latest
    for index in (0, 1):
        on_host(stage, index, f"mkdir {stage.app.releases_dir}/{stray}")
    back = fab("rollback", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert back.returncode == 0, back.stdout + back.stderr
    assert [current_release(stage, i) for i in (0, 1)] == [previous, previous]
    assert "BAD" not in on_host(stage, 0, f"ls {stage.app.releases_dir}/{previous}/.deploy-kit")
    assert call_task(stage, 1, "ledger.tasks.release") == repr(f"/srv/exampleapp/releases/{previous}")
    listing = fab("releases", "--stage", TEST_SANDBOX, config_file=sandbox_config).stdout
    assert re.search(rf"{stray}.*never live", listing) and re.search(rf"{latest}.*rolled back from", listing)
    refused = fab("rollback", "--stage", TEST_SANDBOX, "--to", stray, config_file=sandbox_config)
    assert refused.returncode == 2 and "never went live" in refused.stderr
    again = fab("rollback", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert current_release(stage, 0) not in (previous, stray, latest)  # two steps back, not an undo
    undo = fab("rollback", "--stage", TEST_SANDBOX, "--to", latest, config_file=sandbox_config)
    assert undo.returncode == 0, undo.stderr
    assert [current_release(stage, i) for i in (0, 1)] == [latest, latest]
    for index in (0, 1):
        on_host(stage, index, f"rmdir {stage.app.releases_dir}/{stray}")
    refused = fab("rollback", "--stage", TEST_SANDBOX, "--to", "2001-01-01-000000", config_file=sandbox_config)
    assert refused.returncode == 2 and "does not exist" in refused.stderr


@pytest.mark.parametrize("step", ["start", "join", "retire", "switch"])
def test_a_killed_laptop_cannot_leave_a_host_half_switched(stage, sandbox_config, step):
    """The cutover runs on the hosts under systemd-run: killing `fab deploy` at any step of the
    handover changes nothing; each host finishes by itself."""
    import os
    import signal
    import subprocess

    from .conftest import FAB, ROOT

    before = current_release(stage, 0)
    env = dict(os.environ, DEPLOY_KIT_CONFIG=str(sandbox_config))
    proc = subprocess.Popen([str(FAB), "deploy", "--stage", TEST_SANDBOX], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    for line in proc.stdout:
        if f"{step}: ok" in line:  # a host finished that step: the laptop dies now
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=30)
    deadline = time.monotonic() + 120
    while True:
        states = [json.loads(on_host(stage, i, "cat /srv/exampleapp/.deploy-kit/cutover.json")) for i in (0, 1)]
        state = states[1]
        if all(s["status"] != "running" for s in states) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert [s["status"] for s in states] == ["done", "done"]  # finished on their own, verified, unwatched
    assert current_release(stage, 1) == state["target"] != before
    assert_one_instance_consumes_the_real_queues(stage)  # as the hosts left it, before the next deploy
    own = units.private_queue(stage, stage.workers[0], state["target"], H2)
    assert call_task(stage, 1, "ledger.tasks.release", queue=own) == \
        repr(f"/srv/exampleapp/releases/{state['target']}")  # asked of dktest2's own new worker
    # Beat never moved (the laptop died before its turn): status names what is left and how to finish it.
    shown = fab("status", "--stage", TEST_SANDBOX, config_file=sandbox_config).stdout
    beat_cwd = on_host(stage, 0, "readlink /proc/$(systemctl show -p MainPID --value exampleapp-beat.service)/cwd")
    if not beat_cwd.strip().endswith(state["target"]):  # (at "switch" the laptop may just have sent Beat on)
        assert f"exampleapp-beat.service still runs {before}, though current is {state['target']}" in shown
        assert f"`fab unlock --stage {TEST_SANDBOX}` first" in shown
    # The lock stays, so nobody deploys over an unfinished deploy without looking.
    refused = deploy(sandbox_config)
    assert refused.returncode == 4
    fab("unlock", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    assert deploy(sandbox_config).returncode == 0  # and the next deploy puts every host in step


@pytest.mark.parametrize("step", ["start", "join", "retire", "switch"])
def test_a_dropped_connection_during_the_cutover_only_pauses_the_watching(stage, sandbox_config, step):
    import os
    import subprocess

    from .conftest import FAB, ROOT, in_container

    env = dict(os.environ, DEPLOY_KIT_CONFIG=str(sandbox_config))
    proc = subprocess.Popen([str(FAB), "deploy", "--stage", TEST_SANDBOX], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if f"{H2} {step}: ok" in line:  # a host finished that step: cut dktest2's SSH sessions
            in_container(H2, "pkill -f '[s]shd: deploy' || true")
    assert proc.wait(timeout=600) == 0, "".join(lines)
    output = "".join(lines)
    if step != "switch":  # (after its last step the cutover may have ended before the cut)
        assert f"{H2} lost the connection" in output and f"{H2} connection back" in output
    assert current_release(stage, 1) == current_release(stage, 0)
    assert "verified" in output
    assert_one_instance_consumes_the_real_queues(stage)


def test_a_second_deploy_is_refused_while_the_lock_is_held(stage, sandbox_config):
    holder = {"who": "alice", "from": "alice-laptop", "action": "deploy", "ref": "main",
              "since": "2026-11-24T12:00:00+00:00"}
    on_host(stage, 1, "install -d -m 0700 /srv/exampleapp/.deploy-kit/lock && "
            f"echo '{json.dumps(holder)}' > /srv/exampleapp/.deploy-kit/lock/holder.json")
    proc = deploy(sandbox_config)
    assert proc.returncode == 4
    assert "held by alice from alice-laptop" in proc.stderr and "fab unlock" in proc.stderr
    assert on_host(stage, 0, "test -d /srv/exampleapp/.deploy-kit/lock && echo held || echo free").strip() == "free"
    setup = fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config)  # never under a deploy
    assert setup.returncode == 4 and "held by alice from alice-laptop" in setup.stderr
    assert on_host(stage, 0, "test -d /srv/exampleapp/.deploy-kit/lock && echo held || echo free").strip() == "free"
    shown = fab("unlock", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert shown.returncode == 2 and "alice" in shown.stdout  # no terminal, no --yes: asks for it
    fab("unlock", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    assert deploy(sandbox_config).returncode == 0


def test_plan_prints_every_step_and_changes_nothing(stage, sandbox_config):
    def snapshot():
        return [(releases_on(stage, i), current_release(stage, i),
                 on_host(stage, i, "wc -l < /srv/exampleapp/.deploy-kit/history.jsonl")) for i in (0, 1)]

    before = snapshot()
    proc = fab("deploy", "--stage", TEST_SANDBOX, "--plan", config_file=sandbox_config, check=True)
    assert "nothing is run" in proc.stdout
    for host in stage.hosts:
        for phase in ("lock", "check", "release", "start", "verify", "join", "watch", "retire", "switch",
                      "finish"):
            assert f"{host.name} {phase}:" in proc.stdout
    assert proc.stdout.count("manage.py migrate") == 1  # once per stage, on the migrate host
    assert proc.stdout.count("restart beat:") == 1  # Beat on its one host, after the workers
    assert f"deploy-kit.exampleapp.{TEST_SANDBOX}.default." in proc.stdout and f"@{H2}" in proc.stdout
    assert Sandbox(TEST_SANDBOX).redis_password_file.read_text().strip() not in proc.stdout
    assert snapshot() == before


def test_status_shows_release_services_ping_and_last_deploy(stage, sandbox_config):
    proc = fab("status", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    release = current_release(stage, 0)
    assert proc.stdout.count(f"current {release}") == 2
    assert proc.stdout.count("pong") == 4  # two worker services on each of two hosts
    assert "active/running" in proc.stdout and "last deploy: success" in proc.stdout


def test_cleanup_keeps_the_configured_good_releases(stage, sandbox_config):
    tight = sandbox_config.with_name("keep2.toml")
    tight.write_text(sandbox_config.read_text().replace("keep_releases = 5", "keep_releases = 2")
                     .replace("linked_dirs = []", 'linked_dirs = ["media"]'))
    proc = fab("deploy", "--stage", TEST_SANDBOX, config_file=tight, timeout=900)
    assert proc.returncode == 0, proc.stderr
    release = current_release(stage, 0)
    media = on_host(stage, 0, f"readlink {stage.app.releases_dir}/{release}/media; "
                    "stat -c %U /srv/exampleapp/shared/media").split()
    assert media == ["/srv/exampleapp/shared/media", "exampleapp"]
    for index in (0, 1):
        names = releases_on(stage, index)
        bad = [n for n in names if "BAD" in on_host(stage, index, f"ls {stage.app.releases_dir}/{n}/.deploy-kit")]
        good = [n for n in names if n not in bad]
        assert len(good) == 2 and current_release(stage, index) == good[-1]
        assert all(b > good[0] for b in bad)  # bad ones older than every kept good one are gone


def test_history_has_a_line_per_deploy_and_rollback(stage):
    lines = on_host(stage, 0, "cat /srv/exampleapp/.deploy-kit/history.jsonl").splitlines()
    records = [json.loads(line) for line in lines]
    actions = {(r["action"], r["result"]) for r in records}
    assert ("deploy", "success") in actions and ("rollback", "success") in actions
    assert ("deploy", "failed") in actions
    last = records[-1]
    for key in ("release", "sha", "ref", "who", "when", "result", "durations"):
        assert key in last
    assert "release" in last["durations"] and "verify" in last["durations"]


def test_rollback_warns_about_migrations_it_leaves_applied(stage, sandbox_config, app_repo):
    models = (app_repo / "examples/exampleapp/ledger/models.py").read_text()
    migration = ("from django.db import migrations, models\n\n\nclass Migration(migrations.Migration):\n"
                 "    dependencies = [('ledger', '0001_initial')]\n"
                 "    operations = [migrations.AddField('entry', 'note',\n"
                 "                                      models.CharField(max_length=80, default=''))]\n")
    commit(app_repo, {"ledger/migrations/0002_entry_note.py": migration,
                      "ledger/models.py": models.replace(
                          "    created = models.DateTimeField(auto_now_add=True)\n",
                          "    created = models.DateTimeField(auto_now_add=True)\n"
                          "    note = models.CharField(max_length=80, default='')\n")}, "add a note field")
    assert deploy(sandbox_config).returncode == 0
    proc = fab("rollback", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert proc.returncode == 0, proc.stderr
    assert "ledger.0002_entry_note" in proc.stdout and "never reverses migrations" in proc.stdout


def test_a_task_running_during_the_handover_finishes_on_the_old_release(stage, sandbox_config):
    """The old instance drains (warm shutdown, KillMode=mixed): its running task is not killed."""
    import threading

    tag = f"slow-{time.time_ns()}"
    result: dict[str, str] = {}
    own = units.private_queue(stage, stage.workers[0], current_release(stage, 0), H1)
    sender = threading.Thread(target=lambda: result.update(value=call_task(
        stage, 0, "ledger.tasks.slow", [6, tag], timeout=120, queue=own)))
    sender.start()
    deadline = time.monotonic() + 30
    while tag not in on_host(stage, 0, "journalctl -u 'exampleapp-worker-default@*' -o cat --no-pager -n 50"):
        assert time.monotonic() < deadline, "the slow task did not start"
        time.sleep(0.3)
    proc = deploy(sandbox_config)
    sender.join(timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert result.get("value") == "6"
    journal = on_host(stage, 0, "journalctl -u 'exampleapp-worker-default@*' -o cat --no-pager -n 400")
    assert journal.count(f"slow start {tag}") == 1  # ran once: not killed and redelivered
    assert f"slow done {tag}" in journal and "WorkerLostError" not in journal
