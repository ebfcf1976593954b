"""`python -m bench --cases scale`: two flannel-udp daemons following a real etcd (v3) filled
with flannel-style leases of thousands of simulated nodes, measured as issue 17 asks:

- ready after `run`: from the daemon's start until every lease is a route in its fast path's
  table (its `routes` count, asked over the control socket: one O(1) call);
- RSS once ready and at the end (VmRSS, VmHWM);
- convergence: a lease put (or deleted) in etcd -> its route in (or out of) each daemon's table,
  one event at a time ("quiet"), then under churn at R events/s while `status` and `/metrics`
  are read every second from each daemon; the control socket's `routes` request tells, for a
  list of subnets, which the table holds;
- a burst of B lease puts at once (then B deletes): the daemons keep answering `status`, and
  their tables end equal to etcd's;
- at the end, each daemon's table against etcd's (every key routed, the counts equal).

etcd runs in the topology's switch namespace; what talks to it (filling, churn, probes) runs
there too, as `python -m bench.scale PHASE` with its arguments as JSON on stdin and its result
as JSON on stdout. The leases are written as flanneld v0.22 writes them (the key bound to an
etcd lease, the value `{"PublicIP":...}`), in transactions of TXN_OPS puts; all share one etcd
lease, which changes nothing for the daemons (they ask no peer's expiry).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

NETWORK = IPv4Network("10.0.0.0/8")
SUBNET_LEN = 25  # 131,071 subnets: 50,000 leases, churn and a burst of 20,000 fit
PUBLIC_BASE = IPv4Address("100.64.0.0")  # the simulated nodes' PublicIPs: never sent to
TXN_OPS = 128  # etcd's default --max-txn-ops
WRITERS = 8  # transactions in flight while filling
POLL = 0.025  # s between two looks at the daemons' tables for pending events
TICKS = 50  # etcd transactions a second under churn, each with its share of the events
PEERS_NET = "100.64.0.1/16"  # on a veth: the simulated PublicIPs, directly reachable
RESYNC_S = 2  # the kernel data planes' resync period while measured
READ_EVERY = 1.0  # s between two reads of `status` and of `/metrics` under churn
EVENT_TIMEOUT = 30.0  # s after which an event not seen in a table counts as lost
MAX_QUERY = 5000  # subnets per `routes` request (the daemon takes at most 5,000)
LEASE_TTL = 86400

Say = Callable[[str], None]


def subnet_of(index: int) -> IPv4Network:
    """The index-th subnet of NETWORK (index 0, the network's first, is never used)."""
    return IPv4Network((int(NETWORK.network_address) + (index << (32 - SUBNET_LEN)), SUBNET_LEN))


def key_of(index: int) -> str:
    subnet = subnet_of(index)
    return f"{subnet.network_address}-{subnet.prefixlen}"


def value_of(index: int) -> bytes:
    from flannel_udp.lease import encode_lease_value
    return encode_lease_value(PUBLIC_BASE + index)


def network_config() -> dict[str, Any]:
    return {"Network": str(NETWORK), "SubnetLen": SUBNET_LEN, "Backend": {"Type": "udp"}}


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and max (nearest rank), in seconds rounded to the ms; None for no values."""
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3)
    return {"p50": rank(50), "p99": rank(99), "max": round(ordered[-1], 3), "n": len(ordered)}


# -- inside the switch namespace: etcd and the daemons' tables -------------------------------


class Etcd:
    """The few etcd v3 calls the bench makes, on aetcd's generated stubs."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        import grpc
        from aetcd import rpc
        self.rpc = rpc
        self.channel = grpc.aio.insecure_channel(
            endpoint.removeprefix("http://"),
            options=[("grpc.max_receive_message_length", 256 << 20)])  # the whole table
        self.kv = rpc.KVStub(self.channel)
        self.leases = rpc.LeaseStub(self.channel)
        self.prefix = prefix.rstrip("/")
        self.subnets = f"{self.prefix}/subnets/".encode()

    def full(self, index: int) -> bytes:
        return self.subnets + key_of(index).encode()

    async def grant(self) -> int:
        reply = await self.leases.LeaseGrant(self.rpc.LeaseGrantRequest(TTL=LEASE_TTL))
        return reply.ID

    async def put_config(self) -> None:
        await self.kv.Put(self.rpc.PutRequest(key=f"{self.prefix}/config".encode(),
                                              value=json.dumps(network_config()).encode()))

    async def put(self, index: int, lease: int) -> None:
        await self.kv.Put(self.rpc.PutRequest(key=self.full(index), value=value_of(index),
                                              lease=lease))

    async def delete(self, index: int) -> None:
        await self.kv.DeleteRange(self.rpc.DeleteRangeRequest(key=self.full(index)))

    async def many(self, indexes: list[int], lease: int | None) -> None:
        """Put (lease given) or delete every index, TXN_OPS per transaction, WRITERS at once."""
        ops = []
        for index in indexes:
            if lease is None:
                ops.append(self.rpc.RequestOp(request_delete_range=self.rpc.DeleteRangeRequest(
                    key=self.full(index))))
            else:
                ops.append(self.rpc.RequestOp(request_put=self.rpc.PutRequest(
                    key=self.full(index), value=value_of(index), lease=lease)))
        chunks = [ops[i:i + TXN_OPS] for i in range(0, len(ops), TXN_OPS)]
        limit = asyncio.Semaphore(WRITERS)

        async def txn(chunk: list[Any]) -> None:
            async with limit:
                await self.kv.Txn(self.rpc.TxnRequest(success=chunk))
        await asyncio.gather(*(txn(c) for c in chunks))

    async def txn(self, ops: list[tuple[int, bool]], lease: int) -> None:
        """One transaction: a put (True) or a delete (False) of each index."""
        await self.kv.Txn(self.rpc.TxnRequest(success=[
            self.rpc.RequestOp(request_put=self.rpc.PutRequest(
                key=self.full(index), value=value_of(index), lease=lease)) if put else
            self.rpc.RequestOp(request_delete_range=self.rpc.DeleteRangeRequest(
                key=self.full(index)))
            for index, put in ops]))

    async def keys(self) -> set[str]:
        end = self.subnets[:-1] + b"0"  # '/' + 1
        reply = await self.kv.Range(self.rpc.RangeRequest(key=self.subnets, range_end=end,
                                                          keys_only=True))
        return {kv.key[len(self.subnets):].decode() for kv in reply.kvs}

    async def close(self) -> None:
        await self.channel.close()


def _routes(socket_path: str, subnets: list[str]) -> dict[str, Any]:
    from flannel_udp import control
    answer = control.request(socket_path, {"cmd": "routes", "subnets": subnets}, timeout=30)
    if "error" in answer:
        raise RuntimeError(f"{socket_path}: {answer['error']}")
    return answer


class Tracker:
    """Events waiting to show in each daemon's table: (daemon, subnet) -> (when put or
    deleted, wanted present?); polled with one `routes` request per daemon every POLL s."""

    def __init__(self, sockets: list[str]) -> None:
        self.sockets = sockets
        self.pending: dict[tuple[int, str], tuple[float, bool, str]] = {}
        self.seen: dict[str, list[float]] = {"put": [], "delete": []}
        self.lost = 0

    def expect(self, index: int, present: bool, at: float) -> None:
        for d in range(len(self.sockets)):
            self.pending[(d, str(subnet_of(index)))] = (at, present,
                                                        "put" if present else "delete")

    async def poll_once(self) -> None:
        now = time.time()
        for d, path in enumerate(self.sockets):
            subnets = [s for (dd, s) in self.pending if dd == d][:MAX_QUERY]
            if not subnets:
                continue
            answer = await asyncio.to_thread(_routes, path, subnets)
            seen_at = time.time()
            for subnet, present in zip(subnets, answer["present"], strict=True):
                at, want, kind = self.pending[(d, subnet)]
                if present == want:
                    self.seen[kind].append(seen_at - at)
                    del self.pending[(d, subnet)]
                elif now - at > EVENT_TIMEOUT:
                    self.lost += 1
                    del self.pending[(d, subnet)]

    async def drain(self, timeout: float = EVENT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await self.poll_once()
            await asyncio.sleep(POLL)
        self.lost += len(self.pending)
        self.pending.clear()


class Readers:
    """`status` (its default: the totals and 50 peers) and `/metrics` read from each daemon
    every READ_EVERY s, in threads, each read's round trip noted (a failed read too)."""

    def __init__(self, sockets: list[str], metrics_urls: list[str],
                 every: float = READ_EVERY) -> None:
        self.sockets, self.urls, self.every = sockets, metrics_urls, every
        self.status_rtt: list[float] = []
        self.metrics_rtt: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._status, args=(p,), daemon=True)
                         for p in sockets]
        self._threads += [threading.Thread(target=self._metrics, args=(u,), daemon=True)
                          for u in metrics_urls]

    def _status(self, path: str) -> None:
        from flannel_udp import control
        while not self._stop.wait(self.every):
            started = time.monotonic()
            try:
                answer = control.request(path, {"cmd": "status"}, timeout=30)
                if "error" in answer:
                    raise RuntimeError(answer["error"])
            except Exception as e:  # noted, the run goes on
                self.failures.append(f"status {path}: {e}")
                continue
            self.status_rtt.append(time.monotonic() - started)

    def _metrics(self, url: str) -> None:
        while not self._stop.wait(self.every):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=30) as reply:
                    reply.read()
            except Exception as e:
                self.failures.append(f"metrics {url}: {e}")
                continue
            self.metrics_rtt.append(time.monotonic() - started)

    def __enter__(self) -> Readers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def report(self) -> dict[str, Any]:
        return {"status_rtt_s": percentiles(self.status_rtt),
                "metrics_rtt_s": percentiles(self.metrics_rtt),
                "read_failures": len(self.failures), "first_failures": self.failures[:3]}


def _fresh(start: int, exclude: set[int]) -> Callable[[], int]:
    """Indexes never used before from `start`, skipping the daemons' own subnets."""
    counter = [start]

    def take() -> int:
        while counter[0] in exclude:
            counter[0] += 1
        counter[0] += 1
        return counter[0] - 1
    return take


async def phase_fill(a: dict[str, Any]) -> dict[str, Any]:
    etcd = Etcd(a["endpoint"], a["prefix"])
    started = time.monotonic()
    lease = await etcd.grant()
    await etcd.put_config()
    await etcd.many(list(range(1, a["count"] + 1)), lease)
    await etcd.close()
    return {"lease": lease, "seconds": round(time.monotonic() - started, 2)}


async def phase_quiet(a: dict[str, Any]) -> dict[str, Any]:
    """One event at a time: a fresh lease put, seen in both tables; deleted, seen gone."""
    etcd = Etcd(a["endpoint"], a["prefix"])
    tracker = Tracker(a["sockets"])
    fresh = _fresh(a["fresh"], set(a["exclude"]))
    for _ in range(a["samples"]):
        index = fresh()
        tracker.expect(index, True, time.time())
        await etcd.put(index, a["lease"])
        await tracker.drain()
        tracker.expect(index, False, time.time())
        await etcd.delete(index)
        await tracker.drain()
    await etcd.close()
    return {"put_s": percentiles(tracker.seen["put"]),
            "delete_s": percentiles(tracker.seen["delete"]), "lost": tracker.lost,
            "fresh": fresh()}


async def phase_churn(a: dict[str, Any]) -> dict[str, Any]:
    """`rate` events per second for `seconds`: every tick (TICKS a second) one etcd
    transaction with the tick's share of events (a fresh lease put, a live one deleted, in
    turn); every `sample_every`-th event is followed into both tables, from the moment its
    transaction was sent (etcd's commit is part of it), while Readers read."""
    etcd = Etcd(a["endpoint"], a["prefix"])
    tracker = Tracker(a["sockets"])
    fresh = _fresh(a["fresh"], set(a["exclude"]))
    alive = list(range(1, a["count"] + 1))
    rng = random.Random(17)
    ticks = min(TICKS, a["rate"])
    total = int(a["rate"] * a["seconds"])
    in_flight: set[asyncio.Task] = set()
    commits: list[float] = []
    late = 0

    async def send(ops: list[tuple[int, bool]]) -> None:
        at = time.time()
        for number, (index, put) in ops:
            if (number // 2) % a["sample_every"] == 0:  # a put and the delete after it
                tracker.expect(index, put, at)
        await etcd.txn([(index, put) for _, (index, put) in ops], a["lease"])
        commits.append(time.time() - at)

    async def poller() -> None:
        while True:
            await tracker.poll_once()
            await asyncio.sleep(POLL)

    polling = asyncio.create_task(poller())
    with Readers(a["sockets"], a["metrics_urls"]) as readers:
        started = time.monotonic()
        number = tick = 0
        while number < total:
            delay = started + tick / ticks - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.1:
                late += 1
            tick += 1
            due = min(total, int(tick * a["rate"] / ticks))
            ops = []
            older = len(alive)  # deletes take leases of earlier ticks: a key once per txn
            while number < due:
                if number % 2 == 0:
                    index = fresh()
                    alive.append(index)
                    ops.append((number, (index, True)))
                else:
                    ops.append((number, (alive.pop(rng.randrange(older)), False)))
                    older -= 1
                number += 1
            task = asyncio.create_task(send(ops))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        sent_in = time.monotonic() - started
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        await tracker.drain()
    await etcd.close()
    return {"rate": a["rate"], "seconds": a["seconds"], "events": total,
            "achieved_rate": round(total / sent_in, 1), "sample_every": a["sample_every"],
            "late_ticks": late, "etcd_commit_s": percentiles(commits),
            "put_s": percentiles(tracker.seen["put"]),
            "delete_s": percentiles(tracker.seen["delete"]),
            "all_s": percentiles(tracker.seen["put"] + tracker.seen["delete"]),
            "lost": tracker.lost, **readers.report(), "fresh": fresh(),
            "count_after": len(alive)}


async def phase_burst(a: dict[str, Any]) -> dict[str, Any]:
    """`count` fresh leases put at once (transactions of TXN_OPS, WRITERS in flight), then
    deleted at once, while `status` and `/metrics` are read from each daemon every 0.1 s; how
    long until each table holds them all (then none of them), told by its `routes` count (one
    O(1) request every 0.05 s: the probe must not load what it measures)."""
    etcd = Etcd(a["endpoint"], a["prefix"])
    fresh = _fresh(a["fresh"], set(a["exclude"]))
    indexes = [fresh() for _ in range(a["count"])]
    before = [(await asyncio.to_thread(_routes, path, []))["routes"] for path in a["sockets"]]
    result: dict[str, Any] = {"count": a["count"]}
    with Readers(a["sockets"], a.get("metrics_urls", []), every=0.1) as readers:
        for kind, lease in (("put", a["lease"]), ("delete", None)):
            want = [b + a["count"] if kind == "put" else b for b in before]
            started = time.time()
            await etcd.many(indexes, lease)
            written = time.time() - started
            done: dict[int, float] = {}
            deadline = time.monotonic() + 300
            while len(done) < len(a["sockets"]) and time.monotonic() < deadline:
                for d, path in enumerate(a["sockets"]):
                    if d not in done and (await asyncio.to_thread(_routes, path, []))[
                            "routes"] == want[d]:
                        done[d] = time.time() - started
                await asyncio.sleep(0.05)
            result[kind] = {"written_s": round(written, 2),
                            "in_tables_s": [round(done[d], 2) if d in done else None
                                            for d in range(len(a["sockets"]))]}
    result.update(readers.report())
    await etcd.close()
    result["fresh"] = fresh()
    return result


async def phase_check(a: dict[str, Any]) -> dict[str, Any]:
    """Each daemon's table against etcd's: every other lease routed, nothing more."""
    etcd = Etcd(a["endpoint"], a["prefix"])
    keys = await etcd.keys()
    await etcd.close()
    result = {"etcd_leases": len(keys), "daemons": []}
    for path, own in zip(a["sockets"], a["own_keys"], strict=True):
        others = [k.replace("-", "/") for k in sorted(keys) if k != own]
        missing = 0
        for i in range(0, len(others), MAX_QUERY):
            answer = _routes(path, others[i:i + MAX_QUERY])
            missing += answer["present"].count(False)
        counts = _routes(path, [])
        result["daemons"].append({"routes": counts["routes"], "peers": counts["peers"],
                                  "missing": missing,
                                  "equal": missing == 0 and counts["routes"] == len(others)})
    return result



# -- the harness, in the root namespace --------------------------------------------------------


def _driver(topo: Any, phase: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    result = topo.switch.run(sys.executable, "-m", "bench.scale", phase,
                             input=json.dumps(args), timeout=timeout)
    return json.loads(result.stdout)


def _rss_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return 0.0


def run_size(topo: Any, etcd: Any, leases: int, rate: int, seconds: int, burst: int,
             say: Say, backend: str = "udp",
             check_status: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """One size: fill, start the daemons, ready, quiet, churn, burst, check, stop.
    `check_status(control socket)` is called on h1 once it is ready (its result kept as
    "status_pages")."""
    from bench.measure import cpu_seconds
    from flannel_udp.lab import NetnsError, wait_until
    hosts = topo.hosts[:2]
    prefix = f"/scale-{leases}-{int(time.time())}/coreos.com/network"
    base = {"endpoint": etcd.endpoints[0], "prefix": prefix}
    say(f"    filling etcd with {leases:,} leases ...")
    fill = _driver(topo, "fill", {**base, "count": leases}, timeout=600)
    say(f"    written in {fill['seconds']} s; starting 2 daemons ({backend}) ...")
    extra = [*etcd.client_flags(), "--etcd-prefix", prefix, "--etcd-api", "v3",
             "--healthz-port", str(HEALTHZ_PORT)]
    started = {}
    for host in hosts:
        started[host.label] = time.monotonic()
        host.start_flannel(topo.dir / "unused-store", None, *extra)
    ready: dict[str, float] = {}
    try:
        def all_routed() -> bool:
            for host in hosts:
                if host.label in ready:
                    continue
                try:
                    count = host.routes()["routes"]
                except NetnsError:
                    host._check_daemon_alive()
                    continue
                if count >= leases + 1:  # every simulated node and the other daemon
                    ready[host.label] = round(time.monotonic() - started[host.label], 2)
            return len(ready) == len(hosts)
        wait_until(all_routed, 300, f"both daemons to route {leases + 1:,} peers",
                   interval=0.05)
        rss_ready = {h.label: _rss_mb(h.daemon.pid, "VmRSS") for h in hosts}
        say(f"    ready after run: {ready} s; RSS {rss_ready} MB")
        pages = check_status(str(hosts[0].control_socket)) if check_status else None
        own = [h.lease()["subnet"] for h in hosts]
        exclude = [int(IPv4Network(s).network_address) - int(NETWORK.network_address)
                   >> (32 - SUBNET_LEN) for s in own]
        common = {**base, "lease": fill["lease"], "exclude": exclude,
                  "sockets": [str(h.control_socket) for h in hosts],
                  "metrics_urls": [f"http://{h.underlay_ip}:{HEALTHZ_PORT}/metrics"
                                   for h in hosts]}
        quiet = _driver(topo, "quiet", {**common, "fresh": leases + 1, "samples": 20},
                        timeout=600)
        say(f"    one event at a time: put -> in both tables {quiet['put_s']}, delete -> out "
            f"{quiet['delete_s']}")
        cpu_before = {h.label: cpu_seconds(h.daemon.pid) for h in hosts}
        say(f"    churn: {rate} events/s for {seconds} s, status and /metrics read every "
            f"second ...")
        churn = _driver(topo, "churn", {
            **common, "fresh": quiet["fresh"], "count": leases, "rate": rate,
            "seconds": seconds, "sample_every": max(1, rate // 100)},
            timeout=seconds * 4 + 300)
        churn["daemon_cpu_s"] = {h.label: round(cpu_seconds(h.daemon.pid)
                                                - cpu_before[h.label], 1) for h in hosts}
        say(f"    churn ({churn['achieved_rate']}/s, etcd commit {churn['etcd_commit_s']}): "
            f"p50/p99/max {churn['all_s']}, "
            f"lost {churn['lost']}; status RTT {churn['status_rtt_s']}, /metrics RTT "
            f"{churn['metrics_rtt_s']}; CPU {churn['daemon_cpu_s']} s")
        # The peak so far: the table at its size (the burst adds `burst` leases for a while).
        rss_before_burst = {h.label: _rss_mb(h.daemon.pid, "VmHWM") for h in hosts}
        result_burst = None
        if burst:
            say(f"    burst: {burst:,} leases put at once, then deleted ...")
            result_burst = _driver(topo, "burst", {**common, "fresh": churn["fresh"],
                                                   "count": burst}, timeout=600)
            say(f"    burst: written in {result_burst['put']['written_s']} s, in the tables "
                f"after {result_burst['put']['in_tables_s']} s; deletes written in "
                f"{result_burst['delete']['written_s']} s, out after "
                f"{result_burst['delete']['in_tables_s']} s; status RTT "
                f"{result_burst['status_rtt_s']}")
        check = _driver(topo, "check", {**base, "sockets": common["sockets"],
                                        "own_keys": [s.replace("/", "-") for s in own]},
                        timeout=300)
        say(f"    tables equal to etcd's: {[d['equal'] for d in check['daemons']]} "
            f"({check['etcd_leases']:,} leases in etcd)")
        rss_peak = {h.label: _rss_mb(h.daemon.pid, "VmHWM") for h in hosts}
    finally:
        for host in hosts:
            if host.daemon is not None and host.daemon.poll() is None:
                host.stop_flannel()
    return {"leases": leases, "backend": backend, "fill_s": fill["seconds"],
            "status_pages": pages,
            "ready_after_run_s": ready, "rss_ready_mb": rss_ready,
            "rss_peak_before_burst_mb": rss_before_burst, "rss_peak_mb": rss_peak,
            "quiet": quiet, "churn": churn, "burst": result_burst, "check": check}


def run_scale(topo: Any, sizes: list[int], rates: list[int], seconds: int, burst: int,
              say: Say) -> dict[str, Any]:
    """Every size on one etcd in the topology's switch namespace; the results by size."""
    from flannel_udp.lab import EtcdCluster, NetnsError
    etcd = EtcdCluster.in_topology(topo).start()
    results: dict[str, Any] = {}
    try:
        for leases, rate in zip(sizes, rates, strict=True):
            say(f"[scale] {leases:,} leases, churn {rate} events/s, burst {burst:,}")
            try:
                results[str(leases)] = run_size(topo, etcd, leases, rate, seconds, burst, say)
            except NetnsError as e:  # this size failed: the others still run
                say(f"    error: {e}")
                results[str(leases)] = {"leases": leases, "error": str(e)}
    finally:
        etcd.cleanup()
    return results


def run_dataplanes(topo: Any, peers: int, say: Say) -> dict[str, Any]:
    """host-gw and the kernel VXLAN data plane with `peers` peers, in h1 (no daemon)."""
    results = {}
    for backend in ("host-gw", "vxlan"):
        say(f"[scale] {backend}{' (kernel dataplane)' if backend == 'vxlan' else ''} with "
            f"{peers:,} peers ...")
        result = json.loads(topo.hosts[0].run(
            sys.executable, "-m", "bench.scale", "dataplane",
            input=json.dumps({"backend": backend, "peers": peers}), timeout=900).stdout)
        say(f"    first pass (every entry) {result['start_s']} s, a resync pass "
            f"{result['resync_s']} s, close {result['close_s']} s; "
            f"{result['routes_in_kernel']:,} routes in the kernel's main table")
        results[backend] = result
    return results


HEALTHZ_PORT = 9180
# Issue 17's targets, reported (never enforced): ready < 5 s and RSS < 256 MB at 50,000 leases,
# RSS < 64 MB at 5,000; convergence p99 < 1 s under churn; status and /metrics answered.
READY_TARGET_S = 5.0
CONVERGENCE_TARGET_S = 1.0


def table(results: dict[str, Any], dataplanes: dict[str, Any] | None = None) -> str:
    """The scale figures, a line per size, the kernel data planes', and the targets as
    PASS/FAIL lines."""
    if "error" in results:
        return f"scale: error: {results['error']}"
    from flannel_udp.demo import text_table
    rows, judged = [], []
    for size, r in results.items():
        if "error" in r:
            judged.append((False, f"{int(size):,}: the run", r["error"][:120]))
            continue
        churn, quiet, burst = r["churn"], r["quiet"], r.get("burst") or {}

        def fmt(p: dict[str, Any]) -> str:
            return "-" if p.get("p50") is None else f"{p['p50']}/{p['p99']}/{p['max']}"
        rows.append([f"{int(size):,}", "/".join(f"{v}" for v in r["ready_after_run_s"].values()),
                     "/".join(f"{v:.0f}" for v in r["rss_ready_mb"].values()),
                     "/".join(f"{v:.0f}" for v in r.get("rss_peak_before_burst_mb",
                                                         r["rss_peak_mb"]).values())
                     + " (" + "/".join(f"{v:.0f}" for v in r["rss_peak_mb"].values()) + ")",
                     fmt(quiet["put_s"]) + " " + fmt(quiet["delete_s"]),
                     f"{fmt(churn['all_s'])} @{churn['achieved_rate']}/s lost {churn['lost']}",
                     f"{churn['status_rtt_s']['max']}/{churn['metrics_rtt_s']['max']}",
                     "-" if not burst else "/".join(str(v) for v in burst["put"]["in_tables_s"])
                     + f" max status {burst['status_rtt_s']['max']}",
                     "yes" if all(d["equal"] for d in r["check"]["daemons"]) else "NO"])
        leases = int(size)
        ready = max(r["ready_after_run_s"].values())
        # The peak while the table held `leases` (start, quiet, churn): not the burst's.
        peak = max(r.get("rss_peak_before_burst_mb", r["rss_peak_mb"]).values())
        if leases >= 50000:
            judged.append((ready < READY_TARGET_S, f"{leases:,}: ready after run < 5 s",
                           f"{ready} s"))
            judged.append((peak < 256, f"{leases:,}: peak RSS (before the burst) < 256 MB",
                           f"{peak:.0f} MB"))
        if leases <= 5000:
            judged.append((peak < 64, f"{leases:,}: peak RSS (before the burst) < 64 MB",
                           f"{peak:.0f} MB"))
        p99 = churn["all_s"]["p99"]
        judged.append((p99 is not None and p99 < CONVERGENCE_TARGET_S and churn["lost"] == 0,
                       f"{leases:,}: convergence p99 < 1 s at {churn['rate']} events/s",
                       f"{p99} s, {churn['lost']} lost"))
        judged.append((churn["read_failures"] == 0 and not (burst or {}).get("read_failures"),
                       f"{leases:,}: every status and /metrics read answered",
                       f"{churn['read_failures']} failed"))
    out = text_table(["leases", "ready s", "RSS ready MB", "peak MB (with burst)",
                      "quiet put, delete p50/p99/max s", "churn p50/p99/max s",
                      "status/metrics max s", "burst in tables s", "= etcd"], rows)
    lines = [out]
    if dataplanes and "error" not in dataplanes:
        lines += ["", text_table(
            ["kernel data plane", "peers", "first pass s", "resync pass s", "close s"],
            [[b, f"{r['peers']:,}", r["start_s"], r["resync_s"], r["close_s"]]
             for b, r in dataplanes.items()])]
    elif dataplanes:
        lines += ["", f"  kernel data planes: error: {dataplanes['error']}"]
    lines += ["", "  targets of issue 17 (reported, not enforced):"]
    lines += [f"    {'PASS' if ok else 'FAIL'}  {what:<58} {got}" for ok, what, got in judged]
    return "\n".join(lines)

def phase_dataplane(a: dict[str, Any]) -> dict[str, Any]:
    """Inside a host namespace, no daemon: `backend` (host-gw, or vxlan on the kernel's VXLAN
    device) started with `peers` peers' leases; how long the first pass (every route,
    neighbour and FDB entry) took, how long a resync pass (every peer planned again, the
    kernel's tables dumped and compared) takes, and how long closing (withdrawing) takes. A
    device holding PEERS_NET makes the simulated PublicIPs directly reachable."""
    import os
    import subprocess

    from flannel_udp import netlink
    from flannel_udp.backends.peerroutes import RESYNC_ENV
    from flannel_udp.config import parse_config
    from flannel_udp.lease import Lease, VxlanLeaseData

    os.environ[RESYNC_ENV] = str(RESYNC_S)
    # A veth pair (this kernel may lack the dummy module); only its connected route matters.
    subprocess.run(["ip", "link", "add", "fu-peers", "type", "veth", "peer", "name",
                    "fu-peers1"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", PEERS_NET, "dev", "fu-peers"], check=True)
        for device in ("fu-peers", "fu-peers1"):
            subprocess.run(["ip", "link", "set", device, "up"], check=True)
        backend = {"Type": a["backend"]}
        if a["backend"] == "vxlan":
            backend["Dataplane"] = "kernel"
        config = parse_config(json.dumps({**network_config(), "Backend": backend}))
        ext = netlink.find_interface(netlink.IfaceChoice(names=("eth0",)))
        if a["backend"] == "vxlan":
            from flannel_udp.backends.vxlan.kernel import KernelVxlanNetwork
            network: Any = KernelVxlanNetwork(config, ext, ext.address)

            def lease(i: int) -> Lease:
                mac = bytes([0x0a, 0x58, *(i + 1 << 8).to_bytes(4, "big")])
                return Lease(subnet_of(i), PUBLIC_BASE + i, "vxlan",
                             VxlanLeaseData(1, mac).encode())
        else:
            from flannel_udp.backends.hostgw import HostGwNetwork
            network = HostGwNetwork(config, ext)

            def lease(i: int) -> Lease:
                return Lease(subnet_of(i), PUBLIC_BASE + i, "host-gw")
        own = Lease(subnet_of(a["peers"] + 10), ext.address, a["backend"])
        network.open()
        started = time.monotonic()
        network.start(own, [lease(i) for i in range(1, a["peers"] + 1)])
        routes = network._routes
        deadline = time.monotonic() + 600
        while routes.timings["start_s"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        start_wall = round(time.monotonic() - started, 2)
        while routes.timings["resync_s"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        in_kernel = len(subprocess.run(["ip", "route", "show"], capture_output=True,
                                       text=True).stdout.splitlines())
        started = time.monotonic()
        network.close()
        return {"backend": a["backend"], "peers": a["peers"], "start_s": routes.timings["start_s"],
                "start_wall_s": start_wall, "resync_s": routes.timings["resync_s"],
                "close_s": round(time.monotonic() - started, 2), "routes_in_kernel": in_kernel}
    finally:
        subprocess.run(["ip", "link", "del", "fu-peers"], check=False)


async def _dataplane(a: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(phase_dataplane, a)


PHASES = {"fill": phase_fill, "quiet": phase_quiet, "churn": phase_churn,
          "burst": phase_burst, "check": phase_check, "dataplane": _dataplane}


def driver_main() -> int:
    """`python -m bench.scale PHASE` with the arguments as JSON on stdin: the result on stdout."""
    phase = sys.argv[1]
    args = json.loads(sys.stdin.read())
    result = asyncio.run(PHASES[phase](args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(driver_main())
