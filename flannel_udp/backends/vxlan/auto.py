"""The vxlan backend's dataplane "auto": the kernel's VXLAN device when it can be created
(`kernel`), the userspace dataplane (`userspace`) otherwise."""

from __future__ import annotations

import logging
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from flannel_udp.backends import Network, UserspaceDataplane
from flannel_udp.backends.vxlan.kernel import KernelVxlanNetwork, KernelVxlanUnavailable
from flannel_udp.backends.vxlan.userspace import VxlanNetwork
from flannel_udp.lease import Lease

log = logging.getLogger("flannel-udp")


class AutoVxlanNetwork(Network):
    """Dataplane "auto": the kernel's VXLAN device when it can be created, else userspace. Both
    publish the same lease (same VtepMACs, BackendV6Data's too), so peers can't tell which was
    taken. Whatever the chosen one offers, `userspace()` included, is the chosen one's."""

    backend_type = "vxlan"

    def __init__(self, kernel: KernelVxlanNetwork, userspace: VxlanNetwork) -> None:
        self._kernel = kernel
        self._userspace = userspace
        self._chosen: KernelVxlanNetwork | VxlanNetwork = kernel
        self.backend_data = kernel.backend_data
        self.backend_v6_data = kernel.backend_v6_data
        self.mtu = kernel.mtu

    def open(self) -> None:
        try:
            self._kernel.open()
        except KernelVxlanUnavailable as e:
            # open() has removed whatever it made (flannel.<VNI> when only flannel-v6.<VNI>
            # failed): the userspace dataplane takes both sides, IPv4 and IPv6.
            log.warning("vxlan dataplane: userspace (TUN %s), as the kernel's is not available: "
                        "%s", self._userspace.tun_name, e)
            self._chosen = self._userspace
        else:
            log.info("vxlan dataplane: kernel (%s), chosen by Dataplane \"auto\"",
                     self._kernel.device if self._kernel.ipv4 else self._kernel.device6)
            self._chosen = self._kernel
            return
        self._userspace.open()

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        self._chosen.start(lease, peers)

    def accepts(self, lease: Lease) -> bool:
        return self._chosen.accepts(lease)

    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        self._chosen.add_peer(lease, since)

    def remove_peer(self, subnet: IPv4Network | IPv6Network, since: float | None = None) -> None:
        self._chosen.remove_peer(subnet, since)

    def stats(self) -> dict[str, Any]:
        stats = self._chosen.stats()
        stats["lease"]["dataplane_choice"] = "auto"
        return stats

    def peer_stats(self, ident: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        return self._chosen.peer_stats(ident)

    def route_count(self) -> int:
        return self._chosen.route_count()

    def userspace(self) -> UserspaceDataplane | None:
        return self._chosen.userspace()

    def close(self) -> None:
        self._chosen.close()
