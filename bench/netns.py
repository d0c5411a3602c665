"""A two-namespace veth lab for the benchmarks: MTU 1500, set up like real NICs, optional loss.

Does I/O (runs ``ip``, ``ethtool`` and ``nft``; needs root). Namespaces are named
``lsbench-<pid>-<n>-{a,b}`` and always removed on exit; ones left by a dead process are removed
at the next start. Nothing touches the machine's own interfaces.
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
INTERFACE = "eth0"  # each end lives in its own namespace, so the names never clash
COMMAND_TIMEOUT = 30.0
#: How a real NIC behaves: frames of MTU size on the wire (no TSO or UDP segmentation
#: offload), GRO on receive (and UDP GRO for forwarded/locally generated UDP on veth).
NIC_FEATURES = ("tso", "off", "tx-udp-segmentation", "off", "gro", "on")
NIC_FEATURES_OPTIONAL = ("rx-udp-gro-forwarding", "on")

_counter = itertools.count()


class LabUnavailable(RuntimeError):
    """The machine cannot run the lab (not root, a tool missing, namespaces refused)."""


@dataclass(frozen=True, slots=True)
class VethLab:
    ns_a: str
    ns_b: str
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
def veth_lab(mtu: int = 1500, loss_percent: float = 0.0) -> Iterator[VethLab]:
    """Two namespaces joined by a veth pair; ``loss_percent`` random loss on B's input."""
    reason = unavailable_reason()
    if reason is not None:
        raise LabUnavailable(reason)
    remove_stale()
    base = f"{PREFIX}{os.getpid()}-{next(_counter)}"
    ns_a, ns_b = f"{base}-a", f"{base}-b"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            _run(["ip", "netns", "add", ns])
            created.append(ns)
        end_a = [INTERFACE, "netns", ns_a, "mtu", str(mtu)]
        end_b = [INTERFACE, "netns", ns_b, "mtu", str(mtu)]
        _run(["ip", "link", "add", *end_a, "type", "veth", "peer", "name", *end_b])
        notes: list[str] = []
        for ns, address in ((ns_a, ADDRESS_A), (ns_b, ADDRESS_B)):
            _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", INTERFACE])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", INTERFACE, "up"])
            _run(["ip", "netns", "exec", ns, "ethtool", "-K", INTERFACE, *NIC_FEATURES])
            optional = ["ip", "netns", "exec", ns, "ethtool", "-K", INTERFACE]
            if _run([*optional, *NIC_FEATURES_OPTIONAL], check=False) is None:
                notes.append(f"{ns}: ethtool could not set {' '.join(NIC_FEATURES_OPTIONAL)}")
        if loss_percent > 0:
            _add_loss(ns_b, loss_percent)
        yield VethLab(ns_a, ns_b, ADDRESS_A, ADDRESS_B, loss_percent, tuple(notes))
    finally:
        for ns in created:
            _run(["ip", "netns", "del", ns], check=False)


def nft_drops(lab: VethLab) -> int:
    """Packets the loss rule has dropped so far (0 without loss)."""
    if not lab.loss_percent:
        return 0
    out = _run(["ip", "netns", "exec", lab.ns_b, "nft", "list", "table", "inet", "lsbench"])
    match = re.search(r"counter packets (\d+)", out or "")
    return int(match.group(1)) if match else 0


def remove_stale() -> None:
    """Delete lab namespaces whose creating process is gone."""
    listing = _run(["ip", "netns", "list"], check=False) or ""
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-\d+-[ab]", name)
        if match and not _alive(int(match.group(1))):
            _run(["ip", "netns", "del", name], check=False)


def _add_loss(namespace: str, loss_percent: float) -> None:
    # Per-mille resolution: numgen gives a uniform number per packet.
    per_mille = round(loss_percent * 10)
    ruleset = (
        "table inet lsbench {\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    meta l4proto udp numgen random mod 1000 < {per_mille} counter drop\n"
        "  }\n"
        "}\n"
    )
    _run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], stdin=ruleset)


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
