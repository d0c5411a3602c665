"""The control socket with a real server on the loop and the real blocking client."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lanshare.control import ControlClient, ControlServer
from lanshare.errors import ControlError, DaemonNotRunning, StorageError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable


async def _status(params: dict[str, Any], progress: Any) -> Any:
    return {"folders": [], "echo": params.get("echo")}


async def _counting(params: dict[str, Any], progress: Any) -> Any:
    for done in range(int(params["steps"])):
        await progress({"done": done})
    return "finished"


async def _failing(params: dict[str, Any], progress: Any) -> Any:
    raise StorageError("disk full: /srv/share")


async def _misused(params: dict[str, Any], progress: Any) -> Any:
    raise UsageError("/elsewhere is not inside any shared folder")


HANDLERS = {"status": _status, "count": _counting, "fail": _failing, "misused": _misused}


def _with_server(path: Path, client_work: Callable[[], Any], **server_args: Any) -> Any:
    """Run a real server on a fresh loop while the blocking client works in a thread."""

    async def scenario() -> Any:
        server = ControlServer(path, HANDLERS, **server_args)
        await server.start()
        try:
            return await asyncio.wait_for(asyncio.to_thread(client_work), timeout=30)
        finally:
            await server.close()

    return asyncio.run(scenario())


def test_call_progress_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"

    def client() -> Any:
        with ControlClient(path) as c:
            status = c.call("status", {"echo": 7})
            streamed = list(c.stream("count", {"steps": 3}))
            with pytest.raises(ControlError, match="disk full"):
                c.call("fail")
            with pytest.raises(ControlError, match="unknown method"):
                c.call("nonsense")
            after_errors = c.call("status")
            return status, streamed, after_errors

    status, streamed, after_errors = _with_server(path, client)
    assert status == {"folders": [], "echo": 7}
    assert streamed == [
        ("progress", {"done": 0}),
        ("progress", {"done": 1}),
        ("progress", {"done": 2}),
        ("result", "finished"),
    ]
    assert after_errors["echo"] is None
    assert not path.exists()


def test_socket_is_private(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    def client() -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert _with_server(path, client) == 0o600


def test_malformed_requests_get_errors_and_keep_the_connection(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    def client() -> list[bytes]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b'not json\n[1,2]\n{"id": 3, "method": 5}\n')
            sock.sendall(b'{"id": 4, "method": "status", "params": {}}\n')
            data = b""
            while data.count(b"\n") < 4:
                chunk = sock.recv(4096)
                assert chunk
                data += chunk
            return data.splitlines()

    lines = _with_server(path, client)
    assert b"not valid JSON" in lines[0]
    assert b"JSON object" in lines[1]
    assert b'"id":3' in lines[2]
    assert b'"result"' in lines[3]


def test_no_daemon_means_daemon_not_running(tmp_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="no lanshare daemon"):
        ControlClient(tmp_path / "absent.sock").connect()


def test_second_server_refuses_and_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        first = ControlServer(path, HANDLERS)
        await first.start()
        try:
            with pytest.raises(ControlError, match="already running"):
                await ControlServer(path, HANDLERS).start()
        finally:
            await first.close()

    asyncio.run(scenario())
    # A socket file left behind by a crashed daemon: nobody listens on it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.exists()

    def client() -> Any:
        with ControlClient(path) as c:
            return c.call("status")

    assert _with_server(path, client)["folders"] == []


def test_regular_file_in_the_way_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")

    async def scenario() -> None:
        with pytest.raises(ControlError, match="not a socket"):
            await ControlServer(path, HANDLERS).start()

    asyncio.run(scenario())
    assert path.read_text() == "precious"


# The probe runs as "nobody", who cannot enter a virtualenv under /root: any system Python will do.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin")
PROBE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(10)\n"
    "s.connect(sys.argv[1])\n"
    "try:\n"
    '    s.sendall(b\'{"id": 1, "method": "status", "params": {}}\\n\')\n'
    "    answer = s.recv(4096)\n"
    "except (BrokenPipeError, ConnectionResetError):  # refused before the request was sent\n"
    "    answer = b''\n"
    "print('refused' if answer == b'' else 'answered')\n"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 runnable by nobody")
def test_other_users_are_refused_by_credentials() -> None:
    # pytest's tmp_path sits below a 0700 directory that "nobody" cannot traverse.
    with tempfile.TemporaryDirectory(prefix="lanshare-control-") as public:
        os.chmod(public, 0o755)
        _refuse_nobody(Path(public) / "control.sock")


def _refuse_nobody(path: Path) -> None:
    def client() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SYSTEM_PYTHON), "-c", PROBE, str(path)],
            user=65534,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    # World-writable on purpose: only the credential check stands between nobody and the API.
    result = _with_server(path, client, mode=0o666)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused"


def test_errors_keep_their_exit_status_over_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    def client() -> tuple[int, int]:
        with ControlClient(path) as c:
            with pytest.raises(ControlError) as failed:
                c.call("fail")
            with pytest.raises(ControlError, match="not inside any shared folder") as misused:
                c.call("misused")
            return failed.value.exit_code, misused.value.exit_code

    assert _with_server(path, client) == (1, 2)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 runnable by nobody")
def test_members_of_the_control_group_are_let_in() -> None:
    group = 65534  # nogroup: nobody is in it, root (the server here) may give files to it
    with tempfile.TemporaryDirectory(prefix="lanshare-control-") as public:
        os.chmod(public, 0o755)
        path = Path(public) / "run" / "control.sock"

        def client() -> tuple[os.stat_result, os.stat_result, str, str]:
            member = _probe(path, user=65534, group=group)
            outsider = _probe(path, user=65534, group=65533)
            return path.stat(), path.parent.stat(), member, outsider

        sock, directory, member, outsider = _with_server(path, client, mode=0o660, group=group)
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, group)
    # The directory the server made lets the group reach the socket, and nobody else.
    assert (stat.S_IMODE(directory.st_mode), directory.st_gid) == (0o750, group)
    assert member == "answered"
    assert outsider == "PermissionError: [Errno 13] Permission denied"  # the mode already


def _probe(path: Path, *, user: int, group: int) -> str:
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", PROBE, str(path)],
        user=user,
        group=group,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        return result.stderr.strip().splitlines()[-1]
    return result.stdout.strip()
