"""Runs ON a host, as root, detached from the SSH session (under `systemd-run`): the part of a
deploy or rollback that must never stop half-way. Python 3.8+, stdlib only.

    switch `current` to the target release (atomic rename of a new symlink)
    restart the worker units (KillMode=mixed: warm shutdown, running tasks finish)
    wait until each runs from the target release, then verify: a task sent to each worker's
        private queue must be consumed and completed by that worker
    restart Beat (on its host)
    on any failure: switch back to the previous release, restart, verify it, mark the target bad

Progress goes to a JSON state file after every step, so the control machine can follow it
(and a later run can read how it ended) even if the SSH connection or the laptop is gone.
Whatever happens, the host ends on the verified target or back on the previous release.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

VERIFY_CODE = r'''
import os, sys
from urllib.parse import quote, unquote, urlsplit
secrets = []
try:
    password = urlsplit(os.environ.get("CELERY_BROKER_URL", "")).password
    if password:
        secrets = [password, unquote(password), quote(unquote(password), safe="")]
except ValueError:
    pass
def say(text):
    for secret in secrets:
        text = text.replace(secret, "***")
    print(text)
from celery.app.utils import find_app
app = find_app(sys.argv[1])
try:
    from celery.backends.base import DisabledBackend
    if isinstance(app.backend, DisabledBackend):
        say("fail the app has no result backend: set CELERY_RESULT_BACKEND so a deploy can "
              "see its verification task complete")
        sys.exit(1)
    nonce = "deploy-kit verify %s" % sys.argv[5]
    echo = sys.argv[2] == "celery.accumulate"  # built in to every app: returns its arguments
    result = app.send_task(sys.argv[2], args=[nonce] if echo else [], queue=sys.argv[3])
    value = result.get(timeout=float(sys.argv[4]), propagate=True, disable_sync_subtasks=False)
    if echo and list(value) != [nonce]:
        say("fail celery.accumulate answered %r instead of echoing %r" % (value, nonce))
        sys.exit(1)
    say("ok %s" % ("echoed the nonce" if echo else repr(value)[:80]))
except Exception as exc:
    name = type(exc).__name__
    if name == "TimeoutError":
        say("fail no worker completed %s on queue %s within %ss" % (sys.argv[2], sys.argv[3], sys.argv[4]))
    else:
        say("fail %s: %s" % (name, exc))
    sys.exit(1)
'''


def steps(params: dict, hostname: str = "") -> list:
    """The (name, description) of each step a cutover with these params runs when nothing fails;
    `fab deploy --plan` prints them."""
    workers = [w["unit"] for w in params["workers"]]
    queues = [params["verify_queue"].replace("{service}", w["service"]).replace("{host}", hostname or "{host}")
              for w in params["workers"]]
    target, verify = params["target"], params["verify"]
    bad = f", mark {target} bad" if params.get("mark_bad_on_failure") else ""
    found = [("switch", f"current -> releases/{target} (a new symlink renamed over it: atomic)"),
             ("restart", f"systemctl restart {' '.join(workers)} (warm shutdown: running tasks finish)"),
             ("wait", f"until each worker runs from releases/{target} and does not crash-loop"),
             ("verify", f"{verify['task']} must complete within {verify['timeout']}s on "
                        f"{', '.join(queues) or 'no worker here'}")]
    if params.get("beat_unit"):
        found += [("restart beat", f"systemctl restart {params['beat_unit']}, after the workers"),
                  ("wait for beat", f"until Beat runs from releases/{target}")]
    found.append(("on failure", f"switch back to {params.get('previous') or 'no release'}, restart, "
                                f"verify it{bad}"))
    return found


class StepFailed(Exception):
    pass


class Cutover:
    def __init__(self, params: dict):
        self.p = params
        self.started = time.time()
        self.restarts_before: dict = {}
        self.state = {
            "id": params["id"], "mode": params["mode"], "target": params["target"],
            "previous": params.get("previous"), "status": "running", "step": "",
            "steps": [], "journal": [], "started": self.started, "pid": os.getpid(),
        }

    # --- state file ---------------------------------------------------------------------------

    def save(self) -> None:
        """Best effort: a full disk must not stop a rollback half-way."""
        path = self.p["state_file"]
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as handle:
                json.dump(self.state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError:
            pass

    def step(self, name: str, action, *args):
        entry = {"name": name, "started": time.time(), "ok": None, "detail": ""}
        self.state["step"] = name
        self.state["steps"].append(entry)
        self.save()
        try:
            detail = action(*args)
            entry.update(ok=True, detail=detail or "")
            return detail
        except StepFailed as exc:
            entry.update(ok=False, detail=str(exc))
            raise
        except Exception as exc:  # a bug or an unexpected host state: still end consistent
            entry.update(ok=False, detail=f"{type(exc).__name__}: {exc}")
            raise StepFailed(entry["detail"]) from exc
        finally:
            entry["ended"] = time.time()
            self.save()

    # --- actions ------------------------------------------------------------------------------

    def release_dir(self, name: str) -> str:
        return os.path.join(self.p["releases_dir"], name)

    def switch(self, name: str) -> str:
        target = self.release_dir(name)
        if not os.path.isdir(target):
            raise StepFailed(f"release {name} does not exist on this host")
        current = self.p["current"]
        tmp = current + ".deploy-kit-tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("releases", name), tmp)
        os.replace(tmp, current)  # rename(2): atomic, never a moment without `current`
        return f"current -> releases/{name}"

    def unlink_current(self) -> str:
        if os.path.lexists(self.p["current"]):
            os.unlink(self.p["current"])
        return "no release left: current removed"

    def systemctl(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise StepFailed("systemctl {}: {}".format(" ".join(args), (proc.stderr or proc.stdout).strip()))
        return proc.stdout

    def show(self, unit: str) -> dict:
        out = self.systemctl("show", unit, "-p", "MainPID,ActiveState,SubState,NRestarts")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def restart(self, units: list) -> str:
        if not units:
            return "nothing to restart"
        self.systemctl("restart", *units, timeout=self.p["stop_timeout"] + 120)
        # A manual restart resets NRestarts; any automatic restart from now on is a crash
        # (RestartSec=5 leaves no room for one before this read).
        self.restarts_before.update({u: self.show(u).get("NRestarts", "0") for u in units})
        return "restarted " + ", ".join(units)

    def wait_running_from(self, units: list, name: str) -> str:
        """Each unit active, its main process working in release `name`, not crash-looping."""
        want = os.path.realpath(self.release_dir(name))
        deadline = time.time() + self.p["verify"]["timeout"]
        pending = list(units)
        seen: dict = {}
        while pending:
            for unit in list(pending):
                info = self.show(unit)
                if info.get("NRestarts", "0") != self.restarts_before.get(unit, "0") or \
                        info.get("ActiveState") == "failed":
                    raise StepFailed("{} crashed after the restart ({}/{})".format(
                        unit, info.get("ActiveState"), info.get("SubState")))
                pid = info.get("MainPID", "0")
                if info.get("ActiveState") == "active" and pid != "0":
                    try:
                        cwd = os.readlink(f"/proc/{pid}/cwd")
                    except OSError:
                        continue
                    seen[unit] = cwd
                    # Until systemd's child has set up the sandbox and exec'd, its cwd is not final.
                    if os.path.realpath(cwd) == want:
                        pending.remove(unit)
            if pending and time.time() > deadline:
                where = "; ".join(f"{u} runs from {seen.get(u, 'nowhere')}" for u in pending)
                raise StepFailed(f"not running from {want} after {self.p['verify']['timeout']}s: {where}")
            if pending:
                time.sleep(0.2)
        return "running from releases/{}: {}".format(name, ", ".join(units))

    def crashed(self) -> str:
        for unit, before in self.restarts_before.items():
            info = self.show(unit)
            if info.get("NRestarts", "0") != before or info.get("ActiveState") == "failed":
                return f"{unit} crashed ({info.get('ActiveState')}/{info.get('SubState')}); see its journal"
        return ""

    def as_service(self, release: str, code: str, args: list, timeout: float) -> tuple:
        directory = self.release_dir(release)
        python = os.path.join(directory, self.p["venv"], "bin", "python")
        props = []
        for setting in self.p["service_environment"]:
            if setting.startswith("WorkingDirectory="):
                setting = "WorkingDirectory=" + directory
            props += ["-p", setting]
        argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec",
                *props, "--", python, "-c", code, *args]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout + 30
        while proc.poll() is None:
            crash = self.crashed()
            if crash or time.time() > deadline:
                proc.kill()
                proc.communicate()
                return False, crash or "timed out"
            time.sleep(0.5)
        out, err = proc.communicate()
        lines = (out.strip() or err.strip() or "no output").splitlines()
        text = lines[-1]
        if text.startswith("ok "):
            return True, text[3:]
        return False, text[5:] if text.startswith("fail ") else text

    def verify(self, release: str) -> str:
        host = socket.gethostname()
        results = []
        for worker in self.p["workers"]:
            queue = self.p["verify_queue"].replace("{service}", worker["service"]).replace("{host}", host)
            ok, detail = self.as_service(release, VERIFY_CODE, [
                self.p["app"]["celery_app"], self.p["verify"]["task"], queue,
                str(self.p["verify"]["timeout"]), f"{self.p['id']}-{host}-{worker['service']}"],
                self.p["verify"]["timeout"])
            if not ok:
                raise StepFailed("{}: {}".format(worker["unit"], detail))
            results.append("{} answered {}".format(worker["service"], detail))
        return "; ".join(results) or "no workers on this host"

    def mark_bad(self, name: str) -> str:
        marker = os.path.join(self.release_dir(name), ".deploy-kit", "BAD")
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as handle:
            json.dump({"when": time.time(), "id": self.p["id"], "reason": self.state.get("failure", "")}, handle)
        return f"release {name} marked bad"

    def all_units(self) -> list:
        beat = [self.p["beat_unit"]] if self.p.get("beat_unit") else []
        return [w["unit"] for w in self.p["workers"]] + beat

    def journal(self) -> list:
        argv = ["journalctl", "--no-pager", "-o", "short-iso", "-n", "60", "--since",
                f"@{int(self.started)}"]
        for unit in self.all_units():
            argv += ["-u", unit]
        proc = subprocess.run(argv, capture_output=True, text=True)
        return proc.stdout.splitlines()[-60:]

    # --- the sequence -------------------------------------------------------------------------

    def bring_up(self, release: str, phase: str) -> None:
        workers = [w["unit"] for w in self.p["workers"]]
        self.step("switch" + phase, self.switch, release)
        self.step("restart" + phase, self.restart, workers)
        self.step("wait" + phase, self.wait_running_from, workers, release)
        self.step("verify" + phase, self.verify, release)
        if self.p.get("beat_unit"):
            self.step("restart beat" + phase, self.restart, [self.p["beat_unit"]])
            self.step("wait for beat" + phase, self.wait_running_from, [self.p["beat_unit"]], release)

    def live(self) -> str:
        """The release `current` points to now (what the host really runs after a restart)."""
        try:
            return os.path.basename(os.readlink(self.p["current"]))
        except OSError:
            return ""

    def run(self) -> int:
        self.save()
        try:
            self.bring_up(self.p["target"], "")
            self.state.update(status="done", live=self.live())
            self.save()
            return 0
        except Exception as exc:  # StepFailed, or anything unexpected: the host must still end consistent
            self.state["failure"] = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
        try:
            self.state["journal"] = self.journal()
        except Exception:  # noqa: BLE001 - the journal is a courtesy; the rollback is not
            self.state["journal"] = []
        self.save()
        previous = self.p.get("previous")
        try:
            if previous:
                self.bring_up(previous, " (rollback)")
            else:
                if self.all_units():
                    self.step("stop services (rollback)", self.systemctl, "stop", *self.all_units())
                self.step("remove current (rollback)", self.unlink_current)
            # In a deploy, falling back to `previous` is a rollback. In a rollback, `previous` is
            # the release the host was on: it stays there, verified, but the rollback failed.
            self.state["status"] = "rolled_back" if self.p["mode"] == "deploy" else "fell_back"
        except Exception as exc:  # noqa: BLE001
            self.state["status"] = "rollback_failed"
            self.state["rollback_failure"] = str(exc)
        if self.p.get("mark_bad_on_failure"):
            with contextlib.suppress(Exception):  # deploy.py marks it again from the control machine
                self.step("mark bad", self.mark_bad, self.p["target"])
        self.state["live"] = self.live()
        self.save()
        return 1


def main(params: dict) -> None:
    sys.exit(Cutover(params).run())
