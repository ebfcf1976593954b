"""What the bench makes of its results: ratios to kernel VXLAN, the issue's targets as pass/fail
lines, the terminal table, the JSON file and the optional PNG chart (matplotlib)."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cases import REFERENCE
from flannel_udp.demo import text_table


@dataclass(frozen=True)
class Metric:
    key: str  # dotted path into a case's results, also the key of its ratio
    label: str
    fmt: Callable[[float], str]
    kernel_has_it: bool = True  # False: a daemon figure, "n/a" for the kernel cases
    ratio: bool = True  # False: a ratio means nothing (loss)


def _gbit(v: float) -> str:
    return f"{v:.2f}"


def _pct(v: float) -> str:
    return f"{v * 100:.2f}%"


def _us(v: float) -> str:
    return f"{v:.0f}"


METRICS = (
    Metric("tcp1.gbit_s", "TCP 1 stream, Gbit/s", _gbit),
    Metric("tcp1v6.gbit_s", "TCP 1 stream IPv6, Gbit/s", _gbit),
    Metric("tcp4.gbit_s", "TCP 4 streams, Gbit/s", _gbit),
    Metric("udp1400.gbit_s", "UDP 1400 B, Gbit/s received", _gbit),
    Metric("udp1400.loss", "UDP 1400 B, loss", _pct, ratio=False),
    Metric("small.pps", "UDP 64 B, kpps received", lambda v: f"{v / 1000:.0f}"),
    Metric("small.loss", "UDP 64 B, loss", _pct, ratio=False),
    Metric("ping.idle.p50_us", "ping idle p50, us", _us),
    Metric("ping.idle.p99_us", "ping idle p99, us", _us),
    Metric("ping.load.p50_us", "ping under load p50, us", _us),
    Metric("ping.load.p99_us", "ping under load p99, us", _us),
    *(Metric(f"loaded.s{n}.{probe}.{p}_us", f"{what} {p} under {n} TCP stream{'s' * (n > 1)}, us",
             _us)
      for n in (1, 4) for probe, what in (("ping", "ping"), ("rr", "TCP req/resp"))
      for p in ("p50", "p99")),
    Metric("tcp1.cpu_s_per_gb", "daemons' CPU s per GB (TCP 1)", lambda v: f"{v:.2f}",
           kernel_has_it=False),
    Metric("daemons.peak_rss.max_mb", "daemon peak RSS, MB", lambda v: f"{v:.1f}",
           kernel_has_it=False),
)


@dataclass(frozen=True)
class Target:
    label: str
    metric: str
    kind: str  # "ratio": value / kernel's; "added": value - kernel's; "absolute": value
    op: str
    limit: float
    unit: str


# The targets for flannel-udp against kernel VXLAN (reported, never asserted).
TARGETS = (
    Target("TCP 1 stream >= 0.25x kernel VXLAN", "tcp1.gbit_s", "ratio", ">=", 0.25, "x"),
    Target("UDP 64 B pps >= 0.5x kernel VXLAN", "small.pps", "ratio", ">=", 0.5, "x"),
    Target("ping p50 (idle) < kernel VXLAN's + 50 us", "ping.idle.p50_us", "added", "<", 50,
           " us"),
    # Issue 16: latency under load (the `loaded` test), with the daemon's default settings.
    Target("under 1 TCP stream: ping p50 <= 200 us", "loaded.s1.ping.p50_us", "absolute",
           "<=", 200, " us"),
    Target("under 1 TCP stream: ping p99 <= 1000 us", "loaded.s1.ping.p99_us", "absolute",
           "<=", 1000, " us"),
    Target("4 TCP streams >= 0.5x kernel VXLAN", "tcp4.gbit_s", "ratio", ">=", 0.5, "x"),
)
RSS_TARGET_MB = 64
_OPS = {">=": operator.ge, "<": operator.lt, "<=": operator.le}


def lookup(tree: dict[str, Any] | None, key: str) -> Any:
    """`tree[a][b][c]` for key "a.b.c"; None when any part is missing."""
    for part in key.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every metric of every measured case divided by kernel VXLAN's."""
    reference = results["cases"].get(REFERENCE)
    out: dict[str, dict[str, float]] = {}
    if not reference or reference.get("status") != "measured":
        return out
    for name, case in results["cases"].items():
        if case.get("status") != "measured":
            continue
        for metric in METRICS:
            value, ref = _number(lookup(case, metric.key)), _number(lookup(reference, metric.key))
            if metric.ratio and value is not None and ref:
                out.setdefault(name, {})[metric.key] = round(value / ref, 4)
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, one line each: value, limit, pass (None when not measurable, with
    the reason)."""
    lines = []
    reference = results["cases"].get(REFERENCE)
    for name, case in results["cases"].items():
        if case.get("kernel"):
            continue
        for t in TARGETS:
            line: dict[str, Any] = {"case": name, "target": t.label, "limit": t.limit,
                                    "unit": t.unit.strip(), "value": None, "pass": None}
            value = _number(lookup(case, t.metric))
            ref = _number(lookup(reference, t.metric))
            if case.get("status") != "measured":
                line["reason"] = case.get("status")
            elif t.kind == "absolute":
                if value is None:
                    line["reason"] = "not measured"
                else:
                    line["value"] = value
                    line["pass"] = _OPS[t.op](value, t.limit)
            elif reference is None or reference.get("status") != "measured":
                line["reason"] = f"{REFERENCE} not measured"
            elif value is None or ref is None:
                line["reason"] = "not measured"
            elif t.kind == "ratio" and ref == 0:
                line["reason"] = f"{REFERENCE} measured 0"
            else:
                line["value"] = round(value / ref if t.kind == "ratio" else value - ref, 3)
                line["pass"] = _OPS[t.op](line["value"], t.limit)
            lines.append(line)
    many = results.get("rss5000")
    if many is not None:
        line = {"case": "udp", "target": f"{many.get('peers', 5000):,}-peer daemon peak RSS < "
                f"{RSS_TARGET_MB} MB", "limit": RSS_TARGET_MB, "unit": "MB",
                "value": many.get("peak_rss_mb"), "pass": None}
        if line["value"] is None:
            line["reason"] = many.get("error", "not measured")
        else:
            line["pass"] = line["value"] < RSS_TARGET_MB
        lines.append(line)
    return lines


def _cell(case: dict[str, Any], name: str, metric: Metric,
          case_ratios: dict[str, float]) -> str:
    status = case.get("status")
    if status != "measured":
        return status or "-"
    if case.get("kernel") and not metric.kernel_has_it:
        return "n/a"
    test = metric.key.split(".")[0]
    if isinstance(case.get(test), dict) and "error" in case[test]:
        return "error"
    if isinstance(case.get(test), dict) and "not available" in case[test]:
        return "no IPv6" if test == "tcp1v6" else "not available"
    value = _number(lookup(case, metric.key))
    if value is None:
        return "-"
    text = metric.fmt(value)
    ratio = case_ratios.get(metric.key)
    if ratio is not None and name != REFERENCE:
        text += f" ({ratio:.2f}x)"
    return text


def table(results: dict[str, Any]) -> str:
    """The terminal table: a row per metric, a column per case, ratios to kernel VXLAN."""
    names = list(results["cases"])
    all_ratios = results.get("ratios", {})
    selected = [t for t in results["settings"]["tests"] if t != "rss5000"]
    rows = []
    for metric in METRICS:
        test = metric.key.split(".")[0]
        if test in selected or (test == "daemons" and selected):
            rows.append([metric.label] + [_cell(results["cases"][n], n, metric,
                                                all_ratios.get(n, {})) for n in names])
    lines = [text_table(["metric (ratio to kernel VXLAN)"] + names, rows)] if names else []
    for name, case in results["cases"].items():
        if case.get("reason"):
            lines.append(f"  {name}: {case['status']}: {case['reason']}")
        for test, value in case.items():
            if isinstance(value, dict) and "error" in value:
                lines.append(f"  {name} {test}: error: {value['error']}")
            if isinstance(value, dict) and "not available" in value:
                lines.append(f"  {name} {test}: not available: {value['not available']}")
    many = results.get("rss5000")
    if many is not None:
        if "error" in many:
            lines.append(f"  one daemon with {many['peers']:,} peers: error: {many['error']}")
        else:
            lines.append(f"  one daemon with {many['peers']:,} peers: peak RSS "
                         f"{many['peak_rss_mb']:.1f} MB, all listed "
                         f"{many['seconds_to_list_all']:.1f} s after its start")
    if results.get("targets"):
        lines.append("\n  targets of issues 5 and 16 (reported, not enforced):")
        width = max(len(t["case"]) for t in results["targets"])
        for t in results["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
            value = (t.get("reason") if t["value"] is None
                     else f"{t['value']:g}{'x' if t['unit'] == 'x' else ' ' + t['unit']}")
            lines.append(f"    {verdict}  {t['case']:<{width}} {t['target']:<42} {value}")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


COLORS = {"underlay": "tab:gray", REFERENCE: "tab:blue", "udp": "tab:orange",
          "vxlan": "tab:green", "kernel-to-vxlan": "tab:cyan", "udp-busypoll": "tab:red",
          "vxlan-busypoll": "tab:olive"}


def _grouped(ax: Any, title: str, groups: list[str],
             series: dict[str, list[float | None]], log: bool = False) -> None:
    """Bars of each series (a case) side by side in each group, one color per case."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], [v or 0 for v in values], width,
               label=name, color=COLORS.get(name))
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    if series:
        ax.legend(fontsize=8)


def write_chart(results: dict[str, Any], path: Path) -> str | None:
    """Draw the chart into `path`; None when done, else why not (matplotlib is optional)."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    cases = {n: c for n, c in results["cases"].items() if c.get("status") == "measured"}
    ours = {n: c for n, c in cases.items() if not c.get("kernel")}

    def series(of: dict[str, Any], keys: list[str], scale: float = 1) -> dict[str, list]:
        return {n: [None if (v := _number(lookup(c, k))) is None else v * scale for k in keys]
                for n, c in of.items()}

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    _grouped(axes[0, 0], "throughput, Gbit/s", ["TCP 1", "TCP 1 v6", "TCP 4", "UDP 1400 B"],
             series(cases, ["tcp1.gbit_s", "tcp1v6.gbit_s", "tcp4.gbit_s", "udp1400.gbit_s"]))
    _grouped(axes[0, 1], "UDP 64 B, kpps received", ["64 B"],
             series(cases, ["small.pps"], 1e-3))
    _grouped(axes[0, 2], "ping RTT, us (log scale; 1/4: under 1/4 TCP streams)",
             ["idle p50", "idle p99", "load p50", "load p99", "1 p50", "1 p99", "4 p50",
              "4 p99"],
             series(cases, ["ping.idle.p50_us", "ping.idle.p99_us", "ping.load.p50_us",
                            "ping.load.p99_us", "loaded.s1.ping.p50_us",
                            "loaded.s1.ping.p99_us", "loaded.s4.ping.p50_us",
                            "loaded.s4.ping.p99_us"]), log=True)
    _grouped(axes[1, 0], "flannel-udp daemons' CPU s per GB", ["TCP 1", "TCP 4"],
             series(ours, ["tcp1.cpu_s_per_gb", "tcp4.cpu_s_per_gb"]))
    many = results.get("rss5000") or {}
    many_mb = _number(many.get("peak_rss_mb"))  # a udp daemon's
    rss = {n: [v[0], many_mb if n == "udp" else None]
           for n, v in series(ours, ["daemons.peak_rss.max_mb"]).items()}
    if many_mb is not None and "udp" not in rss:
        rss["udp"] = [None, many_mb]
    _grouped(axes[1, 1], f"daemon peak RSS, MB (target {RSS_TARGET_MB})",
             ["in the cases (2 hosts)", f"{many.get('peers', 5000):,} peers"], rss)
    axes[1, 1].axhline(RSS_TARGET_MB, color="red", linestyle="--", linewidth=1)
    ratio_keys = ["tcp1.gbit_s", "tcp1v6.gbit_s", "tcp4.gbit_s", "udp1400.gbit_s", "small.pps"]
    all_ratios = results.get("ratios", {})
    _grouped(axes[1, 2], "ratio to kernel VXLAN (targets 0.25x TCP 1, 0.5x 64 B)",
             ["TCP 1", "TCP 1 v6", "TCP 4", "UDP 1400 B", "64 B pps"],
             {n: [all_ratios[n].get(k) for k in ratio_keys] for n in ours if n in all_ratios})
    axes[1, 2].axhline(0.25, color="red", linestyle="--", linewidth=1)
    axes[1, 2].axhline(0.5, color="orange", linestyle="--", linewidth=1)
    fig.suptitle(f"flannel-udp bench {results['started']}: {results['settings']['duration_s']} s "
                 f"per test, {results['machine']['cores']} cores ({results['command']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
