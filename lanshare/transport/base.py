"""The adapter core shared by both backends: events out, transmit, one timer.

Async I/O glue with no socket calls of its own; ``fast`` and ``dgram`` add the socket work.
"""

# Theory of operation
# -------------------
# The protocol is a pure object (``SansIOEndpoint``); this package owns everything it must
# not touch: the socket, the clock and the single timer (the shape of aioquic's
# asyncio/protocol.py).
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
# datagrams/s on a 2-core machine), far below a LAN. The fast path drains up to RECV_BATCH datagrams
# per wake-up, hands runs of equal-size datagrams to one destination to one UDP_SEGMENT (GSO)
# send, and with UDP_GRO receives many coalesced datagrams per recvmsg, split at the segment
# size the kernel reports in a control message (~45 datagrams per call on a veth, MTU 1500).
# A GRO batch reaches the endpoint in one ``receive_datagrams`` call as memoryviews of the
# receive buffer (views of full segments are made once per segment size): no copy and no
# Python call per datagram in the adapter; the views are lent for the call only.
#
# Nothing on the network ends the receive loop: ICMP errors, OSError on send or receive and a
# full send buffer are counted in ``stats`` and logged at debug; the protocol retransmits.
# Queues are bounded: the fast path's send queue holds at most ``socket_buffer_size`` bytes and
# drops beyond that; the portable path's likewise.

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from lanshare.addressing import sockaddr

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from lanshare.config import TransferConfig
    from lanshare.events import Addr

logger = logging.getLogger(__name__)

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
#: Process steps run back to back when event callbacks keep calling ``kick()``.
MAX_PROCESS_ROUNDS = 16

_ICMP_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)

E = TypeVar("E")
E_co = TypeVar("E_co", covariant=True)


class SansIOEndpoint(Protocol[E_co]):
    """What the adapter drives: the shape of ``lanshare.protocol.Endpoint``."""

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        """Datagrams received together from ``addr``; memoryviews into the adapter's
        receive buffer are valid only during the call (copy what you keep)."""

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

    def _addr_out(self, addr: Addr) -> Any:
        """``addr`` as this socket's ``sendto`` wants it (IPv4 mapped, a scope as a number)."""
        if self._v6 and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return sockaddr(addr)

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
