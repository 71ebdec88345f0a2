/* quant_avx512.c - quantization kernels compiled for AVX-512 (chosen at run
 * time): intrinsics sign bits (compare to a mask register), 16-wide Philox
 * (both streams), sign-magnitude codes and F16C conversions; the rest from the template, vectorised by the
 * compiler.                                                                 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#define LB_QUANT_SUFFIX avx512
#define LB_QUANT_OWN_SIGNBITS
#define LB_QUANT_OWN_PHILOX
#define LB_QUANT_OWN_F16
#define LB_QUANT_OWN_SMQ32
#define LB_QUANT_OWN_SMQBLOCKS32
#define LB_QUANT_OWN_MINIFLOAT32
#define LB_QUANT_OWN_MINIFLOATBLOCKS32
#include "quant.h"

static void signbits32_avx512(const float *x, uint64_t m, uint8_t *out);
static void signbits64_avx512(const double *x, uint64_t m, uint8_t *out);
static void philox_avx512(const lb_philox_key *key, uint64_t first, uint64_t nb,
                          uint32_t *out);
static void philox16_avx512(const lb_philox_key *key, uint64_t first, uint64_t ng,
                            uint32_t *out);
static void smq32_avx512(const float *x, uint64_t m, float unit, float clip, int L,
                         const uint32_t *rnd, uint8_t *codes);
static void smqblocks32_avx512(const float *x, uint64_t nb, uint64_t B, const float *units,
                               float clip, int L, const uint32_t *rnd, uint8_t *codes);
static void f32_to_f16_avx512(const float *x, uint64_t m, uint16_t *out);
static void minifloat32_avx512(const float *x, uint64_t m, float inv, int E, int M,
                               uint8_t *codes);
static void minifloatblocks32_avx512(const float *x, uint64_t nb, uint64_t B, const int8_t *k,
                                     int E, int M, uint8_t *codes);
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

/* hi and lo 32-bit halves of a * m for the 16 lanes of a: the even lanes'
 * products, and the odd lanes' ones, with the halves swapped into place
 * by one masked in-pair shuffle each.                                      */
static inline void mulhilo_avx512(__m512i a, __m512i m, __m512i *hi, __m512i *lo)
{
    __m512i even = _mm512_mul_epu32(a, m);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
    *lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
}

/* Ten Philox4x32 rounds on nq batches of 16 counters (c[4 q + l] holds
 * word l of batch q); several batches interleave their latency chains.   */
static inline __attribute__((always_inline)) void
philox_rounds_avx512(__m512i *c, int nq, const lb_philox_key *key)
{
    const __m512i M0 = _mm512_set1_epi32((int)0xD2511F53u);
    const __m512i M1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    uint32_t k0 = key->k0, k1 = key->k1;
    for (int r = 0; r < 10; r++) {
        __m512i K0 = _mm512_set1_epi32((int)k0), K1 = _mm512_set1_epi32((int)k1);
        for (int q = 0; q < nq; q++) {
            __m512i *v = c + 4 * q, hi0, lo0, hi1, lo1;
            mulhilo_avx512(v[0], M0, &hi0, &lo0);
            mulhilo_avx512(v[2], M1, &hi1, &lo1);
            v[0] = _mm512_ternarylogic_epi32(hi1, v[1], K0, 0x96);
            v[1] = lo1;
            v[2] = _mm512_ternarylogic_epi32(hi0, v[3], K1, 0x96);
            v[3] = lo0;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

static void philox_avx512(const lb_philox_key *key, uint64_t first, uint64_t nb,
                          uint32_t *out)
{
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                           12, 13, 14, 15);
    uint64_t b = 0;
    for (; b + 16 <= nb; b += 16) {
        uint64_t base = first + b;
        __m512i lo = _mm512_set1_epi32((int)(uint32_t)base), c[4];
        c[0] = _mm512_add_epi32(lo, lane);
        __mmask16 wrapped = _mm512_cmplt_epu32_mask(c[0], lo);
        c[1] = _mm512_mask_add_epi32(_mm512_set1_epi32((int)(uint32_t)(base >> 32)), wrapped,
                                     _mm512_set1_epi32((int)(uint32_t)(base >> 32)),
                                     _mm512_set1_epi32(1));
        c[2] = _mm512_set1_epi32((int)key->s0);
        c[3] = _mm512_set1_epi32((int)key->s1);
        philox_rounds_avx512(c, 1, key);
        __m512i c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
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


/* philox16 of quant.h: one 16-lane batch per group, two groups
 * interleaved (counters 16 g + j never carry into the high word: 16 g is
 * a multiple of 16).                                                       */
static inline __attribute__((always_inline)) void
philox16_groups_avx512(const lb_philox_key *key, uint64_t first, int nq, uint32_t *out)
{
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                           14, 15);
    const __m512i himask = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512i c[8];
    for (int q = 0; q < nq; q++) {
        uint64_t base = 16 * (first + (uint64_t)q);
        c[4 * q] = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), lane);
        c[4 * q + 1] = _mm512_set1_epi32((int)(uint32_t)(base >> 32));
        c[4 * q + 2] = _mm512_set1_epi32((int)key->s0);
        c[4 * q + 3] = _mm512_set1_epi32((int)key->s1);
    }
    philox_rounds_avx512(c, nq, key);
    for (int q = 0; q < nq; q++)
        for (int l = 0; l < 4; l++) {
            uint32_t *o = out + LB_SR16 * q;
            _mm512_storeu_si512(o + 16 * l, _mm512_slli_epi32(c[4 * q + l], 16));
            _mm512_storeu_si512(o + 64 + 16 * l, _mm512_and_si512(c[4 * q + l], himask));
        }
}

static void philox16_avx512(const lb_philox_key *key, uint64_t first, uint64_t ng,
                            uint32_t *out)
{
    uint64_t g = 0;
    for (; g + 2 <= ng; g += 2)
        philox16_groups_avx512(key, first + g, 2, out + LB_SR16 * g);
    if (g < ng)
        philox16_groups_avx512(key, first + g, 1, out + LB_SR16 * g);
}

/* 16 codes of smq32 (quant.h) for xv, rnd NULL or its 16 words: the
 * template's operations in its order (min/compares chosen so NaN picks the
 * same operand as the scalar loop), so the codes equal it.                */
static inline __attribute__((always_inline)) __m128i
smq16_avx512(__m512 xv, __m512 vunit, __m512 vclip, __m512 fL, __m512i vL,
             const uint32_t *rnd)
{
    const __m512 one = _mm512_set1_ps(1.0f), u24 = _mm512_set1_ps((float)LB_U24);
    __m512 t = _mm512_div_ps(_mm512_min_ps(_mm512_abs_ps(xv), vclip), vunit), l;
    if (!rnd) {
        l = _mm512_roundscale_ps(t, _MM_FROUND_CUR_DIRECTION);
    } else {   /* floor(t): the template's rint(t) - (rint(t) > t), NaN kept */
        l = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 u = _mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_loadu_si512(rnd), 8));
        __mmask16 up = _mm512_cmp_ps_mask(u, _mm512_mul_ps(_mm512_sub_ps(t, l), u24),
                                          _CMP_LT_OQ);
        l = _mm512_mask_add_ps(l, up, l, one);
    }
    __m512i q = _mm512_cvttps_epi32(_mm512_min_ps(l, fL));
    __mmask16 neg = _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_cvtepi32_epi8(_mm512_mask_sub_epi32(_mm512_add_epi32(vL, q), neg, vL, q));
}

static void smq32_avx512(const float *x, uint64_t m, float unit, float clip, int L,
                         const uint32_t *rnd, uint8_t *codes)
{
    const __m512 vunit = _mm512_set1_ps(unit), vclip = _mm512_set1_ps(clip);
    const __m512 fL = _mm512_set1_ps((float)L);
    const __m512i vL = _mm512_set1_epi32(L);
    uint64_t j = 0;
    for (; j + 16 <= m; j += 16)
        _mm_storeu_si128((__m128i *)(codes + j),
                         smq16_avx512(_mm512_loadu_ps(x + j), vunit, vclip, fL, vL,
                                      rnd ? rnd + j : NULL));
    smq32_tail_avx512(x + j, m - j, unit, clip, L, rnd ? rnd + j : NULL, codes + j);
}

/* smqblocks32 of quant.h: blocks of a multiple of 16 elements in one loop
 * (no call per block), others through smq32.                              */
static void smqblocks32_avx512(const float *x, uint64_t nb, uint64_t B, const float *units,
                               float clip, int L, const uint32_t *rnd, uint8_t *codes)
{
    const __m512 vclip = _mm512_set1_ps(clip), fL = _mm512_set1_ps((float)L);
    const __m512i vL = _mm512_set1_epi32(L);
    for (uint64_t b = 0; b < nb; b++) {
        const float *xb = x + b * B;
        const uint32_t *rb = rnd ? rnd + b * B : NULL;
        uint8_t *cb = codes + b * B;
        if (units[b] == 0.0f) {
            memset(cb, L, (size_t)B);
        } else if (B % 16) {
            smq32_avx512(xb, B, units[b], clip, L, rb, cb);
        } else {
            const __m512 vunit = _mm512_set1_ps(units[b]);
            if (rb)
                for (uint64_t j = 0; j < B; j += 16)
                    _mm_storeu_si128((__m128i *)(cb + j),
                                     smq16_avx512(_mm512_loadu_ps(xb + j), vunit, vclip, fL,
                                                  vL, rb + j));
            else
                for (uint64_t j = 0; j < B; j += 16)
                    _mm_storeu_si128((__m128i *)(cb + j),
                                     smq16_avx512(_mm512_loadu_ps(xb + j), vunit, vclip, fL,
                                                  vL, NULL));
        }
    }
}

/* The constants of minifloat32 (quant.h) for E, M in 16 lanes. */
typedef struct {
    __m512 two23;
    __m512i maxb, pminb, c254M, K, cmax, absmask, S, negfinite;
    __m128i M;
} mf_consts_avx512;

static inline mf_consts_avx512 mf_consts_make_avx512(int E, int M)
{
    const float maxval = 2.0f - 1.0f / (float)(1 << M);
    int32_t maxb;
    memcpy(&maxb, &maxval, 4);
    mf_consts_avx512 c;
    c.two23 = _mm512_set1_ps(8388608.0f);
    c.maxb = _mm512_set1_epi32(maxb);
    /* q = max(biased exponent of y, pmin + 127) = p + 127; the scale's
     * exponent 127 + M - p = 254 + M - q; the magnitude
     * ((p - pmin) << M) + (bits(t) - bits(2^23)) = (q << M) + bits(t) - K  */
    c.pminb = _mm512_set1_epi32(2 - (1 << E) + 127);
    c.c254M = _mm512_set1_epi32(254 + M);
    c.K = _mm512_set1_epi32(((127 + 23) << 23) + ((2 - (1 << E) + 127) << M));
    c.cmax = _mm512_set1_epi32((1 << (E + M)) - 1);
    c.absmask = _mm512_set1_epi32(0x7FFFFFFF);
    c.S = _mm512_set1_epi32(1 << (E + M));
    c.negfinite = _mm512_set1_epi32(-8388607);   /* bits < this: x < 0, not NaN */
    c.M = _mm_cvtsi32_si128(M);
    return c;
}

/* 16 codes of minifloat32 (quant.h): the template's steps on the bit
 * patterns, with signed compares (every pattern compared has its sign bit
 * clear, or is compared as a signed value on purpose), so the codes equal
 * the scalar loop's.                                                        */
static inline __attribute__((always_inline)) __m128i
mf16_avx512(const float *x, __m512 vinv, const mf_consts_avx512 *c)
{
    __m512i vb = _mm512_loadu_si512(x);
    __m512 y = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(vb, c->absmask)), vinv);
    __m512i yb = _mm512_castps_si512(y);
    __mmask16 ok = _mm512_cmplt_epi32_mask(yb, c->maxb);
    yb = _mm512_maskz_mov_epi32(ok, yb);
    __m512i q = _mm512_max_epi32(_mm512_srli_epi32(yb, 23), c->pminb);
    __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(c->c254M, q), 23));
    __m512 t = _mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(yb), sc), c->two23);
    __m512i mag = _mm512_sub_epi32(_mm512_add_epi32(_mm512_sll_epi32(q, c->M), _mm512_castps_si512(t)),
                                   c->K);
    mag = _mm512_mask_mov_epi32(_mm512_min_epi32(mag, c->cmax), (__mmask16)~ok, c->cmax);
    __mmask16 neg = _mm512_test_epi32_mask(mag, mag) & _mm512_cmplt_epi32_mask(vb, c->negfinite);
    return _mm512_cvtepi32_epi8(_mm512_mask_or_epi32(mag, neg, mag, c->S));
}

static void minifloat32_avx512(const float *x, uint64_t m, float inv, int E, int M,
                               uint8_t *codes)
{
    const mf_consts_avx512 c = mf_consts_make_avx512(E, M);
    const __m512 vinv = _mm512_set1_ps(inv);
    uint64_t j = 0;
    for (; j + 16 <= m; j += 16)
        _mm_storeu_si128((__m128i *)(codes + j), mf16_avx512(x + j, vinv, &c));
    minifloat32_tail_avx512(x + j, m - j, inv, E, M, codes + j);
}

/* minifloatblocks32 of quant.h: blocks of a multiple of 16 elements in one
 * loop, the constants set once.                                            */
static void minifloatblocks32_avx512(const float *x, uint64_t nb, uint64_t B, const int8_t *k,
                                     int E, int M, uint8_t *codes)
{
    const mf_consts_avx512 c = mf_consts_make_avx512(E, M);
    for (uint64_t b = 0; b < nb; b++) {
        float inv = lb_f32_pow2(-k[b]);
        if (B % 16) {
            minifloat32_avx512(x + b * B, B, inv, E, M, codes + b * B);
            continue;
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        for (uint64_t j = b * B; j < (b + 1) * B; j += 16)
            _mm_storeu_si128((__m128i *)(codes + j), mf16_avx512(x + j, vinv, &c));
    }
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
