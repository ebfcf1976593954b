"""The vxlan backend's options (flannel's `VNI`, `Port`, `MTU`, `DirectRouting`, and
flannel-udp's `Dataplane`), validated for `network set` and every start, and what a node derives
from them: its VNI, port, pods' MTU and VtepMAC, the same on both dataplanes. No I/O but a
warning logged for an MTU above the underlay's."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

from flannel_udp.config import (
    MIN_IPV4_MTU,
    ConfigError,
    NetworkConfig,
    backend_port,
    int_field,
)
from flannel_udp.errors import UserError
from flannel_udp.lease import VxlanLeaseData

if TYPE_CHECKING:
    from flannel_udp.netlink import ExtIface

log = logging.getLogger("flannel-udp")

VXLAN_DEFAULT_PORT = 8472  # Linux's default and flannel's (IANA's is 4789)
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
VXLAN_V6_OVERHEAD = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14
VNI_MAX = (1 << 24) - 1
# "auto" (the default) takes the kernel's VXLAN device when it can be created and the userspace
# one otherwise.
DATAPLANES = ("auto", "userspace", "kernel")


@dataclass(frozen=True)
class VxlanOptions:
    """The vxlan backend's options: flannel's VNI, Port and MTU, and flannel-udp's Dataplane."""

    vni: int
    port: int
    mtu: int | None  # of the underlay, as flannel's option; None: the interface's
    dataplane: str
    direct_routing: bool = False


def vxlan_options(config: NetworkConfig) -> VxlanOptions:
    """`Backend.VNI`, `Port`, `MTU`, `DirectRouting` and `Dataplane` of a vxlan config,
    validated, with flannel's defaults (VNI 1, port 8472, the interface's MTU, no direct
    routing) and flannel-udp's (Dataplane "auto")."""
    backend = config.backend
    vni = int_field(backend, "VNI", "Backend.VNI")
    if vni is None:
        vni = 1
    elif not 1 <= vni <= VNI_MAX:
        raise ConfigError(f"Backend.VNI: {vni} is out of range (1..{VNI_MAX})")
    mtu = int_field(backend, "MTU", "Backend.MTU") or None  # 0 means the default, as flannel
    smallest = MIN_IPV4_MTU + VXLAN_OVERHEAD
    if mtu is not None and mtu < smallest:
        raise ConfigError(f"Backend.MTU: {mtu} is too small: pods get MTU - {VXLAN_OVERHEAD} "
                          f"and IPv4 needs {MIN_IPV4_MTU}, so at least {smallest}")
    if mtu is not None and mtu > 65535:
        raise ConfigError(f"Backend.MTU: {mtu} is out of range (at most 65535)")
    dataplane = backend.get("Dataplane", DATAPLANES[0])
    if not isinstance(dataplane, str) or dataplane.lower() not in DATAPLANES:
        raise ConfigError(f"Backend.Dataplane: {json.dumps(dataplane)} is not one of "
                          + ", ".join(json.dumps(d) for d in DATAPLANES))
    direct_routing = backend.get("DirectRouting", False)
    if not isinstance(direct_routing, bool):
        raise ConfigError(f"Backend.DirectRouting: expected true or false, got "
                          f"{json.dumps(direct_routing)}")
    return VxlanOptions(vni=vni, port=backend_port(config, VXLAN_DEFAULT_PORT), mtu=mtu,
                        dataplane=dataplane.lower(), direct_routing=direct_routing)


def vtep_mac_for(public_ip: IPv4Address | IPv6Address, vni: int) -> bytes:
    """Our VtepMAC: stable for a node (hash of public IP and VNI), unicast, locally
    administered, so it can't clash with a vendor-assigned MAC. The IPv6 device's, from the
    PublicIPv6, differs from the IPv4 one's, as flanneld's two devices' MACs do."""
    digest = hashlib.sha256(f"flannel-udp vtep {public_ip} {vni}".encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


@dataclass(frozen=True)
class VxlanSettings:
    """What both dataplanes derive from the config, the underlay and the public IP."""

    vni: int
    port: int
    mtu: int  # of the pods: underlay - 50
    vtep_mac: bytes
    direct_routing: bool
    # The IPv6 device's (flannel-v6.<VNI>), with an IPv6 underlay; None without one.
    v6_vtep_mac: bytes | None = None
    v6_device_mtu: int = 0  # underlay - 70

    @property
    def backend_data(self) -> bytes:
        return VxlanLeaseData(self.vni, self.vtep_mac).encode()

    @property
    def backend_v6_data(self) -> bytes | None:
        """BackendV6Data, flanneld's: the same VNI, the IPv6 device's VtepMAC."""
        if self.v6_vtep_mac is None:
            return None
        return VxlanLeaseData(self.vni, self.v6_vtep_mac).encode()


def vxlan_settings(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
                   public_ipv6: IPv6Address | None = None) -> VxlanSettings:
    """The vxlan options applied to this node; UserError for an underlay too small.
    `public_ipv6`: the IPv6 underlay's address, for the IPv6 device (None: no IPv6)."""
    options = vxlan_options(config)
    underlay_mtu = options.mtu or ext.mtu
    if options.mtu and options.mtu > ext.mtu:
        log.warning("Backend.MTU %d is above %s's MTU %d: large frames will not get "
                    "through", options.mtu, ext.name, ext.mtu)
    mtu = underlay_mtu - VXLAN_OVERHEAD
    if mtu < MIN_IPV4_MTU:
        raise UserError(f"{ext.name}'s MTU {ext.mtu} is too small for VXLAN: pods would get "
                        f"{mtu}, IPv4 needs {MIN_IPV4_MTU}")
    return VxlanSettings(options.vni, options.port, mtu, vtep_mac_for(public_ip, options.vni),
                         options.direct_routing,
                         None if public_ipv6 is None else vtep_mac_for(public_ipv6, options.vni),
                         underlay_mtu - VXLAN_V6_OVERHEAD)
