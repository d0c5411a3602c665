"""The README's flows, walked as a new user types them, on three machines of a namespace lab.

Each machine has its own home directory and nothing else: the config, the index and the
control socket are where ``lanshare init`` and ``lanshare daemon`` put them by default. The
test asserts what the user sees (``status``, ``ls``, exit codes) and, at the end, that no
content ever written was lost: each one is in a shared folder, a conflict copy or a
``.lanshare/versions/`` archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.harness import short_dir, wait_until
from tests.lab import ROOT

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.e2e.harness import Cluster
    from tests.lab import Host

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.mdns, pytest.mark.slow]

MINUTE = 60.0
CLI_TIMEOUT = 120.0


class Machine:
    """One lab host as a user sees it: a home directory, a shell, maybe a running daemon."""

    def __init__(self, name: str, host: Host, home: Path) -> None:
        self.name = name
        self.host = host
        self.home = home
        self.home.mkdir(parents=True)
        self.daemon: subprocess.Popen[str] | None = None
        self.log = home / "daemon.log"

    @property
    def shared(self) -> Path:
        return self.home / "Shared"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "LANSHARE_"))}
        env.update(HOME=str(self.home), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", COLUMNS="80")
        env.pop("NOTIFY_SOCKET", None)
        return env

    def command(self, *args: str) -> list[str]:
        """``lanshare ARGS`` in this machine's network namespace."""
        return ["ip", "netns", "exec", self.host.netns, sys.executable, "-m", "lanshare", *args]

    def lanshare(
        self, *args: str, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``lanshare ARGS`` typed in this machine's shell; any exit status is returned."""
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
            env=self.env(),
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.lanshare(*args)
        assert result.returncode == 0, f"{self.name}: lanshare {args}: {result}"
        return result

    def status(self) -> dict[str, Any]:
        folders: list[dict[str, Any]] = json.loads(self.ok_or_4("status", "--json"))["folders"]
        return folders[0]

    def ok_or_4(self, *args: str) -> str:
        result = self.lanshare(*args)
        assert result.returncode in (0, 4), f"{self.name}: lanshare {args}: {result}"
        return result.stdout

    def ls(self) -> dict[str, dict[str, Any]]:
        return {e["path"]: e for e in json.loads(self.ok("ls", "--json").stdout)}

    def start(self) -> None:
        assert self.daemon is None
        with self.log.open("a") as log:
            self.daemon = subprocess.Popen(
                self.command("daemon"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                text=True,
                cwd=self.home,
                env=self.env(),
            )
        wait_until(lambda: self.lanshare("status").returncode in (0, 4), MINUTE, f"{self.name} up")

    def stop(self) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.wait(timeout=15)
        finally:
            if self.daemon.poll() is None:
                self.daemon.kill()
                self.daemon.wait(timeout=15)
            self.daemon = None
        return code

    def close(self) -> None:
        if self.daemon is not None:
            with contextlib.suppress(ProcessLookupError):
                self.daemon.kill()
            self.daemon.wait(timeout=15)
            self.daemon = None


@pytest.fixture
def machines(cluster: Cluster) -> Iterator[list[Machine]]:
    lab = cluster.lab(3)
    base = short_dir("lsr-")
    made = [Machine(n, h, base / n) for n, h in zip("abc", lab.hosts, strict=True)]
    try:
        yield made
    finally:
        for machine in made:
            machine.close()
        failed = [m.log.read_text() for m in made if m.log.exists()]
        print("\n".join(failed[-3:]))
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _everything_held(machines: list[Machine]) -> set[str]:
    """The digest of every regular file in every folder, conflict copy and archive."""
    found: set[str] = set()
    for machine in machines:
        if not machine.shared.exists():
            continue
        for path in machine.shared.rglob("*"):
            if path.is_file() and not path.is_symlink():
                found.add(_digest(path.read_bytes()))
    return found


@pytest.mark.timeout(900)
def test_the_readme_flows_as_written(machines: list[Machine]) -> None:
    a, b, c = machines
    written: dict[str, bytes] = {}
    overwritten: defaultdict[str, set[str]] = defaultdict(set)

    def save(machine: Machine, rel: str, data: bytes) -> None:
        """Save ``data`` as a user would. A content the users themselves overwrote on every
        machine that held it is theirs to lose; every other content must survive."""
        path = machine.shared / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            overwritten[_digest(path.read_bytes())].add(machine.name)
        path.write_bytes(data)
        written[f"{machine.name}:{rel}:{len(written)}"] = data

    # -- Two machines in a minute ------------------------------------------------------------
    created = a.ok("init", str(a.shared))
    key = created.stdout.strip().splitlines()[-1]
    assert (a.shared).is_dir()
    a.start()
    b.ok("init", str(b.shared), "--key", key)
    b.start()
    save(a, "hello.txt", b"saved on a\n")
    save(b, "docs/from-b.txt", b"saved on b\n")
    started = time.monotonic()
    wait_until(
        lambda: (b.shared / "hello.txt").exists() and (a.shared / "docs/from-b.txt").exists(),
        MINUTE,
        "each machine has the other's file",
    )
    assert time.monotonic() - started < MINUTE
    wait_until(lambda: a.status()["state"] == "in_sync", MINUTE, "a in sync")
    wait_until(lambda: b.status()["state"] == "in_sync", MINUTE, "b in sync")
    assert a.lanshare("status").returncode == 0
    assert b.status()["connected_peers"] == 1

    # -- Fetch once, with no daemon ----------------------------------------------------------
    big = os.urandom(6 * 1024 * 1024)
    save(a, "big.iso", big)
    wait_until(lambda: (b.shared / "big.iso").exists(), MINUTE, "b has big.iso")
    wait_until(lambda: b.status()["state"] == "in_sync", MINUTE, "b in sync with big.iso")
    c.ok("init", str(c.shared), "--key", key)
    assert c.lanshare("status").returncode == 3  # no daemon here
    pulled = c.ok("pull", str(c.shared / "big.iso"))
    assert "all present and verified" in pulled.stdout
    assert (c.shared / "big.iso").read_bytes() == big
    assert not (c.shared / "hello.txt").exists()  # only what was asked for
    (c.shared / "big.iso").unlink()  # to free space again
    listed = c.ls()
    assert listed["big.iso"]["state"] == "missing"
    assert listed["hello.txt"]["state"] == "missing"
    # Had the short-lived node announced a deletion, A and B would have applied it while it
    # ran; watch a few seconds more that nothing comes.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        for machine in (a, b):
            assert (machine.shared / "big.iso").read_bytes() == big
        time.sleep(0.5)
    for machine in (a, b):
        assert machine.ls()["big.iso"]["state"] == "in_sync"
    assert not list((a.shared / ".lanshare" / "versions").rglob("big*"))

    # -- Conflict -----------------------------------------------------------------------------
    assert b.stop() == 0
    save(b, "hello.txt", b"edited on b while apart\n")
    os.utime(b.shared / "hello.txt", ns=(1_900_000_000 * 10**9,) * 2)
    save(a, "hello.txt", b"edited on a while apart\n")
    os.utime(a.shared / "hello.txt", ns=(2_000_000_000 * 10**9,) * 2)
    b.start()

    def copies(machine: Machine) -> list[str]:
        return sorted(p.name for p in machine.shared.iterdir() if ".sync-conflict-" in p.name)

    wait_until(lambda: copies(a) and copies(b), MINUTE, "the conflict copy on both")
    copy = copies(a)[0]
    assert (a.shared / "hello.txt").read_bytes() == b"edited on a while apart\n"
    assert (b.shared / copy).read_bytes() == b"edited on b while apart\n"
    for machine in (a, b):
        wait_until(lambda m=machine: m.status()["conflicts"] == 1, MINUTE, "counted")
        assert machine.status()["conflict_paths"] == [copy]
        states = machine.ls()
        assert states["hello.txt"]["state"] == "conflict"
        assert states[copy]["state"] == "conflict"

    # -- Mass delete and resume ---------------------------------------------------------------
    for i in range(150):
        save(a, f"many/f{i:03}.txt", f"file {i}\n".encode())
    wait_until(
        lambda: len(list((b.shared / "many").glob("*.txt"))) == 150, MINUTE, "b has 150 files"
    )
    wait_until(lambda: b.status()["state"] == "in_sync", MINUTE, "b in sync with many/")
    for i in range(120):
        (a.shared / f"many/f{i:03}.txt").unlink()
    wait_until(lambda: a.status()["state"] == "paused", MINUTE, "a pauses its own deletion")
    assert a.lanshare("status").returncode == 4
    assert "lanshare resume" in a.status()["reason"]
    assert len(list((b.shared / "many").glob("*.txt"))) == 150  # nothing deleted on b
    a.ok("resume", str(a.shared))
    wait_until(lambda: b.status()["state"] == "paused", MINUTE, "b pauses a's mass deletion")
    assert b.lanshare("status").returncode == 4
    a_id = json.loads(a.ok_or_4("status", "--json"))["node"]["id"]
    reason = b.status()["reason"]
    assert a_id in reason or "peer a" in reason, reason
    assert len(list((b.shared / "many").glob("*.txt"))) == 150
    b.ok("resume", str(b.shared))
    wait_until(lambda: len(list((b.shared / "many").glob("*.txt"))) == 30, MINUTE, "b applies it")
    wait_until(lambda: b.status()["state"] == "in_sync", MINUTE, "b in sync after resume")
    assert len(list((b.shared / ".lanshare" / "versions" / "many").glob("*.txt"))) == 120

    # -- Nothing lost anywhere ----------------------------------------------------------------
    held = _everything_held(machines)
    gone = [name for name, data in written.items() if _digest(data) not in held]
    # Only the first hello.txt is gone: both users saved over it themselves.
    assert gone == ["a:hello.txt:0"], f"contents lost: {gone}"
    assert overwritten[_digest(written["a:hello.txt:0"])] == {"a", "b"}
    for machine in (a, b):
        assert machine.stop() == 0
