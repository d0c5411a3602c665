"""The portable backend on asyncio-dgram: a reader task and a sender task.

Async I/O through asyncio's datagram transport; works on any platform and event loop.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

import asyncio_dgram

from lanshare.transport.base import RECV_BATCH, E, SansIOEndpoint, Transport

#: Loop turns ``close()`` lets the sender task spend on datagrams still queued.
CLOSE_FLUSH_TURNS = 8

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    from lanshare.config import TransferConfig
    from lanshare.events import Addr


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
        # Give the sender a few turns for what is queued (e.g. a close frame), never more.
        for _ in range(CLOSE_FLUSH_TURNS):
            if not self._out:
                break
            await asyncio.sleep(0)
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
        deliver = self._endpoint.receive_datagrams
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
            deliver((data,), self._addr_in(raw), self._loop.time())
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
