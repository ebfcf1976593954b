"""The fast path's route table against a dict (5,000 routes, colliding keys, wrap-around), and
what its constructor and `set_route` refuse."""

from __future__ import annotations

import random

import pytest
from helpers import FastPath, dotted, ip, make_fastpath, make_packet
from hypothesis import given, settings
from hypothesis import strategies as st

from flannel_udp.packet import Action


def lookup(fastpath: FastPath, dst: int) -> str | None:
    """The peer the fast path routes ``dst`` to, or None."""
    action, _, peer, _, _ = fastpath.process_egress(make_packet(ip("10.0.0.1"), dst))
    return peer if action == Action.SEND else None


def assert_table_matches(fastpath: FastPath, model: dict[int, int], probes: list[int]) -> None:
    listed = [(subnet, peer) for subnet, peer, _, _ in fastpath.routes()]
    assert listed == [(dotted(s), dotted(p)) for s, p in sorted(model.items())]
    for key in probes:
        expected = dotted(model[key]) if key in model else None
        assert lookup(fastpath, key) == expected, dotted(key)
    info = fastpath._table_info()
    assert info["count"] == len(model)
    assert info["capacity"] & (info["capacity"] - 1) == 0
    assert info["capacity"] >= 2 * len(model)


def test_5000_routes_inserted_replaced_and_deleted_agree_with_a_dict():
    rng = random.Random(5000)
    # /24 leases out of a /8 network, the layout of a big flannel cluster.
    subnets = [ip("10.0.0.0") + (n << 8) for n in rng.sample(range(1 << 16), 6000)]
    fastpath = make_fastpath({}, 24, ip("10.0.0.0"))
    model: dict[int, int] = {}
    for subnet in subnets[:5000]:
        model[subnet] = rng.getrandbits(32)
        fastpath.set_route(dotted(subnet), dotted(model[subnet]))
    for subnet in rng.sample(subnets[:5000], 1000):
        model[subnet] = rng.getrandbits(32)
        fastpath.set_route(dotted(subnet), dotted(model[subnet]))
    assert_table_matches(fastpath, model, subnets)
    # Linear probing at load <= 1/2 with a decent hash keeps probe sequences short.
    assert fastpath._table_info()["max_probe"] <= 40
    for subnet in rng.sample(subnets, 3000):  # some of them were never inserted
        model.pop(subnet, None)
        fastpath.del_route(dotted(subnet))
    assert_table_matches(fastpath, model, subnets)


def home_slot(key: int, capacity: int) -> int:
    """The C table's hash (Fibonacci hashing), replicated to build colliding keys."""
    return ((key * 2654435769) & 0xFFFFFFFF) >> (32 - capacity.bit_length() + 1)


def keys_with_home(slot: int, count: int, capacity: int = 16) -> list[int]:
    found = []
    key = ip("10.0.0.1")
    while len(found) < count:
        if home_slot(key, capacity) == slot:
            found.append(key)
        key += 1
    return found


# Clusters at the end of a 16-slot table so that probing and backward shifts wrap around.
COLLIDING = (
    keys_with_home(14, 2) + keys_with_home(15, 3) + keys_with_home(0, 2) + keys_with_home(1, 1)
)


def test_colliding_keys_really_collide_in_the_c_table():
    fastpath = make_fastpath({}, 32, 0)
    for key in keys_with_home(15, 4):
        fastpath.set_route(dotted(key), "1.1.1.1")
    # Same home slot: the 4th key probes 4 slots, wrapping past the end of the table.
    assert fastpath._table_info() == {"capacity": 16, "count": 4, "max_probe": 4}


def test_deleting_the_head_of_a_wrapped_cluster_shifts_the_rest_back():
    a, b, c = keys_with_home(15, 3)
    (d,) = keys_with_home(0, 1)
    model = {a: 1, b: 2, c: 3, d: 4}  # slots 15, 0, 1, 2
    fastpath = make_fastpath(model, 32, 0)
    fastpath.del_route(dotted(a))
    del model[a]
    assert_table_matches(fastpath, model, [a, b, c, d])
    # b -> 15, c -> 0, d -> 1: each one slot closer to home, nothing left in slot 2.
    assert fastpath._table_info()["max_probe"] == 2


operations = st.lists(
    st.tuples(st.booleans(), st.sampled_from(COLLIDING), st.integers(1, 3)), max_size=40
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_random_inserts_and_deletes_of_colliding_keys_agree_with_a_dict(ops):
    fastpath = make_fastpath({}, 32, 0)
    model: dict[int, int] = {}
    for insert, key, peer in ops:
        if insert:
            model[key] = peer
            fastpath.set_route(dotted(key), dotted(peer))
        else:
            model.pop(key, None)
            fastpath.del_route(dotted(key))
        assert_table_matches(fastpath, model, COLLIDING)


def test_route_to_subnet_zero_is_found_and_deleted():
    fastpath = make_fastpath({0: 9}, 8, 0)
    assert lookup(fastpath, ip("0.1.2.3")) == "0.0.0.9"
    fastpath.del_route("0.0.0.0")
    assert fastpath.routes() == []
    assert lookup(fastpath, ip("0.1.2.3")) is None


def test_replacing_a_peer_moves_traffic_and_restarts_its_counters():
    fastpath = make_fastpath({ip("10.5.2.0"): ip("192.168.0.2")}, 24, 0)
    fastpath.set_route("10.5.2.0", "192.168.0.3")
    assert lookup(fastpath, ip("10.5.2.1")) == "192.168.0.3"
    assert fastpath.routes() == [
        (
            "10.5.2.0",
            "192.168.0.3",
            None,
            {"tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0},
        ),
    ]


def test_deleting_an_absent_route_is_a_no_op():
    fastpath = make_fastpath({ip("10.5.2.0"): 1}, 24, 0)
    fastpath.del_route("10.5.3.0")
    assert [r[0] for r in fastpath.routes()] == ["10.5.2.0"]


@pytest.mark.parametrize("subnet", ["10.5.2.1", "10.5.2", "10.5.2.0/24", "300.1.1.0", ""])
def test_set_route_rejects_what_is_not_a_network_address(subnet):
    fastpath = make_fastpath({}, 24, 0)
    with pytest.raises(ValueError):
        fastpath.set_route(subnet, "192.168.0.1")
    assert fastpath.routes() == []


@pytest.mark.parametrize(
    "args",
    [
        (-1, -1, 0, "10.0.0.0", 24),
        (-1, -1, 70000, "10.0.0.0", 24),
        (-1, -1, 1, "10.0.0.0", 33),
        (-1, -1, 1, "nope", 24),
    ],
)
def test_constructor_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        FastPath(*args)


@pytest.mark.parametrize("mtu", [-1, 65537])
def test_constructor_rejects_an_mtu_out_of_range(mtu):
    with pytest.raises(ValueError, match="mtu"):
        FastPath(-1, -1, 1, "10.0.0.0", 24, mtu=mtu)


def test_start_without_fds_fails_and_stop_is_idempotent():
    fastpath = make_fastpath({}, 24, 0)
    with pytest.raises(ValueError):
        fastpath.start()
    fastpath.stop()
    fastpath.stop()
    assert not fastpath.running


@pytest.mark.parametrize("busy_poll_us", [-1, 1_000_001])
def test_constructor_rejects_a_busy_poll_out_of_range(busy_poll_us):
    with pytest.raises(ValueError, match="busy_poll_us"):
        FastPath(-1, -1, 8472, "10.0.0.0", 24, busy_poll_us=busy_poll_us)
