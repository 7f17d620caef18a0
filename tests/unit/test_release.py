"""Releases as made on the control machine: their names, their migrations, their bundle."""

import io
import json
import tarfile
from datetime import UTC, datetime, timedelta, timezone

import pytest

from deploy_kit import release


def test_release_name_is_a_sortable_utc_timestamp():
    assert release.release_name(datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)) == "2026-11-24-120000"


def test_release_name_converts_other_time_zones_to_utc():
    paris = timezone(timedelta(hours=1))
    assert release.release_name(datetime(2026, 11, 24, 13, 0, 0, tzinfo=paris)) == "2026-11-24-120000"
    new_york = timezone(timedelta(hours=-5))
    assert release.release_name(datetime(2026, 11, 24, 21, 30, 5, tzinfo=new_york)) == "2026-11-25-023005"


def test_release_names_sort_in_time_order():
    times = [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC) + timedelta(seconds=s) for s in (0, 59, 3600, 86400 * 40)]
    names = [release.release_name(t) for t in times]
    assert names == sorted(names)


def test_is_release_name():
    assert release.is_release_name("2026-11-24-120000")
    assert release.is_release_name(release.release_name(datetime.now(UTC)))
    for other in (".2026-11-24-120000.building", "2026-11-24", "2026-11-24-1200", "current", "",
                  "2026-11-24-120000-x", "x2026-11-24-120000"):
        assert not release.is_release_name(other), other


def test_migrations_lists_django_migrations_only():
    files = ["ledger/migrations/0001_initial.py", "ledger/migrations/__init__.py", "x/y.py"]
    assert release.migrations(files) == ["ledger.0001_initial"]


def test_migrations_in_nested_apps_are_sorted():
    files = ["src/shop/orders/migrations/0002_total.py", "src/shop/orders/migrations/0001_initial.py",
             "billing/migrations/0001_initial.py", "billing/migrations/README.md",
             "billing/migrations/0003_x.pyc"]
    assert release.migrations(files) == ["billing.0001_initial", "orders.0001_initial", "orders.0002_total"]


def test_env_key_is_stable_and_follows_the_requirements():
    first = release.env_key("celery==5.4.0\ndjango==5.1\n")
    assert first == release.env_key("celery==5.4.0\ndjango==5.1\n")
    assert first != release.env_key("celery==5.4.0\ndjango==5.2\n")
    assert len(first) == 16 and int(first, 16) >= 0


def make_source() -> release.Source:
    revision = {"release": "2026-11-24-120000", "sha": "abc123", "ref": "main"}
    return release.Source(name="2026-11-24-120000", sha="abc123", ref="main", archive=b"\x1f\x8bcode",
                          requirements="celery==5.4.0\n", revision=revision)


def test_source_env_key_matches_its_requirements():
    assert make_source().env_key == release.env_key("celery==5.4.0\n")


def test_bundle_holds_code_revision_requirements_script_and_wheels(tmp_path):
    wheel = tmp_path / "celery-5.4.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel bytes")
    data = release.bundle(make_source(), [wheel], "echo build\n")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["code.tar.gz", "REVISION", "requirements.txt", "build.py",
                                  "wheels/celery-5.4.0-py3-none-any.whl"]

        def read(name: str) -> bytes:
            member = tar.extractfile(name)
            assert member is not None
            return member.read()

        assert read("code.tar.gz") == b"\x1f\x8bcode"
        assert json.loads(read("REVISION")) == make_source().revision
        assert read("requirements.txt") == b"celery==5.4.0\n"
        assert read("build.py") == b"echo build\n"
        assert read("wheels/celery-5.4.0-py3-none-any.whl") == b"wheel bytes"


def test_bundle_without_wheels(tmp_path):
    data = release.bundle(make_source(), [], "true\n")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert not any(name.startswith("wheels/") for name in tar.getnames())


def _stage(extra_app: str = ""):
    from pathlib import Path

    from deploy_kit import config

    text = ('[stages.prod]\n[[stages.prod.hosts]]\naddress = "h1"\n[stages.prod.app]\nname = "shop"\n'
            f'repo = "git@example.com:a/shop.git"\ncelery_app = "shop"\n{extra_app}'
            '[[stages.prod.workers]]\nname = "default"\n')
    return config.parse(text, Path("/x/hosts.toml")).stage("prod")


SOURCE = release.Source("2026-11-24-120000", "abc", "main", b"", "Django==5.2\n", {})


def test_build_params_install_from_the_sent_wheels_only_by_default():
    params = release.build_params(_stage(), SOURCE)
    assert params["install"] == "wheels" and params["cache"] == "/srv/shop/.deploy-kit/wheels"
    assert release.build_params(_stage('install = "index"\n'), SOURCE, wheels_sent=False)["install"] == "index"


def test_nested_requirement_files_are_inlined_and_constraints_collected():
    files = {
        "app/requirements.txt": "-r req/base.txt\n-c constraints.txt\ncelery==5.7.0\n",
        "app/req/base.txt": "Django==5.2.19\n--requirement=extra.txt\n",
        "app/req/extra.txt": "redis==5.0\n",
        "app/constraints.txt": "kombu<6\n",
    }
    text, constraints = release.flatten_requirements("app/requirements.txt", files.__getitem__)
    assert text.splitlines() == ["Django==5.2.19", "redis==5.0", "-c constraints-1.txt", "celery==5.7.0"]
    assert constraints == {"constraints-1.txt": "kombu<6\n"}
    assert release.env_key(text, constraints) != release.env_key(text, {})


def test_a_requirements_loop_is_refused():
    import pytest

    from deploy_kit.errors import UsageError

    files = {"a.txt": "-r b.txt\n", "b.txt": "-r a.txt\n"}
    with pytest.raises(UsageError, match="includes itself"):
        release.flatten_requirements("a.txt", files.__getitem__)


def test_the_environment_key_follows_the_hosts_python():
    assert release.host_env_key(SOURCE, "3.11.2") != release.host_env_key(SOURCE, "3.12.1")


class FakeRemote:
    """Answers each build with the next outcome line, as the host's build script prints it."""

    name = "web1"

    def __init__(self, *outcomes: str, stderr: str = ""):
        self.outcomes = list(outcomes)
        self.stderr = stderr
        self.calls = 0

    def run(self, command, stdin, **kwargs):
        from deploy_kit.ssh import ScriptResult

        self.calls += 1
        self.sent = getattr(self, "sent", 0) + len(stdin)
        assert kwargs["check"] is False
        return ScriptResult(0, "building\n" + self.outcomes.pop(0) + "\n", self.stderr)


class FakeWheelhouse:
    hashed = False

    def __init__(self):
        self.asked: list[list[str]] = []

    def files(self, extra=None):
        self.asked.append(list(extra or []))
        return []

    def installer_wheel(self):
        return None


def build(remote, **kwargs):
    from .samples import stage_of

    source = release.Source(name="2026-11-24-120000", sha="f" * 40, ref="main", archive=b"x", requirements="celery\n",
                            revision={})
    return release.build_on(remote, stage_of(), source, FakeWheelhouse(), set(), **kwargs)


def test_a_build_is_read_from_its_typed_last_line():
    built = build(FakeRemote('{"status": "built", "reused_env": true, "missing": ""}'))
    assert built.reused_env and built.name == "2026-11-24-120000"
    assert release.read_outcome("noise\n").status.value == "failed"  # died before saying how it ended


def test_a_host_that_cannot_reuse_the_environment_gets_the_wheels_then():
    remote = FakeRemote('{"status": "needs_wheels", "reused_env": false, "missing": ""}',
                        '{"status": "built", "reused_env": false, "missing": ""}')
    assert not build(remote, send_wheels=False).reused_env and remote.calls == 2


def test_a_distribution_pip_misses_is_fetched_and_sent():
    remote = FakeRemote('{"status": "missing_distribution", "reused_env": false, "missing": "tzdata"}',
                        '{"status": "built", "reused_env": false, "missing": ""}')
    built = build(remote)
    assert remote.calls == 2
    assert built.bytes_sent == remote.sent  # both attempts' bundles, as "built ... KiB" says


def test_a_distribution_a_hashed_requirements_file_lacks_is_refused_with_the_fix(monkeypatch):
    """No unhashed line is added to a file with hashes (pip would refuse it, and the pins are the
    user's): the build stops before anything switched, naming what is missing and how to fix it."""
    from deploy_kit.errors import HostError

    monkeypatch.setattr(FakeWheelhouse, "hashed", True)
    remote = FakeRemote('{"status": "missing_distribution", "reused_env": false, "missing": "async-timeout"}')
    with pytest.raises(HostError, match=r"wants async-timeout.*nothing was switched.*Fix: regenerate it for the "
                                        r"hosts' Python 3\.11\.2"):
        build(remote, python_version="3.11.2")
    assert remote.calls == 1
    assert release.wheels.Wheelhouse("celery==5.5.0 --hash=sha256:ab\n", None, None).hashed  # type: ignore[arg-type]
    assert not release.wheels.Wheelhouse("celery==5.5.0\n", None, None).hashed  # type: ignore[arg-type]


def test_a_release_failing_its_check_in_a_reused_environment_is_built_afresh_once_then_refused():
    from deploy_kit.errors import HostError

    remote = FakeRemote('{"status": "check_failed", "reused_env": true, "missing": ""}',
                        '{"status": "check_failed", "reused_env": false, "missing": ""}',
                        stderr="RELEASE CHECK FAILED: manage.py check\nImproperlyConfigured: SECRET_KEY\n")
    with pytest.raises(HostError) as caught:
        build(remote)
    assert remote.calls == 2
    assert "fails its check" in str(caught.value) and "ImproperlyConfigured" in str(caught.value)


def test_a_host_whose_disk_filled_during_the_build_is_named_with_the_cause_and_the_fix():
    from deploy_kit.errors import HostError

    detail = "no space left on the device of /srv/shop/releases while the release was written (0 MiB free of 64 MiB)"
    remote = FakeRemote(json.dumps({"status": "no_space", "detail": detail}))
    with pytest.raises(HostError) as caught:
        build(remote)
    message = str(caught.value)
    assert message.startswith("web1: no space left on the device of /srv/shop/releases") and remote.calls == 1
    assert "nothing was switched" in message and "Fix: free space there" in message


def test_the_first_build_sends_the_wheels_the_plan_named_and_no_other(tmp_path):
    """What `--plan` printed for a host (`Build.wheels`) is what its build sends."""
    made = []
    for name in ("celery-5.5.0-py3-none-any.whl", "kombu-5.5.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"wheel")
        made.append(tmp_path / name)

    class House(FakeWheelhouse):
        def files(self, extra=None):
            super().files(extra)
            return made

    source = release.Source(name="2026-11-24-120000", sha="f" * 40, ref="main", archive=b"x",
                            requirements="celery\n", revision={})
    from .samples import stage_of
    built = release.build_on(FakeRemote('{"status": "built", "reused_env": false, "missing": ""}'), stage_of(), source,
                             House(), set(), planned=("celery-5.5.0-py3-none-any.whl",))
    assert built.wheels_sent == 1


def test_wheels_are_fetched_for_every_glibc_the_host_runs_wheels_of():
    """pip takes only the platforms named: a host with glibc 2.36 runs manylinux_2_17 wheels too
    (most compiled wheels, uv's among them)."""
    from deploy_kit.wheels import Target
    args = Target("3.11.2", "x86_64", "2.36").pip_args()
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in platforms
    assert {"manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"} <= set(platforms)
    assert "manylinux_2_37_x86_64" not in platforms


def fake_wheel(directory, name: str, *requires: str) -> None:
    import zipfile
    dist = name.split("-")[0]
    with zipfile.ZipFile(directory / name, "w") as archive:
        archive.writestr(f"{dist}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: " + dist + "\n"
                         + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_what_only_the_hosts_python_needs_is_read_from_the_wheels_metadata(tmp_path):
    """pip evaluates dependencies' markers with this machine's Python: redis needs async-timeout
    on Debian 12's 3.11.2, not on a newer Python here. An extra's requirement is left to pip."""
    from deploy_kit.wheels import Target, needed_on
    fake_wheel(tmp_path, "redis-8.1.0-py3-none-any.whl", 'async-timeout>=4.0.3; python_full_version < "3.11.3"',
               'hiredis>=3.2; extra == "hiredis"', 'typing-extensions; python_version < "3.8"',
               'Packaging; platform_machine == "aarch64"', "kombu")
    fake_wheel(tmp_path, "kombu-5.6.0-py3-none-any.whl")
    here = Target("3.12.1", "x86_64", "2.36").markers()
    assert needed_on(Target("3.11.2", "x86_64", "2.36"), tmp_path, here=here) == ["async-timeout>=4.0.3"]
    assert needed_on(Target("3.11.2", "aarch64", "2.36"), tmp_path, here=here) == ["Packaging", "async-timeout>=4.0.3"]
    assert needed_on(Target("3.12.4", "x86_64", "2.36"), tmp_path, here=here) == []
    fake_wheel(tmp_path, "async_timeout-5.0.1-py3-none-any.whl")  # fetched: nothing more
    assert needed_on(Target("3.11.2", "x86_64", "2.36"), tmp_path, here=here) == []
    requirements = ('celery[redis]==5.7.0  # the app\n-c constraints.txt\nexceptiongroup; python_version < "3.12"\n'
                    'tomli>=2 ; python_version < "3.11"\nhttps://example.invalid/x.whl\n')
    assert needed_on(Target("3.11.2", "x86_64", "2.36"), tmp_path, requirements, here) == ["exceptiongroup"]


def test_a_hashed_requirements_file_keeps_its_hashes_and_gets_no_unhashed_line(tmp_path):
    """`uv export` and `pip-compile --generate-hashes` write continued lines with hashes; pip then
    refuses any requirement without one, so only the file's own lines come back, hashes kept."""
    from deploy_kit.wheels import Target, needed_on, requirement_lines
    fake_wheel(tmp_path, "redis-8.1.0-py3-none-any.whl", 'async-timeout>=4.0.3; python_full_version < "3.11.3"')
    requirements = ("redis==8.1.0 \\\n    --hash=sha256:aaa\n"
                    "async-timeout==5.0.1 ; python_full_version < '3.11.3' \\\n    --hash=sha256:bbb \\\n"
                    "    --hash=sha256:ccc\n"
                    "exceptiongroup==1.2.0 ; python_version < '3.12'\t# via anyio\n")
    assert requirement_lines(requirements)[1] == ("async-timeout==5.0.1 ; python_full_version < '3.11.3'",
                                                  "--hash=sha256:bbb --hash=sha256:ccc")
    here = Target("3.12.1", "x86_64", "2.36").markers()
    assert needed_on(Target("3.11.2", "x86_64", "2.36"), tmp_path, requirements, here) == [
        "async-timeout==5.0.1 --hash=sha256:bbb --hash=sha256:ccc", "exceptiongroup==1.2.0"]


def test_a_marker_that_cannot_be_evaluated_is_left_out(tmp_path, monkeypatch):
    from packaging.markers import Marker

    from deploy_kit.wheels import Target, needed_on
    fake_wheel(tmp_path, "redis-8.1.0-py3-none-any.whl", 'async-timeout>=4.0.3; python_full_version < "3.11.3"',
               'odd; platform_release >= "5.10"', "not a requirement !!")
    evaluate = Marker.evaluate

    def picky(self, environment=None):
        if "platform_release" in str(self):
            raise ValueError("Invalid version: '6.1.0-27-amd64'")  # packaging 22 did
        return evaluate(self, environment)

    monkeypatch.setattr(Marker, "evaluate", picky)
    here = Target("3.12.1", "x86_64", "2.36").markers()
    assert needed_on(Target("3.11.2", "x86_64", "2.36"), tmp_path, here=here) == ["async-timeout>=4.0.3"]


def test_the_wheelhouse_fetches_again_what_the_hosts_markers_add(tmp_path, monkeypatch):
    from deploy_kit import wheels
    asked = []

    def pip_download(self, directory, extra):
        asked.append(list(extra))
        fake_wheel(directory, "redis-8.1.0-py3-none-any.whl", 'async-timeout>=4.0.3; python_full_version < "3.11.3"')
        if "async-timeout>=4.0.3" in extra:
            fake_wheel(directory, "async_timeout-5.0.1-py3-none-any.whl")

    monkeypatch.setattr(wheels.Wheelhouse, "_pip_download", pip_download)
    monkeypatch.setattr(wheels, "default_environment", lambda: {"python_full_version": "3.12.1"})
    house = wheels.Wheelhouse("redis\n", wheels.Target("3.11.2", "x86_64", "2.36"), tmp_path)
    assert [w.name for w in house.files()] == ["async_timeout-5.0.1-py3-none-any.whl", "redis-8.1.0-py3-none-any.whl"]
    assert asked == [[], ["async-timeout>=4.0.3"]]
    house.files()
    assert len(asked) == 2  # cached
    (next((tmp_path / "wheels").rglob(".complete"))).write_text("")  # a cache made before the host's markers counted
    house.files()
    assert len(asked) == 3  # looked at once more
    house.files()
    assert len(asked) == 3
