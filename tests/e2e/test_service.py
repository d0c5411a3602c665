"""The daemon as users meet it: one index per node, the exit status of every outcome, and the
system service of the README reached by root and by members of group ``lanshare``.

The system service runs as it would under systemd, set up by hand (there is no systemd as
PID 1 here): user and group ``lanshare`` (created with ``useradd --system`` when missing), the
unit's ``Environment=`` (``XDG_STATE_HOME=/var/lib``, ``XDG_RUNTIME_DIR=/run``), its
``StateDirectory=`` (``/var/lib/lanshare``, 0700), ``RuntimeDirectory=`` (``/run/lanshare``,
0750, group ``lanshare``), ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``, and the README's
``/etc/lanshare`` (0750, owned by ``lanshare``). Those three directories are the test's own,
bound over the real paths in a private mount namespace for each command, so the machine's
``/etc``, ``/var/lib`` and ``/run`` are left as they were (empty mount points aside).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lanshare import config as configuration
from lanshare.control import ControlClient
from lanshare.daemon import LOCK_NAME, STRAY_DATABASE_NAMES
from lanshare.identity import NODE_ID_FILE
from lanshare.index import DATABASE_NAME
from tests.e2e.harness import (
    CLI_TIMEOUT,
    READY_TIMEOUT,
    NotifyListener,
    short_dir,
    start_all,
    wait_same_tree,
    wait_until,
)
from tests.lab import ROOT, Process

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from tests.e2e.harness import Cluster
    from tests.lab import Host

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns]

SYNC_TIMEOUT = 60.0
SERVICE_USER = "lanshare"
MEMBER_USER = "lanshare-member"
"""Another user, in group ``lanshare``, with no lanshare config of their own."""
SYSTEM_CONFIG = str(configuration.SYSTEM_CONFIG)
SYSTEM_STATE = configuration.SYSTEM_STATE_DIR
SYSTEM_SOCKET = configuration.SYSTEM_CONTROL_SOCKET
UNIT = ROOT / "systemd" / "lanshare.service"
# The service user cannot enter the virtualenv's interpreter below /root: the system Python
# of the same minor version runs the checkout with the virtualenv's packages on its path.
SYSTEM_PYTHON = shutil.which(f"python3.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
SITE_PACKAGES = next(
    p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)
)


# --- one index, and the exit statuses, with daemons -----------------------------------------------


@pytest.mark.timeout(300)
def test_scan_asks_the_daemon_and_every_outcome_has_its_exit_status(cluster: Cluster) -> None:
    lab = cluster.lab(2)
    a, b = (cluster.node(name, host) for name, host in zip("ab", lab.hosts, strict=True))
    for i in range(3):
        (a.folder / f"file-{i}.txt").write_text(f"file {i}\n")
    # An older release's `lanshare scan` left an index of its own in the state dir.
    a.state_dir.mkdir(parents=True)
    for name in STRAY_DATABASE_NAMES:
        (a.state_dir / name).write_bytes(b"an older index")
    # b's daemon binds the socket $LANSHARE_SOCKET names, not its config's.
    b_socket = str(b.sockets / "b-elsewhere.sock")
    a.start(wait=False)
    b.start(wait=False, env={"LANSHARE_SOCKET": b_socket})
    a.wait_ready()
    b.wait_ready()
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])
    a.wait_log("an older release left", SYNC_TIMEOUT)
    for name in STRAY_DATABASE_NAMES:
        assert f"removed {a.state_dir / name}: " in a.log_text()

    # The daemon scans, in its own index: what it indexed long ago is not new.
    [summary] = a.cli_json("scan")
    assert summary["path"] == str(a.folder)
    found = (summary["files"], summary["new"], summary["changed"], summary["deleted"])
    assert found == (3, 0, 0, 0)
    # One index: the daemon's (with its WAL files while it is open), and no other.
    assert {p.name for p in a.state_dir.glob("index*")} <= {
        DATABASE_NAME,
        f"{DATABASE_NAME}-wal",
        f"{DATABASE_NAME}-shm",
    }
    assert (a.state_dir / DATABASE_NAME).is_file()
    assert "3 files" in a.cli("scan").stdout

    # 0: in sync.
    wait_until(lambda: a.cli("status", check=False).returncode == 0, SYNC_TIMEOUT, "a exits 0")
    # 1: the operation failed: no peer has the path.
    nowhere = str(b.folder / "nobody-has-this.txt")
    pulled = b.cli("--socket", b_socket, "pull", nowhere, check=False)
    assert pulled.returncode == 1, pulled.stderr
    assert "no peer has" in pulled.stderr
    # 3: b's daemon owns its state, but nothing answers on the socket its config names:
    # no second node beside it.
    for args in (["status"], ["ls"], ["pull", nowhere]):
        beside = b.cli(*args, check=False)
        assert beside.returncode == 3, beside.stdout + beside.stderr
    assert "a lanshare daemon runs with the state in" in beside.stderr
    assert b.cli("status", "--socket", b_socket).returncode == 0
    # 2: a path outside every folder, judged by the daemon.
    outside = a.cli("ls", str(a.base / "elsewhere"), check=False)
    assert outside.returncode == 2, outside.stderr
    assert "is not inside any shared folder" in outside.stderr
    # 4: a folder in error (its disk is gone); status still prints it. The failed scan is 1.
    away = a.folder.with_name("share-unmounted")
    a.folder.rename(away)
    try:
        failed = a.cli("scan", check=False)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        status = a.cli("status", check=False)
        assert status.returncode == 4, status.stdout + status.stderr
        assert f"{a.folder}: " in status.stdout
        assert status.stderr == ""
        as_json = a.cli("status", "--json", check=False)
        assert as_json.returncode == 4
        [folder] = json.loads(as_json.stdout)["folders"]
        assert folder["state"] in ("error", "paused")
    finally:
        away.rename(a.folder)
    assert a.cli("scan").returncode == 0
    wait_until(lambda: a.cli("status", check=False).returncode == 0, SYNC_TIMEOUT, "a recovers")
    # Nothing was lost on either side meanwhile.
    wait_same_tree(a.folder, [b.folder], SYNC_TIMEOUT, [a, b])

    # 3: no daemon for a command that needs one.
    assert a.stop() == 0
    stopped = a.cli("status", check=False)
    assert stopped.returncode == 3
    assert "no lanshare daemon is running" in stopped.stderr
    # Without a daemon, scan uses the index the daemon used: still nothing new.
    [offline] = a.cli_json("scan")
    assert (offline["files"], offline["new"], offline["changed"]) == (3, 0, 0)
    assert not list(a.state_dir.glob("index.db*"))


# --- the system service ---------------------------------------------------------------------------


@pytest.fixture
def accounts() -> Iterator[Callable[..., pwd.struct_passwd]]:
    """``ensure(name, groups=...)``: a system account, made if missing; the ones made here
    are removed again at the end (with their groups), newest first."""
    made: list[str] = []

    def ensure(name: str, *, groups: Sequence[str] = ()) -> pwd.struct_passwd:
        return _ensure_account(name, groups=groups, made=made)

    try:
        yield ensure
    finally:
        for name in reversed(made):
            subprocess.run(["userdel", name], check=False, capture_output=True)


def _ensure_account(name: str, *, groups: Sequence[str] = (), made: list[str]) -> pwd.struct_passwd:
    """The system account ``name`` (made as the README makes the service user if missing,
    and then added to ``made``)."""
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                *("useradd", "--system", "--user-group", "--no-create-home"),
                *("--home-dir", str(SYSTEM_STATE) if name == SERVICE_USER else "/nonexistent"),
                *("--shell", "/usr/sbin/nologin", name),
            ],
            check=True,
            capture_output=True,
        )
        made.append(name)
        account = pwd.getpwnam(name)
    for group in groups:
        if name not in grp.getgrnam(group).gr_mem:
            subprocess.run(["usermod", "-aG", group, name], check=True, capture_output=True)
    return account


class _System:
    """The service's directories, bound over the real paths for each command it runs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.etc = base / "etc-lanshare"
        self.state = base / "var-lib-lanshare"
        self.run = base / "run-lanshare"
        self.made: list[Path] = []

    def mount_points(self) -> None:
        for target in (Path(SYSTEM_CONFIG).parent, SYSTEM_STATE, SYSTEM_SOCKET.parent):
            if not target.exists():
                target.mkdir(parents=True)
                self.made.append(target)

    def remove_mount_points(self) -> None:
        for target in self.made:
            with contextlib.suppress(OSError):
                target.rmdir()  # only while empty: it never held anything but a mount

    def command(
        self, host: Host, account: pwd.struct_passwd | None, env: dict[str, str], *args: str
    ) -> list[str]:
        """``python -m lanshare ARGS`` as ``account`` (root when None), with ``env`` only,
        in ``host``'s network namespace and a mount namespace holding the service's dirs."""
        binds = (
            'mount --bind "$1" /etc/lanshare && mount --bind "$2" /var/lib/lanshare && '
            'mount --bind "$3" /run/lanshare && shift 3 && exec "$@"'
        )
        user: list[str] = []
        if account is not None:
            user = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}"]
            user += ["--init-groups", "--"]
        python = str(SYSTEM_PYTHON) if account is not None else sys.executable
        environ = dict(env, PYTHONPATH=f"{ROOT}:{SITE_PACKAGES}", PYTHONUNBUFFERED="1")
        environ.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        return [
            *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", binds, "sh"),
            *(str(self.etc), str(self.state), str(self.run)),
            *("ip", "netns", "exec", host.netns),
            *user,
            "env",
            "-i",
            *(f"{k}={v}" for k, v in environ.items()),
            python,
            "-m",
            "lanshare",
            *args,
        ]


def _unit() -> tuple[dict[str, str], int, int]:
    """The unit's ``Environment=``, ``StateDirectoryMode=`` and ``RuntimeDirectoryMode=``."""
    env: dict[str, str] = {}
    modes: dict[str, int] = {}
    for line in UNIT.read_text().splitlines():
        name, _, value = line.partition("=")
        if name == "Environment":
            key, _, setting = value.partition("=")
            env[key] = setting
        elif name in ("StateDirectoryMode", "RuntimeDirectoryMode"):
            modes[name] = int(value, 8)
    return env, modes["StateDirectoryMode"], modes["RuntimeDirectoryMode"]


def _login_env(account: pwd.struct_passwd, home: str | None = None) -> dict[str, str]:
    """What ``sudo -u USER`` leaves: the target's HOME, USER, LOGNAME and SHELL, no XDG_*."""
    return {
        "HOME": home or account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "SHELL": account.pw_shell,
    }


@pytest.fixture
def system() -> Iterator[_System]:
    base = short_dir("lss-")
    base.chmod(0o755)
    made = _System(base)
    try:
        made.mount_points()
        yield made
    finally:
        made.remove_mount_points()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(420)
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd (passwd)")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 of the same version")
def test_the_system_service_is_reachable_by_root_and_the_lanshare_group(
    cluster: Cluster, system: _System, accounts: Callable[..., pwd.struct_passwd]
) -> None:
    lab = cluster.lab(2)  # skips without root: everything below needs it
    host, peer_host = lab.hosts
    service = accounts(SERVICE_USER)
    member = accounts(MEMBER_USER, groups=[SERVICE_USER])
    lanshare_gid = grp.getgrnam(SERVICE_USER).gr_gid

    # The README: `install -d -m 0750 -o lanshare -g lanshare /etc/lanshare`; the unit's
    # StateDirectory= and RuntimeDirectory=, which systemd makes the service user's.
    unit_env, state_mode, runtime_mode = _unit()
    assert unit_env == {"XDG_STATE_HOME": "/var/lib", "XDG_RUNTIME_DIR": "/run"}
    directories = ((system.etc, 0o750), (system.state, state_mode), (system.run, runtime_mode))
    for directory, mode in directories:
        directory.mkdir(mode=mode)
        os.chown(directory, service.pw_uid, lanshare_gid)
        directory.chmod(mode)

    def run(
        account: pwd.struct_passwd | None, env: dict[str, str], *args: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            system.command(host, account, env, *args),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    # `sudo -u lanshare lanshare init /var/lib/lanshare/Shared --config /etc/lanshare/config.toml`
    shared = SYSTEM_STATE / "Shared"
    made = run(service, _login_env(service), "init", str(shared), "--config", SYSTEM_CONFIG)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    config_text = (system.etc / "config.toml").read_text()
    assert 'control_socket = "/run/lanshare/control.sock"' in config_text
    assert 'state_dir = "/var/lib/lanshare"' in config_text
    local_file = system.state / "Shared" / "from-the-nas.txt"
    local_file.write_text("kept on the NAS\n")
    os.chown(local_file, service.pw_uid, lanshare_gid)

    # The service, as systemd would start it.
    notify = NotifyListener(system.base / "notify.sock")
    try:
        notify.path.chmod(0o777)
        # What systemd gives a Type=notify unit with User= and WatchdogSec=30s.
        service_env = dict(
            _login_env(service),
            **unit_env,
            NOTIFY_SOCKET=str(notify.path),
            WATCHDOG_USEC="30000000",
            LANG="C.UTF-8",
        )
        log_path = system.base / "service.log"
        with log_path.open("w") as log:
            popen = subprocess.Popen(
                system.command(host, service, service_env, "daemon", "--config", SYSTEM_CONFIG),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
            )
        daemon = Process(popen, "lanshare.service")
        host.processes.append(daemon)
        try:
            notify.wait_for("READY", "1", READY_TIMEOUT, alive=lambda: popen.poll() is None)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"service not ready: {exc}\n{log_path.read_text()}") from None
        _check_service(system, run, service, member, key, shared, peer_host, cluster, log_path)
        assert daemon.stop() == 0, log_path.read_text()
        host.processes.remove(daemon)
    finally:
        notify.close()


def _check_service(
    system: _System,
    run: Any,
    service: pwd.struct_passwd,
    member: pwd.struct_passwd,
    key: str,
    shared: Path,
    peer_host: Host,
    cluster: Cluster,
    log_path: Path,
) -> None:
    # The socket lets the group in, and only the group.
    sock = (system.run / "control.sock").stat()
    assert (sock.st_mode & 0o777, sock.st_gid) == (0o660, grp.getgrnam(SERVICE_USER).gr_gid)
    identity = (system.state / NODE_ID_FILE).read_bytes()

    peer = cluster.node("peer", peer_host, key=key)
    (peer.folder / "from-the-peer.txt").write_text("written on the peer\n")
    start_all([peer])

    def service_status() -> dict[str, Any]:
        with ControlClient(system.run / "control.sock") as client:
            result: dict[str, Any] = client.call("status")
            return result

    wait_until(
        lambda: (
            (system.state / "Shared" / "from-the-peer.txt").exists()
            and (peer.folder / "from-the-nas.txt").exists()
            and all(f["state"] == "in_sync" for f in service_status()["folders"])
        ),
        SYNC_TIMEOUT,
        f"the service and the peer share both files\n{log_path.read_text()[-3000:]}",
    )
    peer_id = peer.status()["node"]["id"]

    root = pwd.getpwuid(0)
    root_home = system.base / "root-home"
    root_home.mkdir()
    member_home = system.base / "member-home"
    member_home.mkdir()
    os.chown(member_home, member.pw_uid, member.pw_gid)
    users = [
        ("root with the system config", None, _login_env(root, str(root_home)), SYSTEM_CONFIG),
        ("a member of group lanshare", member, _login_env(member, str(member_home)), None),
    ]
    for who, account, env, config in users:
        flags = ["--config", config] if config else []
        status = run(account, env, *flags, "status")
        assert status.returncode == 0, f"{who}: {status.stdout}{status.stderr}"
        assert f"{shared}: in_sync" in status.stdout, who
        listing = run(account, env, *flags, "ls", "--json")
        assert listing.returncode == 0, f"{who}: {listing.stderr}"
        paths = {entry["path"]: entry for entry in json.loads(listing.stdout)}
        assert {"from-the-nas.txt", "from-the-peer.txt"} <= set(paths), who
        assert paths["from-the-peer.txt"]["state"] == "in_sync"
        assert peer_id in paths["from-the-peer.txt"]["peers"]
        peers = run(account, env, *flags, "peers", "--json")
        assert peers.returncode == 0, f"{who}: {peers.stderr}"
        assert [p["state"] for p in json.loads(peers.stdout) if p["id"] == peer_id] == [
            "connected"
        ], who
        # Nothing was made in their home: no state, no second identity.
        assert [p.name for p in Path(env["HOME"]).iterdir()] == [], who

    # The member cannot read the service's config, and needs not.
    denied = run(member, _login_env(member, str(member_home)), "--config", SYSTEM_CONFIG, "ls")
    assert denied.returncode == 2
    assert "readable" in denied.stderr

    # A socket that does not answer while the daemon owns the config: no short-lived node
    # beside it (it would take the port and make a second identity); exit 3, saying why.
    for args in (["ls"], ["pull", str(shared / "from-the-peer.txt")], ["scan"]):
        refused = run(
            None,
            _login_env(root, str(root_home)),
            *("--config", SYSTEM_CONFIG, "--socket", str(system.base / "nothing.sock")),
            *args,
        )
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "a lanshare daemon runs with the state in /var/lib/lanshare" in refused.stderr
    index_files = {DATABASE_NAME, f"{DATABASE_NAME}-wal", f"{DATABASE_NAME}-shm"}
    assert {p.name for p in system.state.iterdir()} == {"Shared", NODE_ID_FILE, LOCK_NAME} | (
        index_files
    )
    assert (system.state / NODE_ID_FILE).read_bytes() == identity
    for path in system.state.iterdir():
        assert path.stat().st_uid == service.pw_uid, path
    assert peer.stop() == 0
