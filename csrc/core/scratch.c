/* scratch.c - the scratch-buffer cache described in scratch.h. */
#include "scratch.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LB_SCRATCH_SLOTS 16
/* Bytes kept at most: LOWBAND_POOL_LIMIT_MB (default 1024), read once. */
static size_t scratch_limit(void)
{
    static size_t limit = 0;
    if (!limit) {
        const char *e = getenv("LOWBAND_POOL_LIMIT_MB");
        long mb = e && *e ? strtol(e, NULL, 10) : 1024;
        limit = (size_t)(mb < 0 ? 0 : mb) << 20;
        if (!limit)
            limit = 1;   /* 0 MB: keep nothing (1 byte fits no buffer) */
    }
    return limit;
}
#define LB_SCRATCH_LIMIT scratch_limit()
#define HEADER 64   /* keeps the user pointer 64-byte aligned */

typedef struct {
    void *block;     /* what malloc returned (header included) */
    size_t cap;      /* usable bytes                           */
} slot;

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
    size_t found_cap = 0;
    pthread_mutex_lock(&lock);
    int best = -1;
    for (int i = 0; i < LB_SCRATCH_SLOTS; i++)   /* smallest block that fits */
        if (cache[i].block && cache[i].cap >= bytes && cache[i].cap / 4 <= bytes &&
            (best < 0 || cache[i].cap < cache[best].cap))
            best = i;
    if (best >= 0) {
        found = cache[best].block;
        found_cap = cache[best].cap;
        cached_bytes -= found_cap;
        cache[best].block = NULL;
    }
    pthread_mutex_unlock(&lock);
    if (!found) {
        if (bytes > SIZE_MAX - HEADER)
            return NULL;
        found = malloc(bytes + HEADER);
        if (!found)
            return NULL;
        found_cap = bytes;
    }
    memcpy(found, &found_cap, sizeof found_cap);
    return (char *)found + HEADER;
}

void lb_scratch_free(void *p)
{
    if (!p)
        return;
    void *block = (char *)p - HEADER;
    size_t cap;
    memcpy(&cap, block, sizeof cap);
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
            free(cache[largest].block);
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
        free(evict);
        free(block);
        return;
    }
    pthread_mutex_unlock(&lock);
    free(block);
}

void lb_scratch_trim(void)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < LB_SCRATCH_SLOTS; i++) {
        free(cache[i].block);
        cache[i].block = NULL;
    }
    cached_bytes = 0;
    pthread_mutex_unlock(&lock);
}
