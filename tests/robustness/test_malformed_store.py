"""Malformed data in the lease store, end to end with live daemons: each bad lease is skipped
with a warning naming its key and the daemon goes on (at start and while following the table);
a bad network config ends a starting daemon with one line naming the field. In the embedded
store and in etcd's v3 and v2 keyspaces (etcd in the topology's switch namespace)."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import signal

import pytest
from helpers import lease_key, refused_run

from flannel_udp.lab import (
    DEFAULT_NETWORK_CONFIG,
    EtcdCluster,
    Topology,
    etcd_problem,
    wait_until,
)
from flannel_udp.lease import LEASE_TTL
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

GOOD_PEER = "10.244.207.0/24"


def bad_leases(h2_subnet: str) -> dict[str, bytes]:
    """key -> value of leases that must be skipped; `h2_subnet` is a live peer's /24."""
    h2 = ipaddress.IPv4Network(h2_subnet)
    value = b'{"PublicIP":"192.168.77.30","PublicIPv6":null}'
    return {
        "10.244.201.0-24": b"not json",
        "10.244.202.0-24": b'["PublicIP", "192.168.77.30"]',
        "10.244.203.0-24": b'{"PublicIP": 5}',
        "10.244.204.0-24": b'{"PublicIP":"192.168.77.30","BackendType":7}',
        "10.244.205.0-24": b'{"PublicIP":"not-an-ip"}',
        "10.244.206.0-24": b"\xff\xfe",
        "10.99.0.0-24": value,  # outside the Network
        f"{h2.network_address + 128}-25": value,  # overlaps h2's lease
        "10.244.0.0-16": value,  # overlaps every lease
        "10.244.208.0-23": value,  # overlaps two subnets
        "garbage": value,  # not a subnet key
    }


STORES = ["embedded", "etcd v3", "etcd v2"]


class StoreUnderTest:
    """Where the daemons of a test keep their leases, and how the test writes there by hand."""

    def __init__(self, topo: Topology, kind: str) -> None:
        self.topo, self.kind = topo, kind
        self.etcd: EtcdCluster | None = None
        self.flags: list[str] = []
        if kind != "embedded":
            problem = etcd_problem()
            if problem is not None:
                pytest.skip(problem)
            self.etcd = EtcdCluster.in_topology(topo, enable_v2=True).start()
            self.flags = [*self.etcd.client_flags(), "--etcd-api", kind.split()[-1]]

    def put_leases(self, leases: dict[str, bytes]) -> None:
        if self.etcd is None:
            store = LocalStore(self.topo.store_path)

            async def put() -> None:
                for key, value in leases.items():
                    await store.put_lease(key, value, LEASE_TTL)
            asyncio.run(put())
            return
        for key, value in leases.items():
            self.put(f"subnets/{key}", value.decode())

    def put(self, key: str, value: str) -> None:
        """A key by hand, as flanneld writes it (v2: leases with their TTL)."""
        full = f"/coreos.com/network/{key}"
        assert self.etcd is not None
        if self.kind == "etcd v3":
            self.etcd.etcdctl("put", full, input=value)
        else:
            ttl = ["--ttl", str(int(LEASE_TTL))] if key.startswith("subnets/") else []
            self.etcd.etcdctl("set", *ttl, full, value, api=2)

    def bad_leases(self, h2_subnet: str) -> dict[str, bytes]:
        """`bad_leases` that this store can hold (etcd's values are UTF-8 text)."""
        leases = bad_leases(h2_subnet)
        if self.etcd is not None:
            leases = {k: v for k, v in leases.items() if v.decode("utf-8", "replace") ==
                      v.decode("utf-8", "ignore")}
        return leases

    def cleanup(self) -> None:
        if self.etcd is not None:
            self.etcd.cleanup()


@pytest.fixture(params=STORES)
def store_kind(request) -> str:
    return request.param


def test_bad_leases_are_skipped_by_key_at_start_and_live_and_the_daemons_go_on(topology,
                                                                               store_kind):
    topo: Topology = topology(2)
    where = StoreUnderTest(topo, store_kind)
    try:
        check_bad_leases(topo, where)
    finally:
        where.cleanup()


def check_bad_leases(topo: Topology, where: StoreUnderTest) -> None:
    leases = topo.start_daemons(DEFAULT_NETWORK_CONFIG, None, *where.flags)
    h1, h2 = topo.hosts
    p1, p2 = topo.add_pod(h1), topo.add_pod(h2)
    bad = where.bad_leases(leases["h2"]["subnet"])
    where.put_leases(bad)  # while the daemons follow the table
    if where.kind == "etcd v2":  # a v2 directory where a lease key belongs
        assert where.etcd is not None
        where.etcd.etcdctl("mkdir", "/coreos.com/network/subnets/10.244.209.0-24", api=2)
    where.put_leases({lease_key(GOOD_PEER): b'{"PublicIP":"192.168.77.31"}'})
    wait_until(lambda: GOOD_PEER in h1.peer_subnets(), 3, "h1 to apply the good lease after")
    expected = {leases["h2"]["subnet"], GOOD_PEER}

    def check(log: str) -> None:
        assert h1.peer_subnets() == expected
        for key in bad:
            assert re.search(rf" W lease store: skipping (key|lease) '?{re.escape(key)}", log), key
        if where.kind == "etcd v2":
            assert ("skipping key '/coreos.com/network/subnets/10.244.209.0-24': a v2 "
                    "directory" in log)
        assert "Traceback" not in log
        assert p1.ping(p2.address, count=2)[p2.address].ok

    check(h1.log_path.read_text())
    # And at start: the same table read in one go.
    assert h1.stop_flannel(signal.SIGTERM) == 0
    started_at = len(h1.log_path.read_text())
    h1.start_flannel(topo.store_path, None, *where.flags)
    h1.wait_ready()
    wait_until(lambda: h1.peer_subnets() == expected, 3, "h1 to list the good peers")
    check(h1.log_path.read_text()[started_at:])
    assert h2.daemon is not None and h2.daemon.poll() is None


MALFORMED_CONFIGS = [
    (b"{not json", "not valid JSON"),
    (b'["Network", "10.244.0.0/16"]', "expected a JSON object"),
    (b'{"Network": "10.244.0.0/16", "SubnetLen": "24"}', "SubnetLen"),
    (b'{"Network": "10.244.0.0/16", "Backend": {"Type": 5}}', "Backend.Type"),
    (b'{"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": "x"}}', "Backend.Port"),
    (b'{"Network": ["10.244.0.0/16"]}', "Network"),
]


@pytest.mark.parametrize(("config", "field"), MALFORMED_CONFIGS)
def test_a_malformed_config_in_the_store_ends_a_start_with_one_line_naming_it(
        topology, config, field):
    topo: Topology = topology(1)
    host = topo.hosts[0]
    asyncio.run(LocalStore(topo.store_path).set_config(config))
    line = refused_run(host, "--local-store", topo.store_path, "--iface", "eth0",
                       "--subnet-file", host.subnet_file, "--control-socket", host.control_socket)
    assert field in line, line
    assert host.link("flannel0") is None


@pytest.mark.parametrize("store_kind", ["etcd v3", "etcd v2"])
def test_a_malformed_config_in_etcd_ends_a_start_with_one_line_naming_it(topology, store_kind):
    topo: Topology = topology(1)
    host = topo.hosts[0]
    where = StoreUnderTest(topo, store_kind)
    flags = ["--iface", "eth0", "--subnet-file", host.subnet_file, "--control-socket",
             host.control_socket, "--etcd-wait", "5", *where.flags]
    try:
        for config, field in MALFORMED_CONFIGS:
            where.put("config", config.decode())
            line = refused_run(host, *flags)
            assert field in line, (config, line)
        if store_kind == "etcd v2":  # a v2 directory where the config belongs
            assert where.etcd is not None
            where.etcd.etcdctl("rm", "/coreos.com/network/config", api=2)
            where.etcd.etcdctl("mkdir", "/coreos.com/network/config", api=2)
            line = refused_run(host, *flags, exit_code=1)
            assert "/coreos.com/network/config is a v2 directory" in line, line
        assert host.link("flannel0") is None
    finally:
        where.cleanup()
