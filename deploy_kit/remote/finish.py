"""Runs ON a host, as root: the end of a deploy or a rollback (or of one that failed early).

    delete     old releases cleanup removes (or a release this run made and never switched to)
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

from deploy_kit.remote import hostlib


def finish(params: dict) -> list:
    warnings = []
    for path in params.get("delete", []):
        try:
            if os.path.lexists(path):
                shutil.rmtree(path)
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
    return warnings


def main(params: dict) -> None:
    print(json.dumps({"warnings": finish(params)}))
