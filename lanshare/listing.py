"""What the LAN shares (``ls``), finding in it (``search``) and fetching chosen paths now
(``pull``), over a running engine.

Async, reads the index through threads; the sync decisions stay in the planner and engine.
It uses only the public side of ``FolderSync`` (``records``, ``want``, ``peers_listed`` …).
An entry names its holders (``search.holders``): the peers whose records hold the version
shown, and the connected peers downloading it now with how much of it they hold.
``search`` reads only what may match: the index narrows the paths in SQLite
(``Index.search_candidates``), ``lanshare.search`` matches and ranks them by path alone, and
the records of the best are read, a batch at a time, until ``limit`` entries pass the
filters (which apply to the version shown).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from typing import TYPE_CHECKING, Any

from lanshare import search
from lanshare.errors import TransferError
from lanshare.manifest import EntryType, FileRecord, Ordering
from lanshare.planner import CONFLICT_MARKER, conflict_original, global_winner
from lanshare.search import TYPES, Query, same_version

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from lanshare.control import Progress
    from lanshare.engine import Engine, FolderSync

logger = logging.getLogger(__name__)

PULL_POLL_INTERVAL = 0.2
NO_PEER_TIMEOUT = 10.0
"""Seconds ``pull`` waits for a first peer of the folder before it gives up."""

_TYPES = {EntryType.FILE: "file", EntryType.DIR: "dir", EntryType.SYMLINK: "symlink"}
SEARCH_BATCH = 200
"""Ranked paths whose records ``search`` reads at a time (at least ``limit``)."""


async def listing(engine: Engine, path: Path | None) -> list[dict[str, Any]]:
    """Every entry the LAN shares below ``path`` (every folder when None), with its state."""
    if path is None:
        targets = [(sync, "") for sync in engine.folders.values()]
    else:
        targets = [engine.folder_for(path)]
    out: list[dict[str, Any]] = []
    for sync, prefix in targets:
        out.extend(await _folder_listing(sync, prefix))
    return out


async def _folder_listing(sync: FolderSync, prefix: str) -> list[dict[str, Any]]:
    local, remotes = await asyncio.to_thread(sync.records)
    # A conflict copy held here and the file it belongs to both show as a conflict, until
    # the user deletes or renames the copy.
    conflicted: set[str] = set()
    for rel, record in local.items():
        original = None if record.deleted else conflict_original(rel)
        if original is not None:
            conflicted.update((rel, original))
    by_path: dict[str, dict[bytes, FileRecord]] = {}
    for peer, records in remotes.items():
        for rel, record in records.items():
            if _under(rel, prefix):
                by_path.setdefault(rel, {})[peer] = record
    entries = []
    for rel in sorted(set(by_path) | {p for p in local if _under(p, prefix)}):
        entry = _entry(sync, rel, local.get(rel), by_path.get(rel, {}), conflicted)
        if entry is not None:
            entries.append(entry)
    return entries


def _entry(
    sync: FolderSync,
    rel: str,
    mine: FileRecord | None,
    theirs: dict[bytes, FileRecord],
    conflicted: set[str],
) -> dict[str, Any] | None:
    """The ``ls`` entry of ``rel`` from this node's record and the peers', or None when it
    is deleted everywhere it is known."""
    candidates = list(theirs.values()) + ([mine] if mine is not None else [])
    winner = global_winner(candidates)
    if winner.deleted and (mine is None or mine.deleted):
        return None
    shown = winner if not winner.deleted else mine
    assert shown is not None
    peers = sorted(
        peer.hex() for peer, r in theirs.items() if not r.deleted and same_version(r, shown)
    )
    holders = search.holders(
        shown, theirs, sync.peers_building(rel), sync.peers_connected(), sync.engine.peer_names
    )
    return {
        "folder": str(sync.root),
        "path": rel,
        "type": _TYPES[shown.type],
        "size": shown.size,
        "hash": f"{shown.hash_algo}:{shown.file_hash.hex()}" if shown.file_hash else "",
        "mtime_ns": shown.mtime_ns,
        "peers": peers,
        "holders": holders,
        "state": _state(sync, rel, mine, winner, theirs, conflicted),
    }


async def search_lan(engine: Engine, query: Query, within: Path | None) -> list[dict[str, Any]]:
    """The best ``query.limit`` entries that ``query`` matches in what the LAN shares, in
    every folder (or at or below ``within``), best first: ``ls`` entries."""
    if within is None:
        targets = [(sync, "") for sync in engine.folders.values()]
    else:
        targets = [engine.folder_for(within)]
    per_folder = []
    for sync, prefix in targets:
        found = await asyncio.to_thread(_ranked, sync, query, prefix)
        per_folder.append([(rank, str(sync.root), sync) for rank in found])
    ranked = list(heapq.merge(*per_folder, key=lambda hit: (hit[0], hit[1])))
    hits: list[dict[str, Any]] = []
    conflicted: dict[int, set[str]] = {}
    step = max(SEARCH_BATCH, query.limit)
    for start in range(0, len(ranked), step):
        batch = ranked[start : start + step]
        by_folder: dict[int, tuple[FolderSync, list[str]]] = {}
        for rank, _, sync in batch:
            by_folder.setdefault(sync.info.id, (sync, []))[1].append(rank[3])
        read = {}
        for folder, (sync, paths) in by_folder.items():
            read[folder] = await asyncio.to_thread(_records_of, sync, paths)
            if folder not in conflicted:
                conflicted[folder] = await asyncio.to_thread(_conflicted, sync)
        for rank, _, sync in batch:
            local, remotes = read[sync.info.id]
            rel = rank[3]
            entry = _entry(
                sync, rel, local.get(rel), remotes.get(rel, {}), conflicted[sync.info.id]
            )
            if entry is not None and query.accepts(TYPES[entry["type"]], entry["size"]):
                hits.append(entry)
                if len(hits) == query.limit:
                    return hits
    return hits


def _ranked(sync: FolderSync, query: Query, prefix: str) -> list[tuple[int, int, int, str]]:
    """The ranks of the paths of the folder at or below ``prefix`` that ``query`` matches,
    best first. Blocking (a broad query ranks many paths: off the loop)."""
    found = sync.engine.index.search_candidates(
        sync.info.id,
        query.fragments(),
        below=prefix,
        entry_type=query.type,
        min_size=query.min_size,
        max_size=query.max_size,
    )
    ranks = (query.rank(path, is_dir) for path, is_dir in found.items())
    return sorted(rank for rank in ranks if rank is not None)


def _records_of(
    sync: FolderSync, paths: list[str]
) -> tuple[dict[str, FileRecord], dict[str, dict[bytes, FileRecord]]]:
    """This node's records of ``paths`` and every peer's, by path. Blocking."""
    index = sync.engine.index
    local = index.get_many(sync.info.id, paths)
    remotes: dict[str, dict[bytes, FileRecord]] = {}
    for peer, records in index.remote_records_of(sync.info.id, paths).items():
        for rel, record in records.items():
            remotes.setdefault(rel, {})[peer] = record
    return local, remotes


def _conflicted(sync: FolderSync) -> set[str]:
    """The conflict copies held here and the paths they belong to (``ls``'s ``conflict``
    state). Blocking."""
    out: set[str] = set()
    for rel in sync.engine.index.live_paths_containing(sync.info.id, CONFLICT_MARKER):
        original = conflict_original(rel)
        if original is not None:
            out.update((rel, original))
    return out


def _state(
    sync: FolderSync,
    rel: str,
    mine: FileRecord | None,
    winner: FileRecord,
    theirs: dict[bytes, FileRecord],
    conflicted: set[str],
) -> str:
    if sync.rules.matches(rel, winner.type is EntryType.DIR):
        return "ignored"
    # A conflict copy and the file it belongs to show as a conflict while both are here and
    # current: the user has to decide (delete or rename the copy).
    if not theirs:
        return "conflict" if rel in conflicted else "local_only"
    if mine is None or mine.deleted:
        return "missing"
    if not (same_version(mine, winner) and not winner.deleted):
        concurrent = mine.version.compare(winner.version) is Ordering.CONCURRENT
        return "conflict" if concurrent else "outdated"
    return "conflict" if rel in conflicted else "in_sync"


async def pull(
    engine: Engine,
    paths: Sequence[Path],
    progress: Progress,
) -> list[dict[str, Any]]:
    """Fetch ``paths`` first, reporting progress, until every one is present and verified.

    Raises:
        UsageError: a path is outside every folder (from ``Engine.folder_for``).
        TransferError: no peer has a path. Bound the wait with ``asyncio.timeout``.
        DiskFullError: the folder's disk is full (its pulls are paused).
    """
    targets = [engine.folder_for(p) for p in paths]
    # Paths that failed before this pull are tried again now; the pull ends with the reason
    # only when one fails again (or a new one fails), not on an old failure since fixed.
    failed_before: dict[int, dict[str, int]] = {}
    for sync, rel in targets:
        failed_before.setdefault(sync.info.id, {}).update(sync.want(rel))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while True:
            rows, waiting, unknown = await _pull_state(targets)
            if not waiting and not unknown:
                return rows
            for sync, prefix in targets:
                # A path it wants failed here during the pull (a directory not writable,
                # other content in the way), or its folder cannot be synced at all.
                problem = sync.pull_problem(
                    prefix, failed_before[sync.info.id], waiting=bool(waiting)
                )
                if problem is not None:
                    raise problem
            elapsed = loop.time() - started
            if unknown:
                _check_findable(targets, unknown, elapsed)
            await progress({"files": rows})
            await asyncio.sleep(PULL_POLL_INTERVAL)
    finally:
        for sync, rel in targets:
            sync.unwant(rel)


async def _pull_state(
    targets: list[tuple[FolderSync, str]],
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    rows: list[dict[str, Any]] = []
    waiting: list[str] = []
    unknown: list[str] = []
    for sync, prefix in targets:
        entries = [e for e in await _folder_listing(sync, prefix) if e["type"] == "file"]
        shown = str(sync.root / prefix) if prefix else str(sync.root)
        if not entries:
            local = await asyncio.to_thread(sync.engine.index.get, sync.info.id, prefix)
            if prefix and local is not None and not local.deleted:
                continue  # a directory or file already here and known to nobody else
            unknown.append(shown)
            continue
        for entry in entries:
            fetched = sync.bytes_fetched(entry["path"])
            done = entry["size"] if entry["state"] == "in_sync" else 0
            if fetched is not None:
                done = fetched
            state = entry["state"]
            if state in ("missing", "outdated") and fetched is not None:
                state = "downloading"
            if state not in ("in_sync", "local_only", "ignored", "conflict"):
                waiting.append(f"{sync.root}/{entry['path']}")
            rows.append(
                {
                    "path": f"{sync.root}/{entry['path']}",
                    "state": state,
                    "bytes": done,
                    "size": entry["size"],
                }
            )
    return rows, waiting, unknown


def _check_findable(
    targets: list[tuple[FolderSync, str]], unknown: list[str], elapsed: float
) -> None:
    for sync, _ in targets:
        peers, idle = sync.peers_listed()
        if not peers and elapsed > NO_PEER_TIMEOUT:
            raise TransferError(
                f"no peer sharing {sync.root} was found; is another machine running lanshare "
                "with this folder's key?"
            )
        if peers and idle and elapsed > 1.0:
            raise TransferError(f"no peer has {', '.join(unknown)}")


def _under(rel: str, prefix: str) -> bool:
    return not prefix or rel == prefix or rel.startswith(prefix + "/")
