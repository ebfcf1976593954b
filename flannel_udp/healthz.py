"""`--healthz-ip`/`--healthz-port`: a tiny HTTP/1.0 server on the daemon's event loop.
`/healthz` and `/` answer 200 while the node holds its lease and its data plane runs, 503
otherwise; `/readyz` (newer flanneld's) answers 200 once the node's rules, routes and subnet.env
are in place, 503 before; `/metrics` is the status in Prometheus' text format (metrics.py). All
read one snapshot of the daemon's status, the data `flannel-udp status` shows."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable
from typing import Any

from flannel_udp import metrics
from flannel_udp.errors import UserError

log = logging.getLogger("flannel-udp")

REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request head
MAX_HEAD = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def health(status: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, one line saying why) from the status' "health" checks."""
    checks = status.get("health") or {}
    failing = [name for name, ok in sorted(checks.items()) if not ok]
    if not checks:
        return False, "starting"
    if failing:
        return False, "failing: " + ", ".join(failing)
    return True, "ok"


def readiness(status: dict[str, Any]) -> tuple[bool, str]:
    """(ready, one line saying why) from the status' "ready" flag."""
    if status.get("ready"):
        return True, "ok"
    return False, "not ready: lease, rules or subnet.env not in place yet"


def respond(method: str, path: str, status: Callable[[], dict[str, Any]]
            ) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) for one request."""
    if method not in ("GET", "HEAD"):
        return 405, "text/plain", b"only GET\n"
    path = path.split("?", 1)[0]
    if path in ("/", "/healthz"):
        ok, why = health(status())
        return (200 if ok else 503), "text/plain", why.encode() + b"\n"
    if path == "/readyz":
        ok, why = readiness(status())
        return (200 if ok else 503), "text/plain", why.encode() + b"\n"
    if path == "/metrics":
        return 200, metrics.CONTENT_TYPE, metrics.render(status())
    return 404, "text/plain", b"not found: try /healthz, /readyz or /metrics\n"


async def serve(host: str, port: int, status: Callable[[], dict[str, Any]]
                ) -> asyncio.AbstractServer:
    """Listen on host:port; UserError when that address can't be taken."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = ""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                code, ctype, body = 400, "text/plain", b"bad request\n"
            else:
                method = parts[0]
                code, ctype, body = respond(method, parts[1], status)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            writer.close()
            return
        except Exception:  # a bug must not end the daemon: answer 500 and log it
            log.exception("healthz: answering a request failed")
            code, ctype, body = 500, "text/plain", b"internal error\n"
        head_out = (f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(ConnectionError):
            writer.write(head_out if method == "HEAD" else head_out + body)
            await writer.drain()
        writer.close()

    try:
        server = await asyncio.start_server(on_client, host, port, limit=MAX_HEAD,
                                            reuse_address=True)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--healthz-port {port}: address {host}:{port} is already in use "
                            "(another flanneld or flannel-udp?)", exit_code=1) from None
        raise UserError(f"--healthz-ip {host} --healthz-port {port}: cannot listen: "
                        f"{e.strerror or e}", exit_code=1) from None
    log.info("healthz: http://%s:%d/healthz, /readyz and /metrics", host, port)
    return server
