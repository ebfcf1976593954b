"""Backends, registered by flannel's type name. A backend builds a `Network` for one config,
underlay interface and public IP; the daemon drives every backend through this one interface."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from flannel_udp.config import NetworkConfig, vxlan_options
from flannel_udp.lease import Lease
from flannel_udp.netlink import ExtIface


class Network(Protocol):
    backend_type: str  # published in our lease ('' for flannel's udp)
    backend_data: bytes | None  # published in our lease, raw JSON
    mtu: int  # the MTU pods should use (FLANNEL_MTU)

    def open(self) -> None:
        """Take the devices and ports the backend needs; UserError when it cannot."""

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        """Configure the data plane for our lease and start forwarding to `peers`."""

    def accepts(self, lease: Lease) -> bool:
        """Whether a peer's lease is one this backend can reach."""

    def add_peer(self, lease: Lease) -> None:
        """A peer appeared or changed; takes effect without stopping traffic."""

    def remove_peer(self, subnet: IPv4Network) -> None:
        """A peer went away."""

    def stats(self) -> dict[str, Any]:
        """Counters: {'counters': {...}, 'peers': {subnet_str: {...}}, 'lease': {...}}; 'lease'
        holds what the backend adds about our own end (e.g. the VtepMAC)."""

    def close(self) -> None:
        """Stop forwarding and remove what open() and start() created. Idempotent."""


def _udp(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address) -> Network:
    from flannel_udp.backends.udp import UdpNetwork
    return UdpNetwork(config, ext)


def _vxlan(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address) -> Network:
    from flannel_udp.backends.vxlan import VxlanNetwork
    from flannel_udp.backends.vxlan_kernel import AutoVxlanNetwork, KernelVxlanNetwork
    dataplane = vxlan_options(config).dataplane
    if dataplane == "userspace":
        return VxlanNetwork(config, ext, public_ip)
    if dataplane == "kernel":
        return KernelVxlanNetwork(config, ext, public_ip)
    return AutoVxlanNetwork(KernelVxlanNetwork(config, ext, public_ip),
                            VxlanNetwork(config, ext, public_ip))


def _host_gw(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address) -> Network:
    from flannel_udp.backends.hostgw import HostGwNetwork
    return HostGwNetwork(config, ext)


BACKENDS: dict[str, Callable[[NetworkConfig, ExtIface, IPv4Address], Network]] = {
    "udp": _udp, "vxlan": _vxlan, "host-gw": _host_gw}


def make_network(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address) -> Network:
    """The backend the config names; UserError for options it can't work with."""
    return BACKENDS[config.backend_type](config, ext, public_ip)
