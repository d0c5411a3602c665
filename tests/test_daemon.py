"""The daemon as a process on loopback: acting as systemd (READY, STATUS, WATCHDOG, STOPPING),
one daemon per state, SIGHUP reloads, a vanished folder, and the status and peers contracts.

Real ``python -m lanshare daemon`` processes bound to 127.0.0.1 with mDNS on 127.0.0.1 only;
no root needed. The multi-host scenarios are in ``tests/e2e/``.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from typing import TYPE_CHECKING

import pytest

import lanshare
from tests.e2e.conftest import cluster
from tests.e2e.harness import file_digest, new_key, state_locked, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

__all__ = ["cluster"]

pytestmark = [pytest.mark.e2e, pytest.mark.mdns]

HEX_ID = re.compile(r"^[0-9a-f]{16}$")
SYNC_TIMEOUT = 30.0


def _pair(cluster: Cluster) -> tuple[Node, Node]:
    """Two loopback daemons that know each other as static peers (mDNS on 127.0.0.1 too)."""
    a = cluster.node("a")
    b = cluster.node("b", static_peers=(a.endpoint,))
    a.static_peers = (b.endpoint,)
    a.write_config()
    return a, b


def _connected(node: Node, other: Node) -> bool:
    return any(p["state"] == "connected" and p["name"] == other.name for p in node.call("peers"))


def test_acting_as_systemd_ready_status_watchdog_and_stopping(cluster: Cluster) -> None:
    node = cluster.node("solo")
    (node.folder / "hello.txt").write_text("hello\n")
    node.start(wait=False, env={"WATCHDOG_USEC": "400000"})
    notify = node.notify
    assert notify is not None
    node.wait_ready()
    # From READY=1 on, the control socket answers.
    result = node.cli("status", "--json")
    status = json.loads(result.stdout)
    assert status["folders"][0]["path"] == str(node.folder)
    statuses = notify.values("STATUS")
    assert statuses[0] == "binding"
    assert any(s.startswith("ready") for s in statuses)
    # Pings at half of WatchdogSec (0.2 s): several arrive within a bounded wait.
    wait_until(lambda: len(notify.times("WATCHDOG", "1")) >= 5, 10.0, "5 watchdog pings")
    # The periodic STATUS line says what the folders are doing.
    wait_until(
        lambda: any("in_sync" in s or "syncing" in s for s in notify.values("STATUS")),
        10.0,
        "a STATUS line with folder states",
    )
    assert node.stop(signal.SIGTERM, timeout=5.0) == 0
    assert notify.times("STOPPING", "1")
    assert "ready" in node.log_text()


def test_status_without_a_daemon_says_so_and_exits_3(cluster: Cluster) -> None:
    node = cluster.node("idle")
    result = node.cli("status", "--json", check=False)
    assert result.returncode == 3, result
    assert "daemon" in result.stderr.lower()


def test_a_second_daemon_on_the_same_config_refuses(cluster: Cluster) -> None:
    node = cluster.node("first")
    node.start()
    second = node.launch()
    second.popen.wait(timeout=30)
    code = second.stop()
    assert code != 0
    message = node.log_text()
    assert "already running" in message, message
    assert "Traceback" not in message
    assert node.status()["folders"]  # the first one is unharmed
    assert node.stop() == 0


def test_sighup_with_a_broken_config_keeps_the_old_one(cluster: Cluster) -> None:
    node = cluster.node("hup")
    node.start()
    good = node.config_path.read_text()
    node.write_config(good + "\n[network\nport = oops\n")
    node.process.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    node.wait_log("config not reloaded, keeping the old one", 10.0)
    assert "invalid TOML" in node.log_text()
    # Still serving the old config.
    assert node.status()["folders"][0]["path"] == str(node.folder)
    (node.folder / "after.txt").write_text("still watching\n")
    wait_until(
        lambda: any(e["path"] == "after.txt" for e in node.call("ls", {"path": None})),
        10.0,
        "the watcher still sees changes",
    )
    assert node.stop() == 0


def test_sighup_adding_a_folder_syncs_it_without_restart(cluster: Cluster) -> None:
    a, b = _pair(cluster)
    a.start()
    b.start()
    wait_until(lambda: _connected(a, b), SYNC_TIMEOUT, "a and b connected")
    extra_key = new_key()
    for node in (a, b):
        extra = node.base / "extra"
        extra.mkdir()
        node.folders.append((extra, extra_key))
        node.write_config()
    (a.base / "extra" / "new.txt").write_text("in the added folder\n")
    pids = (a.pid, b.pid)
    for node in (a, b):
        node.process.popen.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    for node in (a, b):
        node.wait_log(f"folder {node.base / 'extra'} added", 10.0)
    target = b.base / "extra" / "new.txt"
    wait_until(target.exists, SYNC_TIMEOUT, "the file in the added folder reaches b")
    assert target.read_text() == "in the added folder\n"
    assert (a.pid, b.pid) == pids  # no restart
    paths = {f["path"] for f in b.status()["folders"]}
    assert paths == {str(b.folder), str(b.base / "extra")}
    assert a.stop() == 0
    assert b.stop() == 0


def test_a_vanished_folder_pauses_and_deletes_nothing_on_peers(cluster: Cluster) -> None:
    a, b = _pair(cluster)
    for i in range(5):
        (a.folder / f"keep{i}.txt").write_text(f"precious {i}\n")
    a.start()
    b.start()
    wait_until(
        lambda: all((b.folder / f"keep{i}.txt").exists() for i in range(5)),
        SYNC_TIMEOUT,
        "b has a's files",
    )
    digests = {i: file_digest(b.folder / f"keep{i}.txt") for i in range(5)}
    # The disk "is unmounted": the folder's path is gone on b.
    moved = b.base / "unmounted"
    shutil.move(b.folder, moved)
    b.call("rescan")

    def paused() -> bool:
        folder = b.folder_status()
        return folder["state"] in ("error", "paused") and "missing" in folder["reason"]

    wait_until(paused, 20.0, "b pauses its vanished folder with a reason")
    reason = b.folder_status()["reason"]
    assert str(b.folder) in reason
    # Give the peers time to act on anything they were (wrongly) told, then check a.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert all((a.folder / f"keep{i}.txt").exists() for i in range(5))
        time.sleep(0.2)
    assert all(file_digest(moved / f"keep{i}.txt") == digests[i] for i in range(5))
    assert not b.folder.exists()  # nothing recreated an empty folder in its place
    assert a.stop() == 0
    assert b.stop() == 0


def test_status_and_peers_json_contracts(cluster: Cluster) -> None:
    a, b = _pair(cluster)
    (a.folder / "data.bin").write_bytes(b"x" * 100_000)
    a.start()
    b.start()
    wait_until(lambda: (b.folder / "data.bin").exists(), SYNC_TIMEOUT, "b has data.bin")
    wait_until(lambda: b.folder_status()["state"] == "in_sync", SYNC_TIMEOUT, "b in sync")

    status = b.cli_json("status")
    assert set(status) >= {"node", "folders", "transfer", "pid", "discovery"}
    assert set(status["discovery"]) == {
        *("rejected", "incompatible", "bad_address", "uncovered", "own", "unshared", "full")
    }
    assert status["pid"] == b.pid
    node = status["node"]
    assert node["version"] == lanshare.__version__
    assert isinstance(node["uptime"], float)
    assert node["uptime"] >= 0
    assert node["port"] == b.port
    assert status["transfer"]["bytes_received"] >= 100_000
    (folder,) = status["folders"]
    assert {"path", "state", "reason", "need_files", "need_bytes", "peers"} <= set(folder)
    assert folder["path"] == str(b.folder)
    assert folder["state"] in ("scanning", "syncing", "in_sync", "paused", "error")
    assert (folder["need_files"], folder["need_bytes"]) == (0, 0)
    (peer,) = folder["peers"]
    assert {"id", "name", "rate", "need_bytes"} <= set(peer)
    assert HEX_ID.match(peer["id"])
    assert peer["name"] == "a"

    # (Nodes of other versions that other programs run on this loopback may be listed.)
    peers = [p for p in b.cli_json("peers") if p["state"] != "incompatible"]
    # One entry for a, even though it is both a static candidate and a connected peer.
    assert len(peers) == 1, peers
    (entry,) = peers
    assert {"id", "name", "addresses", "folders", "last_seen", "state"} <= set(entry)
    assert entry["id"] == peer["id"]
    assert entry["name"] == "a"
    assert entry["state"] == "connected"
    assert a.endpoint in entry["addresses"]
    assert all(re.match(r"^\d+\.\d+\.\d+\.\d+:\d+$", x) for x in entry["addresses"])
    assert entry["folders"] == [str(b.folder)]
    assert abs(entry["last_seen"] - time.time()) < 60

    human = b.cli("status").stdout
    assert str(b.folder) in human
    assert all(len(line) <= 80 for line in b.cli("peers").stdout.splitlines())
    assert a.stop() == 0
    assert b.stop() == 0


def test_a_signal_during_start_up_is_a_clean_stop(cluster: Cluster) -> None:
    """SIGTERM or SIGINT as soon as the daemon holds its state (index being opened, folders
    and their watchers being set up, nothing announced yet): a stop like any other, exit 0,
    not a kill by the signal or a KeyboardInterrupt."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        node = cluster.node(f"early-{sig.name.lower()}")
        for i in range(5000):  # watches to set up: a start-up that takes a moment
            (node.folder / f"d{i // 50}" / f"e{i}").mkdir(parents=True)
        node.start(wait=False)
        wait_until(
            lambda n=node: state_locked(n), 60.0, f"{node.name} holds its state", interval=0.002
        )
        assert node.process is not None
        node.process.popen.send_signal(sig)
        assert node.stop(timeout=10.0) == 0, node.log_tail()
        log = node.log_text()
        assert "stopping" in log
        assert "Traceback" not in log
        assert "never awaited" not in log
