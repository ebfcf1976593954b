"""End to end on etcd: real daemons in host namespaces following a real etcd, real TUNs, pods.

etcd runs inside the topology's switch namespace, on 192.168.77.2 on the bridge every host is
plugged into: the hosts reach it over their eth0 as they would reach an etcd cluster on their
network, and no traffic leaves the namespaces the test made (an etcd on the root namespace's
loopback would be out of the hosts' reach). Leases are written and deleted by hand with
etcdctl, as flannel writes them.

The shared cluster: h1 and h2 run daemons with a pod each; h3 runs none and plays a node whose
lease is put by hand (a UDP socket on its port 8285 shows what reaches it)."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import pytest

from flannel_udp.lab import (
    DEFAULT_NETWORK_CONFIG,
    LEASE_EVENT_BOUND,
    EtcdCluster,
    Host,
    Pod,
    Topology,
    etcd_problem,
    wait_until,
)

pytestmark = pytest.mark.netns

PREFIX = "/coreos.com/network"
UDP_SINK = ("import json, socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.bind(('0.0.0.0', 8285)); s.settimeout(30); print('bound', flush=True); "
            "d, a = s.recvfrom(65535); "
            "print(json.dumps({'from': a[0], 'inner_dst': socket.inet_ntoa(d[16:20])}))")


@dataclass
class Cluster:
    topo: Topology
    etcd: EtcdCluster
    daemons: list[Host]  # h1, h2
    bystander: Host  # h3: no daemon
    pods: list[Pod]


def lease_value(public_ip: str) -> str:
    return f'{{"PublicIP":"{public_ip}","PublicIPv6":null}}'


def put_lease_by_hand(etcd: EtcdCluster, subnet: str, public_ip: str,
                      member: int | None = None) -> float:
    """As flannel writes a lease: a 24 h etcd lease, the key bound to it. When it was put."""
    out = etcd.etcdctl("lease", "grant", "86400", member=member).stdout
    lease_id = re.search(r"lease ([0-9a-f]+) granted", out).group(1)
    etcd.etcdctl("put", f"--lease={lease_id}", f"{PREFIX}/subnets/{subnet.replace('/', '-')}",
                 input=lease_value(public_ip), member=member)
    return time.time()


def stored_leases(etcd: EtcdCluster) -> dict[str, dict]:
    """key -> {'value': bytes, 'lease': id} for every key under the prefix."""
    out = json.loads(etcd.etcdctl("get", "--prefix", f"{PREFIX}/", "-w", "json").stdout)
    return {base64.b64decode(kv["key"]).decode(): {"value": base64.b64decode(kv["value"]),
                                                   "lease": kv.get("lease", 0)}
            for kv in out.get("kvs", [])}


def log_time(host: Host, pattern: str) -> float | None:
    """When the daemon logged a line matching `pattern` (the last such line), or None."""
    found = None
    for line in host.log_path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            found = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


def require_etcd() -> None:
    problem = etcd_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    require_etcd()
    topo = module_topology(3)
    etcd = EtcdCluster.in_topology(topo).start()
    h1, h2, h3 = topo.hosts
    topo.start_daemons(DEFAULT_NETWORK_CONFIG, [h1, h2], *etcd.client_flags())
    pods = [topo.add_pod(h1), topo.add_pod(h2)]
    yield Cluster(topo, etcd, [h1, h2], h3, pods)
    etcd.cleanup()


def test_leases_and_config_in_etcd_are_flannels_byte_for_byte(cluster: Cluster):
    stored = stored_leases(cluster.etcd)
    config = cluster.topo.dir / "net-conf.json"
    assert stored.pop(f"{PREFIX}/config")["value"] == config.read_bytes()
    expected = {}
    for host in cluster.daemons:
        subnet = host.lease()["subnet"]
        expected[f"{PREFIX}/subnets/{subnet.replace('/', '-')}"] = lease_value(
            host.underlay_ip).encode()
    assert {k: v["value"] for k, v in stored.items()} == expected
    for key, kv in stored.items():
        ttl = cluster.etcd.etcdctl("lease", "timetolive", f"{kv['lease']:x}").stdout
        assert "granted with TTL(86400s)" in ttl, (key, ttl)


def test_a_lease_put_by_hand_is_a_route_within_a_second_and_gone_a_second_after_delete(
        cluster: Cluster):
    h1, h3, pod = cluster.daemons[0], cluster.bystander, cluster.pods[0]
    subnet = "10.244.200.0/24"
    sink = h3.popen(sys.executable, "-c", UDP_SINK, stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None and sink.stdout.readline().strip() == "bound"

    put_at = put_lease_by_hand(cluster.etcd, subnet, h3.underlay_ip)
    wait_until(lambda: subnet in h1.peer_subnets(), 5, f"h1 to list {subnet}")
    peer = next(p for p in h1.status()["peers"] if p["subnet"] == subnet)
    assert peer["public_ip"] == h3.underlay_ip
    assert peer["since"] - put_at < LEASE_EVENT_BOUND, (
        f"in the table {peer['since'] - put_at:.2f} s after the put")
    # traffic to it: a pod's packet for that subnet leaves h1 in a datagram to h3:8285
    pod.ping("10.244.200.2", count=1, timeout=0.5)
    out, _ = sink.communicate(timeout=10)
    assert json.loads(out.splitlines()[-1]) == {"from": h1.underlay_ip,
                                                "inner_dst": "10.244.200.2"}
    assert next(p for p in h1.status()["peers"] if p["subnet"] == subnet)["tx_packets"] >= 1

    cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.244.200.0-24")
    deleted_at = time.time()
    wait_until(lambda: subnet not in h1.peer_subnets(), 5, f"h1 to drop {subnet}")
    gone_at = log_time(h1, r"peer 10\.244\.200\.0/24 .* went away")
    assert gone_at is not None, "h1 logged no 'went away' line"
    assert gone_at - deleted_at < LEASE_EVENT_BOUND, (
        f"out of the table {gone_at - deleted_at:.2f} s after the delete")
    outcome = pod.tcp_connect("10.244.200.2", 80, timeout=3)
    assert outcome["error"] == "ENETUNREACH", outcome  # no route any more: net unreachable


def test_own_lease_deleted_behind_its_back_is_taken_again_and_said(cluster: Cluster):
    h1, h2 = cluster.daemons
    subnet = h2.lease()["subnet"]
    key = f"{PREFIX}/subnets/{subnet.replace('/', '-')}"
    env_before = h2.subnet_file.stat().st_mtime_ns
    cluster.etcd.etcdctl("del", key)
    wait_until(lambda: stored_leases(cluster.etcd).get(key, {}).get("value")
               == lease_value(h2.underlay_ip).encode(), 5, f"h2 to take {subnet} again")
    wait_until(lambda: h2.subnet_file.stat().st_mtime_ns != env_before, 5,
               "h2 to rewrite subnet.env")
    assert h2.lease()["subnet"] == subnet
    assert h2.subnet_env()["FLANNEL_SUBNET"] == subnet.replace(".0/", ".1/")
    log = h2.log_path.read_text()
    assert f"our lease {subnet} was deleted or expired" in log
    assert f"lease {subnet} re-acquired" in log
    wait_until(lambda: subnet in h1.peer_subnets(), 5, "h1 to list h2 again")
    target = cluster.pods[1].address
    assert cluster.pods[0].ping(target, count=3)[target].ok


def test_etcd_down_for_20_s_traffic_flows_and_a_lease_added_after_is_picked_up(
        cluster: Cluster):
    h1, h2 = cluster.daemons
    p1, p2 = cluster.pods
    subnets = {host.label: host.lease()["subnet"] for host in (h1, h2)}
    result: dict = {}
    pinger = threading.Thread(target=lambda: result.update(
        p1.ping(p2.address, count=240, interval=0.1, timeout=1.0)))
    pinger.start()
    try:
        time.sleep(0.5)
        cluster.etcd.stop_member(0, signal.SIGKILL)
        down_at = time.monotonic()
        while time.monotonic() - down_at < 20:
            for host in (h1, h2):
                assert host.daemon.poll() is None, f"{host.label} exited: {host.log_tail(3)}"
            time.sleep(1)
        assert len(h1.status()["peers"]) >= 1  # still answers, on the last known table
        cluster.etcd.start_member(0)
        subnet = "10.244.201.0/24"
        put_lease_by_hand(cluster.etcd, subnet, cluster.bystander.underlay_ip)
        for host in (h1, h2):
            wait_until(lambda h=host: subnet in h.peer_subnets(), 10,
                       f"{host.label} to pick up {subnet} after etcd came back")
    finally:
        pinger.join(60)
    ping = result[p2.address]
    assert ping.sent == 240 and ping.received == ping.sent, (ping.received, ping.errors)
    for host in (h1, h2):
        log = host.log_path.read_text()
        assert "etcd watch interrupted" in log and "etcd watch resumed" in log
    # No lease lost, no exit: each daemon's key is still its own, bound to a 24 h etcd lease.
    stored = stored_leases(cluster.etcd)
    for host in (h1, h2):
        assert host.daemon.poll() is None, f"{host.label} exited: {host.log_tail(3)}"
        assert host.lease()["subnet"] == subnets[host.label]
        key = f"{PREFIX}/subnets/{subnets[host.label].replace('/', '-')}"
        assert stored[key]["value"] == lease_value(host.underlay_ip).encode()
        assert stored[key]["lease"] != 0
    cluster.etcd.etcdctl("del", f"{PREFIX}/subnets/10.244.201.0-24")


def test_own_subnet_taken_while_away_moves_to_another_and_rewrites_subnet_env(
        cluster: Cluster):
    # Last on the shared cluster: h2 ends up on another subnet, its pod on the old one.
    h1, h2 = cluster.daemons
    old = h2.lease()["subnet"]
    key = f"{PREFIX}/subnets/{old.replace('/', '-')}"
    h2.daemon.send_signal(signal.SIGSTOP)  # so that the key is taken before h2 can react
    try:
        cluster.etcd.etcdctl("del", key)
        put_lease_by_hand(cluster.etcd, old, cluster.bystander.underlay_ip)
    finally:
        h2.daemon.send_signal(signal.SIGCONT)
    wait_until(lambda: h2.lease()["subnet"] != old, 5, "h2 to move to another subnet")
    new = h2.lease()["subnet"]
    wait_until(lambda: h2.subnet_env().get("FLANNEL_SUBNET") == new.replace(".0/", ".1/"), 5,
               "h2 to rewrite subnet.env")
    assert f"subnet {old} is gone; moving to {new}" in h2.log_path.read_text()
    addrs = [a["local"] for a in h2.link("flannel0")["addr_info"]]
    assert addrs == [new.split("/")[0]]
    wait_until(lambda: new in h1.peer_subnets(), 5, "h1 to list h2's new subnet")
    assert stored_leases(cluster.etcd)[key]["value"] == lease_value(
        cluster.bystander.underlay_ip).encode()
    target = new.split("/")[0]
    assert cluster.pods[0].ping(target, count=3)[target].ok


# -- topologies of their own ----------------------------------------------------------------


def test_twenty_daemons_started_at_once_get_distinct_subnets(topology):
    require_etcd()
    topo = topology(20)
    with EtcdCluster.in_topology(topo) as etcd:
        etcd.start()
        check_twenty_daemons(topo, etcd)


def check_twenty_daemons(topo: Topology, etcd: EtcdCluster) -> None:
    flags = etcd.client_flags()
    # the config goes in with the command line, from a host, as an operator would
    done = topo.hosts[0].flannel("network", "set", json.dumps(DEFAULT_NETWORK_CONFIG), *flags)
    assert "Network 10.244.0.0/16" in done.stdout
    for host in topo.hosts:
        host.start_flannel(topo.store_path, None, *flags)
    for host in topo.hosts:
        host.wait_ready(60)
    leases = {host.underlay_ip: host.lease()["subnet"] for host in topo.hosts}
    assert len(set(leases.values())) == 20, leases
    stored = {k: json.loads(v["value"])["PublicIP"] for k, v in stored_leases(etcd).items()
              if "/subnets/" in k}
    assert stored == {f"{PREFIX}/subnets/{s.replace('/', '-')}": ip for ip, s in leases.items()}
    others = set(leases.values()) - {leases[topo.hosts[0].underlay_ip]}
    wait_until(lambda: others <= topo.hosts[0].peer_subnets(), 10, "h1 to list all 19 others")


def test_three_member_etcd_with_one_member_killed_the_daemons_carry_on(topology):
    require_etcd()
    topo = topology(3)
    # killed at the end, not stopped: a member shutting down without quorum waits seconds
    with EtcdCluster.in_topology(topo, members=3) as etcd:
        etcd.start()
        check_one_member_killed(topo, etcd)


def check_one_member_killed(topo: Topology, etcd: EtcdCluster) -> None:
    h1, h2, h3 = topo.hosts
    leases = topo.start_daemons(DEFAULT_NETWORK_CONFIG, [h1, h2], *etcd.client_flags())
    etcd.stop_member(0, signal.SIGKILL)  # the member every daemon talks to first

    # the watch moves to another member: a lease put through member 1 arrives
    put_lease_by_hand(etcd, "10.244.202.0/24", "192.168.77.99", member=1)
    for host in (h1, h2):
        wait_until(lambda h=host: "10.244.202.0/24" in h.peer_subnets(), 10,
                   f"{host.label} to see a lease put through another member")
    # writes move too: h1 takes its deleted lease again through a live member
    subnet = leases["h1"]["subnet"]
    key = f"{PREFIX}/subnets/{subnet.replace('/', '-')}"
    etcd.etcdctl("del", key, member=2)
    wait_until(lambda: key in etcd.etcdctl("get", key, "--keys-only", member=2).stdout, 10,
               "h1 to take its lease again through a live member")
    # and a daemon started now, its first endpoint dead, gets a lease
    h3.start_flannel(topo.store_path, None, *etcd.client_flags())
    h3.wait_ready(20)
    assert h3.lease()["subnet"] not in {leases["h1"]["subnet"], leases["h2"]["subnet"],
                                        "10.244.202.0/24"}
    for host in (h1, h2):
        assert host.daemon.poll() is None


def test_a_daemon_started_before_etcd_waits_for_it_saying_so(topology):
    require_etcd()
    topo = topology(1)
    host = topo.hosts[0]
    with EtcdCluster.in_topology(topo) as etcd:
        net_config = topo.write_net_config(DEFAULT_NETWORK_CONFIG)
        host.start_flannel(topo.store_path, net_config, *etcd.client_flags(),
                           "--etcd-wait", "30")
        wait_until(lambda: "trying again" in host.log_path.read_text(), 10,
                   "the daemon to say it waits for etcd")
        etcd.start()
        env = host.wait_ready(20)
        assert env["FLANNEL_SUBNET"].startswith("10.244.")
