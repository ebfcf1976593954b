"""Source validation and the codecs under mutation, the C fast path against its Python reference.

A datagram is accepted only from a lease holder's PublicIP (else `unknown_sender`, before any
parsing) and only with an inner source inside a subnet leased to that sender (else
`spoofed_inner_source`). The property tests feed the same sender, table and bytes to
``FastPath.process_ingress`` and to ``packet.ingress``/``packet.vxlan_ingress`` and require the
same verdict and bytes; the mutation-based ones break well-formed packets and frames the way the
live fuzzing does (tests/netfuzz.py) and compare again, in both directions and both modes.
"""

from __future__ import annotations

import random

from helpers import (
    FastPath,
    addresses,
    as_tuple,
    dotted,
    ip,
    ipv4_packets,
    macs,
    make_packet,
    route_tables,
    vteps,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netfuzz import mutate, vxlan_frame

from flannel_udp import packet
from flannel_udp.packet import Action, Drop, Sender, VxlanRoute, prefix_mask

SLOW = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


def checking_fastpath(routes: dict[int, int], subnet_len: int, **kw: object) -> FastPath:
    fastpath = FastPath(-1, -1, 8285, "10.5.1.0", subnet_len, source_check=True, **kw)
    for subnet, peer in routes.items():
        if kw.get("mode") == "vxlan":
            fastpath.set_route(dotted(subnet), dotted(peer), b"\x02" * 6)
        else:
            fastpath.set_route(dotted(subnet), dotted(peer))
    return fastpath


@st.composite
def senders(draw: st.DrawFn) -> tuple[Sender, bytes]:
    """A route table, a sender (mostly a peer in it) and a packet whose source is mostly inside
    one of the table's subnets (the sender's or another's)."""
    subnet_len, routes = draw(route_tables())
    peers = sorted(set(routes.values()))
    address = draw(st.sampled_from(peers)) if peers and draw(st.integers(0, 3)) else \
        draw(addresses)
    data = bytearray(draw(ipv4_packets(routes, subnet_len)))
    if routes and len(data) >= 16 and draw(st.integers(0, 3)):
        host_bits = ~prefix_mask(subnet_len) & 0xFFFFFFFF
        src = draw(st.sampled_from(sorted(routes))) | (draw(addresses) & host_bits)
        data[12:16] = src.to_bytes(4, "big")
    return Sender(address, routes, subnet_len), bytes(data)


@settings(max_examples=500, **SLOW)
@given(senders())
def test_udp_ingress_source_check_agrees_with_reference(case):
    sender, data = case
    fastpath = checking_fastpath(dict(sender.routes), sender.subnet_len)
    assert fastpath.process_ingress(data, dotted(sender.address)) == as_tuple(
        packet.ingress(data, sender))


@settings(max_examples=400, **SLOW)
@given(senders(), vteps())
def test_vxlan_ingress_source_check_agrees_with_reference(case, vtep):
    sender, data = case
    fastpath = checking_fastpath(dict(sender.routes), sender.subnet_len, mode="vxlan",
                                 vni=vtep.vni, vtep_mac=vtep.mac, send_fds=[-1])
    frame = vxlan_frame(data, vtep.vni, vtep.mac)
    assert fastpath.process_ingress(frame, dotted(sender.address)) == as_tuple(
        packet.vxlan_ingress(frame, vtep, sender))


def test_the_three_verdicts_by_example():
    peer, other, stranger = ip("192.168.77.12"), ip("192.168.77.13"), ip("192.168.77.99")
    routes = {ip("10.5.2.0"): peer, ip("10.5.3.0"): other}
    fastpath = checking_fastpath(routes, 24)
    own = make_packet(ip("10.5.2.7"), ip("10.5.1.2"))
    tunnel_address = make_packet(ip("10.5.2.0"), ip("10.5.1.2"))
    claims_other = make_packet(ip("10.5.3.7"), ip("10.5.1.2"))
    unleased = make_packet(ip("10.5.9.7"), ip("10.5.1.2"))
    assert fastpath.process_ingress(own, "192.168.77.12")[0] == Action.TUN
    assert fastpath.process_ingress(tunnel_address, "192.168.77.12")[0] == Action.TUN
    for forged in (claims_other, unleased):
        assert fastpath.process_ingress(forged, "192.168.77.12")[3] == Drop.SPOOFED_INNER_SOURCE
    # A stranger gets nothing looked at: even a datagram too short to parse counts as such.
    for data in (own, b"\x45"):
        assert fastpath.process_ingress(data, dotted(stranger))[3] == Drop.UNKNOWN_SENDER
    # Without the check (flannel's behaviour) the stranger's packet goes through.
    assert FastPath(-1, -1, 8285, "10.5.1.0", 24).process_ingress(own, "192.168.77.99")[0] == \
        Action.TUN


operations = st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(0, 3)),
                      max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_the_senders_known_follow_route_changes_as_a_dict_would(ops):
    # Subnets move between four peers and go away; a peer is known while it holds any subnet
    # (0.0.0.0 among them: an address like any other to the table).
    fastpath = checking_fastpath({}, 24)
    table: dict[int, int] = {}
    peers = [0] + [ip(f"192.168.77.{10 + i}") for i in range(3)]
    for is_set, subnet_index, peer_index in ops:
        subnet = ip("10.5.0.0") + (subnet_index << 8)
        if is_set:
            fastpath.set_route(dotted(subnet), dotted(peers[peer_index]))
            table[subnet] = peers[peer_index]
        else:
            fastpath.del_route(dotted(subnet))
            table.pop(subnet, None)
    for peer in peers:
        verdict = fastpath.process_ingress(b"", dotted(peer))[3]
        expected = Drop.SHORT if peer in table.values() else Drop.UNKNOWN_SENDER
        assert verdict == expected, (dotted(peer), table)


# --- mutation-based fuzzing of the codecs, C against the reference ----------------------------


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """A datagram broken by one to three of the live fuzzer's mutations (seeded by Hypothesis,
    so that a failure shrinks to its seed and base)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    data = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        data = mutate(rng, data)
    return data


@settings(max_examples=600, **SLOW)
@given(st.data())
def test_mutated_packets_egress_and_ingress_agree_with_reference_udp(data):
    subnet_len, routes = data.draw(route_tables())
    datagram = data.draw(mutated(ipv4_packets(routes, subnet_len)))
    fastpath = FastPath(-1, -1, 8285, "10.5.1.0", subnet_len)
    for subnet, peer in routes.items():
        fastpath.set_route(dotted(subnet), dotted(peer))
    tun_addr = ip("10.5.1.0")
    assert fastpath.process_egress(datagram) == as_tuple(
        packet.egress(datagram, routes, subnet_len, tun_addr))
    assert fastpath.process_ingress(datagram) == as_tuple(packet.ingress(datagram))


@settings(max_examples=600, **SLOW)
@given(st.data())
def test_mutated_frames_and_packets_agree_with_reference_vxlan(data):
    vtep = data.draw(vteps())
    subnet_len, peers = data.draw(route_tables())
    routes = {subnet: VxlanRoute(peer, data.draw(macs)) for subnet, peer in peers.items()}
    fastpath = FastPath(-1, -1, 8472, "10.5.1.0", subnet_len, mode="vxlan", vni=vtep.vni,
                        vtep_mac=vtep.mac, send_fds=[-1] * vtep.senders)
    for subnet, route in routes.items():
        fastpath.set_route(dotted(subnet), dotted(route.peer), route.mac)
    inner = ipv4_packets(peers, subnet_len)
    frame = data.draw(mutated(inner.map(lambda p: vxlan_frame(p, vtep.vni, vtep.mac))))
    assert fastpath.process_ingress(frame) == as_tuple(packet.vxlan_ingress(frame, vtep))
    tun_packet = data.draw(mutated(inner))
    assert fastpath.process_egress(tun_packet) == as_tuple(
        packet.vxlan_egress(tun_packet, routes, subnet_len, ip("10.5.1.0"), vtep))
