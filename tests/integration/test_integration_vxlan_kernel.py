"""End to end, vxlan backend on the kernel dataplane, and Dataplane "auto" in both outcomes.

One cluster on one bridge, network config `Dataplane: "auto"`: h1 is a kernel VXLAN node set up
by hand as flanneld does (`KernelVxlanNode`); h2 and h4 run flannel-udp daemons that get the
kernel's VXLAN device; h3 runs one that can't (a bridge already holds the name `flannel.1`) and
falls back to the userspace dataplane. Every kernel node keeps its underlay's offloads as they
come: its frames reach the userspace node with inner checksums partial and as GSO frames."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from dataclasses import dataclass

import pytest
from helpers import lease_key, program_from_store, publish, stored_leases

from flannel_udp.lab import (
    FLANNEL_UDP,
    Host,
    KernelVxlanNode,
    Pod,
    Topology,
    ping_failures,
    wait_until,
)
from flannel_udp.lease import LEASE_TTL
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

NETWORK = "10.244.0.0/16"
AUTO_CONFIG = {"Network": NETWORK, "Backend": {"Type": "vxlan", "Dataplane": "auto"}}
KERNEL_CONFIG = {"Network": NETWORK, "Backend": {"Type": "vxlan", "Dataplane": "kernel"}}
FLANNELD_SUBNET = "10.244.201.0/24"
DEV = "flannel.1"


@dataclass
class Cluster:
    topo: Topology
    flanneld: KernelVxlanNode  # h1
    kernel: list[Host]  # h2, h4: flannel-udp on the kernel dataplane
    userspace: Host  # h3: flannel-udp fallen back to userspace
    pods: dict[str, Pod]
    leases: dict[str, dict]


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    topo = module_topology(4)
    h1, h2, h3, h4 = topo.hosts
    flanneld = KernelVxlanNode(h1, FLANNELD_SUBNET)
    publish(flanneld, topo.store_path)
    h3.run("ip", "link", "add", DEV, "type", "bridge")  # the name clash that forces userspace
    leases = topo.start_daemons(AUTO_CONFIG, [h2, h3, h4])
    program_from_store(flanneld, topo.store_path)
    pods = {h.label: topo.add_pod(h) for h in (h2, h3, h4)}
    pods["h1"] = topo.add_pod(h1, f"{flanneld.subnet.network_address + 1}/24", 1450)
    return Cluster(topo, flanneld, [h2, h4], h3, pods, leases)


def fdb_entries(host: Host) -> list[dict]:
    return json.loads(host.run("bridge", "-j", "fdb", "show", "dev", DEV).stdout or "[]")


def peer_subnets(cluster: Cluster, host: Host) -> dict[str, str]:
    """Every other node's subnet -> its underlay IP."""
    nodes = {cluster.flanneld.subnet.with_prefixlen: cluster.flanneld.host.underlay_ip}
    nodes.update({cluster.leases[h.label]["subnet"]: h.underlay_ip
                  for h in (*cluster.kernel, cluster.userspace)})
    return {s: ip for s, ip in nodes.items() if ip != host.underlay_ip}


def test_auto_takes_the_kernel_device_where_it_can_and_userspace_where_it_cannot(
        cluster: Cluster):
    for host in cluster.kernel:
        assert host.status()["lease"]["dataplane"] == "kernel"
        assert "vxlan dataplane: kernel (flannel.1), chosen by Dataplane \"auto\"" in \
            host.log_tail(100)
        assert host.link("flvx.1") is None
    h3 = cluster.userspace
    assert h3.status()["lease"]["dataplane"] == "userspace"
    assert re.search(r" W vxlan dataplane: userspace \(TUN flvx\.1\), as the kernel's is not "
                     r"available: cannot create VXLAN device flannel\.1: a bridge device",
                     h3.log_tail(100)), h3.log_tail(100)
    assert h3.link("flvx.1") is not None
    text = cluster.kernel[0].flannel("status", "--control-socket",
                                     cluster.kernel[0].control_socket).stdout
    assert "dataplane kernel" in text


def test_the_kernel_device_is_programmed_as_flanneld_programs_it(cluster: Cluster):
    for host in cluster.kernel:
        lease = host.status()["lease"]
        subnet_net = lease["subnet"].split("/")[0]
        link = host.link(DEV)
        assert link is not None
        info = link["linkinfo"]["info_data"]
        assert link["linkinfo"]["info_kind"] == "vxlan"
        assert (info["id"], info["local"], info["port"], info["learning"]) == (
            1, host.underlay_ip, 8472, False)
        assert info["link"] == "eth0"
        assert link["mtu"] == 1450 and link["address"] == lease["vtep_mac"]
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet"] == [(subnet_net, 32)]
        assert host.subnet_env()["FLANNEL_MTU"] == "1450"
        macs = {p["subnet"]: p["vtep_mac"] for p in host.status()["peers"]}
        neigh = {n["dst"]: n for n in host.ip_json("neigh", "show", "dev", DEV)}
        fdb = {f["mac"]: f for f in fdb_entries(host) if "dst" in f}
        for subnet, public_ip in peer_subnets(cluster, host).items():
            gateway = subnet.split("/")[0]
            mac = macs[subnet]
            assert neigh[gateway]["lladdr"] == mac and "PERMANENT" in neigh[gateway]["state"]
            assert fdb[mac]["dst"] == public_ip and fdb[mac]["state"] == "permanent"
            [route] = host.ip_json("route", "show", "exact", subnet)
            assert (route["gateway"], route["dev"], route["flags"]) == (gateway, DEV,
                                                                        ["onlink"])


def test_every_pod_reaches_every_other_across_kernel_userspace_and_flanneld_nodes(
        cluster: Cluster):
    failures = ping_failures(cluster.pods)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("sender, receiver, port", [
    ("h2", "h3", 7301),  # kernel dataplane -> userspace dataplane
    ("h3", "h2", 7302),  # userspace -> kernel
    ("h1", "h4", 7303),  # flanneld's kernel node -> kernel dataplane
    ("h1", "h3", 7304),  # flanneld's kernel node -> userspace dataplane
])
def test_tcp_transfer_arrives_intact(cluster: Cluster, sender, receiver, port):
    src, dst = cluster.pods[sender], cluster.pods[receiver]
    assert src.tcp_transfer(dst, port, 4 << 20) == {
        "sent": 4 << 20, "received": 4 << 20, "intact": True}


def test_a_lease_put_and_deleted_adds_and_removes_the_three_entries_live(cluster: Cluster):
    store = LocalStore(cluster.topo.store_path)
    subnet, key, mac = "10.244.220.0/24", "10.244.220.0-24", "0e:fa:00:00:00:77"
    value = ('{"PublicIP":"192.168.77.70","PublicIPv6":null,"BackendType":"vxlan",'
             f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}').encode()
    host = cluster.kernel[0]

    def entries() -> tuple[bool, bool, bool]:
        return (any(n.get("lladdr") == mac for n in host.ip_json("neigh", "show", "dev", DEV)),
                any(f["mac"] == mac for f in fdb_entries(host)),
                bool(host.ip_json("route", "show", "exact", subnet)))

    asyncio.run(store.put_lease(key, value, LEASE_TTL))
    try:
        wait_until(lambda: entries() == (True, True, True), 3, f"{host.label} to add {subnet}")
    finally:
        asyncio.run(store.delete_lease(key))
    wait_until(lambda: entries() == (False, False, False), 3, f"{host.label} to drop {subnet}")


def test_dataplane_kernel_by_name_restart_cleans_up_keeps_lease_and_vtep_mac(cluster: Cluster):
    host, store = cluster.kernel[1], LocalStore(cluster.topo.store_path)
    key = lease_key(cluster.leases[host.label]["subnet"])
    value = stored_leases(cluster.topo.store_path)[key]
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert host.link(DEV) is None  # unlike flanneld, the device goes with the daemon
    assert stored_leases(cluster.topo.store_path)[key] == value  # the lease stays
    asyncio.run(store.set_config(json.dumps(KERNEL_CONFIG).encode()))
    try:
        host.start_flannel(cluster.topo.store_path)
        host.wait_ready()
    finally:
        asyncio.run(store.set_config(json.dumps(AUTO_CONFIG).encode()))
    lease = host.status()["lease"]
    assert lease["dataplane"] == "kernel" and "dataplane_choice" not in lease
    assert stored_leases(cluster.topo.store_path)[key] == value  # same subnet, same VtepMAC
    target = cluster.pods[host.label].address
    for label in ("h1", "h3"):
        assert cluster.pods[label].ping(target, count=2)[target].ok, label


def test_dataplane_kernel_where_the_device_cannot_be_made_exits_with_one_line(topology):
    topo = topology(1)
    host = topo.hosts[0]
    host.run("ip", "link", "add", DEV, "type", "bridge")
    result = host.run(*FLANNEL_UDP, "run", "--local-store", topo.store_path,
                      "--net-config-path", topo.write_net_config(KERNEL_CONFIG),
                      "--subnet-file", host.subnet_file, "--control-socket",
                      host.control_socket, "--iface", "eth0", check=False, timeout=20)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot create VXLAN device flannel.1: a bridge device of that name exists" in last
    assert host.link("flvx.1") is None
