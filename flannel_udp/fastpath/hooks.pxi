# Module-level test hooks: the C flow hash, TSO split and TUN writes run on bytes, so that the
# tests can hold them to flannel_udp.packet. Part of _fastpath.pyx (included).

def flow_hash(bytes packet) -> int:
    """Test hook: the C flow hash of an IPv4 or IPv6 packet (ValueError unless its header is
    sane)."""
    cdef size_t total_len = 0
    cdef int drop = any_validate(<const uint8_t*><const char*>packet, len(packet), &total_len)
    if drop != D_NONE:
        raise ValueError(f"not a valid IPv4 packet: {DROP_NAMES[drop]}")
    return hash_flow(<const uint8_t*><const char*>packet, total_len)


def segment_tso(bytes vnet_hdr, bytes packet) -> tuple:
    """Test hook: (drop or 0, [packets]) for a valid IPv4 packet read behind ``vnet_hdr``: its
    segments, or the packet with its checksum completed (mirror of packet.segment_tso)."""
    cdef size_t n = len(packet)
    cdef size_t total_len = 0
    cdef uint8_t* buf
    cdef uint8_t* out = NULL
    cdef GsoPlan plan
    cdef int drop
    if len(vnet_hdr) != VNET_HDR_LEN:
        raise ValueError("vnet_hdr: 10 bytes")
    drop = any_validate(<const uint8_t*><const char*>packet, n, &total_len)
    if drop != D_NONE or total_len != n:
        raise ValueError("not a valid IPv4 packet of its total length")
    buf = <uint8_t*>malloc(n + 1)
    if buf == NULL:
        raise MemoryError()
    memcpy(buf, <const char*>packet, n)
    try:
        drop = gso_plan(<const uint8_t*><const char*>vnet_hdr, buf, n, &plan)
        if drop != D_NONE:
            return (drop, [])
        if plan.count == 0:
            return (0, [(<char*>buf)[:n]])
        out = <uint8_t*>malloc(gso_bytes(&plan, 0))
        if out == NULL:
            raise MemoryError()
        gso_write(&plan, buf, out, 0)
        segments = []
        offset = 0
        for i in range(plan.count):
            length = plan.seg_len if i + 1 < plan.count else plan.last_len
            segments.append((<char*>out)[offset:offset + length])
            offset += length
        return (0, segments)
    finally:
        free(buf)
        free(out)


def tun_writes(list packets, *, bint vnet=True, bint complete_partial=False, int mtu=0,
               int gro_size=0) -> tuple:
    """Test hook: what ingress writes to the TUN for these valid IPv4 packets, received back to
    back in one buffer: ([(virtio header, or b"" without ``vnet``, packet)], partial checksums
    counted, bad_gso drops). ``complete_partial``: as VXLAN mode does, with the TUN's ``mtu``
    and the datagram's UDP_GRO size ``gro_size`` (mirror of packet.tun_writes)."""
    cdef Coalescer c
    cdef Counters counters
    cdef size_t total = 0
    cdef size_t length, off, total_len
    cdef uint8_t* buf
    for p in packets:
        total_len = 0
        if any_validate(<const uint8_t*><const char*>p, len(p), &total_len) != D_NONE \
                or total_len != len(p):
            raise ValueError("not a valid IPv4 packet of its total length")
        total += len(p)
    buf = <uint8_t*>malloc(ING_HEADROOM + total + 1)
    memset(&c, 0, sizeof(c))
    memset(&counters, 0, sizeof(counters))
    c.tun_fd = -1
    c.vnet = vnet
    c.mtu = mtu
    c.counters = &counters
    c.arena = <uint8_t*>malloc(ING_ARENA)
    # Each packet may be a super-packet split into up to TSO_MAX_SEGS segments, each with its
    # own copy of the headers (<= 120 bytes), behind a virtio header and a length.
    c.capture = <uint8_t*>malloc(total + len(packets) * (14 + TSO_MAX_SEGS * 134) + 1)
    try:
        if buf == NULL or c.capture == NULL or c.arena == NULL:
            raise MemoryError()
        off = ING_HEADROOM
        for p in packets:
            memcpy(buf + off, <const char*>p, len(p))
            off += len(p)
        off = ING_HEADROOM
        for p in packets:
            co_add(&c, buf + off, len(p), NULL,
                   (partial_csum_at6(buf + off, len(p)) if is_ipv6(buf + off, len(p))
                    else partial_csum_at(buf + off, len(p))) if complete_partial else 0, gro_size)
            off += len(p)
        co_flush(&c)
        frames = []
        off = 0
        while off < c.capture_used:
            length = 0
            memcpy(&length, c.capture + off, 4)
            frame = (<char*>c.capture)[off + 4:off + 4 + length]
            cut = VNET_HDR_LEN if vnet else 0
            frames.append((frame[:cut], frame[cut:]))
            off += 4 + length
        return frames, counters.csum_completed, counters.drops[D_BAD_GSO]
    finally:
        free(buf)
        free(c.arena)
        free(c.capture)
