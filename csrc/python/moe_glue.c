/* moe_glue.c - bindings of core/moe.c (MoE routing, load balancing, dispatch). */
#include "glue.h"

PyMethodDef lb_moe_methods[] = {
    {NULL, NULL, 0, NULL},
};
