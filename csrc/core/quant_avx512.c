/* quant_avx512.c - quantization kernels compiled for AVX-512 (chosen at run
 * time): intrinsics sign bits (compare to a mask register), 16-wide Philox
 * and F16C conversions; the rest from the template, vectorised by the
 * compiler.                                                                 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#define LB_QUANT_SUFFIX avx512
#define LB_QUANT_OWN_SIGNBITS
#define LB_QUANT_OWN_PHILOX
#define LB_QUANT_OWN_F16
#include "quant.h"

static void signbits32_avx512(const float *x, uint64_t m, uint8_t *out);
static void signbits64_avx512(const double *x, uint64_t m, uint8_t *out);
static void philox_avx512(const lb_philox_key *key, uint64_t first, uint64_t nb,
                          uint32_t *out);
static void f32_to_f16_avx512(const float *x, uint64_t m, uint16_t *out);
static void f16_to_f32_avx512(const uint16_t *x, uint64_t m, float *out);
#include "quant_impl.h"

static void signbits32_avx512(const float *x, uint64_t m, uint8_t *out)
{
    const __m512 zero = _mm512_setzero_ps();
    uint64_t i = 0;
    for (; i + 64 <= m; i += 64) {
        uint64_t w = 0;
        for (int q = 0; q < 4; q++)
            w |= (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 16 * q), zero,
                                              _CMP_GE_OQ) << (16 * q);
        memcpy(out + i / 8, &w, 8);
    }
    for (; i < m; i += 16) {
        uint64_t left = m - i < 16 ? m - i : 16;
        __mmask16 tail = (__mmask16)((1u << left) - 1);
        __mmask16 k = _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, x + i),
                                              zero, _CMP_GE_OQ);
        out[i / 8] = (uint8_t)k;
        if (left > 8)
            out[i / 8 + 1] = (uint8_t)(k >> 8);
    }
}

static void signbits64_avx512(const double *x, uint64_t m, uint8_t *out)
{
    const __m512d zero = _mm512_setzero_pd();
    for (uint64_t i = 0; i < m; i += 8) {
        uint64_t left = m - i < 8 ? m - i : 8;
        __mmask8 tail = (__mmask8)((1u << left) - 1);
        out[i / 8] = (uint8_t)_mm512_mask_cmp_pd_mask(
            tail, _mm512_maskz_loadu_pd(tail, x + i), zero, _CMP_GE_OQ);
    }
}

static inline void mulhilo_avx512(__m512i a, __m512i m, __m512i *hi, __m512i *lo)
{
    __m512i even = _mm512_mul_epu32(a, m);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

static void philox_avx512(const lb_philox_key *key, uint64_t first, uint64_t nb,
                          uint32_t *out)
{
    const __m512i M0 = _mm512_set1_epi32((int)0xD2511F53u);
    const __m512i M1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                           12, 13, 14, 15);
    uint64_t b = 0;
    for (; b + 16 <= nb; b += 16) {
        uint64_t base = first + b;
        __m512i lo = _mm512_set1_epi32((int)(uint32_t)base);
        __m512i c0 = _mm512_add_epi32(lo, lane);
        __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0, lo);
        __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32((int)(uint32_t)(base >> 32)),
                                           wrapped, _mm512_set1_epi32((int)(uint32_t)(base >> 32)),
                                           _mm512_set1_epi32(1));
        __m512i c2 = _mm512_set1_epi32((int)key->s0);
        __m512i c3 = _mm512_set1_epi32((int)key->s1);
        uint32_t k0 = key->k0, k1 = key->k1;
        for (int r = 0; r < 10; r++) {
            __m512i hi0, lo0, hi1, lo1;
            mulhilo_avx512(c0, M0, &hi0, &lo0);
            mulhilo_avx512(c2, M1, &hi1, &lo1);
            c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32((int)k0), 0x96);
            c1 = lo1;
            c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32((int)k1), 0x96);
            c3 = lo0;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        /* transpose: block j's four words become out[4j .. 4j + 3] */
        __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
        __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
        __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
        __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
        /* u0 holds blocks 0,4,8,12; u1 1,5,9,13; u2 2,6,10,14; u3 3,7,11,15 */
        __m512i x0 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0));
        __m512i x1 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(2, 0, 2, 0));
        __m512i x2 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1));
        __m512i x3 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 1, 3, 1));
        uint32_t *o = out + 4 * b;
        _mm512_storeu_si512(o, _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
        _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1)));
    }
    philox_tail_avx512(key, first + b, nb - b, out + 4 * b);
}

static void f32_to_f16_avx512(const float *x, uint64_t m, uint16_t *out)
{
    uint64_t j = 0;
    for (; j + 16 <= m; j += 16)
        _mm256_storeu_si256((__m256i *)(out + j),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < m; j++) {
        uint32_t b;
        memcpy(&b, x + j, 4);
        out[j] = lb_f32_to_f16_bits(b);
    }
}

static void f16_to_f32_avx512(const uint16_t *x, uint64_t m, float *out)
{
    uint64_t j = 0;
    for (; j + 16 <= m; j += 16)
        _mm512_storeu_ps(out + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + j))));
    for (; j < m; j++) {
        uint32_t b = lb_f16_bits_to_f32(x[j]);
        memcpy(out + j, &b, 4);
    }
}
#else
#include "quant.h"
const lb_quant_fns lb_quant_avx512 = {0};
#endif
