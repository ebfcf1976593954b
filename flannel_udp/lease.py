"""Leases as plain data: flannel's key names and value JSON, and the choice of a subnet.

The one place that parses and writes lease values, for every store. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from flannel_udp.config import NO_IPV4, NetworkConfig

LEASE_TTL = 24 * 3600.0  # seconds, as flannel
MAX_CANDIDATES = 100  # flannel picks at random among the first 100 free subnets


# An IPv6-only lease's key is '0.0.0.0-0&fd99:0:0:25::-64' (flannel's MakeSubnetKey of an empty
# IP4Net, NO_IPV4) and its PublicIP 0.0.0.0 (config.NO_PUBLIC_IP): flanneld leaves both unset.


class LeaseValueError(ValueError):
    """A lease value that is not flannel lease JSON."""


@dataclass(frozen=True, slots=True)
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
    def has_ipv4(self) -> bool:
        """False for an IPv6-only lease (its v4 part is flannel's empty 0.0.0.0/0)."""
        return self.subnet != NO_IPV4 or self.ipv6_subnet is None

    @property
    def ident(self) -> IPv4Network | IPv6Network:
        """What names this lease among the others of its network: its IPv4 subnet, or the IPv6
        one for an IPv6-only lease (the peer table and route plans are keyed by it)."""
        if self.has_ipv4 or self.ipv6_subnet is None:
            return self.subnet
        return self.ipv6_subnet

    @property
    def backend(self) -> str:
        """The backend this lease's node runs (a lease without BackendType is flannel's udp)."""
        return self.backend_type or "udp"


def subnet_key(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """10.5.52.0/24 -> '10.5.52.0-24', the last element of flannel's lease key; a dual-stack
    lease's key names both subnets: '10.99.15.0-24&fd99:0:0:25::-64' (flannel's MakeSubnetKey)."""
    key = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        key += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return key


def lease_key(lease: Lease) -> str:
    """The key `lease` lives under (both its subnets)."""
    return subnet_key(lease.subnet, lease.ipv6_subnet)


def _network(addr: str, length: str, kind: type[IPv4Network] | type[IPv6Network]
             ) -> IPv4Network | IPv6Network | None:
    if not length.isdigit():
        return None
    try:
        return kind(f"{addr}/{length}")  # strict: a key names a network address
    except ValueError:
        return None


def parse_lease_key(key: str) -> tuple[IPv4Network, IPv6Network | None] | None:
    """The subnets a lease key names: (v4, None) or, dual stack, (v4, v6); None for a key that
    is not a lease."""
    name = key.rsplit("/", 1)[-1]
    v4_part, amp, v6_part = name.partition("&")
    addr, sep, length = v4_part.rpartition("-")
    subnet = _network(addr, length, IPv4Network) if sep else None
    if not isinstance(subnet, IPv4Network):
        return None
    if not amp:
        return subnet, None
    addr6, sep6, length6 = v6_part.rpartition("-")
    ipv6_subnet = _network(addr6, length6, IPv6Network) if sep6 else None
    if not isinstance(ipv6_subnet, IPv6Network):
        return None
    return subnet, ipv6_subnet


def parse_subnet_key(key: str) -> IPv4Network | None:
    """The IPv4 subnet a lease key names (also of a dual-stack key); None for a key that is not
    a lease."""
    parsed = parse_lease_key(key)
    return None if parsed is None else parsed[0]


def encode_lease_value(public_ip: IPv4Address, backend_type: str = "",
                       backend_data: bytes | None = None, *, v011: bool = False,
                       public_ipv6: IPv6Address | None = None,
                       backend_v6_data: bytes | None = None) -> bytes:
    """The value flannel writes: Go's json.Marshal of LeaseAttrs, field order included
    (PublicIP, PublicIPv6, BackendType, BackendData, BackendV6Data; PublicIPv6 is null when
    unset, the others are left out when empty).

    `v011`: as flannel v0.11 writes it on etcd's v2 keyspace, whose LeaseAttrs has no
    PublicIPv6 and whose vxlan BackendData has no VNI (every node takes the config's)."""
    if v011 and (public_ipv6 is not None or backend_v6_data is not None):
        raise ValueError("flannel v0.11's leases have no IPv6")
    parts = [f'"PublicIP":{json.dumps(str(public_ip))}']
    if not v011:
        parts.append('"PublicIPv6":'
                     + ("null" if public_ipv6 is None else json.dumps(str(public_ipv6))))
    if backend_type:
        parts.append(f'"BackendType":{json.dumps(backend_type)}')
    if backend_data is not None and backend_data not in (b"", b"null"):
        if v011 and backend_type == "vxlan":
            backend_data = VxlanLeaseData(None, VxlanLeaseData.decode(backend_data).vtep_mac
                                          ).encode()
        parts.append(f'"BackendData":{backend_data.decode()}')
    if backend_v6_data is not None and backend_v6_data not in (b"", b"null"):
        parts.append(f'"BackendV6Data":{backend_v6_data.decode()}')
    return ("{" + ",".join(parts) + "}").encode()


def decode_lease(subnet: IPv4Network, value: bytes,
                 expiration: float | None = None,
                 ipv6_subnet: IPv6Network | None = None) -> Lease:
    """Parse a lease value as flannel writes it; LeaseValueError when it is not one.
    `ipv6_subnet`: the v6 subnet its key names (dual stack)."""
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
    public_ipv6 = None
    if attrs.get("publicipv6") is not None:
        try:
            if not isinstance(attrs["publicipv6"], str):
                raise TypeError
            public_ipv6 = IPv6Address(attrs["publicipv6"])
        except (ValueError, TypeError):
            raise LeaseValueError(f"PublicIPv6 {attrs['publicipv6']!r} is not IPv6") from None
    backend_type = attrs.get("backendtype") or ""
    if not isinstance(backend_type, str):
        raise LeaseValueError(f"BackendType {backend_type!r} is not a string")
    return Lease(subnet, public_ip, backend_type, _raw_json(attrs.get("backenddata")),
                 expiration, ipv6_subnet, public_ipv6, _raw_json(attrs.get("backendv6data")))


def _raw_json(data: object) -> bytes | None:
    return None if data is None else json.dumps(data, separators=(",", ":")).encode()


def lease_from_record(key: str, value: bytes, expiration: float | None = None) -> Lease:
    """A store record (key and value) as a Lease; LeaseValueError when either is not flannel's."""
    parsed = parse_lease_key(key)
    if parsed is None:
        raise LeaseValueError(f"key {key!r} is not a subnet key")
    return decode_lease(parsed[0], value, expiration, parsed[1])


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


Spans = tuple[list[int], list[int]]  # (first addresses, sorted; the highest last address so far)


def _spans(networks: Iterable[IPv4Network | IPv6Network]) -> Spans:
    """What `networks` cover, for overlap tests in O(log n) (a cluster holds 50,000 leases:
    testing each candidate against each lease would take minutes)."""
    starts, reach, top = [], [], -1
    for start, end in sorted((int(n.network_address), int(n.broadcast_address))
                             for n in networks):
        top = max(top, end)
        starts.append(start)
        reach.append(top)
    return starts, reach


def _is_free(spans: Spans, subnet: IPv4Network | IPv6Network) -> bool:
    starts, reach = spans
    below = bisect.bisect_right(starts, int(subnet.broadcast_address))
    return below == 0 or reach[below - 1] < int(subnet.network_address)


def _v4_spans(leases: Iterable[Lease]) -> Spans:
    return _spans(lease.subnet for lease in leases if lease.has_ipv4)


def _v6_spans(leases: Iterable[Lease]) -> Spans:
    return _spans(lease.ipv6_subnet for lease in leases if lease.ipv6_subnet is not None)


def subnet_is_free(subnet: IPv4Network, leases: Iterable[Lease]) -> bool:
    return _is_free(_v4_spans(leases), subnet)


def ipv6_subnet_is_free(subnet: IPv6Network, leases: Iterable[Lease]) -> bool:
    return _is_free(_v6_spans(leases), subnet)


def lease_fits(config: NetworkConfig, lease: Lease) -> bool:
    """Whether this config could have handed `lease` out: its v4 subnet, and a v6 subnet exactly
    when the config enables IPv6 (flannel's isSubnetConfigCompat and isIPv6SubnetConfigCompat)."""
    if not config.contains_subnet(lease.subnet):
        return False
    if not config.enable_ipv6:
        return lease.ipv6_subnet is None
    return lease.ipv6_subnet is not None and config.contains_ipv6_subnet(lease.ipv6_subnet)


def is_ours(config: NetworkConfig, lease: Lease, public_ip: IPv4Address,
            public_ipv6: IPv6Address | None = None) -> bool:
    """Whether `lease` is this node's: by PublicIP, as flannel; in an IPv6-only network by
    PublicIPv6 (every node's PublicIP is 0.0.0.0 there, flanneld's etcd manager's match by it
    would take another node's lease)."""
    if config.enable_ipv4:
        return lease.public_ip == public_ip
    return public_ipv6 is not None and lease.public_ipv6 == public_ipv6


def own_lease(config: NetworkConfig, leases: Iterable[Lease], public_ip: IPv4Address,
              public_ipv6: IPv6Address | None = None) -> Lease | None:
    """An existing lease of ours (is_ours) that still fits the config: flannel reuses it."""
    for lease in leases:
        if is_ours(config, lease, public_ip, public_ipv6) and lease_fits(config, lease):
            return lease
    return None


def stale_own_leases(config: NetworkConfig, leases: Iterable[Lease], public_ip: IPv4Address,
                     public_ipv6: IPv6Address | None = None) -> list[Lease]:
    """Leases of ours (is_ours) the config could not have handed out, e.g. a v4-only one
    once the network is dual stack: flannel deletes them and takes a lease anew. Reservations
    (no expiry) are an admin's and are left alone."""
    return [lease for lease in leases if is_ours(config, lease, public_ip, public_ipv6)
            and lease.expiration is not None and not lease_fits(config, lease)]


def _free_networks(first: int, last: int, step: int, prefixlen: int, taken: set[int],
                   kind: type[IPv4Network] | type[IPv6Network], limit: int) -> list:
    found: list = []
    addr = first
    while addr <= last and len(found) < limit:
        if addr not in taken:
            found.append(kind((addr, prefixlen)))
        addr += step
    return found


def free_candidates(config: NetworkConfig, leases: Iterable[Lease],
                    limit: int = MAX_CANDIDATES) -> list[IPv4Network]:
    """The first `limit` free subnets from SubnetMin up, in order."""
    taken = {int(lease.subnet.network_address) for lease in leases
             if lease.has_ipv4 and lease.subnet.overlaps(config.network)}
    return _free_networks(int(config.subnet_min), int(config.subnet_max), config.subnet_step(),
                          config.subnet_len, taken, IPv4Network, limit)


def free_ipv6_candidates(config: NetworkConfig, leases: Iterable[Lease],
                         limit: int = MAX_CANDIDATES) -> list[IPv6Network]:
    """The first `limit` free IPv6 subnets from IPv6SubnetMin up, in order."""
    assert config.ipv6_network is not None and config.ipv6_subnet_min is not None
    assert config.ipv6_subnet_max is not None
    network = config.ipv6_network
    taken = {int(lease.ipv6_subnet.network_address) for lease in leases
             if lease.ipv6_subnet is not None and lease.ipv6_subnet.overlaps(network)}
    return _free_networks(int(config.ipv6_subnet_min), int(config.ipv6_subnet_max),
                          config.ipv6_subnet_step(), config.ipv6_subnet_len, taken,
                          IPv6Network, limit)


def choose_new_subnet(config: NetworkConfig, leases: list[Lease],
                      preferred: IPv4Network | None,
                      rng: random.Random | None = None) -> IPv4Network | None:
    """The subnet to try to create: the preferred one (old subnet.env) if it is free and fits,
    else one at random among the first free ones; None when the network is full. An IPv6-only
    network's leases all have flannel's empty IPv4 subnet."""
    if not config.enable_ipv4:
        return NO_IPV4
    spans = _v4_spans(leases)
    if (preferred is not None and config.contains_subnet(preferred)
            and _is_free(spans, preferred)):
        return preferred
    candidates = [c for c in free_candidates(config, leases) if _is_free(spans, c)]
    if not candidates:
        return None
    return (rng or random).choice(candidates)


def choose_new_ipv6_subnet(config: NetworkConfig, leases: list[Lease],
                           preferred: IPv6Network | None,
                           rng: random.Random | None = None) -> IPv6Network | None:
    """As choose_new_subnet, in the IPv6Network (preferred: the old FLANNEL_IPV6_SUBNET)."""
    spans = _v6_spans(leases)
    if (preferred is not None and config.contains_ipv6_subnet(preferred)
            and _is_free(spans, preferred)):
        return preferred
    candidates = [c for c in free_ipv6_candidates(config, leases) if _is_free(spans, c)]
    if not candidates:
        return None
    return (rng or random).choice(candidates)
