"""The etcd v3 store, in flannel's layout: `<prefix>/config`, and `<prefix>/subnets/<net>-<len>`
bound to an etcd lease (a key without one is a reservation). Several endpoints, TLS with client
certificates, user and password.

A small client on grpc.aio, using aetcd's generated etcd v3 stubs (they import with current
protobuf). Its own channels, because aetcd's client opens insecure ones to one endpoint only.
A call that fails for want of a member moves on to the next endpoint; when none answers the call
raises StoreUnavailable. The watch never gives up: it re-watches from the last revision seen + 1
on any member, and after a compaction lists the table again and reports the difference.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# grpc's C core logs to stderr by itself (TLS handshake details, reconnects); every failure
# reaches us as an exception we turn into one line, so it is silenced before grpc loads.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from aetcd import rpc  # noqa: E402

from flannel_udp.stores import (  # noqa: E402
    UNKNOWN_EXPIRY,
    KeyFilter,
    LeaseEvent,
    LeaseRecord,
    Snapshot,
    StoreError,
    StoreUnavailable,
    every_key,
    no_key,
)
from flannel_udp.stores.etcdcommon import (  # noqa: E402
    RPC_TIMEOUT,
    Endpoint,
    EtcdOptions,
    EtcdTLSError,
    Relist,
    follow,
    key_path,
    parse_endpoints,
    unavailable_or_tls,
)

__all__ = ["EtcdOptions", "EtcdStore", "EtcdTLSError", "parse_endpoints"]

log = logging.getLogger("flannel-udp")

TTL_LOOKUPS = 32  # concurrent TimeToLive calls when listing every key's expiry
_CHANNEL_OPTIONS = [
    # Reconnect within 2 s of a member coming back (grpc's default backoff grows to 120 s).
    # The minimum is also how long one connection attempt may take (grpc's default: 20 s, in
    # which calls to a silent member wait their whole timeout before moving on).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a member that vanished without closing the watch stream. etcd refuses pings more
    # often than every 5 s, or without a stream open.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 << 20),  # a listing of thousands of leases
]
# Only a member that knows the leader may serve a watch, so a member cut off from the cluster
# ends our stream (and we move on) instead of going silent: etcd's WithRequireLeader.
_REQUIRE_LEADER = (("hasleader", "true"),)
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
_TLS_FAILURE = re.compile(r"handshake|ssl|tsi_|certificate", re.IGNORECASE)
_ADDRESS_PREFIX = re.compile(r"^[A-Z_]+: (?:ipv4:|ipv6:|dns:)?\S+:\d+: ")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z_]+)(?::\s*([^:]+))?")


def _key(*parts: str) -> bytes:
    return key_path(*parts).encode()


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _reason(e: grpc.aio.AioRpcError) -> str:
    """A grpc failure in a few words."""
    details = e.details() or e.code().name
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {RPC_TIMEOUT:g} s"
    if "Connection refused" in details:
        return "connection refused"
    if _TLS_FAILURE.search(details):
        m = _SSL_REASON.search(details)
        if m:
            return "TLS handshake failed: " + ": ".join(g.strip() for g in m.groups() if g)
        if "TSI_DATA_CORRUPTED" in details:  # the server's alert, as grpc reports it
            return ("TLS handshake failed: the server closed the connection (no client "
                    "certificate it trusts?)")
        return "TLS handshake failed: " + details.rsplit(": ", 1)[-1]
    details = details.removeprefix("failed to connect to all addresses; last error: ")
    return _ADDRESS_PREFIX.sub("", details)  # "UNKNOWN: ipv4:10.0.0.1:2379: " says it twice


@dataclass
class _Member:
    """One endpoint: its channel (made on first use, remade after close) and auth token."""

    endpoint: Endpoint
    credentials: grpc.ChannelCredentials | None
    channel: grpc.aio.Channel | None = None
    stubs: dict[str, Any] = field(default_factory=dict)
    token: str | None = None

    def stub(self, service: str) -> Any:
        if self.channel is None:
            if self.endpoint.secure:
                assert self.credentials is not None
                self.channel = grpc.aio.secure_channel(self.endpoint.target, self.credentials,
                                                       options=_CHANNEL_OPTIONS)
            else:
                self.channel = grpc.aio.insecure_channel(self.endpoint.target,
                                                         options=_CHANNEL_OPTIONS)
            self.stubs = {"KV": rpc.KVStub(self.channel), "Lease": rpc.LeaseStub(self.channel),
                          "Watch": rpc.WatchStub(self.channel),
                          "Auth": rpc.AuthStub(self.channel)}
        return self.stubs[service]

    async def close(self) -> None:
        if self.channel is not None:
            channel, self.channel, self.stubs, self.token = self.channel, None, {}, None
            await channel.close()


class EtcdStore:
    """Store on etcd v3; see `flannel_udp.stores.Store` for the contract of each method."""

    keyspace = "etcd v3"

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        self.name = f"etcd {','.join(e.url for e in options.endpoints)}"
        credentials = None
        if any(e.secure for e in options.endpoints):
            # As etcd's client: https endpoints use TLS (the system's CAs unless --etcd-cafile),
            # http ones do not, whatever certificate files are given.
            credentials = grpc.ssl_channel_credentials(options.ca, options.key, options.cert)
        self._members = [_Member(e, credentials) for e in options.endpoints]
        self._current = 0  # the member that answered last: tried first
        self._config_key = _key(options.prefix, "config")
        self._subnets = _key(options.prefix, "subnets") + b"/"

    # -- calls with failover --

    async def _metadata(self, member: _Member) -> tuple[tuple[str, str], ...]:
        if self.options.username is None:
            return ()
        if member.token is None:
            reply = await member.stub("Auth").Authenticate(
                rpc.AuthenticateRequest(name=self.options.username,
                                        password=self.options.password),
                timeout=RPC_TIMEOUT)
            member.token = reply.token
        return (("token", member.token),)

    async def _on_members(self, what: str,
                          attempt: Callable[[_Member, tuple], Awaitable[Any]]) -> Any:
        """`attempt(member, metadata)` on the current member, else on each next one; raises
        StoreUnavailable when no member could serve it, StoreError when one refused it."""
        failures = []
        count = len(self._members)
        for i in range(count):
            index = (self._current + i) % count
            member = self._members[index]
            for retry_auth in (True, False):
                try:
                    result = await attempt(member, await self._metadata(member))
                    self._current = index
                    return result
                except grpc.aio.AioRpcError as e:
                    if (e.code() == grpc.StatusCode.UNAUTHENTICATED and retry_auth
                            and member.token is not None):
                        member.token = None  # expired (etcd's simple tokens do): log in again
                        continue
                    if e.code() not in _TRANSIENT:
                        raise StoreError(f"etcd {member.endpoint.url}: {what}: "
                                         f"{e.details() or e.code().name}") from None
                    reason = _reason(e)
                    if reason == "Socket closed" and not member.endpoint.secure:
                        reason += " (is it an https:// endpoint?)"
                    failures.append((member.endpoint.url, reason))
                except (StoreUnavailable, asyncio.TimeoutError) as e:
                    failures.append((member.endpoint.url,
                                     str(e) or f"no answer within {RPC_TIMEOUT:g} s"))
                break
        raise unavailable_or_tls(failures, what)

    async def _call(self, service: str, method: str, request: Any) -> Any:
        async def attempt(member: _Member, metadata: tuple) -> Any:
            return await getattr(member.stub(service), method)(request, timeout=RPC_TIMEOUT,
                                                               metadata=metadata)
        return await self._on_members(f"{service}.{method}", attempt)

    async def _grant(self, ttl: float) -> tuple[int, float]:
        """A fresh etcd lease: its id and expiration."""
        started = time.time()
        reply = await self._call("Lease", "LeaseGrant",
                                 rpc.LeaseGrantRequest(TTL=max(1, round(ttl))))
        return reply.ID, started + reply.TTL

    async def _expiration(self, lease_id: int) -> float | None:
        """When the key bound to this etcd lease goes; None for a key without one."""
        if lease_id == 0:
            return None
        reply = await self._call("Lease", "LeaseTimeToLive",
                                 rpc.LeaseTimeToLiveRequest(ID=lease_id))
        return time.time() + max(reply.TTL, 0)  # -1: expired, about to be deleted

    async def _records(self, kvs: Sequence[Any], expiry_of: KeyFilter) -> list[LeaseRecord]:
        """The records of `kvs`: a key without an etcd lease is a reservation (None), one with
        a lease gets its expiration looked up (one call each) only if `expiry_of` takes it."""
        start = len(self._subnets)
        records: list[LeaseRecord] = []
        lookups: list[tuple[int, str, Any]] = []
        for kv in kvs:
            key = kv.key[start:].decode(errors="replace")
            if kv.lease and expiry_of(key):
                lookups.append((len(records), key, kv))
            records.append(LeaseRecord(key, kv.value, UNKNOWN_EXPIRY if kv.lease else None))
        if lookups:
            limit = asyncio.Semaphore(TTL_LOOKUPS)

            async def look_up(kv: Any) -> float | None:
                async with limit:
                    return await self._expiration(kv.lease)
            found = await asyncio.gather(*(look_up(kv) for _, _, kv in lookups))
            for (index, key, kv), expiration in zip(lookups, found, strict=True):
                records[index] = LeaseRecord(key, kv.value, expiration)
        return records

    # -- the Store API --

    async def get_config(self) -> bytes | None:
        reply = await self._call("KV", "Range", rpc.RangeRequest(key=self._config_key))
        return reply.kvs[0].value if reply.kvs else None

    async def set_config(self, value: bytes, create_only: bool = False) -> bool:
        put = rpc.PutRequest(key=self._config_key, value=value)
        if not create_only:
            await self._call("KV", "Put", put)
            return True
        return await self._put_if_absent(self._config_key, put)

    async def _put_if_absent(self, key: bytes, put: Any) -> bool:
        """flannel's If(Version(key) == 0) Then Put(...) transaction."""
        reply = await self._call("KV", "Txn", rpc.TxnRequest(
            compare=[rpc.Compare(key=key, target=rpc.Compare.VERSION,
                                 result=rpc.Compare.EQUAL, version=0)],
            success=[rpc.RequestOp(request_put=put)]))
        return reply.succeeded

    async def list_leases(self, expiry_of: KeyFilter = every_key) -> Snapshot:
        reply = await self._call("KV", "Range", rpc.RangeRequest(
            key=self._subnets, range_end=_range_end(self._subnets)))
        return Snapshot(reply.header.revision, tuple(await self._records(reply.kvs, expiry_of)))

    async def create_lease(self, key: str, value: bytes, ttl: float) -> float | None:
        lease_id, expiration = await self._grant(ttl)
        full_key = self._subnets + key.encode()
        if await self._put_if_absent(full_key, rpc.PutRequest(key=full_key, value=value,
                                                              lease=lease_id)):
            return expiration
        try:  # lost the race: the fresh etcd lease holds nothing, give it back
            await self._call("Lease", "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id))
        except StoreError as e:
            log.debug("revoking unused etcd lease %x: %s", lease_id, e)
        return None

    async def put_lease(self, key: str, value: bytes, ttl: float | None) -> float | None:
        # Renewal as flannel does it: a fresh etcd lease and the value put again with it (the
        # old etcd lease, now holding nothing, runs out by itself).
        lease_id, expiration = (0, None) if ttl is None else await self._grant(ttl)
        await self._call("KV", "Put", rpc.PutRequest(key=self._subnets + key.encode(),
                                                     value=value, lease=lease_id))
        return expiration

    async def delete_lease(self, key: str) -> None:
        await self._call("KV", "DeleteRange",
                         rpc.DeleteRangeRequest(key=self._subnets + key.encode()))

    async def close(self) -> None:
        for member in self._members:
            await member.close()

    # -- the watch --

    def watch(self, since: Snapshot, expiry_of: KeyFilter = no_key
              ) -> AsyncIterator[list[LeaseEvent]]:
        def watch_from(revision: int, known: dict[str, LeaseRecord]
                       ) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
            return self._watch_from(revision, known, expiry_of)
        return follow(since, watch_from, lambda: self.list_leases(expiry_of), "revision")

    async def _watch_from(self, revision: int, known: dict[str, LeaseRecord],
                          expiry_of: KeyFilter
                          ) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        """One watch stream from `revision` + 1: (events, revision seen) per response, `known`
        kept up to date. Ends by raising: StoreError when the stream breaks, Relist when the
        history from `revision` + 1 is gone."""
        call = None

        async def open_stream(member: _Member, metadata: tuple) -> Any:
            nonlocal call
            if call is not None:  # the attempt on the member before
                call.cancel()
            call = member.stub("Watch").Watch(metadata=metadata + _REQUIRE_LEADER)
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=self._subnets, range_end=_range_end(self._subnets),
                # No prev_kv: a delete is applied by its key alone, and etcd fetching every
                # deleted key's last value made a burst of deletes arrive 8x slower.
                start_revision=revision + 1, progress_notify=True)))
            reply = await asyncio.wait_for(call.read(), RPC_TIMEOUT)
            if reply is grpc.aio.EOF:
                raise StoreUnavailable("the watch stream closed at once")
            return reply

        try:
            reply = await self._on_members("Watch", open_stream)
            if reply.created and reply.header.revision < revision:
                # etcd went back in time (restored or rebuilt): watching from a revision it
                # has not reached would miss everything until it gets there.
                raise Relist(f"etcd is at revision {reply.header.revision}, before the "
                              f"{revision} seen: restored from a backup?")
            while True:
                if reply.compact_revision:
                    raise Relist(f"etcd compacted the lease history past revision "
                                  f"{revision + 1} (to {reply.compact_revision})")
                if reply.canceled:
                    raise StoreUnavailable(f"watch cancelled: {reply.cancel_reason or '?'}")
                if reply.events:
                    batch = await self._events(reply.events, known, expiry_of)
                    revision = max(ev.kv.mod_revision for ev in reply.events)
                    yield batch, revision
                elif not reply.created:
                    # A progress notice: the stream has sent everything up to this revision.
                    revision = max(revision, reply.header.revision)
                    yield [], revision
                else:
                    yield [], revision
                try:
                    reply = await call.read()
                except grpc.aio.AioRpcError as e:
                    raise StoreUnavailable(f"watch stream broken: {_reason(e)}") from None
                if reply is grpc.aio.EOF:
                    raise StoreUnavailable("the watch stream ended")
        finally:
            if call is not None:
                call.cancel()

    async def _events(self, events: Sequence[Any], known: dict[str, LeaseRecord],
                      expiry_of: KeyFilter) -> list[LeaseEvent]:
        """One response's events as lease events; `known` is updated only once all are made, so
        that a failure here replays the whole response on the next stream."""
        received = time.time()  # etcd keeps no time of a change: when it reached us
        puts = await self._records([ev.kv for ev in events if ev.type == rpc.Event.PUT],
                                   expiry_of)
        by_key = iter(puts)
        batch = []
        # The response's changes on top of `known`, applied to it at the end (a copy of the
        # whole table per response would cost O(leases) at every event).
        changed: dict[str, LeaseRecord | None] = {}
        for ev in events:
            if ev.type == rpc.Event.PUT:
                record = next(by_key)
                changed[record.key] = record
                batch.append(LeaseEvent("put", record, received))
            else:
                key = ev.kv.key[len(self._subnets):].decode(errors="replace")
                old = changed[key] if key in changed else known.get(key)
                changed[key] = None
                # A key never seen (put before the snapshot we follow from, e.g. by a resync
                # that read it gone) is reported too: the manager goes by the key alone.
                batch.append(LeaseEvent("delete", old or LeaseRecord(key, b"", None),
                                        received))
        for key, record in changed.items():
            if record is None:
                known.pop(key, None)
            else:
                known[key] = record
        return batch
