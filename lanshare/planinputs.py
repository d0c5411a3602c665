"""What a planning pass reads from the index: the records of the paths a plan can change, a
bounded batch at a time, and the rest of the folder as a ``planner.LocalContext`` answered by
index queries.

Blocking (SQLite): call :func:`deletions`, :func:`conflict_copies` and ``next`` on
:func:`batches` in a worker thread, and run the plans there too, since the context's answers
are index queries.

Theory of operation
-------------------
* **Only what can change.** A path needs an action only when some peer holds another record
  of it than ours (``Index.paths_to_plan``: one query comparing the stored columns, which are
  canonical encodings, so equal columns are equal records). Only those paths' records, local
  and remote, are decoded, with the local records of their ancestors (the planner's structure
  checks look at parents). In a folder in sync that is nothing at all, whatever its size.
* **A batch at a time.** A pass reads those paths :data:`BATCH_PATHS` at a time in path order
  (one indexed range query each, no sort of them all) and plans each batch on its own, so its
  memory does not grow with how many records peers announce (a peer may announce millions).
  The engine applies a batch before reading the next. What crosses batches is judged as the
  whole pass would: the delete guard gets the pass's deletions, counted first over the only
  paths a plan can delete (:func:`deletions`), and a directory whose entries a later batch
  deletes is left for the next pass (``planner`` reports it meanwhile).
* **Fetches, bounded.** A pass hands on to the downloads the fetches of downloads in hand
  and of paths asked for first, and at most :data:`FETCHES_PER_PASS` others (and as many
  that failed lately): a pass's fetches, each with its record, would otherwise grow with
  what peers announce. The rest wait for the pass the downloads ask for when they run out
  (:class:`Fetches`).
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
    from collections.abc import Callable, Collection, Iterator, Mapping

    from lanshare.index import Index
    from lanshare.manifest import FileRecord

BATCH_PATHS = 2000
"""Paths planned together: a batch's records, decoded, are a few MB at most."""
FETCHES_PER_PASS = 20_000
"""Fetches one pass hands to the downloads besides those it must (:class:`Fetches`)."""


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """The inputs of one plan: a batch of the paths of one folder to plan."""

    local: dict[str, FileRecord]
    """Local records of the paths to plan and of their ancestors."""
    remotes: dict[bytes, dict[str, FileRecord]]
    """Every peer's records of the paths to plan, by peer and path."""
    paths: frozenset[str]
    """The paths to plan."""
    context: planner.LocalContext
    """The rest of the local folder, answered from the index."""


def batches(index: Index, folder: int, also: Collection[str] = ()) -> Iterator[PlanInputs]:
    """The inputs of a pass over ``folder``: the paths some peer holds another record of,
    and ``also`` (paths whose peers' records the caller adds, e.g. downloads in progress), in
    batches of at most :data:`BATCH_PATHS` paths in path order (``also`` first, on their own),
    each path in one batch. Each batch is read when the previous one was taken, so what is
    applied meanwhile is seen by the batches that follow."""
    extra = set(also)
    if extra:
        yield _load(index, folder, extra)
    after = ""
    while True:
        page = index.paths_to_plan(folder, after, BATCH_PATHS)
        if not page:
            return
        after = page[-1]
        paths = {p for p in page if p not in extra}
        if paths:
            yield _load(index, folder, paths)


def deletions(
    index: Index,
    folder: int,
    also: Collection[str],
    plan: Callable[[PlanInputs], planner.Plan],
    local_short_id: int,
) -> planner.PassDeletions:
    """The deletions a pass over ``folder`` would make, by origin, and the live entries it
    starts from: ``plan`` (the pass's plan, without the delete guard) over the only paths a
    plan can delete (live here, deleted at some peer), a batch at a time, and over ``also``.
    """
    counts: dict[bytes, int] = {}
    live = index.live_count(folder)
    extra = set(also)
    first = True
    after = ""
    while True:
        page = index.paths_to_plan(folder, after, BATCH_PATHS, deleting=True)
        paths = {p for p in page if p not in extra} | (extra if first else set())
        first = False
        if paths:
            made = plan(_load(index, folder, paths))
            for origin, count in planner.deletions(made.actions, local_short_id).items():
                counts[origin] = counts.get(origin, 0) + count
        if not page:
            return planner.PassDeletions(counts, live)
        after = page[-1]


def conflict_copies(index: Index, folder: int) -> frozenset[str]:
    """The live local conflict copies (``planner.conflict_original`` names their originals)."""
    return frozenset(
        path
        for path in index.live_paths_containing(folder, planner.CONFLICT_MARKER)
        if planner.conflict_original(path) is not None
    )


def _load(index: Index, folder: int, paths: Collection[str]) -> PlanInputs:
    wanted = set(paths)
    for path in paths:
        parts = path.split("/")
        wanted.update("/".join(parts[:i]) for i in range(1, len(parts)))
    context = planner.LocalContext(
        live_count=index.live_count(folder),
        live_below=functools.partial(index.live_below, folder),
        # Peers' paths of other batches are taken names too.
        exists=functools.partial(index.path_known, folder),
        block_source=functools.partial(index.block_source, folder),
    )
    return PlanInputs(
        local=index.get_many(folder, sorted(wanted)),
        remotes=index.remote_records_of(folder, sorted(paths)),
        paths=frozenset(paths),
        context=context,
    )


class Fetches:
    """The fetches a pass hands to its downloads, chosen as its batches are planned: every
    one that ``must`` accepts (a download in hand, a path asked for first: few), up to
    :data:`FETCHES_PER_PASS` of those that ``failing`` accepts (failed lately: handed on so
    their partial downloads are kept, not started), and the first :data:`FETCHES_PER_PASS`
    others, so that what waits for a download slot is bounded too. The downloads ask for a
    pass when they run out, which chooses the next ones."""

    def __init__(self, must: Callable[[str], bool], failing: Callable[[str], bool]) -> None:
        self.must = must
        self.failing = failing
        self.chosen: list[tuple[planner.Fetch, planner.Conflict | None]] = []
        self.remotes: dict[bytes, dict[str, FileRecord]] = {}
        """The peers' records of the chosen paths (what the downloads need of them)."""
        self.others = 0
        self.failed = 0
        self.cut = False
        """Some fetch was left for a later pass."""

    def offer(
        self,
        fetch: planner.Fetch,
        conflict: planner.Conflict | None,
        remotes: Mapping[bytes, Mapping[str, FileRecord]],
    ) -> None:
        if self.must(fetch.path):
            pass
        elif self.failing(fetch.path) and self.failed < FETCHES_PER_PASS:
            self.failed += 1
        elif self.others < FETCHES_PER_PASS:
            self.others += 1
        else:
            self.cut = True
            return
        self.chosen.append((fetch, conflict))
        for peer, records in remotes.items():
            record = records.get(fetch.path)
            if record is not None:
                self.remotes.setdefault(peer, {})[fetch.path] = record
