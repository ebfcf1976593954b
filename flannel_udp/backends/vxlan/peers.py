"""How a vxlan peer's lease is taken, the same on both dataplanes: only vxlan leases of our VNI
(flannel's vxlan nodes ignore the others), their VtepMAC, and with DirectRouting a plain route
to the peers that are directly reachable. A dual-stack peer is taken twice, as flanneld takes
it: over IPv4 (BackendData, PublicIP) and over IPv6 (BackendV6Data, PublicIPv6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from flannel_udp.backends import Unreachable
from flannel_udp.backends.peerroutes import Plan, direct_route, direct_route_via
from flannel_udp.backends.vxlan.options import VxlanSettings
from flannel_udp.lease import Lease, LeaseValueError, VxlanLeaseData, format_mac
from flannel_udp.netlink import KernelEntry


def _vtep_mac(data: bytes | None, vni: int, field: str = "") -> bytes:
    try:
        decoded = VxlanLeaseData.decode(data)
    except LeaseValueError as e:
        raise Unreachable(f"malformed vxlan lease{field}: {e}") from None
    # A lease without VNI (flannel v0.11's) means the config's, which is ours.
    if decoded.vni is not None and decoded.vni != vni:
        raise Unreachable(f"VNI {decoded.vni} is not ours ({vni})")
    return decoded.vtep_mac


def peer_vtep_mac(lease: Lease, vni: int) -> bytes:
    """The VtepMAC of a vxlan peer of our VNI; Unreachable for any other lease."""
    # flannel's vxlan nodes ignore leases of other types; so do we.
    if lease.backend != "vxlan":
        raise Unreachable(f"runs backend {lease.backend}, not vxlan; ignored as flannel does")
    return _vtep_mac(lease.backend_data, vni)


def peer_v6_vtep_mac(lease: Lease, vni: int) -> bytes:
    """The VtepMAC of a vxlan peer's IPv6 device (BackendV6Data); Unreachable as above."""
    if lease.backend != "vxlan":
        raise Unreachable(f"runs backend {lease.backend}, not vxlan; ignored as flannel does")
    return _vtep_mac(lease.backend_v6_data, vni, " (BackendV6Data)")


@dataclass(frozen=True)
class V6Peer:
    """A peer's IPv6 side, from its lease: its IPv6 subnet, PublicIPv6 and BackendV6Data."""

    subnet: IPv6Network
    public_ip: IPv6Address | None
    backend_data: bytes | None


def plan_vxlan_v6_peer(peer: V6Peer, settings: VxlanSettings,
                       encapsulate: Callable[[V6Peer, bytes], tuple[KernelEntry, ...]]
                       ) -> Plan:
    """The IPv6 half of a dual-stack vxlan peer, as flanneld takes it on `flannel-v6.<VNI>`:
    with DirectRouting and the PublicIPv6 directly reachable a route via it, else the
    dataplane's entries (neighbour, FDB to the PublicIPv6, onlink route)."""
    if peer.public_ip is None:
        return Plan((), "ignored", "no PublicIPv6 in its lease")
    try:
        mac = _vtep_mac(peer.backend_data, settings.vni, " (BackendV6Data)")
    except Unreachable as e:
        return Plan((), "ignored", str(e))
    if settings.direct_routing:
        route = direct_route_via(peer.subnet, peer.public_ip)
        if not isinstance(route, str):
            return Plan((route,), "direct", shown={"vtep_mac": format_mac(mac)})
    return Plan(encapsulate(peer, mac), "vxlan", shown={"vtep_mac": format_mac(mac)})


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
