"""The daemon raises its soft limit on open files to the hard one at start (in a child
process started with a low soft limit, so this process keeps its own)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, resource
from lanshare.daemon import raise_descriptor_limit
logging.basicConfig(level=logging.DEBUG, format="%(message)s")
in_force = raise_descriptor_limit()
print(in_force, *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def run_with(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", "--", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_the_soft_limit_is_raised_to_the_hard_one_and_logged() -> None:
    result = run_with(100, 4096)
    assert result.stdout.split() == ["4096", "4096", "4096"]
    assert "open files limit: 4096 (hard 4096)" in result.stderr


def test_a_low_hard_limit_is_kept_as_it_is() -> None:
    result = run_with(256, 256)
    assert result.stdout.split() == ["256", "256", "256"]
