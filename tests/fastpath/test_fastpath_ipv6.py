"""IPv6 inner packets in the native fast path against its Python reference, both modes: the
IPv6 route table beside the IPv4 one, the hop limit (UDP mode), VXLAN frames with ethertype
0x86DD between IPv6 VtepMACs, the source check of IPv6 sources, peers over an IPv6 underlay
(routes to PublicIPv6s, their own send sockets, senders checked by IPv6 address), the flow
hash, and the offloads (TCPV6/UDP_L4 splitting, partial IPv6 checksums on ingress). Mutated
packets and frames are fed to both as in test_source_check."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from helpers import (
    FastPath,
    addresses,
    as_tuple,
    checksum,
    dotted,
    ipv4_packets,
    macs,
    route_tables,
    vteps,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netfuzz import mutate, vxlan_frame

from flannel_udp import _fastpath, packet
from flannel_udp.packet import (
    GSO_TCPV6,
    GSO_UDP_L4,
    VNET_F_NEEDS_CSUM,
    VNET_HDR,
    Action,
    Drop,
    Ipv6Routes,
    Sender,
    Vtep,
    VxlanRoute,
    prefix_mask6,
)

SLOW = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
TUN_ADDR, TUN_ADDR6 = "10.5.1.0", "fd99:0:0:1::"
addresses6 = st.integers(0, (1 << 128) - 1)


def text6(addr: int) -> str:
    return str(ipaddress.IPv6Address(addr))


def peer_text(peer: int | ipaddress.IPv6Address) -> str:
    return dotted(peer) if isinstance(peer, int) else str(peer)


# PublicIPs, and PublicIPv6s (an IPv6 underlay).
public_addresses = st.one_of(addresses, addresses6.map(ipaddress.IPv6Address))


def ipv6_packet(src: int, dst: int, next_header: int, l4: bytes, hop_limit: int = 64) -> bytes:
    return (bytes([0x60, 0, 0, 0]) + len(l4).to_bytes(2, "big") + bytes([next_header, hop_limit])
            + src.to_bytes(16, "big") + dst.to_bytes(16, "big") + l4)


def with_l4_checksum(pkt: bytes, at: int) -> bytes:
    """An IPv6 packet with the TCP/UDP checksum at `at` computed from scratch."""
    l4 = pkt[40:at] + b"\x00\x00" + pkt[at + 2 :]
    pseudo = pkt[8:40] + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, pkt[6]])
    return pkt[:at] + checksum(pseudo + l4).to_bytes(2, "big") + pkt[at + 2 :]


@st.composite
def ipv6_tables(draw: st.DrawFn, min_size: int = 0) -> tuple[int, dict[int, int]]:
    """An IPv6 prefix length and subnets routed to PublicIPs or PublicIPv6s."""
    subnet_len = draw(st.one_of(st.sampled_from([64, 48, 80, 128, 0]), st.integers(0, 128)))
    mask = prefix_mask6(subnet_len)
    subnets = draw(st.lists(addresses6.map(lambda a: a & mask), min_size=min_size, max_size=8,
                            unique=True))
    return subnet_len, {subnet: draw(public_addresses) for subnet in subnets}


@st.composite
def ipv6_packets(draw: st.DrawFn, routes: dict[int, object], subnet_len: int,
                 src: int | None = None, big: bool = False) -> bytes:
    """Mostly well-formed IPv6 packets (TCP, UDP, ICMPv6, an extension header, anything), to a
    routed subnet or anywhere, from `src` or anywhere; some with a wrong payload length, a
    trailer, a partial or a complete transport checksum; all longer than 1280 bytes if `big`."""
    next_header = draw(st.one_of(st.sampled_from([6, 17, 58, 0, 44]), st.integers(0, 255)))
    if next_header == 6:
        l4 = bytearray(draw(st.binary(min_size=20, max_size=20)))
        l4[12] = draw(st.sampled_from([5, 6, 15])) << 4
        l4 += draw(st.binary(max_size=40))
    else:
        l4 = bytearray(draw(st.binary(min_size=draw(st.sampled_from([8, 1, 0])), max_size=48)))
    if big or draw(st.integers(0, 5)) == 5:  # rare: longer than a path MTU, or than a quote
        l4 += bytes(draw(st.sampled_from([1240, 1300, 1500, 3000])))
    host_bits = ~prefix_mask6(subnet_len) & ((1 << 128) - 1)
    if routes and draw(st.booleans()):
        dst = draw(st.sampled_from(sorted(routes))) | (draw(addresses6) & host_bits)
    else:
        dst = draw(addresses6)
    if draw(st.integers(0, 9)) == 9:  # rare: a multicast or unspecified address
        multicast = draw(st.sampled_from([0xFF << 120, 0]))
        if draw(st.booleans()):
            dst = multicast | (dst & ((1 << 120) - 1)) if multicast else dst
        else:
            src = multicast | (draw(addresses6) & ((1 << 120) - 1)) if multicast else 0
    hop_limit = draw(st.sampled_from([64, 2, 255, 1, 0]))
    pkt = ipv6_packet(draw(addresses6) if src is None else src, dst, next_header, bytes(l4),
                      hop_limit)
    at = {6: 56, 17: 46}.get(next_header)
    if at is not None and at + 2 <= len(pkt):
        how = draw(st.sampled_from(["random", "complete", "partial"]))
        if how == "complete":
            pkt = with_l4_checksum(pkt, at)
        elif how == "partial":
            pseudo = pkt[8:40] + (len(pkt) - 40).to_bytes(4, "big") + bytes([0, 0, 0, pkt[6]])
            pkt = pkt[:at] + (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big") + pkt[at + 2 :]
    if draw(st.integers(0, 9)) == 9:  # rare: a payload length that lies
        pkt = pkt[:4] + draw(st.integers(0, 0xFFFF)).to_bytes(2, "big") + pkt[6:]
    return pkt + draw(st.binary(max_size=8))


def dual_fastpath(routes: dict[int, object], subnet_len: int, routes6: dict[int, object],
                  subnet_len6: int, vtep: Vtep | None = None, **kw: object) -> FastPath:
    """A FastPath with an IPv6 side: UDP mode, or VXLAN with `vtep` (routes to VxlanRoutes)."""
    if vtep is not None:
        kw.update(mode="vxlan", vni=vtep.vni, vtep_mac=vtep.mac, vtep_mac6=vtep.ipv6_mac,
                  send_fds=[-1] * vtep.senders, send6_fds=[-1] * vtep.senders6)
    fastpath = FastPath(-1, -1, 8285, TUN_ADDR, subnet_len, tun_addr6=TUN_ADDR6,
                        subnet_len6=subnet_len6, udp6_fd=-1, **kw)
    for subnet, route in routes.items():
        if isinstance(route, VxlanRoute):
            fastpath.set_route(dotted(subnet), dotted(route.peer), route.mac)
        else:
            fastpath.set_route(dotted(subnet), dotted(route))
    for subnet, route in routes6.items():
        if isinstance(route, VxlanRoute):
            fastpath.set_route6(text6(subnet), peer_text(route.peer), route.mac)
        else:
            fastpath.set_route6(text6(subnet), peer_text(route))
    return fastpath


@st.composite
def dual_cases(draw: st.DrawFn) -> tuple[int, dict[int, int], int, dict[int, int], bytes]:
    """IPv4 and IPv6 tables and a packet read from the TUN: mostly IPv6, some IPv4."""
    subnet_len, routes = draw(route_tables())
    subnet_len6, routes6 = draw(ipv6_tables())
    if draw(st.integers(0, 4)) == 4:
        data = draw(ipv4_packets(routes, subnet_len))
    else:
        data = draw(ipv6_packets(routes6, subnet_len6))
    return subnet_len, routes, subnet_len6, routes6, data


def v6_side(routes6: dict[int, object], subnet_len6: int, path_mtu: int = 0) -> Ipv6Routes:
    return Ipv6Routes(routes6, subnet_len6, int(ipaddress.IPv6Address(TUN_ADDR6)), path_mtu)


def vxlan_vtep(draw: st.DrawFn) -> Vtep:
    base = draw(vteps())
    return Vtep(base.vni, base.mac, base.senders, draw(st.one_of(st.none(), macs)),
                draw(st.one_of(st.just(4), st.integers(1, 64))))


path_mtus = st.sampled_from([0, 1280, 1400, 1500])


@settings(max_examples=500, **SLOW)
@given(dual_cases(), path_mtus)
def test_udp_egress_of_ipv6_agrees_with_reference(case, path_mtu):
    subnet_len, routes, subnet_len6, routes6, data = case
    fastpath = dual_fastpath(routes, subnet_len, routes6, subnet_len6, path_mtu6=path_mtu)
    assert fastpath.process_egress(data) == as_tuple(packet.egress(
        data, routes, subnet_len, int(ipaddress.IPv4Address(TUN_ADDR)),
        v6_side(routes6, subnet_len6, path_mtu)))


@settings(max_examples=400, **SLOW)
@given(dual_cases(), path_mtus, st.data())
def test_vxlan_egress_of_ipv6_agrees_with_reference(case, path_mtu, data):
    subnet_len, peers, subnet_len6, peers6, pkt = case
    vtep = vxlan_vtep(data.draw)
    routes = {s: VxlanRoute(p, data.draw(macs)) for s, p in peers.items()}
    routes6 = {s: VxlanRoute(p, data.draw(macs)) for s, p in peers6.items()}
    fastpath = dual_fastpath(routes, subnet_len, routes6, subnet_len6, vtep, path_mtu6=path_mtu)
    assert fastpath.process_egress(pkt) == as_tuple(packet.vxlan_egress(
        pkt, routes, subnet_len, int(ipaddress.IPv4Address(TUN_ADDR)), vtep,
        v6_side(routes6, subnet_len6, path_mtu)))


@st.composite
def ipv6_senders(draw: st.DrawFn) -> tuple[Sender, bytes]:
    """IPv4 and IPv6 tables, a sender (mostly a peer of either) and a packet (mostly IPv6)
    whose source is mostly inside one of the IPv6 subnets (the sender's or another's)."""
    subnet_len, routes = draw(route_tables())
    subnet_len6, routes6 = draw(ipv6_tables(min_size=draw(st.sampled_from([1, 1, 1, 0]))))
    src = None
    if routes6 and draw(st.integers(0, 3)):
        host_bits = ~prefix_mask6(subnet_len6) & ((1 << 128) - 1)
        src = draw(st.sampled_from(sorted(routes6))) | (draw(addresses6) & host_bits)
    # Mostly the holder of the source's subnet, else another peer or anyone.
    peers = sorted(set(routes.values()) | set(routes6.values()), key=str)
    kind = draw(st.integers(0, 3))
    if src is not None and kind:
        address = routes6[src & prefix_mask6(subnet_len6)]
    elif peers and kind:
        address = draw(st.sampled_from(peers))
    else:
        address = draw(public_addresses)
    if draw(st.integers(0, 4)) == 4:
        return Sender(address, routes, subnet_len, routes6, subnet_len6), \
            draw(ipv4_packets(routes, subnet_len))
    data = draw(ipv6_packets(routes6, subnet_len6, src))
    return Sender(address, routes, subnet_len, routes6, subnet_len6), data


@settings(max_examples=500, **SLOW)
@given(ipv6_senders(), st.booleans())
def test_udp_ingress_of_ipv6_agrees_with_reference(case, source_check):
    sender, data = case
    fastpath = dual_fastpath(dict(sender.routes), sender.subnet_len, dict(sender.routes6),
                             sender.subnet_len6, source_check=source_check)
    v6 = v6_side(dict(sender.routes6), sender.subnet_len6)
    assert fastpath.process_ingress(data, peer_text(sender.address)) == as_tuple(
        packet.ingress(data, sender if source_check else None, v6))


@settings(max_examples=400, **SLOW)
@given(ipv6_senders(), st.data())
def test_vxlan_ingress_of_ipv6_agrees_with_reference(case, data):
    sender, pkt = case
    vtep = vxlan_vtep(data.draw)
    fastpath = dual_fastpath(
        {s: VxlanRoute(p, b"\x02" * 6) for s, p in sender.routes.items()}, sender.subnet_len,
        {s: VxlanRoute(p, b"\x03" * 6) for s, p in sender.routes6.items()}, sender.subnet_len6,
        vtep, source_check=True)
    # Mostly as the peer's flannel-v6 device sends it; now and then the wrong ethertype or MAC.
    ethertype = data.draw(st.sampled_from([0x86DD, 0x86DD, 0x86DD, 0x0800, 0x0806]))
    dst = data.draw(st.sampled_from([vtep.ipv6_mac, vtep.ipv6_mac, vtep.mac]))
    frame = (bytes([0x08, 0, 0, 0]) + vtep.vni.to_bytes(3, "big") + b"\x00" + dst
             + b"\x02" * 6 + ethertype.to_bytes(2, "big") + pkt)
    assert fastpath.process_ingress(frame, peer_text(sender.address)) == as_tuple(
        packet.vxlan_ingress(frame, vtep, sender, v6_side(dict(sender.routes6),
                                                          sender.subnet_len6)))


@settings(max_examples=300, **SLOW)
@given(ipv6_senders(), st.randoms(use_true_random=False), st.booleans())
def test_mutated_ipv6_agrees_with_reference_both_modes(case, rng, vxlan):
    """Packets and frames broken the way the live fuzzing breaks them (netfuzz.mutate)."""
    sender, pkt = case
    vtep = Vtep(1, b"\x0e" * 6, 1, b"\x0f" * 6)
    v6 = v6_side(dict(sender.routes6), sender.subnet_len6)
    if vxlan:
        fastpath = dual_fastpath(
            {s: VxlanRoute(p, b"\x02" * 6) for s, p in sender.routes.items()},
            sender.subnet_len,
            {s: VxlanRoute(p, b"\x03" * 6) for s, p in sender.routes6.items()},
            sender.subnet_len6, vtep, source_check=True)
        frame = mutate(rng, vxlan_frame(pkt, vtep.vni, vtep.mac6, ethertype=0x86DD))
        expected = packet.vxlan_ingress(frame, vtep, sender, v6)
    else:
        fastpath = dual_fastpath(dict(sender.routes), sender.subnet_len, dict(sender.routes6),
                                 sender.subnet_len6, source_check=True)
        frame = mutate(rng, pkt)
        expected = packet.ingress(frame, sender, v6)
    assert fastpath.process_ingress(frame, peer_text(sender.address)) == as_tuple(expected)


@settings(max_examples=300, **SLOW)
@given(ipv6_tables(min_size=1), st.sampled_from([1280, 1400, 1500]), st.booleans(), st.data())
def test_ipv6_packet_too_big_agrees_with_reference(table, path_mtu, vxlan, data):
    """Routed packets longer than 1280 bytes against a path MTU: packet too big, or sent."""
    subnet_len6, peers6 = table
    pkt = data.draw(ipv6_packets(peers6, subnet_len6, big=True))
    v6 = v6_side({}, subnet_len6, path_mtu)
    if vxlan:
        vtep = Vtep(1, b"\x0e" * 6, 2, b"\x0f" * 6, 2)
        routes6 = {s: VxlanRoute(p, b"\x02" * 6) for s, p in peers6.items()}
        fastpath = dual_fastpath({}, 24, routes6, subnet_len6, vtep, path_mtu6=path_mtu)
        expected = packet.vxlan_egress(pkt, {}, 24, 0, vtep, Ipv6Routes(
            routes6, subnet_len6, v6.tun_addr, path_mtu))
    else:
        fastpath = dual_fastpath({}, 24, peers6, subnet_len6, path_mtu6=path_mtu)
        expected = packet.egress(pkt, {}, 24, 0, Ipv6Routes(peers6, subnet_len6, v6.tun_addr,
                                                            path_mtu))
    assert fastpath.process_egress(pkt) == as_tuple(expected)


def test_icmp6_errors_are_what_rfc_4443_asks():
    """No route: destination unreachable (1/0) from our IPv6 address back to the source,
    quoting the packet up to 1280 bytes in all, a right checksum; longer than the path MTU:
    packet too big (2/0) with the MTU. Not for an ICMPv6 error, nor from a multicast source."""
    fastpath = FastPath(-1, -1, 8285, TUN_ADDR, 24, tun_addr6=TUN_ADDR6, path_mtu6=1400)
    fastpath.set_route6("fd99:0:0:2::", "192.168.77.2")
    src = int(ipaddress.IPv6Address("fd99:0:0:1::5"))
    unrouted = ipv6_packet(src, int(ipaddress.IPv6Address("fd99:0:0:9::7")), 17, bytes(2000))
    action, reply, _, drop, _ = fastpath.process_egress(unrouted)
    assert (action, drop, len(reply)) == (Action.REPLY, Drop.NO_ROUTE, 1280)
    assert reply[6] == 58 and reply[8:24] == ipaddress.IPv6Address(TUN_ADDR6).packed
    assert reply[24:40] == unrouted[8:24] and reply[40:42] == b"\x01\x00"
    pseudo = reply[8:40] + (len(reply) - 40).to_bytes(4, "big") + bytes([0, 0, 0, 58])
    assert checksum(pseudo + reply[40:]) == 0 and reply[48:] == unrouted[:1232]
    big = ipv6_packet(src, int(ipaddress.IPv6Address("fd99:0:0:2::7")), 17, bytes(1400))
    action, reply, _, drop, _ = fastpath.process_egress(big)
    assert (action, drop) == (Action.REPLY, Drop.TOO_BIG)
    assert reply[40:42] == b"\x02\x00" and reply[44:48] == (1400).to_bytes(4, "big")
    assert fastpath.process_egress(big[:-100])[3] == Drop.BAD_TOTAL_LEN  # length lies
    fits = ipv6_packet(src, int(ipaddress.IPv6Address("fd99:0:0:2::7")), 17, bytes(1352))
    assert fastpath.process_egress(fits)[0] == Action.SEND
    nowhere = int(ipaddress.IPv6Address("fd99:0:0:9::7"))
    error = ipv6_packet(src, nowhere, 58, bytes([1]) + bytes(7))
    assert fastpath.process_egress(error)[:4:3] == (Action.DROP, Drop.NO_ROUTE)
    echo = ipv6_packet(src, nowhere, 58, bytes([128]) + bytes(7))
    assert fastpath.process_egress(echo)[0] == Action.REPLY
    multicast = ipv6_packet(0xFF02 << 112 | 1, nowhere, 17, bytes(8))
    assert fastpath.process_egress(multicast)[0] == Action.DROP


def test_ipv6_is_not_ipv4_without_an_ipv6_side():
    """A FastPath made without tun_addr6 drops IPv6 as before, both ways, and takes no v6
    route."""
    fastpath = FastPath(-1, -1, 8285, TUN_ADDR, 24)
    pkt = ipv6_packet(1, 2, 17, bytes(8))
    assert fastpath.process_egress(pkt)[3] == Drop.NOT_IPV4
    assert fastpath.process_ingress(pkt)[3] == Drop.NOT_IPV4
    with pytest.raises(ValueError, match="tun_addr6"):
        fastpath.set_route6("fd99:0:0:2::", "192.168.77.2")


def test_ipv6_routes_are_listed_replaced_and_removed():
    fastpath = FastPath(-1, -1, 8472, TUN_ADDR, 24, mode="vxlan", vni=1,
                        vtep_mac=b"\x0e" * 6, vtep_mac6=b"\x0f" * 6, tun_addr6=TUN_ADDR6)
    fastpath.set_route6("fd99:0:0:3::", "192.168.77.3", b"\x03" * 6)
    fastpath.set_route6("fd99:0:0:2::", "192.168.77.2", b"\x02" * 6)
    fastpath.set_route6("fd99:0:0:3::", "192.168.77.4", b"\x04" * 6)
    zero = {"tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0}
    assert fastpath.routes6() == [("fd99:0:0:2::", "192.168.77.2", b"\x02" * 6, zero),
                                  ("fd99:0:0:3::", "192.168.77.4", b"\x04" * 6, zero)]
    assert fastpath.routes() == []
    fastpath.del_route6("fd99:0:0:3::")
    fastpath.del_route6("fd99:0:0:3::")  # a no-op
    assert [r[0] for r in fastpath.routes6()] == ["fd99:0:0:2::"]
    with pytest.raises(ValueError, match="network address"):
        fastpath.set_route6("fd99:0:0:2::1", "192.168.77.2", b"\x02" * 6)
    with pytest.raises(ValueError, match="vtep_mac"):
        fastpath.set_route6("fd99:0:0:5::", "192.168.77.5")


def test_ipv6_route_peers_pass_the_sender_check_until_removed():
    """An IPv4 PublicIP holding only an IPv6 lease is a known sender; with the lease gone it is
    not."""
    fastpath = FastPath(-1, -1, 8285, TUN_ADDR, 24, tun_addr6=TUN_ADDR6, source_check=True)
    fastpath.set_route6("fd99:0:0:2::", "192.168.77.2")
    src = int(ipaddress.IPv6Address("fd99:0:0:2::5"))
    pkt = ipv6_packet(src, int(ipaddress.IPv6Address("fd99:0:0:1::7")), 17, bytes(8))
    assert fastpath.process_ingress(pkt, "192.168.77.2")[0] == Action.TUN
    assert fastpath.process_ingress(pkt, "192.168.77.9")[3] == Drop.UNKNOWN_SENDER
    fastpath.set_route6("fd99:0:0:2::", "192.168.77.3")   # moved: the old peer is forgotten
    assert fastpath.process_ingress(pkt, "192.168.77.2")[3] == Drop.UNKNOWN_SENDER
    assert fastpath.process_ingress(pkt, "192.168.77.3")[0] == Action.TUN
    fastpath.del_route6("fd99:0:0:2::")
    assert fastpath.process_ingress(pkt, "192.168.77.3")[3] == Drop.UNKNOWN_SENDER


@settings(max_examples=300, **SLOW)
@given(st.data())
def test_ipv6_flow_hash_agrees_with_reference(data):
    pkt = data.draw(ipv6_packets({}, 64))
    drop = packet._validate6(pkt)[1]
    if drop is not None:
        with pytest.raises(ValueError):
            _fastpath.flow_hash(pkt)
        return
    assert _fastpath.flow_hash(pkt) == packet.flow_hash(pkt)


@st.composite
def ipv6_super_packets(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A TCP or UDP IPv6 packet as a TUN with TSO6/USO hands it over, behind its virtio
    header: mostly a GSO one, some with the wrong type or none."""
    tcp = draw(st.booleans())
    payload = draw(st.binary(max_size=3000))
    src, dst = draw(addresses6), draw(addresses6)
    if tcp:
        doff = draw(st.sampled_from([5, 8]))
        header = bytearray(draw(st.binary(min_size=doff * 4, max_size=doff * 4)))
        header[12] = doff << 4
        l4 = bytes(header) + payload
        at = 40 + 16
    else:
        l4 = bytes(4) + (8 + len(payload)).to_bytes(2, "big") + bytes(2) + payload
        at = 40 + 6
    pkt = ipv6_packet(src, dst, draw(st.sampled_from([6, 17, 0])) if draw(st.integers(0, 9)) == 9
                      else (6 if tcp else 17), l4)
    pseudo = pkt[8:40] + (len(pkt) - 40).to_bytes(4, "big") + bytes([0, 0, 0, 6 if tcp else 17])
    pkt = pkt[:at] + (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big") + pkt[at + 2 :]
    gso = draw(st.sampled_from([GSO_TCPV6 if tcp else GSO_UDP_L4] * 4 + [0, 1, 3]))
    mss = draw(st.one_of(st.sampled_from([1200, 1400]), st.integers(0, 2000)))
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso, 0, mss, 40, at - 40)
    return vnet, pkt


@settings(max_examples=300, **SLOW)
@given(ipv6_super_packets())
def test_ipv6_tso_split_agrees_with_reference(case):
    vnet, pkt = case
    drop, segments = packet.segment_tso(vnet, pkt)
    assert _fastpath.segment_tso(vnet, pkt) == (int(drop or 0), segments)


def test_ipv6_tso_segments_are_valid_packets():
    """Each TCPV6 segment has its own payload length and a right checksum."""
    payload = bytes(range(256)) * 12
    tcp = bytearray(20)
    tcp[12] = 5 << 4
    tcp[13] = 0x18
    pkt = ipv6_packet(1, 2, 6, bytes(tcp) + payload)
    vnet = VNET_HDR.pack(0, GSO_TCPV6, 60, 1000, 40, 16)
    drop, segments = _fastpath.segment_tso(vnet, pkt)
    assert drop == 0 and [len(s) for s in segments] == [1060, 1060, 1060, 132]
    for i, seg in enumerate(segments):
        assert struct.unpack("!H", seg[4:6])[0] == len(seg) - 40
        assert struct.unpack("!I", seg[44:48])[0] == i * 1000
        assert with_l4_checksum(seg, 56) == seg


@settings(max_examples=300, **SLOW)
@given(st.lists(st.data(), min_size=1, max_size=1), st.booleans(), st.booleans())
def test_ipv6_tun_writes_agree_with_reference(draws, vnet, partial):
    data = draws[0]
    packets = []
    for _ in range(data.draw(st.integers(1, 5))):
        pkt = data.draw(ipv6_packets({}, 64))
        pkt, drop = packet._validate6(pkt)
        if drop is None:
            packets.append(pkt)
    if not packets:
        return
    frames, completed, bad_gso = packet.tun_writes(packets, vnet=vnet, complete_partial=partial,
                                                   mtu=1400)
    assert _fastpath.tun_writes(packets, vnet=vnet, complete_partial=partial, mtu=1400) == (
        frames, completed, bad_gso)


def test_vxlan_ipv6_frame_is_what_a_flannel_v6_device_sends():
    """Egress of an IPv6 packet: the peer's IPv6 VtepMAC, our IPv6 VtepMAC, ethertype 0x86DD,
    the packet untouched (hop limit too); a UDP-mode FastPath decrements the hop limit."""
    vxlan = FastPath(-1, -1, 8472, TUN_ADDR, 24, mode="vxlan", vni=1, vtep_mac=b"\x0e" * 6,
                     vtep_mac6=b"\x0f" * 6, tun_addr6=TUN_ADDR6)
    vxlan.set_route6("fd99:0:0:2::", "192.168.77.2", b"\x02" * 6)
    pkt = ipv6_packet(int(ipaddress.IPv6Address("fd99:0:0:1::5")),
                      int(ipaddress.IPv6Address("fd99:0:0:2::7")), 58, bytes(8), hop_limit=1)
    action, frame, peer, _, _ = vxlan.process_egress(pkt)
    assert (action, peer) == (Action.SEND, "192.168.77.2")
    assert frame == (bytes.fromhex("0800000000000100") + b"\x02" * 6 + b"\x0f" * 6
                     + b"\x86\xdd" + pkt)
    udp = FastPath(-1, -1, 8285, TUN_ADDR, 24, tun_addr6=TUN_ADDR6)
    udp.set_route6("fd99:0:0:2::", "192.168.77.2")
    assert udp.process_egress(pkt)[3] == Drop.TTL_EXPIRED
    sent = udp.process_egress(pkt[:7] + b"\x40" + pkt[8:])[1]
    assert sent == pkt[:7] + b"\x3f" + pkt[8:]


def test_mutations_reach_the_ipv6_paths():
    """The mutated frames of the test above do get past the sender check into the parsers."""
    rng = random.Random(7)
    sender = Sender(1, {}, 24, {int(ipaddress.IPv6Address("fd99:0:0:2::")): 1}, 64)
    pkt = ipv6_packet(int(ipaddress.IPv6Address("fd99:0:0:2::5")), 9, 17, bytes(8))
    v6 = v6_side(dict(sender.routes6), 64)
    seen = {packet.ingress(mutate(rng, pkt), sender, v6).drop for _ in range(300)}
    assert {None, Drop.SHORT, Drop.SPOOFED_INNER_SOURCE} <= seen


def tcp6_segment(src: int, dst: int, seq: int, payload: bytes, flags: int = 0x10,
                 tc_flow: int = 0, options: bytes = b"") -> bytes:
    """An IPv6 TCP segment with a complete checksum."""
    tcp = (struct.pack("!HHIIBBHHH", 4242, 80, seq & 0xFFFFFFFF, 7,
                       (5 + len(options) // 4) << 4, flags, 512, 0, 0) + options + payload)
    pkt = ipv6_packet(src, dst, 6, tcp)
    pkt = (0x60000000 | tc_flow).to_bytes(4, "big") + pkt[4:]
    return with_l4_checksum(pkt, 56)


@st.composite
def ipv6_tcp_runs(draw: st.DrawFn) -> list[bytes]:
    """Back-to-back IPv6 TCP segments, mostly of one flow in sequence (what GRO merges), now
    and then one that breaks the run: PSH, a shorter one, a gap, another flow label, a bad
    checksum, another flow, an IPv4 packet."""
    src, dst = draw(addresses6), draw(addresses6)
    mss = draw(st.sampled_from([1000, 1428, 7]))
    seq = draw(st.integers(0, 0xFFFFFFFF))
    out = []
    for _ in range(draw(st.integers(1, 8))):
        size = mss if draw(st.integers(0, 4)) else draw(st.integers(1, mss))
        kind = draw(st.sampled_from(["same"] * 6 + ["psh", "gap", "label", "bad", "other",
                                                    "ipv4"]))
        payload = bytes([len(out)]) * size
        if kind == "ipv4":
            out.append(draw(ipv4_packets({}, 24)))
            continue
        seg = tcp6_segment(src if kind != "other" else src ^ 1, dst,
                           seq + (5 if kind == "gap" else 0), payload,
                           0x18 if kind == "psh" else 0x10, 1 if kind == "label" else 0)
        if kind == "bad":
            seg = seg[:-1] + bytes([seg[-1] ^ 0xFF])
        out.append(seg)
        seq += size
    return out


@settings(max_examples=300, **SLOW)
@given(ipv6_tcp_runs(), st.booleans())
def test_ipv6_tcp_segments_coalesce_as_the_reference_says(packets, vnet):
    packets = [p for p in packets if packet._validate_any(p)[1] is None
               and len(packet._validate_any(p)[0]) == len(p)]
    if not packets:
        return
    frames, completed, bad_gso = packet.tun_writes(packets, vnet=vnet)
    assert _fastpath.tun_writes(packets, vnet=vnet) == (frames, completed, bad_gso)


def test_an_ipv6_tcp_run_becomes_one_tcpv6_super_packet():
    src, dst = int(ipaddress.IPv6Address("fd99:0:0:2::7")), int(ipaddress.IPv6Address(TUN_ADDR6))
    segments = [tcp6_segment(src, dst, 1000 + i * 1400, bytes([i]) * 1400) for i in range(3)]
    (header, merged), = _fastpath.tun_writes(segments)[0]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(header)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        VNET_F_NEEDS_CSUM, GSO_TCPV6, 60, 1400, 40, 16)
    assert len(merged) == 60 + 3 * 1400 and merged[4:6] == (3 * 1400 + 20).to_bytes(2, "big")
    assert merged[60:] == b"".join(s[60:] for s in segments)


# -- IPv6 from a kernel VXLAN sender on a veth (flannel-v6.<VNI>): partial checksums, and GSO
# super-packets handed over whole, as for IPv4.

def as_partial6(pkt: bytes) -> bytes:
    """An IPv6 TCP/UDP packet as a kernel sender with checksum offload leaves it: the folded
    pseudo-header sum in the checksum field."""
    at = 40 + (16 if pkt[6] == 6 else 6)
    pseudo = pkt[8:40] + (len(pkt) - 40).to_bytes(4, "big") + bytes([0, 0, 0, pkt[6]])
    return pkt[:at] + (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big") + pkt[at + 2 :]


def udp6_datagram(src: int, dst: int, payload: bytes) -> bytes:
    l4 = struct.pack("!HHHH", 4242, 53, 8 + len(payload), 0) + payload
    return with_l4_checksum(ipv6_packet(src, dst, 17, l4), 46)


@st.composite
def ipv6_from_kernel_senders(draw: st.DrawFn) -> list[bytes]:
    """ipv6_tcp_runs as a flannel-v6 device on a veth sends them: some checksums partial, now
    and then an unsplit TCP or UDP super-packet (partial)."""
    out = []
    for pkt in draw(ipv6_tcp_runs()):
        kind = draw(st.sampled_from(["as is", "partial", "partial", "super"]))
        if (pkt[0] >> 4) != 6:
            out.append(pkt)
            continue
        if kind == "partial":
            pkt = as_partial6(pkt)
        elif kind == "super":
            size = draw(st.integers(1, 9000))
            src, dst = draw(addresses6), draw(addresses6)
            pkt = as_partial6(tcp6_segment(src, dst, draw(st.integers(0, 0xFFFFFFFF)),
                                           bytes([size & 0xFF]) * size)
                              if draw(st.booleans())
                              else udp6_datagram(src, dst, bytes([size & 0xFF]) * size))
        out.append(pkt)
    return out


@settings(max_examples=300, **SLOW)
@given(ipv6_from_kernel_senders(), st.booleans(), st.booleans(),
       st.sampled_from([0, 68, 1280, 1450]), st.sampled_from([0, 1, 100, 1378]))
def test_ipv6_tun_writes_of_partial_checksums_agree_with_reference(packets, vnet, complete, mtu,
                                                                   gro_size):
    packets = [p for p in packets if packet._validate_any(p)[1] is None
               and len(packet._validate_any(p)[0]) == len(p)]
    options = dict(vnet=vnet, complete_partial=complete, mtu=mtu, gro_size=gro_size)
    assert _fastpath.tun_writes(packets, **options) == packet.tun_writes(packets, **options)


@pytest.mark.parametrize("impl", [_fastpath, packet], ids=["c", "reference"])
def test_an_unsplit_ipv6_tcp_super_packet_is_cut_to_the_tun_mtu(impl):
    """A kernel flannel-v6 sender on a veth hands over a 64 KB TCP frame whole, its checksum
    partial: to a virtio-header TUN it goes behind a TCPV6 GSO header sized to the TUN's MTU;
    to a plain one as segments of that size with complete checksums."""
    src, dst = int(ipaddress.IPv6Address("fd99:0:0:c9::2")), int(ipaddress.IPv6Address(TUN_ADDR6))
    data = bytes(range(256)) * 40
    pkt = as_partial6(tcp6_segment(src, dst, 5000, data, flags=0x18))
    (header, whole), = impl.tun_writes([pkt], complete_partial=True, mtu=1450)[0]
    assert whole == pkt
    assert VNET_HDR.unpack(header) == (VNET_F_NEEDS_CSUM, GSO_TCPV6, 60, 1390, 40, 16)
    frames, completed, bad_gso = impl.tun_writes([pkt], vnet=False, complete_partial=True,
                                                 mtu=1450)
    assert (completed, bad_gso) == (1, 0)
    segments = [seg for _, seg in frames]
    assert [len(s) for s in segments] == [1450] * 7 + [60 + len(data) - 7 * 1390]
    assert b"".join(s[60:] for s in segments) == data
    for i, seg in enumerate(segments):
        assert struct.unpack("!H", seg[4:6])[0] == len(seg) - 40
        assert struct.unpack("!I", seg[44:48])[0] == 5000 + i * 1390
        assert with_l4_checksum(seg, 56) == seg


@pytest.mark.parametrize("impl", [_fastpath, packet], ids=["c", "reference"])
def test_an_ipv6_udp_super_packet_keeps_its_datagram_bounds(impl):
    src, dst = int(ipaddress.IPv6Address("fd99:0:0:c9::2")), int(ipaddress.IPv6Address(TUN_ADDR6))
    pkt = as_partial6(udp6_datagram(src, dst, bytes(range(100)) * 30))
    frames, _, bad_gso = impl.tun_writes([pkt], complete_partial=True, mtu=1450, gro_size=1000)
    assert bad_gso == 0 and [len(seg) for _, seg in frames] == [1048, 1048, 1048]
    for _, seg in frames:
        assert with_l4_checksum(seg, 46) == seg
