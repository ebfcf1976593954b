"""Newer flanneld's rules and endpoints with real daemons in host namespaces: FLANNEL-FWD on by
default (and off with `-iptables-forward-rules=false`), `--ip-masq-fully-random-disable`,
`--ip-blackhole-route`, `/readyz`, and `EnableNFTables` (the rules in nftables, pod traffic
masqueraded by them). The rules live in the namespaces: deleting them removes the rules too."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import sys

import pytest
from helpers import FETCH
from test_integration_ops import nat_rules, source_seen_by

from flannel_udp.lab import Host, Topology, wait_until

pytestmark = pytest.mark.netns
needs_iptables = pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None,
                               reason="needs nft (apt-get install nftables)")

NETWORK = "10.244.0.0/16"
FWD = '-m comment --comment "flanneld forward"'
MASQ = '-m comment --comment "flanneld masq"'
EXPECTED_FWD = [f"-A FLANNEL-FWD -s {NETWORK} {FWD} -j ACCEPT",
                f"-A FLANNEL-FWD -d {NETWORK} {FWD} -j ACCEPT"]


def nft_table(host: Host, family: str, name: str) -> str | None:
    """`nft list table FAMILY NAME` in `host`; None when there is no such table."""
    result = host.run("nft", "list", "table", family, name, check=False)
    return result.stdout if result.returncode == 0 else None


BLACKHOLE = "blackhole {} metric 4294967295 "  # `ip route` of flannel-udp's (see netlink.py)


def blackholes(host: Host) -> list[str]:
    return host.run("ip", "route", "show", "type", "blackhole").stdout.split("\n")[:-1]


def ready_answer(host: Host, url: str) -> tuple[str, str] | None:
    """(status, body) of `url` in `host`; None while nothing answers. The daemon must run."""
    assert host.daemon is not None and host.daemon.poll() is None, host.log_tail()
    result = host.run(sys.executable, "-c", FETCH, url, check=False)
    if result.returncode != 0:
        return None
    code, _, body = result.stdout.partition("\n")
    return code, body


@needs_iptables
def test_forward_rules_are_on_by_default_without_ip_masq_come_back_and_go_on_sigquit(topology):
    topo: Topology = topology(1)
    host = topo.host(1)
    host.start_flannel(topo.store_path, topo.write_net_config({"Network": NETWORK}),
                       "-iptables-resync", "1")
    host.wait_ready()
    assert host.subnet_env()["FLANNEL_IPMASQ"] == "false"
    assert nat_rules(host, "filter", "FLANNEL-FWD") == EXPECTED_FWD
    assert nat_rules(host, "filter", "FORWARD") == [f"-A FORWARD {FWD} -j FLANNEL-FWD"]
    assert nat_rules(host, "nat", "FLANNEL-POSTRTG") == []  # no --ip-masq: no masquerading
    assert nat_rules(host, "nat", "POSTROUTING") == []

    host.run("iptables", "-D", "FLANNEL-FWD", "-d", NETWORK, "-m", "comment", "--comment",
             "flanneld forward", "-j", "ACCEPT")
    host.run("iptables", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
             "-j", "FLANNEL-FWD")
    wait_until(lambda: nat_rules(host, "filter", "FLANNEL-FWD") == EXPECTED_FWD
               and len(nat_rules(host, "filter", "FORWARD")) == 1, 5,
               "the deleted forward rules to come back")

    assert host.stop_flannel(signal.SIGQUIT) == 0
    assert nat_rules(host, "filter", "FLANNEL-FWD") == []
    assert nat_rules(host, "filter", "FORWARD") == []


@needs_iptables
@pytest.mark.parametrize("off", ["-iptables-forward-rules=false",
                                 "--iptables-forward-rules=false", "env"])
def test_iptables_forward_rules_false_adds_no_forward_rules(topology, off):
    topo: Topology = topology(1)
    host = topo.host(1)
    extra, env = ((), {"FLANNELD_IPTABLES_FORWARD_RULES": "false"}) if off == "env" else (
        (off,), None)
    host.start_flannel(topo.store_path, topo.write_net_config({"Network": NETWORK}),
                       "--ip-masq", *extra, env=env)
    host.wait_ready()
    assert len(nat_rules(host, "nat", "FLANNEL-POSTRTG")) == 6  # --ip-masq still works
    assert nat_rules(host, "filter", "FLANNEL-FWD") == []
    assert nat_rules(host, "filter", "FORWARD") == []
    assert host.stop_flannel(signal.SIGTERM) == 0
    assert nat_rules(host, "nat", "FLANNEL-POSTRTG") == []


@needs_iptables
def test_fully_random_disable_and_blackhole_route_as_flanneld_gone_on_sigterm(topology):
    topo: Topology = topology(1)
    host = topo.host(1)
    host.start_flannel(topo.store_path, topo.write_net_config({"Network": NETWORK}),
                       "--ip-masq", "-ip-masq-fully-random-disable", "-ip-blackhole-route")
    host.wait_ready()
    subnet = host.lease()["subnet"]
    assert nat_rules(host, "nat", "FLANNEL-POSTRTG")[-2:] == [
        f"-A FLANNEL-POSTRTG -s {NETWORK} ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE",
        f"-A FLANNEL-POSTRTG ! -s {NETWORK} -d {NETWORK} {MASQ} -j MASQUERADE"]
    assert blackholes(host) == [BLACKHOLE.format(subnet)]
    # A pod's bridge route for the subnet, added later, goes in front of the blackhole.
    pod = topo.add_pod(host)
    assert host.run("ip", "route", "get", pod.address).stdout.startswith(
        f"{pod.address} dev pod{pod.index} ")
    assert blackholes(host) == [BLACKHOLE.format(subnet)]
    # Whatever the pod's route does not cover, the blackhole drops: not via the default route.
    topo.remove_pod(pod)
    assert host.run("ip", "route", "get", pod.address, check=False).stderr == (
        "RTNETLINK answers: Invalid argument\n")

    assert host.stop_flannel(signal.SIGTERM) == 0
    assert blackholes(host) == []
    assert nat_rules(host, "nat", "FLANNEL-POSTRTG") == []
    assert "Traceback" not in host.log_path.read_text()


@needs_iptables
def test_readyz_is_503_until_rules_and_subnet_env_are_in_place_then_200(topology):
    topo: Topology = topology(1)
    host = topo.host(1)
    host.flannel("network", "set", "--local-store", str(topo.store_path),
                 json.dumps({"Network": NETWORK}))
    # The store's writers' lock held: the daemon reads the config but cannot take a lease.
    lock = os.open(f"{topo.store_path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        host.start_flannel(topo.store_path, None, "--ip-masq", "--healthz-ip", "127.0.0.1",
                           "--healthz-port", "9109")
        url = "http://127.0.0.1:9109/readyz"
        assert wait_until(lambda: ready_answer(host, url), 10, "/readyz to answer") == (
            "503", "not ready: lease, rules or subnet.env not in place yet\n")
        assert not host.subnet_file.exists()
    finally:
        os.close(lock)  # releases the flock
    assert wait_until(lambda: (a := ready_answer(host, url)) and a[0] == "200" and a, 15,
                      "/readyz to answer 200") == ("200", "ok\n")
    # Once it says so, everything is in place.
    assert host.subnet_env()["FLANNEL_IPMASQ"] == "true"
    assert len(nat_rules(host, "nat", "FLANNEL-POSTRTG")) == 6
    assert nat_rules(host, "filter", "FLANNEL-FWD") == EXPECTED_FWD
    assert host.stop_flannel(signal.SIGTERM) == 0


def nft_expected(subnet: str) -> str:
    """flanneld's table as nft 1.0 prints it, for lease `subnet` (--ip-masq, forward rules)."""
    return f"""table ip flannel-ipv4 {{
	comment "rules for flannel-ipv4"
	chain forward {{
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr {NETWORK} accept
		ip daddr {NETWORK} accept
	}}

	chain postrtg {{
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip saddr {subnet} ip daddr {NETWORK} return
		ip saddr {NETWORK} ip daddr {subnet} return
		ip saddr != {subnet} ip daddr {NETWORK} return
		ip saddr {NETWORK} ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != {NETWORK} ip daddr {NETWORK} masquerade fully-random
	}}
}}
"""


@needs_nft
def test_enable_nftables_rules_masquerade_come_back_and_go_on_sigquit_and_sigterm(topology):
    topo: Topology = topology(3)
    h1, h2, outside = topo.hosts  # h3 runs no daemon and has no route to the Network
    leases = topo.start_daemons({"Network": NETWORK, "EnableNFTables": True}, [h1, h2],
                                "--ip-masq", "--iptables-resync", "1")
    p1, p2 = topo.add_pod(h1), topo.add_pod(h2)
    subnet = leases["h1"]["subnet"]
    assert nft_table(h1, "ip", "flannel-ipv4") == nft_expected(subnet)
    assert nft_table(h1, "ip6", "flannel-ipv6") == (
        'table ip6 flannel-ipv6 {\n\tcomment "rules for flannel-ipv6"\n}\n')
    if shutil.which("iptables"):  # nothing in iptables
        assert nat_rules(h1, "nat", "FLANNEL-POSTRTG") == []
        assert nat_rules(h1, "filter", "FLANNEL-FWD") == []

    # To an address outside the Network a pod's traffic leaves as its host; pod to pod not.
    assert source_seen_by(outside, outside.underlay_ip, p1, outside.underlay_ip) \
        == h1.underlay_ip
    assert source_seen_by(p2, p2.address, p1, p2.address) == p1.address

    # A rule deleted by hand comes back within the resync period, and so does the table.
    listing = h1.run("nft", "-a", "list", "chain", "ip", "flannel-ipv4", "postrtg").stdout
    handle = re.search(rf"ip saddr {subnet} ip daddr {NETWORK} return # handle (\d+)",
                       listing)
    assert handle is not None, listing
    h1.run("nft", "delete", "rule", "ip", "flannel-ipv4", "postrtg", "handle", handle[1])
    assert nft_table(h1, "ip", "flannel-ipv4") != nft_expected(subnet)
    wait_until(lambda: nft_table(h1, "ip", "flannel-ipv4") == nft_expected(subnet), 5,
               "the deleted nftables rule to come back")
    h1.run("nft", "delete", "table", "ip", "flannel-ipv4")
    wait_until(lambda: nft_table(h1, "ip", "flannel-ipv4") == nft_expected(subnet), 5,
               "the deleted nftables table to come back")
    assert source_seen_by(outside, outside.underlay_ip, p1, outside.underlay_ip) \
        == h1.underlay_ip

    for host, sig in ((h1, signal.SIGQUIT), (h2, signal.SIGTERM)):
        assert host.stop_flannel(sig) == 0
        assert nft_table(host, "ip", "flannel-ipv4") is None
        assert nft_table(host, "ip6", "flannel-ipv6") is None
    assert "Traceback" not in h1.log_path.read_text()
