"""The cutover's side of the Celery agent (`celery_agent.py`): starts it as the service with a
release's Python and speaks to it one JSON line at a time. Runs ON a host (Python 3.8+, stdlib
only), in the cutover program and in `remote/queues.py`.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time

from deploy_kit.remote import contracts, hostlib


class StepFailed(Exception):
    """A step of the cutover failed; its text says why, in the user's terms."""


class Agent:
    """The Celery agent (`celery_agent.py`) as the service, spoken to one JSON line at a time."""

    pending = b""  # what was read of its output past the last complete line
    refusal = ""  # why it did not start, as its greeting said

    def __init__(self, params: dict, release: str, purpose: str = "handover"):
        directory = os.path.join(params["releases_dir"], release)
        python = os.path.join(directory, params["venv"], "bin", "python")
        program = hostlib.program_line(_agent_program())  # before it starts: it waits for this line
        self.proc = subprocess.Popen(
            hostlib.service_argv(params["service_environment"], directory,
                                 [python, "-c", hostlib.READ_PROGRAM, params["app"]["celery_app"], purpose]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.asked = 0  # requests sent so far: each carries its number, each answer the number it answers
        try:  # its program, as its first line; the requests follow
            self.proc.stdin.write(program)
            self.proc.stdin.flush()
        except OSError:  # it ended already: its greeting (or its stderr) says why
            pass

    def ask(self, request: dict | None, timeout: float, alive=lambda: "") -> str:
        """Send a request (None: wait for the greeting) and wait for its answer; StepFailed when it
        fails, takes longer than `timeout`, or `alive()` names a reason to give up. The late answer
        of a request given up on (the broker gone, say) is skipped, never taken for this one's."""
        if request is not None:
            self.asked += 1
            try:
                self.proc.stdin.write(json.dumps({**request, "id": self.asked}) + "\n")
                self.proc.stdin.flush()
            except OSError:  # it ended already (it could not reach the broker, say)
                raise self.ended() from None
        deadline = time.monotonic() + timeout
        while True:
            line = self.line()
            answer = self.answer(line) if line is not None else None
            if answer is not None:
                if request is not None and answer.get("id") != self.asked:
                    self.refusal = self.refusal or self.refused(answer)
                    if self.refusal:  # it did not start, and ends: no answer will come
                        raise StepFailed(self.refusal)
                    continue
                if not answer.get("ok"):
                    raise StepFailed(str(answer.get("detail", "")))
                return str(answer.get("detail", ""))
            reason = alive()
            if reason:
                raise StepFailed(reason)
            if time.monotonic() > deadline:
                raise StepFailed(f"no answer within {timeout:.0f}s")

    def line(self) -> str | None:
        """The next complete line of its output, waiting at most 0.3 s for it (None: not yet). Read
        from the pipe itself: two answers that come in one read are both seen (a late answer of a
        request given up on, then this one's), never one left in a buffer `select` cannot see."""
        if b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.3)
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise self.ended()
            self.pending += chunk
            if b"\n" not in self.pending:
                return None
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode(errors="replace")

    @staticmethod
    def answer(line: str) -> dict | None:
        """A line of its output as an answer; None for anything else (a stray print of the app's)."""
        try:
            answer = json.loads(line)
        except ValueError:
            return None
        return answer if isinstance(answer, dict) and "ok" in answer else None

    @staticmethod
    def refused(answer: dict) -> str:
        """Why it did not start, when `answer` is a greeting that says so (it then ends)."""
        return "" if answer.get("ok") or answer.get("id") is not None else str(answer.get("detail", ""))

    def ended(self) -> StepFailed:
        """Why it ended: what its greeting said (the broker cannot be reached, say: a request sent
        before the greeting was read finds it gone), else the last line of its stderr."""
        if not self.refusal:
            try:
                self.proc.wait(timeout=1)  # it ended: what is left of its output is there to read
                rest = self.pending + os.read(self.proc.stdout.fileno(), 65536)
                answers = [self.answer(line.decode(errors="replace")) for line in rest.splitlines()]
                self.refusal = next((self.refused(a) for a in answers if a is not None and self.refused(a)), "")
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.refusal:
            return StepFailed(self.refusal)
        err = self.proc.stderr.read().strip().splitlines()
        return StepFailed("the Celery agent ended: " + (err[-1] if err else "no output"))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=contracts.AGENT_CLOSE)
        except Exception:  # noqa: BLE001 - it runs under systemd-run --collect; kill what is left
            self.proc.kill()


def _agent_program() -> str:
    from deploy_kit.remote import celery_agent  # loaded by then (it ships and re-exports this module)
    return celery_agent.program()
