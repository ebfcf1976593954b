"""flannel's host-gw backend: no encapsulation, no device; each peer's subnet is routed to its
PublicIP (`<subnet> via <PublicIP>`), which only works when the hosts share an L2 segment. A
peer whose PublicIP is behind a gateway is reported and skipped. The lease carries
`"BackendType":"host-gw"` and no BackendData, as flannel's. Dual stack (EnableIPv6): a peer's
IPv6 subnet is routed to its PublicIPv6 as well (`<v6 subnet> via <PublicIPv6>`); a v4-only
peer gets its v4 route only. IPv6-only (EnableIPv4 false): the IPv6 route alone."""

from __future__ import annotations

from functools import partial
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from flannel_udp import netlink
from flannel_udp.backends import Network, UserspaceDataplane
from flannel_udp.backends.peerroutes import PeerRoutes, Plan, direct_route
from flannel_udp.config import NetworkConfig
from flannel_udp.lease import Lease
from flannel_udp.netlink import ExtIface


def plan_host_gw(lease: Lease, config: NetworkConfig | None = None) -> Plan:
    """A host-gw lease becomes one route to its PublicIP, if that is directly reachable; in a
    dual-stack network (`config`), and if the lease has an IPv6 subnet of ours and a
    PublicIPv6, a second route to that."""
    if lease.backend != "host-gw":
        # flannel's route networks ignore leases of other types.
        return Plan((), "ignored", f"runs backend {lease.backend}, not host-gw; ignored as "
                    "flannel does")
    if config is not None and not config.enable_ipv4:
        v6 = _ipv6_route(lease, config)
        if isinstance(v6, str):
            return Plan((), "unreachable", f"no IPv6 route: {v6} (host-gw needs the hosts on "
                        "one L2 segment)", shown={"ipv6_path": v6})
        return Plan((v6,), "host-gw", shown={"ipv6_path": "host-gw"})
    route = direct_route(lease)
    if isinstance(route, str):
        return Plan((), "unreachable", f"not directly reachable: {route} (host-gw needs the "
                    "hosts on one L2 segment; use vxlan with DirectRouting across routers)")
    if config is None or not config.enable_ipv6:
        return Plan((route,), "host-gw")
    v6 = _ipv6_route(lease, config)
    if isinstance(v6, str):
        return Plan((route,), "host-gw", shown={"ipv6_path": v6})
    return Plan((route, v6), "host-gw", shown={"ipv6_path": "host-gw"})


def _ipv6_route(lease: Lease, config: NetworkConfig) -> netlink.Route | str:
    """`<v6 subnet> via <PublicIPv6>`, or why the peer gets no IPv6 route."""
    if lease.ipv6_subnet is None:
        return "none: a v4-only lease"
    if not (lease.ipv6_subnet.prefixlen == config.ipv6_subnet_len
            and config.ipv6_network is not None
            and lease.ipv6_subnet.subnet_of(config.ipv6_network)):
        return f"none: {lease.ipv6_subnet} is not a subnet of IPv6Network {config.ipv6_network}"
    if lease.public_ipv6 is None:
        return "none: the lease has no PublicIPv6"
    oif, why = netlink.direct_route_to(lease.public_ipv6)
    if oif is None:
        return f"unreachable: {lease.public_ipv6}: {why}"
    return netlink.Route(lease.ipv6_subnet, lease.public_ipv6, oif)


class HostGwNetwork(Network):
    """The host-gw backend's `Network`: routes only, kept by `PeerRoutes`."""

    backend_type = "host-gw"
    backend_data = None

    def __init__(self, config: NetworkConfig, ext: ExtIface) -> None:
        self.config = config
        self.ext = ext
        self.mtu = ext.mtu  # nothing is added to a packet
        self._routes = PeerRoutes(partial(plan_host_gw, config=config))

    def open(self) -> None:
        pass  # no device, no socket

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        self._routes.start(peers)

    def accepts(self, lease: Lease) -> bool:
        plan = self._routes.plan(lease.ident)
        return plan.reachable if plan is not None else lease.backend == "host-gw"

    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        self._routes.set_peer(lease, since)

    def remove_peer(self, subnet: IPv4Network | IPv6Network, since: float | None = None) -> None:
        self._routes.remove_peer(subnet, since)

    def stats(self) -> dict[str, Any]:
        return {"counters": {}, "lease": {"route_resync": self._routes.resync,
                                          **self._routes.timings}}

    def peer_stats(self, ident: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        return self._routes.peer_stats(ident)

    def route_count(self) -> int:
        return self._routes.count()

    def userspace(self) -> UserspaceDataplane | None:
        return None  # the kernel routes

    def close(self) -> None:
        self._routes.close()
