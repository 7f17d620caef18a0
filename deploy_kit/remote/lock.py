"""Runs ON a host, as root: what `fab unlock` sees and does. Prints the deploy lock's holder
(`contracts.LockHolder`) and the app's cutovers still running; with `break`, first removes the
lock whoever holds it (the user confirmed). Python 3.8+, stdlib only.
"""

from __future__ import annotations

import json

from deploy_kit.remote import hostlib


def main(params: dict) -> None:
    broken = hostlib.break_lock(params["state_dir"]) if params.get("break") else False
    holder = hostlib.read_lock(params["state_dir"])
    cutovers = hostlib.list_units([params["app"] + "-cutover-*"], "active,activating")
    print(json.dumps({"holder": holder.to_data() if holder else None, "broken": broken,
                      "cutovers": list(cutovers)}))
