"""`flannel-udp demo`: three hosts on a private bridge, one daemon each, one pod each; shows the
leases, pings every pod and flannel0 address from every pod, measures one iperf3 stream, and
removes everything it made, also on Ctrl-C or failure. Nothing leaves the demo's namespaces."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from flannel_udp.lab import (
    DEFAULT_NETWORK_CONFIG,
    Host,
    NetnsError,
    PingResult,
    Pod,
    Topology,
    check_environment,
    remove_stale,
    sigterm_as_interrupt,
)

HOSTS = 3
PING_COUNT = 5


def _say(text: str = "") -> None:
    print(text, flush=True)


def text_table(header: Sequence[str], rows: list[Sequence[Any]], indent: str = "  ") -> str:
    """Left-aligned columns under a dashed rule (the demo's and the bench's tables)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _si(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def run_demo(iperf_seconds: int = 3) -> int:
    """Run the demo; 0 when every ping was answered, 1 when not or on failure, 2 when this
    machine can't run it, 130 on Ctrl-C."""
    reason = check_environment()
    if reason:
        print(f"flannel-udp demo: {reason}", file=sys.stderr)
        return 2
    remove_stale()
    started = time.monotonic()
    topo: Topology | None = None
    try:
        with sigterm_as_interrupt():
            topo = Topology(HOSTS)
            with topo:
                try:
                    code = _run(topo, iperf_seconds)
                except NetnsError as e:
                    _say(f"\nFAILED: {e}")
                    tails = topo.log_tails(15)
                    if tails:
                        _say(f"daemon logs (last lines):\n{tails}")
                    code = 1
                _say(f"cleaning up {len(topo.namespaces)} namespaces ...")
    except KeyboardInterrupt:
        _say("\ninterrupted; " + _left_behind(topo))
        return 130
    except NetnsError as e:  # the harness itself could not build the topology
        _say(f"FAILED: {e}; " + _left_behind(topo))
        return 1
    _say(f"done in {time.monotonic() - started:.1f} s; {_left_behind(topo)}")
    return code


def _left_behind(topo: Topology | None) -> str:
    leftovers = topo.leftovers() if topo is not None else []
    if leftovers:
        return f"could not remove namespaces {', '.join(leftovers)} (ip netns del NAME)"
    return "removed every namespace, process and file the demo made"


def _run(topo: Topology, iperf_seconds: int) -> int:
    _say(f"flannel-udp demo: {HOSTS} hosts on a private bridge, namespaces {topo.prefix}-*")
    _say(f"[1/5] network config {json.dumps(DEFAULT_NETWORK_CONFIG)}, "
         f"lease store {topo.store_path}")
    _say("[2/5] starting a daemon in each host, waiting for leases and peers ...")
    leases = topo.start_daemons(DEFAULT_NETWORK_CONFIG)
    _say(text_table(["host", "namespace", "underlay IP", "subnet", "flannel0", "MTU"],
                    [[h.label, h.name, leases[h.label]["public_ip"],
                      leases[h.label]["subnet"], leases[h.label]["subnet"].split("/")[0],
                      h.subnet_env().get("FLANNEL_MTU")]
                     for h in topo.hosts]))

    _say("[3/5] one pod per host, veth to the host, default route via FLANNEL_SUBNET ...")
    pods = [topo.add_pod(host) for host in topo.hosts]
    for pod in pods:
        _say(f"  {pod.label} {pod.address:<14} on {pod.host.label} (gateway {pod.gateway})")

    flannel0 = {h.label: leases[h.label]["subnet"].split("/")[0] for h in topo.hosts}
    columns = [(p.label, p.address) for p in pods]
    columns += [(f"{label} flannel0", addr) for label, addr in flannel0.items()]
    _say(f"[4/5] traffic: each pod pings every other pod and every flannel0 address "
         f"({PING_COUNT} echoes each) ...")
    pings: dict[tuple[str, str], PingResult] = {}  # (pod label, column) -> result
    for pod in pods:
        targets = {addr: column for column, addr in columns if addr != pod.address}
        results = pod.ping(*targets, count=PING_COUNT, interval=0.1, timeout=1.0)
        for addr, column in targets.items():
            pings[pod.label, column] = results[addr]
    lost = {key: r for key, r in pings.items() if not r.ok}
    _say(f"  {len(pings) - len(lost)} of {len(pings)} targets answered every echo")
    iperf_line = _iperf(pods[0], pods[1], iperf_seconds)

    _say("[5/5] summary")
    _say("  ping: loss and average RTT, from each pod (rows) to each target (columns)")
    _say(text_table(["from"] + [c for c, _ in columns],
                    [[pod.label] + [_ping_cell(pings.get((pod.label, c))) for c, _ in columns]
                     for pod in pods], indent="    "))
    for (src, column), r in sorted(lost.items()):
        errors = "; ".join(sorted(set(r.errors))) or "no answer"
        _say(f"    {src} -> {column}: {r.received}/{r.sent} answered ({errors})")
    _say(f"  iperf3: {iperf_line}")
    _say("  daemon counters (flannel-udp status --json)")
    _say(text_table(["daemon", "peers", "tx pkts", "tx bytes", "rx pkts", "rx bytes",
                     "icmp sent", "drops"], [_counter_row(h) for h in topo.hosts],
                    indent="    "))
    if lost:
        _say(f"RESULT: FAIL, {len(lost)} of {len(pings)} ping targets lost echoes")
        return 1
    _say(f"RESULT: OK, all {len(pings)} ping targets answered every echo")
    return 0


def _ping_cell(result: PingResult | None) -> str:
    if result is None:
        return "-"
    if result.avg_rtt_ms is None:
        return "100% lost"
    loss = "ok" if result.ok else f"{result.loss:.0%} lost"
    return f"{loss} {result.avg_rtt_ms:.2f}ms"


def _counter_row(host: Host) -> list[str]:
    status = host.status()
    c = status.get("counters", {})
    drops = c.get("drops", {})
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(drops.items()) if v) or "0"
    return [host.label, str(len(status.get("peers", []))), _si(c.get("tx_packets", 0)),
            _si(c.get("tx_bytes", 0)) + "B", _si(c.get("rx_packets", 0)),
            _si(c.get("rx_bytes", 0)) + "B", str(c.get("icmp_sent", 0)), dropped]


def _iperf(client: Pod, server: Pod, seconds: int) -> str:
    """One TCP stream client -> server for `seconds`; a one-line result for the summary."""
    if shutil.which("iperf3") is None:
        line = "skipped: iperf3 is not on PATH (install the iperf3 package to measure)"
        _say(f"  iperf3 {line}")
        return line
    if seconds <= 0:
        return "skipped: iperf_seconds is 0"
    _say(f"  iperf3 {client.label} -> {server.label} ({server.address}), {seconds} s, "
         "one TCP stream ...")
    try:
        report = client.iperf3(server, server.address, seconds=seconds)
    except NetnsError as e:
        line = f"failed: {e}"
        _say(f"  iperf3 {line}")
        return line
    received = report["end"]["sum_received"]["bits_per_second"] / 1e9
    retransmits = report["end"].get("sum_sent", {}).get("retransmits", 0)
    line = (f"{client.label} -> {server.label}: {received:.2f} Gbit/s "
            f"({retransmits} retransmits, {seconds} s)")
    _say(f"  {line}")
    return line
