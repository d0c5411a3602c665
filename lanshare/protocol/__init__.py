"""The transfer core: an encrypted, congestion-controlled UDP protocol, pure and sans-IO.

No sockets, clock or files anywhere in this package: ``Endpoint`` takes datagrams and
``now`` and gives back datagrams, timer deadlines and events (``lanshare.events``).
"""

from __future__ import annotations

from lanshare.protocol.connection import EndpointStats, SessionInfo
from lanshare.protocol.endpoint import Endpoint

__all__ = ["Endpoint", "EndpointStats", "SessionInfo"]
