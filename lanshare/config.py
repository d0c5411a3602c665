"""Configuration: frozen dataclasses, loaded from TOML and validated in one place.

Pure apart from reading the one config file. Precedence: built-in defaults < file < flags.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 47474


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_config_path() -> Path:
    """``$LANSHARE_CONFIG``, else ``$XDG_CONFIG_HOME/lanshare/config.toml``."""
    explicit = os.environ.get("LANSHARE_CONFIG")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_CONFIG_HOME", ".config") / "lanshare" / "config.toml"


def default_state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "lanshare"


def default_control_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lanshare" / "control.sock"
    return default_state_dir() / "control.sock"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str = field(default_factory=socket.gethostname)
    """Name shown to other peers and used as the mDNS instance name."""
    state_dir: Path = field(default_factory=default_state_dir)
    """Where the index database and the node identity live."""
    control_socket: Path = field(default_factory=default_control_socket)
    """Unix socket the command line uses to talk to the daemon."""


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    port: int = DEFAULT_PORT
    """UDP port for the transfer protocol; 0 picks any free port."""
    bind: tuple[str, ...] = ("0.0.0.0",)
    """Local addresses to bind the UDP socket to."""
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
class LoggingConfig:
    level: str = "info"
    """One of debug, info, warning, error."""


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    folders: tuple[FolderConfig, ...] = ()
    source: Path | None = None
    """The file this was loaded from, if any (for error messages and reloads)."""
