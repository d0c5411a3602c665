"""A cluster of real sync engines in one asyncio loop, joined by a simulated datagram network.

Test harness with real I/O: every node has its own folder and SQLite index in a temporary
directory, a real ``Endpoint`` and a real ``Engine``. Only the wire and the clock are
simulated: the wire is ``tests.sim``'s seeded link model (loss, duplication, reordering,
delay, per-link rate and queue), the same the protocol tests run on; the clock is virtual
(``VirtualTimeLoop``, which tests/conftest.py installs for the modules that use ``Cluster``),
the engine's ``LoopClock`` reads it, and it stands still while a worker thread does real
I/O. A seed thus reproduces its run (the same datagrams lost, the same timers, the same
order of events), and simulated seconds of waiting cost no real time.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import logging
import math
import os
import random
import selectors
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lanshare import chunker, keys, scanner
from lanshare.config import (
    Config,
    FolderConfig,
    NetworkConfig,
    NodeConfig,
    SyncConfig,
    TransferConfig,
)
from lanshare.engine import Engine, FolderSync
from lanshare.events import BlockReceived, BlockRequested, Event
from lanshare.identity import NodeId
from lanshare.index import Index
from lanshare.paths import INTERNAL_DIR, MARKER, is_temporary
from lanshare.protocol import Endpoint
from lanshare.store import OpenAssemblies
from tests import sim

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from lanshare.clock import Clock
    from lanshare.events import Addr

logger = logging.getLogger(__name__)

PORT = 47474


START = 1000.0
"""Virtual seconds on the loop's clock when a test starts."""


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual: it jumps to the next timer whenever nothing is
    ready and no worker-thread job is outstanding, so simulated seconds cost no real time.

    Worker threads do real file and SQLite I/O (``asyncio.to_thread``, ``run_in_executor``):
    while one runs, time stands still, so no timeout fires because a thread was slow. The
    loop's own executor runs one job at a time, in the order they were submitted, and every
    job's result reaches the loop only when it is otherwise idle, in that order: the
    interleaving of threads and callbacks is the same on every run, and a seed reproduces its
    run (what differs is the wall clock: the stamps it puts on deletions and versions, and
    the mtimes of files a test writes).
    """

    def __init__(self) -> None:
        self._virtual = START
        self._jobs: collections.deque[_Job] = collections.deque()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sim-io")
        super().__init__(_IdleSelector(self))
        self.set_default_executor(self._worker)

    def time(self) -> float:
        return self._virtual

    def run_in_executor(  # type: ignore[override]
        self,
        executor: concurrent.futures.Executor | None,
        func: Callable[..., _T],
        *args: Any,
    ) -> asyncio.Future[_T]:
        job = _Job((executor or self._worker).submit(func, *args), self.create_future())
        job.future.add_done_callback(job.cancel)
        job.work.add_done_callback(self._wake)
        self._jobs.append(job)
        return job.future

    def _wake(self, _: object) -> None:
        # Runs in the worker: the loop may be blocked in select, waiting for this job.
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self.call_soon_threadsafe(_nothing)

    def idle(self, timeout: float | None, select: Callable[[float | None], _Events]) -> _Events:
        """Nothing is ready at this instant: hand over the oldest job's result (waiting in
        real time for it to finish), or else let time jump to the next timer."""
        if self._jobs:
            job = self._jobs[0]
            if not job.work.done():
                return select(None)  # its end wakes the loop (``_wake``)
            self._jobs.popleft()
            self.call_soon(job.deliver)
            return []
        if timeout is None:
            return select(None)  # no timer at all: only another thread can wake the loop
        self._virtual += timeout
        return []


_T = TypeVar("_T")
_Events = list[tuple[selectors.SelectorKey, int]]


def _nothing() -> None:
    """Posted only to wake the loop."""


@dataclass(slots=True)
class _Job:
    """A worker-thread call and the loop's future of its result."""

    work: concurrent.futures.Future[Any]
    future: asyncio.Future[Any]

    def cancel(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.work.cancel()  # not started yet: it never runs

    def deliver(self) -> None:
        if self.future.done() or self.work.cancelled():
            return
        error = self.work.exception()
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(self.work.result())


class _IdleSelector(selectors.DefaultSelector):
    """The loop's selector: real file descriptors first (the loop's own wake-ups), then
    ``VirtualTimeLoop.idle`` instead of a real wait."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> _Events:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        return self._loop.idle(timeout, super().select)


class VirtualTimePolicy(asyncio.DefaultEventLoopPolicy):
    """``asyncio.run`` on a ``VirtualTimeLoop`` (tests/conftest.py installs it for every test
    of a module that runs a ``Cluster``)."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return VirtualTimeLoop()


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Behaviour of one direction of a link (``sim.Link`` with the engine tests' defaults)."""

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    """Probability that a datagram is held back by up to ``reorder_delay`` more."""
    reorder_delay: float = 0.003
    delay: float = 0.0005
    rate: float = 0.0
    """Bytes per second; 0 means unlimited."""
    queue_time: float = 0.05
    """Seconds of ``rate`` the link may queue before it drops (tail drop)."""

    def link(self) -> sim.Link:
        queue = math.ceil(self.rate * self.queue_time) if self.rate else 0
        return sim.Link(
            loss=self.loss,
            dup=self.dup,
            reorder=self.reorder,
            reorder_delay=self.reorder_delay,
            delay=self.delay,
            bandwidth=self.rate,
            queue_size=queue,
        )


class SimNetwork:
    """Datagrams between registered adapters, moved by ``sim.Network``'s link model and
    delivered with ``loop.call_at`` (on the virtual time of ``VirtualTimeLoop``)."""

    def __init__(self, seed: int, default: LinkSpec | None = None) -> None:
        self.seed = seed
        self.model = sim.Network(seed, (default or LinkSpec()).link())
        self.cut: set[frozenset[Addr]] = set()
        self.ports: dict[Addr, SimTransport] = {}
        self.bytes_sent: Counter[tuple[Addr, Addr]] = Counter()
        self.datagrams: Counter[str] = Counter()

    def set_link(self, src: Addr, dst: Addr, spec: LinkSpec, *, both: bool = False) -> None:
        self.model.set_link(src, dst, spec.link())
        if both:
            self.model.set_link(dst, src, spec.link())

    def disconnect(self, a: Addr, b: Addr) -> None:
        """No datagram goes between ``a`` and ``b`` any more (either way)."""
        self.cut.add(frozenset((a, b)))

    def reconnect(self, a: Addr, b: Addr) -> None:
        """Undo ``disconnect``."""
        self.cut.discard(frozenset((a, b)))

    def send(self, src: Addr, dst: Addr, data: bytes) -> None:
        self.datagrams["sent"] += 1
        if frozenset((src, dst)) in self.cut or dst not in self.ports:
            self.datagrams["unroutable"] += 1
            return
        loop = asyncio.get_running_loop()
        self.model.now = loop.time()
        arrivals = self.model.transit(data, src, dst)
        if arrivals:
            self.bytes_sent[(src, dst)] += len(data)
        else:
            self.datagrams["dropped"] += 1
        for at in arrivals:
            loop.call_at(at, self._deliver, src, dst, data)

    def _deliver(self, src: Addr, dst: Addr, data: bytes) -> None:
        port = self.ports.get(dst)
        if port is None or frozenset((src, dst)) in self.cut:
            return
        self.datagrams["delivered"] += 1
        port.receive(data, src)


@dataclass(slots=True)
class BlockCounters:
    """What one node moved as block data (from its endpoint's events)."""

    received: Counter[bytes] = field(default_factory=Counter)
    """Bytes of verified block data received, by peer id."""
    requested_of_me: Counter[bytes] = field(default_factory=Counter)
    """Bytes of blocks peers asked this node for, by peer id."""
    received_hashes: list[bytes] = field(default_factory=list)

    @property
    def received_total(self) -> int:
        return sum(self.received.values())

    @property
    def served_total(self) -> int:
        return sum(self.requested_of_me.values())


class SimTransport:
    """The adapter loop of ``lanshare.transport.base`` over ``SimNetwork``: feed datagrams and
    timer expiries with ``loop.time()``, drain events into a sink, send, keep one timer."""

    def __init__(self, network: SimNetwork, addr: Addr, endpoint: Endpoint) -> None:
        self.network = network
        self.addr = addr
        self.endpoint = endpoint
        self.sink: Callable[[Event], None] = lambda event: None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._processing = False
        self._again = False
        self._scheduled = False
        self.closed = False
        network.ports[addr] = self

    def receive(self, data: bytes, src: Addr) -> None:
        if self.closed:
            return
        self.endpoint.receive_datagram(data, src, self._loop.time())
        if not self._scheduled:
            # Datagrams delivered in the same loop iteration are processed together.
            self._scheduled = True
            self._loop.call_soon(self._deferred)

    def kick(self) -> None:
        self._process()

    def close(self) -> None:
        """Drop off the network at once (nothing more is sent or received)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.network.ports.get(self.addr) is self:
            del self.network.ports[self.addr]

    def _deferred(self) -> None:
        self._scheduled = False
        self._process()

    def _process(self) -> None:
        if self.closed:
            return
        if self._processing:
            self._again = True
            return
        self._processing = True
        try:
            for _ in range(16):
                self._again = False
                while (event := self.endpoint.next_event()) is not None:
                    self.sink(event)
                for data, dst in self.endpoint.datagrams_to_send(self._loop.time()):
                    self.network.send(self.addr, dst, data)
                if not self._again:
                    break
            else:
                self._loop.call_soon(self._process)
        finally:
            self._processing = False
        self._arm()

    def _arm(self) -> None:
        if self.closed:
            return
        at = self.endpoint.get_timer()
        if self._timer is not None and self._timer_at != at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)
        self._timer_at = at

    def _on_timer(self) -> None:
        self._timer = None
        self.endpoint.handle_timer(self._loop.time())
        self._process()


class SimNode:
    """One node: folder, index, endpoint, engine; ``start``/``stop``/``crash`` and restart."""

    def __init__(
        self,
        cluster: Cluster,
        number: int,
        *,
        ignore: Sequence[str] = (),
        max_send_rate: int = 0,
        transfer: TransferConfig | None = None,
        whole_folders: bool = True,
        open_assemblies: int | None = None,
        clock: Clock | None = None,
        sync: SyncConfig | None = None,
    ) -> None:
        self.cluster = cluster
        self.sync = sync or SyncConfig()
        self.clock = clock
        """The engine's clock (None: the loop's)."""
        self.whole_folders = whole_folders
        self.open_assemblies = open_assemblies
        """The bound on open downloads of this node alone (None: the process-wide one)."""
        self.number = number
        self.name = f"n{number}"
        self.addr: Addr = (f"10.0.0.{number}", PORT)
        self.base = cluster.base / self.name
        self.root = self.base / "folder"
        self.state_dir = self.base / "state"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = random.Random(cluster.seed * 1000 + number).randbytes(8)
        self.ignore = tuple(ignore)
        self.max_send_rate = max_send_rate
        self.transfer = transfer or cluster.transfer
        self.counters = BlockCounters()
        self.index: Index | None = None
        self.engine: Engine | None = None
        self.endpoint: Endpoint | None = None
        self.transport: SimTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._scan_lock = asyncio.Lock()
        self.starts = 0

    @property
    def folder(self) -> FolderSync:
        assert self.engine is not None
        return next(iter(self.engine.folders.values()))

    @property
    def running(self) -> bool:
        return self._task is not None

    def config(self) -> Config:
        return Config(
            node=NodeConfig(
                name=self.name,
                state_dir=self.state_dir,
                control_socket=self.state_dir / "control.sock",
            ),
            network=NetworkConfig(port=PORT, max_send_rate=self.max_send_rate),
            transfer=self.transfer,
            sync=self.sync,
            folders=(FolderConfig(self.root, self.cluster.key, self.ignore),),
        )

    async def start(self) -> None:
        """Open the index, build endpoint and engine, start the engine and its first scan."""
        await self.start_idle()
        assert self.engine is not None
        self._task = asyncio.create_task(self.engine.run(), name=f"engine-{self.name}")
        await asyncio.wait_for(self.folder.scanned.wait(), 30)

    async def start_idle(self) -> None:
        """Build the node from disk without running its engine: nothing is scanned, planned
        or connected (what a node looks like between reading its index and planning)."""
        assert self._task is None
        assert self.index is None
        config = self.config()
        self.starts += 1
        self.index = await asyncio.to_thread(Index.open, self.state_dir / "index.sqlite3")
        rng = random.Random(f"{self.cluster.seed}-{self.number}-{self.starts}")
        self.endpoint = Endpoint(
            config.transfer, config.network, node_id=self.node_id, folders={}, rng=rng
        )
        self.transport = SimTransport(self.cluster.network, self.addr, self.endpoint)
        self.engine = Engine(
            config,
            self.index,
            NodeId(self.node_id),
            self.endpoint,
            kick=self.transport.kick,
            clock=self.clock,
            whole_folders=self.whole_folders,
        )
        self.transport.sink = self._on_event
        for folder in config.folders:
            sync = await self.engine.add_folder(folder)
            if self.open_assemblies is not None:
                sync.store.assemblies = OpenAssemblies(self.open_assemblies)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, BlockReceived):
            self.counters.received[bytes(event.peer)] += len(event.data)
            self.counters.received_hashes.append(chunker.block_hash(event.data))
        elif isinstance(event, BlockRequested):
            self.counters.requested_of_me[bytes(event.peer)] += event.size
        assert self.engine is not None
        self.engine.handle_event(event)

    def connect(self, *others: SimNode) -> None:
        """Tell the engine where ``others`` are (as discovery or static peers would)."""
        assert self.engine is not None
        for other in others:
            self.engine.add_address(other.addr)

    async def scan(self) -> None:
        """Rescan the folder now (what the watcher would trigger after a change)."""
        async with self._scan_lock:
            await self.folder.scan()

    async def stop(self) -> None:
        """A clean stop: sessions closed, engine cancelled, index closed."""
        if self.index is None:
            return
        assert self.endpoint is not None
        assert self.transport is not None
        self.endpoint.close()
        self.transport.kick()
        await self._halt()

    async def crash(self) -> None:
        """As a crash would: nothing more on the wire, every task gone, memory thrown away;
        the folder and the index stay as they are on disk."""
        if self._task is None:
            return
        await self._halt()

    async def _halt(self) -> None:
        assert self.transport is not None
        self.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        engine = self.engine
        if engine is not None:
            for sync in engine.folders.values():
                if sync.exchange.have_flush is not None:
                    sync.exchange.have_flush.cancel()
                for download in sync.downloads.active.values():
                    if download.assembly is not None:
                        download.assembly.close()
        # Threads started by cancelled tasks finish their one call; let them before closing.
        await asyncio.sleep(0.05)
        assert self.index is not None
        await asyncio.to_thread(self.index.close)
        self.index = None
        self.engine = None
        self.endpoint = None
        self.transport = None

    # -- file helpers ------------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        return self.root / rel

    def write(self, rel: str, data: bytes, *, mtime_ns: int | None = None) -> None:
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if mtime_ns is not None:
            os.utime(target, ns=(mtime_ns, mtime_ns))

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()


class Cluster:
    """N nodes sharing one folder key on one ``SimNetwork``; an async context manager that
    stops every node on exit."""

    def __init__(
        self,
        base: Path,
        seed: int = 0,
        *,
        link: LinkSpec | None = None,
        transfer: TransferConfig | None = None,
    ) -> None:
        self.base = base
        self.seed = seed
        self.network = SimNetwork(seed, link)
        self.key = keys.format_key(random.Random(seed).randbytes(32))
        self.transfer = transfer or TransferConfig(
            keepalive_interval=1.0, idle_timeout=6.0, request_timeout=3.0, initial_rtt=0.01
        )
        self.nodes: list[SimNode] = []

    def add(self, **kwargs: Any) -> SimNode:
        node = SimNode(self, len(self.nodes) + 1, **kwargs)
        self.nodes.append(node)
        return node

    async def start(self, nodes: Iterable[SimNode] | None = None, *, mesh: bool = True) -> None:
        chosen = list(self.nodes if nodes is None else nodes)
        for node in chosen:
            await node.start()
        if mesh:
            for node in chosen:
                node.connect(*[o for o in chosen if o is not node])

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for node in self.nodes:
            await node.stop()


# -- comparing folders ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    mode: int
    digest: str = ""
    mtime_ns: int = 0
    target: str = ""


def snapshot(root: Path) -> dict[str, Entry]:
    """Every shared entry below ``root`` (not ``.lanshare/``, not temporary files)."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        if not rel_dir:
            dirnames[:] = [d for d in dirnames if d != INTERNAL_DIR]
        for name in sorted(dirnames + filenames):
            if is_temporary(name):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = Path(dirpath) / name
            try:
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = Entry("symlink", 0, target=os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = Entry("dir", stat.S_IMODE(st.st_mode))
                else:
                    digest = hashlib.sha256(full.read_bytes()).hexdigest()[:16]
                    out[rel] = Entry("file", stat.S_IMODE(st.st_mode), digest, st.st_mtime_ns)
            except FileNotFoundError:
                continue
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


def temp_files(root: Path) -> list[str]:
    """Temporary download files left anywhere in the folder."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != INTERNAL_DIR or dirpath != str(root)]
        found.extend(os.path.join(dirpath, n) for n in filenames if is_temporary(n))
    return found


def differences(nodes: Sequence[SimNode]) -> list[str]:
    """What differs between the folders of ``nodes`` (empty when identical)."""
    snaps = [snapshot(n.root) for n in nodes]
    first = snaps[0]
    out: list[str] = []
    for node, snap in zip(nodes[1:], snaps[1:], strict=True):
        for rel in sorted(set(first) | set(snap)):
            a, b = first.get(rel), snap.get(rel)
            if a != b:
                out.append(f"{rel}: {nodes[0].name}={a} {node.name}={b}")
    return out


def idle(node: SimNode) -> bool:
    """The node has nothing left to do that it knows of."""
    if not node.running:
        return False
    sync = node.folder
    return (
        not sync.downloads.active
        and not sync.downloads.waiting
        and not sync.dirty.is_set()
        and all(link.manifest_request is None for link in sync.exchange.links.values())
    )


async def converge(nodes: Sequence[SimNode], seconds: float, *, settle: float = 0.6) -> None:
    """Wait until every folder is identical and every node idle, for ``settle`` seconds in a
    row; fail after ``timeout`` listing the differences."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    stable_since: float | None = None
    diff: list[str] = []
    while loop.time() < deadline:
        diff = await asyncio.to_thread(differences, nodes)
        busy = [n.name for n in nodes if not idle(n)]
        if not diff and not busy:
            if stable_since is None:
                stable_since = loop.time()
            elif loop.time() - stable_since >= settle:
                return
        else:
            stable_since = None
            if busy and not diff:
                diff = [f"busy: {busy}"]
        await asyncio.sleep(0.1)
    states = [describe(n) for n in nodes if n.running]
    shown = "\n  ".join(diff[:40])
    raise AssertionError(
        f"seed {nodes[0].cluster.seed}: no convergence in {seconds} s:\n  {shown}\n"
        + "\n".join(states)
    )


def describe(node: SimNode) -> str:
    """The node's folder state, downloads and links, for failure messages."""
    sync = node.folder
    downloads = [
        f"{d.path}: {len(d.done)}/{len(d.record.blocks)} blocks, writing={d.writing}, "
        f"finishing={d.finishing}, sources={[s.hex()[:4] for s in d.sources]}"
        for d in sync.downloads.active.values()
    ]
    links = [
        f"{p.hex()[:4]}: seq={link.known_sequence} asking={link.manifest_request} "
        f"in_progress={list(link.in_progress)} have={len(link.have)}"
        for p, link in sync.exchange.links.items()
    ]
    return (
        f"{node.name} ({node.node_id.hex()[:4]}): {sync.state} {sync.reason!r} "
        f"why={sync._why_not_in_sync()!r} problems={sync.problems}\n    downloads={downloads}"
        f"\n    links={links} requests={len(sync.downloads.requests)}"
    )


async def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``predicate`` every 20 ms until it holds; fail naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


def all_contents(root: Path) -> set[str]:
    """sha256 of every regular file anywhere below ``root``, ``.lanshare/versions`` included
    (not the folder marker: lanshare's own state, rewritten as the folder changes)."""
    out = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            if is_temporary(name) or full.is_symlink() or full == root / MARKER:
                continue
            with contextlib.suppress(OSError):
                out.add(hashlib.sha256(full.read_bytes()).hexdigest())
    return out


async def scan_into(index: Index, folder: int, root: Path, short: int) -> None:
    """Scan ``root`` into ``index`` (to build a peer's records without an engine)."""
    await scanner.scan_path(index, folder, root, short)


def random_bytes(seed: int, size: int) -> bytes:
    """``size`` seeded pseudo-random bytes (no repeats, so every block is distinct)."""
    rng = random.Random(seed)
    step = 1 << 20
    return b"".join(rng.randbytes(min(step, size - i)) for i in range(0, size, step))
