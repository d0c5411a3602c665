"""Nothing a peer replaces is lost: real daemons in a namespace lab, real files.

A local edit that keeps the file's size and mtime (``cp -p``, ``rsync -t``) is never
overwritten by a peer's newer version or removed by a peer's deletion: it survives, on every
node, as the file or as a conflict copy, on ext4 as on exFAT (where the ctime is the mtime).
A file a peer replaces or deletes stays in ``.lanshare/versions/`` for ``versions_keep_days``
after it was archived, however old the file itself is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import INTERNAL_DIR, start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.e2e.harness import Cluster, Node

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


def _edit_on_b_while_a_saves_a_newer_version(a: Node, b: Node, original: bytes) -> None:
    """On B, a restore with ``cp -p`` (other bytes, same size, same mtime); meanwhile A saves
    a newer version, which reaches B before B's watcher rescans. Both must survive, on both
    nodes: the newer as the file, B's as a conflict copy (or the other way round)."""
    old_ns = (b.folder / "plan.txt").stat().st_mtime_ns
    restored = b"the plan, as B restored it!!\n" * 40
    assert len(restored) == len(original)
    with (b.folder / "plan.txt").open("r+b") as handle:
        handle.write(restored)
    os.utime(b.folder / "plan.txt", ns=(old_ns, old_ns))
    assert (b.folder / "plan.txt").stat().st_mtime_ns == old_ns

    newer = b"the plan, version 2 from A\n" * 50
    (a.folder / "plan.txt.editing").write_bytes(newer)
    os.replace(a.folder / "plan.txt.editing", a.folder / "plan.txt")

    def both_versions_everywhere() -> bool:
        return all(
            {restored, newer} <= set(_contents(node.folder, "plan.txt").values()) for node in (a, b)
        )

    wait_until(both_versions_everywhere, SYNC_TIMEOUT, "B's restore and A's edit on both nodes")
    for node in (a, b):
        on_node = _contents(node.folder, "plan.txt")
        assert len(on_node) == 2, on_node  # the file and one conflict copy
        assert any(CONFLICT_MARKER in name for name in on_node)
    assert "was changed locally meanwhile (same size and mtime)" in b.log_text()


def _original_at_rest(a: Node, mode: int = 0o644) -> bytes:
    original = b"the plan, as everyone has it\n" * 40
    old_ns = (time.time_ns() - 3 * DAY_NS) // 10**9 * 10**9  # whole seconds: FAT keeps no more
    (a.folder / "plan.txt").write_bytes(original)
    os.chmod(a.folder / "plan.txt", mode)
    os.utime(a.folder / "plan.txt", ns=(old_ns, old_ns))
    return original


@pytest.mark.timeout(300)
def test_an_edit_keeping_size_and_mtime_survives_a_newer_remote_version(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], extra=SLOW_WATCHER)
    original = _original_at_rest(a)
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")
    _edit_on_b_while_a_saves_a_newer_version(a, b, original)
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0


@pytest.mark.timeout(300)
def test_an_edit_keeping_size_and_mtime_survives_a_remote_deletion(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], extra=SLOW_WATCHER)
    original = _original_at_rest(a)
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")
    old_ns = (b.folder / "plan.txt").stat().st_mtime_ns
    restored = b"the plan, as B restored it!!\n" * 40
    assert len(restored) == len(original)
    with (b.folder / "plan.txt").open("r+b") as handle:
        handle.write(restored)
    os.utime(b.folder / "plan.txt", ns=(old_ns, old_ns))

    (a.folder / "plan.txt").unlink()
    # A modification is never lost to a concurrent delete: B's restore comes back to A.
    wait_until(
        lambda: (a.folder / "plan.txt").read_bytes() == restored,
        SYNC_TIMEOUT,
        "B's restore back on A",
    )
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    assert (b.folder / "plan.txt").read_bytes() == restored
    assert "was changed locally meanwhile (same size and mtime)" in b.log_text()
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0


@contextlib.contextmanager
def _exfat_mounted(image: Path, where: Path) -> Iterator[None]:
    """A real exFAT image mounted on ``where``. This kernel has no exFAT driver built in, so
    exfat-fuse serves the same on-disk format from user space (through a loop device)."""
    tools = ("mkfs.exfat", "mount.exfat-fuse", "losetup")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing or not os.path.exists("/dev/fuse"):
        pytest.skip(f"an exFAT mount needs /dev/fuse and {', '.join(tools)}")
    with image.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount.exfat-fuse", loop, str(where)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(where)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.mark.timeout(300)
def test_on_exfat_an_edit_keeping_size_and_mtime_survives_a_newer_remote_version(
    cluster: Cluster,
) -> None:
    """On exFAT the ctime is the mtime and nothing else tells an edit that kept both: the
    store must read the file before it replaces it, and the rescan that follows must read
    it too (its stat is what the scan cache holds: the file has the mode exFAT shows)."""
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], extra=SLOW_WATCHER)
    with _exfat_mounted(b.base / "exfat.img", b.folder):
        (b.folder / "probe").write_bytes(b"")
        exfat_mode = stat.S_IMODE((b.folder / "probe").stat().st_mode)
        (b.folder / "probe").unlink()
        original = _original_at_rest(a, exfat_mode)
        try:
            start_all([a, b])
            wait_until(
                lambda: (b.folder / "plan.txt").read_bytes() == original,
                SYNC_TIMEOUT,
                "b has the plan",
            )
            wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")
            _edit_on_b_while_a_saves_a_newer_version(a, b, original)
            for node in (a, b):
                assert node.stop(timeout=10.0) == 0
        finally:
            b.stop()  # before the unmount: the daemon holds the folder open


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
