# Sending: a round's messages go out with one sendmmsg per send socket, GSO runs behind a
# UDP_SEGMENT cmsg (one datagram at a time when the kernel refuses one), each datagram counted
# once, sent or dropped; egress_offloaded makes a super-packet's segments into messages,
# sending the round early when it is full. Part of _fastpath.pyx (included).

cdef void count_sent(EgressState* q, unsigned int p, unsigned int segs,
                     size_t inner_len) noexcept nogil:
    q.counters.packets += segs
    q.counters.bytes += inner_len
    fu_add_relaxed64(&q.routes[p].tx_packets, segs)
    fu_add_relaxed64(&q.routes[p].tx_bytes, inner_len)


cdef void count_failed(EgressState* q, int err, unsigned int segs) noexcept nogil:
    q.counters.drops[D_TOO_BIG if err == EMSGSIZE else D_SEND_ERROR] += segs


cdef int send_one(Shared* s, int fd, msghdr* m) noexcept nogil:
    """sendmsg, retried on EINTR and, on a full nonblocking socket, once there is room; 0 or
    the errno."""
    while True:
        if sendmsg(fd, m, 0) >= 0:
            return 0
        if errno == EINTR:
            continue
        # The caller may hand over a nonblocking socket (asyncio's are): wait for room rather
        # than drop a whole batch on a momentarily full send buffer.
        if errno == EAGAIN and wait_ready(fd, POLLOUT, s.stop_fd) == 1:
            continue
        return errno


cdef void send_datagrams(Shared* s, EgressState* q, int fd, unsigned int j) noexcept nogil:
    """Send msgs[j], a UDP_SEGMENT run the kernel refused, one datagram at a time."""
    cdef unsigned int p = q.order[j]
    cdef msghdr m = q.msgs[j].msg_hdr
    cdef iovec one
    cdef uint8_t* base = <uint8_t*>q.iov[p].iov_base
    cdef size_t left = q.iov[p].iov_len
    cdef size_t stride = q.gso_size[p]
    cdef size_t gap = encap_len(s)
    cdef int err
    m.msg_control = NULL
    m.msg_controllen = 0
    m.msg_iov = &one
    m.msg_iovlen = 1
    while left:
        one.iov_base = base
        one.iov_len = stride if left > stride else left
        err = send_one(s, fd, &m)
        if err:
            count_failed(q, err, 1)
        else:
            count_sent(q, p, 1, one.iov_len - gap)
        base += one.iov_len
        left -= one.iov_len


cdef void send_run(Shared* s, EgressState* q, int fd, unsigned int start,
                   unsigned int end) noexcept nogil:
    """sendmmsg msgs[start:end] through ``fd``, counting each datagram once: sent or dropped."""
    cdef unsigned int off = start
    cdef unsigned int j, p
    cdef int r, err
    while off < end:
        r = sendmmsg(fd, &q.msgs[off], end - off, 0)
        if r > 0:
            for j in range(off, off + <unsigned int>r):
                p = q.order[j]
                count_sent(q, p, q.segs[p], q.sent_lens[p])
            off += <unsigned int>r
            # A short count means message ``off`` failed and its errno was lost: the next call
            # starts with it and reports the error.
            continue
        if r < 0 and errno == EINTR:
            continue
        if r < 0 and errno == EAGAIN and wait_ready(fd, POLLOUT, s.stop_fd) == 1:
            continue
        err = errno if r < 0 else EIO
        p = q.order[off]
        if q.gso_size[p] and (err == EIO or err == EINVAL or err == EMSGSIZE):
            # EIO: this socket or route can't do UDP GSO (UDP-Lite, IPsec; before Linux 6.11
            # also a device without checksum offload). EINVAL (older kernels) or EMSGSIZE
            # (newer ones): a segment is above the path's MTU, which fragmentation handles for
            # single datagrams. Either way this run's datagrams go singly; after EIO no later
            # run tries again (a path's MTU concerns one peer only).
            if err == EIO:
                fu_store_relaxed(&s.udp_gso, 0)
            q.counters.gso_fallbacks += 1
            send_datagrams(s, q, fd, off)
        else:
            count_failed(q, err, q.segs[p])
        off += 1


cdef void send_batch(Shared* s, EgressState* q, unsigned int count) noexcept nogil:
    """Send the round's ``count`` messages: one sendmmsg run per sender socket."""
    cdef unsigned int i, j, sender
    cdef unsigned int start = 0
    cdef unsigned int* run_end = q.run_end
    cdef unsigned int n_all = s.n_senders + s.n6_senders
    cdef cmsghdr* cm
    # Counting sort by sender, stable: a flow has one sender, so it keeps its order.
    memset(run_end, 0, n_all * sizeof(unsigned int))
    for i in range(count):
        run_end[q.sender[i]] += 1
    for sender in range(n_all):
        j = run_end[sender]
        run_end[sender] = start     # where this sender's run begins, advanced while placing
        start += j
    for i in range(count):
        j = run_end[q.sender[i]]
        run_end[q.sender[i]] = j + 1
        q.order[j] = i
        if q.fam6[i]:
            q.msgs[j].msg_hdr.msg_name = &q.addrs6[i]
            q.msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        else:
            q.msgs[j].msg_hdr.msg_name = &q.addrs[i]
            q.msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        q.msgs[j].msg_hdr.msg_iov = &q.iov[i]
        q.msgs[j].msg_hdr.msg_iovlen = 1
        q.msgs[j].msg_hdr.msg_control = NULL
        q.msgs[j].msg_hdr.msg_controllen = 0
        q.msgs[j].msg_hdr.msg_flags = 0
        if q.gso_size[i]:
            q.msgs[j].msg_hdr.msg_control = &q.ctrl[i * CTRL_WORDS]
            q.msgs[j].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            cm = CMSG_FIRSTHDR(&q.msgs[j].msg_hdr)
            cm.cmsg_level = SOL_UDP
            cm.cmsg_type = UDP_SEGMENT
            cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            memcpy(CMSG_DATA(cm), &q.gso_size[i], sizeof(uint16_t))
    start = 0
    for sender in range(n_all):     # run_end[sender] is now where the run ends
        if run_end[sender] > start:
            send_run(s, q, s.send_fds[sender], start, run_end[sender])
        start = run_end[sender]


cdef unsigned int egress_offloaded(Shared* s, EgressState* q, unsigned int k, uint8_t* pkt,
                                   size_t length, RouteEntry* e) noexcept nogil:
    """Message(s) for a routed packet read behind a virtio header: split (a super-packet) or
    with its checksum completed. Returns the next free message index; may send the round so
    far to make room."""
    cdef GsoPlan plan
    cdef size_t need
    cdef uint32_t flow = flow_of(s, pkt, length)
    cdef int drop = gso_plan(pkt - VNET_HDR_LEN, pkt, length, &plan)
    if drop != D_NONE:
        q.counters.drops[drop] += 1
        return k
    if plan.count == 0:
        encap(s, q, k, pkt, length, e, flow)
        return k + 1
    need = gso_bytes(&plan, encap_len(s))
    if q.arena_used + need > ARENA_SIZE or k + plan.count > MSG_MAX:
        if k:
            send_batch(s, q, k)
        k = 0
        q.arena_used = 0
    gso_write(&plan, pkt, q.arena + q.arena_used, encap_len(s))
    k = encap_segments(s, q, k, q.arena + q.arena_used + encap_len(s), &plan, e, flow)
    q.arena_used += need
    q.counters.offloaded += 1
    return k
