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


cdef inline void mask6(const uint8_t* addr, const Shared* s, uint64_t* hi,
                       uint64_t* lo) noexcept nogil:
    """The lease network an IPv6 address lies in, as the route table's key."""
    hi[0] = rd64(addr) & s.mask6_hi
    lo[0] = rd64(addr + 8) & s.mask6_lo
