"""systemd's service notification protocol (sd_notify) over ``$NOTIFY_SOCKET``.

I/O: one AF_UNIX datagram socket. Without systemd (no socket given) every call does nothing,
so the daemon runs the same in a terminal and under ``Type=notify``.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends ``KEY=VALUE`` lines to the service manager; failures are logged, never raised.

    A lost notification must not stop the daemon: systemd restarts a service whose watchdog
    pings stop, which is the right outcome if the socket is really gone.
    """

    def __init__(self, address: str | None) -> None:
        self._address = _socket_address(address) if address else None
        self._socket: socket.socket | None = None
        if self._address is not None:
            # Non-blocking: a service manager that stops reading must not stall the event loop.
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, or a silent one when it is not set."""
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> None:
        """Send fields such as ``READY=1`` or ``STATUS=scanning`` in one datagram."""
        if self._socket is None or self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            logger.warning("cannot notify the service manager: %s", exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None when not asked.

    ``WATCHDOG_PID``, when present, must name this process: a child that inherited the
    environment must not ping on its parent's behalf.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1_000_000 / 2


def _socket_address(address: str) -> str:
    # A leading "@" names a socket in the abstract namespace, spelled with a NUL byte.
    return "\0" + address[1:] if address.startswith("@") else address
