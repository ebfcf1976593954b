"""flanneld's vxlan backend imitated with `ip`: the kernel VXLAN device and entries flanneld
would program on a host, the reference flannel-udp interoperates with (tests) and is measured
against (bench). With an IPv6 subnet it also gets flanneld's dual-stack device, `flannel-v6.<VNI>`
on the IPv6 underlay."""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Protocol

from flannel_udp.lab.topology import UNDERLAY_MTU


class CommandHost(Protocol):
    """Where the commands run: a lab `Host` from outside, or the namespace itself from inside
    (the flanneld v0.11 stand-in, `flannel_udp.lab.flanneld011`)."""

    underlay_ip: str
    underlay_ipv6: str | None

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess: ...


class KernelVxlanNode:
    """A host's kernel VXLAN device programmed exactly as flanneld's vxlan backend programs it:
    `flannel.<VNI>` with `nolearning`, MTU = underlay - 50, the lease's network address /32,
    and per remote lease a permanent neighbour entry, a permanent FDB entry and an onlink route.
    The reference that flannel-udp must interoperate with (tests) and be measured against
    (bench). `lease_value()` is the lease flanneld would write for it.

    With `ipv6_subnet` (dual stack, flanneld's EnableIPv6) a second device `flannel-v6.<VNI>`
    as flanneld makes it: local = the host's IPv6 underlay address, its own MAC (`mac6`), the
    kernel's MTU for an IPv6 underlay (underlay - 70), `<ipv6 subnet>/128`; remote dual-stack
    leases get the same three entries over IPv6 (`add_peer6`)."""

    def __init__(self, host: CommandHost, subnet: str, *, vni: int = 1, port: int = 8472,
                 mac: str | None = None, underlay_dev: str = "eth0",
                 udp_csum: bool | None = None, mtu: int = UNDERLAY_MTU - 50,
                 ipv6_subnet: str | None = None) -> None:
        """`udp_csum` True/False: `udpcsum`/`noudpcsum` on the device (UDP checksums set or
        zero in the frames it sends); None leaves the kernel's default (set).

        The underlay keeps its offloads as they come: over a veth the frames reach the next
        namespace with inner checksums partial and as 64 KB GSO frames, as from nodes that are
        containers on one machine. `mtu`: the device's, flanneld's underlay MTU - 50."""
        self.host = host
        self.subnet = ipaddress.IPv4Network(subnet)
        self.vni = vni
        self.port = port
        self.dev = f"flannel.{vni}"
        # locally administered, unicast, derived from the host so that it is stable
        self.mac = mac or "0e:fa:" + ":".join(
            f"{b:02x}" for b in ipaddress.IPv4Address(host.underlay_ip).packed)
        csum = [] if udp_csum is None else ["udpcsum" if udp_csum else "noudpcsum"]
        host.run("ip", "link", "add", self.dev, "type", "vxlan", "id", str(vni),
                 "local", host.underlay_ip, "dev", underlay_dev, "dstport", str(port),
                 "nolearning", *csum)
        host.run("ip", "link", "set", self.dev, "address", self.mac, "mtu", str(mtu))
        host.run("ip", "addr", "add", f"{self.subnet.network_address}/32", "dev", self.dev)
        host.run("ip", "link", "set", self.dev, "up")
        self.ipv6_subnet = ipaddress.IPv6Network(ipv6_subnet) if ipv6_subnet else None
        self.dev6 = f"flannel-v6.{vni}"
        self.mac6: str | None = None
        if self.ipv6_subnet is not None:
            if host.underlay_ipv6 is None:
                raise ValueError(f"{self.dev6} needs an IPv6 underlay address on the host")
            # flanneld gives its two devices two random MACs; this one is derived, stable.
            self.mac6 = "0e:f6:" + ":".join(
                f"{b:02x}" for b in ipaddress.IPv4Address(host.underlay_ip).packed)
            # No MTU given: the kernel's for an IPv6 underlay, as flanneld leaves it.
            host.run("ip", "link", "add", self.dev6, "type", "vxlan", "id", str(vni),
                     "local", host.underlay_ipv6, "dev", underlay_dev, "dstport", str(port),
                     "nolearning", *csum)
            host.run("ip", "link", "set", self.dev6, "address", self.mac6)
            host.run("sysctl", "-qw", f"net/ipv6/conf/{self.dev6}/accept_ra=0")  # dots in the name
            host.run("ip", "-6", "addr", "add", f"{self.ipv6_subnet.network_address}/128",
                     "dev", self.dev6, "nodad")
            host.run("ip", "link", "set", self.dev6, "up")

    def lease_value(self) -> bytes:
        """The lease JSON flanneld writes for this node, byte for byte."""
        if self.ipv6_subnet is None:
            return (f'{{"PublicIP":"{self.host.underlay_ip}","PublicIPv6":null,'
                    f'"BackendType":"vxlan","BackendData":{{"VNI":{self.vni},'
                    f'"VtepMAC":"{self.mac}"}}}}').encode()
        return (f'{{"PublicIP":"{self.host.underlay_ip}",'
                f'"PublicIPv6":"{self.host.underlay_ipv6}","BackendType":"vxlan",'
                f'"BackendData":{{"VNI":{self.vni},"VtepMAC":"{self.mac}"}},'
                f'"BackendV6Data":{{"VNI":{self.vni},"VtepMAC":"{self.mac6}"}}}}').encode()

    def lease_key(self) -> str:
        """The lease's key under `<prefix>/subnets/`, flanneld's (`10.99.15.0-24&fd99:0:0:25::-64`
        in dual stack)."""
        key = f"{self.subnet.network_address}-{self.subnet.prefixlen}"
        if self.ipv6_subnet is not None:
            key += f"&{self.ipv6_subnet.network_address}-{self.ipv6_subnet.prefixlen}"
        return key

    def add_peer6(self, subnet: str, public_ipv6: str, vtep_mac: str) -> None:
        """What flanneld does on flannel-v6.<VNI> when a remote dual-stack lease appears."""
        net = ipaddress.IPv6Network(subnet)
        gateway = str(net.network_address)
        self.host.run("ip", "-6", "neigh", "replace", gateway, "lladdr", vtep_mac, "dev",
                      self.dev6, "nud", "permanent")
        self.host.run("bridge", "fdb", "replace", vtep_mac, "dev", self.dev6, "dst",
                      public_ipv6, "self", "permanent")
        self.host.run("ip", "-6", "route", "replace", str(net), "via", gateway, "dev",
                      self.dev6, "onlink")

    def remove_peer6(self, subnet: str, vtep_mac: str) -> None:
        """What flanneld does on flannel-v6.<VNI> when a remote dual-stack lease goes away."""
        net = ipaddress.IPv6Network(subnet)
        for argv in (("ip", "-6", "route", "del", str(net)),
                     ("ip", "-6", "neigh", "del", str(net.network_address), "dev", self.dev6),
                     ("bridge", "fdb", "del", vtep_mac, "dev", self.dev6, "self")):
            self.host.run(*argv, check=False)

    def add_peer(self, subnet: str, public_ip: str, vtep_mac: str) -> None:
        """What flanneld does when a remote vxlan lease appears."""
        net = ipaddress.IPv4Network(subnet)
        gateway = str(net.network_address)
        self.host.run("ip", "neigh", "replace", gateway, "lladdr", vtep_mac, "dev", self.dev,
                      "nud", "permanent")
        self.host.run("bridge", "fdb", "replace", vtep_mac, "dev", self.dev, "dst", public_ip,
                      "self", "permanent")
        self.host.run("ip", "route", "replace", str(net), "via", gateway, "dev", self.dev,
                      "onlink")

    def remove_peer(self, subnet: str, vtep_mac: str) -> None:
        """What flanneld does when a remote vxlan lease goes away."""
        net = ipaddress.IPv4Network(subnet)
        for argv in (("ip", "route", "del", str(net)),
                     ("ip", "neigh", "del", str(net.network_address), "dev", self.dev),
                     ("bridge", "fdb", "del", vtep_mac, "dev", self.dev, "self")):
            self.host.run(*argv, check=False)

    def remove(self) -> None:
        """Delete the device (its neighbours, FDB entries and routes go with it), e.g. to free
        its UDP port for the next dataplane on the same host."""
        self.host.run("ip", "link", "del", self.dev, check=False)
        if self.ipv6_subnet is not None:
            self.host.run("ip", "link", "del", self.dev6, check=False)

