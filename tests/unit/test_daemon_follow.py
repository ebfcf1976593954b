"""The daemon following a store that fails: it keeps going, and once the store answers again it
applies what changed meanwhile, its own lease included. A real embedded store behind a switch
that makes it fail, and a backend fake that records routes (no devices)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network

from flannel_udp import daemon as daemon_module
from flannel_udp.config import parse_config
from flannel_udp.daemon import Daemon, RunOptions
from flannel_udp.lease import Lease, encode_lease_value
from flannel_udp.manager import LeaseManager
from flannel_udp.netlink import IfaceChoice
from flannel_udp.stores import LeaseEvent, Snapshot, StoreUnavailable, every_key, no_key
from flannel_udp.stores.local import LocalStore

CFG = parse_config('{"Network": "10.5.0.0/16"}')
ME = IPv4Address("192.168.0.10")


class SwitchedStore(LocalStore):
    """The embedded store, unreachable while `down` is set (as etcd can be)."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("test: the store is down")

    async def list_leases(self, expiry_of=every_key) -> Snapshot:
        self._check()
        return await super().list_leases(expiry_of)

    async def create_lease(self, key: str, value: bytes, ttl: float) -> float | None:
        self._check()
        return await super().create_lease(key, value, ttl)

    async def watch(self, since: Snapshot, expiry_of=no_key) -> AsyncIterator[list[LeaseEvent]]:
        async for batch in super().watch(since, expiry_of):
            self._check()
            yield batch


class RecordingNetwork:
    """The backend interface, keeping routes in a dict."""

    backend_type = ""
    backend_data = None
    mtu = 1472

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, IPv4Address] = {}

    def add_peer(self, lease: Lease, since: float | None = None) -> None:
        self.routes[lease.subnet] = lease.public_ip

    def remove_peer(self, subnet: IPv4Network, since: float | None = None) -> None:
        self.routes.pop(subnet, None)


async def until(predicate, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_after_a_store_outage_the_daemon_applies_the_changes_and_retakes_its_lease(
        tmp_path, monkeypatch):
    monkeypatch.setattr(daemon_module, "WATCH_RETRY", 0.05)
    store = SwitchedStore(tmp_path / "leases")
    other = LocalStore(tmp_path / "leases")  # everyone else, writing while we cannot read
    subnet_file = tmp_path / "subnet.env"

    async def scenario():
        daemon = Daemon(RunOptions(store=store, store_name="test store", iface=IfaceChoice(),
                                   public_ip=ME, subnet_file=str(subnet_file),
                                   renew_margin_minutes=60, net_config_path=None,
                                   control_socket=str(tmp_path / "sock")))
        daemon.config, daemon.network = CFG, (network := RecordingNetwork())
        daemon.manager = manager = LeaseManager(store, CFG, ME, "", None, renew_margin=3600)
        mine = await manager.acquire(None)
        await other.create_lease("10.5.201.0-24", encode_lease_value(IPv4Address("10.0.0.1")), 60)
        for peer in await manager.load_peers():  # as the backend's start() takes them
            network.add_peer(peer)
        follow = asyncio.create_task(daemon._follow())

        store.down = True
        await other.delete_lease(f"{mine.subnet.network_address}-24")
        await other.delete_lease("10.5.201.0-24")
        await other.create_lease("10.5.202.0-24", encode_lease_value(IPv4Address("10.0.0.2")), 60)
        await until(lambda: daemon.store_errors >= 3)  # the watch broke, then resyncs failed
        assert not follow.done(), follow
        assert set(network.routes) == {IPv4Network("10.5.201.0/24")}  # the last known table
        store.down = False
        await until(lambda: set(network.routes) == {IPv4Network("10.5.202.0/24")})
        await until(lambda: subnet_file.exists())
        await other.create_lease("10.5.203.0-24", encode_lease_value(IPv4Address("10.0.0.3")), 60)
        await until(lambda: IPv4Network("10.5.203.0/24") in network.routes)
        follow.cancel()
        return mine, (await other.list_leases()).records

    mine, records = asyncio.run(scenario())
    ours = f"{mine.subnet.network_address}-24"
    assert {r.key: r.value for r in records}[ours] == encode_lease_value(ME)
    assert f"FLANNEL_SUBNET={mine.subnet.network_address + 1}/24" in subnet_file.read_text()
