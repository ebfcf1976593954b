"""End to end, dual stack on the vxlan backend's kernel dataplane: flannel-udp daemons beside a
flanneld-style kernel node (`flannel.1` and `flannel-v6.1`, programmed from the store as
flanneld does), on a dual-stack underlay (192.168.77.1x and fd77::1x). The leases and
subnet.env as flanneld writes them, devices and routes as flanneld's, ping and 100 MB of TCP
over v4 and over v6 between every pair of pods, --ip-masq's ip6tables chains in place, put
back, and gone after a clean stop; the same with EnableNFTables."""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass
from ipaddress import IPv6Address

import pytest
from helpers import program_from_store, publish, stored_leases

from flannel_udp.backends.vxlan.options import vtep_mac_for
from flannel_udp.lab import Host, KernelVxlanNode, Pod, Topology, ping_failures, wait_until
from flannel_udp.lease import LEASE_TTL, format_mac
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

CONFIG = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd99::/56",
          "Backend": {"Type": "vxlan", "Dataplane": "kernel"}}
FLANNELD_SUBNET, FLANNELD_SUBNET6 = "10.244.201.0/24", "fd99:0:0:c9::/64"
DEV, DEV6 = "flannel.1", "flannel-v6.1"


@dataclass
class Cluster:
    topo: Topology
    flanneld: KernelVxlanNode  # h1
    daemons: list[Host]  # h2..h4: flannel-udp, kernel dataplane
    pods: dict[str, Pod]


def start(topo: Topology, config: dict, hosts: list[Host], *extra: str) -> None:
    for host in hosts:
        host.start_flannel(topo.store_path, topo.write_net_config(config), "--public-ipv6",
                           host.underlay_ipv6, *extra)
    for host in hosts:
        host.wait_ready(20)


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    topo = module_topology(4, ipv6=True)
    h1, *daemons = topo.hosts
    flanneld = KernelVxlanNode(h1, FLANNELD_SUBNET, ipv6_subnet=FLANNELD_SUBNET6)
    publish(flanneld, topo.store_path)
    start(topo, CONFIG, daemons, "--ip-masq", "--iptables-resync", "1")
    wait_until(lambda: len(stored_leases(topo.store_path)) == 4, 10, "four leases")
    program_from_store(flanneld, topo.store_path)
    pods = {h.label: topo.add_pod(h) for h in daemons}
    pods["h1"] = topo.add_pod(h1, f"{flanneld.subnet.network_address + 1}/24", 1450,
                              f"{flanneld.ipv6_subnet.network_address + 1}/64")
    return Cluster(topo, flanneld, daemons, pods)


def lease_of(cluster: Cluster, host: Host) -> tuple[str, dict]:
    """The host's lease: its key's last part (`10.244.3.0-24&fd99:0:0:5c::-64`), its value."""
    key = lease_of_host(cluster.topo, host)
    leases = {k.rsplit("/", 1)[-1]: v for k, v in stored_leases(cluster.topo.store_path).items()}
    return key, json.loads(leases[key])


def test_leases_and_subnet_env_are_flanneld_s_dual_stack_ones(cluster: Cluster):
    for host in cluster.daemons:
        key, lease = lease_of(cluster, host)
        v4, _, v6 = key.partition("&")
        assert v6.endswith("-64") and v6.startswith("fd99:0:0:"), key
        assert list(lease) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData",
                               "BackendV6Data"]
        assert lease["PublicIPv6"] == host.underlay_ipv6
        assert lease["BackendV6Data"]["VNI"] == 1
        assert lease["BackendV6Data"]["VtepMAC"] == host.link(DEV6)["address"]
        assert lease["BackendData"]["VtepMAC"] == host.link(DEV)["address"]
        env = host.subnet_env()
        assert env["FLANNEL_IPV6_NETWORK"] == "fd99::/56"
        subnet6 = v6.replace("-64", "")
        assert env["FLANNEL_IPV6_SUBNET"] == f"{subnet6}1/64"


def test_devices_and_v6_routes_are_flanneld_s(cluster: Cluster):
    theirs = cluster.flanneld.host.link(DEV6)["linkinfo"]["info_data"]
    peers6 = {lease_of(cluster, h)[0].partition("&")[2].replace("-", "/"): h
              for h in cluster.daemons}
    peers6[FLANNELD_SUBNET6] = cluster.flanneld.host
    for host in cluster.daemons:
        link = host.link(DEV6)
        info = link["linkinfo"]["info_data"]
        assert info["local6"] == host.underlay_ipv6 and link["mtu"] == 1430
        assert {**info, "local6": None} == {**theirs, "local6": None}
        own = lease_of(cluster, host)[0].partition("&")[2].replace("-", "/")
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet6" and a["scope"] == "global"] == [
            (own.split("/")[0], 128)]
        for subnet6, peer in peers6.items():
            if peer is host:
                continue
            gateway = subnet6.split("/")[0]
            [route] = host.ip_json("-6", "route", "show", "exact", subnet6)
            assert (route["gateway"], route["dev"], route["flags"]) == (gateway, DEV6,
                                                                        ["onlink"])
            [neigh] = host.ip_json("-6", "neigh", "show", gateway, "dev", DEV6)
            assert "PERMANENT" in neigh["state"]


def test_every_pod_reaches_every_other_over_v4_and_v6(cluster: Cluster):
    assert not ping_failures(cluster.pods)
    for label, pod in cluster.pods.items():
        targets = [p.address6 for p in cluster.pods.values() if p is not pod]
        results = pod.ping(*targets, count=3)
        assert all(r.ok for r in results.values()), (label, results)


PAIRS = [(a, b) for a in ("h1", "h2", "h3", "h4") for b in ("h1", "h2", "h3", "h4") if a != b]


@pytest.mark.parametrize("ipv6", [True, False], ids=["v6", "v4"])
def test_tcp_arrives_intact_between_every_pair(cluster: Cluster, ipv6: bool):
    for n, (a, b) in enumerate(PAIRS):
        src, dst = cluster.pods[a], cluster.pods[b]
        size = 100 << 20
        assert src.tcp_transfer(dst, 7500 + n + (50 if ipv6 else 0), size, timeout=120,
                                ipv6=ipv6) == {
            "sent": size, "received": size, "intact": True}, (a, b, ipv6)


def ip6tables(host: Host, table: str, chain: str) -> list[str]:
    result = host.run("ip6tables", "-t", table, "-S", chain, check=False)
    return [line for line in result.stdout.splitlines() if not line.startswith("-N")]


def test_ip_masq_ip6tables_chains_are_in_place_and_come_back(cluster: Cluster):
    host = cluster.daemons[0]
    subnet6 = lease_of(cluster, host)[0].partition("&")[2].replace("-", "/")
    rules = ip6tables(host, "nat", "FLANNEL-POSTRTG")
    assert f'-A FLANNEL-POSTRTG -s {subnet6} -d fd99::/56 -m comment --comment ' \
           '"flanneld masq" -j RETURN' in rules
    assert '-A FLANNEL-POSTRTG -s fd99::/56 ! -d ff00::/8 -m comment --comment ' \
           '"flanneld masq" -j MASQUERADE --random-fully' in rules
    assert len(rules) == 6
    assert len(ip6tables(host, "filter", "FLANNEL-FWD")) == 2
    host.run("ip6tables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    wait_until(lambda: ip6tables(host, "nat", "FLANNEL-POSTRTG") == rules, 5,
               "the flushed ip6tables chain to come back")


def test_a_clean_stop_removes_the_v6_device_routes_and_rules(cluster: Cluster):
    host = cluster.daemons[-1]
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert host.link(DEV6) is None and host.link(DEV) is None
    assert not [r for r in host.ip_json("-6", "route", "show") if r["dst"].startswith("fd99")
                and r.get("dev") != f"pod{cluster.pods[host.label].index}"]
    assert ip6tables(host, "nat", "FLANNEL-POSTRTG") == []
    assert ip6tables(host, "filter", "FLANNEL-FWD") == []
    assert "FLANNEL" not in host.run("ip6tables-save").stdout


def test_enable_nftables_puts_the_v6_chains_in_ip6_flannel_ipv6_and_removes_them(topology):
    topo = topology(1, ipv6=True)
    host = topo.hosts[0]
    start(topo, {**CONFIG, "EnableNFTables": True}, [host], "--ip-masq")
    env = host.subnet_env()
    subnet6 = env["FLANNEL_IPV6_SUBNET"].replace("::1/", "::/")
    table = host.run("nft", "list", "table", "ip6", "flannel-ipv6").stdout
    for line in (f"ip6 saddr {subnet6} ip6 daddr fd99::/56 return",
                 "ip6 saddr fd99::/56 ip6 daddr != ff00::/8 masquerade",
                 "ip6 saddr fd99::/56 accept", "ip6 daddr fd99::/56 accept"):
        assert line in table, (line, table)
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert host.run("nft", "list", "tables").stdout.strip() == ""


def test_a_dual_stack_lease_put_and_deleted_adds_and_removes_the_v6_entries_live(
        cluster: Cluster):
    store = LocalStore(cluster.topo.store_path)
    host = cluster.daemons[0]
    mac6, subnet6 = "0e:f6:00:00:00:77", "fd99:0:0:e0::/64"
    key = "10.244.224.0-24&fd99:0:0:e0::-64"
    value = ('{"PublicIP":"192.168.77.70","PublicIPv6":"fd77::70","BackendType":"vxlan",'
             '"BackendData":{"VNI":1,"VtepMAC":"0e:fa:00:00:00:77"},'
             f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}').encode()

    def entries() -> tuple[bool, bool, bool]:
        fdb = json.loads(host.run("bridge", "-j", "fdb", "show", "dev", DEV6).stdout)
        return (any(n.get("lladdr") == mac6 for n in host.ip_json("-6", "neigh", "show",
                                                                    "dev", DEV6)),
                any(f["mac"] == mac6 and f.get("dst") == "fd77::70" for f in fdb),
                bool(host.ip_json("-6", "route", "show", "exact", subnet6)))

    asyncio.run(store.put_lease(key, value, LEASE_TTL))
    try:
        wait_until(lambda: entries() == (True, True, True), 3, f"{host.label} to add {subnet6}")
    finally:
        asyncio.run(store.delete_lease(key))
    wait_until(lambda: entries() == (False, False, False), 3, f"{host.label} to drop {subnet6}")


def test_a_v4_only_vxlan_lease_is_taken_over_ipv4_only(cluster: Cluster):
    store = LocalStore(cluster.topo.store_path)
    host = cluster.daemons[0]
    key, subnet = "10.244.225.0-24", "10.244.225.0/24"
    value = (b'{"PublicIP":"192.168.77.71","PublicIPv6":null,"BackendType":"vxlan",'
             b'"BackendData":{"VNI":1,"VtepMAC":"0e:fa:00:00:00:71"}}')
    asyncio.run(store.put_lease(key, value, LEASE_TTL))
    try:
        wait_until(lambda: host.ip_json("route", "show", "exact", subnet), 3,
                   f"{host.label} to route {subnet}")
        assert not [f for f in json.loads(host.run("bridge", "-j", "fdb", "show", "dev",
                                                   DEV6).stdout)
                    if f["mac"] == "0e:fa:00:00:00:71"]
        peer = host.status()["peers"]
        assert any(p["subnet"] == subnet for p in peer)
    finally:
        asyncio.run(store.delete_lease(key))


def test_a_restarted_daemon_keeps_its_dual_stack_lease_and_v6_vtep_mac(cluster: Cluster):
    host = cluster.daemons[1]
    before = stored_leases(cluster.topo.store_path)
    key = next(k for k, v in before.items() if json.loads(v)["PublicIP"] == host.underlay_ip)
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert host.link(DEV6) is None
    start(cluster.topo, CONFIG, [host], "--ip-masq")
    assert stored_leases(cluster.topo.store_path)[key] == before[key]
    target = cluster.pods[host.label].address6
    for label in ("h1", "h2"):
        assert cluster.pods[label].ping(target, count=2)[target].ok, label


def test_where_flannel_v6_cannot_be_made_a_kernel_start_is_one_line_and_takes_nothing(topology):
    topo = topology(1, ipv6=True)
    host = topo.hosts[0]
    host.run("ip", "link", "add", DEV6, "type", "bridge")  # the name is taken
    result = host.flannel("run", "--local-store", topo.store_path, "--net-config-path",
                          topo.write_net_config(CONFIG), "--subnet-file", host.subnet_file,
                          "--control-socket", host.control_socket, "--iface", "eth0",
                          check=False, timeout=20)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"cannot create VXLAN device {DEV6}: a bridge device of that name exists " \
        "(remove it, or set Backend.Dataplane \"userspace\")" in last
    assert host.link(DEV) is None and host.link("flvx.1") is None
    assert stored_leases(topo.store_path) == {}


def test_where_flannel_v6_cannot_be_made_auto_falls_back_to_userspace_for_v4_and_v6(topology):
    """Dataplane "auto": flannel.1, made before flannel-v6.1 failed, is removed, and the
    userspace dataplane carries both sides, publishing the BackendV6Data the kernel one would
    have; a kernel node beside it reaches it over v4 and v6."""
    topo = topology(2, ipv6=True)
    h1, h2 = topo.hosts
    flanneld = KernelVxlanNode(h1, FLANNELD_SUBNET, ipv6_subnet=FLANNELD_SUBNET6)
    publish(flanneld, topo.store_path)
    h2.run("ip", "link", "add", DEV6, "type", "bridge")  # the name is taken
    start(topo, {**CONFIG, "Backend": {"Type": "vxlan", "Dataplane": "auto"}}, [h2])
    lease = h2.status()["lease"]
    assert (lease["dataplane"], lease["dataplane_choice"]) == ("userspace", "auto"), lease
    assert h2.link(DEV) is None and h2.link("flvx.1") is not None
    assert h2.link(DEV6)["linkinfo"]["info_kind"] == "bridge"  # not ours: as it was
    assert "vxlan dataplane: userspace (TUN flvx.1), as the kernel's is not available: " \
        f"cannot create VXLAN device {DEV6}" in h2.log_path.read_text()
    wait_until(lambda: len(stored_leases(topo.store_path)) == 2, 10, "two leases")
    [value] = [json.loads(v) for v in stored_leases(topo.store_path).values()
               if json.loads(v)["PublicIP"] == h2.underlay_ip]
    assert value["BackendV6Data"] == {
        "VNI": 1, "VtepMAC": format_mac(vtep_mac_for(IPv6Address(h2.underlay_ipv6), 1))}
    program_from_store(flanneld, topo.store_path)
    pods = {"h2": topo.add_pod(h2),
            "h1": topo.add_pod(h1, f"{flanneld.subnet.network_address + 1}/24", 1450,
                               f"{flanneld.ipv6_subnet.network_address + 1}/64")}
    for src, dst in (("h1", "h2"), ("h2", "h1")):
        for target in (pods[dst].address, pods[dst].address6):
            assert pods[src].ping(target, count=3)[target].ok, (src, target)
        assert pods[src].tcp_transfer(pods[dst], 7700 + len(src), 8 << 20, ipv6=True) == {
            "sent": 8 << 20, "received": 8 << 20, "intact": True}, src


@pytest.mark.parametrize("dataplane", ["kernel", "userspace"])
def test_direct_routing_in_dual_stack_routes_v6_peers_on_the_link_via_their_public_ipv6(
        topology, dataplane):
    topo = topology(3, segments=[0, 0, 1], ipv6=True)
    h1, h2, h3 = topo.hosts
    config = {**CONFIG, "Backend": {"Type": "vxlan", "Dataplane": dataplane,
                                    "DirectRouting": True}}
    start(topo, config, topo.hosts)
    leases = topo.wait_peers()
    pods = {h.label: topo.add_pod(h) for h in topo.hosts}
    subnet6 = {h.label: lease_of_host(topo, h).partition("&")[2].replace("-", "/")
               for h in topo.hosts}
    # h2 shares h1's segment: a plain route via its PublicIPv6; h3 is behind the router
    [route] = h1.ip_json("-6", "route", "show", "exact", subnet6["h2"])
    assert (route["gateway"], route["dev"]) == (h2.underlay_ipv6, "eth0")
    if dataplane == "kernel":
        [route] = h1.ip_json("-6", "route", "show", "exact", subnet6["h3"])
        assert (route["gateway"], route["dev"], route["flags"]) == (
            subnet6["h3"].split("/")[0], DEV6, ["onlink"])
    else:  # the fast path's, through the TUN's route for the IPv6Network
        assert h1.ip_json("-6", "route", "show", "exact", subnet6["h3"]) == []
    paths = {p["subnet"]: p["ipv6_path"] for p in h1.status()["peers"]}
    assert paths == {leases["h2"]["subnet"]: "direct", leases["h3"]["subnet"]: "vxlan"}
    for label, pod in pods.items():
        targets = [p.address6 for p in pods.values() if p is not pod]
        results = pod.ping(*targets, count=2)
        assert all(r.ok for r in results.values()), (label, results)
    assert pods["h1"].tcp_transfer(pods["h2"], 7601, 8 << 20, ipv6=True)["intact"]
    assert pods["h1"].tcp_transfer(pods["h3"], 7602, 8 << 20, ipv6=True)["intact"]


def lease_of_host(topo: Topology, host: Host) -> str:
    for key, value in stored_leases(topo.store_path).items():
        if json.loads(value)["PublicIP"] == host.underlay_ip:
            return key.rsplit("/", 1)[-1]
    raise AssertionError(f"no lease of {host.label}")
