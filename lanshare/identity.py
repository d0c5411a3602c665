"""The node's identity: 8 random bytes kept in ``<state_dir>/node_id``, created on first use.

Does file I/O (one small file, written atomically with mode 0600).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from typing import TYPE_CHECKING, NewType

from lanshare.errors import StorageError

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)

NodeId = NewType("NodeId", bytes)
"""8 random bytes naming this node; ``.hex()`` is its text form."""

NODE_ID_SIZE = 8
NODE_ID_FILE = "node_id"
_HEX_ID = re.compile(rb"[0-9a-fA-F]{%d}" % (2 * NODE_ID_SIZE))


def load_or_create_node_id(state_dir: Path) -> NodeId:
    """This node's id from ``state_dir/node_id``, made and stored there on first use.

    ``state_dir`` is created (mode 0700) if missing. The file holds the id as 16 hex digits and
    a newline, mode 0600. It is created atomically and never overwritten: if two processes start
    at once, both end up with the id that reached the disk first.

    Raises:
        StorageError: the directory or file cannot be read or written, or the file is corrupt
            (the message says how to recover).
    """
    path = state_dir / NODE_ID_FILE
    existing = _read(path)
    if existing is not None:
        return existing
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the state directory {state_dir}: {_why(exc)}") from exc
    node = NodeId(secrets.token_bytes(NODE_ID_SIZE))
    if _create_exclusive(path, (node.hex() + "\n").encode("ascii")):
        logger.info("created node id %s in %s", node.hex(), path)
        return node
    # Another process created it between our read and our write: theirs wins.
    other = _read(path)
    if other is None:  # pragma: no cover - deleted again in between
        raise StorageError(f"{path} vanished while it was being created; try again")
    return other


def short_id(node: NodeId) -> int:
    """The id as a big-endian unsigned 64-bit integer: the key used in version vectors."""
    return int.from_bytes(node, "big")


def _read(path: Path) -> NodeId | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read the node id file {path}: {_why(exc)}") from exc
    text = data.strip()
    if not _HEX_ID.fullmatch(text):
        raise StorageError(
            f"the node id file {path} is corrupt (expected {2 * NODE_ID_SIZE} hex digits); "
            f"delete it to give this machine a new id (peers will see it as a new node)"
        )
    return NodeId(bytes.fromhex(text.decode("ascii")))


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``data`` to a 0600 temp file, fsync it, then link it to ``path`` unless it exists.

    Returns False if ``path`` already existed (it is left untouched). ``link`` is atomic and
    refuses to replace, so no reader ever sees a partial file and nothing is overwritten.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    except OSError as exc:  # pragma: no cover - disk full, read-only file system
        raise StorageError(f"cannot write the node id file {path}: {_why(exc)}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
