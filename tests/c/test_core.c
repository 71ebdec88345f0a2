/*
 * test_core.c - C-level tests of lowband's core, linked without Python:
 *   gcc -std=c11 -fopenmp -Icsrc csrc/core/(all .c) tests/c/test_core.c -lm
 * Prints one line per check and exits non-zero on the first failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lowband.h"

static int failures = 0;
#define CHECK(cond, what)                                                      \
    do {                                                                       \
        if (cond) {                                                            \
            printf("ok   %s\n", what);                                         \
        } else {                                                               \
            printf("FAIL %s (%s:%d)\n", what, __FILE__, __LINE__);             \
            failures++;                                                        \
        }                                                                      \
    } while (0)

static void test_philox(void)
{
    uint32_t w[4];
    /* Random123 KAT: counter 0, key 0 */
    CHECK(lb_philox_fill(0, 0, 0, 0, w, 4, 1) == LB_OK, "philox fill");
    CHECK(w[0] == 0x6627E8D5u && w[1] == 0xE169C58Du && w[2] == 0xBC57AC4Cu &&
              w[3] == 0x9B00DBD8u,
          "philox known answer");
    CHECK(lb_philox_fill(0, LB_MAX_STEP, 0, 0, w, 4, 1) == LB_EINVAL, "philox step range");
}

static void test_crc(void)
{
    CHECK(lb_crc32c(0, "123456789", 9) == 0xE3069283u, "crc32c check value");
    lb_set_isa(LB_ISA_SCALAR);
    CHECK(lb_crc32c(0, "123456789", 9) == 0xE3069283u, "crc32c check value (table)");
    lb_set_isa(-1);
}

/* Naive top-k: repeatedly take the largest remaining |x|, lowest index. */
static int naive_topk_matches(const float *x, uint64_t n, uint64_t k, const lb_sparse *s)
{
    char *taken = calloc(n ? n : 1, 1);
    uint64_t *want = malloc((k ? k : 1) * sizeof(uint64_t));
    for (uint64_t j = 0; j < k; j++) {
        uint64_t best = n;
        for (uint64_t i = 0; i < n; i++) {
            if (taken[i])
                continue;
            float a = x[i] < 0 ? -x[i] : x[i];
            float b = best < n ? (x[best] < 0 ? -x[best] : x[best]) : -1.0f;
            if (best == n || a > b)
                best = i;
        }
        taken[best] = 1;
    }
    uint64_t c = 0;
    for (uint64_t i = 0; i < n; i++)
        if (taken[i])
            want[c++] = i;
    int ok = s->count == k;
    for (uint64_t j = 0; ok && j < k; j++)
        ok = s->indices[j] == want[j] && ((const float *)s->values)[j] == x[want[j]];
    free(taken);
    free(want);
    return ok;
}

static void test_topk(void)
{
    enum { N = 3001 };
    float *x = malloc(N * sizeof(float));
    uint32_t st = 12345;
    for (int i = 0; i < N; i++) {
        st = st * 1103515245u + 12345u;
        x[i] = (float)((int)(st >> 16) % 200 - 100) / 7.0f;   /* many ties */
    }
    int all = 1;
    for (uint64_t k = 0; k <= N; k += 250) {
        for (int threads = 1; threads <= 4; threads *= 2) {
            lb_sparse s;
            lb_error e;
            if (lb_topk(x, N, LB_F32, k, 1, threads, &s, &e) != LB_OK) {
                all = 0;
                continue;
            }
            all &= naive_topk_matches(x, N, k, &s);
            lb_sparse_free(&s);
        }
    }
    CHECK(all, "topk matches the naive selection (ties to lower index, 1/2/4 threads)");
    lb_sparse s;
    lb_error e = {0};
    x[77] = 1.0f / 0.0f;
    CHECK(lb_topk(x, N, LB_F32, 5, 1, 1, &s, &e) == LB_ENONFINITE && e.index == 77,
          "topk reports the first non-finite index");
    CHECK(lb_topk(x, N, LB_F32, N + 1, 1, 1, &s, &e) == LB_EINVAL, "topk k > n");
    free(x);
}

static void test_randomk(void)
{
    uint64_t idx[50];
    CHECK(lb_randomk_indices(1000, 50, 7, 3, idx) == LB_OK, "randomk");
    int sorted = 1;
    for (int i = 1; i < 50; i++)
        sorted &= idx[i] > idx[i - 1];
    CHECK(sorted && idx[49] < 1000, "randomk indices distinct, ascending, in range");
    uint64_t again[50];
    lb_randomk_indices(1000, 50, 7, 3, again);
    CHECK(memcmp(idx, again, sizeof idx) == 0, "randomk is a function of (seed, step, n, k)");
    /* 32-bit indices on teams of 1 and 3: the 64-bit ones, sample and complement */
    const uint64_t n = 300001, ks[2] = {3001, 200000};
    uint64_t *wide = malloc(200000 * sizeof(uint64_t));
    uint32_t *narrow = malloc(200000 * sizeof(uint32_t));
    for (int c = 0; c < 2 && wide && narrow; c++) {
        CHECK(lb_randomk_indices(n, ks[c], 5, 1, wide) == LB_OK, "randomk 64-bit");
        for (int t = 1; t <= 3; t += 2) {
            int same = lb_randomk_indices32(n, ks[c], 5, 1, t, narrow) == LB_OK;
            for (uint64_t i = 0; i < ks[c] && same; i++)
                same = narrow[i] == wide[i];
            CHECK(same, "randomk 32-bit indices equal the 64-bit ones on any team");
        }
    }
    CHECK(lb_randomk_indices32((uint64_t)1 << 33, 1, 5, 1, 1, narrow) == LB_EINVAL,
          "randomk 32-bit refuses n > 2^32");
    free(wide);
    free(narrow);
}

static void test_index_codec(void)
{
    uint32_t idx[5] = {3, 4, 200, 70000, 70001};
    uint64_t sizes[3];
    lb_index_sizes(idx, 4, 5, 100000, sizes);
    uint8_t buf[64];
    uint32_t back[5];
    lb_error e;
    CHECK(lb_index_encode(idx, 4, 5, 100000, LB_IDX_VARINT, buf, sizes[1]) == LB_OK, "varint encode");
    CHECK(lb_index_decode(buf, sizes[1], LB_IDX_VARINT, 5, 100000, 4, back, &e) == LB_OK &&
              memcmp(back, idx, sizeof idx) == 0,
          "varint round trip");
    CHECK(lb_index_decode(buf, sizes[1] - 1, LB_IDX_VARINT, 5, 100000, 4, back, &e) == LB_EFORMAT,
          "varint truncated -> LB_EFORMAT");
    CHECK(lb_index_decode(buf, sizes[1], LB_IDX_VARINT, 5, 70001, 4, back, &e) == LB_EFORMAT,
          "varint out of range -> LB_EFORMAT");
}

static void test_aggregate(void)
{
    uint32_t ia[2] = {0, 2}, ib[2] = {2, 3};
    float va[2] = {1, 3}, vb[2] = {5, 7}, out[4];
    lb_sparse_view v[2] = {{ia, va, 2, 4}, {ib, vb, 2, 4}};
    CHECK(lb_aggregate(v, 2, 4, LB_F32, LB_AGG_CONTRIBUTOR_MEAN, out, 2, NULL) == LB_OK &&
              out[0] == 1 && out[1] == 0 && out[2] == 4 && out[3] == 7,
          "aggregate contributor mean");
    ib[1] = 4;
    lb_error e;
    CHECK(lb_aggregate(v, 2, 4, LB_F32, LB_AGG_SUM, out, 1, &e) == LB_ERANGE && e.index == 1,
          "aggregate rejects an out-of-range index");
}

/* The one size helper, and each family driven to the edge of its sizes. */
static void test_sizes(void)
{
    uint64_t r = 7;
    CHECK(lb_size_mul(UINT64_MAX, 1, &r) == LB_OK && r == UINT64_MAX, "size_mul max * 1");
    CHECK(lb_size_mul(0, UINT64_MAX, &r) == LB_OK && r == 0, "size_mul 0 * max");
    CHECK(lb_size_mul((uint64_t)1 << 32, (uint64_t)1 << 32, &r) == LB_EOVERFLOW && r == 0,
          "size_mul 2^32 * 2^32 overflows, *out untouched");
    CHECK(lb_size_mul((uint64_t)1 << 62, 4, &r) == LB_EOVERFLOW, "size_mul 2^62 * 4 overflows");
    CHECK(lb_size_mul(((uint64_t)1 << 61) - 1, 8, &r) == LB_OK && r == UINT64_MAX - 7,
          "size_mul just below the edge");
    CHECK(lb_alloc_n((uint64_t)1 << 62, 8, 0) == NULL, "alloc_n refuses an overflowing size");
    void *one = lb_alloc_n(0, 8, 1);
    CHECK(one != NULL, "alloc_n of 0 elements is a real allocation");
    free(one);

    /* sparsify: tiles and chunks far beyond the data cost what the data costs */
    float x[1000];
    for (int i = 0; i < 1000; i++)
        x[i] = (float)((i * 37) % 101) - 50.0f;
    lb_sparse s;
    lb_error e = {0};
    uint64_t big = (uint64_t)1 << 31;
    CHECK(lb_topk_tiled(x, 10, 100, LB_F32, big, big, 1, 1, 1, &s, &e) == LB_OK && s.count == 1,
          "topk_tiled with (2^31, 2^31) tiles on 10 x 100");
    if (s.count == 1)
        lb_sparse_free(&s);
    CHECK(lb_topk_tiled(x, 10, 100, LB_F32, big, big, big * big, 1, 1, &s, &e) == LB_OK &&
              s.count == 1000,
          "topk_tiled with k = 2^62 keeps the whole (clamped) tile");
    lb_sparse_free(&s);
    CHECK(lb_topk_tiled(x, 10, 100, LB_F32, big + 1, 1, 1, 1, 1, &s, &e) == LB_EINVAL,
          "topk_tiled refuses a tile side above LB_MAX_TILE");
    CHECK(lb_topk_tiled(x, (uint64_t)1 << 33, (uint64_t)1 << 31, LB_F32, 1, 1, 1, 1, 1, &s, &e) ==
              LB_EOVERFLOW,
          "topk_tiled refuses rows * cols overflowing");
    CHECK(lb_topk_chunked(x, 10, LB_F32, LB_MAX_CHUNK, LB_MAX_CHUNK, 1, 1, &s, &e) == LB_OK &&
              s.count == 10,
          "topk_chunked with chunk = k = LB_MAX_CHUNK on 10 elements");
    lb_sparse_free(&s);
    CHECK(lb_topk_chunked(x, 10, LB_F32, LB_MAX_CHUNK + 1, 1, 1, 1, &s, &e) == LB_EINVAL,
          "topk_chunked refuses chunk above LB_MAX_CHUNK");
    float ev[10] = {0}, gv[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    CHECK(lb_ef_topk_chunked(ev, gv, 10, LB_F32, 1.0, 1.0, LB_MAX_CHUNK, 3, 1, 1, &s, &e) == LB_OK &&
              s.count == 3 && s.indices[0] == 7,
          "fused chunked top-k with chunk = LB_MAX_CHUNK");
    lb_sparse_free(&s);

    /* randomk: bound 2^32 in Floyd's draw (was a division by zero) */
    uint64_t idx[2];
    CHECK(lb_randomk_indices((uint64_t)1 << 32, 1, 0, 0, idx) == LB_OK && idx[0] < ((uint64_t)1 << 32),
          "randomk n = 2^32, k = 1");
    CHECK(lb_randomk_indices(((uint64_t)1 << 32) + 1, 2, 5, 0, idx) == LB_OK && idx[0] < idx[1],
          "randomk n = 2^32 + 1, k = 2 (draws at bounds 2^32 and 2^32 + 1)");

    /* quant: a block longer than the tensor is the tensor */
    uint8_t codes[1000], codes2[1000];
    float sc[2], sc2[2];
    CHECK(lb_quantize(x, 1000, LB_F32, LB_F32, 8, LB_MAX_BLOCK, 0, 0, 0, 1, 1, codes, sc,
                      &e) == LB_OK &&
              lb_quantize(x, 1000, LB_F32, LB_F32, 8, 0, 0, 0, 0, 1, 1, codes2, sc2, &e) == LB_OK &&
              memcmp(codes, codes2, 1000) == 0 && sc[0] == sc2[0],
          "quantize block = LB_MAX_BLOCK equals the per-tensor block");
    CHECK(lb_sign(x, 1000, LB_F32, 1, LB_MAX_BLOCK, 1, 1, codes, sc, &e) == LB_OK &&
              lb_sign(x, 1000, LB_F32, 1, 0, 1, 1, codes2, sc2, &e) == LB_OK &&
              memcmp(codes, codes2, 125) == 0 && sc[0] == sc2[0],
          "sign block = LB_MAX_BLOCK equals the per-tensor block");
    CHECK(lb_qsgd(x, 1000, LB_F32, LB_F32, 4, LB_MAX_BLOCK, 1, 0, 1, 1, codes, sc, &e) == LB_OK &&
              lb_qsgd(x, 1000, LB_F32, LB_F32, 4, 0, 1, 0, 1, 1, codes2, sc2, &e) == LB_OK &&
              memcmp(codes, codes2, lb_packed_bytes(1000, 4)) == 0 && sc[0] == sc2[0],
          "qsgd block = LB_MAX_BLOCK equals the per-tensor block");
    int8_t ex[2], ex2[2];
    CHECK(lb_minifloat(x, 1000, LB_F32, 3, 0, LB_MAX_BLOCK, 127, 1, 1, codes, ex, &e) == LB_OK &&
              lb_minifloat(x, 1000, LB_F32, 3, 0, 0, 127, 1, 1, codes2, ex2, &e) == LB_OK &&
              memcmp(codes, codes2, lb_packed_bytes(1000, 4)) == 0 && ex[0] == ex2[0],
          "minifloat block = LB_MAX_BLOCK equals the per-tensor block");
}

/* Scales lowered so that the largest code decodes finite: FLT_MAX input
 * encodes and decodes to finite values near FLT_MAX; float64 input beyond
 * what a float32 scale represents is LB_ERANGE.                           */
static void test_scale_cap(void)
{
    const float fmax = 3.40282347e38f;
    float x[4] = {fmax, 1.0f, -fmax, 0.5f}, out[4], sc[1];
    uint8_t codes[4];
    lb_error e = {0};
    int ok = lb_quantize(x, 4, LB_F32, LB_F32, 8, 0, 0, 0, 0, 1, 1, codes, sc, &e) == LB_OK;
    float table[256];
    for (int c = 0; c < 256; c++)
        table[c] = (float)(c - 127);
    ok = ok && lb_table_decode(codes, 4, 8, table, sc, 0, LB_F32, out, 1) == LB_OK;
    CHECK(ok && out[0] > 0.99f * fmax && out[0] <= fmax && out[2] < -0.99f * fmax &&
              out[1] == 0.0f,
          "quantize([FLT_MAX, 1, -FLT_MAX, 0.5], 8) decodes finite");
    float h[4] = {65504.0f, 65504.0f, 1.0f, 0.0f};   /* float16 values, norm 92637 */
    ok = lb_qsgd(h, 4, LB_F32, LB_F16, 4, 0, 1, 0, 1, 1, codes, sc, &e) == LB_OK;
    CHECK(ok && sc[0] > 65500.0f && sc[0] < 65520.0f,
          "qsgd norm for a float16 output is lowered below 65520");
    CHECK(lb_qsgd(x, 4, LB_F32, LB_F16, 4, 0, 1, 0, 1, 1, codes, sc, &e) == LB_ERANGE,
          "qsgd of FLT_MAX for a float16 output is LB_ERANGE");
    double big[2] = {1e300, 1.0};
    CHECK(lb_quantize(big, 2, LB_F64, LB_F64, 8, 0, 0, 0, 0, 1, 1, codes, sc, &e) == LB_ERANGE,
          "quantize of 1e300 (float64) is LB_ERANGE");
}

/* lb_topk_group / lb_ef_topk_group: each segment's result is lb_topk's
 * (resp. lb_ef_topk's) on it, for 1 and 2 threads; a failure names the
 * lowest failing segment and returns nothing.                             */
static void test_group(void)
{
    enum { A = 50, B = 300001 };
    float *x = malloc((A + B) * sizeof(float)), *e = calloc(A + B, sizeof(float));
    float *e1 = calloc(A + B, sizeof(float));
    if (!x || !e || !e1) {
        CHECK(0, "group: allocation");
        return;
    }
    for (uint64_t i = 0; i < A + B; i++)
        x[i] = (float)((i * 2654435761u) % 1000) - 500.0f;
    const void *xs[3] = {x, x, x + A};
    const uint64_t n[3] = {0, A, B}, k[3] = {0, 7, 3000};
    int same = 1;
    for (int t = 1; t <= 2; t++) {
        lb_sparse out[3], one;
        lb_error err = {0};
        uint64_t seg = 0;
        same &= lb_topk_group(xs, n, k, 3, LB_F32, 1, t, out, &err, &seg) == LB_OK;
        for (int s = 0; s < 3 && same; s++) {
            same &= lb_topk(xs[s], n[s], LB_F32, k[s], 1, 1, &one, &err) == LB_OK &&
                    one.count == out[s].count &&
                    !memcmp(one.indices, out[s].indices, one.count * sizeof(uint64_t)) &&
                    !memcmp(one.values, out[s].values, one.count * sizeof(float));
            lb_sparse_free(&one);
        }
        for (int s = 0; s < 3; s++)
            lb_sparse_free(out + s);
        void *es[3] = {e, e, e + A};
        const void *gs[3] = {x, x, x + A};
        same &= lb_ef_topk_group(es, gs, n, k, 3, LB_F32, 1.0, 1.0, 1, t, out, &err, &seg) == LB_OK;
        for (int s = 1; s < 3 && same; s++) {
            same &= lb_ef_topk(e1 + (s == 2 ? A : 0), x + (s == 2 ? A : 0), n[s], LB_F32, 1.0, 1.0,
                               k[s], 1, 1, &one, &err) == LB_OK &&
                    one.count == out[s].count &&
                    !memcmp(one.indices, out[s].indices, one.count * sizeof(uint64_t));
            lb_sparse_free(&one);
        }
        same &= !memcmp(e, e1, (A + B) * sizeof(float));
        for (int s = 0; s < 3; s++)
            lb_sparse_free(out + s);
    }
    CHECK(same, "topk/ef_topk group equal the per-segment calls (1/2 threads)");
    lb_sparse out[3];
    lb_error err = {0};
    uint64_t seg = 0;
    x[A + 123] = 1.0f / 0.0f;
    x[7] = 0.0f / 0.0f;
    CHECK(lb_topk_group(xs, n, k, 3, LB_F32, 1, 2, out, &err, &seg) == LB_ENONFINITE &&
              seg == 1 && err.index == 7 && !out[2].indices && !out[2].values,
          "topk group: the lowest failing segment, nothing returned");
    const uint64_t big_k[3] = {0, A + 1, 1};
    CHECK(lb_topk_group(xs, n, big_k, 3, LB_F32, 1, 1, out, &err, &seg) == LB_EINVAL && seg == 1,
          "topk group: k > n names the segment");
    /* all or nothing: the bad gradients of segments 1 and 2 fail the group
     * before any state is written (the large segment's own is planned too) */
    memcpy(e1, e, (A + B) * sizeof(float));
    void *es[3] = {e, e, e + A};
    CHECK(lb_ef_topk_group(es, xs, n, k, 3, LB_F32, 1.0, 1.0, 1, 2, out, &err, &seg) ==
                  LB_ENONFINITE && seg == 1 && err.index == 7 && !out[2].indices &&
              !memcmp(e, e1, (A + B) * sizeof(float)),
          "ef_topk group: a failure leaves every state unchanged");
    x[7] = 1.0f;
    e[A + 5] = 3e38f;
    x[A + 5] = 3e38f;
    memcpy(e1, e, (A + B) * sizeof(float));
    CHECK(lb_ef_topk_group(es, xs, n, k, 3, LB_F32, 1.0, 1.0, 1, 1, out, &err, &seg) ==
                  LB_ENONFINITE && seg == 2 && err.index == 123 &&
              !memcmp(e, e1, (A + B) * sizeof(float)),
          "ef_topk group: g's non-finite value named before an overflow");
    x[A + 123] = 1.0f;
    CHECK(lb_ef_topk(e + A, x + A, B, LB_F32, 1.0, 1.0, 3000, 1, 2, out, &err) == LB_EOVERFLOW &&
              err.index == 5 && !memcmp(e, e1, (A + B) * sizeof(float)),
          "ef_topk: an overflow of p leaves the state unchanged");
    free(x);
    free(e);
    free(e1);
}

int main(void)
{
    test_philox();
    test_crc();
    test_topk();
    test_randomk();
    test_index_codec();
    test_aggregate();
    test_sizes();
    test_scale_cap();
    test_group();
    printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
    return failures != 0;
}
