# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native packet fast path of the udp and vxlan backends: TUN <-> UDP forwarding in C threads.

Two native threads move packets: egress (TUN -> validate/route -> encapsulate -> sendmmsg to the
peer) and ingress (recvmmsg -> decapsulate/validate -> write to the TUN). Every per-packet step
is a ``noexcept nogil`` C function on raw buffers; Python is only touched by the control methods
(routes, counters, start/stop) and by the test hooks ``process_egress``/``process_ingress``,
which run the very same C functions as the threads so that ``flannel_udp.packet`` can serve as
their oracle.

Two wire modes: flannel's UDP (the bare IPv4 packet as payload, TTL decremented each way) and
VXLAN as Linux's kernel VXLAN speaks it (RFC 7348 header plus an inner Ethernet header; TTL left
alone). VXLAN egress spreads flows over a pool of UDP sockets bound to ephemeral ports: a plain
UDP socket can only send from its own port, and receivers spread flows by the source port.

Offloads (each optional, probed by the caller): with a virtio_net_hdr TUN (IFF_VNET_HDR and
TSO/USO/CSUM offloads) egress reads up to 64 KB super-packets, splits them into MTU-sized
segments with complete checksums (``gso_plan``/``gso_write``), encapsulates each, and sends the
segments of one super-packet with one sendmsg carrying UDP_SEGMENT. Ingress reads UDP_GRO
batches, splits them back into datagrams, decapsulates each, and coalesces consecutive TCP
segments of one flow into one super-packet with a GSO virtio header (``Coalescer``): one TUN
write per run instead of one per segment.

All state of the TUN queue and its thread pair is one ``Queue`` struct (what the threads share
with Python, the fds and the route table, is ``Shared``); the wire encapsulation is one function per mode and direction
(``encap_udp``/``encap_vxlan``, ``decap_udp``/``decap_vxlan``); egress reads each packet behind
HEADROOM bytes so that the virtio header lands before it and a wire header fits in front of it.
"""

from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, EMSGSIZE, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memmove, memset, strerror
from posix.time cimport timespec
from posix.unistd cimport close, read, write

import ipaddress

# One extension module compiled as one C file: its parts are included (not cimported from other
# modules), so that the per-packet path stays inlined and nogil. Declarations first, then the
# C parts, then the module-level test hooks; the Python-facing class follows.
include "fastpath/system.pxi"
include "fastpath/headers.pxi"
include "fastpath/constants.pxi"
include "fastpath/state.pxi"
include "fastpath/route_table.pxi"
include "fastpath/ipv4.pxi"
include "fastpath/ipv6.pxi"
include "fastpath/offloads.pxi"
include "fastpath/forward.pxi"
include "fastpath/encap.pxi"
include "fastpath/send.pxi"
include "fastpath/trace.pxi"
include "fastpath/batches.pxi"
include "fastpath/threads.pxi"
include "fastpath/hooks.pxi"


# ---------------------------------------------------------------------------------------------
# Python API

cdef uint32_t parse_ipv4(str text) except? 0:
    return <uint32_t>int(ipaddress.IPv4Address(text))


cdef str format_ipv4(uint32_t addr):
    return str(ipaddress.IPv4Address(addr))


cdef int parse_ipv6(str text, uint8_t* out) except -1:
    cdef bytes packed = ipaddress.IPv6Address(text).packed
    memcpy(out, <const char*>packed, 16)
    return 0


cdef str format_ipv6(const uint8_t* addr):
    return str(ipaddress.IPv6Address((<const char*>addr)[:16]))


cdef void split_key6(const uint8_t* addr, uint64_t* hi, uint64_t* lo) noexcept:
    hi[0] = rd64(addr)
    lo[0] = rd64(addr + 8)


cdef int copy_mac(uint8_t* out, object mac, str what) except -1:
    if not isinstance(mac, bytes) or len(<bytes>mac) != 6:
        raise ValueError(f"{what}: expected 6 bytes, got {mac!r}")
    memcpy(out, <const char*><bytes>mac, 6)
    return 0


cdef int sender_add6(Shared* s, const RouteEntry6* e) noexcept nogil:
    """Count the subnet of ``e`` to its peer in the senders' table of its underlay."""
    if e.base.underlay6:
        return senders6_add(&s.senders6, e.peer6)
    return senders_add(&s.senders, e.base.peer)


cdef void sender_remove6(Shared* s, const RouteEntry6* e) noexcept nogil:
    if e.base.underlay6:
        senders6_remove(&s.senders6, e.peer6)
    else:
        senders_remove(&s.senders, e.base.peer)


cdef void counters_add(Counters* total, const Counters* c) noexcept:
    cdef unsigned int k
    total.packets += c.packets
    total.bytes += c.bytes
    total.icmp_sent += c.icmp_sent
    total.icmp_suppressed += c.icmp_suppressed
    total.offloaded += c.offloaded
    total.gso_fallbacks += c.gso_fallbacks
    total.csum_completed += c.csum_completed
    for k in range(D_COUNT):
        total.drops[k] += c.drops[k]


cdef dict route_counters(const RouteEntry* e):
    return {
        "tx_packets": e.tx_packets,
        "tx_bytes": e.tx_bytes,
        "rx_packets": e.rx_packets,
        "rx_bytes": e.rx_bytes,
    }


cdef class FastPath:
    """TUN <-> UDP forwarder for one or more TUN queues; fds are owned (and closed) by the
    caller. ``more_queues``: each queue beyond the first (``tun_fd``, ``udp_fd``, ``udp6_fd``)
    as (TUN queue fd, receiving socket, IPv6 receiving socket or None), each with its own
    thread pair on the same route table and send sockets.

    ``mode`` "udp" is flannel's udp backend; "vxlan" is RFC 7348 with VNI ``vni`` and our
    ``vtep_mac`` (6 bytes). Egress sends from ``send_fds`` (default: ``udp_fd``), a VXLAN flow
    always from the same one; ingress receives on ``udp_fd``. Offloads the caller has set up:
    ``vnet_hdr`` (the TUN has IFF_VNET_HDR), ``udp_gso`` (the kernel takes UDP_SEGMENT),
    ``udp_gro`` (``udp_fd`` has UDP_GRO on). ``busy_poll_us``: after forwarding, a thread
    polls both directions this long before it sleeps (0: it sleeps at once). ``mtu``: the
    TUN's; VXLAN ingress cuts a sender's unsplit TCP super-packet to it (0: passes it whole).

    IPv6 inner packets are forwarded once ``tun_addr6`` (our IPv6 subnet's network address)
    is given, routed by ``set_route6`` on ``subnet_len6``-bit prefixes; in VXLAN mode their
    frames carry ``vtep_mac6`` (default: ``vtep_mac``), as a flannel-v6 device's. Without it an
    IPv6 packet is dropped as not_ipv4. An IPv6 underlay (routes to PublicIPv6s): ``udp6_fd``,
    an IPv6-only UDP socket bound to the port, receives; egress to IPv6 peers sends from
    ``send6_fds`` (default: ``udp6_fd``), as from ``send_fds`` to IPv4 ones. ``path_mtu6``: an
    IPv6 packet that would leave longer (a super-packet: its segments) is answered with ICMPv6
    packet too big (0: none is), rate limited with the other ICMP errors.
    """

    cdef Shared* shared
    cdef Queue* queue               # the first TUN queue (queues[0])
    cdef Queue* queues[MAX_QUEUES]
    cdef unsigned int n_queues
    cdef bint lock_ready

    def __cinit__(self, *args, **kwargs):
        cdef pthread_rwlockattr_t attr
        cdef int rc
        self.shared = <Shared*>calloc(1, sizeof(Shared))
        if self.shared == NULL:
            raise MemoryError()
        self.shared.stop_fd = -1
        self.shared.udp_fd = -1
        self.shared.udp6_fd = -1
        self.queue = queue_new(self.shared, -1, -1, -1)
        if self.queue == NULL:
            raise MemoryError()
        self.queues[0] = self.queue
        self.n_queues = 1
        if (rt_init(&self.shared.table, TABLE_MIN_CAPACITY) < 0
                or rt_init(&self.shared.senders, TABLE_MIN_CAPACITY) < 0
                or rt6_init(&self.shared.table6, TABLE_MIN_CAPACITY) < 0
                or rt6_init(&self.shared.senders6, TABLE_MIN_CAPACITY) < 0):
            raise MemoryError()
        pthread_rwlockattr_init(&attr)
        # glibc rwlocks prefer readers by default; two I/O threads whose read sections overlap
        # could then starve set_route forever.
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        rc = pthread_rwlock_init(&self.shared.lock, &attr)
        pthread_rwlockattr_destroy(&attr)
        if rc != 0:
            raise OSError(rc, strerror(rc).decode())
        self.lock_ready = True
        self.shared.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.shared.stop_fd < 0:
            raise OSError(errno, strerror(errno).decode())

    def __init__(self, int tun_fd, int udp_fd, int port, str tun_addr, int subnet_len, *,
                 str mode="udp", int vni=0, object vtep_mac=None, object send_fds=None,
                 bint vnet_hdr=False, bint udp_gso=False, bint udp_gro=False,
                 bint source_check=False, int busy_poll_us=0, int mtu=0,
                 str tun_addr6=None, int subnet_len6=64, object vtep_mac6=None,
                 object udp6_fd=None, object send6_fds=None, int path_mtu6=0,
                 object more_queues=None):
        cdef unsigned int i
        cdef uint8_t tun6[16]
        cdef Queue* qu
        if self.running:
            raise RuntimeError("FastPath is running")
        more = [] if more_queues is None else [tuple(q) for q in more_queues]
        if len(more) >= MAX_QUEUES:
            raise ValueError(f"more_queues: at most {MAX_QUEUES - 1}, not {len(more)}")
        for q in more:
            if len(q) != 3 or (q[2] is None) != (udp6_fd is None):
                raise ValueError("more_queues: (tun_fd, udp_fd, udp6_fd) each, udp6_fd given "
                                 "exactly when udp6_fd is")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if not 0 <= subnet_len <= 32:
            raise ValueError(f"subnet_len out of range: {subnet_len}")
        if not 0 <= busy_poll_us <= BUSY_POLL_MAX_US:
            raise ValueError(f"busy_poll_us: 0 to {BUSY_POLL_MAX_US}, not {busy_poll_us}")
        if not 0 <= mtu <= BUF_SIZE:
            raise ValueError(f"mtu: 0 to {BUF_SIZE}, not {mtu}")
        if path_mtu6 != 0 and not IPV6_MIN_MTU <= path_mtu6 <= BUF_SIZE:
            raise ValueError(f"path_mtu6: 0 or {IPV6_MIN_MTU} to {BUF_SIZE}, not {path_mtu6}")
        if not 0 <= subnet_len6 <= 128:
            raise ValueError(f"subnet_len6 out of range: {subnet_len6}")
        if tun_addr6 is not None:
            parse_ipv6(tun_addr6, tun6)
        if mode == "vxlan":
            if not 1 <= vni <= VNI_MAX:
                raise ValueError(f"vni out of range: {vni}")
            copy_mac(self.shared.vtep_mac, vtep_mac, "vtep_mac")
            copy_mac(self.shared.vtep_mac6, vtep_mac if vtep_mac6 is None else vtep_mac6,
                     "vtep_mac6")
            self.shared.mode = MODE_VXLAN
            self.shared.vni = <uint32_t>vni
        elif mode == "udp":
            if vtep_mac6 is not None:
                raise ValueError("vtep_mac6: only VXLAN mode has one")
            self.shared.mode = MODE_UDP
        else:
            raise ValueError(f"mode must be 'udp' or 'vxlan', not {mode!r}")
        senders = [udp_fd] if send_fds is None else [int(fd) for fd in send_fds]
        if not 1 <= len(senders) <= MAX_SENDERS:
            raise ValueError(f"send_fds: 1 to {MAX_SENDERS} sockets, not {len(senders)}")
        if mode == "udp" and len(senders) != 1:
            raise ValueError("send_fds: UDP mode sends from one socket")
        if udp6_fd is None:
            senders6 = [] if send6_fds is None else [int(fd) for fd in send6_fds]
            if senders6:
                raise ValueError("send6_fds: an IPv6 underlay needs udp6_fd")
        else:
            senders6 = [int(udp6_fd)] if send6_fds is None else [int(fd) for fd in send6_fds]
            if not 1 <= len(senders6) <= MAX_SENDERS:
                raise ValueError(f"send6_fds: 1 to {MAX_SENDERS} sockets, not {len(senders6)}")
            if mode == "udp" and len(senders6) != 1:
                raise ValueError("send6_fds: UDP mode sends from one socket")
        for i in range(len(senders)):
            self.shared.send_fds[i] = senders[i]
        self.shared.n_senders = len(senders)
        for i in range(len(senders6)):
            self.shared.send_fds[len(senders) + i] = senders6[i]
        self.shared.n6_senders = len(senders6)
        self.shared.udp6_fd = -1 if udp6_fd is None else int(udp6_fd)
        self.queue.tun_fd = tun_fd
        self.queue.udp_fd = udp_fd
        self.queue.udp6_fd = self.shared.udp6_fd
        while self.n_queues > 1:
            self.n_queues -= 1
            queue_free(self.queues[self.n_queues])
            self.queues[self.n_queues] = NULL
        for q in more:
            qu = queue_new(self.shared, int(q[0]), int(q[1]), -1 if q[2] is None else int(q[2]))
            if qu == NULL:
                raise MemoryError()
            qu.busy_poll_ns = <uint64_t>busy_poll_us * 1000
            self.queues[self.n_queues] = qu
            self.n_queues += 1
        self.shared.udp_fd = udp_fd
        self.shared.port = htons(<uint16_t>port)
        self.shared.tun_addr = parse_ipv4(tun_addr)
        self.shared.mask = 0 if subnet_len == 0 else (<uint32_t>0xFFFFFFFF) << (32 - subnet_len)
        self.shared.source_check = source_check
        self.shared.vnet = vnet_hdr
        self.shared.udp_gso = 1 if udp_gso else 0
        self.shared.udp_gro = udp_gro
        self.queue.busy_poll_ns = <uint64_t>busy_poll_us * 1000
        self.shared.mtu = <uint32_t>mtu
        self.shared.v6 = tun_addr6 is not None
        self.shared.path_mtu6 = <uint32_t>path_mtu6
        if self.shared.v6:
            memcpy(self.shared.tun_addr6, tun6, 16)
        host_bits: object = 128 - subnet_len6     # a Python int: the shifts exceed C's
        mask = ((<object>1 << 128) - 1) ^ ((<object>1 << host_bits) - 1)
        self.shared.mask6_hi = <uint64_t>(mask >> 64)
        self.shared.mask6_lo = <uint64_t>(mask & 0xFFFFFFFFFFFFFFFF)

    def __dealloc__(self):
        cdef unsigned int i
        if self.shared != NULL and self.shared.stop_fd >= 0:
            with nogil:
                for i in range(self.n_queues):
                    stop_threads(self.queues[i])
        for i in range(self.n_queues):
            queue_free(self.queues[i])
            self.queues[i] = NULL
        self.n_queues = 0
        self.queue = NULL
        if self.shared != NULL:
            if self.shared.stop_fd >= 0:
                close(self.shared.stop_fd)
            if self.lock_ready:
                pthread_rwlock_destroy(&self.shared.lock)
            free(self.shared.table.slots)
            free(self.shared.senders.slots)
            free(self.shared.table6.slots)
            free(self.shared.senders6.slots)
            free(self.shared)
            self.shared = NULL

    cdef uint32_t _subnet_key(self, str subnet) except? 0:
        cdef uint32_t key = parse_ipv4(subnet)
        if key & ~self.shared.mask:
            raise ValueError(f"{subnet} is not a network address of the lease prefix length")
        return key

    def set_route(self, str subnet, str peer_ip, object vtep_mac=None) -> None:
        """Route ``subnet`` (its network address) to ``peer_ip``, in VXLAN mode to its
        ``vtep_mac`` (6 bytes) there; replaces an existing route."""
        cdef uint32_t key = self._subnet_key(subnet)
        cdef uint32_t peer = parse_ipv4(peer_ip)
        cdef uint8_t mac[6]
        cdef int rc
        memset(mac, 0, 6)
        if self.shared.mode == MODE_VXLAN:
            copy_mac(mac, vtep_mac, "vtep_mac")
        elif vtep_mac is not None:
            raise ValueError("vtep_mac: only VXLAN routes carry one")
        cdef RouteEntry* old
        cdef uint32_t old_peer = 0
        cdef bint had_old, moved
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            old = rt_find(&self.shared.table, key)
            had_old = old != NULL
            moved = not had_old or old.peer != peer
            if had_old:
                old_peer = old.peer   # rt_set may move the entry: keep what it said
            rc = senders_add(&self.shared.senders, peer) if moved else 0
            if rc == 0:
                rc = rt_set(&self.shared.table, key, peer, mac)
                if rc < 0 and moved:
                    senders_remove(&self.shared.senders, peer)
                elif moved and had_old:
                    senders_remove(&self.shared.senders, old_peer)
            pthread_rwlock_unlock(&self.shared.lock)
        if rc < 0:
            raise MemoryError()

    def del_route(self, str subnet) -> None:
        """Forget the route of ``subnet``; no-op if there is none."""
        cdef uint32_t key = self._subnet_key(subnet)
        cdef RouteEntry* e
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            e = rt_find(&self.shared.table, key)
            if e != NULL:
                senders_remove(&self.shared.senders, e.peer)
            rt_delete(&self.shared.table, key)
            pthread_rwlock_unlock(&self.shared.lock)

    def routes(self) -> list:
        """[(subnet, peer_ip, vtep_mac, {tx_packets, tx_bytes, rx_packets, rx_bytes}), ...] by
        subnet; vtep_mac is 6 bytes in VXLAN mode, None in UDP mode."""
        cdef RouteEntry* snapshot = NULL
        cdef uint32_t i, n = 0
        cdef RouteTable* t = &self.shared.table
        with nogil:
            pthread_rwlock_rdlock(&self.shared.lock)
            snapshot = <RouteEntry*>malloc((t.count + 1) * sizeof(RouteEntry))
            if snapshot != NULL:
                for i in range(t.capacity):
                    if t.slots[i].used:
                        snapshot[n] = t.slots[i]
                        n += 1
            pthread_rwlock_unlock(&self.shared.lock)
        if snapshot == NULL:
            raise MemoryError()
        vxlan = self.shared.mode == MODE_VXLAN
        try:
            entries = sorted(
                [(snapshot[i].subnet, snapshot[i].peer,
                  (<char*>snapshot[i].mac)[:6] if vxlan else None, route_counters(&snapshot[i]))
                 for i in range(n)],
                key=lambda entry: entry[0],
            )
        finally:
            free(snapshot)
        return [(format_ipv4(subnet), format_ipv4(peer), mac, stats)
                for subnet, peer, mac, stats in entries]

    def route_count(self) -> int:
        """How many IPv4 routes the table holds (O(1): for `status` and the bench at scale)."""
        cdef uint32_t n
        with nogil:
            pthread_rwlock_rdlock(&self.shared.lock)
            n = self.shared.table.count
            pthread_rwlock_unlock(&self.shared.lock)
        return n

    def route(self, str subnet) -> object:
        """One route as ``routes()`` gives it, without the subnet: (peer_ip, vtep_mac,
        counters), or None when ``subnet`` has none. One hash lookup, whatever the table's
        size."""
        cdef uint32_t key = self._subnet_key(subnet)
        cdef RouteEntry copy
        cdef RouteEntry* e
        cdef bint found = False
        with nogil:
            pthread_rwlock_rdlock(&self.shared.lock)
            e = rt_find(&self.shared.table, key)
            if e != NULL:
                copy = e[0]
                found = True
            pthread_rwlock_unlock(&self.shared.lock)
        if not found:
            return None
        mac = (<char*>copy.mac)[:6] if self.shared.mode == MODE_VXLAN else None
        return (format_ipv4(copy.peer), mac, route_counters(&copy))

    cdef int _subnet_key6(self, str subnet, uint64_t* hi, uint64_t* lo) except -1:
        cdef uint8_t addr[16]
        if not self.shared.v6:
            raise ValueError("IPv6 routes need tun_addr6 (FastPath was made IPv4-only)")
        parse_ipv6(subnet, addr)
        split_key6(addr, hi, lo)
        if (hi[0] & ~self.shared.mask6_hi) or (lo[0] & ~self.shared.mask6_lo):
            raise ValueError(f"{subnet} is not a network address of the IPv6 lease prefix length")
        return 0

    def set_route6(self, str subnet, str peer_ip, object vtep_mac=None) -> None:
        """Route IPv6 ``subnet`` (its network address) to ``peer_ip`` (the peer's PublicIP, or
        its PublicIPv6 over an IPv6 underlay), in VXLAN mode to its IPv6 ``vtep_mac``
        (BackendV6Data's VtepMAC) there; replaces an existing route."""
        cdef RouteEntry6 want
        cdef RouteEntry6* old
        cdef RouteEntry6 old_copy
        cdef bint had_old, moved
        cdef int rc
        memset(&want, 0, sizeof(RouteEntry6))
        self._subnet_key6(subnet, &want.hi, &want.lo)
        if ":" in peer_ip:
            if self.shared.n6_senders == 0:
                raise ValueError(f"{peer_ip}: an IPv6 peer needs an IPv6 underlay (udp6_fd)")
            parse_ipv6(peer_ip, want.peer6)
            want.base.underlay6 = 1
        else:
            want.base.peer = parse_ipv4(peer_ip)
        if self.shared.mode == MODE_VXLAN:
            copy_mac(want.base.mac, vtep_mac, "vtep_mac")
        elif vtep_mac is not None:
            raise ValueError("vtep_mac: only VXLAN routes carry one")
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            old = rt6_find(&self.shared.table6, want.hi, want.lo)
            had_old = old != NULL
            moved = not had_old or not same_peer6(old, &want)
            if had_old:
                old_copy = old[0]   # rt6_set may move the entry: keep what it said
            rc = sender_add6(self.shared, &want) if moved else 0
            if rc == 0:
                rc = rt6_set(&self.shared.table6, &want)
                if rc < 0 and moved:
                    sender_remove6(self.shared, &want)
                elif moved and had_old:
                    sender_remove6(self.shared, &old_copy)
            pthread_rwlock_unlock(&self.shared.lock)
        if rc < 0:
            raise MemoryError()

    def del_route6(self, str subnet) -> None:
        """Forget the route of IPv6 ``subnet``; no-op if there is none."""
        cdef uint64_t hi, lo
        cdef RouteEntry6* e
        self._subnet_key6(subnet, &hi, &lo)
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            e = rt6_find(&self.shared.table6, hi, lo)
            if e != NULL:
                sender_remove6(self.shared, e)
                rt6_delete(&self.shared.table6, hi, lo)
            pthread_rwlock_unlock(&self.shared.lock)

    def routes6(self) -> list:
        """The IPv6 routes as ``routes()`` gives the IPv4 ones (subnet and peer as text)."""
        cdef RouteEntry6* snapshot = NULL
        cdef uint32_t i, n = 0
        cdef RouteTable6* t = &self.shared.table6
        cdef uint8_t addr[16]
        with nogil:
            pthread_rwlock_rdlock(&self.shared.lock)
            snapshot = <RouteEntry6*>malloc((t.count + 1) * sizeof(RouteEntry6))
            if snapshot != NULL:
                for i in range(t.capacity):
                    if t.slots[i].base.used:
                        snapshot[n] = t.slots[i]
                        n += 1
            pthread_rwlock_unlock(&self.shared.lock)
        if snapshot == NULL:
            raise MemoryError()
        vxlan = self.shared.mode == MODE_VXLAN
        out = []
        try:
            for i in range(n):
                wr32(addr, <uint32_t>(snapshot[i].hi >> 32))
                wr32(addr + 4, <uint32_t>snapshot[i].hi)
                wr32(addr + 8, <uint32_t>(snapshot[i].lo >> 32))
                wr32(addr + 12, <uint32_t>snapshot[i].lo)
                peer = (format_ipv6(snapshot[i].peer6) if snapshot[i].base.underlay6
                        else format_ipv4(snapshot[i].base.peer))
                out.append((ipaddress.IPv6Address((<char*>addr)[:16]), peer,
                            (<char*>snapshot[i].base.mac)[:6] if vxlan else None,
                            route_counters(&snapshot[i].base)))
        finally:
            free(snapshot)
        out.sort(key=lambda entry: entry[0])
        return [(str(subnet), peer, mac, stats) for subnet, peer, mac, stats in out]

    def route6(self, str subnet) -> object:
        """One IPv6 route as ``routes6()`` gives it, without the subnet: (peer, vtep_mac,
        counters), or None when ``subnet`` has none. One hash lookup."""
        cdef uint64_t hi, lo
        cdef RouteEntry6 copy
        cdef RouteEntry6* e
        cdef bint found = False
        self._subnet_key6(subnet, &hi, &lo)
        with nogil:
            pthread_rwlock_rdlock(&self.shared.lock)
            e = rt6_find(&self.shared.table6, hi, lo)
            if e != NULL:
                copy = e[0]
                found = True
            pthread_rwlock_unlock(&self.shared.lock)
        if not found:
            return None
        peer = format_ipv6(copy.peer6) if copy.base.underlay6 else format_ipv4(copy.base.peer)
        mac = (<char*>copy.base.mac)[:6] if self.shared.mode == MODE_VXLAN else None
        return (peer, mac, route_counters(&copy.base))

    def counters(self) -> dict:
        """Global counters, summed over the TUN queues; tx_* = sent to peers, rx_* = written to
        the TUN (inner bytes)."""
        cdef Counters eg_sum, ig_sum
        cdef Counters* eg = &eg_sum
        cdef Counters* ig = &ig_sum
        cdef uint64_t polled[2]
        cdef unsigned int i, k
        memset(eg, 0, sizeof(Counters))
        memset(ig, 0, sizeof(Counters))
        polled[0] = polled[1] = 0
        for i in range(self.n_queues):
            counters_add(eg, &self.queues[i].eg.counters)
            counters_add(ig, &self.queues[i].ig.counters)
            for k in range(2):
                polled[k] += self.queues[i].busy_polled[k]
        return {
            "tx_packets": eg.packets,
            "tx_bytes": eg.bytes,
            "rx_packets": ig.packets,
            "rx_bytes": ig.bytes,
            "icmp_sent": eg.icmp_sent,
            "icmp_suppressed": eg.icmp_suppressed,
            # Per direction, so that what came in can be balanced against what became of it.
            "ingress_drops": {name: ig.drops[code] for code, name in DROP_NAMES.items()},
            "egress_drops": {name: eg.drops[code] for code, name in DROP_NAMES.items()},
            "tso_split": eg.offloaded,
            "gro_coalesced": ig.offloaded,
            "gso_fallbacks": eg.gso_fallbacks,
            "csum_completed": ig.csum_completed,
            "busy_poll_batches": polled[0] + polled[1],
            "busy_poll_egress_batches": polled[0],
            "busy_poll_ingress_batches": polled[1],
            "drops": {name: eg.drops[code] + ig.drops[code] for code, name in DROP_NAMES.items()},
        }

    def queue_counters(self) -> list:
        """Per TUN queue, in order: the packets its egress sent and its ingress wrote."""
        return [{"tx_packets": self.queues[i].eg.counters.packets,
                 "rx_packets": self.queues[i].ig.counters.packets}
                for i in range(self.n_queues)]

    def set_trace(self, int every) -> None:
        """Sample one packet decision in ``every`` into the trace rings; 0 turns tracing off
        (the I/O threads then skip it on one branch per packet)."""
        if every < 0:
            raise ValueError(f"every must be >= 0, not {every}")
        fu_store_relaxed(&self.shared.trace_every, <uint32_t>every)

    def trace_drain(self) -> list:
        """The trace records published since the last call, egress then ingress: [(ns,
        direction "egress"/"ingress", verdict "sent"/"to_tun"/"icmp_unreachable"/"dropped",
        drop reason or "", proto, src, dst, peer, length), ...]; addresses as text, "" for
        none. One consumer only (the caller holds the GIL)."""
        cdef TraceRing* rings[2 * MAX_QUEUES]
        cdef TraceRing* r
        cdef TraceRecord* rec
        cdef uint32_t head, tail
        # Egress rings of every queue, then ingress ones.
        for k in range(self.n_queues):
            rings[k] = &self.queues[k].eg_trace
            rings[self.n_queues + k] = &self.queues[k].ig_trace
        out = []
        for k in range(2 * self.n_queues):
            r = rings[k]
            head = fu_load_acquire(&r.head)
            tail = r.tail
            while tail != head:
                rec = &r.slots[tail & (TRACE_SLOTS - 1)]
                if rec.v6 & 1:
                    src, dst = format_ipv6(rec.src6), format_ipv6(rec.dst6)
                else:
                    src = format_ipv4(rec.src) if rec.src else ""
                    dst = format_ipv4(rec.dst) if rec.dst else ""
                if rec.v6 & 2:
                    peer = format_ipv6(rec.peer6)
                else:
                    peer = format_ipv4(rec.peer) if rec.peer else ""
                out.append((rec.ns, "egress" if rec.dir == 0 else "ingress",
                            VERDICT_NAMES.get(rec.verdict, "?"), DROP_NAMES.get(rec.drop, ""),
                            rec.proto, src, dst, peer, rec.length))
                tail += 1
            fu_store_release(&r.tail, tail)
        return out

    def trace_info(self) -> dict:
        """Whether tracing is on (every, 0 = off) and the records taken and lost (ring full)."""
        records = lost = 0
        for i in range(self.n_queues):
            records += self.queues[i].eg_trace.taken + self.queues[i].ig_trace.taken
            lost += self.queues[i].eg_trace.lost + self.queues[i].ig_trace.lost
        return {"every": fu_load_relaxed(&self.shared.trace_every), "records": records,
                "lost": lost}

    def _table_info(self) -> dict:
        """Diagnostics of the route hash table: capacity, count, longest probe sequence."""
        cdef RouteTable* t = &self.shared.table
        cdef uint32_t i, probe, longest = 0
        with nogil:
            pthread_rwlock_rdlock(&self.shared.lock)
            for i in range(t.capacity):
                if t.slots[i].used:
                    probe = ((i - rt_home(t, t.slots[i].subnet)) & (t.capacity - 1)) + 1
                    if probe > longest:
                        longest = probe
            pthread_rwlock_unlock(&self.shared.lock)
        return {"capacity": t.capacity, "count": t.count, "max_probe": longest}

    def offloads(self) -> dict:
        """Offloads in use now (udp_gso turns off for good if the kernel refuses it)."""
        return {"tun_vnet_hdr": bool(self.shared.vnet),
                "udp_gso": bool(fu_load_relaxed(&self.shared.udp_gso)),
                "udp_gro": bool(self.shared.udp_gro)}

    @property
    def running(self) -> bool:
        return any(self.queues[i].eg.started or self.queues[i].ig.started
                   for i in range(self.n_queues))

    @property
    def queue_count(self) -> int:
        return self.n_queues

    def start(self) -> None:
        """Start the egress and ingress threads of every queue; no-op if they are running."""
        cdef uint64_t drained
        cdef int rc = 0
        cdef unsigned int i
        if self.running:
            return
        if any(self.queues[i].tun_fd < 0 or self.queues[i].udp_fd < 0
               for i in range(self.n_queues)) or any(
                self.shared.send_fds[i] < 0
                for i in range(self.shared.n_senders + self.shared.n6_senders)) \
                or (self.shared.n6_senders and self.shared.udp6_fd < 0):
            raise ValueError("start() needs a TUN fd and UDP socket fds")
        for i in range(self.n_queues):
            if queue_alloc(self.queues[i]) < 0:
                raise MemoryError()
        read(self.shared.stop_fd, &drained, sizeof(drained))  # re-arm after a previous stop()
        with nogil:
            for i in range(self.n_queues):
                rc = queue_start(self.queues[i])
                if rc != 0:
                    break
            if rc != 0:
                for i in range(self.n_queues):
                    stop_threads(self.queues[i])
        if rc != 0:
            raise OSError(rc, strerror(rc).decode())

    def stop(self) -> None:
        """Stop and join the threads; idempotent."""
        cdef unsigned int i
        with nogil:
            for i in range(self.n_queues):
                stop_threads(self.queues[i])

    def process_egress(self, bytes packet, object vnet_hdr=None) -> tuple:
        """Test hook: (action, data, peer_ip or "", drop or 0, sender) for a packet read from
        the TUN; data is the UDP payload to send, or the ICMP reply. With ``vnet_hdr`` (10
        bytes) the packet is taken as read behind that virtio header, and data of a SEND is the
        list of datagrams (a super-packet's segments, as the UDP_SEGMENT runs carry them)."""
        cdef size_t n = len(packet)
        cdef uint8_t* buf = <uint8_t*>malloc(HEADROOM + n + 1)
        cdef uint8_t* pkt = buf + HEADROOM
        cdef EgressState* q = <EgressState*>calloc(1, sizeof(EgressState))
        cdef uint8_t reply[REPLY_MAX]
        cdef Verdict v
        cdef unsigned int k = 0
        cdef bint offloaded = vnet_hdr is not None
        if offloaded and (not isinstance(vnet_hdr, bytes) or len(vnet_hdr) != VNET_HDR_LEN):
            raise ValueError("vnet_hdr: 10 bytes")
        if buf == NULL or q == NULL:
            free(buf)
            free(q)
            raise MemoryError()
        memset(buf, 0, HEADROOM)     # no virtio header: a zeroed one
        memcpy(pkt, <const char*>packet, n)
        if offloaded:
            memcpy(pkt - VNET_HDR_LEN, <const char*><bytes>vnet_hdr, VNET_HDR_LEN)
            q.arena = <uint8_t*>malloc(ARENA_SIZE)
            if q.arena == NULL:
                free(buf)
                free(q)
                raise MemoryError()
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.shared.lock)
                egress_one(self.shared, pkt, n, reply, &v)
                if v.action == ACT_SEND:
                    if offloaded:
                        k = egress_offloaded(self.shared, q, 0, pkt, v.length, v.route)
                        if k == 0:
                            v.action = ACT_DROP
                            v.drop = D_BAD_GSO
                    else:
                        encap(self.shared, q, 0, pkt, v.length, v.route,
                              flow_of(self.shared, pkt, v.length))
                pthread_rwlock_unlock(&self.shared.lock)
            if v.action == ACT_SEND:
                if q.fam6[0]:
                    peer = format_ipv6(q.addrs6[0].sin6_addr.s6_addr)
                else:
                    peer = format_ipv4(ntohl(q.addrs[0].sin_addr.s_addr))
                if not offloaded:
                    return (v.action, (<char*>q.iov[0].iov_base)[:q.iov[0].iov_len], peer, 0,
                            q.sender[0])
                datagrams = []
                for i in range(k):
                    wire = (<char*>q.iov[i].iov_base)[:q.iov[i].iov_len]
                    step = q.gso_size[i] or len(wire)
                    datagrams += [wire[j:j + step] for j in range(0, len(wire), step)]
                return (v.action, datagrams, peer, 0, q.sender[0])
            if v.action == ACT_REPLY:
                return (v.action, (<char*>reply)[:v.length], "", v.drop, 0)
            return (v.action, [] if offloaded else b"", "", v.drop, 0)
        finally:
            free(buf)
            free(q.arena)
            free(q)

    def process_ingress(self, bytes datagram, str sender="0.0.0.0") -> tuple:
        """Test hook: (action, data, "", drop or 0, csum_at) for a datagram received from
        ``sender`` (an IPv4 or IPv6 address): data is the inner packet as decapsulated, csum_at where its partial checksum
        is (0: none; tun_writes shows what becomes of it)."""
        cdef uint32_t outer = 0
        cdef uint8_t outer6[16]
        cdef uint8_t* sender6 = NULL
        cdef size_t n = len(datagram)
        cdef uint8_t* buf = <uint8_t*>malloc(n + 1)
        cdef uint8_t* pkt
        cdef Verdict v
        if ":" in sender:
            parse_ipv6(sender, outer6)
            sender6 = outer6
        else:
            outer = parse_ipv4(sender)
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, <const char*>datagram, n)
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.shared.lock)
                pkt = ingress_frame(self.shared, buf, n, outer, sender6, &v)
                pthread_rwlock_unlock(&self.shared.lock)
            if v.action == ACT_TUN:
                return (v.action, (<char*>pkt)[:v.length], "", 0, v.csum_at)
            return (v.action, b"", "", v.drop, 0)
        finally:
            free(buf)
