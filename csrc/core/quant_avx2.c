/* quant_avx2.c - quantization kernels compiled for AVX2 (chosen at run
 * time): intrinsics sign bits (compare + movemask), 8-wide Philox,
 * block maxima, sign-magnitude codes and F16C conversions; the rest from the template,
 * vectorised by the compiler.                                              */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#include <immintrin.h>

#define LB_QUANT_SUFFIX avx2
#define LB_QUANT_OWN_SIGNBITS
#define LB_QUANT_OWN_PHILOX
#define LB_QUANT_OWN_F16
#define LB_QUANT_OWN_SMQ32
#define LB_QUANT_OWN_SMQBLOCKS32
#define LB_QUANT_OWN_MINIFLOAT32
#define LB_QUANT_OWN_MINIFLOATBLOCKS32
#define LB_QUANT_OWN_BLOCKMAX32
#include "quant.h"

static void signbits32_avx2(const float *x, uint64_t m, uint8_t *out);
static void signbits64_avx2(const double *x, uint64_t m, uint8_t *out);
static void philox_avx2(const lb_philox_key *key, uint64_t first, uint64_t nb,
                        uint32_t *out);
static void philox16_avx2(const lb_philox_key *key, uint64_t first, uint64_t ng,
                          uint32_t *out);
static void f32_to_f16_avx2(const float *x, uint64_t m, uint16_t *out);
static void minifloat32_avx2(const float *x, uint64_t m, float inv, int E, int M,
                             uint8_t *codes);
static void minifloatblocks32_avx2(const float *x, uint64_t nb, uint64_t B, const int8_t *k,
                                     int E, int M, uint8_t *codes);
static void f16_to_f32_avx2(const uint16_t *x, uint64_t m, float *out);
static void smq32_avx2(const float *x, uint64_t m, float unit, float clip, int L,
                       const uint32_t *rnd, uint8_t *codes);
static void blockmax32_avx2(const uint32_t *bits, uint64_t nb, uint64_t B, float *out);
static void smqblocks32_avx2(const float *x, uint64_t nb, uint64_t B, const float *units,
                             float clip, int L, const uint32_t *rnd, uint8_t *codes);
#include "quant_impl.h"

/* blockmax32 of quant.h: blocks of a multiple of 8 elements in vectors
 * (the keys are below 2^31, so a signed max orders them), others by the
 * template's loop.                                                         */
static void blockmax32_avx2(const uint32_t *bits, uint64_t nb, uint64_t B, float *out)
{
    if (B % 8) {
        blockmax32_tail_avx2(bits, nb, B, out);
        return;
    }
    const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
    for (uint64_t b = 0; b < nb; b++) {
        const uint32_t *p = bits + b * B;
        __m256i m = _mm256_setzero_si256();
        for (uint64_t j = 0; j < B; j += 8)
            m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + j)),
                                                     mask));
        __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        h = _mm_max_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
        h = _mm_max_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
        uint32_t k = (uint32_t)_mm_cvtsi128_si32(h);
        memcpy(out + b, &k, 4);
    }
}

/* 8 codes of smq32 (quant.h) for xv, rnd NULL or its 8 words, in the low
 * 8 bytes: every step is the template's operation in the same order
 * (min/max/compares chosen so NaN picks the same operand), so the codes
 * equal the scalar loop's; GCC does not vectorise the stochastic branch of
 * the template for AVX2 and leaves a mispredicting scalar loop.           */
static inline __attribute__((always_inline)) __m128i
smq8_avx2(__m256 xv, __m256 vunit, __m256 vclip, __m256 fL, __m256i vL, const uint32_t *rnd)
{
    const __m256 one = _mm256_set1_ps(1.0f), u24 = _mm256_set1_ps((float)LB_U24);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 t = _mm256_div_ps(_mm256_min_ps(_mm256_and_ps(xv, absmask), vclip), vunit), l;
    if (!rnd) {
        l = _mm256_round_ps(t, _MM_FROUND_CUR_DIRECTION);
    } else {   /* floor(t): the template's rint(t) - (rint(t) > t), NaN kept */
        l = _mm256_round_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m256 u = _mm256_cvtepi32_ps(
            _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)rnd), 8));
        __m256 up = _mm256_cmp_ps(u, _mm256_mul_ps(_mm256_sub_ps(t, l), u24), _CMP_LT_OQ);
        l = _mm256_add_ps(l, _mm256_and_ps(up, one));
    }
    __m256i q = _mm256_cvttps_epi32(_mm256_min_ps(l, fL));
    __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_LT_OQ));
    /* q is in [0, L] (t >= 0; NaN -> L), so the codes need no mask */
    __m256i c = _mm256_blendv_epi8(_mm256_add_epi32(vL, q), _mm256_sub_epi32(vL, q), neg);
    __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    return _mm_packus_epi16(c16, c16);
}

static void smq32_avx2(const float *x, uint64_t m, float unit, float clip, int L,
                       const uint32_t *rnd, uint8_t *codes)
{
    const __m256 vunit = _mm256_set1_ps(unit), vclip = _mm256_set1_ps(clip);
    const __m256 fL = _mm256_set1_ps((float)L);
    const __m256i vL = _mm256_set1_epi32(L);
    uint64_t j = 0;
    for (; j + 8 <= m; j += 8)
        _mm_storel_epi64((__m128i *)(codes + j),
                         smq8_avx2(_mm256_loadu_ps(x + j), vunit, vclip, fL, vL,
                                   rnd ? rnd + j : NULL));
    smq32_tail_avx2(x + j, m - j, unit, clip, L, rnd ? rnd + j : NULL, codes + j);
}

/* smqblocks32 of quant.h: blocks of a multiple of 16 elements in one loop
 * (no call per block), others through smq32.                              */
static void smqblocks32_avx2(const float *x, uint64_t nb, uint64_t B, const float *units,
                             float clip, int L, const uint32_t *rnd, uint8_t *codes)
{
    const __m256 vclip = _mm256_set1_ps(clip), fL = _mm256_set1_ps((float)L);
    const __m256i vL = _mm256_set1_epi32(L);
    for (uint64_t b = 0; b < nb; b++) {
        const float *xb = x + b * B;
        const uint32_t *rb = rnd ? rnd + b * B : NULL;
        uint8_t *cb = codes + b * B;
        if (units[b] == 0.0f) {
            memset(cb, L, (size_t)B);
        } else if (B % 16) {
            smq32_avx2(xb, B, units[b], clip, L, rb, cb);
        } else {
            const __m256 vunit = _mm256_set1_ps(units[b]);
            for (uint64_t j = 0; j < B; j += 16) {
                __m128i lo = smq8_avx2(_mm256_loadu_ps(xb + j), vunit, vclip, fL, vL,
                                       rb ? rb + j : NULL);
                __m128i hi = smq8_avx2(_mm256_loadu_ps(xb + j + 8), vunit, vclip, fL, vL,
                                       rb ? rb + j + 8 : NULL);
                _mm_storeu_si128((__m128i *)(cb + j), _mm_unpacklo_epi64(lo, hi));
            }
        }
    }
}

static void signbits32_avx2(const float *x, uint64_t m, uint8_t *out)
{
    const __m256 zero = _mm256_setzero_ps();
    uint64_t i = 0;
    for (; i + 32 <= m; i += 32) {
        uint32_t w = 0;
        for (int q = 0; q < 4; q++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * q);
            w |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ)) << (8 * q);
        }
        memcpy(out + i / 8, &w, 4);
    }
    for (; i + 8 <= m; i += 8)
        out[i / 8] = (uint8_t)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(x + i), zero, _CMP_GE_OQ));
    if (i < m) {
        unsigned b = 0;
        for (uint64_t j = i; j < m; j++)
            b |= (unsigned)(x[j] >= 0) << (j - i);
        out[i / 8] = (uint8_t)b;
    }
}

static void signbits64_avx2(const double *x, uint64_t m, uint8_t *out)
{
    const __m256d zero = _mm256_setzero_pd();
    uint64_t i = 0;
    for (; i + 8 <= m; i += 8) {
        int lo = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + i), zero, _CMP_GE_OQ));
        int hi = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + i + 4), zero, _CMP_GE_OQ));
        out[i / 8] = (uint8_t)(lo | (hi << 4));
    }
    if (i < m) {
        unsigned b = 0;
        for (uint64_t j = i; j < m; j++)
            b |= (unsigned)(x[j] >= 0) << (j - i);
        out[i / 8] = (uint8_t)b;
    }
}

/* hi and lo 32-bit halves of a * m for the 8 lanes of a. */
static inline void mulhilo_avx2(__m256i a, __m256i m, __m256i *hi, __m256i *lo)
{
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

/* Ten Philox4x32 rounds on nq batches of 8 counters (c[4 q + l] holds
 * word l of batch q); several batches interleave their latency chains.   */
static inline __attribute__((always_inline)) void
philox_rounds_avx2(__m256i *c, int nq, const lb_philox_key *key)
{
    const __m256i M0 = _mm256_set1_epi32((int)0xD2511F53u);
    const __m256i M1 = _mm256_set1_epi32((int)0xCD9E8D57u);
    uint32_t k0 = key->k0, k1 = key->k1;
    for (int r = 0; r < 10; r++) {
        __m256i K0 = _mm256_set1_epi32((int)k0), K1 = _mm256_set1_epi32((int)k1);
        for (int q = 0; q < nq; q++) {
            __m256i *v = c + 4 * q, hi0, lo0, hi1, lo1;
            mulhilo_avx2(v[0], M0, &hi0, &lo0);
            mulhilo_avx2(v[2], M1, &hi1, &lo1);
            v[0] = _mm256_xor_si256(_mm256_xor_si256(hi1, v[1]), K0);
            v[1] = lo1;
            v[2] = _mm256_xor_si256(_mm256_xor_si256(hi0, v[3]), K1);
            v[3] = lo0;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* philox16 of quant.h: two interleaved 8-lane batches per group, blocks
 * 16 g .. + 7 and 16 g + 8 .. + 15 (no carry into the high word: 16 g is
 * a multiple of 16).                                                       */
static void philox16_avx2(const lb_philox_key *key, uint64_t first, uint64_t ng,
                          uint32_t *out)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i himask = _mm256_set1_epi32((int)0xFFFF0000u);
    for (uint64_t g = 0; g < ng; g++) {
        uint64_t base = 16 * (first + g);
        uint32_t *o = out + LB_SR16 * g;
        __m256i c[8];
        for (int q = 0; q < 2; q++) {
            c[4 * q] = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)(base + 8 * q)), lane);
            c[4 * q + 1] = _mm256_set1_epi32((int)(uint32_t)(base >> 32));
            c[4 * q + 2] = _mm256_set1_epi32((int)key->s0);
            c[4 * q + 3] = _mm256_set1_epi32((int)key->s1);
        }
        philox_rounds_avx2(c, 2, key);
        for (int q = 0; q < 2; q++)
            for (int l = 0; l < 4; l++) {
                __m256i w = c[4 * q + l];
                _mm256_storeu_si256((__m256i *)(o + 16 * l + 8 * q), _mm256_slli_epi32(w, 16));
                _mm256_storeu_si256((__m256i *)(o + 64 + 16 * l + 8 * q),
                                    _mm256_and_si256(w, himask));
            }
    }
}

static void philox_avx2(const lb_philox_key *key, uint64_t first, uint64_t nb,
                        uint32_t *out)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    uint64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        uint64_t base = first + b;
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)base), lane);
        /* carry into the high word where the low word wrapped */
        __m256i wrapped = _mm256_cmpgt_epi32(
            _mm256_xor_si256(_mm256_set1_epi32((int)(uint32_t)base), _mm256_set1_epi32(INT32_MIN)),
            _mm256_xor_si256(c0, _mm256_set1_epi32(INT32_MIN)));
        __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(base >> 32)), wrapped);
        __m256i c[4] = {c0, c1, _mm256_set1_epi32((int)key->s0),
                        _mm256_set1_epi32((int)key->s1)};
        philox_rounds_avx2(c, 1, key);
        c0 = c[0];
        c1 = c[1];
        __m256i c2 = c[2], c3 = c[3];
        /* transpose: block j's four words become out[4j .. 4j + 3] */
        __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
        __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
        __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
        __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
        __m256i *o = (__m256i *)(out + 4 * b);
        _mm256_storeu_si256(o, _mm256_permute2x128_si256(u0, u1, 0x20));
        _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
        _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
        _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
    }
    philox_tail_avx2(key, first + b, nb - b, out + 4 * b);
}

/* The constants of minifloat32 (quant.h) for E, M in 8 lanes. */
typedef struct {
    __m256 two23;
    __m256i maxb, pminb, c254M, K, cmax, absmask, S, negfinite;
    __m128i M;
} mf_consts_avx2;

static inline mf_consts_avx2 mf_consts_make_avx2(int E, int M)
{
    const float maxval = 2.0f - 1.0f / (float)(1 << M);
    int32_t maxb;
    memcpy(&maxb, &maxval, 4);
    mf_consts_avx2 c;
    c.two23 = _mm256_set1_ps(8388608.0f);
    c.maxb = _mm256_set1_epi32(maxb);
    /* q = max(biased exponent of y, pmin + 127) = p + 127; the scale's
     * exponent 127 + M - p = 254 + M - q; the magnitude
     * ((p - pmin) << M) + (bits(t) - bits(2^23)) = (q << M) + bits(t) - K  */
    c.pminb = _mm256_set1_epi32(2 - (1 << E) + 127);
    c.c254M = _mm256_set1_epi32(254 + M);
    c.K = _mm256_set1_epi32(((127 + 23) << 23) + ((2 - (1 << E) + 127) << M));
    c.cmax = _mm256_set1_epi32((1 << (E + M)) - 1);
    c.absmask = _mm256_set1_epi32(0x7FFFFFFF);
    c.S = _mm256_set1_epi32(1 << (E + M));
    c.negfinite = _mm256_set1_epi32(-8388607);   /* bits < this: x < 0, not NaN */
    c.M = _mm_cvtsi32_si128(M);
    return c;
}

/* 8 codes of minifloat32 (quant.h) as 32-bit lanes: the template's steps on
 * the bit patterns, with signed compares (every pattern compared has its
 * sign bit clear, or is compared as a signed value on purpose), so the
 * codes equal the scalar loop's.                                           */
static inline __attribute__((always_inline)) __m256i
mf8_avx2(const float *x, __m256 vinv, const mf_consts_avx2 *c)
{
    __m256i vb = _mm256_loadu_si256((const __m256i *)x);
    __m256 y = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(vb, c->absmask)), vinv);
    __m256i yb = _mm256_castps_si256(y);
    __m256i ok = _mm256_cmpgt_epi32(c->maxb, yb);
    yb = _mm256_and_si256(yb, ok);
    __m256i q = _mm256_max_epi32(_mm256_srli_epi32(yb, 23), c->pminb);
    __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(c->c254M, q), 23));
    __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(yb), sc), c->two23);
    __m256i mag = _mm256_sub_epi32(_mm256_add_epi32(_mm256_sll_epi32(q, c->M), _mm256_castps_si256(t)),
                                   c->K);
    mag = _mm256_or_si256(_mm256_min_epi32(mag, c->cmax), _mm256_andnot_si256(ok, c->cmax));
    __m256i neg = _mm256_andnot_si256(_mm256_cmpeq_epi32(mag, _mm256_setzero_si256()),
                                      _mm256_cmpgt_epi32(c->negfinite, vb));
    return _mm256_or_si256(mag, _mm256_and_si256(neg, c->S));
}

/* 16 codes (each below 256) of two 8-lane vectors as bytes. */
static inline __m128i bytes16_avx2(__m256i a, __m256i b)
{
    __m256i w = _mm256_packus_epi32(a, b);   /* a0-3 b0-3 | a4-7 b4-7 */
    __m128i v = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    return _mm_shuffle_epi32(v, _MM_SHUFFLE(3, 1, 2, 0));   /* a0-3 a4-7 b0-3 b4-7 */
}

static void minifloat32_avx2(const float *x, uint64_t m, float inv, int E, int M,
                             uint8_t *codes)
{
    const mf_consts_avx2 c = mf_consts_make_avx2(E, M);
    const __m256 vinv = _mm256_set1_ps(inv);
    uint64_t j = 0;
    for (; j + 16 <= m; j += 16)
        _mm_storeu_si128((__m128i *)(codes + j),
                         bytes16_avx2(mf8_avx2(x + j, vinv, &c), mf8_avx2(x + j + 8, vinv, &c)));
    minifloat32_tail_avx2(x + j, m - j, inv, E, M, codes + j);
}

/* minifloatblocks32 of quant.h: blocks of a multiple of 16 elements in one
 * loop, the constants set once.                                            */
static void minifloatblocks32_avx2(const float *x, uint64_t nb, uint64_t B, const int8_t *k,
                                   int E, int M, uint8_t *codes)
{
    const mf_consts_avx2 c = mf_consts_make_avx2(E, M);
    for (uint64_t b = 0; b < nb; b++) {
        float inv = lb_f32_pow2(-k[b]);
        if (B % 16) {
            minifloat32_avx2(x + b * B, B, inv, E, M, codes + b * B);
            continue;
        }
        const __m256 vinv = _mm256_set1_ps(inv);
        for (uint64_t j = b * B; j < (b + 1) * B; j += 16)
            _mm_storeu_si128((__m128i *)(codes + j), bytes16_avx2(mf8_avx2(x + j, vinv, &c),
                                                                  mf8_avx2(x + j + 8, vinv, &c)));
    }
}

static void f32_to_f16_avx2(const float *x, uint64_t m, uint16_t *out)
{
    uint64_t j = 0;
    for (; j + 8 <= m; j += 8)
        _mm_storeu_si128((__m128i *)(out + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < m; j++) {
        uint32_t b;
        memcpy(&b, x + j, 4);
        out[j] = lb_f32_to_f16_bits(b);
    }
}

static void f16_to_f32_avx2(const uint16_t *x, uint64_t m, float *out)
{
    uint64_t j = 0;
    for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + j))));
    for (; j < m; j++) {
        uint32_t b = lb_f16_bits_to_f32(x[j]);
        memcpy(out + j, &b, 4);
    }
}
#else
#include "quant.h"
const lb_quant_fns lb_quant_avx2 = {0};
#endif
