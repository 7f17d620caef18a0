"""Runs ON a host, as root: the end of a deploy or a rollback (or of one that failed early).

    delete     old releases cleanup removes (or a release this run made and never switched to):
               each is renamed to .NAME.deleting at once (gone from every listing) and removed by
               `rm -rf` under systemd-run in the background, so a deploy never waits for it
    mark_bad   a release a deploy was rolled back from (`hostlib.mark_bad`, as the cutover marks it)
    history    one line appended to .deploy-kit/history.jsonl
    unlock     the deploy lock, only while it carries this run's token

Nothing of it may keep the lock of a run that is over: a release that cannot be removed or a
history line the disk cannot take is a warning. Prints {"warnings": [...]}. Python 3.8+, stdlib only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from deploy_kit.remote import hostlib

DELETING = ".deleting"  # releases/.NAME.deleting: a release being removed in the background


def trash_name(path: str) -> str:
    """Where `path` waits for its removal: a hidden name beside it (same filesystem: a rename)."""
    if path.endswith(DELETING):
        return path
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path).lstrip(".") + DELETING)


def remove_later(paths: list, unit: str) -> list:
    """`rm -rf` of `paths` as a transient unit (it outlives this SSH session); where systemd-run
    cannot start it, removed here and now. Warnings for what could not be removed."""
    try:
        started = subprocess.run(["systemd-run", "--quiet", "--collect", f"--unit={unit}",
                                  "--description=deploy-kit cleanup", "rm", "-rf", "--one-file-system", "--",
                                  *paths], capture_output=True, text=True, timeout=60)
        if started.returncode == 0:
            return []
    except (OSError, subprocess.SubprocessError):
        pass
    warnings = []
    for path in paths:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            warnings.append(f"cleanup could not remove {path}: {exc.strerror}")
    return warnings


def finish(params: dict) -> list:
    warnings, doomed = [], []
    for path in params.get("delete", []):
        try:
            if os.path.lexists(path):
                trash = trash_name(path)
                if trash != path:
                    os.rename(path, trash)  # atomic: no listing sees a half-removed release
                doomed.append(trash)
        except OSError as exc:
            warnings.append(f"cleanup could not remove {path}: {exc.strerror}")
    bad = params.get("mark_bad")
    if bad:
        try:
            hostlib.mark_bad(bad["release_dir"], bad["id"], bad["reason"])
        except OSError as exc:
            warnings.append(f"{bad['release_dir']} could not be marked bad: {exc.strerror}")
    history = params.get("history")
    if history:
        try:
            with open(history["path"], "a") as handle:
                handle.write(history["line"] + "\n")
        except OSError as exc:
            warnings.append(f"the history line could not be written to {history['path']}: {exc.strerror}")
    if params.get("token"):
        hostlib.release_lock(params["state_dir"], params["token"])
    if doomed:
        warnings += remove_later(doomed, params.get("cleanup_unit") or "deploy-kit-cleanup")
    return warnings


def main(params: dict) -> None:
    print(json.dumps({"warnings": finish(params)}))
