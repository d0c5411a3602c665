"""The folder marker, ``.lanshare/folder-id``: proof that a folder's own disk is there.

Blocking file I/O (the engine calls it through ``asyncio.to_thread``).

Theory of operation
-------------------
An empty mount point (the disk not mounted) looks to a scan exactly like a folder whose files
were all deleted, and a scan that believed it would delete them on every peer. The marker
tells the two apart:

* ``lanshare init`` writes it, and so does a node that indexes the folder for the first time
  (the index holds no live entry of it yet), so it is on the folder's own disk from the start.
  A folder where it cannot be written (read-only) is still scanned.
* Before every scan, :func:`check` looks for it. Present and naming this folder: the scan
  goes on and what vanished counts. Naming another folder (another disk is mounted there):
  the folder pauses. Missing while the index holds entries: if none of them is on disk
  either, this is an empty mount point and the folder pauses; if some are, the disk is there
  and only the marker is gone (a folder shared before markers existed, or ``.lanshare/``
  removed by hand), so it is written again and the scan goes on.
* A paused folder is not scanned: nothing is recorded, deleted or forgotten. The check runs
  again at the next scan, so the folder resumes once its disk is back. ``lanshare resume``
  marks it again instead: the user says the folder is as it should be (emptied on purpose),
  and what vanished is then deleted on the other machines too.
* After every local change the node stamps the marker with its index id and the index's
  sequence (:class:`Generation`). A folder rolled back to an earlier state (a backup restored,
  a snapshot rolled back) brings back an older stamp: what vanished or changed since is then
  not taken for the user's deletions and edits (see ``FolderSync._restored``). A crash between
  an index commit and its stamp looks the same once, and is handled the same safe way.

The file holds a one-way tag of the folder id rather than the id itself: the id is meant for
encrypted sessions only, and the folder may sit on a disk others can read.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import re
import secrets
from typing import TYPE_CHECKING, NamedTuple

from lanshare.errors import StorageError
from lanshare.paths import INTERNAL_DIR, MARKER

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

logger = logging.getLogger(__name__)

PAUSE_REASON = "folder marker missing (disk not mounted?)"
"""The start of the reason a folder without its marker is paused with."""

_LABEL = b"lanshare/v1/folder-marker"
_MAX_SIZE = 256
_TAG = re.compile("[0-9a-f]{64}")


class Generation(NamedTuple):
    """The index state a marker was last stamped with."""

    index_id: bytes
    sequence: int


class Found(enum.Enum):
    """What :func:`read` found."""

    THIS = "this folder's marker"
    OTHER = "another folder's marker"
    NONE = "no marker"


def tag(folder_id: bytes) -> str:
    """The text the marker of the folder with id ``folder_id`` holds."""
    return hashlib.sha256(_LABEL + folder_id).hexdigest()


def read(root: Path, folder_id: bytes) -> Found:
    """Whether ``root`` holds the marker of the folder ``folder_id`` (an unreadable marker
    counts as none: it proves nothing)."""
    lines = _lines(root)
    if not lines or not _TAG.fullmatch(lines[0]):
        return Found.NONE  # a marker torn by a crash proves nothing either way
    return Found.THIS if lines[0] == tag(folder_id) else Found.OTHER


def generation(root: Path, folder_id: bytes) -> Generation | None:
    """The stamp of the marker of ``folder_id`` in ``root``; None if there is none."""
    lines = _lines(root)
    if lines is None or lines[:1] != [tag(folder_id)] or len(lines) < 2:
        return None
    index_id, _, sequence = lines[1].partition(" ")
    try:
        return Generation(bytes.fromhex(index_id), int(sequence))
    except ValueError:
        return None


def restored_from(root: Path, folder_id: bytes, index_id: bytes, sequence: int) -> int | None:
    """The index sequence the folder was at, when its marker's stamp says it went back to an
    earlier state than the index (``index_id`` at ``sequence``) describes: a backup restored.
    None when it did not (or nothing tells)."""
    stamp = generation(root, folder_id)
    if stamp is None or stamp.index_id != index_id or stamp.sequence >= sequence:
        return None
    return stamp.sequence


def write(
    root: Path, folder_id: bytes, stamp: Generation | None = None, *, durable: bool = True
) -> None:
    """Write the marker of ``folder_id`` into ``root`` (which must exist), atomically,
    stamped with ``stamp`` if given; ``durable`` False skips the fsyncs (a stamp lost to a
    power cut only makes the next start cautious, and a torn marker reads as none).

    Raises:
        StorageError: it cannot be written.
    """
    text = tag(folder_id) + "\n"
    if stamp is not None:
        text += f"{stamp.index_id.hex()} {stamp.sequence}\n"
    internal = root / INTERNAL_DIR
    target = root / MARKER
    temp = internal / f".folder-id.{secrets.token_hex(4)}"
    try:
        internal.mkdir(mode=0o755, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, text.encode("ascii"))
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
        if durable:
            dir_fd = os.open(internal, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise StorageError(
            f"cannot write the folder marker {target}: {exc.strerror or exc}"
        ) from exc


def _lines(root: Path) -> list[str] | None:
    try:
        with (root / MARKER).open("rb") as file:
            text = file.read(_MAX_SIZE).decode("ascii", "replace")
    except OSError:
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def check(root: Path, folder_id: bytes, held: Callable[[], Iterable[str]]) -> str:
    """Make sure ``root`` is the folder's own disk before a scan: the reason to pause the
    folder, or "" when the scan may go on (the marker written first if it was missing).

    Args:
        root: the folder root (an existing directory).
        folder_id: the folder's id (``keys.folder_id``).
        held: gives top-level names of live entries the index holds for the folder (a
            sample is enough; none when it holds none); called only if the marker is missing.

    A marker that cannot be written (a read-only folder) is logged and the scan goes on:
    the folder's files are there, so it is no empty mount point.
    """
    found = read(root, folder_id)
    if found is Found.THIS:
        return ""
    if found is Found.OTHER:
        return (
            f"{PAUSE_REASON}: {root / MARKER} names another folder; nothing is changed here "
            f"until this folder's own disk is back (`lanshare resume {root}` if it is)"
        )
    names = list(held())
    if names and not any(os.path.lexists(root / name) for name in names):
        return (
            f"{PAUSE_REASON}: neither {root / MARKER} nor any file indexed here is in the "
            "folder; nothing is changed here until they are back (if the folder really is "
            f"empty now, `lanshare resume {root}` deletes them on the other machines too)"
        )
    try:
        write(root, folder_id)
    except StorageError as exc:
        logger.warning("%s; an empty mount point in its place would not be told apart", exc)
        return ""
    if names:
        logger.info("%s: the folder marker was missing; written again", root)
    return ""
