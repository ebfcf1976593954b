"""Plain-Python reference of the UDP backend's per-packet logic.

This module is the oracle for the native fast path in ``_fastpath.pyx``: the property tests feed
the same bytes to both and require identical results, so every rule here (validation order, the
RFC 1624 incremental checksum, the ICMP error layout) must stay byte-for-byte in step with the C
code. Pure functions, no I/O. Addresses are IPv4 host-order ints; packets are ``bytes``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

IPV4_HEADER_LEN = 20
PROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
REPLY_TTL = 64
# RFC 792: an ICMP error quotes the offending header plus the first 64 bits of its payload.
ICMP_QUOTE_PAYLOAD = 8


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


DROP_NAMES: dict[Drop, str] = {d: d.name.lower() for d in Drop}


class Action(enum.IntEnum):
    """What to do with a processed packet."""

    SEND = 0  # data goes to peer (UDP payload)
    TUN = 1  # data goes into the TUN (ingress result)
    REPLY = 2  # data (an ICMP error) goes back into the TUN; the packet itself is dropped
    DROP = 3


@dataclass(frozen=True)
class Result:
    """Outcome of processing one packet; ``peer`` is only set for SEND, ``drop`` for REPLY/DROP."""

    action: Action
    data: bytes = b""
    peer: int = 0
    drop: Drop | None = None


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


def egress(packet: bytes, routes: Mapping[int, int], subnet_len: int, tun_addr: int) -> Result:
    """Process a packet read from the TUN: where it goes (a peer), or why not."""
    packet, drop = _validate(packet)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if packet[8] <= 1:
        return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
    dst = int.from_bytes(packet[16:20], "big")
    peer = routes.get(dst & prefix_mask(subnet_len))
    if peer is not None:
        return Result(Action.SEND, _decrement_ttl(packet), peer)
    fragment_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
    # Never answer an ICMP message with an ICMP error (RFC 1122 3.2.2), and only a first
    # fragment carries the transport header the sender needs to match the error.
    if packet[9] == PROTO_ICMP or fragment_offset:
        return Result(Action.DROP, drop=Drop.NO_ROUTE)
    return Result(Action.REPLY, net_unreachable(packet, tun_addr), drop=Drop.NO_ROUTE)


def ingress(datagram: bytes) -> Result:
    """Process a datagram from a peer (a bare IPv4 packet) bound for the TUN."""
    packet, drop = _validate(datagram)
    if drop is not None:
        return Result(Action.DROP, drop=drop)
    if packet[8] <= 1:
        return Result(Action.DROP, drop=Drop.TTL_EXPIRED)
    return Result(Action.TUN, _decrement_ttl(packet))
