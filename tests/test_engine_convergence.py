"""Convergence under random operations: 3-5 engines over a lossy, duplicating, reordering
network apply random edits (including concurrent edits of one file) and end identical, and no
content that ever existed is lost (it is in a folder, a conflict copy or ``.lanshare/versions``).

Seeded: each case names its seed; a failure prints it (``converge`` does) with the op log.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from typing import TYPE_CHECKING

import pytest

from tests.enginesim import (
    Cluster,
    Entry,
    LinkSpec,
    SimNode,
    all_contents,
    converge,
    snapshot,
    temp_files,
)

if TYPE_CHECKING:
    from pathlib import Path

LOSSY = LinkSpec(loss=0.03, dup=0.02, reorder=0.1, reorder_delay=0.004, delay=0.001)
ROUNDS = 3
OPS_PER_ROUND = 8
CONVERGE_TIMEOUT = 40.0


def _content(rng: random.Random) -> bytes:
    size = rng.choice([0, 10, 1000, 20_000, 200_000, 600_000])
    return rng.randbytes(size)


def _files(snap: dict[str, Entry]) -> list[str]:
    return sorted(p for p, e in snap.items() if e.kind == "file")


def _apply_round(
    rng: random.Random,
    nodes: list[SimNode],
    round_no: int,
    log: list[str],
    written: set[bytes],
) -> set[int]:
    """Random operations; each path is touched on at most one node per round, except the
    concurrent edits, which touch one path on exactly two nodes (so a third node keeps the
    old content and archives it when the change reaches it)."""
    used: set[str] = set()
    touched: set[int] = set()
    snap = snapshot(nodes[0].root)  # all nodes are identical at the start of a round
    for n in range(OPS_PER_ROUND):
        node = rng.choice(nodes)
        files = [f for f in _files(snap) if f not in used and "sync-conflict" not in f]
        dirs = [*sorted(p for p, e in snap.items() if e.kind == "dir"), ""]
        op = rng.choice(
            [
                "create",
                "create",
                "modify",
                "append",
                "truncate",
                "delete",
                "rename",
                "mkdir",
                "concurrent",
                "concurrent",
            ]
        )
        if op != "create" and op != "mkdir" and not files:
            op = "create"
        if op == "create":
            parent = rng.choice(dirs)
            rel = f"{parent}/f{round_no}_{n}.bin" if parent else f"f{round_no}_{n}.bin"
            data = _content(rng)
            node.write(rel, data)
            written.add(data)
            used.add(rel)
            log.append(f"{node.name} create {rel} {len(data)} {_sha(data)[:8]}")
        elif op == "mkdir":
            parent = rng.choice(dirs)
            rel = f"{parent}/d{round_no}_{n}" if parent else f"d{round_no}_{n}"
            node.path(rel).mkdir(parents=True, exist_ok=True)
            used.add(rel)
            log.append(f"{node.name} mkdir {rel}")
        else:
            rel = rng.choice(files)
            used.add(rel)
            target = node.path(rel)
            if op == "modify":
                data = _content(rng)
                target.write_bytes(data)
            elif op == "append":
                with target.open("ab") as f:
                    f.write(rng.randbytes(rng.choice([1, 5000, 70_000])))
                data = target.read_bytes()
            elif op == "truncate":
                size = target.stat().st_size
                os.truncate(target, rng.randrange(size + 1) if size else 0)
                data = target.read_bytes()
            elif op == "delete":
                target.unlink()
                data = None
            elif op == "rename":
                new = f"{rel.rpartition('/')[0]}/r{round_no}_{n}.bin".lstrip("/")
                used.add(new)
                target.rename(node.path(new))
                data = None
                log.append(f"{node.name} rename {rel} -> {new}")
                touched.add(node.number)
                continue
            else:  # concurrent edits of one file on two nodes before they sync
                other = rng.choice([x for x in nodes if x is not node])
                shas = []
                for who in (node, other):
                    content = _content(rng) + who.name.encode()
                    who.write(rel, content)
                    written.add(content)
                    shas.append(_sha(content)[:8])
                touched.update((node.number, other.number))
                log.append(f"{node.name}+{other.name} concurrent {rel} {' '.join(shas)}")
                continue
            if data is not None:
                written.add(data)
            log.append(f"{node.name} {op} {rel} {_sha(data)[:8] if data is not None else ''}")
        touched.add(node.number)
    return touched


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _where(nodes: list[SimNode]) -> str:
    """Path -> short content hash in the (identical) folders, for the failure log."""
    snap = snapshot(nodes[0].root)
    return " ".join(f"{p}={e.digest[:8]}" for p, e in sorted(snap.items()) if e.kind == "file")


@pytest.mark.parametrize(
    ("seed", "peers"),
    [(11, 3), (12, 4), (13, 5), (14, 3), (15, 4), (16, 8), (17, 10), (19, 6)],
)
def test_random_operations_converge_and_lose_nothing(tmp_path: Path, seed: int, peers: int) -> None:
    async def main() -> None:
        rng = random.Random(seed)
        log: list[str] = []
        written: set[bytes] = set()
        async with Cluster(tmp_path, seed=seed, link=LOSSY) as cluster:
            nodes = [cluster.add() for _ in range(peers)]
            seed_node = nodes[0]
            for i in range(4):
                data = rng.randbytes(rng.choice([100, 50_000, 400_000]))
                seed_node.write(f"base/b{i}.bin" if i % 2 else f"b{i}.bin", data)
                written.add(data)
            await cluster.start()
            await converge(nodes, CONVERGE_TIMEOUT)
            seen = set().union(*(all_contents(n.root) for n in nodes))
            log.append(f"checkpoint: {_where(nodes)}")
            for round_no in range(ROUNDS):
                touched = _apply_round(rng, nodes, round_no, log, written)
                for node in nodes:
                    if node.number in touched:
                        await node.scan()
                try:
                    await converge(nodes, CONVERGE_TIMEOUT)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\nops:\n" + "\n".join(log)) from None
                seen |= set().union(*(all_contents(n.root) for n in nodes))
                log.append(f"checkpoint: {_where(nodes)}")
            kept = set().union(*(all_contents(n.root) for n in nodes))
            lost = ({_sha(d) for d in written} | seen) - kept
            assert not lost, f"seed {seed}: {len(lost)} contents lost; ops:\n" + "\n".join(log)
            # Every download was placed or dropped: no temporary file stays behind.
            leftovers = {n.name: temp_files(n.root) for n in nodes if temp_files(n.root)}
            assert not leftovers, f"seed {seed}: temporary files left: {leftovers}"

    asyncio.run(main())
