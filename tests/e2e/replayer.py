"""Someone on the LAN without the folder key who records a node's announcement and announces
it again as its own, for the end-to-end tests (run in a lab host by ``Host.python``).

``python -m tests.e2e.replayer --record NAME --address IP --port PORT [--as NAME]`` resolves
the service ``NAME`` (an instance name of ``_lanshare._udp.local.``), re-announces its TXT
record byte for byte under the instance name ``--as`` with SRV port ``PORT`` and address
``IP`` (its own), and listens on ``IP:PORT`` for anything a key holder would send there.
JSON lines on stdout: ``{"event": "listening"}``, ``{"event": "recorded", "txt": HEX,
"port": N, "addresses": [...]}``, ``{"event": "replaying", "name": ...}``, and one
``{"event": "datagram", "from": "ip:port", "size": N}`` per datagram received. Runs until
SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
from typing import TYPE_CHECKING

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from lanshare.discovery import SERVICE_TYPE

if TYPE_CHECKING:
    from collections.abc import Sequence

RECORD_ATTEMPTS = 20
"""Resolves tried (3 s each) before giving up on recording the announcement."""


def _say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _Trap(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        _say(event="datagram", **{"from": f"{addr[0]}:{addr[1]}"}, size=len(data))


async def _replay(record: str, address: str, port: int, name: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    transport, _ = await loop.create_datagram_endpoint(_Trap, local_addr=(address, port))
    _say(event="listening")
    aiozc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    try:
        recorded = AsyncServiceInfo(SERVICE_TYPE, f"{record}.{SERVICE_TYPE}")
        for _ in range(RECORD_ATTEMPTS):
            if await recorded.async_request(aiozc.zeroconf, 3000):
                break
        else:
            raise SystemExit(f"{record}: not resolved")
        txt = recorded.text or b""
        _say(
            event="recorded",
            txt=txt.hex(),
            port=recorded.port,
            addresses=recorded.parsed_addresses(IPVersion.V4Only),
        )
        replay = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            port=port,
            properties=txt,
            server=f"replayer-{secrets.token_hex(4)}.local.",
            parsed_addresses=[address],
        )
        # No probing: under a recorded node's own name, that node would win every probe.
        await (await aiozc.async_register_service(replay, cooperating_responders=True))
        _say(event="replaying", name=replay.name)
        await stop.wait()
    finally:
        await aiozc.async_close()
        transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.replayer", description=__doc__)
    parser.add_argument("--record", required=True, help="instance name to record")
    parser.add_argument("--address", required=True, help="the replayer's own address")
    parser.add_argument("--port", type=int, required=True, help="the port it announces")
    parser.add_argument("--as", dest="name", default="replayer", help="instance name to use")
    args = parser.parse_args(argv)
    asyncio.run(_replay(args.record, args.address, args.port, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
