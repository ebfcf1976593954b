"""Rate-limited logging of the fast path's drop counters: a flood of bad datagrams must show in
the log without flooding it; and which drop reasons a backend can count at all. Pure: the
daemon feeds it counter snapshots and the clock.

Every reason is reported at most once per interval, all reasons that grew in one line, e.g.
``dropped since last reported (at most every 10 s): unknown_sender +120345, vxlan_wrong_vni +3``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flannel_udp.packet import DROP_NAMES, Drop

DEFAULT_INTERVAL = 10.0  # seconds between two lines naming the same reason
# Counted only by the VXLAN mode of the fast path: its checks of the VXLAN header.
VXLAN_DROPS = frozenset(DROP_NAMES[d] for d in (
    Drop.VXLAN_SHORT, Drop.VXLAN_BAD_FLAGS, Drop.VXLAN_WRONG_VNI, Drop.VXLAN_WRONG_MAC,
    Drop.VXLAN_NOT_IPV4))
DROP_KEYS = ("drops", "ingress_drops", "egress_drops")  # the fast path's counters by reason


def countable(counters: dict[str, Any], backend_type: str) -> dict[str, Any]:
    """The fast path's `counters` without the drop reasons `backend_type` can never count (a
    udp node makes no VXLAN header checks); the other reasons keep their names."""
    if backend_type == "vxlan":
        return counters
    return {key: ({r: n for r, n in value.items() if r not in VXLAN_DROPS}
                  if key in DROP_KEYS else value) for key, value in counters.items()}


class DropLog:
    """Turns successive drop-counter snapshots into at most one log line per interval."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        self.interval = interval
        self._reported: dict[str, int] = {}  # counter values as of the last line naming them
        self._last_line: dict[str, float] = {}  # reason -> when a line last named it
        self._baseline_taken = False

    def update(self, drops: Mapping[str, int], now: float) -> str | None:
        """The line to log for this snapshot (reasons that grew and were not named in the last
        `interval` seconds), or None. The first snapshot is the baseline: what was dropped
        before the daemon started watching is not news."""
        if not self._baseline_taken:
            self._reported = dict(drops)
            self._baseline_taken = True
            return None
        grown = []
        for reason, count in sorted(drops.items()):
            before = self._reported.get(reason, 0)
            if count < before:  # the fast path was restarted (e.g. a new lease): new baseline
                self._reported[reason] = count
                continue
            if count == before or now - self._last_line.get(reason, -self.interval) < \
                    self.interval:
                continue
            grown.append(f"{reason} +{count - before}")
            self._reported[reason] = count
            self._last_line[reason] = now
        if not grown:
            return None
        return f"dropped since last reported (at most every {self.interval:g} s): " + \
            ", ".join(grown)
