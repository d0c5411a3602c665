"""Serving blocks: a real engine, folder, SQLite index and endpoint, fed block requests as its
transport would feed them; its answers are recorded on their way to the endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import threading
from typing import TYPE_CHECKING, Any

import pytest

from lanshare import chunker, hashes, keys, serving
from lanshare.config import Config, FolderConfig, NetworkConfig, NodeConfig, TransferConfig
from lanshare.engine import Engine, FolderSync
from lanshare.events import BlockRequested, FolderId, PeerId, RequestCancelled
from lanshare.identity import NodeId
from lanshare.index import Index, LocalChange
from lanshare.manifest import Block, EntryType, FileRecord
from lanshare.protocol import Endpoint
from lanshare.serving import BlockTable, TableCache
from lanshare.store import FolderStore, VerifiedBlock
from tests.enginesim import random_bytes, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from pathlib import Path

MiB = 1024 * 1024
PEER = PeerId(b"\x42" * 8)


class Served:
    """One running engine with one folder and no peer. ``ask`` hands it a block request as
    the transport would; ``answers`` waits for what it sent back (None: rejected)."""

    def __init__(self, base: Path) -> None:
        self.root = base / "folder"
        self.state = base / "state"
        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.key = keys.format_key(random.Random(7).randbytes(32))
        self.folder_id = FolderId(keys.folder_id(keys.parse_key(self.key)))
        self.answered: dict[int, bytes | None] = {}
        self.kicks = 0
        self._next_id = 1000
        self._task: asyncio.Task[None] | None = None
        self.index: Index | None = None
        self.engine: Engine | None = None

    @property
    def folder(self) -> FolderSync:
        assert self.engine is not None
        return self.engine.folders[self.folder_id]

    async def start(self) -> None:
        config = Config(
            node=NodeConfig(name="s", state_dir=self.state, control_socket=self.state / "c"),
            network=NetworkConfig(port=47999),
            transfer=TransferConfig(),
            folders=(FolderConfig(self.root, self.key, ()),),
        )
        self.index = await asyncio.to_thread(Index.open, self.state / "index.sqlite3")
        endpoint = Endpoint(
            config.transfer, config.network, node_id=b"\x01" * 8, folders={}, rng=random.Random(1)
        )
        send, reject = endpoint.send_block, endpoint.reject

        def sent(request_id: int, data: Any) -> bool:
            self.answered[request_id] = bytes(data)
            return send(request_id, data)

        def rejected(request_id: int, *args: Any) -> bool:
            self.answered[request_id] = None
            return reject(request_id, *args)

        endpoint.send_block = sent  # type: ignore[method-assign]
        endpoint.reject = rejected  # type: ignore[method-assign,assignment]
        self.engine = Engine(config, self.index, NodeId(b"\x01" * 8), endpoint, kick=self._kick)
        await self.engine.add_folder(config.folders[0])
        self._task = asyncio.create_task(self.engine.run())
        await wait_for(self.quiet, 30, "the first scan and plan")

    def _kick(self) -> None:
        self.kicks += 1

    def quiet(self) -> bool:
        """Scanned and planned, and nothing left to plan."""
        folder = self.folder
        return folder.scanned.is_set() and not folder.dirty.is_set() and not folder.busy.locked()

    def record(self, rel: str) -> FileRecord:
        assert self.index is not None
        record = self.index.get(self.folder.info.id, rel)
        assert record is not None
        return record

    def ask(self, rel: str, index: int, block: Block, algo: str = "blake3") -> int:
        assert self.engine is not None
        self._next_id += 1
        rid = self._next_id
        event = BlockRequested(
            rid, PEER, self.folder_id, rel, index, block.offset, block.size, block.hash, algo
        )
        self.engine.handle_event(event)
        return rid

    def ask_all(self, record: FileRecord) -> list[int]:
        return [self.ask(record.path, i, b, record.hash_algo) for i, b in enumerate(record.blocks)]

    async def answers(self, rids: Iterable[int]) -> list[bytes | None]:
        wanted = list(rids)
        await wait_for(lambda: all(r in self.answered for r in wanted), 60, "the answers")
        return [self.answered[r] for r in wanted]

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop(10.0)
        if self._task is not None:
            await self._task
        if self.index is not None:
            await asyncio.to_thread(self.index.close)
        self.engine = self.index = self._task = None


@contextlib.asynccontextmanager
async def served(base: Path) -> AsyncIterator[Served]:
    node = Served(base)
    try:
        await node.start()
        yield node
    finally:
        await node.stop()


def _write_big(root: Path, rel: str, size: int, seed: int) -> bytes:
    data = random_bytes(seed, size)
    root.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return data


def _blocks_of(data: bytes, record: FileRecord) -> list[bytes]:
    return [data[b.offset : b.offset + b.size] for b in record.blocks]


def _counting(counts: dict[str, int], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return method(*args, **kwargs)

    return wrapper


def _fds_under(root: Path) -> list[str]:
    """Files below ``root`` this process holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{root}/"):
                out.append(target)
    return out


# -- one file of many blocks ------------------------------------------------------------------


def test_serving_every_block_of_a_file_reads_its_record_once_in_few_thread_hops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N blocks asked together: the index is read O(1) times (not once per block), the
    blocks are read in far fewer thread hops than N, each is hashed once on its way out,
    and each arrives intact."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "big.bin", 48 * MiB, seed=1)
        async with served(tmp_path) as node:
            record = node.record("big.bin")
            n = len(record.blocks)
            assert n >= 128
            assert node.index is not None
            counts = {"get": 0, "get_many": 0, "find_block": 0, "hops": 0, "hash": 0, "digest": 0}
            for name in ("get", "get_many", "find_block"):
                monkeypatch.setattr(
                    node.index, name, _counting(counts, name, getattr(node.index, name))
                )
            loop = asyncio.get_running_loop()
            monkeypatch.setattr(
                loop, "run_in_executor", _counting(counts, "hops", loop.run_in_executor)
            )
            monkeypatch.setattr(hashes, "digest", _counting(counts, "digest", hashes.digest))
            # The server's own kicks: the engine also kicks for its announcements, whenever
            # their coalescing timer fires.
            server = node.folder.server
            counts["kicks"] = 0
            monkeypatch.setattr(server, "_kick", _counting(counts, "kicks", server._kick))
            got = await node.answers(node.ask_all(record))
            monkeypatch.undo()
            assert got == _blocks_of(data, record)
            assert counts["get"] + counts["get_many"] <= 2, counts
            assert counts["find_block"] == 0, counts
            assert counts["digest"] == n, "each block hashed once"
            assert counts["hops"] <= n // 8, f"{counts['hops']} thread hops for {n} blocks"
            assert 0 < counts["kicks"] <= counts["hops"], "one kick per batch, not per block"

    asyncio.run(main())


def test_adjacent_blocks_asked_in_order_are_read_together_and_each_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer fetching a file asks for its blocks in order: a batch's run of adjacent blocks
    is read with one pread, not one per block, and every block is still hashed once on its
    way out (the last one, changed on disk, is refused; the others of its run go out)."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "big.bin", 24 * MiB, seed=11)
        async with served(tmp_path) as node:
            record = node.record("big.bin")
            n = len(record.blocks)
            assert n >= 64
            changed = record.blocks[-1]
            fd = os.open(node.root / "big.bin", os.O_WRONLY)
            try:
                os.pwrite(fd, bytes(changed.size), changed.offset)
            finally:
                os.close(fd)
            counts = {"pread": 0, "digest": 0}
            monkeypatch.setattr(os, "pread", _counting(counts, "pread", os.pread))
            monkeypatch.setattr(hashes, "digest", _counting(counts, "digest", hashes.digest))
            got = await node.answers(node.ask_all(record))
            monkeypatch.undo()
            expected: list[bytes | None] = list(_blocks_of(data, record))
            expected[-1] = None
            assert got == expected
            # One read per batch of adjacent blocks (a batch holds up to BATCH_BYTES, ~13
            # blocks here; the changed block is read again alone before it is refused),
            # where there was one per block.
            assert counts["pread"] <= n // 8, f"{counts['pread']} reads for {n} blocks"
            # Each block hashed once; the changed one three times, as before: as read, after
            # its record is read again, and where the index says that content lies (there).
            assert counts["digest"] == n + 2, counts

    asyncio.run(main())


def test_whatever_is_queued_one_batch_of_bounded_size_is_read_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data the server holds is bounded by its own batch size, not by how much peers
    ask for: requests wait in the queue, and one batch is read at a time."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "big.bin", 32 * MiB, seed=11)
        async with served(tmp_path) as node:
            record = node.record("big.bin")
            batches: list[tuple[int, int]] = []
            reading = 0
            most_at_once = 0
            lock = threading.Lock()
            read = serving.BlockReader.read

            def counted(self: serving.BlockReader, requests: Any, *args: Any) -> Any:
                nonlocal reading, most_at_once
                with lock:
                    reading += 1
                    most_at_once = max(most_at_once, reading)
                    batches.append((len(requests), sum(r.size for r in requests)))
                try:
                    return read(self, requests, *args)
                finally:
                    with lock:
                        reading -= 1

            monkeypatch.setattr(serving.BlockReader, "read", counted)
            rids = node.ask_all(record) + node.ask_all(record)  # two peers' worth at once
            got = await node.answers(rids)
            monkeypatch.undo()
            assert got == _blocks_of(data, record) * 2
            assert most_at_once == 1
            assert sum(count for count, _ in batches) == len(rids)
            assert all(count <= serving.BATCH_BLOCKS for count, _ in batches)
            assert all(size <= serving.BATCH_BYTES for _, size in batches)

    asyncio.run(main())


def test_requests_cancelled_while_they_wait_are_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that asks for a file four times over and cancels all but the last (or whose
    session closes, which cancels them too) costs no read and no place in the queue: a peer
    asking and cancelling without end cannot grow the server's queue."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "big.bin", 16 * MiB, seed=12)
        async with served(tmp_path) as node:
            record = node.record("big.bin")
            read: list[int] = []
            reader_read = serving.BlockReader.read

            def counted(self: serving.BlockReader, requests: Any, *args: Any) -> Any:
                read.extend(r.request_id for r in requests)
                return reader_read(self, requests, *args)

            monkeypatch.setattr(serving.BlockReader, "read", counted)
            assert node.engine is not None
            cancelled: list[int] = []
            for _ in range(3):
                rids = node.ask_all(record)
                for rid in rids:
                    node.engine.handle_event(RequestCancelled(rid, PEER, node.folder_id))
                cancelled += rids
            kept = node.ask_all(record)
            got = await node.answers(kept)
            monkeypatch.undo()
            assert got == _blocks_of(data, record)
            assert sorted(read) == sorted(kept)
            assert not set(cancelled) & set(node.answered)
            assert len(node.folder.server._queue) == 0

    asyncio.run(main())


def test_no_sqlite_and_no_file_io_on_the_event_loop_thread_while_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Index reads, opens and reads of the served files all happen in worker threads: the
    file's own blocks, a block found only through the index in another file, another file
    served for the first time, and a request for a block held nowhere."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "big.bin", 8 * MiB, seed=2)
        other = _write_big(tmp_path / "folder", "other.bin", 2 * MiB, seed=3)
        async with served(tmp_path) as node:
            record, elsewhere = node.record("big.bin"), node.record("other.bin")
            loop_thread = threading.get_ident()
            calls: list[tuple[str, int]] = []

            def on_thread(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
                def wrapper(*args: Any, **kwargs: Any) -> Any:
                    calls.append((name, threading.get_ident()))
                    return call(*args, **kwargs)

                return wrapper

            assert node.index is not None
            conn = node.index._conn
            assert conn is not None
            conn.set_trace_callback(lambda sql: calls.append(("sqlite", threading.get_ident())))
            monkeypatch.setattr(os, "pread", on_thread("pread", os.pread))
            monkeypatch.setattr(os, "open", on_thread("open", os.open))
            try:
                got = await node.answers(node.ask_all(record))
                assert got == _blocks_of(data, record)
                # A block of other.bin asked for under big.bin's path: found by its hash.
                first, second = elsewhere.blocks[:2]
                moved = node.ask("big.bin", 0, first)
                fresh = node.ask("other.bin", 1, second)
                missing = node.ask("big.bin", 1, Block(0, 100, b"\x07" * 32))
                assert await node.answers([moved, fresh, missing]) == [
                    other[: first.size],
                    other[second.offset : second.offset + second.size],
                    None,
                ]
            finally:
                conn.set_trace_callback(None)
                monkeypatch.undo()
            kinds = {name for name, _ in calls}
            assert {"sqlite", "pread", "open"} <= kinds, kinds
            on_loop = [name for name, thread in calls if thread == loop_thread]
            assert not on_loop, f"on the event-loop thread: {sorted(set(on_loop))}"

    asyncio.run(main())


# -- a file changed under the server --------------------------------------------------------


def test_a_file_changed_in_place_is_never_served_under_its_old_hashes(tmp_path: Path) -> None:
    """Same size, other bytes, no rescan yet: the changed block is refused, the unchanged
    ones are still served from the file."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "a.bin", 4 * MiB, seed=4)
        async with served(tmp_path) as node:
            record = node.record("a.bin")
            assert len(record.blocks) >= 4
            assert await node.answers(node.ask_all(record)) == _blocks_of(data, record)
            changed = record.blocks[2]
            fd = os.open(node.root / "a.bin", os.O_WRONLY)
            try:
                os.pwrite(fd, bytes(changed.size), changed.offset)
            finally:
                os.close(fd)
            got = await node.answers(node.ask_all(record))
            expected: list[bytes | None] = list(_blocks_of(data, record))
            expected[2] = None
            assert got == expected

    asyncio.run(main())


def test_a_file_replaced_by_a_rename_is_never_served_from_the_old_file(tmp_path: Path) -> None:
    """The old file is still open for serving when another one is renamed over its name: it
    is not read again, and the new one does not match the old hashes."""

    async def main() -> None:
        data = _write_big(tmp_path / "folder", "b.bin", 4 * MiB, seed=5)
        async with served(tmp_path) as node:
            record = node.record("b.bin")
            assert await node.answers(node.ask_all(record)) == _blocks_of(data, record)
            assert _fds_under(node.root), "served files are kept open"
            (node.root / "new.tmp").write_bytes(random_bytes(6, len(data)))
            os.replace(node.root / "new.tmp", node.root / "b.bin")
            got = await node.answers(node.ask_all(record))
            assert got == [None] * len(record.blocks)

    asyncio.run(main())


def test_a_changed_block_is_answered_from_another_file_with_that_content(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        data = _write_big(tmp_path / "folder", "a.bin", 4 * MiB, seed=7)
        (tmp_path / "folder" / "copy.bin").write_bytes(data)
        async with served(tmp_path) as node:
            record = node.record("a.bin")
            assert await node.answers(node.ask_all(record)) == _blocks_of(data, record)
            (node.root / "new.tmp").write_bytes(random_bytes(8, len(data)))
            os.replace(node.root / "new.tmp", node.root / "a.bin")
            with (node.root / "copy.bin").open("r+b") as f:  # copy.bin keeps block 0 only
                f.seek(record.blocks[1].offset)
                f.write(bytes(len(data) - record.blocks[1].offset))
            got = await node.answers(node.ask_all(record))
            assert got[0] == _blocks_of(data, record)[0]
            assert got[1:] == [None] * (len(record.blocks) - 1)

    asyncio.run(main())


def test_a_rescan_drops_what_was_kept_and_the_new_content_is_served(tmp_path: Path) -> None:
    async def main() -> None:
        data = _write_big(tmp_path / "folder", "a.bin", 2 * MiB, seed=9)
        async with served(tmp_path) as node:
            old = node.record("a.bin")
            assert await node.answers(node.ask_all(old)) == _blocks_of(data, old)
            assert _fds_under(node.root) == [str(node.root / "a.bin")]
            data = random_bytes(10, 3 * MiB)
            (node.root / "new.tmp").write_bytes(data)
            os.replace(node.root / "new.tmp", node.root / "a.bin")
            await node.folder.scan()
            await wait_for(lambda: not _fds_under(node.root), 30, "the old file closed")
            new = node.record("a.bin")
            assert new.sequence > old.sequence
            assert await node.answers(node.ask_all(new)) == _blocks_of(data, new)

    asyncio.run(main())


# -- bounds ---------------------------------------------------------------------------------


def test_serving_200_files_keeps_a_bounded_number_open_and_a_stop_closes_them(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        contents = {f"d{i % 7}/f{i:03d}.bin": random_bytes(100 + i, 3000 + i) for i in range(200)}
        for rel, data in contents.items():
            (tmp_path / "folder" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "folder" / rel).write_bytes(data)
        async with served(tmp_path) as node:
            before = len(os.listdir("/proc/self/fd"))
            records = [node.record(rel) for rel in contents]
            rids = [rid for r in records for rid in node.ask_all(r)]
            got = await node.answers(rids)
            assert got == [contents[r.path] for r in records]
            held = _fds_under(node.root)
            assert 0 < len(held) <= serving.MAX_OPEN_FILES
            assert len(os.listdir("/proc/self/fd")) - before <= serving.MAX_OPEN_FILES
            await node.stop()
            assert not _fds_under(node.root)

    asyncio.run(main())


def _table(blocks: int, seed: int) -> BlockTable:
    rng = random.Random(seed)
    return BlockTable("blake3", tuple(Block(i * 10, 10, rng.randbytes(32)) for i in range(blocks)))


def test_block_tables_are_bounded_in_files_and_in_blocks_least_recently_used_out() -> None:
    cache = TableCache(max_tables=8, max_blocks=2500)
    for i in range(100):
        cache.put(f"f{i}", _table(10, i))
        assert len(cache) <= 8
    assert cache.get("f99") is not None
    assert cache.get("f91") is None
    cache.put("big0", _table(1000, 1000))
    cache.put("big1", _table(1000, 1001))
    assert cache.get("f99") is not None  # the small ones fit beside them
    cache.get("big0")  # used: it outlives big1
    cache.put("big2", _table(1000, 1002))
    assert cache.blocks <= 2500
    assert [cache.get(p) is not None for p in ("big0", "big1", "big2")] == [True, False, True]
    cache.put("huge", _table(2501, 5))
    assert cache.get("huge") is None
    assert cache.blocks <= 2500
    cache.drop("big2")
    cache.clear()
    assert (len(cache), cache.blocks) == (0, 0)


def test_a_block_table_finds_a_block_by_its_index_or_else_by_its_hash() -> None:
    table = _table(50, 11)
    record = FileRecord("x", EntryType.FILE, size=500, blocks=table.blocks, hash_algo="blake3")
    assert BlockTable.of(record) == BlockTable("blake3", table.blocks)
    assert BlockTable.of(record.tombstone(record.version, 1)) is None
    block = table.blocks[17]
    assert table.find(17, 10, block.hash) == 17
    assert table.find(3, 10, block.hash) == 17
    assert table.find(99, 10, block.hash) == 17
    assert table.find(17, 11, block.hash) is None
    assert table.find(17, 10, b"\x00" * 32) is None


# -- temporary files of downloads ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _InProgress:
    """A download in progress as serving sees one: its record and its blocks on disk."""

    record: FileRecord
    done: frozenset[int]


@pytest.mark.parametrize("told", ["invalidated", "next batch"])
def test_a_discarded_download_is_not_kept_open_by_the_server(tmp_path: Path, told: str) -> None:
    """A download's temporary file served from, then discarded: the server closes it when
    its path is invalidated (the engine does so on a discard), or at the latest with the next
    batch (which knows it is no longer in progress), so its space is freed."""
    root = tmp_path / "folder"
    data = _write_big(root, "live.bin", 300_000, seed=11)
    wanted = random_bytes(12, 300_000)
    with Index.open(tmp_path / "index.sqlite3") as index:
        folder = index.add_folder(root, "00" * 16).id
        store = FolderStore(root)
        live_hashes = chunker.hash_buffer(data)
        live = FileRecord(
            "live.bin",
            EntryType.FILE,
            size=len(data),
            blocks=live_hashes.blocks,
            file_hash=live_hashes.file_hash,
            hash_algo=live_hashes.hash_algo,
        )
        hashed = chunker.hash_buffer(wanted)
        record = FileRecord(
            "dl.bin",
            EntryType.FILE,
            size=len(wanted),
            blocks=hashed.blocks,
            file_hash=hashed.file_hash,
            hash_algo=hashed.hash_algo,
        )
        assembly = store.begin(record)
        for i, block in enumerate(record.blocks):
            chunk = wanted[block.offset : block.offset + block.size]
            store.write_verified(assembly, VerifiedBlock(i, chunk))
        assembly.close()
        download = _InProgress(record, frozenset(range(len(record.blocks))))
        reader = serving.BlockReader(store, index, folder)

        def ask(rec: FileRecord, i: int) -> BlockRequested:
            b = rec.blocks[i]
            return BlockRequested(
                i,
                PEER,
                FolderId(b"\x00" * 16),
                rec.path,
                i,
                b.offset,
                b.size,
                b.hash,
                rec.hash_algo,
            )

        first = record.blocks[0]
        got = reader.read([ask(record, 0)], {"dl.bin": download}, serving.Invalidation())
        assert got == [wanted[first.offset : first.offset + first.size]]
        temp = f"{root}/{store.temp_path(record)}"
        assert _fds_under(root) == [temp]
        store.discard(record)
        if told == "invalidated":
            assert reader.read([], {}, serving.Invalidation(paths={"dl.bin"})) == []
        else:
            index.commit_changes(folder, [LocalChange(live)])
            got = reader.read([ask(live, 0)], {}, serving.Invalidation())
            assert got == [data[: live.blocks[0].size]]
        assert temp not in {t.removesuffix(" (deleted)") for t in _fds_under(root)}
        reader.close()
        assert not _fds_under(root)
