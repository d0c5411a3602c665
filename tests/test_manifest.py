"""Tests of manifest records, version-vector order and the bounded binary codec."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lanshare import hashes
from lanshare.errors import DecodeError
from lanshare.manifest import (
    ENTRY_HEADER,
    ENTRY_IN_PROGRESS,
    FORMAT,
    INDEX_ID_SIZE,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    MAX_ENTRY_SIZE,
    MAX_PEER_COUNTER,
    MAX_VECTOR_DEVICES,
    MAX_VERSION_ENTRIES,
    BatchHeader,
    Block,
    EntryType,
    FileRecord,
    InProgress,
    Ordering,
    VersionVector,
    decode_blocks,
    decode_entry,
    decode_record,
    decode_version,
    encode_blocks,
    encode_entry,
    encode_record,
    encode_version,
)

A, B, C = 0xA, 0xB, 0xFFFF_FFFF_FFFF_FFFF

# --- version vectors ------------------------------------------------------------------------


def test_version_vector_is_canonical() -> None:
    v = VersionVector(((B, 2), (A, 1), (C, 0)))
    assert v.counters == ((A, 1), (B, 2))
    assert v == VersionVector.of({B: 2, A: 1})
    assert hash(v) == hash(VersionVector.of({A: 1, B: 2, 7: 0}))
    assert VersionVector() == VersionVector.of({})
    assert v.get(B) == 2
    assert v.get(C) == 0


@pytest.mark.parametrize("pairs", [((A, -1),), ((-1, 1),), ((1 << 64, 1),), ((A, 1), (A, 2))])
def test_version_vector_rejects_bad_entries(pairs: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(ValueError, match="version vector"):
        VersionVector(pairs)


def test_version_vector_order() -> None:
    empty = VersionVector()
    a1 = empty.bump(A)
    a2 = a1.bump(A)
    b1 = empty.bump(B)
    assert a1.compare(a1) is Ordering.EQUAL
    assert empty.compare(empty) is Ordering.EQUAL
    assert a2.compare(a1) is Ordering.GREATER
    assert a1.compare(a2) is Ordering.LESSER
    assert a1.compare(empty) is Ordering.GREATER
    assert a1.compare(b1) is Ordering.CONCURRENT
    merged = a2.merge(b1)
    assert merged == VersionVector.of({A: 2, B: 1})
    assert merged.compare(a2) is Ordering.GREATER
    assert merged.compare(b1) is Ordering.GREATER
    # the usual conflict resolution: merge both then bump dominates both sides
    resolved = merged.bump(C)
    assert resolved.compare(a2) is Ordering.GREATER
    assert repr(merged) == "VersionVector({a: 2, b: 1})"


_ids = st.sampled_from([0, 1, A, B, C, 1 << 63])
_vectors = st.dictionaries(_ids, st.integers(0, 5), max_size=5).map(VersionVector.of)
_OPPOSITE = {
    Ordering.EQUAL: Ordering.EQUAL,
    Ordering.GREATER: Ordering.LESSER,
    Ordering.LESSER: Ordering.GREATER,
    Ordering.CONCURRENT: Ordering.CONCURRENT,
}


@given(_vectors, _vectors)
def test_compare_is_antisymmetric(a: VersionVector, b: VersionVector) -> None:
    assert b.compare(a) is _OPPOSITE[a.compare(b)]
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)


@given(_vectors, _ids)
def test_bump_dominates(v: VersionVector, short_id: int) -> None:
    bumped = v.bump(short_id)
    assert bumped.compare(v) is Ordering.GREATER
    assert bumped.get(short_id) == v.get(short_id) + 1


@given(_vectors, _vectors, _vectors)
def test_merge_is_least_upper_bound(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    m = a.merge(b)
    assert m == b.merge(a)
    assert m.compare(a) in (Ordering.GREATER, Ordering.EQUAL)
    assert m.compare(b) in (Ordering.GREATER, Ordering.EQUAL)
    upper_a = c.compare(a) in (Ordering.GREATER, Ordering.EQUAL)
    upper_b = c.compare(b) in (Ordering.GREATER, Ordering.EQUAL)
    if upper_a and upper_b:  # any upper bound of both is an upper bound of the merge
        assert c.compare(m) in (Ordering.GREATER, Ordering.EQUAL)
    # and the bound c.merge(a).merge(b) always is one
    assert c.merge(a).merge(b).compare(m) in (Ordering.GREATER, Ordering.EQUAL)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@given(_vectors, _vectors)
def test_concurrent_exactly_when_neither_dominates(a: VersionVector, b: VersionVector) -> None:
    keys = {k for k, _ in a.counters} | {k for k, _ in b.counters}
    a_ahead = any(a.get(k) > b.get(k) for k in keys)
    b_ahead = any(b.get(k) > a.get(k) for k in keys)
    assert (a.compare(b) is Ordering.CONCURRENT) == (a_ahead and b_ahead)


def test_encode_version_refuses_too_many_devices() -> None:
    with pytest.raises(ValueError, match="devices"):
        encode_version(VersionVector(tuple((i, 1) for i in range(MAX_VERSION_ENTRIES + 1))))


@given(_vectors)
def test_version_round_trip(v: VersionVector) -> None:
    data = encode_version(v)
    assert data[0] == FORMAT
    assert decode_version(data) == v


# --- records --------------------------------------------------------------------------------


def _blocks(sizes: list[int], algo: str = "sha256") -> tuple[Block, ...]:
    out = []
    offset = 0
    for index, size in enumerate(sizes):
        digest = hashlib.sha256(index.to_bytes(4, "big")).digest()[: hashes.get(algo).digest_size]
        out.append(Block(offset, size, digest))
        offset += size
    return tuple(out)


def _file(**changes: object) -> FileRecord:
    blocks = _blocks([131072, 131072, 5])
    record = FileRecord(
        path="docs/report é.txt",
        type=EntryType.FILE,
        size=262149,
        mtime_ns=1_700_000_000_123_456_789,
        mode=0o100644,
        blocks=blocks,
        file_hash=b"\x01" * 32,
        hash_algo="sha256",
        version=VersionVector.of({A: 3, C: 1}),
        sequence=42,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def test_record_round_trip_examples() -> None:
    records = [
        _file(),
        _file(size=0, blocks=(), mtime_ns=-5),
        _file(hash_algo="blake3"),
        FileRecord("a/dir", EntryType.DIR, mode=0o40755, sequence=1),
        FileRecord("link", EntryType.SYMLINK, symlink_target="../../etc/passwd"),
        _file().tombstone(VersionVector.of({A: 4, C: 1}), 43),
    ]
    for record in records:
        data = encode_record(record)
        assert data[0] == FORMAT
        assert decode_record(data) == record
        assert decode_record(bytearray(data)) == record
        assert decode_record(memoryview(data)) == record


def test_tombstone_drops_content() -> None:
    dead = _file().tombstone(VersionVector.of({A: 4}), 7)
    assert dead.deleted
    assert (dead.size, dead.blocks, dead.file_hash, dead.sequence) == (0, (), b"", 7)
    assert dead.path == _file().path


def test_record_is_compact() -> None:
    # 3 blocks of 32-byte hashes + file hash: the fixed overhead stays small.
    assert len(encode_record(_file())) < 4 * 32 + 80


@pytest.mark.parametrize(
    "changes",
    [
        {"path": "../x"},
        {"path": "a/"},
        {"size": 5},
        {"size": -1},
        {"mode": 1 << 32},
        {"sequence": -1},
        {"sequence": 1 << 63},
        {"mtime_ns": 1 << 63},
        {"hash_algo": "md5"},
        {"hash_algo": ""},
        {"file_hash": b"\x01" * 31},
        {"symlink_target": "x"},
        {"blocks": (Block(0, 131072, b"\x00" * 32), Block(1, 5, b"\x00" * 32))},
        {"blocks": (Block(0, 0, b"\x00" * 32),), "size": 0},
        {"blocks": (Block(0, MAX_BLOCK_SIZE + 1, b"\x00" * 32),), "size": MAX_BLOCK_SIZE + 1},
        {"blocks": (Block(0, 5, b"\x00" * 20),), "size": 5},
        {"type": 0},
        {"version": VersionVector(tuple((i, 1) for i in range(MAX_VERSION_ENTRIES + 1)))},
    ],
)
def test_encode_refuses_invalid_record(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_record(_file(**changes))


@pytest.mark.parametrize(
    "record",
    [
        FileRecord("d", EntryType.DIR, size=1),
        FileRecord("d", EntryType.DIR, file_hash=b"\x00" * 32),
        FileRecord("s", EntryType.SYMLINK),
        FileRecord("s", EntryType.SYMLINK, symlink_target="a\x00b"),
        FileRecord("s", EntryType.SYMLINK, symlink_target="x" * 4097),
        FileRecord("s", EntryType.SYMLINK, symlink_target="\udcff"),
        FileRecord("f", EntryType.FILE, deleted=True, blocks=_blocks([1])),
    ],
)
def test_encode_refuses_inconsistent_entries(record: FileRecord) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode_record(record)


def test_too_many_blocks() -> None:
    blocks = tuple(Block(i, 1, b"\x00" * 32) for i in range(MAX_BLOCKS + 1))
    with pytest.raises(ValueError, match="blocks"):
        encode_record(_file(blocks=blocks, size=MAX_BLOCKS + 1))
    with pytest.raises(ValueError, match="blocks"):
        encode_blocks(blocks)
    ok = encode_record(_file(blocks=blocks[:-1], size=MAX_BLOCKS))
    assert len(decode_record(ok).blocks) == MAX_BLOCKS


def test_blocks_round_trip() -> None:
    blocks = _blocks([MAX_BLOCK_SIZE, 1, 300])
    assert decode_blocks(encode_blocks(blocks)) == blocks
    assert decode_blocks(encode_blocks(())) == ()
    with pytest.raises(ValueError, match="hash size"):
        encode_blocks([Block(0, 1, b"\x00" * 20)])
    with pytest.raises(ValueError, match="cannot encode"):
        encode_blocks([Block(5, 1, b"\x00" * 32)])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02",
        bytes((2, 32, 0)),  # unknown format
        bytes((FORMAT, 32, 0)),  # empty list with a hash size
        bytes((FORMAT, 20, 1, 1)) + b"\x00" * 20,  # unsupported hash size
        bytes((FORMAT, 32, 1, 0)) + b"\x00" * 32,  # empty block
        bytes((FORMAT, 0, 1, 1)),  # blocks without hashes
        bytes((FORMAT, 0, 0, 0)),  # trailing byte
        bytes((FORMAT, 32, 0x80, 0x00)),  # non-minimal varint
    ],
)
def test_decode_blocks_rejects(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_blocks(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes((2, 0)),
        bytes((FORMAT, 2, 2, 1, 1, 1)),  # ids not increasing
        bytes((FORMAT, 2, 1, 1, 1, 1)),  # duplicate id
        bytes((FORMAT, 1, 1, 0)),  # zero counter
        bytes((FORMAT, 1, 1, 1, 0)),  # trailing byte
        bytes((FORMAT,)) + b"\xff" * 11,  # overlong varint
        bytes((FORMAT, 0x81, 0x08)),  # MAX_VERSION_ENTRIES + 1 entries
    ],
)
def test_decode_version_rejects(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_version(data)


def test_decode_record_rejects_corruptions() -> None:
    good = encode_record(_file())
    bad = [
        bytes((2,)) + good[1:],  # format
        good[:1] + bytes((9,)) + good[2:],  # type
        good[:2] + bytes((2,)) + good[3:],  # flags
        good[:3] + bytes((9,)) + good[4:],  # algo id
        good[:3] + bytes((0,)) + good[4:],  # live file without algo
        good[:-1],  # truncated
        good + b"\x00",  # trailing
        good[:2] + bytes((1,)) + good[3:],  # deleted, but still has content
        b"\x00" * 5_000_000,  # too long to look at
    ]
    for data in bad:
        with pytest.raises(DecodeError):
            decode_record(data)
    with pytest.raises(DecodeError):
        decode_record("text")  # type: ignore[arg-type]


def test_decode_record_rejects_hostile_path() -> None:
    good = encode_record(FileRecord("ab", EntryType.DIR))
    assert b"\x02ab" in good
    for path in (b"..", b"/a", b"\xff\xfe", b"a\x00"):
        hostile = good.replace(b"\x02ab", bytes((len(path),)) + path)
        with pytest.raises(DecodeError):
            decode_record(hostile)


@given(st.binary(max_size=600))
def test_decode_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    for decode in (decode_record, decode_blocks, decode_version):
        with contextlib.suppress(DecodeError):
            decode(data)


@given(st.binary(min_size=1, max_size=40), st.integers(0, 300))
def test_decode_mutated_record_raises_only_decode_error(noise: bytes, where: int) -> None:
    good = encode_record(_file())
    where %= len(good)
    mutated = good[:where] + noise + good[where + len(noise) :]
    try:
        record = decode_record(mutated)
    except DecodeError:
        return
    assert encode_record(record) == mutated  # whatever decodes is canonical


_names = st.text(
    st.characters(exclude_categories=["Cc", "Cs"], exclude_characters="/\\"),
    min_size=1,
    max_size=12,
).filter(lambda name: name not in (".", ".."))
_paths = st.lists(_names, min_size=1, max_size=4).map("/".join)


@st.composite
def _records(draw: st.DrawFn) -> FileRecord:
    from lanshare.paths import normalize

    path = normalize(draw(_paths))
    entry = draw(st.sampled_from(EntryType))
    deleted = draw(st.booleans())
    common: dict[str, Any] = {
        "path": path,
        "type": entry,
        "mtime_ns": draw(st.integers(-(1 << 63), (1 << 63) - 1)),
        "mode": draw(st.integers(0, (1 << 32) - 1)),
        "version": draw(_vectors),
        "sequence": draw(st.integers(0, (1 << 63) - 1)),
        "deleted": deleted,
    }
    if deleted or entry is EntryType.DIR:
        algo = draw(st.sampled_from(["", *sorted(hashes.BY_NAME)]))
        return FileRecord(hash_algo=algo, **common)
    if entry is EntryType.SYMLINK:
        target = draw(st.text(st.characters(exclude_categories=["Cs"]), min_size=1))
        assume("\x00" not in target)
        return FileRecord(symlink_target=target, **common)
    algo = draw(st.sampled_from(sorted(hashes.BY_NAME)))
    size = hashes.get(algo).digest_size
    sizes = draw(st.lists(st.integers(1, MAX_BLOCK_SIZE), max_size=6))
    blocks = []
    offset = 0
    for block_size in sizes:
        blocks.append(Block(offset, block_size, draw(st.binary(min_size=size, max_size=size))))
        offset += block_size
    return FileRecord(
        size=offset,
        blocks=tuple(blocks),
        file_hash=draw(st.binary(min_size=size, max_size=size)),
        hash_algo=algo,
        **common,
    )


@given(_records())
def test_record_round_trip(record: FileRecord) -> None:
    data = encode_record(record)
    assert decode_record(data) == record
    assert encode_record(decode_record(data)) == data
    if record.blocks:
        assert decode_blocks(encode_blocks(record.blocks)) == record.blocks


# --- manifest entries (the items of a manifest answer) -----------------------------------------


def test_entries_round_trip() -> None:
    header = BatchHeader(b"\x01" * INDEX_ID_SIZE, (1 << 63) - 1)
    assert encode_entry(header)[0] == ENTRY_HEADER
    record = _file()
    assert encode_entry(record) == encode_record(record)
    partial = InProgress(record, (0, 2))
    encoded = encode_entry(partial)
    assert encoded[0] == ENTRY_IN_PROGRESS
    assert encoded[-1] == 0b101  # one bitmap byte: blocks 0 and 2 of 3
    for entry in (header, record, partial, InProgress(record, ())):
        assert decode_entry(encode_entry(entry)) == entry
        assert decode_entry(memoryview(bytearray(encode_entry(entry)))) == entry


@pytest.mark.parametrize(
    "entry",
    [
        BatchHeader(b"\x01" * (INDEX_ID_SIZE - 1), 0),
        BatchHeader(b"\x01" * INDEX_ID_SIZE, -1),
        BatchHeader(b"\x01" * INDEX_ID_SIZE, 1 << 63),
        InProgress(_file(), (3,)),
        InProgress(_file(), (-1,)),
        InProgress(_file().tombstone(VersionVector.of({A: 4}), 43), ()),
        InProgress(FileRecord(path="d", type=EntryType.DIR), ()),
    ],
)
def test_encode_entry_refuses_what_no_peer_could_read(entry: InProgress | BatchHeader) -> None:
    with pytest.raises(ValueError, match=r"manifest header|in-progress|verified block"):
        encode_entry(entry)


def _in_progress(record: FileRecord, bitmap: bytes) -> bytes:
    encoded = encode_record(record)
    return bytes((ENTRY_IN_PROGRESS,)) + len(encoded).to_bytes(4, "big") + encoded + bitmap


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x07" + bytes(20), "unknown manifest entry kind"),
        (bytes((ENTRY_HEADER,)) + bytes(INDEX_ID_SIZE + 7), "header of 16 bytes"),
        (bytes((ENTRY_HEADER,)) + bytes(INDEX_ID_SIZE + 9), "header of 18 bytes"),
        (bytes((ENTRY_HEADER,)) + bytes(INDEX_ID_SIZE) + b"\xff" * 8, "sequence"),
        (bytes((ENTRY_IN_PROGRESS, 0, 0)), "truncated"),
        (_in_progress(_file(), b"\x01")[:-40], "truncated"),
        (_in_progress(_file(), b""), "bitmap of 0 bytes"),
        (_in_progress(_file(), b"\x01\x00"), "bitmap of 2 bytes"),
        (_in_progress(_file(), b"\x08"), "past the last"),
        (_in_progress(FileRecord(path="d", type=EntryType.DIR), b""), "not a live file"),
        (_in_progress(_file(), b"\x01") + bytes(MAX_ENTRY_SIZE), "longer than"),
        (memoryview(bytes(34))[::2], "unreadable"),
    ],
)
def test_decode_entry_rejects(data: bytes | memoryview, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode_entry(data)


def _devices(count: int) -> VersionVector:
    return VersionVector(tuple((i, 1) for i in range(1, count + 1)))


@pytest.mark.parametrize("partial", [False, True])
def test_decode_entry_refuses_vectors_this_node_could_not_bump(partial: bool) -> None:
    """A peer's vector with too many devices or a counter without headroom is refused whole
    (never trimmed), for records and in-progress entries alike; the index's own decoder still
    reads it."""

    def entry(version: VersionVector) -> bytes:
        record = _file(version=version)
        return encode_entry(InProgress(record, ()) if partial else record)

    crowded = entry(_devices(MAX_VECTOR_DEVICES + 1))
    with pytest.raises(DecodeError, match=f"{MAX_VECTOR_DEVICES + 1} devices"):
        decode_entry(crowded)
    with pytest.raises(DecodeError, match=r"4 devices .*at most 3"):
        decode_entry(entry(_devices(4)), max_devices=3)
    for counter in (MAX_PEER_COUNTER + 1, (1 << 63) - 1):
        with pytest.raises(DecodeError, match="counter"):
            decode_entry(entry(VersionVector.of({A: 1, B: counter})))
    full = _file(version=VersionVector.of({A: (1 << 63) - 1}))
    assert decode_record(encode_record(full)) == full


@pytest.mark.parametrize("partial", [False, True])
def test_decode_entry_accepts_vectors_at_the_bounds(partial: bool) -> None:
    for version, max_devices in [
        (_devices(MAX_VECTOR_DEVICES), MAX_VECTOR_DEVICES),
        (_devices(3), 3),
        (VersionVector.of({A: MAX_PEER_COUNTER, C: 1}), MAX_VECTOR_DEVICES),
    ]:
        record = _file(version=version)
        entry: FileRecord | InProgress = InProgress(record, (1,)) if partial else record
        assert decode_entry(encode_entry(entry), max_devices) == entry
    assert VersionVector.of({A: MAX_PEER_COUNTER}).bump(A).get(A) == MAX_PEER_COUNTER + 1


def test_bump_without_room_raises() -> None:
    with pytest.raises(ValueError, match="at its limit"):
        VersionVector.of({A: (1 << 63) - 1}).bump(A)
    full = _devices(MAX_VERSION_ENTRIES)
    with pytest.raises(ValueError, match=f"already names {MAX_VERSION_ENTRIES} devices"):
        full.bump(MAX_VERSION_ENTRIES + 1)
    assert full.bump(1).get(1) == 2


@given(st.binary(max_size=600))
def test_decode_entry_of_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    for kind in (ENTRY_HEADER, ENTRY_IN_PROGRESS, FORMAT, data[:1] or b"\x00"):
        prefix = bytes((kind,)) if isinstance(kind, int) else kind
        with contextlib.suppress(DecodeError):
            decode_entry(prefix + data)


@given(
    st.sampled_from(["header", "in_progress"]),
    st.binary(min_size=1, max_size=40),
    st.integers(0, 400),
)
def test_decode_mutated_entry_raises_only_decode_error(kind: str, noise: bytes, where: int) -> None:
    if kind == "header":
        good = encode_entry(BatchHeader(b"\x05" * INDEX_ID_SIZE, 77))
    else:
        good = encode_entry(InProgress(_file(), (1,)))
    where %= len(good)
    mutated = good[:where] + noise + good[where + len(noise) :]
    try:
        entry = decode_entry(mutated)
    except DecodeError:
        return
    assert encode_entry(entry) == mutated  # whatever decodes is canonical


@given(_records(), st.data())
def test_in_progress_entries_round_trip(record: FileRecord, data: st.DataObject) -> None:
    assume(record.type is EntryType.FILE and not record.deleted)
    indexes = range(len(record.blocks))
    verified = tuple(
        sorted(data.draw(st.sets(st.sampled_from(indexes)) if indexes else st.just(set())))
    )
    entry = InProgress(record, verified)
    assert decode_entry(encode_entry(entry)) == entry


@given(st.binary(min_size=INDEX_ID_SIZE, max_size=INDEX_ID_SIZE), st.integers(0, (1 << 63) - 1))
def test_headers_round_trip(index_id: bytes, sequence: int) -> None:
    header = BatchHeader(index_id, sequence)
    assert decode_entry(encode_entry(header)) == header
