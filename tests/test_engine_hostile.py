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

from lanshare import exchange as exchange_module
from lanshare import keys, marker, strikes
from lanshare.config import NetworkConfig, SyncConfig, TransferConfig
from lanshare.events import BlockRequested, Event, ManifestReceived, ManifestRequested
from lanshare.index import Index, LocalChange
from lanshare.manifest import (
    MAX_VECTOR_DEVICES,
    EntryType,
    FileRecord,
    VersionVector,
    encode_record,
)
from lanshare.protocol import Endpoint
from tests.enginesim import PORT, Cluster, LinkSpec, SimTransport, random_bytes, wait_for

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

MiB = 1024 * 1024
EVIL_ID = b"\xee" * 8


class HostilePeer:
    """Answers manifests with what it is given and blocks with garbage (or the truth)."""

    def __init__(
        self, cluster: Cluster, node_id: bytes = EVIL_ID, transfer: TransferConfig | None = None
    ) -> None:
        raw = keys.parse_key(cluster.key)
        self.addr = ("10.0.0.66", PORT)
        self.folder_id = keys.folder_id(raw)
        self.endpoint = Endpoint(
            transfer or cluster.transfer,
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


def test_vectors_no_edit_could_bump_are_refused_and_the_folder_keeps_syncing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer's record whose version this node could not bump when its user edits the file
    (its own counter at 2^63-1, or more devices than ``max_vector_devices``) is refused at
    decode and counted; it never becomes a file here, and the user's edits of that path and
    of others still reach the honest peer."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=22) as cluster:
            honest, victim = cluster.add(), cluster.add()
            honest.write("plain.txt", b"plain")
            await honest.start()
            await victim.start()
            victim.connect(honest)
            await wait_for(lambda: victim.path("plain.txt").exists(), 60, "the first sync")
            evil = HostilePeer(cluster)
            plain = honest.folder.engine.index.get(honest.folder.info.id, "plain.txt")
            assert plain is not None
            evil.truthful[plain.blocks[0].hash] = b"plain"
            at_limit = VersionVector.of({victim.folder.engine.short_id: (1 << 63) - 1})
            crowded = VersionVector(tuple((i, 1) for i in range(1, MAX_VECTOR_DEVICES + 2)))
            evil.entries = [
                encode_record(dataclasses.replace(plain, path="poison.txt", version=at_limit)),
                encode_record(dataclasses.replace(plain, path="crowd.txt", version=crowded)),
            ]
            victim.folder.engine.add_address(evil.addr)
            await wait_for(
                lambda: (
                    victim.folder.engine.strikes.total(EVIL_ID) >= 2
                    or victim.path("poison.txt").exists()
                    or victim.path("crowd.txt").exists()
                ),
                60,
                "the hostile manifest to be read",
            )
            assert victim.folder.engine.strikes.total(EVIL_ID) == 2
            stored = {
                r.path
                for r in victim.folder.engine.index.remote_records(victim.folder.info.id, EVIL_ID)
            }
            assert stored.isdisjoint({"poison.txt", "crowd.txt"})

            victim.write("poison.txt", b"the user's own poison.txt")
            victim.write("later.txt", b"written after the attack")
            await victim.scan()
            await wait_for(
                lambda: honest.path("later.txt").exists() and honest.path("poison.txt").exists(),
                60,
                "the victim's edits to reach the honest peer",
            )
            assert honest.read("poison.txt") == b"the user's own poison.txt"
            assert not victim.path("crowd.txt").exists()
            assert victim.folder.problems == {}
            evil.transport.close()

    with caplog.at_level(logging.WARNING, logger="lanshare.engine"):
        asyncio.run(main())
    assert any("above 2^62" in r.getMessage() for r in caplog.records)
    assert any(f"at most {MAX_VECTOR_DEVICES}" in r.getMessage() for r in caplog.records)


def test_a_stored_record_no_edit_can_bump_is_a_problem_of_its_path(tmp_path: Path) -> None:
    """A record stored before peers' vectors were bounded, with this node's counter at
    2^63-1: the user's edit of that file cannot be recorded. That path is a problem in
    ``status``; the folder's other changes still reach the peer."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=23) as cluster:
            honest, victim = cluster.add(), cluster.add()
            victim.write("stuck.txt", b"before")
            await victim.start()
            info, me = victim.folder.info, victim.folder.engine.short_id
            folder_id = victim.folder.folder_id
            await victim.stop()
            with Index.open(victim.state_dir / "index.sqlite3") as index:
                record = index.get(info.id, "stuck.txt")
                assert record is not None
                at_limit = VersionVector.of({me: (1 << 63) - 1})
                (stored,) = index.commit_changes(
                    info.id, [LocalChange(dataclasses.replace(record, version=at_limit))]
                )
            # As the engine stamps the folder after each change it records (else the folder
            # would look restored from a backup).
            stamp = marker.Generation(info.index_id, stored.sequence)
            marker.write(victim.root, folder_id, stamp, durable=False)
            victim.write("stuck.txt", b"edited where no version can say so")
            victim.write("other.txt", b"an ordinary change")
            await honest.start()
            await victim.start()
            victim.connect(honest)
            await wait_for(
                lambda: honest.path("other.txt").exists(), 60, "the other change to sync"
            )
            assert honest.read("other.txt") == b"an ordinary change"
            status = victim.folder.status()
            (problem,) = status["problems"]
            assert problem["path"] == "stuck.txt"
            assert "cannot record the change" in problem["problem"]
            victim.write("later.txt", b"and a later one")
            await victim.scan()
            await wait_for(lambda: honest.path("later.txt").exists(), 60, "a later change")
            assert [p["path"] for p in victim.folder.status()["problems"]] == ["stuck.txt"]

    asyncio.run(main())


class EndlessPeer(HostilePeer):
    """Answers every manifest request with ``batch`` records of paths never sent before, and
    ``more`` set: a file list without end."""

    def __init__(
        self, cluster: Cluster, batch: int, node_id: bytes = EVIL_ID, sent: int = 0
    ) -> None:
        super().__init__(cluster, node_id)
        self.batch = batch
        self.sent = sent
        self.requests = 0
        self.answers = 0

    def on_event(self, event: Event) -> None:
        if isinstance(event, ManifestReceived):
            self.answers += 1
        if not isinstance(event, ManifestRequested):
            super().on_event(event)
            return
        self.requests += 1
        header = struct.pack("!B8sQ", 0, b"\x66" * 8, 1 << 40)
        entries = [header]
        for n in range(self.sent + 1, self.sent + self.batch + 1):
            # Tombstones of paths nobody has: they ask for no action, only storage.
            gone = FileRecord(
                f"junk/{n:08d}", EntryType.FILE, version=VersionVector.of({7: n}), deleted=True
            )
            entries.append(encode_record(dataclasses.replace(gone, sequence=n)))
        self.sent += self.batch
        self.endpoint.send_manifest(event.request_id, entries, True)


def test_a_peer_past_the_record_limit_is_read_no_further_and_named_in_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that sends ``more`` batches for ever: we keep the whole batches that fit under
    ``[sync] max_peer_records`` and nothing of the one that does not, ask it for nothing more
    (not even when it announces news), log it once, and ``status`` names it; the folder
    still syncs with an honest peer."""
    batch, limit = 30, 100

    async def main() -> None:
        async with Cluster(tmp_path, seed=24) as cluster:
            honest = cluster.add()
            victim = cluster.add(sync=SyncConfig(max_peer_records=limit))
            honest.write("plain.txt", b"plain")
            await honest.start()
            await victim.start()
            victim.connect(honest)
            await wait_for(lambda: victim.path("plain.txt").exists(), 60, "the first sync")
            evil = EndlessPeer(cluster, batch)
            victim.folder.engine.add_address(evil.addr)
            exchange = victim.folder.exchange
            await wait_for(
                lambda: EVIL_ID in exchange.over_limit or evil.requests > 2 * limit // batch,
                60,
                "the endless file list to be cut",
            )
            kept = limit // batch * batch
            stored = [
                r.path
                for r in victim.folder.engine.index.remote_records(victim.folder.info.id, EVIL_ID)
            ]
            assert stored == [f"junk/{n:08d}" for n in range(1, kept + 1)]
            assert evil.requests == kept // batch + 1
            # News from it asks for nothing: its NOTIFY is handled before our answer to its
            # own manifest request, which comes after it on the same session.
            evil.endpoint.notify(victim.folder.engine.node_id, evil.folder_id, 1 << 41)
            evil.endpoint.request_manifest(victim.folder.engine.node_id, evil.folder_id, 0)
            evil.transport.kick()
            await wait_for(lambda: evil.answers == 1, 60, "our answer to the peer")
            assert evil.requests == kept // batch + 1

            status = victim.folder.engine.status()
            (folder,) = status["folders"]
            assert folder["state"] == "error"
            assert EVIL_ID.hex() in folder["reason"]
            (trouble,) = folder["peer_problems"]
            assert trouble["peer"] == EVIL_ID.hex()
            assert f"more than {limit} records" in trouble["problem"]
            assert f"{kept} kept" in trouble["problem"]

            honest.write("later.txt", b"still syncing")
            await honest.scan()
            await wait_for(lambda: victim.path("later.txt").exists(), 60, "a later change")
            evil.transport.close()

    with caplog.at_level(logging.WARNING, logger="lanshare.exchange"):
        asyncio.run(main())
    cut = [r for r in caplog.records if "max_peer_records" in r.getMessage()]
    assert len(cut) == 1


def test_a_peer_changing_its_node_id_gets_no_fresh_allowance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record limit holds for everything stored from one address, through any node id
    the peer announces, and only a few node ids of one address are stored at all: a peer
    that comes back under a fresh id each time its list is cut is read no further."""
    batch, limit = 30, 100
    monkeypatch.setattr(exchange_module, "MAX_IDS_PER_SOURCE", 3)

    async def main() -> None:
        async with Cluster(tmp_path, seed=25) as cluster:
            victim = cluster.add(sync=SyncConfig(max_peer_records=limit))
            await victim.start()
            exchange = victim.folder.exchange
            index, folder = victim.folder.engine.index, victim.folder.info.id
            ids = [bytes([0x66, n]) + bytes(6) for n in range(5)]
            sent = 0
            for n, node_id in enumerate(ids):
                evil = EndlessPeer(cluster, batch, node_id, sent)
                victim.folder.engine.add_address(evil.addr)
                await wait_for(lambda i=node_id: i in exchange.over_limit, 120, f"id {n} to be cut")
                sent = evil.sent
                evil.transport.close()
                await wait_for(lambda i=node_id: i not in exchange.links, 120, f"id {n} to go")
            stored = {i: len(list(index.remote_records(folder, i))) for i in ids}
            assert stored == {
                ids[0]: limit // batch * batch,
                ids[1]: 0,
                ids[2]: 0,
                ids[3]: 0,
                ids[4]: 0,
            }
            problems = exchange.peer_problems()
            assert "with the other node ids of 10.0.0.66" in problems[ids[1]]
            assert "one node id too many from 10.0.0.66" in problems[ids[3]]
            (folder_status,) = victim.folder.engine.status()["folders"]
            assert {p["peer"] for p in folder_status["peer_problems"]} == {i.hex() for i in ids}

    asyncio.run(main())
