# IPv4 and checksums (mirror of flannel_udp.packet): big-endian and virtio field access,
# the Internet checksum, header checks, the TTL, partial checksums, the ICMP error we answer
# with. Part of _fastpath.pyx (included).

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


cdef inline uint32_t inet_checksum(const uint8_t* p, size_t n) noexcept nogil:
    return ~fu_sum16(p, n) & 0xFFFF


cdef inline uint32_t fold16(uint64_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint32_t>total


cdef inline uint32_t pseudo_sum(const uint8_t* ip, uint32_t proto, size_t l4_len) noexcept nogil:
    """Folded (not inverted) sum of the IPv4 pseudo-header of a packet's L4 part."""
    return fold16(<uint64_t>rd16(ip + IPV4_SRC_OFFSET) + rd16(ip + IPV4_SRC_OFFSET + 2)
                  + rd16(ip + IPV4_DST_OFFSET) + rd16(ip + IPV4_DST_OFFSET + 2) + proto + l4_len)


cdef inline uint32_t rd_host16(const uint8_t* p) noexcept nogil:
    # virtio_net_hdr fields are in host byte order.
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline void wr_host16(uint8_t* p, uint32_t v) noexcept nogil:
    cdef uint16_t h = <uint16_t>v
    memcpy(p, &h, 2)


cdef inline int ip_validate(const uint8_t* p, size_t n, size_t* total_len) noexcept nogil:
    """0 if ``p`` is a sane IPv4 packet (its length, trailer excluded, in total_len), else a drop."""
    cdef size_t header_len, total
    if n < IPV4_HEADER_LEN:
        return D_SHORT
    if (p[IPV4_VER_IHL_OFFSET] >> 4) != 4:
        return D_NOT_IPV4
    header_len = <size_t>(p[IPV4_VER_IHL_OFFSET] & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN or header_len > n:
        return D_BAD_HEADER_LEN
    total = rd16(p + IPV4_TOTAL_LEN_OFFSET)
    if total < header_len or total > n:
        return D_BAD_TOTAL_LEN
    total_len[0] = total
    return D_NONE


cdef inline void ttl_decrement(uint8_t* p) noexcept nogil:
    # RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), on the 16-bit word TTL|protocol.
    cdef uint32_t old_word = rd16(p + IPV4_TTL_OFFSET)
    cdef uint32_t new_word = old_word - 0x100
    cdef uint32_t old_sum = rd16(p + IPV4_CSUM_OFFSET)
    cdef uint32_t total = (~old_sum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    p[IPV4_TTL_OFFSET] -= 1
    wr16(p + IPV4_CSUM_OFFSET, ~total & 0xFFFF)


cdef size_t partial_csum_at(const uint8_t* p, size_t n) noexcept nogil:
    """Where the TCP/UDP checksum of validated packet ``p`` (IP length ``n``) is, if it holds
    the folded pseudo-header sum: what a kernel sender whose device offloads checksums leaves
    (CHECKSUM_PARTIAL, e.g. a VXLAN device over a veth), else 0. Cheap: the packet's own
    pseudo-header, no pass over the payload. A complete checksum equal to that sum by chance
    (1 in 65536) is left as it is by the completion (mirror of packet.partial_checksum_at)."""
    cdef size_t ihl = <size_t>(p[IPV4_VER_IHL_OFFSET] & 0x0F) * 4
    cdef size_t at
    cdef uint32_t proto = p[IPV4_PROTO_OFFSET]
    if (rd16(p + IPV4_FLAGS_OFFSET) & IPV4_FRAGMENT_MASK) != 0:
        return 0    # a fragment: the kernel completes checksums before it fragments
    if proto == PROTO_TCP:
        at = ihl + TCP_CSUM_OFFSET
        if ihl + TCP_HEADER_LEN > n:
            return 0
    elif proto == PROTO_UDP:
        at = ihl + UDP_CSUM_OFFSET
        if ihl + UDP_HEADER_LEN > n:
            return 0
    else:
        return 0
    return at if rd16(p + at) == pseudo_sum(p, proto, n - ihl) else 0


cdef inline void complete_csum(uint8_t* p, size_t start, size_t n, size_t at) noexcept nogil:
    """Complete the partial checksum at ``at`` of the ``n``-byte packet ``p``, its L4 part from
    ``start``: the field holds the pseudo-header sum, so the sum over the L4 part is the whole
    sum (0 goes as 0xFFFF: 0 would mean "no UDP checksum")."""
    cdef uint32_t c = ~fu_sum16(p + start, n - start) & 0xFFFF
    wr16(p + at, c if c else 0xFFFF)


cdef size_t build_net_unreachable(uint8_t* out, const uint8_t* pkt, size_t total_len,
                                  uint32_t tun_addr) noexcept nogil:
    """Write the ICMP net-unreachable answer to ``pkt`` into ``out`` (ICMP_MAX bytes)."""
    cdef size_t header_len = <size_t>(pkt[IPV4_VER_IHL_OFFSET] & 0x0F) * 4
    cdef size_t quote = header_len + ICMP_QUOTE_PAYLOAD
    cdef size_t length
    cdef uint8_t* icmp = out + IPV4_HEADER_LEN
    if quote > total_len:
        quote = total_len
    length = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quote
    memset(out, 0, IPV4_HEADER_LEN + ICMP_HEADER_LEN)
    out[IPV4_VER_IHL_OFFSET] = IPV4_VER_IHL_NO_OPTIONS
    wr16(out + IPV4_TOTAL_LEN_OFFSET, <uint32_t>length)
    out[IPV4_TTL_OFFSET] = REPLY_TTL
    out[IPV4_PROTO_OFFSET] = PROTO_ICMP
    wr32(out + IPV4_SRC_OFFSET, tun_addr)
    memcpy(out + IPV4_DST_OFFSET, pkt + IPV4_SRC_OFFSET, IPV4_ADDR_LEN)
    wr16(out + IPV4_CSUM_OFFSET, inet_checksum(out, IPV4_HEADER_LEN))
    icmp[ICMP_TYPE_OFFSET] = ICMP_DEST_UNREACH
    icmp[ICMP_CODE_OFFSET] = ICMP_NET_UNREACH
    memcpy(icmp + ICMP_HEADER_LEN, pkt, quote)
    wr16(icmp + ICMP_CSUM_OFFSET, inet_checksum(icmp, length - IPV4_HEADER_LEN))
    return length
