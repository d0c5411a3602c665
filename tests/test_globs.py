"""gitignore lines compiled by lanshare.globs answer as pathspec's own regexes do (the oracle),
where git agrees with pathspec, and as git does where it does not."""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pathspec import GitIgnoreSpec
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

from lanshare.errors import ConfigError
from lanshare.globs import gitignore_pattern
from lanshare.ignore import IgnoreRules

if TYPE_CHECKING:
    from collections.abc import Callable

# Pieces of lines: wildcards of every kind, bracket expressions (negated, ranges, "]" first,
# one never closed), escapes (of "*", of a trailing space, a lone one), "!" and "#" anywhere.
ATOMS = ["a", "b", "c", "*", "**", "?", "[a-c]", "[!a]", "[^b]", "[]a]", "[+-0]", "[a", "/"]
ATOMS += ["\\", "\\*", "\\ ", " ", "!", "#"]
lines = st.lists(st.sampled_from(ATOMS), min_size=1, max_size=10).map("".join)
# Names made of what the lines use, so that literals, classes and escapes all meet them. No
# newline: pathspec's "." stops at one, git's wildcards do not (tests/test_ignore.py).
names = st.text(alphabet="abc*?[]!# \\+-0", min_size=1, max_size=5)
paths = st.tuples(st.lists(names, min_size=1, max_size=5), st.booleans())


def _git_classes(regex: str) -> str:
    """pathspec's regex with every bracket expression kept off "/": pathspec hands ``[!a]``
    to ``re`` as ``[^a]``, which matches "/", while git's never does (tests/test_ignore.py)."""
    out: list[str] = []
    i = 0
    while i < len(regex):
        if regex[i] == "\\":
            out.append(regex[i : i + 2])
            i += 2
            continue
        if regex[i] != "[":
            out.append(regex[i])
            i += 1
            continue
        j = i + 1 + (regex[i + 1 : i + 2] == "^")
        j += regex[j : j + 1] == "]"
        while regex[j] != "]":
            j += 2 if regex[j] == "\\" else 1
        bracket = regex[i : j + 1]
        out.append(bracket if bracket == "[^/]" else "(?!/)" + bracket)
        i = j + 1
    return "".join(out)


def oracle_pattern(line: str) -> GitIgnoreSpecPattern:
    """pathspec's own pattern for ``line``, its bracket expressions kept off "/" as git's."""
    own = GitIgnoreSpecPattern(line)
    if own.regex is None:
        return own
    return GitIgnoreSpecPattern(re.compile(_git_classes(own.regex.pattern)), own.include)


def _verdict(pattern: GitIgnoreSpecPattern, path: str) -> tuple[bool, str | None]:
    """Whether ``pattern`` matches ``path`` and whether by a directory above it."""
    found = pattern.match_file(path)
    return (False, None) if found is None else (True, found.match.groupdict().get("ps_d"))


def _compiled(
    make: Callable[[str], GitIgnoreSpecPattern], line: str
) -> GitIgnoreSpecPattern | type[Exception]:
    """The pattern ``make`` builds from ``line``, or the type of what it raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # re: "[[" may be a set some day
            return make(line)
    except (ValueError, re.error) as exc:
        return type(exc)


@settings(max_examples=3000, deadline=None)
@given(line=lines, samples=st.lists(paths, min_size=1, max_size=8))
def test_each_line_matches_as_pathspec_does(
    line: str, samples: list[tuple[list[str], bool]]
) -> None:
    """Valid, a no-op or refused alike; then for each path the same verdict, including
    whether the match is of a directory above the path (which ranks below a full match)."""
    ours, oracle = _compiled(gitignore_pattern, line), _compiled(oracle_pattern, line)
    if not isinstance(oracle, GitIgnoreSpecPattern):
        assert ours == oracle
        return
    assert isinstance(ours, GitIgnoreSpecPattern)
    assert ours.include == oracle.include
    for components, is_dir in samples:
        path = "/".join(components) + ("/" if is_dir else "")
        assert _verdict(ours, path) == _verdict(oracle, path), (line, path)


@settings(max_examples=1000, deadline=None)
@given(
    rules=st.lists(lines, min_size=1, max_size=5),
    samples=st.lists(paths, min_size=1, max_size=8),
)
def test_rules_decide_as_pathspec_does(
    rules: list[str], samples: list[tuple[list[str], bool]]
) -> None:
    """A whole rules file: last match wins, negations, directories above a path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            oracle = GitIgnoreSpec.from_lines(rules, pattern_factory=oracle_pattern)
        except (ValueError, re.error):
            with pytest.raises(ConfigError, match="invalid ignore pattern"):
                IgnoreRules(rules)
            return
        ours = IgnoreRules(rules)
    for components, is_dir in samples:
        path = "/".join(components)
        above = ["/".join(components[:n]) + "/" for n in range(1, len(components))]
        expected = any(oracle.match_file(d) for d in above) or oracle.match_file(
            path + "/" if is_dir else path
        )
        assert ours.matches(path, is_dir) == expected, (rules, path, is_dir)


@pytest.mark.parametrize(
    ("line", "path", "expected"),
    [
        ("a*a*a*a*a*b", "a" * 254 + "b", True),
        ("a*a*a*a*a*b", "a" * 255, False),
        ("*.log", "deep/er/x.log", True),
        ("*.log", "x.log/y", True),  # a directory above the path
        ("/top/*.o", "top/x.o", True),
        ("/top/*.o", "sub/top/x.o", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/y/c", False),
        ("**/x*y*z/**/q", "m/xayz/n/q", True),
        ("**/x*y*z/**/q", "m/xyaz/n/r", False),
        ("build/", "build/", True),
        ("build/", "build", False),
        ("\\!x\\ ", "!x ", True),
    ],
)
def test_known_answers(line: str, path: str, expected: bool) -> None:
    assert (gitignore_pattern(line).match_file(path) is not None) is expected
