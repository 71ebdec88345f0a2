/*
 * moe_rows.h - the per-row kernels of the MoE family, compiled once per
 * element type and instruction set.  moe_isa.h includes this file twice
 * (double first, then float) with
 *   LB_T      the element type,  LB_TMAX its largest finite value,
 *   LB_I      the integer of the same width (LB_IMIN, LB_IMAX, LB_IINF: the
 *             bits of +Inf, LB_ISHIFT: width - 1),
 *   LB_F(x)   x with the type and instruction-set suffix (x_f32_avx2, ...),
 *   LB_D(x)   the same for the double instantiation,
 *   LB_EXP    exp_f32 / exp_f64,  LB_STREAM  stream_row_f32 / _f64.
 *
 * Every floating-point operation here is a plain IEEE operation in a fixed
 * order (no FMA contraction: ISO C mode; no library exp), so results are
 * the same on any thread count, any instruction set, and in the NumPy twin
 * (_reference.py), which performs the same operations in the same order.
 */

/* Sum of x[0..n) over 8 interleaved lanes: lane l adds x[l], x[l+8], ...
 * onto 0, then the lanes are added in order 0..7.  A fixed order that the
 * compiler can vectorise.                                                   */
static inline LB_T LB_F(lanesum)(const LB_T *x, uint64_t n)
{
    LB_T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += x[j + l];
    for (int l = 0; j + (uint64_t)l < n; l++)
        acc[l] += x[j + l];
    LB_T s = acc[0];
    for (int l = 1; l < 8; l++)
        s += acc[l];
    return s;
}

/* <a, b> in double over 8 interleaved lanes (products of the widened
 * elements), lanes added in order.                                         */
static inline double LB_F(lanedot)(const LB_T *a, const LB_T *b, uint64_t n)
{
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += (double)a[j + l] * (double)b[j + l];
    for (int l = 0; j + (uint64_t)l < n; l++)
        acc[l] += (double)a[j + l] * (double)b[j + l];
    double s = acc[0];
    for (int l = 1; l < 8; l++)
        s += acc[l];
    return s;
}

/* Maximum of z[0..E) (E >= 1) into *maxv; returns the index of the first
 * non-finite element, or E when all are finite.  Works on order-preserving
 * integer keys of the bits (so it vectorises; +0 ranks above -0).         */
static inline uint64_t LB_F(row_max)(const LB_T *z, uint64_t E, LB_T *maxv)
{
    LB_I m = LB_IMIN, bad = 0;
    for (uint64_t j = 0; j < E; j++) {
        LB_I b;
        memcpy(&b, z + j, sizeof(b));
        bad |= (LB_I)((b & LB_IMAX) >= LB_IINF);
        LB_I key = b ^ ((b >> LB_ISHIFT) & LB_IMAX);
        m = key > m ? key : m;
    }
    m ^= (m >> LB_ISHIFT) & LB_IMAX;
    memcpy(maxv, &m, sizeof(m));
    if (!bad)
        return E;
    for (uint64_t j = 0; j < E; j++)
        if (!(z[j] >= -LB_TMAX && z[j] <= LB_TMAX))
            return j;
    return E;
}

/* Inserts z[j] into the descending list best/idx of *m (at most k)
 * entries; strict comparisons keep the lower index ahead on ties.         */
static inline void LB_F(insert_top)(LB_T v, int32_t j, uint64_t k, LB_T *best,
                                    int32_t *idx, uint64_t *m)
{
    uint64_t pos;
    if (*m == k) {
        if (!(v > best[k - 1]))
            return;
        pos = k - 1;
    } else {
        pos = (*m)++;
    }
    while (pos > 0 && v > best[pos - 1]) {
        best[pos] = best[pos - 1];
        idx[pos] = idx[pos - 1];
        pos--;
    }
    best[pos] = v;
    idx[pos] = j;
}

/* The k largest z[j] (j < E, and allowed[j] != 0 when allowed is given),
 * in descending order, ties to the lower j: values to best[], indices to
 * idx[].  Returns how many were found.
 * Without `allowed` and for k <= 16 <= E: the k-th largest of the L = 8 or
 * 16 interleaved lane maxima (L distinct elements) bounds the row's k-th
 * largest from below, so only the few elements at or above it (found
 * through bit masks of 32 vectorised comparisons) are inserted.            */
static uint64_t LB_F(top_values)(const LB_T *z, uint64_t E, uint64_t k,
                                 const uint8_t *allowed, LB_T *best, int32_t *idx)
{
    uint64_t m = 0;
    if (!allowed && k <= 16 && E >= 16) {
        const int L = k <= 2 || E < 32 ? 8 + 8 * (k > 8) : 16;
        LB_T lane[16];
        uint64_t j0;
        for (int l = 0; l < L; l++)
            lane[l] = z[l];
        for (j0 = (uint64_t)L; j0 + (uint64_t)L <= E; j0 += (uint64_t)L)
            for (int l = 0; l < L; l++)
                lane[l] = z[j0 + l] > lane[l] ? z[j0 + l] : lane[l];
        for (uint64_t j = j0; j < E; j++)
            lane[j - j0] = z[j] > lane[j - j0] ? z[j] : lane[j - j0];
        for (int l = 0; l < L; l++)
            LB_F(insert_top)(lane[l], l, k, best, idx, &m);
        const LB_T t = best[k - 1];
        m = 0;
        for (j0 = 0; j0 + 32 <= E; j0 += 32) {
            uint32_t bits = 0;   /* bit l: z[j0 + l] >= t */
            for (int l = 0; l < 32; l++)
                bits |= (uint32_t)(z[j0 + l] >= t) << l;
            for (; bits; bits &= bits - 1) {
                uint64_t j = j0 + (uint64_t)__builtin_ctz(bits);
                LB_F(insert_top)(z[j], (int32_t)j, k, best, idx, &m);
            }
        }
        for (uint64_t j = j0; j < E; j++)
            if (z[j] >= t)
                LB_F(insert_top)(z[j], (int32_t)j, k, best, idx, &m);
        return m;
    }
    for (uint64_t j = 0; j < E; j++)
        if (!allowed || allowed[j])
            LB_F(insert_top)(z[j], (int32_t)j, k, best, idx, &m);
    return m;
}

/* e[j] = exp(z[j] - m); returns their lane sum.                            */
static inline LB_T LB_F(exp_shifted)(const LB_T *z, uint64_t E, LB_T m, LB_T *e)
{
    for (uint64_t j = 0; j < E; j++)
        e[j] = LB_EXP(z[j] - m);
    return LB_F(lanesum)(e, E);
}

/* s = 1 / (1 + exp(-z)).                                                   */
static inline void LB_F(sigmoid_row)(const LB_T *z, uint64_t E, LB_T *s)
{
    for (uint64_t j = 0; j < E; j++)
        s[j] = (LB_T)1 / ((LB_T)1 + LB_EXP(-z[j]));
}

/* q = the load-balancing distribution of a score row, in double: the
 * softmax scores themselves (returns 1), or the sigmoid scores over
 * (their lane sum + 1e-20) (returns that divisor).                          */
static inline double LB_F(aux_row)(const LB_T *s, uint64_t E, lb_score_fn fn,
                                   double *q)
{
    for (uint64_t j = 0; j < E; j++)
        q[j] = (double)s[j];
    if (fn == LB_SCORE_SOFTMAX)
        return 1.0;
    double d = LB_D(lanesum)(q, E) + 1e-20;
    for (uint64_t j = 0; j < E; j++)
        q[j] = q[j] / d;
    return d;
}

/* acc[j] += sum over the rows t < T of (double)p[t*E + j], each column's
 * terms added in row order (the same bytes as adding row by row), eight
 * columns at a time so the partial sums stay in registers instead of
 * bouncing through memory once per row.                                    */
static void LB_F(column_sums)(const LB_T *p, uint64_t T, uint64_t E, double *acc)
{
    uint64_t j = 0;
    for (; j + 8 <= E; j += 8) {
        double a[8];
        for (int u = 0; u < 8; u++)
            a[u] = acc[j + u];
        for (uint64_t t = 0; t < T; t++)
            for (int u = 0; u < 8; u++)
                a[u] += (double)p[t * E + j + (uint64_t)u];
        for (int u = 0; u < 8; u++)
            acc[j + u] = a[u];
    }
    for (; j < E; j++) {
        double a = acc[j];
        for (uint64_t t = 0; t < T; t++)
            a += (double)p[t * E + j];
        acc[j] = a;
    }
}

/* Routes rows [r0, r1) (see lb_moe_route).  counts (E) is this thread's
 * histogram; acc (E, or NULL) this chunk's column sums of q.  Returns the
 * flat index of the first non-finite logit in the rows, or UINT64_MAX.     */
static uint64_t LB_F(route_rows)(const void *zv, uint64_t r0, uint64_t r1,
                                 uint64_t E, uint64_t k, const lb_route_opts *o,
                                 int32_t *experts, void *weightsv, void *scoresv,
                                 int64_t *counts, double *acc, route_ws *ws)
{
    const LB_T *z = zv;
    LB_T *weights = weightsv, *scores = scoresv;
    const int grouped = o->groups > 1;
    const uint64_t gs = grouped ? E / o->groups : E;
    int preselected = 0;   /* experts chosen up front from the logits */
    int fused = 0;         /* rows go through softmax_topk_row_f32 first */
#if defined(__AVX2__)
    int pending = 0;       /* rows of a fused group still to finish */
    float mm[LB_ROUTE_ROWS];   /* the group's maxima */
    fused = sizeof(LB_T) == 4 && o->score == LB_SCORE_SOFTMAX && !o->bias && !grouped &&
            k <= 8 && E % 8 == 0 && E >= 8 && E <= 64;
#endif
#if defined(__AVX512F__)
    if (!fused && sizeof(LB_T) == 4 && !o->bias && !grouped && k <= 16 && E <= 64) {
        uint64_t t = r0;
        if (k <= 8)   /* sixteen rows per pass, one per lane */
            for (; t + 16 <= r1; t += 16)
                topk_vertical16_f32((const float *)z + t * E, E, k, experts + t * k);
        for (; t < r1; t += 4)
            topk_extract_rows_f32((const float *)z + t * E, r1 - t < 4 ? r1 - t : 4, E, k,
                                  experts + t * k);
        preselected = 1;
    }
#elif defined(__AVX2__)
    /* rows [r0, vert) are selected eight at a time, the rest one by one */
    uint64_t vert = r0;
    if (!fused && sizeof(LB_T) == 4 && !o->bias && !grouped && k <= 8 && E >= 16 && E <= 256)
        for (; vert + 8 <= r1; vert += 8)
            topk_vertical8_f32((const float *)z + vert * E, E, k, experts + vert * k);
#endif
    for (uint64_t t = r0; t < r1; t++) {
#if defined(__AVX2__) && !defined(__AVX512F__)
        preselected = t < vert;
#endif
        const LB_T *zr = z + t * E;
        LB_T *sr = scores + t * E;
        int32_t *ex = experts + t * k;
        LB_T *w = weights + t * k;
        LB_T m;
        LB_T *e = (LB_T *)ws->q;   /* exp(z - m), kept for the weights */
        int done = 0;   /* scores, experts and column sums by the fused row */
#if defined(__AVX2__)
        /* rows LB_ROUTE_ROWS at a time (row n's e at ws->q + n E floats,
         * its maximum in mm[n]); a declined group row by row              */
        if (fused && pending) {
            e += (LB_ROUTE_ROWS - pending) * E;
            m = mm[LB_ROUTE_ROWS - pending];
            done = 1;
            pending--;
        } else if (fused && t + LB_ROUTE_ROWS <= r1 &&
                   softmax_topk_rows_dispatch_f32((const float *)zr, E, k, (float *)sr,
                                                  (float *)e, acc, ex, mm)) {
            m = mm[0];
            done = 1;
            pending = LB_ROUTE_ROWS - 1;
        } else if (fused) {
            done = softmax_topk_row_f32((const float *)zr, E, k, (float *)sr, (float *)e,
                                        acc, ex, mm);
            m = mm[0];
        }
#endif
        if (!done) {
            uint64_t bad = LB_F(row_max)(zr, E, &m);
            if (bad < E)
                return t * E + bad;
            if (o->score == LB_SCORE_SOFTMAX) {
                /* p = e * (1 / sum): one division per row, not per element */
                LB_T inv = (LB_T)1 / LB_F(exp_shifted)(zr, E, m, e);
                for (uint64_t j = 0; j < E; j++)
                    sr[j] = e[j] * inv;   /* q = p: column sums after the rows */
            } else {
                LB_F(sigmoid_row)(zr, E, sr);
            }

            /* choice scores (score + bias) feed the group scores and, with a
             * bias, the selection; without one the logits are the keys.       */
            const uint8_t *allowed = NULL;
            if (o->bias || grouped)
                for (uint64_t j = 0; j < E; j++)
                    ws->choice[j] = (double)sr[j] + (o->bias ? o->bias[j] : 0.0);
            if (grouped) {
                uint64_t per = k / o->group_k;
                for (uint64_t g = 0; g < o->groups; g++) {
                    LB_D(top_values)(ws->choice + g * gs, gs, per, NULL, ws->best, ws->idx);
                    double sum = 0.0;
                    for (uint64_t r = 0; r < per; r++)
                        sum += ws->best[r];
                    ws->gscore[g] = sum;
                }
                LB_D(top_values)(ws->gscore, o->groups, o->group_k, NULL, ws->best, ws->idx);
                memset(ws->allowed, 0, (size_t)E);
                for (uint64_t r = 0; r < o->group_k; r++)
                    memset(ws->allowed + (uint64_t)ws->idx[r] * gs, 1, (size_t)gs);
                allowed = ws->allowed;
            }
            if (o->bias)
                LB_D(top_values)(ws->choice, E, k, allowed, ws->best, ws->idx);
            else if (!preselected)
                LB_F(top_values)(zr, E, k, allowed, (LB_T *)ws->best, ws->idx);
            if (!preselected)
                for (uint64_t s = 0; s < k; s++)   /* k is small: no libc call */
                    ex[s] = ws->idx[s];
        }

        if (o->score == LB_SCORE_SOFTMAX && o->renormalize) {
            /* softmax over the selected logits: exp(z - their max), which
             * are the row's exp(z - m) when the row maximum is selected */
            LB_T zm = zr[ex[0]];
            for (uint64_t s = 1; s < k; s++)
                zm = zr[ex[s]] > zm ? zr[ex[s]] : zm;
            LB_T sum = 0;
            for (uint64_t s = 0; s < k; s++) {
                w[s] = zm == m ? e[ex[s]] : LB_EXP(zr[ex[s]] - zm);
                sum += w[s];
            }
            for (uint64_t s = 0; s < k; s++)
                w[s] = w[s] / sum;
        } else if (o->renormalize) {
            LB_T sum = 0;
            for (uint64_t s = 0; s < k; s++)
                sum += sr[ex[s]];
            sum = sum + (LB_T)1e-20;
            for (uint64_t s = 0; s < k; s++)
                w[s] = sr[ex[s]] / sum;
        } else {
            for (uint64_t s = 0; s < k; s++)
                w[s] = sr[ex[s]];
        }
        for (uint64_t s = 0; s < k; s++)
            counts[ex[s]]++;
        if (acc && !done && (o->score == LB_SCORE_SIGMOID || fused)) {
            LB_F(aux_row)(sr, E, o->score, ws->q);
            for (uint64_t j = 0; j < E; j++)
                acc[j] += ws->q[j];
        }
    }
    if (acc && o->score == LB_SCORE_SOFTMAX && !fused)
        LB_F(column_sums)(scores + r0 * E, r1 - r0, E, acc);
    return UINT64_MAX;
}

/* Column sums of q over the valid rows of [r0, r1) onto acc (E).           */
static void LB_F(aux_sum_rows)(const void *scoresv, uint64_t r0, uint64_t r1,
                               uint64_t E, lb_score_fn fn, const uint8_t *mask,
                               double *q, double *acc)
{
    const LB_T *scores = scoresv;
    for (uint64_t t = r0; t < r1; t++) {
        if (mask && !mask[t])
            continue;
        LB_F(aux_row)(scores + t * E, E, fn, q);
        for (uint64_t j = 0; j < E; j++)
            acc[j] += q[j];
    }
}

/* Gradient rows [r0, r1) of sum_i g[i] q[t, i] (see lb_moe_balance_grad);
 * g is the segment's row of weights.                                       */
static void LB_F(balance_grad_rows)(const void *scoresv, uint64_t r0, uint64_t r1,
                                    uint64_t E, lb_score_fn fn, const double *g,
                                    const uint8_t *mask, double *q, void *gradv)
{
    const LB_T *scores = scoresv;
    LB_T *grad = gradv;
    for (uint64_t t = r0; t < r1; t++) {
        const LB_T *sr = scores + t * E;
        LB_T *gr = grad + t * E;
        if (mask && !mask[t]) {
            memset(gr, 0, (size_t)E * sizeof(LB_T));
            continue;
        }
        double d = LB_F(aux_row)(sr, E, fn, q);
        double dot = LB_D(lanedot)(q, g, E);
        if (fn == LB_SCORE_SOFTMAX) {
            for (uint64_t j = 0; j < E; j++)
                gr[j] = (LB_T)(q[j] * (g[j] - dot));
        } else {
            for (uint64_t j = 0; j < E; j++) {
                double s = (double)sr[j];
                gr[j] = (LB_T)(s * (1.0 - s) * (g[j] - dot) / d);
            }
        }
    }
}

/* z-loss rows [r0, r1): returns the sum of lse^2 over the valid rows (in
 * row order, onto 0) or sets *bad to the first non-finite flat index.
 * grad rows (when grad is not NULL) = scale * 2 * lse * softmax(z).         */
static double LB_F(z_loss_rows)(const void *zv, uint64_t r0, uint64_t r1,
                                uint64_t E, const uint8_t *mask, double scale,
                                void *ev, void *gradv, uint64_t *bad)
{
    const LB_T *z = zv;
    LB_T *e = ev, *grad = gradv;
    double acc = 0.0;
    for (uint64_t t = r0; t < r1; t++) {
        const LB_T *zr = z + t * E;
        LB_T m;
        uint64_t b = LB_F(row_max)(zr, E, &m);
        if (b < E) {
            *bad = t * E + b;
            return acc;
        }
        if (mask && !mask[t]) {
            if (grad)
                memset(grad + t * E, 0, (size_t)E * sizeof(LB_T));
            continue;
        }
        LB_T s = LB_F(exp_shifted)(zr, E, m, e);
        double lse = (double)m + log((double)s);
        acc += lse * lse;
        if (grad) {   /* the softmax as in route: e * (1 / s) */
            double c = scale * 2.0 * lse;
            LB_T inv = (LB_T)1 / s, *gr = grad + t * E;
            for (uint64_t j = 0; j < E; j++)
                gr[j] = (LB_T)(c * (double)(e[j] * inv));
        }
    }
    return acc;
}

/* dst[0..H) = w * src (a copy when unit), with streaming stores when
 * `stream` (a large output that is not read back soon) and aligned.        */
static inline void LB_F(scale_row)(LB_T *dst, const LB_T *src, uint64_t H,
                                   LB_T w, int unit, int stream)
{
    if (stream && LB_STREAM(dst, src, H, w, unit))
        return;
    if (unit) {
        memcpy(dst, src, (size_t)H * sizeof(LB_T));
        return;
    }
    for (uint64_t h = 0; h < H; h++)
        dst[h] = w * src[h];
}

/* Scatters tokens [t0, t1) into the dispatch buffer (lb_moe_scatter).    */
static void LB_F(scatter_rows)(const void *xv, uint64_t H, const int64_t *position,
                               uint64_t t0, uint64_t t1, uint64_t k,
                               const void *weightsv, void *outv, int stream)
{
    const LB_T *x = xv, *weights = weightsv;
    LB_T *out = outv;
    for (uint64_t t = t0; t < t1; t++)
        for (uint64_t s = 0; s < k; s++) {
            int64_t p = position[t * k + s];
            if (p < 0)
                continue;
            LB_T w = weights ? weights[t * k + s] : (LB_T)1;
            LB_F(scale_row)(out + (uint64_t)p * H, x + t * H, H, w, !weights, stream);
        }
}

/* Combines tokens [t0, t1) (see lb_moe_combine), 64 columns at a time so
 * that the k source rows are read side by side and each output block is
 * stored once.                                                              */
static void LB_F(combine_rows)(const void *yv, uint64_t H, const int64_t *position,
                               uint64_t t0, uint64_t t1, uint64_t k,
                               const void *weightsv, void *outv, int stream)
{
    const LB_T *y = yv, *weights = weightsv;
    LB_T *out = outv;
    LB_T acc[64];
    for (uint64_t t = t0; t < t1; t++) {
        const int64_t *pt = position + t * k;
        for (uint64_t h0 = 0; h0 < H; h0 += 64) {
            uint64_t nb = H - h0 < 64 ? H - h0 : 64;
            for (uint64_t h = 0; h < nb; h++)
                acc[h] = 0;
            for (uint64_t s = 0; s < k; s++) {
                if (pt[s] < 0)
                    continue;
                const LB_T *yr = y + (uint64_t)pt[s] * H + h0;
                LB_T w = weights ? weights[t * k + s] : (LB_T)1;
                if (weights)
                    for (uint64_t h = 0; h < nb; h++)
                        acc[h] += w * yr[h];
                else
                    for (uint64_t h = 0; h < nb; h++)
                        acc[h] += yr[h];
            }
            LB_F(scale_row)(out + t * H + h0, acc, nb, (LB_T)1, 1, stream);
        }
    }
}

/* The combine backward for tokens [t0, t1) in one pass over grad_out
 * (see lb_moe_combine_backward): each kept slot's row of grad_y is
 * w * grad_out[t] (when grad_y is not NULL) and its weight gradient the
 * dot product of grad_out[t] with its expert-output row (when gw is not
 * NULL); grad_out[t] is read from memory once for all k slots.            */
static void LB_F(combine_grad_rows)(const void *goutv, const void *yv, uint64_t H,
                                    const int64_t *position, uint64_t t0,
                                    uint64_t t1, uint64_t k, const void *weightsv,
                                    void *gyv, void *gwv, int stream)
{
    const LB_T *gout = goutv, *y = yv, *weights = weightsv;
    LB_T *gy = gyv, *gw = gwv;
    for (uint64_t t = t0; t < t1; t++) {
        const LB_T *gt = gout + t * H;
        for (uint64_t s = 0; s < k; s++) {
            int64_t p = position[t * k + s];
            if (p < 0) {
                if (gw)
                    gw[t * k + s] = (LB_T)0;
                continue;
            }
            /* the dot first: its loads of y[p] must not follow the stores
             * to grad_y[p], at the same offsets modulo 4096 when both are
             * page-aligned (4K aliasing makes every load wait)            */
            if (gw)
                gw[t * k + s] = (LB_T)LB_F(lanedot)(gt, y + (uint64_t)p * H, H);
            if (gy)
                LB_F(scale_row)(gy + (uint64_t)p * H, gt, H,
                                weights ? weights[t * k + s] : (LB_T)1, !weights, stream);
        }
    }
}

/* Gradient of the combine weights for tokens [t0, t1).                    */
static void LB_F(combine_dot_rows)(const void *goutv, const void *yv, uint64_t H,
                                   const int64_t *position, uint64_t t0,
                                   uint64_t t1, uint64_t k, void *gwv)
{
    const LB_T *gout = goutv, *y = yv;
    LB_T *gw = gwv;
    for (uint64_t t = t0; t < t1; t++)
        for (uint64_t s = 0; s < k; s++) {
            int64_t p = position[t * k + s];
            gw[t * k + s] = p < 0 ? (LB_T)0
                                  : (LB_T)LB_F(lanedot)(gout + t * H,
                                                        y + (uint64_t)p * H, H);
        }
}
