"""The benchmark's own edges: its arguments and the mixed workload it builds (no lab needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from bench import vs_syncthing
from tests.e2e.harness import make_mixed_tree

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeat", "0"], "--repeat must be at least 1"),
        (["--loss", "100"], "--loss is a percentage"),
        (["--loss", "-1"], "--loss is a percentage"),
        (["--loss", "lots"], "invalid float value"),
        (["--timeout", "0"], "--timeout must be more than 0"),
        (["--workload", "huge"], "invalid choice"),
        (["--workdir", "/nonexistent/lanshare-bench"], "is not a directory"),
    ],
)
def test_an_argument_error_is_one_line_before_any_lab_is_built(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        vs_syncthing.main(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_the_mixed_workload_builds_with_no_small_files(tmp_path: Path) -> None:
    tree = make_mixed_tree(tmp_path / "mixed", big_size=1000, small_files=0)
    assert tree.small == ["docs/readme.txt", "private/secret.txt"]
    assert tree.files == 3
    assert (tmp_path / "mixed" / tree.big).stat().st_size == 1000
    assert (tmp_path / "mixed" / "link-to-readme").read_text() == "hello from the mixed tree\n"
