"""Parsing what the host probe prints."""

from deploy_kit.inventory import parse_facts

RECORDED = """\
hostname=web1
os=Debian GNU/Linux 12 (bookworm)
systemd=degraded
systemd_version=252
python=3.11.2
sudo=yes
journal=yes
"""


def test_parse_recorded_probe_output():
    facts = parse_facts(RECORDED)
    assert facts.hostname == "web1" and facts.systemd == "degraded"
    assert facts.systemd_version == "252" and facts.python == "3.11.2"
    assert facts.sudo and facts.journal


def test_missing_lines_read_as_unknown():
    facts = parse_facts("hostname=x\nsudo=no\n")
    assert facts.systemd == "unknown" and facts.python == "missing" and not facts.sudo
