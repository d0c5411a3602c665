"""Events the transfer core (``lanshare.protocol``) hands to the application.

Pure: frozen, slotted dataclasses and the enums they carry; no I/O. Events are past-tense
noun phrases; the application reads them with ``Endpoint.next_event()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NewType, TypeAlias

Addr: TypeAlias = tuple[str, int]
PeerId = NewType("PeerId", bytes)
"""The 8-byte node id a peer proved in the handshake."""
FolderId = NewType("FolderId", bytes)
"""The 16-byte folder id (``keys.folder_id``) a session is bound to."""


class CloseReason(IntEnum):
    """Why a session ended (the first members match the wire ``CloseCode``)."""

    CLOSED = 0
    """Closed by ``Endpoint.close()`` on either side."""
    PEER_GONE = 1
    """Nothing authenticated heard for ``idle_timeout``: the peer vanished."""
    PROTOCOL_ERROR = 2
    """One side broke the protocol."""
    REPLACED = 3
    """A newer session with the same peer and folder took over."""
    HANDSHAKE_TIMEOUT = 4
    """``connect()`` got no valid answer within ``idle_timeout``."""
    INTERNAL = 5


class FailReason(IntEnum):
    """Why a request failed (``RequestFailed.reason``)."""

    TIMEOUT = 1
    """No progress for ``request_timeout``."""
    PEER_GONE = 2
    """The session closed (or there was none) before the answer was complete."""
    INTEGRITY = 3
    """The block's data did not match its expected hash (or size)."""
    NOT_FOUND = 4
    """The peer does not have it (REJECT)."""
    BUSY = 5
    """The peer is overloaded (REJECT); try another or later."""
    REFUSED = 6
    """The peer refused for another reason (REJECT)."""
    MALFORMED = 7
    """The answer broke the protocol (wrong size, undecodable batch)."""


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    peer: PeerId
    folder: FolderId
    addr: Addr
    initiator: bool
    """True when we called ``connect()``."""


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """A session ended. ``peer`` is None when it never got established (connect failed)."""

    peer: PeerId | None
    folder: FolderId
    addr: Addr
    reason: CloseReason


@dataclass(frozen=True, slots=True)
class ManifestRequested:
    """Answer with ``Endpoint.send_manifest(request_id, records, more)`` (or ``reject``)."""

    request_id: int
    peer: PeerId
    folder: FolderId
    since_seq: int
    max_size: int
    """The encoded batch (``wire.manifest_batch_size``) must not exceed this."""


@dataclass(frozen=True, slots=True)
class ManifestReceived:
    request_id: int
    peer: PeerId
    folder: FolderId
    records: tuple[bytes, ...]
    more: bool
    """True when the peer has more records: ask again from the last sequence received."""


@dataclass(frozen=True, slots=True)
class BlockRequested:
    """Answer with ``Endpoint.send_block(request_id, data)`` (or ``reject``)."""

    request_id: int
    peer: PeerId
    folder: FolderId
    path: str
    index: int
    offset: int
    size: int
    hash: bytes
    hash_algo: str


@dataclass(frozen=True, slots=True)
class BlockReceived:
    """A requested block arrived complete and matching its hash."""

    request_id: int
    peer: PeerId
    folder: FolderId
    data: bytes


@dataclass(frozen=True, slots=True)
class RequestFailed:
    request_id: int
    peer: PeerId | None
    folder: FolderId
    reason: FailReason


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The requester cancelled (or went away): stop preparing the answer; it is discarded."""

    request_id: int
    peer: PeerId
    folder: FolderId


@dataclass(frozen=True, slots=True)
class NotificationReceived:
    peer: PeerId
    folder: FolderId
    seq: int
    have: tuple[bytes, ...]


Event: TypeAlias = (
    SessionEstablished
    | SessionClosed
    | ManifestRequested
    | ManifestReceived
    | BlockRequested
    | BlockReceived
    | RequestFailed
    | RequestCancelled
    | NotificationReceived
)
