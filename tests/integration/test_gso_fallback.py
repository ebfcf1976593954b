"""UDP GSO refused by the kernel mid-run, on real sockets: the fast path's fallback (send_run in
_fastpath.pyx) must send a refused run one datagram at a time and count it, stop using
UDP_SEGMENT after an EIO, and `status` must say so.

What makes the kernel refuse: udp_send_skb returns EIO for a UDP_SEGMENT send from a UDP-Lite
socket or through an IPsec (xfrm) route, and before Linux 6.11 also when the egress device
could not checksum (skb->ip_summed != CHECKSUM_PARTIAL, e.g. a veth with tx-checksumming off).
Commit 10154dbded6d ("udp: Allow GSO transmit from devices with no checksum offload") dropped
that last condition: the GSO stack now checksums the segments in software. So:

- test_tx_checksum_off: host 0's underlay veth loses TX checksum offload after its daemon has
  probed UDP_SEGMENT (a setsockopt, which can't see the device). The kernel's answer to a
  UDP_SEGMENT send through that device, asked directly, decides what the daemon must show:
  fallbacks and udp_gso off where it says EIO; where it sends (6.11 and later), GSO on and no
  fallback. Either way the data must arrive intact (on a new kernel: the software checksums).
- test_eio_falls_back: the daemons' UDP sockets are UDP-Lite (a sitecustomize on their
  PYTHONPATH; nothing else changes), so host 0's UDP_SEGMENT sends get the kernel's own EIO,
  after the setsockopt probe passed. The xfrm way needs ESP, AH or IPCOMP, which kernels built
  without them (and without modules, as on the VMs these were written on) can't offer.
- test_path_mtu_below_segments: the underlay MTU shrinks under a running daemon, so a run's
  segments no longer fit: the kernel refuses the run whole (EINVAL in older kernels, EMSGSIZE
  in newer ones), while the same datagrams sent singly are fragmented and get through.
"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import userspace_config

from flannel_udp.lab import PACKAGE_ROOT, Host, Pod, wait_until

pytestmark = pytest.mark.netns

TRANSFER = 20 * 1024 * 1024
IPPROTO_UDP, IPPROTO_UDPLITE = 17, 136

# One 3-segment UDP_SEGMENT send from inside a host to `dst`; prints "ok" or the errno's name.
_GSO_SEND = """
import errno, socket, struct, sys
proto, dst = int(sys.argv[1]), sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, proto)
try:
    sock.sendmsg([bytes(3 * 1400)], [(17, 103, struct.pack("H", 1400))], 0, (dst, 9))
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"""

# Our own sender's underlay loses TX checksum offload (no interop peer is touched here).
_TX_CHECKSUM_OFF = """
import sys
from pyroute2.ethtool import Ethtool
with Ethtool() as ethtool:
    features = ethtool.get_features(sys.argv[1])
    features.features["tx-checksum-ip-generic"].enable = False
    ethtool.set_features(sys.argv[1], features)
"""

_TX_CHECKSUMMING = """
import sys
from pyroute2.ethtool import Ethtool
with Ethtool() as ethtool:
    print(ethtool.get_features(sys.argv[1]).features["tx-checksum-ip-generic"].enable)
"""

# The daemons' AF_INET datagram sockets become UDP-Lite: same API, full checksum coverage by
# default, but the kernel refuses UDP_SEGMENT on them with EIO after accepting the sockopt.
_UDPLITE_SITECUSTOMIZE = f"""
import socket


class _UdpLiteSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if (fileno is None and family == socket.AF_INET and type == socket.SOCK_DGRAM
                and proto in (-1, 0)):
            proto = {IPPROTO_UDPLITE}
        super().__init__(family, type, proto, fileno)


socket.socket = _UdpLiteSocket
"""


def tx_checksum_off(host: Host, dev: str) -> None:
    """Turn TX checksum offload off on `dev` of one of our own daemons' hosts: the kernel then
    refuses (before 6.11) that daemon's UDP_SEGMENT sends, which is the fallback under test."""
    host.run(sys.executable, "-c", _TX_CHECKSUM_OFF, dev)


def gso_send(host: Host, dst: str, proto: int = IPPROTO_UDP) -> str:
    """What the kernel in `host` says to a UDP_SEGMENT send to `dst`: "ok" or an errno name."""
    return host.run(sys.executable, "-c", _GSO_SEND, str(proto), dst).stdout.strip()


def transfer(sender: Pod, receiver: Pod, port: int, size: int = TRANSFER,
             timeout: float = 60) -> None:
    assert sender.tcp_transfer(receiver, port, size, timeout) == {
        "sent": size, "received": size, "intact": True}


def status_text(host: Host) -> str:
    return host.flannel("status", "--control-socket", host.control_socket).stdout


def offloads_line(udp_gso: bool) -> str:
    state = "on" if udp_gso else "off"
    return f"offloads tun_vnet_hdr on, tso on, uso on, udp_gso {state}, udp_gro on"


def assert_no_drops(*hosts: Host) -> dict:
    """Every host's status; none may have dropped anything (send_error, too_big...)."""
    statuses = [host.status() for host in hosts]
    for host, status in zip(hosts, statuses, strict=True):
        drops = {k: v for k, v in status["counters"]["drops"].items() if v}
        assert not drops, f"{host.label} dropped {drops}"
    return statuses[0]


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_tx_checksum_off(topology, monkeypatch, backend):
    monkeypatch.setenv("FLANNEL_UDP_OFFLOADS", "1")
    topo = topology(2)
    h0, h1 = topo.hosts
    topo.start_daemons(userspace_config(backend))
    assert h0.status()["offloads"]["udp_gso"] is True
    tx_checksum_off(h0, "eth0")
    assert h0.run(sys.executable, "-c", _TX_CHECKSUMMING, "eth0").stdout.strip() == "False"
    kernel = gso_send(h0, h1.underlay_ip)
    assert kernel in ("ok", "EIO"), f"UDP_SEGMENT through eth0 without TX checksumming: {kernel}"
    refused = kernel == "EIO"

    transfer(topo.add_pod(h0), topo.add_pod(h1), 7000)
    tx = assert_no_drops(h0, h1)
    assert tx["counters"]["tso_split"] > 0  # super-packets were split into UDP_SEGMENT runs
    if refused:
        assert tx["counters"]["gso_fallbacks"] > 0
    else:
        assert tx["counters"]["gso_fallbacks"] == 0
    assert tx["offloads"]["udp_gso"] is not refused
    assert offloads_line(udp_gso=not refused) in status_text(h0)


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_eio_falls_back(topology, monkeypatch, tmp_path, backend):
    monkeypatch.setenv("FLANNEL_UDP_OFFLOADS", "1")
    (tmp_path / "sitecustomize.py").write_text(_UDPLITE_SITECUSTOMIZE)
    pythonpath = [PACKAGE_ROOT, str(tmp_path),
                  *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    topo = topology(2)
    h0, h1 = topo.hosts
    # Topology.start_daemons, with the UDP-Lite sitecustomize on both (host 1 must receive
    # UDP-Lite, protocol 136, and its ACKs come back the same way).
    net_config = topo.write_net_config(userspace_config(backend))
    for host in topo.hosts:
        host.start_flannel(topo.store_path, net_config, "--drop-log-interval", "1",
                           env={"PYTHONPATH": os.pathsep.join(pythonpath)})
    for host in topo.hosts:
        host.wait_ready()
    topo.wait_peers()
    assert gso_send(h0, h1.underlay_ip, IPPROTO_UDPLITE) == "EIO"  # what the daemon will get
    before = h0.status()
    assert before["offloads"]["udp_gso"] is True  # the setsockopt probe passed
    assert before["counters"]["gso_fallbacks"] == 0

    sender, receiver = topo.add_pod(h0), topo.add_pod(h1)
    transfer(sender, receiver, 7000)
    tx, rx = assert_no_drops(h0, h1), h1.status()
    counters = tx["counters"]
    fallbacks = counters["gso_fallbacks"]
    assert counters["tso_split"] > 0
    assert fallbacks > 0
    # EIO (unlike EINVAL) turns UDP GSO off for good; the other offloads stay.
    assert tx["offloads"] == {"tun_vnet_hdr": True, "tso": True, "uso": True,
                              "udp_gso": False, "udp_gro": True}
    assert offloads_line(udp_gso=False) in status_text(h0)
    wait_until(lambda: "UDP GSO off" in h0.log_path.read_text(), 5,
               "the daemon to log that UDP GSO is off")
    # The refused runs went out datagram by datagram, each counted once.
    assert rx["counters"]["rx_packets"] == counters["tx_packets"]
    assert rx["counters"]["rx_bytes"] == counters["tx_bytes"]

    # No later round tries UDP_SEGMENT again.
    transfer(sender, receiver, 7001, 4 * 1024 * 1024)
    after = assert_no_drops(h0, h1)
    assert after["counters"]["gso_fallbacks"] == fallbacks
    assert after["offloads"]["udp_gso"] is False


def test_path_mtu_below_segments(topology, monkeypatch):
    monkeypatch.setenv("FLANNEL_UDP_OFFLOADS", "1")
    topo = topology(2)
    h0, h1 = topo.hosts
    topo.start_daemons(userspace_config("udp"))
    h0.run("ip", "link", "set", "eth0", "mtu", "1400")
    kernel = gso_send(h0, h1.underlay_ip)
    assert kernel in ("EINVAL", "EMSGSIZE")
    # Refused runs must go out singly, not be dropped as too_big (then TCP would crawl on
    # retransmissions): the drop counters tell, not the time (0.3 s here when idle).
    transfer(topo.add_pod(h0), topo.add_pod(h1), 7000, 1024 * 1024, timeout=60)
    tx = assert_no_drops(h0, h1)
    assert tx["counters"]["gso_fallbacks"] > 0
    assert tx["offloads"]["udp_gso"] is True  # a path's MTU is no reason to stop GSO for all
