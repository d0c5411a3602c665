"""Address families, dialling order and scoped link-local addresses as users write them."""

from __future__ import annotations

import socket

from lanshare.addressing import (
    dial_order,
    families,
    resolved_addr,
    show_addr,
    sockaddr,
)

LO = socket.if_nametoindex("lo")


def test_families_follow_ip_version_and_what_the_socket_reaches() -> None:
    assert families("both") == {4, 6}
    assert families("v4") == {4}
    assert families("v6") == {6}
    assert families("both", "::") == {4, 6}  # dual-stack
    assert families("both", "0.0.0.0") == {4}  # an IPv4 socket reaches no IPv6 peer
    assert families("v6", "0.0.0.0") == set()


def test_dial_order_is_ipv4_then_global_then_link_local() -> None:
    addrs = [
        ("fe80::1%2", 9),
        ("2001:db8::1", 9),
        ("10.0.0.2", 9),
        ("fd00::1", 9),
        ("10.0.0.1", 9),
        ("10.0.0.2", 9),
    ]
    assert dial_order(addrs) == (
        ("10.0.0.2", 9),
        ("10.0.0.1", 9),
        ("2001:db8::1", 9),
        ("fd00::1", 9),
        ("fe80::1%2", 9),
    )


def test_addresses_are_shown_with_brackets_and_the_interface_name() -> None:
    assert show_addr(("10.0.0.1", 47474)) == "10.0.0.1:47474"
    assert show_addr(("2001:db8::1", 47474)) == "[2001:db8::1]:47474"
    assert show_addr((f"fe80::1%{LO}", 47474)) == "[fe80::1%lo]:47474"
    assert show_addr(("fe80::1%eth7", 1)) == "[fe80::1%eth7]:1"  # as written
    # An interface that went away: its index is all there is to show.
    assert show_addr(("fe80::1%99999", 1)) == "[fe80::1%99999]:1"


def test_a_scope_is_given_to_the_socket_as_a_number() -> None:
    assert sockaddr((f"fe80::1%{LO}", 5)) == ("fe80::1", 5, 0, LO)
    assert sockaddr(("10.0.0.1", 5)) == ("10.0.0.1", 5)
    assert sockaddr(("2001:db8::1", 5)) == ("2001:db8::1", 5)


def test_getaddrinfo_results_are_spelt_as_lanshare_spells_addresses() -> None:
    (info,) = socket.getaddrinfo("fe80::1%lo", 7, socket.AF_INET6, socket.SOCK_DGRAM)
    assert resolved_addr(info[4]) == (f"fe80::1%{LO}", 7)
    assert resolved_addr(("2001:db8::1", 7, 0, 0)) == ("2001:db8::1", 7)
    assert resolved_addr(("10.0.0.1", 7)) == ("10.0.0.1", 7)
