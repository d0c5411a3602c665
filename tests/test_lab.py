"""The namespace lab itself: hosts reach each other, multicast flows, loss and blocks apply,
and teardown leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

from tests.lab import PREFIX, Host, Lab, cleanup_stale, make_lab, netns_unavailable_reason

__all__ = ["make_lab"]

pytestmark = pytest.mark.netns

# A multicast group and port of our own, so these checks never look like mDNS.
GROUP, PORT = "239.255.77.77", 45454

RECEIVER = f"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", {PORT}))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton("{GROUP}"), socket.inet_aton(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print('{{"event": "listening"}}', flush=True)
try:
    data, addr = s.recvfrom(100)
    print('{{"event": "got", "from": "%s"}}' % addr[0], flush=True)
except socket.timeout:
    print('{{"event": "timeout"}}', flush=True)
"""

SENDER = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
for _ in range(int(sys.argv[3])):
    s.sendto(b"hello", (sys.argv[2], {PORT}))
    time.sleep(0.1)
"""


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _arrives(a: Host, b: Host, *, multicast: bool, timeout: float = 2.0) -> bool:
    """Does a datagram from ``a`` reach ``b`` (to our test group, or to b's address)?"""
    receiver = b.python("-c", RECEIVER, b.address, str(timeout))
    receiver.expect_json(lambda o: o["event"] == "listening", timeout=20)
    target = GROUP if multicast else b.address
    a.run(sys.executable, "-c", SENDER, a.address, target, str(int(timeout * 10)))
    result = receiver.expect_json(lambda o: o["event"] in ("got", "timeout"), timeout=timeout + 20)
    receiver.stop()
    return bool(result["event"] == "got" and result["from"] == a.address)


def test_hosts_reach_each_other_and_multicast_flows(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(3)
    assert _arrives(lab.hosts[0], lab.hosts[2], multicast=False)
    assert _arrives(lab.hosts[0], lab.hosts[1], multicast=True)


def test_block_multicast_keeps_unicast(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(2)
    lab.hosts[0].block_multicast()
    lab.hosts[1].block_multicast()
    assert _arrives(lab.hosts[0], lab.hosts[1], multicast=False)
    # Our test group is not 224.0.0.251, so check the rule itself rather than a send.
    assert "224.0.0.251" in lab.hosts[0].run("nft", "list", "ruleset")
    lab.hosts[0].block_multicast(False)
    assert "224.0.0.251" not in lab.hosts[0].run("nft", "list", "ruleset")


def test_total_loss_stops_traffic_and_clearing_restores_it(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(2)
    lab.hosts[1].set_loss(100)
    assert not _arrives(lab.hosts[0], lab.hosts[1], multicast=False, timeout=1.0)
    lab.hosts[1].set_loss(0)
    assert _arrives(lab.hosts[0], lab.hosts[1], multicast=False)


def test_teardown_removes_everything_even_with_processes_running() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(2)
    try:
        lab.create()
        names = {lab.bridge_ns, *(h.netns for h in lab.hosts)}
        assert names <= _namespaces()
        sleeper = lab.hosts[0].popen("sleep", "600")
    finally:
        lab.close()
    assert not names & _namespaces()
    assert sleeper.popen.poll() is not None


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    # A pid that cannot exist (above the kernel's pid_max).
    stale = f"{PREFIX}4194305-000000-h1"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
        assert stale not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
