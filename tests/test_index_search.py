"""``Index.search_candidates``: the paths a search may match, narrowed in SQLite."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

import pytest

from lanshare.index import Index, LocalChange
from lanshare.manifest import Block, EntryType, FileRecord, VersionVector
from lanshare.search import Query

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PEER = bytes.fromhex("a1a1a1a1a1a1a1a1")
OTHER = bytes.fromhex("b2b2b2b2b2b2b2b2")


def _record(path: str, size: int = 10, entry_type: EntryType = EntryType.FILE) -> FileRecord:
    blocks: tuple[Block, ...] = ()
    if entry_type is EntryType.FILE and size:
        blocks = (Block(0, size, hashlib.sha256(path.encode()).digest()),)
    return FileRecord(
        path=path,
        type=entry_type,
        size=size if entry_type is EntryType.FILE else 0,
        mtime_ns=1,
        mode=0o644 if entry_type is EntryType.FILE else 0o755,
        blocks=blocks,
        file_hash=hashlib.sha256(path.encode()).digest() if entry_type is EntryType.FILE else b"",
        hash_algo="sha256",
        version=VersionVector().bump(1),
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Index]:
    with Index.open(tmp_path / "state" / "index.db") as index:
        yield index


def _folder(db: Index, name: str = "/share") -> int:
    return db.add_folder(name, "00" * 16).id


def _remote(db: Index, folder: int, peer: bytes, records: list[FileRecord]) -> None:
    db.remote_reset(folder, peer, peer)
    db.remote_upsert(
        folder, peer, [dataclasses.replace(r, sequence=i + 1) for i, r in enumerate(records)]
    )


def test_local_and_peers_records_each_path_once_with_whether_it_is_a_directory(db: Index) -> None:
    folder = _folder(db)
    db.commit_changes(
        folder,
        [
            LocalChange(_record("Docs/Report.pdf")),
            LocalChange(_record("Docs", entry_type=EntryType.DIR)),
            LocalChange(_record("music/song.mp3")),
        ],
    )
    _remote(db, folder, PEER, [_record("Docs/Report.pdf"), _record("docs/report-2.pdf")])
    _remote(db, folder, OTHER, [_record("Docs", entry_type=EntryType.FILE)])
    assert db.search_candidates(folder, ["doc"]) == {
        "Docs": True,  # a directory here, a file at another peer
        "Docs/Report.pdf": False,
        "docs/report-2.pdf": False,
    }
    assert db.search_candidates(folder, ["report", ".pdf"]) == {
        "Docs/Report.pdf": False,
        "docs/report-2.pdf": False,
    }
    assert db.search_candidates(folder, ["nowhere"]) == {}
    # Another folder's records are not this one's.
    assert db.search_candidates(_folder(db, "/other"), ["doc"]) == {}


def test_tombstones_are_no_candidates_but_a_live_record_anywhere_is(db: Index) -> None:
    folder = _folder(db)
    gone = _record("gone.txt")
    (stored,) = db.commit_changes(folder, [LocalChange(gone)])
    db.commit_changes(folder, [LocalChange(stored.tombstone(VersionVector().bump(2), 0))])
    _remote(db, folder, PEER, [gone.tombstone(VersionVector().bump(3), 0), _record("kept.txt")])
    _remote(db, folder, OTHER, [_record("kept.txt").tombstone(VersionVector().bump(4), 0)])
    assert db.search_candidates(folder, ["txt"]) == {"kept.txt": False}


def test_a_path_with_other_than_ascii_is_always_a_candidate(db: Index) -> None:
    """SQLite folds ASCII only: such paths are left for ``lanshare.search`` to decide."""
    folder = _folder(db)
    paths = ["ÉTÉ/Plage.JPG", "\u212aelvin.txt", "plain.jpg", "other.png"]
    db.commit_changes(folder, [LocalChange(_record(p)) for p in paths])
    assert set(db.search_candidates(folder, ["été"])) == {"ÉTÉ/Plage.JPG", "\u212aelvin.txt"}
    query = Query.parse(["kelvin"])  # U+212A KELVIN SIGN folds to "k"
    found = db.search_candidates(folder, query.fragments())
    assert [p for p, d in found.items() if query.rank(p, d) is not None] == ["\u212aelvin.txt"]
    query = Query.parse(["*.jpg"])
    found = db.search_candidates(folder, query.fragments())
    assert sorted(p for p, d in found.items() if query.rank(p, d) is not None) == [
        "plain.jpg",
        "ÉTÉ/Plage.JPG",
    ]


def test_like_wildcards_in_a_term_are_literal(db: Index) -> None:
    folder = _folder(db)
    paths = ["100%_done.txt", "100xxdone.txt", "100%xdone.txt", "a\\b.txt", "ab.txt"]
    db.commit_changes(folder, [LocalChange(_record(p)) for p in paths])
    assert list(db.search_candidates(folder, ["100%_done"])) == ["100%_done.txt"]
    assert list(db.search_candidates(folder, ["a\\b"])) == ["a\\b.txt"]


def test_below_a_path_type_and_size_filters(db: Index) -> None:
    folder = _folder(db)
    db.commit_changes(
        folder,
        [
            LocalChange(_record("a", entry_type=EntryType.DIR)),
            LocalChange(_record("a/small.bin", size=5)),
            LocalChange(_record("a/big.bin", size=5000)),
            LocalChange(_record("ab/big.bin", size=5000)),
            LocalChange(_record("a0.bin", size=5000)),
        ],
    )
    # The local copy of a/small.bin is small; a peer's is big: either may be the one shown.
    _remote(db, folder, PEER, [_record("a/small.bin", size=9000)])
    assert set(db.search_candidates(folder, ["bin"], below="a")) == {"a/small.bin", "a/big.bin"}
    assert set(db.search_candidates(folder, [], below="a/big.bin")) == {"a/big.bin"}
    assert set(db.search_candidates(folder, [], entry_type=EntryType.DIR)) == {"a"}
    assert set(db.search_candidates(folder, ["bin"], min_size=1000, max_size=6000)) == {
        "a/big.bin",
        "ab/big.bin",
        "a0.bin",
    }
    assert set(db.search_candidates(folder, ["bin"], max_size=10)) == {"a/small.bin"}
    assert set(db.search_candidates(folder, ["bin"], min_size=6000)) == {"a/small.bin"}


def test_candidates_are_a_superset_of_the_matches(db: Index) -> None:
    """Every path a query matches is a candidate, over names of many kinds."""
    folder = _folder(db)
    names = [
        "Photos/2024/Beach.JPG",
        "photos/2023/beach-party.jpeg",
        "docs/Annual Report (final).PDF",
        "docs/deep/er/notes.md",
        "src/[draft]*.txt",
        "Ünïcödé/Straße.txt",
        "ΣΊΣΥΦΟΣ.txt",
        "x/y/z",
    ]
    db.commit_changes(folder, [LocalChange(_record(p)) for p in names])
    queries = [
        ["beach"],
        ["PHOTOS", "jp"],
        ["*.jpg"],
        ["photos/**/*.jp*g"],
        ["report", "*.pdf"],
        ["docs/*/er"],
        ["\\[draft\\]\\*.txt"],
        ["strasse"],
        ["σίσυφος"],
        ["x/y"],
        ["y/z"],
    ]
    for terms in queries:
        query = Query.parse(terms)
        want = {p for p in names if query.rank(p, False) is not None}
        assert want, terms
        got = db.search_candidates(folder, query.fragments())
        assert want <= set(got), (terms, want - set(got))
