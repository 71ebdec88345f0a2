/*
 * moe_kernels.h - internal to the MoE family (core/moe*.c): the exponential,
 * streaming stores, the routing scratch and the table of per-row kernels.
 *
 * The row kernels (moe_rows.h) are compiled once per instruction set
 * (moe_scalar.c: baseline SSE2 / any CPU; moe_avx2.c: AVX2; moe_avx512.c:
 * AVX-512 with 512-bit vectors) through
 * moe_isa.h and picked at run time by lb_moe_rows_for().  Every variant
 * performs the same IEEE operations in the same order (no FMA contraction:
 * ISO C mode, and the pragma for clang), so they return the same bytes.
 */
#ifndef LB_MOE_KERNELS_H
#define LB_MOE_KERNELS_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "lowband.h"

/* GCC contracts nothing in ISO C mode (-std=c11); clang needs the pragma.
 * no-trapping-math lets GCC turn the branch-free selects of the row loops
 * into vector blends; it changes no value (only which floating-point
 * exception flags might be raised), unlike -ffast-math.                   */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("no-trapping-math")
#endif

/* ------------------------------------------------------------------------ */
/* Exponentials                                                              */
/* ------------------------------------------------------------------------ */

#if defined(__AVX512F__)
#include <immintrin.h>

/* The k largest of z[0..E) (E <= 64), descending, ties to the lower
 * index, for k <= 16, of up to four rows at once: k rounds of
 * "vector max, first lane equal to it, mask it out" over four 16-lane
 * registers per row -- branch free where an insertion list mispredicts,
 * and the rows' dependency chains overlap.  A row holding NaN yields
 * in-bounds indices (its caller reports the row as non-finite).          */
static inline void extract_load_f32(const float *z, uint64_t E, __m512 v[4])
{
    const __m512 none = _mm512_set1_ps(-INFINITY);
    for (int q = 0; q < 4; q++) {
        uint64_t lo = (uint64_t)q * 16;
        uint64_t len = E > lo ? (E - lo < 16 ? E - lo : 16) : 0;
        v[q] = _mm512_mask_loadu_ps(none, (__mmask16)((1u << len) - 1), len ? z + lo : z);
    }
}

static inline int extract_round_f32(__m512 v[4])
{
    __m512 m = _mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3]));
    __m512 b = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    uint64_t eq = (uint64_t)_mm512_cmpeq_ps_mask(v[0], b) |
                  (uint64_t)_mm512_cmpeq_ps_mask(v[1], b) << 16 |
                  (uint64_t)_mm512_cmpeq_ps_mask(v[2], b) << 32 |
                  (uint64_t)_mm512_cmpeq_ps_mask(v[3], b) << 48;
    int j = eq ? __builtin_ctzll(eq) : 0;
    v[j >> 4] = _mm512_mask_mov_ps(v[j >> 4], (__mmask16)(1u << (j & 15)),
                                   _mm512_set1_ps(-INFINITY));
    return j;
}

/* The k <= 8 largest of each of 16 rows z + r*E (r < 16, E < 2^25),
 * descending, ties to the lower index, into idx[r*k + s]: "vertical"
 * selection, one row per lane.  Each lane keeps a sorted list in k
 * registers; expert j of all 16 rows (a gather) enters each lane's list
 * where it is strictly greater, the entries below moving down one place, so
 * equal values keep the earlier (lower) index ahead.  No horizontal reductions: the rows run in parallel
 * lanes.  NaN never enters a list (its row is reported non-finite).      */
static inline void topk_vertical16_f32(const float *z, uint64_t E, uint64_t k,
                                       int32_t *idx)
{
    __m512 bv[8];
    __m512i bi[8];
    for (uint64_t r = 0; r < k; r++) {
        bv[r] = _mm512_set1_ps(-INFINITY);
        bi[r] = _mm512_setzero_si512();
    }
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)E));
    for (uint64_t j = 0; j < E; j++) {
        __m512 x = _mm512_i32gather_ps(rows, z + j, 4);
        __m512i xi = _mm512_set1_epi32((int)j);
        __mmask16 gt = 0;   /* lanes whose list is shifting down */
        for (uint64_t r = 0; r < k; r++) {
            /* enter where strictly greater; below that, every entry moves
             * down one place (a displaced entry is never compared again)  */
            gt |= _mm512_cmp_ps_mask(x, bv[r], _CMP_GT_OQ);
            __m512 tv = bv[r];
            __m512i ti = bi[r];
            bv[r] = _mm512_mask_blend_ps(gt, tv, x);
            bi[r] = _mm512_mask_blend_epi32(gt, ti, xi);
            x = _mm512_mask_blend_ps(gt, x, tv);
            xi = _mm512_mask_blend_epi32(gt, xi, ti);
        }
    }
    int32_t lane[16];
    for (uint64_t s = 0; s < k; s++) {
        _mm512_storeu_si512(lane, bi[s]);
        for (int r = 0; r < 16; r++)
            idx[(uint64_t)r * k + s] = lane[r];
    }
}

/* Rows z + r*E, r < nrows (<= 4), selected together: their chains overlap. */
static inline void topk_extract_rows_f32(const float *z, uint64_t nrows, uint64_t E,
                                         uint64_t k, int32_t *idx)
{
    __m512 v[4][4];
    for (uint64_t r = 0; r < nrows; r++)
        extract_load_f32(z + r * E, E, v[r]);
    for (uint64_t s = 0; s < k; s++)
        for (uint64_t r = 0; r < nrows; r++)
            idx[r * k + s] = extract_round_f32(v[r]);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>

/* The k <= 8 largest of each of 8 rows z + r*E (r < 8, E < 2^31),
 * descending, ties to the lower index, into idx[r*k + s]: the "vertical"
 * selection of the AVX-512 kernel with one row per 256-bit lane.  Each
 * lane keeps a sorted list in k registers; expert j of all 8 rows (from
 * an 8 x 8 transpose, cheaper than a gather) enters each lane's list where it is strictly greater, the
 * entries below moving down one place (a running mask), so equal values
 * keep the earlier (lower) index ahead.  The values move by max / min
 * (the list is sorted, so they equal the blends; rows are finite), the
 * indices by blends.  NaN never enters (its row is reported non-finite). */
static inline void topk_vertical8_f32(const float *z, uint64_t E, uint64_t k,
                                      int32_t *idx)
{
    __m256 bv[8];
    __m256i bi[8];
    for (uint64_t r = 0; r < k; r++) {
        bv[r] = _mm256_set1_ps(-INFINITY);
        bi[r] = _mm256_setzero_si256();
    }
    for (uint64_t j0 = 0; j0 < E; j0 += 8) {
        /* columns j0 .. j0 + 7 of the 8 rows, transposed: col[c] lane r
         * = z[r*E + j0 + c] (a ragged last block is padded with -Inf,
         * which never enters a list)                                     */
        __m256 col[8];
        if (j0 + 8 <= E) {
            __m256 a[8], b[8];
            for (int r = 0; r < 8; r++)
                a[r] = _mm256_loadu_ps(z + (uint64_t)r * E + j0);
            for (int r = 0; r < 8; r += 2) {
                b[r] = _mm256_unpacklo_ps(a[r], a[r + 1]);
                b[r + 1] = _mm256_unpackhi_ps(a[r], a[r + 1]);
            }
            for (int r = 0; r < 8; r += 4) {
                a[r] = _mm256_shuffle_ps(b[r], b[r + 2], _MM_SHUFFLE(1, 0, 1, 0));
                a[r + 1] = _mm256_shuffle_ps(b[r], b[r + 2], _MM_SHUFFLE(3, 2, 3, 2));
                a[r + 2] = _mm256_shuffle_ps(b[r + 1], b[r + 3], _MM_SHUFFLE(1, 0, 1, 0));
                a[r + 3] = _mm256_shuffle_ps(b[r + 1], b[r + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int c = 0; c < 4; c++) {
                col[c] = _mm256_permute2f128_ps(a[c], a[c + 4], 0x20);
                col[c + 4] = _mm256_permute2f128_ps(a[c], a[c + 4], 0x31);
            }
        } else {
            float buf[8][8];
            for (int c = 0; c < 8; c++)
                for (int r = 0; r < 8; r++)
                    buf[c][r] = j0 + (uint64_t)c < E ? z[(uint64_t)r * E + j0 + (uint64_t)c]
                                                     : -INFINITY;
            for (int c = 0; c < 8; c++)
                col[c] = _mm256_loadu_ps(buf[c]);
        }
        for (int c = 0; c < 8; c++) {
            __m256 x = col[c];
            __m256i xi = _mm256_set1_epi32((int)(j0 + (uint64_t)c));
            __m256i gt = _mm256_setzero_si256();   /* lanes whose list shifts */
            for (uint64_t r = 0; r < k; r++) {
                __m256 tv = bv[r];
                __m256i ti = bi[r];
                gt = _mm256_or_si256(gt, _mm256_castps_si256(_mm256_cmp_ps(x, tv, _CMP_GT_OQ)));
                bv[r] = _mm256_max_ps(tv, x);
                x = _mm256_min_ps(tv, x);
                bi[r] = _mm256_blendv_epi8(ti, xi, gt);
                xi = _mm256_blendv_epi8(xi, ti, gt);
            }
        }
    }
    int32_t lane[8];
    for (uint64_t s = 0; s < k; s++) {
        _mm256_storeu_si256((__m256i *)lane, bi[s]);
        for (int r = 0; r < 8; r++)
            idx[(uint64_t)r * k + s] = lane[r];
    }
}
#endif

/* exp(x) in float: x rounded to n = nearest integer of x / ln 2 (by the
 * 1.5 * 2^23 trick), r = x - n ln 2 in two steps, a degree-5 polynomial
 * (Cephes expf), times 2^n built from bits.  Below -87 the result is 0,
 * above 88 it is +Inf.  Branch-free, so loops over it vectorise.          */
static inline float exp_f32(float x)
{
    const float lo = -87.0f, hi = 88.0f, magic = 12582912.0f;
    int under = x < lo, over = x > hi;
    float xc = under ? lo : x;
    xc = over ? hi : xc;
    float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    y = y * scale;
    y = under ? 0.0f : y;
    return over ? INFINITY : y;
}

/* exp(x) in double: the same reduction with 1.5 * 2^52, then the Cephes
 * rational form 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)).  Below -708 the
 * result is 0, above 709 it is +Inf.                                       */
static inline double exp_f64(double x)
{
    const double lo = -708.0, hi = 709.0, magic = 6755399441055744.0;
    int under = x < lo, over = x > hi;
    double xc = under ? lo : x;
    xc = over ? hi : xc;
    double n = (xc * 1.4426950408889634 + magic) - magic;
    double r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    double rr = r * r;
    double px = 1.26177193074810590878e-4;
    px = px * rr + 3.02994407707441961300e-2;
    px = px * rr + 9.99999999999999999910e-1;
    px = px * r;
    double qx = 3.00198505138664455042e-6;
    qx = qx * rr + 2.52448340349684104192e-3;
    qx = qx * rr + 2.27265548208155028766e-1;
    qx = qx * rr + 2.00000000000000000009e0;
    double y = px / (qx - px);
    y = 1.0 + 2.0 * y;
    int64_t bits = (int64_t)((int32_t)n + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, 8);
    y = y * scale;
    y = under ? 0.0 : y;
    return over ? INFINITY : y;
}

#if defined(__AVX2__)
/* The fused softmax routing row of float32 logits with 8 <= E <= 64,
 * E % 8 == 0, on 256-bit vectors (the AVX2 and AVX-512 builds both use
 * it; AVX-512 takes the exponentials, scores and column sums 16 lanes at
 * a time): one pass over the row held in NB = E / 8 registers gives the
 * maximum, exp(z - max), their sum, the scores and the top-k candidates.
 * Every value is the one of the generic row code (moe_rows.h): the same
 * IEEE operations in the same order (exp_f32, the lane sum, e * (1 / sum),
 * the column sums in row order), and the same experts (descending logits,
 * ties to the lower index).                                               */

/* exp_f32 on 8 lanes of x <= 0 (the same operations; no overflow branch). */
static inline __attribute__((always_inline)) __m256 exp8_nonpos_f32(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.0f), magic = _mm256_set1_ps(12582912.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 xc = _mm256_blendv_ps(x, lo, under);
    __m256 n = _mm256_sub_ps(
        _mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)), magic), magic);
    __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
                             _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(under, y);
}

#if defined(__AVX512F__)
/* exp8_nonpos_f32 on 16 lanes (the AVX-512 build: half the instructions). */
static inline __attribute__((always_inline)) __m512 exp16_nonpos_f32(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-87.0f), magic = _mm512_set1_ps(12582912.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    __m512 xc = _mm512_mask_mov_ps(x, under, lo);
    __m512 n = _mm512_sub_ps(
        _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), magic), magic);
    __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r),
                             _mm512_set1_ps(1.0f));
    __m512i bits = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
    return _mm512_maskz_mov_ps((__mmask16)~under, y);
}
#endif

static inline __m256 hmin8_ps(__m256 x)
{
    x = _mm256_min_ps(x, _mm256_permute2f128_ps(x, x, 1));
    x = _mm256_min_ps(x, _mm256_shuffle_ps(x, x, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_min_ps(x, _mm256_shuffle_ps(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* One row (see above): scores to sr, exp(z - max) to e, the scores
 * widened and added onto acc (E doubles; NULL: none), the top k <= 8
 * experts to ex, the maximum to *maxv (-0 where row_max gives +0).
 * Returns 0 (nothing written) when the row holds a non-finite value or
 * more than 32 logits are at or above the selection bound (many ties);
 * the caller then takes the generic path.
 * Selection: the k-th largest of 8 (or 16) lane maxima bounds the row's k-th
 * largest from below (they are distinct elements), so only the few
 * logits at or above it compete; each one's rank (greater values, plus
 * equal ones at lower indices) is counted with vector compares, and the k
 * of rank < k land in place without branches.                            */
/* The state of one row between the three steps below. */
typedef struct {
    __m256 v[8], m;    /* the logits (256-bit step 2: then their exps), the max */
    int nc;            /* candidates: their logits and indices in index order */
    float cv[32];
    int32_t ci[32];
} lb_route_row8;

/* Step 1: loads the row, checks it is finite, finds the maximum and the
 * candidates; 0 when the row must take the generic path.                 */
static inline __attribute__((always_inline)) int
route_row8_select(const float *z, int NB, uint64_t k, lb_route_row8 *st)
{
    __m256 *v = st->v;
    v[0] = _mm256_loadu_ps(z);   /* x - x: +0 unless x is not finite */
    __m256i bad = _mm256_castps_si256(_mm256_sub_ps(v[0], v[0]));
    for (int r = 1; r < NB; r++) {
        v[r] = _mm256_loadu_ps(z + 8 * r);
        bad = _mm256_or_si256(bad, _mm256_castps_si256(_mm256_sub_ps(v[r], v[r])));
    }
    if (!_mm256_testz_si256(bad, bad))
        return 0;
    /* lane maxima: la over the even registers, lb over the odd ones */
    __m256 la = v[0], lb = v[0];
    if (NB > 1)
        lb = v[1];
    for (int r = 2; r < NB; r++) {
        if (r & 1)
            lb = _mm256_max_ps(lb, v[r]);
        else
            la = _mm256_max_ps(la, v[r]);
    }
    __m256 lm = _mm256_max_ps(la, lb);
    /* the row maximum (a zero maximum may come out as -0 where row_max
     * gives +0: z - m and so exp(z - m) are the same either way)        */
    __m256 m = _mm256_max_ps(lm, _mm256_permute2f128_ps(lm, lm, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));

    /* selection bound: t = the k-th largest of the lane maxima (8 lanes,
     * or 16 over even and odd registers for k > 4: fewer candidates),
     * found as the least lane maximum with fewer than k lanes strictly
     * above it                                                          */
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i kk = _mm256_set1_epi32((int)k);
    __m256 t;
    if (k <= 4 || NB < 2) {
        __m256i above = _mm256_setzero_si256();
        for (int s = 1; s < 8; s++) {   /* lane indices mod 8 by the instruction */
            __m256 rot = _mm256_permutevar8x32_ps(lm, _mm256_add_epi32(iota, _mm256_set1_epi32(s)));
            above = _mm256_sub_epi32(above,
                                     _mm256_castps_si256(_mm256_cmp_ps(rot, lm, _CMP_GT_OQ)));
        }
        t = hmin8_ps(_mm256_blendv_ps(_mm256_set1_ps(INFINITY), lm,
                                      _mm256_castsi256_ps(_mm256_cmpgt_epi32(kk, above))));
    } else {
        __m256i aa = _mm256_setzero_si256(), ab = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            __m256i idx = _mm256_add_epi32(iota, _mm256_set1_epi32(s));
            __m256 ra = _mm256_permutevar8x32_ps(la, idx), rb = _mm256_permutevar8x32_ps(lb, idx);
            if (s) {
                aa = _mm256_sub_epi32(aa, _mm256_castps_si256(_mm256_cmp_ps(ra, la, _CMP_GT_OQ)));
                ab = _mm256_sub_epi32(ab, _mm256_castps_si256(_mm256_cmp_ps(rb, lb, _CMP_GT_OQ)));
            }
            aa = _mm256_sub_epi32(aa, _mm256_castps_si256(_mm256_cmp_ps(rb, la, _CMP_GT_OQ)));
            ab = _mm256_sub_epi32(ab, _mm256_castps_si256(_mm256_cmp_ps(ra, lb, _CMP_GT_OQ)));
        }
        const __m256 inf = _mm256_set1_ps(INFINITY);
        t = hmin8_ps(_mm256_min_ps(
            _mm256_blendv_ps(inf, la, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kk, aa))),
            _mm256_blendv_ps(inf, lb, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kk, ab)))));
    }
    uint64_t cand = 0;
    for (int r = 0; r < NB; r++)
        cand |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(v[r], t, _CMP_GE_OQ))
                << (8 * r);
    int nc = __builtin_popcountll(cand);
    if (nc > 32)
        return 0;

    /* the candidates in index order, written before the exponentials so
     * that the stores have left the store buffer when they are loaded as
     * vectors (a load spanning recent narrower stores stalls)            */
    float *cv = st->cv;
    int32_t *ci = st->ci;
    for (int r = 0; r < 4; r++)
        _mm256_storeu_ps(cv + 8 * r, _mm256_set1_ps(-INFINITY));
    for (int i = 0; cand; cand &= cand - 1, i++) {
        int j = __builtin_ctzll(cand);
        cv[i] = z[j];
        ci[i] = j;
    }
    st->m = m;
    st->nc = nc;
    return 1;
}

/* Step 2: exponentials, their lane sum, the scores and the column sums. */
static inline __attribute__((always_inline)) void
route_row8_softmax(const float *z, int NB, lb_route_row8 *st, float *sr, float *e,
                   double *acc)
{
    __m256 *v = st->v;
    const __m256 m = st->m;
    /* exp, the lane sum, the scores and the column sums (lane sum: the
     * 8-lane halves added in order, as lanesum)                         */
    __m256 lane = _mm256_setzero_ps();
#if defined(__AVX512F__)
    __m512 w[4];
    const __m512 mz = _mm512_broadcastss_ps(_mm256_castps256_ps128(m));
    if (!(NB & 1))
        for (int q = 0; q < NB / 2; q++) {
            w[q] = exp16_nonpos_f32(_mm512_sub_ps(_mm512_loadu_ps(z + 16 * q), mz));
            _mm512_storeu_ps(e + 16 * q, w[q]);
            lane = _mm256_add_ps(lane, _mm512_castps512_ps256(w[q]));
            lane = _mm256_add_ps(lane, _mm512_extractf32x8_ps(w[q], 1));
        }
    else
#endif
    for (int r = 0; r < NB; r++) {
        v[r] = exp8_nonpos_f32(_mm256_sub_ps(v[r], m));   /* the logits are in cv now */
        _mm256_storeu_ps(e + 8 * r, v[r]);
        lane = _mm256_add_ps(lane, v[r]);
    }
    float ls[8];
    _mm256_storeu_ps(ls, lane);
    float sum = ls[0];
    for (int l = 1; l < 8; l++)
        sum += ls[l];
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
#if defined(__AVX512F__)
    if (!(NB & 1)) {
        const __m512 inv16 = _mm512_set1_ps(1.0f / sum);
        for (int q = 0; q < NB / 2; q++) {
            __m512 p = _mm512_mul_ps(w[q], inv16);
            _mm512_storeu_ps(sr + 16 * q, p);
            if (acc) {
                double *a = acc + 16 * q;
                _mm512_storeu_pd(a, _mm512_add_pd(_mm512_loadu_pd(a),
                                                  _mm512_cvtps_pd(_mm512_castps512_ps256(p))));
                __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(p, 1));
                _mm512_storeu_pd(a + 8, _mm512_add_pd(_mm512_loadu_pd(a + 8), hi));
            }
        }
    } else
#endif
    for (int r = 0; r < NB; r++) {
        __m256 p = _mm256_mul_ps(v[r], inv);
        _mm256_storeu_ps(sr + 8 * r, p);
        if (acc) {
            double *a = acc + 8 * r;
            _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a),
                                              _mm256_cvtps_pd(_mm256_castps256_ps128(p))));
            _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4),
                                                  _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1))));
        }
    }
}

/* Step 3: the candidates' ranks; the k first to ex. */
static inline __attribute__((always_inline)) void
route_row8_rank(const lb_route_row8 *st, uint64_t k, int32_t *ex)
{
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const float *cv = st->cv;
    const int32_t *ci = st->ci;
    const int nc = st->nc;
    /* each candidate's rank, and ex[rank] = its index for rank < k (the
     * others go to a dump slot): all pairs compared at once (lane i
     * against lane i + s mod 8 of itself and of the other register) for
     * up to 16 candidates, one candidate at a time beyond               */
    const __m256 c0 = _mm256_loadu_ps(cv), c1 = _mm256_loadu_ps(cv + 8);
    int32_t rk[32], dump;
    if (nc <= 16) {
        /* padding lanes (-Inf) never rank above a candidate, and ranks
         * among themselves above every candidate                        */
        __m256i r0 = _mm256_setzero_si256(), r1 = _mm256_setzero_si256();
        if (nc > 8) {   /* the other register at s = 0; ties: c0 is lower */
            r0 = _mm256_sub_epi32(r0, _mm256_castps_si256(_mm256_cmp_ps(c1, c0, _CMP_GT_OQ)));
            r1 = _mm256_sub_epi32(r1, _mm256_castps_si256(_mm256_cmp_ps(c0, c1, _CMP_GE_OQ)));
        }
        for (int sh = 1; sh < 8; sh++) {
            const __m256i idx = _mm256_add_epi32(iota, _mm256_set1_epi32(sh));
            /* lanes whose partner i + sh mod 8 has the lower index */
            const __m256 lower =
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(iota, _mm256_set1_epi32(7 - sh)));
            __m256 p0 = _mm256_permutevar8x32_ps(c0, idx);
            r0 = _mm256_sub_epi32(r0, _mm256_castps_si256(_mm256_or_ps(
                     _mm256_cmp_ps(p0, c0, _CMP_GT_OQ),
                     _mm256_and_ps(_mm256_cmp_ps(p0, c0, _CMP_EQ_OQ), lower))));
            if (nc > 8) {
                __m256 p1 = _mm256_permutevar8x32_ps(c1, idx);
                r1 = _mm256_sub_epi32(r1, _mm256_castps_si256(_mm256_or_ps(
                         _mm256_cmp_ps(p1, c1, _CMP_GT_OQ),
                         _mm256_and_ps(_mm256_cmp_ps(p1, c1, _CMP_EQ_OQ), lower))));
                r0 = _mm256_sub_epi32(r0, _mm256_castps_si256(_mm256_cmp_ps(p1, c0, _CMP_GT_OQ)));
                r1 = _mm256_sub_epi32(r1, _mm256_castps_si256(_mm256_cmp_ps(p0, c1, _CMP_GE_OQ)));
            }
        }
        _mm256_storeu_si256((__m256i *)rk, r0);
        _mm256_storeu_si256((__m256i *)(rk + 8), r1);
    } else {
        const __m256 c2 = _mm256_loadu_ps(cv + 16), c3 = _mm256_loadu_ps(cv + 24);
        for (int i = 0; i < nc; i++) {
            const __m256 b = _mm256_set1_ps(cv[i]);
            uint32_t gt = 0, eq = 0;
#define LB_RANK_BITS(c, r)                                                               \
            gt |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(c, b, _CMP_GT_OQ)) << (8 * r); \
            eq |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(c, b, _CMP_EQ_OQ)) << (8 * r)
            LB_RANK_BITS(c0, 0);
            LB_RANK_BITS(c1, 1);
            LB_RANK_BITS(c2, 2);
            LB_RANK_BITS(c3, 3);
#undef LB_RANK_BITS
            rk[i] = __builtin_popcount(gt) + __builtin_popcount(eq & ((1u << i) - 1u));
        }
    }
    for (int i = 0; i < nc; i++)
        *((uint64_t)rk[i] < k ? ex + rk[i] : &dump) = ci[i];
}

static inline __attribute__((always_inline)) int
softmax_topk_row8_f32(const float *z, int NB, uint64_t k, float *sr, float *e,
                      double *acc, int32_t *ex, float *maxv)
{
    lb_route_row8 st;
    if (!route_row8_select(z, NB, k, &st))
        return 0;
    route_row8_softmax(z, NB, &st, sr, e, acc);
    route_row8_rank(&st, k, ex);
    _mm_store_ss(maxv, _mm256_castps256_ps128(st.m));
    return 1;
}

/* LB_ROUTE_ROWS consecutive rows (z, z + E, ...; outputs likewise, e too)
 * with their steps interleaved, so that one row's long dependency chains
 * (maximum, exponentials, sum, division) overlap the others'; column sums
 * still in row order.  0 (nothing written) when any row is declined.    */
#define LB_ROUTE_ROWS 2   /* 4 measured no faster; their e must fit ws->q (E doubles) */
#if LB_ROUTE_ROWS > 2
#error "the fused route group's exponentials must fit route_ws.q (E doubles)"
#endif
static inline __attribute__((always_inline)) int
softmax_topk_rows_f32(const float *z, int NB, uint64_t k, float *sr, float *e,
                      double *acc, int32_t *ex, float *maxv)
{
    const uint64_t E = (uint64_t)NB * 8;
    lb_route_row8 st[LB_ROUTE_ROWS];
    for (int n = 0; n < LB_ROUTE_ROWS; n++)
        if (!route_row8_select(z + n * E, NB, k, &st[n]))
            return 0;
    for (int n = 0; n < LB_ROUTE_ROWS; n++)
        route_row8_softmax(z + n * E, NB, &st[n], sr + n * E, e + n * E, acc);
    for (int n = 0; n < LB_ROUTE_ROWS; n++) {
        route_row8_rank(&st[n], k, ex + n * k);
        _mm_store_ss(maxv + n, _mm256_castps256_ps128(st[n].m));
    }
    return 1;
}

/* softmax_topk_row8_f32 with NB a constant (registers, unrolled loops). */
static inline int softmax_topk_row_f32(const float *z, uint64_t E, uint64_t k, float *sr,
                                       float *e, double *acc, int32_t *ex, float *maxv)
{
    switch (E / 8) {
    case 8: return softmax_topk_row8_f32(z, 8, k, sr, e, acc, ex, maxv);
    case 4: return softmax_topk_row8_f32(z, 4, k, sr, e, acc, ex, maxv);
    case 2: return softmax_topk_row8_f32(z, 2, k, sr, e, acc, ex, maxv);
    default: return softmax_topk_row8_f32(z, (int)(E / 8), k, sr, e, acc, ex, maxv);
    }
}

/* The same for softmax_topk_rows_f32. */
static inline int softmax_topk_rows_dispatch_f32(const float *z, uint64_t E, uint64_t k,
                                                  float *sr, float *e, double *acc,
                                                  int32_t *ex, float *maxv)
{
    switch (E / 8) {
    case 8: return softmax_topk_rows_f32(z, 8, k, sr, e, acc, ex, maxv);
    case 4: return softmax_topk_rows_f32(z, 4, k, sr, e, acc, ex, maxv);
    case 2: return softmax_topk_rows_f32(z, 2, k, sr, e, acc, ex, maxv);
    default: return softmax_topk_rows_f32(z, (int)(E / 8), k, sr, e, acc, ex, maxv);
    }
}
#endif

/* ------------------------------------------------------------------------ */
/* Small helpers shared by both element types                                */
/* ------------------------------------------------------------------------ */

/* Per-thread scratch of the routing kernel. */
typedef struct {
    double *choice;   /* E: score + bias                      */
    double *q;        /* E: load-balancing distribution; the exps of
                       * a float row, or of a fused group of 2        */
    double *best;     /* max(k, groups) selected keys (or logits) */
    double *gscore;   /* groups                               */
    int32_t *idx;     /* max(k, groups) selected indices      */
    uint8_t *allowed; /* E                                    */
} route_ws;

/* Streaming (non-temporal) row stores: dst = w * src (a copy when unit).
 * Return 0 (nothing done) when dst is not 16-byte aligned or H does not
 * fill whole vectors; the caller then stores normally.  The values are the
 * same either way (one IEEE multiply per element).                        */
#if defined(__SSE2__)
/* The widest vectors the file's instruction set has (each ISA file is its
 * own translation unit with its own target): 64-byte stores on AVX-512,
 * 32 on AVX2, 16 otherwise; a row that is not aligned to the wide vector
 * or not a whole number of them falls back to the narrower ones.          */
static inline int stream_row_f32(float *dst, const float *src, uint64_t H, float w,
                          int unit)
{
#if defined(__AVX512F__)
    if (!((uintptr_t)dst & 63) && H % 16 == 0) {
        __m512 wz = _mm512_set1_ps(w);
        for (uint64_t h = 0; h < H; h += 16) {
            __m512 v = _mm512_loadu_ps(src + h);
            _mm512_stream_ps(dst + h, unit ? v : _mm512_mul_ps(wz, v));
        }
        return 1;
    }
#endif
#if defined(__AVX__)
    if (!((uintptr_t)dst & 31) && H % 8 == 0) {
        __m256 wy = _mm256_set1_ps(w);
        for (uint64_t h = 0; h < H; h += 8) {
            __m256 v = _mm256_loadu_ps(src + h);
            _mm256_stream_ps(dst + h, unit ? v : _mm256_mul_ps(wy, v));
        }
        return 1;
    }
#endif
    if (((uintptr_t)dst & 15) || H % 4)
        return 0;
    __m128 wv = _mm_set1_ps(w);
    for (uint64_t h = 0; h < H; h += 4) {
        __m128 v = _mm_loadu_ps(src + h);
        _mm_stream_ps(dst + h, unit ? v : _mm_mul_ps(wv, v));
    }
    return 1;
}

static inline int stream_row_f64(double *dst, const double *src, uint64_t H,
                          double w, int unit)
{
#if defined(__AVX512F__)
    if (!((uintptr_t)dst & 63) && H % 8 == 0) {
        __m512d wz = _mm512_set1_pd(w);
        for (uint64_t h = 0; h < H; h += 8) {
            __m512d v = _mm512_loadu_pd(src + h);
            _mm512_stream_pd(dst + h, unit ? v : _mm512_mul_pd(wz, v));
        }
        return 1;
    }
#endif
#if defined(__AVX__)
    if (!((uintptr_t)dst & 31) && H % 4 == 0) {
        __m256d wy = _mm256_set1_pd(w);
        for (uint64_t h = 0; h < H; h += 4) {
            __m256d v = _mm256_loadu_pd(src + h);
            _mm256_stream_pd(dst + h, unit ? v : _mm256_mul_pd(wy, v));
        }
        return 1;
    }
#endif
    if (((uintptr_t)dst & 15) || H % 2)
        return 0;
    __m128d wv = _mm_set1_pd(w);
    for (uint64_t h = 0; h < H; h += 2) {
        __m128d v = _mm_loadu_pd(src + h);
        _mm_stream_pd(dst + h, unit ? v : _mm_mul_pd(wv, v));
    }
    return 1;
}

/* Orders this thread's streaming stores before the region's barrier. */
static inline void stream_fence(void) { _mm_sfence(); }
#else
static inline int stream_row_f32(float *d, const float *s, uint64_t H, float w, int u)
{
    return 0;
}
static inline int stream_row_f64(double *d, const double *s, uint64_t H, double w,
                          int u)
{
    return 0;
}
static inline void stream_fence(void) {}
#endif

/* Outputs at least this large are written with streaming stores.          */
#define STREAM_BYTES ((uint64_t)8 << 20)

/* A pass over tokens [t0, t1) that reads rows of `src` (H elements) and
 * writes rows of `out` through position (T x k): scatter or combine.      */
typedef void (*lb_moe_token_pass)(const void *src, uint64_t H,
                                  const int64_t *position, uint64_t t0,
                                  uint64_t t1, uint64_t k, const void *weights,
                                  void *out, int stream);

/* The per-row kernels of one instruction set and element type; arrays are
 * of that element type (see moe_rows.h for each contract).               */
typedef struct {
    uint64_t (*route)(const void *z, uint64_t r0, uint64_t r1, uint64_t E,
                      uint64_t k, const lb_route_opts *o, int32_t *experts,
                      void *weights, void *scores, int64_t *counts, double *acc,
                      route_ws *ws);
    void (*aux_sum)(const void *scores, uint64_t r0, uint64_t r1, uint64_t E,
                    lb_score_fn fn, const uint8_t *mask, double *q, double *acc);
    void (*balance_grad)(const void *scores, uint64_t r0, uint64_t r1, uint64_t E,
                         lb_score_fn fn, const double *g, const uint8_t *mask,
                         double *q, void *grad);
    double (*z_loss)(const void *z, uint64_t r0, uint64_t r1, uint64_t E,
                     const uint8_t *mask, double scale, void *e, void *grad,
                     uint64_t *bad);
    lb_moe_token_pass scatter;
    lb_moe_token_pass combine;
    void (*combine_dot)(const void *gout, const void *y, uint64_t H,
                        const int64_t *position, uint64_t t0, uint64_t t1,
                        uint64_t k, void *gw);
    void (*combine_grad)(const void *gout, const void *y, uint64_t H,
                         const int64_t *position, uint64_t t0, uint64_t t1,
                         uint64_t k, const void *weights, void *gy, void *gw,
                         int stream);
} lb_moe_rows;

/* One table per instruction set: [0] float32, [1] float64. */
extern const lb_moe_rows lb_moe_rows_scalar[2];
extern const lb_moe_rows lb_moe_rows_avx2[2];
extern const lb_moe_rows lb_moe_rows_avx512[2];

/* The kernels for `dt` (LB_F32 or LB_F64) on the active instruction set. */
const lb_moe_rows *lb_moe_rows_for(lb_dtype dt);

#endif /* LB_MOE_KERNELS_H */
