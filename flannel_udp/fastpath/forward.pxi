# The per-packet verdicts (mirror of packet.egress / packet.ingress): what becomes of a packet
# read from the TUN, and of one decapsulated from a peer. Part of _fastpath.pyx (included).

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
    if s.v6 and is_ipv6(pkt, n):
        egress6_one(s, pkt, n, reply, v)
        return
    v.drop = ip_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    if s.mode == MODE_UDP and pkt[IPV4_TTL_OFFSET] <= 1:
        v.action = ACT_DROP
        v.drop = D_TTL_EXPIRED
        return
    e = rt_find(&s.table, rd32(pkt + IPV4_DST_OFFSET) & s.mask)
    if e != NULL:
        if s.mode == MODE_UDP:
            ttl_decrement(pkt)
        v.action = ACT_SEND
        v.length = total_len
        v.peer = e.peer
        v.route = e
        return
    v.drop = D_NO_ROUTE
    if pkt[IPV4_PROTO_OFFSET] == PROTO_ICMP \
            or (rd16(pkt + IPV4_FLAGS_OFFSET) & IPV4_FRAG_OFFSET_MASK) != 0:
        v.action = ACT_DROP
        return
    v.action = ACT_REPLY
    v.length = build_net_unreachable(reply, pkt, total_len, s.tun_addr)


cdef void egress6_one(Shared* s, uint8_t* pkt, size_t n, uint8_t* reply,
                      Verdict* v) noexcept nogil:
    """egress_one for an IPv6 packet: the hop limit as the TTL (UDP mode only), the lookup in
    the IPv6 table; ICMPv6 destination unreachable (no route) for a packet with no route, and
    packet too big for one longer than path_mtu6 (as the kernel's VXLAN does), if answerable.
    Both are checked on the packet as received, before the hop limit changes."""
    cdef size_t total_len = 0
    cdef RouteEntry6* e
    cdef uint64_t hi, lo
    v.drop = ip6_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    if s.mode == MODE_UDP and pkt[IPV6_HOP_LIMIT_OFFSET] <= 1:
        v.action = ACT_DROP
        v.drop = D_TTL_EXPIRED
        return
    mask6(pkt + IPV6_DST_OFFSET, s, &hi, &lo)
    e = rt6_find(&s.table6, hi, lo)
    if e == NULL:
        v.drop = D_NO_ROUTE
        if not icmp6_answerable(pkt, total_len, False):
            v.action = ACT_DROP
            return
        v.action = ACT_REPLY
        v.length = build_icmp6_error(reply, pkt, total_len, s.tun_addr6, ICMPV6_DEST_UNREACH, 0)
        return
    if s.path_mtu6 and egress_len6(s, pkt, total_len) > s.path_mtu6:
        v.drop = D_TOO_BIG
        if not icmp6_answerable(pkt, total_len, True):
            v.action = ACT_DROP
            return
        v.action = ACT_REPLY
        v.length = build_icmp6_error(reply, pkt, total_len, s.tun_addr6, ICMPV6_PACKET_TOO_BIG,
                                     s.path_mtu6)
        return
    if s.mode == MODE_UDP:
        pkt[IPV6_HOP_LIMIT_OFFSET] -= 1     # no header checksum to patch
    v.action = ACT_SEND
    v.length = total_len
    v.peer = e.base.peer
    v.route = &e.base


cdef inline bint sent_by(const RouteEntry* e, uint32_t sender,
                         const uint8_t* sender6) noexcept nogil:
    """Whether route ``e`` leads to the outer source: ``sender6`` (16 bytes) if not NULL,
    else the IPv4 ``sender``."""
    if sender6 != NULL:
        return e.underlay6 and memcmp((<const RouteEntry6*>e).peer6, sender6, 16) == 0
    return not e.underlay6 and e.peer == sender


cdef void ingress6_one(Shared* s, uint8_t* pkt, size_t n, uint32_t sender,
                       const uint8_t* sender6, Verdict* v) noexcept nogil:
    """ingress_one for an IPv6 packet."""
    cdef size_t total_len = 0
    cdef RouteEntry6* e
    cdef uint64_t hi, lo
    v.drop = ip6_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    mask6(pkt + IPV6_SRC_OFFSET, s, &hi, &lo)
    e = rt6_find(&s.table6, hi, lo)
    if s.source_check and (e == NULL or not sent_by(&e.base, sender, sender6)):
        v.action = ACT_DROP
        v.drop = D_SPOOFED_INNER_SOURCE
        return
    if s.mode == MODE_UDP:
        if pkt[IPV6_HOP_LIMIT_OFFSET] <= 1:
            v.action = ACT_DROP
            v.drop = D_TTL_EXPIRED
            return
        pkt[IPV6_HOP_LIMIT_OFFSET] -= 1
    else:
        v.csum_at = partial_csum_at6(pkt, total_len)
    v.action = ACT_TUN
    v.length = total_len
    v.route = &e.base if e != NULL else NULL


cdef void ingress_one(Shared* s, uint8_t* pkt, size_t n, uint32_t sender,
                      const uint8_t* sender6, Verdict* v) noexcept nogil:
    """Decide the fate of a decapsulated IPv4 packet from ``sender`` (the outer source, host
    order; or ``sender6``, 16 bytes, when it came over IPv6). Caller holds the route read
    lock."""
    cdef size_t total_len = 0
    cdef RouteEntry* e
    v.drop = ip_validate(pkt, n, &total_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return
    # The inner source must lie in a subnet leased to the sender (its tunnel address, the
    # subnet's network address, is inside too).
    e = rt_find(&s.table, rd32(pkt + IPV4_SRC_OFFSET) & s.mask)
    if s.source_check and (e == NULL or not sent_by(e, sender, sender6)):
        v.action = ACT_DROP
        v.drop = D_SPOOFED_INNER_SOURCE
        return
    if s.mode == MODE_UDP:
        if pkt[IPV4_TTL_OFFSET] <= 1:
            v.action = ACT_DROP
            v.drop = D_TTL_EXPIRED
            return
        ttl_decrement(pkt)
    else:
        # Kernel VXLAN senders on one host (over a veth) leave inner checksums partial; flannel's
        # udp senders (flanneld, and our egress) never do, so UDP mode takes no chance on it.
        v.csum_at = partial_csum_at(pkt, total_len)
    v.action = ACT_TUN
    v.length = total_len
    # Per-peer rx is charged to the lease the inner source belongs to (without the source
    # check, whoever sent it).
    v.route = e
