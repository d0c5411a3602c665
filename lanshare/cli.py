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
from typing import TYPE_CHECKING, Annotated

import typer

from lanshare import __version__
from lanshare import config as configuration
from lanshare.errors import LanshareError, NotImplementedYet, UsageError

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
    from lanshare import keys

    settings = _settings(ctx, config, debug)
    folder = path.expanduser().absolute()
    raw = keys.parse_key(key) if key is not None else keys.generate_key()
    key_text = keys.format_key(raw)
    config_path = settings.config or configuration.default_config_path()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder {folder}: {exc.strerror}") from exc
    configuration.add_folder(config_path, folder, key_text)
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


@app.command()
def daemon(
    ctx: typer.Context,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Run the sync daemon in the foreground (use the systemd units to run it as a service).

    With no config file at all, one is created that shares ~/LanShare under a fresh key.
    """
    _settings(ctx, config, debug)
    raise NotImplementedYet(
        "the sync daemon is not built in this version yet; `lanshare scan` indexes folders"
    )


@app.command()
def ls(
    ctx: typer.Context,
    path: Annotated[Path | None, typer.Argument(help="A path inside a shared folder.")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """List what the LAN shares: files, which peers have them, and their local state."""
    _settings(ctx, config, debug)
    raise NotImplementedYet("`lanshare ls` arrives with the sync engine; it is not built yet")


@app.command()
def pull(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files or directories inside a folder.")],
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Fetch these paths from the LAN now, with progress; exit 0 once all are verified."""
    _settings(ctx, config, debug)
    raise NotImplementedYet("`lanshare pull` arrives with the sync engine; it is not built yet")


@app.command()
def status(
    ctx: typer.Context,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Show each folder's sync state, what it still needs, and why it is not in sync."""
    _settings(ctx, config, debug)
    raise NotImplementedYet("`lanshare status` needs the daemon, which is not built yet")


@app.command()
def peers(
    ctx: typer.Context,
    as_json: JsonOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """List the peers seen on the LAN that share a folder with this machine."""
    _settings(ctx, config, debug)
    raise NotImplementedYet("`lanshare peers` arrives with discovery; it is not built yet")


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


def _setup_logging(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
