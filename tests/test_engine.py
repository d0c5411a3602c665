"""The sync engine end to end: real engines, folders and indexes over a simulated network."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from lanshare.errors import DiskFullError
from lanshare.index import Index
from lanshare.listing import pull
from lanshare.paths import TEMP_PREFIX
from tests.enginesim import (
    BlockCounters,
    Cluster,
    LinkSpec,
    SimNode,
    converge,
    idle,
    random_bytes,
    temp_files,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def test_two_nodes_sync_files_dirs_symlinks(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=1) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("hello.txt", b"hello")
            a.write("dir/sub/data.bin", os.urandom(300_000))
            os.symlink("hello.txt", a.path("link"))
            await cluster.start()
            await converge([a, b], 20)
            assert b.read("hello.txt") == b"hello"

    asyncio.run(main())


MiB = 1024 * 1024


def _progress(node: SimNode, rel: str) -> int:
    """Bytes of ``rel`` verified so far on ``node`` (the whole size once it is in place)."""
    download = node.folder.downloads.active.get(rel)
    if download is not None:
        return download.bytes_done
    return node.path(rel).stat().st_size if node.path(rel).exists() else 0


def test_reshare_c_gets_half_from_b_before_b_is_complete(tmp_path: Path) -> None:
    """A -> B -> C, C cannot reach A; A -> B is slow. C must hold half of the file, all of it
    from B, while B's own copy is still incomplete (B serves blocks as soon as verified)."""
    size = 32 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=2) as cluster:
            a, b, c = cluster.add(), cluster.add(), cluster.add()
            net = cluster.network
            net.disconnect(a.addr, c.addr)
            net.set_link(a.addr, b.addr, LinkSpec(rate=4 * MiB, queue_time=0.05))
            data = random_bytes(2, size)
            a.write("big.bin", data)
            await cluster.start(mesh=False)
            a.connect(b)
            c.connect(b)
            best_c_while_b_incomplete = 0
            b_at_that_time = 0

            def observe() -> bool:
                nonlocal best_c_while_b_incomplete, b_at_that_time
                b_done = _progress(b, "big.bin")
                c_done = _progress(c, "big.bin")
                incomplete = (
                    "big.bin" in b.folder.downloads.active and not b.path("big.bin").exists()
                )
                if incomplete and c_done > best_c_while_b_incomplete:
                    best_c_while_b_incomplete, b_at_that_time = c_done, b_done
                return b_done == size and c_done == size

            await wait_for(observe, 90, "B and C to hold the whole file")
            await converge([a, b, c], 30)
            assert c.read("big.bin") == data
            assert best_c_while_b_incomplete >= size // 2, (
                f"C held only {best_c_while_b_incomplete} of {size} bytes while B was "
                f"incomplete ({b_at_that_time})"
            )
            # Everything C has came from B (there is no route to A).
            assert set(c.counters.received) == {b.node_id}
            assert c.counters.received_total >= size

    asyncio.run(main())


def test_crash_mid_file_resumes_without_refetching_verified_blocks(tmp_path: Path) -> None:
    """B is killed (tasks cancelled, memory dropped, disk and index kept) at two points of a
    download and restarted from disk: the file completes byte-identical, no block verified
    before a crash is received again, and the real name never shows a partial file."""
    size = 16 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=3) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=3 * MiB))
            data = random_bytes(3, size)
            a.write("big.bin", data)
            await cluster.start()
            seen_partial: list[int] = []
            stop = asyncio.Event()

            async def watch_real_name() -> None:
                while not stop.is_set():
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(b.path("big.bin"))
                        if st.st_size != size:
                            seen_partial.append(st.st_size)
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch_real_name())
            try:
                rng = random.Random(3)
                for fraction in (rng.uniform(0.15, 0.35), rng.uniform(0.5, 0.7)):
                    await wait_for(
                        lambda f=fraction: _progress(b, "big.bin") >= f * size,
                        60,
                        f"B at {fraction:.0%}",
                    )
                    await b.crash()
                    index = await asyncio.to_thread(Index.open, b.state_dir / "index.sqlite3")
                    try:
                        partial = index.partials_of(index.folders()[0].id, ["big.bin"]).get(
                            "big.bin"
                        )
                        record = index.remote_records_for_path(index.folders()[0].id, "big.bin")
                    finally:
                        index.close()
                    assert partial is not None
                    blocks = next(iter(record.values())).blocks
                    verified = {blocks[i].hash for i in partial.verified}
                    assert verified, "nothing was recorded as verified before the crash"
                    b.counters = BlockCounters()
                    await b.start()
                    b.connect(a)
                    await wait_for(
                        lambda: (
                            _progress(b, "big.bin") >= size * 0.75 or b.path("big.bin").exists()
                        ),
                        60,
                        "B to resume",
                    )
                    again = verified & set(b.counters.received_hashes)
                    assert not again, f"{len(again)} verified blocks fetched again"
                await converge([a, b], 60)
            finally:
                stop.set()
                await watcher
            assert b.read("big.bin") == data
            assert not seen_partial, f"partial file under the real name: sizes {seen_partial}"
            # Every block was received at most once over all runs of B.
            assert not temp_files(b.root)

    asyncio.run(main())


def test_a_peer_whose_session_comes_up_after_the_plan_serves_the_download(
    tmp_path: Path,
) -> None:
    """After a restart B plans from the peers' records in its index before any session is
    up, so its download starts with nobody to ask; A's session coming up later (with nothing
    new in its manifest) must put A to work on it."""
    size = 8 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=5) as cluster:
            a, b = cluster.add(), cluster.add()
            net = cluster.network
            net.set_link(a.addr, b.addr, LinkSpec(rate=3 * MiB))
            data = random_bytes(5, size)
            a.write("big.bin", data)
            await cluster.start()
            await wait_for(lambda: _progress(b, "big.bin") >= size // 4, 60, "B at 25 %")
            await b.crash()
            net.disconnect(a.addr, b.addr)
            await b.start()
            loop = asyncio.get_running_loop()
            await wait_for(
                lambda: bool(b.folder.downloads.scheduler.stalled(loop.time())),
                30,
                "B's resumed download to wait for a source",
            )
            assert not b.folder.exchange.links
            net.reconnect(a.addr, b.addr)
            b.connect(a)
            await converge([a, b], 60)
            assert b.read("big.bin") == data
            assert not temp_files(b.root)

    asyncio.run(main())


def test_same_content_at_many_paths_downloads_side_by_side(tmp_path: Path) -> None:
    """Empty files and copies of one content, several in each directory, all new at once:
    every one is placed, and neither a temporary file nor a problem is left behind."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=6) as cluster:
            a, b = cluster.add(), cluster.add()
            copy = random_bytes(6, 300_000)
            for d in ("x", "x/y", "z"):
                for i in range(8):
                    a.write(f"{d}/empty{i}", b"")
                    a.write(f"{d}/copy{i}.bin", copy)
            a.write("empty-at-root", b"")
            await cluster.start()
            await converge([a, b], 30)
            assert b.read("x/y/copy7.bin") == copy
            assert not temp_files(b.root)
            assert not b.folder.problems
            index = b.index
            assert index is not None
            assert not index.partials(b.folder.info.id)

    asyncio.run(main())


@contextlib.contextmanager
def _small_disk(where: Path, size: str) -> Iterator[None]:
    """Mount a tmpfs of ``size`` on ``where``: a filesystem that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_disk_pauses_pulls_and_they_resume_when_space_is_freed(tmp_path: Path) -> None:
    size = 3 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=7) as cluster:
            a, b = cluster.add(), cluster.add()
            data = random_bytes(7, size)
            a.write("big.bin", data)
            filler = b.root / ".lanshare" / "filler"
            with _small_disk(b.root, "5m"):
                filler.parent.mkdir()
                filler.write_bytes(b"\0" * 3 * MiB)
                await cluster.start()
                sync = b.folder
                await wait_for(lambda: sync.state == "paused", 30, "B to pause its pulls")
                status = sync.status()
                assert "disk full" in status["reason"], status
                assert status["need_files"] == 1
                assert status["need_bytes"] > 0
                assert not sync.downloads.active
                assert not b.path("big.bin").exists()
                assert not sync.problems  # one folder-wide reason, not a failure per file

                async def progress(report: dict[str, Any]) -> None:
                    del report

                with pytest.raises(DiskFullError, match="disk full"):
                    await asyncio.wait_for(pull(b.folder.engine, [b.path("big.bin")], progress), 20)
                # What was verified before the disk filled stays, through later plans too.
                await sync.plan_and_apply()
                assert sync.state == "paused"
                assert temp_files(b.root)
                index = b.index
                assert index is not None
                (partial,) = index.partials(sync.info.id)
                blocks = index.remote_records_for_path(sync.info.id, "big.bin")[a.node_id].blocks
                verified = {blocks[i].hash for i in partial.verified}
                assert verified
                b.counters = BlockCounters()
                filler.unlink()
                await converge([a, b], 60)
                assert b.read("big.bin") == data
                assert b.folder.status()["state"] == "in_sync"
                assert not temp_files(b.root)
                again = verified & set(b.counters.received_hashes)
                assert not again, f"{len(again)} blocks verified before the pause fetched again"
                # resume only confirms a mass deletion when one is withheld.
                await b.folder.resume(confirm=True)
                assert not b.folder.allow_mass_delete
                await b.stop()

    asyncio.run(main())


def test_a_partial_download_recorded_by_an_older_release_is_cleaned_up(tmp_path: Path) -> None:
    """Rows written before temporary names were per path hold the bare name; the file lies
    in the directory of the path it was for."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=8) as cluster:
            (b,) = (cluster.add(),)
            await cluster.start()
            index = b.index
            assert index is not None
            old_name = TEMP_PREFIX + "0123456789abcdef01234567"
            b.write(f"sub/{old_name}", b"half a download")
            index.partial_begin(b.folder.info.id, "sub/gone.bin", old_name, b"\x01" * 32)
            b.folder.dirty.set()
            await wait_for(lambda: not temp_files(b.root), 10, "the old temporary file to go")
            assert not index.partials(b.folder.info.id)

    asyncio.run(main())


def _twins(cluster: Cluster, rel: str, data: bytes) -> None:
    """The same file (content, mtime) on every node, as if copied there beforehand."""
    for node in cluster.nodes:
        node.write(rel, data, mtime_ns=1_600_000_000_000_000_000)


def _wire_bytes(cluster: Cluster) -> int:
    return sum(cluster.network.bytes_sent.values())


@pytest.mark.slow
def test_rename_of_100_mib_file_moves_with_no_block_data(tmp_path: Path) -> None:
    size = 100 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=4) as cluster:
            a, b = cluster.add(), cluster.add()
            _twins(cluster, "old/name.bin", random_bytes(4, size))
            await cluster.start()
            await converge([a, b], 60)
            received, wire = b.counters.received_total, _wire_bytes(cluster)
            a.path("new").mkdir()
            a.path("old/name.bin").rename(a.path("new/moved.bin"))
            await a.scan()
            await converge([a, b], 60)
            assert not b.path("old/name.bin").exists()
            assert b.path("new/moved.bin").stat().st_size == size
            assert b.counters.received_total - received == 0
            # Manifests and acknowledgements only: well under 1 % of the file.
            assert _wire_bytes(cluster) - wire < size // 100

    asyncio.run(main())


@pytest.mark.slow
def test_insertion_in_256_mib_file_resends_only_nearby_chunks(tmp_path: Path) -> None:
    size = 256 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=5) as cluster:
            a, b = cluster.add(), cluster.add()
            data = random_bytes(5, size)
            _twins(cluster, "big.bin", data)
            await cluster.start()
            await converge([a, b], 90)
            received = b.counters.received_total
            middle = size // 2
            edited = data[:middle] + random.Random(6).randbytes(1024) + data[middle:]
            a.write("big.bin", edited)
            await a.scan()
            await converge([a, b], 90)
            assert b.read("big.bin") == edited
            moved = b.counters.received_total - received
            record = a.folder.engine.index.get(a.folder.info.id, "big.bin")
            assert record is not None
            largest = max(block.size for block in record.blocks)
            # FastCDC re-cuts only around the insertion: one or two new chunks.
            assert 1024 <= moved <= 3 * largest, (moved, largest)

    asyncio.run(main())


def test_multi_source_spreads_the_load_over_four_seeders(tmp_path: Path) -> None:
    """One puller, four seeders, each seeder's link to it limited to the same rate: the
    pull is spread over all four. Each serves a fair share of the file (at least half of
    its quarter, at most twice), and the end game fetches little twice. (What the spread
    gains in time, bench/multisource.py measures.)"""
    size = 6 * MiB
    rate = 1.5 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=7) as cluster:
            seeders = [cluster.add() for _ in range(4)]
            puller = cluster.add()
            data = random_bytes(7, size)
            for seeder in seeders:
                seeder.write("f.bin", data, mtime_ns=1_600_000_000_000_000_000)
                cluster.network.set_link(seeder.addr, puller.addr, LinkSpec(rate=rate))
            # The seeders agree on one version of the file first.
            await cluster.start(seeders)
            await converge(seeders, 30)
            await puller.start()
            puller.connect(*seeders)
            await wait_for(lambda: puller.path("f.bin").exists(), 60, "the pull")
            assert puller.read("f.bin") == data
            shares = {s.name: puller.counters.received[s.node_id] / size for s in seeders}
            assert all(1 / 8 <= share <= 1 / 2 for share in shares.values()), shares
            assert puller.counters.received_total <= size * 1.25  # little end-game waste

    asyncio.run(main())


def test_mass_delete_pauses_locally_and_at_peers_until_resumed(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=8) as cluster:
            a, b = cluster.add(), cluster.add()
            for i in range(200):
                a.write(f"d{i % 5}/f{i}.txt", f"file {i}".encode())
            await cluster.start()
            await converge([a, b], 60)
            sequence = a.folder.info_sequence()
            for i in range(150):
                a.path(f"d{i % 5}/f{i}.txt").unlink()
            await a.scan()
            # Locally first: the deletions are not recorded, so nothing propagates.
            assert a.folder.state == "paused"
            assert "150 of 205 entries" in a.folder.reason
            assert a.folder.info_sequence() == sequence
            await a.scan()
            assert a.folder.state == "paused"
            await a.folder.resume(confirm=True)  # what `lanshare resume` does on A
            assert a.folder.info_sequence() == sequence + 150
            await wait_for(lambda: b.folder.state == "paused", 20, "B to pause")
            assert "150 of 205 entries" in b.folder.reason  # 200 files, 5 directories
            assert b.folder.status()["state"] == "paused"
            await asyncio.sleep(0.5)  # another plan or two: still nothing deleted
            assert b.folder.state == "paused"
            assert len(list(b.root.glob("d*/f*.txt"))) == 200
            await b.folder.resume(confirm=True)  # what `lanshare resume` does on B
            await converge([a, b], 30)
            assert len(list(b.root.glob("d*/f*.txt"))) == 50
            assert b.folder.state == "in_sync"
            kept = list((b.root / ".lanshare" / "versions").rglob("f*.txt"))
            assert len(kept) == 150  # deleted files are kept, not lost

    asyncio.run(main())


def _files(node: SimNode) -> int:
    return len(list(node.root.glob("f*.txt")))


def test_deletions_in_batches_pause_each_node_until_its_own_user_confirms(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=12) as cluster:
            a, b, c = cluster.add(), cluster.add(), cluster.add()
            for i in range(300):
                a.write(f"f{i:03}.txt", f"file {i}".encode())
            await cluster.start()
            await converge([a, b, c], 60)

            def delete(batch: int) -> None:
                for i in range(batch * 99, (batch + 1) * 99):
                    a.path(f"f{i:03}.txt").unlink()

            delete(0)  # 99 of 300: under the limit, applied everywhere
            await a.scan()
            assert a.folder.state != "paused"
            await converge([a, b, c], 60)
            assert _files(b) == _files(c) == 201
            # A restart must not forget the deletions already counted.
            await c.crash()
            await c.start()
            c.connect(a, b)
            await converge([a, b, c], 60)

            delete(1)  # 99 more: the window holds the first batch, so A pauses itself
            await a.scan()
            assert a.folder.state == "paused"
            assert "198 of 300 entries" in a.folder.reason
            assert "198 made here" in a.folder.reason
            b.engine.peer_names[a.node_id] = "alpha"  # what discovery tells B
            await a.folder.resume(confirm=True)  # A's user confirms: only A's own application
            await a.scan()
            assert a.folder.state != "paused"  # not again for the same deletions

            for node in (b, c):
                await wait_for(lambda n=node: n.folder.state == "paused", 30, f"{node.name} pauses")
                assert "198 of 300 entries" in node.folder.reason
                assert _files(node) == 201
            assert f"198 by peer alpha ({a.node_id.hex()})" in b.folder.reason
            assert f"198 by peer {a.node_id.hex()}" in c.folder.reason

            # Two hours later, still unconfirmed: the pause does not expire with the window
            # (C's history and hold moved back in time, as a clock moving on would leave them).
            assert c.index is not None
            index, folder = c.index, c.folder.info.id
            since = index.deletions_held_since(folder)
            assert since is not None
            earlier = [dataclasses.replace(d, at=d.at - 7200) for d in index.deletions(folder)]
            index.deletions_clear(folder)
            index.deletions_record(folder, earlier, 3600.0)
            index.deletions_hold(folder, since - 7200)
            c.folder.dirty.set()
            await wait_for(lambda: idle(c) and not c.folder.busy.locked(), 30, "C to replan")
            assert c.folder.state == "paused"
            assert _files(c) == 201

            await b.folder.resume(confirm=True)  # B's user confirms on B
            await wait_for(lambda: _files(b) == 102, 30, "B to apply the deletions")
            await wait_for(
                lambda: index_holds_tombstone(c, b, "f150.txt"), 30, "C to read B's tombstones"
            )
            # C planned again since (its pass clears ``dirty`` and holds ``busy`` at once).
            await wait_for(lambda: idle(c) and not c.folder.busy.locked(), 30, "C to replan")
            assert c.folder.state == "paused"
            assert _files(c) == 201
            assert b.node_id.hex() not in c.folder.reason  # B passed A's deletions on
            a.write("new.txt", b"after the wipe")
            await a.scan()
            await wait_for(lambda: b.path("new.txt").exists(), 30, "B to fetch new.txt")
            await wait_for(lambda: b.folder.state == "in_sync", 30, "B in sync")

    asyncio.run(main())


def index_holds_tombstone(node: SimNode, peer: SimNode, path: str) -> bool:
    assert node.index is not None
    record = node.index.remote_get(node.folder.info.id, peer.node_id, path)
    return record is not None and record.deleted


def test_local_edit_during_download_is_never_clobbered(tmp_path: Path) -> None:
    size = 12 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=9) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=3 * MiB))
            v1 = b"first version"
            a.write("doc.bin", v1)
            await cluster.start()
            await converge([a, b], 20)
            v2 = random_bytes(9, size)
            a.write("doc.bin", v2)
            await a.scan()
            await wait_for(
                lambda: (
                    _progress(b, "doc.bin") > size // 4 and "doc.bin" in b.folder.downloads.active
                ),
                30,
                "B a quarter into the download",
            )
            mine = b"edited on B while the download ran"
            b.write("doc.bin", mine)  # no rescan: the engine must notice by itself
            await converge([a, b], 60)
            for node in (a, b):
                names = [p for p in node.root.iterdir() if p.name.startswith("doc")]
                contents = {p.read_bytes() for p in names}
                assert {mine, v2} <= contents, (node.name, [p.name for p in names])
                assert any(".sync-conflict-" in p.name for p in names)

    asyncio.run(main())
