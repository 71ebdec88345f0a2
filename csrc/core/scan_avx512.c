/* scan_avx512.c - scan kernels compiled for AVX-512 (chosen at run time):
 * intrinsics collect kernels (compare mask, then pack the flagged lanes), the
 * histogram kernels from the template.                                     */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")
#include <immintrin.h>

#include "scan_mask_collect.h"

/* LB_STORE_MASKED for 16 float32 lanes by compression: the flagged lanes'
 * indices (i + lane) and raw bits (rawv, widened) are packed with
 * vpcompressq and written with masked stores, in lane order, with no
 * branch per set bit; near `cap` the bit walk (over rawv's lanes, spilled)
 * keeps its bound exactly.                                                 */
static inline uint64_t lb_store_compress32(__mmask16 m, uint64_t i, __m512i rawv,
                                           uint64_t *idx, uint64_t *raw,
                                           uint64_t cap, uint64_t found)
{
    if (cap < 16 || found > cap - 16) {
        uint32_t lanes[16];
        _mm512_storeu_si512(lanes, rawv);
        for (unsigned bitsleft = m; bitsleft; bitsleft &= bitsleft - 1) {
            unsigned j = (unsigned)__builtin_ctz(bitsleft);
            if (found < cap) {
                idx[found] = i + j;
                raw[found] = lanes[j];
            }
            found++;
        }
        return found;
    }
    const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i lo = _mm512_add_epi64(_mm512_set1_epi64((long long)i), iota);
    __m512i hi = _mm512_add_epi64(lo, _mm512_set1_epi64(8));
    __m512i rlo = _mm512_cvtepu32_epi64(_mm512_castsi512_si256(rawv));
    __m512i rhi = _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(rawv, 1));
    __mmask8 ml = (__mmask8)m, mh = (__mmask8)(m >> 8);
    unsigned cl = (unsigned)__builtin_popcount(ml), ch = (unsigned)__builtin_popcount(mh);
    __mmask8 wl = (__mmask8)((1u << cl) - 1), wh = (__mmask8)((1u << ch) - 1);
    _mm512_mask_storeu_epi64(idx + found, wl, _mm512_maskz_compress_epi64(ml, lo));
    _mm512_mask_storeu_epi64(raw + found, wl, _mm512_maskz_compress_epi64(ml, rlo));
    found += cl;
    _mm512_mask_storeu_epi64(idx + found, wh, _mm512_maskz_compress_epi64(mh, hi));
    _mm512_mask_storeu_epi64(raw + found, wh, _mm512_maskz_compress_epi64(mh, rhi));
    return found + ch;
}

#define LB_SCAN_SUFFIX avx512
#define LB_SCAN_OWN_COLLECT

static uint64_t collect32_avx512(const uint32_t *bits, uint64_t begin,
                                 uint64_t end, uint32_t lo, uint64_t *idx,
                                 uint64_t *raw, uint64_t cap, int *nonfinite);
static uint64_t collect64_avx512(const uint64_t *bits, uint64_t begin,
                                 uint64_t end, uint64_t lo, uint64_t *idx,
                                 uint64_t *raw, uint64_t cap, int *nonfinite);
static uint64_t ef_collect32_avx512(float *e, const float *g, uint64_t begin,
                                    uint64_t end, float decay, float scale,
                                    uint32_t lo, uint64_t *idx, uint64_t *raw,
                                    uint64_t cap, int *nonfinite);
static uint64_t ef_collect64_avx512(double *e, const double *g, uint64_t begin,
                                    uint64_t end, double decay, double scale,
                                    uint64_t lo, uint64_t *idx, uint64_t *raw,
                                    uint64_t cap, int *nonfinite);
static uint64_t efp_collect32_avx512(const float *e, const float *g, uint64_t begin,
                                     uint64_t end, float decay, float scale,
                                     uint32_t lo, uint64_t *idx, uint64_t *raw,
                                     uint64_t cap, int *nonfinite);
#define LB_SCAN_OWN_EFP32
#define LB_SCAN_OWN_CHUNK
static uint32_t chunk_collect32_avx512(const uint32_t *bits, uint32_t m,
                                       uint32_t lo, uint32_t *pos,
                                       uint32_t *raw);
static uint32_t select32_avx512(uint32_t *a, uint32_t m, uint32_t r,
                                uint32_t *t1, uint32_t *t2);
#include "scan_impl.h"

/* 16 lanes a step: the flagged lanes' positions and raw bits packed with
 * vpcompressd into registers and stored whole (the slack takes the rest). */
static uint32_t chunk_collect32_avx512(const uint32_t *bits, uint32_t m,
                                       uint32_t lo, uint32_t *pos,
                                       uint32_t *raw)
{
    const __m512i maskv = _mm512_set1_epi32((int)LB_KEY32_MASK);
    const __m512i lov = _mm512_set1_epi32((int)lo);
    const __m512i sixteen = _mm512_set1_epi32(16);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    uint32_t o = 0, j = 0;
    for (; j < m; j += 16) {
        __mmask16 lanes = m - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - j)) - 1);
        __builtin_prefetch(bits + j + LB_CHUNK_PREFETCH);
        __m512i rawv = _mm512_maskz_loadu_epi32(lanes, bits + j);
        __m512i key = _mm512_and_si512(rawv, maskv);
        __mmask16 hit = _mm512_mask_cmpge_epu32_mask(lanes, key, lov);
        _mm512_storeu_si512(pos + o, _mm512_maskz_compress_epi32(hit, at));
        _mm512_storeu_si512(raw + o, _mm512_maskz_compress_epi32(hit, rawv));
        o += (uint32_t)__builtin_popcount(hit);
        at = _mm512_add_epi32(at, sixteen);
    }
    return o;
}

/* Quickselect whose partition packs the keys above and below the pivot
 * into two other buffers 16 at a time; the last few keys go to the
 * branch-free scalar select.                                             */
static uint32_t select32_avx512(uint32_t *a, uint32_t m, uint32_t r,
                                uint32_t *t1, uint32_t *t2)
{
    uint32_t *p = a, *g = t1, *l = t2;
    while (m > 64) {
        uint32_t x = p[0], y = p[m / 2], z = p[m - 1];
        uint32_t mn = x < y ? x : y, mx = x < y ? y : x;
        uint32_t piv = mx < z ? mx : z;
        piv = mn > piv ? mn : piv;
        const __m512i pv = _mm512_set1_epi32((int)piv);
        uint32_t ng = 0, nl = 0;
        for (uint32_t j = 0; j < m; j += 16) {
            __mmask16 lanes = m - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - j)) - 1);
            __m512i v = _mm512_maskz_loadu_epi32(lanes, p + j);
            __mmask16 gt = _mm512_mask_cmpgt_epu32_mask(lanes, v, pv);
            __mmask16 lt = _mm512_mask_cmplt_epu32_mask(lanes, v, pv);
            _mm512_storeu_si512(g + ng, _mm512_maskz_compress_epi32(gt, v));
            _mm512_storeu_si512(l + nl, _mm512_maskz_compress_epi32(lt, v));
            ng += (uint32_t)__builtin_popcount(gt);
            nl += (uint32_t)__builtin_popcount(lt);
        }
        uint32_t *t = p;
        if (r <= ng) {
            p = g;
            m = ng;
            g = t;
        } else if (r <= m - nl) {
            return piv;
        } else {
            r -= m - nl;
            p = l;
            m = nl;
            l = t;
        }
    }
    return select32_tail_avx512(p, m, r, g);
}

static uint64_t collect32_avx512(const uint32_t *bits, uint64_t begin,
                                 uint64_t end, uint32_t lo, uint64_t *idx,
                                 uint64_t *raw, uint64_t cap, int *nonfinite)
{
    const __m512i maskv = _mm512_set1_epi32((int)LB_KEY32_MASK);
    const __m512i lov = _mm512_set1_epi32((int)lo);
    __m512i maxkey = _mm512_setzero_si512();
    uint64_t found = 0, i = begin;
    for (; i + 16 <= end; i += 16) {
        __m512i rawv = _mm512_loadu_si512(bits + i);
        __m512i key = _mm512_and_si512(rawv, maskv);
        maxkey = _mm512_max_epu32(maxkey, key);
        __mmask16 m = _mm512_cmpge_epu32_mask(key, lov);
        if (m)
            found = lb_store_compress32(m, i, rawv, idx, raw, cap, found);
    }
    if (i < end) {
        __mmask16 tail = (__mmask16)((1u << (end - i)) - 1);
        __m512i rawv = _mm512_maskz_loadu_epi32(tail, bits + i);
        __m512i key = _mm512_and_si512(rawv, maskv);
        maxkey = _mm512_max_epu32(maxkey, key);
        __mmask16 m = _mm512_mask_cmpge_epu32_mask(tail, key, lov);
        found = lb_store_compress32(m, i, rawv, idx, raw, cap, found);
    }
    if (_mm512_reduce_max_epu32(maxkey) >= LB_KEY32_INF)
        *nonfinite = 1;
    return found;
}

static uint64_t collect64_avx512(const uint64_t *bits, uint64_t begin,
                                 uint64_t end, uint64_t lo, uint64_t *idx,
                                 uint64_t *raw, uint64_t cap, int *nonfinite)
{
    const __m512i maskv = _mm512_set1_epi64((long long)LB_KEY64_MASK);
    const __m512i lov = _mm512_set1_epi64((long long)lo);
    __m512i maxkey = _mm512_setzero_si512();
    uint64_t found = 0, i = begin;
    for (; i + 8 <= end; i += 8) {
        __m512i key = _mm512_and_si512(_mm512_loadu_si512(bits + i), maskv);
        maxkey = _mm512_max_epu64(maxkey, key);
        __mmask8 m = _mm512_cmpge_epu64_mask(key, lov);
        if (m)
            LB_STORE_MASKED(m, i, bits, idx, raw, cap, found);
    }
    if (i < end) {
        __mmask8 tail = (__mmask8)((1u << (end - i)) - 1);
        __m512i key = _mm512_and_si512(_mm512_maskz_loadu_epi64(tail, bits + i), maskv);
        maxkey = _mm512_max_epu64(maxkey, key);
        __mmask8 m = _mm512_mask_cmpge_epu64_mask(tail, key, lov);
        LB_STORE_MASKED(m, i, bits, idx, raw, cap, found);
    }
    if (_mm512_reduce_max_epu64(maxkey) >= LB_KEY64_INF)
        *nonfinite = 1;
    return found;
}
/* p = decay*e + scale*g (mul, mul, add: no FMA), stored into e, collected */
static uint64_t ef_collect32_avx512(float *e, const float *g, uint64_t begin,
                                    uint64_t end, float decay, float scale,
                                    uint32_t lo, uint64_t *idx, uint64_t *raw,
                                    uint64_t cap, int *nonfinite)
{
    const __m512 dv = _mm512_set1_ps(decay), sv = _mm512_set1_ps(scale);
    const __m512i maskv = _mm512_set1_epi32((int)LB_KEY32_MASK);
    const __m512i lov = _mm512_set1_epi32((int)lo);
    __m512i maxkey = _mm512_setzero_si512();
    uint64_t found = 0, i = begin;
    for (; i < end; i += 16) {
        __mmask16 lanes = end - i >= 16 ? (__mmask16)0xFFFF
                                        : (__mmask16)((1u << (end - i)) - 1);
        __m512 ev = _mm512_maskz_loadu_ps(lanes, e + i);
        __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i);
        __m512 p = _mm512_add_ps(_mm512_mul_ps(dv, ev), _mm512_mul_ps(sv, gv));
        _mm512_mask_storeu_ps(e + i, lanes, p);
        __m512i key = _mm512_and_si512(_mm512_castps_si512(p), maskv);
        maxkey = _mm512_mask_max_epu32(maxkey, lanes, maxkey, key);
        __mmask16 m = _mm512_mask_cmpge_epu32_mask(lanes, key, lov);
        if (m)
            found = lb_store_compress32(m, i, _mm512_castps_si512(p), idx, raw, cap, found);
    }
    if (_mm512_reduce_max_epu32(maxkey) >= LB_KEY32_INF)
        *nonfinite = 1;
    return found;
}

static uint64_t ef_collect64_avx512(double *e, const double *g, uint64_t begin,
                                    uint64_t end, double decay, double scale,
                                    uint64_t lo, uint64_t *idx, uint64_t *raw,
                                    uint64_t cap, int *nonfinite)
{
    const __m512d dv = _mm512_set1_pd(decay), sv = _mm512_set1_pd(scale);
    const __m512i maskv = _mm512_set1_epi64((long long)LB_KEY64_MASK);
    const __m512i lov = _mm512_set1_epi64((long long)lo);
    __m512i maxkey = _mm512_setzero_si512();
    const uint64_t *bits = (const uint64_t *)e;
    uint64_t found = 0, i = begin;
    for (; i < end; i += 8) {
        __mmask8 lanes = end - i >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (end - i)) - 1);
        __m512d ev = _mm512_maskz_loadu_pd(lanes, e + i);
        __m512d gv = _mm512_maskz_loadu_pd(lanes, g + i);
        __m512d p = _mm512_add_pd(_mm512_mul_pd(dv, ev), _mm512_mul_pd(sv, gv));
        _mm512_mask_storeu_pd(e + i, lanes, p);
        __m512i key = _mm512_and_si512(_mm512_castpd_si512(p), maskv);
        maxkey = _mm512_mask_max_epu64(maxkey, lanes, maxkey, key);
        __mmask8 m = _mm512_mask_cmpge_epu64_mask(lanes, key, lov);
        if (m)
            LB_STORE_MASKED(m, i, bits, idx, raw, cap, found);
    }
    if (_mm512_reduce_max_epu64(maxkey) >= LB_KEY64_INF)
        *nonfinite = 1;
    return found;
}
/* ef_collect32_avx512 without the store: e and g are only read. */
static uint64_t efp_collect32_avx512(const float *e, const float *g, uint64_t begin,
                                     uint64_t end, float decay, float scale,
                                     uint32_t lo, uint64_t *idx, uint64_t *raw,
                                     uint64_t cap, int *nonfinite)
{
    const __m512 dv = _mm512_set1_ps(decay), sv = _mm512_set1_ps(scale);
    const __m512i maskv = _mm512_set1_epi32((int)LB_KEY32_MASK);
    const __m512i lov = _mm512_set1_epi32((int)lo);
    __m512i maxkey = _mm512_setzero_si512();
    uint64_t found = 0, i = begin;
    for (; i < end; i += 16) {
        __mmask16 lanes = end - i >= 16 ? (__mmask16)0xFFFF
                                        : (__mmask16)((1u << (end - i)) - 1);
        __m512 ev = _mm512_maskz_loadu_ps(lanes, e + i);
        __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i);
        __m512 p = _mm512_add_ps(_mm512_mul_ps(dv, ev), _mm512_mul_ps(sv, gv));
        __m512i key = _mm512_and_si512(_mm512_castps_si512(p), maskv);
        maxkey = _mm512_mask_max_epu32(maxkey, lanes, maxkey, key);
        __mmask16 m = _mm512_mask_cmpge_epu32_mask(lanes, key, lov);
        if (m)
            found = lb_store_compress32(m, i, _mm512_castps_si512(p), idx, raw, cap, found);
    }
    if (_mm512_reduce_max_epu32(maxkey) >= LB_KEY32_INF)
        *nonfinite = 1;
    return found;
}

#else
#include "scan.h"
const lb_scan_fns lb_scan_avx512 = {0};
#endif
