"""A migration in progress: flanneld v0.11 nodes and flannel-udp nodes on the seed's etcd (3.4,
v2 keyspace served with --enable-v2), carrying traffic both ways.

Per backend one topology of four hosts: h1 and h2 run the v0.11 stand-in
(`flannel_udp.lab.flanneld011`, which speaks the v2 HTTP API by itself and programs the kernel
as flanneld v0.11 does); h3 runs flannel-udp's `flanneld` with the seed script's flags, h4 with
the seed unit's `--ip-masq $FLANNEL_OPTIONS` (Go-style `-etcd-prefix`). The config goes in with
the seed's `ETCDCTL_API=2 etcdctl set`. For vxlan (with DirectRouting) h2 and h4 sit on a second
segment behind a router, so some pairs route directly and the others encapsulate.

Two things differ from a real deployment, both outside the command lines: the per-host paths
that would clash on one machine (the unit's subnet.env, the control socket) come as FLANNELD_*
variables, and each host gets a default route (the unit's flanneld finds its interface by it)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from flannel_udp.lab import (
    LEASE_EVENT_BOUND,
    EtcdCluster,
    Host,
    Pod,
    Topology,
    child_env,
    etcd_problem,
    ping_failures,
    wait_until,
)
from flannel_udp.lab.etcd import ETCD_ADDRESS

pytestmark = pytest.mark.netns

PREFIX = "/coreos.com/network"
ENDPOINT = f"http://{ETCD_ADDRESS}:2379"
SEED_CONFIG = '{"Network": "172.68.0.0/16", "Backend": {"Type": "host-gw"}}'  # verbatim
CONFIGS = {
    "host-gw": SEED_CONFIG,
    "vxlan": '{"Network": "172.68.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}',
    "udp": '{"Network": "172.68.0.0/16", "Backend": {"Type": "udp"}}',
}
# through the Python TUN<->UDP loop of the udp stand-in, 20 MB is already slow
TRANSFER = {"host-gw": 100_000_000, "vxlan": 100_000_000, "udp": 20_000_000}
FLANNELD = [sys.executable, "-c", "import sys; from flannel_udp.cli import flanneld_main; "
            "sys.argv[0] = 'flanneld'; raise SystemExit(flanneld_main())"]
STAND_IN = [sys.executable, "-m", "flannel_udp.lab.flanneld011"]
# etcd v2 expires TTL keys on its leader's sync tick (every 500 ms), so an expiry is seen up to
# that much after the TTL ran out.
EXPIRY_TICK = 0.5
MAC = "[0-9a-f]{2}(?::[0-9a-f]{2}){5}"


def v011_value(backend: str, public_ip: str, mac: str = MAC) -> str:
    """The lease JSON flanneld v0.11 writes (REFERENCE.md section 5); with the default `mac` a
    pattern matching any VtepMAC."""
    ip = re.escape(public_ip) if mac == MAC else public_ip
    return {"udp": f'{{"PublicIP":"{ip}"}}',
            "host-gw": f'{{"PublicIP":"{ip}","BackendType":"host-gw"}}',
            "vxlan": f'{{"PublicIP":"{ip}","BackendType":"vxlan",'
                     f'"BackendData":{{"VtepMAC":"{mac}"}}}}'}[backend]


@dataclass
class Cluster:
    backend: str
    topo: Topology
    etcd: EtcdCluster
    v011: list[Host]  # h1, h2: the stand-in
    ours: list[Host]  # h3 (the seed script's flags), h4 (the seed unit's)
    pods: dict[str, Pod] = field(default_factory=dict)  # by host label
    subnets: dict[str, str] = field(default_factory=dict)  # by host label

    @property
    def hosts(self) -> list[Host]:
        return self.v011 + self.ours


def lease_key(subnet: str) -> str:
    return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"


def start_stand_in(host: Host) -> None:
    with open(host.log_path, "ab") as log:
        host.daemon = host.popen(*STAND_IN, f"--etcd-endpoints={ENDPOINT}", "--iface=eth0",
                                 f"--subnet-file={host.subnet_file}", stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)


def start_flanneld(host: Host, flags: list[str], **env: str) -> None:
    """flannel-udp's `flanneld` with `flags` exactly, from the host's directory."""
    environment = {**child_env(), "FLANNELD_CONTROL_SOCKET": str(host.control_socket), **env}
    with open(host.log_path, "ab") as log:
        log.write(f"--- start: flanneld {' '.join(flags)}\n".encode())
        log.flush()
        host.daemon = host.popen(*FLANNELD, *flags, cwd=host.dir, env=environment,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def stand_in_subnet(host: Host) -> str:
    """The subnet a stand-in host leased, from its subnet.env."""
    env = wait_until(lambda: host.subnet_env(), 20, f"{host.label}'s stand-in subnet.env")
    net = env["FLANNEL_SUBNET"].rsplit(".", 1)[0]
    return f"{net}.0/{env['FLANNEL_SUBNET'].split('/')[1]}"


def stand_in_knows(host: Host, subnet: str) -> bool:
    """Whether the stand-in on `host` holds `subnet` as a peer now (its last word on it)."""
    said = re.findall(rf"Subnet (added|removed): {re.escape(subnet)}\b",
                      host.log_path.read_text(errors="replace"))
    return bool(said) and said[-1] == "added"


def log_time(host: Host, pattern: str) -> float | None:
    """When flannel-udp logged a line matching `pattern` (the last such line), or None."""
    found = None
    for line in host.log_path.read_text(errors="replace").splitlines():
        if re.search(pattern, line) and re.match(r"\d{4}-", line):
            found = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return found


def alive(cluster: Cluster) -> None:
    for host in cluster.hosts:
        assert host.daemon is not None and host.daemon.poll() is None, (
            f"{host.label} exited: {host.log_tail(5)}")


@pytest.fixture(scope="module", params=list(CONFIGS))
def cluster(request, module_topology):
    if etcd_problem() is not None:
        pytest.skip(etcd_problem())
    backend = request.param
    segments = [0, 1, 0, 1] if backend == "vxlan" else None
    topo: Topology = module_topology(4, segments=segments)
    for host in topo.hosts:
        gateway = ETCD_ADDRESS if topo.router is None else re.sub(
            r"\.\d+$", ".1", host.underlay_ip)
        host.run("ip", "route", "add", "default", "via", gateway)
    etcd = EtcdCluster.in_topology(topo, enable_v2=True)
    if topo.router is not None:  # etcd sits on segment 0, in the switch
        topo.switch.run("ip", "route", "add", "192.168.78.0/24", "via", "192.168.77.1")
    etcd.start()
    try:
        etcd.etcdctl("set", f"{PREFIX}/config", CONFIGS[backend], api=2)
        h1, h2, h3, h4 = topo.hosts
        c = Cluster(backend, topo, etcd, [h1, h2], [h3, h4])
        for host in c.v011:
            start_stand_in(host)
        start_flanneld(h3, [f"--public-ip={h3.underlay_ip}", f"--etcd-endpoints={ENDPOINT}",
                            "--iface=eth0", "--subnet-file=./subnet.env",
                            "--healthz-port=2401"])
        start_flanneld(h4, ["--ip-masq", f"--etcd-endpoints={ENDPOINT}",
                            f"-etcd-prefix={PREFIX}"],
                       FLANNELD_SUBNET_FILE=str(h4.subnet_file))
        for host in c.v011:
            c.subnets[host.label] = stand_in_subnet(host)
        for host in c.ours:
            host.wait_ready(30)
            c.subnets[host.label] = host.lease()["subnet"]
        assert len(set(c.subnets.values())) == 4, c.subnets
        for host in c.hosts:
            c.pods[host.label] = topo.add_pod(host)
        for host in c.hosts:
            others = {s for label, s in c.subnets.items() if label != host.label}
            if host in c.ours:
                wait_until(lambda h=host, o=others: o <= h.peer_subnets(), 10,
                           f"{host.label} to list {sorted(others)}")
            else:
                wait_until(lambda h=host, o=others: all(stand_in_knows(h, s) for s in o), 10,
                           f"the stand-in on {host.label} to add {sorted(others)}")
        yield c
    finally:
        etcd.cleanup()
        topo.cleanup()


def test_every_pod_pings_every_other(cluster: Cluster):
    assert ping_failures(cluster.pods) == []
    alive(cluster)
    if cluster.backend == "vxlan":
        # DirectRouting: peers on one segment route directly, the others encapsulate
        h1, h2, h3, h4 = cluster.topo.hosts  # h1, h3 on segment 0; h2, h4 on segment 1
        for host, direct, encapsulated in ((h1, h3, h4), (h4, h2, h1), (h3, h1, h2),
                                           (h2, h4, h3)):
            route = host.run("ip", "route", "get", cluster.pods[direct.label].address).stdout
            assert f"via {direct.underlay_ip} dev eth0" in route, (host.label, route)
            route = host.run("ip", "route", "get",
                             cluster.pods[encapsulated.label].address).stdout
            assert "dev flannel.1" in route, (host.label, route)


def test_a_transfer_arrives_intact_both_ways_between_v011_and_flannel_udp(cluster: Cluster):
    # h1 (v0.11) and h4 (ours): for vxlan on different segments, so encapsulated
    old, new = cluster.pods["h1"], cluster.pods["h4"]
    size = TRANSFER[cluster.backend]
    for port, (src, dst) in enumerate(((old, new), (new, old)), start=5001):
        result = src.tcp_transfer(dst, port, size, timeout=120)
        assert result == {"sent": size, "received": size, "intact": True}, (src.label, result)


def test_our_leases_are_byte_identical_to_v011s_with_its_ttl(cluster: Cluster):
    values = {}
    for host in cluster.hosts:
        key = lease_key(cluster.subnets[host.label])
        values[host.label] = cluster.etcd.etcdctl("get", key, api=2).stdout.rstrip("\n")
        pattern = v011_value(cluster.backend, host.underlay_ip)
        assert re.fullmatch(pattern, values[host.label]), (host.label, values[host.label])
        extended = cluster.etcd.etcdctl("-o", "extended", "get", key, api=2).stdout
        ttl = int(re.search(r"^TTL: (\d+)$", extended, re.M).group(1))
        assert 86000 < ttl <= 86400, (host.label, extended)
    for host in cluster.ours:  # found by the seed's command line alone
        assert host.status()["keyspace"] == "etcd v2"
    if cluster.backend == "vxlan":  # the VtepMAC published is the device's
        for host in cluster.ours:
            mac = host.link("flannel.1")["address"]
            assert values[host.label] == v011_value("vxlan", host.underlay_ip, mac)


def test_a_v011_lease_deleted_or_expired_leaves_every_table_within_a_second(cluster: Cluster):
    value = v011_value(cluster.backend, "192.168.77.99", "0e:fa:c0:a8:4d:63")
    for subnet, ttl in (("172.68.250.0/24", 86400), ("172.68.251.0/24", 2)):
        cluster.etcd.etcdctl("set", "--ttl", str(ttl), lease_key(subnet), value, api=2)
        put_at = time.time()
        for host in cluster.ours:
            wait_until(lambda h=host, s=subnet: s in h.peer_subnets(), 5,
                       f"{host.label} to list {subnet}")
        for host in cluster.v011:
            wait_until(lambda h=host, s=subnet: stand_in_knows(h, s), 5,
                       f"the stand-in on {host.label} to add {subnet}")
        if ttl == 86400:
            cluster.etcd.etcdctl("rm", lease_key(subnet), api=2)
            gone_at, bound = time.time(), LEASE_EVENT_BOUND
        else:
            gone_at, bound = put_at + ttl, LEASE_EVENT_BOUND + EXPIRY_TICK
        for host in cluster.ours:
            wait_until(lambda h=host, s=subnet: s not in h.peer_subnets(), 5 + ttl,
                       f"{host.label} to drop {subnet}")
            dropped = log_time(host, rf"peer {re.escape(subnet)} .* went away")
            assert dropped is not None, f"{host.label} logged no 'went away' for {subnet}"
            assert dropped - gone_at < bound, (
                f"{host.label}: {subnet} out of the table {dropped - gone_at:.2f} s after "
                f"{'the delete' if ttl == 86400 else 'its TTL ran out'}")
        for host in cluster.v011:
            wait_until(lambda h=host, s=subnet: not stand_in_knows(h, s), 5,
                       f"the stand-in on {host.label} to remove {subnet}")
    alive(cluster)


def test_etcd_restarted_midway_loses_nothing(cluster: Cluster):
    before = {label: cluster.etcd.etcdctl("get", lease_key(s), api=2).stdout
              for label, s in cluster.subnets.items()}
    old, new = cluster.pods["h1"], cluster.pods["h4"]
    result: dict = {}
    pinger = threading.Thread(target=lambda: result.update(
        old.ping(new.address, count=60, interval=0.1, timeout=1.0)))
    pinger.start()
    try:
        time.sleep(0.5)
        cluster.etcd.stop_member(0, signal.SIGKILL)
        time.sleep(3)
        alive(cluster)
        cluster.etcd.start_member(0)
        # a lease put after the restart reaches everyone: the watches resumed
        subnet = "172.68.252.0/24"
        cluster.etcd.etcdctl("set", "--ttl", "86400", lease_key(subnet),
                             v011_value(cluster.backend, "192.168.77.98", "0e:fa:c0:a8:4d:62"),
                             api=2)
        for host in cluster.ours:
            wait_until(lambda h=host: subnet in h.peer_subnets(), 15,
                       f"{host.label} to pick up {subnet} after etcd came back")
        for host in cluster.v011:
            wait_until(lambda h=host: stand_in_knows(h, subnet), 15,
                       f"the stand-in on {host.label} to add {subnet} after etcd came back")
    finally:
        pinger.join(60)
    ping = result[new.address]
    assert ping.sent == 60 and ping.received == ping.sent, (ping.received, ping.errors)
    alive(cluster)
    after = {label: cluster.etcd.etcdctl("get", lease_key(s), api=2).stdout
             for label, s in cluster.subnets.items()}
    assert after == before
    for host in cluster.ours:
        assert host.lease()["subnet"] == cluster.subnets[host.label]
    assert ping_failures(cluster.pods) == []
    cluster.etcd.etcdctl("rm", lease_key(subnet), api=2)


def test_the_stand_in_is_flanneld_v011_to_the_bytes(cluster: Cluster):
    # The reference the others lean on: its subnet.env is v0.11's four lines.
    for host in cluster.v011:
        lines = Path(host.subnet_file).read_text().splitlines()
        assert [line.split("=")[0] for line in lines] == [
            "FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ"]
        assert lines[0] == "FLANNEL_NETWORK=172.68.0.0/16"

