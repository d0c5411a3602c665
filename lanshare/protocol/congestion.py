"""Congestion control and rate limiting: NewReno and LEDBAT windows, pacer, token buckets.

Pure: no I/O; times are the caller's. The window follows RFC 9002 §7 (NewReno) with one
LAN-minded change, documented in docs/protocol.md: a round trip's losses count as congestion
only when they exceed ``loss_threshold`` of the packets acknowledged or lost in that round
(as BBRv2's ``loss_thresh``), so that random loss on a LAN does not halve the window, while the
burst losses of an overflowing queue still do.
"""

from __future__ import annotations

from typing import Protocol


class RttSamples(Protocol):
    """What ``Ledbat`` reads from the RTT estimator (``recovery.RttEstimator``)."""

    has_sample: bool
    latest_rtt: float
    min_rtt: float


#: RFC 9002 §7.2: initial window of 10 datagrams, minimum of 2.
INITIAL_WINDOW_PACKETS = 10
MINIMUM_WINDOW_PACKETS = 2
#: RFC 9002 §7.3.2 kLossReductionFactor.
LOSS_REDUCTION_FACTOR = 0.5
#: Losses in one round below this count never signal congestion.
MIN_CONGESTION_LOSSES = 3


class NewReno:
    """Congestion window in bytes (RFC 9002 §7) with a loss-rate threshold per round."""

    __slots__ = (
        "_acked_in_round",
        "_avoidance_acc",
        "_lost_in_round",
        "_recovery_start",
        "_round_end_pn",
        "congestion_events",
        "cwnd",
        "loss_threshold",
        "max_cwnd",
        "mss",
        "ssthresh",
    )

    def __init__(self, mss: int, max_cwnd: int, loss_threshold: float = 0.05) -> None:
        self.mss = mss
        self.cwnd = INITIAL_WINDOW_PACKETS * mss
        self.max_cwnd = max(max_cwnd, self.cwnd)
        self.ssthresh = float("inf")
        self.loss_threshold = loss_threshold
        self.congestion_events = 0
        self._recovery_start = float("-inf")
        self._avoidance_acc = 0
        self._round_end_pn = 0
        self._acked_in_round = 0
        self._lost_in_round = 0

    @property
    def in_slow_start(self) -> bool:
        return self.cwnd < self.ssthresh

    def on_acked(
        self,
        acked_bytes: int,
        acked_packets: int,
        largest_sent_time: float,
        largest_pn: int,
        next_pn: int,
    ) -> None:
        """Grow the window for acknowledged bytes (RFC 9002 §7.3.1-7.3.3)."""
        self._acked_in_round += acked_packets
        if largest_pn >= self._round_end_pn:
            self._round_end_pn = next_pn
            self._acked_in_round = 0
            self._lost_in_round = 0
        if largest_sent_time <= self._recovery_start:
            return  # still in recovery: no growth
        if self.cwnd < self.ssthresh:
            self.cwnd = min(self.cwnd + acked_bytes, self.max_cwnd)
        else:
            self._avoidance_acc += acked_bytes
            if self._avoidance_acc >= self.cwnd:
                self._avoidance_acc -= self.cwnd
                self.cwnd = min(self.cwnd + self.mss, self.max_cwnd)

    def on_lost(self, lost_packets: int, largest_sent_time: float, now: float) -> None:
        """Losses were detected; reduce the window when they signal congestion."""
        self._lost_in_round += lost_packets
        if largest_sent_time <= self._recovery_start:
            return  # one reduction per round trip (RFC 9002 §7.3.2)
        lost = self._lost_in_round
        if lost < MIN_CONGESTION_LOSSES:
            return
        seen = max(self._acked_in_round + lost, self.cwnd // self.mss)
        if lost <= self.loss_threshold * seen:
            return
        self.congestion_events += 1
        self._recovery_start = now
        self.ssthresh = max(
            int(self.cwnd * LOSS_REDUCTION_FACTOR), MINIMUM_WINDOW_PACKETS * self.mss
        )
        self.cwnd = int(self.ssthresh)
        self._avoidance_acc = 0
        self._lost_in_round = 0
        self._acked_in_round = 0

    def on_persistent_congestion(self, now: float) -> None:
        """RFC 9002 §7.6.2: collapse to the minimum window."""
        self._recovery_start = now
        self.ssthresh = max(self.cwnd // 2, MINIMUM_WINDOW_PACKETS * self.mss)
        self.cwnd = MINIMUM_WINDOW_PACKETS * self.mss


class TokenBucket:
    """Byte tokens refilled at ``rate`` per second up to ``capacity`` (``rate`` 0 = no limit).

    Used as the pacer of each session (rate = cwnd/srtt) and as the endpoint-wide limits for
    ``max_send_rate``/``max_recv_rate``. Tokens may go negative by one packet or request, so
    that a request larger than the bucket still goes out and the average rate holds.
    """

    __slots__ = ("capacity", "last", "rate", "tokens")

    def __init__(self, rate: float, capacity: float, now: float = 0.0) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.last = now

    def refill(self, now: float) -> float:
        if now > self.last:
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens

    def ready_at(self, need: float) -> float:
        """When the bucket will hold ``need`` tokens (``last`` if it does now)."""
        if self.tokens >= need or self.rate <= 0:
            return self.last
        # At least a microsecond: a wait that rounds to nothing on the caller's clock would
        # wake it again and again without any tokens added.
        return self.last + max((need - self.tokens) / self.rate, 1e-6)

    def set_rate(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        if self.tokens > capacity:
            self.tokens = capacity


#: RFC 6817 GAIN (at most 1) and the smallest window (packets) LEDBAT goes down to.
LEDBAT_GAIN = 1.0


class Ledbat(NewReno):
    """Background mode: LEDBAT (RFC 6817) on RTT samples, yielding to other traffic.

    The window grows while the queueing delay we see (latest RTT minus the session's
    minimum RTT, the "base delay") stays below ``target`` and shrinks in proportion when it
    rises above it, so a competing flow that fills a queue pushes this one down to the
    minimum window. Slow start ends once the queueing delay reaches half the target
    (as LEDBAT++ does); losses are handled as by ``NewReno``. RTT samples count the reverse
    path and the peer's processing too: conservative, which suits a background flow.
    """

    __slots__ = ("_rtt", "target")

    def __init__(
        self,
        mss: int,
        max_cwnd: int,
        rtt: RttSamples,
        target: float = 0.01,
        loss_threshold: float = 0.05,
    ) -> None:
        super().__init__(mss, max_cwnd, loss_threshold)
        self._rtt = rtt
        self.target = target

    def on_acked(
        self,
        acked_bytes: int,
        acked_packets: int,
        largest_sent_time: float,
        largest_pn: int,
        next_pn: int,
    ) -> None:
        rtt = self._rtt
        if not rtt.has_sample:
            super().on_acked(acked_bytes, acked_packets, largest_sent_time, largest_pn, next_pn)
            return
        self._acked_in_round += acked_packets
        if largest_pn >= self._round_end_pn:
            self._round_end_pn = next_pn
            self._acked_in_round = 0
            self._lost_in_round = 0
        if largest_sent_time <= self._recovery_start:
            return
        queueing = max(rtt.latest_rtt - rtt.min_rtt, 0.0)
        if self.cwnd < self.ssthresh:
            if queueing < self.target / 2:
                self.cwnd = min(self.cwnd + acked_bytes, self.max_cwnd)
                return
            self.ssthresh = self.cwnd  # the queue starts to build: leave slow start
        off_target = (self.target - queueing) / self.target
        cwnd = self.cwnd + LEDBAT_GAIN * off_target * acked_bytes * self.mss / self.cwnd
        self.cwnd = int(min(max(cwnd, MINIMUM_WINDOW_PACKETS * self.mss), self.max_cwnd))
