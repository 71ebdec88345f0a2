/*
 * moe_isa.h - instantiates the MoE row kernels (moe_rows.h) for double and
 * float and defines the table lb_moe_rows_<LB_MOE_ISA>[2] ([0] float32,
 * [1] float64).  Included by one file per instruction set, which defines
 * LB_MOE_ISA (scalar, avx2) and sets the compile target.
 */
#include "moe_kernels.h"

#define LB_MOE_CAT2(a, b) a##b
#define LB_MOE_CAT(a, b) LB_MOE_CAT2(a, b)
#define LB_D(x) LB_MOE_CAT(x##_f64_, LB_MOE_ISA)

#define LB_T double
#define LB_F(x) LB_MOE_CAT(x##_f64_, LB_MOE_ISA)
#define LB_EXP exp_f64
#define LB_STREAM stream_row_f64
#define LB_TMAX DBL_MAX
#define LB_I int64_t
#define LB_IMIN INT64_MIN
#define LB_IMAX INT64_MAX
#define LB_IINF ((int64_t)0x7FF0000000000000)
#define LB_ISHIFT 63
#include "moe_rows.h"
#undef LB_T
#undef LB_F
#undef LB_EXP
#undef LB_STREAM
#undef LB_TMAX
#undef LB_I
#undef LB_IMIN
#undef LB_IMAX
#undef LB_IINF
#undef LB_ISHIFT

#define LB_T float
#define LB_F(x) LB_MOE_CAT(x##_f32_, LB_MOE_ISA)
#define LB_EXP exp_f32
#define LB_STREAM stream_row_f32
#define LB_TMAX FLT_MAX
#define LB_I int32_t
#define LB_IMIN INT32_MIN
#define LB_IMAX INT32_MAX
#define LB_IINF ((int32_t)0x7F800000)
#define LB_ISHIFT 31
#include "moe_rows.h"

#define LB_MOE_TABLE_ENTRY(sfx)                                                \
    {LB_MOE_CAT(route_rows##sfx, LB_MOE_ISA),                                  \
     LB_MOE_CAT(aux_sum_rows##sfx, LB_MOE_ISA),                                \
     LB_MOE_CAT(balance_grad_rows##sfx, LB_MOE_ISA),                           \
     LB_MOE_CAT(z_loss_rows##sfx, LB_MOE_ISA),                                 \
     LB_MOE_CAT(scatter_rows##sfx, LB_MOE_ISA),                                \
     LB_MOE_CAT(combine_rows##sfx, LB_MOE_ISA),                                \
     LB_MOE_CAT(combine_dot_rows##sfx, LB_MOE_ISA),                           \
     LB_MOE_CAT(combine_grad_rows##sfx, LB_MOE_ISA)}

const lb_moe_rows LB_MOE_CAT(lb_moe_rows_, LB_MOE_ISA)[2] = {
    LB_MOE_TABLE_ENTRY(_f32_), LB_MOE_TABLE_ENTRY(_f64_)};
