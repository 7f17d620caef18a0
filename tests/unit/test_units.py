"""The systemd units rendered from hosts.toml: what each service runs as, how it stops, how it is hardened."""

from pathlib import Path

from deploy_kit import config, units

STAGE = """
[stages.prod]
[[stages.prod.hosts]]
name = "web1"
address = "10.0.0.5"
roles = ["worker", "beat", "migrate"]
[[stages.prod.hosts]]
name = "web2"
address = "10.0.0.6"
[stages.prod.app]
name = "shop"
repo = "git@example.com:acme/shop.git"
celery_app = "shop.celery"
deploy_to = "/srv/shop"
user = "shopsvc"
group = "shopgrp"
env_file = "/etc/shop/prod.env"
[stages.prod.systemd]
stop_margin = 20
limit_nofile = 32768
[[stages.prod.workers]]
name = "default"
queues = ["celery", "mail"]
time_limit = 600
concurrency = 4
[[stages.prod.workers]]
name = "reports"
queues = ["reports"]
hosts = ["web2"]
loglevel = "warning"
"""

BROKER = '[stages.prod.systemd]\nbroker_unit = "redis-server.service"\n'


def stage_of(text: str = STAGE) -> config.Stage:
    return config.parse(text, Path("/x/hosts.toml")).stage("prod")


def service_lines(content: str) -> list[str]:
    section = content.split("[Service]\n", 1)[1].split("\n[Install]", 1)[0]
    return [line for line in section.splitlines() if line]


def exec_start(content: str) -> str:
    return next(line for line in content.splitlines() if line.startswith("ExecStart="))


def test_worker_unit_runs_the_worker_in_the_foreground_as_the_service_account():
    stage = stage_of()
    unit = units.worker_unit(stage, stage.workers[0])
    assert unit.name == "shop-worker-default@.service"  # a template: each release runs as its instance
    assert str(unit.path) == "/etc/systemd/system/shop-worker-default@.service"
    lines = service_lines(unit.content)
    assert "Type=simple" in lines
    assert "User=shopsvc" in lines and "Group=shopgrp" in lines
    assert "WorkingDirectory=/srv/shop/releases/%i" in lines  # pinned to its release, whatever current says
    assert "EnvironmentFile=/etc/shop/prod.env" in lines
    assert "LimitNOFILE=32768" in lines
    assert "ReadWritePaths=/srv/shop/shared" in lines


def test_worker_instance_starts_celery_from_its_own_release_virtualenv():
    stage = stage_of()
    command = exec_start(units.worker_unit(stage, stage.workers[0]).content)
    assert command.startswith("ExecStart=/srv/shop/releases/%i/.venv/bin/python -m celery -A shop.celery worker ")
    assert " -c 4 " in command
    assert "--time-limit=600" in command
    # then the options of a handover's start only (unset otherwise: no argument at all)
    assert command.endswith("--loglevel=INFO $DEPLOY_KIT_HANDOVER_OPTIONS")


def test_worker_node_name_escapes_the_percent_for_celery():
    stage = stage_of()
    command = exec_start(units.worker_unit(stage, stage.workers[0]).content)
    # systemd turns %%h into %h, which Celery expands to the host name; %i is the release, so two
    # instances running side by side never share a node name.
    assert " -n default.%i@%%h " in command
    assert " -n default.%i@%h " not in command


def test_worker_consumes_its_queues_plus_a_private_queue_unless_a_handover_narrows_it():
    stage = stage_of()
    content = units.worker_unit(stage, stage.workers[0]).content
    assert " -Q ${DEPLOY_KIT_QUEUES} " in exec_start(content)
    lines = service_lines(content)
    assert "Environment=DEPLOY_KIT_QUEUES=celery,mail,deploy-kit.shop.prod.default.%i@%H" in lines
    # Read after Environment= (it wins); in /run, so an instance that boots consumes its real queues.
    assert "EnvironmentFile=-/run/deploy-kit/shop/default@%i.env" in lines
    assert lines.index("EnvironmentFile=-/run/deploy-kit/shop/default@%i.env") > \
        lines.index("Environment=DEPLOY_KIT_QUEUES=celery,mail,deploy-kit.shop.prod.default.%i@%H")
    assert units.private_queue(stage, stage.workers[0], "2026-11-24-120000", "web1") == \
        "deploy-kit.shop.prod.default.2026-11-24-120000@web1"  # unique to app, stage, service, release, host


def test_start_up_can_skip_mingle_and_gossip():
    stage = stage_of(STAGE.replace('concurrency = 4\n', 'concurrency = 4\nmingle = false\ngossip = false\n'))
    command = exec_start(units.worker_unit(stage, stage.workers[0]).content)
    assert command.endswith("--loglevel=INFO --without-mingle --without-gossip $DEPLOY_KIT_HANDOVER_OPTIONS")
    assert "--without" not in exec_start(units.worker_unit(stage, stage.workers[1]).content)


def test_worker_stop_timeout_covers_the_task_time_limit_plus_the_margin():
    stage = stage_of()
    default, reports = stage.workers
    assert "TimeoutStopSec=620" in service_lines(units.worker_unit(stage, default).content)
    assert "TimeoutStopSec=320" in service_lines(units.worker_unit(stage, reports).content)  # default 300 + 20
    assert units.stop_timeout(stage, default) == default.time_limit + stage.systemd.stop_margin


def test_worker_unit_shuts_down_warm_and_restarts_on_failure():
    stage = stage_of()
    lines = service_lines(units.worker_unit(stage, stage.workers[0]).content)
    assert "KillMode=mixed" in lines
    assert "KillSignal=SIGTERM" in lines
    assert "Restart=on-failure" in lines
    assert "RestartSec=5" in lines


def test_every_unit_carries_every_hardening_line():
    stage = stage_of()
    for host in stage.hosts:
        for unit in units.units_for(stage, host).values():
            lines = service_lines(unit.content)
            missing = [setting for setting in units.HARDENING if setting not in lines]
            assert missing == [], f"{unit.name} lacks {missing}"


def test_units_drop_every_capability():
    stage = stage_of()
    lines = service_lines(units.worker_unit(stage, stage.workers[0]).content)
    assert "CapabilityBoundingSet=" in lines  # empty: no capability at all
    assert "AmbientCapabilities=" in lines
    assert "NoNewPrivileges=yes" in lines


def test_units_start_on_boot_and_are_marked_as_managed():
    stage = stage_of()
    content = units.worker_unit(stage, stage.workers[0]).content
    assert content.startswith(units.MANAGED_MARKER)
    assert "[Install]\nWantedBy=multi-user.target\n" in content
    assert "ConditionPathExists=/srv/shop/releases/%i" in content
    assert content.endswith("\n")


def test_beat_unit_keeps_its_schedule_in_the_state_directory():
    stage = stage_of()
    unit = units.beat_unit(stage)
    assert unit.name == "shop-beat.service"
    command = exec_start(unit.content)
    assert " beat -s /var/lib/shop/celerybeat-schedule " in command
    assert "-A shop.celery" in command
    lines = service_lines(unit.content)
    assert "StateDirectory=shop" in lines
    assert "TimeoutStopSec=20" in lines
    assert "Type=simple" in lines and "KillMode=mixed" in lines
    assert str(units.beat_schedule(stage.app)) == "/var/lib/shop/celerybeat-schedule"


def test_beat_unit_only_on_the_host_with_the_beat_role():
    stage = stage_of()
    web1 = units.units_for(stage, stage.host("web1"))
    web2 = units.units_for(stage, stage.host("web2"))
    assert list(web1) == ["shop-worker-default@.service", "shop-beat.service"]
    assert list(web2) == ["shop-worker-default@.service", "shop-worker-reports@.service"]


def test_no_beat_unit_anywhere_without_a_beat_host():
    stage = stage_of(STAGE.replace('roles = ["worker", "beat", "migrate"]', 'roles = ["worker", "migrate"]'))
    assert stage.beat is None
    for host in stage.hosts:
        assert not any("beat" in name for name in units.units_for(stage, host))


def test_worker_on_a_host_only_when_listed_there():
    stage = stage_of()
    assert "shop-worker-reports@.service" not in units.units_for(stage, stage.host("web1"))


def test_without_broker_unit_only_the_network_is_waited_for():
    stage = stage_of()
    content = units.worker_unit(stage, stage.workers[0]).content
    assert "Wants=network-online.target\n" in content
    assert "After=network-online.target\n" in content


def test_broker_unit_is_wanted_and_started_before_the_services():
    stage = stage_of(STAGE.replace("[stages.prod.systemd]\n", BROKER))
    for unit in units.units_for(stage, stage.host("web1")).values():
        assert "Wants=network-online.target redis-server.service\n" in unit.content
        assert "After=network-online.target redis-server.service\n" in unit.content


def test_same_configuration_renders_identical_bytes():
    first = {h.name: units.units_for(stage_of(), h) for h in stage_of().hosts}
    second = {h.name: units.units_for(stage_of(), h) for h in stage_of().hosts}
    for host, rendered in first.items():
        assert {n: u.content.encode() for n, u in rendered.items()} == \
            {n: u.content.encode() for n, u in second[host].items()}


def test_unit_environment_is_what_the_service_section_holds():
    stage = stage_of()
    unit = units.worker_unit(stage, stage.workers[0])
    lines = service_lines(unit.content)
    assert all(setting in lines for setting in unit.environment if not setting.startswith("WorkingDirectory="))
    assert unit.environment == units.service_environment(stage)


def test_managed_patterns_cover_the_app_units_only():
    stage = stage_of()
    assert units.managed_pattern(stage.app) == ("shop-worker-*.service", "shop-beat.service")
