"""A stranger flooding a daemon with handshake INITIALs from many source ports.

Run in a lab host: ``python -m tests.e2e.initial_flood HOST:PORT --ports N --seconds S``
with either ``--initial HEX`` (one recorded INITIAL, replayed from every port) or
``--garbage`` (random INITIALs of the right size and type). Every port answers a RETRY as an
attacker at a real address can: with the same INITIAL carrying the token it was given, and
asks for a fresh token (sends without one) once a token is ``TOKEN_LIFE`` seconds old, before
it expires. Each port sends again every ``--interval`` seconds (what keeps a half-open
session renewed), so the flood lasts until ``--seconds`` pass or stdin closes. Prints one
JSON line of counters a second: ``sent``, ``retries``, ``responses`` (RETRY and RESPONSE
datagrams received).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import struct
import sys
import time

_LONG = struct.Struct("!BBHI")
_INITIAL = 1
_RESPONSE = 2
_RETRY = 3
_INITIAL_SIZE = 1200
TOKEN_LIFE = 20.0
"""Seconds a retry token is used (a daemon's tokens last 30 to 60 seconds)."""


class Port:
    """One source port: its INITIAL and, once a RETRY came, its token."""

    def __init__(self, initial: bytes | None, rng: random.Random) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        self.rng = rng
        self.initial = initial
        self.cid = rng.getrandbits(32)
        self.token = b""
        self.token_at = 0.0

    def datagram(self) -> bytes:
        if self.token and time.monotonic() - self.token_at > TOKEN_LIFE:
            self.token = b""
        if self.initial is None:  # garbage: a fresh random body each time
            head = _LONG.pack(2, _INITIAL, len(self.token), self.cid) + self.token
            return head + self.rng.randbytes(_INITIAL_SIZE - len(head))
        version, kind, old_len, cid = _LONG.unpack_from(self.initial)
        body = self.initial[_LONG.size + old_len :]
        return _LONG.pack(version, kind, len(self.token), cid) + self.token + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--initial", help="hex of a recorded INITIAL")
    parser.add_argument("--garbage", action="store_true")
    parser.add_argument("--ports", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    initial = None if args.garbage else bytes.fromhex(args.initial)
    rng = random.Random(os.getpid())
    ports = [Port(initial, rng) for _ in range(args.ports)]
    by_fd = {p.sock.fileno(): p for p in ports}
    counts = {"sent": 0, "retries": 0, "responses": 0}
    start = time.monotonic()
    next_round = next_report = start
    stdin = sys.stdin.fileno()
    while time.monotonic() - start < args.seconds:
        now = time.monotonic()
        if now >= next_round:
            for p in ports:
                try:
                    p.sock.sendto(p.datagram(), target)
                    counts["sent"] += 1
                except BlockingIOError:
                    pass
            next_round = now + args.interval
        if now >= next_report:
            print(json.dumps(counts), flush=True)
            next_report = now + 1.0
        timeout = max(0.0, min(next_round, next_report) - time.monotonic())
        ready, _, _ = select.select([stdin, *by_fd], [], [], timeout)
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    return 0  # the test closed our stdin: stop
                continue
            p = by_fd[fd]
            for _ in range(64):  # a bounded drain per wake-up
                try:
                    data = p.sock.recv(2048)
                except BlockingIOError:
                    break
                if len(data) >= _LONG.size and data[1] == _RETRY:
                    counts["retries"] += 1
                    p.token = data[_LONG.size :]
                    p.token_at = time.monotonic()
                    p.sock.sendto(p.datagram(), target)
                    counts["sent"] += 1
                elif len(data) >= _LONG.size and data[1] == _RESPONSE:
                    counts["responses"] += 1
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
