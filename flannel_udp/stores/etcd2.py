"""The etcd v2 store, in flannel v0.11's layout: `<prefix>/config`, and
`<prefix>/subnets/<net>-<len>` as v2 keys with a TTL (a key without one is a reservation).
Several endpoints, TLS with client certificates, user and password (HTTP basic auth), as
flanneld v0.11 speaks to etcd.

etcd's v2 API is plain HTTP and JSON (aiohttp here). A request that fails for want of a member
moves on to the next endpoint; when none answers it raises StoreUnavailable. The watch is a long
poll (`wait=true&waitIndex=N`) that resumes from the last index seen + 1 on any member; when etcd
has dropped that index from its history of 1000 events (errorCode 401) it lists the table again
and reports the difference (the loop is `etcdcommon.follow`, shared with the v3 store).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import aiohttp

from flannel_udp.stores import (
    KeyFilter,
    LeaseEvent,
    LeaseRecord,
    Snapshot,
    StoreError,
    every_key,
    no_key,
)
from flannel_udp.stores.etcdcommon import (
    RPC_TIMEOUT,
    TLS_HINT,
    Endpoint,
    EtcdOptions,
    EtcdTLSError,
    Relist,
    follow,
    key_path,
    unavailable_or_tls,
)

log = logging.getLogger("flannel-udp")
T = TypeVar("T")

# A wait that saw no event is asked again after this long: it notices a member that vanished
# without closing the connection, and moves the index on (etcd keeps only 1000 events).
WATCH_REISSUE = 60.0
# etcd v2's errorCodes (etcd's error package).
KEY_NOT_FOUND, NOT_A_FILE, NODE_EXISTS, INDEX_CLEARED = 100, 102, 105, 401
_PUT_ACTIONS = {"set", "create", "update", "compareAndSwap"}
_DELETE_ACTIONS = {"delete", "expire", "compareAndDelete"}
_FRACTION = re.compile(r"\.(\d+)")


class EtcdV2Disabled(StoreError):
    """The member answers, but not etcd's v2 API (etcd 3.4 without --enable-v2=true)."""


def parse_expiration(text: Any) -> float | None:
    """A v2 node's `expiration` (RFC 3339 with nanoseconds, e.g.
    '2026-11-29T22:02:56.633632017Z') as unix time; None when absent or unreadable."""
    if not isinstance(text, str):
        return None
    text = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class _Reply:
    """One answer of etcd's v2 API: status, the X-Etcd-Index header, the JSON body."""

    def __init__(self, status: int, index: int | None, body: Any) -> None:
        self.status, self.index, self.body = status, index, body

    @property
    def error_code(self) -> int | None:
        return self.body.get("errorCode") if isinstance(self.body, dict) else None

    def server_error(self) -> str:
        """A 5xx answer in a few words."""
        return f"HTTP {self.status}: {self.body.get('message') or 'server error'}"


def _index(headers: Any) -> int | None:
    try:
        return int(headers.get("X-Etcd-Index", ""))
    except ValueError:
        return None


def _tls_reason(e: BaseException) -> str | None:
    """'TLS handshake failed: ...' for a TLS failure among the causes of `e`, else None."""
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        e = e.certificate_error
    elif isinstance(e, aiohttp.ClientConnectorError):
        e = e.os_error
    seen: BaseException | None = e
    for _ in range(5):  # the exception and a few of its causes
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"TLS handshake failed: {seen.reason or 'CERTIFICATE_VERIFY_FAILED'}: "
                    f"{seen.verify_message}")
        if isinstance(seen, ssl.SSLError):
            reason = seen.reason or str(seen)
            if "CERTIFICATE_REQUIRED" in reason or "BAD_CERTIFICATE" in reason:
                return (f"TLS handshake failed: {reason} (no client certificate it "
                        "trusts?)")
            return f"TLS handshake failed: {reason}"
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(e: BaseException, endpoint: Endpoint) -> str:
    """A failed request in a few words."""
    tls = _tls_reason(e)
    if tls:
        return tls
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {RPC_TIMEOUT:g} s"
    if isinstance(e, aiohttp.ClientConnectorError):
        if isinstance(e.os_error, ConnectionRefusedError):
            return "connection refused"
        return e.os_error.strerror or str(e.os_error)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        if not endpoint.secure:
            return "the connection closed (is it an https:// endpoint?)"
        return "the connection closed"
    return str(e) or type(e).__name__


class Etcd2Store:
    """Store on etcd's v2 API; see `flannel_udp.stores.Store` for the contract of each method."""

    keyspace = "etcd v2"

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        self.name = f"etcd {','.join(e.url for e in options.endpoints)}"
        self._ssl: ssl.SSLContext | None = None
        if any(e.secure for e in options.endpoints):
            self._ssl = options.ssl_context()
        self._headers = {}
        if options.username:  # HTTP basic auth, as etcd's v2 client sends it
            credentials = f"{options.username}:{options.password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._current = 0  # the member that answered last: tried first
        self._config_key = key_path(options.prefix, "config")
        self._subnets = key_path(options.prefix, "subnets")

    # -- requests with failover --

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(
                    total=None, connect=RPC_TIMEOUT, sock_connect=RPC_TIMEOUT))
            self._session_loop = loop
        return self._session

    def _url(self, endpoint: Endpoint, key: str) -> str:
        return f"{endpoint.base_url}/v2/keys{key}"

    async def _on_members(self, what: str, attempt: Callable[[Endpoint], Awaitable[T]]) -> T:
        """`attempt(endpoint)` on the current member, else on each next one; StoreUnavailable
        when no member could serve it (a StoreError, a member's refusal, goes through)."""
        failures: list[tuple[str, str]] = []
        count = len(self.options.endpoints)
        for i in range(count):
            index = (self._current + i) % count
            endpoint = self.options.endpoints[index]
            try:
                result = await attempt(endpoint)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                failures.append((endpoint.url, _reason(e, endpoint)))
                continue
            self._current = index
            return result
        raise unavailable_or_tls(failures, what)

    async def _request(self, method: str, key: str, what: str,
                       params: dict[str, str] | None = None,
                       form: dict[str, str] | None = None) -> _Reply:
        """The request on the current member, else on each next one; StoreUnavailable when no
        member could serve it, StoreError when one refused it."""
        async def attempt(endpoint: Endpoint) -> _Reply:
            async with self._client().request(
                    method, self._url(endpoint, key), params=params, data=form,
                    ssl=self._ssl if endpoint.secure else None,
                    timeout=aiohttp.ClientTimeout(total=RPC_TIMEOUT)) as response:
                reply = await self._reply(endpoint, response, what)
            if reply.status >= 500:  # the member answered but cannot serve now (no leader...)
                raise aiohttp.ClientError(reply.server_error())
            return reply
        return await self._on_members(what, attempt)

    async def _reply(self, endpoint: Endpoint, response: aiohttp.ClientResponse,
                     what: str) -> _Reply:
        """The answer; a refusal that is not etcd's JSON raises StoreError (5xx: left to the
        caller, which tries another member)."""
        text = await response.text(errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        first = (text.strip().splitlines() or [""])[0][:120]
        if response.status >= 500:
            return _Reply(response.status, _index(response.headers),
                          body if isinstance(body, dict) else {"message": first})
        if not isinstance(body, dict):
            if response.status == 404:
                raise EtcdV2Disabled(f"etcd at {endpoint.url} does not serve the v2 API (start "
                                     "it with --enable-v2=true)")
            if response.status == 400 and "HTTPS" in text and not endpoint.secure:
                raise StoreError(f"etcd {endpoint.url}: {what}: {first} (is it an https:// "
                                 "endpoint?)")
            raise StoreError(f"etcd {endpoint.url}: {what}: HTTP {response.status}: {first}")
        return _Reply(response.status, _index(response.headers), body)

    def _refused(self, reply: _Reply, what: str) -> StoreError:
        body = reply.body
        if reply.status == 401:
            return StoreError(f"etcd: {what}: authentication failed ({body.get('message')}); "
                              "check --etcd-username and --etcd-password")
        message = body.get("message") or f"HTTP {reply.status}"
        if body.get("cause"):
            message += f" ({body['cause']})"
        return StoreError(f"etcd: {what}: {message}")

    def _record(self, node: dict[str, Any]) -> LeaseRecord | None:
        """The lease a v2 node holds; None (with a warning naming the key) for a directory."""
        key = str(node.get("key", ""))
        relative = key[len(self._subnets) + 1:]
        if node.get("dir"):
            log.warning("lease store: skipping key %r: a v2 directory where a lease key belongs",
                        key)
            return None
        value = node.get("value")
        return LeaseRecord(relative, (value if isinstance(value, str) else "").encode(),
                           parse_expiration(node.get("expiration")))

    # -- the Store API --

    async def get_config(self) -> bytes | None:
        reply = await self._request("GET", self._config_key, "reading the config")
        if reply.error_code == KEY_NOT_FOUND:
            return None
        if reply.status != 200:
            raise self._refused(reply, "reading the config")
        node = reply.body.get("node") or {}
        if node.get("dir"):
            raise StoreError(f"etcd: {self._config_key} is a v2 directory, not the network "
                             "config; remove it (ETCDCTL_API=2 etcdctl rm -r) and set the config")
        value = node.get("value")
        return value.encode() if isinstance(value, str) else b""

    async def set_config(self, value: bytes, create_only: bool = False) -> bool:
        params = {"prevExist": "false"} if create_only else None
        reply = await self._request("PUT", self._config_key, "writing the config", params,
                                    {"value": value.decode(errors="replace")})
        if create_only and reply.error_code == NODE_EXISTS:
            return False
        if reply.status not in (200, 201):
            raise self._refused(reply, "writing the config")
        return True

    async def list_leases(self, expiry_of: KeyFilter = every_key) -> Snapshot:
        # A v2 node carries its expiration: every key's comes with the one read.
        reply = await self._request("GET", self._subnets, "listing the leases",
                                    {"recursive": "true"})
        if reply.error_code == KEY_NOT_FOUND:
            return Snapshot(reply.index or reply.body.get("index") or 0)
        if reply.status != 200:
            raise self._refused(reply, "listing the leases")
        node = reply.body.get("node") or {}
        records = []
        if not node.get("dir"):
            log.warning("%s is a v2 key, not a directory of leases; no leases read",
                        self._subnets)
        for child in node.get("nodes") or []:
            record = self._record(child)
            if record is not None:
                records.append(record)
        return Snapshot(reply.index or 0, tuple(records))

    async def _put(self, key: str, value: bytes, ttl: float | None,
                   create_only: bool) -> float | None | bool:
        form = {"value": value.decode(errors="replace")}
        if ttl is not None:
            form["ttl"] = str(max(1, round(ttl)))
        params = {"prevExist": "false"} if create_only else None
        started = time.time()
        reply = await self._request("PUT", f"{self._subnets}/{key}", "writing a lease", params,
                                    form)
        if create_only and reply.error_code in (NODE_EXISTS, NOT_A_FILE):
            return False
        if reply.status not in (200, 201):
            raise self._refused(reply, f"writing lease {key}")
        if ttl is None:
            return None
        expiration = parse_expiration((reply.body.get("node") or {}).get("expiration"))
        return expiration if expiration is not None else started + ttl

    async def create_lease(self, key: str, value: bytes, ttl: float) -> float | None:
        created = await self._put(key, value, ttl, create_only=True)
        return None if created is False else created  # type: ignore[return-value]

    async def put_lease(self, key: str, value: bytes, ttl: float | None) -> float | None:
        return await self._put(key, value, ttl, create_only=False)  # type: ignore[return-value]

    async def delete_lease(self, key: str) -> None:
        reply = await self._request("DELETE", f"{self._subnets}/{key}", "deleting a lease")
        if reply.status not in (200, 202) and reply.error_code != KEY_NOT_FOUND:
            raise self._refused(reply, f"deleting lease {key}")

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            if not session.closed and self._session_loop is asyncio.get_running_loop():
                await session.close()

    # -- the watch --

    def watch(self, since: Snapshot, expiry_of: KeyFilter = no_key
              ) -> AsyncIterator[list[LeaseEvent]]:
        return follow(since, self._watch_from, self.list_leases, "index")

    async def _watch_from(self, last: int, known: dict[str, LeaseRecord]
                          ) -> AsyncIterator[tuple[list[LeaseEvent], int]]:
        """Long polls from `last` + 1, one after the other: (events, index seen) per answer,
        `known` kept up to date. Ends by raising: StoreError when a member cannot be reached,
        Relist when etcd's history no longer holds `last` + 1."""
        params = {"wait": "true", "recursive": "true"}
        while True:
            params["waitIndex"] = str(last + 1)
            event, last = await self._on_members(
                "watch", functools.partial(self._wait, params=params, last=last))
            yield (self._event(event, known, time.time()) if event is not None else []), last

    async def _wait(self, endpoint: Endpoint, params: dict[str, str],
                    last: int) -> tuple[dict[str, Any] | None, int]:
        """One long poll on one member: the event and its index, or (None, index up to which
        nothing happened) when WATCH_REISSUE passed without one."""
        # No total timeout: a long poll lasts until an event; etcd sends the headers at once.
        response = await asyncio.wait_for(self._client().get(
            self._url(endpoint, self._subnets), params=params,
            ssl=self._ssl if endpoint.secure else None), RPC_TIMEOUT)
        async with response:
            started_at = _index(response.headers)
            try:
                reply = await asyncio.wait_for(self._reply(endpoint, response, "watch"),
                                               WATCH_REISSUE)
            except asyncio.TimeoutError:
                # etcd starts a wait at its current index, having found no event for us from
                # waitIndex up to there: nothing was missed up to that index.
                last = max(last, started_at or 0)
                log.debug("etcd v2 watch on %s: no event for %g s; asking again from index %d",
                          endpoint.url, WATCH_REISSUE, last + 1)
                return None, last
        if reply.status >= 500:
            raise aiohttp.ClientError(reply.server_error())
        if reply.error_code == INDEX_CLEARED:
            raise Relist(f"etcd's v2 history no longer holds index {last + 1} "
                         f"({reply.body.get('message', 'cleared')})")
        if reply.status != 200:
            raise self._refused(reply, "watch")
        node = reply.body.get("node") or {}
        return reply.body, int(node.get("modifiedIndex", last + 1))

    def _event(self, event: dict[str, Any], known: dict[str, LeaseRecord],
               received: float) -> list[LeaseEvent]:
        """One v2 event as lease events (`received`: when it reached us; etcd keeps no time of
        a change), `known` updated."""
        action = event.get("action")
        node = event.get("node") or {}
        key = str(node.get("key", ""))
        if not key.startswith(self._subnets):
            return []
        if action in _PUT_ACTIONS:
            if key == self._subnets:  # the directory of leases itself made: nothing to apply
                return []
            record = self._record(node)
            if record is None or not record.key:
                return []
            known[record.key] = record
            return [LeaseEvent("put", record, received)]
        if action in _DELETE_ACTIONS:
            relative = key[len(self._subnets) + 1:]
            if node.get("dir") or not relative:  # a directory went, and every key in it
                gone = [k for k in known if not relative or k.startswith(relative + "/")]
                return [LeaseEvent("delete", known.pop(k), received) for k in gone]
            old = known.pop(relative, None)
            previous = event.get("prevNode") or {}
            if old is None and isinstance(previous.get("value"), str):
                old = LeaseRecord(relative, previous["value"].encode(), None)
            # else never seen, so nobody holds it: nothing to undo
            return [] if old is None else [LeaseEvent("delete", old, received)]
        return []  # 'get' and the like change nothing


__all__ = ["Etcd2Store", "EtcdOptions", "EtcdTLSError", "EtcdV2Disabled", "TLS_HINT"]
