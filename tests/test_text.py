"""What a peer or the disk names is shown escaped, never acting on the terminal or the log."""

from __future__ import annotations

import logging
import sys
import unicodedata

import pytest

from lanshare.text import PrintableFormatter, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\x1b[2Jb", "a\\x1b[2Jb"),  # ESC: C0
        ("\x00\x07\x08", "\\x00\\x07\\x08"),
        ("one\ntwo\rthree\tfour", "one\\x0atwo\\x0dthree\\x09four"),
        ("del\x7f", "del\\x7f"),
        ("\x80\x85\x9b31m\x9f", "\\x80\\x85\\x9b31m\\x9f"),  # C1, U+009B is CSI
        ("photo\u202egpj.exe", "photo\\u202egpj.exe"),  # right-to-left override
        ("\u202a\u202b\u202c\u202d", "\\u202a\\u202b\\u202c\\u202d"),  # embeddings, overrides
        ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),  # isolates
        ("\u200e\u200f\u061c", "\\u200e\\u200f\\u061c"),  # bidi marks
        ("ad\u200bmin\ufeff\u00ad", "ad\\u200bmin\\ufeff\\xad"),  # invisible
        ("hidden\U000e0041\U000e007f", "hidden\\U000e0041\\U000e007f"),  # tag characters
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),  # separators
        ("undecodable\udcff", "undecodable\\udcff"),  # os.fsdecode of a byte not UTF-8
    ],
)
def test_characters_that_act_or_hide_are_escaped(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw).isprintable()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain name-1_2.txt",
        "café",
        "日本語のファイル",
        "Ελληνικά/קובץ/ملف",
        "😀 👍🏽 ❤️",
        "👨\u200d👩\u200d👧",  # a family: zero-width joiners
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian needs the non-joiner
        "non\u00a0breaking\u3000space",
        "[bold]not markup[/]",
    ],
)
def test_ordinary_text_is_shown_as_it_is(text: str) -> None:
    assert printable(text) == text


def test_a_backslash_is_doubled_so_what_is_shown_is_unambiguous() -> None:
    assert printable("a\\b") == "a\\\\b"
    # A literal backslash-x and an escaped ESC do not look alike.
    assert printable("\\x1b") == "\\\\x1b"
    assert printable("\x1b") == "\\x1b"
    assert printable("\\x1b") != printable("\x1b")


def test_every_character_shown_as_is_prints_and_every_other_is_escaped() -> None:
    """Over the whole of Unicode: what is left alone is printable or a space or a joiner, and
    nothing escaped is an ordinary printable character."""
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        shown = printable(char)
        category = unicodedata.category(char)
        if shown == char:
            assert category not in ("Cc", "Cf", "Cs", "Zl", "Zp") or char in "\u200c\u200d", hex(
                code
            )
        else:
            assert char == "\\" or category in ("Cc", "Cf", "Cs", "Zl", "Zp"), hex(code)
            assert shown.startswith("\\")
            assert shown.isascii()
            assert shown.isprintable()


def _record(message: str, *args: object, exc_info: bool = False) -> logging.LogRecord:
    info = sys.exc_info() if exc_info else None
    return logging.LogRecord("lanshare.daemon", logging.INFO, __file__, 1, message, args, info)


def test_log_lines_cannot_be_forged_or_drive_the_terminal_by_what_they_quote() -> None:
    formatter = PrintableFormatter("%(levelname)s %(name)s: %(message)s")
    name = "evil\nERROR lanshare.daemon: forged\x1b]0;title\x07\u202e"
    line = formatter.format(_record("peer %s (%s) up", name, "ab12"))
    assert line == (
        "INFO lanshare.daemon: peer evil\\x0aERROR lanshare.daemon: forged\\x1b]0;title\\x07"
        "\\u202e (ab12) up"
    )
    assert len(line.splitlines()) == 1


def test_a_traceback_after_the_message_keeps_its_lines() -> None:
    formatter = PrintableFormatter("%(levelname)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed on %s", "a\nb", exc_info=True)
    lines = formatter.format(record).splitlines()
    assert lines[0] == "INFO: failed on a\\x0ab"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
