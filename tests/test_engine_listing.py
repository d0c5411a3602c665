"""``ls`` and ``pull`` (lanshare/listing.py): entries and their states over real engines."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import textwrap
from typing import TYPE_CHECKING, Any

import pytest

from lanshare import engine
from lanshare import listing as listing_module
from lanshare.errors import TransferError
from lanshare.index import Index
from lanshare.listing import listing, pull
from lanshare.manifest import VersionVector
from tests.enginesim import Cluster, LinkSpec, random_bytes, temp_files, wait_for

if TYPE_CHECKING:
    from pathlib import Path

PEER = b"\x70" * 8
PEER_SHORT = int.from_bytes(PEER, "big")


def _states(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {row["path"]: row["state"] for row in rows}


def test_listing_states_from_records(tmp_path: Path) -> None:
    """Every state, from a peer's records stored in the index (an engine that has not planned
    yet, as a short-lived ``ls`` node sees the LAN)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=31) as cluster:
            node = cluster.add(ignore=("*.log",))
            for name in ("same.txt", "old.txt", "mine.txt", "only-here.txt"):
                node.write(name, name.encode())
            await node.start()
            await node.stop()
            db = Index.open(node.state_dir / "index.sqlite3")
            try:
                folder = db.folders()[0].id
                local = {r.path: r for r in db.iter_records(folder)}
                same, old, mine = local["same.txt"], local["old.txt"], local["mine.txt"]
                theirs = [
                    same,
                    dataclasses.replace(
                        old, file_hash=b"\x01" * 32, version=old.version.bump(PEER_SHORT)
                    ),
                    dataclasses.replace(
                        mine,
                        file_hash=b"\x02" * 32,
                        mtime_ns=mine.mtime_ns + 10**9,
                        version=VersionVector().bump(PEER_SHORT),
                    ),
                    dataclasses.replace(same, path="theirs.txt", file_hash=b"\x03" * 32),
                    dataclasses.replace(same, path="debug.log"),
                    dataclasses.replace(same, path="gone.txt").tombstone(
                        VersionVector().bump(PEER_SHORT), 0
                    ),
                ]
                theirs = [dataclasses.replace(r, sequence=i + 1) for i, r in enumerate(theirs)]
                db.remote_reset(folder, PEER, b"\x09" * 8)
                db.remote_upsert(folder, PEER, theirs)
            finally:
                db.close()
            # What a node sees once it has read the peer's records and before it planned.
            await node.start_idle()
            rows = await listing(node.folder.engine, None)
            assert _states(rows) == {
                "same.txt": "in_sync",
                "old.txt": "outdated",
                "mine.txt": "conflict",
                "only-here.txt": "local_only",
                "theirs.txt": "missing",
                "debug.log": "ignored",
            }
            by_path = {row["path"]: row for row in rows}
            assert by_path["same.txt"]["peers"] == [PEER.hex()]
            assert by_path["theirs.txt"]["peers"] == [PEER.hex()]
            assert by_path["old.txt"]["hash"] == f"blake3:{'01' * 32}"
            below = await listing(node.folder.engine, node.root / "same.txt")
            assert [row["path"] for row in below] == ["same.txt"]

    asyncio.run(main())


def test_ls_and_pull_between_running_engines(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=32) as cluster:
            a = cluster.add(ignore=("secret*",))
            b = cluster.add(ignore=("*.tmp",))
            a.write("common.txt", b"common")
            a.write("scratch.tmp", b"only A shares it; B ignores it")
            b.write("secret.txt", b"A ignores it")
            await cluster.start()

            async def states(node: Any) -> dict[str, str]:
                return _states(await listing(node.folder.engine, None))

            want_a = {"common.txt": "in_sync", "scratch.tmp": "local_only", "secret.txt": "ignored"}
            want_b = {"common.txt": "in_sync", "scratch.tmp": "ignored", "secret.txt": "local_only"}
            got: dict[str, dict[str, str]] = {}

            async def settle() -> None:
                for _ in range(200):
                    got["a"], got["b"] = await states(a), await states(b)
                    if got["a"] == want_a and got["b"] == want_b:
                        return
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(settle(), 20)
            assert (got["a"], got["b"]) == (want_a, want_b)
            assert not b.path("scratch.tmp").exists()
            assert not a.path("secret.txt").exists()
            # pull: a new file on A, fetched on B on demand, with progress reports.
            a.write("fresh/new.bin", b"x" * 300_000)
            await a.scan()
            reports: list[dict[str, Any]] = []

            async def progress(report: dict[str, Any]) -> None:
                reports.append(report)

            rows = await asyncio.wait_for(pull(b.folder.engine, [b.root / "fresh"], progress), 20)
            assert rows == [
                {
                    "path": f"{b.root}/fresh/new.bin",
                    "state": "in_sync",
                    "bytes": 300_000,
                    "size": 300_000,
                }
            ]
            assert b.read("fresh/new.bin") == b"x" * 300_000
            await wait_for(lambda: not b.folder.priority, 5, "pull to drop its priority")

    asyncio.run(main())


def test_a_node_keeping_no_whole_folder_fetches_only_what_is_pulled(tmp_path: Path) -> None:
    """What a short-lived ``pull`` runs: it reads the peers' manifests, lists everything,
    and fetches only the paths asked for (with the directories leading to them)."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=33) as cluster:
            a = cluster.add()
            b = cluster.add(whole_folders=False)
            a.write("docs/one/wanted.bin", b"w" * 200_000)
            a.write("docs/one/other.bin", b"o" * 200_000)
            a.write("top.txt", b"top")
            await cluster.start()

            async def listed() -> None:
                for _ in range(200):
                    entries = await listing(b.folder.engine, None)
                    if _states(entries).get("top.txt") == "missing":
                        return
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(listed(), 20)
            sync = b.folder
            await wait_for(
                lambda: sync.state == "in_sync" and not sync.dirty.is_set(),
                20,
                "B's plan after reading A's manifest",
            )
            assert [p.name for p in b.root.iterdir()] == [".lanshare"]  # the folder marker only

            async def progress(report: dict[str, Any]) -> None:
                del report

            wanted = b.root / "docs/one/wanted.bin"
            rows = await asyncio.wait_for(pull(b.folder.engine, [wanted], progress), 20)
            assert [r["state"] for r in rows] == ["in_sync"]
            assert wanted.read_bytes() == b"w" * 200_000
            assert not (b.root / "docs/one/other.bin").exists()
            assert not (b.root / "top.txt").exists()

    asyncio.run(main())


def test_status_is_not_in_sync_before_a_peers_file_list_was_read(tmp_path: Path) -> None:
    async def main() -> None:
        slow = LinkSpec(delay=0.4)
        async with Cluster(tmp_path, seed=34, link=slow) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("only-on-a.txt", b"a")
            await cluster.start()
            sync = b.folder
            await wait_for(
                lambda: any(
                    link.manifest_request is not None for link in sync.exchange.links.values()
                ),
                20,
                "B to ask A for its file list",
            )
            status = sync.status()
            assert status["state"] == "syncing", status
            assert "file list" in status["reason"]
            await wait_for(lambda: b.path("only-on-a.txt").exists(), 20, "the file on B")
            await wait_for(lambda: sync.status()["state"] == "in_sync", 20, "B in sync")

    asyncio.run(main())


def test_a_node_acting_on_a_few_paths_keeps_the_daemons_partial_downloads(
    tmp_path: Path,
) -> None:
    """A short-lived ``ls`` or ``pull`` on the folder of a stopped daemon leaves the
    daemon's half-done downloads alone: the daemon resumes them later."""
    size = 6 * 1024 * 1024

    async def main() -> None:
        async with Cluster(tmp_path, seed=35) as cluster:
            a, b = cluster.add(), cluster.add()
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=2 * 1024 * 1024))
            a.write("big.bin", random_bytes(35, size))
            a.write("small.txt", b"small")
            await cluster.start()

            def started() -> bool:
                download = b.folder.downloads.active.get("big.bin")
                return download is not None and download.bytes_done >= size // 4

            await wait_for(started, 30, "B a quarter into big.bin")
            await b.crash()
            cluster.network.set_link(a.addr, b.addr, LinkSpec())
            b.whole_folders = False
            await b.start()
            b.connect(a)
            sync = b.folder

            async def progress(report: dict[str, Any]) -> None:
                del report

            rows = await asyncio.wait_for(pull(sync.engine, [b.path("small.txt")], progress), 20)
            assert [r["state"] for r in rows] == ["in_sync"]
            await sync.plan_and_apply()  # one more planning pass, with small.txt in scope
            index = b.index
            assert index is not None
            assert [p.path for p in index.partials(sync.info.id)] == ["big.bin"]
            assert temp_files(b.root)
            assert not b.path("big.bin").exists()

    asyncio.run(main())


def test_a_pull_onto_other_content_here_fails_with_the_reason_and_keeps_it(
    tmp_path: Path,
) -> None:
    """A node that only fetches finds a file of its own where the pulled one goes: it never
    replaces it, and the pull ends with why instead of fetching and rescanning for ever."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=34) as cluster:
            a = cluster.add()
            b = cluster.add(whole_folders=False)
            a.write("doc.txt", b"the LAN's version" * 1000)
            b.write("doc.txt", b"mine, never recorded")
            await cluster.start()

            async def progress(report: dict[str, Any]) -> None:
                del report

            with pytest.raises(TransferError, match="holds other content here"):
                await asyncio.wait_for(pull(b.folder.engine, [b.root / "doc.txt"], progress), 30)
            assert b.read("doc.txt") == b"mine, never recorded"
            assert b.folder.status()["state"] == "error"

    asyncio.run(main())


def test_listing_reads_no_state_the_folder_keeps_for_itself() -> None:
    """``ls`` and ``pull`` see a folder through its methods (``records``, ``want``,
    ``pull_problem``, …), never through the fields it keeps its state in: those change
    with the engine, the methods say what they mean."""
    init = ast.parse(textwrap.dedent(inspect.getsource(engine.FolderSync.__init__)))
    fields = {
        node.attr
        for node in ast.walk(init)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    state = fields - {"engine", "config", "info", "root", "rules", "folder_id", "raw_key"}
    used = {
        node.attr
        for node in ast.walk(ast.parse(inspect.getsource(listing_module)))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "sync"
    }
    assert "failures" in state
    assert not used & state, f"listing.py reads the folder's state: {sorted(used & state)}"
