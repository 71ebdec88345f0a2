/* glue.c - shared argument conversion, thread resolution and errors. */
#include "glue.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "core/scratch.h"

int lb_glue_default_threads = 0;
int lb_glue_forked_child = 0;
PyObject *lb_glue_FormatError = NULL;

lb_dtype lb_py_dtype_of(PyArrayObject *a)
{
    switch (PyArray_TYPE(a)) {
    case NPY_FLOAT32: return LB_F32;
    case NPY_FLOAT64: return LB_F64;
    case NPY_FLOAT16: return LB_F16;
    default: return (lb_dtype)0;
    }
}

int lb_py_typenum(lb_dtype dt)
{
    switch (dt) {
    case LB_F32: return NPY_FLOAT32;
    case LB_F64: return NPY_FLOAT64;
    case LB_F16: return NPY_FLOAT16;
    case LB_BF16: return NPY_UINT16;
    }
    return NPY_NOTYPE;
}

static const char *allowed_names(unsigned allowed)
{
    if (allowed == LB_ALLOW_F32_F64)
        return "float32 or float64";
    if (allowed == (1u << LB_F32))
        return "float32";
    if (allowed == (1u << LB_F64))
        return "float64";
    return "float16, float32 or float64";
}

PyArrayObject *lb_py_vector(PyObject *obj, const char *name, unsigned allowed)
{
    PyArrayObject *arr;
    if (PyArray_Check(obj)) {
        arr = (PyArrayObject *)obj;
        Py_INCREF(arr);
    } else {
        arr = (PyArrayObject *)PyArray_FROM_OF(obj, 0);
        if (!arr)
            return NULL;
    }
    lb_dtype dt = lb_py_dtype_of(arr);
    if (!dt || !(allowed & (1u << dt))) {
        PyObject *d = PyObject_Str((PyObject *)PyArray_DESCR(arr));
        PyErr_Format(PyExc_TypeError, "%s: expected a %s array, got dtype %S",
                     name, allowed_names(allowed), d ? d : Py_None);
        Py_XDECREF(d);
        Py_DECREF(arr);
        return NULL;
    }
    int flags = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED;
    if (PyArray_ISBYTESWAPPED(arr) || (PyArray_FLAGS(arr) & flags) != flags) {
        PyArray_Descr *descr = PyArray_DescrFromType(PyArray_TYPE(arr));
        PyArrayObject *c = (PyArrayObject *)PyArray_FromArray(
            arr, descr, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                            NPY_ARRAY_FORCECAST);
        Py_DECREF(arr);
        arr = c;
    }
    return arr;
}

/* torch.get_num_threads() when torch is already imported (never imports
 * it), else 0.  Any failure (torch half-initialised) counts as "no cap".   */
static int torch_threads(void)
{
    static PyObject *name = NULL;
    if (!name && !(name = PyUnicode_InternFromString("torch")))
        goto fail;
    PyObject *torch = PyImport_GetModule(name);
    if (!torch)
        goto fail;
    PyObject *r = PyObject_CallMethod(torch, "get_num_threads", NULL);
    Py_DECREF(torch);
    if (!r)
        goto fail;
    long n = PyLong_AsLong(r);
    Py_DECREF(r);
    if (n == -1 && PyErr_Occurred())
        goto fail;
    return n > 0 && n < 4096 ? (int)n : 0;
fail:
    PyErr_Clear();
    return 0;
}

int lb_glue_auto_threads(void)
{
    if (lb_glue_forked_child)
        return 1;
    if (lb_glue_default_threads > 0)
        return lb_glue_default_threads;
    int n = lb_max_threads();
    int t = torch_threads();
    return t > 0 && t < n ? t : n;
}

int lb_py_threads(PyObject *threads, uint64_t work, int *nthreads)
{
    long n = 0;
    if (threads && threads != Py_None) {
        if (PyBool_Check(threads) || !PyLong_Check(threads)) {
            PyErr_Format(PyExc_TypeError,
                         "threads: expected None or an int >= 1, got %.100s",
                         Py_TYPE(threads)->tp_name);
            return -1;
        }
        n = PyLong_AsLong(threads);
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (n < 1 || n > 4096) {
            PyErr_Format(PyExc_ValueError,
                         "threads: expected None or an int in [1, 4096], got %ld", n);
            return -1;
        }
    } else if (work >= LB_GRAIN) {
        n = lb_glue_auto_threads();
    }
    if (lb_glue_forked_child || work < LB_GRAIN || n < 1)
        n = 1;
    *nthreads = (int)n;
    return 0;
}

int lb_py_u64(PyObject *obj, const char *name, uint64_t limit, uint64_t *out)
{
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *i = PyNumber_Index(obj);
    if (!i)
        return -1;
    int overflow = 0;
    long long sv = PyLong_AsLongLongAndOverflow(i, &overflow);
    int neg = overflow < 0 || (overflow == 0 && sv < 0);
    unsigned long long v = neg ? 0 : PyLong_AsUnsignedLongLong(i);
    if (neg || (v == (unsigned long long)-1 && PyErr_Occurred()) ||
        (limit && v >= limit)) {
        PyErr_Clear();
        if (limit)
            PyErr_Format(PyExc_ValueError, "%s: expected an int in [0, %llu), got %S",
                         name, (unsigned long long)limit, i);
        else
            PyErr_Format(PyExc_ValueError, "%s: expected an int in [0, 2**64), got %S",
                         name, i);
        Py_DECREF(i);
        return -1;
    }
    Py_DECREF(i);
    *out = (uint64_t)v;
    return 0;
}

PyObject *lb_py_raise(lb_status st, const lb_error *err, const char *what,
                      const char *argname, PyArrayObject *arr)
{
    uint64_t at = err ? err->index : 0;
    switch (st) {
    case LB_ENOMEM:
        PyErr_Format(PyExc_MemoryError,
                     "%s: out of memory allocating its working buffers and result "
                     "(for %s)", what, argname ? argname : "its input");
        return NULL;
    case LB_ENONFINITE:
        if (arr && at < (uint64_t)PyArray_SIZE(arr)) {
            double v = 0;
            const char *p = (const char *)PyArray_DATA(arr);
            switch (PyArray_TYPE(arr)) {
            case NPY_FLOAT32: v = ((const float *)p)[at]; break;
            case NPY_FLOAT64: v = ((const double *)p)[at]; break;
            default: break;
            }
            PyObject *vs = PyFloat_FromDouble(v);
            PyErr_Format(PyExc_ValueError,
                         "%s: %s has a non-finite value (%R) at flat index %llu; "
                         "pass check_finite=False to skip this check",
                         what, argname, vs, (unsigned long long)at);
            Py_XDECREF(vs);
            return NULL;
        }
        PyErr_Format(PyExc_ValueError,
                     "%s: %s has a non-finite value at flat index %llu; pass "
                     "check_finite=False to skip this check",
                     what, argname, (unsigned long long)at);
        return NULL;
    case LB_EFORMAT:
        PyErr_Format(lb_glue_FormatError, "%s: malformed input at byte %llu",
                     what, (unsigned long long)at);
        return NULL;
    case LB_ERANGE:
        PyErr_Format(PyExc_ValueError, "%s: index out of range (item %llu)",
                     what, (unsigned long long)at);
        return NULL;
    case LB_EOVERFLOW:
        PyErr_Format(PyExc_OverflowError, "%s: size overflow", what);
        return NULL;
    case LB_EINVAL:
    default:
        PyErr_Format(PyExc_ValueError, "%s: invalid argument (%s, item %llu)",
                     what, lb_status_name(st), (unsigned long long)at);
        return NULL;
    }
}

static void free_capsule(PyObject *cap)
{
    free(PyCapsule_GetPointer(cap, "lowband.buffer"));
}

static void pool_capsule(PyObject *cap)
{
    lb_scratch_free(PyCapsule_GetPointer(cap, "lowband.pool"));
}

PyObject *lb_py_empty(int nd, const npy_intp *dims, int typenum)
{
    PyArray_Descr *descr = PyArray_DescrFromType(typenum);
    if (!descr)
        return NULL;
    size_t bytes = (size_t)PyDataType_ELSIZE(descr);
    for (int i = 0; i < nd; i++) {
        uint64_t next;
        if (dims[i] < 0 || lb_size_mul(bytes, (uint64_t)dims[i], &next) != LB_OK) {
            Py_DECREF(descr);
            PyErr_Format(PyExc_MemoryError,
                         "cannot allocate an output array: its size in bytes overflows");
            return NULL;
        }
        bytes = (size_t)next;
    }
    if (bytes < LB_POOL_MIN) {
        Py_DECREF(descr);
        return PyArray_SimpleNew(nd, (npy_intp *)dims, typenum);
    }
    void *buf = lb_scratch_alloc(bytes);
    if (!buf) {
        Py_DECREF(descr);
        PyErr_Format(PyExc_MemoryError, "out of memory allocating an output array of %zu bytes",
                     bytes);
        return NULL;
    }
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, descr, nd, (npy_intp *)dims, NULL, buf,
                                         NPY_ARRAY_CARRAY, NULL);
    if (!arr) {
        lb_scratch_free(buf);
        return NULL;
    }
    PyObject *cap = PyCapsule_New(buf, "lowband.pool", pool_capsule);
    if (!cap) {
        Py_DECREF(arr);
        lb_scratch_free(buf);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, cap) < 0) {
        Py_DECREF(arr);   /* the capsule was stolen and returns buf */
        return NULL;
    }
    return arr;
}

PyObject *lb_py_adopt(void *buf, uint64_t count, int typenum)
{
    npy_intp dims[1] = {(npy_intp)count};
    PyObject *arr = PyArray_SimpleNewFromData(1, dims, typenum, buf);
    if (!arr) {
        free(buf);
        return NULL;
    }
    PyObject *cap = PyCapsule_New(buf, "lowband.buffer", free_capsule);
    if (!cap) {
        Py_DECREF(arr);
        free(buf);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, cap) < 0) {
        Py_DECREF(arr);   /* the capsule was stolen and frees buf */
        return NULL;
    }
    return arr;
}

PyObject *lb_py_indices(uint64_t *idx, uint64_t count, uint64_t n)
{
    if (n > 0xFFFFFFFFull)
        return lb_py_adopt(idx, count, NPY_UINT64);
    /* Narrow in place: entry i moves to bytes [4i, 4i+4), which only
     * overlaps entries already read.                                    */
    unsigned char *bytes = (unsigned char *)idx;   /* memcpy: alias-safe */
    for (uint64_t i = 0; i < count; i++) {
        uint64_t wide;
        memcpy(&wide, bytes + 8 * i, 8);
        uint32_t narrow = (uint32_t)wide;
        memcpy(bytes + 4 * i, &narrow, 4);
    }
    return lb_py_adopt(idx, count, NPY_UINT32);
}

PyArrayObject *lb_py_float_input(PyObject *obj, const char *name, PyObject *threads, uint64_t *n,
                                 int *nthreads)
{
    PyArrayObject *x = lb_py_vector(obj, name, LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    *n = (uint64_t)PyArray_SIZE(x);
    if (lb_py_threads(threads, *n, nthreads) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    return x;
}

int lb_py_stream_arg(PyObject *obj, const uint8_t **data, uint64_t *len)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_UINT8 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj)) {
        PyErr_SetString(PyExc_TypeError, "codes: expected a contiguous uint8 array");
        return -1;
    }
    *data = PyArray_DATA((PyArrayObject *)obj);
    *len = (uint64_t)PyArray_SIZE((PyArrayObject *)obj);
    return 0;
}

int lb_py_decode_target(PyObject *table, const char *tname, uint64_t count, PyObject *out_obj,
                        uint64_t n, const double **table_data, void **out, lb_dtype *dt)
{
    if (out_obj == Py_None)
        return 0;
    if (!PyArray_Check(table) || PyArray_TYPE((PyArrayObject *)table) != NPY_FLOAT64 ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)table) ||
        (uint64_t)PyArray_SIZE((PyArrayObject *)table) != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %llu float64 values", tname,
                     (unsigned long long)count);
        return -1;
    }
    lb_dtype odt;
    if (!PyArray_Check(out_obj) || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)out_obj) ||
        !PyArray_ISWRITEABLE((PyArrayObject *)out_obj) ||
        (uint64_t)PyArray_SIZE((PyArrayObject *)out_obj) != n ||
        (odt = lb_py_dtype_of((PyArrayObject *)out_obj)) == 0 || (odt != LB_F32 && odt != LB_F64)) {
        PyErr_Format(PyExc_TypeError,
                     "out: expected a writeable contiguous float32/float64 array of %llu "
                     "elements", (unsigned long long)n);
        return -1;
    }
    *table_data = PyArray_DATA((PyArrayObject *)table);
    *out = PyArray_DATA((PyArrayObject *)out_obj);
    *dt = odt;
    return 0;
}

PyObject *lb_py_decode_error(lb_status st, const lb_error *err, uint64_t n, const char *kind,
                             const char *what)
{
    if (st != LB_EFORMAT)
        return lb_py_raise(st, err, what, "codes", NULL);
    if (err->index < n)
        PyErr_Format(PyExc_ValueError, "codes: malformed %s stream at element %llu", kind,
                     (unsigned long long)err->index);
    else
        PyErr_Format(PyExc_ValueError,
                     "codes: the %s stream does not end after the last element "
                     "(wrong length or non-zero spare bits)", kind);
    return NULL;
}

int lb_fc_args(const char *fname, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi)
{
    if (nargs >= lo && nargs <= hi)
        return 0;
    PyErr_Format(PyExc_TypeError, "%s: expected %zd to %zd arguments, got %zd", fname, lo, hi,
                 nargs);
    return -1;
}

int lb_fc_K(PyObject *o, unsigned long long *v)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    *v = PyLong_AsUnsignedLongLongMask(o);
    return *v == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

int lb_fc_i(PyObject *o, int *v)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    long l = PyLong_AsLong(o);
    if (l == -1 && PyErr_Occurred())
        return -1;
    if (l < INT_MIN || l > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "signed integer is greater than maximum");
        return -1;
    }
    *v = (int)l;
    return 0;
}

int lb_fc_p(PyObject *o, int *v)
{
    int t = o == Py_True ? 1 : o == Py_False ? 0 : PyObject_IsTrue(o);
    if (t < 0)
        return -1;
    *v = t;
    return 0;
}

double lb_py_safe_bound(unsigned code)
{
    switch (code) {
    case 1: return (double)FLT_MAX / 2;
    case 2: return DBL_MAX / 2;
    case 3: return 32752.0;
    case 4: return (2 - 1.0 / 128) * ldexp(1.0, 127) / 2;
    }
    return 0.0;
}
