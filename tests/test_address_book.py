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
