"""Transfer benchmark: two real processes move blocks through lanshare.transport.

Does I/O (processes, sockets; the veth runs need root). Each side is an asyncio program with one
transport; the raw-UDP ceiling (bench.udp_ceiling) is measured in the same run for the ratio.
Engines: ``protocol`` (the real sans-IO Endpoint: handshake, reliability, congestion control)
and ``adapter`` (an unreliable AES-GCM blast through the adapter: its overhead alone).

    python -m bench.transfer                          # 1 GiB, loopback + veth, 0 and 1 % loss
    python -m bench.transfer --size 128M --where loopback --engine adapter
    python -m bench.transfer --profile                # py-spy (or cProfile) of each side
    LANSHARE_BENCH_CPROFILE=1 python -m bench.transfer --profile   # C calls timed separately
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import netns, udp_ceiling
from lanshare.config import NetworkConfig, TransferConfig
from lanshare.transport import Addr, Transport, open_transport

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 600.0  # no single transfer may take longer than this
SENDER_CPU, RECEIVER_CPU = 0, 1
DATAGRAM_SIZE = NetworkConfig().max_datagram_size
HEADER = struct.Struct("!QI4x")
TAG_SIZE = 16
END = b"END"


@dataclass(frozen=True, slots=True)
class RunResult:
    where: str
    engine: str
    fast_path: str
    loss_percent: float
    size: int
    seconds: float
    mb_s: float
    sender_cpu_s: float
    receiver_cpu_s: float
    retransmission_ratio: float | None
    sender: dict[str, Any]
    receiver: dict[str, Any]

    def line(self) -> str:
        retx = (
            f"{100 * self.retransmission_ratio:5.2f} %"
            if self.retransmission_ratio is not None
            else "   n/a"
        )
        return (
            f"  {self.engine:<8} {self.where:<8} loss {self.loss_percent:3.1f} %  "
            f"{self.mb_s:7.1f} MB/s  {self.size / 2**20:6.0f} MiB in {self.seconds:6.2f} s  "
            f"cpu tx {self.sender_cpu_s:6.2f} s rx {self.receiver_cpu_s:6.2f} s  retx {retx}  "
            f"[{self.cpu_bound_mb_s:5.0f} MB/s per CPU-second of the busier side]"
        )

    @property
    def cpu_bound_mb_s(self) -> float:
        """What the busier side's CPU time allows: steadier than MB/s on a shared machine."""
        return self.size / max(self.sender_cpu_s, self.receiver_cpu_s, 1e-9) / 1e6


# -- the adapter engine: an AES-GCM blast, no reliability ---------------------------------------


class BlastSender:
    """Emits ``total`` datagrams to ``peer`` as fast as the loop turns, then END markers."""

    def __init__(self, peer: Addr, total: int, key: bytes, batch: int = 64) -> None:
        self.peer = peer
        self.total = total
        self.batch = batch
        self.sent = 0
        self.ends = 0
        self.finished = False
        self._aead = AESGCM(key)
        self._plain = memoryview(os.urandom(DATAGRAM_SIZE - HEADER.size - TAG_SIZE))
        self._now = 0.0

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        pass

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        self._now = now
        if self.sent >= self.total:
            if self.ends < 20:
                self.ends += 1
                return [(END, self.peer)]
            self.finished = True
            return []
        out = []
        encrypt = self._aead.encrypt
        for _ in range(min(self.batch, self.total - self.sent)):
            header = HEADER.pack(self.sent, 1)
            out.append((header + encrypt(header[:12], self._plain, header), self.peer))
            self.sent += 1
        return out

    def get_timer(self) -> float | None:
        if self.finished:
            return None
        # Keep sending every loop turn; END markers go 5 ms apart.
        return self._now + (0.005 if self.sent >= self.total else 0.0)

    def handle_timer(self, now: float) -> None:
        self._now = now

    def next_event(self) -> None:
        return None


class BlastReceiver:
    """Decrypts and counts; finished at the first END marker."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self.received = self.bad = 0
        self.first = self.last = 0.0
        self.finished = False

    def receive_datagrams(
        self, datagrams: Sequence[bytes | memoryview], addr: Addr, now: float
    ) -> None:
        for data in datagrams:
            if data == END:
                self.finished = True
                return
            try:
                self._aead.decrypt(data[:12], data[HEADER.size :], data[: HEADER.size])
            except InvalidTag:
                self.bad += 1
                continue
            if not self.received:
                self.first = now
            self.last = now
            self.received += 1

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        return []

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass

    def next_event(self) -> None:
        return None


async def adapter_child(role: str, options: argparse.Namespace) -> dict[str, Any]:
    key = bytes.fromhex(options.key)
    network = NetworkConfig(port=0, bind=(options.host,), fast_path=options.fast_path)
    transfer = TransferConfig()
    payload = DATAGRAM_SIZE - HEADER.size - TAG_SIZE
    total = -(-options.size // payload)
    endpoint: BlastSender | BlastReceiver
    if role == "send":
        endpoint = BlastSender((options.peer, options.port), total, key)
    else:
        endpoint = BlastReceiver(key)
    transport = await open_transport(
        endpoint, _ignore, network, transfer, disable=_disabled(options)
    )
    async with transport:
        _emit({"port": transport.port})
        started = time.monotonic()
        cpu0 = _cpu()
        transport.kick()
        await _wait(lambda: endpoint.finished, options.timeout, transport)
        elapsed = time.monotonic() - started
        cpu = _cpu() - cpu0
    result: dict[str, Any] = {"cpu_s": cpu, "wall_s": elapsed, "stats": asdict(transport.stats)}
    result["features"] = asdict(transport.features)
    if isinstance(endpoint, BlastReceiver):
        result.update(
            received=endpoint.received,
            bytes=endpoint.received * payload,
            active_s=endpoint.last - endpoint.first,
            bad=endpoint.bad,
        )
    else:
        result.update(sent=endpoint.sent)
    return result


# -- the protocol engine: the real Endpoint, blocks requested and served ------------------------

BLOCK_SIZE = 256 * 1024
DISTINCT_BLOCKS = 16  # block i carries pool[i % 16]: the fetcher knows every hash up front


class BlockPool:
    """Deterministic block contents and their SHA-256, shared by both sides through the key."""

    def __init__(self, key: bytes, block_size: int) -> None:
        seed = hashlib.sha256(key).digest()
        self.blocks = [
            hashlib.shake_256(seed + i.to_bytes(4, "big")).digest(block_size)
            for i in range(DISTINCT_BLOCKS)
        ]
        self.hashes = [hashlib.sha256(b).digest() for b in self.blocks]


async def protocol_child(role: str, options: argparse.Namespace) -> dict[str, Any]:
    from lanshare.events import (
        BlockReceived,
        BlockRequested,
        RequestFailed,
        SessionClosed,
        SessionEstablished,
    )
    from lanshare.protocol import Endpoint

    key = bytes.fromhex(options.key)
    folder = hashlib.sha256(b"folder" + key).digest()[:16]
    network = NetworkConfig(port=0, bind=(options.host,), fast_path=options.fast_path)
    transfer = TransferConfig()
    endpoint = Endpoint(
        transfer, network, node_id=os.urandom(8), folders={folder: key}, rng=random.SystemRandom()
    )
    pool = BlockPool(key, options.block_size)
    count = -(-options.size // options.block_size)
    depth = max(4, 2 * transfer.max_in_flight_size // options.block_size)
    state: dict[str, Any] = {
        "next": 0,
        "outstanding": 0,
        "received": 0,
        "bytes": 0,
        "failed": 0,
        "retried": 0,
        "first": 0.0,
        "last": 0.0,
        "finished": False,
        "error": None,
    }
    pending: dict[int, int] = {}  # request id -> block index
    loop = asyncio.get_running_loop()
    transport: Transport[Any] | None = None

    def request(peer: bytes, index: int) -> None:
        rid = endpoint.request_block(
            peer,
            folder,
            path="bench/blob",
            index=index,
            offset=index * options.block_size,
            size=options.block_size,
            hash=pool.hashes[index % DISTINCT_BLOCKS],
        )
        pending[rid] = index
        state["outstanding"] += 1

    def fill(peer: bytes) -> None:
        while state["outstanding"] < depth and state["next"] < count:
            request(peer, state["next"])
            state["next"] += 1

    def on_event(event: object) -> None:
        if isinstance(event, SessionEstablished):
            if role == "recv":
                state["first"] = loop.time()
                fill(event.peer)
        elif isinstance(event, BlockRequested):
            endpoint.send_block(event.request_id, pool.blocks[event.index % DISTINCT_BLOCKS])
        elif isinstance(event, BlockReceived):
            pending.pop(event.request_id, None)
            state["outstanding"] -= 1
            state["received"] += 1
            state["bytes"] += len(event.data)
            if state["received"] == count:
                state["last"] = loop.time()
                state["finished"] = True
            else:
                fill(event.peer)
        elif isinstance(event, RequestFailed):
            index = pending.pop(event.request_id, None)
            state["outstanding"] -= 1
            state["failed"] += 1
            if index is not None and event.peer is not None and state["retried"] < 100:
                state["retried"] += 1
                request(event.peer, index)
            else:
                state["error"] = f"request failed: {event.reason.name}"
                state["finished"] = True
        elif isinstance(event, SessionClosed):
            if role == "send":
                state["finished"] = True  # the fetcher closes when it has everything
            elif not state["finished"]:
                state["error"] = f"session closed: {event.reason.name}"
                state["finished"] = True
        if transport is not None:
            transport.kick()

    transport = await open_transport(
        endpoint, on_event, network, transfer, disable=_disabled(options)
    )
    async with transport:
        _emit({"port": transport.port})
        cpu0 = _cpu()
        started = time.monotonic()
        if role == "send":
            endpoint.connect((options.peer, options.port), folder)
            transport.kick()
        await _wait(lambda: bool(state["finished"]), options.timeout, transport)
        cpu = _cpu() - cpu0
        wall = time.monotonic() - started
        if role == "recv":
            endpoint.close()
            transport.kick()
            await asyncio.sleep(0.05)  # let the CLOSE leave
    if state["error"]:
        raise SystemExit(f"{role}: {state['error']}")
    stats = endpoint.stats.as_dict()
    sent = max(stats["datagrams_sent"], 1)
    result: dict[str, Any] = {
        "cpu_s": cpu,
        "wall_s": wall,
        "stats": asdict(transport.stats),
        "features": asdict(transport.features),
        "endpoint": stats,
        "retransmission_ratio": stats["fragments_retransmitted"] / sent,
        "failed_requests": state["failed"],
    }
    if role == "recv":
        result.update(bytes=state["bytes"], active_s=state["last"] - state["first"])
    return result


# -- orchestration ------------------------------------------------------------------------------


def run_one(
    engine: str,
    size: int,
    fast_path: str,
    tuning: Sequence[str],
    lab: netns.VethLab | None,
    profile: str | None,
    label: str,
) -> RunResult:
    key = os.urandom(32).hex()
    host_rx = lab.address_b if lab else "127.0.0.1"
    host_tx = lab.address_a if lab else "127.0.0.1"
    common = ["--engine", engine, "--size", str(size), "--key", key, "--fast-path", fast_path]
    common += tuning
    common += ["--timeout", str(RUN_TIMEOUT)]
    receiver = _spawn(
        [*common, "--role", "recv", "--host", host_rx],
        lab.ns_b if lab else None,
        lab,
        RECEIVER_CPU,
        profile and f"{profile}-{label}-receiver",
    )
    sender: subprocess.Popen[str] | None = None
    try:
        port = str(_read_json(receiver)["port"])
        sender = _spawn(
            [*common, "--role", "send", "--host", host_tx, "--peer", host_rx, "--port", port],
            lab.ns_a if lab else None,
            lab,
            SENDER_CPU,
            profile and f"{profile}-{label}-sender",
        )
        _read_json(sender)  # its port line
        got = _read_json(receiver)
        sent = _read_json(sender)
    finally:
        for proc in (sender, receiver):
            if proc is not None:
                _reap(proc)
    seconds = float(got.get("active_s") or got["wall_s"])
    moved = int(got["bytes"])
    retx = sent.get("retransmission_ratio")
    return RunResult(
        where=_where(lab),
        engine=engine,
        fast_path=fast_path,
        loss_percent=lab.loss_percent if lab else 0.0,
        size=moved,
        seconds=seconds,
        mb_s=moved / seconds / 1e6 if seconds else 0.0,
        sender_cpu_s=float(sent["cpu_s"]),
        receiver_cpu_s=float(got["cpu_s"]),
        retransmission_ratio=None if retx is None else float(retx),
        sender=sent,
        receiver=got,
    )


def _spawn(
    args: Sequence[str],
    namespace: str | None,
    lab: netns.VethLab | None,
    cpu: int,
    profile: str | None,
) -> subprocess.Popen[str]:
    python = [sys.executable]
    if profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if Path(py_spy).exists() and not os.environ.get("LANSHARE_BENCH_CPROFILE"):
            python = [py_spy, "record", "--nonblocking", "-r", "400", "-f", "raw"]
            python += ["-o", f"{profile}.folded", "--", sys.executable]
        else:
            python = [sys.executable, "-m", "cProfile", "-o", f"{profile}.pstats"]
    command = [*python, "-m", "bench.transfer", "child", "--cpu", str(cpu), *args]
    if lab is not None and namespace is not None:
        command = lab.command(namespace, command)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()  # children bound their own run time
        if not line:
            code = proc.wait(RUN_TIMEOUT)
            raise RuntimeError(f"benchmark child exited ({code}) without a result")
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result


def _reap(proc: subprocess.Popen[str]) -> None:
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- child process ------------------------------------------------------------------------------


def _child(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["adapter", "protocol"], required=True)
    parser.add_argument("--role", choices=["send", "recv"], required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--peer", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--fast-path", default="auto")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--cpu", type=int, default=-1)
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--disable", default="")
    options = parser.parse_args(argv)
    if 0 <= options.cpu < (os.cpu_count() or 1):
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, {options.cpu})
    child = adapter_child if options.engine == "adapter" else protocol_child
    loop_factory = None
    if options.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(child(options.role, options))
    _emit(result)
    return 0


async def _wait(condition: Callable[[], bool], limit: float, transport: Transport[Any]) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {limit} s: {asdict(transport.stats)}")
        await asyncio.sleep(0.01)


def _disabled(options: argparse.Namespace) -> list[str]:
    return [name.strip() for name in options.disable.split(",") if name.strip()]


def _ignore(event: object) -> None:
    pass


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# -- command line -------------------------------------------------------------------------------


def _veth_run(options: argparse.Namespace, lab: netns.VethLab) -> dict[str, Any]:
    for note in lab.notes:
        print(f"  note: {note}")
    ceiling = udp_ceiling.measure("gso+gro", options.ceiling_seconds, DATAGRAM_SIZE, lab)
    print(ceiling.line(), flush=True)
    label = f"{_where(lab)}-loss{lab.loss_percent:g}"
    drops_before = netns.nft_drops(lab)
    run = run_one(
        options.engine,
        options.size,
        options.fast_path,
        _tuning(options),
        lab,
        options.profile,
        label,
    )
    drops = netns.nft_drops(lab) - drops_before
    print(
        run.line()
        + f"  = {run.mb_s / ceiling.goodput_mb_s:4.0%} of ceiling"
        + (f"  (router dropped {drops})" if lab.loss_percent else ""),
        flush=True,
    )
    return {"run": asdict(run), "ceiling": asdict(ceiling), "router_drops": drops}


def summarize_profile(path: Path, top: int = 14) -> str:
    """The functions with the most samples (self and inclusive) in a py-spy or cProfile file."""
    if path.suffix == ".pstats":
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(str(path), stream=text).sort_stats("tottime").print_stats(top)
        return f"== {path.name}\n{text.getvalue()}"
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"== {path.name}: {total} samples"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        lines.append(f"  -- {title}")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * count / max(total, 1):5.1f} %  {frame}")
    return "\n".join(lines)


def _short_frame(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:123)"; keep function and file name.
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})" if file else name


def _tuning(options: argparse.Namespace) -> list[str]:
    """The options both children get beyond engine, size and fast path."""
    return [
        *("--block-size", str(options.block_size)),
        *("--loop", options.loop),
        *("--disable", options.disable),
    ]


def _where(lab: netns.VethLab | None) -> str:
    if lab is None:
        return "loopback"
    return "veth" if lab.ns_router is None else "routed"


def _parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["child"]:
        return _child(args[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_parse_size, default=2**30, help="bytes (e.g. 128M, 1G)")
    parser.add_argument("--where", choices=["loopback", "veth", "both"], default="both")
    parser.add_argument(
        "--loss", default="0,1", help="loss percents for the routed veth runs (comma-separated)"
    )
    parser.add_argument("--engine", choices=["protocol", "adapter"], default="protocol")
    parser.add_argument("--block-size", type=_parse_size, default=BLOCK_SIZE)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--disable", default="", help="fast-path features to leave off: gso, gro or gso,gro"
    )
    parser.add_argument("--fast-path", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0)
    parser.add_argument("--profile", metavar="PREFIX", nargs="?", const="/tmp/lanshare-profile")
    parser.add_argument("--json", metavar="FILE", help="also write every result here")
    options = parser.parse_args(args)
    losses = [float(x) for x in options.loss.split(",") if x.strip()]
    results: list[dict[str, Any]] = []
    print(
        f"transfer benchmark: engine {options.engine}, fast_path {options.fast_path}, "
        f"{options.loop} loop, disabled: {options.disable or 'nothing'}, "
        f"{options.size / 2**20:.0f} MiB, datagrams of {DATAGRAM_SIZE} bytes, "
        f"{os.cpu_count()} CPUs (sender on CPU{SENDER_CPU}, receiver on CPU{RECEIVER_CPU})",
        flush=True,
    )
    if options.where in ("loopback", "both"):
        ceiling = udp_ceiling.measure("gso+gro", options.ceiling_seconds, DATAGRAM_SIZE)
        print(ceiling.line(), flush=True)
        run = run_one(
            options.engine,
            options.size,
            options.fast_path,
            _tuning(options),
            None,
            options.profile,
            "loopback",
        )
        print(run.line() + f"  = {run.mb_s / ceiling.goodput_mb_s:4.0%} of ceiling", flush=True)
        results.append({"run": asdict(run), "ceiling": asdict(ceiling)})
    if options.where in ("veth", "both"):
        reason = netns.unavailable_reason()
        if reason is not None:
            print(f"  veth: skipped, {reason}")
        else:
            # The direct pair gives the headline figure; the loss runs go through a router
            # namespace (see bench.netns), with its lossless run as their baseline.
            shapes = [(False, 0.0)] + [(True, loss) for loss in losses]
            for routed, loss in shapes:
                with netns.veth_lab(loss_percent=loss, routed=routed) as lab:
                    results.append(_veth_run(options, lab))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1))
    if options.profile:
        for path in sorted(Path(options.profile).parent.glob(Path(options.profile).name + "-*")):
            print(summarize_profile(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
