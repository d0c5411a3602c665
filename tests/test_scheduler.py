"""Tests of the block scheduler: rarest first, pipelining, failover, bans, end game, and a
small discrete-event simulation of multi-peer pulls (simulated time, no sockets)."""

from __future__ import annotations

import hashlib
import heapq
import random
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare.manifest import Block
from lanshare.scheduler import (
    MAX_GONE_PEERS,
    BlockRef,
    Cancel,
    FailReason,
    LocalCopy,
    LocalSource,
    Request,
    Scheduler,
    SchedulerConfig,
    Step,
)

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

SIZE = 128 * 1024
P1, P2, P3, P4 = (bytes([i]) * 8 for i in range(1, 5))


def make_blocks(n: int, tag: str = "f", size: int = SIZE) -> list[Block]:
    return [Block(i * size, size, hashlib.sha256(f"{tag}:{i}".encode()).digest()) for i in range(n)]


def scheduler(seed: int = 0, **config: float) -> Scheduler:
    return Scheduler(random.Random(seed), SchedulerConfig(**config))  # type: ignore[arg-type]


def requests(steps: list[Step]) -> list[Request]:
    return [s for s in steps if isinstance(s, Request)]


def by_peer(steps: list[Step]) -> dict[bytes, list[int]]:
    out: dict[bytes, list[int]] = {}
    for r in requests(steps):
        out.setdefault(r.peer, []).append(r.block.index)
    return out


# --- choosing ---------------------------------------------------------------------------------


def test_rarest_first():
    s = scheduler()
    blocks = make_blocks(6)
    common = [b.hash for b in blocks[:4]]
    assert s.add_file("f", blocks, {P1: None, P2: common, P3: common})
    picked = by_peer(s.next_requests(0.0))
    assert sorted(picked[P1]) == [4, 5]  # held by P1 alone
    assert set(picked[P2]) | set(picked[P3]) <= {0, 1, 2, 3}


def test_ties_are_broken_by_the_seeded_random():
    def order(seed: int) -> list[int]:
        s = scheduler(seed, min_depth=20)
        s.add_file("f", make_blocks(20), {P1: None})
        return by_peer(s.next_requests(0.0))[P1]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(20))


def test_lower_priority_value_goes_first():
    s = scheduler(min_depth=3)
    s.add_file("later", make_blocks(3, "a"), {P1: None}, priority=5)
    s.add_file("now", make_blocks(3, "b"), {P1: None}, priority=0)
    assert [r.block.file_id for r in requests(s.next_requests(0.0))] == ["now"] * 3


def test_pipeline_depth_follows_the_measured_rate():
    s = scheduler(target_queue_time=0.1, min_depth=2, max_outstanding_per_peer=64)
    s.add_file("f", make_blocks(200), {P1: None, P2: None, P3: None})
    s.update_rate(P1, 10e6)  # 1 MB in 100 ms: 8 blocks of 128 KiB
    s.update_rate(P2, 100e6)  # 77 blocks: capped at 64
    depth = {p: len(v) for p, v in by_peer(s.next_requests(0.0)).items()}
    assert depth == {P1: 8, P2: 64, P3: 2}  # P3 unmeasured: the minimum
    s.update_rate(P3, 5e6)  # 500 kB: 2 more blocks on top of the 2 outstanding
    assert {p: len(v) for p, v in by_peer(s.next_requests(0.0)).items()} == {P3: 2}
    assert s.peer_stats(P3).outstanding == 4


def test_bounds_total_and_tracked():
    s = scheduler(max_outstanding_total=5, max_pending_blocks=10)
    assert s.add_file("f", make_blocks(8), {P1: None, P2: None, P3: None})
    assert not s.add_file("g", make_blocks(3, "g"), {P1: None})  # 11 > 10
    assert len(requests(s.next_requests(0.0))) == 5
    assert s.outstanding == 5
    assert s.tracked == 8


# --- local data -------------------------------------------------------------------------------


def test_local_copies_come_before_any_request_and_fall_back_to_the_network():
    s = scheduler(min_depth=4)
    blocks = make_blocks(3)
    here = LocalSource("old/name", 0)
    s.add_file("f", blocks, {P1: None}, local_sources={blocks[1].hash: here})
    steps = s.next_requests(0.0)
    assert isinstance(steps[0], LocalCopy)
    assert steps[0].target.index == 1
    assert steps[0].source == here
    assert sorted(r.block.index for r in requests(steps)) == [0, 2]
    # The local file changed under us: the block goes to the network.
    assert s.on_block_failed(steps[0].target, None, FailReason.LOCAL, 0.1) == []
    assert [r.block.index for r in requests(s.next_requests(0.2))] == [1]


def test_the_same_content_crosses_the_network_once():
    s = scheduler(min_depth=4)
    (block,) = make_blocks(1)
    s.add_file("a", [block], {P1: None})
    s.add_file("b", [Block(0, SIZE, block.hash), Block(SIZE, SIZE, block.hash)], {P1: None})
    (request,) = requests(s.next_requests(0.0))
    assert s.on_block_done(request.block, P1) == []
    copies = s.next_requests(0.1)
    assert all(isinstance(c, LocalCopy) and c.source == request.block for c in copies)
    assert len(copies) == 2
    for copy in copies:
        assert isinstance(copy, LocalCopy)
        s.on_block_done(copy.target)
    assert (s.remaining("a"), s.remaining("b"), s.tracked) == (0, 0, 0)


def test_have_makes_a_stalled_block_available():
    s = scheduler()
    blocks = make_blocks(2)
    s.add_file("f", blocks, {P1: [blocks[0].hash]})
    assert [r.block.index for r in requests(s.next_requests(0.0))] == [0]
    (waiting,) = s.stalled(0.0)
    assert waiting.index == 1
    s.peer_has(P3, [blocks[1].hash, b"unrelated"])
    assert requests(s.next_requests(0.1)) == [Request(P3, waiting)]
    assert s.stalled(0.1) == []
    assert s.peer_stats(P3).outstanding == 1


# --- failover ---------------------------------------------------------------------------------


def test_peers_coming_and_going_under_fresh_ids_are_remembered_within_a_bound():
    """Each of 2,000 peers (fresh node ids) holds blocks, is asked for one and goes: the
    scheduler remembers at most ``MAX_GONE_PEERS`` of them, the most recent; one that comes
    back within the bound keeps what was learnt of it, and the download completes."""
    s = scheduler(min_depth=1)
    blocks = make_blocks(4)
    s.add_file("f", blocks, {})
    ids = [i.to_bytes(8, "big") for i in range(2000)]
    for peer in ids:
        s.peer_has(peer, [b.hash for b in blocks])
        asked = requests(s.next_requests(0.0))
        assert asked
        s.on_block_failed(asked[0].block, peer, FailReason.TIMEOUT, 0.0)
        s.peer_gone(peer)
    assert len(s._peers) <= MAX_GONE_PEERS
    recent = ids[-1]
    assert s.peer_stats(recent).timeouts == 1
    s.peer_has(recent, [b.hash for b in blocks])
    for _ in range(len(blocks)):
        for request in requests(s.next_requests(1.0)):
            s.on_block_done(request.block, request.peer)
    assert s.remaining("f") == 0


def test_a_vanished_peers_requests_move_to_the_others():
    s = scheduler(min_depth=2)
    s.add_file("f", make_blocks(6), {P1: None, P2: None})
    first = requests(s.next_requests(0.0))
    assert sorted(r.peer for r in first) == [P1, P1, P2, P2]
    assert s.peer_gone(P1) == [Cancel(P1, r.block) for r in first if r.peer == P1]
    served: list[int] = []
    queue = [r for r in first if r.peer == P2]
    for _ in range(20):
        if not queue:
            break
        r = queue.pop(0)
        served.append(r.block.index)
        s.on_block_done(r.block, P2)
        more = requests(s.next_requests(1.0))
        assert all(m.peer == P2 for m in more)
        queue += more
    assert sorted(served) == list(range(6))
    assert s.remaining("f") == 0


def test_failed_requests_try_another_peer():
    s = scheduler(min_depth=1, endgame_max_copies=1)
    s.add_file("f", make_blocks(1), {P1: None, P2: None})
    (r,) = requests(s.next_requests(0.0))
    s.on_block_failed(r.block, r.peer, FailReason.TIMEOUT, 1.0)
    (again,) = requests(s.next_requests(1.0))
    assert again.block == r.block
    assert again.peer != r.peer
    assert s.peer_stats(r.peer).timeouts == 1


def test_a_request_past_its_deadline_is_cancelled_and_moved():
    s = scheduler(min_depth=1, request_timeout=5.0, endgame_max_copies=1)
    s.add_file("f", make_blocks(1), {P1: None, P2: None})
    (r,) = requests(s.next_requests(0.0))
    assert s.next_requests(4.9) == []
    steps = s.next_requests(5.0)
    assert steps[0] == Cancel(r.peer, r.block)
    other = P2 if r.peer == P1 else P1
    assert [(x.peer, x.block) for x in requests(steps)] == [(other, r.block)]
    assert s.peer_stats(r.peer).timeouts == 1


def test_integrity_failures_ban_the_peer_for_a_while():
    s = scheduler(min_depth=4, ban_threshold=3, ban_time=60.0)
    s.add_file("f", make_blocks(12), {P1: None})
    got = requests(s.next_requests(0.0))
    assert len(got) == 4
    assert s.on_block_failed(got[0].block, P1, FailReason.INTEGRITY, 1.0) == []
    assert s.on_block_failed(got[1].block, P1, FailReason.INTEGRITY, 1.0) == []
    cancels = s.on_block_failed(got[2].block, P1, FailReason.INTEGRITY, 1.0)
    assert cancels == [Cancel(P1, got[3].block)]
    assert s.peer_stats(P1).banned_until == 61.0
    assert s.next_requests(30.0) == []
    assert len(requests(s.next_requests(61.0))) == 4  # the ban expired


def test_slow_peer_stays_behind_a_fast_one():
    s = scheduler(min_depth=2)
    s.add_file("f", make_blocks(100), {P1: None, P2: None})
    s.update_rate(P1, 50e6)
    s.update_rate(P2, 1e6)
    depth = {p: len(v) for p, v in by_peer(s.next_requests(0.0)).items()}
    assert depth == {P1: 39, P2: 2}  # 5 MB and 100 kB of queue, at least 2


# --- end game ---------------------------------------------------------------------------------


def test_end_game_duplicates_the_last_blocks_and_cancels_the_loser():
    s = scheduler(min_depth=2)
    s.add_file("f", make_blocks(4), {P1: None, P2: None})
    first = requests(s.next_requests(0.0))
    assert not any(r.duplicate for r in first)
    mine = [r for r in first if r.peer == P1]
    theirs = [r for r in first if r.peer == P2]
    for r in mine:
        assert s.on_block_done(r.block, P1) == []
    dup = requests(s.next_requests(1.0))
    assert {(r.peer, r.block, r.duplicate) for r in dup} == {(P1, r.block, True) for r in theirs}
    assert s.on_block_done(theirs[0].block, P1) == [Cancel(P2, theirs[0].block)]
    assert s.on_block_done(theirs[1].block, P2) == [Cancel(P1, theirs[1].block)]
    assert s.remaining("f") == 0
    assert s.outstanding == 0
    assert s.on_block_done(theirs[1].block, P1) == []  # the late loser is ignored


def test_remove_file_cancels_its_requests():
    s = scheduler(min_depth=3)
    s.add_file("f", make_blocks(3), {P1: None})
    got = requests(s.next_requests(0.0))
    assert sorted(s.remove_file("f"), key=lambda c: c.block.index) == [
        Cancel(P1, r.block) for r in sorted(got, key=lambda r: r.block.index)
    ]
    assert (s.outstanding, s.tracked, s.remaining("f")) == (0, 0, 0)
    assert s.next_requests(1.0) == []


def test_remove_file_after_some_blocks_are_done():
    s = scheduler(min_depth=3)
    s.add_file("f", make_blocks(3), {P1: None})
    first, *rest = sorted(requests(s.next_requests(0.0)), key=lambda r: r.block.index)
    assert s.on_block_done(first.block, P1) == []
    cancels = s.remove_file("f")
    assert sorted(c.block.index for c in cancels) == [r.block.index for r in rest]
    assert (s.outstanding, s.tracked, s.remaining("f")) == (0, 0, 0)


def test_misuse_and_stale_events():
    s = scheduler()
    blocks = make_blocks(2)
    assert s.add_file("empty", [], {P1: None})
    assert s.remaining("empty") == 0
    s.add_file("f", blocks, {P1: None})
    with pytest.raises(ValueError, match="already scheduled"):
        s.add_file("f", blocks, {P1: None})
    unknown = BlockRef("nope", 0, 0, SIZE, b"\0" * 32)
    assert s.peer_gone(P4) == []
    assert s.on_block_done(unknown, P1) == []
    assert s.on_block_failed(unknown, P1, FailReason.TIMEOUT, 0.0) == []
    assert s.remove_file("nope") == []
    (r, _) = requests(s.next_requests(0.0))
    assert s.on_block_failed(r.block, P2, FailReason.TIMEOUT, 0.0) == []  # not asked of P2
    assert s.on_block_failed(r.block, None, FailReason.LOCAL, 0.0) == []  # no local copy
    assert s.peer_stats(P1).outstanding == 2


def test_a_block_obtained_otherwise_is_no_longer_needed():
    s = scheduler(min_depth=1, endgame_max_copies=1)
    s.add_file("f", make_blocks(2), {P1: None})
    (r,) = requests(s.next_requests(0.0))
    # Finding the waiting block on disk by other means completes it without a request.
    i = 1 - r.block.index
    b = make_blocks(2)[i]
    waiting = BlockRef("f", i, b.offset, b.size, b.hash)
    assert s.on_block_done(waiting) == []
    assert s.on_block_done(r.block, P1) == []
    assert s.remaining("f") == 0
    assert s.next_requests(1.0) == []


def test_a_shared_piece_takes_the_most_urgent_priority():
    s = scheduler(min_depth=1, endgame_max_copies=1)
    blocks = make_blocks(2, "x")
    s.add_file("later", blocks[:1], {P1: None}, priority=9)
    s.add_file("other", make_blocks(1, "y"), {P1: None}, priority=5)
    s.add_file("now", blocks, {P1: None}, priority=0)
    assert [r.block.file_id for r in requests(s.next_requests(0.0))] == ["later"]


def test_copy_from_a_fetched_block_that_fails_goes_back_to_the_network():
    s = scheduler(min_depth=2, endgame_max_copies=1)
    (block,) = make_blocks(1)
    s.add_file("a", [block], {P1: None})
    s.add_file("b", [block], {P1: None})
    (r,) = requests(s.next_requests(0.0))
    s.on_block_done(r.block, P1)
    (copy,) = s.next_requests(0.1)
    assert isinstance(copy, LocalCopy)
    s.on_block_failed(copy.target, None, FailReason.LOCAL, 0.2)
    assert requests(s.next_requests(0.3)) == [Request(P1, copy.target)]


def test_remove_file_keeps_what_another_file_needs():
    s = scheduler(min_depth=2, endgame_max_copies=1)
    shared, own = make_blocks(2)
    here = LocalSource("x", 0)
    s.add_file("a", [shared, own], {P1: None}, local_sources={own.hash: here})
    s.add_file("b", [Block(0, SIZE, shared.hash)], {P1: None})
    steps = s.next_requests(0.0)
    assert [type(x).__name__ for x in steps] == ["LocalCopy", "Request"]
    request = requests(steps)[0]
    if request.block.file_id == "a":
        assert s.remove_file("a") == [Cancel(P1, request.block)]
        (again,) = requests(s.next_requests(0.1))
        assert again.block.file_id == "b"
    else:
        assert s.remove_file("a") == []
    assert s.tracked == 1
    copy = steps[0]
    assert isinstance(copy, LocalCopy)
    assert s.on_block_done(copy.target) == []  # the copy for the removed file: ignored


def test_a_partial_holder_picks_among_what_it_has():
    s = scheduler(min_depth=2)
    blocks = make_blocks(30)
    s.add_file("f", blocks, {P1: None, P2: None, P3: [blocks[7].hash, blocks[9].hash]})
    picked = by_peer(s.next_requests(0.0))
    assert sorted(picked[P3]) == [7, 9]  # the only ones it has, though less rare
    assert not (set(picked[P1]) | set(picked[P2])) & {7, 9}


# --- invariants under random events -----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_property_no_duplicate_outside_end_game_and_everything_completes(data):
    seed = data.draw(st.integers(0, 2**16))
    rng = random.Random(seed)
    s = scheduler(seed, min_depth=data.draw(st.integers(1, 4)), request_timeout=3.0)
    peers = [P1, P2, P3]
    files = {}
    for f in range(data.draw(st.integers(1, 3))):
        blocks = make_blocks(data.draw(st.integers(1, 12)), tag=f"t{rng.randrange(3)}")
        files[f"f{f}"] = blocks
        avail: dict[bytes, Collection[bytes] | None] = {
            p: [b.hash for b in blocks if rng.random() < 0.7] for p in peers
        }
        avail[P1] = None  # someone has everything, so it can finish
        assert s.add_file(f"f{f}", blocks, avail)
    outstanding: dict[BlockRef, set[bytes]] = {}
    copies: list[BlockRef] = []
    now = 0.0

    def apply(steps: Sequence[Step]) -> None:
        for step in steps:
            if isinstance(step, LocalCopy):
                copies.append(step.target)
            elif isinstance(step, Cancel):
                outstanding[step.block].discard(step.peer)
            else:
                holders = outstanding.setdefault(step.block, set())
                if not step.duplicate:
                    assert not holders, f"{step} while outstanding at {holders}"
                assert step.peer not in holders
                holders.add(step.peer)
                assert len(holders) <= 2

    for _ in range(400):
        now += data.draw(st.sampled_from([0.0, 0.5, 4.0]))
        apply(s.next_requests(now))
        if copies and data.draw(st.booleans()):
            s.on_block_done(copies.pop(0))
            continue
        live = [(b, p) for b, ps in outstanding.items() for p in sorted(ps)]
        if not live:
            if not copies and all(s.remaining(f) == 0 for f in files):
                break
            continue
        block, peer = live[data.draw(st.integers(0, len(live) - 1))]
        event = data.draw(st.sampled_from(["done", "done", "done", "timeout", "bad", "gone"]))
        if event == "done":
            outstanding[block].discard(peer)
            apply(s.on_block_done(block, peer))
        elif event == "gone" and peer != P1:
            apply(s.peer_gone(peer))
            outstanding = {b: ps - {peer} for b, ps in outstanding.items()}
        elif event in ("timeout", "bad") and peer != P1:
            outstanding[block].discard(peer)
            reason = FailReason.TIMEOUT if event == "timeout" else FailReason.INTEGRITY
            apply(s.on_block_failed(block, peer, reason, now))
    # Drain: complete everything that is asked, with nothing failing.
    for _ in range(10_000):
        now += 0.5
        apply(s.next_requests(now))
        if copies:
            s.on_block_done(copies.pop(0))
            continue
        live = [(b, p) for b, ps in outstanding.items() for p in sorted(ps)]
        if not live:
            break
        block, peer = live[0]
        outstanding[block].discard(peer)
        apply(s.on_block_done(block, peer))
    assert all(s.remaining(f) == 0 for f in files)
    assert s.tracked == 0
    assert s.outstanding == 0


# --- simulation -------------------------------------------------------------------------------


@dataclass
class _Link:
    rate: float
    queue: deque[BlockRef] = field(default_factory=deque)
    sending: BlockRef | None = None
    last_arrival: float = 0.0
    measured: float = 0.0


def simulate(
    rates: dict[bytes, float],
    *,
    blocks: int = 512,
    seed: int = 0,
    latency: float = 0.0005,
    vanish: tuple[bytes, float] | None = None,
) -> tuple[float, dict[bytes, int]]:
    """Pull one file from peers with links of the given rates; return the finish time and
    how many blocks each peer delivered. Time is simulated: an event heap, no sleeping."""
    s = Scheduler(random.Random(seed))
    s.add_file("f", make_blocks(blocks), dict.fromkeys(rates))
    links = {p: _Link(r) for p, r in rates.items()}
    events: list[tuple[float, int, str, bytes, BlockRef | None]] = []
    counter = 0
    sent_at: dict[tuple[bytes, BlockRef], float] = {}
    gone: set[bytes] = set()

    def push(at: float, kind: str, peer: bytes, block: BlockRef | None = None) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (at, counter, kind, peer, block))

    def start(peer: bytes, now: float) -> None:
        link = links[peer]
        if link.sending is None and link.queue:
            link.sending = link.queue.popleft()
            push(now + link.sending.size / link.rate, "sent", peer, link.sending)

    def act(steps: Sequence[Step], now: float) -> None:
        for step in steps:
            assert not isinstance(step, LocalCopy)
            kind = "cancel" if isinstance(step, Cancel) else "request"
            sent_at[(step.peer, step.block)] = now
            push(now + latency, kind, step.peer, step.block)

    if vanish is not None:
        push(vanish[1], "vanish", vanish[0])
    act(s.next_requests(0.0), 0.0)
    now = 0.0
    for _ in range(1_000_000):
        if s.remaining("f") == 0:
            return now, {p: s.peer_stats(p).blocks_done for p in rates}
        assert events, "deadlock: nothing in flight and the file is not complete"
        now, _, kind, peer, block = heapq.heappop(events)
        link = links[peer]
        if kind == "vanish":
            gone.add(peer)
            act(s.peer_gone(peer), now)
            act(s.next_requests(now), now)
        elif peer in gone:
            continue
        elif kind == "request":
            assert block is not None
            link.queue.append(block)
            start(peer, now)
        elif kind == "cancel":
            if block is not None and block in link.queue:
                link.queue.remove(block)
        elif kind == "sent":
            link.sending = None
            start(peer, now)
            push(now + latency, "arrived", peer, block)
        elif kind == "arrived":
            assert block is not None
            # Receiver-side rate estimate: bytes over the time this block occupied the link.
            began = max(link.last_arrival, sent_at[(peer, block)] + 2 * latency)
            sample = block.size / max(now - began, 1e-9)
            link.measured = sample if not link.measured else 0.5 * link.measured + 0.5 * sample
            link.last_arrival = now
            s.update_rate(peer, link.measured)
            act(s.on_block_done(block, peer), now)  # a late end-game loser is ignored
            act(s.next_requests(now), now)
    raise AssertionError("simulation did not finish")


R = 10e6


def test_simulation_four_equal_seeders_are_at_least_three_and_a_half_times_faster():
    one, _ = simulate({P1: R})
    four, spread = simulate({P1: R, P2: R, P3: R, P4: R})
    assert one == pytest.approx(512 * SIZE / R, rel=0.02)
    assert four <= one / 3.5, (one, four)
    # Fairness: every seeder served about a quarter of the blocks.
    assert sum(spread.values()) == 512
    assert all(abs(n - 128) <= 128 * 0.1 for n in spread.values()), spread


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulation_a_slow_seeder_does_not_hold_back_the_fast_ones(seed):
    three, _ = simulate({P1: R, P2: R, P3: R}, blocks=256, seed=seed)
    with_slow, spread = simulate({P1: R, P2: R, P3: R, P4: R / 20}, blocks=256, seed=seed)
    assert with_slow <= three * 1.02, (three, with_slow)
    assert spread[P4] < 10


def test_simulation_a_seeder_vanishing_midway_costs_only_its_share():
    four, _ = simulate({P1: R, P2: R, P3: R, P4: R})
    t, spread = simulate({P1: R, P2: R, P3: R, P4: R}, vanish=(P4, four / 2))
    assert t <= four * (1 + 0.5 / 3) * 1.05, (four, t)
    assert sum(spread.values()) == 512


def test_scheduler_imports_no_io():
    probe = (
        "import sys, lanshare.scheduler\n"
        "print(sorted(set(sys.modules) & {'asyncio', 'socket', 'random', 'sqlite3'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
