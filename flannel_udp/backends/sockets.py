"""The UDP sockets of the userspace backends: the one bound to the backend's port, which
receives from peers, and the send-only ones egress spreads flows over; with large buffers, and
the kernel's UDP offloads (UDP_SEGMENT sends, UDP_GRO receives) tried on them."""

from __future__ import annotations

import errno
import socket

from flannel_udp.errors import UserError

SOCKET_BUFFER = 8 << 20  # bursts of batched sends overflow the default buffers
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # <asm-generic/socket.h>; root may exceed the sysctls
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # <linux/udp.h>


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:  # not root: ask within the sysctl limits instead
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_udp_socket(port: int, family: int = socket.AF_INET, reuseport: bool = False,
                    group_member: bool = False) -> socket.socket:
    """The UDP socket bound to the backend's port on every address of `family`: it receives
    from peers (AF_INET6: IPv6 only, over an IPv6 underlay, and sends to them in UDP mode).
    With `reuseport`, the first of an SO_REUSEPORT group (one socket per TUN queue), on a port
    nobody holds; with `group_member` too, one more of our group."""
    if reuseport and not group_member:
        # A port another process holds with SO_REUSEPORT would take us into its group: bind
        # once without it first, so that a port in use is refused as it is with one queue.
        open_udp_socket(port, family).close()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    over = ""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        over = " over IPv6"
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKET_BUFFER)
    _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
    try:
        sock.bind(("::" if over else "0.0.0.0", port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"UDP port {port} is already in use{over} (another flanneld or "
                            "flannel-udp? Backend.Port sets another)") from None
        raise UserError(f"cannot bind UDP port {port}{over}: {e.strerror}") from None
    return sock


def open_send_sockets(count: int, family: int = socket.AF_INET) -> list[socket.socket]:
    """`count` UDP sockets on ports the kernel picks from its ephemeral range, for sending
    only: the source port of a datagram is its socket's."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except OSError as e:
        for sock in socks:
            sock.close()
        raise UserError(f"cannot open UDP sockets to send from: {e.strerror}") from None
    return socks


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
    except OSError:
        return False
    return True


def enable_udp_gro(sock: socket.socket) -> bool:
    """Ask the kernel to hand `sock` datagram groups (UDP_GRO); whether it took it."""
    return _try_setsockopt(sock, SOL_UDP, UDP_GRO, 1)


def udp_gso_supported(sock: socket.socket) -> bool:
    """Whether `sock` takes UDP_SEGMENT sends. Size 0 = "only when a cmsg asks": a probe that
    changes nothing."""
    return _try_setsockopt(sock, SOL_UDP, UDP_SEGMENT, 0)
