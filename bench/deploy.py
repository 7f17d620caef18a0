"""Benchmark a deploy on a real stage: wall time per phase, SSH round trips and bytes sent per host.

    .venv/bin/python bench/deploy.py --stage sandbox [--runs 3]

Counts every command channel opened on the hosts' connections (a round trip each; the
cutover's progress polls are counted apart, since they only wait) and the bytes written to
them. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy_kit import config, lifecycle, ssh  # noqa: E402

calls: Counter[str] = Counter()
polls: Counter[str] = Counter()
sent: Counter[str] = Counter()
lock = threading.Lock()


def instrument() -> None:
    original = ssh.RemoteHost.run

    def counted(self, command, stdin, **kwargs):
        with lock:
            if kwargs.get("what") == "following the cutover":
                polls[self.name] += 1
            else:
                calls[self.name] += 1
            sent[self.name] += len(stdin if isinstance(stdin, bytes) else stdin.encode())
        return original(self, command, stdin, **kwargs)

    ssh.RemoteHost.run = counted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="sandbox")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    stage = config.load().stage(args.stage)
    instrument()
    walls = []
    for run in range(1, args.runs + 1):
        calls.clear(), polls.clear(), sent.clear()
        started = time.monotonic()
        outcome = lifecycle.deploy(stage, ref=None, say=lambda host, message: None)
        wall = time.monotonic() - started
        walls.append(wall)
        print(f"run {run}: {outcome.release} in {wall:.1f} s")
        for host in sorted(calls):
            steps = outcome.timings.get(host, {})
            downtime = sum(steps.get(s, 0) for s in ("restart workers", "wait for workers"))
            print(f"  {host}: {calls[host]} round trips (+{polls[host]} progress polls), "
                  f"{sent[host] / 1024:.0f} KiB sent, workers restarted in {downtime:.2f} s")
    print(f"deploy wall time: median {statistics.median(walls):.1f} s over {len(walls)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
