"""Bytes on the wire for a rename and for a small insertion, against a full transfer.

Runs real engines (folders, indexes, Endpoints) in one process over the in-memory network of
tests/enginesim.py and counts block data received and every datagram byte sent.

    python -m bench.sync_bytes                     # 100 MiB rename, 1 KiB into 256 MiB
    python -m bench.sync_bytes --rename-size 32M --insert-size 64M
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.enginesim import Cluster, SimNode, converge, random_bytes

MTIME_NS = 1_600_000_000_000_000_000


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].isalpha() else int(text)


def _wire(cluster: Cluster) -> int:
    return sum(cluster.network.bytes_sent.values())


def _row(case: str, size: int, blocks: int, wire: int, seconds: float) -> None:
    print(
        f"{case:<34} file {size / 2**20:8.1f} MiB  block data {blocks:>12,} B "
        f"({blocks / size:7.3%})  on the wire {wire:>12,} B ({wire / size:7.3%})  {seconds:5.1f} s"
    )


async def _pair(base: Path, seed: int) -> tuple[Cluster, SimNode, SimNode]:
    cluster = Cluster(base, seed=seed)
    a, b = cluster.add(), cluster.add()
    return cluster, a, b


async def full_and_rename(base: Path, size: int) -> None:
    cluster, a, b = await _pair(base / "rename", 1)
    async with cluster:
        a.write("old/name.bin", random_bytes(1, size), mtime_ns=MTIME_NS)
        await cluster.start()
        started = time.monotonic()
        await converge([a, b], 600)
        _row(
            "full transfer (baseline)",
            size,
            b.counters.received_total,
            _wire(cluster),
            time.monotonic() - started,
        )
        blocks, wire = b.counters.received_total, _wire(cluster)
        a.path("new").mkdir()
        a.path("old/name.bin").rename(a.path("new/moved.bin"))
        started = time.monotonic()
        await a.scan()
        await converge([a, b], 600)
        _row(
            "rename into another directory",
            size,
            b.counters.received_total - blocks,
            _wire(cluster) - wire,
            time.monotonic() - started,
        )


async def insertion(base: Path, size: int) -> None:
    cluster, a, b = await _pair(base / "insert", 2)
    async with cluster:
        data = random_bytes(2, size)
        for node in (a, b):  # copied there beforehand: no need to send it through the sim
            node.write("big.bin", data, mtime_ns=MTIME_NS)
        await cluster.start()
        await converge([a, b], 600)
        blocks, wire = b.counters.received_total, _wire(cluster)
        middle = size // 2
        a.write("big.bin", data[:middle] + random.Random(3).randbytes(1024) + data[middle:])
        started = time.monotonic()
        await a.scan()
        await converge([a, b], 600)
        record = a.folder.engine.index.get(a.folder.info.id, "big.bin")
        assert record is not None
        moved = b.counters.received_total - blocks
        _row(
            "1 KiB inserted in the middle",
            size,
            moved,
            _wire(cluster) - wire,
            time.monotonic() - started,
        )
        sizes = sorted(block.size for block in record.blocks)
        print(
            f"{'':<34} {len(record.blocks)} blocks, median {sizes[len(sizes) // 2]:,} B, "
            f"largest {sizes[-1]:,} B: {moved / sizes[len(sizes) // 2]:.1f} median blocks re-sent"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rename-size", default="100M")
    parser.add_argument("--insert-size", default="256M")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lanshare-bench-") as tmp:
        await full_and_rename(Path(tmp), _size(args.rename_size))
        await insertion(Path(tmp), _size(args.insert_size))


if __name__ == "__main__":
    asyncio.run(main())
