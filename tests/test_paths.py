"""Tests of path validation: every path from a scan or a peer goes through lanshare.paths."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lanshare.errors import PathError
from lanshare.paths import (
    INTERNAL_DIR,
    MAX_NAME_SIZE,
    MAX_PATH_SIZE,
    TEMP_PREFIX,
    casefold_collisions,
    is_internal,
    is_normalized,
    is_temporary,
    join_inside,
    normalize,
)

ROOT = Path("/nonexistent-lanshare-root/share")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a", "a"),
        ("a/b/c.txt", "a/b/c.txt"),
        ("dir/", "dir"),
        ("..a/b..", "..a/b.."),
        (".hidden/.x", ".hidden/.x"),
        ("with space/and:colon", "with space/and:colon"),
        ("CON/aux.txt", "CON/aux.txt"),
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),  # NFD in, NFC out
        ("日本語/файл", "日本語/файл"),
    ],
)
def test_normalize_accepts(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "/",
        "/etc/passwd",
        "//x",
        "a//b",
        "a//",
        ".",
        "./a",
        "a/./b",
        "..",
        "../x",
        "a/../../x",
        "a/..",
        "a\\b",
        "..\\..\\x",
        "a\x00b",
        "a\nb",
        "a\x1fb",
        "a\x7fb",
        "a\x85b",
        "a\x9fb",
        "a\udcffb",
        "x" * (MAX_NAME_SIZE + 1),
        "é" * (MAX_NAME_SIZE // 2 + 1),
        "/".join(["x" * 200] * 21),
    ],
)
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(PathError):
        normalize(raw)


def test_length_limits_are_inclusive() -> None:
    assert normalize("x" * MAX_NAME_SIZE) == "x" * MAX_NAME_SIZE
    name = "y" * 255
    path = "/".join([name] * 16)  # 16 * 256 - 1 = 4095 bytes
    assert len(path) <= MAX_PATH_SIZE
    assert normalize(path) == path
    with pytest.raises(PathError):
        normalize(path + "/zz")


def test_normalize_rejects_non_text() -> None:
    with pytest.raises(PathError):
        normalize(b"a/b")  # type: ignore[arg-type]


def test_undecodable_local_name_is_rejected() -> None:
    # os.fsdecode turns invalid UTF-8 into lone surrogates: such names cannot be synced.
    with pytest.raises(PathError):
        normalize(os.fsdecode(b"bad\xffname"))


def test_join_inside() -> None:
    assert join_inside(ROOT, "a/b/c") == ROOT / "a" / "b" / "c"
    with pytest.raises(PathError):
        join_inside(ROOT, "../x")
    with pytest.raises(PathError):
        join_inside(ROOT, "dir/")  # not normalised: callers normalise first
    with pytest.raises(PathError):
        join_inside(ROOT, "e\u0301")


def test_casefold_collisions() -> None:
    paths = ["README", "readme", "Readme", "a/B", "a/b", "other", "stra\u00dfe", "STRASSE", "x"]
    assert casefold_collisions(paths) == [
        ("README", "Readme"),
        ("README", "readme"),
        ("STRASSE", "stra\u00dfe"),
        ("a/B", "a/b"),
    ]
    assert casefold_collisions(["same", "same", "Other"]) == []


def test_casefold_collisions_normalises_unicode() -> None:
    assert casefold_collisions(["\u00c9", "e\u0301"]) == [("e\u0301", "\u00c9")]


def test_temporary_and_internal() -> None:
    assert is_temporary(TEMP_PREFIX + "abc")
    assert is_temporary("dir/" + TEMP_PREFIX + "abc")
    assert not is_temporary("dir" + TEMP_PREFIX)
    assert not is_temporary(TEMP_PREFIX.rstrip("-") + "/x")
    assert is_internal(INTERNAL_DIR)
    assert is_internal(INTERNAL_DIR + "/versions/a")
    assert not is_internal(INTERNAL_DIR + "x")
    assert not is_internal("a/" + INTERNAL_DIR)


_hostile = st.lists(
    st.sampled_from(["..", ".", "", "a", "/", "\\", "\x00", "é", "e\u0301", "~", "C:", "\u2024"]),
    max_size=12,
).map("/".join)


@given(st.one_of(st.text(), _hostile, st.text(alphabet="./\\a\x00", max_size=20)))
@example("a/../..")
@example("a/b/")
def test_normalized_path_never_escapes(raw: str) -> None:
    try:
        rel = normalize(raw)
    except PathError:
        return
    assert normalize(rel) == rel  # idempotent
    assert unicodedata.is_normalized("NFC", rel)
    assert not rel.startswith("/")
    parts = rel.split("/")
    assert ".." not in parts
    assert "." not in parts
    assert "" not in parts
    joined = join_inside(ROOT, rel)
    assert joined.is_relative_to(ROOT)
    assert joined != ROOT
    assert not Path(rel).is_absolute()
    assert ".." not in Path(rel).parts
    # realpath of a path below a directory that does not exist is purely lexical.
    assert joined.resolve().is_relative_to(ROOT)


@given(
    st.one_of(
        st.text(),
        _hostile,
        st.text(alphabet="./\\a \x7f\x1f~é", max_size=20),
        st.text(alphabet="ab/.", min_size=250, max_size=300),
    )
)
@example("a" * MAX_NAME_SIZE)
@example("a" * (MAX_NAME_SIZE + 1))
@example(("a" * 200 + "/") * 20 + "a")
@example("d/./f")
@example("d//f")
@example("/d")
@example("d/")
@example("")
def test_is_normalized_says_whether_normalize_keeps_a_path(raw: str) -> None:
    """The quick test the scanner asks of every path it finds agrees with normalize."""
    try:
        kept = normalize(raw) == raw
    except PathError:
        kept = False
    assert is_normalized(raw) == kept


def test_a_plain_ascii_path_is_told_without_normalising_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scanner asks this of every path it finds: plain ASCII costs no Unicode work."""
    from lanshare import paths as paths_module

    asked: list[str] = []
    real = paths_module.normalize

    def counting(raw: str) -> str:
        asked.append(raw)
        return real(raw)

    monkeypatch.setattr(paths_module, "normalize", counting)
    assert is_normalized("d0001/f000123.txt")
    assert is_normalized("with space/and:colon~[x]")
    assert not is_normalized("d//f")
    assert asked == []
    assert is_normalized("日本語/файл")
    assert not is_normalized("e\u0301")
    assert asked == ["日本語/файл", "e\u0301"]
