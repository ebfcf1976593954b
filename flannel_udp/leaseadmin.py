"""Leases by hand, for every store: what `flannel-udp leases list|delete|reserve` does.

flannel users read and delete leases with etcdctl, and make a reservation by putting a lease
key without TTL (flannel's Documentation/reservations.md); the embedded store has no such tool.
Keys and values are flannel's, written and read by `flannel_udp.lease` alone. The checks are
pure functions; the store work goes through the `Store` protocol only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

from flannel_udp.config import NetworkConfig, parse_config
from flannel_udp.errors import UserError
from flannel_udp.lease import (
    LEASE_TTL,
    Lease,
    LeaseValueError,
    encode_lease_value,
    lease_from_record,
    subnet_key,
)
from flannel_udp.stores import LeaseRecord, Store

RESERVE_ATTEMPTS = 5  # lost races (a host took the subnet between our look and our create)


@dataclass(frozen=True)
class Entry:
    """One key of the lease table as `leases list` shows it: its lease, or why it is none."""

    key: str
    lease: Lease | None
    problem: str | None = None  # set when `lease` is None

    def as_json(self) -> dict[str, Any]:
        if self.lease is None:
            return {"key": self.key, "error": self.problem}
        lease = self.lease
        data, data6 = lease.backend_data, lease.backend_v6_data
        v4 = lease.has_ipv4  # an IPv6-only lease has neither (flannel's 0.0.0.0/0, 0.0.0.0)
        return {"key": self.key, "subnet": str(lease.subnet) if v4 else None,
                "public_ip": str(lease.public_ip) if v4 else None, "backend": lease.backend,
                "backend_data": None if data is None else json.loads(data),
                "ipv6_subnet": None if lease.ipv6_subnet is None else str(lease.ipv6_subnet),
                "public_ipv6": None if lease.public_ipv6 is None else str(lease.public_ipv6),
                "backend_v6_data": None if data6 is None else json.loads(data6),
                "expires": self.lease.expiration,
                "reserved": self.lease.expiration is None}


def parse_subnet_arg(text: str, ipv6: bool = False) -> IPv4Network | IPv6Network:
    """A subnet as the user names it: 10.5.1.0/24 or flannel's key form 10.5.1.0-24; with
    `ipv6` also an IPv6 one (fd99:0:0:25::/64 or fd99:0:0:25::-64), an IPv6-only lease's."""
    name = text.strip()
    if "/" not in name:
        head, sep, tail = name.rpartition("-")
        name = f"{head}/{tail}" if sep else name
    if ipv6 and ":" in name:
        try:
            return IPv6Network(name)
        except ValueError:
            raise UserError(f"{text}: not an IPv6 subnet address (e.g. fd99:0:0:25::/64)"
                            ) from None
    try:
        return IPv4Network(name)
    except ValueError:
        try:
            loose = IPv4Network(name, strict=False)
        except ValueError:
            raise UserError(f"{text}: not a subnet (e.g. 10.244.3.0/24, or flannel's key "
                            "form 10.244.3.0-24)") from None
        raise UserError(f"{text}: not a subnet address (host bits set): did you mean "
                        f"{loose}?") from None


def entry(record: LeaseRecord) -> Entry:
    try:
        return Entry(record.key, lease_from_record(record.key, record.value, record.expiration))
    except LeaseValueError as e:
        problem = "not a subnet key" if str(e).startswith("key ") else str(e)
        return Entry(record.key, None, problem)


def sort_key(e: Entry) -> tuple[int, int, int, str]:
    if e.lease is None:
        return (1, 0, 0, e.key)
    ident = e.lease.ident  # an IPv6-only lease's IPv6 subnet, after the IPv4 ones
    return (0, ident.version, int(ident.network_address), e.key)


async def list_entries(store: Store) -> list[Entry]:
    snapshot = await store.list_leases()
    return sorted((entry(r) for r in snapshot.records), key=sort_key)


async def load_config(store: Store, store_name: str) -> NetworkConfig:
    raw = await store.get_config()
    if raw is None:
        raise UserError(f"no network config in {store_name}: a reservation is checked against "
                        "it; set one with `flannel-udp network set`", 1)
    return parse_config(raw)


async def delete(store: Store, store_name: str, subnet: IPv4Network | IPv6Network) -> Entry:
    """Delete the lease of `subnet` (a dual-stack lease by its IPv4 subnet, an IPv6-only one by
    its IPv6 subnet); UserError (exit 1) when there is none."""
    key = subnet_key(subnet) if isinstance(subnet, IPv4Network) else None
    entries = [entry(r) for r in (await store.list_leases()).records]
    found = next((e for e in entries if e.key == key), None) or next(
        (e for e in entries if e.lease is not None and e.lease.ident == subnet), None)
    if found is None:
        raise UserError(f"no lease for {subnet} in {store_name} (see `flannel-udp leases "
                        "list`)", 1)
    await store.delete_lease(found.key)
    return found


def check_reservation(config: NetworkConfig, subnet: IPv4Network, public_ip: IPv4Address,
                      backend: str | None, entries: list[Entry]) -> Lease | None:
    """Whether `subnet` may be reserved for `public_ip`: UserError (exit 1) naming why not.
    Returns the lease of that host already on the subnet (to turn into a reservation), or None
    when the subnet is free."""
    if not subnet.subnet_of(config.network):
        raise UserError(f"{subnet} is outside the Network {config.network}", 1)
    if subnet.prefixlen != config.subnet_len:
        raise UserError(f"{subnet} is not a /{config.subnet_len} subnet (the config's "
                        f"SubnetLen): a host gets one /{config.subnet_len} of "
                        f"{config.network}", 1)
    if not config.subnet_min <= subnet.network_address <= config.subnet_max:
        # flanneld drops a lease of its PublicIP outside this range and takes another
        raise UserError(f"{subnet} is outside SubnetMin {config.subnet_min} .. SubnetMax "
                        f"{config.subnet_max} of the config", 1)
    if backend is not None and backend != config.backend_type:
        raise UserError(f"--backend {backend}: the Network runs the {config.backend_type} "
                        "backend", 1)
    key = subnet_key(subnet)
    same: Lease | None = None
    for e in entries:
        lease = e.lease
        if lease is None:
            continue
        if e.key == key:
            if lease.public_ip != public_ip:
                raise UserError(f"{subnet} is held by another host, {lease.public_ip} "
                                f"({describe_expiry(lease)}): delete that lease first", 1)
            same = lease
        elif lease.subnet.overlaps(subnet):
            raise UserError(f"{subnet} overlaps the lease {lease.subnet} of "
                            f"{lease.public_ip}", 1)
        elif lease.public_ip == public_ip and config.contains_subnet(lease.subnet):
            # flanneld reuses the first lease of its PublicIP it finds: two would be a toss-up
            raise UserError(f"{public_ip} holds the lease {lease.subnet} already "
                            f"({describe_expiry(lease)}): delete it first (flannel-udp "
                            f"leases delete {lease.subnet})", 1)
    return same


async def reserve(store: Store, store_name: str, subnet: IPv4Network, public_ip: IPv4Address,
                  backend: str | None) -> tuple[str, Lease]:
    """Reserve `subnet` for the host `public_ip`: a lease key without TTL, as flannel's
    reservations. An existing lease of that host on the subnet becomes a reservation, its value
    kept byte for byte (flannel's etcdctl recipe); a free subnet is claimed atomically (created
    with a TTL, then made permanent), so that a host acquiring it meanwhile wins and we refuse.
    Returns what was done ('reserved', 'converted', 'unchanged') and the lease."""
    config = await load_config(store, store_name)
    if not config.enable_ipv4:
        raise UserError("leases reserve: not for an IPv6-only network yet (its leases are "
                        "0.0.0.0-0&<IPv6 subnet> keys with a PublicIPv6); put the key with "
                        "etcdctl", 1)
    if config.enable_ipv6:
        raise UserError("leases reserve: not for a dual-stack network yet (its leases need an "
                        "IPv6 subnet and PublicIPv6 too); put the key with etcdctl", 1)
    key = subnet_key(subnet)
    for _ in range(RESERVE_ATTEMPTS):
        snapshot = await store.list_leases()
        entries = [entry(r) for r in snapshot.records]
        held = check_reservation(config, subnet, public_ip, backend, entries)
        if held is not None:
            if held.expiration is None:
                return "unchanged", held
            value = next(r.value for r in snapshot.records if r.key == key)
            await store.put_lease(key, value, None)
            return "converted", Lease(held.subnet, held.public_ip, held.backend_type,
                                      held.backend_data, None)
        backend_type = "" if config.backend_type == "udp" else config.backend_type
        value = encode_lease_value(public_ip, backend_type, v011=store.keyspace == "etcd v2")
        if await store.create_lease(key, value, LEASE_TTL) is not None:
            await store.put_lease(key, value, None)
            return "reserved", Lease(subnet, public_ip, backend_type, None, None)
    raise UserError(f"{subnet}: the lease table kept changing under us; nothing reserved, "
                    "try again", 1)


def describe_expiry(lease: Lease, now: float | None = None) -> str:
    """'reserved' for a lease without TTL, else how long it has left, e.g. 'expires in 23h59m'."""
    if lease.expiration is None:
        return "reserved"
    left = int(lease.expiration - (time.time() if now is None else now))
    if left <= 0:
        return "expiring"
    hours, minutes = divmod(left // 60, 60)
    if hours:
        return f"expires in {hours}h{minutes:02d}m"
    return f"expires in {minutes}m{left % 60:02d}s"
