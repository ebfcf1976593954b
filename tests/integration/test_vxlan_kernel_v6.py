"""The vxlan backend's kernel dataplane in dual stack, driven directly: `KernelVxlanNetwork` run
in host namespaces on a dual-stack underlay with dual-stack leases, beside a flanneld-style
kernel node (`KernelVxlanNode` with `flannel-v6.1`). Checks the devices and entries against
flanneld's (`ip -d link`, `ip -6 route`, neighbours, FDB), v4 and v6 traffic between every
pair of pods, a lease leaving, DirectRouting over IPv6, and that close() leaves nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from flannel_udp.lab import Host, KernelVxlanNode, Pod, Topology, ping_failures, wait_until

pytestmark = pytest.mark.netns

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Dataplane": "kernel"}}
V6_PREFIX = "fd99:0:0:"
DEV6 = "flannel-v6.1"

# Runs in a host namespace: a KernelVxlanNetwork with our dual-stack lease; prints its lease
# data, then takes "add <lease>" / "remove <subnet>" lines on stdin, and closes at EOF.
DRIVER = r"""
import json, os, sys, time
os.environ["FLANNEL_UDP_ROUTE_RESYNC"] = "0.5"  # entries deleted by hand come back quickly
from ipaddress import ip_address, ip_network
from flannel_udp import netlink
from flannel_udp.backends.vxlan.kernel import KernelVxlanNetwork
from flannel_udp.config import parse_config
from flannel_udp.lease import Lease

def lease(d):
    return Lease(ip_network(d["subnet"]), ip_address(d["public_ip"]), "vxlan",
                 d["data"].encode(), None, ip_network(d["subnet6"]) if d.get("subnet6") else None,
                 ip_address(d["public_ipv6"]) if d.get("public_ipv6") else None,
                 d["data6"].encode() if d.get("data6") else None)

args = json.loads(sys.argv[1])
ext = netlink.find_interface(netlink.IfaceChoice(names=("eth0",)))
net = KernelVxlanNetwork(parse_config(json.dumps(args["config"])), ext, ext.address,
                         ip_address(args["public_ipv6"]))
net.open()
own = dict(args["own"], data=net.backend_data.decode(), data6=net.backend_v6_data.decode())
net.start(lease(own), [])
print(json.dumps(own), flush=True)
def settled(subnet, present):
    # The routes are programmed by a worker thread: answer once it has done this change.
    end = time.monotonic() + 10
    while (net.peer_stats(ip_network(subnet)) is not None) != present \
            and time.monotonic() < end:
        time.sleep(0.01)

def stats():
    # The totals and every planned peer's row (status pages through them; here all at once).
    return {**net.stats(), "peers": {str(ident): net.peer_stats(ident)
                                     for ident in list(net._routes.plans)}}

for line in sys.stdin:
    op, arg = line.split(" ", 1)
    if op == "add":
        peer = lease(json.loads(arg))
        net.add_peer(peer)
        settled(str(peer.subnet), True)
    else:
        net.remove_peer(ip_network(arg.strip()))
        settled(arg.strip(), False)
    print(json.dumps(stats()), flush=True)
net.close()
print("closed", flush=True)
"""


@dataclass
class Driven:
    host: Host
    proc: subprocess.Popen
    lease: dict

    def send(self, line: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> str:
        out, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err
        return out


def drive(host: Host, subnet: str, subnet6: str, config: dict = CONFIG) -> Driven:
    own = {"subnet": subnet, "subnet6": subnet6, "public_ip": host.underlay_ip,
           "public_ipv6": host.underlay_ipv6}
    proc = host.popen(sys.executable, "-c", DRIVER,
                      json.dumps({"config": config, "public_ipv6": host.underlay_ipv6,
                                  "own": own}),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise AssertionError(f"driver in {host.label} failed: {proc.communicate()[1]}")
    return Driven(host, proc, json.loads(line))


def flanneld_lease(node: KernelVxlanNode) -> dict:
    value = json.loads(node.lease_value())
    return {"subnet": str(node.subnet), "subnet6": str(node.ipv6_subnet),
            "public_ip": value["PublicIP"], "public_ipv6": value["PublicIPv6"],
            "data": json.dumps(value["BackendData"], separators=(",", ":")),
            "data6": json.dumps(value["BackendV6Data"], separators=(",", ":"))}


def mac_of(data: str) -> str:
    return json.loads(data)["VtepMAC"]


@dataclass
class Cluster:
    topo: Topology
    flanneld: KernelVxlanNode
    driven: list[Driven]
    pods: dict[str, Pod]


def connect(flanneld: KernelVxlanNode, driven: list[Driven]) -> None:
    """Every node learns every other's lease, as from the store."""
    leases = [flanneld_lease(flanneld)] + [d.lease for d in driven]
    for d in driven:
        for lease in leases:
            if lease["subnet"] != d.lease["subnet"]:
                d.send("add " + json.dumps(lease))
    for lease in leases[1:]:
        flanneld.add_peer(lease["subnet"], lease["public_ip"], mac_of(lease["data"]))
        flanneld.add_peer6(lease["subnet6"], lease["public_ipv6"], mac_of(lease["data6"]))


@pytest.fixture(scope="module")
def cluster(module_topology) -> Iterator[Cluster]:
    topo = module_topology(3, ipv6=True)
    h1, h2, h3 = topo.hosts
    flanneld = KernelVxlanNode(h1, "10.244.1.0/24", ipv6_subnet=f"{V6_PREFIX}1::/64")
    driven = [drive(h, f"10.244.{h.index}.0/24", f"{V6_PREFIX}{h.index}::/64") for h in (h2, h3)]
    try:
        connect(flanneld, driven)
        pods = {h.label: topo.add_pod(h, f"10.244.{h.index}.1/24", 1430,
                                      f"{V6_PREFIX}{h.index}::1/64") for h in topo.hosts}
        yield Cluster(topo, flanneld, driven, pods)
    finally:
        for d in driven:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()


def test_flannel_v6_device_is_flanneld_s(cluster: Cluster):
    for d in cluster.driven:
        host = d.host
        link = host.link(DEV6)
        assert link is not None, f"{host.label} has no {DEV6}"
        info = link["linkinfo"]["info_data"]
        assert link["linkinfo"]["info_kind"] == "vxlan"
        assert (info["id"], info["local6"], info["port"], info["learning"], info["link"]) == (
            1, host.underlay_ipv6, 8472, False, "eth0")
        # every other attribute (udp_csum, udp_zero_csum6_*, ttl, ageing...) as flanneld's node
        theirs = cluster.flanneld.host.link(DEV6)["linkinfo"]["info_data"]
        assert {**info, "local6": None} == {**theirs, "local6": None}
        assert link["mtu"] == 1430  # an IPv6 underlay costs 70 bytes, the kernel's default
        assert link["address"] == mac_of(d.lease["data6"]) != mac_of(d.lease["data"])
        assert json.loads(d.lease["data6"])["VNI"] == 1
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet6" and a["scope"] == "global"] == [
            (f"{V6_PREFIX}{host.index}::", 128)]
        assert host.run("sysctl", "-n", f"net/ipv6/conf/{DEV6}/accept_ra").stdout.strip() == "0"
        # the v4 device is as before
        assert host.link("flannel.1")["linkinfo"]["info_data"]["local"] == host.underlay_ip


def test_each_remote_v6_subnet_gets_neighbour_fdb_and_onlink_route(cluster: Cluster):
    leases = [flanneld_lease(cluster.flanneld)] + [d.lease for d in cluster.driven]
    for d in cluster.driven:
        host = d.host
        neigh = {n["dst"]: n for n in host.ip_json("-6", "neigh", "show", "dev", DEV6)}
        fdb = {f["mac"]: f for f in json.loads(
            host.run("bridge", "-j", "fdb", "show", "dev", DEV6).stdout) if "dst" in f}
        for lease in leases:
            if lease is d.lease:
                continue
            gateway, mac = lease["subnet6"].split("/")[0], mac_of(lease["data6"])
            assert neigh[gateway]["lladdr"] == mac and "PERMANENT" in neigh[gateway]["state"]
            assert fdb[mac]["dst"] == lease["public_ipv6"] and fdb[mac]["state"] == "permanent"
            [route] = host.ip_json("-6", "route", "show", "exact", lease["subnet6"])
            assert (route["gateway"], route["dev"], route["flags"]) == (gateway, DEV6,
                                                                        ["onlink"])


def test_every_pod_reaches_every_other_over_v4_and_v6(cluster: Cluster):
    assert not ping_failures(cluster.pods)
    for label, pod in cluster.pods.items():
        targets = [p.address6 for p in cluster.pods.values() if p is not pod]
        results = pod.ping(*targets, count=3)
        assert all(r.ok for r in results.values()), (label, results)


@pytest.mark.parametrize("sender, receiver, ipv6, port", [
    ("h1", "h2", True, 7401), ("h2", "h1", True, 7402), ("h2", "h3", True, 7403),
    ("h3", "h2", True, 7404), ("h1", "h3", True, 7405), ("h3", "h1", True, 7406),
    ("h1", "h2", False, 7407), ("h2", "h3", False, 7408), ("h3", "h1", False, 7409),
])
def test_tcp_transfer_arrives_intact(cluster: Cluster, sender, receiver, ipv6, port):
    src, dst = cluster.pods[sender], cluster.pods[receiver]
    assert src.tcp_transfer(dst, port, 8 << 20, ipv6=ipv6) == {
        "sent": 8 << 20, "received": 8 << 20, "intact": True}


def test_a_lease_removed_takes_its_v6_entries_and_added_back_restores_them(cluster: Cluster):
    d, other = cluster.driven
    host, subnet6 = d.host, other.lease["subnet6"]

    def entries() -> tuple[bool, bool, bool]:
        mac = mac_of(other.lease["data6"])
        fdb = json.loads(host.run("bridge", "-j", "fdb", "show", "dev", DEV6).stdout)
        return (any(n.get("lladdr") == mac for n in host.ip_json("-6", "neigh", "show",
                                                                   "dev", DEV6)),
                any(f["mac"] == mac for f in fdb),
                bool(host.ip_json("-6", "route", "show", "exact", subnet6)))

    assert entries() == (True, True, True)
    d.send("remove " + other.lease["subnet"])
    wait_until(lambda: entries() == (False, False, False), 3, f"{host.label} to drop {subnet6}")
    d.send("add " + json.dumps(other.lease))
    wait_until(lambda: entries() == (True, True, True), 3, f"{host.label} to add {subnet6}")
    target = cluster.pods[other.host.label].address6
    assert cluster.pods[host.label].ping(target, count=2)[target].ok


def test_v6_entries_deleted_by_hand_come_back_at_the_next_resync(cluster: Cluster):
    d, other = cluster.driven
    host, subnet6 = d.host, other.lease["subnet6"]
    gateway, mac = subnet6.split("/")[0], mac_of(other.lease["data6"])
    host.run("ip", "-6", "route", "del", subnet6)
    host.run("ip", "-6", "neigh", "del", gateway, "dev", DEV6)
    host.run("bridge", "fdb", "del", mac, "dev", DEV6, "self")

    def back() -> bool:
        fdb = json.loads(host.run("bridge", "-j", "fdb", "show", "dev", DEV6).stdout)
        return (bool(host.ip_json("-6", "route", "show", "exact", subnet6))
                and bool(host.ip_json("-6", "neigh", "show", gateway, "dev", DEV6))
                and any(f["mac"] == mac and f.get("dst") == other.lease["public_ipv6"]
                        for f in fdb))

    wait_until(back, 5, f"{host.label}'s v6 entries for {subnet6} to come back")


def test_status_shows_the_v6_device_and_each_peer_s_v6_path(cluster: Cluster):
    d = cluster.driven[0]
    stats = d.send("add " + json.dumps(cluster.driven[1].lease))
    assert stats["lease"]["ipv6_device"] == DEV6
    assert stats["lease"]["ipv6_vtep_mac"] == mac_of(d.lease["data6"])
    peer = stats["peers"][cluster.driven[1].lease["subnet"]]
    assert (peer["path"], peer["ipv6_path"], peer["ipv6_vtep_mac"]) == (
        "vxlan", "vxlan", mac_of(cluster.driven[1].lease["data6"]))


def test_direct_routing_routes_v6_peers_on_the_link_via_their_public_ipv6(topology):
    topo = topology(3, segments=[0, 0, 1], ipv6=True)
    h1, h2, h3 = topo.hosts
    config = {**CONFIG, "Backend": {**CONFIG["Backend"], "DirectRouting": True}}
    driven = [drive(h, f"10.244.{h.index}.0/24", f"{V6_PREFIX}{h.index}::/64", config)
              for h in topo.hosts]
    try:
        for d in driven:
            for other in driven:
                if other is not d:
                    d.send("add " + json.dumps(other.lease))
        pods = {h.label: topo.add_pod(h, f"10.244.{h.index}.1/24", 1430,
                                      f"{V6_PREFIX}{h.index}::1/64") for h in topo.hosts}
        # h1 and h2 share a segment: a plain route via the PublicIPv6 on eth0, no device entry
        [route] = h1.ip_json("-6", "route", "show", "exact", f"{V6_PREFIX}2::/64")
        assert (route["gateway"], route["dev"]) == (h2.underlay_ipv6, "eth0")
        assert not h1.ip_json("-6", "neigh", "show", "dev", DEV6, f"{V6_PREFIX}2::")
        # h3 sits behind the router: encapsulated on flannel-v6.1, as flanneld decides
        [route] = h1.ip_json("-6", "route", "show", "exact", f"{V6_PREFIX}3::/64")
        assert (route["gateway"], route["dev"], route["flags"]) == (
            f"{V6_PREFIX}3::", DEV6, ["onlink"])
        stats = driven[0].send("add " + json.dumps(driven[1].lease))
        assert stats["peers"]["10.244.2.0/24"]["ipv6_path"] == "direct"
        assert stats["peers"]["10.244.3.0/24"]["ipv6_path"] == "vxlan"
        for label, pod in pods.items():
            targets = [p.address6 for p in pods.values() if p is not pod]
            results = pod.ping(*targets, count=2)
            assert all(r.ok for r in results.values()), (label, results)
        assert pods["h1"].tcp_transfer(pods["h2"], 7410, 4 << 20, ipv6=True)["intact"]
    finally:
        for d in driven:
            if d.proc.poll() is None:
                d.proc.stdin.close()
                d.proc.wait(20)


def test_close_removes_both_devices_and_their_entries(topology):
    topo = topology(2, ipv6=True)
    h1, h2 = topo.hosts
    d1 = drive(h1, "10.244.1.0/24", f"{V6_PREFIX}1::/64")
    d2 = drive(h2, "10.244.2.0/24", f"{V6_PREFIX}2::/64")
    try:
        d1.send("add " + json.dumps(d2.lease))
        assert h1.ip_json("-6", "route", "show", "exact", f"{V6_PREFIX}2::/64")
    finally:
        assert d1.close().strip().endswith("closed")
        d2.close()
    assert h1.link(DEV6) is None and h1.link("flannel.1") is None
    assert not h1.ip_json("-6", "route", "show", f"{V6_PREFIX}2::/64")
