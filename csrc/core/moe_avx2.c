/* moe_avx2.c - the MoE row kernels compiled for AVX2 (chosen at run time
 * by lb_moe_rows_for).  FMA is not enabled: ISO C mode would not contract
 * anyway, and leaving it out keeps every result identical to moe_scalar.c. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2")
#define LB_MOE_ISA avx2
#include "moe_isa.h"
#else
typedef int lb_moe_avx2_unused;   /* other CPUs use moe_scalar.c only */
#endif
