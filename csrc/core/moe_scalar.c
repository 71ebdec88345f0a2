/* moe_scalar.c - the MoE row kernels for the baseline target (SSE2 on
 * x86-64, any CPU elsewhere). */
#define LB_MOE_ISA scalar
#include "moe_isa.h"
