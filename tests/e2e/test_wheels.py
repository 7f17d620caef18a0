"""The wheels fetched on this machine for a host, with the real pip and package index: what only
the host's Python needs comes too, so the host's first build runs once."""

from deploy_kit import wheels


def test_a_dependency_only_debian_12s_python_needs_is_fetched_for_it(tmp_path):
    """redis 8.1 (the example app's) requires async-timeout when python_full_version < 3.11.3:
    Debian 12's Python is 3.11.2; pip on a newer Python here leaves it out by itself."""
    house = wheels.Wheelhouse("redis==8.1.0\n", wheels.Target("3.11.2", "x86_64", "2.36"), tmp_path)
    names = [w.name.split("-", 1)[0].lower() for w in house.files()]
    assert "redis" in names and "async_timeout" in names
    newer = wheels.Wheelhouse("redis==8.1.0\n", wheels.Target("3.12.3", "x86_64", "2.36"), tmp_path)
    assert "async_timeout" not in [w.name.split("-", 1)[0].lower() for w in newer.files()]
