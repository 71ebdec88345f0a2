/*
 * scan.h - the leaf kernels that stream over a whole input vector, compiled
 * once per instruction set (scan_scalar.c, scan_avx2.c, scan_avx512.c, all
 * from the template scan_impl.h) and chosen at run time by lb_scan().
 *
 * "Key" below is the magnitude bit pattern of an element: the raw bits with
 * the sign bit cleared.  For finite IEEE values keys order exactly like |x|;
 * keys >= the key of +Inf are non-finite (Inf, then NaNs above it).
 */
#ifndef LB_SCAN_H
#define LB_SCAN_H

#include <stddef.h>
#include <stdint.h>

#define LB_KEY32_MASK 0x7FFFFFFFu
#define LB_KEY32_INF 0x7F800000u
#define LB_KEY64_MASK 0x7FFFFFFFFFFFFFFFull
#define LB_KEY64_INF 0x7FF0000000000000ull

/* LB_DEFINE_SELECT_SMALL(T, NAME): static T NAME(T *a, T m, T r, T *q), the
 * r-th largest (1 <= r <= m) of the keys a[0..m) (a and q, m entries each,
 * are overwritten): quickselect around a median of three whose partition
 * writes every key to both ends of the other buffer and advances one end,
 * so no branch depends on the data; no histogram to clear either, which is
 * the radix select's cost on a few hundred keys.                          */
#define LB_DEFINE_SELECT_SMALL(T, NAME)                                        \
    static inline T NAME(T *a, T m, T r, T *q)                                 \
    {                                                                          \
        T *p = a;                                                              \
        while (m > 1) {                                                        \
            T x = p[0], y = p[m / 2], z = p[m - 1];                            \
            T mn = x < y ? x : y, mx = x < y ? y : x;                          \
            T piv = mx < z ? mx : z;                                           \
            piv = mn > piv ? mn : piv;                                         \
            T ng = 0, nl = 0;   /* q[0, ng) > piv, q[m - nl, m) < piv */      \
            for (T j = 0; j < m; j++) {                                        \
                T v = p[j];                                                    \
                q[ng] = v;                                                     \
                ng += v > piv;                                                 \
                q[m - 1 - nl] = v;                                             \
                nl += v < piv;                                                 \
            }                                                                  \
            T *t = p;                                                          \
            if (r <= ng) {                                                     \
                p = q;                                                         \
                m = ng;                                                        \
            } else if (r <= m - nl) {                                          \
                return piv;                                                    \
            } else {                                                           \
                r -= m - nl;                                                   \
                p = q + (m - nl);                                              \
                m = nl;                                                        \
            }                                                                  \
            q = t;                                                             \
        }                                                                      \
        return p[0];                                                           \
    }

typedef struct {
    /* Scans bits[begin, end); for every element whose key is >= lo, in index
     * order, stores (index, raw bits widened to 64) while fewer than `cap`
     * are stored.
     * Returns how many elements qualified (may exceed cap).  Sets
     * *nonfinite to 1 when any scanned key is non-finite.                  */
    uint64_t (*collect32)(const uint32_t *bits, uint64_t begin, uint64_t end,
                          uint32_t lo, uint64_t *idx, uint64_t *raw,
                          uint64_t cap, int *nonfinite);
    uint64_t (*collect64)(const uint64_t *bits, uint64_t begin, uint64_t end,
                          uint64_t lo, uint64_t *idx, uint64_t *raw,
                          uint64_t cap, int *nonfinite);
    /* Error-feedback compensation fused with collect: for i in [begin, end)
     * p = decay*e[i] + scale*g[i] (a product and a sum, each rounded: no
     * FMA), stored back into e[i]; then as collect32/64 on the keys of p.  */
    uint64_t (*ef_collect32)(float *e, const float *g, uint64_t begin,
                             uint64_t end, float decay, float scale,
                             uint32_t lo, uint64_t *idx, uint64_t *raw,
                             uint64_t cap, int *nonfinite);
    uint64_t (*ef_collect64)(double *e, const double *g, uint64_t begin,
                             uint64_t end, double decay, double scale,
                             uint64_t lo, uint64_t *idx, uint64_t *raw,
                             uint64_t cap, int *nonfinite);
    /* The same selection read-only: p = decay*e[i] + scale*g[i] computed
     * as ef_collect32/64 but not stored (e and g are only read); raw holds
     * the bits of p.  The first pass of a step that writes nothing until
     * it knows the step succeeds.                                          */
    uint64_t (*efp_collect32)(const float *e, const float *g, uint64_t begin,
                              uint64_t end, float decay, float scale,
                              uint32_t lo, uint64_t *idx, uint64_t *raw,
                              uint64_t cap, int *nonfinite);
    uint64_t (*efp_collect64)(const double *e, const double *g, uint64_t begin,
                              uint64_t end, double decay, double scale,
                              uint64_t lo, uint64_t *idx, uint64_t *raw,
                              uint64_t cap, int *nonfinite);
    /* Adds to hist[(key >> shift)] for every element of bits[begin, end). */
    void (*hist32)(const uint32_t *bits, uint64_t begin, uint64_t end,
                   int shift, uint64_t *hist);
    void (*hist64)(const uint64_t *bits, uint64_t begin, uint64_t end,
                   int shift, uint64_t *hist);
    /* Chunk kernels of float32 chunked top-k (m < 2^31).  chunk_collect32:
     * for every j in [0, m) whose key is >= lo (lo <= LB_KEY32_INF, so
     * every non-finite element is among them), in order, stores pos[o] = j
     * and raw[o] = bits[j]; returns how many (pos and raw need room for
     * m + LB_CHUNK_SLACK: whole vectors are stored).                       */
    uint32_t (*chunk_collect32)(const uint32_t *bits, uint32_t m, uint32_t lo,
                                uint32_t *pos, uint32_t *raw);
    /* The r-th largest (1 <= r <= m) of the keys a[0..m); a, t1 and t2
     * (room for m + LB_CHUNK_SLACK each) are overwritten.                  */
    uint32_t (*select32)(uint32_t *a, uint32_t m, uint32_t r, uint32_t *t1,
                         uint32_t *t2);
} lb_scan_fns;

/* Entries past the end that the chunk kernels may write. */
#define LB_CHUNK_SLACK 16
/* How far ahead (elements) chunk_collect32 prefetches: into the next
 * chunk at the end of this one (a prefetch past the data never faults). */
#ifndef LB_CHUNK_PREFETCH
#define LB_CHUNK_PREFETCH 512
#endif

/* The table for the active instruction set (lb_active_isa()). */
const lb_scan_fns *lb_scan(void);

extern const lb_scan_fns lb_scan_scalar;
extern const lb_scan_fns lb_scan_avx2;
extern const lb_scan_fns lb_scan_avx512;

#endif /* LB_SCAN_H */
