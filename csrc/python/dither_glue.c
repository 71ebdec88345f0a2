/* dither_glue.c - bindings of core/dither.c (linear and natural dithering
 * with an Elias-gamma coded stream).  lowband/quantize.py validates the
 * arguments first; these re-check what the core relies on.               */
#include "glue.h"

/* dither(x, out_dt, levels, natural, l2, seed, step, threads)
 *   -> (stream uint8, norm float32[1], nbits); out_dt: the lb_dtype code
 *   the payload decodes to                                                 */
static PyObject *py_dither(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    unsigned levels;
    int out_dt, natural, l2, nt;
    unsigned long long seed, step;
    if (!PyArg_ParseTuple(args, "OiIppKKO:dither", &x_o, &out_dt, &levels, &natural, &l2,
                          &seed, &step, &threads))
        return NULL;
    if (levels < 1 || levels > 127) {
        PyErr_Format(PyExc_ValueError, "levels: expected 1..127, got %u", levels);
        return NULL;
    }
    uint64_t n;
    PyArrayObject *x = lb_py_float_input(x_o, "x", threads, &n, &nt);
    if (!x)
        return NULL;
    npy_intp one = 1;
    PyArrayObject *norm = (PyArrayObject *)lb_py_empty(1, &one, NPY_FLOAT32);
    if (!norm) {
        Py_DECREF(x);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    uint8_t *stream = NULL;
    uint64_t nbits = 0;
    lb_dtype dt = lb_py_dtype_of(x);
    const void *xd = PyArray_DATA(x);
    float *nd = PyArray_DATA(norm);
    LB_NOGIL(n, st = lb_dither(xd, n, dt, (lb_dtype)out_dt, levels, natural, l2, seed, step,
                               nt, nd, &stream, &nbits, &err));
    if (st != LB_OK) {
        if (st == LB_ERANGE)
            PyErr_SetString(PyExc_ValueError, "dither: x is too large: its norm overflows "
                            "float32 (its values cannot be represented)");
        else
            lb_py_raise(st, &err, "dither", "x", x);
        Py_DECREF(norm);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    uint64_t nbytes = nbits / 8 + (nbits % 8 != 0);
    PyObject *codes;
    if (!stream) {
        npy_intp zero = 0;
        codes = lb_py_empty(1, &zero, NPY_UINT8);
    } else {
        codes = lb_py_adopt(stream, nbytes, NPY_UINT8);
    }
    if (!codes) {
        Py_DECREF(norm);
        return NULL;
    }
    return Py_BuildValue("(NNK)", codes, norm, (unsigned long long)nbits);
}

/* dither_decode(stream, nbits, n, levels, mag (float64[levels + 1]) or
 * None to check only, out (float32/float64 of n) or None, subtract)      */
static PyObject *py_dither_decode(PyObject *self, PyObject *args)
{
    PyObject *buf_o, *mag_o, *out_o;
    unsigned long long nbits, n;
    unsigned levels;
    int subtract = 0;
    if (!PyArg_ParseTuple(args, "OKKIOO|p:dither_decode", &buf_o, &nbits, &n, &levels, &mag_o,
                          &out_o, &subtract))
        return NULL;
    if (levels < 1 || levels > 127) {
        PyErr_Format(PyExc_ValueError, "levels: expected 1..127, got %u", levels);
        return NULL;
    }
    const uint8_t *b;
    uint64_t len;
    if (lb_py_stream_arg(buf_o, &b, &len) < 0)
        return NULL;
    const double *mag = NULL;
    void *out = NULL;
    lb_dtype dt = LB_F32;
    if (lb_py_decode_target(mag_o, "mag", (uint64_t)levels + 1, out_o, n, &mag, &out, &dt) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(n, st = lb_dither_decode(b, len, nbits, n, levels, mag, dt, out, subtract, &err));
    if (st != LB_OK)
        return lb_py_decode_error(st, &err, n, "dither", "dither_decode");
    Py_RETURN_NONE;
}

PyMethodDef lb_dither_methods[] = {
    {"dither", py_dither, METH_VARARGS,
     "dither(x, levels, natural, l2, seed, step, threads) -> (codes, norm, nbits)"},
    {"dither_decode", py_dither_decode, METH_VARARGS,
     "dither_decode(codes, nbits, n, levels, mag, out, subtract=False)"},
    {NULL, NULL, 0, NULL},
};
