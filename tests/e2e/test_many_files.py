"""Many small files between two real daemons, the receiver allowed few open files.

B runs under ``RLIMIT_NOFILE`` 256 (soft and hard, as ``prlimit`` sets it): it may never
hold more than a fraction of that open for its downloads, whatever the folder holds. Every
file must arrive byte for byte and B's status must never show a file failing for want of
descriptors.

``LANSHARE_E2E_MANY_FILES`` sets the number of files (default 2,000: eight times the limit,
each download needing two descriptors, so a receiver that kept every download open would
run out sixteen times over; 20,000, the workload of the benchmark, takes minutes here).
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.harness import snapshot, start_all, wait_same_tree, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

FILES = int(os.environ.get("LANSHARE_E2E_MANY_FILES", "2000"))
NOFILE = 256
SYNC_TIMEOUT = 900.0
EMFILE_TEXT = "Too many open files"


@pytest.mark.slow
@pytest.mark.timeout(SYNC_TIMEOUT + 180)
def test_many_small_files_reach_a_receiver_with_few_descriptors(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], nofile=NOFILE)
    rng = random.Random(17)
    for i in range(FILES):
        path = a.folder / f"d{i % 40:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rng.randbytes(4096))
    start_all([a, b])
    with open(f"/proc/{b.pid}/limits") as table:
        line = next(row for row in table if row.startswith("Max open files"))
    assert line.split()[3:5] == [str(NOFILE), str(NOFILE)], line

    want = {k: v[:4] for k, v in snapshot(a.folder, content=False).items()}
    seen: list[dict[str, Any]] = []

    def arrived() -> bool:
        status = b.folder_status()
        seen.append(status)
        assert EMFILE_TEXT not in json.dumps(status), status
        got = {k: v[:4] for k, v in snapshot(b.folder, content=False).items()}
        return got == want

    started = time.monotonic()
    wait_until(arrived, SYNC_TIMEOUT, f"B holds A's {FILES} files", interval=0.5)
    wait_same_tree(a.folder, [b.folder], 60.0, [a, b])
    print(f"{FILES} files in {time.monotonic() - started:.1f} s")
    assert len(seen) > 1
    assert all(not s.get("problems") for s in seen), [s for s in seen if s.get("problems")][:2]
    assert EMFILE_TEXT not in b.log_text()
