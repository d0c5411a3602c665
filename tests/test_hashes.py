"""The one registry of hash algorithms: records, the wire, the chunker and the index agree on it."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import blake3
import pytest

from lanshare import chunker, hashes
from lanshare.errors import DecodeError
from lanshare.index import Index, LocalChange
from lanshare.manifest import Block, EntryType, FileRecord, decode_record, encode_record
from lanshare.peertable import PROTOCOL_VERSION
from lanshare.protocol import wire
from tests.sim import FOLDER, make_endpoint

if TYPE_CHECKING:
    from pathlib import Path

ALGORITHMS = [pytest.param(a, id=a.name) for a in hashes.ALGORITHMS]


def _record(algo: hashes.HashAlgorithm) -> FileRecord:
    data = b"one block of content"
    block = Block(0, len(data), algo.digest(data))
    return FileRecord(
        path="dir/file.bin",
        type=EntryType.FILE,
        size=len(data),
        mtime_ns=1,
        mode=0o100644,
        blocks=(block,),
        file_hash=chunker.whole_file_hash([block.hash], algo.name),
        hash_algo=algo.name,
        sequence=1,
    )


def test_the_table_is_consistent() -> None:
    names = [a.name for a in hashes.ALGORITHMS]
    ids = [a.wire_id for a in hashes.ALGORITHMS]
    assert len(set(names)) == len(names)
    assert len(set(ids)) == len(ids)
    assert all(1 <= i <= 255 for i in ids)  # one byte; 0 means "no hash" in a record
    for algo in hashes.ALGORITHMS:
        assert hashes.get(algo.name) is hashes.BY_NAME[algo.name] is algo
        assert hashes.BY_WIRE_ID[algo.wire_id] is algo
        assert len(algo.digest(b"")) == algo.digest_size <= wire.MAX_HASH_SIZE
    assert chunker.DEFAULT_ALGO in hashes.BY_NAME
    with pytest.raises(ValueError, match="unknown hash algorithm 'md5'"):
        hashes.get("md5")


def test_each_name_is_the_algorithm_it_says() -> None:
    data = bytes(range(256)) * 300
    assert hashes.digest("sha256", data) == hashlib.sha256(data).digest()
    assert hashes.digest("blake3", data) == blake3.blake3(data).digest()


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_block_is_hashed_in_place_from_a_buffer(algo: hashes.HashAlgorithm) -> None:
    buffer = bytearray(b"head" + bytes(range(256)) * 40 + b"tail")
    view = memoryview(buffer)[4:-4]
    expected = algo.digest(bytes(view))
    assert algo.digest(view) == expected
    assert chunker.block_hash(view, algo.name) == expected
    # The view reads the buffer itself: a change to the buffer changes the digest.
    buffer[4] ^= 0xFF
    assert algo.digest(view) != expected


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_round_trips_through_records_and_wire_by_the_same_id(
    algo: hashes.HashAlgorithm,
) -> None:
    record = _record(algo)
    encoded = encode_record(record)
    assert encoded[3] == algo.wire_id  # FORMAT, type, flags, then the algorithm
    assert decode_record(encoded) == record

    block = record.blocks[0]
    request = wire.RequestBlock(7, record.path, 0, 0, block.size, algo.name, block.hash)
    frame = wire.encode_frame(request)
    assert frame[1 + 4 + 4 + 8 + 4] == algo.wire_id  # type, id, index, offset, size, algo
    assert wire.decode_frames(frame) == [request]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_round_trips_through_the_index(
    algo: hashes.HashAlgorithm, tmp_path: Path
) -> None:
    record = _record(algo)
    with Index.open(tmp_path / "index.sqlite3") as index:
        folder = index.add_folder(tmp_path / "share", "ab" * 16).id
        index.commit_changes(folder, [LocalChange(record)])
        stored = index.get(folder, record.path)
    assert stored is not None
    assert (stored.hash_algo, stored.file_hash, stored.blocks) == (
        algo.name,
        record.file_hash,
        record.blocks,
    )


def test_a_block_request_of_an_unknown_algorithm_or_wrong_hash_size_is_refused() -> None:
    good = wire.encode_frame(wire.RequestBlock(1, "f", 0, 0, 10, "blake3", bytes(32)))
    algo_at = 1 + 4 + 4 + 8 + 4
    unknown = bytearray(good)
    unknown[algo_at] = 6  # blake3 in protocol 1, nothing now
    short = bytearray(good)
    short[algo_at + 1] = 31
    for bad in (unknown, short):
        with pytest.raises(DecodeError, match="bad hash"):
            wire.decode_frames(bytes(bad))
    with pytest.raises(ValueError, match="wrong size"):
        wire.encode_frame(wire.RequestBlock(1, "f", 0, 0, 10, "blake3", bytes(20)))


def test_the_announced_version_is_the_protocol_version() -> None:
    assert PROTOCOL_VERSION == wire.VERSION == 3


def test_packets_of_the_older_protocols_get_no_answer() -> None:
    """A node still speaking protocol 1 or 2 is never answered: its INITIAL is dropped unread
    (version 2's packets are laid out as ours, but its announcements cannot be checked)."""
    client = make_endpoint(2, b"B" * 8)
    client.connect(("10.0.0.1", 4000), FOLDER)
    ((initial, _),) = client.datagrams_to_send(0.0)
    assert initial[0] == wire.VERSION

    server = make_endpoint(1, b"A" * 8)
    for version in (1, 2):
        server.receive_datagram(bytes((version,)) + initial[1:], ("10.0.0.2", 4000), 0.0)
    assert server.stats.dropped == 2
    assert server.datagrams_to_send(0.0) == []
    # The same INITIAL in today's version is answered.
    server.receive_datagram(initial, ("10.0.0.2", 4000), 0.0)
    assert server.datagrams_to_send(0.0) != []
