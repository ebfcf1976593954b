"""Network programming latency, as Kubernetes defines it for kube-proxy: from a change in the
lease store (a lease created, changed or deleted) to the data plane acting on it (the peer's
route in, or out of, the fast path's table or the kernel's). `/metrics` shows it as the
histogram `flannel_udp_network_programming_duration_seconds`.

The start is the store's own time of the change where it keeps one (the embedded store: its
file's modification time, or the lease's expiry), else the time the daemon received the event
(etcd keeps no time of a change, in its v3 keyspace as in v2: there the figure is the daemon's
share of the latency, from the event's arrival). The listing at start and resyncs are not
changes and are not counted.

One histogram per process (one daemon runs per process): the data planes observe it from
whichever thread programs the entry.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

# Seconds; Kubernetes' kube-proxy uses buckets from 1 ms up to minutes for the same figure.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0)


class Histogram:
    """Counts of observations per bucket, their sum and number; safe from any thread."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)  # clocks of two hosts (or a file's mtime) may disagree
        index = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def snapshot(self) -> dict[str, Any]:
        """{"buckets": [[upper bound, cumulative count], ...], "count", "sum"}: what `status`
        carries and `/metrics` renders (the +Inf bucket is "count")."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip(self.buckets, counts, strict=False):
            running += count
            cumulative.append([bound, running])
        return {"buckets": cumulative, "count": sum(counts), "sum": total}


PROGRAMMING = Histogram()


def programmed(since: float | None) -> None:
    """A change that happened at `since` (unix time; None: not a change, nothing counted) is
    now in the data plane."""
    if since is not None:
        PROGRAMMING.observe(time.time() - since)
