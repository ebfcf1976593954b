"""`/metrics`: the daemon's `status` (the same dict `flannel-udp status` shows) in Prometheus'
text format. Nothing is collected twice: every scrape turns one status snapshot into metric
families (prometheus-client's custom-collector API renders them).

The per-peer series (`flannel_udp_peer_packets`, `_peer_bytes`) are there only while the table
holds at most `run --metrics-peer-limit` peers (default 100): a 5,000-node cluster would give
every node 20,000 series of its own and make every scrape cost the whole table. The totals
(`flannel_udp_peers`, `flannel_udp_routes`, packets, bytes, drops, the programming latency
histogram) are always there."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# The classic text format, which every Prometheus reads (recent prometheus-client releases
# advertise version=1.0.0, for UTF-8 names; ours are plain ASCII, so the text is the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "flannel_udp"


def _offloads(status: dict[str, Any]) -> dict[str, Any]:
    """The fast path's offloads ({name: active}) wherever status carries them; {} if nowhere."""
    for holder in (status, status.get("counters") or {}, status.get("lease") or {}):
        offloads = holder.get("offloads")
        if isinstance(offloads, dict):
            return offloads
    return {}


def families(status: dict[str, Any]) -> Iterator[Metric]:
    """The metric families of one status snapshot."""
    counters = status.get("counters") or {}
    lease = status.get("lease") or {}
    health = status.get("health") or {}

    up = GaugeMetricFamily(f"{PREFIX}_healthy",
                           "1 when the node holds its lease and its data plane runs "
                           "(what /healthz answers 200 for)", labels=["check"])
    for check, ok in sorted(health.items()):
        up.add_metric([check], 1.0 if ok else 0.0)
    up.add_metric(["all"], 1.0 if health and all(health.values()) else 0.0)
    yield up

    info = GaugeMetricFamily(f"{PREFIX}_info", "this node's lease and backend (always 1); "
                             "the ipv6_* labels are empty but in a dual-stack network",
                             labels=["subnet", "public_ip", "backend", "network", "ipv6_subnet",
                                     "public_ipv6", "ipv6_network"])
    if lease:
        # subnet, public_ip and network are None (empty labels) in an IPv6-only network
        info.add_metric([lease.get("subnet") or "", lease.get("public_ip") or "",
                         lease.get("backend", ""), status.get("network") or "",
                         lease.get("ipv6_subnet") or "", lease.get("public_ipv6") or "",
                         status.get("ipv6_network") or ""], 1.0)
    yield info

    if lease.get("expires"):  # a reservation never expires: no sample
        yield GaugeMetricFamily(f"{PREFIX}_lease_expiry_timestamp_seconds",
                                "when our lease expires unless renewed (unix time)",
                                value=float(lease["expires"]))
    if status.get("started"):
        yield GaugeMetricFamily(f"{PREFIX}_start_time_seconds",
                                "when the daemon started (unix time)",
                                value=float(status["started"]))

    packets = CounterMetricFamily(f"{PREFIX}_packets",
                                  "packets forwarded: tx = sent to peers, rx = written to the "
                                  "TUN", labels=["direction"])
    octets = CounterMetricFamily(f"{PREFIX}_bytes", "inner bytes forwarded, as packets",
                                 labels=["direction"])
    for direction in ("tx", "rx"):
        packets.add_metric([direction], counters.get(f"{direction}_packets", 0))
        octets.add_metric([direction], counters.get(f"{direction}_bytes", 0))
    yield packets
    yield octets

    drops = CounterMetricFamily(f"{PREFIX}_drops", "packets dropped, by reason",
                                labels=["reason"])
    for reason, count in sorted((counters.get("drops") or {}).items()):
        drops.add_metric([reason], count)
    yield drops
    yield CounterMetricFamily(f"{PREFIX}_icmp_unreachable_sent",
                              "ICMP net unreachable answers written back into the TUN",
                              value=counters.get("icmp_sent", 0))
    yield CounterMetricFamily(f"{PREFIX}_icmp_unreachable_suppressed",
                              "ICMP net unreachable answers not written: over the rate limit",
                              value=counters.get("icmp_suppressed", 0))
    yield CounterMetricFamily(f"{PREFIX}_csum_completed",
                              "received packets whose inner TCP/UDP checksum a kernel sender "
                              "left partial, completed (vxlan)",
                              value=counters.get("csum_completed", 0))

    peers = status.get("peers") or []
    yield GaugeMetricFamily(f"{PREFIX}_peers", "peers' leases in the table",
                            value=status.get("peer_count", len(peers)))
    if "routes" in status:
        yield GaugeMetricFamily(f"{PREFIX}_routes", "peers the data plane holds (routes in the "
                                "fast path's table; peers planned by a kernel data plane)",
                                value=status["routes"])
    programming = status.get("programming_latency")
    if isinstance(programming, dict):
        yield HistogramMetricFamily(
            f"{PREFIX}_network_programming_duration_seconds",
            "from a lease's change in the store to its peer's route in (or out of) the data "
            "plane; the start is the store's time of the change where it keeps one (embedded "
            "store), else when the daemon received the event (etcd)",
            buckets=[(_bound(b), c) for b, c in programming["buckets"]]
            + [("+Inf", programming["count"])],
            sum_value=programming["sum"])
    peer_packets = CounterMetricFamily(f"{PREFIX}_peer_packets", "packets per peer",
                                       labels=["peer", "public_ip", "direction"])
    peer_bytes = CounterMetricFamily(f"{PREFIX}_peer_bytes", "inner bytes per peer",
                                     labels=["peer", "public_ip", "direction"])
    for peer in peers:
        for direction in ("tx", "rx"):
            # an IPv6-only peer by its IPv6 subnet and PublicIPv6
            labels = [peer["subnet"] or peer.get("ipv6_subnet") or "",
                      peer["public_ip"] or peer.get("public_ipv6") or "", direction]
            peer_packets.add_metric(labels, peer.get(f"{direction}_packets", 0))
            peer_bytes.add_metric(labels, peer.get(f"{direction}_bytes", 0))
        v6 = peer.get("ipv6")  # dual stack, userspace: the peer's IPv6 route
        if isinstance(v6, dict):
            for direction in ("tx", "rx"):
                labels = [v6["subnet"], v6["peer"], direction]
                peer_packets.add_metric(labels, v6.get(f"{direction}_packets", 0))
                peer_bytes.add_metric(labels, v6.get(f"{direction}_bytes", 0))
    yield peer_packets
    yield peer_bytes

    yield CounterMetricFamily(f"{PREFIX}_store_errors",
                              "lease store operations that failed (watch, resync, renewal)",
                              value=status.get("store_errors", 0))

    offload = GaugeMetricFamily(f"{PREFIX}_offload_active",
                                "1 for each fast-path offload in use, 0 for one that is not",
                                labels=["offload"])
    for name, active in sorted(_offloads(status).items()):
        if isinstance(active, (bool, int, float)):  # anything richer is not a yes/no
            offload.add_metric([str(name)], 1.0 if active else 0.0)
    yield offload


def _bound(value: float) -> str:
    """A bucket's upper bound as Prometheus writes it (0.5, 1.0, 60.0)."""
    return repr(float(value))


class _StatusCollector:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        return families(self._status())


def render(status: dict[str, Any]) -> bytes:
    """Prometheus' text format for one status snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(lambda: status))
    return generate_latest(registry)
