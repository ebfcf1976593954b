# One batch each way, what a thread does once its fd is ready: egress reads packets from the TUN,
# decides, encapsulates and sends them (ICMP errors rate-limited back into the TUN); ingress
# reads datagrams (UDP_GRO groups split), decapsulates, checks and writes them to the TUN through
# the Coalescer. Part of _fastpath.pyx (included).

cdef inline bint tun_write(const Shared* s, int fd, uint8_t* pkt, size_t n) noexcept nogil:
    """Write one packet to the TUN; with a virtio header, a zeroed one in the VNET_HDR_LEN
    bytes before ``pkt``."""
    if s.vnet:
        memset(pkt - VNET_HDR_LEN, 0, VNET_HDR_LEN)
        return write(fd, pkt - VNET_HDR_LEN, n + VNET_HDR_LEN) == <ssize_t>(n + VNET_HDR_LEN)
    return write(fd, pkt, n) == <ssize_t>n


cdef inline uint64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef bint icmp_allowed(EgressState* q) noexcept nogil:
    """Take a token from the ICMP bucket if there is one (refilled at ICMP_RATE per second up
    to ICMP_BURST): a peer's or a pod's flood to unleased addresses can't make us flood back."""
    cdef uint64_t now = monotonic_ns()
    if q.icmp_stamp == 0:
        q.icmp_tokens = ICMP_BURST
    else:
        q.icmp_tokens += (now - q.icmp_stamp) * (ICMP_RATE / 1e9)
        if q.icmp_tokens > ICMP_BURST:
            q.icmp_tokens = ICMP_BURST
    q.icmp_stamp = now
    if q.icmp_tokens < 1.0:
        return False
    q.icmp_tokens -= 1.0
    return True


cdef int egress_batch(Queue* qu) noexcept nogil:
    """Read up to BATCH packets from the TUN and forward them; -1 on a TUN read error."""
    cdef Shared* s = qu.shared
    cdef EgressState* q = &qu.eg
    cdef unsigned int n_read = 0
    cdef unsigned int i
    cdef unsigned int k = 0
    cdef size_t vnet_len = VNET_HDR_LEN if s.vnet else 0
    cdef ssize_t r
    cdef int failed = 0
    cdef uint8_t* pkt
    cdef Verdict v
    cdef uint32_t every = fu_load_relaxed(&s.trace_every)
    while n_read < BATCH:
        # The virtio header (if any) lands in the headroom, the packet HEADROOM bytes in.
        r = read(qu.tun_fd, q.bufs + <size_t>n_read * EGRESS_SLOT + HEADROOM - vnet_len,
                 BUF_SIZE + vnet_len)
        if r < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                failed = 1
            break
        if r == 0:
            break
        if <size_t>r < vnet_len:
            q.counters.drops[D_SHORT] += 1
            continue
        q.lens[n_read] = <size_t>r - vnet_len
        n_read += 1
    if n_read == 0:
        return -1 if failed else 0
    # The read lock spans the sends: the batch holds pointers into the table for its counters.
    pthread_rwlock_rdlock(&s.lock)
    q.arena_used = 0
    for i in range(n_read):
        pkt = q.bufs + <size_t>i * EGRESS_SLOT + HEADROOM
        egress_one(s, pkt, q.lens[i], q.reply + VNET_HDR_LEN, &v)
        if every:
            trace_record(&qu.eg_trace, every, 0, pkt, q.lens[i], &v, v.peer, NULL)
        if v.action == ACT_SEND:
            if s.vnet:
                k = egress_offloaded(s, q, k, pkt, v.length, v.route)
            else:
                encap(s, q, k, pkt, v.length, v.route, flow_of(s, pkt, v.length))
                k += 1
        elif v.action == ACT_REPLY:
            q.counters.drops[v.drop] += 1   # no_route, or too_big (ICMPv6)
            if not icmp_allowed(q):
                q.counters.icmp_suppressed += 1
            elif tun_write(s, qu.tun_fd, q.reply + VNET_HDR_LEN, v.length):
                q.counters.icmp_sent += 1
            else:
                q.counters.drops[D_TUN_WRITE_ERROR] += 1
        else:
            q.counters.drops[v.drop] += 1
    if k:
        send_batch(s, q, k)
    pthread_rwlock_unlock(&s.lock)
    return <int>n_read


cdef size_t gro_size(msghdr* m) noexcept nogil:
    """The UDP_GRO segment size of a received message; 0 if it holds one datagram."""
    cdef cmsghdr* cm
    cdef int size = 0
    if m.msg_controllen == 0:
        return 0
    cm = CMSG_FIRSTHDR(m)
    while cm != NULL:
        if cm.cmsg_level == SOL_UDP and cm.cmsg_type == UDP_GRO:
            memcpy(&size, CMSG_DATA(cm), sizeof(int))
            return <size_t>size if size > 0 else 0
        cm = CMSG_NXTHDR(m, cm)
    return 0


cdef bint tunnel_gso(const uint8_t* datagram, size_t n, size_t size) noexcept nogil:
    """Whether a UDP_GRO read of ``n`` bytes with segment ``size`` is not datagrams of that size
    but one VXLAN frame whose inner IPv4 packet takes all of it: a kernel sender's GSO frame
    (an inner UDP super-packet) that a veth handed on whole, ``size`` its inner segment size."""
    cdef const uint8_t* inner = datagram + VXLAN_ENCAP_LEN
    if n <= size or size <= VXLAN_ENCAP_LEN or n < VXLAN_ENCAP_LEN + IPV4_HEADER_LEN:
        return False
    return (inner[IPV4_VER_IHL_OFFSET] >> 4) == 4 and \
        rd16(inner + IPV4_TOTAL_LEN_OFFSET) == n - VXLAN_ENCAP_LEN


cdef int ingress_batch(Queue* qu, bint drain) noexcept nogil:
    """Move the UDP sockets' datagrams (IPv4's, then IPv6's if there is one) into the TUN, a
    batch at a time until a socket is empty if ``drain``, else one batch each; the datagrams
    read, -1 on a socket error."""
    cdef int n = ingress_socket(qu, qu.udp_fd, False, drain)
    cdef int n6
    if qu.udp6_fd < 0 or n < 0:
        return n
    n6 = ingress_socket(qu, qu.udp6_fd, True, drain)
    return -1 if n6 < 0 else n + n6


cdef int ingress_socket(Queue* qu, int fd, bint v6, bint drain) noexcept nogil:
    """ingress_batch for one socket, ``v6`` if it is the IPv6 one."""
    cdef Shared* s = qu.shared
    cdef IngressState* q = &qu.ig
    cdef int r, i
    cdef int total = 0
    cdef uint8_t* base
    cdef uint8_t* pkt
    cdef size_t n, off, size, step, inner_gso
    cdef uint32_t sender = 0
    cdef const uint8_t* sender6 = NULL
    cdef Verdict v
    cdef uint32_t every
    while True:
        every = fu_load_relaxed(&s.trace_every)
        if s.udp_gro:
            for i in range(BATCH):  # the kernel shrinks it to what it wrote
                q.msgs[i].msg_hdr.msg_controllen = CTRL_WORDS * sizeof(uint64_t)
        if v6:
            for i in range(BATCH):  # an IPv4 read may have shrunk it to a sockaddr_in's
                q.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        r = recvmmsg(fd, q.msgs, BATCH, MSG_DONTWAIT, NULL)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return total
            return -1
        total += r
        pthread_rwlock_rdlock(&s.lock)
        for i in range(r):
            # Buffers are larger than any UDP payload, so MSG_TRUNC cannot happen.
            base = q.bufs + <size_t>i * ING_SLOT + ING_HEADROOM
            n = q.msgs[i].msg_len
            size = gro_size(&q.msgs[i].msg_hdr) if s.udp_gro else 0
            inner_gso = 0
            if size and s.mode == MODE_VXLAN and tunnel_gso(base, n, size):
                inner_gso = size    # one VXLAN frame around an inner UDP super-packet
                size = n
            if size == 0:
                size = n
            # A GRO read holds datagrams of one flow: one sender.
            if v6:
                sender6 = q.names[i].sin6_addr.s6_addr
            else:
                sender = ntohl((<sockaddr_in*>&q.names[i]).sin_addr.s_addr)
            off = 0
            while True:
                # A GRO read holds datagrams of ``size`` bytes, the last one possibly shorter.
                step = n - off if n - off < size else size
                pkt = ingress_frame(s, base + off, step, sender, sender6, &v)
                if every:
                    trace_record(&qu.ig_trace, every, 1, pkt,
                                 v.length if v.action == ACT_TUN else step, &v, sender,
                                 sender6)
                if v.action != ACT_TUN:
                    q.counters.drops[v.drop] += 1
                else:
                    co_add(&q.co, pkt, v.length, v.route, v.csum_at, inner_gso)
                off += step
                if off >= n:
                    break
            co_flush(&q.co)     # runs never span buffers: they are coalesced in place
        pthread_rwlock_unlock(&s.lock)
        if r < BATCH or not drain:
            return total
