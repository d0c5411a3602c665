"""The daemon's lifecycle: wire index, transport, engine, watchers, discovery and control socket.

I/O shell with no sync logic of its own. Everything runs in one asyncio TaskGroup; SIGTERM
and SIGINT (heard from the first moment of ``run()``, start-up included) stop it cleanly and
exit 0, in an order that leaves nothing half done: the engine first (no new work; the work
in hand reaches a safe point, so the disk and the index agree), then the rest of the group
(goodbyes on mDNS), the watchers, the sessions (CLOSE datagrams) and the index. SIGHUP
reloads the config. systemd is told ``READY=1`` only once the UDP and control sockets are
bound and the mDNS service is registered; ``STATUS=`` shows what it does; ``WATCHDOG=1``
pings at half ``WatchdogSec`` when asked.

Beyond the engine's fields, ``status`` answers with ``transfer`` (this process's transport
counters since start: ``bytes_received``, ``bytes_sent``, ``datagrams_received``,
``datagrams_sent``, ``packets_lost``, ``fragments_retransmitted``, …) and ``pid``, and
``node`` gains ``version``, ``uptime`` (seconds) and ``port`` (the UDP port bound).
``peers`` merges discovery's table with the live sessions: one entry per peer.
``scan`` rescans folders through the engine and answers with the ``scan --json`` objects.

One owner per state dir: every node (the daemon and a short-lived one) and an offline
``lanshare scan`` hold ``LOCK_NAME`` in the state dir (``own_state``) while they use its one
index, ``DATABASE_NAME``. A command that finds the lock held by a daemon it cannot reach
says so and stops, rather than start a node of its own beside it (a second UDP port, a
second identity).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import resource
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lanshare import __version__, keys
from lanshare import config as configuration
from lanshare.addressing import dial_order, families, host_version, resolved_addr, show_addr
from lanshare.control import ControlServer
from lanshare.discovery import Discovery
from lanshare.engine import Engine
from lanshare.errors import (
    ConfigError,
    ControlError,
    DaemonOwnsState,
    LanshareError,
    StorageError,
    TransferError,
    UsageError,
)
from lanshare.events import SessionClosed, SessionEstablished
from lanshare.identity import load_or_create_node_id
from lanshare.index import DATABASE_NAME, Index
from lanshare.peertable import PROTOCOL_VERSION, PeerDown, PeerUp, SharedFolder
from lanshare.protocol.endpoint import Endpoint
from lanshare.sdnotify import Notifier, watchdog_interval
from lanshare.transport import open_transport
from lanshare.watcher import FolderWatcher

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping

    from lanshare.config import Config, FolderConfig
    from lanshare.control import Handler, Progress
    from lanshare.engine import FolderSync
    from lanshare.events import Addr, Event
    from lanshare.peertable import PeerEvent
    from lanshare.transport import Transport

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_NAME = "daemon.lock"
STRAY_DATABASE_NAMES = ("index.db", "index.db-wal", "index.db-shm")
"""A second index that ``lanshare scan`` of older releases kept beside the daemon's."""
_SHOWN_PATHS = 20  # changed paths a debug line names
STOP_TIMEOUT = 5.0
"""Seconds a clean stop may take before the rest is abandoned."""
ENGINE_GRACE = 3.0
"""Of STOP_TIMEOUT, the seconds the engine's work in hand may take to reach a safe point."""
PULL_PROGRESS_INTERVAL = 0.25


class _Shutdown(Exception):
    """Raised inside the task group to stop every task."""


class AddressBook:
    """Which addresses the engine should keep trying: for each discovery entry, one of the
    addresses it announces (the first in ``dial_order``; the next when a handshake to it
    fails; the one a session came up on, while it is announced), and likewise one address of
    each static peer (a host name may resolve to several), which is never forgotten.

    One address per peer: dialling all of a peer's addresses would open a session on each,
    and each new one replaces the last (``CloseReason.REPLACED``), for ever.
    """

    def __init__(self) -> None:
        self.static: set[Addr] = set()
        """``[network] static_peers`` as resolved: never forgotten for mDNS news."""
        self._by_entry: dict[str, tuple[Addr, ...]] = {}
        self._chosen: dict[str, Addr] = {}
        self._static_keys: set[str] = set()

    def add_static(self, text: str, addresses: list[Addr]) -> Addr | None:
        """Static peer ``text`` resolved to ``addresses``: never forgotten, and dialled one at a
        time like a discovered peer (a host name may resolve to IPv4 and IPv6 addresses).
        Returns the one to try now (None: nothing to try)."""
        if not addresses:
            return None
        key = f"static {text}"
        self.static.update(addresses)
        self._static_keys.add(key)
        self.update(key, tuple(addresses))
        return self.dialled(key)

    def update(
        self, key: str, addresses: tuple[Addr, ...], *, gone: tuple[Addr, ...] = ()
    ) -> list[Addr]:
        """Discovery entry ``key`` now announces ``addresses`` (none: it is down, and
        ``gone`` are the addresses its last news named); ``dialled(key)`` is then the one to
        try.

        Returns the addresses to forget: announced before by this entry only (the peer
        moved, or left), and neither another entry's (a static candidate, say) nor static.
        """
        before = self._by_entry.pop(key, ())
        chosen = self._chosen.pop(key, None)
        if addresses:
            ordered = dial_order(addresses)
            self._by_entry[key] = ordered
            self._chosen[key] = chosen if chosen in ordered else ordered[0]
        kept = {a for listed in self._by_entry.values() for a in listed} | self.static
        return [a for a in dict.fromkeys((*before, *gone)) if a not in kept]

    def dialled(self, key: str) -> Addr | None:
        """The address of entry ``key`` the engine should try now."""
        return self._chosen.get(key)

    def dialling(self, addr: Addr) -> bool:
        """Some entry (discovered or static) has the engine try ``addr`` now."""
        return addr in self._chosen.values()

    def failed(self, addr: Addr) -> list[tuple[Addr, Addr]]:
        """A handshake to ``addr`` failed: each entry dialling it moves on to its next
        address. Returns (old, new) pairs for the engine (an entry with one address has none)."""
        moves = []
        for key, chosen in self._chosen.items():
            listed = self._by_entry[key]
            if chosen == addr and len(listed) > 1:
                new = listed[(listed.index(chosen) + 1) % len(listed)]
                self._chosen[key] = new
                moves.append((chosen, new))
        return moves

    def established(self, key: str, addr: Addr) -> tuple[Addr, Addr] | None:
        """A session with entry ``key`` came up on ``addr`` (dialled by either side): keep
        dialling that one if the entry announces it. Returns (old, new) when that changes."""
        chosen = self._chosen.get(key)
        if chosen is None or chosen == addr or addr not in self._by_entry[key]:
            return None
        self._chosen[key] = addr
        return chosen, addr

    def forget_discovered(self) -> list[Addr]:
        """Discovery starts afresh: every address only it had announced, to forget."""
        static = self._static_keys
        gone = {a for k, listed in self._by_entry.items() if k not in static for a in listed}
        self._by_entry = {k: v for k, v in self._by_entry.items() if k in static}
        self._chosen = {k: v for k, v in self._chosen.items() if k in static}
        return sorted(gone - self.static)


class Daemon:
    """One running node. ``await run()`` until a signal (or ``stop()``) ends it."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        short_lived: bool = False,
    ) -> None:
        """``short_lived``: a node for one ``ls``, ``search``, ``pull`` or ``peers`` with no daemon
        running; no control socket, signals, watcher or announcement, and it fetches only
        what a pull asks for."""
        self.config = config
        self._environ = dict(os.environ if environ is None else environ)
        self._short_lived = short_lived
        self._notifier = Notifier(None) if short_lived else Notifier.from_environ(self._environ)
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.ready = asyncio.Event()
        self.transport: Transport[Any] | None = None
        self.engine: Engine | None = None
        self.discovery: Discovery | None = None
        self._watchers: dict[Path, FolderWatcher] = {}
        self._watch_tasks: dict[Path, asyncio.Task[None]] = {}
        self._rewatching: dict[Path, asyncio.Lock] = {}
        self._group: asyncio.TaskGroup | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        self._addresses = AddressBook()
        self._node_id = b""
        self._started = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    async def settled(self, patience: float) -> None:
        """Wait (at most ``patience`` s) until every folder was scanned and, once a peer is
        connected, every connected peer's manifest was read."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        engine = self._engine()
        while loop.time() < deadline:
            folders = list(engine.folders.values())
            scanned = all(f.scanned.is_set() or f.state == "error" for f in folders)
            linked = all(f.exchange.links for f in folders)
            read = all(
                link.manifest_request is None and link.known_sequence >= 0
                for f in folders
                for link in f.exchange.links.values()
            )
            if scanned and linked and read:
                await asyncio.sleep(0.2)  # the plan that follows the last batch
                return
            await asyncio.sleep(0.1)

    async def run(self) -> None:
        """Run the node until stopped.

        Raises:
            LanshareError: it could not start (another daemon, a port in use, …).
        """
        config = self.config
        raise_descriptor_limit()
        loop = asyncio.get_running_loop()
        signals = () if self._short_lived else (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        # From the very start: a signal during start-up is a stop like any other, never a
        # KeyboardInterrupt or a kill in the middle of opening the index.
        for sig in signals:
            loop.add_signal_handler(sig, self._reload.set if sig == signal.SIGHUP else self.stop)
        try:
            with own_state(config, daemon=not self._short_lived) as database:
                node_id = await asyncio.to_thread(load_or_create_node_id, config.node.state_dir)
                index = await asyncio.to_thread(Index.open, database)
                try:
                    await self._run(index, node_id)
                finally:
                    await asyncio.to_thread(index.close)
            logger.info("stopped")
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _run(self, index: Index, node_id: bytes) -> None:
        config = self.config
        endpoint = Endpoint(
            config.transfer, config.network, node_id=node_id, folders={}, rng=random.SystemRandom()
        )
        engine = Engine(
            config,
            index,
            node_id,  # type: ignore[arg-type]
            endpoint,
            kick=self._kick,
            whole_folders=not self._short_lived,
        )
        self.engine = engine
        self._node_id = node_id
        self._notifier.notify("STATUS=binding")
        self.transport = await open_transport(
            endpoint, self._on_event, config.network, config.transfer
        )
        control: ControlServer | None = None
        try:
            for folder in config.folders:
                await self._add_folder(folder)
            if not self._short_lived:
                group = _control_group(config)
                control = ControlServer(
                    config.node.control_socket,
                    self._handlers(),
                    mode=0o600 if group is None else 0o660,
                    group=group,
                )
                await control.start()
            self.discovery = self._new_discovery()
            await self._serve(engine)
        finally:
            if control is not None:
                await control.close()
            for watcher in self._watchers.values():
                await watcher.stop()
            endpoint.close()
            self._kick()
            await asyncio.sleep(0.05)  # let the CLOSE datagrams leave
            await self.transport.close()

    async def _serve(self, engine: Engine) -> None:
        assert self.discovery is not None
        assert self.transport is not None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(engine.run())
                self._discovery_task = group.create_task(self._run_discovery(self.discovery))
                for path in self._watchers:
                    self._start_watch_task(path)
                group.create_task(self._announce_ready())
                group.create_task(self._watchdog())
                group.create_task(self._reloader())
                await self._stop.wait()
                self._notifier.notify("STOPPING=1", "STATUS=stopping")
                logger.info("stopping")
                # The engine first, while sessions, discovery and watchers still run: its
                # work in hand ends at a safe point instead of being cut mid-step.
                await engine.stop(ENGINE_GRACE)
                raise _Shutdown
        except* _Shutdown:
            pass

    async def _announce_ready(self) -> None:
        assert self.discovery is not None
        assert self.transport is not None
        usable = families(self.config.network.ip_version, self.transport.local_address[0])
        for peer in self.config.network.static_peers:
            host, port = configuration.parse_host_port(peer)
            found = await _resolve(host, port)
            addrs = [a for a in found if host_version(a[0]) in usable]
            if found and not addrs:
                logger.warning("static peer %s: no address of the IP version in use", peer)
            first = self._addresses.add_static(peer, addrs)
            if first is not None:
                self._engine().add_address(first)
        await self.discovery.ready.wait()
        self.ready.set()
        self._notifier.notify("READY=1", f"STATUS=ready, UDP port {self.transport.port}")
        logger.info(
            "ready: node %s, UDP port %d, %d folder(s)",
            self._engine().node_id.hex(),
            self.transport.port,
            len(self._engine().folders),
        )
        while True:
            await asyncio.sleep(2.0)
            states = [f.state for f in self._engine().folders.values()]
            summary = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))) or "idle"
            self._notifier.notify(f"STATUS={summary}")

    async def _watchdog(self) -> None:
        interval = watchdog_interval(self._environ)
        if interval is None:
            return
        while True:
            self._notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _new_discovery(self) -> Discovery:
        assert self.transport is not None
        config = self.config
        discovery = Discovery(
            node_id=self._node_id,  # type: ignore[arg-type]
            name=config.node.name,
            network=config.network,
            folders=[SharedFolder(str(f.path), keys.parse_key(f.key)) for f in config.folders],
            port=self.transport.port,
            announce=not self._short_lived,
            families=families(config.network.ip_version, self.transport.local_address[0]),
        )
        self._engine().on_sequence = discovery.set_sequence
        self._engine().sequence_changed()
        return discovery

    async def _run_discovery(self, discovery: Discovery) -> None:
        """Announce, browse and feed the engine until cancelled (then say goodbye)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(discovery.run())
            group.create_task(self._discovery_events(discovery))

    async def _restart_discovery(self) -> None:
        """Announce and browse for a new set of folders (discovery's folders are fixed)."""
        assert self._group is not None
        old = self._discovery_task
        if old is not None:
            old.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await old
        # The new discovery reports its peers afresh: what the old one said is forgotten,
        # or an address no peer announces any more would be tried for ever.
        engine = self._engine()
        for addr in self._addresses.forget_discovered():
            engine.remove_address(addr)
        self.discovery = self._new_discovery()
        self._discovery_task = self._group.create_task(self._run_discovery(self.discovery))

    def _on_event(self, event: Event) -> None:
        """Every protocol event: the engine's; a live session also outranks mDNS silence."""
        engine = self._engine()
        engine.handle_event(event)
        if isinstance(event, SessionEstablished):
            if self.discovery is not None:
                self.discovery.mark_reachable(event.peer)  # type: ignore[arg-type]
            move = self._addresses.established(bytes(event.peer).hex(), event.addr)
            self._redial([move] if move is not None else [])
        elif isinstance(event, SessionClosed) and event.peer is None:
            self._redial(self._addresses.failed(event.addr))

    def _redial(self, moves: list[tuple[Addr, Addr]]) -> None:
        """Move the engine's attempts from each old address of a peer to its new one."""
        engine = self._engine()
        for old, new in moves:
            folders = engine.addresses.get(old)
            if folders is None:  # no longer tried (the peer left meanwhile)
                continue
            if not self._addresses.dialling(old):
                engine.remove_address(old)
            engine.add_address(new, folders)

    async def _discovery_events(self, discovery: Discovery) -> None:
        while True:
            event: PeerEvent = await discovery.events.get()
            _log_peer_event(event)
            engine = self._engine()
            ids = {str(s.root): fid for fid, s in engine.folders.items()}
            peer = event.peer  # PeerUp, PeerChanged and PeerDown all carry it
            if peer.node_id is not None:
                engine.peer_names[bytes(peer.node_id)] = peer.name
            folders = [ids[label] for label in peer.folders if label in ids]
            down = isinstance(event, PeerDown)
            current = () if down else peer.addresses
            gone = peer.addresses if down else ()
            for addr in self._addresses.update(peer.key, current, gone=gone):
                engine.remove_address(addr)
            dialled = self._addresses.dialled(peer.key)
            if dialled is not None:
                engine.add_address(dialled, folders or None)

    async def _reloader(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def reload(self) -> None:
        """Re-read the config file: add and remove folders; a bad file keeps the old config."""
        source = self.config.source
        try:
            fresh = await asyncio.to_thread(configuration.load, source)
        except ConfigError as exc:
            logger.error("config not reloaded, keeping the old one: %s", exc)
            return
        old = {(f.path, f.key): f for f in self.config.folders}
        new = {(f.path, f.key): f for f in fresh.folders}
        engine = self._engine()
        for key in old.keys() - new.keys():
            folder = old[key]
            await engine.remove_folder(keys.folder_id(keys.parse_key(folder.key)))
            watcher = self._watchers.pop(folder.path, None)
            task = self._watch_tasks.pop(folder.path, None)
            if task is not None:
                task.cancel()
            if watcher is not None:
                await watcher.stop()
            logger.info("folder %s removed", folder.path)
        self.config = fresh
        for key in new.keys() - old.keys():
            await self._add_folder(new[key])
            if self._group is not None and new[key].path in self._watchers:
                self._start_watch_task(new[key].path)
            logger.info("folder %s added", new[key].path)
        if old.keys() != new.keys() and self._group is not None:
            # Discovery announces a token per folder: announce the new set (goodbye, then
            # hello), and meet static peers again for the new folders.
            await self._restart_discovery()
        for sync in engine.folders.values():
            if sync.state == "error" or sync.failures:  # what failed may work now
                engine.spawn(sync.scan())
        logger.info("config reloaded from %s", source)

    async def _add_folder(self, folder: FolderConfig) -> None:
        engine = self._engine()
        sync = await engine.add_folder(folder)
        if self._short_lived:
            return
        engine.on_folder_back = self._folder_back
        await self._watch(sync)

    def _folder_back(self, sync: FolderSync) -> None:
        """A folder missing until now (an unmounted disk) is back: watch it from now on,
        afresh (a watch set on the empty mount point sees nothing of the disk over it)."""
        if self._group is not None:
            self._group.create_task(self._watch_again(sync))

    async def _watch_again(self, sync: FolderSync) -> None:
        # One replacement at a time per folder, or two would each start a watcher and one
        # would run on untracked.
        async with self._rewatching.setdefault(sync.root, asyncio.Lock()):
            old = self._watchers.pop(sync.root, None)
            task = self._watch_tasks.pop(sync.root, None)
            if old is not None:
                await old.stop()
            if task is not None:
                # Its iteration ends once the old watcher stopped; a scan it runs finishes
                # whole (cut short after its commit, it would skip announcing the change).
                await task
            await self._watch(sync)
            if sync.root in self._watchers:
                self._start_watch_task(sync.root)

    async def _watch(self, sync: FolderSync) -> None:
        timing = self.config.sync
        watcher = FolderWatcher(
            sync.root,
            ignore=sync.rules.matches,
            debounce_interval=timing.debounce_interval,
            max_delay=timing.max_debounce_delay,
            rescan_interval=timing.rescan_interval,
            # Before the engine runs, its first scan of the folder starts after the watches
            # are set up and covers all until then: a second full scan would find nothing.
            initial_rescan=self._group is not None,
        )
        try:
            await watcher.start()
        except LanshareError as exc:
            logger.warning("not watching %s: %s", sync.root, exc)
            return
        self._watchers[sync.root] = watcher
        self._engine().watchers[sync.info.id] = watcher

    def _start_watch_task(self, path: Path) -> None:
        assert self._group is not None
        watcher = self._watchers[path]
        self._watch_tasks[path] = self._group.create_task(self._follow(path, watcher))

    async def _follow(self, path: Path, watcher: FolderWatcher) -> None:
        engine = self._engine()
        async for batch in watcher:
            sync = next((s for s in engine.folders.values() if s.root == path), None)
            if sync is None:
                continue
            if not batch.full_rescan:
                shown = sorted(batch.paths)[:_SHOWN_PATHS]
                more = len(batch.paths) - len(shown)
                logger.debug(
                    "%s: changed: %s%s", path, ", ".join(shown), f" and {more} more" if more else ""
                )
            await sync.scan(None if batch.full_rescan else batch.paths)

    def _kick(self) -> None:
        if self.transport is not None:
            self.transport.kick()

    def _engine(self) -> Engine:
        assert self.engine is not None
        return self.engine

    # -- control API ----------------------------------------------------------------------

    def handler(self, method: str) -> Handler:
        """The control method ``method`` (the short-lived node calls them directly)."""
        return self._handlers()[method]

    def _handlers(self) -> dict[str, Handler]:
        return {
            "status": self._status,
            "peers": self._peers,
            "ls": self._ls,
            "pull": self._pull,
            "search": self._search,
            "rescan": self._rescan,
            "resume": self._resume,
            "scan": self._scan,
        }

    async def _status(self, params: dict[str, Any], progress: Progress) -> Any:
        status = self._engine().status()
        status["pid"] = os.getpid()
        # `lanshare doctor` compares the version with its own and says how long it has run.
        status["node"]["version"] = __version__
        status["node"]["uptime"] = round(time.monotonic() - self._started, 1)
        if self.transport is not None:
            status["node"]["port"] = self.transport.port
        status["transfer"] = self._engine().endpoint.stats.as_dict()
        if self.discovery is not None:  # what mDNS brought that was refused, and why
            status["discovery"] = self.discovery.table_stats.as_dict()
        return status

    async def _peers(self, params: dict[str, Any], progress: Progress) -> Any:
        return peers_json(self)

    async def _ls(self, params: dict[str, Any], progress: Progress) -> Any:
        from lanshare.listing import listing

        path = params.get("path")
        return await listing(self._engine(), Path(path) if isinstance(path, str) else None)

    async def _search(self, params: dict[str, Any], progress: Progress) -> Any:
        from lanshare.listing import search_lan
        from lanshare.search import Query

        terms, within = params.get("terms"), params.get("folder")
        type_name, limit = params.get("type"), params.get("limit", 100)
        sizes = (params.get("min_size"), params.get("max_size"))
        if (
            not isinstance(terms, list)
            or not all(isinstance(t, str) for t in terms)
            or not isinstance(within, str | None)
            or not isinstance(type_name, str | None)
            or not isinstance(limit, int)
            or not all(isinstance(n, int | None) for n in sizes)
        ):
            raise UsageError("search needs a list of terms, and filters of the right types")
        query = Query.parse(
            terms, type_name=type_name, min_size=sizes[0], max_size=sizes[1], limit=limit
        )
        return await search_lan(self._engine(), query, Path(within) if within else None)

    async def _pull(self, params: dict[str, Any], progress: Progress) -> Any:
        from lanshare.listing import pull

        raw = params.get("paths")
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise UsageError("pull needs a list of paths")
        timeout = params.get("timeout")
        seconds = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else None
        try:
            async with asyncio.timeout(seconds):
                return await pull(self._engine(), [Path(p) for p in raw], progress)
        except TimeoutError:
            raise TransferError(f"gave up after {seconds:.0f} s") from None

    async def _rescan(self, params: dict[str, Any], progress: Progress) -> Any:
        for sync in self._engine().folders.values():
            await sync.scan()
        return self._engine().status()

    async def _scan(self, params: dict[str, Any], progress: Progress) -> Any:
        """``lanshare scan`` with a daemon running: the daemon's own scans, in its index."""
        path = params.get("path")
        engine = self._engine()
        targets = (
            [engine.folder_for(Path(path))[0]] if isinstance(path, str) else engine.folders.values()
        )
        summaries = []
        for sync in list(targets):
            summary = await sync.scan()
            if summary is None:
                raise StorageError(sync.reason)
            summaries.append(summary.as_json())
        return summaries

    async def _resume(self, params: dict[str, Any], progress: Progress) -> Any:
        path = params.get("path")
        engine = self._engine()
        targets = (
            [engine.folder_for(Path(path))[0]] if isinstance(path, str) else engine.folders.values()
        )
        # Confirming deletes files: only in a folder the user named, never in every folder
        # at once (a `resume` meant for a full disk must not wipe an unmounted one).
        confirm = isinstance(path, str)
        unconfirmed = []
        for sync in targets:
            if await sync.resume(confirm=confirm):
                unconfirmed.append({"path": str(sync.root), "reason": sync.reason})
        return {"resumed": [str(s.root) for s in targets], "unconfirmed": unconfirmed}


def peers_json(daemon: Daemon) -> list[dict[str, Any]]:
    """The ``peers --json`` list: discovery's table merged with the live sessions.

    One entry per peer: a configured ``host:port`` candidate (id null) whose address turned
    out to be a connected peer is folded into that peer's entry. A peer with a session is
    ``connected`` and was seen now; the others keep discovery's state and times.
    """
    engine = daemon._engine()
    now = round(time.time(), 3)
    sessions: dict[str, dict[str, Any]] = {}
    for peer, folder, addr in engine.endpoint.peers():
        live = sessions.setdefault(bytes(peer).hex(), {"addresses": [], "folders": []})
        _add_unique(live["addresses"], show_addr(addr))
        sync = engine.folders.get(bytes(folder))
        if sync is not None:
            _add_unique(live["folders"], str(sync.root))
    owner_of = {a: peer for peer, live in sessions.items() for a in live["addresses"]}
    entries: dict[str, dict[str, Any]] = {}
    for info in daemon.discovery.peers() if daemon.discovery else []:
        entry: dict[str, Any] = info.to_json()
        addresses = [show_addr(a) for a in info.addresses]
        if entry["id"] is None:
            owner = next((owner_of[a] for a in addresses if a in owner_of), None)
            if owner is not None:
                # The static candidate is this connected peer: keep one entry.
                entries.setdefault(owner, {"id": owner, "addresses": []})
                for a in addresses:
                    _add_unique(entries[owner]["addresses"], a)
                continue
            key = addresses[0] if addresses else str(len(entries))
        else:
            key = str(entry["id"])
        merged = entries.setdefault(key, {"id": entry["id"], "addresses": []})
        for a in addresses:
            _add_unique(merged["addresses"], a)
        merged.update({k: v for k, v in entry.items() if k != "addresses"})
    for hex_id, live in sessions.items():
        entry = entries.setdefault(hex_id, {"id": hex_id, "addresses": []})
        # The session's address first: it is the one in use.
        entry["addresses"] = live["addresses"] + [
            a for a in entry["addresses"] if a not in live["addresses"]
        ]
        folders: list[str] = list(entry.get("folders") or [])
        for folder in live["folders"]:
            _add_unique(folders, folder)
        entry["folders"] = folders
        if not entry.get("name"):
            entry["name"] = engine.peer_names.get(bytes.fromhex(hex_id), "")
        entry.setdefault("sequence", None)
        entry.setdefault("protocol", PROTOCOL_VERSION)  # a session speaks ours, by definition
        entry.setdefault("first_seen", now)
        entry["last_seen"] = now
        entry["state"] = "connected"
    return sorted(entries.values(), key=lambda e: (str(e.get("name") or ""), str(e["id"])))


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open files to the hard one (systemd and shells start at 1024
    while the hard limit is far higher) and return the soft limit in force. Downloads size
    their bound on open files from it (``store.default_open_assemblies``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # RLIM_INFINITY beyond the kernel's nr_open
            logger.debug("cannot raise the open files limit to %s: %s", hard, exc)
    logger.debug("open files limit: %s (hard %s)", soft, hard)
    return soft


def _add_unique(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _log_peer_event(event: PeerEvent) -> None:
    peer = event.peer
    who = peer.node_id.hex() if peer.node_id is not None else "candidate"
    where = ", ".join(show_addr(a) for a in peer.addresses)
    if isinstance(event, PeerDown):
        logger.info("peer %s (%s) at %s down: %s", peer.name, who, where, event.reason.value)
    elif isinstance(event, PeerUp):
        logger.info("peer %s (%s) at %s up (%s)", peer.name, who, where, peer.state.value)


async def _resolve(host: str, port: int) -> list[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        logger.warning("static peer %s: cannot resolve: %s", show_addr((host, port)), exc)
        return []
    return sorted({resolved_addr(info[4]) for info in infos})


@contextlib.contextmanager
def own_state(config: Config, *, daemon: bool) -> Iterator[Path]:
    """Be the one user of ``config``'s state dir while the block runs; yields the index path.

    Holds ``LOCK_NAME`` (created with the dir if missing) and removes the stray databases of
    older releases. ``daemon``: the daemon itself; otherwise a short-lived node or an
    offline ``lanshare scan``, refused with ``DaemonOwnsState`` while a daemon holds the lock.

    Raises:
        ControlError: another daemon holds the lock (``daemon``).
        DaemonOwnsState: a daemon holds the lock (not ``daemon``).
        UsageError: the state dir belongs to another user (files made here would lock that
            user's daemon out of its own index).
        StorageError: the dir or its lock cannot be made.
    """
    state_dir = config.node.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = state_dir.stat().st_uid
    except OSError as exc:
        raise StorageError(f"cannot use the state directory {state_dir}: {exc.strerror}") from exc
    lock = state_dir / LOCK_NAME
    mine = owner == os.geteuid()
    try:
        # Another user's lock is only looked at: creating it would leave a file its owner
        # cannot open.
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if mine else 0), 0o600)
    except FileNotFoundError:
        fd = -1
    except OSError as exc:
        raise StorageError(f"cannot open the lock {lock}: {exc.strerror}") from exc
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _lock_held(config, daemon=daemon) from None
            except OSError as exc:
                raise StorageError(f"cannot lock {lock}: {exc.strerror}") from exc
        if not mine:
            user = _user_name(owner)
            raise UsageError(
                f"the state directory {state_dir} belongs to user {user}: run lanshare as "
                f"that user (sudo -u {user} lanshare …), or start its daemon"
            )
        _remove_stray_databases(state_dir)
        yield state_dir / DATABASE_NAME
    finally:
        if fd >= 0:
            os.close(fd)


def _lock_held(config: Config, *, daemon: bool) -> LanshareError:
    state_dir = config.node.state_dir
    if daemon:
        return ControlError(
            f"another lanshare daemon is already running with the state in {state_dir}; "
            "stop it first (or give this one another config)"
        )
    return DaemonOwnsState(
        f"a lanshare daemon runs with the state in {state_dir} but does not answer on "
        f"{config.node.control_socket}; name its control socket with --socket PATH"
    )


def _remove_stray_databases(state_dir: Path) -> None:
    for name in STRAY_DATABASE_NAMES:
        stray = state_dir / name
        try:
            stray.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot remove %s, left by an older release: %s", stray, exc.strerror)
            continue
        logger.warning(
            "removed %s: a second index an older release left; %s is the only one",
            stray,
            state_dir / DATABASE_NAME,
        )


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _control_group(config: Config) -> int | None:
    """The gid of ``[node] control_group``, or None when only the daemon's user may connect."""
    import grp

    name = config.node.control_group
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"{config.source or 'config'}:node.control_group: there is no group {name!r} on "
            "this machine"
        ) from None


async def run_short_lived(
    config: Config, work: Callable[[Daemon], Awaitable[T]], *, settle: float = 5.0
) -> T:
    """Start a node without control socket, watcher or announcement, let it find peers and
    read their manifests (at most ``settle`` seconds), run ``work`` on it, then stop it.

    This is how ``ls``, ``search``, ``pull`` and ``peers`` work on a machine with no daemon running.
    """
    node = Daemon(config, short_lived=True)
    runner = asyncio.create_task(node.run())
    try:
        ready = asyncio.create_task(node.ready.wait())
        done, _ = await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            ready.cancel()
            runner.result()  # raises the start-up error
            raise ControlError("the short-lived node stopped before it was ready")
        await node.settled(settle)
        return await work(node)
    finally:
        node.stop()
        # Past STOP_TIMEOUT the rest is abandoned (the index is crash-safe): the command's
        # own outcome (its result, its error, or the user's Ctrl-C) is what the user sees.
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(runner, STOP_TIMEOUT)
