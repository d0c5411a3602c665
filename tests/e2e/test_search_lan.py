"""``lanshare search`` on a namespace lab: find what another machine holds, then pull it.

Real ``lanshare daemon`` on A, the real CLI on B (first with no daemon: a short-lived node
that finds A over mDNS, then with B's own daemon answering from its index), real multicast
and UDP between two network namespaces.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pytest
from rich.cells import cell_len

from tests.e2e.harness import MiB, file_digest, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 120.0
CLI_TIMEOUT = 120.0
CONTRACT = {"folder", "path", "type", "size", "hash", "state", "holders"}


@pytest.mark.timeout(600)
def test_b_finds_what_only_a_holds_then_pulls_it(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1])
    b.folders.clear()  # B joins with the key, as a new machine does
    b.write_config()
    (a.folder / "videos").mkdir()
    (a.folder / "videos" / "Holiday 2024.mkv").write_bytes(os.urandom(3 * MiB + 7))
    (a.folder / "videos" / "holiday-notes.txt").write_text("where we went\n")
    (a.folder / "taxes.pdf").write_bytes(b"%PDF" * 100)
    a.start()
    a_id = a.status()["node"]["id"]
    joined = b.cli("init", str(b.folder), "--key", cluster.key)
    assert f"Joined shared folder {b.folder}" in joined.stdout

    # No daemon on B: a short-lived node finds A and answers from what A announced.
    found = b.cli("search", "holiday", "*.mkv", "--json", timeout=CLI_TIMEOUT)
    hits = json.loads(found.stdout)
    assert [set(hit) for hit in hits] == [CONTRACT]
    (hit,) = hits
    assert hit == {
        "folder": str(b.folder),
        "path": "videos/Holiday 2024.mkv",
        "type": "file",
        "size": 3 * MiB + 7,
        "hash": hit["hash"],
        "state": "missing",
        "holders": [{"id": a_id, "name": "a", "fraction": 1.0, "connected": True}],
    }
    assert hit["hash"].startswith("blake3:")
    assert not (b.folder / "videos").exists()  # a search fetches nothing

    missed = b.cli("search", "no-such-file", timeout=CLI_TIMEOUT, check=False)
    assert (missed.returncode, missed.stdout) == (1, "")
    refused = b.cli("search", "holiday", "--min-size", "3 parsecs", check=False)
    assert refused.returncode == 2
    assert refused.stderr.startswith("lanshare: '3 parsecs' is not a size"), refused.stderr

    # Pull the hit, by the folder and path the search gave.
    b.cli("pull", f"{hit['folder']}/{hit['path']}", timeout=CLI_TIMEOUT)
    assert file_digest(b.folder / hit["path"]) == file_digest(a.folder / hit["path"])

    # B's daemon answers from its index: the file is here now, and A still holds it.
    b.start()
    wait_until(
        lambda: b.folder_status()["state"] == "in_sync" and b.folder_status()["peers"],
        SYNC_TIMEOUT,
        "b in sync with a",
    )
    hits = b.cli_json("search", "HOLIDAY")
    assert [(h["path"], h["state"]) for h in hits] == [
        ("videos/Holiday 2024.mkv", "in_sync"),
        ("videos/holiday-notes.txt", "in_sync"),
    ]
    assert all(
        h["holders"] == [{"id": a_id, "name": "a", "fraction": 1.0, "connected": True}]
        for h in hits
    )
    human = b.cli("search", "holiday").stdout.splitlines()
    assert len(human) == 4, human
    assert all(cell_len(line) <= 80 for line in human), human
    assert human[1].endswith("in_sync  held by a"), human
    assert a.stop() == 0
    assert b.stop() == 0
