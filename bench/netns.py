"""A veth lab for the benchmarks: two hosts at MTU 1500 set up like real NICs, optional loss.

Does I/O (runs ``ip``, ``ethtool`` and ``nft``; needs root). Namespaces are named
``lsbench-<pid>-<n>-{a,b,r}`` and always removed on exit; ones left by a dead process are
removed at the next start. Nothing touches the machine's own interfaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

PREFIX = "lsbench-"
ADDRESS_A = "10.231.0.1"
ADDRESS_B = "10.231.0.2"
ROUTED_A, GATEWAY_A = "10.231.1.1", "10.231.1.254"
ROUTED_B, GATEWAY_B = "10.231.2.1", "10.231.2.254"
INTERFACE = "eth0"  # each end lives in its own namespace, so the names never clash
COMMAND_TIMEOUT = 30.0
#: How a real NIC behaves: frames of MTU size on the wire (no TSO or UDP segmentation
#: offload), GRO on receive (and UDP GRO for forwarded/locally generated UDP on veth).
NIC_FEATURES = ("tso", "off", "tx-udp-segmentation", "off", "gro", "on")
NIC_FEATURES_OPTIONAL = ("rx-udp-gro-forwarding", "on")
#: The router in between forwards frame by frame, like a switch: no GRO, no offloads.
SWITCH_FEATURES = ("tso", "off", "tx-udp-segmentation", "off", "gro", "off")

_counter = itertools.count()


class LabUnavailable(RuntimeError):
    """The machine cannot run the lab (not root, a tool missing, namespaces refused)."""


@dataclass(frozen=True, slots=True)
class VethLab:
    ns_a: str
    ns_b: str
    ns_router: str | None
    address_a: str
    address_b: str
    loss_percent: float
    notes: tuple[str, ...]
    """What differs from the requested setup (e.g. an ethtool feature the kernel lacks)."""

    def command(self, namespace: str, args: Sequence[str]) -> list[str]:
        """``args`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *args]


def unavailable_reason() -> str | None:
    """None when the lab can run; otherwise what is missing."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the veth lab needs root"
    for tool, package in (("ip", "iproute2"), ("ethtool", "ethtool"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install -y {package})"
    return None


@contextlib.contextmanager
def veth_lab(
    mtu: int = 1500,
    loss_percent: float = 0.0,
    routed: bool = False,
    loss_protocols: Sequence[str] = ("udp",),
) -> Iterator[VethLab]:
    """Hosts A and B on veth pairs at ``mtu``, set up like real NICs.

    Direct: A and B on one veth pair. Routed: A - R - B, where R forwards without GRO (a plain
    switch) and drops ``loss_percent`` of the packets of ``loss_protocols`` (UDP unless told,
    e.g. ``("udp", "tcp")`` to compare with a TCP peer) it forwards, in both directions.
    Loss needs the routed shape: at B's own input, GRO has already merged ~45 datagrams into
    one packet, so a rule there would drop bursts of 45, not single datagrams.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise LabUnavailable(reason)
    if loss_percent > 0:
        routed = True
    remove_stale()
    base = f"{PREFIX}{os.getpid()}-{next(_counter)}"
    ns_a, ns_b, ns_r = f"{base}-a", f"{base}-b", f"{base}-r"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b, ns_r) if routed else (ns_a, ns_b):
            _run(["ip", "netns", "add", ns])
            created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        notes: list[str] = []
        if routed:
            _link(ns_a, INTERFACE, ns_r, "to-a", mtu)
            _link(ns_b, INTERFACE, ns_r, "to-b", mtu)
            _address(ns_r, "to-a", f"{GATEWAY_A}/24")
            _address(ns_r, "to-b", f"{GATEWAY_B}/24")
            _address(ns_a, INTERFACE, f"{ROUTED_A}/24")
            _address(ns_b, INTERFACE, f"{ROUTED_B}/24")
            _run(["ip", "-n", ns_a, "route", "add", "default", "via", GATEWAY_A])
            _run(["ip", "-n", ns_b, "route", "add", "default", "via", GATEWAY_B])
            _run(["ip", "netns", "exec", ns_r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            for interface in ("to-a", "to-b"):
                _ethtool(ns_r, interface, SWITCH_FEATURES, notes)
            address_a, address_b = ROUTED_A, ROUTED_B
        else:
            _link(ns_a, INTERFACE, ns_b, INTERFACE, mtu)
            _address(ns_a, INTERFACE, f"{ADDRESS_A}/24")
            _address(ns_b, INTERFACE, f"{ADDRESS_B}/24")
            address_a, address_b = ADDRESS_A, ADDRESS_B
        for ns in (ns_a, ns_b):
            _ethtool(ns, INTERFACE, NIC_FEATURES, notes)
            _ethtool(ns, INTERFACE, NIC_FEATURES_OPTIONAL, notes, required=False)
        if loss_percent > 0:
            _add_loss(ns_r, loss_percent, loss_protocols)
        yield VethLab(
            ns_a, ns_b, ns_r if routed else None, address_a, address_b, loss_percent, tuple(notes)
        )
    finally:
        for ns in created:
            _run(["ip", "netns", "del", ns], check=False)


def nft_drops(lab: VethLab) -> int:
    """Packets the loss rule has dropped so far (0 without loss)."""
    if not lab.loss_percent:
        return 0
    assert lab.ns_router is not None
    out = _run(["ip", "netns", "exec", lab.ns_router, "nft", "list", "table", "inet", "lsbench"])
    match = re.search(r"counter packets (\d+)", out or "")
    return int(match.group(1)) if match else 0


def remove_stale() -> None:
    """Delete lab namespaces whose creating process is gone."""
    listing = _run(["ip", "netns", "list"], check=False) or ""
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-\d+-[abr]", name)
        if match and not _alive(int(match.group(1))):
            _run(["ip", "netns", "del", name], check=False)


def _add_loss(namespace: str, loss_percent: float, protocols: Sequence[str]) -> None:
    # Per-mille resolution: numgen gives a uniform number per packet.
    per_mille = round(loss_percent * 10)
    match = ", ".join(protocols)
    ruleset = (
        "table inet lsbench {\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"    meta l4proto {{ {match} }} numgen random mod 1000 < {per_mille} counter drop\n"
        "  }\n"
        "}\n"
    )
    _run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], stdin=ruleset)


def _link(ns1: str, name1: str, ns2: str, name2: str, mtu: int) -> None:
    end1 = [name1, "netns", ns1, "mtu", str(mtu)]
    end2 = [name2, "netns", ns2, "mtu", str(mtu)]
    _run(["ip", "link", "add", *end1, "type", "veth", "peer", "name", *end2])
    _run(["ip", "-n", ns1, "link", "set", name1, "up"])
    _run(["ip", "-n", ns2, "link", "set", name2, "up"])


def _address(namespace: str, interface: str, cidr: str) -> None:
    _run(["ip", "-n", namespace, "addr", "add", cidr, "dev", interface])


def _ethtool(
    namespace: str,
    interface: str,
    features: Sequence[str],
    notes: list[str],
    required: bool = True,
) -> None:
    command = ["ip", "netns", "exec", namespace, "ethtool", "-K", interface, *features]
    if _run(command, check=required) is None:
        notes.append(f"{namespace} {interface}: ethtool could not set {' '.join(features)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(args: Sequence[str], *, check: bool = True, stdin: str | None = None) -> str | None:
    result = subprocess.run(
        list(args), capture_output=True, text=True, input=stdin, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0:
        if check:
            raise LabUnavailable(f"{' '.join(args)}: {result.stderr.strip()}")
        return None
    return result.stdout
