"""Discovery over mDNS/DNS-SD: announce this node, browse for peers, feed the peer table.

Async I/O: owns one ``AsyncZeroconf`` (created inside the running loop, so zeroconf runs no
thread of its own) and turns its callbacks into ``PeerUp``/``PeerChanged``/``PeerDown`` events
on a bounded queue. ``python -m lanshare.discovery`` runs it alone, printing events as JSON lines.

How the pieces fit
------------------
* Announce: one ``_lanshare._udp.local.`` service; instance name from ``[node].name`` (renamed
  ``name-2``… by zeroconf on a conflict), host ``ls-<node id>.local.`` (unique per node: zeroconf
  never probes host names), the UDP port in SRV, the TXT record of ``peertable``. Its folder
  tokens are bound to the instance name, the port and the addresses it covers (``a=``), so a
  copy announced elsewhere is worthless: a rename re-announces the record at once with tokens
  for the new name, and only the addresses ``a=`` covers (as many as fit) are announced.
  Sequence changes are coalesced: at most one TXT update per ``TXT_UPDATE_INTERVAL`` (each costs
  three multicast announcements), the latest value wins and the last one is always sent.
  Goodbyes on shutdown.
* Browse: zeroconf's browser callbacks only ``put_nowait`` onto a bounded inbox (a full inbox
  drops and counts, and the next tick re-reads the browser's cache to catch up); a consumer task
  resolves names (``AsyncServiceInfo.async_request``) and updates the pure ``PeerTable``.
* Liveness without the transport: a record listener notes every record heard from a known peer;
  quiet peers are probed with one mDNS SRV query; a peer silent for ``silence_timeout`` (15 s by
  default) is declared down. Bound for a killed peer: ``silence_timeout`` after the last record
  it sent, plus one tick (1 s). A goodbye is down at once. The transport's keep-alives outrank
  all of this through ``mark_reachable``/``mark_unreachable``.
* Static peers (``[network].static_peers``) become ``PeerUp`` events in state ``static`` at start:
  candidates for the transport to probe (discovery cannot tell whether they are alive).
* Interfaces: ``[network].interfaces`` (names, or IPv4 or IPv6 addresses; empty = every
  non-loopback address) of the IP versions ``[network].ip_version`` names (and the transport's
  socket can reach: ``addressing.families``) is re-read from an ``ifaddr`` snapshot whenever
  the kernel reports an address change, IPv4 or IPv6 (a netlink socket, on Linux;
  ``INTERFACE_SETTLE`` later, so that a burst of changes is read once) and at least every
  ``INTERFACE_POLL_INTERVAL``. An IPv6 address still tentative (duplicate address detection
  runs, ``/proc/net/if_inet6``) is left out until the kernel reports it usable: nothing can bind
  it before. zeroconf gets one socket per interface and IP version
  (``async_update_interfaces``; IPv6 on the group ff02::fb); every address, link-local and
  global (up to what the TXT record can cover, in ``dial_order``), is announced in our A and
  AAAA records and in ``a=``, with tokens over the new set, at once on a change (not held back
  by the TXT coalescing), and an address that went away is retracted with a goodbye.
* A peer's addresses: a new one makes the browser report the service as updated; one the peer
  retracted (goodbye) or stopped announcing (flushed from the cache a second after the peer's
  next announcement, RFC 6762 §10.2) is reported by no browser callback. So any address record
  heard for a known peer's host has that peer re-resolved (from the cache) ``ADDRESS_SETTLE``
  seconds later. Of the resolved addresses (of our IP versions), the table keeps those the
  peer's ``a=`` covers: anything else (a replayer's own address, a stale record) is never
  handed to the transport. A link-local address is compared without its scope (``a=`` has
  none: a scope is local to each host) and dialled with the scope of the interface its record
  was heard on (zeroconf's ``parsed_scoped_addresses``: ``fe80::1%2``).
* A node announcing another protocol version is listed as ``incompatible`` (see ``peertable``)
  and logged once; it never causes an event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ifaddr
from zeroconf import (  # type: ignore[attr-defined]  # DNS*: not in __all__
    DNSAddress,
    DNSOutgoing,
    DNSQuestion,
    IPVersion,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from lanshare.addressing import IP_VERSIONS, host_version, show_addr
from lanshare.addressing import families as ip_families
from lanshare.config import Config, NetworkConfig, load
from lanshare.errors import LanshareError
from lanshare.identity import NodeId, load_or_create_node_id
from lanshare.keys import ANNOUNCE_TOKEN_SIZE, announce_token, generate_announce_nonce, parse_key
from lanshare.peertable import (
    ACTIVE_STATES,
    MAX_SEQUENCE,
    PROTOCOL_VERSION,
    Announcement,
    IPAddress,
    LivenessPolicy,
    PeerChanged,
    PeerDown,
    PeerEvent,
    PeerInfo,
    PeerState,
    PeerTable,
    PeerUp,
    SharedFolder,
    TableStats,
    binding,
    encode_txt,
    fit_addresses,
    parse_host_port,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable, Sequence

    from zeroconf import RecordUpdate

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_lanshare._udp.local."
TXT_UPDATE_INTERVAL = 5.0
"""Least time between two TXT updates (each is three multicast announcements)."""
INTERFACE_POLL_INTERVAL = 15.0
"""Longest time between two comparisons of the interface list with the last snapshot (the
netlink monitor, where there is one, wakes the comparison up sooner)."""
INTERFACE_SETTLE = 0.5
"""Seconds between the kernel reporting an address change and the snapshot that reads it."""
ADDRESS_SETTLE = 1.5
"""Seconds between hearing an address record of a peer and re-resolving it: records that the
peer stopped announcing are flushed from the cache one second after its announcement."""
MAX_NETLINK_READS = 64
"""Netlink messages read per wake-up (the rest wait for the next one)."""
TICK_INTERVAL = 1.0
"""Granularity of liveness checks and probes."""
RESOLVE_TIMEOUT = 3.0
"""Seconds one resolve may take before the name counts as unresolved."""
INBOX_SIZE = 256
"""Browser notifications waiting to be handled; more are dropped, counted and re-read."""
EVENT_QUEUE_SIZE = 256
"""Events waiting for the owner; when full, discovery waits (zeroconf callbacks never do)."""
MAX_RESOLVING = 32
"""Resolves in flight (at most ``RESOLVE_CONCURRENCY`` of them querying at once)."""
RESOLVE_CONCURRENCY = 4
NAME_MEMORY = 1024
"""Service names remembered beyond the table's peers before the memory is pruned."""
MAX_PROBE_QUESTIONS = 16
"""Questions per probe packet."""
CLOSE_TIMEOUT = 5.0
"""Seconds allowed for the goodbyes, and again for closing zeroconf's sockets."""
MAX_INSTANCE_SIZE = 56
"""Bytes of the node name used as instance name (a DNS label is 63; room for ``-NN``)."""

_TYPE_PTR = 12
_TYPE_A = 1
_TYPE_SRV = 33
_TYPE_AAAA = 28
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_CLASS_IN = 1
_FLAGS_QUERY = 0x0000
_FLAGS_RESPONSE = 0x8400
"""QR (a response) and AA (authoritative), as mDNS responses are (RFC 6762 §18.2, §18.4)."""


@dataclass(slots=True)
class DiscoveryStats:
    """Counters of the adapter (the table keeps its own, see ``TableStats``)."""

    dropped: int = 0
    """Browser notifications dropped because the inbox or the resolver was full."""
    unresolved: int = 0
    """Resolves that timed out or failed."""
    probes: int = 0
    """Probe queries sent."""
    txt_updates: int = 0
    """TXT updates published."""
    interface_changes: int = 0


class Discovery:
    """One node's discovery: ``await run()`` in the daemon's TaskGroup, read ``events``.

    Args:
        node_id: our node id (our own announcement is ignored by it).
        name: ``[node].name``, the instance-name label.
        network: the ``[network]`` section (interfaces, static peers).
        folders: our folders (label and raw key).
        port: the UDP port the transport listens on (announced in SRV).
        sequence: the manifest sequence to announce first.
        announce: False to browse only (``lanshare peers`` without a daemon).
        policy: liveness timings; see ``LivenessPolicy``.
        families: the IP versions to use (``addressing.families``: what ``ip_version`` asks
            for and the transport's socket can reach); None: all that ``ip_version`` names.
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        name: str,
        network: NetworkConfig,
        folders: Sequence[SharedFolder],
        port: int,
        sequence: int = 0,
        announce: bool = True,
        policy: LivenessPolicy | None = None,
        families: frozenset[int] | None = None,
    ) -> None:
        self.node_id = node_id
        self.events: asyncio.Queue[PeerEvent] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self.stats = DiscoveryStats()
        self.instance: str | None = None
        """Our registered instance name once ``ready`` is set (may differ after a rename)."""
        self.ready = asyncio.Event()
        """Set when browsing runs and (if announcing) the service is registered."""
        self._name = instance_name(name)
        self._network = network
        self._families = families if families is not None else ip_families(network.ip_version)
        self._static = tuple(parse_host_port(text) for text in network.static_peers)
        self._port = port
        self._announce = announce
        self._sequence = sequence
        self._nonce = generate_announce_nonce()
        self._folders = tuple(folders)
        self._table = PeerTable(node_id, self._folders, policy or LivenessPolicy())
        self._inbox: asyncio.Queue[tuple[bool, str]] = asyncio.Queue(INBOX_SIZE)
        self._resync = False
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(RESOLVE_CONCURRENCY)
        self._again: set[str] = set()
        self._epoch: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self._watched: dict[str, str] = {}
        self._heard: set[str] = set()
        self._addresses_heard: dict[str, float] = {}
        self._incompatible: set[tuple[NodeId, int | None]] = set()
        self._publish_wanted = asyncio.Event()
        self._interfaces: tuple[str, ...] = ()
        """Our addresses on the chosen interfaces."""
        self._covered: tuple[IPAddress, ...] = ()
        """The addresses we announce: those of ``_interfaces`` our tokens cover."""
        self._sockets: tuple[str, ...] = ()
        """The addresses of zeroconf's sockets: one per interface."""
        self._aiozc: AsyncZeroconf | None = None
        self._registered: AsyncServiceInfo | None = None
        # Fail now, not in the middle of run(), if the TXT record cannot be built.
        encode_txt(self._announcement(f"{self._name}.{SERVICE_TYPE}"))

    @classmethod
    def from_config(
        cls, config: Config, *, port: int | None = None, announce: bool = True, sequence: int = 0
    ) -> Discovery:
        """Build from the whole config (reads or creates the node id in ``state_dir``)."""
        folders = [SharedFolder(str(f.path), parse_key(f.key)) for f in config.folders]
        return cls(
            node_id=load_or_create_node_id(config.node.state_dir),
            name=config.node.name,
            network=config.network,
            folders=folders,
            port=config.network.port if port is None else port,
            sequence=sequence,
            announce=announce,
        )

    # -- the owner's API --

    def set_sequence(self, sequence: int) -> None:
        """Announce a new manifest sequence (coalesced; the latest value wins)."""
        if sequence != self._sequence:
            self._sequence = sequence
            self._publish_wanted.set()

    def peers(self) -> list[PeerInfo]:
        """Every peer in the table (all states), as snapshots."""
        return self._table.peers()

    def mark_unreachable(self, node_id: NodeId) -> None:
        """The transport gave up on ``node_id``: emits ``PeerDown`` if it was up."""
        self._emit_now(self._table.mark_unreachable(node_id))

    def mark_reachable(self, node_id: NodeId) -> None:
        """The transport has a live session with ``node_id``: mDNS silence is ignored."""
        self._emit_now(self._table.mark_reachable(node_id, _loop_time()))

    def add_candidate(self, host: str, port: int) -> None:
        """A peer learned by peer exchange: emitted as ``PeerUp`` in state ``exchanged``."""
        self._emit_now(self._table.add_candidate((host, port), _loop_time(), exchanged=True))

    @property
    def table_stats(self) -> TableStats:
        return self._table.stats

    async def run(self) -> None:
        """Announce and browse until cancelled; then send goodbyes and close."""
        loop = asyncio.get_running_loop()
        self._table.unix_offset = time.time() - loop.time()
        snapshot = adapter_snapshot()
        self._interfaces = choose_interfaces(self._network.interfaces, snapshot, self._families)
        self._cover()
        self._sockets = socket_addresses(self._interfaces, snapshot)
        logger.info("mDNS on %s", ", ".join(self._interfaces))
        aiozc = AsyncZeroconf(
            interfaces=list(self._sockets), ip_version=zeroconf_version(self._sockets)
        )
        self._aiozc = aiozc
        listener = _HeardListener(self)
        browser: AsyncServiceBrowser | None = None
        try:
            zc = aiozc.zeroconf
            await zc.async_wait_for_start()
            zc.async_add_listener(listener, None)
            browser = AsyncServiceBrowser(zc, [SERVICE_TYPE], handlers=[self._on_state_change])
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._consume(tg))
                tg.create_task(self._tick())
                tg.create_task(self._watch_interfaces(snapshot))
                for addr in self._static:
                    await self._emit(self._table.add_candidate(addr, loop.time()))
                if self._announce:
                    await self._register()
                    tg.create_task(self._publish())
                self.ready.set()
        finally:
            await self._close(aiozc, browser, listener)

    # -- zeroconf callbacks: never block, never run our logic --

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        try:
            self._inbox.put_nowait((state_change is ServiceStateChange.Removed, name))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self._resync = True

    # -- tasks --

    async def _consume(self, tg: asyncio.TaskGroup) -> None:
        while True:
            removed, name = await self._inbox.get()
            key = name.lower()
            if removed:
                self._epoch[key] = self._epoch.get(key, 0) + 1
                self._watched = {k: v for k, v in self._watched.items() if v != key}
                await self._emit(self._table.removed(key))
            elif key in self._resolving:
                self._again.add(key)
            elif len(self._resolving) >= MAX_RESOLVING:
                self.stats.dropped += 1
                self._resync = True
            else:
                self._names[key] = name
                self._resolving[key] = tg.create_task(self._resolve(key))

    async def _resolve(self, key: str) -> None:
        assert self._aiozc is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._again.discard(key)
                epoch = self._epoch.get(key, 0)
                try:
                    info = AsyncServiceInfo(SERVICE_TYPE, self._names.get(key, key))
                    async with self._slots:
                        ok = await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT * 1000)
                except ZeroconfError:
                    ok = False
                if not ok:
                    self.stats.unresolved += 1
                elif self._epoch.get(key, 0) == epoch:  # not withdrawn meanwhile
                    addresses = [
                        a
                        for a in info.parsed_scoped_addresses(IPVersion.All)
                        if host_version(a) in self._families
                    ]
                    events = self._table.observe(
                        key, info.text or b"", addresses, info.port, loop.time()
                    )
                    self._note_incompatible(key)
                    if key in self._table.services():
                        self._watched[key] = key
                        if info.server:
                            self._watched[info.server.lower()] = key
                    await self._emit(events)
                if key not in self._again:
                    return
        finally:
            self._resolving.pop(key, None)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            now = loop.time()
            heard, self._heard = self._heard, set()
            for key in heard:
                if self._table.heard(key, now):
                    self._request_resolve(key)
            settled = [k for k, t in self._addresses_heard.items() if now - t >= ADDRESS_SETTLE]
            for key in settled:
                del self._addresses_heard[key]
                if key in self._table.services():
                    self._request_resolve(key)
            await self._emit(self._table.expire(now))
            due = self._table.due_probes(now)
            if due:
                self._probe(due)
            known = set(self._table.services())
            self._watched = {k: v for k, v in self._watched.items() if v in known}
            self._addresses_heard = {k: t for k, t in self._addresses_heard.items() if k in known}
            if len(self._names) > NAME_MEMORY:  # hostile name churn must not grow memory
                keep = known | set(self._resolving)
                self._names = {k: v for k, v in self._names.items() if k in keep}
                self._epoch = {k: v for k, v in self._epoch.items() if k in keep}
            if self._resync:
                self._resync = False
                await self._resync_from_cache()

    async def _register(self) -> None:
        assert self._aiozc is not None
        wanted = f"{self._name}.{SERVICE_TYPE}"
        info = self._service_info(wanted)
        announced = await self._aiozc.async_register_service(info, allow_name_change=True)
        await announced
        self._registered = info
        self.instance = info.name
        if info.name != wanted:
            # Renamed on a conflict: the tokens were bound to the name we asked for, so key
            # holders ignore what was just announced until it carries tokens for this one.
            renamed = await self._update_registration()
            if renamed is not None:
                await renamed
        logger.info("announced %s on port %d", info.name, self._port)

    async def _publish(self) -> None:
        """Coalesce TXT changes: at most one update per TXT_UPDATE_INTERVAL."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await self._publish_wanted.wait()
            wait = last + TXT_UPDATE_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._publish_wanted.clear()
            announced = await self._update_registration()
            if announced is not None:
                last = loop.time()
                await announced

    async def _update_registration(self) -> Awaitable[object] | None:
        """Give zeroconf our current TXT record and addresses if they changed; returns what
        to await for the announcements to be sent (None if nothing changed)."""
        assert self._aiozc is not None
        old = self._registered
        if old is None:
            return None
        info = self._service_info(old.name)
        if info.text == old.text and info.addresses == old.addresses:
            return None
        announced = await self._aiozc.async_update_service(info)
        self._registered = info
        self.stats.txt_updates += 1
        return announced

    async def _watch_interfaces(self, snapshot: tuple[tuple[str, str], ...]) -> None:
        assert self._aiozc is not None
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        monitor = _open_address_monitor()
        if monitor is not None:
            loop.add_reader(monitor.fileno(), _drain_address_monitor, monitor, changed)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(INTERFACE_POLL_INTERVAL):
                        await changed.wait()
                        await asyncio.sleep(INTERFACE_SETTLE)  # the rest of a burst
                changed.clear()
                current = adapter_snapshot()
                if current == snapshot:
                    continue
                snapshot = current
                chosen = choose_interfaces(self._network.interfaces, current, self._families)
                if chosen == self._interfaces:
                    continue
                logger.info("interfaces changed: mDNS now on %s", ", ".join(chosen))
                self.stats.interface_changes += 1
                before = self._covered
                self._interfaces = chosen
                self._cover()
                gone = [str(ip) for ip in before if ip not in self._covered]
                sockets = socket_addresses(chosen, current, self._sockets)
                if sockets != self._sockets:
                    # zeroconf re-announces the registration (still the old addresses) on
                    # every socket it adds: the goodbyes below correct it.
                    await self._aiozc.async_update_interfaces(
                        interfaces=list(sockets), ip_version=zeroconf_version(sockets)
                    )
                    self._sockets = sockets
                # At once, not held back by the TXT coalescing.
                announced = await self._update_registration()
                if announced is not None:
                    # The announcement flushes older address records from the peers' caches,
                    # but only those heard more than a second ago (RFC 6762 §10.2): a goodbye
                    # (§10.1) retracts a gone address whenever it was last announced.
                    self._say_goodbye_to_addresses(gone)
                    await announced
                self._publish_wanted.set()  # in case we were not registered yet
        finally:
            if monitor is not None:
                loop.remove_reader(monitor.fileno())
                monitor.close()

    # -- helpers --

    def _announcement(self, name: str) -> Announcement:
        """Our announcement under service ``name``: its tokens bound to that name, our port
        and the addresses it covers."""
        unbound = Announcement(self.node_id, self._nonce, (), self._sequence, self._covered)
        bound = binding(unbound, name, self._port)
        return replace(unbound, tokens=tuple(announce_token(f.key, bound) for f in self._folders))

    def _cover(self) -> None:
        """Choose the addresses to announce: as many of ours as the TXT record can cover,
        whatever the sequence (so a sequence update never changes them)."""
        ours = [ipaddress.ip_address(ip) for ip in self._interfaces]
        widest = Announcement(
            self.node_id,
            self._nonce,
            (bytes(ANNOUNCE_TOKEN_SIZE),) * len(self._folders),
            MAX_SEQUENCE,
        )
        self._covered = fit_addresses(widest, ours)
        if len(self._covered) < len(ours):
            logger.warning(
                "announcing %d of %d addresses: an announcement has no room for more (%s)",
                len(self._covered),
                len(ours),
                ", ".join(str(ip) for ip in self._covered),
            )

    def _service_info(self, name: str) -> AsyncServiceInfo:
        announcement = self._announcement(name)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            port=self._port,
            properties=encode_txt(announcement),
            server=f"ls-{self.node_id.hex()}.local.",
            # Exactly what the tokens cover: a key holder would never use another address.
            parsed_addresses=[str(ip) for ip in announcement.addresses],
        )

    def _note_incompatible(self, key: str) -> None:
        """Log once per node and version that a node speaks another protocol version."""
        peer = self._table.by_service(key)
        if peer is None or peer.node_id is None or peer.state is not PeerState.INCOMPATIBLE:
            return
        version = self._table.version(peer.node_id)
        if (peer.node_id, version) in self._incompatible:
            return
        if len(self._incompatible) >= NAME_MEMORY:
            self._incompatible.clear()
        self._incompatible.add((peer.node_id, version))
        logger.warning(
            "peer %s (%s) speaks protocol version %s, this node %d: listed as incompatible "
            "and not synced with until both run a lanshare that speaks the same version",
            peer.name,
            peer.node_id.hex(),
            version,
            PROTOCOL_VERSION,
        )

    def _say_goodbye_to_addresses(self, addresses: Sequence[str]) -> None:
        """Send our address records for ``addresses`` with a TTL of 0 (not cache-flush: that
        would retract the other addresses too)."""
        assert self._aiozc is not None
        if not addresses:
            return
        out = DNSOutgoing(_FLAGS_RESPONSE)
        server = f"ls-{self.node_id.hex()}.local."
        for ip in addresses:
            packed = ipaddress.ip_address(ip).packed
            kind = _TYPE_A if len(packed) == 4 else _TYPE_AAAA
            out.add_answer_at_time(DNSAddress(server, kind, _CLASS_IN, 0, packed), 0)
        self._aiozc.zeroconf.async_send(out)

    def _request_resolve(self, key: str) -> None:
        try:
            self._inbox.put_nowait((False, self._names.get(key, key)))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            self._resync = True

    def _probe(self, services: list[str]) -> None:
        assert self._aiozc is not None
        for start in range(0, len(services), MAX_PROBE_QUESTIONS):
            out = DNSOutgoing(_FLAGS_QUERY)
            for service in services[start : start + MAX_PROBE_QUESTIONS]:
                out.add_question(DNSQuestion(service, _TYPE_SRV, _CLASS_IN))
            self._aiozc.zeroconf.async_send(out)
            self.stats.probes += 1

    async def _resync_from_cache(self) -> None:
        """After dropped notifications: re-resolve what the cache lists, drop what it lost."""
        assert self._aiozc is not None
        zc = self._aiozc.zeroconf
        now_ms = time.monotonic() * 1000  # zeroconf's clock (current_time_millis)
        present: dict[str, str] = {}
        for record in zc.cache.async_all_by_details(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN):
            alias = getattr(record, "alias", None)
            if isinstance(alias, str) and not record.is_expired(now_ms):
                present[alias.lower()] = alias
        for key in set(self._table.services()) - set(present):
            await self._emit(self._table.removed(key))
        for key, name in present.items():
            self._names.setdefault(key, name)
            self._request_resolve(key)

    async def _emit(self, events: Sequence[PeerEvent]) -> None:
        for event in events:
            await self.events.put(event)

    def _emit_now(self, events: Sequence[PeerEvent]) -> None:
        """From the owner's synchronous calls: the queue full means the owner is not reading."""
        for event in events:
            try:
                self.events.put_nowait(event)
            except asyncio.QueueFull:
                logger.warning("discovery event queue full; dropped %s", type(event).__name__)

    async def _close(
        self,
        aiozc: AsyncZeroconf,
        browser: AsyncServiceBrowser | None,
        listener: _HeardListener,
    ) -> None:
        """Goodbyes and socket closing run to the end even if we are cancelled again
        meanwhile (a TaskGroup may cancel twice); the cancellation is re-raised after."""
        closing = asyncio.ensure_future(self._close_zeroconf(aiozc, browser, listener))
        cancelled = False
        while not closing.done():
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                cancelled = True
        closing.result()
        if cancelled:
            raise asyncio.CancelledError

    async def _close_zeroconf(
        self,
        aiozc: AsyncZeroconf,
        browser: AsyncServiceBrowser | None,
        listener: _HeardListener,
    ) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if browser is not None:
                    await browser.async_cancel()
                with contextlib.suppress(ValueError, KeyError):
                    aiozc.zeroconf.async_remove_listener(listener)
                if self._registered is not None:
                    await aiozc.async_unregister_all_services()  # goodbye packets
        except TimeoutError:
            logger.warning("mDNS goodbyes not sent within %s s", CLOSE_TIMEOUT)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await aiozc.async_close()
        except TimeoutError:
            logger.warning("zeroconf did not close within %s s", CLOSE_TIMEOUT)
        self._registered = None


class _HeardListener(RecordUpdateListener):
    """Notes which known peers just sent a record (liveness); nothing else runs here."""

    def __init__(self, owner: Discovery) -> None:
        super().__init__()
        self._owner = owner

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        owner = self._owner
        watched = owner._watched
        for update in records:
            record = update.new
            key = watched.get(record.key)
            if key is None:
                continue
            if record.ttl and not record.is_expired(now):  # not the cache's own expiry
                owner._heard.add(key)
            if record.type in (_TYPE_A, _TYPE_AAAA):  # new, refreshed, flushed or expired
                owner._addresses_heard.setdefault(key, _loop_time())


# --- pure helpers ----------------------------------------------------------------------------


def instance_name(node_name: str) -> str:
    """A DNS-SD instance label from ``[node].name``: printable, no dots, at most 56 bytes."""
    cleaned = "".join(ch for ch in node_name if ch.isprintable()).replace(".", "-").strip()
    raw = (cleaned or "lanshare").encode("utf-8")[:MAX_INSTANCE_SIZE]
    return raw.decode("utf-8", "ignore") or "lanshare"


def choose_interfaces(
    wanted: Sequence[str],
    adapters: Sequence[tuple[str, str]],
    families: frozenset[int] = frozenset({4, 6}),
) -> tuple[str, ...]:
    """Addresses for zeroconf, of the IP versions in ``families``: of the interfaces (names or
    addresses, IPv4 or IPv6) in ``wanted``, or every non-loopback address when ``wanted`` is
    empty; the loopback address if nothing matches (mDNS then stays local until an interface
    appears, see ``INTERFACE_POLL_INTERVAL``). In ``dial_order``: IPv4, global IPv6, link-local
    IPv6, each ascending (the order ``a=`` fills in when there is no room for all).

    ``adapters`` is a snapshot of (interface name, address) pairs, IPv6 without a scope.
    """
    usable = [(name, ip) for name, ip in adapters if host_version(ip) in families]
    present = {ip for _, ip in usable}
    chosen: set[str] = set()
    if not wanted:
        chosen = {ip for ip in present if not ipaddress.ip_address(ip).is_loopback}
    for item in wanted:
        address = item.partition("%")[0]
        if host_version(address):
            if _canonical(address) in present:
                chosen.add(_canonical(address))
        else:
            chosen.update(ip for name, ip in usable if name == item)
    if not chosen:
        fallback = "127.0.0.1" if 4 in families else "::1"
        logger.warning("no usable interface among %s; mDNS stays on %s", list(wanted), fallback)
        return (fallback,)
    return _in_order(chosen)


def socket_addresses(
    chosen: Sequence[str], adapters: Sequence[tuple[str, str]], current: Sequence[str] = ()
) -> tuple[str, ...]:
    """The addresses of ``chosen`` to give zeroconf: one per interface and IP version, since a
    second socket cannot join the mDNS group on an interface that already has one (zeroconf
    refuses it with a warning). An address in ``current`` (the sockets in use) is kept while it
    is chosen; else IPv6 prefers a link-local address (it lasts as long as the interface).
    """
    interface_of: dict[str, str] = {}
    for name, ip in adapters:
        interface_of.setdefault(ip, name)
    by_interface: dict[tuple[str, int], str] = {}
    for ip in sorted(chosen, key=lambda ip: (ip not in current, not _is_link_local(ip), ip)):
        by_interface.setdefault((interface_of.get(ip, ip), host_version(ip)), ip)
    return _in_order(by_interface.values())


def zeroconf_version(sockets: Sequence[str]) -> IPVersion:
    """The ``IPVersion`` zeroconf needs for sockets on these addresses."""
    versions = {host_version(ip) for ip in sockets}
    if versions == {6}:
        return IPVersion.V6Only
    return IPVersion.All if 6 in versions else IPVersion.V4Only


def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


def _is_link_local(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_link_local


def _in_order(addresses: Iterable[str]) -> tuple[str, ...]:
    def rank(ip: str) -> tuple[int, int, IPAddress]:
        address = ipaddress.ip_address(ip)
        return (address.version, address.is_link_local, address)

    return tuple(sorted(addresses, key=rank))


def adapter_snapshot() -> tuple[tuple[str, str], ...]:
    """(interface name, address) pairs; IPv6 without a scope, and not while it is tentative
    (duplicate address detection runs: nothing can bind it yet) or found duplicate."""
    unusable = _unusable_ipv6()
    pairs = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                pairs.add((adapter.nice_name, ip.ip))
            else:
                address = _canonical(ip.ip[0].partition("%")[0])
                if (adapter.nice_name, address) not in unusable:
                    pairs.add((adapter.nice_name, address))
    return tuple(sorted(pairs))


def _unusable_ipv6(path: Path = Path("/proc/net/if_inet6")) -> set[tuple[str, str]]:
    """(interface, address) of IPv6 addresses still tentative or failed, from the kernel's
    table (Linux; elsewhere nothing is known to be unusable)."""
    try:
        text = path.read_text(encoding="ascii")
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 6 and int(fields[4], 16) & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED):
            out.add((fields[5], _canonical(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))))
    return out


def _open_address_monitor() -> socket.socket | None:
    """A non-blocking netlink socket told of every address change, IPv4 and IPv6 (a new
    address, one removed, and one whose duplicate address detection ended) (Linux); else
    None."""
    family = getattr(socket, "AF_NETLINK", None)
    protocol = getattr(socket, "NETLINK_ROUTE", None)
    if family is None or protocol is None:
        return None
    try:
        monitor = socket.socket(family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    except OSError as exc:
        logger.debug("no netlink monitor (%s): interfaces are polled", exc)
        return None
    try:
        monitor.setblocking(False)
        monitor.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
    except OSError as exc:
        monitor.close()
        logger.debug("no netlink monitor (%s): interfaces are polled", exc)
        return None
    return monitor


def _drain_address_monitor(monitor: socket.socket, changed: asyncio.Event) -> None:
    """Read what the kernel reported (only its arrival matters) and wake the watcher."""
    for _ in range(MAX_NETLINK_READS):
        try:
            monitor.recv(65536)
        except BlockingIOError:
            break
        except OSError:  # ENOBUFS: messages were lost, which is a change too
            break
    changed.set()


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


# --- browsing once (for `lanshare peers` without a daemon) ------------------------------------


async def browse_once(config: Config, seconds: float = 3.0) -> list[PeerInfo]:
    """Browse for ``seconds`` without announcing and return the present peers, by name.

    Static peers are included (state ``static``): they are candidates, not confirmed peers;
    so are nodes of another protocol version (state ``incompatible``).
    """
    discovery = Discovery.from_config(config, announce=False)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(discovery.run())
        drainer = tg.create_task(_drain(discovery))
        await asyncio.sleep(seconds)
        runner.cancel()
        drainer.cancel()
    listed = ACTIVE_STATES | {PeerState.INCOMPATIBLE}
    return [p for p in discovery.peers() if p.state in listed]


async def _drain(discovery: Discovery) -> None:
    while True:
        await discovery.events.get()


# --- `python -m lanshare.discovery`: discovery alone, events as JSON lines --------------------


def event_json(event: PeerEvent) -> dict[str, Any]:
    """A JSON-able form of a discovery event."""
    kind = {PeerUp: "up", PeerChanged: "changed", PeerDown: "down"}[type(event)]
    out: dict[str, Any] = {"event": kind, "peer": event.peer.to_json(show_addr)}
    if isinstance(event, PeerDown):
        out["reason"] = event.reason.value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run discovery alone; print events as JSON lines; read commands from stdin.

    stdin commands: ``seq N``, ``unreachable ID``, ``reachable ID``, ``peers``, ``quit``.
    SIGTERM/SIGINT/``quit`` send goodbyes and exit 0.
    """
    parser = argparse.ArgumentParser(prog="python -m lanshare.discovery", description=main.__doc__)
    parser.add_argument("--config", type=Path, help="a lanshare config file (other flags ignored)")
    parser.add_argument("--name", default="lanshare")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--port", type=int, default=47474)
    parser.add_argument("--key", action="append", default=[], help="folder key (repeatable)")
    parser.add_argument("--interface", action="append", default=[])
    parser.add_argument("--static-peer", action="append", default=[])
    parser.add_argument("--ip-version", choices=IP_VERSIONS, default="both")
    parser.add_argument("--sequence", type=int, default=0)
    parser.add_argument("--browse-only", action="store_true")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    if args.config is None and args.state_dir is None:
        parser.error("give --config FILE, or --state-dir DIR and the other flags")

    async def _amain() -> None:
        announce = not args.browse_only
        if args.config is not None:
            discovery = Discovery.from_config(
                load(args.config), sequence=args.sequence, announce=announce
            )
        else:
            discovery = Discovery(
                node_id=load_or_create_node_id(args.state_dir),
                name=args.name,
                network=NetworkConfig(
                    port=args.port,
                    interfaces=tuple(args.interface),
                    static_peers=tuple(args.static_peer),
                    ip_version=args.ip_version,
                ),
                folders=[SharedFolder(f"folder{i}", parse_key(k)) for i, k in enumerate(args.key)],
                port=args.port,
                sequence=args.sequence,
                announce=announce,
            )
        await _run_standalone(discovery)

    try:
        asyncio.run(_amain())
    except LanshareError as exc:
        sys.stderr.write(f"lanshare: {exc}\n")
        return exc.exit_code
    return 0


async def _run_standalone(discovery: Discovery) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def out(obj: dict[str, Any]) -> None:
        obj["t"] = round(time.time(), 3)
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def events() -> None:
        while True:
            out(event_json(await discovery.events.get()))

    async def announce_ready() -> None:
        await discovery.ready.wait()
        out({"event": "ready", "id": discovery.node_id.hex(), "instance": discovery.instance})

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            words = line.decode(errors="replace").split()
            if not words:
                continue
            if words[0] == "quit":
                stop.set()
            elif words[0] == "seq" and len(words) == 2 and words[1].isdigit():
                discovery.set_sequence(int(words[1]))
            elif words[0] in ("unreachable", "reachable") and len(words) == 2:
                node = NodeId(bytes.fromhex(words[1]))
                if words[0] == "unreachable":
                    discovery.mark_unreachable(node)
                else:
                    discovery.mark_reachable(node)
            elif words[0] == "peers":
                peers = [p.to_json(show_addr) for p in discovery.peers()]
                out({"event": "peers", "peers": peers})
        # stdin closed: keep running until a signal.

    out({"event": "started", "id": discovery.node_id.hex()})
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(discovery.run())
        helpers = [tg.create_task(events()), tg.create_task(announce_ready())]
        if not sys.stdin.isatty():
            helpers.append(tg.create_task(commands()))
        await stop.wait()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        # Flush what the shutdown produced, then stop the helpers.
        while not discovery.events.empty():
            out(event_json(discovery.events.get_nowait()))
        for task in helpers:
            task.cancel()
    out({"event": "closed"})


if __name__ == "__main__":
    sys.exit(main())
