"""How a vxlan peer's lease is taken, the same on both dataplanes: only vxlan leases of our VNI
(flannel's vxlan nodes ignore the others), their VtepMAC, and with DirectRouting a plain route
to the peers that are directly reachable."""

from __future__ import annotations

from collections.abc import Callable

from flannel_udp.backends import Unreachable
from flannel_udp.backends.peerroutes import Plan, direct_route
from flannel_udp.backends.vxlan.options import VxlanSettings
from flannel_udp.lease import Lease, LeaseValueError, VxlanLeaseData, format_mac
from flannel_udp.netlink import KernelEntry


def peer_vtep_mac(lease: Lease, vni: int) -> bytes:
    """The VtepMAC of a vxlan peer of our VNI; Unreachable for any other lease."""
    # flannel's vxlan nodes ignore leases of other types; so do we.
    if lease.backend != "vxlan":
        raise Unreachable(f"runs backend {lease.backend}, not vxlan; ignored as flannel does")
    try:
        data = VxlanLeaseData.decode(lease.backend_data)
    except LeaseValueError as e:
        raise Unreachable(f"malformed vxlan lease: {e}") from None
    # A lease without VNI (flannel v0.11's) means the config's, which is ours.
    if data.vni is not None and data.vni != vni:
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
