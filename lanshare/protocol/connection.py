"""One encrypted session with one peer for one folder: handshake, reliability, requests.

Pure, sans-IO: no sockets, clock or files; the ``Endpoint`` feeds it datagrams and ``now``.

Theory of operation
-------------------
A session starts with the NNpsk0 handshake (``crypto``): the initiator sends INITIAL, the
responder answers RESPONSE and is *half-open* until the first authenticated DATA packet
proves that the initiator received the answer at its address (address validation; until
then the responder answers at most 3x what it received and sends nothing else). Which
INITIALs may open a half-open session at all, and which one is evicted for another, is the
endpoint's decision (``admission``).

After the handshake every datagram is a DATA packet: a 16-byte cleartext header (the AEAD
associated data; its cid|pn bytes are the nonce) and AES-256-GCM encrypted frames. Packet
numbers count up from 0 per direction and are never reused. The receiver acknowledges them
with ACK frames carrying ranges (every ``ack_frequency`` ack-eliciting packets, at once on a
gap, or after ``max_ack_delay``). The sender keeps one record per ack-eliciting packet
(``recovery.SentPackets``) and declares a packet lost when a packet 3 numbers later is
acknowledged or 9/8 RTT passed (RFC 9002 §6.1); a probe timeout (PTO, §6.2) with exponential
backoff re-sends the oldest outstanding fragment when ACKs stop. What a lost packet carried
is re-queued: control frames as they were, block data as the same *fragment* (fixed offsets
of ``fragment_size`` bytes), never the whole block.

Requests are receiver-driven. ``request_block``/``request_manifest`` queue a request; it is
sent while the bytes of all answers outstanding stay within ``max_in_flight_size`` (flow
control: the peer can never have more than that in flight towards us, and that bounds the
reassembly memory). The server takes a peer's requests while what they cost (their bytes
plus a fixed cost each: answers are held until acknowledged) stays within 4x the peer's
credit, ``max_serving_size`` per session and ``max_total_serving`` over all sessions (ours,
whatever the peer advertises), and at most a few manifest requests at once; beyond that a
request is refused ``BUSY``. It emits ``BlockRequested``; the application answers with
``send_block``; the answer goes out as DATA frames under the congestion window
(``congestion.NewReno``), the pacer (rate cwnd/srtt, capped by the peer's
``max_recv_rate``) and the endpoint's ``max_send_rate`` bucket. The requester reassembles
fragments into one buffer (duplicates are ignored), checks size and hash, and emits
``BlockReceived`` or ``RequestFailed``. A request without progress for ``request_timeout``
fails and is cancelled.

Receiving in runs: the adapter hands over what one receive call got (a GRO batch: up to ~64
datagrams from one address) in one ``Endpoint.receive_datagrams`` call. The datagrams that
are each the next packet number, full size and in the current key phase of one session are
opened in one loop (``on_data_run``): each is authenticated on its own before anything in it
is used, and what a run changes for ACKs and timers (largest packet number, ranges, deadlines)
is written once per run. Anything else (a gap, a replay, a key update, another size, another
session) takes the general path (``on_data_packet``) one datagram at a time.

Liveness: a PING every ``keepalive_interval`` when idle; nothing authenticated for
``idle_timeout`` closes the session (``PEER_GONE``) and fails every request on it.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag

from lanshare import hashes
from lanshare.errors import DecodeError, LocalProtocolError
from lanshare.events import (
    Addr,
    BlockReceived,
    BlockRequested,
    CloseReason,
    Event,
    FailReason,
    FolderId,
    ManifestReceived,
    ManifestRequested,
    NotificationReceived,
    PeerId,
    RequestCancelled,
    RequestFailed,
    SessionClosed,
    SessionEstablished,
)
from lanshare.protocol import wire
from lanshare.protocol.congestion import Ledbat, NewReno, TokenBucket
from lanshare.protocol.crypto import (
    InitiatorHandshake,
    PacketKey,
    ResponderHandshake,
)
from lanshare.protocol.rangeset import RangeSet
from lanshare.protocol.recovery import RttEstimator, SentPackets, SentRecord

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

_DATA = wire.FrameType.DATA
_ACK = wire.FrameType.ACK
_PING = wire.FrameType.PING
_PADDING = wire.FrameType.PADDING
_CLOSE = wire.FrameType.CLOSE
_HDR = wire.SHORT_HEADER
#: The short header as (version | type | flags | dst_cid, pn): within a run of one session's
#: packets in one key phase the first eight bytes never change.
_HDR_RUN = struct.Struct("!QQ")
#: The packet number of a short header (bytes 8..16): what changes from one data packet to
#: the next of one ``_write_data`` call.
_PN = struct.Struct("!Q")
_DFR_HEAD = wire.DATA_FRAME_HEAD
_DFR_TAIL = wire.DATA_FRAME_TAIL
_DFR_HEAD_SIZE = _DFR_HEAD.size
_DFR = wire.DATA_FRAME
_DFR_SIZE = wire.DATA_FRAME_SIZE
_OVERHEAD = wire.DATA_OVERHEAD
_PKT_DATA = wire.PacketType.DATA
_VERSION = wire.VERSION
_PING_FRAME = b"\x01"
_MIN_FRAGMENT = wire.fragment_size(wire.MIN_DATAGRAM_SIZE)
#: What a peer's request costs of the serving bound beyond the bytes it asks for: its
#: bookkeeping here and in the application (the event, a path of up to ``MAX_PATH_SIZE``),
#: so that requests for tiny blocks are bounded in number too.
_REQUEST_COST = 2 * wire.MAX_PATH_SIZE
#: Manifest requests of one peer answered at once: each is a task and index reads in the
#: application, and an honest peer has one outstanding.
_MAX_MANIFEST_REQUESTS = 4
#: ``b`` of the sent record of a path MTU probe (data packets have a fragment index >= 0).
_PROBE = -2
#: RFC 8899 MAX_PROBES: give up on a larger datagram size after this many lost probes.
_MAX_PROBES = 3
_MAX_PTO_BACKOFF = 6
_PACING_GAIN = 1.25
#: Control frame kinds (what to do with one when its packet is lost).
_K_REQUEST = 1
_K_CANCEL = 2
_K_OTHER = 3


@dataclass(frozen=True, slots=True)
class Params:
    """Every knob a session uses (built by ``Endpoint`` from config and keyword arguments)."""

    keepalive_interval: float = 5.0
    idle_timeout: float = 15.0
    request_timeout: float = 10.0
    initial_rtt: float = 0.1
    max_in_flight_size: int = 4 * 1024 * 1024
    max_total_in_flight: int = 0  # over all sessions; 0 = max_in_flight_size
    max_serving_size: int = 16 * 1024 * 1024
    """Bytes of a peer's requests one session holds at once (answers are kept until
    acknowledged), whatever the credit the peer advertises."""
    max_total_serving: int = 128 * 1024 * 1024
    """The same over every session of the endpoint."""
    max_datagram_size: int = 1452
    max_recv_rate: int = 0
    max_ack_delay: float = 0.002
    ack_frequency: int = 10
    granularity: float = 0.001
    key_update_interval: int = 1 << 23
    max_block_size: int = 16 * 1024 * 1024
    max_manifest_size: int = 4 * 1024 * 1024
    loss_threshold: float = 0.05
    burst_interval: float = 0.002
    max_datagrams_per_call: int = 256
    ack_ranges: int = 32
    pmtu_probe: bool = True
    background: bool = False
    background_target: float = 0.01


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint, for status displays, tests and benchmarks."""

    datagrams_received: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    bytes_sent: int = 0
    dropped: int = 0
    """Malformed, unknown connection id, wrong address, or unsupported type."""
    auth_failed: int = 0
    """Failed AEAD authentication (tampered, or not from the key holder)."""
    replayed: int = 0
    handshakes_failed: int = 0
    retries_sent: int = 0
    key_trials: int = 0
    """PSK trials paid for INITIALs (one per accepted folder each: the most one can cost)."""
    initials_replayed: int = 0
    """INITIALs whose ephemeral key already opened a session from another address or cid."""
    initials_shed: int = 0
    """INITIALs left untried: their source or all sources were out of key-trial budget."""
    half_open_evicted: int = 0
    """Half-open sessions evicted to make room for another (per-source or overall bound)."""
    packets_lost: int = 0
    fragments_retransmitted: int = 0
    protocol_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A snapshot of one session (``Endpoint.session_info``)."""

    state: str
    srtt: float
    rttvar: float
    min_rtt: float
    cwnd: int
    bytes_in_flight: int
    congestion_events: int
    requests: int
    """Our requests sent and not yet answered."""
    pending_requests: int
    """Our requests waiting for flow-control credit (or the receive-rate limit)."""
    serving: int
    """The peer's requests we are answering or waiting for the application to answer."""
    credit_used: int
    datagram_size: int
    pto_count: int
    key_updates: int
    background: bool


class Context:
    """What every session of one endpoint shares (events, ids, limits, randomness)."""

    __slots__ = (
        "_next_handle",
        "credit_used",
        "credit_waiters",
        "dirty",
        "events",
        "handles",
        "max_credit",
        "node_id",
        "on_closed",
        "on_detached",
        "on_established",
        "params",
        "recv_limit",
        "rng",
        "send_limit",
        "serving_bytes",
        "stats",
    )

    def __init__(
        self,
        params: Params,
        node_id: bytes,
        rng: random.Random,
        send_limit: TokenBucket | None,
        recv_limit: TokenBucket | None,
    ) -> None:
        self.params = params
        self.node_id = node_id
        self.rng = rng
        self.send_limit = send_limit
        self.recv_limit = recv_limit
        self.events: deque[Event] = deque()
        self.stats = EndpointStats()
        #: handle -> (session, wire request id, True when we are the requester)
        self.handles: dict[int, tuple[Session, int, bool]] = {}
        self._next_handle = 1
        #: Answers outstanding over every session, and the bound on them (socket buffer).
        self.credit_used = 0
        self.max_credit = params.max_total_in_flight or params.max_in_flight_size
        self.credit_waiters: dict[Session, None] = {}
        #: What the peers' requests cost over every session (``Params.max_total_serving``).
        self.serving_bytes = 0
        #: Sessions whose output or deadline may have changed since the endpoint last looked
        #: (a dict as an ordered set: the order of output stays deterministic).
        self.dirty: dict[Session, None] = {}
        self.on_closed: Callable[[Session], None] = lambda s: None
        self.on_detached: Callable[[Session], None] = lambda s: None
        self.on_established: Callable[[Session], None] = lambda s: None

    def release_credit(self, size: int) -> None:
        """Answers of ``size`` bytes are no longer outstanding: wake sessions waiting."""
        if not size:
            return
        self.credit_used -= size
        for session in self.credit_waiters:
            session.wake()
        self.credit_waiters.clear()

    def new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle = handle + 1
        return handle


class State(Enum):
    HANDSHAKE = 1  # initiator waiting for RESPONSE
    HALF_OPEN = 2  # responder waiting for the first authenticated packet
    ESTABLISHED = 3
    CLOSING = 4  # CLOSE sent; answering stray packets with CLOSE until the deadline
    CLOSED = 5


_ESTABLISHED = State.ESTABLISHED


class _OutMessage:
    """An answer being sent: block data or an encoded manifest batch, cut into fragments."""

    __slots__ = (
        "acked",
        "cancelled",
        "data",
        "frag",
        "n_acked",
        "n_frags",
        "next_frag",
        "rid",
        "size",
        "total",
    )

    def __init__(self, rid: int, data: memoryview, datagram_size: int) -> None:
        self.rid = rid
        self.data = data
        self.total = len(data)
        # The datagram size when the answer starts is kept for all its fragments (and their
        # retransmissions): offsets stay fixed even if the path MTU probe succeeds meanwhile.
        self.size = datagram_size
        self.frag = frag_size = wire.fragment_size(datagram_size)
        self.n_frags = max(1, -(-self.total // frag_size))
        self.next_frag = 0
        self.acked = bytearray(self.n_frags)
        self.n_acked = 0
        self.cancelled = False


class _Request:
    """Our request to the peer and the reassembly of its answer."""

    __slots__ = (
        "algo",
        "block",
        "buf",
        "digest",
        "frame",
        "handle",
        "last_progress",
        "ranges",
        "rid",
        "sent",
        "size",
        "total",
    )

    def __init__(
        self, handle: int, rid: int, block: bool, size: int, frame: bytes, digest: bytes, algo: str
    ) -> None:
        self.handle = handle
        self.rid = rid
        self.block = block
        self.size = size  # exact block size, or the manifest batch limit
        self.frame = frame
        self.digest = digest
        self.algo = algo
        self.buf: bytearray | None = None
        self.ranges = RangeSet()  # bytes of the answer received
        self.total = -1
        self.sent = False
        self.last_progress = 0.0


class _Served:
    """A request the peer made of us, waiting for the application or being sent."""

    __slots__ = ("block", "handle", "max_size", "msg", "size")

    def __init__(self, handle: int, block: bool, size: int, max_size: int) -> None:
        self.handle = handle
        self.block = block
        self.size = size  # block size, or 0 for a manifest
        self.max_size = max_size
        self.msg: _OutMessage | None = None


class Session:
    """One session. Built by ``Endpoint``: ``initiator()`` or ``responder()``."""

    def __init__(
        self, ctx: Context, addr: Addr, folder: bytes, local_cid: int, now: float, initiator: bool
    ) -> None:
        p = ctx.params
        self.ctx = ctx
        self.addr = addr
        self.folder = FolderId(folder)
        self.local_cid = local_cid
        self.is_initiator = initiator
        self.state = State.HANDSHAKE if initiator else State.HALF_OPEN
        self.peer: PeerId | None = None
        self.peer_cid = 0
        self.created = now
        self.owes_result = initiator  # a connect() waits for an established/closed event
        self.close_reason: CloseReason | None = None
        # handshake
        self._hs_initiator: InitiatorHandshake | None = None
        self._initial_msg = b""
        self._token = b""
        self._retried = False
        self._hs_out: bytes | None = None  # INITIAL (initiator) or RESPONSE (responder)
        self._hs_send = False
        self._hs_timeout = max(2 * p.initial_rtt, p.granularity)
        self._hs_resend_at = now
        self._hs_deadline = now + p.idle_timeout
        self.remote_ephemeral = b""
        self.validated = False
        self.amp_received = 0
        self.amp_sent = 0
        # negotiated
        self._dgram = wire.MIN_DATAGRAM_SIZE
        self._peer_credit = wire.MIN_DATAGRAM_SIZE
        self._peer_rate = 0
        # keys
        self._tx_key: PacketKey | None = None
        self._tx_phase = 0
        self._tx_count = 0
        self._rx_key: PacketKey | None = None
        self._rx_prev: PacketKey | None = None
        self._rx_next: PacketKey | None = None
        self._rx_phase = 0
        self._rx_phase_start = 0
        self.key_updates = 0
        self.background = False
        # buffers (sized when established)
        self._tx_buf = bytearray(0)
        self._pt_buf = bytearray(0)
        self._rx_buf = bytearray(0)
        self._rx_pt = bytearray(0)
        # recovery / congestion
        self._rtt = RttEstimator(p.initial_rtt)
        self._sent = SentPackets()
        self._cc = NewReno(self._dgram, 2 * p.max_in_flight_size, p.loss_threshold)
        self._pacer = TokenBucket(0.0, 0.0, now)
        self._pto_count = 0
        self._probes = 0
        self._probe_due = False
        self._probe_tries = 0
        self._dgram_max = wire.MIN_DATAGRAM_SIZE
        self._ping = False
        self._last_eliciting = now
        self._last_recv = now
        self._last_now = now
        self._send_now = False
        self._pacing_at: float | None = None
        # acknowledgements we owe
        self._rx_ranges = RangeSet(max_ranges=4 * p.ack_ranges)
        self._rx_largest = -1
        self._rx_largest_time = now
        self._ack_count = 0
        self._ack_at: float | None = None
        self._ack_now = False
        self._ack_unsent = False
        # control frames waiting: (kind, request id, encoded frame)
        self._ctrl: deque[tuple[int, int, bytes]] = deque()
        self._close_frame: bytes | None = None
        self._close_code = 0
        self._closing_at: float | None = None
        self.initial_key: tuple[Addr, int] | None = None
        self._rebase = False
        # requester side
        self._next_rid = 0
        self._requests: dict[int, _Request] = {}
        self._pending: deque[_Request] = deque()
        self._credit_used = 0
        self._request_check_at: float | None = None
        self._release_at: float | None = None
        # server side
        self._seen = RangeSet(max_ranges=1024)
        self._served: dict[int, _Served] = {}
        self._serving_bytes = 0
        self._serving_manifests = 0
        self._queue: deque[_OutMessage] = deque()
        self._retx: deque[tuple[_OutMessage, int]] = deque()

    # ------------------------------------------------------------------ construction

    @classmethod
    def initiator(
        cls, ctx: Context, addr: Addr, folder: bytes, psk: bytes, local_cid: int, now: float
    ) -> Session:
        """Start a handshake towards ``addr`` for ``folder`` (INITIAL goes out on next write)."""
        s = cls(ctx, addr, folder, local_cid, now, initiator=True)
        s.validated = True  # we chose the address
        s._rebase = True  # timers start at the first write (commands carry no time)
        p = ctx.params
        s._hs_initiator = InitiatorHandshake(psk, ctx.rng.randbytes(32))
        payload = wire.InitialPayload(
            ctx.node_id,
            folder,
            local_cid,
            p.max_datagram_size,
            p.max_in_flight_size,
            p.max_recv_rate,
            wire.FLAG_BACKGROUND if p.background else 0,
        )
        pad = wire.INITIAL_SIZE - wire.LONG_HEADER_SIZE - wire.KEY_SIZE - wire.TAG_SIZE
        s._initial_msg = s._hs_initiator.write_message1(wire.encode_initial_payload(payload, pad))
        s._build_initial()
        s._hs_send = True
        return s

    @classmethod
    def responder(
        cls,
        ctx: Context,
        addr: Addr,
        hs: ResponderHandshake[bytes],
        initial: wire.InitialPayload,
        local_cid: int,
        validated: bool,
        now: float,
    ) -> Session:
        """Accept an INITIAL: derive keys and prepare the RESPONSE (sent on next write)."""
        s = cls(ctx, addr, initial.folder_id, local_cid, now, initiator=False)
        p = ctx.params
        s.peer = PeerId(initial.node_id)
        s.peer_cid = initial.cid
        s.validated = validated
        s.remote_ephemeral = hs.remote_ephemeral
        payload = wire.encode_response_payload(
            wire.ResponsePayload(
                ctx.node_id,
                local_cid,
                p.max_datagram_size,
                p.max_in_flight_size,
                p.max_recv_rate,
                wire.FLAG_BACKGROUND if p.background else 0,
            )
        )
        message, (send_key, recv_key) = hs.write_message2(ctx.rng.randbytes(32), payload)
        s._hs_out = (
            wire.LONG_HEADER.pack(_VERSION, wire.PacketType.RESPONSE, 0, initial.cid) + message
        )
        s._setup(
            send_key,
            recv_key,
            initial.max_datagram_size,
            initial.max_in_flight_size,
            initial.max_recv_rate,
            initial.flags,
            now,
        )
        s._hs_send = True
        return s

    def _build_initial(self) -> None:
        self._hs_out = (
            wire.LONG_HEADER.pack(
                _VERSION, wire.PacketType.INITIAL, len(self._token), self.local_cid
            )
            + self._token
            + self._initial_msg
        )

    def _setup(
        self,
        send_key: bytes,
        recv_key: bytes,
        peer_dgram: int,
        peer_credit: int,
        peer_rate: int,
        peer_flags: int,
        now: float,
    ) -> None:
        p = self.ctx.params
        self._tx_key = PacketKey(send_key)
        self._rx_key = PacketKey(recv_key)
        dgram = max(wire.MIN_DATAGRAM_SIZE, min(p.max_datagram_size, peer_dgram))
        self._dgram_max = dgram
        # Datagrams start at the size every IPv4/IPv6 LAN path carries; a padded probe
        # (RFC 8899 style) lets data packets grow to the negotiated size once one arrives.
        self._dgram = wire.MIN_DATAGRAM_SIZE if p.pmtu_probe else dgram
        self._probe_due = self._dgram < dgram
        self._peer_credit = peer_credit
        self._peer_rate = peer_rate
        self._tx_buf = bytearray(dgram)
        self._pt_buf = bytearray(dgram - _OVERHEAD)
        self._rx_buf = bytearray(dgram)
        self._rx_pt = bytearray(wire.MAX_DATAGRAM_SIZE)
        tx = memoryview(self._tx_buf)
        self._tx_mv = tx
        self._tx_nonce = tx[4:16]
        self._tx_aad = tx[:16]
        self._pt_mv = memoryview(self._pt_buf)
        rx = memoryview(self._rx_buf)
        self._rx_nonce = rx[4:16]
        self._rx_aad = rx[:16]
        self._rx_body = rx[16:]
        self._rx_pt_mv = memoryview(self._rx_pt)
        self._tx_views: dict[int, tuple[memoryview, memoryview, memoryview]] = {}
        self._set_rx_fast(dgram)
        max_cwnd = max(2 * peer_credit, 4 * dgram)
        # Background mode when either side asks for it: what we send then yields (LEDBAT).
        self.background = p.background or bool(peer_flags & wire.FLAG_BACKGROUND)
        if self.background:
            self._cc = Ledbat(
                self._dgram, max_cwnd, self._rtt, p.background_target, p.loss_threshold
            )
        else:
            self._cc = NewReno(self._dgram, max_cwnd, p.loss_threshold)
        self._update_pacer(now)
        self._pacer.tokens = self._pacer.capacity  # the initial window may go out at once
        self._last_recv = now
        self._last_eliciting = now

    def _set_rx_fast(self, size: int) -> None:
        """Prepare the views the receive fast path decrypts full packets of ``size`` with."""
        rx = memoryview(self._rx_buf)
        self._rx_fast = size
        self._rx_body = rx[16:size]
        self._rx_pt_full = self._rx_pt_mv[: size - _OVERHEAD]
        self._rx_frag = self._rx_pt_mv[_DFR_SIZE : size - _OVERHEAD]  # a full fragment's bytes
        self._rx_other_size = 0
        self._rx_other_count = 0

    def _tx_views_for(self, size: int) -> tuple[memoryview, memoryview, memoryview]:
        """(encrypted body, plaintext, whole datagram) views of the send buffers for ``size``."""
        views = self._tx_views.get(size)
        if views is None:
            views = self._tx_views[size] = (
                self._tx_mv[16:size],
                self._pt_mv[: size - _OVERHEAD],
                self._tx_mv[:size],
            )
        return views

    # ------------------------------------------------------------------ handshake input

    def on_retry(self, token: bytes, now: float) -> None:
        """A RETRY for our INITIAL: resend it once with the token (RFC 9000 §8.1.2)."""
        if self.state is not State.HANDSHAKE or self._retried:
            return
        self._retried = True
        self._token = token
        self._build_initial()
        self._hs_send = True
        self._want_write()
        self._last_now = now

    def on_response(self, message: bytes, now: float) -> None:
        """Message 2 of the handshake; on success the session is established."""
        if self.state is not State.HANDSHAKE or self._hs_initiator is None:
            return
        try:
            payload_bytes, (send_key, recv_key) = self._hs_initiator.read_message2(message)
            payload = wire.decode_response_payload(payload_bytes)
        except DecodeError:
            self.ctx.stats.handshakes_failed += 1
            return
        if payload.node_id == self.ctx.node_id:
            self.close(CloseReason.PROTOCOL_ERROR, send=False)  # we reached ourselves
            return
        self._hs_initiator = None
        self.peer = PeerId(payload.node_id)
        self.peer_cid = payload.cid
        self.validated = True
        self._setup(
            send_key,
            recv_key,
            payload.max_datagram_size,
            payload.max_in_flight_size,
            payload.max_recv_rate,
            payload.flags,
            now,
        )
        self._hs_out = None
        self._hs_send = False
        self.state = State.ESTABLISHED
        self._ping = True  # proves to the responder that we got its answer
        self._want_write()
        self._last_now = now
        self._established(now)

    def on_duplicate_initial(self, size: int) -> None:
        """The initiator repeated its INITIAL (our RESPONSE was lost): answer again."""
        self.amp_received += size
        if self.state is State.HALF_OPEN:
            self._hs_send = True
            self._want_write()

    def _established(self, now: float) -> None:
        self.owes_result = False
        assert self.peer is not None
        self.ctx.on_established(self)  # closes a session this one replaces, first
        self.ctx.events.append(
            SessionEstablished(self.peer, self.folder, self.addr, self.is_initiator)
        )
        self._release_requests(now)

    def abandon(self) -> None:
        """Drop a handshake silently (the peer's simultaneous handshake won)."""
        self.owes_result = False
        self._set_closed()

    # ------------------------------------------------------------------ DATA input

    def on_data_packet(self, data: bytes | memoryview, flags: int, pn: int, now: float) -> None:
        """An authenticated-or-not DATA packet for this session; drops anything invalid.

        The general path: ``on_data_run`` takes the bulk of a transfer faster."""
        state = self.state
        if state is State.CLOSED or state is State.HANDSHAKE:
            return
        stats = self.ctx.stats
        n = len(data)
        # Replay protection: the set of packet numbers received (the one ACKs are built
        # from) is the window; below its lowest tracked number everything counts as old.
        if pn <= self._rx_largest:
            received = self._rx_ranges
            if pn in received or pn < received.lowest:
                stats.replayed += 1
                return
        if n > self._dgram_max or n < _OVERHEAD + 1:
            stats.dropped += 1
            return
        phase = flags & 1
        rotate = False
        if phase == self._rx_phase:
            key = self._rx_key
        elif pn < self._rx_phase_start:
            key = self._rx_prev
        else:
            if self._rx_next is None and self._rx_key is not None:
                self._rx_next = self._rx_key.next()
            key = self._rx_next
            rotate = True
        if key is None:
            stats.dropped += 1
            return
        ptlen = n - _OVERHEAD
        try:
            if n == self._rx_fast:
                self._rx_buf[:n] = data
                key.aead.decrypt_into(self._rx_nonce, self._rx_body, self._rx_aad, self._rx_pt_full)
            else:
                if n >= wire.MIN_DATAGRAM_SIZE:
                    # The peer sends full packets of another size (its path MTU probe has
                    # not, or has, succeeded): move the fast path to that size.
                    if n == self._rx_other_size:
                        self._rx_other_count += 1
                        if self._rx_other_count >= 16:
                            self._set_rx_fast(n)
                    else:
                        self._rx_other_size = n
                        self._rx_other_count = 1
                mv = memoryview(data)
                key.aead.decrypt_into(mv[4:16], mv[16:], mv[:16], self._rx_pt_mv[:ptlen])
        except InvalidTag:
            stats.auth_failed += 1
            return
        if rotate:
            self._rx_prev = self._rx_key
            self._rx_key = self._rx_next
            self._rx_next = None
            self._rx_phase = phase
            self._rx_phase_start = pn
            if self._tx_phase != phase and self._tx_key is not None:
                self._tx_key = self._tx_key.next()
                self._tx_phase = phase
                self._tx_count = 0
                self.key_updates += 1
        self._last_recv = now
        self._last_now = now
        if state is State.HALF_OPEN:
            self.validated = True
            self.state = State.ESTABLISHED
            self._established(now)
        elif state is State.CLOSING:
            self._close_frame_resend()
            return
        # acknowledgement bookkeeping
        in_order = pn == self._rx_largest + 1
        if pn > self._rx_largest:
            self._rx_largest = pn
            self._rx_largest_time = now
        self._rx_ranges.add(pn)
        self._ack_unsent = True
        try:
            eliciting = self._parse_frames(ptlen, now)
        except DecodeError as exc:
            logger.debug("protocol error from %s: %s", self.addr, exc)
            stats.protocol_errors += 1
            self.close(CloseReason.PROTOCOL_ERROR)
            return
        if eliciting:
            if self._ack_count == 0:
                self._ack_at = now + self.ctx.params.max_ack_delay
            self._ack_count += 1
            if not in_order:
                self._ack_now = True  # a gap or a late packet: tell the sender at once

    def on_data_run(self, datagrams: Sequence[bytes | memoryview], start: int, now: float) -> int:
        """Handle ``datagrams[start:]`` while each is the next DATA packet of this session:
        in order, full size, current key phase. Return the index of the first one it did not
        handle (``start`` when none), for ``on_data_packet`` or another session.

        The bulk of a transfer comes this way: per datagram one header unpack, one copy into
        the receive buffer, one AEAD open, one frame unpack and one copy into the block;
        everything else (counters, deadlines, ACK state) is written once per run.
        """
        if self.state is not _ESTABLISHED:
            return start
        n = self._rx_fast
        expected = first = self._rx_largest + 1
        # Other flag bits than the key phase go the general path (which ignores them).
        prefix = _HDR_RUN.unpack(_HDR.pack(_VERSION, _PKT_DATA, self._rx_phase, self.local_cid, 0))[
            0
        ]
        key = self._rx_key
        assert key is not None
        decrypt = key.aead.decrypt_into
        nonce, body, aad, opened = self._rx_nonce, self._rx_body, self._rx_aad, self._rx_pt_full
        rx_buf = self._rx_buf
        pt = self._rx_pt
        pt_mv = self._rx_pt_mv
        end = n - _OVERHEAD
        full_frag = self._rx_frag
        frag_len = len(full_frag)
        unpack_header = _HDR_RUN.unpack_from
        unpack_frame = _DFR.unpack_from
        requests = self._requests
        i = start
        count = len(datagrams)
        eliciting = failed = 0
        try:
            while i < count:
                data = datagrams[i]
                if len(data) != n:
                    break
                head, pn = unpack_header(data)
                if pn != expected or head != prefix:
                    break
                i += 1
                rx_buf[:n] = data
                try:
                    decrypt(nonce, body, aad, opened)
                except InvalidTag:
                    failed += 1
                    continue
                expected = pn + 1
                if pt[0] != _DATA:
                    if self._parse_frames(end, now):
                        eliciting += 1
                    if self.state is not _ESTABLISHED:
                        break
                    continue
                # One DATA frame, maybe followed by PADDING: the packet of a bulk transfer.
                eliciting += 1
                _, rid, total, offset, length = unpack_frame(pt, 0)
                pos = _DFR_SIZE + length
                if pos > end or offset + length > total:
                    raise DecodeError("DATA frame out of bounds")
                req = requests.get(rid)
                if req is not None:
                    chunk = full_frag if length == frag_len else pt_mv[_DFR_SIZE:pos]
                    stops = req.ranges._stops
                    if req.total == total and stops and stops[-1] == offset and length:
                        # The next bytes of an answer under way (RangeSet.add's fast path).
                        stops[-1] = stop = offset + length
                        req.buf[offset:stop] = chunk  # type: ignore[index]
                        req.last_progress = now
                        if stop == total and len(stops) == 1 and not req.ranges._starts[0]:
                            self._complete(req, now)
                    else:
                        self._on_fragment(req, total, offset, length, chunk, now)
                if pos < end and pt[pos] != _PADDING:
                    self._parse_frames(end, now, pos)
                    if self.state is not _ESTABLISHED:
                        break
        except DecodeError as exc:
            logger.debug("protocol error from %s: %s", self.addr, exc)
            self.ctx.stats.protocol_errors += 1
            self.close(CloseReason.PROTOCOL_ERROR)
        if failed:
            self.ctx.stats.auth_failed += failed
        if expected > first:  # packets first .. expected - 1 were authentic
            self._rx_ranges.add(first, expected)
            self._rx_largest = expected - 1
            self._rx_largest_time = now
            self._last_recv = now
            self._last_now = now
            self._ack_unsent = True
            if eliciting:
                if self._ack_count == 0:
                    self._ack_at = now + self.ctx.params.max_ack_delay
                self._ack_count += eliciting
        return i

    def _parse_frames(self, end: int, now: float, start: int = 0) -> bool:
        pt = self._rx_pt
        mv = self._rx_pt_mv
        pos = start
        eliciting = False
        requests = self._requests
        unpack = _DFR.unpack_from
        while pos < end:
            ftype = pt[pos]
            if ftype == _DATA:
                if pos + _DFR_SIZE > end:
                    raise DecodeError("truncated DATA frame")
                _, rid, total, offset, length = unpack(pt, pos)
                pos += _DFR_SIZE
                if pos + length > end or offset + length > total:
                    raise DecodeError("DATA frame out of bounds")
                eliciting = True
                req = requests.get(rid)
                if req is not None:
                    self._on_fragment(req, total, offset, length, mv[pos : pos + length], now)
                pos += length
            elif ftype == _PADDING:
                break
            elif ftype == _ACK:
                ack, pos = wire.decode_ack(pt, pos, end)
                self._on_ack(ack, now)
            elif ftype == _PING:
                eliciting = True
                pos += 1
            else:
                frame, pos = wire.decode_frame(pt, pos, end)
                eliciting = True
                self._on_frame(frame, now)
                if self.state is not State.ESTABLISHED:
                    break
        return eliciting

    def _on_frame(self, frame: wire.Frame, now: float) -> None:
        if isinstance(frame, wire.RequestBlock):
            self._on_request_block(frame)
        elif isinstance(frame, wire.RequestManifest):
            self._on_request_manifest(frame)
        elif isinstance(frame, wire.Cancel):
            self._on_cancel(frame.request_id)
        elif isinstance(frame, wire.Reject):
            req = self._requests.get(frame.request_id)
            if req is not None and req.sent:
                reasons = {
                    int(wire.RejectCode.NOT_FOUND): FailReason.NOT_FOUND,
                    int(wire.RejectCode.BUSY): FailReason.BUSY,
                }
                self._fail(req, reasons.get(frame.code, FailReason.REFUSED))
        elif isinstance(frame, wire.Notify):
            assert self.peer is not None
            self.ctx.events.append(
                NotificationReceived(self.peer, self.folder, frame.seq, frame.have)
            )
        elif isinstance(frame, wire.Close):
            reason = (
                CloseReason(frame.code)
                if frame.code in CloseReason._value2member_map_
                else CloseReason.CLOSED
            )
            self.close(reason, send=False)
        elif isinstance(frame, wire.Data):  # pragma: no cover - handled inline
            pass

    # ------------------------------------------------------------------ requester side

    def _on_fragment(
        self, req: _Request, total: int, offset: int, length: int, chunk: memoryview, now: float
    ) -> None:
        if req.buf is None:
            if (req.block and total != req.size) or total > req.size or not req.sent:
                self._fail(req, FailReason.MALFORMED)
                return
            req.total = total
            req.buf = bytearray(total)
        elif total != req.total:
            self._fail(req, FailReason.MALFORMED)
            return
        stop = offset + length
        # Every fragment but the one that ends the answer fills a smallest datagram: that
        # bounds the ranges (and the work) a peer can make us keep to total / 1153.
        if length < _MIN_FRAGMENT and stop != total:
            self._fail(req, FailReason.MALFORMED)
            return
        ranges = req.ranges
        if ranges.covers(offset, stop) and total:
            return  # a duplicate
        ranges.add(offset, stop)
        req.buf[offset:stop] = chunk
        req.last_progress = now
        if not total or (len(ranges) == 1 and ranges.lowest == 0 and ranges.highest == total - 1):
            self._complete(req, now)

    def _complete(self, req: _Request, now: float) -> None:
        buf = req.buf
        assert buf is not None
        assert self.peer is not None
        if req.block:
            if hashes.digest(req.algo, buf) != req.digest:
                self._fail(req, FailReason.INTEGRITY)
                return
            self._finish(req)
            self.ctx.events.append(BlockReceived(req.handle, self.peer, self.folder, bytes(buf)))
            return
        try:
            records, more = wire.decode_manifest_batch(buf)
        except DecodeError:
            self._fail(req, FailReason.MALFORMED)
            return
        self._finish(req)
        self.ctx.events.append(ManifestReceived(req.handle, self.peer, self.folder, records, more))

    def _finish(self, req: _Request) -> None:
        if self._requests.pop(req.rid, None) is None:
            return
        self.ctx.handles.pop(req.handle, None)
        if req.sent:
            self._credit_used -= req.size
            self.ctx.release_credit(req.size)
        req.buf = None
        if self._pending:
            self._want_write()  # credit freed: the next write releases more requests

    def _fail(self, req: _Request, reason: FailReason, cancel: bool = True) -> None:
        if (
            req.sent
            and cancel
            and reason not in (FailReason.NOT_FOUND, FailReason.BUSY, FailReason.REFUSED)
        ):
            self._queue_ctrl(_K_CANCEL, req.rid, wire.encode_frame(wire.Cancel(req.rid)))
        was_sent = req.sent
        self._finish(req)
        if not was_sent:
            with contextlib.suppress(ValueError):
                self._pending.remove(req)
        self.ctx.events.append(RequestFailed(req.handle, self.peer, self.folder, reason))

    def add_request(
        self,
        handle: int,
        block: bool,
        size: int,
        frame_of: Callable[[int], bytes],
        digest: bytes,
        algo: str,
    ) -> None:
        rid = self._next_rid
        self._next_rid = rid + 1
        req = _Request(handle, rid, block, size, frame_of(rid), digest, algo)
        self._requests[rid] = req
        self.ctx.handles[handle] = (self, rid, True)
        self._pending.append(req)
        self._want_write()

    def cancel_request(self, rid: int) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        if req.sent:
            self._queue_ctrl(_K_CANCEL, rid, wire.encode_frame(wire.Cancel(rid)))
        else:
            self._pending.remove(req)
        self._finish(req)

    def _release_requests(self, now: float) -> None:
        if self.state is not State.ESTABLISHED:
            return
        pending = self._pending
        ctx = self.ctx
        credit = ctx.params.max_in_flight_size
        limit = ctx.recv_limit
        self._release_at = None
        while pending:
            req = pending[0]
            if self._credit_used and self._credit_used + req.size > credit:
                return
            if ctx.credit_used and ctx.credit_used + req.size > ctx.max_credit:
                ctx.credit_waiters[self] = None  # woken when another session frees credit
                return
            if limit is not None:
                if limit.refill(now) <= 0:
                    self._release_at = limit.ready_at(1.0)
                    return
                limit.tokens -= req.size
            pending.popleft()
            req.sent = True
            req.last_progress = now
            self._credit_used += req.size
            ctx.credit_used += req.size
            self._queue_ctrl(_K_REQUEST, req.rid, req.frame)
            deadline = now + self.ctx.params.request_timeout
            if self._request_check_at is None or deadline < self._request_check_at:
                self._request_check_at = deadline

    def _check_requests(self, now: float) -> None:
        timeout = self.ctx.params.request_timeout
        earliest: float | None = None
        for req in list(self._requests.values()):
            if not req.sent:
                continue
            deadline = req.last_progress + timeout
            if deadline <= now:
                self._fail(req, FailReason.TIMEOUT)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        self._request_check_at = earliest

    # ------------------------------------------------------------------ server side

    def _on_request_block(self, frame: wire.RequestBlock) -> None:
        rid = frame.request_id
        if rid in self._seen:
            return
        self._seen.add(rid)
        p = self.ctx.params
        if frame.size > p.max_block_size:
            self._reject(rid, wire.RejectCode.REFUSED)
            return
        if not self._admit(frame.size):
            self._reject(rid, wire.RejectCode.BUSY)
            return
        assert self.peer is not None
        handle = self.ctx.new_handle()
        self._served[rid] = _Served(handle, True, frame.size, frame.size)
        self.ctx.handles[handle] = (self, rid, False)
        self.ctx.events.append(
            BlockRequested(
                handle,
                self.peer,
                self.folder,
                frame.path,
                frame.index,
                frame.offset,
                frame.size,
                frame.hash,
                frame.hash_algo,
            )
        )

    def _on_request_manifest(self, frame: wire.RequestManifest) -> None:
        rid = frame.request_id
        if rid in self._seen:
            return
        self._seen.add(rid)
        max_size = min(frame.max_size, self.ctx.params.max_manifest_size)
        if max_size < wire.manifest_batch_size([]):
            self._reject(rid, wire.RejectCode.REFUSED)
            return
        if self._serving_manifests >= _MAX_MANIFEST_REQUESTS or not self._admit(max_size):
            self._reject(rid, wire.RejectCode.BUSY)
            return
        assert self.peer is not None
        handle = self.ctx.new_handle()
        self._served[rid] = _Served(handle, False, max_size, max_size)
        self._serving_manifests += 1
        self.ctx.handles[handle] = (self, rid, False)
        self.ctx.events.append(
            ManifestRequested(handle, self.peer, self.folder, frame.since_seq, max_size)
        )

    def _admit(self, size: int) -> bool:
        """Take on a peer's request of ``size`` bytes if the serving bounds allow it.

        The requester keeps what it asked for within its credit, but it frees credit when an
        answer *arrives*, we when it is *acknowledged* (an RTT or a lost ACK later): a peer is
        allowed 4x its credit, so only one far beyond it is refused. The credit is the
        peer's to choose, so ``max_serving_size`` (per session) and ``max_total_serving``
        (per endpoint), ours, bound that too. A request alone is always taken (its size is
        within ``max_block_size``/``max_manifest_size``), so no block is too big to serve.
        """
        p = self.ctx.params
        cost = size + _REQUEST_COST
        mine = self._serving_bytes
        limit = min(4 * max(self._peer_credit, size), p.max_serving_size)
        if mine and mine + cost > limit:
            return False
        total = self.ctx.serving_bytes
        if total and total + cost > p.max_total_serving:
            return False
        self._serving_bytes += cost
        self.ctx.serving_bytes += cost
        return True

    def _release(self, served: _Served) -> None:
        """``served`` is answered and acknowledged, cancelled or rejected."""
        cost = served.size + _REQUEST_COST
        self._serving_bytes -= cost
        self.ctx.serving_bytes -= cost
        if not served.block:
            self._serving_manifests -= 1

    def _on_cancel(self, rid: int) -> None:
        served = self._served.pop(rid, None)
        if served is None:
            return
        self._release(served)
        if served.msg is not None:
            served.msg.cancelled = True
            return
        self.ctx.handles.pop(served.handle, None)
        assert self.peer is not None
        self.ctx.events.append(RequestCancelled(served.handle, self.peer, self.folder))

    def _reject(self, rid: int, code: int) -> None:
        self._queue_ctrl(_K_OTHER, rid, wire.encode_frame(wire.Reject(rid, code)))

    def answer(self, rid: int, data: bytes | bytearray | memoryview) -> None:
        """Send the answer (block data or encoded batch) of the request ``rid``."""
        served = self._served.get(rid)
        if served is None:
            return
        if served.msg is not None:
            raise LocalProtocolError("request already answered")
        size = len(data)
        if served.block and size != served.size:
            raise LocalProtocolError(f"block is {served.size} bytes, got {size}")
        if size > served.max_size:
            raise LocalProtocolError(f"answer of {size} bytes exceeds {served.max_size}")
        self.ctx.handles.pop(served.handle, None)
        msg = _OutMessage(rid, memoryview(data).cast("B"), self._dgram)
        served.msg = msg
        self._queue.append(msg)
        self._want_write()

    def reject(self, rid: int, code: int) -> None:
        served = self._served.pop(rid, None)
        if served is None:
            return
        self.ctx.handles.pop(served.handle, None)
        self._release(served)
        if served.msg is not None:
            served.msg.cancelled = True
        self._reject(rid, code)

    def notify(self, seq: int, have: tuple[bytes, ...]) -> None:
        hash_len = len(have[0]) if have else 0
        room = self._dgram - _OVERHEAD - wire.ack_frame_size(self.ctx.params.ack_ranges) - 12
        per = max(1, min(255, room // hash_len)) if hash_len else 1
        chunks = [have[i : i + per] for i in range(0, len(have), per)] or [()]
        for chunk in chunks:
            self._queue_ctrl(_K_OTHER, -1, wire.encode_frame(wire.Notify(seq, chunk)))

    def _message_done(self, msg: _OutMessage) -> None:
        served = self._served.get(msg.rid)
        if served is not None and served.msg is msg:  # not a message already replaced
            del self._served[msg.rid]
            self._release(served)

    # ------------------------------------------------------------------ acknowledgements

    def _on_ack(self, ack: wire.Ack, now: float) -> None:
        sent = self._sent
        acked: list[SentRecord] = []
        sample = sent.on_ack(ack.ranges, acked)
        if not acked:
            return
        if sample is not None:
            self._rtt.update(now - sample[1], ack.ack_delay_us * 1e-6)
        self._pto_count = 0
        acked_bytes = 0
        for rec in acked:
            acked_bytes += rec[2]
            fi = rec[4]
            if fi >= 0:
                msg: _OutMessage = rec[3]
                if not msg.acked[fi]:
                    msg.acked[fi] = 1
                    msg.n_acked += 1
                    if msg.n_acked == msg.n_frags:
                        self._message_done(msg)
            elif fi == _PROBE:
                self._probe_succeeded()
        last = acked[-1]
        self._cc.on_acked(acked_bytes, len(acked), last[1], last[0], sent.next_pn)
        self._detect_lost(now)
        self._update_pacer(now)

    def _detect_lost(self, now: float) -> None:
        lost: list[SentRecord] = []
        self._sent.detect_lost(now, self._rtt.loss_delay(self.ctx.params.granularity), lost)
        if lost:
            self._on_lost(lost, now)

    def _on_lost(self, lost: list[SentRecord], now: float) -> None:
        stats = self.ctx.stats
        stats.packets_lost += len(lost)
        retx = self._retx
        largest_time = 0.0
        congestion_losses = 0
        for rec in lost:
            fi = rec[4]
            if fi == _PROBE:
                self._probe_lost()
                continue  # a lost probe says the path is too narrow, not congested
            largest_time = max(largest_time, rec[1])
            congestion_losses += 1
            if fi >= 0:
                msg: _OutMessage = rec[3]
                if not msg.cancelled and not msg.acked[fi]:
                    retx.append((msg, fi))
            elif rec[3]:
                for item in rec[3]:
                    kind, rid, _ = item
                    if kind == _K_REQUEST:
                        req = self._requests.get(rid)
                        if req is None or req.buf is not None:
                            continue  # finished, or the server evidently has it
                    self._ctrl.append(item)
        if congestion_losses:
            self._cc.on_lost(congestion_losses, largest_time, now)

    def _probe_succeeded(self) -> None:
        if self._dgram < self._dgram_max:
            logger.debug("path to %s carries %d-byte datagrams", self.addr, self._dgram_max)
            self._dgram = self._dgram_max
            self._cc.mss = self._dgram

    def _probe_lost(self) -> None:
        self._probe_tries += 1
        if self._probe_tries < _MAX_PROBES and self._dgram < self._dgram_max:
            self._probe_due = True
        else:
            logger.debug("path to %s: staying at %d-byte datagrams", self.addr, self._dgram)

    def _black_hole(self) -> None:
        """Nothing got through for three probe timeouts after the datagram size grew: the
        path may have narrowed (RFC 8899 §4.3 black-hole detection). Go back to the smallest
        size and send the unacknowledged answers again, cut into smaller fragments: the
        receiver reassembles by byte ranges, so what it already has is simply skipped."""
        logger.debug(
            "no answer from %s at %d bytes: back to %d",
            self.addr,
            self._dgram,
            wire.MIN_DATAGRAM_SIZE,
        )
        self._dgram = wire.MIN_DATAGRAM_SIZE
        self._cc.mss = self._dgram
        self._probe_due = False  # no new probe in this session
        replaced: list[_OutMessage] = []
        for served in self._served.values():
            old = served.msg
            if old is None or old.cancelled or old.size <= self._dgram:
                continue
            if old.n_acked == old.n_frags:
                continue
            old.cancelled = True
            new = _OutMessage(old.rid, old.data, self._dgram)
            served.msg = new
            replaced.append(new)
        if replaced:
            self._queue = deque(replaced + [m for m in self._queue if not m.cancelled])

    def _update_pacer(self, now: float) -> None:
        p = self.ctx.params
        cwnd = self._cc.cwnd
        rate = _PACING_GAIN * cwnd / max(self._rtt.srtt, 1e-6)
        if self._peer_rate and self._peer_rate < rate:
            rate = float(self._peer_rate)
        capacity = max(10 * self._dgram, rate * p.burst_interval)
        capacity = min(capacity, max(cwnd, 2 * self._dgram))
        pacer = self._pacer
        pacer.refill(now)
        pacer.set_rate(rate, capacity)

    def _pto_at(self) -> float:
        p = self.ctx.params
        backoff = 1 << min(self._pto_count, _MAX_PTO_BACKOFF)
        return self._sent.last_sent_time + self._rtt.pto(p.max_ack_delay, p.granularity) * backoff

    def _on_pto(self, now: float) -> None:
        self._pto_count += 1
        if self._pto_count == 3:
            self._cc.on_persistent_congestion(now)
            if self._dgram > wire.MIN_DATAGRAM_SIZE:
                self._black_hole()
            self._update_pacer(now)
        # The probe repeats what the oldest outstanding packet carried (RFC 9002 §6.2.4),
        # without declaring it lost: a fragment, or its control frames, else a PING.
        rec = self._sent.oldest()
        if rec is not None and rec[4] >= 0:
            msg: _OutMessage = rec[3]
            if not msg.cancelled and not msg.acked[rec[4]]:
                self._retx.appendleft((msg, rec[4]))
            else:
                self._ping = True
        elif rec is not None and rec[3]:
            self._ctrl.extendleft(reversed(rec[3]))
        else:
            self._ping = True
        self._probes = 2
        # The probe must not wait for the (old) scheduled send time.
        self._sent.last_sent_time = now

    # ------------------------------------------------------------------ output

    def write(self, now: float, out: list[tuple[bytes, Addr]]) -> None:
        """Append every datagram this session may send now."""
        if self._rebase:
            self._rebase_to(now)
        self._last_now = now
        state = self.state
        if state is State.ESTABLISHED and self._pending:
            self._release_requests(now)
        self._send_now = False
        if state is State.ESTABLISHED:
            budget = self.ctx.params.max_datagrams_per_call
            budget -= self._write_control(now, out, budget)
            if budget > 0 and (self._retx or self._queue):
                budget -= self._write_data(now, out, budget)
            if budget <= 0:
                self._want_write()
            elif self._ctrl or self._ping:
                self._write_control(now, out, budget)
            return
        if state is State.HANDSHAKE or state is State.HALF_OPEN:
            if self._hs_send and self._hs_out is not None:
                self._hs_send = False
                size = len(self._hs_out)
                if not self.validated and self.amp_sent + size > 3 * self.amp_received:
                    return  # anti-amplification (RFC 9000 §8.1)
                self.amp_sent += size
                out.append((self._hs_out, self.addr))
                if state is State.HANDSHAKE:
                    self._hs_resend_at = now + self._hs_timeout
                    self._hs_timeout *= 2
                self.ctx.stats.datagrams_sent += 1
                self.ctx.stats.bytes_sent += size
            return
        if state is State.CLOSING and self._close_frame is not None:
            frame = self._close_frame
            self._close_frame = None
            self._emit(frame, now, out, eliciting=False, items=None)
            if self._closing_at is None:
                p = self.ctx.params
                self._closing_at = now + 3 * self._rtt.pto(p.max_ack_delay, p.granularity)

    def _write_control(self, now: float, out: list[tuple[bytes, Addr]], budget: int) -> int:
        p = self.ctx.params
        ctrl = self._ctrl
        written = 0
        room = self._dgram - _OVERHEAD
        while written < budget:
            ack_due = self._ack_count and (
                self._ack_now
                or self._ack_count >= p.ack_frequency
                or (self._ack_at is not None and now >= self._ack_at)
            )
            if not (ack_due or ctrl or self._ping):
                break
            parts: list[bytes] = []
            used = 0
            if self._ack_unsent or ack_due:
                ack = self._ack_frame(now)
                if ack:
                    parts.append(ack)
                    used = len(ack)
            items: list[tuple[int, int, bytes]] = []
            while ctrl and used + len(ctrl[0][2]) <= room:
                item = ctrl.popleft()
                items.append(item)
                parts.append(item[2])
                used += len(item[2])
            eliciting = bool(items)
            if self._ping and used < room:
                parts.append(_PING_FRAME)
                self._ping = False
                eliciting = True
            if not parts:
                break
            self._emit(b"".join(parts), now, out, eliciting, items)
            written += 1
        if self._probe_due and written < budget:
            # Path MTU probe: a PING padded to the negotiated size; its ACK proves the path.
            self._probe_due = False
            probe = _PING_FRAME + bytes(self._dgram_max - _OVERHEAD - 1)
            self._emit(probe, now, out, eliciting=True, items=None, probe=True)
            written += 1
        return written

    def _ack_frame(self, now: float) -> bytes:
        self._ack_count = 0
        self._ack_at = None
        self._ack_now = False
        self._ack_unsent = False
        if not self._rx_ranges:
            return b""
        ranges = []
        for r in self._rx_ranges.descending():
            ranges.append(r)
            if len(ranges) >= self.ctx.params.ack_ranges:
                break
        delay = int((now - self._rx_largest_time) * 1e6)
        return wire.encode_ack(ranges, max(delay, 0))

    def _emit(
        self,
        payload: bytes,
        now: float,
        out: list[tuple[bytes, Addr]],
        eliciting: bool,
        items: list[tuple[int, int, bytes]] | None,
        probe: bool = False,
    ) -> None:
        key = self._next_tx_key()
        sent = self._sent
        pn = sent.next_pn
        n = len(payload) + _OVERHEAD
        mv = self._tx_mv
        _HDR.pack_into(self._tx_buf, 0, _VERSION, _PKT_DATA, self._tx_phase, self.peer_cid, pn)
        key.aead.encrypt_into(self._tx_nonce, payload, self._tx_aad, mv[16:n])
        out.append((bytes(mv[:n]), self.addr))
        if eliciting:
            sent.on_sent((pn, now, n, items, _PROBE if probe else -1))
            self._last_eliciting = now
        else:
            sent.skip()
        stats = self.ctx.stats
        stats.datagrams_sent += 1
        stats.bytes_sent += n

    def _next_tx_key(self) -> PacketKey:
        key = self._tx_key
        assert key is not None
        self._tx_count += 1
        if (
            self._tx_count > self.ctx.params.key_update_interval
            and self._tx_phase == self._rx_phase
            and self._rx_key is not None
        ):
            key = self._tx_key = key.next()
            self._tx_phase ^= 1
            self._tx_count = 1
            self.key_updates += 1
        return key

    def _write_data(self, now: float, out: list[tuple[bytes, Addr]], budget: int) -> int:
        sent = self._sent
        cc = self._cc
        pacer = self._pacer
        limit = self.ctx.send_limit
        pacer.refill(now)
        if limit is not None:
            limit.refill(now)
        retx = self._retx
        queue = self._queue
        pt = self._pt_buf
        nonce = self._tx_nonce
        aad = self._tx_aad
        tx = self._tx_buf
        addr = self.addr
        size = 0
        body = pt_mv = tx_mv = self._tx_mv
        bytes_sent = 0
        # Local copies of what every packet touches; written back after the loop.
        recs = sent._recs
        pn = sent.next_pn
        in_flight = sent.bytes_in_flight
        cwnd = cc.cwnd
        key_limit = self.ctx.params.key_update_interval
        tx_count = self._tx_count
        key = self._tx_key
        assert key is not None
        aead = key.aead
        peer_cid = self.peer_cid
        stats = self.ctx.stats
        tokens = pacer.tokens
        limit_tokens = limit.tokens if limit is not None else 0.0
        probes = self._probes
        waiting: TokenBucket | None = None  # the bucket that stopped the loop, if one did
        self._pacing_at = None
        written = 0
        _HDR.pack_into(tx, 0, _VERSION, _PKT_DATA, self._tx_phase, peer_cid, 0)
        pack_pn = _PN.pack_into
        pack_tail = _DFR_TAIL.pack_into
        framed: _OutMessage | None = None  # the answer whose frame head is in pt
        retransmitted = 0
        while written < budget:
            if retx:
                msg, fi = retx[0]
                if msg.cancelled or msg.acked[fi]:
                    retx.popleft()
                    continue
                is_retx = True
            elif queue:
                msg = queue[0]
                fi = msg.next_frag
                if msg.cancelled or fi >= msg.n_frags:
                    queue.popleft()
                    continue
                is_retx = False
            else:
                break
            if msg.size != size:
                size = msg.size
                body, pt_mv, tx_mv = self._tx_views_for(size)
            if probes > 0:
                probes -= 1
            else:
                if in_flight + size > cwnd:
                    break
                if tokens < size:
                    waiting = pacer
                    break
                if limit is not None and limit_tokens < size:
                    waiting = limit
                    break
            if is_retx:
                retx.popleft()
                retransmitted += 1
            else:
                msg.next_frag = fi + 1
            tokens -= size
            if limit is not None:
                limit_tokens -= size
            tx_count += 1
            if tx_count > key_limit:
                self._tx_count = tx_count - 1
                aead = self._next_tx_key().aead  # a key update (rare)
                tx_count = self._tx_count
                _HDR.pack_into(tx, 0, _VERSION, _PKT_DATA, self._tx_phase, peer_cid, 0)
            frag = msg.frag
            offset = fi * frag
            length = msg.total - offset
            if length > frag:
                length = frag
            pack_pn(tx, 8, pn)
            if msg is not framed:
                _DFR_HEAD.pack_into(pt, 0, _DATA, msg.rid, msg.total)
                framed = msg
            pack_tail(pt, _DFR_HEAD_SIZE, offset, length)
            end = _DFR_SIZE + length
            pt[_DFR_SIZE:end] = msg.data[offset : offset + length]
            if length < frag:
                # PADDING keeps every data packet of an answer one size (GSO runs).
                pt[end : _DFR_SIZE + frag] = bytes(frag - length)
            aead.encrypt_into(nonce, pt_mv, aad, body)
            out.append((bytes(tx_mv), addr))
            recs.append((pn, now, size, msg, fi))  # SentPackets.on_sent, inlined
            pn += 1
            in_flight += size
            written += 1
            bytes_sent += size
        self._tx_count = tx_count
        self._probes = probes
        pacer.tokens = tokens
        if limit is not None:
            limit.tokens = limit_tokens
        if waiting is pacer:
            self._pacing_at = pacer.ready_at(min(pacer.capacity, 4 * size))
        elif waiting is not None:
            self._pacing_at = waiting.ready_at(size)
        if written:
            sent.bytes_in_flight = in_flight
            sent.in_flight += written
            sent.last_sent_time = now
            self._last_eliciting = now
            stats.datagrams_sent += written
            stats.bytes_sent += bytes_sent
            stats.fragments_retransmitted += retransmitted
        return written

    # ------------------------------------------------------------------ timers

    def next_timer(self) -> float | None:
        """The earliest deadline of this session (absolute, on the caller's clock)."""
        state = self.state
        if state is State.ESTABLISHED:
            p = self.ctx.params
            t = self._last_recv + p.idle_timeout
            sent = self._sent
            if sent.in_flight:
                lt = sent.loss_time
                t = min(t, lt if lt is not None else self._pto_at())
            else:
                t = min(t, self._last_eliciting + p.keepalive_interval)
            if self._ack_count and self._ack_at is not None:
                t = min(t, self._ack_at)
            if self._pacing_at is not None:
                t = min(t, self._pacing_at)
            if self._request_check_at is not None:
                t = min(t, self._request_check_at)
            if self._release_at is not None:
                t = min(t, self._release_at)
            if self._send_now or self._ctrl or self._ping or self._ack_now:
                t = min(t, self._last_now)
            return t
        if state is State.HANDSHAKE:
            if self._send_now or self._hs_send:
                return self._last_now
            return min(self._hs_resend_at, self._hs_deadline)
        if state is State.HALF_OPEN:
            if self._hs_send:
                return self._last_now
            return self._hs_deadline
        if state is State.CLOSING:
            if self._close_frame is not None or self._closing_at is None:
                return self._last_now
            return self._closing_at
        return None

    def on_timer(self, now: float) -> None:
        """Run every deadline that has passed."""
        if self._rebase:
            self._rebase_to(now)
        self._last_now = now
        state = self.state
        p = self.ctx.params
        if state is State.ESTABLISHED:
            if now >= self._last_recv + p.idle_timeout:
                self.close(CloseReason.PEER_GONE, send=False)
                return
            sent = self._sent
            if sent.in_flight:
                if sent.loss_time is not None:
                    if now >= sent.loss_time:
                        self._detect_lost(now)
                elif now >= self._pto_at():
                    self._on_pto(now)
            elif now >= self._last_eliciting + p.keepalive_interval:
                self._ping = True
            if self._request_check_at is not None and now >= self._request_check_at:
                self._check_requests(now)
            if self._release_at is not None and now >= self._release_at:
                self._release_requests(now)
            return
        if state is State.HANDSHAKE:
            if now >= self._hs_deadline:
                self.close(CloseReason.HANDSHAKE_TIMEOUT, send=False)
            elif now >= self._hs_resend_at:
                self._hs_send = True
            return
        if state is State.HALF_OPEN:
            if now >= self._hs_deadline:
                self.close(CloseReason.HANDSHAKE_TIMEOUT, send=False)
            return
        if state is State.CLOSING and self._closing_at is not None and now >= self._closing_at:
            self._set_closed()

    def _rebase_to(self, now: float) -> None:
        self._rebase = False
        self.created = now
        self._hs_resend_at = now
        self._hs_deadline = now + self.ctx.params.idle_timeout

    # ------------------------------------------------------------------ closing

    def close(self, reason: CloseReason, send: bool = True) -> None:
        """End the session: fail its requests, emit ``SessionClosed``, send CLOSE if asked."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        was_established = self.state is State.ESTABLISHED
        self.close_reason = reason
        events = self.ctx.events
        for req in list(self._requests.values()):
            self.ctx.handles.pop(req.handle, None)
            events.append(RequestFailed(req.handle, self.peer, self.folder, FailReason.PEER_GONE))
        self._requests.clear()
        self._pending.clear()
        self.ctx.credit_waiters.pop(self, None)
        self.ctx.release_credit(self._credit_used)
        self._credit_used = 0
        for served in self._served.values():
            if served.msg is None:
                self.ctx.handles.pop(served.handle, None)
                assert self.peer is not None
                events.append(RequestCancelled(served.handle, self.peer, self.folder))
        self._served.clear()
        self.ctx.serving_bytes -= self._serving_bytes
        self._serving_bytes = self._serving_manifests = 0
        self._queue.clear()
        self._retx.clear()
        self._ctrl.clear()
        self._sent.drain()
        if was_established or self.owes_result:
            self.owes_result = False
            events.append(
                SessionClosed(
                    self.peer if was_established else None, self.folder, self.addr, reason
                )
            )
        if send and was_established:
            code = min(int(reason), int(wire.CloseCode.INTERNAL))
            self._close_frame = bytes((_CLOSE, code))
            self._close_code = code
            self.state = State.CLOSING
            self.ctx.on_detached(self)  # a new connect() to this peer may start at once
            self._closing_at = None  # set when the CLOSE frame goes out
            self._want_write()
        else:
            self._set_closed()

    def _close_frame_resend(self) -> None:
        self._close_frame = bytes((_CLOSE, self._close_code))
        self._want_write()

    def _set_closed(self) -> None:
        self.state = State.CLOSED
        self.ctx.on_closed(self)

    # ------------------------------------------------------------------ misc

    def _queue_ctrl(self, kind: int, rid: int, frame: bytes) -> None:
        self._ctrl.append((kind, rid, frame))
        self._want_write()

    def wake(self) -> None:
        """Ask for a write soon (credit became available)."""
        self._want_write()

    def _want_write(self) -> None:
        self._send_now = True
        self.ctx.dirty[self] = None

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def datagram_size(self) -> int:
        return self._dgram

    def info(self) -> SessionInfo:
        """A snapshot for status displays and tests."""
        rtt = self._rtt
        return SessionInfo(
            state=self.state.name,
            srtt=rtt.srtt,
            rttvar=rtt.rttvar,
            min_rtt=rtt.min_rtt,
            cwnd=self._cc.cwnd,
            bytes_in_flight=self._sent.bytes_in_flight,
            congestion_events=self._cc.congestion_events,
            requests=len(self._requests),
            pending_requests=len(self._pending),
            serving=len(self._served),
            credit_used=self._credit_used,
            datagram_size=self._dgram,
            pto_count=self._pto_count,
            key_updates=self.key_updates,
            background=self.background,
        )
