"""End to end, vxlan with `DirectRouting: true`, on both dataplanes: peers whose PublicIP is on a
directly connected network get a plain route `<subnet> via <PublicIP>` (no encapsulation), the
others go through VXLAN.

h1 and h2 share one underlay segment; h3 is on a second one behind a router. So h1 <-> h2 is
direct and every pair with h3 is encapsulated, which the tests tell apart by the path `status`
reports, `ip route get`, and the overlay device's packet counters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flannel_udp.lab import Host, Pod, Topology, ping_failures, wait_until

pytestmark = pytest.mark.netns

DEVICE = {"userspace": "flvx.1", "kernel": "flannel.1"}


@dataclass
class Cluster:
    topo: Topology
    dataplane: str
    pods: dict[str, Pod]
    leases: dict[str, dict]


@pytest.fixture(scope="module", params=["userspace", "kernel"])
def cluster(request, module_topology) -> Cluster:
    topo = module_topology(3, segments=[0, 0, 1])
    config = {"Network": "10.244.0.0/16",
              "Backend": {"Type": "vxlan", "DirectRouting": True, "Dataplane": request.param}}
    leases = topo.start_daemons(config)
    pods = {h.label: topo.add_pod(h) for h in topo.hosts}
    return Cluster(topo, request.param, pods, leases)


def paths(host: Host) -> dict[str, str | None]:
    return {p["subnet"]: p.get("path") for p in host.status()["peers"]}


def tx_packets(host: Host) -> int:
    return host.status()["counters"].get("tx_packets", 0)


def test_peers_on_the_segment_are_direct_and_those_behind_the_router_vxlan(cluster: Cluster):
    h1, h2, h3 = cluster.topo.hosts
    s1, s2, s3 = (cluster.leases[h.label]["subnet"] for h in (h1, h2, h3))
    expected = {h1: {s2: "direct", s3: "vxlan"}, h2: {s1: "direct", s3: "vxlan"},
                h3: {s1: "vxlan", s2: "vxlan"}}
    for host, want in expected.items():
        wait_until(lambda h=host, w=want: paths(h) == w, 5, f"{host.label}'s paths {want}")
        assert host.status()["lease"]["dataplane"] == cluster.dataplane
    route = h1.run("ip", "route", "get", cluster.pods["h2"].address).stdout
    assert f"via {h2.underlay_ip} dev eth0" in route, route
    route = h1.run("ip", "route", "get", cluster.pods["h3"].address).stdout
    assert f"dev {DEVICE[cluster.dataplane]}" in route, route


def test_every_pod_reaches_every_other_on_either_path(cluster: Cluster):
    failures = ping_failures(cluster.pods)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("receiver, port", [("h2", 7401), ("h3", 7402)],
                         ids=["direct", "vxlan"])
def test_tcp_transfer_arrives_intact(cluster: Cluster, receiver, port):
    src, dst = cluster.pods["h1"], cluster.pods[receiver]
    assert src.tcp_transfer(dst, port, 4 << 20) == {
        "sent": 4 << 20, "received": 4 << 20, "intact": True}


def test_only_the_vxlan_path_goes_through_the_overlay_device(cluster: Cluster):
    h1 = cluster.topo.hosts[0]
    src = cluster.pods["h1"]
    before = tx_packets(h1)
    direct = cluster.pods["h2"].address
    assert src.ping(direct, count=5)[direct].ok
    assert tx_packets(h1) == before  # not one packet through the TUN or flannel.1
    encapsulated = cluster.pods["h3"].address
    assert src.ping(encapsulated, count=5)[encapsulated].ok
    assert tx_packets(h1) >= before + 5
