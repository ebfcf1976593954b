"""End to end, UDP backend: real daemons in host namespaces on one bridge, real TUN devices, pods
behind them, one embedded store file. No mocks; every packet stays inside the test's namespaces.

Tests that only look share one 3-host cluster (module scope); tests that stop daemons, change the
store or start failing daemons build their own topology."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from helpers import lease_key, refused_run, stored_leases

from flannel_udp.lab import (
    DEFAULT_NETWORK_CONFIG,
    LEASE_EVENT_BOUND,
    Host,
    Pod,
    Topology,
    seconds_until,
    wait_until,
)
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

NETWORK = ipaddress.IPv4Network(DEFAULT_NETWORK_CONFIG["Network"])


@dataclass
class Cluster:
    topo: Topology
    pods: list[Pod]
    leases: dict[str, dict]  # host label -> lease as `status` reports it


def flannel0_address(lease: dict) -> str:
    return lease["subnet"].split("/")[0]


@pytest.fixture(scope="module")
def cluster(module_topology) -> Cluster:
    topo = module_topology(3)
    leases = topo.start_daemons()
    pods = [topo.add_pod(host) for host in topo.hosts]
    return Cluster(topo, pods, leases)


# -- the shared cluster: connectivity and what a daemon leaves on its host ------------------


def test_every_pod_reaches_every_other_pod_and_every_flannel0_address(cluster: Cluster):
    failures = []
    for pod in cluster.pods:
        targets = [p.address for p in cluster.pods if p is not pod]
        targets += [flannel0_address(lease) for lease in cluster.leases.values()]
        for dst, result in pod.ping(*targets, count=3).items():
            if not result.ok:
                failures.append(f"{pod.label} -> {dst}: {result.received}/{result.sent} "
                                f"answered {result.errors}")
    assert not failures, "\n".join(failures)


def test_tcp_transfer_of_12_mb_between_pods_arrives_intact(cluster: Cluster):
    sender, receiver = cluster.pods[0], cluster.pods[2]
    assert sender.tcp_transfer(receiver, 7000, 12 << 20) == {
        "sent": 12 << 20, "received": 12 << 20, "intact": True}


def test_every_daemon_lists_the_other_hosts_with_their_underlay_ip(cluster: Cluster):
    hosts = cluster.topo.hosts
    assert len({lease["subnet"] for lease in cluster.leases.values()}) == len(hosts)
    for host in hosts:
        status = host.status()
        assert status["lease"]["public_ip"] == host.underlay_ip
        assert status["lease"]["backend"] == "udp"
        peers = {p["subnet"]: p for p in status["peers"]}
        for other in hosts:
            if other is host:
                continue
            peer = peers[cluster.leases[other.label]["subnet"]]
            assert peer["public_ip"] == other.underlay_ip
            assert peer["backend"] == "udp"


def test_subnet_env_is_in_flannels_format(cluster: Cluster):
    for host in cluster.topo.hosts:
        subnet = ipaddress.IPv4Network(cluster.leases[host.label]["subnet"])
        assert subnet.subnet_of(NETWORK) and subnet.prefixlen == 24
        text = host.subnet_file.read_text()
        assert text == (f"FLANNEL_NETWORK={NETWORK}\n"
                        f"FLANNEL_SUBNET={subnet.network_address + 1}/24\n"
                        "FLANNEL_MTU=1472\n"
                        "FLANNEL_IPMASQ=false\n"), f"{host.label}: {text!r}"
        assert host.subnet_file.stat().st_mode & 0o777 == 0o644


def test_flannel0_is_a_tun_holding_the_lease_address_with_the_network_route(cluster: Cluster):
    for host in cluster.topo.hosts:
        link = host.link("flannel0")
        assert link is not None, f"{host.label}: no flannel0"
        assert link["mtu"] == 1472
        info = link.get("linkinfo", {})
        assert info.get("info_kind") == "tun"
        assert info.get("info_data", {}).get("type") == "tun"  # IFF_TUN, not a TAP
        assert info.get("info_data", {}).get("pi") is False  # IFF_NO_PI: raw IP packets
        addrs = [(a["family"], a["local"], a["prefixlen"]) for a in link["addr_info"]]
        assert addrs == [("inet", flannel0_address(cluster.leases[host.label]), 32)]
        routes = host.ip_json("route", "show", "exact", str(NETWORK))
        assert [r.get("dev") for r in routes] == ["flannel0"]
        assert host.sysctl("net.ipv6.conf.flannel0.disable_ipv6") == "1"


def test_leases_are_stored_as_flannel_udp_lease_json(cluster: Cluster):
    stored = {key: json.loads(value)
              for key, value in stored_leases(cluster.topo.store_path).items()}
    expected = {lease_key(lease["subnet"]): {"PublicIP": lease["public_ip"], "PublicIPv6": None}
                for lease in cluster.leases.values()}
    assert stored == expected


def test_connect_to_an_unleased_address_in_the_network_fails_at_once_as_unreachable(
        cluster: Cluster):
    # flannel answers a packet with no lease with ICMP net unreachable, except an ICMP packet
    # (RFC 792: no ICMP about ICMP), so a TCP SYN shows it where a ping would just time out.
    leased = {ipaddress.IPv4Network(lease["subnet"]) for lease in cluster.leases.values()}
    free = next(s for s in reversed(list(NETWORK.subnets(new_prefix=24))) if s not in leased)
    pod = cluster.pods[0]
    before = pod.host.status()["counters"]
    outcome = pod.tcp_connect(str(free.network_address + 2), 80, timeout=3)
    assert outcome["error"] == "ENETUNREACH", outcome
    assert outcome["seconds"] < 1.0, f"the error took {outcome['seconds']} s, not at once"
    after = pod.host.status()["counters"]
    assert after["icmp_sent"] >= before["icmp_sent"] + 1
    assert after["drops"]["no_route"] >= before["drops"]["no_route"] + 1


# Each datagram is broken in one way; the daemon must count it under that reason and go on.
MALFORMED = {
    "short": bytes.fromhex("4500001c"),
    "not_ipv4": bytes.fromhex("6000000000083a40") + bytes(32),
    "bad_header_len": bytes.fromhex("4300001c00004000401100000a0a0a0a0a0a0a0a") + bytes(8),
    "bad_total_len": bytes.fromhex("450005dc00004000401100000a0a0a0a0a0a0a0a") + bytes(8),
    "ttl_expired": bytes.fromhex("450000240000400001110000") + bytes(24),
}


def test_malformed_datagrams_are_dropped_by_reason_and_traffic_goes_on(cluster: Cluster):
    target, sender = cluster.topo.hosts[0], cluster.topo.hosts[1]
    before = target.status()["counters"]["drops"]
    # The inner source is the sender's own (its lease's network address), so that a datagram
    # that parses gets past the source check to the reason it is made for.
    source = ipaddress.IPv4Network(cluster.leases[sender.label]["subnet"]).network_address.packed
    datagrams = [(d[:12] + source + d[16:] if len(d) >= 20 else d).hex()
                 for d in MALFORMED.values() for _ in range(3)]
    sender.run(sys.executable, "-c",
               "import socket, sys\n"
               "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
               "for d in sys.argv[2:]: s.sendto(bytes.fromhex(d), (sys.argv[1], 8285))",
               target.underlay_ip, *datagrams)

    def counted() -> bool:
        drops = target.status()["counters"]["drops"]
        return all(drops[reason] >= before[reason] + 3 for reason in MALFORMED)

    wait_until(counted, 3, "the malformed datagrams counted by reason")
    pods = cluster.pods
    assert pods[1].ping(pods[0].address, count=2)[pods[0].address].ok


# -- lease lifecycle: each test its own topology --------------------------------------------


def test_deleted_lease_disappears_from_the_other_daemons(topology):
    topo = topology(2)
    leases = topo.start_daemons()
    observer, leaving = topo.hosts
    subnet = leases[leaving.label]["subnet"]
    assert leaving.stop_flannel(signal.SIGTERM) == 0
    time.sleep(0.5)
    assert subnet in observer.peer_subnets(), "a stopped daemon's lease is kept: still a peer"
    asyncio.run(LocalStore(topo.store_path).delete_lease(lease_key(subnet)))
    took = seconds_until(lambda: subnet not in observer.peer_subnets(), 10,
                         f"{observer.label} to drop peer {subnet} after its lease was deleted")
    assert took < LEASE_EVENT_BOUND, f"peer dropped {took:.2f} s after its lease was deleted"


def test_expired_lease_disappears_from_the_other_daemons(topology):
    topo = topology(2)
    leases = topo.start_daemons()
    observer, dead = topo.hosts
    subnet = leases[dead.label]["subnet"]
    assert dead.stop_flannel(signal.SIGKILL) == -signal.SIGKILL  # cannot renew any more
    store = LocalStore(topo.store_path)
    value = json.dumps({"PublicIP": dead.underlay_ip, "PublicIPv6": None},
                       separators=(",", ":")).encode()
    ttl = 1.5
    expires = asyncio.run(store.put_lease(lease_key(subnet), value, ttl))
    assert subnet in observer.peer_subnets(), "the lease has not expired yet"
    wait_until(lambda: subnet not in observer.peer_subnets(), ttl + 10,
               f"{observer.label} to drop peer {subnet} after its lease expired", interval=0.02)
    late = time.time() - expires
    assert -0.05 <= late < LEASE_EVENT_BOUND, f"dropped {late:+.2f} s from the lease's expiry"


def stop_and_check_cleanup(topo: Topology, host: Host, subnet: str, sig: int) -> None:
    """Stop `host`'s daemon with `sig`: exit 0, flannel0 and its route gone, the lease kept."""
    assert host.stop_flannel(sig) == 0
    assert host.link("flannel0") is None
    assert host.ip_json("route", "show", str(NETWORK)) == []
    assert json.loads(stored_leases(topo.store_path)[lease_key(subnet)])["PublicIP"] == \
        host.underlay_ip


def test_sigterm_removes_tun_and_route_keeps_lease_and_restart_gets_same_subnet(topology):
    topo = topology(2)
    leases = topo.start_daemons()
    host, other = topo.hosts
    subnet = leases[host.label]["subnet"]
    stop_and_check_cleanup(topo, host, subnet, signal.SIGTERM)

    host.start_flannel(topo.store_path)
    host.wait_ready()
    assert host.lease()["subnet"] == subnet
    assert host.subnet_env()["FLANNEL_SUBNET"] == leases[host.label]["subnet"].replace(
        ".0/", ".1/")
    # The peer kept its route to the unchanged lease: traffic flows again at once.
    target = flannel0_address(leases[host.label])
    assert other.ping(target, count=2)[target].ok


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGHUP], ids=["SIGQUIT", "SIGHUP"])
def test_sigquit_and_sighup_stop_as_cleanly_as_sigterm(topology, sig):
    """SIGQUIT is the stopsignal of flanneld's supervisord sections (and killed the daemon,
    leaving flannel0 and its route); SIGHUP comes from a closed terminal."""
    topo = topology(1)
    leases = topo.start_daemons()
    host = topo.hosts[0]
    stop_and_check_cleanup(topo, host, leases[host.label]["subnet"], sig)
    assert "signal received, shutting down" in host.log_path.read_text()


# -- user errors: one line, exit 2, nothing left behind -------------------------------------


def _run_expecting_user_error(host: Host, store: os.PathLike, net_config: os.PathLike,
                              *extra: str, wrapper: tuple[str, ...] = ()) -> str:
    """Run a daemon (under `wrapper`, if any) that must refuse to start; returns its one
    error line."""
    line = refused_run(host, "--local-store", store, "--net-config-path", net_config,
                       "--subnet-file", host.subnet_file, "--control-socket",
                       host.control_socket, *extra, wrapper=wrapper)
    assert host.link("flannel0") is None, "a refused start left flannel0 behind"
    return line


def test_run_rejects_a_bad_network_config_naming_the_field(topology):
    topo = topology(1)
    config = topo.write_net_config({"Network": "10.244.0.0/16", "SubnetLen": 40,
                                    "Backend": {"Type": "udp"}})
    line = _run_expecting_user_error(topo.hosts[0], topo.store_path, config, "--iface", "eth0")
    assert "SubnetLen" in line


def test_run_rejects_an_interface_that_does_not_exist(topology):
    topo = topology(1)
    config = topo.write_net_config(DEFAULT_NETWORK_CONFIG)
    line = _run_expecting_user_error(topo.hosts[0], topo.store_path, config, "--iface", "nope0")
    assert "nope0" in line


def test_run_rejects_a_udp_port_in_use(topology):
    topo = topology(1)
    host = topo.hosts[0]
    config = topo.write_net_config(DEFAULT_NETWORK_CONFIG)
    blocker = host.popen(sys.executable, "-c",
                         "import socket, time; s = socket.socket(socket.AF_INET, "
                         "socket.SOCK_DGRAM); s.bind(('0.0.0.0', 8285)); print('bound', "
                         "flush=True); time.sleep(60)",
                         stdout=subprocess.PIPE, text=True)
    assert blocker.stdout is not None and blocker.stdout.readline().strip() == "bound"
    line = _run_expecting_user_error(host, topo.store_path, config, "--iface", "eth0")
    assert "8285" in line


def test_run_without_permission_for_tun_says_so(topology):
    topo = topology(1)
    config = topo.write_net_config(DEFAULT_NETWORK_CONFIG)
    # root without CAP_NET_ADMIN: /dev/net/tun opens, creating the device is refused
    no_net_admin = ("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin")
    line = _run_expecting_user_error(topo.hosts[0], topo.store_path, config, "--iface", "eth0",
                                     wrapper=no_net_admin)
    assert "no permission to create TUN flannel0" in line
