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
#else
#include "scan.h"
const lb_scan_fns lb_scan_avx512 = {0};
#endif
