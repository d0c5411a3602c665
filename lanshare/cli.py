"""The ``lanshare`` command line: parse, call the library or the daemon, print.

I/O shell. Every command maps its errors through ``main()``: a message on stderr and an exit
status (``lanshare.errors``: 1 failed, 2 usage or configuration, 3 no daemon, 4 ``status`` of
a folder in error or paused, 130 interrupted); a traceback only with ``--debug`` or
``LANSHARE_DEBUG=1``. ``doctor`` reports a broken config or a missing daemon as a failed
check (exit 1) instead: finding those is its job.

Finding the daemon: ``--socket PATH`` or ``$LANSHARE_SOCKET`` names its control socket;
otherwise a config file of one's own names it (``[node] control_socket``); with no config
file at all, the user's own socket is tried, then the system service's
(``config.user_control_sockets``), so members of the service's group need no config. ``ls``,
``search``, ``pull``, ``peers`` and ``scan`` work without a daemon; the short-lived node (or
the offline scan) then holds the state dir's lock, and stops with exit 3 when a daemon holds
it.

Printing: in human output every string that peers, the index or the disk chose (names, paths,
addresses, reasons, error messages) goes through ``lanshare.text.printable``, so it cannot act
on the terminal, split a line or hide behind a bidi override; ``--json`` prints values exactly.
The log's formatter escapes each log message the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lanshare import __version__
from lanshare import config as configuration
from lanshare.errors import (
    EXIT_INTERRUPTED,
    EXIT_NOT_IN_SYNC,
    DaemonNotRunning,
    LanshareError,
    UsageError,
)
from lanshare.text import PrintableFormatter, printable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lanshare.config import Config, FolderConfig
    from lanshare.control import ControlClient

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = Path("~/LanShare")

app = typer.Typer(
    name="lanshare",
    help=(
        "Keep a folder in sync between the machines of your LAN, with no setup beyond a "
        "shared folder key. Start with `lanshare init`, then run `lanshare daemon` on "
        "every machine."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $LANSHARE_CONFIG, else $XDG_CONFIG_HOME/lanshare/config.toml).",
        dir_okay=False,
        show_default=False,
    ),
]
DebugOption = Annotated[
    bool,
    typer.Option("--debug", help="Log debug messages and show tracebacks on errors."),
]
SocketOption = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        envvar="LANSHARE_SOCKET",
        help=(
            "The daemon's control socket (default: $LANSHARE_SOCKET, else the config's "
            "\\[node] control_socket; with no config file, yours, then /run/lanshare/control.sock)."
        ),
        dir_okay=False,
        show_default=False,
        show_envvar=False,
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print machine-readable JSON instead of text."),
]


@dataclass(slots=True)
class _Globals:
    """Options given before the command name; the command's own flags override them."""

    config: Path | None = None
    debug: bool = False
    socket: Path | None = None


def _settings(
    ctx: typer.Context, config: Path | None, debug: bool, socket: Path | None = None
) -> _Globals:
    given = ctx.obj if isinstance(ctx.obj, _Globals) else _Globals()
    settings = _Globals(
        config=config or given.config, debug=debug or given.debug, socket=socket or given.socket
    )
    _setup_logging(settings.debug)
    return settings


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lanshare {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    ctx.obj = _Globals(config=config, debug=debug, socket=socket)


@app.command()
def init(
    ctx: typer.Context,
    path: Annotated[
        Path,
        typer.Argument(help="Folder to share; created if missing.", show_default="~/LanShare"),
    ] = DEFAULT_FOLDER,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            "-k",
            help="Join an existing folder with the key printed on another machine.",
        ),
    ] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Share a folder: create it and its key, or join one with --key.

    The folder is added to the config file (created with mode 0600 if there is none; an
    existing one is never overwritten). The key is printed alone on the last line: give it
    to your other machines (`lanshare init FOLDER --key KEY`).
    """
    from lanshare import keys, marker

    settings = _settings(ctx, config, debug)
    folder = path.expanduser().absolute()
    raw = keys.parse_key(key) if key is not None else keys.generate_key()
    key_text = keys.format_key(raw)
    config_path = settings.config or configuration.default_config_path()
    _make_folder(folder)
    configuration.add_folder(config_path, folder, key_text)
    # Only once the config holds it: a refused init must not re-mark another share's folder.
    try:
        marker.write(folder, keys.folder_id(raw))
    except LanshareError as exc:
        typer.echo(f"lanshare: warning: {printable(str(exc))}", err=True)
    verb = "Joined" if key is not None else "Created"
    typer.echo(f"{verb} shared folder {printable(str(folder))}")
    typer.echo(f"Config: {printable(str(config_path))}")
    if key is None:
        typer.echo("Folder key (give it to your other machines: lanshare init FOLDER --key KEY):")
    typer.echo(key_text)


@app.command("key")
def key_command(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(help="A shared folder (or a path inside one); optional with one folder."),
    ] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Print the key of a shared folder, and nothing else."""
    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    folder = _pick_folder(cfg.folders, path)
    typer.echo(folder.key)


@app.command()
def scan(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(help="Scan only the folder holding this path (default: every folder)."),
    ] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Update the local index of shared folders and print what changed.

    Asks the running daemon to scan; with none, scans into the index the daemon will use.
    Unchanged files (same size, mtime, inode and ctime) are not read again.
    """
    settings = _settings(ctx, config, debug, socket)
    cfg = _load(settings)
    target = str(_absolute(path)) if path is not None else None
    try:
        with _connect(settings, cfg, timeout=None) as client:
            summaries = client.call("scan", {"path": target} if target is not None else {})
    except DaemonNotRunning:
        summaries = _scan_offline(cfg, path)
    if as_json:
        _print_json(summaries)
        return
    for s in summaries:
        typer.echo(
            f"{printable(s['path'])}: {s['files']} files, {s['dirs']} dirs, {_size(s['bytes'])} in "
            f"{s['blocks']} blocks; {s['new']} new, {s['changed']} changed, "
            f"{s['deleted']} deleted ({s['seconds']:.2f} s)"
        )


def _scan_offline(cfg: Config, path: Path | None) -> list[dict[str, object]]:
    """``scan`` with no daemon: into the daemon's index, holding its lock meanwhile."""
    import asyncio

    from lanshare import deleteguard, identity, index, scanner
    from lanshare.daemon import own_state

    _need_folders(cfg)
    folders = [_pick_folder(cfg.folders, path)] if path is not None else list(cfg.folders)
    summaries = []
    with own_state(cfg, daemon=False) as database:
        node = identity.load_or_create_node_id(cfg.node.state_dir)
        with index.Index.open(database) as db:
            for folder in folders:
                summary = asyncio.run(
                    scanner.scan_folder(
                        folder,
                        db,
                        identity.short_id(node),
                        cfg.transfer.io_workers,
                        limits=deleteguard.Limits.of(cfg.sync),
                    )
                )
                summaries.append(summary.as_json())
    return summaries


LogLevelOption = Annotated[
    str,
    typer.Option(
        "--log-level",
        help="debug, info, warning or error (default: the config's [logging] level).",
        show_default=False,
    ),
]


@app.command()
def daemon(
    ctx: typer.Context,
    log_level: LogLevelOption = "",
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Run the sync daemon in the foreground (use the systemd units to run it as a service).

    With no config file at all, one is created that shares ~/LanShare under a fresh key.
    Logs go to stderr; SIGTERM stops it cleanly, SIGHUP reloads the config.
    """
    import asyncio

    from lanshare.daemon import Daemon

    settings = _settings(ctx, config, debug, socket)
    overrides = {
        "logging.level": log_level or None,
        "node.control_socket": (
            str(_absolute(settings.socket)) if settings.socket is not None else None
        ),
    }
    cfg, created = configuration.ensure_config(settings.config, overrides)
    if created:
        for folder in cfg.folders:
            _make_folder(folder.path)
            typer.echo(
                f"No config found: created {printable(str(cfg.source))} sharing "
                f"{printable(str(folder.path))}\n"
                f"Folder key (give it to your other machines: lanshare init FOLDER --key KEY):\n"
                f"{folder.key}",
                err=True,
            )
    _setup_logging(settings.debug, cfg.logging.level, daemon=True)
    asyncio.run(Daemon(cfg).run())


@app.command()
def ls(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Argument(help="A path inside a shared folder.")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """List what the LAN shares: files, which peers have them, and their local state.

    Asks the running daemon; with none, starts a short-lived node that finds peers first.
    """
    settings = _settings(ctx, config, debug, socket)
    cfg = _load(settings)
    target = _absolute(path) if path is not None else None
    entries = _ask(settings, cfg, "ls", {"path": str(target) if target else None}, [target])
    if as_json:
        _print_json(entries)
        return
    if not entries:
        typer.echo("nothing shared yet")
        return
    for entry in entries:
        size = _size(entry["size"]) if entry["type"] == "file" else entry["type"]
        who = _holders_text(entry["holders"], LS_HOLDERS_WIDTH)
        typer.echo(
            f"{entry['state']:<10} {size:>10}  {_pad(who, LS_HOLDERS_WIDTH)}  "
            f"{printable(entry['path'])}"
        )


@app.command()
def search(
    ctx: typer.Context,
    terms: Annotated[
        list[str],
        typer.Argument(
            help="Words each path must contain, or patterns (*, ?, [...]; ** crosses "
            "directories), ignoring case.",
            metavar="TERM",
            show_default=False,
        ),
    ],
    as_json: JsonOption = False,
    folder: Annotated[
        Path | None,
        typer.Option("--folder", help="Search only this folder (or below this path in one)."),
    ] = None,
    entry_type: Annotated[
        str | None,
        typer.Option("--type", help="Only entries of this type: file, dir or symlink."),
    ] = None,
    min_size: Annotated[
        str | None,
        typer.Option("--min-size", help="At least this size: bytes, or 10K, 10M, 1.5G, 2T."),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option("--max-size", help="At most this size: bytes, or 10K, 10M, 1.5G, 2T."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many hits.")] = 100,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Find files by name in everything the LAN shares, and who holds them.

    Every term must match the path. Best matches first: names before directories, exact
    names before partial ones, then shorter paths. Exit status 0 with hits, 1 with none.
    Asks the running daemon; with none, starts a short-lived node that finds peers first.
    """
    from lanshare.search import Query, parse_size

    settings = _settings(ctx, config, debug, socket)
    least = parse_size(min_size) if min_size is not None else None
    most = parse_size(max_size) if max_size is not None else None
    # Checked here too, so that a mistyped query starts no node.
    Query.parse(terms, type_name=entry_type, min_size=least, max_size=most, limit=limit)
    cfg = _load(settings)
    within = _absolute(folder) if folder is not None else None
    params = {
        "terms": terms,
        "folder": str(within) if within is not None else None,
        "type": entry_type,
        "min_size": least,
        "max_size": most,
        "limit": limit,
    }
    hits = _ask(settings, cfg, "search", params, [within])
    if as_json:
        _print_json([{k: hit[k] for k in SEARCH_FIELDS} for hit in hits])
    else:
        for hit in hits:
            _print_hit(hit)
    if not hits:
        raise typer.Exit(1)


SEARCH_FIELDS = ("folder", "path", "type", "size", "hash", "state", "holders")
"""What ``search --json`` gives of each hit (the README's contract)."""
WIDTH = 80
"""Columns the human output of ``search`` fits in."""
LS_HOLDERS_WIDTH = 20
"""Columns of ``ls``'s holders: their names when they fit, else how many they are."""


def _print_hit(hit: dict[str, Any]) -> None:
    """Two lines: the path (shortened in the middle when too long), then the details."""
    typer.echo(_shorten(printable(f"{hit['folder']}/{hit['path']}"), WIDTH))
    size = _size(hit["size"]) if hit["type"] == "file" else ""
    details = "    " + "  ".join(x for x in (hit["type"], size, hit["state"]) if x)
    room = WIDTH - _cells(details) - len("  held by ")
    who = _holders_text(hit["holders"], room) if hit["holders"] else "no peer"
    typer.echo(f"{details}  held by {who}")


def _holders_text(holders: list[dict[str, Any]], width: int) -> str:
    """The holders' names (escaped; a share below whole as a percentage, a peer not
    connected marked), as many as fit in ``width`` columns with a count of the rest; only
    how many they are when not even one name fits."""
    count = f"{len(holders)} peer" + ("" if len(holders) == 1 else "s")
    labels = []
    for holder in holders:
        label = _shorten(printable(holder["name"] or holder["id"]), 24)
        if holder["fraction"] < 1.0:
            label += f" {int(holder['fraction'] * 100)}%"
        if not holder["connected"]:
            label += " (offline)"
        labels.append(label)
    for shown in range(len(labels), 0, -1):
        rest = len(labels) - shown
        text = ", ".join(labels[:shown]) + (f" +{rest} more" if rest else "")
        if _cells(text) <= width:
            return text
    return count


def _cells(text: str) -> int:
    from rich.cells import cell_len

    return cell_len(text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _cells(text))


def _shorten(text: str, width: int) -> str:
    """``text``, or its start and end around an ellipsis when wider than ``width`` columns."""
    from rich.cells import get_character_cell_size

    sizes = [get_character_cell_size(c) for c in text]
    if sum(sizes) <= width:
        return text
    budget = width - 1
    head = tail = used = 0
    while head + tail < len(text):
        # Grow the shorter side first, so both ends of the path stay readable.
        at_head = head <= tail
        size = sizes[head] if at_head else sizes[len(text) - 1 - tail]
        if used + size > budget:
            break
        used += size
        head, tail = (head + 1, tail) if at_head else (head, tail + 1)
    return f"{text[:head]}\u2026{text[len(text) - tail :]}"


@app.command()
def pull(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files or directories inside a folder.")],
    as_json: JsonOption = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Give up after this many seconds (0: never).")
    ] = 0.0,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Fetch these paths from the LAN now, with progress; exit 0 once all are verified.

    A directory means everything under it. Works with no daemon running: a short-lived
    node finds the peers, fetches, and exits.
    """
    settings = _settings(ctx, config, debug, socket)
    cfg = _load(settings)
    targets = [_absolute(p) for p in paths]
    params = {"paths": [str(t) for t in targets], "timeout": timeout}
    progress = None if as_json else _PullProgress()
    result = _ask(settings, cfg, "pull", params, targets, progress)
    if as_json:
        _print_json(result)
        return
    total = sum(int(row["bytes"]) for row in result)
    typer.echo(f"{len(result)} file(s), {_size(total)}: all present and verified")


@app.command()
def status(
    ctx: typer.Context,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Show each folder's sync state, what it still needs, and why it is not in sync.

    Needs a running daemon (exit status 3 when there is none). Exit status 4 when a folder
    is in error or paused (the status is printed all the same).
    """
    settings = _settings(ctx, config, debug, socket)
    cfg = _load(settings)
    with _connect(settings, cfg) as client:
        result = client.call("status")
    troubled = any(f.get("state") in ("error", "paused") for f in result["folders"])
    if as_json:
        _print_json(result)
    else:
        _print_status(result)
    if troubled:
        raise typer.Exit(EXIT_NOT_IN_SYNC)


def _print_status(result: dict[str, Any]) -> None:
    node = result.get("node", {})
    typer.echo(f"node {printable(node.get('name', '?'))} ({node.get('id', '?')})")
    for folder in result["folders"]:
        line = f"{printable(folder['path'])}: {folder['state']}"
        if folder["need_files"]:
            line += f", needs {folder['need_files']} file(s), {_size(folder['need_bytes'])}"
        if folder.get("conflicts"):
            line += f", {folder['conflicts']} conflict(s)"
        if folder["reason"]:
            line += f" ({printable(folder['reason'])})"
        typer.echo(line)
        for peer in folder["peers"]:
            rate = f"{_size(peer['rate'])}/s" if peer["rate"] else "idle"
            typer.echo(f"  peer {printable(peer['name'] or peer['id'])}: {rate}")
        for problem in folder.get("problems", [])[:10]:
            typer.echo(f"  ! {printable(problem['path'])}: {printable(problem['problem'])}")
        for trouble in folder.get("peer_problems", []):
            who = trouble["peer"]
            if trouble["name"]:
                who = f"{printable(trouble['name'])} ({who})"
            typer.echo(f"  ! peer {who}: {printable(trouble['problem'])}")
        for copy in folder.get("conflict_paths", [])[:10]:
            typer.echo(f"  conflict copy: {printable(copy)} (delete or rename it once resolved)")
    for ban in result.get("banned", []):
        typer.echo(
            f"banned {printable(ban['address'])} (peer {printable(ban['peer'])}) for"
            f" {ban['seconds_left']} s more: {printable(ban['why'])}"
        )


@app.command()
def peers(
    ctx: typer.Context,
    as_json: JsonOption = False,
    seconds: Annotated[
        float, typer.Option("--seconds", help="Browse this long when no daemon is running.")
    ] = 3.0,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """List the peers seen on the LAN that share a folder with this machine.

    Asks the running daemon; with none, browses mDNS itself for a few seconds.
    """
    import asyncio

    from lanshare.addressing import show_addr
    from lanshare.daemon import own_state
    from lanshare.discovery import browse_once
    from lanshare.peertable import PROTOCOL_VERSION

    settings = _settings(ctx, config, debug, socket)
    cfg = _load(settings)
    try:
        with _connect(settings, cfg) as client:
            found = client.call("peers")
    except DaemonNotRunning:
        _need_folders(cfg)
        # A daemon that owns this config but does not answer knows its peers better
        # than a browse from here: say so instead.
        with own_state(cfg, daemon=False):
            found = [p.to_json(show_addr) for p in asyncio.run(browse_once(cfg, seconds))]
    if as_json:
        _print_json(found)
        return
    if not found:
        typer.echo("no peers found")
    for peer in found:
        addresses = printable(", ".join(peer["addresses"]))
        state = peer["state"]
        if state == "incompatible":
            state += (
                f" (protocol {printable(str(peer.get('protocol')))}, this node {PROTOCOL_VERSION})"
            )
        typer.echo(f"{printable(peer['name'] or peer['id']):<24} {state:<12} {addresses}")


@app.command()
def doctor(
    ctx: typer.Context,
    as_json: JsonOption = False,
    seconds: Annotated[
        float,
        typer.Option("--seconds", help="Listen this long for mDNS answers (0.5 to 30)."),
    ] = 3.0,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Check why this machine does not sync: config, daemon, network, firewall, discovery,
    keys, sync and limits, each ok, warn or fail, with its fix.

    Exit status 1 when a check fails (a broken config too), else 0.
    """
    from lanshare import doctor as checks

    settings = _settings(ctx, config, debug, socket)
    if not settings.debug:
        # What the checks meet (no usable interface, a socket zeroconf cannot open) is what
        # they report, each once, with its fix: the same as log lines would be noise.
        _setup_logging(False, "error")
    cfg: Config | None = None
    error = None
    try:
        cfg = _load(settings)
    except LanshareError as exc:
        error = str(exc)
    if cfg is not None:
        path = cfg.source
    else:
        path = (settings.config or configuration.default_config_path()).expanduser()
    status = None
    why = ""
    try:
        with _connect(settings, cfg or configuration.Config(), timeout=10.0) as client:
            status = client.call("status")
    except LanshareError as exc:
        why = str(exc)
    inputs = checks.Inputs(cfg, path, error, status, why, max(0.5, min(seconds, 30.0)))
    results = checks.run(inputs)
    if as_json:
        _print_json([r.to_json() for r in results])
    else:
        for line in checks.format_human(results):
            typer.echo(line)
    if checks.worst(results) == "fail":
        raise typer.Exit(1)


@app.command()
def resume(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(help="The paused folder (or a path inside it); default: every folder."),
    ] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
    socket: SocketOption = None,
) -> None:
    """Confirm what paused a folder, and let it sync again; retry what failed.

    A folder pauses when deletions added up over \\[sync] delete_window would remove more
    than \\[sync] max_delete_ratio of its entries, or when its marker (.lanshare/folder-id)
    is missing; `lanshare status` says why. Confirming applies to this machine only, and
    only to the folder named: without PATH, nothing is confirmed.
    Restoring the files (or mounting the disk) also ends the pause. Pulls that a full disk
    paused, and paths that failed, are tried again at once.
    """
    settings = _settings(ctx, config, debug, socket)
    cfg = _load(settings)
    params = {"path": str(_absolute(path))} if path is not None else {}
    with _connect(settings, cfg) as client:
        result = client.call("resume", params)
    waiting = {str(f["path"]): str(f["reason"]) for f in result.get("unconfirmed", [])}
    for folder in result["resumed"]:
        if folder not in waiting:
            typer.echo(f"resumed {printable(folder)}")
    for folder, reason in waiting.items():
        shown = printable(folder)
        typer.echo(
            f"{shown} stays paused ({printable(reason)}); to confirm, name it: "
            f"lanshare resume {shown}",
            err=True,
        )


class _PullProgress:
    """A rich progress bar per file and overall, fed by the daemon's progress lines."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            # A file's name is the peer's: shown escaped, and never read as rich markup.
            TextColumn("{task.description}", justify="left", markup=False),
            BarColumn(bar_width=20),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._overall = self._bar.add_task("total", total=0)

    def __enter__(self) -> _PullProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._bar.stop()

    def update(self, update: dict[str, Any]) -> None:
        rows = update.get("files", [])
        for row in rows:
            name = printable(str(row["path"]).rsplit("/", 1)[-1])[:24]
            task = self._tasks.get(row["path"])
            if task is None:
                task = self._tasks[row["path"]] = self._bar.add_task(name, total=row["size"])
            self._bar.update(task, completed=row["bytes"])
        total = sum(int(r["size"]) for r in rows)
        done = sum(int(r["bytes"]) for r in rows)
        self._bar.update(self._overall, total=total, completed=done)


def _ask(
    settings: _Globals,
    cfg: Config,
    method: str,
    params: dict[str, Any],
    paths: Sequence[Path | None],
    progress: _PullProgress | None = None,
) -> Any:
    """Call ``method`` on the running daemon, or on a short-lived node when none answers.

    ``paths`` are checked against the config's folders only for a short-lived node: a
    daemon knows its own folders (a member of the service's group has none configured).
    """
    import asyncio
    import contextlib

    from lanshare.errors import Interrupted

    guard = progress if progress is not None else contextlib.nullcontext()
    # Ctrl-C becomes an error of ours: typer would turn a KeyboardInterrupt into a silent
    # exit. A short-lived node has stopped cleanly by then (asyncio.run cancels it, and
    # its stop keeps the verified blocks of a partial download).
    try:
        try:
            client = _connect(settings, cfg, timeout=None)
        except DaemonNotRunning:
            _need_folders(cfg)
            for path in paths:
                if path is not None:
                    _pick_folder(cfg.folders, path)
            return asyncio.run(_ask_short_lived(cfg, method, params, progress))
        with client, guard:
            result: Any = None
            for kind, value in client.stream(method, params):
                if kind == "progress" and progress is not None:
                    progress.update(value)
                elif kind == "result":
                    result = value
                    _final_progress(progress, result)
            return result
    except KeyboardInterrupt:
        raise Interrupted from None


async def _ask_short_lived(
    cfg: Config, method: str, params: dict[str, Any], progress: _PullProgress | None
) -> Any:
    from lanshare.daemon import Daemon, run_short_lived

    async def report(update: dict[str, Any]) -> None:
        if progress is not None:
            progress.update(update)

    async def work(node: Daemon) -> Any:
        handler = node.handler(method)
        result = await handler(params, report)
        _final_progress(progress, result)
        return result

    if progress is None:
        return await run_short_lived(cfg, work)
    with progress:
        return await run_short_lived(cfg, work)


def _final_progress(progress: _PullProgress | None, result: Any) -> None:
    """Show the finished state: a pull that ends between two progress lines still draws
    every file's bar complete."""
    if progress is not None and isinstance(result, list):
        progress.update({"files": [r for r in result if isinstance(r, dict) and "size" in r]})


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


def _connect(settings: _Globals, cfg: Config, timeout: float | None = 30.0) -> ControlClient:
    """A client connected to the first control socket that answers (module docstring).

    Raises:
        DaemonNotRunning: none answers; the message names every socket tried.
    """
    from lanshare.control import ControlClient

    if settings.socket is not None:
        candidates: Sequence[Path] = (settings.socket.expanduser(),)
    elif cfg.source is not None:
        candidates = (cfg.node.control_socket,)
    else:
        candidates = configuration.user_control_sockets()
    for path in candidates:
        client = ControlClient(path, timeout=timeout)
        try:
            client.connect()
        except DaemonNotRunning:
            continue
        return client
    tried = " or ".join(str(p) for p in candidates)
    raise DaemonNotRunning(
        f"no lanshare daemon is running (nothing answers on {tried}); start one with "
        "`lanshare daemon`, or name its control socket with --socket PATH"
    )


def _need_folders(cfg: Config) -> None:
    """No daemon answered: a usage error (exit 2) when no folder is configured either,
    before any node starts."""
    if not cfg.folders:
        where = cfg.source or configuration.default_config_path()
        raise UsageError(
            f"no shared folder is configured in {where} and no lanshare daemon answers: "
            "run `lanshare init FOLDER` first, or name a daemon's socket with --socket PATH"
        )


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder {path}: {exc.strerror}") from exc


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every ``LanshareError`` into a message and exit code."""
    args = sys.argv[1:] if argv is None else argv
    show_traceback = "--debug" in args or os.environ.get("LANSHARE_DEBUG", "") not in ("", "0")
    try:
        app(args=args, prog_name="lanshare")
    except LanshareError as exc:
        if show_traceback:
            traceback.print_exc()
        typer.echo(f"lanshare: {printable(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("lanshare: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _load(settings: _Globals) -> Config:
    return configuration.load(settings.config)


def _pick_folder(folders: Sequence[FolderConfig], path: Path | None) -> FolderConfig:
    """The configured folder that holds ``path``, or the only folder when ``path`` is None."""
    if not folders:
        raise UsageError("no shared folder is configured: run `lanshare init FOLDER` first")
    if path is None:
        if len(folders) == 1:
            return folders[0]
        names = ", ".join(str(f.path) for f in folders)
        raise UsageError(f"several folders are shared ({names}): name one")
    target = path.expanduser().absolute()
    for folder in folders:
        if target == folder.path or folder.path in target.parents:
            return folder
    raise UsageError(f"{target} is not inside any shared folder")


def _setup_logging(debug: bool, level_name: str = "warning", *, daemon: bool = False) -> None:
    level = logging.DEBUG if debug else logging.getLevelNamesMapping()[level_name.upper()]
    # journald adds its own time stamps; a terminal user sees the same short lines.
    fmt = "%(levelname)s %(name)s: %(message)s" if daemon else "%(levelname)s: %(message)s"
    # A log line quotes peers' names and paths: they must not forge lines or drive terminals.
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
