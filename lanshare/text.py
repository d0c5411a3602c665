"""Strings others chose, made safe to show on a terminal or in a log line.

Pure: no I/O. Node names, paths, addresses and reasons reach us from peers (mDNS instance
names, announcements, indexes) and from the disk; printed as received, a C1 control such as
U+009B (CSI on some terminals) or ESC could drive the terminal, a newline could forge a line of
output or of the log, and a bidi override (U+202E) could make ``gpj.exe`` read as ``exe.jpg``.

Theory of operation: :func:`printable` escapes, as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``:

* control characters (Unicode category Cc: C0 including tab, newline and ESC, DEL, C1);
* format characters (Cf), which are invisible: bidi embeddings, overrides, isolates and marks,
  zero-width spaces, tag characters; except the zero-width joiner and non-joiner (U+200C,
  U+200D), which emoji sequences and several scripts need to be shown right;
* line and paragraph separators (Zl, Zp), which some terminals and log viewers break on;
* lone surrogates (Cs, undecodable file names via ``os.fsdecode``), which cannot be printed.

A backslash is shown doubled, so the result reads back to one string only. Everything else,
accented letters, other scripts and emoji included, is shown as it is. Human output goes
through :func:`printable`; JSON output stays exact (``json.dumps`` escapes for itself), and
:class:`PrintableFormatter` applies it to every log message.
"""

from __future__ import annotations

import logging
import re
import unicodedata

_SHOWN_FORMAT = frozenset("\u200c\u200d")
"""Format characters shown as they are: the zero-width non-joiner and joiner."""

_ESCAPED_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))

# Printable ASCII but the backslash never needs a look: ordinary text goes through at C speed.
_CANDIDATE = re.compile(r"[^ -\[\]-~]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    if unicodedata.category(char) not in _ESCAPED_CATEGORIES or char in _SHOWN_FORMAT:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with the characters that could act on a terminal or hide escaped (module
    docstring); a backslash doubled."""
    return _CANDIDATE.sub(_escape, text)


class PrintableFormatter(logging.Formatter):
    """A log formatter whose lines cannot be split or drive the terminal by what they quote.

    Only the message line is escaped: a traceback added after it keeps its own lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))
