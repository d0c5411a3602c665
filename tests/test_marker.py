"""The folder marker on real directories: written once, found, and what its absence means."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from lanshare import keys, marker
from lanshare.cli import main
from lanshare.errors import StorageError
from lanshare.paths import MARKER

if TYPE_CHECKING:
    from pathlib import Path

THIS = keys.folder_id(keys.generate_key())
OTHER = keys.folder_id(keys.generate_key())


def test_written_marker_is_found_and_names_its_folder_only(tmp_path: Path) -> None:
    assert marker.read(tmp_path, THIS) is marker.Found.NONE
    marker.write(tmp_path, THIS)
    assert marker.read(tmp_path, THIS) is marker.Found.THIS
    assert marker.read(tmp_path, OTHER) is marker.Found.OTHER
    text = (tmp_path / MARKER).read_text()
    assert THIS.hex() not in text  # the id itself never lands on the disk
    assert [p.name for p in (tmp_path / ".lanshare").iterdir()] == ["folder-id"]  # no temp left
    marker.write(tmp_path, OTHER)  # `init --key` over another share's folder re-marks it
    assert marker.read(tmp_path, OTHER) is marker.Found.THIS


def test_a_first_indexing_writes_the_marker(tmp_path: Path) -> None:
    (tmp_path / "old-file.txt").write_text("here before")
    assert marker.check(tmp_path, THIS, list) == ""
    assert marker.read(tmp_path, THIS) is marker.Found.THIS


def test_an_empty_mount_point_pauses_and_gets_no_marker(tmp_path: Path) -> None:
    reason = marker.check(tmp_path, THIS, lambda: ["photos", "notes.txt"])
    assert reason.startswith("folder marker missing (disk not mounted?)")
    assert not (tmp_path / ".lanshare").exists()  # the real disk's marker is not hidden


def test_another_folders_marker_pauses_and_is_kept(tmp_path: Path) -> None:
    marker.write(tmp_path, OTHER)
    (tmp_path / "photos").mkdir()
    reason = marker.check(tmp_path, THIS, lambda: ["photos"])
    assert reason.startswith("folder marker missing (disk not mounted?)")
    assert "names another folder" in reason
    assert marker.read(tmp_path, OTHER) is marker.Found.THIS


def test_a_lost_marker_beside_the_indexed_files_is_written_again(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    asked: list[int] = []

    def held() -> list[str]:
        asked.append(1)
        return ["notes.txt", "photos"]

    assert marker.check(tmp_path, THIS, held) == ""
    assert marker.read(tmp_path, THIS) is marker.Found.THIS
    assert marker.check(tmp_path, THIS, held) == ""
    assert len(asked) == 1  # with the marker in place, the index is not asked


def test_an_unwritable_marker_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / ".lanshare").write_text("a file where the directory belongs")
    with pytest.raises(StorageError, match="cannot write the folder marker"):
        marker.write(tmp_path, THIS)
    assert sorted(os.listdir(tmp_path)) == [".lanshare"]


def test_a_folder_where_no_marker_can_be_written_is_still_scanned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ".lanshare").write_text("a file where the directory belongs")
    (tmp_path / "photos").mkdir()
    assert marker.check(tmp_path, THIS, list) == ""
    assert marker.check(tmp_path, THIS, lambda: ["photos"]) == ""
    assert "cannot write the folder marker" in caplog.text
    # Its files gone too, it is paused all the same: nothing proves the disk is there.
    (tmp_path / "photos").rmdir()
    assert marker.check(tmp_path, THIS, lambda: ["photos"]).startswith(marker.PAUSE_REASON)


def test_init_marks_the_folder_it_shares_and_a_refused_init_marks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    folder = tmp_path / "Shared"
    folder.mkdir()
    marker.write(folder, OTHER)  # left by a share this folder once belonged to
    key = keys.format_key(keys.generate_key())

    def init(*argv: str) -> int:
        with pytest.raises(SystemExit) as exited:
            main(["init", *argv, "--config", str(config)])
        capsys.readouterr()
        return exited.value.code if isinstance(exited.value.code, int) else 1

    assert init(str(folder), "--key", key) == 0
    this = keys.folder_id(keys.parse_key(key))
    assert marker.read(folder, this) is marker.Found.THIS
    # Sharing the same folder again is refused, and its marker stays this folder's.
    assert init(str(folder)) == 2
    assert marker.read(folder, this) is marker.Found.THIS


def test_the_stamp_says_which_index_state_the_folder_was_last_in(tmp_path: Path) -> None:
    marker.write(tmp_path, THIS)
    assert marker.generation(tmp_path, THIS) is None  # as `init` leaves it
    stamp = marker.Generation(bytes.fromhex("0011223344556677"), 42)
    marker.write(tmp_path, THIS, stamp, durable=False)
    assert marker.read(tmp_path, THIS) is marker.Found.THIS
    assert marker.generation(tmp_path, THIS) == stamp
    assert marker.generation(tmp_path, OTHER) is None


def test_a_torn_marker_proves_nothing_and_is_written_again(tmp_path: Path) -> None:
    marker.write(tmp_path, THIS)
    (tmp_path / MARKER).write_bytes(b"")  # a power cut right after the rename
    assert marker.read(tmp_path, THIS) is marker.Found.NONE
    (tmp_path / "photos").mkdir()
    assert marker.check(tmp_path, THIS, lambda: ["photos"]) == ""
    assert marker.read(tmp_path, THIS) is marker.Found.THIS
