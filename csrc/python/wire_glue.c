/* wire_glue.c - bindings of core/wire.c (CRC-32C and index encodings). */
#include "glue.h"

#include <string.h>

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


/* ---- whole-payload encode and decode ------------------------------------
 * The framing of docs/formats.md in C for the common payloads, so a small
 * payload costs one call instead of a Python parser.  Both are fast paths
 * only: decode returns None for anything it does not accept (an error of
 * any kind, a scheme it does not know, an option it does not handle) and
 * wire.py then runs its Python parser, which raises the FormatError with
 * its message (so every message stays the parser's).  Encode likewise
 * returns None for what it does not handle.  tests/test_wire_fast.py
 * checks that both paths agree on fuzzed input.                          */

#define W_MAGIC "LBND"
#define W_VERSION 1
#define W_MAX_NDIM 32
#define W_MAX_SIZE ((uint64_t)1 << 60)
#define W_NONE ((PyObject *)0)

static PyObject *wire_dtypes = NULL;   /* tuple: wire dtype code -> np.dtype or None */

/* wire_setup(dtypes): the dtype of each wire dtype code (a tuple indexed
 * by code; None where the code is unknown).  wire.py calls it at import. */
static PyObject *py_wire_setup(PyObject *self, PyObject *arg)
{
    if (!PyTuple_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "wire_setup: expected a tuple of dtypes");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(wire_dtypes, arg);
    Py_RETURN_NONE;
}

/* The np.dtype of wire code `code` (borrowed) or NULL when unknown. */
static PyArray_Descr *wire_dtype(unsigned code)
{
    if (!wire_dtypes || code >= (unsigned)PyTuple_GET_SIZE(wire_dtypes))
        return NULL;
    PyObject *d = PyTuple_GET_ITEM(wire_dtypes, code);
    return PyArray_DescrCheck(d) ? (PyArray_Descr *)d : NULL;
}

typedef struct {
    const uint8_t *p;
    uint64_t pos, end;
} wreader;

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int b = 7; b >= 0; b--)
        v = (v << 8) | p[b];
    return v;
}

static int wr_u8(wreader *r, unsigned *v)
{
    if (r->pos >= r->end)
        return -1;
    *v = r->p[r->pos++];
    return 0;
}

static int wr_u64(wreader *r, uint64_t *v)
{
    if (r->end - r->pos < 8)
        return -1;
    *v = le64(r->p + r->pos);
    r->pos += 8;
    return 0;
}

/* A length-prefixed section: its offset in *at and length in *len; when
 * `expected` is not UINT64_MAX the length must equal it.                 */
static int wr_section(wreader *r, uint64_t expected, uint64_t *at, uint64_t *len)
{
    uint64_t n;
    if (wr_u64(r, &n) < 0 || (expected != UINT64_MAX && n != expected) || n > r->end - r->pos)
        return -1;
    *at = r->pos;
    *len = n;
    r->pos += n;
    return 0;
}

/* An ndarray of `count` elements of `descr` (1-D, or `shape` when given)
 * at data[at]: a view of `owner` when !copy and the view is aligned
 * (read-only when the buffer is), else an aligned copy.  NULL with an
 * exception.                                                             */
static PyObject *wire_array(PyObject *owner, const Py_buffer *view, uint64_t at,
                            PyArray_Descr *descr, uint64_t count, int nd, const npy_intp *shape,
                            int copy)
{
    npy_intp dims1[1] = {(npy_intp)count};
    if (nd < 0) {
        nd = 1;
        shape = dims1;
    }
    const char *src = (const char *)view->buf + at;
    PyObject *v;
    if (!copy) {
        Py_INCREF(descr);
        int flags = view->readonly ? 0 : NPY_ARRAY_WRITEABLE;
        v = PyArray_NewFromDescr(&PyArray_Type, descr, nd, (npy_intp *)shape, NULL, (char *)src,
                                 flags, NULL);
        if (!v)
            return NULL;
        if (PyArray_ISALIGNED((PyArrayObject *)v)) {
            Py_INCREF(owner);
            if (PyArray_SetBaseObject((PyArrayObject *)v, owner) < 0) {
                Py_DECREF(v);
                return NULL;
            }
            return v;
        }
        Py_DECREF(v);   /* misaligned: a copy, as with copy=True */
    }
    Py_INCREF(descr);
    v = PyArray_NewFromDescr(&PyArray_Type, descr, nd, (npy_intp *)shape, NULL, NULL, 0, NULL);
    if (v) {
        size_t nb = (size_t)PyArray_ITEMSIZE((PyArrayObject *)v) * (size_t)count;
        char *dst = PyArray_DATA((PyArrayObject *)v);
        if (nb)
            LB_NOGIL(nb / 4, memcpy(dst, src, nb));
    }
    return v;
}

/* The quantized body of the built-in schemes sign (wire id 1), blockwise
 * (2) and blockwise_sr (3) for a tensor of `size` elements: the checks of
 * their layout() and check() (scales finite and >= 0, every code valid,
 * the fast range bound of check_range).  Returns (scheme id, dtype code,
 * (param, param), (codes, scales)), None (not handled: the caller falls
 * back) or NULL with an exception.                                       */
static PyObject *wire_quant(wreader *r, PyObject *owner, const Py_buffer *view, uint64_t size,
                            int dtype_expected, unsigned fast_mask, int copy)
{
    unsigned sid, qcode, np_, tag, na;
    uint64_t prm[2];
    if (wr_u8(r, &sid) < 0 || sid > 31 || !(fast_mask & (1u << sid)) || sid < 1 || sid > 3)
        Py_RETURN_NONE;
    if (wr_u8(r, &qcode) < 0 || !wire_dtype(qcode) ||
        (dtype_expected >= 0 && (int)qcode != dtype_expected))
        Py_RETURN_NONE;
    if (wr_u8(r, &np_) < 0 || np_ != 2)
        Py_RETURN_NONE;
    for (int i = 0; i < 2; i++)
        if (wr_u8(r, &tag) < 0 || tag != 0 || wr_u64(r, &prm[i]) < 0)
            Py_RETURN_NONE;
    if (wr_u8(r, &na) < 0 || na != 2)
        Py_RETURN_NONE;
    uint64_t block = prm[1], nscales;
    int bits;
    uint32_t maxcode;
    double levels;
    if (block > LB_MAX_BLOCK)
        Py_RETURN_NONE;
    uint64_t nb = block ? size / block + (size % block != 0) : 1;
    if (sid == 1) {   /* sign: (scale mode, block) */
        if (prm[0] > 3)
            Py_RETURN_NONE;
        bits = 1;
        maxcode = 1;
        levels = 1.0;
        nscales = prm[0] == 0 ? 0 : prm[0] == 3 ? 2 * nb : nb;
    } else {          /* blockwise: (bits, block) */
        uint64_t b = prm[0];
        if (b != 1 && b != 2 && b != 3 && b != 4 && b != 8)
            Py_RETURN_NONE;
        bits = (int)b;
        uint32_t lev = b == 1 ? 1 : (1u << (b - 1)) - 1;
        maxcode = b == 1 ? 1 : 2 * lev;
        levels = (double)lev;
        nscales = nb;
    }
    uint64_t ncodes = lb_packed_bytes(size, bits), c_at, c_len, s_at, s_len;
    if (wr_section(r, ncodes, &c_at, &c_len) < 0 || wr_section(r, 4 * nscales, &s_at, &s_len) < 0)
        Py_RETURN_NONE;
    /* check(): scales, codes, then check_range's fast bound */
    double top = 1.0;
    for (uint64_t i = 0; i < nscales; i++) {
        float f;
        memcpy(&f, (const uint8_t *)view->buf + s_at + 4 * i, 4);
        if (!(f >= 0) || f == (float)INFINITY)
            Py_RETURN_NONE;
        if (i == 0 || (double)f > top)
            top = (double)f;
    }
    lb_error err = {0};
    lb_status st;
    const uint8_t *cbuf = (const uint8_t *)view->buf + c_at;
    LB_NOGIL(size, st = lb_check_codes(cbuf, size, bits, maxcode, UINT32_MAX, &err));
    if (st != LB_OK)
        Py_RETURN_NONE;
    if (sid == 1 && prm[0] == 0)
        top = 1.0;   /* mode "none": no multipliers */
    if (size && !(levels * top <= lb_py_safe_bound(qcode)))
        Py_RETURN_NONE;   /* near overflow: the exact check is Python's */
    PyArray_Descr *u8 = PyArray_DescrFromType(NPY_UINT8), *f32 = PyArray_DescrFromType(NPY_FLOAT32);
    Py_DECREF(u8);    /* built-in descriptors: numpy keeps them alive */
    Py_DECREF(f32);
    PyObject *codes = wire_array(owner, view, c_at, u8, ncodes, -1, NULL, copy);
    PyObject *scales = codes ? wire_array(owner, view, s_at, f32, nscales, -1, NULL, copy) : NULL;
    if (!scales) {
        Py_XDECREF(codes);
        return NULL;
    }
    return Py_BuildValue("(II(KK)(NN))", sid, qcode, (unsigned long long)prm[0],
                         (unsigned long long)prm[1], codes, scales);
}

/* The index section of a sparse payload decoded and checked canonical, or
 * None / NULL as wire_quant.                                             */
static PyObject *wire_indices(const uint8_t *buf, uint64_t len, unsigned enc, uint64_t nnz,
                              uint64_t size)
{
    if (nnz > size || nnz > len * 8 + 1)
        Py_RETURN_NONE;
    int width = size > 0xFFFFFFFFull ? 8 : 4;
    npy_intp dims[1] = {(npy_intp)nnz};
    PyObject *out = lb_py_empty(1, dims, width == 4 ? NPY_UINT32 : NPY_UINT64);
    if (!out)
        return NULL;
    lb_error err = {0};
    lb_status st;
    void *od = PyArray_DATA((PyArrayObject *)out);
    LB_NOGIL(nnz, st = lb_index_decode(buf, len, (int)enc, nnz, size, width, od, &err));
    uint64_t sizes[3];
    if (st != LB_OK || lb_index_sizes(od, width, nnz, size, sizes) != LB_OK) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    unsigned best = sizes[0] <= sizes[1] && sizes[0] <= sizes[2] ? 0 : sizes[1] <= sizes[2] ? 1 : 2;
    if (best != enc) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* wire_decode(buf, copy, expect_shape, expect_code, max_size, fast_mask)
 *   -> None (not handled here: run the Python parser) or
 *      (1, shape, code, indices, values, seed, step)   values an array or
 *                                                      a wire_quant tuple
 *      (2, shape, code, quant tuple)
 *      (3, shape, code, array of that shape)
 * buf: a C-contiguous bytes-like object (bytes or a memoryview of "B");
 * expect_shape None or a tuple, expect_code -1 (none) or the wire code
 * the payload must have, max_size -1 (none) or a bound on its size.      */
static PyObject *py_wire_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "wire_decode: expected 6 arguments");
        return NULL;
    }
    PyObject *owner = args[0], *expect_shape = args[2];
    int copy = PyObject_IsTrue(args[1]);
    long expect_code = PyLong_AsLong(args[3]);
    long long max_size = PyLong_AsLongLong(args[4]);
    long fast_mask = PyLong_AsLong(args[5]);
    if (copy < 0 || PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(owner, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = NULL, *shape = NULL, *body = NULL, *indices = NULL;
    const uint8_t *p = view.buf;
    uint64_t n = (uint64_t)view.len;
    if (n < 12 || memcmp(p, W_MAGIC, 4) != 0)
        goto fallback;
    uint32_t crc = (uint32_t)p[n - 4] | (uint32_t)p[n - 3] << 8 | (uint32_t)p[n - 2] << 16 |
                   (uint32_t)p[n - 1] << 24;
    uint32_t got;
    LB_NOGIL((n - 4) / 4, got = lb_crc32c(0, p, (size_t)(n - 4)));
    if (got != crc)
        goto fallback;
    wreader r = {p, 4, n - 4};
    unsigned version, kind, code, ndim;
    if (wr_u8(&r, &version) < 0 || version != W_VERSION || wr_u8(&r, &kind) < 0 ||
        wr_u8(&r, &code) < 0 || !wire_dtype(code) || wr_u8(&r, &ndim) < 0 || ndim > W_MAX_NDIM ||
        r.end - r.pos < 8 * (uint64_t)ndim)
        goto fallback;
    if (expect_code >= 0 && (long)code != expect_code)
        goto fallback;
    npy_intp dims[W_MAX_NDIM];
    uint64_t bound = 1, size = 1;
    if (!(shape = PyTuple_New(ndim)))
        goto done;
    for (unsigned d = 0; d < ndim; d++) {
        uint64_t s = le64(p + r.pos);
        r.pos += 8;
        uint64_t s1 = s ? s : 1;   /* shape_bound: zero dimensions count as 1 */
        if (s1 >= W_MAX_SIZE || bound > (W_MAX_SIZE - 1) / s1)
            goto fallback;
        bound *= s1;
        size *= s;
        dims[d] = (npy_intp)s;
        PyObject *o = PyLong_FromUnsignedLongLong(s);
        if (!o)
            goto done;
        PyTuple_SET_ITEM(shape, d, o);
    }
    if (expect_shape != Py_None) {
        int eq = PyObject_RichCompareBool(shape, expect_shape, Py_EQ);
        if (eq < 0)
            goto done;
        if (!eq)
            goto fallback;
    }
    if (max_size >= 0 && size > (uint64_t)max_size)
        goto fallback;
    PyArray_Descr *dt = wire_dtype(code);
    uint64_t itemsize = (uint64_t)PyDataType_ELSIZE(dt);
    if (kind == 1) {   /* sparse */
        uint64_t nnz, i_at = 0, i_len = 0, v_at, v_len, seed = 0, step = 0;
        unsigned enc, vkind;
        if (wr_u64(&r, &nnz) < 0 || nnz > size || wr_u8(&r, &enc) < 0 || enc > 3)
            goto fallback;
        if (enc == 3) {
            if (wr_section(&r, 16, &i_at, &i_len) < 0)
                goto fallback;
            seed = le64(p + i_at);
            step = le64(p + i_at + 8);
            if (step >= LB_MAX_STEP)
                goto fallback;
        } else if (wr_section(&r, UINT64_MAX, &i_at, &i_len) < 0) {
            goto fallback;
        }
        if (wr_u8(&r, &vkind) < 0)
            goto fallback;
        if (vkind == 0) {
            if (wr_section(&r, nnz * itemsize, &v_at, &v_len) < 0)
                goto fallback;
            body = wire_array(owner, &view, v_at, dt, nnz, -1, NULL, copy);
        } else if (vkind == 1) {
            body = wire_quant(&r, owner, &view, nnz, (int)code, (unsigned)fast_mask, copy);
        } else {
            goto fallback;
        }
        if (!body)
            goto done;
        if (body == Py_None || r.pos != r.end)
            goto fallback;
        if (enc == 3) {
            uint64_t *idx = lb_alloc_n(nnz, sizeof(uint64_t), 0);
            if (!idx || lb_randomk_indices(size, nnz, seed, step, idx) != LB_OK) {
                free(idx);
                goto fallback;
            }
            indices = lb_py_indices(idx, nnz, size);
        } else {
            indices = wire_indices(p + i_at, i_len, enc, nnz, size);
        }
        if (!indices)
            goto done;
        if (indices == Py_None)
            goto fallback;
        if (enc == 3)
            result = Py_BuildValue("(iOIOOKK)", 1, shape, code, indices, body,
                                   (unsigned long long)seed, (unsigned long long)step);
        else
            result = Py_BuildValue("(iOIOOOO)", 1, shape, code, indices, body, Py_None, Py_None);
    } else if (kind == 2) {   /* quantized */
        body = wire_quant(&r, owner, &view, size, (int)code, (unsigned)fast_mask, copy);
        if (!body)
            goto done;
        if (body == Py_None || r.pos != r.end)
            goto fallback;
        result = Py_BuildValue("(iOIO)", 2, shape, code, body);
    } else if (kind == 3) {   /* dense */
        uint64_t v_at, v_len;
        if (wr_section(&r, size * itemsize, &v_at, &v_len) < 0 || r.pos != r.end)
            goto fallback;
        body = wire_array(owner, &view, v_at, dt, size, (int)ndim, dims, copy);
        if (!body)
            goto done;
        result = Py_BuildValue("(iOIO)", 3, shape, code, body);
    } else {
        goto fallback;
    }
    goto done;
fallback:
    Py_INCREF(Py_None);
    result = Py_None;
done:
    Py_XDECREF(shape);
    Py_XDECREF(body);
    Py_XDECREF(indices);
    PyBuffer_Release(&view);
    return result;
}

typedef struct {
    uint8_t *p;     /* NULL: only count */
    uint64_t pos;
} wwriter;

static void ww_u8(wwriter *w, unsigned v)
{
    if (w->p)
        w->p[w->pos] = (uint8_t)v;
    w->pos++;
}

static void ww_u64(wwriter *w, uint64_t v)
{
    if (w->p)
        for (int b = 0; b < 8; b++)
            w->p[w->pos + (uint64_t)b] = (uint8_t)(v >> (8 * b));
    w->pos += 8;
}

static void ww_bytes(wwriter *w, const void *b, uint64_t n)
{
    if (w->p && n)
        memcpy(w->p + w->pos, b, (size_t)n);
    w->pos += n;
}

/* A section holding an ndarray's bytes (C-contiguous, native little-endian
 * byte order): 0, or 1 when the array is not one (the caller falls back). */
static int ww_array(wwriter *w, PyObject *o)
{
    if (!PyArray_Check(o))
        return 1;
    PyArrayObject *a = (PyArrayObject *)o;
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISNOTSWAPPED(a) || PY_BIG_ENDIAN)
        return 1;
    uint64_t nb = (uint64_t)PyArray_NBYTES(a);
    ww_u64(w, nb);
    ww_bytes(w, PyArray_DATA(a), nb);
    return 0;
}

/* A quantized body from (scheme id, dtype code, kinds, params, arrays):
 * kinds a bytes object with "u" (u64) or "f" (f64) per parameter.  0, 1
 * (not handled) or -1 with an exception.                                */
static int ww_quant(wwriter *w, PyObject *q)
{
    PyObject *kinds, *params, *arrays;
    unsigned sid, qcode;
    if (!PyTuple_Check(q) || PyTuple_GET_SIZE(q) != 5)
        return 1;
    sid = (unsigned)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(q, 0));
    qcode = (unsigned)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(q, 1));
    kinds = PyTuple_GET_ITEM(q, 2);
    params = PyTuple_GET_ITEM(q, 3);
    arrays = PyTuple_GET_ITEM(q, 4);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 1;
    }
    if (sid > 255 || qcode > 255 || !PyBytes_Check(kinds) || !PyTuple_Check(params) ||
        !PyTuple_Check(arrays) || PyBytes_GET_SIZE(kinds) != PyTuple_GET_SIZE(params) ||
        PyTuple_GET_SIZE(params) > 255 || PyTuple_GET_SIZE(arrays) > 255)
        return 1;
    ww_u8(w, sid);
    ww_u8(w, qcode);
    ww_u8(w, (unsigned)PyTuple_GET_SIZE(params));
    const char *k = PyBytes_AS_STRING(kinds);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(params); i++) {
        PyObject *v = PyTuple_GET_ITEM(params, i);
        uint64_t bits;
        if (k[i] == 'u') {
            if (!PyLong_Check(v))
                return 1;
            bits = PyLong_AsUnsignedLongLong(v);
            ww_u8(w, 0);
        } else {
            double d = PyFloat_AsDouble(v);
            memcpy(&bits, &d, 8);
            ww_u8(w, 1);
        }
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return 1;
        }
        ww_u64(w, bits);
    }
    ww_u8(w, (unsigned)PyTuple_GET_SIZE(arrays));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(arrays); i++)
        if (ww_array(w, PyTuple_GET_ITEM(arrays, i)))
            return 1;
    return 0;
}

/* One pass of wire_encode over its arguments (see there): 0, 1 (not
 * handled) or -1 with an exception.                                      */
static int ww_payload(wwriter *w, PyObject *const *args, Py_ssize_t nargs)
{
    long kind = PyLong_AsLong(args[0]);
    PyObject *shape = args[1];
    long code = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 1;
    }
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) > W_MAX_NDIM || code < 1 || code > 255)
        return 1;
    Py_ssize_t ndim = PyTuple_GET_SIZE(shape);
    ww_bytes(w, W_MAGIC, 4);
    ww_u8(w, W_VERSION);
    ww_u8(w, (unsigned)kind);
    ww_u8(w, (unsigned)code);
    ww_u8(w, (unsigned)ndim);
    uint64_t size = 1;
    for (Py_ssize_t d = 0; d < ndim; d++) {
        PyObject *o = PyTuple_GET_ITEM(shape, d);
        uint64_t s = PyLong_Check(o) ? PyLong_AsUnsignedLongLong(o) : 0;
        if (!PyLong_Check(o) || PyErr_Occurred()) {
            PyErr_Clear();
            return 1;
        }
        size *= s;
        ww_u64(w, s);
    }
    if (kind == 1 && nargs == 7) {   /* indices, seed, step, values */
        PyObject *io = args[3];
        if (!PyArray_Check(io))
            return 1;
        PyArrayObject *ia = (PyArrayObject *)io;
        int t = PyArray_TYPE(ia);
        if ((t != NPY_UINT32 && t != NPY_UINT64) || PyArray_NDIM(ia) != 1 ||
            !PyArray_IS_C_CONTIGUOUS(ia) || !PyArray_ISALIGNED(ia) || !PyArray_ISNOTSWAPPED(ia))
            return 1;
        int width = t == NPY_UINT32 ? 4 : 8;
        uint64_t nnz = (uint64_t)PyArray_SIZE(ia);
        ww_u64(w, nnz);
        if (args[4] != Py_None) {   /* random-k: seed and step */
            uint64_t seed = PyLong_AsUnsignedLongLong(args[4]);
            uint64_t step = PyLong_AsUnsignedLongLong(args[5]);
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return 1;
            }
            ww_u8(w, 3);
            ww_u64(w, 16);
            ww_u64(w, seed);
            ww_u64(w, step);
        } else {
            uint64_t sizes[3];
            if (lb_index_sizes(PyArray_DATA(ia), width, nnz, size, sizes) != LB_OK)
                return 1;
            int enc = sizes[0] <= sizes[1] && sizes[0] <= sizes[2] ? 0
                      : sizes[1] <= sizes[2] ? 1 : 2;
            ww_u8(w, (unsigned)enc);
            ww_u64(w, sizes[enc]);
            if (w->p && lb_index_encode(PyArray_DATA(ia), width, nnz, size, enc, w->p + w->pos,
                                        sizes[enc]) != LB_OK)
                return 1;
            w->pos += sizes[enc];
        }
        if (PyArray_Check(args[6])) {
            ww_u8(w, 0);
            return ww_array(w, args[6]);
        }
        ww_u8(w, 1);
        return ww_quant(w, args[6]);
    }
    if (kind == 2 && nargs == 4)
        return ww_quant(w, args[3]);
    if (kind == 3 && nargs == 4)
        return ww_array(w, args[3]);
    return 1;
}

/* wire_encode(1, shape, code, indices, seed, step, values)   sparse
 * wire_encode(2, shape, code, quant)                          quantized
 * wire_encode(3, shape, code, array)                          dense
 *   -> the payload's wire bytes, or None when an argument is not what
 * this fast path handles (wire.py then encodes in Python).  seed is None
 * unless the indices are random-k's; values an array or a quant tuple
 * (scheme id, dtype code, kinds, params, arrays) as in ww_quant.        */
static PyObject *py_wire_encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 4)
        Py_RETURN_NONE;
    wwriter w = {NULL, 0};
    int rc = ww_payload(&w, args, nargs);
    if (rc)
        return rc < 0 ? NULL : (Py_INCREF(Py_None), Py_None);
    if (w.pos + 4 > PY_SSIZE_T_MAX)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(w.pos + 4));
    if (!out)
        return NULL;
    uint64_t len = w.pos;
    w.p = (uint8_t *)PyBytes_AS_STRING(out);
    w.pos = 0;
    rc = ww_payload(&w, args, nargs);
    if (rc || w.pos != len) {
        Py_DECREF(out);
        if (rc < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    uint32_t crc;
    LB_NOGIL(len / 4, crc = lb_crc32c(0, w.p, (size_t)len));
    for (int b = 0; b < 4; b++)
        w.p[len + (uint64_t)b] = (uint8_t)(crc >> (8 * b));
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
    {"wire_setup", py_wire_setup, METH_O, "wire_setup(dtypes): the dtype of each wire code."},
    {"wire_decode", (PyCFunction)(void (*)(void))py_wire_decode, METH_FASTCALL,
     "wire_decode(buf, copy, expect_shape, expect_code, max_size, fast_mask) -> parts or None."},
    {"wire_encode", (PyCFunction)(void (*)(void))py_wire_encode, METH_FASTCALL,
     "wire_encode(kind, shape, code, ...) -> bytes or None."},
    {NULL, NULL, 0, NULL},
};
