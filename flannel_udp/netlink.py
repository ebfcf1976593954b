"""The one netlink helper: interfaces, addresses and routes through pyroute2.

pyroute2's sync IPRoute must not run on the uvloop thread: async callers use asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_PERMANENT

from flannel_udp.errors import UserError

TUN_TXQUEUELEN = 5000
RTNH_F_ONLINK, RTN_UNICAST, RTN_BLACKHOLE = 4, 1, 6  # <linux/rtnetlink.h>
RTPROT_BOOT = 3  # what flanneld's netlink library sets: `ip route` shows no proto
BLACKHOLE_METRIC = 0xFFFFFFFF  # the last resort: any other route for the subnet goes first
IFF_LOOPBACK = 0x8  # <linux/if.h>
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IP6_FORWARD = Path("/proc/sys/net/ipv6/conf/all/forwarding")


@dataclass(frozen=True)
class ExtIface:
    """The underlay interface: where encapsulated traffic leaves."""

    name: str
    index: int
    address: IPv4Address
    mtu: int


@dataclass(frozen=True)
class IfaceChoice:
    """Which underlay interface flanneld's flags ask for. Tried in flanneld's order, the first
    hit winning: each --iface (a name or an IPv4 address), then each --iface-regex (matched
    first against the interfaces' IPv4 addresses, then against their names), then
    --iface-can-reach (the interface `ip route get` would use). With none of them: the
    interface holding --public-ip, else the default route's."""

    names: tuple[str, ...] = ()
    regexes: tuple[re.Pattern[str], ...] = ()
    can_reach: IPv4Address | None = None

    def asks(self) -> bool:
        return bool(self.names or self.regexes or self.can_reach)

    def flags(self) -> str:
        """The selection flags as given, for messages."""
        return ", ".join([*(f"--iface {n}" for n in self.names),
                          *(f"--iface-regex {r.pattern}" for r in self.regexes),
                          *([f"--iface-can-reach {self.can_reach}"] if self.can_reach else [])])


@dataclass(frozen=True)
class _Link:
    name: str
    index: int
    mtu: int
    loopback: bool
    addresses: tuple[IPv4Address, ...]  # every IPv4 address, in the kernel's order

    @property
    def usable(self) -> list[IPv4Address]:
        """flanneld's candidates for the interface's address: global unicast ones, then
        link-local ones (169.254/16); never loopback, multicast or broadcast."""
        ok = [a for a in self.addresses
              if not (a.is_loopback or a.is_multicast or a.is_unspecified
                      or a == IPv4Address("255.255.255.255"))]
        return ([a for a in ok if not a.is_link_local] + [a for a in ok if a.is_link_local])


class _Miss(Exception):
    """One candidate of the selection matched no usable interface; the message says why."""


def find_interface(choice: IfaceChoice, public_ip: IPv4Address | None = None,
                   netns: str | None = None, need_ipv4: bool = True) -> ExtIface:
    """The underlay interface and its address, as flanneld picks them (IfaceChoice, and
    --public-ip when no selection flag is given); never the loopback interface, which other
    hosts cannot reach. `netns`: look in that named network namespace instead of this
    process's (for tests). Nothing matching: one UserError naming each candidate and why it
    missed. `need_ipv4` False (an IPv6-only network): an interface named by --iface needs no
    IPv4 address (its address is then 0.0.0.0)."""
    with NetNS(netns) if netns else IPRoute() as ipr:
        links = _links(ipr)
        if not choice.asks():
            return _default_interface(ipr, links, public_ip, need_ipv4)
        misses = []
        for spec in choice.names:
            try:
                return _named(links, spec, need_ipv4)
            except _Miss as e:
                misses.append(f"--iface {spec}: {e}")
        for regex in choice.regexes:
            try:
                return _matching(links, regex)
            except _Miss as e:
                misses.append(f"--iface-regex {regex.pattern}: {e}")
        if choice.can_reach is not None:
            try:
                return _reaching(ipr, links, choice.can_reach)
            except _Miss as e:
                misses.append(f"--iface-can-reach {choice.can_reach}: {e}")
    if len(misses) == 1:
        raise UserError(misses[0])
    raise UserError(f"no interface matches {choice.flags()}: " + "; ".join(misses))


def _links(ipr: IPRoute) -> list[_Link]:
    addresses: dict[int, list[IPv4Address]] = {}
    for a in ipr.get_addr(family=socket.AF_INET):
        addresses.setdefault(a["index"], []).append(IPv4Address(a.get("IFA_ADDRESS")))
    return sorted((_Link(name=link.get("IFLA_IFNAME"), index=link["index"],
                         mtu=link.get("IFLA_MTU"), loopback=bool(link["flags"] & IFF_LOOPBACK),
                         addresses=tuple(addresses.get(link["index"], ())))
                   for link in ipr.get_links()), key=lambda link: link.index)


def _chosen(link: _Link, address: IPv4Address | None = None,
            need_ipv4: bool = True) -> ExtIface:
    """`link` with `address`, else its first usable address; _Miss when other hosts could not
    reach it there."""
    if link.loopback:
        raise _Miss(f"{link.name} is the loopback interface, which other hosts cannot reach; "
                    "name the underlay interface or its address")
    if address is None and not link.usable and not need_ipv4:
        address = IPv4Address("0.0.0.0")
    elif address is None:
        if not link.usable:
            raise _Miss(f"interface {link.name} has no IPv4 address; give it one or pick "
                        "another with --iface")
        address = link.usable[0]
    elif address.is_loopback:
        raise _Miss(f"{address} is a loopback address, which other hosts cannot reach; name "
                    "the underlay interface or its address")
    return ExtIface(name=link.name, index=link.index, address=address, mtu=link.mtu)


def _named(links: list[_Link], spec: str, need_ipv4: bool = True) -> ExtIface:
    """--iface: the interface called `spec`, or the one holding the IPv4 address `spec`."""
    wanted = _as_ipv4(spec)
    for link in links:
        if (wanted in link.addresses) if wanted is not None else (link.name == spec):
            return _chosen(link, wanted, need_ipv4)
    raise _Miss("no such interface" if wanted is None else "no interface has this address")


def _matching(links: list[_Link], regex: re.Pattern[str]) -> ExtIface:
    """--iface-regex, as flanneld: the first interface with a usable IPv4 address the regex
    matches (with that address); else the first interface whose name it matches."""
    for link in links:
        for address in link.usable:
            if regex.search(str(address)):
                return _chosen(link, address)
    for link in links:
        if regex.search(link.name):
            return _chosen(link)
    shown = ", ".join(f"{link.name} {'/'.join(map(str, link.usable)) or '-'}" for link in links)
    raise _Miss(f"matches no interface's name or IPv4 address (interfaces: {shown})")


def _reaching(ipr: IPRoute, links: list[_Link], target: IPv4Address) -> ExtIface:
    """--iface-can-reach: the interface and source address of the kernel's route to `target`."""
    try:
        route = ipr.route("get", dst=str(target))[0]
    except NetlinkError as e:
        raise _Miss(f"no route to it ({os.strerror(e.code)})") from None
    oif, source = route.get("RTA_OIF"), _as_ipv4(route.get("RTA_PREFSRC"))
    link = next((link for link in links if link.index == oif), None)
    if link is None:
        raise _Miss(f"its route leaves by interface index {oif}, which is gone")
    return _chosen(link, source)


def _default_interface(ipr: IPRoute, links: list[_Link], public_ip: IPv4Address | None,
                       need_ipv4: bool = True) -> ExtIface:
    """No selection flag: the interface holding --public-ip (flanneld v0.22), else, as
    flanneld v0.11 and for a public IP that is not this host's (NAT), the default route's;
    in an IPv6-only network (`need_ipv4` False) the IPv6 default route's, as flanneld's
    GetDefaultV6GatewayInterface."""
    if public_ip is not None and need_ipv4:
        holder = next((link for link in links if public_ip in link.addresses), None)
        if holder is not None:
            return _chosen(holder, public_ip)
    family, version = (socket.AF_INET, "IPv4") if need_ipv4 else (socket.AF_INET6, "IPv6")
    routes = ipr.get_default_routes(family=family)
    if not routes:
        raise UserError(f"no {version} default route to pick the interface from; name it with "
                        "--iface, --iface-regex or --iface-can-reach")
    oif = routes[0].get("RTA_OIF")
    link = next((link for link in links if link.index == oif), None)
    if link is None:
        raise UserError(f"the default route leaves by interface index {oif}, which is gone")
    try:
        return _chosen(link, need_ipv4=need_ipv4)
    except _Miss as e:
        raise UserError(f"the default route's interface: {e}") from None


IFA_F_DADFAILED, IFA_F_DEPRECATED = 0x08, 0x20  # <linux/if_addr.h>; flannel skips deprecated
RT_SCOPE_UNIVERSE = 0


def interface_ipv6(index: int, netns: str | None = None) -> IPv6Address | None:
    """The first global IPv6 address of interface `index` (flanneld's ExtV6Addr: not
    link-local, not deprecated, not a duplicate); None when it has none. `netns`: as
    find_interface."""
    with NetNS(netns) if netns else IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET6, index=index):
            flags = a.get("IFA_FLAGS") or a["flags"]
            if a["scope"] != RT_SCOPE_UNIVERSE or flags & (IFA_F_DEPRECATED | IFA_F_DADFAILED):
                continue
            return IPv6Address(a.get("IFA_ADDRESS"))
    return None


def ip_forward() -> bool | None:
    """Whether this network namespace forwards IPv4 (net.ipv4.ip_forward); None when it can't
    be read. Off, the kernel passes nothing between the pods' interfaces and the overlay, for
    every backend (host-gw's routes as much as a TUN)."""
    try:
        return IP_FORWARD.read_text().strip() != "0"
    except OSError:
        return None


def ip6_forward() -> bool | None:
    """As ip_forward, for IPv6 (net.ipv6.conf.all.forwarding)."""
    try:
        return IP6_FORWARD.read_text().strip() != "0"
    except OSError:
        return None


def _as_ipv4(text: str | None) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def configure_tun(name: str, address: IPv4Interface | None, mtu: int,
                  routes: list[IPv4Network]) -> None:
    """Give the TUN its MTU and address, bring it up (IPv6 off first), and route through it.
    `address` None: no IPv4 address (an IPv6-only network; configure_tun6 adds the rest)."""
    disable_ipv6(name)
    # The ICMP errors the fast path writes back come from the TUN's own address; without
    # accept_local the kernel drops them as martians.
    Path(f"/proc/sys/net/ipv4/conf/{name}/accept_local").write_text("1\n")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        try:
            # The default queue of 500 overflows under one TCP stream (drops = retransmits).
            ipr.link("set", index=index, mtu=mtu, txqlen=TUN_TXQUEUELEN)
            if address is not None:
                ipr.addr("add", index=index, address=str(address.ip),
                         prefixlen=address.network.prefixlen)
            ipr.link("set", index=index, state="up")
            for dst in routes:
                ipr.route("replace", dst=str(dst), oif=index)
        except NetlinkError as e:
            raise UserError(f"cannot configure {name} ({address or 'no IPv4'}, mtu {mtu}, routes "
                            f"{', '.join(map(str, routes))}): {os.strerror(e.code)}",
                            exit_code=1) from None


def configure_tun6(name: str, address: IPv6Interface, routes: list[IPv6Network]) -> None:
    """Dual stack on a TUN that configure_tun set up: IPv6 back on (no link-local address,
    no DAD: the fast path answers for the address), the address, the routes through it."""
    Path(f"/proc/sys/net/ipv6/conf/{name}/addr_gen_mode").write_text("1\n")
    Path(f"/proc/sys/net/ipv6/conf/{name}/accept_dad").write_text("0\n")
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("0\n")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        try:
            ipr.addr("add", index=index, address=str(address.ip),
                     prefixlen=address.network.prefixlen, family=socket.AF_INET6)
            for dst in routes:
                ipr.route("replace", dst=str(dst), oif=index, family=socket.AF_INET6)
        except NetlinkError as e:
            raise UserError(f"cannot configure {name} ({address}, routes "
                            f"{', '.join(map(str, routes))}): {os.strerror(e.code)}",
                            exit_code=1) from None


def delete_routes(name: str, routes: list[IPv4Network]) -> None:
    """Remove routes through a device; those already gone are fine."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return
        for dst in routes:
            try:
                ipr.route("del", dst=str(dst), oif=found[0])
            except NetlinkError as e:
                if e.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
                    raise


def add_blackhole_route(dst: IPv4Network) -> None:
    """`ip route add blackhole DST metric BLACKHOLE_METRIC` in the main table unless it is
    there (--ip-blackhole-route for our own subnet): whatever the pods' own routes do not
    cover is dropped here instead of leaving by the default route. flanneld adds it with metric
    0, which shadows a pod bridge's route for the same subnet added after it (the kernel appends
    its prefix route behind the blackhole); with the highest metric every such route wins."""
    with IPRoute() as ipr:
        if _blackholes(ipr, dst):
            return
        try:
            ipr.route("add", dst=str(dst), type=RTN_BLACKHOLE, proto=RTPROT_BOOT,
                      priority=BLACKHOLE_METRIC)
        except NetlinkError as e:
            raise UserError(f"--ip-blackhole-route: cannot add `blackhole {dst}`: "
                            f"{os.strerror(e.code)}", exit_code=1) from None


def delete_blackhole_route(dst: IPv4Network) -> None:
    """Remove our blackhole route for `dst`; one already gone is fine."""
    with IPRoute() as ipr:
        for _ in _blackholes(ipr, dst):
            try:
                ipr.route("del", dst=str(dst), type=RTN_BLACKHOLE, priority=BLACKHOLE_METRIC)
            except NetlinkError as e:
                if e.code not in _GONE:
                    raise


def _blackholes(ipr: IPRoute, dst: IPv4Network) -> list:
    return [r for r in ipr.get_routes(family=socket.AF_INET, table=254)
            if r["type"] == RTN_BLACKHOLE and r["dst_len"] == dst.prefixlen
            and r.get("RTA_DST") == str(dst.network_address)
            and r.get("RTA_PRIORITY") == BLACKHOLE_METRIC]


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def disable_ipv6(name: str) -> None:
    """IPv6 off on a device (no link-local address, no IPv6 into the overlay)."""
    knob = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    if knob.exists():
        knob.write_text("1\n")


def set_accept_ra(name: str, accept: bool) -> None:
    """Router advertisements accepted on a device or not (flanneld turns them off on its VXLAN
    devices)."""
    knob = Path(f"/proc/sys/net/ipv6/conf/{name}/accept_ra")
    if knob.exists():
        knob.write_text("1\n" if accept else "0\n")


def tx_dropped(name: str) -> int | None:
    """Packets the kernel dropped on the way out through `name` (a full TUN queue, for a TUN).
    Read from /sys, which `ip netns exec` and container runtimes mount for the namespace."""
    try:
        return int(Path(f"/sys/class/net/{name}/statistics/tx_dropped").read_text())
    except (OSError, ValueError):
        return None


# -- kernel routing state of the routing-model backends (host-gw, DirectRouting, kernel VXLAN) --


AnyAddress = IPv4Address | IPv6Address
AnyNetwork = IPv4Network | IPv6Network


def _family(address: AnyAddress | AnyNetwork) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


@dataclass(frozen=True)
class Route:
    """`dst via gateway dev oif` (IPv4 or IPv6); `onlink`: the gateway need not be on a
    connected subnet."""

    dst: AnyNetwork
    gateway: AnyAddress
    oif: int
    onlink: bool = False


@dataclass(frozen=True)
class Neighbour:
    """A permanent ARP (IPv4) or NDP (IPv6) entry `address -> mac` on device `ifindex`."""

    address: AnyAddress
    mac: bytes
    ifindex: int


@dataclass(frozen=True)
class FdbEntry:
    """A permanent forwarding entry `mac -> dst` on VXLAN device `ifindex` (bridge fdb ... self);
    `dst` is IPv6 on a VXLAN device with an IPv6 underlay."""

    mac: bytes
    dst: AnyAddress
    ifindex: int


KernelEntry = Route | Neighbour | FdbEntry
_GONE = (errno.ESRCH, errno.ENOENT, errno.ENODEV)


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def describe(entry: KernelEntry) -> str:
    """An entry as `ip` would show it, for logs."""
    if isinstance(entry, Route):
        return (f"route {entry.dst} via {entry.gateway} dev #{entry.oif}"
                + (" onlink" if entry.onlink else ""))
    if isinstance(entry, Neighbour):
        return f"neighbour {entry.address} lladdr {_mac_text(entry.mac)} dev #{entry.ifindex}"
    return f"fdb {_mac_text(entry.mac)} dst {entry.dst} dev #{entry.ifindex}"


# Routes, neighbours and FDB entries are written with netlink messages of our own, many to one
# sendmsg (pyroute2 0.9 spends 1-3 ms of Python on each request and waits for its answer: 15,000
# entries took seconds). Each message asks for an ack carrying its sequence number, so every
# entry's outcome is known; the kernel handles a sendmsg's messages in order.
_NLMSG_ERROR = 2
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_NEWNEIGH, _RTM_DELNEIGH = 24, 25, 28, 29
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_RTA_DST, _RTA_OIF, _RTA_GATEWAY = 1, 4, 5
_NDA_DST, _NDA_LLADDR = 1, 2
_RT_TABLE_MAIN, _RT_SCOPE_UNIVERSE, _RT_SCOPE_NOWHERE = 254, 0, 255
_AF_BRIDGE = 7
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type
BATCH = 256  # messages per sendmsg: their acks (36 bytes each) fit any receive buffer


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def _message(entry: KernelEntry, add: bool) -> tuple[int, int, bytes]:
    """(message type, flags, body) adding (replacing) or deleting `entry`."""
    change = _NLM_F_CREATE | _NLM_F_REPLACE if add else 0
    if isinstance(entry, Route):
        # A delete matches any protocol and scope (as `ip route del`), this gateway and device.
        header = _RTMSG.pack(_family(entry.dst), entry.dst.prefixlen, 0, 0, _RT_TABLE_MAIN,
                             RTPROT_BOOT if add else 0,
                             _RT_SCOPE_UNIVERSE if add else _RT_SCOPE_NOWHERE,
                             RTN_UNICAST if add else 0, RTNH_F_ONLINK if entry.onlink else 0)
        body = (header + _attr(_RTA_DST, entry.dst.network_address.packed)
                + _attr(_RTA_GATEWAY, entry.gateway.packed)
                + _attr(_RTA_OIF, struct.pack("=I", entry.oif)))
        return (_RTM_NEWROUTE if add else _RTM_DELROUTE), change, body
    if isinstance(entry, Neighbour):
        header = _NDMSG.pack(_family(entry.address), entry.ifindex, NUD_PERMANENT, 0, 0)
        body = header + _attr(_NDA_DST, entry.address.packed) + _attr(_NDA_LLADDR, entry.mac)
        return (_RTM_NEWNEIGH if add else _RTM_DELNEIGH), change, body
    header = _NDMSG.pack(_AF_BRIDGE, entry.ifindex, NUD_PERMANENT, NTF_SELF, 0)
    body = header + _attr(_NDA_LLADDR, entry.mac) + _attr(_NDA_DST, entry.dst.packed)
    return (_RTM_NEWNEIGH if add else _RTM_DELNEIGH), change, body


class _RawRoute:
    """A NETLINK_ROUTE socket that sends messages in batches and collects their acks."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def run(self, messages: list[tuple[int, int, bytes]]) -> list[int]:
        """Send every message; each one's errno (0: done), in order."""
        errors = [0] * len(messages)
        for first in range(0, len(messages), BATCH):
            waiting: dict[int, int] = {}
            chunk = bytearray()
            for index in range(first, min(first + BATCH, len(messages))):
                kind, flags, body = messages[index]
                self.seq = self.seq % 0xFFFFFFFF + 1
                waiting[self.seq] = index
                chunk += _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                        flags | _NLM_F_REQUEST | _NLM_F_ACK, self.seq, 0)
                chunk += body
            self.sock.sendall(chunk)
            while waiting:
                data = self.sock.recv(1 << 16)
                offset = 0
                while offset + _NLMSGHDR.size <= len(data):
                    length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data, offset)
                    if length < _NLMSGHDR.size:
                        break
                    if kind == _NLMSG_ERROR and seq in waiting:
                        (error,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                        errors[waiting.pop(seq)] = -error
                    offset += (length + 3) & ~3
        return errors


_thread_socket = threading.local()


@contextlib.contextmanager
def one_socket() -> Iterator[None]:
    """Within it, the kernel-entry helpers of this thread (install, withdraw, missing,
    direct_route_to) share one netlink socket instead of opening one per call: a worker keeping
    5,000 peers' entries would otherwise open thousands at start and at every resync."""
    raw = _RawRoute()
    try:
        with IPRoute() as ipr:
            _thread_socket.ipr, _thread_socket.raw = ipr, raw
            try:
                yield
            finally:
                _thread_socket.ipr = _thread_socket.raw = None
    finally:
        raw.close()


def _run(messages: list[tuple[int, int, bytes]]) -> list[int]:
    """The messages on this thread's raw socket (one_socket), else on one for this call."""
    shared = getattr(_thread_socket, "raw", None)
    if shared is not None:
        return shared.run(messages)
    raw = _RawRoute()
    try:
        return raw.run(messages)
    finally:
        raw.close()


@contextlib.contextmanager
def _socket() -> Iterator[IPRoute]:
    """This thread's shared socket (one_socket), else one for this call."""
    shared = getattr(_thread_socket, "ipr", None)
    if shared is not None:
        yield shared
        return
    with IPRoute() as ipr:
        yield ipr


def install(entries: list[KernelEntry]) -> list[tuple[KernelEntry, str]]:
    """Add or replace each entry, in order (in batches); the ones that failed, with the
    reason."""
    errors = _run([_message(entry, add=True) for entry in entries])
    return [(entry, os.strerror(error)) for entry, error in zip(entries, errors, strict=True)
            if error]


def withdraw(entries: list[KernelEntry]) -> None:
    """Remove each entry, in order (in batches); those already gone (or whose device is) are
    fine, any other failure raises OSError once all were tried."""
    errors = _run([_message(entry, add=False) for entry in entries])
    for entry, error in zip(entries, errors, strict=True):
        if error and error not in _GONE:
            raise OSError(error, f"{describe(entry)}: {os.strerror(error)}")


def missing(entries: list[KernelEntry]) -> list[KernelEntry]:
    """Those of `entries` the kernel does not hold now (e.g. deleted by hand)."""
    have: set[KernelEntry] = set()
    families = {_family(e.dst if isinstance(e, Route) else
                        e.address if isinstance(e, Neighbour) else e.dst) for e in entries}
    with _socket() as ipr:
        for family in families:
            if not any(isinstance(e, Route) and _family(e.dst) == family for e in entries):
                continue
            for r in ipr.get_routes(family=family, table=254):
                if r.get("RTA_GATEWAY") and r.get("RTA_DST"):
                    have.add(Route(ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}"),
                                   ip_address(r.get("RTA_GATEWAY")), r.get("RTA_OIF"),
                                   bool(r["flags"] & RTNH_F_ONLINK)))
        for ifindex in {e.ifindex for e in entries if not isinstance(e, Route)}:
            try:
                for family in families:
                    for n in ipr.get_neighbours(family=family, ifindex=ifindex):
                        if n.get("NDA_DST") and n.get("NDA_LLADDR"):
                            have.add(Neighbour(ip_address(n.get("NDA_DST")),
                                               _mac_bytes(n.get("NDA_LLADDR")), ifindex))
                for f in ipr.fdb("dump", ifindex=ifindex):
                    if f.get("NDA_DST") and f.get("NDA_LLADDR"):
                        have.add(FdbEntry(_mac_bytes(f.get("NDA_LLADDR")),
                                          ip_address(f.get("NDA_DST")), ifindex))
            except NetlinkError as e:
                if e.code not in _GONE:
                    raise
    return [e for e in entries if e not in have]


def _mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def direct_route_to(address: AnyAddress) -> tuple[int | None, str]:
    """(the outgoing interface, "") when the kernel reaches `address` (IPv4 or IPv6) by a
    directly connected, gateway-less route (flannel's ip.DirectRouting); else (None, why
    not)."""
    with _socket() as ipr:
        try:
            found = ipr.route("get", family=_family(address), dst=str(address))
        except NetlinkError as e:
            return None, f"no route to it ({os.strerror(e.code)})"
    route = found[0]
    if route["type"] != RTN_UNICAST:
        return None, "it is one of this host's own addresses"
    gateway = route.get("RTA_GATEWAY")
    if gateway:
        return None, f"it is reached through gateway {gateway}"
    return route.get("RTA_OIF"), ""


def link_kind(name: str) -> str | None:
    """The kind of device `name` ('vxlan', 'bridge', '' for a plain one), None if absent."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        info = ipr.get_links(found[0])[0].get("IFLA_LINKINFO")
        return (info.get("IFLA_INFO_KIND") if info else None) or ""


def delete_link(name: str) -> None:
    """Delete device `name`; one already gone is fine."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as e:
                if e.code not in _GONE:
                    raise


def create_vxlan(name: str, vni: int, local: AnyAddress, underlay: int, port: int,
                 mac: bytes, mtu: int) -> int:
    """A kernel VXLAN device as flanneld makes it (nolearning, local address, underlay device,
    port, MAC, MTU), up; its index. An IPv6 `local` makes an IPv6 underlay (flanneld's
    flannel-v6.<VNI>). OSError when the kernel refuses (no vxlan module, no permission, the
    name or the port taken); then nothing is left behind."""
    local_attr = {"vxlan_local6" if local.version == 6 else "vxlan_local": str(local)}
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=name, kind="vxlan", vxlan_id=vni, **local_attr,
                     vxlan_link=underlay, vxlan_port=port, vxlan_learning=0,
                     address=_mac_text(mac), mtu=mtu)
        except NetlinkError as e:
            raise OSError(e.code, os.strerror(e.code)) from None
        index = ipr.link_lookup(ifname=name)[0]
        try:
            # Up binds the UDP port: EADDRINUSE shows here.
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            ipr.link("del", index=index)
            raise OSError(e.code, os.strerror(e.code)) from None
        return index


def add_address(name: str, address: IPv4Interface | IPv6Interface) -> None:
    """Give device `name` an address (one it holds already is fine)."""
    with IPRoute() as ipr:
        try:
            ipr.addr("add", index=ipr.link_lookup(ifname=name)[0], family=_family(address.ip),
                     address=str(address.ip), prefixlen=address.network.prefixlen)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise UserError(f"cannot add {address} to {name}: {os.strerror(e.code)}",
                                exit_code=1) from None


def link_counters(name: str) -> dict[str, int]:
    """A device's packet and byte counters, as `status` shows them ({} if it is gone)."""
    counters = {}
    for key in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_dropped", "rx_dropped"):
        try:
            counters[key] = int(Path(f"/sys/class/net/{name}/statistics/{key}").read_text())
        except (OSError, ValueError):
            return {}
    return counters
