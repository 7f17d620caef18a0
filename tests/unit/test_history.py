"""How long ago a release was made, as `fab releases` shows it."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from deploy_kit.history import age

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).isoformat(timespec="seconds")


@pytest.mark.parametrize("delta, shown", [
    ({"seconds": 0}, "0s"),
    ({"seconds": 45}, "45s"),
    ({"seconds": 119}, "119s"),
    ({"seconds": 120}, "2m"),
    ({"minutes": 59, "seconds": 59}, "59m"),
    ({"minutes": 119}, "119m"),
    ({"hours": 2}, "2h"),
    ({"hours": 47, "minutes": 59}, "47h"),
    ({"hours": 48}, "2d"),
    ({"days": 3, "hours": 2}, "3d"),
    ({"days": 400}, "400d"),
])
def test_age_picks_the_unit_by_magnitude(delta, shown):
    assert age(ago(**delta), NOW) == shown


def test_age_of_a_timestamp_in_another_time_zone():
    tokyo = timezone(timedelta(hours=9))
    assert age(datetime(2026, 11, 24, 20, 0, 0, tzinfo=tokyo).isoformat(), NOW) == "60m"  # 11:00 UTC


def test_age_of_a_timestamp_in_the_future_is_zero():
    assert age((NOW + timedelta(minutes=5)).isoformat(), NOW) == "0s"


@pytest.mark.parametrize("when", ["", "yesterday", None, "2026-13-01T00:00:00+00:00"])
def test_age_of_an_unreadable_timestamp(when):
    assert age(when, NOW) == "?"


def test_age_defaults_to_now():
    assert age(datetime.now(UTC).isoformat()) in ("0s", "1s", "2s")


def test_age_of_a_timestamp_without_time_zone_does_not_crash():
    assert age("2026-11-24T11:00:00", NOW) == "60m"  # read as UTC, as deploy-kit writes


def test_lock_state_reads_the_holder_and_the_cutovers_still_running(tmp_path, monkeypatch, capsys):
    """What `fab unlock` shows comes from the host program (`remote/lock.py`) through hostlib."""
    from deploy_kit.history import parse_lock_state
    from deploy_kit.remote import hostlib, lock

    listed = "shop-cutover-20261124120000.service loaded active running x\n"
    monkeypatch.setattr(hostlib, "run", lambda argv, **kw: (0, listed, ""))

    def seen(holder_text):
        if holder_text is not None:
            (tmp_path / "lock").mkdir(exist_ok=True)
            (tmp_path / "lock" / "holder.json").write_text(holder_text)
        lock.main({"state_dir": str(tmp_path), "app": "shop"})
        return parse_lock_state(capsys.readouterr().out)

    state = seen(None)
    assert state.holder is None and state.cutovers == ("shop-cutover-20261124120000.service",)
    state = seen('{"who": "alice", "from": "alice-laptop", "action": "deploy", "ref": "main", "since": "x", '
                 '"token": "t"}')  # a holder file written before the token existed
    assert state.holder is not None and state.holder.describe() == "held by alice from alice-laptop since x " \
        "(deploy of main)"
    assert not seen("{not json").holder.readable
