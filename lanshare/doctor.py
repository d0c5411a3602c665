"""``lanshare doctor``: why this machine does not sync, check by check, each with its fix.

Theory of operation
-------------------
Every check is a pure *verdict* function that turns what was observed into a ``Result``
(``check`` id, ``status`` ``ok``/``warn``/``fail``, ``detail``, ``fix``); the observations
come from thin gatherers that read the kernel's own files and tools as they are: ``/proc/net/route``
(the IPv4 routes), ``/proc/net/igmp`` and ``/proc/net/igmp6`` (multicast groups joined),
``/proc/PID/limits``,
``/proc/sys/fs/inotify/*``, ``nft -j list ruleset``, ``statvfs``, the daemon's ``status``
over its control socket, and the network itself. The parsers and verdicts are unit-tested on
real-shaped inputs; the gatherers are exercised by the namespace-lab tests.

The check ids and the JSON shape are a contract (README): ``config``, ``daemon``,
``interfaces``, ``multicast``, ``firewall``, ``discovery``, ``keys``, ``sync``, ``inotify``,
``disk``, ``limits``, always in that order, each exactly once.

The network checks are active and bounded:

* discovery: an mDNS browse for ``_lanshare._udp.local.`` on the interfaces the daemon uses
  (the same choice as ``lanshare.discovery``), for ``seconds``; every answer is resolved and
  read with ``peertable.read_txt``, and its folder tokens are matched with
  ``peertable.shared_folders`` over the name and port it was found under (``binding``),
  exactly as the daemon does. An answer from our own node (the
  daemon's responder, told apart by the node id ``status`` gives) proves that the query and
  its answer got through this machine's own stack; answers from others prove the LAN path.
* static peers, when no other node answered: a real session handshake through the protocol's
  ``Endpoint`` on a throw-away UDP port and node id, for every configured folder, bounded.
* firewall: the ruleset as far as it is readable (``nft`` needs root, and iptables-nft rules
  are in the same ruleset); a rule is followed only as far as its matches are understood
  (UDP port, IPv4 destination, layer-4 protocol, interface names): a drop that surely hits mDNS
  or the lanshare port is a ``fail``, one that may is a ``warn``. Unreadable, it is a ``warn``
  that quotes what the active query saw instead.

Nothing here writes anything but a probe file that is removed at once (is the folder writable?),
and nothing waits without a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import json
import os
import random
import resource
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lanshare import __version__, keys
from lanshare.addressing import families, resolved_addr
from lanshare.config import Config
from lanshare.errors import DecodeError, LanshareError
from lanshare.paths import TEMP_PREFIX
from lanshare.peertable import (
    PROTOCOL_VERSION,
    ForeignAnnouncement,
    SharedFolder,
    binding,
    instance_label,
    parse_host_port,
    read_txt,
    shared_folders,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

Status = Literal["ok", "warn", "fail"]

CHECKS = (
    "config",
    "daemon",
    "interfaces",
    "multicast",
    "firewall",
    "discovery",
    "keys",
    "sync",
    "inotify",
    "disk",
    "limits",
)
"""Every check id, in the order they are reported."""

MDNS_GROUP = "224.0.0.251"
MDNS_GROUP6 = "ff02::fb"
MDNS_PORT = 5353
QUERY_SECONDS = 3.0
"""How long the active mDNS query listens for answers."""
RESOLVE_TIMEOUT = 2.0
"""Seconds one answer's records may take to resolve after the query."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a static peer has to answer the handshake."""
TOOL_TIMEOUT = 5.0
"""Seconds ``nft`` may take."""
MAX_ANSWERS = 64
"""Services resolved from one query; more are counted but not read."""
MAX_DIRS = 10_000_000
"""Directories counted per folder for the inotify check, at most."""
LOW_NOFILE = 1024
"""An open-file limit below this starves downloads of many small files."""
DISK_FAIL_BYTES = 64 * 1024 * 1024
DISK_WARN_FRACTION = 0.05


@dataclass(frozen=True, slots=True)
class Result:
    """One check's verdict (the object ``doctor --json`` prints)."""

    check: str
    status: Status
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


def worst(results: Sequence[Result]) -> Status:
    order: dict[Status, int] = {"ok": 0, "warn": 1, "fail": 2}
    return max((r.status for r in results), key=order.__getitem__, default="ok")


def format_human(results: Sequence[Result]) -> list[str]:
    """One line per check (status, id, detail), the fix indented below it. The caller escapes
    nothing: every string is escaped here by ``printable`` (details quote peers' names)."""
    from lanshare.text import printable

    width = max(len(c) for c in CHECKS)
    lines = []
    for r in results:
        shown = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}[r.status]
        lines.append(f"{shown:<4}  {r.check:<{width}}  {printable(r.detail)}")
        if r.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {printable(r.fix)}")
    return lines


# --- config -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathProbe:
    """What a folder (or the state directory) looked like: ``problem`` None when writable."""

    path: Path
    problem: str | None = None
    fix: str | None = None


def config_verdict(
    source: Path | None,
    error: str | None,
    mode: int | None,
    folders: Sequence[PathProbe],
    state_dir: PathProbe | None,
    *,
    daemon_answers: bool = False,
) -> Result:
    """``error`` is the config loader's message (the loader refuses a bad file, and a key
    file others can read); ``mode`` the file's permission bits. With no config file of one's
    own, a daemon that answers (the system service, for a member of its group) is enough."""
    if error is not None:
        return Result("config", "fail", error, _config_fix(error, source))
    if source is None and daemon_answers:
        return Result(
            "config", "ok", "no config file of your own: the daemon that answers has its own"
        )
    if source is None:
        return Result(
            "config",
            "fail",
            "no config file: nothing is shared",
            "share a folder: lanshare init FOLDER (or join one: lanshare init FOLDER --key KEY)",
        )
    if not folders:
        return Result(
            "config",
            "fail",
            f"{source} shares no folder",
            "share a folder: lanshare init FOLDER (or join one: lanshare init FOLDER --key KEY)",
        )
    for probe in [*folders, *([state_dir] if state_dir is not None else [])]:
        if probe.problem is not None:
            return Result("config", "fail", probe.problem, probe.fix)
    shown = f"{mode:04o}" if mode is not None else "?"
    return Result(
        "config",
        "ok",
        f"{source} (mode {shown}): {len(folders)} folder(s), all writable; state directory "
        "writable",
    )


def _config_fix(error: str, source: Path | None) -> str:
    if "chmod 600" in error and source is not None:
        return f"chmod 600 {shlex.quote(str(source))}"
    where = shlex.quote(str(source)) if source is not None else "the config file"
    return f"edit {where} (config.example.toml describes every key)"


def probe_writable(path: Path, what: str) -> PathProbe:
    """Whether this user can create a file in ``path``: tried for real (a temp file created
    and removed), so a read-only mount, an immutable flag or an ACL count as they would."""
    quoted = shlex.quote(str(path))
    try:
        st = path.stat()
    except FileNotFoundError:
        fix = f"mkdir -p {quoted}" if what == "state directory" else f"lanshare init {quoted}"
        return PathProbe(path, f"the {what} {path} does not exist", fix)
    except OSError as exc:
        return PathProbe(path, f"cannot reach the {what} {path}: {exc.strerror}", None)
    if not stat.S_ISDIR(st.st_mode):
        return PathProbe(path, f"the {what} {path} is not a directory", None)
    try:
        _try_write(path)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            return PathProbe(
                path,
                f"the {what} {path} is on a read-only file system",
                f"remount it read-write (mount -o remount,rw on the mount point of {quoted})",
            )
        owner = "you" if st.st_uid == os.geteuid() else f"uid {st.st_uid}"
        return PathProbe(
            path,
            f"the {what} {path} is not writable ({exc.strerror}; owned by {owner}, "
            f"mode {stat.S_IMODE(st.st_mode):04o})",
            f"let the daemon's user write it: chmod u+rwx {quoted} (or chown it to that user; "
            f"check chattr -i {quoted})",
        )
    return PathProbe(path)


def _try_write(directory: Path) -> None:
    """Create a file in ``directory`` and remove it. An unnamed file (O_TMPFILE) first: it
    never appears in a shared folder, so the daemon's watcher sees nothing; where the file
    system cannot make one, a temp-named file, which scans ignore."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    else:
        os.close(fd)
        return
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}doctor-", dir=directory)
    os.close(fd)
    os.unlink(name)


def _state_dir_probe(path: Path) -> PathProbe:
    """The state directory, or the nearest existing parent the daemon would create it in."""
    target = path
    while not target.exists() and target.parent != target:
        target = target.parent
    probe = probe_writable(target, "state directory")
    return probe if probe.problem is not None else PathProbe(path)


# --- daemon -------------------------------------------------------------------------------


def daemon_verdict(status: Mapping[str, Any] | None, why_not: str, cli_version: str) -> Result:
    """``status`` is the daemon's ``status`` answer, None when no socket answered."""
    if status is None:
        return Result(
            "daemon",
            "fail",
            why_not,
            "start it: lanshare daemon (or its service: systemctl --user start lanshare)",
        )
    node = status.get("node", {})
    version = str(node.get("version", "?"))
    uptime = node.get("uptime")
    port = node.get("port")
    detail = (
        f"running (pid {status.get('pid', '?')}), version {version}, up "
        f"{_duration(float(uptime)) if isinstance(uptime, int | float) else '?'}, "
        f"UDP port {port if port is not None else '?'} bound"
    )
    if version != cli_version:
        return Result(
            "daemon",
            "warn",
            detail + f"; this command is version {cli_version}",
            "restart the daemon so that it runs the version installed",
        )
    return Result("daemon", "ok", detail)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


# --- interfaces ---------------------------------------------------------------------------


IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...] = ()
    flags: int | None = None
    """``/sys/class/net/NAME/flags`` (IFF_*), None where unreadable."""


def interfaces_verdict(
    wanted: Sequence[str],
    interfaces: Sequence[Interface],
    chosen: Sequence[str],
    port: int | None = None,
    families: frozenset[int] = frozenset({4}),
) -> Result:
    """``chosen``: the addresses mDNS uses (``discovery.choose_interfaces``), IPv6 without a
    scope; ``port``: the lanshare UDP port, to show them as peers dial them (``[addr]:port``);
    ``families``: the IP versions in use (``addressing.families``)."""
    by_ip = {ip: i for i in interfaces for ip in (*i.ipv4, *i.ipv6)}
    used = [(by_ip[ip].name if ip in by_ip else "?", ip) for ip in chosen]
    shown = ", ".join(f"{name} {_where(name, ip, port)}" for name, ip in used)
    loopback = {"127.0.0.1", "::1"}
    if set(chosen) <= loopback and not loopback & set(wanted) and "lo" not in wanted:
        kinds = " or ".join(f"IPv{v}" for v in sorted(families))
        names = ", ".join(i.name for i in interfaces if _usable(i, families)) or "none"
        if wanted:
            return Result(
                "interfaces",
                "fail",
                f"none of [network] interfaces = {list(wanted)} has an {kinds} address; "
                f"interfaces with one: {names}",
                "name an interface that exists in [network] interfaces (or leave it empty: all)",
            )
        return Result(
            "interfaces",
            "fail",
            f"no network interface has an {kinds} address: mDNS stays on this machine",
            "connect this machine to the LAN (ip addr shows the interfaces)",
        )
    if all(ipaddress.ip_address(ip).is_loopback for ip in chosen):
        return Result(
            "interfaces",
            "warn",
            f"mDNS uses only {shown}: no other machine can see this one",
            "leave [network] interfaces empty (every interface), or name the LAN's",
        )
    for name, _ in used:
        iface = next((i for i in interfaces if i.name == name), None)
        if iface is None or iface.flags is None:
            continue
        if not iface.flags & IFF_UP:
            return Result(
                "interfaces", "fail", f"{name} is down", f"bring it up: ip link set {name} up"
            )
        if not iface.flags & IFF_MULTICAST:
            return Result(
                "interfaces",
                "fail",
                f"{name} has multicast turned off: mDNS cannot use it",
                f"ip link set {name} multicast on",
            )
    if families == {4}:
        v6 = sum(len(i.ipv6) for i in interfaces if i.name in {n for n, _ in used})
        extra = f"; IPv4 only ({v6} IPv6 address(es) unused)" if v6 else "; IPv4"
    elif families == {6}:
        extra = "; IPv6 only"
    else:
        extra = "; IPv4 and IPv6"
    return Result("interfaces", "ok", f"mDNS on {shown}{extra}")


def _where(interface: str, ip: str, port: int | None) -> str:
    """``ip``, or as peers dial it: ``ip:port``, ``[ip]:port``, ``[fe80::1%eth0]:port``."""
    if ipaddress.ip_address(ip).is_link_local and ":" in ip:
        ip = f"{ip}%{interface}"
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _usable(iface: Interface, families: frozenset[int]) -> bool:
    addresses = (*(iface.ipv4 if 4 in families else ()), *(iface.ipv6 if 6 in families else ()))
    return any(not ipaddress.ip_address(ip).is_loopback for ip in addresses)


# --- multicast ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    interface: str
    destination: ipaddress.IPv4Network


def parse_proc_route(text: str) -> list[Route]:
    """``/proc/net/route``: the main IPv4 table, addresses in host-order hex (little-endian
    on every machine Linux runs lanshare on). Lines that do not parse are skipped."""
    routes = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            dest = int(cols[1], 16).to_bytes(4, "little")
            mask = int(cols[7], 16).to_bytes(4, "little")
            flags = int(cols[3], 16)
            prefix = bin(int.from_bytes(mask, "big")).count("1")
            network = ipaddress.IPv4Network((int.from_bytes(dest, "big"), prefix), strict=False)
        except ValueError:
            continue
        if flags & 0x1:  # RTF_UP
            routes.append(Route(cols[0], network))
    return routes


def parse_proc_igmp(text: str) -> dict[str, set[str]]:
    """``/proc/net/igmp``: interface name -> IPv4 multicast groups joined on it."""
    groups: dict[str, set[str]] = {}
    current: str | None = None
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        if not line[0].isspace():
            cols = line.split()
            current = cols[1] if len(cols) > 1 else None
            if current is not None:
                groups.setdefault(current, set())
            continue
        cols = line.split()
        if current is None or not cols:
            continue
        try:
            group = ipaddress.IPv4Address(int(cols[0], 16).to_bytes(4, "little"))
        except ValueError:
            continue
        groups[current].add(str(group))
    return groups


def parse_proc_igmp6(text: str) -> dict[str, set[str]]:
    """``/proc/net/igmp6``: interface name -> IPv6 multicast groups joined on it."""
    groups: dict[str, set[str]] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 3 or len(cols[2]) != 32:
            continue
        try:
            group = ipaddress.IPv6Address(bytes.fromhex(cols[2]))
        except ValueError:
            continue
        groups.setdefault(cols[1], set()).add(str(group))
    return groups


def multicast_verdict(
    routes: Sequence[Route],
    mdns_interfaces: Sequence[str],
    joined: Mapping[str, set[str]] | None,
    answered: bool | None = None,
    families: frozenset[int] = frozenset({4}),
) -> Result:
    """A route for 224.0.0.251 (the most specific one wins, as in the kernel) when IPv4 is in
    ``families`` and, when the daemon runs (``joined`` given: IPv4 and IPv6 groups by
    interface), the interfaces where it joined the mDNS groups (224.0.0.251, ff02::fb).
    ff02::fb is link-local: it needs no route.

    ``answered``: whether another node answered the active query. zeroconf names the
    interface of each of its sockets, so its queries leave without a route: then the missing
    route is only a warning (other mDNS programs here cannot send).
    """
    names = [n for n in mdns_interfaces if n != "lo"]
    if not names:
        return Result("multicast", "ok", "mDNS stays on this machine (loopback): no route needed")
    groups = [g for v, g in ((4, MDNS_GROUP), (6, MDNS_GROUP6)) if v in families]
    if 4 not in families:
        return _joined(f"{MDNS_GROUP6} is link-local: no route needed", names, joined, groups)
    target = ipaddress.IPv4Address(MDNS_GROUP)
    matching = [r for r in routes if target in r.destination]
    if not matching:
        fix = f"ip route add 224.0.0.0/4 dev {names[0]} (or add a default route)"
        if answered:
            return Result(
                "multicast",
                "warn",
                f"no route for the mDNS group {MDNS_GROUP}; lanshare's queries still got answers "
                "(it names the interface), other programs' mDNS cannot leave",
                fix,
            )
        return Result(
            "multicast",
            "fail",
            f"no route for the mDNS group {MDNS_GROUP} and no node answered: mDNS cannot leave "
            "this machine",
            fix,
        )
    best = max(matching, key=lambda r: r.destination.prefixlen)
    detail = f"{MDNS_GROUP} routed via {best.interface} ({best.destination})"
    result = _joined(detail, names, joined, groups)
    if result.status == "ok" and best.interface not in names:
        return Result(
            "multicast",
            "warn",
            result.detail + f", not through the interface mDNS uses ({', '.join(names)})",
            f"ip route add 224.0.0.0/4 dev {names[0]}",
        )
    return result


def _joined(
    detail: str, names: Sequence[str], joined: Mapping[str, set[str]] | None, groups: list[str]
) -> Result:
    """``detail``, and whether the daemon joined every group of ``groups`` on ``names``."""
    if joined is None:
        return Result("multicast", "ok", detail)
    for group in groups:
        missing = sorted(n for n in names if group not in joined.get(n, set()))
        if missing:
            return Result(
                "multicast",
                "warn",
                detail + f"; the group {group} is not joined on {', '.join(missing)}",
                "restart the daemon (it joins the group on every interface it uses)",
            )
    label = "group" if len(groups) == 1 else "groups"
    return Result("multicast", "ok", detail + f"; {label} joined on {', '.join(names)}")


# --- firewall -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet the firewall is asked about."""

    what: str
    hook: str
    dport: int
    daddr: str | None
    interfaces: tuple[str, ...]
    version: int = 4
    """The IP version: which tables see it (``ip`` or ``ip6``, and ``inet``), which header
    matches apply."""


@dataclass(frozen=True, slots=True)
class Block:
    """A rule (or a chain policy) that drops ``packet``: surely, or only perhaps."""

    packet: str
    where: str
    certain: bool


def lanshare_packets(
    port: int, interfaces: Sequence[str], families: frozenset[int] = frozenset({4})
) -> list[Packet]:
    """The packets lanshare needs through, for each IP version in ``families``."""
    names = tuple(interfaces)
    packets = []
    for version in sorted(families):
        group, ip = (MDNS_GROUP, "") if version == 4 else (MDNS_GROUP6, "IPv6 ")
        packets += [
            Packet(f"{ip}mDNS in (UDP 5353)", "input", MDNS_PORT, group, names, version),
            Packet(f"{ip}mDNS out (UDP 5353)", "output", MDNS_PORT, group, names, version),
        ]
        if port:
            packets.append(
                Packet(f"lanshare {ip}UDP {port} in", "input", port, None, names, version)
            )
    return packets


def nft_blocks(ruleset: Mapping[str, Any], packets: Sequence[Packet]) -> list[Block]:
    """Where ``nft -j list ruleset`` drops each packet. Each base chain on the packet's hook
    is walked rule by rule as the kernel would; a rule whose matches are all understood and
    true decides, one with a match not understood makes what follows only "perhaps"."""
    items = [x for x in ruleset.get("nftables", []) if isinstance(x, dict)]
    chains = [x["chain"] for x in items if isinstance(x.get("chain"), dict)]
    rules = [x["rule"] for x in items if isinstance(x.get("rule"), dict)]
    found: list[Block] = []
    for packet in packets:
        for chain in chains:
            family = "ip" if packet.version == 4 else "ip6"
            if chain.get("hook") != packet.hook or chain.get("family") not in (
                family,
                "inet",
                None,
            ):
                continue
            where = f"table {chain.get('family')} {chain.get('table')} chain {chain.get('name')}"
            own = [
                r
                for r in rules
                if (r.get("family"), r.get("table"), r.get("chain"))
                == (chain.get("family"), chain.get("table"), chain.get("name"))
            ]
            block = _walk_chain(own, packet, where, chain.get("policy") == "drop")
            if block is not None:
                found.append(block)
    return found


def _walk_chain(
    rules: Sequence[Mapping[str, Any]], packet: Packet, where: str, policy_drop: bool
) -> Block | None:
    unsure = False
    for rule in rules:
        exprs = rule.get("expr", [])
        if not isinstance(exprs, list):
            continue
        verdict: str | None = None
        known = True
        matches = True
        for expr in exprs:
            if not isinstance(expr, dict) or len(expr) != 1:
                known = False
                continue
            ((kind, body),) = expr.items()
            if kind == "match":
                outcome = _match(body, packet)
                if outcome is False:
                    matches = False
                elif outcome is None:
                    known = False
            elif kind in ("drop", "reject", "accept"):
                verdict = kind
            elif kind in ("jump", "goto", "queue"):
                known = False
                verdict = "other"
            elif kind in ("counter", "log", "limit"):
                continue
            else:
                known = False
        if not matches or verdict is None:
            continue
        text = f"{where}, rule handle {rule.get('handle', '?')} ({verdict})"
        if verdict in ("drop", "reject"):
            return Block(packet.what, text, certain=known and not unsure)
        if verdict == "accept" and known:
            return None
        unsure = True  # an accept, jump or queue we cannot follow
    if policy_drop:
        return Block(packet.what, f"{where}: policy drop", certain=not unsure)
    return None


def _match(body: Any, packet: Packet) -> bool | None:
    """True/False when the match is understood for ``packet``, None when it is not."""
    if not isinstance(body, dict):
        return None
    op = body.get("op", "==")
    left, right = body.get("left"), body.get("right")
    value: object
    if isinstance(left, dict) and isinstance(left.get("payload"), dict):
        proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
        other_ip = "ip6" if packet.version == 4 else "ip"
        if proto in ("tcp", "sctp", "dccp", "icmp", "icmpv6", other_ip):
            return bool(op == "!=")  # another protocol's header: never in our UDP packet
        if (proto, fld) in (("udp", "dport"), ("th", "dport")):
            value = packet.dport
        elif (proto, fld) == (("ip", "daddr") if packet.version == 4 else ("ip6", "daddr")):
            if packet.daddr is None:
                return None
            value = packet.daddr
        else:
            return None
    elif isinstance(left, dict) and isinstance(left.get("meta"), dict):
        key = left["meta"].get("key")
        if key == "l4proto":
            value = "udp"
        elif key == "nfproto":
            value = f"ipv{packet.version}"
        elif key in ("iifname", "oifname") and len(packet.interfaces) == 1:
            if (key == "iifname") != (packet.hook == "input"):
                return None
            value = packet.interfaces[0]
        else:
            return None
    else:
        return None
    hit = _contains(right, value)
    if hit is None:
        return None
    if op in ("==", "in"):
        return hit
    if op == "!=":
        return not hit
    return None


def _contains(right: Any, value: object) -> bool | None:
    if isinstance(right, dict) and "set" in right:
        outcomes = [_contains(item, value) for item in right["set"]]
        if any(o is True for o in outcomes):
            return True
        return None if any(o is None for o in outcomes) else False
    if isinstance(right, dict) and "range" in right and isinstance(value, int):
        low, high = right["range"]
        return bool(low <= value <= high) if isinstance(low, int) else None
    if isinstance(right, dict) and "prefix" in right and isinstance(value, str):
        prefix = right["prefix"]
        try:
            net = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
            return ipaddress.ip_address(value) in net
        except (KeyError, TypeError, ValueError):
            return None
    if isinstance(right, int | str) and not isinstance(right, bool):
        if isinstance(value, str) and isinstance(right, int):
            return right == {"udp": 17, "ipv4": 2, "ipv6": 10}.get(value)
        return right == value
    return None


def firewall_verdict(
    blocks: Sequence[Block] | None, unreadable: str | None, probe: Probe | None, port: int
) -> Result:
    """``blocks`` from a readable ruleset; else ``unreadable`` says why, and the active
    query's outcome (``probe``) says what got through."""
    allow = f"udp dport {{ {MDNS_PORT}, {port} }} accept" if port else f"udp dport {MDNS_PORT}"
    if blocks is None:
        seen = probe.describe() if probe is not None else "no mDNS query was made"
        return Result(
            "firewall",
            "warn",
            f"cannot read the firewall rules ({unreadable}); the mDNS query: {seen}",
            "run sudo lanshare doctor to read them",
        )
    certain = [b for b in blocks if b.certain]
    if certain:
        first = certain[0]
        return Result(
            "firewall",
            "fail",
            "; ".join(f"{b.packet} dropped by {b.where}" for b in certain),
            f"allow it before that rule, e.g. nft insert rule {_nft_place(first.where)} {allow}",
        )
    if blocks:
        return Result(
            "firewall",
            "warn",
            "; ".join(f"{b.packet} may be dropped by {b.where}" for b in blocks),
            f"make sure UDP {MDNS_PORT} and {port} are accepted there",
        )
    return Result("firewall", "ok", f"no nftables rule drops UDP {MDNS_PORT} or {port}")


def _nft_place(where: str) -> str:
    words = where.replace(",", "").split()
    # "table FAMILY NAME chain CHAIN ..." -> "FAMILY NAME CHAIN"
    if len(words) >= 5 and words[0] == "table" and words[3] == "chain":
        return " ".join([words[1], words[2], words[4].rstrip(":")])
    return "FAMILY TABLE CHAIN"


# --- discovery and keys -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One service that answered the query, as resolved (raw TXT: read with peertable)."""

    service: str
    txt: bytes
    addresses: tuple[str, ...]
    port: int | None


@dataclass(slots=True)
class Census:
    """The answers, sorted out by node: ours, sharing a folder, sharing none, incompatible."""

    own: bool = False
    sharing: dict[str, str] = field(default_factory=dict)
    unshared: dict[str, str] = field(default_factory=dict)
    incompatible: dict[str, tuple[str, int]] = field(default_factory=dict)
    unreadable: int = 0


def census(
    own_id: str | None, folders: Sequence[SharedFolder], answers: Sequence[Answer]
) -> Census:
    """Node id -> display name, per kind. A node answering under several names counts once."""
    out = Census()
    for answer in answers:
        try:
            ann = read_txt(answer.txt)
        except DecodeError:
            out.unreadable += 1
            continue
        node = ann.node_id.hex()
        name = instance_label(answer.service)
        if node == own_id:
            out.own = True
        elif isinstance(ann, ForeignAnnouncement):
            out.incompatible[node] = (name, ann.version)
        elif answer.port is not None and shared_folders(
            folders, binding(ann, answer.service, answer.port), ann.tokens
        ):
            out.sharing[node] = name
        else:
            out.unshared[node] = name
    return out


@dataclass(frozen=True, slots=True)
class Probe:
    """The active mDNS query's outcome, for the firewall check when rules are unreadable."""

    daemon_running: bool
    own: bool
    others: int
    error: str | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"failed ({self.error})"
        own = (
            ("this node's responder answered" if self.own else "this node's responder did not")
            if self.daemon_running
            else "no responder here (no daemon)"
        )
        return f"{own}, {self.others} other node(s) answered"


@dataclass(frozen=True, slots=True)
class Handshake:
    peer: str
    ok: bool
    detail: str


def discovery_verdict(
    found: Census | None,
    error: str | None,
    daemon_running: bool,
    static: Sequence[Handshake],
    seconds: float,
) -> Result:
    if found is None:
        return Result(
            "discovery",
            "fail",
            f"the mDNS query could not run: {error}",
            "check that UDP port 5353 can be bound here (another mDNS stack is fine)",
        )
    others = len(found.sharing) + len(found.unshared) + len(found.incompatible)
    if daemon_running and not found.own:
        return Result(
            "discovery",
            "fail",
            f"this node's own announcement was not heard within {seconds:g} s "
            f"({others} other node(s) answered): multicast does not get through here",
            "check the firewall and multicast checks above, then restart the daemon",
        )
    parts = [f"{others} lanshare node(s) answered within {seconds:g} s"]
    if found.sharing:
        parts.append(f"{len(found.sharing)} share a folder ({_names(found.sharing.values())})")
    if found.incompatible:
        versions = ", ".join(f"{n} v{v}" for n, v in found.incompatible.values())
        parts.append(f"{len(found.incompatible)} incompatible ({versions})")
    if static and not found.sharing:
        good = [h for h in static if h.ok]
        shown = "; ".join(f"{h.peer}: {h.detail}" for h in static)
        if not good:
            return Result(
                "discovery",
                "fail",
                ", ".join(parts) + f"; no static peer answers the handshake ({shown})",
                "check each static peer's address and port, that its daemon runs with the "
                "same folder key, and that its firewall lets UDP in",
            )
        return Result(
            "discovery",
            "ok" if len(good) == len(static) else "warn",
            ", ".join(parts) + f"; static peers: {shown}",
        )
    if found.incompatible:
        return Result(
            "discovery",
            "warn",
            ", ".join(parts),
            f"run the same lanshare version everywhere (this one speaks protocol "
            f"{PROTOCOL_VERSION})",
        )
    if not others:
        return Result(
            "discovery",
            "warn",
            parts[0],
            "start lanshare daemon on another machine; if one runs, multicast is blocked "
            "between you (Wi-Fi isolation, a container bridge): list it in [network] "
            "static_peers",
        )
    return Result("discovery", "ok", ", ".join(parts))


def keys_verdict(found: Census | None, static: Sequence[Handshake]) -> Result:
    if found is None:
        return Result("keys", "warn", "not checked: the mDNS query could not run")
    if found.unshared:
        n = len(found.unshared)
        return Result(
            "keys",
            "fail",
            f"{n} machine(s) run lanshare but share none of your folders "
            f"({_names(found.unshared.values())})",
            "check that the key matches (lanshare key) on each machine",
        )
    if found.sharing:
        return Result(
            "keys", "ok", f"every node that answered shares a folder ({len(found.sharing)})"
        )
    if static and not any(h.ok for h in static):
        return Result(
            "keys",
            "warn",
            "no node to compare keys with; a static peer that does not answer the handshake "
            "may hold another key",
            "check that the key matches (lanshare key) on each machine",
        )
    return Result("keys", "ok", "no other node answered: nothing to compare")


def _names(names: Any) -> str:
    listed = sorted(names)
    more = f" and {len(listed) - 5} more" if len(listed) > 5 else ""
    return ", ".join(listed[:5]) + more


# --- sync ---------------------------------------------------------------------------------


def sync_verdict(status: Mapping[str, Any] | None) -> Result:
    if status is None:
        return Result("sync", "warn", "not known: no daemon runs, so nothing syncs", None)
    folders = status.get("folders", [])
    if not folders:
        return Result("sync", "warn", "the daemon shares no folder", "lanshare init FOLDER")
    lines = []
    level: Status = "ok"
    for f in folders:
        peers = f.get("connected_peers", len(f.get("peers", [])))
        state = f.get("state", "?")
        text = f"{f.get('path')}: {state}, {peers} peer(s) connected"
        if f.get("reason"):
            text += f" ({f['reason']})"
        lines.append(text)
        if state in ("error", "paused"):
            level = "fail"
        elif (state != "in_sync" or not peers) and level == "ok":
            level = "warn"
    fix = None
    if level == "fail":
        fix = "lanshare status says why; lanshare resume FOLDER once the cause is fixed"
    elif level == "warn":
        fix = "see the discovery and keys checks; lanshare status shows the progress"
    return Result("sync", level, "; ".join(lines), fix)


# --- limits -------------------------------------------------------------------------------


def inotify_verdict(max_watches: int | None, dirs: Mapping[str, int]) -> Result:
    if max_watches is None:
        return Result("inotify", "warn", "cannot read fs.inotify.max_user_watches")
    total = sum(dirs.values())
    detail = f"{total} director(ies) to watch, fs.inotify.max_user_watches = {max_watches}"
    want = max(2 * total, 524288)
    fix = (
        f"sudo sysctl fs.inotify.max_user_watches={want} (and put it in /etc/sysctl.d/ to keep it)"
    )
    if total > max_watches:
        return Result("inotify", "fail", detail + ": changes in the rest are missed", fix)
    if total > max_watches // 2:
        return Result("inotify", "warn", detail + " (shared with every other program)", fix)
    return Result("inotify", "ok", detail)


def disk_verdict(space: Mapping[str, tuple[int, int] | str]) -> Result:
    """Folder -> (free bytes, total bytes), or why statvfs failed."""
    level: Status = "ok"
    parts = []
    for folder, value in space.items():
        if isinstance(value, str):
            parts.append(f"{folder}: {value}")
            level = "warn" if level == "ok" else level
            continue
        free, total = value
        parts.append(f"{folder}: {_size(free)} free of {_size(total)}")
        if free < DISK_FAIL_BYTES:
            level = "fail"
        elif total and free < DISK_WARN_FRACTION * total and level == "ok":
            level = "warn"
    if not parts:
        return Result("disk", "ok", "no folder to check")
    fix = None if level == "ok" else "free space on that file system (downloads pause when full)"
    return Result("disk", level, "; ".join(parts), fix)


def parse_proc_limits(text: str) -> tuple[int | None, int | None]:
    """The open-files soft and hard limits from ``/proc/PID/limits`` (None = unlimited)."""
    for line in text.splitlines():
        if line.startswith("Max open files"):
            cols = line[len("Max open files") :].split()
            if len(cols) >= 2:
                return _limit(cols[0]), _limit(cols[1])
    raise ValueError("no 'Max open files' line")


def _limit(text: str) -> int | None:
    return None if text == "unlimited" else int(text)


def limits_verdict(soft: int | None, hard: int | None, whose: str) -> Result:
    shown = "unlimited" if soft is None else str(soft)
    detail = f"{whose} may open {shown} files (hard limit {'unlimited' if hard is None else hard})"
    if soft is not None and soft < LOW_NOFILE:
        return Result(
            "limits",
            "warn",
            detail + f": fewer than {LOW_NOFILE} slows downloads of many files",
            "raise it: LimitNOFILE=65536 in the service unit, or ulimit -n 65536 before "
            "lanshare daemon",
        )
    return Result("limits", "ok", detail)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --- gathering (I/O) ----------------------------------------------------------------------


@dataclass(slots=True)
class Inputs:
    """What the command line hands over: the config (or why it failed), the daemon's status
    (or why none answered)."""

    config: Config | None
    """None when it did not load (``config_error`` says why)."""
    config_path: Path | None
    config_error: str | None
    status: dict[str, Any] | None
    why_no_daemon: str
    seconds: float = QUERY_SECONDS


def run(inputs: Inputs) -> list[Result]:
    """Every check, in ``CHECKS`` order."""
    cfg = inputs.config if inputs.config is not None else Config()
    results = [
        _check_config(inputs),
        daemon_verdict(inputs.status, inputs.why_no_daemon, __version__),
    ]
    from lanshare.discovery import choose_interfaces

    interfaces = _gather_interfaces()
    bind = cfg.network.bind
    used = families(cfg.network.ip_version, bind[0] if len(bind) == 1 else None)
    chosen = choose_interfaces(cfg.network.interfaces, _pairs(interfaces), used)
    port = _port(cfg, inputs.status)
    results.append(interfaces_verdict(cfg.network.interfaces, interfaces, chosen, port, used))
    names = sorted({i.name for i in interfaces for ip in (*i.ipv4, *i.ipv6) if ip in chosen})
    joined = None
    if inputs.status is not None:
        joined = parse_proc_igmp(_read_text(Path("/proc/net/igmp")) or "")
        for name, groups in parse_proc_igmp6(_read_text(Path("/proc/net/igmp6")) or "").items():
            joined.setdefault(name, set()).update(groups)
    routes = parse_proc_route(_read_text(Path("/proc/net/route")) or "")
    blocks, unreadable = _gather_firewall(port, names, used)
    if inputs.config is None:
        # Which interfaces and keys to use is in the config: nothing is sent without it.
        skipped = "not checked: the config did not load (see config above)"
        results.append(multicast_verdict(routes, names, joined, families=used))
        results.append(firewall_verdict(blocks, unreadable, None, port))
        results.append(Result("discovery", "warn", skipped))
        results.append(Result("keys", "warn", skipped))
    else:
        network = _network_checks(cfg, inputs, chosen, blocks, unreadable, port)
        answered = network.others > 0
        results.append(multicast_verdict(routes, names, joined, answered, used))
        results.extend(network.results)
    results.append(sync_verdict(inputs.status))
    results.append(inotify_verdict(_read_int("/proc/sys/fs/inotify/max_user_watches"), _dirs(cfg)))
    results.append(disk_verdict(_space(cfg)))
    results.append(_check_limits(inputs.status))
    return results


def _network_checks(
    cfg: Config,
    inputs: Inputs,
    chosen: Sequence[str],
    blocks: list[Block] | None,
    unreadable: str | None,
    port: int,
) -> _Network:
    """firewall (with the active query's outcome), discovery and keys."""
    folders = [SharedFolder(str(f.path), keys.parse_key(f.key)) for f in cfg.folders]
    own = str(inputs.status["node"]["id"]) if inputs.status is not None else None
    found, error = _gather_census(chosen, own, folders, inputs.seconds)
    running = inputs.status is not None
    others = 0 if found is None else len(found.sharing) + len(found.unshared)
    others += 0 if found is None else len(found.incompatible)
    probe = Probe(running, found is not None and found.own, others, error)
    static: list[Handshake] = []
    if found is not None and not found.sharing and cfg.network.static_peers and cfg.folders:
        static = asyncio.run(_handshakes(cfg))
    results = [
        firewall_verdict(blocks, unreadable, probe, port),
        discovery_verdict(found, error, running, static, inputs.seconds),
        keys_verdict(found, static),
    ]
    return _Network(results, others)


@dataclass(frozen=True, slots=True)
class _Network:
    results: list[Result]
    others: int
    """Other nodes that answered the active query."""


def _check_config(inputs: Inputs) -> Result:
    cfg = inputs.config
    mode = None
    if inputs.config_path is not None:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(inputs.config_path.stat().st_mode)
    if cfg is None:
        return config_verdict(inputs.config_path, inputs.config_error, mode, [], None)
    if cfg.source is None:
        return config_verdict(None, None, None, [], None, daemon_answers=inputs.status is not None)
    folders = [probe_writable(f.path, "folder") for f in cfg.folders]
    return config_verdict(cfg.source, None, mode, folders, _state_dir_probe(cfg.node.state_dir))


def _gather_interfaces() -> list[Interface]:
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        v4 = tuple(ip.ip for ip in adapter.ips if isinstance(ip.ip, str))
        v6 = tuple(
            str(ipaddress.ip_address(ip.ip[0].partition("%")[0]))
            for ip in adapter.ips
            if isinstance(ip.ip, tuple)
        )
        flags = _read_text(Path("/sys/class/net") / adapter.nice_name / "flags")
        try:
            bits = int(flags.strip(), 16) if flags is not None else None
        except ValueError:
            bits = None
        out.append(Interface(adapter.nice_name, v4, v6, bits))
    return out


def _pairs(interfaces: Sequence[Interface]) -> list[tuple[str, str]]:
    return sorted((i.name, ip) for i in interfaces for ip in (*i.ipv4, *i.ipv6))


def _port(cfg: Config, status: Mapping[str, Any] | None) -> int:
    if status is not None and isinstance(status.get("node", {}).get("port"), int):
        return int(status["node"]["port"])
    return int(cfg.network.port)


def _gather_firewall(
    port: int, names: Sequence[str], families: frozenset[int]
) -> tuple[list[Block] | None, str | None]:
    nft = shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )
    if nft is None:
        return None, "nft is not installed"
    try:
        done = subprocess.run(
            [nft, "-j", "list", "ruleset"],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nft: {exc}"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["failed"])[0]
        return None, f"nft: {first}"
    try:
        ruleset = json.loads(done.stdout or "{}")
    except ValueError:
        return None, "nft printed no JSON"
    return nft_blocks(ruleset, lanshare_packets(port, names, families)), None


def _gather_census(
    chosen: Sequence[str], own: str | None, folders: Sequence[SharedFolder], seconds: float
) -> tuple[Census | None, str | None]:
    from zeroconf import Error as ZeroconfError

    try:
        answers = asyncio.run(_query(chosen, seconds))
    except (OSError, RuntimeError, ZeroconfError) as exc:
        return None, str(exc)
    return census(own, folders, answers), None


async def _query(chosen: Sequence[str], seconds: float) -> list[Answer]:
    """Browse ``_lanshare._udp.local.`` for ``seconds`` (the browser sends the query to the
    group at once and again after 1 s, 2 s ...), then resolve what answered."""
    from zeroconf import IPVersion, ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    from lanshare.discovery import (
        SERVICE_TYPE,
        adapter_snapshot,
        socket_addresses,
        zeroconf_version,
    )

    sockets = socket_addresses(chosen, adapter_snapshot())
    aiozc = AsyncZeroconf(interfaces=list(sockets), ip_version=zeroconf_version(sockets))
    names: dict[str, None] = {}

    def heard(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Removed and len(names) < MAX_ANSWERS:
            names[name] = None

    browser = None
    try:
        browser = AsyncServiceBrowser(aiozc.zeroconf, [SERVICE_TYPE], handlers=[heard])
        await asyncio.sleep(seconds)

        async def resolve(name: str) -> Answer | None:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT * 1000):
                return None
            addresses = tuple(info.parsed_scoped_addresses(IPVersion.All))
            return Answer(name, info.text or b"", addresses, info.port)

        resolved = await asyncio.gather(*(resolve(n) for n in list(names)))
        return [a for a in resolved if a is not None]
    finally:
        async with asyncio.timeout(RESOLVE_TIMEOUT * 2):
            if browser is not None:
                await browser.async_cancel()
            await aiozc.async_close()


async def _handshakes(cfg: Config) -> list[Handshake]:
    """A real session handshake with every static peer, for every folder, on a throw-away
    port and node id (so that it takes nothing from the daemon's sessions)."""
    from lanshare.events import SessionClosed, SessionEstablished
    from lanshare.protocol.endpoint import Endpoint
    from lanshare.transport import open_transport

    folders = {
        keys.folder_id(keys.parse_key(f.key)): keys.session_psk(keys.parse_key(f.key))
        for f in cfg.folders
    }
    network = dataclasses.replace(cfg.network, port=0)
    endpoint = Endpoint(
        cfg.transfer,
        network,
        node_id=secrets.token_bytes(8),
        folders=folders,
        rng=random.SystemRandom(),
    )
    events: asyncio.Queue[Any] = asyncio.Queue(256)
    loop = asyncio.get_running_loop()
    results: list[Handshake] = []
    try:
        transport = await open_transport(endpoint, events, network, cfg.transfer)
    except (LanshareError, OSError) as exc:
        why = f"not tried: cannot open a UDP socket ({exc})"
        return [Handshake(text, False, why) for text in cfg.network.static_peers]
    try:
        pending: dict[tuple[str, int], str] = {}
        for text in cfg.network.static_peers:
            host, port = parse_host_port(text)
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), TOOL_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                results.append(Handshake(text, False, f"cannot resolve ({exc})"))
                continue
            addr = resolved_addr(infos[0][4])
            pending[addr] = text
            for folder in folders:
                endpoint.connect(addr, folder)
        transport.kick()
        answered: dict[tuple[str, int], str] = {}
        deadline = loop.time() + HANDSHAKE_TIMEOUT
        while len(answered) < len(pending):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                event = await asyncio.wait_for(events.get(), left)
            except TimeoutError:
                break
            source = getattr(event, "addr", None)
            if source not in pending or source in answered:
                continue
            if isinstance(event, SessionEstablished):
                answered[source] = f"answers the handshake (node {event.peer.hex()})"
            elif isinstance(event, SessionClosed):
                answered[source] = f"refused ({event.reason.name.lower()})"
        for addr, text in pending.items():
            detail = answered.get(addr)
            if detail is None:
                results.append(Handshake(text, False, f"no answer within {HANDSHAKE_TIMEOUT:g} s"))
            else:
                results.append(Handshake(text, detail.startswith("answers"), detail))
        endpoint.close()
        transport.kick()
    finally:
        await transport.close()
    return results


def _dirs(cfg: Config) -> dict[str, int]:
    counts = {}
    for folder in cfg.folders:
        count = 0
        stack = [str(folder.path)]
        while stack and count < MAX_DIRS:
            top = stack.pop()
            count += 1
            with contextlib.suppress(OSError), os.scandir(top) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        counts[str(folder.path)] = count
    return counts


def _space(cfg: Config) -> dict[str, tuple[int, int] | str]:
    space: dict[str, tuple[int, int] | str] = {}
    for folder in cfg.folders:
        try:
            st = os.statvfs(folder.path)
        except OSError as exc:
            space[str(folder.path)] = f"cannot read its file system ({exc.strerror})"
            continue
        space[str(folder.path)] = (st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
    return space


def _check_limits(status: Mapping[str, Any] | None) -> Result:
    pid = status.get("pid") if status is not None else None
    if isinstance(pid, int):
        text = _read_text(Path(f"/proc/{pid}/limits"))
        if text is not None:
            with contextlib.suppress(ValueError):
                soft, hard = parse_proc_limits(text)
                return limits_verdict(soft, hard, f"the daemon (pid {pid})")
    _, hard_raw = resource.getrlimit(resource.RLIMIT_NOFILE)

    def value(n: int) -> int | None:
        return None if n == resource.RLIM_INFINITY else n

    # The daemon raises its soft limit to the hard one at start: that is what it will get.
    return limits_verdict(value(hard_raw), value(hard_raw), "a daemon started from here")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: str) -> int | None:
    text = _read_text(Path(path))
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None
