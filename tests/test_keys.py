"""Folder keys: text form round trip, typo detection, and the one-way derivations."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare import keys
from lanshare.errors import ConfigError, KeyFormatError

if TYPE_CHECKING:
    from collections.abc import Iterator

raw_keys = st.binary(min_size=keys.KEY_SIZE, max_size=keys.KEY_SIZE)

# A few fixed keys for the exhaustive checks: the extremes and some patterns.
FIXED_KEYS = [
    bytes(32),
    b"\xff" * 32,
    bytes(range(32)),
    bytes.fromhex("8f" * 16 + "01" * 16),
]


def _chars(text: str) -> str:
    return text.replace("-", "")


def _parse_or_none(text: str) -> bytes | None:
    try:
        return keys.parse_key(text)
    except KeyFormatError:
        return None


def _substitutions(formatted: str) -> Iterator[str]:
    """Every string that differs from ``formatted`` by one key character (dashes kept)."""
    for i, char in enumerate(formatted):
        if char == "-":
            continue
        for other in keys.ALPHABET:
            if other != char:
                yield formatted[:i] + other + formatted[i + 1 :]


def _transpositions(chars: str) -> Iterator[str]:
    """Every swap of two adjacent, different characters."""
    for i in range(len(chars) - 1):
        if chars[i] != chars[i + 1]:
            yield chars[:i] + chars[i + 1] + chars[i] + chars[i + 2 :]


@given(raw_keys)
def test_round_trip(raw: bytes) -> None:
    text = keys.format_key(raw)
    assert keys.parse_key(text) == raw


@given(raw_keys)
def test_text_form_is_grouped_command_line_safe_base32(raw: bytes) -> None:
    text = keys.format_key(raw)
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{5}(-[0-9A-HJKMNP-TV-Z]{5}){11}", text), text
    assert len(_chars(text)) == keys.KEY_CHARS


@given(raw_keys, st.data())
def test_parsing_ignores_case_spaces_dashes_and_reads_lookalikes(
    raw: bytes, data: st.DataObject
) -> None:
    chars = _chars(keys.format_key(raw))
    lookalike = {"0": "oO", "1": "iIlL"}
    typed = []
    for char in chars:
        choice = data.draw(st.sampled_from([char, char.lower(), *lookalike.get(char, "")]))
        typed.append(choice + data.draw(st.sampled_from(["", "", " ", "-", "  "])))
    assert keys.parse_key("".join(typed)) == raw


@pytest.mark.parametrize("raw", FIXED_KEYS, ids=lambda r: r.hex()[:8])
def test_every_single_substitution_is_caught_exhaustively(raw: bytes) -> None:
    formatted = keys.format_key(raw)
    accepted = [typo for typo in _substitutions(formatted) if _parse_or_none(typo) is not None]
    assert accepted == []


@pytest.mark.parametrize("raw", FIXED_KEYS, ids=lambda r: r.hex()[:8])
def test_every_adjacent_transposition_is_caught_exhaustively(raw: bytes) -> None:
    chars = _chars(keys.format_key(raw))
    swaps = list(_transpositions(chars))
    assert [s for s in swaps if _parse_or_none(s) is not None] == []


@given(raw_keys, st.integers(min_value=0, max_value=keys.KEY_CHARS - 1), st.data())
def test_a_substitution_anywhere_is_caught(raw: bytes, position: int, data: st.DataObject) -> None:
    chars = _chars(keys.format_key(raw))
    other = data.draw(st.sampled_from(keys.ALPHABET.replace(chars[position], "")))
    typo = chars[:position] + other + chars[position + 1 :]
    with pytest.raises(KeyFormatError, match="check for a typo"):
        keys.parse_key(typo)


@given(raw_keys, st.integers(min_value=0, max_value=keys.KEY_CHARS - 2))
def test_an_adjacent_transposition_anywhere_is_caught(raw: bytes, position: int) -> None:
    chars = _chars(keys.format_key(raw))
    swapped = chars[:position] + chars[position + 1] + chars[position] + chars[position + 2 :]
    if swapped == chars:
        return
    with pytest.raises(KeyFormatError, match="check for a typo"):
        keys.parse_key(swapped)


@settings(max_examples=300)
@given(raw_keys, st.lists(st.integers(0, keys.KEY_CHARS - 1), min_size=2, max_size=4, unique=True))
def test_up_to_four_wrong_characters_anywhere_are_caught(raw: bytes, positions: list[int]) -> None:
    chars = list(_chars(keys.format_key(raw)))
    for position in positions:
        chars[position] = keys.ALPHABET[(keys.ALPHABET.index(chars[position]) + 7) % 32]
    with pytest.raises(KeyFormatError):
        keys.parse_key("".join(chars))


def test_substituting_a_dash_or_swapping_it_is_harmless_or_a_length_error() -> None:
    formatted = keys.format_key(FIXED_KEYS[2])
    dash = formatted.index("-")
    moved = formatted[: dash - 1] + "-" + formatted[dash - 1] + formatted[dash + 1 :]
    assert keys.parse_key(moved) == FIXED_KEYS[2]
    with pytest.raises(KeyFormatError, match="61"):
        keys.parse_key(formatted[:dash] + "A" + formatted[dash + 1 :])


def test_wrong_length_says_so() -> None:
    chars = _chars(keys.format_key(FIXED_KEYS[3]))
    with pytest.raises(KeyFormatError, match=r"has 60 characters .* this one has 59"):
        keys.parse_key(chars[:-1])
    with pytest.raises(KeyFormatError, match="this one has 0"):
        keys.parse_key("")


def test_bad_character_names_its_position_in_the_text_as_typed() -> None:
    formatted = keys.format_key(FIXED_KEYS[3])
    typo = formatted[:7] + "U" + formatted[8:]  # position 8, counting the dash
    with pytest.raises(KeyFormatError, match=r"'U' \(at position 8\)"):
        keys.parse_key(typo)
    with pytest.raises(KeyFormatError, match=r"'\*' \(at position 1\)"):
        keys.parse_key("*" + formatted)


def test_key_format_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        keys.parse_key("nonsense")


def test_forged_padding_bits_are_rejected() -> None:
    # Build a codeword whose data carries set padding bits, with a matching checksum.
    data = [0] * 25 + [1]
    symbols = data + keys._rs_check_symbols(data)
    text = "".join(keys.ALPHABET[s >> 5] + keys.ALPHABET[s & 31] for s in symbols)
    with pytest.raises(KeyFormatError, match="unused bits"):
        keys.parse_key(text)


def test_format_key_refuses_wrong_sizes() -> None:
    with pytest.raises(KeyFormatError, match="32 bytes, not 31"):
        keys.format_key(bytes(31))
    with pytest.raises(KeyFormatError):
        keys.folder_id(bytes(33))


def test_generate_key_is_32_fresh_bytes() -> None:
    first, second = keys.generate_key(), keys.generate_key()
    assert len(first) == len(second) == 32
    assert first != second
    assert len(keys.generate_announce_nonce()) == keys.ANNOUNCE_NONCE_SIZE


def test_text_form_known_answer() -> None:
    # Pinned: keys already printed and written down must keep parsing to the same bytes.
    text = "000G4-0R40M-30E20-9185G-R38E1-W8124-GK2GA-HC5RR-34D1P-70X3R-FGBH3-AMHMX"
    assert keys.format_key(bytes(range(32))) == text
    assert keys.parse_key(text) == bytes(range(32))


def test_derivation_sizes_and_known_answer() -> None:
    raw = bytes(range(32))
    assert len(keys.folder_id(raw)) == 16
    assert len(keys.session_psk(raw)) == 32
    assert len(keys.announce_token(raw, bytes(8))) == 8
    # Pinned values: a change here breaks compatibility with every deployed peer.
    assert keys.folder_id(raw).hex() == KNOWN_FOLDER_ID
    assert keys.session_psk(raw).hex() == KNOWN_SESSION_PSK
    assert keys.announce_token(raw, KNOWN_BINDING).hex() == KNOWN_TOKEN


@given(raw_keys)
def test_derivations_are_domain_separated(raw: bytes) -> None:
    derived = [
        keys.folder_id(raw),
        keys.session_psk(raw)[:16],
        keys.announce_token(raw, _bound()),
        raw[:16],
    ]
    prefixes = {d[:8] for d in derived}
    assert len(prefixes) == len(derived)


def _bound(nonce: bytes = bytes(8), **changes: Any) -> bytes:
    """A binding of the genuine announcement, with ``changes`` made to it."""
    fields: dict[str, Any] = {
        "node_id": bytes.fromhex("00000000000000aa"),
        "service": "Laptop._lanshare._udp.local.",
        "port": 47474,
        "addresses": [ipaddress.ip_address("192.168.1.20"), ipaddress.ip_address("fd00::20")],
    }
    return keys.announce_binding(nonce, **(fields | changes))


@given(raw_keys, st.binary(min_size=8, max_size=8), st.binary(min_size=8, max_size=8))
def test_tokens_differ_with_nonces(raw: bytes, nonce_a: bytes, nonce_b: bytes) -> None:
    token_a, token_b = (
        keys.announce_token(raw, _bound(nonce_a)),
        keys.announce_token(raw, _bound(nonce_b)),
    )
    if nonce_a != nonce_b:
        assert token_a != token_b
    assert token_a == keys.announce_token(raw, _bound(nonce_a))


TRANSPLANTS: dict[str, dict[str, Any]] = {
    "another node id": {"node_id": bytes.fromhex("00000000000000bb")},
    "another instance name": {"service": "Laptop-2._lanshare._udp.local."},
    "another port": {"port": 47475},
    "the replayer's address": {"addresses": [ipaddress.ip_address("192.168.1.66")]},
    "an address added": {
        "addresses": [ipaddress.ip_address(a) for a in ("192.168.1.20", "fd00::20", "10.0.0.66")]
    },
    "an address left out": {"addresses": [ipaddress.ip_address("192.168.1.20")]},
    "no address": {"addresses": []},
}


@pytest.mark.parametrize("change", TRANSPLANTS.values(), ids=list(TRANSPLANTS))
def test_a_token_is_worth_nothing_elsewhere(change: dict[str, Any]) -> None:
    """What a replayer would change when re-announcing a recorded token changes the token."""
    raw = bytes(range(32))
    genuine = keys.announce_token(raw, _bound())
    assert keys.announce_token(raw, _bound(**change)) != genuine


def test_a_binding_names_a_set_of_addresses_and_a_name_as_dns_compares_it() -> None:
    v4, v6 = ipaddress.ip_address("192.168.1.20"), ipaddress.ip_address("fd00::20")
    assert _bound(addresses=[v6, v4, v6]) == _bound(addresses=[v4, v6])
    assert _bound(service="LAPTOP._lanshare._udp.local.") == _bound()
    # IPv6 addresses are covered in full: one differing in its last bit is another address.
    other = ipaddress.ip_address("fd00::21")
    assert _bound(addresses=[v4, other]) != _bound()


@given(
    st.binary(max_size=40),
    st.binary(max_size=40),
    st.text(max_size=300),
    st.integers(-(2**20), 2**20),
    st.lists(st.ip_addresses(), max_size=10),
)
def test_binding_a_hostile_announcement_never_raises(
    nonce: bytes, node_id: bytes, service: str, port: int, addresses: list[Any]
) -> None:
    message = keys.announce_binding(nonce, node_id, service, port, addresses)
    assert len(keys.announce_token(bytes(32), message)) == keys.ANNOUNCE_TOKEN_SIZE


@given(raw_keys, raw_keys, st.binary(min_size=8, max_size=8))
def test_tokens_and_ids_differ_with_keys(raw_a: bytes, raw_b: bytes, nonce: bytes) -> None:
    if raw_a == raw_b:
        return
    assert keys.announce_token(raw_a, _bound(nonce)) != keys.announce_token(raw_b, _bound(nonce))
    assert keys.folder_id(raw_a) != keys.folder_id(raw_b)
    assert keys.session_psk(raw_a) != keys.session_psk(raw_b)


def test_derivations_follow_rfc5869_hkdf_and_hmac() -> None:
    """Recompute with the standard library alone, so the derivation is what the docs say."""
    raw = bytes(range(32))

    def hkdf(info: bytes, size: int) -> bytes:
        prk = hmac.new(bytes(32), raw, hashlib.sha256).digest()  # no salt = 32 zero bytes
        return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:size]

    assert keys.folder_id(raw) == hkdf(b"lanshare/v1/folder-id", 16)
    assert keys.session_psk(raw) == hkdf(b"lanshare/v1/session-psk", 32)
    announce_key = hkdf(b"lanshare/v1/announce-key", 32)
    mac = hmac.new(announce_key, b"lanshare/v2/announce-token" + KNOWN_BINDING, hashlib.sha256)
    assert keys.announce_token(raw, KNOWN_BINDING) == mac.digest()[:8]


def test_the_binding_is_the_documented_message() -> None:
    """``lp(nonce) | lp(node id) | lp(name, lower case) | port | lp(addresses)``, the
    addresses IPv4 first, ascending, each a family byte and its bytes."""
    message = keys.announce_binding(
        bytes(range(8)),
        bytes.fromhex("00000000000000aa"),
        "Laptop._lanshare._udp.local.",
        47474,
        [ipaddress.ip_address("fd00::20"), ipaddress.ip_address("192.168.1.20")],
    )
    assert message == KNOWN_BINDING


KNOWN_FOLDER_ID = "6b68860f30beeabfc52d323e4382a5ed"
KNOWN_SESSION_PSK = "ec1c9e6df9a8eec5fbfee7726e3678eee40389d1d5207453b4f1d6ebae5bba36"
KNOWN_BINDING = (
    bytes.fromhex("0008 0001020304050607 0008 00000000000000aa 001c")
    + b"laptop._lanshare._udp.local."
    + bytes.fromhex("b972 0016 04 c0a80114 06 fd000000000000000000000000000020")
)
KNOWN_TOKEN = "41358baf18e7dfaa"
