/* The few atomics the fast path's threads share with Python (included by _fastpath.pyx). */
#ifndef FLANNEL_UDP_FASTPATH_ATOMICS_H
#define FLANNEL_UDP_FASTPATH_ATOMICS_H

#include <stdint.h>

/* The trace rings' handshake: the producer (an I/O thread) writes a slot, then publishes
   head with a release store; the consumer (Python) reads head with acquire, then the slots,
   then gives them back by a release store of tail. trace_every is read relaxed. */
static inline uint32_t fu_load_acquire(const uint32_t* p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void fu_store_release(uint32_t* p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline uint32_t fu_load_relaxed(const uint32_t* p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
static inline void fu_store_relaxed(uint32_t* p, uint32_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}
/* A route's counters: with several TUN queues, threads of different queues add to the same
   route at once. */
static inline void fu_add_relaxed64(uint64_t* p, uint64_t v) {
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

#endif
