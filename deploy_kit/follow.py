"""Start a host's cutover detached from SSH (under systemd-run) and follow its state file.

The cutover runs on the host by itself (`remote/cutover.py`); from here we only read
`.deploy-kit/cutover.json` until it ends. A dropped connection pauses the reading, which
reconnects and goes on; what cannot be read is UNKNOWN, never guessed.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from deploy_kit import journal
from deploy_kit import remote as host_programs
from deploy_kit.errors import DeployKitError, HostError, RemoteCommandError
from deploy_kit.plan import Cutover
from deploy_kit.release import state_dir
from deploy_kit.remote.contracts import CutoverState, CutoverStatus, Mode
from deploy_kit.ssh import RemoteHost, quote

if TYPE_CHECKING:
    from deploy_kit.runner import Run

S = CutoverStatus
STARTUP_GRACE = 15  # seconds a started cutover may take to write its first state


def budget(params: dict[str, Any]) -> float:
    """How long a cutover can take at worst: forward and back, each with a stop of the old units
    (a restart in place waits for the longest task), the agent's start, a verification per
    worker, the remote-control calls and the watch."""
    verify = float(params["verify"]["timeout"])
    one_pass = float(params["stop_timeout"]) + 120 + (verify + 30) * (len(params["workers"]) + 1) + \
        float(params["watch"])
    return 2 * one_pass + 60


def _launch_script(params: dict[str, object], unit: str, app_name: str, python: str, state: str) -> str:
    program = host_programs.program("cutover", params)
    return (f"install -d -m 0700 {quote(state)}\n"
            # Never two cutovers of one app at once: an earlier one may still run (a lost deploy).
            f"if systemctl list-units --plain --no-legend --state=active,activating "
            f"{quote(app_name + '-cutover-*')} | grep -q .; then\n"
            f"  echo 'another cutover of {app_name} is still running on this host' >&2; exit 3\nfi\n"
            f"cat > {quote(state + '/cutover-run.py')} <<'DEPLOY_KIT_EOF'\n{program}DEPLOY_KIT_EOF\n"
            f"rm -f {quote(str(params['state_file']))}\n"
            f"systemd-run --quiet --collect --unit={quote(unit)} --description={quote('deploy-kit cutover')} "
            f"{quote(python)} {quote(state + '/cutover-run.py')}\n")


def cutover(run: Run, remote: RemoteHost, action: Cutover) -> CutoverState:
    stage, params = run.stage, action.params
    unit = f"{stage.app.name}-cutover-{params['id']}"
    if params["phase"] == "beat":
        watched = [str(params["beat_unit"])]
    else:
        watched = [u for w in params["workers"] for u in (w["template"].replace("@.", "@*."), w["legacy"])]
    blank = CutoverState(id=str(params["id"]), mode=Mode(params["mode"]), target=str(params["target"]),
                         previous=params.get("previous"), status=S.NOT_STARTED)  # type: ignore[arg-type]
    limit = budget(params)
    tail = journal.Tail(remote, stage, watched, since=time.time() - 1, show=lambda item: _show(run, item)) \
        if watched else contextlib.nullcontext()  # no unit here: no journal to show (never the whole one)
    with tail:
        try:
            remote.run_script(_launch_script(params, unit, stage.app.name, str(stage.app.python),
                                             str(state_dir(stage.app))), sudo=True, what="starting the cutover")
        except RemoteCommandError as exc:  # the script ran and refused or systemd-run failed: not started
            return CutoverState(**{**blank.__dict__, "failure": exc.reason})
        except HostError as exc:  # the connection dropped: it may have started
            blank.status, blank.rollback_failure = S.UNKNOWN, f"the cutover may have started: {exc.reason}"
            return blank
        return _follow(run, remote.name, unit, blank, time.monotonic() + limit)


def _follow(run: Run, host: str, unit: str, blank: CutoverState, deadline: float) -> CutoverState:
    """Poll the host's state file until the cutover ends; report each step as it completes."""
    assert run.session is not None
    path = str(state_dir(run.stage.app) / "cutover.json")
    # Unit state first, then the file: a cutover that ends in between is read as ended, not dead.
    script = (f"systemctl is-active {quote(unit)} || true\nprintf -- '---\\n'\n"
              f"cat {quote(path)} 2>/dev/null || true\n")
    reported, lost, started = 0, False, time.monotonic()
    last = blank
    while True:
        try:
            out = run.session.remote(host).run_script(script, sudo=True, what="following the cutover",
                                                      timeout=30).stdout
            if lost:
                run.say(host, "connection back; the cutover went on meanwhile")
                lost = False
        except DeployKitError as exc:
            if not lost:
                run.say(host, f"lost the connection ({getattr(exc, 'reason', exc)}); the cutover goes on "
                              "on the host, reconnecting")
                lost = True
            if time.monotonic() > deadline:
                return _unknown(last, "the host could not be reached again")
            time.sleep(2)
            run.session.reconnect(host)
            continue
        active, _, text = out.partition("---\n")
        state = _parse(text, blank.id)
        if state is not None:
            last = state
            for step in state.steps[reported:]:
                if step.ok is None:
                    break
                run.say(host, f"{step.name}: {'ok' if step.ok else 'FAILED'} {step.detail}".rstrip())
                run.outcome.timings.setdefault(host, {})[step.name] = step.seconds
                reported += 1
            if state.status.finished:
                return state
        running = active.strip() in ("active", "activating")
        if not running and state is not None:
            return _unknown(state, "the cutover process died mid-way")
        if not running and time.monotonic() - started > STARTUP_GRACE:
            return _unknown(last, "the cutover ended without writing its state (disk full?)")
        if time.monotonic() > deadline:
            return _unknown(last, "the cutover did not finish in time; it may still be running")
        time.sleep(0.5)


def _parse(text: str, run_id: str) -> CutoverState | None:
    """This run's state, or None (not written yet, or another run's file)."""
    try:
        state = CutoverState.from_json(text.strip())
    except (ValueError, KeyError, TypeError):
        return None
    return state if state.id == run_id else None


def _unknown(state: CutoverState, why: str) -> CutoverState:
    return CutoverState(**{**state.__dict__, "status": S.UNKNOWN, "rollback_failure": why})


def _show(run: Run, item: journal.JournalLine | journal.HostEvent) -> None:
    """Journal lines of the units while they restart and verify, as they happen."""
    if isinstance(item, journal.HostEvent):
        run.say(item.host, f"journal: {item.message}")
        return
    if journal.is_banner(item.message):
        return
    run.say(item.host, f"  | {item.unit}: {item.message}")
    hint = journal.hint_for(item.message)
    if hint and (item.priority <= 4 or "Error" in item.message):
        run.say(item.host, f"  | hint: {hint}")
