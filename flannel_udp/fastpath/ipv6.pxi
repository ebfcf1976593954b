# IPv6 (mirror of flannel_udp.packet's IPv6 part): the header check, the hop limit, the IPv6
# pseudo-header and partial checksums. Extension headers are not walked: a packet whose next
# header is not TCP/UDP is forwarded as it is, only without a port in its flow hash or a
# checksum looked at. Part of _fastpath.pyx (included).

cdef inline bint is_ipv6(const uint8_t* p, size_t n) noexcept nogil:
    return n > 0 and (p[IPV6_VERSION_OFFSET] >> 4) == 6


cdef inline int ip6_validate(const uint8_t* p, size_t n, size_t* total_len) noexcept nogil:
    """0 if ``p`` is a sane IPv6 packet (its length, trailer excluded, in total_len), else a
    drop. A payload length of 0 (a jumbogram's) is refused: no link here carries one."""
    cdef size_t payload
    if n < IPV6_HEADER_LEN:
        return D_SHORT
    if (p[IPV6_VERSION_OFFSET] >> 4) != 6:
        return D_NOT_IPV4
    payload = rd16(p + IPV6_PAYLOAD_LEN_OFFSET)
    if payload == 0 or IPV6_HEADER_LEN + payload > n:
        return D_BAD_TOTAL_LEN
    total_len[0] = IPV6_HEADER_LEN + payload
    return D_NONE


cdef inline int any_validate(const uint8_t* p, size_t n, size_t* total_len) noexcept nogil:
    """ip6_validate for an IPv6 packet, ip_validate for anything else."""
    if is_ipv6(p, n):
        return ip6_validate(p, n, total_len)
    return ip_validate(p, n, total_len)


cdef inline size_t l3_header_len(const uint8_t* p) noexcept nogil:
    """The IP header of a validated packet: IPv6's fixed one, or IPv4's with its options."""
    if (p[0] >> 4) == 6:
        return IPV6_HEADER_LEN
    return <size_t>(p[IPV4_VER_IHL_OFFSET] & 0x0F) * 4


cdef inline uint32_t l4_proto(const uint8_t* p) noexcept nogil:
    """The transport protocol of a validated packet (IPv6: the first next header)."""
    if (p[0] >> 4) == 6:
        return p[IPV6_NEXT_HEADER_OFFSET]
    return p[IPV4_PROTO_OFFSET]


cdef inline uint32_t pseudo_sum6(const uint8_t* ip, uint32_t proto, size_t l4_len) noexcept nogil:
    """Folded (not inverted) sum of the IPv6 pseudo-header (RFC 8200 8.1) of the L4 part."""
    return fold16(<uint64_t>fu_sum16(ip + IPV6_SRC_OFFSET, 2 * IPV6_ADDR_LEN)
                  + (l4_len >> 16) + (l4_len & 0xFFFF) + proto)


cdef inline uint32_t pseudo_sum_any(const uint8_t* ip, uint32_t proto,
                                    size_t l4_len) noexcept nogil:
    if (ip[0] >> 4) == 6:
        return pseudo_sum6(ip, proto, l4_len)
    return pseudo_sum(ip, proto, l4_len)


cdef size_t partial_csum_at6(const uint8_t* p, size_t n) noexcept nogil:
    """partial_csum_at for a validated IPv6 packet: TCP or UDP right behind the fixed header."""
    cdef size_t at
    cdef uint32_t proto = p[IPV6_NEXT_HEADER_OFFSET]
    if proto == PROTO_TCP:
        at = IPV6_HEADER_LEN + TCP_CSUM_OFFSET
        if IPV6_HEADER_LEN + TCP_HEADER_LEN > n:
            return 0
    elif proto == PROTO_UDP:
        at = IPV6_HEADER_LEN + UDP_CSUM_OFFSET
        if IPV6_HEADER_LEN + UDP_HEADER_LEN > n:
            return 0
    else:
        return 0
    return at if rd16(p + at) == pseudo_sum6(p, proto, n - IPV6_HEADER_LEN) else 0


cdef bint icmp6_answerable(const uint8_t* p, size_t n, bint to_multicast_too) noexcept nogil:
    """Whether a validated IPv6 packet may be answered with an ICMPv6 error (RFC 4443 2.4
    (e)): not an ICMPv6 error itself, nor from the unspecified or a multicast address, nor (but
    for packet too big) to a multicast one; and, as for IPv4, no fragment but the first."""
    cdef uint32_t next_header = p[IPV6_NEXT_HEADER_OFFSET]
    cdef const uint8_t* src = p + IPV6_SRC_OFFSET
    cdef uint64_t hi = rd64(src)
    if next_header == PROTO_ICMPV6 and (n <= IPV6_HEADER_LEN
                                         or p[IPV6_HEADER_LEN] < ICMPV6_INFO_MIN):
        return False
    if src[0] == 0xFF or (hi == 0 and rd64(src + 8) == 0):
        return False
    if not to_multicast_too and p[IPV6_DST_OFFSET] == 0xFF:
        return False
    if next_header == PROTO_IPV6_FRAGMENT and (
            n < IPV6_HEADER_LEN + 8 or (rd16(p + IPV6_HEADER_LEN + IPV6_FRAG_OFFSET_OFFSET)
                                        & IPV6_FRAG_OFFSET_MASK) != 0):
        return False
    return True


cdef size_t build_icmp6_error(uint8_t* out, const uint8_t* pkt, size_t total_len,
                              const uint8_t* tun_addr6, uint32_t icmp_type,
                              uint32_t mtu) noexcept nogil:
    """Write the ICMPv6 error ``icmp_type`` (code 0; ``mtu`` in packet too big's field) for
    ``pkt`` into ``out`` (REPLY_MAX bytes), from our tun_addr6 back to its source, quoting as
    much of it as fits in the minimum MTU."""
    cdef size_t quote = total_len
    cdef size_t length
    cdef uint8_t* icmp = out + IPV6_HEADER_LEN
    if quote > IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMPV6_HEADER_LEN:
        quote = IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMPV6_HEADER_LEN
    length = IPV6_HEADER_LEN + ICMPV6_HEADER_LEN + quote
    memset(out, 0, IPV6_HEADER_LEN + ICMPV6_HEADER_LEN)
    out[IPV6_VERSION_OFFSET] = 0x60
    wr16(out + IPV6_PAYLOAD_LEN_OFFSET, <uint32_t>(ICMPV6_HEADER_LEN + quote))
    out[IPV6_NEXT_HEADER_OFFSET] = PROTO_ICMPV6
    out[IPV6_HOP_LIMIT_OFFSET] = REPLY_TTL
    memcpy(out + IPV6_SRC_OFFSET, tun_addr6, IPV6_ADDR_LEN)
    memcpy(out + IPV6_DST_OFFSET, pkt + IPV6_SRC_OFFSET, IPV6_ADDR_LEN)
    icmp[ICMP_TYPE_OFFSET] = <uint8_t>icmp_type
    wr32(icmp + ICMPV6_MTU_OFFSET, mtu)
    memcpy(icmp + ICMPV6_HEADER_LEN, pkt, quote)
    wr16(icmp + ICMP_CSUM_OFFSET, ~fold16(<uint64_t>pseudo_sum6(out, PROTO_ICMPV6,
                                                                  ICMPV6_HEADER_LEN + quote)
                                           + fu_sum16(icmp, ICMPV6_HEADER_LEN + quote)) & 0xFFFF)
    return length


cdef size_t egress_len6(const Shared* s, const uint8_t* pkt, size_t total_len) noexcept nogil:
    """The largest IPv6 packet egress makes of ``pkt``: its segments' if it is a GSO
    super-packet read behind a virtio header, else itself."""
    cdef const uint8_t* vh = pkt - VNET_HDR_LEN
    cdef size_t hdr, seg
    if not s.vnet or (vh[VNET_GSO_TYPE_OFFSET] & ~GSO_ECN) == GSO_NONE:
        return total_len
    hdr = IPV6_HEADER_LEN + UDP_HEADER_LEN
    if pkt[IPV6_NEXT_HEADER_OFFSET] == PROTO_TCP and IPV6_HEADER_LEN + TCP_HEADER_LEN <= total_len:
        hdr = IPV6_HEADER_LEN + <size_t>(pkt[IPV6_HEADER_LEN + TCP_DOFF_OFFSET] >> 4) * 4
    seg = hdr + rd_host16(vh + VNET_GSO_SIZE_OFFSET)
    return seg if seg < total_len else total_len


cdef inline void mask6(const uint8_t* addr, const Shared* s, uint64_t* hi,
                       uint64_t* lo) noexcept nogil:
    """The lease network an IPv6 address lies in, as the route table's key."""
    hi[0] = rd64(addr) & s.mask6_hi
    lo[0] = rd64(addr + 8) & s.mask6_lo
