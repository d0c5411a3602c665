"""What a planning pass reads (lanshare/planinputs.py): only the paths a peer holds otherwise,
on a real index, and over real engines a folder in sync decodes nothing to plan."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from lanshare import index as index_module
from lanshare import planinputs, planner
from lanshare.index import Index, LocalChange
from lanshare.manifest import Block, EntryType, FileRecord, VersionVector
from tests.enginesim import Cluster, converge

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

ME = 0x1111
PEER_A = bytes.fromhex("a1a1a1a1a1a1a1a1")
PEER_B = bytes.fromhex("b2b2b2b2b2b2b2b2")
PEER_SHORT = int.from_bytes(PEER_A, "big")


def _file(path: str, content: bytes) -> FileRecord:
    blocks = tuple(
        Block(i, len(content[i : i + 4]), hashlib.sha256(content[i : i + 4]).digest())
        for i in range(0, len(content), 4)
    )
    return FileRecord(
        path=path,
        type=EntryType.FILE,
        size=len(content),
        mtime_ns=1_700_000_000_000_000_000,
        mode=0o644,
        blocks=blocks,
        file_hash=hashlib.sha256(content).digest(),
        hash_algo="sha256",
        version=VersionVector().bump(ME),
    )


def _dir(path: str) -> FileRecord:
    return FileRecord(path=path, type=EntryType.DIR, mode=0o755, version=VersionVector().bump(ME))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Index]:
    with Index.open(tmp_path / "index.sqlite3") as index:
        yield index


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the records the index decodes (its one decoder, counted)."""
    paths: list[str] = []
    real: Callable[[Any], FileRecord] = index_module._record

    def counting(row: Any) -> FileRecord:
        paths.append(row[0])
        return real(row)

    monkeypatch.setattr(index_module, "_record", counting)
    return paths


def _folder_in_sync(db: Index) -> tuple[int, list[FileRecord]]:
    """A folder of 10 directories of 10 files, which two peers hold exactly as we do."""
    folder = db.add_folder("/srv/share", "00" * 16).id
    records = [_dir(f"d{i}") for i in range(10)]
    records += [_file(f"d{i}/f{j}", f"{i}-{j}".encode()) for i in range(10) for j in range(10)]
    stored = db.commit_changes(folder, [LocalChange(r) for r in records])
    for peer in (PEER_A, PEER_B):
        db.remote_upsert(folder, peer, [replace(r, sequence=i + 1) for i, r in enumerate(stored)])
    return folder, stored


def _everything(db: Index, folder: int) -> planner.Plan:
    local = {r.path: r for r in db.iter_records(folder)}
    remotes = {
        p.peer: {r.path: r for r in db.remote_records(folder, p.peer)}
        for p in db.remote_peers(folder)
    }
    return planner.plan(local, remotes, local_short_id=ME)


def _narrow(inputs: planinputs.PlanInputs) -> planner.Plan:
    return planner.plan(inputs.local, inputs.remotes, local_short_id=ME, context=inputs.context)


def test_a_folder_in_sync_decodes_no_record(db: Index, decoded: list[str]) -> None:
    folder, _ = _folder_in_sync(db)
    decoded.clear()
    assert list(planinputs.batches(db, folder)) == []
    assert decoded == []


def test_only_what_a_peer_changed_is_decoded_and_planned_the_same(
    db: Index, decoded: list[str]
) -> None:
    """One file changed by a peer, one renamed (its blocks are here under the old name), one
    deleted: the records of those paths and of their directories are read, nothing else,
    and the plan is the one every record gives."""
    folder, stored = _folder_in_sync(db)
    by_path = {r.path: r for r in stored}
    newer = VersionVector().bump(ME).bump(PEER_SHORT)
    changed = replace(_file("d1/f1", b"new content"), version=newer, sequence=200)
    moved = replace(by_path["d2/f2"], path="d3/moved", version=newer, sequence=201)
    gone = by_path["d2/f2"].tombstone(newer, 202)
    db.remote_upsert(folder, PEER_A, [changed, moved, gone])
    decoded.clear()
    (inputs,) = planinputs.batches(db, folder)
    assert sorted(decoded) == sorted(
        ["d1", "d1/f1", "d1/f1", "d1/f1", "d2", "d2/f2", "d2/f2", "d2/f2", "d3", "d3/moved"]
    )
    assert sorted(inputs.local) == ["d1", "d1/f1", "d2", "d2/f2", "d3"]
    assert {peer: sorted(records) for peer, records in inputs.remotes.items()} == {
        PEER_A: ["d1/f1", "d2/f2", "d3/moved"],
        PEER_B: ["d1/f1", "d2/f2"],
    }
    narrow = _narrow(inputs)
    assert [(type(a).__name__, a.path) for a in narrow.actions] == [
        ("BuildFromLocal", "d3/moved"),
        ("Fetch", "d1/f1"),
        ("Delete", "d2/f2"),
    ]
    assert narrow == _everything(db, folder)


def test_paths_the_caller_adds_are_planned_too(db: Index) -> None:
    """A download in progress at a peer: its path is read even if the stored records agree."""
    folder, _ = _folder_in_sync(db)
    (inputs,) = planinputs.batches(db, folder, {"d4/f4"})
    assert sorted(inputs.local) == ["d4", "d4/f4"]
    assert sorted(inputs.remotes) == [PEER_A, PEER_B]


def test_conflict_copies_are_found_by_name(db: Index) -> None:
    folder = db.add_folder("/srv/share", "00" * 16).id
    copy = "a.sync-conflict-20240101-120000-0123abcd.txt"
    not_copy = "notes about .sync-conflict- names.txt"
    db.commit_changes(folder, [LocalChange(_file(p, b"x")) for p in (copy, not_copy, "a.txt")])
    assert planinputs.conflict_copies(db, folder) == {copy}


def test_engines_in_sync_plan_without_decoding_a_record(tmp_path: Path, decoded: list[str]) -> None:
    """Two real engines share a folder; once in sync, a planning pass of either reads no
    record of it (before: every local and every remote record, at every pass)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=5) as cluster:
            a, b = cluster.add(), cluster.add()
            for i in range(6):
                for j in range(8):
                    a.write(f"d{i}/f{j}.bin", f"{i} {j}".encode() * 50)
            await cluster.start()
            await converge([a, b], 60)
            for node in (a, b):
                decoded.clear()
                await node.folder.plan_and_apply()
                assert decoded == []
                assert node.folder.status()["state"] == "in_sync"

    asyncio.run(main())


def _peer_announces(db: Index, folder: int, count: int) -> None:
    """PEER_A announces ``count`` directories we lack, stored as the exchange stores them
    (batches of 2000). Directories: cheap to plan, so the pass's own memory shows."""
    version = VersionVector().bump(PEER_SHORT)
    for start in range(0, count, 2000):
        db.remote_upsert(
            folder,
            PEER_A,
            [
                replace(_dir(f"junk/{n:07d}"), version=version, sequence=n)
                for n in range(start + 1, min(count, start + 2000) + 1)
            ],
        )


def _a_pass(db: Index, folder: int) -> list[str]:
    """What the engine's planning pass reads and decides, without applying anything: the
    deletions counted first, then every batch planned. The paths of the actions."""

    def plan(inputs: planinputs.PlanInputs, whole: planner.PassDeletions | None) -> planner.Plan:
        return planner.plan(
            inputs.local,
            inputs.remotes,
            local_short_id=ME,
            context=inputs.context,
            allow_mass_delete=whole is None,
            whole_pass=whole,
        )

    whole = planinputs.deletions(db, folder, (), lambda i: plan(i, None), ME)
    made = []
    for inputs in planinputs.batches(db, folder):
        actions = plan(inputs, whole).actions
        assert all(isinstance(a, planner.MakeDir) for a in actions)
        made += [a.path for a in actions[:1]]  # bounded: one per batch
    return made


def test_a_passs_peak_memory_does_not_grow_with_the_records_a_peer_announces(
    tmp_path: Path,
) -> None:
    """A peer announces 10,000 entries, then (another node) 100,000: the peak memory of a
    planning pass over them stays the same, within a margin (before: every record decoded
    and planned at once, ten times the peak)."""
    peaks: dict[int, int] = {}
    for count in (10_000, 100_000):
        with Index.open(tmp_path / f"{count}.sqlite3") as db:
            folder = db.add_folder("/srv/share", "00" * 16).id
            _peer_announces(db, folder, count)
            tracemalloc.start()
            try:
                firsts = _a_pass(db, folder)
                peaks[count] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            batch = planinputs.BATCH_PATHS
            assert firsts == [f"junk/{n:07d}" for n in range(1, count + 1, batch)]
    assert peaks[100_000] < 1.25 * peaks[10_000], peaks


def test_batches_hold_each_path_once_and_count_the_deletions_of_everything(
    db: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With batches of 7 paths: the extra paths come first, every path to plan is in exactly
    one batch, the plans of the batches make the actions one plan of everything makes, and
    the deletions counted first are those of that one plan."""
    monkeypatch.setattr(planinputs, "BATCH_PATHS", 7)
    folder, stored = _folder_in_sync(db)
    newer = VersionVector().bump(ME).bump(PEER_SHORT)
    gone = [r.tombstone(newer, 300 + i) for i, r in enumerate(stored) if r.path.endswith("3")]
    new = [replace(_file(f"n{i:02}", b"n"), version=newer, sequence=400 + i) for i in range(20)]
    db.remote_upsert(folder, PEER_A, gone + new)
    batches = list(planinputs.batches(db, folder, {"d4/f4"}))
    assert batches[0].paths == {"d4/f4"}
    assert all(len(b.paths) <= 7 for b in batches)
    planned = [p for b in batches for p in sorted(b.paths)]
    assert sorted(planned) == sorted({r.path for r in gone + new} | {"d4/f4"})
    assert len(planned) == len(set(planned))
    actions = {a for b in batches for a in _narrow(b).actions}
    assert actions == set(_everything(db, folder).actions)

    def plan(inputs: planinputs.PlanInputs) -> planner.Plan:
        return planner.plan(inputs.local, inputs.remotes, local_short_id=ME, context=inputs.context)

    whole = planinputs.deletions(db, folder, (), plan, ME)
    assert whole.live == 110
    assert whole.counts == planner.deletions(_everything(db, folder).actions, ME)
    assert whole.counts == {PEER_A: 10}  # d*/f3 (d3 keeps live entries)


def test_a_pass_hands_on_a_bounded_number_of_fetches_and_every_one_it_must() -> None:
    records = {
        f"f{i}": replace(_file(f"f{i}", str(i).encode()), version=VersionVector().bump(PEER_SHORT))
        for i in range(2 * planinputs.FETCHES_PER_PASS)
    }
    remotes = {PEER_A: records}
    fetches = planinputs.Fetches(
        lambda path: path == "f3" or path.endswith("7"),  # downloads in hand: never cut
        lambda path: path.endswith("1"),  # failed lately: a budget of their own
    )
    for path, record in records.items():
        fetches.offer(planner.Fetch(path, record, (PEER_A,)), None, remotes)
    chosen = [f.path for f, _ in fetches.chosen]
    assert fetches.cut
    assert fetches.others == planinputs.FETCHES_PER_PASS
    assert fetches.failed == len(records) // 10
    assert "f3" in chosen
    assert f"f{2 * planinputs.FETCHES_PER_PASS - 2}" not in chosen  # past the budget
    assert all(f"f{n}" in chosen for n in range(7, len(records), 10))
    assert all(f"f{n}" in chosen for n in range(1, len(records), 10))
    assert fetches.remotes == {PEER_A: {p: records[p] for p in chosen}}


def test_a_conflict_copy_never_takes_a_name_a_peer_holds_in_another_batch(
    db: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of one path: the name a conflict copy would get is held by a peer, in a later
    batch (it sorts after the original); the copy takes the next free name, as one plan of
    everything would."""
    monkeypatch.setattr(planinputs, "BATCH_PATHS", 1)
    folder = db.add_folder("/srv/share", "00" * 16).id
    (mine,) = db.commit_changes(folder, [LocalChange(_file("a.md", b"mine"))])
    theirs = replace(
        _file("a.md", b"theirs"),
        mtime_ns=mine.mtime_ns + 1,
        version=VersionVector().bump(PEER_SHORT),
        sequence=1,
    )
    name = planner.conflict_name("a.md", mine, theirs)
    assert name > "a.md"
    db.remote_upsert(folder, PEER_A, [theirs, replace(_file(name, b"x"), sequence=2)])
    first, *_ = planinputs.batches(db, folder)
    assert first.paths == {"a.md"}
    (conflict,) = [a for a in _narrow(first).actions if isinstance(a, planner.Conflict)]
    (everything,) = [a for a in _everything(db, folder).actions if isinstance(a, planner.Conflict)]
    assert conflict.conflict_name == everything.conflict_name != name
