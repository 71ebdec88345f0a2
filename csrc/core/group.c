/*
 * group.c - one call for a group of tensors: the per-tensor kernels
 * (top-k, error feedback + top-k) run over a list of segments, each its
 * own vector with its own k, and give one result per segment.
 *
 * Scheduling: segments of at least LB_GROUP_BIG elements run one after the
 * other, each with the whole team inside the kernel; the smaller ones are
 * shared out across the team (dynamic schedule), one thread each.  Every
 * kernel gives the same bytes for any thread count, so each segment's result
 * equals a lone call on that segment whatever the schedule.  Failures are
 * recorded per segment and the one with the lowest segment index is
 * reported (every segment runs), so the error does not depend on the
 * schedule either; the results of the other segments are freed.
 */
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "threads.h"

/* One segment's kernel call: the operation behind run_group(). */
typedef lb_status (*seg_fn)(const void *ctx, uint64_t s, int nthreads,
                            lb_error *err);

/* Runs fn on every segment (big ones with the team, small ones across it;
 * the small ones first, or last with big_first); the first failure by
 * segment index goes to *seg and err.                                     */
static lb_status run_group(const void *ctx, seg_fn fn, const uint64_t *n,
                           uint64_t nseg, int nthreads, lb_error *err,
                           uint64_t *seg, int big_first)
{
    lb_status acc = LB_OK;
    uint64_t where = UINT64_MAX, nsmall = 0;
    lb_error *errs = lb_alloc_n(nseg ? nseg : 1, sizeof(lb_error), 1);
    if (!errs)
        return LB_ENOMEM;
    for (uint64_t s = 0; s < nseg; s++)
        nsmall += n[s] < LB_GROUP_BIG;
    int team = lb_team(nthreads, nsmall);
    for (int round = 0; round < 2; round++) {
        if (round == big_first) {
            LB_OMP(omp parallel for num_threads(team) schedule(dynamic, 1) if(team > 1))
            for (uint64_t s = 0; s < nseg; s++)
                if (n[s] < LB_GROUP_BIG)
                    lb_record_error(&acc, &where, fn(ctx, s, 1, errs + s), s);
        } else {
            for (uint64_t s = 0; s < nseg; s++)
                if (n[s] >= LB_GROUP_BIG)
                    lb_record_error(&acc, &where, fn(ctx, s, nthreads, errs + s), s);
        }
    }
    if (acc != LB_OK) {
        if (err)
            *err = errs[where];
        if (seg)
            *seg = where;
    }
    free(errs);
    return acc;
}

/* Frees the results of every segment (after a failure). */
static void free_all(lb_sparse *out, uint64_t nseg)
{
    for (uint64_t s = 0; s < nseg; s++)
        lb_sparse_free(out + s);
}

typedef struct {
    void *const *e;
    const void *const *x;
    const uint64_t *n, *k;
    lb_dtype dt;
    double decay, scale;
    int check_finite;
    lb_sparse *out;
} group_args;

static lb_status seg_topk(const void *ctx, uint64_t s, int nthreads, lb_error *err)
{
    const group_args *a = ctx;
    return lb_topk(a->x[s], a->n[s], a->dt, a->k[s], a->check_finite, nthreads,
                   a->out + s, err);
}

static lb_status seg_ef_topk_begin(const void *ctx, uint64_t s, int nthreads, lb_error *err)
{
    const group_args *a = ctx;
    return lb_ef_topk_begin(a->e[s], a->x[s], a->n[s], a->dt, a->decay, a->scale, a->k[s],
                            a->check_finite, nthreads, a->out + s, err);
}

static lb_status seg_ef_topk_commit(const void *ctx, uint64_t s, int nthreads, lb_error *err)
{
    const group_args *a = ctx;
    return lb_ef_topk_commit(a->e[s], a->x[s], a->n[s], a->dt, a->decay, a->scale, a->out + s,
                             nthreads);
}

/* Common checks: k[s] <= n[s] for every segment; results zeroed so that
 * free_all() is safe whatever ran.                                        */
static lb_status group_begin(const uint64_t *n, const uint64_t *k, uint64_t nseg,
                             lb_sparse *out, uint64_t *seg)
{
    if (nseg && (!n || !k || !out))
        return LB_EINVAL;
    for (uint64_t s = 0; s < nseg; s++) {
        out[s].indices = NULL;
        out[s].values = NULL;
        out[s].count = 0;
    }
    for (uint64_t s = 0; s < nseg; s++)
        if (k[s] > n[s]) {
            if (seg)
                *seg = s;
            return LB_EINVAL;
        }
    return LB_OK;
}

lb_status lb_topk_group(const void *const *x, const uint64_t *n,
                        const uint64_t *k, uint64_t nseg, lb_dtype dt,
                        int check_finite, int nthreads, lb_sparse *out,
                        lb_error *err, uint64_t *seg)
{
    lb_status st = group_begin(n, k, nseg, out, seg);
    if (st != LB_OK)
        return st;
    if (nseg && !x)
        return LB_EINVAL;
    group_args a = {NULL, x, n, k, dt, 1.0, 1.0, check_finite, out};
    st = run_group(&a, seg_topk, n, nseg, nthreads, err, seg, 0);
    if (st != LB_OK)
        free_all(out, nseg);
    return st;
}

lb_status lb_ef_topk_group(void *const *e, const void *const *g,
                           const uint64_t *n, const uint64_t *k, uint64_t nseg,
                           lb_dtype dt, double decay, double scale,
                           int check_finite, int nthreads, lb_sparse *out,
                           lb_error *err, uint64_t *seg)
{
    lb_status st = group_begin(n, k, nseg, out, seg);
    if (st != LB_OK)
        return st;
    if (nseg && (!e || !g))
        return LB_EINVAL;
    group_args a = {e, g, n, k, dt, decay, scale, check_finite, out};
    /* every selection first (nothing written), then every state; the
     * small segments last and first, so that their data is still cached */
    st = run_group(&a, seg_ef_topk_begin, n, nseg, nthreads, err, seg, 1);
    if (st == LB_OK)
        st = run_group(&a, seg_ef_topk_commit, n, nseg, nthreads, err, seg, 0);
    if (st != LB_OK)
        free_all(out, nseg);
    return st;
}

/* The quantizers and random-k: outputs preallocated by the caller. */
typedef struct {
    const void *const *x;
    const uint64_t *n, *k;
    lb_dtype dt;
    int mode, bits, stochastic, rescale, check_finite;
    uint64_t block, seed, step;
    uint8_t *const *codes;
    float *const *scales;
    uint64_t *const *indices;
    void *const *values;
    const uint8_t *out_dt;   /* quantize: each segment's decoded lb_dtype */
} coded_args;

static lb_status seg_sign(const void *ctx, uint64_t s, int nthreads, lb_error *err)
{
    const coded_args *a = ctx;
    return lb_sign(a->x[s], a->n[s], a->dt, a->mode, a->block, a->check_finite, nthreads,
                   a->codes[s], a->scales[s], err);
}

static lb_status seg_quantize(const void *ctx, uint64_t s, int nthreads, lb_error *err)
{
    const coded_args *a = ctx;
    return lb_quantize(a->x[s], a->n[s], a->dt, (lb_dtype)a->out_dt[s], a->bits, a->block, a->stochastic, a->seed,
                       a->step, a->check_finite, nthreads, a->codes[s], a->scales[s], err);
}

static lb_status seg_randomk(const void *ctx, uint64_t s, int nthreads, lb_error *err)
{
    const coded_args *a = ctx;
    uint64_t n = a->n[s], k = a->k[s];
    lb_status st = lb_randomk_indices(n, k, a->seed, a->step, a->indices[s]);
    if (st != LB_OK)
        return st;
    double scale = a->rescale && k ? (double)n / (double)k : 1.0;
    return lb_gather(a->x[s], n, a->dt, a->indices[s], k, scale, a->check_finite, nthreads,
                     a->values[s], err);
}

lb_status lb_sign_group(const void *const *x, const uint64_t *n, uint64_t nseg,
                        lb_dtype dt, int mode, uint64_t block, int check_finite,
                        int nthreads, uint8_t *const *codes, float *const *scales,
                        lb_error *err, uint64_t *seg)
{
    if (nseg && (!x || !n || !codes || !scales))
        return LB_EINVAL;
    coded_args a = {x, n, NULL, dt, mode, 1, 0, 0, check_finite, block, 0, 0,
                    codes, scales, NULL, NULL};
    return run_group(&a, seg_sign, n, nseg, nthreads, err, seg, 0);
}

lb_status lb_quantize_group(const void *const *x, const uint64_t *n, uint64_t nseg,
                            lb_dtype dt, const uint8_t *out_dt, int bits, uint64_t block,
                            int stochastic, uint64_t seed, uint64_t step, int check_finite,
                            int nthreads, uint8_t *const *codes,
                            float *const *scales, lb_error *err, uint64_t *seg)
{
    if (nseg && (!x || !n || !out_dt || !codes || !scales))
        return LB_EINVAL;
    coded_args a = {x, n, NULL, dt, 0, bits, stochastic, 0, check_finite, block, seed, step,
                    codes, scales, NULL, NULL, out_dt};
    return run_group(&a, seg_quantize, n, nseg, nthreads, err, seg, 0);
}

lb_status lb_randomk_group(const void *const *x, const uint64_t *n,
                           const uint64_t *k, uint64_t nseg, lb_dtype dt,
                           uint64_t seed, uint64_t step, int rescale,
                           int check_finite, int nthreads,
                           uint64_t *const *indices, void *const *values,
                           lb_error *err, uint64_t *seg)
{
    if (nseg && (!x || !n || !k || !indices || !values))
        return LB_EINVAL;
    for (uint64_t s = 0; s < nseg; s++)
        if (k[s] > n[s]) {
            if (seg)
                *seg = s;
            return LB_EINVAL;
        }
    coded_args a = {x, n, k, dt, 0, 0, 0, rescale, check_finite, 0, seed, step,
                    NULL, NULL, indices, values};
    return run_group(&a, seg_randomk, n, nseg, nthreads, err, seg, 0);
}
