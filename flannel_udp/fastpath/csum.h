/* The Internet checksum's core for the fast path (_fastpath.pyx): the one pass over packet bytes. */
#ifndef FLANNEL_UDP_FASTPATH_CSUM_H
#define FLANNEL_UDP_FASTPATH_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Ones' complement sum (RFC 1071) of p as big-endian 16-bit words, an odd tail padded with
   zero, folded to 16 bits and not inverted. It adds 32-bit native words (the sum is
   byte-order independent up to a final swap): several times faster than 16-bit steps over
   the 64 KB payloads the offloads checksum. */
static uint32_t fu_sum16(const unsigned char* p, size_t n) {
    uint64_t acc = 0;
    uint32_t w;
    uint16_t h;
    while (n >= 16) {
        memcpy(&w, p, 4); acc += w;
        memcpy(&w, p + 4, 4); acc += w;
        memcpy(&w, p + 8, 4); acc += w;
        memcpy(&w, p + 12, 4); acc += w;
        p += 16; n -= 16;
    }
    while (n >= 4) { memcpy(&w, p, 4); acc += w; p += 4; n -= 4; }
    if (n >= 2) { memcpy(&h, p, 2); acc += h; p += 2; n -= 2; }
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (n) acc += p[0];
#else
    if (n) acc += (uint32_t)p[0] << 8;
#endif
    while (acc >> 16) acc = (acc & 0xFFFF) + (acc >> 16);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    acc = ((acc >> 8) | (acc << 8)) & 0xFFFF;
#endif
    return (uint32_t)acc;
}

#endif
