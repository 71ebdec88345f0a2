/* sign_glue.c - bindings of core/twomeans.c (Seide's two-means 1-bit
 * quantizer) and core/vote.c (majority vote on packed sign bits).  The
 * Python layer (lowband/quantize.py, lowband/vote.py) validates arguments
 * first; these re-check what the core relies on.                         */
#include "glue.h"

static PyArrayObject *new_u8(uint64_t count, int typenum)
{
    npy_intp dims[1] = {(npy_intp)count};
    return (PyArrayObject *)lb_py_empty(1, dims, typenum);
}

/* sign_two_means(x, block, check_finite, threads) -> (codes, scales) */
static PyObject *py_sign_two_means(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    unsigned long long block;
    int check, nt;
    if (!PyArg_ParseTuple(args, "OKpO:sign_two_means", &x_o, &block, &check, &threads))
        return NULL;
    uint64_t n;
    PyArrayObject *x = lb_py_float_input(x_o, "x", threads, &n, &nt);
    if (!x)
        return NULL;
    uint64_t nb = block ? n / block + (n % block != 0) : 1;
    PyArrayObject *codes = new_u8(n / 8 + (n % 8 != 0), NPY_UINT8);
    PyArrayObject *scales = new_u8(2 * nb, NPY_FLOAT32);
    if (!codes || !scales) {
        Py_XDECREF(codes);
        Py_XDECREF(scales);
        Py_DECREF(x);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    lb_dtype dt = lb_py_dtype_of(x);
    const void *xd = PyArray_DATA(x);
    uint8_t *cd = PyArray_DATA(codes);
    float *sd = PyArray_DATA(scales);
    LB_NOGIL(n, st = lb_sign_two_means(xd, n, dt, block, check, nt, cd, sd, &err));
    if (st != LB_OK) {
        if (st == LB_ERANGE)
            PyErr_Format(PyExc_ValueError,
                         "sign: x is too large for the float32 scales of block %llu",
                         (unsigned long long)err.index);
        else
            lb_py_raise(st, &err, "sign", "x", x);
        Py_DECREF(codes);
        Py_DECREF(scales);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    return Py_BuildValue("(NN)", codes, scales);
}

/* majority_vote(list of uint8 code arrays, n, thresh, threads) -> codes.
 * Every array must hold exactly ceil(n / 8) bytes.                      */
static PyObject *py_majority_vote(PyObject *self, PyObject *args)
{
    PyObject *lst, *threads;
    unsigned long long n, thresh;
    int nt;
    if (!PyArg_ParseTuple(args, "O!KKO:majority_vote", &PyList_Type, &lst, &n, &thresh,
                          &threads))
        return NULL;
    Py_ssize_t W = PyList_GET_SIZE(lst);
    uint64_t nbytes = n / 8 + (n % 8 != 0);
    if (W < 1) {
        PyErr_SetString(PyExc_ValueError, "payloads: expected at least one payload, got 0");
        return NULL;
    }
    if ((uint64_t)thresh > (uint64_t)W) {
        PyErr_Format(PyExc_ValueError, "threshold: expected 0..%zd, got %llu", W, thresh);
        return NULL;
    }
    const uint8_t **ptrs = PyMem_Malloc((size_t)W * sizeof(*ptrs));
    if (!ptrs)
        return PyErr_NoMemory();
    for (Py_ssize_t w = 0; w < W; w++) {
        PyObject *a = PyList_GET_ITEM(lst, w);
        if (!PyArray_Check(a) || PyArray_TYPE((PyArrayObject *)a) != NPY_UINT8 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)a) ||
            (uint64_t)PyArray_SIZE((PyArrayObject *)a) != nbytes) {
            PyErr_Format(PyExc_ValueError,
                         "payloads[%zd]: expected %llu bytes of packed signs (uint8, "
                         "contiguous)", w, (unsigned long long)nbytes);
            PyMem_Free(ptrs);
            return NULL;
        }
        ptrs[w] = PyArray_DATA((PyArrayObject *)a);
    }
    if (lb_py_threads(threads, n / 8 * (uint64_t)W, &nt) < 0) {
        PyMem_Free(ptrs);
        return NULL;
    }
    PyArrayObject *out = new_u8(nbytes, NPY_UINT8);
    if (!out) {
        PyMem_Free(ptrs);
        return NULL;
    }
    uint8_t *o = PyArray_DATA(out);
    lb_status st;
    LB_NOGIL(n / 8 * (uint64_t)W,
             st = lb_majority_vote(ptrs, (uint64_t)W, n, thresh, nt, o));
    PyMem_Free(ptrs);
    if (st != LB_OK) {
        Py_DECREF(out);
        return lb_py_raise(st, NULL, "majority_vote", "payloads", NULL);
    }
    return (PyObject *)out;
}

PyMethodDef lb_sign_methods[] = {
    {"sign_two_means", py_sign_two_means, METH_VARARGS,
     "sign_two_means(x, block, check_finite, threads) -> (codes, scales[2 per block])"},
    {"majority_vote", py_majority_vote, METH_VARARGS,
     "majority_vote(codes_list, n, thresh, threads) -> packed majority bits"},
    {NULL, NULL, 0, NULL},
};
