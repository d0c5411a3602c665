"""Running code that must finish in a child process the test can give up on: a regex match
cannot be interrupted in-process, a child that outlives the guard is killed."""

from __future__ import annotations

import subprocess
import sys

import pytest

GUARD = 60.0
"""Seconds a child may run: hundreds of times what a bounded match takes on a busy machine,
a tiny fraction of what the backtracking it guards against took (minutes to centuries)."""


def run_python(code: str, *args: str) -> str:
    """Run ``code`` with ``args`` in a fresh interpreter; its stdout. Fails the test if the
    child has not finished within :data:`GUARD` or exits with an error."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=GUARD,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still matching after {GUARD:.0f} s")
    assert done.returncode == 0, done.stderr
    return done.stdout
