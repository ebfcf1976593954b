"""End to end, dual stack on the vxlan backend's userspace dataplane, in a mixed cluster on a
dual-stack underlay (192.168.77.1x and fd77::1x): h1 a flanneld-style kernel node (`flannel.1`
and `flannel-v6.1` programmed from the store as flanneld v0.22.3 does, offloads as they come),
h2..h4 flannel-udp on Dataplane "userspace". IPv6
inner packets go as flannel-v6.1 sends them: VXLAN over the IPv6 underlay to the peer's
PublicIPv6, to its BackendV6Data VtepMAC. Ping and 100 MB of TCP over v4 and over v6 between
every pair, both ways; `status` and `trace` show the v6 peers."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from helpers import program_from_store, publish, stored_leases, trace

from flannel_udp.lab import Host, KernelVxlanNode, Pod, Topology, wait_until
from flannel_udp.lab.hosts import ping_failures

pytestmark = pytest.mark.netns

CONFIG = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd99::/56",
          "Backend": {"Type": "vxlan", "Dataplane": "userspace"}}
FLANNELD_SUBNET, FLANNELD_SUBNET6 = "10.244.201.0/24", "fd99:0:0:c9::/64"
TUN, DEV, DEV6 = "flvx.1", "flannel.1", "flannel-v6.1"
LABELS = ("h1", "h2", "h3", "h4")
PAIRS = [(a, b) for a in LABELS for b in LABELS if a != b]


@dataclass
class Cluster:
    topo: Topology
    flanneld: KernelVxlanNode  # h1
    daemons: list[Host]  # h2..h4: flannel-udp, Dataplane "userspace"
    pods: dict[str, Pod]


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    topo = module_topology(4, ipv6=True)
    h1, h2, h3, h4 = topo.hosts
    flanneld = KernelVxlanNode(h1, FLANNELD_SUBNET, ipv6_subnet=FLANNELD_SUBNET6)
    publish(flanneld, topo.store_path)
    for host in (h2, h3, h4):
        host.start_flannel(topo.store_path, topo.write_net_config(CONFIG), "--public-ipv6",
                           host.underlay_ipv6)
    for host in (h2, h3, h4):
        host.wait_ready(20)
    wait_until(lambda: len(stored_leases(topo.store_path)) == 4, 10, "four leases")
    program_from_store(flanneld, topo.store_path)
    pods = {h.label: topo.add_pod(h) for h in (h2, h3, h4)}
    pods["h1"] = topo.add_pod(h1, f"{flanneld.subnet.network_address + 1}/24", 1450,
                              f"{flanneld.ipv6_subnet.network_address + 1}/64")
    for host in (h2, h3, h4):  # every peer's IPv6 route in place
        wait_until(lambda host=host: len([p for p in host.status()["peers"] if "ipv6" in p])
                   == 3, 10, f"{host.label}'s three IPv6 peers")
    return Cluster(topo, flanneld, [h2, h3, h4], pods)


def lease_by_label(cluster: Cluster) -> dict[str, dict]:
    by_ip = {h.underlay_ip: h.label for h in cluster.topo.hosts}
    return {by_ip[json.loads(v)["PublicIP"]]: json.loads(v)
            for v in stored_leases(cluster.topo.store_path).values()}


def test_userspace_nodes_publish_flanneld_s_dual_stack_lease(cluster: Cluster):
    leases = lease_by_label(cluster)
    for host in cluster.daemons:
        lease = leases[host.label]
        assert list(lease) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData",
                               "BackendV6Data"]
        assert lease["PublicIPv6"] == host.underlay_ipv6
        assert lease["BackendV6Data"]["VNI"] == 1
        assert lease["BackendV6Data"]["VtepMAC"] != lease["BackendData"]["VtepMAC"]
        assert host.status()["lease"]["dataplane"] == "userspace"
        assert host.link(TUN) is not None and host.link(DEV) is None and host.link(DEV6) is None


def test_every_pod_reaches_every_other_over_v4_and_v6(cluster: Cluster):
    failures = ping_failures(cluster.pods) + ping_failures(cluster.pods, ipv6=True)
    assert not failures, "\n".join(failures) + "\n" + cluster.topo.log_tails()


@pytest.mark.parametrize("ipv6", [True, False], ids=["v6", "v4"])
def test_tcp_arrives_intact_between_every_pair(cluster: Cluster, ipv6: bool):
    for n, (a, b) in enumerate(PAIRS):
        src, dst = cluster.pods[a], cluster.pods[b]
        size = 100 << 20
        assert src.tcp_transfer(dst, 7600 + n + (50 if ipv6 else 0), size, timeout=120,
                                ipv6=ipv6) == {"sent": size, "received": size,
                                               "intact": True}, (a, b, ipv6)


def test_frames_from_and_to_the_kernel_node_go_over_the_ipv6_underlay(cluster: Cluster):
    """After the transfers: the kernel node's flannel-v6.1 sent and took frames (it has no
    other way), and h2 counts traffic both ways on the kernel node's IPv6 route, to its
    PublicIPv6 and its flannel-v6.1 VtepMAC."""
    h1 = cluster.flanneld.host
    stats = h1.ip_json("-s", "link", "show", DEV6)[0]["stats64"]
    assert stats["tx"]["packets"] > 0 and stats["rx"]["packets"] > 0, stats
    rows = {row["subnet"]: row for row in cluster.daemons[0].status()["peers"]}
    v6 = rows[FLANNELD_SUBNET]["ipv6"]
    assert (v6["subnet"], v6["peer"], v6["vtep_mac"]) == (
        FLANNELD_SUBNET6, h1.underlay_ipv6, cluster.flanneld.mac6), v6
    assert v6["tx_packets"] > 0 and v6["rx_packets"] > 0, v6
    assert rows[FLANNELD_SUBNET]["path"] == "vxlan"


def test_status_shows_each_v6_peer_under_its_lease(cluster: Cluster):
    leases = lease_by_label(cluster)
    for host in cluster.daemons:
        ours = host.status()["lease"]
        assert ours["ipv6_vtep_mac"] == leases[host.label]["BackendV6Data"]["VtepMAC"], ours
        rows = host.status()["peers"]
        assert len(rows) == 3, rows
        for row in rows:
            v6 = row["ipv6"]
            assert v6["subnet"] == row["ipv6_subnet"] and v6["peer"] == row["public_ipv6"], row
            peer = next(lease for lease in leases.values()
                        if lease["PublicIPv6"] == row["public_ipv6"])
            assert v6["vtep_mac"] == peer["BackendV6Data"]["VtepMAC"], row


def test_trace_shows_v6_packets_with_their_ipv6_peer(cluster: Cluster):
    h2 = cluster.daemons[0]
    a, b = cluster.pods["h2"], cluster.pods["h1"]
    lines = trace(h2, "--count", "4", "--max-rate", "50",
                  ping=lambda: a.run("ping", "-6", "-n", "-c", "2", "-i", "0.05", "-W", "1",
                                     b.address6, check=False))
    peer = cluster.flanneld.host.underlay_ipv6
    assert any(line.endswith(f"egress  {a.address6} > {b.address6} icmpv6 peer {peer} sent")
               for line in lines), lines
    assert any(line.endswith(f"ingress {b.address6} > {a.address6} icmpv6 peer {peer} to_tun")
               for line in lines), lines
