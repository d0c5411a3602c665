"""Discovery benchmark in the namespace lab: how fast peers find each other over real
multicast, and how fast a killed peer (no goodbye) is noticed, with zeroconf's default timings.

Needs root (network namespaces). Each run starts ``python -m lanshare.discovery`` on host A,
waits until it is announced, then starts host B, and reads the JSON event times:

* ``seen``: from B's start to A's ``up`` for B (B probes its name, then announces);
* ``join``: from B's start to B's ``up`` for A (a newcomer finds a peer already there);
* ``ready``: from B's start to B's registration complete: zeroconf's own probe-and-announce
  time, the reference the two figures above are divided by;
* ``killed``: from SIGKILL of B to A's ``down`` for B, against the documented bound
  (``LivenessPolicy.silence_timeout`` plus one tick).

Usage: ``python bench/discovery.py [--runs 5] [--kill-runs 3]``. Prints medians (min-max).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanshare.discovery import TICK_INTERVAL
from lanshare.keys import format_key, generate_key
from lanshare.peertable import LivenessPolicy
from tests.lab import Lab, Process, netns_unavailable_reason

TIMEOUT = 60.0


def _start(lab: Lab, index: int, key: str, state: Path) -> Process:
    host = lab.hosts[index]
    return host.python(
        "-m", "lanshare.discovery",
        "--name", f"bench{index}",
        "--state-dir", str(state / host.name),
        "--port", str(47000 + index),
        "--key", key,
    )  # fmt: skip


def _time_of(proc: Process, event: str, peer: str | None = None) -> float:
    obj = proc.expect_json(
        lambda o: o.get("event") == event and (peer is None or o["peer"]["id"] == peer),
        timeout=TIMEOUT,
    )
    return float(obj["t"])


def one_run(kill: bool) -> dict[str, float]:
    key = format_key(generate_key())
    with tempfile.TemporaryDirectory() as tmp, Lab(2) as lab:
        a = _start(lab, 0, key, Path(tmp))
        a_id = a.expect_json(lambda o: o.get("event") == "ready", timeout=TIMEOUT)["id"]
        b = _start(lab, 1, key, Path(tmp))
        b_started = b.expect_json(lambda o: o.get("event") == "started", timeout=TIMEOUT)
        t0, b_id = float(b_started["t"]), b_started["id"]
        result = {
            "seen": _time_of(a, "up", b_id) - t0,
            "join": _time_of(b, "up", a_id) - t0,
            "ready": _time_of(b, "ready") - t0,
        }
        if kill:
            killed_at = time.time()
            b.stop(signal.SIGKILL)
            result["killed"] = _time_of(a, "down", b_id) - killed_at
        return result


def _summary(values: list[float]) -> str:
    spread = f"{min(values):.2f}-{max(values):.2f}, n={len(values)}"
    return f"{statistics.median(values):6.2f} s  ({spread})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kill-runs", type=int, default=3)
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        sys.stderr.write(f"skipped: {reason}\n")
        return 1
    runs = [one_run(kill=i < args.kill_runs) for i in range(max(args.runs, args.kill_runs))]
    column = {k: [r[k] for r in runs if k in r] for k in ("seen", "join", "ready", "killed")}
    ready = statistics.median(column["ready"])
    bound = LivenessPolicy().silence_timeout + TICK_INTERVAL
    print("discovery in a 2-host namespace lab, zeroconf default timings")
    print(f"  ready  (B registered)     {_summary(column['ready'])}")
    for name, label in (("seen", "A sees B      "), ("join", "B sees A      ")):
        median = statistics.median(column[name])
        print(
            f"  {name:6} ({label})        {_summary(column[name])}  = {median / ready:.2f} x ready"
        )
    if column["killed"]:
        median = statistics.median(column["killed"])
        print(f"  killed (A marks B down)   {_summary(column['killed'])}  "
              f"= {median / bound:.2f} x bound ({bound:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
