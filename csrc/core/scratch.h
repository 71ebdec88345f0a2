/*
 * scratch.h - a small process-wide cache of large scratch buffers.
 *
 * Kernels that need big temporary buffers on every call (top-k candidate
 * buffers, sample keys) take them from here: a freed buffer is kept (up to
 * LB_SCRATCH_SLOTS buffers, LB_SCRATCH_LIMIT bytes in all) and handed to the
 * next request it fits, so its pages stay mapped instead of being faulted
 * and zeroed by the kernel on every call.  Large output arrays of the glue
 * come from here too (a memory pool).  At most LOWBAND_POOL_LIMIT_MB
 * megabytes (default 1024) are kept; lb_scratch_trim() empties the cache.
 * Thread-safe; fork-safe (the lock is reinitialised in a child).
 */
#ifndef LB_SCRATCH_H
#define LB_SCRATCH_H

#include <stddef.h>

/* At least `bytes` bytes (64-byte aligned), or NULL when out of memory.   */
void *lb_scratch_alloc(size_t bytes);
/* Returns a buffer from lb_scratch_alloc (NULL is ignored).               */
void lb_scratch_free(void *p);
/* Frees every cached buffer.                                              */
void lb_scratch_trim(void);

#endif /* LB_SCRATCH_H */
