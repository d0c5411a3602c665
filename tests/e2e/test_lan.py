"""Real daemons on a LAN of network namespaces: real mDNS, real UDP, loss from nftables.

Each host runs ``python -m lanshare daemon`` with its own folder, state and control socket,
the same folder key, mDNS on the host's own interface (``interfaces`` left empty) and no
static peers: everything they know of each other comes from discovery.

``LANSHARE_E2E_BIG_MIB`` scales the big file of the mixed folder (default: the issue's
200 MiB) for quick local runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import threading
import time
from functools import partial
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import (
    MiB,
    file_digest,
    make_mixed_tree,
    propagation_latency,
    snapshot,
    start_all,
    temp_files,
    wait_same_tree,
    wait_until,
)

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

BIG_MIB = int(os.environ.get("LANSHARE_E2E_BIG_MIB", "200"))
SMALL_FILES = 2000
CONVERGE_TIMEOUT = 600.0
"""Generous: the mixed folder converges in well under a minute on a 2-core machine."""
SYNC_TIMEOUT = 60.0
PROPAGATION_BOUND = 10.0
"""What the test asserts per small edit (the target is < 1 s; bench/propagation.py measures)."""
HEX_ID = re.compile(r"^[0-9a-f]{16}$")


LOCAL_CHANGES = re.compile(r"^.*: \d+ new, \d+ changed, \d+ deleted$", re.MULTILINE)


def _echoed_changes(node: Node) -> list[str]:
    """Scans of ``node`` that found local changes. On a host where nobody edits, each one
    would be the daemon's own write seen again as an edit (and sent back to its peers)."""
    return LOCAL_CHANGES.findall(node.log_text())


def _three(cluster: Cluster, **lab_options: object) -> list[Node]:
    lab = cluster.lab(3, **lab_options)
    return [cluster.node(name, host) for name, host in zip("abc", lab.hosts, strict=True)]


@pytest.mark.slow
@pytest.mark.timeout(CONVERGE_TIMEOUT + 120)
@pytest.mark.parametrize("loss", [0.0, 2.0], ids=["no-loss", "2pct-loss"])
def test_three_daemons_converge_on_a_mixed_folder(cluster: Cluster, loss: float) -> None:
    a, b, c = _three(cluster, loss=loss)
    tree = make_mixed_tree(a.folder, big_size=BIG_MIB * MiB, small_files=SMALL_FILES, seed=6)
    started = time.monotonic()
    start_all([a, b, c])
    rss_busy = max(node.rss_bytes() for node in (b, c))
    want = wait_same_tree(a.folder, [b.folder, c.folder], CONVERGE_TIMEOUT, [a, b, c])
    seconds = time.monotonic() - started
    # Byte-identical with mtimes and modes; the symlink and the empty directory came too.
    assert want["link-to-readme"] == ("symlink", "docs/readme.txt")
    assert want["empty/nothing-here"][0] == "dir"
    assert want["private"] == ("dir", 0o700)
    assert len([e for e in want.values() if e[0] == "file"]) == tree.files
    for node in (b, c):
        wait_until(partial(_in_sync, node), SYNC_TIMEOUT, f"{node.name} reports in_sync")
        # Every download was placed: no temporary file is left behind.
        assert not temp_files(node.folder), f"{node.name}: {temp_files(node.folder)}"
        assert not _echoed_changes(node), f"{node.name} saw its own writes as changes"
    print(  # the closing note's figures; pytest -s shows them
        f"\nconverged {tree.files} files, {tree.bytes / MiB:.0f} MiB, loss {loss} %: "
        f"{seconds:.1f} s from start; RSS while syncing {rss_busy / MiB:.0f} MiB"
    )
    for node in (a, b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(300)
def test_a_small_saved_file_becomes_identical_on_the_others(cluster: Cluster) -> None:
    a, b, c = _three(cluster)
    (a.folder / "notes").mkdir()
    (a.folder / "notes" / "today.txt").write_text("first draft\n")
    start_all([a, b, c])
    wait_same_tree(a.folder, [b.folder, c.folder], SYNC_TIMEOUT, [a, b, c])
    rng = random.Random(1)
    latencies = []
    for edit in range(3):
        data = f"edit {edit}\n".encode() + rng.randbytes(rng.randrange(10, 4000))
        latencies.append(propagation_latency(a, [b, c], "notes/today.txt", data, PROPAGATION_BOUND))
    want = snapshot(a.folder)
    assert snapshot(b.folder) == want == snapshot(c.folder)  # mtime and mode came along
    print(f"\npropagation latencies: {', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")
    assert len(_echoed_changes(a)) >= len(latencies)  # the edits on A: real local changes
    for node in (b, c):
        assert not _echoed_changes(node), f"{node.name} saw its own writes as changes"
    for node in (a, b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(300)
def test_ls_lists_the_lan_and_pull_works_without_a_daemon(cluster: Cluster) -> None:
    lab = cluster.lab(4)
    a, b, c, d = (cluster.node(n, h) for n, h in zip("abcd", lab.hosts, strict=True))
    (a.folder / "from-a").mkdir()
    (a.folder / "from-a" / "report.pdf").write_bytes(os.urandom(3 * MiB + 17))
    (a.folder / "from-a" / "small.txt").write_text("small file from a\n")
    (b.folder / "from-b.txt").write_text("written on b\n")
    start_all([a, b, c])
    wait_until(
        lambda: (c.folder / "from-b.txt").exists() and (c.folder / "from-a/small.txt").exists(),
        SYNC_TIMEOUT,
        "c has a's and b's files",
    )
    wait_same_tree(a.folder, [c.folder], SYNC_TIMEOUT, [a, b, c])
    ids = {n.name: n.status()["node"]["id"] for n in (a, b)}

    entries = c.cli_json("ls")
    by_path = {e["path"]: e for e in entries}
    assert {"from-a/report.pdf", "from-a/small.txt", "from-b.txt", "from-a"} <= set(by_path)
    for entry in entries:
        assert set(entry) >= {"folder", "path", "type", "size", "hash", "peers", "state"}
        assert entry["folder"] == str(c.folder)
        assert entry["type"] in ("file", "dir", "symlink")
        assert entry["state"] in (
            "in_sync",
            "missing",
            "outdated",
            "conflict",
            "ignored",
            "local_only",
        )
        assert all(HEX_ID.match(p) for p in entry["peers"])
    report = by_path["from-a/report.pdf"]
    assert report["type"] == "file"
    assert report["size"] == 3 * MiB + 17
    assert re.match(r"^[a-z0-9-]+:[0-9a-f]{64}$", report["hash"]), report["hash"]
    assert report["state"] == "in_sync"
    assert set(report["peers"]) == {ids["a"], ids["b"]}  # b has it too by now
    assert ids["b"] in by_path["from-b.txt"]["peers"]
    assert by_path["from-a"]["type"] == "dir"

    # A fourth machine with no daemon: `lanshare pull` starts a short-lived node.
    assert not d.alive()
    target = d.folder / "from-a" / "report.pdf"
    result = d.cli("pull", str(target), tty=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert "report.pdf" in result.stdout  # the per-file progress line
    assert "total" in result.stdout
    assert "all present and verified" in result.stdout
    assert file_digest(target) == file_digest(a.folder / "from-a" / "report.pdf")
    # Only what was asked for: the rest of the folder stays on the LAN.
    assert not (d.folder / "from-a" / "small.txt").exists()
    assert not (d.folder / "from-b.txt").exists()

    rows = json.loads(d.cli("pull", str(d.folder / "from-b.txt"), "--json").stdout)
    assert rows == [
        {
            "path": str(d.folder / "from-b.txt"),
            "state": "in_sync",
            "bytes": len("written on b\n"),
            "size": len("written on b\n"),
        }
    ]
    missing = d.cli("pull", str(d.folder / "no-such-file"), "--timeout", "60", check=False)
    assert missing.returncode != 0
    assert "no peer has" in missing.stderr
    for node in (a, b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.timeout(300)
def test_sigterm_exits_0_quickly_and_says_goodbye(cluster: Cluster) -> None:
    a, b, c = _three(cluster)
    start_all([a, b, c])

    def sees_a(node: Node) -> bool:
        return any(p["name"] == "a" and p["state"] == "connected" for p in node.call("peers"))

    wait_until(lambda: sees_a(b) and sees_a(c), SYNC_TIMEOUT, "b and c connected to a")
    assert a.process is not None
    a.process.popen.send_signal(signal.SIGTERM)
    a.process.popen.wait(timeout=5.0)  # TimeoutExpired fails the test: the 5 s bound
    assert a.stop() == 0
    # Goodbye packets: the others' discovery drops a at once (long before the 15 s silence
    # timeout), and the session closes (CLOSE datagrams, not the idle timeout).
    for node in (b, c):
        wait_until(partial(_logged_goodbye, node, "a"), 4.0, f"{node.name} logs a's goodbye")
        wait_until(partial(_forgot, node, "a"), 4.0, f"{node.name} no longer lists a")
    for node in (b, c):
        assert node.stop(timeout=5.0) == 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_9_mid_file_resumes_without_refetching_verified_blocks(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    size = 96 * MiB
    a = cluster.node("a", lab.hosts[0])
    # The receiver limits its download rate (an ordinary config key) so that the kills
    # land mid-file on any machine.
    b = cluster.node("b", lab.hosts[1], extra={"network": {"max_recv_rate": 8_000_000}})
    (a.folder / "big.iso").write_bytes(os.urandom(size))
    want = file_digest(a.folder / "big.iso")
    real = b.folder / "big.iso"
    seen_sizes: set[int] = set()
    watching = threading.Event()
    watching.set()

    def watch_real_name() -> None:
        # Polls the real name throughout: it must never hold a partial file.
        while watching.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen_sizes.add(os.stat(real).st_size)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch_real_name, name="real-name-watch")
    watcher.start()
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # Several kills at random points, however close: each lands wherever the receiver is
    # (writing a batch, recording it, reading blocks again after the restart before).
    kill_at = sorted(rng.uniform(0.1, 0.85) for _ in range(4))
    try:
        a.start()
        verified_before = 0
        for fraction in kill_at:
            b.start()
            first = _download_progress(b, size, timeout=SYNC_TIMEOUT)
            assert first >= verified_before, (
                f"seed {seed}: resumed at {first} bytes, {verified_before} were verified"
            )
            done = first
            deadline = time.monotonic() + SYNC_TIMEOUT
            while done < fraction * size:
                assert time.monotonic() < deadline, (
                    f"seed {seed}: stalled at {done} bytes: {b.folder_status()}"
                )
                time.sleep(0.02)
                done = _download_progress(b, size, timeout=SYNC_TIMEOUT)
            b.kill()  # at a random point mid-file
            assert not real.exists()
            assert temp_files(b.folder), "the partial download is kept under a temp name"
            verified_before = done
        b.start()
        resumed = _download_progress(b, size, timeout=SYNC_TIMEOUT)
        assert resumed >= verified_before, f"seed {seed}: verified blocks were lost"
        wait_until(lambda: real.exists(), 120.0, "b finishes the file")
        received = b.status()["transfer"]["bytes_received"]
        assert file_digest(real) == want
        # The last run fetched what was left, not the whole file again (allowing for
        # headers, tags, retransmissions and the blocks in flight at the kill).
        left = size - verified_before
        assert received < left * 1.15 + 8 * MiB, (
            f"seed {seed}: received {received} bytes after a restart with {left} left"
        )
    finally:
        watching.clear()
        watcher.join(timeout=5)
    assert seen_sizes == {size}, f"seed {seed}: the real name showed sizes {seen_sizes}"
    assert not temp_files(b.folder)
    assert a.stop() == 0
    assert b.stop() == 0


def _in_sync(node: Node) -> bool:
    return bool(node.folder_status()["state"] == "in_sync")


def _logged_goodbye(node: Node, name: str) -> bool:
    return re.search(rf"peer {name} \(\w+\) at \S+ down: goodbye", node.log_text()) is not None


def _forgot(node: Node, name: str) -> bool:
    return not any(p["name"] == name for p in node.call("peers"))


def _download_progress(node: Node, size: int, timeout: float) -> int:
    """Bytes of the one download ``node`` has verified so far (waits until it is running)."""

    def progress() -> int | None:
        folder = node.folder_status()
        if folder["need_files"] == 1:
            return size - int(folder["need_bytes"])
        if (node.folder / "big.iso").exists():
            return size
        return None

    found: list[int] = []

    def running() -> bool:
        value = progress()
        if value is not None:
            found.append(value)
        return value is not None

    wait_until(running, timeout, f"{node.name} downloading")
    return found[-1]
