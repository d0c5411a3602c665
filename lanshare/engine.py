"""The sync engine: keeps every shared folder at the global newest version, with its peers.

Async coordination, no sockets: it issues commands on the sans-IO ``Endpoint`` (then asks the
transport to send with ``kick``), reads the endpoint's events, and does every disk operation
in worker threads: through ``asyncio.to_thread`` (index, scanner, store), and in batches
for serving (``serving.BlockServer``) and writing (``blockwriter.BlockWriter``).

This module holds each folder's scan, plan and apply loop (``FolderSync``) and the
``Engine`` that feeds every folder the protocol's events; a folder's downloads live in
``lanshare.downloads``, its peer exchange in ``lanshare.exchange``. Each sees the folder
through a small protocol of its own (``downloads.Folder``, ``exchange.Folder``), and the
other through another (``downloads.Peers``, ``exchange.Transfers``).

Theory of operation
-------------------
* **Local side.** A folder is scanned whole at start (and when asked: ``rescan()``, the
  watcher's safety net); a batch of watcher changes rescans just its paths, unless
  ``.lanshareignore`` changed (its one live rules object, ``ignore.FolderRules``, shared
  with the scanner, the planner and the watcher, is reloaded before every scan): then the
  whole folder is rescanned, since what the rules cover changed. A scan that changed
  anything bumps the folder's sequence, and every connected peer of the folder is told at
  once (a NOTIFY with the new sequence; the folder keeps its sequence as each commit and
  scan returns it, so the loop reads it without SQLite). Before each scan the folder marker
  is checked (``marker.check``): without it (an empty mount point) the folder pauses and
  nothing is scanned or changed until it is back. Every local change stamps the marker with
  the index's sequence; a folder found with an older stamp (a backup restored) is scanned
  fetch-only once. A node that keeps no whole folder (a short-lived ``ls`` or ``pull``)
  always scans fetch-only: it records no version of its own, and what it no longer holds is
  forgotten, never deleted.
* **Peers.** Each folder's peer exchange (``exchange.Exchange``) keeps its sessions, reads
  and answers manifests, stores the peers' records in the index and announces what we hold
  (NOTIFY, HAVE); block requests go to the folder's block server. See its module.
* **Misbehaviour.** What no honest peer would send (a manifest entry that does not decode,
  a block failing its hash) is a strike (``count_hostile``, ``strikes.Strikes``): logged
  within a rate limit, and past a threshold the peer's address (IPv6: its /64) is banned
  for a while: its sessions are closed, it is not connected to, and a session from it is
  ended as soon as it comes up, whatever node id it announces.
* **Planning** (``planner.plan``, pure) runs after any change, debounced, in a worker
  thread, against the records of the paths some peer holds another record of (plus
  in-progress ones), the rest of the folder answered by the index (``planinputs``): a folder
  in sync decodes no record to plan. A pass reads, plans and applies the paths a batch at a
  time and hands on a bounded number of fetches, so its memory does not grow with the
  records peers announce; a pass of several batches that changed anything plans again
  (a directory whose entries a later batch deleted is deleted then). A peer's records that
  equal ours in all but the sequence (our own changes, sent back once the peer took them)
  are no change, unless the path has work in hand or a problem; nor is a placed batch of
  downloads, unless a pass skipped a path then in flight, a conflict copy appeared or
  nothing is left to fetch (that pass finds the folder in sync). Directory, symlink,
  metadata, conflict and delete actions are applied at once, in the plan's order; builds
  from local data copy blocks synchronously before anything else can move their sources;
  fetches become downloads.
* **Mass-deletion guard.** Scans and plans are judged with the folder's deletion history
  from the index and the wall-clock time (that of the moment the guard tripped, while it
  holds deletions back, so a pause lasts until resolved); deletions made are added to the
  history. ``resume`` confirms on this node only: it applies them and clears the history.
* **Downloads.** The plan's fetches go to the folder's downloads (``downloads.Downloads``):
  opened in batches within a bound on open files, requested across every peer that has
  them, written and recorded in batches, and placed in batches. See its module. What failed
  there (``fail``) and a full disk (``pause_for_space``) are the folder's, as for actions.
* **Serving.** Each folder's block server (``serving.BlockServer``) answers block requests
  in batches read in a worker thread: from the file that holds the block (its block table
  kept decoded, its descriptor kept open, every block checked against its hash once), from a
  download's verified blocks, or from any local file with the same content. Every commit of
  a path's record, and every scan that changed something, invalidates what it keeps.
* **Time.** The engine and its parts read the time, sleep and set timers only through the
  ``clock.Clock`` the ``Engine`` is given (the event loop's by default), as the protocol is
  handed ``now``: the engine's simulator runs it on virtual time.
* **Stopping.** ``stop()`` ends ``run()`` at a safe point while the transport still delivers:
  from then on ``spawn`` drops new work unstarted (a block that arrives is fetched again
  after a restart) and block requests are no longer answered (the batch being read is,
  then every served file is closed); the work in hand finishes and every folder's ``busy``
  lock is taken, so no action is left between its disk step and its index step; only then
  are the loops, which merely wait, cancelled. Work outliving a grace period is cancelled
  too, as a crash would stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lanshare import deleteguard, keys, marker, planinputs, planner, scanner
from lanshare.addressing import show_addr
from lanshare.clock import LoopClock
from lanshare.downloads import Downloads, prioritised, same_content, temp_of
from lanshare.errors import (
    DescriptorsExhausted,
    DiskFullError,
    LanshareError,
    LocalChangeError,
    StorageError,
    TransferError,
    UsageError,
)
from lanshare.events import (
    BlockReceived,
    BlockRequested,
    FailReason,
    ManifestReceived,
    ManifestRequested,
    NotificationReceived,
    RequestCancelled,
    RequestFailed,
    SessionClosed,
    SessionEstablished,
)
from lanshare.exchange import Exchange
from lanshare.identity import short_id
from lanshare.ignore import IGNORE_FILE, FolderRules
from lanshare.index import CacheUpdate, LocalChange
from lanshare.manifest import Block, FileRecord
from lanshare.serving import BlockReader, BlockServer
from lanshare.store import Assembly, FolderStore, LocalState, Placement, VerifiedBlock
from lanshare.strikes import Strikes, ban_key

if TYPE_CHECKING:
    from collections.abc import (
        Awaitable,
        Callable,
        Collection,
        Coroutine,
        Iterable,
        Mapping,
        Sequence,
    )

    from lanshare.clock import Clock, Timer
    from lanshare.config import Config, FolderConfig
    from lanshare.events import Addr, Event
    from lanshare.identity import NodeId
    from lanshare.index import FolderInfo, Index
    from lanshare.protocol.endpoint import Endpoint

logger = logging.getLogger(__name__)

PLAN_DEBOUNCE = 0.02
"""Seconds a burst of changes is collected before one planning pass (a peer's manifest
answers to one announcement come within a few milliseconds of each other; passes that
follow each other closely are spaced by ``PLAN_SPACING`` anyway)."""
ANNOUNCE_INTERVAL = 0.1
"""Seconds between two announcements of a folder's new sequence: the first change after a
quiet spell is announced at once, those that follow within this time together after it."""
PLAN_SPACING = 2.0
"""A planning pass of T seconds is followed by at least PLAN_SPACING * T seconds of rest."""
TICK_INTERVAL = 0.25
"""Seconds between scheduler passes while downloads run (timeouts, stalled blocks)."""
RECONNECT_INTERVAL = 5.0
"""Seconds between attempts to (re)connect to known peer addresses without a session."""
SPACE_CHECK_INTERVAL = 2.0
"""Seconds between checks of what a folder waits for: free space after a full disk, or the
folder itself after it went missing (an unmounted disk)."""
SPACE_RESUME_MARGIN = 1024 * 1024
"""Bytes that must be freed, beyond what was free when the disk filled, to resume pulls."""
RETRY_FIRST = 2.0
"""Seconds before a failed path is tried again; doubled after each failure."""
RETRY_MAX = 300.0
"""Longest wait between two attempts at a failing path (a change seen by a scan retries
at once)."""
MAX_CONFLICT_PATHS = 100
"""Conflict copies listed by name in ``status``; ``conflicts`` counts them all."""
MAX_PLAN_PROBLEMS = 1000
"""Paths a pass keeps as problems of the plan (the first in path order): what peers announce
cannot grow them without end."""


class OwnWrites(Protocol):
    """What the engine tells a folder's watcher (``watcher.FolderWatcher``) of its writes."""

    def expect_own_write(self, rel: str) -> None:
        """``rel`` is about to change by our hand: its next event is no change to scan."""
        ...

    def cancel_own_write(self, rel: str) -> None:
        """The announced write of ``rel`` did not happen: its next event is a change."""
        ...


@dataclass(slots=True)
class Failure:
    """A path whose action or download failed here, and when to try it again."""

    message: str
    attempts: int
    retry_at: float
    """Engine time of the next attempt; infinite while a retried download runs."""


class FolderSync:
    """One shared folder: its scans, plan and actions; its downloads (``downloads``) and
    its peer exchange (``exchange``)."""

    downloads: Downloads
    exchange: Exchange

    def __init__(self, engine: Engine, config: FolderConfig, info: FolderInfo) -> None:
        self.engine = engine
        self.config = config
        self.info = info
        self.raw_key = keys.parse_key(config.key)
        self.folder_id = keys.folder_id(self.raw_key)
        self.root = Path(config.path)
        self.store = FolderStore(self.root)
        self.rules = FolderRules(self.root, config.ignore)
        self.state = "scanning"
        self.reason = ""
        self.sequence = info.sequence
        """The index's local sequence of the folder, kept from what each commit and scan
        returns: the loop reads it (status, announcements) without SQLite."""
        self.announced_at = float("-inf")
        self.announce_timer: Timer | None = None
        """Set while an announcement waits for ``ANNOUNCE_INTERVAL`` to pass."""
        self.server = BlockServer(
            BlockReader(self.store, engine.index, info.id),
            send=engine.endpoint.send_block,
            reject=engine.endpoint.reject,
            kick=engine.kick,
            spawn=engine.spawn,
            downloads=lambda: self.downloads.on_disk(),
        )
        self.exchange = Exchange(self, engine, self.server)
        self.downloads = Downloads(self, engine, self.exchange)
        self.failures: dict[str, Failure] = {}
        """Paths that failed here (a directory not writable, …); they make the folder
        ``error`` and are retried with backoff, and at once after a scan."""
        self.plan_problems: dict[str, str] = {}
        """Paths the last plan left out, and why (a structure no disk can hold, …)."""
        self.unrecordable: dict[str, str] = {}
        """Paths whose change the scans could not record, and why (see ``scanner``)."""
        self.conflict_paths: set[str] = set()
        """Conflict copies held here, by path."""
        self.missing = False
        """The folder root was not there at the last scan (an unmounted disk?)."""
        self.priority: set[str] = set()
        self.scope: set[str] | None = None if engine.whole_folders else set()
        """None: the whole folder is kept in sync; else only these paths and what is under
        them are fetched or changed here."""
        self.allow_mass_delete = False
        self.mass_delete_pause = False
        """The last plan withheld a mass deletion that came from peers."""
        self.local_pause = ""
        """Why the last scan withheld local deletions (the folder stays paused)."""
        self.marker_missing = False
        """The folder marker is not there (``marker.check``): an empty mount point, or
        another disk, is no place to change anything until the folder's disk is back."""
        self.marker_seen_back = False
        """The marker was seen back and a scan asked for, which ends the pause."""
        self.disk_full = ""
        """Why pulls are paused for want of space (empty: they are not)."""
        self.free_at_pause = 0
        self.waiting_for_space: dict[str, int] = {}
        """Files (and their sizes) the plan wants but a full disk keeps from fetching."""
        self.planning_seconds = 0.0
        """How long the last pass took to read the records and plan (not to act)."""
        self.busy = asyncio.Lock()
        """Held by a scan, a planning pass or a download's placement: they never overlap."""
        self.scanned = asyncio.Event()
        self.dirty = asyncio.Event()
        self.synced = asyncio.Event()

    # -- local side -----------------------------------------------------------------------

    async def scan(
        self, paths: Collection[str] | None = None, *, allow_mass_delete: bool = False
    ) -> scanner.ScanSummary | None:
        """Rescan the folder (or only ``paths``, as a watcher names them: see
        ``scanner.scan_path``); tell peers and replan when anything changed.

        Local deletions that trip the mass-deletion guard are withheld and pause the
        folder, unless ``allow_mass_delete`` (the user confirmed with ``resume``).
        Returns what the scan found, or None when it failed (``state`` is then ``error``
        and ``reason`` says why).
        """
        # A scan walks the disk, then reads the index: an action landing in between (on
        # disk and in the index) would look deleted, so scans and actions never overlap.
        async with self.busy:
            return await self._scan(paths, allow_mass_delete)

    async def _scan(
        self, paths: Collection[str] | None, allow_mass_delete: bool
    ) -> scanner.ScanSummary | None:
        try:
            self.missing = not self.root.is_dir()
            if self.missing:
                raise StorageError(
                    f"folder {self.root} is missing (unmounted disk?); waiting for it to be back"
                )
            if await self._marker_pause(confirmed=allow_mass_delete):
                return None
            restored = await self._restored()
            if await asyncio.to_thread(self.rules.reload) and paths is not None:
                # Other paths are ignored now, or no longer: look at them all.
                logger.info("folder %s: ignore rules changed; rescanning all of it", self.root)
                paths = None
            summary = await scanner.scan_guarded(
                self.engine.index,
                self.info.id,
                self.root,
                self.engine.short_id,
                limits=self.engine.delete_limits,
                allow_mass_delete=allow_mass_delete,
                held_by_peers=self.mass_delete_pause,
                rules=self.rules,
                only=paths,
                io_workers=self.engine.config.transfer.io_workers,
                limit=self.engine.io_limit,
                fetch_only=restored or not self.engine.whole_folders,
                now=self.engine.clock.time(),
                progress=self._recorded_some,
                clock=self.engine.now,
            )
        except LanshareError as exc:
            self.state, self.reason = "error", str(exc)
            logger.warning("folder %s: %s", self.root, exc)
            with contextlib.suppress(LanshareError):  # the index itself may be what failed
                await self._read_sequence()
            # For what the scan recorded before it failed.
            await asyncio.to_thread(self._stamp_marker, self.sequence)
            self.server.invalidate()
            return None
        self.unrecordable = summary.still_unrecordable(self.unrecordable)
        if summary.new or summary.changed or summary.deleted or summary.forgotten:
            self.server.invalidate()
            await self._read_sequence()
        if summary.forgotten:
            logger.info(
                "folder %s: %d paths no longer here; not deleted, the other machines keep them",
                self.root,
                summary.forgotten,
            )
        if restored:  # the index now says what this folder holds: later scans are as usual
            await asyncio.to_thread(self._stamp_marker, self.sequence)
        if summary.orphans and self.engine.whole_folders:
            await self._keep_orphans(summary.orphans)
        verdict = summary.verdict
        self.local_pause = verdict.reason(self.engine.peer_names) if verdict is not None else ""
        if self.local_pause:
            self.state, self.reason = "paused", self.local_pause
        elif self.state in ("scanning", "error", "paused"):
            self.state, self.reason = "syncing", ""
        self.scanned.set()
        # A scan follows every change the watcher sees (a permission fixed, space freed, a
        # directory created): whatever failed may work now, so it is tried at once.
        for failure in self.failures.values():
            failure.retry_at = min(failure.retry_at, 0.0)
        if summary.new or summary.changed or summary.deleted:
            logger.info(
                "folder %s: %d new, %d changed, %d deleted",
                self.root,
                summary.new,
                summary.changed,
                summary.deleted,
            )
            await asyncio.to_thread(self._stamp_marker, self.sequence)
            self.announce_sequence()
        self.dirty.set()
        return summary

    async def _recorded_some(self, paths: Sequence[str]) -> None:
        """A scan recorded part of what it found (among ``paths``): peers fetch that while
        it reads the rest (thousands of new files stream from the first ones hashed, not
        from the last)."""
        self.server.invalidate(paths)
        await self._read_sequence()
        await asyncio.to_thread(self._stamp_marker, self.sequence)
        self.announce_sequence()

    async def _keep_orphans(self, orphans: Iterable[tuple[str, str]]) -> None:
        """Move files this node lost track of (``ScanSummary.orphans``) to their conflict
        names: kept beside the version the LAN holds, which the next plan fetches into the
        name, and recorded as new files by the scan that follows."""
        moved = 0
        for path, name in orphans:
            await self.own_write(path)
            await self.own_write(name)
            try:
                await asyncio.to_thread(self.store.rename_local, path, name)
            except LanshareError as exc:
                self.withdraw_own_write(path, name)
                logger.warning("folder %s: cannot keep %s as %s: %s", self.root, path, name, exc)
                continue
            moved += 1
            logger.info(
                "folder %s: %s differs from the LAN's version and its history here was lost "
                "(a restore?); kept as %s",
                self.root,
                path,
                name,
            )
        if moved:
            self.engine.spawn(self.scan())

    def _guard_inputs(self) -> tuple[list[deleteguard.Deletion], float | None]:
        """The folder's deletion history, and since when the guard holds deletions back
        (it then judges as of that moment, so a pause lasts until it is resolved)."""
        index = self.engine.index
        return index.deletions(self.info.id), index.deletions_held_since(self.info.id)

    async def _hold(self, held: float | None, paused: bool, now: float) -> None:
        """Record the guard's hold when a pause begins, and drop it when none is left."""
        if paused != (held is not None):
            since = now if paused else None
            await asyncio.to_thread(self.engine.index.deletions_hold, self.info.id, since)

    async def _record_deletions(self, entries: list[deleteguard.Deletion]) -> None:
        """Add deletions just made to the guard's history (kept in the index)."""
        window = self.engine.config.sync.delete_window
        await asyncio.to_thread(self.engine.index.deletions_record, self.info.id, entries, window)

    async def _confirmed_deletions(self) -> None:
        """The user confirmed the deletions made here: they no longer count, so the window
        does not pause again for them (other nodes keep their own count and hold)."""
        await asyncio.to_thread(self.engine.index.deletions_clear, self.info.id)

    async def _marker_pause(self, *, confirmed: bool) -> bool:
        """Check the folder marker before a scan; pause the folder (True) when it is not
        this folder's disk, resume it when it is again. ``confirmed``: the user said, with
        ``lanshare resume``, that the folder is what it should be: it is marked again."""
        index, folder = self.engine.index, self.info.id
        reason = await asyncio.to_thread(
            marker.check, self.root, self.folder_id, lambda: index.held_names(folder)
        )
        if reason and confirmed and self.marker_missing:
            logger.warning("folder %s: marked again as the user confirmed it", self.root)
            await asyncio.to_thread(marker.write, self.root, self.folder_id)
            reason = ""
        self.marker_seen_back = False
        if reason:
            if not self.marker_missing:
                logger.warning("folder %s: %s", self.root, reason)
            self.marker_missing = True
            self.local_pause = reason
            self.state, self.reason = "paused", reason
            return True
        if self.marker_missing:
            logger.info("folder %s: the folder marker is back; resuming", self.root)
            self.marker_missing = False
        return False

    async def _restored(self) -> bool:
        """Whether the folder went back to an earlier state than the index describes (its
        marker's stamp is older): then this scan only fetches, so that what vanished or
        changed since is fetched again or kept beside the newer version, never deleted or
        replaced on the other machines."""
        if not self.engine.whole_folders:
            return False  # it only fetches anyway
        info = await asyncio.to_thread(self.engine.index.folder, self.info.id)
        was = await asyncio.to_thread(
            marker.restored_from, self.root, self.folder_id, info.index_id, info.sequence
        )
        if was is None:
            return False
        logger.warning(
            "folder %s holds an earlier state than its index (change %d, not %d: a backup "
            "restored?); what is missing or older here is fetched again or kept beside the "
            "newer version, and nothing is deleted on the other machines",
            self.root,
            was,
            info.sequence,
        )
        return True

    async def is_back(self) -> bool:
        """Whether the folder, missing or paused for its marker, is there again (a disk
        mounted): it is scanned at once, and watched afresh (a watch set on the empty mount
        point sees nothing of the disk mounted over it)."""
        if self.missing and await asyncio.to_thread(self.root.is_dir):
            logger.info("folder %s is back", self.root)
            self.missing = False
            return True
        if self.marker_missing and not self.marker_seen_back:
            found = await asyncio.to_thread(marker.read, self.root, self.folder_id)
            # Only the scan, under ``busy``, ends the pause: it first checks whether the disk
            # is a restored backup, which a plan acting on it meanwhile would hide.
            self.marker_seen_back = found is marker.Found.THIS
            return self.marker_seen_back
        return False

    def _stamp_marker(self, sequence: int) -> None:
        """Stamp the marker with the index's ``sequence`` after a local change (see ``marker``),
        unless the marker there is not this folder's. Blocking: call it in a thread, awaited
        right after the change is committed (a stop waits for it: a stamp left behind would
        make the next start take the folder for a restored one)."""
        if marker.read(self.root, self.folder_id) is not marker.Found.THIS:
            return
        try:
            stamp = marker.Generation(self.info.index_id, sequence)
            marker.write(self.root, self.folder_id, stamp, durable=False)
        except StorageError as exc:
            logger.warning("folder %s: %s", self.root, exc)

    async def resume(self, *, confirm: bool) -> bool:
        """``lanshare resume``: pulls a full disk paused and paths that failed are tried
        again at once. With ``confirm`` (the user named this folder), a paused mass deletion
        or a missing marker is confirmed too, on this node only: the deletions are recorded
        and applied. Returns whether such a pause is left, waiting for a confirmation."""
        pending = bool(self.local_pause) or self.mass_delete_pause
        self.disk_full = ""
        if self.local_pause and confirm:
            await self.scan(allow_mass_delete=True)
        elif self.state == "error" or self.failures:
            await self.scan()
        if pending and confirm:
            self.allow_mass_delete = True
        self.dirty.set()
        return pending and not confirm

    def announce_sequence(self) -> None:
        """Tell every peer of the folder the index's new sequence (the marker is stamped):
        at once after a quiet spell, else at most once per ``ANNOUNCE_INTERVAL``. Each
        announcement has every peer read our new records: a receiver placing small files
        in batches of one or two would otherwise make each peer ask hundreds of times a
        second, taking the time of both sides from the transfer."""
        if self.announce_timer is not None:
            return  # the announcement due soon tells the newest sequence
        wait = self.announced_at + ANNOUNCE_INTERVAL - self.engine.now()
        if wait > 0:
            self.announce_timer = self.engine.clock.call_later(wait, self._announce)
        else:
            self._announce()

    def _announce(self) -> None:
        self.announce_timer = None
        self.announced_at = self.engine.now()
        self.exchange.announce(self.info_sequence())
        self.engine.sequence_changed()
        self.engine.kick()

    def info_sequence(self) -> int:
        return self.sequence

    async def _read_sequence(self) -> None:
        self.sequence = await asyncio.to_thread(self.engine.index.sequence, self.info.id)

    def pending(self, path: str) -> bool:
        """Whether ``path`` has work in hand or a problem a peer's record may settle."""
        return (
            self.downloads.pending(path)
            or path in self.failures
            or path in self.plan_problems
            or path in self.waiting_for_space
        )

    # -- for ls and pull (lanshare.listing) -------------------------------------------------

    def records(self) -> tuple[dict[str, FileRecord], dict[bytes, dict[str, FileRecord]]]:
        """This node's records and every peer's, by path. Blocking: call it in a thread."""
        return self._load_records()

    def want(self, rel: str) -> dict[str, int]:
        """Fetch ``rel`` (a path or a directory) before anything else, even on a node that
        keeps no whole folder; paths under it that failed are tried again at once. Returns
        the attempts each failed path under it had made so far."""
        self.priority.add(rel)
        if self.scope is not None:
            self.scope.add(rel)
        attempts: dict[str, int] = {}
        for path, failure in self.failures.items():
            if path == rel or path.startswith(rel + "/") or not rel:
                attempts[path] = failure.attempts
                failure.retry_at = min(failure.retry_at, 0.0)
        self.dirty.set()
        return attempts

    def unwant(self, rel: str) -> None:
        """``rel`` no longer goes first (it stays in scope: what was pulled is kept)."""
        self.priority.discard(rel)

    def bytes_fetched(self, rel: str) -> int | None:
        """Bytes of ``rel`` verified so far, or None when it is not being downloaded."""
        return self.downloads.bytes_fetched(rel)

    def pull_problem(
        self, rel: str, attempts_before: Mapping[str, int], *, waiting: bool
    ) -> LanshareError | None:
        """Why a pull of ``rel`` (a path or a directory) cannot go on here, or None: the
        folder's disk is full while the pull still ``waiting`` for files, the folder cannot
        be synced at all (missing, its marker gone), or a path under ``rel`` failed again
        since the pull began (``attempts_before``: what ``want`` returned)."""
        if self.disk_full and waiting:
            return DiskFullError(f"{self.root}: {self.disk_full}")
        if self.missing or self.marker_missing:
            return StorageError(f"{self.root}: {self.reason}")
        for path, failure in sorted(self.failures.items()):
            if prioritised(path, (rel,)) and failure.attempts > attempts_before.get(path, 0):
                return TransferError(f"{self.root / path}: {failure.message}")
        return None

    def peers_listed(self) -> tuple[int, bool]:
        """How many peers are connected for this folder, and whether every one of them has
        answered every manifest request (what they list is then all they have)."""
        return self.exchange.peers_listed()

    def peers_connected(self) -> Collection[bytes]:
        """The peers with a session for this folder now."""
        return self.exchange.connected()

    def peers_building(self, rel: str) -> dict[bytes, tuple[FileRecord, Collection[bytes]]]:
        """The connected peers downloading ``rel`` now, the record each builds and the
        hashes of the blocks it holds of it (``Exchange.building``)."""
        return self.exchange.building(rel)

    # -- planning -------------------------------------------------------------------------

    async def plan_loop(self) -> None:
        await self.scanned.wait()
        next_pass = 0.0
        while True:
            await self.dirty.wait()
            await self.engine.clock.sleep(max(PLAN_DEBOUNCE, next_pass - self.engine.now()))
            self.dirty.clear()
            try:
                await self.plan_and_apply()
                # Planning reads every record of the folder: while changes keep coming
                # (peers downloading from us), it may take a third of the time at most,
                # leaving the rest to serving and receiving.
                next_pass = self.engine.now() + PLAN_SPACING * self.planning_seconds
            except LanshareError as exc:
                self.state, self.reason = "error", str(exc)
                logger.warning("folder %s: %s", self.root, exc)
            except Exception:
                # A bug must not end planning for good: log it and plan again on the next change.
                logger.exception("folder %s: internal error while planning", self.root)

    async def plan_and_apply(self) -> None:
        """One planning pass: decide, change the folder, then set up the downloads.

        Deciding and changing hold ``busy`` (a scan must never see an action half done);
        setting up downloads touches only temporary files, so finished downloads are put
        in place meanwhile.
        """
        async with self.busy:
            paused, fetches, remotes = await self._decide_and_change()
        await self.downloads.take_plan(fetches, remotes, set(self.waiting_for_space))
        await self._drop_stale_partials()
        if not paused and not self.local_pause and not self.disk_full:
            if self.downloads.busy():
                self.state, self.reason = "syncing", ""
            elif self.state != "error":
                self.state, self.reason = "in_sync", ""
                self.synced.set()
        if self.downloads.active or self.downloads.waiting:
            self.synced.clear()
        self.downloads.pump()

    async def _decide_and_change(
        self,
    ) -> tuple[
        bool,
        list[tuple[planner.Fetch, planner.Conflict | None]],
        dict[bytes, dict[str, FileRecord]],
    ]:
        """Plan, and apply every action but the fetches, which are returned (with the
        conflict each settles when it is placed) together with the peers' records of their
        paths; and whether the delete guard paused the folder.

        The paths to plan are read, planned and applied a batch at a time
        (``planinputs.batches``), each batch seeing what the ones before it applied, and
        the fetches handed over are bounded (``planinputs.Fetches``): a pass's memory does
        not grow with the number of records peers announce. The delete guard judges the
        deletions of the whole pass, counted first (``planinputs.deletions``).
        """
        started = self.engine.now()
        index, folder = self.engine.index, self.info.id
        # A snapshot: the plans run in threads while sessions change.
        progress = {
            peer: dict(link.in_progress)
            for peer, link in self.exchange.links.items()
            if link.in_progress
        }
        in_progress = {path for records in progress.values() for path in records}
        history, held = await asyncio.to_thread(self._guard_inputs)
        now = held if held is not None else self.engine.clock.time()
        allowed, self.allow_mass_delete = self.allow_mass_delete, False
        self.waiting_for_space.clear()
        priority = frozenset(self.priority)

        def plan(
            inputs: planinputs.PlanInputs,
            remotes: dict[bytes, dict[str, FileRecord]],
            whole: planner.PassDeletions | None,
        ) -> planner.Plan:
            return planner.plan(
                inputs.local,
                remotes,
                local_short_id=self.engine.short_id,
                priority=priority,
                limits=self.engine.delete_limits,
                delete_history=history,
                now=now,
                allow_mass_delete=allowed or whole is None,
                ignored=self.rules.matches,
                context=inputs.context,
                whole_pass=whole,
            )

        # In threads: the context's answers are index queries.
        batches = planinputs.batches(index, folder, in_progress)
        inputs = await asyncio.to_thread(next, batches, None)
        whole = None
        if inputs is not None and not allowed:  # in sync: nothing to count
            whole = await asyncio.to_thread(
                planinputs.deletions,
                index,
                folder,
                in_progress,
                lambda inputs: plan(
                    inputs, _with_in_progress(inputs.remotes, progress, inputs.paths), None
                ),
                self.engine.short_id,
            )
        self.conflict_paths = set(
            await asyncio.to_thread(planinputs.conflict_copies, index, folder)
        )
        failed_before = set(self.failures)
        still_failing: set[str] = set()
        downloads = self.downloads
        tick = self.engine.now()
        fetches = planinputs.Fetches(
            lambda path: (
                path in downloads.active
                or path in downloads.committing
                or path in downloads.opening
                or prioritised(path, priority)
            ),
            lambda path: self.failed_lately(path, tick),
        )
        problems: dict[str, str] = {}
        paused, verdict, live, actions_count, changed, rounds = False, None, 0, 0, 0, 0
        deleted: dict[bytes, int] = {}
        planning = self.engine.now() - started
        while inputs is not None:
            begun = self.engine.now()
            remotes = _with_in_progress(inputs.remotes, progress, inputs.paths)
            result = await asyncio.to_thread(plan, inputs, remotes, whole)
            actions_count += len(result.actions)
            for problem in result.problems:
                if len(problems) < MAX_PLAN_PROBLEMS:
                    problems[problem.path] = f"{problem.kind.value}: {problem.detail}".rstrip(": ")
            live = live or result.live_entries
            if result.paused and not paused:
                paused, verdict = True, result.verdict
            planning += self.engine.now() - begun
            changed += await self._change(result, remotes, fetches, still_failing, deleted)
            rounds += 1
            begun = self.engine.now()
            inputs = await asyncio.to_thread(next, batches, None)
            planning += self.engine.now() - begun
        self.planning_seconds = planning
        logger.debug(
            "folder %s: planned in %.3f s: %d actions, %d problems",
            self.root,
            self.planning_seconds,
            actions_count,
            len(problems),
        )
        self.plan_problems = problems
        # A failure whose path no longer needs an action here was settled another way (a
        # newer version, the path deleted): it is no problem any more.
        needed = still_failing | set(downloads.active) | downloads.committing
        for path in failed_before - needed:
            self.failures.pop(path, None)
        self.mass_delete_pause = paused
        if not allowed:
            await self._hold(held, paused or bool(self.local_pause), now)
        if verdict is not None:
            logger.warning("folder %s: delete guard: %s", self.root, verdict.reason())
        if paused or self.local_pause or self.disk_full:
            remote_pause = verdict.reason(self.engine.peer_names) if verdict else ""
            self.state, self.reason = "paused", remote_pause or self.local_pause or self.disk_full
        if allowed and deleted:
            await self._confirmed_deletions()
        elif deleted:
            live = whole.live if whole is not None else live
            await self._record_deletions(
                [deleteguard.Deletion(now, o, n, live) for o, n in sorted(deleted.items())]
            )
        if rounds > 1 and changed:
            # What a batch left for want of what a later one did (a directory whose entries
            # it deleted) is done by the next pass.
            self.dirty.set()
        return paused, fetches.chosen, fetches.remotes

    async def _change(
        self,
        result: planner.Plan,
        remotes: dict[bytes, dict[str, FileRecord]],
        fetches: planinputs.Fetches,
        still_failing: set[str],
        deleted: dict[bytes, int],
    ) -> int:
        """Apply a batch's plan but its fetches, which go to ``fetches``; the paths of
        failures that still need an action go to ``still_failing``, the deletions made (by
        origin) are added to ``deleted``. How many actions it applied (or tried, for builds)."""
        if result.paused or self.local_pause or self.disk_full:
            self.state = "paused"  # its reason is set once the pass is planned
        actions = result.actions
        if self.marker_missing:
            actions = ()
        if self.scope is not None:
            scope = self.scope
            actions = tuple(a for a in actions if _in_scope(a, scope))
        if actions and self.state == "in_sync":
            # Until the pass ends, whatever it applies is still to be done here.
            self.state, self.reason = "syncing", ""
        still_failing.update(a.path for a in actions if a.path in self.failures)
        tick = self.engine.now()
        # A conflict is applied together with the winner's action on the same path: the
        # loser leaves its name only when the winner takes it (for a fetch, when the download
        # is complete), so no peer ever sees the path vacated and nothing waits half done.
        conflicts: dict[str, planner.Conflict] = {}
        # Builds from local data in a row are made and recorded together (thousands of
        # empty or copied files: one thread hop and one transaction, not a few each).
        builds: list[planner.BuildFromLocal] = []
        applied = 0
        for action in actions:
            if isinstance(action, planner.Conflict):
                conflicts[action.path] = action
                continue
            conflict = conflicts.pop(action.path, None)
            if self.disk_full and isinstance(action, planner.Fetch | planner.BuildFromLocal):
                if len(self.waiting_for_space) < planinputs.FETCHES_PER_PASS:
                    self.waiting_for_space[action.path] = action.record.size
                continue
            if isinstance(action, planner.Fetch):
                fetches.offer(action, conflict, remotes)
                continue
            failure = self.failures.get(action.path)
            if failure is not None and failure.retry_at > tick:
                continue  # failed lately: its retry is due later (or after a scan)
            if isinstance(action, planner.BuildFromLocal) and conflict is None:
                builds.append(action)
                continue
            if builds:
                await self._build_all_from_local(builds)
                applied += len(builds)
                builds = []
            try:
                if conflict is not None and not isinstance(action, planner.SetMetadata):
                    await self._apply_with_conflict(conflict, action)
                else:
                    await self._apply(action)
                if isinstance(action, planner.Delete):
                    origin = planner.deletion_origin(action, self.engine.short_id)
                    deleted[origin] = deleted.get(origin, 0) + 1
            except LanshareError as exc:
                await self._not_applied(action.path, exc)
            else:
                self.failures.pop(action.path, None)
                applied += 1
        if builds:
            await self._build_all_from_local(builds)
            applied += len(builds)
        return applied

    async def _not_applied(self, path: str, exc: LanshareError) -> None:
        """An action on ``path`` failed: a local change is rescanned (and planned again),
        a full disk pauses pulls, anything else fails the path (tried again later)."""
        if isinstance(exc, LocalChangeError):
            logger.info("folder %s: %s", self.root, exc)
            await self.local_change(path)
            self.dirty.set()
        elif isinstance(exc, DiskFullError):
            await self.pause_for_space(exc)
        else:
            self.fail(path, exc)

    async def _build_all_from_local(self, actions: list[planner.BuildFromLocal]) -> None:
        """Build files from local data, none replacing a conflict's loser: every block read
        and written for all of them first, then all placed in one ``store.place`` (one
        thread hop) and recorded in one commit. Each failure is that path's alone."""
        for action in actions:
            # A download of the path (planned before its content was found here) writes
            # to the same temporary file: it stops first.
            await self.downloads.give_up(action.record.path)
            await self.own_write(action.record.path)
        builds = [(action, "") for action in actions]
        errors = await asyncio.to_thread(self._build_and_place, builds, self.engine.clock.time())
        built = [a.record for a, error in zip(actions, errors, strict=True) if error is None]
        if built:
            try:
                await self.commit(*built)
            except LanshareError as exc:  # in place, not recorded: each fails and is retried
                errors = [exc if error is None else error for error in errors]
        for action, error in zip(actions, errors, strict=True):
            if error is None:
                self.failures.pop(action.path, None)
            else:
                self.withdraw_own_write(action.path)
                await self._not_applied(action.path, error)

    def _build_and_place(
        self, builds: list[tuple[planner.BuildFromLocal, str]], now: float
    ) -> list[LanshareError | None]:
        """Build files from local data and place them, blocking: each build is an action
        and the conflict name its target's loser keeps (``""``: none). For each, None when
        its file is in place, else why not (its temporary file is gone then)."""
        errors: list[LanshareError | None] = [None] * len(builds)
        ready: list[tuple[int, Placement]] = []
        for i, (action, keep_as) in enumerate(builds):
            try:
                assembly = self.store.begin(action.record)
            except LanshareError as exc:
                errors[i] = exc
                continue
            try:
                written = self._copy_local_blocks(action, assembly)
                planned = self.planned_now(action.replaces)
                ready.append((i, Placement(assembly, planned, written, keep_as)))
            except LanshareError as exc:
                errors[i] = exc
                assembly.close()
                self.store.discard(action.record)
        placed = self.store.place([placement for _, placement in ready], now)
        for (i, placement), error in zip(ready, placed, strict=True):
            if error is not None:
                errors[i] = error
                placement.assembly.close()
                self.store.discard(builds[i][0].record)
        return errors

    def _copy_local_blocks(self, action: planner.BuildFromLocal, assembly: Assembly) -> set[int]:
        """Copy ``action``'s blocks from local files into ``assembly`` (blocking); the
        indexes of the blocks written, each checked against its hash as it was read."""
        record = action.record
        index_at = {block.offset: i for i, block in enumerate(record.blocks)}
        written: set[int] = set()
        for copy in action.copies:
            source = Block(copy.source_offset, copy.size, copy.hash)
            data = self.store.read_block(copy.source_path, source, record.hash_algo)
            if data is None:
                raise LocalChangeError(f"{copy.source_path} changed; {record.path} replanned")
            block = VerifiedBlock(index_at[copy.offset], data)
            self.store.write_verified(assembly, block)
            written.add(block.index)
        return written

    def fail(self, path: str, exc: LanshareError) -> None:
        """``path`` failed here: keep why, for ``status``, and when to try it again.

        A process out of file descriptors is no failure of the file that met it: new
        downloads wait a moment, and the plan that follows asks for the file again."""
        if isinstance(exc, DescriptorsExhausted):
            self.downloads.hold_opening(exc)
            return
        old = self.failures.get(path)
        attempts = old.attempts + 1 if old is not None else 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(attempts - 1, 16))
        message = str(exc)
        self.failures[path] = Failure(message, attempts, self.engine.now() + delay)
        if old is None or old.message != message:  # not once per retry
            logger.warning(
                "folder %s: %s: %s (tried again in %.0f s, or after a change)",
                self.root,
                path,
                message,
                delay,
            )

    def retry_due(self, path: str) -> None:
        """A retried download of a failing path stopped without failing again (paused for
        space, fetched again after a bad block): the next plan may try it, or nothing would
        ever retry it and the folder would stay ``error``. (A deferred one is asked again
        by the plan after the next placement, its wait unchanged.)"""
        failure = self.failures.get(path)
        if failure is not None and failure.retry_at == float("inf"):
            failure.retry_at = self.engine.now()

    def failed_lately(self, path: str, now: float) -> bool:
        failure = self.failures.get(path)
        return failure is not None and failure.retry_at > now

    def retrying(self, path: str) -> None:
        failure = self.failures.get(path)
        if failure is not None:  # being retried: it stays a problem until it is in place
            failure.retry_at = float("inf")

    def settled(self, path: str) -> None:
        self.failures.pop(path, None)

    def log_conflict(self, conflict: planner.Conflict) -> None:
        def origin(changed: FileRecord, other: FileRecord) -> str:
            device = planner.change_origin(changed.version, other.version)
            if device == self.engine.short_id:
                return f"{self.engine.config.node.name} (this machine)"
            # A version vector names a device by its short id: the node id as a number.
            name = self.engine.peer_names.get(device.to_bytes(8, "big"))
            return name or f"device {device:016x}"[: 7 + planner.CONFLICT_NODE_DIGITS]

        logger.info(
            "folder %s: conflict on %s: the version from %s wins; the version from %s is "
            "kept as %s",
            self.root,
            conflict.path,
            origin(conflict.winner, conflict.loser),
            origin(conflict.loser, conflict.winner),
            conflict.conflict_name,
        )

    async def pause_for_space(self, exc: DiskFullError) -> None:
        """The disk is full: stop every download (their verified blocks stay, to resume)
        and fetch nothing until space is freed or the user runs ``resume``."""
        if not self.disk_full:
            self.disk_full = f"disk full ({exc}); pulls paused until space is freed"
            logger.warning("folder %s: %s", self.root, self.disk_full)
            try:
                self.free_at_pause = await asyncio.to_thread(self.store.free_space)
            except StorageError:
                self.free_at_pause = 0
        self.state, self.reason = "paused", self.disk_full
        self.synced.clear()
        self.waiting_for_space.update(await self.downloads.abandon_all())

    def wait_for_space(self, path: str, size: int) -> None:
        self.waiting_for_space[path] = size

    async def check_space(self) -> None:
        """Resume pulls a full disk paused once space was freed."""
        if not self.disk_full:
            return
        try:
            free = await asyncio.to_thread(self.store.free_space)
        except StorageError:
            return
        if free >= self.free_at_pause + SPACE_RESUME_MARGIN:
            logger.info("folder %s: %d MiB free again; pulls resume", self.root, free >> 20)
            self.disk_full = ""
            self.dirty.set()

    async def _drop_stale_partials(self) -> None:
        """Remove temporary files of downloads no plan wants any more (kept after a local
        edit stopped them, or left by a crash for a version that has since been replaced).

        Downloads a full disk stopped are kept to resume, and so is all a node acting on
        a few paths only (a short-lived ``pull``) does not plan: a daemon's downloads."""
        if self.disk_full:
            return
        index = self.engine.index
        partials = await asyncio.to_thread(index.partials, self.info.id)
        for partial in partials:
            path = partial.path
            # Still wanted (deferred by the scheduler, or failed and due for a retry), it
            # resumes from its verified blocks (another version's file goes when it opens).
            if self.downloads.keeps(path):
                continue
            if self.scope is not None and not prioritised(path, self.scope):
                continue
            await asyncio.to_thread(self.store.discard_temp, temp_of(partial))
            await asyncio.to_thread(index.partial_drop, self.info.id, path)

    def _load_records(self) -> tuple[dict[str, FileRecord], dict[bytes, dict[str, FileRecord]]]:
        index = self.engine.index
        local = {r.path: r for r in index.iter_records(self.info.id)}
        remotes = {
            p.peer: {r.path: r for r in index.remote_records(self.info.id, p.peer)}
            for p in index.remote_peers(self.info.id)
        }
        return local, remotes

    async def _apply_with_conflict(
        self,
        conflict: planner.Conflict,
        action: planner.BuildFromLocal | planner.MakeDir | planner.MakeSymlink | planner.Delete,
    ) -> None:
        """Keep the loser (a file) under its conflict name and apply the winner's action.

        A file built from local data is placed as a download is: the loser gets its conflict
        name as a second name, then the winner is renamed over it, so the path always holds
        one of them. A directory or a symlink cannot take the loser's place that way (no
        directory can be renamed over a file, and the store makes a symlink only over a
        symlink): the loser moves aside first, and the path is empty until the winner lands.
        If the winner's action fails, the loser goes back to its name."""
        if isinstance(action, planner.BuildFromLocal):
            await self._build_from_local(action, conflict)
            return
        await asyncio.to_thread(self.store.rename_local, conflict.path, conflict.conflict_name)
        try:
            await self._apply(dataclasses.replace(action, replaces=None))
        except BaseException:
            with contextlib.suppress(LanshareError):
                await asyncio.to_thread(
                    self.store.rename_local, conflict.conflict_name, conflict.path
                )
            raise
        await self.commit(conflict.copy_record)
        self.log_conflict(conflict)

    async def _apply(self, action: planner.Change) -> None:
        store = self.store
        now = self.engine.clock.time()
        if isinstance(action, planner.MakeDir):
            await asyncio.to_thread(store.make_dir, action.path, action.record.mode)
        elif isinstance(action, planner.MakeSymlink):
            await self.own_write(action.path)
            try:
                await asyncio.to_thread(
                    store.make_symlink, action.path, action.record.symlink_target
                )
            except BaseException:
                self.withdraw_own_write(action.path)
                raise
        elif isinstance(action, planner.SetMetadata):
            planned = await self._planned(action.replaces)
            await asyncio.to_thread(
                store.set_metadata, action.path, action.record.mode, action.record.mtime_ns, planned
            )
        elif isinstance(action, planner.Delete):
            planned = await self._planned(action.replaces)
            entry = action.replaces.type if action.replaces is not None else action.record.type
            await self.own_write(action.path)
            try:
                await asyncio.to_thread(store.delete, action.path, entry, planned, now)
            except BaseException:
                self.withdraw_own_write(action.path)
                raise
        elif isinstance(action, planner.BuildFromLocal):
            await self._build_from_local(action)
            return
        await self.commit(action.record)

    async def _build_from_local(
        self, action: planner.BuildFromLocal, conflict: planner.Conflict | None = None
    ) -> None:
        """Copy the blocks, then place the file (over the local loser of ``conflict``, if
        any, which keeps its content under its conflict name)."""
        record = action.record
        # A download of the path (planned before its content was found here) writes to the
        # same temporary file: it stops first.
        await self.downloads.give_up(record.path)
        keep_as = conflict.conflict_name if conflict is not None else ""
        written_paths = (record.path, keep_as) if keep_as else (record.path,)
        for rel in written_paths:
            await self.own_write(rel)
        (error,) = await asyncio.to_thread(
            self._build_and_place, [(action, keep_as)], self.engine.clock.time()
        )
        if error is not None:
            self.withdraw_own_write(*written_paths)
            raise error
        if conflict is None:
            await self.commit(record)
        else:
            await self.commit(conflict.copy_record, record)
            self.log_conflict(conflict)

    async def commit(self, *records: FileRecord, finished: Collection[str] = ()) -> None:
        """Record that ``records`` are now on disk (each with a new local sequence), and
        forget the partial downloads of the paths ``finished``, in one transaction."""

        def store() -> int:
            index = self.engine.index
            changes = [LocalChange(r, *_stat_cache(self.root, r)) for r in records]
            with index.transaction():
                for path in finished:
                    index.partial_drop(self.info.id, path)
                index.commit_changes(self.info.id, changes)
            sequence = index.sequence(self.info.id)
            self._stamp_marker(sequence)
            return sequence

        self.sequence = await asyncio.to_thread(store)
        self.server.invalidate(record.path for record in records)
        for record in records:
            if planner.conflict_original(record.path) is not None:
                if record.deleted:
                    self.conflict_paths.discard(record.path)
                else:
                    self.conflict_paths.add(record.path)
        self.announce_sequence()

    async def _planned(self, replaces: FileRecord | None) -> LocalState:
        """What the plan saw at a path, with the index's scan cache of that record, so
        the store need not read the file again to know it is unchanged."""
        if replaces is None:
            return LocalState.of(None)
        return await asyncio.to_thread(self.planned_now, replaces)

    async def local_change(self, path: str) -> None:
        """The store refused to touch ``path``, changed since the plan: rescan, reading
        ``path`` again whatever its stat says (an edit that kept size and mtime on FAT,
        whose ctime is its mtime, leaves the scan cache as it was)."""
        await asyncio.to_thread(
            self.engine.index.commit_changes, self.info.id, [], [CacheUpdate(path, 0, 0)]
        )
        self.server.invalidate([path])
        self.engine.spawn(self.scan([path]))

    async def own_write(self, rel: str) -> None:
        watcher = self.engine.watchers.get(self.info.id)
        if watcher is not None:
            watcher.expect_own_write(rel)

    def withdraw_own_write(self, *rels: str) -> None:
        """The writes announced for ``rels`` did not happen: a user's change to one of them
        right after must not be taken for ours."""
        watcher = self.engine.watchers.get(self.info.id)
        if watcher is not None:
            for rel in rels:
                watcher.cancel_own_write(rel)

    def planned_now(self, replaces: FileRecord | None) -> LocalState:
        """:meth:`_planned`, blocking."""
        if replaces is None:
            return LocalState.of(None)
        cache = self.engine.index.stat_cache(self.info.id, replaces.path, replaces.sequence)
        return LocalState.of(replaces, *cache)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The folder's ``status --json`` object.

        The state is ``in_sync`` only when nothing is needed, no path is failing, and the
        file list of every connected peer was read since it connected; a failing path makes
        the folder ``error`` (the paths and why are in ``problems``).
        """
        links = self.exchange.links
        peers = []
        for link in links.values():
            name = self.engine.peer_names.get(link.peer, "")
            peers.append(
                {
                    "id": link.peer.hex(),
                    "name": name,
                    "address": show_addr(link.addr),
                    "rate": self.downloads.rate(link.peer),
                    "need_bytes": self.downloads.need_from(link.peer),
                }
            )
        fetching, fetching_bytes = self.downloads.need()
        need_files = fetching + len(self.waiting_for_space)
        need_bytes = fetching_bytes + sum(self.waiting_for_space.values())
        state, reason = self.state, self.reason or self._why_not_in_sync()
        reading = sum(1 for link in links.values() if not link.listed)
        peer_problems = self.exchange.peer_problems()
        if state in ("in_sync", "syncing") and self.failures:
            path, failure = min(self.failures.items())
            more = len(self.failures) - 1
            state = "error"
            reason = f"{path}: {failure.message}" + (f" (and {more} more)" if more else "")
        elif state in ("in_sync", "syncing") and peer_problems:
            # Not in sync with a peer whose file list was not read whole.
            peer, problem = next(iter(peer_problems.items()))
            state, reason = "error", f"peer {self._peer_name(peer)} {problem}"
        elif state == "in_sync" and need_files:
            state = "syncing"
        elif state == "in_sync" and reading:
            # Not known to be in sync until every connected peer's file list was read.
            state, reason = "syncing", f"reading the file list of {reading} peer(s)"
        elif state == "in_sync" and not links:
            reason = "no peer connected"
        return {
            "path": str(self.root),
            "state": state,
            "reason": reason,
            "need_files": need_files,
            "need_bytes": need_bytes,
            "conflicts": len(self.conflict_paths),
            "conflict_paths": sorted(self.conflict_paths)[:MAX_CONFLICT_PATHS],
            "problems": [{"path": p, "problem": m} for p, m in sorted(self.problems.items())],
            "peer_problems": [
                {"peer": p.hex(), "name": self.engine.peer_names.get(p, ""), "problem": m}
                for p, m in peer_problems.items()
            ],
            "connected_peers": len(links),
            "sequence": self.info_sequence(),
            "peers": peers,
        }

    @property
    def problems(self) -> dict[str, str]:
        """Every path out of sync for a reason other than waiting, and the reason; and the
        ``.lanshareignore`` left out, if it is (``FolderRules.problem``)."""
        problems = {path: failure.message for path, failure in self.failures.items()}
        for path, message in (*self.plan_problems.items(), *self.unrecordable.items()):
            problems.setdefault(path, message)
        if self.rules.problem:
            problems.setdefault(IGNORE_FILE, self.rules.problem)
        return problems

    def _peer_name(self, peer: bytes) -> str:
        name = self.engine.peer_names.get(peer, "")
        return f"{name} ({peer.hex()})" if name else peer.hex()

    def _why_not_in_sync(self) -> str:
        if self.state != "syncing":
            return ""
        stalled = self.downloads.stalled()
        if stalled:
            return f"no connected peer has {stalled} of the blocks needed"
        if not self.exchange.links:
            return "no peer connected"
        return ""


class Engine:
    """Every folder of one node; fed by the transport's events and the watchers."""

    def __init__(
        self,
        config: Config,
        index: Index,
        node_id: NodeId,
        endpoint: Endpoint,
        *,
        kick: Callable[[], None],
        clock: Clock | None = None,
        whole_folders: bool = True,
    ) -> None:
        """``whole_folders`` False: act only on the paths put in each folder's ``scope``
        (a short-lived node pulling a few files, or only listing). ``clock``: where every
        time is read and every wait is made (None: the running loop's, ``LoopClock``)."""
        self.config = config
        self.whole_folders = whole_folders
        self.index = index
        self.node_id = node_id
        self.short_id = short_id(node_id)
        self.endpoint = endpoint
        self.kick = kick
        self.clock = clock or LoopClock()
        """Every time the engine reads and every wait it makes (see ``lanshare.clock``)."""
        self.now = self.clock.now
        self.io_limit = asyncio.Semaphore(max(1, config.transfer.io_workers))
        self.delete_limits = deleteguard.Limits.of(config.sync)
        self.folders: dict[bytes, FolderSync] = {}
        self.addresses: dict[Addr, set[bytes]] = {}
        self.peer_names: dict[bytes, str] = {}
        self.watchers: dict[int, OwnWrites] = {}
        """Each folder's watcher, by index folder id: told of the engine's own writes."""
        self.strikes = Strikes(self.now)
        """Strikes against misbehaving peers and the addresses they got banned."""
        self.on_sequence: Callable[[int], None] | None = None
        self.on_folder_back: Callable[[FolderSync], None] | None = None
        """Called when a folder missing at its last scan is there again (to watch it)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        """Work started by ``spawn``: a stop lets it finish (within the stop's grace)."""
        self._loops: set[asyncio.Task[Any]] = set()
        """The folders' planning loops and the maintenance loop: they wait for ever, so a
        stop cancels them."""
        self._pending: list[Coroutine[Any, Any, Any]] = []
        self._group: asyncio.TaskGroup | None = None
        self._closing = False
        self._stopped = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    async def add_folder(self, folder: FolderConfig) -> FolderSync:
        folder_id = keys.folder_id(keys.parse_key(folder.key))
        info = await asyncio.to_thread(self.index.add_folder, folder.path, folder_id.hex())
        sync = FolderSync(self, folder, info)
        await sync.exchange.load()
        self.folders[folder_id] = sync
        self.endpoint.set_folders({f: keys.session_psk(s.raw_key) for f, s in self.folders.items()})
        if self._group is not None:
            self._start_folder(sync)
        return sync

    async def remove_folder(self, folder_id: bytes) -> None:
        sync = self.folders.pop(folder_id, None)
        if sync is None:
            return
        self.endpoint.close(folder=folder_id)
        self.endpoint.set_folders({f: keys.session_psk(s.raw_key) for f, s in self.folders.items()})
        await sync.downloads.abandon_all()
        await sync.server.close()
        self.kick()

    async def run(self) -> None:
        """Run until ``stop()`` (or cancelled): scans, planning, reconnects, scheduler ticks."""
        if self._closing:
            return
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                pending, self._pending = self._pending, []
                for work in pending:
                    self._start(work)
                for sync in self.folders.values():
                    self._start_folder(sync)
                self._loops.add(group.create_task(self._maintenance()))
                await self._stopped.wait()
            finally:
                # Before the group's exit: from now on nothing may enter it (a datagram
                # handled while it unwinds would find it closed).
                self._closing = True

    async def stop(self, grace: float) -> None:
        """End ``run()`` at a safe point: no new work starts; the work in hand (block writes,
        placements, scans, actions) finishes, so the disk and the index agree; then the
        loops, which only wait, are cancelled. Work still running after ``grace`` seconds is
        cancelled too (a crash could stop it there as well: the index is crash-safe)."""
        if self._closing:
            return
        self._closing = True
        for work in self._pending:
            work.close()
        self._pending.clear()
        # Serving ends first: it would otherwise go on taking the requests peers still send.
        for sync in self.folders.values():
            await sync.server.close()
        deadline = self.now() + grace
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - self.now()))
        # A planning pass holds ``busy`` while it changes the folder; holding every folder's
        # lock from here on means none is half done and none starts.
        for sync in self.folders.values():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - self.now())):
                    await sync.busy.acquire()
        left = self._tasks | self._loops
        for task in left:
            task.cancel()
        self._stopped.set()
        if left:
            await asyncio.wait(left)

    def _start_folder(self, sync: FolderSync) -> None:
        assert self._group is not None
        if not self._closing:
            self.spawn(sync.scan())
            self._loops.add(self._group.create_task(self._guard(sync.plan_loop())))

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the engine's task group; its errors are logged, never fatal.

        Work spawned before ``run()`` starts with it; once the engine is stopping, ``work``
        is dropped unstarted (what it would have done is redone after the restart: a block
        received is fetched again, a request is asked again).
        """
        if self._closing:
            work.close()
        elif self._group is None:
            self._pending.append(work)
        else:
            self._start(work)

    def _start(self, work: Coroutine[Any, Any, Any]) -> None:
        assert self._group is not None
        task = self._group.create_task(self._guard(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, work: Awaitable[Any]) -> None:
        try:
            await work
        except LanshareError as exc:
            logger.warning("%s", exc)
        except Exception:
            logger.exception("internal error in the sync engine")

    async def _maintenance(self) -> None:
        last_connect = -RECONNECT_INTERVAL
        last_prune = -3600.0
        last_space = 0.0
        while not self._closing:
            await self.clock.sleep(TICK_INTERVAL)
            now = self.now()
            for sync in self.folders.values():
                sync.downloads.pump()
                # While the disk is full or the marker missing nothing is fetched or changed,
                # and the folder plans again when that ends: a due retry would only re-plan
                # on every tick. (A deletion to confirm holds back deletions only.)
                stalled = sync.disk_full or sync.marker_missing
                if not stalled and any(f.retry_at <= now for f in sync.failures.values()):
                    sync.dirty.set()
            if now - last_space >= SPACE_CHECK_INTERVAL:
                last_space = now
                for sync in self.folders.values():
                    await sync.check_space()
                    if await sync.is_back():
                        self.spawn(sync.scan())
                        if self.on_folder_back is not None:
                            self.on_folder_back(sync)
            if now - last_connect >= RECONNECT_INTERVAL:
                last_connect = now
                self._connect_known()
            if now - last_prune >= 3600.0:
                last_prune = now
                for sync in self.folders.values():
                    self.spawn(
                        asyncio.to_thread(
                            sync.store.prune_versions,
                            self.clock.time(),
                            self.config.sync.versions_keep_days * 86400.0,
                        )
                    )

    # -- inputs ---------------------------------------------------------------------------

    def add_address(self, addr: Addr, folder_ids: Iterable[bytes] | None = None) -> None:
        """A peer may be reached at ``addr`` (discovery, static peers); connect for the
        given folders (every folder when None)."""
        folders = set(self.folders) if folder_ids is None else set(folder_ids) & set(self.folders)
        self.addresses.setdefault(addr, set()).update(folders)
        self._connect(addr, folders)

    def remove_address(self, addr: Addr) -> None:
        self.addresses.pop(addr, None)

    def _connect_known(self) -> None:
        connected = {(a, f) for _, f, a in self.endpoint.peers()}
        for addr, folders in self.addresses.items():
            self._connect(addr, {f for f in folders if (addr, f) not in connected})

    def _connect(self, addr: Addr, folders: Iterable[bytes]) -> None:
        if self.strikes.banned(addr):
            return
        for folder in folders:
            if folder in self.folders:
                self.endpoint.connect(addr, folder)
        self.kick()

    def handle_event(self, event: Event) -> None:
        """Called on the loop by the transport for every protocol event."""
        sync = self.folders.get(bytes(event.folder))
        if sync is None:
            if isinstance(event, BlockRequested | ManifestRequested):
                self.endpoint.reject(event.request_id, FailReason.NOT_FOUND)
            return
        if isinstance(event, SessionEstablished):
            if self.strikes.banned(event.addr):
                logger.info("session with %s from a banned address ended", event.peer.hex())
                self.endpoint.close(event.peer, bytes(event.folder))
                return
            logger.info("session with %s for %s up", event.peer.hex(), sync.root)
            sync.exchange.session_up(event.peer, event.addr)
        elif isinstance(event, SessionClosed):
            if event.peer is not None:
                if not self._closing:  # a stop closes them all: its own line says so
                    logger.info(
                        "session with %s for %s closed: %s",
                        event.peer.hex(),
                        sync.root,
                        event.reason.name,
                    )
                sync.exchange.session_down(event.peer)
        elif isinstance(event, ManifestRequested):
            self.spawn(sync.exchange.answer_manifest(event))
        elif isinstance(event, ManifestReceived):
            self.spawn(sync.exchange.manifest_received(event))
        elif isinstance(event, BlockRequested):
            sync.exchange.block_requested(event)
        elif isinstance(event, BlockReceived):
            self.spawn(sync.downloads.block_received(event))
        elif isinstance(event, RequestFailed):
            if not sync.downloads.request_failed(event):
                sync.exchange.request_failed(event)
        elif isinstance(event, NotificationReceived):
            sync.exchange.notified(event)
        elif isinstance(event, RequestCancelled):
            sync.exchange.request_cancelled(event)

    def count_hostile(self, peer: bytes, what: str) -> None:
        """``peer`` sent what no honest node would: past a threshold its address is banned
        and every session from that address closed (see ``lanshare.strikes``)."""
        addrs = {a for p, _, a in self.endpoint.peers() if p == peer}
        ban = self.strikes.strike(peer, min(addrs, default=None), what)
        if ban is None:
            return
        self.endpoint.close(peer)
        for other, _, addr in self.endpoint.peers():
            if ban_key(addr) == ban.key:
                self.endpoint.close(other)
        self.kick()

    def sequence_changed(self) -> None:
        if self.on_sequence is not None:
            total = sum(s.info_sequence() for s in self.folders.values())
            self.on_sequence(total)

    # -- queries for the control socket ---------------------------------------------------

    def folder_for(self, path: Path) -> tuple[FolderSync, str]:
        """The folder holding ``path`` and the path relative to it ('' for the root)."""
        target = Path(os.path.abspath(path))
        for sync in self.folders.values():
            if target == sync.root:
                return sync, ""
            if sync.root in target.parents:
                return sync, target.relative_to(sync.root).as_posix()
        raise UsageError(f"{target} is not inside any shared folder")

    def status(self) -> dict[str, Any]:
        return {
            "node": {"id": self.node_id.hex(), "name": self.config.node.name},
            "folders": [sync.status() for sync in self.folders.values()],
            "banned": [
                {
                    "address": ban.key,
                    "peer": ban.peer.hex(),
                    "seconds_left": round(ban.until - self.now()),
                    "why": ban.why,
                }
                for ban in self.strikes.bans()
            ],
        }


def _with_in_progress(
    remotes: dict[bytes, dict[str, FileRecord]],
    progress: Mapping[bytes, Mapping[str, FileRecord]],
    paths: Collection[str],
) -> dict[bytes, dict[str, FileRecord]]:
    """``remotes`` with the records peers are downloading (``progress``) of ``paths``: the
    planner sees such a record as if the peer had that version (``exchange``)."""
    merged = dict(remotes)
    for peer, records in progress.items():
        mine = dict(merged.get(peer, {}))
        for path, record in records.items():
            if path not in paths:
                continue  # announced since the records were read, or another batch's
            current = mine.get(path)
            if current is None or not same_content(current, record):
                mine[path] = record
        if mine:
            merged[peer] = mine
    return merged


def _in_scope(action: planner.Action, scope: Collection[str]) -> bool:
    """The action is on a path in ``scope``, or makes a directory that leads to one."""
    if prioritised(action.path, scope):
        return True
    if isinstance(action, planner.MakeDir):
        return any(p.startswith(action.path + "/") for p in scope)
    return False


def _stat_cache(root: Path, record: FileRecord) -> tuple[int, int]:
    """Inode and ctime of what was just written, so the next scan need not read it."""
    with contextlib.suppress(OSError):
        st = os.lstat(root / record.path)
        if record.deleted:
            return 0, 0
        return st.st_ino, st.st_ctime_ns
    return 0, 0
