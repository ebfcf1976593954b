"""flannel's vxlan backend in userspace: RFC 7348 frames exactly as Linux's kernel VXLAN sends
and takes them, so flannel-udp nodes and flanneld's kernel vxlan nodes form one network.

The TUN is `flvx.<VNI>`, not flanneld's `flannel.<VNI>`: it is a TUN, not a VXLAN device, and a
leftover kernel device of that name must not be mistaken for it (nor block it). Our VtepMAC is
derived from the public IP and the VNI (`options.vtep_mac_for`), so a restarted node keeps it
and its peers' kernel neighbour and FDB entries stay right.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flannel_udp.backends import DataplaneSettings
from flannel_udp.backends.peerroutes import PeerRoutes, Plan
from flannel_udp.backends.steering import VXLAN_INNER_OFFSET
from flannel_udp.backends.userspace import TunNetwork
from flannel_udp.backends.vxlan.options import vxlan_settings
from flannel_udp.backends.vxlan.peers import (
    V6Peer,
    peer_v6_vtep_mac,
    peer_vtep_mac,
    plan_vxlan_peer,
    plan_vxlan_v6_peer,
)
from flannel_udp.config import NetworkConfig
from flannel_udp.lease import Lease, format_mac
from flannel_udp.netlink import ExtIface

TUN_PREFIX = "flvx."  # + VNI: at most 13 characters, within IFNAMSIZ for every VNI
# Sockets egress spreads flows over (each on its own ephemeral port): enough for a receiver's
# RSS to use several queues, few enough to cost nothing.
SEND_SOCKETS = 8


class VxlanNetwork(TunNetwork):
    """The vxlan backend's `Network` in userspace: the fast path in VXLAN mode, one route per
    vxlan peer; with DirectRouting, directly reachable peers get a kernel route instead (in
    dual stack their IPv6 subnets too, via a directly reachable PublicIPv6)."""

    backend_type = "vxlan"
    send_sockets = SEND_SOCKETS
    inner_offset = VXLAN_INNER_OFFSET  # the VXLAN header, then the inner Ethernet header

    def __init__(self, config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
                 settings: DataplaneSettings, public_ipv6: IPv6Address | None = None) -> None:
        """`public_ipv6`: our PublicIPv6 in dual stack (EnableIPv6), else None."""
        super().__init__(config, ext, settings)
        self.settings = settings = vxlan_settings(config, ext, public_ip, public_ipv6)
        self.vni = settings.vni
        self.port = settings.port
        self.mtu = settings.mtu
        self.tun_name = f"{TUN_PREFIX}{self.vni}"
        self.vtep_mac = settings.vtep_mac
        self.backend_data = settings.backend_data if config.enable_ipv4 else None
        # Dual stack: the IPv6 VtepMAC the kernel dataplane's flannel-v6.<VNI> would have, so
        # Dataplane "auto" publishes the same BackendV6Data whichever it takes.
        self.vtep_mac6 = settings.v6_vtep_mac
        self.backend_v6_data = settings.backend_v6_data
        self._direct: PeerRoutes | None = None

    def _fastpath_options(self) -> dict[str, Any]:
        return {"mode": "vxlan", "vni": self.vni, "vtep_mac": self.vtep_mac}

    def _route_args(self, lease: Lease) -> tuple[Any, ...]:
        return (peer_vtep_mac(lease, self.vni),)

    def _fastpath_options6(self) -> dict[str, Any]:
        return {} if self.vtep_mac6 is None else {"vtep_mac6": self.vtep_mac6}

    def _route_args6(self, lease: Lease) -> tuple[Any, ...]:
        # As a flannel-v6 device: frames to the VtepMAC of the peer's BackendV6Data.
        return (peer_v6_vtep_mac(lease, self.vni),)

    def _lease_stats(self) -> dict[str, Any]:
        v4 = self.config.enable_ipv4  # IPv6-only: the IPv6 VtepMAC is the only one
        stats = {"vni": self.vni, "vtep_mac": format_mac(self.vtep_mac) if v4 else None,
                 "dataplane": "userspace", "direct_routing": self.settings.direct_routing}
        if self._v6_on and self.vtep_mac6 is not None:  # as the kernel dataplane names it
            stats["ipv6_vtep_mac"] = format_mac(self.vtep_mac6)
        return stats

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
        plan6 = None
        if self._v6_on and lease.ipv6_subnet is not None and lease.backend == "vxlan":
            # Dual stack: the IPv6 side decided apart, as the kernel dataplane decides it.
            peer = V6Peer(lease.ipv6_subnet, lease.public_ipv6, lease.backend_v6_data)
            plan6 = plan_vxlan_v6_peer(peer, self.settings, lambda _peer, _mac: ())
        if not self.config.enable_ipv4:  # IPv6-only: that side is all there is
            if plan6 is None or plan6.problem is not None:  # add_peer has said why already
                return Plan((), "ignored")
            return Plan(plan6.entries, plan6.path, None, {"ipv6_path": plan6.path})
        plan = plan_vxlan_peer(lease, self.settings, lambda _lease, _mac: ())
        if plan.problem is not None:
            return Plan((), plan.path)
        if plan6 is None:
            return plan
        return Plan(plan.entries + plan6.entries, plan.path, None,
                    {**plan.shown, "ipv6_path": plan6.path})

    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        super().add_peer(lease, since)
        if self._direct is not None:
            self._direct.set_peer(lease)

    def remove_peer(self, subnet: IPv4Network, since: float | None = None) -> None:
        super().remove_peer(subnet, since)
        if self._direct is not None:
            self._direct.remove_peer(subnet)

    def peer_stats(self, ident: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        row = super().peer_stats(ident)
        if row is not None:
            row["path"] = "vxlan"
            if not self.config.enable_ipv4:  # the row is the IPv6 side's, as the kernel's
                row["ipv6_path"] = "vxlan"
        plan = self._direct.plan(ident) if self._direct is not None else None
        if plan is not None:
            row = row if row is not None else {}
            row["path"] = plan.path
            if "ipv6_path" in plan.shown:
                row["ipv6_path"] = plan.shown["ipv6_path"]
        return row

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        super().close()
