"""Loss recovery after RFC 9002: RTT estimation, sent-packet tracking, loss detection, PTO.

Pure: no I/O; times are the caller's. Each packet's bookkeeping is one tuple
``(pn, sent_time, size, a, b)`` (``a``/``b`` belong to the connection: the message and
fragment a DATA packet carried, or the control frames of any other packet). Processing an ACK
costs O(newly acknowledged packets + open gaps), never O(window).
"""

from __future__ import annotations

from collections import deque
from typing import Any, TypeAlias

#: RFC 9002 §6.1.1 kPacketThreshold.
PACKET_THRESHOLD = 3
#: RFC 9002 §6.1.2 kTimeThreshold.
TIME_THRESHOLD = 9 / 8

SentRecord: TypeAlias = tuple[int, float, int, Any, int]


class RttEstimator:
    """RFC 9002 §5: smoothed RTT, RTT variation, minimum RTT."""

    __slots__ = ("has_sample", "latest_rtt", "min_rtt", "rttvar", "srtt")

    def __init__(self, initial_rtt: float) -> None:
        self.srtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.min_rtt = float("inf")
        self.latest_rtt = 0.0
        self.has_sample = False

    def update(self, latest_rtt: float, ack_delay: float) -> None:
        """Feed one sample (RFC 9002 §5.3); ``ack_delay`` is what the peer reported."""
        latest_rtt = max(latest_rtt, 0.0)
        self.latest_rtt = latest_rtt
        if latest_rtt < self.min_rtt:
            self.min_rtt = latest_rtt
        if not self.has_sample:
            self.has_sample = True
            self.srtt = latest_rtt
            self.rttvar = latest_rtt / 2
            return
        adjusted = latest_rtt
        if latest_rtt >= self.min_rtt + ack_delay:
            adjusted = latest_rtt - ack_delay
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - adjusted)
        self.srtt = 0.875 * self.srtt + 0.125 * adjusted

    def pto(self, max_ack_delay: float, granularity: float) -> float:
        """The base probe timeout (RFC 9002 §6.2.1), before exponential backoff."""
        return self.srtt + max(4 * self.rttvar, granularity) + max_ack_delay

    def loss_delay(self, granularity: float) -> float:
        """Time threshold for declaring a packet lost (RFC 9002 §6.1.2)."""
        return max(TIME_THRESHOLD * max(self.srtt, self.latest_rtt), granularity)


class SentPackets:
    """Ack-eliciting packets in flight, indexed by packet number, plus the open gaps.

    Packet numbers are handed in strictly increasing by one (``on_sent``); packets that are
    not ack-eliciting are registered with ``skip`` so the index stays dense.
    """

    __slots__ = (
        "_base",
        "_gaps",
        "_head",
        "_recs",
        "bytes_in_flight",
        "in_flight",
        "largest_acked",
        "last_sent_time",
        "loss_time",
    )

    def __init__(self) -> None:
        self._recs: list[SentRecord | None] = []
        self._base = 0  # packet number of _recs[0]
        self._head = 0  # index of the oldest entry that may still be in flight
        self._gaps: deque[int] = deque()  # unacked packet numbers below largest_acked
        self.largest_acked = -1
        self.bytes_in_flight = 0
        self.in_flight = 0
        self.loss_time: float | None = None
        self.last_sent_time = 0.0

    @property
    def next_pn(self) -> int:
        return self._base + len(self._recs)

    def on_sent(self, rec: SentRecord) -> None:
        """Register an ack-eliciting packet; ``rec[0]`` must be ``next_pn``."""
        self._recs.append(rec)
        self.bytes_in_flight += rec[2]
        self.in_flight += 1
        self.last_sent_time = rec[1]

    def skip(self) -> None:
        """Register a packet number that needs no acknowledgement (ACK-only packets)."""
        self._recs.append(None)

    def oldest(self) -> SentRecord | None:
        """The oldest packet still in flight (the PTO probe candidate)."""
        recs = self._recs
        i = self._head
        n = len(recs)
        while i < n and recs[i] is None:
            i += 1
        self._head = i
        return recs[i] if i < n else None

    def on_ack(
        self, ranges: tuple[tuple[int, int], ...], acked: list[SentRecord]
    ) -> SentRecord | None:
        """Apply an ACK (half-open ranges, highest first); append newly acked records.

        Returns the record of the largest acknowledged packet when this ACK newly acked it
        (the RTT sample, RFC 9002 §5.1), else None. Ranges above ``next_pn`` are ignored.
        """
        recs = self._recs
        base = self._base
        limit = base + len(recs)
        old_largest = self.largest_acked
        freed = 0
        count = 0
        # 1. Open gaps below the previous largest: a later ACK may fill them.
        gaps = self._gaps
        if gaps:
            asc = ranges[::-1]
            keep: deque[int] = deque()
            ri = 0
            nr = len(asc)
            for pn in gaps:
                rec = recs[pn - base]
                if rec is None:
                    continue
                while ri < nr and asc[ri][1] <= pn:
                    ri += 1
                if ri < nr and asc[ri][0] <= pn:
                    acked.append(rec)
                    recs[pn - base] = None
                    freed += rec[2]
                    count += 1
                else:
                    keep.append(pn)
            self._gaps = gaps = keep
        # 2. New territory above the previous largest.
        largest = min(ranges[0][1], limit) - 1
        sample: SentRecord | None = None
        if largest > old_largest:
            cursor = max(old_largest + 1, base)
            for start, stop in reversed(ranges):
                if stop > limit:
                    stop = limit
                if stop <= cursor or start >= stop:
                    continue
                for pn in range(cursor, start):
                    if recs[pn - base] is not None:
                        gaps.append(pn)
                for i in range(max(start, cursor) - base, stop - base):
                    rec = recs[i]
                    if rec is not None:
                        acked.append(rec)
                        recs[i] = None
                        freed += rec[2]
                        count += 1
                cursor = stop
            self.largest_acked = largest
            if acked and acked[-1][0] == largest:
                sample = acked[-1]
        self.bytes_in_flight -= freed
        self.in_flight -= count
        self._compact()
        return sample

    def detect_lost(self, now: float, loss_delay: float, lost: list[SentRecord]) -> None:
        """RFC 9002 §6.1: move packets past the packet or time threshold to ``lost``."""
        recs = self._recs
        base = self._base
        gaps = self._gaps
        pn_limit = self.largest_acked - PACKET_THRESHOLD
        self.loss_time = None
        freed = 0
        while gaps:
            pn = gaps[0]
            rec = recs[pn - base]
            if rec is None:
                gaps.popleft()
                continue
            # The same expression as loss_time below, so a timer at loss_time always fires.
            if pn <= pn_limit or rec[1] + loss_delay <= now:
                gaps.popleft()
                recs[pn - base] = None
                lost.append(rec)
                freed += rec[2]
                self.in_flight -= 1
            else:
                self.loss_time = rec[1] + loss_delay
                break
        self.bytes_in_flight -= freed
        self._compact()

    def drain(self) -> list[SentRecord]:
        """Forget everything in flight (session closing); return what was outstanding."""
        out = [rec for rec in self._recs[self._head :] if rec is not None]
        self._base += len(self._recs)
        self._recs = []
        self._head = 0
        self._gaps.clear()
        self.bytes_in_flight = 0
        self.in_flight = 0
        self.loss_time = None
        return out

    def _compact(self) -> None:
        recs = self._recs
        i = self._head
        n = len(recs)
        while i < n and recs[i] is None:
            i += 1
        if i > 4096 and i * 2 > n:
            del recs[:i]
            self._base += i
            i = 0
        self._head = i
