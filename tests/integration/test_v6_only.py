"""End to end, an IPv6-only network (`"EnableIPv4": false`, `IPv6Network` fd99::/56): three
flannel-udp hosts as namespaces on host-gw, on vxlan's kernel and userspace dataplanes and on udp
(ours alone: flannel's udp is IPv4-only), on the embedded store with an underlay that has no
IPv4 address at all (fd77::1x only) and on etcd's v3 keyspace; on host-gw a fourth node is
programmed as flanneld v0.22.3 would (its lease, v6 routes and subnet.env, as read from
flannel's source). Every pair of pods pings and moves 100 MB of TCP over v6; the leases are
flanneld's for an IPv6-only network (key `0.0.0.0-0&<v6>-64`, PublicIP 0.0.0.0, no
BackendData); subnet.env has no FLANNEL_NETWORK nor FLANNEL_SUBNET; host-gw routes each peer's
IPv6 subnet via its PublicIPv6, vxlan makes `flannel-v6.1` alone (no `flannel.1`), the userspace
dataplanes a TUN with the IPv6 side alone; --ip-masq writes ip6tables rules and no iptables
ones; a lease deleted takes its route with it."""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from helpers import lease_store

from flannel_udp.backends.peerroutes import RESYNC_ENV
from flannel_udp.lab import Host, Pod, Topology, ping_failures, wait_until

pytestmark = pytest.mark.netns

NETWORK6 = ipaddress.IPv6Network("fd99::/56")
# host-gw: h4 is programmed as flanneld v0.22.3 programs a node of an IPv6-only network
KERNEL_V6, KERNEL_KEY = "fd99:0:0:f0::/64", "0.0.0.0-0&fd99:0:0:f0::-64"
_ports = itertools.count(7401)


USERSPACE = ("udp", "vxlan-userspace")  # backends forwarding through a TUN: its name
TUN = {"udp": "flannel0", "vxlan-userspace": "flvx.1"}


def config(backend: str) -> dict:
    be = {"udp": {"Type": "udp"}, "host-gw": {"Type": "host-gw"},
          "vxlan": {"Type": "vxlan", "Dataplane": "kernel"},
          "vxlan-userspace": {"Type": "vxlan", "Dataplane": "userspace"}}[backend]
    return {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": str(NETWORK6), "Backend": be}


@dataclass
class Cluster:
    topo: Topology
    daemons: list[Host]  # h1..h3, flannel-udp
    backend: str
    store: str
    pods: dict[str, Pod]
    store_flags: list[str]  # for `flannel-udp leases`
    stored: Callable[[], dict[str, bytes]]  # key (under <prefix>/subnets/) -> value
    delete: Callable[[str], None]


@pytest.fixture(scope="module", params=[("host-gw", "embedded"), ("vxlan", "embedded"),
                                        ("host-gw", "etcd v3"), ("vxlan", "etcd v3"),
                                        ("udp", "embedded"), ("vxlan-userspace", "embedded")],
                ids=lambda p: f"{p[0]}-{p[1].replace(' ', '')}")
def cluster(request, module_topology) -> Cluster:
    backend, store = request.param
    topo = module_topology(4, ipv6=True)
    *daemons, kernel = topo.hosts
    if store == "embedded":
        # An IPv6 underlay: no IPv4 address left on eth0 (etcd below listens on the v4 one).
        for host in topo.hosts:
            host.run("ip", "-4", "addr", "flush", "dev", "eth0")
    flags, stored, put, delete, cleanup = lease_store(topo, store)
    os.environ[RESYNC_ENV] = "1"  # the daemons' environment is copied from ours at start
    try:
        topo.start_daemons(config(backend), daemons, *flags, "--ip-masq")
    finally:
        del os.environ[RESYNC_ENV]
    pod_hosts = daemons
    if backend == "host-gw":  # h4 joins as flanneld v0.22.3's host-gw would
        program_as_flanneld(kernel, daemons, put)
        for host in daemons:
            wait_until(lambda h=host: KERNEL_V6 in h.peer_subnets(), 5,
                       f"{host.label} to list the flanneld-style node")
        pod_hosts = topo.hosts
    pods = {h.label: topo.add_pod(h) for h in pod_hosts}
    store_flags = flags or ["--local-store", str(topo.store_path)]
    yield Cluster(topo, daemons, backend, store, pods, store_flags, stored, delete)
    topo.cleanup()  # the daemons first: etcd must outlive them
    cleanup()


def program_as_flanneld(node: Host, daemons: list[Host], put: Callable) -> None:
    """What flanneld v0.22.3's host-gw does on `node` in an IPv6-only network, read from its
    source: its lease (empty IPv4 side), a v6 route per peer, its subnet.env."""
    assert node.underlay_ipv6 is not None
    put(KERNEL_KEY, (f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{node.underlay_ipv6}",'
                     '"BackendType":"host-gw"}').encode())
    for host in daemons:
        node.run("ip", "-6", "route", "add", host.lease()["ipv6_subnet"], "via",
                 host.underlay_ipv6, "dev", "eth0")
    node.subnet_file.write_text(
        f"FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET=fd99:0:0:f0::1/64\n"
        "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")


def ours_v4_routes(host: Host) -> list[dict]:
    """IPv4 routes other than the kernel's for eth0's own address: none of ours may be there,
    not to 0.0.0.0/0, not to anything."""
    return [r for r in host.ip_json("-4", "route", "show", "table", "all")
            if r.get("protocol") != "kernel" and r.get("type") not in ("local", "broadcast")]


def vtep_mac6(host: Host, backend: str) -> str:
    """The host's IPv6 VtepMAC: flannel-v6.1's, or the userspace dataplane's in its status."""
    if backend == "vxlan":
        return host.ip_json("link", "show", "flannel-v6.1")[0]["address"]
    return host.status()["lease"]["ipv6_vtep_mac"]


def test_every_pair_pings_and_moves_tcp_over_v6(cluster: Cluster):
    pods = list(cluster.pods.values())
    assert all(pod.address is None for pod in pods)
    failures = ping_failures(cluster.pods, ipv6=True)
    assert not failures, "\n".join(failures) + "\n" + cluster.topo.log_tails()
    # 100 MB on one store: the other carries packets on the same routes
    size = 100 << 20 if cluster.store == "embedded" else 8 << 20
    for src, dst in itertools.permutations(pods, 2):
        got = src.tcp_transfer(dst, next(_ports), size, ipv6=True)
        assert got == {"sent": size, "received": size, "intact": True}, (src.label, dst.label)


def test_leases_and_subnet_env_are_flanneld_s_for_an_ipv6_only_network(cluster: Cluster):
    expected = {}
    for host in cluster.daemons:
        lease = host.lease()
        assert (lease["subnet"], lease["public_ip"]) == (None, None)
        assert lease["public_ipv6"] == host.underlay_ipv6
        v6 = ipaddress.IPv6Network(lease["ipv6_subnet"])
        assert v6.subnet_of(NETWORK6) and v6.prefixlen == 64
        value = f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{host.underlay_ipv6}"'
        if cluster.backend.startswith("vxlan"):
            mac = vtep_mac6(host, cluster.backend)
            value += f',"BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{mac}"}}}}'
        elif cluster.backend == "udp":
            value += "}"  # flannel's udp leases have no BackendType
        else:
            value += ',"BackendType":"host-gw"}'
        expected[f"0.0.0.0-0&{v6.network_address}-64"] = value.encode()
        # flanneld's vxlan writes the underlay's MTU - 50 in IPv6-only too (flannel-v6.1 has
        # - 70; the kernel tells the pods with packet-too-big); the userspace dataplanes the
        # same, their TUN's, with packet-too-big above the IPv6 underlay's path MTU.
        mtu = {"vxlan": 1450, "vxlan-userspace": 1450, "udp": 1472}.get(cluster.backend, 1500)
        assert host.subnet_file.read_text() == (
            f"FLANNEL_IPV6_NETWORK={NETWORK6}\nFLANNEL_IPV6_SUBNET={v6.network_address + 1}/64\n"
            f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n")
        assert host.status()["network"] is None
        assert host.status()["ipv6_network"] == str(NETWORK6)
    if cluster.backend == "host-gw":
        kernel = cluster.topo.host(4)
        expected[KERNEL_KEY] = (f'{{"PublicIP":"0.0.0.0","PublicIPv6":"{kernel.underlay_ipv6}",'
                                '"BackendType":"host-gw"}').encode()
    assert cluster.stored() == expected


def test_each_peer_is_routed_over_v6_only(cluster: Cluster):
    for host in cluster.daemons:
        peers = {p["ipv6_subnet"]: p for p in host.status()["peers"]}
        links = {link["ifname"] for link in host.ip_json("link", "show")}
        if cluster.backend == "vxlan":
            assert "flannel-v6.1" in links and "flannel.1" not in links
        if cluster.backend in USERSPACE:  # the TUN: the IPv6Network's route, no IPv4 at all
            tun = TUN[cluster.backend]
            assert not ({"flannel-v6.1", "flannel.1"} & links)
            assert not [a for link in host.ip_json("-4", "addr", "show", "dev", tun)
                        for a in link.get("addr_info", ())]
            assert [r["dev"] for r in host.ip_json("-6", "route", "show", "exact",
                                                   str(NETWORK6))] == [tun]
        for other in cluster.daemons:
            if other is host:
                continue
            subnet6 = other.lease()["ipv6_subnet"]
            peer = peers[subnet6]
            assert (peer["subnet"], peer["public_ip"]) == (None, None)
            assert peer["public_ipv6"] == other.underlay_ipv6
            assert peer["reachable"] is True
            routes = host.ip_json("-6", "route", "show", "exact", subnet6)
            if cluster.backend in USERSPACE:  # the fast path's table: no kernel route
                assert not routes
                if cluster.backend == "vxlan-userspace":
                    assert peer["ipv6_path"] == "vxlan"
                    assert peer["vtep_mac"] == vtep_mac6(other, cluster.backend)
            elif cluster.backend == "vxlan":
                assert peer["ipv6_path"] == "vxlan"
                gateway = str(ipaddress.IPv6Network(subnet6).network_address)
                assert [(r["gateway"], r["dev"]) for r in routes] == [(gateway,
                                                                       "flannel-v6.1")]
            else:
                assert peer["ipv6_path"] == "host-gw"
                assert [(r["gateway"], r["dev"]) for r in routes] == [(other.underlay_ipv6,
                                                                       "eth0")]
        if cluster.backend == "host-gw":  # and the flanneld-style node's
            kernel = cluster.topo.host(4)
            assert peers[KERNEL_V6]["ipv6_path"] == "host-gw"
            routes = host.ip_json("-6", "route", "show", "exact", KERNEL_V6)
            assert [(r["gateway"], r["dev"]) for r in routes] == [(kernel.underlay_ipv6,
                                                                   "eth0")]
        assert not ours_v4_routes(host)


def test_masquerade_and_forward_rules_are_ip6tables_ones_only(cluster: Cluster):
    for host in cluster.daemons:
        subnet6 = host.lease()["ipv6_subnet"]
        nat6 = host.run("ip6tables", "-w", "-t", "nat", "-S", "FLANNEL-POSTRTG").stdout
        assert f"-s {subnet6} -d {NETWORK6}" in nat6 and "MASQUERADE" in nat6
        fwd6 = host.run("ip6tables", "-w", "-S", "FLANNEL-FWD").stdout
        assert f"-A FLANNEL-FWD -s {NETWORK6}" in fwd6
        # no IPv4 rules at all: none for 0.0.0.0/0 (which would forward and masquerade all)
        for table in ("nat", "filter"):
            assert "FLANNEL" not in host.run("iptables", "-w", "-t", table, "-S").stdout


def test_leases_list_shows_ipv6_only_leases(cluster: Cluster):
    out = cluster.topo.host(1).flannel("leases", "list", *cluster.store_flags).stdout
    for other in cluster.daemons:
        line = next(line for line in out.splitlines() if other.lease()["ipv6_subnet"] in line)
        assert line.split()[:2] == ["-", "-"] and other.underlay_ipv6 in line


def test_status_prints_the_ipv6_only_lease_and_peers(cluster: Cluster):
    host = cluster.topo.host(1)
    out = host.flannel("status", "--control-socket", str(host.control_socket)).stdout
    lease = host.lease()
    assert f"lease    -  public IP -  backend {config(cluster.backend)['Backend']['Type']}" in out
    assert f"ipv6     {lease['ipv6_subnet']}  public IPv6 {host.underlay_ipv6}" in out
    if cluster.backend.startswith("vxlan"):  # flannel-v6.1's, the only VtepMAC
        assert f"vxlan    VNI 1  VtepMAC {vtep_mac6(host, cluster.backend)}" in out
    for other in cluster.daemons[1:]:
        row = next(line for line in out.splitlines()
                   if other.lease()["ipv6_subnet"] in line and line.startswith("-"))
        assert row.split()[:4] == ["-", "-", other.lease()["ipv6_subnet"], other.underlay_ipv6]


def test_our_ipv6_only_lease_deleted_by_hand_is_taken_again(cluster: Cluster):
    h1 = cluster.topo.host(1)
    v6 = ipaddress.IPv6Network(h1.lease()["ipv6_subnet"])
    key = f"0.0.0.0-0&{v6.network_address}-64"
    before = cluster.stored()[key]
    cluster.delete(key)
    wait_until(lambda: cluster.stored().get(key) == before, 10,
               f"h1 to take {key} again")
    assert h1.lease()["ipv6_subnet"] == str(v6)


def test_a_deleted_lease_takes_its_route_with_it_last(cluster: Cluster):
    h1, h2, h3 = cluster.daemons
    subnet6 = h3.lease()["ipv6_subnet"]
    v6 = ipaddress.IPv6Network(subnet6)
    h3.stop_flannel()
    cluster.delete(f"0.0.0.0-0&{v6.network_address}-64")
    for host in (h1, h2):
        wait_until(lambda h=host: subnet6 not in h.peer_subnets(), 10,
                   f"{host.label} to drop {subnet6}")
        wait_until(lambda h=host: not h.ip_json("-6", "route", "show", "exact", subnet6), 10,
                   f"{host.label} to remove the route to {subnet6}")


def test_auto_falls_back_to_userspace_in_an_ipv6_only_network_beside_a_kernel_node(topology):
    """h1 takes the kernel's flannel-v6.1; on h2 a bridge holds that name, so "auto" runs the
    userspace dataplane, with the VtepMAC the kernel's would have had, and h2 names no --iface:
    the IPv6 default route's interface is its underlay. Pods ping both ways over v6."""
    topo: Topology = topology(2, ipv6=True)
    h1, h2 = topo.hosts
    for host in topo.hosts:
        host.run("ip", "-4", "addr", "flush", "dev", "eth0")
    h2.run("ip", "link", "add", "flannel-v6.1", "type", "bridge")
    h2.run("ip", "-6", "route", "add", "default", "via", h1.underlay_ipv6, "dev", "eth0")
    net_config = topo.write_net_config(
        {**config("vxlan"), "Backend": {"Type": "vxlan", "Dataplane": "auto"}})
    h1.start_flannel(topo.store_path, net_config)
    h2.start_flannel(topo.store_path, net_config, iface=None)
    for host in topo.hosts:
        host.wait_ready()
    topo.wait_peers()
    assert (h1.lease()["dataplane"], h2.lease()["dataplane"]) == ("kernel", "userspace")
    assert "underlay eth0" in h2.log_path.read_text()
    h1_mac = h1.ip_json("link", "show", "flannel-v6.1")[0]["address"]
    assert h1.lease()["ipv6_vtep_mac"] == h1_mac
    stored = lease_store(topo, "embedded")[1]()
    v6 = ipaddress.IPv6Network(h2.lease()["ipv6_subnet"])
    mac = h2.lease()["ipv6_vtep_mac"]
    assert f'"VtepMAC":"{mac}"'.encode() in stored[f"0.0.0.0-0&{v6.network_address}-64"]
    pods = [topo.add_pod(host) for host in topo.hosts]
    assert not ping_failures({pod.label: pod for pod in pods}, ipv6=True)
    got = pods[0].tcp_transfer(pods[1], next(_ports), 8 << 20, ipv6=True)
    assert got == {"sent": 8 << 20, "received": 8 << 20, "intact": True}


@pytest.mark.parametrize("dataplane", ["kernel", "userspace"])
def test_direct_routing_in_an_ipv6_only_network_routes_peers_via_their_public_ipv6(
        topology, dataplane):
    topo: Topology = topology(2, ipv6=True)
    topo.start_daemons({**config("vxlan"), "Backend": {"Type": "vxlan", "Dataplane": dataplane,
                                                       "DirectRouting": True}})
    for host, other in itertools.permutations(topo.hosts, 2):
        subnet6 = other.lease()["ipv6_subnet"]
        peer = next(p for p in host.status()["peers"] if p["ipv6_subnet"] == subnet6)
        assert peer["ipv6_path"] == "direct"
        routes = host.ip_json("-6", "route", "show", "exact", subnet6)
        assert [(r["gateway"], r["dev"]) for r in routes] == [(other.underlay_ipv6, "eth0")]
        assert not ours_v4_routes(host)
    pods = [topo.add_pod(host) for host in topo.hosts]
    assert not ping_failures({pod.label: pod for pod in pods}, ipv6=True)
