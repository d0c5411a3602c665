"""The UDP transport adapter: one socket and one port per daemon, driving one sans-IO endpoint.

Async I/O (the only UDP code in lanshare). Two backends behind one interface: a portable one
on asyncio-dgram (``dgram``) and a Linux fast path (``fast``: batched reads, UDP GSO/GRO).
See ``base`` for the theory of operation.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import TYPE_CHECKING

from lanshare.errors import ConfigError
from lanshare.events import Addr
from lanshare.transport.base import (
    IP_MTU_DISCOVER,
    IP_PMTUDISC_PROBE,
    IPV6_MTU_DISCOVER,
    IPV6_PMTUDISC_PROBE,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    E,
    Features,
    SansIOEndpoint,
    Transport,
    TransportStats,
)
from lanshare.transport.dgram import DgramTransport
from lanshare.transport.fast import FastTransport

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from lanshare.config import NetworkConfig, TransferConfig

__all__ = [
    "Addr",
    "DgramTransport",
    "FastTransport",
    "Features",
    "SansIOEndpoint",
    "Transport",
    "TransportStats",
    "open_transport",
]

logger = logging.getLogger(__name__)


async def open_transport(
    endpoint: SansIOEndpoint[E],
    on_event: Callable[[E], None] | asyncio.Queue[E],
    network: NetworkConfig,
    transfer: TransferConfig,
    *,
    disable: Collection[str] = (),
) -> Transport[E]:
    """Bind the one UDP socket and start driving ``endpoint`` on the running loop.

    Args:
        endpoint: the sans-IO protocol object; the transport is its only caller from now on
            apart from commands, after which the caller calls ``kick()``.
        on_event: where events go: a callable run on the loop (it must not block), or a bounded
            ``asyncio.Queue`` (when full, reading pauses until it has room).
        network: ``bind``, ``port`` (0 = any free port) and ``fast_path`` are used.
        transfer: ``socket_buffer_size`` sizes SO_RCVBUF/SO_SNDBUF and the send queue.
        disable: fast-path features to leave off where the kernel has them (``"gso"``,
            ``"gro"``), to measure what each brings.

    Returns:
        The running transport; close it with ``await transport.close()`` (or ``async with``).

    Raises:
        ConfigError: ``fast_path`` is unknown, or ``on`` where the fast path or GSO/GRO is
            unavailable, or ``bind`` cannot be bound.
    """
    loop = asyncio.get_running_loop()
    mode = network.fast_path
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f'network.fast_path must be "auto", "on" or "off", not {mode!r}')
    sock = _bind_socket(network, transfer)
    try:
        transport: Transport[E]
        missing = "it is off" if mode == "off" else _fast_path_missing(loop, sock)
        if missing is None:
            gso = "gso" not in disable and _try_setsockopt(sock, SOL_UDP, UDP_SEGMENT, 0)
            gro = "gro" not in disable and _try_setsockopt(sock, SOL_UDP, UDP_GRO, 1)
            absent = [n for n, ok in (("gso", gso), ("gro", gro)) if not ok and n not in disable]
            if mode == "on" and absent:
                lacking = " and ".join(n.upper() for n in absent)
                raise ConfigError(f'network.fast_path = "on" but this kernel has no UDP {lacking}')
            transport = FastTransport(sock, endpoint, on_event, loop, transfer, gso, gro)
        elif mode == "on":
            raise ConfigError(f'network.fast_path = "on" but {missing}; use "auto" to fall back')
        else:
            transport = DgramTransport(sock, endpoint, on_event, loop, transfer)
        await transport._start()
    except BaseException:
        sock.close()
        raise
    logger.info(
        "UDP transport on %s port %d: %s backend (GSO %s, GRO %s)",
        transport.local_address[0],
        transport.port,
        transport.features.backend,
        "on" if transport.features.gso else "off",
        "on" if transport.features.gro else "off",
    )
    return transport


def _bind_host(bind: tuple[str, ...], ip_version: str = "both") -> str:
    """The one address to bind: one entry, the dual-stack pair ``0.0.0.0`` + ``::``, or with
    no ``bind`` what ``ip_version`` needs (``::`` takes IPv4 and IPv6)."""
    if not bind:
        return "0.0.0.0" if ip_version == "v4" else "::"
    if len(bind) == 1:
        return bind[0]
    if set(bind) == {"0.0.0.0", "::"}:
        return "::"
    raise ConfigError(
        f"network.bind: lanshare uses one UDP socket, so give one address "
        f'(or "::" for IPv4 and IPv6), not {list(bind)!r}'
    )


def _bind_socket(network: NetworkConfig, transfer: TransferConfig) -> socket.socket:
    host = _bind_host(network.bind, network.ip_version)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        if network.bind or network.ip_version != "both":
            raise ConfigError(
                f"cannot open a UDP socket for {host}: {exc.strerror or exc}"
            ) from exc
        # A kernel without IPv6: "both" is IPv4 there.
        logger.info("no IPv6 on this machine (%s): UDP on IPv4 only", exc.strerror or exc)
        host, family = "0.0.0.0", socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            if host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            _try_setsockopt(sock, socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
        else:
            _try_setsockopt(sock, socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        _set_buffer(sock, socket.SO_RCVBUF, "rmem_max", transfer.socket_buffer_size)
        _set_buffer(sock, socket.SO_SNDBUF, "wmem_max", transfer.socket_buffer_size)
        sock.bind((host, network.port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind UDP {host} port {network.port}: {exc.strerror or exc}; "
            "is another lanshare running? (network.bind, network.port)"
        ) from exc
    return sock


def _set_buffer(sock: socket.socket, option: int, sysctl: str, size: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, option, size)
    # Linux reports twice what it grants (bookkeeping overhead), capped by net.core.*mem_max.
    effective = sock.getsockopt(socket.SOL_SOCKET, option)
    if effective < size:
        logger.warning(
            "UDP socket buffer is %d bytes, less than the %d asked for; raise the cap with "
            "`sysctl -w net.core.%s=%d` for fast links",
            effective,
            size,
            sysctl,
            size,
        )


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def _fast_path_missing(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str | None:
    """Why the fast path cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the fast path needs Linux"
    try:
        loop.add_reader(sock.fileno(), _noop)
    except NotImplementedError:
        return "this event loop cannot watch sockets (no add_reader)"
    loop.remove_reader(sock.fileno())
    return None


def _noop() -> None:
    pass
