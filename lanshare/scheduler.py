"""Block scheduling across peers: which missing block to ask from which peer, and when.

Pure: no I/O, no clock, no global randomness. The engine feeds events in, passes ``now`` (its
monotonic clock, float seconds) and a seeded ``random.Random``, and carries out the steps.

Theory of operation
-------------------
The unit of transfer is a *piece*: a distinct block content ``(hash, size)``. Every block of
every file being downloaded (a :class:`BlockRef`) is attached to its piece, so a content needed
twice (in two files, or twice in one) crosses the network once and is then copied locally.

* **Local first.** A piece the engine already has somewhere on disk (``local_sources`` of
  :meth:`Scheduler.add_file`) or has just received for another block becomes
  :class:`LocalCopy` steps; :meth:`Scheduler.next_requests` returns those before any request.
* **Rarest first.** Pieces waiting for the network sit in buckets keyed by (file priority,
  number of peers holding them); each peer with room takes the first pieces it holds from the
  rarest bucket up. Within a bucket, pieces keep the order of a seeded shuffle made when their
  file is added (ties broken at random, reproducibly), then of their return to the bucket.
* **Pipelining.** A peer gets requests while it has fewer than ``min_depth`` outstanding,
  fewer outstanding bytes than ``min_bytes``, or fewer than ``rate * target_queue_time`` (its
  measured rate, fed through :meth:`Scheduler.update_rate`), capped by
  ``max_outstanding_per_peer``; all peers together by ``max_outstanding_total``. Requests
  are per piece, not per file: the pieces of many files (small files of one block each) are
  outstanding at once, so a folder of many small files streams like one big file.
  Better-scoring peers (rate * reliability) choose first.
* **Failover.** A request that fails (timeout, integrity, peer gone) or stays outstanding longer
  than ``request_timeout`` puts its piece back in its bucket, avoiding that peer while another
  holder exists. Data that fails its hash counts a strike; at ``ban_threshold`` strikes the peer
  is banned for ``ban_time`` and its other requests are cancelled and requeued.
* **End game.** When no piece waits in a bucket with an available holder, idle capacity asks
  for pieces already outstanding elsewhere (fewest copies, oldest first; at most
  ``endgame_max_copies`` per piece). The first copy to complete wins; the others come back as
  :class:`Cancel` steps. Outside the end game a piece is never outstanding twice.
* **Bounds.** Pieces tracked (``max_pending_blocks``), outstanding requests per peer and in
  total, and local copies in progress (``max_local_copies``) are all capped. A peer whose
  session closed is remembered (rate, failures, ban) until ``MAX_GONE_PEERS`` more recently
  gone peers push it out, so peers coming and going under fresh node ids cost bounded
  memory; a node's address ban (``lanshare.strikes``) outlives what is forgotten here.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import random
    from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

    from lanshare.manifest import Block

logger = logging.getLogger(__name__)

PeerKey: TypeAlias = bytes
"""A peer's node id (``identity.NodeId``)."""
FileKey: TypeAlias = str
"""The engine's name for a file being downloaded (e.g. its folder-relative path)."""
_PieceKey: TypeAlias = tuple[bytes, int]

MAX_GONE_PEERS = 256
"""Peers whose session closed that are remembered, the most recently gone."""


class FailReason(enum.Enum):
    """Why a block did not arrive."""

    TIMEOUT = "timeout"  # no data in time (from the protocol or the scheduler's own deadline)
    INTEGRITY = "integrity"  # data arrived but failed its hash
    GONE = "gone"  # the session to the peer closed
    LOCAL = "local"  # a local copy could not be read or did not match its hash


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Limits and tuning of the scheduler; times in seconds, sizes in bytes."""

    target_queue_time: float = 0.1
    """Outstanding data per peer, in seconds of its measured rate."""
    min_depth: int = 2
    """Requests kept outstanding per peer whatever its rate."""
    min_bytes: int = 128 * 1024
    """Bytes kept outstanding per peer whatever its rate (before it is measured): small
    blocks, many small files, are asked for many at a time from the start."""
    max_outstanding_per_peer: int = 64
    max_outstanding_total: int = 512
    max_pending_blocks: int = 65_536
    """Blocks (of all files) tracked at once; add_file refuses more."""
    max_local_copies: int = 64
    """Local copies handed out and not yet reported done."""
    request_timeout: float = 10.0
    """A request outstanding this long is failed as a timeout and moved."""
    endgame_max_copies: int = 2
    """Outstanding copies of one piece in the end game."""
    ban_threshold: int = 3
    """Integrity failures of one peer before it is banned."""
    ban_time: float = 300.0
    initial_rate: float = 0.0
    """Rate assumed for a peer before the first measurement (0: ``min_depth`` only)."""


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block of one file being downloaded."""

    file_id: FileKey
    index: int
    offset: int
    size: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class LocalSource:
    """A region of an existing local file that holds a block's content."""

    path: str
    offset: int


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """Copy ``target``'s content from ``source``: a local file region, or another block of
    this download that is already written. The engine verifies the hash and reports back."""

    target: BlockRef
    source: LocalSource | BlockRef


@dataclass(frozen=True, slots=True)
class Request:
    """Ask ``peer`` for ``block`` (``duplicate``: an end-game second copy)."""

    peer: PeerKey
    block: BlockRef
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """Withdraw the outstanding request for ``block`` from ``peer``."""

    peer: PeerKey
    block: BlockRef


Step: TypeAlias = LocalCopy | Cancel | Request


@dataclass(frozen=True, slots=True)
class PeerStats:
    """What the scheduler knows of one peer (for ``status`` and tests)."""

    peer: PeerKey
    rate: float
    score: float
    outstanding: int
    outstanding_size: int
    blocks_done: int
    bytes_done: int
    timeouts: int
    integrity_failures: int
    banned_until: float | None


class Scheduler:
    """Incremental block scheduler; one per folder (or per node), fed by the engine."""

    def __init__(self, rng: random.Random, config: SchedulerConfig | None = None) -> None:
        self._rng = rng
        self._config = config or SchedulerConfig()
        self._pieces: dict[_PieceKey, _Piece] = {}
        self._by_hash: dict[bytes, set[_PieceKey]] = {}
        self._files: dict[FileKey, _File] = {}
        self._peers: dict[PeerKey, _Peer] = {}
        self._gone: OrderedDict[PeerKey, None] = OrderedDict()
        """Peers of ``_peers`` whose session closed, the most recently gone last."""
        self._buckets: dict[tuple[int, int], dict[_PieceKey, None]] = {}
        self._local_queue: deque[LocalCopy] = deque()
        self._local_out: dict[BlockRef, LocalCopy] = {}
        self._tracked = 0  # refs not done
        self._outstanding = 0  # network requests, all peers
        self._seq = 0
        self._cancels: list[Cancel] = []
        self._block_hint = 128 * 1024  # typical block size, for pipelines not yet started

    # --- inputs ---------------------------------------------------------------------------

    def add_file(
        self,
        file_id: FileKey,
        blocks: Sequence[Block],
        availability: Mapping[PeerKey, Collection[bytes] | None],
        *,
        local_sources: Mapping[bytes, LocalSource] | None = None,
        priority: int = 0,
    ) -> bool:
        """Track the missing ``blocks`` of ``file_id``.

        Args:
            blocks: the blocks still needed (offset, size, hash); verified ones left out.
            availability: for each peer, the hashes it can serve, or None for all of them.
            local_sources: where some of these contents already exist on disk.
            priority: lower goes first (the plan's order: ``pull`` paths, small files).

        Returns:
            False, tracking nothing, if that would exceed ``max_pending_blocks``.

        Raises:
            ValueError: ``file_id`` is already tracked.
        """
        if file_id in self._files:
            raise ValueError(f"file {file_id!r} is already scheduled")
        if self._tracked + len(blocks) > self._config.max_pending_blocks:
            return False
        refs = [BlockRef(file_id, i, b.offset, b.size, b.hash) for i, b in enumerate(blocks)]
        if refs:
            self._block_hint = max(r.size for r in refs)
        self._files[file_id] = _File(len(refs))
        self._tracked += len(refs)
        if not refs:
            del self._files[file_id]
            return True
        order = list(range(len(refs)))
        self._rng.shuffle(order)  # the seeded tie-break among equally rare pieces
        fresh: list[_Piece] = []
        for i in order:
            ref = refs[i]
            key = (ref.hash, ref.size)
            piece = self._pieces.get(key)
            if piece is None:
                piece = self._pieces[key] = _Piece(key, priority)
                self._by_hash.setdefault(ref.hash, set()).add(key)
                fresh.append(piece)
            elif priority < piece.priority:
                self._unbucket(piece)
                piece.priority = priority
            self._files[file_id].pieces[key] = None
            piece.waiting.append(ref)
        for peer, hashes in availability.items():
            wanted = {r.hash for r in refs} if hashes is None else set(hashes)
            self._learn(peer, wanted)
        for key in dict.fromkeys((r.hash, r.size) for r in (refs[i] for i in order)):
            piece = self._pieces[key]
            source = (local_sources or {}).get(key[0])
            if source is not None and piece.local is None and piece.done_ref is None:
                piece.local = source
            self._settle(piece)
        return True

    def peer_has(self, peer: PeerKey, hashes: Iterable[bytes]) -> None:
        """``peer`` can now serve these contents (HAVE while it downloads, or on reconnect)."""
        self._learn(peer, hashes)

    def peer_gone(self, peer: PeerKey) -> list[Cancel]:
        """``peer``'s session closed: forget what it holds and move its requests elsewhere."""
        state = self._peers.get(peer)
        if state is None:
            return []
        cancels = self._drop_outstanding(state)
        for key in sorted(state.held, key=lambda k: self._pieces[k].seq):
            piece = self._pieces.get(key)
            if piece is not None:
                self._unbucket(piece)
                piece.holders.discard(peer)
                self._settle(piece)
        state.held.clear()
        state.present = False
        self._gone[peer] = None
        self._gone.move_to_end(peer)
        while len(self._gone) > MAX_GONE_PEERS:
            oldest, _ = self._gone.popitem(last=False)
            del self._peers[oldest]
        return cancels

    def update_rate(self, peer: PeerKey, bytes_per_s: float) -> None:
        """The measured delivery rate of ``peer`` (sizes its pipeline)."""
        self._peer(peer).rate = max(0.0, bytes_per_s)

    def on_block_done(self, block: BlockRef, peer: PeerKey | None = None) -> list[Cancel]:
        """``block`` is verified and written, from ``peer`` (None: by a local copy).

        Returns:
            The other outstanding requests for the same content, to cancel (end game).
        """
        key = (block.hash, block.size)
        piece = self._pieces.get(key)
        if piece is None:
            return []
        cancels: list[Cancel] = []
        if self._local_out.pop(block, None) is not None:
            piece.copying.discard(block)
        elif block == piece.fetching:
            piece.fetching = None
            for other in list(piece.outstanding):
                if other != peer:
                    cancels.append(Cancel(other, block))
                self._end_request(piece, other)
            if peer is not None:
                state = self._peer(peer)
                state.blocks_done += 1
                state.bytes_done += block.size
                state.recent_failures = max(0, state.recent_failures - 1)
        elif block in piece.waiting:  # the engine found it by other means
            piece.waiting.remove(block)
        else:
            return []  # late or unknown: already done or cancelled
        if piece.done_ref is None:
            piece.done_ref = block
        self._ref_done(piece, block)
        return cancels

    def on_block_failed(
        self, block: BlockRef, peer: PeerKey | None, reason: FailReason, now: float
    ) -> list[Cancel]:
        """A request to ``peer`` for ``block`` failed (or, with ``peer`` None, a local copy).

        Returns:
            Requests to cancel: the peer's other requests when this failure got it banned.
        """
        piece = self._pieces.get((block.hash, block.size))
        if piece is None:
            return []
        if peer is None:
            copy = self._local_out.pop(block, None)
            if copy is None:
                return []
            piece.copying.discard(block)
            # Distrust the source that failed; the content comes from elsewhere.
            if copy.source == piece.local:
                piece.local = None
            if copy.source == piece.done_ref:
                piece.done_ref = None
            piece.waiting.append(block)
            self._settle(piece)
            return []
        if block != piece.fetching or peer not in piece.outstanding:
            return []
        state = self._peer(peer)
        self._end_request(piece, peer)
        cancels: list[Cancel] = []
        if reason is FailReason.TIMEOUT:
            state.timeouts += 1
            state.recent_failures += 1
            piece.avoid.add(peer)
        elif reason is FailReason.INTEGRITY:
            state.integrity_failures += 1
            state.recent_failures += 1
            piece.avoid.add(peer)
            if state.integrity_failures >= self._config.ban_threshold * (state.bans + 1):
                state.bans += 1
                state.banned_until = now + self._config.ban_time
                logger.warning(
                    "peer %s banned for %.0f s after %d blocks failed their hash",
                    peer.hex(),
                    self._config.ban_time,
                    state.integrity_failures,
                )
                cancels = self._drop_outstanding(state)
        self._settle(piece)
        return cancels

    def remove_file(self, file_id: FileKey) -> list[Cancel]:
        """Stop downloading ``file_id`` (a newer version appeared, or the file changed locally).

        Returns:
            Outstanding requests that no other file needs, to cancel.
        """
        entry = self._files.pop(file_id, None)
        if entry is None:
            return []
        cancels: list[Cancel] = []
        for key in entry.pieces:
            piece = self._pieces.get(key)
            if piece is None:
                continue  # every block of that content is done: the piece is forgotten
            gone = [r for r in piece.waiting if r.file_id == file_id]
            piece.waiting = [r for r in piece.waiting if r.file_id != file_id]
            for ref in [r for r in piece.copying if r.file_id == file_id]:
                piece.copying.discard(ref)
                self._local_out.pop(ref, None)
                gone.append(ref)
            fetching = piece.fetching
            if fetching is not None and fetching.file_id == file_id:
                gone.append(fetching)
                piece.fetching = None
                for peer in list(piece.outstanding):
                    cancels.append(Cancel(peer, fetching))
                    self._end_request(piece, peer)
            if piece.done_ref is not None and piece.done_ref.file_id == file_id:
                piece.done_ref = None  # its data goes away with the file
            self._tracked -= len(gone)
            self._settle(piece)
        self._local_queue = deque(c for c in self._local_queue if c.target.file_id != file_id)
        return cancels

    # --- outputs --------------------------------------------------------------------------

    def next_requests(self, now: float) -> list[Step]:
        """What to do now: local copies first, then cancellations, then network requests."""
        cfg = self._config
        steps: list[Step] = []
        self._expire(now)
        while self._local_queue and len(self._local_out) < cfg.max_local_copies:
            copy = self._local_queue.popleft()
            self._local_out[copy.target] = copy
            steps.append(copy)
        steps.extend(self._cancels)
        self._cancels = []
        peers = sorted(
            (p for p in self._peers.values() if p.present and not self._banned(p, now)),
            key=lambda p: (-self._score(p), p.key),
        )
        for state in peers:
            room = self._room(state)
            if room <= 0:
                continue
            for piece in self._candidates(state, room):
                steps.append(self._send(piece, state, now, duplicate=False))
        if not self._servable_pending(now):
            steps.extend(self._end_game(peers, now))
        return steps

    # --- queries --------------------------------------------------------------------------

    def remaining(self, file_id: FileKey) -> int:
        """Blocks of ``file_id`` not yet done (0 once complete or if unknown)."""
        entry = self._files.get(file_id)
        return 0 if entry is None else entry.total - entry.done

    def stalled(self, now: float) -> list[BlockRef]:
        """Blocks that wait for the network and that no available peer holds."""
        out: list[BlockRef] = []
        for (_, _count), bucket in sorted(self._buckets.items()):
            for key in bucket:
                piece = self._pieces[key]
                if not any(self._usable(h, now) for h in piece.holders):
                    out.extend(piece.waiting)
        return out

    def peer_stats(self, peer: PeerKey) -> PeerStats:
        """Counters and pipeline state of one peer."""
        s = self._peer(peer)
        return PeerStats(
            peer=peer,
            rate=s.rate,
            score=self._score(s),
            outstanding=len(s.outstanding),
            outstanding_size=s.outstanding_size,
            blocks_done=s.blocks_done,
            bytes_done=s.bytes_done,
            timeouts=s.timeouts,
            integrity_failures=s.integrity_failures,
            banned_until=s.banned_until,
        )

    @property
    def outstanding(self) -> int:
        """Network requests outstanding, all peers."""
        return self._outstanding

    @property
    def tracked(self) -> int:
        """Blocks tracked and not yet done, all files."""
        return self._tracked

    # --- private helpers ------------------------------------------------------------------

    def _peer(self, peer: PeerKey) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(peer, rate=self._config.initial_rate)
        return state

    def _learn(self, peer: PeerKey, hashes: Iterable[bytes]) -> None:
        state = self._peer(peer)
        state.present = True
        self._gone.pop(peer, None)
        for digest in hashes:
            for key in self._by_hash.get(digest, ()):
                piece = self._pieces[key]
                if peer in piece.holders:
                    continue
                self._unbucket(piece)
                piece.holders.add(peer)
                state.held.add(key)
                self._settle(piece)

    def _settle(self, piece: _Piece) -> None:
        """Put ``piece`` where its state says: local copies, bucket, or forgotten."""
        self._unbucket(piece)
        if not piece.waiting and not piece.copying and piece.fetching is None:
            self._forget(piece)
            return
        source: LocalSource | BlockRef | None = piece.done_ref or piece.local
        if source is not None:
            for ref in piece.waiting:
                copy = LocalCopy(ref, source)
                piece.copying.add(ref)
                self._local_queue.append(copy)
            piece.waiting = []
            return
        if piece.fetching is None and piece.waiting and not piece.copying:
            key = (piece.priority, len(piece.holders))
            self._seq += 1
            piece.seq = self._seq
            self._buckets.setdefault(key, {})[piece.key] = None
            piece.bucket = key

    def _unbucket(self, piece: _Piece) -> None:
        if piece.bucket is not None:
            bucket = self._buckets[piece.bucket]
            del bucket[piece.key]
            if not bucket:
                del self._buckets[piece.bucket]
            piece.bucket = None

    def _forget(self, piece: _Piece) -> None:
        del self._pieces[piece.key]
        keys = self._by_hash[piece.key[0]]
        keys.discard(piece.key)
        if not keys:
            del self._by_hash[piece.key[0]]
        for holder in piece.holders:
            self._peers[holder].held.discard(piece.key)

    def _ref_done(self, piece: _Piece, ref: BlockRef) -> None:
        self._tracked -= 1
        entry = self._files.get(ref.file_id)
        if entry is not None:
            entry.done += 1
            if entry.done >= entry.total:
                del self._files[ref.file_id]
        self._settle(piece)

    def _end_request(self, piece: _Piece, peer: PeerKey) -> None:
        piece.outstanding.pop(peer, None)
        state = self._peers[peer]
        if state.outstanding.pop(piece.key, None) is not None:
            state.outstanding_size -= piece.key[1]
            self._outstanding -= 1
        if not piece.outstanding and piece.fetching is not None:
            piece.waiting.insert(0, piece.fetching)
            piece.fetching = None

    def _drop_outstanding(self, state: _Peer) -> list[Cancel]:
        cancels: list[Cancel] = []
        for key in list(state.outstanding):
            piece = self._pieces[key]
            if piece.fetching is not None:
                cancels.append(Cancel(state.key, piece.fetching))
            self._end_request(piece, state.key)
            self._settle(piece)
        return cancels

    def _expire(self, now: float) -> None:
        deadline = now - self._config.request_timeout
        for state in self._peers.values():
            for key, sent in list(state.outstanding.items()):
                if sent > deadline:
                    break  # insertion order is send order
                piece = self._pieces[key]
                if piece.fetching is not None:
                    self._cancels.append(Cancel(state.key, piece.fetching))
                    self.on_block_failed(piece.fetching, state.key, FailReason.TIMEOUT, now)

    def _banned(self, state: _Peer, now: float) -> bool:
        if state.banned_until is None:
            return False
        if now >= state.banned_until:
            state.banned_until = None
            return False
        return True

    def _usable(self, peer: PeerKey, now: float) -> bool:
        state = self._peers[peer]
        return state.present and not self._banned(state, now)

    def _score(self, state: _Peer) -> float:
        reliability = (state.blocks_done + 1) / (
            state.blocks_done + 1 + 2 * state.recent_failures + 4 * state.integrity_failures
        )
        return (state.rate or 1.0) * reliability

    def _room(self, state: _Peer) -> int:
        """How many more requests ``state`` may take now (estimated from its byte budget)."""
        cfg = self._config
        count = len(state.outstanding)
        budget = state.rate * cfg.target_queue_time - state.outstanding_size
        block = state.outstanding_size / count if count else self._block_hint
        want = count + math.ceil(budget / block) if budget > 0 else count
        floor = max(cfg.min_depth, math.ceil(cfg.min_bytes / block))
        want = min(max(want, floor), cfg.max_outstanding_per_peer)
        return min(want - count, cfg.max_outstanding_total - self._outstanding)

    def _candidates(self, state: _Peer, room: int) -> list[_Piece]:
        """Up to ``room`` waiting pieces ``state`` holds, rarest first."""
        chosen: list[_Piece] = []
        for piece in self._waiting_pieces(state):
            if state.key not in piece.holders:
                continue
            if state.key in piece.avoid and piece.holders - piece.avoid:
                continue
            chosen.append(piece)
            if len(chosen) >= room:
                break
        return chosen

    def _waiting_pieces(self, state: _Peer) -> Iterator[_Piece]:
        pending = sum(len(b) for k, b in self._buckets.items() if k[1] > 0)
        if len(state.held) < pending:  # a partial holder: look at what it has, in order
            held = [self._pieces[k] for k in state.held]
            held = [p for p in held if p.bucket is not None]
            held.sort(key=lambda p: (p.bucket, p.seq))
            yield from held
            return
        for key in sorted(self._buckets):
            if key[1] == 0:
                continue  # nobody holds these
            # Not a copy: the caller stops iterating before it changes any bucket.
            for piece_key in self._buckets[key]:
                yield self._pieces[piece_key]

    def _send(self, piece: _Piece, state: _Peer, now: float, *, duplicate: bool) -> Request:
        self._unbucket(piece)
        if piece.fetching is None:
            piece.fetching = piece.waiting.pop(0)
        piece.outstanding[state.key] = now
        state.outstanding[piece.key] = now
        state.outstanding_size += piece.key[1]
        self._outstanding += 1
        return Request(state.key, piece.fetching, duplicate=duplicate)

    def _servable_pending(self, now: float) -> bool:
        for key in sorted(self._buckets):
            if key[1] == 0:
                continue
            for piece_key in self._buckets[key]:
                if any(self._usable(h, now) for h in self._pieces[piece_key].holders):
                    return True
        return False

    def _end_game(self, peers: list[_Peer], now: float) -> list[Step]:
        cfg = self._config
        active = [p for p in self._pieces.values() if p.outstanding]
        if not active:
            return []
        steps: list[Step] = []
        for state in peers:
            room = self._room(state)
            if room <= 0:
                continue
            options = [
                p
                for p in active
                if state.key in p.holders
                and state.key not in p.outstanding
                and state.key not in p.avoid
                and len(p.outstanding) < cfg.endgame_max_copies
            ]
            options.sort(key=lambda p: (len(p.outstanding), min(p.outstanding.values()), p.seq))
            for piece in options[:room]:
                steps.append(self._send(piece, state, now, duplicate=True))
        return steps


@dataclass(slots=True)
class _Piece:
    key: _PieceKey
    priority: int
    waiting: list[BlockRef] = field(default_factory=list)  # need data, nothing under way
    copying: set[BlockRef] = field(default_factory=set)  # local copies handed out or queued
    fetching: BlockRef | None = None  # the block the network requests are for
    outstanding: dict[PeerKey, float] = field(default_factory=dict)  # peer → sent at
    holders: set[PeerKey] = field(default_factory=set)
    avoid: set[PeerKey] = field(default_factory=set)  # peers that failed this piece
    local: LocalSource | None = None
    done_ref: BlockRef | None = None  # a block of this content already written
    bucket: tuple[int, int] | None = None
    seq: int = 0


@dataclass(slots=True)
class _File:
    total: int
    done: int = 0
    pieces: dict[_PieceKey, None] = field(default_factory=dict)  # ordered set


@dataclass(slots=True)
class _Peer:
    key: PeerKey
    rate: float = 0.0
    present: bool = True
    held: set[_PieceKey] = field(default_factory=set)
    outstanding: dict[_PieceKey, float] = field(default_factory=dict)  # in send order
    outstanding_size: int = 0
    blocks_done: int = 0
    bytes_done: int = 0
    timeouts: int = 0
    integrity_failures: int = 0
    recent_failures: int = 0
    bans: int = 0
    banned_until: float | None = None
