"""End to end: the underlay `run` picks from flanneld's --iface, --iface-regex and
--iface-can-reach, on hosts with two underlay interfaces (eth0 on the shared bridge,
192.168.77.1x; ens5, a veth straight to the other host, 10.9.0.x). The lease carries the chosen
interface's address and the pods' traffic crosses ens5. A selection that matches nothing is
refused in one line and changes nothing."""

from __future__ import annotations

import pytest
from helpers import refused_run

from flannel_udp.lab import Host, Topology, ping_failures

pytestmark = pytest.mark.netns

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}
SECOND = {1: "10.9.0.1", 2: "10.9.0.2"}  # each host's ens5 address


def two_underlays(topology) -> Topology:
    topo: Topology = topology(2)
    h1, h2 = topo.hosts
    h1.run("ip", "link", "add", "ens5", "type", "veth", "peer", "name", "ens5", "netns", h2.name)
    for host in (h1, h2):
        host.run("ip", "addr", "add", f"{SECOND[host.index]}/24", "dev", "ens5")
        host.run("ip", "link", "set", "ens5", "up")
    return topo


def ens5_packets(host: Host) -> int:
    stats = host.ip_json("-s", "link", "show", "dev", "ens5")[0]["stats64"]
    return stats["rx"]["packets"] + stats["tx"]["packets"]


def run_both(topo: Topology, flags: dict[int, tuple[str, ...]]) -> None:
    """Start both daemons with their selection flags (no other --iface), then check that each
    leased with its ens5 address and that the pods reach each other across ens5."""
    config = topo.write_net_config(CONFIG)
    for host in topo.hosts:
        host.start_flannel(topo.store_path, config, *flags[host.index], iface=None)
    for host in topo.hosts:
        host.wait_ready()
    leases = topo.wait_peers()
    for host in topo.hosts:
        assert leases[host.label]["public_ip"] == SECOND[host.index], host.log_tail(5)
        assert f"underlay ens5 ({SECOND[host.index]}, mtu 1500)" in host.log_path.read_text()
    pods = {host.label: topo.add_pod(host) for host in topo.hosts}
    before = ens5_packets(topo.host(1))
    assert not ping_failures(pods)
    assert ens5_packets(topo.host(1)) - before >= 6  # 3 echoes and 3 replies at least


def test_the_first_iface_that_exists_wins_and_an_iface_regex_picks_by_address(topology):
    topo = two_underlays(topology)
    # Before: the last --iface counted (eth0); --iface-regex was ignored, leaving the default
    # route's interface (there is none here: refused).
    run_both(topo, {1: ("--iface", "nosuch", "--iface", "ens5", "--iface", "eth0"),
                    2: ("--iface-regex", "^wlan", "-iface-regex=^10\\.9\\.")})


def test_iface_can_reach_picks_the_interface_of_the_route(topology):
    topo = two_underlays(topology)
    run_both(topo, {1: ("--iface-can-reach", SECOND[2]), 2: ("-iface-can-reach", SECOND[1])})


def test_a_selection_matching_nothing_is_refused_in_one_line_and_changes_nothing(topology):
    topo = two_underlays(topology)
    h1 = topo.host(1)
    config = topo.write_net_config(CONFIG)
    h1.flannel("network", "set", "--file", config, "--local-store", topo.store_path)
    store_before = topo.store_path.read_bytes()
    line = refused_run(h1, "--local-store", topo.store_path, "--subnet-file", h1.subnet_file,
                       "--control-socket", h1.control_socket, "--iface", "nosuch",
                       "--iface-regex", "^wlan", "--iface-can-reach", "10.77.0.1")
    assert line.startswith("flannel-udp: no interface matches --iface nosuch, --iface-regex "
                           "^wlan, --iface-can-reach 10.77.0.1: "), line
    assert "--iface-can-reach 10.77.0.1: no route to it" in line, line
    assert topo.store_path.read_bytes() == store_before
    assert not h1.subnet_file.exists()
    assert h1.link("flannel0") is None
