"""``lanshare doctor`` in a namespace lab: each check made to fail for real, and the right
status and fix reported.

Real daemons on a lab bridge; the breakages are real too: the multicast route deleted, an
nftables rule dropping UDP 5353, a third machine holding another key, the folder seen through a
read-only bind mount (in a private mount namespace: root ignores file modes, not a read-only
mount), the daemon stopped.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from lanshare.doctor import CHECKS
from tests.e2e.conftest import cluster
from tests.e2e.harness import new_key, wait_until
from tests.lab import ROOT

if TYPE_CHECKING:
    from tests.e2e.harness import Cluster, Node

__all__ = ["cluster"]

pytestmark = [pytest.mark.e2e, pytest.mark.mdns, pytest.mark.netns, pytest.mark.slow]

CONNECT_TIMEOUT = 60.0


def doctor(node: Node, *, human: bool = False) -> tuple[int, Any]:
    result = node.cli("doctor", *(() if human else ("--json",)), check=False)
    assert result.returncode in (0, 1), result.stderr
    if human:
        return result.returncode, result.stdout
    return result.returncode, json.loads(result.stdout)


def by_check(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    assert [r["check"] for r in results] == list(CHECKS)
    for r in results:
        assert set(r) == {"check", "status", "detail", "fix"}
        assert r["status"] in ("ok", "warn", "fail")
    return {r["check"]: r for r in results}


def _connected(node: Node, other: Node) -> bool:
    return any(p["state"] == "connected" and p["name"] == other.name for p in node.call("peers"))


def test_doctor_names_each_breakage_and_its_fix(cluster: Cluster) -> None:
    lab = cluster.lab(3)
    h1, _, h3 = lab.hosts
    a = cluster.node("a", h1)
    b = cluster.node("b", lab.hosts[1])
    a.start(wait=False)
    b.start(wait=False)
    a.wait_ready()
    b.wait_ready()
    wait_until(lambda: _connected(a, b), CONNECT_TIMEOUT, "a connected to b")
    # a joins ff02::fb on eth0 once the link-local address is through its duplicate address
    # detection, which may end after the session with b is up.
    wait_until(
        lambda: by_check(doctor(a)[1])["multicast"]["status"] == "ok",
        CONNECT_TIMEOUT,
        "a joined the mDNS groups",
    )

    # Healthy: nothing fails, exit 0.
    code, results = doctor(a)
    checks = by_check(results)
    assert code == 0, results
    for name in ("config", "daemon", "multicast", "firewall", "discovery", "keys"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "1 share a folder (b)" in checks["discovery"]["detail"]
    assert "eth0" in checks["interfaces"]["detail"]

    # The multicast route deleted: lanshare's own query still gets out (zeroconf names the
    # interface), so it is a warning while b answers, and a failure once nobody does.
    h1.run("ip", "route", "del", "224.0.0.0/4", "dev", "eth0")
    code, results = doctor(a)
    multicast = by_check(results)["multicast"]
    assert multicast["status"] == "warn", multicast
    assert multicast["fix"].startswith("ip route add 224.0.0.0/4 dev eth0")
    b.stop()
    code, results = doctor(a)
    multicast = by_check(results)["multicast"]
    assert (code, multicast["status"]) == (1, "fail"), results
    assert "no node answered" in multicast["detail"]
    h1.run("ip", "route", "add", "224.0.0.0/4", "dev", "eth0")
    b.start()

    # A firewall rule dropping mDNS on its way in.
    _nft(
        h1,
        "table inet doctor_fw {\n chain input { type filter hook input priority 0; "
        "policy accept; udp dport 5353 drop\n }\n}\n",
    )
    code, results = doctor(a)
    checks = by_check(results)
    assert code == 1
    assert checks["firewall"]["status"] == "fail", checks["firewall"]
    assert (
        "mDNS in (UDP 5353) dropped by table inet doctor_fw chain input"
        in (checks["firewall"]["detail"])
    )
    assert checks["firewall"]["fix"].startswith(
        "allow it before that rule, e.g. nft insert rule inet doctor_fw input udp dport { 5353, "
    )
    # Without root the rules are unreadable: a warning quoting what the active query saw.
    code, results = doctor_unprivileged(a)
    firewall = by_check(results)["firewall"]
    assert firewall["status"] == "warn", firewall
    assert "cannot read the firewall rules" in firewall["detail"]
    h1.run("nft", "delete", "table", "inet", "doctor_fw")

    # A third machine with another key.
    c = cluster.node("c", h3, key=new_key())
    c.start()

    def sees_c() -> dict[str, Any] | None:
        keys = by_check(doctor(a)[1])["keys"]
        return keys if keys["status"] == "fail" else None

    keys_result = wait_until(sees_c, CONNECT_TIMEOUT, "doctor on a sees c")
    assert keys_result["detail"].startswith(
        "1 machine(s) run lanshare but share none of your folders (c)"
    )
    assert "lanshare key" in keys_result["fix"]

    # The folder read-only (a read-only bind mount: root bypasses file modes, not that).
    code, results = doctor_read_only(a)
    config = by_check(results)["config"]
    assert (code, config["status"]) == (1, "fail"), config
    assert f"the folder {a.folder} is on a read-only file system" == config["detail"]
    assert config["fix"].startswith("remount it read-write")

    # The daemon stopped.
    a.stop()
    code, results = doctor(a)
    checks = by_check(results)
    assert code == 1
    assert checks["daemon"]["status"] == "fail"
    assert checks["daemon"]["fix"].startswith("start it: lanshare daemon")
    assert checks["sync"]["status"] == "warn"


def _nft(host: Any, text: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", host.netns, "nft", "-f", "-"],
        input=text,
        text=True,
        check=True,
        timeout=30,
    )


def _run(node: Node, argv: list[str]) -> tuple[int, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80")
    result = subprocess.run(
        node.command(*argv), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def doctor_unprivileged(node: Node) -> tuple[int, Any]:
    """With every capability dropped: what the kernel checks is the capability, not the uid
    (this interpreter lives under /root, where another user could not even start it)."""
    return _run(
        node,
        [
            "setpriv",
            "--bounding-set=-all",
            "--inh-caps=-all",
            sys.executable,
            "-m",
            "lanshare",
            "--config",
            str(node.config_path),
            "doctor",
            "--json",
        ],
    )


def doctor_read_only(node: Node) -> tuple[int, Any]:
    folder = shlex.quote(str(node.folder))
    script = (
        f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
        f"exec {shlex.quote(sys.executable)} -m lanshare --config "
        f"{shlex.quote(str(node.config_path))} doctor --json"
    )
    return _run(node, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])


def test_with_multicast_blocked_static_peers_are_tried_with_a_real_handshake(
    cluster: Cluster,
) -> None:
    lab = cluster.lab(3, block_multicast=True)
    a = cluster.node("a", lab.hosts[0])
    a.start()
    b = cluster.node("b", lab.hosts[1], static_peers=(a.endpoint,))
    stranger = cluster.node("s", lab.hosts[2], key=new_key(), static_peers=(a.endpoint,))

    # b holds a's key: a answers b's handshake (b's daemon need not run for that).
    _, results = doctor(b)
    discovery = by_check(results)["discovery"]
    assert discovery["status"] == "ok", discovery
    assert f"static peers: {a.endpoint}: answers the handshake (node " in discovery["detail"]

    # Another key: a cannot authenticate the handshake and stays silent.
    code, results = doctor(stranger)
    checks = by_check(results)
    assert code == 1
    assert checks["discovery"]["status"] == "fail", checks["discovery"]
    assert (
        f"no static peer answers the handshake ({a.endpoint}: no answer within"
        in (checks["discovery"]["detail"])
    )
    assert checks["keys"]["status"] == "warn"
    assert "lanshare key" in checks["keys"]["fix"]
