"""The pure core must not pull in I/O frameworks: import each in a fresh interpreter and look."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE_MODULES = [
    "lanshare.errors",
    "lanshare.paths",
    "lanshare.manifest",
    "lanshare.hashes",
    "lanshare.chunker",
    "lanshare.keys",
    "lanshare.events",
    "lanshare.protocol.wire",
    "lanshare.protocol.crypto",
    "lanshare.protocol.recovery",
    "lanshare.protocol.congestion",
    "lanshare.protocol.connection",
    "lanshare.protocol.endpoint",
    "lanshare.protocol.admission",
    "lanshare.planner",
    "lanshare.deleteguard",
    "lanshare.scheduler",
    "lanshare.peertable",
]
IO_MODULES = ["asyncio", "socket", "zeroconf", "watchdog", "asyncio_dgram", "typer", "sqlite3"]


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in {IO_MODULES!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"


# The engine's parts see each other through protocols: a part imported alone must not pull in
# the engine (nor the other part), or the seams between them would be circular at run time.
ENGINE_PARTS = {
    "lanshare.downloads": ["lanshare.engine", "lanshare.exchange"],
    "lanshare.exchange": ["lanshare.engine", "lanshare.downloads"],
}


@pytest.mark.parametrize("module", sorted(ENGINE_PARTS))
def test_engine_part_imports_neither_the_engine_nor_its_sibling(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in {ENGINE_PARTS[module]!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"
