"""Leases by hand beside running daemons, on the embedded store and on a real etcd (v3, in the
topology's switch namespace): `flannel-udp leases delete` takes a stopped node's lease out of
every peer's table within a second, and a reservation (`leases reserve`) is kept by the daemon
whose PublicIP it names: made while it runs, or before it starts (flannel reuses it)."""

from __future__ import annotations

import json
import time

import pytest

from flannel_udp.lab import (
    DEFAULT_NETWORK_CONFIG,
    LEASE_EVENT_BOUND,
    EtcdCluster,
    Host,
    etcd_problem,
    wait_until,
)

pytestmark = pytest.mark.netns

# Reserved for h3 by hand: whichever of these h1 does not hold (its subnet is chosen at random)
RESERVABLE = ("10.244.77.0/24", "10.244.78.0/24")


def listed(host: Host, flags: list[str]) -> dict[str, dict]:
    result = host.flannel("leases", "list", "--json", *flags)
    return {e["subnet"]: e for e in json.loads(result.stdout)}


@pytest.mark.parametrize("kind", ["embedded", "etcd"])
def test_a_deleted_lease_leaves_the_peers_and_a_reservation_is_kept_by_its_host(
        topology, kind):
    topo = topology(3)
    h1, h2, h3 = topo.hosts
    if kind == "etcd":
        problem = etcd_problem()
        if problem is not None:
            pytest.skip(problem)
        flags = EtcdCluster.in_topology(topo).start().client_flags()
    else:
        flags = ["--local-store", str(topo.store_path)]
    leases = topo.start_daemons(DEFAULT_NETWORK_CONFIG, [h1, h2], *flags)
    s1, s2 = leases["h1"]["subnet"], leases["h2"]["subnet"]
    table = listed(h1, flags)
    assert {s: (e["public_ip"], e["backend"], e["reserved"]) for s, e in table.items()} == {
        s1: (h1.underlay_ip, "udp", False), s2: (h2.underlay_ip, "udp", False)}

    # A stopped node's lease stays in every table until it expires (24 h) or is deleted.
    assert h2.stop_flannel() == 0
    assert s2 in h1.peer_subnets()
    h1.flannel("leases", "delete", s2, *flags)
    deleted_at = time.time()
    wait_until(lambda: s2 not in h1.peer_subnets(), 5, f"h1 to drop {s2}")
    assert time.time() - deleted_at < LEASE_EVENT_BOUND + 0.5
    assert s2 not in listed(h1, flags)

    # h1's own lease made a reservation while it runs: kept, never renewed back to a TTL.
    h1.flannel("leases", "reserve", s1, "--public-ip", h1.underlay_ip, *flags)
    wait_until(lambda: h1.lease()["expires"] is None, 5, "h1 to see its lease reserved")
    assert h1.lease()["subnet"] == s1
    assert listed(h1, flags)[s1]["reserved"] is True
    assert "re-acquired" not in h1.log_path.read_text()

    # A reservation made before its host starts: that host takes it, and keeps running on it.
    reserved = next(subnet for subnet in RESERVABLE if subnet != s1)
    h1.flannel("leases", "reserve", reserved, "--public-ip", h3.underlay_ip, *flags)
    h3.start_flannel(topo.store_path, topo.dir / "net-conf.json", *flags)
    h3.wait_ready()
    assert h3.lease()["subnet"] == reserved and h3.lease()["expires"] is None
    wait_until(lambda: reserved in h1.peer_subnets(), 5, "h1 to list h3's reserved subnet")
    p1, p3 = topo.add_pod(h1), topo.add_pod(h3)
    assert p3.address.startswith(reserved.removesuffix("0/24"))
    time.sleep(1.5)  # a daemon that stopped on its reservation would have done so by now
    assert h3.try_status() is not None
    assert p1.ping(p3.address, count=2)[p3.address].ok
    shown = h3.flannel("status", "--control-socket", str(h3.control_socket)).stdout
    assert f"lease    {reserved}  public IP {h3.underlay_ip}  backend udp  reserved (never " \
        "expires)" in shown
    entry = listed(h1, flags)[reserved]
    assert (entry["public_ip"], entry["reserved"]) == (h3.underlay_ip, True)
