"""Multi-source speed-up with real daemons: one seeder against four, each capped by max_send_rate.

Needs root (network namespace lab). Four seeder hosts hold the same file (copied with its
mtime, so their versions merge without any transfer) and run real ``lanshare daemon``
processes whose ``[network] max_send_rate`` is R. A fifth host pulls the file, first with
one seeder running, then with all four. Each pull is timed from the puller's launch until
the file is identical there, so both include starting Python, finding the seeders over mDNS
and reading their manifests (about a second; a larger file makes it matter less). Prints both
times and the speed-up; the issue's target is at least 3.5 (ideal: 4).

Usage: ``python bench/multisource_daemons.py [--size-mib 96] [--rate-mib 6]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.harness import Cluster, Node, file_digest, wait_same_tree, wait_until
from tests.lab import netns_unavailable_reason

TIMEOUT = 300.0
MiB = 1024 * 1024


def timed_pull(puller: Node, name: str, digest: str) -> float:
    """Start ``puller``; seconds from its launch until ``name`` is identical there.

    Not from READY=1: that waits for the mDNS registration (~1.5 s of probing), while the
    node already browses, connects and downloads.
    """
    started = time.monotonic()
    puller.start(wait=False)
    target = puller.folder / name
    deadline = started + TIMEOUT
    while time.monotonic() < deadline:
        if target.exists() and file_digest(target) == digest:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{puller.name} did not finish within {TIMEOUT} s")


def run(size: int, rate: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="lsbench-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            lab = cluster.lab(5)
            limit = {"network": {"max_send_rate": rate}}
            seeders = [cluster.node(f"s{i}", lab.hosts[i], extra=limit) for i in range(4)]
            source = Path(tmp) / "big.bin"
            with source.open("wb") as out:
                for _ in range(size // MiB):
                    out.write(os.urandom(MiB))
            for seeder in seeders:
                shutil.copy2(source, seeder.folder / "big.bin")
            digest = file_digest(source)
            for seeder in seeders:
                seeder.start(wait=False)
            for seeder in seeders:
                seeder.wait_ready()
            wait_until(
                lambda: all(s.folder_status()["state"] == "in_sync" for s in seeders),
                TIMEOUT,
                "seeders in sync",
            )
            for seeder in seeders[1:]:
                seeder.stop()
            one = timed_pull(cluster.node("p1", lab.hosts[4]), "big.bin", digest)
            cluster.nodes[-1].stop()
            for seeder in seeders[1:]:
                seeder.start()
            wait_same_tree(seeders[0].folder, [s.folder for s in seeders[1:]], TIMEOUT, seeders)
            before = [s.status()["transfer"].get("bytes_sent", 0) for s in seeders]
            four = timed_pull(cluster.node("p4", lab.hosts[4]), "big.bin", digest)
            after = [s.status()["transfer"].get("bytes_sent", 0) for s in seeders]
            shares = [(b - a) / size for a, b in zip(before, after, strict=True)]
            print(
                "bytes sent per seeder (share of the file): "
                + ", ".join(f"{share:.2f}" for share in shares)
            )
        finally:
            cluster.close()
    return one, four


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=96)
    parser.add_argument("--rate-mib", type=float, default=6.0, help="each seeder's cap")
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    rate = int(args.rate_mib * MiB)
    one, four = run(args.size_mib * MiB, rate)
    print(f"file {args.size_mib} MiB, each seeder capped at {args.rate_mib:g} MiB/s")
    print(f"one seeder     {one:6.2f} s  ({args.size_mib / one:5.1f} MiB/s)")
    print(f"four seeders   {four:6.2f} s  ({args.size_mib / four:5.1f} MiB/s)")
    print(f"speed-up       {one / four:6.2f}  (target >= 3.5, ideal 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
