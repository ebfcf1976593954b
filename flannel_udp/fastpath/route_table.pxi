# The route table (subnet -> peer, and the senders' table of source validation): open
# addressing, linear probing, load <= 1/2, backward-shift deletion. Part of _fastpath.pyx.

cdef inline uint32_t rt_home(const RouteTable* t, uint32_t key) noexcept nogil:
    # Fibonacci hashing: subnet keys share their low (host) bits, so take the high product bits.
    return <uint32_t>(key * <uint32_t>2654435769U) >> t.shift


cdef int rt_init(RouteTable* t, uint32_t capacity) noexcept nogil:
    cdef uint32_t bits = 0
    while (<uint32_t>1 << bits) < capacity:
        bits += 1
    t.slots = <RouteEntry*>calloc(<size_t>1 << bits, sizeof(RouteEntry))
    if t.slots == NULL:
        return -1
    t.capacity = <uint32_t>1 << bits
    t.count = 0
    t.shift = 32 - bits
    return 0


cdef RouteEntry* rt_find(const RouteTable* t, uint32_t key) noexcept nogil:
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt_home(t, key)
    while t.slots[i].used:
        if t.slots[i].subnet == key:
            return &t.slots[i]
        i = (i + 1) & m
    return NULL


cdef void rt_place(RouteTable* t, const RouteEntry* e) noexcept nogil:
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt_home(t, e.subnet)
    while t.slots[i].used:
        i = (i + 1) & m
    t.slots[i] = e[0]
    t.count += 1


cdef int rt_grow(RouteTable* t) noexcept nogil:
    cdef RouteTable bigger
    cdef uint32_t i
    if rt_init(&bigger, t.capacity * 2) < 0:
        return -1
    for i in range(t.capacity):
        if t.slots[i].used:
            rt_place(&bigger, &t.slots[i])
    free(t.slots)
    t[0] = bigger
    return 0


cdef int rt_set(RouteTable* t, uint32_t key, uint32_t peer, const uint8_t* mac) noexcept nogil:
    """Upsert; counters restart when the subnet moves to another peer. -1 on ENOMEM."""
    cdef RouteEntry e
    cdef RouteEntry* found = rt_find(t, key)
    if found != NULL:
        if found.peer != peer:
            memset(found, 0, sizeof(RouteEntry))
            found.subnet = key
            found.peer = peer
            found.used = 1
        memcpy(found.mac, mac, 6)
        return 0
    if (t.count + 1) * 2 > t.capacity and rt_grow(t) < 0:
        return -1
    memset(&e, 0, sizeof(RouteEntry))
    e.subnet = key
    e.peer = peer
    e.used = 1
    memcpy(e.mac, mac, 6)
    rt_place(t, &e)
    return 0


cdef int senders_add(RouteTable* t, uint32_t peer) noexcept nogil:
    """Count one more subnet leased to ``peer``; -1 on ENOMEM."""
    cdef RouteEntry* e = rt_find(t, peer)
    cdef uint8_t no_mac[6]
    if e != NULL:
        e.peer += 1
        return 0
    memset(no_mac, 0, 6)
    return rt_set(t, peer, 1, no_mac)


cdef void senders_remove(RouteTable* t, uint32_t peer) noexcept nogil:
    """Count one subnet less leased to ``peer``; it is forgotten with its last one."""
    cdef RouteEntry* e = rt_find(t, peer)
    if e == NULL:
        return
    if e.peer > 1:
        e.peer -= 1
    else:
        rt_delete(t, peer)


cdef int rt_delete(RouteTable* t, uint32_t key) noexcept nogil:
    """Remove ``key``; 1 if it was there. Shifts later cluster members back (no tombstones)."""
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt_home(t, key)
    cdef uint32_t j, home
    while True:
        if not t.slots[i].used:
            return 0
        if t.slots[i].subnet == key:
            break
        i = (i + 1) & m
    j = i
    while True:
        j = (j + 1) & m
        if not t.slots[j].used:
            break
        home = rt_home(t, t.slots[j].subnet)
        # Entry j may stay only if its home lies cyclically in (i, j]: then the hole at i is
        # not on its probe path.
        if i <= j:
            if i < home <= j:
                continue
        elif i < home or home <= j:
            continue
        t.slots[i] = t.slots[j]
        i = j
    memset(&t.slots[i], 0, sizeof(RouteEntry))
    t.count -= 1
    return 1


# The IPv6 table: the same scheme on 128-bit keys (network addresses, or PublicIPv6s in the
# senders' table).

cdef inline uint32_t rt6_home(const RouteTable6* t, uint64_t hi, uint64_t lo) noexcept nogil:
    return <uint32_t>(((hi ^ (lo * <uint64_t>0xFF51AFD7ED558CCDULL))
                       * <uint64_t>0x9E3779B97F4A7C15ULL) >> t.shift)


cdef int rt6_init(RouteTable6* t, uint32_t capacity) noexcept nogil:
    cdef uint32_t bits = 0
    while (<uint32_t>1 << bits) < capacity:
        bits += 1
    t.slots = <RouteEntry6*>calloc(<size_t>1 << bits, sizeof(RouteEntry6))
    if t.slots == NULL:
        return -1
    t.capacity = <uint32_t>1 << bits
    t.count = 0
    t.shift = 64 - bits
    return 0


cdef RouteEntry6* rt6_find(const RouteTable6* t, uint64_t hi, uint64_t lo) noexcept nogil:
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt6_home(t, hi, lo)
    while t.slots[i].base.used:
        if t.slots[i].hi == hi and t.slots[i].lo == lo:
            return &t.slots[i]
        i = (i + 1) & m
    return NULL


cdef void rt6_place(RouteTable6* t, const RouteEntry6* e) noexcept nogil:
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt6_home(t, e.hi, e.lo)
    while t.slots[i].base.used:
        i = (i + 1) & m
    t.slots[i] = e[0]
    t.count += 1


cdef int rt6_grow(RouteTable6* t) noexcept nogil:
    cdef RouteTable6 bigger
    cdef uint32_t i
    if rt6_init(&bigger, t.capacity * 2) < 0:
        return -1
    for i in range(t.capacity):
        if t.slots[i].base.used:
            rt6_place(&bigger, &t.slots[i])
    free(t.slots)
    t[0] = bigger
    return 0


cdef inline bint same_peer6(const RouteEntry6* e, const RouteEntry6* want) noexcept nogil:
    if e.base.underlay6 != want.base.underlay6:
        return False
    if want.base.underlay6:
        return memcmp(e.peer6, want.peer6, 16) == 0
    return e.base.peer == want.base.peer


cdef int rt6_set(RouteTable6* t, const RouteEntry6* want) noexcept nogil:
    """Upsert ``want`` (key, peer, MAC); counters restart when the subnet moves to another
    peer. -1 on ENOMEM."""
    cdef RouteEntry6 e
    cdef RouteEntry6* found = rt6_find(t, want.hi, want.lo)
    if found != NULL:
        if not same_peer6(found, want):
            memset(found, 0, sizeof(RouteEntry6))
            found[0] = want[0]
            found.base.used = 1
        memcpy(found.base.mac, want.base.mac, 6)
        return 0
    if (t.count + 1) * 2 > t.capacity and rt6_grow(t) < 0:
        return -1
    memset(&e, 0, sizeof(RouteEntry6))
    e.hi = want.hi
    e.lo = want.lo
    e.base.peer = want.base.peer
    e.base.underlay6 = want.base.underlay6
    memcpy(e.peer6, want.peer6, 16)
    memcpy(e.base.mac, want.base.mac, 6)
    e.base.used = 1
    rt6_place(t, &e)
    return 0


cdef int rt6_delete(RouteTable6* t, uint64_t hi, uint64_t lo) noexcept nogil:
    """Remove a key; 1 if it was there (backward-shift deletion, as rt_delete)."""
    cdef uint32_t m = t.capacity - 1
    cdef uint32_t i = rt6_home(t, hi, lo)
    cdef uint32_t j, home
    while True:
        if not t.slots[i].base.used:
            return 0
        if t.slots[i].hi == hi and t.slots[i].lo == lo:
            break
        i = (i + 1) & m
    j = i
    while True:
        j = (j + 1) & m
        if not t.slots[j].base.used:
            break
        home = rt6_home(t, t.slots[j].hi, t.slots[j].lo)
        if i <= j:
            if i < home <= j:
                continue
        elif i < home or home <= j:
            continue
        t.slots[i] = t.slots[j]
        i = j
    memset(&t.slots[i], 0, sizeof(RouteEntry6))
    t.count -= 1
    return 1


cdef inline uint64_t rd64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>rd32(p) << 32) | rd32(p + 4)


cdef int senders6_add(RouteTable6* t, const uint8_t* addr) noexcept nogil:
    """Count one more subnet leased to the holder of PublicIPv6 ``addr``; -1 on ENOMEM."""
    cdef RouteEntry6 want
    cdef RouteEntry6* e = rt6_find(t, rd64(addr), rd64(addr + 8))
    if e != NULL:
        e.base.peer += 1
        return 0
    memset(&want, 0, sizeof(RouteEntry6))
    want.hi = rd64(addr)
    want.lo = rd64(addr + 8)
    want.base.peer = 1
    return rt6_set(t, &want)


cdef void senders6_remove(RouteTable6* t, const uint8_t* addr) noexcept nogil:
    cdef RouteEntry6* e = rt6_find(t, rd64(addr), rd64(addr + 8))
    if e == NULL:
        return
    if e.base.peer > 1:
        e.base.peer -= 1
    else:
        rt6_delete(t, rd64(addr), rd64(addr + 8))
