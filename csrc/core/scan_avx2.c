/* scan_avx2.c - scan kernels compiled for AVX2 (chosen at run time):
 * intrinsics collect kernels (compare mask, then walk its set bits), the
 * histogram kernels from the template.  Keys are < 2^31 (2^63), so signed
 * compares order them correctly once lo is known to be <= the key mask.   */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
#include <immintrin.h>

#include "scan_mask_collect.h"
#define LB_SCAN_SUFFIX avx2
#define LB_SCAN_OWN_COLLECT

static uint64_t collect32_avx2(const uint32_t *bits, uint64_t begin,
                               uint64_t end, uint32_t lo, uint64_t *idx,
                               uint64_t *raw, uint64_t cap, int *nonfinite);
static uint64_t collect64_avx2(const uint64_t *bits, uint64_t begin,
                               uint64_t end, uint64_t lo, uint64_t *idx,
                               uint64_t *raw, uint64_t cap, int *nonfinite);
static uint64_t ef_collect32_avx2(float *e, const float *g, uint64_t begin,
                                  uint64_t end, float decay, float scale,
                                  uint32_t lo, uint64_t *idx, uint64_t *raw,
                                  uint64_t cap, int *nonfinite);
static uint64_t ef_collect64_avx2(double *e, const double *g, uint64_t begin,
                                  uint64_t end, double decay, double scale,
                                  uint64_t lo, uint64_t *idx, uint64_t *raw,
                                  uint64_t cap, int *nonfinite);
static uint64_t efp_collect32_avx2(const float *e, const float *g, uint64_t begin,
                                   uint64_t end, float decay, float scale,
                                   uint32_t lo, uint64_t *idx, uint64_t *raw,
                                   uint64_t cap, int *nonfinite);
#define LB_SCAN_OWN_EFP32
#include "scan_impl.h"

static uint64_t collect32_avx2(const uint32_t *bits, uint64_t begin,
                               uint64_t end, uint32_t lo, uint64_t *idx,
                               uint64_t *raw, uint64_t cap, int *nonfinite)
{
    const __m256i maskv = _mm256_set1_epi32((int)LB_KEY32_MASK);
    /* key >= lo  <=>  key > lo - 1; lo > mask: nothing qualifies */
    const int none = lo > LB_KEY32_MASK;
    const __m256i below = _mm256_set1_epi32(none ? (int)LB_KEY32_MASK : (int)lo - 1);
    __m256i maxkey = _mm256_setzero_si256();
    uint64_t found = 0, i = begin;
    for (; i + 8 <= end; i += 8) {
        __m256i key = _mm256_and_si256(
            _mm256_loadu_si256((const __m256i *)(bits + i)), maskv);
        maxkey = _mm256_max_epu32(maxkey, key);
        int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)));
        if (m)
            LB_STORE_MASKED((unsigned)m, i, bits, idx, raw, cap, found);
    }
    uint32_t maxs[8];
    _mm256_storeu_si256((__m256i *)maxs, maxkey);
    uint32_t mx = 0;
    for (int j = 0; j < 8; j++)
        mx = maxs[j] > mx ? maxs[j] : mx;
    for (; i < end; i++) {
        uint32_t key = bits[i] & LB_KEY32_MASK;
        mx = key > mx ? key : mx;
        if (!none && key >= lo) {
            if (found < cap) {
                idx[found] = i;
                raw[found] = bits[i];
            }
            found++;
        }
    }
    if (mx >= LB_KEY32_INF)
        *nonfinite = 1;
    return found;
}

static uint64_t collect64_avx2(const uint64_t *bits, uint64_t begin,
                               uint64_t end, uint64_t lo, uint64_t *idx,
                               uint64_t *raw, uint64_t cap, int *nonfinite)
{
    const __m256i maskv = _mm256_set1_epi64x((long long)LB_KEY64_MASK);
    const int none = lo > LB_KEY64_MASK;
    const __m256i below = _mm256_set1_epi64x(none ? (long long)LB_KEY64_MASK
                                                  : (long long)lo - 1);
    const __m256i below_inf = _mm256_set1_epi64x((long long)LB_KEY64_INF - 1);
    __m256i bad = _mm256_setzero_si256();
    uint64_t found = 0, i = begin;
    for (; i + 4 <= end; i += 4) {
        __m256i key = _mm256_and_si256(
            _mm256_loadu_si256((const __m256i *)(bits + i)), maskv);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(key, below_inf));
        int m = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(key, below)));
        if (m)
            LB_STORE_MASKED((unsigned)m, i, bits, idx, raw, cap, found);
    }
    int anybad = !_mm256_testz_si256(bad, bad);
    for (; i < end; i++) {
        uint64_t key = bits[i] & LB_KEY64_MASK;
        anybad |= key >= LB_KEY64_INF;
        if (!none && key >= lo) {
            if (found < cap) {
                idx[found] = i;
                raw[found] = bits[i];
            }
            found++;
        }
    }
    if (anybad)
        *nonfinite = 1;
    return found;
}
/* p = decay*e + scale*g (mul, mul, add: no FMA), stored into e, collected;
 * the scalar tail repeats the same arithmetic.                            */
static uint64_t ef_collect32_avx2(float *e, const float *g, uint64_t begin,
                                  uint64_t end, float decay, float scale,
                                  uint32_t lo, uint64_t *idx, uint64_t *raw,
                                  uint64_t cap, int *nonfinite)
{
    const __m256 dv = _mm256_set1_ps(decay), sv = _mm256_set1_ps(scale);
    const __m256i maskv = _mm256_set1_epi32((int)LB_KEY32_MASK);
    const int none = lo > LB_KEY32_MASK;
    const __m256i below = _mm256_set1_epi32(none ? (int)LB_KEY32_MASK : (int)lo - 1);
    __m256i maxkey = _mm256_setzero_si256();
    const uint32_t *bits = (const uint32_t *)e;
    uint64_t found = 0, i = begin;
    for (; i + 8 <= end; i += 8) {
        __m256 p = _mm256_add_ps(_mm256_mul_ps(dv, _mm256_loadu_ps(e + i)),
                                 _mm256_mul_ps(sv, _mm256_loadu_ps(g + i)));
        _mm256_storeu_ps(e + i, p);
        __m256i key = _mm256_and_si256(_mm256_castps_si256(p), maskv);
        maxkey = _mm256_max_epu32(maxkey, key);
        int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)));
        if (m)
            LB_STORE_MASKED((unsigned)m, i, bits, idx, raw, cap, found);
    }
    uint32_t maxs[8];
    _mm256_storeu_si256((__m256i *)maxs, maxkey);
    uint32_t mx = 0;
    for (int j = 0; j < 8; j++)
        mx = maxs[j] > mx ? maxs[j] : mx;
    for (; i < end; i++) {
        float t1 = decay * e[i], t2 = scale * g[i];
        e[i] = t1 + t2;
        uint32_t key = bits[i] & LB_KEY32_MASK;
        mx = key > mx ? key : mx;
        if (!none && key >= lo) {
            if (found < cap) {
                idx[found] = i;
                raw[found] = bits[i];
            }
            found++;
        }
    }
    if (mx >= LB_KEY32_INF)
        *nonfinite = 1;
    return found;
}

static uint64_t ef_collect64_avx2(double *e, const double *g, uint64_t begin,
                                  uint64_t end, double decay, double scale,
                                  uint64_t lo, uint64_t *idx, uint64_t *raw,
                                  uint64_t cap, int *nonfinite)
{
    const __m256d dv = _mm256_set1_pd(decay), sv = _mm256_set1_pd(scale);
    const __m256i maskv = _mm256_set1_epi64x((long long)LB_KEY64_MASK);
    const int none = lo > LB_KEY64_MASK;
    const __m256i below = _mm256_set1_epi64x(none ? (long long)LB_KEY64_MASK : (long long)lo - 1);
    const __m256i below_inf = _mm256_set1_epi64x((long long)LB_KEY64_INF - 1);
    __m256i bad = _mm256_setzero_si256();
    const uint64_t *bits = (const uint64_t *)e;
    uint64_t found = 0, i = begin;
    for (; i + 4 <= end; i += 4) {
        __m256d p = _mm256_add_pd(_mm256_mul_pd(dv, _mm256_loadu_pd(e + i)),
                                  _mm256_mul_pd(sv, _mm256_loadu_pd(g + i)));
        _mm256_storeu_pd(e + i, p);
        __m256i key = _mm256_and_si256(_mm256_castpd_si256(p), maskv);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi64(key, below_inf));
        int m = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(key, below)));
        if (m)
            LB_STORE_MASKED((unsigned)m, i, bits, idx, raw, cap, found);
    }
    int anybad = !_mm256_testz_si256(bad, bad);
    for (; i < end; i++) {
        double t1 = decay * e[i], t2 = scale * g[i];
        e[i] = t1 + t2;
        uint64_t key = bits[i] & LB_KEY64_MASK;
        anybad |= key >= LB_KEY64_INF;
        if (!none && key >= lo) {
            if (found < cap) {
                idx[found] = i;
                raw[found] = bits[i];
            }
            found++;
        }
    }
    if (anybad)
        *nonfinite = 1;
    return found;
}
/* ef_collect32_avx2 without the store: e and g are only read; the
 * flagged lanes' bits are taken from p, spilled.                          */
static uint64_t efp_collect32_avx2(const float *e, const float *g, uint64_t begin,
                                   uint64_t end, float decay, float scale,
                                   uint32_t lo, uint64_t *idx, uint64_t *raw,
                                   uint64_t cap, int *nonfinite)
{
    const __m256 dv = _mm256_set1_ps(decay), sv = _mm256_set1_ps(scale);
    const __m256i maskv = _mm256_set1_epi32((int)LB_KEY32_MASK);
    const int none = lo > LB_KEY32_MASK;
    const __m256i below = _mm256_set1_epi32(none ? (int)LB_KEY32_MASK : (int)lo - 1);
    __m256i maxkey = _mm256_setzero_si256();
    uint64_t found = 0, i = begin;
    for (; i + 8 <= end; i += 8) {
        __m256 p = _mm256_add_ps(_mm256_mul_ps(dv, _mm256_loadu_ps(e + i)),
                                 _mm256_mul_ps(sv, _mm256_loadu_ps(g + i)));
        __m256i key = _mm256_and_si256(_mm256_castps_si256(p), maskv);
        maxkey = _mm256_max_epu32(maxkey, key);
        int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)));
        if (m) {
            uint32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, _mm256_castps_si256(p));
            for (unsigned left = (unsigned)m; left; left &= left - 1) {
                unsigned j = (unsigned)__builtin_ctz(left);
                if (found < cap) {
                    idx[found] = i + j;
                    raw[found] = lanes[j];
                }
                found++;
            }
        }
    }
    uint32_t maxs[8];
    _mm256_storeu_si256((__m256i *)maxs, maxkey);
    uint32_t mx = 0;
    for (int j = 0; j < 8; j++)
        mx = maxs[j] > mx ? maxs[j] : mx;
    for (; i < end; i++) {
        float t1 = decay * e[i], t2 = scale * g[i], p = t1 + t2;
        uint32_t b;
        memcpy(&b, &p, 4);
        uint32_t key = b & LB_KEY32_MASK;
        mx = key > mx ? key : mx;
        if (!none && key >= lo) {
            if (found < cap) {
                idx[found] = i;
                raw[found] = b;
            }
            found++;
        }
    }
    if (mx >= LB_KEY32_INF)
        *nonfinite = 1;
    return found;
}

#else
#include "scan.h"
const lb_scan_fns lb_scan_avx2 = {0};
#endif
