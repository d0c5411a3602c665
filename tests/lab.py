"""A multi-host network lab for tests: Linux network namespaces joined by one bridge.

Does I/O (runs ``ip`` and ``nft``; needs root). Each lab puts its bridge in a namespace of its
own and every host in another, joined by veth pairs, with addresses 10.X.Y.n/24 (and, asked
for, fdXX:XXXX::n/64; every host has its IPv6 link-local address) that exist only inside those
namespaces: nothing touches the machine's real interfaces. A lab with IPv6 is handed over only
once duplicate address detection is over on every host (no address ``tentative``), so that
daemons can bind every address at once. Multicast works between
the hosts (mDNS), per-host random loss and a multicast block come from nftables, and teardown
removes everything even when a test fails. Namespaces left by a crashed run (their creator's pid
is gone) are removed at the next start.

Use from a test module::

    from tests.lab import make_lab  # the fixture

    @pytest.mark.netns
    def test_x(make_lab):
        lab = make_lab(3)
        proc = lab.hosts[0].python("-m", "lanshare.discovery", ...)

Or by hand: ``python -m tests.lab up 3`` (Ctrl-C tears it down), ``python -m tests.lab clean``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "lslab-"
"""Every namespace a lab creates is named ``lslab-<creator pid>-<run id>-<role>``."""
MAX_HOSTS = 32
IP_TIMEOUT = 30.0


class LabError(RuntimeError):
    """A lab command failed (its stderr is in the message)."""


# --- availability ----------------------------------------------------------------------------


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None when namespaces can be made here; otherwise why not (for ``pytest.skip``)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run the netns tests as root)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install -y iproute2 nftables)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return f"`ip netns add` failed: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


# --- running commands ------------------------------------------------------------------------


def _run(args: Sequence[str], *, check: bool = True, input: str | None = None) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=IP_TIMEOUT, input=input
    )
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class Process:
    """A process started in a lab host, with its stdout read line by line on a thread."""

    def __init__(self, popen: subprocess.Popen[str], label: str) -> None:
        self.popen = popen
        self.label = label
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"lab-{label}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def send(self, line: str) -> None:
        """Write one line to the process's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def expect_json(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """The next JSON line satisfying ``predicate``, or ``TimeoutError`` after ``timeout`` s.

        Lines already read are searched first, then new ones as they arrive.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                seen += 1
                obj = _json_or_none(line)
                if obj is not None and predicate(obj):
                    return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.label}: no matching line in {timeout} s")
            try:
                if self._new.get(timeout=remaining) is None and seen >= len(self.lines):
                    raise TimeoutError(f"{self.label}: exited ({self.popen.poll()}) before a match")
            except queue.Empty:
                continue

    def json_lines(self) -> list[dict[str, Any]]:
        return [obj for obj in map(_json_or_none, list(self.lines)) if obj is not None]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``sig``, wait (SIGKILL after ``timeout``), close pipes; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.popen.returncode


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


# --- the lab ---------------------------------------------------------------------------------


@dataclass
class Host:
    """One host of a lab: a namespace with ``eth0`` on the lab bridge and ``lo`` up."""

    lab: Lab
    index: int
    netns: str
    address: str
    """The IPv4 address, or the global IPv6 one on a lab without IPv4."""
    address6: str = ""
    """The global IPv6 address ("" without IPv6)."""
    processes: list[Process] = field(default_factory=list)

    def link_local(self) -> str:
        """eth0's IPv6 link-local address (without a scope)."""
        out = self.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
        for line in out.splitlines():
            fields = line.split()
            if "inet6" in fields:
                return fields[fields.index("inet6") + 1].split("/")[0]
        raise LabError(f"{self.name}: eth0 has no link-local address: {out!r}")

    @property
    def name(self) -> str:
        return f"h{self.index}"

    def run(self, *args: str, check: bool = True) -> str:
        """Run a command in this host and return its stdout."""
        return _run(["ip", "netns", "exec", self.netns, *args], check=check)

    def popen(self, *args: str, stderr_path: Path | None = None) -> Process:
        """Start a command in this host (stdin/stdout piped, stderr to a file or discarded)."""
        stderr: Any = subprocess.DEVNULL
        if stderr_path is not None:
            stderr = stderr_path.open("w")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        try:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=ROOT,
                env=env,
            )
        finally:
            if stderr_path is not None:
                stderr.close()
        process = Process(popen, f"{self.name}:{args[0]}")
        self.processes.append(process)
        return process

    def python(self, *args: str, stderr_path: Path | None = None) -> Process:
        """Start ``python ARGS`` (this interpreter, repository on the path) in this host."""
        return self.popen(sys.executable, *args, stderr_path=stderr_path)

    def set_loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets arriving at this host (nftables); 0 removes it."""
        self._nft_replace("lslab_loss", None)
        if percent > 0:
            threshold = round(percent * 100)
            match = "" if threshold >= 10000 else f"numgen random mod 10000 < {threshold} "
            self._nft_replace(
                "lslab_loss",
                "chain input { type filter hook input priority 0; policy accept;\n"
                f'  iifname "eth0" {match}drop\n}}',
            )

    def block_multicast(self, blocked: bool = True) -> None:
        """Drop mDNS multicast (224.0.0.251 and ff02::fb, UDP 5353) in and out of this host."""
        self._nft_replace("lslab_mdns", None)
        if blocked:
            rules = (
                "ip daddr 224.0.0.251 udp dport 5353 drop\n  ip6 daddr ff02::fb udp dport 5353 drop"
            )
            self._nft_replace(
                "lslab_mdns",
                f"chain input {{ type filter hook input priority 0; policy accept; {rules}\n}}\n"
                f"chain output {{ type filter hook output priority 0; policy accept; {rules}\n}}",
            )

    def _nft_replace(self, table: str, body: str | None) -> None:
        self.run("nft", "delete", "table", "inet", table, check=False)
        if body is not None:
            _run(
                ["ip", "netns", "exec", self.netns, "nft", "-f", "-"],
                input=f"table inet {table} {{\n{body}\n}}\n",
            )

    def stop_processes(self) -> None:
        for process in self.processes:
            process.stop()


class Lab:
    """N hosts on one bridge. ``create()`` builds it; ``close()`` (idempotent) removes it."""

    def __init__(
        self,
        n_hosts: int,
        *,
        loss: float = 0.0,
        block_multicast: bool = False,
        ipv4: bool = True,
        ipv6: bool = False,
    ) -> None:
        """``ipv4`` False: no IPv4 address on the hosts' eth0 (IPv6 only: link-local, and
        global with ``ipv6``)."""
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"1..{MAX_HOSTS} hosts")
        self.run_id = f"{os.getpid()}-{random.randrange(16**6):06x}"
        self.bridge_ns = f"{PREFIX}{self.run_id}-br"
        # A private /24 that exists only inside this lab's namespaces.
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        # A unique local /64 (RFC 4193), random like the /24.
        words = (random.randrange(256), random.randrange(65536), random.randrange(65536))
        self.subnet6 = "fd{:02x}:{:x}:{:x}:".format(*words)
        self._ipv4 = ipv4
        self._ipv6 = ipv6
        self.hosts = []
        for i in range(1, n_hosts + 1):
            v6 = f"{self.subnet6}:{i:x}" if ipv6 else ""
            v4 = f"{self.subnet}.{i}" if ipv4 else v6
            self.hosts.append(Host(self, i, f"{PREFIX}{self.run_id}-h{i}", v4, v6))
        self._loss = loss
        self._block = block_multicast
        self._created: list[str] = []

    def __enter__(self) -> Lab:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        """Build the bridge and the hosts; on failure everything made so far is removed."""
        cleanup_stale()
        try:
            self._add_netns(self.bridge_ns)
            br = ["ip", "-n", self.bridge_ns]
            _run([*br, "link", "set", "lo", "up"])
            # No IGMP snooping: the bridge floods multicast to every port, like a plain switch.
            _run([*br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
            _run([*br, "link", "set", "br0", "up"])
            for host in self.hosts:
                self._add_host(host)
            if self._ipv6 or not self._ipv4:
                self._wait_for_dad()
            for host in self.hosts:
                if self._loss:
                    host.set_loss(self._loss)
                if self._block:
                    host.block_multicast()
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)

    def _add_host(self, host: Host) -> None:
        self._add_netns(host.netns)
        port = f"v{host.index}"
        br = ["ip", "-n", self.bridge_ns]
        hn = ["ip", "-n", host.netns]
        _run(
            [*br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns]
        )
        _run([*br, "link", "set", port, "master", "br0", "up"])
        _run([*hn, "link", "set", "lo", "up"])
        if self._ipv4:
            _run([*hn, "addr", "add", f"{host.address}/24", "dev", "eth0"])
        if self._ipv6:
            # Unique by construction: no duplicate address detection to wait for.
            _run([*hn, "addr", "add", f"{host.address6}/64", "dev", "eth0", "nodad"])
        _run([*hn, "link", "set", "eth0", "up"])
        if self._ipv4:
            # Multicast leaves through eth0 (there is no default route in a lab host).
            _run([*hn, "route", "add", "224.0.0.0/4", "dev", "eth0"])

    def _wait_for_dad(self) -> None:
        """Until no host has a tentative address (the link-local one runs DAD, ~1 s)."""
        deadline = time.monotonic() + IP_TIMEOUT
        pending = list(self.hosts)
        while pending:
            pending = [
                h
                for h in pending
                if h.run("ip", "-6", "addr", "show", "dev", "eth0", "tentative").strip()
                or not h.run("ip", "-6", "addr", "show", "dev", "eth0", "scope", "link").strip()
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LabError(f"IPv6 duplicate address detection still runs on {pending[0].name}")
            time.sleep(0.1)

    def close(self) -> None:
        """Stop every process, then delete every namespace this lab made."""
        for host in self.hosts:
            host.stop_processes()
        for name in reversed(self._created):
            _remove_netns(name)
        self._created.clear()


def _remove_netns(name: str) -> None:
    pids = _run(["ip", "netns", "pids", name], check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", name], check=False)


def cleanup_stale() -> list[str]:
    """Remove lab namespaces whose creating process is gone; returns their names."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        _remove_netns(name)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- pytest fixture --------------------------------------------------------------------------


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """A factory ``make_lab(n, loss=0.0, block_multicast=False) -> Lab``; all torn down after."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    labs: list[Lab] = []

    def factory(n_hosts: int, **options: Any) -> Lab:
        lab = Lab(n_hosts, **options)
        labs.append(lab)
        lab.create()
        return lab

    yield factory
    for lab in labs:
        lab.close()


# --- manual use ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.lab up N [--loss PCT] [--block-multicast]`` or ``... clean``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["clean"]:
        for name in cleanup_stale():
            sys.stdout.write(f"removed {name}\n")
        return 0
    if args[:1] != ["up"] or len(args) < 2 or not args[1].isdigit():
        sys.stderr.write(f"{main.__doc__}\n")
        return 2
    reason = netns_unavailable_reason()
    if reason is not None:
        sys.stderr.write(reason + "\n")
        return 1
    loss = float(args[args.index("--loss") + 1]) if "--loss" in args else 0.0
    with Lab(int(args[1]), loss=loss, block_multicast="--block-multicast" in args) as lab:
        for host in lab.hosts:
            sys.stdout.write(f"{host.name}: ip netns exec {host.netns} ...   ({host.address})\n")
        sys.stdout.write("Ctrl-C to tear down\n")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, _interrupt)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
