"""The pure core must not pull in I/O frameworks: import each in a fresh interpreter and look."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PURE_MODULES = [
    "lanshare.errors",
    "lanshare.paths",
    "lanshare.manifest",
    "lanshare.protocol",
    "lanshare.events",
    "lanshare.peertable",
]
IO_MODULES = ["asyncio", "socket", "zeroconf", "watchdog", "asyncio_dgram", "typer", "sqlite3"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "lanshare"


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE_DIR / relative).with_suffix(".py").exists() or (
        PACKAGE_DIR / relative / "__init__.py"
    ).exists()


@pytest.mark.parametrize("module", [m for m in PURE_MODULES if _exists(m)])
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
