"""The sync engine: keeps every shared folder at the global newest version, with its peers.

Async coordination, no sockets: it issues commands on the sans-IO ``Endpoint`` (then asks the
transport to send with ``kick``), reads the endpoint's events, and does every disk operation
in worker threads: through ``asyncio.to_thread`` (index, scanner, store), and in batches
for serving (``serving.BlockServer``).

Theory of operation
-------------------
* **Local side.** A folder is scanned whole at start (and when asked: ``rescan()``, the
  watcher's safety net); a batch of watcher changes rescans just its paths, unless
  ``.lanshareignore`` changed (its one live rules object, ``ignore.FolderRules``, shared with
  the scanner, the planner and the watcher, is reloaded before every scan): then the whole
  folder is rescanned, since what the rules cover changed. A scan that changed anything bumps
  the folder's sequence, and every connected peer of the folder is told at once (a NOTIFY with
  the new sequence). Before each scan the folder marker is checked (``marker.check``): without
  it (an empty mount point) the folder pauses and nothing is scanned or changed until it is
  back. Every local change stamps the marker with the index's sequence; a folder found with an
  older stamp (a backup restored) is scanned fetch-only once. A node that keeps no whole
  folder (a short-lived ``ls`` or ``pull``) always scans fetch-only: it records no version of
  its own, and what it no longer holds is forgotten, never deleted.
* **Manifest exchange.** When a session comes up, we ask the peer for its records with a
  sequence above the highest we hold of it; answers come in bounded batches and are asked
  for again while ``more`` is set. Each batch starts with a header entry (``0x00``, the peer's
  8-byte index id and its current sequence): a peer whose index id changed (its database was
  reset) is forgotten and read again from 0. Entries are decoded and validated
  (``manifest.decode_entry`` checks paths, sizes and hashes) before they are stored per peer
  in the index, so a restart costs only what changed. A NOTIFY whose sequence is above the
  stored one, or one that carries no HAVE hashes (a peer's set of downloads changed), asks
  for the news.
* **Re-sharing.** A peer's answer also carries entries (``0x02``) for the files of more than
  one block it is downloading right now: the record it is building and which blocks it
  already holds; every block it verifies afterwards is announced with a HAVE. (A one-block
  file has nothing to share until it is whole; it then travels as a record.) We plan with
  such a record as if the peer had that version, but ask it only for the blocks it
  announced, so C can pull from B what B is still receiving from A.
* **Planning** (``planner.plan``, pure) runs after any change, debounced, in a worker
  thread, against the records of the paths some peer holds another record of (plus
  in-progress ones), the rest of the folder answered by the index (``planinputs``): a folder
  in sync decodes no record to plan. A peer's records that equal ours in all but the
  sequence (our own changes, sent back once the peer took them) are no change, unless the
  path has work in hand or a problem; nor is a placed batch of downloads, unless a pass
  skipped a path then in flight, a conflict copy appeared or nothing is left to fetch (that
  pass finds the folder in sync). Directory, symlink, metadata,
  conflict and delete actions are applied at once, in the plan's order; builds from local
  data copy blocks synchronously before anything else can move their sources; fetches
  become downloads.
* **Mass-deletion guard.** Scans and plans are judged with the folder's deletion history
  from the index and the wall-clock time (that of the moment the guard tripped, while it
  holds deletions back, so a pause lasts until resolved); deletions made are added to the
  history. ``resume`` confirms on this node only: it applies them and clears the history.
* **Downloads.** Each is a temporary file (``store.Assembly``); blocks already elsewhere on
  disk are copied, the rest are scheduled by ``scheduler.Scheduler`` across every peer that
  has them (rarest first, pipelined by measured rate, end game, failover). Open files are a
  bounded resource: at most half as many downloads are fetched at once as the store keeps
  files open (``store.OpenAssemblies``, sized from ``RLIMIT_NOFILE``); the plan's other
  fetches wait in its order and start as slots free, a batch at a time (one thread hop and
  one index transaction for many files), so thousands of small files stream as one workload.
  A process out of descriptors (``EMFILE``/``ENFILE``) holds new downloads back for
  ``OPEN_RETRY``; no file ever fails for it. A block is hashed once, where it arrives (the
  protocol) or is read (a local copy); the folder's ``BlockWriter`` writes verified blocks
  and records them in the index in batches, one thread hop each, and only then are they
  announced and counted done, so a crash resumes without fetching them again. Finished files
  are placed in batches (``store.place``): each checked whole from the block hashes verified
  in memory, fsynced, and renamed into place only if the local file is still what the plan
  saw (otherwise the download is discarded and the next plan decides); each directory is
  fsynced once, and the batch is one index transaction and one announcement.
* **Serving.** Each folder's block server (``serving.BlockServer``) answers block requests
  in batches read in a worker thread: from the file that holds the block (its block table
  kept decoded, its descriptor kept open, every block checked against its hash once), from a
  download's verified blocks, or from any local file with the same content. Every commit of
  a path's record, and every scan that changed something, invalidates what it keeps.
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
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanshare import deleteguard, keys, marker, planinputs, planner, scanner
from lanshare.blockwriter import BlockWriter
from lanshare.errors import (
    DecodeError,
    DescriptorsExhausted,
    DiskFullError,
    IntegrityError,
    LanshareError,
    LocalChangeError,
    StorageError,
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
from lanshare.identity import short_id
from lanshare.ignore import FolderRules
from lanshare.index import CacheUpdate, LocalChange, Partial
from lanshare.manifest import (
    BatchHeader,
    Block,
    FileRecord,
    InProgress,
    decode_entry,
    encode_entry,
)
from lanshare.protocol import wire
from lanshare.scheduler import (
    BlockRef,
    Cancel,
    LocalCopy,
    LocalSource,
    Request,
    Scheduler,
    SchedulerConfig,
)
from lanshare.scheduler import FailReason as BlockFail
from lanshare.serving import BlockReader, BlockServer
from lanshare.store import Assembly, FolderStore, LocalState, Placement, VerifiedBlock

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable

    from lanshare.config import Config, FolderConfig
    from lanshare.events import Addr, Event
    from lanshare.identity import NodeId
    from lanshare.index import FolderInfo, Index
    from lanshare.protocol.endpoint import Endpoint

logger = logging.getLogger(__name__)

PLAN_DEBOUNCE = 0.05
"""Seconds a burst of changes is collected before one planning pass."""
PLAN_SPACING = 2.0
"""A planning pass of T seconds is followed by at least PLAN_SPACING * T seconds of rest."""
OPEN_RETRY = 0.5
"""Seconds new downloads wait after the process ran out of file descriptors."""
REFILL_FRACTION = 4
"""Waiting downloads start once this fraction of the download slots is free."""
TICK_INTERVAL = 0.25
"""Seconds between scheduler passes while downloads run (timeouts, stalled blocks)."""
RECONNECT_INTERVAL = 5.0
"""Seconds between attempts to (re)connect to known peer addresses without a session."""
SPACE_CHECK_INTERVAL = 2.0
"""Seconds between checks of what a folder waits for: free space after a full disk, or the
folder itself after it went missing (an unmounted disk)."""
SPACE_RESUME_MARGIN = 1024 * 1024
"""Bytes that must be freed, beyond what was free when the disk filled, to resume pulls."""
MANIFEST_RECORDS_PER_BATCH = 2000
"""Records read from the index for one manifest answer (then cut to the size limit)."""
HAVE_FLUSH_INTERVAL = 0.05
"""Seconds verified blocks are collected before one HAVE notification."""
MAX_HAVE_PER_NOTIFY = 32
RATE_WINDOW = 1.0
"""Seconds over which a peer's delivery rate is measured."""
MAX_IN_PROGRESS_ANNOUNCED = 64
"""Downloads announced to peers for re-sharing (the newest of more than one block)."""
RATE_IDLE = 2 * RATE_WINDOW
"""Seconds without a delivered block after which a peer's rate shows as 0."""
RETRY_FIRST = 2.0
"""Seconds before a failed path is tried again; doubled after each failure."""
RETRY_MAX = 300.0
"""Longest wait between two attempts at a failing path (a change seen by a scan retries
at once)."""
MAX_CONFLICT_PATHS = 100
"""Conflict copies listed by name in ``status``; ``conflicts`` counts them all."""

_OTHER_CONTENT = (
    "{} holds other content here than on the LAN; move it away to pull the LAN's version"
)


@dataclass(slots=True)
class PeerLink:
    """A session with one peer for one folder."""

    peer: bytes
    addr: Addr
    known_sequence: int = 0
    manifest_request: int | None = None
    refetch: bool = False
    listed: bool = False
    """Its whole file list was read once since the session came up."""
    in_progress: dict[str, FileRecord] = field(default_factory=dict)
    have: set[bytes] = field(default_factory=set)
    window_bytes: int = 0
    window_start: float = 0.0
    rate: float = 0.0
    last_block_at: float = float("-inf")


@dataclass(slots=True)
class Failure:
    """A path whose action or download failed here, and when to try it again."""

    message: str
    attempts: int
    retry_at: float
    """Engine time of the next attempt; infinite while a retried download runs."""


@dataclass(slots=True)
class Download:
    """A file being assembled from peers' blocks and local copies."""

    record: FileRecord
    planned: LocalState
    sources: tuple[bytes, ...]
    assembly: Assembly | None = None
    done: set[int] = field(default_factory=set)
    writing: int = 0
    finishing: bool = False
    conflict: planner.Conflict | None = None
    """The local loser to keep under its conflict name when the download is placed."""
    abandoned: bool = False
    """No longer wanted; its descriptors close once no write or commit uses them."""
    bytes_done: int = 0
    index_at: dict[int, int] = field(default_factory=dict)
    """Block index by offset."""
    offered: dict[bytes, bool] = field(default_factory=dict)
    """Peers the scheduler was told hold this file: True for all of it, False for the
    blocks they had verified while downloading it themselves."""

    def __post_init__(self) -> None:
        self.index_at = {block.offset: i for i, block in enumerate(self.record.blocks)}

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.record.blocks) and self.writing == 0


@dataclass(frozen=True, slots=True)
class _Opened:
    """A download opened off the loop: its file, what the plan saw at its path, the blocks
    already verified in it (a resume) and where contents it needs already lie here."""

    assembly: Assembly
    planned: LocalState
    done: set[int]
    local_sources: dict[bytes, LocalSource]


class FolderSync:
    """One shared folder: its scans, peers, plan, downloads and the blocks it serves."""

    def __init__(self, engine: Engine, config: FolderConfig, info: FolderInfo) -> None:
        self.engine = engine
        self.config = config
        self.info = info
        self.raw_key = keys.parse_key(config.key)
        self.folder_id = keys.folder_id(self.raw_key)
        self.root = Path(config.path)
        self.store = FolderStore(self.root)
        self.writer = BlockWriter(self.store, engine.index, info.id)
        self.rules = FolderRules(self.root, config.ignore)
        self.state = "scanning"
        self.reason = ""
        self.links: dict[bytes, PeerLink] = {}
        self.downloads: dict[str, Download] = {}
        self.server = BlockServer(
            BlockReader(self.store, engine.index, info.id),
            send=engine.endpoint.send_block,
            reject=engine.endpoint.reject,
            kick=engine.kick,
            spawn=engine.spawn,
            downloads=lambda: self.downloads,
        )
        self.scheduler = Scheduler(
            random.Random(int.from_bytes(self.folder_id[:8], "big")),
            SchedulerConfig(request_timeout=engine.config.transfer.request_timeout),
        )
        self.requests: dict[int, tuple[bytes, BlockRef]] = {}
        self.committing: set[str] = set()
        """Paths whose finished download waits to be put in place, or is being put."""
        self.to_place: list[Download] = []
        self.placing = False
        self.undecided = False
        """A plan skipped a path being opened or put in place: the next placement plans."""
        self.outgoing: dict[tuple[bytes, BlockRef], int] = {}
        self.failures: dict[str, Failure] = {}
        """Paths that failed here (a directory not writable, …); they make the folder
        ``error`` and are retried with backoff, and at once after a scan."""
        self.plan_problems: dict[str, str] = {}
        """Paths the last plan left out, and why (a structure no disk can hold, …)."""
        self.deferred: dict[str, int] = {}
        """Files (and sizes) the plan wants but the scheduler had no room for yet."""
        self.waiting: dict[str, tuple[planner.Fetch, planner.Conflict | None]] = {}
        """Fetches of the last plan waiting for a download slot, in the plan's order."""
        self.wanted: set[str] = set()
        """Paths the last plan fetches (or waits for space to fetch)."""
        self.remotes: dict[bytes, dict[str, FileRecord]] = {}
        """The peers' records the last plan saw (for the downloads it starts later)."""
        self.opening: set[str] = set()
        """Paths whose downloads are being opened (off the loop) right now."""
        self.open_held: asyncio.TimerHandle | None = None
        """Set while new downloads wait for file descriptors to be freed."""
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
        self.pending_have: list[bytes] = []
        self.have_flush: asyncio.TimerHandle | None = None
        self.announce_downloads = False

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
            )
        except LanshareError as exc:
            self.state, self.reason = "error", str(exc)
            logger.warning("folder %s: %s", self.root, exc)
            self._stamp_marker()  # for what the scan recorded before it failed
            self.server.invalidate()
            return None
        if summary.new or summary.changed or summary.deleted or summary.forgotten:
            self.server.invalidate()
        if summary.forgotten:
            logger.info(
                "folder %s: %d paths no longer here; not deleted, the other machines keep them",
                self.root,
                summary.forgotten,
            )
        if restored:  # the index now says what this folder holds: later scans are as usual
            self._stamp_marker()
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
            self.announce_sequence()
        self.dirty.set()
        return summary

    async def _keep_orphans(self, orphans: Iterable[tuple[str, str]]) -> None:
        """Move files this node lost track of (``ScanSummary.orphans``) to their conflict
        names: kept beside the version the LAN holds, which the next plan fetches into the
        name, and recorded as new files by the scan that follows."""
        moved = 0
        for path, name in orphans:
            await self._own_write(path)
            await self._own_write(name)
            try:
                await asyncio.to_thread(self.store.rename_local, path, name)
            except LanshareError as exc:
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

    def _stamp_marker(self) -> None:
        """Stamp the marker with the index's sequence after a local change (see ``marker``),
        unless the marker there is not this folder's. On the loop, not in a thread: a stamp
        left behind by a stop would make the next start take the folder for a restored one."""
        if marker.read(self.root, self.folder_id) is not marker.Found.THIS:
            return
        try:
            stamp = marker.Generation(self.info.index_id, self.info_sequence())
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
        self._stamp_marker()
        sequence = self.info_sequence()
        for link in self.links.values():
            self.engine.endpoint.notify(link.peer, self.folder_id, sequence)
        self.engine.sequence_changed()
        self.engine.kick()

    # -- peers and manifests --------------------------------------------------------------

    def session_up(self, peer: bytes, addr: Addr) -> None:
        known = self.engine.index.remote_peer(self.info.id, peer)
        link = PeerLink(peer, addr, known_sequence=known.max_sequence if known else 0)
        link.window_start = self.engine.now()
        self.links[peer] = link
        self.ask_manifest(link)
        # Our in-progress downloads are news for it too.
        self.engine.endpoint.notify(peer, self.folder_id, self.info_sequence())

    def session_down(self, peer: bytes) -> None:
        link = self.links.pop(peer, None)
        if link is None:
            return
        for rid, (owner, _) in list(self.requests.items()):
            if owner == peer:
                del self.requests[rid]
        self.outgoing = {k: v for k, v in self.outgoing.items() if k[0] != peer}
        self._apply_steps(self.scheduler.peer_gone(peer))
        for download in self.downloads.values():
            download.offered.pop(peer, None)
        if link.in_progress:
            self.dirty.set()
        self.pump()

    def info_sequence(self) -> int:
        return self.engine.index.sequence(self.info.id)

    def ask_manifest(self, link: PeerLink) -> None:
        if link.manifest_request is not None:
            link.refetch = True
            return
        link.refetch = False
        link.manifest_request = self.engine.endpoint.request_manifest(
            link.peer, self.folder_id, link.known_sequence
        )
        self.engine.kick()

    async def answer_manifest(self, event: ManifestRequested) -> None:
        info = await asyncio.to_thread(self.engine.index.folder, self.info.id)
        entries = [encode_entry(BatchHeader(info.index_id, info.sequence))]
        size = wire.manifest_batch_size(entries)
        # In-progress downloads go first but may fill at most half of the batch.
        for download in reversed(self._shared_downloads()):
            entry = encode_entry(InProgress(download.record, tuple(sorted(download.done))))
            if size + 4 + len(entry) > event.max_size // 2:
                break
            entries.append(entry)
            size += 4 + len(entry)
        records = await asyncio.to_thread(
            self.engine.index.records_since,
            self.info.id,
            event.since_seq,
            MANIFEST_RECORDS_PER_BATCH,
        )
        more = len(records) == MANIFEST_RECORDS_PER_BATCH
        for record in records:
            encoded = encode_entry(record)
            if size + 4 + len(encoded) > event.max_size:
                more = True
                break
            entries.append(encoded)
            size += 4 + len(encoded)
        self.engine.endpoint.send_manifest(event.request_id, entries, more)
        self.engine.kick()

    async def manifest_received(self, event: ManifestReceived) -> None:
        link = self.links.get(event.peer)
        if link is None or link.manifest_request != event.request_id:
            return
        records: list[FileRecord] = []
        in_progress: dict[str, FileRecord] = {}
        have: set[bytes] = set()
        restart = False
        for raw in event.records:
            try:
                entry = decode_entry(raw)
            except DecodeError as exc:
                self.engine.count_hostile(event.peer, f"bad manifest entry: {exc}")
                continue
            if isinstance(entry, BatchHeader):
                restart = await self._check_index_id(link, entry)
            elif isinstance(entry, InProgress):
                in_progress[entry.record.path] = entry.record
                have.update(entry.record.blocks[i].hash for i in entry.verified)
            else:
                records.append(entry)
        link.manifest_request = None
        if restart:
            link.listed = False
            self.ask_manifest(link)
            return
        news = not link.listed
        if records:
            link.known_sequence, same = await asyncio.to_thread(
                self._store_remote, event.peer, records
            )
            news = news or any(r.path not in same or self._pending(r.path) for r in records)
        if in_progress.keys() != link.in_progress.keys() or have - link.have:
            news = True
            link.in_progress = in_progress
            link.have |= have
            self.scheduler.peer_has(event.peer, have)
        if event.more or link.refetch:
            self.ask_manifest(link)
        else:
            link.listed = True
        # A peer that took our changes sends them back as its own records: they change no
        # plan, and planning reads every record of the folder, so a sender would spend a
        # third of its time planning for nothing while it serves.
        if news:
            self.dirty.set()

    def _store_remote(self, peer: bytes, records: list[FileRecord]) -> tuple[int, set[str]]:
        """Store a peer's records; its highest sequence now, and the paths of those it
        holds exactly as we do. Blocking: call it in a thread."""
        index = self.engine.index
        return index.remote_upsert(self.info.id, peer, records), index.matching_local(
            self.info.id, records
        )

    def _pending(self, path: str) -> bool:
        """Whether ``path`` has work in hand or a problem a peer's record may settle."""
        return (
            path in self.wanted
            or path in self.downloads
            or path in self.committing
            or path in self.failures
            or path in self.plan_problems
            or path in self.waiting_for_space
            or path in self.deferred
        )

    async def _check_index_id(self, link: PeerLink, header: BatchHeader) -> bool:
        index_id = header.index_id
        known = await asyncio.to_thread(self.engine.index.remote_peer, self.info.id, link.peer)
        if known is not None and known.index_id not in (b"", index_id):
            logger.info("peer %s reset its index; reading it again", link.peer.hex())
            await asyncio.to_thread(
                self.engine.index.remote_reset, self.info.id, link.peer, index_id
            )
            link.known_sequence = 0
            return True
        if known is None or known.index_id == b"":
            await asyncio.to_thread(
                self.engine.index.remote_reset, self.info.id, link.peer, index_id
            )
            if known is not None and known.max_sequence:
                link.known_sequence = 0
                return True
        return False

    def notified(self, event: NotificationReceived) -> None:
        link = self.links.get(event.peer)
        if link is None:
            return
        if event.have:
            fresh = set(event.have) - link.have
            link.have |= fresh
            if fresh:
                self.scheduler.peer_has(event.peer, fresh)
                self.pump()
        if event.seq > link.known_sequence or not event.have:
            self.ask_manifest(link)

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
        download = self.downloads.get(rel)
        return None if download is None else download.bytes_done

    def peers_listed(self) -> tuple[int, bool]:
        """How many peers are connected for this folder, and whether every one of them has
        answered every manifest request (what they list is then all they have)."""
        idle = all(link.manifest_request is None for link in self.links.values())
        return len(self.links), idle

    # -- planning -------------------------------------------------------------------------

    async def plan_loop(self) -> None:
        await self.scanned.wait()
        next_pass = 0.0
        while True:
            await self.dirty.wait()
            await asyncio.sleep(max(PLAN_DEBOUNCE, next_pass - self.engine.now()))
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
            result, fetches, remotes = await self._decide_and_change()
        wanted = set(self.waiting_for_space)
        self.deferred.clear()
        self.remotes = remotes
        waiting: dict[str, tuple[planner.Fetch, planner.Conflict | None]] = {}
        now = self.engine.now()
        for action, conflict in fetches:
            wanted.add(action.path)
            failure = self.failures.get(action.path)
            if failure is not None and failure.retry_at > now:
                continue  # failed lately: its retry is due later (or after a scan)
            if await self._want(action, remotes, conflict):
                waiting[action.path] = (action, conflict)
        self.wanted, self.waiting = wanted, waiting
        for path in [p for p in self.downloads if p not in wanted]:
            await self._abandon(path, discard=True)
        await self._start_waiting()
        await self._drop_stale_partials()
        if not result.paused and not self.local_pause and not self.disk_full:
            if self.downloads or self.committing or self.deferred or self.waiting:
                self.state, self.reason = "syncing", ""
            elif self.state != "error":
                self.state, self.reason = "in_sync", ""
                self.synced.set()
        if self.downloads or self.waiting:
            self.synced.clear()
        self.pump()

    async def _decide_and_change(
        self,
    ) -> tuple[
        planner.Plan,
        list[tuple[planner.Fetch, planner.Conflict | None]],
        dict[bytes, dict[str, FileRecord]],
    ]:
        """Plan, and apply every action but the fetches, which are returned (with the
        conflict each settles when it is placed) together with the peers' records."""
        started = self.engine.now()
        in_progress = {path for link in self.links.values() for path in link.in_progress}
        inputs = await asyncio.to_thread(
            planinputs.load, self.engine.index, self.info.id, in_progress
        )
        remotes = inputs.remotes
        history, held = await asyncio.to_thread(self._guard_inputs)
        now = held if held is not None else time.time()
        allowed, self.allow_mass_delete = self.allow_mass_delete, False
        self.waiting_for_space.clear()
        for peer, link in self.links.items():
            if link.in_progress:
                merged = dict(remotes.get(peer, {}))
                for path, record in link.in_progress.items():
                    if path not in in_progress:
                        continue  # announced since the records were read: the next pass
                    current = merged.get(path)
                    if current is None or not _same_content(current, record):
                        merged[path] = record
                remotes[peer] = merged
        # In a thread: the context's answers are index queries.
        result = await asyncio.to_thread(
            planner.plan,
            inputs.local,
            remotes,
            local_short_id=self.engine.short_id,
            priority=frozenset(self.priority),
            limits=self.engine.delete_limits,
            delete_history=history,
            now=now,
            allow_mass_delete=allowed,
            ignored=self.rules.matches,
            context=inputs.context,
        )
        self.planning_seconds = self.engine.now() - started
        self.plan_problems = {
            problem.path: f"{problem.kind.value}: {problem.detail}".rstrip(": ")
            for problem in result.problems
        }
        self.conflict_paths = set(inputs.conflict_copies)
        self.mass_delete_pause = result.paused
        if not allowed:
            await self._hold(held, result.paused or bool(self.local_pause), now)
        if result.paused or self.local_pause or self.disk_full:
            remote_pause = result.verdict.reason(self.engine.peer_names) if result.verdict else ""
            self.state, self.reason = "paused", remote_pause or self.local_pause or self.disk_full
        actions = result.actions
        if self.marker_missing:
            actions = ()
        if self.scope is not None:
            scope = self.scope
            actions = tuple(a for a in actions if _in_scope(a, scope))
        # A failure whose path no longer needs an action here was settled another way (a
        # newer version, the path deleted): it is no problem any more.
        needed = {a.path for a in actions} | set(self.downloads) | self.committing
        for path in [p for p in self.failures if p not in needed]:
            del self.failures[path]
        tick = self.engine.now()
        fetches: list[tuple[planner.Fetch, planner.Conflict | None]] = []
        # A conflict is applied together with the winner's action on the same path: the
        # loser leaves its name only when the winner takes it (for a fetch, when the download
        # is complete), so no peer ever sees the path vacated and nothing waits half done.
        conflicts: dict[str, planner.Conflict] = {}
        deleted: dict[bytes, int] = {}
        for action in actions:
            if isinstance(action, planner.Conflict):
                conflicts[action.path] = action
                continue
            conflict = conflicts.pop(action.path, None)
            if self.disk_full and isinstance(action, planner.Fetch | planner.BuildFromLocal):
                self.waiting_for_space[action.path] = action.record.size
                continue
            if isinstance(action, planner.Fetch):
                fetches.append((action, conflict))
                continue
            failure = self.failures.get(action.path)
            if failure is not None and failure.retry_at > tick:
                continue  # failed lately: its retry is due later (or after a scan)
            try:
                if conflict is not None and not isinstance(action, planner.SetMetadata):
                    await self._apply_with_conflict(conflict, action)
                else:
                    await self._apply(action)
                if isinstance(action, planner.Delete):
                    origin = planner.deletion_origin(action, self.engine.short_id)
                    deleted[origin] = deleted.get(origin, 0) + 1
            except LocalChangeError as exc:
                logger.info("folder %s: %s", self.root, exc)
                await self._local_change(action.path)
                self.dirty.set()
            except DiskFullError as exc:
                await self._pause_for_space(exc)
            except LanshareError as exc:
                self._fail(action.path, exc)
            else:
                self.failures.pop(action.path, None)
        if allowed and deleted:
            await self._confirmed_deletions()
        elif deleted:
            live = result.live_entries
            await self._record_deletions(
                [deleteguard.Deletion(now, o, n, live) for o, n in sorted(deleted.items())]
            )
        return result, fetches, remotes

    def _fail(self, path: str, exc: LanshareError) -> None:
        """``path`` failed here: keep why, for ``status``, and when to try it again.

        A process out of file descriptors is no failure of the file that met it: new
        downloads wait a moment, and the plan that follows asks for the file again."""
        if isinstance(exc, DescriptorsExhausted):
            self._hold_opening(exc)
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

    def _retry_due(self, path: str) -> None:
        """A retried download of a failing path stopped without failing again (paused for
        space, fetched again after a bad block): the next plan may try it, or nothing would
        ever retry it and the folder would stay ``error``. (A deferred one is asked again
        by the plan after the next placement, its wait unchanged.)"""
        failure = self.failures.get(path)
        if failure is not None and failure.retry_at == float("inf"):
            failure.retry_at = self.engine.now()

    def _log_conflict(self, conflict: planner.Conflict) -> None:
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

    async def _pause_for_space(self, exc: DiskFullError) -> None:
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
        for download in list(self.downloads.values()):
            self.waiting_for_space[download.path] = download.record.size - download.bytes_done
            await self._abandon(download.path, discard=False)

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
            if path in self.downloads or path in self.committing or path in self.waiting:
                continue
            # Still wanted: deferred by the scheduler, or failed and due for a retry, it
            # resumes from its verified blocks (another version's file goes when it opens).
            if path in self.opening or path in self.wanted:
                continue
            if self.scope is not None and not _prioritised(path, self.scope):
                continue
            await asyncio.to_thread(self.store.discard_temp, _temp_of(partial))
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
        """Move the loser aside under its conflict name, then apply the winner's action
        (which now replaces nothing); if that fails, the loser goes back to its name."""
        if isinstance(action, planner.BuildFromLocal):
            # Blocks the plan reads from the loser are now found under its conflict name.
            copies = tuple(
                dataclasses.replace(c, source_path=conflict.conflict_name)
                if c.source_path == conflict.path
                else c
                for c in action.copies
            )
            action = dataclasses.replace(action, copies=copies)
        await asyncio.to_thread(self.store.rename_local, conflict.path, conflict.conflict_name)
        try:
            await self._apply(dataclasses.replace(action, replaces=None))
        except BaseException:
            with contextlib.suppress(LanshareError):
                await asyncio.to_thread(
                    self.store.rename_local, conflict.conflict_name, conflict.path
                )
            raise
        await self._commit(conflict.copy_record)
        self._log_conflict(conflict)

    async def _apply(self, action: planner.Change) -> None:
        store = self.store
        now = time.time()
        if isinstance(action, planner.MakeDir):
            await asyncio.to_thread(store.make_dir, action.path, action.record.mode)
        elif isinstance(action, planner.MakeSymlink):
            await self._own_write(action.path)
            await asyncio.to_thread(store.make_symlink, action.path, action.record.symlink_target)
        elif isinstance(action, planner.SetMetadata):
            planned = await self._planned(action.replaces)
            await asyncio.to_thread(
                store.set_metadata, action.path, action.record.mode, action.record.mtime_ns, planned
            )
        elif isinstance(action, planner.Delete):
            planned = await self._planned(action.replaces)
            entry = action.replaces.type if action.replaces is not None else action.record.type
            await self._own_write(action.path)
            await asyncio.to_thread(store.delete, action.path, entry, planned, now)
        elif isinstance(action, planner.BuildFromLocal):
            await self._build_from_local(action)
            return
        await self._commit(action.record)

    async def _build_from_local(self, action: planner.BuildFromLocal) -> None:
        record = action.record
        assembly = await asyncio.to_thread(self.store.begin, record)
        placed = False
        try:
            index_at = {block.offset: i for i, block in enumerate(record.blocks)}
            written: set[int] = set()
            for copy in action.copies:
                source = Block(copy.source_offset, copy.size, copy.hash)
                data = await asyncio.to_thread(
                    self.store.read_block, copy.source_path, source, record.hash_algo
                )
                if data is None:
                    raise LocalChangeError(f"{copy.source_path} changed; {record.path} replanned")
                block = VerifiedBlock(index_at[copy.offset], data)  # read_block checked it
                await asyncio.to_thread(self.store.write_verified, assembly, block)
                written.add(block.index)
            planned = await self._planned(action.replaces)
            await self._own_write(record.path)
            (error,) = await asyncio.to_thread(
                self.store.place, [Placement(assembly, planned, written)], time.time()
            )
            if error is not None:
                raise error
            placed = True
        finally:
            assembly.close()
            if not placed:  # no index row tracks this temporary file: it goes now
                await asyncio.to_thread(self.store.discard, record)
        await self._commit(record)

    async def _commit(self, *records: FileRecord, finished: Collection[str] = ()) -> None:
        """Record that ``records`` are now on disk (each with a new local sequence), and
        forget the partial downloads of the paths ``finished``, in one transaction."""

        def store() -> None:
            index = self.engine.index
            changes = [LocalChange(r, *_stat_cache(self.root, r)) for r in records]
            with index.transaction():
                for path in finished:
                    index.partial_drop(self.info.id, path)
                index.commit_changes(self.info.id, changes)

        await asyncio.to_thread(store)
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
        return await asyncio.to_thread(self._planned_now, replaces)

    async def _local_change(self, path: str) -> None:
        """The store refused to touch ``path``, changed since the plan: rescan, reading
        ``path`` again whatever its stat says (an edit that kept size and mtime on FAT,
        whose ctime is its mtime, leaves the scan cache as it was)."""
        await asyncio.to_thread(
            self.engine.index.commit_changes, self.info.id, [], [CacheUpdate(path, 0, 0)]
        )
        self.server.invalidate([path])
        self.engine.spawn(self.scan([path]))

    async def _own_write(self, rel: str) -> None:
        watcher = self.engine.watchers.get(self.info.id)
        if watcher is not None:
            watcher(rel)

    # -- downloads ------------------------------------------------------------------------

    async def _want(
        self,
        action: planner.Fetch,
        remotes: dict[bytes, dict[str, FileRecord]],
        conflict: planner.Conflict | None = None,
    ) -> bool:
        """Whether ``action`` needs a new download; a running one of the same version
        only learns which peers hold it now."""
        if action.path in self.committing or action.path in self.opening:
            # A finished download of this path waits to be put in place (or this path is
            # being opened): this plan was made before that is recorded, and the pass that
            # follows the placement decides again.
            self.undecided = True
            return False
        existing = self.downloads.get(action.path)
        if existing is not None:
            if existing.record.file_hash == action.record.file_hash and (
                existing.record.version == action.record.version
            ):
                existing.conflict = conflict
                self._offer(existing, remotes)
                return False
            # Same content under a newer version: keep the verified blocks (same temp file).
            same = existing.record.file_hash == action.record.file_hash
            await self._abandon(action.path, discard=not same)
        return True

    def _slots(self) -> int:
        """Downloads fetched at once: each one keeps its temporary file open, and the
        store's bound on open files must hold them all with as many again being put in
        place."""
        return max(1, self.store.assemblies.capacity // 2)

    def _free_slots(self) -> int:
        fetching = sum(1 for d in self.downloads.values() if not d.finishing)
        return self._slots() - fetching - len(self.opening)

    def _refill_at(self) -> int:
        """Free slots worth a thread hop: a batch, not one hop per finished file."""
        return max(1, min(self._slots() // REFILL_FRACTION, len(self.waiting)))

    async def _start_waiting(self, *, refill: bool = False) -> None:
        """Open downloads for the waiting fetches while slots are free (``refill``: while
        enough are free to be worth it): many per thread hop (and one index transaction),
        then schedule them all and send requests."""
        while self.waiting and not self.disk_full and self.open_held is None:
            free = self._free_slots()
            if free <= 0 or (refill and free < self._refill_at()):
                return
            batch = []
            for path in list(self.waiting)[:free]:
                batch.append(self.waiting.pop(path))
                self.opening.add(path)
            try:
                opened = await asyncio.to_thread(self._open_downloads, batch)
            finally:
                self.opening.difference_update(a.path for a, _ in batch)
            again: dict[str, tuple[planner.Fetch, planner.Conflict | None]] = {}
            for (action, conflict), outcome in zip(batch, opened, strict=True):
                if self._started(action, conflict, outcome) and action.path in self.wanted:
                    again[action.path] = (action, conflict)
            if again:  # first in line again, as the plan ordered them
                self.waiting = {**again, **self.waiting}
            self.pump()

    def _started(
        self,
        action: planner.Fetch,
        conflict: planner.Conflict | None,
        outcome: _Opened | LanshareError | None,
    ) -> bool:
        """Take a download opened off the loop into the transfer (or note why not); True
        when it is to wait for a slot again (the process ran out of descriptors)."""
        record = action.record
        if outcome is None:  # out of descriptors before its turn
            return True
        if isinstance(outcome, DescriptorsExhausted):
            self._hold_opening(outcome)
            return True
        if isinstance(outcome, DiskFullError):
            self.engine.spawn(self._pause_for_space(outcome))
            self.waiting_for_space[record.path] = record.size
            return False
        if isinstance(outcome, LanshareError):
            self._fail(record.path, outcome)
            return False
        if self.disk_full or record.path not in self.wanted or record.path in self.downloads:
            # The disk filled, or a plan made meanwhile no longer wants this version (its
            # temporary file stays for that plan's clean-up, or to resume).
            outcome.assembly.close()
            if self.disk_full:
                self.waiting_for_space[record.path] = record.size
            return False
        download = Download(record, outcome.planned, action.sources)
        download.conflict = conflict
        download.assembly, download.done = outcome.assembly, outcome.done
        download.bytes_done = sum(record.blocks[i].size for i in download.done)
        self.downloads[record.path] = download
        failure = self.failures.get(record.path)
        if failure is not None:  # being retried: it stays a problem until it is in place
            failure.retry_at = float("inf")
        self._downloads_changed()
        needed = [b for i, b in enumerate(record.blocks) if i not in download.done]
        availability = self._availability(record, self.remotes)
        download.offered = {peer: hashes is None for peer, hashes in availability.items()}
        self._schedule_file(download, needed, availability, outcome.local_sources)
        if self.downloads.get(record.path) is download and download.complete:
            self._finish_soon(download)
        return False

    def _hold_opening(self, exc: DescriptorsExhausted) -> None:
        """Out of file descriptors: start no download for a while (those running free
        theirs as they finish), then carry on. Never a failure of the file that met it."""
        if self.open_held is not None:
            return
        logger.info(
            "folder %s: %s; new downloads wait %.1f s", self.root, exc.__cause__ or exc, OPEN_RETRY
        )

        def resume() -> None:
            self.open_held = None
            self.engine.spawn(self._start_waiting(refill=True))
            self.dirty.set()  # an action the plan applies itself may have met it too

        self.open_held = asyncio.get_running_loop().call_later(OPEN_RETRY, resume)

    def _open_downloads(
        self, batch: list[tuple[planner.Fetch, planner.Conflict | None]]
    ) -> list[_Opened | LanshareError | None]:
        """Open (or reopen, to resume) the temporary files of ``batch`` and record them in
        the index, in one transaction. Blocking: one thread hop for the whole batch.

        For each fetch: the download opened, the error that kept it from opening, or None
        when the process ran out of descriptors before its turn (it waits for a slot).
        """
        index = self.engine.index
        outcomes: list[_Opened | LanshareError | None] = [None] * len(batch)
        assemblies: dict[int, tuple[Assembly, LocalState]] = {}
        for i, (action, _) in enumerate(batch):
            record = action.record
            try:
                planned = self._planned_now(action.replaces)
                temp = self.store.temp_path(record)
                old = index.partial_get(self.info.id, record.path)
                if old is not None and _temp_of(old) != temp:
                    # A download of another version of this path was left behind (a crash, a
                    # local edit): its temporary file goes, or it would stay forever.
                    self.store.discard_temp(_temp_of(old))
                assemblies[i] = (self.store.begin(record), planned)
            except DescriptorsExhausted as exc:
                outcomes[i] = exc
                break
            except LanshareError as exc:
                outcomes[i] = exc
        try:
            with index.transaction():
                partials = {
                    i: index.partial_begin(
                        self.info.id,
                        batch[i][0].path,
                        self.store.temp_path(batch[i][0].record),
                        batch[i][0].record.file_hash,
                    )
                    for i in assemblies
                }
        except LanshareError as exc:
            for i, (assembly, _) in assemblies.items():
                assembly.close()
                outcomes[i] = exc
            return outcomes
        for i, (assembly, planned) in assemblies.items():
            record = assembly.record
            try:
                done: set[int] = set()
                if partials[i].verified:
                    done = self.store.verified_blocks(assembly, set(partials[i].verified))
                needed = [b for n, b in enumerate(record.blocks) if n not in done]
                outcomes[i] = _Opened(assembly, planned, done, self._local_sources(needed))
            except LanshareError as exc:
                assembly.close()
                outcomes[i] = exc
        return outcomes

    def _planned_now(self, replaces: FileRecord | None) -> LocalState:
        """:meth:`_planned`, blocking."""
        if replaces is None:
            return LocalState.of(None)
        cache = self.engine.index.stat_cache(self.info.id, replaces.path, replaces.sequence)
        return LocalState.of(replaces, *cache)

    def _availability(
        self, record: FileRecord, remotes: dict[bytes, dict[str, FileRecord]]
    ) -> dict[bytes, Collection[bytes] | None]:
        """What each connected peer can serve of ``record``: None for all of it (it has
        this version), else the blocks it announced (while downloading, of any file)."""
        availability: dict[bytes, Collection[bytes] | None] = {}
        for peer, link in self.links.items():
            theirs = remotes.get(peer, {}).get(record.path)
            if theirs is not None and _same_content(theirs, record):
                in_progress = link.in_progress.get(record.path)
                availability[peer] = link.have if in_progress is theirs else None
            elif link.have:
                availability[peer] = link.have
        return availability

    def _offer(self, download: Download, remotes: dict[bytes, dict[str, FileRecord]]) -> None:
        """Tell the scheduler about peers that gained this download's file since it was
        planned: a session that came up later (after a restart the first plan runs on the
        peers' records in the index, before discovery finds them), or a peer that finished
        its own copy."""
        offered = False
        for peer, hashes in self._availability(download.record, remotes).items():
            full = hashes is None
            if download.offered.get(peer) in (True, full):
                continue
            download.offered[peer] = full
            blocks = download.record.blocks
            self.scheduler.peer_has(peer, {b.hash for b in blocks} if full else hashes or ())
            offered = True
        if offered:
            self.pump()

    def _schedule_file(
        self,
        download: Download,
        needed: list[Any],
        availability: dict[bytes, Collection[bytes] | None],
        local_sources: dict[bytes, LocalSource],
    ) -> None:
        priority = 0 if _prioritised(download.path, self.priority) else 1
        # Blocks of the same file at several indexes share one piece; the scheduler copies
        # the later ones locally. Its refs number blocks in `needed`; keep a map back.
        ok = self.scheduler.add_file(
            download.path,
            needed,
            availability,
            local_sources=local_sources,
            priority=priority,
        )
        if not ok:  # asked again by the plan that follows the next placement
            self.deferred[download.path] = download.record.size
            del self.downloads[download.path]
            if download.assembly is not None:
                download.assembly.close()

    def _local_sources(self, blocks: Iterable[Any]) -> dict[bytes, LocalSource]:
        found: dict[bytes, LocalSource] = {}
        for block in blocks:
            if block.hash in found:
                continue
            for location in self.engine.index.find_block(block.hash, self.info.id):
                found[block.hash] = LocalSource(location.path, location.offset)
                break
        return found

    def pump(self) -> None:
        """Turn the scheduler's next steps into requests, cancels and local copies, and
        start waiting downloads when slots are free."""
        startable = self.waiting and not self.opening and self.open_held is None
        if startable and self._free_slots() >= self._refill_at():
            self.engine.spawn(self._start_waiting(refill=True))
        if not self.downloads:
            return
        self._apply_steps(self.scheduler.next_requests(self.engine.now()))
        self.engine.kick()

    def _apply_steps(self, steps: Iterable[Request | Cancel | LocalCopy]) -> None:
        endpoint = self.engine.endpoint
        for step in steps:
            if isinstance(step, Request):
                download = self.downloads.get(step.block.file_id)
                if download is None:
                    continue
                index = self._block_index(download, step.block)
                rid = endpoint.request_block(
                    step.peer,
                    self.folder_id,
                    path=download.path,
                    index=index,
                    offset=step.block.offset,
                    size=step.block.size,
                    hash=step.block.hash,
                    hash_algo=download.record.hash_algo,
                )
                self.requests[rid] = (step.peer, step.block)
                self.outgoing[(step.peer, step.block)] = rid
            elif isinstance(step, Cancel):
                rid = self.outgoing.pop((step.peer, step.block), -1)
                if rid >= 0:
                    self.requests.pop(rid, None)
                    endpoint.cancel(rid)
            else:
                self.engine.spawn(self._local_copy(step))

    @staticmethod
    def _block_index(download: Download, ref: BlockRef) -> int:
        # The scheduler numbers only the blocks it was given (the missing ones).
        return download.index_at[ref.offset]

    async def _local_copy(self, copy: LocalCopy) -> None:
        download = self.downloads.get(copy.target.file_id)
        if download is None:
            return
        source = copy.source
        algo = download.record.hash_algo
        target = copy.target
        block = Block(source.offset, target.size, target.hash)
        data: bytes | None = None
        if isinstance(source, LocalSource):
            data = await asyncio.to_thread(self.store.read_block, source.path, block, algo)
        else:
            other = self.downloads.get(source.file_id)
            if other is not None and other.assembly is not None:
                rel = FolderStore.temp_path(other.record)
                data = await asyncio.to_thread(self.store.read_block, rel, block, algo)
        if data is None:
            self._apply_steps(self.scheduler.on_block_failed(target, None, BlockFail.LOCAL, 0.0))
            self.pump()
            return
        # read_block checked the bytes against the hash as it read them.
        verified = VerifiedBlock(self._block_index(download, target), data)
        await self._write(download, target, verified, peer=None)

    async def block_received(self, event: BlockReceived) -> None:
        owner = self.requests.pop(event.request_id, None)
        if owner is None:
            return
        peer, ref = owner
        self.outgoing.pop((peer, ref), None)
        link = self.links.get(peer)
        if link is not None:
            self._measure(link, len(event.data))
        download = self.downloads.get(ref.file_id)
        if download is None:
            return
        # The protocol delivers a block only once it matches the hash it was asked for.
        verified = VerifiedBlock(self._block_index(download, ref), event.data)
        await self._write(download, ref, verified, peer=peer)

    async def _write(
        self, download: Download, ref: BlockRef, block: VerifiedBlock, *, peer: bytes | None
    ) -> None:
        index = block.index
        if index in download.done or download.assembly is None or _gone(download):
            self._apply_steps(self.scheduler.on_block_done(ref, peer))
            return
        download.writing += 1
        try:
            await self.writer.write(download.assembly, block)
        except IntegrityError:
            reason = BlockFail.INTEGRITY if peer is not None else BlockFail.LOCAL
            if peer is not None:
                self.engine.count_hostile(peer, f"block {index} of {download.path} failed its hash")
            self._apply_steps(self.scheduler.on_block_failed(ref, peer, reason, self.engine.now()))
            self.pump()
            return
        except DiskFullError as exc:
            if not _gone(download):
                await self._pause_for_space(exc)
            return
        except LanshareError as exc:
            if _gone(download):
                return
            self._fail(download.path, exc)
            await self._abandon(download.path, discard=False)
            return
        finally:
            download.writing -= 1
            if _gone(download):
                _release(download)
        if _gone(download):
            return
        if index not in download.done:
            download.done.add(index)
            download.bytes_done += ref.size
        self._apply_steps(self.scheduler.on_block_done(ref, peer))
        self._queue_have(ref.hash)
        if download.complete:
            self._finish_soon(download)
        self.pump()

    def _finish_soon(self, download: Download) -> None:
        if not download.finishing:
            download.finishing = True
            # Its temporary file is spoken for from now on, even if a plan abandons it
            # before the placement gets its turn.
            self.committing.add(download.path)
            self.to_place.append(download)
            if not self.placing:
                self.placing = True
                self.engine.spawn(self._place_finished())

    async def _place_finished(self) -> None:
        """Put finished downloads in place, all that are ready in one go: one thread hop
        places them (``store.place``: fsync each file, rename each, fsync each directory
        once), then one index transaction and one announcement for the lot (each
        announcement has every peer read our file list again)."""
        try:
            async with self.busy:
                while self.to_place:
                    batch, self.to_place = self.to_place, []
                    ready: list[tuple[Download, Placement]] = []
                    for download in batch:
                        assert download.assembly is not None
                        planned = await self._prepare_placement(download)
                        done = frozenset(download.done)
                        keep = download.conflict.conflict_name if download.conflict else ""
                        ready.append((download, Placement(download.assembly, planned, done, keep)))
                    placements = [placement for _, placement in ready]
                    errors = await asyncio.to_thread(self.store.place, placements, time.time())
                    placed: list[tuple[Download, list[FileRecord]]] = []
                    for (download, _), error in zip(ready, errors, strict=True):
                        if error is None:
                            placed.append((download, self._placed(download)))
                        else:
                            await self._not_placed(download, error)
                    if not placed:
                        continue
                    paths = [d.path for d, _ in placed if not d.abandoned]
                    try:
                        records = (r for _, records in placed for r in records)
                        await self._commit(*records, finished=paths)
                    except LanshareError as exc:
                        # The files are in place and the index could not say so: a scan of
                        # them records what is there, once the index works again.
                        logger.warning("folder %s: %s", self.root, exc)
                        self.engine.spawn(self.scan([d.path for d, _ in placed]))
                    finally:
                        for download, _ in placed:
                            self.committing.discard(download.path)
                    if self._placement_changes_plan(d for d, _ in placed):
                        self.dirty.set()
        finally:
            self.placing = False

    def _placement_changes_plan(self, placed: Iterable[Download]) -> bool:
        """Whether a plan after this placement could differ from the last one with the
        placed paths done. Planning reads every record of the folder: a pass after each
        of a thousand small placements would take the receiver's time from receiving."""
        if self.undecided or self.deferred or any(d.conflict for d in placed):
            self.undecided = False
            return True
        # The last placement: the pass that finds nothing to do says the folder is in sync.
        return not (self.downloads or self.waiting or self.opening or self.to_place)

    async def _prepare_placement(self, download: Download) -> LocalState:
        """Ready one finished download to be placed: the watcher told of our writes (the
        local loser of a conflict stays in place until ``store.place`` keeps it under its
        conflict name). What the target must still be."""
        await self._own_write(download.path)
        if download.conflict is not None:
            await self._own_write(download.conflict.conflict_name)
        return download.planned

    def _placed(self, download: Download) -> list[FileRecord]:
        """A download is in place: whatever happened meanwhile, the index must say so. The
        records to commit."""
        record = download.record
        conflict = download.conflict
        if self.downloads.get(record.path) is download:
            del self.downloads[record.path]
            self._apply_steps(self.scheduler.remove_file(record.path))
        self.failures.pop(record.path, None)
        if conflict is None:
            return [record]
        self._log_conflict(conflict)
        return [conflict.copy_record, record]

    async def _not_placed(self, download: Download, exc: LanshareError) -> None:
        """A finished download could not be put in place; it is replanned (or, when even
        that fails, the path fails and is retried: never a path left placing for ever)."""
        self.committing.discard(download.path)
        download.finishing = False
        try:
            await self._replan(download, exc)
        except LanshareError as failed:
            logger.warning("folder %s: %s", self.root, failed)
            self._fail(download.path, failed)
            if self.downloads.get(download.path) is download:  # its temporary file stays
                await self._abandon(download.path, discard=False)
            else:
                _release(download)
            self.dirty.set()

    async def _replan(self, download: Download, exc: LanshareError) -> None:
        record = download.record
        discard = isinstance(exc, IntegrityError)
        if isinstance(exc, LocalChangeError):
            # Never clobber a local edit. Keep the verified temporary file (a later plan
            # that still wants this version resumes from it) and rescan, so the next plan
            # sees the edit and decides: a newer local version, or a conflict copy.
            logger.info("folder %s: %s", self.root, exc)
            if self.engine.whole_folders:
                await self._local_change(record.path)
            else:
                # A node that only fetches never records what it finds here as a version
                # of its own, so a rescan would change nothing: the path fails instead.
                self._fail(record.path, LocalChangeError(_OTHER_CONTENT.format(record.path)))
        elif discard:
            logger.warning("folder %s: %s; fetching it again", self.root, exc)
        elif not isinstance(exc, DiskFullError):
            self._fail(record.path, exc)
        if self.downloads.get(record.path) is download:
            await self._abandon(record.path, discard=discard)
        else:  # abandoned while committing: the assembly is ours to close
            _release(download)
            if discard:
                await asyncio.to_thread(self.store.discard, record)
        if isinstance(exc, DiskFullError):
            await self._pause_for_space(exc)
            self.waiting_for_space[record.path] = record.size
        self.dirty.set()

    async def _abandon(self, path: str, *, discard: bool) -> None:
        download = self.downloads.pop(path, None)
        if download is None:
            return
        download.abandoned = True
        self._retry_due(path)
        self._apply_steps(self.scheduler.remove_file(path))
        for rid, (_, ref) in list(self.requests.items()):
            if ref.file_id == path:
                del self.requests[rid]
        self.outgoing = {k: v for k, v in self.outgoing.items() if k[1].file_id != path}
        # Writes in flight (or a commit) still use the descriptors: the last one closes them.
        _release(download)
        if discard and not download.finishing:
            self.server.invalidate([path])  # the server closes the file it may hold open
            await asyncio.to_thread(self.store.discard, download.record)
            await asyncio.to_thread(self.engine.index.partial_drop, self.info.id, path)

    def request_failed(self, event: RequestFailed) -> None:
        owner = self.requests.pop(event.request_id, None)
        if owner is None:
            for link in self.links.values():
                if link.manifest_request == event.request_id:
                    link.manifest_request = None
            return
        peer, ref = owner
        self.outgoing.pop((peer, ref), None)
        reason = {
            FailReason.INTEGRITY: BlockFail.INTEGRITY,
            FailReason.PEER_GONE: BlockFail.GONE,
        }.get(event.reason, BlockFail.TIMEOUT)
        if reason is BlockFail.INTEGRITY:
            self.engine.count_hostile(peer, "sent a block that failed its hash")
        self._apply_steps(self.scheduler.on_block_failed(ref, peer, reason, self.engine.now()))
        self.pump()

    def _measure(self, link: PeerLink, size: int) -> None:
        now = self.engine.now()
        link.last_block_at = now
        link.window_bytes += size
        elapsed = now - link.window_start
        if elapsed >= RATE_WINDOW:
            link.rate = link.window_bytes / elapsed
            link.window_bytes, link.window_start = 0, now
            self.scheduler.update_rate(link.peer, link.rate)

    def _queue_have(self, block_hash: bytes) -> None:
        self.pending_have.append(block_hash)
        self._schedule_flush()

    def _shared_downloads(self) -> list[Download]:
        """The downloads announced to peers for re-sharing, newest first: those of more than
        one block. A one-block file has nothing to share before it is whole, and then it is
        announced as a record: announcing it too would cost every manifest answer an entry
        per small file in flight and a manifest round per file started."""
        newest = reversed(self.downloads.values())
        return list(itertools.islice(filter(_shareable, newest), MAX_IN_PROGRESS_ANNOUNCED))

    def _downloads_changed(self) -> None:
        """A download started (it is the newest): if peers are told of it, they re-read our
        in-progress entries (a NOTIFY without HAVE hashes asks them to), so they can pull from
        us what we still receive."""
        newest = next(reversed(self.downloads.values()), None)
        if newest is None or not _shareable(newest):
            return
        self.announce_downloads = True
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self.have_flush is None:
            loop = asyncio.get_running_loop()
            self.have_flush = loop.call_later(HAVE_FLUSH_INTERVAL, self._flush_have)

    def _flush_have(self) -> None:
        self.have_flush = None
        hashes, self.pending_have = self.pending_have, []
        sequence = self.info_sequence()
        if self.announce_downloads:
            self.announce_downloads = False
            for link in self.links.values():
                self.engine.endpoint.notify(link.peer, self.folder_id, sequence)
        for start in range(0, len(hashes), MAX_HAVE_PER_NOTIFY):
            chunk = hashes[start : start + MAX_HAVE_PER_NOTIFY]
            for link in self.links.values():
                self.engine.endpoint.notify(link.peer, self.folder_id, sequence, chunk)
        self.engine.kick()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The folder's ``status --json`` object.

        The state is ``in_sync`` only when nothing is needed, no path is failing, and the
        file list of every connected peer was read since it connected; a failing path makes
        the folder ``error`` (the paths and why are in ``problems``).
        """
        now = self.engine.now()
        peers = []
        for link in self.links.values():
            name = self.engine.peer_names.get(link.peer, "")
            idle = now - link.last_block_at >= RATE_IDLE
            peers.append(
                {
                    "id": link.peer.hex(),
                    "name": name,
                    "address": f"{link.addr[0]}:{link.addr[1]}",
                    "rate": 0 if idle else round(link.rate),
                    "need_bytes": self._need_from(link.peer),
                }
            )
        need_files = (
            len(self.downloads)
            + len(self.waiting_for_space)
            + len(self.deferred)
            + len(self.waiting)
        )
        need_bytes = (
            sum(d.record.size - d.bytes_done for d in self.downloads.values())
            + sum(self.waiting_for_space.values())
            + sum(self.deferred.values())
            + sum(action.record.size for action, _ in self.waiting.values())
        )
        state, reason = self.state, self.reason or self._why_not_in_sync()
        reading = sum(1 for link in self.links.values() if not link.listed)
        if state in ("in_sync", "syncing") and self.failures:
            path, failure = min(self.failures.items())
            more = len(self.failures) - 1
            state = "error"
            reason = f"{path}: {failure.message}" + (f" (and {more} more)" if more else "")
        elif state == "in_sync" and need_files:
            state = "syncing"
        elif state == "in_sync" and reading:
            # Not known to be in sync until every connected peer's file list was read.
            state, reason = "syncing", f"reading the file list of {reading} peer(s)"
        elif state == "in_sync" and not self.links:
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
            "connected_peers": len(self.links),
            "sequence": self.info_sequence(),
            "peers": peers,
        }

    @property
    def problems(self) -> dict[str, str]:
        """Every path out of sync for a reason other than waiting, and the reason."""
        problems = {path: failure.message for path, failure in self.failures.items()}
        for path, message in self.plan_problems.items():
            problems.setdefault(path, message)
        return problems

    def _need_from(self, peer: bytes) -> int:
        return sum(
            d.record.size - d.bytes_done for d in self.downloads.values() if peer in d.sources
        )

    def _why_not_in_sync(self) -> str:
        if self.state != "syncing":
            return ""
        stalled = self.scheduler.stalled(self.engine.now())
        if stalled:
            return f"no connected peer has {len(stalled)} of the blocks needed"
        if not self.links:
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
        clock: Callable[[], float] | None = None,
        whole_folders: bool = True,
    ) -> None:
        """``whole_folders`` False: act only on the paths put in each folder's ``scope``
        (a short-lived node pulling a few files, or only listing)."""
        self.config = config
        self.whole_folders = whole_folders
        self.index = index
        self.node_id = node_id
        self.short_id = short_id(node_id)
        self.endpoint = endpoint
        self.kick = kick
        self.now = clock or asyncio.get_running_loop().time
        self.io_limit = asyncio.Semaphore(max(1, config.transfer.io_workers))
        self.delete_limits = deleteguard.Limits.of(config.sync)
        self.folders: dict[bytes, FolderSync] = {}
        self.addresses: dict[Addr, set[bytes]] = {}
        self.peer_names: dict[bytes, str] = {}
        self.watchers: dict[int, Callable[[str], None]] = {}
        self.strikes: dict[bytes, int] = {}
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
        for download in list(sync.downloads):
            await sync._abandon(download, discard=False)
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
        # A planning pass holds ``busy`` while it changes the folder; holding every folder's
        # lock from here on means none is half done and none starts.
        for sync in self.folders.values():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
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
            await asyncio.sleep(TICK_INTERVAL)
            now = self.now()
            for sync in self.folders.values():
                sync.pump()
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
                            time.time(),
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
            logger.info("session with %s for %s up", event.peer.hex(), sync.root)
            sync.session_up(event.peer, event.addr)
        elif isinstance(event, SessionClosed):
            if event.peer is not None:
                if not self._closing:  # a stop closes them all: its own line says so
                    logger.info(
                        "session with %s for %s closed: %s",
                        event.peer.hex(),
                        sync.root,
                        event.reason.name,
                    )
                sync.session_down(event.peer)
        elif isinstance(event, ManifestRequested):
            self.spawn(sync.answer_manifest(event))
        elif isinstance(event, ManifestReceived):
            self.spawn(sync.manifest_received(event))
        elif isinstance(event, BlockRequested):
            sync.server.request(event)
        elif isinstance(event, BlockReceived):
            self.spawn(sync.block_received(event))
        elif isinstance(event, RequestFailed):
            sync.request_failed(event)
        elif isinstance(event, NotificationReceived):
            sync.notified(event)
        elif isinstance(event, RequestCancelled):
            pass

    def count_hostile(self, peer: bytes, what: str) -> None:
        self.strikes[peer] = self.strikes.get(peer, 0) + 1
        logger.warning("peer %s: %s (%d strikes)", peer.hex(), what, self.strikes[peer])

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
        }


def _prioritised(path: str, priority: Collection[str]) -> bool:
    return any(path == p or path.startswith(p + "/") or p == "" for p in priority)


def _temp_of(partial: Partial) -> str:
    """The partial's temporary file relative to the folder root (rows written before
    temporary names were per path held the bare name, in the file's directory)."""
    parent = partial.path.rpartition("/")[0]
    if "/" in partial.temp_name or not parent:
        return partial.temp_name
    return f"{parent}/{partial.temp_name}"


def _in_scope(action: planner.Action, scope: Collection[str]) -> bool:
    """The action is on a path in ``scope``, or makes a directory that leads to one."""
    if _prioritised(action.path, scope):
        return True
    if isinstance(action, planner.MakeDir):
        return any(p.startswith(action.path + "/") for p in scope)
    return False


def _same_content(a: FileRecord, b: FileRecord) -> bool:
    return a.type == b.type and a.file_hash == b.file_hash and a.deleted == b.deleted


def _gone(download: Download) -> bool:
    """Whether the download was abandoned (re-read after every await)."""
    return download.abandoned


def _shareable(download: Download) -> bool:
    return len(download.record.blocks) > 1


def _release(download: Download) -> None:
    """Close an abandoned download's file once no thread can be using its descriptors
    (closing under a running ``pwrite`` could let the number be reused by another file)."""
    if download.assembly is not None and download.writing == 0 and not download.finishing:
        download.assembly.close()


def _stat_cache(root: Path, record: FileRecord) -> tuple[int, int]:
    """Inode and ctime of what was just written, so the next scan need not read it."""
    with contextlib.suppress(OSError):
        st = os.lstat(root / record.path)
        if record.deleted:
            return 0, 0
        return st.st_ino, st.st_ctime_ns
    return 0, 0
