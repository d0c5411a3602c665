"""The UDP adapter over real sockets on loopback: both backends pass the same tests.

Endpoints here are small real sans-IO objects (echo, scripted, a stop-and-wait sender with
retransmission timers); loss comes from a seeded lossy UDP relay, never from patched sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pytest

from lanshare.config import NetworkConfig, TransferConfig
from lanshare.errors import ConfigError
from lanshare.transport import Addr, Transport, open_transport
from tests.lab import make_lab

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence

    from tests.lab import Lab

__all__ = ["make_lab"]  # the netns fixture, used below

# The Linux fast path (GSO/GRO where the kernel has them), the same without GSO and GRO (one
# datagram per syscall), and the portable asyncio-dgram backend.
BACKENDS = ["on", "on-plain", "off"]
LOOPBACK = NetworkConfig(port=0, bind=("127.0.0.1",))
TRANSFER = TransferConfig()
DEADLINE = 20.0  # seconds any one wait may take before the test fails
IP_RECVERR = 11  # Linux; no name in Python 3.11


# -- real sans-IO endpoints used by the tests ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Got:
    data: bytes
    addr: Addr


@dataclass(frozen=True, slots=True)
class AllAcknowledged:
    retransmissions: int


class EchoEndpoint:
    """Reports every datagram; answers ``P…`` with ``R…``; ``send`` is its one command."""

    def __init__(self) -> None:
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list[Got] = []
        self.batches: list[int] = []
        """How many datagrams each ``receive_datagrams`` call carried."""

    def send(self, data: bytes, addr: Addr) -> None:
        self._out.append((data, addr))

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        self.batches.append(len(datagrams))
        for view in datagrams:
            data = bytes(view)  # views into the adapter's buffer are only lent
            self._events.append(Got(data, addr))
            if data[:1] == b"P":
                self._out.append((b"R" + data[1:], addr))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        raise AssertionError("no timer was asked for")

    def next_event(self) -> Got | None:
        return self._events.pop(0) if self._events else None


def payload(seq: int) -> bytes:
    """Deterministic message ``seq``: mostly 1200 bytes, every seventh one shorter."""
    size = 300 + seq % 5 if seq % 7 == 6 else 1200
    seed = hashlib.sha256(seq.to_bytes(4, "big")).digest()
    return (seq.to_bytes(4, "big") + seed * (size // 32 + 1))[:size]


class ReliableSender:
    """Sends messages ``0..count-1`` to an echo peer, ``window`` at a time, until each is echoed.

    A message unanswered after ``rto`` seconds goes again: the timer is the earliest deadline.
    """

    def __init__(self, peer: Addr, count: int, window: int = 32, rto: float = 0.05) -> None:
        self.peer = peer
        self.count = count
        self.window = window
        self.rto = rto
        self.next_seq = 0
        self.sent_at: dict[int, float] = {}  # in flight: seq -> last send time
        self.due: list[int] = []  # to (re)send at the next datagrams_to_send
        self.acked: set[int] = set()
        self.retransmissions = 0
        self.timer_calls = 0
        self._events: list[AllAcknowledged] = []

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        for data in datagrams:
            if data[:1] != b"R" or len(data) < 5:
                continue
            seq = int.from_bytes(data[1:5], "big")
            if seq in self.sent_at and data[1:] == payload(seq):
                del self.sent_at[seq]
                self.acked.add(seq)
                if len(self.acked) == self.count:
                    self._events.append(AllAcknowledged(self.retransmissions))

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        while self.next_seq < self.count and len(self.sent_at) + len(self.due) < self.window:
            self.due.append(self.next_seq)
            self.sent_at[self.next_seq] = now
            self.next_seq += 1
        out = [(b"P" + payload(seq), self.peer) for seq in self.due if seq in self.sent_at]
        for seq in self.due:
            self.sent_at[seq] = now
        self.due = []
        return out

    def get_timer(self) -> float | None:
        return min(self.sent_at.values()) + self.rto if self.sent_at else None

    def handle_timer(self, now: float) -> None:
        self.timer_calls += 1
        late = [seq for seq, at in self.sent_at.items() if at + self.rto <= now]
        self.retransmissions += len(late)
        self.due.extend(late)

    def next_event(self) -> AllAcknowledged | None:
        return self._events.pop(0) if self._events else None


class LossyRelay(asyncio.DatagramProtocol):
    """Forwards between two addresses, dropping each datagram with probability ``drop``."""

    def __init__(self, a: Addr, b: Addr, drop: float, seed: int) -> None:
        self.a, self.b = a, b
        self.drop = drop
        self.random = random.Random(seed)
        self.forwarded = self.dropped = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        target = self.b if addr == self.a else self.a if addr == self.b else None
        if target is None or self.transport is None:
            return
        if self.random.random() < self.drop:
            self.dropped += 1
            return
        self.forwarded += 1
        self.transport.sendto(data, target)


# -- helpers ------------------------------------------------------------------------------------


def run(main: Callable[[], Coroutine[Any, Any, None]], loop_factory: Any = None) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(main(), DEADLINE * 2))


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def opened(
    endpoint: Any, on_event: Any, backend: str, network: NetworkConfig = LOOPBACK
) -> Transport[Any]:
    fast_path, _, variant = backend.partition("-")
    disable = ("gso", "gro") if variant == "plain" else ()
    try:
        return await open_transport(
            endpoint, on_event, replace(network, fast_path=fast_path), TRANSFER, disable=disable
        )
    except ConfigError as exc:
        pytest.skip(f"backend unavailable here: {exc}")


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_b", BACKENDS)
@pytest.mark.parametrize("backend_a", BACKENDS)
def test_datagrams_flow_both_ways(backend_a: str, backend_b: str) -> None:
    async def main() -> None:
        a, b = EchoEndpoint(), EchoEndpoint()
        got_a: list[Got] = []
        got_b: list[Got] = []
        async with (
            await opened(a, got_a.append, backend_a) as ta,
            await opened(b, got_b.append, backend_b) as tb,
        ):
            assert ta.features.backend == ("dgram" if backend_a == "off" else "fast")
            if backend_a != "on":
                assert not ta.features.gso
                assert not ta.features.gro
            for i in range(20):
                a.send(b"P" + payload(i), tb.local_address)
                b.send(b"P" + payload(100 + i), ta.local_address)
            ta.kick()
            tb.kick()
            await wait_until(lambda: len(got_a) == 40 and len(got_b) == 40, "echoes")
        for got, mine, theirs in ((got_a, 0, 100), (got_b, 100, 0)):
            assert sorted(g.data for g in got if g.data[:1] == b"P") == sorted(
                b"P" + payload(theirs + i) for i in range(20)
            )
            assert sorted(g.data for g in got if g.data[:1] == b"R") == sorted(
                b"R" + payload(mine + i) for i in range(20)
            )
        assert {g.addr for g in got_a} == {tb.local_address}
        assert {g.addr for g in got_b} == {ta.local_address}
        assert ta.closed
        assert tb.closed

    run(main)


@pytest.mark.parametrize("receiver_backend", BACKENDS)
@pytest.mark.parametrize("sender_backend", BACKENDS)
def test_gso_runs_arrive_as_the_same_datagrams(sender_backend: str, receiver_backend: str) -> None:
    # Runs longer than a GSO send may carry, a short tail, a size change, a one-byte datagram,
    # and a 45 x 1452-byte run that fills one send almost to 65,507 bytes.
    sizes = [1200] * 70 + [700] + [500] * 3 + [1452] * 47 + [1] + [1200] * 5 + [64]
    rng = random.Random(7)
    datagrams = [rng.randbytes(size) for size in sizes]

    async def main() -> None:
        sender, receiver = EchoEndpoint(), EchoEndpoint()
        got: list[Got] = []
        async with (
            await opened(sender, lambda e: None, sender_backend) as ts,
            await opened(receiver, got.append, receiver_backend) as tr,
        ):
            for data in datagrams:
                sender.send(data, tr.local_address)
            ts.kick()
            await wait_until(lambda: len(got) >= len(datagrams), "all datagrams")
            await asyncio.sleep(0.05)  # anything extra (a mis-split) would show up here
        assert [g.data for g in got] == datagrams
        if ts.features.gso:
            assert ts.stats.gso_sends >= 5
            assert ts.stats.send_calls < len(datagrams) // 10
        if ts.features.gso and tr.features.gro:
            assert tr.stats.recv_calls < len(datagrams) // 10  # GRO handed over whole runs
            # ... and each run reaches the endpoint in one call, not one call per datagram.
            assert len(receiver.batches) == tr.stats.recv_calls
            assert max(receiver.batches) >= 40
        else:
            assert set(receiver.batches) == {1}
        assert tr.stats.datagrams_received == len(datagrams)
        assert tr.stats.bytes_received == sum(sizes)

    run(main)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("drop", "seed"), [(0.0, 1), (0.2, 2), (0.3, 3)])
def test_reliable_exchange_through_lossy_relay(backend: str, drop: float, seed: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo = EchoEndpoint()
        done: list[AllAcknowledged] = []
        async with await opened(echo, lambda e: None, backend) as techo:
            sender = ReliableSender(peer=("127.0.0.1", 0), count=300)
            async with await opened(sender, done.append, backend) as tsend:
                relay = LossyRelay(tsend.local_address, techo.local_address, drop, seed)
                relay_transport, _ = await loop.create_datagram_endpoint(
                    lambda: relay, local_addr=("127.0.0.1", 0)
                )
                try:
                    sender.peer = relay_transport.get_extra_info("sockname")
                    tsend.kick()
                    await wait_until(lambda: bool(done), f"all acknowledged (seed {seed})")
                finally:
                    relay_transport.close()
        assert sender.acked == set(range(300))
        assert tsend.stats.timer_fires == sender.timer_calls
        if drop:
            assert relay.dropped > 0
            assert done[0].retransmissions > 0
        else:
            assert done[0].retransmissions == 0

    run(main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_port_unreachable_does_not_stop_the_receive_loop(backend: str) -> None:
    async def main() -> None:
        a, b = EchoEndpoint(), EchoEndpoint()
        got_a: list[Got] = []
        async with (
            await opened(a, got_a.append, backend) as ta,
            await opened(b, lambda e: None, backend) as tb,
        ):
            # Linux reports ICMP errors on an unconnected socket only with IP_RECVERR: turn
            # it on so that the errors really reach the adapter.
            with socket.fromfd(ta.fileno(), socket.AF_INET, socket.SOCK_DGRAM) as alias:
                alias.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            nowhere = ("127.0.0.1", closed_port())
            for round_ in range(5):
                errors = ta.stats.icmp_errors
                for i in range(4):
                    a.send(b"x" * (10 + i), nowhere)
                ta.kick()
                await wait_until(lambda: ta.stats.icmp_errors > errors, "an ICMP error")  # noqa: B023
                b.send(b"P" + payload(round_), ta.local_address)
                tb.kick()
                await wait_until(lambda: len(got_a) == round_ + 1, "a datagram after it")  # noqa: B023
            a.send(b"P" + payload(99), tb.local_address)
            ta.kick()
            await wait_until(lambda: len(got_a) == 6, "the echo")
        assert [g.data for g in got_a] == [b"P" + payload(i) for i in range(5)] + [
            b"R" + payload(99)
        ]

    run(main)


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that records, at every ``call_at``, how many live handles exist."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[tuple[object, asyncio.TimerHandle]] = []
        self.most_live: dict[int, int] = {}

    def call_at(  # type: ignore[override]
        self, when: float, callback: Any, *args: Any, context: Any = None
    ) -> Any:
        handle = super().call_at(when, callback, *args, context=context)
        owner = getattr(callback, "__self__", None)
        self.handles.append((owner, handle))
        live = sum(
            1
            for o, h in self.handles
            if o is owner and not h.cancelled() and h.when() >= self.time()
        )
        self.most_live[id(owner)] = max(self.most_live.get(id(owner), 0), live)
        return handle


class RestlessTimer:
    """Moves its deadline at every datagram and every expiry; sends a tick at each expiry."""

    def __init__(self, peer: Addr, ticks: int) -> None:
        self.peer = peer
        self.ticks = ticks
        self.fired: list[float] = []
        self.deadline: float | None = None
        self._out: list[tuple[bytes, Addr]] = []

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        self.deadline = now + 0.002 + 0.001 * (len(datagrams[-1]) % 3)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out, self._out = self._out, []
        if self.deadline is None and len(self.fired) < self.ticks:
            self.deadline = now + 0.003
        return out

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        assert self.deadline is not None
        assert now >= self.deadline - 1e-6, "fired early"
        self.fired.append(now)
        self.deadline = None
        self._out.append((b"tick", self.peer))

    def next_event(self) -> None:
        return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_timer_handle_at_a_time(backend: str) -> None:
    loop_holder: list[CountingLoop] = []

    def factory() -> CountingLoop:
        loop_holder.append(CountingLoop())
        return loop_holder[0]

    async def main() -> None:
        echo = EchoEndpoint()
        timer = RestlessTimer(("127.0.0.1", 0), ticks=30)
        ticks: list[Got] = []
        async with (
            await opened(echo, ticks.append, backend) as techo,
            await opened(timer, lambda e: None, backend) as ttimer,
        ):
            timer.peer = techo.local_address
            for i in range(50):  # datagrams that keep moving the deadline
                echo.send(b"n" * i, ttimer.local_address)
                techo.kick()
                await asyncio.sleep(0)
            ttimer.kick()
            await wait_until(lambda: len(timer.fired) == 30, "30 expiries")
            await wait_until(lambda: len(ticks) == 30, "30 ticks")
            assert ttimer.timer_at is None
            assert ttimer.stats.timer_fires == 30
        loop = loop_holder[0]
        assert loop.most_live[id(ttimer)] == 1
        assert sum(1 for owner, _ in loop.handles if owner is ttimer) > 30  # re-armed often

    run(main, loop_factory=factory)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_event_queue_pauses_reading_and_loses_nothing(backend: str) -> None:
    async def main() -> None:
        a, b = EchoEndpoint(), EchoEndpoint()
        queue: asyncio.Queue[Got] = asyncio.Queue(maxsize=2)
        async with (
            await opened(a, queue, backend) as ta,
            await opened(b, lambda e: None, backend) as tb,
        ):
            for i in range(60):
                b.send(b"x" + payload(i), ta.local_address)
            tb.kick()
            await wait_until(lambda: ta.stats.events_blocked > 0, "a full queue")
            got = [await asyncio.wait_for(queue.get(), DEADLINE) for _ in range(60)]
        assert sorted(g.data for g in got) == sorted(b"x" + payload(i) for i in range(60))

    run(main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_and_dual_stack(backend: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        a, b = EchoEndpoint(), EchoEndpoint()
        got_a: list[Got] = []
        got_b: list[Got] = []
        v6 = NetworkConfig(port=0, bind=("::1",))
        dual = NetworkConfig(port=0, bind=("0.0.0.0", "::"))
        async with (
            await opened(a, got_a.append, backend, v6) as ta,
            await opened(b, got_b.append, backend, dual) as tb,
        ):
            assert ta.local_address[0] == "::1"
            a.send(b"P6", ("::1", tb.port))
            ta.kick()
            await wait_until(lambda: len(got_a) == 1 and len(got_b) == 1, "v6 echo")
        assert got_b[0] == Got(b"P6", ("::1", ta.port))
        assert got_a[0] == Got(b"R6", ("::1", tb.port))

    run(main)


def test_dual_stack_reports_ipv4_peers_as_ipv4() -> None:
    async def main() -> None:
        b = EchoEndpoint()
        got_b: list[Got] = []
        dual = NetworkConfig(port=0, bind=("::",))
        async with await opened(b, got_b.append, "auto", dual) as tb:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
                plain.bind(("127.0.0.1", 0))
                plain.setblocking(False)
                plain.sendto(b"P4", ("127.0.0.1", tb.port))
                await wait_until(lambda: len(got_b) == 1, "the datagram")
                loop = asyncio.get_running_loop()
                reply = await asyncio.wait_for(loop.sock_recv(plain, 100), DEADLINE)
                assert got_b[0] == Got(b"P4", plain.getsockname())
        assert reply == b"R4"

    run(main)


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (NetworkConfig(port=0, bind=("127.0.0.1",), fast_path="fastest"), "fast_path"),
        (NetworkConfig(port=0, bind=("127.0.0.1", "127.0.0.2")), "network.bind"),
        (NetworkConfig(port=0, bind=("192.0.2.1",)), "cannot bind"),
    ],
)
def test_bad_network_config_is_a_config_error(network: NetworkConfig, message: str) -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match=message):
            await open_transport(EchoEndpoint(), lambda e: None, network, TRANSFER)

    run(main)


def test_port_in_use_is_a_config_error() -> None:
    async def main() -> None:
        async with await opened(EchoEndpoint(), lambda e: None, "auto") as first:
            taken = NetworkConfig(port=first.port, bind=("127.0.0.1",))
            with pytest.raises(ConfigError, match="another lanshare"):
                await open_transport(EchoEndpoint(), lambda e: None, taken, TRANSFER)

    run(main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_is_idempotent_and_stops_everything(backend: str) -> None:
    async def main() -> None:
        tasks_before = asyncio.all_tasks()
        endpoint = RestlessTimer(("127.0.0.1", closed_port()), ticks=1000)
        transport = await opened(endpoint, lambda e: None, backend)
        transport.kick()
        armed_at = transport.timer_at
        assert armed_at is not None
        await transport.close()
        await transport.close()
        assert transport.closed
        assert transport.timer_at is None
        assert transport.fileno() == -1
        fired = len(endpoint.fired)
        transport.kick()  # a no-op once closed
        await asyncio.sleep(0.02)
        assert len(endpoint.fired) == fired
        assert asyncio.all_tasks() <= tasks_before

    run(main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_still_sends_what_the_last_kick_queued(backend: str) -> None:
    async def main() -> None:
        a, b = EchoEndpoint(), EchoEndpoint()
        got_b: list[Got] = []
        async with await opened(b, got_b.append, backend) as tb:
            ta = await opened(a, lambda e: None, backend)
            a.send(b"bye", tb.local_address)
            ta.kick()
            await ta.close()
            await wait_until(lambda: len(got_b) == 1, "the last datagram")
        assert got_b[0].data == b"bye"

    run(main)


# -- the real protocol between two adapters ------------------------------------------------------

FOLDER = bytes(range(16))
PSK = bytes(range(100, 132))


def _block(index: int, size: int) -> bytes:
    return hashlib.shake_256(index.to_bytes(4, "big")).digest(size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("drop", "seed"), [(0.0, 11), (0.05, 12)])
def test_real_endpoints_transfer_blocks(backend: str, drop: float, seed: int) -> None:
    from lanshare.events import BlockReceived, BlockRequested, SessionEstablished
    from lanshare.protocol import Endpoint

    count, size = 12, 96 * 1024
    transfer = replace(TRANSFER, initial_rtt=0.02)

    def endpoint(rng_seed: int) -> Endpoint:
        return Endpoint(
            transfer,
            LOOPBACK,
            node_id=rng_seed.to_bytes(8, "big"),
            folders={FOLDER: PSK},
            rng=random.Random(rng_seed),
        )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server, fetcher = endpoint(seed), endpoint(seed + 1000)
        received: dict[int, bytes] = {}
        requests: dict[int, int] = {}
        established = asyncio.Event()
        serving: list[Transport[Any]] = []
        fetching: list[Transport[Any]] = []

        def on_server_event(event: object) -> None:
            if isinstance(event, BlockRequested):
                assert server.send_block(event.request_id, _block(event.index, event.size))
                serving[0].kick()

        def on_fetcher_event(event: object) -> None:
            if isinstance(event, SessionEstablished):
                for i in range(count):
                    rid = fetcher.request_block(
                        event.peer,
                        FOLDER,
                        path="f",
                        index=i,
                        offset=i * size,
                        size=size,
                        hash=hashlib.sha256(_block(i, size)).digest(),
                    )
                    requests[rid] = i
                fetching[0].kick()
                established.set()
            elif isinstance(event, BlockReceived):
                received[requests[event.request_id]] = event.data

        async with (
            await opened(server, on_server_event, backend) as tserver,
            await opened(fetcher, on_fetcher_event, backend) as tfetcher,
        ):
            serving.append(tserver)
            fetching.append(tfetcher)
            relay = LossyRelay(tserver.local_address, tfetcher.local_address, drop, seed)
            relay_transport, _ = await loop.create_datagram_endpoint(
                lambda: relay, local_addr=("127.0.0.1", 0)
            )
            try:
                server.connect(relay_transport.get_extra_info("sockname"), FOLDER)
                tserver.kick()
                await wait_until(lambda: len(received) == count, f"all blocks (seed {seed})")
            finally:
                relay_transport.close()
        assert received == {i: _block(i, size) for i in range(count)}
        assert tserver.stats.datagrams_sent > count * size // NetworkConfig().max_datagram_size
        if drop:
            assert relay.dropped > 0
            assert server.stats.fragments_retransmitted + fetcher.stats.packets_lost > 0

    run(main)


# -- a full send buffer, for real: a slow qdisc in a network namespace --------------------------

BLAST_COUNT = 3000
BLAST_SIZE = 1200


@pytest.mark.netns
@pytest.mark.parametrize("backend", ["on", "off"])
def test_full_send_buffer_waits_and_drops_within_bounds(
    backend: str, make_lab: Callable[..., Lab]
) -> None:
    """A token bucket holds sent datagrams in the qdisc, charged to the socket, so sends fail
    with EAGAIN: the adapter waits for writability, drops beyond its bound, and carries on."""
    lab = make_lab(2)
    sender, receiver = lab.hosts
    tbf = ["tbf", "rate", "20mbit", "burst", "16kb", "limit", "4mb"]
    sender.run("tc", "qdisc", "add", "dev", "eth0", "root", *tbf)
    child = sender.python(
        "-m", "tests.test_transport", "blast", backend, sender.address, receiver.address
    )
    result = child.expect_json(lambda obj: "sent" in obj, timeout=DEADLINE * 2)
    assert child.popen.wait(DEADLINE) == 0
    assert result["sent"] + result["dropped"] == BLAST_COUNT
    assert result["dropped"] > 0  # the backlog is bounded
    assert result["sent"] >= 50  # and what fitted went out
    assert result["echoed"]  # the loop still works after the flood
    if backend == "on":
        assert result["blocked"] > 0


async def _blast(backend: str, host: str, peer_host: str) -> dict[str, Any]:
    endpoint = EchoEndpoint()
    got: list[Got] = []
    network = NetworkConfig(port=0, bind=(host,), fast_path=backend)
    small = TransferConfig(socket_buffer_size=65536)
    async with await open_transport(endpoint, got.append, network, small) as transport:
        for i in range(BLAST_COUNT):
            endpoint.send(payload(i)[:4] + bytes(BLAST_SIZE - 4), (peer_host, 9))
        transport.kick()
        stats = transport.stats
        await wait_until(
            lambda: stats.datagrams_sent + stats.send_dropped >= BLAST_COUNT, "the backlog"
        )
        result: dict[str, Any] = {
            "sent": stats.datagrams_sent,
            "dropped": stats.send_dropped,
            "blocked": stats.send_blocked,
        }
        endpoint.send(b"P", transport.local_address)  # to itself: over lo, not the slow eth0
        transport.kick()
        await wait_until(lambda: len(got) >= 2, "the echo to itself")
        result["echoed"] = [g.data for g in got[:2]] == [b"P", b"R"]
        return result


# -- GSO refused by the kernel, and datagrams over the MTU --------------------------------------

SO_NO_CHECK = 11  # no UDP checksums on send: the kernel then refuses GSO with EINVAL


@pytest.mark.parametrize("receiver_backend", BACKENDS)
def test_gso_refused_falls_back_to_one_datagram_per_send(receiver_backend: str) -> None:
    sizes = [1200] * 100 + [800] + [1300] * 10
    rng = random.Random(5)
    datagrams = [rng.randbytes(size) for size in sizes]

    async def main() -> None:
        sender, receiver = EchoEndpoint(), EchoEndpoint()
        got: list[Got] = []
        async with (
            await opened(sender, lambda e: None, "on") as ts,
            await opened(receiver, got.append, receiver_backend) as tr,
        ):
            started_with_gso = ts.features.gso
            assert started_with_gso
            with socket.fromfd(ts.fileno(), socket.AF_INET, socket.SOCK_DGRAM) as alias:
                alias.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            for data in datagrams:
                sender.send(data, tr.local_address)
            ts.kick()
            await wait_until(lambda: len(got) >= len(datagrams), "every datagram")
            assert not ts.features.gso
        assert [g.data for g in got] == datagrams
        assert ts.stats.gso_sends == 0
        assert ts.stats.send_calls == len(datagrams)
        assert ts.stats.send_dropped == 0

    run(main)


RUN_COUNT = 120
TOO_BIG, FITS = 1400, 1000


@pytest.mark.netns
def test_datagrams_over_the_mtu_are_dropped_never_fragmented(
    make_lab: Callable[..., Lab],
) -> None:
    """A run whose segments exceed the interface MTU is refused (EMSGSIZE), resent one datagram
    per call, each refused again (DF, no local fragmentation): dropped and counted. GSO stays
    on, and the next run, which fits, is delivered in order."""
    lab = make_lab(2)
    sender, receiver = lab.hosts
    sender.run("ip", "link", "set", "eth0", "mtu", "1280")
    counter = receiver.python("-m", "tests.test_transport", "count", receiver.address)
    port = counter.expect_json(lambda obj: "port" in obj, timeout=DEADLINE)["port"]
    child = sender.python(
        "-m", "tests.test_transport", "run", sender.address, receiver.address, str(port)
    )
    sent = child.expect_json(lambda obj: "sent" in obj, timeout=DEADLINE * 2)
    got = counter.expect_json(lambda obj: "got" in obj, timeout=DEADLINE * 2)
    assert child.popen.wait(DEADLINE) == 0
    assert counter.popen.wait(DEADLINE) == 0
    assert sent["gso_at_start"]
    assert sent["gso_now"]
    assert sent["gso_sends"] > 0
    assert sent["dropped"] == RUN_COUNT  # the big ones
    assert sent["sent"] == RUN_COUNT  # the ones that fit
    assert got["got"] == [payload(i)[:FITS].hex() for i in range(RUN_COUNT)]


async def _count(host: str) -> None:
    endpoint = EchoEndpoint()
    got: list[Got] = []
    network = NetworkConfig(port=0, bind=(host,), fast_path="auto")
    async with await open_transport(endpoint, got.append, network, TRANSFER) as transport:
        print(json.dumps({"port": transport.port}), flush=True)
        await wait_until(lambda: len(got) >= RUN_COUNT, "every datagram that fits")
    print(json.dumps({"got": [g.data.hex() for g in got]}), flush=True)


async def _run_to(host: str, peer_host: str, port: str) -> None:
    endpoint = EchoEndpoint()
    network = NetworkConfig(port=0, bind=(host,), fast_path="on")
    async with await open_transport(endpoint, lambda e: None, network, TRANSFER) as transport:
        gso_at_start = transport.features.gso
        for data in [bytes(TOO_BIG)] * RUN_COUNT + [payload(i)[:FITS] for i in range(RUN_COUNT)]:
            endpoint.send(data, (peer_host, int(port)))
        transport.kick()
        stats = transport.stats
        await wait_until(
            lambda: stats.datagrams_sent + stats.send_dropped >= 2 * RUN_COUNT, "the runs"
        )
        result = {
            "gso_at_start": gso_at_start,
            "gso_now": transport.features.gso,
            "gso_sends": stats.gso_sends,
            "dropped": stats.send_dropped,
            "sent": stats.datagrams_sent,
        }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    role, arguments = sys.argv[1], sys.argv[2:]
    if role == "blast":
        print(json.dumps(asyncio.run(_blast(*arguments))), flush=True)
    elif role == "count":
        asyncio.run(_count(*arguments))
    elif role == "run":
        asyncio.run(_run_to(*arguments))


def test_with_no_bind_the_socket_is_what_ip_version_needs() -> None:
    from lanshare.transport import _bind_host

    assert _bind_host((), "both") == "::"  # dual-stack: IPv4 too
    assert _bind_host((), "v6") == "::"
    assert _bind_host((), "v4") == "0.0.0.0"
    assert _bind_host(("127.0.0.1",), "both") == "127.0.0.1"  # an explicit bind wins
