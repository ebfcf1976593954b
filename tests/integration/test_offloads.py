"""The fast path's offloads end to end: 100 MB of TCP through two daemons, with the offloads
(TUN TSO/virtio headers, UDP GSO/GRO) on and with FLANNEL_UDP_OFFLOADS=0, for both backends.

The data must arrive byte for byte (SHA-256), the daemons must report the offloads they use,
and with them on the counters must show super-packets split and segments coalesced, so that a
silent fallback to the plain path can't pass for the offloaded one.
"""

from __future__ import annotations

import pytest
from helpers import userspace_config

pytestmark = pytest.mark.netns

TRANSFER = 100 * 1024 * 1024


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads-on", "offloads-off"])
@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_100_mb_tcp_transfer_arrives_intact(topology, monkeypatch, backend, offloads):
    # The daemons inherit it; set either way so that a whole run with it at 0 still tests both.
    monkeypatch.setenv("FLANNEL_UDP_OFFLOADS", "1" if offloads else "0")
    topo = topology(2)
    topo.start_daemons(userspace_config(backend))
    sender, receiver = topo.add_pod(topo.hosts[0]), topo.add_pod(topo.hosts[1])
    assert sender.tcp_transfer(receiver, 7000, TRANSFER) == {
        "sent": TRANSFER, "received": TRANSFER, "intact": True}

    tx, rx = (host.status() for host in topo.hosts)
    assert tx["offloads"] == rx["offloads"] == {
        "tun_vnet_hdr": offloads, "tso": offloads, "uso": offloads, "udp_gso": offloads,
        "udp_gro": offloads}
    assert tx["counters"]["tso_split"] > 0 if offloads else tx["counters"]["tso_split"] == 0
    assert rx["counters"]["gro_coalesced"] > 0 if offloads else (
        rx["counters"]["gro_coalesced"] == 0)
    assert rx["counters"]["rx_bytes"] == tx["counters"]["tx_bytes"]
    assert not any(rx["counters"]["drops"].values())
    assert not any(tx["counters"]["drops"].values())
    text = topo.hosts[0].flannel("status", "--control-socket", topo.hosts[0].control_socket)
    state = "on" if offloads else "off"
    assert (f"offloads tun_vnet_hdr {state}, tso {state}, uso {state}, udp_gso {state}, "
            f"udp_gro {state}") in text.stdout

