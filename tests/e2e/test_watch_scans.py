"""What a daemon's watcher sends to its scanner, on real daemons in a namespace lab.

A daemon receiving thousands of files must not see them come back as changes of its own
(every echo was a scan, and a busy scanner let the echoes pile up into full rescans of the
whole folder); and the folder's ``.lanshareignore`` must reach the watcher, so an ignored
path written after it never wakes a scan.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 100.0  # inside the suite's 120 s per test
STEP_TIMEOUT = 60.0  # one change on one daemon
FILES = 2000
DIRS = 10
SCANNED = re.compile(r"\bscanned \S+( \(\d+ paths\))?: ")
CHANGED = re.compile(r": changed: (.*)$")
COLLAPSE = "collapsing into a full rescan"


def _scans(node: Node) -> tuple[int, int]:
    """How many whole scans, and scans of some paths, the node's log tells of."""
    found = SCANNED.findall(node.log_text())
    return sum(1 for some in found if not some), sum(1 for some in found if some)


def _changed(node: Node) -> list[set[str]]:
    """The path batches the node's watcher handed to its scanner (debug log lines)."""
    found = []
    for line in node.log_text().splitlines():
        match = CHANGED.search(line)
        if match is not None:
            found.append(set(match.group(1).split(", ")))
    return found


def test_files_a_daemon_receives_never_come_back_as_its_own_changes(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    # Debug logging: the batches B's watcher hands over are in the log, and B is slower,
    # as a loaded machine is (old announcements of own writes lapsed then).
    b = cluster.node("b", lab.hosts[1], extra={"logging": {"level": "debug"}})
    for d in range(DIRS):
        (a.folder / f"d{d}").mkdir()
    for i in range(FILES):
        (a.folder / f"d{i % DIRS}" / f"f{i:05}.bin").write_bytes(i.to_bytes(4, "big") * 256)
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")
    log = b.log_text()
    assert COLLAPSE not in log
    full, some = _scans(b)
    # One whole scan, at start; a scan of some paths for, at most, each directory the store
    # made (its creation is an event: scanned with what it holds by then), never one per
    # file or per batch of files received.
    assert (full, some <= DIRS) == (1, True), b.log_tail(40)


def test_an_ignored_path_written_after_the_ignore_file_wakes_no_scan(cluster: Cluster) -> None:
    lab = cluster.lab(1)
    a = cluster.node("a", lab.hosts[0], extra={"logging": {"level": "debug"}})
    start_all([a])
    wait_until(lambda: a.folder_status()["state"] == "in_sync", STEP_TIMEOUT, "a in sync")
    (a.folder / ".lanshareignore").write_text("*.log\n")
    a.wait_log("ignore rules changed; rescanning all of it", STEP_TIMEOUT)
    # Written in this order, a reported debug.log would be ready no later than marker.txt:
    # it would be in marker.txt's batch or in one before it.
    (a.folder / "debug.log").write_text("noise")
    (a.folder / "marker.txt").write_text("news")
    wait_until(
        lambda: any("marker.txt" in batch for batch in _changed(a)),
        STEP_TIMEOUT,
        "the batch of marker.txt",
    )
    batches = _changed(a)
    assert not [batch for batch in batches if "debug.log" in batch], batches
