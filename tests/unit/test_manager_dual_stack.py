"""The lease manager in a dual-stack network, on a real embedded store: one key holds both
subnets (taken atomically, both or neither), reused on restart, chosen from the old subnet.env;
v4-only leases of other nodes still count for v4."""

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flannel_udp.config import parse_config
from flannel_udp.errors import UserError
from flannel_udp.lease import encode_lease_value, lease_from_record
from flannel_udp.manager import LeaseManager
from flannel_udp.stores.local import LocalStore

DUAL = parse_config('{"EnableIPv6":true,"Network":"10.99.0.0/16","IPv6Network":"fd99::/56",'
                    '"Backend":{"Type":"host-gw"}}')
ME, ME6 = IPv4Address("192.168.77.2"), IPv6Address("fd77::2")
OTHER, OTHER6 = IPv4Address("192.168.77.3"), IPv6Address("fd77::3")


def manager(store, config=DUAL, ip=ME, ip6=ME6):
    return LeaseManager(store, config, ip, "host-gw", None, renew_margin=60.0, ttl=3600.0,
                        public_ipv6=ip6)


def test_a_dual_stack_lease_is_one_key_holding_both_subnets_as_flanneld_writes_it(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        lease = await manager(store).acquire(IPv4Network("10.99.15.0/24"),
                                             IPv6Network("fd99:0:0:25::/64"))
        return lease, (await store.list_leases()).records

    lease, records = asyncio.run(scenario())
    assert (lease.subnet, lease.ipv6_subnet) == (IPv4Network("10.99.15.0/24"),
                                                 IPv6Network("fd99:0:0:25::/64"))
    assert lease.public_ipv6 == ME6
    assert [(r.key, r.value) for r in records] == [(
        "10.99.15.0-24&fd99:0:0:25::-64",
        b'{"PublicIP":"192.168.77.2","PublicIPv6":"fd77::2","BackendType":"host-gw"}')]


def test_a_new_dual_stack_lease_gets_free_subnets_of_both_families(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        # a peer holds what we would have preferred, in both families
        await store.create_lease("10.99.15.0-24&fd99:0:0:25::-64",
                                 encode_lease_value(OTHER, "host-gw", public_ipv6=OTHER6), 60)
        return await manager(store).acquire(IPv4Network("10.99.15.0/24"),
                                            IPv6Network("fd99:0:0:25::/64"))

    lease = asyncio.run(scenario())
    assert lease.subnet != IPv4Network("10.99.15.0/24") and DUAL.contains_subnet(lease.subnet)
    assert lease.ipv6_subnet != IPv6Network("fd99:0:0:25::/64")
    assert DUAL.contains_ipv6_subnet(lease.ipv6_subnet)


def test_the_dual_stack_lease_is_reused_on_restart(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        first = await manager(store).acquire(None)
        again = await manager(store).acquire(IPv4Network("10.99.44.0/24"),
                                             IPv6Network("fd99:0:0:44::/64"))
        return first, again, (await store.list_leases()).records

    first, again, records = asyncio.run(scenario())
    assert (again.subnet, again.ipv6_subnet) == (first.subnet, first.ipv6_subnet)
    assert len(records) == 1 and records[0].expiration > time.time() + 3000


def test_no_free_ipv6_subnet_takes_nothing_not_even_the_v4_one(tmp_path):
    tiny = parse_config('{"EnableIPv6":true,"Network":"10.99.0.0/16","IPv6Network":"fd99::/62",'
                        '"IPv6SubnetMin":"fd99:0:0:1::","IPv6SubnetMax":"fd99:0:0:1::"}')

    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease("10.99.9.0-24&fd99:0:0:1::-64",
                                 encode_lease_value(OTHER, public_ipv6=OTHER6), 60)
        with pytest.raises(UserError) as err:
            await manager(store, tiny).acquire(None)
        return err.value, (await store.list_leases()).records

    err, records = asyncio.run(scenario())
    assert str(err).startswith("no free IPv6 subnet left in fd99::/62")
    assert [r.key for r in records] == ["10.99.9.0-24&fd99:0:0:1::-64"]  # nothing taken


def test_racing_nodes_each_get_their_own_pair_of_subnets(tmp_path):
    async def scenario():
        stores = [LocalStore(tmp_path / "leases") for _ in range(6)]
        managers = [manager(s, ip=IPv4Address(f"192.168.77.{10 + i}"),
                            ip6=IPv6Address(f"fd77::{10 + i:x}")) for i, s in enumerate(stores)]
        # each its own v4 subnet but all the same v6 one (an old subnet.env copied around):
        # the keys differ, so the store's atomic create alone would let all six have it
        pref6 = IPv6Network("fd99:0:0:25::/64")
        leases = await asyncio.gather(*(m.acquire(IPv4Network(f"10.99.{15 + i}.0/24"), pref6)
                                        for i, m in enumerate(managers)))
        return leases, (await stores[0].list_leases()).records

    leases, records = asyncio.run(scenario())
    assert len({lease.subnet for lease in leases}) == 6
    assert len({lease.ipv6_subnet for lease in leases}) == 6
    assert len(records) == 6
    held = {(r.key, lease_from_record(r.key, r.value).public_ipv6) for r in records}
    assert held == {(f"{lease.subnet.network_address}-24&{lease.ipv6_subnet.network_address}-64",
                     lease.public_ipv6) for lease in leases}


def test_our_v4_only_lease_is_replaced_by_a_dual_stack_one_keeping_its_v4_subnet(tmp_path):
    # flannel deletes a lease of ours that does not fit the config (isIPv6SubnetConfigCompat)
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease("10.99.33.0-24", encode_lease_value(ME, "host-gw"), 60)
        lease = await manager(store).acquire(None)
        return lease, [r.key for r in (await store.list_leases()).records]

    lease, keys = asyncio.run(scenario())
    assert lease.subnet == IPv4Network("10.99.33.0/24") and lease.ipv6_subnet is not None
    assert keys == [f"10.99.33.0-24&{lease.ipv6_subnet.network_address}-64"]


def test_v4_only_peers_count_for_v4_in_a_dual_stack_network(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease("10.99.15.0-24", encode_lease_value(OTHER, "host-gw"), 60)
        m = manager(store)
        lease = await m.acquire(IPv4Network("10.99.15.0/24"))
        return lease, await m.load_peers()

    lease, peers = asyncio.run(scenario())
    assert lease.subnet != IPv4Network("10.99.15.0/24")  # held by the v4-only peer
    assert [(str(p.subnet), p.ipv6_subnet) for p in peers] == [("10.99.15.0/24", None)]


def test_a_peer_moving_to_a_dual_stack_key_is_not_removed_by_its_old_keys_deletion(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        m = manager(store)
        # Subnets of our own, so that the peer's (10.99.15.0/24, fd99:0:0:25::/64) are free.
        await m.acquire(IPv4Network("10.99.16.0/24"), IPv6Network("fd99:0:0:26::/64"))
        await store.create_lease("10.99.15.0-24", encode_lease_value(OTHER, "host-gw"), 60)
        await m.load_peers()
        added, removed = [], []

        async def lost():
            pass

        task = asyncio.create_task(m.watch(lambda lease, _at: added.append(lease),
                                              lambda ident, _at: removed.append(ident), lost))
        await store.create_lease("10.99.15.0-24&fd99:0:0:25::-64",
                                 encode_lease_value(OTHER, "host-gw", public_ipv6=OTHER6), 60)
        deadline = time.monotonic() + 10
        while not added and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await store.delete_lease("10.99.15.0-24")  # after the new key, as etcd would say it
        await asyncio.sleep(0.5)  # the deletion's event comes by now
        task.cancel()
        return added, removed, m.peers

    added, removed, peers = asyncio.run(scenario())
    assert [lease.ipv6_subnet for lease in added] == [IPv6Network("fd99:0:0:25::/64")]
    assert removed == []
    assert peers[IPv4Network("10.99.15.0/24")].lease.ipv6_subnet is not None


def test_enable_ipv6_is_refused_on_etcds_v2_keyspace(tmp_path):
    class V2Keyspace(LocalStore):
        keyspace = "etcd v2"

    with pytest.raises(UserError) as err:
        manager(V2Keyspace(tmp_path / "v2"))
    assert str(err.value).startswith("EnableIPv6: flannel v0.11's etcd v2 keyspace has no IPv6")


def test_our_lease_under_a_key_written_by_hand_in_another_form_is_reused_under_that_key(
        tmp_path):
    key = "10.99.33.0-24&fd99:0000:0000:0033:0:0:0:0-64"  # not the canonical fd99:0:0:33::
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease(key, encode_lease_value(ME, "host-gw", public_ipv6=ME6), 60)
        m = manager(store)
        lease = await m.acquire(None)
        m.lease = m._lease(lease.subnet, lease.ipv6_subnet, time.time())  # due now
        renewal = asyncio.create_task(m.renew_forever())
        await asyncio.sleep(0.3)
        renewal.cancel()
        return lease, (await store.list_leases()).records

    lease, records = asyncio.run(scenario())
    assert lease.ipv6_subnet == IPv6Network("fd99:0:0:33::/64")
    assert [r.key for r in records] == [key]
    assert records[0].expiration > time.time() + 3000  # renewed with the manager's TTL
