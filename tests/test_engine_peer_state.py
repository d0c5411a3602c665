"""What a node keeps of a peer is bounded by limits of its own, whatever the peer sends: the
HAVE hashes a peer announces, and the requests a block server queues for it.

The hostile peer is a real ``Endpoint`` holding the folder key, driven by the test (see
``tests/test_engine_hostile.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import TYPE_CHECKING

from lanshare.exchange import MAX_EARLY_HAVE
from lanshare.manifest import InProgress, encode_entry
from tests.enginesim import Cluster, LinkSpec, random_bytes, wait_for
from tests.test_engine_hostile import EVIL_ID, HostilePeer

if TYPE_CHECKING:
    from pathlib import Path

    from lanshare.events import NotificationReceived
    from lanshare.exchange import Exchange

MiB = 1024 * 1024


def _count_have(exchange: Exchange) -> list[int]:
    """Count the HAVE hashes ``exchange`` is handed (the call itself is unchanged)."""
    seen = [0]
    notified = exchange.notified

    def counting(event: NotificationReceived) -> None:
        seen[0] += len(event.have)
        notified(event)

    exchange.notified = counting  # type: ignore[method-assign]
    return seen


async def _notify(evil: HostilePeer, victim: bytes, hashes: list[bytes], seen: list[int]) -> None:
    """Send HAVE ``hashes`` to ``victim`` and wait until its engine was handed them all (as
    ``seen`` counts) and nothing is in flight (no retransmission of them comes later)."""
    target = seen[0] + len(hashes)
    evil.endpoint.notify(victim, evil.folder_id, 0, hashes)
    evil.transport.kick()

    def delivered() -> bool:
        info = evil.endpoint.session_info(victim, evil.folder_id)
        return seen[0] >= target and info is not None and info.bytes_in_flight == 0

    await wait_for(delivered, 60, "the HAVE hashes to be acknowledged")


def test_have_hashes_of_a_length_no_algorithm_has_are_strikes_and_never_kept(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=31) as cluster:
            victim = cluster.add()
            await victim.start()
            engine = victim.folder.engine
            links = victim.folder.exchange.links
            seen = _count_have(victim.folder.exchange)
            evil = HostilePeer(cluster)
            engine.add_address(evil.addr)
            await wait_for(lambda: EVIL_ID in links, 30, "the hostile peer's session")
            link = links[EVIL_ID]
            for frame in range(5):  # 2-byte hashes, 255 to a NOTIFY
                hashes = [(frame * 255 + i).to_bytes(2, "big") for i in range(255)]
                await _notify(evil, victim.node_id, hashes, seen)
            assert engine.strikes.total(EVIL_ID) == 5  # one per NOTIFY
            assert not link.have
            evil.transport.close()

    asyncio.run(main())


def test_have_state_holds_only_blocks_of_records_the_peer_announced_and_goes_with_them(
    tmp_path: Path,
) -> None:
    """20,000 HAVE hashes of nothing the peer announced leave at most ``MAX_EARLY_HAVE`` kept
    aside; once it announces a download, the hashes of its blocks count (those heard early
    too); when it stops announcing it, or its session ends, they go."""
    size = 4 * MiB
    flood = 20_000

    async def main() -> None:
        async with Cluster(tmp_path, seed=32) as cluster:
            source, victim = cluster.add(), cluster.add()
            data = random_bytes(32, size)
            source.write("big.bin", data)
            await source.start()
            record = source.folder.engine.index.get(source.folder.info.id, "big.bin")
            assert record is not None
            blocks = record.blocks
            assert len(blocks) >= 4
            await victim.start()
            engine = victim.folder.engine
            exchange = victim.folder.exchange
            seen = _count_have(exchange)
            evil = HostilePeer(cluster)
            for block in blocks:
                evil.truthful[block.hash] = data[block.offset : block.offset + block.size]
            engine.add_address(evil.addr)
            await wait_for(lambda: EVIL_ID in exchange.links, 30, "the hostile peer's session")
            link = exchange.links[EVIL_ID]

            # Hashes of no record it announced: kept aside, the newest MAX_EARLY_HAVE only.
            noise = [os.urandom(32) for _ in range(flood)]
            await _notify(evil, victim.node_id, noise, seen)
            await _notify(evil, victim.node_id, [blocks[3].hash], seen)
            assert not link.have
            assert len(link._early) == MAX_EARLY_HAVE

            # It announces the download: its verified blocks and the one heard early count.
            evil.entries = [encode_entry(InProgress(record, (0, 1)))]
            evil.endpoint.notify(victim.node_id, evil.folder_id, 0)
            evil.transport.kick()
            await wait_for(lambda: "big.bin" in link.in_progress, 30, "the announcement")
            assert link.have == {blocks[0].hash, blocks[1].hash, blocks[3].hash}
            await _notify(evil, victim.node_id, [blocks[2].hash, *noise[:100]], seen)
            assert link.have == {b.hash for b in blocks[:4]}

            # It no longer announces it: what it announced of it goes.
            evil.entries = []
            evil.endpoint.notify(victim.node_id, evil.folder_id, 0)
            evil.transport.kick()
            await wait_for(lambda: not link.in_progress, 30, "the download to be withdrawn")
            assert not link.have

            # Its session ends: all of it goes.
            evil.transport.close()
            engine.endpoint.close(EVIL_ID)
            engine.kick()
            await wait_for(lambda: EVIL_ID not in exchange.links, 30, "the session to end")
            assert victim.folder.downloads.scheduler.peer_stats(EVIL_ID).outstanding == 0

    asyncio.run(main())


def test_a_peer_advertising_a_huge_credit_gets_no_more_of_our_memory(tmp_path: Path) -> None:
    """A peer that advertises 1 GiB of credit, asks for every block of a file twice in its
    first window (a few KiB of requests) and never acknowledges an answer has the victim
    take on (read, answer and hold until acknowledged) at most ``max_serving_size`` for it.
    Before, the bound was 4x the credit the peer advertised: everything it asked for."""
    size = 32 * MiB

    async def main() -> None:
        async with Cluster(tmp_path, seed=33) as cluster:
            victim = cluster.add()
            victim.write("big.bin", random_bytes(33, size))
            await victim.start()
            engine = victim.folder.engine
            record = engine.index.get(victim.folder.info.id, "big.bin")
            assert record is not None
            greedy = dataclasses.replace(cluster.transfer, max_in_flight_size=1 << 30)
            evil = HostilePeer(cluster, transfer=greedy)
            engine.add_address(evil.addr)
            await wait_for(lambda: EVIL_ID in victim.folder.exchange.links, 30, "a session")
            # Nothing the victim sends reaches it again: no acknowledgement ever comes back.
            cluster.network.set_link(victim.addr, evil.addr, LinkSpec(loss=1.0))
            asked = 0
            for block_index, block in enumerate(record.blocks * 2):
                evil.endpoint.request_block(
                    victim.node_id,
                    evil.folder_id,
                    path="big.bin",
                    index=block_index % len(record.blocks),
                    offset=block.offset,
                    size=block.size,
                    hash=block.hash,
                    hash_algo=record.hash_algo,
                )
                asked += block.size
            evil.transport.kick()
            await wait_for(
                lambda: EVIL_ID not in victim.folder.exchange.links, 120, "the session to end"
            )
            taken = victim.counters.requested_of_me[EVIL_ID]
            assert taken > 0
            assert taken <= engine.endpoint.params.max_serving_size < asked
            evil.transport.close()

    asyncio.run(main())
