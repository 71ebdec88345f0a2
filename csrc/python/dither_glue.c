/* dither_glue.c - bindings of core/dither.c (linear and natural dithering
 * with an Elias-gamma coded stream).  lowband/quantize.py validates the
 * arguments first; these re-check what the core relies on.               */
#include "glue.h"

/* dither(x, levels, natural, l2, seed, step, threads)
 *   -> (stream uint8, norm float32[1], nbits)                              */
static PyObject *py_dither(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    unsigned levels;
    int natural, l2, nt;
    unsigned long long seed, step;
    if (!PyArg_ParseTuple(args, "OIppKKO:dither", &x_o, &levels, &natural, &l2, &seed, &step,
                          &threads))
        return NULL;
    if (levels < 1 || levels > 127) {
        PyErr_Format(PyExc_ValueError, "levels: expected 1..127, got %u", levels);
        return NULL;
    }
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(x);
    if (lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(x);
        return NULL;
    }
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
    LB_NOGIL(n, st = lb_dither(xd, n, dt, levels, natural, l2, seed, step, nt, nd, &stream,
                               &nbits, &err));
    if (st != LB_OK) {
        if (st == LB_ERANGE)
            PyErr_SetString(PyExc_ValueError, "dither: the norm of x overflows float32");
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
    if (!PyArray_Check(buf_o) || PyArray_TYPE((PyArrayObject *)buf_o) != NPY_UINT8 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)buf_o)) {
        PyErr_SetString(PyExc_TypeError, "codes: expected a contiguous uint8 array");
        return NULL;
    }
    PyArrayObject *buf = (PyArrayObject *)buf_o;
    const double *mag = NULL;
    void *out = NULL;
    lb_dtype dt = LB_F32;
    if (out_o != Py_None) {
        if (!PyArray_Check(mag_o) || PyArray_TYPE((PyArrayObject *)mag_o) != NPY_FLOAT64 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)mag_o) ||
            PyArray_SIZE((PyArrayObject *)mag_o) != (npy_intp)levels + 1) {
            PyErr_Format(PyExc_ValueError, "mag: expected %u float64 values", levels + 1);
            return NULL;
        }
        if (!PyArray_Check(out_o) || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)out_o) ||
            !PyArray_ISWRITEABLE((PyArrayObject *)out_o) ||
            (uint64_t)PyArray_SIZE((PyArrayObject *)out_o) != n ||
            (dt = lb_py_dtype_of((PyArrayObject *)out_o)) == 0 || (dt != LB_F32 && dt != LB_F64)) {
            PyErr_Format(PyExc_TypeError,
                         "out: expected a writeable contiguous float32/float64 array of %llu "
                         "elements", n);
            return NULL;
        }
        mag = PyArray_DATA((PyArrayObject *)mag_o);
        out = PyArray_DATA((PyArrayObject *)out_o);
    }
    const uint8_t *b = PyArray_DATA(buf);
    uint64_t len = (uint64_t)PyArray_SIZE(buf);
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(n, st = lb_dither_decode(b, len, nbits, n, levels, mag, dt, out, subtract, &err));
    if (st == LB_EFORMAT) {
        if (err.index < n)
            PyErr_Format(PyExc_ValueError, "codes: malformed dither stream at element %llu",
                         (unsigned long long)err.index);
        else
            PyErr_SetString(PyExc_ValueError,
                            "codes: the dither stream does not end after the last element "
                            "(wrong length or non-zero spare bits)");
        return NULL;
    }
    if (st != LB_OK)
        return lb_py_raise(st, &err, "dither_decode", "codes", NULL);
    Py_RETURN_NONE;
}

PyMethodDef lb_dither_methods[] = {
    {"dither", py_dither, METH_VARARGS,
     "dither(x, levels, natural, l2, seed, step, threads) -> (codes, norm, nbits)"},
    {"dither_decode", py_dither_decode, METH_VARARGS,
     "dither_decode(codes, nbits, n, levels, mag, out, subtract=False)"},
    {NULL, NULL, 0, NULL},
};
