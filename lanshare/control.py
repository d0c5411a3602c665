"""The local control API: JSON lines over a Unix socket, between the CLI and the daemon.

I/O. The daemon runs ``ControlServer`` on its loop; the CLI uses the blocking ``ControlClient``.
Each request is one line ``{"id": N, "method": "...", "params": {...}}``; the answer is zero
or more ``{"id": N, "progress": {...}}`` lines followed by exactly one ``{"id": N, "result":
...}`` or ``{"id": N, "error": {"message": "...", "exit_code": N}}`` line (the exit status
the command line gives the error, so a command fails alike with or without a daemon). Only
the daemon's own user, root, and (for the system service, ``[node] control_group``) members
of the socket's group may connect: checked with SO_PEERCRED, not just with file modes; the
socket is then mode 0660 and of that group, and a socket directory the server creates is
0750 and of that group, so the group can reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from lanshare.errors import ControlError, DaemonNotRunning, LanshareError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

Progress: TypeAlias = Callable[[dict[str, Any]], Awaitable[None]]
"""How a handler reports progress: one JSON object per call, sent as a progress line."""
Handler: TypeAlias = Callable[[dict[str, Any], Progress], Awaitable[Any]]
"""A control method: gets the request's params and the progress callback."""

logger = logging.getLogger(__name__)

MAX_LINE_SIZE = 1024 * 1024
"""Longest request or answer line accepted; a listing of a large folder fits."""
MAX_CONNECTIONS = 32
"""Simultaneous CLI connections; more are refused rather than queued without end."""
CONNECT_TIMEOUT = 5.0


class ControlServer:
    """Serves ``handlers`` by method name on a Unix socket until ``close()``."""

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        *,
        mode: int = 0o600,
        group: int | None = None,
    ) -> None:
        self._path = path
        self._handlers = dict(handlers)
        self._mode = mode
        self._group = group
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the socket; refuse if another daemon already answers on it.

        Raises:
            ControlError: another daemon is running, or the socket cannot be created.
        """
        _remove_stale_socket(self._path)
        directory = self._path.parent
        if not directory.is_dir():
            try:
                directory.mkdir(parents=True, mode=0o700 if self._group is None else 0o750)
                if self._group is not None:
                    os.chown(directory, -1, self._group)
            except OSError as exc:
                raise ControlError(f"cannot create the directory {directory}: {exc}") from exc
        # Bind under a restrictive umask so the socket is never briefly open to others.
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self._path), limit=MAX_LINE_SIZE
            )
        except OSError as exc:
            raise ControlError(f"cannot create the control socket {self._path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        try:
            if self._group is not None:
                os.chown(self._path, -1, self._group)
            os.chmod(self._path, self._mode)
        except OSError as exc:
            await self.close()
            raise ControlError(
                f"cannot give the control socket {self._path} to its group: {exc}"
            ) from exc

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        try:
            if self._peer_allowed(writer):
                await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.geteuid()):
            return True
        if self._group is not None and (gid == self._group or _user_in_group(uid, self._group)):
            return True
        logger.warning("refused control connection from pid %d uid %d", pid, uid)
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                await _send(writer, {"id": None, "error": {"message": "request too long"}})
                return
            except asyncio.IncompleteReadError:
                return
            request_id, method, params, problem = _parse_request(line)
            if problem is not None:
                await _send(writer, {"id": request_id, "error": {"message": problem}})
                continue
            handler = self._handlers.get(method)
            if handler is None:
                message = f"unknown method {method!r}"
                await _send(writer, {"id": request_id, "error": {"message": message}})
                continue

            async def progress(update: dict[str, Any], request_id: Any = request_id) -> None:
                await _send(writer, {"id": request_id, "progress": update})

            try:
                result = await handler(params, progress)
            except LanshareError as exc:
                error = {
                    "message": str(exc),
                    "kind": type(exc).__name__,
                    "exit_code": exc.exit_code,
                }
                await _send(writer, {"id": request_id, "error": error})
            else:
                await _send(writer, {"id": request_id, "result": result})


class ControlClient:
    """Blocking client the CLI uses; one request at a time."""

    def __init__(self, path: Path, timeout: float | None = 30.0) -> None:
        self._path = path
        self._timeout = timeout
        self._next_id = 0
        self._socket: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> ControlClient:
        if self._socket is None:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        """Raises DaemonNotRunning when nothing answers on the socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self._path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonNotRunning(
                f"no lanshare daemon is running (nothing answers on {self._path}); "
                "start one with `lanshare daemon`"
            ) from exc
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot reach the daemon on {self._path}: {exc}") from exc
        sock.settimeout(self._timeout)
        self._socket = sock

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return its result, ignoring progress lines."""
        result: Any = None
        for kind, value in self.stream(method, params):
            if kind == "result":
                result = value
        return result

    def stream(
        self, method: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[tuple[str, Any]]:
        """Yield ``("progress", update)`` pairs and finally ``("result", value)``.

        Raises:
            ControlError: the daemon answered with an error or hung up.
        """
        if self._socket is None:
            self.connect()
        assert self._socket is not None
        self._next_id += 1
        request_id = self._next_id
        line = json.dumps({"id": request_id, "method": method, "params": dict(params or {})})
        try:
            self._socket.sendall(line.encode() + b"\n")
            while True:
                message = self._read_message()
                if message.get("id") != request_id:
                    continue
                if "progress" in message:
                    yield "progress", message["progress"]
                elif "error" in message:
                    raise _remote_error(message["error"])
                else:
                    yield "result", message.get("result")
                    return
        except TimeoutError as exc:
            raise ControlError("the daemon did not answer in time") from exc
        except OSError as exc:
            raise ControlError(f"lost the connection to the daemon: {exc}") from exc

    def _read_message(self) -> dict[str, Any]:
        assert self._socket is not None
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE_SIZE:
                raise ControlError("the daemon sent an answer that is too long")
            chunk = self._socket.recv(65536)
            if not chunk:
                raise ControlError("the daemon closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise ControlError("the daemon sent a malformed answer") from exc
        if not isinstance(message, dict):
            raise ControlError("the daemon sent a malformed answer")
        return message


def _remote_error(error: object) -> ControlError:
    """The daemon's error answer as an exception with the daemon's exit status."""
    fields = error if isinstance(error, dict) else {}
    problem = ControlError(str(fields.get("message") or "the daemon reported an error"))
    code = fields.get("exit_code")
    if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 126:
        problem.exit_code = code
    return problem


def _parse_request(line: bytes) -> tuple[Any, str, dict[str, Any], str | None]:
    try:
        request = json.loads(line)
    except ValueError:
        return None, "", {}, "request is not valid JSON"
    if not isinstance(request, dict):
        return None, "", {}, "request must be a JSON object"
    request_id = request.get("id")
    method = request.get("method")
    params = request.get("params", {})
    if not isinstance(method, str) or not isinstance(params, dict):
        return request_id, "", {}, "request needs a string 'method' and an object 'params'"
    return request_id, method, params, None


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by a crashed daemon; refuse if a live daemon answers on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; remove it or change control_socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONNECT_TIMEOUT)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlError(f"cannot check the control socket {path}: {exc}") from exc
        path.unlink(missing_ok=True)
    else:
        raise ControlError(
            f"another lanshare daemon is already running on {path}; stop it first "
            "(or give this one another config)"
        )
    finally:
        probe.close()


def _user_in_group(uid: int, gid: int) -> bool:
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid or user.pw_name in group.gr_mem
