"""The manifest exchange between real engines: what it costs on the wire."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import TYPE_CHECKING

from lanshare.engine import ANNOUNCE_INTERVAL, FolderSync
from lanshare.exchange import Exchange
from lanshare.manifest import encode_record
from lanshare.protocol import wire
from lanshare.protocol.endpoint import Endpoint
from tests.enginesim import Cluster, LinkSpec, SimNode, converge, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    import pytest

RECORDS = 10_000


def test_a_manifest_costs_at_most_one_and_a_half_times_its_records(tmp_path: Path) -> None:
    """10,000 records travel packed into full datagrams, not one datagram per record: every
    byte both nodes send (handshake, requests, answers, acknowledgements, keep-alives) stays
    within 1.5x the encoded records. The receiver fetches nothing (it keeps no whole folder),
    so the manifest is all that moves."""

    async def scenario() -> None:
        async with Cluster(tmp_path, seed=3) as cluster:
            a = cluster.add()
            b = cluster.add(whole_folders=False)
            for i in range(RECORDS - 100):
                a.write(f"d{i % 100:02d}/f{i:05d}.txt", b"%d\n" % i)
            await cluster.start()
            assert a.index is not None
            records = a.index.records_since(a.folder.info.id, 0, 2 * RECORDS)
            assert len(records) == RECORDS  # the files and their 100 directories
            encoded = sum(len(encode_record(r)) for r in records)

            def received() -> int:
                assert b.index is not None
                return sum(1 for _ in b.index.remote_records(b.folder.info.id, a.node_id))

            await wait_for(lambda: received() == RECORDS, 120, "b holds every record of a")
            await wait_for(
                lambda: all(link.listed for link in b.folder.exchange.links.values()), 30, "b done"
            )
            assert b.index is not None
            theirs = list(b.index.remote_records(b.folder.info.id, a.node_id))
            assert {r.path: r for r in theirs} == {r.path: r for r in records}

            network = cluster.network
            sent = sum(network.bytes_sent.values())
            ratio = sent / encoded
            print(f"{RECORDS} records, {encoded} bytes encoded, {sent} bytes sent: {ratio:.3f}x")
            assert ratio <= 1.5, f"{sent} bytes on the wire for {encoded} bytes of records"
            # Packed: a datagram carries many records.
            assert network.datagrams["sent"] < RECORDS / 5

    asyncio.run(scenario())


def test_syncing_many_small_files_sends_each_record_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 1,000 one-block files move from a to b, the manifest answers both nodes send
    (b's tell a about every file b places) stay within 1.5x the records both end up with:
    a file in flight costs no in-progress entry and no manifest round of its own."""
    answered: Counter[str] = Counter()
    send_manifest = Endpoint.send_manifest

    def counting(self: Endpoint, request_id: int, entries: Iterable[bytes], more: bool) -> bool:
        entries = list(entries)
        answered["answers"] += 1
        answered["bytes"] += wire.manifest_batch_size(entries)
        return send_manifest(self, request_id, entries, more)

    monkeypatch.setattr(Endpoint, "send_manifest", counting)

    async def scenario() -> None:
        async with Cluster(tmp_path, seed=4) as cluster:
            a, b = cluster.add(), cluster.add()
            for i in range(1000):
                a.write(f"d{i % 10}/f{i:04d}.bin", bytes([i % 251]) * 4096 + b"%d" % i)
            await cluster.start()
            await converge([a, b], 300)
            held = 0
            for node in (a, b):
                assert node.index is not None
                records = node.index.records_since(node.folder.info.id, 0, 10_000)
                assert len(records) == 1010
                held += sum(len(encode_record(r)) for r in records)
            ratio = answered["bytes"] / held
            print(f"{answered['answers']} answers, {answered['bytes']} bytes: {ratio:.3f}x")
            assert ratio <= 1.5, f"{answered} for {held} bytes of records"

    asyncio.run(scenario())


class PlanningPasses:
    """Counts each node's planning passes once it has read every connected peer's file
    list (patching ``FolderSync.plan_and_apply`` only to count)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nodes: list[SimNode] = []
        self.passes: Counter[int] = Counter()
        plan_and_apply = FolderSync.plan_and_apply

        async def counting(folder: FolderSync) -> None:
            for node in self.nodes:
                assert node.engine is not None
                links = node.folder.exchange.links.values()
                mine = node.folder is folder
                if mine and links and all(link.listed for link in links):
                    self.passes[node.engine.short_id] += 1
            await plan_and_apply(folder)

        monkeypatch.setattr(FolderSync, "plan_and_apply", counting)

    def of(self, node: SimNode) -> int:
        assert node.engine is not None
        return self.passes[node.engine.short_id]


async def _stream_small_files(cluster: Cluster, nodes: list[SimNode]) -> tuple[SimNode, SimNode]:
    """a and b (added to ``nodes``), once b fetched a's 300 one-block files over a slow
    link: b placed them in many small batches."""
    a, b = cluster.add(), cluster.add()
    nodes.extend((a, b))
    for i in range(300):
        a.write(f"d{i % 3}/f{i:03d}.bin", bytes([i % 251]) * 2048 + b"%d" % i)
    cluster.network.set_link(a.addr, b.addr, LinkSpec(rate=300_000))
    await cluster.start()
    await converge([a, b], 120)
    return a, b


def test_a_peer_sending_back_our_own_records_costs_no_planning_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While b fetches a's 300 files over a slow link, b tells a about every batch it
    places: those records are a's own, so a plans after reading b's (empty) file list (and
    perhaps once more for its own start, if that pass ran late) and not again."""
    passes = PlanningPasses(monkeypatch)

    async def scenario() -> None:
        async with Cluster(tmp_path, seed=5) as cluster:
            a, b = await _stream_small_files(cluster, passes.nodes)
            assert passes.of(a) <= 2, f"a planned {passes.of(a)} times"
            assert passes.of(b) >= 1  # b planned what it received: the count sees passes
            # A record of b's that differs from a's is news: a plans and takes it.
            b.write("d0/f000.bin", b"edited on b")
            await b.scan()
            await converge([a, b], 60)
            assert a.read("d0/f000.bin") == b"edited on b"
            assert passes.of(a) >= 2

    asyncio.run(scenario())


def test_placing_a_stream_of_small_files_plans_again_only_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b receives a's 300 files over a slow link, placing them in many batches: a batch
    placed changes no plan, so b plans for what a announced and once more at the end (to
    find itself in sync), not after every batch."""
    passes = PlanningPasses(monkeypatch)

    async def scenario() -> None:
        async with Cluster(tmp_path, seed=6) as cluster:
            _, b = await _stream_small_files(cluster, passes.nodes)
            assert passes.of(b) <= 3, f"b planned {passes.of(b)} times"

    asyncio.run(scenario())


def test_a_stream_of_placements_is_announced_at_most_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b places a's 300 files in many small batches over a slow link: it tells a about its
    new records at most once per ``ANNOUNCE_INTERVAL`` (each announcement has a read b's
    new records), not once per batch; the first change after a quiet spell goes at once."""
    announced: list[float] = []
    nodes: list[SimNode] = []
    announce = Exchange.announce

    def counting(self: Exchange, sequence: int) -> None:
        if nodes and self.folder is nodes[1].folder:
            announced.append(asyncio.get_running_loop().time())
        announce(self, sequence)

    monkeypatch.setattr(Exchange, "announce", counting)

    async def scenario() -> None:
        async with Cluster(tmp_path, seed=7) as cluster:
            a, b = await _stream_small_files(cluster, nodes)
            gaps = [later - earlier for earlier, later in itertools.pairwise(announced)]
            assert len(announced) >= 2
            assert min(gaps) >= ANNOUNCE_INTERVAL * 0.99, gaps
            # After a quiet spell, a change of b's own is told at once.
            quiet = asyncio.get_running_loop().time()
            await asyncio.sleep(2 * ANNOUNCE_INTERVAL)
            b.write("new.txt", b"made on b")
            changed = asyncio.get_running_loop().time()
            await b.scan()
            assert announced[-1] > quiet
            assert announced[-1] - changed < ANNOUNCE_INTERVAL / 2
            await converge([a, b], 60)
            assert a.read("new.txt") == b"made on b"

    asyncio.run(scenario())
