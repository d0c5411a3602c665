"""The engine simulator's clock: virtual, still while worker threads work, and a seed's run
reproduces exactly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import TYPE_CHECKING, TypeVar

from tests.enginesim import (
    START,
    Cluster,
    LinkSpec,
    VirtualTimeLoop,
    converge,
    random_bytes,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from pathlib import Path

T = TypeVar("T")


def _run(main: Coroutine[object, object, T]) -> T:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)


def test_sleeping_jumps_virtual_time_to_the_timer() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(3600.0)
        return before, loop.time()

    before, after = _run(main())
    assert before == START
    assert after == START + 3600.0


def test_time_stands_still_while_a_worker_thread_runs() -> None:
    """A timer due in 10 ms never fires before a thread job, however long it takes, is
    handed back: the job's result arrives at the time it was submitted."""
    release = threading.Event()
    fired: list[float] = []

    async def main() -> tuple[float, float, list[float]]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, lambda: fired.append(loop.time()))
        submitted = loop.time()
        loop.call_soon(release.set)  # the job waits until the loop ran on a while

        def job() -> list[float]:
            release.wait(30)
            return list(fired)

        seen_by_job = await asyncio.to_thread(job)
        returned = loop.time()
        await asyncio.sleep(0.02)
        return submitted, returned, seen_by_job

    submitted, returned, seen_by_job = _run(main())
    assert returned == submitted
    assert seen_by_job == []
    assert fired == [START + 0.01]


def test_thread_results_come_back_in_the_order_the_jobs_were_submitted() -> None:
    """The second job ends first (the first one waits for it), yet the first result is
    handed to the loop first: the order of events does not depend on the threads' pace."""
    second_done = threading.Event()
    order: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def first() -> None:
            await asyncio.to_thread(second_done.wait, 30)
            order.append("first")

        async def second(pool: concurrent.futures.Executor) -> None:
            await loop.run_in_executor(pool, second_done.set)
            order.append("second")

        # The loop's own worker runs one job at a time: the second job needs a pool of its
        # own to run while the first waits for it.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            await asyncio.gather(first(), second(pool))

    _run(main())
    assert order == ["first", "second"]


def _lossy_run(base: Path, seed: int) -> tuple[object, ...]:
    """What one seeded run of two engines over a lossy link did: the datagrams' fate, when
    (in virtual time) the folders agreed, and what arrived."""

    async def main() -> tuple[object, ...]:
        link = LinkSpec(loss=0.05, dup=0.02, reorder=0.1, rate=2 << 20)
        async with Cluster(base, seed=seed, link=link) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("f.bin", random_bytes(seed, 1 << 20))
            for i in range(20):
                a.write(f"d/s{i}.txt", f"small {i}".encode())
            await cluster.start()
            await converge([a, b], 120)
            loop = asyncio.get_running_loop()
            return (
                loop.time(),
                dict(cluster.network.datagrams),
                len(cluster.network.model.sent_log),
                b.read("f.bin") == a.read("f.bin"),
            )

    return _run(main())


def test_a_seed_reproduces_its_run_exactly(tmp_path: Path) -> None:
    first = _lossy_run(tmp_path / "first", seed=51)
    again = _lossy_run(tmp_path / "again", seed=51)
    assert first == again
    assert first[-1] is True
