"""Real ``lanshare daemon`` processes for end-to-end tests and benchmarks.

Does I/O: writes configs and folders, starts processes (in a lab host's network namespace or
on loopback), owns an ``sd_notify`` socket per daemon as systemd would, and compares trees.
Every wait is bounded; ``Node.stop()`` is idempotent and always leaves no process behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanshare import keys
from lanshare.control import ControlClient
from tests.lab import ROOT, Lab, Process, netns_unavailable_reason

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from tests.lab import Host

READY_TIMEOUT = 60.0
"""Seconds a daemon may take to bind, scan and register before the test gives up."""
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 120.0
INTERNAL_DIR = ".lanshare"
TEMP_PREFIX = ".lanshare-tmp-"
MiB = 1024 * 1024


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 right now (for loopback daemons and static peers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def new_key() -> str:
    return keys.format_key(keys.generate_key())


def short_dir(prefix: str = "lse-") -> Path:
    """A directory with a short path, for Unix sockets (``sun_path`` holds 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- sd_notify, acting as systemd --------------------------------------------------------------


class NotifyListener:
    """An AF_UNIX datagram socket the test owns as ``$NOTIFY_SOCKET``; a thread keeps every
    message (and keeps the queue drained, since the kernel holds only a few datagrams)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._closed = False
        self._thread = threading.Thread(target=self._read, name=f"notify-{path.name}")
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def values(self, key: str) -> list[str]:
        with self._cond:
            return [m[key] for _, m in self.messages if key in m]

    def times(self, key: str, value: str | None = None) -> list[float]:
        with self._cond:
            return [t for t, m in self.messages if key in m and value in (None, m[key])]

    def wait_for(
        self,
        key: str,
        value: str | None = None,
        timeout: float = READY_TIMEOUT,
        alive: Callable[[], bool] | None = None,
    ) -> float:
        """Monotonic time of the first ``key[=value]`` message; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, m in self.messages:
                    if key in m and value in (None, m[key]):
                        return t
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {key}={value or '*'} on {self.path} in {timeout} s")
                if alive is not None and not alive():
                    raise RuntimeError(f"the process exited before {key}={value or '*'}")
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- one daemon --------------------------------------------------------------------------------


@dataclass
class Node:
    """One machine's daemon: its folder, state, control socket, config and log.

    ``host`` None runs on loopback (``interfaces = ["127.0.0.1"]``); otherwise every command
    runs in the lab host's namespace and mDNS uses the host's own interfaces.
    """

    name: str
    base: Path
    sockets: Path
    key: str
    host: Host | None = None
    port: int = 47474
    static_peers: tuple[str, ...] = ()
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: list[tuple[Path, str]] = field(default_factory=list)
    nofile: int | None = None
    """Start the daemon with this ``RLIMIT_NOFILE`` (soft and hard): a host with few open
    files allowed."""
    process: Process | None = None
    notify: NotifyListener | None = None
    runs: int = 0
    exit_codes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.folders:
            self.folders.append((self.folder, self.key))
        self.write_config()

    # -- paths --

    @property
    def folder(self) -> Path:
        return self.base / "share"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    @property
    def control_socket(self) -> Path:
        return self.sockets / f"{self.name}.sock"

    @property
    def log_path(self) -> Path:
        return self.base / f"daemon-{self.runs}.log"

    @property
    def address(self) -> str:
        return self.host.address if self.host is not None else "127.0.0.1"

    @property
    def endpoint(self) -> str:
        """``addr:port`` as peers and ``static_peers`` write it (``[addr]:port`` for IPv6)."""
        host = self.address
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # -- config --

    def config_text(self) -> str:
        network: dict[str, Any] = {"port": self.port, "static_peers": list(self.static_peers)}
        if self.host is None:
            network.update(bind=["127.0.0.1"], interfaces=["127.0.0.1"])
        tables: dict[str, dict[str, Any]] = {
            "node": {
                "name": self.name,
                "state_dir": str(self.state_dir),
                "control_socket": str(self.control_socket),
            },
            "network": network,
            "logging": {"level": "info"},
        }
        for table, values in self.extra.items():
            tables.setdefault(table, {}).update(values)
        lines = []
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
            lines.append("")
        for path, key in self.folders:
            lines += ["[[folder]]", f"path = {_toml(str(path))}", f"key = {_toml(key)}", ""]
        return "\n".join(lines)

    def write_config(self, text: str | None = None) -> None:
        """Write the config (or ``text``) atomically with mode 0600."""
        tmp = self.config_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text() if text is None else text)
        os.replace(tmp, self.config_path)

    # -- processes --

    def command(self, *args: str) -> list[str]:
        """``args`` run in this node's network namespace (as is on loopback)."""
        if self.host is None:
            return list(args)
        return ["ip", "netns", "exec", self.host.netns, *args]

    def start(
        self,
        *,
        wait: bool = True,
        timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start ``python -m lanshare daemon`` with our NOTIFY_SOCKET; wait for READY=1."""
        assert self.process is None or self.process.popen.poll() is not None, "already running"
        self.process = self.launch(env)
        if wait:
            self.wait_ready(timeout)

    def launch(self, env: dict[str, str] | None = None) -> Process:
        """Start one more daemon process on this config (a new run: its own log and
        notify socket) and return it; ``start()`` is this plus keeping it as ``process``."""
        self._close_notify()
        self.runs += 1
        self.notify = NotifyListener(self.sockets / f"{self.name}-{self.runs}.notify")
        environ = dict(_base_env(), NOTIFY_SOCKET=str(self.notify.path), **(env or {}))
        args = [sys.executable, "-m", "lanshare", "daemon", "--config", str(self.config_path)]
        if self.nofile is not None:
            args = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *args]
        with self.log_path.open("w") as log:
            popen = subprocess.Popen(
                self.command(*args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
                env=environ,
            )
        process = Process(popen, f"{self.name}:daemon")
        if self.host is not None:
            self.host.processes.append(process)
        return process

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.notify is not None
        try:
            self.notify.wait_for("READY", "1", timeout, alive=self.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{self.name} not ready: {exc}\n{self.log_tail()}") from None

    def alive(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Signal the daemon and wait for it (SIGKILL after ``timeout``); its exit code."""
        if self.process is None:
            return None
        code = self.process.stop(sig, timeout)
        if self.host is not None and self.process in self.host.processes:
            self.host.processes.remove(self.process)
        self.process = None
        self.exit_codes.append(code)
        return code

    def kill(self) -> None:
        """``kill -9``: no goodbye, no cleanup."""
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        self._close_notify()

    def _close_notify(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    # -- the command line and the control socket --

    def cli(
        self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT, tty: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """``lanshare --config OURS ARGS`` in this node's namespace."""
        argv = self.command(
            sys.executable, "-m", "lanshare", "--config", str(self.config_path), *args
        )
        if tty:
            result = run_in_pty(argv, timeout)
        else:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=ROOT,
                env=_base_env(),
                stdin=subprocess.DEVNULL,
            )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name}: lanshare {' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def cli_json(self, *args: str, timeout: float = CLI_TIMEOUT) -> Any:
        return json.loads(self.cli(*args, "--json", timeout=timeout).stdout)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Ask the daemon over its control socket (from the test process: no start-up cost)."""
        with ControlClient(self.control_socket, timeout=30.0) as client:
            return client.call(method, params or {})

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def folder_status(self, path: Path | None = None) -> dict[str, Any]:
        target = str(path or self.folder)
        for folder in self.status()["folders"]:
            if folder["path"] == target:
                return dict(folder)
        raise KeyError(target)

    # -- observations --

    def rss_bytes(self) -> int:
        """Resident set size of the daemon process (``VmRSS``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log_text(self, run: int | None = None) -> str:
        path = self.base / f"daemon-{self.runs if run is None else run}.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()[-lines:]
        return f"--- {self.name} log (run {self.runs}) ---\n" + "\n".join(text)

    def wait_log(self, needle: str, timeout: float, run: int | None = None) -> None:
        wait_until(lambda: needle in self.log_text(run), timeout, f"{self.name} logs {needle!r}")


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists of them: same syntax


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", COLUMNS="80")
    return env


def run_in_pty(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; both end up in ``stdout``."""
    import pty
    import select

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=dict(_base_env(), TERM="xterm"),
        )
        os.close(slave)
        slave = -1
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        code = proc.wait(timeout=10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    return subprocess.CompletedProcess(list(argv), code, out, "")


# --- waiting -----------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``predicate`` until truthy (returned) or raise ``AssertionError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:  # a file mid-rename, a socket not up yet
            last_error = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout} s waiting until {what}{extra}")
        time.sleep(interval)


def state_locked(node: Node) -> bool:
    """Whether a lanshare process (a daemon, or the short-lived node of a command) holds
    ``node``'s state: its lock file is flocked. Read from /proc/locks, so that looking never
    takes the lock from under a process that is about to."""
    try:
        inode = os.stat(node.state_dir / "daemon.lock").st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as locks:
        return any(line.split()[5].rsplit(":", 1)[1] == str(inode) for line in locks)


# --- trees -------------------------------------------------------------------------------------


Entry = tuple[Any, ...]


def snapshot(root: Path, *, content: bool = True) -> dict[str, Entry]:
    """Every entry below ``root`` (without ``.lanshare/`` and temp files): files as (type,
    size, mode, mtime_ns, digest), directories as (type, mode), symlinks as (type, target)."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            rel_dir = ""
            if INTERNAL_DIR in dirnames:
                dirnames.remove(INTERNAL_DIR)
        for name in [*dirnames, *filenames]:
            if name.startswith(TEMP_PREFIX):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = file_digest(Path(path)) if content else None
                out[rel] = ("file", st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, digest)
    return out


def file_digest(path: Path) -> str:
    h = hashlib.blake2b()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def temp_files(root: Path) -> list[str]:
    """Download temp files below ``root`` (relative paths)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if INTERNAL_DIR in dirnames and Path(dirpath) == root:
            dirnames.remove(INTERNAL_DIR)
        found += [
            os.path.relpath(os.path.join(dirpath, n), root)
            for n in filenames
            if n.startswith(TEMP_PREFIX)
        ]
    return found


def tree_diff(want: dict[str, Entry], got: dict[str, Entry], limit: int = 10) -> str:
    lines = []
    for rel in sorted(set(want) | set(got)):
        if want.get(rel) != got.get(rel):
            lines.append(f"  {rel}: want {want.get(rel)} got {got.get(rel)}")
            if len(lines) >= limit:
                lines.append("  …")
                break
    return "\n".join(lines)


def wait_same_tree(
    source: Path, targets: Iterable[Path], timeout: float, nodes: Sequence[Node] = ()
) -> dict[str, Entry]:
    """Wait until every target holds exactly ``source``'s tree (cheap check first, then the
    content); returns the source snapshot. On timeout the differences and the logs are shown."""
    want = snapshot(source)
    cheap = {k: v[:4] if v[0] == "file" else v for k, v in want.items()}
    targets = list(targets)
    deadline = time.monotonic() + timeout
    pending = list(targets)
    while pending:
        target = pending[0]
        got = snapshot(target, content=False)
        if {k: v[:4] if v[0] == "file" else v for k, v in got.items()} == cheap:
            full = snapshot(target)
            if full == want:
                pending.pop(0)
                continue
        if time.monotonic() >= deadline:
            detail = tree_diff(want, snapshot(target))
            logs = "\n".join(n.log_tail(30) for n in nodes)
            for node in nodes:
                with contextlib.suppress(Exception):
                    logs += f"\n{node.name} status: {node.status()}"
            raise AssertionError(
                f"{target} differs from {source} after {timeout} s:\n{detail}\n{logs}"
            )
        time.sleep(0.25)
    return want


# --- test data ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MixedTree:
    """What ``make_mixed_tree`` wrote."""

    files: int
    bytes: int
    big: str
    small: list[str]


def make_mixed_tree(root: Path, *, big_size: int, small_files: int, seed: int = 0) -> MixedTree:
    """One big file, many small ones in nested directories with varied modes and mtimes, a
    symlink and an empty directory."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    big = "media/big.bin"
    (root / "media").mkdir()
    with (root / big).open("wb") as f:
        left = big_size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
    total += big_size
    os.utime(root / big, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    small = []
    (root / "docs").mkdir()  # also with no small files: the readme below lives there
    for i in range(small_files):
        rel = f"docs/d{i % 10}/e{i % 7}/f{i:04d}.dat"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.choice([0, rng.randrange(1, 2048), rng.randrange(2048, 64 * 1024)])
        path.write_bytes(rng.randbytes(size))
        path.chmod(rng.choice([0o644, 0o600, 0o755, 0o640]))
        mtime = 1_600_000_000_000_000_000 + rng.randrange(10**17)
        os.utime(path, ns=(mtime, mtime))
        total += size
        small.append(rel)
    (root / "docs" / "readme.txt").write_text("hello from the mixed tree\n")
    small.append("docs/readme.txt")
    (root / "link-to-readme").symlink_to("docs/readme.txt")
    (root / "empty" / "nothing-here").mkdir(parents=True)
    (root / "private").mkdir(mode=0o700)
    (root / "private" / "secret.txt").write_text("s3cret\n")
    (root / "private" / "secret.txt").chmod(0o600)
    small.append("private/secret.txt")
    return MixedTree(files=len(small) + 1, bytes=total, big=big, small=small)


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)


# --- a test's daemons --------------------------------------------------------------------------


class Cluster:
    """Creates labs and nodes for one test and tears all of them down (``close()``)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.sockets = short_dir()
        self.key = new_key()
        self.nodes: list[Node] = []
        self.labs: list[Lab] = []

    def lab(self, n_hosts: int, **options: Any) -> Lab:
        """A namespace lab (the test is skipped where namespaces cannot be made)."""
        import pytest

        reason = netns_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
        lab = Lab(n_hosts, **options)
        self.labs.append(lab)
        lab.create()
        return lab

    def node(self, name: str, host: Host | None = None, **options: Any) -> Node:
        """A daemon's files and config (not started); loopback ones get a free port."""
        options.setdefault("key", self.key)
        if host is None:
            options.setdefault("port", free_udp_port())
        node = Node(name, self.tmp_path / name, self.sockets, host=host, **options)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        for lab in self.labs:
            lab.close()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(node.log_tail(200) for node in self.nodes)


# --- measurements ------------------------------------------------------------------------------


def start_all(nodes: Sequence[Node], timeout: float = READY_TIMEOUT) -> None:
    """Start the daemons together, then wait until every one said READY=1."""
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready(timeout)


def propagation_latency(
    source: Node, targets: Sequence[Node], rel: str, data: bytes, timeout: float
) -> float:
    """Seconds from saving ``rel`` on ``source`` until it is identical on every target."""
    path = source.folder / rel
    tmp = path.with_name(f"{path.name}.editing")
    tmp.write_bytes(data)
    start = time.monotonic()
    os.replace(tmp, path)  # an editor's atomic save
    wanted = [t.folder / rel for t in targets]
    deadline = start + timeout
    pending = list(wanted)
    while pending:
        with contextlib.suppress(OSError):
            if pending[0].read_bytes() == data:
                pending.pop(0)
                continue
        if time.monotonic() > deadline:
            raise AssertionError(f"{pending[0]} not updated within {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - start


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]
