"""Names others chose, shown by real daemons and the real command line: escaped for people
(``peers``, ``ls``, ``status`` and the log), exact in ``--json``.

Two ``lanshare daemon`` processes on 127.0.0.1 (mDNS on 127.0.0.1 only) beside an independent
python-zeroconf registration of a node of the next protocol version, whose instance name holds
U+009B (CSI on some terminals; mDNS refuses C0 controls but not C1) and U+202E (right-to-left
override). A file shared by one daemon is named with a right-to-left override too (controls are
refused in paths, bidi overrides are not), and that daemon's own name holds both characters.
"""

from __future__ import annotations

import json
import secrets
import socket
from typing import TYPE_CHECKING

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from lanshare import keys
from lanshare.discovery import SERVICE_TYPE
from lanshare.peertable import PROTOCOL_VERSION
from tests.e2e.conftest import cluster
from tests.e2e.harness import wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster

__all__ = ["cluster"]

pytestmark = [pytest.mark.e2e, pytest.mark.mdns]

SYNC_TIMEOUT = 30.0
FIND_TIMEOUT = 30.0
"""Seconds for mDNS to find something that takes a second or two."""

# Lower case: discovery may list a name as its lower-case key.
EVIL_NAME = "evil\u009b2j\u202egpj.exe"
EVIL_SHOWN = "evil\\x9b2j\\u202egpj.exe"
EVIL_FILE = "report\u202efdp.exe"
EVIL_FILE_SHOWN = "report\\u202efdp.exe"
RAW = ("\u009b", "\u202e", "\x1b")


def _raw_free(text: str) -> bool:
    return not any(char in text for char in RAW)


def test_names_others_chose_are_escaped_for_people_and_exact_in_json(cluster: Cluster) -> None:
    a = cluster.node("a", extra={"node": {"name": EVIL_NAME}})
    b = cluster.node("b", static_peers=(a.endpoint,))
    (a.folder / EVIL_FILE).write_text("not what it seems\n")
    a.start()
    b.start()
    wait_until(lambda: (b.folder / EVIL_FILE).exists(), SYNC_TIMEOUT, "the file reaches b")

    listing = b.cli("ls").stdout
    assert _raw_free(listing), repr(listing)
    assert any(line.endswith(f"  {EVIL_FILE_SHOWN}") for line in listing.splitlines()), listing
    assert [e["path"] for e in json.loads(b.cli("ls", "--json").stdout)] == [EVIL_FILE]

    status = a.cli("status").stdout
    assert status.startswith(f"node {EVIL_SHOWN} ("), repr(status)
    assert a.cli_json("status")["node"]["name"] == EVIL_NAME

    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    trap = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        trap.bind(("127.0.0.1", 0))
        nonce = keys.generate_announce_nonce()
        node_id = secrets.token_hex(8)
        properties = {
            "v": str(PROTOCOL_VERSION + 1),
            "id": node_id,
            "n": nonce.hex(),
            "t": keys.announce_token(keys.parse_key(cluster.key), nonce).hex(),
            "seq": "7",
        }
        zc.register_service(
            ServiceInfo(
                SERVICE_TYPE,
                f"{EVIL_NAME}.{SERVICE_TYPE}",
                port=trap.getsockname()[1],
                properties=properties,
                server=f"ls-{node_id}.local.",
                parsed_addresses=["127.0.0.1"],
            )
        )
        wait_until(
            lambda: any(p["name"] == EVIL_NAME for p in b.cli_json("peers")),
            FIND_TIMEOUT,
            "b lists the node with the hostile name, exactly, in JSON",
        )
        peers = b.cli("peers").stdout
        assert _raw_free(peers), repr(peers)
        (line,) = [line for line in peers.splitlines() if line.startswith(EVIL_SHOWN)]
        assert f"incompatible (protocol {PROTOCOL_VERSION + 1}" in line, line
        b.wait_log(f"peer {EVIL_SHOWN} ({node_id}) speaks protocol version", FIND_TIMEOUT)
    finally:
        zc.close()
        trap.close()
    for node in (a, b):
        assert _raw_free(node.log_text()), f"{node.name}: a chosen name reached the log raw"
    assert a.stop() == 0
    assert b.stop() == 0
