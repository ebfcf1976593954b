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
    return fold16(<uint64_t>rd16(ip + 12) + rd16(ip + 14) + rd16(ip + 16) + rd16(ip + 18)
                  + proto + l4_len)


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


cdef size_t partial_csum_at(const uint8_t* p, size_t n) noexcept nogil:
    """Where the TCP/UDP checksum of validated packet ``p`` (IP length ``n``) is, if it holds
    the folded pseudo-header sum: what a kernel sender whose device offloads checksums leaves
    (CHECKSUM_PARTIAL, e.g. a VXLAN device over a veth), else 0. Cheap: the packet's own
    pseudo-header, no pass over the payload. A complete checksum equal to that sum by chance
    (1 in 65536) is left as it is by the completion (mirror of packet.partial_checksum_at)."""
    cdef size_t ihl = <size_t>(p[0] & 0x0F) * 4
    cdef size_t at
    cdef uint32_t proto = p[9]
    if (rd16(p + 6) & 0x3FFF) != 0:
        return 0    # a fragment: the kernel completes checksums before it fragments
    if proto == 6:
        at = ihl + 16
        if ihl + 20 > n:
            return 0
    elif proto == 17:
        at = ihl + 6
        if ihl + 8 > n:
            return 0
    else:
        return 0
    return at if rd16(p + at) == pseudo_sum(p, proto, n - ihl) else 0


cdef inline void complete_csum(uint8_t* p, size_t n, size_t at) noexcept nogil:
    """Complete the partial checksum at ``at``: the field holds the pseudo-header sum, so the
    sum over the L4 part is the whole sum (0 goes as 0xFFFF: 0 would mean "no UDP checksum")."""
    cdef size_t ihl = <size_t>(p[0] & 0x0F) * 4
    cdef uint32_t c = ~fu_sum16(p + ihl, n - ihl) & 0xFFFF
    wr16(p + at, c if c else 0xFFFF)


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
