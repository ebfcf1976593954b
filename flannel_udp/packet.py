"""Plain-Python reference of the fast path's per-packet logic, UDP and VXLAN modes.

This module is the oracle for the native fast path in ``_fastpath.pyx``: the property tests feed
the same bytes to both and require identical results, so every rule here (validation order, the
RFC 1624 incremental checksum, the ICMP error layout, the VXLAN checks and the flow hash) must
stay byte-for-byte in step with the C code. Pure functions, no I/O. Addresses are IPv4
host-order ints; packets are ``bytes``; MAC addresses are 6 ``bytes``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")  # what a route table maps a subnet to: a peer (UDP) or a VxlanRoute

IPV4_HEADER_LEN = 20
PROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
REPLY_TTL = 64
# RFC 792: an ICMP error quotes the offending header plus the first 64 bits of its payload.
ICMP_QUOTE_PAYLOAD = 8

# VXLAN (RFC 7348) as Linux's kernel VXLAN speaks it: VXLAN header, then an Ethernet frame.
VXLAN_HEADER_LEN = 8
ETHERNET_HEADER_LEN = 14
VXLAN_ENCAP_LEN = VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN  # in front of the inner IPv4 packet
VXLAN_FLAG_I = 0x08  # "the VNI is valid"; the other flag bits are reserved, ignored on receipt
ETHERTYPE_IPV4 = 0x0800
# Protocols whose first 4 payload bytes are source and destination port: TCP, UDP, DCCP, SCTP,
# UDP-Lite. Only these add ports to the flow hash.
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})
FLOW_HASH_SEED = 0x666C7578  # any constant; equal in C and here


class Drop(enum.IntEnum):
    """Why a packet was dropped. The numbering is shared with _fastpath and must not change."""

    SHORT = 1  # shorter than a 20-byte IPv4 header
    NOT_IPV4 = 2  # version nibble != 4
    BAD_HEADER_LEN = 3  # IHL < 5 or IHL*4 > length
    BAD_TOTAL_LEN = 4  # total length < IHL*4 or > bytes available
    TTL_EXPIRED = 5
    NO_ROUTE = 6
    TOO_BIG = 7  # the kernel refused the send with EMSGSIZE
    SEND_ERROR = 8  # any other send failure
    TUN_WRITE_ERROR = 9
    VXLAN_SHORT = 10  # shorter than the VXLAN header plus the inner Ethernet header
    VXLAN_BAD_FLAGS = 11  # the I flag (valid VNI) is not set
    VXLAN_WRONG_VNI = 12
    VXLAN_WRONG_MAC = 13  # inner destination MAC is not our VtepMAC
    VXLAN_NOT_IPV4 = 14  # inner ethertype is not IPv4


DROP_NAMES: dict[Drop, str] = {d: d.name.lower() for d in Drop}


class Action(enum.IntEnum):
    """What to do with a processed packet."""

    SEND = 0  # data goes to peer (UDP payload)
    TUN = 1  # data goes into the TUN (ingress result)
    REPLY = 2  # data (an ICMP error) goes back into the TUN; the packet itself is dropped
    DROP = 3


@dataclass(frozen=True)
class Result:
    """Outcome of processing one packet; ``peer`` and ``sender`` are only set for SEND, ``drop``
    for REPLY/DROP. ``sender`` is the index of the socket that sends it (VXLAN: by flow)."""

    action: Action
    data: bytes = b""
    peer: int = 0
    drop: Drop | None = None
    sender: int = 0


@dataclass(frozen=True)
class Vtep:
    """This node's VXLAN endpoint: VNI, VtepMAC, and how many send sockets flows spread over."""

    vni: int
    mac: bytes
    senders: int = 1


@dataclass(frozen=True)
class VxlanRoute:
    """Where a remote subnet's VXLAN frames go: the peer's PublicIP and VtepMAC."""

    peer: int
    mac: bytes


def prefix_mask(prefix_len: int) -> int:
    """Netmask of a prefix length as a host-order int (0 for /0)."""
    if not 0 <= prefix_len <= 32:
        raise ValueError(f"prefix length out of range: {prefix_len}")
    return (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF


def checksum(data: bytes) -> int:
    """Internet checksum (RFC 1071) of ``data``, odd length padded with a zero byte."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _validate(data: bytes) -> tuple[bytes, Drop | None]:
    """Check the IPv4 header; return the packet cut to its total length, or the drop reason."""
    n = len(data)
    if n < IPV4_HEADER_LEN:
        return b"", Drop.SHORT
    if data[0] >> 4 != 4:
        return b"", Drop.NOT_IPV4
    header_len = (data[0] & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN or header_len > n:
        return b"", Drop.BAD_HEADER_LEN
    total_len = int.from_bytes(data[2:4], "big")
    if total_len < header_len or total_len > n:
        return b"", Drop.BAD_TOTAL_LEN
    return data[:total_len], None


def _decrement_ttl(packet: bytes) -> bytes:
    """Return ``packet`` with TTL - 1 and the header checksum patched per RFC 1624 eqn. 3.

    Incremental rather than recomputed: a header that arrived with a bad checksum keeps it bad
    (the receiver should still notice), and the C fast path must produce identical bytes.
    """
    old_word = (packet[8] << 8) | packet[9]
    new_word = old_word - 0x100
    old_sum = int.from_bytes(packet[10:12], "big")
    total = (~old_sum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    new_sum = ~total & 0xFFFF
    return packet[:8] + bytes([packet[8] - 1, packet[9]]) + new_sum.to_bytes(2, "big") + packet[12:]


def net_unreachable(packet: bytes, tun_addr: int) -> bytes:
    """ICMP Destination Unreachable / Net Unreachable answering a (validated, cut) packet."""
    header_len = (packet[0] & 0x0F) * 4
    quote = packet[: header_len + ICMP_QUOTE_PAYLOAD]
    icmp = bytes([ICMP_DEST_UNREACH, ICMP_NET_UNREACH]) + b"\x00\x00" + b"\x00" * 4 + quote
    icmp = icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]
    total_len = IPV4_HEADER_LEN + len(icmp)
    header = (
        bytes([0x45, 0])
        + total_len.to_bytes(2, "big")
        + b"\x00\x00\x00\x00"  # id 0, flags/fragment offset 0
        + bytes([REPLY_TTL, PROTO_ICMP])
        + b"\x00\x00"
        + tun_addr.to_bytes(4, "big")
        + packet[12:16]  # back to the original source
    )
    header = header[:10] + checksum(header).to_bytes(2, "big") + header[12:]
    return header + icmp


def _route(packet: bytes, routes: Mapping[int, T], subnet_len: int, tun_addr: int,
           check_ttl: bool) -> tuple[bytes, T] | Result:
    """Validate a packet read from the TUN and look its destination up: (the packet cut to its
    total length, its route), or the Result that ends it there."""
    packet, drop = _validate(packet)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if check_ttl and packet[8] <= 1:
        return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
    dst = int.from_bytes(packet[16:20], "big")
    route = routes.get(dst & prefix_mask(subnet_len))
    if route is not None:
        return packet, route
    fragment_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
    # Never answer an ICMP message with an ICMP error (RFC 1122 3.2.2), and only a first
    # fragment carries the transport header the sender needs to match the error.
    if packet[9] == PROTO_ICMP or fragment_offset:
        return Result(Action.DROP, drop=Drop.NO_ROUTE)
    return Result(Action.REPLY, net_unreachable(packet, tun_addr), drop=Drop.NO_ROUTE)


def egress(packet: bytes, routes: Mapping[int, int], subnet_len: int, tun_addr: int) -> Result:
    """UDP mode: process a packet read from the TUN: where it goes (a peer), or why not."""
    routed = _route(packet, routes, subnet_len, tun_addr, check_ttl=True)
    if isinstance(routed, Result):
        return routed
    packet, peer = routed
    return Result(Action.SEND, _decrement_ttl(packet), peer)


def ingress(datagram: bytes) -> Result:
    """UDP mode: process a datagram from a peer (a bare IPv4 packet) bound for the TUN."""
    packet, drop = _validate(datagram)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if packet[8] <= 1:
        return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
    return Result(Action.TUN, _decrement_ttl(packet))


# --- VXLAN mode: no TTL change (kernel VXLAN leaves it to the kernel's own forwarding) ---------


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def flow_hash(packet: bytes) -> int:
    """32-bit hash of a validated IPv4 packet's flow: addresses, protocol, and the L4 ports when
    the protocol has them and the packet is no fragment (all fragments of a datagram must hash
    alike, and only the first one carries the ports)."""
    header_len = (packet[0] & 0x0F) * 4
    total_len = int.from_bytes(packet[2:4], "big")
    proto = packet[9]
    ports = 0
    fragment = int.from_bytes(packet[6:8], "big") & 0x3FFF  # MF or an offset
    if proto in PORT_PROTOCOLS and not fragment and header_len + 4 <= total_len:
        ports = int.from_bytes(packet[header_len : header_len + 4], "big")
    h = _fmix32(FLOW_HASH_SEED ^ int.from_bytes(packet[12:16], "big"))
    h = _fmix32(h ^ int.from_bytes(packet[16:20], "big"))
    h = _fmix32(h ^ proto)
    return _fmix32(h ^ ports)


def sender_index(flow: int, senders: int) -> int:
    """Which of `senders` sockets a flow leaves from (multiply-shift: no modulo bias)."""
    return (flow * senders) >> 32


def vxlan_encap(packet: bytes, vni: int, dst_mac: bytes, src_mac: bytes) -> bytes:
    """The UDP payload carrying `packet`: VXLAN header (I flag, VNI) and inner Ethernet header."""
    return (bytes([VXLAN_FLAG_I, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\x00"
            + dst_mac + src_mac + ETHERTYPE_IPV4.to_bytes(2, "big") + packet)


def vxlan_egress(packet: bytes, routes: Mapping[int, VxlanRoute], subnet_len: int,
                 tun_addr: int, vtep: Vtep) -> Result:
    """VXLAN mode: process a packet read from the TUN: the frame for its peer, or why not."""
    routed = _route(packet, routes, subnet_len, tun_addr, check_ttl=False)
    if isinstance(routed, Result):
        return routed
    packet, route = routed
    return Result(Action.SEND, vxlan_encap(packet, vtep.vni, route.mac, vtep.mac), route.peer,
                  sender=sender_index(flow_hash(packet), vtep.senders))


def vxlan_ingress(datagram: bytes, vtep: Vtep) -> Result:
    """VXLAN mode: process a datagram from a peer: the inner packet for the TUN, or why not."""
    if len(datagram) < VXLAN_ENCAP_LEN:
        return Result(Action.DROP, drop=Drop.VXLAN_SHORT)
    if not datagram[0] & VXLAN_FLAG_I:
        return Result(Action.DROP, drop=Drop.VXLAN_BAD_FLAGS)
    if int.from_bytes(datagram[4:7], "big") != vtep.vni:
        return Result(Action.DROP, drop=Drop.VXLAN_WRONG_VNI)
    if datagram[8:14] != vtep.mac:
        return Result(Action.DROP, drop=Drop.VXLAN_WRONG_MAC)
    if int.from_bytes(datagram[20:22], "big") != ETHERTYPE_IPV4:
        return Result(Action.DROP, drop=Drop.VXLAN_NOT_IPV4)
    packet, drop = _validate(datagram[VXLAN_ENCAP_LEN:])
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    return Result(Action.TUN, packet)
