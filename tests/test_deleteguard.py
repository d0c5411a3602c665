"""Tests of the mass-deletion guard's window: a fake clock (plain numbers), no I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lanshare.deleteguard import (
    DEFAULT_LIMITS,
    LOCAL,
    MERGE_SLOTS,
    Deletion,
    Limits,
    in_window,
    judge,
    record,
)

PEER_A = bytes.fromhex("a1a1a1a1a1a1a1a1")
PEER_B = bytes.fromhex("b2b2b2b2b2b2b2b2")
HOUR = 3600.0
T0 = 1_800_000_000.0  # wall-clock seconds


def test_one_mass_deletion_pauses_above_the_ratio_and_from_the_minimum() -> None:
    assert judge([], {PEER_A: 100}, 200, T0, DEFAULT_LIMITS) is None  # exactly half
    assert judge([], {PEER_A: 99}, 99, T0, DEFAULT_LIMITS) is None  # all, but under 100
    verdict = judge([], {PEER_A: 101}, 200, T0, DEFAULT_LIMITS)
    assert verdict is not None
    assert (verdict.deleted, verdict.entries, verdict.withheld) == (101, 200, 101)
    assert judge([], {LOCAL: 3}, 4, T0, Limits(ratio=0.5, minimum=2)) is not None
    assert judge([], {}, 0, T0, Limits(minimum=0)) is None  # nothing to withhold


def test_batches_under_the_limit_add_up_within_the_window() -> None:
    # 300 files deleted 99 at a time, a few seconds apart: what the window must catch.
    history: list[Deletion] = []
    live = 300
    verdicts = []
    for batch in range(3):
        now = T0 + 5 * batch
        verdict = judge(history, {PEER_A: 99}, live, now, DEFAULT_LIMITS)
        verdicts.append(verdict)
        if verdict is None:
            history = record(history, Deletion(now, PEER_A, 99, live), HOUR)
            live -= 99
    assert verdicts[0] is None  # 99 of 300: under the minimum and the ratio
    second = verdicts[1]
    assert second is not None
    assert (second.deleted, second.entries, second.withheld) == (198, 300, 99)
    assert second.origins == ((PEER_A, 198),)
    assert live == 201  # the second batch and the third were held back
    assert "198 of 300 entries (66%) deleted within 1 hour" in second.reason()


def test_a_slow_tidy_up_over_days_is_never_stopped() -> None:
    history: list[Deletion] = []
    live = 1000
    for day in range(30):  # 20 files a day, in four sittings: 600 of 1000 in a month
        for sitting in range(4):
            now = T0 + day * 86400 + sitting * 600
            assert judge(history, {LOCAL: 5}, live, now, DEFAULT_LIMITS) is None
            history = record(history, Deletion(now, LOCAL, 5, live), HOUR)
            live -= 5
    assert live == 400
    assert sum(d.count for d in history) <= 20  # only the last day's are kept


def test_deletions_older_than_the_window_no_longer_count() -> None:
    history = [Deletion(T0, PEER_A, 99, 300)]
    assert judge(history, {PEER_A: 99}, 201, T0 + HOUR - 1, DEFAULT_LIMITS) is not None
    assert judge(history, {PEER_A: 99}, 201, T0 + HOUR, DEFAULT_LIMITS) is None
    short = Limits(window=10.0)
    assert judge(history, {PEER_A: 99}, 201, T0 + 11, short) is None
    assert in_window(history, T0 + HOUR, HOUR) == []


def test_the_base_is_the_folder_at_the_start_of_the_window() -> None:
    # Files created after the wipe began do not dilute it.
    history = [Deletion(T0, PEER_A, 99, 300)]
    verdict = judge(history, {PEER_A: 99}, 201 + 1000, T0 + 60, DEFAULT_LIMITS)
    assert verdict is not None
    assert verdict.entries == 300
    # With nothing in the window, the base is the folder now, pending deletions included.
    assert judge([], {PEER_A: 150}, 1000, T0, DEFAULT_LIMITS) is None


def test_a_clock_set_back_keeps_counting_what_it_recorded() -> None:
    history = [Deletion(T0 + HOUR, PEER_A, 99, 300)]
    assert judge(history, {PEER_A: 99}, 201, T0, DEFAULT_LIMITS) is not None


def test_what_a_clock_far_ahead_recorded_stops_counting_once_it_is_fixed() -> None:
    """A year ahead, then corrected: those deletions must not pause every later one."""
    history = [Deletion(T0 + 365 * 24 * HOUR, LOCAL, 140, 150)]
    assert judge(history, {LOCAL: 10}, 150, T0, Limits(minimum=5)) is None
    assert judge([], {LOCAL: 10}, 150, T0, Limits(minimum=5)) is None


def test_the_reason_names_who_deleted_by_name_and_id_and_says_what_was_made_here() -> None:
    history = [Deletion(T0, PEER_A, 120, 400), Deletion(T0 + 1, LOCAL, 30, 280)]
    verdict = judge(history, {PEER_B: 60, PEER_A: 10}, 250, T0 + 2, DEFAULT_LIMITS)
    assert verdict is not None
    assert verdict.origins == ((PEER_A, 130), (PEER_B, 60), (LOCAL, 30))
    text = verdict.reason({PEER_A: "alice-laptop"})
    assert "220 of 400 entries (55%)" in text
    assert "130 by peer alice-laptop (a1a1a1a1a1a1a1a1)" in text
    assert "60 by peer b2b2b2b2b2b2b2b2" in text  # no name known: the id alone
    assert "30 made here" in text
    assert "70 deletion(s) withheld" in text
    assert "lanshare resume" in text
    assert "\n" not in text
    short = judge([], {LOCAL: 9}, 9, T0, Limits(minimum=1, window=300))
    assert short is not None
    assert "9 made here" in short.reason()
    assert "within 5 min" in short.reason()


def test_record_prunes_what_left_the_window_and_merges_close_entries() -> None:
    history = record([], Deletion(T0, PEER_A, 10, 300), HOUR)
    history = record(history, Deletion(T0 + 30, PEER_A, 10, 290), HOUR)  # < HOUR / 60 later
    assert history == [Deletion(T0 + 30, PEER_A, 20, 300)]  # first live count, later time
    # The merged entry counts for a full window after its latest deletion, never less.
    assert judge(history, {PEER_A: 140}, 280, T0 + HOUR + 10, DEFAULT_LIMITS) is not None
    assert judge([], {PEER_A: 140}, 280, T0 + HOUR + 10, DEFAULT_LIMITS) is None
    history = record(history, Deletion(T0 + 40, PEER_B, 5, 280), HOUR)  # another origin
    history = record(history, Deletion(T0 + 200, PEER_A, 1, 275), HOUR)  # too late to merge
    assert [(d.origin, d.count) for d in history] == [(PEER_A, 20), (PEER_B, 5), (PEER_A, 1)]
    later = record(history, Deletion(T0 + 30 + HOUR, LOCAL, 2, 270), HOUR)
    assert [(d.origin, d.count) for d in later] == [(PEER_B, 5), (PEER_A, 1), (LOCAL, 2)]


def test_the_history_stays_bounded_however_deletions_trickle_in() -> None:
    history: list[Deletion] = []
    for second in range(3 * int(HOUR)):  # one deletion a second for three hours, two origins
        origin = PEER_A if second % 2 else LOCAL
        history = record(history, Deletion(T0 + second, origin, 1, 10**6), HOUR)
        assert len(history) <= 2 * (MERGE_SLOTS + 1)
    # Nothing that happened within the window was forgotten.
    assert sum(d.count for d in history) >= HOUR


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 120), min_size=1, max_size=12),
    gaps=st.lists(st.floats(0, 200), min_size=12, max_size=12),
    live=st.integers(1, 2000),
)
def test_splitting_a_deletion_into_batches_never_gets_it_through(
    sizes: list[int], gaps: list[float], live: int
) -> None:
    """Whatever the batches, if deleting them all at once pauses, some batch within one
    window pauses, however the batches are spread over it."""
    total = sum(sizes)
    live = max(live, total)
    if judge([], {PEER_A: total}, live, T0, DEFAULT_LIMITS) is None:
        return
    history: list[Deletion] = []
    now, left = T0, live
    for size, gap in zip(sizes, gaps, strict=False):
        now += gap  # all within 12 * 200 s < one hour
        if judge(history, {PEER_A: size}, left, now, DEFAULT_LIMITS) is not None:
            return
        history = record(history, Deletion(now, PEER_A, size, left), HOUR)
        left -= size
    raise AssertionError(f"{total} of {live} deleted in batches {sizes} without a pause")
