"""File operations inside one shared folder: serve blocks, assemble downloads, archive, delete.

Blocking I/O (call through ``asyncio.to_thread``). Every path is resolved component by
component from the folder root with ``O_NOFOLLOW`` directory descriptors, so nothing is ever
read or written through a symlink, even one swapped in while we work. A download is built
in a temporary file beside its target (``.lanshare-tmp-…``, never visible under the real
name), each block checked against its hash before it is written, the whole file checked
again, then fsynced and renamed into place atomically, and the directory fsynced.
Anything a remote change would overwrite or delete is first moved to
``.lanshare/versions/`` so a mistake on one machine can be undone on the others.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lanshare import chunker
from lanshare.errors import (
    DiskFullError,
    IntegrityError,
    LocalChangeError,
    StorageError,
    map_exceptions,
)
from lanshare.manifest import EntryType
from lanshare.paths import INTERNAL_DIR, MAX_NAME_SIZE, TEMP_PREFIX, is_temporary, normalize

if TYPE_CHECKING:
    from collections.abc import Iterator

    from lanshare.manifest import Block, BytesLike, FileRecord

logger = logging.getLogger(__name__)

VERSIONS_DIR = f"{INTERNAL_DIR}/versions"
"""Where replaced and deleted files are kept, relative to the folder root."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class LocalState:
    """What a path was on disk when an action was planned: it must still be so when applied."""

    exists: bool
    size: int = 0
    mtime_ns: int = 0

    @classmethod
    def of(cls, record: FileRecord | None) -> LocalState:
        """The state the index recorded for a path (absent for None or a tombstone)."""
        if record is None or record.deleted or record.type is not EntryType.FILE:
            return cls(exists=record is not None and not record.deleted)
        return cls(exists=True, size=record.size, mtime_ns=record.mtime_ns)


class Assembly:
    """A download in progress: an open temporary file beside the target."""

    def __init__(self, record: FileRecord, dir_fd: int, fd: int, temp_name: str) -> None:
        self.record = record
        self.temp_name = temp_name
        self._dir_fd = dir_fd
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def dir_fd(self) -> int:
        return self._dir_fd

    def close(self) -> None:
        """Close the descriptors and keep the temporary file (a later start resumes it)."""
        for fd in (self._fd, self._dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dir_fd = -1


class FolderStore:
    """Blocking file operations confined to the folder ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # -- serving -------------------------------------------------------------------------

    def read_block(self, rel: str, block: Block, algo: str) -> bytes | None:
        """The bytes of ``block`` of ``rel`` if they still match its hash, else None.

        Serving and local copies both go through here: a file changed since it was indexed
        must never be sent under its old hash.
        """
        try:
            with self._open_file(rel, os.O_RDONLY) as fd:
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
        """Open (or reopen, to resume) the temporary file for ``record``, sized to fit."""
        parent, _ = _split(record.path)
        name = self.temp_name(record)
        with _os_errors(), _name_directory(parent):
            dir_fd = self._dir_fd(parent, create=True)
            try:
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
                try:
                    if os.fstat(fd).st_size != record.size:
                        os.ftruncate(fd, record.size)
                except BaseException:
                    os.close(fd)
                    raise
            except BaseException:
                os.close(dir_fd)
                raise
        return Assembly(record, dir_fd, fd, name)

    def write_block(self, assembly: Assembly, index: int, data: BytesLike) -> None:
        """Check ``data`` against block ``index`` of the record, then write it in place.

        Raises:
            IntegrityError: the data does not match the block's size or hash; nothing written.
            StorageError: the write failed (disk full, …).
        """
        record = assembly.record
        block = record.blocks[index]
        view = memoryview(data)
        if view.nbytes != block.size or chunker.block_hash(view, record.hash_algo) != block.hash:
            raise IntegrityError(f"block {index} of {record.path} does not match its hash")
        with _os_errors():
            written = os.pwrite(assembly.fd, view, block.offset)
            while written < block.size:
                written += os.pwrite(assembly.fd, view[written:], block.offset + written)

    def verified_blocks(self, assembly: Assembly, indexes: set[int] | None = None) -> set[int]:
        """Which blocks of the temporary file already hold the right bytes.

        Used after a crash: the index lists blocks recorded as verified, and this re-reads
        only those (``indexes``), or every block when ``indexes`` is None.
        """
        record = assembly.record
        wanted = range(len(record.blocks)) if indexes is None else sorted(indexes)
        good: set[int] = set()
        for i in wanted:
            if not 0 <= i < len(record.blocks):
                continue
            block = record.blocks[i]
            with _os_errors():
                data = os.pread(assembly.fd, block.size, block.offset)
            if len(data) == block.size and chunker.block_hash(data, record.hash_algo) == block.hash:
                good.add(i)
        return good

    def commit(self, assembly: Assembly, planned: LocalState, now: float) -> None:
        """Verify the whole temporary file, then put it in place of the target.

        ``planned`` is what the target was when the download was planned; if it changed
        since (someone edited the file meanwhile) nothing is replaced and
        ``LocalChangeError`` is raised, leaving the download to become a conflict copy.

        Raises:
            IntegrityError: the assembled file does not hash to the record's file hash.
            LocalChangeError: the target changed since the download was planned.
            StorageError: the filesystem failed.
        """
        record = assembly.record
        _, name = _split(record.path)
        with _os_errors():
            os.fsync(assembly.fd)
            if not _whole_file_matches(self.verified_blocks(assembly), record):
                raise IntegrityError(f"assembled {record.path} does not match its file hash")
            os.fchmod(assembly.fd, stat.S_IMODE(record.mode) or 0o644)
            os.utime(assembly.fd, ns=(record.mtime_ns, record.mtime_ns))
            os.fsync(assembly.fd)
            self._check_unchanged(assembly.dir_fd, name, record.path, planned)
            if planned.exists:
                self.archive(record.path, now)
            os.rename(
                assembly.temp_name, name, src_dir_fd=assembly.dir_fd, dst_dir_fd=assembly.dir_fd
            )
            os.fsync(assembly.dir_fd)
        assembly.close()

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
        """Move the file at ``rel`` into ``.lanshare/versions/`` under a time-stamped name.

        Two versions archived within the same second get ``-2``, ``-3``, … after the stamp:
        an archive never replaces another one.

        Returns the archived relative path, or None when there was nothing to keep (missing,
        or not a regular file).
        """
        parent, name = _split(rel)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        archived_parent = f"{VERSIONS_DIR}/{parent}" if parent else VERSIONS_DIR
        with _os_errors(), self._dir(parent) as src_fd:
            try:
                st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            with self._dir(archived_parent, create=True) as dst_fd:
                archived_name = _link_unique(name, stamp, src_fd, dst_fd)
                os.unlink(name, dir_fd=src_fd)
                os.fsync(dst_fd)
            os.fsync(src_fd)
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
                os.fchmod(fd, stat.S_IMODE(mode))

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
                    os.fchmod(fd, stat.S_IMODE(mode))
                return
            self._check_unchanged(dir_fd, name, rel, planned)
            with self._open_file(rel, os.O_RDONLY) as fd:
                os.fchmod(fd, stat.S_IMODE(mode))
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
        """Delete archived versions older than ``keep_seconds``; returns how many."""
        versions = self.root / VERSIONS_DIR
        removed = 0
        cutoff = now - keep_seconds
        for dirpath, _, filenames in os.walk(versions, followlinks=False):
            for filename in filenames:
                path = Path(dirpath) / filename
                with contextlib.suppress(OSError):
                    if path.lstat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        return removed

    # -- private -------------------------------------------------------------------------

    def _check_unchanged(self, dir_fd: int, name: str, rel: str, planned: LocalState) -> None:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            if planned.exists:
                raise LocalChangeError(f"{rel} was removed locally meanwhile") from None
            return
        if not planned.exists:
            raise LocalChangeError(f"{rel} was created locally meanwhile; kept it")
        if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) != (
            planned.size,
            planned.mtime_ns,
        ):
            raise LocalChangeError(f"{rel} was changed locally meanwhile; kept it")

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

    @contextlib.contextmanager
    def _open_file(self, rel: str, flags: int) -> Iterator[int]:
        parent, name = _split(rel)
        with self._dir(parent) as dir_fd:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(f"{rel} is not a regular file")
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


def _link_unique(name: str, stamp: str, src_fd: int, dst_fd: int) -> str:
    """Hard-link ``name`` into the versions directory under the first free stamped name.

    ``link`` fails when the target exists, unlike ``rename``, so a concurrent archive can
    never be replaced.
    """
    stem, dot, ext = name.rpartition(".")
    base, suffix = (stem, f".{ext}") if dot and stem else (name, "")
    for n in range(1, MAX_ARCHIVE_SUFFIX + 1):
        candidate = f"{base}~{stamp}{'' if n == 1 else f'-{n}'}{suffix}"
        if len(candidate.encode()) > MAX_NAME_SIZE:
            candidate = f"{base[:100]}~{stamp}{'' if n == 1 else f'-{n}'}{suffix[:20]}"
        try:
            os.link(name, candidate, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        except FileExistsError:
            continue
        return candidate
    raise StorageError(f"too many archived versions of {name} in one second")


def _whole_file_matches(good_blocks: set[int], record: FileRecord) -> bool:
    """True when every block is on disk and the blocks tile the file and hash to its hash."""
    if len(good_blocks) != len(record.blocks):
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
    pauses pulls rather than failing one file."""
    try:
        with map_exceptions({OSError: StorageError}):
            yield
    except StorageError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            raise DiskFullError(str(exc)) from cause
        raise
