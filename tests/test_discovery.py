"""Discovery with real zeroconf: on 127.0.0.1 in one process, and over real multicast between
network namespaces (the lab). Time bounds are generous: they catch hangs, not slowness."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import signal
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from lanshare.config import Config, FolderConfig, NetworkConfig, NodeConfig
from lanshare.discovery import (
    INTERFACE_POLL_INTERVAL,
    SERVICE_TYPE,
    Discovery,
    _unusable_ipv6,
    browse_once,
    choose_interfaces,
    main,
    socket_addresses,
    zeroconf_version,
)
from lanshare.identity import NodeId
from lanshare.keys import announce_binding, announce_token, format_key, generate_key
from lanshare.peertable import (
    PROTOCOL_VERSION,
    DownReason,
    LivenessPolicy,
    PeerChanged,
    PeerDown,
    PeerEvent,
    PeerInfo,
    PeerState,
    PeerUp,
    SharedFolder,
)
from tests.e2e.harness import wait_until
from tests.lab import make_lab

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.lab import Lab, Process

__all__ = ["make_lab"]

LOOPBACK = NetworkConfig(interfaces=("127.0.0.1",))
LOCALHOST = ipaddress.IPv4Address("127.0.0.1")
FIND = 20.0
"""Seconds to wait for something that takes ~1-2 s: catches hangs, tolerates a busy machine."""


def _node(name: str, key: bytes, *, port: int = 40000, **kw: Any) -> Discovery:
    return Discovery(
        node_id=NodeId(secrets.token_bytes(8)),
        name=name,
        network=kw.pop("network", LOOPBACK),
        folders=[SharedFolder("shared", key)],
        port=port,
        **kw,
    )


@asynccontextmanager
async def _running(*nodes: Discovery) -> AsyncIterator[dict[Discovery, asyncio.Task[None]]]:
    """Run nodes in a TaskGroup; on exit cancel them (goodbyes) and wait."""
    async with asyncio.TaskGroup() as tg:
        tasks = {node: tg.create_task(node.run()) for node in nodes}
        try:
            yield tasks
        finally:
            for task in tasks.values():
                task.cancel()


async def _next(
    node: Discovery, predicate: Callable[[PeerEvent], bool], within: float = FIND
) -> PeerEvent:
    """The next event of ``node`` matching ``predicate`` (others are skipped)."""
    async with asyncio.timeout(within):
        while True:
            event = await node.events.get()
            if predicate(event):
                return event


async def _until(condition: Callable[[], bool], within: float = FIND) -> None:
    """Poll ``condition`` every 0.1 s; fail after ``within`` seconds."""
    for _ in range(int(within * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met within {within} s")


def _listed_but_incompatible(node: Discovery) -> list[PeerInfo]:
    """``node``'s table without the nodes of other versions, which other programs on this
    machine's loopback may be running meanwhile."""
    return [p for p in node.peers() if p.state is not PeerState.INCOMPATIBLE]


def _up_of(node: Discovery) -> Callable[[PeerEvent], bool]:
    return lambda e: isinstance(e, PeerUp) and e.peer.node_id == node.node_id


# --- loopback, one process -------------------------------------------------------------------


@pytest.mark.mdns
def test_two_nodes_on_loopback_find_each_other_and_see_a_goodbye() -> None:
    key = generate_key()
    a, b = _node("alpha", key, port=40001), _node("beta", key, port=40002)

    async def scenario() -> None:
        async with _running(a, b) as tasks:
            up = await _next(a, _up_of(b))
            assert up.peer.name == "beta"
            assert up.peer.addresses == (("127.0.0.1", 40002),)
            assert up.peer.folders == ("shared",)
            assert up.peer.state is PeerState.UP
            await _next(b, _up_of(a))
            await asyncio.wait_for(b.ready.wait(), FIND)
            assert b.instance == f"beta.{SERVICE_TYPE}"
            tasks[b].cancel()
            down = await _next(a, lambda e: isinstance(e, PeerDown))
            assert isinstance(down, PeerDown)
            assert down.peer.node_id == b.node_id
            assert down.reason is DownReason.GOODBYE
            assert a.table_stats.own >= 1  # a saw itself and ignored it

    asyncio.run(scenario())


@pytest.mark.mdns
def test_a_sequence_change_reaches_the_other_table_coalesced() -> None:
    key = generate_key()
    a, b = _node("alpha", key), _node("beta", key)

    async def scenario() -> None:
        async with _running(a, b):
            await _next(a, _up_of(b))
            await asyncio.wait_for(b.ready.wait(), FIND)
            for seq in range(1, 6):  # a burst: only the latest value needs to travel
                b.set_sequence(seq)
            changed = await _next(a, lambda e: isinstance(e, PeerChanged) and e.peer.sequence == 5)
            assert changed.peer.node_id == b.node_id
            assert b.stats.txt_updates == 1
            assert [p.sequence for p in _listed_but_incompatible(a)] == [5]

    asyncio.run(scenario())


@pytest.mark.mdns
def test_nodes_without_a_shared_folder_ignore_each_other() -> None:
    a, b = _node("alpha", generate_key()), _node("beta", generate_key())

    async def scenario() -> None:
        async with _running(a, b):
            await asyncio.wait_for(a.ready.wait(), FIND)
            await asyncio.wait_for(b.ready.wait(), FIND)
            await _until(lambda: a.table_stats.unshared > 0)
            assert _listed_but_incompatible(a) == []
            assert a.events.empty()

    asyncio.run(scenario())


@pytest.mark.mdns
def test_a_quiet_live_peer_is_probed_and_stays_up() -> None:
    key = generate_key()
    fast = LivenessPolicy(probe_interval=1.0, silence_timeout=3.0, lost_probe_interval=5.0)
    a, b = _node("alpha", key, policy=fast), _node("beta", key)

    async def scenario() -> None:
        async with _running(a, b):
            await _next(a, _up_of(b))
            # Several silence timeouts pass: b never speaks unasked, yet answers every probe.
            loop = asyncio.get_running_loop()
            until = loop.time() + 4 * fast.silence_timeout
            while loop.time() < until:
                try:
                    event = await asyncio.wait_for(a.events.get(), until - loop.time())
                except TimeoutError:
                    break
                assert not isinstance(event, PeerDown), event
            assert a.stats.probes >= 3
            assert [p.state for p in _listed_but_incompatible(a)] == [PeerState.UP]

    asyncio.run(scenario())


@pytest.mark.mdns
def test_a_recorded_announcement_replayed_elsewhere_is_ignored() -> None:
    """Someone without the key records b's announcement and, once b has left, announces it
    again: under another name, port, address or node id nothing comes of it; as it was, where
    it was, it still reads as b."""
    key = generate_key()
    a, b = _node("alpha", key, port=40011), _node("beta", key, port=40012)

    async def scenario() -> None:
        attacker = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        try:
            async with _running(a, b) as tasks:
                await _next(a, _up_of(b))
                await asyncio.wait_for(b.ready.wait(), FIND)
                assert b.instance is not None
                recorded = AsyncServiceInfo(SERVICE_TYPE, b.instance)
                assert await recorded.async_request(attacker.zeroconf, 3000)
                txt = recorded.text
                assert txt is not None
                tasks[b].cancel()
                await _next(a, lambda e: isinstance(e, PeerDown))

                other_id = secrets.token_bytes(8)
                replays = {
                    "another instance name": ("replayer", txt, 40012, "127.0.0.1"),
                    "another port": ("beta", txt, 40013, "127.0.0.1"),
                    "another address": ("beta", txt, 40012, "127.0.0.66"),
                    "another node id": (
                        "beta",
                        txt.replace(b.node_id.hex().encode(), other_id.hex().encode()),
                        40012,
                        "127.0.0.1",
                    ),
                }
                stats = a.table_stats
                for what, (name, record, port, address) in replays.items():
                    ignored = stats.unshared + stats.uncovered
                    info = AsyncServiceInfo(
                        SERVICE_TYPE,
                        f"{name}.{SERVICE_TYPE}",
                        port=port,
                        properties=record,
                        server=f"replayer-{secrets.token_hex(4)}.local.",
                        parsed_addresses=[address],
                    )
                    # No probing: b's goodbye may still sit in the replayer's cache for 1 s.
                    await (await attacker.async_register_service(info, cooperating_responders=True))
                    # a resolved it (and counted it ignored): discovery happened.
                    await _until(lambda n=ignored: stats.unshared + stats.uncovered > n)
                    assert _listed_but_incompatible(a) == [], what
                    assert a.events.empty(), what
                    # Its goodbye reaches a before the next replay does.
                    await (await attacker.async_unregister_service(info))
                assert stats.uncovered == 1  # the one under b's name, port and id

                # The recording, announced where b announced it, is b's announcement.
                genuine = AsyncServiceInfo(
                    SERVICE_TYPE,
                    b.instance,
                    port=40012,
                    properties=txt,
                    server=f"ls-{b.node_id.hex()}.local.",
                    parsed_addresses=["127.0.0.1"],
                )
                await attacker.async_register_service(genuine, cooperating_responders=True)
                up = await _next(a, _up_of(b))
                assert up.peer.addresses == (("127.0.0.1", 40012),)
        finally:
            await attacker.async_close()

    asyncio.run(scenario())


def _hostile_records(own: NodeId, key: bytes) -> dict[str, bytes | dict[str, str]]:
    nonce = secrets.token_bytes(8)
    token = announce_token(key, nonce).hex()  # well-formed; what it is bound to does not matter
    good = {
        "v": str(PROTOCOL_VERSION),
        "id": secrets.token_hex(8),
        "n": nonce.hex(),
        "t": token,
        "seq": "1",
        "a": "7f000001",
    }
    return {
        "bad-version": {**good, "v": "x"},
        "no-version": {k: v for k, v in good.items() if k != "v"},
        "other-version-bad-id": {**good, "v": "1", "id": "zz" * 8},
        "bad-id": {**good, "id": "zz" * 8},
        "short-nonce": {**good, "n": "00"},
        "bad-tokens": {**good, "t": token[:-1]},
        "huge-seq": {**good, "seq": "9" * 40},
        "negative-seq": {**good, "seq": "-1"},
        "oversized": {**good, "pad": "x" * 240, "pad2": "y" * 240},
        "no-fields": b"\x00",
        "binary": bytes([5]) + b"\xff\xfe=\x00\x01" + bytes([200]) + b"a" * 50,
        "impostor-of-us": {**good, "id": own.hex()},
    }


@pytest.mark.mdns
def test_hostile_announcements_are_rejected_without_harm(caplog: pytest.LogCaptureFixture) -> None:
    key = generate_key()
    a, b = _node("alpha", key), _node("beta", key)
    hostile = _hostile_records(a.node_id, key)
    # Well-formed but of another protocol version, newer or older (one sharing our folder):
    # listed as incompatible, with the version it speaks, never an event.
    future = secrets.token_hex(8)
    hostile["future"] = {"v": str(PROTOCOL_VERSION + 1), "id": future, "caps": "x" * 100}
    older = secrets.token_hex(8)
    nonce = secrets.token_bytes(8)
    port = 41000 + len(hostile)  # its place in the registrations below
    bound = announce_binding(
        nonce, bytes.fromhex(older), f"evil-older.{SERVICE_TYPE}", port, [LOCALHOST]
    )
    hostile["older"] = {
        "v": "1",
        "id": older,
        "n": nonce.hex(),
        "t": announce_token(key, bound).hex(),
        "seq": "3",
        "a": "7f000001",
    }

    def only_b_up(event: PeerEvent) -> bool:
        assert event.peer.node_id == b.node_id, event
        return isinstance(event, PeerUp)

    async def scenario() -> None:
        attacker = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        try:
            async with _running(a):
                await asyncio.wait_for(a.ready.wait(), FIND)
                for i, (label, props) in enumerate(hostile.items()):
                    info = AsyncServiceInfo(
                        SERVICE_TYPE,
                        f"evil-{label}.{SERVICE_TYPE}",
                        port=41000 + i,
                        properties=props,
                        server=f"evil-{i}-{secrets.token_hex(4)}.local.",
                        parsed_addresses=["127.0.0.1"],
                    )
                    await attacker.async_register_service(info)
                # A good peer is still found after all that, and nothing hostile got in.
                async with _running(b):
                    await _next(a, only_b_up)
                stats = a.table_stats
                await _until(lambda: stats.rejected + stats.own >= len(hostile) - 2)

                def evil_listed() -> list[PeerInfo]:
                    return [
                        p
                        for p in a.peers()
                        if p.state is PeerState.INCOMPATIBLE and p.name.startswith("evil-")
                    ]

                await _until(lambda: len(evil_listed()) >= 2)
                assert stats.own >= 1
                assert [p.name for p in a.peers() if p.state is PeerState.UP] == []
                listed = evil_listed()
                assert [
                    (p.name, p.node_id.hex() if p.node_id else None, p.protocol) for p in listed
                ] == [("evil-future", future, PROTOCOL_VERSION + 1), ("evil-older", older, 1)]
                assert listed[0].addresses == (("127.0.0.1", 41000 + len(hostile) - 2),)
                assert listed[1].folders == ("shared",)
                # Every event was about b: none for the incompatible node nor the hostile ones.
                while not a.events.empty():
                    assert a.events.get_nowait().peer.node_id == b.node_id
                # The log names both versions (a and b each say it once).
                said = [r.getMessage() for r in caplog.records if older in r.getMessage()]
                both = f"speaks protocol version 1, this node {PROTOCOL_VERSION}"
                assert 1 <= len(said) <= 2
                assert all(both in line for line in said), said
        finally:
            await attacker.async_close()

    asyncio.run(scenario())


@pytest.mark.mdns
def test_browse_once_lists_present_peers_and_static_candidates(tmp_path: Path) -> None:
    key = generate_key()
    b = _node("beta", key, port=40002)
    config = Config(
        node=NodeConfig(name="me", state_dir=tmp_path / "state"),
        network=NetworkConfig(interfaces=("127.0.0.1",), static_peers=("192.0.2.7:4747",)),
        folders=(FolderConfig(path=tmp_path / "folder", key=format_key(key)),),
    )

    async def scenario() -> list[PeerInfo]:
        async with _running(b):
            await asyncio.wait_for(b.ready.wait(), FIND)
            return await browse_once(config, seconds=3.0)

    peers = asyncio.run(scenario())
    by_state = {p.state: p for p in peers}
    assert by_state[PeerState.UP].node_id == b.node_id
    assert by_state[PeerState.UP].folders == (str(tmp_path / "folder"),)
    static = by_state[PeerState.STATIC].to_json()
    assert static["addresses"] == ["192.0.2.7:4747"]
    assert static["id"] is None


def test_too_many_folders_fail_at_construction() -> None:
    from lanshare.errors import ConfigError

    with pytest.raises(ConfigError):
        Discovery(
            node_id=NodeId(bytes(8)),
            name="x",
            network=LOOPBACK,
            folders=[SharedFolder(str(i), bytes([i]) * 32) for i in range(13)],
            port=1,
        )


def test_bad_static_peers_fail_at_construction() -> None:
    from lanshare.errors import ConfigError

    with pytest.raises(ConfigError):
        _node("x", generate_key(), network=NetworkConfig(static_peers=("nohost",)))


def test_one_socket_address_per_interface() -> None:
    adapters = [
        ("lo", "127.0.0.1"),
        ("eth0", "10.0.0.9"),
        ("eth0", "10.0.0.2"),
        ("wlan0", "10.1.0.5"),
    ]
    chosen = ("10.0.0.2", "10.0.0.9", "10.1.0.5")
    assert socket_addresses(chosen, adapters) == ("10.0.0.2", "10.1.0.5")
    assert socket_addresses(chosen, adapters, ("10.0.0.9",)) == ("10.0.0.9", "10.1.0.5")
    assert socket_addresses(("10.0.0.9",), adapters, ("10.0.0.2",)) == ("10.0.0.9",)
    assert socket_addresses(("127.0.0.1",), []) == ("127.0.0.1",)


def test_interface_choice() -> None:
    adapters = [("lo", "127.0.0.1"), ("eth0", "10.0.0.2"), ("wlan0", "192.168.1.5")]
    assert choose_interfaces([], adapters) == ("10.0.0.2", "192.168.1.5")
    assert choose_interfaces(["wlan0"], adapters) == ("192.168.1.5",)
    assert choose_interfaces(["127.0.0.1"], adapters) == ("127.0.0.1",)
    assert choose_interfaces(["10.0.0.2", "eth0"], adapters) == ("10.0.0.2",)
    assert choose_interfaces(["gone0", "10.9.9.9"], adapters) == ("127.0.0.1",)
    assert choose_interfaces([], [("lo", "127.0.0.1")]) == ("127.0.0.1",)


def test_interface_choice_with_ipv6() -> None:
    adapters = [
        ("lo", "127.0.0.1"),
        ("lo", "::1"),
        ("eth0", "10.0.0.2"),
        ("eth0", "fe80::2"),
        ("eth0", "2001:db8::2"),
        ("wlan0", "fe80::5"),
    ]
    # IPv4, then global IPv6, then link-local: the order a= fills in.
    assert choose_interfaces([], adapters) == ("10.0.0.2", "2001:db8::2", "fe80::2", "fe80::5")
    assert choose_interfaces([], adapters, frozenset({4})) == ("10.0.0.2",)
    assert choose_interfaces([], adapters, frozenset({6})) == (
        "2001:db8::2",
        "fe80::2",
        "fe80::5",
    )
    assert choose_interfaces(["wlan0"], adapters) == ("fe80::5",)
    assert choose_interfaces(["2001:DB8::2"], adapters) == ("2001:db8::2",)
    assert choose_interfaces(["fe80::5%wlan0"], adapters) == ("fe80::5",)
    assert choose_interfaces(["eth0"], adapters, frozenset({6})) == ("2001:db8::2", "fe80::2")
    # Nothing of the family: loopback of that family.
    assert choose_interfaces(["gone0"], adapters, frozenset({6})) == ("::1",)


def test_one_socket_address_per_interface_and_family() -> None:
    adapters = [
        ("eth0", "10.0.0.2"),
        ("eth0", "2001:db8::2"),
        ("eth0", "fe80::2"),
        ("wlan0", "fe80::5"),
    ]
    chosen = ("10.0.0.2", "2001:db8::2", "fe80::2", "fe80::5")
    # IPv6 prefers the link-local address (it lasts as long as the interface) ...
    assert socket_addresses(chosen, adapters) == ("10.0.0.2", "fe80::2", "fe80::5")
    # ... unless another one is in use and still chosen.
    assert socket_addresses(chosen, adapters, ("2001:db8::2",)) == (
        "10.0.0.2",
        "2001:db8::2",
        "fe80::5",
    )
    assert zeroconf_version(("10.0.0.2",)) is IPVersion.V4Only
    assert zeroconf_version(("fe80::2",)) is IPVersion.V6Only
    assert zeroconf_version(("10.0.0.2", "fe80::2")) is IPVersion.All


def test_tentative_and_duplicate_ipv6_addresses_are_not_usable(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(
        # address, index, prefix length, scope, flags, name (as /proc/net/if_inet6 has them)
        "fe800000000000000000000000000002 02 40 20 80     eth0\n"
        "20010db8000000000000000000000002 02 40 00 40     eth0\n"
        "fe800000000000000000000000000005 03 40 20 08    wlan0\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n",
        encoding="ascii",
    )
    assert _unusable_ipv6(table) == {("eth0", "2001:db8::2"), ("wlan0", "fe80::5")}
    assert _unusable_ipv6(tmp_path / "absent") == set()


def test_the_entry_point_reports_a_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--state-dir", str(tmp_path), "--key", "not-a-key"]) == 2
    assert "key" in capsys.readouterr().err


# --- the lab: real multicast between network namespaces ---------------------------------------


def _start(lab: Lab, index: int, key: bytes, tmp_path: Path, *extra: str) -> Process:
    host = lab.hosts[index]
    return host.python(
        "-m",
        "lanshare.discovery",
        "--name",
        f"node{index}",
        "--state-dir",
        str(tmp_path / host.name),
        "--port",
        str(47000 + index),
        "--key",
        format_key(key),
        *extra,
        stderr_path=tmp_path / f"{host.name}.log",
    )


def _ipv4(addresses: list[str]) -> list[str]:
    return [a for a in addresses if not a.startswith("[")]


def _ready(proc: Process) -> str:
    return str(proc.expect_json(lambda o: o["event"] == "ready", timeout=FIND)["id"])


def _event(kind: str, peer_id: str, **fields: object) -> Callable[[dict[str, Any]], bool]:
    def match(obj: dict[str, Any]) -> bool:
        return (
            obj.get("event") == kind
            and obj["peer"]["id"] == peer_id
            and all(obj.get(k, obj["peer"].get(k)) == v for k, v in fields.items())
        )

    return match


def _dump_logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))


@pytest.mark.netns
@pytest.mark.mdns
@pytest.mark.slow
def test_three_namespaces_find_each_other_and_notice_goodbye_and_death(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = make_lab(3)
    key = generate_key()
    procs = [_start(lab, i, key, tmp_path) for i in range(3)]
    try:
        ids = [_ready(p) for p in procs]
        for i, proc in enumerate(procs):
            for j in range(3):
                if i != j:
                    up = proc.expect_json(_event("up", ids[j]), timeout=FIND)
                    assert up["peer"]["addresses"] == [f"{lab.hosts[j].address}:{47000 + j}"]
        # A TXT update travels.
        procs[0].send("seq 42")
        for proc in procs[1:]:
            proc.expect_json(_event("changed", ids[0], sequence=42), timeout=FIND)
        # A clean stop: goodbye, down at once.
        assert procs[2].stop(signal.SIGTERM) == 0
        for proc in procs[:2]:
            proc.expect_json(_event("down", ids[2], reason="goodbye"), timeout=10)
        # A crash: no goodbye; found silent within the documented bound (15 s + a tick).
        procs[1].stop(signal.SIGKILL)
        down = procs[0].expect_json(_event("down", ids[1]), timeout=60)
        assert down["reason"] == "silent"
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_dump_logs(tmp_path)}") from exc


@pytest.mark.netns
@pytest.mark.mdns
def test_same_name_on_two_hosts_is_renamed_not_crashed(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = make_lab(3)
    key = generate_key()
    procs = [_start(lab, i, key, tmp_path, "--name", "twin") for i in range(2)]
    watcher = _start(lab, 2, key, tmp_path, "--browse-only")
    try:
        ids = [_ready(p) for p in procs]
        # A name conflict costs extra probe rounds before the loser re-announces.
        names = {
            watcher.expect_json(_event("up", i), timeout=3 * FIND)["peer"]["name"] for i in ids
        }
        assert len(names) == 2
        assert "twin" in names
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_dump_logs(tmp_path)}") from exc


@pytest.mark.netns
def test_static_peers_work_with_multicast_blocked(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = make_lab(2, block_multicast=True)
    key = generate_key()
    target = f"{lab.hosts[1].address}:{47001}"
    a = _start(lab, 0, key, tmp_path, "--static-peer", target)
    b = _start(lab, 1, key, tmp_path)
    try:
        static = a.expect_json(lambda o: o.get("event") == "up", timeout=FIND)
        assert static["peer"]["state"] == "static"
        assert static["peer"]["addresses"] == [target]
        _ready(a)
        _ready(b)
        # Multicast really is blocked: after registration and a few browse queries, neither
        # node has found the other over mDNS.
        a.send("peers")
        snapshot = a.expect_json(lambda o: o.get("event") == "peers", timeout=FIND)
        assert [p["state"] for p in snapshot["peers"]] == ["static"]
        assert not [o for o in b.json_lines() if o.get("event") == "up"]
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_dump_logs(tmp_path)}") from exc


@pytest.mark.netns
@pytest.mark.mdns
@pytest.mark.slow
def test_a_new_address_is_announced_and_a_gone_one_retracted(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = make_lab(2)
    key = generate_key()
    procs = [_start(lab, i, key, tmp_path) for i in range(2)]
    try:
        ids = [_ready(p) for p in procs]
        procs[1].expect_json(_event("up", ids[0]), timeout=FIND)
        host = lab.hosts[0]
        old, new = f"{host.address}:47000", f"{lab.subnet}.201:47000"
        host.run("ip", "addr", "add", f"{lab.subnet}.201/24", "dev", "eth0")
        # The kernel says so at once (polled every 15 s where it cannot): re-announced then.
        changed = procs[1].expect_json(
            lambda o: o.get("event") == "changed" and new in o["peer"]["addresses"], timeout=60
        )
        assert old in changed["peer"]["addresses"]
        # The first address goes (its secondary stays: promote_secondaries): retracted.
        host.run("sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1")
        host.run("ip", "addr", "del", f"{host.address}/24", "dev", "eth0")
        procs[1].expect_json(
            lambda o: o.get("event") == "changed" and _ipv4(o["peer"]["addresses"]) == [new],
            timeout=60,
        )
        # The same for IPv6: the netlink monitor hears IPv6 address changes too (within
        # seconds; interfaces are polled only every 15 s, which this bound tells apart).
        global6 = f"{lab.subnet6}:201"
        shown = f"[{global6}]:47000"
        host.run("ip", "addr", "add", f"{global6}/64", "dev", "eth0", "nodad")
        procs[1].expect_json(
            lambda o: o.get("event") == "changed" and shown in o["peer"]["addresses"],
            timeout=INTERFACE_POLL_INTERVAL * 2 / 3,
        )
        mark = len(procs[1].json_lines())  # expect_json would match earlier lines too
        host.run("ip", "addr", "del", f"{global6}/64", "dev", "eth0")

        def retracted() -> dict[str, Any] | None:
            later = procs[1].json_lines()[mark:]
            return next(
                (
                    o
                    for o in later
                    if o.get("event") == "changed" and shown not in o["peer"]["addresses"]
                ),
                None,
            )

        gone = wait_until(retracted, 60, "the IPv6 address retracted")
        # Its link-local address stays, scoped by the interface it was heard on.
        link_local = f"[{host.link_local()}%eth0]:47000"
        assert gone["peer"]["addresses"] == [new, link_local]
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_dump_logs(tmp_path)}") from exc
