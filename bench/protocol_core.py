"""Micro-benchmark of the sans-IO transfer core: two Endpoints, no sockets.

Pushes blocks from a serving Endpoint to a fetching one through memory (the "network" is a
list) and reports MB/s and microseconds per datagram for each side, against a raw AES-GCM
``encrypt_into`` + ``decrypt_into`` loop over the same number of datagrams, measured in the
same run (the ratio is the figure to watch: Python work per datagram beyond the cipher).

    .venv/bin/python bench/protocol_core.py [--mib 64] [--block-kib 256] [--algo blake3]
        [--profile server|client]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lanshare import hashes
from lanshare.config import NetworkConfig, TransferConfig
from lanshare.events import BlockReceived, BlockRequested, RequestFailed, SessionEstablished
from lanshare.protocol import Endpoint, wire

SERVER = ("10.0.0.1", 4000)
CLIENT = ("10.0.0.2", 4000)
FOLDER = bytes(16)
PSK = bytes(range(32))
#: Datagrams per receive call: what UDP GRO coalesces on a veth at MTU 1500 (~45).
GRO_BATCH = 45


class Side:
    """One endpoint and the CPU time spent inside it."""

    def __init__(self, name: str, node: bytes, seed: int, network: NetworkConfig) -> None:
        self.name = name
        self.endpoint = Endpoint(
            TransferConfig(),
            network,
            node_id=node,
            folders={FOLDER: PSK},
            rng=random.Random(seed),
        )
        self.seconds = 0.0


def run(mib: int, block_kib: int, algo: str, profile: str | None) -> dict[str, Any]:
    network = NetworkConfig()
    server = Side("server", b"S" * 8, 1, network)
    client = Side("client", b"C" * 8, 2, network)
    block = random.Random(3).randbytes(block_kib * 1024)
    digest = hashes.digest(algo, block)
    count = mib * 1024 // block_kib
    received = 0
    failed = 0
    profiler = cProfile.Profile() if profile else None

    def timed(side: Side, fn: Any, *args: Any) -> Any:
        if profiler is not None and side.name == profile:
            profiler.enable()
        t0 = time.perf_counter()
        result = fn(*args)
        side.seconds += time.perf_counter() - t0
        if profiler is not None and side.name == profile:
            profiler.disable()
        return result

    def events(side: Side) -> None:
        nonlocal received, failed
        ep = side.endpoint
        while (event := timed(side, ep.next_event)) is not None:
            if isinstance(event, BlockRequested):
                timed(side, ep.send_block, event.request_id, block)
            elif isinstance(event, BlockReceived):
                received += 1
            elif isinstance(event, RequestFailed):
                failed += 1
            elif isinstance(event, SessionEstablished) and side is client:
                for i in range(count):
                    timed(
                        side,
                        lambda i=i: ep.request_block(
                            b"S" * 8,
                            FOLDER,
                            path="blob",
                            index=i,
                            offset=i * len(block),
                            size=len(block),
                            hash=digest,
                            hash_algo=algo,
                        ),
                    )

    client.endpoint.connect(SERVER, FOLDER)
    datagrams = {"server": 0, "client": 0}
    wall0 = time.perf_counter()
    for _ in range(10_000_000):
        if received + failed >= count:
            break
        for side, peer, src in ((client, server, CLIENT), (server, client, SERVER)):
            now = time.perf_counter()
            ep = side.endpoint
            timer = timed(side, ep.get_timer)
            if timer is not None and timer <= now:
                timed(side, ep.handle_timer, now)
            out = timed(side, ep.datagrams_to_send, now)
            datagrams[side.name] += len(out)
            # Handed over as the fast path does: up to GRO_BATCH datagrams per call.
            for i in range(0, len(out), GRO_BATCH):
                batch = [data for data, _ in out[i : i + GRO_BATCH]]
                timed(peer, peer.endpoint.receive_datagrams, batch, src, now)
            events(side)
            events(peer)
    wall = time.perf_counter() - wall0
    if failed:
        raise SystemExit(f"{failed} requests failed")
    total = count * len(block)
    sent = server.endpoint.stats.datagrams_sent
    # The reference: the same number of datagrams, AES-GCM sealed and opened, nothing else.
    raw = raw_aead(sent, network.max_datagram_size)
    result = {
        "bytes": total,
        "datagrams": sent,
        "wall_s": wall,
        "server_s": server.seconds,
        "client_s": client.seconds,
        "server_MBps": total / server.seconds / 1e6,
        "client_MBps": total / client.seconds / 1e6,
        "server_us_per_dgram": server.seconds / sent * 1e6,
        "client_us_per_dgram": client.seconds / sent * 1e6,
        "raw_aead_us_per_dgram": raw / sent * 1e6,
        "retransmitted": server.endpoint.stats.fragments_retransmitted,
        "acks": client.endpoint.stats.datagrams_sent,
    }
    result["server_ratio_to_raw"] = result["server_us_per_dgram"] / result["raw_aead_us_per_dgram"]
    result["client_ratio_to_raw"] = result["client_us_per_dgram"] / result["raw_aead_us_per_dgram"]
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(18)
    return result


def raw_aead(count: int, size: int) -> float:
    """Seconds for ``count`` seal+open pairs of ``size``-byte datagrams (header as AAD)."""
    aead = AESGCM(bytes(32))
    payload = bytearray(size - wire.DATA_OVERHEAD)
    packet = bytearray(size)
    opened = bytearray(size - wire.DATA_OVERHEAD)
    mv = memoryview(packet)
    nonce, aad, body = mv[4:16], mv[:16], mv[16:]
    t0 = time.perf_counter()
    for pn in range(count):
        wire.SHORT_HEADER.pack_into(packet, 0, wire.VERSION, 4, 0, 7, pn)
        aead.encrypt_into(nonce, payload, aad, body)
        wire.SHORT_HEADER.unpack_from(packet)
        aead.decrypt_into(nonce, body, aad, opened)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--block-kib", type=int, default=256)
    parser.add_argument("--algo", default="blake3", choices=sorted(hashes.BY_NAME))
    parser.add_argument("--profile", choices=["server", "client"])
    args = parser.parse_args()
    result = run(args.mib, args.block_kib, args.algo, args.profile)
    print(
        f"{result['bytes'] / 2**20:.0f} MiB in {result['datagrams']} datagrams "
        f"({result['acks']} ACK datagrams back, {result['retransmitted']} retransmitted)"
    )
    for side in ("server", "client"):
        print(
            f"{side:>6}: {result[f'{side}_MBps']:7.1f} MB/s of its own CPU, "
            f"{result[f'{side}_us_per_dgram']:5.2f} us/datagram, "
            f"{result[f'{side}_ratio_to_raw']:4.1f}x raw AES-GCM seal+open "
            f"({result['raw_aead_us_per_dgram']:.2f} us)"
        )
    print(f"wall {result['wall_s']:.2f} s (both sides in one thread)")


if __name__ == "__main__":
    main()
