"""Scripted protocol cases with explicit times: each step asserts timers, datagrams, events."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from lanshare.config import NetworkConfig, TransferConfig
from lanshare.errors import LocalProtocolError
from lanshare.events import (
    BlockReceived,
    BlockRequested,
    CloseReason,
    Event,
    FailReason,
    ManifestReceived,
    ManifestRequested,
    NotificationReceived,
    PeerId,
    RequestCancelled,
    RequestFailed,
    SessionClosed,
    SessionEstablished,
)
from lanshare.protocol import Endpoint, wire
from tests.sim import FOLDER, PSK, Link, Network, Node, make_endpoint

A = ("10.0.0.1", 4000)  # serves
B = ("10.0.0.2", 4000)  # requests
A_ID = PeerId(b"A" * 8)
B_ID = PeerId(b"B" * 8)
DELAY = 0.010  # one-way
FRAG = wire.fragment_size(1452)  # 1405 bytes of block per DATA packet
BLOCK = bytes(range(256)) * 11 + b"x" * 4  # 2820 bytes: 3 fragments (1405, 1405, 10)
BLOCK_HASH = hashlib.sha256(BLOCK).digest()


class Pair:
    """Two endpoints and a clock; datagrams move only when a step says so."""

    def __init__(self, transfer: TransferConfig | None = None, **knobs: object) -> None:
        # Scripted steps count every datagram: no path MTU probe (tested on its own below).
        knobs.setdefault("pmtu_probe", False)
        self.a = make_endpoint(1, A_ID, transfer=transfer, **knobs)  # type: ignore[arg-type]
        self.b = make_endpoint(2, B_ID, transfer=transfer, **knobs)  # type: ignore[arg-type]
        self.now = 100.0
        self.a_events: list[Event] = []
        self.b_events: list[Event] = []

    def out(self, ep: Endpoint) -> list[bytes]:
        return [data for data, _ in ep.datagrams_to_send(self.now)]

    def to_a(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.a.receive_datagram(data, B, self.now)
        self.a_events += _drain(self.a)

    def to_b(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            self.b.receive_datagram(data, A, self.now)
        self.b_events += _drain(self.b)

    def fire(self, ep: Endpoint) -> list[bytes]:
        """Jump to ``ep``'s timer, run it, and return what it sends."""
        timer = ep.get_timer()
        assert timer is not None
        self.now = max(self.now, timer)
        ep.handle_timer(self.now)
        sent = self.out(ep)
        (self.a_events if ep is self.a else self.b_events).extend(_drain(ep))
        return sent

    def establish(self) -> None:
        self.b.connect(A, FOLDER)
        assert self.b.get_timer() == 0.0  # something to send: "now"
        initial = self.out(self.b)
        assert [len(d) for d in initial] == [wire.INITIAL_SIZE]
        self.now += DELAY
        self.to_a(initial)
        response = self.out(self.a)
        assert len(response) == 1
        assert len(response[0]) <= 3 * wire.INITIAL_SIZE
        assert self.a_events == []  # half-open until B proves its address
        self.now += DELAY
        self.to_b(response)
        assert self.b_events == [SessionEstablished(A_ID, FOLDER, A, initiator=True)]
        confirm = self.out(self.b)
        assert len(confirm) == 1  # the PING that validates B's address
        self.now += DELAY
        self.to_a(confirm)
        assert self.a_events == [SessionEstablished(B_ID, FOLDER, B, initiator=False)]
        # A acks the PING after max_ack_delay; B gets its first RTT sample.
        assert self.a.get_timer() == pytest.approx(self.now + 0.002)
        ack = self.fire(self.a)
        assert len(ack) == 1
        self.now += DELAY
        self.to_b(ack)
        self.a_events.clear()
        self.b_events.clear()

    def request(self) -> int:
        return self.b.request_block(
            A_ID, FOLDER, path="dir/file", index=0, offset=0, size=len(BLOCK), hash=BLOCK_HASH
        )


def _drain(ep: Endpoint) -> list[Event]:
    events: list[Event] = []
    while (event := ep.next_event()) is not None:
        events.append(event)
    return events


def _serve(pair: Pair, data: bytes = BLOCK) -> list[bytes]:
    (requested,) = [e for e in pair.a_events if isinstance(e, BlockRequested)]
    pair.a_events.clear()
    assert pair.a.send_block(requested.request_id, data)
    sent = pair.out(pair.a)
    assert pair.a.get_timer() == pytest.approx(pair.now + 0.002)  # it owes B a delayed ACK
    return sent


def test_handshake_and_block_transfer() -> None:
    pair = Pair()
    pair.establish()
    assert pair.b.peers() == [(A_ID, FOLDER, A)]
    info = pair.b.session_info(A_ID, FOLDER)
    assert info is not None
    assert info.srtt == pytest.approx(0.022)  # PING -> 10 ms + 2 ms ack delay + 10 ms
    rid = pair.request()
    req = pair.out(pair.b)
    assert len(req) == 1
    pair.now += DELAY
    pair.to_a(req)
    (event,) = pair.a_events
    assert isinstance(event, BlockRequested)
    assert (event.path, event.index, event.size, event.hash) == ("dir/file", 0, 2820, BLOCK_HASH)
    data = _serve(pair)
    assert [len(d) for d in data] == [1452, 1452, 1452]  # padded: one size for GSO
    pair.now += DELAY
    pair.to_b(data)
    assert pair.b_events == [BlockReceived(rid, A_ID, FOLDER, BLOCK)]


def test_request_lost_is_resent_at_the_probe_timeout() -> None:
    pair = Pair()
    pair.establish()
    pair.request()
    sent_at = pair.now
    assert len(pair.out(pair.b)) == 1  # dropped
    # PTO = srtt + 4 rttvar + max_ack_delay = 0.022 + 0.044 + 0.002
    assert pair.b.get_timer() == pytest.approx(sent_at + 0.068)
    probe = pair.fire(pair.b)
    assert len(probe) == 1  # the request frame again, not a bare PING
    pair.now += DELAY
    pair.to_a(probe)
    assert [type(e) for e in pair.a_events] == [BlockRequested]


def test_last_fragment_lost_only_that_fragment_is_resent() -> None:
    pair = Pair()
    pair.establish()
    rid = pair.request()
    pair.now += DELAY
    pair.to_a(pair.out(pair.b))
    data = _serve(pair)
    sent_at = pair.now
    assert len(data) == 3
    pair.fire(pair.a)  # A's delayed ACK of the request (B needs nothing from it)
    pair.now = sent_at + DELAY
    pair.to_b(data[:2])  # the last fragment is lost
    assert pair.b_events == []
    assert pair.b.get_timer() == pytest.approx(pair.now + 0.002)  # delayed ACK
    ack = pair.fire(pair.b)
    assert len(ack) == 1
    pair.now += DELAY
    pair.to_a(ack)
    # Nothing after the lost packet was acked: no threshold loss, only the PTO finds it.
    srtt = 0.022  # first sample: 10 ms + 2 ms ACK delay + 10 ms
    assert pair.a.get_timer() == pytest.approx(sent_at + srtt + 4 * srtt / 2 + 0.002)
    resend = pair.fire(pair.a)
    assert len(resend) == 1
    assert pair.a.stats.fragments_retransmitted == 1
    pair.now += DELAY
    pair.to_b(resend)
    assert pair.b_events == [BlockReceived(rid, A_ID, FOLDER, BLOCK)]


def test_middle_fragment_lost_is_found_by_the_time_threshold() -> None:
    pair = Pair()
    pair.establish()
    rid = pair.request()
    pair.now += DELAY
    pair.to_a(pair.out(pair.b))
    data = _serve(pair)
    sent_at = pair.now
    pair.fire(pair.a)  # A's delayed ACK of the request
    pair.now = sent_at + DELAY
    pair.to_b([data[0], data[2]])
    ack = pair.out(pair.b)  # a gap: B acks at once
    assert len(ack) == 1
    pair.now += DELAY
    pair.to_a(ack)
    # One packet behind the largest acked: lost after 9/8 of the RTT, not before.
    timer = pair.a.get_timer()
    assert timer == pytest.approx(sent_at + 9 / 8 * 0.02)
    resend = pair.fire(pair.a)  # declared lost at the timer and sent again at once
    assert pair.a.stats.packets_lost == 1
    assert len(resend) == 1
    pair.now += DELAY
    pair.to_b(resend)
    assert pair.b_events == [BlockReceived(rid, A_ID, FOLDER, BLOCK)]


def test_ack_lost_costs_one_probe_and_no_duplicate_delivery() -> None:
    pair = Pair()
    pair.establish()
    rid = pair.request()
    pair.now += DELAY
    pair.to_a(pair.out(pair.b))
    data = _serve(pair)
    sent_at = pair.now
    pair.fire(pair.a)  # A's delayed ACK of the request
    pair.now = sent_at + DELAY
    pair.to_b(data)
    assert pair.b_events == [BlockReceived(rid, A_ID, FOLDER, BLOCK)]
    assert len(pair.fire(pair.b)) == 1  # the ACK, lost
    # A has no RTT sample of its own yet: PTO from the initial RTT (0.1 + 4 * 0.05 + 0.002).
    assert pair.a.get_timer() == pytest.approx(sent_at + 0.302)
    probe = pair.fire(pair.a)
    assert len(probe) == 1
    pair.now += DELAY
    pair.to_b(probe)
    pair.now = pair.b.get_timer() or pair.now
    pair.b.handle_timer(pair.now)
    ack = pair.out(pair.b)
    pair.now += DELAY
    pair.to_a(ack)
    info = pair.a.session_info(B_ID, FOLDER)
    assert info is not None
    assert info.bytes_in_flight == 0
    assert pair.a.stats.fragments_retransmitted == 1
    assert [e for e in pair.b_events if isinstance(e, BlockReceived)] == [
        BlockReceived(rid, A_ID, FOLDER, BLOCK)
    ]


def test_silent_peer_fails_the_request_then_is_declared_gone() -> None:
    pair = Pair(TransferConfig(request_timeout=10.0, idle_timeout=15.0))
    pair.establish()
    last_heard = pair.now
    rid = pair.request()
    requested_at = pair.now
    pair.out(pair.b)
    probes = 0
    for _ in range(100):
        timer = pair.b.get_timer()
        assert timer is not None
        if timer > last_heard + 15.0:
            break
        probes += len(pair.fire(pair.b))
        if any(isinstance(e, SessionClosed) for e in pair.b_events):
            break
    failed = [e for e in pair.b_events if isinstance(e, RequestFailed)]
    closed = [e for e in pair.b_events if isinstance(e, SessionClosed)]
    assert failed == [RequestFailed(rid, A_ID, FOLDER, FailReason.TIMEOUT)]
    assert closed == [SessionClosed(A_ID, FOLDER, A, CloseReason.PEER_GONE)]
    assert pair.now == pytest.approx(last_heard + 15.0)
    assert 5 <= probes <= 12  # exponential backoff, not a flood
    assert requested_at + 10.0 <= pair.now
    assert pair.b.peers() == []
    assert pair.b.get_timer() is None


def test_idle_session_sends_keepalives_and_stays_up() -> None:
    pair = Pair(TransferConfig(keepalive_interval=5.0, idle_timeout=15.0))
    pair.establish()
    start = pair.now
    for _ in range(40):
        for ep, deliver in ((pair.a, pair.to_b), (pair.b, pair.to_a)):
            timer = ep.get_timer()
            if timer is not None and timer <= pair.now:
                ep.handle_timer(pair.now)
            deliver(pair.out(ep))
        timers = [t for t in (pair.a.get_timer(), pair.b.get_timer()) if t is not None]
        pair.now = max(pair.now, min(timers))
    assert pair.now - start > 30.0
    assert not [e for e in pair.a_events + pair.b_events if isinstance(e, SessionClosed)]


def test_request_timeout_cancels_at_the_server() -> None:
    pair = Pair(TransferConfig(request_timeout=2.0))
    pair.establish()
    rid = pair.request()
    pair.now += DELAY
    sent_at = pair.now
    pair.to_a(pair.out(pair.b))
    assert [type(e) for e in pair.a_events] == [BlockRequested]  # never answered
    for _ in range(20):
        pair.to_a(pair.fire(pair.b))
        if pair.b_events:
            break
    assert pair.b_events == [RequestFailed(rid, A_ID, FOLDER, FailReason.TIMEOUT)]
    assert pair.now == pytest.approx(sent_at + 2.0)
    assert isinstance(pair.a_events[-1], RequestCancelled)


def test_corrupt_block_is_rejected_and_reported() -> None:
    pair = Pair()
    pair.establish()
    rid = pair.request()
    pair.now += DELAY
    pair.to_a(pair.out(pair.b))
    bad = bytearray(BLOCK)
    bad[-1] ^= 0xFF
    data = _serve(pair, bytes(bad))
    pair.now += DELAY
    pair.to_b(data)
    assert pair.b_events == [RequestFailed(rid, A_ID, FOLDER, FailReason.INTEGRITY)]


def test_reject_manifest_notify_cancel_close() -> None:
    pair = Pair()
    pair.establish()
    # reject
    rid = pair.request()
    pair.to_a(pair.out(pair.b))
    (req,) = pair.a_events
    assert isinstance(req, BlockRequested)
    pair.a_events.clear()
    assert pair.a.reject(req.request_id, FailReason.NOT_FOUND)
    assert not pair.a.send_block(req.request_id, BLOCK)  # gone
    pair.to_b(pair.out(pair.a))
    assert pair.b_events == [RequestFailed(rid, A_ID, FOLDER, FailReason.NOT_FOUND)]
    pair.b_events.clear()
    # manifest
    rid = pair.b.request_manifest(A_ID, FOLDER, since_seq=7, max_size=10_000)
    pair.to_a(pair.out(pair.b))
    (mreq,) = pair.a_events
    assert isinstance(mreq, ManifestRequested)
    assert (mreq.since_seq, mreq.max_size) == (7, 10_000)
    pair.a_events.clear()
    records = [b"record-%d" % i * 30 for i in range(30)]
    with pytest.raises(LocalProtocolError):
        pair.a.send_manifest(mreq.request_id, [b"x" * 20_000], more=False)
    assert pair.a.send_manifest(mreq.request_id, records, more=True)
    pair.to_b(pair.out(pair.a))
    assert pair.b_events == [ManifestReceived(rid, A_ID, FOLDER, tuple(records), True)]
    pair.b_events.clear()
    # notify
    assert pair.a.notify(B_ID, FOLDER, 42, [b"h" * 32, b"i" * 32])
    assert not pair.a.notify(b"C" * 8, FOLDER, 1)
    pair.to_b(pair.out(pair.a))
    assert pair.b_events == [NotificationReceived(A_ID, FOLDER, 42, (b"h" * 32, b"i" * 32))]
    pair.b_events.clear()
    # cancel before the server answered
    rid = pair.request()
    pair.to_a(pair.out(pair.b))
    (req,) = pair.a_events
    pair.a_events.clear()
    pair.b.cancel(rid)
    pair.to_a(pair.out(pair.b))
    assert pair.a_events == [RequestCancelled(req.request_id, B_ID, FOLDER)]  # type: ignore[union-attr]
    assert not pair.a.send_block(req.request_id, BLOCK)  # type: ignore[union-attr]
    pair.to_b(pair.out(pair.a))
    assert pair.b_events == []  # a cancel has no event on the requester
    # close
    pair.a_events.clear()
    pair.b.close()
    assert _drain(pair.b) == [SessionClosed(A_ID, FOLDER, A, CloseReason.CLOSED)]
    pair.to_a(pair.out(pair.b))
    assert pair.a_events == [SessionClosed(B_ID, FOLDER, B, CloseReason.CLOSED)]
    assert pair.a.peers() == pair.b.peers() == []


def test_request_without_session_fails_at_once() -> None:
    ep = make_endpoint(1, A_ID)
    rid = ep.request_block(B_ID, FOLDER, path="f", index=0, offset=0, size=1, hash=bytes(32))
    assert ep.next_event() == RequestFailed(rid, B_ID, FOLDER, FailReason.PEER_GONE)
    with pytest.raises(LocalProtocolError):
        ep.request_block(B_ID, FOLDER, path="f", index=0, offset=0, size=1, hash=b"short")
    with pytest.raises(LocalProtocolError):
        ep.request_block(
            B_ID, FOLDER, path="f", index=0, offset=0, size=1, hash=bytes(32), hash_algo="md4x"
        )
    with pytest.raises(LocalProtocolError):
        ep.connect(A, b"\x09" * 16)  # no key for that folder


def test_lost_initial_and_lost_response_are_repeated() -> None:
    pair = Pair()
    pair.b.connect(A, FOLDER)
    first = pair.out(pair.b)  # lost
    assert pair.b.get_timer() == pytest.approx(pair.now + 0.2)  # 2 x initial_rtt
    again = pair.fire(pair.b)
    assert again == first
    assert pair.b.get_timer() == pytest.approx(pair.now + 0.4)  # backoff
    pair.to_a(again)
    response = pair.out(pair.a)  # lost
    pair.to_a(pair.fire(pair.b))  # INITIAL once more
    assert pair.out(pair.a) == response  # the same answer, no new state
    pair.to_b(response)
    assert [type(e) for e in pair.b_events] == [SessionEstablished]


def test_connect_to_nobody_fails_after_idle_timeout() -> None:
    pair = Pair(TransferConfig(idle_timeout=3.0))
    pair.b.connect(A, FOLDER)
    pair.out(pair.b)
    start = pair.now
    sent = 0
    for _ in range(50):
        if pair.b_events:
            break
        sent += len(pair.fire(pair.b))
    assert pair.b_events == [SessionClosed(None, FOLDER, A, CloseReason.HANDSHAKE_TIMEOUT)]
    assert pair.now == pytest.approx(start + 3.0)
    assert sent <= 5
    assert pair.b.get_timer() is None


def test_simultaneous_connect_gives_one_session_each_side() -> None:
    pair = Pair()
    pair.a.connect(B, FOLDER)
    pair.b.connect(A, FOLDER)
    a_out, b_out = pair.out(pair.a), pair.out(pair.b)
    pair.to_a(b_out)  # A < B: A keeps its own handshake and drops B's
    pair.to_b(a_out)  # B gives up its own and answers A's
    for _ in range(5):
        pair.to_b(pair.out(pair.a))
        pair.to_a(pair.out(pair.b))
    assert [type(e) for e in pair.a_events] == [SessionEstablished]
    assert [type(e) for e in pair.b_events] == [SessionEstablished]
    assert pair.a.peers() == [(B_ID, FOLDER, B)]
    assert pair.b.peers() == [(A_ID, FOLDER, A)]


def test_restart_event_order() -> None:
    pair = Pair()
    pair.establish()
    pair.b = make_endpoint(3, B_ID, pmtu_probe=False)
    pair.b.connect(A, FOLDER)
    pair.to_a(pair.out(pair.b))
    pair.to_b(pair.out(pair.a))
    pair.to_a(pair.out(pair.b))
    assert pair.a_events == [
        SessionClosed(B_ID, FOLDER, B, CloseReason.REPLACED),
        SessionEstablished(B_ID, FOLDER, B, initiator=False),
    ]
    assert len(pair.a.peers()) == 1


def test_key_updates_keep_the_session_working() -> None:
    net = Network(3, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID, key_update_interval=50), A)
    b = net.add(make_endpoint(2, B_ID, key_update_interval=50), B)
    blocks = [random.Random(i).randbytes(50_000) for i in range(8)]
    for blk in blocks:
        a.blocks[hashlib.sha256(blk).digest()] = blk
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    for i, blk in enumerate(blocks):
        b.endpoint.request_block(
            A_ID,
            FOLDER,
            path="f",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )
    net.run_until(lambda: len(b.of_type(BlockReceived)) == len(blocks), 10)
    assert sorted(e.data for e in b.of_type(BlockReceived)) == sorted(blocks)
    assert b.endpoint.stats.auth_failed == a.endpoint.stats.auth_failed == 0
    info = a.endpoint.session_info(B_ID, FOLDER)
    assert info is not None
    assert info.key_updates >= 3


def test_flow_control_bounds_what_is_in_flight_towards_us() -> None:
    credit = 64 * 1024
    net = Network(4, Link(delay=0.002, bandwidth=50e6, queue_size=10**6))
    transfer = TransferConfig(max_in_flight_size=credit)
    a = net.add(make_endpoint(1, A_ID, transfer=transfer), A)
    b = net.add(make_endpoint(2, B_ID, transfer=transfer), B)
    blocks = [random.Random(i).randbytes(16 * 1024) for i in range(40)]
    for blk in blocks:
        a.blocks[hashlib.sha256(blk).digest()] = blk
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    for i, blk in enumerate(blocks):
        b.endpoint.request_block(
            A_ID,
            FOLDER,
            path="f",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )
    peak = 0

    def done() -> bool:
        nonlocal peak
        info = b.endpoint.session_info(A_ID, FOLDER)
        assert info is not None
        assert info.credit_used <= credit
        served = a.endpoint.session_info(B_ID, FOLDER)
        assert served is not None
        peak = max(peak, served.bytes_in_flight)
        return len(b.of_type(BlockReceived)) == len(blocks)

    net.run_until(done, 10)
    assert peak <= credit * 1452 // wire.fragment_size(1452) + 2 * 1452


@pytest.mark.parametrize("side", ["send", "recv"])
def test_rate_limits_hold_in_simulated_time(side: str) -> None:
    rate = 2_000_000
    net = Network(5, Link(delay=0.001))
    limited = (
        NetworkConfig(max_send_rate=rate) if side == "send" else NetworkConfig(max_recv_rate=rate)
    )
    a = net.add(make_endpoint(1, A_ID, network=limited if side == "send" else None), A)
    b = net.add(make_endpoint(2, B_ID, network=limited if side == "recv" else None), B)
    blocks = [random.Random(i).randbytes(100_000) for i in range(20)]
    for blk in blocks:
        a.blocks[hashlib.sha256(blk).digest()] = blk
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    for i, blk in enumerate(blocks):
        b.endpoint.request_block(
            A_ID,
            FOLDER,
            path="f",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )
    took = net.run_until(lambda: len(b.of_type(BlockReceived)) == len(blocks), 30)
    total = sum(map(len, blocks))
    burst = 0.05 * rate + 100_000  # the bucket may start full
    assert took >= (total - burst) / rate
    assert took <= 2 * total / rate


def test_data_is_paced_not_sent_a_window_at_a_time() -> None:
    """Once the window is wide, an answer leaves at the pacer's rate: no simulated instant
    carries more than the pacer's burst (rate x burst_interval), where without pacing the
    whole window would go at once."""
    net = Network(6, Link(delay=0.01))  # 20 ms round trips: a window far above one burst
    a = net.add(make_endpoint(1, A_ID, pmtu_probe=False), A)
    b = net.add(make_endpoint(2, B_ID, pmtu_probe=False), B)
    block = random.Random(6).randbytes(4 * 1024 * 1024)
    digest = hashlib.sha256(block).digest()
    a.blocks[digest] = block
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    b.endpoint.request_block(
        A_ID, FOLDER, path="f", index=0, offset=0, size=len(block), hash=digest
    )
    net.run_until(lambda: bool(b.of_type(BlockReceived)), 30)
    per_instant: dict[float, int] = {}
    for at, src, _, size in net.sent_log:
        if src == A and size == 1452:
            per_instant[at] = per_instant.get(at, 0) + size
    info = a.endpoint.session_info(B_ID, FOLDER)
    assert info is not None
    assert info.cwnd > 400_000  # the window grew well past one burst
    # Bursts: 2 ms of the pacing rate (1.25 cwnd / srtt) with cwnd at most 2x the credit,
    # plus the one packet a bucket may go negative by.
    burst = 0.002 * 1.25 * 2 * TransferConfig().max_in_flight_size / 0.02 + 1452
    assert max(per_instant.values()) <= burst
    assert max(per_instant.values()) < info.cwnd / 2


def test_psk_and_folder_validation() -> None:
    with pytest.raises(LocalProtocolError):
        make_endpoint(1, A_ID, folders={b"short": PSK})
    with pytest.raises(LocalProtocolError):
        make_endpoint(1, b"toolongid")


# -- stateful: random commands, loss, answers and time jumps ------------------------------------


class ProtocolMachine(RuleBasedStateMachine):
    """Random interleavings of requests, cancels, answers, rejects, corruption, loss and time.

    Invariants: no delivered block ever differs from what was asked for; the requester never
    has more answers outstanding than its credit; at the end every request that was not
    cancelled has exactly one terminal event.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = Network(7, Link(delay=0.001))
        transfer = TransferConfig(
            request_timeout=3.0,
            idle_timeout=4.0,
            keepalive_interval=1.0,
            max_in_flight_size=64 * 1024,
        )
        self.a = self.net.add(make_endpoint(1, A_ID, transfer=transfer), A)
        self.b = self.net.add(make_endpoint(2, B_ID, transfer=transfer), B)
        self.a.serve = False
        self.truth: dict[int, bytes] = {}
        self.by_hash: dict[bytes, bytes] = {}
        self.cancelled: set[int] = set()
        self.answered: set[int] = set()
        self.b.endpoint.connect(A, FOLDER)
        self.net.run_until(lambda: bool(self.a.of_type(SessionEstablished)), 5)

    def _link(self, loss: float) -> None:
        link = Link(delay=0.001, loss=loss, dup=0.05, reorder=0.05)
        self.net.set_link(A, B, link)
        self.net.set_link(B, A, link)

    @rule(size=st.integers(0, 40_000), seed=st.integers(0, 2**16))
    def request(self, size: int, seed: int) -> None:
        data = random.Random(seed).randbytes(size)
        digest = hashlib.sha256(data).digest()
        self.by_hash[digest] = data
        rid = self.b.endpoint.request_block(
            A_ID, FOLDER, path="p", index=seed, offset=0, size=size, hash=digest
        )
        self.truth[rid] = data

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        open_ids = sorted(set(self.truth) - self.cancelled - self._finished())
        if open_ids:
            rid = data.draw(st.sampled_from(open_ids))
            self.b.endpoint.cancel(rid)
            self.cancelled.add(rid)

    @rule(action=st.sampled_from(["answer", "answer", "reject", "corrupt"]), data=st.data())
    def serve(self, action: str, data: st.DataObject) -> None:
        waiting = [e for e in self.a.of_type(BlockRequested) if e.request_id not in self.answered]
        if not waiting:
            return
        event = data.draw(st.sampled_from(waiting))
        assert isinstance(event, BlockRequested)
        self.answered.add(event.request_id)
        block = self.by_hash[event.hash]
        if action == "answer":
            self.a.endpoint.send_block(event.request_id, block)
        elif action == "reject":
            self.a.endpoint.reject(event.request_id, FailReason.BUSY)
        elif block:
            self.a.endpoint.send_block(event.request_id, bytes(len(block) - 1) + b"\x01")
        else:
            self.a.endpoint.reject(event.request_id)

    @rule(loss=st.sampled_from([0.0, 0.0, 0.1, 0.4]), duration=st.floats(0.0, 1.5))
    def run(self, loss: float, duration: float) -> None:
        self._link(loss)
        self.net.run_for(duration)

    @rule()
    def reconnect(self) -> None:
        if not self.b.endpoint.peers():
            self.b.endpoint.connect(A, FOLDER)

    def _finished(self) -> set[int]:
        return {
            e.request_id for e in self.b.events if isinstance(e, (BlockReceived, RequestFailed))
        }

    @invariant()
    def delivered_blocks_are_right(self) -> None:
        for event in self.b.of_type(BlockReceived):
            assert event.data == self.truth[event.request_id]
            assert event.request_id not in self.cancelled

    @invariant()
    def credit_is_respected(self) -> None:
        info = self.b.endpoint.session_info(A_ID, FOLDER)
        if info is not None:
            assert info.credit_used <= 64 * 1024

    def teardown(self) -> None:
        self._link(0.0)
        self.a.blocks = self.by_hash
        self.a.serve = True
        for requested in self.a.of_type(BlockRequested):
            if requested.request_id not in self.answered:
                self.a.endpoint.send_block(requested.request_id, self.by_hash[requested.hash])
        self.net.run_for(10.0)  # long enough for every timeout to fire
        counts: dict[int, int] = {}
        for event in self.b.events:
            if isinstance(event, (BlockReceived, RequestFailed)):
                counts[event.request_id] = counts.get(event.request_id, 0) + 1
        for rid in self.truth:
            expected = 0 if rid in self.cancelled else 1
            if rid in self.cancelled and counts.get(rid):
                expected = 1  # it had already finished when it was cancelled
            assert counts.get(rid, 0) == expected, (rid, counts.get(rid))


ProtocolMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestProtocolMachine = ProtocolMachine.TestCase


# -- path MTU: data starts at 1200 bytes and grows only after a probe got through ----------------


def _pull_blocks(net: Network, a: Node, b: Node, count: int, size: int) -> list[bytes]:
    blocks = [random.Random(i).randbytes(size) for i in range(count)]
    for blk in blocks:
        a.blocks[hashlib.sha256(blk).digest()] = blk
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    for i, blk in enumerate(blocks):
        b.endpoint.request_block(
            A_ID,
            FOLDER,
            path="f",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )
    net.run_until(lambda: len(b.of_type(BlockReceived)) == count, 30)
    assert [e.data for e in b.of_type(BlockReceived)] == blocks
    return blocks


def test_data_grows_to_the_negotiated_size_once_a_probe_gets_through() -> None:
    net = Network(8, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    # A small credit, so that most answers start after the probe's ACK.
    b = net.add(make_endpoint(2, B_ID, transfer=TransferConfig(max_in_flight_size=128 * 1024)), B)
    _pull_blocks(net, a, b, 12, 64 * 1024)
    sizes = [size for _, src, _, size in net.sent_log if src == A and size >= 1200]
    assert sizes[0] == 1452  # the probe
    assert 1200 in sizes  # the first data packets
    assert sizes[-1] == 1452  # data after the probe was acknowledged
    info = a.endpoint.session_info(B_ID, FOLDER)
    assert info is not None
    assert info.datagram_size == 1452


def test_a_narrow_path_stays_at_1200_bytes_and_still_transfers() -> None:
    net = Network(9, Link(delay=0.001, mtu=1400))  # e.g. a VPN or PPPoE hop
    a = net.add(make_endpoint(1, A_ID), A)
    b = net.add(make_endpoint(2, B_ID), B)
    _pull_blocks(net, a, b, 12, 64 * 1024)
    info = a.endpoint.session_info(B_ID, FOLDER)
    assert info is not None
    assert info.datagram_size == 1200
    assert info.congestion_events == 0  # lost probes are not congestion
    probes = [size for _, src, _, size in net.sent_log if src == A and size > 1400]
    assert len(probes) == 3  # RFC 8899 MAX_PROBES, then it gives up
    assert a.endpoint.stats.fragments_retransmitted == 0


def test_fragments_smaller_than_a_datagram_are_malformed() -> None:
    pair = Pair()
    pair.establish()
    # A asks B; B (hostile) answers with 100-byte pieces, which could make A keep
    # thousands of ranges per block.
    rid = pair.a.request_block(B_ID, FOLDER, path="f", index=0, offset=0, size=5000, hash=bytes(32))
    pair.to_b(pair.out(pair.a))
    hostile = next(iter(pair.b._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    frame = wire.encode_frame(wire.Data(0, 5000, 1000, b"x" * 100))
    hostile._emit(frame, pair.now, out, eliciting=True, items=None)
    pair.to_a([data for data, _ in out])
    assert pair.a_events[-1] == RequestFailed(rid, B_ID, FOLDER, FailReason.MALFORMED)


def test_answers_reassemble_from_fragments_of_any_size_in_any_order() -> None:
    pair = Pair()
    pair.establish()
    data = random.Random(5).randbytes(10_000)
    rid = pair.a.request_block(
        B_ID,
        FOLDER,
        path="f",
        index=0,
        offset=0,
        size=len(data),
        hash=hashlib.sha256(data).digest(),
    )
    pair.to_b(pair.out(pair.a))
    hostile = next(iter(pair.b._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    pieces = [
        (0, 1300),
        (8700, 10_000),
        (2000, 3400),
        (1300, 2600),
        (4700, 6000),
        (3400, 4700),
        (7300, 8700),
        (6000, 7300),
        (0, 1200),
    ]
    for start, stop in pieces:  # overlapping, out of order, duplicated
        frame = wire.encode_frame(wire.Data(0, len(data), start, data[start:stop]))
        hostile._emit(frame, pair.now, out, eliciting=True, items=None)
    pair.to_a([d for d, _ in out])
    assert pair.a_events[-1] == BlockReceived(rid, B_ID, FOLDER, data)


def test_closing_answers_stray_packets_then_forgets_the_session() -> None:
    pair = Pair()
    pair.establish()
    pair.request()
    stray = pair.out(pair.b)  # B's request, delivered only after A closed
    pair.a.close()
    assert _drain(pair.a) == [SessionClosed(B_ID, FOLDER, B, CloseReason.CLOSED)]
    (close,) = pair.out(pair.a)
    assert len(pair.a.peers()) == 0
    pair.to_a(stray)  # the closing side answers with CLOSE again, nothing else
    (again,) = pair.out(pair.a)
    assert len(again) == len(close)
    pair.to_b([again])
    assert pair.b_events[-1] == SessionClosed(A_ID, FOLDER, A, CloseReason.CLOSED)
    # After three PTOs the closing state is gone: no timer, stray packets are just dropped.
    for _ in range(5):
        if pair.a.get_timer() is None:
            break
        pair.fire(pair.a)
    assert pair.a.get_timer() is None
    dropped = pair.a.stats.dropped
    pair.to_a(stray)
    assert pair.a.stats.dropped == dropped + 1
    assert pair.out(pair.a) == []


def test_packets_reordered_across_a_key_update_still_open() -> None:
    net = Network(11, Link(delay=0.001, reorder=0.2, reorder_delay=0.003))
    a = net.add(make_endpoint(1, A_ID, key_update_interval=40), A)
    b = net.add(make_endpoint(2, B_ID, key_update_interval=40), B)
    _pull_blocks(net, a, b, 16, 40_000)
    assert a.endpoint.stats.auth_failed == b.endpoint.stats.auth_failed == 0
    info = b.endpoint.session_info(A_ID, FOLDER)
    assert info is not None
    assert info.key_updates >= 3


def test_unvalidated_responder_never_exceeds_three_times_what_it_received() -> None:
    ep = make_endpoint(1, A_ID)
    initiator = make_endpoint(2, B_ID)
    initiator.connect(A, FOLDER)
    (initial,) = [d for d, _ in initiator.datagrams_to_send(0.0)]
    ep.receive_datagram(initial, B, 0.0)
    session = next(iter(ep._sessions.values()))
    assert not session.validated
    (response,) = ep.datagrams_to_send(0.0)
    # Pretend far less was received than the RESPONSE weighs: nothing may go out.
    session.amp_received = len(response[0]) // 2
    session.on_duplicate_initial(0)
    assert ep.datagrams_to_send(0.0) == []
    session.on_duplicate_initial(len(initial))  # a real repeat of the INITIAL: budget again
    assert ep.datagrams_to_send(0.0) == [response]


def test_connect_right_after_close_opens_a_new_session() -> None:
    pair = Pair()
    pair.establish()
    pair.b.close()
    assert [type(e) for e in _drain(pair.b)] == [SessionClosed]
    pair.b.connect(A, FOLDER)  # while the old session still lingers in CLOSING
    sent = pair.out(pair.b)
    # The CLOSE of the old session and a new INITIAL.
    assert sorted(map(len, sent))[1:] == [wire.INITIAL_SIZE]
    assert len(sent) == 2
    pair.to_a(sent)
    pair.to_b(pair.out(pair.a))
    pair.to_a(pair.out(pair.b))
    assert pair.b_events[-1] == SessionEstablished(A_ID, FOLDER, A, initiator=True)
    assert pair.a_events[-2:] == [
        SessionClosed(B_ID, FOLDER, B, CloseReason.CLOSED),
        SessionEstablished(B_ID, FOLDER, B, initiator=False),
    ]


def test_idle_sessions_cost_nothing_per_round() -> None:
    """With many peers, a datagram for one session only makes that session do work."""
    net = Network(12, Link(delay=0.001))
    hub = net.add(make_endpoint(1, A_ID), A)
    peers = []
    for i in range(20):
        addr = (f"10.0.1.{i}", 4000)
        node = net.add(make_endpoint(100 + i, bytes([i + 1]) * 8), addr)
        node.endpoint.connect(A, FOLDER)
        peers.append(node)
    net.run_until(lambda: len(hub.endpoint.peers()) == 20, 5)
    net.run_for(0.05)  # let the last ACKs settle
    ctx = hub.endpoint._ctx
    assert not ctx.dirty
    assert len(hub.endpoint._timers) == 20
    peers[3].endpoint.notify(A_ID, FOLDER, 7)
    for data, _ in peers[3].endpoint.datagrams_to_send(net.now):
        hub.endpoint.receive_datagram(data, peers[3].addr, net.now)
    assert [s.addr for s in ctx.dirty] == [peers[3].addr]


def test_a_path_that_narrows_mid_session_falls_back_to_1200_bytes() -> None:
    """Black-hole detection: after the probe succeeded the path starts dropping 1452-byte
    datagrams; the answers under way are re-sent in 1200-byte datagrams and complete."""
    net = Network(13, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    b = net.add(make_endpoint(2, B_ID, transfer=TransferConfig(max_in_flight_size=256 * 1024)), B)
    blocks = [random.Random(i).randbytes(100_000) for i in range(30)]
    for blk in blocks:
        a.blocks[hashlib.sha256(blk).digest()] = blk
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    for i, blk in enumerate(blocks):
        b.endpoint.request_block(
            A_ID,
            FOLDER,
            path="f",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )

    def grown() -> bool:
        info = a.endpoint.session_info(B_ID, FOLDER)
        return info is not None and info.datagram_size == 1452

    net.run_until(grown, 5)
    net.run_until(lambda: len(b.of_type(BlockReceived)) >= 5, 5)
    net.default = Link(delay=0.001, mtu=1400)  # e.g. a VPN came up on the way
    net.run_until(lambda: len(b.of_type(BlockReceived)) == len(blocks), 10)
    assert [e.data for e in b.of_type(BlockReceived)] == blocks
    assert not b.of_type(RequestFailed)
    info = a.endpoint.session_info(B_ID, FOLDER)
    assert info is not None
    assert info.datagram_size == 1200
