# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native packet fast path of the UDP backend: TUN <-> UDP forwarding in C threads.

Two native threads move packets: egress (TUN -> validate/route -> sendmmsg to the peer) and
ingress (recvmmsg -> validate -> write to the TUN). Every per-packet step is a ``noexcept nogil``
C function on raw buffers; Python is only touched by the control methods (routes, counters,
start/stop) and by the test hooks ``process_egress``/``process_ingress``, which run the very same
C functions as the threads so that ``flannel_udp.packet`` can serve as their oracle.

Layout kept open for later work: all state of one TUN queue and its thread pair is one
``Queue`` struct (multi-queue = several of them sharing ``Shared``), the wire encapsulation is
one function each way (``encap_udp``/``decap_udp``; VXLAN would add a header iovec), and the
batch buffers are plain arrays that offload (IFF_VNET_HDR, UDP GSO/GRO) code can reuse.
"""

from libc.errno cimport EAGAIN, EINTR, EMSGSIZE, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset, strerror
from posix.time cimport timespec
from posix.unistd cimport close, read, write

import ipaddress

# Python.h (pyconfig.h) already defines _GNU_SOURCE, which <sys/socket.h> needs for
# struct mmsghdr, sendmmsg and recvmmsg.
cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int sendmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags)
    int recvmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags, timespec* timeout)
    enum:
        AF_INET
        MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    ctypedef unsigned long nfds_t
    int poll(pollfd* fds, nfds_t nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLNVAL

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t* s)
    int pthread_sigmask(int how, const sigset_t* s, sigset_t* old)
    enum:
        SIG_BLOCK

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec* req, timespec* rem)

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_join(pthread_t thread, void** retval)
    int pthread_setname_np(pthread_t thread, const char* name)
    pthread_t pthread_self()
    int pthread_rwlockattr_init(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_destroy(pthread_rwlockattr_t* attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t* attr, int pref)
    int pthread_rwlock_init(pthread_rwlock_t* lock, const pthread_rwlockattr_t* attr)
    int pthread_rwlock_destroy(pthread_rwlock_t* lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t* lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t* lock)
    int pthread_rwlock_unlock(pthread_rwlock_t* lock)
    enum:
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP


# ---------------------------------------------------------------------------------------------
# Constants shared with flannel_udp.packet (numbering must match packet.Drop / packet.Action).

cdef enum:
    BATCH = 64                      # packets per read/sendmmsg/recvmmsg batch
    BUF_SIZE = 65536                # one buffer holds the largest IPv4 packet / UDP payload
    ICMP_MAX = 20 + 8 + 60 + 8      # reply IP header + ICMP header + max quoted header + 8
    TABLE_MIN_CAPACITY = 16

cdef enum:
    ACT_SEND = 0
    ACT_TUN = 1
    ACT_REPLY = 2
    ACT_DROP = 3

cdef enum:
    D_NONE = 0
    D_SHORT = 1
    D_NOT_IPV4 = 2
    D_BAD_HEADER_LEN = 3
    D_BAD_TOTAL_LEN = 4
    D_TTL_EXPIRED = 5
    D_NO_ROUTE = 6
    D_TOO_BIG = 7
    D_SEND_ERROR = 8
    D_TUN_WRITE_ERROR = 9
    D_COUNT = 10

# Spelled out here rather than imported from packet.py so that the test comparing the two
# actually checks the C numbering.
DROP_NAMES = {
    D_SHORT: "short",
    D_NOT_IPV4: "not_ipv4",
    D_BAD_HEADER_LEN: "bad_header_len",
    D_BAD_TOTAL_LEN: "bad_total_len",
    D_TTL_EXPIRED: "ttl_expired",
    D_NO_ROUTE: "no_route",
    D_TOO_BIG: "too_big",
    D_SEND_ERROR: "send_error",
    D_TUN_WRITE_ERROR: "tun_write_error",
}


# ---------------------------------------------------------------------------------------------
# C state

ctypedef struct RouteEntry:
    uint32_t subnet         # key: network address, host order
    uint32_t peer           # peer public IPv4, host order
    uint32_t used
    # tx_* written only by the egress thread, rx_* only by the ingress thread.
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rx_packets
    uint64_t rx_bytes

ctypedef struct RouteTable:
    RouteEntry* slots
    uint32_t capacity       # power of two
    uint32_t count
    uint32_t shift          # 32 - log2(capacity), for Fibonacci hashing

ctypedef struct Shared:
    RouteTable table
    pthread_rwlock_t lock   # readers: I/O threads per batch; writers: set_route/del_route
    uint32_t mask           # lease prefix mask, host order
    uint32_t tun_addr       # source of our ICMP errors, host order
    uint16_t port           # peers' UDP port, network order
    int udp_fd
    int stop_fd             # eventfd; readable = threads must exit

ctypedef struct Counters:
    uint64_t packets
    uint64_t bytes
    uint64_t icmp_sent
    uint64_t drops[D_COUNT]

ctypedef struct Verdict:
    int action
    int drop
    size_t length           # of the packet to send/write, or of the ICMP reply
    uint32_t peer
    RouteEntry* route       # the entry whose counters the packet is charged to (or NULL)

ctypedef struct EgressState:
    uint8_t* bufs           # BATCH * BUF_SIZE
    size_t lens[BATCH]
    mmsghdr msgs[BATCH]
    iovec iov[BATCH]
    sockaddr_in addrs[BATCH]
    RouteEntry* routes[BATCH]
    size_t sent_lens[BATCH]
    uint8_t reply[ICMP_MAX]
    Counters counters
    pthread_t thread
    int started

ctypedef struct IngressState:
    uint8_t* bufs           # BATCH * BUF_SIZE
    mmsghdr msgs[BATCH]
    iovec iov[BATCH]
    Counters counters
    pthread_t thread
    int started

ctypedef struct Queue:
    # One TUN queue and its thread pair; egress and ingress halves are written by one thread each.
    Shared* shared
    int tun_fd
    EgressState eg
    IngressState ig


# ---------------------------------------------------------------------------------------------
# Route table: open addressing, linear probing, load <= 1/2, backward-shift deletion.

cdef inline uint32_t rt_home(const RouteTable* t, uint32_t key) noexcept nogil:
    # Fibonacci hashing: subnet keys share their low (host) bits, so take the high product bits.
    return <uint32_t>(key * <uint32_t>2654435769U) >> t.shift


cdef int rt_init(RouteTable* t, uint32_t capacity) noexcept nogil:
    cdef uint32_t bits = 0
    while (<uint32_t>1 << bits) < capacity:
        bits += 1
    t.slots = <RouteEntry*>calloc(<size_t>1 << bits, sizeof(RouteEntry))
    if t.slots == NULL:
        return -1
    t.capacity = <uint32_t>1 << bits
    t.count = 0
    t.shift = 32 - bits
    return 0


cdef RouteEntry* rt_find(const RouteTable* t, uint32_t key) noexcept nogil:
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt_home(t, key)
    while t.slots[i].used:
        if t.slots[i].subnet == key:
            return &t.slots[i]
        i = (i + 1) & m
    return NULL


cdef void rt_place(RouteTable* t, const RouteEntry* e) noexcept nogil:
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt_home(t, e.subnet)
    while t.slots[i].used:
        i = (i + 1) & m
    t.slots[i] = e[0]
    t.count += 1


cdef int rt_grow(RouteTable* t) noexcept nogil:
    cdef RouteTable bigger
    cdef uint32_t i
    if rt_init(&bigger, t.capacity * 2) < 0:
        return -1
    for i in range(t.capacity):
        if t.slots[i].used:
            rt_place(&bigger, &t.slots[i])
    free(t.slots)
    t[0] = bigger
    return 0


cdef int rt_set(RouteTable* t, uint32_t key, uint32_t peer) noexcept nogil:
    """Upsert; counters restart when the subnet moves to another peer. -1 on ENOMEM."""
    cdef RouteEntry e
    cdef RouteEntry* found = rt_find(t, key)
    if found != NULL:
        if found.peer != peer:
            memset(found, 0, sizeof(RouteEntry))
            found.subnet = key
            found.peer = peer
            found.used = 1
        return 0
    if (t.count + 1) * 2 > t.capacity and rt_grow(t) < 0:
        return -1
    memset(&e, 0, sizeof(RouteEntry))
    e.subnet = key
    e.peer = peer
    e.used = 1
    rt_place(t, &e)
    return 0


cdef int rt_delete(RouteTable* t, uint32_t key) noexcept nogil:
    """Remove ``key``; 1 if it was there. Shifts later cluster members back (no tombstones)."""
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt_home(t, key)
    cdef uint32_t j, home
    while True:
        if not t.slots[i].used:
            return 0
        if t.slots[i].subnet == key:
            break
        i = (i + 1) & m
    j = i
    while True:
        j = (j + 1) & m
        if not t.slots[j].used:
            break
        home = rt_home(t, t.slots[j].subnet)
        # Entry j may stay only if its home lies cyclically in (i, j]: then the hole at i is
        # not on its probe path.
        if i <= j:
            if i < home <= j:
                continue
        elif i < home or home <= j:
            continue
        t.slots[i] = t.slots[j]
        i = j
    memset(&t.slots[i], 0, sizeof(RouteEntry))
    t.count -= 1
    return 1


# ---------------------------------------------------------------------------------------------
# Packet logic (mirror of flannel_udp.packet)

cdef inline uint32_t rd16(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t rd32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void wr16(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline void wr32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef uint32_t inet_checksum(const uint8_t* p, size_t n) noexcept nogil:
    cdef uint64_t total = 0
    cdef size_t i = 0
    while i + 1 < n:
        total += rd16(p + i)
        i += 2
    if n & 1:
        total += <uint32_t>p[n - 1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint32_t>(~total) & 0xFFFF


cdef inline int ip_validate(const uint8_t* p, size_t n, size_t* total_len) noexcept nogil:
    """0 if ``p`` is a sane IPv4 packet (its length, trailer excluded, in total_len), else a drop."""
    cdef size_t header_len, total
    if n < 20:
        return D_SHORT
    if (p[0] >> 4) != 4:
        return D_NOT_IPV4
    header_len = <size_t>(p[0] & 0x0F) * 4
    if header_len < 20 or header_len > n:
        return D_BAD_HEADER_LEN
    total = rd16(p + 2)
    if total < header_len or total > n:
        return D_BAD_TOTAL_LEN
    total_len[0] = total
    return D_NONE


cdef inline void ttl_decrement(uint8_t* p) noexcept nogil:
    # RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), on the 16-bit word TTL|protocol.
    cdef uint32_t old_word = rd16(p + 8)
    cdef uint32_t new_word = old_word - 0x100
    cdef uint32_t total = (~rd16(p + 10) & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    p[8] -= 1
    wr16(p + 10, ~total & 0xFFFF)


cdef size_t build_net_unreachable(uint8_t* out, const uint8_t* pkt, size_t total_len,
                                  uint32_t tun_addr) noexcept nogil:
    """Write the ICMP net-unreachable answer to ``pkt`` into ``out`` (ICMP_MAX bytes)."""
    cdef size_t header_len = <size_t>(pkt[0] & 0x0F) * 4
    cdef size_t quote = header_len + 8
    cdef size_t length
    if quote > total_len:
        quote = total_len
    length = 20 + 8 + quote
    memset(out, 0, 28)
    out[0] = 0x45
    wr16(out + 2, <uint32_t>length)
    out[8] = 64
    out[9] = 1
    wr32(out + 12, tun_addr)
    memcpy(out + 16, pkt + 12, 4)
    wr16(out + 10, inet_checksum(out, 20))
    out[20] = 3
    out[21] = 0
    memcpy(out + 28, pkt, quote)
    wr16(out + 22, inet_checksum(out + 20, length - 20))
    return length


cdef void egress_one(Shared* s, uint8_t* pkt, size_t n, uint8_t* reply,
                     Verdict* v) noexcept nogil:
    """Decide the fate of a packet read from the TUN. Caller holds the route read lock.

    The route lookup is done before the TTL is decremented (the order is unobservable except in
    the ICMP quote, which must show the header as received).
    """
    cdef size_t total_len = 0
    cdef RouteEntry* e
    v.route = NULL
    v.peer = 0
    v.length = 0
    v.drop = ip_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    if pkt[8] <= 1:
        v.action = ACT_DROP
        v.drop = D_TTL_EXPIRED
        return
    e = rt_find(&s.table, rd32(pkt + 16) & s.mask)
    if e != NULL:
        ttl_decrement(pkt)
        v.action = ACT_SEND
        v.length = total_len
        v.peer = e.peer
        v.route = e
        return
    v.drop = D_NO_ROUTE
    if pkt[9] == 1 or (rd16(pkt + 6) & 0x1FFF) != 0:
        v.action = ACT_DROP
        return
    v.action = ACT_REPLY
    v.length = build_net_unreachable(reply, pkt, total_len, s.tun_addr)


cdef void ingress_one(Shared* s, uint8_t* pkt, size_t n, Verdict* v) noexcept nogil:
    """Decide the fate of a datagram from a peer. Caller holds the route read lock."""
    cdef size_t total_len = 0
    v.route = NULL
    v.peer = 0
    v.length = 0
    v.drop = ip_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    if pkt[8] <= 1:
        v.action = ACT_DROP
        v.drop = D_TTL_EXPIRED
        return
    ttl_decrement(pkt)
    v.action = ACT_TUN
    v.length = total_len
    # Per-peer rx is charged to the lease the inner source belongs to: flannel accepts any
    # datagram from anyone, so the outer source says nothing reliable.
    v.route = rt_find(&s.table, rd32(pkt + 12) & s.mask)


# ---------------------------------------------------------------------------------------------
# Encapsulation (one function per direction so that another mode can be slotted in)

cdef inline void encap_udp(Shared* s, EgressState* q, unsigned int k, uint8_t* pkt,
                           size_t length, uint32_t peer) noexcept nogil:
    # flannel's UDP mode: the datagram payload is the bare IPv4 packet, no header.
    q.iov[k].iov_base = pkt
    q.iov[k].iov_len = length
    q.addrs[k].sin_family = AF_INET
    q.addrs[k].sin_port = s.port
    q.addrs[k].sin_addr.s_addr = htonl(peer)
    q.msgs[k].msg_hdr.msg_name = &q.addrs[k]
    q.msgs[k].msg_hdr.msg_namelen = sizeof(sockaddr_in)
    q.msgs[k].msg_hdr.msg_iov = &q.iov[k]
    q.msgs[k].msg_hdr.msg_iovlen = 1
    q.msgs[k].msg_hdr.msg_control = NULL
    q.msgs[k].msg_hdr.msg_controllen = 0
    q.msgs[k].msg_hdr.msg_flags = 0


cdef inline uint8_t* decap_udp(uint8_t* datagram, size_t n, size_t* inner_len) noexcept nogil:
    inner_len[0] = n
    return datagram


# ---------------------------------------------------------------------------------------------
# I/O threads

cdef void backoff() noexcept nogil:
    # After an unexpected fd error poll would report the fd ready again at once: don't spin.
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = 10000000
    nanosleep(&ts, NULL)


cdef int wait_readable(int fd, int stop_fd) noexcept nogil:
    """1 when ``fd`` is readable (or in error), 0 when asked to stop, -1 when fd is invalid."""
    cdef pollfd fds[2]
    while True:
        fds[0].fd = fd
        fds[0].events = POLLIN
        fds[0].revents = 0
        fds[1].fd = stop_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                continue
            return -1
        if fds[1].revents:
            return 0
        if fds[0].revents & POLLNVAL:
            return -1
        if fds[0].revents:
            return 1


cdef bint wait_writable(int fd, int stop_fd) noexcept nogil:
    """True once ``fd`` can take a datagram; False when asked to stop or on a poll failure."""
    cdef pollfd fds[2]
    while True:
        fds[0].fd = fd
        fds[0].events = POLLOUT
        fds[0].revents = 0
        fds[1].fd = stop_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                continue
            return False
        if fds[1].revents or fds[0].revents & POLLNVAL:
            return False
        if fds[0].revents:
            return True


cdef void send_batch(Shared* s, EgressState* q, unsigned int count) noexcept nogil:
    cdef unsigned int off = 0
    cdef unsigned int j
    cdef int r
    while off < count:
        r = sendmmsg(s.udp_fd, &q.msgs[off], count - off, 0)
        if r > 0:
            for j in range(off, off + <unsigned int>r):
                q.counters.packets += 1
                q.counters.bytes += q.sent_lens[j]
                q.routes[j].tx_packets += 1
                q.routes[j].tx_bytes += q.sent_lens[j]
            off += <unsigned int>r
            # A short count means message ``off`` failed and its errno was lost: the next call
            # starts with it and reports the error.
            continue
        if r < 0 and errno == EINTR:
            continue
        # The caller may hand over a nonblocking socket (asyncio's are): wait for room rather
        # than drop a whole batch on a momentarily full send buffer.
        if r < 0 and errno == EAGAIN and wait_writable(s.udp_fd, s.stop_fd):
            continue
        if r < 0 and errno == EMSGSIZE:
            q.counters.drops[D_TOO_BIG] += 1
        else:
            q.counters.drops[D_SEND_ERROR] += 1
        off += 1


cdef int egress_batch(Queue* qu) noexcept nogil:
    """Read up to BATCH packets from the TUN and forward them; -1 on a TUN read error."""
    cdef Shared* s = qu.shared
    cdef EgressState* q = &qu.eg
    cdef unsigned int n_read = 0
    cdef unsigned int i
    cdef unsigned int k = 0
    cdef ssize_t r
    cdef int failed = 0
    cdef uint8_t* pkt
    cdef Verdict v
    while n_read < BATCH:
        r = read(qu.tun_fd, q.bufs + <size_t>n_read * BUF_SIZE, BUF_SIZE)
        if r < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                failed = 1
            break
        if r == 0:
            break
        q.lens[n_read] = <size_t>r
        n_read += 1
    if n_read == 0:
        return -1 if failed else 0
    # The read lock spans the sends: the batch holds pointers into the table for its counters.
    pthread_rwlock_rdlock(&s.lock)
    for i in range(n_read):
        pkt = q.bufs + <size_t>i * BUF_SIZE
        egress_one(s, pkt, q.lens[i], q.reply, &v)
        if v.action == ACT_SEND:
            encap_udp(s, q, k, pkt, v.length, v.peer)
            q.routes[k] = v.route
            q.sent_lens[k] = v.length
            k += 1
        elif v.action == ACT_REPLY:
            q.counters.drops[D_NO_ROUTE] += 1
            if write(qu.tun_fd, q.reply, v.length) == <ssize_t>v.length:
                q.counters.icmp_sent += 1
            else:
                q.counters.drops[D_TUN_WRITE_ERROR] += 1
        else:
            q.counters.drops[v.drop] += 1
    if k:
        send_batch(s, q, k)
    pthread_rwlock_unlock(&s.lock)
    return <int>n_read


cdef int ingress_batch(Queue* qu) noexcept nogil:
    """Drain the UDP socket into the TUN in batches; -1 on a socket error."""
    cdef Shared* s = qu.shared
    cdef IngressState* q = &qu.ig
    cdef int r, i
    cdef size_t inner_len
    cdef uint8_t* pkt
    cdef Verdict v
    while True:
        r = recvmmsg(s.udp_fd, q.msgs, BATCH, MSG_DONTWAIT, NULL)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return 0
            return -1
        pthread_rwlock_rdlock(&s.lock)
        for i in range(r):
            # Buffers are larger than any UDP payload, so MSG_TRUNC cannot happen.
            pkt = decap_udp(q.bufs + <size_t>i * BUF_SIZE, q.msgs[i].msg_len, &inner_len)
            ingress_one(s, pkt, inner_len, &v)
            if v.action != ACT_TUN:
                q.counters.drops[v.drop] += 1
            elif write(qu.tun_fd, pkt, v.length) == <ssize_t>v.length:
                q.counters.packets += 1
                q.counters.bytes += v.length
                if v.route != NULL:
                    v.route.rx_packets += 1
                    v.route.rx_bytes += v.length
            else:
                q.counters.drops[D_TUN_WRITE_ERROR] += 1
        pthread_rwlock_unlock(&s.lock)
        if r < BATCH:
            return 0


cdef void thread_setup(const char* name) noexcept nogil:
    # Signals belong to Python's main thread; a handler run here could never reach Python.
    cdef sigset_t all_signals
    sigfillset(&all_signals)
    pthread_sigmask(SIG_BLOCK, &all_signals, NULL)
    pthread_setname_np(pthread_self(), name)


cdef void* egress_main(void* arg) noexcept nogil:
    cdef Queue* qu = <Queue*>arg
    cdef int ready
    thread_setup("flannel-egress")
    while True:
        ready = wait_readable(qu.tun_fd, qu.shared.stop_fd)
        if ready <= 0:
            break
        if egress_batch(qu) < 0:
            backoff()
    return NULL


cdef void* ingress_main(void* arg) noexcept nogil:
    cdef Queue* qu = <Queue*>arg
    cdef int ready
    thread_setup("flannel-ingress")
    while True:
        ready = wait_readable(qu.shared.udp_fd, qu.shared.stop_fd)
        if ready <= 0:
            break
        if ingress_batch(qu) < 0:
            backoff()
    return NULL


cdef void queue_init_ingress(Queue* qu) noexcept nogil:
    cdef IngressState* q = &qu.ig
    cdef int i
    # recvmmsg only writes msg_len/msg_flags/msg_namelen, so the vectors are set up once.
    memset(q.msgs, 0, BATCH * sizeof(mmsghdr))
    for i in range(BATCH):
        q.iov[i].iov_base = q.bufs + <size_t>i * BUF_SIZE
        q.iov[i].iov_len = BUF_SIZE
        q.msgs[i].msg_hdr.msg_iov = &q.iov[i]
        q.msgs[i].msg_hdr.msg_iovlen = 1


cdef void stop_threads(Queue* qu) noexcept nogil:
    cdef uint64_t one = 1
    if not qu.eg.started and not qu.ig.started:
        return
    write(qu.shared.stop_fd, &one, sizeof(one))
    if qu.eg.started:
        pthread_join(qu.eg.thread, NULL)
        qu.eg.started = 0
    if qu.ig.started:
        pthread_join(qu.ig.thread, NULL)
        qu.ig.started = 0


# ---------------------------------------------------------------------------------------------
# Python API

cdef uint32_t parse_ipv4(str text) except? 0:
    return <uint32_t>int(ipaddress.IPv4Address(text))


cdef str format_ipv4(uint32_t addr):
    return str(ipaddress.IPv4Address(addr))


cdef dict route_counters(const RouteEntry* e):
    return {
        "tx_packets": e.tx_packets,
        "tx_bytes": e.tx_bytes,
        "rx_packets": e.rx_packets,
        "rx_bytes": e.rx_bytes,
    }


cdef class FastPath:
    """TUN <-> UDP forwarder for one TUN queue; fds are owned (and closed) by the caller."""

    cdef Shared* shared
    cdef Queue* queue
    cdef bint lock_ready

    def __cinit__(self, *args, **kwargs):
        cdef pthread_rwlockattr_t attr
        cdef int rc
        self.shared = <Shared*>calloc(1, sizeof(Shared))
        self.queue = <Queue*>calloc(1, sizeof(Queue))
        if self.shared == NULL or self.queue == NULL:
            raise MemoryError()
        self.shared.stop_fd = -1
        self.shared.udp_fd = -1
        self.queue.tun_fd = -1
        self.queue.shared = self.shared
        if rt_init(&self.shared.table, TABLE_MIN_CAPACITY) < 0:
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

    def __init__(self, int tun_fd, int udp_fd, int port, str tun_addr, int subnet_len):
        if self.queue.eg.started or self.queue.ig.started:
            raise RuntimeError("FastPath is running")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if not 0 <= subnet_len <= 32:
            raise ValueError(f"subnet_len out of range: {subnet_len}")
        self.queue.tun_fd = tun_fd
        self.shared.udp_fd = udp_fd
        self.shared.port = htons(<uint16_t>port)
        self.shared.tun_addr = parse_ipv4(tun_addr)
        self.shared.mask = 0 if subnet_len == 0 else (<uint32_t>0xFFFFFFFF) << (32 - subnet_len)

    def __dealloc__(self):
        if self.queue != NULL:
            if self.shared != NULL:
                with nogil:
                    stop_threads(self.queue)
            free(self.queue.eg.bufs)
            free(self.queue.ig.bufs)
            free(self.queue)
            self.queue = NULL
        if self.shared != NULL:
            if self.shared.stop_fd >= 0:
                close(self.shared.stop_fd)
            if self.lock_ready:
                pthread_rwlock_destroy(&self.shared.lock)
            free(self.shared.table.slots)
            free(self.shared)
            self.shared = NULL

    cdef uint32_t _subnet_key(self, str subnet) except? 0:
        cdef uint32_t key = parse_ipv4(subnet)
        if key & ~self.shared.mask:
            raise ValueError(f"{subnet} is not a network address of the lease prefix length")
        return key

    def set_route(self, str subnet, str peer_ip) -> None:
        """Route ``subnet`` (its network address) to ``peer_ip``; replaces an existing route."""
        cdef uint32_t key = self._subnet_key(subnet)
        cdef uint32_t peer = parse_ipv4(peer_ip)
        cdef int rc
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            rc = rt_set(&self.shared.table, key, peer)
            pthread_rwlock_unlock(&self.shared.lock)
        if rc < 0:
            raise MemoryError()

    def del_route(self, str subnet) -> None:
        """Forget the route of ``subnet``; no-op if there is none."""
        cdef uint32_t key = self._subnet_key(subnet)
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            rt_delete(&self.shared.table, key)
            pthread_rwlock_unlock(&self.shared.lock)

    def routes(self) -> list:
        """[(subnet, peer_ip, {tx_packets, tx_bytes, rx_packets, rx_bytes}), ...] by subnet."""
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
        try:
            entries = sorted(
                [(snapshot[i].subnet, snapshot[i].peer, route_counters(&snapshot[i]))
                 for i in range(n)],
                key=lambda entry: entry[0],
            )
        finally:
            free(snapshot)
        return [(format_ipv4(subnet), format_ipv4(peer), stats) for subnet, peer, stats in entries]

    def counters(self) -> dict:
        """Global counters; tx_* = sent to peers, rx_* = written to the TUN (inner bytes)."""
        cdef Counters* eg = &self.queue.eg.counters
        cdef Counters* ig = &self.queue.ig.counters
        return {
            "tx_packets": eg.packets,
            "tx_bytes": eg.bytes,
            "rx_packets": ig.packets,
            "rx_bytes": ig.bytes,
            "icmp_sent": eg.icmp_sent,
            "drops": {name: eg.drops[code] + ig.drops[code] for code, name in DROP_NAMES.items()},
        }

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

    @property
    def running(self) -> bool:
        return bool(self.queue.eg.started or self.queue.ig.started)

    def start(self) -> None:
        """Start the egress and ingress threads; no-op if they are running."""
        cdef uint64_t drained
        cdef int rc
        if self.queue.eg.started or self.queue.ig.started:
            return
        if self.queue.tun_fd < 0 or self.shared.udp_fd < 0:
            raise ValueError("start() needs a TUN fd and a UDP socket fd")
        if self.queue.eg.bufs == NULL:
            self.queue.eg.bufs = <uint8_t*>malloc(<size_t>BATCH * BUF_SIZE)
            self.queue.ig.bufs = <uint8_t*>malloc(<size_t>BATCH * BUF_SIZE)
            if self.queue.eg.bufs == NULL or self.queue.ig.bufs == NULL:
                free(self.queue.eg.bufs)
                free(self.queue.ig.bufs)
                self.queue.eg.bufs = NULL
                self.queue.ig.bufs = NULL
                raise MemoryError()
            queue_init_ingress(self.queue)
        read(self.shared.stop_fd, &drained, sizeof(drained))  # re-arm after a previous stop()
        rc = pthread_create(&self.queue.eg.thread, NULL, egress_main, self.queue)
        if rc == 0:
            self.queue.eg.started = 1
            rc = pthread_create(&self.queue.ig.thread, NULL, ingress_main, self.queue)
            if rc == 0:
                self.queue.ig.started = 1
        if rc != 0:
            with nogil:
                stop_threads(self.queue)
            raise OSError(rc, strerror(rc).decode())

    def stop(self) -> None:
        """Stop and join the threads; idempotent."""
        with nogil:
            stop_threads(self.queue)

    def process_egress(self, bytes packet) -> tuple:
        """Test hook: (action, data, peer_ip or "", drop or 0) for a packet read from the TUN."""
        cdef size_t n = len(packet)
        cdef uint8_t* buf = <uint8_t*>malloc(n + 1)
        cdef uint8_t reply[ICMP_MAX]
        cdef Verdict v
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, <const char*>packet, n)
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.shared.lock)
                egress_one(self.shared, buf, n, reply, &v)
                pthread_rwlock_unlock(&self.shared.lock)
            if v.action == ACT_SEND:
                return (v.action, (<char*>buf)[:v.length], format_ipv4(v.peer), 0)
            if v.action == ACT_REPLY:
                return (v.action, (<char*>reply)[:v.length], "", v.drop)
            return (v.action, b"", "", v.drop)
        finally:
            free(buf)

    def process_ingress(self, bytes datagram) -> tuple:
        """Test hook: (action, data, "", drop or 0) for a datagram received from a peer."""
        cdef size_t n = len(datagram)
        cdef uint8_t* buf = <uint8_t*>malloc(n + 1)
        cdef uint8_t* pkt
        cdef size_t inner_len
        cdef Verdict v
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, <const char*>datagram, n)
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.shared.lock)
                pkt = decap_udp(buf, n, &inner_len)
                ingress_one(self.shared, pkt, inner_len, &v)
                pthread_rwlock_unlock(&self.shared.lock)
            if v.action == ACT_TUN:
                return (v.action, (<char*>pkt)[:v.length], "", 0)
            return (v.action, b"", "", v.drop)
        finally:
            free(buf)
