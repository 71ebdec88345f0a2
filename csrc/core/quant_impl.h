/*
 * quant_impl.h - template of the leaf kernels declared in quant.h.
 * Included once per instruction set with LB_QUANT_SUFFIX defined; the
 * including file sets the target with #pragma GCC target and the compiler
 * vectorises these plain loops.  An including file may supply intrinsics
 * versions of some kernels by defining LB_QUANT_OWN_<NAME> first.  The
 * loops only use operations that are exact or correctly rounded (no FMA:
 * the build is ISO C11, whose default is -ffp-contract=off), so every
 * instruction set gives the same bytes.
 */
#include <math.h>
#include <string.h>

#include "quant.h"

#define LB_QCAT2(a, b) a##b
#define LB_QCAT(a, b) LB_QCAT2(a, b)
#define LB_Q(name) LB_QCAT(name, LB_QUANT_SUFFIX)

/* ---- 16-lane sums ------------------------------------------------------ */

static inline double lb_fold16(double *acc)
{
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++)
            acc[l] += acc[l + w];
    return acc[0];
}

#define LB_DEFINE_LANESUM(T, NAME)                                             \
    static double NAME(const T *x, uint64_t m, int mode, double mu)            \
    {                                                                          \
        double acc[16] = {0};                                                  \
        uint64_t i = 0, full = m & ~(uint64_t)15;                              \
        switch (mode) {                                                        \
        case LB_SUM_ABS:                                                       \
            for (; i < full; i += 16)                                          \
                for (int l = 0; l < 16; l++)                                   \
                    acc[l] += fabs((double)x[i + l]);                          \
            for (int l = 0; i + l < m; l++)                                    \
                acc[l] += fabs((double)x[i + l]);                              \
            break;                                                             \
        case LB_SUM_SQ:                                                        \
            for (; i < full; i += 16)                                          \
                for (int l = 0; l < 16; l++)                                   \
                    acc[l] += (double)x[i + l] * (double)x[i + l];             \
            for (int l = 0; i + l < m; l++)                                    \
                acc[l] += (double)x[i + l] * (double)x[i + l];                 \
            break;                                                             \
        case LB_SUM_RAW:                                                       \
            for (; i < full; i += 16)                                          \
                for (int l = 0; l < 16; l++)                                   \
                    acc[l] += (double)x[i + l];                                \
            for (int l = 0; i + l < m; l++)                                    \
                acc[l] += (double)x[i + l];                                    \
            break;                                                             \
        default:                                                               \
            for (; i < full; i += 16)                                          \
                for (int l = 0; l < 16; l++) {                                 \
                    double d = (double)x[i + l] - mu;                          \
                    acc[l] += d * d;                                           \
                }                                                              \
            for (int l = 0; i + l < m; l++) {                                  \
                double d = (double)x[i + l] - mu;                              \
                acc[l] += d * d;                                               \
            }                                                                  \
            break;                                                             \
        }                                                                      \
        return lb_fold16(acc);                                                 \
    }

LB_DEFINE_LANESUM(float, LB_Q(lanesum32_))
LB_DEFINE_LANESUM(double, LB_Q(lanesum64_))

/* ---- max magnitude key --------------------------------------------------- */

#define LB_DEFINE_MAXKEY(T, MASK, NAME)                                        \
    static T NAME(const T *bits, uint64_t m)                                   \
    {                                                                          \
        T mx = 0;                                                              \
        for (uint64_t i = 0; i < m; i++) {                                     \
            T k = bits[i] & MASK;                                              \
            mx = k > mx ? k : mx;                                              \
        }                                                                      \
        return mx;                                                             \
    }

LB_DEFINE_MAXKEY(uint32_t, 0x7FFFFFFFu, LB_Q(maxkey32_))
LB_DEFINE_MAXKEY(uint64_t, 0x7FFFFFFFFFFFFFFFull, LB_Q(maxkey64_))

#ifndef LB_QUANT_OWN_BLOCKMAX32
static void LB_Q(blockmax32_)(const uint32_t *bits, uint64_t nb, uint64_t B, float *out)
#else
static void LB_Q(blockmax32_tail_)(const uint32_t *bits, uint64_t nb, uint64_t B, float *out)
#endif
{
    for (uint64_t b = 0; b < nb; b++) {
        uint32_t k = LB_Q(maxkey32_)(bits + b * B, B);
        memcpy(out + b, &k, 4);
    }
}

/* ---- sign bits ------------------------------------------------------------ */

#define LB_DEFINE_SIGNBITS(T, NAME)                                            \
    static void NAME(const T *x, uint64_t m, uint8_t *out)                     \
    {                                                                          \
        uint64_t k = 0;                                                        \
        for (; 8 * k + 8 <= m; k++) {                                          \
            const T *p = x + 8 * k;                                            \
            unsigned b = 0;                                                    \
            for (int j = 0; j < 8; j++)                                        \
                b |= (unsigned)(p[j] >= 0) << j;                               \
            out[k] = (uint8_t)b;                                               \
        }                                                                      \
        if (8 * k < m) {                                                       \
            unsigned b = 0;                                                    \
            for (uint64_t j = 8 * k; j < m; j++)                               \
                b |= (unsigned)(x[j] >= 0) << (j - 8 * k);                     \
            out[k] = (uint8_t)b;                                               \
        }                                                                      \
    }

#ifndef LB_QUANT_OWN_SIGNBITS
LB_DEFINE_SIGNBITS(float, LB_Q(signbits32_))
LB_DEFINE_SIGNBITS(double, LB_Q(signbits64_))
#endif

/* ---- error feedback with sign --------------------------------------------- */

#define LB_DEFINE_EFSUM(T, NAME)                                               \
    static double NAME(const T *e, const T *g, uint64_t m, T decay, T scale,   \
                       int mode)                                               \
    {                                                                          \
        double acc[16] = {0};                                                  \
        uint64_t i = 0, full = m & ~(uint64_t)15;                              \
        if (mode == LB_SUM_SQ) {                                               \
            for (; i < full; i += 16)                                          \
                for (int l = 0; l < 16; l++) {                                 \
                    T t1 = decay * e[i + l], t2 = scale * g[i + l];            \
                    double d = (double)(T)(t1 + t2);                           \
                    acc[l] += d * d;                                           \
                }                                                              \
            for (int l = 0; i + l < m; l++) {                                  \
                T t1 = decay * e[i + l], t2 = scale * g[i + l];                \
                double d = (double)(T)(t1 + t2);                               \
                acc[l] += d * d;                                               \
            }                                                                  \
        } else {                                                               \
            for (; i < full; i += 16)                                          \
                for (int l = 0; l < 16; l++) {                                 \
                    T t1 = decay * e[i + l], t2 = scale * g[i + l];            \
                    acc[l] += fabs((double)(T)(t1 + t2));                      \
                }                                                              \
            for (int l = 0; i + l < m; l++) {                                  \
                T t1 = decay * e[i + l], t2 = scale * g[i + l];                \
                acc[l] += fabs((double)(T)(t1 + t2));                          \
            }                                                                  \
        }                                                                      \
        return lb_fold16(acc);                                                 \
    }

LB_DEFINE_EFSUM(float, LB_Q(efsum32_))
LB_DEFINE_EFSUM(double, LB_Q(efsum64_))

/* p tile by tile (in L1): e = p - +-s, then the tile's sign bits. */
#define LB_EFSIGN_TILE 512
#define LB_DEFINE_EFSIGN(T, SIGNBITS, NAME)                                    \
    static void NAME(T *e, const T *g, uint64_t m, T decay, T scale, T s,      \
                     uint8_t *out)                                             \
    {                                                                          \
        T tile[LB_EFSIGN_TILE];                                                \
        for (uint64_t t = 0; t < m; t += LB_EFSIGN_TILE) {                     \
            uint64_t len = m - t < LB_EFSIGN_TILE ? m - t : LB_EFSIGN_TILE;    \
            T *et = e + t;                                                     \
            const T *gt = g + t;                                               \
            for (uint64_t j = 0; j < len; j++) {                               \
                T t1 = decay * et[j], t2 = scale * gt[j];                      \
                T p = t1 + t2;                                                 \
                tile[j] = p;                                                   \
                et[j] = p - (p >= 0 ? s : -s);                                 \
            }                                                                  \
            SIGNBITS(tile, len, out + t / 8);                                  \
        }                                                                      \
    }

LB_DEFINE_EFSIGN(float, LB_Q(signbits32_), LB_Q(efsign32_))
LB_DEFINE_EFSIGN(double, LB_Q(signbits64_), LB_Q(efsign64_))

/* ---- Philox ---------------------------------------------------------------- */

static void LB_Q(philox_tail_)(const lb_philox_key *key, uint64_t first,
                               uint64_t nb, uint32_t *out)
{
    for (uint64_t b = 0; b < nb; b++) {
        lb_u32x4 r = lb_philox_block(key, first + b);
        memcpy(out + 4 * b, r.v, sizeof(r.v));
    }
}

#ifndef LB_QUANT_OWN_PHILOX
/* philox16 of quant.h, one block at a time. */
static void LB_Q(philox16_)(const lb_philox_key *key, uint64_t first, uint64_t ng,
                            uint32_t *out)
{
    for (uint64_t g = 0; g < ng; g++)
        for (int j = 0; j < 16; j++) {
            lb_u32x4 r = lb_philox_block(key, 16 * (first + g) + (uint64_t)j);
            for (int l = 0; l < 4; l++) {
                out[LB_SR16 * g + 16 * l + j] = r.v[l] << 16;
                out[LB_SR16 * g + 64 + 16 * l + j] = r.v[l] & 0xFFFF0000u;
            }
        }
}

static void LB_Q(philox_)(const lb_philox_key *key, uint64_t first,
                          uint64_t nb, uint32_t *out)
{
    LB_Q(philox_tail_)(key, first, nb, out);
}
#endif

/* ---- quantization ------------------------------------------------------------ */

/* scalefit32 of quant.h, in a loop without branches: the float32 rounding
 * of d is bumped by one ulp where it fell below d (f32_up; d <= FLT_MAX, so
 * no overflow but FLT_MAX -> Inf, as nextafterf), then capped.           */
static void LB_Q(scalefit32_)(const float *restrict mx, uint64_t nb, int Q, float smax,
                              float *restrict out)
{
    const double q = (double)Q;
    for (uint64_t b = 0; b < nb; b++) {
        double d = (double)mx[b] / q;
        float f = (float)d;
        uint32_t fb;
        memcpy(&fb, &f, 4);
        fb += (uint32_t)((double)f < d);
        memcpy(&f, &fb, 4);
        f = f <= smax ? f : smax;
        out[b] = d <= 1.7976931348623157e308 ? f : (float)d;
    }
}

#define LB_U24 16777216.0

/* rint(v) for v >= 0 or NaN without a library call (baseline x86-64 has no
 * rounding instruction): below 2^MANT, adding and subtracting 2^MANT rounds
 * to an integer, to nearest even, exactly; above it v is an integer.      */
static inline float lb_rint_nonneg_f(float v)
{
    return v < 8388608.0f ? (v + 8388608.0f) - 8388608.0f : v;
}

static inline double lb_rint_nonneg_d(double v)
{
    return v < 4503599627370496.0 ? (v + 4503599627370496.0) - 4503599627370496.0 : v;
}

#define LB_DEFINE_SMQ(T, ABS, RINT, NAME)                                    \
    static void NAME(const T *restrict x, uint64_t m, T unit, T clip, int L,   \
                     const uint32_t *restrict rnd, uint8_t *restrict codes)    \
    {                                                                          \
        const T fL = (T)L;                                                     \
        if (!rnd) {                                                            \
            for (uint64_t j = 0; j < m; j++) {                                 \
                T a = ABS(x[j]);                                               \
                a = a < clip ? a : clip;                                       \
                T l = RINT(a / unit);                                          \
                l = l <= fL ? l : fL;                                          \
                int q = (int)l, s_ = -(int)(x[j] < 0); /* no branch */         \
                codes[j] = (uint8_t)(L + ((q ^ s_) - s_));                     \
            }                                                                  \
            return;                                                            \
        }                                                                      \
        for (uint64_t j = 0; j < m; j++) {                                     \
            T a = ABS(x[j]);                                                   \
            a = a < clip ? a : clip;                                           \
            T t = a / unit;                                                    \
            T f = RINT(t); /* floor(t) for t >= 0; floorf does not vectorise */\
            f = f > t ? f - (T)1 : f;                                          \
            T u = (T)(int32_t)(rnd[j] >> 8);                                   \
            T l = f + (u < (t - f) * (T)LB_U24 ? (T)1 : (T)0);                 \
            l = l <= fL ? l : fL;                                              \
            int q = (int)l, s_ = -(int)(x[j] < 0);                             \
            codes[j] = (uint8_t)(L + ((q ^ s_) - s_));                         \
        }                                                                      \
    }

#ifdef LB_QUANT_OWN_SMQ32
/* the scalar loop, for the tails of the intrinsics version */
LB_DEFINE_SMQ(float, fabsf, lb_rint_nonneg_f, LB_Q(smq32_tail_))
#else
LB_DEFINE_SMQ(float, fabsf, lb_rint_nonneg_f, LB_Q(smq32_))
#endif
LB_DEFINE_SMQ(double, fabs, lb_rint_nonneg_d, LB_Q(smq64_))

#ifndef LB_QUANT_OWN_SMQBLOCKS32
static void LB_Q(smqblocks32_)(const float *x, uint64_t nb, uint64_t B, const float *units,
                               float clip, int L, const uint32_t *rnd, uint8_t *codes)
{
    for (uint64_t b = 0; b < nb; b++) {
        if (units[b] == 0.0f)
            memset(codes + b * B, L, (size_t)B);
        else
            LB_Q(smq32_)(x + b * B, B, units[b], clip, L, rnd ? rnd + b * B : NULL,
                         codes + b * B);
    }
}
#endif

#define LB_DEFINE_TWOLEVEL(T, NAME)                                            \
    static void NAME(const T *x, uint64_t m, T unit, const uint32_t *rnd,      \
                     uint8_t *codes)                                           \
    {                                                                          \
        if (!rnd) {                                                            \
            for (uint64_t j = 0; j < m; j++)                                   \
                codes[j] = (uint8_t)(x[j] >= 0);                               \
            return;                                                            \
        }                                                                      \
        for (uint64_t j = 0; j < m; j++) {                                     \
            T p = (x[j] / unit + (T)1) * (T)0.5;                               \
            T u = (T)(int32_t)(rnd[j] >> 8);                                   \
            codes[j] = (uint8_t)(u < p * (T)LB_U24);                           \
        }                                                                      \
    }

LB_DEFINE_TWOLEVEL(float, LB_Q(twolevel32_))
LB_DEFINE_TWOLEVEL(double, LB_Q(twolevel64_))

/* ---- minifloat ------------------------------------------------------------------- */

/* Sign + magnitude minifloat codes: y = |x| * inv (inv a power of two, so y
 * is exact unless it is below the smallest normal, where every code is 0);
 * p = max(floor(log2 y), pmin), magnitude ((p - pmin) << M) + rint(y * 2^(M-p))
 * (ties to even: the low bits of y * 2^(M-p) + 2^MANT, exact as the product
 * is below 2^(M+1)), at most cmax, and cmax when !(y < 2 - 2^-M) (NaN too);
 * the sign bit is set for x < 0 with a non-zero magnitude.  Compares are on
 * the bit patterns and selects are masks, so the loop vectorises without
 * -fno-trapping-math.                                                       */
#define LB_DEFINE_MINIFLOAT(T, U, MANT, BIAS, NAME)                            \
    static void NAME(const T *restrict x, uint64_t m, T inv, int E, int M,    \
                     uint8_t *restrict codes)                                  \
    {                                                                          \
        const int pmin = 2 - (1 << E), cmax = (1 << (E + M)) - 1;              \
        const T maxval = (T)2 - (T)1 / (T)(1 << M), inf = (T)INFINITY;         \
        const U magic = (U)(BIAS + MANT) << MANT, sign = (U)1 << (8 * sizeof(U) - 1); \
        U maxb, infb;                                                          \
        memcpy(&maxb, &maxval, sizeof maxb);                                   \
        memcpy(&infb, &inf, sizeof infb);                                      \
        for (uint64_t j = 0; j < m; j++) {                                     \
            U vb, yb, sb, tb;                                                  \
            memcpy(&vb, x + j, sizeof vb);                                     \
            U ab = vb & ~sign;                                                 \
            T a, y, sc, t;                                                     \
            memcpy(&a, &ab, sizeof a);                                         \
            y = a * inv;                                                       \
            memcpy(&yb, &y, sizeof yb);                                        \
            int ok = yb < maxb;                                                \
            yb &= (U)0 - (U)ok;                                                \
            memcpy(&y, &yb, sizeof y);                                         \
            int p = (int)(yb >> MANT) - BIAS;                                  \
            p = p < pmin ? pmin : p;                                           \
            sb = (U)(BIAS + M - p) << MANT;                                    \
            memcpy(&sc, &sb, sizeof sc);                                       \
            t = y * sc + (T)((U)1 << MANT);                                    \
            memcpy(&tb, &t, sizeof tb);                                        \
            int mag = ((p - pmin) << M) + (int)(tb - magic);                   \
            mag = mag > cmax ? cmax : mag;                                     \
            mag |= (ok - 1) & cmax;                                            \
            int neg = (mag != 0) & (int)(vb >> (8 * sizeof(U) - 1)) & (ab <= infb); \
            codes[j] = (uint8_t)(mag | (neg << (E + M)));                      \
        }                                                                      \
    }

#ifdef LB_QUANT_OWN_MINIFLOAT32
/* the scalar loop, for the tails of the intrinsics version */
LB_DEFINE_MINIFLOAT(float, uint32_t, 23, 127, LB_Q(minifloat32_tail_))
#else
LB_DEFINE_MINIFLOAT(float, uint32_t, 23, 127, LB_Q(minifloat32_))
#endif
LB_DEFINE_MINIFLOAT(double, uint64_t, 52, 1023, LB_Q(minifloat64_))

#ifndef LB_QUANT_OWN_MINIFLOATBLOCKS32
static void LB_Q(minifloatblocks32_)(const float *x, uint64_t nb, uint64_t B, const int8_t *k,
                                     int E, int M, uint8_t *codes)
{
    for (uint64_t b = 0; b < nb; b++)
        LB_Q(minifloat32_)(x + b * B, B, lb_f32_pow2(-k[b]), E, M, codes + b * B);
}
#endif

/* ---- bit streams of uint8 codes ------------------------------------------------ */

/* Up to 8 codes of up to 8 bits into ceil(cnt * bits / 8) bytes. */
static inline void lb_pack_group8(const uint8_t *c, int cnt, int bits,
                                  uint8_t *out)
{
    uint64_t acc = 0;
    for (int j = 0; j < cnt; j++)
        acc |= (uint64_t)c[j] << (j * bits);
    int nbytes = (cnt * bits + 7) / 8;
    for (int k = 0; k < nbytes; k++)
        out[k] = (uint8_t)(acc >> (8 * k));
}

static inline void lb_unpack_group8(const uint8_t *buf, int cnt, int bits,
                                    uint8_t *c)
{
    uint64_t acc = 0;
    int nbytes = (cnt * bits + 7) / 8;
    for (int k = 0; k < nbytes; k++)
        acc |= (uint64_t)buf[k] << (8 * k);
    uint64_t mask = ((uint64_t)1 << bits) - 1;
    for (int j = 0; j < cnt; j++)
        c[j] = (uint8_t)((acc >> (j * bits)) & mask);
}

static void LB_Q(pack_)(const uint8_t *c, uint64_t m, int bits, uint8_t *out)
{
    uint64_t groups = m / 8, g = 0;
    switch (bits) {
    case 8:
        memcpy(out, c, (size_t)m);
        return;
    case 4:
        for (uint64_t k = 0; k < 4 * groups; k++)
            out[k] = (uint8_t)(c[2 * k] | (c[2 * k + 1] << 4));
        g = groups;
        break;
    case 2:
        for (uint64_t k = 0; k < 2 * groups; k++)
            out[k] = (uint8_t)(c[4 * k] | (c[4 * k + 1] << 2) |
                               (c[4 * k + 2] << 4) | (c[4 * k + 3] << 6));
        g = groups;
        break;
    case 1:
        for (uint64_t k = 0; k < groups; k++) {
            const uint8_t *p = c + 8 * k;
            out[k] = (uint8_t)(p[0] | (p[1] << 1) | (p[2] << 2) | (p[3] << 3) |
                               (p[4] << 4) | (p[5] << 5) | (p[6] << 6) |
                               (p[7] << 7));
        }
        g = groups;
        break;
    default:
        for (; g < groups; g++)
            lb_pack_group8(c + 8 * g, 8, bits, out + g * (uint64_t)bits);
        break;
    }
    if (8 * g < m)
        lb_pack_group8(c + 8 * g, (int)(m - 8 * g), bits, out + g * (uint64_t)bits);
}

static void LB_Q(unpack_)(const uint8_t *buf, uint64_t m, int bits, uint8_t *c)
{
    uint64_t groups = m / 8, g = 0;
    switch (bits) {
    case 8:
        memcpy(c, buf, (size_t)m);
        return;
    case 4:
        for (uint64_t k = 0; k < 4 * groups; k++) {
            c[2 * k] = buf[k] & 15;
            c[2 * k + 1] = buf[k] >> 4;
        }
        g = groups;
        break;
    case 2:
        for (uint64_t k = 0; k < 2 * groups; k++) {
            c[4 * k] = buf[k] & 3;
            c[4 * k + 1] = (buf[k] >> 2) & 3;
            c[4 * k + 2] = (buf[k] >> 4) & 3;
            c[4 * k + 3] = buf[k] >> 6;
        }
        g = groups;
        break;
    case 1:
        for (uint64_t k = 0; k < groups; k++)
            for (int j = 0; j < 8; j++)
                c[8 * k + j] = (buf[k] >> j) & 1;
        g = groups;
        break;
    default:
        for (; g < groups; g++)
            lb_unpack_group8(buf + g * (uint64_t)bits, 8, bits, c + 8 * g);
        break;
    }
    if (8 * g < m)
        lb_unpack_group8(buf + g * (uint64_t)bits, (int)(m - 8 * g), bits, c + 8 * g);
}

/* ---- decoding ------------------------------------------------------------------- */

#define LB_DEFINE_LOOKUP(T, NAME)                                              \
    static void NAME(const uint8_t *c, uint64_t m, const T *table, T mult,     \
                     T *out)                                                   \
    {                                                                          \
        for (uint64_t j = 0; j < m; j++)                                       \
            out[j] = table[c[j]] * mult;                                       \
    }

LB_DEFINE_LOOKUP(float, LB_Q(lookup32_))
LB_DEFINE_LOOKUP(double, LB_Q(lookup64_))

/* ---- float16 -------------------------------------------------------------------- */

#ifndef LB_QUANT_OWN_F16
static void LB_Q(f32_to_f16_)(const float *x, uint64_t m, uint16_t *out)
{
    for (uint64_t j = 0; j < m; j++) {
        uint32_t b;
        memcpy(&b, x + j, 4);
        out[j] = lb_f32_to_f16_bits(b);
    }
}

static void LB_Q(f16_to_f32_)(const uint16_t *x, uint64_t m, float *out)
{
    for (uint64_t j = 0; j < m; j++) {
        uint32_t b = lb_f16_bits_to_f32(x[j]);
        memcpy(out + j, &b, 4);
    }
}
#endif

const lb_quant_fns LB_Q(lb_quant_) = {
    LB_Q(lanesum32_), LB_Q(lanesum64_), LB_Q(maxkey32_), LB_Q(maxkey64_),
    LB_Q(blockmax32_),
    LB_Q(signbits32_), LB_Q(signbits64_), LB_Q(efsum32_), LB_Q(efsum64_), LB_Q(efsign32_),
    LB_Q(efsign64_), LB_Q(philox_), LB_Q(smq32_),
    LB_Q(smq64_), LB_Q(smqblocks32_), LB_Q(twolevel32_), LB_Q(twolevel64_), LB_Q(pack_),
    LB_Q(unpack_), LB_Q(lookup32_), LB_Q(lookup64_), LB_Q(f32_to_f16_),
    LB_Q(f16_to_f32_), LB_Q(minifloat32_), LB_Q(minifloat64_), LB_Q(philox16_),
    LB_Q(scalefit32_), LB_Q(minifloatblocks32_),
};
