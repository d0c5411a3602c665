"""Stopping lanshare at any moment of a transfer: a daemon (SIGTERM, SIGINT) and the
short-lived node of a `lanshare pull` (Ctrl-C).

A serves one big file; B downloads it at a capped rate (an ordinary config key) so that the
stops land mid-file, and is stopped at seeded random points. Each stop must be quiet (no
traceback, no task-group or never-awaited noise, a few lines at most after "stopping"),
exit as asked, and leave B's folder and index such that the next run resumes where the
last one stopped and ends byte-identical.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from tests.e2e.harness import (
    ROOT,
    MiB,
    _base_env,
    file_digest,
    state_locked,
    temp_files,
    wait_until,
)

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SIZE = 96 * MiB
RECV_RATE = 6_000_000
"""B's download cap, bytes/s: the file takes about 16 s, so every stop lands mid-file. A
restarted B fetches for a second or so before the test looks again (it resumes before it
says it is ready): at 12 MB/s that was 15 % of the file each time, and four stops close
together could see the file finish before the last one."""
STOPS = 6
SYNC_TIMEOUT = 60.0
STOP_BOUND = 8.0
"""Seconds a stopped daemon may take to exit (its own stop budget is 5 s)."""
AFTER_STOPPING = 3
"""Log lines a daemon may write after "stopping" (the last one: "stopped")."""
NOISE = re.compile(r"Traceback|never awaited|TaskGroup|Exception in callback|Task was destroyed")


def _pair(cluster: Cluster) -> tuple[Node, Node]:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], extra={"network": {"max_recv_rate": RECV_RATE}})
    (a.folder / "big.iso").write_bytes(os.urandom(SIZE))
    return a, b


def _verified(node: Node) -> int | None:
    """Bytes of big.iso that ``node`` holds verified (None while it has not started)."""
    folder = node.folder_status()
    if folder["need_files"] == 1:
        return SIZE - int(folder["need_bytes"])
    if (node.folder / "big.iso").exists():
        return SIZE
    return None


def _quiet_stop(node: Node, log: str, seed: int, sig: int) -> None:
    name = signal.Signals(sig).name
    noise = NOISE.search(log)
    assert noise is None, f"seed {seed}: {name} logged {noise.group(0)!r}:\n{log[-4000:]}"
    lines = log.splitlines()
    stopping = [i for i, line in enumerate(lines) if line.endswith("stopping")]
    assert stopping, f"seed {seed}: {name} never logged 'stopping':\n{log[-4000:]}"
    after = lines[stopping[0] + 1 :]
    assert len(after) <= AFTER_STOPPING, f"seed {seed}: {name}: {len(after)} lines after " + (
        "stopping:\n" + "\n".join(after[:40])
    )
    assert lines[-1].endswith("stopped"), f"seed {seed}: {name} did not finish: {after}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_daemon_stopped_at_random_points_of_a_transfer_stops_quietly_and_resumes(
    cluster: Cluster,
) -> None:
    a, b = _pair(cluster)
    want = file_digest(a.folder / "big.iso")
    real = b.folder / "big.iso"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # One stop during start-up (mDNS registration), one soon after it (sessions, manifests,
    # planning, download set-up), the others at growing fractions of the file; each signal
    # SIGTERM or SIGINT at random.
    fractions = sorted(rng.uniform(0.1, 0.8) for _ in range(STOPS - 2))
    for i in range(1, len(fractions)):
        fractions[i] = max(fractions[i], fractions[i - 1] + 0.05)
    points: list[float | str] = ["start-up", "ready", *fractions]
    a.start()
    verified_before = 0
    for fraction in points:
        sig = rng.choice((signal.SIGTERM, signal.SIGINT))
        b.start(wait=fraction != "start-up")
        if fraction == "start-up":
            b.wait_log("UDP transport on", SYNC_TIMEOUT)
            time.sleep(rng.uniform(0.0, 0.5))  # a random moment, not a condition
            assert b.alive(), b.log_tail()
        elif fraction == "ready":
            time.sleep(rng.uniform(0.0, 1.0))
        else:
            assert isinstance(fraction, float)
            first = wait_until(lambda: _verified(b), SYNC_TIMEOUT, "b downloading")
            assert first >= verified_before, (
                f"seed {seed}: resumed at {first} bytes, {verified_before} were verified"
            )
            done = wait_until(
                lambda f=fraction: (v := _verified(b)) is not None and v >= f * SIZE and v,
                SYNC_TIMEOUT,
                f"b has {fraction:.0%} of the file",
                interval=0.02,
            )
            assert done < SIZE, f"seed {seed}: the file finished before the stop"
            verified_before = done
        assert b.process is not None
        b.process.popen.send_signal(sig)
        try:
            b.process.popen.wait(timeout=STOP_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"seed {seed}: {signal.Signals(sig).name} took over {STOP_BOUND} s\n" + b.log_tail()
            ) from None
        code = b.stop()
        assert code == 0, f"seed {seed}: {signal.Signals(sig).name} exited {code}\n{b.log_tail()}"
        _quiet_stop(b, b.log_text(), seed, sig)
        with contextlib.closing(sqlite3.connect(b.state_dir / "index.sqlite3")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert not real.exists(), f"seed {seed}: the file finished before the last stop"
    b.start()
    resumed = wait_until(lambda: _verified(b), SYNC_TIMEOUT, "b downloading")
    assert resumed >= verified_before, f"seed {seed}: verified blocks were lost"
    wait_until(real.exists, 120.0, "b finishes the file")
    received = b.status()["transfer"]["bytes_received"]
    assert file_digest(real) == want
    # The last run fetched what was left, not the whole file again (allowing for headers,
    # tags, retransmissions and the blocks in flight at the stop).
    left = SIZE - verified_before
    assert received < left * 1.15 + 8 * MiB, (
        f"seed {seed}: received {received} bytes after a restart with {left} left"
    )
    assert not temp_files(b.folder)
    for node in (a, b):
        assert node.stop(timeout=STOP_BOUND) == 0
        _quiet_stop(node, node.log_text(), seed, signal.SIGTERM)


def _launch(node: Node, *args: str) -> subprocess.Popen[str]:
    """``lanshare ARGS`` on ``node``'s host, as a user types it (no daemon runs there)."""
    # `ip netns exec` runs the command in its own process: the pid is lanshare's.
    return subprocess.Popen(
        node.command(sys.executable, "-m", "lanshare", "--config", str(node.config_path), *args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_base_env(),
    )


def _ctrl_c(command: subprocess.Popen[str], seed: int) -> None:
    """Press Ctrl-C: one line, exit 130."""
    try:
        assert command.poll() is None, f"seed {seed}: it ended early: {command.communicate()}"
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=STOP_BOUND)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(timeout=10)
    assert command.returncode == 130, f"seed {seed}: exit {command.returncode}\n{out}\n{err}"
    assert err.strip().splitlines() == ["lanshare: interrupted"], f"seed {seed}: {err}"


@pytest.mark.timeout(400)
def test_ctrl_c_interrupts_a_pull_or_ls_without_a_daemon_and_the_next_pull_resumes(
    cluster: Cluster,
) -> None:
    a, b = _pair(cluster)
    want = file_digest(a.folder / "big.iso")
    real = b.folder / "big.iso"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    fraction = rng.uniform(0.35, 0.65)
    a.start()
    assert not b.alive()
    pull = _launch(b, "pull", str(real))
    sent = wait_until(
        lambda: (n := a.status()["transfer"]["bytes_sent"]) >= fraction * SIZE and n,
        SYNC_TIMEOUT,
        f"a sent {fraction:.0%} of the file",
        interval=0.02,
    )
    _ctrl_c(pull, seed)
    assert not real.exists(), "a half file under its real name"
    assert temp_files(b.folder), "the partial download is kept under a temp name"

    before = a.status()["transfer"]["bytes_sent"]
    again = b.cli("pull", str(real))
    assert again.returncode == 0
    assert file_digest(real) == want
    assert not temp_files(b.folder)
    # The second pull fetched what the first did not verify, not the whole file again.
    resent = a.status()["transfer"]["bytes_sent"] - before
    assert resent < (SIZE - sent) * 1.15 + 16 * MiB, (
        f"seed {seed}: a sent {resent} bytes for the second pull, {sent} before Ctrl-C"
    )
    assert a.stop(timeout=STOP_BOUND) == 0

    # With no peer left, `ls` waits a few seconds for one: Ctrl-C at a random moment of it.
    listing = _launch(b, "ls")
    wait_until(lambda: state_locked(b), SYNC_TIMEOUT, "b's short-lived node up")
    time.sleep(rng.uniform(0.0, 1.0))  # a random moment, not a condition
    _ctrl_c(listing, seed)
    assert file_digest(real) == want
    assert not temp_files(b.folder)
