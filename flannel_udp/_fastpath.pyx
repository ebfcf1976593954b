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

Layout kept open for later work: all state of one TUN queue and its thread pair is one
``Queue`` struct (multi-queue = several of them sharing ``Shared``), the wire encapsulation is
one function per mode and direction (``encap_udp``/``encap_vxlan``, ``decap_udp``/
``decap_vxlan``), egress reads each packet behind HEADROOM bytes so that a header goes in front
of it in the same buffer (one contiguous datagram, as UDP GSO will want), and the batch buffers
are plain arrays that offload (IFF_VNET_HDR, UDP GSO/GRO) code can reuse.
"""

from libc.errno cimport EAGAIN, EINTR, EMSGSIZE, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset, strerror
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
    uint32_t ntohl(uint32_t)

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
    HEADROOM = 64                   # room for the encapsulation in front of an egress packet
    EGRESS_SLOT = HEADROOM + BUF_SIZE
    ICMP_MAX = 20 + 8 + 60 + 8      # reply IP header + ICMP header + max quoted header + 8
    TABLE_MIN_CAPACITY = 16
    MAX_SENDERS = 64                # send sockets egress may spread flows over

cdef enum:
    MODE_UDP = 0                    # flannel's udp backend
    MODE_VXLAN = 1                  # RFC 7348, as Linux's kernel VXLAN

cdef enum:
    VXLAN_HDR_LEN = 8
    ETH_HDR_LEN = 14
    VXLAN_ENCAP_LEN = VXLAN_HDR_LEN + ETH_HDR_LEN
    VXLAN_FLAG_I = 0x08
    ETHERTYPE_IPV4 = 0x0800
    VNI_MAX = 0xFFFFFF

# Equal to packet.FLOW_HASH_SEED.
cdef uint32_t FLOW_HASH_SEED = 0x666C7578U

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
    D_VXLAN_SHORT = 10
    D_VXLAN_BAD_FLAGS = 11
    D_VXLAN_WRONG_VNI = 12
    D_VXLAN_WRONG_MAC = 13
    D_VXLAN_NOT_IPV4 = 14
    D_COUNT = 15

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
    D_VXLAN_SHORT: "vxlan_short",
    D_VXLAN_BAD_FLAGS: "vxlan_bad_flags",
    D_VXLAN_WRONG_VNI: "vxlan_wrong_vni",
    D_VXLAN_WRONG_MAC: "vxlan_wrong_mac",
    D_VXLAN_NOT_IPV4: "vxlan_not_ipv4",
}


# ---------------------------------------------------------------------------------------------
# C state

ctypedef struct RouteEntry:
    uint32_t subnet         # key: network address, host order
    uint32_t peer           # peer public IPv4, host order
    uint32_t used
    uint8_t mac[6]          # VXLAN: the peer's VtepMAC
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
    int mode                # MODE_UDP or MODE_VXLAN
    uint32_t vni            # VXLAN
    uint8_t vtep_mac[6]     # VXLAN: ours
    int udp_fd              # receives (bound to the port)
    unsigned int n_senders
    int send_fds[MAX_SENDERS]   # egress sends from these; UDP mode: udp_fd only
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
    uint8_t* bufs           # BATCH * EGRESS_SLOT; a packet is read HEADROOM bytes into its slot
    size_t lens[BATCH]
    # Per packet of the batch, filled by the encapsulation: the datagram, where it goes, which
    # socket sends it, and what it is charged to (inner bytes, so tx matches the peer's rx).
    iovec iov[BATCH]
    sockaddr_in addrs[BATCH]
    unsigned int sender[BATCH]
    RouteEntry* routes[BATCH]
    size_t sent_lens[BATCH]
    # In send order, grouped by sender: msgs[j] carries packet order[j].
    mmsghdr msgs[BATCH]
    unsigned int order[BATCH]
    unsigned int run_end[MAX_SENDERS]
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


cdef int rt_set(RouteTable* t, uint32_t key, uint32_t peer, const uint8_t* mac) noexcept nogil:
    """Upsert; counters restart when the subnet moves to another peer. -1 on ENOMEM."""
    cdef RouteEntry e
    cdef RouteEntry* found = rt_find(t, key)
    if found != NULL:
        if found.peer != peer:
            memset(found, 0, sizeof(RouteEntry))
            found.subnet = key
            found.peer = peer
            found.used = 1
        memcpy(found.mac, mac, 6)
        return 0
    if (t.count + 1) * 2 > t.capacity and rt_grow(t) < 0:
        return -1
    memset(&e, 0, sizeof(RouteEntry))
    e.subnet = key
    e.peer = peer
    e.used = 1
    memcpy(e.mac, mac, 6)
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
    the ICMP quote, which must show the header as received). Only UDP mode touches the TTL, as
    flannel's proxy does; kernel VXLAN leaves it to the kernel's forwarding.
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
    if s.mode == MODE_UDP and pkt[8] <= 1:
        v.action = ACT_DROP
        v.drop = D_TTL_EXPIRED
        return
    e = rt_find(&s.table, rd32(pkt + 16) & s.mask)
    if e != NULL:
        if s.mode == MODE_UDP:
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
    """Decide the fate of a decapsulated packet from a peer. Caller holds the route read lock."""
    cdef size_t total_len = 0
    v.drop = ip_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    if s.mode == MODE_UDP:
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
# Encapsulation: one function per mode and direction; ``encap``/``ingress_frame`` dispatch.

cdef inline uint32_t fmix32(uint32_t h) noexcept nogil:
    # MurmurHash3's finalizer: every input bit affects every output bit.
    h ^= h >> 16
    h *= <uint32_t>0x85EBCA6BU
    h ^= h >> 13
    h *= <uint32_t>0xC2B2AE35U
    h ^= h >> 16
    return h


cdef inline bint has_ports(uint32_t proto) noexcept nogil:
    # TCP, UDP, DCCP, SCTP, UDP-Lite: the first 4 payload bytes are the two ports.
    return proto == 6 or proto == 17 or proto == 33 or proto == 132 or proto == 136


cdef uint32_t hash_flow(const uint8_t* pkt, size_t total_len) noexcept nogil:
    """Hash of a validated packet's flow (mirror of packet.flow_hash): addresses, protocol, and
    the ports unless the packet is a fragment (fragments of one datagram must hash alike)."""
    cdef size_t header_len = <size_t>(pkt[0] & 0x0F) * 4
    cdef uint32_t proto = pkt[9]
    cdef uint32_t ports = 0
    cdef uint32_t h
    if has_ports(proto) and (rd16(pkt + 6) & 0x3FFF) == 0 and header_len + 4 <= total_len:
        ports = rd32(pkt + header_len)
    h = fmix32(FLOW_HASH_SEED ^ rd32(pkt + 12))
    h = fmix32(h ^ rd32(pkt + 16))
    h = fmix32(h ^ proto)
    return fmix32(h ^ ports)


cdef inline void address_to(const Shared* s, EgressState* q, unsigned int k,
                            uint32_t peer) noexcept nogil:
    q.addrs[k].sin_family = AF_INET
    q.addrs[k].sin_port = s.port
    q.addrs[k].sin_addr.s_addr = htonl(peer)


cdef inline void encap_udp(const Shared* s, EgressState* q, unsigned int k, uint8_t* pkt,
                           size_t length, const RouteEntry* e) noexcept nogil:
    # flannel's UDP mode: the datagram payload is the bare IPv4 packet, no header.
    q.iov[k].iov_base = pkt
    q.iov[k].iov_len = length
    address_to(s, q, k, e.peer)
    q.sender[k] = 0


cdef inline void encap_vxlan(const Shared* s, EgressState* q, unsigned int k, uint8_t* pkt,
                             size_t length, const RouteEntry* e) noexcept nogil:
    # RFC 7348 header and the inner Ethernet header, written into the headroom before pkt.
    cdef uint8_t* h = pkt - VXLAN_ENCAP_LEN
    wr32(h, <uint32_t>VXLAN_FLAG_I << 24)
    wr32(h + 4, s.vni << 8)
    memcpy(h + 8, e.mac, 6)
    memcpy(h + 14, s.vtep_mac, 6)
    wr16(h + 20, ETHERTYPE_IPV4)
    q.iov[k].iov_base = h
    q.iov[k].iov_len = VXLAN_ENCAP_LEN + length
    address_to(s, q, k, e.peer)
    # One socket per flow keeps a flow on one outer source port (and in order).
    q.sender[k] = <unsigned int>((<uint64_t>hash_flow(pkt, length) * s.n_senders) >> 32)


cdef inline void encap(const Shared* s, EgressState* q, unsigned int k, uint8_t* pkt,
                       size_t length, RouteEntry* e) noexcept nogil:
    """Make packet k of the batch (HEADROOM bytes of room before ``pkt``) ready to send."""
    if s.mode == MODE_VXLAN:
        encap_vxlan(s, q, k, pkt, length, e)
    else:
        encap_udp(s, q, k, pkt, length, e)
    q.routes[k] = e
    q.sent_lens[k] = length


cdef inline int decap_udp(uint8_t* datagram, size_t n, uint8_t** inner,
                          size_t* inner_len) noexcept nogil:
    inner[0] = datagram
    inner_len[0] = n
    return D_NONE


cdef inline int decap_vxlan(const Shared* s, uint8_t* datagram, size_t n, uint8_t** inner,
                            size_t* inner_len) noexcept nogil:
    # The reserved flag bits are ignored on receipt (RFC 7348); only the I flag must be set.
    if n < VXLAN_ENCAP_LEN:
        return D_VXLAN_SHORT
    if not (datagram[0] & VXLAN_FLAG_I):
        return D_VXLAN_BAD_FLAGS
    if (rd32(datagram + 4) >> 8) != s.vni:
        return D_VXLAN_WRONG_VNI
    if memcmp(datagram + 8, s.vtep_mac, 6) != 0:
        return D_VXLAN_WRONG_MAC
    if rd16(datagram + 20) != ETHERTYPE_IPV4:
        return D_VXLAN_NOT_IPV4
    inner[0] = datagram + VXLAN_ENCAP_LEN
    inner_len[0] = n - VXLAN_ENCAP_LEN
    return D_NONE


cdef uint8_t* ingress_frame(Shared* s, uint8_t* datagram, size_t n, Verdict* v) noexcept nogil:
    """Decapsulate and check a datagram from a peer; the inner packet to write when
    ``v.action == ACT_TUN``. Caller holds the route read lock."""
    cdef uint8_t* pkt = NULL
    cdef size_t inner_len = 0
    v.route = NULL
    v.peer = 0
    v.length = 0
    if s.mode == MODE_VXLAN:
        v.drop = decap_vxlan(s, datagram, n, &pkt, &inner_len)
    else:
        v.drop = decap_udp(datagram, n, &pkt, &inner_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return NULL
    ingress_one(s, pkt, inner_len, v)
    return pkt


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


cdef void send_run(Shared* s, EgressState* q, int fd, unsigned int start,
                   unsigned int end) noexcept nogil:
    """sendmmsg msgs[start:end] through ``fd``, counting each packet once: sent or dropped."""
    cdef unsigned int off = start
    cdef unsigned int j, p
    cdef int r
    while off < end:
        r = sendmmsg(fd, &q.msgs[off], end - off, 0)
        if r > 0:
            for j in range(off, off + <unsigned int>r):
                p = q.order[j]
                q.counters.packets += 1
                q.counters.bytes += q.sent_lens[p]
                q.routes[p].tx_packets += 1
                q.routes[p].tx_bytes += q.sent_lens[p]
            off += <unsigned int>r
            # A short count means message ``off`` failed and its errno was lost: the next call
            # starts with it and reports the error.
            continue
        if r < 0 and errno == EINTR:
            continue
        # The caller may hand over a nonblocking socket (asyncio's are): wait for room rather
        # than drop a whole batch on a momentarily full send buffer.
        if r < 0 and errno == EAGAIN and wait_writable(fd, s.stop_fd):
            continue
        if r < 0 and errno == EMSGSIZE:
            q.counters.drops[D_TOO_BIG] += 1
        else:
            q.counters.drops[D_SEND_ERROR] += 1
        off += 1


cdef void send_batch(Shared* s, EgressState* q, unsigned int count) noexcept nogil:
    """Send the batch's ``count`` encapsulated packets: one sendmmsg run per sender socket."""
    cdef unsigned int i, j, sender
    cdef unsigned int start = 0
    cdef unsigned int* run_end = q.run_end
    # Counting sort by sender, stable: a flow has one sender, so it keeps its order.
    memset(run_end, 0, s.n_senders * sizeof(unsigned int))
    for i in range(count):
        run_end[q.sender[i]] += 1
    for sender in range(s.n_senders):
        j = run_end[sender]
        run_end[sender] = start     # where this sender's run begins, advanced while placing
        start += j
    for i in range(count):
        j = run_end[q.sender[i]]
        run_end[q.sender[i]] = j + 1
        q.order[j] = i
        q.msgs[j].msg_hdr.msg_name = &q.addrs[i]
        q.msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        q.msgs[j].msg_hdr.msg_iov = &q.iov[i]
        q.msgs[j].msg_hdr.msg_iovlen = 1
        q.msgs[j].msg_hdr.msg_control = NULL
        q.msgs[j].msg_hdr.msg_controllen = 0
        q.msgs[j].msg_hdr.msg_flags = 0
    start = 0
    for sender in range(s.n_senders):   # run_end[sender] is now where the run ends
        if run_end[sender] > start:
            send_run(s, q, s.send_fds[sender], start, run_end[sender])
        start = run_end[sender]


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
        r = read(qu.tun_fd, q.bufs + <size_t>n_read * EGRESS_SLOT + HEADROOM, BUF_SIZE)
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
        pkt = q.bufs + <size_t>i * EGRESS_SLOT + HEADROOM
        egress_one(s, pkt, q.lens[i], q.reply, &v)
        if v.action == ACT_SEND:
            encap(s, q, k, pkt, v.length, v.route)
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
            pkt = ingress_frame(s, q.bufs + <size_t>i * BUF_SIZE, q.msgs[i].msg_len, &v)
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


cdef int copy_mac(uint8_t* out, object mac, str what) except -1:
    if not isinstance(mac, bytes) or len(<bytes>mac) != 6:
        raise ValueError(f"{what}: expected 6 bytes, got {mac!r}")
    memcpy(out, <const char*><bytes>mac, 6)
    return 0


cdef dict route_counters(const RouteEntry* e):
    return {
        "tx_packets": e.tx_packets,
        "tx_bytes": e.tx_bytes,
        "rx_packets": e.rx_packets,
        "rx_bytes": e.rx_bytes,
    }


def flow_hash(bytes packet) -> int:
    """Test hook: the C flow hash of an IPv4 packet (ValueError unless its header is sane)."""
    cdef size_t total_len = 0
    cdef int drop = ip_validate(<const uint8_t*><const char*>packet, len(packet), &total_len)
    if drop != D_NONE:
        raise ValueError(f"not a valid IPv4 packet: {DROP_NAMES[drop]}")
    return hash_flow(<const uint8_t*><const char*>packet, total_len)


cdef class FastPath:
    """TUN <-> UDP forwarder for one TUN queue; fds are owned (and closed) by the caller.

    ``mode`` "udp" is flannel's udp backend; "vxlan" is RFC 7348 with VNI ``vni`` and our
    ``vtep_mac`` (6 bytes). Egress sends from ``send_fds`` (default: ``udp_fd``), a VXLAN flow
    always from the same one; ingress receives on ``udp_fd``.
    """

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

    def __init__(self, int tun_fd, int udp_fd, int port, str tun_addr, int subnet_len, *,
                 str mode="udp", int vni=0, object vtep_mac=None, object send_fds=None):
        cdef unsigned int i
        if self.queue.eg.started or self.queue.ig.started:
            raise RuntimeError("FastPath is running")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if not 0 <= subnet_len <= 32:
            raise ValueError(f"subnet_len out of range: {subnet_len}")
        if mode == "vxlan":
            if not 1 <= vni <= VNI_MAX:
                raise ValueError(f"vni out of range: {vni}")
            copy_mac(self.shared.vtep_mac, vtep_mac, "vtep_mac")
            self.shared.mode = MODE_VXLAN
            self.shared.vni = <uint32_t>vni
        elif mode == "udp":
            self.shared.mode = MODE_UDP
        else:
            raise ValueError(f"mode must be 'udp' or 'vxlan', not {mode!r}")
        senders = [udp_fd] if send_fds is None else [int(fd) for fd in send_fds]
        if not 1 <= len(senders) <= MAX_SENDERS:
            raise ValueError(f"send_fds: 1 to {MAX_SENDERS} sockets, not {len(senders)}")
        if mode == "udp" and len(senders) != 1:
            raise ValueError("send_fds: UDP mode sends from one socket")
        for i in range(len(senders)):
            self.shared.send_fds[i] = senders[i]
        self.shared.n_senders = len(senders)
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
        with nogil:
            pthread_rwlock_wrlock(&self.shared.lock)
            rc = rt_set(&self.shared.table, key, peer, mac)
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
        if self.queue.tun_fd < 0 or self.shared.udp_fd < 0 or any(
                self.shared.send_fds[i] < 0 for i in range(self.shared.n_senders)):
            raise ValueError("start() needs a TUN fd and UDP socket fds")
        if self.queue.eg.bufs == NULL:
            self.queue.eg.bufs = <uint8_t*>malloc(<size_t>BATCH * EGRESS_SLOT)
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
        """Test hook: (action, data, peer_ip or "", drop or 0, sender) for a packet read from
        the TUN; data is the UDP payload to send, or the ICMP reply."""
        cdef size_t n = len(packet)
        cdef uint8_t* buf = <uint8_t*>malloc(HEADROOM + n + 1)
        cdef uint8_t* pkt = buf + HEADROOM
        cdef EgressState* q = <EgressState*>malloc(sizeof(EgressState))
        cdef uint8_t reply[ICMP_MAX]
        cdef Verdict v
        if buf == NULL or q == NULL:
            free(buf)
            free(q)
            raise MemoryError()
        memcpy(pkt, <const char*>packet, n)
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.shared.lock)
                egress_one(self.shared, pkt, n, reply, &v)
                if v.action == ACT_SEND:
                    encap(self.shared, q, 0, pkt, v.length, v.route)
                pthread_rwlock_unlock(&self.shared.lock)
            if v.action == ACT_SEND:
                return (v.action, (<char*>q.iov[0].iov_base)[:q.iov[0].iov_len],
                        format_ipv4(ntohl(q.addrs[0].sin_addr.s_addr)), 0, q.sender[0])
            if v.action == ACT_REPLY:
                return (v.action, (<char*>reply)[:v.length], "", v.drop, 0)
            return (v.action, b"", "", v.drop, 0)
        finally:
            free(buf)
            free(q)

    def process_ingress(self, bytes datagram) -> tuple:
        """Test hook: (action, data, "", drop or 0, 0) for a datagram received from a peer."""
        cdef size_t n = len(datagram)
        cdef uint8_t* buf = <uint8_t*>malloc(n + 1)
        cdef uint8_t* pkt
        cdef Verdict v
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, <const char*>datagram, n)
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.shared.lock)
                pkt = ingress_frame(self.shared, buf, n, &v)
                pthread_rwlock_unlock(&self.shared.lock)
            if v.action == ACT_TUN:
                return (v.action, (<char*>pkt)[:v.length], "", 0, 0)
            return (v.action, b"", "", v.drop, 0)
        finally:
            free(buf)
