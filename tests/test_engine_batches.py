"""Planning passes read, plan and apply the paths a batch at a time (lanshare/planinputs.py,
``FolderSync._decide_and_change``): with batches and a fetch budget far smaller than the
folder, two in-process engines still converge, a directory whose entries fall in later
batches is deleted, and the delete guard judges the deletions of the whole pass, not those
of one batch."""

from __future__ import annotations

import asyncio
import shutil
from typing import TYPE_CHECKING

from lanshare import planinputs
from lanshare.config import SyncConfig
from tests.enginesim import Cluster, converge, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def test_batches_far_smaller_than_the_folder_converge_and_keep_the_delete_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounds chosen tiny (they are what keeps a pass's memory bounded), so that every step
    # below spans many batches and many passes.
    monkeypatch.setattr(planinputs, "BATCH_PATHS", 7)
    monkeypatch.setattr(planinputs, "FETCHES_PER_PASS", 5)
    guard = SyncConfig(max_delete_min=10)

    async def main() -> None:
        async with Cluster(tmp_path, seed=31) as cluster:
            a, b = cluster.add(sync=guard), cluster.add(sync=guard)
            for d in range(5):
                for f in range(12):
                    a.write(f"d{d}/f{f:02}.txt", f"file {d}-{f}".encode())
            await cluster.start()
            await converge([a, b], 120)
            assert len(list(b.root.glob("d*/f*.txt"))) == 60

            # A directory planned in an earlier batch than its entries.
            shutil.rmtree(a.path("d1"))
            await a.scan()
            await converge([a, b], 120)
            assert not b.path("d1").exists()
            assert b.folder.problems == {}

            # 28 more of the 65 entries the hour started with (41 with d1), a few in each
            # batch: the whole pass trips the guard, which one batch would not.
            for d in (2, 3, 4):
                for f in range(12 if d < 4 else 4):
                    a.path(f"d{d}/f{f:02}.txt").unlink()
            await a.scan()
            assert a.folder.state == "paused"
            await a.folder.resume(confirm=True)
            await wait_for(lambda: b.folder.state == "paused", 60, "B to pause")
            assert "41 of 65 entries" in b.folder.reason
            await wait_for(lambda: not b.folder.dirty.is_set(), 60, "B's passes to settle")
            assert len(list(b.root.glob("d*/f*.txt"))) == 48
            await b.folder.resume(confirm=True)
            await converge([a, b], 120)
            assert len(list(b.root.glob("d*/f*.txt"))) == 20
            assert b.folder.state == "in_sync"

    asyncio.run(main())
