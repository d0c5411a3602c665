"""Folder keys: generation, the human text form with its checksum, and one-way derivations.

Pure apart from ``generate_key`` and ``generate_announce_nonce``, which read the OS random source.

Text form
---------
A key is 32 random bytes. Its text form is 60 characters of Crockford's base32 alphabet
(``0-9 A-Z`` without ``I L O U``), in twelve dash-separated groups of five::

    7ZK3M-0Q4TV-...-9XH2C

The 256 key bits, followed by 4 zero bits, make 26 symbols of 10 bits; four more 10-bit check
symbols follow. Each 10-bit symbol is written as two characters. The 30 symbols form a
Reed-Solomon codeword over GF(2^10) with four check symbols (minimum distance 5), so every
error that touches at most four characters is detected for certain: any single mistyped
character, any two adjacent characters swapped, any two or three or four wrong characters
anywhere. A random jumble passes with a chance of 1 in 2^40. The code is used only to detect
errors, never to correct them: a mistyped key is rejected, not guessed.

Parsing ignores case, spaces and dashes, and reads the Crockford look-alikes ``O`` as ``0`` and
``I``/``L`` as ``1``, so a key read aloud and typed back works.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lanshare.errors import KeyFormatError

if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Iterable

KEY_SIZE = 32
"""Bytes in a folder key (256 bits)."""
FOLDER_ID_SIZE = 16
SESSION_PSK_SIZE = 32
ANNOUNCE_TOKEN_SIZE = 8
ANNOUNCE_NONCE_SIZE = 8
"""Bytes of the random nonce announced beside the token; renewed at every start."""

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32 alphabet: digits and upper-case letters without I, L, O and U."""
KEY_CHARS = 60
"""Characters in a key's text form, not counting dashes."""
GROUP_SIZE = 5

# Domain-separation labels: each derived value comes from its own label, so none of them can
# be turned into another or back into the key.
_LABEL_FOLDER_ID = b"lanshare/v1/folder-id"
_LABEL_SESSION_PSK = b"lanshare/v1/session-psk"
_LABEL_ANNOUNCE_KEY = b"lanshare/v1/announce-key"
_LABEL_ANNOUNCE_TOKEN = b"lanshare/v2/announce-token"


def generate_key() -> bytes:
    """A fresh random folder key (32 bytes from the OS CSPRNG)."""
    return secrets.token_bytes(KEY_SIZE)


def generate_announce_nonce() -> bytes:
    """A fresh random nonce for ``announce_binding`` (8 bytes)."""
    return secrets.token_bytes(ANNOUNCE_NONCE_SIZE)


def format_key(raw: bytes) -> str:
    """The text form of a key: 60 base32 characters with a checksum, grouped by dashes.

    Args:
        raw: the 32-byte key.

    Returns:
        e.g. ``7ZK3M-0Q4TV-…`` (12 groups of 5, upper case, safe on a command line).

    Raises:
        KeyFormatError: ``raw`` is not 32 bytes.
    """
    _check_raw(raw)
    value = int.from_bytes(raw, "big") << _PAD_BITS
    data = [(value >> (10 * i)) & 0x3FF for i in reversed(range(_DATA_SYMBOLS))]
    symbols = data + _rs_check_symbols(data)
    chars = "".join(ALPHABET[s >> 5] + ALPHABET[s & 31] for s in symbols)
    return "-".join(chars[i : i + GROUP_SIZE] for i in range(0, KEY_CHARS, GROUP_SIZE))


def parse_key(text: str) -> bytes:
    """The 32-byte key that ``text`` (as printed by ``format_key``) stands for.

    Case, spaces and dashes do not matter; ``O`` reads as ``0`` and ``I``/``L`` as ``1``.

    Raises:
        KeyFormatError: a character outside the alphabet (its 1-based position in ``text`` is
            named), the wrong number of characters, or a checksum mismatch (a typo).
    """
    values: list[int] = []
    for position, char in enumerate(text, start=1):
        if char in _SEPARATORS:
            continue
        value = _DECODE.get(char.upper())
        if value is None:
            raise KeyFormatError(
                f"a folder key has no character {char!r} (at position {position}); "
                f"keys use only the digits and the letters A-Z without I, L, O and U"
            )
        values.append(value)
    if len(values) != KEY_CHARS:
        raise KeyFormatError(
            f"a folder key has {KEY_CHARS} characters (not counting dashes), "
            f"this one has {len(values)}: part of it is missing or repeated"
        )
    symbols = [(values[i] << 5) | values[i + 1] for i in range(0, KEY_CHARS, 2)]
    if any(_rs_syndromes(symbols)):
        raise KeyFormatError(
            "the folder key's checksum does not match: check for a typo "
            "(a wrong or swapped character)"
        )
    value = 0
    for symbol in symbols[:_DATA_SYMBOLS]:
        value = (value << 10) | symbol
    if value & ((1 << _PAD_BITS) - 1):
        # Only a deliberately forged string gets here: no typo of a real key can.
        raise KeyFormatError("not a folder key: its unused bits are set; check for a typo")
    return (value >> _PAD_BITS).to_bytes(KEY_SIZE, "big")


def folder_id(raw: bytes) -> bytes:
    """The folder's 16-byte identifier, for use only inside encrypted sessions."""
    return _derive(raw, _LABEL_FOLDER_ID, FOLDER_ID_SIZE)


def session_psk(raw: bytes) -> bytes:
    """The 32-byte pre-shared key that binds a session handshake to the folder."""
    return _derive(raw, _LABEL_SESSION_PSK, SESSION_PSK_SIZE)


def announce_binding(
    nonce: bytes,
    node_id: bytes,
    service: str,
    port: int,
    addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> bytes:
    """What the announce tokens of one announcement authenticate: everything a copy of it
    would have to keep to be of any use, so that a recorded announcement replayed under
    another node id, service name, port or address set matches no folder.

    The message is, with ``lp(x)`` = ``len(x)`` as u16 big-endian followed by ``x``::

        lp(nonce) | lp(node_id) | lp(UTF-8 of service.lower()) | port u16 | lp(addresses)

    where ``addresses`` is the set in canonical order (IPv4 before IPv6, each ascending,
    duplicates removed), each written as a family byte (4 or 6) and its 4 or 16 bytes, so one
    set has exactly one encoding whatever the order it was given in. ``service`` is the full
    DNS-SD instance name (``name._lanshare._udp.local.``), lower-cased as names are compared.
    Never raises on a peer's values (any lengths, ``port`` taken modulo 2^16) so that checking
    a hostile announcement cannot fail.
    """
    canonical = sorted(set(addresses), key=lambda ip: (ip.version, ip.packed))
    packed = b"".join(bytes((ip.version,)) + ip.packed for ip in canonical)
    name = service.lower().encode("utf-8", "surrogatepass")
    return b"".join(
        (
            _length_prefixed(nonce),
            _length_prefixed(node_id),
            _length_prefixed(name),
            (port & 0xFFFF).to_bytes(2, "big"),
            _length_prefixed(packed),
        )
    )


def announce_token(raw: bytes, binding: bytes) -> bytes:
    """The 8-byte folder token announced over mDNS, bound to ``announce_binding(...)``.

    ``HMAC-SHA256(HKDF(key, "lanshare/v1/announce-key"), "lanshare/v2/announce-token" ||
    binding)`` truncated to 8 bytes. A key holder recognises its folder by recomputing it over
    what it received; anyone else sees a value that changes with every nonce and so cannot link
    the folder across devices, networks or restarts, and a copy of it is worth nothing under
    another node id, name, port or set of addresses.
    """
    announce_key = _derive(raw, _LABEL_ANNOUNCE_KEY, 32)
    mac = hmac.new(announce_key, _LABEL_ANNOUNCE_TOKEN + binding, hashlib.sha256)
    return mac.digest()[:ANNOUNCE_TOKEN_SIZE]


def _length_prefixed(value: bytes) -> bytes:
    # Nothing a peer sends is this long (a DNS name is at most 255 bytes): cutting only keeps
    # the function total.
    value = value[:0xFFFF]
    return len(value).to_bytes(2, "big") + value


def _check_raw(raw: bytes) -> None:
    if len(raw) != KEY_SIZE:
        raise KeyFormatError(f"a folder key is {KEY_SIZE} bytes, not {len(raw)}")


def _derive(raw: bytes, label: bytes, size: int) -> bytes:
    _check_raw(raw)
    # HKDF (RFC 5869) with SHA-256; the key is already uniformly random, so no salt is needed.
    return HKDF(algorithm=hashes.SHA256(), length=size, salt=None, info=label).derive(raw)


# --- Reed-Solomon over GF(2^10), used for error detection only -------------------------------

_DATA_SYMBOLS = 26  # 256 key bits + 4 zero bits
_CHECK_SYMBOLS = 4
_PAD_BITS = 10 * _DATA_SYMBOLS - 8 * KEY_SIZE
_SEPARATORS = frozenset(" -\t")
_DECODE = {char: value for value, char in enumerate(ALPHABET)} | {"O": 0, "I": 1, "L": 1}

_GF_POLY = 0x409  # x^10 + x^3 + 1, a primitive polynomial: alpha = x generates all 1023 units
_GF_ORDER = 1023


def _gf_tables() -> tuple[list[int], list[int]]:
    exp = [0] * (2 * _GF_ORDER)
    log = [0] * (_GF_ORDER + 1)
    x = 1
    for i in range(_GF_ORDER):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x400:
            x ^= _GF_POLY
    if x != 1 or len(set(exp[:_GF_ORDER])) != _GF_ORDER:  # pragma: no cover - constant check
        raise AssertionError("GF(2^10) polynomial is not primitive")
    exp[_GF_ORDER:] = exp[:_GF_ORDER]
    return exp, log


_EXP, _LOG = _gf_tables()


def _gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _rs_generator() -> list[int]:
    """Coefficients (highest degree first) of (x - a^1)(x - a^2)(x - a^3)(x - a^4)."""
    poly = [1]
    for j in range(1, _CHECK_SYMBOLS + 1):
        root = _EXP[j]
        nxt = [*poly, 0]
        for i, coefficient in enumerate(poly):
            nxt[i + 1] ^= _gf_mul(coefficient, root)
        poly = nxt
    return poly


_GENERATOR = _rs_generator()


def _rs_check_symbols(data: list[int]) -> list[int]:
    """Remainder of data(x) * x^4 divided by the generator: the systematic check symbols."""
    remainder = [0] * _CHECK_SYMBOLS
    for symbol in data:
        factor = symbol ^ remainder[0]
        remainder = [*remainder[1:], 0]
        if factor:
            for i in range(_CHECK_SYMBOLS):
                remainder[i] ^= _gf_mul(_GENERATOR[i + 1], factor)
    return remainder


def _rs_syndromes(codeword: list[int]) -> list[int]:
    """The codeword evaluated at a^1..a^4: all zero exactly for a valid codeword."""
    syndromes = []
    for j in range(1, _CHECK_SYMBOLS + 1):
        root = _EXP[j]
        acc = 0
        for symbol in codeword:
            acc = _gf_mul(acc, root) ^ symbol
        syndromes.append(acc)
    return syndromes
