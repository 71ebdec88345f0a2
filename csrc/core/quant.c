/*
 * quant.c - quantizers (sign, blockwise absmax, QSGD, TernGrad, natural
 * compression, minifloat, SparseLoCo's 2-bit table), their common decoder
 * and the float16/bfloat16 conversions.
 *
 * Every quantizer has the same two phases: per-block statistics (max
 * magnitude, or sums in the fixed 16-lane order of quant.h, split into
 * LB_CHUNK pieces counted from the block start and added in piece order),
 * then an element pass over LB_CHUNK chunks in tiles of LB_QTILE elements:
 * random words for the tile (Philox, element i -> word i % 4 of block i/4,
 * or the 16-bit stream LB_SR16 of quant.h for stochastic blockwise
 * rounding), codes for each block segment of the tile, then the tile packed
 * into the output stream (tiles start at multiples of 8 elements, so at
 * whole bytes).  Float32 blockwise quantization and minifloats whose blocks
 * divide LB_QTILE fuse both phases per tile (quantize_fused32,
 * minifloat_fused).  Nothing depends on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "quant.h"
#include "threads.h"

#define LB_QTILE 2048

const lb_quant_fns *lb_quant(void)
{
    switch (lb_active_isa()) {
    case LB_ISA_AVX512: return &lb_quant_avx512;
    case LB_ISA_AVX2: return &lb_quant_avx2;
    default: return &lb_quant_scalar;
    }
}

uint64_t lb_packed_bytes(uint64_t n, int bits)
{
    return n / 8 * (uint64_t)bits + ((n % 8) * (uint64_t)bits + 7) / 8;
}

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */
/* ------------------------------------------------------------------------ */

static int is_float_dt(lb_dtype dt) { return dt == LB_F32 || dt == LB_F64; }

static double value_at(const void *x, lb_dtype dt, uint64_t i)
{
    return dt == LB_F32 ? (double)((const float *)x)[i] : ((const double *)x)[i];
}

static uint64_t first_nonfinite(const void *x, lb_dtype dt, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (!isfinite(value_at(x, dt, i)))
            return i;
    return n;
}

/* 2^k as a double for k in [-1022, 1023]. */
static double pow2(int k)
{
    uint64_t b = (uint64_t)(k + 1023) << 52;
    double d;
    memcpy(&d, &b, 8);
    return d;
}

/* y * 2^k, exact when the result is a normal double (k may exceed 1023). */
static double scale2(double y, int k)
{
    while (k > 1000) {
        y *= pow2(1000);
        k -= 1000;
    }
    while (k < -1000) {
        y *= pow2(-1000);
        k += 1000;
    }
    return y * pow2(k);
}

/* The smallest float32 >= v (v >= 0, finite); +Inf if none. */
static float f32_up(double v)
{
    float f = (float)v;
    if ((double)f < v)
        f = nextafterf(f, INFINITY);
    return f;
}

/* Whether v, the decoder's work-precision result (already rounded to
 * float32 unless out is float64), rounds to a finite value of `out`:
 * float16 overflows from 65520 (halfway past 65504), bfloat16 from
 * 0x1.FFp127 (halfway past its largest, ties to even go up).            */
static int decodes_finite(double v, int out)
{
    v = fabs(v);
    if (out == LB_F16)
        return v < 65520.0;
    if (out == LB_BF16)
        return v < 0x1.FFp127;
    return isfinite(v);
}

/* The largest code's value at scale s, as the decoder computes it. */
static double decoded_top(float s, int top, int div, int out)
{
    if (out == LB_F64)
        return (double)top * ((double)s / (double)div);
    float unit = s / (float)div;
    return (double)((float)top * unit);
}

static float f32_of_bits(uint32_t b)
{
    float f;
    memcpy(&f, &b, 4);
    return f;
}

lb_scale_cap lb_scale_cap_of(int top, int div, int out)
{
    uint32_t lo = 0, hi = 0x7F800000u;   /* scale lo decodes finite, hi not */
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (decodes_finite(decoded_top(f32_of_bits(mid), top, div, out), out))
            lo = mid;
        else
            hi = mid;
    }
    lb_scale_cap c;
    c.smax = f32_of_bits(lo);
    c.reach = decoded_top(c.smax, top, div, out) + (double)c.smax / (double)div;
    return c;
}

float lb_scale_fit(double ideal, const lb_scale_cap *cap)
{
    if (!isfinite(ideal))
        return (float)ideal;
    float f = f32_up(ideal);
    return f <= cap->smax ? f : cap->smax;
}

/* LB_ERANGE (err->index = b) when a block whose ideal scale exceeds the
 * cap holds a magnitude `amax` beyond what the capped scale represents. */
static lb_status check_reach(double ideal, double amax, const lb_scale_cap *cap,
                             uint64_t b, lb_error *err)
{
    if (ideal > (double)cap->smax && amax > cap->reach) {
        if (err)
            err->index = b;
        return LB_ERANGE;
    }
    return LB_OK;
}

static int is_out_dt(int out)
{
    return out == LB_F32 || out == LB_F64 || out == LB_F16 || out == LB_BF16;
}

/* Asks for x[from, from + m) (4-byte elements, clipped to n) to be brought
 * into cache: the element passes prefetch the next tile while they work on
 * this one, so that memory streams while they compute.  A macro: GCC drops
 * calls of a function made only of prefetches from OpenMP bodies.        */
#define LB_PREFETCH_F32(x, from, m, n)                                          \
    do {                                                                        \
        uint64_t pf_from_ = (from), pf_m_ = (m), pf_n_ = (n);                   \
        if (pf_from_ < pf_n_) {                                                 \
            if (pf_n_ - pf_from_ < pf_m_)                                       \
                pf_m_ = pf_n_ - pf_from_;                                       \
            const char *pf_p_ = (const char *)(x) + 4 * pf_from_;               \
            for (uint64_t pf_o_ = 0; pf_o_ < 4 * pf_m_; pf_o_ += 64)            \
                __builtin_prefetch(pf_p_ + pf_o_, 0, 3);                        \
        }                                                                       \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Blocks and per-block statistics                                           */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t n;        /* elements                                          */
    uint64_t B;        /* block length (n for a per-tensor block)           */
    uint64_t nblocks;  /* ceil(n / B)                                       */
    uint64_t piece;    /* statistics piece: min(B, LB_CHUNK)                */
    uint64_t ppb;      /* pieces per block                                  */
} blocks;

static blocks blocks_of(uint64_t n, uint64_t block)
{
    blocks L;
    L.n = n;
    /* a block longer than the tensor is the whole tensor: clamping keeps
     * every output byte and makes the cost follow n, not the parameter  */
    L.B = block && block < n ? block : (n ? n : 1);
    L.nblocks = lb_num_chunks(n, L.B);
    L.piece = L.B < LB_CHUNK ? L.B : LB_CHUNK;
    L.ppb = lb_num_chunks(L.B, L.piece);
    return L;
}

static uint64_t block_len(const blocks *L, uint64_t b)
{
    uint64_t s = b * L->B;
    return L->n - s < L->B ? L->n - s : L->B;
}

typedef union {
    double sum;
    uint64_t key;
} lb_stat;

#define STAT_MAXKEY (-1)

/* The STAT_MAXKEY statistic of x[s, s + m): the largest magnitude as a
 * double's bits (float32 keys widened, which keeps their order).         */
static uint64_t maxkey_stat(const lb_quant_fns *fns, const void *x, lb_dtype dt,
                            uint64_t s, uint64_t m)
{
    if (dt == LB_F32) {
        uint32_t k = m ? fns->maxkey32((const uint32_t *)x + s, m) : 0;
        float f;
        memcpy(&f, &k, 4);
        double d = f;
        uint64_t key;
        memcpy(&key, &d, 8);
        return key;
    }
    return m ? fns->maxkey64((const uint64_t *)x + s, m) : 0;
}

/* out[b] = the statistic of block b: its largest magnitude key (as a value:
 * float32 keys widened) when kind == STAT_MAXKEY, else the sum of mode
 * `kind` (LB_SUM_*) with `mu`.  Pieces are computed in parallel; sums over
 * the pieces of a block are added in order.                                */
static lb_status block_stats(const void *x, lb_dtype dt, const blocks *L,
                             int kind, double mu, int nthreads, lb_stat *out)
{
    const lb_quant_fns *fns = lb_quant();
    if (kind == STAT_MAXKEY && dt == LB_F32 && L->ppb == 1) {
        /* short float32 blocks: groups of whole blocks per call, no
         * per-block division or call                                       */
        enum { GROUP = 1024 };   /* blocks per call (a 4 KiB buffer) */
        uint64_t whole = L->n / L->B, per = LB_CHUNK / L->B;
        per = per < 1 ? 1 : per > GROUP ? GROUP : per;
        uint64_t ngroups = lb_num_chunks(whole, per);
        int team = lb_team(nthreads, L->n / LB_CHUNK);
        LB_OMP(omp parallel num_threads(team) if(team > 1))
        {
            float mx[GROUP];
            LB_OMP(omp for schedule(static))
            for (uint64_t g = 0; g < ngroups; g++) {
                uint64_t b0 = g * per, nb = whole - b0 < per ? whole - b0 : per;
                fns->blockmax32((const uint32_t *)x + b0 * L->B, nb, L->B, mx);
                for (uint64_t b = 0; b < nb; b++) {
                    double d = mx[b];
                    memcpy(&out[b0 + b].key, &d, 8);   /* ordered like the key */
                }
            }
        }
        if (whole < L->nblocks) {   /* the short last block */
            uint32_t k = fns->maxkey32((const uint32_t *)x + whole * L->B, L->n - whole * L->B);
            float f;
            memcpy(&f, &k, 4);
            double d = f;
            memcpy(&out[whole].key, &d, 8);
        }
        return LB_OK;
    }
    uint64_t npieces = L->nblocks * L->ppb;
    lb_stat *part = L->ppb > 1 ? lb_alloc_n(npieces, sizeof(lb_stat), 0) : out;
    if (!part)
        return LB_ENOMEM;
    int team = lb_team(nthreads, L->n / LB_CHUNK);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t p = 0; p < npieces; p++) {
        uint64_t b = p / L->ppb, s = b * L->B + (p % L->ppb) * L->piece;
        uint64_t e = b * L->B + block_len(L, b);
        uint64_t m = s < e ? (e - s < L->piece ? e - s : L->piece) : 0;
        lb_stat st;
        if (kind == STAT_MAXKEY) {
            st.key = maxkey_stat(fns, x, dt, s, m);
        } else {
            st.sum = m == 0 ? 0.0
                     : dt == LB_F32 ? fns->lanesum32((const float *)x + s, m, kind, mu)
                                    : fns->lanesum64((const double *)x + s, m, kind, mu);
        }
        part[p] = st;
    }
    if (L->ppb > 1) {
        for (uint64_t b = 0; b < L->nblocks; b++) {
            lb_stat acc;
            if (kind == STAT_MAXKEY) {
                acc.key = 0;
                for (uint64_t q = 0; q < L->ppb; q++)
                    if (part[b * L->ppb + q].key > acc.key)
                        acc.key = part[b * L->ppb + q].key;
            } else {
                acc.sum = 0.0;
                for (uint64_t q = 0; q < L->ppb; q++)
                    acc.sum += part[b * L->ppb + q].sum;
            }
            out[b] = acc;
        }
        free(part);
    }
    return LB_OK;
}

/* max |x| over block b, serially (for the rare blocks whose scale is
 * capped).                                                              */
static double block_absmax(const void *x, lb_dtype dt, const blocks *L, uint64_t b)
{
    const lb_quant_fns *fns = lb_quant();
    uint64_t s = b * L->B, m = block_len(L, b);
    if (!m)
        return 0.0;
    if (dt == LB_F32) {
        uint32_t k = fns->maxkey32((const uint32_t *)x + s, m);
        return (double)f32_of_bits(k);
    }
    uint64_t k = fns->maxkey64((const uint64_t *)x + s, m);
    double d;
    memcpy(&d, &k, 8);
    return d;
}

/* The absolute value held by a STAT_MAXKEY statistic (may be Inf/NaN). */
static double stat_max(lb_stat s)
{
    double d;
    memcpy(&d, &s.key, 8);
    return d;
}

/* One statistic for the whole of x (a single block). */
static lb_status tensor_stat(const void *x, lb_dtype dt, uint64_t n, int kind,
                             double mu, int nthreads, lb_stat *out)
{
    blocks L = blocks_of(n, 0);
    if (n == 0) {
        memset(out, 0, sizeof(*out));
        return LB_OK;
    }
    return block_stats(x, dt, &L, kind, mu, nthreads, out);
}

/* ------------------------------------------------------------------------ */
/* The element pass                                                          */
/* ------------------------------------------------------------------------ */

typedef struct encode_job encode_job;
/* Codes of x[i .. i + m), all in block b; rnd = their random words (or
 * NULL when the scheme is deterministic).                                  */
typedef void (*segment_fn)(const encode_job *J, uint64_t b, uint64_t i,
                           uint64_t m, const uint32_t *rnd, uint8_t *codes);

struct encode_job {
    const void *x;
    lb_dtype dt;
    uint64_t n, B;
    int bits;
    int random;           /* 1: the 32-bit stream (word i % 4 of block i / 4);
                             2: the 16-bit stream LB_SR16 of quant.h        */
    lb_philox_key key;
    segment_fn segment;
    const void *params;   /* per-block parameters of the scheme */
    double p0, p1;        /* scalar parameters of the scheme     */
    int i0, i1, i2;
    int smq_tiles;        /* float32 sign-magnitude codes whose blocks
                             tile LB_QTILE: whole blocks in one call      */
    uint8_t *out;
};

/* A job over x with the common fields set (the rest zero). */
static encode_job job_of(const void *x, lb_dtype dt, uint64_t n, uint64_t B,
                         int bits, segment_fn segment, const void *params,
                         uint8_t *out)
{
    encode_job J;
    memset(&J, 0, sizeof(J));
    J.x = x;
    J.dt = dt;
    J.n = n;
    J.B = B;
    J.bits = bits;
    J.segment = segment;
    J.params = params;
    J.out = out;
    return J;
}

static void encode_elements(const encode_job *J, int nthreads)
{
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(J->n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint8_t codes[LB_QTILE];
        uint32_t rnd[LB_QTILE];
        LB_OMP(omp for schedule(static))
        for (uint64_t c = 0; c < nchunks; c++) {
            uint64_t end = (c + 1) * LB_CHUNK < J->n ? (c + 1) * LB_CHUNK : J->n;
            for (uint64_t t = c * LB_CHUNK; t < end; t += LB_QTILE) {
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE;
                if (J->random == 2)   /* t % LB_SR16 == 0 */
                    fns->philox16(&J->key, t / LB_SR16, (m + LB_SR16 - 1) / LB_SR16, rnd);
                else if (J->random)
                    fns->philox(&J->key, t / 4, (m + 3) / 4, rnd);
                uint64_t i = t;
                if (J->smq_tiles) {
                    uint64_t nb = m / J->B;
                    fns->smqblocks32((const float *)J->x + t, nb, J->B,
                                     (const float *)J->params + t / J->B, (float)J->p0,
                                     J->i0, J->random ? rnd : NULL, codes);
                    i = t + nb * J->B;
                }
                for (; i < t + m;) {
                    uint64_t b = i / J->B;
                    uint64_t e = (b + 1) * J->B < t + m ? (b + 1) * J->B : t + m;
                    J->segment(J, b, i, e - i, J->random ? rnd + (i - t) : NULL,
                               codes + (i - t));
                    i = e;
                }
                fns->pack(codes, m, J->bits, J->out + t / 8 * (uint64_t)J->bits);
            }
        }
    }
}

/* Sign-magnitude segments: params = per-block units (float or double as
 * the input), p0 = clip, i0 = L; a zero unit gives the zero code L.       */
static void smq_segment(const encode_job *J, uint64_t b, uint64_t i, uint64_t m,
                        const uint32_t *rnd, uint8_t *codes)
{
    const lb_quant_fns *fns = lb_quant();
    if (J->dt == LB_F32) {
        float unit = ((const float *)J->params)[b];
        if (unit == 0.0f)
            memset(codes, J->i0, (size_t)m);
        else
            fns->smq32((const float *)J->x + i, m, unit, (float)J->p0, J->i0, rnd, codes);
    } else {
        double unit = ((const double *)J->params)[b];
        if (unit == 0.0)
            memset(codes, J->i0, (size_t)m);
        else
            fns->smq64((const double *)J->x + i, m, unit, J->p0, J->i0, rnd, codes);
    }
}

/* Two-level (1-bit absmax) segments: params = per-block units. */
static void twolevel_segment(const encode_job *J, uint64_t b, uint64_t i,
                             uint64_t m, const uint32_t *rnd, uint8_t *codes)
{
    const lb_quant_fns *fns = lb_quant();
    if (J->dt == LB_F32) {
        float unit = ((const float *)J->params)[b];
        if (unit == 0.0f)
            memset(codes, 1, (size_t)m);
        else
            fns->twolevel32((const float *)J->x + i, m, unit, rnd, codes);
    } else {
        double unit = ((const double *)J->params)[b];
        if (unit == 0.0)
            memset(codes, 1, (size_t)m);
        else
            fns->twolevel64((const double *)J->x + i, m, unit, rnd, codes);
    }
}

/* Per-block units in the input precision from float32 scales / div. */
static void *units_of(const float *scales, uint64_t nblocks, double div,
                      lb_dtype dt)
{
    void *u = lb_alloc_n(nblocks, dt == LB_F32 ? 4 : 8, 0);
    if (!u)
        return NULL;
    if (dt == LB_F32 && div == 1.0) {   /* x / 1 is x */
        memcpy(u, scales, (size_t)nblocks * sizeof(float));
        return u;
    }
    for (uint64_t b = 0; b < nblocks; b++) {
        if (dt == LB_F32)
            ((float *)u)[b] = scales[b] / (float)div;
        else
            ((double *)u)[b] = (double)scales[b] / div;
    }
    return u;
}

/* Runs a sign-magnitude (or two-level) element pass with float32 scales. */
static lb_status encode_smq(const void *x, uint64_t n, lb_dtype dt, uint64_t B,
                            int bits, const float *scales, uint64_t nblocks,
                            double div, double clip, int L, int twolevel,
                            int random, uint64_t seed, uint64_t step, int domain,
                            int nthreads, uint8_t *codes)
{
    void *units = units_of(scales, nblocks, div, dt);
    if (!units)
        return LB_ENOMEM;
    encode_job J = job_of(x, dt, n, B, bits, twolevel ? twolevel_segment : smq_segment,
                          units, codes);
    J.random = random;
    J.key = lb_philox_make(seed, step, domain);
    J.p0 = clip;
    J.i0 = L;
    J.smq_tiles = !twolevel && dt == LB_F32 && B <= LB_QTILE && LB_QTILE % B == 0;
    encode_elements(&J, nthreads);
    free(units);
    return LB_OK;
}

/* LB_ENONFINITE at the first bad element, or LB_ERANGE at block `b` when
 * every element is finite (a statistic overflowed).                        */
static lb_status nonfinite_or_range(const void *x, lb_dtype dt, uint64_t n,
                                    uint64_t b, lb_error *err)
{
    uint64_t bad = first_nonfinite(x, dt, n);
    if (err)
        err->index = bad < n ? bad : b;
    return bad < n ? LB_ENONFINITE : LB_ERANGE;
}

/* ------------------------------------------------------------------------ */
/* Sign                                                                      */
/* ------------------------------------------------------------------------ */

lb_status lb_sign(const void *x, uint64_t n, lb_dtype dt, int mode,
                  uint64_t block, int check_finite, int nthreads,
                  uint8_t *codes, float *scales, lb_error *err)
{
    if (!is_float_dt(dt) || mode < LB_SCALE_NONE || mode > LB_SCALE_RMS ||
        (n && (!x || !codes)) || (mode != LB_SCALE_NONE && !scales))
        return LB_EINVAL;
    blocks L = blocks_of(n, block);
    const lb_quant_fns *fns = lb_quant();
    int need_sums = mode != LB_SCALE_NONE || check_finite;
    int sum_mode = mode == LB_SCALE_RMS ? LB_SUM_SQ : LB_SUM_ABS;
    lb_stat *sums = NULL;
    if (need_sums) {
        sums = lb_alloc_n(L.nblocks, sizeof(lb_stat), 0);
        if (!sums)
            return LB_ENOMEM;
    }
    int team = lb_team(nthreads, n / LB_CHUNK);
    uint64_t npieces = L.nblocks * L.ppb;
    if (need_sums && (L.B % 8 == 0 || L.nblocks == 1)) {
        /* fused: every piece starts at a whole byte of the stream */
        lb_stat *part = L.ppb > 1 ? lb_alloc_n(npieces, sizeof(lb_stat), 0) : sums;
        if (!part) {
            free(sums);
            return LB_ENOMEM;
        }
        LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
        for (uint64_t p = 0; p < npieces; p++) {
            uint64_t b = p / L.ppb, s = b * L.B + (p % L.ppb) * L.piece;
            uint64_t e = b * L.B + block_len(&L, b);
            uint64_t m = s < e ? (e - s < L.piece ? e - s : L.piece) : 0;
            if (!m) {
                part[p].sum = 0.0;
                continue;
            }
            if (dt == LB_F32) {
                part[p].sum = fns->lanesum32((const float *)x + s, m, sum_mode, 0.0);
                fns->signbits32((const float *)x + s, m, codes + s / 8);
            } else {
                part[p].sum = fns->lanesum64((const double *)x + s, m, sum_mode, 0.0);
                fns->signbits64((const double *)x + s, m, codes + s / 8);
            }
        }
        if (L.ppb > 1) {
            for (uint64_t b = 0; b < L.nblocks; b++) {
                double acc = 0.0;
                for (uint64_t q = 0; q < L.ppb; q++)
                    acc += part[b * L.ppb + q].sum;
                sums[b].sum = acc;
            }
            free(part);
        }
    } else {
        if (need_sums) {
            lb_status st = block_stats(x, dt, &L, sum_mode, 0.0, nthreads, sums);
            if (st != LB_OK) {
                free(sums);
                return st;
            }
        }
        uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
        team = lb_team(nthreads, nchunks);
        LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
        for (uint64_t c = 0; c < nchunks; c++) {
            uint64_t s = c * LB_CHUNK, m = n - s < LB_CHUNK ? n - s : LB_CHUNK;
            if (dt == LB_F32)
                fns->signbits32((const float *)x + s, m, codes + s / 8);
            else
                fns->signbits64((const double *)x + s, m, codes + s / 8);
        }
    }
    lb_status st = LB_OK;
    for (uint64_t b = 0; b < L.nblocks && need_sums; b++) {
        double len = (double)block_len(&L, b), v = sums[b].sum;
        if (!isfinite(v) && check_finite) {
            st = nonfinite_or_range(x, dt, n, b, err);
            break;
        }
        if (mode == LB_SCALE_NONE)
            continue;
        scales[b] = (float)(mode == LB_SCALE_L1 ? v / len : sqrt(v / len));
        if (!isfinite(scales[b]) && check_finite) {
            if (err)
                err->index = b;
            st = LB_ERANGE;
            break;
        }
    }
    if (mode != LB_SCALE_NONE && block == 0 && n == 0)
        scales[0] = 0.0f;
    free(sums);
    return st;
}

/* The contract is in lowband.h: lb_sign's fused layout (pieces of whole
 * bytes), its sums recomputed from e and g, e rewritten only once every
 * scale is known to be finite.                                            */
lb_status lb_ef_sign(void *e, const void *g, uint64_t n, lb_dtype dt, double decay,
                     double scale, int mode, uint64_t block, int nthreads,
                     uint8_t *codes, float *scales, int *applied)
{
    if (!applied || (dt != LB_F32 && dt != LB_F64) ||
        (mode != LB_SCALE_L1 && mode != LB_SCALE_RMS) || (n && (!e || !g || !codes || !scales)))
        return LB_EINVAL;
    *applied = 0;
    blocks L = blocks_of(n, block);
    if (n == 0 || !(L.B % 8 == 0 || L.nblocks == 1))
        return LB_OK;
    const lb_quant_fns *fns = lb_quant();
    int sum_mode = mode == LB_SCALE_RMS ? LB_SUM_SQ : LB_SUM_ABS;
    uint64_t npieces = L.nblocks * L.ppb;
    double *part = lb_alloc_n(npieces, sizeof(double), 0);
    if (!part)
        return LB_ENOMEM;
    int team = lb_team(nthreads, n / LB_CHUNK);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t p = 0; p < npieces; p++) {
        uint64_t b = p / L.ppb, s = b * L.B + (p % L.ppb) * L.piece;
        uint64_t end = b * L.B + block_len(&L, b);
        uint64_t m = s < end ? (end - s < L.piece ? end - s : L.piece) : 0;
        if (!m)
            part[p] = 0.0;
        else if (dt == LB_F32)
            part[p] = fns->efsum32((const float *)e + s, (const float *)g + s, m,
                                   (float)decay, (float)scale, sum_mode);
        else
            part[p] = fns->efsum64((const double *)e + s, (const double *)g + s, m, decay,
                                   scale, sum_mode);
    }
    int ok = 1;
    for (uint64_t b = 0; b < L.nblocks && ok; b++) {
        double v = part[b * L.ppb];
        if (L.ppb > 1) {   /* as lb_sign: pieces added in order from 0.0 */
            v = 0.0;
            for (uint64_t q = 0; q < L.ppb; q++)
                v += part[b * L.ppb + q];
        }
        double len = (double)block_len(&L, b);
        if (!isfinite(v))
            ok = 0;
        else
            scales[b] = (float)(mode == LB_SCALE_L1 ? v / len : sqrt(v / len));
        if (ok && !isfinite(scales[b]))
            ok = 0;
    }
    free(part);
    if (!ok)
        return LB_OK;
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t p = 0; p < npieces; p++) {
        uint64_t b = p / L.ppb, s = b * L.B + (p % L.ppb) * L.piece;
        uint64_t end = b * L.B + block_len(&L, b);
        uint64_t m = s < end ? (end - s < L.piece ? end - s : L.piece) : 0;
        if (!m)
            continue;
        if (dt == LB_F32)
            fns->efsign32((float *)e + s, (const float *)g + s, m, (float)decay,
                          (float)scale, scales[b], codes + s / 8);
        else
            fns->efsign64((double *)e + s, (const double *)g + s, m, decay, scale,
                          (double)scales[b], codes + s / 8);
    }
    *applied = 1;
    return LB_OK;
}

/* ------------------------------------------------------------------------ */
/* Blockwise absmax                                                          */
/* ------------------------------------------------------------------------ */

/* Per-block absmax statistics; checks finiteness.  *maxv[b] = absmax.     */
static lb_status absmax_blocks(const void *x, uint64_t n, lb_dtype dt,
                               const blocks *L, int check_finite, int nthreads,
                               double **maxv, lb_error *err)
{
    lb_stat *st = lb_alloc_n(L->nblocks, sizeof(lb_stat), 0);
    if (!st)
        return LB_ENOMEM;
    lb_status s = block_stats(x, dt, L, STAT_MAXKEY, 0.0, nthreads, st);
    if (s != LB_OK) {
        free(st);
        return s;
    }
    double *v = (double *)st;   /* same storage, read before written */
    for (uint64_t b = 0; b < L->nblocks; b++) {
        v[b] = stat_max(st[b]);
        if (!isfinite(v[b]) && check_finite) {
            free(st);
            return nonfinite_or_range(x, dt, n, b, err);
        }
    }
    *maxv = v;
    return LB_OK;
}

/* lb_quantize for float32 input, bits >= 2 and blocks that tile LB_QTILE,
 * in one pass: each tile's block maxima, scales (into `scales`), random
 * words (the 16-bit stream), codes and packed bytes while the tile is in
 * cache.  *bad_nf = the first block with a non-finite maximum, *bad_reach
 * = the first whose capped scale misses its maximum (check_reach), each
 * UINT64_MAX when none.                                                    */
static void quantize_fused32(const float *x, uint64_t n, uint64_t B, int bits, int Q,
                             const lb_scale_cap *cap, int stochastic, lb_philox_key key,
                             int nthreads, uint8_t *codes, float *scales,
                             uint64_t *bad_nf, uint64_t *bad_reach)
{
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK), nf = UINT64_MAX, reach = UINT64_MAX;
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint8_t cbuf[LB_QTILE];
        uint32_t rnd[LB_QTILE];
        float mx[LB_QTILE];
        LB_OMP(omp for schedule(static) reduction(min:nf, reach))
        for (uint64_t c = 0; c < nchunks; c++) {
            uint64_t end = (c + 1) * LB_CHUNK < n ? (c + 1) * LB_CHUNK : n;
            for (uint64_t t = c * LB_CHUNK; t < end; t += LB_QTILE) {
                /* tiles start at whole blocks: B divides LB_QTILE */
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE;
                uint64_t nb = m / B, rest = m - nb * B, b0 = t / B;
                fns->blockmax32((const uint32_t *)x + t, nb, B, mx);
                if (rest) {
                    uint32_t k = fns->maxkey32((const uint32_t *)x + t + nb * B, rest);
                    memcpy(mx + nb, &k, 4);
                }
                uint64_t nbt = nb + (rest != 0);
                float *sc = scales + b0;
                fns->scalefit32(mx, nbt, Q, cap->smax, sc);
                for (uint64_t b = 0; b < nbt; b++) {
                    if (sc[b] < cap->smax)   /* the usual case: nothing to check */
                        continue;
                    double v = mx[b];
                    if (!isfinite(v))
                        nf = b0 + b < nf ? b0 + b : nf;
                    else if (v / Q > (double)cap->smax && v > cap->reach)
                        reach = b0 + b < reach ? b0 + b : reach;
                }
                if (stochastic)   /* t % LB_SR16 == 0 */
                    fns->philox16(&key, t / LB_SR16, (m + LB_SR16 - 1) / LB_SR16, rnd);
                const uint32_t *r = stochastic ? rnd : NULL;
                /* codes in steps of about 256 elements, each prefetching as
                 * much of the next tile                                     */
                uint64_t per = B < 256 ? 256 / B : 1;
                for (uint64_t b = 0; b < nb; b += per) {
                    uint64_t k = nb - b < per ? nb - b : per;
                    LB_PREFETCH_F32(x, t + LB_QTILE + b * B, k * B, n);
                    fns->smqblocks32(x + t + b * B, k, B, sc + b, INFINITY, Q,
                                     r ? r + b * B : NULL, cbuf + b * B);
                }
                if (rest) {
                    if (sc[nb] == 0.0f)
                        memset(cbuf + nb * B, Q, (size_t)rest);
                    else
                        fns->smq32(x + t + nb * B, rest, sc[nb], INFINITY, Q,
                                   r ? r + nb * B : NULL, cbuf + nb * B);
                }
                fns->pack(cbuf, m, bits, codes + t / 8 * (uint64_t)bits);
            }
        }
    }
    *bad_nf = nf;
    *bad_reach = reach;
}

lb_status lb_quantize(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                      int bits, uint64_t block, int stochastic, uint64_t seed,
                      uint64_t step, int check_finite, int nthreads,
                      uint8_t *codes, float *scales, lb_error *err)
{
    if (!is_float_dt(dt) || !is_out_dt(out_dt) || (n && (!x || !codes || !scales)) ||
        !(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8) ||
        step >= LB_MAX_STEP)
        return LB_EINVAL;
    blocks L = blocks_of(n, block);
    int Q = bits == 1 ? 1 : (1 << (bits - 1)) - 1;
    lb_scale_cap cap = lb_scale_cap_of(Q, 1, out_dt);
    if (n && dt == LB_F32 && bits >= 2 && L.B <= LB_QTILE && LB_QTILE % L.B == 0) {
        uint64_t nf, reach;
        quantize_fused32((const float *)x, n, L.B, bits, Q, &cap, stochastic,
                         lb_philox_make(seed, step, LB_DOMAIN_STOCHASTIC_ROUND), nthreads,
                         codes, scales, &nf, &reach);
        if (check_finite && nf != UINT64_MAX)
            return nonfinite_or_range(x, dt, n, nf, err);
        if (check_finite && reach != UINT64_MAX) {
            if (err)
                err->index = reach;
            return LB_ERANGE;
        }
        return LB_OK;
    }
    double *maxv = NULL;
    lb_status st = absmax_blocks(x, n, dt, &L, check_finite, nthreads, &maxv, err);
    if (st != LB_OK)
        return st;
    int team = lb_team(nthreads, L.n / LB_CHUNK);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t b = 0; b < L.nblocks; b++)
        scales[b] = lb_scale_fit(maxv[b] / Q, &cap);
    for (uint64_t b = 0; check_finite && b < L.nblocks; b++) {
        /* only a capped (or non-finite) scale can miss its block's reach */
        if (!(scales[b] < cap.smax) &&
            (st = check_reach(maxv[b] / Q, maxv[b], &cap, b, err)) != LB_OK) {
            free(maxv);
            return st;
        }
    }
    if (block == 0 && n == 0)
        scales[0] = 0.0f;
    free(maxv);
    return encode_smq(x, n, dt, L.B, bits, scales, L.nblocks, 1.0, INFINITY, Q,
                      bits == 1, stochastic ? 2 : 0, seed, step,
                      LB_DOMAIN_STOCHASTIC_ROUND, nthreads, codes);
}

/* ------------------------------------------------------------------------ */
/* QSGD and TernGrad                                                         */
/* ------------------------------------------------------------------------ */

int lb_qsgd_bits(uint64_t levels)
{
    int bits = 1;
    while (((uint64_t)1 << bits) < 2 * levels + 1)
        bits++;
    return bits;
}

lb_status lb_qsgd(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                  uint64_t levels, uint64_t block, uint64_t seed, uint64_t step,
                  int check_finite, int nthreads, uint8_t *codes, float *norms,
                  lb_error *err)
{
    if (!is_float_dt(dt) || !is_out_dt(out_dt) || (n && (!x || !codes || !norms)) ||
        levels < 1 || levels > 127 || step >= LB_MAX_STEP)
        return LB_EINVAL;
    blocks L = blocks_of(n, block);
    lb_stat *sums = lb_alloc_n(L.nblocks, sizeof(lb_stat), 0);
    if (!sums)
        return LB_ENOMEM;
    lb_status st = block_stats(x, dt, &L, LB_SUM_SQ, 0.0, nthreads, sums);
    lb_scale_cap cap = lb_scale_cap_of((int)levels, (int)levels, out_dt);
    for (uint64_t b = 0; b < L.nblocks && st == LB_OK; b++) {
        double v = sqrt(sums[b].sum);
        norms[b] = lb_scale_fit(v, &cap);
        if (!check_finite)
            continue;
        if (!isfinite(v))
            st = nonfinite_or_range(x, dt, n, b, err);
        else if (v > (double)cap.smax)   /* capped: does the block fit? */
            st = check_reach(v, block_absmax(x, dt, &L, b), &cap, b, err);
    }
    free(sums);
    if (st != LB_OK)
        return st;
    if (block == 0 && n == 0)
        norms[0] = 0.0f;
    return encode_smq(x, n, dt, L.B, lb_qsgd_bits(levels), norms, L.nblocks,
                      (double)levels, INFINITY, (int)levels, 0, 1, seed, step,
                      LB_DOMAIN_QSGD, nthreads, codes);
}

lb_status lb_terngrad(const void *x, uint64_t n, lb_dtype dt, double clip,
                      uint64_t seed, uint64_t step, int check_finite,
                      int nthreads, uint8_t *codes, float *scale, lb_error *err)
{
    if (!is_float_dt(dt) || (n && (!x || !codes)) || !scale || isnan(clip) ||
        step >= LB_MAX_STEP)
        return LB_EINVAL;
    lb_stat sum, dev, mx;
    lb_status st = tensor_stat(x, dt, n, LB_SUM_RAW, 0.0, nthreads, &sum);
    if (st != LB_OK)
        return st;
    if (!isfinite(sum.sum) && check_finite)
        return nonfinite_or_range(x, dt, n, 0, err);
    double mu = n ? sum.sum / (double)n : 0.0;
    double c = INFINITY;
    if (clip > 0) {
        if ((st = tensor_stat(x, dt, n, LB_SUM_DEV2, mu, nthreads, &dev)) != LB_OK)
            return st;
        c = clip * sqrt(n ? dev.sum / (double)n : 0.0);
        if (dt == LB_F32)
            c = (float)c;
    }
    if ((st = tensor_stat(x, dt, n, STAT_MAXKEY, 0.0, nthreads, &mx)) != LB_OK)
        return st;
    double amax = stat_max(mx), s = amax < c ? amax : c;
    lb_scale_cap cap = lb_scale_cap_of(1, 1, LB_F64);
    *scale = lb_scale_fit(s, &cap);
    if (!isfinite(*scale) && check_finite)
        return nonfinite_or_range(x, dt, n, 0, err);
    if (check_finite && (st = check_reach(s, s, &cap, 0, err)) != LB_OK)
        return st;
    return encode_smq(x, n, dt, n ? n : 1, 2, scale, 1, 1.0, c, 1, 0, 1, seed,
                      step, LB_DOMAIN_TERNGRAD, nthreads, codes);
}

/* ------------------------------------------------------------------------ */
/* Natural compression                                                       */
/* ------------------------------------------------------------------------ */

/* floor(log2 y) of a positive finite double (subnormals included). */
static int floor_log2(double y)
{
    int e;
    frexp(y, &e);
    return e - 1;
}

static uint8_t natural_code(double v, int top, uint32_t word)
{
    double y = fabs(v);
    if (y == 0.0)
        return 0;
    int lo = top - 126;
    uint64_t bits;
    memcpy(&bits, &y, 8);
    int e = (int)(bits >> 52) - 1023;   /* subnormals: -1023 < lo */
    uint32_t u = word >> 8;
    int field;
    if (e < lo) {   /* 0 or 2^lo, with probability y / 2^lo of the latter */
        field = (double)u < scale2(y, 24 - lo) ? 1 : 0;
    } else {
        uint64_t mant = bits & (((uint64_t)1 << 52) - 1);
        int up = ((uint64_t)u << 28) < mant;
        int ee = e + up > top ? top : e + up;
        field = ee - lo + 1;
    }
    return field ? (uint8_t)(field | (v < 0 ? 0x80 : 0)) : 0;
}

static void natural_segment(const encode_job *J, uint64_t b, uint64_t i,
                            uint64_t m, const uint32_t *rnd, uint8_t *codes)
{
    for (uint64_t j = 0; j < m; j++)
        codes[j] = natural_code(value_at(J->x, J->dt, i + j), J->i0, rnd[j]);
}

lb_status lb_natural(const void *x, uint64_t n, lb_dtype dt, int emax,
                     uint64_t seed, uint64_t step, int check_finite,
                     int nthreads, uint8_t *codes, int16_t *top, lb_error *err)
{
    if (!is_float_dt(dt) || (n && (!x || !codes)) || !top || emax < -896 ||
        emax > 1023 || step >= LB_MAX_STEP)
        return LB_EINVAL;
    lb_stat mx;
    lb_status st = tensor_stat(x, dt, n, STAT_MAXKEY, 0.0, nthreads, &mx);
    if (st != LB_OK)
        return st;
    double amax = stat_max(mx);
    if (!isfinite(amax) && check_finite)
        return nonfinite_or_range(x, dt, n, 0, err);
    int t = 0;
    if (amax > 0)
        t = isfinite(amax) ? floor_log2(amax) + 1 : emax;
    t = t > emax ? emax : t;
    t = t < -896 ? -896 : t;
    *top = (int16_t)t;
    encode_job J = job_of(x, dt, n, n ? n : 1, 8, natural_segment, NULL, codes);
    J.random = 1;
    J.key = lb_philox_make(seed, step, LB_DOMAIN_NATURAL);
    J.i0 = t;
    encode_elements(&J, nthreads);
    return LB_OK;
}

/* ------------------------------------------------------------------------ */
/* Minifloat                                                                 */
/* ------------------------------------------------------------------------ */

/* Magnitude code of y >= 0 (already divided by the block scale): round to
 * nearest, ties to even significand, saturating at cmax (NaN too).        */
static int minifloat_mag(double y, int E, int M)
{
    int bias = (1 << E) - 1, pmin = 1 - bias, cmax = (1 << (E + M)) - 1;
    double maxval = 2.0 - pow2(-M);
    if (!(y < maxval))
        return cmax;
    int p = y > 0 ? floor_log2(y) : pmin;
    p = p < pmin ? pmin : p;
    int mag = ((p - pmin) << M) + (int)rint(y * pow2(M - p));
    return mag > cmax ? cmax : mag;
}

static void minifloat_segment(const encode_job *J, uint64_t b, uint64_t i,
                              uint64_t m, const uint32_t *rnd, uint8_t *codes)
{
    int E = J->i0, M = J->i1, k = ((const int8_t *)J->params)[b];
    double inv = pow2(-k);
    if (J->dt == LB_F64 || k < 127) {   /* inv is a normal number: the leaf kernel */
        if (J->dt == LB_F32)
            lb_quant()->minifloat32((const float *)J->x + i, m, (float)inv, E, M, codes);
        else
            lb_quant()->minifloat64((const double *)J->x + i, m, inv, E, M, codes);
        return;
    }
    for (uint64_t j = 0; j < m; j++) {
        double v = value_at(J->x, J->dt, i + j);
        int mag = minifloat_mag(fabs(v) * inv, E, M);
        codes[j] = (uint8_t)(mag && v < 0 ? mag | (1 << (E + M)) : mag);
    }
}

/* The block exponent k of a block whose largest magnitude is maxv: the
 * smallest k with maxv <= (2 - 2^-M) * 2^k, clamped to [-127, kmax]; kmax
 * for an infinite maximum, 0 for a zero or NaN one.                        */
static int8_t minifloat_exp(double maxv, int man_bits, int kmax)
{
    int k = 0;
    if (maxv > 0 && isfinite(maxv)) {
        int p;
        double f = frexp(maxv, &p);
        k = f <= 1.0 - pow2(-(man_bits + 1)) ? p - 1 : p;
    } else if (maxv > 0) {
        k = kmax;
    }
    k = k > kmax ? kmax : (k < -127 ? -127 : k);
    return (int8_t)k;
}

/* Blocks that tile LB_QTILE exactly, in one pass: each tile's block maxima
 * and exponents, then its codes, while the tile is in cache.  Returns the
 * first block with a non-finite maximum or one >= 2^(kmax+1) (beyond what
 * the largest exponent represents), or UINT64_MAX.                         */
static uint64_t minifloat_fused(const encode_job *J, int man_bits, int kmax,
                                int8_t *exps, int nthreads)
{
    const lb_quant_fns *fns = lb_quant();
    const double limit = pow2(kmax + 1);   /* twice the largest 2^kmax reaches */
    uint64_t nchunks = lb_num_chunks(J->n, LB_CHUNK), bad = UINT64_MAX;
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint8_t codes[LB_QTILE];
        float mx[LB_QTILE];
        LB_OMP(omp for schedule(static) reduction(min:bad))
        for (uint64_t c = 0; c < nchunks; c++) {
            uint64_t end = (c + 1) * LB_CHUNK < J->n ? (c + 1) * LB_CHUNK : J->n;
            for (uint64_t t = c * LB_CHUNK; t < end; t += LB_QTILE) {
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE, whole = 0, i = t;
                if (J->dt == LB_F32) {
                    /* the tile's whole blocks: maxima in one call, exponents,
                     * then codes in steps of about 256 elements, each
                     * prefetching as much of the next tile                  */
                    whole = m / J->B;
                    fns->blockmax32((const uint32_t *)J->x + t, whole, J->B, mx);
                    uint64_t b0 = t / J->B;
                    int k127 = 0;
                    for (uint64_t b = 0; b < whole; b++) {
                        if (!(mx[b] < limit) && b0 + b < bad)   /* non-finite or out of reach */
                            bad = b0 + b;
                        exps[b0 + b] = minifloat_exp(mx[b], man_bits, kmax);
                        k127 |= exps[b0 + b] == 127;
                    }
                    if (!k127) {   /* every 2^-k a normal float */
                        uint64_t per = J->B < 256 ? 256 / J->B : 1;
                        for (uint64_t b = 0; b < whole; b += per) {
                            uint64_t k = whole - b < per ? whole - b : per;
                            LB_PREFETCH_F32(J->x, t + LB_QTILE + b * J->B, k * J->B, J->n);
                            fns->minifloatblocks32((const float *)J->x + t + b * J->B, k, J->B,
                                                   exps + b0 + b, J->i0, J->i1,
                                                   codes + b * J->B);
                        }
                    } else {
                        for (uint64_t b = 0; b < whole; b++)
                            J->segment(J, b0 + b, t + b * J->B, J->B, NULL, codes + b * J->B);
                    }
                    i = t + whole * J->B;
                }
                for (; i < t + m; i += J->B) {   /* float64, or the short last block */
                    uint64_t b = i / J->B, len = t + m - i < J->B ? t + m - i : J->B;
                    lb_stat st;
                    st.key = maxkey_stat(fns, J->x, J->dt, i, len);
                    double maxv = stat_max(st);
                    if (!(maxv < limit) && b < bad)   /* non-finite or out of reach */
                        bad = b;
                    exps[b] = minifloat_exp(maxv, man_bits, kmax);
                    J->segment(J, b, i, len, NULL, codes + (i - t));
                }
                fns->pack(codes, m, J->bits, J->out + t / 8 * (uint64_t)J->bits);
            }
        }
    }
    return bad;
}

lb_status lb_minifloat(const void *x, uint64_t n, lb_dtype dt, int exp_bits,
                       int man_bits, uint64_t block, int kmax,
                       int check_finite, int nthreads, uint8_t *codes,
                       int8_t *exps, lb_error *err)
{
    if (!is_float_dt(dt) || (n && (!x || !codes || !exps)) || exp_bits < 1 ||
        exp_bits > 5 || man_bits < 0 || man_bits > 3 || exp_bits + man_bits > 7 ||
        kmax < -127 || kmax > 127)
        return LB_EINVAL;
    blocks L = blocks_of(n, block);
    encode_job J = job_of(x, dt, n, L.B, 1 + exp_bits + man_bits, minifloat_segment,
                          exps, codes);
    J.i0 = exp_bits;
    J.i1 = man_bits;
    if (n && L.B <= LB_QTILE && LB_QTILE % L.B == 0) {
        uint64_t bad = minifloat_fused(&J, man_bits, kmax, exps, nthreads);
        if (bad != UINT64_MAX && check_finite)
            return nonfinite_or_range(x, dt, n, bad, err);
        return LB_OK;
    }
    double *maxv = NULL;
    lb_status st = absmax_blocks(x, n, dt, &L, check_finite, nthreads, &maxv, err);
    if (st != LB_OK)
        return st;
    for (uint64_t b = 0; b < L.nblocks; b++) {
        if (check_finite && maxv[b] >= pow2(kmax + 1)) {
            /* beyond twice the largest value 2^kmax can scale to */
            free(maxv);
            if (err)
                err->index = b;
            return LB_ERANGE;
        }
        exps[b] = minifloat_exp(maxv[b], man_bits, kmax);
    }
    free(maxv);
    if (block == 0 && n == 0)
        exps[0] = 0;
    encode_elements(&J, nthreads);
    return LB_OK;
}

/* ------------------------------------------------------------------------ */
/* SparseLoCo's 2-bit table                                                  */
/* ------------------------------------------------------------------------ */

static int lut2bit_code(double v, double mu, double w)
{
    if (!(w > 0))
        return 2;
    double q = rint((v - mu) / w + 2.0);
    q = q >= 0 ? q : 0;   /* NaN -> 0 */
    return (int)(q <= 3 ? q : 3);
}

lb_status lb_lut2bit(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                     int check_finite, int nthreads, uint8_t *codes,
                     float table[4], lb_error *err)
{
    if (!is_float_dt(dt) || !is_out_dt(out_dt) || (n && (!x || !codes)) || !table)
        return LB_EINVAL;
    lb_stat sum, dev;
    lb_status st = tensor_stat(x, dt, n, LB_SUM_RAW, 0.0, nthreads, &sum);
    if (st != LB_OK)
        return st;
    if (!isfinite(sum.sum) && check_finite)
        return nonfinite_or_range(x, dt, n, 0, err);
    double mu = n ? sum.sum / (double)n : 0.0;
    if ((st = tensor_stat(x, dt, n, LB_SUM_DEV2, mu, nthreads, &dev)) != LB_OK)
        return st;
    double w = 1.5 * sqrt(n > 1 ? dev.sum / (double)(n - 1) : 0.0);
    /* codes and per-chunk bin sums, combined in chunk order */
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    double *part = lb_alloc_n(nchunks, 8 * sizeof(double), 1);
    if (!part)
        return LB_ENOMEM;
    const lb_quant_fns *fns = lb_quant();
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint8_t tile[LB_QTILE];
        LB_OMP(omp for schedule(static))
        for (uint64_t c = 0; c < nchunks; c++) {
            uint64_t end = (c + 1) * LB_CHUNK < n ? (c + 1) * LB_CHUNK : n;
            double *bin = part + 8 * c;   /* sums [0..4), counts [4..8) */
            for (uint64_t t = c * LB_CHUNK; t < end; t += LB_QTILE) {
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE;
                for (uint64_t j = 0; j < m; j++) {
                    double v = value_at(x, dt, t + j);
                    int q = lut2bit_code(v, mu, w);
                    tile[j] = (uint8_t)q;
                    bin[q] += v - mu;
                    bin[4 + q] += 1.0;
                }
                fns->pack(tile, m, 2, codes + t / 4);
            }
        }
    }
    /* entries are limited to +-lim so that each decodes finite; an empty
     * bin's entry (never decoded) just moves, a bin mean beyond lim
     * cannot be represented                                              */
    double lim = lb_scale_cap_of(1, 1, out_dt).smax;
    lb_status res = LB_OK;
    for (int j = 0; j < 4; j++) {
        double s = 0.0, cnt = 0.0;
        for (uint64_t c = 0; c < nchunks; c++) {
            s += part[8 * c + j];
            cnt += part[8 * c + 4 + j];
        }
        double v = cnt > 0 ? (double)(float)(mu + s / cnt) : (double)(float)(mu + (j - 2) * w);
        if (cnt > 0 && fabs(v) > lim && check_finite && res == LB_OK) {
            if (err)
                err->index = 0;
            res = LB_ERANGE;
        }
        table[j] = (float)(v > lim ? lim : (v < -lim ? -lim : v));
    }
    free(part);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Decoding                                                                  */
/* ------------------------------------------------------------------------ */

/* The decoding loop shared by lb_table_decode (out = D) and
 * lb_table_subtract (out = out - D): D is computed by the lookup leaf in the
 * output precision (float32 for float32/float16), then stored or
 * subtracted (float16 outputs only store).                                 */
static lb_status table_decode(const uint8_t *codes, uint64_t n, int bits,
                              const void *table, const void *mult,
                              uint64_t block, lb_dtype out_dt, void *out,
                              int subtract, int nthreads)
{
    if (bits < 1 || bits > 8 || !table ||
        !(out_dt == LB_F32 || out_dt == LB_F64 || (out_dt == LB_F16 && !subtract)) ||
        (n && (!codes || !out)))
        return LB_EINVAL;
    uint64_t B = block ? block : (n ? n : 1);
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        uint8_t c[LB_QTILE];
        float f[LB_QTILE];
        double d[LB_QTILE];
        LB_OMP(omp for schedule(static))
        for (uint64_t k = 0; k < nchunks; k++) {
            uint64_t end = (k + 1) * LB_CHUNK < n ? (k + 1) * LB_CHUNK : n;
            for (uint64_t t = k * LB_CHUNK; t < end; t += LB_QTILE) {
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE;
                fns->unpack(codes + t / 8 * (uint64_t)bits, m, bits, c);
                for (uint64_t i = t; i < t + m;) {
                    uint64_t b = i / B;
                    uint64_t e = (b + 1) * B < t + m ? (b + 1) * B : t + m;
                    if (out_dt == LB_F64)
                        fns->lookup64(c + (i - t), e - i, table,
                                      mult ? ((const double *)mult)[b] : 1.0,
                                      subtract ? d + (i - t) : (double *)out + i);
                    else
                        fns->lookup32(c + (i - t), e - i, table,
                                      mult ? ((const float *)mult)[b] : 1.0f,
                                      out_dt == LB_F32 && !subtract ? (float *)out + i
                                                                    : f + (i - t));
                    i = e;
                }
                if (out_dt == LB_F16) {
                    fns->f32_to_f16(f, m, (uint16_t *)out + t);
                } else if (subtract && out_dt == LB_F32) {
                    float *o = (float *)out + t;
                    for (uint64_t j = 0; j < m; j++)
                        o[j] = o[j] - f[j];
                } else if (subtract) {
                    double *o = (double *)out + t;
                    for (uint64_t j = 0; j < m; j++)
                        o[j] = o[j] - d[j];
                }
            }
        }
    }
    return LB_OK;
}

lb_status lb_table_decode(const uint8_t *codes, uint64_t n, int bits,
                          const void *table, const void *mult, uint64_t block,
                          lb_dtype out_dt, void *out, int nthreads)
{
    return table_decode(codes, n, bits, table, mult, block, out_dt, out, 0, nthreads);
}

lb_status lb_table_subtract(const uint8_t *codes, uint64_t n, int bits,
                            const void *table, const void *mult, uint64_t block,
                            lb_dtype dt, void *e, int nthreads)
{
    return table_decode(codes, n, bits, table, mult, block, dt, e, 1, nthreads);
}

/* ------------------------------------------------------------------------ */
/* float16 / bfloat16                                                        */
/* ------------------------------------------------------------------------ */

/* float32 bits rounded to odd from a double (keeps enough information for
 * one correct rounding to 16-bit formats); NaN -> a quiet float NaN.      */
static uint32_t f64_to_f32_odd(double d)
{
    float f = (float)d;
    uint32_t b;
    memcpy(&b, &f, 4);
    if (isnan(d) || (double)f == d)
        return b;
    if (fabs((double)f) > fabs(d))
        b -= 1;   /* truncate toward zero (also Inf -> FLT_MAX) */
    return b | 1u;
}

static inline uint16_t f32_to_bf16_bits(uint32_t b)
{
    if ((b & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

lb_status lb_narrow(const void *x, uint64_t n, lb_dtype dt, lb_dtype to,
                    int check_finite, int nthreads, uint16_t *out, lb_error *err)
{
    if (!is_float_dt(dt) || !(to == LB_F16 || to == LB_BF16) || (n && (!x || !out)))
        return LB_EINVAL;
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    uint16_t inf = to == LB_F16 ? 0x7C00u : 0x7F80u;
    uint64_t bad = UINT64_MAX;
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        float tmp[LB_QTILE];
        LB_OMP(omp for schedule(static) reduction(min:bad))
        for (uint64_t k = 0; k < nchunks; k++) {
            uint64_t end = (k + 1) * LB_CHUNK < n ? (k + 1) * LB_CHUNK : n;
            for (uint64_t t = k * LB_CHUNK; t < end; t += LB_QTILE) {
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE;
                const float *src = (const float *)x + t;
                if (dt == LB_F64) {
                    for (uint64_t j = 0; j < m; j++) {
                        uint32_t b = f64_to_f32_odd(((const double *)x)[t + j]);
                        memcpy(tmp + j, &b, 4);
                    }
                    src = tmp;
                }
                if (to == LB_F16) {
                    fns->f32_to_f16(src, m, out + t);
                } else {
                    for (uint64_t j = 0; j < m; j++) {
                        uint32_t b;
                        memcpy(&b, src + j, 4);
                        out[t + j] = f32_to_bf16_bits(b);
                    }
                }
                if (check_finite && bad == UINT64_MAX)
                    for (uint64_t j = 0; j < m; j++)
                        if ((out[t + j] & 0x7FFFu) >= inf) {
                            bad = t + j;
                            break;
                        }
            }
        }
    }
    if (bad != UINT64_MAX) {
        if (err)
            err->index = bad;
        return isfinite(value_at(x, dt, bad)) ? LB_ERANGE : LB_ENONFINITE;
    }
    return LB_OK;
}

lb_status lb_widen(const uint16_t *x, uint64_t n, lb_dtype from,
                   lb_dtype out_dt, void *out, int nthreads)
{
    if (!(from == LB_F16 || from == LB_BF16) ||
        !(out_dt == LB_F32 || out_dt == LB_F64 || out_dt == LB_F16) ||
        (n && (!x || !out)))
        return LB_EINVAL;
    if (from == LB_F16 && out_dt == LB_F16) {
        if (n)
            memcpy(out, x, (size_t)n * 2);
        return LB_OK;
    }
    const lb_quant_fns *fns = lb_quant();
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel num_threads(team) if(team > 1))
    {
        float tmp[LB_QTILE];
        LB_OMP(omp for schedule(static))
        for (uint64_t k = 0; k < nchunks; k++) {
            uint64_t end = (k + 1) * LB_CHUNK < n ? (k + 1) * LB_CHUNK : n;
            for (uint64_t t = k * LB_CHUNK; t < end; t += LB_QTILE) {
                uint64_t m = end - t < LB_QTILE ? end - t : LB_QTILE;
                float *dst = out_dt == LB_F32 ? (float *)out + t : tmp;
                if (from == LB_F16) {
                    fns->f16_to_f32(x + t, m, dst);
                } else {
                    for (uint64_t j = 0; j < m; j++) {
                        uint32_t b = (uint32_t)x[t + j] << 16;
                        memcpy(dst + j, &b, 4);
                    }
                }
                if (out_dt == LB_F64)
                    for (uint64_t j = 0; j < m; j++)
                        ((double *)out)[t + j] = tmp[j];
                else if (out_dt == LB_F16)
                    fns->f32_to_f16(tmp, m, (uint16_t *)out + t);
            }
        }
    }
    return LB_OK;
}
