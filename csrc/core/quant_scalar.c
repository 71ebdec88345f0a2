/* quant_scalar.c - the portable (baseline x86-64 / any CPU) quantization kernels. */
#define LB_QUANT_SUFFIX scalar
#include "quant_impl.h"
