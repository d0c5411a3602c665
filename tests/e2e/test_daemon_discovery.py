"""Discovery through real daemons: nodes of other protocol versions next to them, and a
machine whose addresses change while it runs.

The first test runs ``lanshare daemon`` processes on 127.0.0.1 (mDNS on 127.0.0.1 only, no root)
beside an independent python-zeroconf registration; the second runs them in a namespace lab and
changes a host's addresses with ``ip``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import select
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from lanshare import keys
from lanshare.discovery import SERVICE_TYPE
from lanshare.engine import RECONNECT_INTERVAL
from lanshare.peertable import PROTOCOL_VERSION
from tests.e2e.conftest import cluster
from tests.e2e.harness import wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

__all__ = ["cluster"]

pytestmark = [pytest.mark.e2e, pytest.mark.mdns]

SYNC_TIMEOUT = 30.0
FIND_TIMEOUT = 30.0
"""Seconds for mDNS to find something that takes a second or two."""


def _peer(node: Node, name: str) -> dict[str, Any] | None:
    return next((p for p in node.cli_json("peers") if p["name"] == name), None)


def _connected(node: Node, other: Node) -> bool:
    return any(p["state"] == "connected" and p["name"] == other.name for p in node.call("peers"))


# --- a node speaking another protocol version --------------------------------------------------


def test_nodes_of_other_protocol_versions_are_listed_incompatible_and_left_alone(
    cluster: Cluster,
) -> None:
    a = cluster.node("a")
    b = cluster.node("b", static_peers=(a.endpoint,))
    bystander = cluster.node("c")  # never started: `peers` browses by itself
    a.start()
    b.start()
    wait_until(lambda: _connected(b, a), SYNC_TIMEOUT, "b connected to a")
    a_id = a.status()["node"]["id"]  # by id: other programs' nodes named "a" may be about
    assert [p["protocol"] for p in b.call("peers") if p["id"] == a_id] == [PROTOCOL_VERSION]

    # Two nodes sharing our folder: a newer one (a TXT record with the next version, folder
    # tokens in today's format and a field today's code has never heard of) and an older one
    # (protocol 2, whose tokens were bound to the nonce alone and which announced no a=:
    # which folders it shares cannot be told). Each advertises a socket of ours as its port,
    # so anything a daemon sends it is seen.
    versions = {"future": PROTOCOL_VERSION + 1, "older": 2}
    shown = {"future": [str(b.folder)], "older": []}
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    traps: dict[str, socket.socket] = {}
    names: dict[str, str] = {}
    try:
        for kind, version in versions.items():
            nonce = keys.generate_announce_nonce()
            node_id = secrets.token_hex(8)
            names[kind] = f"{kind}-{secrets.token_hex(3)}"
            trap = traps[kind] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            trap.bind(("127.0.0.1", 0))
            trap.setblocking(False)
            bound = keys.announce_binding(
                nonce,
                bytes.fromhex(node_id),
                f"{names[kind]}.{SERVICE_TYPE}",
                trap.getsockname()[1],
                [ipaddress.IPv4Address("127.0.0.1")],
            )
            properties = {
                "v": str(version),
                "id": node_id,
                "n": nonce.hex(),
                "t": keys.announce_token(keys.parse_key(cluster.key), bound).hex(),
                "seq": "7",
                "a": "7f000001",
            }
            if kind == "future":
                properties["caps"] = "multipath,quic-ish"
            else:
                del properties["a"]
                properties["t"] = _version_2_token(keys.parse_key(cluster.key), nonce).hex()
            info = ServiceInfo(
                SERVICE_TYPE,
                f"{names[kind]}.{SERVICE_TYPE}",
                port=trap.getsockname()[1],
                properties=properties,
                server=f"ls-{node_id}.local.",
                parsed_addresses=["127.0.0.1"],
            )
            zc.register_service(info)
            listed = wait_until(
                lambda kind=kind: _peer(b, names[kind]), FIND_TIMEOUT, f"b lists the {kind} node"
            )
            assert listed == {
                "id": node_id,
                "name": names[kind],
                "addresses": [f"127.0.0.1:{trap.getsockname()[1]}"],
                "folders": shown[kind],
                "sequence": None,
                "state": "incompatible",
                "first_seen": listed["first_seen"],
                "last_seen": listed["last_seen"],
                "protocol": version,
            }
            assert abs(listed["last_seen"] - time.time()) < 60
            wait_until(lambda kind=kind: _peer(a, names[kind]), FIND_TIMEOUT, f"a lists {kind}")
        registered = time.monotonic()
        human = b.cli("peers").stdout
        for kind, version in versions.items():
            both = f"incompatible (protocol {version}, this node {PROTOCOL_VERSION})"
            assert any(names[kind] in line and both in line for line in human.splitlines()), human
        # Without a daemon, `peers` browses for itself and lists them the same way.
        browsed = json.loads(bystander.cli("peers", "--json", "--seconds", "4").stdout)
        assert sorted(
            (p["protocol"], p["state"]) for p in browsed if p["name"] in names.values()
        ) == [(2, "incompatible"), (PROTOCOL_VERSION + 1, "incompatible")]

        # The daemons stay healthy and keep syncing with each other...
        (a.folder / "after.txt").write_text("written while other versions are around\n")
        wait_until(lambda: (b.folder / "after.txt").exists(), SYNC_TIMEOUT, "after.txt reaches b")
        assert (b.folder / "after.txt").read_text() == "written while other versions are around\n"
        for node in (a, b):
            assert node.cli_json("status")["folders"][0]["state"] in ("in_sync", "syncing")
            assert node.alive()
            for version in versions.values():
                node.wait_log(
                    f"speaks protocol version {version}, this node {PROTOCOL_VERSION}", 10
                )
            assert "Traceback" not in node.log_text()
        # ...and neither sends the other nodes a single datagram, though an engine retries every
        # address it was given every RECONNECT_INTERVAL: watched for two of them at least.
        window = registered + 2 * RECONNECT_INTERVAL - time.monotonic()
        ready, _, _ = select.select(list(traps.values()), [], [], max(0.0, window))
        if ready:
            data, sender = ready[0].recvfrom(2048)
            raise AssertionError(f"a daemon sent {len(data)} bytes to another version: {sender}")
        peers = {p["name"]: p["state"] for p in b.cli_json("peers")}
        assert [peers.get(name) for name in names.values()] == ["incompatible"] * 2
    finally:
        zc.close()
        for trap in traps.values():
            trap.close()
    assert a.stop() == 0
    assert b.stop() == 0


def _version_2_token(key: bytes, nonce: bytes) -> bytes:
    """A folder token as protocol 2 announced it: bound to the nonce alone."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"lanshare/v1/announce-key")
    mac = hmac.new(hkdf.derive(key), b"lanshare/v1/announce-token" + nonce, hashlib.sha256)
    return mac.digest()[:8]


# --- a recorded announcement replayed by someone without the key -------------------------------


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_a_replayed_announcement_is_never_connected_to(cluster: Cluster) -> None:
    """A third machine without the key records a's announcement and announces it again from
    its own address: once under its own name and port, once under a's very name and port.
    b, which holds the key, sees both, ignores both and sends them nothing."""
    lab = cluster.lab(3)
    a, b = (cluster.node(n, h) for n, h in zip("ab", lab.hosts[:2], strict=True))
    replayer = lab.hosts[2]
    a.start()
    b.start()
    wait_until(lambda: _connected(b, a), SYNC_TIMEOUT, "b connected to a")
    assert a.host is not None
    link = f"[{a.host.link_local()}%eth0]:{a.port}"  # a announces it once its DAD is over
    want = [(a.name, "connected", [a.endpoint, link])]
    listed: list[object] = []

    def lists_a_alone() -> bool:
        listed[:] = [(p["name"], p["state"], p["addresses"]) for p in b.cli_json("peers")]
        return listed == want

    # Both known before the replays start, so that what b lists afterwards shows what the
    # replays changed: a's link-local address comes once its DAD is over, which on a busy
    # machine may be while the replays are out (and b did not list it within 30 s then).
    wait_until(lists_a_alone, FIND_TIMEOUT, "b lists a at both of its addresses")
    before = b.status()["discovery"]

    own_port = a.port + 1
    replays = {
        "its own name and port": ("replayer", own_port),
        "a's name and port": (a.name, a.port),
    }
    procs = {}
    for what, (name, port) in replays.items():
        # One after the other: both replayers share the host's port 5353, so a unicast
        # answer reaches only one of them, and the other could record the first one's
        # replay under a's name instead of a's own record.
        procs[what] = proc = replayer.python(
            *("-m", "tests.e2e.replayer", "--record", a.name, "--as", name),
            *("--address", replayer.address, "--port", str(port)),
            stderr_path=cluster.tmp_path / f"replayer-{port}.log",
        )
        proc.expect_json(lambda o: o.get("event") == "listening", FIND_TIMEOUT)
        recorded = proc.expect_json(lambda o: o.get("event") == "recorded", FIND_TIMEOUT)
        assert recorded["port"] == a.port, what
        assert recorded["addresses"] == [a.address], what
        proc.expect_json(lambda o: o.get("event") == "replaying", FIND_TIMEOUT)

    # b resolved both (the counters say so) and set them aside: the copy under another name
    # matches no folder, the one under a's name resolves to no address a covered.
    def ignored() -> dict[str, int] | None:
        now: dict[str, int] = b.status()["discovery"]
        unshared = now["unshared"] > before["unshared"]
        return now if unshared and now["uncovered"] > before["uncovered"] else None

    seen = wait_until(ignored, FIND_TIMEOUT, "b resolved both replays")
    seen_at = time.monotonic()
    # An engine tries every address it was given every RECONNECT_INTERVAL: watched for two.
    for what, proc in procs.items():
        window = seen_at + 2 * RECONNECT_INTERVAL - time.monotonic()
        with contextlib.suppress(TimeoutError):
            sent = proc.expect_json(lambda o: o.get("event") == "datagram", max(0.1, window))
            raise AssertionError(f"b sent the replayer ({what}) a datagram: {sent}")
    try:
        wait_until(lists_a_alone, FIND_TIMEOUT, "b lists a alone, at its own addresses")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: b lists {listed}") from None
    assert b.status()["discovery"]["rejected"] == seen["rejected"] == 0
    for proc in procs.values():
        assert proc.stop() == 0

    # a and b go on syncing.
    (a.folder / "after.txt").write_text("written while a replayer was around\n")
    wait_until(lambda: (b.folder / "after.txt").exists(), SYNC_TIMEOUT, "after.txt reaches b")
    for node in (a, b):
        assert _tracebacks_but_zeroconfs(node.log_text()) == []
    assert a.stop() == 0
    assert b.stop() == 0


# --- a machine whose addresses change ----------------------------------------------------------


ADDRESS_BOUND = 10.0
"""Seconds for a peer to list a new address (measured: about 0.5 s; interfaces are polled only
every 15 s where the kernel's notifications are missing, so this bound tells the two apart)."""
STALE_BOUND = 15.0
"""Seconds for a peer to drop an address that went away (measured: about 3 s)."""


def _addresses_of(node: Node, other: Node) -> list[str]:
    """The addresses ``node`` lists for ``other`` (its control socket: no CLI start-up)."""
    for peer in node.call("peers"):
        if peer["name"] == other.name:
            return list(peer["addresses"])
    return []


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_a_new_address_is_announced_within_seconds_and_a_lost_one_dropped(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(2)
    a, b = (cluster.node(n, h) for n, h in zip("ab", lab.hosts, strict=True))
    a.start()
    b.start()
    wait_until(lambda: _connected(b, a), SYNC_TIMEOUT, "b connected to a")
    host = a.host
    assert host is not None
    old = f"{host.address}:{a.port}"
    new_ip = f"{lab.subnet}.201"
    new = f"{new_ip}:{a.port}"
    # Its IPv6 link-local address is announced too, scoped by b's interface: it stays.
    link = f"[{host.link_local()}%eth0]:{a.port}"
    wait_until(lambda: set(_addresses_of(b, a)) == {old, link}, ADDRESS_BOUND, "b lists a")

    # A new address, as a new interface or a DHCP lease after resume would bring.
    host.run("ip", "addr", "add", f"{new_ip}/24", "dev", "eth0")
    started = time.monotonic()
    wait_until(lambda: new in _addresses_of(b, a), ADDRESS_BOUND, "b lists a's new address", 0.05)
    added = time.monotonic() - started
    (entry,) = [p for p in b.cli_json("peers") if p["name"] == "a"]
    assert entry["state"] == "connected"
    assert set(entry["addresses"]) == {old, new, link}

    # The old address goes away, as when a network is left. (The kernel deletes the other
    # addresses of a subnet with its primary one, unless told to promote them.)
    host.run("sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")
    host.run("ip", "addr", "del", f"{host.address}/24", "dev", "eth0")
    started = time.monotonic()
    wait_until(
        lambda: set(_addresses_of(b, a)) == {new, link}, STALE_BOUND, "b drops a's old one", 0.05
    )
    dropped = time.monotonic() - started
    print(  # pytest -s shows the figures
        f"\nb listed a's new address {added:.1f} s after it was added "
        f"and dropped the old one {dropped:.1f} s after it was removed"
    )
    (entry,) = [p for p in b.cli_json("peers") if p["name"] == "a"]
    assert (set(entry["addresses"]), entry["state"]) == ({new, link}, "connected")

    # Both still sync, both ways, over the new address only.
    (a.folder / "from-a.txt").write_text("sent after the move\n")
    (b.folder / "from-b.txt").write_text("sent to the moved machine\n")
    wait_until(lambda: (b.folder / "from-a.txt").exists(), SYNC_TIMEOUT, "from-a.txt reaches b")
    wait_until(lambda: (a.folder / "from-b.txt").exists(), SYNC_TIMEOUT, "from-b.txt reaches a")
    assert (b.folder / "from-a.txt").read_text() == "sent after the move\n"
    assert (a.folder / "from-b.txt").read_text() == "sent to the moved machine\n"
    for node in (a, b):
        assert _tracebacks_but_zeroconfs(node.log_text()) == []
    assert a.stop() == 0
    assert b.stop() == 0


def _tracebacks_but_zeroconfs(log: str) -> list[str]:
    """The lines before each traceback in ``log`` that are not zeroconf's warning about a
    socket whose address vanished before it was told (logged once per socket, harmless)."""
    lines = log.splitlines()
    return [
        lines[i - 1] if i else ""
        for i, line in enumerate(lines)
        if line.startswith("Traceback")
        and not (i and re.match(r"WARNING zeroconf: Error with socket .*\] ", lines[i - 1]))
    ]
