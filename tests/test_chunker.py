"""Tests of block boundaries and hashes: the pure core over buffers and hash_file on real files."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare import chunker, hashes
from lanshare.chunker import (
    DEFAULT_ALGO,
    MAX_FILE_SIZE,
    ChunkParams,
    block_hash,
    chunk_params,
    hash_buffer,
    hash_file,
    split_blocks,
    whole_file_hash,
)
from lanshare.errors import StorageError
from lanshare.manifest import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    Block,
    EntryType,
    FileRecord,
    decode_record,
    encode_record,
)

KiB = 1024
MiB = 1024 * KiB
SMALL = ChunkParams(256, 1024, 4096)  # pyfastcdc's smallest bounds: many chunks from little data


def _data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def _check_cover(blocks: tuple[Block, ...], data: bytes, algo: str) -> None:
    offset = 0
    for block in blocks:
        assert block.offset == offset
        assert block.hash == block_hash(data[offset : offset + block.size], algo)
        offset += block.size
    assert offset == len(data)


@pytest.mark.parametrize("algo", sorted(hashes.BY_NAME))
def test_every_registered_algorithm_is_supported(algo: str) -> None:
    assert len(block_hash(b"x", algo)) == hashes.get(algo).digest_size


def test_hashes_are_the_named_algorithms() -> None:
    assert block_hash(b"abc", "sha256") == hashlib.sha256(b"abc").digest()
    assert block_hash(b"abc", "blake3") == blake3.blake3(b"abc").digest()
    assert DEFAULT_ALGO == "blake3"
    with pytest.raises(ValueError, match="md5"):
        block_hash(b"abc", "md5")


def test_split_blocks_covers_the_data_within_bounds() -> None:
    data = _data(3 * MiB)
    blocks = split_blocks(data)
    _check_cover(blocks, data, DEFAULT_ALGO)
    params = chunk_params(len(data))
    assert all(params.min_size <= b.size <= params.max_size for b in blocks[:-1])
    assert 1 <= blocks[-1].size <= params.max_size
    assert split_blocks(bytearray(data)) == blocks
    assert split_blocks(memoryview(data)) == blocks


def test_whole_file_hash_is_the_hash_of_block_hashes() -> None:
    data = _data(MiB)
    hashes = hash_buffer(data, "sha256")
    assert hashes.hash_algo == "sha256"
    assert hashes.size == len(data)
    assert hashes.file_hash == hashlib.sha256(b"".join(b.hash for b in hashes.blocks)).digest()
    assert hashes.stable
    assert hashes.stat is None
    empty = hash_buffer(b"")
    assert empty.blocks == ()
    assert empty.file_hash == whole_file_hash([]) == blake3.blake3(b"").digest()


def test_fixed_blocks() -> None:
    data = _data(10_000)
    params = ChunkParams(4096, 4096, 4096, fixed=True)
    blocks = split_blocks(data, params=params)
    assert [b.size for b in blocks] == [4096, 4096, 1808]
    _check_cover(blocks, data, DEFAULT_ALGO)


@pytest.mark.parametrize("seed", range(5))
def test_insertion_changes_only_the_chunks_around_it(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(8 * MiB)
    where = rng.randrange(len(data))
    edited = data[:where] + rng.randbytes(KiB) + data[where:]
    old = split_blocks(data)
    new = split_blocks(edited)
    assert len(old) > 20
    have = {b.hash for b in old}
    missing = [b for b in new if b.hash not in have]
    assert 1 <= len(missing) <= 3
    assert sum(b.size for b in missing) <= 3 * chunk_params(len(edited)).max_size
    # a cut depends on at most max_size bytes after a chunk's start: blocks well before the
    # edit are identical, offsets included
    reach = chunk_params(len(edited)).max_size
    assert {b for b in old if b.offset + b.size <= where - reach} <= set(new)


def test_chunk_params_classes() -> None:
    base = chunk_params(0)
    assert (base.min_size, base.avg_size, base.max_size, base.fixed) == (
        64 * KiB,
        256 * KiB,
        MiB,
        False,
    )
    # the sync engine's 256 MiB insertion case stays inside one class
    assert chunk_params(256 * MiB) == chunk_params(256 * MiB + KiB) == base
    assert chunk_params(640 * MiB) == base
    assert chunk_params(640 * MiB + 1).avg_size == 512 * KiB
    assert chunk_params(50 << 30).avg_size == 4 * MiB
    assert chunk_params(MAX_FILE_SIZE).fixed
    previous = 0
    for size in [0, 1, 10 * MiB, 1 << 30, 3 << 30, 6 << 30, 50 << 30, 97 << 30, 98 << 30]:
        params = chunk_params(size)
        assert params.avg_size >= previous
        previous = params.avg_size
        assert params.max_size <= MAX_BLOCK_SIZE
        # worst case (every chunk at the minimum) still fits a record
        assert size // params.min_size + 1 <= MAX_BLOCKS
    assert MAX_FILE_SIZE // chunk_params(MAX_FILE_SIZE).max_size <= MAX_BLOCKS


# --- hash_file on real files ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 63 * KiB, 64 * KiB + 1, 3 * MiB + 17])
def test_hash_file_equals_hash_buffer(tmp_path: Path, size: int) -> None:
    data = _data(size, seed=size)
    path = tmp_path / "f"
    path.write_bytes(data)
    result = hash_file(path)
    expected = hash_buffer(data)
    assert (result.blocks, result.file_hash, result.hash_algo) == (
        expected.blocks,
        expected.file_hash,
        expected.hash_algo,
    )
    assert result.size == size
    assert result.stable
    assert result.stat is not None
    assert result.stat.st_size == size
    assert result.racy  # written just now


@pytest.mark.parametrize("read_size", [1, 1000, 64 * KiB, MiB, chunker.READ_SIZE])
def test_hash_file_streams_across_many_reads(tmp_path: Path, read_size: int) -> None:
    data = _data(20 * MiB + 5)
    path = tmp_path / "big"
    path.write_bytes(data)
    for _ in range(2):  # the second run reuses the thread's buffer
        result = hash_file(path, "sha256", read_size=read_size)
        assert result.blocks == split_blocks(data, "sha256")
        assert result.stable


@pytest.mark.parametrize("read_size", [1, 100, 1000, 5000])
def test_hash_file_streams_fixed_blocks(tmp_path: Path, read_size: int) -> None:
    data = _data(10_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    params = ChunkParams(1024, 1024, 1024, fixed=True)
    result = hash_file(path, params=params, read_size=read_size)
    assert result.blocks == split_blocks(data, params=params)
    assert len(result.blocks) == 10


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=30_000),
    st.integers(1, 9000),
    st.sampled_from([SMALL, ChunkParams(1024, 1024, 1024, fixed=True)]),
)
def test_streaming_cut_equals_buffer_cut(data: bytes, read_size: int, params: ChunkParams) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        result = hash_file(path, params=params, read_size=read_size)
    assert result.blocks == split_blocks(data, params=params)
    assert result.file_hash == hash_buffer(data, params=params).file_hash


def test_hash_file_of_an_old_file_is_not_racy() -> None:
    path = Path(hashlib.__file__)  # installed long ago: mtime and ctime are old
    result = hash_file(path)
    assert result.stable
    assert not result.racy
    assert result.blocks == split_blocks(path.read_bytes())


def test_hash_file_reports_content_beyond_the_size_at_open() -> None:
    # procfs files claim st_size 0 but yield data: exactly a file that grew while read.
    result = hash_file(Path("/proc/self/status"))
    assert not result.stable
    assert result.size == 1  # it stops one byte past the size it was opened with


def test_hash_file_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"secret")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(StorageError):
        hash_file(tmp_path / "link")


def test_hash_file_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a regular file"):
        hash_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StorageError, match="not a regular file"):
        hash_file(fifo)  # and does not block waiting for a writer
    with pytest.raises(StorageError):
        hash_file(tmp_path / "missing")


def test_hash_file_refuses_a_file_too_large_for_a_record(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    with path.open("wb") as handle:
        try:
            handle.truncate(MAX_FILE_SIZE + 1)  # sparse: no disk space used
        except OSError as exc:
            pytest.skip(f"filesystem cannot hold a sparse file that large: {exc}")
    with pytest.raises(StorageError, match="larger"):
        hash_file(path)


def test_unknown_algorithm_is_refused_before_io(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="algorithm"):
        hash_file(tmp_path / "missing", "md5")


def test_hashes_fit_a_record(tmp_path: Path) -> None:
    data = _data(2 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    hashes = hash_file(path)
    record = FileRecord(
        path="f",
        type=EntryType.FILE,
        size=hashes.size,
        blocks=hashes.blocks,
        file_hash=hashes.file_hash,
        hash_algo=hashes.hash_algo,
    )
    assert decode_record(encode_record(record)) == record


# --- one big file hashed by several threads -------------------------------------------------


def _threads_hashing(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """The threads that hash blocks from now on (the hashing itself is the real one)."""
    seen: set[int] = set()
    real = chunker._hash_cuts

    def watching(*args: Any) -> list[Block]:
        seen.add(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(chunker, "_hash_cuts", watching)
    return seen


@pytest.mark.parametrize("workers", [2, 3, 4])
@pytest.mark.parametrize("read_size", [MiB, chunker.READ_SIZE])
def test_a_big_file_hashed_by_several_threads_gives_the_same_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, read_size: int
) -> None:
    size = chunker.PARALLEL_ABOVE + 5 * MiB + 3
    data = _data(size, seed=workers)
    path = tmp_path / "big"
    path.write_bytes(data)
    threads = _threads_hashing(monkeypatch)
    for _ in range(2):  # the second run reuses the thread's buffer
        result = hash_file(path, read_size=read_size, workers=workers)
        expected = hash_buffer(data)
        assert (result.blocks, result.file_hash) == (expected.blocks, expected.file_hash)
        assert result.size == size
        assert result.stable
    assert threads, "the blocks were hashed in this thread alone"
    assert threading.get_ident() not in threads
    assert len(threads) <= workers - 1


def test_a_small_file_is_hashed_by_one_thread_whatever_the_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _data(3 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    threads = _threads_hashing(monkeypatch)
    assert hash_file(path, workers=4).blocks == split_blocks(data)
    assert not threads


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=40_000), st.integers(1, 9000), st.integers(2, 4))
def test_several_threads_cut_and_hash_as_one_does(
    data: bytes, read_size: int, workers: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        path = Path(tmp) / "f"
        path.write_bytes(data)
        patch.setattr(chunker, "PARALLEL_ABOVE", 0)  # every file non-empty takes that path
        result = hash_file(path, params=SMALL, read_size=read_size, workers=workers)
    assert result.blocks == split_blocks(data, params=SMALL)
    assert result.file_hash == hash_buffer(data, params=SMALL).file_hash
    assert result.stable


@pytest.mark.parametrize("change", ["append", "overwrite"])
def test_a_file_changed_while_several_threads_hash_it_is_not_stable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Another writer changes the file while its first blocks are being hashed: the
    reading is reported unstable (the scanner reads it again), never as a version."""
    size = chunker.PARALLEL_ABOVE + 2 * MiB
    path = tmp_path / "big"
    path.write_bytes(_data(size, seed=7))
    real = chunker._hash_cuts
    changed = threading.Event()

    def changing(*args: Any) -> list[Block]:
        if not changed.is_set():
            changed.set()
            fd = os.open(path, os.O_WRONLY)
            try:
                if change == "append":
                    os.pwrite(fd, b"more", size)
                else:  # same size, other bytes far behind the part being read
                    os.pwrite(fd, b"\xff" * 4096, size - 4096)
            finally:
                os.close(fd)
        return real(*args)

    monkeypatch.setattr(chunker, "_hash_cuts", changing)
    result = hash_file(path, workers=2)
    assert changed.is_set()
    assert not result.stable
