"""Ordered set of integers kept as disjoint half-open ranges (packet numbers, request ids).

Pure: no I/O. Appending just above the highest range is O(1), the common case for packet
numbers arriving in order; the number of ranges is bounded (the lowest ones are forgotten).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class RangeSet:
    """Disjoint, sorted, half-open ``[start, stop)`` ranges of non-negative integers."""

    __slots__ = ("_max_ranges", "_starts", "_stops")

    def __init__(self, max_ranges: int = 1 << 30) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self._max_ranges = max_ranges

    def add(self, start: int, stop: int | None = None) -> None:
        """Add ``[start, stop)`` (``stop`` defaults to ``start + 1``)."""
        if stop is None:
            stop = start + 1
        if stop <= start:
            return
        starts, stops = self._starts, self._stops
        if not stops or start > stops[-1]:
            starts.append(start)
            stops.append(stop)
        elif start == stops[-1]:
            stops[-1] = stop
        else:
            # General case: merge with every range that touches [start, stop).
            i = bisect_right(stops, start - 1)  # first range whose stop >= start
            j = i
            while j < len(starts) and starts[j] <= stop:
                j += 1
            if i == j:
                starts.insert(i, start)
                stops.insert(i, stop)
            else:
                new_start = min(start, starts[i])
                new_stop = max(stop, stops[j - 1])
                starts[i:j] = [new_start]
                stops[i:j] = [new_stop]
        if len(starts) > self._max_ranges:
            del starts[0], stops[0]

    def __contains__(self, value: int) -> bool:
        i = bisect_right(self._starts, value) - 1
        return i >= 0 and value < self._stops[i]

    def covers(self, start: int, stop: int) -> bool:
        """True when every integer of ``[start, stop)`` is in the set."""
        i = bisect_right(self._starts, start) - 1
        return i >= 0 and stop <= self._stops[i]

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._starts, self._stops, strict=True)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def descending(self) -> Iterator[tuple[int, int]]:
        """The ranges from the highest down."""
        return zip(reversed(self._starts), reversed(self._stops), strict=True)

    def discard_below(self, value: int) -> None:
        """Forget every integer below ``value``."""
        starts, stops = self._starts, self._stops
        while starts and stops[0] <= value:
            del starts[0], stops[0]
        if starts and starts[0] < value:
            starts[0] = value

    @property
    def highest(self) -> int:
        """The largest member; raises ``IndexError`` when empty."""
        return self._stops[-1] - 1

    @property
    def lowest(self) -> int:
        """The smallest member; raises ``IndexError`` when empty."""
        return self._starts[0]
