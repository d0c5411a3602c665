"""What ``status`` and ``ls`` tell a user, with real daemons in a namespace lab.

Conflicts stay visible on every node until resolved; a failing path makes the folder
``error`` (naming the directory at fault) and recovers by itself once fixed; a folder missing
at start (an unmounted disk) resumes within seconds of coming back; a node with no peer
connected says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.harness import start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 60.0


def _status(node: Node) -> dict[str, Any]:
    """The folder's ``status --json`` (exit 4 when it is ``error`` or ``paused``)."""
    result = node.cli("status", "--json", check=False)
    assert result.returncode in (0, 4), result
    folders: list[dict[str, Any]] = json.loads(result.stdout)["folders"]
    return folders[0]


def _states(node: Node) -> dict[str, str]:
    return {e["path"]: e["state"] for e in node.cli_json("ls")}


def _state_is(node: Node, state: str) -> bool:
    return bool(node.call("status")["folders"][0]["state"] == state)


def _synced_pair(cluster: Cluster, files: dict[str, bytes]) -> tuple[Node, Node]:
    """Daemons A and B on two lab hosts, A saving ``files`` first; once both hold them."""
    lab = cluster.lab(2)
    a, b = (cluster.node(n, h) for n, h in zip("ab", lab.hosts, strict=True))
    for rel, data in files.items():
        (a.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (a.folder / rel).write_bytes(data)
    start_all([a, b])
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    return a, b


@pytest.mark.timeout(300)
def test_a_conflict_is_visible_on_every_node_until_the_copy_is_removed(cluster: Cluster) -> None:
    a, b = _synced_pair(cluster, {"notes.txt": b"first\n"})
    b.stop()
    # Both edit while apart: A's edit is the newer one and wins.
    (b.folder / "notes.txt").write_text("edited on b\n")
    os.utime(b.folder / "notes.txt", ns=(1_900_000_000 * 10**9,) * 2)
    (a.folder / "notes.txt").write_text("edited on a\n")
    os.utime(a.folder / "notes.txt", ns=(2_000_000_000 * 10**9,) * 2)
    wait_until(lambda: a.call("status")["folders"][0]["sequence"] >= 2, 30, "A indexed its edit")
    b.start()

    def copies(node: Node) -> list[str]:
        return sorted(p.name for p in node.folder.iterdir() if ".sync-conflict-" in p.name)

    wait_until(lambda: copies(a) and copies(b), SYNC_TIMEOUT, "the copy on both nodes")
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    copy = copies(a)[0]
    assert (a.folder / copy).read_text() == "edited on b\n"
    assert (b.folder / "notes.txt").read_text() == "edited on a\n"
    for node in (a, b):
        wait_until(lambda n=node: _status(n)["conflicts"] == 1, 30, f"{node.name} counts it")
        status = _status(node)
        assert status["conflict_paths"] == [copy]
        states = _states(node)
        assert states["notes.txt"] == "conflict"
        assert states[copy] == "conflict"
        text = node.cli("status", check=False).stdout
        assert "1 conflict(s)" in text
        assert f"conflict copy: {copy}" in text
    assert "conflict on notes.txt: the version from a wins" in b.log_text(), b.log_tail()
    assert f"kept as {copy}" in b.log_text()

    (a.folder / copy).unlink()  # the user resolves it
    for node in (a, b):
        wait_until(lambda n=node: _status(n)["conflicts"] == 0, SYNC_TIMEOUT, "resolved")
        assert _states(node)["notes.txt"] == "in_sync"
    for node in (a, b):
        assert node.stop() == 0


@contextlib.contextmanager
def read_only(node: Node, directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable for ``node``'s daemon, root included: a read-only bind
    mount made in the daemon's own mount namespace (``ip netns exec`` gives it one)."""
    enter = ["nsenter", "-t", str(node.pid), "-m"]
    subprocess.run([*enter, "mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run([*enter, "mount", "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run([*enter, "umount", str(directory)], check=True)


@pytest.mark.timeout(300)
def test_a_failing_path_is_an_error_and_recovers_once_fixed(cluster: Cluster) -> None:
    a, b = _synced_pair(cluster, {"photos/old.jpg": os.urandom(10_000)})
    wait_until(lambda: _state_is(b, "in_sync"), SYNC_TIMEOUT, "B in sync")
    with read_only(b, b.folder / "photos"):
        (a.folder / "photos" / "new.jpg").write_bytes(os.urandom(200_000))
        wait_until(lambda: _state_is(b, "error"), SYNC_TIMEOUT, "B reports the failure")
        result = b.cli("status", "--json", check=False)
        assert result.returncode == 4, result
        status = json.loads(result.stdout)["folders"][0]
        assert [p["path"] for p in status["problems"]] == ["photos/new.jpg"]
        problem = status["problems"][0]["problem"]
        assert "directory photos" in problem, problem
        assert ".lanshare-tmp" not in problem
        assert "photos/new.jpg" in status["reason"]
        text = b.cli("status", check=False).stdout
        assert "error" in text
        assert "photos/new.jpg" in text
    # Fixed: no `resume`, no restart; the watcher's scan retries it at once.
    wait_until(
        lambda: (b.folder / "photos" / "new.jpg").exists(), SYNC_TIMEOUT, "the retry succeeds"
    )
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    wait_until(lambda: _state_is(b, "in_sync"), SYNC_TIMEOUT, "B in sync again")
    assert b.cli("status", check=False).returncode == 0
    assert _status(b)["problems"] == []
    for node in (a, b):
        assert node.stop() == 0


@pytest.mark.timeout(300)
def test_a_folder_missing_at_start_resumes_within_seconds_of_coming_back(
    cluster: Cluster,
) -> None:
    a, b = _synced_pair(cluster, {"one.txt": b"one\n"})
    b.stop()
    away = b.base / "unmounted"
    shutil.move(b.folder, away)  # the disk is not mounted when the daemon starts
    b.start()
    wait_until(lambda: _state_is(b, "error"), SYNC_TIMEOUT, "B reports the folder missing")
    assert "missing" in _status(b)["reason"]
    assert (a.folder / "one.txt").exists()  # nothing deleted anywhere meanwhile
    shutil.move(away, b.folder)  # mounted again
    wait_until(lambda: _state_is(b, "in_sync"), 30, "B resumes by itself")
    # Watched from now on, both ways.
    (a.folder / "two.txt").write_text("two\n")
    (b.folder / "three.txt").write_text("three\n")
    wait_until(
        lambda: (b.folder / "two.txt").exists() and (a.folder / "three.txt").exists(),
        SYNC_TIMEOUT,
        "changes flow both ways",
    )
    assert "not watching" in b.log_text()
    for node in (a, b):
        assert node.stop() == 0


@pytest.mark.timeout(300)
def test_status_names_the_connected_peers_and_says_when_there_is_none(cluster: Cluster) -> None:
    a, b = _synced_pair(cluster, {"big.bin": os.urandom(16 * 1024 * 1024)})
    wait_until(lambda: _state_is(b, "in_sync"), SYNC_TIMEOUT, "B in sync")
    status = _status(b)
    assert status["connected_peers"] == 1
    assert [p["name"] for p in status["peers"]] == ["a"]
    # Nothing moves any more: the rate a transfer left behind falls to 0.
    wait_until(
        lambda: all(p["rate"] == 0 for p in _status(b)["peers"]), 30, "idle peers show 0 B/s"
    )
    assert "idle" in b.cli("status").stdout
    assert a.stop() == 0
    wait_until(lambda: _status(b)["connected_peers"] == 0, SYNC_TIMEOUT, "B sees A gone")
    assert _status(b)["reason"] == "no peer connected"
    assert "no peer connected" in b.cli("status").stdout
    assert b.stop() == 0


@pytest.mark.timeout(300)
def test_a_disk_mounted_while_paused_resumes_and_is_watched(cluster: Cluster) -> None:
    """The folder is a mount point whose disk is not mounted at start (paused for its
    marker); mounting it resumes the folder within seconds, and edits on the disk are seen
    at once (a watch on the empty mount point would see nothing of the disk over it)."""
    a, b = _synced_pair(cluster, {"one.txt": b"one\n"})
    b.stop()
    disk = b.base / "disk"
    shutil.move(b.folder, disk)  # the folder's contents live on the disk, marker included
    b.folder.mkdir()  # the empty mount point
    b.start()
    wait_until(lambda: _state_is(b, "paused"), SYNC_TIMEOUT, "B paused for its marker")
    assert "folder marker missing" in _status(b)["reason"]
    enter = ["nsenter", "-t", str(b.pid), "-m"]
    subprocess.run([*enter, "mount", "--bind", str(disk), str(b.folder)], check=True)
    wait_until(lambda: _state_is(b, "in_sync"), 30, "B resumes by itself once mounted")
    (disk / "from-b.txt").write_text("saved on b's disk\n")  # what B's user sees in the folder
    (a.folder / "from-a.txt").write_text("saved on a\n")
    wait_until(
        lambda: (a.folder / "from-b.txt").exists() and (disk / "from-a.txt").exists(),
        SYNC_TIMEOUT,
        "changes flow both ways through the mounted disk",
    )
    assert not (b.folder / "from-a.txt").exists()  # nothing was written onto the mount point
    for node in (a, b):
        assert node.stop() == 0
