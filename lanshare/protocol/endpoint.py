"""The sans-IO endpoint: every session of one UDP socket, demultiplexed by connection id.

Pure: no sockets, clock or files. The transport adapter feeds it datagrams and timer expiries
with the caller's monotonic ``now`` and sends what ``datagrams_to_send`` returns; the
application issues commands (``connect``, ``request_block``, ``send_block`` ...) and reads
events with ``next_event``. See ``connection.py`` for the theory of operation,
``admission.py`` for what an INITIAL from a stranger may cost (``_on_initial`` applies it)
and docs/protocol.md for the wire format.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from lanshare.errors import DecodeError, LocalProtocolError
from lanshare.events import (
    Addr,
    CloseReason,
    Event,
    FailReason,
    FolderId,
    PeerId,
    RequestFailed,
    SessionClosed,
)
from lanshare.hashes import BY_NAME as HASH_ALGORITHMS
from lanshare.protocol import wire
from lanshare.protocol.admission import (
    MAX_SOURCES,
    RETRY_LOAD,
    HalfOpen,
    ReplayCache,
    TrialBudget,
)
from lanshare.protocol.congestion import TokenBucket
from lanshare.protocol.connection import (
    Context,
    EndpointStats,
    Params,
    Session,
    SessionInfo,
    State,
)
from lanshare.protocol.crypto import ResponderKeys, RetryTokens
from lanshare.strikes import ban_key

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Iterable, Mapping, Sequence

    from lanshare.config import NetworkConfig, TransferConfig

logger = logging.getLogger(__name__)

_LONG = wire.LONG_HEADER
_SHORT = wire.SHORT_HEADER
_VERSION = wire.VERSION
_T_DATA = wire.PacketType.DATA
_T_INITIAL = wire.PacketType.INITIAL
_T_RESPONSE = wire.PacketType.RESPONSE
_T_RETRY = wire.PacketType.RETRY
_MIN_DATA = wire.DATA_OVERHEAD + 1
_RATE_BURST = 0.05  # seconds of max_send_rate/max_recv_rate a bucket may hold


class Endpoint:
    """All sessions of one UDP socket (the object the adapter drives).

    Args:
        transfer: timeouts, initial RTT and flow-control credit (``max_in_flight_size``).
        network: ``max_datagram_size``, ``max_send_rate``, ``max_recv_rate``.
        node_id: our 8-byte node id.
        folders: folder id (16 bytes) -> session PSK (32 bytes, ``keys.session_psk``) for
            every folder we accept sessions for.
        rng: randomness for ephemeral keys, connection ids and secrets: ``random.SystemRandom()``
            in production, a seeded ``random.Random`` in tests.
        max_ack_delay: longest we delay an ACK (seconds).
        ack_frequency: ack-eliciting packets received before an ACK is sent at once.
        timer_granularity: smallest loss/probe timer (RFC 9002 kGranularity).
        key_update_interval: packets sent under one key before it is updated (AES-GCM limit).
        max_block_size: largest block requested or served.
        max_manifest_size: largest manifest batch answered.
        loss_threshold: share of a round's packets that must be lost to signal congestion.
        burst_interval: seconds of the pacing rate a burst may hold (covers timer slack).
        max_datagrams_per_call: datagrams one session emits per ``datagrams_to_send``.
        ack_ranges: most ranges in one ACK frame.
        max_sessions: sessions (of every state) kept at once.
        max_half_open: half-open responder sessions kept at once (at most half of
            ``max_sessions``); beyond it INITIALs must carry a token, and one more evicts the
            oldest of the source holding the most (``admission``).
        always_retry: demand a retry token (address validation) before any handshake.
        max_total_in_flight: answers outstanding over all sessions together (what the socket
            buffer must hold); default ``max_in_flight_size``.
        max_serving_size: bytes of a peer's requests one session holds at once (answers are
            kept until acknowledged); default 4x ``max_in_flight_size``, what an honest peer
            with our credit may have us hold.
        max_total_serving: the same over all sessions; default 32x ``max_in_flight_size``.
        pmtu_probe: start data at 1200-byte datagrams and grow to the negotiated size only
            once a padded probe got through; False uses the negotiated size at once.
        background: yield to other traffic (LEDBAT, RFC 6817) in both directions: our
            answers, and answers to us (peers are asked to in the handshake).
        background_target: queueing delay (seconds) background mode keeps below.
    """

    def __init__(
        self,
        transfer: TransferConfig,
        network: NetworkConfig,
        *,
        node_id: bytes,
        folders: Mapping[bytes, bytes],
        rng: random.Random,
        max_ack_delay: float = 0.002,
        ack_frequency: int = 10,
        timer_granularity: float = 0.001,
        key_update_interval: int = 1 << 23,
        max_block_size: int = 16 * 1024 * 1024,
        max_manifest_size: int = 4 * 1024 * 1024,
        loss_threshold: float = 0.05,
        burst_interval: float = 0.002,
        max_datagrams_per_call: int = 256,
        ack_ranges: int = 32,
        max_sessions: int = 256,
        max_half_open: int = 64,
        always_retry: bool = False,
        max_total_in_flight: int | None = None,
        max_serving_size: int | None = None,
        max_total_serving: int | None = None,
        pmtu_probe: bool = True,
        background: bool = False,
        background_target: float = 0.01,
    ) -> None:
        if len(node_id) != wire.NODE_ID_SIZE:
            raise LocalProtocolError("node id must be 8 bytes")
        dgram = max(wire.MIN_DATAGRAM_SIZE, min(network.max_datagram_size, wire.MAX_DATAGRAM_SIZE))
        self.params = Params(
            keepalive_interval=transfer.keepalive_interval,
            idle_timeout=transfer.idle_timeout,
            request_timeout=transfer.request_timeout,
            initial_rtt=transfer.initial_rtt,
            max_in_flight_size=max(transfer.max_in_flight_size, dgram),
            max_total_in_flight=max(max_total_in_flight or transfer.max_in_flight_size, dgram),
            max_serving_size=max_serving_size or 4 * max(transfer.max_in_flight_size, dgram),
            max_total_serving=max_total_serving or 32 * max(transfer.max_in_flight_size, dgram),
            max_datagram_size=dgram,
            max_recv_rate=network.max_recv_rate,
            max_ack_delay=max_ack_delay,
            ack_frequency=ack_frequency,
            granularity=timer_granularity,
            key_update_interval=key_update_interval,
            max_block_size=max_block_size,
            max_manifest_size=max_manifest_size,
            loss_threshold=loss_threshold,
            burst_interval=burst_interval,
            max_datagrams_per_call=max_datagrams_per_call,
            ack_ranges=max(1, min(ack_ranges, wire.MAX_ACK_RANGES)),
            pmtu_probe=pmtu_probe,
            background=background,
            background_target=background_target,
        )
        send_limit = recv_limit = None
        if network.max_send_rate > 0:
            rate = network.max_send_rate
            send_limit = TokenBucket(rate, max(rate * _RATE_BURST, 2 * dgram))
        if network.max_recv_rate > 0:
            rate = network.max_recv_rate
            recv_limit = TokenBucket(rate, max(rate * _RATE_BURST, 1.0))
        self.node_id = bytes(node_id)
        self._ctx = Context(self.params, self.node_id, rng, send_limit, recv_limit)
        self._ctx.on_closed = self._on_closed
        self._ctx.on_detached = self._detach
        self._ctx.on_established = self._on_established
        self._rng = rng
        self._folders: dict[bytes, bytes] = {}
        self._keys: ResponderKeys[bytes] = ResponderKeys(())
        self.set_folders(folders)
        self._tokens = RetryTokens(rng.randbytes(32))
        self._max_sessions = max_sessions
        # Half-open sessions never take more than half the table: the rest stays for
        # established sessions and our own connects, whatever strangers send.
        self._half_open: HalfOpen[Session] = HalfOpen(max(1, min(max_half_open, max_sessions // 2)))
        # A half-open session lives until its handshake deadline: so long a replay of the
        # INITIAL that opened it must be recognised.
        self._replays = ReplayCache(self.params.idle_timeout)
        self._budget = TrialBudget()
        self._sources_by_host: dict[str, str] = {}
        self._always_retry = always_retry
        self._sessions: dict[int, Session] = {}
        self._by_addr: dict[tuple[Addr, bytes], Session] = {}
        self._by_peer: dict[tuple[bytes, bytes], Session] = {}
        self._by_initial: dict[tuple[Addr, int], Session] = {}
        self._stateless: list[tuple[bytes, Addr]] = []
        self._now = 0.0
        # Deadlines of the sessions, recomputed only for sessions that changed ("stale"):
        # with many idle peers, each adapter round costs O(active sessions), not O(all).
        self._timers: dict[Session, float] = {}
        self._stale: dict[Session, None] = {}

    # ------------------------------------------------------------------ adapter interface

    def receive_datagram(self, data: bytes | memoryview, addr: Addr, now: float) -> None:
        """Handle one received datagram (``receive_datagrams`` with one)."""
        self.receive_datagrams((data,), addr, now)

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        """Handle datagrams received together from ``addr`` (e.g. one GRO batch), in order.
        Never raises: bad input is dropped and counted.

        Each may be a memoryview into the adapter's receive buffer: nothing keeps a reference
        to one after the call returns. A run of in-order DATA packets for one session costs
        one call into that session (``Session.on_data_run``), not one per datagram.
        """
        self._now = now
        stats = self._ctx.stats
        count = len(datagrams)
        stats.datagrams_received += count
        stats.bytes_received += sum(map(len, datagrams))
        sessions = self._sessions
        dirty = self._ctx.dirty
        i = 0
        while i < count:
            data = datagrams[i]
            n = len(data)
            i += 1
            if n < wire.LONG_HEADER_SIZE or data[0] != _VERSION:
                stats.dropped += 1
                continue
            ptype = data[1]
            try:
                if ptype == _T_DATA:
                    if n < _MIN_DATA:
                        stats.dropped += 1
                        continue
                    _, _, flags, cid, pn = _SHORT.unpack_from(data)
                    session = sessions.get(cid)
                    if session is None or session.addr != addr:
                        stats.dropped += 1
                        continue
                    j = session.on_data_run(datagrams, i - 1, now)
                    if j < i:  # not the next full packet: the general path
                        session.on_data_packet(data, flags, pn, now)
                    else:
                        i = j
                    dirty[session] = None
                else:
                    self._on_handshake_datagram(data, ptype, addr, now)
            except (DecodeError, struct.error) as exc:
                logger.debug("dropped datagram from %s: %s", addr, exc)
                stats.dropped += 1

    def _on_handshake_datagram(
        self, data: bytes | memoryview, ptype: int, addr: Addr, now: float
    ) -> None:
        stats = self._ctx.stats
        n = len(data)
        if ptype == _T_INITIAL:
            self._on_initial(data, addr, now)
        elif ptype in (_T_RESPONSE, _T_RETRY):
            _, _, token_len, cid = _LONG.unpack_from(data)
            session = self._sessions.get(cid)
            if session is None or session.addr != addr:
                stats.dropped += 1
                return
            self._ctx.dirty[session] = None
            if ptype == _T_RESPONSE:
                session.on_response(bytes(data[wire.LONG_HEADER_SIZE :]), now)
            elif token_len == n - wire.LONG_HEADER_SIZE and token_len <= wire.MAX_TOKEN_SIZE:
                session.on_retry(bytes(data[wire.LONG_HEADER_SIZE :]), now)
            else:
                stats.dropped += 1
        else:
            stats.dropped += 1

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        """Every datagram due now; those to one address come out consecutively, and full
        DATA packets all have the session's datagram size (ready for one GSO send)."""
        self._now = now
        out = self._stateless
        self._stateless = []
        dirty = self._ctx.dirty
        if dirty:
            todo = list(dirty)
            dirty.clear()  # a session that could not send everything marks itself again
            self._stale.update(dict.fromkeys(todo))
            for session in todo:
                if session.state is not State.CLOSED:
                    session.write(now, out)
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline (caller's clock) at which ``handle_timer`` must run."""
        self._refresh_timers()
        timers = self._timers
        return min(timers.values()) if timers else None

    def handle_timer(self, now: float) -> None:
        """Run every deadline that has passed (call ``datagrams_to_send`` afterwards)."""
        self._now = now
        self._refresh_timers()
        due = [session for session, t in self._timers.items() if t <= now]
        dirty = self._ctx.dirty
        for session in due:
            session.on_timer(now)
            if session.state is not State.CLOSED:
                dirty[session] = None
        self._stale.update(dict.fromkeys(due))

    def next_event(self) -> Event | None:
        """The next event for the application, or None."""
        events = self._ctx.events
        return events.popleft() if events else None

    # ------------------------------------------------------------------ commands

    def connect(self, addr: Addr, folder: bytes) -> None:
        """Open a session to ``addr`` for ``folder`` unless one exists (or is being opened).

        The result is a ``SessionEstablished`` for that address and folder (initiated by either
        side: simultaneous handshakes collapse into one) or a ``SessionClosed`` with ``peer``
        None. Raises ``LocalProtocolError`` for a folder we have no key for.
        """
        psk = self._folders.get(bytes(folder))
        if psk is None:
            raise LocalProtocolError("connect() for a folder without a key")
        key = (addr, bytes(folder))
        if key in self._by_addr:
            return
        if len(self._sessions) >= self._max_sessions and not self._evict_half_open():
            self._ctx.events.append(
                SessionClosed(None, FolderId(bytes(folder)), addr, CloseReason.INTERNAL)
            )
            return
        session = Session.initiator(self._ctx, addr, bytes(folder), psk, self._new_cid(), self._now)
        self._sessions[session.local_cid] = session
        self._by_addr[key] = session
        self._ctx.dirty[session] = None

    def request_block(
        self,
        peer: bytes,
        folder: bytes,
        *,
        path: str,
        index: int,
        offset: int,
        size: int,
        hash: bytes,
        hash_algo: str = "sha256",
    ) -> int:
        """Ask ``peer`` for a block; return the request id of its ``BlockReceived`` or
        ``RequestFailed``. The data is checked against ``hash`` with ``hashlib`` before it is
        delivered. Raises ``LocalProtocolError`` for arguments no peer could serve."""
        if not 0 <= size <= self.params.max_block_size:
            raise LocalProtocolError(f"block size {size} out of range")
        if len(path.encode("utf-8")) > wire.MAX_PATH_SIZE:
            raise LocalProtocolError("path too long for a request")
        algo = HASH_ALGORITHMS.get(hash_algo)
        if algo is None:
            raise LocalProtocolError(f"unsupported hash algorithm {hash_algo!r}")
        if len(hash) != algo.digest_size:
            raise LocalProtocolError("hash length does not match its algorithm")
        if not (0 <= index < 1 << 32 and 0 <= offset < 1 << 64):
            raise LocalProtocolError("block index or offset out of range")
        digest = bytes(hash)

        def frame_of(rid: int) -> bytes:
            return wire.encode_frame(
                wire.RequestBlock(rid, path, index, offset, size, hash_algo, digest)
            )

        return self._add_request(peer, folder, True, size, frame_of, digest, hash_algo)

    def request_manifest(
        self,
        peer: bytes,
        folder: bytes,
        since_seq: int,
        *,
        max_size: int | None = None,
    ) -> int:
        """Ask ``peer`` for manifest records with sequence > ``since_seq``; one bounded batch
        comes back as ``ManifestReceived`` (``more`` says whether to ask again).

        ``max_size`` bounds the encoded batch (default: a quarter of ``max_in_flight_size``,
        at most ``max_manifest_size``); the peer may answer with less.
        """
        p = self.params
        if max_size is None:
            # A batch reserves its size of the flow-control credit until it arrives: leave
            # three quarters of it for blocks.
            max_size = min(p.max_manifest_size, max(64 * 1024, p.max_in_flight_size // 4))
        limit = max(wire.manifest_batch_size([]), min(max_size, p.max_in_flight_size))
        if not 0 <= since_seq < 1 << 64:
            raise LocalProtocolError("since_seq out of range")

        def frame_of(rid: int) -> bytes:
            return wire.encode_frame(wire.RequestManifest(rid, since_seq, limit))

        return self._add_request(peer, folder, False, limit, frame_of, b"", "")

    def cancel(self, request_id: int) -> None:
        """Withdraw one of our requests (no event follows); unknown ids are ignored."""
        entry = self._ctx.handles.get(request_id)
        if entry is None or not entry[2]:
            return
        session, rid, _ = entry
        session.cancel_request(rid)

    def send_block(self, request_id: int, data: bytes | bytearray | memoryview) -> bool:
        """Answer a ``BlockRequested``. Returns False when the request is gone (cancelled,
        session closed). Raises ``LocalProtocolError`` when ``data`` has the wrong size.

        ``data`` is referenced, not copied, until every fragment is acknowledged: do not
        modify it afterwards (a changed retransmission fails the peer's hash check)."""
        return self._answer(request_id, data)

    def send_manifest(self, request_id: int, records: Iterable[bytes], more: bool) -> bool:
        """Answer a ``ManifestRequested`` with opaque encoded records. Returns False when the
        request is gone. Raises ``LocalProtocolError`` when the batch exceeds ``max_size``."""
        return self._answer(request_id, wire.encode_manifest_batch(list(records), more))

    def reject(self, request_id: int, reason: FailReason = FailReason.NOT_FOUND) -> bool:
        """Decline a ``BlockRequested``/``ManifestRequested``; the peer gets ``RequestFailed``."""
        entry = self._ctx.handles.get(request_id)
        if entry is None or entry[2]:
            return False
        codes = {
            FailReason.NOT_FOUND: wire.RejectCode.NOT_FOUND,
            FailReason.BUSY: wire.RejectCode.BUSY,
        }
        entry[0].reject(entry[1], codes.get(reason, wire.RejectCode.REFUSED))
        return True

    def notify(self, peer: bytes, folder: bytes, seq: int, have: Iterable[bytes] = ()) -> bool:
        """Push "my sequence is now ``seq``" and optionally "I now have blocks ``have``".
        Returns False when there is no session with that peer for that folder."""
        session = self._by_peer.get((bytes(peer), bytes(folder)))
        if session is None or not session.established:
            return False
        hashes = tuple(bytes(h) for h in have)
        if any(len(h) != len(hashes[0]) or len(h) > wire.MAX_HASH_SIZE for h in hashes):
            raise LocalProtocolError("have-hashes must share one length of at most 64 bytes")
        if not 0 <= seq < 1 << 64:
            raise LocalProtocolError("seq out of range")
        session.notify(seq, hashes)
        return True

    def close(self, peer: bytes | None = None, folder: bytes | None = None) -> None:
        """Close the sessions with ``peer`` (and ``folder``), or every session."""
        for session in list(self._sessions.values()):
            if peer is not None and session.peer != peer:
                continue
            if folder is not None and session.folder != folder:
                continue
            session.close(CloseReason.CLOSED)

    def set_folders(self, folders: Mapping[bytes, bytes]) -> None:
        """Replace the accepted folders (existing sessions stay up)."""
        for folder_id, psk in folders.items():
            if len(folder_id) != wire.FOLDER_ID_SIZE or len(psk) != wire.KEY_SIZE:
                raise LocalProtocolError("folder ids are 16 bytes and PSKs 32 bytes")
        self._folders = {bytes(k): bytes(v) for k, v in folders.items()}
        self._keys = ResponderKeys(self._folders.items())

    # ------------------------------------------------------------------ inspection

    @property
    def stats(self) -> EndpointStats:
        return self._ctx.stats

    def peers(self) -> list[tuple[PeerId, FolderId, Addr]]:
        """Every established session as (peer, folder, address)."""
        return [
            (s.peer, s.folder, s.addr)
            for s in self._sessions.values()
            if s.established and s.peer is not None
        ]

    def session_info(self, peer: bytes, folder: bytes) -> SessionInfo | None:
        """RTT, window, requests and credit of the session with ``peer`` for ``folder``."""
        session = self._by_peer.get((bytes(peer), bytes(folder)))
        return None if session is None else session.info()

    # ------------------------------------------------------------------ internals

    def _add_request(
        self,
        peer: bytes,
        folder: bytes,
        block: bool,
        size: int,
        frame_of: Callable[[int], bytes],
        digest: bytes,
        algo: str,
    ) -> int:
        handle = self._ctx.new_handle()
        session = self._by_peer.get((bytes(peer), bytes(folder)))
        if session is None or not session.established:
            self._ctx.events.append(
                RequestFailed(
                    handle, PeerId(bytes(peer)), FolderId(bytes(folder)), FailReason.PEER_GONE
                )
            )
            return handle
        session.add_request(handle, block, size, frame_of, digest, algo)
        return handle

    def _answer(self, request_id: int, data: bytes | bytearray | memoryview) -> bool:
        entry = self._ctx.handles.get(request_id)
        if entry is None or entry[2]:
            return False
        session, rid, _ = entry
        session.answer(rid, data)
        return True

    def _on_initial(self, data: bytes | memoryview, addr: Addr, now: float) -> None:
        """An INITIAL: the only packet a stranger can make us work for (``admission``).

        Cheapest checks first: a repeat of a known INITIAL, a replay of one that opened a
        session elsewhere, whether it could be paid for at all, the token; then the load
        decides on a stateless RETRY, the budgets on whether the key trials are paid, and
        the half-open bounds on which half-open session makes room for a new one."""
        stats = self._ctx.stats
        n = len(data)
        if n < wire.INITIAL_SIZE:
            stats.dropped += 1  # unpadded: answering could amplify
            return
        _, _, token_len, src_cid = _LONG.unpack_from(data)
        body = wire.LONG_HEADER_SIZE + token_len
        if token_len > wire.MAX_TOKEN_SIZE or body + wire.KEY_SIZE + wire.TAG_SIZE > n:
            stats.dropped += 1
            return
        ephemeral = bytes(data[body : body + wire.KEY_SIZE])
        origin = (addr, src_cid)
        existing = self._by_initial.get(origin)
        if existing is not None:
            if existing.remote_ephemeral == ephemeral:
                existing.on_duplicate_initial(n)
            return
        if self._replays.is_replay(ephemeral, origin, now):
            stats.initials_replayed += 1
            return
        trials = len(self._keys)
        load = self._budget.demand(trials, now)
        source = self._source(addr)
        validated = False
        if token_len:
            # The token costs a MAC to check: not for an INITIAL that could not be paid for.
            if not self._budget.affordable(source, trials, now):
                stats.initials_shed += 1
                return
            # A bad token is treated as none (RFC 9000 §8.1.3): dropping the INITIAL would
            # let anyone who saw our peer's cid end its handshake with one forged RETRY
            # (the initiator takes only one, and repeats the token it got).
            token = bytes(data[wire.LONG_HEADER_SIZE : body])
            validated = self._tokens.check(token, addr, src_cid, now)
        if not validated and (
            self._always_retry or len(self._half_open) >= self._half_open.limit or load > RETRY_LOAD
        ):
            retry_token = self._tokens.issue(addr, src_cid, now)
            self._stateless.append(
                (_LONG.pack(_VERSION, _T_RETRY, len(retry_token), src_cid) + retry_token, addr)
            )
            stats.retries_sent += 1
            stats.datagrams_sent += 1
            return
        if not self._budget.take(source, trials, now):
            stats.initials_shed += 1
            return
        stats.key_trials += trials
        hs = self._keys.read_message1(bytes(data[body:]))
        if hs is None:
            stats.handshakes_failed += 1
            return
        try:
            initial = wire.decode_initial_payload(hs.payload)
        except DecodeError:
            stats.handshakes_failed += 1
            return
        if (
            initial.folder_id != hs.key_id
            or initial.cid != src_cid
            or initial.node_id == self.node_id
        ):
            stats.handshakes_failed += 1
            return
        key = (addr, initial.folder_id)
        current = self._by_addr.get(key)
        owes = False
        if current is not None and current.state is State.HANDSHAKE:
            # Both sides opened at once: the handshake of the smaller node id wins.
            if self.node_id < initial.node_id:
                return
            current.abandon()
            owes = True
            current = None
        victim = self._half_open.victim(source)
        if victim is not None:
            self._evict(victim)
        if len(self._sessions) >= self._max_sessions and not self._evict_half_open():
            stats.dropped += 1
            return
        self._replays.add(ephemeral, origin, now)
        session = Session.responder(self._ctx, addr, hs, initial, self._new_cid(), validated, now)
        session.amp_received = n
        session.owes_result = owes
        session.initial_key = origin
        self._sessions[session.local_cid] = session
        self._by_initial[origin] = session
        self._half_open.add(session, source)
        self._ctx.dirty[session] = None
        if current is None or not current.established:
            self._by_addr[key] = session

    def _source(self, addr: Addr) -> str:
        """``ban_key`` of ``addr``, remembered: parsing an address costs more than the rest
        of a shed INITIAL."""
        sources = self._sources_by_host
        source = sources.get(addr[0])
        if source is None:
            if len(sources) >= MAX_SOURCES:
                sources.clear()  # spoofed hosts by the thousand: start again, bounded
            source = sources[addr[0]] = ban_key(addr)
        return source

    def _evict_half_open(self) -> bool:
        """Make room in a full session table: evict the oldest half-open session of the
        source holding the most; False when there is none."""
        victim = self._half_open.oldest_of_busiest()
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _evict(self, session: Session) -> None:
        self._ctx.stats.half_open_evicted += 1
        session.close(CloseReason.HANDSHAKE_TIMEOUT, send=False)

    def _on_established(self, session: Session) -> None:
        assert session.peer is not None
        self._half_open.discard(session)
        self._budget.mark_good(self._source(session.addr))
        key = (bytes(session.peer), bytes(session.folder))
        old = self._by_peer.get(key)
        if old is not None and old is not session:
            old.close(CloseReason.REPLACED)
        addr_key = (session.addr, bytes(session.folder))
        other = self._by_addr.get(addr_key)
        if other is not None and other is not session and other.established:
            other.close(CloseReason.REPLACED)
        self._by_peer[key] = session
        self._by_addr[addr_key] = session

    def _on_closed(self, session: Session) -> None:
        self._sessions.pop(session.local_cid, None)
        self._half_open.discard(session)
        self._timers.pop(session, None)
        self._stale.pop(session, None)
        self._ctx.dirty.pop(session, None)
        self._detach(session)

    def _refresh_timers(self) -> None:
        stale = self._stale
        stale.update(self._ctx.dirty)
        if not stale:
            return
        timers = self._timers
        for session in stale:
            t = session.next_timer() if session.state is not State.CLOSED else None
            if t is None:
                timers.pop(session, None)
            else:
                timers[session] = t
        stale.clear()

    def _detach(self, session: Session) -> None:
        """Forget ``session`` as the one for its address, peer and INITIAL (it is closing;
        its connection id still routes stray packets to it until it is closed)."""
        addr_key = (session.addr, bytes(session.folder))
        if self._by_addr.get(addr_key) is session:
            del self._by_addr[addr_key]
        if session.peer is not None:
            key = (bytes(session.peer), bytes(session.folder))
            if self._by_peer.get(key) is session:
                del self._by_peer[key]
        if session.initial_key is not None and self._by_initial.get(session.initial_key) is session:
            del self._by_initial[session.initial_key]

    def _new_cid(self) -> int:
        for _ in range(64):
            cid = self._rng.getrandbits(32)
            if cid not in self._sessions:
                return cid
        raise LocalProtocolError("no free connection id")  # pragma: no cover
