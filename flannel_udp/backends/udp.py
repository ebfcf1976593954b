"""flannel's UDP backend: TUN `flannel0`, the raw IPv4 packet as UDP payload, port 8285 both ends,
TTL decremented each way (flannel's proxy does)."""

from __future__ import annotations

from typing import Any

from flannel_udp.backends import DataplaneSettings, Unreachable
from flannel_udp.backends.userspace import TunNetwork
from flannel_udp.config import UDP_DEFAULT_PORT, NetworkConfig, backend_port
from flannel_udp.lease import Lease
from flannel_udp.netlink import ExtIface

TUN_NAME = "flannel0"
OVERHEAD = 28  # outer IPv4 + UDP header


class UdpNetwork(TunNetwork):
    """The udp backend's `Network`: the fast path in UDP mode, one route per udp peer."""

    backend_type = ""  # flannel's UDP leases carry no BackendType
    backend_data = None

    def __init__(self, config: NetworkConfig, ext: ExtIface, settings: DataplaneSettings) -> None:
        super().__init__(config, ext, settings)
        self.tun_name = TUN_NAME
        self.port = backend_port(config, UDP_DEFAULT_PORT)
        self.mtu = ext.mtu - OVERHEAD

    def _route_args(self, lease: Lease) -> tuple[Any, ...]:
        if lease.backend != "udp":
            raise Unreachable(f"runs backend {lease.backend}, which the udp backend cannot "
                              "reach")
        return ()

    _route_args6 = _route_args  # the same frames over IPv6
