/*
 * feedback.c - error feedback fused with its compressor: the compensation
 * p = decay*e + scale*g, the selection and the residual update
 * e = p - D(C(p)) run as one pass over the data (see lowband.h).
 *
 * The top-k variant reuses the selection machinery of sparsify.c
 * (select.h) and runs in two steps: the plan reads e and g only (a sample
 * of p bounds the k-th magnitude, one read-only pass checks p and collects
 * the candidates, the exact choice is made from them), then the commit
 * writes e = p with zeros where sent, and cannot fail.  A failed step (a
 * non-finite g, an overflow) so leaves e exactly as it was, with no copy of
 * it.  Results are the same bytes as the unfused NumPy sequence, for any
 * thread count.
 */
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "scan.h"
#include "scratch.h"
#include "select.h"
#include "threads.h"

/* p at element i, with the same operation order as the scan kernels. */
static inline uint64_t p_key(const keyinfo *ki, const void *e, const void *g,
                             uint64_t i, double decay, double scale)
{
    if (ki->width == 4) {
        float t1 = (float)decay * ((const float *)e)[i];
        float t2 = (float)scale * ((const float *)g)[i];
        float p = t1 + t2;
        uint32_t b;
        memcpy(&b, &p, 4);
        return b & LB_KEY32_MASK;
    }
    double t1 = decay * ((const double *)e)[i];
    double t2 = scale * ((const double *)g)[i];
    double p = t1 + t2;
    uint64_t b;
    memcpy(&b, &p, 8);
    return b & LB_KEY64_MASK;
}

/* The keys of p over the TOPK_RUN elements from `at` (one sample run). */
static void run_keys(const keyinfo *ki, const void *e, const void *g, uint64_t at,
                     double decay, double scale, uint64_t *keys)
{
    if (ki->width == 4) {
        const float *ef = (const float *)e + at, *gf = (const float *)g + at;
        float d = (float)decay, c = (float)scale;
        for (uint64_t j = 0; j < TOPK_RUN; j++) {
            float t1 = d * ef[j], t2 = c * gf[j], p = t1 + t2;
            uint32_t b;
            memcpy(&b, &p, 4);
            keys[j] = b & LB_KEY32_MASK;
        }
    } else {
        for (uint64_t j = 0; j < TOPK_RUN; j++)
            keys[j] = p_key(ki, e, g, at + j, decay, scale);
    }
}

/* Common argument checks; LB_ENONFINITE (e untouched) for a bad g. */
static lb_status ef_begin(const keyinfo *ki, const void *e, const void *g,
                          uint64_t n, double decay, double scale,
                          int check_finite, int nparts, lb_error *err)
{
    if (!ki || (n && (!e || !g)) || !(decay == decay) || !(scale == scale))
        return LB_EINVAL;
    if (check_finite) {
        int nf = 0;
        collect_parallel(ki, g, n, UINT64_MAX, nparts, NULL, NULL, &nf, NULL);
        if (nf) {
            if (err)
                err->index = first_nonfinite(ki, g, n);
            return LB_ENONFINITE;
        }
    }
    return LB_OK;
}

/* p (now in e) is non-finite although g was finite: report where. */
static lb_status overflowed(const keyinfo *ki, const void *e, uint64_t n,
                            lb_error *err)
{
    if (err)
        err->index = first_nonfinite(ki, e, n);
    return LB_EOVERFLOW;
}

lb_status lb_ef_axpby(void *e, const void *g, uint64_t n, lb_dtype dt,
                      double decay, double scale, int check_finite,
                      int nthreads, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    lb_status st = ef_begin(ki, e, g, n, decay, scale, check_finite, nparts, err);
    if (st != LB_OK)
        return st;
    int nonfinite = 0;
    ef_collect_parallel(ki, e, g, n, decay, scale, UINT64_MAX, nparts, NULL, &nonfinite, NULL);
    if (nonfinite && check_finite)
        return overflowed(ki, e, n, err);
    return LB_OK;
}

/* The read-only collect (scan.h efp_collect*) of p over e/g[b, end). */
static uint64_t efp_collect_range(const keyinfo *ki, const void *e, const void *g,
                                  uint64_t b, uint64_t end, double decay, double scale,
                                  uint64_t lo, uint64_t *idx, uint64_t *raw, uint64_t cap,
                                  int *nonfinite)
{
    const lb_scan_fns *fns = lb_scan();
    if (ki->width == 4) {
        if (lo > LB_KEY32_MASK)
            lo = (uint64_t)LB_KEY32_MASK + 1;   /* nothing qualifies */
        return fns->efp_collect32((const float *)e, (const float *)g, b, end, (float)decay,
                                  (float)scale, (uint32_t)lo, idx, raw, cap, nonfinite);
    }
    return fns->efp_collect64((const double *)e, (const double *)g, b, end, decay, scale, lo,
                              idx, raw, cap, nonfinite);
}

/* The failure of a step whose p has a non-finite element (e untouched):
 * LB_ENONFINITE at g's first non-finite element, or, g being finite,
 * LB_EOVERFLOW at p's first.                                              */
static lb_status ef_failure(const keyinfo *ki, const void *e, const void *g, uint64_t n,
                            double decay, double scale, lb_error *err)
{
    lb_status st = LB_ENONFINITE;
    uint64_t bad = first_nonfinite(ki, g, n);
    if (bad == n) {
        st = LB_EOVERFLOW;
        bad = 0;
        while (bad < n && p_key(ki, e, g, bad, decay, scale) < ki->inf)
            bad++;
    }
    if (err)
        err->index = bad;
    return st;
}

/* The selection by way of p in a temporary (small vectors, k = 0 or n, a
 * sample that missed): p = decay*e + scale*g computed aside, lb_topk on it. */
static lb_status plan_aside(const keyinfo *ki, const void *e, const void *g, uint64_t n,
                            lb_dtype dt, double decay, double scale, uint64_t k,
                            int check_finite, int nthreads, lb_sparse *out, lb_error *err)
{
    uint64_t bytes = 0, local[TOPK_SMALL_N];   /* small vectors: p on the stack */
    if (lb_size_mul(n ? n : 1, (uint64_t)ki->width, &bytes) != LB_OK)
        return LB_ENOMEM;
    void *p = bytes <= sizeof(local) ? (void *)local : lb_scratch_alloc((size_t)bytes);
    if (!p)
        return LB_ENOMEM;
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1) if(nparts > 1))
    for (int part = 0; part < nparts; part++) {
        uint64_t b, end;
        lb_split(n, nparts, part, &b, &end);
        if (end > b)
            memcpy((char *)p + b * (uint64_t)ki->width, (const char *)e + b * (uint64_t)ki->width,
                   (size_t)((end - b) * (uint64_t)ki->width));
        ef_compensate(ki, p, g, b, end, decay, scale);
    }
    lb_status st = lb_topk(p, n, dt, k, check_finite, nthreads, out, err);
    if (p != (void *)local)
        lb_scratch_free(p);
    if (st == LB_ENONFINITE)
        st = ef_failure(ki, e, g, n, decay, scale, err);
    return st;
}

/* The selection of a step: the exact top-k of p = decay*e + scale*g into
 * out, reading e and g only (on any failure nothing was written).  Large
 * vectors: a sample of p bounds the k-th magnitude and one read-only pass
 * collects the candidates; otherwise (or when the sample missed) p is
 * computed aside (plan_aside).                                            */
static lb_status ef_topk_plan(const keyinfo *ki, const void *e, const void *g, uint64_t n,
                              lb_dtype dt, double decay, double scale, uint64_t k,
                              int check_finite, int nthreads, lb_sparse *out, lb_error *err)
{
    uint64_t m = k > 0 && k < n ? sample_size(n) : 0;
    uint64_t lo = 0, hi = UINT64_MAX, expected = 0;
    int fast = 0;
    if (m) {
        uint64_t *keys = lb_scratch_alloc(2 * m * sizeof(uint64_t));
        if (keys) {
            int team = lb_team(nthreads, m / (TOPK_SAMPLE / 2));
            LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
            for (uint64_t r = 0; r < m / TOPK_RUN; r++)
                run_keys(ki, e, g, sample_run_start(n, m, r), decay, scale,
                         keys + r * TOPK_RUN);
            fast = sample_bounds_from(keys, m, n, k, &lo, &hi, &expected);
            lb_scratch_free(keys);
        }
    }
    if (!fast)
        return plan_aside(ki, e, g, n, dt, decay, scale, k, check_finite, nthreads, out, err);
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    cand_part *parts = cand_alloc(n, nparts, expected + expected / 2 + 4096);
    if (!parts)
        return LB_ENOMEM;
    uint64_t total = 0;
    int nonfinite = 0, of = 0;
    LB_OMP(omp parallel for num_threads(nparts) schedule(static, 1)
           reduction(+:total) reduction(|:nonfinite, of) if(nparts > 1))
    for (int part = 0; part < nparts; part++) {
        uint64_t b, end;
        int part_nf = 0;
        lb_split(n, nparts, part, &b, &end);
        uint64_t found = efp_collect_range(ki, e, g, b, end, decay, scale, lo, parts[part].idx,
                                           parts[part].raw, parts[part].cap, &part_nf);
        parts[part].found = found;
        of |= found > parts[part].cap;
        total += found;
        nonfinite |= part_nf;
    }
    lb_status st;
    if (nonfinite && check_finite)
        st = ef_failure(ki, e, g, n, decay, scale, err);
    else if (!of && total >= k)
        st = topk_from_candidates(ki, parts, nparts, k, hi, out);
    else   /* the sample missed */
        st = plan_aside(ki, e, g, n, dt, decay, scale, k, check_finite, nthreads, out, err);
    cand_free(parts, nparts);
    return st;
}

/* e = p over [b, end), then 0 at the sent indices there (ix ascending),
 * block by block while the block is in cache.                            */
static void apply_range(const keyinfo *ki, void *e, const void *g, uint64_t b, uint64_t end,
                        double decay, double scale, const uint64_t *ix, uint64_t count)
{
    const uint64_t block = 4096;
    uint64_t lo = 0, hi = count;   /* first sent index >= b */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (ix[mid] < b)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (uint64_t i = b; i < end; i += block) {
        uint64_t stop = end - i < block ? end : i + block;
        ef_compensate(ki, e, g, i, stop, decay, scale);
        if (ki->width == 4)
            for (; lo < count && ix[lo] < stop; lo++)
                ((float *)e)[ix[lo]] = 0.0f;
        else
            for (; lo < count && ix[lo] < stop; lo++)
                ((double *)e)[ix[lo]] = 0.0;
    }
}

/* The write of a planned step (cannot fail): apply_range over chunks,
 * handed out dynamically to a team (a thread that runs slower, e.g. on a
 * busy core, takes fewer); the writes do not depend on who makes them.
 * A team of one loops here (no OpenMP: a dynamic loop needs a real team). */
static void ef_topk_apply(const keyinfo *ki, void *e, const void *g, uint64_t n,
                          double decay, double scale, const lb_sparse *sent, int nthreads)
{
    const uint64_t chunk = 4 * LB_CHUNK;
    uint64_t nchunks = lb_num_chunks(n, chunk);
    int team = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    const uint64_t *ix = sent->indices, count = sent->count;
    if (team < 2) {
        apply_range(ki, e, g, 0, n, decay, scale, ix, count);
        return;
    }
    LB_OMP(omp parallel for num_threads(team) schedule(dynamic, 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t b = c * chunk, end = n - b < chunk ? n : b + chunk;
        apply_range(ki, e, g, b, end, decay, scale, ix, count);
    }
}

lb_status lb_ef_topk_begin(const void *e, const void *g, uint64_t n, lb_dtype dt,
                           double decay, double scale, uint64_t k, int check_finite,
                           int nthreads, lb_sparse *out, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!out)
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    if (!ki || k > n || (n && (!e || !g)) || !(decay == decay) || !(scale == scale))
        return LB_EINVAL;
    return ef_topk_plan(ki, e, g, n, dt, decay, scale, k, check_finite, nthreads, out, err);
}

lb_status lb_ef_topk_commit(void *e, const void *g, uint64_t n, lb_dtype dt, double decay,
                            double scale, const lb_sparse *out, int nthreads)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!ki || !out || (n && (!e || !g)))
        return LB_EINVAL;
    ef_topk_apply(ki, e, g, n, decay, scale, out, nthreads);
    return LB_OK;
}

lb_status lb_ef_topk(void *e, const void *g, uint64_t n, lb_dtype dt,
                     double decay, double scale, uint64_t k, int check_finite,
                     int nthreads, lb_sparse *out, lb_error *err)
{
    lb_status st = lb_ef_topk_begin(e, g, n, dt, decay, scale, k, check_finite, nthreads, out,
                                    err);
    if (st != LB_OK)
        return st;
    return lb_ef_topk_commit(e, g, n, dt, decay, scale, out, nthreads);
}

lb_status lb_ef_sign_residual(void *e, uint64_t n, lb_dtype dt,
                              const float *scales, uint64_t block, int nthreads)
{
    if ((dt != LB_F32 && dt != LB_F64) || (n && !e))
        return LB_EINVAL;
    uint64_t B = block ? block : (n ? n : 1);
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t end = (c + 1) * LB_CHUNK < n ? (c + 1) * LB_CHUNK : n;
        for (uint64_t i = c * LB_CHUNK; i < end;) {
            uint64_t b = i / B;
            uint64_t stop = (b + 1) * B < end ? (b + 1) * B : end;
            if (dt == LB_F32) {
                float s = scales ? scales[b] : 1.0f, *ef = e;
                for (uint64_t j = i; j < stop; j++)
                    ef[j] = ef[j] - (ef[j] >= 0.0f ? 1.0f * s : -1.0f * s);
            } else {
                double s = scales ? (double)scales[b] : 1.0, *ed = e;
                for (uint64_t j = i; j < stop; j++)
                    ed[j] = ed[j] - (ed[j] >= 0.0 ? 1.0 * s : -1.0 * s);
            }
            i = stop;
        }
    }
    return LB_OK;
}

lb_status lb_ef_topk_chunked(void *e, const void *g, uint64_t n, lb_dtype dt,
                             double decay, double scale, uint64_t chunk,
                             uint64_t k_per_chunk, int check_finite,
                             int nthreads, lb_sparse *out, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!out || chunk == 0 || k_per_chunk > chunk)
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    lb_status st = ef_begin(ki, e, g, n, decay, scale, check_finite, nparts, err);
    if (st != LB_OK)
        return st;
    return chunked_topk(ki, e, g, decay, scale, n, chunk, k_per_chunk, check_finite,
                        nthreads, out, err);
}
