"""Leases as plain data: flannel's key names and value JSON, and the choice of a subnet.

The one place that parses and writes lease values, for every store. Pure: no I/O.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from flannel_udp.config import NetworkConfig

LEASE_TTL = 24 * 3600.0  # seconds, as flannel
MAX_CANDIDATES = 100  # flannel picks at random among the first 100 free subnets


class LeaseValueError(ValueError):
    """A lease value that is not flannel lease JSON."""


@dataclass(frozen=True)
class Lease:
    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str = ""  # flannel's UDP backend publishes none
    backend_data: bytes | None = None  # raw JSON, kept byte for byte
    expiration: float | None = None  # unix time; None for a reservation that never expires
    # Dual stack: the lease's IPv6 subnet (in its key after '&'), the node's IPv6 underlay
    # address (PublicIPv6) and the v6 backend's data (BackendV6Data, raw JSON kept byte for
    # byte). All None for a v4-only lease.
    ipv6_subnet: IPv6Network | None = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: bytes | None = None

    @property
    def backend(self) -> str:
        """The backend this lease's node runs (a lease without BackendType is flannel's udp)."""
        return self.backend_type or "udp"


def subnet_key(subnet: IPv4Network) -> str:
    """10.5.52.0/24 -> '10.5.52.0-24', the last element of flannel's lease key."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network | None:
    """The inverse of subnet_key; None for a key that is not a lease."""
    name = key.rsplit("/", 1)[-1]
    addr, sep, length = name.rpartition("-")
    if not sep or not length.isdigit():
        return None
    try:
        return IPv4Network(f"{addr}/{length}")
    except ValueError:
        return None


def encode_lease_value(public_ip: IPv4Address, backend_type: str = "",
                       backend_data: bytes | None = None, *, v011: bool = False) -> bytes:
    """The value flannel writes: Go's json.Marshal of LeaseAttrs, field order included.

    `v011`: as flannel v0.11 writes it on etcd's v2 keyspace, whose LeaseAttrs has no
    PublicIPv6 and whose vxlan BackendData has no VNI (every node takes the config's)."""
    parts = [f'"PublicIP":{json.dumps(str(public_ip))}']
    if not v011:
        parts.append('"PublicIPv6":null')
    if backend_type:
        parts.append(f'"BackendType":{json.dumps(backend_type)}')
    if backend_data is not None and backend_data not in (b"", b"null"):
        if v011 and backend_type == "vxlan":
            backend_data = VxlanLeaseData(None, VxlanLeaseData.decode(backend_data).vtep_mac
                                          ).encode()
        parts.append(f'"BackendData":{backend_data.decode()}')
    return ("{" + ",".join(parts) + "}").encode()


def decode_lease(subnet: IPv4Network, value: bytes,
                 expiration: float | None = None) -> Lease:
    """Parse a lease value as flannel writes it; LeaseValueError when it is not one."""
    try:
        attrs = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise LeaseValueError(f"not JSON ({e})") from None
    if not isinstance(attrs, dict):
        raise LeaseValueError("not a JSON object")
    attrs = {k.lower(): v for k, v in attrs.items()}
    try:
        if not isinstance(attrs.get("publicip"), str):
            raise TypeError
        public_ip = IPv4Address(attrs["publicip"])
    except (ValueError, TypeError):
        raise LeaseValueError(f"PublicIP {attrs.get('publicip')!r} is not IPv4") from None
    backend_type = attrs.get("backendtype") or ""
    if not isinstance(backend_type, str):
        raise LeaseValueError(f"BackendType {backend_type!r} is not a string")
    data = attrs.get("backenddata")
    backend_data = None if data is None else json.dumps(data, separators=(",", ":")).encode()
    return Lease(subnet, public_ip, backend_type, backend_data, expiration)


_MAC = re.compile(r"[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}")


def parse_mac(text: object) -> bytes:
    """A 6-byte MAC from "c6:d2:32:6f:8f:44" (or with "-"), as Go's net.ParseMAC reads it;
    LeaseValueError for anything else."""
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        raise LeaseValueError(f"{json.dumps(text)} is not a MAC address")
    return bytes.fromhex(text.replace(text[2], ""))


def format_mac(mac: bytes) -> str:
    """"c6:d2:32:6f:8f:44", as Go's net.HardwareAddr.String() writes it."""
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class VxlanLeaseData:
    """The BackendData of a vxlan lease (flannel's vxlanLeaseAttrs): the node's VNI and the MAC
    of its VXLAN endpoint, to which inner Ethernet frames must be addressed. flannel v0.11
    writes no VNI (`vni` None): its nodes all use the config's VNI."""

    vni: int | None
    vtep_mac: bytes  # 6 bytes

    def encode(self) -> bytes:
        """Go's json.Marshal of vxlanLeaseAttrs, field order included (v0.11's without a VNI)."""
        mac = f'"VtepMAC":"{format_mac(self.vtep_mac)}"'
        return ("{" + (mac if self.vni is None else f'"VNI":{self.vni},{mac}') + "}").encode()

    @classmethod
    def decode(cls, data: bytes | None) -> VxlanLeaseData:
        """Parse a vxlan lease's BackendData; LeaseValueError naming what is wrong."""
        try:
            attrs = json.loads(data) if data is not None else None
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseValueError(f"BackendData is not JSON ({e})") from None
        if not isinstance(attrs, dict):
            raise LeaseValueError("BackendData is not a JSON object")
        attrs = {k.lower(): v for k, v in attrs.items()}  # Go's json matches names so
        vni = attrs.get("vni")  # absent in flannel v0.11's leases
        if "vni" in attrs and (isinstance(vni, bool) or not isinstance(vni, int)):
            raise LeaseValueError(f"VNI {json.dumps(vni)} is not an integer")
        try:
            mac = parse_mac(attrs.get("vtepmac"))
        except LeaseValueError as e:
            raise LeaseValueError(f"VtepMAC {e}") from None
        return cls(vni, mac)


def subnet_is_free(subnet: IPv4Network, leases: Iterable[Lease]) -> bool:
    return all(not lease.subnet.overlaps(subnet) for lease in leases)


def own_lease(config: NetworkConfig, leases: Iterable[Lease],
              public_ip: IPv4Address) -> Lease | None:
    """An existing lease of ours (by PublicIP) that still fits the config: flannel reuses it."""
    for lease in leases:
        if lease.public_ip == public_ip and config.contains_subnet(lease.subnet):
            return lease
    return None


def free_candidates(config: NetworkConfig, leases: Iterable[Lease],
                    limit: int = MAX_CANDIDATES) -> list[IPv4Network]:
    """The first `limit` free subnets from SubnetMin up, in order."""
    taken = sorted(int(lease.subnet.network_address) for lease in leases
                   if lease.subnet.overlaps(config.network))
    taken_set = set(taken)
    step = config.subnet_step()
    found: list[IPv4Network] = []
    addr = int(config.subnet_min)
    while addr <= int(config.subnet_max) and len(found) < limit:
        if addr not in taken_set:
            found.append(IPv4Network((addr, config.subnet_len)))
        addr += step
    return found


def choose_new_subnet(config: NetworkConfig, leases: list[Lease],
                      preferred: IPv4Network | None,
                      rng: random.Random | None = None) -> IPv4Network | None:
    """The subnet to try to create: the preferred one (old subnet.env) if it is free and fits,
    else one at random among the first free ones; None when the network is full."""
    if (preferred is not None and config.contains_subnet(preferred)
            and subnet_is_free(preferred, leases)):
        return preferred
    candidates = [c for c in free_candidates(config, leases) if subnet_is_free(c, leases)]
    if not candidates:
        return None
    return (rng or random).choice(candidates)
