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

from lanshare import keys
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

    def __init__(self, cluster: Cluster) -> None:
        raw = keys.parse_key(cluster.key)
        self.addr = ("10.0.0.66", PORT)
        self.endpoint = Endpoint(
            cluster.transfer,
            NetworkConfig(port=PORT),
            node_id=EVIL_ID,
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
            assert victim.folder.engine.strikes[EVIL_ID] >= 2  # manifest entry + blocks
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
