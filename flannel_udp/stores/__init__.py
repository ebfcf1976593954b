"""Where the lease table lives. A store deals in raw keys and values, as etcd does; what they
mean is for `flannel_udp.lease` and the lease manager, so every store shares one lease logic.

Keys are relative to the store's prefix: 'config' is the network config, 'subnets/<key>' the
leases (the store maps them to `<prefix>/config` and `<prefix>/subnets/<key>`)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

# The expiration of a lease that expires, where the store was not asked when (etcd v3 needs one
# call per key for it, which a daemon following 50,000 leases does not make: it routes to a
# peer whatever its expiry). Later than any time, so nothing takes such a lease for expired.
UNKNOWN_EXPIRY = math.inf

KeyFilter = Callable[[str], bool]  # which keys' expiration a store must look up


def every_key(key: str) -> bool:
    return True


def no_key(key: str) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    key: str  # e.g. '10.244.3.0-24'
    value: bytes
    # unix time; None never expires (a reservation); UNKNOWN_EXPIRY expires, when not asked
    expiration: float | None


@dataclass(frozen=True)
class Snapshot:
    """The lease table at one moment; `watch` reports what changes after it."""

    revision: int
    records: tuple[LeaseRecord, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class LeaseEvent:
    kind: str  # 'put' (added or changed) or 'delete' (deleted or expired)
    record: LeaseRecord
    # When it happened, unix time: the store's own time where it keeps one (the embedded
    # store: the file's modification time, a lease's expiry), else when the daemon received
    # the event (etcd keeps no time of a change, v3 or v2). None: unknown.
    at: float | None = None


class StoreError(Exception):
    """The store could not be reached or read; the message says which and why."""


class StoreUnavailable(StoreError):
    """The store did not answer (e.g. no etcd member reachable): it may come back, so a starting
    daemon waits for it, while a StoreError of another kind (a refusal) is final."""


class Store(Protocol):
    # Which keyspace holds the table, for the log and `status`: "embedded", "etcd v3" or
    # "etcd v2" (where flannel v0.11's lease JSON is spoken).
    keyspace: str

    async def get_config(self) -> bytes | None:
        """The network config JSON, or None when none was set."""

    async def set_config(self, value: bytes, create_only: bool = False) -> bool:
        """Write the network config JSON; with `create_only`, only when there is none yet
        (atomically). Whether it was written."""

    async def list_leases(self, expiry_of: KeyFilter = every_key) -> Snapshot:
        """Every live lease, in one read. The expiration of the keys `expiry_of` rejects may be
        UNKNOWN_EXPIRY, where the store would have to ask for it apart (etcd v3)."""

    async def create_lease(self, key: str, value: bytes, ttl: float) -> float | None:
        """Create the lease only if the key is absent (atomically across hosts); its expiration,
        or None when the key exists already."""

    async def put_lease(self, key: str, value: bytes, ttl: float | None) -> float | None:
        """Create or overwrite the lease with a fresh TTL (renewal); its expiration. With `ttl`
        None, a reservation: a lease that never expires."""

    async def delete_lease(self, key: str) -> None:
        """Remove the lease; no error when it is absent."""

    def watch(self, since: Snapshot, expiry_of: KeyFilter = no_key
              ) -> AsyncIterator[list[LeaseEvent]]:
        """Batches of lease events after `since`, for ever; expiry shows as 'delete'. A put's
        expiration is looked up (where that costs a call) only for the keys `expiry_of`
        accepts, else it may be UNKNOWN_EXPIRY."""

    async def close(self) -> None:
        """Release whatever the store holds open."""
