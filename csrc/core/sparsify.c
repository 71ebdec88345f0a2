/*
 * sparsify.c - sparse selection: exact top-k, threshold, chunked and tiled
 * top-k (SparseLoCo), DGC's sampled top-k, random-k and gather.
 *
 * Everything works on magnitude keys (scan.h): the raw bits of an element with
 * the sign bit cleared, which order like |x| for finite values.  Selections
 * are sets defined by the data alone (k largest keys, ties to the lower
 * index), so splitting the vector into per-thread parts never changes a
 * result: each part collects its candidates in index order, parts are
 * concatenated in order, and the final choice is made serially.
 */
#define _DEFAULT_SOURCE   /* posix_memalign, madvise */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "lowband.h"
#include "quant.h"
#include "rng.h"
#include "scan.h"
#include "scratch.h"
#include "select.h"
#include "threads.h"

/* ------------------------------------------------------------------------ */
/* Per-dtype key facts                                                       */
/* ------------------------------------------------------------------------ */

static const keyinfo KEYS_F32 = {4, LB_KEY32_MASK, LB_KEY32_INF, 19, 4096};
static const keyinfo KEYS_F64 = {8, LB_KEY64_MASK, LB_KEY64_INF, 48, 32768};

const keyinfo *keyinfo_of(lb_dtype dt)
{
    if (dt == LB_F32)
        return &KEYS_F32;
    if (dt == LB_F64)
        return &KEYS_F64;
    return NULL;
}

/* Index of the first non-finite element of x (error path only), or n. */
uint64_t first_nonfinite(const keyinfo *ki, const void *x, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if ((raw_at(ki, x, i) & ki->mask) >= ki->inf)
            return i;
    return n;
}

/* Largest key that is <= the magnitude threshold tau (tau >= 0, not NaN),
 * rounded so that key >= result  <=>  |x| >= tau for every element.        */
static uint64_t key_at_least(const keyinfo *ki, double tau)
{
    if (ki->width == 8) {
        uint64_t b;
        memcpy(&b, &tau, 8);
        return b & ki->mask;
    }
    if (tau > 3.4028234663852886e38)
        return LB_KEY32_INF;
    float f = (float)tau;
    if ((double)f < tau)
        f = nextafterf(f, INFINITY);
    uint32_t b;
    memcpy(&b, &f, 4);
    return b & LB_KEY32_MASK;
}

static double value_of_key(const keyinfo *ki, uint64_t key)
{
    if (ki->width == 8) {
        double d;
        memcpy(&d, &key, 8);
        return d;
    }
    uint32_t b = (uint32_t)key;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* ------------------------------------------------------------------------ */
/* Small-array selection                                                     */
/* ------------------------------------------------------------------------ */

/* The r-th largest (1 <= r <= m) of keys[0..m); scratch holds m entries.
 * MSD radix select with 8-bit digits: each level histograms the surviving
 * keys on one byte, keeps only the byte that holds the r-th largest, and
 * stops when the survivors are all equal.  O(m) per level, no sort.        */
uint64_t kth_largest(const uint64_t *keys, uint64_t m, uint64_t r,
                            uint64_t *scratch)
{
    uint64_t maxkey = 0;
    for (uint64_t i = 0; i < m; i++)
        if (keys[i] > maxkey)
            maxkey = keys[i];
    int shift = 0;
    while (shift < 56 && (maxkey >> (shift + 8)) != 0)
        shift += 8;
    const uint64_t *cur = keys;
    for (;; shift -= 8) {
        uint64_t hist[256] = {0};
        for (uint64_t i = 0; i < m; i++)
            hist[(cur[i] >> shift) & 255]++;
        int d = 255;
        uint64_t above = 0;
        while (above + hist[d] < r) {
            above += hist[d];
            d--;
        }
        r -= above;
        if (hist[d] != m) {   /* keep the keys whose digit is d */
            uint64_t w = 0;
            for (uint64_t i = 0; i < m; i++)
                if (((cur[i] >> shift) & 255) == (uint64_t)d)
                    scratch[w++] = cur[i];
            m = w;
            cur = scratch;
        }
        if (shift == 0 || m == 1)
            return cur[0];
        /* all survivors share every digit down to `shift` */
    }
}

/* ------------------------------------------------------------------------ */
/* Candidate buffers: per-part output of the collect scan                    */
/* ------------------------------------------------------------------------ */

void cand_free(cand_part *parts, int nparts)
{
    if (!parts)
        return;
    for (int p = 0; p < nparts; p++) {
        lb_scratch_free(parts[p].idx);
        lb_scratch_free(parts[p].raw);
    }
    free(parts);
}

/* Allocates `nparts` buffers, part p holding min(its length, cap_total). */
cand_part *cand_alloc(uint64_t n, int nparts, uint64_t cap_total)
{
    cand_part *parts = lb_alloc_n((uint64_t)nparts, sizeof(cand_part), 1);
    if (!parts)
        return NULL;
    for (int p = 0; p < nparts; p++) {
        uint64_t b, e;
        lb_split(n, nparts, p, &b, &e);
        uint64_t cap = e - b < cap_total ? e - b : cap_total;
        parts[p].cap = cap;
        uint64_t bytes = 0;   /* cap <= n, an array that exists: cannot fail */
        if (lb_size_mul(cap ? cap : 1, sizeof(uint64_t), &bytes) == LB_OK) {
            parts[p].idx = lb_scratch_alloc((size_t)bytes);
            parts[p].raw = lb_scratch_alloc((size_t)bytes);
        }
        if (!parts[p].idx || !parts[p].raw) {
            cand_free(parts, nparts);
            return NULL;
        }
    }
    return parts;
}

static uint64_t collect_range(const keyinfo *ki, const void *x, uint64_t b,
                              uint64_t e, uint64_t lo, uint64_t *idx,
                              uint64_t *raw, uint64_t cap, int *nonfinite)
{
    const lb_scan_fns *fns = lb_scan();
    if (ki->width == 4) {
        if (lo > LB_KEY32_MASK)
            lo = (uint64_t)LB_KEY32_MASK + 1;   /* nothing qualifies */
        return fns->collect32((const uint32_t *)x, b, e, (uint32_t)lo, idx,
                              raw, cap, nonfinite);
    }
    return fns->collect64((const uint64_t *)x, b, e, lo, idx, raw, cap,
                          nonfinite);
}

void ef_compensate(const keyinfo *ki, void *e, const void *g, uint64_t b,
                   uint64_t end, double decay, double scale)
{
    int nonfinite = 0;   /* reported by the selection that follows */
    ef_collect_range(ki, e, g, b, end, decay, scale, UINT64_MAX, NULL, NULL, 0,
                     &nonfinite);
}

uint64_t ef_collect_range(const keyinfo *ki, void *e, const void *g, uint64_t b,
                          uint64_t end, double decay, double scale, uint64_t lo,
                          uint64_t *idx, uint64_t *raw, uint64_t cap,
                          int *nonfinite)
{
    const lb_scan_fns *fns = lb_scan();
    if (ki->width == 4) {
        if (lo > LB_KEY32_MASK)
            lo = (uint64_t)LB_KEY32_MASK + 1;   /* nothing qualifies */
        return fns->ef_collect32((float *)e, (const float *)g, b, end,
                                 (float)decay, (float)scale, (uint32_t)lo, idx,
                                 raw, cap, nonfinite);
    }
    return fns->ef_collect64((double *)e, (const double *)g, b, end, decay,
                             scale, lo, idx, raw, cap, nonfinite);
}

uint64_t ef_collect_parallel(const keyinfo *ki, void *e, const void *g,
                             uint64_t n, double decay, double scale,
                             uint64_t lo, int nparts, cand_part *parts,
                             int *nonfinite, int *overflow)
{
    uint64_t total = 0;
    int nf = 0, of = 0;
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1)
           reduction(+:total) reduction(|:nf, of) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t b, end;
        int part_nf = 0;
        lb_split(n, nparts, p, &b, &end);
        uint64_t found = ef_collect_range(ki, e, g, b, end, decay, scale, lo,
                                          parts ? parts[p].idx : NULL,
                                          parts ? parts[p].raw : NULL,
                                          parts ? parts[p].cap : 0, &part_nf);
        if (parts) {
            parts[p].found = found;
            of |= found > parts[p].cap;
        }
        total += found;
        nf |= part_nf;
    }
    *nonfinite = nf;
    if (overflow)
        *overflow = of;
    return total;
}

/* Collects, in parallel over `nparts` contiguous parts, every element whose
 * key >= lo.  Returns the total that qualified; sets *nonfinite and
 * *overflow (some part found more than its cap).  parts may be NULL to only
 * count (then per-part counts land in counts[] when given).               */
uint64_t collect_parallel(const keyinfo *ki, const void *x, uint64_t n,
                                 uint64_t lo, int nparts, cand_part *parts,
                                 uint64_t *counts, int *nonfinite,
                                 int *overflow)
{
    uint64_t total = 0;
    int nf = 0, of = 0;
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1)
           reduction(+:total) reduction(|:nf, of) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t b, e;
        int part_nf = 0;
        lb_split(n, nparts, p, &b, &e);
        uint64_t found;
        if (parts) {
            found = collect_range(ki, x, b, e, lo, parts[p].idx, parts[p].raw,
                                  parts[p].cap, &part_nf);
            parts[p].found = found;
            of |= found > parts[p].cap;
        } else {
            found = collect_range(ki, x, b, e, lo, NULL, NULL, 0, &part_nf);
        }
        if (counts)
            counts[p] = found;
        total += found;
        nf |= part_nf;
    }
    *nonfinite = nf;
    if (overflow)
        *overflow = of;
    return total;
}

/* Allocates an lb_sparse of `count` entries for dtype width `width`. */
lb_status sparse_alloc(lb_sparse *out, uint64_t count, int width)
{
    out->count = count;
    out->indices = lb_alloc_n(count, sizeof(uint64_t), 0);
    out->values = lb_alloc_n(count, (uint64_t)width, 0);
    if (!out->indices || !out->values) {
        lb_sparse_free(out);
        return LB_ENOMEM;
    }
    return LB_OK;
}

void lb_sparse_free(lb_sparse *s)
{
    if (!s)
        return;
    free(s->indices);
    free(s->values);
    s->indices = NULL;
    s->values = NULL;
    s->count = 0;
}

/* From complete candidate buffers (every element with key >= some bound,
 * at least k of them), writes the exact top-k: all keys above the k-th
 * largest key T, then the lowest-index elements equal to T.  `hi` is a key
 * believed to have fewer than k candidates above it (UINT64_MAX if none is
 * known): only candidates with key <= hi then enter the selection of T.
 * Parts are processed in parallel; T and the split of the ties between
 * parts are decided serially, so the output never depends on the team.  */
lb_status topk_from_candidates(const keyinfo *ki, const cand_part *parts,
                                      int nparts, uint64_t k, uint64_t hi,
                                      lb_sparse *out)
{
    /* per part: [0] above hi, [1] key > T, [2] key == T, [3] output offset,
     * [4] ties it takes, [5] offset of its band keys                       */
    uint64_t (*cnt)[6] = lb_alloc_n((uint64_t)nparts, sizeof(*cnt), 1);
    if (!cnt)
        return LB_ENOMEM;
    const uint64_t mask = ki->mask;
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t a = 0;
        for (uint64_t j = 0; j < parts[p].found; j++)
            a += (parts[p].raw[j] & mask) > hi;
        cnt[p][0] = a;
    }
    uint64_t above_hi = 0, band = 0;
    for (int p = 0; p < nparts; p++)
        above_hi += cnt[p][0];
    if (above_hi >= k) {   /* the bound was wrong: select among all */
        hi = UINT64_MAX;
        above_hi = 0;
        for (int p = 0; p < nparts; p++)
            cnt[p][0] = 0;
    }
    for (int p = 0; p < nparts; p++) {
        cnt[p][5] = band;
        band += parts[p].found - cnt[p][0];
    }
    uint64_t kbytes = 0;
    uint64_t *keys = lb_size_mul(band ? band : 1, 2 * sizeof(uint64_t), &kbytes) == LB_OK
                         ? lb_scratch_alloc((size_t)kbytes) : NULL;
    if (!keys) {
        free(cnt);
        return LB_ENOMEM;
    }
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t w = cnt[p][5];
        for (uint64_t j = 0; j < parts[p].found; j++) {
            uint64_t key = parts[p].raw[j] & mask;
            if (key <= hi)
                keys[w++] = key;
        }
    }
    uint64_t T = kth_largest(keys, band, k - above_hi, keys + band);
    lb_scratch_free(keys);

    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t gt = 0, eq = 0;
        for (uint64_t j = 0; j < parts[p].found; j++) {
            uint64_t key = parts[p].raw[j] & mask;
            gt += key > T;
            eq += key == T;
        }
        cnt[p][1] = gt;
        cnt[p][2] = eq;
    }
    uint64_t greater = 0;
    for (int p = 0; p < nparts; p++)
        greater += cnt[p][1];
    uint64_t ties = k - greater, off = 0;
    for (int p = 0; p < nparts; p++) {   /* lower parts take ties first */
        cnt[p][4] = cnt[p][2] < ties ? cnt[p][2] : ties;
        ties -= cnt[p][4];
        cnt[p][3] = off;
        off += cnt[p][1] + cnt[p][4];
    }
    lb_status st = sparse_alloc(out, k, ki->width);
    if (st != LB_OK) {
        free(cnt);
        return st;
    }
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        const uint64_t *raw = parts[p].raw, *idx = parts[p].idx;
        uint64_t o = cnt[p][3], t = cnt[p][4];
        for (uint64_t j = 0; j < parts[p].found; j++) {
            uint64_t key = raw[j] & mask;
            int take = key > T;
            if (key == T && t > 0) {
                take = 1;
                t--;
            }
            if (take) {
                out->indices[o] = idx[j];
                store_raw(ki, out->values, o, raw[j]);
                o++;
            }
        }
    }
    free(cnt);
    return LB_OK;
}

/* ------------------------------------------------------------------------ */
/* Exact top-k                                                               */
/* ------------------------------------------------------------------------ */

/* Radix path, pass 1: per-part histograms of key >> hist_shift, summed (in
 * integers, so the order is irrelevant).  Finds the bin holding the k-th
 * largest key and returns its lowest key.  *candidates = elements with a key
 * at or above that bound.                                                  */
static lb_status radix_bound(const keyinfo *ki, const void *x, uint64_t n,
                             uint64_t k, int nparts, uint64_t *lo,
                             uint64_t *candidates, int *nonfinite)
{
    uint64_t bins = ki->hist_bins;
    uint64_t *hists = lb_alloc_n((uint64_t)nparts * bins, sizeof(uint64_t), 1);
    if (!hists)
        return LB_ENOMEM;
    const lb_scan_fns *fns = lb_scan();
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t b, e;
        lb_split(n, nparts, p, &b, &e);
        if (ki->width == 4)
            fns->hist32((const uint32_t *)x, b, e, ki->hist_shift,
                        hists + (size_t)p * bins);
        else
            fns->hist64((const uint64_t *)x, b, e, ki->hist_shift,
                        hists + (size_t)p * bins);
    }
    for (int p = 1; p < nparts; p++)
        for (uint64_t i = 0; i < bins; i++)
            hists[i] += hists[(size_t)p * bins + i];
    *nonfinite = 0;
    for (uint64_t i = ki->inf >> ki->hist_shift; i < bins; i++)
        if (hists[i])
            *nonfinite = 1;
    uint64_t above = 0, b = bins - 1;
    while (above + hists[b] < k) {
        above += hists[b];
        b--;
    }
    *lo = b << ki->hist_shift;
    *candidates = above + hists[b];
    free(hists);
    return LB_OK;
}

uint64_t sample_size(uint64_t n)
{
    if (n < TOPK_SAMPLE_MIN_N)
        return 0;
    uint64_t m = n / TOPK_SAMPLE_DIV, floor = n / TOPK_RUN;
    floor = floor < TOPK_SAMPLE_FLOOR ? floor : TOPK_SAMPLE_FLOOR;
    m = m < floor ? floor : m > TOPK_SAMPLE ? TOPK_SAMPLE : m;
    m -= m % TOPK_RUN;
    return m <= n / TOPK_RUN ? m : 0;   /* every stratum holds a whole run */
}

uint64_t sample_run_start(uint64_t n, uint64_t m, uint64_t run)
{
    /* runs of TOPK_RUN consecutive elements (a cache line of float32), one
     * run per stratum of n / (m / TOPK_RUN) elements, placed at a fixed
     * hashed offset inside it: few cache misses, even coverage            */
    uint64_t stride = n / (m / TOPK_RUN);
    uint64_t h = (run + 1) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ull;
    h ^= h >> 29;
    return run * stride + h % (stride - TOPK_RUN + 1);
}

int sample_bounds_from(uint64_t *keys, uint64_t m, uint64_t n, uint64_t k,
                       uint64_t *lo, uint64_t *hi, uint64_t *expected)
{
    double q = (double)k / (double)n;
    double sd = sqrt((double)m * q * (1.0 - q));
    double rank_lo = ceil(q * (double)m + 4.0 * sd + 2.0);
    double rank_hi = floor(q * (double)m - 4.0 * sd - 2.0);
    if (rank_lo >= (double)m / 4)
        return 0;   /* k is too large a fraction for a narrow band */
    *lo = kth_largest(keys, m, (uint64_t)rank_lo, keys + m);
    *hi = UINT64_MAX;
    if (rank_hi >= 1) {
        /* hi ranks above lo: select it among the few samples >= lo */
        uint64_t c = 0;
        for (uint64_t j = 0; j < m; j++)
            if (keys[j] >= *lo)
                keys[m + c++] = keys[j];
        *hi = kth_largest(keys + m, c, (uint64_t)rank_hi, keys);
    }
    *expected = (uint64_t)(rank_lo / (double)m * (double)n);
    return 1;
}

/* sample_bounds_from() over the keys of x itself. */
static int sample_bounds(const keyinfo *ki, const void *x, uint64_t n,
                         uint64_t k, int nthreads, uint64_t *lo, uint64_t *hi,
                         uint64_t *expected)
{
    uint64_t m = sample_size(n);
    if (!m)
        return 0;
    uint64_t *keys = lb_scratch_alloc(2 * m * sizeof(uint64_t));
    if (!keys)
        return 0;
    int team = lb_team(nthreads, m / (TOPK_SAMPLE / 2));
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t r = 0; r < m / TOPK_RUN; r++) {
        uint64_t at = sample_run_start(n, m, r);
        for (uint64_t j = 0; j < TOPK_RUN; j++)
            keys[r * TOPK_RUN + j] = raw_at(ki, x, at + j) & ki->mask;
    }
    int ok = sample_bounds_from(keys, m, n, k, lo, hi, expected);
    lb_scratch_free(keys);
    return ok;
}

static lb_status copy_all(const keyinfo *ki, const void *x, uint64_t n,
                          int nthreads, lb_sparse *out)
{
    lb_status st = sparse_alloc(out, n, ki->width);
    if (st != LB_OK)
        return st;
    int team = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t i = 0; i < n; i++)
        out->indices[i] = i;
    memcpy(out->values, x, (size_t)n * (size_t)ki->width);
    return LB_OK;
}

/* Exact top-k (0 < k < n) of a small vector in one serial call, no team:
 * topk_small over the whole vector (same result as the radix path: keys
 * above the k-th largest, then the lowest-index ties).  A non-finite
 * element fails under check_finite (nothing allocated is kept).           */
static lb_status topk_serial(const keyinfo *ki, const void *x, uint64_t n,
                             uint64_t k, int check_finite, lb_sparse *out,
                             lb_error *err)
{
    uint64_t *keys = lb_scratch_alloc((size_t)n * 2 * sizeof(uint64_t));
    if (!keys)
        return LB_ENOMEM;
    lb_status st = sparse_alloc(out, k, ki->width);
    if (st != LB_OK) {
        lb_scratch_free(keys);
        return st;
    }
    uint64_t bad = topk_small(ki, x, 0, NULL, n, k, keys, keys + n,
                              out->indices, out->values);
    lb_scratch_free(keys);
    if (bad != UINT64_MAX && check_finite) {
        lb_sparse_free(out);
        if (err)
            err->index = bad;
        return LB_ENONFINITE;
    }
    return LB_OK;
}

lb_status lb_topk(const void *x, uint64_t n, lb_dtype dt, uint64_t k,
                  int check_finite, int nthreads, lb_sparse *out, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!ki || !out || k > n || (!x && n))
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    int nonfinite = 0;

    if (k == 0 || k == n) {
        if (check_finite) {
            collect_parallel(ki, x, n, UINT64_MAX, nparts, NULL, NULL,
                             &nonfinite, NULL);
            if (nonfinite) {
                if (err)
                    err->index = first_nonfinite(ki, x, n);
                return LB_ENONFINITE;
            }
        }
        return k == 0 ? sparse_alloc(out, 0, ki->width)
                      : copy_all(ki, x, n, nthreads, out);
    }

    if (n <= TOPK_SMALL_N)
        return topk_serial(ki, x, n, k, check_finite, out, err);

    uint64_t lo = 0, hi = UINT64_MAX, expected = 0;
    if (sample_bounds(ki, x, n, k, nthreads, &lo, &hi, &expected)) {
        /* One pass: collect everything at or above the sampled bound. */
        uint64_t cap = expected + expected / 2 + 4096;
        cand_part *parts = cand_alloc(n, nparts, cap);
        if (!parts)
            return LB_ENOMEM;
        int overflow = 0;
        uint64_t total = collect_parallel(ki, x, n, lo, nparts, parts, NULL,
                                          &nonfinite, &overflow);
        if (nonfinite && check_finite) {
            cand_free(parts, nparts);
            if (err)
                err->index = first_nonfinite(ki, x, n);
            return LB_ENONFINITE;
        }
        if (!overflow && total >= k) {
            lb_status st = topk_from_candidates(ki, parts, nparts, k, hi, out);
            cand_free(parts, nparts);
            return st;
        }
        cand_free(parts, nparts);   /* the sample missed: radix path */
    }

    /* Radix path: pass 1 histograms the top key bits, pass 2 collects the
     * elements at or above the bin that holds the k-th largest key.       */
    uint64_t candidates = 0;
    lb_status st = radix_bound(ki, x, n, k, nparts, &lo, &candidates,
                               &nonfinite);
    if (st != LB_OK)
        return st;
    if (nonfinite && check_finite) {
        if (err)
            err->index = first_nonfinite(ki, x, n);
        return LB_ENONFINITE;
    }
    cand_part *parts = cand_alloc(n, nparts, candidates);
    if (!parts)
        return LB_ENOMEM;
    collect_parallel(ki, x, n, lo, nparts, parts, NULL, &nonfinite, NULL);
    st = topk_from_candidates(ki, parts, nparts, k, UINT64_MAX, out);
    cand_free(parts, nparts);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Threshold                                                                 */
/* ------------------------------------------------------------------------ */

/* Writes every element with key >= lo: a counting pass fixes each part's
 * output offset, a second pass writes in place.                           */
static lb_status select_at_least(const keyinfo *ki, const void *x, uint64_t n,
                                 uint64_t lo, int check_finite, int nthreads,
                                 lb_sparse *out, lb_error *err)
{
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    uint64_t *counts = lb_alloc_n((uint64_t)nparts + 1, sizeof(uint64_t), 1);
    if (!counts)
        return LB_ENOMEM;
    int nonfinite = 0;
    uint64_t total = collect_parallel(ki, x, n, lo, nparts, NULL, counts,
                                      &nonfinite, NULL);
    if (nonfinite && check_finite) {
        free(counts);
        if (err)
            err->index = first_nonfinite(ki, x, n);
        return LB_ENONFINITE;
    }
    lb_status st = sparse_alloc(out, total, ki->width);
    uint64_t *raw = lb_alloc_n(total, sizeof(uint64_t), 0);
    if (st != LB_OK || !raw) {
        free(counts);
        free(raw);
        lb_sparse_free(out);
        return LB_ENOMEM;
    }
    uint64_t off = 0;
    for (int p = 0; p < nparts; p++) {   /* exclusive prefix sum */
        uint64_t c = counts[p];
        counts[p] = off;
        off += c;
    }
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int p = 0; p < nparts; p++) {
        uint64_t b, e;
        int nf = 0;
        lb_split(n, nparts, p, &b, &e);
        uint64_t o = counts[p];
        uint64_t cap = (p + 1 < nparts ? counts[p + 1] : total) - o;
        collect_range(ki, x, b, e, lo, out->indices + o, raw + o, cap, &nf);
        for (uint64_t j = o; j < o + cap; j++)
            store_raw(ki, out->values, j, raw[j]);
    }
    free(raw);
    free(counts);
    return LB_OK;
}

lb_status lb_threshold(const void *x, uint64_t n, lb_dtype dt, double tau,
                       int check_finite, int nthreads, lb_sparse *out,
                       lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!ki || !out || (!x && n) || !(tau >= 0.0))
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    return select_at_least(ki, x, n, key_at_least(ki, tau), check_finite,
                           nthreads, out, err);
}

/* ------------------------------------------------------------------------ */
/* Chunked and tiled top-k                                                   */
/* ------------------------------------------------------------------------ */

/* Branch-free compaction of the chosen j (keys[j] > T, then the first
 * `ties` with keys[j] == T, in order) into sel (room for m); returns how
 * many were chosen.                                                      */
static uint64_t compact_chosen(const uint64_t *keys, uint64_t m, uint64_t T,
                               uint64_t ties, uint64_t *sel)
{
    uint64_t o = 0;
    for (uint64_t j = 0; j < m; j++) {
        uint64_t eq = keys[j] == T;
        uint64_t take = (keys[j] > T) | (eq & (ties > 0));
        ties -= eq & take;
        sel[o] = j;
        o += take;
    }
    return o;
}

/* Top-kk of the m keys gathered from positions pos[0..m) (ascending): writes
 * the chosen positions and raw bits in ascending order.  keys and scratch
 * hold m entries.  Returns the first non-finite position or UINT64_MAX.   */
uint64_t topk_small(const keyinfo *ki, const void *x, uint64_t base,
                    const uint64_t *pos, uint64_t m, uint64_t kk,
                    uint64_t *keys, uint64_t *scratch, uint64_t *out_idx,
                    void *out_values)
{
#define POS(j) (pos ? pos[j] : base + (j))
    uint64_t maxkey = 0;
    if (!pos && ki->width == 4) {   /* contiguous float32: vectorises */
        const uint32_t *xb = (const uint32_t *)x + base;
        for (uint64_t j = 0; j < m; j++) {
            keys[j] = xb[j] & LB_KEY32_MASK;
            maxkey = keys[j] > maxkey ? keys[j] : maxkey;
        }
    } else if (!pos) {
        const uint64_t *xb = (const uint64_t *)x + base;
        for (uint64_t j = 0; j < m; j++) {
            keys[j] = xb[j] & LB_KEY64_MASK;
            maxkey = keys[j] > maxkey ? keys[j] : maxkey;
        }
    } else {
        for (uint64_t j = 0; j < m; j++) {
            keys[j] = raw_at(ki, x, pos[j]) & ki->mask;
            maxkey = keys[j] > maxkey ? keys[j] : maxkey;
        }
    }
    uint64_t bad = UINT64_MAX;
    if (maxkey >= ki->inf)
        for (uint64_t j = 0; j < m && bad == UINT64_MAX; j++)
            if (keys[j] >= ki->inf)
                bad = POS(j);
    if (kk == 0)
        return bad;
    uint64_t T = 0, greater = 0;
    if (kk < m) {
        /* level 1: 2048 bins over the exponent (and, for float32, the top
         * 3 mantissa bits); then the exact k-th key inside the bin alone */
        int shift = ki->width == 4 ? 20 : 52;
        uint32_t hist[2048];
        memset(hist, 0, sizeof hist);
        for (uint64_t j = 0; j < m; j++)
            hist[keys[j] >> shift]++;
        uint64_t above = 0, b = maxkey >> shift;
        while (above + hist[b] < kk) {
            above += hist[b];
            b--;
        }
        uint64_t nc = hist[b];
        if (2 * nc <= m) {
            uint64_t w = 0;
            for (uint64_t j = 0; j < m; j++)
                if ((keys[j] >> shift) == b)
                    scratch[w++] = keys[j];
            T = kth_largest(scratch, nc, kk - above, scratch + nc);
            greater = above;
            for (uint64_t j = 0; j < nc; j++)
                greater += scratch[j] > T;
        } else {
            T = kth_largest(keys, m, kk, scratch);
            for (uint64_t j = 0; j < m; j++)
                greater += keys[j] > T;
        }
    }
    compact_chosen(keys, m, T, kk - greater, scratch);
    for (uint64_t o = 0; o < kk; o++) {
        uint64_t at = POS(scratch[o]);
        out_idx[o] = at;
        store_raw(ki, out_values, o, raw_at(ki, x, at));
    }
    return bad;
#undef POS
}

/* The r-th largest (1 <= r <= m) of a[0..m) (a and its scratch, m entries
 * each, are overwritten), by the branch-free quickselect of scan.h.      */
LB_DEFINE_SELECT_SMALL(uint64_t, select_small)

/* Samples per chunk of the fast chunk path, and the chunks using it (a
 * larger chunk keeps topk_small alone and its smaller buffers).          */
#define CHUNK_SAMPLE 256
#define CHUNK_FAST_MIN (4 * CHUNK_SAMPLE)
#define CHUNK_FAST_MAX LB_CHUNK

/* The rank in CHUNK_SAMPLE evenly spaced samples of a chunk of m whose key
 * bounds its kk largest: the expected rank of the kk-th key plus a margin
 * of about three standard deviations, so the bound is rarely too high; 0
 * when it would be half the sample or more (no saving).                   */
static uint64_t chunk_sample_rank(uint64_t m, uint64_t kk)
{
    double r = (double)kk * CHUNK_SAMPLE / (double)m;
    double sd = sqrt(r * (1.0 - r / CHUNK_SAMPLE)) + 1.0;
    uint64_t rank = (uint64_t)(r + 3.0 * sd) + 2;
    return rank < CHUNK_SAMPLE / 2 ? rank : 0;
}

/* topk_small of the contiguous x[base, base + m) (0 < kk < m) by a sampled
 * bound: lo = a key a little below the kk-th largest of CHUNK_SAMPLE evenly
 * spaced samples (or *hint, the bound of the thread's previous chunk, while
 * it passes kk to 4kk + 256 elements: the output does not depend on it);
 * one vectorised collect (lb_scan) gathers every element with key >= lo
 * (every non-finite one too) in index order; the exact kk-th key among
 * them gives the same selection as topk_small.  buf holds 5m entries.
 * Returns 0 (nothing written) when the bound is unusable or too few
 * elements pass; else 1, with *bad the first non-finite position or
 * UINT64_MAX, and *hint the bound used.                                   */
static int topk_chunk_sampled(const keyinfo *ki, const void *x, uint64_t base,
                              uint64_t m, uint64_t kk, uint64_t *buf,
                              uint64_t *out_idx, void *out_values, uint64_t *bad,
                              uint64_t *hint)
{
    uint64_t *idx = buf, *raw = buf + m, *keys = buf + 2 * m, *scratch = buf + 3 * m;
    int nonfinite = 0;
    uint64_t found = 0;
    /* the bound that served this thread's previous chunk, when it still
     * passes between kk and a few times kk elements here; else a sample  */
    if (*hint < ki->inf) {
        found = collect_range(ki, x, base, base + m, *hint, idx, raw, m, &nonfinite);
        if (found < kk || found > 4 * kk + 256) {
            *hint = UINT64_MAX;
            nonfinite = 0;
        }
    }
    if (*hint >= ki->inf) {
        uint64_t stride = m / CHUNK_SAMPLE;
        for (uint64_t j = 0; j < CHUNK_SAMPLE; j++)
            keys[j] = raw_at(ki, x, base + j * stride + stride / 2) & ki->mask;
        uint64_t rank = chunk_sample_rank(m, kk);
        if (!rank)
            return 0;
        uint64_t lo = select_small(keys, CHUNK_SAMPLE, rank, scratch);
        if (lo >= ki->inf)
            return 0;
        found = collect_range(ki, x, base, base + m, lo, idx, raw, m, &nonfinite);
        if (found < kk)
            return 0;
        *hint = lo;
    }
    for (uint64_t j = 0; j < found; j++)
        keys[j] = raw[j] & ki->mask;
    *bad = UINT64_MAX;
    if (nonfinite)
        for (uint64_t j = 0; j < found; j++)
            if (keys[j] >= ki->inf) {
                *bad = idx[j];
                break;
            }
    memcpy(scratch, keys, (size_t)found * sizeof(uint64_t));
    uint64_t T = select_small(scratch, found, kk, buf + 4 * m), greater = 0;
    for (uint64_t j = 0; j < found; j++)
        greater += keys[j] > T;
    compact_chosen(keys, found, T, kk - greater, scratch);
    for (uint64_t o = 0; o < kk; o++) {
        out_idx[o] = idx[scratch[o]];
        store_raw(ki, out_values, o, raw[scratch[o]]);
    }
    return 1;
}

/* topk_chunk_sampled for float32 through the chunk kernels of lb_scan():
 * 32-bit positions, raw bits and keys, a vectorised collect and select.
 * buf holds 5 (m + LB_CHUNK_SLACK) 32-bit entries; same contract.         */
static int topk_chunk32(const void *x, uint64_t base, uint64_t m, uint64_t kk,
                        uint32_t *buf, uint64_t *out_idx, void *out_values,
                        uint64_t *bad, uint64_t *hint)
{
    const lb_scan_fns *fns = lb_scan();
    uint64_t sb = m + LB_CHUNK_SLACK;
    uint32_t *pos = buf, *raw = buf + sb, *keys = buf + 2 * sb;
    uint32_t *t1 = buf + 3 * sb, *t2 = buf + 4 * sb;
    const uint32_t *bits = (const uint32_t *)x + base;
    uint32_t found = 0;
    if (*hint < LB_KEY32_INF) {
        found = fns->chunk_collect32(bits, (uint32_t)m, (uint32_t)*hint, pos, raw);
        if (found < kk || found > 4 * kk + 256)
            *hint = UINT64_MAX;
    }
    if (*hint >= LB_KEY32_INF) {
        uint64_t stride = m / CHUNK_SAMPLE;
        for (uint64_t j = 0; j < CHUNK_SAMPLE; j++)
            keys[j] = bits[j * stride + stride / 2] & LB_KEY32_MASK;
        uint64_t rank = chunk_sample_rank(m, kk);
        if (!rank)
            return 0;
        uint32_t lo = fns->select32(keys, CHUNK_SAMPLE, (uint32_t)rank, t1, t2);
        if (lo >= LB_KEY32_INF)
            return 0;
        found = fns->chunk_collect32(bits, (uint32_t)m, lo, pos, raw);
        if (found < kk)
            return 0;
        *hint = lo;
    }
    /* lo < Inf: every non-finite element of the chunk was collected */
    uint32_t maxkey = 0;
    for (uint32_t j = 0; j < found; j++) {
        keys[j] = raw[j] & LB_KEY32_MASK;
        maxkey = keys[j] > maxkey ? keys[j] : maxkey;
    }
    *bad = UINT64_MAX;
    if (maxkey >= LB_KEY32_INF)
        for (uint32_t j = 0; j < found; j++)
            if (keys[j] >= LB_KEY32_INF) {
                *bad = base + pos[j];
                break;
            }
    uint32_t T = fns->select32(keys, found, (uint32_t)kk, t1, t2);
    uint32_t greater = 0, atleast = 0;
    for (uint32_t j = 0; j < found; j++) {
        uint32_t key = raw[j] & LB_KEY32_MASK;
        greater += key > T;
        atleast += key >= T;
    }
    /* the chosen positions and raw bits into t1 and t2, branch-free; the
     * keys equal to T are all chosen unless there are surplus ties      */
    uint32_t o = 0;
    if (atleast == kk) {
        for (uint32_t j = 0; j < found; j++) {
            t1[o] = pos[j];
            t2[o] = raw[j];
            o += (raw[j] & LB_KEY32_MASK) >= T;
        }
    } else {
        uint32_t ties = (uint32_t)kk - greater;
        for (uint32_t j = 0; j < found; j++) {
            uint32_t key = raw[j] & LB_KEY32_MASK;
            uint32_t eq = key == T;
            uint32_t take = (key > T) | (eq & (ties > 0));
            ties -= eq & take;
            t1[o] = pos[j];
            t2[o] = raw[j];
            o += take;
        }
    }
    uint32_t *ov = out_values;
    for (o = 0; o < kk; o++) {
        out_idx[o] = base + t1[o];
        ov[o] = t2[o];
    }
    /* A bound far below the kk-th key makes every pass longer: re-aim it
     * at the key of rank kk + margin here (a few standard deviations of
     * the count, so the next chunk rarely has fewer than kk above it).  */
    uint64_t margin = 4 * (uint64_t)sqrt((double)kk) + 16, r2 = kk + margin;
    if (found > r2 + 2 * margin) {
        for (uint32_t j = 0; j < found; j++)
            keys[j] = raw[j] & LB_KEY32_MASK;
        *hint = fns->select32(keys, found, (uint32_t)r2, t1, t2);
    }
    return 1;
}

lb_status chunked_topk(const keyinfo *ki, void *x, const void *g, double decay,
                       double scale, uint64_t n, uint64_t chunk,
                       uint64_t k_per_chunk, int check_finite, int nthreads,
                       lb_sparse *out, lb_error *err)
{
    if (chunk > n)   /* cost follows n, not the parameter: same output */
        chunk = n ? n : 1;
    if (k_per_chunk > chunk)
        k_per_chunk = chunk;
    uint64_t nchunks = lb_num_chunks(n, chunk);
    uint64_t last = n - (nchunks ? (nchunks - 1) * chunk : 0);
    uint64_t total = nchunks ? (nchunks - 1) * k_per_chunk +
                                   (last < k_per_chunk ? last : k_per_chunk)
                             : 0;
    lb_status st = sparse_alloc(out, total, ki->width);
    if (st != LB_OK)
        return st;
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    int team = lb_team(nthreads, n / LB_CHUNK);
    if ((uint64_t)team > nchunks)
        team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        int fast = chunk >= CHUNK_FAST_MIN && chunk <= CHUNK_FAST_MAX;
        uint64_t hint = UINT64_MAX;
        uint64_t *buf = lb_alloc_n(chunk, (fast ? 5 : 3) * sizeof(uint64_t), 0);
        if (!buf)
            lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        LB_OMP(omp for schedule(dynamic, 4))   /* blocks are independent: any thread may take any */
        for (uint64_t c = 0; c < nchunks; c++) {
            if (!buf)
                continue;
            uint64_t b = c * chunk;
            uint64_t m = (n - b) < chunk ? n - b : chunk;
            uint64_t kk = m < k_per_chunk ? m : k_per_chunk;
            uint64_t *oi = out->indices + c * k_per_chunk;
            if (g)   /* p = decay*x + scale*g into this (cache-resident) chunk */
                ef_compensate(ki, x, g, b, b + m, decay, scale);
            void *ov = (char *)out->values + c * k_per_chunk * (uint64_t)ki->width;
            uint64_t bad;
            int done = fast && m >= CHUNK_FAST_MIN && kk > 0 && kk < m;
            if (done && ki->width == 4)
                done = topk_chunk32(x, b, m, kk, (uint32_t *)buf, oi, ov, &bad, &hint);
            else if (done)
                done = topk_chunk_sampled(ki, x, b, m, kk, buf, oi, ov, &bad, &hint);
            if (!done)
                bad = topk_small(ki, x, b, NULL, m, kk, buf + chunk, buf + 2 * chunk, oi, ov);
            if (bad != UINT64_MAX && check_finite)
                lb_record_error(&fail, &fail_at, g ? LB_EOVERFLOW : LB_ENONFINITE, bad);
            if (g)   /* the residual is zero where sent */
                for (uint64_t j = 0; j < kk; j++)
                    memset((char *)x + oi[j] * (uint64_t)ki->width, 0, (size_t)ki->width);
        }
        free(buf);
    }
    if (fail != LB_OK) {
        lb_sparse_free(out);
        if (err)
            err->index = fail_at;
        return fail;
    }
    return LB_OK;
}

lb_status lb_topk_chunked(const void *x, uint64_t n, lb_dtype dt,
                          uint64_t chunk, uint64_t k_per_chunk,
                          int check_finite, int nthreads, lb_sparse *out,
                          lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!ki || !out || (!x && n) || chunk == 0 || chunk > LB_MAX_CHUNK ||
        k_per_chunk > chunk)
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    /* x is only read when g is NULL */
    return chunked_topk(ki, (void *)x, NULL, 1.0, 1.0, n, chunk, k_per_chunk, check_finite,
                        nthreads, out, err);
}

lb_status lb_topk_tiled(const void *x, uint64_t rows, uint64_t cols,
                        lb_dtype dt, uint64_t tile_rows, uint64_t tile_cols,
                        uint64_t k_per_tile, int check_finite, int nthreads,
                        lb_sparse *out, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!ki || !out || tile_rows == 0 || tile_cols == 0 ||
        tile_rows > LB_MAX_TILE || tile_cols > LB_MAX_TILE)
        return LB_EINVAL;
    uint64_t n, tile_max;
    if (lb_size_mul(rows, cols, &n) != LB_OK)
        return LB_EOVERFLOW;
    if (!x && n)
        return LB_EINVAL;
    if (lb_size_mul(tile_rows, tile_cols, &tile_max) != LB_OK)
        return LB_EOVERFLOW;
    if (k_per_tile > tile_max)
        return LB_EINVAL;
    /* cost follows the matrix, not the parameters: a tile side beyond the
     * matrix and a k beyond the tile change nothing in the output        */
    if (tile_rows > rows)
        tile_rows = rows ? rows : 1;
    if (tile_cols > cols)
        tile_cols = cols ? cols : 1;
    tile_max = tile_rows * tile_cols;   /* <= max(n, 1) now */
    if (k_per_tile > tile_max)
        k_per_tile = tile_max;
    memset(out, 0, sizeof(*out));
    uint64_t bands = lb_num_chunks(rows, tile_rows);
    uint64_t tcols = lb_num_chunks(cols, tile_cols);
    /* output offset of each band: sum over its tiles of min(k, tile size) */
    uint64_t *band_off = lb_alloc_n(bands + 1, sizeof(uint64_t), 0);
    if (!band_off)
        return LB_ENOMEM;
    band_off[0] = 0;
    for (uint64_t bd = 0; bd < bands; bd++) {
        uint64_t h = rows - bd * tile_rows < tile_rows ? rows - bd * tile_rows
                                                       : tile_rows;
        uint64_t s = 0;
        for (uint64_t tc = 0; tc < tcols; tc++) {
            uint64_t w = cols - tc * tile_cols < tile_cols ? cols - tc * tile_cols
                                                           : tile_cols;
            s += h * w < k_per_tile ? h * w : k_per_tile;
        }
        band_off[bd + 1] = band_off[bd] + s;
    }
    lb_status st = sparse_alloc(out, band_off[bands], ki->width);
    if (st != LB_OK) {
        free(band_off);
        return st;
    }
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    int team = lb_team(nthreads, n / LB_CHUNK);
    if ((uint64_t)team > bands)
        team = lb_team(nthreads, bands);
    /* pos/keys/scratch for one tile, then each tile's picks of a band
     * (tcols * k_per_tile <= tcols * tile_max <= cols * tile_rows <= n)   */
    uint64_t per_band = tcols * k_per_tile;
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint64_t *buf = lb_alloc_n(3 * tile_max + per_band, sizeof(uint64_t), 0);
        char *vals = lb_alloc_n(per_band, (uint64_t)ki->width, 0);
        uint64_t *cnt = lb_alloc_n(tcols, 2 * sizeof(uint64_t), 0);
        if (!buf || !vals || !cnt)
            lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        LB_OMP(omp for schedule(dynamic, 4))   /* blocks are independent: any thread may take any */
        for (uint64_t bd = 0; bd < bands; bd++) {
            if (!buf || !vals || !cnt)
                continue;
            uint64_t r0 = bd * tile_rows;
            uint64_t h = rows - r0 < tile_rows ? rows - r0 : tile_rows;
            uint64_t *picks = buf + 3 * tile_max;
            uint64_t *cursor = cnt + tcols;
            for (uint64_t tc = 0; tc < tcols; tc++) {
                uint64_t c0 = tc * tile_cols;
                uint64_t w = cols - c0 < tile_cols ? cols - c0 : tile_cols;
                uint64_t m = h * w, kk = m < k_per_tile ? m : k_per_tile;
                for (uint64_t r = 0; r < h; r++)
                    for (uint64_t c = 0; c < w; c++)
                        buf[r * w + c] = (r0 + r) * cols + c0 + c;
                uint64_t bad = topk_small(ki, x, 0, buf, m, kk, buf + tile_max,
                                          buf + 2 * tile_max,
                                          picks + tc * k_per_tile,
                                          vals + tc * k_per_tile * (uint64_t)ki->width);
                if (bad != UINT64_MAX && check_finite)
                    lb_record_error(&fail, &fail_at, LB_ENONFINITE, bad);
                cnt[tc] = kk;
                cursor[tc] = 0;
            }
            /* merge: row by row, tiles left to right, each tile's picks are
             * ascending so the band comes out in flat-index order          */
            uint64_t o = band_off[bd];
            for (uint64_t r = r0; r < r0 + h; r++) {
                for (uint64_t tc = 0; tc < tcols; tc++) {
                    const uint64_t *tp = picks + tc * k_per_tile;
                    while (cursor[tc] < cnt[tc] && tp[cursor[tc]] / cols == r) {
                        uint64_t j = tc * k_per_tile + cursor[tc];
                        out->indices[o] = tp[cursor[tc]];
                        memcpy((char *)out->values + o * (uint64_t)ki->width,
                               vals + j * (uint64_t)ki->width, (size_t)ki->width);
                        cursor[tc]++;
                        o++;
                    }
                }
            }
        }
        free(buf);
        free(vals);
        free(cnt);
    }
    free(band_off);
    if (fail != LB_OK) {
        lb_sparse_free(out);
        if (err)
            err->index = fail_at;
        return fail;
    }
    return LB_OK;
}

/* ------------------------------------------------------------------------ */
/* DGC sampled top-k                                                         */
/* ------------------------------------------------------------------------ */

lb_status lb_topk_sampled(const void *x, uint64_t n, lb_dtype dt, uint64_t k,
                          double sample_ratio, uint64_t seed, uint64_t step,
                          int check_finite, int nthreads, lb_sparse *out,
                          lb_sampled_info *info, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!ki || !out || k > n || (!x && n) || !(sample_ratio > 0.0) ||
        sample_ratio > 1.0 || step >= LB_MAX_STEP)
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    lb_sampled_info local;
    if (!info)
        info = &local;
    memset(info, 0, sizeof(*info));
    if (k == 0 || k == n)
        return lb_topk(x, n, dt, k, check_finite, nthreads, out, err);

    /* Sample size and stride as in DGC's released code: at least
     * sample_ratio*n samples and at least 2/ratio so the sample's top-k is
     * >= 2; stride ceil(n/S/32)*32+1, shrunk by 8 until floor(n/stride)>=S. */
    double ratio = (double)k / (double)n;
    double want = fmax(ceil(sample_ratio * (double)n), ceil(2.0 / ratio));
    if (want >= (double)n) {
        info->num_samples = n;
        info->exact_fallback = 1;
        return lb_topk(x, n, dt, k, check_finite, nthreads, out, err);
    }
    uint64_t S = (uint64_t)want;
    uint64_t stride = (uint64_t)ceil((double)n / (double)S / 32.0) * 32 + 1;
    while (stride > 1 && n / stride < S)
        stride = stride > 8 ? stride - 8 : 1;
    lb_philox_key key = lb_philox_make(seed, step, LB_DOMAIN_SAMPLED_TOPK);
    uint64_t start = lb_philox_below(&key, 0, 1, stride);
    uint64_t m = (n - start + stride - 1) / stride;
    uint64_t *sk = lb_alloc_n(m, 2 * sizeof(uint64_t), 0);
    if (!sk)
        return LB_ENOMEM;
    for (uint64_t j = 0; j < m; j++)
        sk[j] = raw_at(ki, x, start + j * stride) & ki->mask;
    uint64_t ks = (uint64_t)ceil(ratio * (double)m);
    if (ks < 1)
        ks = 1;
    uint64_t thr = kth_largest(sk, m, ks, sk + m);
    free(sk);
    info->num_samples = m;

    uint64_t lo_bound = (uint64_t)ceil(0.8 * (double)k);
    uint64_t hi_bound = (uint64_t)floor(1.3 * (double)k);
    if (hi_bound < k)
        hi_bound = k;
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    cand_part *parts = cand_alloc(n, nparts, hi_bound + 1);
    if (!parts)
        return LB_ENOMEM;
    lb_status st = LB_OK;
    for (int iter = 0;; iter++) {
        int nonfinite = 0, overflow = 0;
        uint64_t total = collect_parallel(ki, x, n, thr, nparts, parts, NULL,
                                          &nonfinite, &overflow);
        if (nonfinite && check_finite) {
            cand_free(parts, nparts);
            if (err)
                err->index = first_nonfinite(ki, x, n);
            return LB_ENONFINITE;
        }
        info->iterations = (uint64_t)iter;
        info->threshold = value_of_key(ki, thr);
        if (total >= lo_bound && total <= hi_bound) {
            st = sparse_alloc(out, total, ki->width);
            if (st == LB_OK) {
                uint64_t o = 0;
                for (int p = 0; p < nparts; p++)
                    for (uint64_t j = 0; j < parts[p].found; j++, o++) {
                        out->indices[o] = parts[p].idx[j];
                        store_raw(ki, out->values, o, parts[p].raw[j]);
                    }
            }
            break;
        }
        if (total > hi_bound) {
            /* exact top-k among the survivors (= the global top-k, as there
             * are at least k of them); direct when all were stored        */
            info->exact_fallback = 1;
            st = overflow ? lb_topk(x, n, dt, k, check_finite, nthreads, out, err)
                          : topk_from_candidates(ki, parts, nparts, k, UINT64_MAX, out);
            break;
        }
        if (iter == 10 || thr == 0) {
            info->exact_fallback = 1;
            st = lb_topk(x, n, dt, k, check_finite, nthreads, out, err);
            break;
        }
        /* too few: lower the threshold by 0.8 in the input precision */
        if (ki->width == 4) {
            float f = (float)value_of_key(ki, thr) * 0.8f;
            uint32_t b;
            memcpy(&b, &f, 4);
            thr = b & LB_KEY32_MASK;
        } else {
            double d = value_of_key(ki, thr) * 0.8;
            uint64_t b;
            memcpy(&b, &d, 8);
            thr = b & LB_KEY64_MASK;
        }
    }
    cand_free(parts, nparts);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Random-k                                                                  */
/* ------------------------------------------------------------------------ */

/* LSD radix sort of a[0..m) (values < limit) using tmp (m entries). */
static void radix_sort_u64(uint64_t *a, uint64_t *tmp, uint64_t m,
                           uint64_t limit)
{
    for (int shift = 0; shift < 64 && (limit - 1) >> shift; shift += 11) {
        uint64_t count[2048] = {0};
        for (uint64_t i = 0; i < m; i++)
            count[(a[i] >> shift) & 2047]++;
        uint64_t s = 0;
        for (int d = 0; d < 2048; d++) {
            uint64_t c = count[d];
            count[d] = s;
            s += c;
        }
        for (uint64_t i = 0; i < m; i++)
            tmp[count[(a[i] >> shift) & 2047]++] = a[i];
        memcpy(a, tmp, (size_t)m * sizeof(uint64_t));
    }
}

/* Membership set over [0, n) for Floyd's algorithm: a bitmap when it is
 * small relative to the sample, else an open-addressing hash table.       */
typedef struct {
    uint64_t *bits;     /* bitmap of n bits, or NULL                          */
    uint64_t *slots;    /* hash table of (value + 1), 0 = empty, or NULL      */
    uint64_t mask;      /* table size - 1                                      */
} idxset;

/* A zeroed table of `size` slots; large ones on transparent huge pages
 * where the kernel allows it (random probes then miss the TLB less).    */
static uint64_t *table_alloc(uint64_t size)
{
    uint64_t bytes;
    if (lb_size_mul(size, sizeof(uint64_t), &bytes) != LB_OK)
        return NULL;
#ifdef MADV_HUGEPAGE
    const uint64_t huge = (uint64_t)2 << 20;
    if (bytes >= 4 * huge) {
        void *p = NULL;
        if (posix_memalign(&p, (size_t)huge, (size_t)bytes) != 0)
            return NULL;
        madvise(p, (size_t)bytes, MADV_HUGEPAGE);
        memset(p, 0, (size_t)bytes);
        return p;
    }
#endif
    return lb_alloc_n(size, sizeof(uint64_t), 1);
}

/* First probe position of v in the hash table (before masking). */
static inline uint64_t idxset_home(uint64_t v)
{
    return ((v + 1) * 0x9E3779B97F4A7C15ull) >> 20;
}

static int idxset_add(idxset *s, uint64_t v)   /* 1 if newly added */
{
    if (s->bits) {
        uint64_t w = v >> 6, b = (uint64_t)1 << (v & 63);
        if (s->bits[w] & b)
            return 0;
        s->bits[w] |= b;
        return 1;
    }
    for (uint64_t i = idxset_home(v);; i++) {
        uint64_t *slot = &s->slots[i & s->mask];
        if (*slot == v + 1)
            return 0;
        if (*slot == 0) {
            *slot = v + 1;
            return 1;
        }
    }
}

/* Draw i of Floyd's algorithm: uniform in [0, bound).  When bound <= 2^32
 * it uses the 32-bit word i of the stream (lane i%4 of block i/4, passed as
 * `word`) by Lemire's multiply-shift; a rejected word, or a larger bound,
 * takes 64-bit words from blocks ceil(draws/4) + r*draws + i, r = 0, 1, ...
 * (lanes 1:0).  Exactly uniform; see _reference.randomk_indices.          */
static uint64_t floyd_draw(const lb_philox_key *key, uint32_t word, uint64_t i,
                           uint64_t draws, uint64_t bound)
{
    if (bound == ((uint64_t)1 << 32))   /* every word is a draw; (uint32_t)bound is 0 */
        return word;
    if (bound < ((uint64_t)1 << 32)) {
        uint64_t m = (uint64_t)word * bound;
        /* the threshold is below bound: compute it (a division) only then */
        if ((uint32_t)m >= (uint32_t)bound)
            return m >> 32;
        uint32_t threshold = (uint32_t)(((uint64_t)1 << 32) - bound) % (uint32_t)bound;
        if ((uint32_t)m >= threshold)
            return m >> 32;
    }
    return lb_philox_below(key, (draws + 3) / 4 + i, draws, bound);
}

/* Writes v as entry o of the output: 64-bit indices, else 32-bit ones. */
static inline void rk_put(uint64_t *i64, uint32_t *i32, uint64_t o, uint64_t v)
{
    if (i64)
        i64[o] = v;
    else
        i32[o] = (uint32_t)v;
}

/* Word w of the bitmap as members: complemented when the set holds the
 * complement, bits at or beyond n cleared.                              */
static inline uint64_t rk_word(const uint64_t *bits, uint64_t w, uint64_t n,
                               int complement)
{
    uint64_t word = complement ? ~bits[w] : bits[w];
    if (w == n / 64)
        word &= ((uint64_t)1 << (n % 64)) - 1;
    return word;
}

/* The members in bitmap words [w0, w1), ascending, to entries [o, end) of
 * the output (exactly end - o of them).  Whole words while two more
 * entries fit: the first two set bits stored unconditionally (kept or not
 * by advancing o), so a sparse bitmap costs no mispredicted branch per
 * word; the rest by loop.                                                */
static void rk_extract(const uint64_t *bits, uint64_t w0, uint64_t w1,
                       uint64_t n, int complement, uint64_t o, uint64_t end,
                       uint64_t *i64, uint32_t *i32)
{
    uint64_t w = w0;
    for (; w < w1 && o + 2 <= end; w++) {
        uint64_t word = rk_word(bits, w, n, complement);
        for (int r = 0; r < 2; r++) {
            /* bit 63 added: a defined ctz for word 0, and no branch */
            rk_put(i64, i32, o, w * 64 + (uint64_t)__builtin_ctzll(word | ((uint64_t)1 << 63)));
            o += word != 0;
            word &= word - 1;
        }
        while (word && o < end) {
            rk_put(i64, i32, o++, w * 64 + (uint64_t)__builtin_ctzll(word));
            word &= word - 1;
        }
    }
    for (; w < w1 && o < end; w++) {
        uint64_t word = rk_word(bits, w, n, complement);
        while (word) {
            rk_put(i64, i32, o++, w * 64 + (uint64_t)__builtin_ctzll(word));
            word &= word - 1;
        }
    }
}

/* Members in bitmap words [w0, w1). */
static uint64_t rk_count(const uint64_t *bits, uint64_t w0, uint64_t w1,
                         uint64_t n, int complement)
{
    uint64_t c = 0;
    for (uint64_t w = w0; w < w1; w++)
        c += (uint64_t)__builtin_popcountll(rk_word(bits, w, n, complement));
    return c;
}

/* Part t of nt of random-k's set-up: the Philox words of its share of the
 * nblocks blocks into rw, and (bits not NULL) its share of the bitmap's
 * words cleared.                                                         */
static void rk_fill(const lb_philox_key *key, const lb_quant_fns *qf,
                    uint32_t *rw, uint64_t nblocks, uint64_t *bits,
                    uint64_t words, int t, int nt)
{
    uint64_t b0, b1;
    lb_split(nblocks, nt, t, &b0, &b1);
    if (b1 > b0)
        qf->philox(key, b0, b1 - b0, rw + 4 * b0);
    if (bits) {
        lb_split(words, nt, t, &b0, &b1);
        memset(bits + b0, 0, (size_t)(b1 - b0) * sizeof(uint64_t));
    }
}

/* Maximum team of the parallel parts of random-k. */
#define RK_MAX_TEAM 64

/* lb_randomk_indices into 64-bit (i64) or 32-bit (i32) indices.  The
 * Philox words, the bitmap clearing and the bitmap scan run on up to
 * nthreads threads; Floyd's insertions are serial; the result does not
 * depend on the team.                                                    */
static lb_status randomk_body(uint64_t n, uint64_t k, uint64_t seed,
                              uint64_t step, int nthreads, uint64_t *i64,
                              uint32_t *i32)
{
    if (k > n || step >= LB_MAX_STEP || (!i64 && !i32 && k) || (i32 && n > ((uint64_t)1 << 32)))
        return LB_EINVAL;
    if (k == 0)
        return LB_OK;
    /* Draw the smaller of the sample and its complement. */
    int complement = k > n / 2;
    uint64_t draws = complement ? n - k : k;
    idxset set = {0};
    /* A bitmap needs no sort afterwards: it wins unless the sample is so
     * sparse that zeroing and scanning n bits costs more than the table.  */
    int bitmap = complement || n <= ((uint64_t)1 << 20) || n / 64 <= 16 * draws;
    uint64_t words = n / 64 + 1, bytes = 0;
    int team = lb_team(nthreads, n / LB_CHUNK);
    if (team > RK_MAX_TEAM)
        team = RK_MAX_TEAM;
    /* the 32-bit words of the draws (word a for draw a, four per Philox
     * block of the vectorised generator of the quantization kernels)     */
    uint64_t nblocks = (draws + 3) / 4, wbytes;
    if (lb_size_mul(nblocks, 4 * sizeof(uint32_t), &wbytes) != LB_OK)
        return LB_ENOMEM;
    uint32_t *rw = lb_scratch_alloc((size_t)wbytes);
    if (!rw)
        return LB_ENOMEM;
    if (bitmap) {
        /* from the scratch cache: its pages stay mapped from call to call
         * instead of being faulted in and zeroed every time              */
        if (lb_size_mul(words, sizeof(uint64_t), &bytes) != LB_OK ||
            !(set.bits = lb_scratch_alloc((size_t)bytes))) {
            lb_scratch_free(rw);
            return LB_ENOMEM;
        }
    } else {
        uint64_t size = 1;
        while (size < 2 * draws)
            size <<= 1;
        set.slots = table_alloc(size);
        if (!set.slots) {
            lb_scratch_free(rw);
            return LB_ENOMEM;
        }
        set.mask = size - 1;
    }
    lb_philox_key key = lb_philox_make(seed, step, LB_DOMAIN_RANDOMK);
    const lb_quant_fns *qf = lb_quant();
    /* a team of one runs the bodies directly: no region at all, even
     * when called from inside another one (lb_randomk_group)          */
    if (team > 1) {
        LB_OMP(omp parallel num_threads(team))
        rk_fill(&key, qf, rw, nblocks, bitmap ? set.bits : NULL, words,
                omp_get_thread_num(), omp_get_num_threads());
    } else {
        rk_fill(&key, qf, rw, nblocks, bitmap ? set.bits : NULL, words, 0, 1);
    }
    {
        /* Floyd: for j = n-draws .. n-1 pick t uniform in [0, j]; add t,
         * or j when t is already in.  The draws do not depend on the set,
         * only the insertions do: draw FLOYD_AHEAD ahead and prefetch
         * their word or slot, so the cache misses of a set larger than the
         * cache overlap (same draws, same set).                           */
        enum { FLOYD_AHEAD = 32 };
        uint64_t ring[FLOYD_AHEAD];
        for (uint64_t a = 0; a < draws + FLOYD_AHEAD; a++) {
            if (a < draws) {
                uint64_t t = floyd_draw(&key, rw[a], a, draws, n - draws + a + 1);
                if (bitmap)
                    __builtin_prefetch(&set.bits[t >> 6], 1);
                else
                    __builtin_prefetch(&set.slots[idxset_home(t) & set.mask], 1);
                if (a < FLOYD_AHEAD) {
                    ring[a] = t;
                    continue;
                }
                uint64_t i = a - FLOYD_AHEAD;
                uint64_t old = ring[a % FLOYD_AHEAD];
                ring[a % FLOYD_AHEAD] = t;
                if (!idxset_add(&set, old))
                    idxset_add(&set, n - draws + i);
            } else if (a >= FLOYD_AHEAD) {
                uint64_t i = a - FLOYD_AHEAD;
                if (!idxset_add(&set, ring[a % FLOYD_AHEAD]))
                    idxset_add(&set, n - draws + i);
            }
        }
    }
    lb_scratch_free(rw);
    if (bitmap) {
        /* each part of the words counts its members, then writes them at
         * the sum of the counts before it                                */
        uint64_t count[RK_MAX_TEAM + 1] = {0};
        if (team > 1) {
            LB_OMP(omp parallel num_threads(team))
            {
                int t = omp_get_thread_num(), nt = omp_get_num_threads();
                uint64_t w0, w1;
                lb_split(words, nt, t, &w0, &w1);
                uint64_t c = rk_count(set.bits, w0, w1, n, complement);
                count[t + 1] = c;
                LB_OMP(omp barrier)
                uint64_t o = 0;
                for (int p = 0; p <= t; p++)
                    o += count[p];
                rk_extract(set.bits, w0, w1, n, complement, o, o + c, i64, i32);
            }
        } else {
            rk_extract(set.bits, 0, words, n, complement, 0, k, i64, i32);
        }
        lb_scratch_free(set.bits);
        return LB_OK;
    }
    uint64_t *tmp = lb_alloc_n(2 * k, sizeof(uint64_t), 0);
    if (!tmp) {
        free(set.slots);
        return LB_ENOMEM;
    }
    uint64_t o = 0;
    for (uint64_t i = 0; i <= set.mask; i++)
        if (set.slots[i])
            tmp[o++] = set.slots[i] - 1;
    free(set.slots);
    radix_sort_u64(tmp, tmp + k, k, n);
    for (o = 0; o < k; o++)
        rk_put(i64, i32, o, tmp[o]);
    free(tmp);
    return LB_OK;
}

lb_status lb_randomk_indices(uint64_t n, uint64_t k, uint64_t seed,
                             uint64_t step, uint64_t *indices)
{
    if (!indices && k)
        return LB_EINVAL;
    return randomk_body(n, k, seed, step, 1, indices, NULL);
}

lb_status lb_randomk_indices32(uint64_t n, uint64_t k, uint64_t seed,
                               uint64_t step, int nthreads, uint32_t *indices)
{
    if (!indices && k)
        return LB_EINVAL;
    return randomk_body(n, k, seed, step, nthreads, NULL, indices);
}

/* lb_gather's body, for either index type (the two entry points below). */
#define LB_GATHER_BODY()                                                       \
    const keyinfo *ki = keyinfo_of(dt);                                        \
    if (!ki || (k && (!x || !indices || !values)))                             \
        return LB_EINVAL;                                                      \
    for (uint64_t i = 0; i < k; i++)                                           \
        if (indices[i] >= n)                                                   \
            return LB_ERANGE;                                                  \
    uint64_t bad = UINT64_MAX;                                                 \
    int team = lb_team(nthreads, k / LB_CHUNK);                                \
    if (ki->width == 4) {                                                      \
        const float *xs = x;                                                   \
        float *vs = values;                                                    \
        float s = (float)scale;                                                \
        LB_OMP(omp parallel for num_threads(team) schedule(static) reduction(min:bad) if(team > 1)) \
        for (uint64_t i = 0; i < k; i++) {                                     \
            if (i + 16 < k)   /* sparse indices: each a cache miss */          \
                __builtin_prefetch(xs + indices[i + 16]);                      \
            float v = xs[indices[i]];                                          \
            if (!isfinite(v) && (uint64_t)indices[i] < bad)                    \
                bad = indices[i];                                              \
            vs[i] = scale == 1.0 ? v : v * s;                                  \
        }                                                                      \
    } else {                                                                   \
        const double *xs = x;                                                  \
        double *vs = values;                                                   \
        LB_OMP(omp parallel for num_threads(team) schedule(static) reduction(min:bad) if(team > 1)) \
        for (uint64_t i = 0; i < k; i++) {                                     \
            if (i + 16 < k)                                                    \
                __builtin_prefetch(xs + indices[i + 16]);                      \
            double v = xs[indices[i]];                                         \
            if (!isfinite(v) && (uint64_t)indices[i] < bad)                    \
                bad = indices[i];                                              \
            vs[i] = scale == 1.0 ? v : v * scale;                              \
        }                                                                      \
    }                                                                          \
    if (check_finite && bad != UINT64_MAX) {                                   \
        if (err)                                                               \
            err->index = bad;                                                  \
        return LB_ENONFINITE;                                                  \
    }                                                                          \
    return LB_OK;

lb_status lb_gather(const void *x, uint64_t n, lb_dtype dt,
                    const uint64_t *indices, uint64_t k, double scale,
                    int check_finite, int nthreads, void *values, lb_error *err)
{
    LB_GATHER_BODY()
}

lb_status lb_gather_u32(const void *x, uint64_t n, lb_dtype dt,
                        const uint32_t *indices, uint64_t k, double scale,
                        int check_finite, int nthreads, void *values,
                        lb_error *err)
{
    LB_GATHER_BODY()
}
