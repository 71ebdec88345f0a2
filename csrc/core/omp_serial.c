/*
 * omp_serial.c - makes "a team of one never enters the OpenMP runtime"
 * (threads.h) true under GCC's libgomp.
 *
 * GCC compiles `#pragma omp parallel ... num_threads(team) if(team > 1)`
 * into a call GOMP_parallel(body, data, 1, flags) when the team is one:
 * libgomp then still builds a team, takes locks and may wake its pool
 * (futex system calls), about 0.5-1 us per region, several regions per
 * kernel: on a tensor of a few elements that is most of a call's cost.
 * This file defines GOMP_parallel for the objects of this library only
 * (hidden visibility, so calls bind here at link time and no other
 * library in the process sees it): a request for one thread, made outside
 * any parallel region, runs the body directly on the calling thread, where
 * omp_get_thread_num() = 0 and omp_get_num_threads() = 1 exactly as in a
 * team of one, and orphaned worksharing, barriers and critical sections
 * behave as in a team of one (OpenMP 5.2, 2.1.1 / 11.5).  Anything else
 * goes to libgomp through GOMP_parallel_start / GOMP_parallel_end, which
 * is what GOMP_parallel does itself for flags 0 (no proc_bind clause is
 * used in this library).  Other compilers (clang's __kmpc_fork_call) never
 * call this.
 */
#if defined(_OPENMP) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#include <omp.h>

void GOMP_parallel_start(void (*fn)(void *), void *data, unsigned num_threads);
void GOMP_parallel_end(void);

/* Contract: as libgomp's GOMP_parallel for this library's regions (flags
 * 0); runs fn(data) inline for a serial request outside a parallel region. */
__attribute__((visibility("hidden"))) void GOMP_parallel(void (*fn)(void *), void *data,
                                                         unsigned num_threads, unsigned flags)
{
    (void)flags;
    if (num_threads == 1 && omp_get_level() == 0) {
        fn(data);
        return;
    }
    GOMP_parallel_start(fn, data, num_threads);
    fn(data);
    GOMP_parallel_end();
}
#else
typedef int lb_omp_serial_unused; /* ISO C: a translation unit is not empty */
#endif
