"""The session's connections: a connection that died during a long phase is made anew before the
next phase, a live one is left alone (no round trip), a host still unreachable keeps its old one."""

import types

from deploy_kit import session as sessions
from deploy_kit.errors import ConnectError

from .samples import stage_of


def remote(name: str, alive: bool):
    transport = types.SimpleNamespace(is_active=lambda: alive)
    closed = []
    return types.SimpleNamespace(name=name, connection=types.SimpleNamespace(transport=transport),
                                 close=lambda: closed.append(name), closed=closed)


def test_revive_reconnects_only_the_dead_and_keeps_the_old_when_the_host_is_still_away(monkeypatch):
    stage = stage_of()
    made = []

    def connect(host, ssh):
        made.append(host.name)
        if host.name == "web2" and made.count("web2") == 1:
            raise ConnectError(host.name, "still unreachable")
        return remote(host.name, True)

    monkeypatch.setattr(sessions, "connect", connect)
    session = sessions.Session(stage)
    live, dead = remote("web1", True), remote("web2", False)
    session.remotes = {"web1": live, "web2": dead}
    session.revive(["web1", "web2"])
    assert made == ["web2"] and session.remotes == {"web1": live, "web2": dead}  # still away: kept, not closed
    session.revive(["web1", "web2"])
    assert made == ["web2", "web2"] and session.remotes["web2"] is not dead and dead.closed == ["web2"]
    assert session.remotes["web1"] is live and live.closed == []
