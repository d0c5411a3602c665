"""The UDP transport adapter: one socket and one port per daemon, driving one sans-IO endpoint.

Async I/O (the only UDP code in lanshare). Two backends behind one interface: a portable one
on asyncio-dgram, and a Linux fast path (batched reads from ``loop.add_reader``, UDP GSO/GRO).
"""

# Theory of operation
# -------------------
# The protocol is a pure object (``SansIOEndpoint``); this module owns everything it must not
# touch: the socket, the clock and the single timer (the shape of aioquic's asyncio/protocol.py).
# After every batch of received datagrams, every timer expiry and every ``kick()`` the adapter
# runs one *process* step:
#
#   1. drain ``next_event()`` into the owner's sink (a callable, or a bounded asyncio.Queue; when
#      the queue is full, reading stops until it has room, so the kernel drops and the protocol
#      retransmits instead of memory growing),
#   2. ``transmit()``: send everything ``datagrams_to_send(now)`` returns,
#   3. re-arm ONE ``loop.call_at(get_timer())``; at most one timer handle is ever pending.
#
# Why a fast path: CPython's selector loop reads one datagram per loop iteration (~21-27k
# datagrams/s measured here), far below a LAN. The fast path drains up to RECV_BATCH datagrams
# per wake-up, hands runs of equal-size datagrams to one destination to one UDP_SEGMENT (GSO)
# send, and with UDP_GRO receives many coalesced datagrams per recvmsg, split at the segment
# size the kernel reports in a control message (research/udp-ceiling.md: ~45 per call).
#
# Nothing on the network ends the receive loop: ICMP errors, OSError on send or receive and a
# full send buffer are counted in ``stats`` and logged at debug; the protocol retransmits.
# Queues are bounded: the fast path's send queue holds at most ``socket_buffer_size`` bytes and
# drops beyond that; the portable path's likewise.

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
import struct
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeAlias, TypeVar

import asyncio_dgram

from lanshare.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from lanshare.config import NetworkConfig, TransferConfig

logger = logging.getLogger(__name__)

Addr: TypeAlias = tuple[str, int]

# Linux socket options; Python 3.11's socket module has no names for these.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU_DISCOVER = 10
IP_PMTUDISC_PROBE = 3  # set DF, never fragment locally, ignore the cached path MTU
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_PROBE = 3

#: Segments per GSO send: UDP_MAX_SEGMENTS is 64 on older kernels (128 on newer ones).
MAX_GSO_SEGMENTS = 64
#: Bytes per GSO send: the largest UDP payload over IPv4.
MAX_GSO_SIZE = 65507
#: Datagrams handled per read wake-up before the loop gets a turn (timers, other sockets).
RECV_BATCH = 256
#: Receive buffer: a whole GRO batch (at most 64 KiB) or any single datagram.
RECV_BUFFER_SIZE = 1 << 17
#: Delay before retrying after ENOBUFS (the socket looks writable, so add_writer cannot help).
ENOBUFS_RETRY_INTERVAL = 0.001
#: Process steps run back to back when event callbacks keep calling ``kick()``.
MAX_PROCESS_ROUNDS = 16

_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_ICMP_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)
_GSO_REFUSED_ERRNOS = frozenset({errno.EIO, errno.EINVAL})

E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)


class SansIOEndpoint(Protocol[E_co]):
    """What the adapter drives: the shape of ``lanshare.protocol.Endpoint``."""

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None: ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> E_co | None: ...


@dataclass(slots=True)
class TransportStats:
    """Counters of one socket (mutable; read them, never reset them)."""

    datagrams_received: int = 0
    bytes_received: int = 0
    recv_calls: int = 0
    """Receive syscalls that returned data; fewer than datagrams when GRO coalesces."""
    datagrams_sent: int = 0
    bytes_sent: int = 0
    send_calls: int = 0
    gso_sends: int = 0
    """Send calls that carried a run of datagrams as UDP_SEGMENT segments."""
    send_blocked: int = 0
    """Times the socket's send buffer was full and sending waited for it to drain."""
    send_dropped: int = 0
    """Datagrams dropped because the bounded send queue was full or the send failed."""
    send_errors: int = 0
    recv_errors: int = 0
    icmp_errors: int = 0
    """Errors reported by ICMP (port or host unreachable): counted, never fatal."""
    truncated: int = 0
    events_blocked: int = 0
    """Times the owner's event queue was full and reading paused until it had room."""
    timer_fires: int = 0


@dataclass(frozen=True, slots=True)
class Features:
    """What the socket's backend uses, found by trying the options at start."""

    backend: str
    """``fast`` (batched Linux path) or ``dgram`` (asyncio-dgram, portable)."""
    gso: bool
    gro: bool


async def open_transport(
    endpoint: SansIOEndpoint[E],
    on_event: Callable[[E], None] | asyncio.Queue[E],
    network: NetworkConfig,
    transfer: TransferConfig,
) -> Transport[E]:
    """Bind the one UDP socket and start driving ``endpoint`` on the running loop.

    Args:
        endpoint: the sans-IO protocol object; the transport is its only caller from now on
            apart from commands, after which the caller calls ``kick()``.
        on_event: where events go: a callable run on the loop (it must not block), or a bounded
            ``asyncio.Queue`` (when full, reading pauses until it has room).
        network: ``bind``, ``port`` (0 = any free port) and ``fast_path`` are used.
        transfer: ``socket_buffer_size`` sizes SO_RCVBUF/SO_SNDBUF and the send queue.

    Returns:
        The running transport; close it with ``await transport.close()`` (or ``async with``).

    Raises:
        ConfigError: ``fast_path`` is unknown, or ``on`` where the fast path or GSO/GRO is
            unavailable, or ``bind`` cannot be bound.
    """
    loop = asyncio.get_running_loop()
    mode = network.fast_path
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f'network.fast_path must be "auto", "on" or "off", not {mode!r}')
    sock = _bind_socket(network, transfer)
    try:
        transport: Transport[E]
        missing = _fast_path_missing(loop, sock) if mode != "off" else "it is off"
        if missing is None:
            gso = _try_setsockopt(sock, SOL_UDP, UDP_SEGMENT, 0)
            gro = _try_setsockopt(sock, SOL_UDP, UDP_GRO, 1)
            if mode == "on" and not (gso and gro):
                lacking = " and ".join(
                    n for n, ok in (("UDP GSO", gso), ("UDP GRO", gro)) if not ok
                )
                missing = f"this kernel has no UDP {lacking}"
            else:
                transport = FastTransport(sock, endpoint, on_event, loop, transfer, gso, gro)
        if missing is not None:
            if mode == "on":
                raise ConfigError(
                    f'network.fast_path = "on" but {missing}; use "auto" to fall back'
                )
            transport = DgramTransport(sock, endpoint, on_event, loop, transfer)
        await transport._start()
    except BaseException:
        sock.close()
        raise
    logger.info(
        "UDP transport on %s port %d: %s backend (GSO %s, GRO %s)",
        transport.local_address[0],
        transport.port,
        transport.features.backend,
        "on" if transport.features.gso else "off",
        "on" if transport.features.gro else "off",
    )
    return transport


class Transport(Generic[E]):
    """One bound UDP socket driving one sans-IO endpoint; made by ``open_transport``."""

    backend: ClassVar[str] = ""

    def __init__(
        self,
        sock: socket.socket,
        endpoint: SansIOEndpoint[E],
        on_event: Callable[[E], None] | asyncio.Queue[E],
        loop: asyncio.AbstractEventLoop,
        transfer: TransferConfig,
    ) -> None:
        self.stats = TransportStats()
        self._sock = sock
        self._endpoint = endpoint
        self._loop = loop
        self._queue: asyncio.Queue[E] | None = None
        self._callback: Callable[[E], None] | None = None
        if isinstance(on_event, asyncio.Queue):
            self._queue = on_event
        else:
            self._callback = on_event
        self._v6 = sock.family == socket.AF_INET6
        self._send_queue_limit = max(transfer.socket_buffer_size, MAX_GSO_SIZE)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._processing = False
        self._process_again = False
        self._events_blocked = False
        self._event_pump: asyncio.Task[None] | None = None
        self._closed = False
        host, port = self._addr_in(sock.getsockname())
        self.local_address: Addr = (host, port)
        """The bound address (IPv4-mapped IPv6 addresses are shown as IPv4)."""

    # -- public API ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound UDP port (the one to announce)."""
        return self.local_address[1]

    @property
    def features(self) -> Features:
        return Features(self.backend, gso=False, gro=False)

    @property
    def timer_at(self) -> float | None:
        """Deadline of the one pending protocol timer, on the loop's clock."""
        return self._timer_at if self._timer is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The socket's file descriptor (for diagnostics; -1 once closed)."""
        return self._sock.fileno()

    def kick(self) -> None:
        """Deliver events and send what the endpoint has now; call after every command."""
        self._process()

    async def close(self) -> None:
        """Stop reading, cancel the timer, send what can go without waiting, close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pump, self._event_pump = self._event_pump, None
        if pump is not None:
            pump.cancel()
        await self._stop()
        if pump is not None:
            await asyncio.gather(pump, return_exceptions=True)

    async def __aenter__(self) -> Transport[E]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the process step (shared by both backends) --------------------------------------------

    def _process(self) -> None:
        """Drain events, transmit, re-arm the timer; re-entrant calls fold into one more round."""
        if self._closed:
            return
        if self._processing:
            self._process_again = True
            return
        self._processing = True
        try:
            for _ in range(MAX_PROCESS_ROUNDS):
                self._process_again = False
                self._drain_events()
                datagrams = self._endpoint.datagrams_to_send(self._loop.time())
                if datagrams:
                    self._send(datagrams)
                if not self._process_again:
                    break
            else:
                self._loop.call_soon(self._process)
        finally:
            self._processing = False
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._closed:
            return
        timer_at = self._endpoint.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._on_timer)
        self._timer_at = timer_at

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.stats.timer_fires += 1
        self._endpoint.handle_timer(self._loop.time())
        self._process()

    def _drain_events(self) -> None:
        if self._events_blocked:
            return
        next_event = self._endpoint.next_event
        callback = self._callback
        if callback is not None:
            while (event := next_event()) is not None:
                callback(event)
            return
        queue = self._queue
        assert queue is not None
        while (event := next_event()) is not None:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # Backpressure: stop reading until the owner catches up; the kernel drops
                # what arrives meanwhile and the protocol retransmits it.
                self.stats.events_blocked += 1
                self._events_blocked = True
                self._pause_reading()
                self._event_pump = self._loop.create_task(self._pump_event(queue, event))
                return

    async def _pump_event(self, queue: asyncio.Queue[E], event: E) -> None:
        await queue.put(event)
        self._event_pump = None
        self._events_blocked = False
        if not self._closed:
            self._resume_reading()
            self._process()

    # -- helpers shared by the backends ------------------------------------------------------

    def _addr_in(self, raw: Any) -> Addr:
        """A socket address as the protocol sees it: ``(host, port)``, IPv4 never mapped."""
        host: str = raw[0]
        if self._v6:
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]
            elif len(raw) > 3 and raw[3]:
                host = f"{host}%{raw[3]}"
        return (host, raw[1])

    def _addr_out(self, addr: Addr) -> Addr:
        if self._v6 and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    def _count_error(self, exc: OSError, sending: bool) -> None:
        if exc.errno in _ICMP_ERRNOS:
            self.stats.icmp_errors += 1
        elif sending:
            self.stats.send_errors += 1
        else:
            self.stats.recv_errors += 1
        logger.debug("UDP %s error ignored: %s", "send" if sending else "receive", exc)

    # -- backend hooks -----------------------------------------------------------------------

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    def _send(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        raise NotImplementedError

    def _pause_reading(self) -> None:
        raise NotImplementedError

    def _resume_reading(self) -> None:
        raise NotImplementedError


class FastTransport(Transport[E]):
    """Linux fast path: non-blocking socket, batched reads from ``add_reader``, GSO and GRO."""

    backend = "fast"

    def __init__(
        self,
        sock: socket.socket,
        endpoint: SansIOEndpoint[E],
        on_event: Callable[[E], None] | asyncio.Queue[E],
        loop: asyncio.AbstractEventLoop,
        transfer: TransferConfig,
        gso: bool,
        gro: bool,
    ) -> None:
        super().__init__(sock, endpoint, on_event, loop, transfer)
        self._gso = gso
        self._gro = gro
        self._buffer = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._buffers = [self._view]
        # Each entry is one send call: (payload, addr, segment size or 0 for plain, datagrams).
        self._out: collections.deque[tuple[bytes, Addr, int, int]] = collections.deque()
        self._out_size = 0
        self._writer_armed = False
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        self._segment_cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}

    @property
    def features(self) -> Features:
        return Features(self.backend, gso=self._gso, gro=self._gro)

    async def _start(self) -> None:
        self._resume_reading()

    async def _stop(self) -> None:
        self._pause_reading()
        if self._out and not self._writer_armed:
            self._flush()  # last datagrams (e.g. a close frame), without waiting
        if self._writer_armed:
            self._loop.remove_writer(self._sock.fileno())
            self._writer_armed = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._out.clear()
        self._sock.close()

    def _pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False

    def _resume_reading(self) -> None:
        if not self._reading and not self._closed:
            reader = self._read_gro if self._gro else self._read_plain
            self._loop.add_reader(self._sock.fileno(), reader)
            self._reading = True

    # -- receive -----------------------------------------------------------------------------

    def _read_plain(self) -> None:
        recvfrom_into = self._sock.recvfrom_into
        buffer, view = self._buffer, self._view
        deliver = self._endpoint.receive_datagram
        addr_in = self._addr_in if self._v6 else None
        now = self._loop.time()
        handled = received = size = 0
        while handled < RECV_BATCH:
            try:
                nbytes, raw = recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._count_error(exc, sending=False)
                handled += 1
                continue
            handled += 1
            received += 1
            size += nbytes
            deliver(view[:nbytes].tobytes(), raw if addr_in is None else addr_in(raw), now)
        self._received(received, received, size)

    def _read_gro(self) -> None:
        recvmsg_into = self._sock.recvmsg_into
        buffers, view = self._buffers, self._view
        deliver = self._endpoint.receive_datagram
        addr_in = self._addr_in if self._v6 else None
        now = self._loop.time()
        handled = received = calls = size = 0
        while handled < RECV_BATCH:
            try:
                nbytes, ancdata, flags, raw = recvmsg_into(buffers, _GRO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._count_error(exc, sending=False)
                handled += 1
                continue
            calls += 1
            if flags & socket.MSG_TRUNC:
                self.stats.truncated += 1
                handled += 1
                continue
            addr = raw if addr_in is None else addr_in(raw)
            size += nbytes
            segment = nbytes
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    segment = int.from_bytes(data[:4], sys.byteorder) or nbytes
            if segment >= nbytes:
                deliver(view[:nbytes].tobytes(), addr, now)
                handled += 1
                received += 1
                continue
            pieces = 0
            for offset in range(0, nbytes, segment):
                deliver(view[offset : min(offset + segment, nbytes)].tobytes(), addr, now)
                pieces += 1
            received += pieces
            handled += pieces
        self._received(received, calls, size)

    def _received(self, datagrams: int, calls: int, size: int) -> None:
        if datagrams:
            stats = self.stats
            stats.datagrams_received += datagrams
            stats.recv_calls += calls
            stats.bytes_received += size
            self._process()

    # -- send --------------------------------------------------------------------------------

    def _send(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        out = self._out
        limit = self._send_queue_limit
        gso = self._gso
        count = len(datagrams)
        i = 0
        while i < count:
            data, addr = datagrams[i]
            segment = len(data)
            j = i + 1
            if gso and segment:
                # A run: same address, equal sizes, the last one may be shorter (GSO rule).
                total = segment
                end = min(count, i + MAX_GSO_SEGMENTS)
                while j < end:
                    data2, addr2 = datagrams[j]
                    size2 = len(data2)
                    if not 0 < size2 <= segment or total + size2 > MAX_GSO_SIZE or addr2 != addr:
                        break
                    total += size2
                    j += 1
                    if size2 < segment:
                        break
            if j - i > 1:
                payload = b"".join([d for d, _ in datagrams[i:j]])
            else:
                payload, segment = data, 0
            n, i = j - i, j
            # The bound applies to the backlog only: while the socket takes everything, each
            # send call goes out at once and nothing waits in the queue.
            blocked = self._writer_armed or self._retry is not None
            if blocked and self._out_size + len(payload) > limit:
                self.stats.send_dropped += n
                continue
            out.append((payload, self._addr_out(addr), segment, n))
            self._out_size += len(payload)
            if not blocked:
                self._flush()

    def _flush(self) -> None:
        out = self._out
        sock = self._sock
        stats = self.stats
        while out:
            payload, addr, segment, datagrams = out[0]
            try:
                if segment:
                    sock.sendmsg([payload], self._segment_cmsg(segment), 0, addr)
                else:
                    sock.sendto(payload, addr)
            except (BlockingIOError, InterruptedError):
                stats.send_blocked += 1
                self._arm_writer()
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    stats.send_blocked += 1
                    self._retry = self._loop.call_later(ENOBUFS_RETRY_INTERVAL, self._retry_flush)
                    return
                out.popleft()
                self._out_size -= len(payload)
                if segment and (exc.errno in _GSO_REFUSED_ERRNOS or exc.errno == errno.EMSGSIZE):
                    self._unsegment(payload, addr, segment, exc)
                    continue
                stats.send_dropped += datagrams
                self._count_error(exc, sending=True)
                continue
            out.popleft()
            self._out_size -= len(payload)
            stats.send_calls += 1
            stats.datagrams_sent += datagrams
            stats.bytes_sent += len(payload)
            if segment:
                stats.gso_sends += 1
        if self._writer_armed:
            self._loop.remove_writer(sock.fileno())
            self._writer_armed = False

    def _unsegment(self, payload: bytes, addr: Addr, segment: int, exc: OSError) -> None:
        """Requeue a refused GSO send as plain datagrams, in order, at the front."""
        if exc.errno in _GSO_REFUSED_ERRNOS and self._gso:
            self._gso = False
            logger.info("UDP GSO refused (%s); sending one datagram per call from now on", exc)
        pieces = [
            (payload[offset : offset + segment], addr, 0, 1)
            for offset in range(0, len(payload), segment)
        ]
        self._out.extendleft(reversed(pieces))
        self._out_size += len(payload)

    def _segment_cmsg(self, segment: int) -> list[tuple[int, int, bytes]]:
        cmsg = self._segment_cmsgs.get(segment)
        if cmsg is None:
            cmsg = self._segment_cmsgs[segment] = [
                (SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))
            ]
        return cmsg

    def _arm_writer(self) -> None:
        if not self._writer_armed:
            self._loop.add_writer(self._sock.fileno(), self._flush)
            self._writer_armed = True

    def _retry_flush(self) -> None:
        self._retry = None
        self._flush()


class DgramTransport(Transport[E]):
    """Portable backend on asyncio-dgram: a reader task and a sender task, both bounded.

    One datagram per loop iteration and per send; asyncio never sends an empty datagram.
    """

    backend = "dgram"

    def __init__(
        self,
        sock: socket.socket,
        endpoint: SansIOEndpoint[E],
        on_event: Callable[[E], None] | asyncio.Queue[E],
        loop: asyncio.AbstractEventLoop,
        transfer: TransferConfig,
    ) -> None:
        super().__init__(sock, endpoint, on_event, loop, transfer)
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._readable = asyncio.Event()
        self._readable.set()
        self._wake_sender = asyncio.Event()
        self._out: collections.deque[tuple[bytes, Addr]] = collections.deque()
        self._out_size = 0
        self._process_scheduled = False

    async def _start(self) -> None:
        self._stream = await asyncio_dgram.from_socket(self._sock)
        self._reader = self._loop.create_task(self._read_loop())
        self._sender = self._loop.create_task(self._send_loop())

    async def _stop(self) -> None:
        tasks = [t for t in (self._reader, self._sender) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._out.clear()
        if self._stream is not None:
            self._stream.close()
            # The transport closes the socket one loop iteration later; wait for that.
            await asyncio.sleep(0)

    def _pause_reading(self) -> None:
        self._readable.clear()

    def _resume_reading(self) -> None:
        self._readable.set()

    async def _read_loop(self) -> None:
        stream = self._stream
        deliver = self._endpoint.receive_datagram
        stats = self.stats
        handled = 0
        while True:
            await self._readable.wait()
            try:
                data, raw = await stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:
                self._count_error(exc, sending=False)
                continue
            stats.datagrams_received += 1
            stats.recv_calls += 1
            stats.bytes_received += len(data)
            deliver(data, self._addr_in(raw), self._loop.time())
            # Queued datagrams come back from recv() without a suspension; process them as one
            # batch once this task yields, and yield at least every RECV_BATCH datagrams.
            if not self._process_scheduled:
                self._process_scheduled = True
                self._loop.call_soon(self._scheduled_process)
            handled += 1
            if handled >= RECV_BATCH:
                handled = 0
                await asyncio.sleep(0)

    def _scheduled_process(self) -> None:
        self._process_scheduled = False
        self._process()

    def _send(self, datagrams: list[tuple[bytes, Addr]]) -> None:
        limit = self._send_queue_limit
        for data, addr in datagrams:
            if self._out_size + len(data) > limit:
                self.stats.send_dropped += 1
                continue
            self._out.append((data, self._addr_out(addr)))
            self._out_size += len(data)
        self._wake_sender.set()

    async def _send_loop(self) -> None:
        stream = self._stream
        stats = self.stats
        out = self._out
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            while out:
                data, addr = out.popleft()
                self._out_size -= len(data)
                # asyncio-dgram raises an earlier error (e.g. ICMP) before sending; count it
                # and try this datagram once more.
                for attempt in range(2):
                    try:
                        await stream.send(data, addr)
                    except asyncio_dgram.TransportClosed:
                        return
                    except OSError as exc:
                        self._count_error(exc, sending=True)
                        if attempt:
                            stats.send_dropped += 1
                        continue
                    stats.send_calls += 1
                    stats.datagrams_sent += 1
                    stats.bytes_sent += len(data)
                    break


def _bind_host(bind: tuple[str, ...]) -> str:
    """The one address to bind: one entry, or the dual-stack pair ``0.0.0.0`` + ``::``."""
    if len(bind) == 1:
        return bind[0]
    if set(bind) == {"0.0.0.0", "::"}:
        return "::"
    raise ConfigError(
        f"network.bind: lanshare uses one UDP socket, so give one address "
        f'(or "::" for IPv4 and IPv6), not {list(bind)!r}'
    )


def _bind_socket(network: NetworkConfig, transfer: TransferConfig) -> socket.socket:
    host = _bind_host(network.bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            if host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            _try_setsockopt(sock, socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
        else:
            _try_setsockopt(sock, socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        _set_buffer(sock, socket.SO_RCVBUF, "rmem_max", transfer.socket_buffer_size)
        _set_buffer(sock, socket.SO_SNDBUF, "wmem_max", transfer.socket_buffer_size)
        sock.bind((host, network.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind UDP {host} port {network.port}: {exc.strerror or exc}; "
            "is another lanshare running? (network.bind, network.port)"
        ) from exc
    return sock


def _set_buffer(sock: socket.socket, option: int, sysctl: str, size: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, option, size)
    # Linux reports twice what it grants (bookkeeping overhead), capped by net.core.*mem_max.
    effective = sock.getsockopt(socket.SOL_SOCKET, option)
    if effective < size:
        logger.warning(
            "UDP socket buffer is %d bytes, less than the %d asked for; raise the cap with "
            "`sysctl -w net.core.%s=%d` for fast links",
            effective,
            size,
            sysctl,
            size,
        )


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def _fast_path_missing(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str | None:
    """Why the fast path cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the fast path needs Linux"
    try:
        loop.add_reader(sock.fileno(), _noop)
    except NotImplementedError:
        return "this event loop cannot watch sockets (no add_reader)"
    loop.remove_reader(sock.fileno())
    return None


def _noop() -> None:
    pass
