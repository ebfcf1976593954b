"""The TUN device of the userspace backends: opened non-persistent and non-blocking, optionally
with a virtio header before each packet (IFF_VNET_HDR) and the kernel's offloads on it
(TUNSETOFFLOAD), as wireguard-go keeps its TUN offloads beside the TUN."""

from __future__ import annotations

import errno
import fcntl
import os

import pytun

from flannel_udp.errors import UserError

TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454D0, 0x400454D8  # <linux/if_tun.h>
TUNGETIFF = 0x800454D2  # EBADFD once the TUN is deleted under the fd
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
IFREQ_SIZE = 40  # struct ifreq
VNET_HDR_LEN = 10  # struct virtio_net_hdr
# What TUNSETOFFLOAD is offered, best first; EINVAL refuses a set. TSO6 is harmless: the fast
# path drops IPv6 anyway. USO4/6 only count together.
TUN_OFFLOAD_SETS = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM | TUN_F_TSO4,
    TUN_F_CSUM,
)


def open_tun(name: str, vnet_hdr: bool = False, multi_queue: bool = False,
             another_queue: bool = False) -> pytun.TunTapDevice:
    """A non-persistent TUN (it vanishes with its routes when the fd closes), non-blocking;
    with `vnet_hdr`, IFF_VNET_HDR (pytun.Error EINVAL if the kernel refuses it); with
    `multi_queue`, IFF_MULTI_QUEUE, `another_queue` then attaching one more queue to ours.
    The first queue of a multi-queue TUN needs a name that does not exist yet (IFF_TUN_EXCL):
    a multi-queue TUN of another process would otherwise take us in as one more queue."""
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet_hdr else 0)
    flags |= pytun.IFF_MULTI_QUEUE if multi_queue else 0
    flags |= pytun.IFF_TUN_EXCL if multi_queue and not another_queue else 0
    try:
        tun = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else None
        if code in (errno.EPERM, errno.EACCES):
            raise UserError(f"no permission to create TUN {name} on /dev/net/tun "
                            "(run as root or with CAP_NET_ADMIN)") from None
        if code == errno.EBUSY:
            raise UserError(f"TUN {name} is in use: is another flannel-udp or flanneld running "
                            "in this network namespace?") from None
        if code == errno.ENOENT:
            raise UserError("/dev/net/tun is missing (load the tun module or mount the "
                            "device into the container)") from None
        if code == errno.EINVAL and vnet_hdr:
            raise
        raise UserError(f"cannot create TUN {name}: {e}") from None
    flags = fcntl.fcntl(tun.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(tun.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return tun


def enable_tun_offloads(tun: pytun.TunTapDevice) -> int:
    """Set the virtio header size and the best offload set the kernel accepts on a TUN opened
    with IFF_VNET_HDR; the TUN_F_* flags it got (0: none)."""
    fcntl.ioctl(tun.fileno(), TUNSETVNETHDRSZ, VNET_HDR_LEN.to_bytes(4, "little"))
    for flags in TUN_OFFLOAD_SETS:
        try:
            fcntl.ioctl(tun.fileno(), TUNSETOFFLOAD, flags)
        except OSError as e:
            if e.errno == errno.EINVAL:
                continue
            raise
        return flags
    return 0


def tun_attached(tun: pytun.TunTapDevice) -> bool:
    """Whether the TUN behind `tun`'s fd still exists: deleted (`ip link del`) under a running
    fast path, it takes no packet in or out while the fd stays open."""
    try:
        fcntl.ioctl(tun.fileno(), TUNGETIFF, bytes(IFREQ_SIZE))
    except OSError:
        return False
    return True
