"""sd_notify as systemd sees it: a test-owned NOTIFY_SOCKET receives what the notifier sends."""

from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING

import pytest

from lanshare.sdnotify import Notifier, watchdog_interval

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def manager_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_ready_and_status_reach_the_manager(manager_socket: tuple[socket.socket, str]) -> None:
    sock, path = manager_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.notify("READY=1", "STATUS=scanning")
    notifier.notify("WATCHDOG=1")
    notifier.close()
    assert sock.recv(4096) == b"READY=1\nSTATUS=scanning"
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_namespace_socket() -> None:
    name = f"lanshare-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier(f"@{name}")
        notifier.notify("READY=1")
        notifier.close()
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.notify("READY=1")
    notifier.close()


def test_vanished_manager_socket_is_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    notifier.notify("READY=1")
    notifier.close()


def test_watchdog_interval_is_half_the_period_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert (
        watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    )
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
