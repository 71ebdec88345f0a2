/*
 * moe.c - Mixture-of-Experts hot paths: routing (softmax or sigmoid scores,
 * top-k with an optional selection bias and group limit, expert counts),
 * load-balancing statistics and gradients, the router z-loss, and the
 * dispatch plan / scatter / combine of tokens to experts.
 *
 * Determinism: rows (tokens) are independent; column sums over tokens are
 * per-chunk partials of lb_moe_sum_rows(E) rows added in chunk order; counts
 * are integers (any merge order).  The dispatch plan is a stable counting
 * sort whose write offsets come from a serial scan over fixed chunks, and
 * combine gathers through the inverse map (one writer per token, no
 * atomics).  So every output is byte-identical for any thread count, and
 * chunks can be handed out dynamically (a thread that the OS delays on a
 * busy machine does not hold the others up).
 *
 * Floating point: the exponential is our own (Cephes-style polynomial /
 * rational approximation with exact range reduction), not libm's, so the
 * NumPy twin reproduces it bit for bit; no FMA contraction (ISO C mode and
 * the pragma in moe_kernels.h).  The per-row kernels live in moe_rows.h,
 * compiled for float and double and per instruction set (moe_scalar.c,
 * moe_avx2.c); this file holds the entry points, their checks and the
 * parallel structure.
 */
#include "moe_kernels.h"
#include "threads.h"

const lb_moe_rows *lb_moe_rows_for(lb_dtype dt)
{
    const lb_moe_rows *t = lb_moe_rows_scalar;
#if defined(__x86_64__) || defined(__i386__)
    lb_isa isa = lb_active_isa();
    if (isa == LB_ISA_AVX512)
        t = lb_moe_rows_avx512;
    else if (isa == LB_ISA_AVX2)
        t = lb_moe_rows_avx2;
#endif
    return &t[dt == LB_F64];
}

/* ------------------------------------------------------------------------ */
/* Routing scratch                                                           */
/* ------------------------------------------------------------------------ */

static void route_ws_free(route_ws *ws)
{
    free(ws->choice);
    free(ws->q);
    free(ws->best);
    free(ws->gscore);
    free(ws->idx);
    free(ws->allowed);
}

static int route_ws_alloc(route_ws *ws, uint64_t E, uint64_t k, uint64_t groups)
{
    uint64_t m = (k > groups ? k : groups) + 1;
    ws->choice = malloc((size_t)E * sizeof(double));
    ws->q = malloc((size_t)E * sizeof(double));
    ws->best = malloc((size_t)m * sizeof(double));
    ws->gscore = malloc((size_t)(groups + 1) * sizeof(double));
    ws->idx = malloc((size_t)m * sizeof(int32_t));
    ws->allowed = malloc((size_t)E);
    if (ws->choice && ws->q && ws->best && ws->gscore && ws->idx &&
        ws->allowed)
        return 1;
    route_ws_free(ws);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Routing                                                                   */
/* ------------------------------------------------------------------------ */

uint64_t lb_moe_sum_rows(uint64_t E)
{
    uint64_t r = E ? (LB_CHUNK + E - 1) / E : LB_CHUNK;
    return r > 1024 ? r : 1024;
}

static int valid_dtype(lb_dtype dt) { return dt == LB_F32 || dt == LB_F64; }

/* Adds the per-chunk column sums partial[c*E..] in chunk order into sums. */
static void add_partials(const double *partial, uint64_t nchunks, uint64_t E,
                         double *sums)
{
    for (uint64_t j = 0; j < E; j++)
        sums[j] = 0.0;
    for (uint64_t c = 0; c < nchunks; c++)
        for (uint64_t j = 0; j < E; j++)
            sums[j] += partial[c * E + j];
}

lb_status lb_moe_route(const void *logits, lb_dtype dt, uint64_t T, uint64_t E,
                       uint64_t k, const lb_route_opts *o, int32_t *experts,
                       void *weights, void *scores, int64_t *counts,
                       double *aux_sums, int nthreads, lb_error *err)
{
    if (!valid_dtype(dt) || !o || E == 0 || E > INT32_MAX || k == 0 || k > E ||
        (T && (!logits || !experts || !weights || !scores)) ||
        (o->score != LB_SCORE_SOFTMAX && o->score != LB_SCORE_SIGMOID))
        return LB_EINVAL;
    uint64_t groups = o->groups > 1 ? o->groups : 0;
    if (groups && (E % groups || o->group_k == 0 || o->group_k > groups ||
                   k < o->group_k || k / o->group_k > E / groups ||
                   k > o->group_k * (E / groups)))
        return LB_EINVAL;
    if (T > UINT64_MAX / E)
        return LB_EOVERFLOW;

    const uint64_t R = lb_moe_sum_rows(E), nchunks = lb_num_chunks(T, R);
    const lb_moe_rows *K = lb_moe_rows_for(dt);
    int team = lb_team(nthreads, nchunks);
    int64_t *tcounts = lb_alloc_n((uint64_t)team, (uint64_t)E * sizeof(int64_t), 1);
    double *partial = aux_sums ? lb_alloc_n(nchunks, (uint64_t)E * sizeof(double), 1) : NULL;
    if (!tcounts || (aux_sums && !partial)) {
        free(tcounts);
        free(partial);
        return LB_ENOMEM;
    }
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        route_ws ws;
        int ok = route_ws_alloc(&ws, E, k, groups);
        if (!ok)
            lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        int64_t *mine = tcounts + (uint64_t)omp_get_thread_num() * E;
        LB_OMP(omp for schedule(dynamic))
        for (uint64_t c = 0; c < nchunks; c++) {
            if (!ok)
                continue;
            uint64_t r0 = c * R, r1 = T - r0 < R ? T : r0 + R;
            double *acc = partial ? partial + c * E : NULL;
            uint64_t bad = K->route(logits, r0, r1, E, k, o, experts, weights,
                                    scores, mine, acc, &ws);
            if (bad != UINT64_MAX)
                lb_record_error(&fail, &fail_at, LB_ENONFINITE, bad);
        }
        if (ok)
            route_ws_free(&ws);
    }
    if (fail == LB_OK) {
        if (counts) {
            memset(counts, 0, (size_t)E * sizeof(int64_t));
            for (int t = 0; t < team; t++)
                for (uint64_t j = 0; j < E; j++)
                    counts[j] += tcounts[(uint64_t)t * E + j];
        }
        if (aux_sums)
            add_partials(partial, nchunks, E, aux_sums);
    } else if (err) {
        err->index = fail_at;
    }
    free(tcounts);
    free(partial);
    return fail;
}

/* ------------------------------------------------------------------------ */
/* Load balancing                                                            */
/* ------------------------------------------------------------------------ */

/* Checks that every expert id of rows [r0, r1) is in [0, E); returns the
 * first bad flat position or UINT64_MAX.                                   */
static uint64_t check_experts(const int32_t *experts, uint64_t r0, uint64_t r1,
                              uint64_t k, uint64_t E)
{
    for (uint64_t i = r0 * k; i < r1 * k; i++)
        if (experts[i] < 0 || (uint64_t)experts[i] >= E)
            return i;
    return UINT64_MAX;
}

lb_status lb_moe_balance_stats(const void *scores, lb_dtype dt, uint64_t T,
                               uint64_t E, lb_score_fn score,
                               const int32_t *experts, uint64_t k,
                               const uint8_t *mask, uint64_t seg_len,
                               int64_t *counts, int64_t *valid, double *sums,
                               int nthreads, lb_error *err)
{
    if (!valid_dtype(dt) || E == 0 || k == 0 || (seg_len == 0 && T) ||
        (seg_len && T % seg_len) || !counts || !valid ||
        (T && (!experts || (sums && !scores))) ||
        (score != LB_SCORE_SOFTMAX && score != LB_SCORE_SIGMOID))
        return LB_EINVAL;
    if (T > UINT64_MAX / (E > k ? E : k))
        return LB_EOVERFLOW;
    const uint64_t B = seg_len ? T / seg_len : 0;
    const uint64_t R = lb_moe_sum_rows(E);
    const uint64_t per = lb_num_chunks(seg_len, R);   /* items per segment */
    const uint64_t items = B * per;
    /* one item per segment: write straight into the outputs */
    const int direct = per <= 1;
    int64_t *icounts = counts, *ivalid = valid;
    double *isums = sums;
    if (!direct) {
        icounts = lb_alloc_n(items, (uint64_t)E * sizeof(int64_t), 1);
        ivalid = lb_alloc_n(items, sizeof(int64_t), 1);
        isums = sums ? lb_alloc_n(items, (uint64_t)E * sizeof(double), 1) : NULL;
        if (!icounts || !ivalid || (sums && !isums)) {
            free(icounts);
            free(ivalid);
            free(isums);
            return LB_ENOMEM;
        }
    } else {
        memset(counts, 0, (size_t)(B * E) * sizeof(int64_t));
        memset(valid, 0, (size_t)B * sizeof(int64_t));
        if (sums)
            memset(sums, 0, (size_t)(B * E) * sizeof(double));
    }
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    const lb_moe_rows *K = lb_moe_rows_for(dt);
    int team = lb_team(nthreads, items);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        double *q = sums ? malloc((size_t)E * sizeof(double)) : NULL;
        if (sums && !q)
            lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        LB_OMP(omp for schedule(dynamic))
        for (uint64_t it = 0; it < items; it++) {
            if (sums && !q)
                continue;
            uint64_t b = it / per, j = it % per;
            uint64_t r0 = b * seg_len + j * R;
            uint64_t r1 = (b + 1) * seg_len - r0 < R ? (b + 1) * seg_len : r0 + R;
            uint64_t bad = check_experts(experts, r0, r1, k, E);
            if (bad != UINT64_MAX) {
                lb_record_error(&fail, &fail_at, LB_ERANGE, bad);
                continue;
            }
            int64_t *c = icounts + it * E;
            for (uint64_t t = r0; t < r1; t++) {
                if (mask && !mask[t])
                    continue;
                ivalid[it]++;
                for (uint64_t s = 0; s < k; s++)
                    c[experts[t * k + s]]++;
            }
            if (sums) {
                K->aux_sum(scores, r0, r1, E, score, mask, q, isums + it * E);
            }
        }
        free(q);
    }
    if (!direct) {
        if (fail == LB_OK)
            for (uint64_t b = 0; b < B; b++) {
                int64_t *cb = counts + b * E;
                memset(cb, 0, (size_t)E * sizeof(int64_t));
                valid[b] = 0;
                for (uint64_t j = 0; j < per; j++) {
                    valid[b] += ivalid[b * per + j];
                    for (uint64_t i = 0; i < E; i++)
                        cb[i] += icounts[(b * per + j) * E + i];
                }
                if (sums)
                    add_partials(isums + b * per * E, per, E, sums + b * E);
            }
        free(icounts);
        free(ivalid);
        free(isums);
    }
    if (fail != LB_OK && err)
        err->index = fail_at;
    return fail;
}

lb_status lb_moe_balance_grad(const void *scores, lb_dtype dt, uint64_t T,
                              uint64_t E, lb_score_fn score, const double *g,
                              uint64_t seg_len, const uint8_t *mask,
                              void *grad, int nthreads)
{
    if (!valid_dtype(dt) || E == 0 || (seg_len == 0 && T) ||
        (seg_len && T % seg_len) || (T && (!scores || !g || !grad)) ||
        (score != LB_SCORE_SOFTMAX && score != LB_SCORE_SIGMOID))
        return LB_EINVAL;
    if (T > UINT64_MAX / E)
        return LB_EOVERFLOW;
    const uint64_t R = lb_moe_sum_rows(E), nchunks = lb_num_chunks(T, R);
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    const lb_moe_rows *K = lb_moe_rows_for(dt);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        double *q = malloc((size_t)E * sizeof(double));
        if (!q)
            lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        LB_OMP(omp for schedule(dynamic))
        for (uint64_t c = 0; c < nchunks; c++) {
            if (!q)
                continue;
            uint64_t r0 = c * R, r1 = T - r0 < R ? T : r0 + R;
            /* a chunk may span segments: cut it at their boundaries */
            while (r0 < r1) {
                uint64_t b = r0 / seg_len, end = (b + 1) * seg_len;
                uint64_t stop = end < r1 ? end : r1;
                K->balance_grad(scores, r0, stop, E, score, g + b * E, mask, q,
                                grad);
                r0 = stop;
            }
        }
        free(q);
    }
    return fail;
}

lb_status lb_moe_z_loss(const void *logits, lb_dtype dt, uint64_t T,
                        uint64_t E, const uint8_t *mask, double grad_scale,
                        double *loss, void *grad, int nthreads, lb_error *err)
{
    if (!valid_dtype(dt) || E == 0 || !loss || (T && !logits))
        return LB_EINVAL;
    if (T > UINT64_MAX / E)
        return LB_EOVERFLOW;
    const uint64_t R = lb_moe_sum_rows(E), nchunks = lb_num_chunks(T, R);
    double *partial = calloc((size_t)(nchunks ? nchunks : 1), sizeof(double));
    if (!partial)
        return LB_ENOMEM;
    const size_t width = lb_dtype_size(dt);
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    const lb_moe_rows *K = lb_moe_rows_for(dt);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        void *e = malloc((size_t)E * width);
        if (!e)
            lb_record_error(&fail, &fail_at, LB_ENOMEM, 0);
        LB_OMP(omp for schedule(dynamic))
        for (uint64_t c = 0; c < nchunks; c++) {
            if (!e)
                continue;
            uint64_t r0 = c * R, r1 = T - r0 < R ? T : r0 + R, bad = UINT64_MAX;
            partial[c] = K->z_loss(logits, r0, r1, E, mask, grad_scale, e, grad,
                                   &bad);
            if (bad != UINT64_MAX)
                lb_record_error(&fail, &fail_at, LB_ENONFINITE, bad);
        }
        free(e);
    }
    if (fail != LB_OK) {
        if (err)
            err->index = fail_at;
    } else {
        double total = 0.0;
        for (uint64_t c = 0; c < nchunks; c++)
            total += partial[c];
        *loss = total;
    }
    free(partial);
    return fail;
}

/* ------------------------------------------------------------------------ */
/* Dispatch plan                                                             */
/* ------------------------------------------------------------------------ */

static double weight_at(const void *weights, lb_dtype dt, uint64_t i)
{
    return dt == LB_F32 ? (double)((const float *)weights)[i]
                        : ((const double *)weights)[i];
}

/* The r-th largest (1 <= r <= n) of v[0..n) (reordered): quickselect with
 * a middle pivot and a three-way partition.  Deterministic for given data. */
static double kth_largest_d(double *v, uint64_t n, uint64_t r)
{
    uint64_t lo = 0, hi = n;   /* the answer is in v[lo..hi), rank r there */
    for (;;) {
        double pivot = v[lo + (hi - lo) / 2];
        uint64_t gt = lo, i = lo, lt = hi;   /* [lo,gt) > p, [gt,i) == p */
        while (i < lt) {
            if (v[i] > pivot) {
                double t = v[i];
                v[i++] = v[gt];
                v[gt++] = t;
            } else if (v[i] < pivot) {
                double t = v[i];
                v[i] = v[--lt];
                v[lt] = t;
            } else {
                i++;
            }
        }
        if (r <= gt - lo) {
            hi = gt;
        } else if (r <= lt - lo) {
            return pivot;
        } else {
            r -= lt - lo;
            lo = lt;
        }
    }
}

/* Marks which of one expert's rows (assignments rows[0..n), in token
 * order) stay under the capacity; returns how many do (min(n, cap)).      */
static lb_status keep_rows(const int64_t *rows, uint64_t n, uint64_t cap,
                           lb_drop_policy drop, const void *weights,
                           lb_dtype dt, uint8_t *keep)
{
    if (n <= cap || drop == LB_DROP_POSITION) {
        for (uint64_t r = 0; r < n; r++)
            keep[r] = r < cap;
        return LB_OK;
    }
    double *v = lb_alloc_n(n, sizeof(double), 0);
    if (!v)
        return LB_ENOMEM;
    for (uint64_t r = 0; r < n; r++)
        v[r] = weight_at(weights, dt, (uint64_t)rows[r]);
    double thr = cap ? kth_largest_d(v, n, cap) : INFINITY;
    uint64_t above = 0;
    for (uint64_t r = 0; r < n; r++)
        above += weight_at(weights, dt, (uint64_t)rows[r]) > thr;
    uint64_t ties = cap - above;   /* ties at the threshold: the first ones */
    for (uint64_t r = 0; r < n; r++) {
        double w = weight_at(weights, dt, (uint64_t)rows[r]);
        keep[r] = w > thr || (w == thr && ties && ties--);
    }
    free(v);
    return LB_OK;
}

/* Cuts every expert's rows down to `capacity` and compacts them. */
static lb_status apply_capacity(uint64_t E, uint64_t capacity,
                                lb_drop_policy drop, const void *weights,
                                lb_dtype dt, int64_t *offsets, int64_t *rows,
                                int64_t *position, int nthreads)
{
    uint64_t used = (uint64_t)offsets[E];
    int64_t *old = lb_alloc_n(used, sizeof(int64_t), 0);
    uint8_t *keep = lb_alloc_n(used, 1, 0);
    int64_t *kept_off = malloc((size_t)(E + 1) * sizeof(int64_t));
    if (!old || !keep || !kept_off) {
        free(old);
        free(keep);
        free(kept_off);
        return LB_ENOMEM;
    }
    memcpy(old, rows, (size_t)used * sizeof(int64_t));
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    int team = lb_team(nthreads, E);
    LB_OMP(omp parallel for num_threads(team) schedule(dynamic) if(team > 1))
    for (uint64_t e = 0; e < E; e++) {
        uint64_t a = (uint64_t)offsets[e], b = (uint64_t)offsets[e + 1];
        lb_record_error(&fail, &fail_at,
                        keep_rows(old + a, b - a, capacity, drop, weights, dt,
                                  keep + a),
                        e);
    }
    if (fail == LB_OK) {
        kept_off[0] = 0;
        for (uint64_t e = 0; e < E; e++) {
            uint64_t len = (uint64_t)(offsets[e + 1] - offsets[e]);
            kept_off[e + 1] = kept_off[e] + (int64_t)(len < capacity ? len : capacity);
        }
        LB_OMP(omp parallel for num_threads(team) schedule(dynamic) if(team > 1))
        for (uint64_t e = 0; e < E; e++) {
            int64_t w = kept_off[e];
            for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
                if (keep[r]) {
                    rows[w] = old[r];
                    position[old[r]] = w++;
                } else {
                    position[old[r]] = -1;
                }
            }
        }
        memcpy(offsets, kept_off, (size_t)(E + 1) * sizeof(int64_t));
    }
    free(old);
    free(keep);
    free(kept_off);
    return fail;
}

lb_status lb_moe_plan(const int32_t *experts, uint64_t T, uint64_t k,
                      uint64_t E, const uint8_t *mask, uint64_t capacity,
                      lb_drop_policy drop, const void *weights, lb_dtype dt,
                      int64_t *offsets, int64_t *rows, int64_t *position,
                      int nthreads, lb_error *err)
{
    if (E == 0 || k == 0 || !offsets ||
        (drop != LB_DROP_PROBS && drop != LB_DROP_POSITION) ||
        (T && (!experts || !rows || !position)) ||
        (drop == LB_DROP_PROBS && capacity != UINT64_MAX && T &&
         (!weights || !valid_dtype(dt))))
        return LB_EINVAL;
    if (T > (uint64_t)INT64_MAX / k)
        return LB_EOVERFLOW;
    const uint64_t n = T * k, C = LB_CHUNK, nch = lb_num_chunks(n, C);
    int64_t *cur = lb_alloc_n(nch, (uint64_t)E * sizeof(int64_t), 1);
    if (!cur)
        return LB_ENOMEM;
    lb_status fail = LB_OK;
    uint64_t fail_at = UINT64_MAX;
    /* O(T k) integer work, small next to moving the rows: threads only for
     * very large plans (fresh output pages fault slowly from many threads) */
    int team = lb_team(nthreads, nch / 16);
    /* 1: per-chunk histograms (and the id check) */
    LB_OMP(omp parallel for num_threads(team) schedule(dynamic) if(team > 1))
    for (uint64_t c = 0; c < nch; c++) {
        uint64_t i0 = c * C, i1 = n - i0 < C ? n : i0 + C;
        int64_t *h = cur + c * E;
        for (uint64_t i = i0; i < i1; i++) {
            int32_t e = experts[i];
            if (e < 0 || (uint64_t)e >= E) {
                lb_record_error(&fail, &fail_at, LB_ERANGE, i);
                break;
            }
            if (!mask || mask[i / k])
                h[e]++;
        }
    }
    if (fail != LB_OK) {
        free(cur);
        if (err)
            err->index = fail_at;
        return fail;
    }
    /* 2: expert-major, chunk-minor exclusive scan -> write cursors */
    int64_t run = 0;
    for (uint64_t e = 0; e < E; e++) {
        offsets[e] = run;
        for (uint64_t c = 0; c < nch; c++) {
            int64_t h = cur[c * E + e];
            cur[c * E + e] = run;
            run += h;
        }
    }
    offsets[E] = run;
    /* 3: stable scatter, every chunk from its own cursors */
    LB_OMP(omp parallel for num_threads(team) schedule(dynamic) if(team > 1))
    for (uint64_t c = 0; c < nch; c++) {
        uint64_t i0 = c * C, i1 = n - i0 < C ? n : i0 + C;
        int64_t *h = cur + c * E;
        for (uint64_t i = i0; i < i1; i++) {
            if (mask && !mask[i / k]) {
                position[i] = -1;
                continue;
            }
            int64_t r = h[experts[i]]++;
            rows[r] = (int64_t)i;
            position[i] = r;
        }
    }
    free(cur);
    uint64_t most = 0;
    for (uint64_t e = 0; e < E; e++)
        if ((uint64_t)(offsets[e + 1] - offsets[e]) > most)
            most = (uint64_t)(offsets[e + 1] - offsets[e]);
    if (most <= capacity)
        return LB_OK;
    return apply_capacity(E, capacity, drop, weights, dt, offsets, rows,
                          position, nthreads);
}

/* ------------------------------------------------------------------------ */
/* Scatter (dispatch copy), combine                                          */
/* ------------------------------------------------------------------------ */

/* Work items (rows or tokens) per parallel chunk for rows of H elements. */
static uint64_t rows_per_chunk(uint64_t H)
{
    uint64_t r = H ? LB_CHUNK / H : LB_CHUNK;
    return r ? r : 1;
}

/* 1 when the kept positions (>= 0) of position[0..count) are distinct,
 * < n and n in number (a one-to-one map onto [0, n)), else 0.             */
static int positions_onto(const int64_t *position, uint64_t count, uint64_t n)
{
    uint8_t *seen = lb_alloc_n(n, 1, 1);
    uint64_t kept = 0;
    int ok = seen != NULL;
    for (uint64_t i = 0; ok && i < count; i++) {
        int64_t p = position[i];
        if (p < 0)
            continue;
        ok = (uint64_t)p < n && !seen[p];
        if (ok)
            seen[p] = 1;
        kept++;
    }
    free(seen);
    return ok && kept == n;
}

/* Runs `pass` over all T tokens in chunks handed out dynamically (each
 * token's rows are written by one thread only), with streaming stores
 * when the output (out_rows x H) is large.                                */
static void over_tokens(lb_moe_token_pass pass, const void *src, lb_dtype dt,
                        uint64_t H, const int64_t *position, uint64_t T,
                        uint64_t k, const void *weights, void *out,
                        uint64_t out_rows, int nthreads)
{
    const int stream = out_rows * H * lb_dtype_size(dt) >= STREAM_BYTES;
    const uint64_t R = rows_per_chunk(H * k), nch = lb_num_chunks(T, R);
    int team = lb_team(nthreads, nch);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        LB_OMP(omp for schedule(dynamic))
        for (uint64_t c = 0; c < nch; c++) {
            uint64_t t0 = c * R, t1 = T - t0 < R ? T : t0 + R;
            pass(src, H, position, t0, t1, k, weights, out, stream);
        }
        if (stream)
            stream_fence();
    }
}

lb_status lb_moe_scatter(const void *x, lb_dtype dt, uint64_t T, uint64_t H,
                         uint64_t k, const int64_t *position,
                         const void *weights, uint64_t n, void *out,
                         int nthreads)
{
    if (!valid_dtype(dt) || k == 0 || (T && !position) || (n && (!x || !out)))
        return LB_EINVAL;
    if (T > UINT64_MAX / k || (H && (n > UINT64_MAX / H || T > UINT64_MAX / H)))
        return LB_EOVERFLOW;
    if (!positions_onto(position, T * k, n))
        return LB_ERANGE;
    over_tokens(lb_moe_rows_for(dt)->scatter, x, dt, H, position, T, k, weights, out, n,
                nthreads);
    return LB_OK;
}

/* Checks that every position is -1 or a row < n. */
static int positions_ok(const int64_t *position, uint64_t count, uint64_t n)
{
    for (uint64_t i = 0; i < count; i++)
        if (position[i] < -1 || (position[i] >= 0 && (uint64_t)position[i] >= n))
            return 0;
    return 1;
}

lb_status lb_moe_combine(const void *y, lb_dtype dt, uint64_t n, uint64_t H,
                         const int64_t *position, uint64_t T, uint64_t k,
                         const void *weights, void *out, int nthreads)
{
    if (!valid_dtype(dt) || k == 0 || (T && (!position || !out)) ||
        (n && !y))
        return LB_EINVAL;
    if (T > UINT64_MAX / k || (H && T > UINT64_MAX / H))
        return LB_EOVERFLOW;
    if (!positions_ok(position, T * k, n))
        return LB_ERANGE;
    over_tokens(lb_moe_rows_for(dt)->combine, y, dt, H, position, T, k, weights, out, T,
                nthreads);
    return LB_OK;
}

lb_status lb_moe_combine_dot(const void *grad_out, const void *y, lb_dtype dt,
                             uint64_t n, uint64_t H, const int64_t *position,
                             uint64_t T, uint64_t k, void *grad_weights,
                             int nthreads)
{
    if (!valid_dtype(dt) || k == 0 ||
        (T && (!position || !grad_weights || (H && !grad_out))) || (n && !y))
        return LB_EINVAL;
    if (T > UINT64_MAX / k || (H && T > UINT64_MAX / H))
        return LB_EOVERFLOW;
    if (!positions_ok(position, T * k, n))
        return LB_ERANGE;
    const uint64_t R = rows_per_chunk(H * k), nch = lb_num_chunks(T, R);
    const lb_moe_rows *K = lb_moe_rows_for(dt);
    int team = lb_team(nthreads, nch);
    LB_OMP(omp parallel for num_threads(team) schedule(dynamic) if(team > 1))
    for (uint64_t c = 0; c < nch; c++) {
        uint64_t t0 = c * R, t1 = T - t0 < R ? T : t0 + R;
        K->combine_dot(grad_out, y, H, position, t0, t1, k, grad_weights);
    }
    return LB_OK;
}

lb_status lb_moe_combine_backward(const void *grad_out, const void *y, lb_dtype dt,
                                  uint64_t n, uint64_t H, const int64_t *position,
                                  uint64_t T, uint64_t k, const void *weights,
                                  void *grad_y, void *grad_weights, int nthreads)
{
    if (!valid_dtype(dt) || k == 0 || (!grad_y && !grad_weights) ||
        (T && (!position || (H && !grad_out) || (grad_weights && !y))) ||
        (grad_y && n && H && !grad_out))
        return LB_EINVAL;
    if (T > UINT64_MAX / k || (H && (n > UINT64_MAX / H || T > UINT64_MAX / H)))
        return LB_EOVERFLOW;
    if (grad_y ? !positions_onto(position, T * k, n) : !positions_ok(position, T * k, n))
        return LB_ERANGE;
    const int stream = grad_y && n * H * lb_dtype_size(dt) >= STREAM_BYTES;
    const uint64_t R = rows_per_chunk(H * k), nch = lb_num_chunks(T, R);
    const lb_moe_rows *K = lb_moe_rows_for(dt);
    int team = lb_team(nthreads, nch);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        LB_OMP(omp for schedule(dynamic))
        for (uint64_t c = 0; c < nch; c++) {
            uint64_t t0 = c * R, t1 = T - t0 < R ? T : t0 + R;
            K->combine_grad(grad_out, y, H, position, t0, t1, k, weights, grad_y,
                            grad_weights, stream);
        }
        if (stream)
            stream_fence();
    }
    return LB_OK;
}
