"""Faults met by downloads: real ones (an index that cannot be written, a file saved under
us) on real engines, folders and indexes over a simulated network."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from lanshare.watcher import FolderWatcher
from tests.enginesim import (
    BlockCounters,
    Cluster,
    LinkSpec,
    SimNode,
    all_contents,
    converge,
    random_bytes,
    temp_files,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from lanshare.index import Index

MiB = 1024 * 1024
KiB = 1024


class ReadOnlyIndex:
    """The index cannot be written any more (SQLite's ``PRAGMA query_only``: every write
    fails with SQLITE_READONLY, as on a file system remounted read-only); reads work."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.full = False

    def fill(self) -> None:
        self._query_only(True)

    def lift(self) -> None:
        self._query_only(False)

    def _query_only(self, on: bool) -> None:
        conn = self.index._conn
        assert conn is not None
        with self.index._lock:
            conn.execute(f"PRAGMA query_only = {int(on)}")
        self.full = on


class _Hook:
    """Stands where the daemon's watcher does: runs ``then()`` once, when the engine
    announces it is about to write ``rel`` (just before a download is put in place)."""

    def __init__(self, rel: str, then: Callable[[], None]) -> None:
        self.rel, self.then, self.done = rel, then, False

    def expect_own_write(self, rel: str) -> None:
        if rel == self.rel and not self.done:
            self.done = True
            self.then()

    def cancel_own_write(self, rel: str) -> None:
        del rel


def _on_own_write(node: SimNode, rel: str, then: Callable[[], None]) -> None:
    assert node.engine is not None
    node.engine.watchers[node.folder.info.id] = _Hook(rel, then)


def test_a_placement_that_fails_and_cannot_be_replanned_fails_the_path_and_retries(
    tmp_path: Path,
) -> None:
    """Just before B puts ``a.bin`` in place, its user saves a file there and B's index
    turns read-only: the placement refuses to replace the user's file, and the rescan that
    would replan it cannot write to the index either. The path must fail (shown in
    ``problems``) and be retried, never be left being put in place for ever; once the index
    is writable again, both versions are kept on every node."""
    theirs = random_bytes(1, 300 * KiB)
    mine = b"saved by B's user just before the download landed"

    async def main() -> None:
        async with Cluster(tmp_path, seed=31) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("a.bin", theirs)
            await cluster.start(mesh=False)
            assert b.index is not None
            index_fault = ReadOnlyIndex(b.index)

            def user_saves_and_index_turns_read_only() -> None:
                b.write("a.bin", mine)
                index_fault.fill()

            _on_own_write(b, "a.bin", user_saves_and_index_turns_read_only)
            a.connect(b)
            sync = b.folder
            await wait_for(lambda: "a.bin" in sync.failures, 30, "a.bin to fail on B")
            assert "a.bin" not in sync.downloads.committing
            assert "a.bin" not in sync.downloads.active
            assert b.read("a.bin") == mine
            assert sync.status()["state"] == "error"
            index_fault.lift()
            await converge([a, b], 60)
            for node in (a, b):
                contents = await asyncio.to_thread(all_contents, node.root)
                assert {_sha(theirs), _sha(mine)} <= contents, node.name
                assert node.folder.status()["state"] == "in_sync", node.name
                assert node.folder.status()["conflicts"] == 1, node.name

    asyncio.run(main())


def test_a_placement_whose_index_commit_fails_is_rescanned_once_the_index_works(
    tmp_path: Path,
) -> None:
    """B's index turns read-only just as ``a.bin`` is put in place, and writable again right
    after the commit failed: the file in place is rescanned and recorded, never fetched again,
    and the folder ends in sync without a conflict."""
    data = random_bytes(2, 300 * KiB)

    async def main() -> None:
        async with Cluster(tmp_path, seed=32) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("a.bin", data)
            await cluster.start(mesh=False)
            assert b.index is not None
            index_fault = ReadOnlyIndex(b.index)
            _on_own_write(b, "a.bin", index_fault.fill)

            class WritableAfterTheFailure(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    if index_fault.full and "readonly" in record.getMessage():
                        index_fault.lift()

            handler = WritableAfterTheFailure(logging.WARNING)
            logging.getLogger("lanshare").addHandler(handler)
            try:
                b.counters = BlockCounters()
                a.connect(b)
                await wait_for(lambda: b.path("a.bin").exists(), 30, "a.bin in place on B")
                await converge([a, b], 60)
            finally:
                logging.getLogger("lanshare").removeHandler(handler)
            assert not index_fault.full
            assert b.read("a.bin") == data
            assert b.counters.received_total == len(data)  # placed once, never fetched again
            assert b.index.get(b.folder.info.id, "a.bin") is not None
            status = b.folder.status()
            assert status["state"] == "in_sync", status
            assert status["conflicts"] == 0

    asyncio.run(main())


def test_a_failed_download_due_for_a_retry_keeps_its_verified_blocks(tmp_path: Path) -> None:
    """B's index turns read-only halfway through a download: recording its verified blocks
    fails, so the path fails and waits for its retry. The planning passes meanwhile must keep its
    temporary file and the blocks it recorded, and the retry fetch only the rest."""
    size = 4 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=33) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=1 * MiB))
            data = random_bytes(3, size)
            a.write("big.bin", data)
            await cluster.start()
            assert b.index is not None
            sync = b.folder
            index_fault = ReadOnlyIndex(b.index)
            await wait_for(
                lambda: (
                    (d := sync.downloads.active.get("big.bin")) is not None
                    and d.bytes_done >= size // 3
                ),
                60,
                "a third of big.bin on B",
            )
            index_fault.fill()
            await wait_for(lambda: "big.bin" in sync.failures, 30, "big.bin to fail on B")
            index_fault.lift()
            (partial,) = b.index.partials(sync.info.id)
            blocks = b.index.remote_records_for_path(sync.info.id, "big.bin")[a.node_id].blocks
            verified = {blocks[i].hash for i in partial.verified}
            assert verified
            await sync.plan_and_apply()  # a pass while the retry is not due yet
            assert temp_files(b.root)
            assert b.index.partials(sync.info.id)
            b.counters = BlockCounters()
            await converge([a, b], 120)
            assert b.read("big.bin") == data
            again = verified & set(b.counters.received_hashes)
            assert not again, f"{len(again)} blocks verified before the failure fetched again"

    asyncio.run(main())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_write_announced_to_the_watcher_that_fails_is_withdrawn(tmp_path: Path) -> None:
    """B's temporary file of ``a.bin`` is deleted under it mid-download, so putting the file
    in place fails after the watcher was told to expect it. The announcement must be
    withdrawn: the user's save of ``a.bin`` right after reaches the watcher as a change.
    (Announcements here last longer than the test: one left behind would hide the save.)"""
    size = 2 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=34) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=1 * MiB))
            a.write("a.bin", random_bytes(4, size))
            await cluster.start(mesh=False)
            assert b.engine is not None
            sync = b.folder
            seen: set[str] = set()
            async with FolderWatcher(
                b.root, debounce_interval=0.05, own_write_timeout=1e9, initial_rescan=False
            ) as watcher:
                b.engine.watchers[sync.info.id] = watcher

                async def follow() -> None:
                    async for batch in watcher:
                        seen.update(batch.paths)

                follower = asyncio.create_task(follow())
                a.connect(b)
                await wait_for(
                    lambda: (
                        (d := sync.downloads.active.get("a.bin")) is not None
                        and d.bytes_done >= size // 3
                    ),
                    60,
                    "a third of a.bin on B",
                )
                (temp,) = temp_files(b.root)
                (b.root / temp).unlink()
                await wait_for(lambda: "a.bin" in sync.failures, 60, "a.bin to fail on B")
                assert not b.path("a.bin").exists()
                # Saved as editors do: written aside, then renamed over the name (one event).
                draft = tmp_path / "draft"
                draft.write_bytes(b"saved by B's user")
                draft.rename(b.path("a.bin"))
                # Inotify reports from a thread of its own: real time for it to arrive
                # (virtual time stands still meanwhile), virtual time for the debounce.
                for _ in range(500):
                    if "a.bin" in seen:
                        break
                    await asyncio.to_thread(time.sleep, 0.01)
                    await asyncio.sleep(0.1)
                assert "a.bin" in seen, "the user's save was taken for the engine's own write"
                follower.cancel()

    asyncio.run(main())


def test_a_conflict_won_by_a_file_built_here_never_leaves_the_path_empty(
    tmp_path: Path,
) -> None:
    """A and B created ``x.bin`` independently; A's version wins (newer mtime) and B holds
    its content already (``copy.bin``), so B builds it from local data. B's own version
    is kept as the conflict copy, and the path holds it until the winner replaces it: when
    B tells its watcher it is about to write the path, the loser is still there."""
    winner = random_bytes(5, 300 * KiB)
    loser = random_bytes(6, 200 * KiB)

    async def main() -> None:
        async with Cluster(tmp_path, seed=35) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("x.bin", winner, mtime_ns=1_700_000_000_000_000_000)
            a.write("copy.bin", winner, mtime_ns=1_700_000_000_000_000_000)
            b.write("x.bin", loser, mtime_ns=1_600_000_000_000_000_000)
            b.write("copy.bin", winner, mtime_ns=1_700_000_000_000_000_000)
            await cluster.start(mesh=False)
            loser_in_place: list[bool] = []

            def look() -> None:
                path = b.path("x.bin")
                loser_in_place.append(path.exists() and path.read_bytes() == loser)

            _on_own_write(b, "x.bin", look)
            b.counters = BlockCounters()
            a.connect(b)
            await converge([a, b], 60)
            assert loser_in_place == [True], "x.bin was empty while B put the winner in place"
            assert b.counters.received_total == 0  # built from B's own copy.bin
            for node in (a, b):
                assert node.read("x.bin") == winner, node.name
                assert node.folder.status()["conflicts"] == 1, node.name
                (copy,) = node.folder.status()["conflict_paths"]
                assert node.read(copy) == loser, node.name

    asyncio.run(main())
