"""Suite-wide guards: no test may leave a thread, an event-loop task or a log handler behind."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

# Threads get this long to finish after a test before they count as leaked.
THREAD_GRACE_SECONDS = 5.0


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_SECONDS
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"test leaked threads: {still}"


@pytest.fixture(autouse=True)
def _virtual_time_for_simulated_engines(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test of a module that runs engines in ``tests.enginesim.Cluster`` runs them on the
    simulator's virtual clock: its ``asyncio.run`` gets a ``VirtualTimeLoop``."""
    enginesim = sys.modules.get("tests.enginesim")
    module = getattr(request, "module", None)
    if enginesim is None or getattr(module, "Cluster", None) is not enginesim.Cluster:
        yield
        return
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(enginesim.VirtualTimePolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


@pytest.fixture(autouse=True)
def _no_logging_left_configured() -> Iterator[None]:
    """A test that runs the command line in-process leaves the root logger as it found it.

    The CLI configures logging as a program should: a handler on the stream that is stderr
    at the time, which in a test is one the test captured. Left behind, it would write every
    later test's log lines into that stream, growing without end.
    """
    root = logging.getLogger()
    level, before = root.level, set(root.handlers)
    yield
    for handler in root.handlers[:]:
        # pytest's own capture handlers are subclasses; the CLI's is a plain StreamHandler.
        if handler not in before and type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)
