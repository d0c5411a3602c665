"""``bench/search.py`` runs end to end on a small index (its figures are not checked)."""

from __future__ import annotations

import subprocess
import sys

from bench import search
from tests.lab import ROOT


def test_the_search_benchmark_prints_each_query_beside_like() -> None:
    result = subprocess.run(
        [sys.executable, "bench/search.py", "--records", "400", "--repeat", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("index: 4"), lines
    assert lines[1].split() == ["query", "hits", "search", "LIKE", "ratio"]
    rows = lines[2:]
    assert [row.split("  ")[0].strip() for row in rows] == [" ".join(q) for q in search.QUERIES]
    assert all("ms" in row and "(LIKE:" in row for row in rows)


def test_a_bad_argument_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "bench/search.py", "--records", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("--peers at least 0")
