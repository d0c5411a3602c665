"""A hostile peer: records with hostile paths are rejected and logged, blocks that fail their
hash are counted and the file completes from an honest peer, and nothing is ever written
outside the folder or through a symlink.

The hostile peer is a real ``Endpoint`` holding the folder key (an insider gone bad), driven
by the test instead of an engine, so it can send what no engine would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import struct
from typing import TYPE_CHECKING

from lanshare import keys, strikes
from lanshare.config import NetworkConfig
from lanshare.events import BlockRequested, Event, ManifestRequested
from lanshare.manifest import encode_record
from lanshare.protocol import Endpoint
from tests.enginesim import PORT, Cluster, LinkSpec, SimTransport, random_bytes, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from lanshare.manifest import FileRecord

MiB = 1024 * 1024
EVIL_ID = b"\xee" * 8


class HostilePeer:
    """Answers manifests with what it is given and blocks with garbage (or the truth)."""

    def __init__(self, cluster: Cluster, node_id: bytes = EVIL_ID) -> None:
        raw = keys.parse_key(cluster.key)
        self.addr = ("10.0.0.66", PORT)
        self.folder_id = keys.folder_id(raw)
        self.endpoint = Endpoint(
            cluster.transfer,
            NetworkConfig(port=PORT),
            node_id=node_id,
            folders={keys.folder_id(raw): keys.session_psk(raw)},
            rng=random.Random(66),
        )
        self.transport = SimTransport(cluster.network, self.addr, self.endpoint)
        self.transport.sink = self.on_event
        self.entries: list[bytes] = []
        self.truthful: dict[bytes, bytes] = {}
        self.garbage_sent = 0

    def on_event(self, event: Event) -> None:
        if isinstance(event, ManifestRequested):
            header = struct.pack("!B8sQ", 0, b"\x66" * 8, 1000)
            entries = [header] + (self.entries if event.since_seq == 0 else [])
            self.endpoint.send_manifest(event.request_id, entries, False)
        elif isinstance(event, BlockRequested):
            data = self.truthful.get(event.hash)
            if data is None:
                data = os.urandom(event.size)
                self.garbage_sent += 1
            self.endpoint.send_block(event.request_id, data)


def _with_path(record: FileRecord, disguise: str, path: str) -> bytes:
    """``record`` encoded under ``path``, which ``encode_record`` itself would refuse: encode
    under a harmless name of the same length, then patch the bytes."""
    assert len(disguise) == len(path)
    encoded = encode_record(dataclasses.replace(record, path=disguise))
    assert encoded.count(disguise.encode()) == 1
    return encoded.replace(disguise.encode(), path.encode())


def test_hostile_paths_rejected_and_bad_blocks_routed_around(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = 4 * MiB
    outside = tmp_path / "outside"
    outside.mkdir()

    async def main() -> None:
        async with Cluster(tmp_path, seed=21) as cluster:
            honest, victim = cluster.add(), cluster.add()
            cluster.network.set_link(honest.addr, victim.addr, LinkSpec(rate=2 * MiB))
            data = random_bytes(21, size)
            honest.write("big.bin", data)
            honest.write("small.txt", b"small and true")
            os.symlink(outside, victim.path("out"))
            await honest.start()
            evil = HostilePeer(cluster)
            index, folder = honest.folder.engine.index, honest.folder.info.id
            big = index.get(folder, "big.bin")
            small = index.get(folder, "small.txt")
            assert big is not None
            assert small is not None
            evil.truthful[small.blocks[0].hash] = b"small and true"
            evil.entries = [
                encode_record(big),  # the same version as the honest peer: a source
                _with_path(small, "xx/evil.txt", "../evil.txt"),
                _with_path(small, "xabs.txt", "/abs.txt"),
                encode_record(dataclasses.replace(small, path="out/pwn.txt")),
            ]
            await victim.start()
            victim.folder.engine.add_address(evil.addr)
            victim.connect(honest)
            await wait_for(
                lambda: victim.path("big.bin").exists() and victim.path("small.txt").exists(),
                60,
                "the victim to complete from the honest peer",
            )
            assert victim.read("big.bin") == data
            stats = victim.folder.downloads.scheduler.peer_stats(EVIL_ID)
            assert evil.garbage_sent >= 1, "the hostile peer was never asked for a block"
            assert stats.integrity_failures >= 1
            assert victim.folder.engine.strikes.total(EVIL_ID) >= 2  # manifest entry + blocks
            await asyncio.sleep(0.5)  # let any plan touching out/pwn.txt run
            stored = {
                r.path
                for r in victim.folder.engine.index.remote_records(victim.folder.info.id, EVIL_ID)
            }
            assert "../evil.txt" not in stored
            assert "out/pwn.txt" in stored  # a valid path, but below a local symlink
            assert "out/pwn.txt" in victim.folder.problems
            evil.transport.close()

    with caplog.at_level(logging.WARNING, logger="lanshare.engine"):
        asyncio.run(main())
    assert not list(outside.iterdir()), "something was written through the symlink"
    for place in (tmp_path, *[p for p in tmp_path.iterdir() if p.is_dir()]):
        assert not (place / "evil.txt").exists()
    assert any("bad manifest entry" in r.getMessage() for r in caplog.records)
    assert any("failed its hash" in r.getMessage() for r in caplog.records)


def test_flooding_peer_is_banned_by_address_and_logged_within_bounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer sending a thousand undecodable manifest entries loses its session at once, its
    address stays banned for ``BAN_SECONDS`` of the engine's clock even under a fresh node id,
    the flood costs a handful of log lines, and an honest peer elsewhere keeps syncing."""
    flood = 1000
    fresh_id = b"\xef" * 8

    async def main() -> None:
        async with Cluster(tmp_path, seed=22) as cluster:
            honest, victim = cluster.add(), cluster.add()
            honest.write("before.txt", b"before the flood")
            await cluster.start([honest, victim])
            await wait_for(lambda: victim.path("before.txt").exists(), 30, "a first sync")
            engine = victim.folder.engine
            links = victim.folder.exchange.links
            evil = HostilePeer(cluster)
            evil.entries = [b"\xff" * 40] * flood
            engine.add_address(evil.addr)
            await wait_for(
                lambda: engine.strikes.total(EVIL_ID) >= flood, 30, "the flood to be read"
            )
            await wait_for(lambda: EVIL_ID not in links, 10, "the flooder's session to close")
            assert engine.strikes.banned(evil.addr)
            assert [b["address"] for b in engine.status()["banned"]] == ["10.0.0.66"]
            banned_at = engine.now()

            # The same address under a fresh node id: its session ends as soon as it is up,
            # and the victim does not connect to it either.
            evil.transport.close()
            again = HostilePeer(cluster, fresh_id)
            again.endpoint.connect(victim.addr, again.folder_id)
            again.transport.kick()
            await wait_for(
                lambda: any(
                    "banned address" in r.getMessage() and fresh_id.hex() in r.getMessage()
                    for r in caplog.records
                ),
                30,
                "the fresh node id's session to be refused",
            )
            while engine.now() < banned_at + strikes.BAN_SECONDS - 30:
                assert fresh_id not in links
                assert EVIL_ID not in links
                assert honest.node_id in links
                await asyncio.sleep(5)

            # The honest peer on another address syncs on.
            honest.write("after.txt", b"after the flood")
            await honest.scan()
            await wait_for(lambda: victim.path("after.txt").exists(), 30, "sync after the ban")

            # Once the ban has run out, the address is reached again.
            await wait_for(
                lambda: fresh_id in links, strikes.BAN_SECONDS, "a session once the ban ran out"
            )
            assert engine.now() >= banned_at + strikes.BAN_SECONDS
            again.transport.close()

    with caplog.at_level(logging.INFO, logger="lanshare.engine"):
        asyncio.run(main())
    about_evil = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and EVIL_ID.hex() in r.getMessage()
    ]
    assert any("banned for" in r.getMessage() for r in about_evil)
    assert len(about_evil) <= strikes.LOGGED_STRIKES + 3, [r.getMessage() for r in about_evil]
