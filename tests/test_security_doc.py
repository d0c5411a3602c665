"""docs/security.md names the test behind each defence: every test it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
_CODE = re.compile(r"`([^`]+)`")


def named_tests(doc: str) -> list[tuple[str, str | None]]:
    """(file, test name or None for a whole file) for each test a table row of ``doc`` names.

    In a row, ``::name`` without a file is a test of the file named last before it.
    """
    named: list[tuple[str, str | None]] = []
    for line in doc.splitlines():
        if not line.startswith("|"):
            continue
        current = ""
        for ref in _CODE.findall(line):
            file, sep, name = ref.partition("::")
            if file.startswith("tests/"):
                current = file
            elif file or not sep or not current:
                continue
            named.append((current, name or None))
    return named


def test_every_test_the_security_doc_names_exists() -> None:
    named = named_tests(DOC.read_text(encoding="utf-8"))
    assert len(named) >= 20
    missing = []
    for file, name in named:
        path = ROOT / file
        if not path.is_file():
            missing.append(file)
        elif name is not None and not re.search(
            rf"^(async )?def {re.escape(name)}\(", path.read_text(encoding="utf-8"), re.M
        ):
            missing.append(f"{file}::{name}")
    assert missing == []


def test_a_name_without_a_file_belongs_to_the_file_named_before_it() -> None:
    row = "| x | `tests/a.py::one`, `::two`, `[sync] key`, `tests/b.py` |"
    assert named_tests(row) == [("tests/a.py", "one"), ("tests/a.py", "two"), ("tests/b.py", None)]
