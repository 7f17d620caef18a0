"""Release arithmetic: which release a rollback goes to, and which ones cleanup deletes."""

import pytest

from deploy_kit import releases
from deploy_kit.errors import UsageError
from deploy_kit.hostfacts import ReleaseInfo
from deploy_kit.remote.contracts import LiveEvent

A, B, C, D, E, F = (f"2026-11-{day:02d}-120000" for day in range(20, 26))


def good(name: str) -> ReleaseInfo:
    return ReleaseInfo(name, building=False, bad=False, revision={})


def bad(name: str) -> ReleaseInfo:
    return ReleaseInfo(name, building=False, bad=True, revision={})


def building(name: str) -> ReleaseInfo:
    return ReleaseInfo(f".{name}.building", building=True, bad=False, revision={})


def test_good_releases_sorted_by_name_without_bad_half_built_or_foreign_ones():
    found = [good(C), bad(B), good(A), building(D), ReleaseInfo("lost+found", False, False, {})]
    assert releases.good(found) == [A, C]


def test_without_a_live_log_releases_went_live_in_name_order():
    found = [good(A), good(B), bad(C), good(D)]
    assert releases.previous_live(found, (), D) == B
    assert releases.previous_live(found, (), B) == A
    assert releases.previous_live(found, (), A) is None
    assert releases.previous_live(found, (), None) == D


def test_rollback_goes_to_the_previous_good_release_by_default():
    found = [good(A), good(B), bad(C), good(D)]
    assert releases.rollback_target(found, D) == B


def test_rollback_skips_a_half_built_release():
    found = [good(A), building(B), good(C)]
    assert releases.rollback_target(found, C) == A


def test_rollback_to_a_named_release():
    found = [good(A), good(B), good(C)]
    assert releases.rollback_target(found, C, to=A) == A


def test_rollback_to_a_named_newer_release_is_allowed():
    found = [good(A), good(B), good(C)]
    assert releases.rollback_target(found, A, to=C) == C


def test_rollback_refuses_a_bad_release():
    with pytest.raises(UsageError, match="is marked bad"):
        releases.rollback_target([good(A), bad(B), good(C)], C, to=B)


def test_rollback_refuses_a_half_built_release():
    with pytest.raises(UsageError, match="was never completed"):
        releases.rollback_target([good(A), building(B), good(C)], C, to=f".{B}.building")


def test_rollback_to_the_current_release_is_no_move_on_that_host():
    assert releases.rollback_target([good(A), good(B)], B, to=B) == B


def test_rollback_refuses_an_unknown_release_and_lists_the_good_ones():
    with pytest.raises(UsageError) as info:
        releases.rollback_target([good(A), bad(B), good(C)], C, to="2026-01-01-000000")
    message = str(info.value)
    assert "'2026-01-01-000000' does not exist" in message
    assert f"releases: {A}, {C}" in message


def test_rollback_refuses_when_no_older_good_release_exists():
    with pytest.raises(UsageError, match=f"no release went live before {B}"):
        releases.rollback_target([bad(A), good(B), good(C)], B)


def test_rollback_refuses_without_a_current_release():
    with pytest.raises(UsageError, match="no current release"):
        releases.rollback_target([good(A), good(B)], None)


def test_cleanup_keeps_the_newest_good_releases():
    found = [good(n) for n in (A, B, C, D, E)]
    assert releases.to_delete(found, E, keep=3) == [A, B]


def test_cleanup_with_nothing_to_delete():
    assert releases.to_delete([good(A), good(B)], B, keep=5) == []


def test_cleanup_never_deletes_current_nor_the_previous_good_one():
    # Before the live log: after a rollback to B, C..F are the ones rollbacks left; A was live before B.
    found = [good(n) for n in (A, B, C, D, E, F)]
    assert releases.to_delete(found, B, keep=3) == [C, D, E]


def test_cleanup_does_not_count_bad_releases_as_kept_good_ones():
    found = [good(A), good(B), good(C), bad(D), bad(E)]
    # keep=2 keeps B and C (the newest good), not D and E.
    assert releases.to_delete(found, C, keep=2) == [A]


def test_cleanup_keeps_bad_releases_newer_than_the_oldest_kept_one():
    found = [good(A), good(B), bad(C), good(D)]
    assert releases.to_delete(found, D, keep=2) == [A]


def test_cleanup_deletes_bad_releases_older_than_every_kept_one():
    found = [bad(A), good(B), good(C), good(D), good(E)]
    assert releases.to_delete(found, E, keep=2) == [A, B, C]


def test_cleanup_always_deletes_half_built_releases():
    found = [good(A), good(B), building(C)]
    assert releases.to_delete(found, B, keep=5) == [f".{C}.building"]


def test_cleanup_leaves_directories_that_are_not_releases():
    found = [ReleaseInfo("notes", False, False, {}), good(A), good(B), good(C)]
    assert releases.to_delete(found, C, keep=2) == [A]


# --- the live log decides: what went live, in which order ---------------------------------

OLD = "2026-11-19-120000"  # a release built on a laptop whose clock was behind


def went_live(*moves: tuple[str, str] | tuple[str, str, str]) -> tuple[LiveEvent, ...]:
    """(previous, release[, mode]) per move of `current`, oldest first."""
    return tuple(LiveEvent(m[1], m[0], m[2] if len(m) > 2 else "deploy") for m in moves)


def test_a_release_that_never_went_live_is_no_rollback_target_and_cleanup_deletes_it():
    # D was built (a cut-off deploy renamed it into place) but never switched to.
    found = [good(A), good(B), good(C), good(D)]
    log = went_live(("", A), (A, B), (B, C))
    assert releases.rollback_target(found, C, events=log) == B
    assert releases.to_delete(found, C, keep=5, events=log) == [D]
    with pytest.raises(UsageError, match="never went live"):
        releases.rollback_target(found, C, to=D, events=log)


def test_order_comes_from_the_log_not_from_names():
    found = [good(OLD), good(A), good(B)]
    log = went_live(("", A), (A, B), (B, OLD))
    assert releases.rollback_target(found, OLD, events=log) == B
    assert releases.to_delete(found, OLD, keep=2, events=log) == [A]


def test_rolling_back_twice_goes_two_steps_back_and_rollback_to_undoes_it():
    found = [good(A), good(B), good(C)]
    log = went_live(("", A), (A, B), (B, C), (C, B, "rollback"))
    assert releases.rollback_target(found, B, events=log) == A
    log += went_live((B, A, "rollback"))
    with pytest.raises(UsageError) as info:
        releases.rollback_target(found, A, events=log)
    assert f"no release went live before {A}" in str(info.value)
    assert f"`fab rollback --to {C}`" in str(info.value)
    assert releases.rollback_target(found, A, to=C, events=log) == C
    # Undone: C is live again, and a rollback from it goes to A, the release live before it.
    log += went_live((A, C, "rollback"))
    assert releases.rollback_target(found, C, events=log) == A


def test_cleanup_keeps_the_most_recently_live_releases_and_the_rollback_target():
    found = [good(n) for n in (A, B, C, D)]
    log = went_live(("", A), (A, B), (B, C), (C, D), (D, B, "rollback"))
    # Live order, most recent first: B, D (left by the rollback), C, A; the target is C.
    assert releases.lineage(found, log, B) == [B, D, C, A]
    assert releases.to_delete(found, B, keep=2, events=log) == [A]


def test_releases_from_before_the_log_count_as_live_in_name_order():
    found = [good(A), good(B), good(C)]
    log = went_live((B, C))  # the first deploy with a live log left B
    assert releases.rollback_target(found, C, events=log) == B
    log += went_live((C, B, "rollback"))
    assert releases.rollback_target(found, B, events=log) == A


def made(name: str, mtime: float) -> ReleaseInfo:
    return ReleaseInfo(name, building=False, bad=False, revision={}, mtime=mtime)


def test_an_orphan_of_a_cut_off_first_deploy_never_counts_as_live():
    log = (LiveEvent(B, "", "deploy", when=200.0),)  # the first deploy that reached the switch
    found = [made(A, 100.0), made(B, 150.0)]  # A: built by a first deploy that was cut off
    assert releases.lineage(found, log, B) == [B]
    assert releases.to_delete(found, B, keep=5, events=log) == [A]


def test_on_upgrade_a_release_a_rollback_left_before_the_log_is_kept_and_not_a_target():
    found = [made(A, 10.0), made(B, 20.0), made(C, 30.0), made(D, 300.0)]  # C was rolled back from, to B
    log = (LiveEvent(D, B, "deploy", when=290.0),)
    assert releases.rollback_target(found, D, events=log) == B
    assert releases.to_delete(found, D, keep=5, events=log) == []
    assert C in releases.rolled_back_from(found, log, D)


def test_a_first_logged_deploy_named_by_a_clock_behind_keeps_the_older_releases():
    found = [made(A, 10.0), made(B, 20.0), made(OLD, 300.0)]  # OLD sorts first, was made last
    log = (LiveEvent(OLD, B, "deploy", when=290.0),)
    assert releases.lineage(found, log, OLD) == [OLD, B, A]
    assert releases.to_delete(found, OLD, keep=5, events=log) == []


def test_a_live_log_line_of_the_wrong_types_is_refused():
    with pytest.raises(ValueError):
        LiveEvent.from_json('{"release": 5}')
    assert LiveEvent.from_json('{"release": "x"}').mode == "deploy"
