"""File operations inside one shared folder: serve blocks, assemble downloads, archive, delete.

Blocking I/O (call through ``asyncio.to_thread``). Every path is resolved component by
component from the folder root with ``O_NOFOLLOW`` directory descriptors, so nothing is ever
read or written through a symlink, even one swapped in while we work. A download is built
in a temporary file beside its target (``.lanshare-tmp-…``, never visible under the real
name) from blocks already checked against their hashes (:class:`VerifiedBlock`), checked whole
against the record, then fsynced and renamed into place atomically, and the directory fsynced.
Anything a remote change would overwrite or delete is first moved to
``.lanshare/versions/`` so a mistake on one machine can be undone on the others.

Theory of operation
-------------------
* **Each block hashed once.** A block is checked against its hash where its bytes come from:
  the protocol checks a received block as it completes, :meth:`FolderStore.read_block` a
  local copy as it reads it. The store writes such a :class:`VerifiedBlock` as it is
  (``pwrite``), and the final check of a download (:meth:`FolderStore.place`) needs no second
  read of the file: every block of the record was verified as it was written (the caller
  keeps their indexes) and the record's block hashes hash to its file hash. Blocks taken over
  from a temporary file after a restart are the exception: :meth:`FolderStore.verified_blocks`
  reads them again once, as nothing in memory vouches for them.
* **Placing in batches.** :meth:`FolderStore.place` puts many finished downloads in place at
  once: every temporary file is made whole and durable (mode, mtime, ``fsync``; many side by
  side, as a file system commits fsyncs that wait together in one go; a small file held in
  memory, :class:`Buffered`, is written to its temporary file first), then each
  one still wanted is renamed over its target, then each directory that received one is
  fsynced once. A crash before a directory's fsync may lose a rename (the temporary file or
  the old file is what the next start finds), never leave a partial file under a real name.
  A replaced file never leaves its path empty: its archive (or, in a conflict, the loser's
  conflict copy) is a second name made and made durable first, then the rename swaps the
  new file in. At every instant the path holds the old file or the new one.
* **Early writeback.** As a download's blocks are written, the writer asks the kernel to
  start writing those pages to disk (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does
  not wait and keeps them cached; ``posix_fadvise(DONTNEED)`` would also drop them from the
  cache). So the fsync before the rename, a serial step at the very end of a transfer, finds
  little left to flush (~1-5 ms instead of ~220 ms for 512 MiB on ext4 here). It is only a
  hint: the durability before the rename comes from that fsync, which always runs.
* **Bounded descriptors.** A download's temporary file and its directory stay open only
  while there is room: ``OpenAssemblies`` (one per process, sized from ``RLIMIT_NOFILE``)
  keeps the most recently used ones open and closes the others, which reopen on demand
  (``O_NOFOLLOW`` from the root, and only if the file is still the same inode). Descriptors
  are handed out only under a lease, and a leased assembly is never closed, so a number is
  never reused for another file under a ``pwrite``. ``EMFILE`` or
  ``ENFILE`` first closes every idle download; if that is not enough it surfaces as
  ``DescriptorsExhausted``, a reason to wait, not a failure of the file. A close may flush
  (slow on NFS): it never runs under the bound's lock, which the whole process shares, nor
  on the event loop's thread (``Assembly.close`` there hands it to a closer thread); the
  descriptors still count against the bound until they are closed.
* **Never replace an edit.** Before a file is replaced, deleted or has its metadata set, it
  must still be what the index recorded when the action was planned (``LocalState``). Size
  and mtime must match; they are not enough, since ``cp -p``, ``rsync -t`` or a rewrite
  within one timestamp tick keep both. Where the file system keeps inode numbers and ctimes
  (ext4, xfs, btrfs, tmpfs, …: not FAT, exFAT, SMB or FUSE, whose inode numbers change on
  remount and whose ctime follows the mtime), an unchanged inode and ctime prove nothing was
  written since the index recorded them, unless the cache is racy: recorded as untrusted
  (``ctime_ns = 0``) by a scan that ran within ``chunker.RACY_WINDOW_NS`` of the file's
  last write, when a write in the same tick could hide. In every other case the file is
  read again and compared with the recorded block hashes. Any difference raises
  ``LocalChangeError``: the engine rescans and the planner keeps the edit (a newer local
  version or a conflict copy).
* **Modes from a peer are permissions only.** Wherever a record's mode is applied (a
  placed download, a made directory, a metadata change) only its permission bits are used,
  masked by the daemon's umask (:func:`applied_mode`): a peer never sets a set-id or sticky
  bit here, nor opens a file wider than this daemon would create it.
* **Archives.** A file to be replaced or deleted is hard-linked into
  ``.lanshare/versions/<dir>/<stem>~<UTC stamp>[-n]<ext>`` (its own mtime and mode kept, for
  a restore); a deleted one is then unlinked, a replaced one keeps its name until the new
  file is renamed over it. Where hard links fail (FAT, exFAT, some FUSE and SMB mounts, too
  many links, another mount) a deleted file is renamed there (``RENAME_NOREPLACE``); where
  that fails too, and always for a replaced file, it is copied with its mode and mtime
  (``O_EXCL``). No way ever replaces an existing archive. The stamp in the name is the
  archive time: the pruning keeps an archive ``versions_keep_days`` after it was archived,
  however old the file is.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import hashlib
import logging
import os
import re
import resource
import stat
import threading
import time
from collections import OrderedDict, deque
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lanshare import chunker
from lanshare.errors import (
    DescriptorsExhausted,
    DiskFullError,
    IntegrityError,
    LanshareError,
    LocalChangeError,
    StorageError,
    map_exceptions,
)
from lanshare.manifest import EntryType
from lanshare.paths import INTERNAL_DIR, MAX_NAME_SIZE, TEMP_PREFIX, is_temporary, normalize

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterator, Sequence

    from lanshare.manifest import Block, FileRecord

logger = logging.getLogger(__name__)

VERSIONS_DIR = f"{INTERNAL_DIR}/versions"
"""Where replaced and deleted files are kept, relative to the folder root."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _read_umask() -> int:
    """The process's umask, read once at import, when no other thread of ours runs yet:
    ``os.umask`` can only read it by setting it, and a file another thread creates between
    the set and the restore would get the wrong mode."""
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/self/status", encoding="ascii", errors="replace") as status,
    ):
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8) & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


FILE_MODE = 0o644
"""The mode a file gets when its record carries none (before our umask)."""
DIR_MODE = 0o755
"""The mode a directory gets when its record carries none (before our umask)."""


def applied_mode(mode: int, default: int) -> int:
    """The mode to give a file or directory whose record says ``mode`` (``default`` if 0).

    Only the permission bits (0o777), masked by our umask as any file we create would be:
    the mode comes from a peer, and set-user-id, set-group-id or sticky bits from a peer
    (a stolen or buggy key holder) would hand our users' privileges to whoever wrote the
    file. The scanner records no more than these bits either, and takes a mode that is
    what this function made of the record's for no change of ours (else the umask of one
    node would narrow the modes of the whole folder).
    """
    return (mode & 0o777 or default) & ~_UMASK


@dataclass(frozen=True, slots=True)
class LocalState:
    """What a path was on disk when an action was planned: it must still be so when applied.

    For a regular file (``file``): its size, mtime and content (block hashes), and the scan
    cache the index holds for it (``inode``, ``ctime_ns``; 0 when there is none to trust).
    Of anything else only whether it exists is checked. Build it with :meth:`of`.
    """

    exists: bool
    _: KW_ONLY
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    ctime_ns: int = 0
    blocks: tuple[Block, ...] = ()
    hash_algo: str = ""
    file: bool = False

    @classmethod
    def of(cls, record: FileRecord | None, inode: int = 0, ctime_ns: int = 0) -> LocalState:
        """The state the index recorded for a path (absent for None or a tombstone), with
        the scan cache of that record (``inode``, ``ctime_ns``) when the index has one."""
        if record is None or record.deleted or record.type is not EntryType.FILE:
            return cls(exists=record is not None and not record.deleted)
        return cls(
            exists=True,
            size=record.size,
            mtime_ns=record.mtime_ns,
            inode=inode,
            ctime_ns=ctime_ns,
            blocks=record.blocks,
            hash_algo=record.hash_algo,
            file=True,
        )

    def stat_proves_unchanged(self, st: os.stat_result) -> bool:
        """True when ``st`` alone shows the file was not written since the index recorded
        it (on a file system whose inode numbers and ctimes can be trusted)."""
        # A cache recorded within the racy window of a write is stored untrusted (0) by the
        # scanner: a write in the same timestamp tick could hide behind it. Any other write
        # since moves the ctime.
        return self.ctime_ns != 0 and (st.st_ino, st.st_ctime_ns) == (self.inode, self.ctime_ns)


@dataclass(frozen=True, slots=True)
class VerifiedBlock:
    """The bytes of block ``index`` of a download's record, already checked against that
    block's hash where they came from: by the protocol as they arrived (a ``BlockReceived``
    carries only bytes that match the hash asked for), or by :meth:`FolderStore.read_block`
    as they were read. They are written without hashing them again."""

    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Placement:
    """A finished download to put in place.

    ``planned`` is what the target was when the download was planned; ``verified`` the
    indexes of the blocks verified as they were written into the temporary file (in this
    run, or read again when it resumed one), or as they were kept in memory (``Buffered``).
    """

    assembly: Assembly | Buffered
    planned: LocalState
    verified: Collection[int]
    keep_as: str = ""
    """A conflict: the target (the local loser, as ``planned`` recorded it) is kept under
    this path in the same folder instead of being archived."""


class Buffered:
    """A download of a small file held in memory until it is placed: its temporary file is
    written, made durable and renamed into place in one go by :meth:`FolderStore.place`.

    A folder of thousands of small files saves, for each, a file created and sized when the
    download starts, a write and a record of progress in the index; a crash loses what was
    received (fetched again), never anything on disk.
    """

    def __init__(self, store: FolderStore, record: FileRecord) -> None:
        self.record = record
        self.temp_name = store.temp_name(record)
        self._store = store
        self._blocks: dict[int, bytes] = {}

    def keep(self, block: VerifiedBlock) -> None:
        """Hold ``block`` (verified where it came from) until the file is placed.

        Raises:
            IntegrityError: the bytes are not the block's size.
        """
        expected = self.record.blocks[block.index].size
        if len(block.data) != expected:
            raise IntegrityError(
                f"block {block.index} of {self.record.path} has {len(block.data)} bytes, "
                f"not {expected}"
            )
        self._blocks[block.index] = bytes(block.data)

    def block(self, index: int) -> bytes | None:
        """The bytes kept of block ``index``, if any."""
        return self._blocks.get(index)

    @contextlib.contextmanager
    def lease(self) -> Iterator[tuple[int, int]]:
        """``(-1, dir_fd)``: the directory the file goes to (the file itself is not open)."""
        parent, _ = _split(self.record.path)
        with self._store._dir(parent) as dir_fd:
            yield -1, dir_fd

    def close(self) -> None:
        """Let go of the bytes (nothing is open)."""
        self._blocks.clear()

    def write(self) -> None:
        """Write the file under its temporary name, with its mode and mtime, durably.
        Blocking: :meth:`FolderStore.place` calls it."""
        record = self.record
        parent, _ = _split(record.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._store._dir(parent, create=True) as dir_fd:
            with _name_directory(parent):
                fd = os.open(self.temp_name, flags, 0o600, dir_fd=dir_fd)
            try:
                for index, block in enumerate(record.blocks):
                    data = memoryview(self._blocks[index])
                    offset = block.offset
                    while data:
                        written = os.pwrite(fd, data, offset)
                        data, offset = data[written:], offset + written
                os.fchmod(fd, applied_mode(record.mode, FILE_MODE))
                os.utime(fd, ns=(record.mtime_ns, record.mtime_ns))
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):  # a half-written file is no use to anyone
                    os.unlink(self.temp_name, dir_fd=dir_fd)
                raise
            finally:
                os.close(fd)


class Assembly:
    """A download in progress: a temporary file beside the target.

    Its descriptors are opened on demand under the store's :class:`OpenAssemblies`
    bound, and may be closed while the download waits: :meth:`lease` reopens the same file
    (``O_NOFOLLOW`` from the folder root, the same inode) and holds it open for a block of
    work.
    """

    def __init__(self, store: FolderStore, record: FileRecord, temp_name: str) -> None:
        self.record = record
        self.temp_name = temp_name
        self._store = store
        self._fd = -1
        self._dir_fd = -1
        self._opening = False
        self._identity: tuple[int, int] | None = None
        """Device and inode of the temporary file, checked on every reopen."""
        self._leases = 0
        self._closed = False

    @contextlib.contextmanager
    def lease(self) -> Iterator[tuple[int, int]]:
        """``(fd, dir_fd)``, never closed before the block ends, whoever else needs room."""
        descriptors = self._store.assemblies.acquire(self)
        try:
            yield descriptors
        finally:
            self._store.assemblies.release(self)

    def close(self) -> None:
        """Close the descriptors and keep the temporary file (a later start resumes it).
        Under a lease they close when it ends; called on an event loop, in a closer thread
        (:meth:`OpenAssemblies.close`)."""
        self._store.assemblies.close(self)

    def _open(self, *, create: bool) -> None:
        """Open the descriptors (creating and sizing the file when ``create``). Blocking."""
        parent, _ = _split(self.record.path)
        dir_fd = self._store._dir_fd(parent, create=create)
        try:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            fd = os.open(self.temp_name, flags, 0o600, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                identity = (st.st_dev, st.st_ino)
                if self._identity is not None and identity != self._identity:
                    raise StorageError(
                        f"the temporary file of {self.record.path} was replaced meanwhile"
                    )
                if create and st.st_size != self.record.size:
                    os.ftruncate(fd, self.record.size)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            os.close(dir_fd)
            raise
        self._fd, self._dir_fd, self._identity = fd, dir_fd, identity


def default_open_assemblies() -> int:
    """How many downloads may keep their descriptors open at once: an eighth of the soft
    ``RLIMIT_NOFILE`` (two descriptors each: a quarter of the limit), between 4 and
    :data:`MAX_OPEN_ASSEMBLIES`. The rest is left to sockets, the index, serving and scans."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_ASSEMBLIES
    return max(4, min(MAX_OPEN_ASSEMBLIES, soft // 8))


MAX_OPEN_ASSEMBLIES = 256
"""Open downloads at most, however high the descriptor limit."""

DESCRIPTORS_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})
"""Errors of a process (or system) out of file descriptors: back-pressure, not a failure."""


class OpenAssemblies:
    """The descriptors of downloads in progress: at most ``capacity`` assemblies open,
    least recently used closed first. Thread-safe.

    An assembly is never closed from under a thread using it: not while leased
    (:meth:`Assembly.lease`, the only way to its descriptors); leased ones may exceed
    ``capacity`` (at most one per worker thread in practice).
    A reopen that meets ``EMFILE``/``ENFILE`` closes every other idle assembly and tries
    once more before it gives up.

    Files are opened and descriptors closed after the lock is let go: creating a file
    or closing one waits on the file system (its journal, while other threads fsync; a
    flush on NFS), and the lock is the whole process's. An assembly being opened has its
    room reserved and is opened by one thread at a time. Descriptors are never closed on
    an event loop's thread: there :meth:`close` only marks the assembly and hands the
    closing to a closer thread, taking no lock. Descriptors taken out and not closed yet,
    and those being opened, count against ``capacity``.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = default_open_assemblies() if capacity is None else max(1, capacity)
        self._lock = threading.Lock()
        self._open: OrderedDict[Assembly, None] = OrderedDict()
        self._closing = 0
        """Descriptor pairs taken out of ``_open`` and not closed yet."""
        self._opening = 0
        """Assemblies being opened (outside the lock), their room reserved."""
        self._opened = threading.Condition(self._lock)
        """Notified when an assembly's opening ends."""
        self._to_close: deque[Assembly] = deque()
        """Closed on an event loop, for the closer thread (guarded by ``_closer_lock``)."""
        self._closer_lock = threading.Lock()
        """Held for a few list operations at most, so the loop may take it."""
        self._closer_running = False
        self.opened = 0
        """Descriptor pairs opened so far (first opens and reopens)."""

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    def begin(self, assembly: Assembly) -> None:
        """Create (or reopen, to resume) and size ``assembly``'s file and open it."""
        self._ensure_open(assembly, create=True)

    def acquire(self, assembly: Assembly) -> tuple[int, int]:
        with self._lock:
            if assembly._closed:
                raise StorageError(f"the download of {assembly.record.path} was closed")
            assembly._leases += 1  # leased, it is never evicted while it opens
        try:
            self._ensure_open(assembly, create=False)
        except BaseException:
            self.release(assembly)
            raise
        return assembly._fd, assembly._dir_fd

    def release(self, assembly: Assembly) -> None:
        with self._lock:
            assembly._leases -= 1
            done = assembly._closed and assembly._leases == 0
            detached = self._detach(assembly) if done else []
        self._close(detached)

    def close(self, assembly: Assembly) -> None:
        """No more leases of ``assembly``; its descriptors close once none holds them.
        On an event loop's thread this only marks it: a closer thread does the rest."""
        assembly._closed = True  # read under the lock by ``acquire``: no lease from now on
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._close_idle(assembly)
            return
        with self._closer_lock:
            self._to_close.append(assembly)
            if self._closer_running:
                return
            self._closer_running = True
        # A thread for a burst of closes, gone once they are done (an idle daemon keeps none).
        threading.Thread(target=self._close_queued, name="lanshare-close", daemon=True).start()

    def _close_queued(self) -> None:
        while True:
            with self._closer_lock:
                if not self._to_close:
                    self._closer_running = False
                    return
                assembly = self._to_close.popleft()
            self._close_idle(assembly)

    def _close_idle(self, assembly: Assembly) -> None:
        with self._lock:
            detached = self._detach(assembly) if assembly._leases == 0 else []
        self._close(detached)

    def _detach(self, assembly: Assembly) -> list[tuple[int, int]]:
        """Take ``assembly``'s descriptors out (under the lock), to be closed after it."""
        self._open.pop(assembly, None)
        if assembly._fd < 0 and assembly._dir_fd < 0:
            return []
        pair = (assembly._fd, assembly._dir_fd)
        assembly._fd = assembly._dir_fd = -1
        self._closing += 1
        return [pair]

    def _close(self, detached: list[tuple[int, int]]) -> None:
        """Close descriptors taken out by :meth:`_detach` (without the lock)."""
        if detached:
            _close_pairs(detached)
            with self._lock:
                self._closing -= len(detached)

    def _ensure_open(self, assembly: Assembly, *, create: bool) -> None:
        """Open ``assembly`` if it is not (called without the lock), after closing the
        least recently used idle ones to make room."""
        with self._lock:
            while assembly._opening:  # another thread opens it: take what it opened
                self._opened.wait()
            if assembly._fd >= 0:
                self._open.move_to_end(assembly)
                return
            assembly._opening = True
            self._opening += 1
            evicted = self._evict(self.capacity, keep=assembly)
        try:
            self._close(evicted)
            try:
                assembly._open(create=create)
            except OSError as exc:
                if exc.errno not in DESCRIPTORS_EXHAUSTED:
                    raise
                logger.debug(
                    "out of descriptors opening %s: closing idle downloads", assembly.temp_name
                )
                with self._lock:
                    evicted = self._evict(0, keep=assembly)
                self._close(evicted)
                assembly._open(create=create)
        finally:
            with self._lock:
                assembly._opening = False
                self._opening -= 1
                self._opened.notify_all()
                if assembly._fd >= 0:
                    self.opened += 1
                    self._open[assembly] = None
                # Closed while it opened, and not leased: it closes now.
                stale = self._detach(assembly) if assembly._closed and not assembly._leases else []
            self._close(stale)

    def _evict(self, room: int, *, keep: Assembly) -> list[tuple[int, int]]:
        """Take out the least recently used idle assemblies' descriptors until at most
        ``room`` pairs stay open, counting those being closed or opened elsewhere."""
        limit = room - self._closing - self._opening
        evicted: list[tuple[int, int]] = []
        for candidate in list(self._open):
            if len(self._open) <= limit:
                break
            if candidate is keep or candidate._leases:
                continue
            evicted += self._detach(candidate)
        return evicted


def _close_pairs(detached: list[tuple[int, int]]) -> None:
    for pair in detached:
        for fd in pair:
            with contextlib.suppress(OSError):
                os.close(fd)


_shared_assemblies: OpenAssemblies | None = None
_shared_lock = threading.Lock()


def shared_assemblies() -> OpenAssemblies:
    """The process's one bound on open downloads (sized on first use: after the daemon
    raised its descriptor limit)."""
    global _shared_assemblies
    with _shared_lock:
        if _shared_assemblies is None:
            _shared_assemblies = OpenAssemblies()
        return _shared_assemblies


SEAL_WORKERS = 16
"""Finished downloads made durable at once. A file system commits the fsyncs that wait
side by side together (one journal commit for the lot), so a batch of small files costs
about one flush, not one each."""


class FolderStore:
    """Blocking file operations confined to the folder ``root``."""

    def __init__(self, root: Path, assemblies: OpenAssemblies | None = None) -> None:
        self.root = root
        self.assemblies = assemblies if assemblies is not None else shared_assemblies()
        """Where the descriptors of this folder's downloads are bounded (one per process)."""

    # -- serving -------------------------------------------------------------------------

    def read_block(self, rel: str, block: Block, algo: str) -> bytes | None:
        """The bytes of ``block`` of ``rel`` if they still match its hash, else None.

        Local copies go through here: a file changed since it was indexed must never be
        copied under its old hash.
        """
        try:
            with self._open_file(rel) as fd:
                data = os.pread(fd, block.size, block.offset)
        except (OSError, StorageError) as exc:
            logger.debug("cannot read %s at %d: %s", rel, block.offset, exc)
            return None
        if len(data) != block.size or chunker.block_hash(data, algo) != block.hash:
            return None
        return data

    # -- assembling downloads ------------------------------------------------------------

    @staticmethod
    def temp_name(record: FileRecord) -> str:
        """The temporary file name for a download of ``record``: stable, so a restart
        resumes, and distinct for each path, as files with the same content (empty ones,
        copies) download side by side in one directory."""
        digest = hashlib.blake2b(record.file_hash, digest_size=12, person=b"lanshare-tmp")
        digest.update(record.path.encode())
        return f"{TEMP_PREFIX}{digest.hexdigest()}"

    @classmethod
    def temp_path(cls, record: FileRecord) -> str:
        """Where :meth:`temp_name` lies, relative to the folder root."""
        parent, _ = _split(record.path)
        name = cls.temp_name(record)
        return f"{parent}/{name}" if parent else name

    def begin(self, record: FileRecord) -> Assembly:
        """Open (or reopen, to resume) the temporary file for ``record``, sized to fit.

        Raises:
            DescriptorsExhausted: the process has no descriptor left even after closing
                the idle downloads' (wait for others to finish, then try again).
        """
        parent, _ = _split(record.path)
        assembly = Assembly(self, record, self.temp_name(record))
        with _os_errors(), _name_directory(parent):
            self.assemblies.begin(assembly)
        return assembly

    def write_verified(self, assembly: Assembly, block: VerifiedBlock) -> None:
        """Write ``block`` (verified already: not hashed again) in place in the temporary file.

        Raises:
            IntegrityError: the bytes are not the block's size; nothing written.
            StorageError: the write failed (disk full, …).
        """
        target = assembly.record.blocks[block.index]
        view = memoryview(block.data)
        if view.nbytes != target.size:
            raise IntegrityError(
                f"block {block.index} of {assembly.record.path} is {view.nbytes} bytes, "
                f"not {target.size}"
            )
        with _os_errors(), assembly.lease() as (fd, _):
            written = os.pwrite(fd, view, target.offset)
            while written < target.size:
                written += os.pwrite(fd, view[written:], target.offset + written)

    def start_writeback(self, assembly: Assembly, offset: int, length: int) -> None:
        """Start writing the temporary file's dirty pages in ``[offset, offset + length)``
        to disk, without waiting (see "Early writeback" in the module docstring). Only a
        hint: where the system has no such call, or it fails, the final fsync does it all.
        """
        writeback = _sync_file_range()
        if writeback is None or length <= 0:
            return
        with contextlib.suppress(OSError, LanshareError), assembly.lease() as (fd, _):
            writeback(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def verified_blocks(self, assembly: Assembly, indexes: set[int] | None = None) -> set[int]:
        """Which blocks of the temporary file already hold the right bytes.

        Used after a crash: the index lists blocks recorded as verified, and this re-reads
        only those (``indexes``), or every block when ``indexes`` is None.
        """
        record = assembly.record
        wanted = range(len(record.blocks)) if indexes is None else sorted(indexes)
        good: set[int] = set()
        with _os_errors(), assembly.lease() as (fd, _):
            for i in wanted:
                if not 0 <= i < len(record.blocks):
                    continue
                block = record.blocks[i]
                data = os.pread(fd, block.size, block.offset)
                if (
                    len(data) == block.size
                    and chunker.block_hash(data, record.hash_algo) == block.hash
                ):
                    good.add(i)
        return good

    def place(self, batch: Sequence[Placement], now: float) -> list[LanshareError | None]:
        """Put finished downloads in place, each only whole, verified and over an unchanged
        target.

        First every temporary file is checked whole (every block verified as written, the
        record's block hashes hashing to its file hash) and made durable (mode, mtime,
        fsync, many side by side); then each is renamed over its target if the target is still what
        ``planned`` recorded (a replaced file is archived first, or kept as ``keep_as``,
        both by a second name that leaves it in place until the rename); then every
        directory that received a file is fsynced once. A target changed since the
        download was planned (someone edited the file meanwhile) is not replaced: that
        download gets ``LocalChangeError`` and becomes a conflict copy or waits for the
        next plan.

        Returns, in the order given, None for each file placed (its assembly is closed),
        else what kept it out: ``IntegrityError`` (not whole or not the record's content),
        ``LocalChangeError``, ``DiskFullError`` or ``StorageError``.
        """
        errors: list[LanshareError | None]
        if len(batch) > 1:
            workers = min(SEAL_WORKERS, len(batch))
            with concurrent.futures.ThreadPoolExecutor(workers, "lanshare-seal") as pool:
                errors = list(pool.map(self._seal, batch))
        else:
            errors = [self._seal(item) for item in batch]
        # A directory is fsynced through a descriptor of its own, opened once per directory:
        # the assemblies' descriptors may be closed (and their numbers reused) meanwhile.
        directories: dict[tuple[int, int], tuple[str, list[int]]] = {}
        for i, item in enumerate(batch):
            if errors[i] is not None:
                continue
            assembly = item.assembly
            record = assembly.record
            parent, name = _split(record.path)
            try:
                with _os_errors(), assembly.lease() as (_, dir_fd):
                    self._check_unchanged(dir_fd, name, record.path, item.planned)
                    # The old file gets its second name first and keeps its own until the
                    # rename replaces it: the path holds the old or the new file throughout.
                    if item.keep_as and item.planned.exists:
                        self._replace_keeping(dir_fd, assembly.temp_name, name, item.keep_as)
                    else:
                        if item.planned.exists:
                            self._archive_in(dir_fd, parent, name, now, keep=True)
                        os.rename(assembly.temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                    st = os.fstat(dir_fd)
            except LanshareError as exc:
                errors[i] = exc
                continue
            directories.setdefault((st.st_dev, st.st_ino), (parent, []))[1].append(i)
        for parent, placed in directories.values():
            try:
                with _os_errors(), self._dir(parent) as dir_fd:
                    os.fsync(dir_fd)
            except LanshareError as exc:
                for i in placed:
                    errors[i] = exc
        for item, error in zip(batch, errors, strict=True):
            if error is None:
                item.assembly.close()
        return errors

    def _replace_keeping(self, dir_fd: int, temp_name: str, name: str, keep_rel: str) -> None:
        """Rename ``temp_name`` over ``name`` after giving the file there its second name
        ``keep_rel`` (a conflict copy), durably; the copy goes again if the rename fails."""
        keep_parent, keep_name = _split(keep_rel)
        with self._dir(keep_parent, create=True) as keep_fd:
            try:
                _second_name(name, keep_name, dir_fd, keep_fd)
            except FileExistsError as exc:
                raise LocalChangeError(f"{keep_rel} already exists; kept both") from exc
            try:
                # Durable before the rename can be: a crash may lose the rename, never both.
                os.fsync(keep_fd)
                os.rename(temp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(keep_name, dir_fd=keep_fd)
                raise

    @staticmethod
    def _seal(item: Placement) -> LanshareError | None:
        """Check a finished temporary file whole and make it durable with its metadata (a
        ``Buffered`` one is written first); what kept it from being placed, if anything."""
        assembly = item.assembly
        record = assembly.record
        if not _whole_file_matches(item.verified, record):
            return IntegrityError(f"assembled {record.path} does not match its file hash")
        try:
            if isinstance(assembly, Buffered):
                with _os_errors():
                    assembly.write()
                return None
            with _os_errors(), assembly.lease() as (fd, _):
                os.fchmod(fd, applied_mode(record.mode, FILE_MODE))
                os.utime(fd, ns=(record.mtime_ns, record.mtime_ns))
                os.fsync(fd)
        except LanshareError as exc:
            return exc
        return None

    def discard(self, record: FileRecord) -> None:
        """Remove the temporary file of a download that will not finish."""
        self.discard_temp(self.temp_path(record))

    def discard_temp(self, rel: str) -> None:
        """Remove the temporary file at ``rel`` (as the index recorded it); anything not
        named as a temporary file is left alone."""
        parent, name = _split(rel)
        if not is_temporary(name):
            return
        with contextlib.suppress(OSError, StorageError), self._dir(parent) as dir_fd:
            os.unlink(name, dir_fd=dir_fd)

    # -- other actions -------------------------------------------------------------------

    def archive(self, rel: str, now: float) -> str | None:
        """Move the file at ``rel`` into ``.lanshare/versions/`` under a name stamped with
        ``now`` (UTC), keeping its mtime and mode.

        Two versions archived within the same second get ``-2``, ``-3``, … after the stamp:
        an archive never replaces another one.

        Returns the archived relative path, or None when there was nothing to keep (missing,
        or not a regular file).
        """
        parent, name = _split(rel)
        with _os_errors(), self._dir(parent) as src_fd:
            archived = self._archive_in(src_fd, parent, name, now, keep=False)
            if archived is not None:
                os.fsync(src_fd)
        return archived

    def _archive_in(
        self, src_fd: int, parent: str, name: str, now: float, *, keep: bool
    ) -> str | None:
        """Archive the file ``name`` of the directory ``parent`` (open as ``src_fd``), the
        archive durable on return; with ``keep`` the file also stays where it is (a link or
        a copy, never a move: the caller replaces it by a rename)."""
        stamp = time.strftime(_STAMP_FORMAT, time.gmtime(now))
        archived_parent = f"{VERSIONS_DIR}/{parent}" if parent else VERSIONS_DIR
        try:
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        with self._dir(archived_parent, create=True) as dst_fd:
            archived_name = _archive_unique(name, stamp, src_fd, dst_fd, keep=keep)
            os.fsync(dst_fd)
        return f"{archived_parent}/{archived_name}"

    def delete(self, rel: str, entry: EntryType, planned: LocalState, now: float) -> None:
        """Delete ``rel`` as a remote tombstone asks: files are archived, directories removed
        only when empty, symlinks unlinked.

        Raises:
            LocalChangeError: the file changed since the deletion was planned.
        """
        parent, name = _split(rel)
        with _os_errors(), self._dir(parent) as dir_fd:
            if entry is EntryType.FILE:
                self._check_unchanged(dir_fd, name, rel, planned)
                self.archive(rel, now)
                return
            try:
                if entry is EntryType.DIR:
                    os.rmdir(name, dir_fd=dir_fd)
                else:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    raise LocalChangeError(
                        f"{rel} still holds files unknown to other peers; kept it"
                    ) from exc
                raise
            os.fsync(dir_fd)

    def make_dir(self, rel: str, mode: int) -> None:
        """Create directory ``rel`` (and its parents) if missing and set its mode."""
        with _os_errors(), self._dir(rel, create=True) as fd:
            if mode:
                os.fchmod(fd, applied_mode(mode, DIR_MODE))

    def make_symlink(self, rel: str, target: str) -> None:
        """Point ``rel`` at ``target``, replacing an older link atomically; never a file."""
        parent, name = _split(rel)
        temp = f"{TEMP_PREFIX}link-{os.getpid()}"
        with _os_errors(), self._dir(parent, create=True) as dir_fd:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISLNK(st.st_mode):
                    raise LocalChangeError(f"{rel} is not a symlink here; kept it")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dir_fd)
            os.symlink(target, temp, dir_fd=dir_fd)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)

    def set_metadata(self, rel: str, mode: int, mtime_ns: int, planned: LocalState) -> None:
        """Change only the metadata of an entry whose content is already right.

        A file gets mode and mtime; a directory its mode (its mtime moves with every entry
        inside, so it is not synced); a symlink nothing (Linux has no link modes, and its
        mtime is not synced either).
        """
        parent, name = _split(rel)
        with _os_errors(), self._dir(parent) as dir_fd:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return
            if stat.S_ISDIR(st.st_mode):
                with self._dir(rel) as fd:
                    os.fchmod(fd, applied_mode(mode, DIR_MODE))
                return
            self._check_unchanged(dir_fd, name, rel, planned)
            with self._open_file(rel) as fd:
                os.fchmod(fd, applied_mode(mode, FILE_MODE))
                os.utime(fd, ns=(mtime_ns, mtime_ns))

    def rename_local(self, rel: str, new_rel: str) -> None:
        """Move ``rel`` to ``new_rel`` inside the folder (conflict copies); never overwrites."""
        src_parent, src_name = _split(rel)
        dst_parent, dst_name = _split(new_rel)
        with (
            _os_errors(),
            self._dir(src_parent) as src_fd,
            self._dir(dst_parent, create=True) as dst_fd,
        ):
            try:
                os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                raise LocalChangeError(f"{new_rel} already exists; kept both")
            os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            os.fsync(dst_fd)
            os.fsync(src_fd)

    def free_space(self) -> int:
        """Bytes an unprivileged writer may still use on the folder's filesystem."""
        with _os_errors():
            st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def prune_versions(self, now: float, keep_seconds: float) -> int:
        """Delete versions archived more than ``keep_seconds`` before ``now``; returns how
        many. The archive time is the stamp in the name, not the file's own mtime (that is
        the file's, kept for a restore); a file whose name bears no stamp (not put there by
        the store) counts from its last change."""
        versions = self.root / VERSIONS_DIR
        removed = 0
        cutoff = now - keep_seconds
        for dirpath, _, filenames in os.walk(versions, followlinks=False):
            for filename in filenames:
                path = Path(dirpath) / filename
                with contextlib.suppress(OSError):
                    archived = archived_at(filename)
                    if archived is None:
                        st = path.lstat()
                        archived = max(st.st_mtime, st.st_ctime)
                    if archived < cutoff:
                        path.unlink()
                        removed += 1
        if removed:
            logger.info(
                "%s: removed %d archived versions older than %g days",
                self.root,
                removed,
                keep_seconds / 86400,
            )
        return removed

    # -- private -------------------------------------------------------------------------

    def _check_unchanged(self, dir_fd: int, name: str, rel: str, planned: LocalState) -> None:
        """Raise ``LocalChangeError`` unless ``name`` is still what ``planned`` recorded."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if planned.exists:
                raise LocalChangeError(f"{rel} was removed locally meanwhile") from None
            return
        if not planned.exists:
            raise LocalChangeError(f"{rel} was created locally meanwhile; kept it")
        if not planned.file:
            return
        if not stat.S_ISREG(st.st_mode):
            raise LocalChangeError(f"{rel} is no longer a regular file here; kept it")
        if (st.st_size, st.st_mtime_ns) != (planned.size, planned.mtime_ns):
            raise LocalChangeError(f"{rel} was changed locally meanwhile; kept it")
        if planned.stat_proves_unchanged(st) and self._stat_cache_trusted(st.st_dev):
            return
        if not _same_content(dir_fd, name, planned):
            raise LocalChangeError(
                f"{rel} was changed locally meanwhile (same size and mtime); kept it"
            )

    def _stat_cache_trusted(self, device: int) -> bool:
        """True if the file system holding ``device`` (inside this folder) keeps stable
        inode numbers and a ctime that every write moves.

        Read from the mount table at each call (cheap beside the fsyncs of the action that
        asks): a removable disk may be swapped for another file system under the same path.
        """
        fs_type = _fs_type(device, self.root)
        return fs_type is not None and fs_type in STABLE_STAT_FILESYSTEMS

    def _dir_fd(self, rel_dir: str, *, create: bool = False) -> int:
        """An O_NOFOLLOW descriptor of directory ``rel_dir`` below the root ('' = root)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        for part in rel_dir.split("/") if rel_dir else ():
            try:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StorageError(
                        f"refusing to go through {part!r} in {rel_dir}: not a real directory"
                    ) from exc
                raise
            os.close(fd)
            fd = child
        return fd

    @contextlib.contextmanager
    def _dir(self, rel_dir: str, *, create: bool = False) -> Iterator[int]:
        fd = self._dir_fd(rel_dir, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_for_reading(self, rel: str) -> int:
        """A read-only descriptor of the regular file ``rel``, reached without following any
        symlink; the caller closes it.

        Raises:
            OSError: ``rel`` cannot be opened.
            StorageError: ``rel`` is not a regular file, or a symlink lies on the way.
        """
        parent, name = _split(rel)
        with self._dir(parent) as dir_fd:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(f"{rel} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _open_file(self, rel: str) -> Iterator[int]:
        fd = self.open_for_reading(rel)
        try:
            yield fd
        finally:
            os.close(fd)


def _split(rel: str) -> tuple[str, str]:
    """Parent and name of a relative path, after validating it once more."""
    clean = normalize(rel)
    parent, _, name = clean.rpartition("/")
    return parent, name


MAX_ARCHIVE_SUFFIX = 1000
"""Archives of one name within one second before archiving gives up (never overwrites)."""

_STAMP_FORMAT = "%Y%m%d-%H%M%S"
# ``<base>~<stamp>[-n][.<ext>]``: the extension holds no dot, so the stamp is the one that
# only a counter and an extension follow (a stamp-like part of the name itself is not).
_ARCHIVED_NAME = re.compile(r"~(\d{8}-\d{6})(?:-\d+)?(?:\.[^.]*)?$")

STABLE_STAT_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "f2fs", "jfs", "nilfs2", "reiserfs"}
    | {"zfs", "tmpfs", "ramfs", "overlay", "nfs", "nfs4"}
)
"""File systems whose inode numbers stay with a file and whose ctime moves with every write
or metadata change. Elsewhere (vfat, exfat, ntfs, cifs, FUSE, unknown) the content is read
again before a file whose size and mtime match is replaced."""

_NO_LINK = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV, errno.ENOSYS}
)
"""``link`` errors of a file system (or pair of mounts) that cannot hard-link this file."""
_NO_RENAME_NOREPLACE = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}
)
"""``renameat2(RENAME_NOREPLACE)`` errors where only a copy can keep the file."""
_RENAME_NOREPLACE = 1
COPY_CHUNK = 8 * 1024 * 1024
"""Bytes read and written at a time when an archive has to be a copy."""


def archived_at(name: str) -> float | None:
    """When a file in the versions directory was archived (the UTC stamp in its name), or
    None for a name the store did not make."""
    match = _ARCHIVED_NAME.search(name)
    if match is None:
        return None
    try:
        return float(calendar.timegm(time.strptime(match.group(1), _STAMP_FORMAT)))
    except ValueError:
        return None


def _archive_names(name: str, stamp: str) -> Iterator[str]:
    stem, dot, ext = name.rpartition(".")
    base, suffix = (stem, f".{ext}") if dot and stem else (name, "")
    for n in range(1, MAX_ARCHIVE_SUFFIX + 1):
        counter = "" if n == 1 else f"-{n}"
        candidate = f"{base}~{stamp}{counter}{suffix}"
        if len(candidate.encode()) > MAX_NAME_SIZE:
            candidate = f"{base[:100]}~{stamp}{counter}{suffix[:20]}"
        yield candidate


def _archive_unique(name: str, stamp: str, src_fd: int, dst_fd: int, *, keep: bool) -> str:
    """Move the file ``name`` into the versions directory under the first free stamped
    name (with ``keep``: give it that second name, the file staying where it is); returns
    that name.

    A hard link first (nothing moves until the archive exists; ``link`` fails when the
    target exists), then a rename that refuses to replace (not with ``keep``), then a copy
    into a new file: each one where the one before cannot work on this file system. Every
    way fails with ``FileExistsError`` on a taken name, so a concurrent archive can never be
    replaced, and tells whether the original is still to be unlinked (only then: an error
    removing it is not taken for a file system without links).
    """
    ways: list[Callable[[str, str, int, int], bool]]
    if keep:
        ways, unsupported = [_by_link, _by_copy], [_NO_LINK]
    else:
        ways, unsupported = [_by_link, _by_rename, _by_copy], [_NO_LINK, _NO_RENAME_NOREPLACE]
    for candidate in _archive_names(name, stamp):
        while True:
            try:
                original_left = ways[0](name, candidate, src_fd, dst_fd)
            except FileExistsError:
                break
            except OSError as exc:
                if len(ways) == 1 or exc.errno not in unsupported[0]:
                    raise
                logger.debug("archiving %s: %s; trying another way", name, exc)
                ways.pop(0)
                unsupported.pop(0)
                continue
            if original_left and not keep:
                os.unlink(name, dir_fd=src_fd)
            return candidate
    raise StorageError(f"too many archived versions of {name} in one second")


def _second_name(name: str, candidate: str, src_fd: int, dst_fd: int) -> None:
    """Give the file ``name`` the new name ``candidate`` too: a hard link, or a copy where
    the file system cannot link it. ``FileExistsError`` when ``candidate`` is taken."""
    try:
        _by_link(name, candidate, src_fd, dst_fd)
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        logger.debug("keeping %s as %s: %s; copying it", name, candidate, exc)
        _by_copy(name, candidate, src_fd, dst_fd)


def _by_link(name: str, candidate: str, src_fd: int, dst_fd: int) -> bool:
    os.link(name, candidate, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    return True


def _by_rename(name: str, candidate: str, src_fd: int, dst_fd: int) -> bool:
    renameat2 = _renameat2()
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(src_fd, os.fsencode(name), dst_fd, os.fsencode(candidate), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), candidate)
    return False


def _by_copy(name: str, candidate: str, src_fd: int, dst_fd: int) -> bool:
    """Copy ``name`` with its mode and mtime into the new file ``candidate``, on disk
    before the original goes; a copy that fails is removed. (A crash in the middle can
    leave a partial copy among the versions, never a lost file: the original is still in
    its place and is archived again when the action is retried.)"""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        st = os.fstat(src)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst = os.open(candidate, flags, 0o600, dir_fd=dst_fd)
        try:
            while chunk := os.read(src, COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
            with contextlib.suppress(OSError):  # FAT and exFAT keep no Unix modes
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(dst)
        except BaseException:
            os.close(dst)
            with contextlib.suppress(OSError):
                os.unlink(candidate, dir_fd=dst_fd)
            raise
        os.close(dst)
    finally:
        os.close(src)
    return True


_SYNC_FILE_RANGE_WRITE = 2
"""``SYNC_FILE_RANGE_WRITE``: start writeback of the range's dirty pages, do not wait."""


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range`` (Python has no binding), or None where libc lacks it."""
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    sync_file_range: Callable[[int, int, int, int], int] = func
    return sync_file_range


@functools.cache
def _renameat2() -> Callable[[int, bytes, int, bytes, int], int] | None:
    """libc's ``renameat2`` (Python has no binding), or None where libc lacks it."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    func.restype = ctypes.c_int
    renameat2: Callable[[int, bytes, int, bytes, int], int] = func
    return renameat2


def _same_content(dir_fd: int, name: str, planned: LocalState) -> bool:
    """True if the file ``name`` holds exactly the blocks ``planned`` recorded (read again,
    block by block, stopping at the first difference), unchanged while it was read."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return False
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or before.st_size != planned.size:
            return False
        offset = 0
        for block in planned.blocks:
            if block.offset != offset:
                return False
            data = os.pread(fd, block.size, block.offset)
            if len(data) != block.size or chunker.block_hash(data, planned.hash_algo) != block.hash:
                return False
            offset += block.size
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return offset == planned.size and (
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
        before.st_ino,
    ) == (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino)


def _fs_type(device: int, root: Path) -> str | None:
    """The type of the mounted file system with device number ``device``, as the mount
    table names it; where no mount has that number (btrfs subvolumes report their own),
    the type of the mount holding ``root``. None if the table cannot be read."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
            mounts = [line.split() for line in table]
        where = os.path.realpath(root)
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for fields in mounts:
        # id parent major:minor root mount-point options [optional…] - type source super
        try:
            fs_type = fields[fields.index("-", 6) + 1]
            point = _unescape(fields[4])
        except (ValueError, IndexError):
            continue
        if fields[2] == wanted:
            return fs_type
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fs_type)
    return best[1] if best is not None else None


def _unescape(field: str) -> str:
    """A mount table field with its octal escapes (``\\040`` for a space, …) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _whole_file_matches(good_blocks: Collection[int], record: FileRecord) -> bool:
    """True when every block is on disk and the blocks tile the file and hash to its hash."""
    if set(good_blocks) != set(range(len(record.blocks))):
        return False
    offset = 0
    for block in record.blocks:
        if block.offset != offset:
            return False
        offset += block.size
    hashes = [block.hash for block in record.blocks]
    return offset == record.size and chunker.whole_file_hash(hashes, record.hash_algo) == (
        record.file_hash
    )


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def _name_directory(rel_dir: str) -> Iterator[None]:
    """A permission error names the directory the user can fix, not a temporary file in it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NOT_WRITABLE:
            raise
        where = f"directory {rel_dir}" if rel_dir else "the folder's top directory"
        raise StorageError(f"cannot write in {where}: {exc.strerror}") from exc


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """``OSError`` as ``StorageError``; a full disk or quota as ``DiskFullError``, which
    pauses pulls rather than failing one file, and a process out of descriptors as
    ``DescriptorsExhausted``, which holds new downloads back a while."""
    try:
        with map_exceptions({OSError: StorageError}):
            yield
    except StorageError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            raise DiskFullError(str(exc)) from cause
        if isinstance(cause, OSError) and cause.errno in DESCRIPTORS_EXHAUSTED:
            raise DescriptorsExhausted(str(exc)) from cause
        raise
