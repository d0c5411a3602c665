"""Serving blocks to peers: one folder's block server, its caches, and the reads it batches.

The loop side (:class:`BlockServer`) only queues requests and sends answers; every lookup,
read and hash happens in :class:`BlockReader`, called in a worker thread one batch at a time.
The caches (:class:`TableCache`, :class:`BlockTable`) are pure; :class:`DescriptorCache` and
:class:`BlockReader` do the I/O.

Theory of operation
-------------------
* **Requests queue, batches hop.** A block request is queued on the loop. While no batch is
  being read, the next one is cut from the front of the queue (at most :data:`BATCH_BLOCKS`
  requests and :data:`BATCH_BYTES` of data) and handed to one worker-thread call
  (:meth:`BlockReader.read`) that finds, reads and checks all its blocks. Back on the loop,
  each block is sent (or its request rejected) and the transport is kicked once; the next
  batch is already being read while the loop sends these. So a thread hop serves many
  blocks when requests come fast, nothing touches SQLite or a file on the loop, and the
  server holds the data of one batch at most: a request that waits in the queue holds none
  (the protocol, which keeps what it sends until acknowledged, bounds each peer's share and
  all peers' together by limits of ours). A request cancelled while it waits (by the peer,
  or because its session closed) leaves the queue at once: it is never read, and a peer
  that asks and cancels without end, or reconnects, cannot grow the queue past what the
  protocol lets its sessions have outstanding.
* **Block tables.** The record of a file being served is read from the index once and kept
  decoded (:class:`TableCache`: least recently used first out, at most :data:`MAX_TABLES`
  files and :data:`MAX_TABLE_BLOCKS` blocks in all, whatever peers ask). A request finds its
  block by its index (peers ask by our record), else by its hash. The engine calls
  :meth:`BlockServer.invalidate` when it commits a path's record, and for every path after a
  scan that changed something; the reader applies it before its next batch.
* **Descriptors.** A file being served stays open (:class:`DescriptorCache`: at most
  :data:`MAX_OPEN_FILES`, least recently used closed first, all closed on invalidation and
  on :meth:`BlockServer.close`), opened without following symlinks
  (``FolderStore.open_for_reading``). The first time a batch uses a descriptor, the path is
  looked at again: if it names another file now (replaced by a rename), the old descriptor
  is closed and the path opened afresh, so a replaced file is never served. A download's
  temporary file is closed once the download is no longer in progress: on the
  invalidation of its path (the engine invalidates a path when it commits a placed file
  and when it discards a download), or else with the next batch, which knows the downloads
  in progress. So a discarded temporary file does not stay open, holding its space.
* **Adjacent blocks, one read.** A run of requests in a batch for adjacent blocks of one
  file (a peer fetching a file asks for them in order) is read with one ``pread`` into one
  buffer, and each block goes out as a view of it: one system call (and one release of the
  GIL) per run, not per block. The buffer lives until the last of its blocks is
  acknowledged, within the batch's bound.
* **Checked once, never sent stale.** Every block is hashed once, in the reader, before it
  goes out (the protocol does not hash what it sends), read ahead or not. A block that does
  not match drops the file's table, descriptor and what was read ahead of it, and the record
  is read again from the index (at most once per path per batch) and tried once more. Then
  the fallbacks, in order: the verified blocks of a download of the same path (its temporary
  file), any live local file with the same content (``Index.find_block``), the verified
  blocks of any other download. Nowhere: the request is rejected (``NOT_FOUND``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

from lanshare import chunker
from lanshare.errors import LanshareError
from lanshare.manifest import EntryType
from lanshare.store import FolderStore

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
    from typing import Any

    from lanshare.events import BlockRequested
    from lanshare.index import Index
    from lanshare.manifest import Block, FileRecord

logger = logging.getLogger(__name__)

BATCH_BLOCKS = 64
"""Most requests one worker-thread call reads and checks."""
BATCH_BYTES = 4 * 1024 * 1024
"""Most bytes of block data one worker-thread call reads (a larger block goes alone)."""
MAX_TABLES = 64
"""Files whose block tables are kept decoded."""
MAX_TABLE_BLOCKS = 131_072
"""Blocks kept decoded in all (above ``manifest.MAX_BLOCKS``, so any one file fits)."""
MAX_OPEN_FILES = 32
"""Files kept open for serving."""
MAX_ELSEWHERE = 4
"""Other local places of a block's content tried before giving up on them."""


class Downloading(Protocol):
    """What serving needs of a download in progress (the engine's ``Download``)."""

    @property
    def record(self) -> FileRecord: ...

    @property
    def done(self) -> Collection[int]:
        """Indexes of the blocks verified and written in its temporary file."""
        ...


# -- pure: block tables ---------------------------------------------------------------------


@dataclass(slots=True)
class BlockTable:
    """The blocks of one live file's record, decoded once."""

    hash_algo: str
    blocks: tuple[Block, ...]
    _by_hash: dict[bytes, int] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, record: FileRecord | None) -> BlockTable | None:
        """The table of ``record``; None for no record, a tombstone or no regular file."""
        if record is None or record.deleted or record.type is not EntryType.FILE:
            return None
        return cls(record.hash_algo, record.blocks)

    def find(self, index: int, size: int, digest: bytes) -> int | None:
        """The index of the block with this content: ``index`` (where a peer reading our
        record asks for it) if it is there, else any; None when the file does not hold it."""
        blocks = self.blocks
        if 0 <= index < len(blocks):
            block = blocks[index]
            if block.hash == digest and block.size == size:
                return index
        if self._by_hash is None:
            self._by_hash = {block.hash: i for i, block in enumerate(blocks)}
        found = self._by_hash.get(digest)
        if found is None or blocks[found].size != size:
            return None
        return found


class TableCache:
    """Block tables by path, least recently used dropped first, bounded in files and in
    blocks whatever is asked for (a table bigger than the whole bound is not kept)."""

    def __init__(self, max_tables: int = MAX_TABLES, max_blocks: int = MAX_TABLE_BLOCKS) -> None:
        self.max_tables = max_tables
        self.max_blocks = max_blocks
        self._tables: OrderedDict[str, BlockTable] = OrderedDict()
        self._blocks = 0

    def __len__(self) -> int:
        return len(self._tables)

    @property
    def blocks(self) -> int:
        """Blocks held in all."""
        return self._blocks

    def get(self, path: str) -> BlockTable | None:
        table = self._tables.get(path)
        if table is not None:
            self._tables.move_to_end(path)
        return table

    def put(self, path: str, table: BlockTable) -> None:
        self.drop(path)
        if len(table.blocks) > self.max_blocks:
            return
        self._tables[path] = table
        self._blocks += len(table.blocks)
        while len(self._tables) > self.max_tables or self._blocks > self.max_blocks:
            _, oldest = self._tables.popitem(last=False)
            self._blocks -= len(oldest.blocks)

    def drop(self, path: str) -> None:
        table = self._tables.pop(path, None)
        if table is not None:
            self._blocks -= len(table.blocks)

    def clear(self) -> None:
        self._tables.clear()
        self._blocks = 0


# -- I/O: descriptors and reads -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Open:
    fd: int
    device: int
    inode: int
    owner: str
    """For a download's temporary file, the path it is downloaded to; else ''."""


class DescriptorCache:
    """Open read-only descriptors of files being served, by path relative to the folder,
    least recently used closed first. Blocking I/O: used by one thread at a time."""

    def __init__(self, store: FolderStore, limit: int = MAX_OPEN_FILES) -> None:
        self.limit = limit
        self._store = store
        self._root = str(store.root)
        self._open: OrderedDict[str, _Open] = OrderedDict()
        # A server dropped without ``close`` (a crashed engine in a test) closes them too.
        self._finalizer = weakref.finalize(self, _close_all, self._open)

    def __len__(self) -> int:
        return len(self._open)

    def get(self, rel: str, checked: set[str], owner: str = "") -> int:
        """A descriptor of the file now at ``rel`` (the temporary file of a download of
        ``owner``, if given). A descriptor already open is used only if ``rel`` still names
        the same file, which is looked at once per ``checked`` set (one per batch).

        Raises:
            OSError, LanshareError: ``rel`` cannot be opened (gone, not a regular file, a
                symlink on the way, …).
        """
        entry = self._open.get(rel)
        if entry is not None:
            if rel not in checked:
                try:
                    st = os.stat(os.path.join(self._root, rel), follow_symlinks=False)
                    same = (st.st_dev, st.st_ino) == (entry.device, entry.inode)
                except OSError:
                    same = False
                if not same:
                    self.drop(rel)
                    return self.get(rel, checked, owner)
                checked.add(rel)
            self._open.move_to_end(rel)
            return entry.fd
        fd = self._store.open_for_reading(rel)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._open[rel] = _Open(fd, st.st_dev, st.st_ino, owner)
        checked.add(rel)
        while len(self._open) > self.limit:
            _, oldest = self._open.popitem(last=False)
            _close(oldest.fd)
        return fd

    def drop(self, rel: str) -> None:
        entry = self._open.pop(rel, None)
        if entry is not None:
            _close(entry.fd)

    def drop_temporary(self, still_open: Callable[[str, str], bool]) -> None:
        """Close the temporary files of downloads for which ``still_open(rel, owner)`` is
        false: a discarded one must not stay open (its space would never be freed)."""
        for rel, entry in list(self._open.items()):
            if entry.owner and not still_open(rel, entry.owner):
                self.drop(rel)

    def clear(self) -> None:
        _close_all(self._open)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _close_all(open_files: OrderedDict[str, _Open]) -> None:
    while open_files:
        _, entry = open_files.popitem()
        _close(entry.fd)


@dataclass(slots=True)
class Invalidation:
    """Paths whose record changed since the reader last looked (``everything``: all)."""

    everything: bool = False
    paths: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.everything or bool(self.paths)


@dataclass(slots=True)
class _Batch:
    """What one call of :meth:`BlockReader.read` learnt, so it does each thing once."""

    tables: dict[str, BlockTable | None] = field(default_factory=dict)
    """Records read from the index in this batch, by path."""
    checked: set[str] = field(default_factory=set)
    """Paths whose open descriptor was checked to be the file still there."""
    downloads: dict[str, BlockTable] = field(default_factory=dict)
    """Tables of downloads in progress, by path: built once a batch, not once a request
    (a request for content held nowhere looks through every download)."""
    ahead: dict[tuple[str, int, int], memoryview] = field(default_factory=dict)
    """Bytes read ahead, not yet checked, by (path, offset, size): the blocks of a run of
    requests for adjacent blocks of one file, read with one ``pread``."""


class BlockReader:
    """Finds, reads and checks the blocks of a batch of requests: every lookup and read of
    serving. Blocking (SQLite, files): call it from a worker thread, one batch at a time."""

    def __init__(self, store: FolderStore, index: Index, folder: int) -> None:
        self._index = index
        self._folder = folder
        self.tables = TableCache()
        self.descriptors = DescriptorCache(store)
        self._lock = threading.Lock()
        self._closed = False

    def read(
        self,
        requests: Sequence[BlockRequested],
        downloads: Mapping[str, Downloading],
        invalid: Invalidation,
    ) -> list[bytes | memoryview | None]:
        """The checked bytes of each requested block, or None where it is found nowhere.

        ``downloads``: the downloads in progress, by path; ``invalid``: what changed since
        the last call.
        """
        with self._lock:
            if self._closed:
                return [None] * len(requests)
            if invalid.everything:
                self.tables.clear()
                self.descriptors.clear()
            for path in invalid.paths:
                self.tables.drop(path)
                self.descriptors.drop(path)
            if invalid.paths:
                self.descriptors.drop_temporary(lambda _, owner: owner not in invalid.paths)
            if requests:  # ``downloads`` is what is in progress now: the others' files go
                self.descriptors.drop_temporary(partial(_in_progress, downloads))
            batch = _Batch()
            self._read_ahead(requests, batch)
            return [self._find(request, downloads, batch) for request in requests]

    def close(self) -> None:
        """Close every descriptor; later batches find nothing."""
        with self._lock:
            self._closed = True
            self.tables.clear()
            self.descriptors.clear()

    def _read_ahead(self, requests: Sequence[BlockRequested], batch: _Batch) -> None:
        """Read each run of requests for adjacent blocks of one file (in the order asked,
        as a peer fetching a file asks) with one ``pread``: one system call and one release
        of the GIL for the run, not one per block. Only read here; each block is still
        checked against its hash where it is taken (:meth:`_read`)."""
        run: list[tuple[str, int, int]] = []  # (path, offset, size) of adjacent blocks

        def flush() -> None:
            if len(run) > 1:
                self._read_run(run, batch)
            run.clear()

        for request in requests:
            path = request.path
            table = self._table(path, batch)
            found = None
            if table is not None and table.hash_algo == request.hash_algo:
                found = table.find(request.index, request.size, request.hash)
            if table is None or found is None:
                flush()
                continue
            offset = table.blocks[found].offset
            if run and (run[-1][0] != path or run[-1][1] + run[-1][2] != offset):
                flush()
            run.append((path, offset, request.size))
        flush()

    def _read_run(self, run: list[tuple[str, int, int]], batch: _Batch) -> None:
        path, start, _ = run[0]
        length = run[-1][1] + run[-1][2] - start
        try:
            fd = self.descriptors.get(path, batch.checked)
            data = memoryview(os.pread(fd, length, start))
        except (OSError, LanshareError) as exc:
            logger.debug("cannot read %s at %d: %s", path, start, exc)
            return  # each block is read alone, and fails alone
        for _, offset, size in run:
            piece = data[offset - start : offset - start + size]
            if piece.nbytes == size:
                batch.ahead[(path, offset, size)] = piece

    def _find(
        self, request: BlockRequested, downloads: Mapping[str, Downloading], batch: _Batch
    ) -> bytes | memoryview | None:
        data = self._from_file(request, batch)
        if data is None:
            same_path = downloads.get(request.path)
            if same_path is not None:
                data = self._from_download(same_path, request, batch)
        if data is None:
            data = self._elsewhere(request, batch)
        if data is None:
            for download in downloads.values():
                if download.record.path != request.path:
                    data = self._from_download(download, request, batch)
                    if data is not None:
                        break
        return data

    def _from_file(self, request: BlockRequested, batch: _Batch) -> bytes | memoryview | None:
        path = request.path
        table = self._table(path, batch)
        if table is None or table.hash_algo != request.hash_algo:
            return None
        found = table.find(request.index, request.size, request.hash)
        if found is None:
            return None
        data = self._read(path, table.blocks[found].offset, request, batch)
        if data is None:
            # The file is not what its table says: forget both, and what was read ahead of
            # it, and read its record once more (a table kept from before might be stale).
            self.tables.drop(path)
            self.descriptors.drop(path)
            for key in [key for key in batch.ahead if key[0] == path]:
                del batch.ahead[key]
            if path not in batch.tables:
                self._look_up(path, batch)
                return self._from_file(request, batch)
        return data

    def _table(self, path: str, batch: _Batch) -> BlockTable | None:
        """The table of ``path``: kept, read in this batch, or read from the index now."""
        table = batch.tables[path] if path in batch.tables else self.tables.get(path)
        if table is None and path not in batch.tables:
            table = self._look_up(path, batch)
        return table

    def _look_up(self, path: str, batch: _Batch) -> BlockTable | None:
        try:
            table = BlockTable.of(self._index.get(self._folder, path))
        except LanshareError as exc:
            logger.debug("cannot look up %s to serve it: %s", path, exc)
            table = None
        batch.tables[path] = table
        if table is not None:
            self.tables.put(path, table)
        return table

    def _from_download(
        self, download: Downloading, request: BlockRequested, batch: _Batch
    ) -> bytes | memoryview | None:
        record = download.record
        if record.hash_algo != request.hash_algo:
            return None
        index = request.index if record.path == request.path else -1
        table = batch.downloads.get(record.path)
        if table is None:
            table = batch.downloads[record.path] = BlockTable(record.hash_algo, record.blocks)
        found = table.find(index, request.size, request.hash)
        if found is None or found not in download.done:
            return None
        offset = record.blocks[found].offset
        return self._read(FolderStore.temp_path(record), offset, request, batch, record.path)

    def _elsewhere(self, request: BlockRequested, batch: _Batch) -> bytes | memoryview | None:
        try:
            locations = self._index.find_block(request.hash, self._folder)
        except LanshareError as exc:
            logger.debug("cannot look up a block to serve: %s", exc)
            return None
        fitting = [place for place in locations if place.size == request.size]
        for place in fitting[:MAX_ELSEWHERE]:
            data = self._read(place.path, place.offset, request, batch)
            if data is not None:
                return data
        return None

    def _read(
        self, rel: str, offset: int, request: BlockRequested, batch: _Batch, owner: str = ""
    ) -> bytes | memoryview | None:
        """The block's bytes at ``offset`` of ``rel`` (the temporary file of a download of
        ``owner``, if given) if they match its hash, else None."""
        data: bytes | memoryview | None = None
        if not owner:
            data = batch.ahead.pop((rel, offset, request.size), None)
        if data is None:
            try:
                fd = self.descriptors.get(rel, batch.checked, owner)
                data = os.pread(fd, request.size, offset)
            except (OSError, LanshareError) as exc:
                logger.debug("cannot read %s at %d: %s", rel, offset, exc)
                self.descriptors.drop(rel)
                return None
        if len(data) != request.size:
            return None
        if chunker.block_hash(data, request.hash_algo) != request.hash:
            return None
        return data


def _in_progress(downloads: Mapping[str, Downloading], rel: str, owner: str) -> bool:
    """Whether ``rel`` is the temporary file of the download of ``owner`` in progress."""
    download = downloads.get(owner)
    return download is not None and FolderStore.temp_path(download.record) == rel


# -- the loop side ---------------------------------------------------------------------------


class BlockServer:
    """Answers one folder's block requests, in batches read by :class:`BlockReader`."""

    def __init__(
        self,
        reader: BlockReader,
        *,
        send: Callable[[int, bytes | memoryview], object],
        reject: Callable[[int], object],
        kick: Callable[[], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        downloads: Callable[[], Mapping[str, Downloading]],
    ) -> None:
        """``send``/``reject`` answer a request by its id, ``kick`` makes the transport send,
        ``spawn`` runs the server's work (the engine's task group), ``downloads`` are the
        downloads in progress by path (the engine's own map: copied on the loop)."""
        self._reader = reader
        self._send = send
        self._reject = reject
        self._kick = kick
        self._spawn = spawn
        self._downloads = downloads
        self._queue: OrderedDict[int, BlockRequested] = OrderedDict()
        """Requests waiting to be read, by request id, oldest first."""
        self._invalid = Invalidation()
        self._running = False
        self._closed = False

    def request(self, event: BlockRequested) -> None:
        """Answer ``event`` as soon as it can be read (on the loop)."""
        self._queue[event.request_id] = event
        self._wake()

    def cancel(self, request_id: int) -> None:
        """The request ``request_id`` is cancelled: if it still waits, it is not read."""
        self._queue.pop(request_id, None)

    def invalidate(self, paths: Iterable[str] | None = None) -> None:
        """The records of ``paths`` (every path when None) changed, or their downloads were
        placed or discarded: what is kept of them (tables, descriptors of the files and of
        the downloads' temporary files) goes before the next batch."""
        if paths is None:
            self._invalid.everything = True
        else:
            self._invalid.paths.update(paths)
        self._wake()

    async def close(self) -> None:
        """Stop serving and close every descriptor (after the batch being read, if any)."""
        self._closed = True
        await asyncio.to_thread(self._reader.close)

    def _wake(self) -> None:
        if not self._running and not self._closed:
            self._running = True
            self._spawn(self._serve())

    async def _serve(self) -> None:
        try:
            hop = self._next_hop()
            while hop is not None:
                batch, reading = hop
                try:
                    answers = await reading
                except BaseException:
                    for event in batch:
                        self._reject(event.request_id)
                    self._kick()
                    raise
                for event, data in zip(batch, answers, strict=True):
                    if data is None:
                        self._reject(event.request_id)
                    else:
                        self._send(event.request_id, data)
                hop = self._next_hop()  # read on while the transport sends these
                self._kick()
        finally:
            self._running = False

    def _next_hop(
        self,
    ) -> tuple[list[BlockRequested], asyncio.Future[list[bytes | memoryview | None]]] | None:
        if self._closed or not (self._queue or self._invalid):
            return None
        batch: list[BlockRequested] = []
        size = 0
        queue = self._queue
        while queue and len(batch) < BATCH_BLOCKS:
            first = queue[next(iter(queue))]
            if batch and size + first.size > BATCH_BYTES:
                break
            _, event = queue.popitem(last=False)
            batch.append(event)
            size += event.size
        invalid, self._invalid = self._invalid, Invalidation()
        downloads = dict(self._downloads()) if batch else {}
        loop = asyncio.get_running_loop()
        reading = loop.run_in_executor(None, partial(self._reader.read, batch, downloads, invalid))
        return batch, reading
