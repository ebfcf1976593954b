# Trace: the I/O threads sample packet decisions into a per-half ring (TraceRing, in state.pxi)
# that FastPath.trace_drain empties, for `flannel-udp trace`. Part of _fastpath.pyx (included).

cdef void trace_record(TraceRing* r, uint32_t every, uint8_t direction, const uint8_t* pkt,
                       size_t n, const Verdict* v, uint32_t peer,
                       const uint8_t* peer6) noexcept nogil:
    """Sample one decision in ``every`` into the ring; a full ring loses it (counted). Called
    only while tracing: off, the I/O loops skip it on one branch."""
    cdef TraceRecord* rec
    cdef uint32_t head
    cdef timespec ts
    if r.skip >= every:         # left by an earlier, sparser tracer
        r.skip = 0
    if r.skip:
        r.skip -= 1
        return
    r.skip = every - 1
    head = r.head
    if head - fu_load_acquire(&r.tail) >= TRACE_SLOTS:
        r.lost += 1
        return
    rec = &r.slots[head & (TRACE_SLOTS - 1)]
    clock_gettime(CLOCK_REALTIME_COARSE, &ts)
    rec.ns = <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec
    rec.dir = direction
    rec.verdict = <uint8_t>v.action
    rec.drop = <uint8_t>v.drop
    rec.peer = peer
    rec.length = <uint16_t>(n if n < 65535 else 65535)
    rec.v6 = 0
    if peer6 == NULL and direction == 0 and v.route != NULL and v.route.underlay6:
        peer6 = (<const RouteEntry6*>v.route).peer6
    if peer6 != NULL:
        rec.v6 = 2
        memcpy(rec.peer6, peer6, 16)
    if pkt != NULL and n >= IPV4_HEADER_LEN and (pkt[IPV4_VER_IHL_OFFSET] >> 4) == 4:
        rec.proto = pkt[IPV4_PROTO_OFFSET]
        rec.src = rd32(pkt + IPV4_SRC_OFFSET)
        rec.dst = rd32(pkt + IPV4_DST_OFFSET)
    elif pkt != NULL and n >= IPV6_HEADER_LEN and (pkt[IPV6_VERSION_OFFSET] >> 4) == 6:
        rec.proto = pkt[IPV6_NEXT_HEADER_OFFSET]
        rec.src = 0
        rec.dst = 0
        rec.v6 |= 1
        memcpy(rec.src6, pkt + IPV6_SRC_OFFSET, 16)
        memcpy(rec.dst6, pkt + IPV6_DST_OFFSET, 16)
    else:
        rec.proto = 0
        rec.src = 0
        rec.dst = 0
    r.taken += 1
    fu_store_release(&r.head, head + 1)
