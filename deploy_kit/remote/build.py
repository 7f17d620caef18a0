"""Runs ON a host, as root, with the host's python3: build `releases/NAME` from the bundle that
came on stdin and was unpacked in a staging directory (`sys.argv[1]`): the code, REVISION, the
requirements, the wheels the host lacked.

    .NAME.building   the code; the environment reused (hard links) from `current` when its key
                     matches, else a new virtualenv from the wheel cache (or the index)
    shared links     linked_dirs / linked_files point into shared/
    ownership        root:GROUP, not writable by the service
    release check    as the service, one Python: `manage.py check`, the Celery app imports, and
                     on one host the queued task names it lacks (`probes.release`)
    NAME             renamed into place only when all of that passed

The last line on stdout is a `contracts.BuildOutcome`; details go to stderr. Python 3.8+, stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import grp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from deploy_kit.remote import celery_agent, hostlib, probes  # noqa: F401 - the release check ships celery_agent
from deploy_kit.remote.contracts import ENV_KEY, STATE_DIR, BuildOutcome, BuildStatus


class Stop(Exception):
    """The build ends here with this outcome (the half-built directory is removed)."""

    def __init__(self, outcome: BuildOutcome, detail: str = ""):
        super().__init__(detail)
        self.outcome = outcome


def sh(*argv: str) -> None:
    """Run a command; its error output goes on to ours, and rides on the error when it fails."""
    proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True, errors="replace")
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, stderr=proc.stderr)


def out_of_space(exc: BaseException) -> bool:
    """The build failed because the filesystem filled up (ENOSPC, or a command that said so)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc) + str(getattr(exc, "stderr", "") or "")
    return "No space left on device" in text or "Disk quota exceeded" in text


def no_space(releases_dir: str) -> Stop:
    """The outcome of a release that could not be written for lack of space, with the room there is
    once the half-written release is gone."""
    usage = shutil.disk_usage(releases_dir)
    detail = (f"no space left on the device of {releases_dir} while the release was written "
              f"({usage.free // 2**20} MiB free of {usage.total // 2**20} MiB once the half-written release "
              "was removed)")
    return Stop(BuildOutcome(BuildStatus.NO_SPACE, detail=detail), detail)


def directory(path: str, owner: str, group: str, mode: int) -> None:
    """`install -d -o OWNER -g GROUP -m MODE`: create, or fix an existing one."""
    os.makedirs(path, exist_ok=True)
    shutil.chown(path, owner, group)
    os.chmod(path, mode)


def environment(p: dict, stage_dir: str, building: str) -> bool:
    """The release's virtualenv: True when reused from `current` (hard links), else built anew."""
    venv, current = os.path.join(building, p["venv"]), p["current"]
    key_file = os.path.join(current, STATE_DIR, ENV_KEY)
    if p["allow_reuse"] and os.path.exists(key_file) and os.access(os.path.join(current, p["venv"], "bin",
                                                                                 "python"), os.X_OK):
        with open(key_file) as handle:
            if handle.read().strip() == p["env_key"]:
                sh("cp", "-al", os.path.join(os.path.realpath(current), p["venv"]), venv)
                print("env=yes (reused from the current release)", file=sys.stderr)
                return True
    if not p["wheels_sent"] and p["install"] != "index":
        raise Stop(BuildOutcome(BuildStatus.NEEDS_WHEELS))
    for wheel in sorted(glob.glob(os.path.join(stage_dir, "wheels", "*.whl"))):  # missing or unknown: replace
        incoming = os.path.join(p["cache"], ".incoming")
        shutil.copyfile(wheel, incoming)
        os.replace(incoming, os.path.join(p["cache"], os.path.basename(wheel)))
    requirements = os.path.join(stage_dir, "requirements.txt")
    if p.get("installer") and install_with_uv(p, venv, requirements):
        return False
    sh(p["python"], "-m", "venv", venv)
    source = ["--no-index", "--find-links", p["cache"]] if p["install"] == "wheels" else []
    pip = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", *source, "-r", os.path.join(stage_dir, "requirements.txt")],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        log = pip.stdout + pip.stderr
        missing = re.search(r"No matching distribution found for (\S+)", log)
        if missing:
            name = re.sub(r"[^A-Za-z0-9._=<>!~+-]", "", missing.group(1))
            raise Stop(BuildOutcome(BuildStatus.MISSING_DISTRIBUTION, missing=name))
        raise Stop(BuildOutcome(BuildStatus.FAILED), log)
    return False


UV_TIMEOUT = 300  # seconds uv may take; then pip, well within the control machine's wait for the build


def install_with_uv(p: dict, venv: str, requirements: str) -> bool:
    """A virtualenv whose wheels uv installs from the cache (uv: one static binary, unpacked once
    beside the cache), with pip and (before Python 3.12) setuptools as `python -m venv` puts
    there: seconds where pip takes many. False, leaving no venv, when uv cannot do it (pip then
    says why, as it always did)."""
    wheel = os.path.join(p["cache"], p["installer"])
    binary = os.path.join(os.path.dirname(p["cache"]), "tools", p["installer"].split("-py", 1)[0])
    try:
        if not os.path.exists(binary):
            with zipfile.ZipFile(wheel) as archive:
                member = next(n for n in archive.namelist() if n.endswith(".data/scripts/uv"))
                os.makedirs(os.path.dirname(binary), mode=0o700, exist_ok=True)
                with archive.open(member) as src, open(binary + ".incoming", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            os.chmod(binary + ".incoming", 0o755)
            os.replace(binary + ".incoming", binary)
            prune_installers(p, binary)
        sh(p["python"], "-m", "venv", "--without-pip", venv)
        seeds = ["pip", *(["setuptools"] if sys.version_info < (3, 12) else [])]  # as `python -m venv` does
        cache = tempfile.mkdtemp(prefix="uv-cache-", dir=os.path.dirname(p["cache"]))  # beside the wheels:
        try:  # the same filesystem as the releases, unlike /tmp
            for what in (["--compile-bytecode", "-r", requirements], seeds):  # the app's compiled (the service
                # cannot write __pycache__ in a release); then pip and setuptools (seldom imported: not
                # compiled, seconds saved), unless the requirements brought them
                done = subprocess.run([binary, "pip", "install", "--quiet", "--no-config", "--cache-dir", cache,
                                       "--offline", "--python", os.path.join(venv, "bin", "python"), "--no-index",
                                       "--find-links", p["cache"], *what],
                                      capture_output=True, text=True, errors="replace", timeout=UV_TIMEOUT)
                if done.returncode != 0:
                    break
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if done.returncode == 0:
            return True
        why = (done.stderr or done.stdout).strip()[-400:]
    except (OSError, StopIteration, zipfile.BadZipFile, subprocess.SubprocessError) as exc:
        if out_of_space(exc):
            raise
        why = str(exc) or type(exc).__name__
    print(f"uv could not install the requirements ({why}); pip installs them", file=sys.stderr)
    shutil.rmtree(venv, ignore_errors=True)
    return False


def prune_installers(p: dict, binary: str) -> None:
    """A new uv replaces the one before it (38 MB unpacked), best effort, once it is in place.
    Wheels stay: the app may need one of that name too."""
    tools = os.path.dirname(binary)
    for name in os.listdir(tools):
        if name.startswith("uv-") and name != os.path.basename(binary):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(tools, name))


def link_shared(p: dict, building: str) -> None:
    """linked_dirs and linked_files of the release point to the same paths under shared/."""
    for path in p["linked_dirs"]:
        shared = os.path.join(p["shared_dir"], path)
        directory(shared, p["user"], p["group"], 0o750)
        shutil.rmtree(os.path.join(building, path), ignore_errors=True)
        os.makedirs(os.path.dirname(os.path.join(building, path)), exist_ok=True)
        os.symlink(shared, os.path.join(building, path))
    for path in p["linked_files"]:
        shared = os.path.join(p["shared_dir"], path)
        if not os.path.exists(shared):
            raise Stop(BuildOutcome(BuildStatus.CHECK_FAILED),
                       f"RELEASE CHECK FAILED: linked file {shared} does not exist: create it on the host first")
        target = os.path.join(building, path)
        if os.path.lexists(target):
            os.unlink(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(shared, target)


def group_of(path: str) -> str:
    try:
        return grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        return ""


def check(p: dict, building: str) -> dict:
    """The release check, as the service runs it (its user, env file, sandbox) in the new code, in
    one Python (`probes.release`): what it found of the queued tasks is returned."""
    python = os.path.join(building, p["venv"], "bin", "python")
    argv = [python, "-c", hostlib.READ_PROGRAM, "release", p["celery_app"], json.dumps(p.get("queues", []))]
    code, out, err = hostlib.run(hostlib.service_argv(p["service_environment"], building, argv),
                                 stdin=hostlib.program_line(probes.release_program()), timeout=600)
    answers = [line[len(probes.RESULT):] for line in out.splitlines() if line.startswith(probes.RESULT)]
    last = answers[-1] if answers else ""
    if code == 0 and last.startswith("ok "):
        return json.loads(last[3:])
    what = last[5:] if last.startswith("fail ") else "the release check did not finish"
    tail = "\n".join(line for line in (out + err).strip().splitlines() if not line.startswith(probes.RESULT))
    raise Stop(BuildOutcome(BuildStatus.CHECK_FAILED, reused_env=p.get("reused", False)),
               f"RELEASE CHECK FAILED: {what}\n" + "\n".join(tail.splitlines()[-25:]))


def build(p: dict, stage_dir: str) -> BuildOutcome:
    final = os.path.join(p["releases_dir"], p["name"])
    building = os.path.join(p["releases_dir"], f".{p['name']}.building")
    if os.path.exists(final):
        raise Stop(BuildOutcome(BuildStatus.EXISTS), f"release {p['name']} already exists on this host")
    shutil.rmtree(building, ignore_errors=True)
    directory(p["releases_dir"], "root", p["group"], 0o750)
    directory(p["cache"], "root", "root", 0o700)
    os.mkdir(building)
    try:
        sh("tar", "-xzf", os.path.join(stage_dir, "code.tar.gz"), "-C", building)
        shutil.copyfile(os.path.join(stage_dir, "REVISION"), os.path.join(building, "REVISION"))
        os.makedirs(os.path.join(building, STATE_DIR))
        with open(os.path.join(building, STATE_DIR, ENV_KEY), "w") as handle:
            handle.write(p["env_key"] + "\n")
        p["reused"] = environment(p, stage_dir, building)
        link_shared(p, building)
        # Not named to chown/chmod -R: a linked path (chmod -R follows a link it is given, into shared/),
        # nor a reused environment, whose 10,000 hard-linked files are the current one's, owned and
        # moded already (unless the app's group changed since).
        kept = p["reused"] and group_of(os.path.join(building, p["venv"], "pyvenv.cfg")) == p["group"]
        mine = []
        for name in os.listdir(building):
            path = os.path.join(building, name)
            if not os.path.islink(path) and not (kept and name == p["venv"]):
                mine.append(path)
        sh("chown", "-R", f"root:{p['group']}", *mine)
        sh("chmod", "-R", "g+rX,g-w,o-rwx", *mine)
        sh("chown", f"root:{p['group']}", building)
        os.chmod(building, 0o750)
        found = check(p, building)
        os.rename(building, final)  # complete releases only ever appear under their name
    except BaseException as exc:
        shutil.rmtree(building, ignore_errors=True)
        if out_of_space(exc):
            raise no_space(p["releases_dir"]) from None
        raise
    return BuildOutcome(BuildStatus.BUILT, reused_env=p["reused"], unregistered=found.get("unregistered"),
                        queued_error=found.get("queued_error", ""))


def main(params: dict) -> None:
    try:
        outcome = build(params, sys.argv[1])
    except Stop as stop:
        outcome = stop.outcome
        if str(stop):
            print(str(stop), file=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as exc:
        outcome = BuildOutcome(BuildStatus.FAILED, detail=str(exc)[-300:])
        print(f"the build failed: {exc}", file=sys.stderr)
    print(outcome.to_json())
