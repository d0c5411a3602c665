"""Which peer addresses the daemon keeps the engine trying, as discovery news arrives."""

from __future__ import annotations

from lanshare.daemon import AddressBook

A1 = ("10.0.0.1", 4747)
A2 = ("10.0.0.2", 4747)
STATIC = ("10.0.0.9", 4747)


def test_a_peer_that_moves_has_its_old_address_forgotten() -> None:
    book = AddressBook()
    assert book.update("peer", (A1,)) == []
    assert book.update("peer", (A1, A2)) == []
    assert book.update("peer", (A2,)) == [A1]


def test_a_peer_that_leaves_has_every_address_forgotten() -> None:
    book = AddressBook()
    book.update("peer", (A1, A2))
    assert book.update("peer", (), gone=(A1, A2)) == [A1, A2]
    # Named only by the news of its departure (its arrival was never seen): forgotten too.
    assert book.update("other", (), gone=(A1,)) == [A1]


def test_an_address_another_entry_still_announces_is_kept() -> None:
    book = AddressBook()
    book.update("candidate 10.0.0.1:4747", (A1,))
    book.update("peer", (A1,))
    assert book.update("peer", (), gone=(A1,)) == []


def test_static_peers_are_never_forgotten() -> None:
    book = AddressBook()
    book.static.add(STATIC)
    book.update("peer", (STATIC, A1))
    assert book.update("peer", (), gone=(STATIC, A1)) == [A1]
    book.update("peer", (STATIC, A2))
    assert book.forget_discovered() == [A2]
    assert book.update("peer", (A1,)) == []  # a fresh start: nothing known to forget


V6 = ("2001:db8::1", 4747)
LINK = ("fe80::1%2", 4747)


def test_one_address_of_a_peer_is_dialled_ipv4_first() -> None:
    book = AddressBook()
    book.update("peer", (LINK, V6, A1))
    assert book.dialled("peer") == A1
    assert book.dialled("nobody") is None
    # The address dialled stays while announced, even when one that sorts first appears.
    book.update("peer", (V6, LINK))
    assert book.dialled("peer") == V6
    book.update("peer", (A1, V6, LINK))
    assert book.dialled("peer") == V6


def test_a_failed_handshake_moves_on_to_the_next_address_and_round() -> None:
    book = AddressBook()
    book.update("peer", (LINK, V6, A1))
    assert book.failed(A1) == [(A1, V6)]
    assert book.failed(A1) == []  # a second folder's failure on the same address: moved once
    assert book.failed(V6) == [(V6, LINK)]
    assert book.failed(LINK) == [(LINK, A1)]
    book.update("single", (A2,))
    assert book.failed(A2) == []  # nowhere else to go


def test_the_address_a_session_came_up_on_is_kept() -> None:
    book = AddressBook()
    book.update("peer", (A1, V6))
    assert book.established("peer", V6) == (A1, V6)  # the peer dialled us over IPv6
    assert book.dialled("peer") == V6
    assert book.established("peer", V6) is None
    assert book.established("peer", ("192.0.2.1", 1)) is None  # not announced: not kept
    assert book.established("stranger", A1) is None


def test_a_static_peer_is_dialled_one_address_at_a_time_and_never_forgotten() -> None:
    book = AddressBook()
    # A host name that resolves to an IPv6 and an IPv4 address: IPv4 first, IPv6 next.
    assert book.add_static("peer.lan:4747", [V6, A1]) == A1
    assert book.add_static("nothing:4747", []) is None
    assert book.dialling(A1)
    assert not book.dialling(V6)
    assert book.failed(A1) == [(A1, V6)]
    assert book.dialling(V6)
    assert not book.dialling(A1)
    book.update("peer", (A2,))
    assert book.forget_discovered() == [A2]  # the static entry stays
    assert book.dialling(V6)
    assert book.update("peer", (A1,)) == []  # nothing to forget after a fresh start
