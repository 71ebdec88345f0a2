/*
 * feedback.c - error feedback fused with its compressor: the compensation
 * p = decay*e + scale*g, the selection and the residual update
 * e = p - D(C(p)) run as one pass over the data (see lowband.h).
 *
 * The top-k variant reuses the selection machinery of sparsify.c
 * (select.h): a sample of p bounds the k-th magnitude, one streaming pass
 * writes p into e and collects the candidates, and the exact choice is made
 * from the candidates; when the sample misses, the two-pass radix top-k runs
 * on e (which by then holds p).  Results are the same bytes as the unfused
 * NumPy sequence, for any thread count.
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

/* e = 0 at the sent indices (p - D(C(p)) = p - p there); the scattered
 * writes are prefetched a few entries ahead.                              */
static void zero_sent(const keyinfo *ki, void *e, const lb_sparse *out,
                      int nthreads)
{
    const uint64_t ahead = 16;
    int team = lb_team(nthreads, out->count / LB_CHUNK);
    const uint64_t *ix = out->indices, count = out->count;
    if (ki->width == 4) {
        float *ef = e;
        LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
        for (uint64_t j = 0; j < count; j++) {
            if (j + ahead < count)
                __builtin_prefetch(ef + ix[j + ahead], 1);
            ef[ix[j]] = 0.0f;
        }
    } else {
        double *ed = e;
        LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
        for (uint64_t j = 0; j < count; j++) {
            if (j + ahead < count)
                __builtin_prefetch(ed + ix[j + ahead], 1);
            ed[ix[j]] = 0.0;
        }
    }
}

lb_status lb_ef_topk(void *e, const void *g, uint64_t n, lb_dtype dt,
                     double decay, double scale, uint64_t k, int check_finite,
                     int nthreads, lb_sparse *out, lb_error *err)
{
    const keyinfo *ki = keyinfo_of(dt);
    if (!out || k > n)
        return LB_EINVAL;
    memset(out, 0, sizeof(*out));
    int nparts = lb_team(nthreads, lb_num_chunks(n, LB_CHUNK));
    lb_status st = ef_begin(ki, e, g, n, decay, scale, check_finite, nparts, err);
    if (st != LB_OK)
        return st;

    uint64_t lo = 0, hi = UINT64_MAX, expected = 0;
    int fast = 0;
    if (k > 0 && k < n && n >= TOPK_SAMPLE_MIN_N) {
        uint64_t *keys = lb_scratch_alloc(2 * TOPK_SAMPLE * sizeof(uint64_t));
        if (keys) {
            int team = lb_team(nthreads, 2);
            LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
            for (uint64_t j = 0; j < TOPK_SAMPLE; j++)
                keys[j] = p_key(ki, e, g, sample_position(n, j), decay, scale);
            fast = sample_bounds_from(keys, n, k, &lo, &hi, &expected);
            lb_scratch_free(keys);
        }
    }
    if (fast) {
        /* the one pass: p into e, candidates collected */
        cand_part *parts = cand_alloc(n, nparts, expected + expected / 2 + 4096);
        if (!parts)
            return LB_ENOMEM;
        int nonfinite = 0, of = 0;
        uint64_t total = ef_collect_parallel(ki, e, g, n, decay, scale, lo, nparts, parts,
                                             &nonfinite, &of);
        if (nonfinite && check_finite) {
            cand_free(parts, nparts);
            return overflowed(ki, e, n, err);
        }
        if (!of && total >= k)
            st = topk_from_candidates(ki, parts, nparts, k, hi, out);
        else   /* the sample missed: radix top-k of p, which e now holds */
            st = lb_topk(e, n, dt, k, check_finite, nthreads, out, err);
        cand_free(parts, nparts);
    } else {
        st = lb_ef_axpby(e, g, n, dt, decay, scale, 0, nthreads, err);
        if (st == LB_OK)
            st = lb_topk(e, n, dt, k, check_finite, nthreads, out, err);
        if (st == LB_ENONFINITE)
            st = LB_EOVERFLOW;   /* g was finite */
    }
    if (st != LB_OK)
        return st;
    zero_sent(ki, e, out, nthreads);
    return LB_OK;
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
