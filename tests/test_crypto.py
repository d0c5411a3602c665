"""Handshake (Noise NNpsk0), packet keys and retry tokens."""

from __future__ import annotations

import random
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanshare.errors import DecodeError
from lanshare.protocol import crypto

PSK = bytes(range(32))


def _keys(seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    return rng.randbytes(32), rng.randbytes(32)


def test_handshake_gives_matching_keys_and_payloads() -> None:
    e_i, e_r = _keys(1)
    initiator = crypto.InitiatorHandshake(PSK, e_i)
    msg1 = initiator.write_message1(b"hello")
    responder = crypto.ResponderKeys([("wrong", bytes(32)), ("f", PSK)]).read_message1(msg1)
    assert responder is not None
    assert responder.key_id == "f"
    assert responder.payload == b"hello"
    msg2, (r_send, r_recv) = responder.write_message2(e_r, b"world")
    payload, (i_send, i_recv) = initiator.read_message2(msg2)
    assert payload == b"world"
    assert (i_send, i_recv) == (r_recv, r_send)
    assert i_send != i_recv


def test_wrong_psk_finds_no_key() -> None:
    e_i, _ = _keys(2)
    msg1 = crypto.InitiatorHandshake(PSK, e_i).write_message1(b"x")
    assert crypto.ResponderKeys([("other", bytes(32))]).read_message1(msg1) is None
    assert crypto.ResponderKeys([("f", PSK)]).read_message1(msg1[:40]) is None


@given(st.integers(0, 200), st.integers(0, 7))
def test_tampered_handshake_messages_fail(index: int, bit: int) -> None:
    e_i, e_r = _keys(3)
    initiator = crypto.InitiatorHandshake(PSK, e_i)
    msg1 = initiator.write_message1(b"payload-1")
    index1 = index % len(msg1)
    bad1 = bytearray(msg1)
    bad1[index1] ^= 1 << bit
    assert crypto.ResponderKeys([("f", PSK)]).read_message1(bytes(bad1)) is None
    responder = crypto.ResponderKeys([("f", PSK)]).read_message1(msg1)
    assert responder is not None
    msg2, _ = responder.write_message2(e_r, b"payload-2")
    bad2 = bytearray(msg2)
    bad2[index % len(msg2)] ^= 1 << bit
    with pytest.raises(DecodeError):
        initiator.read_message2(bytes(bad2))


@pytest.mark.parametrize("forgery", ["flipped tag", "other key", "low-order key"])
def test_a_refused_message2_leaves_the_handshake_ready_for_the_genuine_one(forgery: str) -> None:
    """Anyone can send message 2 from the responder's address, before the responder does."""
    e_i, e_r = _keys(4)
    initiator = crypto.InitiatorHandshake(PSK, e_i)
    responder = crypto.ResponderKeys([("f", PSK)]).read_message1(initiator.write_message1(b"1"))
    assert responder is not None
    msg2, (r_send, r_recv) = responder.write_message2(e_r, b"2")
    forged = {
        "flipped tag": msg2[:-1] + bytes([msg2[-1] ^ 1]),
        "other key": bytes([9]) * 32 + msg2[32:],
        "low-order key": bytes(32) + msg2[32:],
    }[forgery]
    with pytest.raises(DecodeError):
        initiator.read_message2(forged)
    payload, (i_send, i_recv) = initiator.read_message2(msg2)
    assert payload == b"2"
    assert (i_send, i_recv) == (r_recv, r_send)


def test_handshakes_are_fresh_per_session() -> None:
    keys = set()
    for seed in range(4):
        e_i, e_r = _keys(10 + seed)
        initiator = crypto.InitiatorHandshake(PSK, e_i)
        responder = crypto.ResponderKeys([("f", PSK)]).read_message1(initiator.write_message1(b""))
        assert responder is not None
        _, pair = responder.write_message2(e_r, b"")
        keys.add(pair)
    assert len(keys) == 4


def test_interoperates_with_the_reference_noise_implementation() -> None:
    from noise import connection as noise

    e_i, e_r = _keys(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that fixed ephemerals are for testing only
        # our initiator, their responder
        theirs = noise.NoiseConnection.from_name(crypto.PROTOCOL_NAME)
        theirs.set_as_responder()
        theirs.set_psks(psk=PSK)
        theirs.set_prologue(crypto.PROLOGUE)
        theirs.set_keypair_from_private_bytes(noise.Keypair.EPHEMERAL, e_r)
        theirs.start_handshake()
        ours = crypto.InitiatorHandshake(PSK, e_i)
        assert bytes(theirs.read_message(ours.write_message1(b"ping"))) == b"ping"
        payload, (send_key, recv_key) = ours.read_message2(bytes(theirs.write_message(b"pong")))
        assert payload == b"pong"
        assert theirs.handshake_finished
        assert theirs.noise_protocol.cipher_state_encrypt.k == recv_key
        assert theirs.noise_protocol.cipher_state_decrypt.k == send_key
        # their initiator, our responder
        theirs = noise.NoiseConnection.from_name(crypto.PROTOCOL_NAME)
        theirs.set_as_initiator()
        theirs.set_psks(psk=PSK)
        theirs.set_prologue(crypto.PROLOGUE)
        theirs.set_keypair_from_private_bytes(noise.Keypair.EPHEMERAL, e_i)
        theirs.start_handshake()
        responder = crypto.ResponderKeys([("f", PSK)]).read_message1(
            bytes(theirs.write_message(b"hi"))
        )
        assert responder is not None
        assert responder.payload == b"hi"
        msg2, (send_key, recv_key) = responder.write_message2(e_r, b"there")
        assert bytes(theirs.read_message(msg2)) == b"there"
        assert theirs.noise_protocol.cipher_state_encrypt.k == recv_key
        assert theirs.noise_protocol.cipher_state_decrypt.k == send_key


def test_key_update_is_one_way_and_deterministic() -> None:
    key = crypto.PacketKey(bytes(32))
    nxt = key.next()
    assert nxt.secret != key.secret
    assert nxt.secret == crypto.PacketKey(bytes(32)).next().secret
    assert nxt.next().secret not in (key.secret, nxt.secret)


def test_retry_tokens() -> None:
    tokens = crypto.RetryTokens(b"s" * 32, lifetime=30.0)
    addr = ("10.0.0.1", 5000)
    token = tokens.issue(addr, 7, now=100.0)
    assert len(token) == crypto.RetryTokens.SIZE
    assert tokens.check(token, addr, 7, now=100.0)
    assert tokens.check(token, addr, 7, now=125.0)  # next slot still fine
    assert not tokens.check(token, addr, 7, now=200.0)  # expired
    assert not tokens.check(token, ("10.0.0.2", 5000), 7, now=100.0)
    assert not tokens.check(token, ("10.0.0.1", 5001), 7, now=100.0)
    assert not tokens.check(token, addr, 8, now=100.0)
    assert not tokens.check(token[:-1] + bytes([token[-1] ^ 1]), addr, 7, now=100.0)
    assert not tokens.check(b"short", addr, 7, now=100.0)
    other = crypto.RetryTokens(b"t" * 32)
    assert not other.check(token, addr, 7, now=100.0)
