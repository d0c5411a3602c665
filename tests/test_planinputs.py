"""What a planning pass reads (lanshare/planinputs.py): only the paths a peer holds otherwise,
on a real index, and over real engines a folder in sync decodes nothing to plan."""

from __future__ import annotations

import asyncio
import hashlib
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
    inputs = planinputs.load(db, folder)
    assert (inputs.local, inputs.remotes) == ({}, {})
    assert inputs.context.live_count == 110
    assert _narrow(inputs) == planner.Plan(live_entries=110)
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
    inputs = planinputs.load(db, folder)
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
    inputs = planinputs.load(db, folder, {"d4/f4"})
    assert sorted(inputs.local) == ["d4", "d4/f4"]
    assert sorted(inputs.remotes) == [PEER_A, PEER_B]


def test_conflict_copies_are_found_by_name(db: Index) -> None:
    folder = db.add_folder("/srv/share", "00" * 16).id
    copy = "a.sync-conflict-20240101-120000-0123abcd.txt"
    not_copy = "notes about .sync-conflict- names.txt"
    db.commit_changes(folder, [LocalChange(_file(p, b"x")) for p in (copy, not_copy, "a.txt")])
    assert planinputs.load(db, folder).conflict_copies == {copy}


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
