"""`flannel-udp run`: the control plane on asyncio. Lease, subnet.env, backend, control socket;
then it follows the lease table, handing each lease event to the backend, until a stop signal
(STOP_SIGNALS), which removes the backend's devices and routes and keeps the lease so that a
restart gets the same subnet."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

from flannel_udp import control, droplog, healthz, latency, netlink, sdnotify, subnetenv
from flannel_udp.backends import (
    DEFAULT_QUEUES,
    DataplaneSettings,
    Network,
    UserspaceDataplane,
    make_network,
)
from flannel_udp.config import NO_PUBLIC_IP, NetworkConfig, parse_config
from flannel_udp.control import MAX_STATUS_PAGE, METRICS_PEER_LIMIT, STATUS_PEERS
from flannel_udp.droplog import DropLog
from flannel_udp.errors import UserError
from flannel_udp.ipmasq import IptablesError, IptablesRules, TrafficRules, resync_forever
from flannel_udp.lease import Lease
from flannel_udp.manager import LeaseManager, refuse_ipv6_on_v2
from flannel_udp.nftrules import NftablesRules
from flannel_udp.stores import Store, StoreError, StoreUnavailable
from flannel_udp.stores.keyspace import StoreChoice
from flannel_udp.trace import Tracing

log = logging.getLogger("flannel-udp")

WATCH_RETRY = 1.0  # seconds before following the store again after it failed
START_RETRY_MAX = 5.0  # seconds between attempts while the store is unreachable at start
IP6_FORWARD_OFF = ("net.ipv6.conf.all.forwarding=0: the kernel forwards no IPv6 between this "
                   "host's pods and the overlay; turn it on with "
                   "`sysctl -w net.ipv6.conf.all.forwarding=1`")
IP_FORWARD_OFF = ("net.ipv4.ip_forward=0: the kernel forwards nothing between this host's pods "
                  "and the overlay, so they get no traffic; turn it on with "
                  "`sysctl -w net.ipv4.ip_forward=1`")
STARTING = "starting: no lease yet (its log says what it waits for)"

# Each stops the daemon cleanly (devices, routes and rules removed, lease kept): SIGQUIT is
# the stopsignal of flanneld's supervisord sections, SIGHUP what a closed terminal sends.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
T = TypeVar("T")


@dataclass
class RunOptions:
    store: Store
    store_name: str  # for messages
    iface: netlink.IfaceChoice  # which underlay interface (flanneld's --iface flags)
    public_ip: IPv4Address | None
    subnet_file: str
    renew_margin_minutes: int
    net_config_path: str | None
    control_socket: str
    ip_masq: bool = False
    # How long to wait at start for a store that does not answer (etcd down); None: for ever.
    store_wait: float | None = 60.0
    # Accept a datagram only from a lease holder, carrying a source inside its subnet.
    source_check: bool = True
    # After forwarding, a fast-path thread polls this long (us) before it sleeps; 0: at once.
    busy_poll_us: int = 0
    queues: int = DEFAULT_QUEUES  # TUN queues of a userspace data plane (--queues)
    drop_log_interval: float = 10.0  # seconds; at most one line per drop reason this often
    iptables_resync: float = 5.0  # seconds between checks of the masquerade and forward rules
    # flanneld's FLANNEL-FWD accept rules for the Network, on by default as in flanneld.
    forward_rules: bool = True
    random_fully_disable: bool = False  # MASQUERADE without --random-fully
    blackhole_route: bool = False  # `ip route add blackhole <our subnet>`
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0  # 0: no /healthz and /metrics endpoint
    # The stores the flags allow (etcd's v3 and v2 keyspaces): the one holding the network
    # config replaces `store` at start. None: `store` it is.
    stores: StoreChoice | None = None
    # --public-ipv6: the IPv6 address other hosts reach this one at (dual stack); None: the
    # underlay interface's first global IPv6 address, as flanneld.
    public_ipv6: IPv6Address | None = None
    # /metrics has per-peer series while the table holds at most this many peers (0: never);
    # the totals are always there.
    metrics_peer_limit: int = METRICS_PEER_LIMIT


async def until_available(what: str, step: Callable[[], Awaitable[T]],
                          wait: float | None) -> T:
    """`step()`, tried again while the store is unreachable, for up to `wait` seconds (None:
    for ever, as flanneld); then the store's error, saying how long it waited."""
    deadline = None if wait is None else time.monotonic() + wait
    delay = 0.5
    while True:
        try:
            return await step()
        except StoreUnavailable as e:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise StoreUnavailable(f"{e}; gave up after waiting {wait:g} s") from None
            pause = delay if left is None else min(delay, left)
            log.warning("%s: %s; trying again in %.1f s", what, e, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, START_RETRY_MAX)


async def load_config(store: Store, store_name: str,
                      seed_path: str | None) -> tuple[NetworkConfig, bytes | None]:
    """The network config in the store, or the one in `seed_path` for a store that has none,
    with its bytes: they seed the store once the start can no longer be refused (`seed`)."""
    raw = await store.get_config()
    if raw is not None:
        return parse_config(raw), None
    if seed_path is None:
        raise UserError(f"no network config in {store_name}: set one with `flannel-udp "
                        "network set '<json>'` or give --net-config-path")
    try:
        raw = Path(seed_path).read_bytes()
    except OSError as e:
        raise UserError(f"--net-config-path {seed_path}: {e.strerror}") from None
    return parse_config(raw), raw


async def seed(store: Store, raw: bytes, config: NetworkConfig, seed_path: str) -> None:
    """Write the seed config into a store that has none; if another daemon seeded one first,
    theirs counts, and it must be the one this start was prepared for."""
    if await store.set_config(raw, create_only=True):
        log.info("network config seeded from %s", seed_path)
        return
    theirs = await store.get_config()
    if theirs is None or parse_config(theirs) != config:
        raise UserError(f"another daemon seeded a different network config while this one "
                        f"started from {seed_path}; start again to use the store's", exit_code=1)


def open_rules(config: NetworkConfig, opts: RunOptions) -> TrafficRules | None:
    """The masquerade and forward rules the flags and config ask for, in iptables or (with
    EnableNFTables) nftables; None when none is asked. A missing or unusable tool refuses the
    start when --ip-masq asked for it; the forward rules alone (flanneld's default) are only
    skipped, with a warning."""
    masq, forward = opts.ip_masq, opts.forward_rules
    if not (masq or forward):
        return None
    kind = NftablesRules if config.enable_nftables else IptablesRules
    try:
        return kind.probe(config.network, masq=masq, forward=forward,
                          random_fully_disable=opts.random_fully_disable,
                          ipv6_network=config.ipv6_network if config.enable_ipv6 else None)
    except UserError as e:
        if masq:
            raise
        log.warning("%s; no forward rules (--iptables-forward-rules=false silences this)", e)
        return None


def _ipv6_fields(lease: Lease) -> dict[str, str | None]:
    """A lease's IPv6 side for `status` (None for a v4-only lease)."""
    return {"ipv6_subnet": None if lease.ipv6_subnet is None else str(lease.ipv6_subnet),
            "public_ipv6": None if lease.public_ipv6 is None else str(lease.public_ipv6)}


def _subnets(lease: Lease) -> str:
    """A lease's subnets for the log: the IPv4 one, and/or the IPv6 one."""
    parts = ([str(lease.subnet)] if lease.has_ipv4 else []) + (
        [str(lease.ipv6_subnet)] if lease.ipv6_subnet is not None else [])
    return " ".join(parts)


def _network(config: NetworkConfig | None) -> str | None:
    """The IPv4 Network for `status`; None in an IPv6-only network (or before the config)."""
    return str(config.network) if config is not None and config.enable_ipv4 else None


class Daemon:
    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.started = time.time()
        self.config: NetworkConfig | None = None
        self.network: Network | None = None
        self.manager: LeaseManager | None = None
        self.rules: TrafficRules | None = None
        self.blackhole: IPv4Network | None = None  # our subnet's blackhole route, once added
        self.public_ipv6: IPv6Address | None = None  # dual stack: ours, once chosen
        self._ready = False  # rules, routes and subnet.env in place: /readyz answers 200
        self.store_errors = 0  # failed watches and resyncs (renewals: the manager's count)
        self._reacquiring = False  # our lease went away and is being taken again
        self._serving = False  # the lease is held and subnet.env written: `status` answers
        self._tracing = Tracing(self._userspace)  # `flannel-udp trace` clients

    def _write_subnet_env(self, lease: Lease) -> None:
        assert self.config is not None and self.network is not None
        try:
            v4 = self.config.enable_ipv4
            subnetenv.write(self.opts.subnet_file, subnetenv.render(
                self.config.network if v4 else None, lease.subnet if v4 else None,
                self.network.mtu, self.opts.ip_masq, self.config.ipv6_network,
                lease.ipv6_subnet))
        except OSError as e:
            raise UserError(f"cannot write subnet file {self.opts.subnet_file}: "
                            f"{e.strerror}", exit_code=1) from None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        starting = asyncio.current_task()
        assert starting is not None
        for sig in STOP_SIGNALS:
            # Until _serve takes the signals over: a stop while waiting (e.g. for etcd) is a
            # clean exit, with whatever was set up undone by the finally blocks.
            loop.add_signal_handler(sig, starting.cancel)
        # First what a running daemon may hold (the subnet file, the control socket, the health
        # port), so that a refused start takes no lease and writes no file; the backend's
        # devices and ports follow in _run, still before the lease.
        lock = subnetenv.SubnetFileLock(self.opts.subnet_file)
        control_server = health_server = None
        try:
            lock.acquire()
            # `status` answers "starting" until the lease is held (handle_request).
            control_server = await control.serve(self.opts.control_socket, self.handle_request,
                                                 {"trace": self.trace})
            if self.opts.healthz_port:  # it answers 503 while we wait for the store
                health_server = await healthz.serve(self.opts.healthz_ip,
                                                    self.opts.healthz_port, self.metrics_status)
            return await self._run()
        except asyncio.CancelledError:
            log.info("signal received while starting; exiting")
            return 0
        finally:
            if health_server is not None:
                health_server.close()
            if control_server is not None:
                control_server.close()
                with contextlib.suppress(OSError):
                    Path(self.opts.control_socket).unlink()
            lock.release()

    async def _run(self) -> int:
        opts = self.opts
        if opts.stores is not None:
            choice = opts.stores
            opts.store = await until_available("looking for the network config", choice.choose,
                                               opts.store_wait)
            opts.store_name = choice.describe(opts.store)
            missing = choice.none_found()
        else:
            missing = opts.store_name
        log.info("using %s", opts.store_name)  # the name says what kind of store it is
        config, seed_raw = await until_available(
            "reading the network config",
            lambda: load_config(opts.store, missing, opts.net_config_path),
            opts.store_wait)
        self.config = config
        if config.enable_ipv6 and opts.store.keyspace == "etcd v2":
            refuse_ipv6_on_v2()
        ext = await asyncio.to_thread(netlink.find_interface, opts.iface, opts.public_ip,
                                      None, config.enable_ipv4)
        if config.enable_ipv4:
            public_ip = opts.public_ip or ext.address
            log.info("network %s, subnets /%d, backend %s; underlay %s (%s, mtu %d), public IP "
                     "%s", config.network, config.subnet_len, config.backend_type, ext.name,
                     ext.address, ext.mtu, public_ip)
        else:
            # flanneld leaves an IPv6-only lease's PublicIP empty: 0.0.0.0 in its value.
            public_ip = NO_PUBLIC_IP
            if opts.public_ip is not None:
                log.warning("--public-ip %s: ignored, the network is IPv6-only (EnableIPv4 "
                            "false)", opts.public_ip)
            log.info("IPv6-only network, backend %s; underlay %s (mtu %d)",
                     config.backend_type, ext.name, ext.mtu)
        self.public_ipv6 = await self._public_ipv6(config, ext)
        if netlink.ip_forward() is False:  # refused by none: host-gw needs it as much
            log.warning("%s", IP_FORWARD_OFF)
        # No iptables (or nft): say so before taking anything.
        self.rules = await asyncio.to_thread(open_rules, config, opts)
        self.network = network = make_network(
            config, ext, public_ip,
            DataplaneSettings(opts.source_check, opts.busy_poll_us, opts.queues), self.public_ipv6)
        # Backends may create devices over netlink, which can't run on the loop thread.
        await asyncio.to_thread(network.open)
        try:
            if seed_raw is not None:  # nothing can refuse the start any more
                assert opts.net_config_path is not None
                await until_available("seeding the network config", lambda: seed(
                    opts.store, seed_raw, config, opts.net_config_path), opts.store_wait)
            self._log_dataplane_flags(config, network.userspace())
            return await self._serve(config, network, public_ip)
        finally:
            await asyncio.to_thread(network.close)
            log.info("removed %s's devices and routes; lease kept", config.backend_type)

    async def _public_ipv6(self, config: NetworkConfig,
                           ext: netlink.ExtIface) -> IPv6Address | None:
        """Dual stack: --public-ipv6, else the underlay interface's first global IPv6 address
        (flanneld's ExtV6Addr); UserError when there is none. Without EnableIPv6 flanneld
        ignores --public-ipv6: so do we, saying so."""
        if not config.enable_ipv6:
            if self.opts.public_ipv6 is not None:
                log.warning("--public-ipv6 %s: ignored, the network config has no EnableIPv6",
                            self.opts.public_ipv6)
            return None
        if self.opts.public_ipv6 is not None:
            address = self.opts.public_ipv6
        else:
            address = await asyncio.to_thread(netlink.interface_ipv6, ext.index)
            if address is None:
                raise UserError(f"EnableIPv6: interface {ext.name} has no global IPv6 address; "
                                "give it one or set --public-ipv6")
        log.info("%s: IPv6 network %s, subnets /%d, public IPv6 %s",
                 "dual stack" if config.enable_ipv4 else "IPv6-only", config.ipv6_network,
                 config.ipv6_subnet_len, address)
        if netlink.ip6_forward() is False:
            log.warning("%s", IP6_FORWARD_OFF)
        return address

    def _log_dataplane_flags(self, config: NetworkConfig,
                             userspace: UserspaceDataplane | None) -> None:
        """Say what the userspace data plane's flags do on the data plane open() took."""
        if userspace is not None:
            if not userspace.source_check:
                log.warning("source check off (--no-source-check): datagrams from anyone are "
                            "forwarded into the pod network")
            return
        hint = ' (Backend.Dataplane "userspace" has it)' if config.backend_type == "vxlan" else ""
        for flag, given in (("--busy-poll", self.opts.busy_poll_us),
                            ("--no-source-check", not self.opts.source_check),
                            ("--queues", self.opts.queues != DEFAULT_QUEUES)):
            if given:
                log.warning("%s: no effect on backend %s, which forwards in the kernel%s", flag,
                            config.backend_type, hint)

    def _userspace(self) -> UserspaceDataplane | None:
        """The data plane forwarding in this process; None before open() or where the kernel
        forwards."""
        return self.network.userspace() if self.network is not None else None

    async def _serve(self, config: NetworkConfig, network: Network,
                     public_ip: IPv4Address) -> int:
        opts = self.opts
        self.manager = manager = LeaseManager(
            opts.store, config, public_ip, network.backend_type, network.backend_data,
            renew_margin=opts.renew_margin_minutes * 60.0, public_ipv6=self.public_ipv6,
            backend_v6_data=network.backend_v6_data)
        previous = subnetenv.previous_subnet(opts.subnet_file)
        previous_v6 = subnetenv.previous_ipv6_subnet(opts.subnet_file)
        lease = await until_available("acquiring a lease",
                                      lambda: manager.acquire(previous, previous_v6),
                                      opts.store_wait)
        # The listing acquire() read serves: the table is read once at start.
        peers = await until_available("reading the leases",
                                      lambda: manager.load_peers(reuse_acquired=True),
                                      opts.store_wait)
        await asyncio.to_thread(network.start, lease, peers)
        self._write_subnet_env(lease)
        log.info("wrote %s", opts.subnet_file)
        tasks: list[asyncio.Task] = []
        try:
            await self._put_rules_in_place(lease.subnet, lease.ipv6_subnet)
            self._ready = True
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, stop.set)
            tasks = [asyncio.create_task(manager.renew_forever(), name="renew"),
                     asyncio.create_task(self._follow(), name="watch"),
                     asyncio.create_task(self._log_drops(), name="drop-log"),
                     asyncio.create_task(stop.wait(), name="stop")]
            if self.rules is not None:
                tasks.append(asyncio.create_task(
                    resync_forever(self.rules, opts.iptables_resync), name="rules"))
            self._serving = True
            log.info("running: %d peers; status: flannel-udp status --control-socket %s",
                     len(peers), opts.control_socket)
            sdnotify.notify("READY=1", f"STATUS=lease {_subnets(lease)}, {len(peers)} peers")
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.get_name() != "stop" and task.exception() is not None:
                    raise task.exception()
            log.info("signal received, shutting down")
            return 0
        finally:
            self._ready = False
            sdnotify.notify("STOPPING=1")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._remove_rules()

    async def _put_rules_in_place(self, subnet: IPv4Network,
                                  ipv6_subnet: IPv6Network | None = None) -> None:
        """The masquerade and forward rules (IPv6 ones too in dual stack) and the blackhole
        route for our `subnet`."""
        if self.rules is not None:
            try:
                await asyncio.to_thread(self.rules.setup, subnet, ipv6_subnet)
            except IptablesError as e:
                flag = "--ip-masq" if self.opts.ip_masq else "--iptables-forward-rules"
                raise UserError(f"{flag}: {e}", exit_code=1) from None
        if (self.opts.blackhole_route and self.blackhole != subnet
                and self.config is not None and self.config.enable_ipv4):
            if self.blackhole is not None:
                await asyncio.to_thread(netlink.delete_blackhole_route, self.blackhole)
            await asyncio.to_thread(netlink.add_blackhole_route, subnet)
            self.blackhole = subnet
            log.info("added route blackhole %s (--ip-blackhole-route)", subnet)

    async def _remove_rules(self) -> None:
        """Undo _put_rules_in_place; failures are logged, the stop goes on."""
        if self.rules is not None:
            try:
                await asyncio.to_thread(self.rules.teardown)
            except IptablesError as e:
                log.error("removing the masquerade and forward rules failed: %s", e)
        if self.blackhole is not None:
            try:
                await asyncio.to_thread(netlink.delete_blackhole_route, self.blackhole)
                log.info("removed route blackhole %s", self.blackhole)
            except Exception as e:  # netlink's errors: the stop must go on
                log.error("removing route blackhole %s failed: %s", self.blackhole, e)
            self.blackhole = None

    async def _follow(self) -> None:
        """Apply lease events; a store that fails is retried while forwarding goes on."""
        assert self.manager is not None and self.network is not None
        while True:
            try:
                await self.manager.watch(self.network.add_peer, self.network.remove_peer,
                                         self._own_lease_lost)
            except StoreError as e:
                self.store_errors += 1
                log.error("following the leases: %s; forwarding on the last known table, "
                          "retrying", e)
            while True:  # the store may still be away: keep forwarding until it answers
                await asyncio.sleep(WATCH_RETRY)
                try:
                    await self._resync()
                    break
                except StoreError as e:
                    self.store_errors += 1
                    log.error("reading the leases again: %s; retrying", e)

    async def _log_drops(self) -> None:
        """Log the drop counters' growth, one line at most every `drop_log_interval` seconds
        per reason, so that a flood of bad datagrams shows without flooding the log."""
        drop_log = DropLog(self.opts.drop_log_interval)
        gso_was_on = False
        while True:
            userspace = self._userspace()  # None: the kernel forwards, and counts no reasons
            try:
                # The TUN's queue drops are read from /sys: not on the loop thread.
                counters = await asyncio.to_thread(userspace.counters) if userspace else {}
                offloads = userspace.offloads() if userspace else {}
            except Exception as e:  # a report that failed must not stop the daemon
                log.debug("reading the drop counters failed: %s", e)
            else:
                line = drop_log.update(counters.get("drops", {}), time.monotonic())
                if line:
                    log.warning("%s", line)
                gso_on = bool(offloads.get("udp_gso"))
                if gso_was_on and not gso_on:
                    log.warning("UDP GSO off: the kernel refused a UDP_SEGMENT send (EIO); "
                                "sending datagram by datagram from now on")
                gso_was_on = gso_on
            await asyncio.sleep(self.opts.drop_log_interval)

    async def _resync(self) -> None:
        """Re-read the whole table after a store failure and apply the difference, our own
        lease included: it may have gone while we were not following."""
        assert self.manager is not None and self.network is not None
        assert self.manager.lease is not None
        before = set(self.manager.peers)
        await self.manager.load_peers()
        if not self.manager.holds_lease:
            log.warning("our lease %s is not in the lease table any more",
                        _subnets(self.manager.lease))
            await self._own_lease_lost()
        for subnet in before - set(self.manager.peers):
            self.network.remove_peer(subnet)
        for peer in list(self.manager.peers.values()):
            self.network.add_peer(peer.lease)

    async def _own_lease_lost(self) -> None:
        assert self.manager is not None and self.network is not None
        old = self.manager.lease
        assert old is not None
        self._reacquiring = True
        try:
            lease = await self.manager.acquire(old.subnet, old.ipv6_subnet)
            if (lease.subnet, lease.ipv6_subnet) != (old.subnet, old.ipv6_subnet):
                log.warning("subnet %s is gone; moving to %s", _subnets(old), _subnets(lease))
                peers = await self.manager.load_peers()
                await asyncio.to_thread(self.network.close)
                await asyncio.to_thread(self.network.open)
                await asyncio.to_thread(self.network.start, lease, peers)
                await self._put_rules_in_place(lease.subnet, lease.ipv6_subnet)
        finally:
            self._reacquiring = False
        self._write_subnet_env(lease)
        log.info("lease %s re-acquired; %s rewritten", _subnets(lease), self.opts.subnet_file)

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control socket request: `status` (the summary and one page of peers: "offset",
        "peers" at most MAX_STATUS_PAGE), or `routes` (the table's size, and for each of
        "subnets" whether the data plane has its route). Each costs a bounded time on the
        control loop, whatever the number of peers."""
        cmd = request.get("cmd")
        if cmd not in ("status", "routes"):
            return {"error": f"unknown command {cmd!r}"}
        if not self._serving:
            return {"error": STARTING}
        if cmd == "routes":
            return self._routes_request(request.get("subnets") or [])
        offset, limit = request.get("offset", 0), request.get("peers", STATUS_PEERS)
        if not (isinstance(offset, int) and isinstance(limit, int) and offset >= 0
                and limit >= 0):
            return {"error": "status: offset and peers must be integers >= 0"}
        return self.status(offset, min(limit, MAX_STATUS_PAGE))

    def _routes_request(self, subnets: Any) -> dict[str, Any]:
        """The `routes` request: counts, and which of `subnets` the data plane routes."""
        assert self.manager is not None and self.network is not None
        if not isinstance(subnets, list) or len(subnets) > MAX_STATUS_PAGE * 10:
            return {"error": f"routes: subnets must be a list of at most "
                             f"{MAX_STATUS_PAGE * 10} subnets"}
        try:
            wanted = [ip_network(s) for s in subnets]
        except (TypeError, ValueError) as e:
            return {"error": f"routes: {e}"}
        return {"peers": len(self.manager.peers), "routes": self.network.route_count(),
                "present": [self.network.peer_stats(s) is not None for s in wanted]}

    def metrics_status(self) -> dict[str, Any]:
        """What /healthz, /readyz and /metrics read: the summary, with every peer's row while
        there are at most --metrics-peer-limit peers (their per-peer series), none beyond."""
        count = len(self.manager.peers) if self.manager is not None else 0
        limit = self.opts.metrics_peer_limit
        return self.status(0, count if 0 < count <= limit else 0)

    def trace(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The `trace` stream (see `trace.Tracing.stream`)."""
        return self._tracing.stream(request, self._cannot_trace)

    def _cannot_trace(self) -> str | None:
        """Why this daemon has nothing to trace now, or None."""
        if not self._serving:
            return STARTING
        if self._userspace() is None:
            backend = self.config.backend_type if self.config else "?"
            return (f"backend {backend} forwards in the kernel: nothing to trace (only the "
                    "userspace data plane traces)")
        return None

    def health(self) -> dict[str, bool]:
        """The checks behind /healthz: we hold an unexpired lease, and the data plane runs (the
        kernel's, once started, does)."""
        lease = self.manager.lease if self.manager is not None else None
        held = (lease is not None and not self._reacquiring
                and (lease.expiration is None or lease.expiration > time.time()))
        userspace = self._userspace()
        running = (self.network is not None and lease is not None
                   and (userspace is None or userspace.running()))
        return {"lease": held, "dataplane": running}

    def _keyspace(self) -> str | None:
        """The store's keyspace; None while the etcd keyspaces are still being asked."""
        if self.opts.stores is not None and self.opts.stores.chosen is None:
            return None
        return self.opts.store.keyspace

    def status(self, offset: int = 0, limit: int = 0) -> dict[str, Any]:
        """The daemon's state: totals, and the rows of `limit` peers from the `offset`-th, in
        the order the daemon learned them (a client pages through them, and sorts)."""
        if self.manager is None or self.network is None or self.config is None:
            # Before the lease (e.g. /healthz asked while etcd is away): nothing to count yet.
            return {"lease": None, "network": _network(self.config),
                    "started": self.started, "peers": [], "peer_count": 0,
                    "peers_offset": 0, "counters": {},
                    "health": self.health(), "store_errors": self.store_errors,
                    "ready": False, "ip_forward": netlink.ip_forward(),
                    "keyspace": self._keyspace()}
        lease = self.manager.lease
        stats = self.network.stats()
        userspace = self._userspace()
        peers = []
        for ident, peer in itertools.islice(self.manager.peers.items(), offset, offset + limit):
            v4 = peer.lease.has_ipv4
            peers.append({"subnet": str(ident) if v4 else None,
                          "public_ip": str(peer.lease.public_ip) if v4 else None,
                          **_ipv6_fields(peer.lease),
                          "backend": peer.lease.backend, "since": peer.since,
                          "reachable": self.network.accepts(peer.lease),
                          **(self.network.peer_stats(ident) or {})})
        return {
            "lease": None if lease is None else {
                "subnet": str(lease.subnet) if lease.has_ipv4 else None,
                "public_ip": str(lease.public_ip) if lease.has_ipv4 else None,
                **_ipv6_fields(lease),
                "backend": self.config.backend_type, "expires": lease.expiration,
                **stats.get("lease", {})},
            "network": _network(self.config),
            "ipv6_network": (str(self.config.ipv6_network) if self.config.enable_ipv6
                             else None),
            "started": self.started,
            "peers": peers,
            "peers_offset": offset,
            "peer_count": len(self.manager.peers),  # in the lease table
            "routes": self.network.route_count(),  # in the data plane
            "programming_latency": latency.PROGRAMMING.snapshot(),
            "counters": droplog.countable(stats["counters"], self.config.backend_type),
            "health": self.health(),
            "store_errors": self.store_errors + self.manager.store_errors,
            "keyspace": self._keyspace(),
            "ip_masq": self.opts.ip_masq,
            # iptables or nftables: where the masquerade and forward rules are; None: none
            "rules": (None if self.rules is None
                      else "nftables" if isinstance(self.rules, NftablesRules) else "iptables"),
            "blackhole_route": None if self.blackhole is None else str(self.blackhole),
            "ready": self._ready,
            # The userspace data plane's; a kernel one has none of these (source check: None).
            "offloads": userspace.offloads() if userspace is not None else {},
            "trace": userspace.trace_info() if userspace is not None else {},
            "busy_poll_us": userspace.busy_poll_us if userspace is not None else 0,
            "source_check": userspace.source_check if userspace is not None else None,
            "ip_forward": netlink.ip_forward(),  # read when asked: it may be turned on later
        }
