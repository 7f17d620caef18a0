"""The worker handover on a two-host sandbox stage, under load: a new release proves itself on
its private queue before it takes a user task, the old release serves until then and drains,
and a release that fails is over in seconds without taking or stranding a task.

Tasks are sent from this machine straight to the sandbox broker (every 100 ms, or 20 ms for the
load test) while `fab deploy` or `fab rollback` runs; each logs `probe TAG ran` in the journal of the worker that
ran it, so "exactly once" is counted in the journals of both hosts.
"""

import json
import time

import pytest

from deploy_kit import config, units
from deploy_kit.sandbox import Sandbox

from . import conftest
from .conftest import H1, H2, TEST_SANDBOX, Producer, commit, current_release, fab, on_host, prepare_env, ran_counts

CELERY = "examples/exampleapp/exampleapp/celery.py"
TASKS = "examples/exampleapp/ledger/tasks.py"
HANG = '''

# A release whose pool children hang at start-up: its main process still takes messages.
from celery.signals import worker_process_init  # noqa: E402


@worker_process_init.connect
def _hang(**kwargs):
    import time
    time.sleep(3600)
'''


@pytest.fixture(scope="module")
def stage(sandbox_config):
    fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    prepare_env(Sandbox(TEST_SANDBOX), sandbox_config, TEST_SANDBOX)
    if not current_release(config.load(sandbox_config).stage(TEST_SANDBOX), 0):
        fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True, timeout=900)
    return config.load(sandbox_config).stage(TEST_SANDBOX)


@pytest.fixture
def long_limit(sandbox_config):
    """The stage with a 300 s task time limit on the default service (TimeoutStopSec 330), set up
    on the hosts; the usual units again afterwards."""
    text = sandbox_config.read_text()
    limited = 'name = "default"\nqueues = ["celery"]\nconcurrency = 2\ntime_limit = 300'
    long = sandbox_config.with_name("limit300.toml")
    long.write_text(text.replace(limited.replace("300", "60"), limited))
    assert long.read_text() != text
    fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=long, check=True)
    yield long
    fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)


def unacked(stage) -> int:
    import redis

    return redis.Redis.from_url(Sandbox(TEST_SANDBOX).broker_url()).hlen("unacked")


def test_every_task_sent_through_a_deploy_and_a_rollback_runs_exactly_once(stage, sandbox_config, app_repo):
    old = current_release(stage, 0)
    commit(app_repo, {"ledger/handover.txt": f"{time.time()}\n"}, "a one-file change")
    with Producer(interval=0.02, slow_every=150) as producer:  # 50 a second, some running 3 s
        long = producer.long(20)  # running on the old release when the handover comes
        time.sleep(2)
        deployed = fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, timeout=900)
        new = current_release(stage, 0)
        rolled = fab("rollback", "--stage", TEST_SANDBOX, config_file=sandbox_config, timeout=900)
        while len(producer.sent) < 1000:  # at least a thousand in all, most of them during the two
            time.sleep(0.2)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert new != old and current_release(stage, 0) == old == current_release(stage, 1)
    results = producer.results()
    assert long.get(timeout=60)["release"] == f"/srv/exampleapp/releases/{old}"  # finished where it started
    releases = {r["release"].rsplit("/", 1)[-1] for r in results}
    assert releases <= {old, new} and new in releases  # the new release served in between
    counts = ran_counts(stage, producer.tag)
    assert len(producer.sent) >= 1000
    assert all(counts.get(f"{producer.tag}-{n}") == 1 for n in range(len(producer.sent))), \
        {k: v for k, v in counts.items() if v != 1}
    assert counts.get(f"{producer.tag}-long") == 1
    # Both hosts handed over in one wave (each started before either retired); Beat moved after both.
    lines = deployed.stdout.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert max(first(f"{H1} start: ok"), first(f"{H2} start: ok")) < \
        min(first(f"{H1} retire: ok"), first(f"{H2} retire: ok"))
    assert max(first(f"{H1} switch: ok"), first(f"{H2} switch: ok")) < first(f"{H1} restart beat: ok")
    history = [json.loads(line) for line in on_host(stage, 0, "cat /srv/exampleapp/.deploy-kit/history.jsonl")
               .splitlines()]
    assert [(h["action"], h["result"]) for h in history[-2:]] == [("deploy", "success"), ("rollback", "success")]


def test_a_release_whose_pool_hangs_fails_fast_and_takes_no_user_task(stage, long_limit, app_repo):
    """With a 300 s task time limit (TimeoutStopSec 330): the hung worker is stopped at once,
    whatever TimeoutStopSec says."""
    good = current_release(stage, 0)
    source = (app_repo / CELERY).read_text()
    commit(app_repo, {"exampleapp/celery.py": source + HANG}, "pool children hang at start-up")
    tight = long_limit.with_name("verify15.toml")
    text = long_limit.read_text()
    assert 'task = "celery.accumulate"\ntimeout = 60' in text
    tight.write_text(text.replace('task = "celery.accumulate"\ntimeout = 60',
                                  'task = "celery.accumulate"\ntimeout = 15'))
    with Producer() as producer:
        started = time.monotonic()
        proc = fab("deploy", "--stage", TEST_SANDBOX, config_file=tight, timeout=900)
        elapsed = time.monotonic() - started
    commit(app_repo, {"exampleapp/celery.py": source}, "revert the hang")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert [current_release(stage, i) for i in (0, 1)] == [good, good]
    results = producer.results()
    assert {r["release"] for r in results} == {f"/srv/exampleapp/releases/{good}"}  # none ran on the new one
    assert unacked(stage) == 0  # nothing stranded in the broker
    serving = stage.workers[0].instance(stage.app, good)
    for index in (0, 1):
        assert on_host(stage, index, f"systemctl show -p TimeoutStopUSec {serving}").strip() == \
            "TimeoutStopUSec=5min 30s"
        steps = json.loads(on_host(stage, index, "cat /srv/exampleapp/.deploy-kit/cutover.json"))["steps"]
        give_back = next(s for s in steps if s["name"] == "give back")
        assert give_back["ok"] and give_back["ended"] - give_back["started"] < 60, give_back  # not 330 s
    assert elapsed < 330, elapsed  # the whole failed deploy, build included, took less than one TimeoutStopSec
    print(f"failed deploy took {elapsed:.1f} s")  # measured in the benchmark, not asserted here


def test_a_release_that_crashes_on_its_first_real_task_hands_back_and_strands_nothing(stage, sandbox_config,
                                                                                     app_repo):
    good = current_release(stage, 0)
    source = (app_repo / TASKS).read_text()
    # Verification (celery.accumulate) passes; the first probe it takes kills the worker's main process.
    crash = source.replace('    started = time.time()\n    logger.info("probe %s ran", tag)',
                           '    import signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    os._exit(1)\n'
                           '    started = time.time()\n    logger.info("probe %s ran", tag)')
    assert crash != source
    commit(app_repo, {"ledger/tasks.py": crash}, "the worker dies on its first probe")
    with Producer() as producer:
        proc = fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, timeout=900)
        time.sleep(3)
    commit(app_repo, {"ledger/tasks.py": source}, "revert the crash")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "watch: FAILED" in proc.stdout and "crashed" in proc.stdout
    assert [current_release(stage, i) for i in (0, 1)] == [good, good]
    results = producer.results(timeout=90)  # every task completes, the ones the dead worker held too
    assert {r["release"] for r in results} == {f"/srv/exampleapp/releases/{good}"}
    # A worker that dies holds tasks it took: with acks_late they run again (at least once, as Celery
    # promises for a lost worker); none may be missing, and none left in the broker.
    counts = ran_counts(stage, producer.tag)
    missing = [n for n in range(len(producer.sent)) if not counts.get(f"{producer.tag}-{n}")]
    assert missing == [], (missing, proc.stdout[-3000:])
    assert unacked(stage) == 0


def legacy_unit(stage, worker) -> str:
    """The plain unit deploy-kit rendered before handovers: restart in place, through `current`."""
    content = units.worker_unit(stage, worker).content
    content = content.replace(f"{stage.app.releases_dir}/%i", str(stage.app.current_link))
    content = content.replace(f"-n {worker.name}.%i@%%h", f"-n {worker.name}@%%h")
    content = content.replace("-Q ${DEPLOY_KIT_QUEUES}", f"-Q {','.join(worker.queues)}")
    return "".join(line + "\n" for line in content.splitlines() if "DEPLOY_KIT_QUEUES" not in line)


def test_a_host_set_up_by_an_older_deploy_kit_moves_to_instances_without_losing_a_task(stage, sandbox_config):
    release = current_release(stage, 0)
    worker = stage.workers[0]
    plain = worker.legacy_unit(stage.app)
    on_host(stage, 0, f"cat > /etc/systemd/system/{plain} <<'EOF'\n{legacy_unit(stage, worker)}EOF\n"
                      f"systemctl disable --now {worker.instance(stage.app, release)}\n"
                      f"systemctl daemon-reload && systemctl enable --now {plain}\n")
    setup = fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    assert f"{plain} (restart in place) keeps serving" in setup.stdout
    assert on_host(stage, 0, f"systemctl is-active {plain}").strip() == "active"  # setup left it alone
    with Producer() as producer:
        deployed = fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, timeout=900)
        time.sleep(1)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"draining {plain}" in deployed.stdout or plain in deployed.stdout
    results = producer.results()
    assert len(results) == len(producer.sent)
    counts = ran_counts(stage, producer.tag)
    assert all(counts.get(f"{producer.tag}-{n}") == 1 for n in range(len(producer.sent)))
    time.sleep(2)
    assert on_host(stage, 0, f"systemctl is-active {plain} || true").strip() in ("inactive", "unknown")
    cleaned = fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    assert f"remove unit {plain} (retired by a handover)" in cleaned.stdout
    assert on_host(stage, 0, f"test -e /etc/systemd/system/{plain} && echo yes || echo no").strip() == "no"


def test_status_shows_one_instance_per_service_after_the_handover(stage, sandbox_config):
    time.sleep(3)  # the old instances finish draining
    proc = fab("status", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    release = current_release(stage, 0)
    assert proc.stdout.count(f"exampleapp-worker-default@{release}.service") == 2
    assert proc.stdout.count("pong") == 4  # two services on each of two hosts
    check = fab("check", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert check.returncode == 0, check.stdout + check.stderr
    enabled = on_host(stage, 0, "ls /etc/systemd/system/multi-user.target.wants/ | grep exampleapp-worker-default")
    assert enabled.split() == [f"exampleapp-worker-default@{release}.service"]  # exactly current's at boot
    assert units.private_queue(stage, stage.workers[0], release, H1) in on_host(
        stage, 0, f"systemctl show -p Environment exampleapp-worker-default@{release}.service")


def test_restart_in_place_verifies_on_the_private_queue_then_serves_every_task_once(stage, sandbox_config):
    """`handover = false`: the queue waits while the old worker stops and the new one is proven on
    its private queue; then it joins, and every task sent meanwhile runs exactly once."""
    text = sandbox_config.read_text()
    in_place = sandbox_config.with_name("in-place.toml")
    in_place.write_text(text.replace('name = "default"\nqueues = ["celery"]',
                                     'name = "default"\nqueues = ["celery"]\nhandover = false'))
    assert in_place.read_text() != text
    with Producer() as producer:
        proc = fab("deploy", "--stage", TEST_SANDBOX, config_file=in_place, timeout=900)
        time.sleep(1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "joined default." in proc.stdout
    results = producer.results()
    release = current_release(stage, 0)
    assert len(results) == len(producer.sent) and results[-1]["release"] == f"/srv/exampleapp/releases/{release}"
    counts = ran_counts(stage, producer.tag, len(producer.sent))
    odd = {n: counts.get(f"{producer.tag}-{n}") for n in range(len(producer.sent))
           if counts.get(f"{producer.tag}-{n}") != 1}
    assert all(counts.get(f"{producer.tag}-{n}") == 1 for n in range(len(producer.sent))), odd
    live = on_host(stage, 0, "systemctl list-units --plain --no-legend --state=active 'exampleapp-worker-default@*'")
    assert [line.split()[0] for line in live.splitlines()] == [f"exampleapp-worker-default@{release}.service"]


def test_a_rollback_right_after_a_deploy_waits_for_the_old_instance_to_drain(stage, long_limit, app_repo):
    """The old instance still finishes a long task when `fab rollback` comes: its start waits for
    the drain (while `fab status` shows it draining); then the usual handover. Every task runs
    exactly once, the long one where it started, and one release serves in the end."""
    def deploy(what: str) -> str:
        commit(app_repo, {"ledger/drain.txt": f"{what} {time.time()}\n"}, what)
        fab("deploy", "--stage", TEST_SANDBOX, config_file=long_limit, check=True, timeout=900)
        return current_release(stage, 0)

    back = deploy("the release to go back to")  # its instances run with the 300 s limit
    with Producer() as producer:
        long = producer.long(120)
        conftest.wait_for(lambda: ran_counts(stage, producer.tag).get(f"{producer.tag}-long"), 60,
                          "the long task to start")
        ahead = deploy("the release rolled back from")
        status = fab("status", "--stage", TEST_SANDBOX, config_file=long_limit)
        rolled = fab("rollback", "--stage", TEST_SANDBOX, config_file=long_limit, timeout=900)
        time.sleep(1)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    instance = f"exampleapp-worker-default@{back}.service"
    assert any(instance in line and "draining" in line for line in status.stdout.splitlines()), status.stdout
    assert f"start: {instance} is still draining" in rolled.stdout, rolled.stdout
    assert [current_release(stage, i) for i in (0, 1)] == [back, back] and ahead != back
    assert long.get(timeout=200)["release"] == f"/srv/exampleapp/releases/{back}"
    results = producer.results()
    assert {r["release"].rsplit("/", 1)[-1] for r in results} <= {back, ahead}
    counts = ran_counts(stage, producer.tag)
    assert all(counts.get(f"{producer.tag}-{n}") == 1 for n in range(len(producer.sent))), \
        {k: v for k, v in counts.items() if v != 1}
    assert counts.get(f"{producer.tag}-long") == 1
    for index in (0, 1):  # one release serves; nothing else starts later, nothing else at boot
        def alone(index=index):
            live = on_host(stage, index, "systemctl list-units --plain --no-legend "
                                         "--state=active,activating,deactivating 'exampleapp-worker-default@*'")
            return [line.split()[0] for line in live.splitlines()] == [instance]
        conftest.wait_for(alone, 60, "the instance rolled back from to drain")
        time.sleep(5)
        assert alone(), on_host(stage, index, "systemctl list-units --all 'exampleapp-worker-default@*'")
        enabled = on_host(stage, index, "ls /etc/systemd/system/multi-user.target.wants/")
        assert [u for u in enabled.split() if u.startswith("exampleapp-worker-default@")] == [instance]


def test_an_older_instance_enabled_at_boot_fails_the_check_and_setup_disables_it(stage, sandbox_config):
    """`fab check` names `fab setup` as the fix when another release's instance would start at
    boot too (a cutover cut off); setup disables it, and the check passes."""
    older = stage.workers[0].instance(stage.app, "2026-01-01-000000")
    on_host(stage, 1, f"systemctl enable --quiet {older}")
    check = fab("check", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert check.returncode == 3 and f"{older} also start at boot" in check.stdout and "fab setup" in check.stdout
    setup = fab("setup", "--stage", TEST_SANDBOX, "--yes", config_file=sandbox_config, check=True)
    assert f"disable {older} at boot" in setup.stdout
    assert on_host(stage, 1, f"systemctl is-enabled {older} || true").strip() == "disabled"
    check = fab("check", "--stage", TEST_SANDBOX, config_file=sandbox_config)
    assert check.returncode == 0, check.stdout + check.stderr
