"""``search`` (lanshare/listing.py ``search_lan``) over real engines: hits, filters, holders."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from lanshare.listing import search_lan
from lanshare.search import Query
from tests.enginesim import Cluster, LinkSpec, random_bytes, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    from tests.enginesim import SimNode

MiB = 1024 * 1024


async def _search(
    node: SimNode, *terms: str, within: Path | None = None, **options: Any
) -> list[dict[str, Any]]:
    return await search_lan(node.folder.engine, Query.parse(terms, **options), within)


def _holder(hit: dict[str, Any], node: SimNode) -> dict[str, Any] | None:
    return next((h for h in hit["holders"] if h["id"] == node.node_id.hex()), None)


def test_search_finds_what_a_peer_holds_ranked_and_filtered(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=41) as cluster:
            a = cluster.add()
            b = cluster.add(whole_folders=False)  # as a short-lived node: fetches nothing
            a.write("music/Report.mp3", b"r" * 5000)
            a.write("report", b"exact name")
            a.write("reports/2024/summary.txt", b"s" * 100)
            a.write("old-report.txt", b"o" * 300_000)
            a.write("unrelated.txt", b"u")
            await cluster.start()
            b.folder.engine.peer_names[a.node_id] = "alice"

            async def seen() -> list[dict[str, Any]]:
                while True:
                    hits = await _search(b, "report")
                    if len(hits) == 6:
                        return hits
                    await asyncio.sleep(0.05)

            hits = await asyncio.wait_for(seen(), 20)
            assert [h["path"] for h in hits] == [
                "report",  # the exact name
                "reports",  # partial names, shorter paths first
                "old-report.txt",
                "music/Report.mp3",
                "reports/2024",  # only a directory matches
                "reports/2024/summary.txt",
            ]
            by_path = {h["path"]: h for h in hits}
            hit = by_path["old-report.txt"]
            assert hit["folder"] == str(b.root)
            assert (hit["type"], hit["size"], hit["state"]) == ("file", 300_000, "missing")
            assert hit["hash"].startswith("blake3:")
            assert hit["holders"] == [
                {"id": a.node_id.hex(), "name": "alice", "fraction": 1.0, "connected": True}
            ]
            # Filters apply to the version shown; the limit keeps the best.
            assert [h["path"] for h in await _search(b, "report", min_size=1000)] == [
                "old-report.txt",
                "music/Report.mp3",
            ]
            assert [h["path"] for h in await _search(b, "report", max_size=100)] == [
                "report",
                "reports",
                "reports/2024",
                "reports/2024/summary.txt",
            ]
            assert [h["path"] for h in await _search(b, "rep", type_name="dir")] == [
                "reports",
                "reports/2024",
            ]
            assert [h["path"] for h in await _search(b, "report", limit=2)] == [
                "report",
                "reports",
            ]
            assert [h["path"] for h in await _search(b, "*.MP3", within=b.root / "music")] == [
                "music/Report.mp3"
            ]
            assert await _search(b, "*.mp3", within=b.root / "reports") == []
            assert await _search(b, "report", "nowhere") == []
            # A holder that went away is still named, as not connected.
            await a.stop()
            await wait_for(lambda: not b.folder.peers_connected(), 20, "a's session to end")
            (hit,) = await _search(b, "old-report")
            assert hit["holders"] == [
                {"id": a.node_id.hex(), "name": "alice", "fraction": 1.0, "connected": False}
            ]

    asyncio.run(main())


def test_a_peer_still_downloading_is_a_holder_of_what_it_has(tmp_path: Path) -> None:
    """B fetches big.bin from A over a slow link and re-shares what it verified: C's search
    names B with the share it announced, then whole once B is done."""
    size = 16 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=42) as cluster:
            a, b = cluster.add(), cluster.add()
            c = cluster.add(whole_folders=False)
            cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=2 * MiB, queue_time=0.05))
            a.write("big.bin", random_bytes(42, size))
            await cluster.start()
            partial: list[float] = []

            async def watch() -> None:
                while True:
                    hits = await _search(c, "big")
                    held = _holder(hits[0], b) if hits else None
                    if held is not None and held["fraction"] == 1.0:
                        return
                    if held is not None:
                        assert held["connected"]
                        partial.append(held["fraction"])
                    await asyncio.sleep(0.1)

            await asyncio.wait_for(watch(), 120)
            assert any(0.0 < f < 1.0 for f in partial), partial
            assert partial == sorted(partial), "a share announced never shrinks"
            (hit,) = await _search(c, "big")
            assert hit["holders"] == [
                {"id": node.node_id.hex(), "name": "", "fraction": 1.0, "connected": True}
                for node in sorted((a, b), key=lambda n: n.node_id)
            ]

    asyncio.run(main())
