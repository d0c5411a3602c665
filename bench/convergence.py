"""Convergence of the mixed folder across three daemons, with and without packet loss, and
the daemons' memory while idle and while syncing.

Needs root (network namespace lab). For each loss rate, A gets the issue's mixed folder (one
big file, 2,000 small files in nested directories, a symlink, an empty directory); A, B and C
start together (real mDNS, real UDP, loss from nftables on every host) and the time runs from
their start until B and C hold A's tree byte for byte with mtimes and modes. The reference in
the same run is a local ``cp -a`` of the folder on the same disk (what the bytes cost without
any network or protocol). VmRSS of B is sampled every 0.2 s while it syncs (peak) and once
after it is in sync (idle).

Usage: ``python bench/convergence.py [--big-mib 200] [--small 2000] [--loss 0 2]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from tests.e2e.harness import (
    Cluster,
    MiB,
    make_mixed_tree,
    start_all,
    wait_same_tree,
    wait_until,
)
from tests.lab import netns_unavailable_reason

TIMEOUT = 900.0


def run(big_mib: int, small: int, loss: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="lsbench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            lab = cluster.lab(3, loss=loss)
            a, b, c = (cluster.node(n, h) for n, h in zip("abc", lab.hosts, strict=True))
            tree = make_mixed_tree(a.folder, big_size=big_mib * MiB, small_files=small)
            copy = Path(tmp) / "copy"
            started = time.monotonic()
            subprocess.run(["cp", "-a", str(a.folder), str(copy)], check=True)
            subprocess.run(["sync"], check=True)
            reference = time.monotonic() - started
            shutil.rmtree(copy)
            peak = 0
            sampling = threading.Event()
            sampling.set()

            def sample() -> None:
                nonlocal peak
                while sampling.is_set():
                    with contextlib.suppress(OSError, RuntimeError, AssertionError):
                        peak = max(peak, b.rss_bytes())
                    time.sleep(0.2)

            started = time.monotonic()
            start_all([a, b, c])
            sampler = threading.Thread(target=sample, name="rss")
            sampler.start()
            try:
                wait_same_tree(a.folder, [b.folder, c.folder], TIMEOUT, [a, b, c])
                seconds = time.monotonic() - started
            finally:
                sampling.clear()
                sampler.join()
            wait_until(
                lambda: all(n.folder_status()["state"] == "in_sync" for n in (b, c)),
                60.0,
                "in sync",
            )
            time.sleep(2.0)
            idle = b.rss_bytes()
            received = b.status()["transfer"]["bytes_received"]
        finally:
            cluster.close()
    return {
        "seconds": seconds,
        "reference": reference,
        "bytes": tree.bytes,
        "files": tree.files,
        "rss_peak": peak,
        "rss_idle": idle,
        "received": received,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--loss", type=float, nargs="+", default=[0.0, 2.0])
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 1
    for loss in args.loss:
        r = run(args.big_mib, args.small, loss)
        print(
            f"loss {loss:g} %: {r['files']} files, {r['bytes'] / MiB:.0f} MiB converged on B "
            f"and C in {r['seconds']:.1f} s ({r['bytes'] / MiB / r['seconds']:.1f} MiB/s); "
            f"local cp -a {r['reference']:.2f} s, ratio {r['seconds'] / r['reference']:.1f}x; "
            f"B received {r['received'] / r['bytes']:.2f}x the folder's bytes; "
            f"B RSS peak {r['rss_peak'] / MiB:.0f} MiB syncing, {r['rss_idle'] / MiB:.0f} MiB idle"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
