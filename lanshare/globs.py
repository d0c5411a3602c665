"""gitignore patterns compiled to regular expressions whose matching cost is bounded.

Pure. :func:`gitignore_pattern` turns one gitignore line into a ``pathspec`` pattern that
``GitIgnoreSpec`` combines as it does its own (last match wins, a directory match ranks below
a full one), so :mod:`lanshare.ignore` and :mod:`lanshare.search` keep ``pathspec``'s
semantics while matching in time bounded by the path's length times the pattern's.

Theory of operation
-------------------
* **Why not pathspec's own regex.** ``pathspec`` writes ``*`` as ``[^/]*`` and ``**`` as
  ``(?:.+/)?`` for Python's backtracking ``re``: ``a*a*a*a*a*b`` against one 255-byte name
  tries every way of placing the ``a``s (seconds for five stars, centuries for eight), and
  whoever syncs a ``.lanshareignore`` and names files chooses both sides.
* **pathspec still parses.** It reads the line (comments, ``!``, trailing spaces and ``\\ ``,
  escapes, bracket expressions, invalid lines, lines git drops); only lines it turns into a
  regex are translated again here, cut into segments and normalised as it does, so what is
  valid, what is a no-op and what a bracket expression holds stay exactly its own (the
  bracket text is handed to ``re`` as it does).
* **Leftmost is enough.** Between two ``*`` a component glob has a chunk of fixed length
  (literals, ``?``, bracket expressions). If a name matches with a middle chunk at some place,
  it also matches with that chunk at its leftmost possible place: what follows starts with a
  ``*``, which reaches from the earlier end whatever the later one reached. So each
  ``*chunk`` is an atomic group ``(?>[^/]*?chunk)``, found once and never revisited; only the
  last chunk is pinned to the end of the component. Blocks of components between ``**`` are
  placed the same way, at the leftmost component where they match, in an atomic group; only
  the last block is pinned to the end of the path.
* **Full match before directory match.** ``pathspec`` marks (group ``ps_d``) a match that
  stopped at a ``/`` (the pattern named a directory above the path), and its regex finds a
  match that reaches the end of the path whenever there is one. Here the two are separate
  alternatives, the full one first, each with bounded cost.
* **A name is a name.** ``pathspec``'s ``.`` stops at a newline and its ``$`` matches before
  a final one, so ``secret`` missed ``a\\nb/secret`` and matched ``secret\\n``; here any
  character but ``/`` is part of a name, as in git.
"""

from __future__ import annotations

import re

from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

_DIR_MARK = "(?P<ps_d>/)"
"""pathspec's own name for the group that marks a directory match."""

_SKIP = "(?:[^/]*+/)*?"
"""Zero or more whole components, fewest first: what ``**`` stands for before a block."""


def gitignore_pattern(line: str) -> GitIgnoreSpecPattern:
    """One gitignore line as a ``pathspec`` pattern whose regex never backtracks without bound.

    Raises:
        ValueError: the line is not a valid pattern (as ``pathspec`` says).
        re.error: a bracket expression is not a valid set (as ``pathspec`` says).
    """
    parsed = GitIgnoreSpecPattern(line)
    if parsed.include is None:
        return parsed
    return GitIgnoreSpecPattern(re.compile(translate(line)), parsed.include)


def translate(line: str) -> str:
    """The regex for ``line``, a pattern ``pathspec`` turns into one (not a blank line, a
    comment, a lone ``/`` or a line with a bracket expression that never closes)."""
    text = line if line.endswith("\\ ") else line.rstrip()
    segments = text.removeprefix("!").split("/")
    is_dir = not segments[-1]
    if not segments[0]:
        del segments[0]  # a leading "/" anchors at the root
    elif segments[0] != "**" and (len(segments) == 1 or (len(segments) == 2 and not segments[1])):
        segments.insert(0, "**")  # no "/" inside: a name at any depth
    if not segments[-1]:
        segments[-1] = "**"  # a trailing "/": the directory and all below it
    segments = [
        s for i, s in enumerate(segments) if not (s == "**" and segments[i - 1 : i] == ["**"])
    ]
    whole = _whole_path_override(segments, is_dir)
    if whole is not None:
        return whole
    lead = segments[0] == "**"
    tail: str | None = None
    if segments[-1] == "**":
        tail = _DIR_MARK if is_dir else "/"
        segments = segments[:-1]
    blocks: list[list[str]] = [[]]
    for segment in segments[lead:]:
        if segment == "**":
            blocks.append([])
        else:
            blocks[-1].append(_component(segment))
    if tail is not None:
        return "^" + _body(lead, blocks, last_atomic=True) + tail
    full = _body(lead, blocks, last_atomic=False)
    below = _body(lead, blocks, last_atomic=True)
    return f"^(?:{full}\\Z|{below}{_DIR_MARK})"


def _whole_path_override(segments: list[str], is_dir: bool) -> str | None:
    """pathspec's fixed regexes for ``**``, ``*``, ``*/`` and the like (all linear)."""
    if segments == ["**"] or segments == ["**", "*"]:
        return _DIR_MARK if is_dir and segments == ["**"] else "(?s:.)"
    if segments == ["**", "*", "**"]:
        return _DIR_MARK if is_dir else "/"
    return None


def _body(lead: bool, blocks: list[list[str]], last_atomic: bool) -> str:
    """The blocks in order, each after the components a ``**`` skips; every block but a last
    one pinned to the end is placed at its leftmost match, atomically."""
    parts: list[str] = []
    for number, block in enumerate(blocks):
        inner = "/".join(block)
        if number == 0 and not lead:
            parts.append(inner)  # anchored at the root: one place only
        elif number < len(blocks) - 1 or last_atomic:
            parts.append(("/" if number else "") + f"(?>{_SKIP}{inner})")
        else:
            parts.append(("/" if number else "") + _SKIP + inner)
    return "".join(parts)


def _component(segment: str) -> str:
    """The regex for one component glob, atomic: it matches a whole component or fails."""
    if segment == "*":
        return "[^/]++"  # as pathspec's "[^/]+": a lone "*" is never an empty name
    chunks: list[list[str]] = [[]]
    i, end = 0, len(segment)
    while i < end:
        char = segment[i]
        i += 1
        if char == "\\":
            chunks[-1].append(re.escape(segment[i]))  # never last: pathspec refuses that
            i += 1
        elif char == "*":
            chunks.append([])
        elif char == "?":
            chunks[-1].append("[^/]")
        elif char == "[":
            i = _bracket(segment, i, chunks[-1])
        else:
            chunks[-1].append(re.escape(char))
    if len(chunks) == 1:
        return "".join(chunks[0]) + "(?![^/])"
    first, *middle, last = ("".join(chunk) for chunk in chunks)
    lazy = "".join(f"(?>[^/]*?{chunk})" for chunk in middle if chunk)
    return f"(?>{first}{lazy}[^/]*{last}(?![^/]))"


def _bracket(segment: str, start: int, out: list[str]) -> int:
    """Append the bracket expression opening before ``start`` as pathspec writes it (its
    text for ``re``, backslashes literal, ``!`` or ``^`` first negates); return the index
    past it. pathspec drops a line whose expression never closes, so this one closes."""
    j = start
    if j < len(segment) and segment[j] in "!^":
        j += 1
    if j < len(segment) and segment[j] == "]":
        j += 1
    j = segment.index("]", j) + 1
    negate = segment[start] in "!^"
    text = segment[start + negate : j].replace("\\", "\\\\")
    out.append("(?!/)[" + "^" * negate + text)  # as in git, never a "/", even for "[!a]"
    return j
