/* quant_glue.c - bindings of core/quant.c and core/pack.c (quantizers, bit packing). */
#include "glue.h"

PyMethodDef lb_quant_methods[] = {
    {NULL, NULL, 0, NULL},
};
