"""flannel's host-gw backend: no encapsulation, no device; each peer's subnet is routed to its
PublicIP (`<subnet> via <PublicIP>`), which only works when the hosts share an L2 segment. A
peer whose PublicIP is behind a gateway is reported and skipped. The lease carries
`"BackendType":"host-gw"` and no BackendData, as flannel's."""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from flannel_udp.backends import Network, UserspaceDataplane
from flannel_udp.backends.peerroutes import PeerRoutes, Plan, direct_route
from flannel_udp.config import NetworkConfig
from flannel_udp.lease import Lease
from flannel_udp.netlink import ExtIface


def plan_host_gw(lease: Lease) -> Plan:
    """A host-gw lease becomes one route to its PublicIP, if that is directly reachable."""
    if lease.backend != "host-gw":
        # flannel's route networks ignore leases of other types.
        return Plan((), "ignored", f"runs backend {lease.backend}, not host-gw; ignored as "
                    "flannel does")
    route = direct_route(lease)
    if isinstance(route, str):
        return Plan((), "unreachable", f"not directly reachable: {route} (host-gw needs the "
                    "hosts on one L2 segment; use vxlan with DirectRouting across routers)")
    return Plan((route,), "host-gw")


class HostGwNetwork(Network):
    """The host-gw backend's `Network`: routes only, kept by `PeerRoutes`."""

    backend_type = "host-gw"
    backend_data = None

    def __init__(self, config: NetworkConfig, ext: ExtIface) -> None:
        self.config = config
        self.ext = ext
        self.mtu = ext.mtu  # nothing is added to a packet
        self._routes = PeerRoutes(plan_host_gw)

    def open(self) -> None:
        pass  # no device, no socket

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        self._routes.start(peers)

    def accepts(self, lease: Lease) -> bool:
        plan = self._routes.plan(lease.subnet)
        return plan.reachable if plan is not None else lease.backend == "host-gw"

    def add_peer(self, lease: Lease) -> None:
        self._routes.set_peer(lease)

    def remove_peer(self, subnet: IPv4Network) -> None:
        self._routes.remove_peer(subnet)

    def stats(self) -> dict[str, Any]:
        return {"counters": {}, "lease": {"route_resync": self._routes.resync},
                "peers": {str(subnet): {"path": plan.path}
                          for subnet, plan in self._routes.plans.items()}}

    def userspace(self) -> UserspaceDataplane | None:
        return None  # the kernel routes

    def close(self) -> None:
        self._routes.close()
