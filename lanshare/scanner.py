"""Incremental scan of one shared folder into the index: walk, hash what changed, record it.

Does I/O: walks and hashes in threads (``asyncio.to_thread``), writes through ``index.Index``.

Theory of operation
-------------------
1. **Walk** (one thread, ``os.scandir``, never following a symlink): regular files,
   directories (empty ones too) and symlinks, recorded as links with their target. Skipped:
   the internal ``.lanshare/`` folder, temporary files, ignored paths (``IgnoreRules``; an
   ignored directory is not entered), other file types (FIFOs, sockets, devices), and names
   that ``paths.normalize`` refuses or that are not already in its form (a non-NFC name on
   disk could not be found again under its normalised name) — those are reported, never fatal.
2. **Compare** with the scan cache (one query for the whole folder, read before the walk,
   and compared as the walk goes: a file found unchanged is counted and dropped at once, so a
   big folder at rest is never held in memory twice, nor as a list of what the walk found).
   A regular file whose size, mtime_ns, inode and ctime_ns equal the cached ones is *not
   read*. Directories change only with their permission bits (their mtime moves with every
   entry inside), symlinks only with their target.
3. **Hash** the rest, in groups of small files or one big file per ``to_thread`` call, at most
   ``io_workers`` at a time; with fewer groups than that, each group's share of the workers
   hashes the blocks of its big files (``chunker.hash_file``'s ``workers``).
   ``chunker.hash_file`` compares ``fstat`` before and after the read; a file that changed
   while it was read is read again (at most :data:`MAX_HASH_ATTEMPTS` times, then left for
   the next scan), so a reading that mixes
   two versions is never recorded. The stat cannot see everything: the kernel stamps mtime
   when a write *starts*, within a coarse clock tick, and a large write may stall half done.
   So a file whose mtime lies within ``chunker.RACY_WINDOW_NS`` of the read is read twice
   and kept only if both readings agree (the bytes were really there, unchanged), and its
   cache is stored as untrusted, so the next scan (the watcher's event at the end of the
   write triggers one) reads it again (git's "racily clean" rule). A file at rest is read once.
4. **Record**, in transactions of up to :data:`COMMIT_BATCH` paths. Inside each transaction the
   full old record is re-read: unchanged content only refreshes the cache; a new or changed
   entry gets its version vector bumped with this node's short id and a new sequence number;
   a vanished one becomes a tombstone. Paths that exist but could not be read (permission
   denied, unreadable directory, changed too often) keep their old record: a read error never
   turns into a deletion on the other peers. A change whose version cannot be bumped (a
   counter at its limit, in a record stored before peers' vectors were bounded: see
   ``manifest.MAX_PEER_COUNTER``) is left out and reported as *unrecordable*, for that path
   alone: the rest of the batch is recorded. Vanished entries that, with the folder's recent
   deletions, trip the mass-deletion guard (``deleteguard``) are all kept until confirmed.
5. **Fetch only.** A node that only fetches (a short-lived ``ls`` or ``pull``) announces no
   change of its own: a path it no longer finds, or finds changed, is *not held here*
   (``Index.forget``: no tombstone, no new version), and a path it never recorded stays
   unrecorded, unless it holds the content of the peers' current version of it: then it is
   recorded as that version, as if it had been fetched (under no version at all when its
   mode or mtime differ, so that the peers' metadata wins). Peers keep their copies; this
   node fetches a path again when it wants it.
6. **Lost track.** A file recorded for the first time whose path the peers hold in versions
   that carry this node's counter (its record was forgotten, or the index or the folder
   was restored) and whose content differs from theirs has no known place in the history:
   it is not recorded but reported as an *orphan*, with a conflict name to keep it under
   beside the LAN's version (the engine moves it there).

Case-fold collisions (``a.txt`` and ``A.TXT``) are kept on this disk and reported, since a
case-insensitive peer could not hold both.

**Scanning some paths** (``only``, a watcher's batch) is the same scan on a smaller tree: each
named path that exists is read with everything below it (a directory created or moved in
brings its subtree), each ancestor is read alone (its metadata), and the directory of a path
that vanished is listed (not what is below its entries: an ``rm`` of many files reaches the
scanner in several batches, and the mass-deletion guard must see at once all it did there).
The records compared are those of the named paths, everything the index holds below them,
the ancestors and the entries of those directories; so a path that vanished takes every
record below it along. Ignore rules, unreadable paths,
fetch-only, orphans and the mass-deletion guard (judged against the whole folder's live
records) work as in a full scan; case-fold collisions are checked among the paths read.
Nothing else of the folder is listed, stat'ed or loaded from the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import stat
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from lanshare import chunker, deleteguard, keys, marker, paths
from lanshare.errors import LanshareError, PathError, StorageError
from lanshare.ignore import FolderRules, IgnoreRules
from lanshare.index import CacheUpdate, LocalChange
from lanshare.manifest import (
    MAX_SYMLINK_TARGET_SIZE,
    EntryType,
    FileRecord,
    VersionVector,
)
from lanshare.planner import conflict_name, global_winner
from lanshare.store import DIR_MODE, FILE_MODE, applied_mode

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence

    from lanshare.chunker import FileHashes
    from lanshare.config import FolderConfig
    from lanshare.deleteguard import Deletion, Verdict
    from lanshare.index import CacheEntry, Index

logger = logging.getLogger(__name__)

HashFile: TypeAlias = "Callable[[Path], FileHashes]"
"""The hashing function the scanner calls (``chunker.hash_file`` unless one is passed in)."""

MAX_HASH_ATTEMPTS = 3
"""Readings of a file that keeps changing before the scan leaves it for the next one."""

COMMIT_BATCH = 4096
"""Paths per index transaction: large enough to be cheap, small enough that a long cold scan
keeps its progress if it is interrupted."""

COMMIT_INTERVAL = 0.05
"""Seconds of hashing after which a scan that reports its progress records what it hashed
so far, however little: peers fetch the first files of a big change while the rest is read."""

GROUP_FILES = 128
"""Most files hashed in one thread hand-off (thread dispatch costs ~50 µs; a small file less)."""

GROUP_BYTES = 16 * 1024 * 1024
"""Most bytes in one group of files; a larger file is a group of its own."""

PERMISSION_BITS = 0o777
"""The mode bits recorded and synced; set-id and sticky bits are not."""

MAX_LOGGED_PROBLEMS = 100
"""Problems logged (and kept in the summary) one by one per scan; the rest are counted."""


@dataclass(frozen=True, slots=True)
class ScanSummary:
    """What a scan found and did. The first nine fields are the ``lanshare scan --json`` keys."""

    path: str
    files: int
    """Regular files in the index after the scan (unreadable ones not counted)."""
    dirs: int
    bytes: int
    """Total size of those files."""
    blocks: int
    """Total number of blocks of those files."""
    new: int
    """Entries recorded for the first time (or again after a tombstone)."""
    changed: int
    deleted: int
    """Tombstones written by this scan."""
    seconds: float
    symlinks: int = 0
    skipped: int = 0
    """Paths left out: bad names, unreadable, changed while read, unsupported types."""
    problems: tuple[str, ...] = ()
    """The first MAX_LOGGED_PROBLEMS problems, one line each."""
    collisions: tuple[tuple[str, str], ...] = ()
    """Pairs of paths that differ only in case (see ``paths.casefold_collisions``)."""
    withheld: int = 0
    """Deletions not recorded because they tripped the mass-deletion guard."""
    paused_reason: str = ""
    """Why deletions were withheld (empty when none were)."""
    verdict: Verdict | None = None
    """The guard's verdict when deletions were withheld (``paused_reason`` is its text)."""
    deletion: Deletion | None = None
    """The tombstones this scan wrote, as an entry of the guard's history (None if none)."""
    forgotten: int = 0
    """Records dropped as not held here (a fetch-only scan; see ``Index.forget``)."""
    orphans: tuple[tuple[str, str], ...] = ()
    """Files this node lost track of, holding other content than the LAN's version (see
    ``_Run._lost_track``): not recorded; each with the conflict name to move it to."""
    unrecordable: tuple[tuple[str, str], ...] = ()
    """Paths found changed whose change could not be recorded, and why (also in
    ``problems``, and counted in ``skipped``)."""
    looked_at: Callable[[str], bool] = field(default=lambda _rel: True, compare=False)
    """Whether this scan compared the path's record with the disk (a scan of some paths
    looks at those alone)."""

    def still_unrecordable(self, before: Mapping[str, str]) -> dict[str, str]:
        """The unrecordable paths after this scan, given those before it: a path this scan
        looked at is one only if it still is."""
        kept = {rel: why for rel, why in before.items() if not self.looked_at(rel)}
        kept.update(self.unrecordable)
        return kept

    def as_json(self) -> dict[str, object]:
        """The summary as a JSON-ready mapping."""
        return {
            "path": self.path,
            "files": self.files,
            "dirs": self.dirs,
            "bytes": self.bytes,
            "blocks": self.blocks,
            "new": self.new,
            "changed": self.changed,
            "deleted": self.deleted,
            "seconds": round(self.seconds, 3),
            "symlinks": self.symlinks,
            "skipped": self.skipped,
            "problems": list(self.problems),
            "collisions": [list(pair) for pair in self.collisions],
        }


async def scan_folder(
    folder: FolderConfig,
    index: Index,
    short_id: int,
    io_workers: int = 4,
    *,
    hash_file: HashFile | None = None,
    limit: asyncio.Semaphore | None = None,
    limits: deleteguard.Limits = deleteguard.DEFAULT_LIMITS,
) -> ScanSummary:
    """Scan a configured folder into ``index`` (adding the folder to it if new).

    This is ``lanshare scan`` with no daemon: its deletions are judged by the mass-deletion
    guard with ``limits`` and the folder's deletion history, and added to that history,
    exactly as a daemon's scan would (a wipe made of offline scans is no way around it).

    Args:
        folder: the folder's config (path, key, extra ignore patterns).
        index: the open index.
        short_id: this node's ``identity.short_id``, bumped in changed version vectors.
        io_workers: most files hashed at once.
        hash_file: the hashing function (default ``chunker.hash_file``).
        limit: a semaphore shared with other disk work, instead of one of ``io_workers``.
        limits: the mass-deletion guard's settings (the config's ``[sync]`` keys).

    Raises:
        StorageError: the folder root is missing or unreadable, its marker is missing (see
            ``marker.check``: nothing is recorded), or the index failed.
        KeyFormatError: the folder's key in the config is invalid.
    """
    folder_id = keys.folder_id(keys.parse_key(folder.key))
    info = await asyncio.to_thread(index.add_folder, folder.path, folder_id.hex())
    root = Path(folder.path)
    if await asyncio.to_thread(root.is_dir):  # else the walk says what is wrong
        reason = await asyncio.to_thread(
            marker.check, root, folder_id, lambda: index.held_names(info.id)
        )
        if reason:
            raise StorageError(f"cannot scan {root}: {reason}")
    # A folder gone back to an earlier state (a backup restored) is only read, as a daemon
    # would: recording it would push its older contents and deletions to every peer.
    restored = await asyncio.to_thread(
        marker.restored_from, root, folder_id, info.index_id, info.sequence
    )
    if restored is not None:
        raise StorageError(
            f"cannot scan {root}: it holds an earlier state than its index (change "
            f"{restored}, not {info.sequence}: a backup restored?); start the daemon, which "
            "fetches what is missing or newer and keeps older contents beside it"
        )
    summary = await scan_guarded(
        index,
        info.id,
        root,
        short_id,
        limits=limits,
        ignore=folder.ignore,
        io_workers=io_workers,
        hash_file=hash_file,
        limit=limit,
    )
    if summary.orphans:
        logger.warning(
            "%s: %d file(s) differ from the LAN's version and their history here was lost "
            "(a restore?); not recorded: the daemon keeps them as conflict copies",
            root,
            len(summary.orphans),
        )
    await asyncio.to_thread(_stamp, index, info.id, root, folder_id)
    return summary


async def scan_guarded(
    index: Index,
    folder: int,
    root: Path,
    short_id: int,
    *,
    limits: deleteguard.Limits,
    allow_mass_delete: bool = False,
    held_by_peers: bool | None = None,
    ignore: Sequence[str] = (),
    rules: FolderRules | None = None,
    only: Collection[str] | None = None,
    io_workers: int = 4,
    hash_file: HashFile | None = None,
    limit: asyncio.Semaphore | None = None,
    fetch_only: bool = False,
    now: float | None = None,
    progress: Callable[[Sequence[str]], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ScanSummary:
    """:func:`scan_path` judged by the folder's deletion history, kept in the index: read
    before, and after it the deletions made added (or, ``allow_mass_delete``: the user
    confirmed, the history cleared) and the guard's hold kept (see ``deleteguard``).

    ``held_by_peers``: whether a plan holds back deletions that came from peers, which
    keeps the hold too; None when the caller cannot tell (no daemon): the hold is then only
    ever set, never dropped. ``now``: the wall-clock time of the scan, from the caller's
    clock (None: the system's). The other arguments are :func:`scan_path`'s.
    """
    history = await asyncio.to_thread(index.deletions, folder)
    held = await asyncio.to_thread(index.deletions_held_since, folder)
    # While the guard holds deletions back it judges as of the moment it tripped, and sees
    # the whole folder: the deletions it withholds are in no history, so a scan of a few
    # paths would judge later batches of the same wipe alone (and drop the hold).
    now = held if held is not None else now if now is not None else time.time()
    if held is not None:
        only = None
    summary = await scan_path(
        index,
        folder,
        root,
        short_id,
        limits=limits,
        delete_history=history,
        now=now,
        allow_mass_delete=allow_mass_delete,
        ignore=ignore,
        rules=rules,
        only=only,
        io_workers=io_workers,
        hash_file=hash_file,
        limit=limit,
        fetch_only=fetch_only,
        progress=progress,
        clock=clock,
    )
    if allow_mass_delete:
        await asyncio.to_thread(index.deletions_clear, folder)
        return summary
    if summary.deletion is not None:
        await asyncio.to_thread(index.deletions_record, folder, [summary.deletion], limits.window)
    holding = summary.verdict is not None or bool(held_by_peers)
    if holding != (held is not None) and (holding or held_by_peers is not None):
        await asyncio.to_thread(index.deletions_hold, folder, now if holding else None)
    return summary


async def scan_path(
    index: Index,
    folder: int,
    root: Path,
    short_id: int,
    *,
    ignore: Sequence[str] = (),
    rules: FolderRules | None = None,
    only: Collection[str] | None = None,
    io_workers: int = 4,
    hash_file: HashFile | None = None,
    limit: asyncio.Semaphore | None = None,
    limits: deleteguard.Limits = deleteguard.DEFAULT_LIMITS,
    delete_history: Sequence[Deletion] = (),
    now: float = 0.0,
    allow_mass_delete: bool = False,
    fetch_only: bool = False,
    progress: Callable[[Sequence[str]], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ScanSummary:
    """Scan the tree at ``root`` into the index's folder ``folder`` (a row id).

    See :func:`scan_folder` for the arguments; ``ignore`` are the config's extra patterns,
    or ``rules`` the folder's live rules (the caller reloads them), used as they are.
    ``only``: scan just these paths, relative to ``root`` and as named on disk (a watcher's
    batch), with what they imply (see the module docstring); None: the whole tree.
    Vanished entries that would trip the mass-deletion guard (``deleteguard.judge`` with
    ``limits``, the folder's recent ``delete_history`` and the wall-clock time ``now``) are
    not turned into tombstones unless ``allow_mass_delete``: the summary's ``verdict`` says
    why, and the records stay. The summary's ``deletion`` is what the caller adds to the
    history.
    ``fetch_only``: record no change of this node's own (see the module docstring, step 5).
    ``progress``: awaited with the paths compared whenever part of the changes found was
    recorded before the scan's end (at most every :data:`COMMIT_INTERVAL` seconds of
    ``clock``), so the caller can tell peers while the rest is hashed; without it, changes
    are recorded in big transactions.
    """
    started = clock()
    hasher: HashFile = hash_file if hash_file is not None else chunker.hash_file
    current = (
        rules.rules
        if rules is not None
        else await asyncio.to_thread(IgnoreRules.for_folder, root, ignore)
    )
    if only is None:
        # The cache first, so that the walk keeps only what changed: a file at rest leaves
        # the cache as the walk finds it, and nothing of it is kept but its name.
        cache = await asyncio.to_thread(index.scan_cache, folder)
        live = sum(1 for old in cache.values() if not old.deleted)
        walk = await asyncio.to_thread(_walk, root, current, cache)
        in_scope: Callable[[str], bool] = _everywhere
    else:
        walk = await asyncio.to_thread(_walk_paths, root, current, only)
        cache = await asyncio.to_thread(
            index.scan_cache, folder, walk.singles, walk.trees, walk.levels
        )
        live = await asyncio.to_thread(index.live_count, folder)
        in_scope = walk.in_scope
    peers = await asyncio.to_thread(index.remote_peers, folder)
    run = _Run(index, folder, short_id, walk, fetch_only=fetch_only, has_peers=bool(peers))
    if only is not None:
        run.looked_at = lambda rel: in_scope(rel) or rel in walk.singles
    if fetch_only:
        unrecorded = [
            e.rel for e in walk.entries if e.type is EntryType.FILE and e.rel not in cache
        ]
        run.theirs = await asyncio.to_thread(_peer_files, index, folder, unrecorded)

    # Each record found on disk leaves the cache: what is left was not found. The walk's
    # entries go as they are compared, so the two views of the folder shrink together.
    entries, walk.entries = walk.entries, []
    entries.reverse()
    to_hash: list[_Entry] = []
    while entries:
        entry = entries.pop()
        old = cache.pop(entry.rel, None)
        if fetch_only and (old is None or old.deleted) and entry.rel not in run.theirs:
            continue  # recording it would be a new version of ours, which this node never makes
        if entry.type is EntryType.FILE:
            if old is not None and _cache_hit(entry, old):
                run.count_file(old.size, old.block_count)
            else:
                to_hash.append(entry)
        else:
            run.count_other(entry.type)
            if old is None or _other_changed(entry, old):
                run.pending.append(_observed_other(entry))
    for rel, old in cache.items():
        if not old.deleted and in_scope(rel) and not walk.is_protected(rel):
            run.gone.append(rel)
    del cache
    if fetch_only:
        run.forget, run.gone = run.gone, []
    verdict = None
    if not allow_mass_delete:
        pending = {deleteguard.LOCAL: len(run.gone)}
        verdict = deleteguard.judge(delete_history, pending, live, now, limits)
    if verdict is not None:
        logger.warning("%s: %s", root, verdict.reason())
        run.withheld, run.verdict = len(run.gone), verdict
        run.gone = []

    groups = _groups(to_hash)
    if hash_file is None and 0 < len(groups) < io_workers:
        # Fewer groups than workers (one big new file, typically): the idle workers' share
        # hashes the blocks of each group's files, io_workers threads in all.
        hasher = partial(chunker.hash_file, workers=io_workers // len(groups))
    pending_groups = iter(groups)
    semaphore = limit if limit is not None else asyncio.Semaphore(max(1, io_workers))

    last_commit = clock()

    async def worker() -> None:
        nonlocal last_commit
        for group in pending_groups:  # shared iterator: each group goes to one worker
            async with semaphore:
                outcomes = await asyncio.to_thread(_hash_group, root, group, hasher)
            for outcome in outcomes:
                run.take(outcome)
            waiting = len(run.pending) + len(run.gone)
            due = progress is not None and clock() - last_commit >= COMMIT_INTERVAL
            if waiting >= COMMIT_BATCH or (waiting and due):
                last_commit = clock()
                recorded = run.recorded
                compared = await run.flush()
                if progress is not None and run.recorded > recorded:
                    await progress(compared)

    try:
        async with asyncio.TaskGroup() as tasks:
            for _ in range(min(max(1, io_workers), len(groups))):
                tasks.create_task(worker())
    except ExceptionGroup as group:
        # A worker's commit failed (the index): that error is the scan's, one line for the
        # user, not a group of one (the other workers were only cancelled by it).
        failures = group.exceptions
        if not all(isinstance(exc, LanshareError) for exc in failures):
            raise
        first = failures[0]
        raise first from first.__cause__
    await run.flush()

    summary = run.summary(str(root), clock() - started)
    if summary.deleted:
        made = deleteguard.Deletion(now, deleteguard.LOCAL, summary.deleted, live)
        summary = replace(summary, deletion=made)
    logger.info(
        "scanned %s%s: %d files, %d dirs, %d bytes; %d new, %d changed, %d deleted, "
        "%d skipped (%.2f s)",
        summary.path,
        "" if only is None else f" ({len(only)} paths)",
        summary.files,
        summary.dirs,
        summary.bytes,
        summary.new,
        summary.changed,
        summary.deleted,
        summary.skipped,
        summary.seconds,
    )
    return summary


# --- private ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One path as the walk saw it (lstat)."""

    rel: str
    type: EntryType
    mode: int
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    target: str = ""


@dataclass(frozen=True, slots=True)
class _Observed:
    """The current state of one path, ready to compare with its record."""

    rel: str
    type: EntryType
    mode: int
    mtime_ns: int
    size: int = 0
    target: str = ""
    hashes: FileHashes | None = None
    inode: int = 0
    ctime_ns: int = 0  # 0: do not trust the cache (racy)


@dataclass(frozen=True, slots=True)
class _Problem:
    rel: str
    message: str


@dataclass(slots=True)
class _Walk:
    cache: dict[str, CacheEntry] | None = None
    """A full scan's cache: a file it says is unchanged is taken out of it and counted,
    not kept in ``entries``."""
    entries: list[_Entry] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    """Every path found, kept or not (for the case-fold check)."""
    unchanged: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Files found unchanged by the cache: how many, their bytes and their blocks."""
    protected: set[str] = field(default_factory=set)
    """Paths that exist but were not scanned (with everything below them): never tombstoned."""
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    collisions: list[tuple[str, str]] = field(default_factory=list)
    trees: set[str] = field(default_factory=set)
    """A walk of some paths: those whose records, and everything below them, are compared."""
    singles: set[str] = field(default_factory=set)
    """A walk of some paths: ancestors, whose own records alone are compared."""
    levels: set[str] = field(default_factory=set)
    """A walk of some paths: directories ('' the root) whose entries' records are compared."""

    def unchanged_file(self, rel: str, st: os.stat_result, mode: int) -> bool:
        """Whether the cache says the regular file ``rel`` (its lstat ``st``) is unchanged:
        it is then counted and leaves the cache, and the walk keeps nothing of it."""
        old = self.cache.get(rel) if self.cache is not None else None
        if old is None or not _unchanged(
            old, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, mode
        ):
            return False
        assert self.cache is not None
        del self.cache[rel]
        self.unchanged[0] += 1
        self.unchanged[1] += old.size
        self.unchanged[2] += old.block_count
        return True

    def in_scope(self, rel: str) -> bool:
        """Whether a record of ``rel`` not found by this walk is gone."""
        return rel.rpartition("/")[0] in self.levels or self.in_trees(rel)

    def in_trees(self, rel: str) -> bool:
        return _at_or_under(rel, self.trees)

    def is_protected(self, rel: str) -> bool:
        return bool(self.protected) and _at_or_under(rel, self.protected)

    def problem(self, message: str) -> None:
        self.skipped += 1
        if len(self.problems) < MAX_LOGGED_PROBLEMS:
            self.problems.append(message)


class _Run:
    """The state of one scan on the event loop: counts, problems, changes waiting for a commit."""

    def __init__(
        self,
        index: Index,
        folder: int,
        short_id: int,
        walk: _Walk,
        *,
        fetch_only: bool = False,
        has_peers: bool = False,
    ) -> None:
        self.index = index
        self.folder = folder
        self.short_id = short_id
        self.pending: list[_Observed] = []
        self.gone: list[str] = []
        self.fetch_only = fetch_only
        self.forget: list[str] = []
        """Paths not held here any more (fetch only): forgotten, never tombstoned."""
        self.theirs: dict[str, list[FileRecord]] = {}
        """Peers' records of files found here but never recorded, where the peers' current
        version is a file (fetch only)."""
        self.forgotten = 0
        self.has_peers = has_peers
        self.orphans: list[tuple[str, str]] = []
        """Files this node lost track of, not recorded, with the names to keep them under."""
        self.unrecordable: list[_Problem] = []
        self.looked_at: Callable[[str], bool] = _everywhere
        self.files, self.bytes, self.blocks = walk.unchanged
        self.dirs = self.symlinks = 0
        self.new = self.changed = self.deleted = 0
        self.withheld = 0
        self.verdict: Verdict | None = None
        self.skipped = walk.skipped
        self.problems = list(walk.problems)
        self.collisions = walk.collisions
        for message in self.problems[:MAX_LOGGED_PROBLEMS]:
            logger.warning("%s", message)

    def count_file(self, size: int, blocks: int) -> None:
        self.files += 1
        self.bytes += size
        self.blocks += blocks

    def count_other(self, entry_type: EntryType) -> None:
        if entry_type is EntryType.DIR:
            self.dirs += 1
        else:
            self.symlinks += 1

    @property
    def recorded(self) -> int:
        """Changes recorded so far: new, changed and deleted paths."""
        return self.new + self.changed + self.deleted

    def take(self, outcome: _Observed | _Problem | None) -> None:
        if outcome is None:  # vanished or replaced since the walk: the next scan sees it
            return
        if isinstance(outcome, _Problem):
            self.skipped += 1
            if len(self.problems) < MAX_LOGGED_PROBLEMS:
                logger.warning("%s: %s", outcome.rel, outcome.message)
                self.problems.append(f"{outcome.rel}: {outcome.message}")
            return
        assert outcome.hashes is not None
        self.count_file(outcome.size, len(outcome.hashes.blocks))
        self.pending.append(outcome)

    async def flush(self) -> list[str]:
        """Record what is pending; the paths compared (recorded if they changed)."""
        observed, self.pending = self.pending, []
        gone, self.gone = self.gone, []
        if observed or gone:
            new, changed, deleted, failed = await asyncio.to_thread(self._commit, observed, gone)
            self.new += new
            self.changed += changed
            self.deleted += deleted
            for problem in failed:
                self.take(problem)
            self.unrecordable += failed
        forget, self.forget = self.forget, []
        if forget:
            self.forgotten += await asyncio.to_thread(self.index.forget, self.folder, forget)
        return [o.rel for o in observed] + gone

    def _commit(
        self, observed: list[_Observed], gone: list[str]
    ) -> tuple[int, int, int, list[_Problem]]:
        """Compare with the full old records and store, in one transaction (in a thread);
        the changes that could not be recorded are returned, the others stored."""
        new = changed = deleted = 0
        failed: list[_Problem] = []
        changes: list[LocalChange] = []
        updates: list[CacheUpdate] = []
        with self.index.transaction():
            olds = self.index.get_many(self.folder, [o.rel for o in observed] + gone)
            for obs in observed:
                old = olds.get(obs.rel)
                if old is not None and not old.deleted and _same_state(old, obs):
                    if obs.type is EntryType.FILE:
                        updates.append(CacheUpdate(obs.rel, obs.inode, obs.ctime_ns))
                    continue
                if self.fetch_only:
                    # Never a version of ours: a record whose content is no longer here is
                    # simply not held; new metadata on the same content is not worth a fetch.
                    if old is not None and not old.deleted and not _same_content(old, obs):
                        self.forget.append(obs.rel)
                    elif old is None or old.deleted:
                        adopted = _adopt(obs, self.theirs.get(obs.rel, []))
                        if adopted is not None:
                            changes.append(adopted)
                            new += 1
                    continue
                if old is None and self._lost_track(obs):
                    continue
                base = old.version if old is not None else VersionVector()
                version = _bumped(base, self.short_id, obs.rel, failed)
                if version is None:
                    continue
                record = _record(obs, version)
                changes.append(LocalChange(record, obs.inode, obs.ctime_ns))
                if old is None or old.deleted:
                    new += 1
                else:
                    changed += 1
            for rel in gone:
                old = olds.get(rel)
                if old is None or old.deleted:
                    continue
                version = _bumped(old.version, self.short_id, rel, failed)
                if version is None:
                    continue
                changes.append(LocalChange(old.tombstone(version, 0)))
                deleted += 1
            self.index.commit_changes(self.folder, changes, updates)
        return new, changed, deleted, failed

    def _lost_track(self, obs: _Observed) -> bool:
        """Whether ``obs``, a file recorded here for the first time, is one this node held
        once and lost track of (peers' versions of it carry our counter: its record was
        forgotten, or the index or the folder restored) and now holds other content.

        Its place in the history is unknown: any version recorded for it would either lose
        to the peers' (and it would be replaced) or beat theirs (an old backup pushed over
        newer work). So it is not recorded; it goes to ``orphans`` with a conflict name, and
        the engine moves it there, beside the version the LAN holds."""
        if not self.has_peers or obs.type is not EntryType.FILE:
            return False
        theirs = list(self.index.remote_records_for_path(self.folder, obs.rel).values())
        if not any(r.version.get(self.short_id) for r in theirs):
            return False
        winner = global_winner(theirs)
        if not winner.deleted and _same_content(winner, obs):
            return False
        mine = _record(obs, VersionVector().bump(self.short_id))
        self.orphans.append((obs.rel, conflict_name(obs.rel, mine, winner)))
        return True

    def summary(self, path: str, seconds: float) -> ScanSummary:
        if self.skipped > len(self.problems):
            logger.warning("%s: %d paths skipped in all", path, self.skipped)
        return ScanSummary(
            path=path,
            files=self.files,
            dirs=self.dirs,
            bytes=self.bytes,
            blocks=self.blocks,
            new=self.new,
            changed=self.changed,
            deleted=self.deleted,
            seconds=seconds,
            symlinks=self.symlinks,
            skipped=self.skipped,
            problems=tuple(self.problems[:MAX_LOGGED_PROBLEMS]),
            collisions=tuple(self.collisions),
            withheld=self.withheld,
            paused_reason=self.verdict.reason() if self.verdict is not None else "",
            verdict=self.verdict,
            forgotten=self.forgotten,
            orphans=tuple(self.orphans),
            unrecordable=tuple((p.rel, p.message) for p in self.unrecordable),
            looked_at=self.looked_at,
        )


def _bumped(
    version: VersionVector, short_id: int, rel: str, failed: list[_Problem]
) -> VersionVector | None:
    """``version`` bumped by ``short_id``, or None with the reason added to ``failed``."""
    try:
        return version.bump(short_id)
    except ValueError as exc:
        failed.append(_Problem(rel, f"cannot record the change: {exc}"))
        return None


def _at_or_under(rel: str, roots: Collection[str]) -> bool:
    """Whether ``rel`` is one of ``roots`` or lies below one of them."""
    while True:
        if rel in roots:
            return True
        cut = rel.rfind("/")
        if cut < 0:
            return False
        rel = rel[:cut]


def _walk(root: Path, rules: IgnoreRules, cache: dict[str, CacheEntry] | None = None) -> _Walk:
    """Every entry below ``root``, but the files ``cache`` says are unchanged, which leave
    it (blocking; runs in a thread)."""
    walk = _Walk(cache)
    try:
        root_stat = os.stat(root)  # the root itself may be a symlink the user chose
    except OSError as exc:
        raise StorageError(
            f"cannot scan {root}: {exc.strerror or exc}; is the disk mounted? "
            "(nothing was changed in the index)"
        ) from exc
    if not stat.S_ISDIR(root_stat.st_mode):
        raise StorageError(f"cannot scan {root}: not a directory (nothing was changed)")
    try:
        listing = list(os.scandir(root))
    except OSError as exc:
        raise StorageError(f"cannot list {root}: {exc.strerror or exc}") from exc
    _walk_below(walk, rules, "", listing)
    _collisions(walk)
    return walk


def _everywhere(_rel: str) -> bool:
    return True


def _walk_paths(root: Path, rules: IgnoreRules, targets: Iterable[str]) -> _Walk:
    """The entries at and below ``targets`` (raw relative paths) and their ancestors
    (blocking; runs in a thread)."""
    walk = _Walk()
    seen: set[str] = set()
    gone_from: set[str] = set()
    for raw in sorted(set(targets)):
        try:
            rel = paths.normalize(raw)
        except PathError as exc:
            walk.problem(f"{raw!r}: {exc}; skipped")
            continue
        if rel != raw:  # the full walk reports it; its normalised twin is this file
            walk.protected.add(rel)
            continue
        if rel.partition("/")[0] == paths.INTERNAL_DIR or any(
            paths.is_temporary(part) for part in rel.split("/")
        ):
            continue
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            if ancestor in seen or walk.in_trees(ancestor):
                continue
            seen.add(ancestor)
            if not _is_directory(root, ancestor):
                # Gone, or a file or a symlink now: nothing is read through it, and what
                # was below it goes, as a full scan judges it.
                walk.trees.add(ancestor)
                if not _add_path(walk, rules, root, ancestor, below=True):
                    gone_from.add(ancestor.rpartition("/")[0])
                break
            walk.singles.add(ancestor)
            _add_path(walk, rules, root, ancestor, below=False)
        if rel not in seen and not walk.in_trees(rel):
            seen.add(rel)
            walk.trees.add(rel)
            if not _add_path(walk, rules, root, rel, below=True):
                gone_from.add(rel.rpartition("/")[0])
    # The siblings of what vanished are read too: an ``rm`` of many files reaches the
    # scanner in several batches, and the mass-deletion guard must see all it already did.
    for parent in sorted(gone_from):
        if not walk.in_trees(parent):
            _add_level(walk, rules, root, parent)
    # A target below another target's tree was read twice: keep one entry per path.
    walk.entries = list({entry.rel: entry for entry in walk.entries}.values())
    _collisions(walk)
    return walk


def _is_directory(root: Path, rel: str) -> bool:
    """Whether ``rel`` is a directory itself, not a symlink to one (``lstat``: the
    ancestors above it were found to be directories already)."""
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(root, *rel.split("/"))).st_mode)
    except OSError:
        return False


def _add_path(walk: _Walk, rules: IgnoreRules, root: Path, rel: str, *, below: bool) -> bool:
    """Read ``rel`` into the walk (and, ``below``, everything under a directory there);
    false if it is not there."""
    abs_path = os.path.join(root, *rel.split("/"))
    try:
        st = os.lstat(abs_path)
    except (FileNotFoundError, NotADirectoryError):
        return False  # gone: its records (and those below it) become tombstones
    except OSError as exc:
        walk.protected.add(rel)
        walk.problem(f"{rel!r}: cannot stat: {exc.strerror or exc}")
        return True
    entry = _make_entry(walk, rules, rel, st, abs_path)
    if entry is None:
        return True
    walk.entries.append(entry)
    if below and entry.type is EntryType.DIR:
        listing = _listing(walk, rel, abs_path)
        if listing is not None:
            _walk_below(walk, rules, rel, listing)
    return True


def _add_level(walk: _Walk, rules: IgnoreRules, root: Path, rel_dir: str) -> None:
    """Read the entries of directory ``rel_dir`` ('' for the root), not what is below them."""
    abs_dir = os.path.join(root, *rel_dir.split("/")) if rel_dir else os.fspath(root)
    listing = _listing(walk, rel_dir, abs_dir)
    if listing is None:
        return
    walk.levels.add(rel_dir)
    for item in listing:
        entry = _entry(walk, rules, rel_dir, item)
        if entry is not None:
            walk.entries.append(entry)


def _listing(walk: _Walk, rel: str, abs_path: str) -> list[os.DirEntry[str]] | None:
    try:
        return list(os.scandir(abs_path))
    except OSError as exc:
        walk.protected.add(rel)
        if not isinstance(exc, FileNotFoundError):
            walk.problem(f"{rel}: cannot list the directory: {exc.strerror or exc}")
        return None


def _walk_below(walk: _Walk, rules: IgnoreRules, top: str, listing: list[os.DirEntry[str]]) -> None:
    """Every entry of the directory ``top`` (its ``listing`` read) and below it."""
    stack: list[tuple[str, list[os.DirEntry[str]]]] = [(top, listing)]
    while stack:
        rel_dir, items = stack.pop()
        for item in items:
            entry = _entry(walk, rules, rel_dir, item)
            if entry is None:
                continue
            walk.entries.append(entry)
            if entry.type is EntryType.DIR:
                try:
                    stack.append((entry.rel, list(os.scandir(item.path))))
                except OSError as exc:
                    walk.protected.add(entry.rel)
                    if not isinstance(exc, FileNotFoundError):
                        walk.problem(
                            f"{entry.rel}: cannot list the directory: {exc.strerror or exc}"
                        )


def _collisions(walk: _Walk) -> None:
    walk.collisions = paths.casefold_collisions(walk.names)
    walk.names = []
    for first_path, other in walk.collisions[:MAX_LOGGED_PROBLEMS]:
        logger.warning(
            "%s and %s differ only in case: a case-insensitive peer cannot hold both",
            first_path,
            other,
        )


def _entry(walk: _Walk, rules: IgnoreRules, rel_dir: str, item: os.DirEntry[str]) -> _Entry | None:
    """The walk's view of one directory entry, or None if it is skipped."""
    name = item.name
    if (not rel_dir and name == paths.INTERNAL_DIR) or name.startswith(paths.TEMP_PREFIX):
        return None
    raw = f"{rel_dir}/{name}" if rel_dir else name
    try:
        st = item.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # vanished since the listing
    except OSError as exc:
        walk.protected.add(raw)
        walk.problem(f"{raw!r}: cannot stat: {exc.strerror or exc}")
        return None
    return _make_entry(walk, rules, raw, st, item.path)


def _make_entry(
    walk: _Walk, rules: IgnoreRules, raw: str, st: os.stat_result, abs_path: str
) -> _Entry | None:
    """The walk's view of the entry at ``raw`` (its lstat ``st``), or None if it is skipped."""
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFDIR:
        entry_type = EntryType.DIR
    elif fmt == stat.S_IFREG:
        entry_type = EntryType.FILE
    elif fmt == stat.S_IFLNK:
        entry_type = EntryType.SYMLINK
    else:
        logger.debug("%r: not a file, directory or symlink; skipped", raw)
        return None
    if not paths.is_normalized(raw):
        try:
            if paths.normalize(raw) != raw:
                raise PathError("the name on disk is not in Unicode NFC form; rename it")
        except PathError as exc:
            walk.problem(f"{raw!r}: {exc}; skipped")
            with contextlib.suppress(PathError):  # its normalised twin, if indexed, is this file
                walk.protected.add(paths.normalize(raw))
            return None
    rel = raw
    if rules.matches(rel, entry_type is EntryType.DIR):
        walk.protected.add(rel)
        return None
    target = ""
    if entry_type is EntryType.SYMLINK:
        try:
            target = os.readlink(abs_path)
            if len(target.encode("utf-8")) > MAX_SYMLINK_TARGET_SIZE or not target:
                raise ValueError("symlink target empty or too long")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeEncodeError, ValueError) as exc:
            walk.protected.add(rel)
            walk.problem(f"{rel}: unusable symlink target ({exc}); skipped")
            return None
    mode = st.st_mode & PERMISSION_BITS
    walk.names.append(rel)
    if entry_type is EntryType.FILE and walk.unchanged_file(rel, st, mode):
        return None
    size = st.st_size if entry_type is EntryType.FILE else 0
    return _Entry(rel, entry_type, mode, size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, target)


def _cache_hit(entry: _Entry, old: CacheEntry) -> bool:
    """True if a regular file is unchanged by its stat and need not be read."""
    return _unchanged(old, entry.size, entry.mtime_ns, entry.inode, entry.ctime_ns, entry.mode)


def _unchanged(
    old: CacheEntry, size: int, mtime_ns: int, inode: int, ctime_ns: int, mode: int
) -> bool:
    """True if a regular file of this stat is the one ``old`` records."""
    return (
        not old.deleted
        and old.code == EntryType.FILE
        and old.ctime_ns != 0
        and old.size == size
        and old.mtime_ns == mtime_ns
        and old.inode == inode
        and old.ctime_ns == ctime_ns
        and old.mode == mode
    )


def _other_changed(entry: _Entry, old: CacheEntry) -> bool:
    if old.deleted or old.type is not entry.type:
        return True
    if entry.type is EntryType.DIR:
        return old.mode != entry.mode
    return old.symlink_target != entry.target


def _observed_other(entry: _Entry) -> _Observed:
    return _Observed(entry.rel, entry.type, entry.mode, entry.mtime_ns, target=entry.target)


def _groups(entries: Iterable[_Entry]) -> list[list[_Entry]]:
    """Files batched for hashing: up to GROUP_FILES files or GROUP_BYTES bytes per group."""
    groups: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for entry in entries:
        if current and (len(current) >= GROUP_FILES or size + entry.size > GROUP_BYTES):
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.size
    if current:
        groups.append(current)
    return groups


def _hash_group(
    root: Path, group: list[_Entry], hasher: HashFile
) -> list[_Observed | _Problem | None]:
    return [_hash_one(root, entry, hasher) for entry in group]


def _hash_one(root: Path, entry: _Entry, hasher: HashFile) -> _Observed | _Problem | None:
    """Read one file until a reading is stable; None if it vanished or is no longer a file."""
    path = root.joinpath(*entry.rel.split("/"))
    for _ in range(MAX_HASH_ATTEMPTS):
        started_ns = time.time_ns()
        try:
            result = hasher(path)
            st = result.stat
            if not result.stable or st is None:
                continue
            if started_ns - st.st_mtime_ns < chunker.RACY_WINDOW_NS:
                # Modified within a timestamp tick or two of this read: a write now might not
                # move the stat, so only two equal readings count.
                again = hasher(path)
                if not (again.stable and again.file_hash == result.file_hash) or not _same_stat(
                    again.stat, st
                ):
                    continue
        except (OSError, StorageError) as exc:
            if not _still_a_file(path):
                return None  # vanished or replaced by another type: the next scan records it
            return _Problem(entry.rel, f"cannot read: {exc}; skipped")
        return _Observed(
            rel=entry.rel,
            type=EntryType.FILE,
            mode=st.st_mode & PERMISSION_BITS,
            mtime_ns=st.st_mtime_ns,
            size=st.st_size,
            hashes=result,
            inode=st.st_ino,
            ctime_ns=0 if result.racy else st.st_ctime_ns,
        )
    return _Problem(
        entry.rel,
        f"changed while being read, {MAX_HASH_ATTEMPTS} times in a row; left for the next scan",
    )


def _still_a_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _same_stat(a: os.stat_result | None, b: os.stat_result) -> bool:
    return a is not None and (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_ino,
    )


def _record(obs: _Observed, version: VersionVector) -> FileRecord:
    if obs.type is EntryType.FILE:
        assert obs.hashes is not None
        return FileRecord(
            path=obs.rel,
            type=EntryType.FILE,
            size=obs.size,
            mtime_ns=obs.mtime_ns,
            mode=obs.mode,
            blocks=obs.hashes.blocks,
            file_hash=obs.hashes.file_hash,
            hash_algo=obs.hashes.hash_algo,
            version=version,
        )
    return FileRecord(
        path=obs.rel,
        type=obs.type,
        mtime_ns=obs.mtime_ns,
        mode=obs.mode,
        symlink_target=obs.target,
        version=version,
    )


def _stamp(index: Index, folder: int, root: Path, folder_id: bytes) -> None:
    """Stamp the folder's marker with what the index now holds (see ``marker``)."""
    if marker.read(root, folder_id) is marker.Found.THIS:
        info = index.folder(folder)
        marker.write(root, folder_id, marker.Generation(info.index_id, info.sequence))


def _peer_files(index: Index, folder: int, rels: Iterable[str]) -> dict[str, list[FileRecord]]:
    """Peers' records of those ``rels`` whose current version is a file (in a thread)."""
    found: dict[str, list[FileRecord]] = {}
    for rel in rels:
        theirs = list(index.remote_records_for_path(folder, rel).values())
        if theirs:
            winner = global_winner(theirs)
            if not winner.deleted and winner.type is EntryType.FILE:
                found[rel] = theirs
    return found


def _adopt(obs: _Observed, theirs: Sequence[FileRecord]) -> LocalChange | None:
    """The record of a file found here that holds the content of the peers' current version:
    that version (joined with every other of the same content), as a download of it would be
    recorded; None if it holds anything else, an older version included."""
    winner = global_winner(theirs) if theirs else None
    if winner is None or winner.deleted or not _same_content(winner, obs):
        return None
    version = winner.version
    for other in theirs:
        if not other.deleted and _same_content(other, obs):
            version = version.merge(other.version)
    if (obs.mtime_ns, obs.mode) == (winner.mtime_ns, winner.mode):
        record = dataclasses.replace(winner, version=version, sequence=0)
    else:
        # The same bytes under other metadata: no version at all, below every peer's, so
        # the peers' metadata is what the planner puts here and this one never spreads.
        record = _record(obs, VersionVector())
    return LocalChange(record, obs.inode, obs.ctime_ns)


def _same_content(old: FileRecord, new: _Observed) -> bool:
    """True if ``new`` holds what ``old`` records, whatever its mode and mtime."""
    if old.type is not new.type:
        return False
    if new.type is EntryType.SYMLINK:
        return old.symlink_target == new.target
    if new.type is EntryType.DIR:
        return True
    assert new.hashes is not None
    return (old.size, old.hash_algo, old.file_hash) == (
        new.size,
        new.hashes.hash_algo,
        new.hashes.file_hash,
    )


def _same_mode(recorded: int, found: int, default: int) -> bool:
    """Whether ``found`` is the ``recorded`` mode, or what this node made of it when it put
    the entry there (``store.applied_mode``: permission bits under our umask). The latter
    is no change of ours: recording it would narrow the mode on every node."""
    return found == recorded or found == applied_mode(recorded, default)


def _same_state(old: FileRecord, new: _Observed) -> bool:
    """True if ``new`` is what ``old`` already records: nothing for peers to learn."""
    if old.type is not new.type:
        return False
    if new.type is EntryType.DIR:
        return _same_mode(old.mode, new.mode, DIR_MODE)
    if new.type is EntryType.SYMLINK:
        return old.symlink_target == new.target
    assert new.hashes is not None
    return (
        old.size == new.size
        and old.mtime_ns == new.mtime_ns
        and _same_mode(old.mode, new.mode, FILE_MODE)
        and old.hash_algo == new.hashes.hash_algo
        and old.file_hash == new.hashes.file_hash
        and old.blocks == new.hashes.blocks
    )
