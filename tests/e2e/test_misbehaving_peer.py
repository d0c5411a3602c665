"""A key holder flooding a real daemon with undecodable file-list entries is banned by address.

One ``lanshare daemon`` on 127.0.0.1 lists the hostile peer as a static peer; the hostile peer
is a real ``Endpoint`` over a real UDP socket on 127.0.0.66, driven from a thread of the test,
answering every file-list request with a thousand entries that do not decode. The daemon must
close its session, show the ban in ``status`` and keep its log to a handful of lines about it.
"""

from __future__ import annotations

import asyncio
import random
import struct
import threading
from typing import TYPE_CHECKING

import pytest

from lanshare import keys
from lanshare.config import NetworkConfig, TransferConfig
from lanshare.events import Event, ManifestRequested
from lanshare.protocol import Endpoint
from lanshare.transport import open_transport
from tests.e2e.conftest import cluster
from tests.e2e.harness import wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster

__all__ = ["cluster"]

pytestmark = [pytest.mark.e2e, pytest.mark.mdns]

EVIL_HOST = "127.0.0.66"
EVIL_PORT = 47466
EVIL_ID = b"\xee" * 8
FLOOD = 1000
BAN_TIMEOUT = 60.0


class FloodingPeer:
    """A real endpoint on its own loop in a thread: every manifest it sends is garbage."""

    def __init__(self, key: str) -> None:
        raw = keys.parse_key(key)
        self.folders = {keys.folder_id(raw): keys.session_psk(raw)}
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.stopping: asyncio.Event | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.run(),))

    async def run(self) -> None:
        self.stopping = asyncio.Event()
        network = NetworkConfig(bind=(EVIL_HOST,), port=EVIL_PORT)
        transfer = TransferConfig()
        self.endpoint = Endpoint(
            transfer, network, node_id=EVIL_ID, folders=self.folders, rng=random.Random(66)
        )
        transport = await open_transport(self.endpoint, self.on_event, network, transfer)
        self.transport = transport
        self.ready.set()
        try:
            await self.stopping.wait()
        finally:
            await transport.close()

    def on_event(self, event: Event) -> None:
        if isinstance(event, ManifestRequested):
            self.requests += 1
            header = struct.pack("!B8sQ", 0, b"\x66" * 8, 1000)
            self.endpoint.send_manifest(event.request_id, [header] + [b"\xff" * 40] * FLOOD, False)
            self.transport.kick()

    def __enter__(self) -> FloodingPeer:
        self.thread.start()
        assert self.ready.wait(30), "the flooding peer did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        stopping = self.stopping
        assert stopping is not None
        self.loop.call_soon_threadsafe(stopping.set)
        self.thread.join(30)
        self.loop.close()


def test_flooding_key_holder_is_banned_and_shown_in_status(cluster: Cluster) -> None:
    a = cluster.node("a", static_peers=(f"{EVIL_HOST}:{EVIL_PORT}",))
    with FloodingPeer(a.key):
        a.start()
        wait_until(
            lambda: f"banned {EVIL_HOST} (peer {EVIL_ID.hex()})" in a.cli("status").stdout,
            BAN_TIMEOUT,
            "the flooding peer to be banned",
        )
        status = a.cli_json("status")
        assert [b["address"] for b in status["banned"]] == [EVIL_HOST]
        assert all(p["id"] != EVIL_ID.hex() for f in status["folders"] for p in f["peers"])
    about_evil = [line for line in a.log_text().splitlines() if f"peer {EVIL_ID.hex()}" in line]
    assert any("banned for" in line for line in about_evil)
    assert len(about_evil) <= 10, about_evil
