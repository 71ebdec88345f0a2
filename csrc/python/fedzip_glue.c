/* fedzip_glue.c - bindings of core/fedzip.c (FedZip's 3-means and label
 * coding).  lowband/quantize.py validates the arguments first; these
 * re-check what the core relies on.                                      */
#include "glue.h"

/* fedzip(x, iters, gaps, threads) -> (stream uint8, centroids float32[3],
 *                                     major, nbits)                        */
static PyObject *py_fedzip(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int iters, gaps, nt;
    if (!PyArg_ParseTuple(args, "OipO:fedzip", &x_o, &iters, &gaps, &threads))
        return NULL;
    if (iters < 0 || iters > 1000) {
        PyErr_Format(PyExc_ValueError, "iters: expected 0..1000, got %d", iters);
        return NULL;
    }
    uint64_t n;
    PyArrayObject *x = lb_py_float_input(x_o, "x", threads, &n, &nt);
    if (!x)
        return NULL;
    npy_intp three = 3;
    PyArrayObject *cen = (PyArrayObject *)lb_py_empty(1, &three, NPY_FLOAT32);
    uint8_t *labels = malloc(n ? (size_t)n : 1);
    if (!cen || !labels) {
        Py_XDECREF(cen);
        free(labels);
        Py_DECREF(x);
        return PyErr_NoMemory();
    }
    lb_error err = {0};
    lb_status st;
    const void *xd = PyArray_DATA(x);
    lb_dtype dt = lb_py_dtype_of(x);
    float *cd = PyArray_DATA(cen);
    uint8_t *stream = NULL;
    uint64_t nbits = 0;
    unsigned major = 0;
    LB_NOGIL(n, st = lb_kmeans3(xd, n, dt, iters, nt, cd, labels, &err);
             if (st == LB_OK) st = lb_fedzip_encode(labels, n, gaps, &major, &stream, &nbits));
    free(labels);
    if (st != LB_OK) {
        if (st == LB_ERANGE)
            PyErr_SetString(PyExc_ValueError, "fedzip: x is too large for the float32 "
                            "centroids: its values cannot be represented");
        else
            lb_py_raise(st, &err, "fedzip", "x", x);
        Py_DECREF(cen);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    PyObject *codes;
    if (!stream) {
        npy_intp zero = 0;
        codes = lb_py_empty(1, &zero, NPY_UINT8);
    } else {
        codes = lb_py_adopt(stream, nbits / 8 + (nbits % 8 != 0), NPY_UINT8);
    }
    if (!codes) {
        Py_DECREF(cen);
        return NULL;
    }
    return Py_BuildValue("(NNIK)", codes, cen, major, (unsigned long long)nbits);
}

/* fedzip_decode(stream, nbits, n, gaps, major, centroids float64[3] or None,
 *               out float32/float64 of n or None)                          */
static PyObject *py_fedzip_decode(PyObject *self, PyObject *args)
{
    PyObject *buf_o, *cen_o, *out_o;
    unsigned long long nbits, n;
    int gaps;
    unsigned major;
    if (!PyArg_ParseTuple(args, "OKKpIOO:fedzip_decode", &buf_o, &nbits, &n, &gaps, &major,
                          &cen_o, &out_o))
        return NULL;
    const uint8_t *b;
    uint64_t len;
    if (lb_py_stream_arg(buf_o, &b, &len) < 0)
        return NULL;
    if (major > 2) {
        PyErr_Format(PyExc_ValueError, "major: expected 0..2, got %u", major);
        return NULL;
    }
    const double *cen = NULL;
    void *out = NULL;
    lb_dtype dt = LB_F32;
    if (lb_py_decode_target(cen_o, "centroids", 3, out_o, n, &cen, &out, &dt) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(n, st = lb_fedzip_decode(b, len, nbits, n, gaps, major, cen, dt, out, &err));
    if (st != LB_OK)
        return lb_py_decode_error(st, &err, n, "fedzip", "fedzip_decode");
    Py_RETURN_NONE;
}

PyMethodDef lb_fedzip_methods[] = {
    {"fedzip", py_fedzip, METH_VARARGS,
     "fedzip(x, iters, gaps, threads) -> (codes, centroids, major, nbits)"},
    {"fedzip_decode", py_fedzip_decode, METH_VARARGS,
     "fedzip_decode(codes, nbits, n, gaps, major, centroids, out)"},
    {NULL, NULL, 0, NULL},
};
