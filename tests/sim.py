"""Deterministic network simulator for the sans-IO transfer core.

Pure and in-memory: a fake clock that jumps to the next event, N endpoints, and directed
links with seeded loss, duplication, reordering, delay and jitter, bandwidth and a byte
queue limit. Thousands of simulated seconds run in well under a second of CPU.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from lanshare.config import NetworkConfig, TransferConfig
from lanshare.events import Addr, BlockRequested, Event, FolderId, ManifestRequested
from lanshare.protocol import Endpoint, wire

if TYPE_CHECKING:
    from collections.abc import Callable

E = TypeVar("E")

FOLDER = FolderId(bytes(range(16)))
PSK = bytes(range(100, 132))
#: Most datagrams handed over in one batch (what UDP GRO coalesces at most).
GRO_SEGMENTS = 64


@dataclass(frozen=True, slots=True)
class Link:
    """Behaviour of one direction of a link."""

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    """Probability that a datagram is held back by up to ``reorder_delay`` extra."""
    reorder_delay: float = 0.002
    delay: float = 0.0005
    jitter: float = 0.0
    bandwidth: float = 0.0
    """Bytes per second; 0 means infinitely fast."""
    queue_size: int = 0
    """Bytes the link may have waiting to be serialized; 0 means unlimited."""
    mtu: int = 0
    """Largest datagram the path carries (larger ones are lost, as with DF set); 0: any."""


@dataclass(slots=True)
class LinkStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    queue_drops: int = 0
    duplicated: int = 0
    bytes_sent: int = 0
    busy_until: float = 0.0
    last_arrival: float = 0.0


@dataclass(slots=True)
class Node:
    """One endpoint on the simulated network and what the application side does."""

    endpoint: Endpoint
    addr: Addr
    events: list[Event] = field(default_factory=list)
    blocks: dict[bytes, bytes] = field(default_factory=dict)
    """Blocks served by hash (answered automatically unless ``serve`` is False)."""
    records: list[bytes] = field(default_factory=list)
    serve: bool = True
    on_event: Callable[[Node, Event], None] | None = None

    def handle(self, event: Event) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(self, event)
        if not self.serve:
            return
        if isinstance(event, BlockRequested):
            data = self.blocks.get(event.hash)
            if data is None:
                self.endpoint.reject(event.request_id)
            else:
                self.endpoint.send_block(event.request_id, data)
        elif isinstance(event, ManifestRequested):
            self.endpoint.send_manifest(event.request_id, self.records, more=False)

    def of_type(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


def make_endpoint(
    seed: int,
    node_id: bytes,
    *,
    transfer: TransferConfig | None = None,
    network: NetworkConfig | None = None,
    folders: dict[bytes, bytes] | None = None,
    **knobs: object,
) -> Endpoint:
    return Endpoint(
        transfer or TransferConfig(),
        network or NetworkConfig(),
        node_id=node_id,
        folders={FOLDER: PSK} if folders is None else folders,
        rng=random.Random(seed),
        **knobs,  # type: ignore[arg-type]
    )


class Network:
    """Endpoints joined by lossy links, driven by a fake clock."""

    def __init__(
        self, seed: int, default: Link | None = None, start: float = 1000.0, views: bool = True
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = start
        self.default = default or Link()
        self.nodes: dict[Addr, Node] = {}
        self.links: dict[tuple[Addr, Addr], Link] = {}
        self.shared: dict[Addr, Link] = {}
        """Links into a destination that every source shares (one queue: a bottleneck)."""
        self.link_stats: dict[tuple[Addr, Addr], LinkStats] = {}
        self._heap: list[tuple[float, int, Addr, Addr, bytes]] = []
        self._seq = 0
        self.steps = 0
        self.filter: Callable[[bytes, Addr, Addr], bool] | None = None
        """Return False to drop a datagram (scripted loss); runs before the link's loss."""
        self.sent_log: list[tuple[float, Addr, Addr, int]] = []
        # Deliver datagrams as views of one reused buffer, scribbled over after each call,
        # as the adapter hands over GRO segments: a reference kept past the call shows.
        self.views = views
        self._scratch = bytearray(GRO_SEGMENTS * wire.MAX_DATAGRAM_SIZE)

    def add(self, endpoint: Endpoint, addr: Addr, **kwargs: object) -> Node:
        node = Node(endpoint, addr, **kwargs)  # type: ignore[arg-type]
        self.nodes[addr] = node
        return node

    def set_link(self, src: Addr, dst: Addr, link: Link) -> None:
        self.links[(src, dst)] = link

    def share_link(self, dst: Addr, link: Link) -> None:
        """Every datagram to ``dst`` (without a link of its own) queues on one ``link``."""
        self.shared[dst] = link

    def stats(self, src: Addr, dst: Addr) -> LinkStats:
        return self.link_stats.setdefault((src, dst), LinkStats())

    # ------------------------------------------------------------------ moving datagrams

    def route(self, data: bytes, src: Addr, dst: Addr) -> None:
        self.sent_log.append((self.now, src, dst, len(data)))
        st = self.stats(src, dst)
        st.sent += 1
        st.bytes_sent += len(data)
        if self.filter is not None and not self.filter(data, src, dst):
            st.lost += 1
            return
        link = self.links.get((src, dst))
        queue = st
        if link is None:
            link = self.shared.get(dst, self.default)
            if dst in self.shared:
                queue = self.stats(("*", 0), dst)
        if link.mtu and len(data) > link.mtu:
            st.lost += 1
            return
        rng = self.rng
        if link.loss and rng.random() < link.loss:
            st.lost += 1
            return
        start = self.now
        if link.bandwidth:
            start = max(self.now, queue.busy_until)
            queued = (start - self.now) * link.bandwidth
            if link.queue_size and queued + len(data) > link.queue_size:
                st.queue_drops += 1
                return
            queue.busy_until = start + len(data) / link.bandwidth
            start = queue.busy_until
        at = start + link.delay
        if link.jitter:
            # Jitter varies the delay but a link stays FIFO: only ``reorder`` reorders.
            at = max(at + rng.random() * link.jitter, queue.last_arrival)
        queue.last_arrival = max(queue.last_arrival, at)
        if link.reorder and rng.random() < link.reorder:
            at += rng.random() * link.reorder_delay
        self._push(at, src, dst, data)
        if link.dup and rng.random() < link.dup:
            st.duplicated += 1
            self._push(at + rng.random() * link.reorder_delay, src, dst, data)

    def _push(self, at: float, src: Addr, dst: Addr, data: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, src, dst, data))

    def inject(self, data: bytes, src: Addr, dst: Addr, at: float | None = None) -> None:
        """Deliver a datagram (e.g. a replayed or forged one) bypassing the link model."""
        self._push(self.now if at is None else at, src, dst, data)

    # ------------------------------------------------------------------ the clock

    def flush(self) -> None:
        """Hand events to the nodes and route what the endpoints want to send, until quiet."""
        for _ in range(1000):
            busy = False
            for node in list(self.nodes.values()):
                ep = node.endpoint
                event = ep.next_event()
                while event is not None:
                    busy = True
                    node.handle(event)
                    event = ep.next_event()
                for data, dst in ep.datagrams_to_send(self.now):
                    busy = True
                    self.route(data, node.addr, dst)
            if not busy:
                return
        raise AssertionError("endpoints never quiet down")  # pragma: no cover

    def next_time(self) -> float | None:
        times = [ep_t for n in self.nodes.values() if (ep_t := n.endpoint.get_timer()) is not None]
        if self._heap:
            times.append(self._heap[0][0])
        return min(times) if times else None

    def step(self, until: float) -> bool:
        """Advance to the next event (not past ``until``); False when nothing is left."""
        self.steps += 1
        self.flush()
        t = self.next_time()
        if t is None:
            return False
        if t > until:
            self.now = until
            return True
        self.now = max(self.now, t)
        heap = self._heap
        due: list[tuple[Addr, Addr, bytes]] = []
        while heap and heap[0][0] <= self.now:
            _, _, src, dst, data = heapq.heappop(heap)
            due.append((src, dst, data))
        i = 0
        while i < len(due):
            src, dst, _ = due[i]
            j = i + 1
            while j < len(due) and j - i < GRO_SEGMENTS and due[j][:2] == (src, dst):
                j += 1
            self._deliver(src, dst, [data for _, _, data in due[i:j]])
            i = j
        for node in self.nodes.values():
            t = node.endpoint.get_timer()
            if t is not None and t <= self.now:
                node.endpoint.handle_timer(self.now)
        return True

    def _deliver(self, src: Addr, dst: Addr, datagrams: list[bytes]) -> None:
        """Datagrams due together from one source go over as one batch (as GRO hands them
        over), views of one reused buffer scribbled over after the call; without ``views``
        one at a time, as bytes."""
        node = self.nodes.get(dst)
        if node is None:
            return
        self.stats(src, dst).delivered += len(datagrams)
        if not self.views:
            for data in datagrams:
                node.endpoint.receive_datagram(data, src, self.now)
            return
        scratch = self._scratch
        view = memoryview(scratch)
        views = []
        pos = 0
        for data in datagrams:
            scratch[pos : pos + len(data)] = data
            views.append(view[pos : pos + len(data)])
            pos += len(data)
        node.endpoint.receive_datagrams(views, src, self.now)
        scratch[:pos] = b"\xa5" * pos

    def run_until(
        self, pred: Callable[[], bool], max_time: float, max_steps: int = 2_000_000
    ) -> float:
        """Run until ``pred()`` holds; return the simulated time taken.

        Fails on a deadlock (nothing scheduled while ``pred`` is false), when ``max_time``
        simulated seconds pass, or after ``max_steps`` steps. The seed is in every message.
        """
        start = self.now
        deadline = self.now + max_time
        for _ in range(max_steps):
            self.flush()
            if pred():
                return self.now - start
            if self.now >= deadline:
                raise AssertionError(f"seed {self.seed}: not done after {max_time} s simulated")
            if not self.step(deadline):
                raise AssertionError(f"seed {self.seed}: deadlock (no datagram, no timer)")
        raise AssertionError(f"seed {self.seed}: more than {max_steps} steps")

    def run_for(self, duration: float) -> None:
        """Let ``duration`` simulated seconds pass."""
        deadline = self.now + duration
        for _ in range(2_000_000):
            self.flush()
            if self.now >= deadline or not self.step(deadline):
                self.now = max(self.now, deadline)
                self.flush()
                return
        raise AssertionError("run_for: too many steps")  # pragma: no cover
