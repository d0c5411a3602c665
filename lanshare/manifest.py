"""Manifest records (files, directories, symlinks, tombstones), version vectors and their codec.

Pure: no I/O. The binary codec is compact, canonical and bounded; it is what the index stores
and what peers exchange, so :func:`decode_record` treats its input as hostile.

Wire format (version 1). ``varint`` is unsigned LEB128, minimal (no padding bytes), ≤ 10 bytes;
``zigzag`` maps signed to unsigned (0, -1, 1, -2 … → 0, 1, 2, 3 …); ``str`` is a varint
byte length followed by that much UTF-8::

    record  = u8 FORMAT(1) | u8 type | u8 flags (bit 0: deleted; others 0) | u8 hash algo id
              | str path | varint size | zigzag mtime_ns | varint mode | varint sequence
              | str symlink_target | vbody | [file_hash] | bbody
    vbody   = varint n | n * (varint short_id | varint counter)    ids strictly increasing,
                                                                    counters ≥ 1
    bbody   = varint n | n * (varint block size | block hash)     offsets implicit: 0, then
                                                                    the running sum of sizes
    blocks  = u8 FORMAT(1) | u8 hash size | bbody      (encode_blocks, for the index)
    version = u8 FORMAT(1) | vbody                      (encode_version, for the index)

Manifest entries are the items of a manifest answer (``encode_entry``/``decode_entry``); the
first byte tells the three kinds apart (a record's is FORMAT)::

    header      = u8 0x00 | index_id (8 bytes) | u64 sequence       (big-endian; first of
                                                                     every answer)
    record      = record                                            (a record, as above)
    in_progress = u8 0x02 | u32 n | record (n bytes) | bitmap        a file the peer is
                                                                     downloading
    bitmap      = ceil(blocks / 8) bytes; bit i % 8 of byte i // 8 is set when block i is
                  verified; the unused high bits of the last byte are 0

The hash algo id is the algorithm's ``wire_id`` in :mod:`lanshare.hashes` (0: no hash);
``file_hash`` and the block hashes have that algorithm's digest size; ``file_hash`` is present
only for a live regular file. Every field is
bounded (``MAX_*`` below) and a record must be consistent (blocks cover ``size`` exactly);
anything else is a :class:`~lanshare.errors.DecodeError` on decode and a ``ValueError`` on
encode (a locally built invalid record is a bug).

A record from a peer (:func:`decode_entry`) must also leave room for this node's edits: its
version vector holds at most ``max_devices`` devices (``[sync] max_vector_devices``, default
:data:`MAX_VECTOR_DEVICES`) and no counter above :data:`MAX_PEER_COUNTER`, so bumping it can
never overflow. Such a record is refused, never trimmed: dropping an entry would make an old
version look concurrent with, or newer than, the one it was replaced by. The index keeps
reading what it stored with the wider wire bounds.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias, cast

from lanshare import hashes
from lanshare.errors import DecodeError, PathError
from lanshare.paths import MAX_PATH_SIZE, normalize

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

BytesLike: TypeAlias = bytes | bytearray | memoryview

FORMAT = 1
"""First byte of every encoding; a later layout gets a new number and decoders branch on it."""

MAX_BLOCKS = 100_000
"""Most blocks in one file's list (the chunker stays far below: see lanshare.chunker)."""

MAX_BLOCK_SIZE = 16 * 1024 * 1024
"""Largest block; with MAX_BLOCKS this bounds a file at 1.6 TB."""

MAX_VERSION_ENTRIES = 1024
"""Most devices in one version vector."""

MAX_VECTOR_DEVICES = 1000
"""Default of ``[sync] max_vector_devices``: most devices in a peer's version vector."""

MAX_PEER_COUNTER = 1 << 62
"""Largest counter in a peer's version vector: 2^62 bumps of headroom below the wire's 2^63-1."""

MAX_SYMLINK_TARGET_SIZE = MAX_PATH_SIZE
"""Longest symlink target, in bytes of UTF-8."""

MAX_RECORD_SIZE = 4 * 1024 * 1024
"""Longest input a decoder looks at; the largest valid record (MAX_BLOCKS blocks of 32-byte
hashes, longest path and target, MAX_VERSION_ENTRIES devices) takes ~3.7 MB."""

INDEX_ID_SIZE = 8
"""Bytes of a folder's random index id (see lanshare.index)."""

ENTRY_HEADER = 0x00
"""First byte of a manifest answer's header entry."""
ENTRY_IN_PROGRESS = 0x02
"""First byte of an in-progress entry (a record's first byte is FORMAT)."""

MAX_ENTRY_SIZE = 5 + MAX_RECORD_SIZE + (MAX_BLOCKS + 7) // 8
"""Longest manifest entry: an in-progress entry of the largest record."""

_U64 = (1 << 64) - 1
_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)
_U32 = (1 << 32) - 1
# Algorithm ids in a record; 0 means "no hash" (directories, symlinks, tombstones).
_ALGO_BY_ID: dict[int, str] = {0: "", **{a.wire_id: a.name for a in hashes.ALGORITHMS}}
_ID_BY_ALGO: dict[str, int] = {name: ident for ident, name in _ALGO_BY_ID.items()}
_FLAG_DELETED = 0x01
_HEADER = struct.Struct("!B8sQ")
_IN_PROGRESS_HEAD = struct.Struct("!BI")


class EntryType(enum.IntEnum):
    """What a record describes."""

    FILE = 0
    DIR = 1
    SYMLINK = 2


class Ordering(enum.Enum):
    """How two version vectors relate (the result of :meth:`VersionVector.compare`)."""

    EQUAL = "equal"
    GREATER = "greater"  # self has seen everything other has, and more
    LESSER = "lesser"
    CONCURRENT = "concurrent"  # each has a change the other has not seen: a conflict


@dataclass(frozen=True, slots=True)
class Block:
    """One block of a file: its byte range and the hash of its content."""

    offset: int
    size: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class VersionVector:
    """Immutable vector clock: a change counter per device, keyed by ``identity.short_id``.

    Always canonical: ``counters`` is sorted by device id and holds no zero counters, so two
    equal vectors compare, hash and encode identically. Build one from any pairs or a mapping;
    duplicate ids, negative or out-of-range values raise ``ValueError``.
    """

    counters: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        pairs = sorted(self.counters)
        for index, (short_id, counter) in enumerate(pairs):
            if not (0 <= short_id <= _U64 and 0 <= counter <= _I64_MAX):
                raise ValueError(f"version vector entry out of range: {short_id}: {counter}")
            if index and pairs[index - 1][0] == short_id:
                raise ValueError(f"duplicate device id in version vector: {short_id}")
        canonical = tuple((short_id, counter) for short_id, counter in pairs if counter)
        if canonical != self.counters:
            object.__setattr__(self, "counters", canonical)

    @classmethod
    def of(cls, counters: Mapping[int, int]) -> VersionVector:
        """Build from a mapping ``{short_id: counter}``."""
        return cls(tuple(counters.items()))

    def get(self, short_id: int) -> int:
        """The counter of one device (0 when it never changed the file)."""
        for ident, counter in self.counters:
            if ident == short_id:
                return counter
        return 0

    def bump(self, short_id: int) -> VersionVector:
        """A new vector recording one more change by ``short_id``; it dominates ``self``.

        Raises:
            ValueError: the vector has no room for it (counter at 2^63-1, or a new device
                past MAX_VERSION_ENTRIES): nothing can record that change.
        """
        mapping = dict(self.counters)
        counter = mapping.get(short_id, 0)
        if counter >= _I64_MAX:
            raise ValueError(f"the version counter of device {short_id:x} is at its limit")
        if not counter and len(mapping) >= MAX_VERSION_ENTRIES:
            raise ValueError(f"the version vector already names {MAX_VERSION_ENTRIES} devices")
        mapping[short_id] = counter + 1
        return VersionVector.of(mapping)

    def merge(self, other: VersionVector) -> VersionVector:
        """The least vector that dominates or equals both (pointwise maximum)."""
        mapping = dict(self.counters)
        for short_id, counter in other.counters:
            mapping[short_id] = max(counter, mapping.get(short_id, 0))
        return VersionVector.of(mapping)

    def compare(self, other: VersionVector) -> Ordering:
        """EQUAL, GREATER (self dominates), LESSER (other dominates) or CONCURRENT."""
        mine = dict(self.counters)
        theirs = dict(other.counters)
        greater = lesser = False
        for short_id in mine.keys() | theirs.keys():
            a = mine.get(short_id, 0)
            b = theirs.get(short_id, 0)
            if a > b:
                greater = True
            elif a < b:
                lesser = True
        if greater and lesser:
            return Ordering.CONCURRENT
        if greater:
            return Ordering.GREATER
        if lesser:
            return Ordering.LESSER
        return Ordering.EQUAL

    def __repr__(self) -> str:
        inner = ", ".join(f"{short_id:x}: {counter}" for short_id, counter in self.counters)
        return f"VersionVector({{{inner}}})"


@dataclass(frozen=True, slots=True)
class FileRecord:
    """The manifest entry of one path: what it is, its content, its version.

    Conventions the codec enforces: ``size`` is the file's length and 0 for directories,
    symlinks and tombstones; ``symlink_target`` is ``""`` unless a live symlink;
    ``blocks``/``file_hash`` are empty unless a live regular file; ``hash_algo`` is ``""``
    or the name of an algorithm of :mod:`lanshare.hashes` (required for a live regular
    file); ``sequence`` is the local sequence number of the last change (0 ≤ n < 2**63);
    ``mode`` fits in 32 bits.
    """

    path: str
    type: EntryType
    size: int = 0
    mtime_ns: int = 0
    mode: int = 0
    symlink_target: str = ""
    blocks: tuple[Block, ...] = ()
    file_hash: bytes = b""
    hash_algo: str = ""
    version: VersionVector = field(default_factory=VersionVector)
    sequence: int = 0
    deleted: bool = False

    def tombstone(self, version: VersionVector, sequence: int) -> FileRecord:
        """This path as deleted, with the given (already bumped) version and sequence."""
        return FileRecord(
            path=self.path,
            type=self.type,
            mtime_ns=self.mtime_ns,
            mode=self.mode,
            version=version,
            sequence=sequence,
            deleted=True,
        )


def encode_record(record: FileRecord) -> bytes:
    """The canonical binary form of ``record``.

    Raises:
        ValueError: the record breaks a rule or bound of the format (a bug in its builder).
    """
    problem = _check_record(record)
    if problem is not None:
        raise ValueError(f"cannot encode record {record.path!r}: {problem}")
    out = bytearray()
    flags = _FLAG_DELETED if record.deleted else 0
    out += bytes((FORMAT, int(record.type), flags, _ID_BY_ALGO[record.hash_algo]))
    _put_str(out, record.path)
    _put_varint(out, record.size)
    _put_varint(out, _zigzag(record.mtime_ns))
    _put_varint(out, record.mode)
    _put_varint(out, record.sequence)
    _put_str(out, record.symlink_target)
    _put_version(out, record.version)
    out += record.file_hash
    _put_blocks(out, record.blocks)
    return bytes(out)


def decode_record(data: BytesLike) -> FileRecord:
    """Parse and validate one record.

    Raises:
        DecodeError: ``data`` is not exactly one valid record of a known format.
    """
    reader = _Reader(data)
    fmt, type_id, flags, algo_id = reader.take(4)
    if fmt != FORMAT:
        raise DecodeError(f"unknown record format {fmt}")
    if type_id not in EntryType._value2member_map_:
        raise DecodeError(f"unknown entry type {type_id}")
    if flags & ~_FLAG_DELETED:
        raise DecodeError(f"unknown record flags {flags:#x}")
    hash_algo = _ALGO_BY_ID.get(algo_id)
    if hash_algo is None:
        raise DecodeError(f"unknown hash algorithm id {algo_id}")
    entry_type = EntryType(type_id)
    deleted = bool(flags & _FLAG_DELETED)
    path = reader.text(MAX_PATH_SIZE)
    size = reader.varint(_I64_MAX)
    mtime_ns = _unzigzag(reader.varint(_U64))
    mode = reader.varint(_U32)
    sequence = reader.varint(_I64_MAX)
    symlink_target = reader.text(MAX_SYMLINK_TARGET_SIZE)
    version = _read_version(reader)
    live_file = entry_type is EntryType.FILE and not deleted
    if live_file and not hash_algo:
        raise DecodeError("regular file without a hash algorithm")
    hash_size = hashes.BY_NAME[hash_algo].digest_size if live_file else 0
    file_hash = reader.take(hash_size)
    blocks = _read_blocks(reader, hash_size)
    reader.finish()
    record = FileRecord(
        path=path,
        type=entry_type,
        size=size,
        mtime_ns=mtime_ns,
        mode=mode,
        symlink_target=symlink_target,
        blocks=blocks,
        file_hash=file_hash,
        hash_algo=hash_algo,
        version=version,
        sequence=sequence,
        deleted=deleted,
    )
    problem = _check_record(record)
    if problem is not None:
        raise DecodeError(f"invalid record {path!r}: {problem}")
    return record


def encode_blocks(blocks: Iterable[Block]) -> bytes:
    """A file's block list alone (offsets contiguous from 0, one hash size for all).

    Raises:
        ValueError: the list breaks a bound or is not contiguous.
    """
    blocks = tuple(blocks)
    hash_size = len(blocks[0].hash) if blocks else 0
    if blocks and hash_size not in hashes.DIGEST_SIZES:
        raise ValueError(f"unsupported block hash size {hash_size}")
    problem = _check_blocks(blocks, hash_size)
    if problem is not None:
        raise ValueError(f"cannot encode block list: {problem}")
    out = bytearray((FORMAT, hash_size))
    _put_blocks(out, blocks)
    return bytes(out)


def decode_blocks(data: BytesLike) -> tuple[Block, ...]:
    """Parse a block list written by :func:`encode_blocks`.

    Raises:
        DecodeError: ``data`` is not exactly one valid block list.
    """
    reader = _Reader(data)
    fmt, hash_size = reader.take(2)
    if fmt != FORMAT:
        raise DecodeError(f"unknown block list format {fmt}")
    blocks = _read_blocks(reader, hash_size)
    if blocks and hash_size not in hashes.DIGEST_SIZES:
        raise DecodeError(f"unsupported block hash size {hash_size}")
    if not blocks and hash_size != 0:
        raise DecodeError("empty block list with a hash size")
    reader.finish()
    return blocks


def encode_version(version: VersionVector) -> bytes:
    """A version vector alone.

    Raises:
        ValueError: more than MAX_VERSION_ENTRIES devices.
    """
    out = bytearray((FORMAT,))
    _put_version(out, version)
    return bytes(out)


def decode_version(data: BytesLike) -> VersionVector:
    """Parse a version vector written by :func:`encode_version`.

    Raises:
        DecodeError: ``data`` is not exactly one valid, canonical version vector.
    """
    reader = _Reader(data)
    (fmt,) = reader.take(1)
    if fmt != FORMAT:
        raise DecodeError(f"unknown version vector format {fmt}")
    version = _read_version(reader)
    reader.finish()
    return version


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The first entry of every manifest answer: the answering node's index id for the folder
    (a new one means its index was reset) and its current sequence number."""

    index_id: bytes
    sequence: int


@dataclass(frozen=True, slots=True)
class InProgress:
    """A file the answering node is downloading: the record it builds and the indexes of the
    blocks it has verified so far (ascending), which it can already serve."""

    record: FileRecord
    verified: tuple[int, ...]


ManifestEntry: TypeAlias = BatchHeader | FileRecord | InProgress


def encode_entry(entry: ManifestEntry) -> bytes:
    """The binary form of one manifest entry.

    Raises:
        ValueError: a field breaks a bound (index id size, sequence, block index) or the
            record is invalid (a bug in its builder).
    """
    if isinstance(entry, FileRecord):
        return encode_record(entry)
    if isinstance(entry, BatchHeader):
        if len(entry.index_id) != INDEX_ID_SIZE or not 0 <= entry.sequence <= _I64_MAX:
            raise ValueError(f"bad manifest header {entry!r}")
        return _HEADER.pack(ENTRY_HEADER, entry.index_id, entry.sequence)
    record = entry.record
    if record.deleted or record.type is not EntryType.FILE:
        raise ValueError(f"in-progress entry for {record.path!r}, not a live file")
    encoded = encode_record(record)
    count = len(record.blocks)
    bitmap = bytearray((count + 7) // 8)
    for index in entry.verified:
        if not 0 <= index < count:
            raise ValueError(f"verified block {index} of {count} in {record.path!r}")
        bitmap[index >> 3] |= 1 << (index & 7)
    return _IN_PROGRESS_HEAD.pack(ENTRY_IN_PROGRESS, len(encoded)) + encoded + bitmap


def decode_entry(data: BytesLike, max_devices: int = MAX_VECTOR_DEVICES) -> ManifestEntry:
    """Parse and validate one manifest entry from a peer, whose version vectors may name at
    most ``max_devices`` devices.

    Raises:
        DecodeError: ``data`` is not exactly one valid entry of a known kind.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, not {type(data).__name__}")
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:  # a strided view
        raise DecodeError(f"unreadable manifest entry: {exc}") from exc
    if len(view) > MAX_ENTRY_SIZE:
        raise DecodeError(f"manifest entry longer than {MAX_ENTRY_SIZE} bytes")
    if not view:
        raise DecodeError("empty manifest entry")
    kind = view[0]
    if kind == FORMAT:
        return _check_headroom(decode_record(view), max_devices)
    if kind == ENTRY_HEADER:
        if len(view) != _HEADER.size:
            raise DecodeError(f"manifest header of {len(view)} bytes, not {_HEADER.size}")
        _, index_id, sequence = _HEADER.unpack(view)
        if sequence > _I64_MAX:
            raise DecodeError(f"manifest header sequence {sequence} out of range")
        return BatchHeader(index_id, sequence)
    if kind != ENTRY_IN_PROGRESS:
        raise DecodeError(f"unknown manifest entry kind {kind:#x}")
    if len(view) < _IN_PROGRESS_HEAD.size:
        raise DecodeError("in-progress entry truncated")
    _, size = _IN_PROGRESS_HEAD.unpack_from(view)
    start = _IN_PROGRESS_HEAD.size
    if size > len(view) - start:
        raise DecodeError("in-progress entry truncated")
    record = _check_headroom(decode_record(view[start : start + size]), max_devices)
    if record.deleted or record.type is not EntryType.FILE:
        raise DecodeError(f"in-progress entry for {record.path!r}, not a live file")
    bitmap = view[start + size :]
    count = len(record.blocks)
    if len(bitmap) != (count + 7) // 8:
        raise DecodeError(f"in-progress bitmap of {len(bitmap)} bytes for {count} blocks")
    if count % 8 and bitmap[-1] >> (count % 8):
        raise DecodeError("in-progress bitmap marks blocks past the last")
    verified = tuple(i for i in range(count) if bitmap[i >> 3] >> (i & 7) & 1)
    return InProgress(record, verified)


# --- private -----------------------------------------------------------------------------------


def _check_headroom(record: FileRecord, max_devices: int) -> FileRecord:
    """``record`` if this node could record an edit of it, else a DecodeError."""
    counters = record.version.counters
    if len(counters) > max_devices:
        raise DecodeError(
            f"{len(counters)} devices in the version vector of {record.path!r} "
            f"(at most {max_devices})"
        )
    if any(counter > MAX_PEER_COUNTER for _, counter in counters):
        raise DecodeError(f"version vector counter of {record.path!r} above 2^62")
    return record


def _check_record(r: FileRecord) -> str | None:
    """The first rule ``r`` breaks, or None."""
    try:
        if normalize(r.path) != r.path:
            return "path not normalised"
    except PathError as exc:
        return str(exc)
    if not isinstance(cast("object", r.type), EntryType):  # a plain int would slip past `is`
        return f"bad entry type {r.type!r}"
    if not 0 <= r.size <= _I64_MAX:
        return f"size out of range: {r.size}"
    if not _I64_MIN <= r.mtime_ns <= _I64_MAX:
        return f"mtime_ns out of range: {r.mtime_ns}"
    if not 0 <= r.mode <= _U32:
        return f"mode out of range: {r.mode}"
    if not 0 <= r.sequence <= _I64_MAX:
        return f"sequence out of range: {r.sequence}"
    if r.hash_algo not in _ID_BY_ALGO:
        return f"unknown hash algorithm {r.hash_algo!r}"
    if len(r.version.counters) > MAX_VERSION_ENTRIES:
        return f"more than {MAX_VERSION_ENTRIES} devices in the version vector"
    if r.type is EntryType.SYMLINK and not r.deleted:
        target = r.symlink_target
        if not target or "\x00" in target:
            return "symlink target empty or with NUL"
        try:
            if len(target.encode("utf-8")) > MAX_SYMLINK_TARGET_SIZE:
                return "symlink target too long"
        except UnicodeEncodeError:
            return "symlink target not valid Unicode"
    elif r.symlink_target:
        return "symlink target on an entry that is not a live symlink"
    if r.type is EntryType.FILE and not r.deleted:
        if not r.hash_algo:
            return "regular file without a hash algorithm"
        hash_size = hashes.BY_NAME[r.hash_algo].digest_size
        if len(r.file_hash) != hash_size:
            return f"file hash of {len(r.file_hash)} bytes for {r.hash_algo}"
        problem = _check_blocks(r.blocks, hash_size)
        if problem is not None:
            return problem
        end = r.blocks[-1].offset + r.blocks[-1].size if r.blocks else 0
        if end != r.size:
            return f"blocks cover {end} bytes of {r.size}"
    elif r.blocks or r.file_hash or r.size:
        return "blocks, file hash or size on an entry without content"
    return None


def _check_blocks(blocks: tuple[Block, ...], hash_size: int) -> str | None:
    if len(blocks) > MAX_BLOCKS:
        return f"more than {MAX_BLOCKS} blocks"
    offset = 0
    for block in blocks:
        if block.offset != offset:
            return f"block at {block.offset} where {offset} was expected"
        if not 1 <= block.size <= MAX_BLOCK_SIZE:
            return f"block size out of range: {block.size}"
        if not isinstance(block.hash, bytes) or len(block.hash) != hash_size:
            return f"block hash is not {hash_size} bytes"
        offset += block.size
    return None


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_str(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8")
    _put_varint(out, len(raw))
    out += raw


def _put_version(out: bytearray, version: VersionVector) -> None:
    if len(version.counters) > MAX_VERSION_ENTRIES:
        raise ValueError(f"more than {MAX_VERSION_ENTRIES} devices in a version vector")
    _put_varint(out, len(version.counters))
    for short_id, counter in version.counters:
        _put_varint(out, short_id)
        _put_varint(out, counter)


def _put_blocks(out: bytearray, blocks: tuple[Block, ...]) -> None:
    _put_varint(out, len(blocks))
    for block in blocks:
        _put_varint(out, block.size)
        out += block.hash


def _read_version(reader: _Reader) -> VersionVector:
    count = reader.varint(MAX_VERSION_ENTRIES)
    pairs: list[tuple[int, int]] = []
    previous = -1
    for _ in range(count):
        short_id = reader.varint(_U64)
        counter = reader.varint(_I64_MAX)
        if short_id <= previous:
            raise DecodeError("version vector ids not strictly increasing")
        if counter == 0:
            raise DecodeError("zero counter in a version vector")
        previous = short_id
        pairs.append((short_id, counter))
    return VersionVector(tuple(pairs))


def _read_blocks(reader: _Reader, hash_size: int) -> tuple[Block, ...]:
    count = reader.varint(MAX_BLOCKS)
    if count and hash_size == 0:
        raise DecodeError("blocks on an entry without content")
    blocks: list[Block] = []
    offset = 0
    for _ in range(count):
        size = reader.varint(MAX_BLOCK_SIZE)
        if size == 0:
            raise DecodeError("empty block")
        blocks.append(Block(offset, size, reader.take(hash_size)))
        offset += size
    return tuple(blocks)


class _Reader:
    """A cursor over hostile bytes; every failure is a DecodeError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: object) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DecodeError(f"expected bytes, not {type(data).__name__}")
        if len(data) > MAX_RECORD_SIZE:
            raise DecodeError(f"encoding longer than {MAX_RECORD_SIZE} bytes")
        self._data = bytes(data)
        self._pos = 0

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise DecodeError("truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def varint(self, limit: int) -> int:
        value = 0
        shift = 0
        data = self._data
        for index in range(self._pos, min(self._pos + 10, len(data))):
            byte = data[index]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise DecodeError("varint not minimal")
                if value > limit:
                    raise DecodeError(f"value {value} above its bound {limit}")
                self._pos = index + 1
                return value
            shift += 7
        raise DecodeError("truncated or overlong varint")

    def text(self, max_size: int) -> str:
        raw = self.take(self.varint(max_size))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("invalid UTF-8") from exc

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise DecodeError(f"{len(self._data) - self._pos} trailing bytes")
