/*
 * quant.h - the leaf kernels of quantization and bit packing, compiled once
 * per instruction set (quant_scalar.c, quant_avx2.c, quant_avx512.c, all
 * from the template quant_impl.h) and chosen at run time by lb_quant().
 * No OpenMP here: the drivers in quant.c and pack.c run these on ranges.
 * Every kernel computes exactly the same bytes on every instruction set.
 */
#ifndef LB_QUANT_H
#define LB_QUANT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "rng.h"

/* What a 16-lane sum adds up (see lanesum below). */
enum { LB_SUM_ABS = 0, LB_SUM_SQ = 1, LB_SUM_RAW = 2, LB_SUM_DEV2 = 3 };

typedef struct {
    /* The 16-lane sum of f(x[j]) for j < m, in float64: lane l adds, in
     * order, the terms with j % 16 == l (starting from +0.0); lanes are then
     * folded as lane[l] += lane[l + w] for w = 8, 4, 2, 1.  f is |x|, x^2,
     * x or (x - mu)^2 (mode LB_SUM_*), all evaluated in float64.          */
    double (*lanesum32)(const float *x, uint64_t m, int mode, double mu);
    double (*lanesum64)(const double *x, uint64_t m, int mode, double mu);
    /* Largest magnitude key (raw bits without the sign) of bits[0..m).    */
    uint32_t (*maxkey32)(const uint32_t *bits, uint64_t m);
    uint64_t (*maxkey64)(const uint64_t *bits, uint64_t m);
    /* out[b] = the float whose bits are maxkey32(bits + b * B, B), for the
     * nb whole blocks b < nb: many short blocks in one call.               */
    void (*blockmax32)(const uint32_t *bits, uint64_t nb, uint64_t B, float *out);
    /* Sign bits of x[0..m) (1 for x >= 0), LSB first, into
     * ceil(m / 8) bytes; the unused bits of the last byte are zero.       */
    void (*signbits32)(const float *x, uint64_t m, uint8_t *out);
    void (*signbits64)(const double *x, uint64_t m, uint8_t *out);
    /* Error feedback with sign: lanesum32/64 (mode LB_SUM_ABS or LB_SUM_SQ)
     * of p[j] = decay * e[j] + scale * g[j] (two products rounded in the
     * input precision, then the sum), reading e and g only.               */
    double (*efsum32)(const float *e, const float *g, uint64_t m, float decay,
                      float scale, int mode);
    double (*efsum64)(const double *e, const double *g, uint64_t m, double decay,
                      double scale, int mode);
    /* The same p: its signbits into out, and e[j] = p - (p >= 0 ? s : -s). */
    void (*efsign32)(float *e, const float *g, uint64_t m, float decay, float scale,
                     float s, uint8_t *out);
    void (*efsign64)(double *e, const double *g, uint64_t m, double decay,
                     double scale, double s, uint8_t *out);
    /* Philox words of counter blocks first .. first + nb - 1 into
     * out[0 .. 4 nb), word 4 i + l being lane l of block first + i.       */
    void (*philox)(const lb_philox_key *key, uint64_t first, uint64_t nb,
                   uint32_t *out);
    /* Sign-magnitude quantization of x[0..m) to codes in [0, 2L]:
     * t = min(|x|, clip) / unit; l = rint(t) (rnd NULL) or floor(t) + (top
     * 24 bits of rnd[j] < frac(t) * 2^24); l = min(l, L); code L - l for
     * x < 0, else L + l.  Arithmetic in the input precision.              */
    void (*smq32)(const float *x, uint64_t m, float unit, float clip, int L,
                  const uint32_t *rnd, uint8_t *codes);
    void (*smq64)(const double *x, uint64_t m, double unit, double clip,
                  int L, const uint32_t *rnd, uint8_t *codes);
    /* smq32 over nb whole blocks of B elements, block b with units[b]
     * (a zero unit gives the zero code L); rnd NULL or one word per
     * element, like the codes.                                             */
    void (*smqblocks32)(const float *x, uint64_t nb, uint64_t B, const float *units,
                        float clip, int L, const uint32_t *rnd, uint8_t *codes);
    /* Two-level (+-unit) quantization: code 1 for x >= 0 (rnd NULL), else
     * 1 when the 24-bit uniform < p * 2^24 with p = (x / unit + 1) / 2.   */
    void (*twolevel32)(const float *x, uint64_t m, float unit,
                       const uint32_t *rnd, uint8_t *codes);
    void (*twolevel64)(const double *x, uint64_t m, double unit,
                       const uint32_t *rnd, uint8_t *codes);
    /* Bit streams of uint8 codes (bits 1..8): m codes from stream offset 0
     * (pack writes ceil(m * bits / 8) bytes, the last one's spare bits
     * zero; unpack reads as many).                                        */
    void (*pack)(const uint8_t *codes, uint64_t m, int bits, uint8_t *out);
    void (*unpack)(const uint8_t *buf, uint64_t m, int bits, uint8_t *codes);
    /* out[j] = table[codes[j]] * mult.                                    */
    void (*lookup32)(const uint8_t *codes, uint64_t m, const float *table,
                     float mult, float *out);
    void (*lookup64)(const uint8_t *codes, uint64_t m, const double *table,
                     double mult, double *out);
    /* float32 <-> float16 bit patterns, round to nearest even.            */
    void (*f32_to_f16)(const float *x, uint64_t m, uint16_t *out);
    void (*f16_to_f32)(const uint16_t *x, uint64_t m, float *out);
    /* Minifloat codes (1 + E + M bits, E <= 5, M <= 3) of x[0..m) scaled
     * by inv = 2^-k (a normal number): round to nearest even, saturating
     * at the largest magnitude (NaN too); see lb_minifloat.               */
    void (*minifloat32)(const float *x, uint64_t m, float inv, int E, int M,
                        uint8_t *codes);
    void (*minifloat64)(const double *x, uint64_t m, double inv, int E, int M,
                        uint8_t *codes);
    /* 16-bit random draws of the groups first .. first + ng - 1 of 128
     * elements (LB_SR16 below), each as a word u16 << 16 (so the "top 24
     * bits" that smq32/64 and twolevel32/64 compare are u16 * 2^8), into
     * out[0 .. 128 ng).                                                    */
    void (*philox16)(const lb_philox_key *key, uint64_t first, uint64_t ng,
                     uint32_t *out);
    /* out[b] = lb_scale_fit((double)mx[b] / Q, smax) for b < nb (mx[b] >= 0
     * or NaN; the float64 quotient rounded up to float32, then lowered to
     * smax; a non-finite quotient as it is).                               */
    void (*scalefit32)(const float *mx, uint64_t nb, int Q, float smax, float *out);
    /* minifloat32 over nb whole blocks of B elements, block b with
     * inv = 2^-k[b] (every k[b] in [-126, 126]: inv a normal float).      */
    void (*minifloatblocks32)(const float *x, uint64_t nb, uint64_t B, const int8_t *k,
                              int E, int M, uint8_t *codes);
} lb_quant_fns;

/* 2^e as a float for e in [-126, 127]. */
static inline float lb_f32_pow2(int e)
{
    uint32_t b = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* The 16-bit stream of stochastic blockwise rounding: element
 * 128 g + 64 h + 16 l + j takes bits [16 h, 16 h + 16) of word l of
 * Philox counter block 16 g + j (h < 2, l < 4, j < 16), so one 16-lane
 * Philox batch (or two of 8 lanes) gives 128 consecutive elements with
 * no transpose.                                                           */
#define LB_SR16 128

/* The table for the active instruction set (lb_active_isa()). */
const lb_quant_fns *lb_quant(void);

extern const lb_quant_fns lb_quant_scalar;
extern const lb_quant_fns lb_quant_avx2;
extern const lb_quant_fns lb_quant_avx512;

/* Scales that decode finite (quant.c; used by quant.c and dither.c).
 * A scheme's largest code decodes to top * (scale / div), computed in the
 * decoder's work precision (float32; float64 for a float64 output) and
 * rounded to the decoded dtype `out` (LB_F16/LB_BF16/LB_F32/LB_F64).     */
typedef struct {
    float smax;    /* the largest float32 scale whose top code decodes to a
                      finite value of `out`                                */
    double reach;  /* that decoded top plus one step (smax / div): the
                      largest magnitude represented within the scheme's
                      usual error bound                                     */
} lb_scale_cap;

/* The cap for (top, div, out), found by bisection over float32 bit
 * patterns (the decoded top is monotone in the scale).                   */
lb_scale_cap lb_scale_cap_of(int top, int div, int out);
/* The float32 scale for an ideal scale `ideal` >= 0 computed in float64:
 * rounded up to float32, then lowered to cap->smax when above it (codes
 * then saturate at the top code).  A non-finite ideal is returned as is.  */
float lb_scale_fit(double ideal, const lb_scale_cap *cap);

/* Scalar conversions shared by the template and the drivers. */
static inline uint16_t lb_f32_to_f16_bits(uint32_t x)
{
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a >= 0x7F800000u)          /* Inf; NaN quieted with its top payload
                                      bits, as F16C does                 */
        return (uint16_t)(sign | 0x7C00u | (a > 0x7F800000u ? 0x200u | ((a >> 13) & 0x3FFu) : 0u));
    if (a >= 0x477FF000u)                      /* >= 65520: Inf          */
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) {                    /* normal float16         */
        uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xFFFu + ((r >> 13) & 1u)) >> 13));
    }
    if (a < 0x33000000u)                       /* below 2^-25: zero      */
        return (uint16_t)sign;
    uint32_t e = a >> 23, mant = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t s = 126u - e;                     /* 14 .. 24               */
    return (uint16_t)(sign | ((mant + (1u << (s - 1)) - 1u + ((mant >> s) & 1u)) >> s));
}

static inline uint32_t lb_f16_bits_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu,
             m = h & 0x3FFu;
    if (e == 0x1F)   /* Inf; NaN quieted, as F16C does */
        return sign | 0x7F800000u | (m ? 0x400000u | (m << 13) : 0u);
    if (e)
        return sign | ((e + 112u) << 23) | (m << 13);
    if (!m)
        return sign;
    e = 113;                                   /* normalise a subnormal  */
    while (!(m & 0x400u)) {
        m <<= 1;
        e--;
    }
    return sign | (e << 23) | ((m & 0x3FFu) << 13);
}

#endif /* LB_QUANT_H */
