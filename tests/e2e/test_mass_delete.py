"""The mass-deletion guard with real daemons on a LAN of network namespaces.

A folder emptied in batches must pause every other machine just as one mass deletion
does, name the machine the deletions came from, survive a restart, and be confirmed on
each machine by its own user; a slow tidy-up must never pause.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 120.0
FILES = 300
ENTRIES = FILES + 1  # and their directory
BATCH = 99


def _files(node: Node) -> int:
    return len(list((node.folder / "album").glob("*.jpg")))


def _archived(node: Node) -> int:
    return len(list((node.folder / ".lanshare" / "versions").rglob("*.jpg")))


def _state(node: Node) -> tuple[str, str]:
    folder = node.folder_status()
    return folder["state"], folder["reason"]


def _delete_batch(node: Node, batch: int) -> None:
    for i in range(batch * BATCH, (batch + 1) * BATCH):
        (node.folder / "album" / f"img{i:03}.jpg").unlink()


@pytest.mark.timeout(900)
def test_a_folder_emptied_in_batches_pauses_every_other_machine(cluster: Cluster) -> None:
    lab = cluster.lab(3)
    # A stands for a stolen or broken machine: its own guard is off, so every batch it
    # deletes goes out. B and C must protect themselves.
    a = cluster.node("a", lab.hosts[0], extra={"sync": {"max_delete_min": 1_000_000}})
    b = cluster.node("b", lab.hosts[1])
    c = cluster.node("c", lab.hosts[2])
    (a.folder / "album").mkdir()
    for i in range(FILES):
        (a.folder / "album" / f"img{i:03}.jpg").write_bytes(f"picture {i}\n".encode() * 40)
    start_all([a, b, c])
    wait_same_tree(a.folder, [b.folder, c.folder], SYNC_TIMEOUT, [a, b, c])
    a_id = a.status()["node"]["id"]

    # 99 of 300: under the limit, deleted everywhere (and archived).
    _delete_batch(a, 0)
    for node in (b, c):
        wait_until(lambda n=node: _files(n) == FILES - BATCH, SYNC_TIMEOUT, f"{node.name} syncs")
        assert _state(node)[0] != "paused"
    # A restart must not reset the count of a wipe in progress.
    c.stop()
    c.start()
    wait_until(lambda: _state(c)[0] == "in_sync", SYNC_TIMEOUT, "c back in sync")

    # 99 more, while the first batch is still in the window: B and C pause.
    _delete_batch(a, 1)
    for node in (b, c):
        wait_until(lambda n=node: _state(n)[0] == "paused", SYNC_TIMEOUT, f"{node.name} pauses")
        state, reason = _state(node)
        assert f"198 of {ENTRIES} entries" in reason, reason
        assert f"by peer a ({a_id})" in reason, reason  # who deleted: name and id
        assert _files(node) == FILES - BATCH  # nothing more deleted
        assert _archived(node) == BATCH  # and what was deleted is kept
        shown = node.cli("status", check=False)
        assert shown.returncode != 0, shown.stdout
        assert "paused" in shown.stdout
        assert f"by peer a ({a_id})" in shown.stdout

    # The third batch is held back too.
    _delete_batch(a, 2)
    for node in (b, c):
        wait_until(
            lambda n=node: f"297 of {ENTRIES} entries" in _state(n)[1],
            SYNC_TIMEOUT,
            f"{node.name} counts the third batch",
        )
        assert _state(node)[0] == "paused"
        assert _files(node) == FILES - BATCH

    # B's user confirms on B: B applies the deletions, C is not confirmed by it.
    b.cli("resume", str(b.folder))
    wait_until(lambda: _files(b) == FILES - 3 * BATCH, SYNC_TIMEOUT, "b applies the deletions")
    wait_until(lambda: _state(b)[0] == "in_sync", SYNC_TIMEOUT, "b in sync again")
    assert _archived(b) == 3 * BATCH
    assert b.cli("status", check=False).returncode == 0
    # A file B writes afterwards reaches C: C has read B's list (and B's tombstones) since.
    (b.folder / "after.txt").write_text("written on b after the wipe\n")
    wait_until(lambda: (c.folder / "after.txt").exists(), SYNC_TIMEOUT, "c fetches after.txt")
    state, reason = _state(c)
    assert state == "paused", reason
    assert _files(c) == FILES - BATCH
    assert f"by peer a ({a_id})" in reason
    assert b.status()["node"]["id"] not in reason  # B only passed A's deletions on
    for node in (a, b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(600)
def test_a_slow_tidy_up_never_pauses_a_fast_one_does(cluster: Cluster) -> None:
    window = 6.0
    sync = {"delete_window": window, "max_delete_min": 5}
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0], extra={"sync": sync})
    b = cluster.node("b", lab.hosts[1], extra={"sync": sync})
    (a.folder / "album").mkdir()
    for i in range(20):
        (a.folder / "album" / f"img{i:03}.jpg").write_bytes(f"picture {i}\n".encode())
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])

    # Three files a window, four times: 12 of 20 in all, never 5 within one window.
    left = 20
    for sitting in range(4):
        for i in range(sitting * 3, sitting * 3 + 3):
            (a.folder / "album" / f"img{i:03}.jpg").unlink()
        left -= 3
        wait_until(lambda n=left: _files(b) == n, SYNC_TIMEOUT, f"b applies sitting {sitting}")
        done = time.monotonic()
        for node in (a, b):
            state, reason = _state(node)
            assert state != "paused", f"{node.name}: {reason}"
        # The next sitting comes once this one has left the window.
        wait_until(lambda t=done: time.monotonic() > t + window + 1, window + 5, "the window")
    assert left == 8
    for node in (a, b):
        wait_until(lambda n=node: _state(n)[0] == "in_sync", SYNC_TIMEOUT, f"{node.name} syncs")

    # The same deletions in quick succession: the second sitting trips the guard on A.
    for i in range(12, 15):
        (a.folder / "album" / f"img{i:03}.jpg").unlink()
    wait_until(lambda: _files(b) == 5, SYNC_TIMEOUT, "b applies the first quick sitting")
    for i in range(15, 18):
        (a.folder / "album" / f"img{i:03}.jpg").unlink()
    wait_until(lambda: _state(a)[0] == "paused", SYNC_TIMEOUT, "a pauses")
    assert "6 made here" in _state(a)[1]
    assert _files(b) == 5  # the second sitting did not leave A
    for node in (a, b):
        assert node.stop(timeout=5.0) == 0
