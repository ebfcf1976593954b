"""The subnet manager: acquires this node's lease, renews it, and follows everyone else's.

One lease logic for every store (flannel's Manager): the store moves bytes, `lease` parses them,
this module decides. The backend only hears `add_peer`/`remove_peer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from flannel_udp.config import NO_IPV4, NetworkConfig
from flannel_udp.errors import UserError
from flannel_udp.lease import (
    LEASE_TTL,
    Lease,
    LeaseValueError,
    choose_new_ipv6_subnet,
    choose_new_subnet,
    decode_lease,
    encode_lease_value,
    is_ours,
    lease_key,
    own_lease,
    parse_lease_key,
    stale_own_leases,
    subnet_key,
)
from flannel_udp.stores import (
    LeaseEvent,
    LeaseRecord,
    Snapshot,
    Store,
    StoreError,
    no_key,
)

log = logging.getLogger("flannel-udp")

RENEW_RETRY = 60.0  # seconds between renewal attempts after a failure, as flannel
ACQUIRE_ATTEMPTS = 50  # lost races before giving up
# Lease events applied before the control loop gets a turn (status, /metrics, renewals): a
# burst of thousands in one watch response must not hold it for the whole burst.
EVENTS_PER_TURN = 64
# Peers' comings and goings logged one line each per batch of events; beyond, one line counts
# the rest (a burst of 20,000 events would otherwise cost as much in logging as in routing).
LOGGED_PER_BATCH = 20

OnAdd = Callable[[Lease, float], None]  # (lease, when it changed in the store, unix time)
OnRemove = Callable[[IPv4Network | IPv6Network, float], None]  # (lease ident, when)


def _shown(lease: Lease) -> str:
    """A lease's subnets for the log: '10.244.3.0/24', dual stack '10.244.3.0/24 fd00::/64',
    IPv6-only 'fd00::/64'."""
    if not lease.has_ipv4:
        return str(lease.ipv6_subnet)
    return str(lease.subnet) + ("" if lease.ipv6_subnet is None else f" {lease.ipv6_subnet}")


def _public(lease: Lease) -> str:
    """A lease's underlay address for the log: PublicIP, PublicIPv6 for an IPv6-only one."""
    return str(lease.public_ip if lease.has_ipv4 else lease.public_ipv6)


def refuse_ipv6_on_v2() -> None:
    """EnableIPv6 on etcd's v2 keyspace: flannel v0.11, whose keyspace it is, has no IPv6."""
    raise UserError("EnableIPv6: flannel v0.11's etcd v2 keyspace has no IPv6 leases; keep the "
                    "dual-stack network config in etcd's v3 keyspace (--etcd-api v3)")


@dataclass(slots=True)
class Peer:
    lease: Lease
    since: float  # when this node learned of the lease (or of its last change)


class LeaseManager:
    """Owns this node's lease and the table of peers' leases."""

    def __init__(self, store: Store, config: NetworkConfig, public_ip: IPv4Address,
                 backend_type: str, backend_data: bytes | None,
                 renew_margin: float, ttl: float = LEASE_TTL, *,
                 public_ipv6: IPv6Address | None = None,
                 backend_v6_data: bytes | None = None) -> None:
        if config.enable_ipv6 and public_ipv6 is None:
            raise ValueError("a dual-stack lease needs a PublicIPv6")
        if config.enable_ipv6 and store.keyspace == "etcd v2":
            refuse_ipv6_on_v2()
        self.store = store
        self.config = config
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6 if config.enable_ipv6 else None
        # On etcd's v2 keyspace the peers may be flanneld v0.11 nodes: write their format.
        self.value = encode_lease_value(public_ip, backend_type, backend_data,
                                        v011=store.keyspace == "etcd v2",
                                        public_ipv6=self.public_ipv6,
                                        backend_v6_data=backend_v6_data)
        self.renew_margin = renew_margin
        self.ttl = ttl
        self.lease: Lease | None = None
        self._key = ""  # the store key of our lease, once taken
        # keyed by Lease.ident: the IPv4 subnet, or the IPv6 one in an IPv6-only network
        self.peers: dict[IPv4Network | IPv6Network, Peer] = {}
        self._snapshot: Snapshot | None = None
        self._acquired: Snapshot | None = None  # the listing acquire() last read
        self._acquired_leases: list[Lease] = []  # and its leases, parsed
        self.holds_lease = False  # our lease was in the table at the last load_peers()
        self.store_errors = 0  # renewals that failed
        # Set when our lease changes under the renewal's feet (made a reservation by hand,
        # renewed, taken anew): the renewal then works out its next time again.
        self._lease_changed = asyncio.Event()

    # -- parsing store records, one place --

    def _parse(self, record: LeaseRecord) -> Lease | None:
        parsed = parse_lease_key(record.key)
        if parsed is None:
            log.warning("lease store: skipping key %r: not a subnet key", record.key)
            return None
        try:
            lease = decode_lease(parsed[0], record.value, record.expiration, parsed[1])
        except LeaseValueError as e:
            log.warning("lease store: skipping lease %s: %s", record.key, e)
            return None
        subnet = lease.subnet
        if not self.config.enable_ipv4:
            return self._parse_v6_only(record.key, lease)
        if not lease.has_ipv4:
            log.warning("lease store: skipping lease %s: IPv6-only, the network has IPv4",
                        record.key)
            return None
        if not subnet.subnet_of(self.config.network):
            log.warning("lease store: skipping lease %s: outside Network %s",
                        record.key, self.config.network)
            return None
        if subnet.prefixlen != self.config.subnet_len:
            # Leases of another length would overlap ours or each other (and the route table
            # holds subnets of one length).
            log.warning("lease store: skipping lease %s: not a /%d subnet (SubnetLen)",
                        record.key, self.config.subnet_len)
            return None
        v6 = lease.ipv6_subnet
        if self.config.enable_ipv6 and v6 is not None and not (
                v6.prefixlen == self.config.ipv6_subnet_len
                and self.config.ipv6_network is not None
                and v6.subnet_of(self.config.ipv6_network)):
            # Its v4 part still counts, as a v4-only lease's does in a dual-stack network.
            log.warning("lease store: lease %s: IPv6 subnet %s is not a /%d of IPv6Network %s; "
                        "only its IPv4 subnet is used", record.key, v6,
                        self.config.ipv6_subnet_len, self.config.ipv6_network)
        return lease

    def _parse_v6_only(self, key: str, lease: Lease) -> Lease | None:
        """A lease of an IPv6-only network: flannel's empty IPv4 part and an IPv6 subnet of the
        IPv6Network's length."""
        v6 = lease.ipv6_subnet
        if lease.has_ipv4 or v6 is None:
            log.warning("lease store: skipping lease %s: not IPv6-only, the network is", key)
            return None
        if not (v6.prefixlen == self.config.ipv6_subnet_len
                and self.config.ipv6_network is not None
                and v6.subnet_of(self.config.ipv6_network)):
            log.warning("lease store: skipping lease %s: not a /%d of IPv6Network %s", key,
                        self.config.ipv6_subnet_len, self.config.ipv6_network)
            return None
        return lease

    def _parse_all(self, snapshot: Snapshot) -> list[Lease]:
        return [lease for _, lease in self._parse_keyed(snapshot)]

    def _parse_keyed(self, snapshot: Snapshot) -> list[tuple[str, Lease]]:
        """The leases with the keys they are stored under (as written, which a key put by hand
        need not be in the canonical form `lease_key` gives)."""
        return [(r.key, lease) for r in snapshot.records if (lease := self._parse(r)) is not None]

    # -- acquisition and renewal --

    async def acquire(self, preferred: IPv4Network | None,
                      preferred_v6: IPv6Network | None = None) -> Lease:
        """Flannel's order: our own lease by PublicIP, else `preferred` (and, dual stack,
        `preferred_v6`) if free, else a random free subnet; a lost race tries again. A dual-stack
        lease is one key holding both subnets, created atomically: both or neither."""
        for _ in range(ACQUIRE_ATTEMPTS):
            # No store call per key: a reservation shows without one (no etcd lease), and
            # the expiry of ours comes with the renewal that follows.
            self._acquired = await self.store.list_leases(no_key)
            keyed = self._parse_keyed(self._acquired)
            leases = self._acquired_leases = [lease for _, lease in keyed]
            stored_key = {id(lease): key for key, lease in keyed}
            mine = own_lease(self.config, leases, self.public_ip, self.public_ipv6)
            if mine is not None:
                # A reservation (a lease that never expires) stays one, as in flannel.
                ttl = None if mine.expiration is None else self.ttl
                key = stored_key[id(mine)]
                expiration = await self.store.put_lease(key, self.value, ttl)
                return self._took(key, mine.subnet, mine.ipv6_subnet, expiration,
                                  "reusing our lease")
            stale = stale_own_leases(self.config, leases, self.public_ip, self.public_ipv6)
            for old in stale:
                # E.g. our v4-only lease once the network is dual stack: flannel deletes it;
                # its v4 subnet is asked for again.
                log.info("lease %s of ours does not fit the network config; deleting it",
                         stored_key[id(old)])
                await self.store.delete_lease(stored_key[id(old)])
            if stale:
                if stale[0].has_ipv4:
                    preferred = preferred or stale[0].subnet
                continue
            subnet = choose_new_subnet(self.config, leases, preferred)
            ipv6_subnet = None
            if self.config.enable_ipv6:
                ipv6_subnet = choose_new_ipv6_subnet(self.config, leases, preferred_v6)
                if ipv6_subnet is None:
                    raise UserError(f"no free IPv6 subnet left in {self.config.ipv6_network} "
                                    f"(IPv6SubnetLen /{self.config.ipv6_subnet_len}, "
                                    f"{len(leases)} leases)", exit_code=1)
            if subnet is None:
                raise UserError(f"no free subnet left in {self.config.network} "
                                f"(SubnetLen /{self.config.subnet_len}, {len(leases)} leases)",
                                exit_code=1)
            key = subnet_key(subnet, ipv6_subnet)
            expiration = await self.store.create_lease(key, self.value, self.ttl)
            if expiration is not None and ipv6_subnet is not None:
                # The store creates the key atomically, but two dual-stack keys can share one
                # subnet (the same v6 with another v4): whoever sees the other after creating
                # gives way, so at most one keeps it (the first to look may see none).
                other = await self._overlapping(key, subnet, ipv6_subnet)
                if other is not None:
                    log.info("lease %s overlaps %s, taken meanwhile; trying again", key, other)
                    await self.store.delete_lease(key)
                    continue
            if expiration is not None:
                reused = (subnet == preferred if self.config.enable_ipv4
                          else ipv6_subnet == preferred_v6)
                how = "the subnet of the old subnet file" if reused else "new"
                return self._took(key, subnet, ipv6_subnet, expiration, how)
            log.debug("lease %s was taken meanwhile; trying again", key)
        raise UserError("could not acquire a subnet: every attempt lost a race", exit_code=1)

    async def _overlapping(self, key: str, subnet: IPv4Network,
                           ipv6_subnet: IPv6Network) -> str | None:
        """The key of another lease sharing a subnet with `key`'s, if any."""
        for lease in self._parse_all(await self.store.list_leases(no_key)):
            if lease_key(lease) != key and ((lease.has_ipv4 and subnet != NO_IPV4
                                             and lease.subnet.overlaps(subnet)) or (
                    lease.ipv6_subnet is not None and lease.ipv6_subnet.overlaps(ipv6_subnet))):
                return lease_key(lease)
        return None

    def _is_ours(self, lease: Lease) -> bool:
        return is_ours(self.config, lease, self.public_ip, self.public_ipv6)

    def _lease(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None,
               expiration: float | None) -> Lease:
        return Lease(subnet, self.public_ip, expiration=expiration, ipv6_subnet=ipv6_subnet,
                     public_ipv6=self.public_ipv6)

    def _took(self, key: str, subnet: IPv4Network, ipv6_subnet: IPv6Network | None,
              expiration: float | None, how: str) -> Lease:
        self._key = key  # renewals put this key
        self.lease = self._lease(subnet, ipv6_subnet, expiration)
        self._lease_changed.set()
        log.info("acquired lease %s (%s), expires in %.0f s", _shown(self.lease), how,
                 (expiration or time.time()) - time.time())
        return self.lease

    async def renew_forever(self) -> None:
        """Renew `renew_margin` seconds before expiry; retry every minute on failure. A
        reservation (no expiry) is left as it is, also one made while we run."""
        while True:
            assert self.lease is not None
            self._lease_changed.clear()
            expiration = self.lease.expiration
            wait = None if expiration is None else max(0.0, expiration - self.renew_margin
                                                       - time.time())
            try:
                await asyncio.wait_for(self._lease_changed.wait(), wait)
                continue  # changed meanwhile: work the time out again
            except asyncio.TimeoutError:
                pass
            try:
                new_exp = await self.store.put_lease(self._key, self.value,
                                                     self.ttl)
            except StoreError as e:
                self.store_errors += 1
                log.error("renewing lease %s failed (%s); retrying in %.0f s",
                          _shown(self.lease), e, RENEW_RETRY)
                await asyncio.sleep(RENEW_RETRY)
                continue
            self.lease = self._lease(self.lease.subnet, self.lease.ipv6_subnet, new_exp)
            log.info("renewed lease %s", _shown(self.lease))

    # -- following the table --

    def _is_own_key(self, key: str) -> bool:
        """The one key whose expiry the store is asked for: ours (the renewal needs it)."""
        return key == self._key

    async def load_peers(self, reuse_acquired: bool = False) -> list[Lease]:
        """Read the table once: the peers as of now (watch() goes on from here). Also notes
        whether our own lease is still in it (`holds_lease`). With `reuse_acquired`, right
        after acquire(): its listing serves (the table is read once at start), and the watch
        from its revision brings our own write and whatever changed since."""
        acquired, self._acquired = self._acquired, None
        parsed, self._acquired_leases = self._acquired_leases, []
        if reuse_acquired and acquired is not None:
            self._snapshot = acquired
            held = True  # just taken or renewed
            leases = parsed
        else:
            self._snapshot = await self.store.list_leases(self._is_own_key)
            held = None
            leases = self._parse_all(self._snapshot)
        now = time.time()
        mine = self.lease.ident if self.lease is not None else None
        my_key = lease_key(self.lease) if self.lease is not None else None
        self.holds_lease = held or any(lease_key(lease) == my_key and self._is_ours(lease)
                                       for lease in leases)
        self.peers = {lease.ident: Peer(lease, now) for lease in leases if lease.ident != mine}
        return [p.lease for p in self.peers.values()]

    async def watch(self, on_add: OnAdd, on_remove: OnRemove,
                    on_own_lost: Callable[[], Awaitable[None]]) -> None:
        """Apply lease events for ever (`on_remove` gets the lease's ident; both get when the
        change happened, see LeaseEvent.at). Our own lease going away calls `on_own_lost`.

        No queue stands between the store's watch and the table: each batch is applied as it
        is read, the next read only when it is done, so a burst waits in etcd's watch stream
        (whose flow control etcd handles without blocking anyone) and never in a buffer of
        ours that could fill up (flannel issue 2251)."""
        assert self._snapshot is not None, "load_peers() first"
        # aclosing: when a handler fails, the store's watch (an etcd stream) ends now, not
        # whenever the generator is collected.
        async with contextlib.aclosing(self.store.watch(
                self._snapshot, self._is_own_key)) as batches:
            async for events in batches:
                await self._apply(events, on_add, on_remove, on_own_lost)

    async def _apply(self, events: list[LeaseEvent], on_add: OnAdd, on_remove: OnRemove,
                     on_own_lost: Callable[[], Awaitable[None]]) -> None:
        received = time.time()
        quiet = {"appeared": 0, "changed": 0, "went away": 0}  # beyond the lines logged
        logged = 0
        each = len(events) if log.isEnabledFor(logging.DEBUG) else LOGGED_PER_BATCH
        for count, event in enumerate(events, 1):
            if count % EVENTS_PER_TURN == 0:
                await asyncio.sleep(0)  # let status, /metrics and the renewal run
            at = event.at if event.at is not None else received
            if event.kind == "delete":
                gone = self._gone(event.record.key)
                if gone is None:
                    continue
                ident, key = gone
                if self.lease is not None and ident == self.lease.ident:
                    # Not an older key of our subnet (e.g. the v4-only lease we replaced)
                    if key == lease_key(self.lease):
                        log.warning("our lease %s was deleted or expired", _shown(self.lease))
                        await on_own_lost()
                    continue
                known = self.peers.get(ident)
                # Only the key the peer holds now: not an older key of the same v4 subnet (a
                # node that moved from a v4-only lease to a dual-stack one).
                if known is not None and lease_key(known.lease) == key:
                    del self.peers[ident]
                    if logged < each:
                        logged += 1
                        log.info("peer %s (%s) went away", _shown(known.lease),
                                 _public(known.lease))
                    else:
                        quiet["went away"] += 1
                    on_remove(ident, at)
                continue
            lease = self._parse(event.record)
            if lease is None:
                continue
            if self.lease is not None and lease.ident == self.lease.ident:
                if lease_key(lease) != lease_key(self.lease):
                    # Our v4 subnet under another key (e.g. the v4-only lease we replaced)
                    log.error("lease %s overlaps ours (%s)", lease_key(lease),
                              lease_key(self.lease))
                elif not self._is_ours(lease):
                    log.error("our subnet %s is now leased to %s", _shown(lease),
                              lease.public_ip if lease.has_ipv4 else lease.public_ipv6)
                elif lease.expiration != self.lease.expiration:
                    # flanneld too takes its lease's expiry from the watch: a lease made a
                    # reservation by hand is not renewed (given a TTL again) behind it.
                    if lease.expiration is None:
                        log.info("our lease %s is now a reservation: it never expires",
                                 _shown(lease))
                    self.lease = self._lease(self.lease.subnet, self.lease.ipv6_subnet,
                                             lease.expiration)
                    self._lease_changed.set()
                continue
            old = self.peers.get(lease.ident)
            self.peers[lease.ident] = Peer(lease, time.time())
            how = "changed" if old else "appeared"
            if logged < each:
                logged += 1
                log.info("peer %s at %s (%s) %s", _shown(lease), _public(lease), lease.backend,
                         how)
            else:
                quiet[how] += 1
            on_add(lease, at)
        if any(quiet.values()):
            log.info("and %s more peers in this batch of lease events (-v 1 logs each)",
                     ", ".join(f"{n} {how}" for how, n in quiet.items() if n))

    def _gone(self, key: str) -> tuple[IPv4Network | IPv6Network, str] | None:
        """A deleted key's ident and canonical key (no need to read the value it had); None
        for a key that is no lease of this network (skipped, with a warning, when put)."""
        parsed = parse_lease_key(key)
        if parsed is None:
            return None
        subnet, ipv6_subnet = parsed
        if not self.config.enable_ipv4 or (subnet == NO_IPV4 and ipv6_subnet is not None):
            if ipv6_subnet is None:
                return None
            return ipv6_subnet, subnet_key(subnet, ipv6_subnet)
        return subnet, subnet_key(subnet, ipv6_subnet)
