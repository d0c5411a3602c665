"""The scheduler pipelines requests across files: with many one-block files and one peer,
requests for many files are outstanding at once, from the first pass on, not file after
file."""

from __future__ import annotations

import hashlib
import random

from lanshare.manifest import Block
from lanshare.scheduler import Request, Scheduler, SchedulerConfig

PEER = b"\x01" * 8
FILES = 1000
SIZE = 4096


def one_block_files(s: Scheduler) -> None:
    for i in range(FILES):
        digest = hashlib.sha256(f"file {i}".encode()).digest()
        assert s.add_file(f"f{i:04d}", [Block(0, SIZE, digest)], {PEER: None})


def test_many_one_block_files_are_outstanding_at_once_before_any_rate_is_known() -> None:
    s = Scheduler(random.Random(1))
    one_block_files(s)
    now = 0.0
    outstanding: dict[str, Request] = {}
    fewest_while_busy = FILES
    done = 0
    # Answer the oldest request after each pass, as a peer that delivers in order would.
    for _ in range(4 * FILES):
        for step in s.next_requests(now):
            assert isinstance(step, Request)
            assert step.block.file_id not in outstanding  # never asked twice (no end game)
            outstanding[step.block.file_id] = step
        if not outstanding:
            break
        if FILES - done > len(outstanding):  # more files wait than are in flight
            fewest_while_busy = min(fewest_while_busy, len(outstanding))
        oldest = next(iter(outstanding.values()))
        del outstanding[oldest.block.file_id]
        s.on_block_done(oldest.block, PEER)
        done += 1
        now += 0.001
    assert done == FILES
    # min_bytes (128 KiB) of 4 KiB blocks: 32 files in flight at all times, not 2.
    assert fewest_while_busy >= 31


def test_a_measured_peer_gets_requests_for_as_many_files_as_its_pipeline_holds() -> None:
    config = SchedulerConfig()
    s = Scheduler(random.Random(2), config)
    one_block_files(s)
    s.update_rate(PEER, 100e6)  # 10 MB in flight at 0.1 s: the per-peer cap decides
    files = {step.block.file_id for step in s.next_requests(0.0) if isinstance(step, Request)}
    assert len(files) == config.max_outstanding_per_peer
