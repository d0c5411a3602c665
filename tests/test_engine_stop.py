"""Stopping the sync engine: nothing started once it stops, the work in hand ends at a safe
point, and datagrams that keep arriving meanwhile are dropped without a trace.

Real engines, folders and indexes over the simulated network (``tests.enginesim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import warnings
from typing import TYPE_CHECKING, Any

from lanshare import chunker
from lanshare.index import Index
from lanshare.store import FolderStore
from tests.enginesim import (
    BlockCounters,
    Cluster,
    LinkSpec,
    SimNode,
    converge,
    random_bytes,
    temp_files,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MiB = 1024 * 1024
SIZE = 12 * MiB


class Trouble:
    """What the loop and the interpreter report while it is installed: exceptions from
    callbacks (a transport delivering a datagram) and warnings (a coroutine never awaited)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: self.errors.append(str(context)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
                gc.collect()  # an un-awaited coroutine warns when it is collected
            finally:
                loop.set_exception_handler(None)
                self.warnings = [str(w.message) for w in caught]

    def assert_none(self) -> None:
        assert not self.errors, f"{len(self.errors)} loop errors, first: {self.errors[0]}"
        assert not self.warnings, f"warnings: {self.warnings[:3]}"


def _progress(node: SimNode) -> int:
    download = node.folder.downloads.active.get("big.bin")
    return download.bytes_done if download is not None else 0


async def _mid_download(cluster: Cluster) -> tuple[SimNode, SimNode, bytes]:
    """A serves big.bin over a slow link; returns once B holds a third of it."""
    a, b = cluster.add(), cluster.add()
    cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=3 * MiB))
    data = random_bytes(5, SIZE)
    a.write("big.bin", data)
    await cluster.start()
    await wait_for(lambda: _progress(b) >= SIZE // 3, 60, "B a third into big.bin")
    return a, b, data


def _verified_on_disk(node: SimNode) -> tuple[set[bytes], int]:
    """The blocks B's index records as verified (hashes, bytes), each checked against the
    temporary file: the index must never claim a block the disk does not hold."""
    index = Index.open(node.state_dir / "index.sqlite3")
    try:
        folder = index.folders()[0].id
        partial = index.partials_of(folder, ["big.bin"]).get("big.bin")
        records = index.remote_records_for_path(folder, "big.bin")
    finally:
        index.close()
    assert partial is not None
    record = next(iter(records.values()))
    temp = node.root / FolderStore.temp_path(record)
    with temp.open("rb") as f:
        for i in partial.verified:
            block = record.blocks[i]
            f.seek(block.offset)
            data = f.read(block.size)
            assert chunker.block_hash(data, record.hash_algo) == block.hash, f"block {i}"
    blocks = [record.blocks[i] for i in partial.verified]
    return {block.hash for block in blocks}, sum(block.size for block in blocks)


def test_datagrams_after_the_engine_was_cancelled_start_nothing_and_raise_nothing(
    tmp_path: Path,
) -> None:
    """A task group above the engine cancels it mid-download (a Ctrl-C, an error elsewhere)
    while the transport still delivers blocks: each must be dropped quietly, not create a
    task in the finished group (a RuntimeError per datagram) and leave its coroutine
    never awaited."""
    trouble = Trouble()

    async def main() -> None:
        async with Cluster(tmp_path, seed=11) as cluster:
            _, b, _ = await _mid_download(cluster)
            with trouble.installed():
                task = b._task
                assert task is not None
                received = len(b.counters.received_hashes)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                # Blocks in flight keep arriving for a while: let them in.
                await wait_for(
                    lambda: len(b.counters.received_hashes) > received,
                    10,
                    "more blocks delivered to the stopped engine",
                )
                b._task = None

    asyncio.run(main())
    trouble.assert_none()


def test_a_stop_mid_download_keeps_disk_and_index_in_step_and_the_restart_resumes(
    tmp_path: Path,
) -> None:
    """``stop()`` while blocks arrive: no error, no warning; every block the index records
    as verified is on disk; after a restart none of them is fetched again."""
    trouble = Trouble()

    async def main() -> None:
        async with Cluster(tmp_path, seed=12) as cluster:
            a, b, data = await _mid_download(cluster)
            with trouble.installed():
                assert b.engine is not None
                loop = asyncio.get_running_loop()
                started = loop.time()
                received = len(b.counters.received_hashes)
                await b.engine.stop(3.0)
                assert loop.time() - started < 3.5
                await wait_for(
                    lambda: len(b.counters.received_hashes) > received,
                    10,
                    "more blocks delivered to the stopped engine",
                )
                assert b._task is not None
                await asyncio.wait_for(b._task, 1.0)  # run() returned by itself
                b._task = None
                await b.stop()
            verified, size = await asyncio.to_thread(_verified_on_disk, b)
            assert size >= SIZE // 3, f"{size} bytes recorded, a third was verified"
            b.counters = BlockCounters()
            await b.start()
            b.connect(a)
            await converge([a, b], 60)
            assert b.read("big.bin") == data
            again = verified & set(b.counters.received_hashes)
            assert not again, f"{len(again)} verified blocks fetched again"
            assert not temp_files(b.root)

    asyncio.run(main())
    trouble.assert_none()


def test_spawn_before_run_waits_for_it_and_after_stop_is_dropped_unstarted(
    tmp_path: Path,
) -> None:
    trouble = Trouble()
    ran: list[str] = []

    async def work(name: str) -> None:
        ran.append(name)

    async def main() -> None:
        async with Cluster(tmp_path, seed=13) as cluster:
            node = cluster.add()
            await node.start_idle()
            engine = node.engine
            assert engine is not None
            engine.spawn(work("before run"))
            assert ran == []
            runner = asyncio.create_task(engine.run())
            await wait_for(lambda: ran == ["before run"], 5, "the early work to run")
            with trouble.installed():
                await engine.stop(1.0)
                late = work("after stop")
                engine.spawn(late)
                assert inspect.getcoroutinestate(late) == inspect.CORO_CLOSED
                await asyncio.wait_for(runner, 1.0)
                engine.spawn(work("after run"))
            assert ran == ["before run"]

    asyncio.run(main())
    trouble.assert_none()


def test_stop_lets_the_work_in_hand_finish_and_cancels_what_outlives_the_grace(
    tmp_path: Path,
) -> None:
    """Work holding the folder (as an action or a placement does, between its disk step
    and its index step) finishes before the stop returns; work that would never end is
    cancelled once the grace is over."""
    steps: list[str] = []
    forever = asyncio.Event()
    outcome: dict[str, Any] = {}

    async def main() -> None:
        async with Cluster(tmp_path, seed=14) as cluster:
            node = cluster.add()
            await node.start()
            engine, sync = node.engine, node.folder
            assert engine is not None
            target = node.root / "step.txt"

            async def two_steps() -> None:
                async with sync.busy:
                    steps.append("first")
                    await asyncio.to_thread(target.write_text, "first\n")
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(target.write_text, "first\nsecond\n")
                    steps.append("second")

            async def endless() -> None:
                try:
                    await forever.wait()
                except asyncio.CancelledError:
                    outcome["cancelled"] = True
                    raise

            engine.spawn(two_steps())
            engine.spawn(endless())
            await wait_for(lambda: steps == ["first"], 5, "the first step")
            loop = asyncio.get_running_loop()
            started = loop.time()
            await engine.stop(1.0)
            outcome["took"] = loop.time() - started
            assert steps == ["first", "second"]
            assert target.read_text() == "first\nsecond\n"
            assert node._task is not None
            await asyncio.wait_for(node._task, 1.0)
            node._task = None

    asyncio.run(main())
    assert outcome.get("cancelled") is True
    assert 0.9 <= outcome["took"] < 3.0  # the grace, not the endless work
