"""A big folder on real daemons: start, restart, a saved file, memory and idle CPU.

Needs root (two network namespaces from ``bench/netns.py``, NIC-like veths). For each folder
size (by default 100 files in 10 directories, then 100,000 files in 1,000 directories, all
small), host A holds the folder under a real ``lanshare daemon``, alone at first, then
with host B, which joins with an empty folder. Printed, for each size, side by side:

* ``start``: seconds from starting A (no index yet: every file is read) until ``in_sync``;
* ``noticed``: median seconds from saving one file on A (an editor's atomic save) until A's
  log says it recorded the change;
* ``restart``: seconds from restarting A (its index kept) until it is ``in_sync`` again;
* ``b fetched all``: seconds from starting B until both are in sync;
* ``propagated``: median seconds from a save on A until B holds the new bytes;
* RSS of A at each stage and its peak (``VmHWM``); A's CPU use while idle (share of one
  core over ``--idle`` seconds) after the start and after the restart.

Figures from a shared machine are noisy: read them as diagnostics, and compare sizes within
one run only.

Usage: ``python bench/big_folder.py [--files 100 100000] [--saves 5] [--idle 10]``.

To iterate on one stage cheaply, ``--workdir DIR`` keeps A's folder, state and key in ``DIR``
(by folder size) instead of a temporary directory; a later run with the same ``DIR`` reuses
them, so no file is created and ``start`` is then a start with an existing index too (B is
always started afresh). ``--peer-max 0`` leaves B out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.netns import LabUnavailable, veth_lab
from tests.e2e.harness import Cluster, new_key, propagation_latency, wait_until
from tests.lab import Host

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.e2e.harness import Node

TIMEOUT = 900.0  # a cold scan of 100,000 files on a loaded machine
FILE_SIZE = 1024
FILES_PER_DIR = 100
NOTICED = "0 new, 1 changed, 0 deleted"
"""The engine's log line after a scan that recorded one changed file."""


def make_folder(root: Path, files: int) -> list[str]:
    """``files`` small files, ``FILES_PER_DIR`` per directory; their relative paths."""
    rels = []
    for i in range(files):
        directory = root / f"d{i // FILES_PER_DIR:04}"
        if i % FILES_PER_DIR == 0:
            directory.mkdir()
        path = directory / f"f{i:06}.txt"
        path.write_bytes(os.urandom(FILE_SIZE))
        rels.append(f"{path.parent.name}/{path.name}")
    return rels


def in_sync(*nodes: Node, connected: bool = True) -> bool:
    """Whether every node says ``in_sync`` (asked as soon as its control socket answers,
    which may be before it tells systemd it is ready: that waits for mDNS)."""
    for node in nodes:
        try:
            status = node.folder_status()
        except Exception:  # not answering yet is "not yet"
            return False
        if status["state"] != "in_sync" or (connected and status["connected_peers"] < 1):
            return False
    return True


def proc_field(node: Node, key: str) -> int:
    """A ``/proc/PID/status`` figure of the daemon, in bytes."""
    for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key}")


def cpu_seconds(node: Node) -> float:
    fields = Path(f"/proc/{node.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(node: Node, seconds: float) -> float:
    """Share of one core the daemon used over ``seconds`` of doing nothing."""
    before = cpu_seconds(node)
    time.sleep(seconds)
    return (cpu_seconds(node) - before) / seconds


def noticed_latency(node: Node, rel: str, data: bytes) -> float:
    """Seconds from an atomic save of ``rel`` until ``node`` logs one more changed file."""
    seen = node.log_text().count(NOTICED)
    path = node.folder / rel
    tmp = path.with_name(path.name + ".editing")
    tmp.write_bytes(data)
    started = time.monotonic()
    os.replace(tmp, path)
    wait_until(lambda: node.log_text().count(NOTICED) > seen, 60.0, "the change noticed", 0.002)
    return time.monotonic() - started


@contextlib.contextmanager
def work_directory(workdir: Path | None, files: int) -> Iterator[Path]:
    """Where the nodes live: a temporary directory, or ``workdir``'s one for this size (kept,
    B's part emptied: B always starts with an empty folder and no index)."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="lsbig-") as tmp:
            yield Path(tmp)
        return
    base = workdir / f"{files}-files"
    shutil.rmtree(base / "b", ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    yield base


def measure(
    files: int, saves: int, idle: float, peer_max: int, workdir: Path | None = None
) -> dict[str, float]:
    with work_directory(workdir, files) as tmp, veth_lab() as lab:
        cluster = Cluster(tmp)
        kept_key = tmp / "key"
        if workdir is not None:
            if not kept_key.exists():
                kept_key.write_text(new_key())
            cluster.key = kept_key.read_text()
        try:
            hosts = [
                Host(None, i, ns, address)  # type: ignore[arg-type]
                for i, (ns, address) in enumerate(
                    ((lab.ns_a, lab.address_a), (lab.ns_b, lab.address_b))
                )
            ]
            a = cluster.node("a", hosts[0], static_peers=(f"{lab.address_b}:47474",))
            b = cluster.node("b", hosts[1], static_peers=(f"{lab.address_a}:47474",))
            prepared = tmp / "prepared"
            if prepared.exists():  # a kept folder, made by an earlier run with --workdir
                rels = prepared.read_text().split()
            else:
                rels = make_folder(a.folder, files)
                if workdir is not None:
                    prepared.write_text("\n".join(rels))
            target = rels[len(rels) // 2]
            # A alone, as a machine whose peers are away.
            started = time.monotonic()
            a.start(wait=False)
            wait_until(lambda: in_sync(a, connected=False), TIMEOUT, "a in sync", 0.02)
            start = time.monotonic() - started
            a.wait_ready(TIMEOUT)
            rss_idle = proc_field(a, "VmRSS")
            cpu = idle_cpu(a, idle)
            noticed = []
            for i in range(saves):
                data = f"save {i}\n".encode() + os.urandom(FILE_SIZE)
                noticed.append(noticed_latency(a, target, data))
                time.sleep(0.5)  # a person types, then saves again
            rss_saved = proc_field(a, "VmRSS")
            a.stop()
            started = time.monotonic()
            a.start(wait=False)
            wait_until(lambda: in_sync(a, connected=False), TIMEOUT, "a in sync again", 0.02)
            restart = time.monotonic() - started
            a.wait_ready(TIMEOUT)
            rss_restart = proc_field(a, "VmRSS")
            cpu_restart = idle_cpu(a, idle)
            # B joins with an empty folder and fetches everything; then A's saves reach B.
            fetched, propagated = math.nan, [math.nan]
            if files <= peer_max:
                started = time.monotonic()
                b.start(wait=False)
                b.wait_ready(TIMEOUT)
                wait_until(lambda: in_sync(a, b), TIMEOUT, "b fetched the folder", 0.2)
                fetched = time.monotonic() - started
                propagated = []
            for i in range(saves if files <= peer_max else 0):
                data = f"save {i} for b\n".encode() + os.urandom(FILE_SIZE)
                propagated.append(propagation_latency(a, [b], target, data, 60.0))
                time.sleep(0.5)
            rss_synced = proc_field(a, "VmRSS")
            peak = proc_field(a, "VmHWM")
        except AssertionError:
            print(cluster.logs(), file=sys.stderr)
            raise
        finally:
            cluster.close()
    mb = 1024 * 1024
    return {
        "start s": start,
        "noticed s": statistics.median(noticed),
        "restart s": restart,
        "b fetched all s": fetched,
        "propagated s": statistics.median(propagated),
        "RSS idle MB": rss_idle / mb,
        "RSS after saves MB": rss_saved / mb,
        "RSS after restart MB": rss_restart / mb,
        "RSS after b synced MB": rss_synced / mb,
        "RSS peak MB": peak / mb,
        "idle CPU %": cpu * 100,
        "idle CPU after restart %": cpu_restart * 100,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[100, 100_000])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU sampling")
    parser.add_argument(
        "--peer-max",
        type=int,
        default=20_000,
        help="largest folder B fetches whole to measure propagation (it takes minutes)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep (and on a later run reuse) A's folder, state and key here",
    )
    args = parser.parse_args()
    try:
        results = {
            n: measure(n, args.saves, args.idle, args.peer_max, args.workdir) for n in args.files
        }
    except LabUnavailable as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return 2
    sizes = list(results)
    print(f"{'':24}" + "".join(f"{f'{n:,} files':>16}" for n in sizes))
    for key in results[sizes[0]]:
        print(f"{key:24}" + "".join(f"{results[n][key]:16.3f}" for n in sizes))
    if len(sizes) > 1:
        small, big = results[sizes[0]], results[sizes[-1]]
        for key in ("noticed s", "propagated s"):
            ratio = big[key] / small[key] if small[key] else float("inf")
            print(f"{key} ratio big/small: {ratio:.2f} (target: at most 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
