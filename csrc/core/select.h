/*
 * select.h - internal (not public) pieces of the top-k machinery in
 * sparsify.c, shared with the fused error-feedback kernels in feedback.c.
 * See sparsify.c for the algorithm: a sampled bound lets one streaming pass
 * collect candidates per part, then the exact k-th key is chosen serially.
 */
#ifndef LB_SELECT_H
#define LB_SELECT_H

#include <stdint.h>

#include "lowband.h"

typedef struct {
    int width;          /* bytes per element: 4 or 8                         */
    uint64_t mask;      /* clears the sign bit                               */
    uint64_t inf;       /* key of +Inf: keys >= inf are non-finite           */
    int hist_shift;     /* radix pass 1 bins are key >> hist_shift           */
    uint64_t hist_bins; /* number of such bins                               */
} keyinfo;

/* Per-part output of a collect scan. */
typedef struct {
    uint64_t *idx;      /* indices, ascending within the part                */
    uint64_t *raw;      /* raw bits of those elements                        */
    uint64_t cap;       /* entries allocated                                 */
    uint64_t found;     /* entries that qualified (may exceed cap)           */
} cand_part;

/* Sample size of the fast path: n / TOPK_SAMPLE_DIV elements, at least
 * TOPK_SAMPLE_FLOOR (or one run in every TOPK_RUN runs of a smaller
 * vector) and at most TOPK_SAMPLE, so that the sample costs a small share
 * of a pass and its bounds keep enough ranks around k; the smallest n that
 * uses it.                                                                */
#define TOPK_SAMPLE ((uint64_t)65536)
#ifndef TOPK_SAMPLE_FLOOR
#define TOPK_SAMPLE_FLOOR ((uint64_t)4096)
#endif
#ifndef TOPK_SAMPLE_DIV
#define TOPK_SAMPLE_DIV ((uint64_t)128)
#endif
#ifndef TOPK_SAMPLE_MIN_N
#define TOPK_SAMPLE_MIN_N ((uint64_t)4096)
#endif
/* Up to this many elements exact top-k runs serially through topk_small
 * (one call, no team, no candidate buffers): the fixed cost of a call.
 * Above about 512 elements the radix path is the faster one (measured:
 * 1 Ki floats, k = 10, 3.2 us against 5.2 us serially).                  */
#ifndef TOPK_SMALL_N
#define TOPK_SMALL_N ((uint64_t)512)
#endif
/* Samples come in runs of TOPK_RUN consecutive elements. */
#define TOPK_RUN ((uint64_t)16)

static inline uint64_t raw_at(const keyinfo *ki, const void *x, uint64_t i)
{
    return ki->width == 4 ? ((const uint32_t *)x)[i] : ((const uint64_t *)x)[i];
}

static inline void store_raw(const keyinfo *ki, void *values, uint64_t j,
                             uint64_t raw)
{
    if (ki->width == 4)
        ((uint32_t *)values)[j] = (uint32_t)raw;
    else
        ((uint64_t *)values)[j] = raw;
}

/* Key facts of float32 / float64, NULL for other dtypes. */
const keyinfo *keyinfo_of(lb_dtype dt);
/* Index of the first non-finite element of x (error path only), or n. */
uint64_t first_nonfinite(const keyinfo *ki, const void *x, uint64_t n);
/* The r-th largest (1 <= r <= m) of keys[0..m); scratch holds m entries. */
uint64_t kth_largest(const uint64_t *keys, uint64_t m, uint64_t r,
                     uint64_t *scratch);
/* `nparts` buffers, part p of lb_split(n, nparts) holding
 * min(its length, cap_total) entries; NULL when out of memory.            */
cand_part *cand_alloc(uint64_t n, int nparts, uint64_t cap_total);
void cand_free(cand_part *parts, int nparts);
/* Parallel collect over x of every element with key >= lo (see sparsify.c);
 * parts NULL only counts.  Returns the total that qualified.               */
uint64_t collect_parallel(const keyinfo *ki, const void *x, uint64_t n,
                          uint64_t lo, int nparts, cand_part *parts,
                          uint64_t *counts, int *nonfinite, int *overflow);
/* An lb_sparse of `count` entries of element width `width`. */
lb_status sparse_alloc(lb_sparse *out, uint64_t count, int width);
/* The exact top-k from complete candidate buffers (see sparsify.c). */
lb_status topk_from_candidates(const keyinfo *ki, const cand_part *parts,
                               int nparts, uint64_t k, uint64_t hi,
                               lb_sparse *out);
/* Top-kk of the m elements of x at ascending positions pos[] (base + j
 * when pos is NULL): positions and raw bits to out_idx/out_values in
 * ascending order.  keys and scratch hold m entries each.  Returns the
 * first non-finite position or UINT64_MAX.                                 */
uint64_t topk_small(const keyinfo *ki, const void *x, uint64_t base,
                    const uint64_t *pos, uint64_t m, uint64_t kk,
                    uint64_t *keys, uint64_t *scratch, uint64_t *out_idx,
                    void *out_values);
/* The fused error-feedback scan (scan.h ef_collect*) over e/g[b, end):
 * p = decay*e + scale*g into e, collecting keys >= lo as collect_range. */
uint64_t ef_collect_range(const keyinfo *ki, void *e, const void *g, uint64_t b,
                          uint64_t end, double decay, double scale, uint64_t lo,
                          uint64_t *idx, uint64_t *raw, uint64_t cap,
                          int *nonfinite);
/* ef_collect_range in parallel over `nparts` parts, as collect_parallel
 * (parts NULL: the compensation alone).                                   */
uint64_t ef_collect_parallel(const keyinfo *ki, void *e, const void *g,
                             uint64_t n, double decay, double scale,
                             uint64_t lo, int nparts, cand_part *parts,
                             int *nonfinite, int *overflow);
/* The compensation alone over e/g[b, end) (non-finite p is left to the
 * caller's selection to report).                                          */
void ef_compensate(const keyinfo *ki, void *e, const void *g, uint64_t b,
                   uint64_t end, double decay, double scale);
/* Chunked top-k of x; with g, each chunk is first compensated in place
 * (x = decay*x + scale*g; x must then be writable), non-finite values are
 * LB_EOVERFLOW, and x is zeroed where sent (error feedback).              */
lb_status chunked_topk(const keyinfo *ki, void *x, const void *g, double decay,
                       double scale, uint64_t n, uint64_t chunk,
                       uint64_t k_per_chunk, int check_finite, int nthreads,
                       lb_sparse *out, lb_error *err);
/* Samples the fast path takes of n elements (a multiple of TOPK_RUN), or
 * 0 when n is below TOPK_SAMPLE_MIN_N.                                     */
uint64_t sample_size(uint64_t n);
/* First position of run r (< m / TOPK_RUN) of the m = sample_size(n)
 * samples of a vector of n elements: the samples are the TOPK_RUN
 * consecutive elements from there, run after run.                         */
uint64_t sample_run_start(uint64_t n, uint64_t m, uint64_t run);
/* Bounds lo/hi and the expected candidate count from the keys of the m
 * samples (keys holds 2 * m entries; the second half is scratch).
 * Returns 0 when k is too large a fraction for the sample.                 */
int sample_bounds_from(uint64_t *keys, uint64_t m, uint64_t n, uint64_t k,
                       uint64_t *lo, uint64_t *hi, uint64_t *expected);

#endif /* LB_SELECT_H */
