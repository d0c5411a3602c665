"""The engine's one clock: monotonic time, wall time, sleeping and timers, injected.

The protocol never reads a clock (it is handed ``now``); the engine asks the ``Clock`` it was
built with, and nothing else, for the time and for its waits. The daemon and the short-lived
``ls``/``pull`` node use ``LoopClock``, the running event loop's. A test may hand the engine
another clock, as long as its timers and sleeps fire at its ``now``: the engine's simulator
runs the engine on an event loop whose time is virtual, so its ``LoopClock`` is that time.

Stopping (``Engine.stop``) bounds its grace with the event loop's timeouts, measured from
``now``: a clock other than the loop's must therefore keep the loop's pace.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable


class Timer(Protocol):
    """A callback due later, until cancelled."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where the engine reads the time and waits."""

    def now(self) -> float:
        """Monotonic seconds: for every delay, deadline and rate."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch: for what is kept across restarts or shown
        (the deletion history, the names and ages of versions kept)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of ``now``."""
        ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        """Call ``callback`` on the event loop once ``delay`` seconds of ``now`` passed."""
        ...


class LoopClock:
    """The running event loop's clock, and the system's wall clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        return self._loop.call_later(delay, callback)
