/*
 * module.c - the lowband._core extension module: initialisation, the
 * FormatError exception, thread and instruction-set settings, the fork guard
 * hook and Philox access.  The bindings of each kernel family live in their
 * own *_glue.c file and export a method table that is concatenated here.
 */
#define LB_GLUE_MAIN
#include "glue.h"

#include "core/scratch.h"

/* ---- settings ------------------------------------------------------------ */

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    if (arg == Py_None) {
        lb_glue_default_threads = 0;
        Py_RETURN_NONE;
    }
    if (PyBool_Check(arg) || !PyLong_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "n: expected None or an int >= 1, got %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "n: expected an int in [1, 4096], got %ld", n);
        return NULL;
    }
    lb_glue_default_threads = (int)n;
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(lb_glue_auto_threads());
}

static PyObject *py_after_fork_child(PyObject *self, PyObject *unused)
{
    lb_glue_forked_child = 1;
    Py_RETURN_NONE;
}

static PyObject *py_forked_child(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(lb_glue_forked_child);
}

static PyObject *py_isa(PyObject *self, PyObject *unused)
{
    return PyUnicode_FromString(lb_isa_name(lb_active_isa()));
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg)
{
    int isa;
    if (arg == Py_None) {
        isa = -1;
    } else {
        const char *s = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
        if (!s) {
            PyErr_SetString(PyExc_TypeError, "isa: expected 'scalar', 'avx2', 'avx512' or None");
            return NULL;
        }
        if (strcmp(s, "scalar") == 0)
            isa = LB_ISA_SCALAR;
        else if (strcmp(s, "avx2") == 0)
            isa = LB_ISA_AVX2;
        else if (strcmp(s, "avx512") == 0)
            isa = LB_ISA_AVX512;
        else {
            PyErr_Format(PyExc_ValueError,
                         "isa: expected 'scalar', 'avx2', 'avx512' or None, got %R", arg);
            return NULL;
        }
    }
    if (lb_set_isa(isa) != LB_OK) {
        PyErr_Format(PyExc_ValueError, "isa: %R is not supported by this CPU", arg);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* philox(seed, step, domain, first_block, n) -> uint32 array of raw words. */
static PyObject *py_philox(PyObject *self, PyObject *args)
{
    PyObject *seed_o, *step_o, *domain_o, *first_o, *n_o;
    uint64_t seed, step, domain, first, n;
    if (!PyArg_ParseTuple(args, "OOOOO:philox", &seed_o, &step_o, &domain_o,
                          &first_o, &n_o))
        return NULL;
    if (lb_py_u64(seed_o, "seed", 0, &seed) < 0 ||
        lb_py_u64(step_o, "step", LB_MAX_STEP, &step) < 0 ||
        lb_py_u64(domain_o, "domain", 256, &domain) < 0 ||
        lb_py_u64(first_o, "first_block", 0, &first) < 0 ||
        lb_py_u64(n_o, "n", (uint64_t)1 << 40, &n) < 0)
        return NULL;
    npy_intp dims[1] = {(npy_intp)n};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_UINT32);
    if (!out)
        return NULL;
    uint32_t *dst = (uint32_t *)PyArray_DATA((PyArrayObject *)out);
    int nt = 1;
    if (lb_py_threads(NULL, n, &nt) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    lb_status st;
    LB_NOGIL(n, st = lb_philox_fill(seed, step, (int)domain, first, dst, n, nt));
    if (st != LB_OK) {
        Py_DECREF(out);
        return lb_py_raise(st, NULL, "philox", "", NULL);
    }
    return out;
}

/* empty(shape, dtype) -> an uninitialised array from the output pool. */
static PyObject *py_empty(PyObject *self, PyObject *args)
{
    PyObject *shape_o, *dtype_o;
    if (!PyArg_ParseTuple(args, "OO:empty", &shape_o, &dtype_o))
        return NULL;
    PyArray_Dims shape = {NULL, 0};
    PyArray_Descr *descr = NULL;
    if (!PyArray_IntpConverter(shape_o, &shape))
        return NULL;
    if (!PyArray_DescrConverter(dtype_o, &descr)) {
        PyDimMem_FREE(shape.ptr);
        return NULL;
    }
    PyObject *out = lb_py_empty(shape.len, shape.ptr, descr->type_num);
    Py_DECREF(descr);
    PyDimMem_FREE(shape.ptr);
    return out;
}

static PyObject *py_release_memory(PyObject *self, PyObject *unused)
{
    lb_scratch_trim();
    Py_RETURN_NONE;
}

PyMethodDef lb_core_methods[] = {
    {"empty", py_empty, METH_VARARGS,
     "empty(shape, dtype) -> uninitialised array (large ones from the output pool)."},
    {"release_memory", py_release_memory, METH_NOARGS,
     "Return the cached scratch and output buffers to the system."},
    {"set_num_threads", py_set_num_threads, METH_O,
     "set_num_threads(n): default team size for kernels (None resets to "
     "omp_get_max_threads() read at each call)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS,
     "get_num_threads() -> the team size a large kernel would use now."},
    {"_after_fork_child", py_after_fork_child, METH_NOARGS,
     "Fork guard: force serial kernels in this (child) process."},
    {"_forked_child", py_forked_child, METH_NOARGS, "Whether the fork guard is on."},
    {"isa", py_isa, METH_NOARGS, "isa() -> instruction set in use."},
    {"set_isa", py_set_isa, METH_O,
     "set_isa(name or None): force 'scalar', 'avx2' or 'avx512' (None: "
     "back to LOWBAND_FORCE_ISA or the best available)."},
    {"philox", py_philox, METH_VARARGS,
     "philox(seed, step, domain, first_block, n) -> raw Philox4x32-10 words."},
    {NULL, NULL, 0, NULL},
};

/* ---- module definition --------------------------------------------------- */

extern PyMethodDef lb_powersgd_methods[];   /* powersgd_glue.c */

static PyMethodDef all_methods[256];

static int core_exec(PyObject *m)
{
    import_array1(-1);
    if (!lb_glue_FormatError) {
        lb_glue_FormatError = PyErr_NewExceptionWithDoc(
            "lowband.FormatError",
            "Serialized lowband bytes are malformed (a ValueError).",
            PyExc_ValueError, NULL);
        if (!lb_glue_FormatError)
            return -1;
    }
    Py_INCREF(lb_glue_FormatError);
    if (PyModule_AddObject(m, "FormatError", lb_glue_FormatError) < 0) {
        Py_DECREF(lb_glue_FormatError);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "GRAIN", (long)LB_GRAIN) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK", (long)LB_CHUNK) < 0 ||
        PyModule_AddIntConstant(m, "MAX_STEP_LOG2", 56) < 0 ||
        PyModule_AddObject(m, "MAX_CHUNK", PyLong_FromUnsignedLongLong(LB_MAX_CHUNK)) < 0 ||
        PyModule_AddObject(m, "MAX_BLOCK", PyLong_FromUnsignedLongLong(LB_MAX_BLOCK)) < 0 ||
        PyModule_AddObject(m, "MAX_TILE", PyLong_FromUnsignedLongLong(LB_MAX_TILE)) < 0)
        return -1;
#ifdef LOWBAND_SANITIZE
    if (PyModule_AddIntConstant(m, "SANITIZE", 1) < 0)
        return -1;
#else
    if (PyModule_AddIntConstant(m, "SANITIZE", 0) < 0)
        return -1;
#endif
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "lowband._core",
    "lowband's C core: compression, error feedback and MoE kernels.", 0,
    all_methods, core_slots, NULL, NULL, NULL,
};

static int append_methods(int at, const PyMethodDef *table)
{
    for (; table->ml_name; table++) {
        if (at >= (int)(sizeof(all_methods) / sizeof(all_methods[0])) - 1)
            return -1;
        all_methods[at++] = *table;
    }
    return at;
}

PyMODINIT_FUNC PyInit__core(void)
{
    static int filled = 0;
    if (!filled) {
        const PyMethodDef *tables[] = {lb_core_methods,     lb_sparsify_methods,
                                        lb_wire_methods,     lb_quant_methods,
                                        lb_feedback_methods, lb_moe_methods,
                                        lb_sign_methods,     lb_dither_methods,
                                        lb_fedzip_methods,   lb_powersgd_methods,
                                        lb_group_methods};
        int at = 0;
        for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]); t++) {
            at = append_methods(at, tables[t]);
            if (at < 0) {
                PyErr_SetString(PyExc_SystemError, "lowband._core: method table full");
                return NULL;
            }
        }
        filled = 1;
    }
    return PyModuleDef_Init(&core_module);
}
