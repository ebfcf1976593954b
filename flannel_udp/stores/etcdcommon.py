"""What the etcd v3 and v2 stores share: flanneld's etcd flags checked (endpoints, TLS files,
user and password), flannel's key paths, and the watch loop that never gives up: it watches
again from the last position seen + 1 on any member, logs an outage once (and every
OUTAGE_REPORT_EVERY seconds while it lasts), and when the history is gone lists the table again
and reports the difference."""

from __future__ import annotations

import asyncio
import logging
import posixpath
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flannel_udp.errors import UserError
from flannel_udp.stores import LeaseEvent, LeaseRecord, Snapshot, StoreError, StoreUnavailable

log = logging.getLogger("flannel-udp")

DEFAULT_PORT = 2379
RPC_TIMEOUT = 5.0  # seconds for one call to one member: a silent member is left after this
WATCH_RETRY_MIN, WATCH_RETRY_MAX = 0.2, 2.0  # seconds between attempts to watch again
OUTAGE_REPORT_EVERY = 30.0  # seconds between log lines while the watch cannot resume


class EtcdTLSError(StoreError):
    """The TLS handshake with etcd failed: a setting to fix, not an outage to wait out."""


TLS_HINT = "(check --etcd-cafile, --etcd-certfile and --etcd-keyfile)"


@dataclass(frozen=True)
class Endpoint:
    url: str  # as given, for messages
    target: str  # host:port
    secure: bool

    @property
    def base_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.target}"


def parse_endpoints(text: str) -> list[Endpoint]:
    """`--etcd-endpoints`: comma-separated http(s)://host[:port] (a bare host:port means http,
    as etcd's client takes it). UserError (exit 2) naming the bad one."""
    endpoints = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        url = item if "://" in item else f"http://{item}"
        try:
            parts = urlsplit(url)
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise UserError(f"--etcd-endpoints: {item!r} is not a URL ({e})") from None
        if parts.scheme not in ("http", "https"):
            raise UserError(f"--etcd-endpoints: {item!r}: the scheme must be http or https")
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise UserError(f"--etcd-endpoints: {item!r} is not of the form "
                            "http(s)://host:port")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        endpoints.append(Endpoint(item, f"{host}:{port}", parts.scheme == "https"))
    if not endpoints:
        raise UserError("--etcd-endpoints: no endpoint given")
    return endpoints


def _read_pem(flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{flag} {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise UserError(f"{flag} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class EtcdOptions:
    """The etcd flags of flanneld, checked; the certificate files read once."""

    endpoints: list[Endpoint]
    prefix: str = "/coreos.com/network"
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    username: str | None = None
    password: str | None = None
    certfile: str | None = None  # the paths of `cert` and `key`, for ssl's load_cert_chain
    keyfile: str | None = None

    @classmethod
    def from_flags(cls, endpoints: str, prefix: str, cafile: str | None = None,
                   certfile: str | None = None, keyfile: str | None = None,
                   username: str | None = None, password: str | None = None) -> EtcdOptions:
        if bool(certfile) != bool(keyfile):
            raise UserError("--etcd-certfile and --etcd-keyfile go together: give both or "
                            "neither")
        if bool(username) != bool(password):
            raise UserError("--etcd-username and --etcd-password go together: give both or "
                            "neither")
        # Read first: a missing file is then named by its flag and path (the pair check's
        # OSError carries no file name).
        cert, key = _read_pem("--etcd-certfile", certfile), _read_pem("--etcd-keyfile", keyfile)
        if certfile and keyfile:
            _check_key_pair(certfile, keyfile)
        return cls(parse_endpoints(endpoints), prefix, _read_pem("--etcd-cafile", cafile),
                   cert, key, username or None, password or None, certfile or None,
                   keyfile or None)

    def ssl_context(self) -> ssl.SSLContext:
        """The client side of TLS as etcd's client does it: the system's CAs unless
        --etcd-cafile, the client certificate when given."""
        context = ssl.create_default_context(
            cadata=self.ca.decode(errors="replace") if self.ca else None)
        if self.certfile and self.keyfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context


def _check_key_pair(certfile: str, keyfile: str) -> None:
    """UserError unless the files hold a certificate and its private key (grpc would only say
    "Failed to create security handshaker" at the first call)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certfile, keyfile)
    except ssl.SSLError as e:
        raise UserError(f"--etcd-certfile {certfile} and --etcd-keyfile {keyfile}: not a "
                        f"certificate and its key ({e.reason or e})") from None
    except OSError as e:
        raise UserError(f"--etcd-certfile {certfile} and --etcd-keyfile {keyfile}: "
                        f"{e.strerror}") from None


def key_path(*parts: str) -> str:
    # Go's path.Join, as flannel builds its keys: a trailing or doubled '/' in the prefix
    # does not change them.
    return posixpath.normpath(posixpath.join(*parts))


def unavailable_or_tls(failures: list[tuple[str, str]], what: str) -> StoreError:
    """The error for a call no member could serve: EtcdTLSError when every member failed the
    TLS handshake (a setting to fix), else StoreUnavailable (an outage to wait out)."""
    reasons = "; ".join(f"{url}: {reason}" for url, reason in failures)
    if failures and all(r.startswith("TLS handshake failed") for _, r in failures):
        return EtcdTLSError(f"etcd: {reasons} {TLS_HINT}")
    return StoreUnavailable(f"etcd unreachable ({what}): {reasons}")


class Relist(Exception):
    """The history after the last position seen is gone: only a fresh listing will do."""


def difference(known: dict[str, LeaseRecord], snapshot: Snapshot) -> list[LeaseEvent]:
    """The events that turn the table `known` into `snapshot`."""
    now = {r.key: r for r in snapshot.records}
    events = [LeaseEvent("delete", r) for k, r in known.items() if k not in now]
    events += [LeaseEvent("put", r) for k, r in now.items()
               if k not in known or known[k].value != r.value]
    return events


WatchFrom = Callable[[int, dict[str, LeaseRecord]], AsyncIterator[tuple[list[LeaseEvent], int]]]


async def follow(since: Snapshot, watch_from: WatchFrom,
                 list_leases: Callable[[], Awaitable[Snapshot]],
                 position: str = "revision") -> AsyncIterator[list[LeaseEvent]]:
    """Batches of lease events after `since`, for ever. `watch_from(last, known)` is one watch
    from `last` + 1 yielding (events, last seen) and keeping `known` up to date; it ends by
    raising StoreError when it breaks, Relist when the history is gone. `position` names what
    `last` counts in the log ('revision' for v3, 'index' for v2)."""
    known = {r.key: r for r in since.records}
    last = since.revision  # every event up to here is in `known`
    delay = WATCH_RETRY_MIN
    outage_since: float | None = None
    last_report = 0.0
    while True:
        try:
            async for batch, seen in watch_from(last, known):
                last = seen
                if outage_since is not None:
                    log.info("etcd watch resumed from %s %d after %.1f s", position, last + 1,
                             time.time() - outage_since)
                    outage_since = None
                delay = WATCH_RETRY_MIN
                if batch:
                    yield batch
        except Relist as e:
            log.warning("%s: listing the leases again", e)
            try:
                snapshot = await list_leases()
            except StoreError as e2:
                error: StoreError = e2
            else:
                batch = difference(known, snapshot)
                known = {r.key: r for r in snapshot.records}
                last = snapshot.revision
                if outage_since is not None:
                    log.info("etcd watch resumed from %s %d after %.1f s", position, last + 1,
                             time.time() - outage_since)
                    outage_since = None
                if batch:
                    yield batch
                continue
        except StoreError as e:
            error = e
        now = time.time()
        if outage_since is None:
            outage_since = last_report = now
            log.warning("etcd watch interrupted (%s); forwarding on the last known lease "
                        "table, watching again from %s %d", error, position, last + 1)
        elif now - last_report >= OUTAGE_REPORT_EVERY:
            last_report = now
            log.warning("etcd still unreachable after %.0f s (%s); still forwarding",
                        now - outage_since, error)
        await asyncio.sleep(delay)
        delay = min(delay * 2, WATCH_RETRY_MAX)
