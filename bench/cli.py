"""`python -m bench`: build one two-host namespace topology, measure each selected case on it in
turn, print the table, write the JSON and the chart, and remove everything it made, also on
failure, Ctrl-C or SIGTERM. Nothing leaves the bench's namespaces."""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import measure, report, scale
from bench.cases import CASES, Case, Endpoints
from flannel_udp.lab import (
    UNDERLAY_MTU,
    NetnsError,
    Topology,
    check_environment,
    remove_stale,
    sigterm_as_interrupt,
)

SCHEMA = "flannel-udp-bench/1"
TESTS = ("tcp1", "tcp1v6", "tcp4", "udp1400", "small", "ping", "loaded", "rss5000")
DEFAULT_DURATION = 5
QUICK_DURATION = 1
MANY_PEERS = 5000
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCALE = "scale"  # not a dataplane: etcd with many leases around two daemons (bench/scale.py)
DATAPLANES = "scale_kernel_dataplanes"  # host-gw and kernel VXLAN with many peers
PAUSE = 0.2  # s between tests, so that queues of the last one have drained


def _say(text: str = "") -> None:
    print(text, flush=True)


def _numbers(text: str) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers >= 1")
    return numbers


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{','.join(unknown) or 'nothing'}: choose from "
                                             f"{','.join(allowed)}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure flannel-udp against the bare underlay and kernel VXLAN on one "
                    "two-host namespace topology (needs root, iperf3, ping).")
    parser.add_argument("--cases", type=_names((*CASES, SCALE)), metavar="LIST",
                        help=f"comma-separated, of {','.join(CASES)},{SCALE} (default all but "
                        f"{SCALE} and the -qN ones (--queues N); with --quick not the -busypoll "
                        "ones either)")
    parser.add_argument("--tests", type=_names(TESTS), default=list(TESTS), metavar="LIST",
                        help=f"comma-separated, of {','.join(TESTS)} (default all)")
    parser.add_argument("--duration", type=int, metavar="SECONDS",
                        help=f"of each iperf3 test and each ping series (default "
                             f"{DEFAULT_DURATION}; {QUICK_DURATION} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_DURATION} s per test, and no -busypoll cases unless "
                             "--cases names them: about a minute and a half")
    parser.add_argument("--output", type=Path, metavar="PATH",
                        help="the JSON file (default bench/results/<timestamp>.json)")
    parser.add_argument("--chart", type=Path, metavar="PATH",
                        help="the PNG chart (default: the JSON path with .png)")
    parser.add_argument("--no-chart", action="store_true", help="draw no chart")
    group = parser.add_argument_group(f"the {SCALE} case (etcd v3, two udp daemons)")
    group.add_argument("--leases", type=_numbers, default=[5000], metavar="LIST",
                       help="comma-separated lease counts, one run each (default 5000)")
    group.add_argument("--churn", type=_numbers, default=[50], metavar="LIST",
                       help="lease events per second under churn: one for every size, or one "
                            "per size (default 50)")
    group.add_argument("--churn-seconds", type=int, default=30, metavar="SECONDS",
                       help="how long the churn lasts (default %(default)s)")
    group.add_argument("--kernel-peers", type=int, default=5000, metavar="N",
                       help="host-gw and the kernel VXLAN dataplane with N peers: start-up and "
                            "resync times (default %(default)s; 0: not measured)")
    group.add_argument("--burst", type=int, default=20000, metavar="N",
                       help="leases put at once, then deleted at once, after the churn "
                            "(default %(default)s; 0: none)")
    return parser


def selected_cases(requested: list[str] | None, quick: bool) -> list[str]:
    """The dataplane cases to run, in CASES order (the reference first): those requested, else
    all but the queue settings (-qN, run only when named) and, with --quick, the -busypoll ones.
    (SCALE runs only when named.)"""
    return [name for name in CASES if name in requested] if requested else [
        name for name in CASES if not (quick and name.endswith("-busypoll"))
        and not re.search(r"-q\d+$", name)]


def _missing_tools() -> str | None:
    for tool, package in (("iperf3", "iperf3"), ("ping", "iputils-ping"), ("ss", "iproute2")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH (apt-get install {package})"
    return None


def _machine() -> dict[str, Any]:
    iperf = (subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout
             if shutil.which("iperf3") else "")
    return {"cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(),
            "iperf3": iperf.split()[1] if iperf.split()[1:] else None,
            "loadavg_start": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> int:
    """0 when every selected case and test ran, 1 when some failed, 2 when this machine can't
    run the bench, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    if duration < 1:
        print("python -m bench: --duration must be at least 1 s", file=sys.stderr)
        return 2
    with_scale = SCALE in (args.cases or [])
    only_scale = with_scale and args.cases == [SCALE]
    rates = args.churn * len(args.leases) if len(args.churn) == 1 else args.churn
    if with_scale and len(rates) != len(args.leases):
        print("python -m bench: --churn: one rate, or one per --leases size", file=sys.stderr)
        return 2
    if args.churn_seconds < 1 or args.burst < 0 or args.kernel_peers < 0:
        print("python -m bench: --churn-seconds must be at least 1, --burst and "
              "--kernel-peers 0 or more", file=sys.stderr)
        return 2
    problem = check_environment() or (None if only_scale else _missing_tools())
    if with_scale and problem is None:
        from flannel_udp.lab import etcd_problem
        problem = etcd_problem()
    if problem:
        print(f"python -m bench: {problem}", file=sys.stderr)
        return 2
    cases = [] if only_scale else selected_cases(
        [c for c in args.cases or [] if c != SCALE] or None, args.quick)
    tests = [] if only_scale else [name for name in TESTS if name in args.tests]
    started = datetime.now()
    output = args.output or RESULTS_DIR / f"{started:%Y%m%d-%H%M%S}.json"
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {"duration_s": duration, "cases": cases, "tests": tests,
                     "quick": args.quick, "small_packet_method": "iperf3 -u -l 64 -b 0",
                     "ping_method": f"iputils ping -i {measure.PING_INTERVAL}",
                     **({"scale": {"leases": args.leases, "churn": rates,
                                   "churn_seconds": args.churn_seconds, "burst": args.burst,
                                   "kernel_peers": args.kernel_peers}}
                        if with_scale else {})},
        "topology": {"hosts": 2, "underlay": "veth to a bridge in its own namespace",
                     "underlay_mtu": UNDERLAY_MTU, "dual_stack": True},
        "cases": {},
    }
    remove_stale()
    clock = time.monotonic()
    topo: Topology | None = None
    try:
        with sigterm_as_interrupt():
            topo = Topology(2, ipv6=True)  # dual stack: tcp1v6 runs over fd77::/64
            with topo:
                _say(f"flannel-udp bench: 2 hosts on a bridge, namespaces {topo.prefix}-*, "
                     f"{duration} s per test; cases {','.join(cases)}; tests {','.join(tests)}")
                _run(topo, cases, tests, duration, results)
                if with_scale:
                    try:
                        results[SCALE] = scale.run_scale(topo, args.leases, rates,
                                                         args.churn_seconds, args.burst, _say)
                    except NetnsError as e:
                        _say(f"    scale: error: {e}")
                        tails = topo.log_tails(10)
                        if tails:
                            _say(tails)
                        results[SCALE] = {"error": str(e)}
                    if args.kernel_peers:
                        try:
                            results[DATAPLANES] = scale.run_dataplanes(topo, args.kernel_peers,
                                                                       _say)
                        except NetnsError as e:
                            _say(f"    kernel data planes: error: {e}")
                            results[DATAPLANES] = {"error": str(e)}
                _say(f"removing {len(topo.namespaces)} namespaces ...")
    except KeyboardInterrupt:
        _say(f"\ninterrupted: no results written; {_left_behind(topo)}")
        return 130
    except NetnsError as e:
        _say(f"FAILED: {e}; {_left_behind(topo)}")
        return 1
    results["seconds"] = round(time.monotonic() - clock, 1)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    chart = None if args.no_chart else (args.chart or output.with_suffix(".png"))
    why_no_chart = report.write_chart(results, chart) if chart else "--no-chart"
    results["chart"] = str(chart) if chart and why_no_chart is None else None
    report.write_json(results, output)
    _say()
    if cases or tests:
        _say(report.table(results))
        _say()
    if SCALE in results:
        _say(scale.table(results[SCALE], results.get(DATAPLANES)))
        _say()
    _say(f"JSON: {output}")
    _say(f"chart: {results['chart'] or 'none, ' + why_no_chart}")
    load = results["machine"]
    _say(f"done in {results['seconds']:.0f} s; load average {load['loadavg_start'][0]:.2f} "
         f"before, {load['loadavg_end'][0]:.2f} after; {_left_behind(topo)}")
    failed = any(c.get("status") == "failed" or any(isinstance(v, dict) and "error" in v
                                                    for v in c.values())
                 for c in results["cases"].values())
    failed = failed or "error" in results.get(DATAPLANES, {}) or "error" in results.get(
        SCALE, {}) or any("error" in r for r in results.get(SCALE, {}).values()
                          if isinstance(r, dict))
    return 1 if failed or "error" in results.get("rss5000", {}) else 0


def _left_behind(topo: Topology | None) -> str:
    leftovers = topo.leftovers() if topo is not None else []
    if leftovers:
        return f"could not remove namespaces {', '.join(leftovers)} (ip netns del NAME)"
    return "removed every namespace, process and file the bench made"


def _run(topo: Topology, cases: list[str], tests: list[str], duration: int,
         results: dict[str, Any]) -> None:
    path_tests = [t for t in tests if t != "rss5000"]
    if path_tests:
        for number, name in enumerate(cases, 1):
            case = CASES[name]()
            _say(f"[{number}/{len(cases)}] {name}: {case.title}")
            started = time.monotonic()
            results["cases"][name] = _run_case(topo, case, path_tests, duration)
            results["cases"][name]["seconds"] = round(time.monotonic() - started, 1)
    if "rss5000" in tests:
        _say(f"[rss5000] one udp daemon with {MANY_PEERS:,} peers: writing their leases ...")
        try:
            results["rss5000"] = measure.many_peers_rss(topo, topo.host(1), MANY_PEERS, _say)
            _say(f"    peak RSS {results['rss5000']['peak_rss_mb']:.1f} MB")
        except NetnsError as e:
            _say(f"    error: {e}")
            results["rss5000"] = {"peers": MANY_PEERS, "error": str(e)}


def _run_case(topo: Topology, case: Case, tests: list[str], duration: int) -> dict[str, Any]:
    result: dict[str, Any] = {"title": case.title, "kernel": case.kernel}
    reason = case.unavailable()
    if reason:
        _say(f"    not available: {reason}")
        return {**result, "status": "not available", "reason": reason}
    try:
        ends = case.setup(topo)
    except NetnsError as e:
        _say(f"    setup failed: {e}")
        tails = topo.log_tails(10)
        if tails:
            _say(tails)
        case.teardown(topo)
        return {**result, "status": "failed", "reason": f"setup: {e}"}
    result.update(status="measured", reason=None, path=ends.path, mtu=ends.mtu)
    _say(f"    {ends.path}, MTU {ends.mtu}")
    for test in tests:
        try:
            result[test] = _run_test(test, ends, duration)
        except NetnsError as e:
            _say(f"    {test}: error: {e}")
            result[test] = {"error": str(e)}
        time.sleep(PAUSE)
    if ends.daemons:
        try:
            result["daemons"] = {"peak_rss": measure.daemons_peak_rss(ends.daemons)}
            _say(f"    daemons' peak RSS {result['daemons']['peak_rss']['each_mb']} MB")
        except NetnsError as e:
            result["daemons"] = {"error": str(e)}
    # Only reached without Ctrl-C: an interrupt leaves the removal to the topology's cleanup.
    case.teardown(topo)
    return result


def _run_test(test: str, ends: Endpoints, duration: int) -> dict[str, Any]:
    if test == "tcp1v6" and ends.address6 is None:
        _say(f"    {test:<8} not available: {ends.no_v6}")
        return {"not available": ends.no_v6}
    if test in ("tcp1", "tcp1v6", "tcp4"):
        streams = 4 if test == "tcp4" else 1
        over = " over IPv6" if test == "tcp1v6" else ""
        _say(f"    {test:<8} iperf3 TCP{over}, {streams} stream{'s' * (streams > 1)}, "
             f"{duration} s ...")
        r = measure.tcp(ends, streams, duration, ipv6=test == "tcp1v6")
        cpu = (f", daemons {r['cpu_s_per_gb']:.2f} CPU s/GB"
               if r["cpu_s_per_gb"] is not None else "")
        _say(f"             {r['gbit_s']:.2f} Gbit/s, {r['retransmits']} retransmits{cpu}")
        return r
    if test in ("udp1400", "small"):
        payload = 1400 if test == "udp1400" else 64
        _say(f"    {test:<8} iperf3 UDP, {payload} B payloads, -b 0, {duration} s ...")
        r = measure.udp(ends, payload, duration)
        loss = "?" if r["loss"] is None else f"{r['loss'] * 100:.2f}%"
        _say(f"             {r['gbit_s']:.2f} Gbit/s, {r['pps'] / 1000:.0f} kpps received, "
             f"loss {loss}")
        return r
    if test == "loaded":
        _say(f"    {test:<8} ping and a {measure.RR_SIZE} B TCP request/response loop, every "
             f"{measure.PING_INTERVAL * 1000:.0f} ms, {duration} s under 1, then 4 TCP "
             "streams ...")
        r = measure.latency_under_load(ends, duration)
        for load in r.values():
            ping, rr = load["ping"], load["rr"]
            _say(f"             {load['streams']} stream{'s' * (load['streams'] > 1)}: ping "
                 f"p50 {ping['p50_us']} us, p99 {ping['p99_us']} us; request/response p50 "
                 f"{rr['p50_us']} us, p99 {rr['p99_us']} us; load {load['load_gbit_s']:.2f} "
                 "Gbit/s")
        return r
    _say(f"    {test:<8} ping every {measure.PING_INTERVAL * 1000:.0f} ms, {duration} s idle, "
         f"then {duration} s under one TCP stream ...")
    r = measure.ping_idle_and_loaded(ends, duration)
    for when in ("idle", "load"):
        p = r[when]
        _say(f"             {when:<5} p50 {p['p50_us']} us, p99 {p['p99_us']} us, "
             f"{p['received']}/{p['sent']} answered")
    return r
