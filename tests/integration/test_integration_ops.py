"""Operations end to end, with real daemons in host namespaces: --ip-masq's iptables rules and
pod traffic leaving masqueraded, /healthz and /metrics, systemd's readiness datagrams to a socket
of the test's own, and a daemon configured by FLANNELD_* variables alone stopping cleanly on
SIGTERM. The rules live in the namespaces, so deleting them removes the rules too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import FETCH, fetch
from prometheus_client.parser import text_string_to_metric_families

from flannel_udp.lab import FLANNEL_UDP, Host, Netns, Topology, wait_until

pytestmark = pytest.mark.netns

OUTSIDE_PORT = 7000
# One TCP connection accepted; prints the peer's address: who the packets came from.
WHO_CONNECTS = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(20)
print("listening", flush=True)
conn, peer = s.accept()
print(peer[0], flush=True)
"""


def nat_rules(host: Host, table: str, chain: str) -> list[str]:
    """`iptables -t TABLE -S CHAIN`: the rules, [] when the chain does not exist."""
    result = host.run("iptables", "-t", table, "-S", chain, check=False)
    return result.stdout.splitlines()[1:] if result.returncode == 0 else []


def source_seen_by(listener: Netns, bind: str, client: Netns, address: str) -> str:
    """Connect from `client` to `address` and return the source address `listener` saw."""
    proc = listener.popen(sys.executable, "-c", WHO_CONNECTS, bind, str(OUTSIDE_PORT),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    outcome = client.tcp_connect(address, OUTSIDE_PORT)
    assert outcome["connected"], outcome
    out, err = proc.communicate(timeout=10)
    return out.strip()


@pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables")
def test_ip_masq_rules_masquerade_outside_traffic_come_back_and_go_on_sigterm(topology):
    topo: Topology = topology(3)
    h1, h2, outside = topo.hosts  # h3 runs no daemon and has no route to the Network
    leases = topo.start_daemons({"Network": "10.244.0.0/16"}, [h1, h2], "--ip-masq",
                                "--iptables-resync", "1")
    p1, p2 = topo.add_pod(h1), topo.add_pod(h2)
    network, subnet = "10.244.0.0/16", leases["h1"]["subnet"]
    assert h1.subnet_env()["FLANNEL_IPMASQ"] == "true"
    masq = "-m comment --comment \"flanneld masq\""
    expected_masq = [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {subnet} -d {network} {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {network} -d {subnet} {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {network} -d {subnet} {masq} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s {network} -d {network} {masq} -j MASQUERADE --random-fully",
    ]
    fwd = "-m comment --comment \"flanneld forward\""
    expected_fwd = [f"-A FLANNEL-FWD -s {network} {fwd} -j ACCEPT",
                    f"-A FLANNEL-FWD -d {network} {fwd} -j ACCEPT"]
    assert nat_rules(h1, "nat", "FLANNEL-POSTRTG") == expected_masq
    assert nat_rules(h1, "filter", "FLANNEL-FWD") == expected_fwd
    assert nat_rules(h1, "nat", "POSTROUTING") == [f"-A POSTROUTING {masq} -j FLANNEL-POSTRTG"]
    assert nat_rules(h1, "filter", "FORWARD") == [f"-A FORWARD {fwd} -j FLANNEL-FWD"]

    # To an address outside the Network a pod's traffic leaves as its host; pod to pod not.
    assert source_seen_by(outside, outside.underlay_ip, p1, outside.underlay_ip) \
        == h1.underlay_ip
    assert source_seen_by(p2, p2.address, p1, p2.address) == p1.address

    # Rules deleted by hand come back, in order, within the resync period.
    h1.run("iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", subnet, "-d", network,
           "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN")
    h1.run("iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment",
           "flanneld forward", "-j", "FLANNEL-FWD")
    wait_until(lambda: nat_rules(h1, "nat", "FLANNEL-POSTRTG") == expected_masq
               and len(nat_rules(h1, "filter", "FORWARD")) == 1, 5,
               "the deleted rules to come back")
    assert source_seen_by(outside, outside.underlay_ip, p1, outside.underlay_ip) \
        == h1.underlay_ip

    assert h1.stop_flannel(signal.SIGTERM) == 0
    assert nat_rules(h1, "nat", "FLANNEL-POSTRTG") == []
    assert nat_rules(h1, "filter", "FLANNEL-FWD") == []
    assert nat_rules(h1, "nat", "POSTROUTING") == []
    assert nat_rules(h1, "filter", "FORWARD") == []


def test_healthz_metrics_and_systemd_notify_follow_the_daemon(topology):
    topo: Topology = topology(1)
    host = topo.host(1)
    notify_path = str(topo.dir / "notify.sock")  # a path: unix sockets cross namespaces
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        host.start_flannel(topo.store_path, topo.write_net_config(
            {"Network": "10.244.0.0/16"}), "--healthz-ip", "127.0.0.1",
            "--healthz-port", "9109", env={"NOTIFY_SOCKET": notify_path})
        ready = notify.recv(4096).decode()
        lease = host.lease()
        assert ready == f"READY=1\nSTATUS=lease {lease['subnet']}, 0 peers"
        assert host.link("flannel0") is not None  # READY came after the data plane

        assert fetch(host, "http://127.0.0.1:9109/healthz") == (200, "ok\n")
        assert fetch(host, "http://127.0.0.1:9109/") == (200, "ok\n")
        code, text = fetch(host, "http://127.0.0.1:9109/metrics")
        assert code == 200
        assert "flannel_udp_peers 0.0" in text.splitlines()
        values = {s.name: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples if not s.labels}
        assert values["flannel_udp_lease_expiry_timestamp_seconds"] == pytest.approx(
            lease["expires"])
        assert 'flannel_udp_healthy{check="all"} 1.0' in text
        assert 'flannel_udp_packets_total{direction="tx"}' in text
        assert "flannel_udp_store_errors_total 0.0" in text

        assert host.stop_flannel(signal.SIGTERM) == 0
        assert notify.recv(4096) == b"STOPPING=1"


def test_healthz_answers_503_while_the_node_has_no_lease(topology):
    """etcd unreachable: the daemon waits for it (for ever), /healthz says it is not ready."""
    topo: Topology = topology(1)
    host = topo.host(1)
    host.start_flannel(topo.store_path, None, "--etcd-endpoints", "http://127.0.0.1:1",
                       "--etcd-wait", "0", "--healthz-ip", "127.0.0.1", "--healthz-port",
                       "9109")
    def answer() -> tuple[str, str] | None:
        assert host.daemon is not None and host.daemon.poll() is None, host.log_tail()
        result = host.run(sys.executable, "-c", FETCH, "http://127.0.0.1:9109/healthz",
                          check=False)
        return tuple(result.stdout.split("\n", 1)) if result.returncode == 0 else None

    assert wait_until(answer, 10, "the healthz endpoint to answer") == (
        "503", "failing: dataplane, lease\n")
    assert "127.0.0.1:1" in host.log_tail()  # still waiting for etcd
    # Its control socket is taken from the start, and says so.
    status = host.flannel("status", "--control-socket", host.control_socket, check=False)
    assert (status.returncode, status.stderr) == (
        1, "flannel-udp: daemon: starting: no lease yet (its log says what it waits for)\n")
    assert host.stop_flannel(signal.SIGTERM) == 0


def test_user_errors_of_the_operations_flags_are_one_line(topology):
    topo: Topology = topology(1)
    host = topo.host(1)
    config = topo.write_net_config({"Network": "10.244.0.0/16"})
    base = [*FLANNEL_UDP, "run", "--local-store", str(topo.store_path), "--iface", "eth0",
            "--net-config-path", str(config), "--subnet-file", str(host.dir / "s.env"),
            "--control-socket", str(host.dir / "c.sock")]
    # iptables missing when --ip-masq is asked: PATH without it
    env = {**os.environ, "PATH": str(topo.dir)}
    argv = host.argv(*base, "--ip-masq")
    argv[0] = shutil.which("ip") or "ip"
    missing = subprocess.run(argv, env=env, capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 1
    assert missing.stderr.splitlines()[-1] == (
        "flannel-udp: --ip-masq needs the iptables command: install iptables "
        "(e.g. apt-get install iptables)")
    # the healthz port taken by something else
    holder = host.popen(sys.executable, "-c", WHO_CONNECTS, "0.0.0.0", "9109",
                        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "listening"
    taken = host.run(*base, "--healthz-port", "9109", check=False)
    assert taken.returncode == 1
    assert taken.stderr.splitlines()[-1] == (
        "flannel-udp: --healthz-port 9109: address 0.0.0.0:9109 is already in use "
        "(another flanneld or flannel-udp?)")
    assert host.link("flannel0") is None


def test_configured_by_flanneld_variables_alone_sigterm_cleans_up_within_5_s(topology):
    topo: Topology = topology(1)
    host = topo.host(1)
    proc = host.start_flannel(topo.store_path, topo.write_net_config(
        {"Network": "10.244.0.0/16"}), env_only=True)
    assert proc.args[-2:] == ["flannel_udp", "run"]  # no flags at all
    env = host.wait_ready()
    assert env["FLANNEL_NETWORK"] == "10.244.0.0/16"
    assert host.link("flannel0") is not None
    started = time.monotonic()
    assert host.stop_flannel(signal.SIGTERM, timeout=5) == 0
    assert time.monotonic() - started < 5
    assert host.link("flannel0") is None
    log = host.log_path.read_text()
    assert "Traceback" not in log and "signal received, shutting down" in log
