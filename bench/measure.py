"""The measurements: iperf3 TCP and UDP tests, ping RTT percentiles idle and under load, the
flannel-udp daemons' CPU time and peak RSS read from /proc, and the peak RSS of one daemon with
5,000 peers in its table. Each returns plain data for the JSON report."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from bench.cases import Endpoints
from flannel_udp.lab import Host, Netns, NetnsError, Topology, wait_until
from flannel_udp.lease import LEASE_TTL, encode_lease_value, subnet_key
from flannel_udp.stores.local import LocalStore

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PING_INTERVAL = 0.01  # s; below 0.2 s needs root, which the bench is
LOAD_RAMP = 0.5  # s of TCP load before the pings under load start
LOADED_STREAMS = (1, 4)  # the `loaded` test's TCP loads
RR_PORT = 5301  # the request/response loop's echo server (iperf3 has 5201)
RR_SIZE = 64  # bytes of each request and of its answer
MANY_PEERS_NETWORK = IPv4Network("10.0.0.0/8")
MANY_PEERS_SUBNET_LEN = 24
# Public IPs of the fake peers: never sent to (the bench sends no traffic in that test).
MANY_PEERS_PUBLIC_BASE = IPv4Address("100.64.0.0")
MB = 1e6

Say = Callable[[str], None]


# -- the daemons, from /proc -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # stat fields 14 and 15
    return (utime + stime) / CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size (VmHWM in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise NetnsError(f"no VmHWM in /proc/{pid}/status")


def _daemon_pid(host: Host) -> int:
    if host.daemon is None or host.daemon.poll() is not None:
        raise NetnsError(f"{host.label}: its flannel-udp daemon is not running")
    # `ip netns exec` execs the daemon: the Popen's pid is the daemon itself.
    return host.daemon.pid


def daemons_cpu_seconds(hosts: Sequence[Host]) -> float:
    return sum(cpu_seconds(_daemon_pid(h)) for h in hosts)


def daemons_peak_rss(hosts: Sequence[Host]) -> dict[str, Any] | None:
    """Peak RSS of each host's daemon and the largest, in MB; None without daemons."""
    if not hosts:
        return None
    each = {h.label: round(peak_rss_bytes(_daemon_pid(h)) / MB, 1) for h in hosts}
    return {"max_mb": max(each.values()), "each_mb": each}


# -- iperf3 -----------------------------------------------------------------------------------


def tcp(ends: Endpoints, streams: int, seconds: int, ipv6: bool = False) -> dict[str, Any]:
    """iperf3 TCP with `streams` parallel streams (to the server's IPv6 address with `ipv6`);
    the receiver's rate, and the daemons' CPU seconds per GB received over the test."""
    address = ends.address6 if ipv6 else ends.address
    if address is None:
        raise NetnsError(f"{ends.server.name} has no IPv6 address")
    cpu_before = daemons_cpu_seconds(ends.daemons)
    report = ends.client.iperf3(ends.server, address, "-P", str(streams), seconds=seconds)
    cpu = daemons_cpu_seconds(ends.daemons) - cpu_before
    received = report["end"]["sum_received"]
    result: dict[str, Any] = {
        "streams": streams,
        "gbit_s": received["bits_per_second"] / 1e9,
        "bytes": received["bytes"],
        "seconds": received["seconds"],
        "retransmits": report["end"]["sum_sent"].get("retransmits"),
        "daemon_cpu_s": None,
        "cpu_s_per_gb": None,
    }
    if ends.daemons:
        result["daemon_cpu_s"] = round(cpu, 3)
        result["cpu_s_per_gb"] = cpu / (received["bytes"] / 1e9) if received["bytes"] else None
    return result


def udp(ends: Endpoints, payload: int, seconds: int) -> dict[str, Any]:
    """iperf3 UDP with `payload`-byte datagrams, sent as fast as one iperf3 sender can
    (`-b 0`); what the receiver got: rate, packets per second and loss."""
    report = ends.client.iperf3(ends.server, ends.address, "-u", "-l", str(payload), "-b", "0",
                                seconds=seconds)
    received = report["end"]["sum_received"]
    sent = received["packets"]  # the receiver's count of what was sent, by sequence number
    lost = max(0, received["lost_packets"])
    return {
        "payload_bytes": payload,
        "gbit_s": received["bits_per_second"] / 1e9,
        "pps": (sent - lost) / received["seconds"],
        "sent_pps": sent / received["seconds"],
        "loss": lost / sent if sent else None,
        "packets": sent,
        "lost_packets": lost,
        "seconds": received["seconds"],
    }


# -- ping -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ping(src: Netns, dst: str, count: int) -> dict[str, Any]:
    """`count` echoes, PING_INTERVAL apart, with iputils ping (the kernel timestamps replies,
    so the pinger's own scheduling delay under load does not count); RTTs in microseconds."""
    result = src.run("ping", "-n", "-i", str(PING_INTERVAL), "-c", str(count), "-W", "1", dst,
                     check=False, timeout=count * PING_INTERVAL * 3 + 30)
    if result.returncode not in (0, 1):  # 1: some echoes unanswered, a result not an error
        raise NetnsError(f"[{src.name}] ping {dst}: exit {result.returncode}: "
                         f"{result.stderr.strip() or result.stdout.strip()}")
    rtts = [float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms", result.stdout)]
    sent = re.search(r"(\d+) packets transmitted", result.stdout)
    transmitted = int(sent.group(1)) if sent else count
    return {
        "p50_us": round(percentile(rtts, 50), 1) if rtts else None,
        "p99_us": round(percentile(rtts, 99), 1) if rtts else None,
        "mean_us": round(sum(rtts) / len(rtts), 1) if rtts else None,
        "sent": transmitted,
        "received": len(rtts),
        "loss": 1 - len(rtts) / transmitted if transmitted else None,
    }


def ping_idle_and_loaded(ends: Endpoints, seconds: int) -> dict[str, Any]:
    """Ping RTTs on the idle path, then while one TCP stream fills it in the same direction."""
    count = max(50, int(seconds / PING_INTERVAL))
    idle = ping(ends.client, ends.address, count)
    # Long enough to outlast the pings even when the load stretches their schedule a little.
    load = ends.client.iperf3_start(ends.server, ends.address,
                                    seconds=math.ceil(LOAD_RAMP + count * PING_INTERVAL * 1.2))
    time.sleep(LOAD_RAMP)  # let the stream fill the queues first
    loaded = ping(ends.client, ends.address, count)
    loaded["load_gbit_s"] = load.result()["end"]["sum_received"]["bits_per_second"] / 1e9
    return {"idle": idle, "load": loaded}


def latency_under_load(ends: Endpoints, seconds: int) -> dict[str, Any]:
    """For 1 and 4 TCP streams (iperf3, client to server): while they run, ping and a TCP
    request/response loop (RR_SIZE bytes each way, TCP_NODELAY, one connection) side by side,
    PING_INTERVAL apart each, `seconds` long; p50/p99 of both, and what the load carried."""
    count = max(50, int(seconds / PING_INTERVAL))
    out: dict[str, Any] = {}
    for streams in LOADED_STREAMS:
        echo = ends.server.tcp_echo(ends.address, RR_PORT, timeout=60)
        try:
            load = ends.client.iperf3_start(
                ends.server, ends.address, "-P", str(streams),
                seconds=math.ceil(LOAD_RAMP + count * PING_INTERVAL * 1.5))
            time.sleep(LOAD_RAMP)
            with ThreadPoolExecutor(2) as pool:
                pinged = pool.submit(ping, ends.client, ends.address, count)
                rr = pool.submit(ends.client.tcp_rr, ends.address, RR_PORT, count, RR_SIZE,
                                 PING_INTERVAL)
                pings, rtts = pinged.result(), rr.result()
            report = load.result()
        finally:
            echo.kill()
            echo.wait()
        out[f"s{streams}"] = {
            "streams": streams,
            "ping": pings,
            "rr": {"p50_us": round(percentile(rtts, 50), 1),
                   "p99_us": round(percentile(rtts, 99), 1),
                   "mean_us": round(sum(rtts) / len(rtts), 1), "count": len(rtts),
                   "size_bytes": RR_SIZE},
            "load_gbit_s": report["end"]["sum_received"]["bits_per_second"] / 1e9,
            "retransmits": report["end"]["sum_sent"].get("retransmits"),
        }
    return out


# -- one daemon, many peers -------------------------------------------------------------------


def many_peers_config() -> dict[str, Any]:
    return {"Network": str(MANY_PEERS_NETWORK), "SubnetLen": MANY_PEERS_SUBNET_LEN,
            "Backend": {"Type": "udp"}}


async def _write_peer_leases(store: LocalStore, peers: int, say: Say) -> None:
    await store.set_config(json.dumps(many_peers_config()).encode())
    step = 1 << (32 - MANY_PEERS_SUBNET_LEN)
    first = int(MANY_PEERS_NETWORK.network_address)
    for i in range(1, peers + 1):  # from the second subnet, flannel's SubnetMin
        subnet = IPv4Network((first + i * step, MANY_PEERS_SUBNET_LEN))
        await store.put_lease(subnet_key(subnet),
                              encode_lease_value(MANY_PEERS_PUBLIC_BASE + i), LEASE_TTL)
        if i % 1000 == 0:
            say(f"    {i} leases written")


def many_peers_rss(topo: Topology, host: Host, peers: int, say: Say) -> dict[str, Any]:
    """Write `peers` flannel udp leases into a fresh store, start one daemon on it in `host`,
    wait until `flannel-udp status --json` lists them all, and read its peak RSS."""
    store_path = topo.dir / f"store-{peers}-peers.msgpack"
    started = time.monotonic()
    asyncio.run(_write_peer_leases(LocalStore(store_path), peers, say))
    write_seconds = time.monotonic() - started
    say(f"    starting one daemon on them ({host.label}) ...")
    started = time.monotonic()
    host.start_flannel(store_path)
    try:
        host.wait_ready(60)
        # `reachable`: the backend took the peer into its route table, not just the manager.
        wait_until(lambda: sum(p.get("reachable", True) for p in host.status()["peers"])
                   >= peers, 60, f"{host.label}'s daemon to list {peers} reachable peers",
                   interval=0.5)
        listed_seconds = time.monotonic() - started
        pid = _daemon_pid(host)
        rss = peak_rss_bytes(pid)
        cpu = cpu_seconds(pid)
    except NetnsError:
        host.stop_flannel()
        raise
    host.stop_flannel()
    return {
        "peers": peers,
        "peak_rss_mb": round(rss / MB, 1),
        "daemon_cpu_s": round(cpu, 2),
        "seconds_to_list_all": round(listed_seconds, 2),
        "seconds_to_write_leases": round(write_seconds, 2),
        "network": str(MANY_PEERS_NETWORK),
        "subnet_len": MANY_PEERS_SUBNET_LEN,
    }
