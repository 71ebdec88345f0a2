/* moe_avx512.c - the MoE row kernels compiled for AVX-512 (F, BW, VL, DQ)
 * with 512-bit vectors preferred; chosen at run time by lb_moe_rows_for.
 * Same operations in the same order as moe_scalar.c: the same bytes.     */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#define LB_MOE_ISA avx512
#include "moe_isa.h"
#else
typedef int lb_moe_avx512_unused;   /* other CPUs use moe_scalar.c only */
#endif
