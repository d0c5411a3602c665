"""The peer exchange of one folder: sessions, manifests, HAVE announcements, serving.

Async coordination, no sockets: commands go to the engine's sans-IO ``Endpoint`` (then the
transport is asked to send with ``kick``); index reads and writes run in worker threads.

Theory of operation
-------------------
* **Sessions.** A session with a peer for this folder is a ``PeerLink``. When it comes up,
  we ask the peer for its records above the highest we hold (each peer's, read from the
  index once and kept as records are stored: no SQLite on the loop) and tell it our
  sequence (our in-progress downloads are news for it too); when it closes, the downloads
  move its requests to the other peers.
* **Manifest exchange.** We ask a peer for its records with a sequence above the highest we
  hold of it; answers come in bounded batches and are asked for again while ``more`` is
  set (one request in flight per peer: a request asked meanwhile is asked once it is
  answered). Each batch starts with a header entry (``0x00``, the peer's 8-byte index id
  and its current sequence): a peer whose index id changed (its database was reset) is
  forgotten and read again from 0. Entries are decoded and validated
  (``manifest.decode_entry`` checks paths, sizes and hashes) before they are stored per
  peer in the index, so a restart costs only what changed. A NOTIFY whose sequence is above
  the stored one, or one that carries no HAVE hashes (a peer's set of downloads changed),
  asks for the news. Our answers are read from the index in a worker thread and packed to
  the size the peer asked for.
* **Records per peer are bounded** by ``[sync] max_peer_records`` (how many rows we hold of
  it, counted once at start and kept as batches are stored). A node id is the peer's free
  choice and its address is not, so the limit holds for everything stored from one source
  address (``strikes.ban_key``: the IPv4 host, the IPv6 /64) through any node id, and at
  most ``MAX_IDS_PER_SOURCE`` node ids of one source have their records stored in a run
  (a peer that sends under a fresh id each time gets no fresh allowance). A batch that
  would take a peer past the limit is not stored at all, and that peer's file list is not
  asked for again until the daemon restarts: what we hold of it stays exactly as stored,
  up to a sequence number, as after any batch, so a restart with a higher limit goes on
  from there. The peer is logged once and named in ``status`` (:attr:`Exchange.over_limit`);
  its blocks are still fetched for the records we hold.
* **Re-sharing.** A peer's answer also carries entries (``0x02``) for the files of more than
  one block it is downloading right now: the record it is building and which blocks it
  already holds; every block it verifies afterwards is announced with a HAVE. (A one-block
  file has nothing to share until it is whole; it then travels as a record.) The planner
  sees such a record as if the peer had that version, and the downloads ask it only for the
  blocks it announced, so C can pull from B what B is still receiving from A. Our own
  blocks verified are collected for ``HAVE_FLUSH_INTERVAL`` and announced together, at most
  ``MAX_HAVE_PER_NOTIFY`` in one NOTIFY; a download that peers may pull from starting is
  announced as a NOTIFY without hashes, which has them read our in-progress entries again.
* **HAVE state is bounded by what we asked for.** A peer's HAVE hashes are kept only for
  blocks of the in-progress records it announced in its last answer (which is no larger
  than the batch we asked for): when that list changes, the hashes of downloads it no longer
  announces go, and all of it goes with its session. A HAVE for a block of no announced
  record (it may arrive before the answer announcing the record) waits among the peer's
  last ``MAX_EARLY_HAVE`` such hashes, and counts once the record is announced. Hashes of a
  length no hash algorithm has are a strike (``Engine.count_hostile``) and are dropped.
* **Serving.** Block requests are handed to the folder's ``serving.BlockServer``.

The folder (``engine.FolderSync``) is seen through ``Folder``, its downloads
(``downloads.Downloads``) through ``Transfers``; neither is imported at run time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lanshare import hashes
from lanshare.errors import DecodeError
from lanshare.manifest import BatchHeader, FileRecord, InProgress, decode_entry, encode_entry
from lanshare.protocol import wire
from lanshare.strikes import ban_key

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable

    from lanshare.clock import Timer
    from lanshare.engine import Engine
    from lanshare.events import (
        Addr,
        BlockRequested,
        ManifestReceived,
        ManifestRequested,
        NotificationReceived,
        RequestCancelled,
        RequestFailed,
    )
    from lanshare.index import FolderInfo
    from lanshare.serving import BlockServer

logger = logging.getLogger(__name__)

MANIFEST_RECORDS_PER_BATCH = 2000
"""Records read from the index for one manifest answer (then cut to the size limit)."""
MAX_IDS_PER_SOURCE = 16
"""Node ids of one source address whose records are stored in one run (an honest machine
uses one; a few more cover daemons that share a host)."""
HAVE_FLUSH_INTERVAL = 0.05
"""Seconds verified blocks are collected before one HAVE notification."""
MAX_HAVE_PER_NOTIFY = 32
MAX_EARLY_HAVE = 1024
"""HAVE hashes kept per peer for blocks of no record it announced yet (the newest)."""


@dataclass(slots=True)
class PeerLink:
    """A session with one peer for one folder."""

    peer: bytes
    addr: Addr
    known_sequence: int = 0
    manifest_request: int | None = None
    refetch: bool = False
    listed: bool = False
    """Its whole file list was read once since the session came up."""
    in_progress: dict[str, FileRecord] = field(default_factory=dict)
    """The downloads it announced for re-sharing in its last manifest answer, by path."""
    have: set[bytes] = field(default_factory=set)
    """Hashes of the blocks of ``in_progress`` it announced it holds."""
    _blocks: set[bytes] = field(default_factory=set)
    """Hashes of every block of ``in_progress``: what ``have`` may hold."""
    _early: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    """HAVE hashes of no block of ``in_progress`` (yet), the newest ``MAX_EARLY_HAVE``."""

    def announced(self, in_progress: dict[str, FileRecord], verified: set[bytes]) -> set[bytes]:
        """Its downloads in progress are now ``in_progress``, holding the blocks ``verified``:
        HAVE state of other records goes. The hashes new to ``have``."""
        self.in_progress = in_progress
        self._blocks = {block.hash for r in in_progress.values() for block in r.blocks}
        early = [digest for digest in self._early if digest in self._blocks]
        for digest in early:
            del self._early[digest]
        have = {digest for digest in self.have if digest in self._blocks}
        have.update(early)
        have.update(verified)
        fresh = have - self.have
        self.have = have
        return fresh

    def add_have(self, announced: Iterable[bytes]) -> set[bytes]:
        """It announced it holds blocks with these hashes; those new to ``have``."""
        fresh: set[bytes] = set()
        for digest in announced:
            if digest in self.have:
                continue
            if digest in self._blocks:
                self.have.add(digest)
                fresh.add(digest)
                continue
            self._early[digest] = None
            self._early.move_to_end(digest)
            if len(self._early) > MAX_EARLY_HAVE:
                self._early.popitem(last=False)
        return fresh


class Transfers(Protocol):
    """What the peer exchange needs of the folder's downloads (``downloads.Downloads``)."""

    def peer_up(self, peer: bytes) -> None: ...

    def peer_has(self, peer: bytes, hashes: Collection[bytes]) -> None: ...

    def peer_gone(self, peer: bytes) -> None: ...

    def pump(self) -> None:
        """Send the requests that can go now."""
        ...

    def shared(self) -> list[InProgress]:
        """The downloads peers may pull from, newest first."""
        ...


class Folder(Protocol):
    """What the peer exchange needs of its folder (``engine.FolderSync``)."""

    info: FolderInfo
    folder_id: bytes
    dirty: asyncio.Event
    """Set to have the folder plan again."""

    @property
    def downloads(self) -> Transfers: ...

    def info_sequence(self) -> int:
        """The folder's current sequence (its newest local change)."""
        ...

    def pending(self, path: str) -> bool:
        """Whether ``path`` has work in hand or a problem a peer's record may settle."""
        ...


class Exchange:
    """One folder's sessions with its peers, and what goes between them and us."""

    def __init__(self, folder: Folder, engine: Engine, server: BlockServer) -> None:
        self.folder = folder
        self.engine = engine
        self.server = server
        self.links: dict[bytes, PeerLink] = {}
        self.known: dict[bytes, int] = {}
        """The highest sequence of each peer's records held in the index: read once
        (``load``), then kept as records are stored, so a session coming up reads no SQLite
        on the loop."""
        self.counts: dict[bytes, int] = {}
        """How many records the index holds of each peer (read once, kept as stored)."""
        self.over_limit: dict[bytes, str] = {}
        """Peers whose file list is read no further, with the reason (for ``status``): their
        records (or their source's) reached ``[sync] max_peer_records``, or their source
        used too many node ids."""
        self.ids_of_source: dict[str, set[bytes]] = {}
        """The node ids whose records were stored from each source address in this run."""
        self.pending_have: list[bytes] = []
        self.have_flush: Timer | None = None
        self.announce_downloads = False

    async def load(self) -> None:
        """Read what the index holds of each peer (before any session comes up)."""
        peers = await asyncio.to_thread(self.engine.index.remote_peers, self.folder.info.id)
        self.known = {p.peer: p.max_sequence for p in peers}
        self.counts = await asyncio.to_thread(self.engine.index.remote_counts, self.folder.info.id)

    def session_up(self, peer: bytes, addr: Addr) -> None:
        link = PeerLink(peer, addr, known_sequence=self.known.get(peer, 0))
        self.links[peer] = link
        self.folder.downloads.peer_up(peer)
        self.ask_manifest(link)
        # Our in-progress downloads are news for it too.
        self.engine.endpoint.notify(peer, self.folder.folder_id, self.folder.info_sequence())

    def session_down(self, peer: bytes) -> None:
        link = self.links.pop(peer, None)
        if link is None:
            return
        self.folder.downloads.peer_gone(peer)
        if link.in_progress:
            self.folder.dirty.set()
        self.folder.downloads.pump()

    def ask_manifest(self, link: PeerLink) -> None:
        if link.peer in self.over_limit:
            link.listed = True  # all of its list that we read (``status`` says why)
            return
        if link.manifest_request is not None:
            link.refetch = True
            return
        link.refetch = False
        link.manifest_request = self.engine.endpoint.request_manifest(
            link.peer, self.folder.folder_id, link.known_sequence
        )
        self.engine.kick()

    async def answer_manifest(self, event: ManifestRequested) -> None:
        info = await asyncio.to_thread(self.engine.index.folder, self.folder.info.id)
        entries = [encode_entry(BatchHeader(info.index_id, info.sequence))]
        size = wire.manifest_batch_size(entries)
        # In-progress downloads go first but may fill at most half of the batch.
        for in_progress in reversed(self.folder.downloads.shared()):
            entry = encode_entry(in_progress)
            if size + 4 + len(entry) > event.max_size // 2:
                break
            entries.append(entry)
            size += 4 + len(entry)
        records = await asyncio.to_thread(
            self.engine.index.records_since,
            self.folder.info.id,
            event.since_seq,
            MANIFEST_RECORDS_PER_BATCH,
        )
        more = len(records) == MANIFEST_RECORDS_PER_BATCH
        for record in records:
            encoded = encode_entry(record)
            if size + 4 + len(encoded) > event.max_size:
                more = True
                break
            entries.append(encoded)
            size += 4 + len(encoded)
        self.engine.endpoint.send_manifest(event.request_id, entries, more)
        self.engine.kick()

    async def manifest_received(self, event: ManifestReceived) -> None:
        link = self.links.get(event.peer)
        if link is None or link.manifest_request != event.request_id:
            return
        records: list[FileRecord] = []
        in_progress: dict[str, FileRecord] = {}
        have: set[bytes] = set()
        restart = False
        max_devices = self.engine.config.sync.max_vector_devices
        for raw in event.records:
            try:
                entry = decode_entry(raw, max_devices)
            except DecodeError as exc:
                self.engine.count_hostile(event.peer, f"bad manifest entry: {exc}")
                continue
            if isinstance(entry, BatchHeader):
                restart = await self._check_index_id(link, entry)
            elif isinstance(entry, InProgress):
                in_progress[entry.record.path] = entry.record
                have.update(entry.record.blocks[i].hash for i in entry.verified)
            else:
                records.append(entry)
        link.manifest_request = None
        if restart:
            link.listed = False
            self.ask_manifest(link)
            return
        news = not link.listed
        if records and event.peer not in self.over_limit:
            stored = await self._store(link, records)
            if stored is not None:
                link.known_sequence, differing = stored
                self.known[event.peer] = link.known_sequence
                news = news or bool(differing) or any(self.folder.pending(r.path) for r in records)
        if in_progress.keys() != link.in_progress.keys() or have - link.have:
            news = True
            self.folder.downloads.peer_has(event.peer, link.announced(in_progress, have))
        if (event.more or link.refetch) and event.peer not in self.over_limit:
            self.ask_manifest(link)
        else:
            link.listed = True
        # A peer that took our changes sends them back as its own records: they change no
        # plan, and planning reads every record of the folder, so a sender would spend a
        # third of its time planning for nothing while it serves.
        if news:
            self.folder.dirty.set()

    async def _store(
        self, link: PeerLink, records: list[FileRecord]
    ) -> tuple[int, set[str]] | None:
        """``_store_remote`` within the limits of ``link``'s source; None, and its peer is read
        no further, when they refuse the records."""
        source = ban_key(link.addr)
        ids = self.ids_of_source.setdefault(source, set())
        if link.peer not in ids and len(ids) >= MAX_IDS_PER_SOURCE:
            self._refuse(link, f"is one node id too many from {source} ({len(ids)} read)")
            return None
        ids.add(link.peer)
        stored = await asyncio.to_thread(self._store_remote, link.peer, records, tuple(ids))
        if stored is None:
            shared = f" with the other node ids of {source}" if len(ids) > 1 else ""
            limit = self.engine.config.sync.max_peer_records
            self._refuse(
                link, f"announces more than {limit} records{shared} ([sync] max_peer_records)"
            )
        return stored

    def _store_remote(
        self, peer: bytes, records: list[FileRecord], source_ids: Collection[bytes]
    ) -> tuple[int, set[str]] | None:
        """Store a peer's records; its highest sequence now, and the paths of those that
        differ from ours; None, storing nothing, if they would take the peer, with the other
        node ids of its source (``source_ids``), past ``[sync] max_peer_records``.
        Blocking: call it in a thread (one at a time per peer: one manifest request is in
        flight per peer)."""
        index = self.engine.index
        folder = self.folder.info.id
        paths = [r.path for r in records]
        count = self.counts.get(peer, 0) + index.remote_unknown(folder, peer, paths)
        others = sum(self.counts.get(p, 0) for p in source_ids if p != peer)
        if count + others > self.engine.config.sync.max_peer_records:
            return None
        top = index.remote_upsert(folder, peer, records)
        self.counts[peer] = count
        return top, index.differing(folder, peer, paths)

    def peer_problems(self) -> dict[bytes, str]:
        """Why the file list of a peer was not read whole, by peer (for ``status``)."""
        return {
            peer: f"{why}: {self.counts.get(peer, 0)} kept, the rest of its file list not read"
            for peer, why in sorted(self.over_limit.items())
        }

    def _refuse(self, link: PeerLink, why: str) -> None:
        """Stop reading the file list of ``link``'s peer, keeping what is stored of it (see
        the module docstring); ``why`` names the limit it reached."""
        self.over_limit[link.peer] = why
        link.refetch = False
        logger.warning(
            "folder %s: peer %s %s: keeping the %d stored, reading no more of its file list",
            self.folder.info.path,
            link.peer.hex(),
            why,
            self.counts.get(link.peer, 0),
        )

    async def _check_index_id(self, link: PeerLink, header: BatchHeader) -> bool:
        index_id = header.index_id
        known = await asyncio.to_thread(
            self.engine.index.remote_peer, self.folder.info.id, link.peer
        )
        if known is not None and known.index_id not in (b"", index_id):
            logger.info("peer %s reset its index; reading it again", link.peer.hex())
            await asyncio.to_thread(
                self.engine.index.remote_reset, self.folder.info.id, link.peer, index_id
            )
            link.known_sequence = self.known[link.peer] = 0
            self.counts[link.peer] = 0
            return True
        if known is None or known.index_id == b"":
            await asyncio.to_thread(
                self.engine.index.remote_reset, self.folder.info.id, link.peer, index_id
            )
            self.known[link.peer] = 0
            self.counts[link.peer] = 0
            if known is not None and known.max_sequence:
                link.known_sequence = 0
                return True
        return False

    def notified(self, event: NotificationReceived) -> None:
        link = self.links.get(event.peer)
        if link is None:
            return
        if event.have:
            size = len(event.have[0])  # one length for all hashes of a NOTIFY (the wire's)
            if size not in hashes.DIGEST_SIZES:
                self.engine.count_hostile(event.peer, f"HAVE hashes of {size} bytes")
                return
            fresh = link.add_have(event.have)
            if fresh:
                self.folder.downloads.peer_has(event.peer, fresh)
                self.folder.downloads.pump()
        if event.seq > link.known_sequence or not event.have:
            self.ask_manifest(link)

    def peers_listed(self) -> tuple[int, bool]:
        """How many peers are connected for this folder, and whether every one of them has
        answered every manifest request (what they list is then all they have)."""
        idle = all(link.manifest_request is None for link in self.links.values())
        return len(self.links), idle

    def connected(self) -> Collection[bytes]:
        """The peers with a session for this folder now."""
        return self.links.keys()

    def building(self, path: str) -> dict[bytes, tuple[FileRecord, Collection[bytes]]]:
        """The connected peers downloading ``path`` now: the record each builds, and the
        hashes of the blocks it announced it holds (its in-progress entry and HAVEs)."""
        return {
            peer: (link.in_progress[path], link.have)
            for peer, link in self.links.items()
            if path in link.in_progress
        }

    def block_requested(self, event: BlockRequested) -> None:
        """A peer asks for a block: the folder's block server answers (in batches)."""
        self.server.request(event)

    def request_cancelled(self, event: RequestCancelled) -> None:
        """A peer's request was cancelled (by it, or with its session): not read if it waits."""
        self.server.cancel(event.request_id)

    def request_failed(self, event: RequestFailed) -> None:
        """A request that was no block request failed: a manifest request, asked again
        when the peer next tells of news (or its session comes up again)."""
        for link in self.links.values():
            if link.manifest_request == event.request_id:
                link.manifest_request = None

    def announce(self, sequence: int) -> None:
        """Tell every connected peer that our records changed (now at ``sequence``)."""
        for link in self.links.values():
            self.engine.endpoint.notify(link.peer, self.folder.folder_id, sequence)

    def block_verified(self, block_hash: bytes) -> None:
        """A block of a download is written and recorded: it goes out in the next HAVE."""
        self.pending_have.append(block_hash)
        self._schedule_flush()

    def downloads_changed(self) -> None:
        """A download peers may pull from started: they re-read our in-progress entries (a
        NOTIFY without HAVE hashes asks them to), so they can pull from us what we still
        receive."""
        self.announce_downloads = True
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self.have_flush is None:
            self.have_flush = self.engine.clock.call_later(HAVE_FLUSH_INTERVAL, self._flush_have)

    def _flush_have(self) -> None:
        self.have_flush = None
        hashes, self.pending_have = self.pending_have, []
        sequence = self.folder.info_sequence()
        if self.announce_downloads:
            self.announce_downloads = False
            for link in self.links.values():
                self.engine.endpoint.notify(link.peer, self.folder.folder_id, sequence)
        for start in range(0, len(hashes), MAX_HAVE_PER_NOTIFY):
            chunk = hashes[start : start + MAX_HAVE_PER_NOTIFY]
            for link in self.links.values():
                self.engine.endpoint.notify(link.peer, self.folder.folder_id, sequence, chunk)
        self.engine.kick()
