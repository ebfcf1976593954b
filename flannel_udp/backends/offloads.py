"""Which kernel offloads a userspace backend gets: each probed at start by trying it on the
sockets and the TUN (the options themselves sit beside what they offload, in `sockets` and
`tun`; the work they imply is the fast path's), logged, and all off with
FLANNEL_UDP_OFFLOADS=0."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass

import pytun

from flannel_udp.backends.sockets import enable_udp_gro, udp_gso_supported
from flannel_udp.backends.tun import TUN_F_TSO4, TUN_F_USO4, enable_tun_offloads, open_tun

log = logging.getLogger("flannel-udp")

OFFLOADS_ENV = "FLANNEL_UDP_OFFLOADS"


@dataclass
class Offloads:
    """Which kernel offloads a TUN backend got (each probed by trying it)."""

    tun_vnet_hdr: bool = False  # IFF_VNET_HDR: a virtio_net_hdr before each TUN packet
    tso: bool = False  # the TUN hands us TCP super-packets (TUN_F_TSO4)
    uso: bool = False  # ... and UDP ones (TUN_F_USO4|USO6)
    udp_gso: bool = False  # UDP_SEGMENT sends
    udp_gro: bool = False  # UDP_GRO receives


def offloads_wanted() -> bool:
    return os.environ.get(OFFLOADS_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


def open_tun_with_offloads(name: str, receiver: socket.socket, senders: list[socket.socket],
                           multi_queue: bool = False) -> tuple[pytun.TunTapDevice, Offloads]:
    """Open TUN `name` (its first queue with `multi_queue`) and probe every offload on it and
    on the sockets (`senders`, or the `receiver` where it sends too) unless
    FLANNEL_UDP_OFFLOADS=0; log the result."""
    off = Offloads()
    if not offloads_wanted():
        tun = open_tun(name, multi_queue=multi_queue)
        log.info("offloads off (%s=0)", OFFLOADS_ENV)
        return tun, off
    off.udp_gro = enable_udp_gro(receiver)
    off.udp_gso = all(udp_gso_supported(sock) for sock in senders or [receiver])
    try:
        tun = open_tun(name, vnet_hdr=True, multi_queue=multi_queue)
        off.tun_vnet_hdr = True
    except pytun.Error:
        tun = open_tun(name, multi_queue=multi_queue)
    if off.tun_vnet_hdr:
        try:
            flags = enable_tun_offloads(tun)
        except BaseException:
            tun.close()
            raise
        off.tso = bool(flags & TUN_F_TSO4)
        off.uso = bool(flags & TUN_F_USO4)
    log.info("offloads: %s", ", ".join(f"{what} {'on' if on else 'off'}"
                                       for what, on in asdict(off).items()))
    return tun, off
