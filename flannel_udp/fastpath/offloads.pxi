# Offloads: segmentation of TUN super-packets (mirror of packet.segment_tso) and coalescing of
# received TCP segments into GSO writes (mirror of packet.tun_writes). Part of _fastpath.pyx.

cdef int gso_plan(const uint8_t* vh, uint8_t* pkt, size_t length, GsoPlan* plan) noexcept nogil:
    """Check the virtio header ``vh`` of a validated packet and plan its split; D_BAD_GSO if it
    can't be honoured. A packet without GSO gets its partial checksum completed here, in place
    (plan.count 0). hdr_len comes from the headers, never from ``vh``. IPv6: TCPV6 or UDP_L4
    with the transport right behind the fixed header (extension headers are refused)."""
    cdef uint32_t gso_type = vh[VNET_GSO_TYPE_OFFSET] & ~GSO_ECN
    cdef size_t mss = rd_host16(vh + VNET_GSO_SIZE_OFFSET)
    cdef size_t csum_start = rd_host16(vh + VNET_CSUM_START_OFFSET)
    cdef size_t csum_at = csum_start + rd_host16(vh + VNET_CSUM_OFFSET_OFFSET)
    cdef bint v6 = (pkt[0] >> 4) == 6
    cdef size_t ip_hdr_len = l3_header_len(pkt)
    cdef uint32_t proto = l4_proto(pkt)
    cdef size_t l4_len
    plan.count = 0
    if gso_type == GSO_NONE:
        if vh[VNET_FLAGS_OFFSET] & VNET_F_NEEDS_CSUM:
            if csum_at + 2 > length:
                return D_BAD_GSO
            complete_csum(pkt, csum_start, length, csum_at)
        return D_NONE
    if mss == 0 or (not v6 and (rd16(pkt + IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK) != 0):
        return D_BAD_GSO
    if gso_type == (GSO_TCPV6 if v6 else GSO_TCPV4):
        if proto != PROTO_TCP or ip_hdr_len + TCP_HEADER_LEN > length:
            return D_BAD_GSO
        l4_len = <size_t>(pkt[ip_hdr_len + TCP_DOFF_OFFSET] >> 4) * 4
        if l4_len < TCP_HEADER_LEN or ip_hdr_len + l4_len > length:
            return D_BAD_GSO
    elif gso_type == GSO_UDP_L4:
        if proto != PROTO_UDP or ip_hdr_len + UDP_HEADER_LEN > length:
            return D_BAD_GSO
        l4_len = UDP_HEADER_LEN
    else:
        return D_BAD_GSO
    plan.gso_type = gso_type
    plan.ip_hdr_len = ip_hdr_len
    plan.hdr_len = ip_hdr_len + l4_len
    plan.payload = length - plan.hdr_len
    plan.mss = mss
    plan.count = <unsigned int>((plan.payload + mss - 1) // mss) if plan.payload else 1
    if plan.count > TSO_MAX_SEGS:
        plan.count = 0
        return D_BAD_GSO
    plan.seg_len = plan.hdr_len + (mss if plan.count > 1 else plan.payload)
    plan.last_len = plan.hdr_len + plan.payload - (plan.count - 1) * mss
    return D_NONE


cdef inline size_t gso_bytes(const GsoPlan* plan, size_t gap) noexcept nogil:
    """Room gso_write needs for the plan's segments, ``gap`` bytes in front of each."""
    return plan.count * (gap + plan.hdr_len) + plan.payload


cdef void gso_write(const GsoPlan* plan, const uint8_t* pkt, uint8_t* out,
                    size_t gap) noexcept nogil:
    """Write the planned segments to ``out``, each behind ``gap`` bytes: the headers copied with
    total length, IP id + i, header checksum (IPv6: the payload length), TCP seq advanced
    (FIN/PSH on the last segment only, CWR on the first only) or UDP length, and a complete L4
    checksum."""
    cdef size_t ihl = plan.ip_hdr_len
    cdef size_t off = plan.hdr_len
    cdef size_t seg_payload, total
    cdef bint v6 = (pkt[0] >> 4) == 6
    cdef uint32_t id0 = rd16(pkt + IPV4_ID_OFFSET)
    cdef uint32_t seq0 = 0
    cdef uint32_t flags = 0
    cdef uint32_t c
    cdef unsigned int i
    cdef uint8_t* seg = out
    cdef uint8_t* l4
    if plan.gso_type != GSO_UDP_L4:
        seq0 = rd32(pkt + ihl + TCP_SEQ_OFFSET)
        flags = pkt[ihl + TCP_FLAGS_OFFSET]
    for i in range(plan.count):
        seg += gap
        seg_payload = plan.mss if i + 1 < plan.count else plan.hdr_len + plan.payload - off
        total = plan.hdr_len + seg_payload
        memcpy(seg, pkt, plan.hdr_len)
        memcpy(seg + plan.hdr_len, pkt + off, seg_payload)
        off += seg_payload
        if v6:
            wr16(seg + IPV6_PAYLOAD_LEN_OFFSET, <uint32_t>(total - IPV6_HEADER_LEN))
        else:
            wr16(seg + IPV4_TOTAL_LEN_OFFSET, <uint32_t>total)
            wr16(seg + IPV4_ID_OFFSET, (id0 + i) & 0xFFFF)
            wr16(seg + IPV4_CSUM_OFFSET, 0)
            wr16(seg + IPV4_CSUM_OFFSET, inet_checksum(seg, ihl))
        l4 = seg + ihl
        if plan.gso_type != GSO_UDP_L4:
            wr32(l4 + TCP_SEQ_OFFSET, seq0 + <uint32_t>(i * plan.mss))
            l4[TCP_FLAGS_OFFSET] = <uint8_t>(
                flags & (0xFF if i + 1 == plan.count else ~(TCP_FIN | TCP_PSH))
                & (0xFF if i == 0 else ~TCP_CWR))
            wr16(l4 + TCP_CSUM_OFFSET, 0)
            wr16(l4 + TCP_CSUM_OFFSET, ~fold16(<uint64_t>pseudo_sum_any(seg, PROTO_TCP, total - ihl)
                                               + fu_sum16(l4, total - ihl)) & 0xFFFF)
        else:
            wr16(l4 + UDP_LEN_OFFSET, <uint32_t>(total - ihl))
            wr16(l4 + UDP_CSUM_OFFSET, 0)
            c = ~fold16(<uint64_t>pseudo_sum_any(seg, PROTO_UDP, total - ihl)
                        + fu_sum16(l4, total - ihl)) & 0xFFFF
            wr16(l4 + UDP_CSUM_OFFSET, c if c else 0xFFFF)   # 0 would mean "no checksum"
        seg += total


cdef size_t tcp_candidate(const uint8_t* p, size_t n, bint partial) noexcept nogil:
    """IP + TCP header length if the validated packet ``p`` (IP length ``n``) may join a
    coalesced run, else 0: IPv4 without options, no fragment, TCP with payload, flags ACK or
    ACK|PSH, IP and TCP checksums right (the merged packet gets fresh ones: a bad segment must
    not be laundered into a good one). A ``partial`` TCP checksum (partial_csum_at) has nothing
    to verify: the merged one is completed from the data as the lone one would be. IPv6: TCP
    right behind the fixed header, no IP checksum to check."""
    cdef const uint8_t* tcp = p + IPV4_HEADER_LEN    # if it qualifies: no IP options
    cdef size_t tcp_len
    if (p[0] >> 4) == 6:
        return tcp_candidate6(p, n, partial)
    if n < IPV4_HEADER_LEN + TCP_HEADER_LEN or p[IPV4_VER_IHL_OFFSET] != IPV4_VER_IHL_NO_OPTIONS \
            or p[IPV4_PROTO_OFFSET] != PROTO_TCP \
            or (rd16(p + IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK) != 0:
        return 0
    tcp_len = <size_t>(tcp[TCP_DOFF_OFFSET] >> 4) * 4
    if tcp_len < TCP_HEADER_LEN or IPV4_HEADER_LEN + tcp_len >= n:
        return 0
    if tcp[TCP_FLAGS_OFFSET] != TCP_ACK and tcp[TCP_FLAGS_OFFSET] != (TCP_ACK | TCP_PSH):
        return 0
    if inet_checksum(p, IPV4_HEADER_LEN) != 0:
        return 0
    if not partial and fold16(<uint64_t>pseudo_sum(p, PROTO_TCP, n - IPV4_HEADER_LEN)
                              + fu_sum16(tcp, n - IPV4_HEADER_LEN)) != 0xFFFF:
        return 0
    return IPV4_HEADER_LEN + tcp_len


cdef size_t tcp_candidate6(const uint8_t* p, size_t n, bint partial) noexcept nogil:
    """tcp_candidate for an IPv6 packet."""
    cdef const uint8_t* tcp = p + IPV6_HEADER_LEN
    cdef size_t tcp_len
    if n < IPV6_HEADER_LEN + TCP_HEADER_LEN or p[IPV6_NEXT_HEADER_OFFSET] != PROTO_TCP:
        return 0
    tcp_len = <size_t>(tcp[TCP_DOFF_OFFSET] >> 4) * 4
    if tcp_len < TCP_HEADER_LEN or IPV6_HEADER_LEN + tcp_len >= n:
        return 0
    if tcp[TCP_FLAGS_OFFSET] != TCP_ACK and tcp[TCP_FLAGS_OFFSET] != (TCP_ACK | TCP_PSH):
        return 0
    if not partial and fold16(<uint64_t>pseudo_sum6(p, PROTO_TCP, n - IPV6_HEADER_LEN)
                              + fu_sum16(tcp, n - IPV6_HEADER_LEN)) != 0xFFFF:
        return 0
    return IPV6_HEADER_LEN + tcp_len


cdef bint run_accepts(const Coalescer* c, const uint8_t* p, size_t n,
                      size_t hdr_len) noexcept nogil:
    """Whether candidate ``p`` continues the open run: same TOS, IP flags, TTL, addresses,
    ports, ACK, window, options (IPv6: traffic class and flow label, next header and hop limit,
    addresses, ports...); the next sequence number; no more payload than the first."""
    cdef const uint8_t* h = c.head
    cdef size_t l3 = c.l3
    cdef const uint8_t* tcp = p + l3    # candidates have no IP options
    cdef const uint8_t* h_tcp
    if h == NULL or c.closed or hdr_len != c.hdr_len or (p[0] >> 4) != (h[0] >> 4):
        return False
    if n - hdr_len > c.seg_payload or c.length + (n - hdr_len) > 0xFFFF:
        return False
    if rd32(tcp + TCP_SEQ_OFFSET) != c.next_seq:
        return False
    h_tcp = h + l3
    if l3 == IPV6_HEADER_LEN:
        if memcmp(p, h, IPV6_PAYLOAD_LEN_OFFSET) != 0 \
                or memcmp(p + IPV6_NEXT_HEADER_OFFSET, h + IPV6_NEXT_HEADER_OFFSET,
                          2 + 2 * IPV6_ADDR_LEN + L4_PORTS_LEN) != 0:
            return False
    # TOS; flags and fragment offset, TTL, protocol; the addresses and (no options) the ports.
    elif p[IPV4_TOS_OFFSET] != h[IPV4_TOS_OFFSET] \
            or memcmp(p + IPV4_FLAGS_OFFSET, h + IPV4_FLAGS_OFFSET,
                      IPV4_CSUM_OFFSET - IPV4_FLAGS_OFFSET) != 0 \
            or memcmp(p + IPV4_SRC_OFFSET, h + IPV4_SRC_OFFSET,
                      2 * IPV4_ADDR_LEN + L4_PORTS_LEN) != 0:
        return False
    # The ACK number and the data offset; the flags but PSH.
    if memcmp(tcp + TCP_ACK_SEQ_OFFSET, h_tcp + TCP_ACK_SEQ_OFFSET,
              TCP_FLAGS_OFFSET - TCP_ACK_SEQ_OFFSET) != 0 \
            or (tcp[TCP_FLAGS_OFFSET] & ~TCP_PSH) != h_tcp[TCP_FLAGS_OFFSET]:
        return False
    # The window; the options.
    return memcmp(tcp + TCP_WINDOW_OFFSET, h_tcp + TCP_WINDOW_OFFSET, 2) == 0 and \
        memcmp(tcp + TCP_OPTIONS_OFFSET, h_tcp + TCP_OPTIONS_OFFSET,
               hdr_len - l3 - TCP_OPTIONS_OFFSET) == 0


cdef bint co_emit(Coalescer* c, uint8_t* frame, size_t n) noexcept nogil:
    if c.tun_fd >= 0:
        return write(c.tun_fd, frame, n) == <ssize_t>n
    memcpy(c.capture + c.capture_used, &n, 4)
    memcpy(c.capture + c.capture_used + 4, frame, n)
    c.capture_used += 4 + n
    return True


cdef void co_count(Coalescer* c, bint written, unsigned int packets, size_t nbytes,
                   RouteEntry* route) noexcept nogil:
    if not written:
        c.counters.drops[D_TUN_WRITE_ERROR] += packets
        return
    c.counters.packets += packets
    c.counters.bytes += nbytes
    if route != NULL:
        fu_add_relaxed64(&route.rx_packets, packets)
        fu_add_relaxed64(&route.rx_bytes, nbytes)


cdef void co_write_plain(Coalescer* c, uint8_t* pkt, size_t n, RouteEntry* route,
                         size_t csum_at) noexcept nogil:
    """One packet as it is, behind a virtio header written into the bytes before pkt (which
    belong to packets already written): zeroed, or with a partial checksum at ``csum_at``
    NEEDS_CSUM, for the kernel to complete (or to pass on as partial, as it does its own)."""
    cdef uint8_t* vh = pkt - VNET_HDR_LEN
    cdef size_t ihl
    if c.vnet:
        memset(vh, 0, VNET_HDR_LEN)
        if csum_at:
            ihl = l3_header_len(pkt)
            vh[VNET_FLAGS_OFFSET] = VNET_F_NEEDS_CSUM
            wr_host16(vh + VNET_HDR_LEN_OFFSET, <uint32_t>(csum_at + 2))
            wr_host16(vh + VNET_CSUM_START_OFFSET, <uint32_t>ihl)
            wr_host16(vh + VNET_CSUM_OFFSET_OFFSET, <uint32_t>(csum_at - ihl))
        co_count(c, co_emit(c, pkt - VNET_HDR_LEN, n + VNET_HDR_LEN), 1, n, route)
    else:
        co_count(c, co_emit(c, pkt, n), 1, n, route)


cdef void co_flush(Coalescer* c) noexcept nogil:
    """Write the open run: a lone segment as it came, several as one GSO super-packet whose TCP
    checksum field holds the pseudo-header sum (NEEDS_CSUM: the kernel completes it)."""
    cdef uint8_t* h = c.head
    cdef uint8_t* vh
    if h == NULL:
        return
    c.head = NULL
    if c.count == 1:
        co_write_plain(c, h, c.length, c.route, c.head_csum_at)
        return
    vh = h - VNET_HDR_LEN
    if c.l3 == IPV6_HEADER_LEN:
        wr16(h + IPV6_PAYLOAD_LEN_OFFSET, <uint32_t>(c.length - IPV6_HEADER_LEN))
        wr16(h + IPV6_HEADER_LEN + TCP_CSUM_OFFSET,
             pseudo_sum6(h, PROTO_TCP, c.length - IPV6_HEADER_LEN))
        vh[VNET_GSO_TYPE_OFFSET] = GSO_TCPV6
    else:
        wr16(h + IPV4_TOTAL_LEN_OFFSET, <uint32_t>c.length)
        wr16(h + IPV4_CSUM_OFFSET, 0)
        wr16(h + IPV4_CSUM_OFFSET, inet_checksum(h, IPV4_HEADER_LEN))
        wr16(h + IPV4_HEADER_LEN + TCP_CSUM_OFFSET,
             pseudo_sum(h, PROTO_TCP, c.length - IPV4_HEADER_LEN))
        vh[VNET_GSO_TYPE_OFFSET] = GSO_TCPV4
    vh[VNET_FLAGS_OFFSET] = VNET_F_NEEDS_CSUM
    wr_host16(vh + VNET_HDR_LEN_OFFSET, <uint32_t>c.hdr_len)
    wr_host16(vh + VNET_GSO_SIZE_OFFSET, <uint32_t>c.seg_payload)
    wr_host16(vh + VNET_CSUM_START_OFFSET, <uint32_t>c.l3)
    wr_host16(vh + VNET_CSUM_OFFSET_OFFSET, TCP_CSUM_OFFSET)
    c.counters.offloaded += 1
    co_count(c, co_emit(c, vh, c.length + VNET_HDR_LEN), c.count, c.inner_bytes, c.route)


cdef size_t super_segment(const Coalescer* c, const uint8_t* pkt, size_t n, size_t csum_at,
                          size_t gro_size) noexcept nogil:
    """The payload per segment if a packet with a partial checksum is a sender's unsplit
    super-packet (a veth hands GSO frames on whole), else 0: TCP longer than the TUN's MTU (cut
    to fit it: the sender's own MSS is not passed on), or UDP with more payload than the
    segment size its datagram came with (UDP_GRO's; UDP segments must keep their bounds). IPv4
    or IPv6 (partial_csum_at6 marks only TCP/UDP right behind the fixed header)."""
    cdef size_t ihl = l3_header_len(pkt)
    cdef size_t l4_len
    if l4_proto(pkt) == PROTO_UDP:
        return gro_size if gro_size and n - ihl - UDP_HEADER_LEN > gro_size else 0
    if c.mtu == 0 or n <= c.mtu:
        return 0
    l4_len = <size_t>(pkt[ihl + TCP_DOFF_OFFSET] >> 4) * 4
    return c.mtu - ihl - l4_len if ihl + l4_len < c.mtu else 1


cdef void co_write_super(Coalescer* c, uint8_t* pkt, size_t n, RouteEntry* route,
                         size_t csum_at, size_t mss) noexcept nogil:
    """Write a super-packet (partial checksum at ``csum_at``) as segments of ``mss`` payload:
    TCP to a virtio-header TUN whole behind a GSO header (TCPV4, TCPV6: the kernel splits it,
    or passes it on whole as its own VXLAN receiver does); else split here with complete
    checksums, one write per segment. One that can't be split within TSO_MAX_SEGS is dropped as
    bad_gso."""
    cdef uint8_t vh[VNET_HDR_LEN]
    cdef GsoPlan plan
    cdef size_t ihl = l3_header_len(pkt)
    cdef bint tcp = l4_proto(pkt) == PROTO_TCP
    cdef size_t gap = VNET_HDR_LEN if c.vnet else 0
    cdef size_t off, seg_len
    cdef unsigned int i, written = 0
    cdef uint8_t* seg
    memset(vh, 0, VNET_HDR_LEN)
    vh[VNET_FLAGS_OFFSET] = VNET_F_NEEDS_CSUM
    if not tcp:
        vh[VNET_GSO_TYPE_OFFSET] = GSO_UDP_L4
    elif (pkt[0] >> 4) == 6:
        vh[VNET_GSO_TYPE_OFFSET] = GSO_TCPV6
    else:
        vh[VNET_GSO_TYPE_OFFSET] = GSO_TCPV4
    wr_host16(vh + VNET_GSO_SIZE_OFFSET, <uint32_t>mss)
    wr_host16(vh + VNET_CSUM_START_OFFSET, <uint32_t>ihl)
    wr_host16(vh + VNET_CSUM_OFFSET_OFFSET, <uint32_t>(csum_at - ihl))
    if mss > 0xFFFF or gso_plan(vh, pkt, n, &plan) != D_NONE or plan.count == 0 \
            or gso_bytes(&plan, gap) > ING_ARENA:
        c.counters.drops[D_BAD_GSO] += 1
        return
    wr_host16(vh + VNET_HDR_LEN_OFFSET, <uint32_t>plan.hdr_len)
    if c.vnet and tcp:
        memcpy(pkt - VNET_HDR_LEN, vh, VNET_HDR_LEN)
        # Counted as the segments it stands for, as when split here.
        co_count(c, co_emit(c, pkt - VNET_HDR_LEN, n + VNET_HDR_LEN), plan.count,
                 gso_bytes(&plan, 0), route)
        return
    gso_write(&plan, pkt, c.arena, gap)
    seg = c.arena
    off = 0
    for i in range(plan.count):
        seg_len = plan.seg_len if i + 1 < plan.count else plan.last_len
        memset(seg, 0, gap)
        if co_emit(c, seg, gap + seg_len):
            written += 1
            off += seg_len
        seg += gap + seg_len
    co_count(c, True, written, off, route)
    if written < plan.count:
        c.counters.drops[D_TUN_WRITE_ERROR] += plan.count - written


cdef void co_add(Coalescer* c, uint8_t* pkt, size_t n, RouteEntry* route, size_t csum_at,
                 size_t gro_size) noexcept nogil:
    """Take the next validated packet of the buffer: join the open run, or flush it and write
    the packet (or open a run with it). Packets must come in buffer order. ``csum_at``: where
    its partial checksum is (0: none); such a packet is counted, and goes to a virtio-header
    TUN behind NEEDS_CSUM (the kernel completes it), to a plain one completed here. A partial
    super-packet is split (super_segment; ``gro_size``: its datagram's UDP_GRO size, or 0)."""
    cdef size_t hdr_len
    cdef size_t payload, mss
    cdef uint8_t flags
    if csum_at:
        c.counters.csum_completed += 1
        mss = super_segment(c, pkt, n, csum_at, gro_size)
        if mss:
            co_flush(c)
            co_write_super(c, pkt, n, route, csum_at, mss)
            return
        if not c.vnet:
            complete_csum(pkt, l3_header_len(pkt), n, csum_at)
            csum_at = 0
    hdr_len = tcp_candidate(pkt, n, csum_at != 0) if c.vnet else 0
    if hdr_len and run_accepts(c, pkt, n, hdr_len):
        payload = n - hdr_len
        # Before the move, which may overwrite pkt's own headers (no IP options: a candidate).
        flags = pkt[c.l3 + TCP_FLAGS_OFFSET]
        memmove(c.head + c.length, pkt + hdr_len, payload)
        c.length += payload
        c.inner_bytes += n
        c.count += 1
        c.next_seq += <uint32_t>payload
        if flags & TCP_PSH:
            c.head[c.l3 + TCP_FLAGS_OFFSET] |= TCP_PSH
            c.closed = 1
        if payload < c.seg_payload:
            c.closed = 1
        return
    co_flush(c)
    if not hdr_len:
        co_write_plain(c, pkt, n, route, csum_at)
        return
    c.head = pkt
    c.length = n
    c.hdr_len = hdr_len
    c.seg_payload = n - hdr_len
    c.inner_bytes = n
    c.l3 = l3_header_len(pkt)
    c.next_seq = rd32(pkt + c.l3 + TCP_SEQ_OFFSET) + <uint32_t>(n - hdr_len)
    c.count = 1
    c.closed = (pkt[c.l3 + TCP_FLAGS_OFFSET] & TCP_PSH) != 0
    c.route = route
    c.head_csum_at = csum_at
