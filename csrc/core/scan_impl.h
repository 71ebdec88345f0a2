/*
 * scan_impl.h - template of the streaming leaf kernels declared in scan.h.
 * Included once per instruction set with LB_SCAN_SUFFIX defined; the
 * including file sets the target with #pragma GCC target and the compiler
 * vectorises the block-wise "any element qualifies?" tests.  No OpenMP here:
 * callers run these on per-thread ranges.
 */
#include <string.h>

#include "scan.h"

#define LB_CAT2(a, b) a##b
#define LB_CAT(a, b) LB_CAT2(a, b)
#define LB_SFX(name) LB_CAT(name, LB_SCAN_SUFFIX)

#define LB_SCAN_BLOCK 32

#define LB_DEFINE_COLLECT(BITS_T, MASK, INF, NAME)                              \
    static uint64_t NAME(const BITS_T *bits, uint64_t begin, uint64_t end,     \
                         BITS_T lo, uint64_t *idx, uint64_t *raw, uint64_t cap,\
                         int *nonfinite)                                       \
    {                                                                          \
        uint64_t found = 0;                                                    \
        BITS_T bad = 0;                                                        \
        uint64_t i = begin;                                                    \
        for (; i + LB_SCAN_BLOCK <= end; i += LB_SCAN_BLOCK) {                 \
            BITS_T any = 0;                                                    \
            const BITS_T *b = bits + i;                                        \
            for (int j = 0; j < LB_SCAN_BLOCK; j++) {                          \
                BITS_T key = b[j] & MASK;                                      \
                any |= (BITS_T)(key >= lo);                                    \
                bad |= (BITS_T)(key >= INF);                                   \
            }                                                                  \
            if (!any)                                                          \
                continue;                                                      \
            for (int j = 0; j < LB_SCAN_BLOCK; j++) {                          \
                if ((b[j] & MASK) >= lo) {                                     \
                    if (found < cap) {                                         \
                        idx[found] = i + (uint64_t)j;                          \
                        raw[found] = b[j];                                     \
                    }                                                          \
                    found++;                                                   \
                }                                                              \
            }                                                                  \
        }                                                                      \
        for (; i < end; i++) {                                                 \
            BITS_T key = bits[i] & MASK;                                       \
            bad |= (BITS_T)(key >= INF);                                       \
            if (key >= lo) {                                                   \
                if (found < cap) {                                             \
                    idx[found] = i;                                            \
                    raw[found] = bits[i];                                      \
                }                                                              \
                found++;                                                       \
            }                                                                  \
        }                                                                      \
        if (bad)                                                               \
            *nonfinite = 1;                                                    \
        return found;                                                          \
    }

#define LB_DEFINE_HIST(BITS_T, MASK, NAME)                                     \
    static void NAME(const BITS_T *bits, uint64_t begin, uint64_t end,         \
                     int shift, uint64_t *hist)                                \
    {                                                                          \
        uint64_t i = begin;                                                    \
        for (; i + 2 <= end; i += 2) {                                         \
            hist[(size_t)((bits[i] & MASK) >> shift)]++;                       \
            hist[(size_t)((bits[i + 1] & MASK) >> shift)]++;                   \
        }                                                                      \
        if (i < end)                                                           \
            hist[(size_t)((bits[i] & MASK) >> shift)]++;                       \
    }

/* An including file may supply its own (intrinsics) collect and ef_collect
 * kernels by defining LB_SCAN_OWN_COLLECT before including this template. */
#ifndef LB_SCAN_OWN_COLLECT
LB_DEFINE_COLLECT(uint32_t, LB_KEY32_MASK, LB_KEY32_INF, LB_SFX(collect32_))
LB_DEFINE_COLLECT(uint64_t, LB_KEY64_MASK, LB_KEY64_INF, LB_SFX(collect64_))
#endif
/* p = decay*e + scale*g into e, then collect on p's keys; the block's
 * arithmetic and "any qualifies?" test vectorise, hits are rare.          */
#define LB_DEFINE_EF_COLLECT(FT, BITS_T, MASK, INF, NAME)                       \
    static uint64_t NAME(FT *e, const FT *g, uint64_t begin, uint64_t end,     \
                         FT decay, FT scale, BITS_T lo, uint64_t *idx,         \
                         uint64_t *raw, uint64_t cap, int *nonfinite)          \
    {                                                                          \
        uint64_t found = 0;                                                    \
        BITS_T maxkey = 0;                                                     \
        for (uint64_t i = begin; i < end; i += LB_SCAN_BLOCK) {                \
            int len = end - i < LB_SCAN_BLOCK ? (int)(end - i) : LB_SCAN_BLOCK; \
            BITS_T any = 0;                                                    \
            for (int j = 0; j < len; j++) {                                    \
                FT t1 = decay * e[i + j];                                      \
                FT t2 = scale * g[i + j];                                      \
                FT p = t1 + t2;                                                \
                e[i + j] = p;                                                  \
                BITS_T bitsv;                                                  \
                memcpy(&bitsv, &p, sizeof bitsv);                              \
                BITS_T key = bitsv & MASK;                                     \
                any |= (BITS_T)(key >= lo);                                    \
                maxkey = key > maxkey ? key : maxkey;                          \
            }                                                                  \
            if (!any)                                                          \
                continue;                                                      \
            for (int j = 0; j < len; j++) {                                    \
                BITS_T bitsv;                                                  \
                memcpy(&bitsv, &e[i + j], sizeof bitsv);                       \
                if ((bitsv & MASK) >= lo) {                                    \
                    if (found < cap) {                                         \
                        idx[found] = i + (uint64_t)j;                          \
                        raw[found] = bitsv;                                    \
                    }                                                          \
                    found++;                                                   \
                }                                                              \
            }                                                                  \
        }                                                                      \
        if (maxkey >= INF)                                                     \
            *nonfinite = 1;                                                    \
        return found;                                                          \
    }

#ifndef LB_SCAN_OWN_COLLECT
LB_DEFINE_EF_COLLECT(float, uint32_t, LB_KEY32_MASK, LB_KEY32_INF, LB_SFX(ef_collect32_))
LB_DEFINE_EF_COLLECT(double, uint64_t, LB_KEY64_MASK, LB_KEY64_INF, LB_SFX(ef_collect64_))
#endif
/* ef_collect without the store: p of each block goes to a small buffer,
 * from which the (rare) qualifying elements are taken.                    */
#define LB_DEFINE_EFP_COLLECT(FT, BITS_T, MASK, INF, NAME)                      \
    static uint64_t NAME(const FT *e, const FT *g, uint64_t begin,             \
                         uint64_t end, FT decay, FT scale, BITS_T lo,          \
                         uint64_t *idx, uint64_t *raw, uint64_t cap,           \
                         int *nonfinite)                                       \
    {                                                                          \
        uint64_t found = 0;                                                    \
        BITS_T maxkey = 0;                                                     \
        BITS_T pb[LB_SCAN_BLOCK];                                              \
        for (uint64_t i = begin; i < end; i += LB_SCAN_BLOCK) {                \
            int len = end - i < LB_SCAN_BLOCK ? (int)(end - i) : LB_SCAN_BLOCK; \
            BITS_T any = 0;                                                    \
            for (int j = 0; j < len; j++) {                                    \
                FT t1 = decay * e[i + j];                                      \
                FT t2 = scale * g[i + j];                                      \
                FT p = t1 + t2;                                                \
                BITS_T bitsv;                                                  \
                memcpy(&bitsv, &p, sizeof bitsv);                              \
                pb[j] = bitsv;                                                 \
                BITS_T key = bitsv & MASK;                                     \
                any |= (BITS_T)(key >= lo);                                    \
                maxkey = key > maxkey ? key : maxkey;                          \
            }                                                                  \
            if (!any)                                                          \
                continue;                                                      \
            for (int j = 0; j < len; j++) {                                    \
                if ((pb[j] & MASK) >= lo) {                                    \
                    if (found < cap) {                                         \
                        idx[found] = i + (uint64_t)j;                          \
                        raw[found] = pb[j];                                    \
                    }                                                          \
                    found++;                                                   \
                }                                                              \
            }                                                                  \
        }                                                                      \
        if (maxkey >= INF)                                                     \
            *nonfinite = 1;                                                    \
        return found;                                                          \
    }

/* An including file may supply its own float32 read-only kernel by defining
 * LB_SCAN_OWN_EFP32.                                                      */
#ifndef LB_SCAN_OWN_EFP32
LB_DEFINE_EFP_COLLECT(float, uint32_t, LB_KEY32_MASK, LB_KEY32_INF, LB_SFX(efp_collect32_))
#endif
LB_DEFINE_EFP_COLLECT(double, uint64_t, LB_KEY64_MASK, LB_KEY64_INF, LB_SFX(efp_collect64_))
#ifndef LB_SCAN_OWN_CHUNK
/* Branch-free: every position is stored, the count advances on a hit;
 * the few raw bits are fetched afterwards (the chunk is in the cache). */
static uint32_t LB_SFX(chunk_collect32_)(const uint32_t *bits, uint32_t m,
                                         uint32_t lo, uint32_t *pos,
                                         uint32_t *raw)
{
    uint32_t o = 0;
    for (uint32_t b = 0; b < m; b += 16) {
        __builtin_prefetch(bits + b + LB_CHUNK_PREFETCH);
        uint32_t e = m - b < 16 ? m : b + 16;
        for (uint32_t j = b; j < e; j++) {
            pos[o] = j;
            o += (bits[j] & LB_KEY32_MASK) >= lo;
        }
    }
    for (uint32_t j = 0; j < o; j++)
        raw[j] = bits[pos[j]];
    return o;
}
#endif

/* The branch-free quickselect of select32 for a few keys. */
LB_DEFINE_SELECT_SMALL(uint32_t, LB_SFX(select32_tail_))

#ifndef LB_SCAN_OWN_CHUNK
static uint32_t LB_SFX(select32_)(uint32_t *a, uint32_t m, uint32_t r,
                                  uint32_t *t1, uint32_t *t2)
{
    (void)t2;
    return LB_SFX(select32_tail_)(a, m, r, t1);
}
#endif

LB_DEFINE_HIST(uint32_t, LB_KEY32_MASK, LB_SFX(hist32_))
LB_DEFINE_HIST(uint64_t, LB_KEY64_MASK, LB_SFX(hist64_))

const lb_scan_fns LB_SFX(lb_scan_) = {
    .collect32 = LB_SFX(collect32_),
    .collect64 = LB_SFX(collect64_),
    .ef_collect32 = LB_SFX(ef_collect32_),
    .ef_collect64 = LB_SFX(ef_collect64_),
    .efp_collect32 = LB_SFX(efp_collect32_),
    .efp_collect64 = LB_SFX(efp_collect64_),
    .hist32 = LB_SFX(hist32_),
    .hist64 = LB_SFX(hist64_),
    .chunk_collect32 = LB_SFX(chunk_collect32_),
    .select32 = LB_SFX(select32_),
};
