"""The lease manager on a real embedded store: flannel's acquisition order, renewal, and the
peer table following the store."""

import asyncio
import time
from ipaddress import IPv4Address, IPv4Network

from flannel_udp.config import parse_config
from flannel_udp.lease import encode_lease_value
from flannel_udp.manager import LeaseManager
from flannel_udp.stores.local import LocalStore

CFG = parse_config('{"Network": "10.5.0.0/16"}')
ME = IPv4Address("192.168.0.10")
OTHER = IPv4Address("192.168.0.11")


def manager(store, ip=ME, ttl=3600.0, margin=60.0):
    return LeaseManager(store, CFG, ip, "", None, renew_margin=margin, ttl=ttl)


def test_own_lease_is_reused_before_the_old_subnet_file(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.create_lease("10.5.33.0-24", encode_lease_value(ME), 60)
        lease = await manager(store).acquire(IPv4Network("10.5.44.0/24"))
        records = (await store.list_leases()).records
        return lease, records

    lease, records = asyncio.run(scenario())
    assert lease.subnet == IPv4Network("10.5.33.0/24")
    assert [r.key for r in records] == ["10.5.33.0-24"]
    assert records[0].expiration > time.time() + 3000  # refreshed with the manager's TTL


def test_on_etcds_v2_keyspace_the_lease_is_written_as_flannel_v011_writes_it(tmp_path):
    class V2Keyspace(LocalStore):  # the lease format follows the keyspace, whatever the store
        keyspace = "etcd v2"

    async def scenario(store):
        await LeaseManager(store, CFG, ME, "host-gw", None, renew_margin=60.0).acquire(None)
        return (await store.list_leases()).records[0].value

    assert asyncio.run(scenario(V2Keyspace(tmp_path / "v2"))) == \
        b'{"PublicIP":"192.168.0.10","BackendType":"host-gw"}'
    assert asyncio.run(scenario(LocalStore(tmp_path / "embedded"))) == \
        b'{"PublicIP":"192.168.0.10","PublicIPv6":null,"BackendType":"host-gw"}'


def test_old_subnet_is_taken_when_free_else_another(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        first = await manager(store).acquire(IPv4Network("10.5.44.0/24"))
        second = await manager(store, OTHER).acquire(IPv4Network("10.5.44.0/24"))
        return first, second

    first, second = asyncio.run(scenario())
    assert first.subnet == IPv4Network("10.5.44.0/24")
    assert second.subnet != first.subnet and CFG.contains_subnet(second.subnet)


def test_renewal_happens_at_the_margin(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        m = manager(store, ttl=1.0, margin=0.7)
        lease = await m.acquire(None)
        task = asyncio.create_task(m.renew_forever())
        deadline = time.monotonic() + 10
        # Wait for the renewal itself, then past the first expiry: only there if renewed.
        while (records := (await store.list_leases()).records) and \
                records[0].expiration <= lease.expiration and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(max(0.0, lease.expiration - time.time() + 0.1))
        task.cancel()
        return lease, (await store.list_leases()).records

    lease, records = asyncio.run(scenario())
    assert [r.key for r in records] == [f"{lease.subnet.network_address}-24"]
    assert records[0].expiration > lease.expiration


def test_peer_table_follows_the_store_and_skips_bad_values(tmp_path, caplog):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        m = manager(store)
        await m.acquire(None)
        await store.create_lease("10.5.200.0-24", b"not json", 60)
        await store.create_lease("10.5.201.0-24", encode_lease_value(IPv4Address("192.168.0.5")),
                                 60)
        assert [str(p.subnet) for p in await m.load_peers()] == ["10.5.201.0/24"]
        added, removed = [], []

        async def lost():
            pass

        task = asyncio.create_task(m.watch(lambda lease, _at: added.append(lease),
                                              lambda ident, _at: removed.append(ident), lost))
        await store.create_lease("10.5.202.0-24", encode_lease_value(IPv4Address("192.168.0.6")),
                                 60)
        await store.delete_lease("10.5.201.0-24")
        deadline = time.monotonic() + 10
        while not (added and removed) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a second event (there must be none) would come by now
        task.cancel()
        return added, removed, m

    added, removed, m = asyncio.run(scenario())
    assert [str(lease.subnet) for lease in added] == ["10.5.202.0/24"]
    assert removed == [IPv4Network("10.5.201.0/24")]
    assert set(m.peers) == {IPv4Network("10.5.202.0/24")}
    assert "10.5.200.0-24" in caplog.text  # the bad value is named in a warning


def test_leases_of_another_length_than_subnetlen_are_skipped_naming_the_key(tmp_path, caplog):
    # A /25 inside a peer's /24 or a /16 over the whole Network would overlap other leases;
    # neither may become a route.
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        m = manager(store)
        await m.acquire(None)
        for key in ("10.5.201.128-25", "10.5.0.0-16", "10.5.202.0-23"):
            await store.create_lease(key, encode_lease_value(OTHER), 60)
        await store.create_lease("10.5.203.0-24", encode_lease_value(OTHER), 60)
        return await m.load_peers()

    peers = asyncio.run(scenario())
    assert [str(p.subnet) for p in peers] == ["10.5.203.0/24"]
    for key in ("10.5.201.128-25", "10.5.0.0-16", "10.5.202.0-23"):
        assert f"skipping lease {key}: not a /24 subnet" in caplog.text


def test_a_reservation_is_never_renewed_and_its_renewal_task_does_not_end(tmp_path):
    # The daemon stops when one of its tasks ends: a renewal that returned on a reservation
    # stopped the node that held one.
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        await store.put_lease("10.5.33.0-24", encode_lease_value(ME), None)
        m = manager(store, ttl=1.0, margin=0.7)
        lease = await m.acquire(None)
        task = asyncio.create_task(m.renew_forever())
        await asyncio.sleep(1.5)  # past a 1 s lease's renewal and expiry
        ended = task.done()
        task.cancel()
        return lease, ended, (await store.list_leases()).records

    lease, ended, records = asyncio.run(scenario())
    assert lease.subnet == IPv4Network("10.5.33.0/24") and lease.expiration is None
    assert not ended
    assert [(r.key, r.expiration) for r in records] == [("10.5.33.0-24", None)]


def test_our_lease_made_a_reservation_while_we_run_is_not_renewed_back(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path / "leases")
        m = manager(store, ttl=1.5, margin=1.0)
        lease = await m.acquire(None)
        await m.load_peers()
        key = f"{lease.subnet.network_address}-24"
        watch = asyncio.create_task(m.watch(lambda lease, at: None, lambda subnet, at: None,
                                            lambda: asyncio.sleep(0)))
        renew = asyncio.create_task(m.renew_forever())
        await store.put_lease(key, encode_lease_value(ME), None)  # `leases reserve`, by hand
        await asyncio.sleep(2.0)  # past the renewal a 1.5 s lease would have had
        watch.cancel()
        renew.cancel()
        return m.lease, (await store.list_leases()).records

    lease, records = asyncio.run(scenario())
    assert lease.expiration is None
    assert [r.expiration for r in records] == [None]
