"""The build program (`remote/build.py`) in a temporary deploy_to: what it builds, reuses, links
and checks, and that only a complete, checked release appears under its name (no host needed)."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from deploy_kit import release
from deploy_kit.remote import build
from deploy_kit.remote.contracts import BuildOutcome, BuildStatus

from .samples import STAGE, stage_of

SOURCE = release.Source("2026-11-24-123000", "abc", "main", b"", "Django==5.2\n", {"release": "2026-11-24-123000"})
OLD = "2026-11-24-120000"


def code_archive() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        data = b"print('manage')\n"
        info = tarfile.TarInfo("manage.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def host(tmp_path, monkeypatch):
    """deploy_to in tmp_path with a current release whose environment matches; the bundle unpacked."""
    srv = tmp_path / "srv"
    extra = f'deploy_to = "{srv}"\nlinked_dirs = ["media"]\n'
    stage = stage_of(STAGE.replace('celery_app = "shop"', 'celery_app = "shop"\n' + extra))
    params = release.build_params(stage, SOURCE, wheels_sent=False, python_version="3.11.2")
    old = srv / "releases" / OLD
    (old / ".venv/bin").mkdir(parents=True)
    (old / ".venv/bin/python").write_text("#!/bin/sh\n")
    (old / ".venv/bin/python").chmod(0o755)
    (old / ".deploy-kit").mkdir()
    (old / ".deploy-kit/env-key").write_text(params["env_key"] + "\n")
    os.symlink(f"releases/{OLD}", srv / "current")
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    (stage_dir / "code.tar.gz").write_bytes(code_archive())
    (stage_dir / "REVISION").write_text(json.dumps(SOURCE.revision))
    (stage_dir / "requirements.txt").write_text(SOURCE.requirements)
    ran = []

    def sh(*argv):
        ran.append(argv)
        if argv[0] not in ("chown", "chmod"):  # ownership needs the service's group: not here
            subprocess.run(argv, check=True)

    monkeypatch.setattr(build, "sh", sh)
    monkeypatch.setattr(build, "directory", lambda path, owner, group, mode: os.makedirs(path, exist_ok=True))
    checks = []
    monkeypatch.setattr(build.hostlib, "run", lambda argv, stdin=None, timeout=60: checks.append((argv, stdin))
                        or (0, 'System check identified no issues.\n'
                               'deploy-kit-release-check: ok {"tasks": "9 tasks registered"}\n'
                               'printed by an atexit hook\n', ""))
    return params, stage_dir, srv, ran, checks


def test_a_release_reuses_the_matching_environment_and_is_checked_as_the_service(host):
    params, stage_dir, srv, ran, checks = host
    outcome = build.build(params, str(stage_dir))
    assert outcome == BuildOutcome(BuildStatus.BUILT, reused_env=True)
    final = srv / "releases" / SOURCE.name
    assert (final / "manage.py").exists() and (final / ".venv/bin/python").exists()
    assert os.readlink(final / "media") == str(srv / "shared/media")
    assert not (srv / "releases" / f".{SOURCE.name}.building").exists()
    assert [a[0] for a in ran if a[0] == "cp"] == ["cp"] and ran[-3][:3] == ("chown", "-R", "root:shop")
    venv = f"{srv}/releases/.{SOURCE.name}.building/.venv"
    assert venv in ran[-3] and venv in ran[-2]  # its group is not the app's (as after a change of group)
    assert ran[-1] == ("chown", "root:shop", f"{srv}/releases/.{SOURCE.name}.building")
    # A linked path is never named to chmod -R, which would follow it into shared/ (uploads lose o+r).
    assert not any(arg.endswith("/media") for argv in ran[-3:-1] for arg in argv)
    [(argv, program)] = checks  # one Python as the service: manage.py check, the app, the queued tasks
    assert argv[0] == "systemd-run" and "User=shop" in argv
    assert f"WorkingDirectory={srv}/releases/.{SOURCE.name}.building" in argv
    assert argv[-3:] == ["release", "shop", "[]"]
    assert program == build.hostlib.program_line(build.probes.release_program())  # its first line


def test_a_reused_environment_of_the_apps_group_is_not_chowned_again(host, monkeypatch):
    params, stage_dir, srv, ran, _checks = host
    monkeypatch.setattr(build, "group_of", lambda path: "shop" if path.endswith("/.venv/pyvenv.cfg") else "")
    assert build.build(params, str(stage_dir)) == BuildOutcome(BuildStatus.BUILT, reused_env=True)
    recursive = [argv for argv in ran if argv[:2] in (("chown", "-R"), ("chmod", "-R"))]
    assert len(recursive) == 2 and all(any(a.endswith(f"/releases/.{SOURCE.name}.building/manage.py") for a in argv)
                                       for argv in recursive)
    assert not any(arg.endswith("/.venv") for argv in recursive for arg in argv)


def test_a_release_that_fails_its_check_never_appears(host, monkeypatch):
    params, stage_dir, srv, _ran, _checks = host
    monkeypatch.setattr(build.hostlib, "run", lambda argv, stdin=None, timeout=60:
                        (1, "deploy-kit-release-check: fail manage.py check\n", "SystemCheckError: boom"))
    with pytest.raises(build.Stop) as stopped:
        build.build(params, str(stage_dir))
    assert stopped.value.outcome == BuildOutcome(BuildStatus.CHECK_FAILED, reused_env=True)
    assert "RELEASE CHECK FAILED: manage.py check" in str(stopped.value) and "boom" in str(stopped.value)
    assert sorted(os.listdir(srv / "releases")) == [OLD]


def test_a_missing_linked_file_is_named_and_nothing_is_left(host):
    params, stage_dir, srv, _ran, _checks = host
    params["linked_files"] = ["config/local.py"]
    with pytest.raises(build.Stop, match="linked file .*/shared/config/local.py does not exist"):
        build.build(params, str(stage_dir))
    assert sorted(os.listdir(srv / "releases")) == [OLD]


def test_without_a_reusable_environment_it_asks_for_the_wheels(host):
    params, stage_dir, srv, _ran, _checks = host
    params["env_key"] = "other"
    with pytest.raises(build.Stop) as stopped:
        build.build(params, str(stage_dir))
    assert stopped.value.outcome.status == BuildStatus.NEEDS_WHEELS
    assert sorted(os.listdir(srv / "releases")) == [OLD]


def test_an_existing_release_is_never_overwritten(host):
    params, stage_dir, srv, _ran, _checks = host
    params["name"] = OLD
    with pytest.raises(build.Stop) as stopped:
        build.build(params, str(stage_dir))
    assert stopped.value.outcome.status == BuildStatus.EXISTS


def test_the_last_line_is_the_typed_outcome(host, monkeypatch, capsys):
    params, stage_dir, _srv, _ran, _checks = host
    monkeypatch.setattr(sys, "argv", ["build.py", str(stage_dir)])
    build.main(params)
    out = capsys.readouterr().out.strip().splitlines()
    assert release.read_outcome(out[-1]) == BuildOutcome(BuildStatus.BUILT, reused_env=True)


@pytest.mark.parametrize("fault", ["a command that says so", "a write of the program's own"])
def test_a_disk_that_fills_up_is_named_as_the_cause_and_nothing_is_left(host, monkeypatch, fault):
    params, stage_dir, srv, _ran, _checks = host
    if fault == "a command that says so":
        def sh(*argv):
            raise subprocess.CalledProcessError(2, argv, stderr="tar: x.py: Cannot write: No space left on device\n")
        monkeypatch.setattr(build, "sh", sh)
    else:
        def copyfile(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(build.shutil, "copyfile", copyfile)
    with pytest.raises(build.Stop) as stopped:
        build.build(params, str(stage_dir))
    outcome = stopped.value.outcome
    assert outcome.status == BuildStatus.NO_SPACE
    assert f"no space left on the device of {srv}/releases" in outcome.detail and "MiB free of" in outcome.detail
    assert sorted(os.listdir(srv / "releases")) == [OLD]  # the half-written release is gone


def test_a_command_that_fails_for_another_reason_is_not_called_a_full_disk(host, monkeypatch):
    params, stage_dir, srv, _ran, _checks = host

    def sh(*argv):
        raise subprocess.CalledProcessError(2, argv, stderr="tar: unexpected end of file\n")
    monkeypatch.setattr(build, "sh", sh)
    with pytest.raises(subprocess.CalledProcessError):
        build.build(params, str(stage_dir))
    assert sorted(os.listdir(srv / "releases")) == [OLD]


def test_a_failing_command_shows_its_error_output(capfd):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        build.sh("sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
    assert failed.value.stderr == "to-stderr\n"
    out, err = capfd.readouterr()
    assert out == "to-stdout\n" and err == "to-stderr\n"  # stdout stays the outcome's channel


def fake_uv_wheel(cache, body: str, name: str = "uv-0.13.9-py3-none-manylinux_2_17_x86_64.whl") -> str:
    """uv's wheel, its binary a shell script with `body` (it records its arguments)."""
    import zipfile
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / name, "w") as archive:
        archive.writestr("uv-0.13.9.dist-info/METADATA", "Name: uv\n")
        archive.writestr("uv-0.13.9.data/scripts/uv", f"#!/bin/sh\necho \"$@\" >> {cache}/uv-args\n{body}\n")
    return name


def test_a_new_environment_is_installed_by_uv_from_its_wheel_without_pip(host):
    """uv, sent as a wheel, is unpacked once beside the cache; the venv has no pip and the wheels
    come from the cache only, compiled (the service cannot write __pycache__ in a release)."""
    params, stage_dir, srv, ran, _checks = host
    params.update(env_key="other", wheels_sent=True, installer=fake_uv_wheel(srv / ".deploy-kit/wheels", "exit 0"))
    assert build.build(params, str(stage_dir)).status == BuildStatus.BUILT
    args = (srv / ".deploy-kit/wheels/uv-args").read_text()
    app, seeds = args.splitlines()
    assert app.startswith("pip install ") and "--offline" in app and "--compile-bytecode" in app
    assert app.endswith(f"--no-index --find-links {srv}/.deploy-kit/wheels --compile-bytecode -r "
                        f"{stage_dir}/requirements.txt")
    assert seeds.endswith(f"--find-links {srv}/.deploy-kit/wheels pip setuptools")  # seldom imported: not compiled
    assert "--compile-bytecode" not in seeds
    assert f"--cache-dir {srv}/.deploy-kit/uv-cache-" in args  # beside the wheels, removed after:
    assert not [n for n in os.listdir(srv / ".deploy-kit") if n.startswith("uv-cache-")]
    assert any(argv[1:4] == ("-m", "venv", "--without-pip") for argv in ran)
    assert not any(argv[1:3] == ("-m", "venv") and "--without-pip" not in argv for argv in ran)
    assert os.access(srv / ".deploy-kit/tools/uv-0.13.9", os.X_OK)


def test_a_new_uv_replaces_the_one_before_it_on_the_host(host):
    params, stage_dir, srv, _ran, _checks = host
    wheels, tools = srv / ".deploy-kit/wheels", srv / ".deploy-kit/tools"
    fake_uv_wheel(wheels, "exit 0", name="uv-0.12.0-py3-none-manylinux_2_17_x86_64.whl")
    tools.mkdir(parents=True)
    (tools / "uv-0.12.0").write_text("old")
    (wheels / "celery-5.6.0-py3-none-any.whl").write_text("kept")
    params.update(env_key="other", wheels_sent=True, installer=fake_uv_wheel(wheels, "exit 0"))
    assert build.build(params, str(stage_dir)).status == BuildStatus.BUILT
    assert sorted(os.listdir(tools)) == ["uv-0.13.9"]
    assert sorted(n for n in os.listdir(wheels) if n.endswith(".whl")) == [  # the app may need an uv wheel
        "celery-5.6.0-py3-none-any.whl", "uv-0.12.0-py3-none-manylinux_2_17_x86_64.whl", params["installer"]]


def test_when_uv_fails_the_venv_it_began_is_removed_and_pip_takes_over(host, capsys):
    params, _stage_dir, srv, ran, _checks = host
    params.update(installer=fake_uv_wheel(srv / ".deploy-kit/wheels", "echo 'cannot find foo' >&2; exit 2"))
    venv = srv / "building" / ".venv"
    venv.parent.mkdir()
    assert build.install_with_uv(params, str(venv), "requirements.txt") is False
    said = capsys.readouterr().err
    assert not venv.exists() and "uv could not install the requirements (cannot find foo); pip" in said
    params["installer"] = "uv-missing.whl"  # not in the cache (never sent): pip, said why
    assert build.install_with_uv(params, str(venv), "requirements.txt") is False


def test_the_installer_wheels_come_with_the_apps_unless_uv_has_none_for_the_host(tmp_path, monkeypatch):
    from deploy_kit import wheels

    fetched = []

    def wheels_of(self, extra):
        fetched.append(self.requirements)
        if self.requirements == wheels.UV:
            if "musl" in self.target.glibc:
                raise wheels.WheelError("no wheel")
            return [tmp_path / "pip-25.0-py3-none-any.whl", tmp_path / "uv-0.13.9-py3-none-manylinux_2_17_x86_64.whl"]
        return [tmp_path / "celery-5.7.0-py3-none-any.whl"]

    monkeypatch.setattr(wheels.Wheelhouse, "_wheels", wheels_of)
    house = wheels.Wheelhouse("celery\n", wheels.Target("3.11.2", "x86_64", "2.36"), tmp_path, installer=wheels.UV)
    assert [w.name.split("-")[0] for w in house.files()] == ["celery", "pip", "uv"]
    assert house.installer_wheel().name.startswith("uv-") and house.files() and fetched.count(wheels.UV) == 1
    none = wheels.Wheelhouse("celery\n", wheels.Target("3.11.2", "x86_64", "musl"), tmp_path, installer=wheels.UV)
    assert [w.name for w in none.files()] == ["celery-5.7.0-py3-none-any.whl"] and none.installer_wheel() is None
    plain = wheels.Wheelhouse("celery\n", wheels.Target("3.11.2", "x86_64", "2.36"), tmp_path)  # installer = "pip"
    assert [w.name for w in plain.files()] == ["celery-5.7.0-py3-none-any.whl"]
