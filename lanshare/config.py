"""Configuration: frozen dataclasses, loaded from TOML and validated in one place.

Reads the one config file (``load``) and, for ``lanshare init`` and the daemon's first run,
writes it atomically (``add_folder``, ``ensure_config``). Precedence: defaults < file < flags.

The system service (``systemd/lanshare.service``) reads ``SYSTEM_CONFIG``. A new file created
at that path names the service's ``state_dir``, ``control_socket`` and ``control_group`` in a
``[node]`` table, so that whoever reads the file (the service, or root's ``lanshare status
--config /etc/lanshare/config.toml``) finds the same index and the same socket, whatever their
environment. Members of ``SYSTEM_GROUP`` use the service with no config of their own:
``user_control_sockets`` ends with ``SYSTEM_CONTROL_SOCKET``.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import ipaddress
import math
import os
import re
import secrets
import shlex
import socket
import stat
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lanshare import keys
from lanshare.addressing import IP_VERSIONS
from lanshare.errors import ConfigError
from lanshare.manifest import MAX_VECTOR_DEVICES, MAX_VERSION_ENTRIES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

DEFAULT_PORT = 47474

MIN_DATAGRAM_SIZE = 1200
"""Smallest allowed ``max_datagram_size``: the QUIC minimum (RFC 9000 §14), which fits the IPv6
minimum MTU of 1280 bytes less the 40-byte IPv6 and 8-byte UDP headers, so every IP path
carries it unfragmented."""
MAX_DATAGRAM_SIZE = 65507
"""Largest allowed ``max_datagram_size``: 65535 less the 20-byte IPv4 and 8-byte UDP headers,
the largest payload one UDP datagram can carry over IPv4 (only useful on loopback)."""
MAX_NAME_SIZE = 63
"""``node.name`` is an mDNS instance name: one DNS label, at most 63 bytes of UTF-8."""
MAX_SOCKET_PATH_SIZE = 107
"""``sun_path`` holds 108 bytes on Linux, including the terminating NUL."""
MAX_CONFIG_SIZE = 1024 * 1024
"""A config file larger than this is refused rather than read."""
MAX_PEER_RECORDS = 2_000_000
"""Default of ``[sync] max_peer_records``: twenty times a large honest folder (100,000 files),
small enough that one peer cannot fill the disk or the planner's time with invented records."""
MAX_PEER_RECORDS_LIMIT = 1_000_000_000
LOG_LEVELS = ("debug", "info", "warning", "error")
FAST_PATH_MODES = ("auto", "on", "off")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_config_path() -> Path:
    """``$LANSHARE_CONFIG``, else ``$XDG_CONFIG_HOME/lanshare/config.toml``."""
    explicit = os.environ.get("LANSHARE_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config") / "lanshare" / "config.toml"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/lanshare`` (``~/.local/state/lanshare``): index and node identity."""
    return _xdg("XDG_STATE_HOME", ".local/state") / "lanshare"


def default_control_socket() -> Path:
    """``$XDG_RUNTIME_DIR/lanshare/control.sock``, else ``control.sock`` in the state dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lanshare" / "control.sock"
    return default_state_dir() / "control.sock"


SYSTEM_CONFIG = Path("/etc/lanshare/config.toml")
"""The system service's config file (``systemd/lanshare.service``)."""
SYSTEM_STATE_DIR = Path("/var/lib/lanshare")
"""The service's ``StateDirectory=lanshare``."""
SYSTEM_CONTROL_SOCKET = Path("/run/lanshare/control.sock")
"""The service's control socket, in its ``RuntimeDirectory=lanshare``."""
SYSTEM_GROUP = "lanshare"
"""The service's group: its members may use the control socket."""
_SYSTEM_NODE: dict[str, object] = {
    "state_dir": SYSTEM_STATE_DIR,
    "control_socket": SYSTEM_CONTROL_SOCKET,
    "control_group": SYSTEM_GROUP,
}
"""What ``SYSTEM_CONFIG`` means for [node] keys it does not set."""


def user_control_sockets() -> tuple[Path, ...]:
    """Where a user with no config of their own looks for a daemon, in order: their own
    (``default_control_socket()``), then the system service's."""
    own = default_control_socket()
    return (own,) if own == SYSTEM_CONTROL_SOCKET else (own, SYSTEM_CONTROL_SOCKET)


def default_folder_path() -> Path:
    """``~/LanShare``: the folder ``lanshare init`` and the daemon's first run share."""
    return Path.home() / "LanShare"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    """Name shown to other peers and used as the mDNS instance name."""
    state_dir: Path = field(default_factory=default_state_dir)
    """Where the index database and the node identity live."""
    control_socket: Path = field(default_factory=default_control_socket)
    """Unix socket the command line uses to talk to the daemon."""
    control_group: str = ""
    """Group whose members may use the control socket too (mode 0660); empty: only the
    daemon's user and root (mode 0600)."""


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    port: int = DEFAULT_PORT
    """UDP port for the transfer protocol; 0 picks any free port."""
    bind: tuple[str, ...] = ()
    """Local addresses to bind the UDP socket to; empty: what ``ip_version`` needs (``::``,
    which takes IPv4 too, or ``0.0.0.0`` for ``v4``)."""
    ip_version: str = "both"
    """IP versions announced, browsed and dialled: ``v4``, ``v6`` or ``both``."""
    interfaces: tuple[str, ...] = ()
    """Interface names (or addresses) mDNS uses; empty means all."""
    static_peers: tuple[str, ...] = ()
    """``host:port`` of peers to contact directly, for networks without multicast."""
    max_datagram_size: int = 1452
    """Largest UDP payload sent; 1452 fits a 1500-byte MTU with IPv6 headers."""
    max_send_rate: int = 0
    """Upload limit in bytes/s; 0 means no limit."""
    max_recv_rate: int = 0
    """Download limit in bytes/s; 0 means no limit."""
    fast_path: str = "auto"
    """Socket backend: ``auto`` (batched Linux path, GSO/GRO when present), ``on``, ``off``."""


@dataclass(frozen=True, slots=True)
class TransferConfig:
    keepalive_interval: float = 5.0
    """Seconds between keep-alives on an idle session."""
    idle_timeout: float = 15.0
    """Seconds of silence after which a peer is declared gone."""
    request_timeout: float = 10.0
    """Seconds a request may make no progress before it fails and moves to another peer."""
    initial_rtt: float = 0.1
    """Round-trip estimate before the first sample (RFC 9002 uses 333 ms for the Internet)."""
    max_in_flight_size: int = 4 * 1024 * 1024
    """Bytes a receiver lets one peer have in flight towards it (flow-control credit)."""
    socket_buffer_size: int = 4 * 1024 * 1024
    """Requested SO_RCVBUF/SO_SNDBUF; the kernel may cap it at net.core.rmem_max."""
    io_workers: int = 4
    """Threads used for hashing and disk I/O."""


@dataclass(frozen=True, slots=True)
class FolderConfig:
    path: Path
    """Absolute path of the shared folder."""
    key: str
    """Folder key as printed by ``lanshare init``."""
    ignore: tuple[str, ...] = ()
    """Extra gitignore-style patterns, added to the folder's ``.lanshareignore``."""


@dataclass(frozen=True, slots=True)
class SyncConfig:
    max_delete_ratio: float = 0.5
    """A change set deleting more than this share of a folder's entries pauses the folder …"""
    max_delete_min: int = 100
    """… when it also deletes at least this many entries (an unmounted disk, a stray rm -r)."""
    delete_window: float = 3600.0
    """Seconds over which deletions are added up for the two limits above."""
    versions_keep_days: float = 30.0
    """Days replaced and deleted files stay in the folder's .lanshare/versions/."""
    debounce_interval: float = 0.1
    """Seconds a changed path must stay quiet before it is rescanned and announced, while it
    is being written (a change that ended, e.g. a file closed, settles in a tenth of it)."""
    max_debounce_delay: float = 1.0
    """Seconds after which a path that keeps changing is rescanned anyway."""
    rescan_interval: float = 3600.0
    """Seconds between full rescans that catch what the file watcher missed."""
    max_vector_devices: int = MAX_VECTOR_DEVICES
    """Most devices a peer's record may name in its version vector; more is refused."""
    max_peer_records: int = MAX_PEER_RECORDS
    """Most records stored of one peer per folder; past it, no more of its records are read."""


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    """One of debug, info, warning, error."""


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    folders: tuple[FolderConfig, ...] = ()
    source: Path | None = None
    """The file this was loaded from, if any (for error messages and reloads)."""


SECTIONS: dict[str, type[Any]] = {
    "node": NodeConfig,
    "network": NetworkConfig,
    "transfer": TransferConfig,
    "sync": SyncConfig,
    "logging": LoggingConfig,
}
"""The single tables of the file, by name. ``[[folder]]`` (an array of tables) comes on top."""


def load(path: Path | None = None, overrides: Mapping[str, object] | None = None) -> Config:
    """Read, validate and return the configuration.

    Args:
        path: the config file. ``None`` means ``default_config_path()``; if that file does not
            exist the result is the built-in defaults with no folders. A ``path`` given
            explicitly must exist.
        overrides: values from the command line, keyed ``"table.key"`` (e.g.
            ``{"network.port": 0, "logging.level": "debug"}``), checked exactly like file values
            and applied on top of them. A ``None`` value means "not given" and is skipped.
            ``[[folder]]`` tables cannot be overridden.

    Returns:
        The frozen ``Config``; ``source`` is the file read, or ``None``. Folder paths are
        absolute and ``~``-expanded, folder keys are in the canonical ``format_key`` form.

    Raises:
        ConfigError: the first problem found, as ``FILE:table.key: what is expected``: a missing
            explicit file, a TOML syntax error (with its line), an unknown table or key, a wrong
            type or value, or a file holding folder keys that group or others can read.
    """
    explicit = path is not None
    file = Path(path).expanduser() if path is not None else default_config_path()
    read = _read_config(file, must_exist=explicit)
    if read is None:
        return _build({}, str(file), None, overrides)
    text, mode = read
    return _parse(text, file, mode, overrides)


def add_folder(config_path: Path, folder_path: Path, key_text: str) -> FolderConfig:
    """Add one ``[[folder]]`` table to the config file, creating the file if there is none.

    A new file is created with mode 0600, atomically (temp file, fsync, link) and never over an
    existing one; it holds a one-line comment and the folder table. An existing file keeps all
    its content and comments: the table is appended, the whole new text is validated, written
    to a temp file and renamed over the old one, keeping its owner and mode minus any group or
    other permissions (a file holding a key must be 0600). A symlinked config file is followed.

    Args:
        config_path: the config file (``~`` is expanded).
        folder_path: the folder to share; must be absolute after ``~`` expansion.
        key_text: the folder key in any form ``keys.parse_key`` accepts.

    Returns:
        The folder as ``load`` will return it.

    Raises:
        ConfigError: the folder (or the key) is already configured, the existing file is
            invalid, or the file cannot be written. ``KeyFormatError`` for a mistyped key.
    """
    file = Path(config_path).expanduser()
    folder = _folder_path(folder_path, f"{file}:folder.path")
    key = keys.format_key(keys.parse_key(key_text))
    table = _folder_table(folder, key)
    target = Path(os.path.realpath(file))
    with _directory_lock(target.parent):
        read = _read_config(target, must_exist=False)
        if read is None:
            content = _new_file_text(file, table)
            config = _parse(content, file, 0o600, None)
            _create_exclusive(target, content.encode("utf-8"))
            return config.folders[-1]
        text, mode = read
        current = _parse(text, file, mode, None)
        for existing in current.folders:
            if existing.path == folder:
                raise ConfigError(f"{folder} is already shared (configured in {file})")
            if existing.key == key:
                raise ConfigError(
                    f"this key is already used by the shared folder {existing.path} "
                    f"(configured in {file}); one key shares one folder"
                )
        separator = "" if not text.strip() else ("\n" if text.endswith("\n") else "\n\n")
        content = text + separator + table
        config = _parse(content, file, stat.S_IMODE(mode) & 0o700, None)
        _replace_if_unchanged(target, text, content)
        return config.folders[-1]


def ensure_config(
    path: Path | None = None, overrides: Mapping[str, object] | None = None
) -> tuple[Config, bool]:
    """Load the config, first creating it if there is no file: the daemon's first run.

    A missing file (``path``, else ``default_config_path()``) is created as ``add_folder``
    does, sharing ``default_folder_path()`` (``~/LanShare``) under a fresh random key. The
    folder itself is not created here: that is the caller's job, like saying what happened.

    Returns:
        ``(config, created)``; ``created`` is True when this call wrote the file.

    Raises:
        ConfigError: as ``load`` and ``add_folder``.
    """
    file = Path(path).expanduser() if path is not None else default_config_path()
    created = False
    if not os.path.exists(file):
        target = Path(os.path.realpath(file))
        with _directory_lock(target.parent):
            if not os.path.exists(target):  # another process may have won the race
                key = keys.format_key(keys.generate_key())
                content = _new_file_text(file, _folder_table(default_folder_path(), key))
                _parse(content, file, 0o600, None)
                _create_exclusive(target, content.encode("utf-8"))
                created = True
    return load(file, overrides), created


def parse_host_port(text: str) -> tuple[str, int]:
    """Split a ``static_peers`` entry: ``host:port``, ``1.2.3.4:port``, ``[v6addr]:port`` or
    ``[fe80::1%eth0]:port`` (a link-local address with the interface to reach it on).

    Returns:
        ``(host, port)`` with IPv6 brackets removed (a scope kept as written); the port is
        1..65535.

    Raises:
        ConfigError: with a message saying what is wrong (no location; callers add it).
    """
    expected = 'expected "host:port", "IPv4:port" or "[IPv6]:port"'
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"{expected}, got {text!r}")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} in {text!r} is not an IPv6 address") from None
        if ip.is_link_local and not ip.scope_id:
            raise ConfigError(
                f"{text!r} is link-local: name the interface to reach it on, "
                f'as in "[{host}%eth0]:{port_text}"'
            )
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{expected}, got {text!r} (the port is missing)")
        if ":" in host:
            raise ConfigError(f'put an IPv6 address in brackets: "[{host}]:{port_text}"')
        if not _is_host(host):
            raise ConfigError(f"{host!r} in {text!r} is not a host name or IPv4 address")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"the port in {text!r} must be a number from 1 to 65535")
    return host, int(port_text)


# --- reading ------------------------------------------------------------------------------


_NEW_FILE_HEADER = (
    "# lanshare configuration; config.example.toml describes every key and its default.\n"
)


def _read_config(file: Path, *, must_exist: bool) -> tuple[str, int] | None:
    """The text and mode of ``file``, or None if it does not exist and need not."""
    try:
        # O_NONBLOCK: opening a FIFO by mistake must not hang; it is refused below.
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"the config file {file} does not exist") from None
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {file}: {_why(exc)}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the config file {file} is not a regular file")
        if st.st_size > MAX_CONFIG_SIZE:
            raise ConfigError(f"the config file {file} is larger than {MAX_CONFIG_SIZE} bytes")
        data = _read_bounded(fd, MAX_CONFIG_SIZE + 1)
        if len(data) > MAX_CONFIG_SIZE:  # pragma: no cover - it grew after fstat
            raise ConfigError(f"the config file {file} is larger than {MAX_CONFIG_SIZE} bytes")
    except OSError as exc:  # pragma: no cover - an I/O error on a file just opened
        raise ConfigError(f"cannot read the config file {file}: {_why(exc)}") from exc
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8"), st.st_mode
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not valid UTF-8 text (byte {exc.start + 1}); TOML files are UTF-8"
        ) from None


def _read_bounded(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``, whatever the size of each read (FUSE, NFS)."""
    chunks = []
    size = 0
    while size < limit:  # pragma: no branch - callers check the size first
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _parse(text: str, file: Path, mode: int, overrides: Mapping[str, object] | None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_syntax_error(file, text, str(exc))) from None
    if _holds_key(data) and stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"{file} holds folder keys but group or others may read it "
            f"(mode {stat.S_IMODE(mode):04o}), so other users could join your folders. "
            f"Fix it with: chmod 600 {shlex.quote(str(file))}"
        )
    return _build(data, str(file), file, overrides)


def _syntax_error(file: Path, text: str, message: str) -> str:
    """``FILE:LINE:COLUMN: invalid TOML: …`` from tomllib's "(at line N, column M)" suffix."""
    where = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if where:
        return f"{file}:{where[1]}:{where[2]}: invalid TOML: {message[: where.start()]}"
    end = re.search(r" \(at end of document\)$", message)
    if end:
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return f"{file}:{line}: invalid TOML at the end of the file: {message[: end.start()]}"
    return f"{file}: invalid TOML: {message}"  # pragma: no cover - tomllib always locates


def _holds_key(data: Mapping[str, Any]) -> bool:
    tables = data.get("folder")
    if isinstance(tables, dict):
        tables = [tables]
    return isinstance(tables, list) and any(isinstance(t, dict) and "key" in t for t in tables)


def _build(
    data: Mapping[str, Any],
    where: str,
    source: Path | None,
    overrides: Mapping[str, object] | None,
) -> Config:
    for name, value in data.items():
        if name == "folder":
            continue
        if name not in SECTIONS:
            raise ConfigError(
                f"{where}:{name}: unknown table{_suggest(name, [*SECTIONS, 'folder'])}; "
                f"the tables are [node], [network], [transfer], [sync], [logging] and [[folder]]"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{where}:{name}: expected a [{name}] table, got {_show(value)}")
    # values[table][key] = (converted value, where it came from)
    values: dict[str, dict[str, tuple[object, str]]] = {name: {} for name in SECTIONS}
    for table in SECTIONS:
        for key, raw in data.get(table, {}).items():
            values[table][key] = (_field_value(where, table, key, raw), where)
    if source is not None and Path(os.path.abspath(source)) == SYSTEM_CONFIG:
        # A system config written before [node] named the service's paths: whoever reads
        # it (the service, root's CLI) still finds the service's index and socket.
        for key, value in _SYSTEM_NODE.items():
            values["node"].setdefault(key, (value, "the system service's default"))
    for dotted, raw in (overrides or {}).items():
        if raw is None:
            continue
        table, dot, key = dotted.partition(".")
        if table == "folder":
            raise ConfigError(f"command line:{dotted}: folders cannot be overridden")
        if not dot or table not in SECTIONS:
            raise ConfigError(
                f'command line:{dotted}: unknown setting; expected "table.key" with table '
                f"one of {', '.join(SECTIONS)}"
            )
        values[table][key] = (_field_value("command line", table, key, raw), "command line")
    sections = {
        table: SECTIONS[table](**{key: value for key, (value, _) in given.items()})
        for table, given in values.items()
    }
    _check_across(sections, values)
    folders = _folders(data.get("folder", []), where)
    return Config(
        node=sections["node"],
        network=sections["network"],
        transfer=sections["transfer"],
        sync=sections["sync"],
        logging=sections["logging"],
        folders=folders,
        source=source,
    )


def _field_value(where: str, table: str, key: str, raw: object) -> object:
    known = {f.name: f for f in fields(SECTIONS[table])}
    if key not in known:
        raise ConfigError(
            f"{where}:{table}.{key}: unknown key{_suggest(key, list(known))}; "
            f"[{table}] has {', '.join(known)}"
        )
    try:
        value = _convert(str(known[key].type), raw)
        check = _CHECKS.get((table, key))
        return check(value) if check is not None else value
    except ConfigError as exc:
        raise ConfigError(f"{where}:{table}.{key}: {exc}") from None


def _convert(kind: str, raw: object) -> object:
    """Check a TOML (or override) value against a field's annotation and convert it."""
    if kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise ConfigError(f"expected an integer, got {_show(raw)}")
    if kind == "float":
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            if not math.isfinite(raw):
                raise ConfigError(f"expected a finite number, got {_show(raw)}")
            return float(raw)
        raise ConfigError(f"expected a number, got {_show(raw)}")
    if kind == "str":
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"expected a string, got {_show(raw)}")
    if kind == "Path":
        if isinstance(raw, str | os.PathLike):
            path = Path(os.path.expanduser(os.fspath(raw)))
            if not path.is_absolute():
                raise ConfigError(
                    f'expected an absolute path (or one starting with "~"), got {raw!s}'
                )
            return Path(os.path.normpath(path))
        raise ConfigError(f"expected a path string, got {_show(raw)}")
    if kind == "tuple[str, ...]":
        if isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
            return tuple(raw)
        raise ConfigError(f"expected an array of strings, got {_show(raw)}")
    raise AssertionError(f"no conversion for field type {kind}")  # pragma: no cover


def _folders(raw: object, where: str) -> tuple[FolderConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(
            f"{where}:folder: expected [[folder]] tables (one per shared folder), got {_show(raw)}"
        )
    known = [f.name for f in fields(FolderConfig)]
    result: list[FolderConfig] = []
    for number, table in enumerate(raw, start=1):
        at = f"{where}:folder[{number}]"
        for key in table:
            if key not in known:
                raise ConfigError(
                    f"{at}.{key}: unknown key{_suggest(key, known)}; [[folder]] has "
                    f"{', '.join(known)}"
                )
        for key in ("path", "key"):
            if key not in table:
                raise ConfigError(f"{at}.{key}: missing; every [[folder]] needs a path and a key")
        path = _folder_path(table["path"], f"{at}.path")
        if not isinstance(table["key"], str):
            raise ConfigError(f"{at}.key: expected a key string, got {_show(table['key'])}")
        try:
            key = keys.format_key(keys.parse_key(table["key"]))
        except ConfigError as exc:
            raise type(exc)(f"{at}.key: {exc}") from None
        try:
            ignore = _convert("tuple[str, ...]", table.get("ignore", []))
        except ConfigError as exc:
            raise ConfigError(f"{at}.ignore: {exc} (gitignore-style patterns)") from None
        assert isinstance(ignore, tuple)
        for earlier_number, earlier in enumerate(result, start=1):
            if earlier.path == path:
                raise ConfigError(
                    f"{at}.path: {path} is already shared by folder[{earlier_number}]"
                )
            if earlier.path in path.parents or path in earlier.path.parents:
                raise ConfigError(
                    f"{at}.path: {path} and {earlier.path} (folder[{earlier_number}]) are nested; "
                    f"a shared folder cannot contain another"
                )
            if earlier.key == key:
                raise ConfigError(
                    f"{at}.key: the same key as folder[{earlier_number}] ({earlier.path}); "
                    f"one key shares one folder"
                )
        result.append(FolderConfig(path=path, key=key, ignore=ignore))
    return tuple(result)


def _folder_path(raw: object, at: str) -> Path:
    try:
        path = _convert("Path", raw)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None
    assert isinstance(path, Path)
    return path


# --- per-key value checks: each returns the (possibly normalised) value or raises ConfigError ---


def _int_range(low: int, high: int | None, what: str = "") -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ConfigError(f"expected an integer {bound}{what}, got {value}")
        return value

    return check


def _positive_seconds(value: float) -> float:
    if value <= 0:
        raise ConfigError(f"expected a number of seconds greater than 0, got {value:g}")
    return value


def _positive_days(value: float) -> float:
    if value <= 0:
        raise ConfigError(f"expected a number of days greater than 0, got {value:g}")
    return value


def _node_name(value: str) -> str:
    size = len(value.encode("utf-8", "surrogatepass"))
    if not value.strip() or size > MAX_NAME_SIZE:
        raise ConfigError(f"expected a name of 1 to {MAX_NAME_SIZE} bytes, got {size} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ConfigError("expected a name without control characters")
    return value


def _socket_path(value: Path) -> Path:
    if len(os.fsencode(value)) > MAX_SOCKET_PATH_SIZE:
        raise ConfigError(
            f"expected a path of at most {MAX_SOCKET_PATH_SIZE} bytes (a Unix socket)"
        )
    return value


_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def _group_name(value: str) -> str:
    # Whether the group exists is checked when the daemon binds the socket: the command
    # line reads this file too, on machines that may not have the group.
    if value and not _GROUP_NAME.fullmatch(value):
        raise ConfigError(f'expected a group name such as "lanshare" (or ""), got "{value}"')
    return value


def _bind(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ConfigError('expected at least one address, e.g. ["0.0.0.0"]')
    for address in value:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f'expected IP addresses, got "{address}"') from None
    return value


def _interfaces(value: tuple[str, ...]) -> tuple[str, ...]:
    for name in value:
        if not name.strip():
            raise ConfigError("expected interface names or addresses, got an empty string")
    return value


def _static_peers(value: tuple[str, ...]) -> tuple[str, ...]:
    for entry in value:
        parse_host_port(entry)
    return value


def _ratio(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"expected a share between 0 and 1 (0.5 = half); got {value:g}")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}; got {value!r}")
        return value.lower()

    return check


_CHECKS: dict[tuple[str, str], Callable[[Any], object]] = {
    ("node", "name"): _node_name,
    ("node", "control_socket"): _socket_path,
    ("node", "control_group"): _group_name,
    ("network", "port"): _int_range(0, 65535, " (0 picks any free port)"),
    ("network", "bind"): _bind,
    ("network", "interfaces"): _interfaces,
    ("network", "static_peers"): _static_peers,
    ("network", "max_datagram_size"): _int_range(MIN_DATAGRAM_SIZE, MAX_DATAGRAM_SIZE),
    ("network", "max_send_rate"): _int_range(0, None, " bytes/s (0 = no limit)"),
    ("network", "max_recv_rate"): _int_range(0, None, " bytes/s (0 = no limit)"),
    ("network", "fast_path"): _one_of(FAST_PATH_MODES),
    ("network", "ip_version"): _one_of(IP_VERSIONS),
    ("transfer", "keepalive_interval"): _positive_seconds,
    ("transfer", "idle_timeout"): _positive_seconds,
    ("transfer", "request_timeout"): _positive_seconds,
    ("transfer", "initial_rtt"): _positive_seconds,
    ("transfer", "max_in_flight_size"): _int_range(1, None, " bytes"),
    ("transfer", "socket_buffer_size"): _int_range(1, None, " bytes"),
    ("transfer", "io_workers"): _int_range(1, 256),
    ("sync", "max_delete_ratio"): _ratio,
    ("sync", "max_delete_min"): _int_range(0, None, " entries"),
    ("sync", "delete_window"): _positive_seconds,
    ("sync", "versions_keep_days"): _positive_days,
    ("sync", "debounce_interval"): _positive_seconds,
    ("sync", "max_debounce_delay"): _positive_seconds,
    ("sync", "rescan_interval"): _positive_seconds,
    ("sync", "max_vector_devices"): _int_range(1, MAX_VERSION_ENTRIES, " devices"),
    ("sync", "max_peer_records"): _int_range(100, MAX_PEER_RECORDS_LIMIT, " records"),
    ("logging", "level"): _one_of(LOG_LEVELS),
}


def _check_across(
    sections: Mapping[str, Any], values: Mapping[str, Mapping[str, tuple[object, str]]]
) -> None:
    """Checks that involve two keys; the error names the one that was set (later wins)."""

    def fail(first: tuple[str, str], second: tuple[str, str], message: str) -> None:
        # Name a key that was set (one of them was: the defaults agree), preferring a flag,
        # then ``second``, the key the message is about.
        def rank(key: tuple[str, str]) -> int:
            origin = values[key[0]].get(key[1], (None, ""))[1]
            return 2 if origin == "command line" else 1 if origin else 0

        named = first if rank(first) > rank(second) else second
        origin = values[named[0]][named[1]][1]
        raise ConfigError(f"{origin}:{named[0]}.{named[1]}: {message}")

    transfer, network = sections["transfer"], sections["network"]
    if transfer.idle_timeout <= transfer.keepalive_interval:
        fail(
            ("transfer", "keepalive_interval"),
            ("transfer", "idle_timeout"),
            f"idle_timeout ({transfer.idle_timeout:g} s) must be longer than "
            f"keepalive_interval ({transfer.keepalive_interval:g} s), or idle peers are dropped",
        )
    if network.bind and network.ip_version != "both":
        # "::" takes both families; any other address only its own.
        wanted = 6 if network.ip_version == "v6" else 4
        if not any(b == "::" or (":" in b) == (wanted == 6) for b in network.bind):
            fail(
                ("network", "bind"),
                ("network", "ip_version"),
                f'ip_version = "{network.ip_version}" needs an IPv{wanted} socket, but bind '
                f"is {list(network.bind)}: bind an IPv{wanted} address (or leave bind out)",
            )
    if transfer.max_in_flight_size < network.max_datagram_size:
        fail(
            ("network", "max_datagram_size"),
            ("transfer", "max_in_flight_size"),
            f"max_in_flight_size ({transfer.max_in_flight_size}) must be at least "
            f"max_datagram_size ({network.max_datagram_size}), or nothing can be sent",
        )


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _show(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f'the string "{value}"'
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(host)
        return True
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --- writing ------------------------------------------------------------------------------


def _new_file_text(file: Path, folder_table: str) -> str:
    """A new config file's text: the header, the service's ``[node]`` table when ``file`` is
    the system service's config, and the first folder."""
    if Path(os.path.abspath(file)) != SYSTEM_CONFIG:
        return _NEW_FILE_HEADER + folder_table
    node = (
        "[node]\n"
        "# The system service's paths (systemd/lanshare.service): every command run with this\n"
        "# file finds the service's index and control socket here, whoever runs it.\n"
        f"state_dir = {_toml_string(str(SYSTEM_STATE_DIR))}\n"
        f"control_socket = {_toml_string(str(SYSTEM_CONTROL_SOCKET))}\n"
        "# Members of this group may use the service: lanshare status, ls, pull, peers.\n"
        f"control_group = {_toml_string(SYSTEM_GROUP)}\n\n"
    )
    return _NEW_FILE_HEADER + node + folder_table


def _folder_table(folder: Path, key: str) -> str:
    return f"[[folder]]\npath = {_toml_string(str(folder))}\nkey = {_toml_string(key)}\n"


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            raise ConfigError(
                f"{text!r} is not valid UTF-8 and cannot be written to a TOML file; rename it first"
            )
        if char in '"\\':
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _write_temp(target: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
    """A fsynced temp file beside ``target``, created with ``mode`` so it is never wider."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widens beyond ``mode``
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):
                os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:  # pragma: no cover - disk full
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` (created if missing) while editing a file in it.

    Locking the directory, not the file, still works across the rename that replaces the
    file, and leaves no lock file behind. Two ``lanshare init`` at once thus never lose a folder.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot use the config directory {directory}: {_why(exc)}") from exc
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:  # pragma: no cover - a stuck editor
                    raise ConfigError(
                        f"another program has held {directory} locked for {_LOCK_TIMEOUT:g} s; "
                        f"try again"
                    ) from None
                time.sleep(_LOCK_POLL_INTERVAL)
        yield
    finally:
        os.close(fd)  # releases the lock


_LOCK_TIMEOUT = 10.0
_LOCK_POLL_INTERVAL = 0.01


def _create_exclusive(target: Path, data: bytes) -> None:
    """Create ``target`` (mode 0600) holding ``data``, atomically and never over another file."""
    try:
        tmp = _write_temp(target, data, 0o600, None)
        try:
            os.link(tmp, target)  # atomic, and never replaces an existing file
        except FileExistsError:  # pragma: no cover - only a writer that ignores the lock
            raise ConfigError(f"{target} appeared while it was being created; try again") from None
        finally:
            os.unlink(tmp)
        _fsync_dir(target.parent)
    except OSError as exc:  # pragma: no cover - disk full, read-only file system
        raise ConfigError(f"cannot create the config file {target}: {_why(exc)}") from exc


def _replace_if_unchanged(target: Path, old_text: str, new_text: str) -> None:
    """Atomically replace ``target`` with ``new_text``, unless it changed since it was read."""
    try:
        st = os.stat(target)
        mode = stat.S_IMODE(st.st_mode) & 0o700
        tmp = _write_temp(target, new_text.encode("utf-8"), mode, (st.st_uid, st.st_gid))
        try:
            again = _read_config(target, must_exist=False)
            if (
                again is None or again[0] != old_text
            ):  # pragma: no cover - an editor ignoring the lock
                raise ConfigError(f"{target} was changed by another program meanwhile; try again")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_dir(target.parent)
    except OSError as exc:  # pragma: no cover - disk full, read-only file system
        raise ConfigError(f"cannot write the config file {target}: {_why(exc)}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
