/*
 * twomeans.c - Seide et al.'s 1-bit SGD quantizer (Interspeech 2014): sign
 * bits plus, per block, the mean of the non-negative elements and the mean
 * magnitude of the negative ones (the two reconstruction values that
 * minimise the squared error for the sign partition).
 *
 * Statistics use the fixed 16-lane order of quant.h (lane l adds the terms
 * with j % 16 == l in float64, lanes folded 8, 4, 2, 1) on LB_CHUNK pieces
 * counted from each block start and added in piece order, so the scales do
 * not depend on the thread count.  Sign bits come from the quant.h kernels.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "quant.h"
#include "threads.h"

typedef struct {
    double pos, neg;   /* sum of x >= 0, sum of x < 0 (float64)            */
    uint64_t npos;     /* count of x >= 0                                  */
} tm_stat;

static void fold16(double *lane)
{
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++)
            lane[l] += lane[l + w];
}

/* Splits v by its sign bit: *p = v, *q = +0 when the sign bit is clear,
 * *p = +0, *q = v when it is set (masks, no branch, so the 16 lanes
 * vectorise).  -0 goes to q, where the twin puts it on the p side: both
 * add a zero to lanes that start at +0, so the sums are the same.        */
static inline void split_sign(double v, double *p, double *q)
{
    uint64_t b, m, pb, qb;
    memcpy(&b, &v, 8);
    m = (uint64_t)((int64_t)b >> 63);
    pb = b & ~m;
    qb = b & m;
    memcpy(p, &pb, 8);
    memcpy(q, &qb, 8);
}

/* Sums of the non-negative and of the negative elements of x[0..m) in the
 * 16-lane order (a NaN poisons one of them).                             */
#define TM_SUMS(NAME, T)                                                       \
    static void NAME(const T *x, uint64_t m, double *pos, double *neg)         \
    {                                                                          \
        double lp[16] = {0}, ln[16] = {0};                                     \
        uint64_t j = 0;                                                        \
        for (; j + 16 <= m; j += 16)                                           \
            for (int l = 0; l < 16; l++) {                                     \
                double p, q;                                                   \
                split_sign((double)x[j + l], &p, &q);                          \
                lp[l] += p;                                                    \
                ln[l] += q;                                                    \
            }                                                                  \
        for (int l = 0; j + (uint64_t)l < m; l++) {                            \
            double p, q;                                                       \
            split_sign((double)x[j + l], &p, &q);                              \
            lp[l] += p;                                                        \
            ln[l] += q;                                                        \
        }                                                                      \
        fold16(lp);                                                            \
        fold16(ln);                                                            \
        *pos = lp[0];                                                          \
        *neg = ln[0];                                                          \
    }
TM_SUMS(tm_sums32, float)
TM_SUMS(tm_sums64, double)

/* Set bits in stream bits [s, s + m) of codes. */
static uint64_t count_ones(const uint8_t *codes, uint64_t s, uint64_t m)
{
    uint64_t c = 0, e = s + m;
    while (s < e && (s & 7)) {
        c += (codes[s >> 3] >> (s & 7)) & 1u;
        s++;
    }
    for (; s + 64 <= e; s += 64) {
        uint64_t w;
        memcpy(&w, codes + (s >> 3), 8);
        c += (uint64_t)__builtin_popcountll(w);
    }
    for (; s < e; s++)
        c += (codes[s >> 3] >> (s & 7)) & 1u;
    return c;
}

static uint64_t first_bad(const void *x, lb_dtype dt, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        double v = dt == LB_F32 ? (double)((const float *)x)[i] : ((const double *)x)[i];
        if (!isfinite(v))
            return i;
    }
    return n;
}

/* Sign bits of x (code 1 when x >= 0) and, per block of `block` elements
 * (0: one block), scales[2b] = mean of the non-negative elements and
 * scales[2b+1] = -(mean of the negative ones), both float32 rounded to
 * nearest (0 for an empty side; one zero pair for n == 0 and block == 0).  Non-finite
 * input: LB_ENONFINITE at its index when check_finite, else the sums are
 * used as they are; a scale that overflows float32 gives LB_ERANGE with
 * err->index = the block.                                                 */
lb_status lb_sign_two_means(const void *x, uint64_t n, lb_dtype dt,
                            uint64_t block, int check_finite, int nthreads,
                            uint8_t *codes, float *scales, lb_error *err)
{
    if ((dt != LB_F32 && dt != LB_F64) || !scales || (n && (!x || !codes)))
        return LB_EINVAL;
    uint64_t B = block ? block : (n ? n : 1);
    uint64_t nblocks = lb_num_chunks(n, B);
    uint64_t piece = B < LB_CHUNK ? B : LB_CHUNK, ppb = lb_num_chunks(B, piece);
    if (nblocks > UINT64_MAX / ppb)
        return LB_EOVERFLOW;
    uint64_t npieces = nblocks * ppb;
    const lb_quant_fns *fns = lb_quant();
    tm_stat *part = lb_alloc_n(npieces, sizeof(tm_stat), 0);
    if (!part)
        return LB_ENOMEM;
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t s = c * LB_CHUNK, m = n - s < LB_CHUNK ? n - s : LB_CHUNK;
        if (dt == LB_F32)
            fns->signbits32((const float *)x + s, m, codes + s / 8);
        else
            fns->signbits64((const double *)x + s, m, codes + s / 8);
    }
    team = lb_team(nthreads, n / LB_CHUNK);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t p = 0; p < npieces; p++) {
        uint64_t b = p / ppb, s = b * B + (p % ppb) * piece;
        uint64_t e = (b + 1) * B < n ? (b + 1) * B : n;
        uint64_t m = s < e ? (e - s < piece ? e - s : piece) : 0;
        tm_stat z = {0.0, 0.0, 0};
        if (m) {
            if (dt == LB_F32)
                tm_sums32((const float *)x + s, m, &z.pos, &z.neg);
            else
                tm_sums64((const double *)x + s, m, &z.pos, &z.neg);
            z.npos = count_ones(codes, s, m);
        }
        part[p] = z;
    }
    lb_status st = LB_OK;
    for (uint64_t b = 0; b < nblocks; b++) {
        double pos = 0.0, neg = 0.0;
        uint64_t np = 0, len = (b + 1) * B < n ? B : n - b * B;
        for (uint64_t q = 0; q < ppb; q++) {
            pos += part[b * ppb + q].pos;
            neg += part[b * ppb + q].neg;
            np += part[b * ppb + q].npos;
        }
        if (check_finite && !(isfinite(pos) && isfinite(neg))) {
            uint64_t bad = first_bad(x, dt, n);
            if (err)
                err->index = bad < n ? bad : b;
            st = bad < n ? LB_ENONFINITE : LB_ERANGE;
            break;
        }
        uint64_t nn = len - np;
        scales[2 * b] = np ? (float)(pos / (double)np) : 0.0f;
        scales[2 * b + 1] = nn ? (float)(-neg / (double)nn) : 0.0f;
        if (check_finite && !(isfinite(scales[2 * b]) && isfinite(scales[2 * b + 1]))) {
            if (err)
                err->index = b;
            st = LB_ERANGE;
            break;
        }
    }
    if (n == 0 && block == 0)
        scales[0] = scales[1] = 0.0f;
    free(part);
    return st;
}
