"""End to end on etcd's v2 keyspace, as the seed deploys it: etcd 3.4 with --enable-v2=true in
the topology's switch namespace, the network config written with the seed's exact
`ETCDCTL_API=2 etcdctl set`, and daemons started with no flag naming the keyspace. They must
find the config in v2, lease and watch there (v2 keys with a TTL, nothing in v3), say so in the
log and in `status`, and carry pod traffic."""

from __future__ import annotations

import json

import pytest

from flannel_udp.lab import EtcdCluster, etcd_problem, ping_failures, wait_until

pytestmark = pytest.mark.netns

SEED_CONFIG = '{"Network": "172.68.0.0/16", "Backend": {"Type": "host-gw"}}'
PREFIX = "/coreos.com/network"


def test_daemons_on_the_seeds_v2_config_use_the_v2_store_end_to_end(topology):
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)
    topo = topology(2)
    etcd = EtcdCluster.in_topology(topo, enable_v2=True).start()
    try:
        etcd.etcdctl("set", f"{PREFIX}/config", SEED_CONFIG, api=2)  # the seed's command
        h1, h2 = topo.hosts
        leases = topo.start_daemons(json.loads(SEED_CONFIG), [h1, h2], *etcd.client_flags())
        pods = {h.label: topo.add_pod(h) for h in (h1, h2)}
        assert ping_failures(pods) == []

        for host in (h1, h2):
            assert host.status()["keyspace"] == "etcd v2"
            assert "etcd v2 keyspace" in host.log_path.read_text()
            assert "\nstore    etcd v2\n" in host.flannel(
                "status", "--control-socket", host.control_socket).stdout
        # the leases are v2 keys with flannel's 24 h TTL; v3 holds nothing
        keys = set(etcd.etcdctl("ls", f"{PREFIX}/subnets", api=2).stdout.split())
        assert keys == {f"{PREFIX}/subnets/{leases[h.label]['subnet'].replace('/', '-')}"
                        for h in (h1, h2)}
        for key in keys:
            extended = etcd.etcdctl("-o", "extended", "get", key, api=2).stdout
            ttl = int(next(line for line in extended.splitlines()
                           if line.startswith("TTL:")).split()[1])
            assert 86300 < ttl <= 86400, extended
        assert etcd.etcdctl("get", "--prefix", "/coreos.com", "--keys-only").stdout == ""

        # the watch: h2's lease deleted by hand leaves h1's table, and h2 takes it again
        subnet = leases["h2"]["subnet"]
        etcd.etcdctl("rm", f"{PREFIX}/subnets/{subnet.replace('/', '-')}", api=2)
        wait_until(lambda: "went away" in h1.log_path.read_text(), 10,
                   "h1 to see h2's lease go")
        wait_until(lambda: subnet in h1.peer_subnets(), 15, "h2's lease to be back in h1's table")
        assert ping_failures(pods) == []
    finally:
        etcd.cleanup()
