"""The command line as a person uses it: exit codes, messages, files it writes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest

from lanshare import config as configuration
from lanshare import doctor, keys
from lanshare.cli import _print_status, _PullProgress
from lanshare.daemon import LOCK_NAME, STRAY_DATABASE_NAMES, own_state
from lanshare.index import DATABASE_NAME, Index
from tests.cli_env import home, run

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["home"]

COMMANDS = [
    "init",
    "key",
    "scan",
    "daemon",
    "ls",
    "search",
    "pull",
    "status",
    "peers",
    "resume",
    "doctor",
]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in COMMANDS:
        assert command in out


def test_help_shows_config_tables_by_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``[sync]`` in a help text is not taken for markup and dropped."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, "resume", "--help")
    assert code == 0
    assert "[sync] delete_window" in out
    code, out, _ = run(capsys, "status", "--help")
    assert "[node] control_socket" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "--config" in out
    assert "--debug" in out
    assert len(out.strip().splitlines()) > 3


def test_init_creates_private_config_and_prints_key_last(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = home / "Shared"
    code, out, _ = run(capsys, "init", str(folder))
    assert code == 0
    assert folder.is_dir()
    config_file = home / "config" / "lanshare" / "config.toml"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    key_line = out.strip().splitlines()[-1]
    assert len(keys.parse_key(key_line)) == 32
    code, out, _ = run(capsys, "key", str(folder))
    assert code == 0
    assert out.strip() == key_line


def test_init_defaults_to_lanshare_in_home(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(capsys, "init")
    assert code == 0
    assert (home / "LanShare").is_dir()


def test_join_with_key_and_config_flag_after_command(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = keys.format_key(keys.generate_key())
    config_file = home / "elsewhere.toml"
    code, out, _ = run(capsys, "init", str(home / "B"), "--key", key, "--config", str(config_file))
    assert code == 0
    assert out.strip().splitlines()[-1] == key
    code, out, _ = run(capsys, "--config", str(config_file), "key")
    assert code == 0
    assert out.strip() == key


def test_mistyped_key_is_refused_with_exit_2(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = keys.format_key(keys.generate_key())
    position = 3
    typo = "A" if key[position] != "A" else "B"
    mistyped = key[:position] + typo + key[position + 1 :]
    code, _, err = run(capsys, "init", str(home / "B"), "--key", mistyped)
    assert code == 2
    assert err.startswith("lanshare: ")
    assert "Traceback" not in err
    assert not (home / "config" / "lanshare" / "config.toml").exists()


def test_second_init_of_same_folder_keeps_config(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init", str(home / "A"))
    config_file = home / "config" / "lanshare" / "config.toml"
    before = config_file.read_bytes()
    code, _, err = run(capsys, "init", str(home / "A"))
    assert code == 2
    assert "already" in err
    assert config_file.read_bytes() == before


def test_path_outside_every_folder_is_a_usage_error(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init", str(home / "A"))
    code, _, err = run(capsys, "key", str(home / "elsewhere"))
    assert code == 2
    assert "not inside any shared folder" in err


def test_status_without_daemon_exits_3(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "init", str(home / "A"))
    code, out, err = run(capsys, "status")
    assert code == 3
    assert out == ""
    assert "no lanshare daemon is running" in err
    assert "Traceback" not in err


def test_debug_flag_shows_traceback(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "init", str(home / "A"))
    code, _, err = run(capsys, "status", "--debug")
    assert code == 3
    assert "Traceback" in err


def test_pull_outside_every_folder_is_exit_2(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init", str(home / "A"))
    code, _, err = run(capsys, "pull", str(home / "B" / "x"))
    assert code == 2
    assert "not inside any shared folder" in err


def test_scan_json_reports_summary_keys(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = home / "A"
    run(capsys, "init", str(folder))
    (folder / "sub").mkdir()
    (folder / "sub" / "hello.txt").write_bytes(b"hello\n")
    code, out, _ = run(capsys, "scan", "--json")
    assert code == 0
    [summary] = json.loads(out)
    assert summary["path"] == str(folder)
    assert summary["files"] == 1
    assert summary["new"] >= 2
    for key in ("dirs", "bytes", "blocks", "changed", "deleted", "seconds"):
        assert key in summary
    code, out, _ = run(capsys, "scan", "--json")
    [again] = json.loads(out)
    assert (again["new"], again["changed"], again["deleted"]) == (0, 0, 0)


def test_console_entry_point_runs(home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lanshare", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("lanshare ")


# --- one index, one owner, and the exit status rule, without a daemon ----------------------


def _state(home: Path) -> Path:
    return home / "state" / "lanshare"


def test_scan_without_daemon_uses_the_daemons_index_and_removes_strays(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = home / "A"
    run(capsys, "init", str(folder))
    (folder / "one.txt").write_text("one\n")
    state = _state(home)
    state.mkdir(parents=True)
    # What `lanshare scan` of an older release left: an index of its own.
    for name in STRAY_DATABASE_NAMES:
        (state / name).write_bytes(b"old index")
    code, out, err = run(capsys, "scan", "--json")
    assert code == 0, err
    [summary] = json.loads(out)
    assert summary["files"] == 1
    assert sorted(p.name for p in state.glob("index.db*")) == []
    assert (state / DATABASE_NAME).is_file()
    removed = [line for line in err.splitlines() if "an older release left" in line]
    assert [line.split()[2] for line in removed] == [
        f"{state / name}:" for name in STRAY_DATABASE_NAMES
    ]
    # The daemon will open the very index the scan wrote: it already knows the file.
    with Index.open(state / DATABASE_NAME) as db:
        [info] = db.folders()
        assert db.get(info.id, "one.txt") is not None


def test_offline_scans_add_up_in_the_mass_deletion_window(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = home / "A"
    run(capsys, "init", str(folder))
    config_path = configuration.default_config_path()
    with config_path.open("a") as f:
        f.write("\n[sync]\nmax_delete_min = 5\n")
    for i in range(10):
        (folder / f"f{i}.txt").write_text(str(i))
    assert run(capsys, "scan")[0] == 0
    for i in range(4):  # under the minimum on its own
        (folder / f"f{i}.txt").unlink()
    code, out, err = run(capsys, "scan", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["deleted"] == 4
    for i in range(4, 6):  # 6 of 10 within the window: withheld, as a daemon would
        (folder / f"f{i}.txt").unlink()
    code, out, err = run(capsys, "scan", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["deleted"] == 0
    assert "6 of 10 entries" in err
    with Index.open(_state(home) / DATABASE_NAME) as db:
        [info] = db.folders()
        assert not db.get(info.id, "f5.txt").deleted  # type: ignore[union-attr]
        assert db.deletions_held_since(info.id) is not None


def test_scan_and_short_lived_node_stop_when_a_daemon_holds_the_state(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = home / "A"
    run(capsys, "init", str(folder))
    cfg = configuration.load()
    # The lock a running daemon holds (a second open file description conflicts with it
    # just as another process would).
    with own_state(cfg, daemon=True):
        for argv in (["scan"], ["ls"], ["pull", "--json", str(folder / "x")], ["peers"]):
            code, out, err = run(capsys, *argv)
            assert code == 3, (argv, err)
            assert f"a lanshare daemon runs with the state in {_state(home)}" in err
            assert "--socket" in err
            assert out == ""
    # Nothing was made beside the daemon's state: no second identity, no second index.
    assert sorted(p.name for p in _state(home).iterdir()) == [LOCK_NAME]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the state to another user")
def test_another_users_state_is_left_alone(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "init", str(home / "A"))
    state = _state(home)
    state.mkdir(parents=True)
    os.chown(state, 65534, 65534)
    code, _, err = run(capsys, "scan")
    assert code == 2
    assert f"the state directory {state} belongs to user" in err
    assert "sudo -u" in err
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("argv", [["ls"], ["pull", "/tmp/x"], ["peers"], ["scan"], ["key"]])
def test_no_config_yet_is_exit_2_and_starts_nothing(
    home: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert "no shared folder is configured" in err
    assert "lanshare init" in err
    assert out == ""
    assert not (home / "state").exists()


def test_without_a_config_the_user_socket_then_the_system_socket_is_tried(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status")
    assert code == 3
    own = home / "run" / "lanshare" / "control.sock"
    assert f"nothing answers on {own} or {configuration.SYSTEM_CONTROL_SOCKET}" in err
    assert out == ""


def test_a_config_of_ones_own_names_the_only_socket(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init", str(home / "A"))
    code, _, err = run(capsys, "status")
    assert code == 3
    assert f"nothing answers on {home / 'run' / 'lanshare' / 'control.sock'});" in err
    assert f" or {configuration.SYSTEM_CONTROL_SOCKET}" not in err


def test_socket_flag_and_environment_name_the_socket(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init", str(home / "A"))
    flag = home / "flag.sock"
    for argv in (["status", "--socket", str(flag)], ["--socket", str(flag), "status"]):
        code, _, err = run(capsys, *argv)
        assert code == 3
        assert f"nothing answers on {flag});" in err
    monkeypatch.setenv("LANSHARE_SOCKET", str(home / "env.sock"))
    code, _, err = run(capsys, "resume")
    assert code == 3
    assert f"nothing answers on {home / 'env.sock'});" in err
    # The flag wins over the environment.
    code, _, err = run(capsys, "status", "--socket", str(flag))
    assert f"nothing answers on {flag});" in err


def _loopback_config(home: Path) -> Path:
    """A config whose short-lived node stays on 127.0.0.1 (UDP and mDNS)."""
    folder = home / "A"
    folder.mkdir()
    key = keys.format_key(keys.generate_key())
    path = home / "loopback.toml"
    path.write_text(
        f'[node]\nstate_dir = "{home / "state"}"\ncontrol_socket = "{home / "ctl.sock"}"\n'
        '[network]\nport = 0\nbind = ["127.0.0.1"]\ninterfaces = ["127.0.0.1"]\n'
        f'[[folder]]\npath = "{folder}"\nkey = "{key}"\n'
    )
    path.chmod(0o600)
    return path


def _lock_taken(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.timeout(120)
def test_ctrl_c_exits_130(home: Path) -> None:
    config_file = _loopback_config(home)
    # A pull with no peer anywhere waits: the short-lived node is up once it holds the lock.
    with subprocess.Popen(
        [
            *(sys.executable, "-m", "lanshare", "--config", str(config_file)),
            *("pull", "--json", str(home / "A" / "wanted.bin")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    ) as proc:
        deadline = time.monotonic() + 60
        while not _lock_taken(home / "state" / LOCK_NAME):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the short-lived node never took its lock"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert out == ""
    assert not _lock_taken(home / "state" / LOCK_NAME)


def test_ctrl_c_while_waiting_for_the_daemon_says_interrupted_and_exits_130(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A daemon that takes its time (here: one that never answers) and a user who presses
    Ctrl-C: one line, exit 130, not typer's silent exit and not a traceback."""
    run(capsys, "init", str(home / "A"))
    config = home / "config" / "lanshare" / "config.toml"
    control = configuration.load(config).node.control_socket
    control.parent.mkdir(parents=True, exist_ok=True)
    accepted = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(control))
        server.listen(1)
        server.settimeout(60)

        def accept() -> None:
            with contextlib.suppress(OSError):
                connection, _ = server.accept()
                accepted.set()
                with connection:
                    connection.recv(65536)  # the request, never answered
                    connection.recv(65536)  # until the client goes

        listener = threading.Thread(target=accept)
        listener.start()
        cli = subprocess.Popen(
            [sys.executable, "-m", "lanshare", "--config", str(config), "ls"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        try:
            assert accepted.wait(60), "the command never reached the control socket"
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
            listener.join(timeout=30)
    assert cli.returncode == 130, (out, err)
    assert err == "lanshare: interrupted\n"


def test_names_from_the_disk_are_printed_escaped_and_errors_stay_one_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = home / "photo\u202egpj.exe\x9b2J"
    code, out, _ = run(capsys, "init", str(folder))
    assert code == 0
    assert f"shared folder {home}/photo\\u202egpj.exe\\x9b2J\n" in out
    assert "\u202e" not in out
    assert "\x9b" not in out
    code, out, err = run(capsys, "key", str(home / "elsewhere\x1b[2J\nlanshare: forged"))
    assert code == 2
    assert out == ""
    assert err == (
        f"lanshare: {home}/elsewhere\\x1b[2J\\x0alanshare: forged is not inside any shared folder\n"
    )


def test_status_shows_what_peers_and_the_disk_named_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = {
        "node": {"name": "here\u202e", "id": "ab12"},
        "folders": [
            {
                "path": "/srv/share\x1b]0;x\x07",
                "state": "syncing",
                "need_files": 1,
                "need_bytes": 5,
                "conflicts": 1,
                "reason": "waiting for evil\x9b2J",
                "peers": [{"name": "peer\u2066x\u2069", "id": "cd34", "rate": 0}],
                "problems": [{"path": "a\u202eb", "problem": "refused: bad\nlanshare: forged"}],
                "conflict_paths": ["c.sync-conflict-\u2067x.txt"],
            }
        ],
    }
    _print_status(result)
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "node here\\u202e (ab12)",
        "/srv/share\\x1b]0;x\\x07: syncing, needs 1 file(s), 5 B, 1 conflict(s) "
        "(waiting for evil\\x9b2J)",
        "  peer peer\\u2066x\\u2069: idle",
        "  ! a\\u202eb: refused: bad\\x0alanshare: forged",
        "  conflict copy: c.sync-conflict-\\u2067x.txt (delete or rename it once resolved)",
    ]


def test_status_lists_banned_addresses_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    result = {
        "node": {"name": "here", "id": "ab12"},
        "folders": [],
        "banned": [
            {
                "address": "fd00:1:2:3::/64",
                "peer": "eeee",
                "seconds_left": 297,
                "why": "block 0 of a\u202eb failed its hash",
            }
        ],
    }
    _print_status(result)
    assert capsys.readouterr().out.splitlines()[1:] == [
        "banned fd00:1:2:3::/64 (peer eeee) for 297 s more: block 0 of a\\u202eb failed its hash"
    ]


def test_status_names_a_peer_whose_file_list_was_cut_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    problem = "announces more than 100 records ([sync] max_peer_records): 90 kept"
    result = {
        "node": {"name": "here", "id": "ab12"},
        "folders": [
            {
                "path": "/srv/share",
                "state": "error",
                "need_files": 0,
                "need_bytes": 0,
                "reason": "",
                "peers": [],
                "peer_problems": [
                    {"peer": "eeee", "name": "evil\u202e", "problem": problem},
                    {"peer": "dddd", "name": "", "problem": problem},
                ],
            }
        ],
    }
    _print_status(result)
    assert capsys.readouterr().out.splitlines()[1:] == [
        "/srv/share: error",
        f"  ! peer evil\\u202e (eeee): {problem}",
        f"  ! peer dddd: {problem}",
    ]


def test_pull_progress_shows_a_peers_file_name_escaped_and_never_as_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = "[bold]x[red]\x1b\u202e"
    with _PullProgress() as progress:
        progress.update({"files": [{"path": f"dir/{name}", "size": 10, "bytes": 10}]})
    out = capsys.readouterr().out
    assert "[bold]x[red]\\x1b\\u202e " in out
    assert "\u202e" not in out


# --- doctor ----------------------------------------------------------------------------------


def _doctor_json(capsys: pytest.CaptureFixture[str], config_file: Path) -> tuple[int, dict]:
    code, out, err = run(capsys, "--config", str(config_file), "doctor", "--json", "--seconds", "1")
    results = json.loads(out)
    assert [r["check"] for r in results] == list(doctor.CHECKS), err
    assert all(set(r) == {"check", "status", "detail", "fix"} for r in results)
    return code, {r["check"]: r for r in results}


def test_doctor_reports_a_broken_config_as_a_failed_check_not_a_usage_error(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = home / "broken.toml"
    config_file.write_text("[network\nport = 1\n")
    code, checks = _doctor_json(capsys, config_file)
    assert code == 1
    assert checks["config"]["status"] == "fail"
    assert "broken.toml" in checks["config"]["detail"]
    assert (
        checks["config"]["fix"] == f"edit {config_file} (config.example.toml describes every key)"
    )
    # Nothing is sent without the config's interfaces and keys.
    assert checks["discovery"]["status"] == "warn"
    assert checks["discovery"]["detail"].startswith("not checked: the config did not load")


def test_doctor_names_the_chmod_for_a_config_others_can_read(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = _loopback_config(home)
    config_file.chmod(0o644)
    code, checks = _doctor_json(capsys, config_file)
    assert code == 1
    assert checks["config"]["fix"] == f"chmod 600 {config_file}"


def test_doctor_says_what_it_meets_once_and_logs_nothing_beside(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An interface the config names but the machine lacks is the interfaces check's own
    finding: no warning line of the discovery code on stderr beside it."""
    config_file = _loopback_config(home)
    text = config_file.read_text().replace('interfaces = ["127.0.0.1"]', 'interfaces = ["nosuch0"]')
    config_file.write_text(text)
    code, out, err = run(capsys, "--config", str(config_file), "doctor", "--seconds", "1")
    assert code == 1
    assert err == ""
    (interfaces,) = [line for line in out.splitlines() if line.split()[1:2] == ["interfaces"]]
    assert "nosuch0" in interfaces


def test_doctor_without_a_daemon_on_loopback(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = _loopback_config(home)
    code, checks = _doctor_json(capsys, config_file)
    assert code == 1  # no daemon
    assert checks["config"]["status"] == "ok", checks["config"]
    assert checks["daemon"]["status"] == "fail"
    assert checks["daemon"]["fix"].startswith("start it: lanshare daemon")
    assert checks["interfaces"]["status"] == "warn"  # mDNS only on 127.0.0.1
    assert checks["sync"]["status"] == "warn"
    assert checks["disk"]["status"] in ("ok", "warn")
    assert str(home / "A") in checks["disk"]["detail"]
    # The human form: one aligned line per check, every fix indented under its check.
    code, out, _ = run(capsys, "--config", str(config_file), "doctor", "--seconds", "1")
    assert code == 1
    lines = out.splitlines()
    heads = [line for line in lines if not line.startswith(" ")]
    assert [line.split()[1] for line in heads] == list(doctor.CHECKS)
    assert all(line[:6] in ("ok    ", "WARN  ", "FAIL  ") for line in heads)
    assert {line.index(line.split()[2]) for line in heads} == {18}
    fixes = [line for line in lines if line.startswith(" ")]
    assert fixes
    assert all(line.startswith(" " * 18 + "fix: ") for line in fixes)
