"""The vxlan backend's kernel dataplane: a kernel VXLAN device programmed exactly as flanneld
programs it, over netlink.

The device is `flannel.<VNI>`: nolearning, local = our public IP, on the underlay, dstport =
Backend.Port, MTU = underlay - 50, our stable VtepMAC, the lease's network address /32. Each
remote vxlan lease gets a permanent neighbour entry (its network address -> its VtepMAC), a
permanent FDB entry (its VtepMAC -> its PublicIP) and a route `<subnet> via <network address>
onlink`, all removed when the lease goes. Unlike flanneld, which keeps the device, SIGTERM
deletes it, as the other backends remove their devices.

With IPv6 (EnableIPv6) a second device, `flannel-v6.<VNI>`, as flanneld's: local = our
PublicIPv6 on the same underlay device, MTU = underlay - 70, its own VtepMAC (BackendV6Data),
`<our IPv6 subnet's network address>/128`, and per remote dual-stack lease the same three
entries over IPv6 (NDP neighbour, FDB entry to the peer's PublicIPv6, onlink route).
IPv6-only (EnableIPv4 false): `flannel-v6.<VNI>` alone, as flanneld (no `flannel.<VNI>`, no
BackendData in the lease).
"""

from __future__ import annotations

import errno
import logging
import socket
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any

from flannel_udp import netlink
from flannel_udp.backends import Network, UserspaceDataplane
from flannel_udp.backends.peerroutes import PeerRoutes, Plan
from flannel_udp.backends.vxlan.options import vxlan_settings
from flannel_udp.backends.vxlan.peers import V6Peer, plan_vxlan_peer, plan_vxlan_v6_peer
from flannel_udp.config import NetworkConfig
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, format_mac
from flannel_udp.netlink import ExtIface, FdbEntry, KernelEntry, Neighbour, Route

log = logging.getLogger("flannel-udp")

DEVICE_PREFIX = "flannel."  # + VNI, as flanneld
V6_DEVICE_PREFIX = "flannel-v6."  # + VNI, flanneld's IPv6 device


class KernelVxlanUnavailable(UserError):
    """The kernel VXLAN device can't be made here; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


def claim_device(name: str) -> socket.socket:
    """A claim on device `name` for as long as this process holds the socket: an abstract unix
    socket named after it, which lives in the network namespace, as the device does, and goes
    with the process. A VXLAN device whose claim is free was left behind by a run that ended;
    one whose claim is taken belongs to a running daemon: UserError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0flannel-udp device {name}")
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"VXLAN device {name} is in use by another running flannel-udp in "
                            "this network namespace (one daemon per namespace)") from None
        raise UserError(f"cannot claim VXLAN device {name}: {e.strerror}", exit_code=1) from None
    return sock


class KernelVxlanNetwork(Network):
    """The vxlan backend's `Network` on a kernel VXLAN device; entries kept by `PeerRoutes`."""

    backend_type = "vxlan"

    def __init__(self, config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
                 public_ipv6: IPv6Address | None = None) -> None:
        """`public_ipv6`: our PublicIPv6 with EnableIPv6 (the IPv6 device's underlay address);
        None: IPv4 only."""
        self.config = config
        self.ext = ext
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6
        self.settings = vxlan_settings(config, ext, public_ip, public_ipv6)
        self.mtu = self.settings.mtu
        self.ipv4 = config.enable_ipv4  # False: IPv6-only, flannel-v6.<VNI> alone
        self.backend_data = self.settings.backend_data if self.ipv4 else None
        self.backend_v6_data = self.settings.backend_v6_data
        self.device = f"{DEVICE_PREFIX}{self.settings.vni}"
        self.device6 = f"{V6_DEVICE_PREFIX}{self.settings.vni}" if public_ipv6 else None
        self._index = 0
        self._index6 = 0
        self._routes: PeerRoutes | None = None
        self._claims: list[socket.socket] = []

    def open(self) -> None:
        """Create the device(s); KernelVxlanUnavailable when the kernel won't, UserError when a
        running daemon has one."""
        try:
            if self.ipv4:
                self._claims.append(claim_device(self.device))
                self._index = self._create_device(self.device, self.public_ip, self.mtu,
                                                  self.settings.vtep_mac)
            if self.device6 is not None:
                assert self.public_ipv6 is not None and self.settings.v6_vtep_mac is not None
                self._claims.append(claim_device(self.device6))
                self._index6 = self._create_device(self.device6, self.public_ipv6,
                                                   self.settings.v6_device_mtu,
                                                   self.settings.v6_vtep_mac)
                netlink.set_accept_ra(self.device6, False)  # as flanneld: no SLAAC on it
        except BaseException:
            self.close()
            raise

    def _create_device(self, name: str, local: IPv4Address | IPv6Address, mtu: int,
                       mac: bytes) -> int:
        kind = netlink.link_kind(name)
        if kind == "vxlan":  # a flanneld's or a killed run's: programmed by someone else
            log.info("removing the VXLAN device %s left behind", name)
            netlink.delete_link(name)
        elif kind is not None:
            hint = "remove it, or set Backend.Dataplane \"userspace\""
            raise KernelVxlanUnavailable(
                f"cannot create VXLAN device {name}: a {kind or 'plain'} device of "
                f"that name exists ({hint})")
        s = self.settings
        try:
            return netlink.create_vxlan(name, s.vni, local, self.ext.index, s.port, mac, mtu)
        except OSError as e:
            raise KernelVxlanUnavailable(
                f"cannot create VXLAN device {name} (VNI {s.vni}, port {s.port} on "
                f"{self.ext.name}, local {local}): {e.strerror}") from None

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        if self._index:
            netlink.add_address(self.device, IPv4Interface((lease.subnet.network_address, 32)))
        if self._index6 and lease.ipv6_subnet is not None:
            assert self.device6 is not None
            netlink.add_address(self.device6,
                                IPv6Interface((lease.ipv6_subnet.network_address, 128)))
        self._routes = PeerRoutes(self._plan)
        self._routes.start(peers)
        if self._index:
            log.info("vxlan backend, kernel dataplane: %s VNI %d, VtepMAC %s, mtu %d, UDP port "
                     "%d on %s", self.device, self.settings.vni,
                     format_mac(self.settings.vtep_mac), self.mtu, self.settings.port,
                     self.ext.name)
        if self._index6:
            assert self.settings.v6_vtep_mac is not None
            log.info("vxlan backend, kernel dataplane: %s VNI %d, VtepMAC %s, mtu %d, local %s",
                     self.device6, self.settings.vni, format_mac(self.settings.v6_vtep_mac),
                     self.settings.v6_device_mtu, self.public_ipv6)

    def _plan(self, lease: Lease) -> Plan:
        if not self.ipv4:
            return self._plan_v6_only(lease)
        plan = plan_vxlan_peer(lease, self.settings, self._encapsulate)
        if not self._index6 or lease.ipv6_subnet is None or lease.backend != "vxlan":
            return plan  # flanneld takes a peer over IPv6 only when both have it
        peer = V6Peer(lease.ipv6_subnet, lease.public_ipv6, lease.backend_v6_data)
        plan6 = plan_vxlan_v6_peer(peer, self.settings, self._encapsulate_v6)
        # status's names, as host-gw's (the daemon adds ipv6_subnet and public_ipv6)
        shown = {**plan.shown, "ipv6_path": plan6.path,
                 **{f"ipv6_{k}": v for k, v in plan6.shown.items()}}
        if plan6.problem is not None:
            shown["ipv6_path"] = f"{plan6.path}: {plan6.problem}"
        return Plan(plan.entries + plan6.entries, plan.path, plan.problem, shown)

    def _plan_v6_only(self, lease: Lease) -> Plan:
        """An IPv6-only network's peer: its IPv6 half alone, on flannel-v6.<VNI>."""
        if lease.backend != "vxlan":
            return Plan((), "ignored", f"runs backend {lease.backend}, not vxlan; ignored as "
                        "flannel does")
        assert lease.ipv6_subnet is not None  # the manager keeps only IPv6-only leases
        peer = V6Peer(lease.ipv6_subnet, lease.public_ipv6, lease.backend_v6_data)
        plan = plan_vxlan_v6_peer(peer, self.settings, self._encapsulate_v6)
        return Plan(plan.entries, plan.path, plan.problem,
                    {"ipv6_path": plan.path, **{f"ipv6_{k}": v for k, v in plan.shown.items()}})

    def _encapsulate(self, lease: Lease, mac: bytes) -> tuple[KernelEntry, ...]:
        """flanneld's three entries for a remote vxlan lease, in its order."""
        gateway = lease.subnet.network_address
        return (Neighbour(gateway, mac, self._index),
                FdbEntry(mac, lease.public_ip, self._index),
                Route(lease.subnet, gateway, self._index, onlink=True))

    def _encapsulate_v6(self, peer: V6Peer, mac: bytes) -> tuple[KernelEntry, ...]:
        """The same three over IPv6, on flannel-v6.<VNI>."""
        assert peer.public_ip is not None
        gateway = peer.subnet.network_address
        return (Neighbour(gateway, mac, self._index6),
                FdbEntry(mac, peer.public_ip, self._index6),
                Route(peer.subnet, gateway, self._index6, onlink=True))

    def accepts(self, lease: Lease) -> bool:
        plan = self._routes.plan(lease.ident) if self._routes is not None else None
        return plan.reachable if plan is not None else lease.backend == "vxlan"

    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        if self._routes is not None:
            self._routes.set_peer(lease, since)

    def remove_peer(self, subnet: IPv4Network | IPv6Network, since: float | None = None) -> None:
        if self._routes is not None:
            self._routes.remove_peer(subnet, since)

    def stats(self) -> dict[str, Any]:
        lease = {"vni": self.settings.vni,
                 "vtep_mac": format_mac(self.settings.vtep_mac) if self.ipv4 else None,
                 "dataplane": "kernel", "device": self.device if self.ipv4 else None,
                 "direct_routing": self.settings.direct_routing,
                 **(self._routes.timings if self._routes is not None else {})}
        if self._index6 and self.settings.v6_vtep_mac is not None:
            lease.update({"ipv6_device": self.device6,
                          "ipv6_vtep_mac": format_mac(self.settings.v6_vtep_mac),
                          "ipv6_counters": netlink.link_counters(self.device6 or "")})
        return {"counters": netlink.link_counters(self.device if self.ipv4
                                                  else self.device6 or ""),
                "lease": lease}

    def peer_stats(self, ident: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        return None if self._routes is None else self._routes.peer_stats(ident)

    def route_count(self) -> int:
        return 0 if self._routes is None else self._routes.count()

    def userspace(self) -> UserspaceDataplane | None:
        return None  # the kernel forwards

    def close(self) -> None:
        if self._routes is not None:
            self._routes.close()
            self._routes = None
        for name, index in ((self.device, self._index), (self.device6, self._index6)):
            if index and name is not None:
                netlink.delete_link(name)  # its neighbours, FDB entries and routes go too
        self._index = self._index6 = 0
        for claim in self._claims:
            claim.close()
        self._claims = []
