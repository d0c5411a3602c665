"""The mass-deletion guard: whether deletions about to be made must pause a folder.

Pure: no I/O, no clock. The caller passes the deletion history (kept in the index), the
deletions it is about to make and ``now`` (wall-clock seconds, so that a history kept across
a restart stays meaningful); this module returns the verdict and keeps the history bounded.

Theory of operation
-------------------
1. **A sliding window.** Judging one planning pass or one scan at a time lets a wipe through
   in batches just under the limit. So every deletion made in a folder (removed here because
   a peer deleted it, or found gone by a scan of this node) is kept in a history as
   :class:`Deletion` entries: when, how many, which device made them (:data:`LOCAL` for
   this node) and how many live entries the folder held just before. Entries older than
   ``window`` seconds no longer count and are dropped when the history is next written.
2. **The verdict.** Pending deletions pause the folder when the deletions of the window plus
   the pending ones reach ``minimum`` *and* exceed ``ratio`` of the live entries at the start
   of the window: the entries held just before the window's first deletion (or, with none
   in the window, the entries held now, pending ones included). Files created after a wipe
   started therefore do not dilute it, while a user who deletes a few files now and then
   never reaches the limit. Deletions that pause are withheld whole, none of them is made.
3. **Who deleted.** Each entry names its origin, so the reason says which peer (by name, as
   discovery knows it, and by id) or this node made the deletions.
4. **A pause lasts** until the user confirms or the files come back, not until the window
   slides on: once the guard trips, the caller keeps judging as of that moment (passes that
   ``now``) while deletions are held back. **Confirmation** (``lanshare resume``) is the
   caller's too: it makes the withheld deletions and then clears this node's history, so
   the same deletions never pause again; other nodes keep their own history and stay
   paused until their own users confirm.
5. **Bounded.** Besides the window, an entry is merged into the newest one of the same
   origin when that one is younger than ``window / MERGE_SLOTS``, keeping the later time
   (a deletion then counts a little longer, never shorter): at most about ``MERGE_SLOTS``
   entries per origin and window, however the deletions trickle in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from lanshare.config import SyncConfig

LOCAL: Final = b""
"""The origin of deletions made on this node (a peer's origin is its 8-byte node id)."""

DEFAULT_RATIO: Final = 0.5
DEFAULT_MINIMUM: Final = 100
DEFAULT_WINDOW: Final = 3600.0
MERGE_SLOTS: Final = 60
"""Entries of one origin per window at most, about (see the module docstring, step 5)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The guard's settings (``[sync]`` max_delete_ratio, max_delete_min, delete_window)."""

    ratio: float = DEFAULT_RATIO
    minimum: int = DEFAULT_MINIMUM
    window: float = DEFAULT_WINDOW

    @classmethod
    def of(cls, sync: SyncConfig) -> Limits:
        """The limits the config's ``[sync]`` table sets."""
        return cls(sync.max_delete_ratio, sync.max_delete_min, sync.delete_window)


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class Deletion:
    """``count`` entries of a folder deleted at ``at`` (wall-clock seconds) by ``origin``,
    when the folder held ``live_before`` live entries."""

    at: float
    origin: bytes
    count: int
    live_before: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why pending deletions pause a folder."""

    deleted: int
    """Deletions of the window and pending ones together."""
    entries: int
    """Live entries at the start of the window."""
    withheld: int
    """Pending deletions, held back."""
    origins: tuple[tuple[bytes, int], ...]
    """Who made the deletions counted in ``deleted``, most first."""
    limits: Limits

    def reason(self, names: Mapping[bytes, str] | None = None) -> str:
        """The one-line reason ``status`` shows; ``names`` are the peers' names by node id."""
        share = self.deleted / self.entries if self.entries else 1.0
        by = ", ".join(f"{n} {_origin(o, names or {})}" for o, n in self.origins)
        return (
            f"{self.deleted} of {self.entries} entries ({share:.0%}) deleted within "
            f"{_duration(self.limits.window)}, more than the limit of {self.limits.ratio:.0%} "
            f"({by}); {self.withheld} deletion(s) withheld and the folder is paused (a disk not "
            "mounted or a mistaken mass deletion?). Restore the files, or confirm on this "
            "machine with `lanshare resume`."
        )


def in_window(history: Iterable[Deletion], now: float, window: float) -> list[Deletion]:
    """The entries of ``history`` that still count at ``now``, in their order.

    A clock set back by up to a window keeps counting what it recorded (a wipe must not get
    through because NTP corrected the clock); an entry stamped more than a window ahead was
    written under a clock far wrong (a Raspberry Pi without a clock, a year ahead) and would
    pause every deletion until the clock caught up with it, so it no longer counts."""
    return [d for d in history if now - window < d.at <= now + window]


def judge(
    history: Iterable[Deletion],
    pending: Mapping[bytes, int],
    live: int,
    now: float,
    limits: Limits,
) -> Verdict | None:
    """The verdict on making ``pending`` deletions (by origin) now, or None if they may go.

    Args:
        history: the folder's deletion history in the order it was recorded (entries
            outside the window are ignored).
        pending: deletions about to be made, by origin.
        live: live entries of the folder now, the pending deletions included.
        now: wall-clock seconds.
        limits: the guard's settings.
    """
    withheld = sum(pending.values())
    if withheld == 0:
        return None
    recent = in_window(history, now, limits.window)
    entries = recent[0].live_before if recent else live
    deleted = withheld + sum(d.count for d in recent)
    if deleted < limits.minimum or deleted <= limits.ratio * entries:
        return None
    origins: dict[bytes, int] = {}
    for origin, count in [(d.origin, d.count) for d in recent] + list(pending.items()):
        if count:
            origins[origin] = origins.get(origin, 0) + count
    ranked = tuple(sorted(origins.items(), key=lambda item: (-item[1], item[0])))
    return Verdict(deleted, entries, withheld, ranked, limits)


def record(history: Iterable[Deletion], entry: Deletion, window: float) -> list[Deletion]:
    """The history to keep once ``entry`` is added: entries that left the window at
    ``entry.at`` dropped, ``entry`` appended or merged (module docstring, step 5)."""
    kept = in_window(history, entry.at, window)
    if entry.count <= 0:
        return kept
    for i in range(len(kept) - 1, -1, -1):
        last = kept[i]
        if last.origin != entry.origin:
            continue
        if entry.at - last.at < window / MERGE_SLOTS:
            # In place: the entry keeps its rank (and its live count) as the first deletion
            # of its run, and the later time, so that none of its deletions leaves early.
            kept[i] = replace(last, at=max(last.at, entry.at), count=last.count + entry.count)
            return kept
        break
    return [*kept, entry]


def _origin(origin: bytes, names: Mapping[bytes, str]) -> str:
    if origin == LOCAL:
        return "made here"
    name = names.get(origin, "")
    return f"by peer {name} ({origin.hex()})" if name else f"by peer {origin.hex()}"


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        hours = int(seconds // 3600)
        return "1 hour" if hours == 1 else f"{hours} hours"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"
