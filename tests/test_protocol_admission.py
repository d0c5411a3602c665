"""A stranger without the key: replayed INITIALs, half-open sessions, key-trial floods.

Endpoint tests run on the seeded in-memory network with its fake clock; key trials are
counted by counting the handshake's AEAD opens, never by timing anything.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from lanshare.events import Addr, PeerId, SessionClosed, SessionEstablished
from lanshare.protocol import admission, crypto, wire
from lanshare.protocol.admission import HalfOpen, ReplayCache, TrialBudget
from tests.sim import FOLDER, PSK, Link, Network, Node, make_endpoint

if TYPE_CHECKING:
    from collections.abc import Sequence

A = ("10.0.0.1", 4000)
B = ("10.0.0.2", 4000)
C = ("10.0.0.3", 4000)
A_ID, B_ID, C_ID = PeerId(b"A" * 8), PeerId(b"B" * 8), PeerId(b"C" * 8)
REPLAYER = "10.0.0.99"
#: Folders A accepts in the flood tests: every garbage INITIAL costs one trial per folder.
MANY_FOLDERS = {FOLDER: PSK, **{bytes([i]) * 16: bytes([i]) * 32 for i in range(1, 4)}}


@pytest.fixture
def trials(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the handshake AEAD opens (one per key trial, one per RESPONSE read)."""
    count = [0]
    original = crypto._SymmetricState.decrypt_and_hash

    def counting(self: crypto._SymmetricState, ciphertext: bytes) -> bytes:
        count[0] += 1
        return original(self, ciphertext)

    monkeypatch.setattr(crypto._SymmetricState, "decrypt_and_hash", counting)
    return count


def _recorded_initial(seed: int, node_id: bytes, to: Addr = A) -> bytes:
    """The INITIAL a key holder sent (as a stranger on the path records it)."""
    holder = make_endpoint(seed, node_id)
    holder.connect(to, FOLDER)
    ((initial, _),) = holder.datagrams_to_send(0.0)
    return initial


def _with_token(initial: bytes, token: bytes) -> bytes:
    _, _, old_len, cid = wire.LONG_HEADER.unpack_from(initial)
    body = initial[wire.LONG_HEADER_SIZE + old_len :]
    header = wire.LONG_HEADER.pack(wire.VERSION, wire.PacketType.INITIAL, len(token), cid)
    return header + token + body


def _replay_with_tokens(net: Network, initials: Sequence[tuple[bytes, Addr]]) -> int:
    """Send each INITIAL from its address; answer every RETRY with the INITIAL and the token
    it carried (the sender is at that address: it can). Returns the RETRYs answered."""
    retries: list[tuple[bytes, Addr]] = []

    def capture(data: bytes, src: Addr, dst: Addr) -> bool:
        if src == A and data[1] == wire.PacketType.RETRY:
            retries.append((data[wire.LONG_HEADER_SIZE :], dst))
        return True

    net.filter = capture
    by_addr = {addr: initial for initial, addr in initials}
    for initial, addr in initials:
        net.inject(initial, addr, A)
    net.run_for(0.05)
    answered = list(retries)
    for token, addr in answered:
        net.inject(_with_token(by_addr[addr], token), addr, A)
    net.run_for(0.05)
    net.filter = None
    return len(answered)


def _net(a_folders: dict[bytes, bytes] | None = None) -> tuple[Network, Node, Node]:
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID, folders=a_folders), A)
    b = net.add(make_endpoint(2, B_ID), B)
    return net, a, b


def _connects(net: Network, node: Node, to: Addr = A, within: float = 10.0) -> bool:
    """Whether ``node`` gets a session with ``to``, established on both sides."""
    node.endpoint.connect(to, FOLDER)
    responder = net.nodes[to].endpoint

    def done() -> bool:
        both = any(addr == node.addr for _, _, addr in responder.peers())
        return bool(node.of_type(SessionClosed)) or (both and bool(node.endpoint.peers()))

    net.run_until(done, within)
    return not node.of_type(SessionClosed)


# --- point 7: replayed INITIALs and half-open sessions --------------------------------------


def test_one_initial_replayed_from_300_ports_does_not_block_a_real_peer() -> None:
    """Before: 64 half-open sessions, then the RETRYs' tokens let the rest in, 256 sessions
    filled the table and B's INITIALs were dropped until its handshake timed out."""
    net, a, b = _net()
    initial = _recorded_initial(7, b"K" * 8)
    replays = [(initial, (REPLAYER, 20000 + port)) for port in range(300)]
    _replay_with_tokens(net, replays)
    assert _connects(net, b)
    assert len(a.endpoint._sessions) == 2  # B's, and the first replay's: the others are
    assert a.endpoint.stats.initials_replayed == 299  # dropped before any key trial
    # Nor is A kept from opening sessions itself.
    c = net.add(make_endpoint(3, C_ID), C)
    a.endpoint.connect(C, FOLDER)
    net.run_until(lambda: bool(c.of_type(SessionEstablished)), 5)


@pytest.mark.parametrize("sources", [1, 100])
def test_distinct_initials_from_many_ports_never_starve_real_peers(sources: int) -> None:
    """300 INITIALs that all decrypt (recorded from 300 attempts, or made by a key holder)
    from 300 ports of ``sources`` hosts, each with the token its address was given."""
    net, a, b = _net()
    c = net.add(make_endpoint(3, C_ID), C)
    assert _connects(net, c)  # an established session must survive the flood
    initials = [
        (
            _recorded_initial(100 + i, (1000 + i).to_bytes(8, "big")),
            (f"10.1.{i % sources}.9", 30000 + i),
        )
        for i in range(300)
    ]
    _replay_with_tokens(net, initials)
    sessions = list(a.endpoint._sessions.values())
    assert len(sessions) <= 1 + 64
    assert c.endpoint.peers() == [(A_ID, FOLDER, A)]
    if sources == 1:
        assert len(sessions) <= 1 + admission.MAX_HALF_OPEN_PER_SOURCE
    assert a.endpoint.stats.half_open_evicted >= 300 - 64
    assert _connects(net, b)


def test_a_half_open_session_evicted_comes_back_when_its_initiator_repeats() -> None:
    """The replay cache keys on where an INITIAL came from: the initiator repeating its own
    INITIAL (same address and cid) is not a replay, even after its session was evicted."""
    net, a, b = _net()
    net.filter = lambda data, src, dst: not (src == A and dst == B)  # A's RESPONSE is lost
    b.endpoint.connect(A, FOLDER)
    net.run_for(0.01)
    assert [s.addr for s in a.endpoint._sessions.values()] == [B]  # half-open
    flood = [
        (_recorded_initial(200 + i, (2000 + i).to_bytes(8, "big")), (f"10.4.{i}.1", 5000))
        for i in range(70)
    ]
    _replay_with_tokens(net, flood)  # 63 fill the half-open room with B's, 7 evict
    assert a.endpoint.stats.half_open_evicted == 7
    assert all(s.addr != B for s in a.endpoint._sessions.values())
    net.run_until(lambda: bool(b.of_type(SessionEstablished)), 20)
    assert a.endpoint.stats.initials_replayed == 0


def test_our_own_connect_evicts_a_half_open_session_from_a_full_table() -> None:
    net = Network(1, Link(delay=0.001))
    a = net.add(make_endpoint(1, A_ID, max_sessions=2), A)
    b = net.add(make_endpoint(2, B_ID), B)
    c = net.add(make_endpoint(3, C_ID), C)
    assert _connects(net, b)
    net.inject(_recorded_initial(7, b"K" * 8), (REPLAYER, 20000), A)
    net.run_for(0.01)
    assert len(a.endpoint._sessions) == 2  # B's, and a half-open one nobody will finish
    a.endpoint.connect(C, FOLDER)
    net.run_until(lambda: bool(c.of_type(SessionEstablished)), 5)
    assert not a.of_type(SessionClosed)
    assert b.endpoint.peers() == [(A_ID, FOLDER, A)]


def test_a_forged_retry_does_not_end_a_handshake() -> None:
    """Someone on the LAN saw B's INITIAL (its cid is in the clear) and answers it first
    with a RETRY from A's address carrying a made-up token. B takes the one RETRY it
    accepts and repeats its INITIAL with that token; before, A dropped every copy of it
    (a bad token) and B's handshake timed out."""
    net, _a, b = _net()
    b.endpoint.connect(A, FOLDER)
    ((initial, _),) = b.endpoint.datagrams_to_send(net.now)  # seen, then lost
    _, _, _, cid = wire.LONG_HEADER.unpack_from(initial)
    token = bytes(crypto.RetryTokens.SIZE)
    forged = wire.LONG_HEADER.pack(wire.VERSION, wire.PacketType.RETRY, len(token), cid) + token
    net.inject(forged, A, B)
    assert _connects(net, b)


# --- point 8: key-trial budgets and retry under load -----------------------------------------


class Flooder:
    """A stranger at a real address sending garbage INITIALs (``count`` of them, ``rate`` per
    second); once a RETRY came, each carries the token its address got. Quacks like an
    ``Endpoint`` as far as the network is concerned."""

    def __init__(self, seed: int, target: Addr, rate: float, count: int, start: float) -> None:
        self.rng = random.Random(seed)
        self.target = target
        self.interval = 1.0 / rate
        self.left = count
        self.next_at = start
        self.cid = self.rng.getrandbits(32)
        self.token = b""

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        for data in datagrams:
            if data[1] == wire.PacketType.RETRY:
                self.token = bytes(data[wire.LONG_HEADER_SIZE :])

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out = []
        while self.left and self.next_at <= now:
            header = wire.LONG_HEADER.pack(
                wire.VERSION, wire.PacketType.INITIAL, len(self.token), self.cid
            )
            body = self.rng.randbytes(wire.INITIAL_SIZE - len(header) - len(self.token))
            out.append((header + self.token + body, self.target))
            self.left -= 1
            self.next_at += self.interval
        return out

    def get_timer(self) -> float | None:
        return self.next_at if self.left else None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> None:
        return None


def test_a_garbage_flood_is_budgeted_and_a_known_peer_still_gets_in(trials: list[int]) -> None:
    """Ten strangers at real addresses, 1,000 garbage INITIALs a second each, answering
    RETRYs; A accepts 4 folders (4 trials per INITIAL). Before: every one was tried (120,000
    trials in 3 s). B, which had a session with A before, reconnects in the middle."""
    net, a, b = _net(MANY_FOLDERS)
    assert _connects(net, b)
    b.endpoint.close()
    net.run_for(1.0)
    b.events.clear()
    start = net.now
    duration = 3.0
    for i in range(10):
        flooder = Flooder(50 + i, A, 1000.0, int(1000 * duration), start)
        net.add(flooder, (f"10.5.0.{i + 1}", 6000))  # type: ignore[arg-type]
    before = trials[0]
    net.run_for(duration / 2)
    assert _connects(net, b, within=duration / 2)
    net.run_for(start + duration - net.now)
    paid = trials[0] - before
    stats = a.endpoint.stats
    assert paid <= admission.TRIAL_BURST + admission.TRIAL_RATE * duration + 10
    assert stats.initials_shed > 0
    assert stats.retries_sent >= 10


def test_retry_engages_under_trial_load(trials: list[int]) -> None:
    """Garbage from 2,000 spoofed sources (no RETRY is ever answered) leaves no state, so
    half-open sessions never turned the retry on before: every INITIAL was tried. Now the
    measured load does, and a peer A never saw before still connects through it."""
    net, a, _b = _net(MANY_FOLDERS)
    rng = random.Random(5)
    count = 2000
    for i in range(count):
        header = wire.LONG_HEADER.pack(wire.VERSION, wire.PacketType.INITIAL, 0, i)
        garbage = header + rng.randbytes(wire.INITIAL_SIZE - len(header))
        net.inject(garbage, (f"10.6.{i // 250}.{i % 250 + 1}", 7000), A, at=net.now + i / 2000)
    c = net.add(make_endpoint(3, C_ID), C)
    before = trials[0]
    net.run_for(0.5)
    assert _connects(net, c, within=5.0)
    net.run_for(1.0)  # the rest of the flood
    tried = (trials[0] - before) // len(MANY_FOLDERS)
    assert a.endpoint.stats.retries_sent >= count - tried - 1
    assert tried < count // 4


# --- the parts -------------------------------------------------------------------------------


def test_replay_cache_tells_a_replay_from_a_repeat_and_forgets_in_time() -> None:
    cache = ReplayCache(lifetime=15.0, size=3)
    origin = (("10.0.0.1", 1), 7)
    cache.add(b"e1", origin, 100.0)
    assert not cache.is_replay(b"e1", origin, 101.0)  # the initiator repeating itself
    assert cache.is_replay(b"e1", (("10.0.0.9", 1), 7), 101.0)
    assert cache.is_replay(b"e1", (("10.0.0.1", 2), 7), 101.0)
    assert not cache.is_replay(b"e1", (("10.0.0.9", 1), 7), 115.0)  # a session's lifetime
    for i in range(5):
        cache.add(bytes([i]), origin, 120.0)
    assert len(cache) == 3


def test_half_open_evicts_its_own_source_first_then_the_busiest() -> None:
    table: HalfOpen[str] = HalfOpen(limit=4, per_source=2)
    assert table.victim("x") is None
    table.add("x1", "x")
    table.add("x2", "x")
    assert table.victim("x") == "x1"
    assert table.victim("y") is None
    table.add("y1", "y")
    table.add("z1", "z")
    assert table.victim("w") == "x1"  # full: the oldest of the source holding most
    table.discard("x1")
    table.discard("x2")
    assert table.count("x") == 0
    assert table.oldest_of_busiest() == "y1"


def test_trial_budget_per_source_and_known_peers_first() -> None:
    budget = TrialBudget()
    now = 10.0
    burst = int(admission.SOURCE_TRIAL_BURST)
    assert budget.affordable("s1", burst, now)
    assert budget.affordable("s1", burst, now)  # asking pays nothing
    assert budget.take("s1", burst, now)
    assert not budget.affordable("s1", 1, now)
    assert not budget.take("s1", 1, now)  # its own bucket is empty
    strangers = int(admission.TRIAL_BURST - admission.GOOD_RESERVE) - burst
    assert budget.take("s2", burst, now)
    assert budget.take("s3", strangers - burst, now)
    assert not budget.take("s4", 1, now)  # only the reserve is left, for known peers
    budget.mark_good("g")
    assert budget.take("g", 100, now)
    assert budget.take("s4", 1, now + 1.0)  # refilled
    rate = budget.demand(1000, now)
    assert rate > admission.RETRY_LOAD
    assert budget.demand(0, now + 20 * admission.LOAD_HALF_LIFE) < 1.0
