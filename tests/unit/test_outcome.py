"""The decision table: from every combination of per-host cutover results, what the stage does."""

import itertools

import pytest

from deploy_kit import outcome
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode

S = CutoverStatus
ALL = [S.DONE, S.ROLLED_BACK, S.FELL_BACK, S.ROLLBACK_FAILED, S.UNKNOWN, S.NOT_STARTED]


def state(status: CutoverStatus, live: str | None = None) -> CutoverState:
    return CutoverState(id="1", mode=Mode.DEPLOY, target="new", previous="old", status=status, live=live,
                        failure="" if status == S.DONE else "verify: no worker answered",
                        journal=["worker: ImproperlyConfigured: SECRET_KEY", "worker: ready."])


@pytest.mark.parametrize(("one", "two"), list(itertools.product(ALL, repeat=2)))
def test_every_pair_of_host_results(one, two):
    results = {"web1": state(one), "web2": state(two)}
    decided = outcome.verdict(Mode.DEPLOY, results)
    both = {one, two}
    assert decided.ok == (both == {S.DONE})
    # Whoever switched goes back when another host did not make it.
    switched = [h for h, s in results.items() if s.status == S.DONE]
    assert outcome.to_roll_back(results) == ([] if decided.ok else switched)
    # The lock stays while a host's state is unknown.
    assert decided.known == both.isdisjoint({S.ROLLBACK_FAILED, S.UNKNOWN})
    if decided.ok:
        assert decided.exit_code == 0
    elif both <= {S.ROLLED_BACK, S.NOT_STARTED}:
        assert decided.consistent and decided.exit_code == 5
    else:
        assert not decided.consistent and decided.exit_code == 6


@pytest.mark.parametrize("status", ALL)
def test_a_failed_rollback_is_always_exit_6(status):
    results = {"web1": state(S.DONE), "web2": state(status)}
    decided = outcome.verdict(Mode.ROLLBACK, results)
    assert decided.exit_code == (0 if status == S.DONE else 6)


def test_the_message_says_per_host_where_it_runs_and_why():
    results = {"web1": state(S.ROLLED_BACK, live="old"), "web2": state(S.UNKNOWN)}
    error = outcome.failure(Mode.DEPLOY, results, "new", {"web1": "old", "web2": "old"})
    text = str(error)
    assert error.exit_code == 6
    assert "web1: back on old" in text
    assert "web2: STATE UNKNOWN" in text and "`current` points to old" in text
    assert "cause: verify: no worker answered" in text
    assert "| worker: ImproperlyConfigured: SECRET_KEY" in text and "ready." not in text
    assert "release new is marked bad" in text and "fab unlock" in text


def test_a_host_whose_hand_back_failed_says_so_not_that_it_could_not_switch():
    handed = CutoverState(**{**state(S.FELL_BACK, live="new").__dict__, "hand_back": True,
                             "failure": "confirm: exampleapp-worker-default@old.service crashed"})
    results = {"web1": handed, "web2": state(S.ROLLED_BACK, live="old")}
    text = str(outcome.failure(Mode.DEPLOY, results, "new", {"web1": "old", "web2": "old"}))
    assert "web1: could not hand back, so it stays on new, which it verified in this run" in text
    assert "could not switch" not in text and "cause: confirm: exampleapp-worker-default@old.service crashed" in text
    assert "act now" in text
    own = str(outcome.failure(Mode.ROLLBACK, {"web1": state(S.FELL_BACK, live="old")}, "older", {"web1": "old"}))
    assert "web1: could not switch, stayed on old (verified)" in own


def test_live_release_is_what_the_host_reported():
    results = {"web1": state(S.DONE, live="new"), "web2": state(S.ROLLED_BACK, live=""), "web3": state(S.UNKNOWN)}
    assert outcome.live(results, {"web1": "old", "web2": None, "web3": "old"}) == \
        {"web1": "new", "web2": None, "web3": "old"}
