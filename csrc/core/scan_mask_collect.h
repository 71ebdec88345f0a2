/*
 * scan_mask_collect.h - stores the elements flagged in a lane mask (the
 * shared tail of the intrinsics collect kernels in scan_avx2.c and
 * scan_avx512.c): for each set bit j of `m`, in order, element base + j.
 */
#ifndef LB_SCAN_MASK_COLLECT_H
#define LB_SCAN_MASK_COLLECT_H

#include <stdint.h>

#define LB_STORE_MASKED(m, base, bits, idx, raw, cap, found)                   \
    do {                                                                       \
        uint64_t lb_m_ = (m);                                                  \
        while (lb_m_) {                                                        \
            uint64_t lb_j_ = (base) + (uint64_t)__builtin_ctzll(lb_m_);        \
            if ((found) < (cap)) {                                             \
                (idx)[found] = lb_j_;                                          \
                (raw)[found] = (bits)[lb_j_];                                  \
            }                                                                  \
            (found)++;                                                         \
            lb_m_ &= lb_m_ - 1;                                                \
        }                                                                      \
    } while (0)

#endif
