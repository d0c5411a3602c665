"""``lanshare search`` on the command line: usage errors, the human layout, and a real
daemon (then a short-lived node) on loopback answering it; ``ls`` naming holders."""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

import pytest
from rich.cells import cell_len

from lanshare.cli import _print_hit, _shorten
from tests.cli_env import home, run
from tests.e2e.conftest import cluster
from tests.e2e.harness import wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.e2e.harness import Cluster, Node

__all__ = ["cluster", "home"]

SYNC_TIMEOUT = 30.0
CONTRACT = {"folder", "path", "type", "size", "hash", "state", "holders"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min-size", "10X"], "'10X' is not a size: give bytes, or a number with K, M, G or T"),
        (["--max-size", "1.5"], "'1.5' is not a whole number of bytes"),
        (["--min-size", "2M", "--max-size", "1M"], "--min-size 2097152 is above --max-size"),
        (["--type", "pipe"], "--type is one of file, dir, symlink, not 'pipe'"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["[z-a]*"], "'[z-a]*' is not a valid pattern"),
    ],
)
def test_a_bad_query_is_exit_2_in_one_line_and_starts_no_node(
    home: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    run(capsys, "init", str(home / "A"))
    code, out, err = run(capsys, "search", "x", *argv)
    assert code == 2
    assert out == ""
    assert err.startswith(f"lanshare: {message}"), err
    assert err.count("\n") == 1
    assert not (home / "state" / "lanshare").exists()  # no node took the state


def test_search_without_a_term_is_a_usage_error(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init", str(home / "A"))
    code, _, err = run(capsys, "search")
    assert code == 2
    assert "Missing argument 'TERM'" in err


def _hit(**fields: Any) -> dict[str, Any]:
    hit = {
        "folder": "/home/u/LanShare",
        "path": "report.pdf",
        "type": "file",
        "size": 1_234_567,
        "hash": "blake3:00",
        "state": "missing",
        "holders": [],
    }
    hit.update(fields)
    return hit


def _holder(name: str, fraction: float = 1.0, connected: bool = True) -> dict[str, Any]:
    return {"id": "ab" * 8, "name": name, "fraction": fraction, "connected": connected}


def test_a_hit_is_two_lines_within_80_columns_naming_holders_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _print_hit(
        _hit(
            holders=[
                _holder("alice"),
                _holder("bob", 0.4),
                _holder("evil\u202e\x1b[2J", 1.0, False),
            ]
        )
    )
    out = capsys.readouterr().out
    assert out == (
        "/home/u/LanShare/report.pdf\n"
        "    file  1.2 MiB  missing  held by alice, bob 40%, evil\\u202e\\x1b[2J (offline)\n"
    )
    # A long path keeps both ends; many holders end with how many more; wide letters count
    # for two columns.
    long_path = "/".join(["日本語のディレクトリ"] * 8) + "/final-name.txt"
    many = [_holder(f"peer-with-a-long-name-{i}") for i in range(12)]
    _print_hit(_hit(path=long_path, holders=many))
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("/home/u/LanShare/日本")
    assert first.endswith("…リ/final-name.txt") or first.endswith("/final-name.txt")
    assert "…" in first
    assert second.startswith("    file  1.2 MiB  missing  held by peer-with-a-long-name-0")
    assert second.endswith(" more")
    assert max(cell_len(first), cell_len(second)) <= 80
    _print_hit(_hit(type="dir", size=0, state="in_sync"))
    assert capsys.readouterr().out.splitlines()[1] == "    dir  in_sync  held by no peer"


def _pair(cluster: Cluster, a_name: str) -> tuple[Node, Node]:
    """Two loopback daemons that know each other as static peers (mDNS on 127.0.0.1 too)."""
    a = cluster.node("a", extra={"node": {"name": a_name}})
    b = cluster.node("b", static_peers=(a.endpoint,))
    a.static_peers = (b.endpoint,)
    a.write_config()
    return a, b


@pytest.mark.e2e
@pytest.mark.mdns
def test_search_through_the_daemon_then_a_short_lived_node(cluster: Cluster) -> None:
    # Other nodes may announce on 127.0.0.1 too: a name of its own keeps A's unrenamed.
    a_name = f"search-a-{secrets.token_hex(4)}"
    a, b = _pair(cluster, a_name)
    (a.folder / "docs").mkdir()
    (a.folder / "docs" / "Annual Report.pdf").write_bytes(b"r" * 50_000)
    (a.folder / "docs" / "notes.txt").write_text("notes\n")
    a.start()
    b.start()
    wait_until(
        lambda: (
            (b.folder / "docs" / "notes.txt").exists() and b.folder_status()["state"] == "in_sync"
        ),
        SYNC_TIMEOUT,
        "b in sync with a",
    )

    hits = b.cli_json("search", "REPORT", "*.pdf")
    assert [set(h) for h in hits] == [CONTRACT]
    (hit,) = hits
    a_id = b.status()["folders"][0]["peers"][0]["id"]
    assert hit == {
        "folder": str(b.folder),
        "path": "docs/Annual Report.pdf",
        "type": "file",
        "size": 50_000,
        "hash": hit["hash"],
        "state": "in_sync",
        "holders": [{"id": a_id, "name": a_name, "fraction": 1.0, "connected": True}],
    }
    assert hit["hash"].startswith("blake3:")
    first, second = b.cli("search", "report").stdout.splitlines()
    assert first == _shorten(f"{b.folder}/docs/Annual Report.pdf", 80)
    assert first.endswith("/docs/Annual Report.pdf")
    assert second == f"    file  48.8 KiB  in_sync  held by {a_name}"
    assert [h["path"] for h in b.cli_json("search", "docs")] == [
        "docs",
        "docs/notes.txt",
        "docs/Annual Report.pdf",
    ]
    assert [
        h["path"] for h in b.cli_json("search", "docs", "--type", "file", "--min-size", "1K")
    ] == ["docs/Annual Report.pdf"]
    below = b.cli_json("search", "o", "--folder", str(b.folder / "docs"))
    assert [h["path"] for h in below] == ["docs", "docs/notes.txt", "docs/Annual Report.pdf"]
    outside = b.cli("search", "o", "--folder", str(b.base / "elsewhere"), check=False)
    assert outside.returncode == 2
    assert "is not inside any shared folder" in outside.stderr
    miss = b.cli("search", "nothing-like-it", check=False)
    assert (miss.returncode, miss.stdout) == (1, "")
    miss = b.cli("search", "nothing-like-it", "--json", check=False)
    assert (miss.returncode, json.loads(miss.stdout)) == (1, [])
    # ls names the holders when they fit.
    listing = b.cli("ls").stdout.splitlines()
    assert any(line.endswith(f"  {a_name:<20}  docs/notes.txt") for line in listing), listing

    # No daemon on b: a short-lived node answers, with a connected all the same.
    assert b.stop() == 0
    hits = b.cli_json("search", "notes")
    assert [(h["path"], h["holders"]) for h in hits] == [
        ("docs/notes.txt", [{"id": a_id, "name": a_name, "fraction": 1.0, "connected": True}])
    ]
    assert a.stop() == 0
