"""Crafted and mutated datagrams for the fuzz and spoofing tests: the generators (imported by the
tests) and a sender run inside a test namespace (`python tests/netfuzz.py ...`).

The sender precomputes a pool of mutated datagrams and cycles through it, so that Python's time
goes to `sendto` (some 100-200k datagrams/s) rather than to making them. Every run is
reproducible from its seed.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import time

from flannel_udp.packet import checksum

IP_HDRINCL = 3
VXLAN_FLAG_I = 0x08
ETHERTYPE_IPV4 = 0x0800


def ipv4(src: str, dst: str, proto: int = 17, payload: bytes = b"", ttl: int = 64,
         options: bytes = b"", frag: int = 0, ident: int = 1) -> bytes:
    """An IPv4 packet with a correct header checksum; `options` padded to 4-byte words."""
    options += b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, frag,
                         ttl, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)) + options
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def udp_packet(src: str, dst: str, dport: int, payload: bytes, sport: int = 40000,
               **kw: object) -> bytes:
    """An IPv4/UDP packet (UDP checksum 0: none, valid for IPv4)."""
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload,
                **kw)


def vxlan_frame(inner: bytes, vni: int, dst_mac: bytes, src_mac: bytes = b"\x02" * 6,
                flags: int = VXLAN_FLAG_I, ethertype: int = ETHERTYPE_IPV4) -> bytes:
    return (bytes([flags, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0" + dst_mac + src_mac
            + ethertype.to_bytes(2, "big") + inner)


def base_packets(rng: random.Random, src_net: str, dst_net: str) -> list[bytes]:
    """Well-formed and nearly well-formed IPv4 packets from `src_net` to `dst_net` (two /24
    prefixes as 'a.b.c'): UDP, TCP, ICMP, other protocols, IP options, fragments, TTL 0/1."""
    packets = []
    for _ in range(64):
        src = f"{src_net}.{rng.randrange(256)}"
        dst = f"{dst_net}.{rng.randrange(256)}"
        payload = rng.randbytes(rng.choice([0, 1, 8, 40, 200, 1200]))
        kind = rng.randrange(7)
        if kind == 0:
            packets.append(udp_packet(src, dst, rng.randrange(65536), payload))
        elif kind == 1:
            packets.append(ipv4(src, dst, 6, rng.randbytes(20) + payload))
        elif kind == 2:
            packets.append(ipv4(src, dst, 1, bytes([8, 0, 0, 0]) + rng.randbytes(4) + payload))
        elif kind == 3:  # options: NOPs, a record-route, an end-of-list, random bytes
            options = rng.choice([b"\x01" * 4, b"\x07\x07\x04" + bytes(4),
                                  b"\x00" * 4, rng.randbytes(rng.choice([4, 8, 40]))])
            packets.append(ipv4(src, dst, rng.randrange(256), payload, options=options))
        elif kind == 4:  # fragments: first (MF), middle, last, DF
            frag = rng.choice([0x2000, 0x2000 | rng.randrange(1, 0x1FFF), rng.randrange(1, 0x1FFF),
                               0x4000])
            packets.append(ipv4(src, dst, rng.choice([1, 6, 17]), payload, frag=frag))
        elif kind == 5:
            packets.append(udp_packet(src, dst, 9, payload, ttl=rng.choice([0, 1, 2])))
        else:
            packets.append(ipv4(src, dst, rng.randrange(256), payload))
    return packets


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random mutation: truncate, flip bits, overwrite a header field, append garbage,
    replace the version, or random bytes altogether; sometimes none."""
    kind = rng.randrange(9)
    if kind == 0 or not data:
        return rng.randbytes(rng.choice([0, 1, 7, 19, 20, 21, 28, 60, 300]))
    if kind == 1:
        return data[:rng.randrange(len(data))]
    if kind == 2:
        out = bytearray(data)
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 3:  # a header byte set to an extreme: IHL, lengths, TTL, flags...
        out = bytearray(data)
        i = rng.randrange(min(len(out), 60))
        out[i] = rng.choice([0, 0xFF, 0x0F, 0xF0, rng.randrange(256)])
        return bytes(out)
    if kind == 4:
        return data + rng.randbytes(rng.randrange(1, 64))
    if kind == 5:  # another IP version (6, 0, 15) with the rest as it was
        return bytes([(rng.choice([0, 6, 15]) << 4) | (data[0] & 0x0F)]) + data[1:]
    if kind == 6 and len(data) >= 4:  # total length beyond or below what is there
        total = rng.choice([0, 19, len(data) + 1, 0xFFFF, rng.randrange(65536)])
        return data[:2] + total.to_bytes(2, "big") + data[4:]
    return data


def ipv6(src: str, dst: str, next_header: int = 17, payload: bytes = b"",
         hop_limit: int = 64) -> bytes:
    """An IPv6 packet (no checksum to fill in: IPv6 has none)."""
    return (struct.pack("!IHBB", 0x60000000, len(payload), next_header, hop_limit)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + payload)


def base_packets6(rng: random.Random, src_net: str, dst_net: str) -> list[bytes]:
    """Well-formed and nearly well-formed IPv6 packets from `src_net` to `dst_net` (two /64
    prefixes as 'a:b:c:d'): UDP, TCP, ICMPv6, extension headers (hop-by-hop, fragments), other
    next headers, hop limit 0/1/2, jumbo-style payload length 0."""
    packets = []
    for _ in range(64):
        src = f"{src_net}::{rng.randrange(1, 0xFFFF):x}"
        dst = f"{dst_net}::{rng.randrange(1, 0xFFFF):x}"
        payload = rng.randbytes(rng.choice([0, 1, 8, 40, 200, 1200]))
        kind = rng.randrange(7)
        if kind == 0:
            packets.append(ipv6(src, dst, 17, struct.pack("!HHHH", 40000, 9, 8 + len(payload),
                                                         0) + payload))
        elif kind == 1:
            packets.append(ipv6(src, dst, 6, rng.randbytes(20) + payload))
        elif kind == 2:
            packets.append(ipv6(src, dst, 58, bytes([rng.choice([1, 2, 128, 135])]) + bytes(7)
                                + payload))
        elif kind == 3:  # a fragment header: first, middle, last
            frag = rng.choice([1, rng.randrange(1, 0x1FFF) << 3 | 1, rng.randrange(1, 0x1FFF) << 3])
            packets.append(ipv6(src, dst, 44, struct.pack("!BBHI", 17, 0, frag, 7) + payload))
        elif kind == 4:  # hop-by-hop options, then UDP
            packets.append(ipv6(src, dst, 0, bytes([17, 0]) + bytes(6) + bytes(8) + payload))
        elif kind == 5:
            packets.append(ipv6(src, dst, 17, bytes(8) + payload,
                                hop_limit=rng.choice([0, 1, 2])))
        else:
            packets.append(ipv6(src, dst, rng.randrange(256), payload))
    return packets


def udp6_pool(seed: int, size: int, src_net: str, dst_net: str) -> list[bytes]:
    """Mutated IPv6 packets as datagrams of the udp backend over an IPv6 underlay."""
    rng = random.Random(seed)
    bases = base_packets6(rng, src_net, dst_net)
    return [mutate(rng, rng.choice(bases)) for _ in range(size)]


def udp_pool(seed: int, size: int, src_net: str, dst_net: str) -> list[bytes]:
    rng = random.Random(seed)
    bases = base_packets(rng, src_net, dst_net)
    return [mutate(rng, rng.choice(bases)) for _ in range(size)]


def vxlan_pool(seed: int, size: int, src_net: str, dst_net: str, vni: int,
               mac: bytes, ipv6: bool = False) -> list[bytes]:
    """Frames with the right header around mutated packets, and frames whose VXLAN or
    Ethernet header is wrong (flags, VNI, MAC, ethertype) or mutated as a whole. `ipv6`: IPv6
    packets in 0x86DD frames, as a flannel-v6 device sends them (`mac`: the IPv6 VtepMAC)."""
    rng = random.Random(seed)
    bases = (base_packets6 if ipv6 else base_packets)(rng, src_net, dst_net)
    ethertype, others = (0x86DD, [0x0800, 0x0806, 0]) if ipv6 else (0x0800, [0x86DD, 0x0806, 0])
    pool = []
    for _ in range(size):
        inner = mutate(rng, rng.choice(bases))
        kind = rng.randrange(6)
        if kind == 0:
            frame = vxlan_frame(inner, vni, mac, flags=rng.choice([0, 0x80, 0xF7]),
                                ethertype=ethertype)
        elif kind == 1:
            frame = vxlan_frame(inner, rng.choice([0, vni + 1, 0xFFFFFF]), mac,
                                ethertype=ethertype)
        elif kind == 2:
            frame = vxlan_frame(inner, vni, rng.randbytes(6), ethertype=ethertype)
        elif kind == 3:
            frame = vxlan_frame(inner, vni, mac, ethertype=rng.choice(others))
        elif kind == 4:
            frame = mutate(rng, vxlan_frame(inner, vni, mac, ethertype=ethertype))
        else:
            frame = vxlan_frame(inner, vni, mac, ethertype=ethertype)
        pool.append(frame)
    return pool


def tun_pool(seed: int, size: int, src: str, dst_nets: list[str]) -> list[tuple[bytes, str]]:
    """(IPv4 header and payload, where to route it) for a raw IP_HDRINCL socket on the host:
    the kernel routes by the address given to sendto (inside the Network, so through the TUN)
    and fixes only total length and header checksum, so header fields, options, fragments,
    versions and destinations (in the packet) stay as crafted. Sources are `src` only, so that
    the answers our ICMP errors make are local and never come back through the TUN."""
    rng = random.Random(seed)
    pool = []
    for _ in range(size):
        net = rng.choice(dst_nets)
        route_via = f"{net}.{rng.randrange(1, 255)}"
        packet = ipv4(src, rng.choice([route_via, f"{rng.choice(dst_nets)}.7",
                                       f"172.16.{rng.randrange(256)}.1"]),
                      rng.choice([1, 6, 17, 47, rng.randrange(256)]),
                      rng.randbytes(rng.choice([0, 8, 100, 1000])),
                      ttl=rng.choice([0, 1, 2, 64]),
                      options=rng.choice([b"", b"\x01" * 4, rng.randbytes(8)]),
                      frag=rng.choice([0, 0, 0x2000, 0x20, 0x4000]))
        mutated = mutate(rng, packet)
        if len(mutated) < 20:  # the kernel refuses a raw IP header shorter than 20 bytes
            mutated = packet
        # The source stays ours even when a mutation hit it (see above).
        mutated = mutated[:12] + socket.inet_aton(src) + mutated[16:]
        # IHL beyond the packet is refused too (EINVAL): keep such mutations rare
        if (mutated[0] & 0x0F) * 4 > len(mutated):
            mutated = packet
        pool.append((mutated, route_via))
    return pool


def send_loop(sock: socket.socket, pool: list[tuple[bytes, tuple[str, int]]],
              count: int) -> dict[str, float]:
    sent = errors = 0
    started = time.monotonic()
    n = len(pool)
    for i in range(count):
        data, address = pool[i % n]
        try:
            sock.sendto(data, address)
            sent += 1
        except OSError:  # e.g. ENOBUFS, or EINVAL for a raw header the kernel refuses
            errors += 1
    return {"sent": sent, "errors": errors, "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="send crafted datagrams from a namespace")
    parser.add_argument("kind", choices=["udp", "udp6", "vxlan", "vxlan6", "tun", "hex"])
    parser.add_argument("--to", default="", help="peer address (udp, vxlan, hex)")
    parser.add_argument("--port", type=int, default=8285)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pool", type=int, default=8192)
    parser.add_argument("--src-net", default="",
                        help="'a.b.c' of the inner sources (udp6, vxlan6: 'a:b:c:d', over IPv6)")
    parser.add_argument("--dst-net", default="", help="'a.b.c' of the inner destinations")
    parser.add_argument("--dst-nets", default="", help="tun: comma-separated 'a.b.c' prefixes")
    parser.add_argument("--src", default="", help="tun: the inner source")
    parser.add_argument("--vni", type=int, default=1)
    parser.add_argument("--mac", default="", help="vxlan: the receiver's VtepMAC")
    parser.add_argument("datagrams", nargs="*", help="hex: the datagrams to send")
    args = parser.parse_intermixed_args(argv)
    if args.kind == "tun":
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.IPPROTO_IP, IP_HDRINCL, 1)
        pool = [(p, (via, 0)) for p, via in
                tun_pool(args.seed, args.pool, args.src, args.dst_nets.split(","))]
    else:
        family = socket.AF_INET6 if args.kind in ("udp6", "vxlan6") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        address = (args.to, args.port)
        if args.kind == "udp6":
            datagrams = udp6_pool(args.seed, args.pool, args.src_net, args.dst_net)
        elif args.kind == "udp":
            datagrams = udp_pool(args.seed, args.pool, args.src_net, args.dst_net)
        elif args.kind in ("vxlan", "vxlan6"):
            datagrams = vxlan_pool(args.seed, args.pool, args.src_net, args.dst_net, args.vni,
                                   bytes.fromhex(args.mac.replace(":", "")),
                                   ipv6=args.kind == "vxlan6")
        else:
            datagrams = [bytes.fromhex(d) for d in args.datagrams]
        pool = [(d, address) for d in datagrams]
    print(json.dumps(send_loop(sock, pool, args.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
