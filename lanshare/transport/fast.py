"""The Linux fast path: batched reads from ``loop.add_reader``, UDP GSO sends, GRO receives.

Async I/O on a non-blocking socket.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
import struct
import sys
from typing import TYPE_CHECKING

from lanshare.transport.base import (
    MAX_GSO_SEGMENTS,
    MAX_GSO_SIZE,
    RECV_BATCH,
    RECV_BUFFER_SIZE,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    E,
    Features,
    SansIOEndpoint,
    Transport,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from lanshare.config import TransferConfig
    from lanshare.events import Addr

logger = logging.getLogger(__name__)

#: Delay before retrying after ENOBUFS (the socket looks writable, so add_writer cannot help).
ENOBUFS_RETRY_INTERVAL = 0.001

_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_GSO_REFUSED_ERRNOS = frozenset({errno.EIO, errno.EINVAL})
#: A plain int: ``flags & socket.MSG_TRUNC`` would run enum.Flag.__and__ per receive call.
_MSG_TRUNC = int(socket.MSG_TRUNC)
#: Views of full GRO segments kept for reuse (the kernel coalesces at most 64).
_CACHED_SEGMENTS = 2 * MAX_GSO_SEGMENTS


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
        # Each entry is one send call: (datagrams, their bytes, addr, segment size or 0 for
        # plain). A GSO send hands the datagrams to sendmsg as a scatter/gather list: the
        # kernel joins them, no copy of the run is made here.
        self._out: collections.deque[tuple[list[bytes], int, Addr, int]] = collections.deque()
        self._out_size = 0
        self._writer_armed = False
        self._retry: asyncio.TimerHandle | None = None
        self._reading = False
        self._segment_cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}
        self._segment_size = 0
        self._segment_views: list[memoryview] = []

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
        deliver = self._endpoint.receive_datagrams
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
            deliver((view[:nbytes],), raw if addr_in is None else addr_in(raw), now)
        self._received(received, received, size)

    def _read_gro(self) -> None:
        recvmsg_into = self._sock.recvmsg_into
        buffers, view = self._buffers, self._view
        deliver = self._endpoint.receive_datagrams
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
            if flags & _MSG_TRUNC:
                self.stats.truncated += 1
                handled += 1
                continue
            addr = raw if addr_in is None else addr_in(raw)
            size += nbytes
            segment = nbytes
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    segment = int.from_bytes(data[:4], sys.byteorder) or nbytes
            # A lone datagram never replaces the cached segment size.
            datagrams = self._segments(segment, nbytes) if segment < nbytes else [view[:nbytes]]
            deliver(datagrams, addr, now)
            received += len(datagrams)
            handled += len(datagrams)
        self._received(received, calls, size)

    def _segments(self, segment: int, nbytes: int) -> list[memoryview]:
        """The GRO batch of ``nbytes`` in the buffer cut at ``segment``: views, no copies.

        The views of full segments are kept per segment size (a sender keeps one size), so a
        batch costs one list, not a slice per datagram; at most _CACHED_SEGMENTS are kept."""
        full = nbytes // segment
        views = self._segment_views
        if segment != self._segment_size:
            self._segment_size = segment
            views = self._segment_views = []
        if len(views) < full and len(views) < _CACHED_SEGMENTS:
            view = self._view
            start = len(views) * segment
            stop = min(full, _CACHED_SEGMENTS) * segment
            views.extend(view[offset : offset + segment] for offset in range(start, stop, segment))
        datagrams = views[:full]
        view = self._view
        for offset in range(len(datagrams) * segment, nbytes, segment):
            datagrams.append(view[offset : min(offset + segment, nbytes)])
        return datagrams

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
        count = len(datagrams)
        i = 0
        while i < count:
            data, addr = datagrams[i]
            total = segment = len(data)
            j = i + 1
            if self._gso and segment:  # re-read: a refused send turns it off mid-batch
                # A run: same address, equal sizes, the last one may be shorter (GSO rule).
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
                run = [d for d, _ in datagrams[i:j]]
            else:
                run, segment = [data], 0
            i = j
            # The bound applies to the backlog only: while the socket takes everything, each
            # send call goes out at once and nothing waits in the queue.
            blocked = self._writer_armed or self._retry is not None
            if blocked and self._out_size + total > limit:
                self.stats.send_dropped += len(run)
                continue
            out.append((run, total, self._addr_out(addr), segment))
            self._out_size += total
            if not blocked:
                self._flush()

    def _flush(self) -> None:
        out = self._out
        sock = self._sock
        stats = self.stats
        while out:
            run, size, addr, segment = out[0]
            try:
                if segment:
                    sock.sendmsg(run, self._segment_cmsg(segment), 0, addr)
                else:
                    sock.sendto(run[0], addr)
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
                self._out_size -= size
                if segment and (exc.errno in _GSO_REFUSED_ERRNOS or exc.errno == errno.EMSGSIZE):
                    self._unsegment(run, addr, exc)
                    continue
                stats.send_dropped += len(run)
                self._count_error(exc, sending=True)
                continue
            out.popleft()
            self._out_size -= size
            stats.send_calls += 1
            stats.datagrams_sent += len(run)
            stats.bytes_sent += size
            if segment:
                stats.gso_sends += 1
        if self._writer_armed:
            self._loop.remove_writer(sock.fileno())
            self._writer_armed = False

    def _unsegment(self, run: list[bytes], addr: Addr, exc: OSError) -> None:
        """Requeue a refused GSO send as plain datagrams, in order, at the front."""
        if exc.errno in _GSO_REFUSED_ERRNOS and self._gso:
            self._gso = False
            logger.info("UDP GSO refused (%s); sending one datagram per call from now on", exc)
        self._out.extendleft(([data], len(data), addr, 0) for data in reversed(run))
        self._out_size += sum(map(len, run))

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
