"""Security properties: wrong key, replay, tampering, amplification, hostile input."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lanshare.config import TransferConfig
from lanshare.events import (
    BlockReceived,
    BlockRequested,
    CloseReason,
    FailReason,
    ManifestRequested,
    PeerId,
    RequestFailed,
    SessionClosed,
    SessionEstablished,
)
from lanshare.protocol import Endpoint, wire
from lanshare.protocol.connection import _REQUEST_COST
from tests.sim import FOLDER, PSK, Link, Network, Node, make_endpoint

A = ("10.0.0.1", 4000)
B = ("10.0.0.2", 4000)
V = ("10.0.0.66", 4000)  # a victim whose address an attacker spoofs
A_ID, B_ID = PeerId(b"A" * 8), PeerId(b"B" * 8)
OTHER_PSK = bytes(32)


def _net(seed: int = 1, **a_knobs: object) -> tuple[Network, Node, Node]:
    net = Network(seed, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID, **a_knobs), A)  # type: ignore[arg-type]
    b = net.add(make_endpoint(2, B_ID), B)
    return net, a, b


def _established(net: Network, a: Node, b: Node) -> None:
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)


def test_wrong_key_gets_no_session_no_data_and_no_answer() -> None:
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    b = net.add(make_endpoint(2, B_ID, folders={FOLDER: OTHER_PSK}), B)
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(b.of_type(SessionClosed)), 30)
    assert b.of_type(SessionClosed) == [
        SessionClosed(None, FOLDER, A, CloseReason.HANDSHAKE_TIMEOUT)
    ]
    assert net.stats(A, B).sent == 0  # not one byte back: nothing to learn
    assert net.stats(B, A).sent >= 2
    assert a.events == []
    assert a.endpoint.peers() == []
    assert a.endpoint.stats.handshakes_failed == net.stats(B, A).sent
    rid = b.endpoint.request_block(
        A_ID, FOLDER, path="f", index=0, offset=0, size=1, hash=bytes(32)
    )
    net.run_for(1.0)
    assert b.of_type(RequestFailed) == [RequestFailed(rid, A_ID, FOLDER, FailReason.PEER_GONE)]
    assert net.stats(A, B).sent == 0


def test_unknown_folder_gets_nothing_either() -> None:
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    other_folder = b"\xee" * 16
    b = net.add(make_endpoint(2, B_ID, folders={other_folder: PSK}), B)
    b.endpoint.connect(A, other_folder)  # right PSK, but bound to another folder id
    net.run_for(2.0)
    assert net.stats(A, B).sent == 0
    assert a.events == []


def test_replayed_datagrams_are_dropped() -> None:
    net, a, b = _net()
    captured: list[bytes] = []
    net.filter = lambda data, src, dst: src != B or not captured.append(data)  # type: ignore[func-returns-value]
    _established(net, a, b)
    b.endpoint.request_block(A_ID, FOLDER, path="f", index=0, offset=0, size=10, hash=bytes(32))
    net.run_until(lambda: bool(a.of_type(BlockRequested)), 5)
    net.run_for(0.01)  # everything captured has arrived
    net.filter = None
    replayed_before = a.endpoint.stats.replayed
    data_packets = [d for d in captured if d[1] == wire.PacketType.DATA]
    for data in data_packets:
        net.inject(data, B, A)
    net.run_for(0.5)
    assert a.endpoint.stats.replayed - replayed_before == len(data_packets)
    assert len(a.of_type(BlockRequested)) == 1  # the request was not served twice
    # A replayed INITIAL: no second session, no extra event.
    initial = next(d for d in captured if d[1] == wire.PacketType.INITIAL)
    net.inject(initial, B, A)
    net.run_for(0.5)
    assert len(a.of_type(SessionEstablished)) == 1
    assert len(a.endpoint.peers()) == 1


def test_one_batch_with_forged_replayed_and_stray_datagrams_delivers_the_rest() -> None:
    """A GRO batch is one call into the endpoint; each of its datagrams is still checked on
    its own: a forged copy inside a run is dropped, the genuine one and the rest of the run
    are delivered, a replay and a datagram for no session are dropped, counted once each."""
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID, pmtu_probe=False), A)
    b = net.add(make_endpoint(2, B_ID, pmtu_probe=False), B)
    _established(net, a, b)
    block = bytes(range(256)) * 40  # 10,240 bytes: 8 fragments, the last one padded
    digest = hashlib.sha256(block).digest()
    b.blocks[digest] = block
    captured: list[bytes] = []
    net.filter = lambda data, src, dst: src != B or bool(captured.append(data))  # type: ignore[func-returns-value]
    a.endpoint.request_block(
        B_ID, FOLDER, path="f", index=0, offset=0, size=len(block), hash=digest
    )
    net.run_for(0.004)  # the answer is captured and dropped, before any probe timeout
    net.filter = None
    packets = [d for d in captured if len(d) == 1452]
    assert len(packets) == 8
    forged = bytearray(packets[2])
    forged[100] ^= 1
    stray = wire.SHORT_HEADER.pack(wire.VERSION, wire.PacketType.DATA, 0, 0xDEAD, 5) + bytes(1436)
    batch = [*packets[:2], bytes(forged), packets[2], packets[1], stray, *packets[3:]]
    stats = a.endpoint.stats
    before = (stats.auth_failed, stats.replayed, stats.dropped)
    a.endpoint.receive_datagrams([memoryview(d) for d in batch], B, net.now)
    assert (stats.auth_failed, stats.replayed, stats.dropped) == (
        before[0] + 1,
        before[1] + 1,
        before[2] + 1,
    )
    while (event := a.endpoint.next_event()) is not None:
        a.handle(event)
    assert [e.data for e in a.of_type(BlockReceived)] == [block]
    net.run_for(0.5)  # acknowledged: nothing is sent again, the session stays up
    assert a.endpoint.peers() == [(B_ID, FOLDER, B)]
    assert b.endpoint.stats.fragments_retransmitted == 0


def test_tampered_datagrams_are_dropped_and_the_session_survives() -> None:
    net, a, b = _net()
    _established(net, a, b)
    captured: list[bytes] = []
    net.filter = lambda data, src, dst: src != B or not captured.append(data)  # type: ignore[func-returns-value]
    b.endpoint.request_block(A_ID, FOLDER, path="f", index=0, offset=0, size=10, hash=bytes(32))
    net.run_for(0.0005)  # captured, not delivered
    net.filter = None
    (packet,) = captured
    positions = list(range(0, len(packet), 3))
    for pos in positions:
        bad = bytearray(packet)
        bad[pos] ^= 0x40
        net.inject(bytes(bad), B, A)
    net.run_for(0.0001)
    assert not a.of_type(BlockRequested)
    st_ = a.endpoint.stats
    assert st_.auth_failed + st_.dropped + st_.replayed >= len(positions)
    net.run_until(lambda: bool(a.of_type(BlockRequested)), 5)  # the probe gets through
    assert len(a.endpoint.peers()) == 1


def test_spoofed_initials_never_get_more_than_three_times_back() -> None:
    """An attacker who holds the key replays INITIALs with a victim's source address."""
    net, a, b = _net()
    victim = net.add(make_endpoint(9, b"V" * 8), V)
    victim.serve = False
    captured: list[bytes] = []
    # The attacker's own INITIAL never reaches A: it is only captured.
    net.filter = lambda data, src, dst: src != B or bool(captured.append(data))  # type: ignore[func-returns-value]
    b.endpoint.connect(A, FOLDER)
    net.run_for(0.001)
    b.endpoint.close()
    initial = captured[0]
    for i in range(20):
        net.inject(initial, V, A, at=net.now + i * 0.05)
    net.run_for(30.0)
    received = 20 * len(initial)  # what A got "from" the victim
    sent_to_victim = net.stats(A, V).bytes_sent
    assert 0 < sent_to_victim <= 3 * received
    assert sent_to_victim <= 20 * 150  # only small RESPONSE copies
    assert not a.of_type(SessionEstablished)
    assert victim.events == []


def test_always_retry_answers_with_a_token_before_any_state() -> None:
    net, a, b = _net(always_retry=True)
    victim = net.add(make_endpoint(9, b"V" * 8), V)
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished)), 5)
    assert a.endpoint.stats.retries_sent == 1
    assert b.of_type(SessionEstablished)
    # A spoofed INITIAL only ever gets a small RETRY, and A keeps no state for it.
    captured: list[bytes] = []
    other = make_endpoint(5, b"X" * 8)
    other.connect(A, FOLDER)
    for data, _ in other.datagrams_to_send(net.now):
        captured.append(data)
    net.inject(captured[0], V, A)
    net.run_for(1.0)
    assert net.stats(A, V).bytes_sent <= 3 * len(captured[0])
    assert net.stats(A, V).sent == 1
    assert len(a.endpoint.peers()) == 1
    assert victim.events == []


def test_half_open_limit_turns_on_retry() -> None:
    net, a, b = _net(max_half_open=2)
    for i in range(4):
        spoofer = make_endpoint(20 + i, bytes([i]) * 8)
        spoofer.connect(A, FOLDER)
        (initial,) = [d for d, _ in spoofer.datagrams_to_send(net.now)]
        net.inject(initial, ("10.9.9.9", 1000 + i), A)
    net.run_for(0.01)
    assert a.endpoint.stats.retries_sent == 2  # the 3rd and 4th had to prove their address
    _established(net, a, b)  # a real peer still gets in (via a retry)
    assert b.of_type(SessionEstablished)


def test_short_initials_are_not_answered() -> None:
    net, _a, b = _net()
    b.endpoint.connect(A, FOLDER)
    (initial,) = [d for d, _ in b.endpoint.datagrams_to_send(net.now)]
    net.inject(initial[:1000], B, A)
    net.run_for(0.01)
    assert net.stats(A, B).sent == 0


@given(
    st.binary(max_size=1600),
    st.sampled_from([b"", *(bytes((wire.VERSION, t)) for t in wire.PacketType)]),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_datagrams_never_raise(data: bytes, prefix: bytes) -> None:
    ep = _ESTABLISHED[0]
    ep.receive_datagram(prefix + data, B, 2000.0)
    ep.handle_timer(2000.0)
    ep.datagrams_to_send(2000.0)


@given(st.binary(max_size=1420), st.booleans(), st.booleans())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_authenticated_frames_never_raise(
    payload: bytes, full_size: bool, data_first: bool
) -> None:
    """Hostile plaintext from a key holder: dropped or closes the session, never raises.

    Full-size packets take the receiver's in-order fast path, so they are tried too, also
    starting with a DATA frame header (for a request that may exist)."""
    net, a, b = _net()
    _established(net, a, b)
    b.serve = False
    # A waits for request id 0 from B: hostile DATA frames for it hit the reassembly path.
    a.endpoint.request_block(B_ID, FOLDER, path="f", index=0, offset=0, size=5000, hash=bytes(32))
    net.run_until(lambda: bool(b.of_type(BlockRequested)), 5)
    if data_first:
        payload = bytes([wire.FrameType.DATA, 0, 0, 0, 0]) + payload
    if full_size:
        payload = (payload + bytes(1420))[:1420]
    session = next(iter(b.endpoint._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    session._emit(payload, net.now, out, eliciting=False, items=None)
    a.endpoint.receive_datagram(out[0][0], B, net.now)
    net.run_for(0.1)
    # The same inside one batch, twice in a row (a run that may close the session midway).
    out.clear()
    session._emit(b"\x01" + bytes(1419), net.now, out, eliciting=False, items=None)
    for _ in range(2):
        session._emit(payload, net.now, out, eliciting=False, items=None)
    a.endpoint.receive_datagrams([memoryview(data) for data, _ in out], B, net.now)
    net.run_for(0.1)


def test_receive_path_allocates_within_a_bound() -> None:
    net, a, b = _net()
    _established(net, a, b)
    session = next(iter(a.endpoint._sessions.values()))
    garbage = [
        wire.SHORT_HEADER.pack(wire.VERSION, 4, 0, session.local_cid, 10_000 + i)
        + bytes([i]) * 1436
        for i in range(200)
    ]
    hostile = next(iter(b.endpoint._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    notify = wire.encode_frame(wire.Notify(1, tuple(bytes([i]) * 32 for i in range(40))))
    for _ in range(50):
        hostile._emit(b"\x01" * 1400, net.now, out, eliciting=False, items=None)
        hostile._emit(notify, net.now, out, eliciting=False, items=None)
    a.endpoint.receive_datagram(garbage[0], B, net.now)  # warm caches
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for data in garbage:
            a.endpoint.receive_datagram(data, B, net.now)
        garbage_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        for data, _ in out[:2]:
            a.endpoint.receive_datagram(data, B, net.now)
            while a.endpoint.next_event() is not None:
                pass
        frames_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert a.endpoint.stats.auth_failed >= 200
    assert garbage_peak < 8 * 1024
    assert frames_peak < 16 * 1024


_ESTABLISHED: list[Endpoint] = []


@pytest.fixture(autouse=True, scope="module")
def _established_endpoint() -> None:
    net, a, b = _net()
    _established(net, a, b)
    _ESTABLISHED.append(a.endpoint)


def test_a_peer_ignoring_its_credit_is_refused() -> None:
    """Requests far beyond the requester's advertised credit get BUSY, not our memory."""
    transfer = TransferConfig(max_in_flight_size=64 * 1024)
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    a.serve = False
    b = net.add(make_endpoint(2, B_ID, transfer=transfer), B)
    _established(net, a, b)
    hostile = next(iter(b.endpoint._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    for rid in range(1000, 1040):  # 40 x 32 KiB = 1.25 MiB against 64 KiB of credit
        frame = wire.encode_frame(wire.RequestBlock(rid, "f", 0, 0, 32 * 1024, "sha256", bytes(32)))
        hostile._emit(frame, net.now, out, eliciting=False, items=None)
    for data, _ in out:
        a.endpoint.receive_datagram(data, B, net.now)
    net.run_for(0.01)
    # 4x the credit, each request costing its bytes and its bookkeeping; then BUSY.
    assert len(a.of_type(BlockRequested)) == 4 * 64 * 1024 // (32 * 1024 + _REQUEST_COST)


def _hostile_requests(
    net: Network, victim: Node, peer: Node, frames: list[wire.RequestBlock]
) -> None:
    """Have ``peer``'s session with ``victim`` send ``frames`` as they are, whatever its
    credit, straight to ``victim`` (which never hears an acknowledgement of its answers)."""
    session = next(iter(peer.endpoint._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    for frame in frames:
        session._emit(wire.encode_frame(frame), net.now, out, eliciting=False, items=None)
    for data, _ in out:
        victim.endpoint.receive_datagram(data, peer.addr, net.now)
    net.run_for(0.01)


def _serving_bytes_held(victim: Node) -> int:
    """Bytes of block data the victim holds to answer what it took on (it answers every
    request it took with a block of the size asked, as the engine does)."""
    return sum(e.size for e in victim.of_type(BlockRequested))


def test_a_huge_advertised_credit_buys_no_more_serving_memory() -> None:
    """A peer advertising 1 GiB of credit may still have us hold only ``max_serving_size``
    (4x our own credit), not 4 GiB: its 100 requests for 4 MiB blocks are mostly refused."""
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    a.serve = False
    b = net.add(make_endpoint(2, B_ID, transfer=TransferConfig(max_in_flight_size=1 << 30)), B)
    _established(net, a, b)
    block = 4 * 1024 * 1024
    frames = [
        wire.RequestBlock(rid, "f", 0, 0, block, "sha256", bytes(32)) for rid in range(1000, 1100)
    ]
    _hostile_requests(net, a, b, frames)
    bound = a.endpoint.params.max_serving_size
    assert bound == 4 * TransferConfig().max_in_flight_size
    assert 1 <= len(a.of_type(BlockRequested)) <= bound // block
    assert _serving_bytes_held(a) <= bound


def test_requests_for_tiny_blocks_are_bounded_in_number() -> None:
    """Requests for one-byte blocks cost their bookkeeping: 50,000 of them (a credit's
    worth of bytes on the wire) leave at most ``max_serving_size / _REQUEST_COST`` waiting."""
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    a.serve = False
    b = net.add(make_endpoint(2, B_ID), B)
    _established(net, a, b)
    path = "d/" + "p" * 100
    frames = [
        wire.RequestBlock(rid, path, 0, 0, 1, "sha256", bytes(32)) for rid in range(1, 50_001)
    ]
    _hostile_requests(net, a, b, frames)
    taken = len(a.of_type(BlockRequested))
    assert 1 <= taken <= a.endpoint.params.max_serving_size // (1 + _REQUEST_COST)
    session = next(iter(a.endpoint._sessions.values()))
    assert len(session._served) == taken


def test_a_peer_gets_a_few_manifest_requests_answered_at_once() -> None:
    """Each manifest request is work for the application (a task, index reads): 1,000 tiny
    ones from one peer leave a handful waiting, the rest refused; once those are answered,
    it is served again."""
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    a.serve = False
    b = net.add(make_endpoint(2, B_ID), B)
    _established(net, a, b)
    session = next(iter(b.endpoint._sessions.values()))
    out: list[tuple[bytes, tuple[str, int]]] = []
    for rid in range(1, 1001):
        frame = wire.encode_frame(wire.RequestManifest(rid, 0, 64))
        session._emit(frame, net.now, out, eliciting=False, items=None)
    for data, _ in out:
        a.endpoint.receive_datagram(data, B, net.now)
    net.run_for(0.01)
    waiting = a.of_type(ManifestRequested)
    assert 1 <= len(waiting) <= 4
    for event in waiting:
        a.endpoint.send_manifest(event.request_id, [], more=False)
    net.run_for(0.5)  # the answers are acknowledged
    more: list[tuple[bytes, tuple[str, int]]] = []
    session._emit(
        wire.encode_frame(wire.RequestManifest(2000, 0, 64)),
        net.now,
        more,
        eliciting=False,
        items=None,
    )
    for data, _ in more:
        a.endpoint.receive_datagram(data, B, net.now)
    net.run_for(0.01)
    assert len(a.of_type(ManifestRequested)) == len(waiting) + 1


def test_serving_memory_is_bounded_over_all_sessions_and_freed_when_they_close() -> None:
    """Twelve peers, each asking for as much as one session may hold, together get no more
    than ``max_total_serving``; what their sessions held is released when they close, and
    the next peer is served again."""
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID), A)
    a.serve = False
    per_session = a.endpoint.params.max_serving_size
    total = a.endpoint.params.max_total_serving
    block = 4 * 1024 * 1024
    peers = []
    for i in range(12):
        addr = (f"10.0.1.{i + 1}", 4000)
        peer = net.add(make_endpoint(10 + i, bytes([0x50 + i]) * 8), addr)
        peer.endpoint.connect(A, FOLDER)
        net.run_until(lambda p=peer: bool(p.of_type(SessionEstablished)), 5)
        frames = [
            wire.RequestBlock(rid, "f", 0, 0, block, "sha256", bytes(32))
            for rid in range(1, 2 + per_session // block)
        ]
        _hostile_requests(net, a, peer, frames)
        peers.append(peer)
    assert 12 * per_session > total  # the test asks for more than the node allows
    assert _serving_bytes_held(a) <= total
    assert a.endpoint._ctx.serving_bytes <= total
    for peer in peers:
        peer.endpoint.close(A_ID)
    net.run_until(lambda: len(a.of_type(SessionClosed)) == 12, 5)
    assert a.endpoint._ctx.serving_bytes == 0
    late = net.add(make_endpoint(99, b"L" * 8), ("10.0.2.1", 4000))
    late.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(late.of_type(SessionEstablished)), 5)
    before = len(a.of_type(BlockRequested))
    _hostile_requests(net, a, late, [wire.RequestBlock(1, "f", 0, 0, block, "sha256", bytes(32))])
    assert len(a.of_type(BlockRequested)) == before + 1
