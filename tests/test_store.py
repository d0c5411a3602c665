"""Folder store on real files: verified assembly, atomic placement, archives, no symlink escapes."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lanshare import chunker
from lanshare.errors import IntegrityError, LocalChangeError, StorageError
from lanshare.index import Index, LocalChange
from lanshare.manifest import EntryType, FileRecord, VersionVector
from lanshare.paths import TEMP_PREFIX
from lanshare.store import (
    VERSIONS_DIR,
    Assembly,
    Buffered,
    FolderStore,
    LocalState,
    Placement,
    VerifiedBlock,
    archived_at,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from lanshare.manifest import BytesLike

NOW = 1_700_000_000.0
DAY = 86400


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


def state_of(root: Path, rel: str, *, cache: bool = True) -> LocalState:
    """What the index holds for the file at ``rel`` as it is now: its record and, with
    ``cache``, the inode and ctime a scan of the file at rest would store."""
    path = root / rel
    st = path.stat()
    record = record_for(rel, path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return LocalState.of(record, st.st_ino, st.st_ctime_ns) if cache else LocalState.of(record)


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def write(store: FolderStore, assembly: Assembly, data: bytes, indexes: Iterable[int]) -> set[int]:
    """Write blocks ``indexes`` of ``data`` (the content of the assembly's record, so
    verified by construction); the indexes written."""
    written = set()
    for i in indexes:
        block = assembly.record.blocks[i]
        store.write_verified(
            assembly, VerifiedBlock(i, data[block.offset : block.offset + block.size])
        )
        written.add(i)
    return written


def write_all(store: FolderStore, assembly: Assembly, data: bytes) -> set[int]:
    return write(store, assembly, data, range(len(assembly.record.blocks)))


def buffered(store: FolderStore, record: FileRecord, data: bytes) -> tuple[Buffered, set[int]]:
    """A download of ``record`` held in memory, every block of ``data`` kept."""
    held = Buffered(store, record)
    for i, block in enumerate(record.blocks):
        held.keep(VerifiedBlock(i, data[block.offset : block.offset + block.size]))
    return held, set(range(len(record.blocks)))


def place(
    store: FolderStore, assembly: Assembly | Buffered, planned: LocalState, verified: set[int]
) -> None:
    """Place one download, raising what kept it out."""
    (error,) = store.place([Placement(assembly, planned, verified)], NOW)
    if error is not None:
        raise error


def assemble(store: FolderStore, record: FileRecord, data: bytes) -> None:
    assembly = store.begin(record)
    place(store, assembly, LocalState(exists=False), write_all(store, assembly, data))


def visible_names(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*")}


def test_download_lands_atomically_with_mode_and_mtime(tmp_path: Path) -> None:
    data = payload(3 * 1024 * 1024)
    record = record_for("docs/report.bin", data)
    assert len(record.blocks) > 3
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    verified = set()
    for i in reversed(range(len(record.blocks))):
        verified |= write(store, assembly, data, [i])
        assert not (tmp_path / "docs" / "report.bin").exists()
    place(store, assembly, LocalState(exists=False), verified)
    target = tmp_path / "docs" / "report.bin"
    assert target.read_bytes() == data
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == record.mtime_ns
    assert not any(name.startswith(TEMP_PREFIX) for name in visible_names(tmp_path))


def test_a_download_held_in_memory_lands_whole_with_mode_and_mtime(tmp_path: Path) -> None:
    """Written under its temporary name, made durable and renamed in one placement, into a
    directory made for it; nothing of it on disk before."""
    data = payload(600_000)
    record = record_for("new/dir/small.bin", data)
    assert len(record.blocks) > 1
    store = FolderStore(tmp_path)
    held, verified = buffered(store, record, data)
    assert not (tmp_path / "new").exists()
    place(store, held, LocalState(exists=False), verified)
    target = tmp_path / "new" / "dir" / "small.bin"
    assert target.read_bytes() == data
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == record.mtime_ns
    assert not any(n.startswith(TEMP_PREFIX) for n in visible_names(tmp_path / "new" / "dir"))


def test_a_block_held_in_memory_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    data = payload(100_000)
    held = Buffered(FolderStore(tmp_path), record_for("f.bin", data))
    with pytest.raises(IntegrityError):
        held.keep(VerifiedBlock(0, data[:-1]))
    assert held.block(0) is None


def test_a_download_held_in_memory_that_cannot_be_written_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    """The write fails half way (the process may not write files that big): the placement
    reports it, the half-written temporary file goes, and the target is untouched."""
    data = payload(100_000)
    store = FolderStore(tmp_path)
    held, verified = buffered(store, record_for("f.bin", data), data)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        (error,) = store.place([Placement(held, LocalState(exists=False), verified)], NOW)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert isinstance(error, StorageError)
    assert visible_names(tmp_path) == set()


def test_a_block_of_the_wrong_size_is_refused_and_not_written(tmp_path: Path) -> None:
    data = payload(600_000)
    record = record_for("a.bin", data)
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    block = record.blocks[0]
    with pytest.raises(IntegrityError):
        store.write_verified(assembly, VerifiedBlock(0, data[: block.size - 1]))
    assert store.verified_blocks(assembly) == set()
    assembly.close()


def test_a_download_is_placed_only_when_every_block_was_verified(tmp_path: Path) -> None:
    data = payload(600_000)
    record = record_for("a.bin", data)
    assert len(record.blocks) > 1
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    verified = write_all(store, assembly, data)
    with pytest.raises(IntegrityError):
        place(store, assembly, LocalState(exists=False), verified - {1})
    forged = dataclasses.replace(record, file_hash=bytes(32))  # blocks that hash to another
    other = store.begin(forged)
    with pytest.raises(IntegrityError):
        place(store, other, LocalState(exists=False), write_all(store, other, data))
    for held in (assembly, other):
        held.close()
    assert not (tmp_path / "a.bin").exists()


def test_a_block_is_not_hashed_again_by_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks come verified (by the protocol, or by read_block): writing and placing them
    hashes nothing, and resuming reads again only the blocks the index listed."""
    data = payload(3 * 1024 * 1024, seed=3)
    record = record_for("big.bin", data)
    hashed: list[int] = []
    real = chunker.block_hash

    def counting(block: BytesLike, algo: str = chunker.DEFAULT_ALGO) -> bytes:
        hashed.append(len(block))
        return real(block, algo)

    monkeypatch.setattr(chunker, "block_hash", counting)
    store = FolderStore(tmp_path)
    first = store.begin(record)
    taken_over = write(store, first, data, [0, 1])
    first.close()
    second = store.begin(record)
    assert store.verified_blocks(second, taken_over) == taken_over
    assert len(hashed) == len(taken_over)
    rest = write(store, second, data, range(2, len(record.blocks)))
    place(store, second, LocalState(exists=False), taken_over | rest)
    assert len(hashed) == len(taken_over)
    assert (tmp_path / "big.bin").read_bytes() == data


def test_resume_finds_blocks_already_written(tmp_path: Path) -> None:
    data = payload(2 * 1024 * 1024, seed=7)
    record = record_for("big.bin", data)
    store = FolderStore(tmp_path)
    first = store.begin(record)
    done = write(store, first, data, [0, 2])
    # Bytes the index would list but that are not the block's (a torn write at a crash).
    garbage = VerifiedBlock(3, bytes(record.blocks[3].size))
    store.write_verified(first, garbage)
    first.close()  # as a crash would leave it
    second = store.begin(record)
    assert store.verified_blocks(second) == done
    assert store.verified_blocks(second, {0, 1, 2, 3, 99}) == done
    rest = write(store, second, data, set(range(len(record.blocks))) - done)
    place(store, second, LocalState(exists=False), done | rest)
    assert (tmp_path / "big.bin").read_bytes() == data


def test_local_edit_during_download_is_never_clobbered(tmp_path: Path) -> None:
    old = b"old content\n"
    (tmp_path / "notes.txt").write_bytes(old)
    planned = state_of(tmp_path, "notes.txt")
    new = payload(300_000)
    record = record_for("notes.txt", new)
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    verified = write_all(store, assembly, new)
    (tmp_path / "notes.txt").write_bytes(b"edited while downloading\n")
    with pytest.raises(LocalChangeError):
        place(store, assembly, planned, verified)
    assembly.close()
    assert (tmp_path / "notes.txt").read_bytes() == b"edited while downloading\n"


def test_replaced_file_is_archived(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "photo.jpg").write_bytes(b"version one")
    planned = state_of(tmp_path, "sub/photo.jpg")
    new = payload(1000)
    record = record_for("sub/photo.jpg", new)
    store = FolderStore(tmp_path)
    assembly = store.begin(record)
    place(store, assembly, planned, write_all(store, assembly, new))
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
    planned = state_of(tmp_path, "d/f.txt")
    store = FolderStore(tmp_path)
    (tmp_path / "d" / "extra.txt").write_bytes(b"unknown to peers")
    store.delete("d/f.txt", EntryType.FILE, planned, NOW)
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
    planned = state_of(tmp_path, "f.txt")
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
    store.set_metadata("a/file", 0o600, 42 * 10**9, state_of(tmp_path, "a/file"))
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
    place(store, one, LocalState(exists=False), write_all(store, one, data))
    place(store, two, LocalState(exists=False), write_all(store, two, data))
    assert (tmp_path / "d/a.bin").read_bytes() == data
    assert (tmp_path / "d/b.bin").read_bytes() == data
    assert visible_names(tmp_path) == {"d", "a.bin", "b.bin"}


def test_discard_temp_leaves_files_not_named_as_temporary(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    store = FolderStore(tmp_path)
    store.discard_temp("keep.txt")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_prune_versions_by_archive_time_not_by_the_files_mtime(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    # An old file archived an hour ago stays; a new file archived 40 days ago goes.
    for name, mtime, archived_ago in (
        ("old.txt", NOW - 40 * DAY, 3600),
        ("new.txt", NOW, 40 * DAY),
    ):
        (tmp_path / name).write_bytes(name.encode())
        os.utime(tmp_path / name, (mtime, mtime))
        assert store.archive(name, NOW - archived_ago) is not None
    assert store.prune_versions(NOW, keep_seconds=30 * DAY) == 1
    remaining = list((tmp_path / VERSIONS_DIR).iterdir())
    assert [p.name for p in remaining] == ["old~20231114-211320.txt"]
    assert remaining[0].read_bytes() == b"old.txt"
    assert remaining[0].stat().st_mtime == NOW - 40 * DAY  # kept as it was, for a restore


def test_an_old_file_is_kept_keep_days_after_it_was_archived(tmp_path: Path) -> None:
    (tmp_path / "tax-2019.pdf").write_bytes(b"old but precious")
    os.chmod(tmp_path / "tax-2019.pdf", 0o640)
    mtime_ns = int(NOW - 40 * DAY) * 10**9
    os.utime(tmp_path / "tax-2019.pdf", ns=(mtime_ns, mtime_ns))
    store = FolderStore(tmp_path)
    archived = store.archive("tax-2019.pdf", NOW)
    assert archived is not None
    kept = tmp_path / archived
    assert (kept.stat().st_mtime_ns, stat.S_IMODE(kept.stat().st_mode)) == (mtime_ns, 0o640)
    for later in (0, 3600, 29 * DAY):
        assert store.prune_versions(NOW + later, keep_seconds=30 * DAY) == 0
        assert kept.read_bytes() == b"old but precious"
    assert store.prune_versions(NOW + 30 * DAY + 1, keep_seconds=30 * DAY) == 1
    assert not kept.exists()


def test_archive_time_is_read_from_the_archived_name() -> None:
    assert archived_at("photo~20231114-221320.jpg") == NOW
    assert archived_at("a~20231114-221320-3.txt") == NOW
    assert archived_at("Makefile~20231114-221320") == NOW
    # A stamp-like part of the file's own name is not the archive time.
    assert archived_at("log~20200101-000000~20231114-221320.txt") == NOW
    assert archived_at(".rc~20200101-000000~20231114-221320") == NOW
    assert archived_at("x~20231114-221320.tar~bak") == NOW
    assert archived_at("notes.txt") is None
    assert archived_at("x~20231399-999999.txt") is None


def test_files_not_named_by_the_store_are_pruned_by_their_last_change(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    (tmp_path / VERSIONS_DIR).mkdir(parents=True)
    (tmp_path / VERSIONS_DIR / "put-here-by-hand.txt").write_bytes(b"mine")
    assert store.prune_versions(time.time(), keep_seconds=30 * DAY) == 0
    assert store.prune_versions(time.time() + 31 * DAY, keep_seconds=30 * DAY) == 1


def test_archive_renames_when_the_file_cannot_take_another_link(tmp_path: Path) -> None:
    """ext4 refuses a 65001st link (EMLINK): the real error a file system without hard
    links gives; archiving falls back to a rename that never replaces an archive."""
    (tmp_path / "f.txt").write_bytes(b"linked too often")
    os.chmod(tmp_path / "f.txt", 0o604)
    os.utime(tmp_path / "f.txt", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    extra = tmp_path / "links"
    extra.mkdir()
    refused: OSError | None = None
    for i in range(70_000):  # bounded: ext4 stops at 65 000 links
        try:
            os.link(tmp_path / "f.txt", extra / str(i))
        except OSError as exc:
            refused = exc
            break
    if refused is None:
        pytest.skip("this file system takes 70 000 links to one file (ext4 stops at 65 000)")
    assert refused.errno == errno.EMLINK, refused
    store = FolderStore(tmp_path)
    (tmp_path / VERSIONS_DIR).mkdir(parents=True)
    (tmp_path / VERSIONS_DIR / "f~20231114-221320.txt").write_bytes(b"an earlier archive")
    archived = store.archive("f.txt", NOW)
    assert archived == f"{VERSIONS_DIR}/f~20231114-221320-2.txt"
    assert (tmp_path / VERSIONS_DIR / "f~20231114-221320.txt").read_bytes() == b"an earlier archive"
    st = (tmp_path / archived).stat()
    assert (tmp_path / archived).read_bytes() == b"linked too often"
    assert (st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (1_600_000_000 * 10**9, 0o604)
    assert not (tmp_path / "f.txt").exists()
    assert (extra / "0").read_bytes() == b"linked too often"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")
def test_archive_copies_when_versions_lie_on_another_mount(tmp_path: Path) -> None:
    """Neither a link nor a rename crosses mounts (EXDEV): the file is copied with its
    mode and mtime, then removed."""
    versions = tmp_path / VERSIONS_DIR
    versions.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "lanshare-test", str(versions)], check=True
    )
    try:
        (tmp_path / "d").mkdir()
        data = payload(300_000)
        (tmp_path / "d" / "f.bin").write_bytes(data)
        os.chmod(tmp_path / "d" / "f.bin", 0o640)
        os.utime(tmp_path / "d" / "f.bin", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
        with pytest.raises(OSError, match="Invalid cross-device link"):
            os.link(tmp_path / "d" / "f.bin", versions / "probe")
        store = FolderStore(tmp_path)
        (versions / "d").mkdir()
        (versions / "d" / "f~20231114-221320.bin").write_bytes(b"an earlier archive")
        archived = store.archive("d/f.bin", NOW)
        assert archived == f"{VERSIONS_DIR}/d/f~20231114-221320-2.bin"
        st = (tmp_path / archived).stat()
        assert (tmp_path / archived).read_bytes() == data
        assert (st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (1_600_000_000 * 10**9, 0o640)
        assert (versions / "d" / "f~20231114-221320.bin").read_bytes() == b"an earlier archive"
        assert not (tmp_path / "d" / "f.bin").exists()
    finally:
        subprocess.run(["umount", str(versions)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")
def test_a_replaced_file_is_archived_by_a_copy_where_it_cannot_be_linked(tmp_path: Path) -> None:
    """A placement over a file whose archive cannot be a link (another mount: EXDEV) copies
    it there, never moves it: the file keeps its name until the new one is renamed over."""
    versions = tmp_path / VERSIONS_DIR
    versions.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "lanshare-test", str(versions)], check=True
    )
    try:
        write_at_rest(tmp_path / "doc.txt", REPLACED)
        os.chmod(tmp_path / "doc.txt", 0o640)
        planned = state_of(tmp_path, "doc.txt")
        store = FolderStore(tmp_path)
        assembly = store.begin(record_for("doc.txt", ARRIVED))
        place(store, assembly, planned, write_all(store, assembly, ARRIVED))
        assert (tmp_path / "doc.txt").read_bytes() == ARRIVED
        archived = versions / "doc~20231114-221320.txt"
        st = archived.stat()
        assert archived.read_bytes() == REPLACED
        assert (st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (OLD_MTIME_NS, 0o640)
    finally:
        subprocess.run(["umount", str(versions)], check=True)


def test_a_conflict_copy_already_there_keeps_both_and_places_nothing(tmp_path: Path) -> None:
    write_at_rest(tmp_path / "doc.txt", REPLACED)
    (tmp_path / CONFLICT_COPY).write_bytes(b"someone's file of that name")
    planned = state_of(tmp_path, "doc.txt")
    store = FolderStore(tmp_path)
    assembly = store.begin(record_for("doc.txt", ARRIVED))
    verified = write_all(store, assembly, ARRIVED)
    (error,) = store.place([Placement(assembly, planned, verified, CONFLICT_COPY)], NOW)
    assembly.close()
    assert isinstance(error, LocalChangeError)
    assert (tmp_path / "doc.txt").read_bytes() == REPLACED
    assert (tmp_path / CONFLICT_COPY).read_bytes() == b"someone's file of that name"


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


# -- modes from a peer: permission bits only, under our umask ----------------------------------


def our_umask() -> int:
    """The test process's umask (no other thread of the test creates files meanwhile)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def assert_mode(path: Path, mode: int) -> None:
    """``path`` has the permission bits ``mode`` under our umask and no set-id or sticky bit."""
    actual = stat.S_IMODE(path.stat().st_mode)
    assert actual & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0, f"{actual:04o}"
    assert actual == mode & ~our_umask(), f"{actual:04o}"


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_download_never_gets_set_id_bits_from_a_peer(tmp_path: Path, in_memory: bool) -> None:
    """A record claiming ``rwsrwsrwt`` lands with its permission bits only, masked by the
    umask, whether written block by block or held in memory."""
    data = payload(300_000)
    record = record_for("tool", data, mode=0o7777)
    store = FolderStore(tmp_path)
    if in_memory:
        held, verified = buffered(store, record, data)
        place(store, held, LocalState(exists=False), verified)
    else:
        assemble(store, record, data)
    assert (tmp_path / "tool").read_bytes() == data
    assert_mode(tmp_path / "tool", 0o777)


def test_a_directory_never_gets_a_sticky_or_set_id_bit_from_a_peer(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    store.make_dir("shared/drop", 0o3777)
    assert_mode(tmp_path / "shared" / "drop", 0o777)
    store.make_dir("shared/drop", 0o1700)
    assert_mode(tmp_path / "shared" / "drop", 0o700)


def test_metadata_from_a_peer_sets_permission_bits_only(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    store.set_metadata("file", 0o6777, 42 * 10**9, state_of(tmp_path, "file"))
    store.set_metadata("dir", 0o1777, 1, LocalState(True))
    assert_mode(tmp_path / "file", 0o777)
    assert (tmp_path / "file").stat().st_mtime_ns == 42 * 10**9
    assert_mode(tmp_path / "dir", 0o777)


# -- a local edit that keeps size and mtime ----------------------------------------------------

OLD_MTIME_NS = 1_600_000_000 * 10**9
INDEXED = b"version one, as indexed\n"
EDITED = b"version two, restored!!\n"


def write_at_rest(path: Path, data: bytes) -> None:
    """A file last modified long ago (so its stat cache is not racy)."""
    path.write_bytes(data)
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


def edit_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What ``cp -p`` or ``rsync -t`` of another version does: other bytes, same size, the
    old mtime put back."""
    st = path.stat()
    assert len(data) == st.st_size
    with path.open("r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def replace_by_download(store: FolderStore, rel: str, planned: LocalState) -> None:
    new = payload(5000, seed=99)
    record = record_for(rel, new)
    assembly = store.begin(record)
    try:
        place(store, assembly, planned, write_all(store, assembly, new))
    finally:
        assembly.close()


ACTIONS: dict[str, Callable[[FolderStore, str, LocalState], None]] = {
    "download": replace_by_download,
    "delete": lambda store, rel, planned: store.delete(rel, EntryType.FILE, planned, NOW),
    "metadata": lambda store, rel, planned: store.set_metadata(rel, 0o600, 7 * 10**18, planned),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_an_edit_keeping_size_and_mtime_is_never_replaced(tmp_path: Path, action: str) -> None:
    write_at_rest(tmp_path / "doc.txt", INDEXED)
    planned = state_of(tmp_path, "doc.txt")
    edit_keeping_size_and_mtime(tmp_path / "doc.txt", EDITED)
    with pytest.raises(LocalChangeError, match="changed locally"):
        ACTIONS[action](FolderStore(tmp_path), "doc.txt", planned)
    st = (tmp_path / "doc.txt").stat()
    assert (tmp_path / "doc.txt").read_bytes() == EDITED
    assert st.st_mtime_ns == OLD_MTIME_NS
    assert not (tmp_path / VERSIONS_DIR).exists()


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_an_unchanged_file_is_still_replaced(tmp_path: Path, action: str) -> None:
    for cache in (True, False):  # a trusted stat cache, or none: the file is read again
        write_at_rest(tmp_path / "doc.txt", INDEXED)
        ACTIONS[action](
            FolderStore(tmp_path), "doc.txt", state_of(tmp_path, "doc.txt", cache=cache)
        )
        if action == "metadata":
            assert (tmp_path / "doc.txt").stat().st_mtime_ns == 7 * 10**18
        else:
            assert (tmp_path / "doc.txt").exists() is (action == "download")
            archived = sorted((tmp_path / VERSIONS_DIR).iterdir())[-1]
            assert archived.read_bytes() == INDEXED
            shutil.rmtree(tmp_path / VERSIONS_DIR)


def test_a_write_within_the_timestamp_tick_of_the_scan_is_caught_by_reading(tmp_path: Path) -> None:
    """The scan read version one; a write in the same clock tick left mtime, ctime and inode
    as the scan saw them (coarse timestamps). Only the content tells: the scan ran within
    ``RACY_WINDOW_NS`` of the write, so it stored its cache as untrusted (``ctime_ns = 0``),
    and the store reads the file."""
    path = tmp_path / "doc.txt"
    path.write_bytes(b"version two, same tick\n")
    st = path.stat()
    assert st.st_ctime_ns - st.st_mtime_ns < chunker.RACY_WINDOW_NS
    scanned = record_for("doc.txt", b"version one, scanned!!\n", mtime_ns=st.st_mtime_ns)
    planned = LocalState.of(scanned, st.st_ino, 0)
    assert planned.size == st.st_size
    with pytest.raises(LocalChangeError):
        replace_by_download(FolderStore(tmp_path), "doc.txt", planned)
    assert path.read_bytes() == b"version two, same tick\n"


def test_a_trusted_stat_cache_spares_reading_the_file(tmp_path: Path) -> None:
    """On a file system that keeps inode numbers and ctimes, an unchanged stat of a file at
    rest is proof enough: the store does not read it (here the record's block hashes are
    not even this content's, which a reading would have caught)."""
    write_at_rest(tmp_path / "big.bin", payload(4096, seed=5))
    st = (tmp_path / "big.bin").stat()
    other = record_for("big.bin", payload(4096, seed=6), mtime_ns=OLD_MTIME_NS)
    replace_by_download(
        FolderStore(tmp_path), "big.bin", LocalState.of(other, st.st_ino, st.st_ctime_ns)
    )
    assert (tmp_path / "big.bin").read_bytes() == payload(5000, seed=99)


def test_a_file_written_here_is_not_read_again_when_its_stat_is_trusted(
    tmp_path: Path,
) -> None:
    """A file saved here has its mtime equal to its ctime: that alone is no reason to read
    it again before replacing it. The scan that recorded it already stores an untrusted
    cache (``ctime_ns = 0``) when it ran within the racy window of the write."""
    (tmp_path / "edited.bin").write_bytes(payload(4096, seed=7))
    st = (tmp_path / "edited.bin").stat()
    assert abs(st.st_mtime_ns - st.st_ctime_ns) < chunker.RACY_WINDOW_NS
    # The record's blocks are not this content's: a reading would have refused.
    other = record_for("edited.bin", payload(4096, seed=8), mtime_ns=st.st_mtime_ns)
    replace_by_download(
        FolderStore(tmp_path), "edited.bin", LocalState.of(other, st.st_ino, st.st_ctime_ns)
    )
    assert (tmp_path / "edited.bin").read_bytes() == payload(5000, seed=99)


def test_a_file_replaced_by_a_directory_is_kept(tmp_path: Path) -> None:
    write_at_rest(tmp_path / "thing", b"a file once")
    planned = state_of(tmp_path, "thing")
    (tmp_path / "thing").unlink()
    (tmp_path / "thing").mkdir()
    with pytest.raises(LocalChangeError, match="no longer a regular file"):
        FolderStore(tmp_path).delete("thing", EntryType.FILE, planned, NOW)
    assert (tmp_path / "thing").is_dir()


def test_the_index_gives_the_scan_cache_of_the_record_the_plan_saw(tmp_path: Path) -> None:
    with Index.open(tmp_path / "index.sqlite3") as index:
        folder = index.add_folder(tmp_path / "share", "f" * 16).id
        first = dataclasses.replace(record_for("a.txt", b"one"), version=VersionVector().bump(1))
        (stored,) = index.commit_changes(folder, [LocalChange(first, inode=11, ctime_ns=22)])
        assert index.stat_cache(folder, "a.txt", stored.sequence) == (11, 22)
        assert index.stat_cache(folder, "missing.txt", stored.sequence) == (0, 0)
        # A scan recorded a newer version meanwhile: its cache says nothing of the old one.
        second = dataclasses.replace(first, size=3, version=first.version.bump(1))
        (newer,) = index.commit_changes(folder, [LocalChange(second, inode=11, ctime_ns=33)])
        assert index.stat_cache(folder, "a.txt", stored.sequence) == (0, 0)
        assert index.stat_cache(folder, "a.txt", newer.sequence) == (11, 33)


# -- FAT and exFAT -----------------------------------------------------------------------------


@pytest.fixture(params=["exfat", "vfat"])
def fat_mount(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A real exFAT or FAT image, mounted. This kernel has neither driver built in, so the
    FUSE drivers (exfat-fuse, fusefat) serve the same on-disk formats from user space."""
    kind: str = request.param
    tools = (
        ("mkfs.exfat", "mount.exfat-fuse", "losetup")
        if kind == "exfat"
        else ("mkfs.vfat", "fusefat")
    )
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing or os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip(f"a {kind} mount needs root, /dev/fuse and {', '.join(tools)}")
    image = tmp_path / f"{kind}.img"
    with image.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    mount = tmp_path / "mnt"
    mount.mkdir()
    loop = ""
    if kind == "exfat":
        subprocess.run(["mkfs.exfat", str(image)], check=True, capture_output=True)
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(["mount.exfat-fuse", loop, str(mount)], check=True, capture_output=True)
    else:
        subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
        subprocess.run(
            ["fusefat", "-o", "rw+", str(image), str(mount)], check=True, capture_output=True
        )
    try:
        assert os.path.ismount(mount)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)


def test_archive_keeps_the_file_where_hard_links_fail(fat_mount: Path) -> None:
    (fat_mount / "probe").write_bytes(b"")
    with pytest.raises(PermissionError):
        os.link(fat_mount / "probe", fat_mount / "probe2")
    (fat_mount / "probe").unlink()
    store = FolderStore(fat_mount)
    (fat_mount / "d").mkdir()
    write_at_rest(fat_mount / "d" / "report.txt", b"kept on a FAT disk")
    for expected in ("report~20231114-221320.txt", "report~20231114-221320-2.txt"):
        archived = store.archive("d/report.txt", NOW)
        assert archived == f"{VERSIONS_DIR}/d/{expected}"
        assert (fat_mount / archived).read_bytes() == b"kept on a FAT disk"
        assert (fat_mount / archived).stat().st_mtime_ns == OLD_MTIME_NS
        assert not (fat_mount / "d" / "report.txt").exists()
        write_at_rest(fat_mount / "d" / "report.txt", b"kept on a FAT disk")
    assert store.prune_versions(NOW + 29 * DAY, keep_seconds=30 * DAY) == 0
    assert len(list((fat_mount / VERSIONS_DIR / "d").iterdir())) == 2


def test_an_edit_keeping_size_and_mtime_is_caught_on_fat(fat_mount: Path) -> None:
    """FAT's ctime follows its mtime and its inode numbers are made up at mount: a stat
    that did not move proves nothing there, so the store reads the file. (A delete: fusefat
    cannot ``ftruncate`` the temporary file of a download; every action runs the same check.)"""
    write_at_rest(fat_mount / "doc.txt", INDEXED)
    before = (fat_mount / "doc.txt").stat()
    planned = state_of(fat_mount, "doc.txt")
    edit_keeping_size_and_mtime(fat_mount / "doc.txt", EDITED)
    after = (fat_mount / "doc.txt").stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    with pytest.raises(LocalChangeError):
        FolderStore(fat_mount).delete("doc.txt", EntryType.FILE, planned, NOW)
    assert (fat_mount / "doc.txt").read_bytes() == EDITED
    assert not (fat_mount / VERSIONS_DIR).exists()


def test_a_batch_is_placed_with_one_fsync_per_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small files: each file fsynced once, each directory once for the batch; a file
    whose target changed meanwhile stays out, the others land."""
    store = FolderStore(tmp_path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "edited.txt").write_bytes(b"planned\n")
    planned_edit = state_of(tmp_path, "b/edited.txt")
    batch = []
    contents = {}
    for i in range(40):
        rel = f"{'ab'[i % 2]}/f{i:02d}.dat"
        contents[rel] = payload(100 + i, seed=i)
        assembly = store.begin(record_for(rel, contents[rel]))
        batch.append(
            Placement(assembly, LocalState(exists=False), write_all(store, assembly, contents[rel]))
        )
    edit = record_for("b/edited.txt", payload(50))
    assembly = store.begin(edit)
    batch.append(Placement(assembly, planned_edit, write_all(store, assembly, payload(50))))
    (tmp_path / "b" / "edited.txt").write_bytes(b"edited meanwhile\n")
    synced: list[str] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    errors = store.place(batch, NOW)
    monkeypatch.undo()
    assert errors[:-1] == [None] * 40
    assert isinstance(errors[-1], LocalChangeError)
    batch[-1].assembly.close()
    assert synced.count("dir") == 2  # a/ and b/, once each
    assert synced.count("file") == 41
    for rel, data in contents.items():
        assert (tmp_path / rel).read_bytes() == data
    assert (tmp_path / "b" / "edited.txt").read_bytes() == b"edited meanwhile\n"
    assert not any(n.startswith(TEMP_PREFIX) for n in visible_names(tmp_path / "a"))


def test_the_files_of_a_batch_are_made_durable_side_by_side_before_any_is_placed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsyncs of a batch's files overlap (the file system commits them together), and
    each ends before the first file is renamed into place."""
    store = FolderStore(tmp_path)
    batch = []
    for i in range(8):
        rel = f"f{i}.dat"
        assembly = store.begin(record_for(rel, payload(100, seed=i)))
        batch.append(
            Placement(
                assembly, LocalState(exists=False), write_all(store, assembly, payload(100, seed=i))
            )
        )
    # The first two file fsyncs wait for each other: only fsyncs in progress at once get by.
    together = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append("dir fsync")
        else:
            with lock:
                first_two = events.count("file fsync") < 2
                events.append("file fsync")
            if first_two:
                together.wait()
        real_fsync(fd)

    def rename(*args: Any, **kwargs: Any) -> None:
        events.append("rename")
        real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    errors = store.place(batch, NOW)
    monkeypatch.undo()
    assert errors == [None] * 8
    assert events.count("file fsync") == 8
    assert events.index("rename") > max(i for i, e in enumerate(events) if e == "file fsync")
    for i in range(8):
        assert (tmp_path / f"f{i}.dat").read_bytes() == payload(100, seed=i)


# -- kill -9 in the middle of a placement ------------------------------------------------------

CHANGES = frozenset({"os.link", "os.rename", "os.remove", "os.mkdir", "os.chmod", "os.utime"})
"""Audit events of the calls that change a folder: a child is killed just before one."""
CONFLICT_COPY = "doc.sync-conflict-20231114-221320-0000abcd.txt"
REPLACED = b"the version here, replaced by the download\n" * 100
ARRIVED = payload(300_000, seed=7)


def place_and_die(root: Path, kill_before: int, keep_as: str, held: str = "") -> None:
    """In a child process: place a download of ``doc.txt`` over the file there (``held``:
    one held in memory until then), killed with SIGKILL just before the ``kill_before``-th
    call that changes the folder."""
    planned = state_of(root, "doc.txt")
    store = FolderStore(root)
    record = record_for("doc.txt", ARRIVED)
    assembly: Assembly | Buffered
    if held:
        assembly, verified = buffered(store, record, ARRIVED)
    else:
        assembly = store.begin(record)
        verified = write_all(store, assembly, ARRIVED)
    seen = 0

    def hook(event: str, args: tuple[object, ...]) -> None:
        nonlocal seen
        if event in CHANGES:
            seen += 1
            if seen == kill_before:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    (error,) = store.place([Placement(assembly, planned, verified, keep_as)], NOW)
    assert error is None, error


def regular_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and not p.name.startswith(TEMP_PREFIX)
    }


@pytest.mark.parametrize("held", ["", "in memory"], ids=["temporary file", "held in memory"])
@pytest.mark.parametrize("keep_as", ["", CONFLICT_COPY], ids=["archive", "conflict"])
def test_a_kill_at_any_point_of_a_placement_leaves_old_or_new_under_the_name(
    tmp_path: Path, keep_as: str, held: str
) -> None:
    """Killed before each change a placement makes in turn, then once let to finish: the
    path always holds the replaced file or the whole new one (never nothing: a scan would
    record a deletion), and the replaced file is always somewhere (the path, its archive,
    its conflict copy)."""
    repo = Path(__file__).resolve().parent.parent
    finished = False
    kills = 0
    for kill_before in range(1, 30):  # bounded: a placement makes a handful of changes
        root = tmp_path / f"kill-{kill_before}"
        root.mkdir()
        write_at_rest(root / "doc.txt", REPLACED)
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from tests.test_store import "
                "place_and_die; place_and_die(Path(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])",
                str(root),
                str(kill_before),
                keep_as,
                held,
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        files = regular_files(root)
        assert files.get("doc.txt") in (REPLACED, ARRIVED), (kill_before, sorted(files))
        assert set(files.values()) <= {REPLACED, ARRIVED}, kill_before
        assert REPLACED in files.values(), (kill_before, sorted(files))
        if child.returncode == 0:
            assert files["doc.txt"] == ARRIVED
            kept = [rel for rel, data in files.items() if data == REPLACED]
            assert kept == [keep_as or f"{VERSIONS_DIR}/doc~20231114-221320.txt"]
            finished = True
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        kills += 1
    assert finished
    assert kills >= 3  # the file's mode and mtime, its second name, the rename
