"""Chunking benchmark: hashing rate of each block scheme, and what a mid-file insertion costs.

Creates its own random file under a temporary directory (removed at exit) and prints every
rate as a ratio to a plain ``hashlib.sha256`` loop over the same file, measured in the same
run with the file in the page cache. Usage: ``python bench/chunking.py [--size MiB]``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
from pyfastcdc import FastCDC

from lanshare import chunker
from lanshare.manifest import Block

if TYPE_CHECKING:
    from collections.abc import Callable

MiB = 1024 * 1024
KiB = 1024


def syncthing_block_size(size: int) -> int:
    """Syncthing's rule: the smallest power of two ≥ 128 KiB giving < 2000 blocks, ≤ 16 MiB."""
    block = 128 * KiB
    while block < 16 * MiB and size >= 2000 * block:
        block *= 2
    return block


def plain_loop(path: Path, new_hash: Callable[[], object]) -> None:
    h = new_hash()
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        assert isinstance(handle, io.FileIO)
        while count := handle.readinto(view):
            h.update(view[:count])  # type: ignore[attr-defined]
    h.digest()  # type: ignore[attr-defined]


def fixed_blocks_file(path: Path, algo: str) -> None:
    """Fixed blocks of Syncthing's size, 8 MiB reads, whole hash = hash of block hashes."""
    size = path.stat().st_size
    block = syncthing_block_size(size)
    read = max(block, 8 * MiB)
    buffer = bytearray(read)
    view = memoryview(buffer)
    hashes = []
    with open(path, "rb", buffering=0) as handle:
        assert isinstance(handle, io.FileIO)
        while count := handle.readinto(view):
            for offset in range(0, count, block):
                hashes.append(chunker.block_hash(view[offset : min(count, offset + block)], algo))
    chunker.whole_file_hash(hashes, algo)


def cdc_cut_only(path: Path) -> None:
    params = chunker.chunk_params(path.stat().st_size)
    cutter = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size)
    for _ in cutter.cut_file(str(path)):
        pass


def fixed_blocks(data: bytes) -> list[Block]:
    block = syncthing_block_size(len(data))
    view = memoryview(data)
    return [
        Block(o, len(view[o : o + block]), hashlib.sha256(view[o : o + block]).digest())
        for o in range(0, len(data), block)
    ]


def cdc_blocks(data: bytes, avg: int) -> list[Block]:
    cutter = FastCDC(avg, min_size=avg // 4, max_size=avg * 4)
    return [Block(c.offset, c.length, blake3.blake3(c.data).digest()) for c in cutter.cut_buf(data)]


def changed(old: list[Block], new: list[Block]) -> tuple[int, int]:
    """Blocks of ``new`` (and their bytes) that a peer holding ``old`` must fetch."""
    have = {b.hash for b in old}
    missing = [b for b in new if b.hash not in have]
    return len(missing), sum(b.size for b in missing)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="file size in MiB (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per scheme (default 3)")
    args = parser.parse_args()
    size = args.size * MiB

    with tempfile.TemporaryDirectory(prefix="lanshare-bench-") as tmp:
        path = Path(tmp) / "random.bin"
        with open(path, "wb") as handle:
            for _ in range(0, size, 16 * MiB):
                handle.write(os.urandom(min(16 * MiB, size - handle.tell())))
        plain_loop(path, hashlib.sha256)  # warm the page cache

        schemes: dict[str, Callable[[], object]] = {
            "plain hashlib.sha256 loop, 1 MiB reads": lambda: plain_loop(path, hashlib.sha256),
            "plain blake3 loop, 1 MiB reads": lambda: plain_loop(path, blake3.blake3),
            "fixed Syncthing blocks + sha256": lambda: fixed_blocks_file(path, "sha256"),
            "fixed Syncthing blocks + blake3": lambda: fixed_blocks_file(path, "blake3"),
            "FastCDC cut only (mmap, no hash)": lambda: cdc_cut_only(path),
            "hash_file: FastCDC + sha256": lambda: chunker.hash_file(path, "sha256"),
            "hash_file: FastCDC + blake3 (chosen)": lambda: chunker.hash_file(path, "blake3"),
        }
        times: dict[str, list[float]] = {name: [] for name in schemes}
        for _ in range(args.repeat):  # interleaved rounds: drift hits every scheme alike
            for name, run in schemes.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)

        reference = min(times["plain hashlib.sha256 loop, 1 MiB reads"])
        print(f"file: {args.size} MiB random, page cache warm, {args.repeat} interleaved rounds")
        print(f"{'scheme':42s} {'best MB/s':>10s} {'median':>8s} {'vs sha256 loop':>15s}")
        for name, samples in times.items():
            best = min(samples)
            median = statistics.median(samples)
            print(
                f"{name:42s} {size / best / 1e6:10.0f} {size / median / 1e6:8.0f}"
                f" {reference / best:14.2f}x"
            )
        best_blake3 = min(times["plain blake3 loop, 1 MiB reads"])
        chosen = min(times["hash_file: FastCDC + blake3 (chosen)"])
        print(f"hash_file (chosen) vs plain blake3 loop: {best_blake3 / chosen:.2f}x")

        data = path.read_bytes()
    mid = len(data) // 2
    edits = {
        "insert 1 KiB mid-file": data[:mid] + os.urandom(KiB) + data[mid:],
        "delete 1 KiB mid-file": data[:mid] + data[mid + KiB :],
        "overwrite 1 KiB mid-file": data[:mid] + os.urandom(KiB) + data[mid + KiB :],
        "append 1 KiB": data + os.urandom(KiB),
    }
    cutters: dict[str, Callable[[bytes], list[Block]]] = {
        f"fixed {syncthing_block_size(len(data)) // KiB} KiB (Syncthing)": fixed_blocks,
        "FastCDC avg 256 KiB": lambda d: cdc_blocks(d, 256 * KiB),
        "FastCDC avg 512 KiB": lambda d: cdc_blocks(d, 512 * KiB),
        "FastCDC avg 1 MiB": lambda d: cdc_blocks(d, MiB),
        "chunker.split_blocks (chosen)": lambda d: list(chunker.split_blocks(d)),
    }
    print()
    print(f"blocks a peer holding the old {args.size} MiB file must fetch after an edit:")
    print(f"{'scheme':32s} {'blocks':>7s} " + " ".join(f"{e:>26s}" for e in edits))
    for name, cut in cutters.items():
        old = cut(data)
        cells = []
        for new_data in edits.values():
            count, nbytes = changed(old, cut(new_data))
            cells.append(f"{count:>6d} blk {nbytes / MiB:8.2f} MiB")
        print(f"{name:32s} {len(old):7d} " + " ".join(f"{c:>26s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
