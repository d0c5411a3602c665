"""Downloads' open files are bounded: an LRU of open assemblies, leases, reopening, EMFILE.

Real temporary files and real descriptors, counted in ``/proc/self/fd``; the descriptor
limit is lowered for real (``resource.setrlimit``) and restored around the calls that
must meet ``EMFILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from lanshare.errors import DescriptorsExhausted, StorageError
from lanshare.paths import TEMP_PREFIX
from lanshare.store import (
    FolderStore,
    LocalState,
    OpenAssemblies,
    Placement,
    VerifiedBlock,
    default_open_assemblies,
)
from tests.e2e.harness import wait_until
from tests.test_store import NOW, payload, record_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from lanshare.manifest import FileRecord
    from lanshare.store import Assembly

MiB = 1024 * 1024


def open_temp_files(root: Path) -> int:
    """Descriptors of this process open on temporary files under ``root``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(root)) and os.path.basename(target).startswith(TEMP_PREFIX):
                count += 1
    return count


def inode_of(assembly: Assembly, root: Path) -> int:
    return (root / FolderStore.temp_path(assembly.record)).stat().st_ino


@contextlib.contextmanager
def descriptor_limit(headroom: int) -> Iterator[None]:
    """Lower the soft ``RLIMIT_NOFILE`` so that only ``headroom`` more descriptors can be
    opened now (the lowest free number is where the count starts), then restore it."""
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + headroom, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def records(n: int, first: int = 0) -> list[tuple[FileRecord, bytes]]:
    """``n`` files of several blocks each, in three directories."""
    out = []
    for i in range(first, first + n):
        data = payload(MiB, seed=i)
        record = record_for(f"d{i % 3}/f{i:03d}.bin", data)
        assert len(record.blocks) >= 2
        out.append((record, data))
    return out


def write(store: FolderStore, assembly: Assembly, index: int, data: bytes) -> None:
    block = assembly.record.blocks[index]
    store.write_verified(
        assembly, VerifiedBlock(index, data[block.offset : block.offset + block.size])
    )


def place(store: FolderStore, assembly: Assembly) -> None:
    (error,) = store.place(
        [Placement(assembly, LocalState(exists=False), range(len(assembly.record.blocks)))], NOW
    )
    assert error is None


def test_at_most_capacity_open_and_every_download_completes(tmp_path: Path) -> None:
    """Ten downloads through a bound of four: never more than four temporary files open,
    and each one, written block by block in turns (so each is closed and reopened), lands
    byte for byte."""
    pool = OpenAssemblies(capacity=4)
    store = FolderStore(tmp_path, pool)
    items = records(10)
    assemblies = [store.begin(record) for record, _ in items]
    assert pool.open_count <= 4
    assert open_temp_files(tmp_path) <= 4
    peak = 0
    for index in range(max(len(record.blocks) for record, _ in items)):
        for assembly, (record, data) in zip(assemblies, items, strict=True):
            if index < len(record.blocks):
                write(store, assembly, index, data)
            peak = max(peak, open_temp_files(tmp_path))
    assert peak <= 2 * 4  # a file descriptor and a directory descriptor each
    assert pool.opened > len(items)  # evicted ones were reopened to be written
    for assembly, (record, data) in zip(assemblies, items, strict=True):
        place(store, assembly)
        assert (tmp_path / record.path).read_bytes() == data
    assert pool.open_count == 0
    assert open_temp_files(tmp_path) == 0


def test_a_lease_keeps_its_descriptors_open_however_many_others_open(tmp_path: Path) -> None:
    pool = OpenAssemblies(capacity=1)
    store = FolderStore(tmp_path, pool)
    (first, _), *others = records(5)
    leased = store.begin(first)
    inode = inode_of(leased, tmp_path)
    with leased.lease() as (fd, dir_fd):
        opened = [store.begin(record) for record, _ in others]
        # Still our file, not a number closed and given to another one.
        assert os.fstat(fd).st_ino == inode
        assert os.fstat(dir_fd).st_ino == (tmp_path / "d0").stat().st_ino
        assert pool.open_count == 2  # the leased one beyond the bound, the newest one
    opened.append(store.begin(records(6)[5][0]))
    assert pool.open_count == 1  # released: the least recently used, evicted
    for assembly in [leased, *opened]:
        assembly.close()
    assert open_temp_files(tmp_path) == 0


def test_reopening_writes_to_the_same_file_and_refuses_a_swapped_one(tmp_path: Path) -> None:
    pool = OpenAssemblies(capacity=1)
    store = FolderStore(tmp_path, pool)
    (record, data), (other, other_data), (third, _) = records(3)
    with ThreadPoolExecutor(max_workers=1) as worker:
        assembly = store.begin(record)
        worker.submit(write, store, assembly, 0, data).result(10)
        moved_on = store.begin(other)
        worker.submit(write, store, moved_on, 0, other_data).result(10)
        store.begin(third).close()
        assert assembly._fd == -1  # evicted: the least recently used
        for index in range(1, len(record.blocks)):
            worker.submit(write, store, assembly, index, data).result(10)
        worker.submit(place, store, assembly).result(10)
        assert (tmp_path / record.path).read_bytes() == data

        store.begin(third).close()
        assert moved_on._fd == -1
        temp = tmp_path / FolderStore.temp_path(other)
        impostor = temp.with_name("impostor")  # made while the original still exists
        impostor.write_bytes(b"someone else's file")
        impostor.replace(temp)
        with pytest.raises(StorageError, match="replaced"):
            worker.submit(write, store, moved_on, 1, other_data).result(10)
        moved_on.close()


def test_out_of_descriptors_closes_idle_downloads_then_reports_back_pressure(
    tmp_path: Path,
) -> None:
    """A real EMFILE: idle downloads give their descriptors back and the new one opens;
    when every open download is in use, ``begin`` raises ``DescriptorsExhausted`` (a wait,
    not a failure of the file) and nothing is left open by the attempt."""
    pool = OpenAssemblies(capacity=100)
    store = FolderStore(tmp_path, pool)
    items = records(8)
    idle = [store.begin(record) for record, _ in items[:4]]
    with descriptor_limit(headroom=1):
        fresh = store.begin(items[4][0])  # a directory walk and two descriptors kept
    assert pool.open_count < 5
    with fresh.lease() as (fd, _):
        assert os.fstat(fd).st_size == items[4][0].size
    for assembly in [*idle, fresh]:
        assembly.close()

    busy = [store.begin(record) for record, _ in items[:4]]
    with contextlib.ExitStack() as leases:
        for assembly in busy:
            leases.enter_context(assembly.lease())
        before = open_temp_files(tmp_path)
        with descriptor_limit(headroom=1), pytest.raises(DescriptorsExhausted):
            store.begin(items[5][0])
        assert open_temp_files(tmp_path) == before
    for assembly in busy:
        assembly.close()
    assert pool.open_count == 0


def test_the_bound_follows_the_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert default_open_assemblies() == 32  # 64 descriptors: a quarter of the limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
        assert default_open_assemblies() <= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_write_out_of_descriptors_is_back_pressure_not_a_storage_failure(
    tmp_path: Path,
) -> None:
    pool = OpenAssemblies(capacity=1)
    store = FolderStore(tmp_path, pool)
    (evicted_record, data), (busy_record, _) = records(2)
    evicted = store.begin(evicted_record)
    busy = store.begin(busy_record)
    assert evicted._fd == -1
    with busy.lease(), descriptor_limit(headroom=0), pytest.raises(DescriptorsExhausted):
        write(store, evicted, 0, data)
    write(store, evicted, 0, data)  # descriptors back: it reopens and writes
    for assembly in (evicted, busy):
        assembly.close()


def test_a_close_never_runs_on_the_event_loop_nor_under_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Downloads closed by the engine on its loop: their descriptors are closed in another
    thread, never while the process-wide lock is held; closed from a worker they close at
    once, after the lock. Either way none stays open."""
    pool = OpenAssemblies(capacity=8)
    store = FolderStore(tmp_path, pool)
    items = records(4)
    assemblies = [store.begin(record) for record, _ in items]
    closes: list[tuple[str, bool]] = []
    real_close = os.close

    def checking(fd: int) -> None:
        # Checked only: which thread closes, and whether the lock is held meanwhile.
        closes.append((threading.current_thread().name, pool._lock.locked()))
        real_close(fd)

    monkeypatch.setattr(os, "close", checking)

    async def on_the_loop() -> str:
        for assembly in assemblies[:3]:
            assembly.close()
        return threading.current_thread().name

    loop_thread = asyncio.run(on_the_loop())
    # A file and a directory each: the directory's close may come just after the file's.
    wait_until(
        lambda: open_temp_files(tmp_path) == 1 and len(closes) >= 6,
        30,
        "the closer thread's closes",
    )
    assert pool.open_count == 1
    assert len(closes) == 6  # a file and a directory each
    assert all(name != loop_thread for name, _ in closes), closes
    assert not any(locked for _, locked in closes), closes

    closes.clear()
    worker = threading.Thread(target=assemblies[3].close, name="worker")
    worker.start()
    worker.join()
    monkeypatch.undo()
    assert closes == [("worker", False), ("worker", False)]
    assert open_temp_files(tmp_path) == 0
    assert pool.open_count == 0


def test_a_file_being_opened_holds_no_lock_others_wait_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a file can wait a long time on the file system (its journal, while other
    threads fsync): while one download's file is being opened, every other download still
    takes its lease and writes, and the same download opened by a second thread is opened
    once. ``os.open`` is patched only to hold the chosen file's open until released, as a
    slow file system would; everything else is real."""
    pool = OpenAssemblies(capacity=8)
    store = FolderStore(tmp_path, pool)
    (slow_record, _), (other_record, other_data) = records(2)
    other = store.begin(other_record)
    slow_name = FolderStore.temp_path(slow_record).rsplit("/", 1)[-1]
    entered, release = threading.Event(), threading.Event()
    real_open = os.open

    def holding(path: str, *args: object, **kwargs: object) -> int:
        if os.path.basename(os.fsdecode(path)) == slow_name:
            entered.set()
            assert release.wait(30), "never released"
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", holding)
    with ThreadPoolExecutor(2) as pool_threads:
        opening = pool_threads.submit(store.begin, slow_record)
        assert entered.wait(30)
        # The slow open holds no lock: the other download leases and writes meanwhile.
        writing = pool_threads.submit(write, store, other, 0, other_data)
        writing.result(timeout=30)
        assert not opening.done()
        release.set()
        slow = opening.result(timeout=30)
    monkeypatch.undo()
    write(store, other, 1, other_data)
    assert pool.opened == 2
    slow.close()
    other.close()
    assert open_temp_files(tmp_path) == 0
