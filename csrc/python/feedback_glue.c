/* feedback_glue.c - bindings of core/feedback.c (fused error feedback). */
#include "glue.h"

PyMethodDef lb_feedback_methods[] = {
    {NULL, NULL, 0, NULL},
};
