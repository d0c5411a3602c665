"""What the LAN shares (``ls``) and fetching chosen paths now (``pull``), over a running engine.

Async, reads the index through threads; the sync decisions stay in the planner and engine.
It uses only the public side of ``FolderSync`` (``records``, ``want``, ``peers_listed`` …).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from lanshare.errors import TransferError
from lanshare.manifest import EntryType, FileRecord, Ordering
from lanshare.planner import conflict_original, global_winner

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
        theirs = by_path.get(rel, {})
        mine = local.get(rel)
        candidates = list(theirs.values()) + ([mine] if mine is not None else [])
        winner = global_winner(candidates)
        if winner.deleted and (mine is None or mine.deleted):
            continue
        shown = winner if not winner.deleted else mine
        assert shown is not None
        holders = sorted(
            peer.hex() for peer, r in theirs.items() if not r.deleted and _same(r, shown)
        )
        entries.append(
            {
                "folder": str(sync.root),
                "path": rel,
                "type": _TYPES[shown.type],
                "size": shown.size,
                "hash": f"{shown.hash_algo}:{shown.file_hash.hex()}" if shown.file_hash else "",
                "mtime_ns": shown.mtime_ns,
                "peers": holders,
                "state": _state(sync, rel, mine, winner, theirs, conflicted),
            }
        )
    return entries


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
    if not (_same(mine, winner) and not winner.deleted):
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


def _same(a: FileRecord, b: FileRecord) -> bool:
    return (a.type, a.file_hash, a.symlink_target, a.deleted) == (
        b.type,
        b.file_hash,
        b.symlink_target,
        b.deleted,
    )
