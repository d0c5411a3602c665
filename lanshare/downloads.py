"""A folder's downloads: from the fetches a plan wants to files verified and in place.

Async coordination, no sockets: requests go out through the engine's sans-IO ``Endpoint``,
disk work runs in worker threads (``asyncio.to_thread``, the folder's ``BlockWriter``).

Theory of operation
-------------------
* **Wanting.** Each planning pass hands over its fetches (``take_plan``) in the plan's order.
  A fetch of a version already downloading only tells the scheduler which peers hold it now;
  one of another version replaces it (its verified blocks kept when the content is the same).
  Downloads no plan wants any more are abandoned, their temporary files discarded.
* **Opening.** Each download is a temporary file (``store.Assembly``). Open files are a
  bounded resource: at most half as many downloads are in hand at once (from their start
  until they are placed) as the store keeps files open (``store.OpenAssemblies``, sized
  from ``RLIMIT_NOFILE``); the plan's other
  fetches wait in its order and start as slots free, a batch at a time (one thread hop and
  one index transaction for many files), so thousands of small files stream as one workload.
  A process out of descriptors (``EMFILE``/``ENFILE``) holds new downloads back for
  ``OPEN_RETRY``; no file ever fails for it. A resumed download keeps the blocks the index
  says it verified, checked again on disk.
* **Requests.** Blocks already elsewhere on disk are copied; the rest are scheduled by
  ``scheduler.Scheduler`` across every peer that has them (rarest first, pipelined by each
  peer's delivery rate, measured here, end game, failover): a peer serves all of a file when
  it has that version, or the blocks it announced while downloading it itself (what the
  peer exchange learnt). Each request is tracked until its block arrives, fails or is
  cancelled.
* **Writing.** A block is hashed once, where it arrives (the protocol) or is read (a local
  copy); the folder's ``BlockWriter`` writes verified blocks and records them in the index
  in batches, one thread hop each, and only then are they announced (a HAVE, through the
  peer exchange) and counted done, so a crash resumes without fetching them again.
* **Small files in memory.** A file of at most ``BUFFERED_MAX`` bytes with no download to
  resume is held in memory (``store.Buffered``): no temporary file when it starts, its
  blocks kept as they arrive (neither written nor recorded nor announced one by one), and
  the whole file written, made durable and renamed by its placement. It keeps its download
  slot until then, so the slots bound the memory held; a crash loses only what it held.
* **Placement.** Finished files are placed in batches (``store.place``): each checked whole
  from the block hashes verified in memory, fsynced, and renamed into place only if the
  local file is still what the plan saw (otherwise the download is discarded and the next
  plan decides); each directory is fsynced once, and the batch is one index transaction and
  one announcement. A conflict's local loser is kept under its conflict name by the
  placement itself (``store.place``). A download that cannot be placed is replanned, or fails,
  and the watcher is told the writes it expected will not come.
* **Abandoning.** An abandoned download (no longer wanted, its peer's version replaced, the
  disk full) cancels its requests; its descriptors close once no write or placement uses
  them, and its temporary file stays (to resume) unless it is discarded.

The folder (``engine.FolderSync``) is seen through ``Folder``, the peer exchange
(``exchange.Exchange``) through ``Peers``; neither is imported at run time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lanshare.blockwriter import BlockWriter
from lanshare.errors import (
    DescriptorsExhausted,
    DiskFullError,
    IntegrityError,
    LanshareError,
    LocalChangeError,
)
from lanshare.events import FailReason
from lanshare.manifest import Block, InProgress
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
from lanshare.store import Assembly, Buffered, FolderStore, LocalState, Placement, VerifiedBlock

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping
    from pathlib import Path

    from lanshare import planner, scanner
    from lanshare.clock import Timer
    from lanshare.engine import Engine
    from lanshare.events import BlockReceived, RequestFailed
    from lanshare.exchange import PeerLink
    from lanshare.index import FolderInfo, Partial
    from lanshare.manifest import FileRecord
    from lanshare.serving import BlockServer

logger = logging.getLogger(__name__)

OPEN_RETRY = 0.5
"""Seconds new downloads wait after the process ran out of file descriptors."""
REFILL_FRACTION = 4
"""Waiting downloads start once this fraction of the download slots is free."""
RATE_WINDOW = 1.0
"""Seconds over which a peer's delivery rate is measured."""
RATE_IDLE = 2 * RATE_WINDOW
"""Seconds without a delivered block after which a peer's rate shows as 0."""
RATE_GAP = 0.25
"""Most seconds between two blocks of a peer counted in its rate: a longer gap is a pause
(nothing was asked of it, or this side was busy), not slowness. A block of a peer slower
than a block per ``RATE_GAP`` makes it look faster than it is, which only matters for
peers the pipeline's floor (``SchedulerConfig.min_bytes``) sizes anyway."""
ASSUMED_RATE = 40e6
"""Bytes per second a peer is taken to deliver until its rate is measured: a LAN peer.
It sizes the first requests' pipeline (4 MB at the scheduler's 0.1 s of queue), so a
folder of small files is asked for many files at a time from the first request on, not
two at a time for the first second."""
MAX_IN_PROGRESS_ANNOUNCED = 64
"""Downloads announced to peers for re-sharing (the newest of more than one block)."""
BUFFERED_MAX = 128 * 1024
"""Files up to this size are downloaded into memory and written only when they are placed
(``store.Buffered``): no temporary file to create and size when they start, no write and no
index transaction for their blocks. Each takes a download slot until it is placed, so the
memory they hold is bounded by the slots (128 slots: 16 MiB)."""

_OTHER_CONTENT = (
    "{} holds other content here than on the LAN; move it away to pull the LAN's version"
)


class Folder(Protocol):
    """What the downloads need of the folder they fill (``engine.FolderSync``)."""

    root: Path
    store: FolderStore
    server: BlockServer
    """Closes what it holds open of a temporary file that goes (``invalidate``)."""
    info: FolderInfo
    folder_id: bytes
    priority: set[str]
    """Paths (and what is under them) fetched before anything else."""
    busy: asyncio.Lock
    """Held by a scan, a planning pass or a placement: they never overlap."""
    dirty: asyncio.Event
    """Set to have the folder plan again."""
    disk_full: str
    """Why pulls are paused for want of space (empty: they are not)."""

    async def scan(self, paths: Collection[str] | None = None) -> scanner.ScanSummary | None:
        """Rescan the folder, or only ``paths``."""
        ...

    def fail(self, path: str, exc: LanshareError) -> None:
        """``path`` failed here: retried later (out of descriptors: ``hold_opening``)."""
        ...

    def failed_lately(self, path: str, now: float) -> bool:
        """Whether ``path`` failed and is not due for its retry at ``now``."""
        ...

    def retrying(self, path: str) -> None:
        """A download of a failed path runs: it stays a problem until it is in place."""
        ...

    def retry_due(self, path: str) -> None:
        """A retried download stopped without failing again: the next plan may retry it."""
        ...

    def settled(self, path: str) -> None:
        """``path`` is in place: whatever failed there is no problem any more."""
        ...

    async def pause_for_space(self, exc: DiskFullError) -> None:
        """The disk is full: every download stops (``abandon_all``), pulls pause."""
        ...

    def wait_for_space(self, path: str, size: int) -> None:
        """``path`` (``size`` bytes) waits for the pause for space to end."""
        ...

    def planned_now(self, replaces: FileRecord | None) -> LocalState:
        """What the plan saw at a path (blocking: call it in a thread)."""
        ...

    async def own_write(self, rel: str) -> None:
        """Tell the watcher that ``rel`` is about to change by our hand."""
        ...

    def withdraw_own_write(self, *rels: str) -> None:
        """The writes announced for ``rels`` did not happen (the watcher is told)."""
        ...

    async def commit(self, *records: FileRecord, finished: Collection[str] = ()) -> None:
        """Record ``records`` as on disk, and drop the partials of ``finished``, at once."""
        ...

    async def local_change(self, path: str) -> None:
        """``path`` changed since the plan: rescan it."""
        ...

    def log_conflict(self, conflict: planner.Conflict) -> None: ...


class Peers(Protocol):
    """What the downloads need of the peer exchange (``exchange.Exchange``)."""

    @property
    def links(self) -> Mapping[bytes, PeerLink]:
        """The folder's sessions, by peer: the records and blocks each has in progress."""
        ...

    def block_verified(self, block_hash: bytes) -> None:
        """A block is written and recorded: announce it (HAVE) to every peer."""
        ...

    def downloads_changed(self) -> None:
        """A download peers may pull from started: have them read our in-progress list."""
        ...


@dataclass(slots=True)
class Download:
    """A file being assembled from peers' blocks and local copies."""

    record: FileRecord
    planned: LocalState
    sources: tuple[bytes, ...]
    assembly: Assembly | Buffered | None = None
    done: set[int] = field(default_factory=set)
    writing: int = 0
    finishing: bool = False
    conflict: planner.Conflict | None = None
    """The local loser to keep under its conflict name when the download is placed."""
    abandoned: bool = False
    """No longer wanted; its descriptors close once no write or commit uses them."""
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once it is abandoned and no write to its temporary file is in flight."""
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

    assembly: Assembly | Buffered
    planned: LocalState
    done: set[int]
    local_sources: dict[bytes, LocalSource]


@dataclass(slots=True)
class _Rate:
    """Blocks delivered by one connected peer, measured over ``RATE_WINDOW``."""

    window_start: float
    window_bytes: int = 0
    rate: float = 0.0
    last_block_at: float = float("-inf")


class Downloads:
    """One folder's downloads, their requests to peers, and the blocks they write."""

    def __init__(self, folder: Folder, engine: Engine, peers: Peers) -> None:
        self.folder = folder
        self.engine = engine
        self.peers = peers
        self.writer = BlockWriter(folder.store, engine.index, folder.info.id)
        self.scheduler = Scheduler(
            random.Random(int.from_bytes(folder.folder_id[:8], "big")),
            SchedulerConfig(
                request_timeout=engine.config.transfer.request_timeout, initial_rate=ASSUMED_RATE
            ),
        )
        self.active: dict[str, Download] = {}
        """Downloads fetching or being put in place, by path (in the order they started)."""
        self.requests: dict[int, tuple[bytes, BlockRef]] = {}
        self.outgoing: dict[tuple[bytes, BlockRef], int] = {}
        self.rates: dict[bytes, _Rate] = {}
        """Delivery rate of each connected peer."""
        self.committing: set[str] = set()
        """Paths whose finished download waits to be put in place, or is being put."""
        self.to_place: list[Download] = []
        self.placing = False
        self.undecided = False
        """A plan skipped a path being opened or put in place: the next placement plans."""
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
        self.open_held: Timer | None = None
        """Set while new downloads wait for file descriptors to be freed."""

    # -- the plan's fetches ---------------------------------------------------------------

    async def take_plan(
        self,
        fetches: list[tuple[planner.Fetch, planner.Conflict | None]],
        remotes: dict[bytes, dict[str, FileRecord]],
        wanted: set[str],
    ) -> None:
        """Follow a plan: its ``fetches`` (with the conflict each settles when placed) and
        the peers' records it saw; ``wanted`` holds the other paths it still wants (those
        waiting for space). Downloads it no longer wants are abandoned."""
        self.deferred.clear()
        self.remotes = remotes
        waiting: dict[str, tuple[planner.Fetch, planner.Conflict | None]] = {}
        now = self.engine.now()
        for action, conflict in fetches:
            wanted.add(action.path)
            if self.folder.failed_lately(action.path, now):
                continue  # failed lately: its retry is due later (or after a scan)
            if await self._want(action, remotes, conflict):
                waiting[action.path] = (action, conflict)
        self.wanted, self.waiting = wanted, waiting
        for path in [p for p in self.active if p not in wanted]:
            await self._abandon(path, discard=True)
        await self._start_waiting()

    def pending(self, path: str) -> bool:
        """Whether ``path`` is wanted, fetched, put in place or deferred."""
        return (
            path in self.wanted
            or path in self.active
            or path in self.committing
            or path in self.deferred
        )

    def on_disk(self) -> dict[str, Download]:
        """The downloads whose verified blocks are in their temporary files, by path."""
        return {path: d for path, d in self.active.items() if not _buffered(d)}

    def busy(self) -> bool:
        """Whether a file is being fetched, waits to be, or is being put in place."""
        return bool(self.active or self.committing or self.deferred or self.waiting)

    def keeps(self, path: str) -> bool:
        """Whether the temporary file of ``path`` is (or is soon) in use, or still wanted."""
        return (
            path in self.active
            or path in self.committing
            or path in self.waiting
            or path in self.opening
            or path in self.wanted
        )

    def need(self) -> tuple[int, int]:
        """Files still to fetch here and their bytes (those waiting for space aside)."""
        files = len(self.active) + len(self.deferred) + len(self.waiting)
        size = (
            sum(d.record.size - d.bytes_done for d in self.active.values())
            + sum(self.deferred.values())
            + sum(action.record.size for action, _ in self.waiting.values())
        )
        return files, size

    def need_from(self, peer: bytes) -> int:
        return sum(d.record.size - d.bytes_done for d in self.active.values() if peer in d.sources)

    def bytes_fetched(self, rel: str) -> int | None:
        """Bytes of ``rel`` verified so far, or None when it is not being downloaded."""
        download = self.active.get(rel)
        return None if download is None else download.bytes_done

    def stalled(self) -> int:
        """Blocks needed that no connected peer has."""
        return len(self.scheduler.stalled(self.engine.now()))

    async def give_up(self, path: str) -> None:
        """Another action is about to write ``path`` through the same temporary file (a
        build from local data): abandon its download, if any, and return once no write of
        that download is in flight (one landing later would change the file put in place).
        """
        download = self.active.get(path)
        if download is None:
            return
        await self._abandon(path, discard=False)
        if download.writing:
            await download.drained.wait()

    async def abandon_all(self) -> dict[str, int]:
        """Stop every download, keeping its verified blocks to resume; the bytes each
        still needs, by path."""
        left: dict[str, int] = {}
        for download in list(self.active.values()):
            left[download.path] = download.record.size - download.bytes_done
            await self._abandon(download.path, discard=False)
        return left

    # -- peers ----------------------------------------------------------------------------

    def peer_up(self, peer: bytes) -> None:
        """A session with ``peer`` came up: its delivery rate is measured from now."""
        self.rates[peer] = _Rate(window_start=self.engine.now())

    def peer_has(self, peer: bytes, hashes: Collection[bytes]) -> None:
        """``peer`` can serve the blocks with these hashes (it announced them)."""
        self.scheduler.peer_has(peer, hashes)

    def peer_gone(self, peer: bytes) -> None:
        """``peer``'s session closed: its requests go to the others."""
        self.rates.pop(peer, None)
        for rid, (owner, _) in list(self.requests.items()):
            if owner == peer:
                del self.requests[rid]
        self.outgoing = {k: v for k, v in self.outgoing.items() if k[0] != peer}
        self._apply_steps(self.scheduler.peer_gone(peer))
        for download in self.active.values():
            download.offered.pop(peer, None)

    def rate(self, peer: bytes) -> int:
        """``peer``'s delivery rate in bytes per second (0 when it sent nothing lately)."""
        rate = self.rates.get(peer)
        if rate is None or self.engine.now() - rate.last_block_at >= RATE_IDLE:
            return 0
        return round(rate.rate)

    def shared(self) -> list[InProgress]:
        """The downloads announced to peers for re-sharing, newest first: those of more than
        one block. A one-block file has nothing to share before it is whole, and then it is
        announced as a record: announcing it too would cost every manifest answer an entry
        per small file in flight and a manifest round per file started."""
        newest = reversed(self.active.values())
        shared = itertools.islice(filter(_shareable, newest), MAX_IN_PROGRESS_ANNOUNCED)
        return [InProgress(d.record, tuple(sorted(d.done))) for d in shared]

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
        existing = self.active.get(action.path)
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
        """Downloads in hand at once, from their start until they are placed: each keeps
        its temporary file open (half the store's bound on open files, the rest for the
        files being read and served) or its bytes in memory, so the slots bound both."""
        return max(1, self.folder.store.assemblies.capacity // 2)

    def _free_slots(self) -> int:
        return self._slots() - len(self.active) - len(self.opening)

    def _refill_at(self) -> int:
        """Free slots worth a thread hop: a batch, not one hop per finished file."""
        return max(1, min(self._slots() // REFILL_FRACTION, len(self.waiting)))

    async def _start_waiting(self, *, refill: bool = False) -> None:
        """Open downloads for the waiting fetches while slots are free (``refill``: while
        enough are free to be worth it): many per thread hop (and one index transaction),
        then schedule them all and send requests."""
        while self.waiting and not self.folder.disk_full and self.open_held is None:
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
            self.hold_opening(outcome)
            return True
        if isinstance(outcome, DiskFullError):
            self.engine.spawn(self.folder.pause_for_space(outcome))
            self.folder.wait_for_space(record.path, record.size)
            return False
        if isinstance(outcome, LanshareError):
            self.folder.fail(record.path, outcome)
            return False
        if self.folder.disk_full or record.path not in self.wanted or record.path in self.active:
            # The disk filled, or a plan made meanwhile no longer wants this version (its
            # temporary file stays for that plan's clean-up, or to resume).
            outcome.assembly.close()
            if self.folder.disk_full:
                self.folder.wait_for_space(record.path, record.size)
            return False
        download = Download(record, outcome.planned, action.sources)
        download.conflict = conflict
        download.assembly, download.done = outcome.assembly, outcome.done
        download.bytes_done = sum(record.blocks[i].size for i in download.done)
        self.active[record.path] = download
        self.folder.retrying(record.path)
        if _shareable(download):
            self.peers.downloads_changed()
        needed = [b for i, b in enumerate(record.blocks) if i not in download.done]
        availability = self._availability(record, self.remotes)
        download.offered = {peer: hashes is None for peer, hashes in availability.items()}
        self._schedule_file(download, needed, availability, outcome.local_sources)
        if self.active.get(record.path) is download and download.complete:
            self._finish_soon(download)
        return False

    def hold_opening(self, exc: DescriptorsExhausted) -> None:
        """Out of file descriptors: start no download for a while (those running free
        theirs as they finish), then carry on. Never a failure of the file that met it."""
        if self.open_held is not None:
            return
        logger.info(
            "folder %s: %s; new downloads wait %.1f s",
            self.folder.root,
            exc.__cause__ or exc,
            OPEN_RETRY,
        )

        def resume() -> None:
            self.open_held = None
            self.engine.spawn(self._start_waiting(refill=True))
            self.folder.dirty.set()  # an action the plan applies itself may have met it too

        self.open_held = self.engine.clock.call_later(OPEN_RETRY, resume)

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
        # One read each for the whole batch: other threads (the writer, placements) use the
        # index in between, and a lock taken per file waits behind each of their transactions.
        try:
            olds = index.partials_of(self.folder.info.id, (action.path for action, _ in batch))
        except LanshareError as exc:
            return [exc] * len(batch)
        for i, (action, _) in enumerate(batch):
            record = action.record
            try:
                planned = self.folder.planned_now(action.replaces)
                temp = self.folder.store.temp_path(record)
                old = olds.get(record.path)
                if old is None and record.size <= BUFFERED_MAX:
                    outcomes[i] = _Opened(Buffered(self.folder.store, record), planned, set(), {})
                    continue
                if old is not None and temp_of(old) != temp:
                    # A download of another version of this path was left behind (a crash, a
                    # local edit): its temporary file goes, or it would stay forever.
                    self.folder.store.discard_temp(temp_of(old))
                assemblies[i] = (self.folder.store.begin(record), planned)
            except DescriptorsExhausted as exc:
                outcomes[i] = exc
                break
            except LanshareError as exc:
                outcomes[i] = exc
        if not assemblies:
            return outcomes
        try:
            with index.transaction():
                partials = {
                    i: index.partial_begin(
                        self.folder.info.id,
                        batch[i][0].path,
                        self.folder.store.temp_path(batch[i][0].record),
                        batch[i][0].record.file_hash,
                    )
                    for i in assemblies
                }
        except LanshareError as exc:
            for i, (assembly, _) in assemblies.items():
                assembly.close()
                outcomes[i] = exc
            return outcomes
        resumed: dict[int, set[int]] = {}
        for i, (assembly, _) in assemblies.items():
            try:
                done: set[int] = set()
                if partials[i].verified:
                    done = self.folder.store.verified_blocks(assembly, set(partials[i].verified))
                resumed[i] = done
            except LanshareError as exc:
                assembly.close()
                outcomes[i] = exc
        needed = {
            block.hash
            for i, done in resumed.items()
            for n, block in enumerate(assemblies[i][0].record.blocks)
            if n not in done
        }
        try:
            found = index.first_locations(self.folder.info.id, needed)
        except LanshareError as exc:
            for i in resumed:
                assemblies[i][0].close()
                outcomes[i] = exc
            return outcomes
        sources = {h: LocalSource(location.path, location.offset) for h, location in found.items()}
        for i, done in resumed.items():
            assembly, planned = assemblies[i]
            outcomes[i] = _Opened(assembly, planned, done, sources)
        return outcomes

    def _availability(
        self, record: FileRecord, remotes: dict[bytes, dict[str, FileRecord]]
    ) -> dict[bytes, Collection[bytes] | None]:
        """What each connected peer can serve of ``record``: None for all of it (it has
        this version), else the blocks it announced (while downloading, of any file)."""
        availability: dict[bytes, Collection[bytes] | None] = {}
        for peer, link in self.peers.links.items():
            theirs = remotes.get(peer, {}).get(record.path)
            if theirs is not None and same_content(theirs, record):
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
        priority = 0 if prioritised(download.path, self.folder.priority) else 1
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
            del self.active[download.path]
            if download.assembly is not None:
                download.assembly.close()

    def pump(self) -> None:
        """Turn the scheduler's next steps into requests, cancels and local copies, and
        start waiting downloads when slots are free."""
        startable = self.waiting and not self.opening and self.open_held is None
        if startable and self._free_slots() >= self._refill_at():
            self.engine.spawn(self._start_waiting(refill=True))
        if not self.active:
            return
        self._apply_steps(self.scheduler.next_requests(self.engine.now()))
        self.engine.kick()

    def _apply_steps(self, steps: Iterable[Request | Cancel | LocalCopy]) -> None:
        endpoint = self.engine.endpoint
        for step in steps:
            if isinstance(step, Request):
                download = self.active.get(step.block.file_id)
                if download is None:
                    continue
                index = self._block_index(download, step.block)
                rid = endpoint.request_block(
                    step.peer,
                    self.folder.folder_id,
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
        download = self.active.get(copy.target.file_id)
        if download is None:
            return
        source = copy.source
        algo = download.record.hash_algo
        target = copy.target
        block = Block(source.offset, target.size, target.hash)
        data: bytes | None = None
        if isinstance(source, LocalSource):
            data = await asyncio.to_thread(self.folder.store.read_block, source.path, block, algo)
        else:
            other = self.active.get(source.file_id)
            if other is not None and isinstance(other.assembly, Buffered):
                # Kept in memory as it was verified: nothing on disk to read, or to change.
                index = other.index_at.get(source.offset)
                kept = None if index is None else other.assembly.block(index)
                data = kept if kept is not None and len(kept) == target.size else None
            elif other is not None and other.assembly is not None:
                rel = FolderStore.temp_path(other.record)
                data = await asyncio.to_thread(self.folder.store.read_block, rel, block, algo)
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
        rate = self.rates.get(peer)
        if rate is not None:
            self._measure(peer, rate, len(event.data))
        download = self.active.get(ref.file_id)
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
            if isinstance(download.assembly, Buffered):
                download.assembly.keep(block)
            else:
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
                await self.folder.pause_for_space(exc)
            return
        except LanshareError as exc:
            if _gone(download):
                return
            self.folder.fail(download.path, exc)
            await self._abandon(download.path, discard=False)
            return
        finally:
            download.writing -= 1
            if _gone(download):
                _release(download)
                if download.writing == 0:
                    download.drained.set()
        if _gone(download):
            return
        if index not in download.done:
            download.done.add(index)
            download.bytes_done += ref.size
        self._apply_steps(self.scheduler.on_block_done(ref, peer))
        if not _buffered(download):  # peers may ask for it now: it is in the temporary file
            self.peers.block_verified(ref.hash)
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
            async with self.folder.busy:
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
                    errors = await asyncio.to_thread(
                        self.folder.store.place, placements, self.engine.clock.time()
                    )
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
                        await self.folder.commit(*records, finished=paths)
                    except LanshareError as exc:
                        # The files are in place and the index could not say so: a scan of
                        # them records what is there, once the index works again.
                        logger.warning("folder %s: %s", self.folder.root, exc)
                        self.engine.spawn(self.folder.scan([d.path for d, _ in placed]))
                    finally:
                        for download, _ in placed:
                            self.committing.discard(download.path)
                    if self._placement_changes_plan(d for d, _ in placed):
                        self.folder.dirty.set()
                    self.pump()  # their slots are free now
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
        return not (self.active or self.waiting or self.opening or self.to_place)

    async def _prepare_placement(self, download: Download) -> LocalState:
        """Ready one finished download to be placed: the watcher told of our writes (the
        local loser of a conflict stays in place until ``store.place`` keeps it under its
        conflict name). What the target must still be."""
        for rel in _written_by_placement(download):
            await self.folder.own_write(rel)
        return download.planned

    def _placed(self, download: Download) -> list[FileRecord]:
        """A download is in place: whatever happened meanwhile, the index must say so. The
        records to commit."""
        record = download.record
        conflict = download.conflict
        if self.active.get(record.path) is download:
            del self.active[record.path]
            self._apply_steps(self.scheduler.remove_file(record.path))
        self.folder.settled(record.path)
        if conflict is None:
            return [record]
        self.folder.log_conflict(conflict)
        return [conflict.copy_record, record]

    async def _not_placed(self, download: Download, exc: LanshareError) -> None:
        """A finished download could not be put in place; it is replanned (or, when even
        that fails, the path fails and is retried: never a path left placing for ever)."""
        self.folder.withdraw_own_write(*_written_by_placement(download))
        self.committing.discard(download.path)
        download.finishing = False
        try:
            await self._replan(download, exc)
        except LanshareError as failed:
            logger.warning("folder %s: %s", self.folder.root, failed)
            self.folder.fail(download.path, failed)
            if self.active.get(download.path) is download:  # its temporary file stays
                await self._abandon(download.path, discard=False)
            else:
                _release(download)
            self.folder.dirty.set()

    async def _replan(self, download: Download, exc: LanshareError) -> None:
        record = download.record
        discard = isinstance(exc, IntegrityError)
        if isinstance(exc, LocalChangeError):
            # Never clobber a local edit. Keep the verified temporary file (a later plan
            # that still wants this version resumes from it) and rescan, so the next plan
            # sees the edit and decides: a newer local version, or a conflict copy.
            logger.info("folder %s: %s", self.folder.root, exc)
            if self.engine.whole_folders:
                await self.folder.local_change(record.path)
            else:
                # A node that only fetches never records what it finds here as a version
                # of its own, so a rescan would change nothing: the path fails instead.
                self.folder.fail(record.path, LocalChangeError(_OTHER_CONTENT.format(record.path)))
        elif discard:
            logger.warning("folder %s: %s; fetching it again", self.folder.root, exc)
        elif not isinstance(exc, DiskFullError):
            self.folder.fail(record.path, exc)
        if self.active.get(record.path) is download:
            await self._abandon(record.path, discard=discard)
        else:  # abandoned while committing: the assembly is ours to close
            _release(download)
            if discard:
                await asyncio.to_thread(self.folder.store.discard, record)
        if isinstance(exc, DiskFullError):
            await self.folder.pause_for_space(exc)
            self.folder.wait_for_space(record.path, record.size)
        self.folder.dirty.set()

    async def _abandon(self, path: str, *, discard: bool) -> None:
        download = self.active.pop(path, None)
        if download is None:
            return
        download.abandoned = True
        self.folder.retry_due(path)
        self._apply_steps(self.scheduler.remove_file(path))
        for rid, (_, ref) in list(self.requests.items()):
            if ref.file_id == path:
                del self.requests[rid]
        self.outgoing = {k: v for k, v in self.outgoing.items() if k[1].file_id != path}
        # Writes in flight (or a commit) still use the descriptors: the last one closes them.
        _release(download)
        if discard and not download.finishing:
            self.folder.server.invalidate([path])  # the server closes the file it may hold open
            await asyncio.to_thread(self.folder.store.discard, download.record)
            await asyncio.to_thread(self.engine.index.partial_drop, self.folder.info.id, path)

    def request_failed(self, event: RequestFailed) -> bool:
        """A block request failed: it goes to another peer. False when the request was
        none of ours (a manifest request)."""
        owner = self.requests.pop(event.request_id, None)
        if owner is None:
            return False
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
        return True

    def _measure(self, peer: bytes, rate: _Rate, size: int) -> None:
        now = self.engine.now()
        if not rate.window_bytes:
            rate.window_start = now
        elif now - rate.last_block_at > RATE_GAP:
            rate.window_start += now - rate.last_block_at - RATE_GAP
        rate.last_block_at = now
        rate.window_bytes += size
        elapsed = now - rate.window_start
        if elapsed >= RATE_WINDOW:
            rate.rate = rate.window_bytes / elapsed
            rate.window_bytes, rate.window_start = 0, now
            self.scheduler.update_rate(peer, rate.rate)


def prioritised(path: str, priority: Collection[str]) -> bool:
    """Whether ``path`` is one of ``priority`` or under one of them ('' covers all)."""
    return any(path == p or path.startswith(p + "/") or p == "" for p in priority)


def temp_of(partial: Partial) -> str:
    """The partial's temporary file relative to the folder root (rows written before
    temporary names were per path held the bare name, in the file's directory)."""
    parent = partial.path.rpartition("/")[0]
    if "/" in partial.temp_name or not parent:
        return partial.temp_name
    return f"{parent}/{partial.temp_name}"


def same_content(a: FileRecord, b: FileRecord) -> bool:
    return a.type == b.type and a.file_hash == b.file_hash and a.deleted == b.deleted


def _gone(download: Download) -> bool:
    """Whether the download was abandoned (re-read after every await)."""
    return download.abandoned


def _written_by_placement(download: Download) -> tuple[str, ...]:
    """The paths placing ``download`` writes: its own, and the conflict name its local loser
    is kept under (only when there is one: ``store.place`` makes that name only then)."""
    conflict = download.conflict
    if conflict is not None and download.planned.exists:
        return (download.path, conflict.conflict_name)
    return (download.path,)


def _shareable(download: Download) -> bool:
    return len(download.record.blocks) > 1 and not _buffered(download)


def _buffered(download: Download) -> bool:
    """Whether ``download`` is held in memory until it is placed (nothing of it on disk)."""
    return isinstance(download.assembly, Buffered)


def _release(download: Download) -> None:
    """Close an abandoned download's file once no thread can be using its descriptors
    (closing under a running ``pwrite`` could let the number be reused by another file)."""
    if download.assembly is not None and download.writing == 0 and not download.finishing:
        download.assembly.close()
