"""Dataplane "auto" fallen back to userspace is a whole userspace node: every feature of the
userspace data plane works through the wrapper that chose it (`trace`, /healthz seeing the fast
path stop, --busy-poll, the source check, offloads and counters in `status`). Real daemons in
namespaces where a bridge already holds the name flannel.1, so the kernel's VXLAN device can't be
made, as on the node of issue 11; a third host with no lease forges datagrams."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import NETFUZZ, fetch, trace
from netfuzz import udp_packet, vxlan_frame

from flannel_udp.lab import Topology, ping_failures, wait_until

pytestmark = pytest.mark.netns

AUTO_CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Dataplane": "auto"}}
HEALTHZ = "http://127.0.0.1:9109/healthz"
TRANSFER = 20 << 20


def test_a_node_fallen_back_to_userspace_has_every_userspace_feature(topology):
    topo: Topology = topology(3)
    h1, h2, stranger = topo.hosts  # the stranger holds no lease
    for host in (h1, h2):
        host.run("ip", "link", "add", "flannel.1", "type", "bridge")  # no kernel VXLAN here
    leases = topo.start_daemons(AUTO_CONFIG, [h1, h2], "--busy-poll", "20000",
                                "--healthz-ip", "127.0.0.1", "--healthz-port", "9109")
    for host in (h1, h2):
        lease = host.lease()
        assert (lease["dataplane"], lease["dataplane_choice"]) == ("userspace", "auto")
        assert host.link("flvx.1") is not None
    pods = {"a": topo.add_pod(h1), "b": topo.add_pod(h2)}
    a, b = pods["a"], pods["b"]
    assert not ping_failures(pods, count=5)
    assert a.tcp_transfer(b, 7000, TRANSFER) == {"sent": TRANSFER, "received": TRANSFER,
                                                 "intact": True}

    # Offloads, counters and busy-poll, as `status` shows them.
    tx, rx = h1.status(), h2.status()
    for status in (tx, rx):
        assert status["offloads"] == {"tun_vnet_hdr": True, "tso": True, "uso": True,
                                      "udp_gso": True, "udp_gro": True}
        assert status["busy_poll_us"] == 20000
        assert status["counters"]["busy_poll_batches"] > 0
        assert status["source_check"] is True
    assert tx["counters"]["tso_split"] > 0 and rx["counters"]["gro_coalesced"] > 0
    assert tx["counters"]["tx_bytes"] >= TRANSFER and rx["counters"]["rx_bytes"] >= TRANSFER
    text = h1.flannel("status", "--control-socket", h1.control_socket).stdout
    assert "offloads tun_vnet_hdr on, tso on, uso on, udp_gso on, udp_gro on" in text
    assert "busy-poll 20000 us, " in text

    # The source check: datagrams from a host that holds no lease never reach the pod.
    before = h1.status()["counters"]["drops"]["unknown_sender"]
    forged = vxlan_frame(udp_packet(b.address, a.address, 9999, b"forged"), 1,
                         bytes.fromhex(leases["h1"]["vtep_mac"].replace(":", "")))
    out = stranger.run(sys.executable, NETFUZZ, "hex", "--to", h1.underlay_ip, "--port", "8472",
                       "--count", "10", forged.hex()).stdout
    assert json.loads(out)["errors"] == 0
    wait_until(lambda: h1.status()["counters"]["drops"]["unknown_sender"] - before == 10, 3,
               "h1 to count 10 datagrams from a host with no lease as unknown_sender")

    # trace: the fast path's decisions.
    lines = trace(h1, "--count", "2", ping=lambda: a.ping(b.address, count=2, interval=0.02))
    peer = leases["h2"]["public_ip"]
    assert any(line.endswith(f"{a.address} > {b.address} icmp peer {peer} sent")
               for line in lines), lines

    # /healthz follows the fast path: its TUN deleted under it, it forwards nothing any more.
    assert fetch(h1, HEALTHZ) == (200, "ok\n")
    h1.run("ip", "link", "del", "flvx.1")
    assert fetch(h1, HEALTHZ) == (503, "failing: dataplane\n")
    assert fetch(h2, HEALTHZ) == (200, "ok\n")
