"""Ignore rules of a shared folder: gitignore semantics over normalised relative paths.

Pure apart from :meth:`IgnoreRules.for_folder`, which reads the folder's ``.lanshareignore``,
and :class:`FolderRules`, the one live set of rules of a folder: the scanner, the engine's
planner and the watcher all ask the same object, and the engine reloads it (one ``stat``
when nothing changed) before each scan, so an edit of ``.lanshareignore`` reaches all three
at once. The internal ``.lanshare/`` folder and temporary files are always ignored, whatever
the rules.

Semantics are git's (``pathspec``'s ``GitIgnoreSpec``, each line compiled by
:func:`lanshare.globs.gitignore_pattern`): ``*.log``, ``/top-only``, ``build/``
(directories only), ``a/**/b``, ``!negation`` with the last matching pattern winning, and — as
in git — a path below an ignored directory stays ignored even if a later ``!`` pattern names
it (git never looks inside an ignored directory), so a scanner may prune ignored directories
or not and get the same answer. Precedence is git's too: the config's ``ignore`` patterns
(per machine, like ``.git/info/exclude``) come first, ``.lanshareignore`` (per folder, like
``.gitignore``) after them, so the folder's file wins. ``.lanshareignore`` itself is synced
unless a rule says otherwise, so every peer can share the same rules.

Theory of operation
-------------------
* **The file is data from peers.** Any key holder can sync a ``.lanshareignore``, so it is
  read without following a symlink (``O_NOFOLLOW``; a link to ``/dev/zero`` or to a file
  outside the folder is not read), without blocking on open (``O_NONBLOCK``: a FIFO nobody
  writes never hangs a scan), only if it is a regular file (``fstat`` of what was opened),
  and at most :data:`MAX_IGNORE_FILE_SIZE` + 1 bytes. One that fails any of these
  (:class:`IgnoreFileError`) is left out: :class:`FolderRules` then holds the config's
  patterns alone and keeps the reason in :attr:`FolderRules.problem`, which the folder's
  ``status`` lists, until the file changes; the folder goes on syncing.
* **Matching cost is bounded.** The patterns and the names they are matched against may
  both come from a peer, so no line may make a match backtrack without bound (as
  ``a*a*a*a*a*b`` against a long name did with ``pathspec``'s own regexes): every line is
  compiled by :mod:`lanshare.globs`, whose matching costs at most the path's length times
  the pattern's, for the config's patterns and the file's alike.
* **The number of patterns is bounded.** Each costs every path matched; only the first
  :data:`MAX_IGNORE_PATTERNS` of the file are used, the rest named in the problem.
* **One bad line spoils only itself.** An invalid pattern (as a stray non-UTF-8 byte) leaves
  out its own line, named in the problem, not the file: dropping every rule of the file
  would sync what its other lines keep private, and failing would stop every scan.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from typing import TYPE_CHECKING

from pathspec import GitIgnoreSpec

from lanshare.errors import ConfigError, StorageError
from lanshare.globs import gitignore_pattern
from lanshare.paths import INTERNAL_DIR, TEMP_PREFIX

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

logger = logging.getLogger(__name__)

IGNORE_FILE = ".lanshareignore"
"""Name of the rules file in a folder's root."""

MAX_IGNORE_FILE_SIZE = 1024 * 1024
"""A larger ``.lanshareignore`` is refused rather than compiled into a huge regex set."""
MAX_IGNORE_PATTERNS = 1000
"""Patterns of ``.lanshareignore`` used, at most: every path a scan or a plan meets is
matched against each, so their number is each path's cost (a hand-written file has tens)."""

#: What pathspec raises for a bad pattern: its own ValueError, or the ``re.error`` of a
#: bracket expression it passes to ``re`` as written (``[a-*]``: a bad character range).
_PATTERN_ERRORS = (ValueError, re.error)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_READ_CHUNK = 64 * 1024

_CACHE_SIZE = 8192  # directory verdicts kept; a scan visits each directory's files together


class IgnoreFileError(ConfigError):
    """``.lanshareignore`` is not a regular file we can read, or is too large: not used."""


def read_ignore_file(path: Path) -> bytes:
    """The content of the rules file ``path`` (empty if there is none), never through a
    symlink, never blocking on a FIFO or a device, never more than the size cap.

    Raises:
        IgnoreFileError: ``path`` is a symlink, not a regular file, larger than
            :data:`MAX_IGNORE_FILE_SIZE` or unreadable.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IgnoreFileError(f"{path} is a symlink; not followed, so not used") from exc
        raise IgnoreFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IgnoreFileError(f"{path} is not a regular file, so not used")
        chunks: list[bytes] = []
        left = MAX_IGNORE_FILE_SIZE + 1
        while left > 0 and (chunk := os.read(fd, min(left, _READ_CHUNK))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise IgnoreFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if left <= 0:
        raise IgnoreFileError(f"{path} is larger than {MAX_IGNORE_FILE_SIZE} bytes, so not used")
    return b"".join(chunks)


def _compile(lines: Sequence[str]) -> GitIgnoreSpec:
    """The spec of ``lines``, each compiled with a bounded matching cost.

    Raises:
        ValueError, re.error: a line is not a valid pattern.
    """
    # "simple": pathspec's other backends would hand our regexes to an engine of their own.
    return GitIgnoreSpec.from_lines(lines, pattern_factory=gitignore_pattern, backend="simple")


def _valid(line: str) -> bool:
    """True if ``line`` alone is a valid gitignore line (each line is a pattern of its own)."""
    try:
        _compile([line])
    except _PATTERN_ERRORS:
        return False
    return True


class IgnoreRules:
    """A compiled set of ignore patterns; :meth:`matches` says whether a path is ignored."""

    __slots__ = ("_dir_cache", "_empty", "_spec", "patterns", "problem")

    def __init__(self, patterns: Sequence[str]) -> None:
        """Compile gitignore-style ``patterns`` (blank lines and ``#`` comments allowed).

        Raises:
            ConfigError: a pattern is not valid gitignore syntax.
        """
        self.patterns: tuple[str, ...] = tuple(patterns)
        try:
            self._spec = _compile(self.patterns)
        except _PATTERN_ERRORS as exc:
            raise ConfigError(f"invalid ignore pattern: {exc}") from exc
        self._dir_cache: dict[str, bool] = {}
        self.problem = ""
        """What was left out of the folder's file by :meth:`for_folder`, and why; "" if none."""
        # No pattern at all (most folders): a scan asks about every entry, so the matcher,
        # which would answer no for each, is not asked.
        self._empty = not any(
            line.strip() and not line.lstrip().startswith("#") for line in self.patterns
        )

    @classmethod
    def for_folder(cls, root: Path, extra: Sequence[str] = ()) -> IgnoreRules:
        """The rules of the folder at ``root``: ``extra`` (from the config), then its file.

        Invalid lines of the file are left out, each alone, and named in :attr:`problem`.

        Raises:
            ConfigError: a pattern in ``extra`` is invalid.
            IgnoreFileError: the file is there but not usable (see :func:`read_ignore_file`).
        """
        path = root / IGNORE_FILE
        raw = read_ignore_file(path)
        # A stray non-UTF-8 byte spoils one pattern, not the whole folder's sync.
        lines = raw.decode("utf-8", errors="replace").splitlines()
        try:
            extra_rules = cls(extra)
        except ConfigError as exc:
            raise ConfigError(f"folder {root}: ignore: {exc}") from exc
        problem = ""
        try:
            cls(lines)
        except ConfigError:
            # The file may come from any peer: one bad line must not stop every scan, nor
            # drop the other rules (which would sync what they kept private).
            invalid = [number for number, line in enumerate(lines, 1) if not _valid(line)]
            skipped = set(invalid)
            lines = ["" if number in skipped else line for number, line in enumerate(lines, 1)]
            shown = ", ".join(map(str, invalid[:10])) + (", …" if len(invalid) > 10 else "")
            which = f"line {shown}" if len(invalid) == 1 else f"lines {shown}"
            problem = f"{path}: invalid pattern on {which}, not used"
            logger.warning("%s", problem)
        numbers = [n for n, line in enumerate(lines) if line.strip() and line[0] != "#"]
        if len(numbers) > MAX_IGNORE_PATTERNS:
            first_unused = numbers[MAX_IGNORE_PATTERNS]
            lines = lines[:first_unused]
            too_many = (
                f"{path}: more than {MAX_IGNORE_PATTERNS} patterns; "
                f"lines {first_unused + 1} to the end not used"
            )
            problem = f"{problem}; {too_many}" if problem else too_many
            logger.warning("%s", too_many)
        logger.debug("%s: %d patterns + %d from the config", path, len(lines), len(extra))
        rules = cls([*extra_rules.patterns, *lines])
        rules.problem = problem
        return rules

    def matches(self, rel: str, is_dir: bool) -> bool:
        """True if the normalised path ``rel`` (a directory if ``is_dir``) is ignored."""
        first, _, _ = rel.partition("/")
        if first == INTERNAL_DIR:
            return True
        head, _, name = rel.rpartition("/")
        if name.startswith(TEMP_PREFIX):
            return True
        if head and self._dir_ignored(head):
            return True
        return not self._empty and self._spec.match_file(rel + "/" if is_dir else rel)

    def _dir_ignored(self, directory: str) -> bool:
        """True if ``directory`` or any directory above it is ignored (cached).

        Walks up to the nearest directory with a verdict, then down: no recursion, as a
        peer's path may be 2,048 components deep.
        """
        below: list[str] = []
        verdict = False
        while directory:
            cached = self._dir_cache.get(directory)
            if cached is not None:
                verdict = cached
                break
            below.append(directory)
            directory = directory.rpartition("/")[0]
        for path in reversed(below):
            verdict = (
                verdict
                or path.rpartition("/")[2].startswith(TEMP_PREFIX)
                or (not self._empty and self._spec.match_file(path + "/"))
            )
            if len(self._dir_cache) >= _CACHE_SIZE:
                self._dir_cache.clear()
            self._dir_cache[path] = verdict
        return verdict

    def __repr__(self) -> str:
        return f"IgnoreRules({list(self.patterns)!r})"


class FolderRules:
    """The live ignore rules of one folder: the config's patterns, then its ``.lanshareignore``.

    Starts with the config's patterns alone (the file is read by the first :meth:`reload`);
    :meth:`matches` always answers with the rules last loaded. A file that cannot be used
    leaves the config's patterns alone in force, and why in :attr:`problem` (as are the
    invalid lines of a file that can).
    """

    __slots__ = ("_stamp", "extra", "problem", "root", "rules")

    def __init__(self, root: Path, extra: Sequence[str] = ()) -> None:
        """Raises:
        ConfigError: a pattern of ``extra`` is invalid.
        """
        self.root = root
        self.extra: tuple[str, ...] = tuple(extra)
        self.rules = IgnoreRules(self.extra)
        self._stamp: tuple[int, int, int, int] | None = None  # the file's lstat when loaded
        self.problem = ""
        """Why ``.lanshareignore``, or some lines of it, is not used, as the last
        :meth:`reload` found; "" if all of it is."""

    def matches(self, rel: str, is_dir: bool) -> bool:
        """True if the normalised path ``rel`` (a directory if ``is_dir``) is ignored."""
        return self.rules.matches(rel, is_dir)

    def reload(self) -> bool:
        """Read ``.lanshareignore`` again if it changed (blocking); true if the rules changed.

        Raises:
            StorageError: the folder cannot be looked into (the old rules stay).
        """
        try:
            st = os.lstat(self.root / IGNORE_FILE)
            stamp: tuple[int, int, int, int] | None = (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
        except (FileNotFoundError, NotADirectoryError):
            stamp = None
        except OSError as exc:
            raise StorageError(
                f"cannot read {self.root / IGNORE_FILE}: {exc.strerror or exc}"
            ) from exc
        if stamp == self._stamp and (stamp is not None or self.rules.patterns == self.extra):
            return False
        try:
            fresh = IgnoreRules.for_folder(self.root, self.extra)
            problem = fresh.problem
        except IgnoreFileError as exc:
            fresh, problem = IgnoreRules(self.extra), str(exc)
            logger.warning("%s; syncing with the config's ignore patterns alone", problem)
        self._stamp, self.problem = stamp, problem
        if fresh.patterns == self.rules.patterns:
            return False
        self.rules = fresh
        return True

    def __repr__(self) -> str:
        return f"FolderRules({self.root!s}, {self.rules!r})"
