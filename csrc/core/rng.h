/*
 * rng.h - Philox4x32-10 counter-based generator (Salmon et al., SC'11).
 *
 * Every random number in lowband is a pure function of
 *     key     = (seed low 32 bits, seed high 32 bits)
 *     counter = (block low 32, block high 32, stream low 32, stream high 32)
 * where stream = domain << 56 | step and `block` is an element or block index
 * chosen by the kernel.  No generator state exists, so results never depend
 * on thread count or scheduling.  Verified against the Random123 known-answer
 * vectors in tests/test_rng.py.
 */
#ifndef LB_RNG_H
#define LB_RNG_H

#include <stdint.h>

typedef struct {
    uint32_t v[4];
} lb_u32x4;

typedef struct {
    uint32_t k0, k1;          /* key: the seed */
    uint32_t s0, s1;          /* stream words: step and domain */
} lb_philox_key;

static inline lb_philox_key lb_philox_make(uint64_t seed, uint64_t step,
                                           int domain)
{
    uint64_t stream = ((uint64_t)(domain & 0xff) << 56) |
                      (step & (((uint64_t)1 << 56) - 1));
    lb_philox_key k = {(uint32_t)seed, (uint32_t)(seed >> 32),
                       (uint32_t)stream, (uint32_t)(stream >> 32)};
    return k;
}

/* One Philox4x32-10 block for an explicit 128-bit counter and 64-bit key. */
static inline lb_u32x4 lb_philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2,
                                        uint32_t c3, uint32_t k0, uint32_t k1)
{
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0;
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
        uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    lb_u32x4 r = {{c0, c1, c2, c3}};
    return r;
}

/* The block for counter index `block` in the stream of `key`. */
static inline lb_u32x4 lb_philox_block(const lb_philox_key *key, uint64_t block)
{
    return lb_philox4x32_10((uint32_t)block, (uint32_t)(block >> 32), key->s0,
                            key->s1, key->k0, key->k1);
}

/* 64 random bits for counter index `block` (lanes 0 and 1). */
static inline uint64_t lb_philox_u64(const lb_philox_key *key, uint64_t block)
{
    lb_u32x4 r = lb_philox_block(key, block);
    return ((uint64_t)r.v[1] << 32) | r.v[0];
}

/* Uniform double in [0, 1) from 53 bits. */
static inline double lb_u64_to_unit(uint64_t r)
{
    return (double)(r >> 11) * (1.0 / 9007199254740992.0);
}

/* Unbiased integer in [0, bound) (bound >= 1), drawn from the blocks
 * block, block + stride, block + 2*stride, ... (Lemire's multiply-shift with
 * rejection on 64-bit words; a rejection needs a fresh block, so callers give
 * each draw its own arithmetic progression of counters).                   */
static inline uint64_t lb_philox_below(const lb_philox_key *key, uint64_t block,
                                       uint64_t stride, uint64_t bound)
{
    uint64_t threshold = (0 - bound) % bound;   /* 2^64 mod bound */
    for (;;) {
        uint64_t r = lb_philox_u64(key, block);
        __uint128_t m = (__uint128_t)r * bound;
        if ((uint64_t)m >= threshold)
            return (uint64_t)(m >> 64);
        block += stride;
    }
}

#endif /* LB_RNG_H */
