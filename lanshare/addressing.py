"""IP addresses as users write them and as sockets want them: families, dialling order, scopes.

Theory of operation
-------------------
``[network] ip_version`` (``v4``, ``v6`` or ``both``) says which families this node announces,
browses and dials; ``families`` turns it into a set of IP versions, narrowed to what the UDP
socket can reach (an IPv4 socket cannot reach an IPv6 peer).

One address has one spelling inside lanshare: ``(host, port)`` with a link-local IPv6 host
scoped by interface *index* (``fe80::1%2``), which is what the kernel reports for a datagram
received and what zeroconf reports for an address record heard on an interface. The scope is
local to each host: a peer's ``a=`` lists its link-local address without one, and the covered-
address check compares addresses without it (``peertable``); the scope dialled is that of the
interface the record was heard on. Users write and read the interface *name*
(``[fe80::1%eth0]:47474``): ``resolved_addr`` spells what ``getaddrinfo`` makes of a name as
an index, ``show_addr`` turns the index back into the name, and ``sockaddr`` gives the socket
a scoped address as the 4-tuple Python documents for it (a scope inside the host string is
left to the platform's ``getaddrinfo``).

Dialling order (``dial_order``): IPv4 first, then global IPv6, then link-local IPv6. IPv4 first
because a LAN that has it nearly always routes it, it is what every node of an older release
dials, and two nodes that order alike meet on the same address pair (so their simultaneous
handshakes collapse into one session). The daemon dials one address of a peer at a time, moves
to the next when a handshake fails, and keeps an address that worked (``daemon.AddressBook``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from lanshare.events import Addr

IP_VERSIONS = ("v4", "v6", "both")
"""The values of ``[network] ip_version``."""

_FAMILIES = {"v4": frozenset({4}), "v6": frozenset({6}), "both": frozenset({4, 6})}


def families(ip_version: str, bound: str | None = None) -> frozenset[int]:
    """The IP versions to announce, browse and dial: those of ``ip_version`` that a UDP socket
    bound to ``bound`` (an address; None: not known yet) can use."""
    wanted = _FAMILIES[ip_version]
    if bound is None or ":" in bound:
        return wanted  # an IPv6 socket bound to "::" is dual-stack
    return wanted & {4}


def host_version(host: str) -> int:
    """4 or 6 for an address (scoped or not); 0 for a host name."""
    try:
        return ipaddress.ip_address(host.partition("%")[0]).version
    except ValueError:
        return 0


def is_link_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_link_local
    except ValueError:
        return False


def dial_order(addrs: Iterable[Addr]) -> tuple[Addr, ...]:
    """``addrs`` without repeats, in the order to try them (see the module docstring)."""

    def rank(addr: Addr) -> int:
        if host_version(addr[0]) != 6:
            return 0
        return 2 if is_link_local(addr[0]) else 1

    return tuple(sorted(dict.fromkeys(addrs), key=rank))  # sorted() is stable


def show_addr(addr: Addr) -> str:
    """``ip:port``, ``[ip6]:port``, or ``[fe80::1%eth0]:port`` for a scoped address (the
    index shown as the interface's name while it exists)."""
    host, port = addr
    address, sep, zone = host.partition("%")
    if sep and zone.isdigit():
        # The interface may have gone away: then the index is all there is to show.
        with contextlib.suppress(OSError):
            host = f"{address}%{socket.if_indextoname(int(zone))}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sockaddr(addr: Addr) -> tuple[Any, ...]:
    """What ``sendto`` wants on an IPv6 socket: a scoped address as a 4-tuple."""
    host, port = addr
    address, sep, zone = host.partition("%")
    if sep and zone.isdigit():
        return (address, port, 0, int(zone))
    return addr


def resolved_addr(raw: tuple[Any, ...]) -> Addr:
    """A ``getaddrinfo`` socket address as lanshare spells it (a scope as ``%index``)."""
    if len(raw) > 3 and raw[3]:
        return (f"{raw[0]}%{raw[3]}", int(raw[1]))
    return (str(raw[0]), int(raw[1]))
