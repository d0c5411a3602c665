"""Many small files as one stream of work: downloads opened in batches (one thread hop and
one index transaction for many files), never more open than the descriptor bound allows,
and a process out of descriptors holds new downloads back instead of failing files.

Real engines, folders and indexes over the simulated network of ``tests.enginesim``; the
descriptor limit is lowered for real around one batch. Patches only count or check calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import threading
from typing import TYPE_CHECKING, Any

from lanshare.blockwriter import BlockWriter
from lanshare.downloads import BUFFERED_MAX, Downloads
from lanshare.engine import FolderSync
from lanshare.errors import DescriptorsExhausted
from lanshare.index import Index
from lanshare.scheduler import Scheduler
from tests.enginesim import Cluster, LinkSpec, converge, random_bytes

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    import pytest

    from tests.enginesim import SimNode


def small_files(node: SimNode, count: int, size: int = 1500) -> None:
    for i in range(count):
        node.write(f"d{i % 7}/f{i:05d}.txt", random_bytes(i, size))


def test_downloads_open_in_batches_one_hop_and_one_transaction_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files too big to be held in memory: each gets its temporary file and partial record
    when it starts, many per thread hop and index transaction."""
    count = 300
    hops: list[str] = []
    real_to_thread = asyncio.to_thread

    def counting_to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", ""))
        return real_to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    opening_threads: set[int] = set()
    transactions: list[int] = []  # per batch: BEGINs issued by the thread opening it
    reads: list[int] = []  # per batch: index reads (each takes the index's lock) by that thread
    batches: list[int] = []
    real_open = Downloads._open_downloads
    real_read = Index._read

    def counting_read(self: Index, action: str) -> Any:
        if threading.get_ident() in opening_threads:
            reads[-1] += 1
        return real_read(self, action)

    monkeypatch.setattr(Index, "_read", counting_read)

    @functools.wraps(real_open)
    def watched_open(self: Downloads, batch: list[Any]) -> list[Any]:
        opening_threads.add(threading.get_ident())
        transactions.append(0)
        reads.append(0)
        try:
            return real_open(self, batch)
        finally:
            opening_threads.discard(threading.get_ident())
            batches.append(len(batch))

    monkeypatch.setattr(Downloads, "_open_downloads", watched_open)

    def trace(statement: str) -> None:
        if threading.get_ident() in opening_threads and statement.startswith("BEGIN"):
            transactions[-1] += 1

    async def main() -> None:
        async with Cluster(tmp_path, seed=11) as cluster:
            a, b = cluster.add(), cluster.add()
            small_files(a, count, BUFFERED_MAX + 1)
            await cluster.start()
            assert b.index is not None
            b.index._conn.set_trace_callback(trace)  # type: ignore[union-attr]
            await converge([a, b], 240)

    asyncio.run(main())
    assert sum(batches) >= count
    opening_hops = sum(1 for name in hops if name.startswith("_open_download"))
    assert opening_hops == len(batches)
    assert opening_hops / count < 0.1, f"{opening_hops} thread hops to open {count} downloads"
    assert transactions
    assert max(transactions) == 1, transactions
    # The partials and the local copies of a batch's files are looked up in one read each:
    # a read per file waits, each time, behind the transactions of the writer and placements.
    assert max(reads) <= 2, reads


def test_never_more_downloads_open_than_the_bound_allows(tmp_path: Path) -> None:
    """A bound of 8 open assemblies (4 slots): 300 files wait their turn, start as slots
    free (without a new plan for each), and all arrive."""
    count = 300

    async def main() -> None:
        async with Cluster(tmp_path, seed=12) as cluster:
            a, b = cluster.add(), cluster.add(open_assemblies=8)
            small_files(a, count)
            await cluster.start()
            peak_fetching = peak_open = 0
            seen_waiting = False

            def sample() -> None:
                nonlocal peak_fetching, peak_open, seen_waiting
                sync = b.folder
                fetching = sum(1 for d in sync.downloads.active.values() if not d.finishing)
                peak_fetching = max(peak_fetching, fetching + len(sync.downloads.opening))
                peak_open = max(peak_open, sync.store.assemblies.open_count)
                seen_waiting = seen_waiting or bool(sync.downloads.waiting)
                assert not sync.failures, sync.failures

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 240
            while len(list(b.root.rglob("f*.txt"))) < count:
                assert loop.time() < deadline, "files did not arrive"
                sample()
                await asyncio.sleep(0.005)
            await converge([a, b], 60)
            assert seen_waiting
            assert peak_fetching <= 4
            # The writer threads may each keep the last one they wrote open.
            assert peak_open <= 8 + (os.cpu_count() or 1) + 4

    asyncio.run(main())


def test_small_files_are_held_in_memory_and_written_once_when_placed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files up to ``BUFFERED_MAX``: no temporary file made nor partial download recorded
    when they start, no block written by the writer; each is written, made durable and put
    in place in one go, and all arrive. Each keeps its download slot until it is placed
    (4 slots here), so the memory they hold stays bounded however slow placing is."""
    count = 200
    begun: list[str] = []
    written: list[str] = []
    real_begin = Index.partial_begin
    real_write = BlockWriter.write

    def counting_begin(self: Index, folder: int, path: str, *args: Any) -> Any:
        begun.append(path)
        return real_begin(self, folder, path, *args)

    async def counting_write(self: BlockWriter, assembly: Any, block: Any) -> None:
        written.append(assembly.record.path)
        await real_write(self, assembly, block)

    monkeypatch.setattr(Index, "partial_begin", counting_begin)
    monkeypatch.setattr(BlockWriter, "write", counting_write)

    async def main() -> None:
        async with Cluster(tmp_path, seed=17) as cluster:
            a, b = cluster.add(), cluster.add(open_assemblies=8)
            small_files(a, count, 20_000)
            await cluster.start()
            peak_held = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 240
            while arrived(b) < count:
                assert loop.time() < deadline, "files did not arrive"
                downloads = b.folder.downloads
                peak_held = max(peak_held, len(downloads.active) + len(downloads.opening))
                await asyncio.sleep(0.005)
            await converge([a, b], 60)
            assert peak_held <= 4

    asyncio.run(main())
    assert begun == []
    assert written == []


def arrived(node: SimNode) -> int:
    """Files in place on ``node`` (0 while this process has no descriptor to look)."""
    try:
        return len(list(node.root.rglob("f*.txt")))
    except OSError:
        return 0


@contextlib.contextmanager
def no_free_descriptor() -> Any:
    """Lower the soft ``RLIMIT_NOFILE`` to the lowest free descriptor number: the next
    ``open`` of this process fails with ``EMFILE``. Restored on exit."""
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_descriptors_holds_downloads_back_never_fails_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first batch B opens meets a real EMFILE (files too big to be held in memory:
    each needs its temporary file open): the files wait and start a moment later, none is
    ever a failure in status, and all arrive."""
    count = 60
    squeezed: list[int] = []
    real_open = Downloads._open_downloads

    def open_without_descriptors(self: Downloads, batch: list[Any]) -> list[Any]:
        if squeezed:
            return real_open(self, batch)
        squeezed.append(len(batch))
        with no_free_descriptor():
            return real_open(self, batch)

    async def main() -> None:
        async with Cluster(tmp_path, seed=13) as cluster:
            a, b = cluster.add(), cluster.add()
            small_files(a, count, BUFFERED_MAX + 1)
            await cluster.start([a])
            await b.start_idle()
            monkeypatch.setattr(Downloads, "_open_downloads", open_without_descriptors)
            assert b.engine is not None
            b._task = asyncio.create_task(b.engine.run())
            await asyncio.wait_for(b.folder.scanned.wait(), 30)
            a.connect(b)
            b.connect(a)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 240
            problems: list[Any] = []
            while arrived(b) < count:
                assert loop.time() < deadline, "files did not arrive"
                status = b.folder.status()
                if b.folder.failures or status["state"] == "error":
                    problems.append((dict(b.folder.failures), status["state"]))
                await asyncio.sleep(0.01)
            await converge([a, b], 60)
            assert not problems, problems[:3]

    with caplog.at_level(logging.INFO, logger="lanshare"):
        asyncio.run(main())
    assert squeezed, "no batch was opened"
    assert "new downloads wait" in caplog.text
    assert "Too many open files" not in "".join(
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    )


def test_a_file_that_meets_emfile_is_never_a_failure(tmp_path: Path) -> None:
    """Wherever a download meets ``EMFILE`` (a write, a placement), the file is not failed:
    new downloads are held back a moment and the next plan asks for it again."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=14) as cluster:
            b = cluster.add()
            await cluster.start()
            sync = b.folder
            sync.fail("d0/f00001.txt", DescriptorsExhausted("Too many open files"))
            assert not sync.failures
            assert sync.downloads.open_held is not None
            assert sync.status()["problems"] == []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while sync.downloads.open_held is not None:
                assert loop.time() < deadline, "new downloads held back for good"
                await asyncio.sleep(0.02)
            assert not sync.failures

    asyncio.run(main())


def test_files_built_from_local_data_are_placed_and_recorded_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b already holds the content of a's 300 new files (200 empty ones, 100 copies of a
    file b has): it builds them all from local data, with no block on the wire, and records
    them in a few commits, not one each; every file is whole, with a's modes."""
    commits: list[int] = []
    commit = FolderSync.commit

    async def counting(self: FolderSync, *records: Any, **kwargs: Any) -> None:
        commits.append(len(records))  # counted only
        await commit(self, *records, **kwargs)

    monkeypatch.setattr(FolderSync, "commit", counting)

    async def main() -> None:
        async with Cluster(tmp_path, seed=9) as cluster:
            a, b = cluster.add(), cluster.add()
            shared = random_bytes(9, 300_000)
            a.write("shared.bin", shared)
            b.write("shared.bin", shared)
            await cluster.start()
            await converge([a, b], 60)
            assert b.engine is not None
            for i in range(200):
                a.write(f"empty/e{i:03d}", b"")
            for i in range(100):
                a.write(f"copies/c{i:03d}.bin", shared)
            os.chmod(a.path("copies/c007.bin"), 0o600)
            received = sum(b.counters.received.values())
            commits.clear()
            await a.scan()
            await converge([a, b], 120)
            assert sum(b.counters.received.values()) == received  # nothing on the wire
            assert b.read("copies/c099.bin") == shared
            assert b.read("empty/e199") == b""
            assert b.path("copies/c007.bin").stat().st_mode & 0o777 == 0o600
            # a's scan is one commit; b's 300 builds a handful (directories, then files).
            assert len(commits) <= 8, commits
            assert max(commits) >= 100, commits

    asyncio.run(main())


def test_a_folder_applying_a_plan_is_syncing_not_in_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a planning pass applies what it decided (here 200 files built from local
    data), the folder's status says ``syncing``: it is not in sync until they are done."""
    seen: list[str] = []
    build = FolderSync._build_and_place

    def watching(self: FolderSync, *args: Any) -> Any:
        seen.append(self.status()["state"])  # observed only
        return build(self, *args)

    monkeypatch.setattr(FolderSync, "_build_and_place", watching)

    async def main() -> None:
        async with Cluster(tmp_path, seed=10) as cluster:
            a, b = cluster.add(), cluster.add()
            await cluster.start()
            await converge([a, b], 60)
            assert b.folder.status()["state"] == "in_sync"
            for i in range(200):
                a.write(f"empty/e{i:03d}", b"")
            await a.scan()
            await converge([a, b], 60)
            assert b.path("empty/e199").exists()
            assert seen
            assert set(seen) == {"syncing"}, seen
            assert b.folder.status()["state"] == "in_sync"

    asyncio.run(main())


def test_a_peer_gets_many_requests_at_once_and_is_measured_from_its_first_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a quiet spell, a peer holding many small files is asked for megabytes of them
    at once (not two at a time until its rate is measured), and its first measured rate is
    what it delivers, not diluted by the pauses before (a quiet spell, then one small file
    fetched a second before the rest)."""
    measured: list[tuple[int, float]] = []
    update_rate = Scheduler.update_rate

    def recording(self: Scheduler, peer: bytes, bytes_per_s: float) -> None:
        measured.append((self.outstanding, bytes_per_s))
        update_rate(self, peer, bytes_per_s)

    monkeypatch.setattr(Scheduler, "update_rate", recording)
    rate = 20e6

    async def main() -> None:
        async with Cluster(tmp_path, seed=31) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=rate, queue_time=1.0))
            await cluster.start()
            await converge([a, b], 20)
            await asyncio.sleep(10)  # nothing to fetch meanwhile (virtual time)
            a.write("first.txt", b"the first file after a quiet spell")
            await a.scan()
            await converge([a, b], 20)
            await asyncio.sleep(1)
            for i in range(600):  # 39 MB: about two seconds of the link
                a.write(f"many/f{i:04d}.bin", random_bytes(i, 64 * 1024))
            await a.scan()
            await converge([a, b], 60)

    asyncio.run(main())
    assert measured, "the rate of the peer was measured during the transfer"
    outstanding, first = measured[0]
    assert outstanding >= 32, "requests in flight before the first measurement"
    assert first >= rate / 4
