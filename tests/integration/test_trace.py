"""`flannel-udp trace`: a daemon's per-packet decisions, printed while a pod pings another; off
(and free) while nobody traces. Real daemons in the test's own namespaces."""

from __future__ import annotations

import ipaddress

import pytest
from helpers import trace

from flannel_udp.lab import DEFAULT_NETWORK_CONFIG, wait_until

pytestmark = pytest.mark.netns

NETWORK = ipaddress.IPv4Network(DEFAULT_NETWORK_CONFIG["Network"])


def test_trace_shows_the_decisions_and_is_off_without_a_tracer(topology):
    topo = topology(2)
    leases = topo.start_daemons()
    h1, h2 = topo.hosts
    a, b = topo.add_pod(h1), topo.add_pod(h2)
    assert all(r.ok for r in a.ping(b.address, count=2).values())

    # Nobody traces: the flag is off and the fast path took no record for the pings.
    before = h1.status()["trace"]
    assert before == {"every": 0, "records": 0, "lost": 0}

    lines = trace(h1, "--count", "5",
                  ping=lambda: a.ping(b.address, count=2, interval=0.02))
    assert len(lines) == 5, lines
    peer = leases["h2"]["public_ip"]
    egress = f"egress  {a.address} > {b.address} icmp peer {peer} sent"
    ingress = f"ingress {b.address} > {a.address} icmp peer {peer} to_tun"
    assert any(line.endswith(egress) for line in lines), lines
    assert any(line.endswith(ingress) for line in lines), lines

    # Rate limited: at most --max-rate lines a second, the rest counted on a "… K more" line.
    lines = trace(h1, "--count", "2", "--max-rate", "1",
                  ping=lambda: a.ping(b.address, count=20, interval=0.01))
    printed = [line for line in lines if not line.startswith("…")]
    assert len(printed) == 2, lines
    assert any(line.startswith("… ") and "more (over --max-rate)" in line for line in lines), lines

    # A packet to an address no lease holds: dropped (ICMP gets no ICMP error back).
    unleased = str(next(s for s in NETWORK.subnets(new_prefix=24)
                        if str(s) not in {lease["subnet"] for lease in leases.values()})[5])
    lines = trace(h1, "--count", "1", "--max-rate", "50",
                  ping=lambda: a.ping(unleased, count=1, interval=0.02, timeout=0.2))
    assert lines and lines[0].endswith(
        f"egress  {a.address} > {unleased} icmp peer - dropped no_route"), lines

    # The tracers have left: off again, and pings add no records.
    wait_until(lambda: h1.status()["trace"]["every"] == 0, 5, "tracing to switch off")
    taken = h1.status()["trace"]["records"]
    assert taken > 0
    assert all(r.ok for r in a.ping(b.address, count=3).values())
    assert h1.status()["trace"]["records"] == taken
