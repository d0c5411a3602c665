"""Tests of ignore rules against a real folder tree in tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lanshare.errors import ConfigError
from lanshare.ignore import (
    IGNORE_FILE,
    MAX_IGNORE_FILE_SIZE,
    MAX_IGNORE_PATTERNS,
    FolderRules,
    IgnoreFileError,
    IgnoreRules,
)
from lanshare.paths import INTERNAL_DIR, TEMP_PREFIX, normalize
from tests.bounded import run_python

if TYPE_CHECKING:
    from collections.abc import Callable

TREE = [
    "README.md",
    "notes.log",
    "keep.log",
    "root-only.txt",
    "sub/root-only.txt",
    "build/out.o",
    "build/keep.txt",
    "src/build/gen.c",
    "src/main.c",
    "src/main.o",
    "docs/a/b/deep.tmp",
    "docs/a/x/b/c.md",
    "cache/file",  # inside an ignored directory
    "data/build",  # a *file* called build: 'build/' must not match it
    f"{INTERNAL_DIR}/versions/old.txt",
    f"{TEMP_PREFIX}123",
    f"src/{TEMP_PREFIX}456",
    "sub/.lanshare/user-data.txt",  # only the root's .lanshare is internal
]

PATTERNS = """\
# comment and blank lines are fine

*.log
!keep.log
/root-only.txt
build/
!build/keep.txt
*.o
docs/**/b
cache/
"""


def _make_tree(root: Path) -> None:
    for rel in TREE:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)


def _walk(root: Path, rules: IgnoreRules, prune: bool) -> set[str]:
    """Every path a scanner would keep (directories with a trailing '/')."""
    kept: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        for name in list(dirnames):
            rel = prefix + name
            if rules.matches(rel, is_dir=True):
                if prune:
                    dirnames.remove(name)
            else:
                kept.add(rel + "/")
        for name in filenames:
            rel = prefix + name
            if not rules.matches(rel, is_dir=False):
                kept.add(rel)
    return kept


def _kept_files(kept: set[str]) -> set[str]:
    return {p for p in kept if not p.endswith("/")}


def test_rules_from_file_on_a_real_tree(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    (tmp_path / IGNORE_FILE).write_text(PATTERNS)
    rules = IgnoreRules.for_folder(tmp_path, extra=[])
    pruned = _walk(tmp_path, rules, prune=True)
    assert pruned == _walk(tmp_path, rules, prune=False)
    assert _kept_files(pruned) == {
        IGNORE_FILE,
        "README.md",
        "keep.log",
        "sub/root-only.txt",
        "src/main.c",
        "data/build",
        "sub/.lanshare/user-data.txt",
    }
    assert "docs/a/" in pruned
    assert "docs/a/b/" not in pruned
    assert "docs/a/x/b/" not in pruned  # '**' spans several directories
    assert "build/" not in pruned
    assert "src/build/" not in pruned  # 'build/' matches at any depth
    assert f"{INTERNAL_DIR}/" not in pruned


def test_file_under_ignored_directory_cannot_be_re_included() -> None:
    rules = IgnoreRules(["build/", "!build/keep.txt"])
    assert rules.matches("build", is_dir=True)
    assert rules.matches("build/keep.txt", is_dir=False)
    assert rules.matches("a/build/deeper/keep.txt", is_dir=False)
    assert not rules.matches("build", is_dir=False)  # a file named build


def test_negation_and_last_match_wins() -> None:
    rules = IgnoreRules(["*.log", "!important.log", "x/important.log"])
    assert rules.matches("a.log", is_dir=False)
    assert not rules.matches("important.log", is_dir=False)
    assert not rules.matches("y/important.log", is_dir=False)
    assert rules.matches("x/important.log", is_dir=False)
    assert not IgnoreRules(["*.log", "!*.log"]).matches("a.log", is_dir=False)


def test_always_ignored_without_rules() -> None:
    rules = IgnoreRules([])
    assert rules.matches(INTERNAL_DIR, is_dir=True)
    assert rules.matches(f"{INTERNAL_DIR}/versions/x", is_dir=False)
    assert rules.matches(f"{TEMP_PREFIX}x", is_dir=False)
    assert rules.matches(f"a/b/{TEMP_PREFIX}x", is_dir=False)
    assert rules.matches(f"a/{TEMP_PREFIX}dir/x", is_dir=False)
    assert not rules.matches("a/.lanshare", is_dir=True)
    assert not rules.matches("README", is_dir=False)
    # negation cannot bring the internal folder back
    assert IgnoreRules([f"!{INTERNAL_DIR}/"]).matches(f"{INTERNAL_DIR}/x", is_dir=False)


def test_a_bracket_expression_never_matches_a_slash() -> None:
    """As in git; pathspec's ``[!x]`` (``[^x]`` for ``re``) matched the "/" of ``a/b``."""
    for line in ("a[!x]b", "a[^x]b", "a[+-0]b", "a*[!x]*b"):
        rules = IgnoreRules([line])
        assert not rules.matches("a/b", is_dir=False), line
        assert rules.matches("a-b", is_dir=False), line


def test_a_newline_is_part_of_a_name() -> None:
    """As in git: ``secret`` names ``secret`` at any depth, below a directory whose name
    holds a newline too (pathspec's ``.`` stopped there, so the file was synced), and not a
    file called ``secret`` followed by a newline (pathspec's ``$`` matched before it)."""
    rules = IgnoreRules(["secret", "/top/**/deep", "x?y"])
    assert rules.matches("a\nb/secret", is_dir=False)
    assert not rules.matches("secret\n", is_dir=False)
    assert rules.matches("top/a\nb/c/deep", is_dir=False)
    assert rules.matches("x\ny", is_dir=False)


def test_config_patterns_come_before_the_file(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).write_text("!keep.bak\n")
    rules = IgnoreRules.for_folder(tmp_path, extra=["*.bak", "/tmp/"])
    assert rules.matches("x.bak", is_dir=False)
    assert not rules.matches("keep.bak", is_dir=False)  # the folder's file wins
    assert rules.matches("tmp", is_dir=True)
    assert not rules.matches("a/tmp", is_dir=True)
    assert rules.patterns == ("*.bak", "/tmp/", "!keep.bak")


def test_missing_file_means_only_extra(tmp_path: Path) -> None:
    rules = IgnoreRules.for_folder(tmp_path, extra=["*.o"])
    assert rules.patterns == ("*.o",)
    assert rules.matches("a.o", is_dir=False)
    assert "*.o" in repr(rules)


def test_an_invalid_line_of_the_file_spoils_only_itself(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).write_text("*.o\n\\\n*.log\n\\\n")  # lone backslashes: invalid
    rules = IgnoreRules.for_folder(tmp_path, extra=["*.bak"])
    assert rules.matches("x.o", is_dir=False)
    assert rules.matches("x.log", is_dir=False)
    assert rules.matches("x.bak", is_dir=False)
    assert IGNORE_FILE in rules.problem
    assert "lines 2, 4" in rules.problem


def test_only_the_first_patterns_of_a_long_file_are_used(tmp_path: Path) -> None:
    """Every pattern costs every path a scan or a plan matches: past MAX_IGNORE_PATTERNS the
    file's lines are left out, and the problem says from which line."""
    header = ["# generated", "", "*.o", "\\"]  # a comment, a blank and an invalid line
    patterns = [f"kept-{n}" for n in range(MAX_IGNORE_PATTERNS - 1)]
    rest = [f"dropped-{n}" for n in range(500)]
    (tmp_path / IGNORE_FILE).write_text("\n".join([*header, *patterns, *rest]) + "\n")
    rules = IgnoreRules.for_folder(tmp_path, extra=["*.bak"])
    assert rules.matches("x.o", is_dir=False)
    assert rules.matches("x.bak", is_dir=False)
    assert rules.matches(f"kept-{MAX_IGNORE_PATTERNS - 2}", is_dir=False)
    assert not rules.matches("dropped-0", is_dir=False)
    first_unused = len(header) + len(patterns) + 1
    assert "line 4," in rules.problem
    assert f"more than {MAX_IGNORE_PATTERNS} patterns; lines {first_unused} to the end" in (
        rules.problem
    )


def test_a_line_with_a_bad_character_range_spoils_only_itself(tmp_path: Path) -> None:
    """pathspec hands ``[a-*z]`` to ``re`` as written, which raises ``re.error`` (not a
    ValueError): the line is left out like any other invalid one, never failing the scan."""
    (tmp_path / IGNORE_FILE).write_text("*.o\n[a-*z]*.tmp\n*.log\n")
    rules = IgnoreRules.for_folder(tmp_path, extra=["*.bak"])
    assert rules.matches("x.o", is_dir=False)
    assert rules.matches("x.log", is_dir=False)
    assert rules.matches("x.bak", is_dir=False)
    assert not rules.matches("b.tmp", is_dir=False)
    assert "line 2" in rules.problem
    with pytest.raises(ConfigError, match="ignore"):
        IgnoreRules.for_folder(tmp_path, extra=["[z-a]"])


def test_an_invalid_config_pattern_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ignore"):
        IgnoreRules.for_folder(tmp_path, extra=["\\"])


def test_non_utf8_file_spoils_only_its_line(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).write_bytes(b"bad\xff\n*.o\n")
    rules = IgnoreRules.for_folder(tmp_path, extra=[])
    assert rules.matches("x.o", is_dir=False)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).write_bytes(b"#" * (MAX_IGNORE_FILE_SIZE + 1))
    with pytest.raises(IgnoreFileError, match="larger"):
        IgnoreRules.for_folder(tmp_path, extra=[])
    (tmp_path / IGNORE_FILE).write_bytes(b"#" * MAX_IGNORE_FILE_SIZE)
    assert IgnoreRules.for_folder(tmp_path, extra=["*.o"]).patterns[0] == "*.o"


def test_a_directory_is_not_a_rules_file(tmp_path: Path) -> None:
    (tmp_path / IGNORE_FILE).mkdir()
    with pytest.raises(IgnoreFileError, match="not a regular file"):
        IgnoreRules.for_folder(tmp_path, extra=[])


DEADLINE = 30.0
"""How long a reload may take before the test calls it hung (far above any honest read)."""


def bad_symlink_to_dev_zero(root: Path, outside: Path) -> None:
    (root / IGNORE_FILE).symlink_to("/dev/zero")


def bad_symlink_outside(root: Path, outside: Path) -> None:
    (outside / "rules").write_text("*.txt\n")
    (root / IGNORE_FILE).symlink_to(outside / "rules")


def bad_fifo(root: Path, outside: Path) -> None:
    os.mkfifo(root / IGNORE_FILE)  # nobody ever writes to it


def bad_too_big(root: Path, outside: Path) -> None:
    (root / IGNORE_FILE).write_bytes(b"*.txt\n" + b"#" * MAX_IGNORE_FILE_SIZE)


def bad_directory(root: Path, outside: Path) -> None:
    (root / IGNORE_FILE).mkdir()


def reload_within_deadline(live: FolderRules) -> None:
    """``live.reload()`` in a thread the test can give up on: a reload blocked on a FIFO
    is released by opening the FIFO for writing once the deadline has passed."""
    done = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            live.reload()
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    finished = done.wait(DEADLINE)
    if not finished:
        with contextlib.suppress(OSError):  # no FIFO there, or the reader went away
            os.close(os.open(live.root / IGNORE_FILE, os.O_WRONLY | os.O_NONBLOCK))
    assert finished, "reloading the rules hung"
    if failures:
        raise failures[0]


@pytest.mark.parametrize(
    "make_bad",
    [
        bad_symlink_to_dev_zero,
        bad_symlink_outside,
        bad_fifo,
        bad_too_big,
        bad_directory,
    ],
)
def test_an_unusable_rules_file_is_reported_and_left_out(
    tmp_path: Path, make_bad: Callable[[Path, Path], None]
) -> None:
    """Whatever a peer or a user puts at ``.lanshareignore``, a reload returns promptly, the
    config's patterns alone are in force and the reason is kept; a good file is used again
    as soon as it is back."""
    root, outside = tmp_path / "folder", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    live = FolderRules(root, ["*.bak"])
    (root / IGNORE_FILE).write_text("*.log\n")
    live.reload()
    assert live.matches("x.log", is_dir=False)
    (root / IGNORE_FILE).unlink()
    make_bad(root, outside)
    reload_within_deadline(live)
    assert IGNORE_FILE in live.problem
    assert live.rules.patterns == ("*.bak",)
    assert not live.matches("x.txt", is_dir=False)  # nothing read through a link
    reload_within_deadline(live)  # unchanged: still left out, still reported
    assert IGNORE_FILE in live.problem
    if (root / IGNORE_FILE).is_dir() and not (root / IGNORE_FILE).is_symlink():
        (root / IGNORE_FILE).rmdir()
    else:
        (root / IGNORE_FILE).unlink()
    (root / IGNORE_FILE).write_text("*.log\n")
    reload_within_deadline(live)
    assert live.problem == ""
    assert live.matches("x.log", is_dir=False)
    assert live.matches("x.bak", is_dir=False)


def test_directory_verdicts_stay_correct_past_the_cache() -> None:
    rules = IgnoreRules(["ign*/"])
    for i in range(10_000):
        assert rules.matches(f"d{i}/f", is_dir=False) is False
    assert rules.matches("ign1/f", is_dir=False)
    assert not rules.matches("d1/f", is_dir=False)


def test_a_path_as_deep_as_paths_go_is_answered() -> None:
    """A peer's path may hold 2,048 components (4 KiB of "a/"): the directories above it
    are asked about without recursion, and a verdict high up still holds far below."""
    deep = normalize("a/" * 2046 + "f")
    assert deep.count("/") == 2046
    assert not IgnoreRules(["/x/"]).matches(deep, is_dir=False)
    assert IgnoreRules(["/a/"]).matches(deep, is_dir=False)
    inner = normalize("a/" * 1000 + "deep/" + "a/" * 1000 + "f")
    rules = IgnoreRules(["deep/", "!f"])
    assert rules.matches(inner, is_dir=False)
    assert not rules.matches(deep, is_dir=False)


def test_folder_rules_reload_when_the_file_changes(tmp_path: Path) -> None:
    live = FolderRules(tmp_path, ["*.bak"])
    matches = live.matches  # as the watcher holds it: bound once, answers with what is current
    assert live.reload() is False  # no file: the config's patterns, as built
    assert matches("x.bak", is_dir=False)
    assert not matches("x.log", is_dir=False)
    (tmp_path / IGNORE_FILE).write_text("*.log\n")
    assert live.reload() is True
    assert matches("x.log", is_dir=False)
    assert matches("x.bak", is_dir=False)
    assert live.reload() is False  # unchanged: one stat, nothing read
    (tmp_path / IGNORE_FILE).write_text("*.log\n\\\n")  # a lone backslash: not a valid pattern
    live.reload()  # the good line stays, the bad one is reported
    assert matches("x.log", is_dir=False)
    assert "line 2" in live.problem
    (tmp_path / IGNORE_FILE).unlink()
    assert live.reload() is True
    assert not matches("x.log", is_dir=False)
    assert live.problem == ""


HOSTILE_MATCH = """
import json, sys
from pathlib import Path
from lanshare.ignore import FolderRules

live = FolderRules(Path(sys.argv[1]), ["a*a*a*a*a*a*a*c", "**/a*a*a*a*a*a*a*a*d/"])
live.reload()
name = "a" * 255
paths = [name, "/".join([name] * 16), name[:-1] + "b", name[:-1] + "c", name + "/" + name]
print(json.dumps([live.matches(p, is_dir) for p in paths for is_dir in (False, True)]))
"""


def test_no_line_makes_a_match_backtrack_without_bound(tmp_path: Path) -> None:
    """Lines whose regexes backtracked (``a*a*a*a*a*b``: 30 s against one 255-byte name,
    eight stars: beyond any wait), from the folder's file and from the config alike,
    against 255-byte names and a 4 KiB path, all answered in a child within the guard."""
    (tmp_path / IGNORE_FILE).write_text(
        "a*a*a*a*a*a*a*b\n**/a*a*a*a*a*b\nx/**/a*a*a*a*a*a*b/**/c\n*a?a*[a]a*a*a*a*a*e*\n"
    )
    answers = json.loads(run_python(HOSTILE_MATCH, str(tmp_path)))
    assert answers == [
        *(False, False),  # no line ends in a name of "a"s
        *(False, False),
        *(True, True),  # the file's first line
        *(True, True),  # the config's first pattern
        *(False, False),
    ]
