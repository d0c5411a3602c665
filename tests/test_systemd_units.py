"""The shipped systemd units pass ``systemd-analyze verify`` as installed by the README."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))

pytestmark = [
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount the install paths"),
]


def test_units_exist() -> None:
    names = {unit.name for unit in UNITS}
    assert names == {"lanshare.service", "lanshare-user.service"}


def test_units_verify_clean(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; in a private mount namespace the README's install
    # locations (/opt/lanshare for the system unit, ~/.local/lanshare for the user unit) are
    # bound to a stand-in, so the real machine is left untouched.
    for prefix in ("opt/lanshare/bin", "local/lanshare/bin"):
        program = tmp_path / prefix / "lanshare"
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    home = Path.home()
    script = (
        "set -e; mount --make-rprivate /; "
        f"mkdir -p /opt {home}/.local; "
        f"mount --bind {tmp_path}/opt /opt; "
        f"mount --bind {tmp_path}/local {home}/.local; "
        "exec systemd-analyze verify " + " ".join(str(u) for u in UNITS)
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""


def test_system_unit_has_the_promised_settings() -> None:
    text = (UNITS[0].parent / "lanshare.service").read_text()
    for line in (
        "Type=notify",
        "User=lanshare",
        "ExecStart=/opt/lanshare/bin/lanshare daemon --config /etc/lanshare/config.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=lanshare",
        "RuntimeDirectory=lanshare",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/lanshare",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ):
        assert line in text.splitlines()
    assert any(line.startswith("WatchdogSec=") for line in text.splitlines())
