"""Seeded simulated networks: loss, duplication, reordering, queue limits, many peers.

Every failure message names the seed; rerun one case with ``-k "seed-loss"``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import pytest

from lanshare.config import TransferConfig
from lanshare.events import (
    Addr,
    BlockReceived,
    CloseReason,
    FailReason,
    ManifestReceived,
    PeerId,
    RequestFailed,
    SessionClosed,
    SessionEstablished,
)
from tests.sim import FOLDER, Link, Network, Node, make_endpoint

A = ("10.0.0.1", 4000)
B = ("10.0.0.2", 4000)
C = ("10.0.0.3", 4000)
IDS = {A: PeerId(b"A" * 8), B: PeerId(b"B" * 8), C: PeerId(b"C" * 8)}


def lan(loss: float, *, dup: float = 0.01, reorder: float = 0.02) -> Link:
    """A 100 MB/s link with 0.5 ms delay, a 512 KiB queue, some jitter."""
    return Link(
        loss=loss,
        dup=dup,
        reorder=reorder,
        reorder_delay=0.001,
        delay=0.0005,
        jitter=0.0001,
        bandwidth=100e6,
        queue_size=512 * 1024,
    )


@dataclass
class Outcome:
    took: float
    sent: int
    drops: int
    retransmitted: int


def _blocks(seed: int, count: int, size: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(size // 2, size)) for _ in range(count)]


def _pair(seed: int, link: Link, **kwargs: object) -> tuple[Network, Node, Node]:
    net = Network(seed, link)
    a = net.add(make_endpoint(seed * 10 + 1, IDS[A], **kwargs), A)  # type: ignore[arg-type]
    b = net.add(make_endpoint(seed * 10 + 2, IDS[B], **kwargs), B)  # type: ignore[arg-type]
    b.endpoint.connect(A, FOLDER)
    net.run_until(lambda: bool(a.of_type(SessionEstablished) and b.of_type(SessionEstablished)), 60)
    return net, a, b


def _pull(net: Network, puller: Node, server: Node, blocks: list[bytes], deadline: float) -> float:
    for blk in blocks:
        server.blocks[hashlib.sha256(blk).digest()] = blk
    ids = {}
    peer = IDS[server.addr]
    for i, blk in enumerate(blocks):
        rid = puller.endpoint.request_block(
            peer,
            FOLDER,
            path=f"f{i}",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )
        ids[rid] = i
    before = len(puller.of_type(BlockReceived)) + len(puller.of_type(RequestFailed))
    took = net.run_until(
        lambda: (
            len(puller.of_type(BlockReceived)) + len(puller.of_type(RequestFailed))
            == before + len(blocks)
        ),
        deadline,
    )
    got = {ids[e.request_id]: e.data for e in puller.of_type(BlockReceived) if e.request_id in ids}
    failed = [e for e in puller.of_type(RequestFailed) if e.request_id in ids]
    assert not failed, f"seed {net.seed}: requests failed: {failed[:3]}"
    for i, blk in enumerate(blocks):
        assert got[i] == blk, f"seed {net.seed}: block {i} differs"
    return took


def transfer(seed: int, link: Link, count: int = 48, size: int = 64 * 1024) -> Outcome:
    net, a, b = _pair(seed, link)
    blocks = _blocks(seed, count, size)
    took = _pull(net, b, a, blocks, deadline=120)
    st = net.stats(A, B)
    return Outcome(
        took, st.sent, st.lost + st.queue_drops, a.endpoint.stats.fragments_retransmitted
    )


@pytest.mark.parametrize("loss", [0.0, 0.01, 0.1, 0.3])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blocks_arrive_identical_with_loss_dup_and_reorder(seed: int, loss: float) -> None:
    out = transfer(seed, lan(loss))
    # Retransmissions follow real drops: at most 20 % more (probes, reordering), plus a little.
    bound = 1.2 * out.drops + 0.02 * out.sent + 20
    assert out.retransmitted <= bound, f"seed {seed}: {out}"
    assert out.took < 30, f"seed {seed}: {out}"


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_goodput_at_one_percent_loss_is_at_least_80_percent_of_lossless(seed: int) -> None:
    lossless = transfer(seed, lan(0.0, dup=0, reorder=0), count=64, size=128 * 1024)
    lossy = transfer(seed, lan(0.01, dup=0, reorder=0), count=64, size=128 * 1024)
    assert lossless.took / lossy.took >= 0.8, f"seed {seed}: {lossless} vs {lossy}"


@pytest.mark.parametrize("seed", [1, 2])
def test_three_peers_pull_from_each_other_at_once(seed: int) -> None:
    net = Network(seed, lan(0.02))
    nodes = {
        addr: net.add(make_endpoint(seed * 10 + i, IDS[addr]), addr)
        for i, addr in enumerate((A, B, C))
    }
    for src, dst in ((A, B), (B, C), (C, A)):
        nodes[src].endpoint.connect(dst, FOLDER)
    net.run_until(lambda: all(len(n.endpoint.peers()) == 2 for n in nodes.values()), 60)
    wanted: dict[tuple[Addr, Addr], list[bytes]] = {}
    ids: dict[tuple[Addr, Addr], dict[int, int]] = {}
    for k, (puller, server) in enumerate(((C, A), (C, B), (A, B), (B, A))):
        blocks = _blocks(seed * 100 + k, 12, 32 * 1024)
        for blk in blocks:
            nodes[server].blocks[hashlib.sha256(blk).digest()] = blk
        wanted[(puller, server)] = blocks
        ids[(puller, server)] = {
            nodes[puller].endpoint.request_block(
                IDS[server],
                FOLDER,
                path="f",
                index=i,
                offset=0,
                size=len(blk),
                hash=hashlib.sha256(blk).digest(),
            ): i
            for i, blk in enumerate(blocks)
        }

    def done() -> bool:
        return sum(len(n.of_type(BlockReceived)) for n in nodes.values()) == 48

    net.run_until(done, 60)
    for (puller, _server), blocks in wanted.items():
        got = {e.request_id: e.data for e in nodes[puller].of_type(BlockReceived)}
        for rid, i in ids[(puller, _server)].items():
            assert got[rid] == blocks[i], f"seed {seed}"
    assert not any(n.of_type(RequestFailed) for n in nodes.values())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_peer_that_goes_silent_mid_transfer_is_detected(seed: int) -> None:
    transfer_cfg = TransferConfig(idle_timeout=3.0, request_timeout=60.0)
    net, a, b = _pair(seed, lan(0.01), transfer=transfer_cfg)
    blocks = _blocks(seed, 32, 128 * 1024)
    for blk in blocks:
        a.blocks[hashlib.sha256(blk).digest()] = blk
    for i, blk in enumerate(blocks):
        b.endpoint.request_block(
            IDS[A],
            FOLDER,
            path="f",
            index=i,
            offset=0,
            size=len(blk),
            hash=hashlib.sha256(blk).digest(),
        )
    net.run_until(lambda: len(b.of_type(BlockReceived)) >= 4, 30)
    silenced_at = net.now
    net.filter = lambda data, src, dst: src != A  # A vanishes
    net.run_until(lambda: bool(b.of_type(SessionClosed)), 30)
    assert b.of_type(SessionClosed) == [SessionClosed(IDS[A], FOLDER, A, CloseReason.PEER_GONE)]
    assert net.now - silenced_at <= 3.0 + 0.01, f"seed {seed}"
    done = len(b.of_type(BlockReceived)) + len(b.of_type(RequestFailed))
    assert done == len(blocks), f"seed {seed}: every request ends with an event"
    assert all(e.reason is FailReason.PEER_GONE for e in b.of_type(RequestFailed))


@pytest.mark.parametrize("seed", [1, 2])
def test_manifest_batches_over_a_lossy_link(seed: int) -> None:
    net, a, b = _pair(seed, lan(0.1))
    rng = random.Random(seed)
    a.records = [rng.randbytes(rng.randint(50, 400)) for _ in range(2000)]
    rid = b.endpoint.request_manifest(IDS[A], FOLDER, since_seq=0)
    net.run_until(lambda: bool(b.of_type(ManifestReceived)), 30)
    (event,) = b.of_type(ManifestReceived)
    assert event.request_id == rid
    assert list(event.records) == a.records, f"seed {seed}"
    assert event.more is False


@pytest.mark.parametrize("seed", [1, 2])
def test_credit_is_shared_by_every_peer_of_an_endpoint(seed: int) -> None:
    """Two servers answer one requester: together they never exceed its total credit."""
    credit = 128 * 1024
    transfer = TransferConfig(max_in_flight_size=credit)
    net = Network(seed, lan(0.01))
    c = net.add(make_endpoint(seed * 10, IDS[C], transfer=transfer), C)
    servers = [
        net.add(make_endpoint(seed * 10 + i, IDS[addr]), addr) for i, addr in enumerate((A, B), 1)
    ]
    for server in servers:
        c.endpoint.connect(server.addr, FOLDER)
    net.run_until(lambda: len(c.endpoint.peers()) == 2, 30)
    expected: dict[int, bytes] = {}
    for k, server in enumerate(servers):
        for i, blk in enumerate(_blocks(seed * 7 + k, 16, 48 * 1024)):
            server.blocks[hashlib.sha256(blk).digest()] = blk
            rid = c.endpoint.request_block(
                IDS[server.addr],
                FOLDER,
                path="f",
                index=i,
                offset=0,
                size=len(blk),
                hash=hashlib.sha256(blk).digest(),
            )
            expected[rid] = blk

    def done() -> bool:
        infos = [c.endpoint.session_info(IDS[s.addr], FOLDER) for s in servers]
        assert sum(i.credit_used for i in infos if i is not None) <= credit, f"seed {seed}"
        return len(c.of_type(BlockReceived)) == len(expected)

    net.run_until(done, 60)
    assert {e.request_id: e.data for e in c.of_type(BlockReceived)} == expected


# -- background mode (LEDBAT): yields to other traffic on a shared bottleneck -------------------

R = ("10.0.0.9", 4000)
R_ID = PeerId(b"R" * 8)


def _share(
    seed: int, senders: dict[Addr, bool], receiver_background: bool = False
) -> dict[Addr, float]:
    """Rates (MB/s) at which R receives from each sender over one shared 25 MB/s downlink."""
    net = Network(seed, Link(delay=0.0005))
    net.share_link(R, Link(delay=0.0005, bandwidth=25e6, queue_size=500_000))
    r = net.add(make_endpoint(seed * 10, R_ID, background=receiver_background), R)
    block = random.Random(seed).randbytes(128 * 1024)
    digest = hashlib.sha256(block).digest()
    nodes = []
    for i, (addr, background) in enumerate(senders.items(), 1):
        node = net.add(make_endpoint(seed * 10 + i, IDS[addr], background=background), addr)
        node.blocks[digest] = block
        nodes.append(node)
        r.endpoint.connect(addr, FOLDER)
    net.run_until(lambda: len(r.endpoint.peers()) == len(senders), 10)
    received = dict.fromkeys(senders, 0)
    outstanding: dict[int, Addr] = {}

    def fill() -> None:
        for addr in senders:
            while list(outstanding.values()).count(addr) < 16:
                rid = r.endpoint.request_block(
                    IDS[addr], FOLDER, path="f", index=0, offset=0, size=len(block), hash=digest
                )
                outstanding[rid] = addr

    def on_event(node: Node, event: object) -> None:
        if isinstance(event, BlockReceived):
            received[outstanding.pop(event.request_id)] += len(event.data)
            fill()

    r.on_event = on_event
    fill()
    net.run_for(0.6)  # past slow start
    before = dict(received)
    net.run_for(1.0)
    modes = {n.addr: n.endpoint.session_info(R_ID, FOLDER) for n in nodes}
    assert all(
        m is not None and m.background == (senders[a] or receiver_background)
        for a, m in modes.items()
    ), f"seed {seed}"
    return {addr: (received[addr] - before[addr]) / 1.0 / 1e6 for addr in senders}


@pytest.mark.parametrize("seed", [1, 2])
def test_background_sender_yields_to_a_foreground_one(seed: int) -> None:
    rates = _share(seed, {A: False, B: True})
    assert rates[A] >= 0.8 * 25, f"seed {seed}: {rates}"
    assert rates[B] <= 0.1 * 25, f"seed {seed}: {rates}"


@pytest.mark.parametrize("seed", [1, 2])
def test_background_sender_alone_uses_the_link(seed: int) -> None:
    rates = _share(seed, {B: True})
    assert rates[B] >= 0.8 * 25, f"seed {seed}: {rates}"


def test_a_receiver_can_ask_its_peers_for_background_mode() -> None:
    rates = _share(3, {A: False, B: False}, receiver_background=True)
    assert sum(rates.values()) >= 0.8 * 25, rates  # the link is still used when alone
