"""IPv6 through the fast path's threads on real fds: the TUN rig of test_fastpath_threads with an
IPv6 address and route on the TUN and an IPv6 application in its namespace, both modes, plain
and virtio-header TUNs: datagrams out to a peer (hop limit, VXLAN's 0x86DD frame, complete
checksums), in from it past the IPv6 source check, and fragments passed on as opaque packets."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest
from helpers import OUR_MAC, PEER_MAC, FastPath, checksum
from pyroute2 import netns
from test_fastpath_threads import TUN_ADDR, TUN_NAME, TunRig, ip_cmd, tun_rig, wait_for

__all__ = ["tun_rig"]  # the rig fixture, used here as there

TUN_ADDR6 = "fd99:0:0:1::"
NETWORK6 = "fd99::/48"
REMOTE_SUBNET6 = "fd99:0:0:2::"
REMOTE_POD6 = "fd99:0:0:2::7"
OUR_MAC6 = bytes.fromhex("0e0000000006")
VXLAN_ENCAP_LEN = 22
IPV6_RECVERR = 25  # <linux/in6.h>; not exported by the socket module


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes, hop_limit: int = 5) -> bytes:
    """An IPv6 UDP packet with its (in IPv6 mandatory) checksum."""
    length = 8 + len(payload)
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    pseudo = s + d + length.to_bytes(4, "big") + bytes([0, 0, 0, 17])
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + csum.to_bytes(2, "big") + udp[8:]
    return bytes([0x60, 0, 0, 0]) + length.to_bytes(2, "big") + bytes([17, hop_limit]) + s + d + udp


def udp6_checksum_ok(pkt: bytes) -> bool:
    pseudo = pkt[8:40] + (len(pkt) - 40).to_bytes(4, "big") + bytes([0, 0, 0, 17])
    return checksum(pseudo + pkt[40:]) == 0


@pytest.fixture
def rig6(tun_rig: TunRig) -> Iterator[tuple[TunRig, socket.socket]]:
    """The rig with fd99:0:0:1:: on its TUN, a route for the IPv6 network through it, and an
    IPv6 UDP socket of an application in the namespace."""
    ip_cmd("-n", tun_rig.netns, "-6", "addr", "add", f"{TUN_ADDR6}/128", "dev", TUN_NAME, "nodad")
    ip_cmd("-n", tun_rig.netns, "-6", "route", "add", NETWORK6, "dev", TUN_NAME)
    netns.pushns(tun_rig.netns)
    try:
        app6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    finally:
        netns.popns()
    try:
        app6.bind(("::", 0))
        app6.settimeout(3)
        yield tun_rig, app6
    finally:
        app6.close()


def make(rig: TunRig, mode: str) -> FastPath:
    peer_port = rig.peer_sock.getsockname()[1]
    kw: dict[str, object] = {}
    if mode == "vxlan":
        kw = {"mode": "vxlan", "vni": 1, "vtep_mac": OUR_MAC, "vtep_mac6": OUR_MAC6,
              "send_fds": [s.fileno() for s in rig.sender_socks]}
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24,
                        vnet_hdr=rig.vnet_hdr, source_check=True, tun_addr6=TUN_ADDR6,
                        subnet_len6=64, **kw)
    if mode == "vxlan":
        fastpath.set_route6(REMOTE_SUBNET6, "127.0.0.1", PEER_MAC)
    else:
        fastpath.set_route6(REMOTE_SUBNET6, "127.0.0.1")
    return fastpath


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("tun_rig", [False, True], indirect=True, ids=["plain-tun", "vnet-tun"])
def test_ipv6_goes_out_to_the_peer_and_comes_in_to_the_app(rig6, mode):
    rig, app6 = rig6
    fastpath = make(rig, mode)
    fastpath.start()
    try:
        # Egress: the app's datagram leaves as flannel's udp carries IPv4 (hop limit - 1), or
        # as a flannel-v6 device frames it (our IPv6 VtepMAC to the peer's, 0x86DD).
        app6.sendto(b"egress-v6", (REMOTE_POD6, 4242))
        datagram = rig.peer_sock.recv(65536)
        if mode == "vxlan":
            assert datagram[8:VXLAN_ENCAP_LEN] == PEER_MAC + OUR_MAC6 + b"\x86\xdd"
            inner = datagram[VXLAN_ENCAP_LEN:]
            assert inner[7] == 64
        else:
            inner = datagram
            assert inner[7] == 63
        assert inner[0] >> 4 == 6 and inner[6] == 17
        assert inner[8:24] == ipaddress.IPv6Address(TUN_ADDR6).packed
        assert inner[24:40] == ipaddress.IPv6Address(REMOTE_POD6).packed
        assert inner[48:] == b"egress-v6"
        assert udp6_checksum_ok(inner)  # completed if the TUN left it partial

        # Ingress: from inside the peer's IPv6 subnet, from the peer's PublicIP: delivered.
        app_port = app6.getsockname()[1]
        pkt = udp6(REMOTE_POD6, TUN_ADDR6, 4242, app_port, b"ingress-v6")
        frame = pkt
        if mode == "vxlan":
            frame = (bytes.fromhex("0800000000000100") + OUR_MAC6 + PEER_MAC + b"\x86\xdd" + pkt)
        rig.peer_sock.sendto(frame, rig.fastpath_sock.getsockname())
        data, source = app6.recvfrom(65536)
        assert data == b"ingress-v6" and source[:2] == (REMOTE_POD6, 4242)
        # A source outside the sender's IPv6 lease is dropped by the source check.
        spoofed = udp6("fd99:0:0:3::7", TUN_ADDR6, 4242, app_port, b"spoofed")
        if mode == "vxlan":
            spoofed = (bytes.fromhex("0800000000000100") + OUR_MAC6 + PEER_MAC + b"\x86\xdd"
                       + spoofed)
        rig.peer_sock.sendto(spoofed, rig.fastpath_sock.getsockname())
        assert wait_for(lambda: fastpath.counters()["ingress_drops"]["spoofed_inner_source"] == 1)
        ((subnet, peer, _, stats),) = fastpath.routes6()
        assert (subnet, peer) == (REMOTE_SUBNET6, "127.0.0.1")
        assert wait_for(lambda: fastpath.routes6()[0][3]["rx_packets"] == 1)
        assert fastpath.routes6()[0][3]["tx_packets"] == 1
    finally:
        fastpath.stop()


@pytest.mark.netns
@pytest.mark.parametrize("tun_rig", [False, True], indirect=True, ids=["plain-tun", "vnet-tun"])
def test_ipv6_fragments_pass_as_opaque_packets(rig6):
    """A datagram larger than the TUN's MTU leaves the app as IPv6 fragments (next header 44):
    each is carried as it is, the transport behind the extension header never looked at."""
    rig, app6 = rig6
    fastpath = make(rig, "udp")
    fastpath.start()
    try:
        app6.sendto(b"f" * 3000, (REMOTE_POD6, 4242))
        fragments = []
        while sum(len(f) - 48 for f in fragments) < 3008:
            fragments.append(rig.peer_sock.recv(65536))
        assert all(f[6] == 44 for f in fragments) and len(fragments) == 3
        assert wait_for(lambda: fastpath.counters()["tx_packets"] == 3)
    finally:
        fastpath.stop()


def socket6_in(rig: TunRig, address: str, port: int = 0) -> socket.socket:
    """An IPv6-only UDP socket of the rig's namespace bound to `address`."""
    netns.pushns(rig.netns)
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    finally:
        netns.popns()
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    sock.settimeout(3)
    return sock


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["udp", "vxlan"])
@pytest.mark.parametrize("tun_rig", [False, True], indirect=True, ids=["plain-tun", "vnet-tun"])
def test_ipv6_underlay_carries_frames_to_and_from_a_public_ipv6(rig6, mode):
    """A route to a PublicIPv6 sends over the IPv6 sockets; the IPv6 socket receives, and only
    a lease holder's PublicIPv6 gets its frames into the TUN."""
    rig, app6 = rig6
    ip_cmd("-n", rig.netns, "-6", "addr", "add", "fd77::9/128", "dev", "lo", "nodad")
    peer_port = rig.peer_sock.getsockname()[1]
    socks = [socket6_in(rig, "::1", peer_port), socket6_in(rig, "::1"), socket6_in(rig, "::1"),
             socket6_in(rig, "fd77::9")]
    peer6, receiver6, send6, intruder = socks
    try:
        kw: dict[str, object] = {}
        if mode == "vxlan":
            kw = {"mode": "vxlan", "vni": 1, "vtep_mac": OUR_MAC, "vtep_mac6": OUR_MAC6,
                  "send6_fds": [send6.fileno()]}
        fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR,
                            24, vnet_hdr=rig.vnet_hdr, source_check=True, tun_addr6=TUN_ADDR6,
                            udp6_fd=receiver6.fileno(), **kw)
        fastpath.set_route6(REMOTE_SUBNET6, "::1", PEER_MAC if mode == "vxlan" else None)
        fastpath.set_trace(1)
        fastpath.start()
        try:
            app6.sendto(b"over-v6", (REMOTE_POD6, 4242))
            datagram, source = peer6.recvfrom(65536)
            assert source[1] == (send6 if mode == "vxlan" else receiver6).getsockname()[1]
            inner = datagram[VXLAN_ENCAP_LEN:] if mode == "vxlan" else datagram
            assert inner[48:] == b"over-v6"

            app_port = app6.getsockname()[1]
            pkt = udp6(REMOTE_POD6, TUN_ADDR6, 4242, app_port, b"back-over-v6")
            if mode == "vxlan":
                pkt = (bytes.fromhex("0800000000000100") + OUR_MAC6 + PEER_MAC + b"\x86\xdd"
                       + pkt)
            intruder.sendto(pkt, receiver6.getsockname())       # no lease holder: dropped
            peer6.sendto(pkt, receiver6.getsockname())
            data, _ = app6.recvfrom(65536)
            assert data == b"back-over-v6"
            assert wait_for(lambda: fastpath.counters()["ingress_drops"]["unknown_sender"] == 1)
            assert wait_for(lambda: fastpath.routes6()[0][3]["rx_packets"] == 1)
            assert fastpath.routes6()[0][1] == "::1"
            # The trace shows IPv6 addresses, and the IPv6 peer and sender.
            records = {(r[1], r[2], r[4], r[5], r[6], r[7]) for r in fastpath.trace_drain()}
            assert ("egress", "sent", 17, TUN_ADDR6, REMOTE_POD6, "::1") in records
            assert ("ingress", "to_tun", 17, REMOTE_POD6, TUN_ADDR6, "::1") in records
        finally:
            fastpath.stop()
    finally:
        for sock in socks:
            sock.close()


def test_an_ipv6_peer_needs_an_ipv6_underlay():
    fastpath = FastPath(-1, -1, 8285, TUN_ADDR, 24, tun_addr6=TUN_ADDR6)
    with pytest.raises(ValueError, match="IPv6 underlay"):
        fastpath.set_route6(REMOTE_SUBNET6, "fd77::2")
    with pytest.raises(ValueError, match="udp6_fd"):
        FastPath(-1, -1, 8285, TUN_ADDR, 24, tun_addr6=TUN_ADDR6, send6_fds=[-1])


@pytest.mark.netns
@pytest.mark.parametrize("tun_rig", [False, True], indirect=True, ids=["plain-tun", "vnet-tun"])
def test_icmpv6_errors_reach_the_app_through_the_real_tun(rig6):
    """No route: the app's socket learns ENETUNREACH from our destination unreachable. Over
    the path MTU: the kernel takes our packet too big and sends the next datagrams as
    fragments that fit."""
    rig, app6 = rig6
    peer_port = rig.peer_sock.getsockname()[1]
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24,
                        vnet_hdr=rig.vnet_hdr, tun_addr6=TUN_ADDR6, path_mtu6=1280)
    fastpath.set_route6(REMOTE_SUBNET6, "127.0.0.1")
    fastpath.start()
    try:
        app6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        app6.connect(("fd99:0:0:9::7", 4242))
        app6.send(b"nowhere")
        with pytest.raises(OSError) as raised:
            app6.recv(100)
        assert raised.value.errno == errno.ENETUNREACH
        assert wait_for(lambda: fastpath.counters()["icmp_sent"] == 1)

        app6.connect((REMOTE_POD6, 4242))
        app6.send(b"b" * 1300)      # fits the TUN (1472), not the path: packet too big
        assert wait_for(lambda: fastpath.counters()["icmp_sent"] == 2)
        assert fastpath.counters()["egress_drops"]["too_big"] == 1
        for _ in range(20):         # the kernel may take a moment to learn the path MTU
            try:
                app6.send(b"c" * 1300)
            except OSError as e:    # EMSGSIZE: the learned MTU reported once
                assert e.errno == errno.EMSGSIZE
                continue
            first = rig.peer_sock.recv(65536)
            if first[6] == 44:
                break
        assert first[6] == 44 and len(first) <= 1280
        assert fastpath.counters()["egress_drops"]["too_big"] == 1
    finally:
        fastpath.stop()
