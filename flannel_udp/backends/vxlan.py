"""flannel's vxlan backend in userspace: RFC 7348 frames exactly as Linux's kernel VXLAN sends
and takes them, so flannel-udp nodes and flanneld's kernel vxlan nodes form one network.

The TUN is `flvx.<VNI>`, not flanneld's `flannel.<VNI>`: it is a TUN, not a VXLAN device, and a
leftover kernel device of that name must not be mistaken for it (nor block it). Our VtepMAC is
derived from the public IP and the VNI, so a restarted node keeps it and its peers' kernel
neighbour and FDB entries stay right.
"""

from __future__ import annotations

import hashlib
import logging
from ipaddress import IPv4Address
from typing import Any

from flannel_udp.backends.common import TunNetwork, Unreachable
from flannel_udp.config import (
    MIN_IPV4_MTU,
    VXLAN_OVERHEAD,
    NetworkConfig,
    vxlan_options,
)
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease, LeaseValueError, VxlanLeaseData, format_mac
from flannel_udp.netlink import ExtIface

log = logging.getLogger("flannel-udp")

TUN_PREFIX = "flvx."  # + VNI: at most 13 characters, within IFNAMSIZ for every VNI
# Sockets egress spreads flows over (each on its own ephemeral port): enough for a receiver's
# RSS to use several queues, few enough to cost nothing.
SEND_SOCKETS = 8


def vtep_mac_for(public_ip: IPv4Address, vni: int) -> bytes:
    """Our VtepMAC: stable for a node (hash of public IP and VNI), unicast, locally
    administered, so it can't clash with a vendor-assigned MAC."""
    digest = hashlib.sha256(f"flannel-udp vtep {public_ip} {vni}".encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


class VxlanNetwork(TunNetwork):
    """The vxlan backend's `Network`: the fast path in VXLAN mode, one route per vxlan peer."""

    backend_type = "vxlan"
    send_sockets = SEND_SOCKETS

    def __init__(self, config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address) -> None:
        super().__init__(config, ext)
        options = vxlan_options(config)
        self.vni = options.vni
        self.port = options.port
        underlay_mtu = options.mtu or ext.mtu
        if options.mtu and options.mtu > ext.mtu:
            log.warning("Backend.MTU %d is above %s's MTU %d: large frames will not get "
                        "through", options.mtu, ext.name, ext.mtu)
        self.mtu = underlay_mtu - VXLAN_OVERHEAD
        if self.mtu < MIN_IPV4_MTU:
            raise UserError(f"{ext.name}'s MTU {ext.mtu} is too small for VXLAN: pods would get "
                            f"{self.mtu}, IPv4 needs {MIN_IPV4_MTU}")
        if config.backend.get("DirectRouting"):
            log.warning("Backend.DirectRouting is not supported yet: every packet is "
                        "encapsulated")
        self.tun_name = f"{TUN_PREFIX}{self.vni}"
        self.vtep_mac = vtep_mac_for(public_ip, self.vni)
        self.backend_data = VxlanLeaseData(self.vni, self.vtep_mac).encode()

    def _fastpath_options(self) -> dict[str, Any]:
        return {"mode": "vxlan", "vni": self.vni, "vtep_mac": self.vtep_mac}

    def _route_args(self, lease: Lease) -> tuple[Any, ...]:
        # flannel's vxlan nodes ignore leases of other types; so do we.
        if lease.backend != "vxlan":
            raise Unreachable(f"runs backend {lease.backend}, not vxlan; ignored as flannel "
                              "does")
        try:
            data = VxlanLeaseData.decode(lease.backend_data)
        except LeaseValueError as e:
            raise Unreachable(f"malformed vxlan lease: {e}") from None
        if data.vni != self.vni:
            raise Unreachable(f"VNI {data.vni} is not ours ({self.vni})")
        return (data.vtep_mac,)

    def _lease_stats(self) -> dict[str, Any]:
        return {"vni": self.vni, "vtep_mac": format_mac(self.vtep_mac)}
