"""Node identity: created once with safe permissions, stable afterwards, corruption reported."""

from __future__ import annotations

import stat
import threading
from typing import TYPE_CHECKING

import pytest

from lanshare import identity
from lanshare.errors import StorageError

if TYPE_CHECKING:
    from pathlib import Path


def test_created_once_then_stable(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    first = identity.load_or_create_node_id(state)
    assert len(first) == identity.NODE_ID_SIZE
    assert identity.load_or_create_node_id(state) == first
    path = state / identity.NODE_ID_FILE
    assert path.read_text() == first.hex() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert [p.name for p in state.iterdir()] == [identity.NODE_ID_FILE]  # no temp left behind


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    identity.load_or_create_node_id(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_different_state_dirs_get_different_ids(tmp_path: Path) -> None:
    ids = {identity.load_or_create_node_id(tmp_path / str(i)) for i in range(5)}
    assert len(ids) == 5


def test_existing_file_is_read_with_surrounding_whitespace(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("  0011223344556677 \n")
    node = identity.load_or_create_node_id(tmp_path)
    assert node == bytes.fromhex("0011223344556677")
    assert identity.short_id(node) == 0x0011223344556677


@pytest.mark.parametrize(
    "content",
    [b"", b"xyz", b"00112233", b"0011223344556677889900", b"\xff\xfe\x00", b"0011 2233 4455 6677"],
)
def test_corrupt_file_is_a_clear_storage_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "node_id").write_bytes(content)
    with pytest.raises(StorageError, match=r"node_id is corrupt .* delete it"):
        identity.load_or_create_node_id(tmp_path)
    assert (tmp_path / "node_id").read_bytes() == content  # never overwritten


def test_unreadable_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "node_id").mkdir()
    with pytest.raises(StorageError, match="cannot read the node id file"):
        identity.load_or_create_node_id(tmp_path)


def test_state_dir_that_is_a_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(StorageError):
        identity.load_or_create_node_id(tmp_path / "state")


def test_short_id_is_big_endian_u64() -> None:
    assert identity.short_id(identity.NodeId(b"\x00" * 7 + b"\x01")) == 1
    assert identity.short_id(identity.NodeId(b"\xff" * 8)) == 2**64 - 1


def test_concurrent_creators_agree(tmp_path: Path) -> None:
    results: list[bytes] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8, timeout=10)

    def create() -> None:
        try:
            barrier.wait()
            results.append(identity.load_or_create_node_id(tmp_path / "state"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(results) == 8
    assert len(set(results)) == 1
    assert (tmp_path / "state" / "node_id").read_text() == results[0].hex() + "\n"


def test_state_dir_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "state").symlink_to(tmp_path / "missing" / "dir")
    with pytest.raises(StorageError, match="cannot create the state directory"):
        identity.load_or_create_node_id(tmp_path / "state")
