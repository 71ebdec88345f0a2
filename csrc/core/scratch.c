/* scratch.c - the scratch-buffer cache described in scratch.h. */
#define _DEFAULT_SOURCE   /* posix_memalign, madvise */
#include "scratch.h"

#include <pthread.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LB_SCRATCH_SLOTS 16
/* The default limit in MB: an eighth of the physical memory, at least
 * 1024 (a MoE layer's forward + backward at T = 65536, H = 1024 frees
 * 1.5 GB of outputs per step, which must all be kept to pay no faults).   */
static long default_limit_mb(void)
{
    long mb = 1024;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && (double)pages * (double)page / 8.0 / 1048576.0 > mb)
        mb = (long)((double)pages * (double)page / 8.0 / 1048576.0);
#endif
    return mb;
}

/* Bytes kept at most: LOWBAND_POOL_LIMIT_MB (default: an eighth of the
 * physical memory, at least 1024), read once.                             */
static size_t scratch_limit(void)
{
    static size_t limit = 0;
    if (!limit) {
        const char *e = getenv("LOWBAND_POOL_LIMIT_MB");
        long mb = e && *e ? strtol(e, NULL, 10) : default_limit_mb();
        limit = (size_t)(mb < 0 ? 0 : mb) << 20;
        if (!limit)
            limit = 1;   /* 0 MB: keep nothing (1 byte fits no buffer) */
    }
    return limit;
}
#define LB_SCRATCH_LIMIT scratch_limit()

/* Alignment of the pointer handed out: 64 bytes, or a whole page for
 * buffers of at least PAGE_ALIGN_MIN bytes.  Page alignment matters for
 * the large row copies (MoE dispatch / combine): a destination 16 bytes
 * past the source modulo 4096 makes every load wait on the store just
 * issued (4K aliasing, measured 10x slower), while sources from malloc,
 * NumPy or torch sit 16-64 bytes into a page, far from a page-aligned
 * destination.  The header (the block and its capacity) sits right
 * before the pointer, inside the alignment padding.                      */
#define SMALL_ALIGN ((size_t)64)
#define PAGE_ALIGN ((size_t)4096)
#define PAGE_ALIGN_MIN ((size_t)1 << 16)
/* Blocks at least this large are advised onto transparent huge pages
 * (where the system allows it on request, as NumPy does for its arrays):
 * a first touch then faults 2 MB at a time instead of 4 KB.              */
#define HUGE_ADVICE_MIN ((size_t)4 << 20)

static size_t align_for(size_t bytes)
{
    return bytes >= PAGE_ALIGN_MIN ? PAGE_ALIGN : SMALL_ALIGN;
}

typedef struct {
    void *block;     /* what the user got (the header is before it) */
    size_t cap;      /* usable bytes                                */
} slot;

/* The header before every handed-out pointer. */
typedef struct {
    void *raw;       /* what posix_memalign returned */
    size_t cap;
} header;

/* Frees a pointer handed out by lb_scratch_alloc (NULL is ignored). */
static void release(void *p)
{
    if (!p)
        return;
    header h;
    memcpy(&h, (char *)p - sizeof h, sizeof h);
    free(h.raw);
}

static slot cache[LB_SCRATCH_SLOTS];
static size_t cached_bytes = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void child_after_fork(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&lock, &fresh, sizeof lock);
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, child_after_fork);
}

void *lb_scratch_alloc(size_t bytes)
{
    pthread_once(&atfork_once, register_atfork);
    if (bytes == 0)
        bytes = 1;
    void *found = NULL;
    pthread_mutex_lock(&lock);
    int best = -1;
    for (int i = 0; i < LB_SCRATCH_SLOTS; i++)   /* smallest block that fits */
        if (cache[i].block && cache[i].cap >= bytes && cache[i].cap / 4 <= bytes &&
            (best < 0 || cache[i].cap < cache[best].cap))
            best = i;
    if (best >= 0) {
        found = cache[best].block;
        cached_bytes -= cache[best].cap;
        cache[best].block = NULL;
    }
    pthread_mutex_unlock(&lock);
    if (found)
        return found;
    size_t align = align_for(bytes);
    if (bytes > SIZE_MAX - align)
        return NULL;
    void *raw = NULL;
    if (posix_memalign(&raw, align, align + bytes) != 0)
        return NULL;
    found = (char *)raw + align;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= HUGE_ADVICE_MIN) {   /* advice only: failure changes nothing */
        uintptr_t lo = ((uintptr_t)found + PAGE_ALIGN - 1) & ~(uintptr_t)(PAGE_ALIGN - 1);
        uintptr_t hi = ((uintptr_t)found + bytes) & ~(uintptr_t)(PAGE_ALIGN - 1);
        if (hi > lo)
            (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    }
#endif
    header h = {raw, bytes};
    memcpy((char *)found - sizeof h, &h, sizeof h);
    return found;
}

void lb_scratch_free(void *p)
{
    if (!p)
        return;
    void *block = p;
    header h;
    memcpy(&h, (char *)p - sizeof h, sizeof h);
    size_t cap = h.cap;
    pthread_mutex_lock(&lock);
    if (cap <= LB_SCRATCH_LIMIT) {
        /* make room: evict the smallest cached block if all slots are used */
        int empty = -1, smallest = -1;
        for (int i = 0; i < LB_SCRATCH_SLOTS; i++) {
            if (!cache[i].block)
                empty = empty < 0 ? i : empty;
            else if (smallest < 0 || cache[i].cap < cache[smallest].cap)
                smallest = i;
        }
        void *evict = NULL;
        if (empty < 0 && smallest >= 0 && cache[smallest].cap < cap) {
            evict = cache[smallest].block;
            cached_bytes -= cache[smallest].cap;
            cache[smallest].block = NULL;
            empty = smallest;
        }
        while (empty >= 0 && cached_bytes + cap > LB_SCRATCH_LIMIT) {
            int largest = -1;   /* over the byte limit: drop the largest others */
            for (int i = 0; i < LB_SCRATCH_SLOTS; i++)
                if (cache[i].block && (largest < 0 || cache[i].cap > cache[largest].cap))
                    largest = i;
            if (largest < 0)
                break;
            release(cache[largest].block);
            cached_bytes -= cache[largest].cap;
            cache[largest].block = NULL;
        }
        if (empty >= 0 && cached_bytes + cap <= LB_SCRATCH_LIMIT) {
            cache[empty].block = block;
            cache[empty].cap = cap;
            cached_bytes += cap;
            block = NULL;
        }
        pthread_mutex_unlock(&lock);
        release(evict);
        release(block);
        return;
    }
    pthread_mutex_unlock(&lock);
    release(block);
}

void lb_scratch_trim(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < LB_SCRATCH_SLOTS; i++) {
        release(cache[i].block);
        cache[i].block = NULL;
    }
    cached_bytes = 0;
    pthread_mutex_unlock(&lock);
}
