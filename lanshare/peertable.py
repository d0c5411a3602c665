"""The peer table and the TXT-record codec of discovery: who is out there, sharing what.

Pure: no sockets, no clock, no randomness. Times come in as ``now`` (the owner's monotonic
clock); the owner turns zeroconf callbacks into calls here and forwards the returned events.

Theory of operation
-------------------
Each node announces one DNS-SD service whose TXT record (RFC 6763 §6) is, in this order::

    v=3                 protocol version ("txtvers", RFC 6763 §6.7), a decimal number:
                        protocol.wire.VERSION, the version of the packets it speaks
    id=<16 hex>         node id (8 bytes), lower-case hex
    n=<16 hex>          announce nonce (8 random bytes, renewed at every start)
    t=<16 hex>*k        k folder tokens, announce_token(folder key, binding), concatenated
    seq=<decimal>       the node's manifest sequence (one number for the whole node)
    a=<hex>[,<hex>]*    the addresses the tokens cover: 8 hex digits for an IPv4 address,
                        32 for an IPv6 one; IPv4 first, each family ascending, no repeats
                        (so one set has one spelling); empty when none is announced

A key holder recognises a shared folder by recomputing ``announce_token(key, binding)`` for
each of its keys, where the binding (``keys.announce_binding``) is the nonce, the ``id=``, the
service name the record was found under, the SRV port and the ``a=`` set. Without a key the
tokens are random-looking and change with every nonce, so they link a folder neither across
devices nor across restarts or networks. For the same reason the sequence is one node-wide
number, not one per folder: a per-folder counter beside its token would let an observer follow
a folder across restarts. Which folder changed is told inside the encrypted session.

A recorded record replayed by someone without the key is worth nothing: under another service
name, port or node id its tokens match no folder, and with the same ones its ``a=`` names the
real node's addresses only, which are all the table ever hands out (the resolved addresses
that ``a=`` does not list are dropped; none left and the record is ignored, counted in
``uncovered``). A replay thus makes nobody connect anywhere but to the real node's addresses.
Nothing depends on a clock (no freshness check: a node may have no real-time clock). A node
whose addresses change re-announces with tokens bound to the new set (the nonce stays). A key
holder that resolves only some of the addresses (an IPv4-only host, a record not yet heard)
uses those that ``a=`` covers; the tokens are checked against ``a=``, not against what was
resolved.

Every TXT value from the network is hostile until checked: the whole record is at most
``MAX_TXT_SIZE`` bytes, keys are printable ASCII, known values have exact formats and sizes,
the first occurrence of a key wins (RFC 6763 §6.4) and unknown keys are ignored (room to grow).

A record with another ``v=`` comes from a node speaking another protocol version. It is read
only as far as listing it needs (``ForeignAnnouncement``): the framing and ``id=`` must be valid
as above, ``n=``/``t=``/``a=`` tell which folders it shares only if they have this version's
formats and its tokens this version's binding (version 2 bound them to the nonce alone: which
folders a version-2 node shares is not known), and nothing else is read. The table lists such
a node as ``INCOMPATIBLE``, with the version it speaks (``PeerInfo.protocol``), and never
emits an event for it, so nothing ever connects to it; a record that is malformed whatever its
version is refused and counted, as before.

The table keys mDNS peers by node id (the instance name is only a label: names can collide and
be renamed). mDNS is a hint, not a liveness signal: a peer that crashes without a goodbye stays in
every zeroconf cache for at least 1125 s (its PTR record). So the table asks its owner to probe
quiet peers (``due_probes``) and declares a peer ``LOST`` after ``silence_timeout`` seconds
without hearing any of its records (``expire``). The transport, which has keep-alives, is the
real authority: ``mark_reachable``/``mark_unreachable`` override the mDNS view.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TypeAlias

from lanshare.errors import ConfigError, DecodeError
from lanshare.identity import NODE_ID_SIZE, NodeId
from lanshare.keys import (
    ANNOUNCE_NONCE_SIZE,
    ANNOUNCE_TOKEN_SIZE,
    announce_binding,
    announce_token,
)
from lanshare.protocol.wire import VERSION

Addr: TypeAlias = tuple[str, int]
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
TokenFunction: TypeAlias = Callable[[bytes, bytes], bytes]
"""``announce_token``: (folder key, binding) → token."""

PROTOCOL_VERSION = VERSION
"""The ``v=`` value this code announces: the version of the transfer protocol it speaks."""
MAX_TXT_SIZE = 400
"""Largest TXT record accepted (RFC 6763 §6.2: keep it small; ~400 B still fits 512 B)."""
MAX_TXT_ITEM_SIZE = 255
"""One TXT string: a length byte and at most 255 bytes (RFC 1035 §3.3.14)."""
MAX_ANNOUNCED_FOLDERS = 12
"""Folders one node can announce: keeps our own TXT record under ~270 bytes."""
MAX_SEQUENCE = 2**63 - 1
MAX_ADDRESSES = 8
"""Addresses kept per peer, and announced in ``a=`` at most; more are ignored."""
MAX_NAME_SIZE = 63
"""A DNS label; instance names longer than this are cut."""
MAX_PEERS = 256
"""Entries in the table; lost and unreachable entries are evicted first."""

_KEY_RE = re.compile(rb"[\x20-\x3c\x3e-\x7e]{1,32}")
_HEX_RE = re.compile(rb"(?:[0-9a-f]{2})+")
_SEQ_RE = re.compile(rb"0|[1-9][0-9]{0,18}")
_VERSION_RE = re.compile(rb"[1-9][0-9]{0,3}")
_ADDRESS_RE = re.compile(rb"[0-9a-f]{8}|[0-9a-f]{32}")


# --- announcements (the TXT record) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announcement:
    """What one node says about itself in its TXT record."""

    node_id: NodeId
    nonce: bytes
    tokens: tuple[bytes, ...]
    sequence: int
    addresses: tuple[IPAddress, ...] = ()
    """The addresses the tokens cover, in canonical order (see ``canonical_addresses``)."""
    version: int = PROTOCOL_VERSION


def canonical_addresses(addresses: Iterable[IPAddress]) -> tuple[IPAddress, ...]:
    """``addresses`` in the order ``a=`` writes them: IPv4 first, each family ascending, no
    repeats (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    plain = {
        ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        for ip in addresses
    }
    return tuple(sorted(plain, key=lambda ip: (ip.version, ip.packed)))


def binding(announcement: Announcement | ForeignAnnouncement, service: str, port: int) -> bytes:
    """What the tokens of ``announcement``, found under ``service`` with SRV ``port``, must be
    bound to (``keys.announce_binding``)."""
    return announce_binding(
        announcement.nonce or b"", announcement.node_id, service, port, announcement.addresses
    )


def encode_txt(announcement: Announcement) -> bytes:
    """The TXT record (RFC 1035 character-strings) for ``announcement``.

    Raises:
        ConfigError: more than ``MAX_ANNOUNCED_FOLDERS`` folders or ``MAX_ADDRESSES``
            addresses, addresses not in canonical order, bad field sizes, or a record longer
            than ``MAX_TXT_SIZE`` (see ``fit_addresses``).
    """
    if len(announcement.tokens) > MAX_ANNOUNCED_FOLDERS:
        raise ConfigError(
            f"at most {MAX_ANNOUNCED_FOLDERS} folders can be shared by one node "
            f"({len(announcement.tokens)} are configured)"
        )
    if len(announcement.node_id) != NODE_ID_SIZE or len(announcement.nonce) != (
        ANNOUNCE_NONCE_SIZE
    ):
        raise ConfigError("node id and announce nonce must be 8 bytes each")
    if any(len(t) != ANNOUNCE_TOKEN_SIZE for t in announcement.tokens):
        raise ConfigError("announce tokens must be 8 bytes each")
    if not 0 <= announcement.sequence <= MAX_SEQUENCE:
        raise ConfigError(f"sequence {announcement.sequence} out of range")
    addresses = announcement.addresses
    if len(addresses) > MAX_ADDRESSES or addresses != canonical_addresses(addresses):
        raise ConfigError(
            f"at most {MAX_ADDRESSES} announced addresses, in canonical order: {addresses}"
        )
    items = [
        b"v=%d" % announcement.version,
        b"id=" + announcement.node_id.hex().encode("ascii"),
        b"n=" + announcement.nonce.hex().encode("ascii"),
        b"t=" + b"".join(t.hex().encode("ascii") for t in announcement.tokens),
        b"seq=%d" % announcement.sequence,
        b"a=" + b",".join(ip.packed.hex().encode("ascii") for ip in addresses),
    ]
    if any(len(item) > MAX_TXT_ITEM_SIZE for item in items):
        raise ConfigError("an announcement field is longer than a TXT string can hold")
    raw = b"".join(bytes((len(item),)) + item for item in items)
    if len(raw) > MAX_TXT_SIZE:
        raise ConfigError(f"the announcement needs {len(raw)} bytes, over {MAX_TXT_SIZE}")
    return raw


def fit_addresses(
    announcement: Announcement, addresses: Sequence[IPAddress]
) -> tuple[IPAddress, ...]:
    """The longest prefix of ``addresses`` (in order of preference) that ``announcement``'s
    TXT record can cover within its size limits; canonical, at most ``MAX_ADDRESSES``.

    Every address an announcement covers costs 9 (IPv4) or 33 (IPv6) bytes, and our own
    record must stay within ``MAX_TXT_SIZE`` for every peer to read it: an address left out is
    not announced at all (a key holder would never use it).
    """
    for count in range(min(len(addresses), MAX_ADDRESSES), 0, -1):
        covered = canonical_addresses(addresses[:count])
        try:
            encode_txt(replace(announcement, addresses=covered))
        except ConfigError:
            continue
        return covered
    return ()


@dataclass(frozen=True, slots=True)
class ForeignAnnouncement:
    """What is read of a TXT record of another protocol version: enough to list the node.

    ``nonce`` is None and ``tokens`` and ``addresses`` empty unless ``n=``, ``t=`` and ``a=``
    have this version's formats.
    """

    version: int
    node_id: NodeId
    nonce: bytes | None
    tokens: tuple[bytes, ...]
    addresses: tuple[IPAddress, ...] = ()


def decode_txt(raw: bytes) -> Announcement:
    """Parse and validate a TXT record from the network.

    Raises:
        DecodeError: the record is oversized, malformed, or of another protocol version.
    """
    ann = read_txt(raw)
    if isinstance(ann, ForeignAnnouncement):
        raise DecodeError(f"unsupported announcement version {ann.version}")
    return ann


def read_txt(raw: bytes) -> Announcement | ForeignAnnouncement:
    """Parse a TXT record from the network: all of it for our protocol version, only the node
    id (and the folder tokens, if readable) for another one.

    Raises:
        DecodeError: the record is oversized or malformed (whatever its version), or has no
            valid ``v=`` (a decimal number from 1 to 9999).
    """
    fields = _split_txt(raw)
    version = fields.get(b"v")
    if version is None or not _VERSION_RE.fullmatch(version):
        raise DecodeError(f"bad or missing v= {version!r}")
    node_id = NodeId(_hex_field(fields, b"id", NODE_ID_SIZE))
    if int(version) != PROTOCOL_VERSION:
        try:
            nonce = _hex_field(fields, b"n", ANNOUNCE_NONCE_SIZE)
            tokens = _tokens(fields)
            addresses = _addresses(fields)
        except DecodeError:
            return ForeignAnnouncement(int(version), node_id, None, ())
        return ForeignAnnouncement(int(version), node_id, nonce, tokens, addresses)
    nonce = _hex_field(fields, b"n", ANNOUNCE_NONCE_SIZE)
    tokens = _tokens(fields)
    seq = fields.get(b"seq")
    if seq is None or not _SEQ_RE.fullmatch(seq) or int(seq) > MAX_SEQUENCE:
        raise DecodeError(f"bad seq= {seq!r}")
    return Announcement(node_id, nonce, tokens, int(seq), _addresses(fields))


def _addresses(fields: dict[bytes, bytes | None]) -> tuple[IPAddress, ...]:
    text = fields.get(b"a")
    if text is None:
        raise DecodeError("announcement has no a= (covered addresses)")
    if not text:
        return ()
    parts = text.split(b",")
    if len(parts) > MAX_ADDRESSES or not all(_ADDRESS_RE.fullmatch(p) for p in parts):
        raise DecodeError(f"a= is not at most {MAX_ADDRESSES} addresses in lower-case hex")
    addresses = tuple(ipaddress.ip_address(bytes.fromhex(p.decode("ascii"))) for p in parts)
    if addresses != canonical_addresses(addresses):
        raise DecodeError("a= is not in canonical order (IPv4 first, ascending, no repeats)")
    return addresses


def _tokens(fields: dict[bytes, bytes | None]) -> tuple[bytes, ...]:
    token_hex = fields.get(b"t")
    if token_hex is None:
        raise DecodeError("announcement has no t= (folder tokens)")
    if token_hex and not _HEX_RE.fullmatch(token_hex):
        raise DecodeError("t= is not lower-case hex")
    step = 2 * ANNOUNCE_TOKEN_SIZE
    if len(token_hex) % step or len(token_hex) > step * MAX_ANNOUNCED_FOLDERS:
        raise DecodeError(f"t= has a bad length ({len(token_hex)})")
    return tuple(
        bytes.fromhex(token_hex[i : i + step].decode("ascii"))
        for i in range(0, len(token_hex), step)
    )


def _split_txt(raw: bytes) -> dict[bytes, bytes | None]:
    if not raw or len(raw) > MAX_TXT_SIZE:
        raise DecodeError(f"TXT record of {len(raw)} bytes (1..{MAX_TXT_SIZE} accepted)")
    fields: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(raw):
        size = raw[i]
        i += 1
        if size == 0 or i + size > len(raw):
            raise DecodeError("TXT record has an empty or truncated string")
        item = raw[i : i + size]
        i += size
        key, sep, value = item.partition(b"=")
        if not _KEY_RE.fullmatch(key):
            raise DecodeError("TXT key is not printable ASCII")
        key = key.lower()
        if key not in fields:  # RFC 6763 §6.4: the first occurrence wins
            fields[key] = value if sep else None
    return fields


def _hex_field(fields: dict[bytes, bytes | None], key: bytes, size: int) -> bytes:
    value = fields.get(key)
    if value is None or len(value) != 2 * size or not _HEX_RE.fullmatch(value):
        raise DecodeError(f"{key.decode()}= must be {2 * size} lower-case hex digits")
    return bytes.fromhex(value.decode("ascii"))


# --- peers, events, policy -------------------------------------------------------------------


class PeerState(Enum):
    """Where a table entry stands; the value is what ``lanshare peers --json`` shows."""

    UP = "up"
    """Announced over mDNS and heard recently."""
    REACHABLE = "reachable"
    """The transport confirmed it (a session answers); mDNS silence no longer matters."""
    LOST = "lost"
    """Announced, then silent for ``silence_timeout`` (crashed or gone without goodbye)."""
    UNREACHABLE = "unreachable"
    """The transport said it does not answer."""
    STATIC = "static"
    """A configured ``host:port`` candidate, for the transport to probe."""
    EXCHANGED = "exchanged"
    """A ``host:port`` candidate learned from another peer, for the transport to probe."""
    INCOMPATIBLE = "incompatible"
    """Announces another protocol version: listed, never connected to, no events."""


ACTIVE_STATES = frozenset(
    {PeerState.UP, PeerState.REACHABLE, PeerState.STATIC, PeerState.EXCHANGED}
)
"""States in which a peer counts as present (a ``PeerUp`` was sent and no ``PeerDown``)."""


class DownReason(Enum):
    GOODBYE = "goodbye"
    """The peer withdrew its service (mDNS goodbye)."""
    SILENT = "silent"
    """Nothing heard from it for ``silence_timeout`` despite probes."""
    UNREACHABLE = "unreachable"
    """The owner (transport) marked it unreachable."""
    UNSHARED = "unshared"
    """It no longer announces any folder we share."""
    REMOVED = "removed"
    """The owner removed a candidate."""
    INCOMPATIBLE = "incompatible"
    """It now announces another protocol version."""


@dataclass(frozen=True, slots=True)
class SharedFolder:
    """One of our folders as discovery needs it: a label to report and the raw key."""

    label: str
    key: bytes


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A snapshot of one table entry. ``first_seen``/``last_seen`` are Unix seconds."""

    node_id: NodeId | None
    """None for a ``host:port`` candidate whose id the transport has not learned yet."""
    name: str
    addresses: tuple[Addr, ...]
    folders: tuple[str, ...]
    sequence: int | None
    state: PeerState
    first_seen: float
    last_seen: float
    protocol: int | None = None
    """The protocol version it announced over mDNS (None for a candidate never announced)."""

    @property
    def key(self) -> str:
        """The table key: the node id in hex, or ``host:port`` for an anonymous candidate."""
        if self.node_id is not None:
            return self.node_id.hex()
        return format_addr(self.addresses[0])

    def to_json(self, show: Callable[[Addr], str] | None = None) -> dict[str, object]:
        """The object ``lanshare peers --json`` prints; ``show`` spells an address (default
        ``format_addr``; ``addressing.show_addr`` names the interface of a scope)."""
        show = show or format_addr
        return {
            "id": None if self.node_id is None else self.node_id.hex(),
            "name": self.name,
            "addresses": [show(a) for a in self.addresses],
            "folders": list(self.folders),
            "sequence": self.sequence,
            "state": self.state.value,
            "first_seen": round(self.first_seen, 3),
            "last_seen": round(self.last_seen, 3),
            "protocol": self.protocol,
        }


@dataclass(frozen=True, slots=True)
class PeerUp:
    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class PeerChanged:
    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class PeerDown:
    peer: PeerInfo
    reason: DownReason


PeerEvent: TypeAlias = PeerUp | PeerChanged | PeerDown


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    """How discovery alone (without the transport) decides that an mDNS peer vanished.

    A peer is probed (one mDNS query for its SRV record) once it has been quiet for
    ``probe_interval``; it is declared lost after ``silence_timeout`` without hearing any of
    its records, so a live peer has ``silence_timeout / probe_interval - 1`` probes to answer.
    Lost peers are still probed every ``lost_probe_interval`` so they come back if they answer.
    """

    probe_interval: float = 5.0
    silence_timeout: float = 15.0
    lost_probe_interval: float = 30.0


@dataclass(slots=True)
class TableStats:
    """Counters of what the table refused; exposed for status and tests."""

    rejected: int = 0
    """TXT records that failed validation (malformed or oversized, whatever their version)."""
    incompatible: int = 0
    """Announcements of another protocol version (their node is listed, never connected to)."""
    bad_address: int = 0
    """Announcements with no usable address or port."""
    uncovered: int = 0
    """Announcements whose resolved addresses its ``a=`` covers none of (a replay elsewhere)."""
    own: int = 0
    """Our own announcements (ignored)."""
    unshared: int = 0
    """Announcements sharing no folder with us (ignored)."""
    full: int = 0
    """New peers refused because the table was full."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name, as ``status --json`` shows them under ``discovery``."""
        return {name: getattr(self, name) for name in self.__slots__}


# --- the table -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    node_id: NodeId | None
    name: str
    addresses: tuple[Addr, ...]
    folders: tuple[str, ...]
    sequence: int | None
    state: PeerState
    first_seen: float
    heard_at: float
    service: str | None = None
    nonce: bytes = b""
    probed_at: float = float("-inf")
    version: int = PROTOCOL_VERSION


@dataclass(slots=True)
class PeerTable:
    """All peers we know of, keyed by node id (or ``host:port`` for anonymous candidates).

    Every mutating method takes ``now`` (the owner's monotonic clock) and returns the events to
    forward, in order. ``unix_offset`` converts ``now`` to Unix seconds for ``PeerInfo``.
    """

    own_id: NodeId
    folders: Sequence[SharedFolder]
    policy: LivenessPolicy = field(default_factory=LivenessPolicy)
    unix_offset: float = 0.0
    max_peers: int = MAX_PEERS
    token_function: TokenFunction = announce_token
    stats: TableStats = field(default_factory=TableStats)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _by_service: dict[str, str] = field(default_factory=dict)
    _matches: dict[tuple[bytes, tuple[bytes, ...]], tuple[str, ...]] = field(default_factory=dict)
    """(binding, tokens) → our folders they match: a peer re-resolved costs no HMAC."""

    # -- inputs from mDNS --

    def observe(
        self,
        service: str,
        txt: bytes,
        addresses: Sequence[str],
        port: int | None,
        now: float,
    ) -> list[PeerEvent]:
        """A resolved announcement: ``service`` (full instance name), raw TXT, SRV data."""
        label = instance_label(service)
        service = service.lower()
        try:
            ann = read_txt(txt)
        except DecodeError:
            self.stats.rejected += 1
            return []
        if ann.node_id == self.own_id:
            self.stats.own += 1
            return []
        addrs = _valid_addresses(addresses, port)
        if port is None or not addrs:
            self.stats.bad_address += 1
            return []
        bound = binding(ann, service, port)
        if isinstance(ann, ForeignAnnouncement):
            self.stats.incompatible += 1
            return self._observe_foreign(service, label, ann, bound, addrs, now)
        key = ann.node_id.hex()
        entry = self._entries.get(key)
        folders = self._match(bound, ann.tokens)
        # Only what the tokens cover is ever handed out: a replayed record resolves to the
        # replayer's addresses, which its a= (the real node's) does not list.
        addrs = _covered(addrs, ann.addresses)
        if folders and not addrs:
            self.stats.uncovered += 1
            return []
        if not folders:
            self.stats.unshared += 1
            if entry is None or entry.service not in (None, service):
                return []
            return self._drop(key, DownReason.UNSHARED)
        if entry is None:
            if not self._make_room():
                self.stats.full += 1
                return []
            entry = _Entry(ann.node_id, label, addrs, folders, ann.sequence, PeerState.UP, now, now)
            self._entries[key] = entry
            self._set_service(key, entry, service)
            entry.nonce = ann.nonce
            return [PeerUp(self._info(entry))]
        before = self._info(entry)
        restarted = entry.nonce != ann.nonce
        self._set_service(key, entry, service)
        entry.name = label
        entry.addresses = addrs
        entry.folders = folders
        entry.sequence = ann.sequence
        entry.nonce = ann.nonce
        entry.heard_at = now
        if entry.state in (PeerState.LOST, PeerState.INCOMPATIBLE) or (
            entry.state is PeerState.UNREACHABLE and restarted
        ):
            entry.state = PeerState.UP
            return [PeerUp(self._info(entry))]
        if entry.state is PeerState.UNREACHABLE:
            return []
        after = self._info(entry)
        if replace(after, last_seen=before.last_seen) != before:
            return [PeerChanged(after)]
        return []

    def _observe_foreign(
        self,
        service: str,
        label: str,
        ann: ForeignAnnouncement,
        bound: bytes,
        addrs: tuple[Addr, ...],
        now: float,
    ) -> list[PeerEvent]:
        """A node of another protocol version: listed as INCOMPATIBLE, with no event (so the
        owner never connects to it), except ``PeerDown`` if it was present until now."""
        key = ann.node_id.hex()
        entry = self._entries.get(key)
        folders = () if ann.nonce is None else self._match(bound, ann.tokens)
        if entry is None:
            if not self._make_room():
                self.stats.full += 1
                return []
            state = PeerState.INCOMPATIBLE
            entry = _Entry(ann.node_id, label, addrs, folders, None, state, now, now)
            self._entries[key] = entry
            self._set_service(key, entry, service)
            entry.nonce = ann.nonce or b""
            entry.version = ann.version
            return []
        if entry.service not in (None, service):
            # Node ids are public: a record under another name claiming this id (a stale
            # one, or a spoof) must not take a live peer down.
            return []
        before = self._info(entry)
        was_active = entry.state in ACTIVE_STATES
        self._set_service(key, entry, service)
        entry.name = label
        entry.addresses = addrs
        entry.folders = folders
        entry.sequence = None
        entry.nonce = ann.nonce or b""
        entry.version = ann.version
        entry.heard_at = now
        entry.state = PeerState.INCOMPATIBLE
        if was_active:
            # The addresses the owner was given, so that it can forget them.
            gone = replace(before, state=PeerState.INCOMPATIBLE)
            return [PeerDown(gone, DownReason.INCOMPATIBLE)]
        return []

    def removed(self, service: str) -> list[PeerEvent]:
        """The service was withdrawn (goodbye, or its records expired): down at once."""
        key = self._by_service.get(service.lower())
        if key is None:
            return []
        return self._drop(key, DownReason.GOODBYE)

    def heard(self, service: str, now: float) -> bool:
        """A record of ``service`` arrived. Returns True if the owner should re-resolve it
        (the peer had been declared lost and is answering again)."""
        key = self._by_service.get(service.lower())
        entry = None if key is None else self._entries.get(key)
        if entry is None:
            return False
        entry.heard_at = max(entry.heard_at, now)
        return entry.state is PeerState.LOST

    def due_probes(self, now: float) -> list[str]:
        """Services the owner should query now; each is marked as probed at ``now``."""
        due: list[str] = []
        for entry in self._entries.values():
            if entry.service is None:
                continue
            if entry.state in (PeerState.UP, PeerState.INCOMPATIBLE):
                interval = self.policy.probe_interval
                quiet = now - entry.heard_at >= interval
            elif entry.state is PeerState.LOST:
                interval = self.policy.lost_probe_interval
                quiet = True
            else:
                continue
            if quiet and now - entry.probed_at >= interval:
                entry.probed_at = now
                due.append(entry.service)
        return due

    def expire(self, now: float) -> list[PeerEvent]:
        """Declare lost every mDNS peer silent for ``silence_timeout`` (an incompatible one too,
        silently: it was never up)."""
        events: list[PeerEvent] = []
        for entry in self._entries.values():
            if now - entry.heard_at < self.policy.silence_timeout:
                continue
            if entry.state is PeerState.UP:
                entry.state = PeerState.LOST
                events.append(PeerDown(self._info(entry), DownReason.SILENT))
            elif entry.state is PeerState.INCOMPATIBLE:
                entry.state = PeerState.LOST
        return events

    # -- inputs from the owner (transport, configuration, peer exchange) --

    def mark_unreachable(self, node_id: NodeId) -> list[PeerEvent]:
        """The transport gave up on this peer: down until it restarts or is marked reachable."""
        entry = self._entries.get(node_id.hex())
        if entry is None or entry.state not in ACTIVE_STATES:
            return []
        entry.state = PeerState.UNREACHABLE
        return [PeerDown(self._info(entry), DownReason.UNREACHABLE)]

    def mark_reachable(self, node_id: NodeId, now: float) -> list[PeerEvent]:
        """The transport has a live session with this peer: it outranks mDNS silence (but not an
        announcement of another protocol version)."""
        entry = self._entries.get(node_id.hex())
        if entry is None or entry.state in (PeerState.REACHABLE, PeerState.INCOMPATIBLE):
            return []
        was_active = entry.state in ACTIVE_STATES
        entry.state = PeerState.REACHABLE
        entry.heard_at = max(entry.heard_at, now)
        info = self._info(entry)
        return [PeerChanged(info) if was_active else PeerUp(info)]

    def add_candidate(self, addr: Addr, now: float, *, exchanged: bool = False) -> list[PeerEvent]:
        """A ``host:port`` to try directly: configured (STATIC) or learned from a peer."""
        state = PeerState.EXCHANGED if exchanged else PeerState.STATIC
        key = format_addr(addr)
        if key in self._entries:
            return []
        if not self._make_room():
            self.stats.full += 1
            return []
        entry = _Entry(None, key, (addr,), (), None, state, now, now)
        self._entries[key] = entry
        return [PeerUp(self._info(entry))]

    def remove_candidate(self, addr: Addr) -> list[PeerEvent]:
        """Forget a ``host:port`` candidate (e.g. the transport found its node id)."""
        key = format_addr(addr)
        entry = self._entries.get(key)
        if entry is None or entry.node_id is not None:
            return []
        return self._drop(key, DownReason.REMOVED)

    # -- queries --

    def peers(self) -> list[PeerInfo]:
        """Every entry, present or not, sorted by name."""
        return sorted((self._info(e) for e in self._entries.values()), key=lambda p: p.name)

    def get(self, node_id: NodeId) -> PeerInfo | None:
        entry = self._entries.get(node_id.hex())
        return None if entry is None else self._info(entry)

    def version(self, node_id: NodeId) -> int | None:
        """The protocol version ``node_id`` last announced over mDNS (None if unknown)."""
        entry = self._entries.get(node_id.hex())
        return None if entry is None or entry.service is None else entry.version

    def by_service(self, service: str) -> PeerInfo | None:
        """The entry announced under ``service`` (full instance name), if any."""
        key = self._by_service.get(service.lower())
        entry = None if key is None else self._entries.get(key)
        return None if entry is None else self._info(entry)

    def services(self) -> dict[str, str]:
        """Service name (lower case) → table key, for every mDNS entry."""
        return dict(self._by_service)

    # -- private --

    def _info(self, entry: _Entry) -> PeerInfo:
        return PeerInfo(
            node_id=entry.node_id,
            name=entry.name,
            addresses=entry.addresses,
            folders=entry.folders,
            sequence=entry.sequence,
            state=entry.state,
            first_seen=entry.first_seen + self.unix_offset,
            last_seen=entry.heard_at + self.unix_offset,
            protocol=None if entry.service is None else entry.version,
        )

    def _drop(self, key: str, reason: DownReason) -> list[PeerEvent]:
        entry = self._entries.pop(key)
        if entry.service is not None:
            self._by_service.pop(entry.service, None)
        if entry.state not in ACTIVE_STATES:
            return []
        return [PeerDown(self._info(entry), reason)]

    def _set_service(self, key: str, entry: _Entry, service: str) -> None:
        # One service name per node: a renamed or re-registered peer replaces its old name.
        if entry.service is not None and entry.service != service:
            self._by_service.pop(entry.service, None)
        other = self._by_service.get(service)
        if other is not None and other != key:
            # The same instance name now announces another node id: the old node is gone.
            old = self._entries.get(other)
            if old is not None and old.state is PeerState.INCOMPATIBLE:
                del self._entries[other]  # listed only for its announcement, now gone
            elif old is not None:
                old.service = None
                old.state = PeerState.LOST if old.state is PeerState.UP else old.state
        entry.service = service
        self._by_service[service] = key

    def _make_room(self) -> bool:
        if len(self._entries) < self.max_peers:
            return True
        for key, entry in self._entries.items():
            if entry.state in (PeerState.LOST, PeerState.UNREACHABLE, PeerState.INCOMPATIBLE):
                self._drop(key, DownReason.REMOVED)
                return True
        return False

    def _match(self, bound: bytes, tokens: tuple[bytes, ...]) -> tuple[str, ...]:
        cache_key = (bound, tokens)
        found = self._matches.get(cache_key)
        if found is None:
            found = shared_folders(self.folders, bound, tokens, self.token_function)
            if len(self._matches) >= 4 * self.max_peers:
                self._matches.clear()
            self._matches[cache_key] = found
        return found


# --- small pure helpers ----------------------------------------------------------------------


def shared_folders(
    folders: Sequence[SharedFolder],
    bound: bytes,
    tokens: Sequence[bytes],
    token_function: TokenFunction = announce_token,
) -> tuple[str, ...]:
    """The labels of ``folders`` whose token over ``bound`` (``binding``: what the record was
    found under) is among ``tokens``: the folders an announcement shares with us
    (``lanshare doctor`` counts nodes by it, too)."""
    return tuple(
        folder.label
        for folder in folders
        if any(hmac.compare_digest(token_function(folder.key, bound), token) for token in tokens)
    )


def instance_label(service: str) -> str:
    """The display label of a full service name: its first label, unescaped as zeroconf does."""
    label = service.split("._lanshare.", 1)[0]
    return label.rstrip(".")


def format_addr(addr: Addr) -> str:
    """``ip:port``, with brackets around an IPv6 address."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: str) -> Addr:
    """Parse a ``[network].static_peers`` entry: ``host:port`` or ``[v6addr]:port``.

    Raises:
        ConfigError: no port, a port out of range, or an empty host.
    """
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"static peer {text!r}: write an IPv6 address as [addr]:port")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"static peer {text!r} is not host:port (port 1-65535)")
    return host, int(port_text)


def _valid_addresses(addresses: Sequence[str], port: int | None) -> tuple[Addr, ...]:
    if port is None or not 0 < port < 65536:
        return ()
    out: list[Addr] = []
    for text in addresses:
        host, _, scope = text.partition("%")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if ip.is_unspecified or ip.is_multicast or (ip.version == 4 and ip == _BROADCAST):
            continue
        if ip.version == 6 and ip.is_link_local and not scope.isdigit():
            continue  # a link-local address is useless without its interface
        addr = (text, port)
        if addr not in out:
            out.append(addr)
        if len(out) == MAX_ADDRESSES:
            break
    return tuple(out)


def _covered(addrs: tuple[Addr, ...], covered: tuple[IPAddress, ...]) -> tuple[Addr, ...]:
    """The resolved ``addrs`` that ``a=`` lists (a link-local address's zone is ours, not
    the announcer's: it is not compared)."""
    allowed = set(covered)
    return tuple(a for a in addrs if ipaddress.ip_address(a[0].partition("%")[0]) in allowed)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
