/* scan_avx512.c - scan kernels compiled for AVX-512 (chosen at run time):
 * intrinsics collect kernels (compare mask, then walk its set bits), the
 * histogram kernels from the template.                                     */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")
#include <immintrin.h>

#include "scan_mask_collect.h"
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
#include "scan_impl.h"

static uint64_t collect32_avx512(const uint32_t *bits, uint64_t begin,
                                 uint64_t end, uint32_t lo, uint64_t *idx,
                                 uint64_t *raw, uint64_t cap, int *nonfinite)
{
    const __m512i maskv = _mm512_set1_epi32((int)LB_KEY32_MASK);
    const __m512i lov = _mm512_set1_epi32((int)lo);
    __m512i maxkey = _mm512_setzero_si512();
    uint64_t found = 0, i = begin;
    for (; i + 16 <= end; i += 16) {
        __m512i key = _mm512_and_si512(_mm512_loadu_si512(bits + i), maskv);
        maxkey = _mm512_max_epu32(maxkey, key);
        __mmask16 m = _mm512_cmpge_epu32_mask(key, lov);
        if (m)
            LB_STORE_MASKED(m, i, bits, idx, raw, cap, found);
    }
    if (i < end) {
        __mmask16 tail = (__mmask16)((1u << (end - i)) - 1);
        __m512i key = _mm512_and_si512(_mm512_maskz_loadu_epi32(tail, bits + i), maskv);
        maxkey = _mm512_max_epu32(maxkey, key);
        __mmask16 m = _mm512_mask_cmpge_epu32_mask(tail, key, lov);
        LB_STORE_MASKED(m, i, bits, idx, raw, cap, found);
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
    const uint32_t *bits = (const uint32_t *)e;
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
            LB_STORE_MASKED(m, i, bits, idx, raw, cap, found);
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
#else
#include "scan.h"
const lb_scan_fns lb_scan_avx512 = {0};
#endif
