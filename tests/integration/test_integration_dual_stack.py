"""End to end, dual stack on host-gw: three flannel-udp hosts and a fourth programmed as flanneld
v0.22.3 programs a host-gw node (its lease in flanneld's bytes, its routes `<subnet> via
<PublicIP>` and `<v6 subnet> via <PublicIPv6>`, its subnet.env), on an underlay with IPv4
(192.168.77.1x) and IPv6 (fd77::1x) addresses, `EnableIPv6` with `IPv6Network` fd99::/56, on
the embedded store and on etcd's v3 keyspace. Every pair of pods pings and moves 100 MB
of TCP over v4 and over v6;
each peer is a v4 route via its PublicIP and a v6 route via its PublicIPv6; the leases are one
key per host holding both subnets, with the value flanneld v0.22.3 writes (read back with
etcdctl on etcd); a v4-only lease gets its v4 route only, and a lease's routes go with it."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from helpers import lease_store

from flannel_udp.backends.peerroutes import RESYNC_ENV
from flannel_udp.lab import Host, Pod, Topology, wait_until
from flannel_udp.lab.hosts import ping_failures
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

DUAL_CONFIG = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd99::/56",
               "Backend": {"Type": "host-gw"}}
_ports = itertools.count(7301)


# The flanneld-style node h4: its lease as flanneld v0.22.3 writes it
KERNEL_V4, KERNEL_V6 = "10.244.240.0/24", "fd99:0:0:f0::/64"
KERNEL_KEY = "10.244.240.0-24&fd99:0:0:f0::-64"


@dataclass
class Cluster:
    topo: Topology
    daemons: list[Host]  # h1..h3, flannel-udp
    kernel: Host  # h4, programmed as flanneld programs a host-gw node
    pods: dict[str, Pod]
    leases: dict[str, dict]
    stored: Callable[[], dict[str, bytes]]  # key (under <prefix>/subnets/) -> value
    put: Callable[[str, bytes], None]  # a lease by hand, with a 24 h TTL
    delete: Callable[[str], None]
    store: str  # "embedded" or "etcd v3"


@pytest.fixture(scope="module", params=["embedded", "etcd v3"])
def cluster(request, module_topology) -> Cluster:
    topo = module_topology(4, ipv6=True)
    *daemons, kernel = topo.hosts
    flags, stored, put, delete, cleanup = lease_store(topo, request.param)
    os.environ[RESYNC_ENV] = "1"  # the daemons' environment is copied from ours at start
    try:
        leases = topo.start_daemons(DUAL_CONFIG, daemons, *flags)
    finally:
        del os.environ[RESYNC_ENV]
    program_as_flanneld(kernel, daemons, put)
    for host in daemons:
        wait_until(lambda h=host: KERNEL_V4 in h.peer_subnets(), 5,
                   f"{host.label} to list the flanneld-style node")
    pods = {h.label: topo.add_pod(h) for h in topo.hosts}
    yield Cluster(topo, daemons, kernel, pods, leases, stored, put, delete, request.param)
    topo.cleanup()  # the daemons first: etcd must outlive them
    cleanup()


def program_as_flanneld(node: Host, daemons: list[Host], put: Callable) -> None:
    """What flanneld v0.22.3's host-gw does on `node`: its lease, a route per peer and family,
    its subnet.env."""
    assert node.underlay_ipv6 is not None
    put(KERNEL_KEY, (f'{{"PublicIP":"{node.underlay_ip}","PublicIPv6":"{node.underlay_ipv6}",'
                     '"BackendType":"host-gw"}').encode())
    for host in daemons:
        lease = host.lease()
        node.run("ip", "route", "add", lease["subnet"], "via", host.underlay_ip, "dev", "eth0")
        node.run("ip", "-6", "route", "add", lease["ipv6_subnet"], "via", host.underlay_ipv6,
                 "dev", "eth0")
    node.subnet_file.write_text(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.240.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd99::/56\nFLANNEL_IPV6_SUBNET=fd99:0:0:f0::1/64\n"
        "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")


def v6_routes(host: Host, subnet: str) -> list[dict]:
    return host.ip_json("-6", "route", "show", "exact", subnet)


def test_every_pair_pings_and_moves_tcp_over_v4_and_over_v6(cluster: Cluster):
    failures = ping_failures(cluster.pods) + ping_failures(cluster.pods, ipv6=True)
    pods = list(cluster.pods.values())
    assert not failures, "\n".join(failures) + "\n" + cluster.topo.log_tails()
    # 100 MB on one store: the other carries packets on the same routes
    size = 100 << 20 if cluster.store == "embedded" else 8 << 20
    for src, dst in itertools.permutations(pods, 2):
        for ipv6 in (False, True):
            got = src.tcp_transfer(dst, next(_ports), size, ipv6=ipv6)
            assert got == {"sent": size, "received": size, "intact": True}, (
                src.label, dst.label, ipv6)


def test_leases_are_one_key_per_host_holding_both_subnets_as_flanneld_writes_them(
        cluster: Cluster):
    kernel = cluster.kernel
    expected = {KERNEL_KEY: (f'{{"PublicIP":"{kernel.underlay_ip}","PublicIPv6":'
                             f'"{kernel.underlay_ipv6}","BackendType":"host-gw"}}').encode()}
    for host in cluster.daemons:
        lease = host.lease()
        v4, v6 = ipaddress.ip_network(lease["subnet"]), ipaddress.ip_network(lease["ipv6_subnet"])
        assert v6.subnet_of(ipaddress.IPv6Network("fd99::/56")) and v6.prefixlen == 64
        assert lease["public_ipv6"] == host.underlay_ipv6
        key = f"{v4.network_address}-24&{v6.network_address}-64"
        expected[key] = (f'{{"PublicIP":"{host.underlay_ip}","PublicIPv6":'
                         f'"{host.underlay_ipv6}","BackendType":"host-gw"}}').encode()
        env = host.subnet_env()
        assert env["FLANNEL_IPV6_NETWORK"] == "fd99::/56"
        assert env["FLANNEL_IPV6_SUBNET"] == f"{v6.network_address + 1}/64"
        assert env["FLANNEL_SUBNET"] == f"{v4.network_address + 1}/24"
    assert cluster.stored() == expected


def test_each_peer_is_a_v4_route_via_its_public_ip_and_a_v6_route_via_its_public_ipv6(
        cluster: Cluster):
    kernel = cluster.kernel
    for host in cluster.daemons:
        status = host.status()
        assert status["ipv6_network"] == "fd99::/56"
        peers = {p["subnet"]: p for p in status["peers"]}
        for other in cluster.topo.hosts:
            if other is host:
                continue
            lease = other.lease() if other is not kernel else {
                "subnet": KERNEL_V4, "ipv6_subnet": KERNEL_V6}
            peer = peers[lease["subnet"]]
            assert (peer["ipv6_subnet"], peer["public_ipv6"]) == (lease["ipv6_subnet"],
                                                                  other.underlay_ipv6)
            assert peer["ipv6_path"] == "host-gw"
            route6 = v6_routes(host, lease["ipv6_subnet"])
            assert [(r["gateway"], r["dev"]) for r in route6] == [(other.underlay_ipv6,
                                                                   "eth0")]
            route4 = host.ip_json("route", "show", "exact", lease["subnet"])
            assert [(r["gateway"], r["dev"]) for r in route4] == [(other.underlay_ip, "eth0")]
    # and `status` as a person reads it
    h1 = cluster.topo.host(1)
    text = h1.flannel("status", "--control-socket", str(h1.control_socket)).stdout
    mine = h1.lease()
    assert (f"ipv6     {mine['ipv6_subnet']}  public IPv6 {h1.underlay_ipv6}  network "
            "fd99::/56") in text
    h2 = cluster.topo.host(2).lease()
    assert any(line.split()[:4] == [h2["subnet"], cluster.topo.host(2).underlay_ip,
                                    h2["ipv6_subnet"], cluster.topo.host(2).underlay_ipv6]
               for line in text.splitlines()), text


def test_a_v4_only_lease_gets_its_v4_route_only_and_routes_go_with_their_lease(
        cluster: Cluster):
    h1 = cluster.topo.host(1)
    v4_only = b'{"PublicIP":"192.168.77.99","PublicIPv6":null,"BackendType":"host-gw"}'
    dual_key = "10.244.251.0-24&fd99:0:0:fb::-64"
    dual = b'{"PublicIP":"192.168.77.98","PublicIPv6":"fd77::98","BackendType":"host-gw"}'
    cluster.put("10.244.250.0-24", v4_only)
    cluster.put(dual_key, dual)
    try:
        wait_until(lambda: h1.ip_json("route", "show", "exact", "10.244.250.0/24")
                   and v6_routes(h1, "fd99:0:0:fb::/64"), 5,
                   "h1 to route the leases put by hand")
        assert not h1.ip_json("-6", "route", "show", "via", "fd77::99")
        assert [r["gateway"] for r in v6_routes(h1, "fd99:0:0:fb::/64")] == ["fd77::98"]
        peer = {p["subnet"]: p for p in h1.status()["peers"]}["10.244.250.0/24"]
        assert peer["ipv6_subnet"] is None and peer["ipv6_path"] == "none: a v4-only lease"
    finally:
        cluster.delete("10.244.250.0-24")
        cluster.delete(dual_key)
    started = time.monotonic()
    wait_until(lambda: not h1.ip_json("route", "show", "exact", "10.244.250.0/24")
               and not h1.ip_json("route", "show", "exact", "10.244.251.0/24")
               and not v6_routes(h1, "fd99:0:0:fb::/64"), 5,
               "h1 to remove both leases' routes")
    assert time.monotonic() - started < 5


def test_a_v6_route_deleted_by_hand_comes_back(cluster: Cluster):
    h1, h3 = cluster.topo.host(1), cluster.topo.host(3)
    subnet6 = h3.lease()["ipv6_subnet"]
    h1.run("ip", "-6", "route", "del", subnet6)
    wait_until(lambda: v6_routes(h1, subnet6), 5, "h1's resync to put the v6 route back")
    assert [r["gateway"] for r in v6_routes(h1, subnet6)] == [h3.underlay_ipv6]


def test_own_dual_stack_lease_deleted_behind_its_back_is_taken_again_whole(cluster: Cluster):
    h1 = cluster.topo.host(1)
    lease = h1.lease()
    v4, v6 = (ipaddress.ip_network(lease[k]) for k in ("subnet", "ipv6_subnet"))
    key = f"{v4.network_address}-24&{v6.network_address}-64"
    value = cluster.stored()[key]
    cluster.delete(key)
    wait_until(lambda: cluster.stored().get(key) == value, 5,
               "h1 to take its dual-stack lease again")
    again = h1.lease()
    assert (again["subnet"], again["ipv6_subnet"]) == (lease["subnet"], lease["ipv6_subnet"])


def test_a_daemon_restarted_keeps_its_dual_stack_lease(cluster: Cluster):
    h2 = cluster.topo.host(2)
    before = h2.lease()
    assert h2.stop_flannel() == 0
    # its routes and addresses were removed with it; the lease stays in the store
    assert len(cluster.stored()) == 4
    h2.start_flannel(cluster.topo.store_path, None, *_flags_of(h2))
    h2.wait_ready(20)
    after = h2.lease()
    assert (after["subnet"], after["ipv6_subnet"]) == (before["subnet"], before["ipv6_subnet"])
    cluster.topo.wait_peers(cluster.daemons)


def _flags_of(host: Host) -> list[str]:
    """The extra flags the host's daemon was started with (etcd's, if any), from its log."""
    first = next(line for line in host.log_path.read_text().splitlines()
                 if line.startswith("--- start:"))
    words = first.split()
    return words[words.index("--etcd-endpoints"):words.index("--etcd-endpoints") + 2] \
        if "--etcd-endpoints" in words else []


# -- the node's PublicIPv6 ------------------------------------------------------------------


def test_no_ipv6_address_on_the_underlay_is_one_line_and_takes_nothing(topology):
    topo = topology(1)  # an IPv4-only underlay
    h1 = topo.host(1)
    h1.start_flannel(topo.store_path, topo.write_net_config(DUAL_CONFIG))
    assert h1.daemon.wait(20) == 2
    assert h1.log_tail(1).endswith("flannel-udp: EnableIPv6: interface eth0 has no global IPv6 "
                                   "address; give it one or set --public-ipv6"), h1.log_tail()
    assert asyncio.run(LocalStore(topo.store_path).list_leases()).records == ()
    assert not h1.subnet_file.exists()


def test_public_ipv6_is_the_given_one_and_is_ignored_without_enable_ipv6(topology):
    topo = topology(1, ipv6=True)
    h1 = topo.host(1)
    h1.start_flannel(topo.store_path, topo.write_net_config(DUAL_CONFIG),
                     "--public-ipv6", "fd77::1:2")
    h1.wait_ready(20)
    assert h1.lease()["public_ipv6"] == "fd77::1:2"
    assert list(asyncio.run(LocalStore(topo.store_path).list_leases()).records)[0].value == (
        b'{"PublicIP":"192.168.77.11","PublicIPv6":"fd77::1:2","BackendType":"host-gw"}')
    assert h1.stop_flannel() == 0

    v4_store = topo.dir / "v4-store"
    h1.start_flannel(v4_store, topo.write_net_config(
        {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}, "v4.json"),
        "--public-ipv6", "fd77::1:2")
    h1.wait_ready(20)
    assert h1.lease()["public_ipv6"] is None
    assert "--public-ipv6 fd77::1:2: ignored, the network config has no EnableIPv6" in \
        h1.log_path.read_text()
    assert "FLANNEL_IPV6_SUBNET" not in h1.subnet_env()
    assert list(asyncio.run(LocalStore(v4_store).list_leases()).records)[0].value == (
        b'{"PublicIP":"192.168.77.11","PublicIPv6":null,"BackendType":"host-gw"}')
