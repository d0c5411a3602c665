"""The raw-UDP ceiling: a Python blast with AES-GCM per datagram and no reliability.

Does I/O (two processes, blocking sockets; the veth variant needs root). Two variants: one
syscall per datagram (``sendto``/``recvfrom_into``), and UDP GSO sends with UDP GRO receives.
The sender is unpaced; goodput is what the receiver decrypted, per second of its active time.

    python -m bench.udp_ceiling                   # loopback and (as root) veth, both variants
    python -m bench.udp_ceiling --where loopback --seconds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.netns import VethLab

ROOT = Path(__file__).resolve().parent.parent
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
HEADER = struct.Struct("!QI4x")  # packet number, run id, padding: 16 bytes, the AEAD AAD
TAG_SIZE = 16
END = b"END"
SOCKET_BUFFER = 4 * 1024 * 1024
DEFAULT_SIZE = 1452  # lanshare's default max_datagram_size
CHILD_TIMEOUT = 60.0
IDLE_TIMEOUT = 2.0  # a receiver that has heard nothing for this long stops
SENDER_CPU, RECEIVER_CPU = 0, 1


@dataclass(frozen=True, slots=True)
class CeilingResult:
    where: str
    variant: str
    size: int
    goodput_mb_s: float
    """Decrypted payload bytes per second of the receiver's active time, 10^6 bytes."""
    sent: int
    received: int
    loss_percent: float
    sender_cpu_s: float
    receiver_cpu_s: float
    active_s: float
    recv_calls: int

    def line(self) -> str:
        return (
            f"  ceiling {self.where:<8} {self.variant:<9} {self.goodput_mb_s:7.1f} MB/s  "
            f"loss {self.loss_percent:5.2f} %  cpu tx {self.sender_cpu_s:5.2f} s "
            f"rx {self.receiver_cpu_s:5.2f} s  ({self.received / max(self.recv_calls, 1):.1f} "
            f"dgrams/recv)"
        )


# -- orchestration ------------------------------------------------------------------------------


def measure(
    variant: str,
    seconds: float,
    size: int,
    lab: VethLab | None = None,
) -> CeilingResult:
    """Run one receiver and one sender process; loopback when ``lab`` is None."""
    gso = variant == "gso+gro"
    key = os.urandom(32).hex()
    recv_host = lab.address_b if lab else "127.0.0.1"
    common = ["--size", str(size), "--key", key]
    receiver_args = [*common, "--role", "recv", "--host", recv_host, "--seconds", str(seconds)]
    if gso:
        receiver_args.append("--gro")
    receiver = _spawn(receiver_args, lab.ns_b if lab else None, lab)
    sender: subprocess.Popen[str] | None = None
    try:
        ready = _read_json(receiver)
        sender_args = [*common, "--role", "send", "--host", recv_host]
        sender_args += ["--port", str(ready["port"]), "--seconds", str(seconds)]
        if gso:
            sender_args.append("--gso")
        sender = _spawn(sender_args, lab.ns_a if lab else None, lab)
        sent = _read_json(sender)
        got = _read_json(receiver)
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                _reap(proc)
    received = int(got["received"])
    active = float(got["active_s"]) or 1e-9
    return CeilingResult(
        where="loopback" if lab is None else "veth" if lab.ns_router is None else "routed",
        variant=variant,
        size=size,
        goodput_mb_s=received * (size - HEADER.size - TAG_SIZE) / active / 1e6,
        sent=int(sent["sent"]),
        received=received,
        loss_percent=100.0 * (1 - received / max(int(sent["sent"]), 1)),
        sender_cpu_s=float(sent["cpu_s"]),
        receiver_cpu_s=float(got["cpu_s"]),
        active_s=active,
        recv_calls=int(got["recv_calls"]),
    )


def _spawn(
    args: Sequence[str], namespace: str | None, lab: VethLab | None
) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.udp_ceiling", "child", *args]
    if lab is not None and namespace is not None:
        command = lab.command(namespace, command)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child bounds its own run time
    if not line:
        raise RuntimeError(f"benchmark child exited ({proc.wait(CHILD_TIMEOUT)}) without output")
    result: dict[str, Any] = json.loads(line)
    return result


def _reap(proc: subprocess.Popen[str]) -> None:
    try:
        proc.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- the child processes ------------------------------------------------------------------------


def run_sender(host: str, port: int, seconds: float, size: int, key: bytes, gso: bool) -> None:
    _pin(SENDER_CPU)
    aead = AESGCM(key)
    plain_size = size - HEADER.size - TAG_SIZE
    source = memoryview(os.urandom(1 << 20))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    addr = (host, port)
    segments = min(64, 65507 // size) if gso else 1
    buffer = bytearray(size * segments)
    view = memoryview(buffer)
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
    sent = 0
    offset = 0
    cpu0 = _cpu()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(64 // segments or 1):
            for i in range(segments):
                at = i * size
                HEADER.pack_into(buffer, at, sent, 1)
                if offset + plain_size > len(source):
                    offset = 0
                aead.encrypt_into(
                    view[at : at + 12],
                    source[offset : offset + plain_size],
                    view[at : at + HEADER.size],
                    view[at + HEADER.size : at + size],
                )
                offset += plain_size
                sent += 1
            if gso:
                sock.sendmsg([buffer], cmsg, 0, addr)
            else:
                sock.sendto(buffer, addr)
    cpu = _cpu() - cpu0
    for _ in range(20):  # the receiver stops at the first marker that gets through
        sock.sendto(END, addr)
        time.sleep(0.005)
    sock.close()
    _emit({"sent": sent, "cpu_s": cpu})


def run_receiver(host: str, seconds: float, size: int, key: bytes, gro: bool) -> None:
    _pin(RECEIVER_CPU)
    aead = AESGCM(key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    if gro:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    # SO_RCVTIMEO rather than settimeout(): a Python timeout polls before every recv.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 1, 0))
    sock.bind((host, 0))
    _emit({"port": sock.getsockname()[1]})
    buffer = bytearray(1 << 17)
    view = memoryview(buffer)
    plain = bytearray(size)
    plain_view = memoryview(plain)
    cmsg_space = socket.CMSG_SPACE(4)
    received = calls = bad = 0
    first = last = 0.0
    cpu0 = _cpu()
    give_up = time.monotonic() + seconds + CHILD_TIMEOUT / 2
    while time.monotonic() < give_up:
        try:
            if gro:
                nbytes, ancdata, _flags, _addr = sock.recvmsg_into([buffer], cmsg_space)
            else:
                nbytes, _addr = sock.recvfrom_into(buffer)
                ancdata = []
        except (BlockingIOError, TimeoutError):
            if first and time.monotonic() - last > IDLE_TIMEOUT:
                break
            continue
        if nbytes == len(END) and view[:nbytes] == END:
            break
        now = time.monotonic()
        if not first:
            first = now
        last = now
        calls += 1
        segment = nbytes
        for level, kind, data in ancdata:
            if level == SOL_UDP and kind == UDP_GRO:
                segment = int.from_bytes(data[:4], sys.byteorder) or nbytes
        for at in range(0, nbytes, segment):
            end = min(at + segment, nbytes)
            try:
                aead.decrypt_into(
                    view[at : at + 12],
                    view[at + HEADER.size : end],
                    view[at : at + HEADER.size],
                    plain_view[: end - at - HEADER.size - TAG_SIZE],
                )
            except InvalidTag:  # counted, not fatal
                bad += 1
                continue
            received += 1
    cpu = _cpu() - cpu0
    sock.close()
    _emit(
        {
            "received": received,
            "bad": bad,
            "recv_calls": calls,
            "active_s": last - first,
            "cpu_s": cpu,
        }
    )


def _pin(cpu: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(0, {cpu})


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# -- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["child"]:
        return _child(args[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--where", choices=["loopback", "veth", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    options = parser.parse_args(args)
    from bench import netns

    print(f"raw UDP ceiling, AES-256-GCM per {options.size}-byte datagram, unpaced")
    if options.where in ("loopback", "both"):
        for variant in ("plain", "gso+gro"):
            print(measure(variant, options.seconds, options.size).line(), flush=True)
    if options.where in ("veth", "both"):
        reason = netns.unavailable_reason()
        if reason is not None:
            print(f"  veth: skipped, {reason}")
            return 0
        with netns.veth_lab() as lab:
            for note in lab.notes:
                print(f"  note: {note}")
            for variant in ("plain", "gso+gro"):
                print(measure(variant, options.seconds, options.size, lab).line(), flush=True)
    return 0


def _child(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["send", "recv"], required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--gso", action="store_true")
    parser.add_argument("--gro", action="store_true")
    o = parser.parse_args(argv)
    key = bytes.fromhex(o.key)
    if o.role == "send":
        run_sender(o.host, o.port, o.seconds, o.size, key, o.gso)
    else:
        run_receiver(o.host, o.seconds, o.size, key, o.gro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
