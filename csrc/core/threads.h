/*
 * threads.h - internal helpers for OpenMP parallel regions.
 *
 * Rules: every parallel region names its team size explicitly
 * with num_threads(); a team of one never enters the OpenMP runtime (so a
 * forked child that is forced serial cannot deadlock in libgomp, and a small
 * tensor pays no team set-up: omp_serial.c); work is cut
 * into LB_CHUNK-sized pieces that do not depend on the thread count.
 */
#ifndef LB_THREADS_H
#define LB_THREADS_H

#include <stdint.h>
#include "lowband.h"

#ifdef _OPENMP
#include <omp.h>
#define LB_OMP(x) _Pragma(#x)
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_max_threads(void) { return 1; }
#define LB_OMP(x)
#endif

/* Number of chunks of `chunk` elements covering n elements (0 for chunk
 * 0); no overflow for any n and chunk.                                    */
static inline uint64_t lb_num_chunks(uint64_t n, uint64_t chunk)
{
    return chunk ? n / chunk + (n % chunk != 0) : 0;
}

/* Team size for `work` independent items: at least 1, at most nthreads and
 * never more than the number of items.  Teams of one run without OpenMP.    */
static inline int lb_team(int nthreads, uint64_t work)
{
    if (nthreads < 1)
        return 1;
    if ((uint64_t)nthreads > work)
        return work ? (int)work : 1;
    return nthreads;
}

/* [begin, end) of part `t` of `parts` near-equal contiguous parts of n. */
static inline void lb_split(uint64_t n, int parts, int t, uint64_t *begin,
                            uint64_t *end)
{
    uint64_t q = n / (uint64_t)parts, r = n % (uint64_t)parts;
    uint64_t t64 = (uint64_t)t;
    *begin = t64 * q + (t64 < r ? t64 : r);
    *end = *begin + q + (t64 < r ? 1 : 0);
}

/* Lower the status kept in *acc to the first failure: safe to call from
 * several threads, the failure with the lowest `where` wins, so the
 * reported error does not depend on scheduling.                           */
static inline void lb_record_error(lb_status *acc, uint64_t *acc_where,
                                   lb_status s, uint64_t where)
{
    if (s == LB_OK)
        return;
    LB_OMP(omp critical(lb_record_error))
    {
        if (*acc == LB_OK || where < *acc_where) {
            *acc = s;
            *acc_where = where;
        }
    }
}

#endif /* LB_THREADS_H */
