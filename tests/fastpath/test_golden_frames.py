"""The C fast path and packet.py against frames the kernel itself produced (golden data in
tests/golden/frames.json, captured by tests/golden/capture.py; see its docstring for how).

The property tests hold the C to packet.py, so an error both share passes them; here both are
held to the kernel:

- vxlan: our encapsulation of the inner packet (as h1's kernel VXLAN node, same VtepMAC, same
  peer route) is the kernel's UDP payload byte for byte, nothing masked: VXLAN header, inner
  Ethernet header and inner packet are all ours to make. The outer IPv4 and UDP headers are not
  compared: our kernel's UDP socket makes them, not our code (the kernel's outer source port is
  its own flow hash; its outer IP id is its own pick). Also a TCP segment left to checksum
  offload and a TSO super-packet that h1 forwards into the device: our offloaded egress of the
  same packet behind the same virtio header gives the kernel's frames when h1's underlay
  finishes frames as a NIC does; over a veth with its own offloads the kernel leaves the inner
  checksum partial and the super-packet whole, which is recorded and checked as such. Our
  decapsulation of every frame gives back the inner packet.
- udp: flanneld's proxy sends the packet read from flannel0 with TTL - 1 and the header
  checksum updated; the kernel's own forwarding does exactly that, so our udp-mode egress (and
  ingress) of the packet flannel0 gave must be what flannel0 gave when the kernel had forwarded
  it once.
- gso: our segmentation of a TSO/USO super-packet is the kernel's GSO segments byte for byte
  (IP ids, lengths, checksums, sequence numbers, flags); the kernel forwarded the super-packet
  first (TTL - 1), so that is what we split, and udp-mode egress (TTL - 1, then split) must give
  the segments themselves.

The last test (netns, root) captures again and compares with the stored bytes, so that the data
cannot rot unnoticed: only capture.VARYING_OUTER, four fields of the vxlan outer headers, may
differ between runs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import struct

import pytest
from golden import capture
from golden.capture import inet_checksum, pseudo_sum, with_ttl
from helpers import ip, namespaces_of

from flannel_udp import _fastpath, packet
from flannel_udp.packet import Action, Result, Vtep, VxlanRoute

GOLDEN = json.loads(capture.GOLDEN_FILE.read_text())
FastPath = _fastpath.FastPath

KERNEL_MAC = bytes.fromhex(capture.KERNEL_VTEP_MAC.replace(":", ""))
PEER_MAC = bytes.fromhex(capture.PEER_VTEP_MAC.replace(":", ""))
TUNNEL_ADDR = capture.TUNNEL_ADDR
PEER_SUBNET = capture.PEER_SUBNET.split("/")[0]
VXLAN_ENCAP_LEN = 8 + 14  # VXLAN header + inner Ethernet header
UDP_PEER = "192.168.77.12"  # any underlay address: the udp and gso cases' peer


def raw(hexed: str) -> bytes:
    return bytes.fromhex(hexed)


def cases(group: str, keep=lambda case: True) -> list:
    return [pytest.param(c, id=c["name"]) for c in GOLDEN[group] if keep(c)]


def addresses(pkt: bytes) -> tuple[str, str]:
    return str(ipaddress.IPv4Address(pkt[12:16])), str(ipaddress.IPv4Address(pkt[16:20]))


def l4_checksum_offset(pkt: bytes) -> int:
    return (pkt[0] & 0x0F) * 4 + (16 if pkt[9] == capture.PROTO_TCP else 6)


def l4_checksum_valid(pkt: bytes) -> bool:
    return capture.l4_checksum(*addresses(pkt), pkt[9], pkt[(pkt[0] & 0x0F) * 4:]) == 0


def completed(pkt: bytes) -> bytes:
    """`pkt` with its TCP checksum computed afresh (capture's own sum, not packet.py's)."""
    at = l4_checksum_offset(pkt)
    zeroed = pkt[(pkt[0] & 0x0F) * 4:at] + b"\x00\x00" + pkt[at + 2:]
    return pkt[:at] + capture.l4_checksum(*addresses(pkt), pkt[9], zeroed).to_bytes(
        2, "big") + pkt[at + 2:]


def forwarded(case: dict) -> bytes:
    """The packet written into the TUN as the kernel forwarded it on: TTL - 1."""
    written = raw(case["written"])
    return with_ttl(written, written[8] - 1)


POD_MTU = 1450  # of a vxlan node on a 1500-byte underlay


def tcp_header_len(pkt: bytes) -> int:
    """The L4 header's length: TCP's data offset, 8 for UDP."""
    ihl = (pkt[0] & 0x0F) * 4
    return (pkt[ihl + 12] >> 4) * 4 if pkt[9] == 6 else 8


def payloads(case: dict) -> list[bytes]:
    return [raw(p) for p in case["udp_payloads"]]


def partial_over_veth(case: dict) -> bool:
    """A pod's packet left to offloads, through a kernel node whose underlay veth keeps its
    own offloads: the kernel hands on the partial checksum (and a super-packet whole)."""
    return case["sent_by"] == "tun" and not case["complete_frames"]


# --- vxlan -------------------------------------------------------------------------------------


def kernel_node(case: dict, **offloads: bool) -> tuple[FastPath, dict[int, VxlanRoute], Vtep]:
    """Our fast path, and packet.py's route table and VTEP, in the kernel node's place."""
    fastpath = FastPath(-1, -1, capture.VXLAN_PORT, TUNNEL_ADDR, 24, mode="vxlan",
                        vni=case["vni"], vtep_mac=KERNEL_MAC, **offloads)
    fastpath.set_route(PEER_SUBNET, case["remote"], PEER_MAC)
    return (fastpath, {ip(PEER_SUBNET): VxlanRoute(ip(case["remote"]), PEER_MAC)},
            Vtep(case["vni"], KERNEL_MAC))


@pytest.mark.parametrize("case", cases("vxlan", lambda c: c["sent_by"] == "raw socket"))
def test_vxlan_encapsulation_is_the_kernels_payload(case):
    inner = raw(case["inner"])
    (payload,) = payloads(case)
    fastpath, routes, vtep = kernel_node(case)
    assert fastpath.process_egress(inner)[:4] == (Action.SEND, payload, case["remote"], 0)
    result = packet.vxlan_egress(inner, routes, 24, ip(TUNNEL_ADDR), vtep)
    assert (result.action, result.data, result.peer) == (Action.SEND, payload, ip(case["remote"]))


@pytest.mark.parametrize("udp_gso", [False, True], ids=["sendmmsg", "udp-gso"])
@pytest.mark.parametrize("case", cases(
    "vxlan", lambda c: c["sent_by"] == "tun" and c["complete_frames"]))
def test_vxlan_offloaded_encapsulation_is_the_kernels_frames(case, udp_gso):
    """A packet read behind a virtio header (checksum left to us, or a TSO super-packet):
    our frames are the ones the kernel sends for it through a NIC-like underlay."""
    vnet_hdr, pkt = raw(case["vnet_hdr"]), forwarded(case)
    fastpath, routes, vtep = kernel_node(case, vnet_hdr=True, udp_gso=udp_gso)
    assert fastpath.process_egress(pkt, vnet_hdr)[:4] == (
        Action.SEND, payloads(case), case["remote"], 0)
    result = packet.vxlan_egress(pkt, routes, 24, ip(TUNNEL_ADDR), vtep)
    drop, segments = packet.segment_tso(vnet_hdr, result.data[VXLAN_ENCAP_LEN:])
    assert drop is None
    assert [result.data[:VXLAN_ENCAP_LEN] + s for s in segments] == payloads(case)


@pytest.mark.parametrize("case", cases("vxlan", partial_over_veth))
def test_kernel_vxlan_over_a_veth_leaves_the_checksum_partial_and_super_packets_whole(case):
    """Why those frames are not compared with ours: the kernel relies on a kernel receiver on
    the same host. Its one frame carries the forwarded packet as it was, whole (a TSO
    super-packet unsegmented), the pseudo-header sum still in the checksum field."""
    pkt = forwarded(case)
    (payload,) = payloads(case)
    assert payload[VXLAN_ENCAP_LEN:] == pkt
    at = l4_checksum_offset(pkt)
    ihl = (pkt[0] & 0x0F) * 4
    assert int.from_bytes(pkt[at:at + 2], "big") == pseudo_sum(*addresses(pkt), pkt[9],
                                                               len(pkt) - ihl)


@pytest.mark.parametrize("case", cases("vxlan"))
def test_vxlan_decapsulation_of_the_kernels_frames_gives_the_inner_packet(case):
    fastpath = FastPath(-1, -1, capture.VXLAN_PORT, "10.244.2.0", 24, mode="vxlan",
                        vni=case["vni"], vtep_mac=PEER_MAC)
    vtep = Vtep(case["vni"], PEER_MAC)
    if case["sent_by"] == "raw socket":
        assert [p[VXLAN_ENCAP_LEN:] for p in payloads(case)] == [raw(case["inner"])]
    for payload in payloads(case):
        kernel_inner = payload[VXLAN_ENCAP_LEN:]
        action, c_inner, _, drop, _ = fastpath.process_ingress(payload, case["local"])
        result = packet.vxlan_ingress(payload, vtep)
        assert (action, drop, result.action) == (Action.TUN, 0, Action.TUN)
        for got in (c_inner, result.data):
            if not partial_over_veth(case):
                assert got == kernel_inner
                continue
            # The inner checksum arrives partial (see above): decapsulation passes the bytes
            # on as they came, and what ingress writes to a plain TUN is valid: completed,
            # and a super-packet cut to the TUN's MTU, the payload unchanged.
            assert got == kernel_inner
            c = _fastpath.tun_writes([got], vnet=False, complete_partial=True, mtu=POD_MTU)
            ref = packet.tun_writes([got], vnet=False, complete_partial=True, mtu=POD_MTU)
            assert tuple(c) == tuple(ref)
            writes, completed, bad_gso = c
            assert completed >= 1 and bad_gso == 0
            ihl = (got[0] & 0x0F) * 4
            body = b"".join(seg[(seg[0] & 0x0F) * 4 + tcp_header_len(seg):]
                            for _, seg in writes)
            assert body == got[ihl + tcp_header_len(got):]
            assert all(l4_checksum_valid(seg) and len(seg) <= POD_MTU for _, seg in writes)


@pytest.mark.parametrize("case", cases("vxlan"))
def test_the_kernels_outer_headers_are_what_the_golden_data_says(case):
    """The recorded outer headers fit their payloads and the device's checksum setting
    (complete, zero for noudpcsum, or partial where the veth's offloads keep it partial); the
    kernel copies the inner ECN bits to the outer header (RFC 6040), which our UDP sockets do
    not: noted, not compared."""
    inner_tos = raw(case["inner"] if case["sent_by"] == "raw socket" else case["written"])[1]
    local, remote = case["local"], case["remote"]

    def valid(udp: bytes) -> bool:
        return capture.l4_checksum(local, remote, capture.PROTO_UDP, udp) == 0

    for header, payload in zip((raw(h) for h in case["outer_headers"]), payloads(case),
                               strict=True):
        ip_header, udp_header = header[:20], header[20:28]
        assert inet_checksum(ip_header) == 0
        assert ip_header[1] == inner_tos & 0x03
        assert ip_header[9] == capture.PROTO_UDP
        assert int.from_bytes(ip_header[2:4], "big") == 28 + len(payload)
        assert addresses(ip_header) == (local, remote)
        _, dport, length, check = struct.unpack("!HHHH", udp_header)
        assert (dport, length) == (capture.VXLAN_PORT, 8 + len(payload))
        if not case["udp_csum"]:
            assert check == 0
        elif case["complete_frames"]:
            assert valid(udp_header + payload)
        elif case["sent_by"] == "tun" and raw(case["vnet_hdr"])[1] == 0:
            # An inner checksum left partial: the outer one is complete for the inner one
            # filled in (local checksum offload), not for the bytes as they are.
            assert not valid(udp_header + payload)
            assert valid(udp_header + payload[:VXLAN_ENCAP_LEN]
                         + completed(payload[VXLAN_ENCAP_LEN:]))
        else:  # left to the (virtual) NIC: the pseudo-header sum
            assert check == pseudo_sum(local, remote, capture.PROTO_UDP, length)


# --- udp (flanneld's proxy) ----------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("udp"))
def test_udp_mode_sends_what_flanneld_sends(case):
    """flannel0 gave `read`; flanneld sends it with TTL - 1: the bytes the kernel's own
    forwarding made of the same packet (`forwarded`)."""
    read, fwd = raw(case["read"]), raw(case["forwarded"])
    assert read == raw(case["sent"]) and fwd[8] == read[8] - 1
    fastpath = FastPath(-1, -1, 8285, TUNNEL_ADDR, 24)
    fastpath.set_route(PEER_SUBNET, UDP_PEER)
    assert fastpath.process_egress(read)[:4] == (Action.SEND, fwd, UDP_PEER, 0)
    assert packet.egress(read, {ip(PEER_SUBNET): ip(UDP_PEER)}, 24, ip(TUNNEL_ADDR)) == Result(
        Action.SEND, fwd, ip(UDP_PEER))


@pytest.mark.parametrize("case", cases("udp"))
def test_udp_mode_ingress_decrements_the_ttl_as_the_kernel_forwards(case):
    read, fwd = raw(case["read"]), raw(case["forwarded"])
    fastpath = FastPath(-1, -1, 8285, TUNNEL_ADDR, 24)
    assert fastpath.process_ingress(read, UDP_PEER)[:4] == (Action.TUN, fwd, "", 0)
    assert packet.ingress(read) == Result(Action.TUN, fwd)


# --- gso ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases("gso"))
def test_segmentation_is_the_kernels_gso(case):
    vnet_hdr, pkt = raw(case["vnet_hdr"]), raw(case["packet"])
    segments = [raw(s) for s in case["segments"]]
    fwd = with_ttl(pkt, pkt[8] - 1)  # the kernel forwarded it before it split it
    assert _fastpath.segment_tso(vnet_hdr, fwd) == (0, segments)
    assert packet.segment_tso(vnet_hdr, fwd) == (None, segments)


@pytest.mark.parametrize("udp_gso", [False, True], ids=["sendmmsg", "udp-gso"])
@pytest.mark.parametrize("case", cases("gso"))
def test_udp_mode_offloaded_egress_sends_the_kernels_segments(case, udp_gso):
    """In udp mode egress takes TTL - 1 and then splits: what the kernel's forwarding and
    GSO did."""
    vnet_hdr, pkt = raw(case["vnet_hdr"]), raw(case["packet"])
    segments = [raw(s) for s in case["segments"]]
    subnet = str(ipaddress.IPv4Network(f"{capture.GSO_DST}/24", strict=False).network_address)
    fastpath = FastPath(-1, -1, 8285, TUNNEL_ADDR, 24, vnet_hdr=True, udp_gso=udp_gso)
    fastpath.set_route(subnet, UDP_PEER)
    assert fastpath.process_egress(pkt, vnet_hdr)[:4] == (Action.SEND, segments, UDP_PEER, 0)
    result = packet.egress(pkt, {ip(subnet): ip(UDP_PEER)}, 24, ip(TUNNEL_ADDR))
    assert packet.segment_tso(vnet_hdr, result.data) == (None, segments)


# --- the data itself -----------------------------------------------------------------------------


def test_the_golden_data_holds_every_case_the_capture_crafts_as_it_crafts_it():
    """Without root: a change to capture.py's packets shows here until frames.json is captured
    again."""
    crafted = capture.raw_packets(capture.POD, capture.REMOTE_POD)
    tcp_segment = capture.offloaded_tcp(capture.POD, capture.REMOTE_POD)
    tso = capture.vxlan_tso_super(capture.POD, capture.REMOTE_POD)
    tun_sent = [("tcp-forwarded-needs-csum", capture.needs_csum_hdr(tcp_segment), tcp_segment),
                (tso.name, tso.vnet_hdr(), tso.packet)]
    for setup in capture.VXLAN_SETUPS:
        got = [c for c in GOLDEN["vxlan"] if c["name"].startswith(f"{setup.name}/")]
        assert [(c["name"], raw(c["inner"])) for c in got if c["sent_by"] == "raw socket"] == [
            (f"{setup.name}/{name}", pkt) for name, pkt in crafted]
        assert [(c["name"], raw(c["vnet_hdr"]), raw(c["written"])) for c in got
                if c["sent_by"] == "tun"] == [(f"{setup.name}/{name}", hdr, pkt)
                                              for name, hdr, pkt in tun_sent]
        assert {(c["vni"], c["udp_csum"], c["complete_frames"]) for c in got} == {
            (setup.vni, setup.udp_csum, setup.complete_frames)}
    assert [(c["name"], raw(c["sent"])) for c in GOLDEN["udp"]] == crafted
    assert [(c["name"], raw(c["vnet_hdr"]), raw(c["packet"])) for c in GOLDEN["gso"]] == [
        (c.name, c.vnet_hdr(), c.packet) for c in capture.gso_cases()]


@pytest.mark.netns
def test_the_capture_still_gives_the_golden_bytes_on_this_kernel(netns_session):
    before = set(namespaces_of(os.getpid()))
    fresh = capture.capture_all()
    assert set(namespaces_of(os.getpid())) <= before, "the capture left namespaces behind"
    diffs = capture.differences(GOLDEN, fresh)
    assert not diffs, (f"golden data captured on {GOLDEN['kernel']}, this kernel "
                       f"{fresh['kernel']}:\n" + "\n".join(diffs))
