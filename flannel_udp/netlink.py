"""The one netlink helper: interfaces, addresses and routes through pyroute2.

pyroute2's sync IPRoute must not run on the uvloop thread: async callers use asyncio.to_thread.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_udp.errors import UserError

TUN_TXQUEUELEN = 5000


@dataclass(frozen=True)
class ExtIface:
    """The underlay interface: where encapsulated traffic leaves."""

    name: str
    index: int
    address: IPv4Address
    mtu: int


def find_interface(spec: str | None) -> ExtIface:
    """The interface named `spec`, or holding address `spec`, or of the default route."""
    wanted = _as_ipv4(spec)
    with IPRoute() as ipr:
        if spec is None:
            routes = ipr.get_default_routes(family=socket.AF_INET)
            if not routes:
                raise UserError("no IPv4 default route to pick the interface from; "
                                "name it with --iface")
            index = routes[0].get("RTA_OIF")
        elif wanted is None:
            found = ipr.link_lookup(ifname=spec)
            if not found:
                raise UserError(f"--iface {spec}: no such interface")
            index = found[0]
        else:
            matches = [a["index"] for a in ipr.get_addr(family=socket.AF_INET)
                       if a.get("IFA_ADDRESS") == str(wanted)]
            if not matches:
                raise UserError(f"--iface {spec}: no interface has this address")
            index = matches[0]
        link = ipr.get_links(index)[0]
        name = link.get("IFLA_IFNAME")
        addresses = [IPv4Address(a.get("IFA_ADDRESS"))
                     for a in ipr.get_addr(family=socket.AF_INET, index=index)]
        if not addresses:
            raise UserError(f"interface {name} has no IPv4 address; give it one or pick "
                            "another with --iface")
        return ExtIface(name=name, index=index, address=wanted or addresses[0],
                        mtu=link.get("IFLA_MTU"))


def _as_ipv4(text: str | None) -> IPv4Address | None:
    try:
        return IPv4Address(text)
    except ValueError:
        return None


def configure_tun(name: str, address: IPv4Interface, mtu: int,
                  routes: list[IPv4Network]) -> None:
    """Give the TUN its MTU and address, bring it up (IPv6 off first), and route through it."""
    disable_ipv6(name)
    # The ICMP errors the fast path writes back come from the TUN's own address; without
    # accept_local the kernel drops them as martians.
    Path(f"/proc/sys/net/ipv4/conf/{name}/accept_local").write_text("1\n")
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        try:
            # The default queue of 500 overflows under one TCP stream (drops = retransmits).
            ipr.link("set", index=index, mtu=mtu, txqlen=TUN_TXQUEUELEN)
            ipr.addr("add", index=index, address=str(address.ip),
                     prefixlen=address.network.prefixlen)
            ipr.link("set", index=index, state="up")
            for dst in routes:
                ipr.route("replace", dst=str(dst), oif=index)
        except NetlinkError as e:
            raise UserError(f"cannot configure {name} ({address}, mtu {mtu}, routes "
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


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def disable_ipv6(name: str) -> None:
    """IPv6 off on a device (no link-local address, no IPv6 into the overlay)."""
    knob = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    if knob.exists():
        knob.write_text("1\n")


def tx_dropped(name: str) -> int | None:
    """Packets the kernel dropped on the way out through `name` (a full TUN queue, for a TUN).
    Read from /sys, which `ip netns exec` and container runtimes mount for the namespace."""
    try:
        return int(Path(f"/sys/class/net/{name}/statistics/tx_dropped").read_text())
    except (OSError, ValueError):
        return None
