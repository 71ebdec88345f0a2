/* feedback_glue.c - bindings of core/feedback.c (fused error feedback). */
#include "glue.h"

#include <stdlib.h>
#include <string.h>

/* The state e: a writeable, C-contiguous, aligned, native float32/64 array
 * (borrowed), and g converted to a vector of the same dtype and size.    */
static int state_and_grad(PyObject *e_o, PyObject *g_o, PyArrayObject **g_out,
                          lb_dtype *dt, uint64_t *n)
{
    if (!PyArray_Check(e_o)) {
        PyErr_SetString(PyExc_TypeError, "e: expected an ndarray");
        return -1;
    }
    PyArrayObject *e = (PyArrayObject *)e_o;
    *dt = lb_py_dtype_of(e);
    if ((*dt != LB_F32 && *dt != LB_F64) || !PyArray_IS_C_CONTIGUOUS(e) ||
        !PyArray_ISWRITEABLE(e) || !PyArray_ISALIGNED(e) || PyArray_ISBYTESWAPPED(e)) {
        PyErr_SetString(PyExc_TypeError,
                        "e: expected a writeable C-contiguous float32 or float64 array");
        return -1;
    }
    PyArrayObject *g = lb_py_vector(g_o, "g", 1u << *dt);
    if (!g)
        return -1;
    if (PyArray_SIZE(g) != PyArray_SIZE(e)) {
        PyErr_Format(PyExc_ValueError, "g: expected %zd elements (as e), got %zd",
                     (Py_ssize_t)PyArray_SIZE(e), (Py_ssize_t)PyArray_SIZE(g));
        Py_DECREF(g);
        return -1;
    }
    *g_out = g;
    *n = (uint64_t)PyArray_SIZE(e);
    return 0;
}

static PyObject *ef_error(lb_status st, lb_error *err, PyArrayObject *g)
{
    if (st == LB_EOVERFLOW) {
        PyErr_Format(PyExc_ValueError,
                     "error feedback: the compensated vector is non-finite at flat index "
                     "%llu (it overflowed; the step is undone)",
                     (unsigned long long)err->index);
        return NULL;
    }
    return lb_py_raise(st, err, "error feedback", "grad", g);
}

/* (indices, values) of a successful selection, or the exception for st;
 * consumes out and g.                                                     */
static PyObject *ef_result(lb_status st, lb_sparse *out, lb_error *err,
                           PyArrayObject *g, uint64_t n, lb_dtype dt)
{
    PyObject *res = NULL;
    if (st != LB_OK) {
        ef_error(st, err, g);
    } else {
        PyObject *idx = lb_py_indices(out->indices, out->count, n);
        PyObject *vals = idx ? lb_py_adopt(out->values, out->count, lb_py_typenum(dt)) : NULL;
        if (!idx)
            free(out->values);
        res = vals ? Py_BuildValue("(NN)", idx, vals) : NULL;
        if (idx && !vals)
            Py_DECREF(idx);
    }
    Py_DECREF(g);
    return res;
}

/* ef_topk(e, g, k, decay, scale, check_finite, threads) -> (indices,
 * values).  lb_ef_topk is all or nothing: e is unchanged when the step
 * fails (an overflow of the compensated vector included).                */
static PyObject *py_ef_topk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *e_o, *g_o, *k_o, *threads = Py_None;
    double decay = 1.0, scale = 1.0;
    int check = 1, nt;
    if (lb_fc_args("ef_topk", nargs, 3, 7) < 0 ||
        (nargs > 3 && (decay = PyFloat_AsDouble(args[3])) == -1.0 && PyErr_Occurred()) ||
        (nargs > 4 && (scale = PyFloat_AsDouble(args[4])) == -1.0 && PyErr_Occurred()) ||
        (nargs > 5 && lb_fc_p(args[5], &check) < 0))
        return NULL;
    e_o = args[0];
    g_o = args[1];
    k_o = args[2];
    if (nargs > 6)
        threads = args[6];
    PyArrayObject *g;
    lb_dtype dt;
    uint64_t n, k;
    if (state_and_grad(e_o, g_o, &g, &dt, &n) < 0)
        return NULL;
    if (lb_py_u64(k_o, "k", n + 1, &k) < 0 || lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(g);
        return NULL;
    }
    lb_sparse out;
    lb_error err = {0};
    lb_status st;
    void *ed = PyArray_DATA((PyArrayObject *)e_o);
    const void *gd = PyArray_DATA(g);
    LB_NOGIL(n, st = lb_ef_topk(ed, gd, n, dt, decay, scale, k, check, nt, &out, &err));
    return ef_result(st, &out, &err, g, n, dt);
}

/* ef_topk_chunked(e, g, chunk, k_per_chunk, decay, scale, check_finite, threads) */
static PyObject *py_ef_topk_chunked(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"e", "g", "chunk", "k_per_chunk", "decay", "scale",
                             "check_finite", "threads", NULL};
    PyObject *e_o, *g_o, *threads = Py_None;
    unsigned long long chunk, kpc;
    double decay = 1.0, scale = 1.0;
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOKK|ddpO:ef_topk_chunked", kwlist, &e_o,
                                     &g_o, &chunk, &kpc, &decay, &scale, &check, &threads))
        return NULL;
    if (chunk == 0 || kpc > chunk || chunk > LB_MAX_CHUNK) {
        PyErr_SetString(PyExc_ValueError, "chunk/k_per_chunk: expected 1 <= chunk, k_per_chunk <= chunk");
        return NULL;
    }
    PyArrayObject *g;
    lb_dtype dt;
    uint64_t n;
    if (state_and_grad(e_o, g_o, &g, &dt, &n) < 0)
        return NULL;
    if (lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(g);
        return NULL;
    }
    lb_sparse out;
    lb_error err = {0};
    lb_status st;
    void *ed = PyArray_DATA((PyArrayObject *)e_o);
    const void *gd = PyArray_DATA(g);
    LB_NOGIL(n, st = lb_ef_topk_chunked(ed, gd, n, dt, decay, scale, chunk, kpc, check, nt,
                                        &out, &err));
    return ef_result(st, &out, &err, g, n, dt);
}

/* ef_axpby(e, g, decay, scale, check_finite, threads): e = decay*e + scale*g */
static PyObject *py_ef_axpby(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"e", "g", "decay", "scale", "check_finite", "threads", NULL};
    PyObject *e_o, *g_o, *threads = Py_None;
    double decay = 1.0, scale = 1.0;
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|ddpO:ef_axpby", kwlist, &e_o, &g_o, &decay,
                                     &scale, &check, &threads))
        return NULL;
    PyArrayObject *g;
    lb_dtype dt;
    uint64_t n;
    if (state_and_grad(e_o, g_o, &g, &dt, &n) < 0)
        return NULL;
    if (lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(g);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    void *ed = PyArray_DATA((PyArrayObject *)e_o);
    const void *gd = PyArray_DATA(g);
    LB_NOGIL(n, st = lb_ef_axpby(ed, gd, n, dt, decay, scale, check, nt, &err));
    if (st != LB_OK) {
        ef_error(st, &err, g);
        Py_DECREF(g);
        return NULL;
    }
    Py_DECREF(g);
    Py_RETURN_NONE;
}

/* ef_sign_residual(e, scales or None, block, threads): e -= D(sign(e)) */
static PyObject *py_ef_sign_residual(PyObject *self, PyObject *args)
{
    PyObject *e_o, *s_o, *threads;
    unsigned long long block;
    int nt;
    if (!PyArg_ParseTuple(args, "OOKO:ef_sign_residual", &e_o, &s_o, &block, &threads))
        return NULL;
    PyArrayObject *g;
    lb_dtype dt;
    uint64_t n;
    if (state_and_grad(e_o, e_o, &g, &dt, &n) < 0)
        return NULL;
    Py_DECREF(g);
    const float *sc = NULL;
    if (s_o != Py_None) {
        uint64_t want = block ? n / block + (n % block != 0) : 1;
        if (!PyArray_Check(s_o) || PyArray_TYPE((PyArrayObject *)s_o) != NPY_FLOAT32 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)s_o) ||
            (uint64_t)PyArray_SIZE((PyArrayObject *)s_o) != want) {
            PyErr_Format(PyExc_TypeError, "scales: expected %llu contiguous float32 values",
                         (unsigned long long)want);
            return NULL;
        }
        sc = PyArray_DATA((PyArrayObject *)s_o);
    }
    if (lb_py_threads(threads, n, &nt) < 0)
        return NULL;
    void *ed = PyArray_DATA((PyArrayObject *)e_o);
    lb_status st;
    LB_NOGIL(n, st = lb_ef_sign_residual(ed, n, dt, sc, block, nt));
    if (st != LB_OK)
        return lb_py_raise(st, NULL, "error feedback", "e", NULL);
    Py_RETURN_NONE;
}

/* A writeable C-contiguous array of `typenum` with `want` elements. */
static void *out_array(PyObject *o, const char *name, int typenum, uint64_t want)
{
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != typenum ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o) || !PyArray_ISWRITEABLE((PyArrayObject *)o) ||
        (uint64_t)PyArray_SIZE((PyArrayObject *)o) != want) {
        PyErr_Format(PyExc_TypeError, "%s: expected %llu writeable contiguous %s values", name,
                     (unsigned long long)want, typenum == NPY_UINT8 ? "uint8" : "float32");
        return NULL;
    }
    return PyArray_DATA((PyArrayObject *)o);
}

/* ef_sign(e, g, decay, scale, mode, block, codes, scales, threads) -> bool:
 * whether the fused sign step ran (False: e untouched, see lb_ef_sign).
 * codes and scales None: they are allocated here and the result is
 * (codes, scales) when the step ran, else None.                          */
static PyObject *py_ef_sign(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *e_o, *g_o, *c_o, *s_o, *threads;
    double decay, scale;
    int mode, nt;
    unsigned long long block;
    if (lb_fc_args("ef_sign", nargs, 9, 9) < 0 ||
        ((decay = PyFloat_AsDouble(args[2])) == -1.0 && PyErr_Occurred()) ||
        ((scale = PyFloat_AsDouble(args[3])) == -1.0 && PyErr_Occurred()) ||
        lb_fc_i(args[4], &mode) < 0 || lb_fc_K(args[5], &block) < 0)
        return NULL;
    e_o = args[0];
    g_o = args[1];
    c_o = args[6];
    s_o = args[7];
    threads = args[8];
    PyArrayObject *g;
    lb_dtype dt;
    uint64_t n;
    if (state_and_grad(e_o, g_o, &g, &dt, &n) < 0)
        return NULL;
    uint64_t nblocks = block ? n / block + (n % block != 0) : 1;
    PyObject *own_c = NULL, *own_s = NULL;   /* allocated here (c_o, s_o None) */
    if (c_o == Py_None && s_o == Py_None) {
        npy_intp dc[1] = {(npy_intp)lb_packed_bytes(n, 1)}, ds[1] = {(npy_intp)nblocks};
        own_c = lb_py_empty(1, dc, NPY_UINT8);
        own_s = own_c ? lb_py_empty(1, ds, NPY_FLOAT32) : NULL;
        if (!own_s) {
            Py_XDECREF(own_c);
            Py_DECREF(g);
            return NULL;
        }
        c_o = own_c;
        s_o = own_s;
    }
    uint8_t *codes = out_array(c_o, "codes", NPY_UINT8, lb_packed_bytes(n, 1));
    float *sc = codes ? out_array(s_o, "scales", NPY_FLOAT32, nblocks) : NULL;
    if (!sc || lb_py_threads(threads, n, &nt) < 0) {
        Py_XDECREF(own_c);
        Py_XDECREF(own_s);
        Py_DECREF(g);
        return NULL;
    }
    void *ed = PyArray_DATA((PyArrayObject *)e_o);
    const void *gd = PyArray_DATA(g);
    int applied = 0;
    lb_status st;
    LB_NOGIL(n, st = lb_ef_sign(ed, gd, n, dt, decay, scale, mode, block, nt, codes, sc,
                                &applied));
    Py_DECREF(g);
    if (st != LB_OK) {
        Py_XDECREF(own_c);
        Py_XDECREF(own_s);
        return lb_py_raise(st, NULL, "error feedback", "e", NULL);
    }
    if (!own_c)
        return PyBool_FromLong(applied);
    if (!applied) {
        Py_DECREF(own_c);
        Py_DECREF(own_s);
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(NN)", own_c, own_s);
}

PyMethodDef lb_feedback_methods[] = {
    {"ef_sign", (PyCFunction)(void (*)(void))py_ef_sign, METH_FASTCALL,
     "ef_sign(e, g, decay, scale, mode, block, codes, scales, threads) -> bool: fused EF + sign "
     "(codes and scales None: -> (codes, scales) or None)."},
    {"ef_sign_residual", py_ef_sign_residual, METH_VARARGS,
     "ef_sign_residual(e, scales, block, threads): e -= +-scale by the sign of e."},
    {"ef_topk", (PyCFunction)(void (*)(void))py_ef_topk, METH_FASTCALL,
     "Fused EF step with exact top-k: e updated in place -> (indices, values)."},
    {"ef_topk_chunked", (PyCFunction)(void (*)(void))py_ef_topk_chunked,
     METH_VARARGS | METH_KEYWORDS, "Fused EF step with chunked top-k."},
    {"ef_axpby", (PyCFunction)(void (*)(void))py_ef_axpby, METH_VARARGS | METH_KEYWORDS,
     "e = decay*e + scale*g in place (the compensation alone)."},
    {NULL, NULL, 0, NULL},
};
