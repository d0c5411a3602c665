"""Wire format: every frame and payload round-trips; arbitrary bytes only raise DecodeError."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare import hashes as registry
from lanshare.errors import DecodeError
from lanshare.protocol import wire
from lanshare.protocol.rangeset import RangeSet

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@st.composite
def ack_frames(draw: st.DrawFn) -> wire.Ack:
    # Disjoint, non-adjacent ranges, highest first.
    n = draw(st.integers(1, wire.MAX_ACK_RANGES))
    pos = draw(st.integers(0, 2**40))
    ranges = []
    for _ in range(n):
        length = draw(st.integers(1, 1000))
        ranges.append((pos, pos + length))
        pos += length + draw(st.integers(1, 1000))
    return wire.Ack(tuple(reversed(ranges)), draw(u32))


hashes = st.sampled_from(registry.ALGORITHMS).flatmap(
    lambda algo: st.tuples(
        st.just(algo.name), st.binary(min_size=algo.digest_size, max_size=algo.digest_size)
    )
)

frames = st.one_of(
    st.just(wire.Ping()),
    ack_frames(),
    st.builds(wire.Close, st.integers(0, 255)),
    st.builds(
        lambda rid, data, extra, off: wire.Data(rid, off + len(data) + extra, off, data),
        u32,
        st.binary(max_size=1400),
        st.integers(0, 1000),
        st.integers(0, 2**31),
    ),
    st.builds(
        lambda rid, path, idx, off, size, h: wire.RequestBlock(rid, path, idx, off, size, *h),
        u32,
        st.text(max_size=200),
        u32,
        u64,
        u32,
        hashes,
    ),
    st.builds(wire.RequestManifest, u32, u64, u32),
    st.builds(wire.Cancel, u32),
    st.builds(wire.Reject, u32, st.integers(0, 255)),
    st.builds(
        lambda seq, n, k: wire.Notify(seq, tuple(bytes([i % 256]) * k for i in range(n))),
        u64,
        st.integers(0, 20),
        st.integers(1, 64),
    ),
)


@given(frames)
def test_every_frame_round_trips(frame: wire.Frame) -> None:
    encoded = wire.encode_frame(frame)
    decoded, end = wire.decode_frame(encoded, 0, len(encoded))
    assert end == len(encoded)
    if isinstance(frame, wire.Notify) and not frame.have:
        assert decoded == wire.Notify(frame.seq, ())
    else:
        assert decoded == frame


@given(st.lists(frames, max_size=8))
def test_frame_sequences_round_trip_and_stop_at_padding(items: list[wire.Frame]) -> None:
    body = b"".join(wire.encode_frame(f) for f in items) + bytes(7)
    decoded = wire.decode_frames(body)
    assert len(decoded) == len(items)


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_decode_arbitrary_bytes_raises_only_decode_error(data: bytes) -> None:
    try:
        decoded = wire.decode_frames(data)
    except DecodeError:
        return
    # Never more frames than bytes, never more payload than was there.
    assert len(decoded) <= len(data)
    for frame in decoded:
        if isinstance(frame, wire.Data):
            assert len(frame.data) <= len(data)
        if isinstance(frame, wire.Notify):
            assert sum(map(len, frame.have)) <= len(data)


@given(st.binary(max_size=3000))
def test_manifest_batch_decoder_raises_only_decode_error(data: bytes) -> None:
    try:
        records, _ = wire.decode_manifest_batch(data)
    except DecodeError:
        return
    assert sum(len(r) for r in records) <= len(data)


@given(st.lists(st.binary(max_size=300), max_size=30), st.booleans())
def test_manifest_batch_round_trip(records: list[bytes], more: bool) -> None:
    encoded = wire.encode_manifest_batch(records, more)
    assert len(encoded) == wire.manifest_batch_size(records)
    assert wire.decode_manifest_batch(encoded) == (tuple(records), more)


@given(
    st.builds(
        wire.InitialPayload,
        st.binary(min_size=8, max_size=8),
        st.binary(min_size=16, max_size=16),
        u32,
        st.integers(wire.MIN_DATAGRAM_SIZE, wire.MAX_DATAGRAM_SIZE),
        st.integers(wire.MIN_DATAGRAM_SIZE, 2**32 - 1),
        u64,
        st.integers(0, 255),
    ),
    st.integers(0, 1200),
)
def test_initial_payload_round_trips(payload: wire.InitialPayload, pad: int) -> None:
    encoded = wire.encode_initial_payload(payload, pad)
    assert len(encoded) >= pad
    assert wire.decode_initial_payload(encoded) == payload


@given(
    st.builds(
        wire.ResponsePayload,
        st.binary(min_size=8, max_size=8),
        u32,
        st.integers(wire.MIN_DATAGRAM_SIZE, wire.MAX_DATAGRAM_SIZE),
        st.integers(wire.MIN_DATAGRAM_SIZE, 2**32 - 1),
        u64,
        st.integers(0, 255),
    )
)
def test_response_payload_round_trips(payload: wire.ResponsePayload) -> None:
    assert wire.decode_response_payload(wire.encode_response_payload(payload)) == payload


@given(st.binary(max_size=200))
def test_handshake_payload_decoders_raise_only_decode_error(data: bytes) -> None:
    for decode in (wire.decode_initial_payload, wire.decode_response_payload):
        with contextlib.suppress(DecodeError):
            decode(data)


def test_handshake_parameters_are_bounded() -> None:
    good = wire.ResponsePayload(b"n" * 8, 1, 1452, 1 << 20, 0)
    assert wire.decode_response_payload(wire.encode_response_payload(good)) == good
    for bad in (
        wire.ResponsePayload(b"n" * 8, 1, 500, 1 << 20, 0),  # datagram below 1200
        wire.ResponsePayload(b"n" * 8, 1, 65000, 1 << 20, 0),  # above the jumbo limit
        wire.ResponsePayload(b"n" * 8, 1, 1452, 10, 0),  # no room for one datagram
    ):
        with pytest.raises(DecodeError):
            wire.decode_response_payload(wire.encode_response_payload(bad))


@pytest.mark.parametrize(
    "data",
    [
        b"\x02" + bytes(5),  # truncated ACK
        bytes([0x02]) + (5).to_bytes(8, "big") + bytes(4) + b"\x00" + (9).to_bytes(4, "big"),
        bytes([0x10, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 2, 0, 4]) + b"abcd",  # beyond total
        b"\x20" + bytes(30),  # unknown hash algorithm / truncated
        b"\x24" + bytes(8) + b"\x00\x05",  # hashes of length 0
        b"\x7f",  # unknown type
    ],
)
def test_malformed_frames_are_rejected(data: bytes) -> None:
    with pytest.raises(DecodeError):
        wire.decode_frames(data)


def test_fragment_size_fills_a_datagram() -> None:
    frag = wire.fragment_size(1452)
    assert frag + wire.DATA_FRAME_SIZE + wire.DATA_OVERHEAD == 1452


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_data_frame_head_and_tail_are_the_data_frame(rid: int, total: int, offset: int) -> None:
    """The sender packs a DATA frame's head once per answer and its tail per fragment."""
    split = wire.DATA_FRAME_HEAD.pack(wire.FrameType.DATA, rid, total)
    split += wire.DATA_FRAME_TAIL.pack(offset, 1405)
    assert split == wire.DATA_FRAME.pack(wire.FrameType.DATA, rid, total, offset, 1405)


@given(st.lists(st.integers(0, 300), max_size=200))
def test_rangeset_matches_a_set(values: list[int]) -> None:
    rs = RangeSet()
    for v in values:
        rs.add(v)
    members = {v for start, stop in rs for v in range(start, stop)}
    assert members == set(values)
    ranges = list(rs)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    for v in range(0, 301):
        assert (v in rs) == (v in members)


def test_rangeset_is_bounded_and_discards() -> None:
    rs = RangeSet(max_ranges=3)
    for v in range(0, 20, 2):
        rs.add(v)
    assert list(rs) == [(14, 15), (16, 17), (18, 19)]
    rs.add(10, 20)
    assert list(rs) == [(10, 20)]
    rs.discard_below(15)
    assert list(rs) == [(15, 20)]
    assert list(rs.descending()) == [(15, 20)]
    assert rs.lowest == 15
    assert rs.highest == 19
