"""flannel's vxlan backend in userspace: RFC 7348 frames exactly as Linux's kernel VXLAN sends
and takes them, so flannel-udp nodes and flanneld's kernel vxlan nodes form one network.

The TUN is `flvx.<VNI>`, not flanneld's `flannel.<VNI>`: it is a TUN, not a VXLAN device, and a
leftover kernel device of that name must not be mistaken for it (nor block it). Our VtepMAC is
derived from the public IP and the VNI, so a restarted node keeps it and its peers' kernel
neighbour and FDB entries stay right.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel_udp.backends import DataplaneSettings
from flannel_udp.backends.common import TunNetwork, Unreachable
from flannel_udp.backends.peerroutes import PeerRoutes, Plan, direct_route
from flannel_udp.config import (
    MIN_IPV4_MTU,
    VXLAN_OVERHEAD,
    NetworkConfig,
    vxlan_options,
)
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, LeaseValueError, VxlanLeaseData, format_mac
from flannel_udp.netlink import ExtIface, KernelEntry

log = logging.getLogger("flannel-udp")

TUN_PREFIX = "flvx."  # + VNI: at most 13 characters, within IFNAMSIZ for every VNI
# Sockets egress spreads flows over (each on its own ephemeral port): enough for a receiver's
# RSS to use several queues, few enough to cost nothing.
SEND_SOCKETS = 8


def vtep_mac_for(public_ip: IPv4Address, vni: int) -> bytes:
    """Our VtepMAC: stable for a node (hash of public IP and VNI), unicast, locally
    administered, so it can't clash with a vendor-assigned MAC."""
    digest = hashlib.sha256(f"flannel-udp vtep {public_ip} {vni}".encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


@dataclass(frozen=True)
class VxlanSettings:
    """What both dataplanes derive from the config, the underlay and the public IP."""

    vni: int
    port: int
    mtu: int  # of the pods: underlay - 50
    vtep_mac: bytes
    direct_routing: bool

    @property
    def backend_data(self) -> bytes:
        return VxlanLeaseData(self.vni, self.vtep_mac).encode()


def vxlan_settings(config: NetworkConfig, ext: ExtIface,
                   public_ip: IPv4Address) -> VxlanSettings:
    """The vxlan options applied to this node; UserError for an underlay too small."""
    options = vxlan_options(config)
    underlay_mtu = options.mtu or ext.mtu
    if options.mtu and options.mtu > ext.mtu:
        log.warning("Backend.MTU %d is above %s's MTU %d: large frames will not get "
                    "through", options.mtu, ext.name, ext.mtu)
    mtu = underlay_mtu - VXLAN_OVERHEAD
    if mtu < MIN_IPV4_MTU:
        raise UserError(f"{ext.name}'s MTU {ext.mtu} is too small for VXLAN: pods would get "
                        f"{mtu}, IPv4 needs {MIN_IPV4_MTU}")
    return VxlanSettings(options.vni, options.port, mtu, vtep_mac_for(public_ip, options.vni),
                         options.direct_routing)


def peer_vtep_mac(lease: Lease, vni: int) -> bytes:
    """The VtepMAC of a vxlan peer of our VNI; Unreachable for any other lease."""
    # flannel's vxlan nodes ignore leases of other types; so do we.
    if lease.backend != "vxlan":
        raise Unreachable(f"runs backend {lease.backend}, not vxlan; ignored as flannel does")
    try:
        data = VxlanLeaseData.decode(lease.backend_data)
    except LeaseValueError as e:
        raise Unreachable(f"malformed vxlan lease: {e}") from None
    if data.vni != vni:
        raise Unreachable(f"VNI {data.vni} is not ours ({vni})")
    return data.vtep_mac


def plan_vxlan_peer(lease: Lease, settings: VxlanSettings,
                    encapsulate: Callable[[Lease, bytes], tuple[KernelEntry, ...]]) -> Plan:
    """A vxlan peer's kernel entries: with DirectRouting and its PublicIP directly reachable a
    route to it (flannel's DirectRouting), else the dataplane's entries for encapsulation."""
    try:
        mac = peer_vtep_mac(lease, settings.vni)
    except Unreachable as e:
        return Plan((), "ignored", str(e))
    if settings.direct_routing:
        route = direct_route(lease)
        if not isinstance(route, str):
            return Plan((route,), "direct", shown={"vtep_mac": format_mac(mac)})
    return Plan(encapsulate(lease, mac), "vxlan", shown={"vtep_mac": format_mac(mac)})


class VxlanNetwork(TunNetwork):
    """The vxlan backend's `Network` in userspace: the fast path in VXLAN mode, one route per
    vxlan peer; with DirectRouting, directly reachable peers get a kernel route instead."""

    backend_type = "vxlan"
    send_sockets = SEND_SOCKETS

    def __init__(self, config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
                 settings: DataplaneSettings) -> None:
        super().__init__(config, ext, settings)
        self.settings = settings = vxlan_settings(config, ext, public_ip)
        self.vni = settings.vni
        self.port = settings.port
        self.mtu = settings.mtu
        self.tun_name = f"{TUN_PREFIX}{self.vni}"
        self.vtep_mac = settings.vtep_mac
        self.backend_data = settings.backend_data
        self._direct: PeerRoutes | None = None

    def _fastpath_options(self) -> dict[str, Any]:
        return {"mode": "vxlan", "vni": self.vni, "vtep_mac": self.vtep_mac}

    def _route_args(self, lease: Lease) -> tuple[Any, ...]:
        return (peer_vtep_mac(lease, self.vni),)

    def _lease_stats(self) -> dict[str, Any]:
        return {"vni": self.vni, "vtep_mac": format_mac(self.vtep_mac),
                "dataplane": "userspace", "direct_routing": self.settings.direct_routing}

    # DirectRouting: the fast path keeps a route to every peer (a fallback should the kernel
    # route go); the more specific kernel route `<subnet> via <PublicIP>` takes the packets
    # of the directly reachable ones before they reach the TUN's route for the Network.

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        super().start(lease, peers)
        if self.settings.direct_routing:
            self._direct = PeerRoutes(self._plan_direct)
            self._direct.start(peers)

    def _plan_direct(self, lease: Lease) -> Plan:
        # Encapsulation is the fast path's: no kernel entries for the others.
        plan = plan_vxlan_peer(lease, self.settings, lambda _lease, _mac: ())
        if plan.problem is not None:  # add_peer has said why already
            return Plan((), plan.path)
        return plan

    def add_peer(self, lease: Lease) -> None:
        super().add_peer(lease)
        if self._direct is not None:
            self._direct.set_peer(lease)

    def remove_peer(self, subnet: IPv4Network) -> None:
        super().remove_peer(subnet)
        if self._direct is not None:
            self._direct.remove_peer(subnet)

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        for counters in stats["peers"].values():
            counters["path"] = "vxlan"
        if self._direct is not None:
            for subnet, plan in self._direct.plans.items():
                stats["peers"].setdefault(str(subnet), {})["path"] = plan.path
        return stats

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        super().close()
