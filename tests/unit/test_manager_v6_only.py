"""IPv6-only networks (EnableIPv4 false), on a real embedded store: leases under flannel's key
for them ('0.0.0.0-0&<v6>-<len>', MakeSubnetKey of an empty IP4Net) with PublicIP 0.0.0.0, as
flanneld writes them; our own found by PublicIPv6; the peer table keyed by the IPv6 subnet."""

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from flannel_udp.config import NO_IPV4, NO_PUBLIC_IP, parse_config
from flannel_udp.lease import (
    Lease,
    VxlanLeaseData,
    encode_lease_value,
    lease_from_record,
    lease_key,
    parse_lease_key,
)
from flannel_udp.manager import LeaseManager
from flannel_udp.stores.local import LocalStore

V6ONLY = parse_config('{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd99::/56",'
                      '"Backend":{"Type":"host-gw"}}')
ME6, OTHER6, THIRD6 = IPv6Address("fd77::2"), IPv6Address("fd77::3"), IPv6Address("fd77::4")


def manager(store, ip6=ME6, config=V6ONLY):
    return LeaseManager(store, config, NO_PUBLIC_IP, "host-gw", None, renew_margin=60.0,
                        ttl=3600.0, public_ipv6=ip6)


def peer_value(ip6):
    return encode_lease_value(NO_PUBLIC_IP, "host-gw", public_ipv6=ip6)


def test_v6_only_key_and_value_are_flanneds_byte_for_byte():
    v6 = IPv6Network("fd99:0:0:25::/64")
    lease = Lease(NO_IPV4, NO_PUBLIC_IP, "vxlan", VxlanLeaseData(1, bytes(6)).encode(),
                  ipv6_subnet=v6, public_ipv6=OTHER6,
                  backend_v6_data=VxlanLeaseData(1, bytes.fromhex("663c4e3e2d52")).encode())
    assert lease_key(lease) == "0.0.0.0-0&fd99:0:0:25::-64"
    assert parse_lease_key("/coreos.com/network/subnets/0.0.0.0-0&fd99:0:0:25::-64") == (
        IPv4Network("0.0.0.0/0"), v6)
    # flanneld's vxlan leaves BackendData out without its IPv4 device, and PublicIP empty
    assert encode_lease_value(NO_PUBLIC_IP, "vxlan", None, public_ipv6=OTHER6,
                              backend_v6_data=lease.backend_v6_data) == (
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd77::3","BackendType":"vxlan",'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"66:3c:4e:3e:2d:52"}}')
    assert peer_value(OTHER6) == (
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd77::3","BackendType":"host-gw"}')
    decoded = lease_from_record("0.0.0.0-0&fd99:0:0:25::-64", peer_value(OTHER6))
    assert not decoded.has_ipv4 and decoded.ident == v6 and decoded.public_ipv6 == OTHER6


def test_a_v6_only_lease_is_taken_under_flanneds_key_and_reused_on_restart(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        first = await manager(store).acquire(None, IPv6Network("fd99:0:0:25::/64"))
        again = await manager(store).acquire(None, None)
        return first, again, (await store.list_leases()).records

    first, again, records = asyncio.run(scenario())
    assert first.ipv6_subnet == IPv6Network("fd99:0:0:25::/64") and not first.has_ipv4
    assert again.ipv6_subnet == first.ipv6_subnet
    assert [(r.key, r.value) for r in records] == [(
        "0.0.0.0-0&fd99:0:0:25::-64",
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd77::2","BackendType":"host-gw"}')]


def test_v6_only_nodes_each_get_their_own_subnet_and_are_told_apart_by_public_ipv6(tmp_path):
    # Every node's PublicIP is 0.0.0.0: matching by it would hand one node another's lease.
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease("0.0.0.0-0&fd99:0:0:25::-64", peer_value(OTHER6), 60)
        m = manager(store)
        lease = await m.acquire(None, IPv6Network("fd99:0:0:25::/64"))
        third = await manager(store, THIRD6).acquire(None, None)
        return lease, third, await m.load_peers(), m

    lease, third, peers, m = asyncio.run(scenario())
    assert lease.ipv6_subnet != IPv6Network("fd99:0:0:25::/64")
    assert V6ONLY.contains_ipv6_subnet(lease.ipv6_subnet)
    assert len({lease.ipv6_subnet, third.ipv6_subnet, IPv6Network("fd99:0:0:25::/64")}) == 3
    assert sorted(str(p.ipv6_subnet) for p in peers) == sorted(
        ["fd99:0:0:25::/64", str(third.ipv6_subnet)])
    assert set(m.peers) == {IPv6Network("fd99:0:0:25::/64"), third.ipv6_subnet}
    assert m.holds_lease


def test_v4_and_dual_stack_leases_are_not_peers_of_a_v6_only_network(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease("10.99.15.0-24", encode_lease_value(
            IPv4Address("192.168.77.3"), "host-gw"), 60)
        await store.create_lease("10.99.16.0-24&fd99:0:0:26::-64", encode_lease_value(
            IPv4Address("192.168.77.4"), "host-gw", public_ipv6=THIRD6), 60)
        await store.create_lease("0.0.0.0-0&fd98:0:0:1::-64", peer_value(OTHER6), 60)
        m = manager(store)
        await m.acquire(None, None)
        return await m.load_peers()

    assert asyncio.run(scenario()) == []


def test_v6_only_peers_come_and_go_by_their_ipv6_subnet(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        m = manager(store)
        await m.acquire(None, IPv6Network("fd99:0:0:26::/64"))
        await m.load_peers()
        added, removed = [], []

        async def lost():
            pass

        task = asyncio.create_task(m.watch(lambda lease, _at: added.append(lease),
                                              lambda ident, _at: removed.append(ident), lost))
        for n, ip6 in ((0x25, OTHER6), (0x27, THIRD6)):
            await store.create_lease(f"0.0.0.0-0&fd99:0:0:{n:x}::-64", peer_value(ip6), 60)
        deadline = time.monotonic() + 10
        while len(added) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await store.delete_lease("0.0.0.0-0&fd99:0:0:25::-64")
        while not removed and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        return added, removed, m.peers

    added, removed, peers = asyncio.run(scenario())
    assert [lease.public_ipv6 for lease in added] == [OTHER6, THIRD6]
    assert removed == [IPv6Network("fd99:0:0:25::/64")]
    assert list(peers) == [IPv6Network("fd99:0:0:27::/64")]

