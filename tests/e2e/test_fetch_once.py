"""Partial folders on real daemons in a namespace lab: nothing they lack is deleted elsewhere.

A node can come up holding less than the LAN: a machine that fetches one file with no daemon
and removes it afterwards (the README's "fetch once"), a disk not mounted under the folder's
path, a folder of old files joined with ``init --key``, a folder restored from a backup. Each
test walks one of them with real ``lanshare daemon`` processes and the real CLI, and checks
every other machine kept its files.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import TYPE_CHECKING

import pytest

from lanshare import identity
from lanshare.daemon import DATABASE_NAME
from lanshare.index import Index
from lanshare.paths import INTERNAL_DIR
from tests.e2e.harness import MiB, file_digest, snapshot, start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from lanshare.manifest import FileRecord
    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 120.0
CLI_TIMEOUT = 120.0
MARKER_REASON = "folder marker missing (disk not mounted?)"
OLD_MTIME_NS = 1_600_000_000_000_000_000  # September 2020: files left from long ago
DELETION = re.compile(r"(?<![\w/.-])delet(?:e|ed|es|ing|ion|ions)\b", re.IGNORECASE)
"""A word about a deletion in a log message (not inside a file or test name)."""


def _cli_only_node(cluster: Cluster, name: str, host: object) -> Node:
    """A machine whose config has no folder yet: it joins with ``lanshare init --key``."""
    node = cluster.node(name, host)  # type: ignore[arg-type]
    node.folders.clear()
    node.write_config()
    return node


def _join(node: Node, key: str) -> None:
    result = node.cli("init", str(node.folder), "--key", key)
    assert f"Joined shared folder {node.folder}" in result.stdout


def _local_records(node: Node) -> tuple[dict[str, FileRecord], int]:
    """The node's own index of its folder (the node not running): records and sequence."""
    with Index.open(node.state_dir / DATABASE_NAME) as db:
        (folder,) = [f for f in db.folders() if f.path == str(node.folder)]
        return {r.path: r for r in db.iter_records(folder.id)}, folder.sequence


def _knows_of_peers(node: Node, rel: str) -> bool:
    """Whether ``node`` (running or not) holds a peer's record of ``rel``."""
    with Index.open(node.state_dir / DATABASE_NAME) as db:
        (folder,) = [f for f in db.folders() if f.path == str(node.folder)]
        return bool(db.remote_records_for_path(folder.id, rel))


def _short_id(node: Node) -> int:
    return identity.short_id(identity.load_or_create_node_id(node.state_dir))


def _deletions_logged(node: Node) -> list[str]:
    """Log lines of every run of ``node`` that speak of a deletion (not "0 deleted")."""
    lines = []
    for run in range(1, node.runs + 1):
        for line in node.log_text(run).splitlines():
            if DELETION.search(line) and not re.search(r"\b0 deleted\b", line):
                lines.append(line)
    return lines


def _archived(node: Node) -> list[str]:
    versions = node.folder / INTERNAL_DIR / "versions"
    return sorted(
        os.path.relpath(os.path.join(d, n), versions)
        for d, _, names in os.walk(versions)
        for n in names
    )


def _digests(root: Path) -> set[str]:
    return {entry[4] for entry in snapshot(root).values() if entry[0] == "file"}


def _ls_states(node: Node) -> dict[str, str]:
    return {e["path"]: e["state"] for e in node.cli_json("ls", timeout=CLI_TIMEOUT)}


@pytest.mark.timeout(600)
def test_fetch_once_then_remove_keeps_the_file_on_every_other_machine(cluster: Cluster) -> None:
    lab = cluster.lab(3)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    c = _cli_only_node(cluster, "c", lab.hosts[2])
    big = os.urandom(8 * MiB + 123)
    (a.folder / "big.iso").write_bytes(big)
    (a.folder / "notes.txt").write_text("stays on the LAN\n")
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    want = file_digest(a.folder / "big.iso")

    # The README's flow on C, with no daemon: join, fetch, free the space, look.
    _join(c, cluster.key)
    c.cli("pull", str(c.folder / "big.iso"), timeout=CLI_TIMEOUT)
    assert file_digest(c.folder / "big.iso") == want
    fetched, sequence = _local_records(c)
    assert fetched["big.iso"].version.get(_short_id(c)) == 0  # recorded as the peer's version
    (c.folder / "big.iso").unlink()
    assert _ls_states(c).get("big.iso") == "missing"

    # C announced nothing: no tombstone, no record at all of what it no longer holds.
    records, after = _local_records(c)
    assert "big.iso" not in records
    assert after == sequence
    assert not any(r.deleted for r in records.values())

    # A later pull fetches it again, and removing it again changes nothing elsewhere.
    c.cli("pull", str(c.folder / "big.iso"), timeout=CLI_TIMEOUT)
    assert file_digest(c.folder / "big.iso") == want
    (c.folder / "big.iso").unlink()
    assert _ls_states(c)["big.iso"] == "missing"

    # A full daemon on C later fetches it back instead of deleting it on the others.
    c.start()
    wait_until(
        lambda: (c.folder / "big.iso").exists() and file_digest(c.folder / "big.iso") == want,
        SYNC_TIMEOUT,
        "c's daemon fetched big.iso back",
    )
    wait_same_tree(a.folder, [b.folder, c.folder], SYNC_TIMEOUT, [a, b, c])
    for node in (a, b):
        assert file_digest(node.folder / "big.iso") == want
        assert not any("big.iso" in p for p in _archived(node)), _archived(node)
        assert not _deletions_logged(node), _deletions_logged(node)
    for node in (a, b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(600)
def test_an_empty_mount_point_pauses_the_folder_and_deletes_nothing(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    (a.folder / "photos").mkdir()
    for i in range(5):  # far below the mass-deletion guard's minimum
        (a.folder / "photos" / f"{i}.jpg").write_bytes(os.urandom(20_000 + i))
    (a.folder / "notes.txt").write_text("keep me\n")
    start_all([a, b])
    want = wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    assert b.stop(timeout=5.0) == 0

    # B's disk is not mounted: its folder is an empty directory, with no marker either.
    unmounted = b.base / "disk"
    unmounted.mkdir()
    for entry in list(b.folder.iterdir()):
        shutil.move(entry, unmounted / entry.name)
    assert list(b.folder.iterdir()) == []
    b.start()
    wait_until(
        lambda: (
            b.folder_status()["state"] == "paused" or not snapshot(a.folder).keys() >= want.keys()
        ),
        SYNC_TIMEOUT,
        "b paused its folder (or a lost files)",
    )
    assert snapshot(a.folder).items() >= want.items()
    assert b.folder_status()["state"] == "paused"
    assert b.folder_status()["reason"].startswith(MARKER_REASON)
    status = b.cli("status", check=False)
    assert MARKER_REASON in status.stdout, status.stdout
    # B recorded nothing: no tombstone for A to read, and it fetches nothing onto the mount
    # point, not even what A writes once B has read it.
    (a.folder / "while-paused.txt").write_text("written while b's disk was away\n")
    wait_until(
        lambda: _knows_of_peers(b, "while-paused.txt"),
        SYNC_TIMEOUT,
        "b read a's record of while-paused.txt",
    )
    assert list(b.folder.iterdir()) == []
    assert b.folder_status()["state"] == "paused"
    assert b.stop(timeout=5.0) == 0
    records, _ = _local_records(b)
    assert records
    assert not any(r.deleted for r in records.values())
    assert list(b.folder.iterdir()) == []
    assert not _deletions_logged(a), _deletions_logged(a)
    assert snapshot(a.folder).items() >= want.items()
    assert _archived(a) == []

    # The disk is back: the folder resumes at its next scan and catches up.
    b.start()
    for entry in list(unmounted.iterdir()):
        shutil.move(entry, b.folder / entry.name)
    wait_until(
        lambda: (b.folder / "while-paused.txt").exists(),
        SYNC_TIMEOUT,
        "b resumed and fetched what a wrote meanwhile",
    )
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")
    assert (b.folder / INTERNAL_DIR / "folder-id").is_file()  # the first indexing marked it
    assert _archived(a) == []
    assert not _deletions_logged(a), _deletions_logged(a)
    for node in (a, b):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(600)
def test_joining_with_old_files_deletes_and_overwrites_nothing(cluster: Cluster) -> None:
    lab = cluster.lab(3)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    c = _cli_only_node(cluster, "c", lab.hosts[2])
    (a.folder / "same.txt").write_text("the same on every machine\n")
    (a.folder / "report.txt").write_text("the report as it is today\n")
    (a.folder / "only-on-a.txt").write_text("a's own\n")
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])

    # C's folder holds old files: one identical, one an old draft, one of its own, and the
    # internal directory another share once left there.
    (c.folder / "same.txt").write_text("the same on every machine\n")
    (c.folder / "report.txt").write_text("an old draft of the report\n")
    (c.folder / "only-on-c.txt").write_text("c's own\n")
    for name in ("same.txt", "report.txt", "only-on-c.txt"):
        os.utime(c.folder / name, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    (c.folder / INTERNAL_DIR).mkdir()
    (c.folder / INTERNAL_DIR / "folder-id").write_text("0" * 64 + "\n")
    before_a, before_c = snapshot(a.folder), snapshot(c.folder)
    everything = _digests(a.folder) | _digests(c.folder)

    _join(c, cluster.key)
    states = _ls_states(c)
    assert states["only-on-a.txt"] == "missing"
    # A node with no daemon announced nothing of its own, and changed nothing here or there.
    records, sequence = _local_records(c)
    assert records == {}
    assert sequence == 0
    assert snapshot(c.folder) == before_c
    assert snapshot(a.folder) == before_a
    # Pulling the file it already holds is done at once: it is recorded as the peers' current
    # version (its own mtime yields to theirs), never as a version of C's.
    c.cli("pull", str(c.folder / "same.txt"), timeout=CLI_TIMEOUT)
    assert _ls_states(c)["same.txt"] == "in_sync"
    records, _ = _local_records(c)
    assert set(records) == {"same.txt"}
    assert records["same.txt"].version.get(_short_id(c)) == 0
    assert {k: v[:3] + v[4:] for k, v in snapshot(c.folder).items()} == {
        k: v[:3] + v[4:] for k, v in before_c.items()
    }
    assert snapshot(a.folder) == before_a

    # C's daemon then shares its old files like any new ones: nothing is lost anywhere, the
    # identical file is one file, the two reports are both kept.
    c.start()
    wait_until(
        lambda: (a.folder / "only-on-c.txt").exists() and (c.folder / "only-on-a.txt").exists(),
        SYNC_TIMEOUT,
        "a and c exchanged their own files",
    )
    tree = wait_same_tree(a.folder, [b.folder, c.folder], SYNC_TIMEOUT, [a, b, c])
    assert everything <= _digests(a.folder)
    assert (a.folder / "report.txt").read_text() == "the report as it is today\n"
    conflicts = sorted(p for p in tree if ".sync-conflict-" in p)
    assert len(conflicts) == 1, conflicts
    assert conflicts[0].startswith("report.sync-conflict-")
    assert not any(p.startswith("same.sync-conflict-") for p in tree)
    for node in (a, b, c):
        assert _archived(node) == [], (node.name, _archived(node))
    for node in (a, b):
        assert not _deletions_logged(node), _deletions_logged(node)
    wait_until(lambda: c.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "c in sync")
    for node in (a, b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(600)
def test_a_restored_backup_takes_nothing_from_the_other_machines(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    (a.folder / "report.txt").write_text("the report, first version\n")
    for i in range(3):
        (a.folder / f"kept{i}.txt").write_text(f"unchanged {i}\n")
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    assert b.stop(timeout=5.0) == 0
    backup = b.base / "backup"
    shutil.copytree(b.folder, backup, symlinks=True)  # `cp -a`: marker and mtimes too

    # Work goes on, B following it; then B's disk dies and the backup is restored.
    b.start()
    (a.folder / "new.txt").write_text("written after the backup\n")
    (a.folder / "report.txt").write_text("the report, second version\n")
    want = wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    assert b.stop(timeout=5.0) == 0
    shutil.rmtree(b.folder)
    shutil.copytree(backup, b.folder, symlinks=True)
    assert not (b.folder / "new.txt").exists()

    b.start()
    # B takes the newer state back from A; A loses nothing and replaces nothing.
    wait_until(
        lambda: (
            not (a.folder / "new.txt").exists()
            or (
                (b.folder / "new.txt").exists()
                and (b.folder / "report.txt").read_text() == "the report, second version\n"
            )
        ),
        SYNC_TIMEOUT,
        "b fetched what changed since the backup (or a lost it)",
    )
    for rel, entry in want.items():
        assert snapshot(a.folder).get(rel) == entry, rel
    tree = wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    assert (a.folder / "report.txt").read_text() == "the report, second version\n"
    assert set(tree) - set(want) <= {p for p in tree if p.startswith("report.sync-conflict-")}
    assert _archived(a) == []
    assert not _deletions_logged(a), _deletions_logged(a)
    assert "earlier state than its index" in b.log_text()
    for node in (a, b):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(600)
def test_a_folder_emptied_on_purpose_is_emptied_everywhere_once_confirmed(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    for i in range(3):
        (a.folder / f"old{i}.txt").write_text(f"not wanted any more {i}\n")
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    assert b.stop(timeout=5.0) == 0
    shutil.rmtree(b.folder)  # everything, the internal directory too
    b.folder.mkdir()
    b.start()
    wait_until(lambda: b.folder_status()["state"] == "paused", SYNC_TIMEOUT, "b paused")
    assert f"lanshare resume {b.folder}" in b.folder_status()["reason"]
    assert sorted(p.name for p in a.folder.iterdir() if p.name != INTERNAL_DIR) == [
        "old0.txt",
        "old1.txt",
        "old2.txt",
    ]

    # `resume` with no folder named retries what it can but confirms nothing (it may have
    # been meant for a full disk elsewhere).
    unnamed = b.cli("resume")
    assert "stays paused" in unnamed.stderr
    assert f"lanshare resume {b.folder}" in unnamed.stderr
    assert b.folder_status()["state"] == "paused"
    assert len(list(a.folder.glob("old*.txt"))) == 3

    b.cli("resume", str(b.folder))
    wait_until(
        lambda: not any(a.folder.glob("old*.txt")),
        SYNC_TIMEOUT,
        "the confirmed deletion reached a",
    )
    assert sorted(name.split("~")[0] for name in _archived(a)) == ["old0", "old1", "old2"]
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")
    assert (b.folder / INTERNAL_DIR / "folder-id").is_file()
    for node in (a, b):
        assert node.stop(timeout=5.0) == 0
