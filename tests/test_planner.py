"""Tests of the sync planner: global version, conflicts, tombstones, guard, order, idempotence."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from lanshare.deleteguard import LOCAL, Deletion, Limits
from lanshare.manifest import Block, EntryType, FileRecord, VersionVector
from lanshare.planner import (
    BuildFromLocal,
    Conflict,
    Delete,
    Fetch,
    LocalContext,
    MakeSymlink,
    PassDeletions,
    Plan,
    ProblemKind,
    SetMetadata,
    conflict_name,
    deletion_origin,
    deletions,
    global_winner,
    plan,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

L = 0x1122334455667788  # this node's short id
B = 0xB0B0B0B0B0B0B0B0
C = 0xC0C0C0C0C0C0C0C0
PEER_B = B.to_bytes(8, "big")
PEER_C = C.to_bytes(8, "big")
T0 = 1_700_000_000 * 10**9
BLOCK = 4


def vv(**counters: int) -> VersionVector:
    ids = {"L": L, "B": B, "C": C}
    return VersionVector.of({ids[k]: v for k, v in counters.items()})


def blocks_of(content: bytes) -> tuple[Block, ...]:
    return tuple(
        Block(i, len(content[i : i + BLOCK]), hashlib.sha256(content[i : i + BLOCK]).digest())
        for i in range(0, len(content), BLOCK)
    )


def file(
    path: str, content: bytes, version: VersionVector, mtime: int = T0, mode: int = 0o644
) -> FileRecord:
    return FileRecord(
        path=path,
        type=EntryType.FILE,
        size=len(content),
        mtime_ns=mtime,
        mode=mode,
        blocks=blocks_of(content),
        file_hash=hashlib.sha256(content).digest(),
        hash_algo="sha256",
        version=version,
    )


def folder(path: str, version: VersionVector, mode: int = 0o755) -> FileRecord:
    return FileRecord(path=path, type=EntryType.DIR, mtime_ns=T0, mode=mode, version=version)


def link(path: str, target: str, version: VersionVector) -> FileRecord:
    return FileRecord(path=path, type=EntryType.SYMLINK, symlink_target=target, version=version)


def tomb(record: FileRecord, version: VersionVector) -> FileRecord:
    return record.tombstone(version, 0)


def index(*records: FileRecord) -> dict[str, FileRecord]:
    return {r.path: r for r in records}


def run(
    local: Mapping[str, FileRecord],
    remotes: Mapping[bytes, Mapping[str, FileRecord]],
    **kw: Any,
) -> Plan:
    return plan(local, remotes, local_short_id=L, **kw)


def kinds(p: Plan) -> list[tuple[str, str]]:
    return [(type(a).__name__, a.path) for a in p.actions]


# --- global version ---------------------------------------------------------------------------


def test_dominating_remote_version_is_fetched_and_the_old_file_archived():
    mine = file("f", b"old content", vv(L=1))
    theirs = file("f", b"new content!", vv(L=1, B=1))
    p = run(index(mine), {PEER_B: index(theirs), PEER_C: index(mine)})
    assert p.actions == (Fetch("f", theirs, (PEER_B,), archive=True, replaces=mine),)


def test_fetch_sources_are_the_peers_with_exactly_that_version():
    theirs = file("f", b"data", vv(B=2))
    older = file("f", b"dat", vv(B=1))
    p = run({}, {PEER_B: index(theirs), PEER_C: index(older), b"\x01" * 8: index(theirs)})
    (fetch,) = p.actions
    assert isinstance(fetch, Fetch)
    assert fetch.sources == (b"\x01" * 8, PEER_B)
    assert not fetch.archive
    assert fetch.replaces is None


def test_local_changes_unknown_to_peers_are_untouched():
    ours = file("mine-only", b"x", vv(L=1))
    newer = file("shared", b"new", vv(B=1, L=1))
    p = run(index(ours, newer), {PEER_B: index(file("shared", b"old", vv(B=1)))})
    assert p.actions == ()


def test_equal_records_need_nothing():
    r = file("f", b"same", vv(B=1))
    assert run(index(replace(r, sequence=7)), {PEER_B: index(r)}).actions == ()


def test_metadata_only_change_sets_metadata():
    mine = file("f", b"same", vv(B=1))
    theirs = replace(mine, mode=0o755, version=vv(B=2))
    assert run(index(mine), {PEER_B: index(theirs)}).actions == (
        SetMetadata("f", theirs, replaces=mine),
    )


def test_tie_break_is_independent_of_the_order_of_candidates():
    records = [
        file("f", b"one", vv(L=1, B=1), mtime=T0),
        file("f", b"two", vv(B=2), mtime=T0),
        file("f", b"three", vv(C=1, B=1), mtime=T0),
        tomb(file("f", b"", vv()), vv(B=1, C=5)),
    ]
    winners = {global_winner(perm) for perm in itertools.permutations(records)}
    assert len(winners) == 1


def test_newer_mtime_wins_a_concurrent_edit():
    a = file("f", b"a", vv(B=1, L=1), mtime=T0 + 5)
    b = file("f", b"b", vv(B=2), mtime=T0)
    assert global_winner([a, b]) == a
    assert global_winner([b, replace(a, mtime_ns=T0 - 1)]) == b


def test_a_modification_beats_a_concurrent_deletion():
    edited = file("f", b"edited", vv(B=1, L=1), mtime=T0)
    deleted = tomb(edited, vv(B=2))
    assert global_winner([deleted, edited]) == edited
    # Our deletion loses to their concurrent edit: we fetch it back.
    p = run(index(tomb(edited, vv(B=1, L=1))), {PEER_B: index(file("f", b"e2", vv(B=2)))})
    assert kinds(p) == [("Fetch", "f")]
    # Their deletion loses to our edit: nothing to do here.
    assert run(index(edited), {PEER_B: index(deleted)}).actions == ()


# --- conflicts --------------------------------------------------------------------------------


def test_concurrent_edit_keeps_the_loser_as_a_named_conflict_copy():
    mtime = int(datetime(2024, 3, 5, 6, 7, 8, 999_000, tzinfo=UTC).timestamp()) * 10**9
    mine = file("docs/report.final.txt", b"my edit", vv(B=1, L=1), mtime=mtime)
    theirs = file("docs/report.final.txt", b"their edit", vv(B=2), mtime=mtime + 10**9)
    p = run(index(folder("docs", vv(B=1)), mine), {PEER_B: index(folder("docs", vv(B=1)), theirs)})
    conflict, fetch = p.actions
    expected = "docs/report.final.sync-conflict-20240305-060708-11223344.txt"
    assert conflict == Conflict(
        "docs/report.final.txt",
        theirs,
        mine,
        expected,
        replace(mine, path=expected, version=vv(L=1)),
    )
    merged = replace(theirs, version=vv(B=2, L=1))
    assert fetch == Fetch(mine.path, merged, (PEER_B,), archive=False, replaces=mine)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("Makefile", "Makefile.sync-conflict-19700101-000000-b0b0b0b0"),
        (".bashrc", ".bashrc.sync-conflict-19700101-000000-b0b0b0b0"),
        ("a/b.tar.gz", "a/b.tar.sync-conflict-19700101-000000-b0b0b0b0.gz"),
    ],
)
def test_conflict_name_shapes(path, expected):
    loser = file(path, b"x", vv(B=3, C=1), mtime=0)
    winner = file(path, b"y", vv(C=2, B=1))
    assert conflict_name(path, loser, winner) == expected


def test_conflict_name_fits_in_one_component():
    path = "d/" + "é" * 120 + ".txt"
    name = conflict_name(path, file(path, b"x", vv(L=1)), file(path, b"y", vv(B=1)))
    assert len(name.rsplit("/", 1)[1].encode()) <= 255
    assert name.endswith("-11223344.txt")


def test_conflict_name_never_reuses_an_existing_path():
    mine = file("f.txt", b"mine", vv(L=1), mtime=0)
    theirs = file("f.txt", b"theirs", vv(B=1), mtime=1)
    taken = conflict_name("f.txt", mine, theirs)
    p = run(index(mine, file(taken, b"older conflict", vv(L=1))), {PEER_B: index(theirs)})
    conflict = p.actions[0]
    assert isinstance(conflict, Conflict)
    assert conflict.conflict_name == taken.replace("-11223344", "-11223344-2")


def test_concurrent_identical_content_is_not_a_conflict():
    mine = file("f", b"same", vv(B=1, L=1), mtime=T0)
    theirs = replace(mine, version=vv(B=2), mtime_ns=T0 + 1)
    assert kinds(run(index(mine), {PEER_B: index(theirs)})) == [("SetMetadata", "f")]


def test_the_winner_holder_does_nothing_about_the_losers_conflict():
    mine = file("f", b"mine", vv(B=1, L=1), mtime=T0 + 9)
    theirs = file("f", b"theirs", vv(B=2), mtime=T0)
    assert run(index(mine), {PEER_B: index(theirs)}).actions == ()


# --- tombstones and structure -----------------------------------------------------------------


def test_tombstone_that_dominates_deletes_and_archives():
    mine = file("f", b"x", vv(B=1))
    gone = tomb(mine, vv(B=2))
    assert run(index(mine), {PEER_B: index(gone)}).actions == (
        Delete("f", gone, archive=True, replaces=mine),
    )
    assert run(index(tomb(mine, vv(B=1))), {PEER_B: index(gone)}).actions == ()
    assert run({}, {PEER_B: index(gone)}).actions == ()


def test_directories_before_their_contents_and_deletions_deepest_first():
    remote = index(
        folder("a", vv(B=1)),
        folder("a/b", vv(B=1)),
        file("a/b/f", b"data", vv(B=1)),
        link("a/b/l", "f", vv(B=1)),
        file("z", b"zz", vv(B=1)),
    )
    old = [folder("x", vv(B=1)), folder("x/y", vv(B=1)), file("x/y/f", b"1", vv(B=1))]
    local = index(*old)
    remote.update({r.path: tomb(r, vv(B=2)) for r in old})
    p = run(local, {PEER_B: remote})
    order = kinds(p)
    assert order == [
        ("MakeDir", "a"),
        ("MakeDir", "a/b"),
        ("MakeSymlink", "a/b/l"),
        ("Fetch", "z"),
        ("Fetch", "a/b/f"),
        ("Delete", "x/y/f"),
        ("Delete", "x/y"),
        ("Delete", "x"),
    ]
    assert [a.archive for a in p.actions if isinstance(a, Delete)] == [True, False, False]


def test_priority_paths_are_fetched_first_then_small_files():
    remote = index(
        file("big", b"x" * 40, vv(B=1)),
        file("small", b"x" * 3 + b"y", vv(B=1)),
        folder("want", vv(B=1)),
        file("want/huge", b"z" * 80, vv(B=1)),
    )
    p = run({}, {PEER_B: remote}, priority=["want"])
    assert kinds(p) == [
        ("MakeDir", "want"),
        ("Fetch", "want/huge"),
        ("Fetch", "small"),
        ("Fetch", "big"),
    ]


def test_a_directory_replaced_by_a_file_waits_for_its_contents_to_go():
    d, inner = folder("d", vv(B=1)), file("d/f", b"inner", vv(B=1))
    remote = index(file("d", b"now a file", vv(B=2)), tomb(inner, vv(B=2)))
    p = run(index(d, inner), {PEER_B: remote})
    assert kinds(p) == [("Delete", "d/f"), ("Fetch", "d")]
    fetch = p.actions[1]
    assert isinstance(fetch, Fetch)
    assert fetch.replaces == d
    assert not fetch.archive


def test_a_file_where_a_directory_is_needed_goes_first():
    f = file("d", b"file", vv())
    remote = index(tomb(f, vv(B=1, C=1)), file("d/y", b"y", vv(C=1)))
    p = run(index(f), {PEER_B: remote})
    assert kinds(p) == [("Delete", "d"), ("Fetch", "d/y")]


def test_a_directory_holding_local_changes_is_neither_deleted_nor_replaced():
    d, inner, new = folder("d", vv(B=1)), file("d/f", b"1", vv(B=1)), file("d/new", b"n", vv(L=1))
    p = run(index(d, inner, new), {PEER_B: index(tomb(d, vv(B=2)), tomb(inner, vv(B=2)))})
    assert kinds(p) == [("Delete", "d/f")]
    assert [(x.path, x.kind) for x in p.problems] == [("d", ProblemKind.DIR_NOT_EMPTY)]
    p = run(index(d, inner, new), {PEER_B: index(file("d", b"f", vv(B=2)), tomb(inner, vv(B=2)))})
    assert kinds(p) == [("Delete", "d/f")]
    assert [(x.path, x.kind) for x in p.problems] == [("d", ProblemKind.DIR_NOT_EMPTY)]


def test_a_concurrent_directory_that_wins_moves_the_file_aside_first():
    f = file("f", b"a file", vv(L=1))
    p = run(index(f), {PEER_B: index(folder("f", vv(B=1)), file("f/x", b"x", vv(B=1)))})
    assert kinds(p) == [("Conflict", "f"), ("MakeDir", "f"), ("Fetch", "f/x")]


def test_nothing_is_created_below_a_file():
    f = file("f", b"a file", vv(L=1), mtime=T0 + 9)  # newer: our file wins over their dir
    p = run(index(f), {PEER_C: index(folder("f", vv(C=1)), file("f/x", b"x", vv(C=1)))})
    assert p.actions == ()
    assert [(x.path, x.kind, x.detail) for x in p.problems] == [
        ("f/x", ProblemKind.PARENT_NOT_DIR, "f")
    ]


def test_symlinks_are_created_not_fetched():
    lk = link("l", "../outside/is/just/text", vv(B=1))
    assert run({}, {PEER_B: index(lk)}).actions == (MakeSymlink("l", lk),)


@pytest.mark.parametrize(
    "bad", ["../escape", "/abs", "a//b", "a/./b", ".lanshare/versions/x", "d/.lanshare-tmp-1"]
)
def test_rejected_paths_never_get_an_action(bad):
    record = replace(file("ok", b"evil", vv(B=1)), path=bad)
    p = run({}, {PEER_B: {bad: record}})
    assert p.actions == ()
    assert [(x.path, x.kind) for x in p.problems] == [(bad, ProblemKind.INVALID_PATH)]


def test_a_record_filed_under_another_path_is_rejected():
    p = run({}, {PEER_B: {"a": file("b", b"x", vv(B=1))}})
    assert p.actions == ()
    assert [x.kind for x in p.problems] == [ProblemKind.INVALID_PATH]


def test_ignored_paths_are_left_alone():
    remote = index(file("keep", b"k", vv(B=1)), file("skip.tmp", b"s", vv(B=1)))
    p = run({}, {PEER_B: remote}, ignored=lambda path, is_dir: path.endswith(".tmp"))
    assert kinds(p) == [("Fetch", "keep")]


# --- rename / local blocks --------------------------------------------------------------------


def test_rename_is_built_from_local_blocks_before_the_old_name_goes():
    content = b"0123456789abcdefXYZ"
    old = file("old.bin", content, vv(L=1))
    new = file("sub/new.bin", content, vv(B=1))
    remote = index(tomb(old, vv(L=1, B=1)), folder("sub", vv(B=1)), new)
    p = run(index(old), {PEER_B: remote})
    assert kinds(p) == [
        ("MakeDir", "sub"),
        ("BuildFromLocal", "sub/new.bin"),
        ("Delete", "old.bin"),
    ]
    build = p.actions[1]
    assert isinstance(build, BuildFromLocal)
    assert [(c.offset, c.source_path, c.source_offset) for c in build.copies] == [
        (o, "old.bin", o) for o in range(0, len(content), BLOCK)
    ]
    assert build.moved_from == "old.bin"
    assert p.fetch_size == 0


def test_blocks_gathered_from_several_local_files_and_the_file_itself():
    a = file("a", b"AAAABBBB", vv(L=1))
    f = file("f", b"CCCCDDDD", vv(L=1))
    target = file("f", b"DDDDAAAACCCC", vv(L=1, B=1))
    p = run(index(a, f), {PEER_B: index(target)})
    (build,) = p.actions
    assert isinstance(build, BuildFromLocal)
    assert [(c.source_path, c.source_offset) for c in build.copies] == [
        ("f", 4),
        ("a", 0),
        ("f", 0),
    ]
    assert build.archive
    assert build.moved_from is None


def test_a_missing_block_means_fetch():
    a = file("a", b"AAAABBBB", vv(L=1))
    p = run(index(a), {PEER_B: index(file("n", b"AAAAZZZZ", vv(B=1)))})
    assert kinds(p) == [("Fetch", "n")]


def test_empty_file_is_built_locally():
    p = run({}, {PEER_B: index(file("empty", b"", vv(B=1)))})
    assert kinds(p) == [("BuildFromLocal", "empty")]


# --- delete guard -----------------------------------------------------------------------------


def _mass(total: int, deleted: int) -> Plan:
    local = index(*(file(f"f{i:04}", b"x", vv(B=1)) for i in range(total)))
    remote = dict(local)
    for path in list(local)[:deleted]:
        remote[path] = tomb(local[path], vv(B=2))
    remote["new"] = file("new", b"n", vv(B=1))
    return run(local, {PEER_B: remote})


def test_delete_guard_pauses_above_the_ratio_not_at_it():
    below = _mass(200, 100)  # exactly 50 %: not more than the ratio
    assert not below.paused
    assert sum(isinstance(a, Delete) for a in below.actions) == 100
    above = _mass(200, 101)
    assert above.paused
    assert "101 of 200" in above.reason
    assert kinds(above) == [("Fetch", "new")]
    assert len(above.withheld) == 101
    assert all(isinstance(a, Delete) for a in above.withheld)


def test_delete_guard_needs_the_minimum_count():
    assert not _mass(150, 99).paused  # 66 % but fewer than 100
    assert _mass(150, 100).paused


def test_delete_guard_can_be_overridden():
    local = index(*(file(f"f{i}", b"x", vv(B=1)) for i in range(120)))
    remote = {p: tomb(r, vv(B=2)) for p, r in local.items()}
    p = run(local, {PEER_B: remote}, allow_mass_delete=True)
    assert not p.paused
    assert len(p.actions) == 120


def test_delete_guard_judges_a_batch_by_the_deletions_of_its_whole_pass():
    """A pass planned in batches: this batch deletes 10 of 200 entries, the whole pass 150.
    Each batch is paused with the pass's verdict (alone, this one would delete)."""
    local = index(*(file(f"f{i:03}", b"x", vv(B=1)) for i in range(200)))
    batch = {p: tomb(local[p], vv(B=2)) for p in list(local)[:10]}
    batch["new"] = file("new", b"n", vv(B=1))
    alone = run(local, {PEER_B: batch})
    assert not alone.paused
    assert deletions(alone.actions, L) == {PEER_B: 10}
    whole = PassDeletions({PEER_B: 150}, 200)
    held = run(local, {PEER_B: batch}, whole_pass=whole)
    assert held.paused
    assert held.verdict is not None
    assert (held.verdict.deleted, held.verdict.entries) == (150, 200)
    assert kinds(held) == [("Fetch", "new")]
    assert len(held.withheld) == 10
    assert held.live_entries == 200
    # A pass's count short of the batch's own (the folder changed between the count and the
    # batch) never hides the batch's deletions: 10 of 15 entries is more than half.
    limits = Limits(0.5, 5, 3600)
    assert not run(local, {PEER_B: batch}, limits=limits, whole_pass=PassDeletions({}, 20)).paused
    assert run(local, {PEER_B: batch}, limits=limits, whole_pass=PassDeletions({}, 15)).paused


def test_delete_guard_counts_the_window_so_batches_do_not_walk_around_it():
    # 300 files; B deleted 99 of them a minute ago (already applied here) and 99 more now.
    local = index(*(file(f"f{i:03}", b"x", vv(B=1)) for i in range(201)))
    remote = dict(local)
    for path in list(local)[:99]:
        remote[path] = tomb(local[path], vv(B=2))
    now = 1_800_000_000.0
    alone = run(local, {PEER_B: remote}, now=now)
    assert not alone.paused  # judged on its own, 99 deletions pass: the old walk-around
    assert alone.live_entries == 201
    history = [Deletion(now - 60, PEER_B, 99, 300)]
    held = run(local, {PEER_B: remote}, delete_history=history, now=now)
    assert held.paused
    assert held.verdict is not None
    assert (held.verdict.deleted, held.verdict.entries) == (198, 300)
    assert held.verdict.origins == ((PEER_B, 198),)
    assert "198 of 300 entries" in held.reason
    assert PEER_B.hex() in held.reason
    assert not any(isinstance(a, Delete) for a in held.actions)
    assert len(held.withheld) == 99
    # Once the earlier batch left the window, the same deletions go through.
    later = run(local, {PEER_B: remote}, delete_history=history, now=now + 3600)
    assert not later.paused
    short = run(local, {PEER_B: remote}, delete_history=history, now=now, limits=Limits(window=30))
    assert not short.paused
    # The user confirmed (``lanshare resume``): the window is not consulted.
    confirmed = run(
        local, {PEER_B: remote}, delete_history=history, now=now, allow_mass_delete=True
    )
    assert not confirmed.paused
    assert sum(isinstance(a, Delete) for a in confirmed.actions) == 99


def test_a_deletion_is_attributed_to_the_device_that_made_it():
    mine = file("a", b"x", vv(B=1, L=1))
    by_c = tomb(mine, vv(B=1, L=1, C=1))
    # C deleted it; B only passes C's tombstone on: the deletion is still C's.
    p = run(index(mine), {PEER_B: index(by_c)})
    (delete,) = [a for a in p.actions if isinstance(a, Delete)]
    assert deletion_origin(delete, L) == PEER_C
    ours = tomb(mine, vv(B=1, L=2))  # our own tombstone, come back (e.g. an index reset)
    (delete,) = run(index(mine), {PEER_B: index(ours)}).actions
    assert isinstance(delete, Delete)
    assert deletion_origin(delete, L) == LOCAL


# --- properties -------------------------------------------------------------------------------

PATHS = ["a.txt", "b", "d", "d/x", "d/y.md", "e/f/g"]
IDS = [L, B, C]


@st.composite
def node_view(draw: st.DrawFn, node: int) -> dict[str, FileRecord]:
    view: dict[str, FileRecord] = {}
    for path in PATHS:
        state = draw(st.sampled_from(["absent", "live", "deleted", "link"]))
        if state == "absent":
            continue
        counters = {i: draw(st.integers(0, 3)) for i in IDS}
        counters[node] = max(counters[node], draw(st.integers(0, 1)))
        version = VersionVector.of(counters)
        mtime = T0 + draw(st.integers(0, 2)) * 10**9
        content = draw(st.sampled_from([b"", b"abcd", b"abcdefgh", b"efgh", b"zz"]))
        record = file(path, content, version, mtime=mtime, mode=draw(st.sampled_from([420, 493])))
        if state == "deleted":
            record = tomb(record, version)
        elif state == "link":
            record = link(path, content.decode() or "t", version)
        view[path] = record
    for path in list(view):  # parents of live entries are live directories
        if view[path].deleted:
            continue
        for parent in _ancestors(path):
            view[parent] = folder(parent, VersionVector.of({node: 1}))
    return view


def _brief(r: FileRecord) -> str:
    what = "deleted" if r.deleted else r.symlink_target or r.file_hash[:2].hex()
    ids = {L: "L", B: "B", C: "C"}
    version = ",".join(f"{ids[d]}{c}" for d, c in r.version.counters)
    return f"{r.type.name} {what} {{{version}}} t{(r.mtime_ns - T0) // 10**9} m{r.mode:o}"


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _apply(local: dict[str, FileRecord], p: Plan) -> dict[str, FileRecord]:
    """The index after the engine applied ``p``, checking each step against a disk model."""
    disk = {path: r.type for path, r in local.items() if not r.deleted}
    out = dict(local)

    def place(path: str, kind: EntryType) -> None:
        for parent in _ancestors(path):
            assert disk.setdefault(parent, EntryType.DIR) is EntryType.DIR, (path, parent)
        if disk.get(path) is EntryType.DIR and kind is not EntryType.DIR:
            assert not any(q.startswith(path + "/") for q in disk), f"{path} not empty"
        disk[path] = kind

    for action in p.actions:
        if isinstance(action, Conflict):
            assert disk.pop(action.path) is EntryType.FILE
            place(action.conflict_name, EntryType.FILE)
            out[action.conflict_name] = action.copy_record
            continue
        if isinstance(action, Delete):
            if disk.pop(action.path, None) is EntryType.DIR:
                assert not any(q.startswith(action.path + "/") for q in disk), action.path
        elif isinstance(action, SetMetadata):
            assert disk[action.path] is action.record.type
        else:
            place(action.path, action.record.type)
        out[action.path] = action.record
    return out


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_property_nothing_lost_order_valid_and_idempotent(data):
    local = data.draw(node_view(L))
    remotes = {PEER_B: data.draw(node_view(B)), PEER_C: data.draw(node_view(C))}
    p = run(local, remotes)
    for name, view in [("local", local), ("B", remotes[PEER_B]), ("C", remotes[PEER_C])]:
        note(f"{name}: {sorted((r.path, _brief(r)) for r in view.values())}")
    note(f"plan: {[(type(a).__name__, a.path) for a in p.actions]} {p.problems}")
    remote_paths = set(remotes[PEER_B]) | set(remotes[PEER_C])
    conflicts = {a.path for a in p.actions if isinstance(a, Conflict)}
    for action in p.actions:
        # Local records no peer knows about are never touched.
        assert action.path in remote_paths
        mine = local.get(action.path)
        if isinstance(action, Conflict) or mine is None or mine.deleted:
            continue
        assert action.replaces == mine
        if mine.type is EntryType.DIR or isinstance(action, SetMetadata):
            continue
        # Every live local file or link replaced or removed is archived or kept as a copy.
        assert action.archive or action.path in conflicts, action
    after = _apply(local, p)
    again = run(after, remotes)
    assert again.actions == ()
    assert again.problems == p.problems


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_property_winner_is_the_same_from_every_node(data):
    views = [data.draw(node_view(n)) for n in IDS]
    for path in PATHS:
        records = [v[path] for v in views if path in v]
        if records:
            assert global_winner(records) == global_winner(reversed(records))


def _differing(
    local: Mapping[str, FileRecord], remotes: Mapping[bytes, Mapping[str, FileRecord]]
) -> set[str]:
    """The paths some peer holds another record of than ``local`` (``Index.paths_to_plan``)."""
    return {
        path
        for view in remotes.values()
        for path, record in view.items()
        if path not in local or replace(local[path], sequence=record.sequence) != record
    }


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_property_the_paths_peers_hold_otherwise_and_a_context_plan_the_same(data):
    """What the engine passes (the records of the paths some peer holds another record of,
    with their ancestors, and the rest as a context) plans exactly what every record does."""
    local = data.draw(node_view(L))
    remotes = {PEER_B: data.draw(node_view(B)), PEER_C: data.draw(node_view(C))}
    for peer in (PEER_B, PEER_C):  # peers in sync with us on some paths
        for path in data.draw(st.sets(st.sampled_from(sorted(local)))) if local else ():
            remotes[peer][path] = replace(local[path], sequence=7)
    history = [Deletion(T0 / 1e9, LOCAL, data.draw(st.integers(0, 3)) or 1, 10)]
    settings_ = {"delete_history": history, "now": T0 / 1e9, "limits": Limits(0.3, 2, 3600)}
    everything = run(local, remotes, **settings_)
    paths = _differing(local, remotes)
    wanted = paths | {a for p in paths for a in _ancestors(p)}
    narrow_local = {p: r for p, r in local.items() if p in wanted}
    narrow_remotes = {k: {p: r for p, r in v.items() if p in paths} for k, v in remotes.items()}
    note(f"paths to plan: {sorted(paths)}")
    narrow = run(narrow_local, narrow_remotes, context=LocalContext.of(local), **settings_)
    assert narrow == everything


def test_a_context_answers_what_the_records_would():
    """``LocalContext.of``: live count and entries below a directory count live records
    only; a block is found in the first file in path order, of the same algorithm and size."""
    ab = file("z/ab", b"abcd" + b"efgh", vv(L=1))
    local = index(
        folder("z", vv(L=1)),
        ab,
        file("m/cd", b"abcd", vv(L=1)),
        tomb(file("a/gone", b"abcd", vv(L=1)), vv(L=2)),
        replace(file("b/other-algo", b"abcd", vv(L=1)), hash_algo="blake3"),
    )
    context = LocalContext.of(local)
    assert context.live_count == 4
    assert (context.live_below("z"), context.live_below("a"), context.live_below("q")) == (1, 0, 0)
    assert context.exists("a/gone")
    assert not context.exists("q")
    first, second = ab.blocks
    assert context.block_source("sha256", first.hash, first.size) == ("m/cd", 0)
    assert context.block_source("sha256", second.hash, second.size) == ("z/ab", 4)
    assert context.block_source("sha256", first.hash, first.size + 1) is None
    assert context.block_source("md5", first.hash, first.size) is None


def test_planner_imports_no_io():
    probe = (
        "import sys, lanshare.planner\n"
        "print(sorted(set(sys.modules) & {'asyncio', 'socket', 'random', 'sqlite3'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
