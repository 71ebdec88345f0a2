/*
 * common.c - status names, dtype sizes, thread defaults, instruction-set
 * detection and the public Philox entry point.
 */
#ifdef __linux__
#define _GNU_SOURCE /* CPU_COUNT and sched_getaffinity */
#include <sched.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "lowband.h"
#include "rng.h"
#include "threads.h"

const char *lb_status_name(lb_status s)
{
    switch (s) {
    case LB_OK: return "LB_OK";
    case LB_EINVAL: return "LB_EINVAL";
    case LB_ENOMEM: return "LB_ENOMEM";
    case LB_ENONFINITE: return "LB_ENONFINITE";
    case LB_EFORMAT: return "LB_EFORMAT";
    case LB_ERANGE: return "LB_ERANGE";
    case LB_EOVERFLOW: return "LB_EOVERFLOW";
    }
    return "LB_E?";
}

lb_status lb_size_mul(uint64_t a, uint64_t b, uint64_t *out)
{
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r) || r > (uint64_t)SIZE_MAX)
        return LB_EOVERFLOW;
    *out = r;
    return LB_OK;
}

void *lb_alloc_n(uint64_t count, uint64_t size, int zero)
{
    uint64_t bytes;
    if (lb_size_mul(count ? count : 1, size ? size : 1, &bytes) != LB_OK)
        return NULL;
    return zero ? calloc((size_t)bytes, 1) : malloc((size_t)bytes);
}

size_t lb_dtype_size(lb_dtype dt)
{
    switch (dt) {
    case LB_F32: return 4;
    case LB_F64: return 8;
    case LB_F16: return 2;
    case LB_BF16: return 2;
    }
    return 0;
}

/* Default team size: omp_get_max_threads() (which honours OMP_NUM_THREADS),
 * capped by the CPUs in this process's affinity mask read now, so that a
 * launcher that pins W ranks to W cores after start-up is respected.       */
int lb_max_threads(void)
{
    int n = omp_get_max_threads();
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int cpus = CPU_COUNT(&set);
        if (cpus >= 1 && cpus < n)
            n = cpus;
    }
#endif
    return n < 1 ? 1 : n;
}

/* ---- instruction-set selection --------------------------------------- */

static int lb_cpu_isa(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return LB_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
        return LB_ISA_AVX2;
#endif
    return LB_ISA_SCALAR;
}

static int lb_env_isa(int best)
{
    const char *e = getenv("LOWBAND_FORCE_ISA");
    int want = best;
    if (!e || !*e)
        return best;
    if (strcmp(e, "scalar") == 0)
        want = LB_ISA_SCALAR;
    else if (strcmp(e, "avx2") == 0)
        want = LB_ISA_AVX2;
    else if (strcmp(e, "avx512") == 0)
        want = LB_ISA_AVX512;
    return want < best ? want : best;
}

static volatile int lb_isa_cached = -1;

lb_isa lb_active_isa(void)
{
    int v = lb_isa_cached;
    if (v < 0) {
        v = lb_env_isa(lb_cpu_isa());
        lb_isa_cached = v;
    }
    return (lb_isa)v;
}

lb_status lb_set_isa(int isa)
{
    if (isa == -1) {
        lb_isa_cached = lb_env_isa(lb_cpu_isa());
        return LB_OK;
    }
    if (isa < LB_ISA_SCALAR || isa > LB_ISA_AVX512 || isa > lb_cpu_isa())
        return LB_EINVAL;
    lb_isa_cached = isa;
    return LB_OK;
}

const char *lb_isa_name(lb_isa isa)
{
    switch (isa) {
    case LB_ISA_SCALAR: return "scalar";
    case LB_ISA_AVX2: return "avx2";
    case LB_ISA_AVX512: return "avx512";
    }
    return "?";
}

/* ---- Philox ------------------------------------------------------------ */

lb_status lb_philox_fill(uint64_t seed, uint64_t step, int domain,
                         uint64_t first_block, uint32_t *out, uint64_t n,
                         int nthreads)
{
    if (step >= LB_MAX_STEP || domain < 0 || domain > 255 || (!out && n))
        return LB_EINVAL;
    lb_philox_key key = lb_philox_make(seed, step, domain);
    uint64_t nblocks = (n + 3) / 4;
    int team = lb_team(nthreads, nblocks / 4096);
    LB_OMP(omp parallel for num_threads(team) schedule(static) if(team > 1))
    for (uint64_t b = 0; b < nblocks; b++) {
        lb_u32x4 r = lb_philox_block(&key, first_block + b);
        for (int lane = 0; lane < 4; lane++)
            if (4 * b + lane < n)
                out[4 * b + lane] = r.v[lane];
    }
    return LB_OK;
}
