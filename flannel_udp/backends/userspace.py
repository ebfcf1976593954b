"""The userspace data plane shared by the udp and vxlan backends: a TUN holding the lease's
network address with a route for the whole Network, UDP sockets, and the native fast path
between them, whose route table follows the lease events. A subclass says which sockets it
needs and how a peer's lease becomes a route.

Python sets the devices up and keeps the route table current; the packets never leave C
(`flannel_udp._fastpath`). Dual stack (EnableIPv6, our lease holding an IPv6 subnet): the TUN
gets the IPv6 subnet's network address and a route for the IPv6Network, and each peer's IPv6
subnet is routed to its PublicIPv6 over IPv6 sockets (to its PublicIP when it has none). An
IPv6-only network (EnableIPv4 false) is the same without the IPv4 side: the TUN has no IPv4
address nor route, and the peers are their IPv6 subnets alone.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import TYPE_CHECKING, Any

import pytun

from flannel_udp import latency, netlink
from flannel_udp.backends import DataplaneSettings, Network, Unreachable, UserspaceDataplane
from flannel_udp.backends.offloads import OFFLOADS_ENV, Offloads, open_tun_with_offloads
from flannel_udp.backends.sockets import (
    enable_udp_gro,
    open_send_sockets,
    open_udp_socket,
    udp_gso_supported,
)
from flannel_udp.backends.steering import attach_reuseport_program, attach_steering_program
from flannel_udp.backends.tun import open_tun, tun_attached
from flannel_udp.config import NetworkConfig
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, format_mac
from flannel_udp.netlink import ExtIface

if TYPE_CHECKING:  # imported when opened: the module works unbuilt until then
    from flannel_udp._fastpath import FastPath

log = logging.getLogger("flannel-udp")
IPV4_HEADER_LEN, IPV6_HEADER_LEN, IPV6_MIN_MTU = 20, 40, 1280


class TunNetwork(Network, UserspaceDataplane):
    """The `Network` of a TUN backend, and its own userspace data plane; subclasses set the
    class attributes and `mtu`, `port`, `tun_name`, and implement `_route_args`."""

    backend_type = ""  # published in our lease
    backend_data: bytes | None = None
    send_sockets = 0  # 0: send from the receiving socket
    inner_offset = 0  # where the inner IP packet starts in a datagram's payload

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
        self._sock6: socket.socket | None = None  # dual stack: the IPv6 underlay's
        self._senders6: list[socket.socket] = []
        # The peers' IPv6 subnets we route, by their lease's ident (Lease.ident)
        self._v6_subnets: dict[IPv4Network | IPv6Network, IPv6Network] = {}
        self._v6_on = False  # the fast path has an IPv6 side (dual stack, our IPv6 lease)
        self._fastpath: FastPath | None = None
        self.offloads_probed = Offloads()
        # Queues beyond the first (--queues): (TUN queue, its socket, its IPv6 socket or None)
        self._more_queues: list[tuple[pytun.TunTapDevice, socket.socket,
                                      socket.socket | None]] = []

    def _route_args(self, lease: Lease) -> tuple[Any, ...]:
        """What `FastPath.set_route` needs beyond subnet and PublicIP to reach `lease`'s node;
        Unreachable when this backend can't."""
        raise NotImplementedError

    def _fastpath_options(self) -> dict[str, Any]:
        """FastPath's keyword arguments that set its wire mode."""
        return {}

    def _route_args6(self, lease: Lease) -> tuple[Any, ...]:
        """What `FastPath.set_route6` needs beyond subnet and address to reach `lease`'s IPv6
        subnet; Unreachable when this backend can't."""
        return ()

    def _fastpath_options6(self) -> dict[str, Any]:
        """FastPath's keyword arguments for the IPv6 side of its wire mode."""
        return {}

    def _lease_stats(self) -> dict[str, Any]:
        """What `status` shows about our own end, beyond the lease."""
        return {}

    def open(self) -> None:
        from flannel_udp._fastpath import FastPath  # noqa: F401  fail early if not built
        queues = self.dataplane_settings.queues
        many = queues > 1
        try:
            self._sock = open_udp_socket(self.port, reuseport=many)
            self._senders = open_send_sockets(self.send_sockets)
            if self.config.enable_ipv6:
                self._sock6 = open_udp_socket(self.port, socket.AF_INET6, reuseport=many)
                self._senders6 = open_send_sockets(self.send_sockets, socket.AF_INET6)
            self._tun, self.offloads_probed = open_tun_with_offloads(
                self.tun_name, self._sock, self._senders, multi_queue=many)
            off = self.offloads_probed
            if self._sock6 is not None:
                # One UDP_GRO flag for both sockets: the IPv6 one gets it only with the IPv4
                # one (else its groups would be taken for single datagrams); UDP_SEGMENT only
                # where every send socket takes it.
                if off.udp_gro and not enable_udp_gro(self._sock6):
                    raise UserError("the IPv6 UDP socket refused UDP_GRO, which the IPv4 one "
                                    f"took; run with {OFFLOADS_ENV}=0")
                if off.udp_gso:
                    off.udp_gso = all(udp_gso_supported(s)
                                      for s in self._senders6 or [self._sock6])
            if many:
                self._open_more_queues(queues)
        except BaseException:
            self.close()
            raise

    def _open_more_queues(self, queues: int) -> None:
        """Queues 1..N-1: a TUN queue each and a receiving socket in the port's SO_REUSEPORT
        group (the group's i-th is queue i's), as queue 0's; then the programs that keep each
        flow on one queue both ways (steering)."""
        assert self._tun is not None and self._sock is not None
        off = self.offloads_probed
        for _ in range(1, queues):
            tun = open_tun(self.tun_name, vnet_hdr=off.tun_vnet_hdr, multi_queue=True,
                           another_queue=True)
            sock = sock6 = None
            try:
                sock = open_udp_socket(self.port, reuseport=True, group_member=True)
                if self._sock6 is not None:
                    sock6 = open_udp_socket(self.port, socket.AF_INET6, reuseport=True,
                                            group_member=True)
                for s in (sock, sock6):
                    if s is not None and off.udp_gro and not enable_udp_gro(s):
                        raise UserError("a queue's UDP socket refused UDP_GRO, which the first "
                                        f"one took; run with {OFFLOADS_ENV}=0")
            except BaseException:
                tun.close()
                for s in (sock, sock6):
                    if s is not None:
                        s.close()
                raise
            self._more_queues.append((tun, sock, sock6))
        attach_reuseport_program(self._sock, queues, self.inner_offset)
        if self._sock6 is not None:
            attach_reuseport_program(self._sock6, queues, self.inner_offset)
        attach_steering_program(self._tun.fileno(), queues)

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        from flannel_udp._fastpath import FastPath
        assert self._tun is not None and self._sock is not None
        v4 = self.config.enable_ipv4
        tun_addr = IPv4Interface((lease.subnet.network_address, 32))
        netlink.configure_tun(self.tun_name, tun_addr if v4 else None, self.mtu,
                              [self.config.network] if v4 else [])
        v6: dict[str, Any] = {}
        if (self.config.enable_ipv6 and lease.ipv6_subnet is not None
                and self.config.ipv6_network is not None and self._sock6 is not None):
            netlink.configure_tun6(self.tun_name,
                                   IPv6Interface((lease.ipv6_subnet.network_address, 128)),
                                   [self.config.ipv6_network])
            # The TUN's MTU leaves room for an IPv4 outer header; an IPv6 one is 20 bytes
            # longer: IPv6 packets over that get packet too big, as from a flannel-v6 device.
            path_mtu6 = self.mtu - (IPV6_HEADER_LEN - IPV4_HEADER_LEN)
            v6 = {"tun_addr6": str(lease.ipv6_subnet.network_address),
                  "path_mtu6": path_mtu6 if path_mtu6 >= IPV6_MIN_MTU else 0,
                  "subnet_len6": self.config.ipv6_subnet_len,
                  "udp6_fd": self._sock6.fileno(),
                  "send6_fds": [s.fileno() for s in self._senders6] or None,
                  **self._fastpath_options6()}
        # IPv6-only: the IPv4 side has no route and its own subnet is the address 0.0.0.0 alone
        # (not flannel's empty 0.0.0.0/0, which would take in every IPv4 destination).
        self._fastpath = FastPath(self._tun.fileno(), self._sock.fileno(), self.port,
                                  str(lease.subnet.network_address),
                                  self.config.subnet_len if v4 else 32,
                                  send_fds=[s.fileno() for s in self._senders] or None,
                                  vnet_hdr=self.offloads_probed.tun_vnet_hdr,
                                  udp_gso=self.offloads_probed.udp_gso,
                                  udp_gro=self.offloads_probed.udp_gro,
                                  source_check=self.dataplane_settings.source_check,
                                  busy_poll_us=self.dataplane_settings.busy_poll_us,
                                  mtu=self.mtu,
                                  more_queues=[(tun.fileno(), sock.fileno(),
                                                None if sock6 is None else sock6.fileno())
                                               for tun, sock, sock6 in self._more_queues],
                                  **self._fastpath_options(), **v6)
        self._v6_on = bool(v6)
        for peer in peers:
            self.add_peer(peer)
        self._fastpath.start()
        log.info("%s backend: %s %s mtu %d, UDP port %d on %s, %d queue%s",
                 self.config.backend_type, self.tun_name,
                 tun_addr if v4 else lease.ipv6_subnet, self.mtu, self.port, self.ext.name,
                 1 + len(self._more_queues), "s" * bool(self._more_queues))

    def accepts(self, lease: Lease) -> bool:
        # An IPv6-only network's leases have their IPv6 side alone.
        reach = self._route_args if self.config.enable_ipv4 else self._route_args6
        try:
            reach(lease)
        except Unreachable:
            return False
        return True

    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        if self._fastpath is None:
            return
        if not self.config.enable_ipv4:
            self._add_peer6(lease)
            return
        subnet = str(lease.subnet.network_address)
        try:
            extra = self._route_args(lease)
        except Unreachable as e:
            log.warning("peer %s at %s: %s; skipped", lease.subnet, lease.public_ip, e)
            self._fastpath.del_route(subnet)
            return
        self._fastpath.set_route(subnet, str(lease.public_ip), *extra)
        self._add_peer6(lease)
        latency.programmed(since)  # set_route has put it in the table the threads read

    def _add_peer6(self, lease: Lease) -> None:
        """Route the peer's IPv6 subnet (if it has one and we run dual stack), or forget the
        one it had."""
        assert self._fastpath is not None
        old = self._v6_subnets.pop(lease.ident, None)
        if old is not None and old != lease.ipv6_subnet:
            self._fastpath.del_route6(str(old.network_address))
        if (lease.ipv6_subnet is None or not self._v6_on
                or lease.ipv6_subnet.prefixlen != self.config.ipv6_subnet_len):
            return
        try:
            extra = self._route_args6(lease)
        except Unreachable as e:
            log.warning("peer %s at %s: %s; its IPv6 subnet skipped", lease.ipv6_subnet,
                        lease.public_ipv6 or lease.public_ip, e)
            return
        peer = lease.public_ipv6 if lease.public_ipv6 is not None else lease.public_ip
        if not lease.has_ipv4 and lease.public_ipv6 is None:
            log.warning("peer %s: no PublicIPv6 in its lease; skipped", lease.ipv6_subnet)
            return
        self._fastpath.set_route6(str(lease.ipv6_subnet.network_address), str(peer), *extra)
        self._v6_subnets[lease.ident] = lease.ipv6_subnet

    def remove_peer(self, subnet: IPv4Network | IPv6Network, since: float | None = None) -> None:
        if self._fastpath is not None:
            if isinstance(subnet, IPv4Network):
                self._fastpath.del_route(str(subnet.network_address))
            old = self._v6_subnets.pop(subnet, None)
            if old is not None:
                self._fastpath.del_route6(str(old.network_address))
            latency.programmed(since)

    def stats(self) -> dict[str, Any]:
        return {"counters": self.counters(), "lease": self._lease_stats()}

    def peer_stats(self, ident: IPv4Network | IPv6Network) -> dict[str, Any] | None:
        if self._fastpath is None:
            return None
        subnet6 = self._v6_subnets.get(ident)
        found6 = (self._fastpath.route6(str(subnet6.network_address))
                  if subnet6 is not None and self._v6_on else None)
        row6 = ip6 = None
        if found6 is not None:
            ip6, mac6, row6 = found6
            if mac6 is not None:
                row6["vtep_mac"] = format_mac(mac6)
        if isinstance(ident, IPv6Network):  # an IPv6-only network: the IPv6 side is the row
            return row6
        found = self._fastpath.route(str(ident.network_address))
        if found is None:
            return None
        _ip, mac, counters = found
        if mac is not None:
            counters["vtep_mac"] = format_mac(mac)
        # A peer's IPv6 subnet shows under its lease (the IPv4 subnet's row), as "ipv6".
        if row6 is not None:
            counters["ipv6"] = {"subnet": str(subnet6), "peer": ip6, **row6}
        return counters

    def route_count(self) -> int:
        if self._fastpath is None:
            return 0
        return self._fastpath.route_count() if self.config.enable_ipv4 else len(self._v6_subnets)

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
        if self._more_queues:  # --queues: what each queue carried
            counters["queues"] = self._fastpath.queue_counters()
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
        for tun, sock, sock6 in self._more_queues:
            tun.close()
            sock.close()
            if sock6 is not None:
                sock6.close()
        self._more_queues = []
        if self._tun is not None:
            # Closing the last fd of a non-persistent TUN removes it and every route through it.
            self._tun.close()
            self._tun = None
        for sock in [self._sock, *self._senders, self._sock6, *self._senders6]:
            if sock is not None:
                sock.close()
        self._sock = None
        self._senders = []
        self._sock6 = None
        self._senders6 = []
        self._v6_subnets = {}
        self._v6_on = False
