"""Wire format of the transfer protocol: packet headers, frames, handshake payloads, limits.

Pure: no I/O. Decoders take untrusted bytes, check every length against what is present and
against the limits below, and raise only ``DecodeError``; they never allocate more than the
input's size. The full layout is in docs/protocol.md; the summary:

Packets (all integers big-endian; ``|`` separates fields; the cleartext header of DATA is the
AEAD associated data, and its bytes 4..16 (cid | pn) are the AEAD nonce)::

    INITIAL  ver=3 | type=1 | token_len u16 | src_cid u32 | token | e(32) | AEAD(InitialPayload)
             padded inside the AEAD so that the datagram is INITIAL_SIZE (1200) bytes
    RESPONSE ver=3 | type=2 | 0 u16       | dst_cid u32 | e(32) | AEAD(ResponsePayload)
    RETRY    ver=3 | type=3 | token_len u16 | dst_cid u32 | token
    DATA     ver=3 | type=4 | flags u16 (bit0 key phase) | dst_cid u32 | pn u64 | AEAD(frames)

Frames (inside DATA, one after another; PADDING runs to the end)::

    0x00 PADDING
    0x01 PING
    0x02 ACK      largest u64 | ack_delay_us u32 | extra u8 | first_len u32 | (gap u32 | len u32)*
    0x03 CLOSE    code u8
    0x10 DATA     request_id u32 | total u32 | offset u32 | len u16 | bytes
    0x20 REQ_BLOCK    request_id u32 | index u32 | offset u64 | size u32 | algo u8 |
                      hash_len u8 | hash | path_len u16 | path (UTF-8)
    0x21 REQ_MANIFEST request_id u32 | since_seq u64 | max_size u32
    0x22 CANCEL   request_id u32
    0x23 REJECT   request_id u32 | code u8
    0x24 NOTIFY   seq u64 | hash_len u8 | count u8 | count * hash

``algo`` is the algorithm's ``wire_id`` in :mod:`lanshare.hashes` and ``hash_len`` its digest
size. :data:`VERSION` (the first byte of every packet, and the ``v=`` of the mDNS announcement)
changes with any change of this layout or of those ids, or of the announcement: version 2
took the ids of that one registry, where version 1 numbered blake3 6; version 3 binds the
announcement's folder tokens to the node id, service name, port and addresses (``a=``, see
:mod:`lanshare.peertable`), where version 2 bound them to the nonce alone. The packets of
versions 2 and 3 are the same but for this byte: a node of each lists the other as
incompatible rather than exchange packets with one whose announcements it cannot check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from lanshare import hashes
from lanshare.errors import DecodeError

VERSION = 3
"""The protocol version this code speaks; peers of another version are never talked to."""

#: Every INITIAL is padded to this size, so that a responder may answer 3x that before the
#: address is validated (RFC 9000 §8.1, §14.1) and so that it fits any IPv4/IPv6 LAN path.
INITIAL_SIZE = 1200
#: Smallest datagram size a session can be configured with.
MIN_DATAGRAM_SIZE = 1200
#: Largest UDP payload we ever build or accept (jumbo frames minus headers).
MAX_DATAGRAM_SIZE = 9000
TAG_SIZE = 16
KEY_SIZE = 32  # X25519 public keys and AES-256-GCM keys
MAX_TOKEN_SIZE = 64
MAX_PATH_SIZE = 1024
MAX_HASH_SIZE = 64
MAX_ACK_RANGES = 64
NODE_ID_SIZE = 8
FOLDER_ID_SIZE = 16


class PacketType(IntEnum):
    INITIAL = 1
    RESPONSE = 2
    RETRY = 3
    DATA = 4


class FrameType(IntEnum):
    PADDING = 0x00
    PING = 0x01
    ACK = 0x02
    CLOSE = 0x03
    DATA = 0x10
    REQ_BLOCK = 0x20
    REQ_MANIFEST = 0x21
    CANCEL = 0x22
    REJECT = 0x23
    NOTIFY = 0x24


class CloseCode(IntEnum):
    """Why a session ended; sent in CLOSE frames and reported in ``SessionClosed``."""

    NORMAL = 0
    IDLE = 1
    PROTOCOL_ERROR = 2
    REPLACED = 3
    HANDSHAKE_TIMEOUT = 4
    INTERNAL = 5


class RejectCode(IntEnum):
    """Why a server declined a request (REJECT frame)."""

    NOT_FOUND = 1
    BUSY = 2
    REFUSED = 3


SHORT_HEADER = struct.Struct("!BBHIQ")  # version, type, flags, dst_cid, pn
SHORT_HEADER_SIZE = SHORT_HEADER.size  # 16
LONG_HEADER = struct.Struct("!BBHI")  # version, type, token_len/0, cid
LONG_HEADER_SIZE = LONG_HEADER.size  # 8
DATA_FRAME = struct.Struct("!BIIIH")  # type, request_id, total, offset, len
DATA_FRAME_SIZE = DATA_FRAME.size  # 15
#: DATA_FRAME in two: what stays for every fragment of one answer, and what follows it.
DATA_FRAME_HEAD = struct.Struct("!BII")  # type, request_id, total
DATA_FRAME_TAIL = struct.Struct("!IH")  # offset, len
_ACK_HEAD = struct.Struct("!BQIBI")  # type, largest, delay, extra ranges, first_len
_ACK_RANGE = struct.Struct("!II")
_REQ_BLOCK = struct.Struct("!BIIQIBB")  # type, id, index, offset, size, algo, hash_len
_REQ_MANIFEST = struct.Struct("!BIQI")
_CANCEL = struct.Struct("!BI")
_REJECT = struct.Struct("!BIB")
_NOTIFY = struct.Struct("!BQBB")
_U16 = struct.Struct("!H")
_INITIAL_PAYLOAD = struct.Struct("!8s16sIHIQB")
_RESPONSE_PAYLOAD = struct.Struct("!8sIHIQB")
#: Handshake flag: "send to me in background mode" (LEDBAT, yielding to other traffic).
FLAG_BACKGROUND = 0x01
_BATCH_HEAD = struct.Struct("!BI")
_U32 = struct.Struct("!I")

#: Bytes of packet overhead in a DATA packet: header + AEAD tag.
DATA_OVERHEAD = SHORT_HEADER_SIZE + TAG_SIZE


def fragment_size(datagram_size: int) -> int:
    """Block bytes carried by one full DATA packet of ``datagram_size`` bytes."""
    return datagram_size - DATA_OVERHEAD - DATA_FRAME_SIZE


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledged packet numbers as half-open ranges, highest first."""

    ranges: tuple[tuple[int, int], ...]
    ack_delay_us: int = 0

    @property
    def largest(self) -> int:
        return self.ranges[0][1] - 1


@dataclass(frozen=True, slots=True)
class Close:
    code: int


@dataclass(frozen=True, slots=True)
class Data:
    request_id: int
    total: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RequestBlock:
    request_id: int
    path: str
    index: int
    offset: int
    size: int
    hash_algo: str
    hash: bytes


@dataclass(frozen=True, slots=True)
class RequestManifest:
    request_id: int
    since_seq: int
    max_size: int


@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: int


@dataclass(frozen=True, slots=True)
class Reject:
    request_id: int
    code: int


@dataclass(frozen=True, slots=True)
class Notify:
    seq: int
    have: tuple[bytes, ...] = ()


Frame = Ping | Ack | Close | Data | RequestBlock | RequestManifest | Cancel | Reject | Notify


def encode_frame(frame: Frame) -> bytes:
    """Serialize one frame. Raises ``ValueError`` when a field is out of range."""
    if isinstance(frame, Ping):
        return b"\x01"
    if isinstance(frame, Ack):
        return encode_ack(frame.ranges, frame.ack_delay_us)
    if isinstance(frame, Close):
        return bytes((FrameType.CLOSE, frame.code))
    if isinstance(frame, Data):
        return (
            DATA_FRAME.pack(
                FrameType.DATA, frame.request_id, frame.total, frame.offset, len(frame.data)
            )
            + frame.data
        )
    if isinstance(frame, RequestBlock):
        path = frame.path.encode("utf-8")
        algo = hashes.get(frame.hash_algo)
        if len(path) > MAX_PATH_SIZE or len(frame.hash) != algo.digest_size:
            raise ValueError("path too long or hash of the wrong size")
        return (
            _REQ_BLOCK.pack(
                FrameType.REQ_BLOCK,
                frame.request_id,
                frame.index,
                frame.offset,
                frame.size,
                algo.wire_id,
                len(frame.hash),
            )
            + frame.hash
            + _U16.pack(len(path))
            + path
        )
    if isinstance(frame, RequestManifest):
        return _REQ_MANIFEST.pack(
            FrameType.REQ_MANIFEST, frame.request_id, frame.since_seq, frame.max_size
        )
    if isinstance(frame, Cancel):
        return _CANCEL.pack(FrameType.CANCEL, frame.request_id)
    if isinstance(frame, Reject):
        return _REJECT.pack(FrameType.REJECT, frame.request_id, frame.code)
    # Notify
    hash_len = len(frame.have[0]) if frame.have else 0
    if hash_len > MAX_HASH_SIZE or len(frame.have) > 255:
        raise ValueError("too many or too long hashes")
    if any(len(h) != hash_len for h in frame.have):
        raise ValueError("hashes of one NOTIFY must have one length")
    return _NOTIFY.pack(FrameType.NOTIFY, frame.seq, hash_len, len(frame.have)) + b"".join(
        frame.have
    )


def encode_ack(ranges: tuple[tuple[int, int], ...] | list[tuple[int, int]], delay_us: int) -> bytes:
    """ACK frame for half-open ranges given highest first (at most MAX_ACK_RANGES)."""
    start, stop = ranges[0]
    parts = [
        _ACK_HEAD.pack(
            FrameType.ACK, stop - 1, min(delay_us, 0xFFFFFFFF), len(ranges) - 1, stop - start - 1
        )
    ]
    prev_start = start
    for start, stop in ranges[1:]:
        parts.append(_ACK_RANGE.pack(prev_start - stop - 1, stop - start - 1))
        prev_start = start
    return b"".join(parts)


def ack_frame_size(n_ranges: int) -> int:
    return _ACK_HEAD.size + _ACK_RANGE.size * (n_ranges - 1)


def decode_frame(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[Frame, int]:
    """Decode the frame at ``buf[pos:end]``; return it and the position after it.

    PADDING is not a frame: callers stop at a zero type byte. Raises ``DecodeError``.
    """
    try:
        return _decode_frame(buf, pos, end)
    except (struct.error, IndexError, UnicodeDecodeError, KeyError) as exc:
        raise DecodeError(f"malformed frame: {exc}") from None


def _need(pos: int, size: int, end: int) -> None:
    if pos + size > end:
        raise DecodeError("truncated frame")


def _decode_frame(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[Frame, int]:
    ftype = buf[pos]
    if ftype == FrameType.PING:
        return Ping(), pos + 1
    if ftype == FrameType.ACK:
        return decode_ack(buf, pos, end)
    if ftype == FrameType.CLOSE:
        _need(pos, 2, end)
        return Close(buf[pos + 1]), pos + 2
    if ftype == FrameType.DATA:
        _need(pos, DATA_FRAME_SIZE, end)
        _, rid, total, offset, length = DATA_FRAME.unpack_from(buf, pos)
        pos += DATA_FRAME_SIZE
        _need(pos, length, end)
        if offset + length > total:
            raise DecodeError("DATA beyond its total")
        return Data(rid, total, offset, bytes(buf[pos : pos + length])), pos + length
    if ftype == FrameType.REQ_BLOCK:
        _need(pos, _REQ_BLOCK.size, end)
        _, rid, index, offset, size, algo, hash_len = _REQ_BLOCK.unpack_from(buf, pos)
        pos += _REQ_BLOCK.size
        known = hashes.BY_WIRE_ID.get(algo)
        if known is None or hash_len != known.digest_size:
            raise DecodeError("bad hash in REQ_BLOCK")
        _need(pos, hash_len + 2, end)
        digest = bytes(buf[pos : pos + hash_len])
        pos += hash_len
        (path_len,) = _U16.unpack_from(buf, pos)
        pos += 2
        if path_len > MAX_PATH_SIZE:
            raise DecodeError("path too long")
        _need(pos, path_len, end)
        path = bytes(buf[pos : pos + path_len]).decode("utf-8")
        frame = RequestBlock(rid, path, index, offset, size, known.name, digest)
        return frame, pos + path_len
    if ftype == FrameType.REQ_MANIFEST:
        _need(pos, _REQ_MANIFEST.size, end)
        _, rid, since, max_size = _REQ_MANIFEST.unpack_from(buf, pos)
        return RequestManifest(rid, since, max_size), pos + _REQ_MANIFEST.size
    if ftype == FrameType.CANCEL:
        _need(pos, _CANCEL.size, end)
        return Cancel(_CANCEL.unpack_from(buf, pos)[1]), pos + _CANCEL.size
    if ftype == FrameType.REJECT:
        _need(pos, _REJECT.size, end)
        _, rid, code = _REJECT.unpack_from(buf, pos)
        return Reject(rid, code), pos + _REJECT.size
    if ftype == FrameType.NOTIFY:
        _need(pos, _NOTIFY.size, end)
        _, seq, hash_len, count = _NOTIFY.unpack_from(buf, pos)
        pos += _NOTIFY.size
        if hash_len > MAX_HASH_SIZE or (count and not hash_len):
            raise DecodeError("bad NOTIFY hashes")
        _need(pos, hash_len * count, end)
        have = tuple(
            bytes(buf[p : p + hash_len]) for p in range(pos, pos + hash_len * count, hash_len or 1)
        )
        return Notify(seq, have), pos + hash_len * count
    raise DecodeError(f"unknown frame type {ftype}")


def decode_ack(buf: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[Ack, int]:
    """Decode an ACK frame; ranges come out highest first. Raises ``DecodeError``."""
    _need(pos, _ACK_HEAD.size, end)
    _, largest, delay, extra, first_len = _ACK_HEAD.unpack_from(buf, pos)
    pos += _ACK_HEAD.size
    if extra >= MAX_ACK_RANGES:
        raise DecodeError("too many ACK ranges")
    _need(pos, _ACK_RANGE.size * extra, end)
    stop = largest + 1
    start = stop - first_len - 1
    if start < 0:
        raise DecodeError("ACK range below zero")
    ranges = [(start, stop)]
    for _ in range(extra):
        gap, length = _ACK_RANGE.unpack_from(buf, pos)
        pos += _ACK_RANGE.size
        stop = start - gap - 1
        start = stop - length - 1
        if start < 0:
            raise DecodeError("ACK range below zero")
        ranges.append((start, stop))
    return Ack(tuple(ranges), delay), pos


def decode_frames(buf: bytes | bytearray | memoryview) -> list[Frame]:
    """Every frame of a decrypted DATA packet body, stopping at PADDING."""
    frames: list[Frame] = []
    pos, end = 0, len(buf)
    while pos < end and buf[pos] != FrameType.PADDING:
        frame, pos = decode_frame(buf, pos, end)
        frames.append(frame)
    return frames


# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True, slots=True)
class InitialPayload:
    """What an initiator says about itself, encrypted in the INITIAL's Noise message."""

    node_id: bytes
    folder_id: bytes
    cid: int
    max_datagram_size: int
    max_in_flight_size: int
    max_recv_rate: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ResponsePayload:
    """What a responder says about itself, encrypted in the RESPONSE's Noise message."""

    node_id: bytes
    cid: int
    max_datagram_size: int
    max_in_flight_size: int
    max_recv_rate: int
    flags: int = 0


INITIAL_PAYLOAD_SIZE = _INITIAL_PAYLOAD.size
RESPONSE_PAYLOAD_SIZE = _RESPONSE_PAYLOAD.size


def encode_initial_payload(p: InitialPayload, pad_to: int = 0) -> bytes:
    body = _INITIAL_PAYLOAD.pack(
        p.node_id,
        p.folder_id,
        p.cid,
        p.max_datagram_size,
        p.max_in_flight_size,
        p.max_recv_rate,
        p.flags,
    )
    return body + bytes(max(0, pad_to - len(body)))


def decode_initial_payload(data: bytes) -> InitialPayload:
    if len(data) < _INITIAL_PAYLOAD.size:
        raise DecodeError("short INITIAL payload")
    node, folder, cid, dgram, credit, rate, flags = _INITIAL_PAYLOAD.unpack_from(data)
    _check_params(dgram, credit)
    return InitialPayload(node, folder, cid, dgram, credit, rate, flags)


def encode_response_payload(p: ResponsePayload) -> bytes:
    return _RESPONSE_PAYLOAD.pack(
        p.node_id, p.cid, p.max_datagram_size, p.max_in_flight_size, p.max_recv_rate, p.flags
    )


def decode_response_payload(data: bytes) -> ResponsePayload:
    if len(data) < _RESPONSE_PAYLOAD.size:
        raise DecodeError("short RESPONSE payload")
    node, cid, dgram, credit, rate, flags = _RESPONSE_PAYLOAD.unpack_from(data)
    _check_params(dgram, credit)
    return ResponsePayload(node, cid, dgram, credit, rate, flags)


def _check_params(dgram: int, credit: int) -> None:
    if not MIN_DATAGRAM_SIZE <= dgram <= MAX_DATAGRAM_SIZE or credit < MIN_DATAGRAM_SIZE:
        raise DecodeError("handshake parameters out of range")


# --------------------------------------------------------------------------- manifest batches


def encode_manifest_batch(records: tuple[bytes, ...] | list[bytes], more: bool) -> bytes:
    """A manifest answer: ``more u8 | count u32 | (len u32 | record)*``; records are opaque."""
    parts = [_BATCH_HEAD.pack(1 if more else 0, len(records))]
    for record in records:
        parts.append(_U32.pack(len(record)))
        parts.append(record)
    return b"".join(parts)


def manifest_batch_size(records: tuple[bytes, ...] | list[bytes]) -> int:
    return _BATCH_HEAD.size + sum(4 + len(r) for r in records)


def decode_manifest_batch(data: bytes | bytearray | memoryview) -> tuple[tuple[bytes, ...], bool]:
    """Inverse of ``encode_manifest_batch``. Raises ``DecodeError``."""
    end = len(data)
    if end < _BATCH_HEAD.size:
        raise DecodeError("short manifest batch")
    more, count = _BATCH_HEAD.unpack_from(data)
    if more > 1 or count > (end - _BATCH_HEAD.size) // 4:
        raise DecodeError("bad manifest batch header")
    pos = _BATCH_HEAD.size
    records = []
    for _ in range(count):
        if pos + 4 > end:
            raise DecodeError("truncated manifest batch")
        (length,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            raise DecodeError("truncated manifest record")
        records.append(bytes(data[pos : pos + length]))
        pos += length
    if pos != end:
        raise DecodeError("trailing bytes in manifest batch")
    return tuple(records), bool(more)
