/*
 * fedzip.c - FedZip's quantization and coding of a (top-z sparsified)
 * layer (Malekijoo et al. 2021, "FedZip: A Compression Framework for
 * Communication-Efficient Federated Learning").
 *
 * 3-means on all n values (zeros included, so one centroid sits near 0):
 * centroids start at (min, (min + max) / 2, max); each Lloyd iteration
 * assigns every value to its nearest centroid (|x - c| in float64, ties to
 * the lower index) and moves each centroid to the mean of its values (a
 * centroid with no values stays).  Sums are float64, sequential within
 * LB_CHUNK chunks, chunks added in order: nothing depends on the thread
 * count.  The centroids are then rounded to float32 and the final labels
 * are the nearest rounded centroid.
 *
 * Coding of the labels (stream bits LSB first within bytes; spare bits 0),
 * with "major" the most frequent label (ties to the lower) and minor 0 / 1
 * the other two in increasing order:
 *   huffman  per element: "0" for the major label, "10" minor 0, "11"
 *            minor 1 (a prefix code; Huffman's for three symbols);
 *   gaps     per element that is not major, in order: the Elias-gamma code
 *            of its distance to the previous one (the first: index + 1),
 *            then one bit, 0 for minor 0 and 1 for minor 1.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "threads.h"

typedef struct {
    double sum[3];
    uint64_t cnt[3];
    double lo, hi;
} km_part;

static double val(const void *x, lb_dtype dt, uint64_t i)
{
    return dt == LB_F32 ? (double)((const float *)x)[i] : ((const double *)x)[i];
}

static int nearest(double v, const double *c)
{
    double d0 = fabs(v - c[0]), d1 = fabs(v - c[1]), d2 = fabs(v - c[2]);
    int j = d1 < d0 ? 1 : 0;
    double dj = j ? d1 : d0;
    return d2 < dj ? 2 : j;
}

/* 3-means of x (float32/float64, n elements) with `iters` Lloyd
 * iterations (see the file comment): centroids[3] (float32) and labels[n]
 * in 0..2.  Non-finite input: LB_ENONFINITE at its index; a centroid beyond
 * float32 (float64 input): LB_ERANGE with err->index = the centroid.      */
lb_status lb_kmeans3(const void *x, uint64_t n, lb_dtype dt, int iters,
                     int nthreads, float *centroids, uint8_t *labels,
                     lb_error *err)
{
    if ((dt != LB_F32 && dt != LB_F64) || iters < 0 || !centroids || (n && (!x || !labels)))
        return LB_EINVAL;
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    km_part *part = lb_alloc_n(nchunks, sizeof(km_part), 0);
    if (!part)
        return LB_ENOMEM;
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t s = c * LB_CHUNK, e = n - s < LB_CHUNK ? n : s + LB_CHUNK;
        double lo = INFINITY, hi = -INFINITY;
        for (uint64_t i = s; i < e; i++) {
            double v = val(x, dt, i);
            if (!isfinite(v)) {
                lo = NAN;
                break;
            }
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        part[c].lo = lo;
        part[c].hi = hi;
    }
    double lo = n ? INFINITY : 0.0, hi = n ? -INFINITY : 0.0;
    for (uint64_t c = 0; c < nchunks; c++) {
        if (isnan(part[c].lo)) {
            for (uint64_t i = c * LB_CHUNK; i < n; i++)
                if (!isfinite(val(x, dt, i))) {
                    if (err)
                        err->index = i;
                    free(part);
                    return LB_ENONFINITE;
                }
        }
        lo = part[c].lo < lo ? part[c].lo : lo;
        hi = part[c].hi > hi ? part[c].hi : hi;
    }
    double cen[3] = {lo, lo + 0.5 * (hi - lo), hi};
    for (int it = 0; it < iters; it++) {
        LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
        for (uint64_t c = 0; c < nchunks; c++) {
            uint64_t s = c * LB_CHUNK, e = n - s < LB_CHUNK ? n : s + LB_CHUNK;
            km_part p = {{0.0, 0.0, 0.0}, {0, 0, 0}, 0.0, 0.0};
            for (uint64_t i = s; i < e; i++) {
                double v = val(x, dt, i);
                int j = nearest(v, cen);
                p.sum[j] += v;
                p.cnt[j]++;
            }
            part[c] = p;
        }
        double sum[3] = {0.0, 0.0, 0.0};
        uint64_t cnt[3] = {0, 0, 0};
        for (uint64_t c = 0; c < nchunks; c++)
            for (int j = 0; j < 3; j++) {
                sum[j] += part[c].sum[j];
                cnt[j] += part[c].cnt[j];
            }
        for (int j = 0; j < 3; j++)
            if (cnt[j])
                cen[j] = sum[j] / (double)cnt[j];
    }
    free(part);
    double cf[3];
    for (int j = 0; j < 3; j++) {
        centroids[j] = (float)cen[j];
        cf[j] = (double)centroids[j];
        if (!isfinite(cf[j])) {   /* a float64 mean beyond float32 */
            if (err)
                err->index = (uint64_t)j;
            return LB_ERANGE;
        }
    }
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t s = c * LB_CHUNK, e = n - s < LB_CHUNK ? n : s + LB_CHUNK;
        for (uint64_t i = s; i < e; i++)
            labels[i] = (uint8_t)nearest(val(x, dt, i), cf);
    }
    return LB_OK;
}

/* ---- bit streams ---------------------------------------------------------- */

typedef struct {
    uint8_t *buf;     /* NULL: count only */
    uint64_t pos;     /* bits written      */
} fz_writer;

static void fz_bit(fz_writer *w, unsigned b)
{
    if (w->buf && b)
        w->buf[w->pos >> 3] |= (uint8_t)(1u << (w->pos & 7));
    w->pos++;
}

static void fz_gamma(fz_writer *w, uint64_t v)   /* v >= 1 */
{
    int b = 63 - __builtin_clzll(v);
    w->pos += (uint64_t)b;                          /* b zero bits */
    for (int k = b; k >= 0; k--)
        fz_bit(w, (unsigned)((v >> k) & 1u));
}

static void fz_code(fz_writer *w, const uint8_t *labels, uint64_t n, int gaps,
                    unsigned major)
{
    unsigned minor0 = major == 0 ? 1 : 0;
    uint64_t prev = 0;       /* index + 1 of the previous minor element */
    for (uint64_t i = 0; i < n; i++) {
        unsigned l = labels[i];
        if (!gaps) {
            if (l == major)
                fz_bit(w, 0);
            else {
                fz_bit(w, 1);
                fz_bit(w, l != minor0);
            }
        } else if (l != major) {
            fz_gamma(w, i + 1 - prev);
            fz_bit(w, l != minor0);
            prev = i + 1;
        }
    }
}

/* The label stream of `labels` (n values in 0..2): *major (the most
 * frequent label, ties to the lower), *stream malloc'd (free() it; NULL
 * when empty) holding *nbits bits; gaps: 0 Huffman, 1 gap coding.        */
lb_status lb_fedzip_encode(const uint8_t *labels, uint64_t n, int gaps,
                           unsigned *major, uint8_t **stream, uint64_t *nbits)
{
    if (!major || !stream || !nbits || (n && !labels))
        return LB_EINVAL;
    uint64_t cnt[3] = {0, 0, 0};
    for (uint64_t i = 0; i < n; i++) {
        if (labels[i] > 2)
            return LB_EINVAL;
        cnt[labels[i]]++;
    }
    unsigned mj = 0;
    for (unsigned j = 1; j < 3; j++)
        if (cnt[j] > cnt[mj])
            mj = j;
    fz_writer w = {NULL, 0};
    fz_code(&w, labels, n, gaps, mj);
    *major = mj;
    *nbits = w.pos;
    *stream = NULL;
    if (!w.pos)
        return LB_OK;
    uint8_t *out = calloc((size_t)(w.pos / 8 + 1), 1);
    if (!out)
        return LB_ENOMEM;
    fz_writer w2 = {out, 0};
    fz_code(&w2, labels, n, gaps, mj);
    *stream = out;
    return LB_OK;
}

static inline unsigned fz_get(const uint8_t *buf, uint64_t p)
{
    return (buf[p >> 3] >> (p & 7)) & 1u;
}

/* Parses an untrusted label stream (exactly nbits bits of buf[0..len),
 * len == ceil(nbits / 8), spare bits zero) of n elements; out (float32 when
 * dt is LB_F32, else float64; NULL: check only) gets centroid[label].
 * LB_EFORMAT with err->index = the element (n for the stream end) for any
 * malformation (a gap past n or one of 0, a truncated code, bits left).  */
lb_status lb_fedzip_decode(const uint8_t *buf, uint64_t len, uint64_t nbits,
                           uint64_t n, int gaps, unsigned major,
                           const double *centroids, lb_dtype dt, void *out,
                           lb_error *err)
{
    if (major > 2 || (len && !buf) || (out && (!centroids || (dt != LB_F32 && dt != LB_F64))))
        return LB_EINVAL;
    if (len != nbits / 8 + (nbits % 8 != 0)) {
        if (err)
            err->index = n;
        return LB_EFORMAT;
    }
    unsigned minor[2] = {major == 0 ? 1u : 0u, major == 2 ? 1u : 2u};
    uint64_t pos = 0, i = 0;
#define BIT(p) fz_get(buf, (p))
#define PUT(idx, lab)                                                          \
    do {                                                                       \
        if (out) {                                                             \
            if (dt == LB_F32)                                                  \
                ((float *)out)[idx] = (float)centroids[lab];                   \
            else                                                               \
                ((double *)out)[idx] = centroids[lab];                         \
        }                                                                      \
    } while (0)
#define FAIL(at)                                                               \
    do {                                                                       \
        if (err)                                                               \
            err->index = (at);                                                 \
        return LB_EFORMAT;                                                     \
    } while (0)
    if (!gaps) {
        for (; i < n; i++) {
            if (pos >= nbits)
                FAIL(i);
            unsigned lab = major;
            if (BIT(pos)) {
                if (++pos >= nbits)
                    FAIL(i);
                lab = minor[BIT(pos)];
            }
            pos++;
            PUT(i, lab);
        }
    } else {
        while (pos < nbits) {
            int b = 0;
            while (pos < nbits && !BIT(pos)) {
                b++;
                pos++;
                if (b > 63)
                    FAIL(i);
            }
            if (pos + (uint64_t)b + 2 > nbits)
                FAIL(i);
            uint64_t gap = 0;
            for (int k = 0; k <= b; k++, pos++)
                gap = (gap << 1) | BIT(pos);
            if (gap > n - i)
                FAIL(i);
            for (uint64_t j = i; out && j + 1 < i + gap; j++)
                PUT(j, major);
            i += gap;
            PUT(i - 1, minor[BIT(pos)]);
            pos++;
        }
        for (; out && i < n; i++)
            PUT(i, major);
    }
    if (pos != nbits || (nbits % 8 && (buf[len - 1] >> (nbits % 8))))
        FAIL(n);
#undef BIT
#undef PUT
#undef FAIL
    return LB_OK;
}
