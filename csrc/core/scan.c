/* scan.c - run-time choice of the scan kernel table. */
#include "lowband.h"
#include "scan.h"

const lb_scan_fns *lb_scan(void)
{
    switch (lb_active_isa()) {
    case LB_ISA_AVX512: return &lb_scan_avx512;
    case LB_ISA_AVX2: return &lb_scan_avx2;
    default: return &lb_scan_scalar;
    }
}
