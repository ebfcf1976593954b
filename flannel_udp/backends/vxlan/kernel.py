"""The vxlan backend's kernel dataplane: a kernel VXLAN device programmed exactly as flanneld
programs it, over netlink.

The device is `flannel.<VNI>`: nolearning, local = our public IP, on the underlay, dstport =
Backend.Port, MTU = underlay - 50, our stable VtepMAC, the lease's network address /32. Each
remote vxlan lease gets a permanent neighbour entry (its network address -> its VtepMAC), a
permanent FDB entry (its VtepMAC -> its PublicIP) and a route `<subnet> via <network address>
onlink`, all removed when the lease goes. Unlike flanneld, which keeps the device, SIGTERM
deletes it, as the other backends remove their devices.
"""

from __future__ import annotations

import errno
import logging
import socket
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from flannel_udp import netlink
from flannel_udp.backends import Network, UserspaceDataplane
from flannel_udp.backends.peerroutes import PeerRoutes, Plan
from flannel_udp.backends.vxlan.options import vxlan_settings
from flannel_udp.backends.vxlan.peers import plan_vxlan_peer
from flannel_udp.config import NetworkConfig
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, format_mac
from flannel_udp.netlink import ExtIface, FdbEntry, KernelEntry, Neighbour, Route

log = logging.getLogger("flannel-udp")

DEVICE_PREFIX = "flannel."  # + VNI, as flanneld


class KernelVxlanUnavailable(UserError):
    """The kernel VXLAN device can't be made here; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=1)


def claim_device(name: str) -> socket.socket:
    """A claim on device `name` for as long as this process holds the socket: an abstract unix
    socket named after it, which lives in the network namespace, as the device does, and goes
    with the process. A VXLAN device whose claim is free was left behind by a run that ended;
    one whose claim is taken belongs to a running daemon: UserError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(f"\0flannel-udp device {name}")
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"VXLAN device {name} is in use by another running flannel-udp in "
                            "this network namespace (one daemon per namespace)") from None
        raise UserError(f"cannot claim VXLAN device {name}: {e.strerror}", exit_code=1) from None
    return sock


class KernelVxlanNetwork(Network):
    """The vxlan backend's `Network` on a kernel VXLAN device; entries kept by `PeerRoutes`."""

    backend_type = "vxlan"

    def __init__(self, config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address) -> None:
        self.config = config
        self.ext = ext
        self.public_ip = public_ip
        self.settings = vxlan_settings(config, ext, public_ip)
        self.mtu = self.settings.mtu
        self.backend_data = self.settings.backend_data
        self.device = f"{DEVICE_PREFIX}{self.settings.vni}"
        self._index = 0
        self._routes: PeerRoutes | None = None
        self._claim: socket.socket | None = None

    def open(self) -> None:
        """Create the device; KernelVxlanUnavailable when the kernel won't, UserError when a
        running daemon has it."""
        self._claim = claim_device(self.device)
        try:
            self._create_device()
        except BaseException:
            self.close()
            raise

    def _create_device(self) -> None:
        kind = netlink.link_kind(self.device)
        if kind == "vxlan":  # a flanneld's or a killed run's: programmed by someone else
            log.info("removing the VXLAN device %s left behind", self.device)
            netlink.delete_link(self.device)
        elif kind is not None:
            raise KernelVxlanUnavailable(
                f"cannot create VXLAN device {self.device}: a {kind or 'plain'} device of "
                f"that name exists (remove it, or set Backend.Dataplane \"userspace\")")
        s = self.settings
        try:
            self._index = netlink.create_vxlan(self.device, s.vni, self.public_ip,
                                               self.ext.index, s.port, s.vtep_mac, self.mtu)
        except OSError as e:
            raise KernelVxlanUnavailable(
                f"cannot create VXLAN device {self.device} (VNI {s.vni}, port {s.port} on "
                f"{self.ext.name}): {e.strerror}") from None

    def start(self, lease: Lease, peers: list[Lease]) -> None:
        netlink.add_address(self.device, IPv4Interface((lease.subnet.network_address, 32)))
        self._routes = PeerRoutes(self._plan)
        self._routes.start(peers)
        log.info("vxlan backend, kernel dataplane: %s VNI %d, VtepMAC %s, mtu %d, UDP port %d "
                 "on %s", self.device, self.settings.vni, format_mac(self.settings.vtep_mac),
                 self.mtu, self.settings.port, self.ext.name)

    def _plan(self, lease: Lease) -> Plan:
        return plan_vxlan_peer(lease, self.settings, self._encapsulate)

    def _encapsulate(self, lease: Lease, mac: bytes) -> tuple[KernelEntry, ...]:
        """flanneld's three entries for a remote vxlan lease, in its order."""
        gateway = lease.subnet.network_address
        return (Neighbour(gateway, mac, self._index),
                FdbEntry(mac, lease.public_ip, self._index),
                Route(lease.subnet, gateway, self._index, onlink=True))

    def accepts(self, lease: Lease) -> bool:
        plan = self._routes.plan(lease.subnet) if self._routes is not None else None
        return plan.reachable if plan is not None else lease.backend == "vxlan"

    def add_peer(self, lease: Lease) -> None:
        if self._routes is not None:
            self._routes.set_peer(lease)

    def remove_peer(self, subnet: IPv4Network) -> None:
        if self._routes is not None:
            self._routes.remove_peer(subnet)

    def stats(self) -> dict[str, Any]:
        plans = self._routes.plans if self._routes is not None else {}
        return {"counters": netlink.link_counters(self.device),
                "peers": {str(subnet): {"path": plan.path, **plan.shown}
                          for subnet, plan in plans.items()},
                "lease": {"vni": self.settings.vni,
                          "vtep_mac": format_mac(self.settings.vtep_mac),
                          "dataplane": "kernel", "device": self.device,
                          "direct_routing": self.settings.direct_routing}}

    def userspace(self) -> UserspaceDataplane | None:
        return None  # the kernel forwards

    def close(self) -> None:
        if self._routes is not None:
            self._routes.close()
            self._routes = None
        if self._index:
            netlink.delete_link(self.device)  # its neighbours, FDB entries and routes go too
            self._index = 0
        if self._claim is not None:
            self._claim.close()
            self._claim = None
