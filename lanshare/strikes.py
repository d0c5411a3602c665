"""Strikes against misbehaving peers, the bans they earn, and the log lines they cost.

Theory of operation
-------------------
A peer holding the folder key can still send what no honest node would: manifest entries
that do not decode, blocks that fail their hash. Each such frame is a *strike* against the
peer. Counting alone changes nothing for a peer that floods us, and a log line per strike
lets it fill the disk, so:

- Log lines are rate-limited per peer: its first ``LOGGED_STRIKES`` strikes are logged one
  by one, later ones are summed into at most one line per ``SUMMARY_INTERVAL`` ("N more
  strikes (last: ...)"), written when a strike comes after the interval passed.
- ``BAN_THRESHOLD`` strikes within ``BAN_WINDOW`` seconds ban the peer's *address*, which it
  cannot choose as freely as the node id it announces: the IPv4 host, or for IPv6 its /64
  (one host may use any address of its /64; a link-local address is banned alone, since
  every link shares fe80::/64). A ban lasts ``BAN_SECONDS``; a fresh node id from the same
  address is banned all the same. The engine closes the banned address's sessions, does not
  connect to it, and ends any session from it as soon as it comes up.
- Every table here is bounded (``MAX_PEERS`` strike records, ``MAX_BANS`` bans); the oldest
  entry goes first, so a flood of forged node ids or addresses costs memory only up to the
  bound.

All times are the engine's clock (``Clock.now``), handed in by the caller.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from lanshare.events import Addr

logger = logging.getLogger("lanshare.engine")

LOGGED_STRIKES = 5
SUMMARY_INTERVAL = 10.0
BAN_THRESHOLD = 20
BAN_WINDOW = 10.0
BAN_SECONDS = 300.0
MAX_PEERS = 256
MAX_BANS = 256


def ban_key(addr: Addr) -> str:
    """What a ban holds an address by: the IPv4 host, or the IPv6 /64 (a link-local or an
    unparsable host, as itself)."""
    host = addr[0].split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ip.is_link_local:  # every link's prefix is fe80::/64: it names no one
            return str(ip)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Record:
    total: int = 0
    window_start: float = 0.0
    in_window: int = 0
    unlogged: int = 0
    last_what: str = ""
    logged_at: float = field(default=float("-inf"))


@dataclass(frozen=True)
class Ban:
    key: str
    peer: bytes
    until: float
    why: str


class Strikes:
    """Per-peer strike records and per-address bans, both bounded."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._records: OrderedDict[bytes, _Record] = OrderedDict()
        self._bans: OrderedDict[str, Ban] = OrderedDict()

    def total(self, peer: bytes) -> int:
        """Strikes ``peer`` earned (while its record is kept)."""
        record = self._records.get(peer)
        return 0 if record is None else record.total

    def strike(self, peer: bytes, addr: Addr | None, what: str) -> Ban | None:
        """Count a strike against ``peer`` (reached at ``addr`` if known), log it within the
        rate limit; the new ``Ban`` when this strike bans its address."""
        now = self._now()
        record = self._records.pop(peer, None) or _Record(window_start=now)
        self._records[peer] = record  # most recent last: the oldest is dropped first
        while len(self._records) > MAX_PEERS:
            self._records.popitem(last=False)
        record.total += 1
        if now - record.window_start > BAN_WINDOW:
            record.window_start, record.in_window = now, 0
        record.in_window += 1
        self._log(peer, record, what, now)
        if addr is None or record.in_window < BAN_THRESHOLD or self.banned(addr):
            return None
        record.window_start, record.in_window = now, 0
        ban = Ban(ban_key(addr), peer, now + BAN_SECONDS, what)
        self._bans.pop(ban.key, None)
        self._bans[ban.key] = ban
        while len(self._bans) > MAX_BANS:
            self._bans.popitem(last=False)
        logger.warning(
            "peer %s at %s banned for %.0f s: %d strikes within %.0f s (last: %s)",
            peer.hex(),
            ban.key,
            BAN_SECONDS,
            BAN_THRESHOLD,
            BAN_WINDOW,
            what,
        )
        return ban

    def _log(self, peer: bytes, record: _Record, what: str, now: float) -> None:
        if record.total <= LOGGED_STRIKES:
            logger.warning("peer %s: %s (%d strikes)", peer.hex(), what, record.total)
            record.logged_at = now
            return
        record.unlogged += 1
        record.last_what = what
        if now - record.logged_at >= SUMMARY_INTERVAL:
            logger.warning(
                "peer %s: %d more strikes (%d in all; last: %s)",
                peer.hex(),
                record.unlogged,
                record.total,
                what,
            )
            record.unlogged, record.logged_at = 0, now

    def banned(self, addr: Addr) -> bool:
        ban = self._bans.get(ban_key(addr))
        if ban is None:
            return False
        if ban.until <= self._now():
            del self._bans[ban.key]
            return False
        return True

    def bans(self) -> list[Ban]:
        """The bans in force."""
        now = self._now()
        return [b for b in self._bans.values() if b.until > now]
