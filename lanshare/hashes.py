"""The hash algorithms of block and file hashes: one table that records, wire and chunker share.

Pure: no I/O.

Theory of operation
-------------------
* **One registry.** Every algorithm lanshare can name is one :class:`HashAlgorithm` in
  :data:`ALGORITHMS`: its name (what records and the index store, ``FileRecord.hash_algo``),
  its id (the byte a manifest record and a block request carry; 0 means "no hash" and is
  never an algorithm's), its digest size and its hash function. Manifest, wire and chunker
  look algorithms up here and nowhere else, so a new algorithm is one more row, and the
  record codec and the protocol can never number one differently again. Changing a row's
  id changes the wire: bump ``protocol.wire.VERSION`` with it.
* **Hashing a buffer without copying.** :meth:`HashAlgorithm.digest` hands the caller's
  buffer (``bytes``, a ``bytearray`` or a ``memoryview`` slice of a larger buffer) straight
  to ``hashlib`` or ``blake3``, which read it in place and release the GIL on large inputs:
  hashing a block inside a receive or read buffer costs no copy and can run in a thread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from blake3 import blake3

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

BytesLike: TypeAlias = bytes | bytearray | memoryview


class Hasher(Protocol):
    """What a hash constructor returns (``hashlib`` objects and ``blake3`` alike)."""

    def digest(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """One algorithm: how it is named, numbered and computed."""

    name: str
    """Stored in records and the index (``FileRecord.hash_algo``)."""
    wire_id: int
    """The byte that names it in encoded records and block requests (1-255)."""
    digest_size: int
    """Bytes in one digest."""
    new: Callable[[BytesLike], Hasher]
    """A hasher already fed with its argument (read in place, not copied)."""

    def digest(self, data: BytesLike) -> bytes:
        """The digest of ``data``."""
        return self.new(data).digest()


ALGORITHMS: tuple[HashAlgorithm, ...] = (
    HashAlgorithm("sha256", 1, 32, hashlib.sha256),
    HashAlgorithm("blake3", 2, 32, blake3),
)
"""Every algorithm lanshare can name; ids are unique, never 0, and fixed by the protocol."""

BY_NAME: Mapping[str, HashAlgorithm] = {a.name: a for a in ALGORITHMS}
BY_WIRE_ID: Mapping[int, HashAlgorithm] = {a.wire_id: a for a in ALGORITHMS}
DIGEST_SIZES: frozenset[int] = frozenset(a.digest_size for a in ALGORITHMS)
"""Every digest size an algorithm here produces."""
MAX_DIGEST_SIZE = max(DIGEST_SIZES)


def get(name: str) -> HashAlgorithm:
    """The algorithm called ``name``.

    Raises:
        ValueError: no algorithm has that name.
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown hash algorithm {name!r}") from None


def digest(name: str, data: BytesLike) -> bytes:
    """The digest of ``data`` with the algorithm called ``name`` (``ValueError`` if unknown)."""
    return get(name).new(data).digest()
