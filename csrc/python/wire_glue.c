/* wire_glue.c - bindings of core/wire.c (CRC-32C and index encodings). */
#include "glue.h"

/* A 1-D uint32/uint64 C-contiguous index array or NULL with TypeError. */
static PyArrayObject *index_array(PyObject *o, int *width)
{
    if (!PyArray_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "indices: expected a uint32 or uint64 ndarray");
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    int t = PyArray_TYPE(a);
    if ((t != NPY_UINT32 && t != NPY_UINT64) || PyArray_NDIM(a) != 1) {
        PyErr_SetString(PyExc_TypeError, "indices: expected a 1-D uint32 or uint64 ndarray");
        return NULL;
    }
    *width = t == NPY_UINT32 ? 4 : 8;
    return (PyArrayObject *)PyArray_FromArray(
        a, PyArray_DescrFromType(t), NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
}

/* crc32c(data, crc=0) -> int */
static PyObject *py_crc32c(PyObject *self, PyObject *args)
{
    Py_buffer b;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32c", &b, &crc))
        return NULL;
    uint32_t r;
    const void *buf = b.buf;
    size_t len = (size_t)b.len;
    LB_NOGIL(len / 4, r = lb_crc32c(crc, buf, len));
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

/* index_check(indices, n) -> None, ValueError naming the first bad entry */
static PyObject *py_index_check(PyObject *self, PyObject *args)
{
    PyObject *io;
    unsigned long long n;
    int width;
    if (!PyArg_ParseTuple(args, "OK:index_check", &io, &n))
        return NULL;
    PyArrayObject *a = index_array(io, &width);
    if (!a)
        return NULL;
    lb_error err = {0};
    lb_status st = lb_index_check(PyArray_DATA(a), width, (uint64_t)PyArray_SIZE(a), n, &err);
    Py_DECREF(a);
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError, "indices: entry %llu is >= the size %llu",
                     (unsigned long long)err.index, n);
        return NULL;
    }
    if (st != LB_OK) {
        PyErr_Format(PyExc_ValueError,
                     "indices: expected strictly ascending indices, entry %llu is not",
                     (unsigned long long)err.index);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* index_sizes(indices, n) -> (raw, varint, bitmap) byte sizes */
static PyObject *py_index_sizes(PyObject *self, PyObject *args)
{
    PyObject *io;
    unsigned long long n;
    int width;
    if (!PyArg_ParseTuple(args, "OK:index_sizes", &io, &n))
        return NULL;
    PyArrayObject *a = index_array(io, &width);
    if (!a)
        return NULL;
    uint64_t sizes[3];
    lb_status st = lb_index_sizes(PyArray_DATA(a), width, (uint64_t)PyArray_SIZE(a), n, sizes);
    Py_DECREF(a);
    if (st != LB_OK)
        return lb_py_raise(st, NULL, "index_sizes", "indices", NULL);
    return Py_BuildValue("(KKK)", (unsigned long long)sizes[0],
                         (unsigned long long)sizes[1], (unsigned long long)sizes[2]);
}

/* index_encode(indices, n, encoding, size) -> bytes of exactly `size` */
static PyObject *py_index_encode(PyObject *self, PyObject *args)
{
    PyObject *io;
    unsigned long long n, size;
    int enc, width;
    if (!PyArg_ParseTuple(args, "OKiK:index_encode", &io, &n, &enc, &size))
        return NULL;
    PyArrayObject *a = index_array(io, &width);
    if (!a)
        return NULL;
    if (size > PY_SSIZE_T_MAX) {
        Py_DECREF(a);
        return PyErr_Format(PyExc_MemoryError, "index_encode: %llu bytes is too large",
                            (unsigned long long)size);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!out) {
        Py_DECREF(a);
        return NULL;
    }
    lb_status st = lb_index_encode(PyArray_DATA(a), width, (uint64_t)PyArray_SIZE(a), n, enc,
                                   (uint8_t *)PyBytes_AS_STRING(out), size);
    Py_DECREF(a);
    if (st != LB_OK) {
        Py_DECREF(out);
        return lb_py_raise(st, NULL, "index_encode", "indices", NULL);
    }
    return out;
}

/* index_decode(buf, encoding, count, n) -> ascending uint32/uint64 array */
static PyObject *py_index_decode(PyObject *self, PyObject *args)
{
    Py_buffer b;
    int enc;
    unsigned long long count, n;
    if (!PyArg_ParseTuple(args, "y*iKK:index_decode", &b, &enc, &count, &n))
        return NULL;
    if (count > n || count > (uint64_t)b.len * 8 + 1) {
        /* no encoding stores more than 8 indices per byte */
        PyBuffer_Release(&b);
        PyErr_Format(lb_glue_FormatError,
                     "indices: %llu indices cannot fit in %zd bytes of a size-%llu tensor",
                     count, b.len, n);
        return NULL;
    }
    int width = n > 0xFFFFFFFFull ? 8 : 4;
    npy_intp dims[1] = {(npy_intp)count};
    PyObject *out = lb_py_empty(1, dims, width == 4 ? NPY_UINT32 : NPY_UINT64);
    if (!out) {
        PyBuffer_Release(&b);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    const uint8_t *buf = (const uint8_t *)b.buf;
    uint64_t len = (uint64_t)b.len;
    void *od = PyArray_DATA((PyArrayObject *)out);
    LB_NOGIL(count, st = lb_index_decode(buf, len, enc, count, n, width, od, &err));
    PyBuffer_Release(&b);
    if (st != LB_OK) {
        Py_DECREF(out);
        if (st == LB_EFORMAT) {
            static const char *names[] = {"raw", "delta-varint", "bitmap"};
            PyErr_Format(lb_glue_FormatError,
                         "indices: malformed %s index section at byte %llu",
                         enc >= 0 && enc <= 2 ? names[enc] : "?",
                         (unsigned long long)err.index);
            return NULL;
        }
        return lb_py_raise(st, &err, "index_decode", "indices", NULL);
    }
    return out;
}

PyMethodDef lb_wire_methods[] = {
    {"crc32c", py_crc32c, METH_VARARGS, "crc32c(data, crc=0) -> CRC-32C."},
    {"index_check", py_index_check, METH_VARARGS,
     "index_check(indices, n): strictly ascending and < n, else ValueError."},
    {"index_sizes", py_index_sizes, METH_VARARGS,
     "index_sizes(indices, n) -> (raw, varint, bitmap) encoded sizes."},
    {"index_encode", py_index_encode, METH_VARARGS,
     "index_encode(indices, n, encoding, size) -> bytes."},
    {"index_decode", py_index_decode, METH_VARARGS,
     "index_decode(buf, encoding, count, n) -> indices (validated)."},
    {NULL, NULL, 0, NULL},
};
