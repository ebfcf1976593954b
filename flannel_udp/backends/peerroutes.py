"""Kernel routing state that follows the peers' leases, for the routing-model backends (host-gw,
DirectRouting, the kernel VXLAN dataplane): a backend says how one lease becomes kernel entries
(a `Plan`), and `PeerRoutes` keeps them in place.

netlink may not run on the event loop, and deciding whether a peer is directly reachable asks
the kernel, so one worker thread does all of it: a lease's entries are planned and installed as
soon as it arrives, withdrawn when it goes, and every `resync` seconds every peer is planned
again (reachability can change) and its entries re-checked, so that a route deleted by hand
comes back (flannel's host-gw checks its routes every 10 s).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from flannel_udp import latency, netlink
from flannel_udp.errors import UserError
from flannel_udp.lease import Lease
from flannel_udp.netlink import AnyAddress, AnyNetwork, KernelEntry, Route

Ident = IPv4Network | IPv6Network  # a peer's Lease.ident

log = logging.getLogger("flannel-udp")

RESYNC_ENV = "FLANNEL_UDP_ROUTE_RESYNC"  # seconds; tests shorten it
DEFAULT_RESYNC = 10.0  # as flannel's host-gw
FIRST_PASS_TIMEOUT = 10.0


@dataclass(frozen=True)
class Plan:
    """What a peer's lease becomes: kernel entries (installed in order), the path its packets
    take (shown in `status`), and why it can't be reached (logged as a warning) when not."""

    entries: tuple[KernelEntry, ...]
    path: str  # e.g. "host-gw", "direct", "vxlan", "unreachable", "ignored"
    problem: str | None = None
    shown: dict[str, Any] = field(default_factory=dict, compare=False)  # more for `status`

    @property
    def reachable(self) -> bool:
        return self.problem is None


def resync_period() -> float:
    """Seconds between re-checks: FLANNEL_UDP_ROUTE_RESYNC, default 10."""
    text = os.environ.get(RESYNC_ENV, "").strip()
    if not text:
        return DEFAULT_RESYNC
    try:
        period = float(text)
    except ValueError:
        period = 0.0
    if not 0.05 <= period <= 86400:
        raise UserError(f"{RESYNC_ENV}={text!r}: expected seconds between 0.05 and 86400")
    return period


def _underlay(lease: Lease) -> AnyAddress:
    """The peer's underlay address: PublicIP, PublicIPv6 for an IPv6-only lease."""
    if lease.has_ipv4 or lease.public_ipv6 is None:
        return lease.public_ip
    return lease.public_ipv6


def direct_route(lease: Lease) -> Route | str:
    """flannel's DirectRouting test: the route `<subnet> via <PublicIP>` when the kernel reaches
    the PublicIP by a gateway-less route, else why not. Asks the kernel: worker thread only."""
    return direct_route_via(lease.subnet, lease.public_ip)


def direct_route_via(dst: AnyNetwork, via: AnyAddress) -> Route | str:
    """The route `<dst> via <via>` when the kernel reaches `via` (IPv4 or IPv6) by a
    gateway-less route, else why not (flannel's ip.DirectRouting). Worker thread only."""
    oif, why = netlink.direct_route_to(via)
    if oif is None:
        return why
    return Route(dst, via, oif)


class PeerRoutes:
    """The kernel entries of every peer, kept by one worker thread; see the module docstring."""

    def __init__(self, plan: Callable[[Lease], Plan], resync: float | None = None) -> None:
        self._plan_of = plan
        self.resync = resync_period() if resync is None else resync
        self._cond = threading.Condition()
        # All keyed by Lease.ident (the IPv6 subnet of an IPv6-only lease).
        # Coalesced by peer, so bounded by the number of peers whatever the rate of events:
        # a burst never blocks the watch that hands them over (flannel issue 2251).
        self._pending: dict[Ident, Lease | None] = {}  # None: the peer went away
        self._since: dict[Ident, float] = {}  # the earliest change pending per peer
        self._leases: dict[Ident, Lease] = {}  # worker thread only
        self._installed: dict[Ident, tuple[KernelEntry, ...]] = {}  # worker thread only
        # Written by the worker in place, read by other threads one key at a time (a lookup is
        # atomic under the GIL; iterating it from another thread is not safe).
        self.plans: dict[Ident, Plan] = {}
        self._stop = False
        # Seconds the first pass (every peer at start) and the last resync took, for status.
        self.timings: dict[str, float | None] = {"start_s": None, "resync_s": None}
        self._first_pass = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, peers: list[Lease]) -> None:
        """Start the worker with the current peers; returns once their entries are in."""
        for lease in peers:
            self._pending[lease.ident] = lease
        self._thread = threading.Thread(target=self._run, name="peer-routes", daemon=True)
        self._thread.start()
        self._first_pass.wait(FIRST_PASS_TIMEOUT)

    def set_peer(self, lease: Lease, since: float | None = None) -> None:
        """Plan and install the peer's entries soon; `since`: when its lease changed (for the
        programming latency), None for none."""
        with self._cond:
            self._pending[lease.ident] = lease
            if since is not None:
                self._since.setdefault(lease.ident, since)
            self._cond.notify()

    def remove_peer(self, subnet: Ident, since: float | None = None) -> None:
        with self._cond:
            self._pending[subnet] = None
            if since is not None:
                self._since.setdefault(subnet, since)
            self._cond.notify()

    def plan(self, subnet: Ident) -> Plan | None:
        """The peer's current plan; None until the worker has seen it."""
        return self.plans.get(subnet)

    def peer_stats(self, subnet: Ident) -> dict[str, Any] | None:
        """The peer's row for `status`: its path and what its plan shows; None until planned."""
        plan = self.plans.get(subnet)
        return None if plan is None else {"path": plan.path, **plan.shown}

    def count(self) -> int:
        """How many peers are planned (their entries installed, or why not known)."""
        return len(self.plans)

    def close(self) -> None:
        """Stop the worker and withdraw every entry it installed. Idempotent."""
        if self._thread is not None:
            with self._cond:
                self._stop = True
                self._cond.notify()
            self._thread.join()
            self._thread = None
        with netlink.one_socket():
            for entries in self._installed.values():
                self._withdraw(entries)
        self._installed.clear()
        self.plans = {}

    # -- the worker --

    def _run(self) -> None:
        # One netlink socket for the worker's whole life: every route, neighbour and FDB
        # entry, every reachability test and every resync's dump go through it.
        with netlink.one_socket():
            self._work()

    def _work(self) -> None:
        full = False
        while True:
            with self._cond:
                # The first pass runs at once: start() waits for it.
                if not self._pending and not self._stop and self._first_pass.is_set():
                    full = not self._cond.wait(self.resync)
                if self._stop:
                    return
                changes, self._pending = self._pending, {}
                since, self._since = self._since, {}
            try:
                started = time.monotonic()
                self._apply(changes)
                if not self._first_pass.is_set():
                    self.timings["start_s"] = round(time.monotonic() - started, 3)
                for changed_at in since.values():
                    latency.programmed(changed_at)
                if full:
                    started = time.monotonic()
                    self._resync()
                    self.timings["resync_s"] = round(time.monotonic() - started, 3)
            except Exception:  # the thread must survive a bad pass: the next one retries
                log.exception("updating the kernel's routes failed; retrying at the next pass")
            self._first_pass.set()

    def _apply(self, changes: dict[Ident, Lease | None]) -> None:
        withdraw: list[KernelEntry] = []
        install: list[tuple[Ident, KernelEntry]] = []
        for subnet, lease in changes.items():
            if lease is None:
                self._leases.pop(subnet, None)
                withdraw.extend(self._installed.pop(subnet, ()))
                self.plans.pop(subnet, None)
            else:
                self._leases[subnet] = lease
                self._update(lease, withdraw, install)
        self._commit(withdraw, install)

    def _update(self, lease: Lease, withdraw: list[KernelEntry],
                install: list[tuple[Ident, KernelEntry]]) -> None:
        """Plan the peer again; what its entries need goes into `withdraw` and `install`,
        which `_commit` hands to the kernel for every peer of the pass at once."""
        plan = self._plan_of(lease)
        old = self.plans.get(lease.ident)
        if old is None or (old.path, old.problem) != (plan.path, plan.problem):
            # Said once per change, not at every pass.
            if plan.problem is not None:
                log.warning("peer %s at %s: %s; skipped", lease.ident, _underlay(lease),
                            plan.problem)
            else:
                log.info("peer %s at %s: %s", lease.ident, _underlay(lease), plan.path)
        before = self._installed.get(lease.ident, ())
        withdraw.extend(e for e in before if e not in plan.entries)
        if plan.entries != before:
            install.extend((lease.ident, e) for e in plan.entries)
        self._installed[lease.ident] = plan.entries
        self.plans[lease.ident] = plan

    def _commit(self, withdraw: list[KernelEntry],
                install: list[tuple[Ident, KernelEntry]]) -> None:
        """Withdraw, then install, in batches (netlink.install: many messages a sendmsg)."""
        if withdraw:
            self._withdraw(tuple(withdraw))
        if install:
            owner = {entry: ident for ident, entry in install}
            for entry, why in netlink.install([entry for _, entry in install]):
                # Kept as wanted: the next resync tries again.
                log.error("peer %s: cannot add %s: %s", owner[entry], netlink.describe(entry),
                          why)

    def _resync(self) -> None:
        """Plan every peer again, then put back what vanished from the kernel."""
        withdraw: list[KernelEntry] = []
        install: list[tuple[Ident, KernelEntry]] = []
        for lease in list(self._leases.values()):
            self._update(lease, withdraw, install)
        self._commit(withdraw, install)
        wanted = [e for entries in self._installed.values() for e in entries]
        gone = netlink.missing(wanted) if wanted else []
        if gone:
            log.warning("re-adding what was removed behind our back: %s",
                        "; ".join(netlink.describe(e) for e in gone))
            for entry, why in netlink.install(gone):
                log.error("cannot re-add %s: %s", netlink.describe(entry), why)

    @staticmethod
    def _withdraw(entries: tuple[KernelEntry, ...]) -> None:
        """Remove entries given in install order: the last one (the route) goes first."""
        try:
            netlink.withdraw(list(reversed(entries)))
        except Exception as e:  # a leftover entry is logged, not fatal (OSError names it)
            log.error("cannot remove %s", e if isinstance(e, OSError) else
                      f"{'; '.join(map(netlink.describe, entries))}: {e}")
