"""The SQLite index: schema and migrations, local sequences, remote records, blocks, partials."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare import index as index_module
from lanshare.deleteguard import Deletion
from lanshare.errors import StorageError
from lanshare.index import (
    SCHEMA_VERSION,
    CacheUpdate,
    Index,
    LocalChange,
    Partial,
    WrittenBlocks,
)
from lanshare.manifest import Block, EntryType, FileRecord, VersionVector

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ME = 0x1111
PEER_A = bytes.fromhex("a1a1a1a1a1a1a1a1")
PEER_B = bytes.fromhex("b2b2b2b2b2b2b2b2")


def _file(path: str, content: bytes, version: VersionVector | None = None) -> FileRecord:
    size = len(content)
    blocks: tuple[Block, ...] = ()
    step = 4
    for offset in range(0, size, step):
        piece = content[offset : offset + step]
        blocks += (Block(offset, len(piece), hashlib.sha256(piece).digest()),)
    return FileRecord(
        path=path,
        type=EntryType.FILE,
        size=size,
        mtime_ns=1_700_000_000_000_000_000,
        mode=0o644,
        blocks=blocks,
        file_hash=hashlib.sha256(b"".join(b.hash for b in blocks)).digest(),
        hash_algo="sha256",
        version=version or VersionVector().bump(ME),
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Index]:
    with Index.open(tmp_path / "state" / "index.db") as index:
        yield index


def test_open_creates_parents_wal_and_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state" / index_module.DATABASE_NAME
    with Index.open(path) as db:
        assert db.schema_version() == SCHEMA_VERSION
    assert path.exists()
    assert path.stat().st_mode & 0o077 == 0
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        strict = {r[0] for r in conn.execute("SELECT name FROM pragma_table_list WHERE strict = 1")}
    finally:
        conn.close()
    assert {"folders", "local_files", "local_blocks", "remote_files", "partials"} <= tables
    assert tables <= strict


def test_migrations_from_an_empty_database_apply_every_step(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    sqlite3.connect(path).close()  # an empty file, user_version 0
    with Index.open(path) as db:
        assert db.schema_version() == len(index_module.MIGRATIONS)
    # Reopening applies nothing twice.
    with Index.open(path) as db:
        assert db.schema_version() == SCHEMA_VERSION


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    Index.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer lanshare"):
        Index.open(path)


def test_a_file_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError, match=r"index\.db.*move it away"):
        Index.open(path)


def test_an_uncreatable_location_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create"):
        Index.open(blocker / "index.db")


def test_closed_index_raises_storage_error(tmp_path: Path) -> None:
    db = Index.open(tmp_path / "index.db")
    db.close()
    db.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        db.folders()


def test_add_folder_is_idempotent_and_refuses_another_key(db: Index) -> None:
    first = db.add_folder("/srv/a", "00" * 16)
    again = db.add_folder("/srv/a", "00" * 16)
    assert first == again
    assert len(first.index_id) == index_module.INDEX_ID_SIZE
    assert first.sequence == 0
    other = db.add_folder("/srv/b", "11" * 16)
    assert other.id != first.id
    assert other.index_id != first.index_id
    assert [f.path for f in db.folders()] == ["/srv/a", "/srv/b"]
    with pytest.raises(StorageError, match="another folder key"):
        db.add_folder("/srv/a", "22" * 16)


def test_commit_assigns_growing_sequences_and_round_trips(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    a = _file("a.txt", b"hello world")
    d = FileRecord(path="dir", type=EntryType.DIR, mode=0o755, version=VersionVector().bump(ME))
    link = FileRecord(
        path="dir/link", type=EntryType.SYMLINK, symlink_target="../../etc", version=d.version
    )
    stored = db.commit_changes(folder, [LocalChange(a, 7, 8), LocalChange(d), LocalChange(link)])
    assert [r.sequence for r in stored] == [1, 2, 3]
    assert db.get(folder, "a.txt") == stored[0]
    assert db.get(folder, "dir/link") == stored[2]
    assert db.get(folder, "missing") is None
    assert db.max_sequence(folder) == 3

    a2 = _file("a.txt", b"hello there", stored[0].version.bump(ME))
    (again,) = db.commit_changes(folder, [LocalChange(a2)])
    assert again.sequence == 4
    assert [r.path for r in db.records_since(folder, 0)] == ["dir", "dir/link", "a.txt"]
    assert [r.path for r in db.records_since(folder, 3)] == ["a.txt"]
    assert db.records_since(folder, 4) == []
    assert [r.sequence for r in db.records_since(folder, 0, limit=2)] == [2, 3]
    assert [r.path for r in db.iter_records(folder)] == ["a.txt", "dir", "dir/link"]
    assert db.get_many(folder, ["a.txt", "nope", "dir"]).keys() == {"a.txt", "dir"}


def test_sequence_never_goes_back_even_when_rows_disappear(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    db.commit_changes(folder, [LocalChange(_file(f"f{i}", b"x")) for i in range(5)])
    assert db.max_sequence(folder) == 5
    # A tombstone replaces the row holding the highest sequence; the counter keeps growing.
    (tomb,) = db.commit_changes(
        folder, [LocalChange(_file("f4", b"x").tombstone(VersionVector().bump(ME).bump(ME), 0))]
    )
    assert tomb.sequence == 6
    assert tomb.deleted
    assert db.max_sequence(folder) == 6


def test_iter_records_pages_through_large_folders(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    count = index_module._PAGE * 2 + 7
    db.commit_changes(folder, [LocalChange(_file(f"f{i:05d}", b"")) for i in range(count)])
    paths = [r.path for r in db.iter_records(folder)]
    assert paths == sorted(f"f{i:05d}" for i in range(count))


def test_scan_cache_and_cache_only_updates(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    rec = _file("a", b"0123456789")
    db.commit_changes(folder, [LocalChange(rec, inode=11, ctime_ns=22)])
    entry = db.scan_cache(folder)["a"]
    assert (entry.size, entry.inode, entry.ctime_ns, entry.block_count) == (10, 11, 22, 3)
    assert entry.type is EntryType.FILE
    assert not entry.deleted
    before = db.max_sequence(folder)
    db.commit_changes(folder, [], [CacheUpdate("a", 12, 23)])
    entry = db.scan_cache(folder)["a"]
    assert (entry.inode, entry.ctime_ns) == (12, 23)
    assert db.max_sequence(folder) == before  # no new sequence for a cache refresh


def test_block_lookup_follows_content_and_deletion(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    other = db.add_folder("/srv/b", "11" * 16).id
    a = _file("a", b"AAAABBBBCC")
    b = _file("sub/b", b"BBBBAAAA")
    db.commit_changes(folder, [LocalChange(a), LocalChange(b)])
    db.commit_changes(other, [LocalChange(_file("c", b"BBBB"))])
    h_b = hashlib.sha256(b"BBBB").digest()
    found = {(x.path, x.index, x.offset, x.size) for x in db.find_block(h_b, folder)}
    assert found == {("a", 1, 4, 4), ("sub/b", 0, 0, 4)}
    assert {x.folder for x in db.find_block(h_b)} == {folder, other}
    # New content replaces the old blocks; a tombstone has none.
    db.commit_changes(folder, [LocalChange(_file("a", b"CC", a.version.bump(ME)))])
    assert {x.path for x in db.find_block(h_b, folder)} == {"sub/b"}
    db.commit_changes(folder, [LocalChange(b.tombstone(b.version.bump(ME), 0))])
    assert db.find_block(h_b, folder) == []
    assert db.find_block(b"\x00" * 32) == []


def test_first_locations_are_where_find_block_lists_each_hash_first(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    other = db.add_folder("/srv/b", "11" * 16).id
    db.commit_changes(
        folder,
        [LocalChange(_file("z", b"AAAABBBB")), LocalChange(_file("sub/b", b"CCCCBBBBAAAA"))],
    )
    db.commit_changes(other, [LocalChange(_file("a", b"DDDD"))])
    hashes = [hashlib.sha256(x).digest() for x in (b"AAAA", b"BBBB", b"CCCC", b"DDDD")]
    found = db.first_locations(folder, [*hashes, b"\x00" * 32])
    assert set(found) == set(hashes[:3])  # DDDD is only in the other folder
    for h in hashes[:3]:
        assert found[h] == db.find_block(h, folder)[0]
    assert db.first_locations(folder, []) == {}


def test_committed_changes_survive_a_crash_and_a_failed_batch_leaves_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "index.db"
    db = Index.open(path)
    folder = db.add_folder("/srv/a", "00" * 16).id
    db.commit_changes(folder, [LocalChange(_file("kept", b"data"))])
    bad = FileRecord(path="bad", type=EntryType.FILE, size=1, blocks=(Block(0, 1, b"x"),))
    with pytest.raises(StorageError, match="cannot store local changes"):
        db.commit_changes(folder, [LocalChange(_file("lost", b"data")), LocalChange(bad)])
    # Simulate a crash: a second process reads the file while this connection is still open
    # (never closed, never checkpointed).
    probe = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "print(sorted(r[0] for r in c.execute('SELECT path FROM local_files')))\n"
        "print(c.execute('SELECT sequence FROM folders').fetchone()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "['kept']"
    assert out[1] == "1"
    db.close()


def test_killed_writer_loses_only_uncommitted_work(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    Index.open(path).close()
    script = (
        "import os, sys\n"
        "from lanshare.index import Index, LocalChange\n"
        "from lanshare.manifest import EntryType, FileRecord, VersionVector\n"
        "db = Index.open(__import__('pathlib').Path(sys.argv[1]))\n"
        "f = db.add_folder('/srv/a', '00' * 16).id\n"
        "v = VersionVector().bump(1)\n"
        "db.commit_changes(f, [LocalChange(FileRecord('d', EntryType.DIR, version=v))])\n"
        "db._conn.execute('BEGIN IMMEDIATE')\n"
        'db._conn.execute("UPDATE folders SET sequence = 99")\n'
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], check=False, timeout=60)
    assert proc.returncode == -9
    with Index.open(path) as db:
        (folder,) = db.folders()
        assert folder.sequence == 1
        assert db.get(folder.id, "d") is not None


def test_differing_names_a_peers_records_other_than_ours(tmp_path: Path) -> None:
    with Index.open(tmp_path / "index.db") as db:
        folder = db.add_folder("/srv/a", "00" * 16).id
        mine = [_file("same", b"one"), _file("edited", b"two"), _file("touched", b"three")]
        db.commit_changes(folder, [LocalChange(r) for r in mine])
        theirs = [
            replace(mine[0], sequence=99),  # another node numbers its changes its own way
            _file("edited", b"TWO"),
            replace(mine[2], mtime_ns=mine[2].mtime_ns + 1),
            _file("new", b"four"),
        ]
        db.remote_upsert(folder, PEER_A, theirs)
        paths = [r.path for r in theirs]
        assert db.differing(folder, PEER_A, paths) == {"edited", "touched", "new"}
        assert db.differing(folder, PEER_B, paths) == set()  # holds none of them
        assert db.differing(folder, PEER_A, []) == set()
        # The same judgement as the paths a plan reads.
        assert set(db.paths_to_plan(folder)) == {"edited", "touched", "new"}


def test_remote_records_are_kept_per_peer_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with Index.open(path) as db:
        folder = db.add_folder("/srv/a", "00" * 16).id
        ra = [_file("x", b"one"), _file("y", b"two")]
        ra = [replace(r, sequence=s) for r, s in zip(ra, (10, 12), strict=True)]
        assert db.remote_upsert(folder, PEER_A, ra, index_id=b"A" * 8) == 12
        rb = replace(_file("x", b"other"), sequence=3)
        assert db.remote_upsert(folder, PEER_B, [rb], index_id=b"B" * 8) == 3
        # An older batch never lowers the high-water mark.
        assert db.remote_upsert(folder, PEER_A, [ra[0]]) == 12
    with Index.open(path) as db:
        (info,) = db.folders()
        peers = {p.peer: p for p in db.remote_peers(info.id)}
        assert peers[PEER_A].max_sequence == 12
        assert peers[PEER_A].index_id == b"A" * 8
        assert peers[PEER_B].max_sequence == 3
        assert [r.path for r in db.remote_records(info.id, PEER_A)] == ["x", "y"]
        assert db.remote_get(info.id, PEER_A, "y") == ra[1]
        assert db.remote_get(info.id, PEER_B, "y") is None
        by_peer = db.remote_records_for_path(info.id, "x")
        assert by_peer == {PEER_A: ra[0], PEER_B: rb}
        assert db.remote_peer(info.id, PEER_A) == peers[PEER_A]
        # The peer restarted its index: forget what we had, start from 0.
        db.remote_reset(info.id, PEER_A, b"C" * 8)
        assert db.remote_peer(info.id, PEER_A) == index_module.RemotePeer(PEER_A, b"C" * 8, 0)
        assert list(db.remote_records(info.id, PEER_A)) == []
        db.remote_forget(info.id, PEER_B)
        assert db.remote_peer(info.id, PEER_B) is None
        assert db.remote_records_for_path(info.id, "x") == {}


def test_partial_downloads_record_verified_blocks_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    with Index.open(path) as db:
        folder = db.add_folder("/srv/a", "00" * 16).id
        p = db.partial_begin(folder, "big.iso", ".lanshare-tmp-big.iso.1", b"H" * 32)
        assert p.verified == frozenset()
        db.partial_begin(folder, "small.iso", ".lanshare-tmp-small.iso.1", b"S" * 32)
        recorded = db.partial_mark_verified(
            folder,
            [
                WrittenBlocks("big.iso", b"H" * 32, (0, 3, 4)),
                WrittenBlocks("small.iso", b"S" * 32, (1,)),
                # No partial of this path, or one towards other content: nothing recorded.
                WrittenBlocks("other", b"H" * 32, (1,)),
                WrittenBlocks("small.iso", b"X" * 32, (2,)),
            ],
        )
        assert recorded == {"big.iso", "small.iso"}
        db.partial_mark_verified(folder, [WrittenBlocks("big.iso", b"H" * 32, (3, 5))])
    with Index.open(path) as db:
        (info,) = db.folders()
        got = db.partials_of(info.id, ["big.iso"]).get("big.iso")
        assert got is not None
        p = got
        both = db.partials_of(info.id, ["big.iso", "small.iso", "none", "big.iso"])
        small = Partial(
            info.id, "small.iso", ".lanshare-tmp-small.iso.1", b"S" * 32, frozenset({1})
        )
        assert both == {"big.iso": p, "small.iso": small}
        assert p.verified == {0, 3, 4, 5}
        assert p.temp_name == ".lanshare-tmp-big.iso.1"
        assert p.file_hash == b"H" * 32
        # Same target again: resume. A new version: start over.
        assert db.partial_begin(info.id, "big.iso", p.temp_name, p.file_hash).verified == {
            0,
            3,
            4,
            5,
        }
        fresh = db.partial_begin(info.id, "big.iso", ".lanshare-tmp-big.iso.2", b"J" * 32)
        assert fresh.verified == frozenset()
        assert [x.path for x in db.partials(info.id)] == ["big.iso", "small.iso"]
        db.partial_drop(info.id, "big.iso")
        assert db.partials_of(info.id, ["big.iso"]).get("big.iso") is None


def test_remove_folder_forgets_everything(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    db.commit_changes(folder, [LocalChange(_file("a", b"AAAA"))])
    db.remote_upsert(folder, PEER_A, [_file("a", b"AAAA")])
    db.partial_begin(folder, "b", ".lanshare-tmp-b", b"x" * 32)
    db.remove_folder(folder)
    assert db.folders() == []
    assert db.find_block(hashlib.sha256(b"AAAA").digest()) == []
    with pytest.raises(StorageError, match="no folder"):
        db.max_sequence(folder)


def test_threads_share_one_index(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                db.commit_changes(folder, [LocalChange(_file(f"t{n}/{i}", b"z"))])
                db.records_since(folder, 0, 5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert db.max_sequence(folder) == 80
    seqs = [r.sequence for r in db.records_since(folder, 0, 1000)]
    assert seqs == list(range(1, 81))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c/d", "e"]), st.binary(max_size=12), st.booleans()),
        max_size=25,
    )
)
def test_sequences_are_unique_and_records_since_is_complete(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, bytes, bool]]
) -> None:
    with Index.open(tmp_path_factory.mktemp("h") / "index.db") as db:
        folder = db.add_folder("/srv/a", "00" * 16).id
        latest: dict[str, FileRecord] = {}
        for path, content, delete in ops:
            old = latest.get(path)
            version = (old.version if old else VersionVector()).bump(ME)
            rec = _file(path, content, version)
            if delete:
                rec = rec.tombstone(version, 0)
            (latest[path],) = db.commit_changes(folder, [LocalChange(rec)])
        assert db.max_sequence(folder) == len(ops)
        since = db.records_since(folder, 0, 1000)
        assert {r.path: r for r in since} == latest
        assert [r.sequence for r in since] == sorted({r.sequence for r in since})


def test_transaction_groups_calls_and_rolls_back_as_one(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    with db.transaction():
        assert db.get(folder, "a") is None
        db.commit_changes(folder, [LocalChange(_file("a", b"1"))])
        db.commit_changes(folder, [LocalChange(_file("b", b"2"))])
    assert db.max_sequence(folder) == 2

    def abandoned() -> None:
        with db.transaction():
            db.commit_changes(folder, [LocalChange(_file("c", b"3"))])
            raise RuntimeError("abandon")

    with pytest.raises(RuntimeError):
        abandoned()
    assert db.get(folder, "c") is None
    assert db.max_sequence(folder) == 2
    # A failing call inside a transaction undoes only itself; the caller decides.
    bad = FileRecord(path="bad", type=EntryType.FILE, size=1, blocks=(Block(0, 1, b"x"),))
    with db.transaction():
        db.commit_changes(folder, [LocalChange(_file("d", b"4"))])
        with pytest.raises(StorageError):
            db.commit_changes(folder, [LocalChange(_file("e", b"5")), LocalChange(bad)])
        with db.transaction():  # nesting joins the outer transaction
            db.commit_changes(folder, [LocalChange(_file("f", b"6"))])
    assert set(db.get_many(folder, ["d", "e", "f"])) == {"d", "f"}
    assert db.max_sequence(folder) == 4


# --- the mass-deletion guard's history ---------------------------------------------------------


def test_an_index_of_schema_version_1_migrates_and_keeps_its_records(tmp_path: Path) -> None:
    # An index as the previous release wrote it: schema 1 only, a folder with a record.
    path = tmp_path / "index.db"
    conn = sqlite3.connect(path)
    for statement in index_module.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO folders (path, folder_id, index_id) VALUES ('/s', 'ab', x'01')")
    conn.commit()
    conn.close()
    with Index.open(path) as db:
        (folder,) = db.folders()
        db.commit_changes(folder.id, [LocalChange(_file("kept.txt", b"data"))])
    with Index.open(path) as db:
        assert db.schema_version() == SCHEMA_VERSION == 2
        assert db.get(folder.id, "kept.txt") is not None
        assert db.deletions(folder.id) == []
        entry = Deletion(1_800_000_000.0, PEER_A, 99, 300)
        db.deletions_record(folder.id, [entry], 3600.0)
        assert db.deletions(folder.id) == [entry]


def test_the_deletion_history_survives_a_reopen_and_is_pruned_to_the_window(
    tmp_path: Path,
) -> None:
    path = tmp_path / "index.db"
    t0 = 1_800_000_000.0
    with Index.open(path) as db:
        folder = db.add_folder("/s", "ab").id
        other = db.add_folder("/t", "cd").id
        db.deletions_record(folder, [Deletion(t0, PEER_A, 99, 300)], 3600.0)
        db.deletions_record(folder, [Deletion(t0 + 5, b"", 3, 201)], 3600.0)
        db.deletions_record(other, [Deletion(t0, PEER_B, 7, 10)], 3600.0)
        db.deletions_hold(folder, t0 + 5)
        db.deletions_hold(other, t0)
        db.deletions_hold(other, None)
    with Index.open(path) as db:  # a restart does not reset a wipe in progress
        assert db.deletions(folder) == [
            Deletion(t0, PEER_A, 99, 300),
            Deletion(t0 + 5, b"", 3, 201),
        ]
        assert db.deletions_held_since(folder) == t0 + 5
        assert db.deletions_held_since(other) is None
        # Writing an hour later drops what left the window (and merges nothing across it).
        db.deletions_record(folder, [Deletion(t0 + 3601, PEER_A, 1, 198)], 3600.0)
        assert db.deletions(folder) == [
            Deletion(t0 + 5, b"", 3, 201),
            Deletion(t0 + 3601, PEER_A, 1, 198),
        ]
        db.deletions_clear(folder)  # the user confirmed them
        assert db.deletions(folder) == []
        assert db.deletions_held_since(folder) is None
        assert db.deletions(other) == [Deletion(t0, PEER_B, 7, 10)]
        db.remove_folder(other)
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT count(*) FROM deletions").fetchone()[0] == 0
        finally:
            conn.close()


def test_forget_drops_records_without_a_tombstone_or_a_sequence(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    other = db.add_folder("/srv/b", "11" * 16).id
    big = _file("big.iso", b"AAAABBBB", VersionVector().bump(0xA))
    keep = _file("keep.txt", b"CCCC", VersionVector().bump(0xA))
    db.commit_changes(folder, [LocalChange(big), LocalChange(keep)])
    db.commit_changes(other, [LocalChange(_file("big.iso", b"AAAA"))])
    sequence = db.max_sequence(folder)

    assert db.forget(folder, ["big.iso", "big.iso", "never-held"]) == 1

    # Not held here: no record at all, not a tombstone, and nothing for peers to read.
    assert db.get(folder, "big.iso") is None
    assert db.max_sequence(folder) == sequence
    assert db.records_since(folder, sequence) == []
    assert "big.iso" not in db.scan_cache(folder)
    assert db.find_block(hashlib.sha256(b"BBBB").digest(), folder) == []
    # The rest of the folder, and the other folder's path of the same name, stay.
    assert db.get(folder, "keep.txt") is not None
    assert db.get(other, "big.iso") is not None
    assert db.forget(folder, []) == 0


def test_forgotten_path_is_recorded_again_under_the_fetched_version(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    remote = _file("big.iso", b"AAAABBBB", VersionVector().bump(0xA).bump(0xB))
    db.commit_changes(folder, [LocalChange(remote)])
    db.forget(folder, ["big.iso"])
    (again,) = db.commit_changes(folder, [LocalChange(remote)])
    assert again.version == remote.version
    assert not again.deleted
    assert [b.path for b in db.find_block(hashlib.sha256(b"AAAA").digest(), folder)] == ["big.iso"]


def test_held_names_are_the_top_level_names_of_live_records(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    assert db.held_names(folder) == []
    photos = FileRecord(path="photos", type=EntryType.DIR, mode=0o755, version=VersionVector())
    gone = _file("gone.txt", b"x")
    db.commit_changes(
        folder,
        [
            LocalChange(photos),
            LocalChange(_file("photos/a.jpg", b"a")),
            LocalChange(_file("photos/2024/b.jpg", b"b")),
            LocalChange(_file("notes.txt", b"n")),
            LocalChange(gone.tombstone(gone.version.bump(ME), 0)),
        ],
    )
    assert db.held_names(folder) == ["notes.txt", "photos"]
    assert db.held_names(folder, limit=1) == ["notes.txt"]


def test_one_paths_remote_records_are_found_by_the_path_index(tmp_path: Path) -> None:
    """Read by path for every path a scan records for the first time: walking all the
    folder's remote records each time made such a scan quadratic (20,000 new files: 30 s
    instead of 2 s). The plan of each statement it runs must search the path index."""
    with Index.open(tmp_path / "index.sqlite3") as db:
        folder = db.add_folder(tmp_path / "share", "ab" * 16).id
        peer = b"\x01" * 8
        db.remote_reset(folder, peer, b"\x02" * 8)
        records = [
            dataclasses.replace(
                _file(f"f{i:04}.txt", b"x", VersionVector().bump(7)), sequence=i + 1
            )
            for i in range(2000)
        ]
        db.remote_upsert(folder, peer, records)
        statements: list[str] = []
        conn = db._conn
        assert conn is not None
        conn.set_trace_callback(statements.append)
        try:
            found = db.remote_records_for_path(folder, "f0042.txt")
        finally:
            conn.set_trace_callback(None)
        assert [r.path for r in found.values()] == ["f0042.txt"]
        (select,) = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        plan = conn.execute("EXPLAIN QUERY PLAN " + select).fetchall()
        assert any("INDEX remote_files_path" in str(row[-1]) for row in plan), plan


def test_the_sequence_is_read_from_memory_and_follows_commits_and_rollbacks(
    tmp_path: Path,
) -> None:
    with Index.open(tmp_path / "index.db") as db:
        folder = db.add_folder("/srv/a", "00" * 16).id
        assert db.sequence(folder) == 0
        db.commit_changes(folder, [LocalChange(_file("a.txt", b"a"))])
        assert db.sequence(folder) == 1 == db.folder(folder).sequence

        def rolled_back() -> None:
            with db.transaction():
                db.commit_changes(folder, [LocalChange(_file("b.txt", b"b"))])
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            rolled_back()
        assert db.sequence(folder) == 1 == db.folder(folder).sequence


# --- what a planning pass asks (lanshare.planinputs) -------------------------------------------


def test_paths_to_plan_are_those_some_peer_holds_otherwise(db: Index) -> None:
    """Equal records (but for their sequence) are in sync; any other column, a path we do
    not hold or a tombstone against a live record is to plan; paths only we hold are not."""
    folder = db.add_folder("/srv/a", "00" * 16).id
    same, meta, content, gone = (
        _file(name, name.encode()) for name in ("same", "meta", "content", "gone")
    )
    db.commit_changes(folder, [LocalChange(r) for r in (same, meta, content, gone)])
    db.commit_changes(folder, [LocalChange(_file("only-mine", b"x"))])
    bumped = VersionVector().bump(ME).bump(7)
    db.remote_upsert(
        folder,
        PEER_A,
        [replace(same, sequence=40), replace(meta, mode=0o600), _file("theirs", b"t")],
    )
    db.remote_upsert(
        folder,
        PEER_B,
        [
            replace(same, sequence=3),
            replace(content, blocks=_file("c", b"other").blocks),
            gone.tombstone(bumped, 9),
        ],
    )
    assert db.paths_to_plan(folder) == ["content", "gone", "meta", "theirs"]
    other = db.add_folder("/srv/b", "11" * 16).id
    assert db.paths_to_plan(other) == []
    # A page at a time, and only what a plan could delete.
    assert db.paths_to_plan(folder, "", 2) == ["content", "gone"]
    assert db.paths_to_plan(folder, "gone", 2) == ["meta", "theirs"]
    assert db.paths_to_plan(folder, "theirs", 2) == []
    assert db.paths_to_plan(folder, deleting=True) == ["gone"]
    # Streamed in path order from the index: no sort of every remote record.
    statements: list[str] = []
    conn = db._conn
    assert conn is not None
    conn.set_trace_callback(statements.append)
    try:
        db.paths_to_plan(folder, "", 2)
    finally:
        conn.set_trace_callback(None)
    (select,) = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plan = " ".join(str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + select))
    assert "INDEX remote_files_path" in plan
    assert "TEMP B-TREE" not in plan, plan


def test_remote_records_are_counted_per_peer(db: Index) -> None:
    """What the record limit per peer counts: rows held, and the rows a batch would add."""
    folder = db.add_folder("/srv/a", "00" * 16).id
    db.remote_upsert(folder, PEER_A, [_file(p, b"") for p in ("a", "b", "c")])
    db.remote_upsert(folder, PEER_B, [_file("a", b"")])
    assert db.remote_counts(folder) == {PEER_A: 3, PEER_B: 1}
    assert db.remote_unknown(folder, PEER_A, ["a", "d", "d", "e"]) == 2
    assert db.remote_unknown(folder, PEER_B, ["a"]) == 0
    db.remote_reset(folder, PEER_A, b"\x01" * 8)
    assert db.remote_counts(folder) == {PEER_B: 1}


def test_remote_records_of_some_paths_by_peer(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    x, y = _file("x", b"xx"), _file("y", b"yy")
    db.remote_upsert(folder, PEER_A, [replace(x, sequence=1), replace(y, sequence=2)])
    db.remote_upsert(folder, PEER_B, [replace(y, sequence=5)])
    assert db.remote_records_of(folder, ["y", "nowhere"]) == {
        PEER_A: {"y": replace(y, sequence=2)},
        PEER_B: {"y": replace(y, sequence=5)},
    }
    many = [f"p{i:04d}" for i in range(1200)]  # more than one query's worth of variables
    db.remote_upsert(folder, PEER_A, [_file(p, b"") for p in many])
    assert sorted(db.remote_records_of(folder, many)[PEER_A]) == many


def test_live_below_known_paths_and_conflict_copies(db: Index) -> None:
    folder = db.add_folder("/srv/a", "00" * 16).id
    records = [_file(p, b"1") for p in ("d/a", "d/e/b", "d-x", "dd/c", "e.sync-conflict-1")]
    db.commit_changes(folder, [LocalChange(r) for r in records])
    gone = _file("d/gone", b"2")
    db.commit_changes(folder, [LocalChange(gone)])
    db.commit_changes(folder, [LocalChange(gone.tombstone(VersionVector().bump(ME).bump(ME), 0))])
    assert (db.live_below(folder, "d"), db.live_below(folder, "d/e")) == (2, 1)
    assert (db.live_below(folder, "dd"), db.live_below(folder, "x")) == (1, 0)
    assert db.path_known(folder, "d/gone")  # a tombstone
    assert not db.path_known(folder, "d/none")
    db.remote_upsert(folder, PEER_A, [_file("d/theirs", b"3")])
    assert db.path_known(folder, "d/theirs")  # a peer's only
    assert not db.path_known(db.add_folder("/srv/b", "11" * 16).id, "d/theirs")
    assert db.live_paths_containing(folder, ".sync-conflict-") == ["e.sync-conflict-1"]


def test_block_source_is_the_first_live_block_of_that_content(db: Index) -> None:
    """The planner's ``LocalContext.block_source``: files in path order, blocks in file
    order; a deleted file, another size or another algorithm is no source."""
    folder = db.add_folder("/srv/a", "00" * 16).id
    late = _file("z", b"....abcd")
    early = _file("m", b"abcd")
    deleted = _file("a", b"abcd")
    other_algo = replace(_file("b", b"abcd"), hash_algo="blake3")
    db.commit_changes(folder, [LocalChange(r) for r in (late, early, deleted, other_algo)])
    db.commit_changes(
        folder, [LocalChange(deleted.tombstone(VersionVector().bump(ME).bump(ME), 0))]
    )
    block = early.blocks[0]
    assert db.block_source(folder, "sha256", block.hash, block.size) == ("m", 0)
    assert db.block_source(folder, "blake3", block.hash, block.size) == ("b", 0)
    assert db.block_source(folder, "sha256", block.hash, block.size + 1) is None
    assert db.block_source(folder, "sha256", late.blocks[0].hash, 4) == ("z", 0)
    assert db.block_source(folder + 1, "sha256", block.hash, block.size) is None
