"""The native fast path against its Python reference, its route table, and runs on real fds.

The property tests feed the same bytes to ``flannel_udp.packet`` and to the C functions behind
``FastPath.process_egress``/``process_ingress`` (the very ones the I/O threads run) and require
byte-identical results, in UDP and in VXLAN mode. The last tests run the threads on a real TUN
inside a throwaway network namespace and on real UDP sockets.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import secrets
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_udp import _fastpath, packet
from flannel_udp.backends.tun import enable_tun_offloads
from flannel_udp.packet import (
    VXLAN_FLAG_I,
    Action,
    Drop,
    Result,
    Vtep,
    VxlanRoute,
    checksum,
    prefix_mask,
)

FastPath = _fastpath.FastPath

PORT = 8285
IP_RECVERR = 11  # <linux/in.h>; not exported by the socket module
addresses = st.integers(0, 0xFFFFFFFF)


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def dotted(addr: int) -> str:
    return str(ipaddress.IPv4Address(addr))


def make_fastpath(routes: dict[int, int], subnet_len: int, tun_addr: int) -> FastPath:
    fastpath = FastPath(-1, -1, PORT, dotted(tun_addr), subnet_len)
    for subnet, peer in routes.items():
        fastpath.set_route(dotted(subnet), dotted(peer))
    return fastpath


def as_tuple(result: Result) -> tuple:
    """The reference result in the shape of the FastPath test hooks (the last item: the sender
    socket of a SEND, else where the packet's partial checksum is)."""
    peer = dotted(result.peer) if result.action == Action.SEND else ""
    last = result.sender if result.action == Action.SEND else result.csum_at
    return (int(result.action), result.data, peer, int(result.drop or 0), last)


def make_packet(src: int, dst: int, ttl: int = 64, proto: int = 17, payload: bytes = b"") -> bytes:
    total = 20 + len(payload)
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            7,
            0,
            ttl,
            proto,
            0,
            src.to_bytes(4, "big"),
            dst.to_bytes(4, "big"),
        )
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


# --- strategies ---------------------------------------------------------------------------------


@st.composite
def route_tables(draw: st.DrawFn) -> tuple[int, dict[int, int]]:
    subnet_len = draw(st.one_of(st.sampled_from([0, 16, 24, 32]), st.integers(0, 32)))
    mask = prefix_mask(subnet_len)
    subnets = draw(st.lists(addresses.map(lambda a: a & mask), max_size=12, unique=True))
    return subnet_len, {subnet: draw(addresses) for subnet in subnets}


@st.composite
def ipv4_packets(draw: st.DrawFn, routes: dict[int, int], subnet_len: int) -> bytes:
    """Mostly well-formed IPv4 packets; some with a bad checksum, odd lengths or trailers."""
    ihl = draw(st.one_of(st.just(5), st.integers(5, 15)))
    options = draw(st.binary(min_size=(ihl - 5) * 4, max_size=(ihl - 5) * 4))
    payload = draw(st.binary(max_size=40))
    ttl = draw(st.one_of(st.sampled_from([0, 1, 2, 255]), st.integers(0, 255)))
    proto = draw(st.one_of(st.sampled_from([1, 6, 17]), st.integers(0, 255)))
    frag = draw(st.one_of(st.sampled_from([0, 0x2000, 0x4000]), st.integers(0, 0xFFFF)))
    host_bits = ~prefix_mask(subnet_len) & 0xFFFFFFFF
    if routes and draw(st.booleans()):
        dst = draw(st.sampled_from(sorted(routes))) | (draw(addresses) & host_bits)
    else:
        dst = draw(addresses)
    total = ihl * 4 + len(payload)
    if draw(st.integers(0, 9)) == 9:  # Hypothesis favours small draws: rare = the large one
        total = draw(st.integers(0, 0xFFFF))
    header = bytearray(
        bytes([0x40 | ihl, draw(st.integers(0, 255))])
        + total.to_bytes(2, "big")
        + draw(st.binary(min_size=2, max_size=2))
        + frag.to_bytes(2, "big")
        + bytes([ttl, proto, 0, 0])
        + draw(addresses).to_bytes(4, "big")
        + dst.to_bytes(4, "big")
        + options
    )
    if draw(st.booleans()):
        header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    else:
        header[10:12] = draw(st.binary(min_size=2, max_size=2))
    return bytes(header) + payload + draw(st.binary(max_size=8))


@st.composite
def case_with_packet(draw: st.DrawFn) -> tuple[int, dict[int, int], int, bytes]:
    subnet_len, routes = draw(route_tables())
    return subnet_len, routes, draw(addresses), draw(ipv4_packets(routes, subnet_len))


@st.composite
def case_with_bytes(draw: st.DrawFn) -> tuple[int, dict[int, int], int, bytes]:
    subnet_len, routes = draw(route_tables())
    data = draw(st.binary(max_size=80))
    if data and draw(st.booleans()):
        data = bytes([0x40 | (data[0] & 0x0F)]) + data[1:]  # get past the version check more
    return subnet_len, routes, draw(addresses), data


# --- fast path == reference ---------------------------------------------------------------------


def test_drop_names_match_the_reference():
    assert _fastpath.DROP_NAMES == packet.DROP_NAMES


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_with_packet())
def test_fastpath_agrees_with_reference_on_ipv4_packets(case):
    subnet_len, routes, tun_addr, data = case
    fastpath = make_fastpath(routes, subnet_len, tun_addr)
    assert fastpath.process_egress(data) == as_tuple(
        packet.egress(data, routes, subnet_len, tun_addr)
    )
    assert fastpath.process_ingress(data) == as_tuple(packet.ingress(data))


@settings(max_examples=300, deadline=None)
@given(case_with_bytes())
def test_fastpath_agrees_with_reference_on_random_bytes(case):
    subnet_len, routes, tun_addr, data = case
    fastpath = make_fastpath(routes, subnet_len, tun_addr)
    assert fastpath.process_egress(data) == as_tuple(
        packet.egress(data, routes, subnet_len, tun_addr)
    )
    assert fastpath.process_ingress(data) == as_tuple(packet.ingress(data))


def test_fastpath_reply_is_the_reference_icmp_for_a_maximal_header():
    # IHL 15 and a long payload: the largest quote the C reply buffer must hold.
    data = bytearray(make_packet(ip("10.5.1.7"), ip("10.5.9.1"), payload=bytes(range(200))))
    data[0] = 0x4F
    data[2:4] = len(data).to_bytes(2, "big")
    data = bytes(data)
    fastpath = make_fastpath({}, 24, ip("10.5.1.0"))
    action, reply, _, drop, _ = fastpath.process_egress(data)
    assert (action, drop) == (Action.REPLY, Drop.NO_ROUTE)
    assert len(reply) == 20 + 8 + 60 + 8
    assert reply == packet.egress(data, {}, 24, ip("10.5.1.0")).data


def test_process_hooks_leave_the_counters_alone():
    fastpath = make_fastpath({}, 24, ip("10.5.1.0"))
    fastpath.process_egress(b"short")
    fastpath.process_ingress(make_packet(1, 2))
    counters = fastpath.counters()
    assert counters == {
        "tx_packets": 0,
        "tx_bytes": 0,
        "rx_packets": 0,
        "rx_bytes": 0,
        "icmp_sent": 0,
        "icmp_suppressed": 0,
        "ingress_drops": {name: 0 for name in packet.DROP_NAMES.values()},
        "egress_drops": {name: 0 for name in packet.DROP_NAMES.values()},
        "tso_split": 0,
        "gro_coalesced": 0,
        "gso_fallbacks": 0,
        "csum_completed": 0,
        "busy_poll_batches": 0,
        "busy_poll_egress_batches": 0,
        "busy_poll_ingress_batches": 0,
        "drops": {name: 0 for name in packet.DROP_NAMES.values()},
    }


# --- VXLAN mode == reference -------------------------------------------------------------------

macs = st.binary(min_size=6, max_size=6)


def make_vxlan_fastpath(routes: dict[int, VxlanRoute], subnet_len: int, tun_addr: int,
                        vtep: Vtep) -> FastPath:
    fastpath = FastPath(-1, -1, 8472, dotted(tun_addr), subnet_len, mode="vxlan", vni=vtep.vni,
                        vtep_mac=vtep.mac, send_fds=[-1] * vtep.senders)
    for subnet, route in routes.items():
        fastpath.set_route(dotted(subnet), dotted(route.peer), route.mac)
    return fastpath


@st.composite
def vteps(draw: st.DrawFn) -> Vtep:
    vni = draw(st.one_of(st.sampled_from([1, 0xFFFFFF]), st.integers(1, 0xFFFFFF)))
    return Vtep(vni, draw(macs), draw(st.one_of(st.just(8), st.integers(1, 64))))


@st.composite
def vxlan_cases(draw: st.DrawFn) -> tuple[int, dict[int, VxlanRoute], int, Vtep, bytes]:
    """A route table, our VTEP, and a packet read from the TUN (mostly well-formed)."""
    subnet_len, peers = draw(route_tables())
    routes = {subnet: VxlanRoute(peer, draw(macs)) for subnet, peer in peers.items()}
    # Hypothesis favours small draws, so the rare branch goes with the large value.
    if draw(st.integers(0, 4)) == 4:
        data = draw(case_with_bytes())[3]
    else:
        data = draw(ipv4_packets(routes, subnet_len))
    return subnet_len, routes, draw(addresses), draw(vteps()), data


@st.composite
def vxlan_frames(draw: st.DrawFn, vtep: Vtep) -> bytes:
    """Datagrams as peers (or anyone) might send them: well-formed VXLAN (reserved bits random)
    around a packet, or with one thing wrong: a header field, the length, or all of it."""
    broken = draw(st.sampled_from(["none", "none", "none", "flags", "vni", "mac", "ethertype",
                                   "inner", "cut", "random"]))
    if broken == "random":
        return draw(st.binary(max_size=60))
    flags = VXLAN_FLAG_I | draw(st.integers(0, 255))
    if broken == "flags":
        flags &= ~VXLAN_FLAG_I
    vni = vtep.vni
    if broken == "vni":
        vni = draw(st.integers(0, 0xFFFFFF).filter(lambda v: v != vtep.vni))
    dst = draw(macs.filter(lambda m: m != vtep.mac)) if broken == "mac" else vtep.mac
    ethertype = 0x0800
    if broken == "ethertype":
        ethertype = draw(st.one_of(st.sampled_from([0x0806, 0x86DD, 0x8100]),
                                   st.integers(0, 0xFFFF).filter(lambda e: e != 0x0800)))
    header = (bytes([flags]) + draw(st.binary(min_size=3, max_size=3)) + vni.to_bytes(3, "big")
              + draw(st.binary(min_size=1, max_size=1)) + dst + draw(macs)
              + ethertype.to_bytes(2, "big"))
    inner = draw(st.binary(max_size=40) if broken == "inner" else ipv4_packets({}, 24))
    frame = header + inner
    if broken == "cut":
        frame = frame[: draw(st.integers(0, len(frame)))]
    return frame


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vxlan_cases())
def test_vxlan_egress_agrees_with_reference(case):
    subnet_len, routes, tun_addr, vtep, data = case
    fastpath = make_vxlan_fastpath(routes, subnet_len, tun_addr, vtep)
    assert fastpath.process_egress(data) == as_tuple(
        packet.vxlan_egress(data, routes, subnet_len, tun_addr, vtep))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_vxlan_ingress_agrees_with_reference(data):
    vtep = data.draw(vteps())
    frame = data.draw(vxlan_frames(vtep))
    fastpath = make_vxlan_fastpath({}, 24, 0, vtep)
    assert fastpath.process_ingress(frame) == as_tuple(packet.vxlan_ingress(frame, vtep))


@settings(max_examples=300, deadline=None)
@given(st.one_of(ipv4_packets({}, 24), st.binary(max_size=60)))
def test_flow_hash_is_the_same_in_c_and_in_the_reference(data):
    cut, drop = packet._validate(data)
    if drop is not None:
        with pytest.raises(ValueError):
            _fastpath.flow_hash(data)
    else:
        assert _fastpath.flow_hash(data) == packet.flow_hash(cut)


def test_vxlan_frame_of_the_largest_packet_fits_the_headroom():
    vtep = Vtep(7, b"\x02" * 6, 1)
    routes = {ip("10.5.2.0"): VxlanRoute(ip("192.168.0.2"), b"\x04" * 6)}
    data = make_packet(ip("10.5.1.7"), ip("10.5.2.9"), payload=b"z" * (65535 - 20))
    action, frame, peer, drop, sender = make_vxlan_fastpath(routes, 24, 0, vtep).process_egress(
        data)
    assert (action, peer, drop, sender) == (Action.SEND, "192.168.0.2", 0, 0)
    assert frame == packet.vxlan_egress(data, routes, 24, 0, vtep).data


def test_vxlan_routes_carry_the_peers_vtep_mac():
    fastpath = make_vxlan_fastpath({}, 24, 0, Vtep(1, b"\x02" * 6))
    fastpath.set_route("10.5.2.0", "192.168.0.2", b"\x0a" * 6)
    fastpath.set_route("10.5.2.0", "192.168.0.2", b"\x0b" * 6)  # a new MAC, same node
    ((subnet, peer, mac, _),) = fastpath.routes()
    assert (subnet, peer, mac) == ("10.5.2.0", "192.168.0.2", b"\x0b" * 6)
    with pytest.raises(ValueError):
        fastpath.set_route("10.5.3.0", "192.168.0.3")  # no MAC
    with pytest.raises(ValueError):
        fastpath.set_route("10.5.3.0", "192.168.0.3", b"\x0b" * 5)
    with pytest.raises(ValueError):
        make_fastpath({}, 24, 0).set_route("10.5.3.0", "192.168.0.3", b"\x0b" * 6)


@pytest.mark.parametrize("kwargs", [
    {"mode": "vxlan", "vni": 0, "vtep_mac": b"\x02" * 6},
    {"mode": "vxlan", "vni": 1 << 24, "vtep_mac": b"\x02" * 6},
    {"mode": "vxlan", "vni": 1, "vtep_mac": None},
    {"mode": "vxlan", "vni": 1, "vtep_mac": "02:02:02:02:02:02"},
    {"mode": "vxlan", "vni": 1, "vtep_mac": b"\x02" * 6, "send_fds": []},
    {"mode": "vxlan", "vni": 1, "vtep_mac": b"\x02" * 6, "send_fds": [-1] * 65},
    {"mode": "udp", "send_fds": [-1, -1]},
    {"mode": "gre"},
])
def test_constructor_rejects_bad_vxlan_arguments(kwargs):
    with pytest.raises(ValueError):
        FastPath(-1, -1, 8472, "10.0.0.0", 24, **kwargs)



# --- offloads: segmentation and coalescing == reference ------------------------------------------

GSO_TYPES = [packet.GSO_NONE, packet.GSO_TCPV4, packet.GSO_UDP_L4]


def l4_with_checksum(header: bytes, l4: bytes, at: int) -> bytes:
    """`header` + `l4` with the L4 checksum at offset `at` computed from scratch."""
    pseudo = header[12:20] + bytes([0, header[9]]) + len(l4).to_bytes(2, "big")
    l4 = l4[:at] + b"\x00\x00" + l4[at + 2 :]
    return header + l4[:at] + checksum(pseudo + l4).to_bytes(2, "big") + l4[at + 2 :]


def ip_header(total: int, proto: int, src: int, dst: int, ident: int = 7, frag: int = 0x4000,
              ttl: int = 64, tos: int = 0, options: bytes = b"") -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45 + len(options) // 4, tos, total,
                                   ident, frag, ttl, proto, 0, src.to_bytes(4, "big"),
                                   dst.to_bytes(4, "big")) + options)
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header)


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


def as_partial(pkt: bytes) -> bytes:
    """A TCP/UDP packet as a kernel sender with checksum offload leaves it: the folded
    pseudo-header sum in the checksum field."""
    ihl = (pkt[0] & 0x0F) * 4
    at = ihl + (16 if pkt[9] == 6 else 6)
    pseudo = pkt[12:20] + bytes([0, pkt[9]]) + (len(pkt) - ihl).to_bytes(2, "big")
    return pkt[:at] + (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big") + pkt[at + 2 :]


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


# --- route table --------------------------------------------------------------------------------


def lookup(fastpath: FastPath, dst: int) -> str | None:
    """The peer the fast path routes ``dst`` to, or None."""
    action, _, peer, _, _ = fastpath.process_egress(make_packet(ip("10.0.0.1"), dst))
    return peer if action == Action.SEND else None


def assert_table_matches(fastpath: FastPath, model: dict[int, int], probes: list[int]) -> None:
    listed = [(subnet, peer) for subnet, peer, _, _ in fastpath.routes()]
    assert listed == [(dotted(s), dotted(p)) for s, p in sorted(model.items())]
    for key in probes:
        expected = dotted(model[key]) if key in model else None
        assert lookup(fastpath, key) == expected, dotted(key)
    info = fastpath._table_info()
    assert info["count"] == len(model)
    assert info["capacity"] & (info["capacity"] - 1) == 0
    assert info["capacity"] >= 2 * len(model)


def test_5000_routes_inserted_replaced_and_deleted_agree_with_a_dict():
    rng = random.Random(5000)
    # /24 leases out of a /8 network, the layout of a big flannel cluster.
    subnets = [ip("10.0.0.0") + (n << 8) for n in rng.sample(range(1 << 16), 6000)]
    fastpath = make_fastpath({}, 24, ip("10.0.0.0"))
    model: dict[int, int] = {}
    for subnet in subnets[:5000]:
        model[subnet] = rng.getrandbits(32)
        fastpath.set_route(dotted(subnet), dotted(model[subnet]))
    for subnet in rng.sample(subnets[:5000], 1000):
        model[subnet] = rng.getrandbits(32)
        fastpath.set_route(dotted(subnet), dotted(model[subnet]))
    assert_table_matches(fastpath, model, subnets)
    # Linear probing at load <= 1/2 with a decent hash keeps probe sequences short.
    assert fastpath._table_info()["max_probe"] <= 40
    for subnet in rng.sample(subnets, 3000):  # some of them were never inserted
        model.pop(subnet, None)
        fastpath.del_route(dotted(subnet))
    assert_table_matches(fastpath, model, subnets)


def home_slot(key: int, capacity: int) -> int:
    """The C table's hash (Fibonacci hashing), replicated to build colliding keys."""
    return ((key * 2654435769) & 0xFFFFFFFF) >> (32 - capacity.bit_length() + 1)


def keys_with_home(slot: int, count: int, capacity: int = 16) -> list[int]:
    found = []
    key = ip("10.0.0.1")
    while len(found) < count:
        if home_slot(key, capacity) == slot:
            found.append(key)
        key += 1
    return found


# Clusters at the end of a 16-slot table so that probing and backward shifts wrap around.
COLLIDING = (
    keys_with_home(14, 2) + keys_with_home(15, 3) + keys_with_home(0, 2) + keys_with_home(1, 1)
)


def test_colliding_keys_really_collide_in_the_c_table():
    fastpath = make_fastpath({}, 32, 0)
    for key in keys_with_home(15, 4):
        fastpath.set_route(dotted(key), "1.1.1.1")
    # Same home slot: the 4th key probes 4 slots, wrapping past the end of the table.
    assert fastpath._table_info() == {"capacity": 16, "count": 4, "max_probe": 4}


def test_deleting_the_head_of_a_wrapped_cluster_shifts_the_rest_back():
    a, b, c = keys_with_home(15, 3)
    (d,) = keys_with_home(0, 1)
    model = {a: 1, b: 2, c: 3, d: 4}  # slots 15, 0, 1, 2
    fastpath = make_fastpath(model, 32, 0)
    fastpath.del_route(dotted(a))
    del model[a]
    assert_table_matches(fastpath, model, [a, b, c, d])
    # b -> 15, c -> 0, d -> 1: each one slot closer to home, nothing left in slot 2.
    assert fastpath._table_info()["max_probe"] == 2


operations = st.lists(
    st.tuples(st.booleans(), st.sampled_from(COLLIDING), st.integers(1, 3)), max_size=40
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_random_inserts_and_deletes_of_colliding_keys_agree_with_a_dict(ops):
    fastpath = make_fastpath({}, 32, 0)
    model: dict[int, int] = {}
    for insert, key, peer in ops:
        if insert:
            model[key] = peer
            fastpath.set_route(dotted(key), dotted(peer))
        else:
            model.pop(key, None)
            fastpath.del_route(dotted(key))
        assert_table_matches(fastpath, model, COLLIDING)


def test_route_to_subnet_zero_is_found_and_deleted():
    fastpath = make_fastpath({0: 9}, 8, 0)
    assert lookup(fastpath, ip("0.1.2.3")) == "0.0.0.9"
    fastpath.del_route("0.0.0.0")
    assert fastpath.routes() == []
    assert lookup(fastpath, ip("0.1.2.3")) is None


def test_replacing_a_peer_moves_traffic_and_restarts_its_counters():
    fastpath = make_fastpath({ip("10.5.2.0"): ip("192.168.0.2")}, 24, 0)
    fastpath.set_route("10.5.2.0", "192.168.0.3")
    assert lookup(fastpath, ip("10.5.2.1")) == "192.168.0.3"
    assert fastpath.routes() == [
        (
            "10.5.2.0",
            "192.168.0.3",
            None,
            {"tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0},
        ),
    ]


def test_deleting_an_absent_route_is_a_no_op():
    fastpath = make_fastpath({ip("10.5.2.0"): 1}, 24, 0)
    fastpath.del_route("10.5.3.0")
    assert [r[0] for r in fastpath.routes()] == ["10.5.2.0"]


@pytest.mark.parametrize("subnet", ["10.5.2.1", "10.5.2", "10.5.2.0/24", "300.1.1.0", ""])
def test_set_route_rejects_what_is_not_a_network_address(subnet):
    fastpath = make_fastpath({}, 24, 0)
    with pytest.raises(ValueError):
        fastpath.set_route(subnet, "192.168.0.1")
    assert fastpath.routes() == []


@pytest.mark.parametrize(
    "args",
    [
        (-1, -1, 0, "10.0.0.0", 24),
        (-1, -1, 70000, "10.0.0.0", 24),
        (-1, -1, 1, "10.0.0.0", 33),
        (-1, -1, 1, "nope", 24),
    ],
)
def test_constructor_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        FastPath(*args)


@pytest.mark.parametrize("mtu", [-1, 65537])
def test_constructor_rejects_an_mtu_out_of_range(mtu):
    with pytest.raises(ValueError, match="mtu"):
        FastPath(-1, -1, 1, "10.0.0.0", 24, mtu=mtu)


def test_start_without_fds_fails_and_stop_is_idempotent():
    fastpath = make_fastpath({}, 24, 0)
    with pytest.raises(ValueError):
        fastpath.start()
    fastpath.stop()
    fastpath.stop()
    assert not fastpath.running


# --- real fds: TUN in a throwaway network namespace, UDP on its loopback --------------------------

TUN_NAME = "fptun0"
NETWORK = "10.5.0.0/16"
TUN_ADDR = "10.5.1.0"
REMOTE_SUBNET = "10.5.2.0"
REMOTE_POD = "10.5.2.7"


@dataclass
class TunRig:
    netns: str
    tun: object  # pytun.TunTapDevice
    fastpath_sock: socket.socket  # the fast path's own UDP socket
    peer_sock: socket.socket  # stands in for the remote node
    app_sock: socket.socket  # an application in the namespace, talking through the TUN
    sender_socks: list[socket.socket]  # VXLAN egress: a pool to send from, one port per socket
    vnet_hdr: bool  # the TUN has IFF_VNET_HDR and offloads


def ip_cmd(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def tun_rig(request) -> Iterator[TunRig]:
    """The rig; parametrized indirectly with True, its TUN has IFF_VNET_HDR and offloads."""
    vnet_hdr = getattr(request, "param", False)
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None:
        pytest.skip("needs root, /dev/net/tun and ip")
    pytun = pytest.importorskip("pytun")
    from pyroute2 import netns

    # "fu<pid>-" is the project's pattern for namespaces whose dead creator's leftovers the
    # session fixture of conftest.py sweeps away.
    name = f"fu{os.getpid()}-fastpath-{secrets.token_hex(3)}"
    ip_cmd("netns", "add", name)
    opened: list = []
    try:
        ip_cmd("-n", name, "link", "set", "lo", "up")
        netns.pushns(name)
        try:  # everything made here belongs to the namespace for good
            tun = pytun.TunTapDevice(name=TUN_NAME, flags=pytun.IFF_TUN | pytun.IFF_NO_PI
                                     | (pytun.IFF_VNET_HDR if vnet_hdr else 0))
            opened.append(tun)
            if vnet_hdr:
                enable_tun_offloads(tun)
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(7)]
            opened.extend(socks)
        finally:
            netns.popns()
        fastpath_sock, peer_sock, app_sock, *sender_socks = socks
        for sock in sender_socks:
            sock.bind(("127.0.0.1", 0))
        fastpath_sock.bind(("127.0.0.1", 0))
        peer_sock.bind(("127.0.0.1", 0))
        app_sock.bind(("0.0.0.0", 0))
        for sock in (peer_sock, app_sock):
            sock.settimeout(3)
        os.set_blocking(tun.fileno(), False)
        ip_cmd("-n", name, "addr", "add", f"{TUN_ADDR}/32", "dev", TUN_NAME)
        ip_cmd("-n", name, "link", "set", TUN_NAME, "up", "mtu", "1472")
        ip_cmd("-n", name, "route", "add", NETWORK, "dev", TUN_NAME)
        yield TunRig(name, tun, fastpath_sock, peer_sock, app_sock, sender_socks, vnet_hdr)
    finally:
        for thing in opened:
            thing.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.netns
def test_threads_forward_between_a_real_tun_and_real_udp_sockets(tun_rig):
    rig = tun_rig
    peer_port = rig.peer_sock.getsockname()[1]
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24)
    fastpath.start()
    try:
        fastpath.start()  # idempotent
        # Routes are live: added after the threads started.
        fastpath.set_route(REMOTE_SUBNET, "127.0.0.1")

        # Egress: an app datagram to a remote pod leaves the TUN as a bare IPv4 packet in a UDP
        # datagram to the peer's port, TTL decremented.
        rig.app_sock.sendto(b"egress-payload", (REMOTE_POD, 4242))
        datagram, source = rig.peer_sock.recvfrom(65536)
        assert source == rig.fastpath_sock.getsockname()
        assert datagram[0] == 0x45
        assert datagram[8] == 63  # the kernel sent TTL 64
        assert checksum(datagram[:20]) == 0
        assert datagram[12:16] == socket.inet_aton(TUN_ADDR)
        assert datagram[16:20] == socket.inet_aton(REMOTE_POD)
        assert datagram[28:] == b"egress-payload"

        # Ingress: a datagram from the peer is written into the TUN and delivered to the app.
        app_port = rig.app_sock.getsockname()[1]
        payload = b"ingress-payload"
        udp = struct.pack("!HHHH", 4242, app_port, 8 + len(payload), 0) + payload  # no UDP csum
        inner = make_packet(ip(REMOTE_POD), ip(TUN_ADDR), ttl=5, payload=udp)
        rig.peer_sock.sendto(inner, rig.fastpath_sock.getsockname())
        data, source = rig.app_sock.recvfrom(65536)
        assert (data, source) == (payload, (REMOTE_POD, 4242))

        # Garbage and expired packets from the peer are counted, not written.
        rig.peer_sock.sendto(b"\x45short", rig.fastpath_sock.getsockname())
        rig.peer_sock.sendto(
            make_packet(ip(REMOTE_POD), ip(TUN_ADDR), ttl=1, payload=udp),
            rig.fastpath_sock.getsockname(),
        )

        def settled() -> bool:
            drops = fastpath.counters()["drops"]
            # tx counters are bumped after sendmmsg returns, maybe after the peer has the packet.
            # rx likewise after the TUN write, maybe after the app has read the packet.
            counters = fastpath.counters()
            done = counters["tx_packets"] == 1 and counters["rx_packets"] == 1
            return done and drops["short"] == 1 and drops["ttl_expired"] == 1

        assert wait_for(settled)
        counters = fastpath.counters()
        assert counters["tx_packets"] == 1
        assert counters["tx_bytes"] == len(datagram)
        assert counters["rx_packets"] == 1
        assert counters["rx_bytes"] == len(inner)
        ((subnet, peer, _, stats),) = fastpath.routes()
        assert (subnet, peer) == (REMOTE_SUBNET, "127.0.0.1")
        # rx is charged to the lease of the inner source address.
        assert stats == {
            "tx_packets": 1,
            "tx_bytes": len(datagram),
            "rx_packets": 1,
            "rx_bytes": len(inner),
        }
        fastpath.stop()
        assert not fastpath.running
        # Restartable: the stop signal is re-armed.
        fastpath.start()
        rig.app_sock.sendto(b"after restart", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"after restart"
    finally:
        fastpath.stop()
        fastpath.stop()
    assert not fastpath.running


@pytest.mark.netns
def test_packet_too_big_for_a_udp_datagram_is_counted_and_later_packets_still_go_out(tun_rig):
    rig = tun_rig
    ip_cmd("-n", rig.netns, "link", "set", TUN_NAME, "mtu", "65535")
    peer_port = rig.peer_sock.getsockname()[1]
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24)
    fastpath.set_route(REMOTE_SUBNET, "127.0.0.1")
    fastpath.start()
    try:
        # 65,528 bytes of IPv4 fit the TUN but not a UDP payload (65,507 at most): EMSGSIZE.
        rig.app_sock.sendto(b"x" * 65500, (REMOTE_POD, 4242))
        rig.app_sock.sendto(b"small", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"small"
        # Counters are bumped after sendmmsg returns, possibly after the peer has the packet.
        assert wait_for(lambda: fastpath.counters()["tx_packets"] == 1)
        assert fastpath.counters()["drops"]["too_big"] == 1
    finally:
        fastpath.stop()


@pytest.mark.netns
def test_a_busy_polling_thread_forwards_both_ways_and_stops_when_asked(tun_rig):
    rig = tun_rig
    peer_port = rig.peer_sock.getsockname()[1]
    # A second of polling after each packet: every exchange below is carried by a polling
    # thread, the other one parked, with the turns of the two halves interleaved.
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24,
                        busy_poll_us=1_000_000)
    fastpath.set_route(REMOTE_SUBNET, "127.0.0.1")
    app_port = rig.app_sock.getsockname()[1]
    rounds = 200
    fastpath.start()
    try:
        for i in range(rounds):
            out = b"out %d" % i
            rig.app_sock.sendto(out, (REMOTE_POD, 4242))
            assert rig.peer_sock.recv(65536)[28:] == out
            back = b"back %d" % i
            udp = struct.pack("!HHHH", 4242, app_port, 8 + len(back), 0) + back
            rig.peer_sock.sendto(make_packet(ip(REMOTE_POD), ip(TUN_ADDR), payload=udp),
                                 rig.fastpath_sock.getsockname())
            assert rig.app_sock.recvfrom(65536) == (back, (REMOTE_POD, 4242))

        def settled() -> bool:
            counters = fastpath.counters()
            return counters["tx_packets"] == counters["rx_packets"] == rounds
        assert wait_for(settled)
        counters = fastpath.counters()
        # The kernel's own IPv6 chatter on a new TUN (not_ipv4) is all that may be dropped.
        assert not any(v for k, v in counters["drops"].items() if k != "not_ipv4")
        # Most exchanges came while a thread was polling (the first one woke a sleeper), in
        # each direction: the poller took packets from the TUN and datagrams from the socket.
        polled = (counters["busy_poll_egress_batches"], counters["busy_poll_ingress_batches"])
        assert min(polled) >= rounds // 2, f"(egress, ingress) batches polled: {polled}"
        assert counters["busy_poll_batches"] == sum(polled)
        # Stop while the poller is a second from its deadline: the stop signal ends it.
        rig.app_sock.sendto(b"last", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"last"
        stopping = time.monotonic()
    finally:
        fastpath.stop()
    took = time.monotonic() - stopping
    assert took < 0.5, f"stop() took {took:.3f} s with a 1 s busy-poll window"
    assert not fastpath.running
    # Off (the default), nothing is forwarded by polling.
    plain = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24)
    plain.set_route(REMOTE_SUBNET, "127.0.0.1")
    plain.start()
    try:
        rig.app_sock.sendto(b"plain", (REMOTE_POD, 4242))
        assert rig.peer_sock.recv(65536)[28:] == b"plain"
        assert wait_for(lambda: plain.counters()["tx_packets"] == 1)
        assert plain.counters()["busy_poll_batches"] == 0
    finally:
        plain.stop()


@pytest.mark.parametrize("busy_poll_us", [-1, 1_000_001])
def test_constructor_rejects_a_busy_poll_out_of_range(busy_poll_us):
    with pytest.raises(ValueError, match="busy_poll_us"):
        FastPath(-1, -1, 8472, "10.0.0.0", 24, busy_poll_us=busy_poll_us)


@pytest.mark.netns
def test_dropping_a_running_fastpath_stops_its_threads(tun_rig):
    rig = tun_rig
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), 1, TUN_ADDR, 24)
    fastpath.start()
    assert fastpath.running
    del fastpath  # __dealloc__ joins the threads; a leftover thread would read the TUN
    # No thread of it is left: none in this process reads the TUN any more.
    names = {Path(f"/proc/self/task/{t}/comm").read_text().strip()
             for t in os.listdir("/proc/self/task")}
    assert not names & {"flannel-egress", "flannel-ingress"}, names
    rig.app_sock.sendto(b"to the kernel side", (REMOTE_POD, 4242))
    assert wait_for(lambda: b"to the kernel side" in read_tun(rig.tun))


def read_tun(tun) -> bytes:
    """One packet from the nonblocking TUN, or b"" if there is none."""
    try:
        return os.read(tun.fileno(), 65536)
    except BlockingIOError:
        return b""


@pytest.mark.netns
def test_unrouted_destination_gets_icmp_net_unreachable_through_the_real_tun(tun_rig):
    rig = tun_rig
    # The reply's source is the TUN's own address: the kernel takes it as martian unless
    # accept_local is on for the TUN.
    subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            rig.netns,
            "sysctl",
            "-qw",
            f"net.ipv4.conf.{TUN_NAME}.accept_local=1",
        ],
        check=True,
        timeout=10,
    )
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), 1, TUN_ADDR, 24)
    fastpath.start()
    try:
        rig.app_sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        rig.app_sock.connect(("10.5.9.9", 4242))
        rig.app_sock.send(b"nobody home")
        poller = select.poll()
        poller.register(rig.app_sock, select.POLLERR)
        assert poller.poll(3000), "no ICMP error reached the socket"
        _, ancillary, _, _ = rig.app_sock.recvmsg(1024, 1024, socket.MSG_ERRQUEUE)
        ((level, kind, ee),) = ancillary
        assert (level, kind) == (socket.IPPROTO_IP, IP_RECVERR)
        ee_errno, ee_origin, ee_type, ee_code = struct.unpack_from("=IBBB", ee)
        # SO_EE_ORIGIN_ICMP, destination unreachable / net unreachable
        assert (ee_errno, ee_origin, ee_type, ee_code) == (errno.ENETUNREACH, 2, 3, 0)
        assert wait_for(lambda: fastpath.counters()["icmp_sent"] == 1)
        assert fastpath.counters()["drops"]["no_route"] == 1
    finally:
        fastpath.stop()


OUR_MAC = bytes.fromhex("0e0000000001")
PEER_MAC = bytes.fromhex("c6d2326f8f44")


@pytest.mark.netns
def test_vxlan_threads_spread_flows_over_the_sender_ports_and_deliver_frames(tun_rig):
    rig = tun_rig
    peer_port = rig.peer_sock.getsockname()[1]
    sender_ports = [sock.getsockname()[1] for sock in rig.sender_socks]
    vtep = Vtep(vni=42, mac=OUR_MAC, senders=len(rig.sender_socks))
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), peer_port, TUN_ADDR, 24,
                        mode="vxlan", vni=vtep.vni, vtep_mac=vtep.mac,
                        send_fds=[sock.fileno() for sock in rig.sender_socks])
    fastpath.set_route(REMOTE_SUBNET, "127.0.0.1", PEER_MAC)
    fastpath.start()
    try:
        # Egress: 24 flows (destination ports), 2 datagrams each; each frame is the reference's
        # encapsulation of what the TUN read, and leaves from the socket its flow hashes to.
        seen: dict[int, set[int]] = {}
        for _ in range(2):
            for flow in range(24):
                rig.app_sock.sendto(b"flow", (REMOTE_POD, 5000 + flow))
        for _ in range(48):
            frame, (_, src_port) = rig.peer_sock.recvfrom(65536)
            inner = frame[22:]
            assert frame[:22] == packet.vxlan_encap(b"", 42, PEER_MAC, OUR_MAC)
            assert inner[8] == 64  # no TTL decrement in VXLAN mode
            assert inner[28:] == b"flow"
            expected = sender_ports[packet.sender_index(packet.flow_hash(inner), 4)]
            assert src_port == expected
            seen.setdefault(int.from_bytes(inner[22:24], "big"), set()).add(src_port)
        assert all(len(ports) == 1 for ports in seen.values()), "a flow changed its port"
        assert len({port for ports in seen.values() for port in ports}) >= 2, "no spreading"

        # Ingress: a frame for us reaches the app with the TTL it had; one for another MAC is
        # counted and dropped.
        app_port = rig.app_sock.getsockname()[1]
        udp = struct.pack("!HHHH", 4242, app_port, 8 + 7, 0) + b"ingress"
        inner = make_packet(ip(REMOTE_POD), ip(TUN_ADDR), ttl=1, payload=udp)
        frame = packet.vxlan_encap(inner, 42, OUR_MAC, PEER_MAC)
        rig.peer_sock.sendto(packet.vxlan_encap(inner, 42, PEER_MAC, OUR_MAC),
                             rig.fastpath_sock.getsockname())
        rig.peer_sock.sendto(frame, rig.fastpath_sock.getsockname())
        assert rig.app_sock.recvfrom(65536) == (b"ingress", (REMOTE_POD, 4242))
        assert wait_for(lambda: fastpath.counters()["drops"]["vxlan_wrong_mac"] == 1)
        assert wait_for(lambda: fastpath.counters()["tx_packets"] == 48)
        # The ingress thread counts after its write returns: the app may see the packet first.
        assert wait_for(lambda: fastpath.counters()["rx_packets"] == 1)
        counters = fastpath.counters()
        assert counters["rx_packets"] == 1 and counters["rx_bytes"] == len(inner)
        ((_, _, mac, stats),) = fastpath.routes()
        assert mac == PEER_MAC
        assert stats["tx_packets"] == 48 and stats["rx_packets"] == 1
    finally:
        fastpath.stop()


@pytest.mark.netns
@pytest.mark.parametrize("tun_rig", [False, True], indirect=True, ids=["plain-tun", "vnet-tun"])
def test_a_partial_inner_checksum_reaches_the_app_and_a_wrong_one_does_not(tun_rig):
    rig = tun_rig
    fastpath = FastPath(rig.tun.fileno(), rig.fastpath_sock.fileno(), 1, TUN_ADDR, 24,
                        mode="vxlan", vni=42, vtep_mac=OUR_MAC, vnet_hdr=rig.vnet_hdr, mtu=1472)
    fastpath.start()
    try:
        app_port = rig.app_sock.getsockname()[1]

        def datagram(payload: bytes, kind: str) -> bytes:
            udp = struct.pack("!HHHH", 4242, app_port, 8 + len(payload), 0) + payload
            inner = l4_with_checksum(ip_header(20 + len(udp), 17, ip(REMOTE_POD), ip(TUN_ADDR)),
                                     udp, 6)
            if kind == "partial":
                inner = as_partial(inner)
            elif kind == "wrong":
                inner = inner[:26] + bytes([inner[26] ^ 0x10]) + inner[27:]
            elif kind == "none":
                inner = inner[:26] + b"\0\0" + inner[28:]
            return packet.vxlan_encap(inner, 42, OUR_MAC, PEER_MAC)

        for kind in ("wrong", "partial", "none", "right"):
            rig.peer_sock.sendto(datagram(kind.encode(), kind), rig.fastpath_sock.getsockname())
        got = [rig.app_sock.recvfrom(65536)[0] for _ in range(3)]
        assert got == [b"partial", b"none", b"right"]  # the wrong one went first: dropped
        assert wait_for(lambda: fastpath.counters()["rx_packets"] == 4)
        assert fastpath.counters()["csum_completed"] == 1
    finally:
        fastpath.stop()

