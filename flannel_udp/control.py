"""The local control socket: one msgpack request and one msgpack reply per connection, each
framed by a 4-byte big-endian length. `flannel-udp status` is its client.

A streaming command (`trace`) answers with a sequence of frames instead, until the client
closes the connection: the server stops the stream when it sees EOF."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from flannel_udp.errors import UserError

DEFAULT_PATH = "/run/flannel-udp/control.sock"  # outside namespaces named by `ip netns`
NETNS_DIR = "/run/netns"  # where `ip netns` names namespaces
MAX_FRAME = 16 << 20
_LEN = struct.Struct(">I")
# A `status` reply carries the totals and one page of peers' rows: STATUS_PEERS unless asked,
# at most MAX_STATUS_PAGE, so that no reply holds the daemon's loop for long at any size;
# `status --peers all` asks page after page.
STATUS_PEERS = 50
MAX_STATUS_PAGE = 500
# `run --metrics-peer-limit`'s default: /metrics has per-peer series up to this many peers.
METRICS_PEER_LIMIT = 100


def _pack(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    return msgpack.unpackb(await reader.readexactly(size), raw=False)


def default_path() -> str:
    """The control socket of this network namespace. `ip netns exec` shares /run between the
    namespaces, where one daemon each runs: a namespace named by `ip netns` gets
    `/run/flannel-udp/netns-<name>.sock`, any other (the host's, a container's) DEFAULT_PATH.
    `status` and `trace` run in the same namespace find the same socket."""
    try:
        own = os.stat("/proc/self/ns/net")
        with os.scandir(NETNS_DIR) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    named = os.stat(entry.path)
                    if (named.st_dev, named.st_ino) == (own.st_dev, own.st_ino):
                        return str(Path(DEFAULT_PATH).with_name(f"netns-{entry.name}.sock"))
    except OSError:  # no /proc or no /run/netns: no named namespace
        pass
    return DEFAULT_PATH


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


Stream = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


async def _stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  frames: AsyncIterator[dict[str, Any]]) -> None:
    """Write `frames` until they end or the client goes away (EOF or a failed write); the
    generator is closed either way, so that its cleanup runs."""
    async def pump() -> None:
        async for frame in frames:
            writer.write(_pack(frame))
            await writer.drain()

    pumping = asyncio.create_task(pump())
    # A client sends nothing after its request: EOF (or anything else) ends the stream.
    hangup = asyncio.create_task(reader.read(1))
    try:
        await asyncio.wait({pumping, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, hangup):
            task.cancel()
        await asyncio.gather(pumping, hangup, return_exceptions=True)
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()


async def serve(path: str, handler: Callable[[dict[str, Any]], dict[str, Any]],
                streams: dict[str, Stream] | None = None) -> asyncio.AbstractServer:
    """Serve `handler` on a unix socket at `path`, and the streaming commands `streams` (cmd ->
    request -> async iterator of frames); a stale socket file is replaced, a live one is a
    UserError."""
    streams = streams or {}
    if os.path.exists(path):
        if _answers(path):
            raise UserError(f"control socket {path} is served by another running daemon: "
                            "every daemon on a machine needs its own --control-socket and "
                            "--subnet-file")
        os.unlink(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(_read_frame(reader), 5)
            if isinstance(request, dict) and request.get("cmd") in streams:
                try:
                    await _stream(reader, writer, streams[request["cmd"]](request))
                finally:
                    writer.close()
                return
            reply = handler(request) if isinstance(request, dict) else {"error": "bad request"}
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError,
                msgpack.UnpackException):
            reply = {"error": "bad request"}
        with contextlib.suppress(OSError):
            writer.write(_pack(reply))
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(on_client, path=path)
    os.chmod(path, 0o600)  # the status shows the whole table: root only
    return server


def _connect(s: socket.socket, path: str) -> None:
    """Connect to the daemon's socket, or a UserError saying why not."""
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise UserError(f"no flannel-udp daemon answers on {path} (is `flannel-udp run` "
                        "running? --control-socket names another socket)", 1) from None
    except PermissionError:
        raise UserError(f"no permission to open {path} (run as root)", 1) from None


def request(path: str, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the daemon at `path` and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        _connect(s, path)
        s.sendall(_pack(message))
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise UserError(f"the daemon on {path} did not answer within {timeout:.0f} s",
                            1) from None
    data = b"".join(chunks)
    if len(data) < _LEN.size or len(data) != _LEN.size + _LEN.unpack_from(data)[0]:
        raise UserError(f"the daemon on {path} sent a truncated reply", 1)
    return msgpack.unpackb(data[_LEN.size:], raw=False)


def stream(path: str, message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send a streaming request to the daemon at `path` and yield its frames until it closes
    the connection; leaving the loop closes it, which ends the stream on the daemon's side."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        _connect(s, path)
        s.sendall(_pack(message))
        s.settimeout(None)
        with s.makefile("rb") as f:
            while head := f.read(_LEN.size):
                (size,) = _LEN.unpack(head) if len(head) == _LEN.size else (-1,)
                body = f.read(size) if 0 <= size <= MAX_FRAME else b""
                if size < 0 or len(body) != size:
                    raise UserError(f"the daemon on {path} sent a truncated frame", 1)
                yield msgpack.unpackb(body, raw=False)


def _peer_order(row: dict[str, Any]) -> tuple[int, int]:
    """IPv4 subnets first, by address; then IPv6-only peers by theirs."""
    subnet = row.get("subnet") or row.get("ipv6_subnet") or "0.0.0.0/0"
    network = ipaddress.ip_network(subnet, strict=False)
    return network.version, int(network.network_address)


def status(path: str, peers: int | None = STATUS_PEERS) -> dict[str, Any]:
    """The daemon's `status` with the rows of its first `peers` peers (None: every peer, asked
    page by page), sorted by subnet; UserError when it answers with an error. Rows of a table
    that changes between two pages may miss a peer that came meanwhile; one seen twice is
    shown once."""
    first = request(path, {"cmd": "status",
                           "peers": MAX_STATUS_PAGE if peers is None else peers})
    if "error" in first:
        raise UserError(f"daemon: {first['error']}", 1)
    rows = {_peer_key(row): row for row in first["peers"]}
    offset = len(first["peers"])
    while peers is None and first["peers"] and offset < first.get("peer_count", 0):
        page = request(path, {"cmd": "status", "offset": offset, "peers": MAX_STATUS_PAGE})
        if "error" in page:
            raise UserError(f"daemon: {page['error']}", 1)
        if not page["peers"]:
            break
        rows.update((_peer_key(row), row) for row in page["peers"])
        offset += len(page["peers"])
        first["peer_count"] = page.get("peer_count", first["peer_count"])
    first["peers"] = sorted(rows.values(), key=_peer_order)
    first.pop("peers_offset", None)
    return first


def _peer_key(row: dict[str, Any]) -> str:
    return str(row.get("subnet") or row.get("ipv6_subnet"))
