/*
 * lowband.h - the public C API of lowband's core.
 *
 * The core is plain C11 + OpenMP and never includes Python.h: a C program can
 * link it directly (see tests/c/).  Conventions shared by every function:
 *
 *  - Every function returns an lb_status.  LB_OK is 0; anything else means the
 *    outputs are unspecified (but no memory was leaked or written out of
 *    bounds).  Functions that find a bad element report its index through an
 *    lb_error out-parameter when one is given.
 *  - `nthreads` is explicit: the number of OpenMP threads the call may use.
 *    Values < 1 mean 1.  Results are byte-identical for every thread count:
 *    work is split into fixed-size chunks (LB_CHUNK) and partial results are
 *    combined in chunk order.
 *  - Randomised kernels take (seed, step) and draw from Philox4x32-10 (rng.h)
 *    with the counter made of (element or block index, step, kernel domain).
 *  - Vectors are flat, C-contiguous arrays of `n` elements.  Indices of sparse
 *    outputs are uint64_t inside the core; callers narrow them to uint32_t
 *    when n < 2^32.
 *  - Arrays whose ownership passes to the caller are allocated with malloc()
 *    and must be released with free() (or lb_sparse_free()).
 */
#ifndef LOWBAND_H
#define LOWBAND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LB_VERSION_MAJOR 0
#define LB_VERSION_MINOR 1

/* ------------------------------------------------------------------------ */
/* Status codes and errors                                                   */
/* ------------------------------------------------------------------------ */

typedef enum {
    LB_OK = 0,
    LB_EINVAL = 1,      /* an argument has an invalid value                 */
    LB_ENOMEM = 2,      /* an allocation failed                             */
    LB_ENONFINITE = 3,  /* NaN or +-Inf in an input that must be finite     */
    LB_EFORMAT = 4,     /* malformed serialized bytes                       */
    LB_ERANGE = 5,      /* an index or size is out of range                 */
    LB_EOVERFLOW = 6    /* a size computation would overflow                */
} lb_status;

/* Where a failure happened: the first bad element (or byte offset). */
typedef struct {
    uint64_t index;
} lb_error;

/* Short, static, human-readable name of a status ("LB_EINVAL", ...). */
const char *lb_status_name(lb_status s);

/* The one overflow-checked size computation: *out = a * b when the product
 * fits in both uint64_t and size_t (LB_OK), else LB_EOVERFLOW (*out is then
 * left alone).  Every allocation size or offset that multiplies numbers a
 * caller controls goes through it.                                         */
lb_status lb_size_mul(uint64_t a, uint64_t b, uint64_t *out);

/* malloc(count * size) (calloc when zero != 0), with the product checked by
 * lb_size_mul; NULL on overflow or when out of memory.  count 0 allocates
 * one element, so NULL always means failure.                               */
void *lb_alloc_n(uint64_t count, uint64_t size, int zero);

/* Largest `chunk` of chunked top-k and largest quantization `block`
 * (inclusive); the largest tile side of tiled top-k.  The Python layer reads
 * these from lowband._core (MAX_CHUNK, MAX_BLOCK, MAX_TILE).               */
#define LB_MAX_CHUNK ((uint64_t)1 << 40)
#define LB_MAX_BLOCK ((uint64_t)1 << 40)
#define LB_MAX_TILE ((uint64_t)1 << 31)

/* ------------------------------------------------------------------------ */
/* Element types                                                             */
/* ------------------------------------------------------------------------ */

typedef enum {
    LB_F32 = 1,
    LB_F64 = 2,
    LB_F16 = 3,   /* IEEE binary16 */
    LB_BF16 = 4   /* bfloat16      */
} lb_dtype;

/* Size in bytes of one element of `dt`, or 0 for an unknown dtype. */
size_t lb_dtype_size(lb_dtype dt);

/* ------------------------------------------------------------------------ */
/* Threads, instruction sets, randomness                                     */
/* ------------------------------------------------------------------------ */

/* Elements below which the glue runs kernels serially with the GIL held.   */
#define LB_GRAIN ((uint64_t)65536)
/* Fixed work-split unit: never depends on the thread count.               */
#define LB_CHUNK ((uint64_t)65536)

/* omp_get_max_threads() of the calling thread (1 in a serial build).      */
int lb_max_threads(void);

/* Instruction-set level used by dispatched kernels.                        */
typedef enum { LB_ISA_SCALAR = 0, LB_ISA_AVX2 = 1, LB_ISA_AVX512 = 2 } lb_isa;

/* The level in use: the best the CPU supports, unless LOWBAND_FORCE_ISA
 * (scalar|avx2|avx512) forces a lower one.  Read once, then cached.        */
lb_isa lb_active_isa(void);
/* Forces a level for this process (tests); a level the CPU lacks is
 * refused with LB_EINVAL.  Passing -1 re-reads the environment.            */
lb_status lb_set_isa(int isa);
const char *lb_isa_name(lb_isa isa);

/* Random-stream domains: one per randomised kernel, so that the same user
 * seed drives independent streams in different kernels.                   */
typedef enum {
    LB_DOMAIN_TEST = 0,
    LB_DOMAIN_RANDOMK = 1,
    LB_DOMAIN_SAMPLED_TOPK = 2,
    LB_DOMAIN_STOCHASTIC_ROUND = 3,
    LB_DOMAIN_QSGD = 4,
    LB_DOMAIN_TERNGRAD = 5,
    LB_DOMAIN_NATURAL = 6,
    LB_DOMAIN_USER = 200        /* 200..255 are free for callers          */
} lb_rng_domain;

/* Largest step accepted by randomised kernels (the step shares the 64-bit
 * stream word with the 8-bit domain).                                      */
#define LB_MAX_STEP ((uint64_t)1 << 56)

/* Fills out[0..n) with the raw Philox4x32-10 words for counters
 * (first_block + i/4, stream) under key = seed, where stream =
 * domain << 56 | step; word i is lane i%4 of block i/4.                   */
lb_status lb_philox_fill(uint64_t seed, uint64_t step, int domain,
                         uint64_t first_block, uint32_t *out, uint64_t n,
                         int nthreads);

/* ------------------------------------------------------------------------ */
/* Sparse selection (core/sparsify.c)                                        */
/* ------------------------------------------------------------------------ */

/* A sparse result owned by the caller: ascending indices (uint64) and the
 * selected values in the input dtype.  Release with lb_sparse_free().      */
typedef struct {
    uint64_t *indices;
    void *values;
    uint64_t count;
} lb_sparse;

void lb_sparse_free(lb_sparse *s);

/* Exact top-k by magnitude of the n elements of x (float32 or float64).
 * Ties go to the lower index; indices ascending.  k in [0, n].
 * check_finite: NaN/Inf -> LB_ENONFINITE with err->index = first bad index;
 * otherwise NaN counts as larger than +-Inf (which is larger than any
 * finite value).  Radix selection over the magnitude bits; no sort.        */
lb_status lb_topk(const void *x, uint64_t n, lb_dtype dt, uint64_t k,
                  int check_finite, int nthreads, lb_sparse *out,
                  lb_error *err);

/* All elements with |x| >= tau (tau >= 0, not NaN).                        */
lb_status lb_threshold(const void *x, uint64_t n, lb_dtype dt, double tau,
                       int check_finite, int nthreads, lb_sparse *out,
                       lb_error *err);

/* Top-k_per_chunk by magnitude inside each contiguous chunk of `chunk`
 * elements; the last, shorter chunk keeps min(k_per_chunk, its length).   */
lb_status lb_topk_chunked(const void *x, uint64_t n, lb_dtype dt,
                          uint64_t chunk, uint64_t k_per_chunk,
                          int check_finite, int nthreads, lb_sparse *out,
                          lb_error *err);

/* Top-k inside each tile of a rows x cols matrix cut into tile_rows x
 * tile_cols tiles (edge tiles may be smaller and keep min(k, their size)).
 * Indices are flat row-major indices, ascending.                          */
lb_status lb_topk_tiled(const void *x, uint64_t rows, uint64_t cols,
                        lb_dtype dt, uint64_t tile_rows, uint64_t tile_cols,
                        uint64_t k_per_tile, int check_finite, int nthreads,
                        lb_sparse *out, lb_error *err);

/* Statistics of one sampled top-k call (DGC), for logging and tests.      */
typedef struct {
    uint64_t num_samples;   /* sample size used for the threshold          */
    uint64_t iterations;    /* threshold corrections made (0..10)           */
    int exact_fallback;     /* 1 when the result came from exact top-k      */
    double threshold;       /* final magnitude threshold                     */
} lb_sampled_info;

/* DGC's approximate top-k: the threshold comes from a strided random sample
 * (start drawn from (seed, step)); while fewer than 0.8k survive it is
 * multiplied by 0.8 (at most 10 times); when more than 1.3k survive, exact
 * top-k is taken among them.  The count always ends in [ceil(0.8k),
 * floor(1.3k)] (exact top-k is the fallback).  sample_ratio in (0, 1].     */
lb_status lb_topk_sampled(const void *x, uint64_t n, lb_dtype dt, uint64_t k,
                          double sample_ratio, uint64_t seed, uint64_t step,
                          int check_finite, int nthreads, lb_sparse *out,
                          lb_sampled_info *info, lb_error *err);

/* k distinct indices of [0, n), uniform without replacement, a function of
 * (seed, step, n, k) only (Floyd's algorithm on the Philox stream), sorted
 * ascending.  `indices` must hold k entries.                               */
lb_status lb_randomk_indices(uint64_t n, uint64_t k, uint64_t seed,
                             uint64_t step, uint64_t *indices);
/* The same indices as 32-bit values (n <= 2^32), with the Philox draws and
 * the scan of the index set on up to `nthreads` threads (same result for
 * any count).                                                              */
lb_status lb_randomk_indices32(uint64_t n, uint64_t k, uint64_t seed,
                               uint64_t step, int nthreads, uint32_t *indices);

/* values[i] = x[indices[i]] * scale for i < k (scale 1 copies exactly).
 * Indices must be < n.                                                     */
lb_status lb_gather(const void *x, uint64_t n, lb_dtype dt,
                    const uint64_t *indices, uint64_t k, double scale,
                    int check_finite, int nthreads, void *values,
                    lb_error *err);
/* lb_gather with uint32 indices (a vector of fewer than 2^32 elements). */
lb_status lb_gather_u32(const void *x, uint64_t n, lb_dtype dt,
                        const uint32_t *indices, uint64_t k, double scale,
                        int check_finite, int nthreads, void *values,
                        lb_error *err);

/* ------------------------------------------------------------------------ */
/* Scatter and aggregation (core/scatter.c)                                  */
/* ------------------------------------------------------------------------ */

typedef enum {
    LB_AGG_SUM = 0,
    LB_AGG_MEAN = 1,              /* sum / number of payloads              */
    LB_AGG_CONTRIBUTOR_MEAN = 2   /* sum / number of payloads holding i    */
} lb_agg_op;

/* One sparse operand of an aggregation: ascending indices (< n) and values
 * in the same dtype as the output.  Narrow (uint32) indices when
 * index_width == 4, else uint64.                                           */
typedef struct {
    const void *indices;
    const void *values;
    uint64_t count;
    int index_width;
} lb_sparse_view;

/* out[0..n) = op over the payloads (zero where nobody contributed).  For
 * each coordinate the values are added in payload order, so the result is
 * the same for any thread count.  Indices must be strictly ascending and
 * < n (checked: LB_ERANGE / LB_EINVAL with err->index = the payload).     */
lb_status lb_aggregate(const lb_sparse_view *payloads, uint64_t num_payloads,
                       uint64_t n, lb_dtype dt, lb_agg_op op, void *out,
                       int nthreads, lb_error *err);

/* ------------------------------------------------------------------------ */
/* Quantization and bit packing (core/quant.c, core/pack.c)                  */
/* ------------------------------------------------------------------------ */

/* (quantization prototypes go here) */

/* Bit streams (docs/quantization.md): element i of a stream of `bits`-wide
 * codes occupies stream bits [i*bits, (i+1)*bits), stream bit k being bit
 * k % 8 of byte k / 8 (LSB first, codes little-endian); the last byte's
 * unused high bits are zero.  A stream of n codes is lb_packed_bytes(n, bits)
 * = ceil(n * bits / 8) bytes.  bits is 1..16 everywhere.                   */
uint64_t lb_packed_bytes(uint64_t n, int bits);

/* Packs n codes (unsigned integers of `width` bytes: 1, 2, 4 or 8; signed
 * two's complement when is_signed) into out[0..lb_packed_bytes(n, bits)).
 * A code outside [0, 2^bits) gives LB_ERANGE with err->index = the first
 * such position (out is then unspecified).                                */
lb_status lb_pack_bits(const void *codes, int width, int is_signed, uint64_t n,
                       int bits, uint8_t *out, int nthreads, lb_error *err);

/* Unpacks n codes from buf (len bytes, at least lb_packed_bytes(n, bits))
 * into `codes` (uint8 when width == 1, needs bits <= 8; uint16 when
 * width == 2).  Reads only buf[0..lb_packed_bytes(n, bits)).              */
lb_status lb_unpack_bits(const uint8_t *buf, uint64_t len, uint64_t n, int bits,
                         void *codes, int width, int nthreads);

/* Validates an untrusted stream of exactly lb_packed_bytes(n, bits) bytes:
 * every code <= maxcode and != forbidden (pass UINT32_MAX for none), the
 * padding bits zero.  LB_EFORMAT with err->index = the first bad element
 * (n for the padding).                                                     */
lb_status lb_check_codes(const uint8_t *buf, uint64_t n, int bits,
                         uint32_t maxcode, uint32_t forbidden, lb_error *err);

/* Quantizers.  Shared rules: x holds n float32 or float64 values (callers
 * widen float16/bfloat16 to float32 first, exactly); `codes` receives the
 * packed stream; per-block arrays have one entry per block of `block`
 * elements (block 0: one entry for the whole tensor); non-finite input is
 * LB_ENONFINITE with err->index = the first bad element when check_finite
 * (otherwise the result for such input is unspecified but memory-safe).
 * Scales are computed in float64; where the decoded dtype `out_dt` is
 * given (the dtype the payload decodes to: float32, float64, float16 or
 * bfloat16), a scale whose largest code would decode to +-Inf is lowered
 * to the largest float32 that decodes finite (codes saturate at the top
 * code), so finite input never decodes to Inf.  A block whose values the
 * scale cannot represent (beyond the lowered scale's top value plus one
 * step, or a scale beyond float32) is LB_ERANGE (err->index = the block)
 * when check_finite.
 * Sums (l1, rms, norms, means) use the fixed 16-lane order of
 * docs/quantization.md, so every result is byte-identical for any thread
 * count and instruction set.  Random draws: Philox4x32-10 keyed by seed,
 * stream (step, domain), element i using 32-bit word i % 4 of counter
 * block i / 4, of which the top 24 bits are the uniform.                   */

typedef enum { LB_SCALE_NONE = 0, LB_SCALE_L1 = 1, LB_SCALE_RMS = 2 } lb_scale_mode;

/* 1-bit signs: code 1 when x >= 0 (so sign(+-0) = +1), 0 otherwise; scales
 * (none when mode is LB_SCALE_NONE): mean |x| (L1) or sqrt(mean x^2) (RMS)
 * per block, as float32.                                                   */
lb_status lb_sign(const void *x, uint64_t n, lb_dtype dt, int mode,
                  uint64_t block, int check_finite, int nthreads,
                  uint8_t *codes, float *scales, lb_error *err);

/* Symmetric absmax quantization per block: bits in {1,2,3,4,8}.  bits >= 2:
 * step d = absmax / Q with Q = 2^(bits-1) - 1, q = round(x / d) in
 * [-Q, Q], code q + Q.  bits == 1: levels -d, +d with d = absmax, code 1
 * for +d.  scales[b] = d (float32).  stochastic: round up with probability
 * equal to the fraction (unbiased); else nearest, ties to even.           */
lb_status lb_quantize(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                      int bits, uint64_t block, int stochastic, uint64_t seed,
                      uint64_t step, int check_finite, int nthreads,
                      uint8_t *codes, float *scales, lb_error *err);

/* QSGD with `levels` = s in [1, 127]: norms[b] = ||x_block||_2 rounded up
 * to float32, u = norm / s, l = floor(|x|/u) + Bernoulli(frac) (<= s),
 * code sign(x) * l + s in a stream of lb_qsgd_bits(s) bits.                */
int lb_qsgd_bits(uint64_t levels);
lb_status lb_qsgd(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                  uint64_t levels, uint64_t block, uint64_t seed, uint64_t step,
                  int check_finite, int nthreads, uint8_t *codes,
                  float *norms, lb_error *err);

/* TernGrad: g = clip(x, +-clip * sigma) (sigma the population standard
 * deviation; clip <= 0 disables clipping), s = max |g| rounded up to
 * float32, t in {-1, 0, 1} with P(t != 0) = |g| / s; 2-bit code t + 1.    */
lb_status lb_terngrad(const void *x, uint64_t n, lb_dtype dt, double clip,
                      uint64_t seed, uint64_t step, int check_finite,
                      int nthreads, uint8_t *codes, float *scale,
                      lb_error *err);

/* Natural compression: |x| rounded to a power of two, up with probability
 * |x| / 2^e - 1 (unbiased).  *top = min(floor(log2 max|x|) + 1, emax) (0
 * for an all-zero x), clamped below to -896; 8-bit codes: bit 7 the sign,
 * bits 0..6 the field f, value 2^(top - 127 + f), f = 0 is zero (its
 * negative code 0x80 is never produced); magnitudes below 2^(top - 126)
 * round to 0 or 2^(top - 126).                                             */
lb_status lb_natural(const void *x, uint64_t n, lb_dtype dt, int emax,
                     uint64_t seed, uint64_t step, int check_finite,
                     int nthreads, uint8_t *codes, int16_t *top,
                     lb_error *err);

/* Minifloat E<exp_bits>M<man_bits> (exp_bits 1..5, man_bits 0..3, at most
 * 7 together) with a power-of-two scale 2^k per block: element values are
 * IEEE-like with bias 2^E - 1 (largest value 2 - 2^-M, subnormals, no
 * Inf/NaN); k = the smallest exponent with absmax <= (2 - 2^-M) * 2^k,
 * clamped to [-127, kmax] (0 for an all-zero block; a block maximum of at
 * least 2^(kmax + 1) is LB_ERANGE when check_finite); codes are sign bit
 * (bit E+M) + magnitude, round to nearest (ties to even significand),
 * saturating; the negative-zero code is never produced.                    */
lb_status lb_minifloat(const void *x, uint64_t n, lb_dtype dt, int exp_bits,
                       int man_bits, uint64_t block, int kmax,
                       int check_finite, int nthreads, uint8_t *codes,
                       int8_t *exps, lb_error *err);

/* SparseLoCo's 2-bit codes: mu = mean, sigma = sample standard deviation
 * (n - 1), w = 1.5 sigma, code clamp(round((x - mu) / w + 2), 0, 3) (all 2
 * when w == 0); table[j] = float32 of the mean of the x in bin j (of mu +
 * (j - 2) w for an empty bin), limited to the largest float32 magnitude
 * that decodes finite in out_dt (a bin mean beyond it: LB_ERANGE).        */
lb_status lb_lut2bit(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                     int check_finite, int nthreads, uint8_t *codes,
                     float table[4], lb_error *err);

/* Decoding: out[i] = table[code_i] * mult[i / block] (block 0: one
 * multiplier; mult NULL: 1) computed in float32 for float32 and float16
 * outputs (float16 rounded from it) and in float64 for float64; `table`
 * has 2^bits entries (bits <= 8), in the output precision (float for
 * float32/float16, double for float64), as is mult.  Codes must be valid. */
lb_status lb_table_decode(const uint8_t *codes, uint64_t n, int bits,
                          const void *table, const void *mult, uint64_t block,
                          lb_dtype out_dt, void *out, int nthreads);

/* e[i] = e[i] - D[i] with D exactly as lb_table_decode computes it, for a
 * float32 or float64 e (the residual update of error feedback, without a
 * decoded temporary).                                                      */
lb_status lb_table_subtract(const uint8_t *codes, uint64_t n, int bits,
                            const void *table, const void *mult, uint64_t block,
                            lb_dtype dt, void *e, int nthreads);

/* Conversions between float32/float64 and float16/bfloat16 bit patterns
 * (uint16), round to nearest even, directly from float64 (no double
 * rounding); NaN stays NaN.  With check_finite, a non-finite input or a
 * value that overflows the narrow type is LB_ENONFINITE / LB_ERANGE with
 * err->index = its position.                                               */
lb_status lb_narrow(const void *x, uint64_t n, lb_dtype dt, lb_dtype to,
                    int check_finite, int nthreads, uint16_t *out,
                    lb_error *err);
/* uint16 float16/bfloat16 patterns -> float32, float64 or float16 (exact). */
lb_status lb_widen(const uint16_t *x, uint64_t n, lb_dtype from,
                   lb_dtype out_dt, void *out, int nthreads);

/* end of quantization */

/* ------------------------------------------------------------------------ */
/* Error feedback (core/feedback.c)                                          */
/* ------------------------------------------------------------------------ */

/* Fused error-feedback steps on a state vector e and a gradient g of n
 * elements (float32 or float64, same dtype).  Each computes
 *     p = decay*e + scale*g        (a product and a sum per term, rounded,
 *                                   no FMA: the same bytes as NumPy)
 * into e, compresses p, and leaves e = p - D(C(p)) (zero where sent), in one
 * pass over the data.  With check_finite, a non-finite g is reported
 * (LB_ENONFINITE, err->index) before anything is written, so e is unchanged;
 * a non-finite p from finite g (the state overflowed) gives LB_EOVERFLOW
 * with err->index, and e then holds p.                                      */

/* e = decay*e + scale*g (the compensation alone, e.g. for random-k). */
lb_status lb_ef_axpby(void *e, const void *g, uint64_t n, lb_dtype dt,
                      double decay, double scale, int check_finite,
                      int nthreads, lb_error *err);

/* Exact top-k of p (as lb_topk), sent values in `out`.  Unlike the others
 * it is all or nothing: it reads e and g only until the selection is made
 * and p is known to be finite, so on any failure (LB_ENONFINITE for g,
 * LB_EOVERFLOW for p, LB_ENOMEM) e is unchanged.  It is lb_ef_topk_begin
 * followed by lb_ef_topk_commit.                                          */
lb_status lb_ef_topk(void *e, const void *g, uint64_t n, lb_dtype dt,
                     double decay, double scale, uint64_t k, int check_finite,
                     int nthreads, lb_sparse *out, lb_error *err);

/* The read-only half of lb_ef_topk: the selection of p into `out`, e and g
 * only read; its errors are lb_ef_topk's.                                  */
lb_status lb_ef_topk_begin(const void *e, const void *g, uint64_t n, lb_dtype dt,
                           double decay, double scale, uint64_t k, int check_finite,
                           int nthreads, lb_sparse *out, lb_error *err);

/* The writing half, after a successful lb_ef_topk_begin with the same
 * e, g, n, dt, decay and scale (e not changed in between): e = p, then 0
 * at out's indices.  Cannot fail (LB_EINVAL only for bad arguments).      */
lb_status lb_ef_topk_commit(void *e, const void *g, uint64_t n, lb_dtype dt, double decay,
                            double scale, const lb_sparse *out, int nthreads);

/* Error feedback fused with sign (mode LB_SCALE_L1 or LB_SCALE_RMS): with
 * p = decay * e + scale * g, writes codes and scales exactly as lb_sign(p)
 * and e = p - D(sign(p)), as lb_ef_axpby + lb_sign + lb_ef_sign_residual,
 * in two passes (the first reads e and g only).  *applied = 0, with e
 * untouched, when the first pass finds a block sum or scale non-finite (a
 * non-finite g or p, an overflow), when n == 0, or when block is neither
 * 0, >= n nor a multiple of 8: the caller then takes the separate steps,
 * which report the error.                                                 */
lb_status lb_ef_sign(void *e, const void *g, uint64_t n, lb_dtype dt, double decay,
                     double scale, int mode, uint64_t block, int nthreads,
                     uint8_t *codes, float *scales, int *applied);

/* The residual of a sign payload of e itself: e[i] -= (e[i] >= 0 ? s : -s)
 * with s = scales[i / block] (block 0: one scale; scales NULL: s = 1), the
 * decoded value computed as lb_table_decode does (+-1 times the scale, in
 * float32 for float32 e, float64 for float64 e).                           */
lb_status lb_ef_sign_residual(void *e, uint64_t n, lb_dtype dt,
                              const float *scales, uint64_t block,
                              int nthreads);

/* Chunked top-k of p (as lb_topk_chunked).                                */
lb_status lb_ef_topk_chunked(void *e, const void *g, uint64_t n, lb_dtype dt,
                             double decay, double scale, uint64_t chunk,
                             uint64_t k_per_chunk, int check_finite,
                             int nthreads, lb_sparse *out, lb_error *err);

/* end of error feedback */

/* ------------------------------------------------------------------------ */
/* Mixture-of-Experts (core/moe.c)                                           */
/* ------------------------------------------------------------------------ */

/* (MoE prototypes go here) */

/* Score functions of a router. */
typedef enum { LB_SCORE_SOFTMAX = 0, LB_SCORE_SIGMOID = 1 } lb_score_fn;

/* How a routed token-to-expert map is cut down to a capacity. */
typedef enum { LB_DROP_PROBS = 0, LB_DROP_POSITION = 1 } lb_drop_policy;

/* Options of lb_moe_route.  groups == 0 or 1: no group limit; otherwise E is
 * cut into `groups` contiguous groups, only the `group_k` groups with the
 * largest group scores stay selectable (group score: the sum, largest
 * first, of the group's top k/group_k choice scores).  bias (E values or
 * NULL) changes the choice, never the weights.                            */
typedef struct {
    lb_score_fn score;
    int renormalize;
    const double *bias;
    uint64_t groups;
    uint64_t group_k;
} lb_route_opts;

/* Rows per partial of every column sum over tokens (the sums of a segment
 * are per-chunk partials of this many rows added in chunk order), so the
 * result never depends on the thread count.  Depends on E only.           */
uint64_t lb_moe_sum_rows(uint64_t E);

/* Routes T tokens (logits: T x E, row-major, float32/float64) to k of E
 * experts (1 <= k <= E).  Per row: scores = softmax(z) or sigmoid(z) in the
 * logits' precision; the k experts with the largest choice key (the logit
 * when there is no bias, else score + bias, in double) among the allowed
 * groups, ties to the lower expert index, written in descending key order
 * to experts (T x k); weights (T x k): softmax over the selected logits
 * (softmax, renormalize), the selected scores (renormalize == 0), or the
 * selected sigmoid scores over their sum + 1e-20 (sigmoid, renormalize).
 * When given, counts (E) receives the number of (token, slot) picks per
 * expert and aux_sums (E, double) the column sums of the load-balancing
 * distribution (lb_moe_balance_stats with seg_len = T, no mask).
 * Non-finite logits: LB_ENONFINITE, err->index = first bad flat index.    */
lb_status lb_moe_route(const void *logits, lb_dtype dt, uint64_t T, uint64_t E,
                       uint64_t k, const lb_route_opts *opts, int32_t *experts,
                       void *weights, void *scores, int64_t *counts,
                       double *aux_sums, int nthreads, lb_error *err);

/* Load-balancing statistics per segment of seg_len tokens (T a multiple of
 * seg_len; B = T / seg_len segments; seg_len may be 0 only when T is 0).
 * For the valid tokens (mask == NULL or mask[t] != 0) of segment b:
 * counts[b*E + i] = picks of expert i among experts (T x k, each in
 * [0, E), else LB_ERANGE with err->index = flat position), valid[b] = valid
 * tokens, and, when sums is not NULL, sums[b*E + i] = the sum over them of
 * the load-balancing distribution q: the softmax scores themselves, or the
 * sigmoid scores divided by their row sum.                               */
lb_status lb_moe_balance_stats(const void *scores, lb_dtype dt, uint64_t T,
                               uint64_t E, lb_score_fn score,
                               const int32_t *experts, uint64_t k,
                               const uint8_t *mask, uint64_t seg_len,
                               int64_t *counts, int64_t *valid, double *sums,
                               int nthreads, lb_error *err);

/* Gradient of sum_t sum_i g[b(t)*E + i] * q[t, i] with respect to the
 * logits, through the softmax (q = p: p * (g - <p, g>)) or the normalised
 * sigmoid (s(1-s) * (g - <q, g>) / sum(s)); zero rows where mask[t] == 0.
 * Computed in double, written in dt to grad (T x E).                     */
lb_status lb_moe_balance_grad(const void *scores, lb_dtype dt, uint64_t T,
                              uint64_t E, lb_score_fn score, const double *g,
                              uint64_t seg_len, const uint8_t *mask,
                              void *grad, int nthreads);

/* Router z-loss: *loss = sum over valid rows of logsumexp(z_t)^2 (double,
 * not yet divided by the valid count); grad (T x E, may be NULL) =
 * grad_scale * 2 * lse_t * softmax(z_t) on valid rows, 0 elsewhere.
 * Non-finite logits: LB_ENONFINITE with err->index.                      */
lb_status lb_moe_z_loss(const void *logits, lb_dtype dt, uint64_t T,
                        uint64_t E, const uint8_t *mask, double grad_scale,
                        double *loss, void *grad, int nthreads, lb_error *err);

/* Dispatch plan: a stable counting sort of the T*k (token, slot)
 * assignments by expert, so rows are expert-major and token-ascending.
 * Assignments of masked-out tokens are left out; then each expert keeps at
 * most `capacity` rows (UINT64_MAX: no limit): its first ones (POSITION)
 * or those with the largest weights (PROBS; weights T x k in dt, ties to
 * the lower token), still in token order.  Out: offsets (E + 1: expert i
 * owns rows [offsets[i], offsets[i+1])), rows (T*k: the assignment t*k+s
 * of each row; the first offsets[E] entries are used) and position (T*k:
 * the row of each assignment, or -1 when it was dropped).  Expert ids
 * outside [0, E): LB_ERANGE with err->index = flat position.              */
lb_status lb_moe_plan(const int32_t *experts, uint64_t T, uint64_t k,
                      uint64_t E, const uint8_t *mask, uint64_t capacity,
                      lb_drop_policy drop, const void *weights, lb_dtype dt,
                      int64_t *offsets, int64_t *rows, int64_t *position,
                      int nthreads, lb_error *err);

/* The dispatch copy, in token order: for every token t < T and slot s < k
 * with p = position[t*k+s] >= 0, out[p, :] = w * x[t, :] (x: T x H, out:
 * n x H; w = 1 when weights is NULL, else weights[t*k+s] in dt).  x is read
 * once and in order.  The kept positions must map one-to-one onto [0, n)
 * (the plan's inverse map), else LB_ERANGE: every row is written once.   */
lb_status lb_moe_scatter(const void *x, lb_dtype dt, uint64_t T, uint64_t H,
                         uint64_t k, const int64_t *position,
                         const void *weights, uint64_t n, void *out,
                         int nthreads);

/* out[t, :] = sum over slots s = 0..k-1 with p = position[t*k+s] >= 0 of
 * w * y[p, :] (y: n x H), added in slot order onto zero; w = 1 when
 * weights is NULL, else weights[t*k+s].  No atomics: one writer per token.
 * Every position must be < n.                                             */
lb_status lb_moe_combine(const void *y, lb_dtype dt, uint64_t n, uint64_t H,
                         const int64_t *position, uint64_t T, uint64_t k,
                         const void *weights, void *out, int nthreads);

/* grad_weights[t*k+s] = <grad_out[t, :], y[position[t*k+s], :]> (0 for a
 * dropped slot), accumulated in double over 8 interleaved lanes.          */
lb_status lb_moe_combine_dot(const void *grad_out, const void *y, lb_dtype dt,
                             uint64_t n, uint64_t H, const int64_t *position,
                             uint64_t T, uint64_t k, void *grad_weights,
                             int nthreads);

/* The backward of lb_moe_combine in one pass over grad_out (T x H), each
 * output optional (NULL: not computed, not both): grad_y (n x H) as
 * lb_moe_scatter(grad_out, position, weights) and grad_weights (T x k) as
 * lb_moe_combine_dot(grad_out, y), the same bytes.  With grad_y the kept
 * positions must map one-to-one onto [0, n), else every position must be
 * -1 or < n (LB_ERANGE).                                                  */
lb_status lb_moe_combine_backward(const void *grad_out, const void *y, lb_dtype dt,
                                  uint64_t n, uint64_t H, const int64_t *position,
                                  uint64_t T, uint64_t k, const void *weights,
                                  void *grad_y, void *grad_weights, int nthreads);


/* end of Mixture-of-Experts */

/* ------------------------------------------------------------------------ */
/* Wire format helpers (core/wire.c); the format is docs/formats.md          */
/* ------------------------------------------------------------------------ */

/* CRC-32C (Castagnoli, reflected, as in iSCSI/ext4): crc of data appended
 * to a running value `crc` (start with 0).                                 */
uint32_t lb_crc32c(uint32_t crc, const void *data, size_t len);

typedef enum {
    LB_IDX_RAW = 0,      /* u32 (size < 2^32) or u64 per index               */
    LB_IDX_VARINT = 1,   /* LEB128 of idx[0], then of each gap - 1           */
    LB_IDX_BITMAP = 2,   /* ceil(size/8) bytes, LSB-first                     */
    LB_IDX_SEEDED = 3    /* u64 seed, u64 step: random-k regenerates them     */
} lb_index_encoding;

/* Checks that indices (uint32 when width == 4, else uint64) are strictly
 * ascending and < n.  LB_EINVAL / LB_ERANGE with err->index = position.   */
lb_status lb_index_check(const void *indices, int width, uint64_t count,
                         uint64_t n, lb_error *err);

/* Encoded byte sizes of valid ascending indices under RAW, VARINT and
 * BITMAP (sizes[0..2]).                                                    */
lb_status lb_index_sizes(const void *indices, int width, uint64_t count,
                         uint64_t n, uint64_t sizes[3]);

/* Writes the encoding (RAW, VARINT or BITMAP) into out[0..out_len), which
 * must be exactly the size lb_index_sizes() gave.                          */
lb_status lb_index_encode(const void *indices, int width, uint64_t count,
                          uint64_t n, int encoding, uint8_t *out,
                          uint64_t out_len);

/* Decodes untrusted bytes into count ascending indices < n (written as
 * uint32 when width == 4, else uint64).  Every malformation (short or long
 * buffer, overlong or overflowing varint, unsorted, out of range, wrong
 * popcount, non-zero bitmap padding) gives LB_EFORMAT with err->index = the
 * byte offset in buf.  Never reads outside buf[0..len).                   */
lb_status lb_index_decode(const uint8_t *buf, uint64_t len, int encoding,
                          uint64_t count, uint64_t n, int width, void *out,
                          lb_error *err);


/* ------------------------------------------------------------------------ */
/* Two-means sign, majority vote, dithering (core/twomeans.c, vote.c,        */
/* dither.c)                                                                 */
/* ------------------------------------------------------------------------ */

/* Random-stream domain of lb_dither. */
#define LB_DOMAIN_DITHER 7

/* Seide et al.'s 1-bit quantizer: sign bits (code 1 when x >= 0) into
 * codes[0..ceil(n/8)), and per block of `block` elements (0: one block)
 * scales[2b] = mean of the non-negative elements, scales[2b+1] = minus the
 * mean of the negative ones (float32; 0 for an empty side).  Sums in the
 * 16-lane order over LB_CHUNK pieces (see twomeans.c).                     */
lb_status lb_sign_two_means(const void *x, uint64_t n, lb_dtype dt,
                            uint64_t block, int check_finite, int nthreads,
                            uint8_t *codes, float *scales, lb_error *err);

/* Bitwise majority of W packed 1-bit streams of n bits: out bit i is 1 when
 * at least `thresh` (0: ceil(W/2), so ties give 1) streams have bit i set.
 * Bit-sliced counting on 64-bit words; no unpacking.                      */
lb_status lb_majority_vote(const uint8_t *const *codes, uint64_t W, uint64_t n,
                           uint64_t thresh, int nthreads, uint8_t *out);

/* Random dithering to `levels` in [1, 127] linear (natural = 0) or natural
 * (power-of-two) levels of |x| / norm (l2 = 1: ||x||_2, else max |x|),
 * unbiased, Elias-gamma coded (see dither.c).  *stream is malloc'd (free()
 * it), *nbits its exact length in bits, *norm the float32 norm, lowered
 * to the largest float32 that decodes finite in out_dt (the decoded
 * dtype) when above it, as the quantizers' scales are.                   */
lb_status lb_dither(const void *x, uint64_t n, lb_dtype dt, lb_dtype out_dt,
                    unsigned levels,
                    int natural, int l2, uint64_t seed, uint64_t step,
                    int nthreads, float *norm, uint8_t **stream,
                    uint64_t *nbits, lb_error *err);

/* Checks (out NULL) or decodes an untrusted dither stream of n elements in
 * exactly nbits bits into out (+-mag[level]; out -= that when subtract).
 * LB_EFORMAT with err->index = the element for any malformation.         */
lb_status lb_dither_decode(const uint8_t *buf, uint64_t len, uint64_t nbits,
                           uint64_t n, unsigned levels, const double *mag,
                           lb_dtype dt, void *out, int subtract, lb_error *err);


/* FedZip (core/fedzip.c): 3-means of x from (min, mid, max) with `iters`
 * Lloyd iterations (float32 centroids, labels 0..2), and the Huffman
 * (gaps = 0) or gap-coded (gaps = 1) label stream; see fedzip.c.         */
lb_status lb_kmeans3(const void *x, uint64_t n, lb_dtype dt, int iters,
                     int nthreads, float *centroids, uint8_t *labels,
                     lb_error *err);
lb_status lb_fedzip_encode(const uint8_t *labels, uint64_t n, int gaps,
                           unsigned *major, uint8_t **stream, uint64_t *nbits);
lb_status lb_fedzip_decode(const uint8_t *buf, uint64_t len, uint64_t nbits,
                           uint64_t n, int gaps, unsigned major,
                           const double *centroids, lb_dtype dt, void *out,
                           lb_error *err);
/* ------------------------------------------------------------------------ */
/* PowerSGD (core/powersgd.c)                                                */
/* ------------------------------------------------------------------------ */

/* Rows per block of the PowerSGD orthogonalisation's sums (fixed: the
 * result does not depend on the thread count).                            */
#define LB_PSGD_BLOCK ((uint64_t)4096)

/* Orthogonalises in place the columns of `batch` row-major n x r matrices
 * (float32 or float64, stored one after the other) by modified
 * Gram-Schmidt, as PyTorch's PowerSGD hook does: for i = 0..r-1,
 * c_i *= 1 / (||c_i|| + epsilon) (a column of norm 0 becomes 0), then
 * every c_j, j > i, loses <c_i, c_j> c_i.  Sums in double: row k of a
 * block of LB_PSGD_BLOCK rows adds into lane k % 8, lanes are added in
 * lane order, blocks in block order.  LB_ENONFINITE (matrix
 * untouched, err->index = flat index of the first NaN/Inf), LB_EOVERFLOW
 * when a norm overflows, LB_EINVAL for another dtype or a negative or
 * non-finite epsilon.                                                      */
lb_status lb_powersgd_orthogonalize(void *a, uint64_t batch, uint64_t n,
                                    uint64_t r, lb_dtype dt, double epsilon,
                                    int nthreads, lb_error *err);

/* ------------------------------------------------------------------------ */
/* Groups of tensors (core/group.c)                                          */
/* ------------------------------------------------------------------------ */
/* One call for nseg segments (the tensors of a model or a DDP bucket):
 * segment s is the vector x[s] (or e[s], g[s]) of n[s] elements with its
 * own k[s] <= n[s], and out[s] receives exactly what the single-tensor
 * kernel gives on it, for any thread count (segments of at least
 * LB_GROUP_BIG elements use the whole team, smaller ones are spread over
 * it).  On failure nothing is returned (every out[s] is freed and
 * zeroed), *seg names the failing segment with the lowest index and err
 * its element; LB_EINVAL with *seg for a k[s] > n[s].                     */
#define LB_GROUP_BIG ((uint64_t)262144)

/* lb_topk on every segment. */
lb_status lb_topk_group(const void *const *x, const uint64_t *n,
                        const uint64_t *k, uint64_t nseg, lb_dtype dt,
                        int check_finite, int nthreads, lb_sparse *out,
                        lb_error *err, uint64_t *seg);

/* lb_ef_topk on every segment (state e[s], gradient g[s]), all or
 * nothing: every segment's selection is made (reading only) before any
 * e[s] is written, so on any failure no state is changed.                 */
lb_status lb_ef_topk_group(void *const *e, const void *const *g,
                           const uint64_t *n, const uint64_t *k, uint64_t nseg,
                           lb_dtype dt, double decay, double scale,
                           int check_finite, int nthreads, lb_sparse *out,
                           lb_error *err, uint64_t *seg);

/* lb_sign on every segment, into codes[s] (lb_packed_bytes(n[s], 1) bytes)
 * and scales[s] (its blocks' scales; unused for LB_SCALE_NONE).           */
lb_status lb_sign_group(const void *const *x, const uint64_t *n, uint64_t nseg,
                        lb_dtype dt, int mode, uint64_t block, int check_finite,
                        int nthreads, uint8_t *const *codes, float *const *scales,
                        lb_error *err, uint64_t *seg);

/* lb_quantize on every segment (one seed and step for all: segment s draws
 * what a lone lb_quantize call on it draws); out_dt[s] is segment s's
 * decoded dtype (lb_quantize's out_dt).                                   */
lb_status lb_quantize_group(const void *const *x, const uint64_t *n, uint64_t nseg,
                            lb_dtype dt, const uint8_t *out_dt, int bits, uint64_t block,
                            int stochastic,
                            uint64_t seed, uint64_t step, int check_finite,
                            int nthreads, uint8_t *const *codes,
                            float *const *scales, lb_error *err, uint64_t *seg);

/* Random-k on every segment: indices[s] (k[s] entries) =
 * lb_randomk_indices(n[s], k[s], seed, step), values[s] = the gathered
 * x[s] values times n[s]/k[s] when rescale (else exactly).                 */
lb_status lb_randomk_group(const void *const *x, const uint64_t *n,
                           const uint64_t *k, uint64_t nseg, lb_dtype dt,
                           uint64_t seed, uint64_t step, int rescale,
                           int check_finite, int nthreads,
                           uint64_t *const *indices, void *const *values,
                           lb_error *err, uint64_t *seg);

#ifdef __cplusplus
}
#endif
#endif /* LOWBAND_H */
