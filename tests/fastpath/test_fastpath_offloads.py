"""The fast path's offloads against their Python reference: segmentation of TUN super-packets
(``segment_tso``), offloaded egress in both modes, and the coalescing of received segments into
TUN writes (``tun_writes``), also of streams as kernel senders make them (partial, wrong and
unsplit checksums)."""

from __future__ import annotations

import struct

import pytest
from helpers import (
    OUR_MAC,
    PEER_MAC,
    PORT,
    FastPath,
    addresses,
    as_partial,
    as_tuple,
    dotted,
    ip,
    ip_header,
    l4_with_checksum,
    make_fastpath,
    make_vxlan_fastpath,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_udp import _fastpath, packet
from flannel_udp.packet import Action, Vtep, VxlanRoute, checksum, prefix_mask

GSO_TYPES = [packet.GSO_NONE, packet.GSO_TCPV4, packet.GSO_UDP_L4]


@st.composite
def super_packets(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(virtio header, packet) as a TUN with offloads might hand them over, mostly sane: TCP or
    UDP with options, any flags, fragments now and then, sizes around the MSS; and headers
    with every GSO type, odd sizes and checksum offsets."""
    proto = draw(st.sampled_from([6, 6, 17, 1]))
    ip_options = draw(st.sampled_from([b"", b"", b"\x94\x04\x00\x00", b"\x01" * 8]))
    if draw(st.integers(0, 9)) == 9:
        payload_len = draw(st.integers(0, 20000))
    else:
        payload_len = draw(st.integers(0, 4000))
    payload = draw(st.binary(min_size=min(payload_len, 64), max_size=min(payload_len, 64)))
    payload = (payload * (payload_len // max(len(payload), 1) + 1))[:payload_len]
    if proto == 6:
        tcp_options = draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), bytes(40)]))
        l4 = (struct.pack("!HHIIBBHHH", draw(st.integers(0, 0xFFFF)), 80,
                          draw(st.integers(0, 0xFFFFFFFF)), draw(st.integers(0, 0xFFFFFFFF)),
                          (5 + len(tcp_options) // 4) << 4,
                          draw(st.one_of(st.sampled_from([0x10, 0x18, 0x19, 0x98]),
                                         st.integers(0, 255))),
                          draw(st.integers(0, 0xFFFF)), 0, 0) + tcp_options + payload)
        at = 16
    else:
        l4 = struct.pack("!HHHH", 5000, 53, 8 + payload_len, 0) + payload
        at = 6
    frag = draw(st.sampled_from([0x4000, 0x4000, 0, 0x2000, 0x0010]))
    header = ip_header(20 + len(ip_options) + len(l4), proto, draw(addresses), draw(addresses),
                       ident=draw(st.integers(0, 0xFFFF)), frag=frag, options=ip_options)
    pkt = l4_with_checksum(header, l4, at)
    if draw(st.booleans()):  # as the kernel leaves it: the pseudo-header sum in the field
        ihl = len(header)
        pseudo = pkt[12:20] + bytes([0, proto]) + len(l4).to_bytes(2, "big")
        partial = (~checksum(pseudo)) & 0xFFFF
        pkt = pkt[: ihl + at] + partial.to_bytes(2, "big") + pkt[ihl + at + 2 :]
    gso_type = draw(st.one_of(st.sampled_from(GSO_TYPES), st.integers(0, 255)))
    gso_size = draw(st.one_of(st.sampled_from([0, 536, 1000, 1398, 1448]), st.integers(0, 3000)))
    csum_start = len(header) if draw(st.booleans()) else draw(st.integers(0, 0xFFFF))
    csum_offset = at if draw(st.booleans()) else draw(st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([packet.VNET_F_NEEDS_CSUM, 0, 2, 3]))
    vnet_hdr = packet.VNET_HDR.pack(flags, gso_type, draw(st.integers(0, 0xFFFF)), gso_size,
                                    csum_start, csum_offset)
    return vnet_hdr, pkt


def segmented(vnet_hdr: bytes, pkt: bytes) -> tuple:
    drop, segments = packet.segment_tso(vnet_hdr, pkt)
    return (int(drop or 0), segments)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(super_packets())
def test_segmentation_agrees_with_reference(case):
    vnet_hdr, pkt = case
    assert _fastpath.segment_tso(vnet_hdr, pkt) == segmented(vnet_hdr, pkt)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(super_packets(), st.booleans(), st.data())
def test_offloaded_egress_agrees_with_reference_in_both_modes(case, vxlan, data):
    """What egress sends for a super-packet = the reference's route decision, then its split,
    then each segment encapsulated (TTL decremented once, before the split, in UDP mode)."""
    vnet_hdr, pkt = case
    dst = int.from_bytes(pkt[16:20], "big")
    routes = {dst & prefix_mask(24): ip("192.168.1.2")} if data.draw(st.booleans()) else {}
    gso = data.draw(st.booleans())
    if vxlan:
        vtep = Vtep(1, b"\x02" * 6, 4)
        vroutes = {k: VxlanRoute(v, b"\x04" * 6) for k, v in routes.items()}
        fastpath = FastPath(-1, -1, 8472, "0.0.0.0", 24, mode="vxlan", vni=1, vtep_mac=vtep.mac,
                            send_fds=[-1] * 4, vnet_hdr=True, udp_gso=gso)
        for subnet, route in vroutes.items():
            fastpath.set_route(dotted(subnet), dotted(route.peer), route.mac)
        result = packet.vxlan_egress(pkt, vroutes, 24, 0, vtep)
    else:
        fastpath = FastPath(-1, -1, PORT, "0.0.0.0", 24, vnet_hdr=True, udp_gso=gso)
        for subnet, peer in routes.items():
            fastpath.set_route(dotted(subnet), dotted(peer))
        result = packet.egress(pkt, routes, 24, 0)
    got = fastpath.process_egress(pkt, vnet_hdr)
    if result.action != Action.SEND:
        assert got == as_tuple(result)[:1] + ([] if result.action == Action.DROP
                                              else result.data,) + as_tuple(result)[2:]
        return
    inner = result.data[packet.VXLAN_ENCAP_LEN:] if vxlan else result.data
    drop, segments = packet.segment_tso(vnet_hdr, inner)
    if drop is not None:
        assert got == (int(Action.DROP), [], "", int(drop), 0)
        return
    if vxlan:
        segments = [result.data[: packet.VXLAN_ENCAP_LEN] + seg for seg in segments]
    assert got == (int(Action.SEND), segments, dotted(result.peer), 0, result.sender)


@st.composite
def received_segments(draw: st.DrawFn) -> list[bytes]:
    """Packets back to back as a GRO read hands them over: runs of TCP segments of a few flows,
    interleaved, with now and then a PSH, a short or longer segment, a gap, another ACK or
    window, a corrupted byte, IP options, or a packet of another protocol in between."""
    flows = []
    for _ in range(draw(st.integers(1, 3))):
        flows.append(dict(src=draw(addresses), sport=draw(st.integers(0, 0xFFFF)),
                          seq=draw(st.integers(0, 0xFFFFFFFF)), ack=draw(st.integers(0, 99)),
                          mss=draw(st.sampled_from([1, 100, 1398])),
                          options=draw(st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]))))
    out = []
    for _ in range(draw(st.integers(0, 30))):
        flow = draw(st.sampled_from(flows))
        quirk = draw(st.sampled_from(["none"] * 8 + ["psh", "short", "long", "gap", "ack",
                                                     "window", "corrupt", "ipopt", "udp", "fin"]))
        size = {"short": flow["mss"] // 2, "long": flow["mss"] + 1}.get(quirk, flow["mss"])
        if quirk == "gap":
            flow["seq"] += 7
        flags = {"psh": 0x18, "fin": 0x11}.get(quirk, 0x10)
        l4 = (struct.pack("!HHIIBBHHH", flow["sport"], 80, flow["seq"] & 0xFFFFFFFF,
                          flow["ack"] + (quirk == "ack"), (5 + len(flow["options"]) // 4) << 4,
                          flags, 500 + (quirk == "window"), 0, 0)
              + flow["options"] + bytes([len(out) & 0xFF]) * size)
        proto, at = 6, 16
        if quirk == "udp":
            l4, proto, at = struct.pack("!HHHH", 1, 2, 8 + size, 0) + bytes(size), 17, 6
        options = b"\x94\x04\x00\x00" if quirk == "ipopt" else b""
        header = ip_header(20 + len(options) + len(l4), proto, flow["src"], 0x0A000001,
                           options=options)
        pkt = l4_with_checksum(header, l4, at)
        if quirk == "corrupt":
            pkt = pkt[:-1] + bytes([pkt[-1] ^ 1])
        out.append(pkt)
        if proto == 6:
            flow["seq"] += size
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(received_segments())
def test_coalescing_agrees_with_reference(packets):
    assert _fastpath.tun_writes(packets) == packet.tun_writes(packets)


@st.composite
def received_from_kernel_senders(draw: st.DrawFn) -> list[bytes]:
    """received_segments as kernel VXLAN senders on a veth send them: some checksums partial,
    some simply wrong, now and then an unsplit TCP or UDP super-packet (partial)."""
    out = []
    for pkt in draw(received_segments()):
        kind = draw(st.sampled_from(["as is", "partial", "partial", "wrong", "super"]))
        if kind == "partial":
            pkt = as_partial(pkt)
        elif kind == "wrong":
            pkt = pkt[:-1] + bytes([pkt[-1] ^ 0x5A])
        elif kind == "super":
            proto = draw(st.sampled_from([6, 17]))
            size = draw(st.integers(1, 9000))
            if proto == 6:
                l4 = struct.pack("!HHIIBBHHH", 7, 80, draw(st.integers(0, 0xFFFFFFFF)), 1, 0x80,
                                 0x10, 500, 0, 0) + bytes(12) + bytes([size & 0xFF]) * size
            else:
                l4 = struct.pack("!HHHH", 7, 53, 8 + size, 0) + bytes([size & 0xFF]) * size
            header = ip_header(20 + len(l4), proto, draw(addresses), 0x0A000001)
            pkt = as_partial(l4_with_checksum(header, l4, 16 if proto == 6 else 6))
        out.append(pkt)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(received_from_kernel_senders(), st.booleans(), st.booleans(),
       st.sampled_from([0, 68, 576, 1450]), st.sampled_from([0, 1, 100, 1398]))
def test_tun_writes_of_partial_checksums_agree_with_reference(packets, vnet, complete, mtu,
                                                              gro_size):
    options = dict(vnet=vnet, complete_partial=complete, mtu=mtu, gro_size=gro_size)
    assert _fastpath.tun_writes(packets, **options) == packet.tun_writes(packets, **options)


@pytest.mark.parametrize("proto", [6, 17])
def test_vxlan_ingress_finds_a_partial_checksum_where_the_reference_does_and_udp_mode_not(proto):
    l4 = (struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 0x50, 0x10, 9, 0, 0) if proto == 6
          else struct.pack("!HHHH", 1, 2, 8 + 100, 0)) + bytes(range(100))
    pkt = as_partial(l4_with_checksum(ip_header(20 + len(l4), proto, 1, 2), l4, 16
                                      if proto == 6 else 6))
    vtep = Vtep(1, OUR_MAC)
    frame = packet.vxlan_encap(pkt, 1, OUR_MAC, PEER_MAC)
    expected = as_tuple(packet.vxlan_ingress(frame, vtep))
    assert expected[4] == (36 if proto == 6 else 26)
    assert make_vxlan_fastpath({}, 24, 0, vtep).process_ingress(frame) == expected
    assert make_fastpath({}, 24, 0).process_ingress(pkt)[4] == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 0xFFFFFFFF), st.sampled_from([0x10, 0x18]),
       st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8)]),
       st.sampled_from([536, 1000, 1398]), st.integers(2, 30000), st.binary(min_size=1))
def test_segments_of_a_tcp_super_packet_coalesce_back_into_one_that_splits_the_same(
        seq, flags, options, mss, size, fill):
    payload = (fill * (size // len(fill) + 1))[:size]
    l4 = struct.pack("!HHIIBBHHH", 1, 2, seq, 3, (5 + len(options) // 4) << 4, flags, 9, 0,
                     0) + options + payload
    pkt = l4_with_checksum(ip_header(20 + len(l4), 6, 1, 2), l4, 16)
    vnet_hdr = packet.VNET_HDR.pack(packet.VNET_F_NEEDS_CSUM, packet.GSO_TCPV4, 0, mss, 20, 16)
    drop, segments = _fastpath.segment_tso(vnet_hdr, pkt)
    assert drop == 0
    if len(segments) == 1:
        assert _fastpath.tun_writes(segments) == ([(packet.ZERO_VNET_HDR, pkt)], 0, 0)
        return
    [(header, merged)], _, _ = _fastpath.tun_writes(segments)
    assert _fastpath.segment_tso(header, merged) == (0, segments)
