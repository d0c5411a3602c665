"""The ``lanshare`` command line: parse, call the library or the daemon, print.

I/O shell. Every command maps its errors through ``main()``: a message on stderr and an exit
status (1 general, 2 usage or configuration, 3 no daemon running); a traceback only with
``--debug`` or ``LANSHARE_DEBUG=1``.
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
from lanshare.errors import LanshareError, UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lanshare.config import Config, FolderConfig

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
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print machine-readable JSON instead of text."),
]


@dataclass(slots=True)
class _Globals:
    """Options given before the command name; the command's own flags override them."""

    config: Path | None = None
    debug: bool = False


def _settings(ctx: typer.Context, config: Path | None, debug: bool) -> _Globals:
    given = ctx.obj if isinstance(ctx.obj, _Globals) else _Globals()
    settings = _Globals(config=config or given.config, debug=debug or given.debug)
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
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    ctx.obj = _Globals(config=config, debug=debug)


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
        typer.echo(f"lanshare: warning: {exc}", err=True)
    verb = "Joined" if key is not None else "Created"
    typer.echo(f"{verb} shared folder {folder}")
    typer.echo(f"Config: {config_path}")
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
) -> None:
    """Update the local index of shared folders and print what changed.

    Unchanged files (same size, mtime, inode and ctime) are not read again.
    """
    import asyncio

    from lanshare import identity, index, scanner

    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    folders = [_pick_folder(cfg.folders, path)] if path is not None else list(cfg.folders)
    if not folders:
        raise UsageError("no shared folder is configured: run `lanshare init FOLDER` first")
    node = identity.load_or_create_node_id(cfg.node.state_dir)
    summaries = []
    with index.Index.open(cfg.node.state_dir / index.DATABASE_NAME) as db:
        for folder in folders:
            summary = asyncio.run(
                scanner.scan_folder(folder, db, identity.short_id(node), cfg.transfer.io_workers)
            )
            summaries.append(summary)
    if as_json:
        _print_json([s.as_json() for s in summaries])
        return
    for s in summaries:
        typer.echo(
            f"{s.path}: {s.files} files, {s.dirs} dirs, {_size(s.bytes)} in {s.blocks} blocks; "
            f"{s.new} new, {s.changed} changed, {s.deleted} deleted ({s.seconds:.2f} s)"
        )


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
) -> None:
    """Run the sync daemon in the foreground (use the systemd units to run it as a service).

    With no config file at all, one is created that shares ~/LanShare under a fresh key.
    Logs go to stderr; SIGTERM stops it cleanly, SIGHUP reloads the config.
    """
    import asyncio

    from lanshare.daemon import Daemon

    settings = _settings(ctx, config, debug)
    overrides = {"logging.level": log_level or None}
    cfg, created = configuration.ensure_config(settings.config, overrides)
    if created:
        for folder in cfg.folders:
            _make_folder(folder.path)
            typer.echo(
                f"No config found: created {cfg.source} sharing {folder.path}\n"
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
) -> None:
    """List what the LAN shares: files, which peers have them, and their local state.

    Asks the running daemon; with none, starts a short-lived node that finds peers first.
    """
    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    target = str(_inside(cfg, path)) if path is not None else None
    entries = _ask(cfg, "ls", {"path": target})
    if as_json:
        _print_json(entries)
        return
    if not entries:
        typer.echo("nothing shared yet")
        return
    for entry in entries:
        peers = len(entry["peers"])
        size = _size(entry["size"]) if entry["type"] == "file" else entry["type"]
        typer.echo(f"{entry['state']:<10} {size:>10} {peers:>2} peer(s)  {entry['path']}")


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
) -> None:
    """Fetch these paths from the LAN now, with progress; exit 0 once all are verified.

    A directory means everything under it. Works with no daemon running: a short-lived
    node finds the peers, fetches, and exits.
    """
    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    targets = [str(_inside(cfg, p)) for p in paths]
    params = {"paths": targets, "timeout": timeout}
    result = _ask(cfg, "pull", params, progress=None if as_json else _PullProgress())
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
) -> None:
    """Show each folder's sync state, what it still needs, and why it is not in sync.

    Needs a running daemon (exit status 3 when there is none).
    """
    from lanshare.control import ControlClient

    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    with ControlClient(cfg.node.control_socket) as client:
        result = client.call("status")
    if as_json:
        _print_json(result)
        return
    node = result.get("node", {})
    typer.echo(f"node {node.get('name', '?')} ({node.get('id', '?')})")
    for folder in result["folders"]:
        line = f"{folder['path']}: {folder['state']}"
        if folder["need_files"]:
            line += f", needs {folder['need_files']} file(s), {_size(folder['need_bytes'])}"
        if folder.get("conflicts"):
            line += f", {folder['conflicts']} conflict(s)"
        if folder["reason"]:
            line += f" ({folder['reason']})"
        typer.echo(line)
        for peer in folder["peers"]:
            rate = f"{_size(peer['rate'])}/s" if peer["rate"] else "idle"
            typer.echo(f"  peer {peer['name'] or peer['id']}: {rate}")
        for problem in folder.get("problems", [])[:10]:
            typer.echo(f"  ! {problem['path']}: {problem['problem']}")


@app.command()
def peers(
    ctx: typer.Context,
    as_json: JsonOption = False,
    seconds: Annotated[
        float, typer.Option("--seconds", help="Browse this long when no daemon is running.")
    ] = 3.0,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """List the peers seen on the LAN that share a folder with this machine.

    Asks the running daemon; with none, browses mDNS itself for a few seconds.
    """
    import asyncio

    from lanshare.control import ControlClient
    from lanshare.discovery import browse_once
    from lanshare.errors import DaemonNotRunning

    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    try:
        with ControlClient(cfg.node.control_socket) as client:
            found = client.call("peers")
    except DaemonNotRunning:
        found = [p.to_json() for p in asyncio.run(browse_once(cfg, seconds))]
    if as_json:
        _print_json(found)
        return
    if not found:
        typer.echo("no peers found")
    for peer in found:
        addresses = ", ".join(peer["addresses"])
        typer.echo(f"{peer['name'] or peer['id']:<24} {peer['state']:<12} {addresses}")


@app.command()
def resume(
    ctx: typer.Context,
    path: Annotated[
        Path | None,
        typer.Argument(help="The paused folder (or a path inside it); default: every folder."),
    ] = None,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Confirm the mass deletion that paused a folder, and let it sync again.

    A folder pauses when a change would delete more than [sync] max_delete_ratio of its
    entries; `lanshare status` says why. Restoring the files also ends the pause. Pulls
    that a full disk paused are tried again at once (they also resume by themselves when
    space is freed).
    """
    from lanshare.control import ControlClient

    settings = _settings(ctx, config, debug)
    cfg = _load(settings)
    params = {"path": str(_inside(cfg, path))} if path is not None else {}
    with ControlClient(cfg.node.control_socket) as client:
        result = client.call("resume", params)
    for folder in result["resumed"]:
        typer.echo(f"resumed {folder}")


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
            TextColumn("{task.description}", justify="left"),
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
            name = str(row["path"]).rsplit("/", 1)[-1][:24]
            task = self._tasks.get(row["path"])
            if task is None:
                task = self._tasks[row["path"]] = self._bar.add_task(name, total=row["size"])
            self._bar.update(task, completed=row["bytes"])
        total = sum(int(r["size"]) for r in rows)
        done = sum(int(r["bytes"]) for r in rows)
        self._bar.update(self._overall, total=total, completed=done)


def _ask(
    cfg: Config, method: str, params: dict[str, Any], progress: _PullProgress | None = None
) -> Any:
    """Call ``method`` on the running daemon, or on a short-lived node when none runs."""
    import asyncio
    import contextlib

    from lanshare.control import ControlClient
    from lanshare.errors import DaemonNotRunning

    guard = progress if progress is not None else contextlib.nullcontext()
    try:
        client = ControlClient(cfg.node.control_socket, timeout=None)
        client.connect()
    except DaemonNotRunning:
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


def _inside(cfg: Config, path: Path) -> Path:
    """``path`` made absolute; a usage error (exit 2) when it is outside every folder."""
    folder = _pick_folder(cfg.folders, path)
    del folder
    return path.expanduser().absolute()


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
        typer.echo(f"lanshare: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("lanshare: interrupted", err=True)
        sys.exit(130)


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
    logging.basicConfig(level=level, format=fmt, force=True)


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
