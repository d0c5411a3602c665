"""Sync planning: from the local records and every peer's records, the actions that bring a
folder up to date (fetch, build from local blocks, mkdir, symlink, metadata, delete, conflict).

Pure: no I/O, no clock, no randomness. The engine applies the actions; this module only decides.

Theory of operation
-------------------
1. **Global version.** For every path, the candidates are the local record and each peer's
   record. The winner is a maximal version (no other candidate's vector dominates it); when
   several are maximal (concurrent edits) the tie-break is, in this order: a live entry beats a
   tombstone (a modification is never lost to a concurrent delete), the newer ``mtime_ns`` wins,
   then the larger sum of the vector's counters (monotonic: a vector that dominates another
   never loses to what the other beat), then the vector as a sorted ``(device, counter)``
   tuple, then the content itself. The tie-break depends only on the set of records, so every
   node that knows the same records picks the same winner (:func:`global_winner`).
2. **Local against global.** Same version and content: nothing. Same content, other version or
   mode/mtime: :class:`SetMetadata`, under the join of all versions of that content (concurrent
   identical edits are no conflict). Winner a tombstone: :class:`Delete`. Otherwise the winner is
   created: :class:`MakeDir`, :class:`MakeSymlink`, :class:`BuildFromLocal` (every block is in
   some local file: renames, moves, truncations, zero bytes on the wire) or :class:`Fetch`.
   If the local entry is a live regular file whose version is concurrent with the winner's
   (or equal with other content), a :class:`Conflict` first moves it aside under
   :func:`conflict_name`; it is then a new local file, announced like any other.
   Local records no peer has, and local versions no peer has superseded, are left alone.
3. **Nothing lost.** Every action that replaces or removes a live local regular file or
   symlink whose content is not kept by a conflict copy has ``archive=True``: the engine moves
   the current file to ``.lanshare/versions/`` first. Every action names in ``replaces`` the
   local record it assumes is on disk, so the engine can refuse to clobber a file changed since.
4. **Structure.** A non-directory never replaces a directory that would keep live entries, a
   directory holding live entries is not deleted, and nothing is created below a
   non-directory; each such case is reported as a :class:`Problem` instead of an action.
   Every path an action touches passed :func:`lanshare.paths.normalize` and is not internal.
5. **Delete guard.** The plan's deletions, each attributed to the device that made it
   (:func:`deletion_origin`), are judged together with the folder's recent deletions
   (``deleteguard.judge`` over the caller's history and ``now``): if they trip the guard, the
   deletions (and the actions that need them first) are withheld and the plan is ``paused``
   with the :class:`~lanshare.deleteguard.Verdict`, unless the caller passes
   ``allow_mass_delete=True`` (after the user confirmed, e.g. ``lanshare resume``). A pass
   planned in batches (one plan per batch of paths, so that its memory stays bounded) passes
   each batch the deletions of the whole pass (:class:`PassDeletions`, counted first with
   :func:`deletions`): every batch then gets the verdict the whole pass would.
6. **What it reads.** Only paths some peer holds can need an action, so ``local`` need only
   hold those paths (with their ancestors, for the structure checks); what the plan must know
   of the rest of the folder — how many entries are live, whether a directory keeps live
   entries, whether a name is taken, where a block lies — comes from a :class:`LocalContext`.
   The engine answers it from the index (a folder of 100,000 files in sync then costs no
   decoding of 100,000 records); without one, it is derived from ``local``, which must then
   hold every local record. The plan is the same either way.
7. **Order.** ``Plan.actions`` is the commit order: conflict renames, directories (parents
   first), builds from local data, symlinks, fetches (``priority`` paths first, then small
   files first), metadata, then deletions (deepest first, a directory after its contents).
   A type change (directory → file) waits for the deletions below it, and a file deleted
   where a directory is needed goes before anything is created below it. The engine must prepare
   (read the sources of) every :class:`BuildFromLocal` before it commits any other action of
   the plan, because sources name local files as they are before the plan runs.
"""

from __future__ import annotations

import enum
import heapq
import logging
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias

from lanshare import deleteguard
from lanshare.errors import PathError
from lanshare.manifest import EntryType, FileRecord, Ordering, VersionVector
from lanshare.paths import MAX_NAME_SIZE, is_internal, is_temporary, normalize

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

PeerKey: TypeAlias = bytes
"""A peer's node id (``identity.NodeId``, 8 bytes), as the index keys remote records."""

CONFLICT_MARKER = ".sync-conflict-"
CONFLICT_NODE_DIGITS = 8
"""NODE in a conflict name: the first 8 hex digits of the node id (``NodeId.hex()[:8]``)."""


class ProblemKind(enum.Enum):
    """Why a path is left out of sync."""

    INVALID_PATH = "invalid path"  # a peer announced a path paths.normalize rejects
    DIR_NOT_EMPTY = "directory not empty"  # delete/replace a directory that keeps live entries
    PARENT_NOT_DIR = "parent is not a directory"  # would create below a file or symlink


@dataclass(frozen=True, slots=True)
class Problem:
    """A path the plan leaves alone, and why (for ``status``)."""

    path: str
    kind: ProblemKind
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BlockCopy:
    """One block of a new file taken from a local file: ``size`` bytes at ``source_offset``
    of ``source_path`` go to ``offset``; the engine checks ``hash`` after reading."""

    offset: int
    size: int
    hash: bytes
    source_path: str
    source_offset: int


@dataclass(frozen=True, slots=True)
class Conflict:
    """Move the local ``loser`` at ``path`` to ``conflict_name`` (same directory); it becomes the
    new local entry ``copy_record``. The winner's own action for ``path`` follows in the plan."""

    path: str
    winner: FileRecord
    loser: FileRecord
    conflict_name: str
    copy_record: FileRecord


@dataclass(frozen=True, slots=True)
class Fetch:
    """Download ``record`` into ``path`` from ``sources`` (peers holding exactly the winning
    version; ``record.version`` may be that version joined with the one it replaces)."""

    path: str
    record: FileRecord
    sources: tuple[PeerKey, ...]
    archive: bool = False
    replaces: FileRecord | None = None


@dataclass(frozen=True, slots=True)
class BuildFromLocal:
    """Assemble ``record`` from local blocks only (``copies`` cover the file in order).

    ``moved_from`` names a local file with exactly this content that the same plan deletes:
    the engine may rename it instead of copying (a move), if it still matches its record.
    """

    path: str
    record: FileRecord
    copies: tuple[BlockCopy, ...]
    archive: bool = False
    replaces: FileRecord | None = None
    moved_from: str | None = None


@dataclass(frozen=True, slots=True)
class MakeDir:
    """Create the directory ``record`` at ``path`` (replacing a non-directory there)."""

    path: str
    record: FileRecord
    archive: bool = False
    replaces: FileRecord | None = None


@dataclass(frozen=True, slots=True)
class MakeSymlink:
    """Create the symlink ``record`` (target ``record.symlink_target``) at ``path``."""

    path: str
    record: FileRecord
    archive: bool = False
    replaces: FileRecord | None = None


@dataclass(frozen=True, slots=True)
class SetMetadata:
    """The content at ``path`` already matches: set mode/mtime and record ``record``'s version."""

    path: str
    record: FileRecord
    replaces: FileRecord


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove ``path`` (the tombstone ``record`` wins); a directory is empty by then."""

    path: str
    record: FileRecord
    archive: bool = False
    replaces: FileRecord | None = None


Change: TypeAlias = Fetch | BuildFromLocal | MakeDir | MakeSymlink | SetMetadata | Delete
"""An action that brings one path to its global version."""
Action: TypeAlias = Conflict | Change


BlockSource: TypeAlias = "Callable[[str, bytes, int], tuple[str, int] | None]"
"""``(hash_algo, hash, size)`` → ``(path, offset)`` of the first live local file block with
that content, files in path order and blocks in file order; None if no local file has it."""


@dataclass(frozen=True, slots=True)
class LocalContext:
    """What a plan needs to know of the local records not passed to :func:`plan` (see the
    module docstring, step 6). Every answer must be deterministic for one state of the
    folder, and count the same records ``local`` would (live entries only where it says so).
    """

    live_count: int
    """Live local entries of the whole folder."""
    live_below: Callable[[str], int]
    """Live local entries at any depth below a directory path."""
    exists: Callable[[str], bool]
    """Whether the folder holds a local record (live or tombstone) at a path, or a peer's
    record that is not in the plan's ``remotes`` (a name a conflict copy must not take)."""
    block_source: BlockSource
    """Where a block lies in a live local file (:data:`BlockSource`)."""

    @classmethod
    def of(cls, local: Mapping[str, FileRecord]) -> LocalContext:
        """The context of a folder whose every local record is in ``local``."""
        usable = _usable(local)
        below: dict[str, int] = {}
        for path, record in usable.items():
            if not record.deleted:
                for parent in _parents(path):
                    below[parent] = below.get(parent, 0) + 1
        blocks: dict[tuple[str, bytes, int], tuple[str, int]] = {}
        for path in sorted(usable):
            record = usable[path]
            if record.deleted or record.type is not EntryType.FILE:
                continue
            for block in record.blocks:
                blocks.setdefault((record.hash_algo, block.hash, block.size), (path, block.offset))
        return cls(
            live_count=sum(1 for r in usable.values() if not r.deleted),
            live_below=lambda path: below.get(path, 0),
            exists=local.__contains__,
            block_source=lambda algo, block_hash, size: blocks.get((algo, block_hash, size)),
        )


@dataclass(frozen=True, slots=True)
class PassDeletions:
    """The deletions of a whole planning pass made of several plans (module docstring,
    step 5): the delete guard judges them in each plan instead of the plan's own."""

    counts: Mapping[PeerKey, int]
    """Deletions by origin (:func:`deletion_origin`) of every plan of the pass."""
    live: int
    """Live local entries when the pass started."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The actions, in commit order, and what was left out and why."""

    actions: tuple[Action, ...] = ()
    problems: tuple[Problem, ...] = ()
    paused: bool = False
    reason: str = ""
    withheld: tuple[Action, ...] = ()
    """Actions held back by the delete guard (empty unless ``paused``)."""
    verdict: deleteguard.Verdict | None = None
    """Why the delete guard paused the plan (``reason`` is its text without peer names)."""
    live_entries: int = 0
    """Live local entries the plan started from (the guard's history records it)."""

    @property
    def fetch_size(self) -> int:
        """Bytes the plan's fetches need at most (before local block reuse)."""
        return sum(a.record.size for a in self.actions if isinstance(a, Fetch))


def plan(
    local: Mapping[str, FileRecord],
    remotes: Mapping[PeerKey, Mapping[str, FileRecord]],
    *,
    local_short_id: int,
    priority: Collection[str] = (),
    limits: deleteguard.Limits = deleteguard.DEFAULT_LIMITS,
    delete_history: Sequence[deleteguard.Deletion] = (),
    now: float = 0.0,
    allow_mass_delete: bool = False,
    ignored: Callable[[str, bool], bool] | None = None,
    context: LocalContext | None = None,
    whole_pass: PassDeletions | None = None,
) -> Plan:
    """Compute what to do so that the local folder holds the global newest version of every path.

    Args:
        local: this node's records by path (live entries and tombstones): every one, or,
            with ``context``, at least those of the paths in ``remotes`` and of their
            ancestors.
        remotes: each peer's records by path.
        local_short_id: ``identity.short_id`` of this node; versions conflict copies.
        priority: paths (or directories, meaning everything below) to fetch first.
        limits, delete_history, now: the delete guard's settings, the folder's recent
            deletions (oldest first) and the wall-clock time (see the module docstring).
        allow_mass_delete: skip the delete guard (the user confirmed).
        ignored: ``IgnoreRules.matches``-like predicate ``(path, is_dir)``; matching paths are
            left alone.
        context: what to know of the local records not in ``local`` (None: derived from
            ``local``, which then holds them all).
        whole_pass: the deletions of the pass this plan is one batch of (None: this plan is
            the whole pass).

    Returns:
        The :class:`Plan`; its actions are in the order the engine commits them.
    """
    problems: list[Problem] = []
    by_path: dict[str, list[tuple[PeerKey, FileRecord]]] = {}
    for peer in sorted(remotes):
        for path, record in remotes[peer].items():
            by_path.setdefault(path, []).append((peer, record))
    usable_local = _usable(local)
    here = context if context is not None else LocalContext.of(local)
    taken = _Taken(by_path, here.exists)
    blocks_here = _BlockIndex(usable_local, here.block_source)

    units: dict[str, _Unit] = {}
    for path in sorted(by_path):
        entries = by_path[path]
        if not _acceptable(path):
            problems.append(Problem(path, ProblemKind.INVALID_PATH, "rejected by path rules"))
            continue
        remote = [(peer, r) for peer, r in entries if r.path == path]
        if len(remote) != len(entries):
            problems.append(Problem(path, ProblemKind.INVALID_PATH, "record names another path"))
        if not remote:
            continue
        mine = usable_local.get(path)
        candidates = [r for _, r in remote] + ([mine] if mine is not None else [])
        winner = global_winner(candidates)
        if ignored is not None and ignored(path, winner.type is EntryType.DIR):
            continue
        unit = _decide(path, mine, winner, remote, blocks_here, local_short_id, taken)
        if unit is not None:
            units[path] = unit

    _check_structure(units, usable_local, here.live_below, problems)
    actions = [a for unit in units.values() for a in unit.actions()]
    plan_ = _order(actions, usable_local, priority)

    pending = deletions(plan_, local_short_id)
    live_count = here.live_count
    if whole_pass is not None:
        live_count = whole_pass.live
        for origin, count in whole_pass.counts.items():
            pending[origin] = max(count, pending.get(origin, 0))
    verdict = None
    if not allow_mass_delete:
        verdict = deleteguard.judge(delete_history, pending, live_count, now, limits)
    withheld: list[Action] = []
    if verdict is not None:
        plan_, withheld = _withhold_deletions(plan_, usable_local)
        if whole_pass is None:  # else the pass logs it once
            logger.warning("delete guard: %s", verdict.reason())
    plan_ = _mark_moves(plan_)
    problems.sort(key=lambda p: (p.path, p.kind.value))
    return Plan(
        actions=tuple(plan_),
        problems=tuple(problems),
        paused=verdict is not None,
        reason=verdict.reason() if verdict is not None else "",
        withheld=tuple(withheld),
        verdict=verdict,
        live_entries=live_count,
    )


def deletions(actions: Iterable[Action], local_short_id: int) -> dict[PeerKey, int]:
    """How many of ``actions`` are deletions, by origin (:func:`deletion_origin`)."""
    counts: dict[PeerKey, int] = {}
    for action in actions:
        if isinstance(action, Delete):
            origin = deletion_origin(action, local_short_id)
            counts[origin] = counts.get(origin, 0) + 1
    return counts


def global_winner(records: Iterable[FileRecord]) -> FileRecord:
    """The global version among ``records`` of one path (see the module docstring, step 1).

    Raises:
        ValueError: ``records`` is empty.
    """
    candidates = list(records)
    if not candidates:
        raise ValueError("no records to choose from")
    maximal = [
        r
        for r in candidates
        if not any(o.version.compare(r.version) is Ordering.GREATER for o in candidates)
    ]
    return max(maximal, key=_tie_key)


def conflict_name(path: str, loser: FileRecord, winner: FileRecord) -> str:
    """``NAME.sync-conflict-YYYYMMDD-HHMMSS-NODE.EXT`` beside ``path``.

    The time is the loser's mtime in UTC. NODE is the first 8 hex digits of the id of the
    device that made the losing change: among the devices whose counter in the loser's vector
    exceeds the winner's, the one with the highest counter (then the lowest id). EXT is what
    follows the last dot of the name, unless that dot is the first character (``.bashrc`` has
    no extension). The name is shortened, if needed, to fit in one path component.
    """
    head, _, base = path.rpartition("/")
    dot = base.rfind(".")
    stem, ext = (base[:dot], base[dot:]) if dot > 0 else (base, "")
    node = f"{_losing_device(loser.version, winner.version):016x}"[:CONFLICT_NODE_DIGITS]
    tag = f"{CONFLICT_MARKER}{_utc(loser.mtime_ns):%Y%m%d-%H%M%S}-{node}"
    while len((stem + tag + ext).encode("utf-8")) > MAX_NAME_SIZE:
        if len(stem) > 1:
            stem = stem[:-1]
        else:
            ext = ext[:-1]
    name = stem + tag + ext
    return f"{head}/{name}" if head else name


_CONFLICT_NAME = re.compile(
    rf"^(?P<stem>.+){re.escape(CONFLICT_MARKER)}"
    rf"\d{{8}}-\d{{6}}-[0-9a-f]{{{CONFLICT_NODE_DIGITS}}}(?P<ext>\.[^./]*)?$"
)


def conflict_original(path: str) -> str | None:
    """The path a conflict copy named by :func:`conflict_name` belongs to, or None when
    ``path`` is not a conflict copy. A copy is recognised by its name alone, so every node
    that holds it counts it, until the user deletes or renames it."""
    head, _, base = path.rpartition("/")
    match = _CONFLICT_NAME.match(base)
    if match is None:
        return None
    name = match["stem"] + (match["ext"] or "")
    return f"{head}/{name}" if head else name


def change_origin(changed: VersionVector, other: VersionVector) -> int:
    """The short id of the device that made the change ``changed`` has and ``other`` lacks
    (the one named in a conflict copy's name)."""
    return _losing_device(changed, other)


def deletion_origin(action: Delete, local_short_id: int) -> PeerKey:
    """The node id of the device whose deletion ``action`` applies here
    (``deleteguard.LOCAL`` for this node's own).

    That is the device whose counter in the tombstone's vector exceeds the local record's
    (of several, the one with the highest counter, then the lowest id): the same whether the
    tombstone came from that device itself or was passed on by another peer.
    """
    mine = action.replaces.version if action.replaces is not None else VersionVector()
    device = _losing_device(action.record.version, mine)
    if device == local_short_id:
        return deleteguard.LOCAL
    return device.to_bytes(8, "big")


# --- private helpers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Unit:
    """The decision for one path: an optional conflict rename, then the winner's action."""

    action: Change
    conflict: Conflict | None = None

    def actions(self) -> tuple[Action, ...]:
        return (self.action,) if self.conflict is None else (self.conflict, self.action)


def _usable(local: Mapping[str, FileRecord]) -> dict[str, FileRecord]:
    return {p: r for p, r in local.items() if r.path == p and _acceptable(p)}


class _Taken:
    """The names a conflict copy may not take: every path of a record, local or remote, and
    those given to other copies of the same plan."""

    def __init__(self, remote: Collection[str], exists: Callable[[str], bool]) -> None:
        self._remote = remote
        self._exists = exists
        self._given: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self._given or name in self._remote or self._exists(name)

    def add(self, name: str) -> None:
        self._given.add(name)


def _acceptable(path: str) -> bool:
    try:
        ok = normalize(path) == path
    except PathError:
        return False
    return ok and not is_internal(path) and not is_temporary(path)


def _tie_key(r: FileRecord) -> tuple[object, ...]:
    return (
        not r.deleted,
        r.mtime_ns,
        sum(counter for _, counter in r.version.counters),
        r.version.counters,
        int(r.type),
        r.file_hash,
        r.symlink_target,
        r.size,
        r.mode,
        r.hash_algo,
        tuple((b.size, b.hash) for b in r.blocks),
    )


def _same_content(a: FileRecord, b: FileRecord) -> bool:
    """Both live, same type and same bytes (or symlink target)."""
    if a.deleted or b.deleted or a.type is not b.type:
        return False
    if a.type is EntryType.FILE:
        return (a.size, a.file_hash, a.hash_algo) == (b.size, b.file_hash, b.hash_algo)
    if a.type is EntryType.SYMLINK:
        return a.symlink_target == b.symlink_target
    return True


def _decide(
    path: str,
    mine: FileRecord | None,
    winner: FileRecord,
    remote: list[tuple[PeerKey, FileRecord]],
    blocks_here: _BlockIndex,
    local_short_id: int,
    taken: _Taken,
) -> _Unit | None:
    local_live = mine is not None and not mine.deleted
    if winner.deleted and not local_live:
        return None  # nothing on disk either way
    if mine is not None and mine == replace(winner, sequence=mine.sequence):
        return None
    # The record committed here joins the winner's vector with ours and with every version of
    # the same content, so that it dominates everything it replaces: re-planning then finds it
    # the winner (idempotence), and peers holding those versions adopt it without a conflict.
    version = winner.version
    for other in ([mine] if mine is not None else []) + [r for _, r in remote]:
        if other is mine or _same_content(other, winner):
            version = version.merge(other.version)
    target = replace(winner, version=version)
    if mine is not None and _same_content(mine, winner):
        return _Unit(SetMetadata(path, target, replaces=mine))
    replaces = mine if local_live else None
    if target.deleted:
        assert mine is not None  # live, see above
        return _Unit(Delete(path, target, archive=mine.type is not EntryType.DIR, replaces=mine))
    conflict: Conflict | None = None
    archive = local_live and mine is not None and mine.type is not EntryType.DIR
    if (
        mine is not None
        and local_live
        and mine.type is EntryType.FILE
        and mine.version.compare(winner.version) in (Ordering.CONCURRENT, Ordering.EQUAL)
    ):
        name = _unique(conflict_name(path, mine, winner), taken)
        copy = replace(mine, path=name, version=VersionVector().bump(local_short_id), sequence=0)
        conflict = Conflict(path, winner, mine, name, copy)
        archive = False  # the loser lives on as the conflict copy
    action: Change
    if target.type is EntryType.DIR:
        action = MakeDir(path, target, archive, replaces)
    elif target.type is EntryType.SYMLINK:
        action = MakeSymlink(path, target, archive, replaces)
    else:
        copies = blocks_here.cover(target, prefer=path)
        if copies is not None:
            action = BuildFromLocal(path, target, copies, archive, replaces)
        else:
            sources = tuple(
                peer
                for peer, r in remote
                if r.version.compare(winner.version) is Ordering.EQUAL and _same_content(r, winner)
            )
            action = Fetch(path, target, sources, archive, replaces)
    return _Unit(action, conflict)


def _unique(name: str, taken: _Taken) -> str:
    """``name``, or ``name`` with ``-2``, ``-3``… after NODE if a path of that name exists."""
    candidate = name
    n = 1
    while candidate in taken:
        n += 1
        head, _, base = name.rpartition("/")
        marker = base.rfind(CONFLICT_MARKER)
        end = marker + len(CONFLICT_MARKER) + len("YYYYMMDD-HHMMSS-") + CONFLICT_NODE_DIGITS
        base = f"{base[:end]}-{n}{base[end:]}"
        candidate = f"{head}/{base}" if head else base
    taken.add(candidate)
    return candidate


def _losing_device(loser: VersionVector, winner: VersionVector) -> int:
    ahead = [(c, -d) for d, c in loser.counters if c > winner.get(d)]
    pool = ahead or [(c, -d) for d, c in loser.counters]
    return -max(pool)[1] if pool else 0


def _utc(mtime_ns: int) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    seconds = mtime_ns // 1_000_000_000
    try:
        return epoch + timedelta(seconds=seconds)
    except OverflowError:
        return datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) if seconds > 0 else epoch.min


class _BlockIndex:
    """Where each block (algorithm, hash, size) of the live local files can be read."""

    def __init__(self, local: Mapping[str, FileRecord], source: BlockSource) -> None:
        self._local = local
        self._source = source

    def cover(self, record: FileRecord, *, prefer: str) -> tuple[BlockCopy, ...] | None:
        """A local source for every block of ``record``, or None if one is missing."""
        own = self._local.get(prefer)
        own_at: dict[tuple[bytes, int], int] = {}
        if own is not None and not own.deleted and own.hash_algo == record.hash_algo:
            for block in own.blocks:
                own_at.setdefault((block.hash, block.size), block.offset)
        copies = []
        for block in record.blocks:
            offset = own_at.get((block.hash, block.size))
            if offset is not None:
                source = (prefer, offset)
            else:
                found = self._source(record.hash_algo, block.hash, block.size)
                if found is None:
                    return None
                source = found
            copies.append(BlockCopy(block.offset, block.size, block.hash, *source))
        return tuple(copies)


def _parents(path: str) -> list[str]:
    """Proper ancestors of ``path``, shallowest first."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _live(record: FileRecord | None) -> bool:
    return record is not None and not record.deleted


def _target(unit: _Unit) -> FileRecord:
    return unit.action.record


def _check_structure(
    units: dict[str, _Unit],
    local: Mapping[str, FileRecord],
    live_below: Callable[[str], int],
    problems: list[Problem],
) -> None:
    """Drop the actions that would break the tree, reporting each (module docstring, step 4).

    ``local`` holds the records of the units' paths and their ancestors; ``live_below``
    counts the live local entries below a directory (``LocalContext.live_below``).
    """

    def final(path: str) -> FileRecord | None:
        unit = units.get(path)
        return _target(unit) if unit is not None else local.get(path)

    def holders() -> Callable[[str], bool]:
        """Whether a directory keeps live entries once the units are applied: live local
        entries below it that no unit changes, or a unit's live target or conflict copy."""
        replaced: dict[str, int] = {}  # live local entries below a directory that units change
        created: set[str] = set()
        for path, unit in units.items():
            if _live(local.get(path)):
                for parent in _parents(path):
                    replaced[parent] = replaced.get(parent, 0) + 1
            if _live(_target(unit)):
                created.update(_parents(path))
            if unit.conflict is not None:
                created.update(_parents(unit.conflict.conflict_name))

        def holds(path: str) -> bool:
            return path in created or live_below(path) > replaced.get(path, 0)

        return holds

    holds = holders()
    # A non-directory replacing a local directory that keeps live entries: keep the directory.
    for path in sorted(units):
        target, mine = _target(units[path]), local.get(path)
        replaces_dir = _live(mine) and mine is not None and mine.type is EntryType.DIR
        if replaces_dir and _live(target) and target.type is not EntryType.DIR and holds(path):
            problems.append(Problem(path, ProblemKind.DIR_NOT_EMPTY, "would replace a directory"))
            del units[path]
    # Nothing is created below a non-directory (shallow first, so drops cascade).
    for path in sorted(units, key=lambda p: (p.count("/"), p)):
        if not _live(_target(units[path])):
            continue
        for parent in _parents(path):
            above = final(parent)
            if _live(above) and above is not None and above.type is not EntryType.DIR:
                problems.append(Problem(path, ProblemKind.PARENT_NOT_DIR, parent))
                del units[path]
                break
    # A directory that keeps live entries is not deleted.
    holds = holders()
    for path in sorted(units):
        unit, mine = units[path], local.get(path)
        is_dir = _live(mine) and mine is not None and mine.type is EntryType.DIR
        if isinstance(unit.action, Delete) and is_dir and holds(path):
            problems.append(Problem(path, ProblemKind.DIR_NOT_EMPTY, "keeps live entries"))
            del units[path]


_RANK = {Conflict: 0, MakeDir: 1, BuildFromLocal: 2, MakeSymlink: 3, Fetch: 4, SetMetadata: 5}


def _order(
    actions: list[Action], local: Mapping[str, FileRecord], priority: Collection[str]
) -> list[Action]:
    """Topological sort of the commit dependencies, ties broken by phase and key."""
    wanted = set(priority)

    def prioritized(path: str) -> bool:
        return path in wanted or any(p in wanted for p in _parents(path))

    def key(action: Action) -> tuple[object, ...]:
        path = action.path
        depth = path.count("/")
        if isinstance(action, Delete):
            return (6, -depth, action.record.type is EntryType.DIR, path)
        if isinstance(action, MakeDir):
            return (1, depth, path)
        if isinstance(action, Fetch):
            return (4, not prioritized(path), action.record.size, path)
        return (_RANK[type(action)], path)

    creators: dict[str, int] = {}  # path → index of the action creating a directory there
    replacers: dict[str, int] = {}  # path → index of a non-dir replacing a local directory
    deleters: dict[str, int] = {}
    conflicts: dict[str, int] = {}
    for i, action in enumerate(actions):
        mine = local.get(action.path)
        if isinstance(action, Conflict):
            conflicts[action.path] = i
        elif isinstance(action, Delete):
            deleters[action.path] = i
        elif isinstance(action, MakeDir):
            creators[action.path] = i
        elif isinstance(action, Fetch | BuildFromLocal | MakeSymlink) and (
            _live(mine) and mine is not None and mine.type is EntryType.DIR
        ):
            replacers[action.path] = i
    after: list[list[int]] = [[] for _ in actions]  # after[i]: actions that wait for i
    waiting = [0] * len(actions)

    def edge(first: int, then: int) -> None:
        after[first].append(then)
        waiting[then] += 1

    for i, action in enumerate(actions):
        path = action.path
        if isinstance(action, Delete):
            for parent in _parents(path):
                j = deleters.get(parent, replacers.get(parent))
                if j is not None:
                    edge(i, j)
            continue
        if isinstance(action, SetMetadata):
            continue
        if not isinstance(action, Conflict) and path in conflicts:
            edge(conflicts[path], i)
        for parent in _parents(path):
            j = creators.get(parent)
            if j is not None and j != i:
                edge(j, i)
            j = deleters.get(parent)
            if j is not None and not isinstance(action, Conflict):  # a file where a dir goes
                edge(j, i)
    ready = [(key(a), i) for i, a in enumerate(actions) if waiting[i] == 0]
    heapq.heapify(ready)
    ordered: list[Action] = []
    while ready:
        _, i = heapq.heappop(ready)
        ordered.append(actions[i])
        for j in after[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (key(actions[j]), j))
    if len(ordered) != len(actions):  # pragma: no cover - the edges form no cycle
        raise AssertionError("cycle in plan dependencies")
    return ordered


def _withhold_deletions(
    actions: list[Action], local: Mapping[str, FileRecord]
) -> tuple[list[Action], list[Action]]:
    """Split off every deletion and every action that must wait for one."""
    held = {a.path for a in actions if isinstance(a, Delete)}
    kept: list[Action] = []
    withheld: list[Action] = []
    for action in actions:
        mine = local.get(action.path)
        creates = isinstance(action, Fetch | BuildFromLocal | MakeSymlink | MakeDir)
        needs_delete = creates and (
            any(p in held for p in _parents(action.path))
            or (
                _live(mine)
                and mine is not None
                and mine.type is EntryType.DIR
                and any(p.startswith(action.path + "/") for p in held)
            )
        )
        if isinstance(action, Delete) or needs_delete:
            withheld.append(action)
        else:
            kept.append(action)
    return kept, withheld


def _mark_moves(actions: list[Action]) -> list[Action]:
    """Set ``moved_from`` where a build copies one whole file that the plan deletes."""
    deleted = {
        a.path: a.replaces for a in actions if isinstance(a, Delete) and a.replaces is not None
    }
    uses: dict[str, int] = {}
    for action in actions:
        if isinstance(action, BuildFromLocal):
            for path in {c.source_path for c in action.copies}:
                uses[path] = uses.get(path, 0) + 1
    out: list[Action] = []
    for action in actions:
        if isinstance(action, BuildFromLocal) and action.copies:
            origin = {c.source_path for c in action.copies}
            source = min(origin)
            old = deleted.get(source)
            if (
                len(origin) == 1
                and old is not None
                and uses[source] == 1
                and (old.size, old.file_hash) == (action.record.size, action.record.file_hash)
                and all(c.offset == c.source_offset for c in action.copies)
            ):
                action = replace(action, moved_from=source)
        out.append(action)
    return out
