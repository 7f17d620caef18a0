"""Runs ON a host, as root: applies `fab env.set` / `fab env.unset` to the app's env file, or
only reads it, and prints key names with salted fingerprints (a value only when revealed).

The file is read by the one rule of `hostlib` (the units read it the same way), and written
atomically, root-owned, mode 0640, readable by the service group.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import os
import tempfile

from deploy_kit.remote import hostlib


def decode(value: str) -> str:
    return base64.b64decode(value).decode()


def write(path: str, group: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".env.")
    try:
        os.fchown(fd, 0, grp.getgrnam(group).gr_gid)
        os.fchmod(fd, 0o640)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(params: dict) -> None:
    path = params["path"]
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        print(json.dumps({"error": "missing"}))
        return
    values, index = {}, {}
    for number, key, value in hostlib.env_entries(lines):
        values[key] = value
        index.setdefault(key, []).append(number)
    result: dict = {"changed": [], "unchanged": [], "absent": []}
    drop = set()
    for key, line in params.get("set", {}).items():
        new = decode(params["values"][key])
        if key in index:
            if values[key] == new and len(index[key]) == 1:
                result["unchanged"].append(key)
                continue
            lines[index[key][0]] = decode(line)
            drop.update(index[key][1:])
        else:
            lines.append(decode(line))
        result["changed"].append(key)
    for key in params.get("unset", []):
        if key in index:
            drop.update(index[key])
            result["changed"].append(key)
        else:
            result["absent"].append(key)
    if result["changed"]:
        write(path, params["group"], "\n".join(line for n, line in enumerate(lines) if n not in drop) + "\n")
    shown = {k: v for k, v in values.items() if not (k in params.get("unset", []) and k in result["changed"])}
    shown.update({key: decode(params["values"][key]) for key in params.get("set", {})})
    report = {}
    for key, value in shown.items():
        entry = {"set": hostlib.is_set(value),
                 "fingerprint": hashlib.sha256((params["salt"] + value).encode()).hexdigest()[:10]}
        if params.get("reveal"):
            entry["value"] = value
        report[key] = entry
    result["keys"] = report
    result["order"] = list(shown)
    print(json.dumps(result))
