"""Session cryptography: the Noise NNpsk0 handshake, packet keys, retry tokens.

Pure: no I/O; randomness (ephemeral keys, secrets) is passed in by the caller. Built on the
``cryptography`` package (X25519, HKDF-SHA256, AES-256-GCM) following the Noise Protocol
Framework, revision 34, pattern ``Noise_NNpsk0_25519_AESGCM_SHA256``::

    NNpsk0:
      -> psk, e
      <- e, ee

The pre-shared key is the folder's session PSK, so completing the handshake proves that both
sides hold the folder key without revealing it; the ephemeral-ephemeral DH gives forward
secrecy. ``Split()`` yields one AES-256-GCM key per direction for the DATA packets.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import TYPE_CHECKING, Generic, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from lanshare.errors import DecodeError

if TYPE_CHECKING:
    from collections.abc import Iterable

PROTOCOL_NAME = b"Noise_NNpsk0_25519_AESGCM_SHA256"
#: Mixed into the transcript first, so that no other protocol's handshake can be confused
#: with ours (Noise §6 "prologue").
PROLOGUE = b"lanshare/1 transfer"
HASH_LEN = 32
DH_LEN = 32
TAG_LEN = 16
_KEY_UPDATE_LABEL = b"lanshare key update"
_NONCE_PREFIX = bytes(4)
_U64 = struct.Struct("!Q")

K = TypeVar("K")


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    # Noise's HKDF is RFC 5869 with salt = chaining key and empty info.
    okm = HKDF(hashes.SHA256(), HASH_LEN * outputs, salt=chaining_key, info=b"").derive(ikm)
    return [okm[i : i + HASH_LEN] for i in range(0, len(okm), HASH_LEN)]


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class _SymmetricState:
    """Noise §5.2 SymmetricState (with its CipherState folded in)."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, h: bytes, ck: bytes) -> None:
        self.h = h
        self.ck = ck
        self.k: bytes | None = None
        self.n = 0

    def copy(self) -> _SymmetricState:
        state = _SymmetricState(self.h, self.ck)
        state.k = self.k
        state.n = self.n
        return state

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)
        self.n = 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, self.k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.n = 0

    def _nonce(self) -> bytes:
        return _NONCE_PREFIX + _U64.pack(self.n)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None
        ciphertext = AESGCM(self.k).encrypt(self._nonce(), plaintext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            plaintext = AESGCM(self.k).decrypt(self._nonce(), ciphertext, self.h)
        except InvalidTag:
            raise DecodeError("handshake message fails authentication") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def _initial_state() -> _SymmetricState:
    # The protocol name is exactly HASHLEN bytes, so h = name (Noise §5.2 InitializeSymmetric).
    state = _SymmetricState(PROTOCOL_NAME, PROTOCOL_NAME)
    state.mix_hash(PROLOGUE)
    return state


_START = _initial_state()


class InitiatorHandshake:
    """The initiator's side of NNpsk0: ``write_message1`` then ``read_message2``."""

    __slots__ = ("_e", "_state")

    def __init__(self, psk: bytes, ephemeral: bytes) -> None:
        """Args: psk: the folder's 32-byte session PSK; ephemeral: 32 random bytes."""
        self._state = _START.copy()
        self._state.mix_key_and_hash(psk)
        self._e = X25519PrivateKey.from_private_bytes(ephemeral)

    def write_message1(self, payload: bytes) -> bytes:
        """``-> psk, e`` with the encrypted payload: ``e.pub | AEAD(payload)``."""
        e_pub = _public_bytes(self._e)
        self._state.mix_hash(e_pub)
        self._state.mix_key(e_pub)
        return e_pub + self._state.encrypt_and_hash(payload)

    def read_message2(self, message: bytes) -> tuple[bytes, tuple[bytes, bytes]]:
        """``<- e, ee``: return the responder's payload and ``(send_key, recv_key)``.

        Raises ``DecodeError`` when the message is malformed or not from a key holder; the
        handshake is then unchanged, so the genuine message can still follow a forged one
        (anyone can send one from the responder's address).
        """
        if len(message) < DH_LEN + TAG_LEN:
            raise DecodeError("short handshake message")
        re_pub = message[:DH_LEN]
        state = self._state.copy()
        state.mix_hash(re_pub)
        state.mix_key(re_pub)
        state.mix_key(_dh(self._e, re_pub))
        payload = state.decrypt_and_hash(message[DH_LEN:])
        self._state = state
        i2r, r2i = state.split()
        return payload, (i2r, r2i)


class ResponderKeys(Generic[K]):
    """The PSKs a responder accepts, each already mixed into the handshake state.

    NNpsk0 mixes the PSK in before anything from the message (``-> psk, e``), so that step
    is the same for every INITIAL: done once here, it leaves a key trial (``key_trial``) one
    hash, one HKDF and one AES-GCM open.
    """

    __slots__ = ("_states",)

    def __init__(self, psks: Iterable[tuple[K, bytes]]) -> None:
        states = []
        for key_id, psk in psks:
            state = _START.copy()
            state.mix_key_and_hash(psk)
            states.append((key_id, state))
        self._states: tuple[tuple[K, _SymmetricState], ...] = tuple(states)

    def __len__(self) -> int:
        """Key trials an INITIAL can cost (one per PSK)."""
        return len(self._states)

    def read_message1(self, message: bytes) -> ResponderHandshake[K] | None:
        """Try every key on message 1; return the handshake for the one that fits, or None."""
        if len(message) < DH_LEN + TAG_LEN:
            return None
        e_pub = message[:DH_LEN]
        ciphertext = message[DH_LEN:]
        for key_id, start in self._states:
            opened = key_trial(start, e_pub, ciphertext)
            if opened is not None:
                state, payload = opened
                return ResponderHandshake(key_id, state, e_pub, payload)
        return None


def key_trial(
    start: _SymmetricState, e_pub: bytes, ciphertext: bytes
) -> tuple[_SymmetricState, bytes] | None:
    """One key trial: open message 1 under one PSK's state; (state, payload) or None.

    What a stranger's INITIAL costs us per accepted folder (the endpoint budgets these)."""
    state = start.copy()
    state.mix_hash(e_pub)
    state.mix_key(e_pub)
    try:
        payload = state.decrypt_and_hash(ciphertext)
    except DecodeError:
        return None
    return state, payload


class ResponderHandshake(Generic[K]):
    """The responder's side of NNpsk0, found by ``ResponderKeys.read_message1``."""

    __slots__ = ("_re", "_state", "key_id", "payload", "remote_ephemeral")

    def __init__(self, key_id: K, state: _SymmetricState, re_pub: bytes, payload: bytes) -> None:
        self.key_id = key_id
        self.payload = payload
        self.remote_ephemeral = re_pub
        self._state = state
        self._re = re_pub

    def write_message2(self, ephemeral: bytes, payload: bytes) -> tuple[bytes, tuple[bytes, bytes]]:
        """``<- e, ee``: return the message and ``(send_key, recv_key)``."""
        e = X25519PrivateKey.from_private_bytes(ephemeral)
        e_pub = _public_bytes(e)
        self._state.mix_hash(e_pub)
        self._state.mix_key(e_pub)
        self._state.mix_key(_dh(e, self._re))
        message = e_pub + self._state.encrypt_and_hash(payload)
        i2r, r2i = self._state.split()
        return message, (r2i, i2r)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # low-order point: all-zero shared secret
        raise DecodeError("invalid ephemeral key") from None


def next_key(secret: bytes) -> bytes:
    """The key of the next key phase (one-way, like QUIC's key update, RFC 9001 §6)."""
    return HKDFExpand(hashes.SHA256(), HASH_LEN, info=_KEY_UPDATE_LABEL).derive(secret)


class PacketKey:
    """One direction's AEAD key for one key phase (AES-256-GCM; the key object is reused)."""

    __slots__ = ("aead", "secret")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.aead = AESGCM(secret)

    def next(self) -> PacketKey:
        return PacketKey(next_key(self.secret))


class RetryTokens:
    """Stateless address-validation tokens (RFC 9000 §8.1.2): a MAC of address and time slot."""

    __slots__ = ("_lifetime", "_secret")
    SIZE = 20
    _HEAD = struct.Struct("!I")

    def __init__(self, secret: bytes, lifetime: float = 30.0) -> None:
        self._secret = secret
        self._lifetime = lifetime

    def issue(self, addr: tuple[str, int], cid: int, now: float) -> bytes:
        slot = int(now // self._lifetime) & 0xFFFFFFFF
        return self._HEAD.pack(slot) + self._mac(slot, addr, cid)

    def check(self, token: bytes, addr: tuple[str, int], cid: int, now: float) -> bool:
        if len(token) != self.SIZE:
            return False
        (slot,) = self._HEAD.unpack_from(token)
        current = int(now // self._lifetime) & 0xFFFFFFFF
        if (current - slot) & 0xFFFFFFFF > 1:
            return False
        return hmac.compare_digest(token[4:], self._mac(slot, addr, cid))

    def _mac(self, slot: int, addr: tuple[str, int], cid: int) -> bytes:
        msg = b"%d|%s|%d|%d" % (slot, addr[0].encode(), addr[1], cid)
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:16]
