"""End to end, dual stack on the udp backend's userspace data plane: three hosts on an underlay
with IPv4 and IPv6 addresses, `EnableIPv6` with `IPv6Network` fd99::/56. The fast path carries
IPv6 inner packets in flannel's udp format (ours alone: flanneld's udp backend is IPv4-only)
over the IPv6 underlay to each peer's PublicIPv6: every pair of pods pings and moves 100 MB of
TCP over v4 and over v6, `status` lists each peer's IPv6 subnet, and a peer's IPv6 route goes
with its lease."""

from __future__ import annotations

import itertools

import pytest

from flannel_udp.lab import Topology
from flannel_udp.lab.hosts import ping_failures

pytestmark = pytest.mark.netns

CONFIG = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd99::/56",
          "Backend": {"Type": "udp"}}
_ports = itertools.count(7401)


@pytest.fixture(scope="module")
def cluster(module_topology) -> Topology:
    topo = module_topology(3, ipv6=True)
    topo.start_daemons(CONFIG)
    for host in topo.hosts:
        topo.add_pod(host)
    yield topo
    topo.cleanup()


def test_every_pair_pings_and_moves_tcp_over_v4_and_over_v6(cluster: Topology):
    pods = {p.label: p for p in cluster.pods}
    failures = ping_failures(pods) + ping_failures(pods, ipv6=True)
    assert not failures, "\n".join(failures) + "\n" + cluster.log_tails()
    for src, dst in itertools.permutations(pods.values(), 2):
        for ipv6 in (False, True):
            got = src.tcp_transfer(dst, next(_ports), 100 << 20, timeout=120, ipv6=ipv6)
            assert got == {"sent": 100 << 20, "received": 100 << 20, "intact": True}, (
                src.label, dst.label, ipv6)


def test_status_shows_each_peers_ipv6_subnet_with_its_traffic(cluster: Topology):
    """After the test above: each peer's row holds its IPv6 route, to its PublicIPv6, with
    traffic both ways."""
    host = cluster.hosts[0]
    rows = host.status()["peers"]
    assert len(rows) == 2
    for row in rows:
        v6 = row["ipv6"]
        assert v6["subnet"] == row["ipv6_subnet"] and v6["peer"] == row["public_ipv6"], row
        assert v6["tx_packets"] > 0 and v6["rx_packets"] > 0, row


def test_a_tcp_stream_over_v6_is_split_and_coalesced_as_over_v4(cluster: Topology):
    """TSO on the sender, UDP_GRO and coalescing on the receiver, for IPv6 too (the IPv6
    socket has UDP_GRO as the IPv4 one)."""
    src, dst = cluster.pods[0], cluster.pods[1]
    before = [h.status()["counters"] for h in (src.host, dst.host)]
    got = src.tcp_transfer(dst, next(_ports), 16 << 20, ipv6=True)
    assert got == {"sent": 16 << 20, "received": 16 << 20, "intact": True}
    after = [h.status()["counters"] for h in (src.host, dst.host)]
    offloads = [h.status()["offloads"] for h in (src.host, dst.host)]
    assert offloads[0]["tso"] and offloads[1]["udp_gro"], offloads
    assert after[0]["tso_split"] > before[0]["tso_split"]
    assert after[1]["gro_coalesced"] > before[1]["gro_coalesced"]
