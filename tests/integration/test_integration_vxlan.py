"""End to end, vxlan backend, and interop with Linux's kernel VXLAN as flanneld programs it.

One shared cluster of five hosts on one bridge: h1 and h2 are plain kernel VXLAN nodes
(`KernelVxlanNode`: flannel.1, nolearning, neighbour + FDB entry + onlink route per remote
lease), h1 sending frames with UDP checksums and h2 with zero checksums, both with their
underlay's offloads as they come (a veth passes their frames on with inner checksums partial
and as 64 KB GSO frames, as between nodes that are containers on one machine); h3, h4 and h5
run flannel-udp vxlan daemons, h5 with FLANNEL_UDP_OFFLOADS=0. Every host has a pod.
The kernel nodes publish their leases as flanneld writes them and learn the flannel-udp nodes'
VtepMACs from the leases in the store, as flanneld does. No mocks; every packet stays inside the
test's namespaces.

Tests that change the shared cluster put it back as they found it; those that need a daemon to
fail build their own topology."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    flanneld_lease,
    lease_key,
    program_from_store,
    publish,
    refused_run,
    stored_leases,
)

from flannel_udp.lab import (
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

NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
# The userspace dataplane by name: "auto", the default, would take the kernel's VXLAN device.
VXLAN_CONFIG = {"Network": str(NETWORK), "Backend": {"Type": "vxlan", "Dataplane": "userspace"}}
KERNEL_SUBNETS = ("10.244.201.0/24", "10.244.202.0/24")
POD_MTU = 1500 - 50
TUN = "flvx.1"


@dataclass
class Cluster:
    topo: Topology
    kernel: list[KernelVxlanNode]  # h1 (udpcsum), h2 (noudpcsum)
    userspace: list[Host]  # h3, h4, h5: flannel-udp vxlan daemons
    pods: dict[str, Pod]  # by host label
    leases: dict[str, dict]  # userspace host label -> lease as `status` reports it


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    topo = module_topology(5)
    h1, h2, *userspace = topo.hosts
    kernel = [KernelVxlanNode(h1, KERNEL_SUBNETS[0], udp_csum=True),
              KernelVxlanNode(h2, KERNEL_SUBNETS[1], udp_csum=False)]
    for node in kernel:
        publish(node, topo.store_path)
    net_config = topo.write_net_config(VXLAN_CONFIG)
    for host in userspace:
        host.start_flannel(topo.store_path, net_config, env={
            "FLANNEL_UDP_OFFLOADS": "0" if host is userspace[-1] else "1"})
    for host in userspace:
        host.wait_ready(20)
    leases = topo.wait_peers(userspace, 20)
    for host in userspace:
        wait_until(lambda h=host: set(KERNEL_SUBNETS) <= h.peer_subnets(), 5,
                   f"{host.label} to list the kernel nodes as peers")
    for node in kernel:
        program_from_store(node, topo.store_path)
    pods = {node.host.label: topo.add_pod(node.host, f"{node.subnet.network_address + 1}/24",
                                          POD_MTU) for node in kernel}
    pods.update({host.label: topo.add_pod(host) for host in userspace})
    return Cluster(topo, kernel, userspace, pods, leases)


def vtep_mac_of(host: Host) -> str:
    return host.status()["lease"]["vtep_mac"]


# -- traffic between kernel and userspace nodes, both ways -----------------------------------


def test_every_pod_reaches_every_other_pod_across_kernel_and_userspace_vxlan_nodes(
        cluster: Cluster):
    failures = ping_failures(cluster.pods)
    assert not failures, "\n".join(failures)


TRANSFER = 100 << 20


@pytest.mark.parametrize("ours", ["h3", "h5"], ids=["offloads-on", "offloads-off"])
@pytest.mark.parametrize("kernel", ["h1", "h2"], ids=["udpcsum", "noudpcsum"])
@pytest.mark.parametrize("to_us", [True, False], ids=["kernel-to-userspace",
                                                      "userspace-to-kernel"])
def test_100_mb_between_kernel_and_userspace_nodes_arrive_intact(cluster: Cluster, kernel, ours,
                                                                 to_us):
    """The kernel nodes' frames as a veth hands them on (partial inner checksums, GSO frames)
    reach our pods intact; the completions are counted."""
    receiver = next(h for h in cluster.userspace if h.label == ours)
    before = receiver.status()["counters"]
    src, dst = cluster.pods[kernel], cluster.pods[ours]
    if not to_us:
        src, dst = dst, src
    port = 7100 + 10 * int(kernel[1]) + int(ours[1]) + (0 if to_us else 5)
    assert src.tcp_transfer(dst, port, TRANSFER, timeout=120) == {
        "sent": TRANSFER, "received": TRANSFER, "intact": True}
    after = receiver.status()
    assert after["offloads"]["tun_vnet_hdr"] is (ours == "h3")
    assert not any(after["counters"]["drops"].values()), after["counters"]["drops"]
    if to_us:  # every data segment, and the handshake, came with a partial checksum
        assert after["counters"]["csum_completed"] > before["csum_completed"]


def test_status_shows_the_partial_checksums_completed(cluster: Cluster):
    host = cluster.userspace[0]
    target = cluster.pods[host.label]
    assert cluster.pods["h1"].tcp_transfer(target, 7199, 1 << 20)["intact"]
    completed = host.status()["counters"]["csum_completed"]
    assert completed > 0
    text = host.flannel("status", "--control-socket", host.control_socket).stdout
    assert re.search(r"^checksums completed \d+ ", text, re.M), text


def test_userspace_to_userspace_transfer_of_10_mb_arrives_intact(cluster: Cluster):
    src, dst = cluster.pods["h3"], cluster.pods["h5"]
    assert src.tcp_transfer(dst, 7103, 10 << 20) == {
        "sent": 10 << 20, "received": 10 << 20, "intact": True}


CAPTURE = r"""
import json, socket, struct, sys
port, wanted, seen = int(sys.argv[1]), set(sys.argv[2:]), {}
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
sock.bind(("eth0", 0))
sock.settimeout(10)
print("ready", flush=True)
while wanted - seen.keys():
    ip = sock.recv(65535)[14:]
    ihl = (ip[0] & 15) * 4
    src = socket.inet_ntoa(ip[12:16])
    if ip[9] == 17 and src in wanted and struct.unpack_from("!H", ip, ihl + 2)[0] == port:
        seen[src] = struct.unpack_from("!H", ip, ihl + 6)[0]
print(json.dumps(seen))
"""


def test_frames_with_and_without_udp_checksum_from_kernel_nodes_are_accepted(cluster: Cluster):
    receiver = cluster.userspace[0]
    checksummed, zero = cluster.kernel
    capture = receiver.popen(sys.executable, "-c", CAPTURE, "8472", checksummed.host.underlay_ip,
                             zero.host.underlay_ip, stdout=subprocess.PIPE, text=True)
    assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
    before = {p["subnet"]: p.get("rx_packets", 0) for p in receiver.status()["peers"]}
    target = cluster.pods[receiver.label].address
    for node in cluster.kernel:
        result = cluster.pods[node.host.label].ping(target, count=3)[target]
        assert result.ok, f"{node.host.label} -> {receiver.label}: {result}"
    out, _ = capture.communicate(timeout=15)
    checksums = json.loads(out)
    # The frames really were of both kinds on the wire...
    assert checksums[checksummed.host.underlay_ip] != 0
    assert checksums[zero.host.underlay_ip] == 0
    # ...and both were taken in, counted against the peer their inner source belongs to.
    after = {p["subnet"]: p.get("rx_packets", 0) for p in receiver.status()["peers"]}
    for node in cluster.kernel:
        assert after[str(node.subnet)] >= before[str(node.subnet)] + 3


# -- what a node publishes and sets up -------------------------------------------------------


def test_leases_are_flannels_vxlan_leases_byte_for_byte(cluster: Cluster):
    stored = stored_leases(cluster.topo.store_path)
    macs = set()
    for host in cluster.userspace:
        lease = cluster.leases[host.label]
        mac = vtep_mac_of(host)
        # Independently of lease.encode_lease_value: flanneld's bytes.
        assert stored[lease_key(lease["subnet"])] == flanneld_lease(
            host.underlay_ip, 1, mac)
        first = int(mac.split(":")[0], 16)
        assert first & 0x01 == 0, f"{mac} is a multicast MAC"
        assert first & 0x02, f"{mac} is not locally administered"
        macs.add(mac)
    assert len(macs) == len(cluster.userspace)
    for node in cluster.kernel:  # flanneld's leases, read by every userspace node
        for host in cluster.userspace:
            peer = next(p for p in host.status()["peers"] if p["subnet"] == str(node.subnet))
            assert (peer["public_ip"], peer["vtep_mac"]) == (node.host.underlay_ip, node.mac)


def test_tun_holds_the_lease_address_with_the_network_route_and_mtu_minus_50(cluster: Cluster):
    for host in cluster.userspace:
        subnet = ipaddress.IPv4Network(cluster.leases[host.label]["subnet"])
        link = host.link(TUN)
        assert link is not None, f"{host.label}: no {TUN}"
        assert link["mtu"] == POD_MTU
        info = link.get("linkinfo", {})
        assert info.get("info_kind") == "tun"
        assert info.get("info_data", {}).get("pi") is False
        addrs = [(a["family"], a["local"], a["prefixlen"]) for a in link["addr_info"]]
        assert addrs == [("inet", str(subnet.network_address), 32)]
        routes = host.ip_json("route", "show", "exact", str(NETWORK))
        assert [r.get("dev") for r in routes] == [TUN]
        assert host.link("flannel0") is None and host.link("flannel.1") is None
        assert host.subnet_file.read_text() == (
            f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={subnet.network_address + 1}/24\n"
            f"FLANNEL_MTU={POD_MTU}\nFLANNEL_IPMASQ=false\n")


def test_status_shows_our_vtep_mac_and_each_peers(cluster: Cluster):
    expected = {str(node.subnet): node.mac for node in cluster.kernel}
    expected.update({cluster.leases[h.label]["subnet"]: vtep_mac_of(h)
                     for h in cluster.userspace})
    for host in cluster.userspace:
        status = host.status()
        assert status["lease"]["vtep_mac"] == expected[status["lease"]["subnet"]]
        assert status["lease"]["vni"] == 1
        peers = {p["subnet"]: p for p in status["peers"]}
        for subnet, mac in expected.items():
            if subnet != status["lease"]["subnet"]:
                assert peers[subnet]["vtep_mac"] == mac
                assert peers[subnet]["backend"] == "vxlan" and peers[subnet]["reachable"]
    text = cluster.userspace[0].flannel("status", "--control-socket",
                                        cluster.userspace[0].control_socket).stdout
    assert f"VtepMAC {vtep_mac_of(cluster.userspace[0])}" in text
    assert cluster.kernel[0].mac in text


def test_connect_to_an_unleased_address_fails_at_once_as_unreachable(cluster: Cluster):
    pod = cluster.pods["h3"]
    outcome = pod.tcp_connect("10.244.250.2", 80, timeout=3)
    assert outcome["error"] == "ENETUNREACH", outcome
    assert outcome["seconds"] < 1.0


# -- lease events, live ----------------------------------------------------------------------


def test_leases_of_other_types_and_malformed_vtep_macs_are_skipped_and_traffic_goes_on(
        cluster: Cluster):
    store = LocalStore(cluster.topo.store_path)
    udp_lease, bad_lease = "10.244.210.0/24", "10.244.211.0/24"
    asyncio.run(store.put_lease("10.244.210.0-24",
                                b'{"PublicIP":"192.168.77.99","PublicIPv6":null}', LEASE_TTL))
    asyncio.run(store.put_lease(
        "10.244.211.0-24", b'{"PublicIP":"192.168.77.98","PublicIPv6":null,'
        b'"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"not-a-mac"}}', LEASE_TTL))
    try:
        for host in cluster.userspace:
            wait_until(lambda h=host: {udp_lease, bad_lease} <= h.peer_subnets(), 3,
                       f"{host.label} to see the new leases")
            peers = {p["subnet"]: p for p in host.status()["peers"]}
            assert not peers[udp_lease]["reachable"] and not peers[bad_lease]["reachable"]
            assert "vtep_mac" not in peers[bad_lease]  # no route was made for it
            log = host.log_tail(200)
            assert re.search(rf"peer {udp_lease} .*runs backend udp, not vxlan", log), log
            assert re.search(rf"peer {bad_lease} .*VtepMAC \"not-a-mac\"", log), log
        target = cluster.pods["h3"].address
        assert cluster.pods["h1"].ping(target, count=2)[target].ok
    finally:
        asyncio.run(store.delete_lease("10.244.210.0-24"))
        asyncio.run(store.delete_lease("10.244.211.0-24"))
    for host in cluster.userspace:
        wait_until(lambda h=host: not {udp_lease, bad_lease} & h.peer_subnets(), 3,
                   f"{host.label} to drop the deleted leases")


def set_kernel_mac(node: KernelVxlanNode, mac: str, store: Path) -> None:
    """A kernel node's device gets a new MAC (as when flanneld re-creates flannel.1); the MAC
    change flushes its neighbour entries, which flanneld then adds back from the leases."""
    node.host.run("ip", "link", "set", node.dev, "address", mac)
    node.mac = mac
    program_from_store(node, store)


def test_a_kernel_nodes_new_vtep_mac_is_applied_live(cluster: Cluster):
    node, store = cluster.kernel[1], cluster.topo.store_path
    target, source = cluster.pods[node.host.label], cluster.pods["h3"]
    old_mac, new_mac = node.mac, "0e:fa:00:00:00:42"
    set_kernel_mac(node, new_mac, store)
    try:
        # The kernel drops frames for its old MAC: our route must follow the lease.
        assert not source.ping(target.address, count=2, timeout=0.5)[target.address].ok
        publish(node, store)
        for host in cluster.userspace:
            wait_until(lambda h=host: any(p.get("vtep_mac") == new_mac
                                          for p in h.status()["peers"]), 3,
                       f"{host.label} to route {node.subnet} to {new_mac}")
        assert source.ping(target.address, count=3)[target.address].ok
    finally:
        set_kernel_mac(node, old_mac, store)
        publish(node, store)
    for host in cluster.userspace:
        wait_until(lambda h=host: any(p.get("vtep_mac") == old_mac
                                      for p in h.status()["peers"]), 3,
                   f"{host.label} to route {node.subnet} to {old_mac} again")


def test_restart_keeps_lease_and_vtep_mac_so_kernel_peers_need_no_change(cluster: Cluster):
    host = cluster.userspace[-1]
    key = lease_key(cluster.leases[host.label]["subnet"])
    value = stored_leases(cluster.topo.store_path)[key]
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert host.link(TUN) is None
    host.start_flannel(cluster.topo.store_path)
    host.wait_ready()
    assert host.lease()["subnet"] == cluster.leases[host.label]["subnet"]
    assert stored_leases(cluster.topo.store_path)[key] == value
    # The kernel node was not touched: its neighbour and FDB entries are still right.
    target = cluster.pods[host.label].address
    assert cluster.pods["h1"].ping(target, count=3)[target].ok


# -- user errors: one line, exit 2, nothing left behind --------------------------------------


def run_expecting_user_error(host: Host, topo: Topology, config: dict) -> str:
    """Start a daemon that must refuse to start; its one error line."""
    line = refused_run(host, "--local-store", topo.store_path, "--net-config-path",
                       topo.write_net_config(config), "--subnet-file", host.subnet_file,
                       "--control-socket", host.control_socket, "--iface", "eth0")
    assert host.link(TUN) is None
    return line


@pytest.mark.parametrize("options, field", [
    ({"Dataplane": "ebpf"}, "Backend.Dataplane"),
    ({"DirectRouting": 1}, "Backend.DirectRouting"),
    ({"VNI": 0}, "Backend.VNI"),
    ({"Port": 70000}, "Backend.Port"),
    ({"MTU": "1500"}, "Backend.MTU"),
    ({"MTU": 100}, "Backend.MTU"),
])
def test_run_refuses_bad_vxlan_options_naming_the_field(topology, options, field):
    topo = topology(1)
    config = {"Network": str(NETWORK), "Backend": {"Type": "vxlan", **options}}
    assert field in run_expecting_user_error(topo.hosts[0], topo, config)


def test_run_refuses_an_underlay_too_small_for_vxlan(topology):
    topo = topology(1)
    host = topo.hosts[0]
    host.run("ip", "link", "set", "eth0", "mtu", "100")
    line = run_expecting_user_error(host, topo, VXLAN_CONFIG)
    assert "eth0's MTU 100 is too small" in line


UDP_GSO_SEND = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(17, 103, 1000)  # UDP_SEGMENT: each send leaves as 4 datagrams of 1000 bytes
for i in range(5):
    sock.sendto(bytes([i]) * 4000, (sys.argv[1], 7200))
"""

UDP_RECEIVE = r"""
import json, socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 7200))
sock.settimeout(3)
print("ready", flush=True)
got = []
try:
    while len(got) < 20:
        got.append(sock.recv(65535).hex())
except socket.timeout:
    pass
print(json.dumps(got))
"""


def test_udp_segments_of_a_kernel_senders_gso_frame_arrive_as_the_datagrams_sent(cluster: Cluster):
    """A pod's UDP_SEGMENT send through kernel VXLAN crosses the veth as one GSO frame, which
    our UDP_GRO socket reads whole, with the inner segment size as its GRO size. (Without
    UDP_GRO, FLANNEL_UDP_OFFLOADS=0, the kernel splits it before the socket.)"""
    dst = cluster.pods["h3"]
    receiver = dst.popen(sys.executable, "-c", UDP_RECEIVE, stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    cluster.pods["h1"].run(sys.executable, "-c", UDP_GSO_SEND, dst.address)
    out, _ = receiver.communicate(timeout=15)
    assert [bytes.fromhex(d) for d in json.loads(out)] == [
        bytes([i]) * 1000 for i in range(5) for _ in range(4)]
