"""The pure parts of ``lanshare doctor``: each parser on real-shaped input (copied from the
kernel's files and ``nft -j`` output), each verdict's status and fix."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from lanshare import doctor, keys
from lanshare.doctor import (
    Answer,
    Census,
    Handshake,
    Interface,
    Packet,
    PathProbe,
    Probe,
    Result,
    Route,
)
from lanshare.identity import NodeId
from lanshare.peertable import PROTOCOL_VERSION, Announcement, SharedFolder, binding, encode_txt

DATA = Path(__file__).parent / "data"

PROC_ROUTE = (
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
    "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
    "eth1\t000000E0\t00000000\t0001\t0\t0\t0\t000000F0\t0\t0\t0\n"
    "eth2\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0\n"
)

PROC_IGMP = (
    "Idx\tDevice    : Count Querier\tGroup    Users Timer\tReporter\n"
    "1\tlo        :     1      V3\n"
    "\t\t\t\t010000E0     1 0:00000000\t\t0\n"
    "4\teth0      :     2      V3\n"
    "\t\t\t\tFB0000E0     1 0:00000000\t\t0\n"
    "\t\t\t\t010000E0     1 0:00000000\t\t0\n"
)

PROC_LIMITS = (
    "Limit                     Soft Limit           Hard Limit           Units     \n"
    "Max cpu time              unlimited            unlimited            seconds   \n"
    "Max processes             96555                96555                processes \n"
    "Max open files            512                  4096                 files     \n"
)


# --- parsers ------------------------------------------------------------------------------


def test_proc_route_is_read_with_its_little_endian_hex() -> None:
    routes = doctor.parse_proc_route(PROC_ROUTE)
    assert routes == [
        Route("eth0", ipaddress.IPv4Network("0.0.0.0/0")),
        Route("eth0", ipaddress.IPv4Network("192.168.2.0/24")),
        Route("eth1", ipaddress.IPv4Network("224.0.0.0/4")),
    ]  # eth2's route is not up (no RTF_UP): left out


def test_proc_igmp_lists_groups_per_interface() -> None:
    assert doctor.parse_proc_igmp(PROC_IGMP) == {
        "lo": {"224.0.0.1"},
        "eth0": {"224.0.0.251", "224.0.0.1"},
    }


def test_proc_limits_gives_the_open_files_limits() -> None:
    assert doctor.parse_proc_limits(PROC_LIMITS) == (512, 4096)
    unlimited = PROC_LIMITS.replace("512                  4096", "unlimited  unlimited")
    assert doctor.parse_proc_limits(unlimited) == (None, None)
    with pytest.raises(ValueError, match="Max open files"):
        doctor.parse_proc_limits("Limit Soft Hard\n")


# --- firewall -----------------------------------------------------------------------------


def ruleset() -> dict[str, object]:
    """Real ``nft -j list ruleset`` output: an input chain with ``udp dport 5353 drop``,
    ``ip daddr 224.0.0.251 udp dport 5353 drop``, ``iifname "eth0" drop`` and ``tcp dport 22
    drop``; an output chain with policy drop, ``udp dport { 5353, 47474 } accept`` and a
    reject of UDP 5353."""
    data: dict[str, object] = json.loads((DATA / "nft-ruleset.json").read_text())
    return data


def only_rules(handles: set[int], policy: str = "accept") -> dict[str, object]:
    items = []
    for item in ruleset()["nftables"]:  # type: ignore[attr-defined]
        if "rule" in item and item["rule"]["handle"] not in handles:
            continue
        if "chain" in item:
            item["chain"]["policy"] = policy
        items.append(item)
    return {"nftables": items}


MDNS_IN = Packet("mDNS in", "input", 5353, "224.0.0.251", ("eth0",))
MDNS_OUT = Packet("mDNS out", "output", 5353, "224.0.0.251", ("eth0",))
PORT_IN = Packet("lanshare in", "input", 47474, None, ("eth0",))


def test_a_udp_5353_drop_surely_drops_mdns_in() -> None:
    (block,) = doctor.nft_blocks(only_rules({3}), [MDNS_IN, MDNS_OUT, PORT_IN])
    assert block == doctor.Block("mDNS in", "table inet t chain input, rule handle 3 (drop)", True)


def test_a_drop_of_the_group_address_and_port_drops_mdns_not_the_lanshare_port() -> None:
    blocks = doctor.nft_blocks(only_rules({4}), [MDNS_IN, PORT_IN])
    assert [(b.packet, b.certain) for b in blocks] == [("mDNS in", True)]


def test_an_interface_drop_drops_everything_arriving_there() -> None:
    blocks = doctor.nft_blocks(only_rules({5}), [MDNS_IN, PORT_IN])
    assert [(b.packet, b.certain) for b in blocks] == [("mDNS in", True), ("lanshare in", True)]
    other = Packet("mDNS in", "input", 5353, "224.0.0.251", ("wlan0",))
    assert doctor.nft_blocks(only_rules({5}), [other]) == []


def test_ipv6_rules_drop_the_ipv6_packets_and_ipv4_rules_the_ipv4_ones() -> None:
    """Real ``nft -j`` output: ``ip6 daddr ff02::fb udp dport 5353 drop`` in an inet table,
    ``udp dport 47474 drop`` in an ip6 table. With both IP versions in use, each drops the
    IPv6 packet it names and no IPv4 one; an IPv4 rule drops no IPv6 packet."""
    data = json.loads((DATA / "nft-ruleset-ipv6.json").read_text())
    packets = doctor.lanshare_packets(47474, ["eth0"], frozenset({4, 6}))
    assert [(p.what, p.daddr) for p in packets if p.hook == "input"] == [
        ("mDNS in (UDP 5353)", "224.0.0.251"),
        ("lanshare UDP 47474 in", None),
        ("IPv6 mDNS in (UDP 5353)", "ff02::fb"),
        ("lanshare IPv6 UDP 47474 in", None),
    ]
    blocks = doctor.nft_blocks(data, packets)
    assert [(b.packet, b.where, b.certain) for b in blocks] == [
        ("IPv6 mDNS in (UDP 5353)", "table inet v6fw chain input, rule handle 2 (drop)", True),
        ("lanshare IPv6 UDP 47474 in", "table ip6 only6 chain input, rule handle 2 (drop)", True),
    ]
    verdict = doctor.firewall_verdict(blocks, None, None, 47474)
    assert verdict.status == "fail"
    assert verdict.fix is not None
    assert "nft insert rule inet v6fw input" in verdict.fix
    # ip daddr 224.0.0.251 udp dport 5353 drop: the IPv4 group only.
    ipv6_only = doctor.lanshare_packets(47474, ["eth0"], frozenset({6}))
    assert doctor.nft_blocks(only_rules({4}), ipv6_only) == []


def test_a_tcp_rule_does_not_touch_udp() -> None:
    assert doctor.nft_blocks(only_rules({6}), [MDNS_IN, PORT_IN]) == []


def test_policy_drop_is_a_drop_unless_an_earlier_rule_accepts() -> None:
    # Output: policy drop, rule 8 accepts 5353 and 47474, rule 9 rejects 5353 (never reached).
    assert doctor.nft_blocks(only_rules({8, 9}, policy="drop"), [MDNS_OUT]) == []
    (block,) = doctor.nft_blocks(only_rules({9}, policy="drop"), [MDNS_OUT])
    assert block.where.endswith("rule handle 9 (reject)")
    (block,) = doctor.nft_blocks(only_rules(set(), policy="drop"), [MDNS_OUT])
    assert block.where == "table inet t chain output: policy drop"
    assert block.certain


def test_a_match_not_understood_makes_a_drop_only_possible() -> None:
    rule = {
        "rule": {
            "family": "inet",
            "table": "t",
            "chain": "input",
            "handle": 7,
            "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
                {"drop": None},
            ],
        }
    }
    data = only_rules(set())
    data["nftables"].append(rule)  # type: ignore[attr-defined]
    (block,) = doctor.nft_blocks(data, [MDNS_IN])
    assert not block.certain
    verdict = doctor.firewall_verdict([block], None, None, 47474)
    assert verdict.status == "warn"
    assert "may be dropped" in verdict.detail


def test_the_whole_real_ruleset() -> None:
    blocks = doctor.nft_blocks(ruleset(), doctor.lanshare_packets(47474, ["eth0"]))
    assert [(b.packet, b.where, b.certain) for b in blocks] == [
        ("mDNS in (UDP 5353)", "table inet t chain input, rule handle 3 (drop)", True),
        ("lanshare UDP 47474 in", "table inet t chain input, rule handle 5 (drop)", True),
    ]
    verdict = doctor.firewall_verdict(blocks, None, None, 47474)
    assert verdict.status == "fail"
    assert verdict.fix == (
        "allow it before that rule, e.g. nft insert rule inet t input "
        "udp dport { 5353, 47474 } accept"
    )


def test_an_unreadable_ruleset_is_a_warning_quoting_the_active_probe() -> None:
    probe = Probe(daemon_running=True, own=True, others=2)
    verdict = doctor.firewall_verdict(None, "nft: Operation not permitted", probe, 47474)
    assert verdict.status == "warn"
    assert verdict.detail == (
        "cannot read the firewall rules (nft: Operation not permitted); the mDNS query: "
        "this node's responder answered, 2 other node(s) answered"
    )
    assert verdict.fix == "run sudo lanshare doctor to read them"
    assert doctor.firewall_verdict([], None, probe, 47474).status == "ok"


# --- discovery and keys -------------------------------------------------------------------

KEY = keys.generate_key()
OTHER_KEY = keys.generate_key()
FOLDERS = [SharedFolder("/home/u/share", KEY)]


def answer(name: str, node: bytes, key: bytes | None, version: int = PROTOCOL_VERSION) -> Answer:
    service = f"{name}._lanshare._udp.local."
    ann = Announcement(
        NodeId(node),
        keys.generate_announce_nonce(),
        (),
        7,
        (ipaddress.IPv4Address("10.0.0.2"),),
        version,
    )
    tokens = () if key is None else (keys.announce_token(key, binding(ann, service, 47474)),)
    return Answer(service, encode_txt(replace(ann, tokens=tokens)), ("10.0.0.2",), 47474)


def test_census_sorts_answers_by_node_with_the_daemons_own_token_check() -> None:
    own = b"\x01" * 8
    answers = [
        answer("me", own, KEY),
        answer("friend", b"\x02" * 8, KEY),
        answer("friend-2", b"\x02" * 8, KEY),  # the same node under a second name
        answer("stranger", b"\x03" * 8, OTHER_KEY),
        answer("old", b"\x04" * 8, KEY, version=1),
        Answer("junk._lanshare._udp.local.", b"\x03v=x", (), 1),
    ]
    found = doctor.census(own.hex(), FOLDERS, answers)
    assert found.own
    assert found.sharing == {"02" * 8: "friend-2"}
    assert found.unshared == {"03" * 8: "stranger"}
    assert found.incompatible == {"04" * 8: ("old", 1)}
    assert found.unreadable == 1


def test_nodes_sharing_nothing_fail_the_keys_check() -> None:
    found = Census(unshared={"03" * 8: "stranger", "05" * 8: "other"})
    verdict = doctor.keys_verdict(found, [])
    assert verdict == Result(
        "keys",
        "fail",
        "2 machine(s) run lanshare but share none of your folders (other, stranger)",
        "check that the key matches (lanshare key) on each machine",
    )
    assert doctor.keys_verdict(Census(sharing={"02" * 8: "b"}), []).status == "ok"
    assert doctor.keys_verdict(Census(), []).status == "ok"


def test_discovery_verdicts() -> None:
    alone = doctor.discovery_verdict(Census(own=True), None, True, [], 3.0)
    assert alone.status == "warn"
    assert "static_peers" in (alone.fix or "")
    deaf = doctor.discovery_verdict(Census(sharing={"02" * 8: "b"}), None, True, [], 3.0)
    assert deaf.status == "fail"
    assert "own announcement was not heard" in deaf.detail
    good = doctor.discovery_verdict(Census(own=True, sharing={"02" * 8: "b"}), None, True, [], 3)
    assert (good.status, good.detail) == (
        "ok",
        "1 lanshare node(s) answered within 3 s, 1 share a folder (b)",
    )
    old = doctor.discovery_verdict(Census(incompatible={"04" * 8: ("old", 1)}), None, False, [], 3)
    assert old.status == "warn"
    assert "1 incompatible (old v1)" in old.detail
    broken = doctor.discovery_verdict(None, "[Errno 98] Address in use", False, [], 3)
    assert broken.status == "fail"


def test_static_peers_answer_the_handshake_or_the_check_fails() -> None:
    silent = [Handshake("10.0.0.9:47474", False, "no answer within 5 s")]
    verdict = doctor.discovery_verdict(Census(), None, False, silent, 3.0)
    assert verdict.status == "fail"
    assert "no static peer answers the handshake (10.0.0.9:47474: no answer" in verdict.detail
    assert doctor.keys_verdict(Census(), silent).status == "warn"
    answering = [*silent, Handshake("10.0.0.8:47474", True, "answers the handshake")]
    assert doctor.discovery_verdict(Census(), None, False, answering, 3.0).status == "warn"
    assert doctor.discovery_verdict(Census(), None, False, answering[1:], 3.0).status == "ok"


# --- the other verdicts -------------------------------------------------------------------


def test_config_verdicts() -> None:
    source = Path("/home/u/.config/lanshare/config.toml")
    bad = doctor.config_verdict(source, "x holds folder keys ... chmod 600 x", 0o644, [], None)
    assert (bad.status, bad.fix) == ("fail", f"chmod 600 {source}")
    syntax = doctor.config_verdict(source, f"{source}:3: expected '='", None, [], None)
    assert syntax.fix == f"edit {source} (config.example.toml describes every key)"
    assert doctor.config_verdict(None, None, None, [], None).status == "fail"
    service = doctor.config_verdict(None, None, None, [], None, daemon_answers=True)
    assert service.status == "ok"  # a member of the service's group needs no config
    assert doctor.config_verdict(source, None, 0o600, [], None).status == "fail"
    stuck = PathProbe(Path("/s"), "the folder /s is not writable", "chmod u+rwx /s")
    assert doctor.config_verdict(source, None, 0o600, [stuck], None).fix == "chmod u+rwx /s"
    fine = doctor.config_verdict(source, None, 0o600, [PathProbe(Path("/s"))], PathProbe(source))
    assert fine.status == "ok"
    assert "(mode 0600): 1 folder(s)" in fine.detail


def test_probe_writable_tries_for_real_and_leaves_nothing(tmp_path: Path) -> None:
    assert doctor.probe_writable(tmp_path, "folder") == PathProbe(tmp_path)
    assert os.listdir(tmp_path) == []
    missing = doctor.probe_writable(tmp_path / "nope", "folder")
    assert missing.problem == f"the folder {tmp_path / 'nope'} does not exist"
    assert missing.fix == f"lanshare init {tmp_path / 'nope'}"
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in (
        doctor.probe_writable(tmp_path / "file", "folder").problem or ""
    )


def test_daemon_verdicts() -> None:
    down = doctor.daemon_verdict(None, "no lanshare daemon is running (...)", "1.0")
    assert down.status == "fail"
    assert (down.fix or "").startswith("start it: lanshare daemon")
    status = {"pid": 42, "node": {"id": "ab", "version": "1.0", "uptime": 3725.0, "port": 47474}}
    up = doctor.daemon_verdict(status, "", "1.0")
    assert up == Result(
        "daemon", "ok", "running (pid 42), version 1.0, up 1 h 2 min, UDP port 47474 bound"
    )
    assert doctor.daemon_verdict(status, "", "1.1").status == "warn"


def test_interfaces_verdicts() -> None:
    eth = Interface("eth0", ("10.0.0.1",), ("fe80::1",), flags=0x1003)
    lo = Interface("lo", ("127.0.0.1",), flags=0x9)
    ok = doctor.interfaces_verdict((), [lo, eth], ["10.0.0.1"])
    assert ok == Result(
        "interfaces", "ok", "mDNS on eth0 10.0.0.1; IPv4 only (1 IPv6 address(es) unused)"
    )
    nothing = doctor.interfaces_verdict((), [lo], ["127.0.0.1"])
    assert nothing.status == "fail"
    typo = doctor.interfaces_verdict(("eht0",), [lo, eth], ["127.0.0.1"])
    assert typo.status == "fail"
    assert "interfaces with one: eth0" in typo.detail
    local = doctor.interfaces_verdict(("127.0.0.1",), [lo, eth], ["127.0.0.1"])
    assert local.status == "warn"
    down = Interface("eth0", ("10.0.0.1",), flags=0x1002)
    assert (
        doctor.interfaces_verdict((), [down], ["10.0.0.1"]).fix
        == "bring it up: ip link set eth0 up"
    )
    deaf = Interface("eth0", ("10.0.0.1",), flags=0x3)
    assert doctor.interfaces_verdict((), [deaf], ["10.0.0.1"]).status == "fail"


def test_multicast_verdicts() -> None:
    routes = doctor.parse_proc_route(PROC_ROUTE)
    joined = doctor.parse_proc_igmp(PROC_IGMP)
    via_default = doctor.multicast_verdict(routes[:2], ["eth0"], joined)
    assert via_default.status == "ok"
    assert via_default.detail == ("224.0.0.251 routed via eth0 (0.0.0.0/0); group joined on eth0")
    elsewhere = doctor.multicast_verdict(routes, ["eth0"], None)
    assert elsewhere.status == "warn"  # 224.0.0.0/4 via eth1 is more specific
    none_answered = doctor.multicast_verdict([], ["eth0"], None, answered=False)
    assert none_answered.status == "fail"
    assert none_answered.fix == "ip route add 224.0.0.0/4 dev eth0 (or add a default route)"
    assert doctor.multicast_verdict([], ["eth0"], None, answered=True).status == "warn"
    not_joined = doctor.multicast_verdict(routes[:2], ["eth0"], {"eth0": {"224.0.0.1"}})
    assert not_joined.status == "warn"
    assert doctor.multicast_verdict([], [], None).status == "ok"


PROC_IGMP6 = """\
1    lo              ff020000000000000000000000000001     1 0000000C 0
2    eth0            ff0200000000000000000000000000fb     1 00000004 0
2    eth0            ff020000000000000000000000000001     1 0000000C 0
3    wlan0           ff020000000000000000000000000001     1 0000000C 0
"""


def test_proc_igmp6_lists_groups_per_interface() -> None:
    assert doctor.parse_proc_igmp6(PROC_IGMP6) == {
        "lo": {"ff02::1"},
        "eth0": {"ff02::fb", "ff02::1"},
        "wlan0": {"ff02::1"},
    }


def test_interfaces_verdict_shows_ipv6_as_peers_dial_it() -> None:
    eth = Interface("eth0", ("10.0.0.1",), ("2001:db8::1", "fe80::1"), flags=0x1003)
    lo = Interface("lo", ("127.0.0.1",), ("::1",), flags=0x9)
    both = doctor.interfaces_verdict(
        (), [lo, eth], ["10.0.0.1", "2001:db8::1", "fe80::1"], 47474, frozenset({4, 6})
    )
    assert both == Result(
        "interfaces",
        "ok",
        "mDNS on eth0 10.0.0.1:47474, eth0 [2001:db8::1]:47474, eth0 [fe80::1%eth0]:47474; "
        "IPv4 and IPv6",
    )
    only6 = doctor.interfaces_verdict((), [lo, eth], ["fe80::1"], 47474, frozenset({6}))
    assert only6.detail == "mDNS on eth0 [fe80::1%eth0]:47474; IPv6 only"
    v4_only = Interface("eth0", ("10.0.0.1",), flags=0x1003)
    none6 = doctor.interfaces_verdict((), [lo, v4_only], ["::1"], 47474, frozenset({6}))
    assert none6.status == "fail"
    assert none6.detail == "no network interface has an IPv6 address: mDNS stays on this machine"


def test_multicast_verdict_checks_the_ipv6_group() -> None:
    joined = doctor.parse_proc_igmp6(PROC_IGMP6)
    # IPv6 only: ff02::fb is link-local, no route is needed; the group must be joined.
    only6 = doctor.multicast_verdict([], ["eth0"], joined, families=frozenset({6}))
    assert only6 == Result(
        "multicast", "ok", "ff02::fb is link-local: no route needed; group joined on eth0"
    )
    missing = doctor.multicast_verdict([], ["wlan0"], joined, families=frozenset({6}))
    assert missing.status == "warn"
    assert "the group ff02::fb is not joined on wlan0" in missing.detail
    # Both: the IPv4 route and both groups.
    routes = doctor.parse_proc_route(PROC_ROUTE)[:2]
    groups = {"eth0": doctor.parse_proc_igmp(PROC_IGMP)["eth0"] | joined["eth0"]}
    both = doctor.multicast_verdict(routes, ["eth0"], groups, families=frozenset({4, 6}))
    assert both.detail == "224.0.0.251 routed via eth0 (0.0.0.0/0); groups joined on eth0"
    v4_joined = {"eth0": doctor.parse_proc_igmp(PROC_IGMP)["eth0"]}
    half = doctor.multicast_verdict(routes, ["eth0"], v4_joined, families=frozenset({4, 6}))
    assert half.status == "warn"
    assert "ff02::fb is not joined on eth0" in half.detail


def test_sync_verdicts() -> None:
    assert doctor.sync_verdict(None).status == "warn"
    folder = {"path": "/s", "state": "in_sync", "reason": "", "connected_peers": 1, "peers": [{}]}
    assert doctor.sync_verdict({"folders": [folder]}) == Result(
        "sync", "ok", "/s: in_sync, 1 peer(s) connected"
    )
    paused = dict(folder, state="paused", reason="marker missing")
    verdict = doctor.sync_verdict({"folders": [folder, paused]})
    assert verdict.status == "fail"
    assert "/s: paused, 1 peer(s) connected (marker missing)" in verdict.detail
    lonely = dict(folder, connected_peers=0, reason="no peer connected")
    assert doctor.sync_verdict({"folders": [lonely]}).status == "warn"


def test_inotify_disk_and_limits_verdicts() -> None:
    over = doctor.inotify_verdict(8192, {"/s": 10000})
    assert over.status == "fail"
    assert (over.fix or "").startswith("sudo sysctl fs.inotify.max_user_watches=524288")
    assert doctor.inotify_verdict(8192, {"/s": 5000}).status == "warn"
    assert doctor.inotify_verdict(8192, {"/s": 10}).status == "ok"
    assert doctor.inotify_verdict(None, {}).status == "warn"
    gib = 1024**3
    assert doctor.disk_verdict({"/s": (10 * gib, 100 * gib)}).status == "ok"
    assert doctor.disk_verdict({"/s": (2 * gib, 100 * gib)}).status == "warn"
    assert doctor.disk_verdict({"/s": (1024, 100 * gib)}).status == "fail"
    assert doctor.limits_verdict(512, 4096, "the daemon").status == "warn"
    assert doctor.limits_verdict(None, None, "the daemon").status == "ok"


def test_human_output_is_aligned_escaped_and_shows_fixes() -> None:
    results = [
        Result("config", "ok", "fine"),
        Result("keys", "fail", "1 machine(s) ... (evil\x1b[2J\nname)", "check the key"),
    ]
    lines = doctor.format_human(results)
    assert lines == [
        "ok    config      fine",
        "FAIL  keys        1 machine(s) ... (evil\\x1b[2J\\x0aname)",
        "                  fix: check the key",
    ]
    assert doctor.worst(results) == "fail"
    assert doctor.worst(results[:1]) == "ok"


def test_an_immutable_folder_is_not_writable_even_for_root(tmp_path: Path) -> None:
    """``chattr +i``: what root cannot bypass (file modes it can), so the probe sees it."""
    folder = tmp_path / "share"
    folder.mkdir()
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr.strip()}")
    try:
        probe = doctor.probe_writable(folder, "folder")
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert probe.problem is not None
    assert probe.problem.startswith(f"the folder {folder} is not writable (Operation not permitted")
    assert f"chattr -i {folder}" in (probe.fix or "")
    assert os.listdir(folder) == []
