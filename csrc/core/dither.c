/*
 * dither.c - random dithering with linear levels (QSGD-style, Alistarh et
 * al. 2017) or natural levels (powers of two, Horvath et al. 2019,
 * "Natural Compression for Distributed Deep Learning"), with an
 * Elias-gamma coded bit stream.
 *
 * r_i = |x_i| / norm in [0, 1] (norm: max |x| or ||x||_2, float32 rounded
 * up, lowered to the largest float32 that decodes finite when above it:
 * r_i = min(|x_i| / norm, 1)).  Levels, for s = `levels`:
 *   linear   l_m = m / s,            m = 0 .. s
 *   natural  l_0 = 0, l_m = 2^(m-s), m = 1 .. s
 * r is rounded to one of its two neighbouring levels l_a <= r <= l_{a+1},
 * up with probability (r - l_a) / (l_{a+1} - l_a), so E[l_m] = r (unbiased).
 * The 24-bit uniform of element i is the top 24 bits of Philox word i % 4
 * of block i / 4 (domain LB_DOMAIN_DITHER); "up" when u24 < p * 2^24.
 *
 * Stream: per element, the Elias-gamma code of m + 1 (floor(log2(m+1))
 * zero bits, then m + 1 in binary from its top bit), then, when m > 0, one
 * sign bit (1 for x < 0).  Stream bits are LSB first within bytes; spare
 * bits of the last byte are zero.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "quant.h"
#include "rng.h"
#include "scratch.h"
#include "threads.h"

#define DITHER_TILE 2048
#define DITHER_PEEK 12

/* Level index of r in [0, 1] (see the file comment).  Natural levels read
 * floor(log2 r) and the fraction r / 2^a - 1 straight from the bits of r
 * (exact, as frexp/ldexp would give).                                    */
static inline unsigned level_of(double r, unsigned s, int natural, uint32_t u24)
{
    double t;
    unsigned lo;
    if (r <= 0.0)
        return 0;
    if (r >= 1.0)
        return s;
    if (!natural) {
        double v = r * (double)s, f = floor(v);
        lo = (unsigned)f;
        t = v - f;
    } else {
        uint64_t bits;
        memcpy(&bits, &r, 8);
        int a = (int)((bits >> 52) & 0x7FF) - 1023;   /* subnormal r: -1023 */
        if (a < 1 - (int)s) {         /* below the smallest level 2^(1-s) */
            lo = 0;
            t = ldexp(r, (int)s - 1);
        } else {
            uint64_t fb = (bits & 0xFFFFFFFFFFFFFull) | ((uint64_t)1023 << 52);
            memcpy(&t, &fb, 8);
            t -= 1.0;
            lo = (unsigned)(a + (int)s);
        }
    }
    unsigned m = lo + ((double)u24 < t * 16777216.0);
    return m > s ? s : m;
}

static unsigned gamma_len(unsigned v)   /* v >= 1 */
{
    unsigned b = 0;
    while (v >> (b + 1))
        b++;
    return 2 * b + 1;
}

typedef struct {
    uint8_t *buf;
    uint64_t acc;
    int nacc;
    uint64_t pos;
} bitw;

static void put_bits(bitw *w, uint64_t v, int nb)   /* nb <= 32, LSB first */
{
    w->acc |= v << w->nacc;
    w->nacc += nb;
    while (w->nacc >= 8) {
        w->buf[w->pos++] = (uint8_t)w->acc;
        w->acc >>= 8;
        w->nacc -= 8;
    }
}

/* Gamma code of v: b zeros, then the b + 1 bits of v from the top. */
static void put_gamma(bitw *w, unsigned v)
{
    unsigned b = gamma_len(v) / 2;
    uint64_t rev = 0;
    for (unsigned k = 0; k <= b; k++)           /* top bit first */
        rev |= (uint64_t)((v >> (b - k)) & 1u) << k;
    put_bits(w, rev << b, (int)(2 * b + 1));
}

/* Dithers x (float32/float64, n elements) to `levels` s in [1, 127];
 * natural: 1 natural levels, 0 linear; l2: 1 for ||x||_2, 0 for max |x|.
 * *norm = the float32 norm (rounded up, lowered to the largest float32
 * that decodes finite in out_dt; 0 for a zero or empty x).  The stream
 * is malloc'd into *stream (free() it; NULL when empty) with *nbits its
 * length in bits.  Non-finite input: LB_ENONFINITE at its index (always
 * checked: the norm must be finite); values beyond the lowered norm plus
 * one step (or a norm sum beyond float64): LB_ERANGE.                   */
lb_status lb_dither(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                    unsigned levels, int natural, int l2, uint64_t seed,
                    uint64_t step, int nthreads, float *norm, uint8_t **stream,
                    uint64_t *nbits, lb_error *err)
{
    if ((dt != LB_F32 && dt != LB_F64) ||
        !(out_dt == LB_F32 || out_dt == LB_F64 || out_dt == LB_F16 || out_dt == LB_BF16) ||
        levels < 1 || levels > 127 ||
        !norm || !stream || !nbits || (n && !x) || step >= LB_MAX_STEP)
        return LB_EINVAL;
    *stream = NULL;
    *nbits = 0;
    *norm = 0.0f;
    uint64_t nchunks = lb_num_chunks(n, LB_CHUNK);
    double *part = lb_alloc_n(nchunks, sizeof(double), 0);
    if (!part)
        return LB_ENOMEM;
    const lb_quant_fns *fns = lb_quant();
    int team = lb_team(nthreads, nchunks);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint64_t s = c * LB_CHUNK, m = n - s < LB_CHUNK ? n - s : LB_CHUNK;
        double v = 0.0;
        if (l2)
            v = dt == LB_F32 ? fns->lanesum32((const float *)x + s, m, LB_SUM_SQ, 0.0)
                             : fns->lanesum64((const double *)x + s, m, LB_SUM_SQ, 0.0);
        else
            for (uint64_t j = 0; j < m; j++) {
                double a = fabs(dt == LB_F32 ? (double)((const float *)x)[s + j]
                                             : ((const double *)x)[s + j]);
                v = a > v || a != a ? a : v;  /* NaN sticks */
            }
        part[c] = v;
    }
    double tot = 0.0;
    for (uint64_t c = 0; c < nchunks; c++)
        tot = l2 ? tot + part[c] : (part[c] > tot || part[c] != part[c] ? part[c] : tot);
    free(part);
    if (!isfinite(tot)) {
        for (uint64_t i = 0; i < n; i++) {
            double v = dt == LB_F32 ? (double)((const float *)x)[i] : ((const double *)x)[i];
            if (!isfinite(v)) {
                if (err)
                    err->index = i;
                return LB_ENONFINITE;
            }
        }
        if (err)
            err->index = 0;
        return LB_ERANGE;
    }
    double ideal = l2 ? sqrt(tot) : tot;
    lb_scale_cap cap = lb_scale_cap_of(1, 1, (int)out_dt);
    double nv = lb_scale_fit(ideal, &cap);
    if (ideal > (double)cap.smax) {   /* capped: the largest |x| must fit */
        double amax = 0.0;
        for (uint64_t i = 0; i < n && l2; i++) {
            double a = fabs(dt == LB_F32 ? (double)((const float *)x)[i]
                                         : ((const double *)x)[i]);
            amax = a > amax ? a : amax;
        }
        if ((l2 ? amax : ideal) > cap.reach) {
            if (err)
                err->index = 0;
            return LB_ERANGE;
        }
    }
    *norm = (float)nv;
    if (!n)
        return LB_OK;
    /* pass 1: level index | sign << 7 per element, and bits per chunk */
    uint8_t *lv = lb_scratch_alloc((size_t)n);
    uint64_t *cbits = lb_alloc_n(nchunks, sizeof(uint64_t), 0);
    if (!lv || !cbits) {
        lb_scratch_free(lv);
        free(cbits);
        return LB_ENOMEM;
    }
    lb_philox_key key = lb_philox_make(seed, step, LB_DOMAIN_DITHER);
    int plen[128];
    for (unsigned m = 0; m <= levels; m++)
        plen[m] = (int)gamma_len(m + 1) + (m ? 1 : 0);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t c = 0; c < nchunks; c++) {
        uint32_t rnd[DITHER_TILE];
        uint64_t s = c * LB_CHUNK, e = n - s < LB_CHUNK ? n : s + LB_CHUNK, bits = 0;
        for (uint64_t t = s; t < e; t += DITHER_TILE) {
            uint64_t m = e - t < DITHER_TILE ? e - t : DITHER_TILE;
            fns->philox(&key, t / 4, (m + 3) / 4, rnd);  /* t % 4 == 0 */
            for (uint64_t j = 0; j < m; j++) {
                double v = dt == LB_F32 ? (double)((const float *)x)[t + j]
                                        : ((const double *)x)[t + j];
                unsigned lvl = nv > 0.0 ? level_of(fabs(v) / nv, levels, natural, rnd[j] >> 8) : 0;
                lv[t + j] = (uint8_t)(lvl | (lvl && v < 0.0 ? 0x80u : 0u));
                bits += (uint64_t)plen[lvl];
            }
        }
        cbits[c] = bits;
    }
    uint64_t total = 0;
    for (uint64_t c = 0; c < nchunks; c++)
        total += cbits[c];
    free(cbits);
    uint8_t *out = malloc((size_t)(total / 8 + 1));
    if (!out) {
        lb_scratch_free(lv);
        return LB_ENOMEM;
    }
    /* pass 2: the stream (serial: variable-length codes), from a table of
     * every level's gamma code with the sign slot as its top bit          */
    uint32_t pat[128];
    for (unsigned m = 0; m <= levels; m++) {
        uint8_t tmp[8] = {0};
        bitw t = {tmp, 0, 0, 0};
        put_gamma(&t, m + 1);
        pat[m] = (uint32_t)(t.acc << (8 * t.pos)) | (uint32_t)tmp[0] | ((uint32_t)tmp[1] << 8);
    }
    bitw w = {out, 0, 0, 0};
    for (uint64_t i = 0; i < n; i++) {
        unsigned lvl = lv[i] & 0x7Fu;
        uint64_t code = pat[lvl] | ((uint64_t)(lv[i] >> 7) << (plen[lvl] - 1));
        put_bits(&w, code, plen[lvl]);
    }
    if (w.nacc)
        out[w.pos++] = (uint8_t)w.acc;
    lb_scratch_free(lv);
    *stream = out;
    *nbits = total;
    return LB_OK;
}

/* Parses an untrusted dither stream: n elements of `levels` s in [1, 127]
 * from exactly `nbits` bits of buf[0..len) (len == ceil(nbits / 8), spare
 * bits zero).  out (float32 when dt is LB_F32, else float64; NULL: check
 * only) gets sign * mag[m] (mag: s + 1 magnitudes in out's precision),
 * or out -= that when subtract.  Any malformation (a gamma prefix longer
 * than s allows, a level above s, a stream too short or too long, non-zero
 * spare bits) gives LB_EFORMAT with err->index = the element (n for the
 * stream end).                                                            */
lb_status lb_dither_decode(const uint8_t *buf, uint64_t len, uint64_t nbits,
                           uint64_t n, unsigned levels, const double *mag,
                           lb_dtype dt, void *out, int subtract, lb_error *err)
{
    if (levels < 1 || levels > 127 || (len && !buf) || (out && !mag) ||
        (out && dt != LB_F32 && dt != LB_F64))
        return LB_EINVAL;
    if (len != nbits / 8 + (nbits % 8 != 0)) {
        if (err)
            err->index = n;
        return LB_EFORMAT;
    }
    unsigned maxb = gamma_len(levels + 1) / 2;
    float magf[128];
    if (out && dt == LB_F32)
        for (unsigned m = 0; m <= levels; m++)
            magf[m] = (float)mag[m];
    /* Every 12-bit window (stream order from bit 0) -> its first code when
     * that code fits in 12 bits: bits 0-4 the length with the sign bit,
     * 5-11 the level, 12 the sign; 0 otherwise (longer codes and
     * malformed prefixes take the bit-by-bit path).  8 KB: stays in L1.  */
    uint16_t table[1u << DITHER_PEEK];
    for (uint32_t w = 0; w < (1u << DITHER_PEEK); w++) {
        unsigned b = 0;
        while (b < DITHER_PEEK && !((w >> b) & 1u))
            b++;
        uint16_t e = 0;
        if (b <= maxb && 2 * b + 1 <= DITHER_PEEK) {
            unsigned v = 0;
            for (unsigned k = 0; k <= b; k++)
                v = (v << 1) | ((w >> (b + k)) & 1u);
            unsigned m = v - 1, clen = 2 * b + 1 + (m ? 1 : 0);
            if (m <= levels && clen <= DITHER_PEEK)
                e = (uint16_t)(clen | (m << 5) | ((m ? (w >> (2 * b + 1)) & 1u : 0u) << 12));
        }
        table[w] = e;
    }
    uint64_t pos = 0;
#define BIT(p) ((buf[(p) >> 3] >> ((p) & 7)) & 1u)
    for (uint64_t i = 0; i < n; i++) {
        uint64_t byte = pos >> 3, word = 0;
        if (byte + 8 <= len)
            memcpy(&word, buf + byte, 8);
        else if (byte < len)
            memcpy(&word, buf + byte, len - byte);
        uint16_t e = table[(word >> (pos & 7)) & ((1u << DITHER_PEEK) - 1)];
        unsigned m, neg = 0;
        if (e && pos + (e & 31u) <= nbits) {
            pos += e & 31u;
            m = (e >> 5) & 127u;
            neg = (e >> 12) & 1u;
        } else {                      /* a long code, or an error */
            unsigned b = 0;
            while (pos < nbits && !BIT(pos) && b <= maxb) {
                b++;
                pos++;
            }
            if (b > maxb || pos + b + 1 > nbits) {
                if (err)
                    err->index = i;
                return LB_EFORMAT;
            }
            unsigned v = 0;
            for (unsigned k = 0; k <= b; k++, pos++)
                v = (v << 1) | BIT(pos);
            m = v - 1;
            if (m > levels || (m && pos >= nbits)) {
                if (err)
                    err->index = i;
                return LB_EFORMAT;
            }
            if (m)
                neg = BIT(pos), pos++;
        }
        if (!out)
            continue;
        if (dt == LB_F32) {
            float y = neg ? -magf[m] : magf[m];
            float *o = (float *)out + i;
            *o = subtract ? *o - y : y;
        } else {
            double y = neg ? -mag[m] : mag[m];
            double *o = (double *)out + i;
            *o = subtract ? *o - y : y;
        }
    }
#undef BIT
    if (pos != nbits || (nbits % 8 && (buf[len - 1] >> (nbits % 8)))) {
        if (err)
            err->index = n;
        return LB_EFORMAT;
    }
    return LB_OK;
}
