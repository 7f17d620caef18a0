"""`fab unlock` (`tasks/deploy.py`), with the hosts' lock states as `history.lock_states` reads them:
it never breaks a lock while a cutover still runs on a host, and breaks it once none does."""

import pytest
from invoke import Context, Exit

from deploy_kit import history, ui
from deploy_kit.remote.contracts import LockHolder
from deploy_kit.tasks import deploy as deploy_tasks

from .samples import stage_of

HOLDER = LockHolder(who="bob", host="ci", action="deploy", ref="main", since="2026-11-24T12:30:00+00:00", token="t")


@pytest.fixture
def hosts(monkeypatch):
    monkeypatch.setattr(ui, "interruptible", lambda: None)  # the suite's own signal handlers stay
    monkeypatch.setattr(deploy_tasks, "load_stage", lambda stage: stage_of())
    broken: list[list[str]] = []
    monkeypatch.setattr(history, "break_lock", lambda stage, names: broken.append(names))

    def states(found):
        monkeypatch.setattr(history, "lock_states", lambda stage: found)
    return states, broken


def test_unlock_refuses_while_a_cutover_runs_and_breaks_the_lock_once_none_does(hosts, capsys):
    states, broken = hosts
    states({"web1": history.LockState(HOLDER), "web2": history.LockState(HOLDER, ("shop-cutover-20261124",))})
    with pytest.raises(Exit) as caught:
        deploy_tasks.unlock(Context(), yes=True)
    assert caught.value.code == 4 and broken == []  # not even with --yes
    assert "a cutover still runs" in caught.value.message and "web2: shop-cutover-20261124" in caught.value.message
    assert "fab status --stage prod" in caught.value.message

    states({"web1": history.LockState(HOLDER), "web2": history.LockState(None)})
    deploy_tasks.unlock(Context(), yes=True)
    assert broken == [["web1"]]
    assert "web1: held by bob from ci" in capsys.readouterr().out


def test_unlock_without_a_lock_breaks_nothing(hosts, capsys):
    states, broken = hosts
    states({"web1": history.LockState(None), "web2": history.LockState(None)})
    deploy_tasks.unlock(Context(), yes=True)
    assert broken == [] and "no host holds the lock" in capsys.readouterr().out
