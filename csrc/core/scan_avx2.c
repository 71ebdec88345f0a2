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
#define LB_SCAN_OWN_CHUNK
static uint32_t chunk_collect32_avx2(const uint32_t *bits, uint32_t m,
                                     uint32_t lo, uint32_t *pos,
                                     uint32_t *raw);
static uint32_t select32_avx2(uint32_t *a, uint32_t m, uint32_t r,
                              uint32_t *t1, uint32_t *t2);
#include "scan_impl.h"

/* For each 8-bit lane mask, the indices of its set lanes in order, one a
 * nibble (lane 0 in the low nibble): the permutation that packs them left. */
static const uint32_t lb_pack8_lut[256] = {
    0x00000000u, 0x00000000u, 0x00000001u, 0x00000010u, 0x00000002u, 0x00000020u,
    0x00000021u, 0x00000210u, 0x00000003u, 0x00000030u, 0x00000031u, 0x00000310u,
    0x00000032u, 0x00000320u, 0x00000321u, 0x00003210u, 0x00000004u, 0x00000040u,
    0x00000041u, 0x00000410u, 0x00000042u, 0x00000420u, 0x00000421u, 0x00004210u,
    0x00000043u, 0x00000430u, 0x00000431u, 0x00004310u, 0x00000432u, 0x00004320u,
    0x00004321u, 0x00043210u, 0x00000005u, 0x00000050u, 0x00000051u, 0x00000510u,
    0x00000052u, 0x00000520u, 0x00000521u, 0x00005210u, 0x00000053u, 0x00000530u,
    0x00000531u, 0x00005310u, 0x00000532u, 0x00005320u, 0x00005321u, 0x00053210u,
    0x00000054u, 0x00000540u, 0x00000541u, 0x00005410u, 0x00000542u, 0x00005420u,
    0x00005421u, 0x00054210u, 0x00000543u, 0x00005430u, 0x00005431u, 0x00054310u,
    0x00005432u, 0x00054320u, 0x00054321u, 0x00543210u, 0x00000006u, 0x00000060u,
    0x00000061u, 0x00000610u, 0x00000062u, 0x00000620u, 0x00000621u, 0x00006210u,
    0x00000063u, 0x00000630u, 0x00000631u, 0x00006310u, 0x00000632u, 0x00006320u,
    0x00006321u, 0x00063210u, 0x00000064u, 0x00000640u, 0x00000641u, 0x00006410u,
    0x00000642u, 0x00006420u, 0x00006421u, 0x00064210u, 0x00000643u, 0x00006430u,
    0x00006431u, 0x00064310u, 0x00006432u, 0x00064320u, 0x00064321u, 0x00643210u,
    0x00000065u, 0x00000650u, 0x00000651u, 0x00006510u, 0x00000652u, 0x00006520u,
    0x00006521u, 0x00065210u, 0x00000653u, 0x00006530u, 0x00006531u, 0x00065310u,
    0x00006532u, 0x00065320u, 0x00065321u, 0x00653210u, 0x00000654u, 0x00006540u,
    0x00006541u, 0x00065410u, 0x00006542u, 0x00065420u, 0x00065421u, 0x00654210u,
    0x00006543u, 0x00065430u, 0x00065431u, 0x00654310u, 0x00065432u, 0x00654320u,
    0x00654321u, 0x06543210u, 0x00000007u, 0x00000070u, 0x00000071u, 0x00000710u,
    0x00000072u, 0x00000720u, 0x00000721u, 0x00007210u, 0x00000073u, 0x00000730u,
    0x00000731u, 0x00007310u, 0x00000732u, 0x00007320u, 0x00007321u, 0x00073210u,
    0x00000074u, 0x00000740u, 0x00000741u, 0x00007410u, 0x00000742u, 0x00007420u,
    0x00007421u, 0x00074210u, 0x00000743u, 0x00007430u, 0x00007431u, 0x00074310u,
    0x00007432u, 0x00074320u, 0x00074321u, 0x00743210u, 0x00000075u, 0x00000750u,
    0x00000751u, 0x00007510u, 0x00000752u, 0x00007520u, 0x00007521u, 0x00075210u,
    0x00000753u, 0x00007530u, 0x00007531u, 0x00075310u, 0x00007532u, 0x00075320u,
    0x00075321u, 0x00753210u, 0x00000754u, 0x00007540u, 0x00007541u, 0x00075410u,
    0x00007542u, 0x00075420u, 0x00075421u, 0x00754210u, 0x00007543u, 0x00075430u,
    0x00075431u, 0x00754310u, 0x00075432u, 0x00754320u, 0x00754321u, 0x07543210u,
    0x00000076u, 0x00000760u, 0x00000761u, 0x00007610u, 0x00000762u, 0x00007620u,
    0x00007621u, 0x00076210u, 0x00000763u, 0x00007630u, 0x00007631u, 0x00076310u,
    0x00007632u, 0x00076320u, 0x00076321u, 0x00763210u, 0x00000764u, 0x00007640u,
    0x00007641u, 0x00076410u, 0x00007642u, 0x00076420u, 0x00076421u, 0x00764210u,
    0x00007643u, 0x00076430u, 0x00076431u, 0x00764310u, 0x00076432u, 0x00764320u,
    0x00764321u, 0x07643210u, 0x00000765u, 0x00007650u, 0x00007651u, 0x00076510u,
    0x00007652u, 0x00076520u, 0x00076521u, 0x00765210u, 0x00007653u, 0x00076530u,
    0x00076531u, 0x00765310u, 0x00076532u, 0x00765320u, 0x00765321u, 0x07653210u,
    0x00007654u, 0x00076540u, 0x00076541u, 0x00765410u, 0x00076542u, 0x00765420u,
    0x00765421u, 0x07654210u, 0x00076543u, 0x00765430u, 0x00765431u, 0x07654310u,
    0x00765432u, 0x07654320u, 0x07654321u, 0x76543210u,
};

static inline __m256i lb_pack8(unsigned m)
{
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    return _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32((int)lb_pack8_lut[m]), shifts),
        _mm256_set1_epi32(7));
}

/* 8 lanes a step: the flagged lanes packed left by vpermd with a table
 * permutation and stored whole (the slack takes the rest); scalar tail. */
static uint32_t chunk_collect32_avx2(const uint32_t *bits, uint32_t m,
                                     uint32_t lo, uint32_t *pos,
                                     uint32_t *raw)
{
    const __m256i maskv = _mm256_set1_epi32((int)LB_KEY32_MASK);
    /* key >= lo  <=>  key > lo - 1 (signed: keys are < 2^31, lo <= 2^31) */
    const __m256i below = _mm256_set1_epi32((int)(lo - 1));
    const __m256i eight = _mm256_set1_epi32(8);
    __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    uint32_t o = 0, j = 0;
    for (; j + 8 <= m; j += 8) {
        if ((j & 15) == 0)
            __builtin_prefetch(bits + j + LB_CHUNK_PREFETCH);
        __m256i rawv = _mm256_loadu_si256((const __m256i *)(bits + j));
        __m256i key = _mm256_and_si256(rawv, maskv);
        unsigned hit = (unsigned)_mm256_movemask_ps(
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)));
        __m256i perm = lb_pack8(hit);
        _mm256_storeu_si256((__m256i *)(pos + o), _mm256_permutevar8x32_epi32(at, perm));
        _mm256_storeu_si256((__m256i *)(raw + o), _mm256_permutevar8x32_epi32(rawv, perm));
        o += (uint32_t)__builtin_popcount(hit);
        at = _mm256_add_epi32(at, eight);
    }
    for (; j < m; j++) {
        pos[o] = j;
        raw[o] = bits[j];
        o += (bits[j] & LB_KEY32_MASK) >= lo;
    }
    return o;
}

/* Quickselect whose partition packs the keys above and below the pivot
 * into two other buffers 8 at a time (table permutations); the last few
 * keys go to the branch-free scalar select.                              */
static uint32_t select32_avx2(uint32_t *a, uint32_t m, uint32_t r,
                              uint32_t *t1, uint32_t *t2)
{
    uint32_t *p = a, *g = t1, *l = t2;
    while (m > 64) {
        uint32_t x = p[0], y = p[m / 2], z = p[m - 1];
        uint32_t mn = x < y ? x : y, mx = x < y ? y : x;
        uint32_t piv = mx < z ? mx : z;
        piv = mn > piv ? mn : piv;
        const __m256i pv = _mm256_set1_epi32((int)piv);   /* keys < 2^31 */
        uint32_t ng = 0, nl = 0, j = 0;
        for (; j + 8 <= m; j += 8) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(p + j));
            unsigned gt = (unsigned)_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, pv)));
            unsigned lt = (unsigned)_mm256_movemask_ps(
                _mm256_castsi256_ps(_mm256_cmpgt_epi32(pv, v)));
            _mm256_storeu_si256((__m256i *)(g + ng), _mm256_permutevar8x32_epi32(v, lb_pack8(gt)));
            _mm256_storeu_si256((__m256i *)(l + nl), _mm256_permutevar8x32_epi32(v, lb_pack8(lt)));
            ng += (uint32_t)__builtin_popcount(gt);
            nl += (uint32_t)__builtin_popcount(lt);
        }
        for (; j < m; j++) {
            uint32_t v = p[j];
            g[ng] = v;
            ng += v > piv;
            l[nl] = v;
            nl += v < piv;
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
    return select32_tail_avx2(p, m, r, g);
}

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
