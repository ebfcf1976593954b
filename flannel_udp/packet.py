"""Plain-Python reference of the fast path's per-packet logic, UDP and VXLAN modes, and of its
offloads (splitting TUN super-packets, coalescing received TCP segments).

This module is the oracle for the native fast path in ``_fastpath.pyx``: the property tests feed
the same bytes to both and require identical results, so every rule here (validation order, the
RFC 1624 incremental checksum, the ICMP error layout, the VXLAN checks and the flow hash) must
stay byte-for-byte in step with the C code. Pure functions, no I/O. Addresses are IPv4
host-order ints (IPv6 subnets: 128-bit ints); packets are ``bytes``; MAC addresses are 6
``bytes``. IPv6 inner packets are handled once a node has an IPv6 side (``Ipv6Routes``);
without one they are dropped as NOT_IPV4.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

T = TypeVar("T")  # what a route table maps a subnet to: a peer (UDP) or a VxlanRoute

# Header lengths and field offsets (from the start of their own header), named as the C names
# them (fastpath/headers.pxi). IPv4 (RFC 791):
IPV4_HEADER_LEN = 20  # without options
IPV4_VER_IHL_OFFSET = 0  # version (high nibble), header length in words (low nibble)
IPV4_TOS_OFFSET = 1
IPV4_TOTAL_LEN_OFFSET = 2
IPV4_ID_OFFSET = 4
IPV4_FLAGS_OFFSET = 6  # 3 flag bits (DF, MF), then the 13-bit fragment offset
IPV4_TTL_OFFSET = 8
IPV4_PROTO_OFFSET = 9
IPV4_CSUM_OFFSET = 10
IPV4_SRC_OFFSET = 12
IPV4_DST_OFFSET = 16
IPV4_ADDR_LEN = 4
IPV4_VER_IHL_NO_OPTIONS = 0x45  # version 4, a 20-byte header
IPV4_FRAGMENT_MASK = 0x3FFF  # of the flags word: MF or an offset, a fragment
IPV4_FRAG_OFFSET_MASK = 0x1FFF  # of the flags word: an offset, a fragment but the first
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
PROTO_DCCP, PROTO_SCTP, PROTO_UDPLITE = 33, 132, 136
# IPv6 (RFC 8200): the fixed header; extension headers are not walked (a next header that is
# not TCP/UDP leaves the packet opaque: no ports in its flow hash, no checksum looked at).
IPV6_HEADER_LEN = 40
IPV6_VERSION_OFFSET = 0  # version (high nibble), traffic class, flow label
IPV6_PAYLOAD_LEN_OFFSET = 4  # what follows the fixed header
IPV6_NEXT_HEADER_OFFSET = 6
IPV6_HOP_LIMIT_OFFSET = 7
IPV6_SRC_OFFSET = 8
IPV6_DST_OFFSET = 24
IPV6_ADDR_LEN = 16
PROTO_ICMPV6 = 58
PROTO_IPV6_FRAGMENT = 44  # the fragment extension header
IPV6_FRAG_OFFSET_OFFSET = 2  # of the fragment header: offset (13 bits), then 3 flag bits
IPV6_FRAG_OFFSET_MASK = 0xFFF8
IPV6_MIN_MTU = 1280
# ICMPv6 (RFC 4443): the errors we answer with; types below ICMPV6_INFO_MIN are errors.
ICMPV6_HEADER_LEN = 8
ICMPV6_DEST_UNREACH, ICMPV6_NO_ROUTE = 1, 0
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_INFO_MIN = 128
# TCP (RFC 9293) and UDP (RFC 768):
TCP_HEADER_LEN = 20  # without options
TCP_SEQ_OFFSET = 4
TCP_ACK_SEQ_OFFSET = 8
TCP_DOFF_OFFSET = 12  # data offset (high nibble): the header length in words
TCP_FLAGS_OFFSET = 13
TCP_WINDOW_OFFSET = 14
TCP_CSUM_OFFSET = 16
TCP_OPTIONS_OFFSET = 20
UDP_HEADER_LEN = 8
UDP_LEN_OFFSET = 4
UDP_CSUM_OFFSET = 6
# Protocols whose first L4_PORTS_LEN payload bytes are source and destination port. Only these
# add ports to the flow hash.
L4_PORTS_LEN = 4
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_DCCP, PROTO_SCTP, PROTO_UDPLITE})

# ICMP (RFC 792): the Destination Unreachable / Net Unreachable error we answer with.
ICMP_CSUM_OFFSET = 2
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
REPLY_TTL = 64
# RFC 792: an ICMP error quotes the offending header plus the first 64 bits of its payload.
ICMP_QUOTE_PAYLOAD = 8

# VXLAN (RFC 7348) as Linux's kernel VXLAN speaks it: VXLAN header, then an Ethernet frame.
VXLAN_HEADER_LEN = 8
VXLAN_FLAGS_OFFSET = 0
VXLAN_VNI_OFFSET = 4  # 24 bits, then a reserved byte
ETHERNET_HEADER_LEN = 14
ETHERNET_DST_OFFSET = 0
ETHERNET_TYPE_OFFSET = 12
VXLAN_ENCAP_LEN = VXLAN_HEADER_LEN + ETHERNET_HEADER_LEN  # in front of the inner IPv4 packet
VXLAN_FLAG_I = 0x08  # "the VNI is valid"; the other flag bits are reserved, ignored on receipt
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
FLOW_HASH_SEED = 0x666C7578  # any constant; equal in C and here


class Drop(enum.IntEnum):
    """Why a packet was dropped. The numbering is shared with _fastpath and must not change."""

    SHORT = 1  # shorter than a 20-byte IPv4 header (IPv6: its 40-byte header)
    NOT_IPV4 = 2  # version nibble != 4 (nor 6 where IPv6 is on, or not the ethertype's)
    BAD_HEADER_LEN = 3  # IHL < 5 or IHL*4 > length
    BAD_TOTAL_LEN = 4  # total length < IHL*4 or > bytes available (IPv6: payload length 0 or
    # more than there is)
    TTL_EXPIRED = 5  # or the IPv6 hop limit
    NO_ROUTE = 6
    TOO_BIG = 7  # the kernel refused the send with EMSGSIZE; an IPv6 packet over the path MTU
    SEND_ERROR = 8  # any other send failure
    TUN_WRITE_ERROR = 9
    VXLAN_SHORT = 10  # shorter than the VXLAN header plus the inner Ethernet header
    VXLAN_BAD_FLAGS = 11  # the I flag (valid VNI) is not set
    VXLAN_WRONG_VNI = 12
    VXLAN_WRONG_MAC = 13  # inner destination MAC is not our VtepMAC
    VXLAN_NOT_IPV4 = 14  # inner ethertype is not IPv4 (nor IPv6 where IPv6 is on)
    BAD_GSO = 15  # a virtio header the fast path can't honour (GSO type, sizes, csum offsets)
    UNKNOWN_SENDER = 16  # the outer source is no lease holder's PublicIP
    SPOOFED_INNER_SOURCE = 17  # the inner source is outside the subnets leased to the sender


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
    for REPLY/DROP. ``sender`` is the index of the socket that sends it (VXLAN: by flow).
    ``csum_at``, only for TUN (VXLAN): where the packet's partial checksum is, 0 for none
    (``tun_writes`` says what becomes of it)."""

    action: Action
    data: bytes = b""
    peer: int | ipaddress.IPv6Address = 0  # a PublicIP, or a PublicIPv6
    drop: Drop | None = None
    sender: int = 0
    csum_at: int = 0


@dataclass(frozen=True)
class Vtep:
    """This node's VXLAN endpoint: VNI, VtepMAC, how many send sockets flows spread over, the
    VtepMAC of its IPv6 frames (a flannel-v6 device's own; None: ``mac``), and how many IPv6
    send sockets flows to PublicIPv6s spread over (numbered after the IPv4 ones)."""

    vni: int
    mac: bytes
    senders: int = 1
    mac6: bytes | None = None
    senders6: int = 1

    @property
    def ipv6_mac(self) -> bytes:
        return self.mac if self.mac6 is None else self.mac6


@dataclass(frozen=True)
class Ipv6Routes:
    """A node's IPv6 side: the route table (IPv6 subnet network address as a 128-bit int -> a
    peer's PublicIP (an int) or PublicIPv6 (an IPv6Address), or a VxlanRoute to either), the
    IPv6 lease prefix length, and our IPv6 subnet's network address."""

    routes: Mapping[int, object]
    subnet_len: int = 64
    tun_addr: int = 0
    path_mtu: int = 0  # longer packets get ICMPv6 packet too big (0: no limit)


@dataclass(frozen=True)
class VxlanRoute:
    """Where a remote subnet's VXLAN frames go: the peer's PublicIP (or, for an IPv6 subnet,
    its PublicIPv6 as an IPv6Address) and VtepMAC."""

    peer: int | ipaddress.IPv6Address
    mac: bytes


@dataclass(frozen=True)
class Sender:
    """Who sent a datagram (its outer source address: an int, or an IPv6Address over an IPv6
    underlay) and the leases to check it against: the route table as subnet -> peer PublicIP,
    and the lease prefix length; the same for IPv6 subnets."""

    address: int | ipaddress.IPv6Address
    routes: Mapping[int, int]
    subnet_len: int
    routes6: Mapping[int, object] = field(default_factory=dict)  # IPv6 subnet -> PublicIP(v6)
    subnet_len6: int = 64


def prefix_mask(prefix_len: int) -> int:
    """Netmask of a prefix length as a host-order int (0 for /0)."""
    if not 0 <= prefix_len <= 32:
        raise ValueError(f"prefix length out of range: {prefix_len}")
    return (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF


def prefix_mask6(prefix_len: int) -> int:
    """Netmask of an IPv6 prefix length as a 128-bit int."""
    if not 0 <= prefix_len <= 128:
        raise ValueError(f"prefix length out of range: {prefix_len}")
    return ((1 << 128) - 1) ^ ((1 << (128 - prefix_len)) - 1)


def _u128(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 16], "big")


def _is_ipv6(data: bytes) -> bool:
    return len(data) > 0 and data[IPV6_VERSION_OFFSET] >> 4 == 6


def _l3_header_len(packet: bytes) -> int:
    """The IP header of a valid packet: IPv6's fixed one, or IPv4's with its options."""
    return IPV6_HEADER_LEN if _is_ipv6(packet) else _ipv4_header_len(packet)


def _l4_proto(packet: bytes) -> int:
    """The transport protocol of a valid packet (IPv6: its first next header)."""
    return packet[IPV6_NEXT_HEADER_OFFSET if _is_ipv6(packet) else IPV4_PROTO_OFFSET]


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _ipv4_header_len(packet: bytes) -> int:
    return (packet[IPV4_VER_IHL_OFFSET] & 0x0F) * 4


def _tcp_header_len(packet: bytes, at: int) -> int:
    """The length of the TCP header at `at`."""
    return (packet[at + TCP_DOFF_OFFSET] >> 4) * 4


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
    if data[IPV4_VER_IHL_OFFSET] >> 4 != 4:
        return b"", Drop.NOT_IPV4
    header_len = _ipv4_header_len(data)
    if header_len < IPV4_HEADER_LEN or header_len > n:
        return b"", Drop.BAD_HEADER_LEN
    total_len = _u16(data, IPV4_TOTAL_LEN_OFFSET)
    if total_len < header_len or total_len > n:
        return b"", Drop.BAD_TOTAL_LEN
    return data[:total_len], None


def _validate6(data: bytes) -> tuple[bytes, Drop | None]:
    """Check the IPv6 header; return the packet cut to its length, or the drop reason. A
    payload length of 0 (a jumbogram's) is refused: no link here carries one."""
    if len(data) < IPV6_HEADER_LEN:
        return b"", Drop.SHORT
    if data[IPV6_VERSION_OFFSET] >> 4 != 6:
        return b"", Drop.NOT_IPV4
    payload = _u16(data, IPV6_PAYLOAD_LEN_OFFSET)
    if payload == 0 or IPV6_HEADER_LEN + payload > len(data):
        return b"", Drop.BAD_TOTAL_LEN
    return data[: IPV6_HEADER_LEN + payload], None


def _validate_any(data: bytes) -> tuple[bytes, Drop | None]:
    return _validate6(data) if _is_ipv6(data) else _validate(data)


def _decrement_hop_limit(packet: bytes) -> bytes:
    """IPv6 has no header checksum: the hop limit alone changes."""
    out = bytearray(packet)
    out[IPV6_HOP_LIMIT_OFFSET] -= 1
    return bytes(out)


def _icmp6_answerable(packet: bytes, to_multicast_too: bool) -> bool:
    """Whether a valid IPv6 packet may be answered with an ICMPv6 error (RFC 4443 2.4 (e)):
    not an ICMPv6 error itself, nor from the unspecified or a multicast address, nor (but for
    packet too big) to a multicast one; and, as for IPv4, no fragment but the first."""
    next_header = packet[IPV6_NEXT_HEADER_OFFSET]
    if next_header == PROTO_ICMPV6 and (len(packet) <= IPV6_HEADER_LEN
                                        or packet[IPV6_HEADER_LEN] < ICMPV6_INFO_MIN):
        return False
    src = packet[IPV6_SRC_OFFSET : IPV6_SRC_OFFSET + IPV6_ADDR_LEN]
    if src[0] == 0xFF or src == bytes(IPV6_ADDR_LEN):
        return False
    if not to_multicast_too and packet[IPV6_DST_OFFSET] == 0xFF:
        return False
    if next_header == PROTO_IPV6_FRAGMENT:
        at = IPV6_HEADER_LEN + IPV6_FRAG_OFFSET_OFFSET
        if len(packet) < IPV6_HEADER_LEN + 8 or _u16(packet, at) & IPV6_FRAG_OFFSET_MASK:
            return False
    return True


def icmp6_error(packet: bytes, tun_addr: int, icmp_type: int, mtu: int = 0) -> bytes:
    """The ICMPv6 error `icmp_type` (code 0; `mtu` in packet too big's field) answering a
    valid IPv6 packet from `tun_addr` (128-bit int): it quotes as much of the packet as fits in
    the minimum IPv6 MTU."""
    quote = packet[: IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMPV6_HEADER_LEN]
    icmp = bytearray([icmp_type, 0, 0, 0]) + mtu.to_bytes(4, "big") + quote
    header = (bytes([0x60, 0, 0, 0]) + len(icmp).to_bytes(2, "big")
              + bytes([PROTO_ICMPV6, REPLY_TTL]) + tun_addr.to_bytes(16, "big")
              + packet[IPV6_SRC_OFFSET : IPV6_SRC_OFFSET + IPV6_ADDR_LEN])
    value = ~_ones_sum(_pseudo_sum(header, PROTO_ICMPV6, len(icmp)), bytes(icmp)) & 0xFFFF
    icmp[ICMP_CSUM_OFFSET : ICMP_CSUM_OFFSET + 2] = value.to_bytes(2, "big")
    return header + bytes(icmp)


def _route6(packet: bytes, v6: Ipv6Routes, check_hop_limit: bool) -> tuple[bytes, object] | Result:
    """`_route` for an IPv6 packet: ICMPv6 destination unreachable (no route) for one with
    no route, packet too big for one longer than the path MTU, where RFC 4443 allows an answer;
    both on the packet as received."""
    packet, drop = _validate6(packet)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if check_hop_limit and packet[IPV6_HOP_LIMIT_OFFSET] <= 1:
        return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
    route = v6.routes.get(_u128(packet, IPV6_DST_OFFSET) & prefix_mask6(v6.subnet_len))
    if route is None:
        if not _icmp6_answerable(packet, to_multicast_too=False):
            return Result(Action.DROP, drop=Drop.NO_ROUTE)
        return Result(Action.REPLY, icmp6_error(packet, v6.tun_addr, ICMPV6_DEST_UNREACH),
                      drop=Drop.NO_ROUTE)
    if v6.path_mtu and len(packet) > v6.path_mtu:
        if not _icmp6_answerable(packet, to_multicast_too=True):
            return Result(Action.DROP, drop=Drop.TOO_BIG)
        return Result(Action.REPLY, icmp6_error(packet, v6.tun_addr, ICMPV6_PACKET_TOO_BIG,
                                                v6.path_mtu), drop=Drop.TOO_BIG)
    return packet, route


def _decrement_ttl(packet: bytes) -> bytes:
    """Return ``packet`` with TTL - 1 and the header checksum patched per RFC 1624 eqn. 3.

    Incremental rather than recomputed: a header that arrived with a bad checksum keeps it bad
    (the receiver should still notice), and the C fast path must produce identical bytes.
    """
    old_word = _u16(packet, IPV4_TTL_OFFSET)  # the TTL, then the protocol
    new_word = old_word - 0x100
    old_sum = _u16(packet, IPV4_CSUM_OFFSET)
    total = (~old_sum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    out = bytearray(packet)
    out[IPV4_TTL_OFFSET] -= 1
    out[IPV4_CSUM_OFFSET : IPV4_CSUM_OFFSET + 2] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def net_unreachable(packet: bytes, tun_addr: int) -> bytes:
    """ICMP Destination Unreachable / Net Unreachable answering a (validated, cut) packet."""
    quote = packet[: _ipv4_header_len(packet) + ICMP_QUOTE_PAYLOAD]
    icmp = bytearray([ICMP_DEST_UNREACH, ICMP_NET_UNREACH]) + b"\x00\x00" + b"\x00" * 4 + quote
    icmp[ICMP_CSUM_OFFSET : ICMP_CSUM_OFFSET + 2] = checksum(bytes(icmp)).to_bytes(2, "big")
    total_len = IPV4_HEADER_LEN + len(icmp)
    header = (
        bytes([IPV4_VER_IHL_NO_OPTIONS, 0])
        + total_len.to_bytes(2, "big")
        + b"\x00\x00\x00\x00"  # id 0, flags/fragment offset 0
        + bytes([REPLY_TTL, PROTO_ICMP])
        + b"\x00\x00"
        + tun_addr.to_bytes(4, "big")
        + packet[IPV4_SRC_OFFSET : IPV4_SRC_OFFSET + IPV4_ADDR_LEN]  # back to the source
    )
    return _with_ip_checksum(header) + bytes(icmp)


def _route(packet: bytes, routes: Mapping[int, T], subnet_len: int, tun_addr: int,
           check_ttl: bool) -> tuple[bytes, T] | Result:
    """Validate a packet read from the TUN and look its destination up: (the packet cut to its
    total length, its route), or the Result that ends it there."""
    packet, drop = _validate(packet)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if check_ttl and packet[IPV4_TTL_OFFSET] <= 1:
        return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
    dst = _u32(packet, IPV4_DST_OFFSET)
    route = routes.get(dst & prefix_mask(subnet_len))
    if route is not None:
        return packet, route
    fragment_offset = _u16(packet, IPV4_FLAGS_OFFSET) & IPV4_FRAG_OFFSET_MASK
    # Never answer an ICMP message with an ICMP error (RFC 1122 3.2.2), and only a first
    # fragment carries the transport header the sender needs to match the error.
    if packet[IPV4_PROTO_OFFSET] == PROTO_ICMP or fragment_offset:
        return Result(Action.DROP, drop=Drop.NO_ROUTE)
    return Result(Action.REPLY, net_unreachable(packet, tun_addr), drop=Drop.NO_ROUTE)


def _unknown(sender: Sender | None) -> bool:
    """Whether the outer source holds no lease (of an IPv4 or an IPv6 subnet): nothing it
    sends is looked at."""
    return (sender is not None and sender.address not in sender.routes.values()
            and sender.address not in sender.routes6.values())


def _spoofed(packet: bytes, sender: Sender | None) -> bool:
    """Whether a validated packet's inner source lies outside the subnets leased to its
    sender (a lease's own tunnel address, its network address, is inside)."""
    if sender is None:
        return False
    if _is_ipv6(packet):
        src6 = _u128(packet, IPV6_SRC_OFFSET)
        return sender.routes6.get(src6 & prefix_mask6(sender.subnet_len6)) != sender.address
    src = _u32(packet, IPV4_SRC_OFFSET)
    return sender.routes.get(src & prefix_mask(sender.subnet_len)) != sender.address


def egress(packet: bytes, routes: Mapping[int, int], subnet_len: int, tun_addr: int,
           v6: Ipv6Routes | None = None) -> Result:
    """UDP mode: process a packet read from the TUN: where it goes (a peer), or why not.
    IPv6 (with `v6`): the hop limit as the TTL, routed by `v6`."""
    if v6 is not None and _is_ipv6(packet):
        routed6 = _route6(packet, v6, check_hop_limit=True)
        if isinstance(routed6, Result):
            return routed6
        packet, peer = routed6
        assert isinstance(peer, int | ipaddress.IPv6Address)
        # The IPv6 underlay's socket is numbered after the IPv4 one.
        return Result(Action.SEND, _decrement_hop_limit(packet), peer,
                      sender=1 if isinstance(peer, ipaddress.IPv6Address) else 0)
    routed = _route(packet, routes, subnet_len, tun_addr, check_ttl=True)
    if isinstance(routed, Result):
        return routed
    packet, peer = routed
    return Result(Action.SEND, _decrement_ttl(packet), peer)


def ingress(datagram: bytes, sender: Sender | None = None, v6: Ipv6Routes | None = None) -> Result:
    """UDP mode: process a datagram from a peer (a bare IP packet) bound for the TUN;
    with `sender`, only if it comes from a lease holder and from inside its subnet. An IPv6
    packet is taken as such only with `v6` (the node has an IPv6 side)."""
    if _unknown(sender):
        return Result(Action.DROP, drop=Drop.UNKNOWN_SENDER)
    if v6 is not None and _is_ipv6(datagram):
        packet, drop = _validate6(datagram)
        if drop is not None:
            return Result(Action.DROP, drop=drop)
        if _spoofed(packet, sender):
            return Result(Action.DROP, drop=Drop.SPOOFED_INNER_SOURCE)
        if packet[IPV6_HOP_LIMIT_OFFSET] <= 1:
            return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
        return Result(Action.TUN, _decrement_hop_limit(packet))
    packet, drop = _validate(datagram)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if _spoofed(packet, sender):
        return Result(Action.DROP, drop=Drop.SPOOFED_INNER_SOURCE)
    if packet[IPV4_TTL_OFFSET] <= 1:
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
    alike, and only the first one carries the ports). IPv6: the addresses word by word, the
    next header, the ports when it is such a protocol (a fragment's next header is 44)."""
    if _is_ipv6(packet):
        h = FLOW_HASH_SEED
        for at in range(IPV6_SRC_OFFSET, IPV6_DST_OFFSET + IPV6_ADDR_LEN, 4):
            h = _fmix32(h ^ _u32(packet, at))
        proto = packet[IPV6_NEXT_HEADER_OFFSET]
        length = IPV6_HEADER_LEN + _u16(packet, IPV6_PAYLOAD_LEN_OFFSET)
        ports = 0
        if proto in PORT_PROTOCOLS and IPV6_HEADER_LEN + L4_PORTS_LEN <= length:
            ports = _u32(packet, IPV6_HEADER_LEN)
        return _fmix32(_fmix32(h ^ proto) ^ ports)
    header_len = _ipv4_header_len(packet)
    total_len = _u16(packet, IPV4_TOTAL_LEN_OFFSET)
    proto = packet[IPV4_PROTO_OFFSET]
    ports = 0
    fragment = _u16(packet, IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK
    if proto in PORT_PROTOCOLS and not fragment and header_len + L4_PORTS_LEN <= total_len:
        ports = _u32(packet, header_len)
    h = _fmix32(FLOW_HASH_SEED ^ _u32(packet, IPV4_SRC_OFFSET))
    h = _fmix32(h ^ _u32(packet, IPV4_DST_OFFSET))
    h = _fmix32(h ^ proto)
    return _fmix32(h ^ ports)


def sender_index(flow: int, senders: int) -> int:
    """Which of `senders` sockets a flow leaves from (multiply-shift: no modulo bias)."""
    return (flow * senders) >> 32


def vxlan_encap(packet: bytes, vni: int, dst_mac: bytes, src_mac: bytes) -> bytes:
    """The UDP payload carrying `packet`: VXLAN header (I flag, VNI) and inner Ethernet header
    (the ethertype of the packet's IP version)."""
    ethertype = ETHERTYPE_IPV6 if _is_ipv6(packet) else ETHERTYPE_IPV4
    return (bytes([VXLAN_FLAG_I, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\x00"
            + dst_mac + src_mac + ethertype.to_bytes(2, "big") + packet)


def vxlan_egress(packet: bytes, routes: Mapping[int, VxlanRoute], subnet_len: int,
                 tun_addr: int, vtep: Vtep, v6: Ipv6Routes | None = None) -> Result:
    """VXLAN mode: process a packet read from the TUN: the frame for its peer, or why not.
    IPv6 (with `v6`, routes to VxlanRoutes): as a flannel-v6 device sends it, from our IPv6
    VtepMAC to the peer's, the hop limit left alone."""
    if v6 is not None and _is_ipv6(packet):
        routed6 = _route6(packet, v6, check_hop_limit=False)
        if isinstance(routed6, Result):
            return routed6
        packet, route6 = routed6
        assert isinstance(route6, VxlanRoute)
        flow = flow_hash(packet)
        if isinstance(route6.peer, ipaddress.IPv6Address):
            sender = vtep.senders + sender_index(flow, vtep.senders6)
        else:
            sender = sender_index(flow, vtep.senders)
        return Result(Action.SEND, vxlan_encap(packet, vtep.vni, route6.mac, vtep.ipv6_mac),
                      route6.peer, sender=sender)
    routed = _route(packet, routes, subnet_len, tun_addr, check_ttl=False)
    if isinstance(routed, Result):
        return routed
    packet, route = routed
    return Result(Action.SEND, vxlan_encap(packet, vtep.vni, route.mac, vtep.mac), route.peer,
                  sender=sender_index(flow_hash(packet), vtep.senders))


def vxlan_ingress(datagram: bytes, vtep: Vtep, sender: Sender | None = None,
                  v6: Ipv6Routes | None = None) -> Result:
    """VXLAN mode: process a datagram from a peer: the inner packet for the TUN, or why not;
    with `sender`, only if it comes from a lease holder and from inside its subnet. With `v6`,
    an IPv6 frame (ethertype 0x86DD) must be addressed to our IPv6 VtepMAC."""
    if _unknown(sender):
        return Result(Action.DROP, drop=Drop.UNKNOWN_SENDER)
    if len(datagram) < VXLAN_ENCAP_LEN:
        return Result(Action.DROP, drop=Drop.VXLAN_SHORT)
    eth = VXLAN_HEADER_LEN  # where the inner Ethernet header begins
    if not datagram[VXLAN_FLAGS_OFFSET] & VXLAN_FLAG_I:
        return Result(Action.DROP, drop=Drop.VXLAN_BAD_FLAGS)
    if _u32(datagram, VXLAN_VNI_OFFSET) >> 8 != vtep.vni:
        return Result(Action.DROP, drop=Drop.VXLAN_WRONG_VNI)
    ethertype = _u16(datagram, eth + ETHERNET_TYPE_OFFSET)
    ipv6 = v6 is not None and ethertype == ETHERTYPE_IPV6
    ours = vtep.ipv6_mac if ipv6 else vtep.mac
    if datagram[eth + ETHERNET_DST_OFFSET : eth + ETHERNET_DST_OFFSET + 6] != ours:
        return Result(Action.DROP, drop=Drop.VXLAN_WRONG_MAC)
    if ethertype != ETHERTYPE_IPV4 and not ipv6:
        return Result(Action.DROP, drop=Drop.VXLAN_NOT_IPV4)
    inner = datagram[VXLAN_ENCAP_LEN:]
    packet, drop = _validate6(inner) if ipv6 else _validate(inner)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if _spoofed(packet, sender):
        return Result(Action.DROP, drop=Drop.SPOOFED_INNER_SOURCE)
    # Kernel VXLAN senders on one host (over a veth) leave inner checksums partial; flannel's
    # udp senders never do, so UDP mode takes no chance on it.
    return Result(Action.TUN, packet, csum_at=partial_checksum_at(packet))


# --- Offloads: the virtio_net_hdr of a TUN opened with IFF_VNET_HDR ---------------------------

VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start/offset
VNET_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 0, 1, 4, 5
GSO_ECN = 0x80
TSO_MAX_SEGS = 256
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80
ZERO_VNET_HDR = bytes(VNET_HDR.size)


def _ones_sum(*parts: bytes | int) -> int:
    """Ones' complement sum, folded to 16 bits and not inverted, of byte strings (as big-endian
    16-bit words, odd length zero-padded) and of already folded 16-bit values."""
    total = 0
    for part in parts:
        if isinstance(part, int):
            total += part
            continue
        if len(part) % 2:
            part += b"\x00"
        total += sum(int.from_bytes(part[i : i + 2], "big") for i in range(0, len(part), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _pseudo_sum(packet: bytes, proto: int, l4_len: int) -> int:
    """Folded sum of the IPv4 (or IPv6, RFC 8200 8.1) pseudo-header for `packet`'s L4 part of
    `l4_len` bytes."""
    if _is_ipv6(packet):
        return _ones_sum(packet[IPV6_SRC_OFFSET : IPV6_DST_OFFSET + IPV6_ADDR_LEN],
                         l4_len >> 16, l4_len & 0xFFFF, proto)
    return _ones_sum(packet[IPV4_SRC_OFFSET : IPV4_DST_OFFSET + IPV4_ADDR_LEN], proto, l4_len)


def _with_ip_checksum(header: bytes) -> bytes:
    out = bytearray(header)
    out[IPV4_CSUM_OFFSET : IPV4_CSUM_OFFSET + 2] = b"\x00\x00"
    out[IPV4_CSUM_OFFSET : IPV4_CSUM_OFFSET + 2] = checksum(bytes(out)).to_bytes(2, "big")
    return bytes(out)


def segment_tso(vnet_hdr: bytes, packet: bytes) -> tuple[Drop | None, list[bytes]]:
    """Split a valid IP packet read from a TUN behind `vnet_hdr` as the fast path does:
    (None, segments) or (Drop.BAD_GSO, []).

    No GSO: the packet itself, its partial checksum completed if NEEDS_CSUM (0 sent as 0xFFFF).
    TCPV4/UDP_L4: segments of gso_size payload bytes (the last shorter), headers recomputed from
    the packet (hdr_len of the virtio header is not trusted): total length, IP id + i, header
    checksum; TCP seq advanced, FIN/PSH kept on the last segment only and CWR on the first
    only; UDP length; complete L4 checksums. IPv6 (TCPV6/UDP_L4): the same with the payload
    length, and TCP or UDP right behind the fixed header (extension headers are refused).
    """
    flags, gso_type, _hdr_len, mss, csum_start, csum_offset = VNET_HDR.unpack(vnet_hdr)
    gso_type &= ~GSO_ECN
    if gso_type == GSO_NONE:
        if flags & VNET_F_NEEDS_CSUM:
            at = csum_start + csum_offset
            if at + 2 > len(packet):
                return Drop.BAD_GSO, []
            packet = complete_checksum(packet, csum_start, at)
        return None, [packet]
    v6 = _is_ipv6(packet)
    ihl = _l3_header_len(packet)
    proto = _l4_proto(packet)
    if mss == 0 or (not v6 and _u16(packet, IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK):
        return Drop.BAD_GSO, []
    tcp = gso_type == (GSO_TCPV6 if v6 else GSO_TCPV4)
    if tcp:
        if proto != PROTO_TCP or ihl + TCP_HEADER_LEN > len(packet):
            return Drop.BAD_GSO, []
        l4_len = _tcp_header_len(packet, ihl)
        if l4_len < TCP_HEADER_LEN or ihl + l4_len > len(packet):
            return Drop.BAD_GSO, []
    elif gso_type == GSO_UDP_L4:
        if proto != PROTO_UDP or ihl + UDP_HEADER_LEN > len(packet):
            return Drop.BAD_GSO, []
        l4_len = UDP_HEADER_LEN
    else:
        return Drop.BAD_GSO, []
    hdr_len = ihl + l4_len
    payload = packet[hdr_len:]
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [b""]
    if len(chunks) > TSO_MAX_SEGS:
        return Drop.BAD_GSO, []
    ip_id = _u16(packet, IPV4_ID_OFFSET)
    total_at, id_at = IPV4_TOTAL_LEN_OFFSET, IPV4_ID_OFFSET
    payload_at = IPV6_PAYLOAD_LEN_OFFSET
    seq_at, flags_at, tcp_csum_at = TCP_SEQ_OFFSET, TCP_FLAGS_OFFSET, TCP_CSUM_OFFSET
    len_at, udp_csum_at = UDP_LEN_OFFSET, UDP_CSUM_OFFSET
    segments = []
    for i, chunk in enumerate(chunks):
        total = hdr_len + len(chunk)
        ip = bytearray(packet[:ihl])
        if v6:
            ip[payload_at : payload_at + 2] = (total - IPV6_HEADER_LEN).to_bytes(2, "big")
        else:
            ip[total_at : total_at + 2] = total.to_bytes(2, "big")
            ip[id_at : id_at + 2] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            ip = bytearray(_with_ip_checksum(bytes(ip)))
        l4 = bytearray(packet[ihl:hdr_len])
        if tcp:
            seq = (_u32(l4, seq_at) + i * mss) & 0xFFFFFFFF
            l4[seq_at : seq_at + 4] = seq.to_bytes(4, "big")
            if i + 1 < len(chunks):
                l4[flags_at] &= ~(TCP_FIN | TCP_PSH) & 0xFF
            if i:
                l4[flags_at] &= ~TCP_CWR & 0xFF
            l4[tcp_csum_at : tcp_csum_at + 2] = b"\x00\x00"
            value = ~_ones_sum(_pseudo_sum(bytes(ip), PROTO_TCP, total - ihl), bytes(l4), chunk)
            l4[tcp_csum_at : tcp_csum_at + 2] = (value & 0xFFFF).to_bytes(2, "big")
        else:
            l4[len_at : len_at + 2] = (total - ihl).to_bytes(2, "big")
            l4[udp_csum_at : udp_csum_at + 2] = b"\x00\x00"
            value = ~_ones_sum(_pseudo_sum(bytes(ip), PROTO_UDP, total - ihl), bytes(l4), chunk)
            l4[udp_csum_at : udp_csum_at + 2] = ((value & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
        segments.append(bytes(ip) + bytes(l4) + chunk)
    return None, segments


def partial_checksum_at(packet: bytes) -> int:
    """Where the TCP/UDP checksum of a validated packet is if the field holds the folded
    pseudo-header sum, the mark of a sender's partial checksum (CHECKSUM_PARTIAL: what a kernel
    sender whose device offloads checksums leaves, e.g. a VXLAN device over a veth), else 0.

    A packet with this mark is completed (``complete_checksum``), never dropped: a partial one
    becomes right, and a complete one whose checksum equals that sum by chance (1 in 65536) is
    left as it was. One whose checksum is wrong otherwise keeps it, for the kernel to drop.
    IPv6: TCP or UDP right behind the fixed header, the IPv6 pseudo-header."""
    if _is_ipv6(packet):
        header_len, proto = IPV6_HEADER_LEN, packet[IPV6_NEXT_HEADER_OFFSET]
    else:
        header_len = _ipv4_header_len(packet)
        if _u16(packet, IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK:
            return 0  # a fragment: the kernel completes checksums before it fragments
        proto = packet[IPV4_PROTO_OFFSET]
    if proto == PROTO_TCP and header_len + TCP_HEADER_LEN <= len(packet):
        at = header_len + TCP_CSUM_OFFSET
    elif proto == PROTO_UDP and header_len + UDP_HEADER_LEN <= len(packet):
        at = header_len + UDP_CSUM_OFFSET
    else:
        return 0
    pseudo = _pseudo_sum(packet, proto, len(packet) - header_len)
    return at if _u16(packet, at) == pseudo else 0


def complete_checksum(packet: bytes, start: int, at: int) -> bytes:
    """`packet` with the partial checksum at `at` completed, its L4 part from `start` (the
    field holds the pseudo-header sum; 0 is sent as 0xFFFF)."""
    value = ~_ones_sum(packet[start:]) & 0xFFFF or 0xFFFF
    return packet[:at] + value.to_bytes(2, "big") + packet[at + 2 :]


def _super_segment(packet: bytes, mtu: int, gro_size: int) -> int:
    """Payload per segment if a packet with a partial checksum is a sender's unsplit
    super-packet (a veth hands GSO frames on whole), else 0: TCP longer than the TUN's `mtu`
    (cut to fit it: the sender's MSS is not passed on), UDP with more payload than the UDP_GRO
    segment size its datagram came with (UDP datagrams keep their bounds). IPv4 or IPv6 (a
    partial checksum there is TCP's or UDP's right behind the fixed header)."""
    header_len = _l3_header_len(packet)
    if _l4_proto(packet) == PROTO_UDP:
        return gro_size if gro_size and len(packet) - header_len - UDP_HEADER_LEN > gro_size else 0
    if not mtu or len(packet) <= mtu:
        return 0
    l4_len = _tcp_header_len(packet, header_len)
    return mtu - header_len - l4_len if header_len + l4_len < mtu else 1


def _tcp_candidate(packet: bytes, partial: bool = False) -> int:
    """IP + TCP header length if a valid packet may join a coalesced run, else 0: IPv4 without
    options, no fragment, TCP with payload, flags ACK or ACK|PSH, both checksums right (a
    `partial` TCP checksum has nothing to verify: the merged one is completed from the data).
    IPv6: TCP right behind the fixed header, no IP checksum to check."""
    if _is_ipv6(packet):
        n, tcp = len(packet), IPV6_HEADER_LEN
        if n < IPV6_HEADER_LEN + TCP_HEADER_LEN or packet[IPV6_NEXT_HEADER_OFFSET] != PROTO_TCP:
            return 0
        tcp_len = _tcp_header_len(packet, tcp)
        if tcp_len < TCP_HEADER_LEN or tcp + tcp_len >= n \
                or packet[tcp + TCP_FLAGS_OFFSET] not in (TCP_ACK, TCP_ACK | TCP_PSH):
            return 0
        if not partial and _ones_sum(_pseudo_sum(packet, PROTO_TCP, n - tcp),
                                     packet[tcp:]) != 0xFFFF:
            return 0
        return tcp + tcp_len
    n, tcp = len(packet), IPV4_HEADER_LEN  # if it qualifies: no IP options
    if n < IPV4_HEADER_LEN + TCP_HEADER_LEN \
            or packet[IPV4_VER_IHL_OFFSET] != IPV4_VER_IHL_NO_OPTIONS \
            or packet[IPV4_PROTO_OFFSET] != PROTO_TCP:
        return 0
    if _u16(packet, IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK:
        return 0
    tcp_len = _tcp_header_len(packet, tcp)
    if tcp_len < TCP_HEADER_LEN or tcp + tcp_len >= n \
            or packet[tcp + TCP_FLAGS_OFFSET] not in (TCP_ACK, TCP_ACK | TCP_PSH):
        return 0
    if checksum(packet[:IPV4_HEADER_LEN]) != 0:
        return 0
    if not partial and _ones_sum(_pseudo_sum(packet, PROTO_TCP, n - tcp), packet[tcp:]) != 0xFFFF:
        return 0
    return tcp + tcp_len


def _run_flags(packet: bytes) -> int:
    """Where the TCP flags of a segment that may be coalesced are (no IP options)."""
    return _l3_header_len(packet) + TCP_FLAGS_OFFSET


class TunWrites(NamedTuple):
    """What ingress writes to the TUN for the packets of one received buffer."""

    frames: list[tuple[bytes, bytes]]  # (virtio header, or b"" on a plain TUN; packet)
    csum_completed: int  # packets that came with a partial checksum
    bad_gso: int  # super-packets that could not be split (dropped)


def _plain_header(packet: bytes, csum_at: int) -> bytes:
    """The virtio header of a packet written as it is: zeroed, or NEEDS_CSUM for its partial
    checksum at `csum_at`."""
    if not csum_at:
        return ZERO_VNET_HDR
    header_len = _l3_header_len(packet)
    return VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_NONE, csum_at + 2, 0, header_len,
                         csum_at - header_len)


def _super_frames(packet: bytes, csum_at: int, mss: int,
                  vnet: bool) -> list[tuple[bytes, bytes]] | None:
    """The frames of a super-packet cut into `mss` payloads (None: it can't be): TCP to a
    virtio-header TUN whole behind a GSO header (TCPV4, TCPV6), else its segments with complete
    checksums."""
    header_len = _l3_header_len(packet)
    tcp = _l4_proto(packet) == PROTO_TCP
    l4_len = _tcp_header_len(packet, header_len) if tcp else UDP_HEADER_LEN
    gso_tcp = GSO_TCPV6 if _is_ipv6(packet) else GSO_TCPV4
    header = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso_tcp if tcp else GSO_UDP_L4,
                           header_len + l4_len, mss & 0xFFFF, header_len, csum_at - header_len)
    drop, segments = segment_tso(header, packet)
    if mss > 0xFFFF or drop is not None:
        return None
    if vnet and tcp:
        return [(header, packet)]
    return [(ZERO_VNET_HDR if vnet else b"", seg) for seg in segments]


def tun_writes(packets: list[bytes], *, vnet: bool = True, complete_partial: bool = False,
               mtu: int = 0, gro_size: int = 0) -> TunWrites:
    """What ingress writes to the TUN (with a virtio header if `vnet`) for valid IP packets
    received back to back.

    On a virtio-header TUN, consecutive TCP segments of one flow (same TOS, IP flags, TTL,
    addresses, ports, ACK, window, options; each starting at the previous one's end; none
    carrying more payload than the first) become one packet: the first one's headers with the
    new total length, a fresh header checksum, PSH if the last had it, the pseudo-header sum in
    the TCP checksum field, behind a TCPV4 GSO header (NEEDS_CSUM, gso_size = the first one's
    payload); IPv6 ones (same traffic class, flow label, next header, hop limit, addresses...)
    with the new payload length behind a TCPV6 one. A PSH or a shorter segment ends a run.
    Everything else, and a run of one, goes as it came behind a zeroed header.

    `complete_partial` (VXLAN mode): a packet whose checksum is partial
    (`partial_checksum_at`) is counted; it goes behind a NEEDS_CSUM header (the kernel
    completes it), to a plain TUN completed, may join a run without its checksum verified,
    and if it is a super-packet (`_super_segment`, with the TUN's `mtu` and the datagram's
    `gro_size`) is cut into segments (`_super_frames`), or dropped as bad_gso if it can't be.
    """
    out: list[tuple[bytes, bytes]] = []
    run: list[bytes] = []  # the segments of the open run
    run_csum_at = 0  # of its first segment
    hdr_len = 0
    closed = False
    completed = bad_gso = 0

    def flush() -> None:
        if not run:
            return
        if len(run) == 1:
            out.append((_plain_header(run[0], run_csum_at), run[0]))
        else:
            head = bytearray(run[0])
            l3 = _l3_header_len(run[0])
            for seg in run[1:]:
                head += seg[hdr_len:]
            head[l3 + TCP_FLAGS_OFFSET] |= run[-1][l3 + TCP_FLAGS_OFFSET] & TCP_PSH
            if l3 == IPV6_HEADER_LEN:
                at = IPV6_PAYLOAD_LEN_OFFSET
                head[at : at + 2] = (len(head) - l3).to_bytes(2, "big")
                gso_type = GSO_TCPV6
            else:
                at = IPV4_TOTAL_LEN_OFFSET
                head[at : at + 2] = len(head).to_bytes(2, "big")
                head[:l3] = _with_ip_checksum(bytes(head[:l3]))
                gso_type = GSO_TCPV4
            pseudo = _pseudo_sum(bytes(head), PROTO_TCP, len(head) - l3)
            head[l3 + TCP_CSUM_OFFSET : l3 + TCP_CSUM_OFFSET + 2] = pseudo.to_bytes(2, "big")
            header = VNET_HDR.pack(VNET_F_NEEDS_CSUM, gso_type, hdr_len,
                                   len(run[0]) - hdr_len, l3, TCP_CSUM_OFFSET)
            out.append((header, bytes(head)))
        run.clear()

    for packet in packets:
        csum_at = partial_checksum_at(packet) if complete_partial else 0
        if csum_at:
            completed += 1
            mss = _super_segment(packet, mtu, gro_size)
            if mss:
                flush()
                frames = _super_frames(packet, csum_at, mss, vnet)
                if frames is None:
                    bad_gso += 1
                else:
                    out += frames
                continue
            if not vnet:
                packet, csum_at = complete_checksum(packet, _l3_header_len(packet), csum_at), 0
        length = _tcp_candidate(packet, partial=bool(csum_at)) if vnet else 0
        if length and run and not closed and _continues(run, hdr_len, packet, length):
            run.append(packet)
            closed = bool(packet[_run_flags(packet)] & TCP_PSH) or (
                len(packet) - length < len(run[0]) - hdr_len)
            continue
        flush()
        if not length:
            out.append((_plain_header(packet, csum_at) if vnet else b"", packet))
            continue
        run.append(packet)
        run_csum_at = csum_at
        hdr_len = length
        closed = bool(packet[_run_flags(packet)] & TCP_PSH)
    flush()
    return TunWrites(out, completed, bad_gso)


def _continues(run: list[bytes], hdr_len: int, packet: bytes, length: int) -> bool:
    """Whether candidate `packet` (headers of `length` bytes) extends the open `run`."""
    head = run[0]
    payload = len(packet) - length
    run_len = hdr_len + sum(len(seg) - hdr_len for seg in run)
    last = run[-1]
    tcp = _l3_header_len(head)  # candidates have no IP options
    if _is_ipv6(packet) != _is_ipv6(head):
        return False
    next_seq = (_u32(last, tcp + TCP_SEQ_OFFSET) + len(last) - hdr_len) & 0xFFFFFFFF

    def same(start: int, end: int) -> bool:
        return packet[start:end] == head[start:end]

    return (
        length == hdr_len
        and payload <= len(head) - hdr_len
        and run_len + payload <= 0xFFFF
        and _u32(packet, tcp + TCP_SEQ_OFFSET) == next_seq
        and (
            # traffic class and flow label; next header, hop limit, the addresses, the ports
            same(0, IPV6_PAYLOAD_LEN_OFFSET) and same(IPV6_NEXT_HEADER_OFFSET, tcp + L4_PORTS_LEN)
            if tcp == IPV6_HEADER_LEN else
            packet[IPV4_TOS_OFFSET] == head[IPV4_TOS_OFFSET]
            # flags and fragment offset, TTL, protocol; the addresses and (no options) the ports
            and same(IPV4_FLAGS_OFFSET, IPV4_CSUM_OFFSET)
            and same(IPV4_SRC_OFFSET, tcp + L4_PORTS_LEN))
        # the ACK number and the data offset; the flags but PSH; the window; the options
        and same(tcp + TCP_ACK_SEQ_OFFSET, tcp + TCP_FLAGS_OFFSET)
        and packet[tcp + TCP_FLAGS_OFFSET] & ~TCP_PSH == head[tcp + TCP_FLAGS_OFFSET]
        and same(tcp + TCP_WINDOW_OFFSET, tcp + TCP_WINDOW_OFFSET + 2)
        and same(tcp + TCP_OPTIONS_OFFSET, hdr_len)
    )
