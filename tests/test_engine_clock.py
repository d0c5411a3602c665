"""The engine reads the time and waits only through the clock it is given."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lanshare.clock import LoopClock
from tests.enginesim import Cluster, converge, random_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from lanshare.clock import Timer

WALL = 1_000_000_000.0
"""2001-09-09 01:46:40 UTC: a wall-clock time no test machine has now."""


class RecordingClock(LoopClock):
    """The loop's clock, with a wall clock stopped at ``WALL``; counts the waits asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps = 0
        self.timers = 0

    def time(self) -> float:
        return WALL

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        await super().sleep(seconds)

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        self.timers += 1
        return super().call_later(delay, callback)


def test_wall_time_sleeps_and_timers_come_from_the_injected_clock(tmp_path: Path) -> None:
    """B deletes what A deleted at B's clock's wall time (its deletion history and the
    version it keeps say so), records its own user's deletion at that time too, and plans,
    ticks and announces with that clock's waits."""

    async def main() -> None:
        async with Cluster(tmp_path, seed=41) as cluster:
            a = cluster.add()
            clock = RecordingClock()
            b = cluster.add(clock=clock)
            a.write("big.bin", random_bytes(41, 3 << 20))  # blocks to announce while fetched
            a.write("gone.txt", b"soon deleted")
            a.write("mine.txt", b"deleted on B")
            await cluster.start()
            await converge([a, b], 60)
            a.path("gone.txt").unlink()
            await a.scan()
            await converge([a, b], 60)
            assert b.index is not None
            deletions = await asyncio.to_thread(b.index.deletions, b.folder.info.id)
            assert [d.at for d in deletions] == [WALL]
            versions = [p.name for p in (b.root / ".lanshare" / "versions").rglob("*.txt")]
            assert versions == ["gone~20010909-014640.txt"]
            b.path("mine.txt").unlink()
            await b.scan()
            deletions = await asyncio.to_thread(b.index.deletions, b.folder.info.id)
            assert [d.at for d in deletions] == [WALL, WALL]
            assert clock.sleeps > 0
            assert clock.timers > 0

    asyncio.run(main())


ENGINE_MODULES = ["engine.py", "downloads.py", "exchange.py"]
CLOCK_CALLS = {("time", "time"), ("time", "monotonic"), ("asyncio", "sleep")}
LOOP_TIMERS = {"call_later", "call_at", "time"}


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_engine_modules_read_no_clock_but_their_own(name: str) -> None:
    source = Path(__file__).parent.parent / "lanshare" / name
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner, attr = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and (owner.id, attr) in CLOCK_CALLS:
            found.append(f"{owner.id}.{attr} (line {node.lineno})")
        elif attr in LOOP_TIMERS and not _is_clock(owner):
            found.append(f"{ast.unparse(node.func)} (line {node.lineno})")
    assert not found, f"{name} reads a clock of its own: {found}"


def _is_clock(owner: ast.expr) -> bool:
    """``….clock.time()`` and ``….clock.call_later()`` are the injected clock's."""
    return isinstance(owner, ast.Attribute) and owner.attr == "clock"
