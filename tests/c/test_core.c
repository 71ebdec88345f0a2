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

int main(void)
{
    test_philox();
    test_crc();
    test_topk();
    test_randomk();
    test_index_codec();
    test_aggregate();
    printf("%s (%d failures)\n", failures ? "FAILED" : "PASSED", failures);
    return failures != 0;
}
