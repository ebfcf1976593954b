"""Soak: minutes of mixed traffic while peers join and leave every few seconds; the daemon's
memory and file descriptors stay flat, nothing crashes, nothing leaks.

h1 and h2 run daemons with pods exchanging a steady UDP stream (iperf3) and pings; h3's daemon
is started and stopped every few seconds (its lease deleted after every other stop, so it
leaves and joins again), and short-lived leases put by hand come and expire all the time. The
daemon under watch is h1's: its VmRSS and fd count after a warm-up against the end, its routes
and devices before and after.

The churn is fast enough for the bound to catch a leak of 1 KB per peer event: after the
warm-up (as long as the churn's steady state takes to reach, allocator high-water marks
included) there are several thousand peer events, so such a leak would grow VmRSS by more than
the allowed growth; the test checks that sum before it trusts a pass.

`FLANNEL_UDP_SOAK_SECONDS` sets the length (default 35; the full soak is 600).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import lease_key

from flannel_udp.lab import Host, Topology, wait_until
from flannel_udp.stores.local import LocalStore

pytestmark = pytest.mark.netns

SOAK_SECONDS = float(os.environ.get("FLANNEL_UDP_SOAK_SECONDS", "35"))
RSS_GROWTH_LIMIT_KB = 1536
EPHEMERAL_TTL = 1.0  # seconds a hand-put lease lives
JOINS_PER_TICK = 40  # hand-put leases each half-second tick, each expiring 1 s later
WARMUP_SECONDS = 10.0
DETECTABLE_LEAK_KB = 1  # per peer event


async def put_ephemeral(store: LocalStore, keys: list[str]) -> None:
    for key in keys:
        await store.put_lease(key, b'{"PublicIP":"192.168.77.200","PublicIPv6":null}',
                              EPHEMERAL_TTL)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def steady_fd_count(pid: int) -> int:
    # A status request or a netlink query may hold an fd for a moment: the fewest of a few
    # looks is the steady count.
    counts = []
    for _ in range(5):
        counts.append(fd_count(pid))
        time.sleep(0.05)
    return min(counts)


def footprint(host: Host) -> tuple[list, list]:
    """The host's routes and links (names, kinds), to compare before and after."""
    routes = sorted(str(sorted(r.items())) for r in host.ip_json("route", "show"))
    links = sorted(link["ifname"] for link in host.ip_json("link", "show"))
    return routes, links


def test_soak_memory_and_fds_flat_with_peers_churning_under_traffic(topology):
    topo: Topology = topology(3)
    h1, h2, h3 = topo.hosts
    topo.start_daemons(hosts=[h1, h2])
    p1, p2 = topo.add_pod(h1), topo.add_pod(h2)
    assert h1.daemon is not None
    pid = h1.daemon.pid
    store = LocalStore(topo.store_path)
    # 80 a second living 1 s: 150 subnets in turn are never still taken when they come round.
    ephemeral = (f"10.244.{i}.0-24" for i in itertools.cycle(range(100, 250)))
    stream = p1.iperf3_start(p2, p2.address, "-u", "-b", "20M", seconds=int(SOAK_SECONDS) + 2)

    warmup = min(WARMUP_SECONDS, SOAK_SECONDS / 3)
    started = time.monotonic()
    baseline = None
    events_after_warmup = 0
    h3_running = False
    stops = 0
    failed_pings = []
    tick = 0
    while time.monotonic() - started < SOAK_SECONDS:
        tick += 1
        asyncio.run(put_ephemeral(store, [next(ephemeral) for _ in range(JOINS_PER_TICK)]))
        if baseline is not None:
            events_after_warmup += 2 * JOINS_PER_TICK  # each joins, then expires
        if tick % 8 == 0:  # every 4 s h3 joins or leaves
            if h3_running:
                stops += 1
                h3.stop_flannel(signal.SIGKILL if stops % 2 else signal.SIGTERM)
                if stops % 2 == 0:
                    lease = h3.subnet_env()["FLANNEL_SUBNET"].replace(".1/", ".0/")
                    asyncio.run(store.delete_lease(lease_key(lease)))
            else:
                h3.start_flannel(topo.store_path)
            h3_running = not h3_running
        if tick % 6 == 0:
            result = p2.ping(p1.address, count=2, interval=0.05)[p1.address]
            if not result.ok:
                failed_pings.append((round(time.monotonic() - started, 1), result.errors))
        if baseline is None and time.monotonic() - started >= warmup:
            baseline = (rss_kb(pid), steady_fd_count(pid), footprint(h1))
        time.sleep(0.5)
        assert h1.daemon.poll() is None, f"h1's daemon died: {h1.log_tail(5)}"
        assert h2.daemon is not None and h2.daemon.poll() is None, h2.log_tail(5)

    report = stream.result()
    assert baseline is not None
    rss_start, fds_start, (routes_start, links_start) = baseline
    # Let the last hand-put leases expire, so the route table is back to its size at warm-up.
    if h3_running:
        h3.stop_flannel(signal.SIGTERM)
    time.sleep(EPHEMERAL_TTL + 1)
    rss_end, fds_end = rss_kb(pid), steady_fd_count(pid)
    print(f"soak {SOAK_SECONDS:g} s: h1 VmRSS {rss_start} -> {rss_end} kB, fds {fds_start} -> "
          f"{fds_end}; {events_after_warmup} peer events after the warm-up; "
          f"h3 stopped {stops} times; UDP stream "
          f"{report['end']['sum']['packets']} packets, {report['end']['sum']['lost_percent']:.2f}%"
          " lost")
    assert not failed_pings, f"(seconds into the soak, errors) of failed pings: {failed_pings}"
    assert events_after_warmup * DETECTABLE_LEAK_KB > RSS_GROWTH_LIMIT_KB, (
        f"only {events_after_warmup} peer events after the warm-up: too few to show a leak of "
        f"{DETECTABLE_LEAK_KB} KB per event (raise FLANNEL_UDP_SOAK_SECONDS)")
    assert rss_end - rss_start < RSS_GROWTH_LIMIT_KB, (
        f"h1's VmRSS grew {rss_end - rss_start} kB ({rss_start} -> {rss_end}) over "
        f"{events_after_warmup} peer events")
    assert fds_end == fds_start, f"h1's fds {fds_start} -> {fds_end}"
    assert footprint(h1) == (routes_start, links_start), "h1's routes or links changed"
    assert report["end"]["sum"]["packets"] > 0
    wait_until(lambda: not [p for p in h1.status()["peers"]
                            if p["public_ip"] == "192.168.77.200"], 3,
               "the hand-put leases to be gone from h1's table")
