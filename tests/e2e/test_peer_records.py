"""What one peer can make a node store is bounded (``[sync] max_peer_records``), with real
daemons in a namespace lab: a node whose peer announces more records than it keeps of one
peer says so in ``status`` (human and JSON, exit status 4) and in its log, once, and keeps
running."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.harness import start_all, wait_until

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

LIMIT = 100
FILES = 3 * LIMIT


def _folder(node: Node) -> dict[str, Any]:
    folders: list[dict[str, Any]] = node.call("status")["folders"]
    return folders[0]


@pytest.mark.timeout(300)
def test_a_peer_announcing_more_records_than_kept_is_named_in_status(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a = cluster.node("a", lab.hosts[0])
    b = cluster.node("b", lab.hosts[1], extra={"sync": {"max_peer_records": LIMIT}})
    for i in range(FILES):
        (a.folder / f"f{i:03}.txt").write_text(f"file {i}\n")
    start_all([a, b])
    wait_until(lambda: bool(_folder(b)["peer_problems"]), 60, "B to cut A's file list")
    result = b.cli("status", "--json", check=False)
    assert result.returncode == 4, result
    folder = json.loads(result.stdout)["folders"][0]
    assert folder["state"] == "error"
    (problem,) = folder["peer_problems"]
    assert problem["name"] == "a"
    assert f"more than {LIMIT} records ([sync] max_peer_records)" in problem["problem"]
    assert "peer a (" in folder["reason"]
    text = b.cli("status", check=False).stdout
    assert f"! peer a ({problem['peer']}): announces more than {LIMIT} records" in text
    assert len(list(b.folder.glob("f*.txt"))) <= LIMIT  # never more than it keeps of A
    assert b.log_text().count("max_peer_records") == 1, b.log_tail()
    assert b.alive()
    for node in (a, b):
        assert node.stop() == 0
