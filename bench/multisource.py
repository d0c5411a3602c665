"""Multi-source speed-up: one puller fetches a file from 1 seeder, then from 4, every seeder
capped by ``[network] max_send_rate`` (the protocol's own token bucket).

Real engines (folders, indexes, Endpoints) in one process over the in-memory network of
tests/enginesim.py, real time. Prints both times, the speed-up and the share each seeder
served; the ideal speed-up is 4.

    python -m bench.multisource                    # 16 MiB at 2 MiB/s per seeder
    python -m bench.multisource --size 32M --rate 4M --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.enginesim import Cluster, SimNode, converge, random_bytes, wait_for

MTIME_NS = 1_600_000_000_000_000_000


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)


async def run(base: Path, size: int, rate: int, seed: int) -> tuple[float, float, list[float]]:
    async with Cluster(base, seed=seed) as cluster:
        seeders = [cluster.add(max_send_rate=rate) for _ in range(4)]
        solo, multi = cluster.add(), cluster.add()
        data = random_bytes(seed, size)
        for seeder in seeders:
            seeder.write("f.bin", data, mtime_ns=MTIME_NS)
        await cluster.start(seeders)
        await converge(seeders, 60)  # one agreed version, so all four are sources

        async def pull(puller: SimNode, sources: list[SimNode]) -> float:
            await puller.start()
            started = time.monotonic()
            puller.connect(*sources)
            await wait_for(lambda: puller.path("f.bin").exists(), 600, "the pull")
            elapsed = time.monotonic() - started
            assert puller.read("f.bin") == data
            await puller.stop()
            return elapsed

        one = await pull(solo, seeders[:1])
        four = await pull(multi, seeders)
        shares = [multi.counters.received[s.node_id] / size for s in seeders]
        return one, four, shares


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="16M")
    parser.add_argument("--rate", default="2M", help="max_send_rate of each seeder (bytes/s)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size, rate = _size(args.size), _size(args.rate)
    print(f"file {size / 2**20:.0f} MiB, each seeder capped at {rate / 2**20:.1f} MiB/s")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="lanshare-bench-") as tmp:
        for i in range(args.repeat):
            one, four, shares = await run(Path(tmp) / str(i), size, rate, seed=100 + i)
            ratios.append(one / four)
            print(
                f"run {i}: 1 seeder {one:6.2f} s ({size / one / 2**20:5.2f} MiB/s), "
                f"4 seeders {four:6.2f} s ({size / four / 2**20:5.2f} MiB/s): "
                f"speed-up {one / four:4.2f}x; shares " + " ".join(f"{s:.0%}" for s in shares)
            )
    ratios.sort()
    print(
        f"speed-up: median {ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
