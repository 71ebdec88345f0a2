/*
 * powersgd.c - the orthogonalisation step of PowerSGD (Vogels, Karimireddy
 * and Jaggi, NeurIPS 2019), as PyTorch's powerSGD_hook runs it
 * (torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py,
 * _orthogonalize_gram_schmidt): modified Gram-Schmidt over the columns of a
 * tall, thin, row-major matrix.
 *
 * Column by column: c_i /= (||c_i|| + epsilon), then every later column
 * loses its projection on c_i (c_j -= <c_i, c_j> c_i, all j > i, the dots
 * taken before any of them changes).  Accumulation is in double for both
 * dtypes; the rows are cut into fixed blocks of LB_PSGD_BLOCK rows and each
 * block's sums into LANES interleaved lanes (below), added in a fixed
 * order, so the result is the same bytes for every thread count.  Element
 * updates round once to the matrix dtype:
 *   c_i[k] = (T)((double)c_i[k] * inv),  inv = 1 / (sqrt(sum) + epsilon)
 *   c_j[k] = (T)((double)c_j[k] - dot_j * (double)c_i[k]).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "threads.h"

/* First non-finite element of the n x r matrix (flat row-major index), or
 * UINT64_MAX.                                                              */
static uint64_t first_bad(const void *a, uint64_t count, lb_dtype dt)
{
    if (dt == LB_F32) {
        const float *x = a;
        for (uint64_t i = 0; i < count; i++)
            if (!isfinite(x[i]))
                return i;
    } else {
        const double *x = a;
        for (uint64_t i = 0; i < count; i++)
            if (!isfinite(x[i]))
                return i;
    }
    return UINT64_MAX;
}

/* Sums are split over LB_PSGD_LANES lanes: row k of a block adds into
 * lane k % LANES (each lane from +0.0, in row order); a block's sum is
 * 0.0 + lane 0 + lane 1 + ... (in lane order), and the matrix's sum is
 * 0.0 + block 0 + block 1 + ... (in block order).                         */
#define LANES 8

/* The column kernels for one element type T.  part holds, per block b,
 * LANES*r doubles: lane l of column j at part[b*LANES*r + l*r + j].
 *  sumsq_T:  lane sums of a[k,j]^2 for j in [j0, r)
 *  scale_dots_T: column i *= inv (1/d; 0 when d is 0), then the lane sums
 *                of c_i[k]*a[k,j] for j in (i, r)
 *  project_T: a[k,j] -= dot[j]*c_i[k] for j in (i, r), then the lane sums
 *             of the new a[k,i+1]^2.
 * Every loop over blocks runs with `team` threads, one block per
 * iteration.                                                              */
/* Block b of an n-row matrix: rows [*lo, *hi) (LB_PSGD_BLOCK rows, fewer
 * in the last block); returns its LANES*r partial sums in part.          */
static inline double *psgd_block(double *part, uint64_t b, uint64_t n, uint64_t r,
                                 uint64_t *lo, uint64_t *hi)
{
    *lo = b * LB_PSGD_BLOCK;
    *hi = *lo + LB_PSGD_BLOCK < n ? *lo + LB_PSGD_BLOCK : n;
    return part + b * LANES * r;
}

/* s[l*r + j] = 0 for every lane l and j in [j0, j1).                     */
static inline void zero_lanes(double *s, uint64_t r, uint64_t j0, uint64_t j1)
{
    for (int l = 0; l < LANES; l++)
        for (uint64_t j = j0; j < j1; j++)
            s[l * r + j] = 0.0;
}

#define LB_PSGD_KERNELS(T, SUF)                                                \
static void sumsq_##SUF(const T *a, uint64_t n, uint64_t r, uint64_t j0,       \
                        double *part, uint64_t nblocks, int team)              \
{                                                                              \
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))   \
    for (uint64_t b = 0; b < nblocks; b++) {                                   \
        uint64_t lo, hi;                                                       \
        double *s = psgd_block(part, b, n, r, &lo, &hi);                       \
        if (r == 1) {                                                          \
            double acc[LANES] = {0};                                           \
            uint64_t k = lo;                                                   \
            for (; k + LANES <= hi; k += LANES)                                \
                for (int l = 0; l < LANES; l++) {                              \
                    double v = (double)a[k + l];                               \
                    acc[l] += v * v;                                           \
                }                                                              \
            for (int l = 0; k < hi; k++, l++) {                                \
                double v = (double)a[k];                                       \
                acc[l] += v * v;                                               \
            }                                                                  \
            for (int l = 0; l < LANES; l++)                                    \
                s[l] = acc[l];                                                 \
            continue;                                                          \
        }                                                                      \
        zero_lanes(s, r, j0, r);                                               \
        for (uint64_t k = lo; k < hi; k++) {                                   \
            const T *row = a + k * r;                                          \
            double *acc = s + ((k - lo) % LANES) * r;                          \
            for (uint64_t j = j0; j < r; j++) {                                \
                double v = (double)row[j];                                     \
                acc[j] += v * v;                                               \
            }                                                                  \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
static void scale_dots_##SUF(T *a, uint64_t n, uint64_t r, uint64_t i,         \
                             double inv, double *part, uint64_t nblocks,       \
                             int team)                                         \
{                                                                              \
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))   \
    for (uint64_t b = 0; b < nblocks; b++) {                                   \
        uint64_t lo, hi;                                                       \
        double *s = psgd_block(part, b, n, r, &lo, &hi);                       \
        if (r == 1) {                                                          \
            for (uint64_t k = lo; k < hi; k++)                                 \
                a[k] = (T)((double)a[k] * inv);                                \
            continue;                                                          \
        }                                                                      \
        zero_lanes(s, r, i + 1, r);                                            \
        for (uint64_t k = lo; k < hi; k++) {                                   \
            T *row = a + k * r;                                                \
            double *acc = s + ((k - lo) % LANES) * r;                          \
            T c = (T)((double)row[i] * inv);                                   \
            row[i] = c;                                                        \
            for (uint64_t j = i + 1; j < r; j++)                               \
                acc[j] += (double)c * (double)row[j];                          \
        }                                                                      \
    }                                                                          \
}                                                                              \
                                                                               \
static void project_##SUF(T *a, uint64_t n, uint64_t r, uint64_t i,            \
                          const double *dot, double *part, uint64_t nblocks,   \
                          int team)                                            \
{                                                                              \
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))   \
    for (uint64_t b = 0; b < nblocks; b++) {                                   \
        uint64_t lo, hi;                                                       \
        double *s = psgd_block(part, b, n, r, &lo, &hi);                       \
        zero_lanes(s, r, i + 1, i + 2);                                        \
        for (uint64_t k = lo; k < hi; k++) {                                   \
            T *row = a + k * r;                                                \
            double c = (double)row[i];                                         \
            for (uint64_t j = i + 1; j < r; j++)                               \
                row[j] = (T)((double)row[j] - dot[j] * c);                     \
            double v = (double)row[i + 1];                                     \
            s[((k - lo) % LANES) * r + i + 1] += v * v;                        \
        }                                                                      \
    }                                                                          \
}

LB_PSGD_KERNELS(float, f32)
LB_PSGD_KERNELS(double, f64)

/* total[j] = 0.0 + block 0 + block 1 + ..., each block 0.0 + lane 0 + lane
 * 1 + ..., for j in [j0, j1).                                             */
static void combine(const double *part, uint64_t nblocks, uint64_t r,
                    uint64_t j0, uint64_t j1, double *total)
{
    for (uint64_t j = j0; j < j1; j++)
        total[j] = 0.0;
    for (uint64_t b = 0; b < nblocks; b++)
        for (uint64_t j = j0; j < j1; j++) {
            double bs = 0.0;
            for (int l = 0; l < LANES; l++)
                bs += part[b * LANES * r + (uint64_t)l * r + j];
            total[j] += bs;
        }
}

/* One n x r matrix (see the file comment); part holds nblocks*LANES*r
 * doubles and total r doubles.                                            */
static lb_status orthogonalize_one(void *a, uint64_t n, uint64_t r,
                                   lb_dtype dt, double epsilon, int nthreads,
                                   double *part, double *total, lb_error *err)
{
    uint64_t nblocks = lb_num_chunks(n, LB_PSGD_BLOCK);
    int team = lb_team(nthreads, nblocks);
    int f32 = dt == LB_F32;
    if (f32)
        sumsq_f32(a, n, r, 0, part, nblocks, team);
    else
        sumsq_f64(a, n, r, 0, part, nblocks, team);
    combine(part, nblocks, r, 0, r, total);
    for (uint64_t j = 0; j < r; j++) {
        if (!isfinite(total[j])) {
            uint64_t at = first_bad(a, n * r, dt);
            if (err)
                err->index = at == UINT64_MAX ? 0 : at;
            return at == UINT64_MAX ? LB_EOVERFLOW : LB_ENONFINITE;
        }
    }
    for (uint64_t i = 0; i < r; i++) {
        double norm2 = total[i];
        if (!isfinite(norm2)) {
            if (err)
                err->index = i;
            return LB_EOVERFLOW;
        }
        double d = sqrt(norm2) + epsilon;
        double inv = d == 0.0 ? 0.0 : 1.0 / d;
        if (f32)
            scale_dots_f32(a, n, r, i, inv, part, nblocks, team);
        else
            scale_dots_f64(a, n, r, i, inv, part, nblocks, team);
        if (i + 1 == r)
            break;
        combine(part, nblocks, r, i + 1, r, total);
        if (f32)
            project_f32(a, n, r, i, total, part, nblocks, team);
        else
            project_f64(a, n, r, i, total, part, nblocks, team);
        combine(part, nblocks, r, i + 1, i + 2, total);
    }
    return LB_OK;
}

lb_status lb_powersgd_orthogonalize(void *a, uint64_t batch, uint64_t n,
                                    uint64_t r, lb_dtype dt, double epsilon,
                                    int nthreads, lb_error *err)
{
    if ((dt != LB_F32 && dt != LB_F64) || !(epsilon >= 0.0) || !isfinite(epsilon))
        return LB_EINVAL;
    if (batch == 0 || n == 0 || r == 0)
        return LB_OK;
    if (!a)
        return LB_EINVAL;
    if (n > UINT64_MAX / r || n * r > UINT64_MAX / batch)
        return LB_EOVERFLOW;
    uint64_t nblocks = lb_num_chunks(n, LB_PSGD_BLOCK);
    uint64_t slots;
    if (lb_size_mul(nblocks, LANES, &slots) != LB_OK || slots == UINT64_MAX)
        return LB_EOVERFLOW;
    double *part = lb_alloc_n(slots + 1, (uint64_t)r * sizeof(double), 0);
    if (!part)
        return LB_ENOMEM;
    size_t width = lb_dtype_size(dt);
    lb_status st = LB_OK;
    for (uint64_t m = 0; m < batch && st == LB_OK; m++) {
        char *mat = (char *)a + (size_t)(m * n * r) * width;
        st = orthogonalize_one(mat, n, r, dt, epsilon, nthreads, part,
                               part + nblocks * LANES * r, err);
        if (st != LB_OK && err)
            err->index += m * n * r;
    }
    free(part);
    return st;
}
