"""Search benchmark: ``lanshare search`` over a large index, beside a plain SQL ``LIKE``.

Builds, under a temporary directory removed at exit, a real SQLite index (the ``Index`` API:
``commit_changes`` for this node's records, ``remote_upsert`` for peers') of ``--records``
paths (default 100,000: photos, source trees, documents, music, in directories of 100),
held here and by each of ``--peers`` peers (default 1). A real ``Engine`` over that index
(no network: ``tests.enginesim``'s idle node, what a daemon answers ``search`` with)
then runs ``listing.search_lan`` — the daemon's own ``search``: candidates narrowed in
SQLite, matched and ranked, the best hits' records read, states and holders — for a few
queries, each timed as the best of ``--repeat`` runs. The reference, in the same run over
the same index: a plain ``SELECT DISTINCT path … WHERE path LIKE '%…%'`` over this node's
and the peers' records, for the same literal pieces (``LIKE`` folds ASCII only, and does
no glob, rank or record: it is what SQLite alone costs to look at every path once).

Figures from a shared machine are noisy: read them as diagnostics.

Usage: ``python bench/search.py [--records 100000] [--peers 1] [--repeat 5] [--limit 100]``
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanshare.index import LocalChange
from lanshare.listing import search_lan
from lanshare.manifest import Block, EntryType, FileRecord, VersionVector
from lanshare.search import Query
from tests.enginesim import Cluster

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from lanshare.index import Index

QUERIES = (
    ["img_04240"],  # one photo
    ["2024", "beach"],  # two words, a few hundred hits
    ["*.py"],  # a glob matching a quarter of the records
    ["projects/**/module_7*.py"],  # an anchored glob crossing directories
    ["Annual Report"],  # a phrase with a space and capitals
    ["nothing-is-called-this"],  # a miss
)
KINDS = (
    ("photos/{year}/{place}", "IMG_{i:05d}.jpg"),
    ("projects/p{group}/src/pkg{sub}", "module_{i}.py"),
    ("docs/{year}", "Annual Report {i}.pdf"),
    ("music/artist {group}", "track {i} - {place}.mp3"),
)
PLACES = ("beach", "city", "mountains", "home")


def make_records(count: int) -> list[FileRecord]:
    """``count`` file records (and the directories holding them), paths of several kinds."""
    records: dict[str, FileRecord] = {}
    version = VersionVector().bump(1)
    for i in range(count):
        directory, name = KINDS[i % len(KINDS)]
        fields = {
            "i": i,
            "year": 2018 + i % 7,
            "place": PLACES[(i // 4) % len(PLACES)],
            "group": i // 1000,
            "sub": (i // 100) % 10,
        }
        folder = directory.format(**fields)
        parts = folder.split("/")
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel not in records:
                records[rel] = FileRecord(
                    path=rel, type=EntryType.DIR, size=0, mtime_ns=1, mode=0o755, version=version
                )
        rel = f"{folder}/{name.format(**fields)}"
        digest = hashlib.blake2b(rel.encode(), digest_size=32).digest()
        size = 1000 + i % 5000
        records[rel] = FileRecord(
            path=rel,
            type=EntryType.FILE,
            size=size,
            mtime_ns=1,
            mode=0o644,
            blocks=(Block(0, size, digest),),
            file_hash=digest,
            hash_algo="blake3",
            version=version,
        )
    return list(records.values())


def plain_like(index: Index, folder: int, pieces: list[str]) -> int:
    """How many paths of this node's and the peers' records contain every piece (``LIKE``)."""
    connection = sqlite3.connect(f"file:{index.path}?mode=ro", uri=True)
    try:
        likes = " AND ".join("path LIKE ?" for _ in pieces) or "1"
        patterns = [f"%{p}%" for p in pieces]
        rows = connection.execute(
            f"SELECT DISTINCT path FROM (SELECT path FROM local_files WHERE folder = ? AND "
            f"{likes} UNION ALL SELECT path FROM remote_files WHERE folder = ? AND {likes})",
            (folder, *patterns, folder, *patterns),
        ).fetchall()
    finally:
        connection.close()
    return len(rows)


async def best(repeat: int, work: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await work()
        times.append(time.perf_counter() - started)
    return min(times)


async def run(base: Path, args: argparse.Namespace) -> None:
    async with Cluster(base, seed=7) as cluster:
        node = cluster.add()
        await node.start_idle()
        assert node.engine is not None
        index = node.engine.index
        folder = node.folder.info.id
        records = make_records(args.records)
        print(f"building an index of {len(records)} records …", file=sys.stderr)
        started = time.perf_counter()
        await asyncio.to_thread(index.commit_changes, folder, [LocalChange(r) for r in records])
        for p in range(args.peers):
            peer = bytes([0xA0 + p]) * 8
            index.remote_reset(folder, peer, peer)
            numbered = [dataclasses.replace(r, sequence=i + 1) for i, r in enumerate(records)]
            await asyncio.to_thread(index.remote_upsert, folder, peer, numbered)
            node.engine.peer_names[peer] = f"peer-{p}"
        built = time.perf_counter() - started
        engine = node.engine
        print(
            f"index: {len(records)} records here, the same held by {args.peers} peer(s) "
            f"({len(records) * (1 + args.peers)} rows), built in {built:.1f} s"
        )
        print(f"{'query':<28} {'hits':>7} {'search':>10} {'LIKE':>10} {'ratio':>7}")
        for terms in QUERIES:
            query = Query.parse(terms, limit=args.limit)
            hits = await search_lan(engine, query, None)
            searched = await best(args.repeat, lambda q=query: search_lan(engine, q, None))
            pieces = query.fragments()
            count = plain_like(index, folder, pieces)
            liked = await best(
                args.repeat, lambda p=pieces: asyncio.to_thread(plain_like, index, folder, p)
            )
            shown = " ".join(terms)
            print(
                f"{shown:<28} {len(hits):>7} {searched * 1000:>8.1f} ms {liked * 1000:>7.1f} ms "
                f"{searched / liked:>6.2f}x   (LIKE: {count} paths)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="files in the index")
    parser.add_argument("--peers", type=int, default=1, help="peers holding the same records")
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (best kept)")
    parser.add_argument("--limit", type=int, default=100, help="search's --limit")
    args = parser.parse_args()
    if args.records < 1 or args.peers < 0 or args.repeat < 1 or args.limit < 1:
        parser.error("--records, --repeat and --limit must be at least 1, --peers at least 0")
    base = Path(tempfile.mkdtemp(prefix="lanshare-bench-search-"))
    try:
        asyncio.run(run(base, args))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
