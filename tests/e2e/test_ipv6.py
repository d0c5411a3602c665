"""Real daemons on a lab LAN with IPv6 only: no IPv4 address on their link.

mDNS runs on ff02::fb, addresses come in AAAA records, the peers dial each other over IPv6
(a global address before a link-local one), a file syncs, and ``lanshare peers`` shows the
addresses as ``[addr]:port`` (``[fe80::…%eth0]:port`` for a link-local one). Without
multicast, a static peer given as ``[fe80::…%eth0]:port`` is dialled on that interface.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.harness import file_digest, start_all, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node
    from tests.lab import Host

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 60.0


def _peer(node: Node, other: Node) -> dict[str, Any] | None:
    """``other``'s entry in ``node``'s ``peers --json`` once connected, else None."""
    other_id = other.status()["node"]["id"]
    result = node.cli("peers", "--json")
    for peer in json.loads(result.stdout):
        if peer["id"] == other_id and peer["state"] == "connected":
            return dict(peer)
    return None


def _synced(node: Node, rel: str, digest: str) -> bool:
    path = node.folder / rel
    return path.is_file() and file_digest(path) == digest


def test_two_ipv6_only_daemons_discover_connect_and_sync(cluster: Cluster) -> None:
    lab = cluster.lab(2, ipv4=False, ipv6=True)
    h1, h2 = lab.hosts
    # One node says v6 outright, the other keeps the default ("both") on a link without IPv4.
    a = cluster.node("v6-a", h1, extra={"network": {"ip_version": "v6"}})
    b = cluster.node("v6-b", h2)
    (a.folder / "hello.txt").write_bytes(b"over IPv6\n" * 1000)
    digest = file_digest(a.folder / "hello.txt")
    start_all([a, b])

    wait_until(lambda: _synced(b, "hello.txt", digest), SYNC_TIMEOUT, "hello.txt on b")
    seen = wait_until(lambda: _peer(b, a), SYNC_TIMEOUT, "b lists a as connected")
    # The session's address first, then what mDNS resolved: a's global address (dialled
    # before the link-local one) and its link-local address, scoped by b's interface name.
    link_local = h1.link_local()
    assert seen["addresses"][0] == f"[{h1.address6}]:{a.port}", seen
    assert f"[{link_local}%eth0]:{a.port}" in seen["addresses"], seen
    assert all(address.startswith("[") for address in seen["addresses"]), seen

    # The other way too, and the human listing shows the same form.
    (b.folder / "back.txt").write_bytes(b"and back\n")
    back = file_digest(b.folder / "back.txt")
    wait_until(lambda: _synced(a, "back.txt", back), SYNC_TIMEOUT, "back.txt on a")
    human = a.cli("peers").stdout
    assert f"[{h2.address6}]:{b.port}" in human, human
    (link,) = a.folder_status()["peers"]
    assert link["address"] == f"[{h2.address6}]:{b.port}", link

    # doctor shows the addresses mDNS uses as peers dial them, and the IPv6 group joined.
    checks = {r["check"]: r for r in json.loads(a.cli("doctor", "--json", check=False).stdout)}
    assert checks["interfaces"] == {
        "check": "interfaces",
        "status": "ok",
        "detail": f"mDNS on eth0 [{h1.address6}]:{a.port}, eth0 [{link_local}%eth0]:{a.port}; "
        "IPv6 only",
        "fix": None,
    }
    assert checks["multicast"]["status"] == "ok", checks["multicast"]
    assert checks["multicast"]["detail"] == (
        "ff02::fb is link-local: no route needed; group joined on eth0"
    )
    assert checks["discovery"]["status"] == "ok", checks["discovery"]


def test_a_static_peer_given_as_a_scoped_link_local_address(cluster: Cluster) -> None:
    # Link-local addresses only, and no multicast: the static peer is all there is.
    lab = cluster.lab(2, ipv4=False, block_multicast=True)
    h1, h2 = lab.hosts
    target = f"[{h2.link_local()}%eth0]:47474"
    a = cluster.node("ll-a", h1, static_peers=(target,))
    b = cluster.node("ll-b", h2)
    (b.folder / "linked.bin").write_bytes(bytes(range(256)) * 400)
    digest = file_digest(b.folder / "linked.bin")
    start_all([a, b])

    wait_until(lambda: _synced(a, "linked.bin", digest), SYNC_TIMEOUT, "linked.bin on a")
    seen = wait_until(lambda: _peer(a, b), SYNC_TIMEOUT, "a lists b as connected")
    assert seen["addresses"][0] == target, seen


def _drop_ipv4_to(host: Host, port: int) -> None:
    """This host's firewall drops lanshare's IPv4 datagrams (mDNS still works over IPv4)."""
    host.run("nft", "add", "table", "inet", "v4block")
    host.run(
        "nft",
        *("add", "chain", "inet", "v4block", "input"),
        "{ type filter hook input priority 0; policy accept; }",
    )
    host.run(
        "nft",
        *("add", "rule", "inet", "v4block", "input"),
        *("meta", "nfproto", "ipv4", "udp", "dport", str(port), "drop"),
    )


def test_a_peer_unreachable_over_ipv4_is_dialled_over_ipv6(cluster: Cluster) -> None:
    # Both families on the link, IPv4 announced and dialled first, but lanshare's IPv4
    # datagrams dropped: the handshakes over IPv4 get no answer, IPv6 is tried next and kept.
    lab = cluster.lab(2, ipv6=True)
    h1, h2 = lab.hosts
    a = cluster.node("dual-a", h1)
    b = cluster.node("dual-b", h2)
    for host, node in ((h1, a), (h2, b)):
        _drop_ipv4_to(host, node.port)
    (b.folder / "fallback.txt").write_bytes(b"IPv4 is blocked\n" * 100)
    digest = file_digest(b.folder / "fallback.txt")
    start_all([a, b])

    wait_until(lambda: _synced(a, "fallback.txt", digest), SYNC_TIMEOUT, "fallback.txt on a")
    seen = wait_until(lambda: _peer(a, b), SYNC_TIMEOUT, "a lists b as connected")
    assert seen["addresses"][0] == f"[{h2.address6}]:{b.port}", seen
    assert f"{h2.address}:{b.port}" in seen["addresses"], seen  # announced, not used


RECONNECT_INTERVAL = 5.0
"""``engine.RECONNECT_INTERVAL``: how often an engine dials the addresses it was given."""


def test_a_peer_offering_both_families_gets_one_session_over_ipv4(cluster: Cluster) -> None:
    # Dialling every address of a peer would open a session on each, the newest replacing
    # the last at every reconnect round: one address at a time, IPv4 first, and it stays.
    lab = cluster.lab(2, ipv6=True)
    h1, h2 = lab.hosts
    a = cluster.node("both-a", h1)
    b = cluster.node("both-b", h2)
    (a.folder / "one.txt").write_bytes(b"one session\n")
    digest = file_digest(a.folder / "one.txt")
    start_all([a, b])

    wait_until(lambda: _synced(b, "one.txt", digest), SYNC_TIMEOUT, "one.txt on b")
    link_local = f"[{h2.link_local()}%eth0]:{b.port}"
    want = [b.endpoint, f"[{h2.address6}]:{b.port}", link_local]

    def listed() -> bool:
        peer = _peer(a, b)
        # The session's address first (IPv4); then the others, in the order mDNS gave them.
        addresses = peer["addresses"] if peer is not None else []
        return addresses[:1] == want[:1] and sorted(addresses) == sorted(want)

    wait_until(listed, SYNC_TIMEOUT, f"a lists b at {want}: {_peer(a, b)}")
    # Two reconnect rounds at least: no session is ever replaced by another to the same peer.
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(
            lambda: "REPLACED" in a.log_text() + b.log_text(),
            2 * RECONNECT_INTERVAL + 1,
            "a session replaced",
        )
    assert listed()
