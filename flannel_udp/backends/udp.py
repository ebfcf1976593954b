"""flannel's UDP backend: TUN `flannel0`, the raw IPv4 packet as UDP payload, port 8285 both ends.

Python sets the devices up and keeps the route table current; the packets never leave C
(`flannel_udp._fastpath`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

import pytun

from flannel_udp import netlink
from flannel_udp.config import NetworkConfig, backend_port
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease
from flannel_udp.netlink import ExtIface

log = logging.getLogger("flannel-udp")

TUN_NAME = "flannel0"
DEFAULT_PORT = 8285
OVERHEAD = 28  # outer IPv4 + UDP header
SOCKET_BUFFER = 8 << 20  # bursts of batched sends overflow the default buffers


def open_tun(name: str) -> pytun.TunTapDevice:
    """A non-persistent TUN (it vanishes with its routes when the fd closes), non-blocking."""
    try:
        tun = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
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
        raise UserError(f"cannot create TUN {name}: {e}") from None
    flags = fcntl.fcntl(tun.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(tun.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return tun


def open_udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:  # not root: ask within the sysctl limits instead
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"UDP port {port} is already in use (another flanneld or "
                            "flannel-udp? Backend.Port sets another)") from None
        raise UserError(f"cannot bind UDP port {port}: {e.strerror}") from None
    return sock


class UdpNetwork:
    backend_type = ""  # flannel's UDP leases carry no BackendType
    backend_data = None

    def __init__(self, config: NetworkConfig, ext: ExtIface) -> None:
        self.config = config
        self.ext = ext
        self.port = backend_port(config, DEFAULT_PORT)
        self.mtu = ext.mtu - OVERHEAD
        self._tun: pytun.TunTapDevice | None = None
        self._sock: socket.socket | None = None
        self._fastpath: Any = None

    def open(self) -> None:
        from flannel_udp._fastpath import FastPath  # noqa: F401  fail early if not built
        self._sock = open_udp_socket(self.port)
        self._tun = open_tun(TUN_NAME)

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        from flannel_udp._fastpath import FastPath
        assert self._tun is not None and self._sock is not None
        tun_addr = IPv4Interface((lease.subnet.network_address, 32))
        netlink.configure_tun(TUN_NAME, tun_addr, self.mtu, [self.config.network])
        self._fastpath = FastPath(self._tun.fileno(), self._sock.fileno(), self.port,
                                  str(lease.subnet.network_address), self.config.subnet_len)
        for peer in peers:
            self.add_peer(peer)
        self._fastpath.start()
        log.info("udp backend: %s %s mtu %d, UDP port %d on %s", TUN_NAME, tun_addr, self.mtu,
                 self.port, self.ext.name)

    def accepts(self, lease: Lease) -> bool:
        return lease.backend == "udp"

    def add_peer(self, lease: Lease) -> None:
        if self._fastpath is None:
            return
        if not self.accepts(lease):
            log.warning("peer %s runs backend %s, which the udp backend cannot reach; skipped",
                        lease.subnet, lease.backend)
            self._fastpath.del_route(str(lease.subnet.network_address))
            return
        self._fastpath.set_route(str(lease.subnet.network_address), str(lease.public_ip))

    def remove_peer(self, subnet: IPv4Network) -> None:
        if self._fastpath is not None:
            self._fastpath.del_route(str(subnet.network_address))

    def stats(self) -> dict[str, Any]:
        if self._fastpath is None:
            return {"counters": {}, "peers": {}}
        peers = {f"{subnet}/{self.config.subnet_len}": counters
                 for subnet, _ip, counters in self._fastpath.routes()}
        counters = self._fastpath.counters()
        # Packets the kernel could not queue to the TUN never reach the fast path to be counted.
        queue_drops = netlink.tx_dropped(TUN_NAME)
        if queue_drops is not None:
            counters["drops"]["tun_queue_full"] = queue_drops
        return {"counters": counters, "peers": peers}

    def close(self) -> None:
        if self._fastpath is not None:
            self._fastpath.stop()
            self._fastpath = None
        if self._tun is not None:
            # Closing the last fd of a non-persistent TUN removes it and every route through it.
            self._tun.close()
            self._tun = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
