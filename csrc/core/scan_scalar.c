/* scan_scalar.c - the portable (baseline x86-64 / any CPU) scan kernels. */
#define LB_SCAN_SUFFIX scalar
#include "scan_impl.h"
