/* quant_glue.c - bindings of core/quant.c and core/pack.c (quantizers, their
 * decoder, float16/bfloat16 conversions, bit packing).  The Python layer
 * (lowband/quantize.py) validates arguments first; these re-check what the
 * core relies on.                                                          */
#include "glue.h"

/* A new 1-D array of `count` elements of `typenum`. */
static PyArrayObject *new_array(uint64_t count, int typenum)
{
    npy_intp dims[1] = {(npy_intp)count};
    return (PyArrayObject *)lb_py_empty(1, dims, typenum);
}

/* Status -> exception for the quantizers; returns NULL. */
static PyObject *quant_raise(lb_status st, const lb_error *err, const char *what,
                             PyArrayObject *x)
{
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "%s: x is too large for the %s scale of block %llu: its values "
                     "cannot be represented", what,
                     strcmp(what, "minifloat") ? "float32" : "power-of-two",
                     (unsigned long long)err->index);
        return NULL;
    }
    return lb_py_raise(st, err, what, "x", x);
}

/* Runs a quantizer: x, its size and dtype, threads; the encoder fills
 * codes (packed, nbytes) and a per-block array (count, typenum).          */
typedef struct {
    PyArrayObject *x;
    uint64_t n;
    lb_dtype dt;
    int nt;
    PyArrayObject *codes, *aux;
} qcall;

static int qcall_open(qcall *q, PyObject *x_o, PyObject *threads)
{
    memset(q, 0, sizeof(*q));
    q->x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!q->x)
        return -1;
    q->n = (uint64_t)PyArray_SIZE(q->x);
    q->dt = lb_py_dtype_of(q->x);
    if (lb_py_threads(threads, q->n, &q->nt) < 0) {
        Py_CLEAR(q->x);
        return -1;
    }
    return 0;
}

static int qcall_alloc(qcall *q, uint64_t nbytes, uint64_t aux_count, int aux_type)
{
    q->codes = new_array(nbytes, NPY_UINT8);
    q->aux = new_array(aux_count, aux_type);
    if (!q->codes || !q->aux) {
        Py_CLEAR(q->codes);
        Py_CLEAR(q->aux);
        Py_CLEAR(q->x);
        return -1;
    }
    return 0;
}

static PyObject *qcall_close(qcall *q, lb_status st, const lb_error *err,
                             const char *what)
{
    if (st != LB_OK) {
        quant_raise(st, err, what, q->x);
        Py_CLEAR(q->codes);
        Py_CLEAR(q->aux);
        Py_CLEAR(q->x);
        return NULL;
    }
    Py_CLEAR(q->x);
    return Py_BuildValue("(NN)", q->codes, q->aux);
}

#define CODES(q) ((uint8_t *)PyArray_DATA((q)->codes))
#define AUX(q, T) ((T *)PyArray_DATA((q)->aux))
#define XDATA(q) ((const void *)PyArray_DATA((q)->x))

static uint64_t nblocks_of(uint64_t n, uint64_t block)
{
    return block ? n / block + (n % block != 0) : 1;
}

/* sign(x, mode, block, check_finite, threads) -> (codes, scales) */
static PyObject *py_sign(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int mode, check;
    unsigned long long block;
    qcall q;
    if (lb_fc_args("sign", nargs, 5, 5) < 0 || lb_fc_i(args[1], &mode) < 0 ||
        lb_fc_K(args[2], &block) < 0 || lb_fc_p(args[3], &check) < 0 ||
        qcall_open(&q, args[0], args[4]) < 0)
        return NULL;
    uint64_t ns = mode == LB_SCALE_NONE ? 0 : nblocks_of(q.n, block);
    if (qcall_alloc(&q, lb_packed_bytes(q.n, 1), ns, NPY_FLOAT32) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_sign(XDATA(&q), q.n, q.dt, mode, block, check, q.nt,
                               CODES(&q), AUX(&q, float), &err));
    return qcall_close(&q, st, &err, "sign");
}

/* quantize(x, out_dt, bits, block, stochastic, seed, step, check_finite,
 *          threads); out_dt: the lb_dtype code the payload decodes to     */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int out_dt, bits, stochastic, check;
    unsigned long long block, seed, step;
    qcall q;
    if (lb_fc_args("quantize", nargs, 9, 9) < 0 || lb_fc_i(args[1], &out_dt) < 0 ||
        lb_fc_i(args[2], &bits) < 0 || lb_fc_K(args[3], &block) < 0 ||
        lb_fc_p(args[4], &stochastic) < 0 || lb_fc_K(args[5], &seed) < 0 ||
        lb_fc_K(args[6], &step) < 0 || lb_fc_p(args[7], &check) < 0 ||
        qcall_open(&q, args[0], args[8]) < 0)
        return NULL;
    if (qcall_alloc(&q, lb_packed_bytes(q.n, bits), nblocks_of(q.n, block), NPY_FLOAT32) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_quantize(XDATA(&q), q.n, q.dt, (lb_dtype)out_dt, bits, block,
                                   stochastic, seed, step, check, q.nt, CODES(&q),
                                   AUX(&q, float), &err));
    return qcall_close(&q, st, &err, "quantize");
}

/* qsgd(x, out_dt, levels, block, seed, step, check_finite, threads) */
static PyObject *py_qsgd(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int out_dt, check;
    unsigned long long levels, block, seed, step;
    qcall q;
    if (!PyArg_ParseTuple(args, "OiKKKKpO:qsgd", &x_o, &out_dt, &levels, &block, &seed,
                          &step, &check, &threads) ||
        qcall_open(&q, x_o, threads) < 0)
        return NULL;
    int bits = lb_qsgd_bits(levels);
    if (qcall_alloc(&q, lb_packed_bytes(q.n, bits), nblocks_of(q.n, block), NPY_FLOAT32) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_qsgd(XDATA(&q), q.n, q.dt, (lb_dtype)out_dt, levels, block, seed,
                               step, check, q.nt, CODES(&q), AUX(&q, float), &err));
    return qcall_close(&q, st, &err, "qsgd");
}

/* terngrad(x, clip, seed, step, check_finite, threads) */
static PyObject *py_terngrad(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int check;
    double clip;
    unsigned long long seed, step;
    qcall q;
    if (!PyArg_ParseTuple(args, "OdKKpO:terngrad", &x_o, &clip, &seed, &step, &check,
                          &threads) ||
        qcall_open(&q, x_o, threads) < 0)
        return NULL;
    if (qcall_alloc(&q, lb_packed_bytes(q.n, 2), 1, NPY_FLOAT32) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_terngrad(XDATA(&q), q.n, q.dt, clip, seed, step, check, q.nt,
                                   CODES(&q), AUX(&q, float), &err));
    return qcall_close(&q, st, &err, "terngrad");
}

/* natural(x, emax, seed, step, check_finite, threads) -> (codes, top) */
static PyObject *py_natural(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int emax, check;
    unsigned long long seed, step;
    qcall q;
    if (!PyArg_ParseTuple(args, "OiKKpO:natural", &x_o, &emax, &seed, &step, &check,
                          &threads) ||
        qcall_open(&q, x_o, threads) < 0)
        return NULL;
    if (qcall_alloc(&q, q.n, 1, NPY_INT16) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_natural(XDATA(&q), q.n, q.dt, emax, seed, step, check, q.nt,
                                  CODES(&q), AUX(&q, int16_t), &err));
    return qcall_close(&q, st, &err, "natural");
}

/* minifloat(x, exp_bits, man_bits, block, kmax, check_finite, threads) */
static PyObject *py_minifloat(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int E, M, kmax, check;
    unsigned long long block;
    qcall q;
    if (!PyArg_ParseTuple(args, "OiiKipO:minifloat", &x_o, &E, &M, &block, &kmax, &check,
                          &threads) ||
        qcall_open(&q, x_o, threads) < 0)
        return NULL;
    if (qcall_alloc(&q, lb_packed_bytes(q.n, 1 + E + M), nblocks_of(q.n, block), NPY_INT8) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_minifloat(XDATA(&q), q.n, q.dt, E, M, block, kmax, check, q.nt,
                                    CODES(&q), AUX(&q, int8_t), &err));
    return qcall_close(&q, st, &err, "minifloat");
}

/* lut2bit(x, out_dt, check_finite, threads) -> (codes, table) */
static PyObject *py_lut2bit(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int out_dt, check;
    qcall q;
    if (!PyArg_ParseTuple(args, "OipO:lut2bit", &x_o, &out_dt, &check, &threads) ||
        qcall_open(&q, x_o, threads) < 0)
        return NULL;
    if (qcall_alloc(&q, lb_packed_bytes(q.n, 2), 4, NPY_FLOAT32) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    LB_NOGIL(q.n, st = lb_lut2bit(XDATA(&q), q.n, q.dt, (lb_dtype)out_dt, check, q.nt, CODES(&q),
                                  AUX(&q, float), &err));
    return qcall_close(&q, st, &err, "lut2bit");
}

/* An array argument that must already have this dtype, be C-contiguous and
 * hold at least `count` elements (trusted callers: the Python layer).     */
static int want_array(PyObject *o, const char *name, int typenum, uint64_t count,
                      int writeable)
{
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != typenum ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o) ||
        (uint64_t)PyArray_SIZE((PyArrayObject *)o) < count ||
        (writeable && !PyArray_ISWRITEABLE((PyArrayObject *)o))) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous array of %llu "
                     "elements of the right dtype", name, (unsigned long long)count);
        return -1;
    }
    return 0;
}

/* table_decode(codes, n, bits, table, mult, block, out, threads) */
static PyObject *py_table_decode(PyObject *self, PyObject *args)
{
    PyObject *codes, *table, *mult, *out, *threads;
    unsigned long long n, block;
    int bits, nt, subtract = 0;
    if (!PyArg_ParseTuple(args, "OKiOOKOO|p:table_decode", &codes, &n, &bits, &table, &mult,
                          &block, &out, &threads, &subtract))
        return NULL;
    if (bits < 1 || bits > 8) {
        PyErr_Format(PyExc_ValueError, "bits: expected 1..8, got %d", bits);
        return NULL;
    }
    if (!PyArray_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out: expected an ndarray");
        return NULL;
    }
    lb_dtype dt = lb_py_dtype_of((PyArrayObject *)out);
    int wide = dt == LB_F64, tt = wide ? NPY_FLOAT64 : NPY_FLOAT32;
    if (subtract && dt != LB_F32 && dt != LB_F64) {
        PyErr_SetString(PyExc_TypeError, "out: subtracting needs a float32 or float64 array");
        return NULL;
    }
    if (!dt || dt == LB_BF16 || want_array(out, "out", lb_py_typenum(dt), n, 1) < 0 ||
        want_array(codes, "codes", NPY_UINT8, lb_packed_bytes(n, bits), 0) < 0 ||
        want_array(table, "table", tt, (uint64_t)1 << bits, 0) < 0 ||
        (mult != Py_None &&
         want_array(mult, "mult", tt, block ? n / block + (n % block != 0) : 1, 0) < 0) ||
        lb_py_threads(threads, n, &nt) < 0)
        return NULL;
    const uint8_t *c = PyArray_DATA((PyArrayObject *)codes);
    const void *t = PyArray_DATA((PyArrayObject *)table);
    const void *m = mult == Py_None ? NULL : PyArray_DATA((PyArrayObject *)mult);
    void *o = PyArray_DATA((PyArrayObject *)out);
    lb_status st;
    LB_NOGIL(n, st = subtract ? lb_table_subtract(c, n, bits, t, m, block, dt, o, nt)
                              : lb_table_decode(c, n, bits, t, m, block, dt, o, nt));
    if (st != LB_OK)
        return lb_py_raise(st, NULL, "dequantize", "codes", NULL);
    Py_RETURN_NONE;
}

/* narrow(x, to, check_finite, threads) -> uint16 patterns (to: 3 f16, 4 bf16) */
static PyObject *py_narrow(PyObject *self, PyObject *args)
{
    PyObject *x_o, *threads;
    int to, check;
    qcall q;
    if (!PyArg_ParseTuple(args, "OipO:narrow", &x_o, &to, &check, &threads) ||
        qcall_open(&q, x_o, threads) < 0)
        return NULL;
    PyArrayObject *out = new_array(q.n, NPY_UINT16);
    if (!out) {
        Py_DECREF(q.x);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    uint16_t *o = PyArray_DATA(out);
    LB_NOGIL(q.n, st = lb_narrow(XDATA(&q), q.n, q.dt, (lb_dtype)to, check, q.nt, o, &err));
    if (st != LB_OK) {
        if (st == LB_ERANGE)
            PyErr_Format(PyExc_ValueError, "cast: x has a value at flat index %llu that "
                         "overflows %s; pass check_finite=False to get Inf",
                         (unsigned long long)err.index, to == LB_F16 ? "float16" : "bfloat16");
        else
            lb_py_raise(st, &err, "cast", "x", q.x);
        Py_DECREF(out);
        Py_DECREF(q.x);
        return NULL;
    }
    Py_DECREF(q.x);
    return (PyObject *)out;
}

/* widen(codes uint16, from, out, threads): from 3 f16, 4 bf16 */
static PyObject *py_widen(PyObject *self, PyObject *args)
{
    PyObject *codes, *out, *threads;
    int from, nt;
    if (!PyArg_ParseTuple(args, "OiOO:widen", &codes, &from, &out, &threads))
        return NULL;
    if (!PyArray_Check(out) || !PyArray_Check(codes)) {
        PyErr_SetString(PyExc_TypeError, "widen: expected ndarrays");
        return NULL;
    }
    uint64_t n = (uint64_t)PyArray_SIZE((PyArrayObject *)codes);
    lb_dtype dt = lb_py_dtype_of((PyArrayObject *)out);
    if ((from != LB_F16 && from != LB_BF16) || !dt || dt == LB_BF16 ||
        want_array(codes, "codes", NPY_UINT16, n, 0) < 0 ||
        want_array(out, "out", lb_py_typenum(dt), n, 1) < 0 ||
        lb_py_threads(threads, n, &nt) < 0)
        return NULL;
    const uint16_t *c = PyArray_DATA((PyArrayObject *)codes);
    void *o = PyArray_DATA((PyArrayObject *)out);
    lb_status st;
    LB_NOGIL(n, st = lb_widen(c, n, (lb_dtype)from, dt, o, nt));
    if (st != LB_OK)
        return lb_py_raise(st, NULL, "widen", "codes", NULL);
    Py_RETURN_NONE;
}

/* pack_bits(codes, bits, threads) -> uint8 array; codes any integer ndarray */
static PyObject *py_pack_bits(PyObject *self, PyObject *args)
{
    PyObject *codes_o, *threads;
    int bits, nt;
    if (!PyArg_ParseTuple(args, "OiO:pack_bits", &codes_o, &bits, &threads))
        return NULL;
    PyArrayObject *c = (PyArrayObject *)PyArray_FROM_OF(
        codes_o, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED);
    if (!c)
        return NULL;
    if (!PyArray_ISINTEGER(c) || bits < 1 || bits > 16) {
        PyErr_Format(PyExc_TypeError, "codes: expected an integer array, got dtype %S",
                     (PyObject *)PyArray_DESCR(c));
        Py_DECREF(c);
        return NULL;
    }
    uint64_t n = (uint64_t)PyArray_SIZE(c);
    int width = (int)PyArray_ITEMSIZE(c), is_signed = PyArray_ISSIGNED(c);
    PyArrayObject *out = NULL;
    if (lb_py_threads(threads, n, &nt) < 0 || !(out = new_array(lb_packed_bytes(n, bits), NPY_UINT8))) {
        Py_DECREF(c);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    const void *src = PyArray_DATA(c);
    uint8_t *o = PyArray_DATA(out);
    LB_NOGIL(n, st = lb_pack_bits(src, width, is_signed, n, bits, o, nt, &err));
    Py_DECREF(c);
    if (st != LB_OK) {
        Py_DECREF(out);
        if (st == LB_ERANGE) {
            PyErr_Format(PyExc_ValueError, "codes: expected values in [0, %llu) for bits=%d, "
                         "got one out of range at flat index %llu",
                         1ull << bits, bits, (unsigned long long)err.index);
            return NULL;
        }
        return lb_py_raise(st, &err, "pack_bits", "codes", NULL);
    }
    return (PyObject *)out;
}

/* unpack_bits(buf uint8 ndarray, bits, n, threads) -> uint8/uint16 array */
static PyObject *py_unpack_bits(PyObject *self, PyObject *args)
{
    PyObject *buf_o, *threads;
    int bits, nt;
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "OiKO:unpack_bits", &buf_o, &bits, &n, &threads))
        return NULL;
    if (bits < 1 || bits > 16 || want_array(buf_o, "buf", NPY_UINT8, 0, 0) < 0)
        return NULL;
    PyArrayObject *buf = (PyArrayObject *)buf_o;
    uint64_t len = (uint64_t)PyArray_SIZE(buf);
    if (n > ((uint64_t)1 << 60) || len < lb_packed_bytes(n, bits)) {
        PyErr_Format(PyExc_ValueError, "buf: expected at least %llu bytes for n=%llu codes "
                     "of %d bits, got %llu", n > ((uint64_t)1 << 60) ? 0ull :
                     (unsigned long long)lb_packed_bytes(n, bits), n, bits,
                     (unsigned long long)len);
        return NULL;
    }
    int width = bits <= 8 ? 1 : 2;
    PyArrayObject *out = NULL;
    if (lb_py_threads(threads, n, &nt) < 0 ||
        !(out = new_array(n, width == 1 ? NPY_UINT8 : NPY_UINT16)))
        return NULL;
    const uint8_t *b = PyArray_DATA(buf);
    void *o = PyArray_DATA(out);
    lb_status st;
    LB_NOGIL(n, st = lb_unpack_bits(b, len, n, bits, o, width, nt));
    if (st != LB_OK) {
        Py_DECREF(out);
        return lb_py_raise(st, NULL, "unpack_bits", "buf", NULL);
    }
    return (PyObject *)out;
}

/* check_codes(buf, n, bits, maxcode, forbidden) -> None or the first bad
 * element (n for set padding bits)                                        */
static PyObject *py_check_codes(PyObject *self, PyObject *args)
{
    PyObject *buf;
    unsigned long long n;
    int bits;
    unsigned int maxcode, forbidden;
    if (!PyArg_ParseTuple(args, "OKiII:check_codes", &buf, &n, &bits, &maxcode, &forbidden))
        return NULL;
    if (bits < 1 || bits > 16 || n > ((uint64_t)1 << 60) ||
        want_array(buf, "buf", NPY_UINT8, lb_packed_bytes(n, bits), 0) < 0)
        return NULL;
    if ((uint64_t)PyArray_SIZE((PyArrayObject *)buf) != lb_packed_bytes(n, bits)) {
        PyErr_SetString(PyExc_ValueError, "buf: wrong length");
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    const uint8_t *b = PyArray_DATA((PyArrayObject *)buf);
    LB_NOGIL(n, st = lb_check_codes(b, n, bits, maxcode, forbidden, &err));
    if (st == LB_OK)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(err.index);
}

/* range_ok(scales, levels, code) -> bool: levels * max(scales) (1.0 for
 * no scales) <= lb_py_safe_bound(code), False with a NaN scale: the fast
 * bound of check_range for a kernel's float32 scales (False: run it).   */
static PyObject *py_range_ok(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int code;
    if (lb_fc_args("range_ok", nargs, 3, 3) < 0 || lb_fc_i(args[2], &code) < 0)
        return NULL;
    double levels = PyFloat_AsDouble(args[1]);
    if (levels == -1.0 && PyErr_Occurred())
        return NULL;
    PyArrayObject *a = (PyArrayObject *)args[0];
    if (!PyArray_Check(args[0]) || PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_SetString(PyExc_TypeError, "scales: expected a contiguous float32 array");
        return NULL;
    }
    const float *s = PyArray_DATA(a);
    npy_intp n = PyArray_SIZE(a);
    double top = n ? (double)s[0] : 1.0;
    for (npy_intp i = 1; i < n; i++) {
        if (s[i] != s[i])
            Py_RETURN_FALSE;
        if ((double)s[i] > top)
            top = (double)s[i];
    }
    return PyBool_FromLong(top == top && levels * top <= lb_py_safe_bound((unsigned)code));
}

PyMethodDef lb_quant_methods[] = {
    {"range_ok", (PyCFunction)(void (*)(void))py_range_ok, METH_FASTCALL,
     "range_ok(scales, levels, dtype_code) -> whether levels * max(scales) is far from overflow."},
    {"sign", (PyCFunction)(void (*)(void))py_sign, METH_FASTCALL,
     "sign(x, mode, block, check_finite, threads)"},
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL,
     "quantize(x, bits, block, stochastic, seed, step, check_finite, threads)"},
    {"qsgd", py_qsgd, METH_VARARGS, "qsgd(x, levels, block, seed, step, check_finite, threads)"},
    {"terngrad", py_terngrad, METH_VARARGS, "terngrad(x, clip, seed, step, check_finite, threads)"},
    {"natural", py_natural, METH_VARARGS, "natural(x, emax, seed, step, check_finite, threads)"},
    {"minifloat", py_minifloat, METH_VARARGS,
     "minifloat(x, exp_bits, man_bits, block, kmax, check_finite, threads)"},
    {"lut2bit", py_lut2bit, METH_VARARGS, "lut2bit(x, check_finite, threads)"},
    {"table_decode", py_table_decode, METH_VARARGS,
     "table_decode(codes, n, bits, table, mult, block, out, threads, subtract=False): "
     "out = D, or out -= D"},
    {"narrow", py_narrow, METH_VARARGS, "narrow(x, to, check_finite, threads)"},
    {"widen", py_widen, METH_VARARGS, "widen(codes, from, out, threads)"},
    {"pack_bits", py_pack_bits, METH_VARARGS, "pack_bits(codes, bits, threads)"},
    {"unpack_bits", py_unpack_bits, METH_VARARGS, "unpack_bits(buf, bits, n, threads)"},
    {"check_codes", py_check_codes, METH_VARARGS, "check_codes(buf, n, bits, maxcode, forbidden)"},
    {NULL, NULL, 0, NULL},
};
