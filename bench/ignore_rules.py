"""Ignore rules benchmark: what a scan of a big folder pays to ask its rules about each entry.

Builds in memory the paths of a folder of ``--files`` files (default 100,000) in directories
of 100, named like a real project tree (sources, objects, logs, caches, a ``node_modules``
and a ``build`` among them), and a realistic ``.lanshareignore`` of about twenty lines. Then
asks, as a scan does, about each directory once and each file once, each compiled two ways
over pathspec's ``GitIgnoreSpec``:

* ``pathspec``: pathspec's own regexes, which backtrack (before ``lanshare.globs``);
* ``lanshare``: each line compiled by :func:`lanshare.globs.gitignore_pattern`, as
  ``lanshare.ignore`` does.

Printed: the best of ``--repeat`` runs in seconds for each, per query in microseconds, and
how many entries each ignored (they must agree). Figures from a shared machine are noisy:
read them as diagnostics.

Usage: ``python bench/ignore_rules.py [--files 100000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pathspec import GitIgnoreSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lanshare.globs import gitignore_pattern

if TYPE_CHECKING:
    from collections.abc import Sequence

RULES = """\
# build output and caches
*.o
*.[oa]
*.pyc
__pycache__/
build/
/dist/
target/
node_modules/
.cache/
**/tmp/**
# editors and systems
*.sw?
*~
.DS_Store
Thumbs.db
# logs, but not the one we keep
*.log
!important.log
docs/**/*.pdf
/secrets/
""".splitlines()

NAMES = ["main.c", "main.o", "util.py", "util.pyc", "notes.txt", "run.log", "important.log"]
NAMES += ["photo.jpg", "report.pdf", ".main.c.swp", "draft.txt~", "lib.a", "data.json"]
TOPS = ["src", "docs", "photos", "lib", "music", "projects", "mail", "build", "node_modules", "tmp"]


def folder(files: int) -> list[str]:
    """Queries a scan makes for a tree of ``files`` files: each directory (``/`` ended)
    once, before the files in it."""
    queries: list[str] = []
    per_dir = 100
    for d in range((files + per_dir - 1) // per_dir):
        top = TOPS[d % len(TOPS)]
        directory = f"{top}/part{d // len(TOPS)}/sub{d % 7}"
        queries += [f"{top}/", f"{top}/part{d // len(TOPS)}/", directory + "/"]
        for f in range(min(per_dir, files - d * per_dir)):
            name = NAMES[f % len(NAMES)]
            queries.append(f"{directory}/{f}-{name}")
    return queries


def timed(spec: GitIgnoreSpec, queries: Sequence[str], repeat: int) -> tuple[float, int]:
    """Best seconds over ``repeat`` runs, and how many queries matched."""
    best, ignored = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        ignored = sum(spec.match_file(query) for query in queries)
        best = min(best, time.perf_counter() - start)
    return best, ignored


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.files < 1 or args.repeat < 1:
        parser.error("--files and --repeat must be at least 1")
    queries = folder(args.files)
    own = GitIgnoreSpec.from_lines(RULES, backend="simple")
    ours = GitIgnoreSpec.from_lines(RULES, pattern_factory=gitignore_pattern, backend="simple")
    print(f"{args.files} files, {len(queries)} queries, {len(RULES)} lines")
    results = {
        name: timed(spec, queries, args.repeat)
        for name, spec in [("pathspec", own), ("lanshare", ours)]
    }
    for name, (seconds, ignored) in results.items():
        per = seconds / len(queries) * 1e6
        print(f"{name:>9}: {seconds:6.3f} s  {per:5.2f} µs/query  {ignored} ignored")
    if results["pathspec"][1] != results["lanshare"][1]:
        print("the two disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
