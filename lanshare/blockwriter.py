"""Verified blocks of a folder's downloads, written and recorded in batches, off the event loop.

Theory of operation
-------------------
* **Verified before queued.** Only a :class:`~lanshare.store.VerifiedBlock` comes in: bytes
  already checked against their block's hash where they came from (the protocol as a block
  arrives, ``FolderStore.read_block`` for a local copy). Nothing here hashes them again.
* **One thread hop per batch.** Blocks wait in the folder's queue; one hop at a time takes
  everything queued (up to ``BATCH_BYTES``), writes each block with ``pwrite`` into its
  temporary file, then records all of them as verified in the index in one transaction. A
  hop that would carry less than ``MIN_BATCH_BYTES`` first waits up to ``LINGER`` seconds
  for company; blocks that arrive while a hop runs go in the next one. The event loop does
  no file or SQLite work for a block.
* **Write, then record, then report.** :meth:`BlockWriter.write` returns only once its
  block is written and recorded, so the engine announces it (HAVE), reports it done to the
  scheduler and completes the file only after that. Whenever a ``kill -9`` lands, the index
  lists no block whose bytes were not written to the temporary file before (and a resume
  reads the listed blocks again before trusting them); what was queued or in the hop is
  fetched again, at most about two batches.
* **Early writeback.** Once a hop has written its blocks, it asks the kernel to start
  writing each temporary file's span of them to disk (``FolderStore.start_writeback``, which
  does not wait), so the fsync before placement finds little left to flush.
* **Bounded memory.** The bytes queued or in the hop in progress stay within
  ``BATCH_BYTES`` (a larger block is let in alone): a ``write`` that would go beyond waits
  for a hop to end. The blocks received and not yet written count as outstanding for the
  scheduler meanwhile, so the requests in flight shrink as the disk falls behind.
* **No task of its own.** A caller of ``write`` that finds no hop running runs the next one
  for everyone queued; the others wait for it to end, and one of them runs the next. So a
  stop, which lets the engine's work finish, drains the queue, and a crash leaves nothing
  running. A caller cancelled during its hop puts the hop's blocks back at the head of the
  queue and tells the thread to stop after the block it is writing; the next hop writes them
  again (the same bytes at the same place).
* **A cancelled caller's block goes.** Whoever cancels a ``write`` (an abandoned download, a
  stop) takes its block out of the queue and gives its bytes back to the budget at once; a
  block a hop has taken already is skipped by it if not written yet (its bytes come back
  when the hop ends). So a download abandoned meanwhile gets no late writes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lanshare.errors import LanshareError
from lanshare.index import WrittenBlocks

if TYPE_CHECKING:
    from lanshare.index import Index
    from lanshare.store import Assembly, FolderStore, VerifiedBlock

BATCH_BYTES = 8 * 1024 * 1024
"""Most bytes written in one thread hop, and held (queued or being written) at once."""
MIN_BATCH_BYTES = 1024 * 1024
"""A hop that would write less waits up to ``LINGER`` for more blocks first."""
LINGER = 0.003
"""Seconds a small hop waits for company. Short: blocks waiting here still count as
outstanding for the scheduler, which asks for no more meanwhile (20 ms drained the
pipeline at moderate rates and slowed whole transfers)."""


@dataclass(slots=True, eq=False)
class _Entry:
    assembly: Assembly
    block: VerifiedBlock
    done: asyncio.Future[None]
    withdrawn: bool = False
    """Its caller was cancelled: not to be written or recorded (read by the hop's thread)."""

    @property
    def size(self) -> int:
        return len(self.block.data)


class _Hop:
    """One batch in a worker thread; ``cancelled`` tells it to stop where it is."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False


class BlockWriter:
    """The verified blocks of one folder's downloads: written to their temporary files and
    recorded in the index, many per thread hop."""

    def __init__(
        self,
        store: FolderStore,
        index: Index,
        folder: int,
        *,
        batch_bytes: int = BATCH_BYTES,
        min_batch_bytes: int = MIN_BATCH_BYTES,
        linger: float = LINGER,
    ) -> None:
        self._store = store
        self._index = index
        self._folder = folder
        self._batch_bytes = batch_bytes
        self._min_batch_bytes = min_batch_bytes
        self._linger = linger
        self._queue: deque[_Entry] = deque()
        self._held = 0
        """Bytes queued or in the hop in progress."""
        self._running = False
        self._ended: asyncio.Future[None] | None = None
        """Resolved when the hop in progress ends (made by the first to wait for it)."""
        self._company: asyncio.Future[None] | None = None
        """Resolved when a lingering hop has enough to go."""

    async def write(self, assembly: Assembly, block: VerifiedBlock) -> None:
        """Write ``block`` into the temporary file of ``assembly`` and record it in the
        index as verified; returns once both are done.

        Raises:
            IntegrityError: the bytes are not the block's size; nothing written.
            DiskFullError: no space left for it.
            StorageError: the write or the index failed.
        """
        size = len(block.data)
        while self._held and self._held + size > self._batch_bytes:
            await self._hop_end()
        entry = _Entry(assembly, block, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        self._held += size
        company = self._company
        if company is not None and not company.done() and self._held >= self._min_batch_bytes:
            company.set_result(None)
        try:
            while not entry.done.done():
                if self._running:
                    await self._hop_end()
                else:
                    await self._hop()
        except asyncio.CancelledError:
            self._withdraw(entry)
            raise
        entry.done.result()

    def _withdraw(self, entry: _Entry) -> None:
        """Forget the block of a cancelled caller (a download abandoned, a stop): out of the
        queue with its bytes given back, or, taken by a hop already, skipped by it if not
        written yet (the hop gives its bytes back when it ends)."""
        entry.withdrawn = True
        entry.done.cancel()
        try:
            self._queue.remove(entry)
        except ValueError:
            return
        self._held -= entry.size
        if not self._running:
            # Callers held back by the budget wait for a hop's end, and none may come now.
            ended, self._ended = self._ended, None
            if ended is not None and not ended.done():
                ended.set_result(None)

    async def _hop_end(self) -> None:
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        # Waited on through ``wait``: a cancelled waiter must not cancel the shared future.
        await asyncio.wait((self._ended,))

    async def _hop(self) -> None:
        self._running = True
        hop = _Hop()
        batch: list[_Entry] = []
        try:
            if self._held < self._min_batch_bytes and self._linger > 0:
                self._company = asyncio.get_running_loop().create_future()
                await asyncio.wait((self._company,), timeout=self._linger)
                self._company = None
            taken = 0
            while self._queue and (not batch or taken + self._queue[0].size <= self._batch_bytes):
                entry = self._queue.popleft()
                batch.append(entry)
                taken += entry.size
            try:
                errors = await asyncio.to_thread(self._write_and_record, batch, hop)
            except asyncio.CancelledError:
                hop.cancelled = True
                self._queue.extendleft(reversed(batch))
                raise
            except Exception as exc:  # a bug: fail these blocks, not every later one
                errors = [LanshareError(f"cannot write blocks: {exc!r}")] * len(batch)
            for entry, error in zip(batch, errors, strict=True):
                self._held -= entry.size
                if entry.done.done():
                    continue
                if error is None:
                    entry.done.set_result(None)
                else:
                    entry.done.set_exception(error)
        finally:
            self._running = False
            self._company = None
            ended, self._ended = self._ended, None
            if ended is not None and not ended.done():
                ended.set_result(None)

    def _write_and_record(self, batch: list[_Entry], hop: _Hop) -> list[LanshareError | None]:
        """In a worker thread: write every block, then record those written in one
        transaction. Returns each block's error (None: written and recorded)."""
        errors: list[LanshareError | None] = [None] * len(batch)
        written: dict[tuple[str, bytes], list[int]] = {}
        # Per assembly (by identity): the first byte written in this hop and the end.
        spans: dict[int, tuple[Assembly, int, int]] = {}
        for i, entry in enumerate(batch):
            if hop.cancelled:
                return errors  # put back in the queue by the loop: nothing is recorded
            if entry.withdrawn:
                continue
            try:
                self._store.write_verified(entry.assembly, entry.block)
            except LanshareError as exc:
                errors[i] = exc
                continue
            assembly = entry.assembly
            record = assembly.record
            written.setdefault((record.path, record.file_hash), []).append(entry.block.index)
            target = record.blocks[entry.block.index]
            span = spans.get(id(assembly))
            start, end = target.offset, target.offset + target.size
            if span is not None:
                start, end = min(start, span[1]), max(end, span[2])
            spans[id(assembly)] = (assembly, start, end)
        # The disk writes these while the index records them and the next blocks arrive.
        for assembly, start, end in spans.values():
            self._store.start_writeback(assembly, start, end - start)
        if hop.cancelled or not written:
            return errors
        try:
            self._index.partial_mark_verified(
                self._folder,
                [WrittenBlocks(path, h, tuple(indexes)) for (path, h), indexes in written.items()],
            )
        except LanshareError as exc:
            errors = [exc if error is None else error for error in errors]
        return errors
