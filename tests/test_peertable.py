"""The pure peer table and TXT codec: round trips, hostile input, and every state change."""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanshare.errors import ConfigError, DecodeError
from lanshare.identity import NodeId
from lanshare.keys import announce_token
from lanshare.peertable import (
    MAX_ANNOUNCED_FOLDERS,
    MAX_SEQUENCE,
    MAX_TXT_SIZE,
    PROTOCOL_VERSION,
    Announcement,
    DownReason,
    ForeignAnnouncement,
    IPAddress,
    LivenessPolicy,
    PeerChanged,
    PeerDown,
    PeerEvent,
    PeerState,
    PeerTable,
    PeerUp,
    SharedFolder,
    binding,
    canonical_addresses,
    decode_txt,
    encode_txt,
    fit_addresses,
    format_addr,
    instance_label,
    parse_host_port,
    read_txt,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

OWN = NodeId(bytes.fromhex("0000000000000001"))
PEER = NodeId(bytes.fromhex("00000000000000aa"))
OTHER = NodeId(bytes.fromhex("00000000000000bb"))
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
KEY_X = bytes(range(2, 34))
NONCE = bytes.fromhex("0102030405060708")
SERVICE = "Peer One._lanshare._udp.local."
OURS = str(PROTOCOL_VERSION).encode()
OLD = b"1"  # the protocol before block hash algorithms had one numbering everywhere
POLICY = LivenessPolicy(probe_interval=5.0, silence_timeout=15.0, lost_probe_interval=30.0)


def txt(
    node: bytes = PEER,
    keys: Sequence[bytes] = (KEY_A,),
    nonce: bytes = NONCE,
    seq: int = 0,
    *,
    service: str = SERVICE,
    addresses: Sequence[str] = ("10.0.0.2",),
    port: int = 1,
) -> bytes:
    """A record as a node announcing ``addresses`` and ``port`` under ``service`` sends it:
    ``a=`` covers the first eight distinct ones that are addresses, and the tokens are bound."""
    covered: list[IPAddress] = []
    for text in addresses:
        with contextlib.suppress(ValueError):
            covered.append(ipaddress.ip_address(text.partition("%")[0]))
    first = list(dict.fromkeys(covered))[:8]
    ann = Announcement(NodeId(node), nonce, (), seq, canonical_addresses(first))
    bound = binding(ann, service, port)
    return encode_txt(replace(ann, tokens=tuple(announce_token(k, bound) for k in keys)))


def see(
    t: PeerTable, service: str, addresses: Sequence[str], port: int, now: float, **kw: Any
) -> list[PeerEvent]:
    """``t`` resolves ``service`` to its genuine record (``txt(**kw)``), addresses and port."""
    record = txt(service=service, addresses=addresses, port=port, **kw)
    return t.observe(service, record, addresses, port, now)


def item(s: bytes) -> bytes:
    return bytes((len(s),)) + s


def foreign_txt(version: bytes = OLD, node: bytes = PEER, *rest: bytes) -> bytes:
    """A record of another protocol version: ``v=``, ``id=`` and whatever else it says."""
    return item(b"v=" + version) + item(b"id=" + node.hex().encode()) + b"".join(map(item, rest))


def table(**kw: Any) -> PeerTable:
    folders = [SharedFolder("a", KEY_A), SharedFolder("b", KEY_B)]
    return PeerTable(OWN, folders, POLICY, unix_offset=1000.0, **kw)


# --- codec -----------------------------------------------------------------------------------


announcements = st.builds(
    Announcement,
    node_id=st.binary(min_size=8, max_size=8).map(NodeId),
    nonce=st.binary(min_size=8, max_size=8),
    tokens=st.lists(st.binary(min_size=8, max_size=8), max_size=MAX_ANNOUNCED_FOLDERS).map(tuple),
    sequence=st.integers(0, MAX_SEQUENCE),
    # Four IPv6 addresses beside twelve folders still fit (fit_addresses handles more).
    addresses=st.lists(st.ip_addresses(), max_size=4).map(canonical_addresses),
)


@given(announcements)
def test_txt_round_trips_and_stays_small(ann: Announcement) -> None:
    raw = encode_txt(ann)
    assert len(raw) <= MAX_TXT_SIZE
    assert decode_txt(raw) == ann


def test_covered_addresses_have_one_spelling() -> None:
    v4 = [ipaddress.ip_address(a) for a in ("10.0.0.9", "10.0.0.2")]
    v6 = [ipaddress.ip_address(a) for a in ("fe80::1", "2001:db8::1")]
    mapped = ipaddress.ip_address("::ffff:10.0.0.2")
    assert canonical_addresses([*v6, mapped, *v4, v4[0]]) == (v4[1], v4[0], v6[1], v6[0])
    a = next(
        s for s in _strings(txt(addresses=["fe80::1%3", "10.0.0.9", "10.0.0.2"])) if s[:2] == b"a="
    )
    assert a == b"a=0a000002,0a000009,fe800000000000000000000000000001"
    with pytest.raises(ConfigError):  # a caller's order is not the canonical one
        encode_txt(Announcement(PEER, NONCE, (), 0, tuple(v4)))


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"0a000009,0a000002", "descending"),
        (b"0a000002,0a000002", "repeated"),
        (b"fe800000000000000000000000000001,0a000002", "IPv6 before IPv4"),
        (b"00000000000000000000ffff0a000002", "IPv4 spelt as IPv6"),
        (b"0A000002", "upper-case hex"),
        (b"0a0002", "short"),
        (b"0a000002,", "trailing comma"),
        (b",".join(b"0a0000%02x" % i for i in range(9)), "nine addresses"),
        (b"10.0.0.2", "dotted"),
    ],
)
def test_covered_addresses_not_in_canonical_form_are_refused(value: bytes, why: str) -> None:
    raw = txt().replace(item(b"a=0a000002"), item(b"a=" + value))
    with pytest.raises(DecodeError):
        decode_txt(raw)
    with pytest.raises(DecodeError, match="a="):  # a record of ours must say what it covers
        decode_txt(txt().replace(item(b"a=0a000002"), b""))


def test_as_many_addresses_as_fit_are_covered() -> None:
    full = Announcement(PEER, NONCE, (bytes(8),) * MAX_ANNOUNCED_FOLDERS, MAX_SEQUENCE)
    v6 = [ipaddress.ip_address(f"2001:db8::{i:x}") for i in range(1, 9)]
    v4 = [ipaddress.ip_address(f"10.0.0.{i}") for i in range(1, 11)]
    covered = fit_addresses(full, v6)
    assert 0 < len(covered) < len(v6)
    assert covered == tuple(v6[: len(covered)])
    assert len(encode_txt(replace(full, addresses=covered))) <= MAX_TXT_SIZE
    assert fit_addresses(full, v4) == tuple(v4[:8])
    assert fit_addresses(replace(full, tokens=()), [v6[1], v4[0]]) == (v4[0], v6[1])


@given(st.binary(max_size=2 * MAX_TXT_SIZE))
def test_decode_raises_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_txt(raw)


@given(announcements, st.integers(0, 300), st.integers(0, 255))
def test_corrupted_records_never_escape_decode_error(
    ann: Announcement, pos: int, byte: int
) -> None:
    raw = bytearray(encode_txt(ann))
    raw[pos % len(raw)] = byte
    with contextlib.suppress(DecodeError):
        decode_txt(bytes(raw))


def test_the_record_starts_with_the_version_and_keeps_the_port_out() -> None:
    raw = txt(seq=42)
    assert raw.startswith(item(b"v=" + OURS))
    assert b"port" not in raw
    assert item(b"seq=42") in raw


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "empty"),
        (item(b"v=" + OLD) + txt()[4:], "other version"),
        (txt()[4:], "no version"),
        (txt().replace(b"id=", b"id=ZZ"), "truncated strings"),
        (txt().replace(PEER.hex().encode(), PEER.hex().upper().encode()), "upper-case hex"),
        (item(b"v=" + OURS) + item(b"id=00") + item(b"n=" + NONCE.hex().encode()), "short id"),
        (txt()[:-3], "truncated"),
        (txt() + b"\x00", "empty string"),
        (txt().replace(b"seq=0", b"seq=x"), "bad seq"),
        (txt().replace(b"\x05seq=0", b"\x06seq=01"), "leading zero"),
        (txt().replace(b"\x05seq=0", b"\x18seq=99999999999999999999"), "seq overflow"),
        (txt().replace(b"\x05seq=0", b""), "no seq"),
        (item(b"v=" + OURS) + item(b"x" * 255) * 2, "oversized"),
        (txt() + item(b"\x01bad=1"), "control character in a key"),
        (txt() + item(b"=1"), "empty key"),
    ],
)
def test_malformed_records_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(DecodeError):
        decode_txt(raw)


def test_bad_token_lengths_are_refused() -> None:
    raw = txt(keys=(KEY_A, KEY_B))
    token_item = next(s for s in _strings(raw) if s.startswith(b"t="))
    for bad in (token_item[:-1], token_item[:-2], token_item + b"00", b"t=" + b"0" * 16 * 13):
        with pytest.raises(DecodeError):
            decode_txt(raw.replace(item(token_item), item(bad)))


def test_first_duplicate_wins_and_unknown_keys_are_ignored() -> None:
    raw = txt(seq=5) + item(b"seq=9") + item(b"future=thing") + item(b"flag")
    assert decode_txt(raw).sequence == 5
    assert decode_txt(item(b"V=" + OURS) + txt()[4:]).node_id == PEER  # keys are case-insensitive


def test_a_record_of_another_version_is_read_only_as_far_as_listing_needs() -> None:
    # Readable folder tokens (this version's formats) are kept, to tell which folders match.
    same_shape = item(b"v=" + OLD) + txt(keys=(KEY_A,))[4:]
    ann = read_txt(same_shape)
    ten = (ipaddress.IPv4Address("10.0.0.2"),)
    token = announce_token(KEY_A, binding(ann, SERVICE, 1))
    assert ann == ForeignAnnouncement(1, PEER, NONCE, (token,), ten)
    # Anything else a future version says is ignored: no seq=, other formats, other keys.
    future = foreign_txt(b"17", PEER, b"n=not-hex", b"t=xyz", b"seq=-1", b"caps=quic,v6", b"flag")
    assert read_txt(future) == ForeignAnnouncement(17, PEER, None, ())
    assert read_txt(foreign_txt(OLD, PEER)) == ForeignAnnouncement(1, PEER, None, ())
    # Our own version still goes through every check.
    assert read_txt(txt(seq=3)) == decode_txt(txt(seq=3))
    with pytest.raises(DecodeError, match="version 1"):
        decode_txt(same_shape)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (foreign_txt(OLD, PEER)[:-1], "truncated"),
        (item(b"v=" + OLD) + item(b"id=00"), "short id"),
        (item(b"v=" + OLD) + item(b"id=" + PEER.hex().upper().encode()), "upper-case id"),
        (item(b"v=" + OLD) + item(b"n=" + NONCE.hex().encode()), "no id"),
        (item(b"v=" + OLD) + item(b"x" * 255) * 2, "oversized"),
        (foreign_txt(OLD, PEER, b"\x01bad=1"), "control character in a key"),
        (foreign_txt(OLD, PEER) + b"\x00", "empty string"),
        (foreign_txt(b"0", PEER), "version 0"),
        (foreign_txt(b"02", PEER), "leading zero"),
        (foreign_txt(b"10000", PEER), "version too large"),
        (foreign_txt(b"-2", PEER), "negative version"),
        (foreign_txt(b"two", PEER), "version not a number"),
        (foreign_txt(b"", PEER), "empty version"),
        (item(b"v") + item(b"id=" + PEER.hex().encode()), "version without a value"),
        (item(b"id=" + PEER.hex().encode()) + item(b"vers=2"), "no version"),
    ],
)
def test_malformed_records_of_any_version_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(DecodeError):
        read_txt(raw)


@given(st.binary(max_size=2 * MAX_TXT_SIZE))
def test_read_raises_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        read_txt(raw)


@given(
    st.integers(1, 9999).filter(lambda v: v != PROTOCOL_VERSION),
    st.binary(max_size=MAX_TXT_SIZE),
    st.integers(0, 400),
)
def test_foreign_records_with_hostile_tails_never_escape_decode_error(
    version: int, tail: bytes, cut: int
) -> None:
    raw = foreign_txt(str(version).encode(), PEER) + tail
    with contextlib.suppress(DecodeError):
        ann = read_txt(raw[: len(raw) - cut % len(raw)])
        assert isinstance(ann, ForeignAnnouncement)
        assert ann.node_id == PEER
        assert ann.version == version
        assert ann.nonce is None or len(ann.nonce) == 8
        assert len(ann.tokens) <= MAX_ANNOUNCED_FOLDERS


def test_encode_refuses_what_it_cannot_announce() -> None:
    with pytest.raises(ConfigError):
        txt(keys=[bytes([i]) * 32 for i in range(MAX_ANNOUNCED_FOLDERS + 1)])
    with pytest.raises(ConfigError):
        encode_txt(Announcement(PEER, b"short", (), 0))
    with pytest.raises(ConfigError):
        encode_txt(Announcement(PEER, NONCE, (b"x",), 0))
    with pytest.raises(ConfigError):
        encode_txt(Announcement(PEER, NONCE, (), -1))


def _strings(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        out.append(raw[i + 1 : i + 1 + raw[i]])
        i += 1 + raw[i]
    return out


# --- the table -------------------------------------------------------------------------------


def test_a_peer_sharing_a_folder_comes_up_with_what_we_share() -> None:
    t = table()
    events = see(t, SERVICE, ["10.0.0.2"], 4747, 5.0, keys=(KEY_X, KEY_B))
    assert len(events) == 1
    assert isinstance(events[0], PeerUp)
    peer = events[0].peer
    assert peer.node_id == PEER
    assert peer.name == "Peer One"
    assert peer.folders == ("b",)
    assert peer.addresses == (("10.0.0.2", 4747),)
    assert peer.state is PeerState.UP
    assert peer.last_seen == 1005.0
    assert peer.to_json() == {
        "id": PEER.hex(),
        "name": "Peer One",
        "addresses": ["10.0.0.2:4747"],
        "folders": ["b"],
        "sequence": 0,
        "state": "up",
        "first_seen": 1005.0,
        "last_seen": 1005.0,
        "protocol": PROTOCOL_VERSION,
    }


def test_ourselves_strangers_and_junk_are_ignored_and_counted() -> None:
    t = table()
    assert see(t, SERVICE, ["10.0.0.2"], 1, 0.0, node=OWN) == []
    assert see(t, SERVICE, ["10.0.0.2"], 1, 0.0, keys=(KEY_X,)) == []
    assert t.observe(SERVICE, item(b"v=" + OURS), ["10.0.0.2"], 1, 0.0) == []
    assert see(t, SERVICE, ["10.0.0.2"], 0, 0.0) == []
    assert see(t, SERVICE, ["224.0.0.251", "0.0.0.0", "junk", "fe80::1"], 1, 0.0) == []
    assert t.peers() == []
    s = t.stats
    assert (s.own, s.unshared, s.rejected, s.bad_address) == (1, 1, 1, 2)


def test_addresses_are_filtered_deduplicated_and_bounded() -> None:
    t = table()
    many = ["10.0.0.2", "10.0.0.2", "fe80::1%3", "fe80::1", *[f"10.0.1.{i}" for i in range(20)]]
    (up,) = see(t, SERVICE, many, 9, 0.0)
    assert up.peer.addresses[:2] == (("10.0.0.2", 9), ("fe80::1%3", 9))
    assert len(up.peer.addresses) == 8
    assert format_addr(up.peer.addresses[1]) == "[fe80::1%3]:9"


def test_changes_are_reported_and_repeats_are_not() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    assert see(t, SERVICE, ["10.0.0.2"], 1, 1.0) == []
    (changed,) = see(t, SERVICE, ["10.0.0.2"], 1, 2.0, seq=7)
    assert isinstance(changed, PeerChanged)
    assert changed.peer.sequence == 7
    (moved,) = see(t, SERVICE, ["10.0.0.3"], 1, 3.0, seq=7)
    assert moved.peer.addresses == (("10.0.0.3", 1),)


def test_goodbye_is_down_at_once_and_forgets_the_peer() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    (down,) = t.removed(SERVICE.upper())
    assert isinstance(down, PeerDown)
    assert down.reason is DownReason.GOODBYE
    assert t.peers() == []
    assert t.removed(SERVICE) == []


def test_a_peer_that_stops_sharing_goes_down() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    (down,) = see(t, SERVICE, ["10.0.0.2"], 1, 1.0, keys=())
    assert isinstance(down, PeerDown)
    assert down.reason is DownReason.UNSHARED


def test_quiet_peers_are_probed_then_lost_then_revived() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    assert t.due_probes(4.9) == []
    assert t.due_probes(5.0) == [SERVICE.lower()]
    assert t.due_probes(6.0) == []  # one probe per interval
    assert t.due_probes(10.0) == [SERVICE.lower()]
    assert t.expire(14.9) == []
    (down,) = t.expire(15.0)
    assert isinstance(down, PeerDown)
    assert down.reason is DownReason.SILENT
    assert t.peers()[0].state is PeerState.LOST
    assert t.expire(100.0) == []  # only once
    assert t.due_probes(20.0) == []
    assert t.due_probes(40.0) == [SERVICE.lower()]  # lost peers: slowly
    assert t.heard(SERVICE, 41.0) is True  # it answers: the owner re-resolves
    (up,) = see(t, SERVICE, ["10.0.0.2"], 1, 41.5)
    assert isinstance(up, PeerUp)


def test_hearing_a_peer_keeps_it_up() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    for now in range(1, 60):
        assert t.heard(SERVICE, float(now)) is False
        assert t.expire(float(now)) == []
    assert t.heard("unknown._lanshare._udp.local.", 1.0) is False


def test_the_transport_outranks_mdns() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    (changed,) = t.mark_reachable(PEER, 1.0)
    assert changed.peer.state is PeerState.REACHABLE
    assert t.expire(1000.0) == []  # silence no longer matters
    assert t.due_probes(1000.0) == []
    (down,) = t.mark_unreachable(PEER)
    assert isinstance(down, PeerDown)
    assert down.reason is DownReason.UNREACHABLE
    assert t.mark_unreachable(PEER) == []
    # Same nonce: still the same unreachable process; a new nonce means it restarted.
    assert see(t, SERVICE, ["10.0.0.2"], 1, 1001.0, seq=3) == []
    (up,) = see(t, SERVICE, ["10.0.0.2"], 1, 1002.0, nonce=b"\x09" * 8, seq=3)
    assert isinstance(up, PeerUp)
    assert up.peer.sequence == 3
    t.mark_unreachable(PEER)
    (up,) = t.mark_reachable(PEER, 1003.0)
    assert isinstance(up, PeerUp)
    assert t.mark_reachable(OTHER, 0.0) == []
    assert t.mark_unreachable(OTHER) == []


def test_a_renamed_peer_keeps_its_entry() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    (changed,) = see(t, "Peer One-2._lanshare._udp.local.", ["10.0.0.2"], 1, 1.0)
    assert changed.peer.name == "Peer One-2"
    assert t.removed(SERVICE) == []  # the old name's goodbye is not this peer's
    assert len(t.peers()) == 1


def test_a_name_taken_over_by_another_node() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    (up,) = see(t, SERVICE, ["10.0.0.3"], 1, 1.0, node=OTHER)
    assert up.peer.node_id == OTHER
    (down,) = t.removed(SERVICE)
    assert down.peer.node_id == OTHER


def test_static_and_exchanged_candidates() -> None:
    t = table()
    (up,) = t.add_candidate(("10.0.0.9", 4747), 0.0)
    assert up.peer.state is PeerState.STATIC
    assert up.peer.node_id is None
    assert up.peer.key == "10.0.0.9:4747"
    assert up.peer.to_json()["id"] is None
    assert t.add_candidate(("10.0.0.9", 4747), 1.0) == []
    (ex,) = t.add_candidate(("::1", 5), 0.0, exchanged=True)
    assert ex.peer.state is PeerState.EXCHANGED
    assert t.expire(1e6) == []  # discovery does not judge candidates
    (down,) = t.remove_candidate(("10.0.0.9", 4747))
    assert isinstance(down, PeerDown)
    assert down.reason is DownReason.REMOVED
    assert t.remove_candidate(("10.0.0.9", 4747)) == []


def test_the_table_is_bounded_and_evicts_dead_entries_first() -> None:
    t = table(max_peers=2)
    t.add_candidate(("10.0.0.1", 1), 0.0)
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    assert see(t, "x._lanshare._udp.local.", ["10.0.0.3"], 1, 0.0, node=OTHER) == []
    assert t.add_candidate(("10.0.0.4", 1), 0.0) == []
    assert t.stats.full == 2
    t.expire(100.0)  # the mDNS peer is lost: its slot can be reused
    (up,) = see(t, "x._lanshare._udp.local.", ["10.0.0.3"], 1, 100.0, node=OTHER)
    assert up.peer.node_id == OTHER
    assert t.get(PEER) is None


# --- replayed and transplanted announcements -------------------------------------------------

REPLAYER = "10.0.0.66"


@pytest.mark.parametrize(
    ("service", "addresses", "port", "node"),
    [
        ("Evil._lanshare._udp.local.", ["10.0.0.2"], 4747, PEER),
        (SERVICE, ["10.0.0.2"], 4748, PEER),
        (SERVICE, [REPLAYER], 4747, PEER),
        (SERVICE, ["10.0.0.2"], 4747, OTHER),
    ],
    ids=["another instance name", "another port", "another address", "another node id"],
)
def test_a_recorded_record_announced_elsewhere_is_ignored(
    service: str, addresses: list[str], port: int, node: NodeId
) -> None:
    genuine = txt(addresses=["10.0.0.2"], port=4747)
    replayed = genuine.replace(PEER.hex().encode(), node.hex().encode())
    t = table()
    assert t.observe(service, replayed, addresses, port, 0.0) == []
    assert t.peers() == []
    assert t.stats.unshared + t.stats.uncovered == 1
    # The genuine announcement, as it was recorded, is accepted.
    (up,) = t.observe(SERVICE, genuine, ["10.0.0.2"], 4747, 1.0)
    assert (up.peer.node_id, up.peer.addresses, up.peer.folders) == (
        PEER,
        (("10.0.0.2", 4747),),
        ("a",),
    )


def test_a_record_whose_covered_addresses_were_rewritten_is_ignored() -> None:
    genuine = txt(addresses=["10.0.0.2"], port=4747)
    rewritten = genuine.replace(item(b"a=0a000002"), item(b"a=0a000042"))
    t = table()
    assert t.observe(SERVICE, rewritten, [REPLAYER], 4747, 0.0) == []
    assert (t.peers(), t.stats.unshared) == ([], 1)


def test_only_covered_addresses_are_ever_handed_out() -> None:
    t = table()
    record = txt(addresses=["10.0.0.2", "10.0.0.3", "fe80::1"], port=4747)
    # The genuine node's record resolved beside the replayer's address record.
    (up,) = t.observe(SERVICE, record, [REPLAYER, "10.0.0.3", "fe80::1%2"], 4747, 0.0)
    assert up.peer.addresses == (("10.0.0.3", 4747), ("fe80::1%2", 4747))
    # A holder that resolved only some of them (an IPv4-only host) uses those.
    (changed,) = t.observe(SERVICE, record, ["10.0.0.2"], 4747, 1.0)
    assert changed.peer.addresses == (("10.0.0.2", 4747),)
    # Resolved to nothing the tokens cover: ignored, the entry keeps what it had.
    assert t.observe(SERVICE, record, [REPLAYER], 4747, 2.0) == []
    assert t.stats.uncovered == 1
    assert t.peers()[0].addresses == (("10.0.0.2", 4747),)


def test_a_node_whose_addresses_change_is_followed_without_a_restart() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 4747, 0.0)
    (moved,) = see(t, SERVICE, ["10.0.0.2", "10.0.0.7"], 4747, 1.0)
    assert isinstance(moved, PeerChanged)
    assert moved.peer.addresses == (("10.0.0.2", 4747), ("10.0.0.7", 4747))
    (left,) = see(t, SERVICE, ["10.0.0.7"], 4747, 2.0)
    assert isinstance(left, PeerChanged)
    assert left.peer.addresses == (("10.0.0.7", 4747),)


# --- nodes of another protocol version --------------------------------------------------------


def test_a_node_of_another_version_is_listed_incompatible_without_events() -> None:
    t = table()
    raw = foreign_txt(OLD, PEER, b"n=zz", b"whatever=1")
    assert t.observe(SERVICE, raw, ["10.0.0.2"], 4747, now=5.0) == []
    (peer,) = t.peers()
    assert peer.state is PeerState.INCOMPATIBLE
    assert peer.to_json() == {
        "id": PEER.hex(),
        "name": "Peer One",
        "addresses": ["10.0.0.2:4747"],
        "folders": [],
        "sequence": None,
        "state": "incompatible",
        "first_seen": 1005.0,
        "last_seen": 1005.0,
        "protocol": 1,
    }
    assert t.version(PEER) == 1
    assert t.by_service(SERVICE.upper()) == peer
    assert (t.stats.incompatible, t.stats.rejected) == (1, 0)
    # Repeats and changes of its record: still no event, the entry follows.
    assert t.observe(SERVICE, raw, ["10.0.0.3"], 4747, now=6.0) == []
    assert t.peers()[0].addresses == (("10.0.0.3", 4747),)
    assert t.peers()[0].last_seen == 1006.0
    # The transport's word does not make it a peer to sync with.
    assert t.mark_reachable(PEER, 7.0) == []
    assert t.mark_unreachable(PEER) == []
    assert t.peers()[0].state is PeerState.INCOMPATIBLE


def test_an_incompatible_node_shows_the_folders_its_tokens_still_match() -> None:
    t = table()
    raw = item(b"v=%d" % (PROTOCOL_VERSION + 1)) + txt(keys=(KEY_X, KEY_B))[4:]
    assert t.observe(SERVICE, raw, ["10.0.0.2"], 1, 0.0) == []
    assert t.peers()[0].folders == ("b",)
    # It is listed even when nothing matches: its tokens may mean something else now.
    other = item(b"v=%d" % (PROTOCOL_VERSION + 1)) + txt(node=OTHER, keys=(KEY_X,))[4:]
    assert t.observe("x._lanshare._udp.local.", other, ["10.0.0.3"], 1, 0.0) == []
    assert [(p.node_id, p.folders) for p in t.peers()] == [(PEER, ("b",)), (OTHER, ())]
    assert t.stats.unshared == 0


def test_incompatible_records_are_still_checked_like_any_other() -> None:
    t = table()
    assert t.observe(SERVICE, foreign_txt(OLD, OWN), ["10.0.0.2"], 1, 0.0) == []
    assert t.observe(SERVICE, foreign_txt(OLD, PEER), ["224.0.0.251", "junk"], 1, 0.0) == []
    assert t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.2"], 0, 0.0) == []
    assert t.observe(SERVICE, item(b"v=" + OLD) + item(b"id=zz"), ["10.0.0.2"], 1, 0.0) == []
    assert t.observe(SERVICE, foreign_txt(b"x", PEER), ["10.0.0.2"], 1, 0.0) == []
    assert t.peers() == []
    s = t.stats
    assert (s.own, s.bad_address, s.rejected, s.incompatible) == (1, 2, 2, 0)


def test_a_peer_that_upgrades_goes_down_and_comes_back_when_it_speaks_ours_again() -> None:
    t = table()
    see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    t.mark_reachable(PEER, 0.5)
    (down,) = t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.9"], 1, 1.0)
    assert isinstance(down, PeerDown)
    assert down.reason is DownReason.INCOMPATIBLE
    assert down.peer.state is PeerState.INCOMPATIBLE
    assert down.peer.addresses == (("10.0.0.2", 1),)  # what the owner was told to use
    assert t.peers()[0].addresses == (("10.0.0.9", 1),)
    assert t.peers()[0].sequence is None
    (up,) = see(t, SERVICE, ["10.0.0.9"], 1, 2.0, nonce=b"\x07" * 8, seq=4)
    assert isinstance(up, PeerUp)
    assert (up.peer.state, up.peer.sequence, up.peer.folders) == (PeerState.UP, 4, ("a",))
    # Back to another version, then to ours without a shared folder: forgotten, no event.
    assert len(t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.9"], 1, 3.0)) == 1
    assert see(t, SERVICE, ["10.0.0.9"], 1, 4.0, keys=(KEY_X,)) == []
    assert t.peers() == []


def test_a_silent_incompatible_node_is_probed_then_lost_quietly_and_revived() -> None:
    t = table()
    t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.2"], 1, 0.0)
    assert t.due_probes(4.9) == []
    assert t.due_probes(5.0) == [SERVICE.lower()]
    assert t.heard(SERVICE, 6.0) is False
    assert t.expire(20.9) == []
    assert t.peers()[0].state is PeerState.INCOMPATIBLE
    assert t.expire(21.0) == []  # lost, but it was never up: no event
    assert t.peers()[0].state is PeerState.LOST
    assert t.due_probes(40.0) == [SERVICE.lower()]
    assert t.heard(SERVICE, 41.0) is True  # answering again: the owner re-resolves
    assert t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.2"], 1, 41.5) == []
    assert t.peers()[0].state is PeerState.INCOMPATIBLE


def test_an_incompatible_node_leaves_on_goodbye_or_when_its_name_is_taken() -> None:
    t = table()
    t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.2"], 1, 0.0)
    assert t.removed(SERVICE) == []
    assert t.peers() == []
    t.observe(SERVICE, foreign_txt(OLD, PEER), ["10.0.0.2"], 1, 1.0)
    (up,) = see(t, SERVICE, ["10.0.0.3"], 1, 2.0, node=OTHER)
    assert up.peer.node_id == OTHER
    assert [p.node_id for p in t.peers()] == [OTHER]


def test_incompatible_nodes_never_crowd_out_peers() -> None:
    t = table(max_peers=2)
    for i in range(10):  # a flood of other-version records with fresh ids
        node = NodeId(bytes(7) + bytes([0x10 + i]))
        t.observe(f"f{i}._lanshare._udp.local.", foreign_txt(OLD, node), ["10.0.0.5"], 1, 0.0)
    assert len(t.peers()) == 2
    (up,) = see(t, SERVICE, ["10.0.0.2"], 1, 0.0)
    assert up.peer.node_id == PEER
    (up,) = see(t, "x._lanshare._udp.local.", ["10.0.0.3"], 1, 0.0, node=OTHER)
    assert [p.state for p in t.peers()] == [PeerState.UP, PeerState.UP]
    # With the table full of peers, a newcomer of another version is refused and counted.
    late = foreign_txt(OLD, NodeId(bytes(8)))
    assert t.observe("late._lanshare._udp.local.", late, ["10.0.0.6"], 1, 0.0) == []
    assert t.stats.full == 1
    assert len(t.peers()) == 2


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("10.0.0.1:4747", ("10.0.0.1", 4747)),
        ("nas.lan:1", ("nas.lan", 1)),
        ("[::1]:80", ("::1", 80)),
    ],
)
def test_static_peer_syntax(text: str, addr: tuple[str, int]) -> None:
    assert parse_host_port(text) == addr


@pytest.mark.parametrize(
    "text", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", ":80", "::1:80", "h:x"]
)
def test_bad_static_peers_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_host_port(text)


def test_instance_label() -> None:
    assert instance_label("a b._lanshare._udp.local.") == "a b"


def test_a_record_of_another_version_under_another_name_cannot_take_a_peer_down() -> None:
    """Node ids are public: a stale or spoofed record claiming a live peer's id under
    another service name leaves the peer as it is."""
    t = table()
    (up,) = see(t, SERVICE, ["10.0.0.2"], 4747, 0.0)
    assert up.peer.state is PeerState.UP
    spoof = foreign_txt(OLD, PEER, b"n=zz")
    assert t.observe("impostor._lanshare._udp.local.", spoof, ["10.0.0.66"], 4747, 1.0) == []
    (peer,) = t.peers()
    assert peer.state is PeerState.UP
    assert peer.addresses == (("10.0.0.2", 4747),)
    # The same service moving to another version is a real upgrade: down, then listed.
    (down,) = t.observe(SERVICE, spoof, ["10.0.0.2"], 4747, 2.0)
    assert isinstance(down, PeerDown)
    assert t.peers()[0].state is PeerState.INCOMPATIBLE
