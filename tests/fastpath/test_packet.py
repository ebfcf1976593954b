"""Unit tests of flannel_udp.packet, the reference of the per-packet logic, on crafted packets."""

from __future__ import annotations

import struct

import pytest
from helpers import ip

from flannel_udp.packet import (
    DROP_NAMES,
    GSO_NONE,
    GSO_TCPV4,
    GSO_UDP_L4,
    VNET_F_NEEDS_CSUM,
    VNET_HDR,
    ZERO_VNET_HDR,
    Action,
    Drop,
    Result,
    Vtep,
    VxlanRoute,
    checksum,
    egress,
    flow_hash,
    ingress,
    prefix_mask,
    segment_tso,
    sender_index,
    tun_writes,
    vxlan_egress,
    vxlan_ingress,
)

TUN_ADDR = ip("10.5.1.0")
POD = ip("10.5.1.7")
REMOTE_POD = ip("10.5.2.9")
PEER = ip("192.168.64.3")
ROUTES = {ip("10.5.2.0"): PEER}


def make_packet(
    src: int = POD,
    dst: int = REMOTE_POD,
    ttl: int = 64,
    proto: int = 17,
    payload: bytes = b"0123456789abcdef",
    options: bytes = b"",
    frag: int = 0,
    ident: int = 0x1234,
) -> bytes:
    """An IPv4 packet with a correct header checksum (options must be a multiple of 4 bytes)."""
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    header = bytearray(
        bytes([0x40 | ihl, 0])
        + total.to_bytes(2, "big")
        + ident.to_bytes(2, "big")
        + frag.to_bytes(2, "big")
        + bytes([ttl, proto])
        + b"\x00\x00"
        + src.to_bytes(4, "big")
        + dst.to_bytes(4, "big")
        + options
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def header_ok(packet: bytes) -> bool:
    """A header whose checksum verifies sums (checksum field included) to zero."""
    return checksum(packet[: (packet[0] & 0x0F) * 4]) == 0


# --- TTL and checksum ---------------------------------------------------------------------------


def test_egress_to_routed_subnet_sends_to_peer_with_ttl_decremented_and_valid_checksum():
    packet = make_packet(ttl=64)
    result = egress(packet, ROUTES, 24, TUN_ADDR)
    assert result.action == Action.SEND
    assert result.peer == PEER
    assert result.drop is None
    assert result.data[8] == 63
    assert header_ok(result.data)
    # Nothing but TTL and checksum changed.
    changed = [i for i, (a, b) in enumerate(zip(packet, result.data, strict=True)) if a != b]
    assert set(changed) <= {8, 10, 11}


def test_incremental_checksum_equals_full_recompute_for_every_ttl_and_protocol():
    for ttl in range(2, 256):
        for proto in (0, 1, 6, 17, 255):
            packet = make_packet(ttl=ttl, proto=proto, options=b"\x01\x01\x01\x00", ident=ttl * 257)
            out = egress(packet, ROUTES, 24, TUN_ADDR).data
            recomputed = bytearray(out[:24])
            recomputed[10:12] = b"\x00\x00"
            assert out[10:12] == checksum(bytes(recomputed)).to_bytes(2, "big"), (ttl, proto)


def test_incremental_checksum_keeps_a_bad_checksum_bad():
    packet = bytearray(make_packet())
    packet[10] ^= 0x5A
    out = egress(bytes(packet), ROUTES, 24, TUN_ADDR).data
    assert out[8] == 63
    assert not header_ok(out)


def test_ingress_delivers_to_tun_with_ttl_decremented_and_valid_checksum():
    packet = make_packet(src=REMOTE_POD, dst=POD, ttl=2)
    result = ingress(packet)
    assert result == Result(Action.TUN, result.data)
    assert result.data[8] == 1
    assert header_ok(result.data)
    assert result.data[12:] == packet[12:]


@pytest.mark.parametrize("ttl", [0, 1])
def test_egress_drops_expired_ttl_before_looking_at_routes(ttl):
    # Unrouted destination: TTL must win over NO_ROUTE (and produce no ICMP reply).
    packet = make_packet(dst=ip("10.5.99.1"), ttl=ttl)
    assert egress(packet, ROUTES, 24, TUN_ADDR) == Result(Action.DROP, drop=Drop.TTL_EXPIRED)


@pytest.mark.parametrize("ttl", [0, 1])
def test_ingress_drops_expired_ttl(ttl):
    assert ingress(make_packet(ttl=ttl)) == Result(Action.DROP, drop=Drop.TTL_EXPIRED)


def test_trailing_bytes_beyond_total_length_are_cut_off():
    packet = make_packet(payload=b"abcd")
    assert (
        egress(packet + b"TRAILER", ROUTES, 24, TUN_ADDR).data
        == egress(packet, ROUTES, 24, TUN_ADDR).data
    )
    assert len(ingress(packet + b"XYZ").data) == len(packet)


# --- routing ------------------------------------------------------------------------------------


def test_route_key_is_destination_masked_by_lease_prefix_length():
    routes = {ip("10.5.0.0"): 1, ip("10.5.4.0"): 2, ip("10.5.2.0"): 3}
    assert egress(make_packet(dst=ip("10.5.5.200")), routes, 22, TUN_ADDR).peer == 2
    assert egress(make_packet(dst=ip("10.5.5.200")), routes, 16, TUN_ADDR).peer == 1
    assert egress(make_packet(dst=ip("10.5.2.255")), routes, 24, TUN_ADDR).peer == 3
    assert egress(make_packet(dst=ip("10.5.3.1")), routes, 24, TUN_ADDR).action == Action.REPLY


def test_prefix_length_zero_maps_everything_to_the_zero_key():
    assert egress(make_packet(dst=ip("200.1.2.3")), {0: PEER}, 0, TUN_ADDR).peer == PEER


@pytest.mark.parametrize(
    ("length", "mask"), [(0, 0), (1, 0x80000000), (24, 0xFFFFFF00), (32, 0xFFFFFFFF)]
)
def test_prefix_mask(length, mask):
    assert prefix_mask(length) == mask


def test_prefix_mask_rejects_out_of_range_lengths():
    with pytest.raises(ValueError):
        prefix_mask(33)


# --- ICMP net unreachable -----------------------------------------------------------------------


def parse_reply(reply: bytes) -> dict:
    return {
        "ihl": reply[0],
        "total_len": int.from_bytes(reply[2:4], "big"),
        "id_frag": reply[4:8],
        "ttl": reply[8],
        "proto": reply[9],
        "src": int.from_bytes(reply[12:16], "big"),
        "dst": int.from_bytes(reply[16:20], "big"),
        "type": reply[20],
        "code": reply[21],
        "unused": reply[24:28],
        "quote": reply[28:],
    }


def test_unrouted_packet_gets_icmp_net_unreachable_from_tun_address():
    packet = make_packet(dst=ip("10.5.77.1"), ttl=64, payload=b"ABCDEFGHIJKLMNOP")
    result = egress(packet, ROUTES, 24, TUN_ADDR)
    assert result.action == Action.REPLY
    assert result.drop == Drop.NO_ROUTE
    reply = parse_reply(result.data)
    assert reply == {
        "ihl": 0x45,
        "total_len": len(result.data),
        "id_frag": b"\x00\x00\x00\x00",
        "ttl": 64,
        "proto": 1,
        "src": TUN_ADDR,
        "dst": POD,
        "type": 3,
        "code": 0,
        "unused": b"\x00\x00\x00\x00",
        # The header as received (TTL 64, not 63) and the first 8 payload bytes.
        "quote": packet[:20] + b"ABCDEFGH",
    }
    assert len(result.data) == 20 + 8 + 28
    assert checksum(result.data[:20]) == 0
    assert checksum(result.data[20:]) == 0


def test_icmp_quote_includes_ip_options():
    options = b"\x94\x04\x00\x00"  # router alert
    packet = make_packet(dst=ip("10.5.77.1"), options=options, payload=b"12345678XYZ")
    result = egress(packet, ROUTES, 24, TUN_ADDR)
    assert result.data[28:] == packet[:24] + b"12345678"
    assert checksum(result.data[20:]) == 0


@pytest.mark.parametrize("payload_len", [0, 3, 7])
def test_icmp_quote_is_shorter_when_the_payload_is_shorter_than_8_bytes(payload_len):
    payload = bytes(range(100, 100 + payload_len))
    packet = make_packet(dst=ip("10.5.77.1"), payload=payload)
    result = egress(packet + b"junk after total length", ROUTES, 24, TUN_ADDR)
    assert result.data[28:] == packet
    assert int.from_bytes(result.data[2:4], "big") == 48 + payload_len
    # Odd ICMP lengths need the zero pad byte in the checksum.
    assert checksum(result.data[20:]) == 0
    assert checksum(result.data[:20]) == 0


def test_unrouted_icmp_is_dropped_without_a_reply():
    packet = make_packet(dst=ip("10.5.77.1"), proto=1)
    assert egress(packet, ROUTES, 24, TUN_ADDR) == Result(Action.DROP, drop=Drop.NO_ROUTE)


def test_unrouted_non_first_fragment_is_dropped_without_a_reply():
    packet = make_packet(dst=ip("10.5.77.1"), frag=0x2000 | 185)  # MF, offset 185*8
    assert egress(packet, ROUTES, 24, TUN_ADDR) == Result(Action.DROP, drop=Drop.NO_ROUTE)


def test_unrouted_first_fragment_gets_a_reply():
    packet = make_packet(dst=ip("10.5.77.1"), frag=0x2000)  # MF set, offset 0
    assert egress(packet, ROUTES, 24, TUN_ADDR).action == Action.REPLY


def test_routed_icmp_and_fragments_are_forwarded():
    for packet in (make_packet(proto=1), make_packet(frag=0x4000 | 3)):
        assert egress(packet, ROUTES, 24, TUN_ADDR).action == Action.SEND


# --- malformed packets --------------------------------------------------------------------------

GOOD = make_packet()


def with_bytes(packet: bytes, **fields: int) -> bytes:
    """``packet`` with byte offsets (key ``b<offset>``) overwritten."""
    out = bytearray(packet)
    for key, value in fields.items():
        out[int(key[1:])] = value
    return bytes(out)


MALFORMED = {
    "empty": (b"", Drop.SHORT),
    "19 bytes": (GOOD[:19], Drop.SHORT),
    "ipv6 version": (with_bytes(GOOD, b0=0x65), Drop.NOT_IPV4),
    "version 4 checked before length fields": (with_bytes(GOOD, b0=0x60, b2=0), Drop.NOT_IPV4),
    "ihl 4": (with_bytes(GOOD, b0=0x44), Drop.BAD_HEADER_LEN),
    "ihl 0": (with_bytes(GOOD, b0=0x40), Drop.BAD_HEADER_LEN),
    "ihl beyond data": (with_bytes(GOOD[:40], b0=0x4F), Drop.BAD_HEADER_LEN),
    "total below header": (with_bytes(GOOD, b2=0, b3=19), Drop.BAD_TOTAL_LEN),
    "total below options": (with_bytes(GOOD, b0=0x46, b2=0, b3=20), Drop.BAD_TOTAL_LEN),
    "total beyond data": (with_bytes(GOOD, b2=0, b3=len(GOOD) + 1), Drop.BAD_TOTAL_LEN),
    "bad length and ttl 0": (with_bytes(GOOD, b3=200, b8=0), Drop.BAD_TOTAL_LEN),
}


@pytest.mark.parametrize(("packet", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_packets_are_dropped_with_their_reason(packet, reason):
    assert egress(packet, ROUTES, 24, TUN_ADDR) == Result(Action.DROP, drop=reason)
    assert ingress(packet) == Result(Action.DROP, drop=reason)


def test_header_exactly_filling_the_data_is_accepted():
    packet = with_bytes(GOOD[:20], b2=0, b3=20)
    assert ingress(packet).action == Action.TUN


def test_drop_numbering_and_names_are_stable():
    assert {int(d): name for d, name in DROP_NAMES.items()} == {
        1: "short",
        2: "not_ipv4",
        3: "bad_header_len",
        4: "bad_total_len",
        5: "ttl_expired",
        6: "no_route",
        7: "too_big",
        8: "send_error",
        9: "tun_write_error",
        10: "vxlan_short",
        11: "vxlan_bad_flags",
        12: "vxlan_wrong_vni",
        13: "vxlan_wrong_mac",
        14: "vxlan_not_ipv4",
        15: "bad_gso",
        16: "unknown_sender",
        17: "spoofed_inner_source",
    }
    assert [int(a) for a in (Action.SEND, Action.TUN, Action.REPLY, Action.DROP)] == [0, 1, 2, 3]


# --- VXLAN mode ---------------------------------------------------------------------------------

OUR_MAC = bytes.fromhex("0e0000000001")
PEER_MAC = bytes.fromhex("c6d2326f8f44")
VTEP = Vtep(vni=0x123456, mac=OUR_MAC, senders=8)
VXLAN_ROUTES = {ip("10.5.2.0"): VxlanRoute(PEER, PEER_MAC)}


def vxlan_frame(packet: bytes, vni: int = VTEP.vni, dst_mac: bytes = OUR_MAC,
                flags: int = 0x08, ethertype: int = 0x0800) -> bytes:
    """A frame as a kernel VXLAN peer sends it to us."""
    return (bytes([flags, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\x00" + dst_mac + PEER_MAC
            + ethertype.to_bytes(2, "big") + packet)


def test_vxlan_egress_is_rfc_7348_header_inner_ethernet_and_the_untouched_packet():
    packet = make_packet(ttl=64)
    result = vxlan_egress(packet, VXLAN_ROUTES, 24, TUN_ADDR, VTEP)
    assert result.action == Action.SEND
    assert result.peer == PEER
    assert result.data == (bytes.fromhex("08000000" "12345600") + PEER_MAC + OUR_MAC
                           + b"\x08\x00" + packet)
    assert result.sender == sender_index(flow_hash(packet), 8)


@pytest.mark.parametrize("ttl", [0, 1])
def test_vxlan_forwards_any_ttl_unchanged_as_kernel_vxlan_does(ttl):
    packet = make_packet(ttl=ttl)
    assert vxlan_egress(packet, VXLAN_ROUTES, 24, TUN_ADDR, VTEP).data[22:] == packet
    assert vxlan_ingress(vxlan_frame(packet), VTEP) == Result(Action.TUN, packet)


def test_vxlan_unrouted_packet_gets_the_same_icmp_net_unreachable_as_udp_mode():
    packet = make_packet(dst=ip("10.5.77.1"))
    assert vxlan_egress(packet, VXLAN_ROUTES, 24, TUN_ADDR, VTEP) == egress(
        packet, ROUTES, 24, TUN_ADDR)


def test_vxlan_ingress_delivers_the_inner_packet_without_its_trailer():
    packet = make_packet(src=REMOTE_POD, dst=POD)
    assert vxlan_ingress(vxlan_frame(packet + b"\x00" * 6), VTEP) == Result(Action.TUN, packet)


def test_vxlan_ingress_ignores_the_reserved_flag_bits():
    # RFC 7348: reserved bits are "ignored on receipt"; only the I flag counts.
    packet = make_packet()
    assert vxlan_ingress(vxlan_frame(packet, flags=0xFF), VTEP).action == Action.TUN


VXLAN_MALFORMED = {
    "empty": (b"", Drop.VXLAN_SHORT),
    "vxlan header only": (vxlan_frame(b"")[:8], Drop.VXLAN_SHORT),
    "21 bytes": (vxlan_frame(b"")[:21], Drop.VXLAN_SHORT),
    "no I flag": (vxlan_frame(GOOD, flags=0x00), Drop.VXLAN_BAD_FLAGS),
    "only reserved flags": (vxlan_frame(GOOD, flags=0xF7), Drop.VXLAN_BAD_FLAGS),
    "other VNI": (vxlan_frame(GOOD, vni=0x123457), Drop.VXLAN_WRONG_VNI),
    "VNI 0": (vxlan_frame(GOOD, vni=0), Drop.VXLAN_WRONG_VNI),
    "broadcast MAC": (vxlan_frame(GOOD, dst_mac=b"\xff" * 6), Drop.VXLAN_WRONG_MAC),
    "the peer's MAC": (vxlan_frame(GOOD, dst_mac=PEER_MAC), Drop.VXLAN_WRONG_MAC),
    "ARP": (vxlan_frame(GOOD, ethertype=0x0806), Drop.VXLAN_NOT_IPV4),
    "IPv6": (vxlan_frame(GOOD, ethertype=0x86DD), Drop.VXLAN_NOT_IPV4),
    "VLAN tag": (vxlan_frame(GOOD, ethertype=0x8100), Drop.VXLAN_NOT_IPV4),
    "headers but no packet": (vxlan_frame(b""), Drop.SHORT),
    "inner version 6": (vxlan_frame(with_bytes(GOOD, b0=0x65)), Drop.NOT_IPV4),
    "inner total beyond data": (vxlan_frame(with_bytes(GOOD, b3=200)), Drop.BAD_TOTAL_LEN),
}


@pytest.mark.parametrize(("frame", "reason"), VXLAN_MALFORMED.values(),
                         ids=VXLAN_MALFORMED.keys())
def test_rejected_vxlan_frames_are_dropped_with_their_reason(frame, reason):
    assert vxlan_ingress(frame, VTEP) == Result(Action.DROP, drop=reason)


def tcp(sport: int, dport: int, frag: int = 0, proto: int = 6) -> bytes:
    return make_packet(proto=proto, frag=frag,
                       payload=sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + b"x" * 16)


def test_flow_hash_tells_flows_apart_by_ports_for_tcp_and_udp():
    assert flow_hash(tcp(1000, 80)) == flow_hash(tcp(1000, 80))
    assert flow_hash(tcp(1000, 80)) != flow_hash(tcp(1001, 80))
    assert flow_hash(tcp(1000, 80, proto=17)) != flow_hash(tcp(1001, 80, proto=17))
    assert flow_hash(tcp(1000, 80)) != flow_hash(tcp(1000, 80, proto=17))


def test_flow_hash_leaves_out_ports_of_fragments_and_of_protocols_without_ports():
    # Every fragment of a datagram must take the same socket, and only the first has ports.
    first = tcp(1000, 80, frag=0x2000, proto=17)
    later = make_packet(proto=17, frag=0x2000 | 3, payload=b"any other bytes")
    assert flow_hash(first) == flow_hash(later) == flow_hash(tcp(1, 2, frag=0x0001, proto=17))
    assert flow_hash(tcp(1000, 80, proto=1)) == flow_hash(tcp(9, 9, proto=1))  # ICMP
    # DF is no fragment.
    assert flow_hash(tcp(1000, 80, frag=0x4000)) == flow_hash(tcp(1000, 80))


def test_flow_hash_takes_no_ports_from_beyond_the_packet():
    # 3 bytes of TCP payload: no room for the ports, so none are read (not even the trailer).
    short = make_packet(proto=6, payload=b"\x01\x02\x03")
    assert flow_hash(short) == flow_hash(make_packet(proto=6, payload=b"\x09\x09\x09"))
    assert flow_hash(short + b"\x04") == flow_hash(short)


def test_sender_index_spreads_the_hash_range_evenly_over_the_senders():
    assert sender_index(0, 8) == 0
    assert sender_index(0xFFFFFFFF, 8) == 7
    assert [sender_index(k << 29, 8) for k in range(8)] == list(range(8))
    assert sender_index(0xFFFFFFFF, 1) == 0


# --- Offloads: splitting TUN super-packets, coalescing received segments ----------------------

FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80


def l4_checksum(packet: bytes) -> int:
    """The checksum over the pseudo-header and the L4 part as it stands: 0 when it verifies."""
    ihl = (packet[0] & 0x0F) * 4
    pseudo = packet[12:20] + bytes([0, packet[9]]) + (len(packet) - ihl).to_bytes(2, "big")
    return checksum(pseudo + packet[ihl:])


def with_l4_checksum(packet: bytes, at: int) -> bytes:
    """`packet` with its L4 checksum (at offset `at` of the L4 header) made right."""
    ihl = (packet[0] & 0x0F) * 4
    cleared = packet[: ihl + at] + b"\x00\x00" + packet[ihl + at + 2 :]
    value = l4_checksum(cleared)
    return cleared[: ihl + at] + value.to_bytes(2, "big") + cleared[ihl + at + 2 :]


def tcp_packet(payload: bytes, seq: int = 1000, flags: int = ACK | PSH, tcp_options: bytes = b"",
               ack: int = 77, window: int = 500, sport: int = 40000, **ip: int | bytes) -> bytes:
    """A TCP/IPv4 packet with right checksums (options: multiples of 4 bytes)."""
    doff = (20 + len(tcp_options)) // 4
    tcp = (struct.pack("!HHIIBBHHH", sport, 80, seq, ack, doff << 4, flags, window, 0, 0)
           + tcp_options + payload)
    return with_l4_checksum(make_packet(proto=6, payload=tcp, frag=0x4000, **ip), 16)


def udp_packet(payload: bytes, **ip: int | bytes) -> bytes:
    udp = struct.pack("!HHHH", 5000, 53, 8 + len(payload), 0) + payload
    return with_l4_checksum(make_packet(proto=17, payload=udp, **ip), 6)


def vnet(gso_type: int = GSO_TCPV4, gso_size: int = 1000, flags: int = VNET_F_NEEDS_CSUM,
         csum_start: int = 20, csum_offset: int = 16, hdr_len: int = 0) -> bytes:
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


TS_OPTION = b"\x01\x01\x08\x0a" + bytes(range(8))  # NOP NOP timestamp


def test_tso_segments_carry_mss_payloads_advanced_seqs_ids_and_right_checksums():
    payload = bytes(range(256)) * 20  # 5120 bytes: 5 segments of 1000 and one of 120
    big = tcp_packet(payload, seq=0xFFFFF000, flags=ACK | PSH | FIN | CWR, tcp_options=TS_OPTION)
    drop, segments = segment_tso(vnet(hdr_len=9999), big)  # hdr_len is not trusted
    assert drop is None
    assert [len(s) - 52 for s in segments] == [1000] * 5 + [120]
    assert b"".join(s[52:] for s in segments) == payload
    for i, seg in enumerate(segments):
        assert header_ok(seg) and l4_checksum(seg) == 0
        assert int.from_bytes(seg[2:4], "big") == len(seg)
        assert int.from_bytes(seg[4:6], "big") == 0x1234 + i
        assert int.from_bytes(seg[24:28], "big") == (0xFFFFF000 + 1000 * i) & 0xFFFFFFFF
        assert seg[40:52] == TS_OPTION
    assert [s[33] for s in segments] == [ACK | CWR] + [ACK] * 4 + [ACK | PSH | FIN]


def test_tso_keeps_ipv4_options_in_every_segment():
    options = b"\x94\x04\x00\x00"  # router alert
    drop, segments = segment_tso(vnet(gso_size=100), tcp_packet(bytes(250), options=options))
    assert drop is None and len(segments) == 3
    assert all(s[0] == 0x46 and s[20:24] == options and header_ok(s) and l4_checksum(s) == 0
               for s in segments)


def test_uso_splits_a_udp_super_packet_into_datagrams_with_their_own_lengths():
    payload = bytes(range(250)) * 10
    drop, segments = segment_tso(vnet(GSO_UDP_L4, 1200, csum_offset=6), udp_packet(payload))
    assert drop is None
    assert [int.from_bytes(s[24:26], "big") for s in segments] == [1208, 1208, 108]
    assert b"".join(s[28:] for s in segments) == payload
    assert all(header_ok(s) and l4_checksum(s) == 0 for s in segments)


def test_a_partial_checksum_without_gso_is_completed_at_csum_start_plus_offset():
    right = tcp_packet(b"hello")
    pseudo = right[12:20] + b"\x00\x06" + (len(right) - 20).to_bytes(2, "big")
    pseudo_sum = ~checksum(pseudo) & 0xFFFF  # what the kernel leaves in the field
    partial = right[:36] + pseudo_sum.to_bytes(2, "big") + right[38:]
    assert segment_tso(vnet(GSO_NONE, 0), partial) == (None, [right])
    assert segment_tso(vnet(GSO_NONE, 0, flags=0), partial) == (None, [partial])


@pytest.mark.parametrize("header, packet", [
    (vnet(GSO_NONE, 0, csum_start=20, csum_offset=len(tcp_packet(b"x")) - 21), tcp_packet(b"x")),
    (vnet(gso_size=0), tcp_packet(bytes(3000))),
    (vnet(GSO_UDP_L4), tcp_packet(bytes(3000))),  # GSO type and protocol disagree
    (vnet(GSO_TCPV4), udp_packet(bytes(3000))),
    (vnet(4), tcp_packet(bytes(3000))),  # TCPV6
    (vnet(3), udp_packet(bytes(3000))),  # UFO
    (vnet(), make_packet(proto=6, payload=bytes(3000), frag=0x2000)),  # a fragment
    (vnet(), make_packet(proto=6, payload=bytes(19))),  # no room for a TCP header
    (vnet(gso_size=1), tcp_packet(bytes(300))),  # more segments than the fast path takes
], ids=["csum-beyond-end", "gso-size-0", "uso-on-tcp", "tso-on-udp", "tcpv6", "ufo",
        "fragment", "short-tcp", "too-many-segments"])
def test_virtio_headers_that_cannot_be_honoured_are_bad_gso(header, packet):
    assert segment_tso(header, packet) == (Drop.BAD_GSO, [])


def test_a_super_packet_no_larger_than_the_mss_is_one_segment_with_fresh_checksums():
    packet = tcp_packet(bytes(500))
    broken = packet[:36] + b"\x00\x00" + packet[38:]
    assert segment_tso(vnet(gso_size=1000), broken) == (None, [packet])


def test_coalescing_the_segments_of_a_super_packet_gives_it_back_with_a_gso_header():
    payload = bytes(range(256)) * 20
    big = tcp_packet(payload, tcp_options=TS_OPTION)
    _, segments = segment_tso(vnet(), big)
    [(header, merged)] = tun_writes(segments).frames
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(header)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        VNET_F_NEEDS_CSUM, GSO_TCPV4, 52, 1000, 20, 16)
    assert merged[:36] == big[:36] and merged[38:] == big[38:] and header_ok(merged)
    # The checksum field holds the pseudo-header sum, which the kernel completes.
    assert tun_writes(segments).frames == [(header, merged)]
    assert segment_tso(header, merged) == (None, segments)


def test_a_psh_or_a_short_segment_ends_a_run():
    segs = [tcp_packet(bytes(100), seq=1000 + 100 * i, flags=ACK) for i in range(6)]
    segs[2] = tcp_packet(bytes(100), seq=1200, flags=ACK | PSH)
    segs[4] = tcp_packet(bytes(50), seq=1400, flags=ACK)
    segs[5] = tcp_packet(bytes(100), seq=1450, flags=ACK)
    out = tun_writes(segs).frames
    assert [len(p) - 40 for _, p in out] == [300, 150, 100]
    assert out[0][1][33] == ACK | PSH and out[2] == (ZERO_VNET_HDR, segs[5])


@pytest.mark.parametrize("change", [
    dict(seq=1150), dict(ack=78), dict(window=501), dict(sport=40001), dict(flags=ACK | FIN),
    dict(ttl=63), dict(src=POD + 1), dict(tcp_options=TS_OPTION), dict(payload=bytes(101)),
], ids=["seq-gap", "ack", "window", "port", "fin", "ttl", "address", "options", "longer"])
def test_segments_that_do_not_continue_the_run_are_not_merged(change):
    first = tcp_packet(bytes(100), seq=1000, flags=ACK)
    fields = dict(payload=bytes(100), seq=1100, flags=ACK) | change
    second = tcp_packet(**fields)
    assert tun_writes([first, second]).frames == [(ZERO_VNET_HDR, first), (ZERO_VNET_HDR, second)]


def test_bad_checksums_ip_options_and_other_protocols_pass_through_unmerged():
    first = tcp_packet(bytes(100), seq=1000, flags=ACK)
    bad = tcp_packet(bytes(100), seq=1100, flags=ACK)
    bad = bad[:-1] + b"\x01"  # payload changed, checksum not: must not be laundered
    with_options = tcp_packet(bytes(100), seq=1100, flags=ACK, options=b"\x01\x01\x01\x00")
    for other in (bad, with_options, udp_packet(bytes(100))):
        assert tun_writes([first, other]).frames == [(ZERO_VNET_HDR, first), (ZERO_VNET_HDR, other)]


# --- partial checksums from kernel senders (VXLAN ingress) ---------------------------------------


def partial(packet: bytes) -> bytes:
    """`packet` as a kernel sender whose device offloads checksums leaves it: the folded
    pseudo-header sum in the TCP/UDP checksum field, not the checksum."""
    ihl = (packet[0] & 0x0F) * 4
    at = ihl + (16 if packet[9] == 6 else 6)
    pseudo = packet[12:20] + bytes([0, packet[9]]) + (len(packet) - ihl).to_bytes(2, "big")
    value = ~checksum(pseudo) & 0xFFFF
    return packet[:at] + value.to_bytes(2, "big") + packet[at + 2 :]


def wrong(packet: bytes) -> bytes:
    """`packet` with its L4 checksum off by one: simply wrong, not partial."""
    ihl = (packet[0] & 0x0F) * 4
    at = ihl + (16 if packet[9] == 6 else 6)
    value = (int.from_bytes(packet[at : at + 2], "big") + 1) & 0xFFFF
    return packet[:at] + value.to_bytes(2, "big") + packet[at + 2 :]


@pytest.mark.parametrize("make, at", [(lambda: tcp_packet(b"x" * 300), 36),
                                      (lambda: udp_packet(b"y" * 301), 26)],
                         ids=["tcp", "udp"])
def test_a_partial_checksum_is_found_and_completed_to_the_right_one(make, at):
    good = make()
    half = partial(good)
    assert half != good and l4_checksum(half) != 0
    result = vxlan_ingress(vxlan_frame(half), VTEP)
    assert (result.action, result.data, result.csum_at) == (Action.TUN, half, at)
    # A plain TUN gets it completed; a virtio-header one behind NEEDS_CSUM for the kernel,
    # which completes it as segment_tso does.
    assert tun_writes([half], vnet=False, complete_partial=True) == ([(b"", good)], 1, 0)
    [(header, same)], completed, _ = tun_writes([half], complete_partial=True)
    assert same == half and completed == 1
    assert header == VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, at + 2, 0, 20, at - 20)
    assert segment_tso(header, half) == (None, [good])


@pytest.mark.parametrize("make", [lambda: tcp_packet(b"x" * 300), lambda: udp_packet(b"y" * 301)],
                         ids=["tcp", "udp"])
def test_a_wrong_checksum_is_not_taken_for_partial_and_reaches_the_tun_as_it_came(make):
    bad = wrong(make())
    assert vxlan_ingress(vxlan_frame(bad), VTEP).csum_at == 0
    for vnet_hdr in (True, False):
        frames, completed, _ = tun_writes([bad], vnet=vnet_hdr, complete_partial=True)
        assert frames == [(ZERO_VNET_HDR if vnet_hdr else b"", bad)] and completed == 0


def test_right_checksums_udp_without_one_fragments_and_udp_mode_are_left_alone():
    no_checksum = make_packet(proto=17, payload=struct.pack("!HHHH", 1, 2, 12, 0) + b"abcd")
    # A first fragment whose field holds the sum (the kernel never fragments a partial one).
    fragment = make_packet(proto=6, payload=partial(tcp_packet(b"z" * 100))[20:], frag=0x2000)
    for packet in (tcp_packet(b"ok" * 50), udp_packet(b"ok"), no_checksum, fragment):
        assert vxlan_ingress(vxlan_frame(packet), VTEP).csum_at == 0
    # flannel's udp senders never leave a checksum partial: UDP mode touches no checksum.
    half = partial(tcp_packet(b"x" * 300))
    assert ingress(half).data[20:] == half[20:]


def test_partial_segments_coalesce_with_right_ones_into_one_the_kernel_completes():
    payload = bytes(range(256)) * 20
    segments = segment_tso(vnet(gso_size=1000), tcp_packet(payload, flags=ACK))[1]
    mixed = [partial(seg) if i % 2 else seg for i, seg in enumerate(segments)]
    merged = tun_writes(segments).frames
    assert len(merged) == 1 and tun_writes(mixed, complete_partial=True) == (merged, 3, 0)
    # Without completion (UDP mode) the partial ones don't verify, so none joins a run.
    assert len(tun_writes(mixed).frames) == len(mixed)


def test_a_tcp_super_packet_longer_than_the_mtu_goes_whole_behind_a_gso_header_or_split():
    payload = bytes(range(256)) * 40  # 10240 bytes, as a veth hands a kernel sender's GSO frame on
    big = partial(tcp_packet(payload, flags=ACK, tcp_options=TS_OPTION))
    mss = 1450 - 20 - 32
    [(header, same)], completed, _ = tun_writes([big], complete_partial=True, mtu=1450)
    assert (same, completed) == (big, 1)
    assert header == VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_TCPV4, 52, mss, 20, 16)
    frames, _, _ = tun_writes([big], vnet=False, complete_partial=True, mtu=1450)
    assert [p for _, p in frames] == segment_tso(header, big)[1]
    assert all(len(p) <= 1450 and l4_checksum(p) == 0 for _, p in frames)
    assert b"".join(p[52:] for _, p in frames) == payload
    # No MTU known: the packet goes whole as one (NEEDS_CSUM, no GSO).
    assert tun_writes([big], complete_partial=True).frames[0][0][1] == GSO_NONE


def test_a_udp_super_packet_is_split_at_its_gro_size_into_datagrams_with_checksums():
    payload = bytes(range(250)) * 8  # 2000 bytes sent as 4 datagrams of 500 (UDP_SEGMENT)
    big = partial(udp_packet(payload))
    frames, completed, _ = tun_writes([big], complete_partial=True, gro_size=500)
    assert completed == 1 and len(frames) == 4
    assert all(h == ZERO_VNET_HDR and len(p) == 528 and l4_checksum(p) == 0 for h, p in frames)
    assert b"".join(p[28:] for _, p in frames) == payload
    # Datagrams no longer than the GRO size are single ones.
    assert len(tun_writes([big], complete_partial=True, gro_size=2000).frames) == 1


def test_a_super_packet_that_cannot_be_split_is_dropped_as_bad_gso():
    big = partial(tcp_packet(bytes(3000), flags=ACK))
    assert tun_writes([big], complete_partial=True, mtu=41) == ([], 1, 1)  # MSS 1: > 256 segs
