"""A stranger replaying one handshake INITIAL from 300 ports cannot keep a peer out.

Real daemons in a namespace lab: A shares a file; a third host replays an INITIAL that a key
holder sent A (made here with the project's own handshake code and the folder key, as a
recording of a real attempt would be) from 300 source ports, four times a second, answering
every RETRY with the token it got. Before, the half-open sessions this opened filled A's
session table and B, started during the flood, could not get a session with A. Now every
copy after the first is dropped as a replay, and B syncs the file while the flood goes on.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest

from lanshare import keys
from lanshare.config import NetworkConfig, TransferConfig
from lanshare.protocol import Endpoint, wire
from tests.e2e.harness import wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 60.0
FLOOD_SECONDS = 180.0
"""The flood stops by itself after this, whatever happens to the test."""
PORTS = 300


def recorded_initial(key: str, to: tuple[str, int]) -> bytes:
    """An INITIAL for ``to``, as a key holder that is then gone would have sent it."""
    raw = keys.parse_key(key)
    folder = keys.folder_id(raw)
    holder = Endpoint(
        TransferConfig(),
        NetworkConfig(),
        node_id=b"\x77" * 8,
        folders={folder: keys.session_psk(raw)},
        rng=random.Random(77),
    )
    holder.connect(to, folder)
    ((initial, _),) = holder.datagrams_to_send(0.0)
    assert initial[1] == wire.PacketType.INITIAL
    return initial


@pytest.mark.timeout(400)
def test_initial_replayed_from_300_ports_does_not_keep_a_peer_out(cluster: Cluster) -> None:
    lab = cluster.lab(3)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    (a.folder / "hello.txt").write_bytes(b"hello through the flood\n")
    a.start()
    initial = recorded_initial(a.key, (a.address, a.port))
    flood = lab.hosts[2].python(
        "-m",
        "tests.e2e.initial_flood",
        a.endpoint,
        "--initial",
        initial.hex(),
        "--ports",
        str(PORTS),
        "--seconds",
        str(FLOOD_SECONDS),
    )
    try:
        # A answered the replay at least once: it is an INITIAL A accepts.
        flood.expect_json(lambda c: c["responses"] > 0 and c["sent"] >= 4 * PORTS, 30.0)
        b.start()
        wait_until(
            lambda: (b.folder / "hello.txt").read_bytes() == b"hello through the flood\n",
            SYNC_TIMEOUT,
            "B received hello.txt during the flood",
        )
        assert flood.popen.poll() is None, "the flood stopped before B synced"
        transfer = a.status()["transfer"]
        assert transfer["initials_replayed"] >= PORTS
    finally:
        flood.stop()
    for node in (a, b):
        assert node.stop(timeout=10.0) == 0
