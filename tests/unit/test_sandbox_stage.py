"""The sandbox stage block: rendered from hosts, and swapped in place in the user's file."""

from pathlib import Path

from deploy_kit import config
from deploy_kit.config import Host, SSHSettings
from deploy_kit.sandbox import stage

HOSTS = [Host("sb1", "10.199.0.11", roles=("worker", "beat", "migrate")), Host("sb2", "10.199.0.12")]
SSH = SSHSettings(known_hosts=Path("/state/known_hosts"), identity_file=Path("/state/id_ed25519"))


def test_rendered_stage_is_a_valid_configuration(tmp_path):
    block = stage.render("sb", HOSTS, SSH, Path("/src/deploy-kit"))
    loaded = config.parse(block, tmp_path / "hosts.toml").stage("sb")
    assert [h.name for h in loaded.hosts] == ["sb1", "sb2"]
    assert loaded.beat is not None and loaded.beat.host == "sb1"
    assert loaded.app.repo == "/src/deploy-kit" and loaded.app.path == "examples/exampleapp"
    assert loaded.ssh.identity_file == Path("/state/id_ed25519")


def test_block_is_appended_then_replaced_in_place():
    own = '# mine\ndefault_stage = "prod"\n\n[stages.prod]\nparallel = 2\n'
    first = stage.replace_block(own, "sb", stage.render("sb", HOSTS[:1], SSH, Path("/r")))
    assert first.startswith(own)
    second = stage.replace_block(first + "# after\n", "sb", stage.render("sb", HOSTS, SSH, Path("/r")))
    assert second.count("[stages.sb]") == 1
    assert second.count("[[stages.sb.hosts]]") == 2
    assert second.startswith(own) and second.endswith("# after\n")


def test_write_creates_the_file_when_missing(tmp_path):
    target = tmp_path / "hosts.toml"
    stage.write(target, "sb", stage.render("sb", HOSTS, SSH, Path("/r")))
    assert config.load(target).stage(None).name == "sb"


def test_the_broker_unit_is_the_sandboxs_broker(tmp_path):
    for broker, unit in (("redis", "redis-server.service"), ("rabbitmq", "rabbitmq-server.service")):
        block = stage.render("sb", HOSTS, SSH, Path("/r"), broker)
        assert config.parse(block, tmp_path / "hosts.toml").stage("sb").systemd.broker_unit == unit
