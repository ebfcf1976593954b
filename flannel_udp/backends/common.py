"""What the TUN backends (udp, vxlan) share: the TUN holding the lease's network address with a
route for the whole Network, UDP sockets, and a native fast path whose route table follows the
lease events. A subclass says which sockets it needs and how a peer's lease becomes a route.

Python sets the devices up and keeps the route table current; the packets never leave C
(`flannel_udp._fastpath`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from dataclasses import asdict, dataclass
from ipaddress import IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Any

import pytun

from flannel_udp import netlink
from flannel_udp.backends import DataplaneSettings, Network, UserspaceDataplane
from flannel_udp.config import NetworkConfig
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, format_mac
from flannel_udp.netlink import ExtIface

if TYPE_CHECKING:  # imported when opened: the module works unbuilt until then
    from flannel_udp._fastpath import FastPath

log = logging.getLogger("flannel-udp")

SOCKET_BUFFER = 8 << 20  # bursts of batched sends overflow the default buffers
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; root may exceed the sysctls

# Offloads (see _fastpath): FLANNEL_UDP_OFFLOADS=0 turns them all off.
OFFLOADS_ENV = "FLANNEL_UDP_OFFLOADS"
TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454D0, 0x400454D8  # <linux/if_tun.h>
TUNGETIFF = 0x800454D2  # EBADFD once the TUN is deleted under the fd
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
IFREQ_SIZE = 40  # struct ifreq
VNET_HDR_LEN = 10  # struct virtio_net_hdr
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # <linux/udp.h>
# What TUNSETOFFLOAD is offered, best first; EINVAL refuses a set. TSO6 is harmless: the fast
# path drops IPv6 anyway. USO4/6 only count together.
TUN_OFFLOAD_SETS = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM | TUN_F_TSO4,
    TUN_F_CSUM,
)


@dataclass
class Offloads:
    """Which kernel offloads a TUN backend got (each probed by trying it)."""

    tun_vnet_hdr: bool = False  # IFF_VNET_HDR: a virtio_net_hdr before each TUN packet
    tso: bool = False  # the TUN hands us TCP super-packets (TUN_F_TSO4)
    uso: bool = False  # ... and UDP ones (TUN_F_USO4|USO6)
    udp_gso: bool = False  # UDP_SEGMENT sends
    udp_gro: bool = False  # UDP_GRO receives


def offloads_wanted() -> bool:
    return os.environ.get(OFFLOADS_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def enable_tun_offloads(tun: pytun.TunTapDevice, offloads: Offloads) -> None:
    """Set the virtio header size and the best offload set the kernel accepts on a TUN opened
    with IFF_VNET_HDR; records what it got in `offloads`."""
    fcntl.ioctl(tun.fileno(), TUNSETVNETHDRSZ, VNET_HDR_LEN.to_bytes(4, "little"))
    for flags in TUN_OFFLOAD_SETS:
        try:
            fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, flags)
        except OSError as e:
            if e.errno == errno.EINVAL:
                continue
            raise
        offloads.tso = bool(flags & TUN_F_TSO4)
        offloads.uso = bool(flags & TUN_F_USO4)
        return


class Unreachable(Exception):
    """A peer's lease this backend cannot forward to; the message says why."""


def open_tun(name: str, vnet_hdr: bool = False) -> pytun.TunTapDevice:
    """A non-persistent TUN (it vanishes with its routes when the fd closes), non-blocking;
    with `vnet_hdr`, IFF_VNET_HDR (pytun.Error EINVAL if the kernel refuses it)."""
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
    try:
        tun = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else None
        if code in (errno.EPERM, errno.EACCES):
            raise UserError(f"no permission to create TUN {name} on /dev/net/tun "
                            "(run as root or with CAP_NET_ADMIN)") from None
        if code == errno.EBUSY:
            raise UserError(f"TUN {name} is in use: is another flannel-udp or flanneld running "
                            "in this network namespace?") from None
        if code == errno.ENOENT:
            raise UserError("/dev/net/tun is missing (load the tun module or mount the "
                            "device into the container)") from None
        if code == errno.EINVAL and vnet_hdr:
            raise
        raise UserError(f"cannot create TUN {name}: {e}") from None
    flags = fcntl.fcntl(tun.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(tun.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return tun


def _tun_attached(tun: pytun.TunTapDevice) -> bool:
    """Whether the TUN behind `tun`'s fd still exists: deleted (`ip link del`) under a running
    fast path, it takes no packet in or out while the fd stays open."""
    try:
        fcntl.ioctl(tun.fileno(), TUNGETIFF, bytes(IFREQ_SIZE))
    except OSError:
        return False
    return True


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:  # not root: ask within the sysctl limits instead
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp_socket(port: int) -> socket.socket:
    """The UDP socket bound to the backend's port on every address: it receives from peers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKET_BUFFER)
    _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"UDP port {port} is already in use (another flanneld or "
                            "flannel-udp? Backend.Port sets another)") from None
        raise UserError(f"cannot bind UDP port {port}: {e.strerror}") from None
    return sock


def open_send_sockets(count: int) -> list[socket.socket]:
    """`count` UDP sockets on ports the kernel picks from its ephemeral range, for sending
    only: the source port of a datagram is its socket's."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.bind(("0.0.0.0", 0))
    except OSError as e:
        for sock in socks:
            sock.close()
        raise UserError(f"cannot open UDP sockets to send from: {e.strerror}") from None
    return socks


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
            self._open_tun_with_offloads()
        except BaseException:
            self.close()
            raise

    def _open_tun_with_offloads(self) -> None:
        """Open the TUN and probe every offload unless FLANNEL_UDP_OFFLOADS=0; log the result."""
        assert self._sock is not None
        if not offloads_wanted():
            self._tun = open_tun(self.tun_name)
            log.info("offloads off (%s=0)", OFFLOADS_ENV)
            return
        off = self.offloads_probed
        off.udp_gro = _try_setsockopt(self._sock, SOL_UDP, UDP_GRO, 1)
        # Size 0 = "only when a cmsg asks": a probe that changes nothing.
        off.udp_gso = all(_try_setsockopt(sock, SOL_UDP, UDP_SEGMENT, 0)
                          for sock in self._senders or [self._sock])
        try:
            self._tun = open_tun(self.tun_name, vnet_hdr=True)
            off.tun_vnet_hdr = True
        except pytun.Error:
            self._tun = open_tun(self.tun_name)
        if off.tun_vnet_hdr:
            enable_tun_offloads(self._tun, off)
        log.info("offloads: %s", ", ".join(f"{name} {'on' if on else 'off'}"
                                           for name, on in asdict(off).items()))

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
                and self._tun is not None and _tun_attached(self._tun))

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
