"""Backends, registered by flannel's type name. A backend builds a `Network` for one config,
underlay interface, public IP and the userspace dataplane's settings; the daemon drives every
backend through this one interface, and a userspace data plane's features through
`UserspaceDataplane`.

    udp.py, hostgw.py, vxlan/   the backends (vxlan: options, peers, userspace, kernel, auto)
    userspace.py                the userspace data plane: TUN, sockets and fast path, the base
                                of udp and userspace vxlan
    tun.py, sockets.py          its devices; offloads.py probes their kernel offloads
    peerroutes.py               kernel routes, neighbours and FDB entries kept per peer, for
                                host-gw, DirectRouting and kernel vxlan
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, Any

from flannel_udp.config import NetworkConfig
from flannel_udp.lease import Lease

if TYPE_CHECKING:  # netlink (pyroute2) is not needed to check a config's backend options
    from flannel_udp.netlink import ExtIface


DEFAULT_QUEUES = 1  # --queues: see docs/performance.md for the measurements behind it
MAX_QUEUES = 16  # the fast path's MAX_QUEUES


@dataclass(frozen=True)
class DataplaneSettings:
    """The run flags that a userspace data plane takes (a kernel one has no such thing); every
    backend gets them, so that one choosing its data plane at open() can't drop them."""

    source_check: bool = True  # forward a datagram only from a lease holder, source in its subnet
    busy_poll_us: int = 0  # after forwarding, a fast-path thread polls this long before sleeping
    queues: int = DEFAULT_QUEUES  # TUN queues, each with a thread pair and a receiving socket


class UserspaceDataplane(ABC):
    """A data plane that forwards in this process (the fast path between a TUN and UDP sockets):
    what the daemon shows and drives beyond `Network`. Every member is abstract, so a class that
    leaves one out can't be constructed."""

    @property
    @abstractmethod
    def source_check(self) -> bool:
        """Whether only a lease holder's datagrams with a source in its subnet are forwarded."""

    @property
    @abstractmethod
    def busy_poll_us(self) -> int:
        """How long (us) a thread polls after forwarding before it sleeps; 0: at once."""

    @abstractmethod
    def running(self) -> bool:
        """Whether it forwards: its threads run and its TUN is still there (for /healthz)."""

    @abstractmethod
    def counters(self) -> dict[str, Any]:
        """Totals: packets and bytes each way, drops by reason, offload and busy-poll work."""

    @abstractmethod
    def offloads(self) -> dict[str, bool]:
        """The kernel offloads in use now (UDP GSO turns off for good if the kernel refuses it)."""

    @abstractmethod
    def set_trace(self, every: int) -> None:
        """Sample one packet decision in `every` per direction for `trace_drain`; 0: off."""

    @abstractmethod
    def trace_drain(self) -> list[tuple[Any, ...]]:
        """The sampled decisions since the last drain (one consumer)."""

    @abstractmethod
    def trace_info(self) -> dict[str, int]:
        """{"every", "records", "lost"}: the sampling rate, records taken, records lost."""


class Unreachable(Exception):
    """A peer's lease this backend cannot forward to; the message says why."""


class Network(ABC):
    """What the daemon drives a backend through. Every method is abstract, so a backend (or a
    wrapper choosing between two) that leaves one out can't be constructed."""

    backend_type: str  # published in our lease ('' for flannel's udp)
    backend_data: bytes | None  # published in our lease, raw JSON
    backend_v6_data: bytes | None = None  # dual stack: BackendV6Data, raw JSON (vxlan's)
    mtu: int  # the MTU pods should use (FLANNEL_MTU)

    @abstractmethod
    def open(self) -> None:
        """Take the devices and ports the backend needs; UserError when it cannot."""

    @abstractmethod
    def start(self, lease: Lease, peers: list[Lease]) -> None:
        """Configure the data plane for our lease and start forwarding to `peers`."""

    @abstractmethod
    def accepts(self, lease: Lease) -> bool:
        """Whether a peer's lease is one this backend can reach."""

    @abstractmethod
    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        """A peer appeared or changed; takes effect without stopping traffic. `since`: when the
        change happened (unix time, LeaseEvent.at): once it is in the data plane, the time
        taken goes into `latency.PROGRAMMING` (None: not a change, e.g. a resync)."""

    @abstractmethod
    def remove_peer(self, subnet: IPv4Network | IPv6Network, since: float | None = None) -> None:
        """A peer went away; `subnet` is its lease's ident (Lease.ident); `since` as for
        add_peer."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Totals: {'counters': {...}, 'lease': {...}}; 'lease' holds what the backend adds
        about our own end (e.g. the VtepMAC). Its cost does not grow with the peers."""

    @abstractmethod
    def peer_stats(self, ident: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        """One peer's row for `status` (counters, path, VtepMAC...), by its lease's ident; None
        while the data plane holds nothing for it. One lookup, whatever the table's size."""

    @abstractmethod
    def route_count(self) -> int:
        """How many peers the data plane holds now (routes in the fast path's table, peers
        planned by the kernel's); cheap at any size."""

    @abstractmethod
    def userspace(self) -> UserspaceDataplane | None:
        """The data plane forwarding in this process, once open() has chosen it; None where
        the kernel forwards."""

    @abstractmethod
    def close(self) -> None:
        """Stop forwarding and remove what open() and start() created. Idempotent."""


# (config, underlay, PublicIP, dataplane settings, PublicIPv6 in dual stack else None)
Factory = Callable[[NetworkConfig, "ExtIface", IPv4Address, DataplaneSettings,
                    IPv6Address | None], Network]


def _udp(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
         settings: DataplaneSettings, public_ipv6: IPv6Address | None) -> Network:
    from flannel_udp.backends.udp import UdpNetwork
    return UdpNetwork(config, ext, settings)


def _vxlan(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
           settings: DataplaneSettings, public_ipv6: IPv6Address | None) -> Network:
    from flannel_udp.backends.vxlan import vxlan_network
    return vxlan_network(config, ext, public_ip, settings, public_ipv6)


def _host_gw(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
             settings: DataplaneSettings, public_ipv6: IPv6Address | None) -> Network:
    from flannel_udp.backends.hostgw import HostGwNetwork
    return HostGwNetwork(config, ext)


BACKENDS: dict[str, Factory] = {"udp": _udp, "vxlan": _vxlan, "host-gw": _host_gw}
# Every backend carries IPv6 (EnableIPv6, dual stack): udp as IPv6 inner packets in flannel's
# udp format, ours alone (flanneld's udp is IPv4-only); vxlan on either dataplane, as
# flannel-v6.<VNI> does (the userspace one sends and takes its frames on the wire).


def make_network(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
                 settings: DataplaneSettings, public_ipv6: IPv6Address | None = None
                 ) -> Network:
    """The backend the config names; UserError for options it can't work with.
    `public_ipv6`: ours in dual stack (EnableIPv6), else None."""
    return BACKENDS[config.backend_type](config, ext, public_ip, settings,
                                         public_ipv6 if config.enable_ipv6 else None)
