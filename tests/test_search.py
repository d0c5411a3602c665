"""``lanshare.search``: matching, ranking, sizes and holders, pure."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanshare.errors import UsageError
from lanshare.manifest import Block, EntryType, FileRecord, VersionVector
from lanshare.search import Query, held_fraction, holders, parse_size
from tests.bounded import run_python

A, B, C = b"\xaa" * 8, b"\xbb" * 8, b"\xcc" * 8


def _matching(
    terms: list[str], paths: list[str], *, dirs: frozenset[str] = frozenset()
) -> list[str]:
    query = Query.parse(terms)
    return [p for p in paths if query.rank(p, p in dirs) is not None]


def _ranked(terms: list[str], paths: list[str]) -> list[str]:
    query = Query.parse(terms)
    hits = [p for p in paths if query.rank(p, False) is not None]
    return sorted(hits, key=lambda p: query.rank(p, False))


# -- matching ---------------------------------------------------------------------------------


def test_a_plain_term_is_a_substring_of_the_path_ignoring_case() -> None:
    paths = ["Docs/Report.PDF", "music/reporter.mp3", "misc/rep.txt", "été/Übung.txt"]
    assert _matching(["report"], paths) == ["Docs/Report.PDF", "music/reporter.mp3"]
    assert _matching(["DOCS/rep"], paths) == ["Docs/Report.PDF"]
    assert _matching(["ÉTÉ/übung"], paths) == ["été/Übung.txt"]


def test_every_term_must_match() -> None:
    paths = ["photos/2024/beach.jpg", "photos/2023/beach.jpg", "notes/2024.txt"]
    assert _matching(["2024", "beach"], paths) == ["photos/2024/beach.jpg"]
    assert _matching(["2024", "*.jpg"], paths) == ["photos/2024/beach.jpg"]
    assert _matching(["2024", "beach", "nowhere"], paths) == []


def test_a_glob_has_gitignore_semantics() -> None:
    paths = [
        "a.pdf",
        "docs/b.PDF",
        "docs/deep/c.pdf",
        "docs/x.pdf.txt",
        "other/docs/d.pdf",
        "file1.txt",
        "file22.txt",
        "fileb.txt",
    ]
    # No slash: the name at any depth.
    assert _matching(["*.pdf"], paths) == [
        "a.pdf",
        "docs/b.PDF",
        "docs/deep/c.pdf",
        "other/docs/d.pdf",
    ]
    # A slash anchors it at the folder's root; * stays within one component, ** crosses.
    assert _matching(["docs/*.pdf"], paths) == ["docs/b.PDF"]
    assert _matching(["docs/**/*.pdf"], paths) == ["docs/b.PDF", "docs/deep/c.pdf"]
    assert _matching(["**/docs/*.pdf"], paths) == ["docs/b.PDF", "other/docs/d.pdf"]
    assert _matching(["file?.txt"], paths) == ["file1.txt", "fileb.txt"]
    assert _matching(["file[0-9].txt"], paths) == ["file1.txt"]
    assert _matching(["FILE[!0-9].TXT"], paths) == ["fileb.txt"]


def test_a_glob_matches_what_lies_below_a_matching_directory_and_a_dir_pattern_only_dirs() -> None:
    paths = ["x.d", "x.d/inside.txt", "y.d"]
    assert _matching(["*.d"], paths) == paths
    assert _matching(["*.d/"], paths, dirs=frozenset({"x.d"})) == ["x.d", "x.d/inside.txt"]


HOSTILE_SEARCH = """
import json
from lanshare.search import Query

query = Query.parse(["A*A*A*A*A*A*A*B", "**/a*a*a*a*a*a*x"])
name = "a" * 255
paths = [name, "/".join([name] * 16), name[:-1] + "b", name[:-1] + "b/" + name[:-1] + "x"]
print(json.dumps([query.rank(p, False) is not None for p in paths]))
"""


def test_a_glob_term_against_long_names_is_answered_within_bounds() -> None:
    """The names come from peers: a term that backtracked for ever against one 255-byte
    name under pathspec's own regex answers at once, for names and a 4 KiB path."""
    assert json.loads(run_python(HOSTILE_SEARCH)) == [False, False, False, True]


def test_a_bracket_in_a_bracket_expression_is_one_of_its_characters() -> None:
    """Python's re warns of "[[" (which the tests make an error): the term still works."""
    assert _matching(["a[[b]*"], ["a[x", "abx", "acx"]) == ["a[x", "abx"]


def test_a_leading_bang_or_hash_is_literal() -> None:
    paths = ["!important.txt", "#notes.md", "important.txt"]
    assert _matching(["!imp*"], paths) == ["!important.txt"]
    assert _matching(["#*.md"], paths) == ["#notes.md"]


# -- ranking ----------------------------------------------------------------------------------


def test_names_before_directories_exact_before_partial_then_shorter_then_path_order() -> None:
    paths = [
        "report/2024/summary.txt",  # only a directory matches
        "old/reports.txt",  # partial name
        "a/b/c/report",  # exact name, long path
        "z/report",  # exact name
        "y/report",  # exact name, same length: path order
        "reporting.md",  # partial name, short path
        "x/my-report/report.txt",  # partial name (and a directory)
    ]
    assert _ranked(["report"], paths) == [
        "y/report",
        "z/report",
        "a/b/c/report",
        "reporting.md",
        "old/reports.txt",
        "x/my-report/report.txt",
        "report/2024/summary.txt",
    ]


def test_more_terms_in_the_name_rank_first_and_a_tail_of_the_path_is_exact() -> None:
    paths = ["beach/2024.jpg", "2024/beach.jpg", "trips/beach-2024.jpg"]
    # Both terms in the name beats one in the name, one in a directory.
    assert _ranked(["beach", "2024"], paths)[0] == "trips/beach-2024.jpg"
    # A term naming a tail of the path, ending with the name, is exact.
    assert _ranked(["docs/readme"], ["docs/readme", "docs/readme.md", "mydocs/readme"]) == [
        "docs/readme",
        "mydocs/readme",
        "docs/readme.md",
    ]


def test_a_glob_matching_the_name_ranks_before_one_matching_a_directory() -> None:
    paths = ["music.mp3/cover.jpg", "songs/deep/a.mp3", "b.mp3"]
    assert _ranked(["*.mp3"], paths) == ["b.mp3", "songs/deep/a.mp3", "music.mp3/cover.jpg"]


# -- narrowing in SQLite ----------------------------------------------------------------------


def test_fragments_are_the_literal_pieces_of_each_term() -> None:
    assert Query.parse(["Report", "*.PDF"]).fragments() == [".pdf", "report"]
    assert Query.parse(["docs/**/a?c[xy]z*"]).fragments() == ["a", "c", "docs", "z"]
    assert Query.parse(["a\\*b*"]).fragments() == ["a*b"]
    # "]" first in a bracket expression is one of its characters, not its end.
    assert Query.parse(["[]x]y*"]).fragments() == ["y"]
    assert Query.parse(["[!]x]y*"]).fragments() == ["y"]
    assert Query.parse(["ab[\\]]cd*"]).fragments() == ["ab"]


_NAME = st.text(alphabet="abAB.-_*?[]!^\\é", min_size=1, max_size=6)


@given(
    path=st.lists(
        st.text(alphabet="abAB.-_xé[]!^\\", min_size=1, max_size=5), min_size=1, max_size=4
    ),
    pattern=st.lists(_NAME | st.just("**"), min_size=1, max_size=3),
)
def test_every_matching_path_contains_every_fragment(path: list[str], pattern: list[str]) -> None:
    """What the index narrows with never leaves out a match."""
    rel = "/".join(path)
    try:
        query = Query.parse(["/".join(pattern)])
    except UsageError:
        return  # a pattern that does not compile is refused before any search
    if query.rank(rel, False) is not None:
        folded = rel.casefold()
        assert all(f in folded for f in query.fragments()), (rel, query.fragments())


# -- filters and usage errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("123", 123),
        ("123B", 123),
        ("10K", 10 * 1024),
        ("10k", 10 * 1024),
        ("10M", 10 * 1024**2),
        ("10MiB", 10 * 1024**2),
        ("1.5G", 3 * 1024**3 // 2),
        ("2T", 2 * 1024**4),
        (" 7 M ", 7 * 1024**2),
    ],
)
def test_sizes_are_bytes_or_iec(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "10X", "1.5", "10 MBs", "1e6", "0x10", "10MM"])
def test_a_bad_size_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="is not a"):
        parse_size(text)


@pytest.mark.parametrize(
    ("terms", "options", "message"),
    [
        ([], {}, "at least one term"),
        ([" "], {}, "empty search term"),
        (["[z-a]*"], {}, "not a valid pattern"),
        (["[abc"], {}, "matches nothing"),
        (["x"], {"type_name": "pipe"}, "--type is one of file, dir, symlink"),
        (["x"], {"min_size": 10, "max_size": 9}, "--min-size 10 is above --max-size 9"),
        (["x"], {"limit": 0}, "--limit must be at least 1"),
    ],
)
def test_a_bad_query_is_a_usage_error(
    terms: list[str], options: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        Query.parse(terms, **options)  # type: ignore[arg-type]


def test_filters_apply_to_type_and_size() -> None:
    query = Query.parse(["x"], type_name="file", min_size=10, max_size=20)
    assert query.accepts(EntryType.FILE, 10)
    assert query.accepts(EntryType.FILE, 20)
    assert not query.accepts(EntryType.FILE, 9)
    assert not query.accepts(EntryType.FILE, 21)
    assert not query.accepts(EntryType.DIR, 15)
    assert Query.parse(["x"]).accepts(EntryType.SYMLINK, 0)


# -- holders ----------------------------------------------------------------------------------


def _record(blocks: list[tuple[bytes, int]], file_hash: bytes = b"\x01" * 32) -> FileRecord:
    offsets = [sum(size for _, size in blocks[:i]) for i in range(len(blocks))]
    return FileRecord(
        path="f.bin",
        type=EntryType.FILE,
        size=sum(size for _, size in blocks),
        mtime_ns=1,
        mode=0o644,
        symlink_target="",
        blocks=tuple(Block(off, size, h) for off, (h, size) in zip(offsets, blocks, strict=True)),
        file_hash=file_hash,
        hash_algo="blake3",
        version=VersionVector().bump(1),
        sequence=1,
        deleted=False,
    )


def test_held_fraction_counts_bytes_of_announced_blocks() -> None:
    record = _record([(b"a" * 32, 100), (b"b" * 32, 300), (b"c" * 32, 600)])
    assert held_fraction(record, set()) == 0.0
    assert held_fraction(record, {b"b" * 32}) == pytest.approx(0.3)
    assert held_fraction(record, {b"a" * 32, b"c" * 32, b"z" * 32}) == pytest.approx(0.7)
    assert held_fraction(_record([]), set()) == 1.0


def test_holders_whole_partial_connected_and_not_other_versions() -> None:
    shown = _record([(b"a" * 32, 500), (b"b" * 32, 500)])
    older = dataclasses.replace(shown, file_hash=b"\x02" * 32)
    theirs = {A: shown, C: older, b"\xdd" * 8: shown.tombstone(VersionVector().bump(9), 2)}
    building = {B: (shown, {b"a" * 32})}
    got = holders(shown, theirs, building, connected={B}, names={A: "alice", B: "bob"})
    assert got == [
        {"id": B.hex(), "name": "bob", "fraction": 0.5, "connected": True},
        {"id": A.hex(), "name": "alice", "fraction": 1.0, "connected": False},
    ]
    # A peer building another version holds none of this one; one whose record is this
    # version holds it whole, whatever it builds.
    assert holders(shown, {A: shown}, {A: (older, set()), C: (older, set())}, {A, C}, {}) == [
        {"id": A.hex(), "name": "", "fraction": 1.0, "connected": True}
    ]
