"""The native fast path in UDP mode against its Python reference: the property tests feed the
same bytes to ``flannel_udp.packet`` and to the C functions behind
``FastPath.process_egress``/``process_ingress`` (the very ones the I/O threads run) and require
byte-identical results. VXLAN mode, the offloads, the route table and the threads on real fds
have files of their own beside this one.
"""

from __future__ import annotations

from helpers import (
    addresses,
    as_tuple,
    case_with_bytes,
    ip,
    ipv4_packets,
    make_fastpath,
    make_packet,
    route_tables,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_udp import _fastpath, packet
from flannel_udp.packet import Action, Drop


@st.composite
def case_with_packet(draw: st.DrawFn) -> tuple[int, dict[int, int], int, bytes]:
    subnet_len, routes = draw(route_tables())
    return subnet_len, routes, draw(addresses), draw(ipv4_packets(routes, subnet_len))


def test_drop_names_match_the_reference():
    assert _fastpath.DROP_NAMES == packet.DROP_NAMES


def assert_agrees_with_reference(case) -> None:
    subnet_len, routes, tun_addr, data = case
    fastpath = make_fastpath(routes, subnet_len, tun_addr)
    assert fastpath.process_egress(data) == as_tuple(
        packet.egress(data, routes, subnet_len, tun_addr)
    )
    assert fastpath.process_ingress(data) == as_tuple(packet.ingress(data))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_with_packet())
def test_fastpath_agrees_with_reference_on_ipv4_packets(case):
    assert_agrees_with_reference(case)


@settings(max_examples=300, deadline=None)
@given(case_with_bytes())
def test_fastpath_agrees_with_reference_on_random_bytes(case):
    assert_agrees_with_reference(case)


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

