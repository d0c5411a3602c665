"""The sync engine end to end: real engines, folders and indexes over a simulated network."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from tests.enginesim import Cluster, converge

if TYPE_CHECKING:
    from pathlib import Path


def test_two_nodes_sync_files_dirs_symlinks(tmp_path: Path) -> None:
    async def main() -> None:
        async with Cluster(tmp_path, seed=1) as cluster:
            a, b = cluster.add(), cluster.add()
            a.write("hello.txt", b"hello")
            a.write("dir/sub/data.bin", os.urandom(300_000))
            os.symlink("hello.txt", a.path("link"))
            await cluster.start()
            await converge([a, b], 20)
            assert b.read("hello.txt") == b"hello"

    asyncio.run(main())
