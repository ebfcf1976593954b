"""systemd's readiness protocol (sd_notify): one datagram of `KEY=value` lines to the unix socket
named by $NOTIFY_SOCKET, so that a `Type=notify` unit starts its dependants only once the node
forwards. Without the variable every call does nothing."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("flannel-udp")


def socket_address(name: str) -> str | bytes | None:
    """The address $NOTIFY_SOCKET names: a path, or an abstract name (a leading '@', which
    becomes a NUL byte); None for what we can't reach (e.g. systemd's vsock: addresses)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


def notify(*fields: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") as one datagram; True when it was sent.
    A failure is logged, never raised: the daemon works with or without a service manager."""
    name = environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = socket_address(name)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s: not a unix socket path or @abstract name; not notifying",
                    name)
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as e:
        log.warning("NOTIFY_SOCKET=%s: %s; the service manager was not told %s", name,
                    e.strerror or e, fields[0] if fields else "")
        return False
    return True
