"""The one exception hierarchy of lanshare and the helper that maps foreign errors into it.

Pure: no I/O. Every error that reaches a person is a ``LanshareError``; its message says what
happened and, where there is one, what to do about it.

Exit status, one rule for every command (the README's "Exit status" table): ``EXIT_FAILED``
the operation failed (a transfer, the disk, no peer has the path); ``EXIT_USAGE`` usage or
configuration (no config yet, a path outside every folder, a bad flag or file);
``EXIT_NO_DAEMON`` no daemon answers for a command that needs one; ``EXIT_NOT_IN_SYNC``
``status`` found a folder in ``error`` or ``paused`` (after printing it); ``EXIT_INTERRUPTED``
Ctrl-C. Each error class carries its status as ``exit_code``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_NOT_IN_SYNC = 4
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as shells report a command stopped by Ctrl-C."""


class LanshareError(Exception):
    """Something went wrong that a person can read about and act on."""

    #: Process exit status the command line uses for this kind of error.
    exit_code: int = EXIT_FAILED


class ConfigError(LanshareError):
    """The configuration (file, flags or key) is missing, unreadable or invalid."""

    exit_code = EXIT_USAGE


class UsageError(LanshareError):
    """A command was called with arguments that cannot work (e.g. a path outside every folder)."""

    exit_code = EXIT_USAGE


class KeyFormatError(ConfigError):
    """A folder key was mistyped: wrong length, unknown characters or a bad checksum."""


class PathError(LanshareError):
    """A relative path is not acceptable inside a shared folder (escapes it, control chars, …)."""


class ProtocolError(LanshareError):
    """The transfer protocol was violated. ``code`` is the wire error code, when there is one."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We used the protocol state machine wrongly: a bug in lanshare."""


class RemoteProtocolError(ProtocolError):
    """A peer broke the protocol: the session is closed and the peer penalised."""


class DecodeError(LanshareError):
    """A datagram or record from the network is malformed. Only codecs raise it."""


class IntegrityError(LanshareError):
    """Data does not match the hash it was announced with."""


class LocalChangeError(LanshareError):
    """A local file changed after a sync action was planned; the action was not applied."""


class TransferError(LanshareError):
    """A transfer gave up after retrying on every peer that could serve it."""


class StorageError(LanshareError):
    """The local filesystem or index failed (disk full, permission denied, …)."""


class DiskFullError(StorageError):
    """The filesystem has no space left (or the quota is used up)."""


class DescriptorsExhausted(StorageError):
    """The process (or the system) has no file descriptor left: wait, then try again."""


class ControlError(LanshareError):
    """The local control socket failed or answered with an error."""


class DaemonNotRunning(ControlError):
    """No lanshare daemon answers on the control socket."""

    exit_code = EXIT_NO_DAEMON


class DaemonOwnsState(DaemonNotRunning):
    """A daemon holds this config's state (its lock is taken) but its control socket does not
    answer here: a command must not start a node of its own beside it."""


class Interrupted(LanshareError):
    """The user interrupted a command (Ctrl-C); what it had done so far is kept."""

    exit_code = 130

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)


class NotImplementedYet(LanshareError):
    """The command exists but its feature is not built in this version."""


@contextmanager
def map_exceptions(mapping: Mapping[type[BaseException], type[LanshareError]]) -> Iterator[None]:
    """Re-raise foreign exceptions as the ``LanshareError`` subclass the mapping names.

    The first matching entry wins, so list subclasses before their bases. The original
    exception stays attached as ``__cause__`` for ``--debug`` tracebacks.
    """
    try:
        yield
    except LanshareError:
        raise
    except BaseException as exc:
        for foreign, ours in mapping.items():
            if isinstance(exc, foreign):
                raise ours(_describe(exc)) from exc
        raise


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__
