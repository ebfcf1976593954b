"""End to end, host-gw backend: routes `<peer subnet> via <peer PublicIP>` and nothing else.

h1, h2 and h3 share one underlay segment; h4 sits on a second one behind a router, so it is
reachable only through a gateway, which host-gw cannot use: every other host must report it and
skip it (and it them). The daemons re-check their routes every second (FLANNEL_UDP_ROUTE_RESYNC)
instead of flannel's 10 s, so that a route deleted by hand is back quickly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from dataclasses import dataclass

import pytest
from helpers import lease_key, stored_leases

from flannel_udp.backends.peerroutes import RESYNC_ENV
from flannel_udp.lab import FLANNEL_UDP, Host, Pod, Topology, ping_failures, wait_until
from flannel_udp.lease import LEASE_TTL
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

NETWORK = "10.244.0.0/16"
HOST_GW_CONFIG = {"Network": NETWORK, "Backend": {"Type": "host-gw"}}


@dataclass
class Cluster:
    topo: Topology
    near: list[Host]  # h1..h3, one segment
    far: Host  # h4, behind the router
    pods: dict[str, Pod]
    leases: dict[str, dict]


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    topo = module_topology(4, segments=[0, 0, 0, 1])
    os.environ[RESYNC_ENV] = "1"  # the daemons' environment is copied from ours at start
    try:
        leases = topo.start_daemons(HOST_GW_CONFIG)
    finally:
        del os.environ[RESYNC_ENV]
    *near, far = topo.hosts
    pods = {h.label: topo.add_pod(h) for h in near}
    return Cluster(topo, near, far, pods, leases)


def routes(host: Host, subnet: str) -> list[dict]:
    return host.ip_json("route", "show", "exact", subnet)


def wait_path(host: Host, subnet: str, path: str) -> dict:
    def seen() -> dict | None:
        peer = {p["subnet"]: p for p in host.status()["peers"]}.get(subnet)
        return peer if peer is not None and peer.get("path") == path else None
    return wait_until(seen, 5, f"{host.label} to put {subnet} on path {path!r}")


def test_pods_on_one_segment_reach_each_other_and_a_tcp_transfer_arrives_intact(
        cluster: Cluster):
    failures = ping_failures(cluster.pods)
    assert not failures, "\n".join(failures)
    src, dst = cluster.pods["h1"], cluster.pods["h3"]
    assert src.tcp_transfer(dst, 7201, 4 << 20) == {
        "sent": 4 << 20, "received": 4 << 20, "intact": True}


def test_each_peer_is_a_route_via_its_public_ip_and_no_device_is_made(cluster: Cluster):
    values = stored_leases(cluster.topo.store_path)
    for host in cluster.near:
        lease = cluster.leases[host.label]
        # flannel's host-gw lease: a BackendType and no BackendData.
        assert values[lease_key(lease["subnet"])] == (
            f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":null,'
            '"BackendType":"host-gw"}').encode()
        assert host.subnet_env()["FLANNEL_MTU"] == "1500"
        assert host.link("flannel0") is None and host.link("flvx.1") is None
        assert not routes(host, NETWORK)  # no route for the whole Network: nothing to carry it
        for other in cluster.near:
            if other is not host:
                subnet = cluster.leases[other.label]["subnet"]
                assert [(r.get("gateway"), r.get("dev")) for r in routes(host, subnet)] == [
                    (other.underlay_ip, "eth0")], f"{host.label}: {subnet}"
                assert wait_path(host, subnet, "host-gw")["reachable"]


def test_a_peer_behind_a_gateway_is_reported_and_skipped(cluster: Cluster):
    far_subnet = cluster.leases["h4"]["subnet"]
    for host in cluster.near:
        peer = wait_path(host, far_subnet, "unreachable")
        assert not peer["reachable"]
        assert not routes(host, far_subnet)
        log = host.log_tail(300)
        assert re.search(rf" W peer {far_subnet} at {cluster.far.underlay_ip}: not "
                         r"directly reachable: it is reached through gateway 192\.168\.77\.1",
                         log), log
        assert len(re.findall(rf"peer {far_subnet} at .*not directly reachable", log)) == 1
    # ...and it says the same of every other host.
    for host in cluster.near:
        assert not wait_path(cluster.far, cluster.leases[host.label]["subnet"],
                             "unreachable")["reachable"]
    text = cluster.near[0].flannel("status", "--control-socket",
                                   cluster.near[0].control_socket).stdout
    assert re.search(rf"{far_subnet} .*unreachable", text), text


def test_a_route_deleted_by_hand_is_back_within_the_resync_period(cluster: Cluster):
    host, other = cluster.near[0], cluster.near[1]
    subnet = cluster.leases[other.label]["subnet"]
    host.run("ip", "route", "del", subnet)
    wait_until(lambda: routes(host, subnet), 3, f"{host.label} to re-add its route to {subnet}")
    assert re.search(rf"re-adding what was removed .*route {subnet} via {other.underlay_ip}",
                     host.log_tail(50))
    target = cluster.pods[other.label].address
    assert cluster.pods[host.label].ping(target, count=2)[target].ok


def test_leases_put_and_deleted_become_routes_and_go_live(cluster: Cluster):
    store = LocalStore(cluster.topo.store_path)
    subnet, key = "10.244.230.0/24", "10.244.230.0-24"
    # A host on the segment that runs no daemon here: reachable, so it gets a route.
    value = b'{"PublicIP":"192.168.77.60","PublicIPv6":null,"BackendType":"host-gw"}'
    asyncio.run(store.put_lease(key, value, LEASE_TTL))
    try:
        for host in cluster.near:
            wait_until(lambda h=host: routes(h, subnet), 3, f"{host.label} to route {subnet}")
            assert routes(host, subnet)[0]["gateway"] == "192.168.77.60"
    finally:
        asyncio.run(store.delete_lease(key))
    for host in cluster.near:
        wait_until(lambda h=host: not routes(h, subnet), 3, f"{host.label} to drop {subnet}")


def test_sigterm_removes_the_routes_and_keeps_the_lease(cluster: Cluster):
    host = cluster.near[-1]
    others = [cluster.leases[h.label]["subnet"] for h in cluster.near if h is not host]
    assert all(routes(host, s) for s in others)
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert not any(routes(host, s) for s in others)
    host.start_flannel(cluster.topo.store_path)
    host.wait_ready()
    assert host.lease()["subnet"] == cluster.leases[host.label]["subnet"]
    for subnet in others:
        wait_until(lambda s=subnet: routes(host, s), 5, f"{host.label} to route {subnet} again")
    target = cluster.pods["h1"].address
    assert cluster.pods[host.label].ping(target, count=2)[target].ok


def test_a_bad_resync_period_is_refused_in_one_line(cluster: Cluster):
    host = cluster.far
    result = host.run("env", f"{RESYNC_ENV}=soon", *FLANNEL_UDP, "run", "--local-store",
                      cluster.topo.store_path, "--iface", "eth0",
                      "--subnet-file", host.dir / "other.env",
                      "--control-socket", host.dir / "other.sock", check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{RESYNC_ENV}='soon': expected seconds" in result.stderr.splitlines()[-1]

