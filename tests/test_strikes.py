"""Strikes, bans and their log lines: rate limits, bounds and ban keys, on a hand-set clock."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lanshare import strikes
from lanshare.strikes import Strikes, ban_key

if TYPE_CHECKING:
    import pytest


class HandClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


def test_ban_key_is_the_ipv4_host_or_the_ipv6_64() -> None:
    assert ban_key(("192.168.1.7", 4000)) == "192.168.1.7"
    assert ban_key(("::ffff:192.168.1.7", 4000)) == "192.168.1.7"
    assert ban_key(("fe80::1%eth0", 4000)) == "fe80::1"  # every link is fe80::/64
    assert ban_key(("2001:db8:1:2:aaaa::1", 4000)) == ban_key(("2001:db8:1:2:bbbb::9", 1))
    assert ban_key(("2001:db8:1:2::1", 4000)) != ban_key(("2001:db8:1:3::1", 4000))


def test_log_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock = HandClock()
    table = Strikes(clock.now)
    with caplog.at_level(logging.WARNING, logger="lanshare.engine"):
        for i in range(100_000):  # no address: counted and logged, never banned
            table.strike(b"p" * 8, None, f"bad frame {i}")
        assert len(caplog.records) == strikes.LOGGED_STRIKES
        clock.t += strikes.SUMMARY_INTERVAL
        table.strike(b"p" * 8, None, "bad frame last")
    assert len(caplog.records) == strikes.LOGGED_STRIKES + 1
    summary = caplog.records[-1].getMessage()
    assert f"{100_001 - strikes.LOGGED_STRIKES} more strikes" in summary
    assert "last: bad frame last" in summary
    assert table.total(b"p" * 8) == 100_001


def test_threshold_within_window_bans_the_address_for_a_while() -> None:
    clock = HandClock()
    table = Strikes(clock.now)
    addr = ("10.1.1.1", 4000)
    for _ in range(strikes.BAN_THRESHOLD - 1):  # spread out: never a ban
        assert table.strike(b"a" * 8, addr, "bad") is None
        clock.t += strikes.BAN_WINDOW + 0.1
    assert not table.banned(addr)
    bans = [table.strike(b"a" * 8, addr, "bad") for _ in range(strikes.BAN_THRESHOLD)]
    assert bans[-1] is not None
    assert bans[:-1] == [None] * (strikes.BAN_THRESHOLD - 1)
    assert table.banned(("10.1.1.1", 9999))  # any port, any node id
    assert not table.banned(("10.1.1.2", 4000))
    clock.t += strikes.BAN_SECONDS - 1
    assert table.banned(addr)
    clock.t += 1
    assert not table.banned(addr)
    assert table.bans() == []


def test_tables_are_bounded_oldest_out_first() -> None:
    clock = HandClock()
    table = Strikes(clock.now)
    for i in range(strikes.MAX_PEERS * 4):
        peer = i.to_bytes(8, "big")
        for _ in range(strikes.BAN_THRESHOLD):
            table.strike(peer, (f"10.{i >> 8 & 255}.{i & 255}.1", 4000), "bad")
    assert len(table._records) == strikes.MAX_PEERS
    assert len(table.bans()) == strikes.MAX_BANS
    assert not table.banned(("10.0.0.1", 4000))  # the first ban went first
    assert table.banned((f"10.3.{strikes.MAX_PEERS * 4 - 1 & 255}.1", 4000))
    assert table.total((0).to_bytes(8, "big")) == 0
