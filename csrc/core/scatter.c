/*
 * scatter.c - sparse payloads back to dense: scatter and the aggregation of
 * many workers' payloads (sum, mean, SparseLoCo's contributor mean) without
 * building one dense vector per worker.
 *
 * The output is cut into fixed blocks of AGG_BLOCK elements.  Each block is
 * zeroed, then receives every payload's entries that fall inside it, payload
 * by payload in order, so each coordinate sums its contributions in payload
 * order whatever the thread count.
 */
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "threads.h"

#define AGG_BLOCK ((uint64_t)16384)

static inline uint64_t view_index(const lb_sparse_view *v, uint64_t i)
{
    return v->index_width == 4 ? ((const uint32_t *)v->indices)[i]
                               : ((const uint64_t *)v->indices)[i];
}

/* First position in v whose index is >= bound (indices ascending). */
static uint64_t lower_bound(const lb_sparse_view *v, uint64_t bound)
{
    uint64_t lo = 0, hi = v->count;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (view_index(v, mid) < bound)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* LB_OK when v's indices are strictly ascending and < n. */
static lb_status check_view(const lb_sparse_view *v, uint64_t n)
{
    if (v->index_width != 4 && v->index_width != 8)
        return LB_EINVAL;
    if (v->count && (!v->indices || !v->values))
        return LB_EINVAL;
    for (uint64_t i = 0; i < v->count; i++) {
        uint64_t ix = view_index(v, i);
        if (ix >= n)
            return LB_ERANGE;
        if (i && ix <= view_index(v, i - 1))
            return LB_EINVAL;
    }
    return LB_OK;
}

#define LB_DEFINE_AGG_BLOCK(T, NAME)                                            \
    static void NAME(const lb_sparse_view *p, uint64_t np, uint64_t lo,        \
                     uint64_t hi, lb_agg_op op, T *out, uint32_t *contrib)     \
    {                                                                          \
        memset(out + lo, 0, (size_t)(hi - lo) * sizeof(T));                   \
        if (op == LB_AGG_CONTRIBUTOR_MEAN)                                     \
            memset(contrib, 0, (size_t)(hi - lo) * sizeof(uint32_t));          \
        for (uint64_t w = 0; w < np; w++) {                                    \
            const lb_sparse_view *v = &p[w];                                   \
            const T *vals = (const T *)v->values;                              \
            uint64_t j = lower_bound(v, lo);                                   \
            if (v->index_width == 4) {                                         \
                const uint32_t *ix = (const uint32_t *)v->indices;             \
                for (; j < v->count && ix[j] < hi; j++) {                      \
                    out[ix[j]] += vals[j];                                     \
                    if (contrib)                                               \
                        contrib[ix[j] - lo]++;                                 \
                }                                                              \
            } else {                                                           \
                const uint64_t *ix = (const uint64_t *)v->indices;             \
                for (; j < v->count && ix[j] < hi; j++) {                      \
                    out[ix[j]] += vals[j];                                     \
                    if (contrib)                                               \
                        contrib[ix[j] - lo]++;                                 \
                }                                                              \
            }                                                                  \
        }                                                                      \
        if (op == LB_AGG_MEAN) {                                               \
            T d = (T)np;                                                       \
            for (uint64_t i = lo; i < hi; i++)                                 \
                out[i] = out[i] / d;                                           \
        } else if (op == LB_AGG_CONTRIBUTOR_MEAN) {                            \
            for (uint64_t i = lo; i < hi; i++)                                 \
                if (contrib[i - lo] > 1)                                       \
                    out[i] = out[i] / (T)contrib[i - lo];                      \
        }                                                                      \
    }

LB_DEFINE_AGG_BLOCK(float, agg_block_f32)
LB_DEFINE_AGG_BLOCK(double, agg_block_f64)

lb_status lb_aggregate(const lb_sparse_view *payloads, uint64_t num_payloads,
                       uint64_t n, lb_dtype dt, lb_agg_op op, void *out,
                       int nthreads, lb_error *err)
{
    if ((dt != LB_F32 && dt != LB_F64) || (!out && n) ||
        (num_payloads && !payloads) || op < LB_AGG_SUM ||
        op > LB_AGG_CONTRIBUTOR_MEAN || (op == LB_AGG_MEAN && num_payloads == 0))
        return LB_EINVAL;
    if (num_payloads > UINT32_MAX)
        return LB_EOVERFLOW;
    uint64_t total = 0;
    for (uint64_t w = 0; w < num_payloads; w++)
        total += payloads[w].count;
    int team = lb_team(nthreads, total / LB_CHUNK + 1);
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    LB_OMP(omp parallel for num_threads(team) schedule(static, 1) if(team > 1))
    for (uint64_t w = 0; w < num_payloads; w++)
        lb_record_error(&fail, &fail_at, check_view(&payloads[w], n), w);
    if (fail != LB_OK) {
        if (err)
            err->index = fail_at;
        return fail;
    }

    uint64_t blocks = lb_num_chunks(n, AGG_BLOCK);
    team = lb_team(nthreads, n / LB_CHUNK);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint32_t *contrib = NULL;
        if (op == LB_AGG_CONTRIBUTOR_MEAN) {
            contrib = malloc((size_t)AGG_BLOCK * sizeof(uint32_t));
            if (!contrib)
                lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        }
        int ok = op != LB_AGG_CONTRIBUTOR_MEAN || contrib;
        LB_OMP(omp for schedule(dynamic, 4))   /* blocks are independent: any thread may take any */
        for (uint64_t b = 0; b < blocks; b++) {
            if (!ok)
                continue;
            uint64_t lo = b * AGG_BLOCK;
            uint64_t hi = n - lo < AGG_BLOCK ? n : lo + AGG_BLOCK;
            if (dt == LB_F32)
                agg_block_f32(payloads, num_payloads, lo, hi, op, (float *)out,
                              contrib);
            else
                agg_block_f64(payloads, num_payloads, lo, hi, op, (double *)out,
                              contrib);
        }
        free(contrib);
    }
    if (fail != LB_OK) {
        if (err)
            err->index = fail_at;
        return fail;
    }
    return LB_OK;
}
