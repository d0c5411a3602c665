"""What a key holder sends is data, never a way in: real daemons in a namespace lab.

A record that asks for set-user-id, set-group-id or sticky bits lands with permission bits
only, under the receiving daemon's umask. A ``.lanshareignore`` that is a symlink (here to
``/dev/zero``, synced as the symlink it is) is left out and reported by ``status`` on every
node, and the folder goes on syncing; so is a line of it that Python's ``re`` refuses, alone.
A line whose regex would backtrack without bound against long names stalls no scan.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import TYPE_CHECKING

import pytest

from lanshare.ignore import IGNORE_FILE
from lanshare.index import DATABASE_NAME
from tests.e2e.harness import start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.harness import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 60.0
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def _umask() -> int:
    """The umask the daemons inherit from this test process."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@pytest.mark.timeout(300)
def test_a_record_asking_for_setuid_lands_with_permission_bits_only(cluster: Cluster) -> None:
    """A's index is tampered with while A is stopped (as a hostile build would send it):
    ``tool`` is recorded with mode 4777. A's config then ignores ``tool``, so A's own scan
    keeps that record instead of correcting it from the disk, and serves it to B."""
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    script = b"#!/bin/sh\necho hello\n"
    (a.folder / "tool").write_bytes(script)
    os.chmod(a.folder / "tool", 0o755)
    a.start()
    wait_until(lambda: a.folder_status()["sequence"] >= 1, SYNC_TIMEOUT, "A recorded tool")
    assert a.stop(timeout=10.0) == 0
    with sqlite3.connect(a.state_dir / DATABASE_NAME) as db:
        changed = db.execute("UPDATE local_files SET mode = ? WHERE path = 'tool'", (0o4777,))
        assert changed.rowcount == 1
    db.close()
    a.write_config(a.config_text() + 'ignore = ["tool"]\n')  # under the [[folder]] table
    start_all([a, b])
    wait_until(lambda: (b.folder / "tool").read_bytes() == script, SYNC_TIMEOUT, "B received tool")
    mode = stat.S_IMODE((b.folder / "tool").stat().st_mode)
    assert mode & SPECIAL_BITS == 0, f"{mode:04o}"
    assert mode == 0o777 & ~_umask(), f"{mode:04o}"
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0


@pytest.mark.timeout(300)
def test_an_ignore_file_linked_to_dev_zero_is_reported_and_sync_goes_on(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    (a.folder / "before.txt").write_bytes(b"before")
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    (a.folder / IGNORE_FILE).symlink_to("/dev/zero")
    wait_until(
        lambda: os.readlink(b.folder / IGNORE_FILE) == "/dev/zero",
        SYNC_TIMEOUT,
        "the symlink reached B",
    )
    # A's next scans, then B's (B reloads its rules when it scans, after an edit of its
    # own): the files each scan finds still reach the other node.
    (a.folder / "after.txt").write_bytes(b"after")
    wait_until(
        lambda: (b.folder / "after.txt").read_bytes() == b"after", SYNC_TIMEOUT, "B got after.txt"
    )
    (b.folder / "from-b.txt").write_bytes(b"from b")
    wait_until(
        lambda: (a.folder / "from-b.txt").read_bytes() == b"from b",
        SYNC_TIMEOUT,
        "A got from-b.txt",
    )

    def reported(node_status: dict[str, object]) -> bool:
        problems = node_status["problems"]
        assert isinstance(problems, list)
        return any(p["path"] == IGNORE_FILE and "symlink" in p["problem"] for p in problems)

    for node in (a, b):
        wait_until(lambda n=node: reported(n.folder_status()), SYNC_TIMEOUT, "the problem shown")
        assert node.folder_status()["state"] != "error", node.folder_status()
        text = node.cli("status").stdout
        assert IGNORE_FILE in text, text
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0


@pytest.mark.timeout(300)
def test_an_ignore_line_re_refuses_is_reported_and_the_other_rules_hold(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    (a.folder / IGNORE_FILE).write_text("*.o\n[a-*z]*.tmp\n")
    (a.folder / "before.txt").write_bytes(b"before")
    start_all([a, b])
    wait_until(
        lambda: (
            (b.folder / IGNORE_FILE).is_file()
            and (b.folder / "before.txt").is_file()
            and (b.folder / "before.txt").read_bytes() == b"before"
        ),
        SYNC_TIMEOUT,
        "the ignore file and before.txt reached B",
    )
    # B's next scan reads the file; what each node writes next still reaches the other,
    # and the valid line still keeps object files local.
    (b.folder / "local.o").write_bytes(b"object")
    (b.folder / "from-b.txt").write_bytes(b"from b")
    wait_until(
        lambda: (
            (a.folder / "from-b.txt").is_file()
            and (a.folder / "from-b.txt").read_bytes() == b"from b"
        ),
        SYNC_TIMEOUT,
        "A got from-b.txt",
    )
    (a.folder / "after.txt").write_bytes(b"after")
    wait_until(
        lambda: (
            (b.folder / "after.txt").is_file() and (b.folder / "after.txt").read_bytes() == b"after"
        ),
        SYNC_TIMEOUT,
        "B got after.txt",
    )
    assert not (a.folder / "local.o").exists()

    def reported(node_status: dict[str, object]) -> bool:
        problems = node_status["problems"]
        assert isinstance(problems, list)
        return any(p["path"] == IGNORE_FILE and "line 2" in p["problem"] for p in problems)

    for node in (a, b):
        wait_until(lambda n=node: reported(n.folder_status()), SYNC_TIMEOUT, "the problem shown")
        assert node.folder_status()["state"] != "error", node.folder_status()
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0


def _holds(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


@pytest.mark.timeout(300)
def test_an_ignore_line_that_backtracked_does_not_stall_any_scan(cluster: Cluster) -> None:
    """A syncs a rules line whose regex used to backtrack for ever against a long name
    (``a*a*a*a*a*a*a*b`` against 255 ``a``s): both nodes go on scanning and syncing names of
    255 bytes, and the one the line names stays where it was written."""
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    (a.folder / IGNORE_FILE).write_text("a*a*a*a*a*a*a*b\n")
    (a.folder / "before.txt").write_bytes(b"before")
    start_all([a, b])
    wait_until(
        lambda: (
            _holds(b.folder / IGNORE_FILE, b"a*a*a*a*a*a*a*b\n")
            and _holds(b.folder / "before.txt", b"before")
        ),
        SYNC_TIMEOUT,
        "the rules file and before.txt reached B",
    )
    named, plain, from_b = "a" * 254 + "b", "a" * 255, "a" * 251 + ".txt"
    (a.folder / named).write_bytes(b"stays on A")  # before plain: the scan that finds plain saw it
    (a.folder / plain).write_bytes(b"from A")
    (b.folder / from_b).write_bytes(b"from B")
    wait_until(lambda: _holds(b.folder / plain, b"from A"), SYNC_TIMEOUT, "B got A's long name")
    wait_until(lambda: _holds(a.folder / from_b, b"from B"), SYNC_TIMEOUT, "A got B's long name")
    assert not (b.folder / named).exists()
    for node in (a, b):
        assert node.folder_status()["state"] != "error", node.folder_status()
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0
