"""FolderWatcher against real files and a real watchdog observer (inotify).

Every wait is bounded: a test waits for the batch it expects until a deadline, and checks that
something did *not* happen only over a fixed window several debounce intervals long.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
from watchdog.events import FileCreatedEvent
from watchdog.observers.inotify import InotifyObserver

from lanshare.errors import StorageError
from lanshare.ignore import IgnoreRules
from lanshare.paths import TEMP_PREFIX
from lanshare.watcher import (
    OVERFLOW_LOGGER,
    ChangeBatch,
    FolderWatcher,
    _Handoff,
    inotify_watch_available,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from pathlib import Path
    from typing import Any

DEADLINE = 10.0  # seconds any expected batch may take on a loaded machine
DEBOUNCE = 0.1
QUIET = 0.6  # window over which "no further batch" is checked: 6 debounce intervals


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def next_batch(watcher: FolderWatcher, within: float = DEADLINE) -> ChangeBatch:
    async with asyncio.timeout(within):
        return await anext(watcher)


async def batch_with(
    watcher: FolderWatcher, rel: str, seen: list[ChangeBatch] | None = None
) -> ChangeBatch:
    """The first batch that names ``rel``; every batch read on the way goes into ``seen``."""
    async with asyncio.timeout(DEADLINE):
        while True:
            batch = await anext(watcher)
            if seen is not None:
                seen.append(batch)
            if rel in batch.paths:
                return batch


async def batches_within(watcher: FolderWatcher, seconds: float) -> list[ChangeBatch]:
    """Every batch that arrives during the next ``seconds`` (a bounded check for absence)."""
    got: list[ChangeBatch] = []
    with_deadline = asyncio.get_running_loop().time() + seconds
    while True:
        remaining = with_deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return got
        try:
            got.append(await next_batch(watcher, remaining))
        except TimeoutError:
            return got


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` on the loop until it holds, failing after the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def write(path: Path, data: bytes = b"x") -> None:
    with path.open("wb") as f:
        f.write(data)


def in_thread(fn: Callable[[], object]) -> Awaitable[object]:
    """Run blocking file work concurrently with the loop, as another program would."""
    return asyncio.to_thread(fn)


# -- basic events --------------------------------------------------------------------------


def test_start_yields_a_full_rescan_and_stop_ends_iteration(tmp_path: Path) -> None:
    async def scenario() -> None:
        watcher = FolderWatcher(tmp_path, debounce_interval=DEBOUNCE)
        states = [watcher.running]
        async with watcher:
            batch = await next_batch(watcher)
            assert batch.full_rescan
            assert batch.paths == frozenset()
            assert batch.folder_root == tmp_path
            states.append(watcher.running)
        states.append(watcher.running)
        assert states == [False, True, False]
        assert [b async for b in watcher] == []  # the iteration ends after stop
        await watcher.stop()  # idempotent
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(scenario())


def test_created_file_is_reported_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(lambda: write(tmp_path / "new.txt", b"hello"))
            batch = await batch_with(watcher, "new.txt")
            assert not batch.full_rescan
            later = await batches_within(watcher, QUIET)
            assert not [b for b in later if "new.txt" in b.paths]

    run(scenario())


def test_modified_file_in_a_subdirectory_is_reported_once(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    target = tmp_path / "a" / "b" / "doc.txt"
    write(target, b"v1")

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(lambda: write(target, b"version two"))
            batch = await batch_with(watcher, "a/b/doc.txt")
            # the parent directories' "modified" events are not reported
            assert batch.paths == {"a/b/doc.txt"}
            later = await batches_within(watcher, QUIET)
            assert not [b for b in later if "a/b/doc.txt" in b.paths]

    run(scenario())


def test_deleted_file_is_reported_once(tmp_path: Path) -> None:
    write(tmp_path / "gone.txt")

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread((tmp_path / "gone.txt").unlink)
            batch = await batch_with(watcher, "gone.txt")
            assert batch.paths == {"gone.txt"}
            later = await batches_within(watcher, QUIET)
            assert not [b for b in later if "gone.txt" in b.paths]

    run(scenario())


def test_moved_file_reports_both_ends_once(tmp_path: Path) -> None:
    write(tmp_path / "old.txt")
    (tmp_path / "dir").mkdir()

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(lambda: os.rename(tmp_path / "old.txt", tmp_path / "dir" / "new.txt"))
            batch = await batch_with(watcher, "dir/new.txt")
            assert batch.paths == {"old.txt", "dir/new.txt"}
            later = await batches_within(watcher, QUIET)
            assert not [b for b in later if b.paths & {"old.txt", "dir/new.txt"}]

    run(scenario())


def test_attribute_change_is_reported_but_reading_is_not(tmp_path: Path) -> None:
    target = tmp_path / "mode.txt"
    write(target, b"data")

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(target.read_bytes)  # a peer fetching blocks: not a change
            await in_thread(lambda: target.chmod(0o600))
            seen: list[ChangeBatch] = []
            await batch_with(watcher, "mode.txt", seen)
            assert len(seen) == 1
            assert watcher.stats.ignored == 0  # the read never reached the loop

    run(scenario())


# -- debouncing ----------------------------------------------------------------------------


def test_rapid_writes_coalesce(tmp_path: Path) -> None:
    target = tmp_path / "busy.bin"

    def fifty_writes() -> None:
        for i in range(50):
            write(target, bytes([i]) * 100)

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(fifty_writes)
            await batch_with(watcher, "busy.bin")
            later = await batches_within(watcher, QUIET)
            assert len([b for b in later if "busy.bin" in b.paths]) <= 1
            assert watcher.stats.events >= 50  # the coalescing happened here, not upstream

    run(scenario())


def test_a_finished_write_is_taken_before_one_still_under_way(tmp_path: Path) -> None:
    """A file closed after writing is reported once it settles; one still open for writing
    waits for the (long, here) debounce, until its writer closes it."""

    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, debounce_interval=DEADLINE * 3, max_delay=DEADLINE * 6
        ) as watcher:
            await started_batch(watcher)
            with (tmp_path / "open.txt").open("wb") as still_open:
                still_open.write(b"half")
                still_open.flush()
                await in_thread(lambda: write(tmp_path / "saved.txt", b"whole"))
                assert (await next_batch(watcher)).paths == {"saved.txt"}
            assert (await next_batch(watcher)).paths == {"open.txt"}  # closed: settled

    run(scenario())


def test_continuous_writes_are_flushed_before_they_stop(tmp_path: Path) -> None:
    target = tmp_path / "log.txt"
    stop_writing = threading.Event()

    def keep_writing() -> None:
        # Bounded: at most 1000 appends 10 ms apart, ended early by the test.
        with target.open("ab") as f:
            for _ in range(1000):
                if stop_writing.wait(0.01):
                    return
                f.write(b"line\n")
                f.flush()

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE, max_delay=0.5) as watcher:
            await started_batch(watcher)
            writer = asyncio.ensure_future(in_thread(keep_writing))
            try:
                # The file never goes quiet for 100 ms, yet it is reported, twice in a row.
                first = await batch_with(watcher, "log.txt")
                second = await batch_with(watcher, "log.txt")
                assert not writer.done()
                assert not first.full_rescan
                assert not second.full_rescan
            finally:
                stop_writing.set()
                await writer

    run(scenario())


def test_too_many_paths_escalate_to_a_full_rescan(tmp_path: Path) -> None:
    def burst() -> None:
        for i in range(40):
            write(tmp_path / f"f{i:02}")

    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, debounce_interval=DEBOUNCE, max_batch_paths=5
        ) as watcher:
            await started_batch(watcher)
            await in_thread(burst)
            seen: list[ChangeBatch] = []
            async with asyncio.timeout(DEADLINE):
                while not (seen and seen[-1].full_rescan):
                    seen.append(await anext(watcher))
            assert all(len(b.paths) <= 5 for b in seen)

    run(scenario())


# -- what is never reported -------------------------------------------------------------


def test_temporary_internal_and_ignored_paths_are_never_reported(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()

    def noise() -> None:
        write(tmp_path / f"{TEMP_PREFIX}abc")
        write(tmp_path / "sub" / f"{TEMP_PREFIX}def")
        (tmp_path / ".lanshare" / "versions").mkdir(parents=True)
        write(tmp_path / ".lanshare" / "versions" / "a.txt")
        (tmp_path / f"{TEMP_PREFIX}dir").mkdir()
        write(tmp_path / f"{TEMP_PREFIX}dir" / "inner")
        write(tmp_path / "debug.log")
        os.rename(tmp_path / f"{TEMP_PREFIX}abc", tmp_path / ".lanshare" / "moved")
        write(tmp_path / "marker.txt")  # written last: its batch comes after all the noise

    async def scenario() -> None:
        rules = IgnoreRules(["*.log"])
        async with FolderWatcher(
            tmp_path, debounce_interval=DEBOUNCE, ignore=rules.matches
        ) as watcher:
            await started_batch(watcher)
            await in_thread(noise)
            seen: list[ChangeBatch] = []
            await batch_with(watcher, "marker.txt", seen)
            seen += await batches_within(watcher, QUIET)
            reported = set().union(*(b.paths for b in seen))
            assert reported == {"marker.txt"}
            assert watcher.stats.ignored > 0

    run(scenario())


def test_own_write_is_not_echoed_but_a_later_change_is(tmp_path: Path) -> None:
    def download() -> None:
        temp = tmp_path / f"{TEMP_PREFIX}dl"
        write(temp, b"downloaded")
        os.replace(temp, tmp_path / "dl.txt")
        write(tmp_path / "marker.txt")

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            with watcher.own_write("dl.txt"):
                await in_thread(download)
            seen: list[ChangeBatch] = []
            await batch_with(watcher, "marker.txt", seen)
            seen += await batches_within(watcher, QUIET)
            assert not [b for b in seen if "dl.txt" in b.paths]
            assert watcher.stats.own_writes == 1

            await in_thread(lambda: write(tmp_path / "dl.txt", b"edited by a person"))
            await batch_with(watcher, "dl.txt")

    run(scenario())


def test_a_placed_download_is_never_echoed_announced_or_not(tmp_path: Path) -> None:
    """As the store places a download: written under a temporary name, renamed over the
    path (the old file archived into .lanshare/ first), and closed after the rename, when
    the kernel names the file by its new name. None of it is news; an edit after it is."""
    (tmp_path / "old.txt").write_bytes(b"old")
    (tmp_path / ".lanshare" / "versions").mkdir(parents=True)

    def place(rel: str, data: bytes) -> None:
        temp = tmp_path / f"{TEMP_PREFIX}{rel}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o644)
            os.utime(fd, ns=(1_000_000_000, 1_000_000_000))
            if (tmp_path / rel).exists():
                os.rename(tmp_path / rel, tmp_path / ".lanshare" / "versions" / rel)
            os.rename(temp, tmp_path / rel)
        finally:
            os.close(fd)

    def downloads() -> None:
        place("new.txt", b"fetched")
        place("old.txt", b"fetched over the old one")
        write(tmp_path / "marker.txt")

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            watcher.expect_own_write("old.txt")  # announced or not, the same
            await in_thread(downloads)
            seen: list[ChangeBatch] = []
            await batch_with(watcher, "marker.txt", seen)
            seen += await batches_within(watcher, QUIET)
            assert set().union(*(b.paths for b in seen)) == {"marker.txt"}
            await in_thread(lambda: write(tmp_path / "new.txt", b"edited by a person"))
            await batch_with(watcher, "new.txt")

    run(scenario())


def test_a_placement_is_not_echoed_after_its_announcement_lapsed(tmp_path: Path) -> None:
    """A busy daemon may put a download in place long after it announced it: the move from
    a temporary name is its own whatever the announcement became."""

    def download() -> None:
        temp = tmp_path / f"{TEMP_PREFIX}late"
        write(temp, b"downloaded")
        os.replace(temp, tmp_path / "late.txt")
        write(tmp_path / "marker.txt")

    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, debounce_interval=DEBOUNCE, own_write_timeout=0.05
        ) as watcher:
            await started_batch(watcher)
            watcher.expect_own_write("late.txt")
            await asyncio.sleep(0.1)  # let the announcement lapse (the point of this test)
            await in_thread(download)
            seen: list[ChangeBatch] = []
            await batch_with(watcher, "marker.txt", seen)
            seen += await batches_within(watcher, QUIET)
            assert not [b for b in seen if "late.txt" in b.paths]

    run(scenario())


def test_no_full_rescan_at_start_when_the_owner_scans_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, debounce_interval=DEBOUNCE, initial_rescan=False
        ) as watcher:
            await in_thread(lambda: write(tmp_path / "a"))
            assert await next_batch(watcher) == ChangeBatch(
                watcher.root, frozenset({"a"}), full_rescan=False
            )
            assert watcher.stats.full_rescans == 0

    run(scenario())


def test_own_write_announcement_lapses(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, debounce_interval=DEBOUNCE, own_write_timeout=0.2
        ) as watcher:
            await started_batch(watcher)
            watcher.expect_own_write("late.txt")
            await asyncio.sleep(0.3)  # let the announcement lapse (the point of this test)
            await in_thread(lambda: write(tmp_path / "late.txt"))
            await batch_with(watcher, "late.txt")
            assert watcher.stats.own_writes == 0

    run(scenario())


def test_failed_own_write_is_withdrawn(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            with pytest.raises(OSError, match="disk full"), watcher.own_write("f.txt"):
                raise OSError(errno.ENOSPC, "disk full")
            await in_thread(lambda: write(tmp_path / "f.txt"))
            await batch_with(watcher, "f.txt")

    run(scenario())


# -- full rescans ---------------------------------------------------------------------------


def test_periodic_full_rescan(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(tmp_path, rescan_interval=0.2) as watcher:
            await started_batch(watcher)
            assert (await next_batch(watcher)).full_rescan
            assert (await next_batch(watcher)).full_rescan

    run(scenario())


def test_batches_an_owner_did_not_take_merge_into_one(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(lambda: write(tmp_path / "a"))
            await until(lambda: watcher.ready_paths == 1, "a ready")
            await in_thread(lambda: write(tmp_path / "b"))
            await until(lambda: watcher.ready_paths == 2, "b ready")
            assert await next_batch(watcher) == ChangeBatch(
                watcher.root, frozenset({"a", "b"}), full_rescan=False
            )
            assert watcher.stats.path_batches == 1

    run(scenario())


def test_too_many_paths_waiting_for_the_owner_collapse_into_one_full_rescan(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, debounce_interval=DEBOUNCE, max_batch_paths=3
        ) as watcher:
            await started_batch(watcher)
            for count, name in enumerate("abc", 1):  # one ready at a time, under the limit
                await in_thread(partial(write, tmp_path / name))
                await until(partial(lambda n: watcher.ready_paths == n, count), f"{name} ready")
            await in_thread(partial(write, tmp_path / "d"))
            await until(lambda: watcher.stats.collapses == 1, "the collapse")
            assert watcher.ready_paths == 0
            assert (await next_batch(watcher)).full_rescan
            # and then it carries on as before
            await in_thread(lambda: write(tmp_path / "e"))
            assert (await batch_with(watcher, "e")).paths == {"e"}

    run(scenario())


def test_inotify_overflow_record_requests_a_full_rescan(tmp_path: Path) -> None:
    source = logging.getLogger(OVERFLOW_LOGGER)
    handlers_before = list(source.handlers)

    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            # What watchdog 7.1's InotifyFD logs on IN_Q_OVERFLOW (and nothing else).
            source.warning("Inotify queue overflowed; filesystem events were lost")
            batch = await next_batch(watcher)
            assert batch.full_rescan
            assert watcher.stats.inotify_overflows == 1
            source.warning("some other warning")
            assert await batches_within(watcher, QUIET) == []

    run(scenario())
    assert source.handlers == handlers_before  # the hook is gone with the last watcher


def test_overflow_hook_works_when_the_application_logs_only_errors(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR)
    try:

        async def scenario() -> None:
            async with FolderWatcher(tmp_path) as watcher:
                await started_batch(watcher)
                logging.getLogger(OVERFLOW_LOGGER).warning(
                    "Inotify queue overflowed; filesystem events were lost"
                )
                assert (await next_batch(watcher)).full_rescan

        run(scenario())
        assert not logging.getLogger(OVERFLOW_LOGGER).isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved)


# -- out of inotify watches ----------------------------------------------------------------


class WatchLimitObserver(InotifyObserver):
    """A real inotify observer on a machine whose watch limit is used up."""

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_watch_limit_at_start_degrades_to_periodic_rescans(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path,
            debounce_interval=DEBOUNCE,
            fallback_rescan_interval=0.2,
            observer_factory=WatchLimitObserver,
        ) as watcher:
            await started_batch(watcher)
            await in_thread(lambda: write(tmp_path / "unseen.txt"))
            for _ in range(3):
                batch = await next_batch(watcher)
                assert batch.full_rescan  # only rescans: nothing watches the folder
            assert watcher.degraded_reason is not None

    with caplog.at_level(logging.WARNING, logger="lanshare.watcher"):
        run(scenario())
    warnings = [r for r in caplog.records if r.name == "lanshare.watcher"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "sysctl fs.inotify.max_user_watches=" in message
    assert str(tmp_path) in message


def test_watch_limit_reached_by_a_new_directory_degrades_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    probes: list[Path] = []

    def kernel_out_of_watches(directory: Path) -> bool:
        probes.append(directory)
        return False

    def new_dirs() -> None:
        (tmp_path / "d1").mkdir()
        write(tmp_path / "marker1")

    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path,
            debounce_interval=DEBOUNCE,
            fallback_rescan_interval=0.3,
            watch_probe=kernel_out_of_watches,
        ) as watcher:
            await started_batch(watcher)
            await in_thread(new_dirs)
            seen: list[ChangeBatch] = []
            async with asyncio.timeout(DEADLINE):
                while sum(b.full_rescan for b in seen) < 3:  # catch-up, then periodic ones
                    seen.append(await anext(watcher))
            assert watcher.degraded_reason is not None
            # the observer still runs: what it can see is still reported at once
            (tmp_path / "d2").mkdir()
            await batch_with(watcher, "d2")
            assert len(probes) == 1

    with caplog.at_level(logging.WARNING, logger="lanshare.watcher"):
        run(scenario())
    warnings = [r for r in caplog.records if r.name == "lanshare.watcher"]
    assert len(warnings) == 1
    assert "sysctl fs.inotify.max_user_watches=" in warnings[0].getMessage()


def test_watch_probe_on_this_machine(tmp_path: Path) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    assert inotify_watch_available(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == fds_before


# -- errors ----------------------------------------------------------------------------------


def test_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        watcher = FolderWatcher(tmp_path / "absent")
        with pytest.raises(StorageError, match="absent"):
            await watcher.start()
        assert not watcher.running

    run(scenario())


def test_deleted_folder_falls_back_to_rescans(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()

    async def scenario() -> None:
        async with FolderWatcher(root, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            await in_thread(root.rmdir)
            assert (await next_batch(watcher)).full_rescan
            assert watcher.degraded_reason is not None

    run(scenario())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"debounce_interval": 0},
        {"max_batch_paths": 0},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        FolderWatcher(tmp_path, **kwargs)


async def started_batch(watcher: FolderWatcher) -> None:
    """Read the full rescan every start delivers."""
    first = await next_batch(watcher)
    assert first == ChangeBatch(watcher.root, frozenset(), full_rescan=True)


def test_cancelled_start_leaves_nothing_running(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"d{i}").mkdir()  # some directories, so that setting up watches takes a while

    async def scenario() -> None:
        watcher = FolderWatcher(tmp_path)
        starting = asyncio.ensure_future(watcher.start())
        await asyncio.sleep(0)  # let it hand the setup to a worker thread
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert not watcher.running
        assert [b async for b in watcher] == []
        # the worker thread stops the observer it built; the suite's thread guard checks that

    run(scenario())


def test_out_of_inotify_instances_degrades(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def no_instance_left() -> InotifyObserver:
        raise OSError(errno.EMFILE, "inotify instance limit reached")

    async def scenario() -> None:
        async with FolderWatcher(
            tmp_path, fallback_rescan_interval=0.2, observer_factory=no_instance_left
        ) as watcher:
            await started_batch(watcher)
            assert (await next_batch(watcher)).full_rescan
            assert watcher.degraded_reason is not None

    with caplog.at_level(logging.WARNING, logger="lanshare.watcher"):
        run(scenario())
    (record,) = [r for r in caplog.records if r.name == "lanshare.watcher"]
    assert "sysctl fs.inotify.max_user_instances=" in record.getMessage()


def test_rescan_on_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with FolderWatcher(tmp_path, debounce_interval=DEBOUNCE) as watcher:
            await started_batch(watcher)
            watcher.rescan("ignore rules changed")
            assert (await next_batch(watcher)).full_rescan
        watcher.rescan()  # after stop: nothing
        assert [b async for b in watcher] == []
        with pytest.raises(RuntimeError, match="only once"):
            await watcher.start()

    run(scenario())


def test_a_burst_of_events_wakes_the_loop_once_and_keeps_their_order() -> None:
    """Events the observer's thread hands over while the loop is busy reach it in one
    call, in order; the next event after that wakes it again."""
    received: list[str] = []
    wakeups = 0

    async def main() -> None:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any) -> asyncio.Handle:
            nonlocal wakeups
            wakeups += 1
            return real(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        handoff = _Handoff(loop, lambda kind, src, dest, is_dir: received.append(os.fsdecode(src)))
        events = [FileCreatedEvent(f"/folder/f{i}") for i in range(200)]
        observer = threading.Thread(target=lambda: [handoff.dispatch(e) for e in events])
        observer.start()
        observer.join()  # the loop has not run meanwhile: all 200 wait for one call
        await asyncio.sleep(0)
        assert received == [f"/folder/f{i}" for i in range(200)]
        assert wakeups == 1
        handoff.dispatch(FileCreatedEvent("/folder/late"))
        await asyncio.sleep(0)
        assert received[-1] == "/folder/late"
        assert wakeups == 2

    asyncio.run(main())
