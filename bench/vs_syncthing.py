"""Real daemons against the reference: lanshare and Syncthing on the same lab, in the same run.

Needs root. Does I/O: builds the bench.netns veth lab (two namespaces, MTU 1500, NIC-like
offloads; ``--loss PCT`` puts bench.netns's router between them, dropping that share of the UDP
datagrams and TCP segments it forwards, lanshare's and Syncthing's alike; ``--routed`` is the
same router without loss, the baseline of a loss run), writes workloads, starts daemons inside
the namespaces only, and removes all of it on every exit path (Ctrl-C and SIGTERM included).

For each workload, two ``lanshare daemon`` processes (A, B) share one folder (static peers on
the lab addresses, mDNS on the lab only). Once both are connected and in sync, a probe file is
sent through and deleted again (so the watchers and the connection are live), then the workload,
written beforehand into a staging directory on the same file system outside the folder, is
moved into A's folder with one ``rename`` of its top entry. The clock starts right after that
rename and stops when B holds every file byte-identical and every symlink and directory: sizes
are polled with a deadline (``--timeout``), contents are compared by hash once all sizes match
(a mismatch goes back to polling). Then the same with two Syncthing instances (Debian's
``syncthing``, installed with apt-get if missing) on the same lab and the same kind of files.

Syncthing is set up as a LAN-only user would: the two devices know each other's static address
(``tcp://<lab address>:22000``) and listen only there; global and local discovery, relays, NAT
traversal, usage and crash reporting, upgrades and the browser are off; the GUI listens on
127.0.0.1 inside its namespace (polled with the API key during set-up only); the folder has
``fsWatcherEnabled`` with ``fsWatcherDelayS=1`` (the default is 10 s); ``setLowPriority`` is off
(its default would renice Syncthing below lanshare on this shared machine) and
``reconnectionIntervalS=5`` (only the set-up waits on it). ``HOME`` is a scratch directory.

CPU: utime+stime of each daemon and its descendants (/proc), from just before the move until
the clock stops, as seconds per GB of the workload, sender (A) and receiver (B) apart. The
protocol alone (bench.transfer, ``protocol`` engine) runs in the same lab in the same run on
the big file's size, and the lanshare big-file figure is given as a fraction of it.

    python -m bench.vs_syncthing --quick                  # smoke run: small workloads
    python -m bench.vs_syncthing                          # 512 MiB, 2,000 x 64 KiB, ...
    python -m bench.vs_syncthing --workload big --routed       # baseline of the loss run
    python -m bench.vs_syncthing --workload big --loss 1 --repeat 3 --json
    python -m bench.vs_syncthing --workload big --py-spy /tmp/profiles
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TextIO, cast
from xml.etree import ElementTree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import netns, transfer
from tests.e2e.harness import Cluster, MiB, Node, file_digest, make_mixed_tree, wait_until
from tests.lab import Host

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from tests.lab import Lab

LANSHARE_PORT = 47474
SYNCTHING_PORT = 22000
GUI_ADDRESS = "127.0.0.1:8384"
FOLDER_ID = "bench"
SETUP_TIMEOUT = 120.0
"""Seconds two daemons may take to start, connect and pass the probe file."""
STOP_TIMEOUT = 15.0
COMMAND_TIMEOUT = 120.0
INSTALL_TIMEOUT = 900.0
PROBE = "probe.txt"


class BenchError(RuntimeError):
    """A set-up step failed; the message is one line for the user."""


# -- workloads ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    title: str
    build: Callable[[Path], None]
    """Writes the workload as one top entry (a file or a directory) into the given directory."""
    per_file: bool
    """Rate in files/s (else MB/s)."""


def workloads(quick: bool) -> dict[str, Workload]:
    big = (64 if quick else 512) * MiB
    n64 = 200 if quick else 2000
    n4 = 2000 if quick else 20_000
    mixed_big, mixed_small = (16 * MiB, 200) if quick else (200 * MiB, 2000)
    return {
        "big": Workload(
            "big", f"one {big // MiB} MiB file", lambda d: _random_file(d / "big.bin", big), False
        ),
        "64k": Workload(
            "64k", f"{n64:,} x 64 KiB", lambda d: _many(d / "files64k", n64, 64 * 1024), True
        ),
        "4k": Workload("4k", f"{n4:,} x 4 KiB", lambda d: _many(d / "files4k", n4, 4096), True),
        "mixed": Workload(
            "mixed",
            f"mixed ({mixed_big // MiB} MiB + {mixed_small:,} small)",
            lambda d: _mixed(d / "mixed", mixed_big, mixed_small),
            False,
        ),
    }


def protocol_size(quick: bool) -> int:
    return (64 if quick else 512) * MiB


def _random_file(path: Path, size: int) -> None:
    with path.open("wb") as out:
        for offset in range(0, size, 4 * MiB):
            out.write(os.urandom(min(4 * MiB, size - offset)))


def _many(directory: Path, count: int, size: int) -> None:
    directory.mkdir()
    for i in range(count):
        (directory / f"f{i:06d}.bin").write_bytes(os.urandom(size))


def _mixed(root: Path, big: int, small: int) -> None:
    make_mixed_tree(root, big_size=big, small_files=small)


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str  # "file", "dir" or "symlink"
    size: int
    digest: str
    """A file's digest, a symlink's target, empty for a directory."""


def expected_entries(staging: Path) -> dict[str, Entry]:
    """Every entry below ``staging``, keyed by its path relative to it."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(staging):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(staging))
            if path.is_symlink():
                out[rel] = Entry("symlink", 0, os.readlink(path))
            elif path.is_dir():
                out[rel] = Entry("dir", 0, "")
            else:
                out[rel] = Entry("file", path.stat().st_size, file_digest(path))
    return out


def _present(path: Path, entry: Entry) -> bool:
    """Cheap check: the entry is there with the right type and size (no content read)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if entry.kind == "symlink":
        return path.is_symlink() and os.readlink(path) == entry.digest
    if entry.kind == "dir":
        return path.is_dir() and not path.is_symlink()
    return path.is_file() and not path.is_symlink() and st.st_size == entry.size


def _identical(path: Path, entry: Entry) -> bool:
    if entry.kind != "file":
        return _present(path, entry)
    try:
        return file_digest(path) == entry.digest
    except OSError:
        return False


def wait_identical(
    target: Path, expected: dict[str, Entry], deadline: float, mark: Callable[[], None]
) -> float | None:
    """Monotonic time at which ``target`` first held every expected entry (verified by hash
    afterwards), or None at ``deadline``. ``mark`` runs the moment all sizes match."""
    pending = dict(expected)
    while True:
        started = time.monotonic()
        pending = {rel: e for rel, e in pending.items() if not _present(target / rel, e)}
        if not pending:
            done = time.monotonic()
            mark()
            pending = {rel: e for rel, e in expected.items() if not _identical(target / rel, e)}
            if not pending:
                return done
        now = time.monotonic()
        if now >= deadline:
            return None
        # Polling costs CPU the daemons share: keep it under a fifth of one core.
        time.sleep(min(max(0.01, 4 * (now - started)), 0.5, deadline - now))


def move_in(staging: Path, folder: Path) -> None:
    """Move the workload's top entries from ``staging`` into ``folder`` (one rename each)."""
    for entry in sorted(staging.iterdir()):
        os.rename(entry, folder / entry.name)


# -- CPU time from /proc ------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid``, of its reaped children and of its live descendants."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, own + reaped children's ticks)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        # After the command name: state ppid ... utime(14) stime cutime cstime (1-based in
        # proc(5), here offset by the two fields before the name).
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
        stats[int(entry.name)] = (int(fields[1]), ticks)
    total = 0.0
    family = {pid}
    changed = True
    while changed:
        changed = False
        for child, (parent, _) in stats.items():
            if parent in family and child not in family:
                family.add(child)
                changed = True
    for member in family:
        if member in stats:
            total += stats[member][1]
    return total / CLOCK_TICKS


# -- py-spy -------------------------------------------------------------------------------------


def find_py_spy() -> str:
    """py-spy next to this interpreter or on PATH; installed with pip here when missing."""

    def look() -> str | None:
        beside = Path(sys.executable).parent / "py-spy"
        return str(beside) if beside.exists() else shutil.which("py-spy")

    found = look()
    if found is None:
        print("py-spy missing: pip install py-spy", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
            check=False,
            timeout=INSTALL_TIMEOUT,
        )
        found = look()
    if found is None:
        raise BenchError("py-spy is missing and `pip install py-spy` did not provide it")
    return found


class Recorder:
    """``py-spy record --pid`` of some processes until ``stop()``, as collapsed stacks (what
    flame-graph tools take), whose top frames ``stop()`` prints (``transfer.summarize_profile``).
    """

    def __init__(self, py_spy: str | None, outputs: Sequence[tuple[int, Path]]) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.paths = [path for _, path in outputs] if py_spy is not None else []
        if py_spy is None:
            return
        for pid, path in outputs:
            command = [py_spy, "record", "--pid", str(pid), "--rate", "200", "--subprocesses"]
            command += ["--nonblocking", "--format", "raw", "-o", str(path)]
            log = path.with_suffix(".log").open("wb")
            self.procs.append(subprocess.Popen(command, stdout=log, stderr=log))
            log.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs:
            _reap(proc, COMMAND_TIMEOUT)
        self.procs.clear()
        for path in self.paths:
            if path.exists():
                print(transfer.summarize_profile(path), file=sys.stderr, flush=True)
        self.paths.clear()


def _reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


# -- the two products ---------------------------------------------------------------------------


class Pair(Protocol):
    """Two daemons, A (sender) and B (receiver), sharing one folder in the lab."""

    product: str
    folder_a: Path
    folder_b: Path

    def start(self) -> None:
        """Start both and wait, bounded, until they are connected and in sync."""

    def pids(self) -> tuple[int, int]: ...

    def close(self) -> None:
        """Stop both (idempotent); no process is left behind."""

    def where_logs(self) -> str: ...


def _lab_host(lab: netns.VethLab, index: int) -> Host:
    namespace, address = (lab.ns_a, lab.address_a) if index == 1 else (lab.ns_b, lab.address_b)
    # Node only reads a host's namespace and address and keeps its processes there; the
    # back-reference to a tests.lab bridge lab is never used.
    return Host(cast("Lab", None), index, namespace, address)


class LansharePair:
    product = "lanshare"

    def __init__(self, lab: netns.VethLab, base: Path) -> None:
        self.cluster = Cluster(base)
        self.a = self.cluster.node(
            "a", _lab_host(lab, 1), static_peers=(f"{lab.address_b}:{LANSHARE_PORT}",)
        )
        self.b = self.cluster.node(
            "b", _lab_host(lab, 2), static_peers=(f"{lab.address_a}:{LANSHARE_PORT}",)
        )
        self.folder_a, self.folder_b = self.a.folder, self.b.folder

    def start(self) -> None:
        for node in (self.a, self.b):
            node.start(wait=False)
        for node in (self.a, self.b):
            node.wait_ready(SETUP_TIMEOUT)
        wait_until(self._synced, SETUP_TIMEOUT, "both lanshare daemons connected and in sync")

    def _synced(self) -> bool:
        return all(_lanshare_synced(node) for node in (self.a, self.b))

    def pids(self) -> tuple[int, int]:
        return self.a.pid, self.b.pid

    def close(self) -> None:
        self.cluster.close()

    def where_logs(self) -> str:
        return f"{self.a.log_path} and {self.b.log_path}"


def _lanshare_synced(node: Node) -> bool:
    connected = any(p["state"] == "connected" for p in node.call("peers"))
    return connected and node.folder_status()["state"] == "in_sync"


@dataclass(frozen=True, slots=True)
class Identity:
    """A Syncthing device's certificate, key and generated config (the template we edit)."""

    name: str
    home: Path
    device_id: str


def syncthing_env(home: Path) -> dict[str, str]:
    """Only what Syncthing needs: nothing from our environment (proxies, the real HOME)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(home),
        "STNODEFAULTFOLDER": "1",
        "STNOUPGRADE": "1",
        "LANG": "C",
    }


def generate_identity(name: str, home: Path, lab: netns.VethLab) -> Identity:
    # Both inside the lab: `generate` probes its default ports by binding them.
    for args in (["generate", "--home", str(home)], ["--device-id", "--home", str(home)]):
        result = subprocess.run(
            lab.command(lab.ns_a, ["syncthing", *args]),
            capture_output=True,
            text=True,
            env=syncthing_env(home),
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise BenchError(f"syncthing {args[0]} failed: {lines[-1] if lines else '?'}")
        match = re.search(r"\b([A-Z0-9]{7}(?:-[A-Z0-9]{7}){7})\b", result.stdout + result.stderr)
        if match is not None:
            return Identity(name, home, match.group(1))
    raise BenchError(f"no device ID from syncthing for {home}")


def syncthing_config(
    me: Identity, peer: Identity, address: str, peer_address: str, folder: Path, api_key: str
) -> bytes:
    """``me``'s generated config.xml, made LAN-only and sharing ``folder`` with ``peer``."""
    root = ElementTree.parse(me.home / "config.xml").getroot()
    default_folder = _child(root, "defaults/folder")
    default_device = _child(root, "defaults/device")
    for old in [*root.findall("device"), *root.findall("folder")]:
        root.remove(old)
    for who, where in ((me, "dynamic"), (peer, f"tcp://{peer_address}:{SYNCTHING_PORT}")):
        device = copy.deepcopy(default_device)
        device.set("id", who.device_id)
        device.set("name", who.name)
        _child(device, "address").text = where
        root.insert(0, device)
    shared = copy.deepcopy(default_folder)
    for old in shared.findall("device"):
        shared.remove(old)
    attributes = {"id": FOLDER_ID, "label": FOLDER_ID, "path": str(folder)}
    attributes.update(type="sendreceive", fsWatcherEnabled="true", fsWatcherDelayS="1")
    for key, value in attributes.items():
        shared.set(key, value)
    for who in (me, peer):
        ElementTree.SubElement(shared, "device", id=who.device_id, introducedBy="")
    root.insert(0, shared)
    gui = _child(root, "gui")
    gui.set("enabled", "true")
    gui.set("tls", "false")
    _child(gui, "address").text = GUI_ADDRESS
    _child(gui, "apikey").text = api_key
    options = _child(root, "options")
    for old in options.findall("listenAddress"):
        options.remove(old)
    ElementTree.SubElement(options, "listenAddress").text = f"tcp://{address}:{SYNCTHING_PORT}"
    settings = {
        "globalAnnounceEnabled": "false",
        "localAnnounceEnabled": "false",
        "relaysEnabled": "false",
        "natEnabled": "false",
        "urAccepted": "-1",
        "autoUpgradeIntervalH": "0",
        "crashReportingEnabled": "false",
        "startBrowser": "false",
        "announceLANAddresses": "false",
        "setLowPriority": "false",
        "reconnectionIntervalS": "5",
    }
    for key, value in settings.items():
        element = options.find(key)
        if element is None:
            element = ElementTree.SubElement(options, key)
        element.text = value
    return ElementTree.tostring(root)


def _child(parent: ElementTree.Element, path: str) -> ElementTree.Element:
    found = parent.find(path)
    if found is None:
        raise BenchError(f"the generated Syncthing config has no <{path}>")
    return found


class SyncthingNode:
    def __init__(
        self, identity: Identity, peer: Identity, base: Path, lab: netns.VethLab, index: int
    ) -> None:
        self.identity = identity
        self.peer = peer
        self.namespace = lab.ns_a if index == 1 else lab.ns_b
        address, peer_address = (
            (lab.address_a, lab.address_b) if index == 1 else (lab.address_b, lab.address_a)
        )
        self.lab = lab
        self.home = base / "home"
        self.folder = base / "share"
        self.log_path = base / "syncthing.log"
        self.api_key = secrets.token_hex(16)
        self.home.mkdir(parents=True)
        # A folder without its marker is refused ("folder marker missing").
        (self.folder / ".stfolder").mkdir(parents=True)
        for name in ("cert.pem", "key.pem"):
            shutil.copy2(identity.home / name, self.home / name)
        config = syncthing_config(identity, peer, address, peer_address, self.folder, self.api_key)
        (self.home / "config.xml").write_bytes(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["syncthing", "serve", "--home", str(self.home), "--no-browser"]
        command += ["--no-restart", "--no-upgrade", "--logflags=3"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.lab.command(self.namespace, command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=syncthing_env(self.home),
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rest(self, path: str) -> Any:
        """GET ``path`` from this instance's REST API (inside its namespace)."""
        fetch = (
            "import sys, urllib.request as u; "
            "r = u.Request(sys.argv[1], headers={'X-API-Key': sys.argv[2]}); "
            "sys.stdout.write(u.urlopen(r, timeout=5).read().decode())"
        )
        url = f"http://{GUI_ADDRESS}{path}"
        command = [sys.executable, "-I", "-c", fetch, url, self.api_key]
        result = subprocess.run(
            self.lab.command(self.namespace, command),
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            timeout=30,
            check=False,
        )
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"syncthing exited ({self.proc.returncode}); see {self.log_path}")
        if result.returncode != 0:
            raise OSError(f"REST {path}: {result.stderr.strip().splitlines()[-1:]}")
        return json.loads(result.stdout)

    def synced(self) -> bool:
        connections = self.rest("/rest/system/connections")["connections"]
        if not connections.get(self.peer.device_id, {}).get("connected"):
            return False
        status = self.rest(f"/rest/db/status?folder={FOLDER_ID}")
        return bool(status["state"] == "idle" and status["needTotalItems"] == 0)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
        _reap(self.proc, STOP_TIMEOUT)
        self.proc = None


class SyncthingPair:
    product = "Syncthing"

    def __init__(
        self, lab: netns.VethLab, base: Path, identities: tuple[Identity, Identity]
    ) -> None:
        one, two = identities
        self.a = SyncthingNode(one, two, base / "a", lab, 1)
        self.b = SyncthingNode(two, one, base / "b", lab, 2)
        self.folder_a, self.folder_b = self.a.folder, self.b.folder

    def start(self) -> None:
        self.a.start()
        self.b.start()
        wait_until(
            lambda: self.a.synced() and self.b.synced(),
            SETUP_TIMEOUT,
            "both Syncthing instances connected and idle",
            interval=0.5,
        )

    def pids(self) -> tuple[int, int]:
        return self.a.pid, self.b.pid

    def close(self) -> None:
        for node in (self.a, self.b):
            node.stop()

    def where_logs(self) -> str:
        return f"{self.a.log_path} and {self.b.log_path}"


# -- one measurement ----------------------------------------------------------------------------


@dataclass(slots=True)
class Side:
    product: str
    seconds: float | None = None
    error: str | None = None
    cpu_sender_s: float | None = None
    cpu_receiver_s: float | None = None


def probe(pair: Pair) -> None:
    """A small file through and its deletion: the watchers and the connection are live."""
    source, target = pair.folder_a / PROBE, pair.folder_b / PROBE
    source.write_text("probe\n")
    wait_until(lambda: target.is_file() and target.read_text() == "probe\n", SETUP_TIMEOUT, "probe")
    source.unlink()
    wait_until(lambda: not target.exists(), SETUP_TIMEOUT, "probe deleted")


def measure(
    pair: Pair,
    staging: Path,
    expected: dict[str, Entry],
    timeout: float,
    profile: Callable[[tuple[int, int]], Recorder],
) -> Side:
    side = Side(pair.product)
    try:
        pair.start()
        probe(pair)
    except (AssertionError, OSError, BenchError, TimeoutError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        side.error = f"set-up failed: {first} (logs: {pair.where_logs()})"
        return side
    pids = pair.pids()
    recorder = profile(pids)
    try:
        cpu_before = [tree_cpu_seconds(pid) for pid in pids]
        cpu_after: list[float] = []

        def mark() -> None:
            cpu_after[:] = [tree_cpu_seconds(pid) for pid in pids]

        move_in(staging, pair.folder_a)
        started = time.monotonic()
        done = wait_identical(pair.folder_b, expected, started + timeout, mark)
        if not cpu_after:
            mark()
    finally:
        recorder.stop()
    side.cpu_sender_s = cpu_after[0] - cpu_before[0]
    side.cpu_receiver_s = cpu_after[1] - cpu_before[1]
    if done is None:
        side.error = f"timeout after {timeout:g} s"
    else:
        side.seconds = done - started
    return side


@dataclass(slots=True)
class Row:
    workload: str
    title: str
    files: int
    bytes: int
    per_file: bool
    lanshare: Side
    syncthing: Side

    def rate(self, side: Side) -> float | None:
        if side.seconds is None or side.seconds <= 0:
            return None
        return (self.files if self.per_file else self.bytes / 1e6) / side.seconds

    @property
    def ratio(self) -> float | None:
        ours, theirs = self.rate(self.lanshare), self.rate(self.syncthing)
        return ours / theirs if ours is not None and theirs else None

    def cpu_per_gb(self, cpu: float | None) -> float | None:
        return None if cpu is None else cpu / (self.bytes / 1e9)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        for name, side in (("lanshare", self.lanshare), ("syncthing", self.syncthing)):
            seconds = side.seconds
            out[name]["mb_per_s"] = self.bytes / 1e6 / seconds if seconds else None
            out[name]["files_per_s"] = self.files / seconds if seconds else None
            out[name]["cpu_sender_s_per_gb"] = self.cpu_per_gb(side.cpu_sender_s)
            out[name]["cpu_receiver_s_per_gb"] = self.cpu_per_gb(side.cpu_receiver_s)
        out["ratio"] = self.ratio
        return out


def run_workload(
    workload: Workload,
    lab: netns.VethLab,
    work: Path,
    identities: tuple[Identity, Identity],
    timeout: float,
    py_spy: str | None,
    profile_dir: Path | None,
    run_index: int,
) -> Row:
    sides: dict[str, Side] = {}
    files = size = 0
    for product in ("lanshare", "Syncthing"):
        base = work / f"{workload.key}-{product.lower()}"
        staging = base / "staging"
        staging.mkdir(parents=True)
        workload.build(staging)
        expected = expected_entries(staging)
        files = sum(1 for e in expected.values() if e.kind != "dir")
        size = sum(e.size for e in expected.values())
        os.sync()  # the staged bytes' write-back must not land inside the timed part
        pair: Pair
        if product == "lanshare":
            pair = LansharePair(lab, base / "nodes")
        else:
            pair = SyncthingPair(lab, base / "nodes", identities)

        def profile(pids: tuple[int, int], product: str = product) -> Recorder:
            if py_spy is None or profile_dir is None or product != "lanshare":
                return Recorder(None, [])
            stem = f"{workload.key}-run{run_index}"
            outputs = [(pids[0], profile_dir / f"{stem}-sender.folded")]
            outputs.append((pids[1], profile_dir / f"{stem}-receiver.folded"))
            return Recorder(py_spy, outputs)

        try:
            sides[product] = measure(pair, staging, expected, timeout, profile)
        finally:
            pair.close()
        _say(f"  {workload.title}: {product} {_side_text(sides[product], workload, files, size)}")
        shutil.rmtree(base, ignore_errors=True)
    return Row(
        workload.key,
        workload.title,
        files,
        size,
        workload.per_file,
        sides["lanshare"],
        sides["Syncthing"],
    )


@dataclass(slots=True)
class ProtocolFigure:
    mb_s: float | None = None
    cpu_sender_s_per_gb: float | None = None
    cpu_receiver_s_per_gb: float | None = None
    error: str | None = None


def protocol_figure(lab: netns.VethLab, size: int) -> ProtocolFigure:
    """bench.transfer's protocol engine between the same two namespaces."""
    try:
        run = transfer.run_one("protocol", size, "auto", [], lab, None, "vs-syncthing")
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
        return ProtocolFigure(error=f"failed: {exc}")
    gb = run.size / 1e9
    return ProtocolFigure(run.mb_s, run.sender_cpu_s / gb, run.receiver_cpu_s / gb)


# -- output -------------------------------------------------------------------------------------

_out: TextIO = sys.stdout


def _say(text: str) -> None:
    print(text, file=_out, flush=True)


def _side_text(side: Side, workload: Workload, files: int, size: int) -> str:
    if side.seconds is None:
        return side.error or "no result"
    rate = files / side.seconds if workload.per_file else size / 1e6 / side.seconds
    unit = "files/s" if workload.per_file else "MB/s"
    return f"{side.seconds:.2f} s, {rate:.1f} {unit}"


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: Sequence[Row]) -> None:
    _say(
        f"  {'workload':<28} {'lanshare':<25} {'Syncthing':<25} {'ratio':>6}   "
        "CPU s/GB tx/rx: lanshare | Syncthing"
    )
    for row in rows:
        unit = "files/s" if row.per_file else "MB/s"
        cells = []
        for side in (row.lanshare, row.syncthing):
            if side.seconds is None:
                cells.append(f"{side.error or 'no result'}")
            else:
                cells.append(f"{side.seconds:7.2f} s {_fmt(row.rate(side), '7.1f')} {unit:<7}")
        cpu = " | ".join(
            f"{_fmt(row.cpu_per_gb(s.cpu_sender_s), '.1f')}/"
            f"{_fmt(row.cpu_per_gb(s.cpu_receiver_s), '.1f')}"
            for s in (row.lanshare, row.syncthing)
        )
        _say(
            f"  {row.title:<28} {cells[0]:<25} {cells[1]:<25} "
            f"{_fmt(row.ratio, '6.2f', '     -')}   {cpu}"
        )


def print_protocol(figure: ProtocolFigure, rows: Sequence[Row], size: int) -> None:
    if figure.mb_s is None:
        _say(f"  protocol only (bench.transfer, {size // MiB} MiB): {figure.error}")
        return
    big = next((r for r in rows if r.workload == "big"), None)
    fraction = ""
    if big is not None and (daemon := big.rate(big.lanshare)) is not None:
        fraction = f"; lanshare daemons' big file = {daemon / figure.mb_s:.0%} of it"
    _say(
        f"  protocol only (bench.transfer, {size // MiB} MiB): {figure.mb_s:.1f} MB/s, "
        f"CPU s/GB tx {_fmt(figure.cpu_sender_s_per_gb, '.1f')} "
        f"rx {_fmt(figure.cpu_receiver_s_per_gb, '.1f')}{fraction}"
    )


@dataclass(slots=True)
class Run:
    rows: list[Row] = field(default_factory=list)
    protocol: ProtocolFigure = field(default_factory=ProtocolFigure)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(runs: Sequence[Run]) -> list[dict[str, Any]]:
    out = []
    for i, first in enumerate(runs[0].rows):
        rows = [run.rows[i] for run in runs]
        entry: dict[str, Any] = {"workload": first.workload, "title": first.title}
        for name in ("lanshare", "syncthing"):
            sides = [cast("Side", getattr(r, name)) for r in rows]
            entry[name] = {
                "seconds": _median([s.seconds for s in sides]),
                "rate": _median([r.rate(s) for r, s in zip(rows, sides, strict=True)]),
                "runs_ok": sum(s.seconds is not None for s in sides),
            }
        entry["ratio"] = _median([r.ratio for r in rows])
        entry["unit"] = "files/s" if first.per_file else "MB/s"
        out.append(entry)
    return out


def print_medians(summary: Sequence[dict[str, Any]], runs: Sequence[Run]) -> None:
    _say(f"median over {len(runs)} runs:")
    for entry in summary:
        cells = []
        for name in ("lanshare", "syncthing"):
            side = entry[name]
            cells.append(
                f"{_fmt(side['seconds'], '.2f')} s {_fmt(side['rate'], '.1f')} {entry['unit']} "
                f"({side['runs_ok']}/{len(runs)} ok)"
            )
        _say(
            f"  {entry['title']:<28} lanshare {cells[0]}, Syncthing {cells[1]}, "
            f"ratio {_fmt(entry['ratio'], '.2f')}"
        )
    protocol = _median([run.protocol.mb_s for run in runs])
    _say(f"  protocol only: {_fmt(protocol, '.1f')} MB/s")


# -- set-up and the command line ----------------------------------------------------------------


def ensure_syncthing() -> None:
    if shutil.which("syncthing") is not None:
        return
    _say("syncthing missing: apt-get install -y syncthing")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "syncthing"]):
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT, check=False
        )
        if result.returncode != 0 and command[1] == "install":
            lines = result.stderr.strip().splitlines()
            raise BenchError(f"apt-get install syncthing failed: {lines[-1] if lines else '?'}")
    if shutil.which("syncthing") is None:
        raise BenchError("syncthing is still missing after apt-get install")


def syncthing_version() -> str:
    result = subprocess.run(
        ["syncthing", "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    words = result.stdout.split()
    return " ".join(words[:2]) if words else "syncthing (version unknown)"


def kill_lab_processes(lab: netns.VethLab) -> None:
    """Whatever still runs in our namespaces (all started by this script) is killed."""
    for namespace in (lab.ns_a, lab.ns_b, lab.ns_router):
        if namespace is None:
            continue
        result = subprocess.run(
            ["ip", "netns", "pids", namespace],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        for pid in result.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def run_all(options: argparse.Namespace) -> list[Run]:
    catalogue = workloads(options.quick)
    chosen = [catalogue[key] for key in options.workload or list(catalogue)]
    py_spy = find_py_spy() if options.py_spy else None
    profile_dir = Path(options.py_spy) if options.py_spy else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    ensure_syncthing()
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="lsvs-", dir=options.workdir))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        lab = stack.enter_context(
            netns.veth_lab(
                loss_percent=options.loss, routed=options.routed, loss_protocols=("udp", "tcp")
            )
        )
        stack.callback(kill_lab_processes, lab)
        _say(
            f"lanshare vs {syncthing_version()}: veth MTU 1500, NIC-like offloads, "
            f"{'routed' if lab.ns_router else 'direct'}, loss {options.loss:g} % (UDP and TCP), "
            f"{os.cpu_count()} CPUs shared by both daemons"
        )
        for note in lab.notes:
            _say(f"  note: {note}")
        identities = (
            generate_identity("a", work / "identity-a", lab),
            generate_identity("b", work / "identity-b", lab),
        )
        for index in range(1, options.repeat + 1):
            _say(f"run {index}/{options.repeat}")
            run = Run()
            for workload in chosen:
                run.rows.append(
                    run_workload(
                        workload,
                        lab,
                        work / f"run{index}",
                        identities,
                        options.timeout,
                        py_spy,
                        profile_dir,
                        index,
                    )
                )
            if not options.no_protocol:
                size = protocol_size(options.quick)
                run.protocol = protocol_figure(lab, size)
            print_table(run.rows)
            if not options.no_protocol:
                print_protocol(run.protocol, run.rows, protocol_size(options.quick))
            runs.append(run)
    return runs


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (argparse's own start with the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    global _out
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload",
        action="append",
        choices=["big", "64k", "4k", "mixed"],
        help="run only these (repeatable; default: all four)",
    )
    parser.add_argument("--quick", action="store_true", help="small workloads, for a smoke run")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of packets lost")
    parser.add_argument(
        "--routed", action="store_true", help="through the loss router, without loss"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs, then the median")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per workload side")
    parser.add_argument("--json", action="store_true", help="JSON on stdout (text on stderr)")
    parser.add_argument("--py-spy", metavar="DIR", help="py-spy stacks of the lanshare daemons")
    parser.add_argument("--no-protocol", action="store_true", help="skip bench.transfer's run")
    parser.add_argument("--workdir", help="where files are staged and synced (default: /tmp)")
    options = parser.parse_args(argv)
    if options.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0 <= options.loss < 100:
        parser.error("--loss is a percentage: at least 0 and below 100")
    if not options.timeout > 0:
        parser.error("--timeout must be more than 0 seconds")
    if options.workdir is not None and not Path(options.workdir).is_dir():
        parser.error(f"--workdir {options.workdir} is not a directory")
    if options.json:
        _out = sys.stderr
    reason = netns.unavailable_reason()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        runs = run_all(options)
    except KeyboardInterrupt:
        print("interrupted: every daemon and namespace is gone", file=sys.stderr)
        return 130
    except (BenchError, netns.LabUnavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = medians(runs)
    if options.repeat > 1:
        print_medians(summary, runs)
    if options.json:
        document = {
            "loss_percent": options.loss,
            "routed": options.routed or options.loss > 0,
            "quick": options.quick,
            "runs": [
                {"rows": [r.as_json() for r in run.rows], "protocol": asdict(run.protocol)}
                for run in runs
            ],
            "median": summary,
        }
        print(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
