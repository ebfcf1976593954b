"""Where the lease table lives. A store deals in raw keys and values, as etcd does; what they
mean is for `flannel_udp.lease` and the lease manager, so every store shares one lease logic.

Keys are relative to the store's prefix: 'config' is the network config, 'subnets/<key>' the
leases (the store maps them to `<prefix>/config` and `<prefix>/subnets/<key>`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class LeaseRecord:
    key: str  # e.g. '10.244.3.0-24'
    value: bytes
    expiration: float | None  # unix time; None never expires (a reservation)


@dataclass(frozen=True)
class Snapshot:
    """The lease table at one moment; `watch` reports what changes after it."""

    revision: int
    records: tuple[LeaseRecord, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LeaseEvent:
    kind: str  # 'put' (added or changed) or 'delete' (deleted or expired)
    record: LeaseRecord


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

    async def list_leases(self) -> Snapshot:
        """Every live lease."""

    async def create_lease(self, key: str, value: bytes, ttl: float) -> float | None:
        """Create the lease only if the key is absent (atomically across hosts); its expiration,
        or None when the key exists already."""

    async def put_lease(self, key: str, value: bytes, ttl: float | None) -> float | None:
        """Create or overwrite the lease with a fresh TTL (renewal); its expiration. With `ttl`
        None, a reservation: a lease that never expires."""

    async def delete_lease(self, key: str) -> None:
        """Remove the lease; no error when it is absent."""

    def watch(self, since: Snapshot) -> AsyncIterator[list[LeaseEvent]]:
        """Batches of lease events after `since`, for ever; expiry shows as 'delete'."""

    async def close(self) -> None:
        """Release whatever the store holds open."""
