# Encapsulation: the flow hash that picks a send socket, one function per mode and direction
# (``encap``/``ingress_frame`` dispatch), the send round's messages. Part of _fastpath.pyx.

cdef inline uint32_t fmix32(uint32_t h) noexcept nogil:
    # MurmurHash3's finalizer: every input bit affects every output bit.
    h ^= h >> 16
    h *= <uint32_t>0x85EBCA6BU
    h ^= h >> 13
    h *= <uint32_t>0xC2B2AE35U
    h ^= h >> 16
    return h


cdef inline bint has_ports(uint32_t proto) noexcept nogil:
    # The first L4_PORTS_LEN payload bytes are the two ports.
    return proto == PROTO_TCP or proto == PROTO_UDP or proto == PROTO_DCCP \
        or proto == PROTO_SCTP or proto == PROTO_UDPLITE


cdef uint32_t hash_flow(const uint8_t* pkt, size_t total_len) noexcept nogil:
    """Hash of a validated packet's flow (mirror of packet.flow_hash): addresses, protocol, and
    the ports unless the packet is a fragment (fragments of one datagram must hash alike)."""
    cdef size_t header_len = <size_t>(pkt[IPV4_VER_IHL_OFFSET] & 0x0F) * 4
    cdef uint32_t proto = pkt[IPV4_PROTO_OFFSET]
    cdef uint32_t ports = 0
    cdef uint32_t h
    cdef unsigned int i
    if (pkt[0] >> 4) == 6:
        # Both addresses word by word, the next header, the ports if it is a transport.
        proto = pkt[IPV6_NEXT_HEADER_OFFSET]
        h = FLOW_HASH_SEED
        for i in range(2 * IPV6_ADDR_LEN // 4):
            h = fmix32(h ^ rd32(pkt + IPV6_SRC_OFFSET + 4 * i))
        if has_ports(proto) and IPV6_HEADER_LEN + L4_PORTS_LEN <= total_len:
            ports = rd32(pkt + IPV6_HEADER_LEN)
        h = fmix32(h ^ proto)
        return fmix32(h ^ ports)
    if has_ports(proto) and (rd16(pkt + IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK) == 0 \
            and header_len + L4_PORTS_LEN <= total_len:
        ports = rd32(pkt + header_len)
    h = fmix32(FLOW_HASH_SEED ^ rd32(pkt + IPV4_SRC_OFFSET))
    h = fmix32(h ^ rd32(pkt + IPV4_DST_OFFSET))
    h = fmix32(h ^ proto)
    return fmix32(h ^ ports)


cdef inline size_t encap_len(const Shared* s) noexcept nogil:
    return VXLAN_ENCAP_LEN if s.mode == MODE_VXLAN else 0


cdef inline void encap_udp(const Shared* s, uint8_t* pkt, const RouteEntry* e) noexcept nogil:
    # flannel's UDP mode: the datagram payload is the bare IPv4 packet, no header.
    pass


cdef inline void encap_vxlan(const Shared* s, uint8_t* pkt, const RouteEntry* e) noexcept nogil:
    # RFC 7348 header and the inner Ethernet header, written into the room before pkt.
    cdef uint8_t* h = pkt - VXLAN_ENCAP_LEN
    cdef uint8_t* eth = h + VXLAN_HEADER_LEN
    wr32(h + VXLAN_FLAGS_OFFSET, <uint32_t>VXLAN_FLAG_I << 24)   # the flags, 3 reserved bytes
    wr32(h + VXLAN_VNI_OFFSET, s.vni << 8)                      # the VNI, a reserved byte
    memcpy(eth + ETHERNET_DST_OFFSET, e.mac, 6)
    if (pkt[0] >> 4) == 6:
        # As from the kernel's flannel-v6 device: its own VtepMAC, the IPv6 ethertype.
        memcpy(eth + ETHERNET_SRC_OFFSET, s.vtep_mac6, 6)
        wr16(eth + ETHERNET_TYPE_OFFSET, ETHERTYPE_IPV6)
    else:
        memcpy(eth + ETHERNET_SRC_OFFSET, s.vtep_mac, 6)
        wr16(eth + ETHERNET_TYPE_OFFSET, ETHERTYPE_IPV4)


cdef inline void encap_header(const Shared* s, uint8_t* pkt, const RouteEntry* e) noexcept nogil:
    if s.mode == MODE_VXLAN:
        encap_vxlan(s, pkt, e)
    else:
        encap_udp(s, pkt, e)


cdef inline uint32_t flow_of(const Shared* s, const uint8_t* pkt, size_t length) noexcept nogil:
    """The flow hash that picks a packet's send socket (VXLAN only), taken from the packet as
    read: before a partial checksum is completed, wherever its offset points."""
    return hash_flow(pkt, length) if s.mode == MODE_VXLAN else 0


cdef void add_message(const Shared* s, EgressState* q, unsigned int k, uint8_t* first,
                      size_t wire_len, unsigned int segs, uint32_t gso_size, size_t inner_len,
                      RouteEntry* e, uint32_t flow) noexcept nogil:
    """Message k of the send round: ``segs`` encapsulated datagrams of ``gso_size`` bytes
    (the last may be shorter), ``wire_len`` in all, the first one's inner packet at ``first``,
    of the flow hashed ``flow``."""
    q.iov[k].iov_base = first - encap_len(s)
    q.iov[k].iov_len = wire_len
    # VXLAN: one socket per flow keeps a flow on one outer source port (and in order).
    if e.underlay6:
        q.fam6[k] = 1
        q.addrs6[k].sin6_family = AF_INET6
        q.addrs6[k].sin6_port = s.port
        q.addrs6[k].sin6_flowinfo = 0
        q.addrs6[k].sin6_scope_id = 0
        memcpy(q.addrs6[k].sin6_addr.s6_addr, (<const RouteEntry6*>e).peer6, 16)
        q.sender[k] = s.n_senders + <unsigned int>((<uint64_t>flow * s.n6_senders) >> 32)
    else:
        q.fam6[k] = 0
        q.addrs[k].sin_family = AF_INET
        q.addrs[k].sin_port = s.port
        q.addrs[k].sin_addr.s_addr = htonl(e.peer)
        q.sender[k] = <unsigned int>((<uint64_t>flow * s.n_senders) >> 32)
    q.routes[k] = e
    q.sent_lens[k] = inner_len
    q.segs[k] = segs
    q.gso_size[k] = <uint16_t>(gso_size if segs > 1 else 0)


cdef inline void encap(const Shared* s, EgressState* q, unsigned int k, uint8_t* pkt,
                       size_t length, RouteEntry* e, uint32_t flow) noexcept nogil:
    """Make packet ``pkt`` (room for the wire header before it) message k of the round."""
    encap_header(s, pkt, e)
    add_message(s, q, k, pkt, encap_len(s) + length, 1, 0, length, e, flow)


cdef unsigned int encap_segments(const Shared* s, EgressState* q, unsigned int k,
                                 uint8_t* first, const GsoPlan* plan, RouteEntry* e,
                                 uint32_t flow) noexcept nogil:
    """Encapsulate the segments gso_write put at ``first`` (each behind encap_len bytes) as
    messages k, k+1...: UDP_SEGMENT runs within its limits, or one datagram each when GSO is
    off. Returns the next free message index."""
    cdef size_t gap = encap_len(s)
    cdef size_t stride = gap + plan.seg_len
    cdef unsigned int i = 0
    cdef unsigned int j, n, limit
    cdef size_t wire, inner, seg_len
    limit = 1
    if fu_load_relaxed(&s.udp_gso):
        limit = <unsigned int>(GSO_MAX_BYTES // stride)
        if limit > GSO_MAX_SEGS:
            limit = GSO_MAX_SEGS
        if limit < 1:
            limit = 1
    while i < plan.count:
        n = plan.count - i
        if n > limit:
            n = limit
        wire = 0
        inner = 0
        for j in range(i, i + n):
            seg_len = plan.seg_len if j + 1 < plan.count else plan.last_len
            encap_header(s, first + (j - i) * stride, e)
            wire += gap + seg_len
            inner += seg_len
        add_message(s, q, k, first, wire, n, <uint32_t>stride, inner, e, flow)
        k += 1
        i += n
        first += n * stride
    return k


cdef inline int decap_udp(uint8_t* datagram, size_t n, uint8_t** inner,
                          size_t* inner_len) noexcept nogil:
    inner[0] = datagram
    inner_len[0] = n
    return D_NONE


cdef inline int decap_vxlan(const Shared* s, uint8_t* datagram, size_t n, uint8_t** inner,
                            size_t* inner_len, bint* v6) noexcept nogil:
    # The reserved flag bits are ignored on receipt (RFC 7348); only the I flag must be set.
    # An IPv6 frame (``v6``) is addressed to our IPv6 VtepMAC, as to a flannel-v6 device.
    cdef uint32_t ethertype
    cdef const uint8_t* ours
    if n < VXLAN_ENCAP_LEN:
        return D_VXLAN_SHORT
    if not (datagram[VXLAN_FLAGS_OFFSET] & VXLAN_FLAG_I):
        return D_VXLAN_BAD_FLAGS
    if (rd32(datagram + VXLAN_VNI_OFFSET) >> 8) != s.vni:
        return D_VXLAN_WRONG_VNI
    ethertype = rd16(datagram + VXLAN_HEADER_LEN + ETHERNET_TYPE_OFFSET)
    v6[0] = s.v6 and ethertype == ETHERTYPE_IPV6
    ours = s.vtep_mac
    if v6[0]:
        ours = s.vtep_mac6
    if memcmp(datagram + VXLAN_HEADER_LEN + ETHERNET_DST_OFFSET, ours, 6) != 0:
        return D_VXLAN_WRONG_MAC
    if ethertype != ETHERTYPE_IPV4 and not v6[0]:
        return D_VXLAN_NOT_IPV4
    inner[0] = datagram + VXLAN_ENCAP_LEN
    inner_len[0] = n - VXLAN_ENCAP_LEN
    return D_NONE


cdef uint8_t* ingress_frame(Shared* s, uint8_t* datagram, size_t n, uint32_t sender,
                           const uint8_t* sender6, Verdict* v) noexcept nogil:
    """Decapsulate and check a datagram from ``sender`` (outer source address, host order), or
    from ``sender6`` (16 bytes) if not NULL; the inner packet to write when ``v.action ==
    ACT_TUN``. Caller holds the route read lock."""
    cdef uint8_t* pkt = NULL
    cdef size_t inner_len = 0
    cdef bint v6 = False
    v.route = NULL
    v.peer = 0
    v.length = 0
    v.csum_at = 0
    # Before any parsing: whoever holds no lease gets nothing looked at.
    if s.source_check and (
            rt6_find(&s.senders6, rd64(sender6), rd64(sender6 + 8)) == NULL if sender6 != NULL
            else rt_find(&s.senders, sender) == NULL):
        v.action = ACT_DROP
        v.drop = D_UNKNOWN_SENDER
        return NULL
    if s.mode == MODE_VXLAN:
        v.drop = decap_vxlan(s, datagram, n, &pkt, &inner_len, &v6)
    else:
        v.drop = decap_udp(datagram, n, &pkt, &inner_len)
        v6 = s.v6 and is_ipv6(pkt, inner_len)
    if v.drop != D_NONE:
        v.action = ACT_DROP
        return NULL
    if v6:
        ingress6_one(s, pkt, inner_len, sender, sender6, v)
    else:
        ingress_one(s, pkt, inner_len, sender, sender6, v)
    return pkt
