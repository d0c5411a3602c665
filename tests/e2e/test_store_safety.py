"""Nothing a peer replaces is lost: real daemons in a namespace lab, real files.

A local edit that keeps the file's size and mtime (``cp -p``, ``rsync -t``) is never
overwritten by a peer's newer version: it survives, on every node, as the file or as a
conflict copy. A file a peer replaces or deletes stays in ``.lanshare/versions/`` for
``versions_keep_days`` after it was archived, however old the file itself is.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import INTERNAL_DIR, start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.harness import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 60.0
DAY_NS = 86400 * 10**9
CONFLICT_MARKER = ".sync-conflict-"
SLOW_WATCHER = {"sync": {"debounce_interval": 3600.0, "max_debounce_delay": 3600.0}}
"""B's watcher waits an hour before it rescans: nothing but the store's own check can see
B's edit before A's newer version lands."""


def _contents(folder: Path, name: str) -> dict[str, bytes]:
    """``name`` and its conflict copies in ``folder`` (top level), by file name."""
    stem, _, ext = name.rpartition(".")
    return {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.name == name
        or (entry.name.startswith(stem + CONFLICT_MARKER) and entry.name.endswith("." + ext))
    }


def _archives(folder: Path) -> dict[str, tuple[bytes, int]]:
    """What ``folder``'s versions directory holds: content and mtime by relative path."""
    versions = folder / INTERNAL_DIR / "versions"
    if not versions.exists():
        return {}
    return {
        str(path.relative_to(versions)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in versions.rglob("*")
        if path.is_file()
    }


@pytest.mark.timeout(300)
def test_an_edit_keeping_size_and_mtime_survives_a_newer_remote_version(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], extra=SLOW_WATCHER)
    original = b"the plan, as everyone has it\n" * 40
    old_ns = time.time_ns() - 3 * DAY_NS
    (a.folder / "plan.txt").write_bytes(original)
    os.utime(a.folder / "plan.txt", ns=(old_ns, old_ns))
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")

    # On B, a restore with `cp -p`: other bytes of the same size, the same mtime.
    restored = b"the plan, as B restored it!!\n" * 40
    assert len(restored) == len(original)
    with (b.folder / "plan.txt").open("r+b") as handle:
        handle.write(restored)
    os.utime(b.folder / "plan.txt", ns=(old_ns, old_ns))
    assert (b.folder / "plan.txt").stat().st_mtime_ns == old_ns

    # Meanwhile A saves a newer version, which reaches B before B's watcher rescans.
    newer = b"the plan, version 2 from A\n" * 50
    (a.folder / "plan.txt.editing").write_bytes(newer)
    os.replace(a.folder / "plan.txt.editing", a.folder / "plan.txt")

    def both_versions_everywhere() -> bool:
        return all(
            {restored, newer} <= set(_contents(node.folder, "plan.txt").values()) for node in (a, b)
        )

    wait_until(both_versions_everywhere, SYNC_TIMEOUT, "B's restore and A's edit on both nodes")
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    on_a = _contents(a.folder, "plan.txt")
    assert len(on_a) == 2, on_a  # the file and one conflict copy: the winner and the loser
    assert any(CONFLICT_MARKER in name for name in on_a)
    assert "was changed locally meanwhile (same size and mtime)" in b.log_text()
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0


@pytest.mark.timeout(300)
def test_old_files_a_peer_replaced_or_deleted_stay_archived_after_a_restart(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    forty_days_ago = time.time_ns() - 40 * DAY_NS
    (a.folder / "taxes").mkdir()
    files = {"taxes/2019.pdf": b"return for 2019\n" * 100, "taxes/2018.pdf": b"2018\n" * 300}
    for rel, data in files.items():
        (a.folder / rel).write_bytes(data)
        os.utime(a.folder / rel, ns=(forty_days_ago, forty_days_ago))
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])

    # A replaces one and deletes the other: B archives its copies of both.
    (a.folder / "taxes" / "2019.pdf").write_bytes(b"return for 2019, corrected\n")
    (a.folder / "taxes" / "2018.pdf").unlink()
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    archived = _archives(b.folder)
    assert sorted((data, mtime) for data, mtime in archived.values()) == sorted(
        (data, forty_days_ago) for data in files.values()
    ), archived

    # An archive from long ago, which the prune at start must remove: the sign it ran.
    forgotten = b.folder / INTERNAL_DIR / "versions" / "forgotten~20200101-000000.txt"
    forgotten.write_bytes(b"archived in 2020")
    os.utime(forgotten, ns=(1_577_836_800 * 10**9, 1_577_836_800 * 10**9))
    assert b.stop(timeout=10.0) == 0
    b.start()
    wait_until(lambda: not forgotten.exists(), SYNC_TIMEOUT, "b pruned its versions at start")
    assert _archives(b.folder) == archived  # kept 30 days from today, not from the mtime
    b.wait_log("removed 1 archived versions older than 30 days", SYNC_TIMEOUT)
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0
