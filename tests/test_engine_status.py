"""What ``status`` and ``ls`` say: conflicts, failing paths and their recovery, peers, rates.

Real engines, folders and indexes over the simulated network (``tests/enginesim.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from lanshare.errors import DiskFullError, TransferError
from lanshare.ignore import IGNORE_FILE
from lanshare.listing import listing, pull
from lanshare.planner import conflict_original
from tests.enginesim import Cluster, LinkSpec, converge, temp_files, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.enginesim import SimNode


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable, for root too (a read-only bind mount), then restore it."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(mode)
        return
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


async def _states(node: SimNode) -> dict[str, str]:
    return {e["path"]: e["state"] for e in await listing(node.engine, None)}


def test_conflict_name_parsing_round_trips() -> None:
    assert conflict_original("a/b.sync-conflict-20260101-120000-abcdef12.txt") == "a/b.txt"
    assert conflict_original("Makefile.sync-conflict-20260101-120000-abcdef12") == "Makefile"
    assert conflict_original(".bashrc.sync-conflict-20260101-120000-abcdef12") == ".bashrc"
    # A conflict of a conflict copy belongs to the copy.
    nested = "x.sync-conflict-20260101-120000-abcdef12.sync-conflict-20260102-000000-0123abcd.t"
    assert conflict_original(nested) == "x.sync-conflict-20260101-120000-abcdef12.t"
    for plain in ("a/plain.txt", "a.sync-conflict-2026.txt", ".sync-conflict-20260101-120000-ab"):
        assert conflict_original(plain) is None


def test_a_conflict_is_counted_listed_and_logged_on_every_node_until_resolved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lanshare.engine")

    async def main() -> None:
        async with Cluster(tmp_path, seed=21) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("doc.txt", b"first")
            await cluster.start()
            await converge([a, b], 20)
            cluster.network.disconnect(a.addr, b.addr)
            a.write("doc.txt", b"edited on a", mtime_ns=2_000_000_000_000_000_000)
            b.write("doc.txt", b"edited on b", mtime_ns=1_900_000_000_000_000_000)
            await a.scan()
            await b.scan()
            cluster.network.reconnect(a.addr, b.addr)
            await converge([a, b], 30)
            for node in (a, b):
                copies = [p.name for p in node.root.iterdir() if ".sync-conflict-" in p.name]
                assert len(copies) == 1, (node.name, copies)
                assert node.read(copies[0]) == b"edited on b"
                assert node.read("doc.txt") == b"edited on a"
                status = node.folder.status()
                assert status["conflicts"] == 1
                assert status["conflict_paths"] == copies
                states = await _states(node)
                assert states["doc.txt"] == "conflict"
                assert states[copies[0]] == "conflict"
            logged = [r.getMessage() for r in caplog.records if "conflict on doc.txt" in r.message]
            assert logged, "the conflict was not logged"
            # B kept its own edit as the copy; A's is named by its id (no discovery names here).
            assert a.engine is not None
            a_id = a.engine.node_id.hex()[:8]
            assert any(f"from device {a_id} wins" in m and "this machine" in m for m in logged)

            # The user resolves it: deleting the copy on one node clears it everywhere.
            (b.root / copies[0]).unlink()
            await b.scan()
            await converge([a, b], 30)
            for node in (a, b):
                assert node.folder.status()["conflicts"] == 0
                assert (await _states(node))["doc.txt"] == "in_sync"

    asyncio.run(main())


def test_a_failing_path_is_an_error_naming_the_directory_and_recovers_by_itself(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=22) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("photos/old.jpg", b"old photo")
            await cluster.start()
            await converge([a, b], 20)
            assert b.folder.status()["state"] == "in_sync"
            with read_only(b.root / "photos"):
                a.write("photos/new.jpg", b"new photo" * 1000)
                await a.scan()
                await wait_for(
                    lambda: b.folder.status()["state"] == "error", 20, "B reports the failure"
                )
                status = b.folder.status()
                assert status["problems"] == [
                    {
                        "path": "photos/new.jpg",
                        "problem": status["problems"][0]["problem"],
                    }
                ]
                problem = status["problems"][0]["problem"]
                assert "directory photos" in problem, problem
                assert ".lanshare-tmp" not in problem
                assert "photos/new.jpg" in status["reason"]
                # Retried with backoff while it fails: still an error, still one problem.
                first = b.folder.failures["photos/new.jpg"].attempts
                await wait_for(
                    lambda: b.folder.failures["photos/new.jpg"].attempts > first,
                    20,
                    "a second attempt",
                )
                assert b.folder.status()["state"] == "error"
            # Writable again: no `resume` and no rescan needed.
            await wait_for(lambda: b.path("photos/new.jpg").exists(), 30, "the retry succeeds")
            await converge([a, b], 30)
            status = b.folder.status()
            assert status["state"] == "in_sync", status
            assert status["problems"] == []
            assert not temp_files(b.root)

    asyncio.run(main())


def test_in_sync_needs_every_connected_peer_and_rates_fall_to_zero(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=23) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("big.bin", os.urandom(4 * 1024 * 1024))
            await cluster.start()
            await converge([a, b], 30)
            status = b.folder.status()
            assert status["state"] == "in_sync"
            assert status["connected_peers"] == 1
            assert status["reason"] == ""
            await wait_for(
                lambda: all(p["rate"] == 0 for p in b.folder.status()["peers"]),
                10,
                "rates fall to 0 once nothing moves",
            )
            await a.stop()
            await wait_for(lambda: not b.folder.exchange.links, 60, "B notices A is gone")
            status = b.folder.status()
            assert status["connected_peers"] == 0
            assert status["reason"] == "no peer connected"

    asyncio.run(main())


def test_a_retried_download_stopped_by_a_full_disk_is_retried_once_space_is_back(
    tmp_path: Path,
) -> None:
    """A retry in progress never fails again if a pause stops it: the pause must not leave
    the failure waiting for ever (the folder would stay ``error``, the file never come)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=24) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=2 * 1024 * 1024))
            a.write("photos/old.jpg", b"old")
            await cluster.start()
            await converge([a, b], 20)
            size = 6 * 1024 * 1024
            with read_only(b.root / "photos"):
                a.write("photos/new.jpg", os.urandom(size))
                await a.scan()
                await wait_for(lambda: "photos/new.jpg" in b.folder.failures, 20, "a failure")
            await b.scan()  # the watcher's scan after the fix: retried at once
            await wait_for(
                lambda: "photos/new.jpg" in b.folder.downloads.active, 20, "the retry under way"
            )
            # The disk fills while the retry runs (what a write's ENOSPC does), then is freed.
            await b.folder.pause_for_space(DiskFullError("No space left on device"))
            assert b.folder.status()["state"] == "paused"
            b.folder.disk_full = ""  # what check_space does once space is back
            b.folder.dirty.set()
            await wait_for(lambda: b.path("photos/new.jpg").exists(), 30, "the file arrives")
            await converge([a, b], 30)
            assert b.folder.failures == {}
            assert b.folder.status()["state"] == "in_sync"

    asyncio.run(main())


def test_a_pull_retries_a_path_that_failed_before_it_instead_of_failing_at_once(
    tmp_path: Path,
) -> None:
    """The directory was fixed since the last attempt: `pull` tries it again and succeeds
    (it ends with the reason only when the path fails again during the pull)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=25) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("photos/old.jpg", b"old")
            await cluster.start()
            await converge([a, b], 20)
            with read_only(b.root / "photos"):
                a.write("photos/new.jpg", b"new photo" * 1000)
                await a.scan()
                await wait_for(lambda: "photos/new.jpg" in b.folder.failures, 20, "a failure")
                b.folder.failures["photos/new.jpg"].retry_at = float("inf")  # not due soon

            async def progress(report: dict[str, object]) -> None:
                del report

            rows = await asyncio.wait_for(pull(b.engine, [b.root / "photos/new.jpg"], progress), 30)
            assert [r["state"] for r in rows] == ["in_sync"]
            assert b.read("photos/new.jpg") == b"new photo" * 1000
            with read_only(b.root / "photos"):
                a.write("photos/newer.jpg", b"newer" * 1000)
                await a.scan()
                with pytest.raises(TransferError, match="directory photos"):
                    await asyncio.wait_for(
                        pull(b.engine, [b.root / "photos/newer.jpg"], progress), 30
                    )

    asyncio.run(main())


def test_a_failed_path_is_retried_while_a_mass_deletion_waits_for_confirmation(
    tmp_path: Path,
) -> None:
    """A paused mass deletion holds back deletions only: a failed download is retried on
    its backoff all the same (no scan, no `resume`)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=26) as cluster:
            a, b = cluster.add(), cluster.add()
            for i in range(150):
                a.write(f"many/f{i:03}.txt", b"%d" % i)
            a.write("photos/old.jpg", b"old")
            await cluster.start()
            await converge([a, b], 60)
            with read_only(b.root / "photos"):
                a.write("photos/new.jpg", b"new photo" * 1000)
                for i in range(120):
                    a.path(f"many/f{i:03}.txt").unlink()
                await a.scan()  # A's own guard holds them: confirm there, as its user would
                await a.folder.resume(confirm=True)
                await wait_for(lambda: b.folder.mass_delete_pause, 30, "B pauses A's deletion")
                await wait_for(lambda: "photos/new.jpg" in b.folder.failures, 30, "a failure")
            await wait_for(lambda: b.path("photos/new.jpg").exists(), 30, "retried, paused")
            assert b.folder.status()["state"] == "paused"
            assert len(list((b.root / "many").iterdir())) == 150

    asyncio.run(main())


def test_a_restored_backup_of_the_only_writer_keeps_both_versions_everywhere(
    tmp_path: Path,
) -> None:
    """A writes every version of doc.txt, B only mirrors it. A's folder comes back from a
    backup: the backup's older content is kept beside the newer one as a conflict copy, on
    both machines, and the newer one keeps the name (it never loses to the old backup)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=27) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("doc.txt", b"v1\n")
            a.write("other.txt", b"x\n")
            await cluster.start()
            await converge([a, b], 20)
            backup = tmp_path / "backup"
            shutil.copytree(a.root, backup, copy_function=shutil.copy2)
            a.write("doc.txt", b"v2: a day of work\n")
            await a.scan()
            await converge([a, b], 20)
            shutil.rmtree(a.root)
            shutil.copytree(backup, a.root, copy_function=shutil.copy2)  # the restore
            await a.scan()
            await wait_for(
                lambda: all(
                    n.path("doc.txt").exists()
                    and n.read("doc.txt") == b"v2: a day of work\n"
                    and [p for p in n.root.iterdir() if ".sync-conflict-" in p.name]
                    for n in (a, b)
                ),
                30,
                "the newer version by its name and the backup's beside it, on both",
            )
            await converge([a, b], 30)
            for node in (a, b):
                (copy,) = [p for p in node.root.iterdir() if ".sync-conflict-" in p.name]
                assert copy.read_bytes() == b"v1\n"
                assert node.folder.status()["conflicts"] == 1

    asyncio.run(main())


def test_an_ignore_file_that_is_a_symlink_is_reported_and_the_folder_keeps_syncing(
    tmp_path: Path,
) -> None:
    """A ``.lanshareignore`` pointing at ``/dev/zero`` (made on A, synced to B as the
    symlink it is) is left out on both nodes and named in their status; edits still flow."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=23) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("before.txt", b"before")
            await cluster.start()
            await converge([a, b], 20)
            (a.root / IGNORE_FILE).symlink_to("/dev/zero")
            await a.scan()
            await converge([a, b], 30)
            assert os.readlink(b.root / IGNORE_FILE) == "/dev/zero"
            await b.scan()
            a.write("after.txt", b"after")
            await a.scan()
            await converge([a, b], 30)
            assert b.read("after.txt") == b"after"
            for node in (a, b):
                status = node.folder.status()
                assert status["state"] == "in_sync", (node.name, status["reason"])
                (problem,) = status["problems"]
                assert problem["path"] == IGNORE_FILE
                assert "symlink" in problem["problem"], problem

    asyncio.run(main())
