"""The userspace data plane shared by the udp and vxlan backends: a TUN holding the lease's
network address with a route for the whole Network, UDP sockets, and the native fast path
between them, whose route table follows the lease events. A subclass says which sockets it
needs and how a peer's lease becomes a route.

Python sets the devices up and keeps the route table current; the packets never leave C
(`flannel_udp._fastpath`).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict
from ipaddress import IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Any

import pytun

from flannel_udp import netlink
from flannel_udp.backends import DataplaneSettings, Network, Unreachable, UserspaceDataplane
from flannel_udp.backends.offloads import Offloads, open_tun_with_offloads
from flannel_udp.backends.sockets import open_send_sockets, open_udp_socket
from flannel_udp.backends.tun import tun_attached
from flannel_udp.config import NetworkConfig
from flannel_udp.lease import Lease, format_mac
from flannel_udp.netlink import ExtIface

if TYPE_CHECKING:  # imported when opened: the module works unbuilt until then
    from flannel_udp._fastpath import FastPath

log = logging.getLogger("flannel-udp")


class TunNetwork(Network, UserspaceDataplane):
    """The `Network` of a TUN backend, and its own userspace data plane; subclasses set the
    class attributes and `mtu`, `port`, `tun_name`, and implement `_route_args`."""

    backend_type = ""  # published in our lease
    backend_data: bytes | None = None
    send_sockets = 0  # 0: send from the receiving socket

    def __init__(self, config: NetworkConfig, ext: ExtIface, settings: DataplaneSettings) -> None:
        self.config = config
        self.ext = ext
        self.dataplane_settings = settings
        self.tun_name = ""
        self.port = 0
        self.mtu = 0
        self._tun: pytun.TunTapDevice | None = None
        self._sock: socket.socket | None = None
        self._senders: list[socket.socket] = []
        self._fastpath: FastPath | None = None
        self.offloads_probed = Offloads()

    def _route_args(self, lease: Lease) -> tuple[Any, ...]:
        """What `FastPath.set_route` needs beyond subnet and PublicIP to reach `lease`'s node;
        Unreachable when this backend can't."""
        raise NotImplementedError

    def _fastpath_options(self) -> dict[str, Any]:
        """FastPath's keyword arguments that set its wire mode."""
        return {}

    def _lease_stats(self) -> dict[str, Any]:
        """What `status` shows about our own end, beyond the lease."""
        return {}

    def open(self) -> None:
        from flannel_udp._fastpath import FastPath  # noqa: F401  fail early if not built
        try:
            self._sock = open_udp_socket(self.port)
            self._senders = open_send_sockets(self.send_sockets)
            self._tun, self.offloads_probed = open_tun_with_offloads(
                self.tun_name, self._sock, self._senders)
        except BaseException:
            self.close()
            raise

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        from flannel_udp._fastpath import FastPath
        assert self._tun is not None and self._sock is not None
        tun_addr = IPv4Interface((lease.subnet.network_address, 32))
        netlink.configure_tun(self.tun_name, tun_addr, self.mtu, [self.config.network])
        self._fastpath = FastPath(self._tun.fileno(), self._sock.fileno(), self.port,
                                  str(lease.subnet.network_address), self.config.subnet_len,
                                  send_fds=[s.fileno() for s in self._senders] or None,
                                  vnet_hdr=self.offloads_probed.tun_vnet_hdr,
                                  udp_gso=self.offloads_probed.udp_gso,
                                  udp_gro=self.offloads_probed.udp_gro,
                                  source_check=self.dataplane_settings.source_check,
                                  busy_poll_us=self.dataplane_settings.busy_poll_us,
                                  mtu=self.mtu,
                                  **self._fastpath_options())
        for peer in peers:
            self.add_peer(peer)
        self._fastpath.start()
        log.info("%s backend: %s %s mtu %d, UDP port %d on %s", self.config.backend_type,
                 self.tun_name, tun_addr, self.mtu, self.port, self.ext.name)

    def accepts(self, lease: Lease) -> bool:
        try:
            self._route_args(lease)
        except Unreachable:
            return False
        return True

    def add_peer(self, lease: Lease) -> None:
        if self._fastpath is None:
            return
        subnet = str(lease.subnet.network_address)
        try:
            extra = self._route_args(lease)
        except Unreachable as e:
            log.warning("peer %s at %s: %s; skipped", lease.subnet, lease.public_ip, e)
            self._fastpath.del_route(subnet)
            return
        self._fastpath.set_route(subnet, str(lease.public_ip), *extra)

    def remove_peer(self, subnet: IPv4Network) -> None:
        if self._fastpath is not None:
            self._fastpath.del_route(str(subnet.network_address))

    def stats(self) -> dict[str, Any]:
        peers = {}
        for subnet, _ip, mac, counters in self._fastpath.routes() if self._fastpath else ():
            if mac is not None:
                counters["vtep_mac"] = format_mac(mac)
            peers[f"{subnet}/{self.config.subnet_len}"] = counters
        return {"counters": self.counters(), "peers": peers, "lease": self._lease_stats()}

    def userspace(self) -> UserspaceDataplane:
        return self

    # -- UserspaceDataplane --

    @property
    def source_check(self) -> bool:
        return self.dataplane_settings.source_check

    @property
    def busy_poll_us(self) -> int:
        return self.dataplane_settings.busy_poll_us

    def running(self) -> bool:
        return (self._fastpath is not None and bool(self._fastpath.running)
                and self._tun is not None and tun_attached(self._tun))

    def counters(self) -> dict[str, Any]:
        if self._fastpath is None:
            return {}
        counters = self._fastpath.counters()
        # Packets the kernel could not queue to the TUN never reach the fast path to be counted.
        queue_drops = netlink.tx_dropped(self.tun_name)
        if queue_drops is not None:
            counters["drops"]["tun_queue_full"] = queue_drops
        return counters

    def offloads(self) -> dict[str, bool]:
        offloads = asdict(self.offloads_probed)
        if self._fastpath is not None:
            # UDP GSO turns itself off if the kernel refuses it mid-run.
            offloads["udp_gso"] = self._fastpath.offloads()["udp_gso"]
        return offloads

    # `flannel-udp trace`: the fast path samples its per-packet decisions into rings while
    # `every` > 0; the daemon drains them (one consumer).
    def set_trace(self, every: int) -> None:
        if self._fastpath is not None:
            self._fastpath.set_trace(every)

    def trace_drain(self) -> list[tuple[Any, ...]]:
        return [] if self._fastpath is None else self._fastpath.trace_drain()

    def trace_info(self) -> dict[str, int]:
        return {} if self._fastpath is None else self._fastpath.trace_info()

    def close(self) -> None:
        if self._fastpath is not None:
            self._fastpath.stop()
            self._fastpath = None
        if self._tun is not None:
            # Closing the last fd of a non-persistent TUN removes it and every route through it.
            self._tun.close()
            self._tun = None
        for sock in [self._sock, *self._senders]:
            if sock is not None:
                sock.close()
        self._sock = None
        self._senders = []
