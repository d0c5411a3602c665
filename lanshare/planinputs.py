"""What a planning pass reads from the index: the records of the paths a plan can change, and
the rest of the folder as a ``planner.LocalContext`` answered by index queries.

Blocking (SQLite): call :func:`load` in a worker thread, and run the plan there too, since the
context's answers are index queries.

Theory of operation
-------------------
* **Only what can change.** A path needs an action only when some peer holds another record
  of it than ours (``Index.paths_to_plan``: one query comparing the stored columns, which are
  canonical encodings, so equal columns are equal records). Only those paths' records, local
  and remote, are decoded, with the local records of their ancestors (the planner's structure
  checks look at parents). In a folder in sync that is nothing at all, whatever its size.
* **The rest of the folder, on demand.** The live count (the delete guard's base), whether a
  directory keeps live entries, whether a name is taken (for conflict copies) and where a
  block lies (for building files from local data) are index queries, asked only for the
  paths and blocks the plan is deciding about (``local_blocks`` is indexed by hash).
* **Conflict copies held here** are found by name in the index, not by reading every record.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lanshare import planner

if TYPE_CHECKING:
    from collections.abc import Collection

    from lanshare.index import Index
    from lanshare.manifest import FileRecord


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """The inputs of one planning pass of one folder."""

    local: dict[str, FileRecord]
    """Local records of the paths to plan and of their ancestors."""
    remotes: dict[bytes, dict[str, FileRecord]]
    """Every peer's records of the paths to plan, by peer and path."""
    context: planner.LocalContext
    """The rest of the local folder, answered from the index."""
    conflict_copies: frozenset[str]
    """Live local conflict copies (``planner.conflict_original`` names their originals)."""


def load(index: Index, folder: int, also: Collection[str] = ()) -> PlanInputs:
    """The inputs to plan ``folder`` with: the paths some peer holds another record of,
    and ``also`` (paths whose peers' records the caller adds, e.g. downloads in progress)."""
    paths = {*index.paths_to_plan(folder), *also}
    wanted = set(paths)
    for path in paths:
        parts = path.split("/")
        wanted.update("/".join(parts[:i]) for i in range(1, len(parts)))
    context = planner.LocalContext(
        live_count=index.live_count(folder),
        live_below=functools.partial(index.live_below, folder),
        exists=functools.partial(index.has_record, folder),
        block_source=functools.partial(index.block_source, folder),
    )
    copies = frozenset(
        path
        for path in index.live_paths_containing(folder, planner.CONFLICT_MARKER)
        if planner.conflict_original(path) is not None
    )
    return PlanInputs(
        local=index.get_many(folder, sorted(wanted)),
        remotes=index.remote_records_of(folder, sorted(paths)),
        context=context,
        conflict_copies=copies,
    )
