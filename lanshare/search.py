"""Finding files by name across what the LAN shares (``lanshare search``): matching, ranking,
sizes and holders.

Pure: no I/O. ``listing.search_lan`` asks the index for candidates (``Index.search_candidates``,
narrowed in SQLite by the fragments a :class:`Query` gives), then this module decides.

Theory of operation
-------------------
* **Terms.** Every term must match the path, compared case-insensitively (both sides
  ``str.casefold``-ed). A plain term matches as a substring anywhere in the path, ``/``
  included. A term with ``*``, ``?`` or ``[`` is one gitignore pattern (``pathspec``'s
  ``GitIgnoreSpec``, compiled as ``lanshare.ignore`` compiles its lines, so matching it
  against the long names a peer chose costs a bounded time): ``*`` stays within one path
  component, ``**`` crosses them, a pattern without a slash matches a name at any depth,
  one with a slash is anchored at the folder's root, and a path below a matching directory
  matches too. A leading ``!`` or ``#`` is taken literally: a term is a pattern, not a rules file.
* **Narrowing in SQLite.** :meth:`Query.fragments` are the literal pieces every matching
  path contains (a plain term whole, the literal runs of a glob). The index keeps the rows
  whose path contains all of them ignoring case; SQLite folds ASCII only, so a path with
  any other character is always kept and decided here. The candidates are thus a
  superset of the matches, and the filters (type, sizes) likewise apply to any record of the
  path in SQL, to the version shown here.
* **Ranking** (:meth:`Query.rank`: None for a path that does not match), best first: more
  terms matching the file name (the last component) before terms matching only a directory;
  then an exact name (a plain term equal to the name, or to a whole tail of the path ending
  in it; a glob matching the name) before a partial one; then shorter paths; then path
  order. The rank needs only the path, so the records of the best candidates alone are read.
* **Holders** (:func:`holders`): each peer that holds the version shown (fraction 1.0), and
  each connected peer downloading it now, with the share of its bytes in the blocks it
  announced (its in-progress entry and HAVEs: it re-shares them as it downloads); whether the
  peer is connected now. Connected first, then by fraction, then by id.
* **Sizes** (:func:`parse_size`): bytes, or a number with an IEC suffix ``K``, ``M``, ``G``,
  ``T`` (powers of 1024; ``10M``, ``1.5G``, ``10MiB`` alike).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lanshare.errors import UsageError
from lanshare.globs import gitignore_pattern
from lanshare.manifest import EntryType

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

    from lanshare.manifest import FileRecord

GLOB_CHARS: Final = frozenset("*?[")
TYPES: Final = {"file": EntryType.FILE, "dir": EntryType.DIR, "symlink": EntryType.SYMLINK}
"""The ``--type`` names, as ``ls`` shows them."""

_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?|b)?\s*", re.IGNORECASE)
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``10K``, ``10M``, ``1.5G``, ``2T`` (IEC: powers of 1024).

    Raises:
        UsageError: anything else, or a negative or fractional number of bytes.
    """
    found = _SIZE.fullmatch(text)
    if found is None:
        raise UsageError(
            f"{text!r} is not a size: give bytes, or a number with K, M, G or T (powers of "
            "1024), as 500, 10M or 1.5G"
        )
    number, unit = found.group(1), (found.group(2) or "").lower()
    value = float(number) * _UNITS[unit]
    if unit == "" and "." in number:
        raise UsageError(f"{text!r} is not a whole number of bytes")
    return int(value)


@dataclass(frozen=True, slots=True)
class Term:
    """One search term, case-folded; ``glob`` is its pattern's regular expression when it
    is a glob (:func:`lanshare.globs.gitignore_pattern`'s, over normalised paths)."""

    text: str
    glob: re.Pattern[str] | None

    @classmethod
    def parse(cls, raw: str) -> Term:
        """Raises ``UsageError`` for an empty term or a glob that does not compile."""
        text = raw.casefold()
        if not text.strip():
            raise UsageError("an empty search term matches nothing: give a word or a pattern")
        if not GLOB_CHARS & set(text):
            return cls(text, None)
        # A lone pattern, not a rules file: "!x*" and "#x*" mean those names.
        pattern = "\\" + text if text[0] in "!#" else text
        try:
            # re warns of "[[" (a set inside a set, some day): for us it is the literal "[".
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                compiled = gitignore_pattern(pattern)
        except (ValueError, re.error) as exc:
            raise UsageError(f"{raw!r} is not a valid pattern: {exc}") from None
        if not compiled.include or compiled.regex is None:
            raise UsageError(f"{raw!r} is a pattern that matches nothing (write \\[ for a [)")
        return cls(text, compiled.regex)

    def fragments(self) -> list[str]:
        """Literal pieces (no ``/``) that every path this term matches contains."""
        if self.glob is None:
            return [self.text]
        text = self.text
        pieces: list[str] = []
        run: list[str] = []
        i = 0
        while i < len(text):
            char = text[i]
            if char == "\\":
                run.append(text[i + 1 : i + 2])
                i += 2
                continue
            if char not in "*?[/":
                run.append(char)
                i += 1
                continue
            pieces.append("".join(run))
            run = []
            i += 1
            if char == "[":
                # A bracket expression is no literal: skip it ("]" first, after an optional
                # "!" or "^", is one of its characters). One that holds an escape, or never
                # closes, ends the pieces: fewer pieces only widen the candidates.
                end = i + (text[i : i + 1] in ("!", "^"))
                end = text.find("]", end + (text[end : end + 1] == "]"))
                if end < 0 or "\\" in text[i:end]:
                    return [p for p in pieces if p]
                i = end + 1
        pieces.append("".join(run))
        return [p for p in pieces if p]

    def matches(self, folded: str, is_dir: bool) -> bool:
        """Whether the term matches the case-folded path."""
        if self.glob is None:
            return self.text in folded
        return self.glob.match(folded + "/" if is_dir else folded) is not None

    def in_name(self, folded: str, is_dir: bool) -> tuple[bool, bool]:
        """(matches the name, matches it exactly), for a term that matches ``folded``."""
        start = folded.rfind("/") + 1
        if self.glob is None:
            at = folded.rfind(self.text)
            end = at + len(self.text)
            named = end > start
            exact = (
                named and end == len(folded) and at <= start and (at == 0 or folded[at - 1] == "/")
            )
            return named, exact
        # A glob names the entry itself when the directory holding it does not match already.
        named = start == 0 or self.glob.match(folded[:start]) is None
        return named, named


@dataclass(frozen=True, slots=True)
class Query:
    """A search: every term must match; the filters apply to the version shown."""

    terms: tuple[Term, ...]
    type: EntryType | None = None
    min_size: int | None = None
    max_size: int | None = None
    limit: int = 100

    @classmethod
    def parse(
        cls,
        terms: Sequence[str],
        *,
        type_name: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        limit: int = 100,
    ) -> Query:
        """Raises ``UsageError``: no term, a bad term or type, sizes the wrong way round."""
        if not terms:
            raise UsageError("search needs at least one term")
        if type_name is not None and type_name not in TYPES:
            raise UsageError(f"--type is one of {', '.join(TYPES)}, not {type_name!r}")
        if min_size is not None and max_size is not None and min_size > max_size:
            raise UsageError(f"--min-size {min_size} is above --max-size {max_size}")
        if limit < 1:
            raise UsageError("--limit must be at least 1")
        return cls(
            tuple(Term.parse(t) for t in terms),
            TYPES[type_name] if type_name is not None else None,
            min_size,
            max_size,
            limit,
        )

    def fragments(self) -> list[str]:
        """Literal pieces every matching path contains, case-folded (for the index)."""
        return sorted({f for term in self.terms for f in term.fragments()})

    def accepts(self, entry_type: EntryType, size: int) -> bool:
        """Whether the version shown (of this type and size) passes the filters."""
        if self.type is not None and entry_type is not self.type:
            return False
        if self.min_size is not None and size < self.min_size:
            return False
        return self.max_size is None or size <= self.max_size

    def rank(self, path: str, is_dir: bool) -> tuple[int, int, int, str] | None:
        """Sort key of ``path``, smaller is better (module docstring); None: no match."""
        folded = path.casefold()
        if not all(term.matches(folded, is_dir) for term in self.terms):
            return None
        named = exact = 0
        for term in self.terms:
            in_name, is_exact = term.in_name(folded, is_dir)
            named += in_name
            exact += is_exact
        return (-named, 0 if exact else 1, len(path), path)


def held_fraction(record: FileRecord, have: Collection[bytes]) -> float:
    """The share of ``record``'s bytes in blocks whose hashes are in ``have``."""
    if record.size <= 0:
        return 1.0 if not record.blocks else 0.0
    held = sum(block.size for block in record.blocks if block.hash in have)
    return min(1.0, held / record.size)


def holders(
    shown: FileRecord,
    theirs: Mapping[bytes, FileRecord],
    building: Mapping[bytes, tuple[FileRecord, Collection[bytes]]],
    connected: Collection[bytes],
    names: Mapping[bytes, str],
) -> list[dict[str, Any]]:
    """Who holds the version ``shown``: the JSON ``holders`` list (module docstring).

    ``theirs``: each peer's stored record of the path; ``building``: for each connected peer
    downloading it, the record it builds and the block hashes it announced.
    """
    fractions: dict[bytes, float] = {}
    for peer, record in theirs.items():
        if not record.deleted and same_version(record, shown):
            fractions[peer] = 1.0
    for peer, (record, have) in building.items():
        if peer not in fractions and same_version(record, shown):
            fractions[peer] = held_fraction(record, have)
    order = sorted(fractions, key=lambda p: (p not in connected, -fractions[p], p))
    return [
        {
            "id": peer.hex(),
            "name": names.get(peer, ""),
            "fraction": fractions[peer],
            "connected": peer in connected,
        }
        for peer in order
    ]


def same_version(a: FileRecord, b: FileRecord) -> bool:
    """Whether two records hold the same content (type, hash, link target, deleted)."""
    return (a.type, a.file_hash, a.symlink_target, a.deleted) == (
        b.type,
        b.file_hash,
        b.symlink_target,
        b.deleted,
    )
