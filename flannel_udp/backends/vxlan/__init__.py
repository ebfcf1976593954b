"""flannel's vxlan backend, on one of three dataplanes (`Backend.Dataplane`): `kernel`, a VXLAN
device programmed as flanneld programs it (`kernel`); `userspace`, the fast path behind a TUN
(`userspace`); `auto`, the default, the kernel's where it can be made and userspace otherwise
(`auto`). `options` reads and checks the backend's options, `peers` decides how a peer's lease
is taken; both dataplanes share them, so they publish the same lease and take the same peers.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

from flannel_udp.backends import DataplaneSettings, Network
from flannel_udp.config import NetworkConfig

if TYPE_CHECKING:
    from flannel_udp.netlink import ExtIface


def vxlan_network(config: NetworkConfig, ext: ExtIface, public_ip: IPv4Address,
                  settings: DataplaneSettings, public_ipv6: IPv6Address | None = None
                  ) -> Network:
    """The `Network` of the dataplane the config's `Backend.Dataplane` names; with
    `public_ipv6` (dual stack) the kernel one also makes flannel-v6.<VNI> on it, the userspace
    one sends IPv6 frames over it as flannel-v6.<VNI> does."""
    # Imported here: validating the options (`network set`) needs none of the dataplanes.
    from flannel_udp.backends.vxlan.auto import AutoVxlanNetwork
    from flannel_udp.backends.vxlan.kernel import KernelVxlanNetwork
    from flannel_udp.backends.vxlan.options import vxlan_options
    from flannel_udp.backends.vxlan.userspace import VxlanNetwork
    dataplane = vxlan_options(config).dataplane
    if dataplane == "userspace":
        return VxlanNetwork(config, ext, public_ip, settings, public_ipv6)
    if dataplane == "kernel":
        return KernelVxlanNetwork(config, ext, public_ip, public_ipv6)
    return AutoVxlanNetwork(KernelVxlanNetwork(config, ext, public_ip, public_ipv6),
                            VxlanNetwork(config, ext, public_ip, settings, public_ipv6))
