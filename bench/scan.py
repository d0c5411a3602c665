"""Scan benchmark: cold scan and unchanged rescan of a folder, hashing rate against references.

Creates, under a temporary directory removed at exit, a folder with one large random file
(default 1 GiB) and 10,000 small files (the large file is also scanned alone, in a folder of
its own, for the pure hashing rate), then a folder of 100,000 empty-ish files. Runs the
scanner's library API (``scanner.scan_folder``, what ``lanshare scan`` calls) with a fresh
index for each cold scan. References measured in the same run over the same large file, page
cache warm for all: ``sha256sum`` and a plain ``hashlib.sha256`` loop (1 MiB reads), plus a
plain ``blake3`` loop (the chunker's algorithm). Each timing is the best of ``--repeat`` runs.
Files are left to age past ``chunker.RACY_WINDOW_NS`` before the first scan, so they are
read once, as files at rest are (a just-written file is read twice on purpose).

Usage: ``python bench/scan.py [--big-mib 1024] [--small 10000] [--many 100000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from lanshare import chunker, keys, scanner
from lanshare.config import FolderConfig
from lanshare.index import Index

if TYPE_CHECKING:
    from collections.abc import Callable

MiB = 1024 * 1024
ME = 0xBE7C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the large file")
    parser.add_argument("--small", type=int, default=10_000, help="small files beside it")
    parser.add_argument("--many", type=int, default=100_000, help="files of the second folder")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best kept)")
    parser.add_argument("--io-workers", type=int, default=4)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="lanshare-bench-scan-"))
    try:
        run(base, args)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: Path, args: argparse.Namespace) -> None:
    rows: list[tuple[str, str]] = []
    key = keys.format_key(keys.generate_key())

    # --- folder 1: one large file and many small ones -----------------------------------
    share = base / "share"
    big = base / "big" / "big.bin"
    print(f"creating {args.big_mib} MiB file and {args.small} small files …", file=sys.stderr)
    make_big(big, args.big_mib * MiB)
    share.mkdir()
    os.link(big, share / "big.bin")  # the same file in a folder of its own and beside the rest
    small_bytes = make_small(share / "small", args.small, min_size=512, max_size=8192)
    total = args.big_mib * MiB + small_bytes
    wait_out_racy_window()
    read_all(big)  # page cache warm for every reader below

    sha256sum = best(args.repeat, lambda: sha256sum_file(big))
    hashlib_loop = best(args.repeat, lambda: plain_loop(big, hashlib.sha256))
    blake3_loop = best(args.repeat, lambda: plain_loop(big, blake3.blake3))
    hash_file = best(args.repeat, lambda: chunker.hash_file(big))
    big_bytes = args.big_mib * MiB

    alone = FolderConfig(path=big.parent, key=key)
    cold_big = min(
        timed_scan(base / f"state-big-{i}", alone, args.io_workers)[0] for i in range(args.repeat)
    )
    folder = FolderConfig(path=share, key=key)
    cold: list[float] = []
    for i in range(args.repeat):
        cold.append(timed_scan(base / f"state-cold-{i}", folder, args.io_workers)[0])
    state = base / f"state-cold-{args.repeat - 1}"
    rescan, summary = min(
        (timed_scan(state, folder, args.io_workers) for _ in range(args.repeat)),
        key=lambda r: r[0],
    )
    assert summary.new == summary.changed == summary.deleted == 0, summary
    cold_best = min(cold)

    rows += [
        ("large file", f"{args.big_mib} MiB"),
        ("small files", f"{args.small} ({small_bytes / MiB:.1f} MiB)"),
        ("sha256sum", rate(big_bytes, sha256sum)),
        ("hashlib.sha256 loop, 1 MiB reads", rate(big_bytes, hashlib_loop)),
        ("blake3 loop, 1 MiB reads", rate(big_bytes, blake3_loop)),
        ("chunker.hash_file (large file)", rate(big_bytes, hash_file)),
        ("cold scan, large file alone", f"{cold_big:.2f} s = {rate(big_bytes, cold_big)}"),
        ("  ratio to sha256sum", f"{sha256sum / cold_big:.2f}"),
        ("  ratio to hashlib loop", f"{hashlib_loop / cold_big:.2f}"),
        ("  ratio to blake3 loop", f"{blake3_loop / cold_big:.2f}"),
        ("cold scan, whole folder", f"{cold_best:.2f} s = {rate(total, cold_best)}"),
        ("  ratio to sha256sum", f"{sha256sum / cold_best * total / big_bytes:.2f}"),
        ("  ratio to hashlib loop", f"{hashlib_loop / cold_best * total / big_bytes:.2f}"),
        ("  ratio to blake3 loop", f"{blake3_loop / cold_best * total / big_bytes:.2f}"),
        (f"unchanged rescan, {args.small + 1} files", f"{rescan:.3f} s"),
    ]
    shutil.rmtree(share)
    shutil.rmtree(big.parent)

    # --- folder 2: many empty-ish files ---------------------------------------------------
    many = base / "many"
    print(f"creating {args.many} empty-ish files …", file=sys.stderr)
    make_small(many, args.many, min_size=0, max_size=64)
    wait_out_racy_window()
    folder = FolderConfig(path=many, key=key)
    many_cold, _ = timed_scan(base / "state-many", folder, args.io_workers)
    many_rescan, summary = min(
        (timed_scan(base / "state-many", folder, args.io_workers) for _ in range(args.repeat)),
        key=lambda r: r[0],
    )
    assert summary.files == args.many, summary
    assert summary.new == summary.changed == summary.deleted == 0, summary
    rows += [
        (f"cold scan, {args.many} empty-ish files", f"{many_cold:.2f} s"),
        (f"unchanged rescan, {args.many} files", f"{many_rescan:.2f} s"),
    ]
    print_table(rows)


def timed_scan(
    state: Path, folder: FolderConfig, io_workers: int
) -> tuple[float, scanner.ScanSummary]:
    """One scan with the index in ``state`` (created if new): seconds and summary."""
    with Index.open(state / "index.db") as db:
        start = time.perf_counter()
        summary = asyncio.run(scanner.scan_folder(folder, db, ME, io_workers))
        return time.perf_counter() - start, summary


def make_big(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        left = size
        while left:
            piece = os.urandom(min(left, 64 * MiB))
            handle.write(piece)
            left -= len(piece)


def make_small(root: Path, count: int, min_size: int, max_size: int) -> int:
    """``count`` files in directories of 1,000; returns their total size."""
    pattern = os.urandom(max_size + 1)
    total = 0
    for i in range(count):
        directory = root / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            directory.mkdir(parents=True, exist_ok=True)
        size = min_size + (i * 7919) % (max_size - min_size + 1)
        (directory / f"f{i:06d}").write_bytes(pattern[i % 17 : i % 17 + size])
        total += size
    return total


def wait_out_racy_window() -> None:
    time.sleep(chunker.RACY_WINDOW_NS / 1e9 + 0.1)


def read_all(path: Path) -> None:
    with path.open("rb", buffering=0) as handle:
        while handle.read(8 * MiB):
            pass


def sha256sum_file(path: Path) -> None:
    subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, timeout=600)


def plain_loop(path: Path, new_hash: Callable[[], object]) -> None:
    h = new_hash()
    view = memoryview(bytearray(MiB))
    with open(path, "rb", buffering=0) as handle:
        assert isinstance(handle, io.FileIO)
        while count := handle.readinto(view):
            h.update(view[:count])  # type: ignore[attr-defined]
    h.digest()  # type: ignore[attr-defined]


def best(repeat: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e9:.2f} GB/s"


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
