"""The native fast path in VXLAN mode against its Python reference: encapsulation of what the
TUN gives, decapsulation and every check of what peers send, the flow hash that picks a sender
socket, and the constructor's VXLAN arguments."""

from __future__ import annotations

import pytest
from helpers import (
    FastPath,
    addresses,
    as_tuple,
    case_with_bytes,
    ip,
    ipv4_packets,
    macs,
    make_fastpath,
    make_packet,
    make_vxlan_fastpath,
    route_tables,
    vteps,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_udp import _fastpath, packet
from flannel_udp.packet import VXLAN_FLAG_I, Action, Vtep, VxlanRoute


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
