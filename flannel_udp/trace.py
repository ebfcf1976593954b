"""`flannel-udp trace` on the Python side: the fast path samples its per-packet decisions into
rings (in C) only while a tracer is attached; `Tracing` sets the sampling rate, drains the rings
for every tracer and streams the records over the control socket, rate limited; `trace_line`
prints one record as the CLI shows it.

A record is a tuple (ns, direction, verdict, drop, proto, src, dst, peer, length), as
`FastPath.trace_drain` returns it; the stream sends it as a list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flannel_udp.backends import UserspaceDataplane

TRACE_POLL = 0.1  # seconds between drains of the fast path's trace rings
TRACE_BUFFER = 10_000  # records kept per tracer between polls; more are counted as lost
PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmpv6", 132: "sctp"}

Record = tuple[Any, ...]


class Tracing:
    """The tracers attached to one daemon, over whichever userspace data plane `dataplane()`
    returns now (a re-acquired lease may have made a new fast path; None: nothing to trace)."""

    def __init__(self, dataplane: Callable[[], UserspaceDataplane | None]) -> None:
        self._dataplane = dataplane
        # Each tracer's sampling rate and the records not sent to it yet.
        self._tracers: dict[object, tuple[int, list[Record]]] = {}
        self._lost = 0  # records dropped because a tracer's buffer was full

    def _apply(self) -> None:
        """Sample at the finest rate any tracer asked for; 0 (off) with none left."""
        userspace = self._dataplane()
        if userspace is not None:
            userspace.set_trace(min((every for every, _ in self._tracers.values()), default=0))

    def _poll(self) -> None:
        """Drain the fast path's rings into every tracer's buffer (one consumer: whichever
        tracer polls first takes the records for all)."""
        self._apply()  # again: a re-acquired lease may have made a new fast path
        userspace = self._dataplane()
        drained = userspace.trace_drain() if userspace is not None else []
        records = sorted(drained, key=lambda r: r[0])  # merge directions
        for _, pending in self._tracers.values():
            room = TRACE_BUFFER - len(pending)
            pending.extend(records[:room])
            self._lost += max(0, len(records) - room)

    def _lost_total(self) -> int:
        userspace = self._dataplane()
        info = userspace.trace_info() if userspace is not None else {}
        return int(info.get("lost", 0)) + self._lost

    async def stream(self, request: dict[str, Any],
                     refusal: Callable[[], str | None]) -> AsyncIterator[dict[str, Any]]:
        """The `trace` stream: {"tracing": every} first, then every TRACE_POLL seconds a frame
        {"records": [...], "more": K} with at most `max_rate` records a second (K: left out by
        the rate limit) and "lost" (ring or buffer full, all tracers), until the client
        leaves; then tracing is off again unless another tracer remains. `refusal()` says why
        this daemon can't be traced now (an {"error"} frame), or None."""
        every, max_rate = request.get("every", 1), request.get("max_rate", 100)
        if not (isinstance(every, int) and every >= 1 and isinstance(max_rate, (int, float))
                and max_rate > 0):
            yield {"error": "trace: every must be an integer >= 1 and max_rate > 0"}
            return
        refused = refusal()
        userspace = self._dataplane()
        if refused is not None or userspace is None:
            yield {"error": refused or "nothing to trace"}
            return
        key = object()
        if not self._tracers:
            userspace.trace_drain()  # records of an earlier tracer: not ours
        pending: list[Record] = []
        self._tracers[key] = (every, pending)
        try:
            self._apply()
            yield {"tracing": every}
            tokens, last = float(max_rate), time.monotonic()
            lost_seen = self._lost_total()
            while True:
                await asyncio.sleep(TRACE_POLL)
                self._poll()
                now = time.monotonic()
                tokens = min(float(max_rate), tokens + (now - last) * max_rate)
                last = now
                take = min(len(pending), int(tokens))
                tokens -= take
                frame: dict[str, Any] = {"records": [list(r) for r in pending[:take]],
                                         "more": len(pending) - take}
                pending.clear()
                lost = self._lost_total()
                if lost > lost_seen:
                    frame["lost"] = lost - lost_seen
                lost_seen = lost
                if frame["records"] or frame["more"] or "lost" in frame:
                    yield frame
        finally:
            del self._tracers[key]
            self._apply()


def trace_line(record: list[Any]) -> str:
    """`12:00:00.123 egress 10.244.1.2 > 10.244.2.2 icmp peer 192.168.77.12 sent` from a
    record of the `trace` stream."""
    ns, direction, verdict, drop, proto, src, dst, peer, length = record
    stamp = time.strftime("%H:%M:%S", time.localtime(ns / 1e9)) + f".{ns // 1_000_000 % 1000:03d}"
    what = (f"{src or '?'} > {dst or '?'} {PROTOS.get(proto, f'proto {proto}')}" if proto or src
            else f"({length} B, not parsed)")
    outcome = verdict if verdict in ("sent", "to_tun") else f"{verdict} {drop}".strip()
    return f"{stamp} {direction:<7} {what} peer {peer or '-'} {outcome}"
