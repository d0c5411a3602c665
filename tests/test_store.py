"""Folder store on real files: verified assembly, atomic placement, archives, no symlink escapes."""

from __future__ import annotations

import os
import random
import stat
from typing import TYPE_CHECKING

import pytest

from lanshare import chunker
from lanshare.errors import IntegrityError, LocalChangeError, StorageError
from lanshare.manifest import EntryType, FileRecord
from lanshare.paths import TEMP_PREFIX
from lanshare.store import VERSIONS_DIR, FolderStore, LocalState

if TYPE_CHECKING:
    from pathlib import Path

NOW = 1_700_000_000.0


def record_for(path: str, data: bytes, mode: int = 0o640, mtime_ns: int = 1_600_000_000 * 10**9):
    hashes = chunker.hash_buffer(data)
    return FileRecord(
        path=path,
        type=EntryType.FILE,
        size=len(data),
        mtime_ns=mtime_ns,
        mode=stat.S_IFREG | mode,
        blocks=hashes.blocks,
        file_hash=hashes.file_hash,
        hash_algo=hashes.hash_algo,
    )


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def assemble(store: FolderStore, record: FileRecord, data: bytes) -> None:
    assembly = store.begin(record)
    for i, block in enumerate(record.blocks):
        store.write_block(assembly, i, data[block.offset : block.offset + block.size])
    store.commit(assembly, LocalState(exists=False), NOW)


def visible_names(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*")}


def test_download_lands_atomically_with_mode_and_mtime(tmp_path: Path) -> None:
    data = payload(3 * 1024 * 1024)
    record = record_for("docs/report.bin", data)
    assert len(record.blocks) > 3
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    for i in reversed(range(len(record.blocks))):
        block = record.blocks[i]
        store.write_block(assembly, i, data[block.offset : block.offset + block.size])
        assert not (tmp_path / "docs" / "report.bin").exists()
    store.commit(assembly, LocalState(exists=False), NOW)
    target = tmp_path / "docs" / "report.bin"
    assert target.read_bytes() == data
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == record.mtime_ns
    assert not any(name.startswith(TEMP_PREFIX) for name in visible_names(tmp_path))


def test_block_with_wrong_bytes_is_refused_and_not_written(tmp_path: Path) -> None:
    data = payload(600_000)
    record = record_for("a.bin", data)
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    block = record.blocks[0]
    forged = bytearray(data[: block.size])
    forged[10] ^= 0xFF
    with pytest.raises(IntegrityError):
        store.write_block(assembly, 0, forged)
    with pytest.raises(IntegrityError):
        store.write_block(assembly, 0, data[: block.size - 1])
    assert store.verified_blocks(assembly) == set()
    with pytest.raises(IntegrityError):
        store.commit(assembly, LocalState(exists=False), NOW)
    assembly.close()
    assert not (tmp_path / "a.bin").exists()


def test_resume_finds_blocks_already_written(tmp_path: Path) -> None:
    data = payload(2 * 1024 * 1024, seed=7)
    record = record_for("big.bin", data)
    store = FolderStore(tmp_path)
    first = store.begin(record)
    done = {0, 2}
    for i in done:
        block = record.blocks[i]
        store.write_block(first, i, data[block.offset : block.offset + block.size])
    first.close()  # as a crash would leave it
    second = store.begin(record)
    assert store.verified_blocks(second) == done
    assert store.verified_blocks(second, {0, 1, 2, 99}) == done
    for i, block in enumerate(record.blocks):
        if i not in done:
            store.write_block(second, i, data[block.offset : block.offset + block.size])
    store.commit(second, LocalState(exists=False), NOW)
    assert (tmp_path / "big.bin").read_bytes() == data


def test_local_edit_during_download_is_never_clobbered(tmp_path: Path) -> None:
    old = b"old content\n"
    (tmp_path / "notes.txt").write_bytes(old)
    st = (tmp_path / "notes.txt").stat()
    planned = LocalState(exists=True, size=st.st_size, mtime_ns=st.st_mtime_ns)
    new = payload(300_000)
    record = record_for("notes.txt", new)
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    for i, block in enumerate(record.blocks):
        store.write_block(assembly, i, new[block.offset : block.offset + block.size])
    (tmp_path / "notes.txt").write_bytes(b"edited while downloading\n")
    with pytest.raises(LocalChangeError):
        store.commit(assembly, planned, NOW)
    assembly.close()
    assert (tmp_path / "notes.txt").read_bytes() == b"edited while downloading\n"


def test_replaced_file_is_archived(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "photo.jpg").write_bytes(b"version one")
    st = (tmp_path / "sub" / "photo.jpg").stat()
    new = payload(1000)
    record = record_for("sub/photo.jpg", new)
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    store.write_block(assembly, 0, new)
    store.commit(assembly, LocalState(True, st.st_size, st.st_mtime_ns), NOW)
    assert (tmp_path / "sub" / "photo.jpg").read_bytes() == new
    archived = list((tmp_path / VERSIONS_DIR / "sub").iterdir())
    assert [p.name for p in archived] == ["photo~20231114-221320.jpg"]
    assert archived[0].read_bytes() == b"version one"


def test_symlinked_directory_is_never_written_through(tmp_path: Path) -> None:
    root = tmp_path / "share"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    data = b"attack"
    store = FolderStore(root)
    with pytest.raises(StorageError, match="not a real directory"):
        store.begin(record_for("escape/owned.txt", data))
    with pytest.raises(StorageError):
        store.make_dir("escape/newdir", 0o755)
    assert list(outside.iterdir()) == []


def test_serving_rechecks_the_bytes_on_disk(tmp_path: Path) -> None:
    data = payload(400_000)
    record = record_for("served.bin", data)
    (tmp_path / "served.bin").write_bytes(data)
    store = FolderStore(tmp_path)
    block = record.blocks[0]
    assert store.read_block("served.bin", block, record.hash_algo) == data[: block.size]
    with open(tmp_path / "served.bin", "r+b") as handle:
        handle.write(b"changed")
    assert store.read_block("served.bin", block, record.hash_algo) is None
    assert store.read_block("missing.bin", block, record.hash_algo) is None
    os.symlink(tmp_path / "served.bin", tmp_path / "link.bin")
    assert store.read_block("link.bin", record.blocks[-1], record.hash_algo) is None


def test_delete_archives_files_and_keeps_unknown_content(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_bytes(b"keep me")
    st = (tmp_path / "d" / "f.txt").stat()
    store = FolderStore(tmp_path)
    (tmp_path / "d" / "extra.txt").write_bytes(b"unknown to peers")
    store.delete("d/f.txt", EntryType.FILE, LocalState(True, st.st_size, st.st_mtime_ns), NOW)
    assert not (tmp_path / "d" / "f.txt").exists()
    assert (tmp_path / VERSIONS_DIR / "d" / "f~20231114-221320.txt").read_bytes() == b"keep me"
    with pytest.raises(LocalChangeError):
        store.delete("d", EntryType.DIR, LocalState(True), NOW)
    assert (tmp_path / "d" / "extra.txt").exists()
    (tmp_path / "d" / "extra.txt").unlink()
    store.delete("d", EntryType.DIR, LocalState(True), NOW)
    assert not (tmp_path / "d").exists()


def test_delete_of_a_locally_changed_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"one")
    planned = LocalState(True, 3, (tmp_path / "f.txt").stat().st_mtime_ns)
    (tmp_path / "f.txt").write_bytes(b"changed!")
    with pytest.raises(LocalChangeError):
        FolderStore(tmp_path).delete("f.txt", EntryType.FILE, planned, NOW)
    assert (tmp_path / "f.txt").read_bytes() == b"changed!"


def test_symlinks_dirs_metadata_and_renames(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    store.make_dir("a/b/c", 0o750)
    assert stat.S_IMODE((tmp_path / "a" / "b" / "c").stat().st_mode) == 0o750
    store.make_symlink("a/link", "../../etc/passwd")
    assert os.readlink(tmp_path / "a" / "link") == "../../etc/passwd"
    store.make_symlink("a/link", "b")
    assert os.readlink(tmp_path / "a" / "link") == "b"
    (tmp_path / "a" / "file").write_bytes(b"x")
    with pytest.raises(LocalChangeError):
        store.make_symlink("a/file", "b")
    st = (tmp_path / "a" / "file").stat()
    store.set_metadata("a/file", 0o600, 42 * 10**9, LocalState(True, 1, st.st_mtime_ns))
    st = (tmp_path / "a" / "file").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 42 * 10**9)
    store.rename_local("a/file", "a/file.sync-conflict")
    assert (tmp_path / "a" / "file.sync-conflict").read_bytes() == b"x"
    (tmp_path / "a" / "other").write_bytes(b"y")
    with pytest.raises(LocalChangeError):
        store.rename_local("a/other", "a/file.sync-conflict")
    assert (tmp_path / "a" / "file.sync-conflict").read_bytes() == b"x"


def test_discard_removes_the_temporary_file(tmp_path: Path) -> None:
    data = payload(1000)
    record = record_for("x.bin", data)
    store = FolderStore(tmp_path)
    store.begin(record).close()
    assert any(n.startswith(TEMP_PREFIX) for n in visible_names(tmp_path))
    store.discard(record)
    assert visible_names(tmp_path) == set()


def test_same_content_at_two_paths_assembles_in_two_temporary_files(tmp_path: Path) -> None:
    data = payload(5000)
    first, second = record_for("d/a.bin", data), record_for("d/b.bin", data)
    store = FolderStore(tmp_path)
    assert store.temp_path(first) != store.temp_path(second)
    assert store.temp_path(first) == store.temp_path(record_for("d/a.bin", data))  # resumes
    assert store.temp_path(first).startswith("d/" + TEMP_PREFIX)
    one, two = store.begin(first), store.begin(second)
    for i, block in enumerate(first.blocks):
        chunk = data[block.offset : block.offset + block.size]
        store.write_block(one, i, chunk)
        store.write_block(two, i, chunk)
    store.commit(one, LocalState(exists=False), NOW)
    store.commit(two, LocalState(exists=False), NOW)
    assert (tmp_path / "d/a.bin").read_bytes() == data
    assert (tmp_path / "d/b.bin").read_bytes() == data
    assert visible_names(tmp_path) == {"d", "a.bin", "b.bin"}


def test_discard_temp_leaves_files_not_named_as_temporary(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    store = FolderStore(tmp_path)
    store.discard_temp("keep.txt")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_prune_versions_by_age(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    for name, age in (("old.txt", 40 * 86400), ("new.txt", 3600)):
        (tmp_path / name).write_bytes(name.encode())
        archived = store.archive(name, NOW - age)
        assert archived is not None
        os.utime(tmp_path / archived, (NOW - age, NOW - age))
    assert store.prune_versions(NOW, keep_seconds=30 * 86400) == 1
    remaining = [p.name for p in (tmp_path / VERSIONS_DIR).iterdir()]
    assert len(remaining) == 1
    assert remaining[0].startswith("new~")


def test_two_archives_in_one_second_are_both_kept(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    for content in (b"first", b"second", b"third"):
        (tmp_path / "a.txt").write_bytes(content)
        assert store.archive("a.txt", NOW) is not None
    kept = sorted((tmp_path / VERSIONS_DIR).iterdir())
    assert [p.name for p in kept] == [
        "a~20231114-221320-2.txt",
        "a~20231114-221320-3.txt",
        "a~20231114-221320.txt",
    ]
    assert sorted(p.read_bytes() for p in kept) == [b"first", b"second", b"third"]
    assert not (tmp_path / "a.txt").exists()


def test_metadata_of_directories_and_symlinks(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    store.make_dir("d", 0o755)
    store.make_symlink("link", "d")
    store.set_metadata("d", 0o700, 1, LocalState(True))
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    store.set_metadata("link", 0o600, 1, LocalState(True))
    assert os.readlink(tmp_path / "link") == "d"
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
