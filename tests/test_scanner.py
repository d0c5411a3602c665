"""The scanner against real files: incremental reads, tombstones, races, links, ignores, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lanshare import chunker, keys, marker, planner, scanner, store
from lanshare import index as index_module
from lanshare.config import FolderConfig
from lanshare.deleteguard import LOCAL, Deletion, Limits
from lanshare.errors import StorageError
from lanshare.index import Index, LocalChange
from lanshare.manifest import MAX_VERSION_ENTRIES, EntryType, FileRecord, VersionVector
from lanshare.paths import MARKER

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from lanshare.chunker import FileHashes

ME = 0x5EED
T_NOW = 1_800_000_000.0
REPO = Path(__file__).resolve().parent.parent


class CountingHasher:
    """chunker.hash_file, counting which files were read (the hasher is the only reader)."""

    def __init__(self, before: Callable[[Path], None] | None = None) -> None:
        self.reads: list[str] = []
        self._before = before
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> FileHashes:
        with self._lock:
            self.reads.append(path.name)
        if self._before is not None:
            self._before(path)
        return chunker.hash_file(path)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Index]:
    with Index.open(tmp_path / "state" / "index.db") as index:
        yield index


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    return share


def scan(
    db: Index, root: Path, hasher: Callable[[Path], FileHashes] | None = None, **kw: object
) -> scanner.ScanSummary:
    folder = db.add_folder(root, "ab" * 16).id
    return asyncio.run(
        scanner.scan_path(db, folder, root, ME, hash_file=hasher, **kw)  # type: ignore[arg-type]
    )


def records(db: Index, root: Path) -> dict[str, FileRecord]:
    folder = db.add_folder(root, "ab" * 16).id
    return {r.path: r for r in db.iter_records(folder)}


def settle(root: Path) -> None:
    """Wait (bounded) until every timestamp in the tree is older than the racy window.

    A file changed within chunker.RACY_WINDOW_NS of its reading is deliberately read again at
    the next scan; tests that count reads start from files that are not racy.
    """
    newest = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    deadline = time.monotonic() + 10
    while time.time_ns() - newest <= chunker.RACY_WINDOW_NS + 50_000_000:
        assert time.monotonic() < deadline, "clock does not advance"
        time.sleep(0.05)


def make_tree(root: Path) -> None:
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_bytes(b"alpha\n" * 1000)
    (root / "docs" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "empty").mkdir()
    (root / "empty" / "nested-empty").mkdir()
    (root / "top.txt").write_text("top")
    (root / "zero").write_bytes(b"")


def test_first_scan_records_files_empty_dirs_and_links(db: Index, root: Path) -> None:
    make_tree(root)
    (root / "link").symlink_to("docs/a.txt")
    summary = scan(db, root)
    recs = records(db, root)
    assert set(recs) == {
        "docs",
        "docs/a.txt",
        "docs/b.bin",
        "empty",
        "empty/nested-empty",
        "top.txt",
        "zero",
        "link",
    }
    assert recs["empty/nested-empty"].type is EntryType.DIR
    assert recs["link"].type is EntryType.SYMLINK
    assert recs["link"].symlink_target == "docs/a.txt"
    want = chunker.hash_file(root / "docs" / "b.bin")
    got = recs["docs/b.bin"]
    assert (got.file_hash, got.blocks, got.hash_algo) == (want.file_hash, want.blocks, "blake3")
    assert got.size == 300_000
    assert got.mode == (root / "docs" / "b.bin").stat().st_mode & 0o777
    assert recs["zero"].size == 0
    assert recs["zero"].blocks == ()
    assert all(r.version.get(ME) == 1 for r in recs.values())
    assert sorted(r.sequence for r in recs.values()) == list(range(1, 9))
    assert (summary.files, summary.dirs, summary.symlinks) == (4, 3, 1)
    assert summary.bytes == 6000 + 300_000 + 3
    assert summary.blocks == sum(len(r.blocks) for r in recs.values())
    assert (summary.new, summary.changed, summary.deleted, summary.skipped) == (8, 0, 0, 0)


def test_unchanged_rescan_reads_no_file_and_writes_nothing(db: Index, root: Path) -> None:
    make_tree(root)
    settle(root)
    first = CountingHasher()
    scan(db, root, first)
    assert sorted(first.reads) == ["a.txt", "b.bin", "top.txt", "zero"]
    before = records(db, root)
    again = CountingHasher()
    summary = scan(db, root, again)
    assert again.reads == []
    assert records(db, root) == before
    assert (summary.new, summary.changed, summary.deleted) == (0, 0, 0)
    assert (summary.files, summary.dirs) == (4, 3)
    assert summary.blocks == sum(len(r.blocks) for r in before.values())


def test_a_changed_file_alone_is_read_and_gets_a_new_version(db: Index, root: Path) -> None:
    make_tree(root)
    settle(root)
    scan(db, root)
    old = records(db, root)
    top_seq = max(r.sequence for r in old.values())
    with (root / "docs" / "a.txt").open("ab") as handle:
        handle.write(b"more\n")
    hasher = CountingHasher()
    summary = scan(db, root, hasher)
    assert set(hasher.reads) == {"a.txt"}  # (read twice: it was written just now)
    new = records(db, root)["docs/a.txt"]
    assert new.version.get(ME) == 2
    assert new.sequence == top_seq + 1
    assert new.file_hash == chunker.hash_file(root / "docs" / "a.txt").file_hash
    assert (summary.new, summary.changed, summary.deleted) == (0, 1, 0)


def test_metadata_only_changes(db: Index, root: Path) -> None:
    make_tree(root)
    settle(root)
    scan(db, root)
    folder = db.add_folder(root, "ab" * 16).id
    seq = db.max_sequence(folder)
    # ctime moves, content and mode do not: read again, but nothing new for the peers.
    os.chmod(root / "top.txt", (root / "top.txt").stat().st_mode)
    hasher = CountingHasher()
    assert scan(db, root, hasher).changed == 0
    assert hasher.reads == ["top.txt"]
    assert db.max_sequence(folder) == seq
    # A new mode or mtime is a change.
    os.chmod(root / "top.txt", 0o600)
    os.utime(root / "zero", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    os.chmod(root / "empty", 0o700)
    assert scan(db, root).changed == 3
    recs = records(db, root)
    assert recs["top.txt"].mode == 0o600
    assert recs["zero"].mtime_ns == 1_600_000_000_000_000_000
    assert recs["empty"].mode == 0o700
    assert db.max_sequence(folder) == seq + 3


def test_a_racy_file_is_read_twice_and_again_at_the_next_scan(db: Index, root: Path) -> None:
    (root / "fresh.txt").write_bytes(b"just written")
    hasher = CountingHasher()
    scan(db, root, hasher)
    assert hasher.reads == ["fresh.txt", "fresh.txt"]
    hasher = CountingHasher()
    assert scan(db, root, hasher).changed == 0
    assert "fresh.txt" in hasher.reads


def test_vanished_entries_become_tombstones_and_may_come_back(db: Index, root: Path) -> None:
    make_tree(root)
    scan(db, root)
    old = records(db, root)
    (root / "top.txt").unlink()
    shutil.rmtree(root / "docs")
    summary = scan(db, root)
    assert summary.deleted == 4
    recs = records(db, root)
    for path in ("top.txt", "docs", "docs/a.txt", "docs/b.bin"):
        assert recs[path].deleted
        assert recs[path].version.get(ME) == 2
        assert recs[path].blocks == ()
        assert recs[path].sequence > max(r.sequence for r in old.values())
    assert recs["docs/a.txt"].type is EntryType.FILE
    # A tombstone stays as it is.
    assert scan(db, root).deleted == 0
    # Reappearing: a new live record whose version follows the tombstone's.
    (root / "top.txt").write_text("back")
    summary = scan(db, root)
    assert (summary.new, summary.deleted) == (1, 0)
    back = records(db, root)["top.txt"]
    assert not back.deleted
    assert back.version.get(ME) == 3
    assert back.size == 4


def test_type_change_is_a_new_version_of_the_same_path(db: Index, root: Path) -> None:
    (root / "thing").write_text("file")
    scan(db, root)
    (root / "thing").unlink()
    (root / "thing").mkdir()
    assert scan(db, root).changed == 1
    rec = records(db, root)["thing"]
    assert rec.type is EntryType.DIR
    assert rec.version.get(ME) == 2


def test_file_rewritten_during_hashing_is_read_again(db: Index, root: Path) -> None:
    """The first reading sees half old, half new content: it must never be recorded."""
    target = root / "moving.bin"
    target.write_bytes(b"A" * 1_000_000)
    past = time.time_ns() - 60 * 10**9
    os.utime(target, ns=(past, past))
    mixed: list[bytes] = []
    calls: list[int] = []

    def rewriting_hasher(path: Path) -> FileHashes:
        calls.append(1)
        if len(calls) > 1:
            return chunker.hash_file(path)
        # A real reader that observes a real concurrent rewrite between its two halves.
        with io.FileIO(path, "rb") as handle:
            before = os.fstat(handle.fileno())
            data = handle.read(500_000)
            path.write_bytes(b"B" * 1_000_000)
            data += handle.read()
            after = os.fstat(handle.fileno())
        result = chunker.hash_buffer(data)
        mixed.append(result.file_hash)
        same = (before.st_mtime_ns, before.st_ctime_ns) == (after.st_mtime_ns, after.st_ctime_ns)
        return dataclasses.replace(result, stat=after, stable=same)

    summary = scan(db, root, rewriting_hasher)
    rec = records(db, root)["moving.bin"]
    assert len(calls) >= 2
    assert rec.file_hash == chunker.hash_buffer(b"B" * 1_000_000).file_hash
    assert rec.file_hash != mixed[0]
    assert summary.skipped == 0


def test_concurrent_writer_never_leaves_a_stale_hash(db: Index, root: Path) -> None:
    """A real writer rewrites the file in place, alternating two contents, while scans run.

    The kernel stamps mtime when a write *starts*, and a large write can stall half done
    (dirty-page throttling), so a reading may meet a half-written file whose stat does not
    move again. What the scanner guarantees: a recorded hash is either one of the real
    contents or marked untrusted in the cache, so the next scan reads the file again; once
    the writer stops, a scan records the real content.
    """
    size = 4 * 1024 * 1024
    contents = (b"\x01" * size, b"\x02" * size)
    valid = {chunker.hash_buffer(c).file_hash for c in contents}
    target = root / "flip.bin"
    target.write_bytes(contents[0])
    stop = threading.Event()

    def writer() -> None:
        fd = os.open(target, os.O_WRONLY)
        try:
            for i in range(100_000):
                if stop.is_set():
                    return
                os.pwrite(fd, contents[i % 2], 0)
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    folder = db.add_folder(root, "ab" * 16).id
    try:
        for _ in range(5):
            summary = scan(db, root)
            rec = records(db, root).get("flip.bin")
            if rec is None:
                assert summary.skipped == 1
            elif rec.file_hash not in valid:
                assert db.scan_cache(folder)["flip.bin"].ctime_ns == 0
    finally:
        stop.set()
        thread.join(timeout=60)
    scan(db, root)
    final = records(db, root)["flip.bin"]
    assert final.file_hash == chunker.hash_file(target).file_hash
    assert final.file_hash in valid


def test_symlinks_are_recorded_as_links_and_never_followed(
    db: Index, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not read")
    (outside / "sub").mkdir()
    (root / "to-dir").symlink_to(outside)
    (root / "to-file").symlink_to(outside / "secret.txt")
    (root / "dangling").symlink_to("nowhere/at/all")
    (root / "loop").symlink_to("loop")
    hasher = CountingHasher()
    summary = scan(db, root, hasher)
    assert hasher.reads == []
    recs = records(db, root)
    assert set(recs) == {"to-dir", "to-file", "dangling", "loop"}
    assert all(r.type is EntryType.SYMLINK for r in recs.values())
    assert recs["to-dir"].symlink_target == str(outside)
    assert recs["dangling"].symlink_target == "nowhere/at/all"
    assert (summary.files, summary.symlinks, summary.bytes) == (0, 4, 0)
    # Retargeting is a change; a link replaced by a file is a change of type.
    (root / "dangling").unlink()
    (root / "dangling").symlink_to("elsewhere")
    (root / "to-file").unlink()
    (root / "to-file").write_text("now a file")
    assert scan(db, root).changed == 2
    recs = records(db, root)
    assert recs["dangling"].symlink_target == "elsewhere"
    assert recs["to-file"].type is EntryType.FILE


def test_ignored_internal_and_temporary_paths_are_skipped(db: Index, root: Path) -> None:
    (root / ".lanshareignore").write_text("*.log\nbuild/\n")
    (root / "keep.txt").write_text("k")
    (root / "app.log").write_text("noise")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_text("obj")
    (root / "local-only.txt").write_text("x")
    (root / ".lanshare").mkdir()
    (root / ".lanshare" / "versions").mkdir()
    (root / ".lanshare" / "versions" / "old.txt").write_text("old")
    (root / ".lanshare-tmp-download").write_text("partial")
    (root / "sub").mkdir()
    (root / "sub" / ".lanshare-tmp-x").write_text("partial")
    hasher = CountingHasher()
    scan(db, root, hasher, ignore=["local-only.txt"])
    assert set(hasher.reads) == {".lanshareignore", "keep.txt"}
    assert set(records(db, root)) == {".lanshareignore", "keep.txt", "sub"}
    # A recorded file that becomes ignored keeps its record: no tombstone reaches the peers.
    (root / "keep.txt").rename(root / "keep.log")
    (root / "extra.txt").write_text("e")
    scan(db, root)
    (root / ".lanshareignore").write_text("*.log\nbuild/\nextra.txt\n")
    summary = scan(db, root)
    recs = records(db, root)
    assert recs["keep.txt"].deleted  # really gone from disk
    assert not recs["extra.txt"].deleted  # still on disk, only ignored now
    assert summary.deleted == 0


def test_bad_names_and_case_collisions_are_reported_not_fatal(db: Index, root: Path) -> None:
    (root / "good.txt").write_text("g")
    (root / "bad\x01name").write_text("control character")
    (root / "caf\u0065\u0301.txt").write_text("NFD on disk")
    os.close(os.open(os.path.join(os.fsencode(root), b"latin1-\xe9.txt"), os.O_CREAT, 0o644))
    (root / "Readme").write_text("r")
    (root / "README").write_text("R")
    summary = scan(db, root)
    assert set(records(db, root)) == {"good.txt", "Readme", "README"}
    assert summary.skipped == 3
    assert len(summary.problems) == 3
    assert any("NFC" in p for p in summary.problems)
    assert summary.collisions == (("README", "Readme"),)
    assert json.loads(json.dumps(summary.as_json()))["collisions"] == [["README", "Readme"]]


def test_a_file_vanishing_mid_scan_is_skipped_not_deleted(db: Index, root: Path) -> None:
    (root / "going.txt").write_text("v1")
    (root / "stays.txt").write_text("s")
    scan(db, root)
    (root / "going.txt").write_text("v2, then gone before it is read")
    (root / "new.txt").write_text("n")

    def remove_going(path: Path) -> None:
        if path.name == "going.txt":
            path.unlink()

    summary = scan(db, root, CountingHasher(before=remove_going))
    recs = records(db, root)
    assert not recs["going.txt"].deleted  # left as it was; the next scan sees it gone
    assert "new.txt" in recs
    assert (summary.deleted, summary.skipped) == (0, 0)
    assert scan(db, root).deleted == 1
    assert records(db, root)["going.txt"].deleted


def test_missing_root_is_an_error_and_tombstones_nothing(db: Index, root: Path) -> None:
    (root / "a").write_text("a")
    scan(db, root)
    shutil.rmtree(root)
    with pytest.raises(StorageError, match="is the disk mounted"):
        scan(db, root)
    assert not records(db, root)["a"].deleted


def test_scan_folder_takes_the_config_and_reports_json(db: Index, root: Path) -> None:
    make_tree(root)
    (root / "skip.me").write_text("x")
    key = keys.format_key(keys.generate_key())
    folder = FolderConfig(path=root, key=key, ignore=("*.me",))
    summary = asyncio.run(scanner.scan_folder(folder, db, ME, 2))
    doc = summary.as_json()
    for name in ("path", "files", "dirs", "bytes", "blocks", "new", "changed", "deleted"):
        assert isinstance(doc[name], int | str)
    assert isinstance(doc["seconds"], float)
    assert doc["path"] == str(root)
    assert (doc["files"], doc["dirs"], doc["new"]) == (4, 3, 7)
    (info,) = db.folders()
    assert info.folder_id == keys.folder_id(keys.parse_key(key)).hex()
    assert info.sequence == 7


def test_large_batches_commit_in_several_transactions(db: Index, root: Path) -> None:
    count = scanner.COMMIT_BATCH + 50
    for i in range(count):
        (root / f"f{i:05d}").write_bytes(b"")
    summary = scan(db, root, io_workers=3)
    assert summary.new == count
    folder = db.add_folder(root, "ab" * 16).id
    assert db.max_sequence(folder) == count
    assert len(db.records_since(folder, 0, count + 10)) == count


def test_a_scan_reporting_progress_records_what_it_hashed_before_it_ends(
    db: Index, root: Path
) -> None:
    """A scan given ``progress`` records the files hashed so far every ``COMMIT_INTERVAL``
    (here: each tick of a clock that moves a second per reading), so peers can fetch them
    while the rest is read; every file is recorded in the end."""
    count = 3 * scanner.GROUP_FILES
    for i in range(count):
        (root / f"f{i:04d}").write_bytes(b"%d" % i)
    folder = db.add_folder(root, "ab" * 16).id
    seen_at_progress: list[int] = []
    ticks = iter(range(10_000))

    async def progress(paths: Sequence[str]) -> None:
        assert len(paths) == db.max_sequence(folder) - (seen_at_progress or [0])[-1]
        seen_at_progress.append(db.max_sequence(folder))

    summary = asyncio.run(
        scanner.scan_path(
            db, folder, root, ME, io_workers=1, progress=progress, clock=lambda: next(ticks)
        )
    )
    assert summary.new == count
    assert seen_at_progress, "progress was reported before the scan ended"
    assert 0 < seen_at_progress[0] < count
    assert seen_at_progress == sorted(seen_at_progress)
    assert db.max_sequence(folder) == count


def test_a_mode_this_node_made_of_a_peers_record_is_no_change(db: Index, root: Path) -> None:
    """A record's mode is applied as permission bits under our umask (``store.applied_mode``):
    a file that holds what was made of it is unchanged, else one node's umask would narrow
    the mode on every node. A mode the user sets afterwards is a change."""
    (root / "tool").write_bytes(b"#!/bin/sh\n")
    settle(root)
    scan(db, root)
    folder = db.add_folder(root, "ab" * 16).id
    recorded = dataclasses.replace(records(db, root)["tool"], mode=0o4755)
    db.commit_changes(folder, [LocalChange(recorded, 0, 0)])  # no cache: read and compared
    os.chmod(root / "tool", store.applied_mode(0o4755, store.FILE_MODE))
    assert scan(db, root).changed == 0
    assert records(db, root)["tool"].mode == 0o4755
    os.chmod(root / "tool", 0o600)
    assert scan(db, root).changed == 1
    assert records(db, root)["tool"].mode == 0o600


def test_a_change_that_cannot_be_recorded_is_a_problem_of_its_path_alone(
    db: Index, root: Path
) -> None:
    """A record whose counter of ours is at its limit (stored before peers' vectors were
    bounded) cannot be bumped: its edit, or its deletion, is reported for that path and left
    out, while the rest of the batch is recorded."""
    make_tree(root)
    settle(root)
    scan(db, root)
    folder = db.add_folder(root, "ab" * 16).id
    full = VersionVector.of({ME: (1 << 63) - 1})
    crowded = VersionVector(tuple((i, 1) for i in range(1, MAX_VERSION_ENTRIES + 1)))
    stuck = [dataclasses.replace(records(db, root)[p], version=full) for p in ("top.txt", "zero")]
    stuck.append(dataclasses.replace(records(db, root)["docs/b.bin"], version=crowded))
    db.commit_changes(folder, [LocalChange(r) for r in stuck])
    before = records(db, root)
    (root / "top.txt").write_text("edited")
    (root / "docs" / "b.bin").write_text("edited by one device too many")
    (root / "zero").unlink()
    (root / "docs" / "a.txt").write_text("edited too")
    (root / "new.txt").write_text("new")

    summary = scan(db, root)

    assert (summary.new, summary.changed, summary.deleted) == (1, 1, 0)
    assert sorted(rel for rel, _ in summary.unrecordable) == ["docs/b.bin", "top.txt", "zero"]
    assert all("cannot record the change" in why for _, why in summary.unrecordable)
    assert summary.skipped == 3
    assert sum("cannot record the change" in p for p in summary.problems) == 3
    after = records(db, root)
    assert after["docs/b.bin"] == before["docs/b.bin"]
    assert after["top.txt"] == before["top.txt"]
    assert after["zero"] == before["zero"]
    assert after["docs/a.txt"].size == len("edited too")
    assert "new.txt" in after
    # Reported again by every scan that looks at it, kept by those that do not.
    unrecordable = summary.still_unrecordable({"gone.txt": "old"})
    assert set(unrecordable) == {"docs/b.bin", "top.txt", "zero"}
    partial = scan(db, root, only=["new.txt"])
    assert partial.unrecordable == ()
    assert partial.still_unrecordable(unrecordable) == unrecordable
    again = scan(db, root, only=["top.txt"])
    assert again.still_unrecordable(unrecordable) == unrecordable
    assert again.still_unrecordable({"top.txt": "old", "docs/x": "old"}) == {
        "top.txt": unrecordable["top.txt"],
        "docs/x": "old",
    }


_CHILD = """
import asyncio, json, sys
from pathlib import Path
from lanshare import scanner
from lanshare.index import Index
with Index.open(Path(sys.argv[1])) as db:
    folder = db.add_folder(Path(sys.argv[2]), "ab" * 16).id
    summary = asyncio.run(scanner.scan_path(db, folder, Path(sys.argv[2]), 0x5EED))
print(json.dumps(summary.as_json()))
"""


def test_unreadable_file_and_directory_are_skipped_and_never_tombstoned(tmp_path: Path) -> None:
    """Permission denied for real. Root reads anything, so as root the second scan runs in a
    child without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which makes mode 000 binding."""
    share, state = tmp_path / "share", tmp_path / "state"
    share.mkdir()
    (share / "open.txt").write_text("readable")
    (share / "secret.bin").write_text("not for you")
    (share / "locked").mkdir()
    (share / "locked" / "inner.txt").write_text("hidden")
    with Index.open(state / "index.db") as db:
        folder = db.add_folder(share, "ab" * 16).id
        asyncio.run(scanner.scan_path(db, folder, share, ME))
    (share / "open.txt").write_text("readable, changed")
    (share / "new.txt").write_text("new")
    (share / "secret.bin").chmod(0o000)
    (share / "locked").chmod(0o000)
    command = [sys.executable, "-c", _CHILD, str(state / "index.db"), str(share)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        )
    finally:
        (share / "secret.bin").chmod(0o644)
        (share / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["deleted"] == 0
    assert summary["skipped"] == 2
    assert any("secret.bin" in p for p in summary["problems"])
    assert any("locked" in p for p in summary["problems"])
    assert (summary["new"], summary["changed"]) == (1, 2)  # new.txt; open.txt, locked's mode
    with Index.open(state / "index.db") as db:
        recs = {r.path: r for r in db.iter_records(db.folders()[0].id)}
    assert not recs["secret.bin"].deleted
    assert not recs["locked/inner.txt"].deleted
    assert recs["open.txt"].size == len("readable, changed")
    assert recs["locked"].mode == 0


def test_local_mass_deletion_is_withheld_until_allowed(db: Index, root: Path) -> None:
    for i in range(10):
        (root / f"f{i}.txt").write_text(str(i))
    scan(db, root)
    for i in range(6):
        (root / f"f{i}.txt").unlink()
    held = scan(db, root, limits=Limits(ratio=0.5, minimum=5))
    assert (held.deleted, held.withheld, held.deletion) == (0, 6, None)
    assert "6 of 10 entries" in held.paused_reason
    assert held.verdict is not None
    assert held.verdict.origins == ((LOCAL, 6),)
    assert not any(r.deleted for r in records(db, root).values())
    below = scan(db, root, limits=Limits(ratio=0.5, minimum=7), now=T_NOW)
    assert (below.deleted, below.withheld, below.paused_reason) == (6, 0, "")
    assert below.deletion == Deletion(T_NOW, LOCAL, 6, 10)
    for i in range(6):
        (root / f"f{i}.txt").write_text("back")
    scan(db, root)
    for i in range(6):
        (root / f"f{i}.txt").unlink()
    allowed = scan(db, root, limits=Limits(ratio=0.5, minimum=5), allow_mass_delete=True)
    assert (allowed.deleted, allowed.withheld) == (6, 0)


def test_local_deletions_in_batches_add_up_in_the_window(db: Index, root: Path) -> None:
    for i in range(300):
        (root / f"f{i:03}.txt").write_text(str(i))
    scan(db, root)
    history: list[Deletion] = []
    summaries = []
    for batch in range(3):  # 99 files at a time, a few seconds apart
        for i in range(batch * 99, (batch + 1) * 99):
            (root / f"f{i:03}.txt").unlink()
        now = T_NOW + 5 * batch
        summary = scan(db, root, delete_history=history, now=now)
        summaries.append(summary)
        if summary.deletion is not None:
            history.append(summary.deletion)
    assert (summaries[0].deleted, summaries[0].withheld) == (99, 0)
    assert summaries[0].deletion == Deletion(T_NOW, LOCAL, 99, 300)
    # The second batch trips the guard with the first; the third is held with both.
    assert (summaries[1].deleted, summaries[1].withheld) == (0, 99)
    assert (summaries[2].deleted, summaries[2].withheld) == (0, 198)
    assert "297 of 300 entries" in summaries[2].paused_reason
    assert "made here" in summaries[2].paused_reason
    assert sum(r.deleted for r in records(db, root).values()) == 99
    # The third batch comes back; the second alone is held only while the first counts.
    for i in range(198, 297):
        (root / f"f{i:03}.txt").write_text(str(i))
    again = scan(db, root, delete_history=history, now=T_NOW + 3599)
    assert (again.deleted, again.withheld) == (0, 99)
    late = scan(db, root, delete_history=history, now=T_NOW + 3600)
    assert (late.deleted, late.withheld) == (99, 0)


# --- a node that only fetches ------------------------------------------------------------------

REMOTE = 0xA11CE  # the short id of the peer a fetched file came from
PEER = REMOTE.to_bytes(8, "big")


def fetched(db: Index, root: Path, rel: str, data: bytes) -> FileRecord:
    """Place ``rel`` as a finished download is placed: the file, then its record under the
    version it was fetched at (the peer's, with none of ours), with the stat cache."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    hashes = chunker.hash_file(path)
    st = path.stat()
    record = FileRecord(
        path=rel,
        type=EntryType.FILE,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        mode=st.st_mode & 0o777,
        blocks=hashes.blocks,
        file_hash=hashes.file_hash,
        hash_algo=hashes.hash_algo,
        version=VersionVector().bump(REMOTE),
    )
    folder = db.add_folder(root, "ab" * 16).id
    (stored,) = db.commit_changes(folder, [LocalChange(record, st.st_ino, st.st_ctime_ns)])
    return stored


def test_fetch_only_scan_forgets_a_removed_file_instead_of_deleting_it(
    db: Index, root: Path
) -> None:
    big = fetched(db, root, "big.iso", os.urandom(200_000))
    other = fetched(db, root, "sub/other.txt", b"kept")
    folder = db.add_folder(root, "ab" * 16).id
    sequence = db.max_sequence(folder)
    (root / "big.iso").unlink()

    summary = scan(db, root, fetch_only=True)

    # Not held here: no tombstone, no new version, nothing new for the peers to read.
    assert (summary.deleted, summary.forgotten, summary.withheld) == (0, 1, 0)
    assert db.get(folder, "big.iso") is None
    assert db.max_sequence(folder) == sequence
    assert db.records_since(folder, sequence) == []
    assert records(db, root)["sub/other.txt"] == other
    # Fetched again later, it is recorded under the peer's version once more.
    (again,) = db.commit_changes(folder, [LocalChange(big)])
    assert again.version == big.version
    assert not again.deleted


def test_fetch_only_scan_records_no_version_of_its_own(db: Index, root: Path) -> None:
    fetched(db, root, "edited.txt", b"as fetched")
    same = fetched(db, root, "same.txt", b"untouched")
    folder = db.add_folder(root, "ab" * 16).id
    sequence = db.max_sequence(folder)
    (root / "edited.txt").write_bytes(b"edited here, never announced")
    (root / "new.txt").write_text("made here")
    (root / "newdir").mkdir()
    (root / "same.txt").touch()  # a new stat, the same content

    summary = scan(db, root, fetch_only=True)

    assert (summary.new, summary.changed, summary.deleted) == (0, 0, 0)
    assert summary.forgotten == 1
    recs = records(db, root)
    # The edit is not announced as a new version: the version recorded is simply not held.
    # The same content under a new mtime is still held, as fetched.
    assert set(recs) == {"same.txt"}
    assert recs["same.txt"] == same
    assert all(r.version.get(ME) == 0 for r in recs.values())
    assert db.max_sequence(folder) == sequence
    # A full scan (a daemon) then records what is here as its own, as for any new file.
    full = scan(db, root)
    assert (full.new, full.changed, full.deleted) == (3, 1, 0)
    assert records(db, root)["edited.txt"].version == VersionVector().bump(ME)


def test_fetch_only_scan_of_an_emptied_folder_neither_deletes_nor_pauses(
    db: Index, root: Path
) -> None:
    for i in range(6):
        fetched(db, root, f"f{i}.bin", bytes([i]) * 100)
    for i in range(6):
        (root / f"f{i}.bin").unlink()
    summary = scan(db, root, fetch_only=True, limits=Limits(ratio=0.5, minimum=5))
    assert (summary.deleted, summary.withheld, summary.paused_reason) == (0, 0, "")
    assert summary.forgotten == 6
    assert records(db, root) == {}


def test_fetch_only_scan_takes_the_peers_current_version_it_already_holds(
    db: Index, root: Path
) -> None:
    # Files left from long ago, found by a node that joined with `init --key`.
    stamp = 1_600_000_000_000_000_000
    for name, text in (
        ("same.txt", "the same everywhere"),
        ("touched.txt", "the same bytes, another mtime"),
        ("old-draft.txt", "an old draft"),
        ("mine.txt", "only here"),
    ):
        (root / name).write_text(text)
        os.utime(root / name, ns=(stamp, stamp))
    os.utime(root / "touched.txt", ns=(stamp + 10**9, stamp + 10**9))
    settle(root)
    mode = (root / "same.txt").stat().st_mode & 0o777
    folder = db.add_folder(root, "ab" * 16).id

    def peer_record(rel: str, text: str, version: VersionVector) -> FileRecord:
        path = root.parent / "peer" / rel
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        hashes = chunker.hash_file(path)
        return FileRecord(
            path=rel,
            type=EntryType.FILE,
            size=len(text),
            mtime_ns=stamp,
            mode=mode,
            blocks=hashes.blocks,
            file_hash=hashes.file_hash,
            hash_algo=hashes.hash_algo,
            version=version,
            sequence=1,
        )

    older = VersionVector().bump(REMOTE)
    newer = older.bump(REMOTE + 1)
    db.remote_upsert(
        folder,
        b"\xaa" * 8,
        [
            peer_record("same.txt", "the same everywhere", older),
            peer_record("old-draft.txt", "an old draft", older),
        ],
    )
    db.remote_upsert(
        folder,
        b"\xbb" * 8,
        [
            peer_record("same.txt", "the same everywhere", newer),
            peer_record("touched.txt", "the same bytes, another mtime", newer),
            peer_record("old-draft.txt", "the report as it is today", newer),
        ],
    )

    summary = scan(db, root, fetch_only=True)

    recs = records(db, root)
    # An old version, or content no peer has, stays unrecorded: never a version of ours.
    assert set(recs) == {"same.txt", "touched.txt"}
    same = recs["same.txt"]
    assert same.version == newer
    assert same.file_hash == chunker.hash_file(root / "same.txt").file_hash
    assert (same.mtime_ns, same.deleted) == (stamp, False)
    # Other metadata: recorded under no version, below the peers', which the planner applies.
    touched = recs["touched.txt"]
    assert touched.version == VersionVector()
    assert touched.mtime_ns == stamp + 10**9
    assert (summary.new, summary.changed, summary.deleted) == (2, 0, 0)
    # What it recorded matches the disk: the next scan reads neither file again.
    hasher = CountingHasher()
    assert scan(db, root, hasher, fetch_only=True).new == 0
    assert not {"same.txt", "touched.txt"} & set(hasher.reads)


def test_scan_folder_records_nothing_without_the_folder_marker(db: Index, root: Path) -> None:
    make_tree(root)
    key = keys.format_key(keys.generate_key())
    folder = FolderConfig(path=root, key=key)
    asyncio.run(scanner.scan_folder(folder, db, ME))  # the first indexing marks the folder
    assert (root / ".lanshare" / "folder-id").is_file()
    (info,) = db.folders()
    before = list(db.iter_records(info.id))
    # The disk is not mounted: an empty directory where the folder was.
    shutil.move(root, root.parent / "disk")
    root.mkdir()
    with pytest.raises(StorageError, match=r"folder marker missing \(disk not mounted\?\)"):
        asyncio.run(scanner.scan_folder(folder, db, ME))
    assert list(db.iter_records(info.id)) == before
    assert not any(r.deleted for r in before)
    # Back in place, deletions found by a scan count again.
    root.rmdir()
    shutil.move(root.parent / "disk", root)
    (root / "top.txt").unlink()
    assert asyncio.run(scanner.scan_folder(folder, db, ME)).deleted == 1


def test_scan_folder_stamps_the_marker_with_the_index_state(db: Index, root: Path) -> None:
    make_tree(root)
    key = keys.parse_key(keys.format_key(keys.generate_key()))
    folder = FolderConfig(path=root, key=keys.format_key(key))
    asyncio.run(scanner.scan_folder(folder, db, ME))
    (info,) = db.folders()
    stamp = marker.generation(root, keys.folder_id(key))
    assert stamp == marker.Generation(info.index_id, info.sequence)


def test_scan_folder_records_nothing_in_a_folder_restored_from_a_backup(
    db: Index, root: Path
) -> None:
    """Recording a restored folder would push its older contents and deletions to every
    peer: ``lanshare scan`` refuses it and leaves it to the daemon's fetch-only scan."""
    key = keys.format_key(keys.generate_key())
    folder = FolderConfig(path=root, key=key)
    (root / "doc.txt").write_text("v1\n")
    asyncio.run(scanner.scan_folder(folder, db, ME))
    backup = (root / MARKER).read_bytes()  # taken with the folder
    (root / "doc.txt").write_text("v2, a day of work\n")
    (root / "new.txt").write_text("made after the backup\n")
    asyncio.run(scanner.scan_folder(folder, db, ME))
    (info,) = db.folders()
    # The backup comes back: the old file, the old marker, nothing newer.
    (root / "doc.txt").write_text("v1\n")
    (root / "new.txt").unlink()
    (root / MARKER).write_bytes(backup)
    with pytest.raises(StorageError, match="backup restored"):
        asyncio.run(scanner.scan_folder(folder, db, ME))
    assert db.folder(info.id).sequence == info.sequence
    kept = {r.path: r for r in db.iter_records(info.id)}
    assert not kept["new.txt"].deleted
    assert kept["doc.txt"].size == len("v2, a day of work\n")


def test_a_file_this_node_lost_track_of_is_not_recorded_but_kept_aside(
    db: Index, root: Path
) -> None:
    """We edited doc.txt twice; the peer holds that version ({A:1, ME:2}). Our record was
    forgotten, and doc.txt now holds other content. No version recorded for it could be
    right (below theirs it is replaced, above theirs an old backup wins), so it is not
    recorded: it is an orphan, with the conflict name to keep it under. The same content
    as the peers' is recorded as usual."""
    folder = db.add_folder(root, "ab" * 16).id
    theirs = dataclasses.replace(
        fetched(db, root, "doc.txt", b"our second edit"),
        version=VersionVector.of({REMOTE: 1, ME: 2}),
    )
    same = dataclasses.replace(
        fetched(db, root, "same.txt", b"identical"), version=VersionVector.of({ME: 3})
    )
    db.remote_reset(folder, PEER, b"\x01" * 8)
    db.remote_upsert(folder, PEER, [theirs, same])
    db.forget(folder, ["doc.txt", "same.txt"])
    (root / "doc.txt").write_bytes(b"an edit made while the daemon was stopped")
    summary = scan(db, root)
    ((path, name),) = summary.orphans
    assert path == "doc.txt"
    assert planner.conflict_original(name) == "doc.txt"
    held = records(db, root)
    assert "doc.txt" not in held
    assert held["same.txt"].file_hash == same.file_hash
    # A node that never held the path records its file as usual (a conflict if it differs).
    never_ours = VersionVector.of({REMOTE: 5})
    db.remote_upsert(
        folder, PEER, [dataclasses.replace(theirs, path="new.txt", version=never_ours)]
    )
    (root / "new.txt").write_bytes(b"mine")
    assert [path for path, _ in scan(db, root).orphans] == ["doc.txt"]  # still, not new.txt
    assert records(db, root)["new.txt"].version == VersionVector().bump(ME)


# -- scanning some paths (a watcher's batch) ------------------------------------------------


class DiskCounter:
    """Counts what the scanner asks of the disk and of the index: every directory it lists,
    every path it stat's by name, and every cache row it loads (entries a directory listing
    yields are only ever stat'ed through their listing, so listings cover them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, db: Index, root: Path) -> None:
        self.listed: list[str] = []
        self.stated: list[str] = []
        self.cached: list[str] = []
        real_scandir, real_lstat, real_cache = os.scandir, os.lstat, db.scan_cache
        prefix = str(root) + os.sep

        def scandir(path: str) -> object:
            self.listed.append(os.fspath(path).removeprefix(prefix))
            return real_scandir(path)

        def lstat(path: str, *args: object, **kw: object) -> os.stat_result:
            self.stated.append(os.fspath(path).removeprefix(prefix))
            return real_lstat(path, *args, **kw)  # type: ignore[arg-type]

        def scan_cache(*args: object, **kw: object) -> object:
            found = real_cache(*args, **kw)  # type: ignore[arg-type]
            self.cached += list(found)
            return found

        monkeypatch.setattr(scanner.os, "scandir", scandir)
        monkeypatch.setattr(scanner.os, "lstat", lstat)
        monkeypatch.setattr(db, "scan_cache", scan_cache)


def thousand_files(root: Path) -> None:
    for d in range(10):
        (root / f"d{d}").mkdir()
        for f in range(100):
            (root / f"d{d}" / f"f{f:03}").write_bytes(b"%d-%d" % (d, f))


def test_a_batch_of_one_path_visits_that_path_alone(
    db: Index, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    thousand_files(root)
    scan(db, root)
    settle(root)
    (root / "d4" / "f042").write_bytes(b"saved again")
    hasher = CountingHasher()
    counter = DiskCounter(monkeypatch, db, root)
    summary = scan(db, root, hasher, only={"d4/f042"})
    assert (summary.new, summary.changed, summary.deleted) == (0, 1, 0)
    assert counter.listed == []  # no directory listed: nothing else of the tree visited
    assert set(counter.stated) <= {"d4", "d4/f042"}
    assert set(counter.cached) == {"d4", "d4/f042"}
    assert set(hasher.reads) == {"f042"}  # read twice if racily fresh, never another
    assert records(db, root)["d4/f042"].version.get(ME) == 2


def test_a_batch_takes_a_new_subtree_and_a_vanished_one_whole(
    db: Index, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    thousand_files(root)
    scan(db, root)
    shutil.rmtree(root / "d7")
    (root / "d3" / "f000").unlink()  # not named by the batch: left for a later scan
    (root / "new" / "deep").mkdir(parents=True)
    (root / "new" / "deep" / "x").write_bytes(b"x")
    counter = DiskCounter(monkeypatch, db, root)
    summary = scan(db, root, only={"d7", "new"})
    assert (summary.new, summary.deleted) == (3, 101)
    # The subtree that came, and the root, where d7 vanished: not the other directories.
    assert sorted(counter.listed) == sorted([str(root), "new", "new/deep"])
    assert all(p.startswith(("d7", "new")) or "/" not in p for p in counter.cached)
    recs = records(db, root)
    assert all(recs[f"d7/f{f:03}"].deleted for f in range(100))
    assert recs["d7"].deleted
    assert not recs["d3/f000"].deleted
    assert not recs["new/deep/x"].deleted
    assert scan(db, root).deleted == 1  # the full scan finds what no batch named


def test_a_batch_records_a_new_file_with_its_new_parents(db: Index, root: Path) -> None:
    (root / "a").mkdir()
    scan(db, root)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "f.txt").write_text("f")
    summary = scan(db, root, only={"a/b/c/f.txt"})
    assert summary.new == 3  # a/b and a/b/c read alone, as ancestors, and the file
    assert {"a/b", "a/b/c", "a/b/c/f.txt"} <= set(records(db, root))


def test_a_batch_keeps_the_ignore_rules_and_the_mass_deletion_guard(db: Index, root: Path) -> None:
    for i in range(20):
        (root / f"f{i}").write_text(str(i))
    scan(db, root)
    (root / "skip.log").write_text("ignored")
    (root / "sub").mkdir()
    (root / "sub" / "x.log").write_text("ignored too")
    summary = scan(db, root, only={"skip.log", "sub/x.log"}, ignore=["*.log"])
    assert "skip.log" not in records(db, root)
    assert "sub/x.log" not in records(db, root)
    assert summary.new == 1  # sub, the ancestor
    for i in range(20):
        (root / f"f{i}").unlink()
    limits = Limits(ratio=0.5, minimum=5)
    held = scan(db, root, only={f"f{i}" for i in range(20)}, limits=limits)
    assert held.deleted == 0
    assert held.withheld == 20
    assert held.verdict is not None
    assert not any(r.deleted for r in records(db, root).values())


def test_a_batch_with_a_deletion_shows_the_guard_the_whole_directory(db: Index, root: Path) -> None:
    """An ``rm`` of many files reaches the scanner in several batches; the first already
    shows the guard every deletion in that directory, so none goes out before it trips."""
    (root / "many").mkdir()
    for i in range(30):
        (root / "many" / f"f{i:02}").write_text(str(i))
    scan(db, root)
    for i in range(30):
        (root / "many" / f"f{i:02}").unlink()
    held = scan(db, root, only={"many/f00"}, limits=Limits(ratio=0.5, minimum=5))
    assert (held.deleted, held.withheld) == (0, 30)
    assert not any(r.deleted for r in records(db, root).values())


def test_a_wipe_in_several_batches_never_gets_past_a_held_guard(db: Index, root: Path) -> None:
    """The watcher hands one ``rm -r a b`` over in several batches. Once the first trips the
    guard, later batches (even of an unrelated path) neither drop the hold nor let the rest
    of the wipe out: while it holds, scans see the whole folder."""
    for name, count in (("a", 30), ("b", 20)):
        (root / name).mkdir()
        for i in range(count):
            (root / name / f"f{i:02}").write_text(f"{name}{i}")
    folder = db.add_folder(root, "ab" * 16).id
    limits = Limits(ratio=0.5, minimum=10)

    def guarded(only: set[str] | None) -> scanner.ScanSummary:
        return asyncio.run(
            scanner.scan_guarded(
                db, folder, root, ME, limits=limits, held_by_peers=False, only=only
            )
        )

    guarded(None)
    shutil.rmtree(root / "a")
    first = guarded({"a"} | {f"a/f{i:02}" for i in range(30)})
    assert first.deleted == 0
    assert first.verdict is not None
    (root / "unrelated.txt").write_text("a save meanwhile")
    assert guarded({"unrelated.txt"}).verdict is not None
    assert db.deletions_held_since(folder) is not None
    shutil.rmtree(root / "b")
    second = guarded({"b"} | {f"b/f{i:02}" for i in range(20)})
    assert second.deleted == 0
    assert second.verdict is not None
    assert not any(r.deleted for r in db.iter_records(folder))


def test_a_batch_never_reads_through_an_ancestor_turned_symlink(
    db: Index, root: Path, tmp_path: Path
) -> None:
    """``a`` replaced by a symlink to a directory outside the folder, and a batch naming
    only ``a/b/c``: nothing outside is read or recorded; ``a`` is the symlink and what was
    below it is deleted, as a full scan finds it."""
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "c").write_text("not shared")
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "c").write_text("shared")
    scan(db, root)
    shutil.rmtree(root / "a")
    (root / "a").symlink_to(outside)
    scan(db, root, only={"a/b/c"})
    after = records(db, root)
    assert after["a"].type is EntryType.SYMLINK
    assert after["a/b"].deleted
    assert after["a/b/c"].deleted


def test_a_rescan_of_a_folder_at_rest_keeps_nothing_of_its_files(
    db: Index, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file the cache says is unchanged is counted and dropped as the walk finds it: the
    walk keeps an entry for each directory only, and no record is decoded."""
    thousand_files(root)
    settle(root)
    first = scan(db, root)
    kept: list[str] = []
    decoded: list[str] = []
    real_entry, real_record = scanner._Entry, index_module._record

    def entry(rel: str, *args: object) -> scanner._Entry:
        kept.append(rel)
        return real_entry(rel, *args)  # type: ignore[arg-type]

    def record(row: Any) -> FileRecord:
        decoded.append(row[0])
        return real_record(row)

    monkeypatch.setattr(scanner, "_Entry", entry)
    monkeypatch.setattr(index_module, "_record", record)
    again = scan(db, root)
    assert sorted(kept) == [f"d{d}" for d in range(10)]
    assert decoded == []
    assert (again.files, again.dirs, again.bytes, again.blocks) == (
        first.files,
        first.dirs,
        first.bytes,
        first.blocks,
    )
    assert (again.new, again.changed, again.deleted) == (0, 0, 0)


def test_an_index_that_fails_mid_scan_is_one_storage_error(db: Index, root: Path) -> None:
    # Enough files for the hashing workers to commit a batch themselves, where the failure
    # used to escape as an ExceptionGroup.
    for i in range(scanner.COMMIT_BATCH + 50):
        (root / f"f{i:05d}").write_bytes(b"")
    folder = db.add_folder(root, "ab" * 16).id
    # The index file may not grow any more: its next write fails as on a full disk.
    conn = db._conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageError, match=r"index database .*: .*full") as raised:
        asyncio.run(scanner.scan_path(db, folder, root, ME, io_workers=3))
    assert "\n" not in str(raised.value)
    assert db.max_sequence(folder) == 0  # the failed batch left nothing behind


def test_one_big_new_file_is_hashed_by_the_idle_workers_too(
    db: Index, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer files than hashing workers: the blocks of the big one are hashed in several
    threads (the record exists sooner), and the record is the one a single thread makes."""
    data = os.urandom(chunker.PARALLEL_ABOVE + 3 * 1024 * 1024)
    (root / "big.bin").write_bytes(data)
    (root / "small.txt").write_bytes(b"small")
    threads: set[int] = set()
    real = chunker._hash_cuts

    def watching(*args: object) -> list[object]:
        threads.add(threading.get_ident())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(chunker, "_hash_cuts", watching)
    summary = scan(db, root, io_workers=4)
    monkeypatch.undo()
    assert summary.new == 2
    record = records(db, root)["big.bin"]
    expected = chunker.hash_buffer(data)
    assert (record.blocks, record.file_hash) == (expected.blocks, expected.file_hash)
    # One group (both files): that group's thread cuts, up to three others hash.
    assert 1 <= len(threads) <= 3
