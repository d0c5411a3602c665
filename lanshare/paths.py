"""Validation and normalisation of relative paths inside a shared folder.

Pure: no I/O. Every path that enters the index — from a local scan or from a peer — passes
through :func:`normalize`; :func:`join_inside` is the only way to turn one into a native path.

Choices, for network input (reject rather than silently repair):

* the result is relative, ``/``-separated and in Unicode NFC; one trailing ``/`` is dropped;
* rejected: empty paths, a leading ``/``, empty components (``a//b``), ``.`` and ``..``
  components, backslashes (a separator on Windows peers), control characters (C0, DEL, C1),
  lone surrogates (undecodable local names arrive as those via ``os.fsdecode``), a component
  longer than 255 bytes of UTF-8 and a whole path longer than 4096 bytes;
* Windows-reserved names (``CON``, ``aux.txt``, trailing dots or spaces, ``:``) are *accepted*:
  they are valid on Linux and macOS, and refusing them would make such files silently
  unsyncable there. A Windows peer must refuse them when it writes, not the whole network.

``join_inside`` is lexical: it cannot see symlinks. Whoever writes must still refuse to write
through a symlink (open with ``O_NOFOLLOW`` on each component or check ``is_symlink``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from lanshare.errors import PathError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

INTERNAL_DIR = ".lanshare"
"""Folder inside every share that holds lanshare's own data; never synced."""

MARKER = f"{INTERNAL_DIR}/folder-id"
"""The folder marker: names the folder it belongs to, so a scan can tell the folder's disk
from an empty mount point in its place (see ``lanshare.marker``)."""

TEMP_PREFIX = ".lanshare-tmp-"
"""Name prefix of temporary files written while a download is assembled; never synced."""

MAX_NAME_SIZE = 255
"""Largest path component, in bytes of UTF-8 (NAME_MAX on Linux)."""

MAX_PATH_SIZE = 4096
"""Largest whole relative path, in bytes of UTF-8 (PATH_MAX on Linux)."""

# C0 controls, DEL, C1 controls and lone surrogates (not encodable as UTF-8).
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def normalize(raw: str) -> str:
    """Return ``raw`` as a validated relative path: ``/``-separated, NFC, no trailing ``/``.

    Args:
        raw: a path relative to the folder root, from a scan or from the network.

    Returns:
        The canonical form. ``normalize(normalize(p)) == normalize(p)``.

    Raises:
        PathError: the path is not acceptable (see the module docstring for the rules).
    """
    if not isinstance(raw, str):
        raise PathError(f"path must be text, not {type(raw).__name__}")
    # Validate after NFC, so that nothing the composition produces slips past the checks.
    path = unicodedata.normalize("NFC", raw)
    if path.endswith("/"):
        path = path[:-1]
    if not path:
        raise PathError("empty path")
    if path.startswith("/"):
        raise PathError(f"absolute path not allowed: {path!r}")
    if "\\" in path:
        raise PathError(f"backslash not allowed in a path: {path!r}")
    bad = _first_bad_char(path)
    if bad is not None:
        raise PathError(f"character U+{ord(bad):04X} not allowed in a path: {path!r}")
    size = len(path.encode("utf-8"))
    if size > MAX_PATH_SIZE:
        raise PathError(f"path longer than {MAX_PATH_SIZE} bytes ({size}): {path[:80]!r}…")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise PathError(f"empty, '.' or '..' component not allowed: {path!r}")
        if len(part.encode("utf-8")) > MAX_NAME_SIZE:
            raise PathError(f"path component longer than {MAX_NAME_SIZE} bytes: {part[:80]!r}…")
    return path


_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]+")
"""Printable ASCII but the backslash: characters :func:`normalize` keeps as they are."""


def is_normalized(path: str) -> bool:
    """Whether :func:`normalize` accepts ``path`` and returns it unchanged; a plain ASCII
    path (most of them) is told without any Unicode work."""
    if len(path) <= MAX_PATH_SIZE and _PLAIN.fullmatch(path):
        for part in path.split("/"):
            if part in ("", ".", "..") or len(part) > MAX_NAME_SIZE:
                return False
        return True
    try:
        return normalize(path) == path
    except PathError:
        return False


def join_inside(root: Path, rel: str) -> Path:
    """Return the native path of the normalised ``rel`` below ``root``; never outside it.

    Raises:
        PathError: ``rel`` is not already in normalised form (call :func:`normalize` first).
    """
    if normalize(rel) != rel:
        raise PathError(f"path is not normalised: {rel!r}")
    return root.joinpath(*rel.split("/"))


def casefold_collisions(paths: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct paths that name the same file on a case-insensitive disk.

    Paths are compared after NFC and Unicode case folding. Each colliding group of ``n`` paths
    gives ``n - 1`` pairs ``(first, other)``, where ``first`` is the smallest of the group;
    the result is sorted. Include directories to catch ``Dir/a`` against ``dir/b``.
    """
    seen_first: dict[str, str] = {}  # folded form → the first path seen with it
    groups: dict[str, set[str]] = {}  # only the folded forms shared by several paths
    for path in paths:
        key = _fold(path)
        seen = seen_first.setdefault(key, path)
        if seen != path:
            groups.setdefault(key, {seen}).add(path)
    pairs: list[tuple[str, str]] = []
    for members in groups.values():
        if len(members) > 1:
            first, *others = sorted(members)
            pairs.extend((first, other) for other in others)
    pairs.sort()
    return pairs


def is_temporary(name: str) -> bool:
    """True if the last component of ``name`` is a lanshare temporary file."""
    return name.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)


def is_internal(rel: str) -> bool:
    """True if the normalised ``rel`` is the internal folder or lies inside it."""
    return rel == INTERNAL_DIR or rel.startswith(INTERNAL_DIR + "/")


def _fold(path: str) -> str:
    if path.isascii():  # NFC leaves ASCII as it is, and casefold() is lower() there
        folded = path.lower()
        return path if folded == path else folded  # one string less to keep per path
    # casefold() can leave a string un-normalised (e.g. U+0130), so normalise on both sides.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def _first_bad_char(path: str) -> str | None:
    match = _BAD_CHAR.search(path)
    return match.group() if match else None
