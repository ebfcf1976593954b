"""Capture golden frames: bytes the kernel itself produced, for
tests/fastpath/test_golden_frames.py to hold the C fast path and ``flannel_udp/packet.py`` to
(an oracle neither of them wrote).

Run as root from the repository root (it builds namespaces with the project's harness and
removes them; about 5 s):

    python3 -m tests.golden.capture              # rewrites tests/golden/frames.json
    python3 -m tests.golden.capture --check      # compares a fresh capture with it instead
    python3 -m tests.golden.capture -o FILE      # another file

Three captures, each in namespaces of its own:

- ``vxlan``: host h1's kernel VXLAN device, set up as flanneld sets up ``flannel.<VNI>``
  (nolearning, local = h1's PublicIP, dstport 8472, a permanent neighbour and FDB entry for the
  peer lease's VtepMAC, an onlink route), sends known inner packets to h2, where a UDP socket on
  8472 takes the payload and an AF_PACKET socket on eth0 the outer IPv4 and UDP headers. The
  inner packets are sent from a raw socket on h1, or written into a TUN with IFF_VNET_HDR on h1
  that stands in for a pod whose stack leaves checksums and segmentation to offloads (h1
  forwards them into flannel.<VNI>, TTL - 1): a TCP segment behind a NEEDS_CSUM header and a
  TSO super-packet. Setups: ``udpcsum``, ``noudpcsum``, a 24-bit VNI, each with the underlay
  veth finishing checksums and segmentation in software as a NIC does; and ``udpcsum`` over the
  veth with the offloads it comes with, as nodes-as-containers on one host have it: there the
  kernel hands on the pod's TCP checksum partial and the super-packet whole.
- ``udp``: flannel's udp backend. The IPv4 packet the kernel routes into ``flannel0`` (a TUN
  without IFF_VNET_HDR) is what flanneld's proxy reads; the same packet sent from a pod behind
  the host arrives with the kernel's own forwarding decrement of TTL and header checksum, which
  is what the proxy puts into the UDP datagram (it decrements TTL the same way, RFC 1624).
- ``gso``: TSO/USO super-packets written behind a virtio_net_hdr into a TUN with IFF_VNET_HDR
  and offloads on, forwarded (TTL - 1) out of a veth that segments in software (no TSO, no
  checksum offload), captured with AF_PACKET at the far end (GRO off): the kernel's GSO
  segments.

Every inner packet is crafted here, from fixed IP ids, sequence numbers and payloads, with this
module's own RFC 1071 checksum (not packet.py's); a raw socket (IP_HDRINCL) sends the header as
it is. So every byte is known and a rerun gives the same bytes, but for the outer headers'
VARYING_OUTER bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOLDEN_FILE = Path(__file__).with_name("frames.json")

ETH_P_IP = 0x0800
ETHERNET_HEADER_LEN = 14
PACKET_OUTGOING = 4  # <linux/if_packet.h>: a frame this host sent, seen by its own tap
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
IP_DF = 0x4000
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80
VNET_HDR = struct.Struct("=BBHHHH")  # virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum
VNET_F_NEEDS_CSUM = 1
GSO_TCPV4, GSO_UDP_L4, GSO_ECN = 1, 5, 0x80

VXLAN_PORT = 8472
KERNEL_VTEP_MAC = "0e:11:22:33:44:55"  # the kernel node's flannel.<VNI>
PEER_VTEP_MAC = "0e:66:77:88:99:aa"  # the VtepMAC of the lease it sends to
# A NIC finishes checksums (and, without checksum offload, segmentation) before the wire.
TX_CHECKSUM_OFF = {"tx-checksum-ip-generic": False}
KERNEL_SUBNET, PEER_SUBNET = "10.244.1.0/24", "10.244.2.0/24"
POD, REMOTE_POD = "10.244.1.2", "10.244.2.2"
POD_GATEWAY = "10.244.1.1/24"  # the host side of the pod's veth (FLANNEL_SUBNET)
TUNNEL_ADDR = "10.244.1.0"  # the lease's network address, on flannel.<VNI> / flannel0
NETWORK = "10.244.0.0/16"
UDP_MTU = 1500 - 28  # flannel0

# The outer header bytes (IPv4 header + UDP header, 28 bytes) that differ between runs of the
# vxlan capture, at offsets into that 28-byte string: the IP id (DF is clear, so the kernel
# picks it), the IP header checksum (covers the id), the UDP source port (the kernel's flow hash
# of the inner packet, seeded at boot) and the UDP checksum (covers the port).
VARYING_OUTER = {"ip id": (4, 6), "ip checksum": (10, 12), "udp source port": (20, 22),
                 "udp checksum": (26, 28)}

GSO_DST = "10.244.1.77"  # beyond the veth; its neighbour entry points at a MAC no one has
GSO_SRC = "10.99.0.2"  # behind the TUN
GSO_FAKE_MAC = "02:00:00:00:00:99"


# --- packets, built from scratch ------------------------------------------------------------


def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum, odd length padded with a zero byte (not packet.py's)."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def addr(text: str) -> bytes:
    return socket.inet_aton(text)


def ipv4(payload: bytes, proto: int, src: str, dst: str, *, ident: int, ttl: int = 64,
         tos: int = 0, df: bool = True, options: bytes = b"") -> bytes:
    """An IPv4 packet with a correct header checksum."""
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | (5 + len(options) // 4), tos,
                                   20 + len(options) + len(payload), ident, IP_DF if df else 0,
                                   ttl, proto, 0, addr(src), addr(dst)) + options)
    header[10:12] = inet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def with_ttl(packet: bytes, ttl: int) -> bytes:
    """`packet` with another TTL and its header checksum computed afresh."""
    ihl = (packet[0] & 0x0F) * 4
    header = bytearray(packet[:ihl])
    header[8] = ttl
    header[10:12] = b"\x00\x00"
    header[10:12] = inet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[ihl:]


def pseudo_sum(src: str, dst: str, proto: int, length: int) -> int:
    """The folded, not inverted, sum of the IPv4 pseudo-header: what a partial checksum holds."""
    return ~inet_checksum(addr(src) + addr(dst) + struct.pack("!BBH", 0, proto, length)) & 0xFFFF


def l4_checksum(src: str, dst: str, proto: int, segment: bytes) -> int:
    pseudo = addr(src) + addr(dst) + struct.pack("!BBH", 0, proto, len(segment))
    return inet_checksum(pseudo + segment)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes, *,
        partial: bool = False) -> bytes:
    """A UDP header and payload; `partial`: the pseudo-header sum in the checksum field, as a
    sender that offloads the checksum leaves it."""
    length = 8 + len(payload)
    if partial:
        return struct.pack("!HHHH", sport, dport, length,
                           pseudo_sum(src, dst, PROTO_UDP, length)) + payload
    check = l4_checksum(src, dst, PROTO_UDP, struct.pack("!HHHH", sport, dport, length, 0)
                        + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, check) + payload


def tcp(src: str, dst: str, sport: int, dport: int, payload: bytes, *, seq: int, ack: int,
        flags: int, window: int = 502, options: bytes = b"", partial: bool = False) -> bytes:
    """A TCP header (with `options`) and payload; `partial` as for udp()."""
    def header(check: int) -> bytes:
        return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (5 + len(options) // 4) << 4,
                           flags, window, check, 0) + options
    length = len(header(0)) + len(payload)
    if partial:
        return header(pseudo_sum(src, dst, PROTO_TCP, length)) + payload
    return header(l4_checksum(src, dst, PROTO_TCP, header(0) + payload)) + payload


def icmp_echo(ident: int, seq: int, payload: bytes) -> bytes:
    check = inet_checksum(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload)
    return struct.pack("!BBHHH", 8, 0, check, ident, seq) + payload


def pattern(size: int, seed: int) -> bytes:
    """`size` bytes that are no repetition of a short period (a shifted copy would show)."""
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(size))


TIMESTAMPS = b"\x01\x01\x08\x0a" + bytes.fromhex("0102030405060708")  # NOP NOP TS val ecr
IP_OPTIONS = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL: copied as they are, also when forwarded


def checksum_wraps_id(src: str, dst: str, payload: bytes, proto: int, ttl: int) -> int:
    """An IP id that makes the header checksum 0xFEFF, so that the TTL decrement carries it
    round to 0x0000: the corner of the incremental update (RFC 1624 section 3)."""
    for ident in range(1, 0x10000):
        if ipv4(payload, proto, src, dst, ident=ident, ttl=ttl)[10:12] == b"\xfe\xff":
            return ident
    raise AssertionError("no IP id gives checksum 0xfeff")


def raw_packets(src: str, dst: str) -> list[tuple[str, bytes]]:
    """The crafted inner packets, sent from a raw socket: (name, packet)."""
    tcp_payload = pattern(200, 1)
    wrap_udp = udp(src, dst, 40002, 53, pattern(24, 4))
    return [
        ("icmp-echo", ipv4(icmp_echo(0x4242, 7, pattern(56, 2)), PROTO_ICMP, src, dst,
                           ident=0x1C46)),
        ("udp", ipv4(udp(src, dst, 40001, 53, pattern(100, 3)), PROTO_UDP, src, dst,
                     ident=0x2D57)),
        ("tcp-ect0-timestamps", ipv4(tcp(src, dst, 45678, 5201, tcp_payload, seq=0x11223344,
                                         ack=0x55667788, flags=TCP_ACK | TCP_PSH,
                                         options=TIMESTAMPS),
                                     PROTO_TCP, src, dst, ident=0x3E68, tos=0x02)),
        ("udp-ip-options-odd-length", ipv4(udp(src, dst, 40003, 53, pattern(33, 5)),
                                           PROTO_UDP, src, dst, ident=0x4F79, df=False,
                                           options=IP_OPTIONS)),
        ("udp-checksum-wraps", ipv4(wrap_udp, PROTO_UDP, src, dst,
                                    ident=checksum_wraps_id(src, dst, wrap_udp, PROTO_UDP, 64))),
    ]


def offloaded_tcp(src: str, dst: str) -> bytes:
    """A TCP segment as a pod's stack hands it on when it leaves the checksum to offload: the
    pseudo-header sum in the checksum field."""
    return ipv4(tcp(src, dst, 45679, 5201, pattern(300, 6), seq=0x0BADCAFE, ack=0x12345678,
                    flags=TCP_ACK | TCP_PSH, options=TIMESTAMPS, partial=True),
                PROTO_TCP, src, dst, ident=0x6A8B)


def needs_csum_hdr(packet: bytes) -> bytes:
    """The virtio header of a TCP packet whose checksum is left to the device (no GSO)."""
    return VNET_HDR.pack(VNET_F_NEEDS_CSUM, 0, 0, 0, (packet[0] & 0x0F) * 4, 16)


@dataclass(frozen=True)
class GsoCase:
    name: str
    gso_type: int
    gso_size: int
    packet: bytes  # checksum field partial (the pseudo-header sum), as NEEDS_CSUM wants it

    def vnet_hdr(self) -> bytes:
        ihl = (self.packet[0] & 0x0F) * 4
        proto = self.packet[9]
        l4_len = (self.packet[ihl + 12] >> 4) * 4 if proto == PROTO_TCP else 8
        return VNET_HDR.pack(VNET_F_NEEDS_CSUM, self.gso_type, ihl + l4_len, self.gso_size,
                             ihl, 16 if proto == PROTO_TCP else 6)


def gso_cases() -> list[GsoCase]:
    src, dst = GSO_SRC, GSO_DST

    def tcp_super(payload: bytes, *, flags: int, seq: int, ident: int, options: bytes = b"",
                  df: bool = True, tos: int = 0, ip_options: bytes = b"") -> bytes:
        return ipv4(tcp(src, dst, 5201, 45678, payload, seq=seq, ack=0x0A0B0C0D, flags=flags,
                        options=options, partial=True),
                    PROTO_TCP, src, dst, ident=ident, df=df, tos=tos, options=ip_options)

    return [
        GsoCase("tcp-timestamps-psh-short-last", GSO_TCPV4, 1400,
                tcp_super(pattern(4000, 7), flags=TCP_ACK | TCP_PSH, seq=1_000_000,
                          ident=0x0D80, options=TIMESTAMPS)),
        GsoCase("tcp-fin-exact-multiple", GSO_TCPV4, 1400,
                tcp_super(pattern(2800, 8), flags=TCP_ACK | TCP_PSH | TCP_FIN, seq=77,
                          ident=0x1111)),
        GsoCase("tcp-cwr-ecn", GSO_TCPV4 | GSO_ECN, 1400,
                tcp_super(pattern(3000, 9), flags=TCP_ACK | TCP_CWR, seq=5000, ident=0x2222,
                          tos=0x02)),
        GsoCase("tcp-id-and-seq-wrap-no-df", GSO_TCPV4, 1400,
                tcp_super(pattern(5000, 10), flags=TCP_ACK, seq=0xFFFFF000, ident=0xFFFE,
                          df=False)),
        GsoCase("tcp-ip-options", GSO_TCPV4, 1400,
                tcp_super(pattern(3000, 11), flags=TCP_ACK, seq=123456, ident=0x3333,
                          ip_options=IP_OPTIONS)),
        GsoCase("tcp-mss-536", GSO_TCPV4, 536,
                tcp_super(pattern(2000, 12), flags=TCP_ACK | TCP_PSH, seq=42, ident=0x4444,
                          options=TIMESTAMPS)),
        GsoCase("udp-l4", GSO_UDP_L4, 1400,
                ipv4(udp(src, dst, 5000, 5001, pattern(3500, 13), partial=True), PROTO_UDP,
                     src, dst, ident=0x5555)),
    ]


def vxlan_tso_super(src: str, dst: str) -> GsoCase:
    """A TSO super-packet from a pod through a kernel VXLAN node (TTL 64 as written)."""
    return GsoCase("tcp-tso-super-packet", GSO_TCPV4, 1398,
                   ipv4(tcp(src, dst, 45680, 5201, pattern(4000, 14), seq=0x7FFFFF00,
                            ack=0x0BADF00D, flags=TCP_ACK | TCP_PSH, options=TIMESTAMPS,
                            partial=True), PROTO_TCP, src, dst, ident=0x7C9D))


# --- namespaces and sockets -----------------------------------------------------------------


@contextlib.contextmanager
def inside(ns: Any) -> Iterator[None]:
    """Sockets and devices made in this block belong to namespace `ns` (a harness Netns)."""
    from pyroute2 import netns

    netns.pushns(ns.name)
    try:
        yield
    finally:
        netns.popns()


def packet_socket(dev: str) -> socket.socket:
    """An AF_PACKET socket on `dev` for IPv4 frames (made inside the namespace)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((dev, ETH_P_IP))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def capture_ip(sock: socket.socket, wanted: Callable[[bytes], bool], *, quiet: float = 0.3,
               timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
    """(Ethernet header, IPv4 packet) of the incoming frames on an AF_PACKET socket that
    `wanted` accepts, until `quiet` seconds pass without one once some came; RuntimeError if
    none comes within `timeout`."""
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while True:
        wait = quiet if got else deadline - time.monotonic()
        if wait <= 0 or not select.select([sock], [], [], wait)[0]:
            if got:
                return got
            raise RuntimeError("nothing arrived at the capturing AF_PACKET socket")
        frame, meta = sock.recvfrom(1 << 17)
        packet = frame[ETHERNET_HEADER_LEN:]
        if meta[2] != PACKET_OUTGOING and wanted(packet):
            total = int.from_bytes(packet[2:4], "big")
            got.append((frame[:ETHERNET_HEADER_LEN], packet[:total]))


def to(dst: str) -> Callable[[bytes], bool]:
    """An IPv4 packet to `dst`?"""
    return lambda packet: len(packet) >= 20 and packet[0] >> 4 == 4 and packet[16:20] == addr(dst)


def read_tun(fd: int, dst: str, timeout: float = 5.0) -> bytes:
    """The next IPv4 packet to `dst` read from a TUN fd (no virtio header); others skipped."""
    deadline = time.monotonic() + timeout
    while (wait := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], wait)[0]:
            packet = os.read(fd, 1 << 16)
            if to(dst)(packet):
                return packet
    raise RuntimeError(f"no packet to {dst} came out of the TUN")


def raw_socket() -> socket.socket:
    """IPPROTO_RAW: IP_HDRINCL, the kernel sends our header as it is (it fills in only a zero
    id, a zero source, the total length and the header checksum, all of which we set right)."""
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)


# --- the captures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VxlanSetup:
    name: str
    vni: int
    udp_csum: bool
    complete_frames: bool  # the underlay finishes checksums in software, as a NIC does


VXLAN_SETUPS = [
    VxlanSetup("udpcsum", 1, True, True),
    VxlanSetup("noudpcsum", 1, False, True),
    VxlanSetup("vni-0x123456", 0x123456, True, True),
    VxlanSetup("udpcsum-veth-offloads", 1, True, False),
]


def capture_vxlan() -> list[dict[str, Any]]:
    from flannel_udp.backends.tun import enable_tun_offloads, open_tun
    from flannel_udp.lab import KernelVxlanNode, Topology

    cases = []
    for setup in VXLAN_SETUPS:
        with Topology(2) as topo:
            h1, h2 = topo.host(1), topo.host(2)
            node = KernelVxlanNode(h1, KERNEL_SUBNET, vni=setup.vni, mac=KERNEL_VTEP_MAC,
                                   udp_csum=setup.udp_csum)
            if setup.complete_frames:  # h1's veth checksums and segments, as a NIC does
                h1.set_features("eth0", TX_CHECKSUM_OFF)
            node.add_peer(PEER_SUBNET, h2.underlay_ip, PEER_VTEP_MAC)
            with inside(h2):
                receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                tap = packet_socket("eth0")
            with inside(h1):
                raw = raw_socket()
                # Stands in for a pod whose stack leaves checksums and segmentation to
                # offloads: what it writes, h1 forwards into flannel.<VNI>.
                pod = open_tun("inj0", vnet_hdr=True)
            with receiver, tap, raw, contextlib.closing(pod):
                enable_tun_offloads(pod)
                h1.run("ip", "link", "set", "inj0", "up")
                h1.run("ip", "route", "add", f"{POD}/32", "dev", "inj0")
                receiver.bind(("0.0.0.0", VXLAN_PORT))
                receiver.settimeout(5)
                # (name, packet, virtio header to write it into the pod's TUN behind, or None
                # to send it from the raw socket)
                sends: list[tuple[str, bytes, bytes | None]] = [
                    (name, packet, None) for name, packet in raw_packets(POD, REMOTE_POD)]
                tcp_segment = offloaded_tcp(POD, REMOTE_POD)
                tso = vxlan_tso_super(POD, REMOTE_POD)
                sends += [("tcp-forwarded-needs-csum", tcp_segment, needs_csum_hdr(tcp_segment)),
                          (tso.name, tso.packet, tso.vnet_hdr())]
                for name, packet, vnet_hdr in sends:
                    if vnet_hdr is None:
                        raw.sendto(packet, (REMOTE_POD, 0))
                        how: dict[str, Any] = {"sent_by": "raw socket", "inner": packet}
                    else:
                        os.write(pod.fileno(), vnet_hdr + packet)
                        how = {"sent_by": "tun", "vnet_hdr": vnet_hdr, "written": packet}
                    frames = capture_ip(tap, to(h2.underlay_ip), quiet=0.1)
                    payloads = [receiver.recv(1 << 17) for _ in frames]
                    receiver.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        extra = receiver.recv(1 << 17)
                        raise RuntimeError(f"vxlan {setup.name} {name}: a datagram of "
                                           f"{len(extra)} bytes the tap did not see")
                    receiver.settimeout(5)
                    cases.append({
                        "name": f"{setup.name}/{name}", "vni": setup.vni,
                        "udp_csum": setup.udp_csum, "complete_frames": setup.complete_frames,
                        "local": h1.underlay_ip, "remote": h2.underlay_ip, **how,
                        "udp_payloads": payloads,
                        "outer_headers": [ip[:28] for _, ip in frames],
                    })
    return [hexed(case) for case in cases]


def hexed(value: Any) -> Any:
    """`value` with every bytes in it (also in lists and dicts) as hex, for JSON."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [hexed(v) for v in value]
    if isinstance(value, dict):
        return {k: hexed(v) for k, v in value.items()}
    return value


def capture_udp() -> list[dict[str, Any]]:
    from flannel_udp.backends.tun import open_tun
    from flannel_udp.lab import Topology

    cases = []
    with Topology(1) as topo:
        host = topo.host(1)
        pod = topo.add_pod(host, POD_GATEWAY, mtu=UDP_MTU)
        with inside(host):
            tun = open_tun("flannel0")
        with contextlib.closing(tun):
            host.run("ip", "addr", "add", f"{TUNNEL_ADDR}/32", "dev", "flannel0")
            host.run("ip", "link", "set", "flannel0", "up", "mtu", str(UDP_MTU))
            host.run("ip", "route", "add", NETWORK, "dev", "flannel0")
            with inside(host):
                host_raw = raw_socket()
            with inside(pod):
                pod_raw = raw_socket()
            with host_raw, pod_raw:
                for name, packet in raw_packets(POD, REMOTE_POD):
                    host_raw.sendto(packet, (REMOTE_POD, 0))
                    read = read_tun(tun.fileno(), REMOTE_POD)
                    pod_raw.sendto(packet, (REMOTE_POD, 0))
                    forwarded = read_tun(tun.fileno(), REMOTE_POD)
                    cases.append({"name": name, "sent": packet, "read": read,
                                  "forwarded": forwarded})
    return [hexed(case) for case in cases]


def capture_gso() -> list[dict[str, Any]]:
    from flannel_udp.backends.tun import TUN_F_USO4, enable_tun_offloads, open_tun
    from flannel_udp.lab import Topology

    cases = []
    with Topology(1) as topo:
        host = topo.host(1)
        pod = topo.add_pod(host, POD_GATEWAY, mtu=1500)
        with inside(host):
            tun = open_tun("gso0", vnet_hdr=True)
        with contextlib.closing(tun):
            offloads = enable_tun_offloads(tun)
            host.run("ip", "addr", "add", "10.99.0.1/32", "dev", "gso0")
            host.run("ip", "link", "set", "gso0", "up")
            host.run("ip", "route", "add", "10.99.0.0/24", "dev", "gso0")
            # No ARP, and the far end's IP stack drops the frames (not its MAC) silently.
            host.run("ip", "neigh", "replace", GSO_DST, "lladdr", GSO_FAKE_MAC, "dev",
                     f"pod{pod.index}", "nud", "permanent")
            # Software GSO with complete checksums on the way out; no GRO on the way in.
            host.set_features(f"pod{pod.index}", TX_CHECKSUM_OFF)
            pod.set_features("eth0", {"rx-gro": False})
            with inside(pod):
                tap = packet_socket("eth0")
            with tap:
                for case in gso_cases():
                    if case.gso_type == GSO_UDP_L4 and not offloads & TUN_F_USO4:
                        raise RuntimeError("this kernel's TUN takes no USO: no udp-l4 case")
                    vnet_hdr = case.vnet_hdr()
                    os.write(tun.fileno(), vnet_hdr + case.packet)
                    segments = [packet for _, packet in capture_ip(tap, to(GSO_DST))]
                    cases.append({"name": case.name, "vnet_hdr": vnet_hdr,
                                  "packet": case.packet, "segments": segments})
    return [hexed(case) for case in cases]


ABOUT = {
    "vxlan": "h1's kernel VXLAN device (MAC kernel_vtep_mac) sends to h2 (peer_vtep_mac). "
             "sent_by 'raw socket': inner = the packet sent, every byte kept; 'tun': written = the "
             "packet written behind vnet_hdr into a TUN on h1, which h1 forwards (TTL - 1) into "
             "the VXLAN device. udp_payloads: what h2's UDP socket on the port received, one "
             "per frame; outer_headers: each frame's IPv4 + UDP header "
             "(AF_PACKET on h2's eth0). complete_frames: h1's underlay veth computes checksums "
             "and segments in software, as a NIC would; false: the veth's own offloads.",
    "udp": "sent: the packet a raw socket sent to a pod behind flannel0; read: what flannel0 "
           "(TUN, no virtio header) gave when the host sent it; forwarded: what it gave when a "
           "pod behind the host sent it (the kernel's forwarding took TTL - 1).",
    "gso": "packet written behind vnet_hdr into a TUN with IFF_VNET_HDR and offloads; segments: "
           "the kernel's GSO segments of it after forwarding (TTL - 1), out of a veth without "
           "TSO and checksum offload, at the far end (AF_PACKET, GRO off), Ethernet header cut.",
}


def capture_all() -> dict[str, Any]:
    """Every capture, as frames.json holds it."""
    return {
        "kernel": platform.release(),
        "captured_by": "python3 -m tests.golden.capture (tests/golden/capture.py)",
        "about": ABOUT,
        "vxlan_setup": {"kernel_vtep_mac": KERNEL_VTEP_MAC, "peer_vtep_mac": PEER_VTEP_MAC,
                        "kernel_subnet": KERNEL_SUBNET, "peer_subnet": PEER_SUBNET,
                        "port": VXLAN_PORT},
        "vxlan": capture_vxlan(),
        "udp": capture_udp(),
        "gso": capture_gso(),
    }


def differences(stored: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Where a fresh capture differs from the stored one, one line each, ignoring the kernel
    release and, in the vxlan outer headers, the VARYING_OUTER bytes."""
    out = []
    for group in ("vxlan", "udp", "gso"):
        old = {case["name"]: case for case in stored.get(group, [])}
        new = {case["name"]: case for case in fresh.get(group, [])}
        for name in sorted(old.keys() ^ new.keys()):
            out.append(f"{group} {name}: only in the {'stored' if name in old else 'fresh'} data")
        for name in sorted(old.keys() & new.keys()):
            a, b = dict(old[name]), dict(new[name])
            if group == "vxlan":
                a["outer_headers"], b["outer_headers"] = (
                    [mask_outer(h) for h in x["outer_headers"]] for x in (a, b))
            for key in sorted(a.keys() | b.keys()):
                if a.get(key) != b.get(key):
                    out.append(f"{group} {name} {key}: {where(a.get(key), b.get(key))}")
    return out


def where(stored: Any, fresh: Any) -> str:
    """Where two values of a case differ: a list's item, a hex string's first byte."""
    if isinstance(stored, list) and isinstance(fresh, list):
        if len(stored) != len(fresh):
            return f"{len(stored)} items stored, {len(fresh)} captured now"
        i = next(i for i, (x, y) in enumerate(zip(stored, fresh, strict=True)) if x != y)
        return f"item {i}: {where(stored[i], fresh[i])}"
    if isinstance(stored, str) and isinstance(fresh, str):
        n = min(len(stored), len(fresh))
        at = next((i for i in range(n) if stored[i] != fresh[i]), n) // 2
        return (f"from byte {at}: stored {stored[2 * at:2 * at + 16]}, "
                f"captured now {fresh[2 * at:2 * at + 16]} (lengths {len(stored) // 2}, "
                f"{len(fresh) // 2})")
    return f"stored {stored!r}, captured now {fresh!r}"


def mask_outer(headers: str) -> str:
    """Outer IPv4 + UDP headers (hex) with the VARYING_OUTER bytes as 'xx'."""
    chars = list(headers)
    for start, end in VARYING_OUTER.values():
        chars[2 * start : 2 * end] = "x" * (2 * (end - start))
    return "".join(chars)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.golden.capture",
                                     description="Capture the kernel's frames as golden data.")
    parser.add_argument("-o", "--output", type=Path, default=GOLDEN_FILE)
    parser.add_argument("--check", action="store_true",
                        help="compare a fresh capture with the output file, write nothing")
    args = parser.parse_args(argv)
    from flannel_udp.lab import (
        NetnsError,
        check_environment,
        remove_stale,
        sigterm_as_interrupt,
    )

    problem = check_environment()
    if problem is not None:
        print(f"capture: {problem}", file=sys.stderr)
        return 2
    stored = None
    if args.check:
        try:
            stored = json.loads(args.output.read_text())
        except (OSError, ValueError) as e:
            print(f"capture: cannot read {args.output}: {e}", file=sys.stderr)
            return 2
    remove_stale()
    try:
        with sigterm_as_interrupt():
            data = capture_all()
    except (NetnsError, RuntimeError, OSError) as e:
        print(f"capture: {e}", file=sys.stderr)
        return 1
    if stored is not None:
        lines = differences(stored, data)
        for line in lines:
            print(line)
        print(f"{len(lines)} differences from {args.output} (captured on {stored['kernel']}, "
              f"this kernel {data['kernel']})")
        return 1 if lines else 0
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    counts = ", ".join(f"{len(data[k])} {k}" for k in ("vxlan", "udp", "gso"))
    print(f"wrote {args.output}: {counts} cases, kernel {data['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
