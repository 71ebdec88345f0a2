/* moe_glue.c - bindings of core/moe.c (MoE routing, load balancing, dispatch).
 *
 * python/lowband/moe.py checks every argument with readable messages first;
 * the checks here are the safety net that keeps a direct call into _core
 * from crashing: exact dtypes and ranks, consistent shapes.               */
#include "glue.h"

/* New reference to `obj` as a C-contiguous, aligned, native ndarray of
 * exactly `typenum` and `ndim` dimensions; TypeError/ValueError otherwise. */
static PyArrayObject *exact_array(PyObject *obj, const char *name, int typenum,
                                  int ndim)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != typenum) {
        PyArray_Descr *want = PyArray_DescrFromType(typenum);
        PyErr_Format(PyExc_TypeError, "%s: expected an ndarray of dtype %S", name,
                     (PyObject *)want);
        Py_XDECREF(want);
        return NULL;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimension(s), got %d", name,
                     ndim, PyArray_NDIM((PyArrayObject *)obj));
        return NULL;
    }
    return (PyArrayObject *)PyArray_FromAny(
        obj, PyArray_DescrFromType(typenum), 0, 0,
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED, NULL);
}

/* A float32/float64 array of exactly `ndim` dimensions (lb_py_vector). */
static PyArrayObject *float_array(PyObject *obj, const char *name, int ndim)
{
    PyArrayObject *a = lb_py_vector(obj, name, LB_ALLOW_F32_F64);
    if (a && PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimension(s), got %d", name,
                     ndim, PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* None or a bool array of `n` elements (any shape) -> *out (a new ref or
 * NULL for None); -1 with an exception.                                    */
static int optional_mask(PyObject *obj, uint64_t n, PyArrayObject **out)
{
    *out = NULL;
    if (obj == Py_None)
        return 0;
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_BOOL) {
        PyErr_SetString(PyExc_TypeError, "mask: expected None or a bool ndarray");
        return -1;
    }
    if ((uint64_t)PyArray_SIZE((PyArrayObject *)obj) != n) {
        PyErr_Format(PyExc_ValueError, "mask: expected %llu elements, got %lld",
                     (unsigned long long)n,
                     (long long)PyArray_SIZE((PyArrayObject *)obj));
        return -1;
    }
    *out = (PyArrayObject *)PyArray_FromAny(
        obj, PyArray_DescrFromType(NPY_BOOL), 0, 0,
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL);
    return *out ? 0 : -1;
}

static const uint8_t *mask_data(PyArrayObject *m)
{
    return m ? (const uint8_t *)PyArray_DATA(m) : NULL;
}

static PyObject *new_array(int nd, npy_intp d0, npy_intp d1, int typenum)
{
    npy_intp dims[2] = {d0, d1};
    return lb_py_empty(nd, dims, typenum);
}

/* A new (rows x cols) array, or, when `out` is not None, a new reference to
 * out[:rows] after checking that out is a writeable, C-contiguous, aligned,
 * native 2-D array of `typenum` with at least `rows` rows and `cols`
 * columns.                                                                 */
static PyObject *output_rows(PyObject *out, npy_intp rows, npy_intp cols, int typenum)
{
    if (out == Py_None)
        return new_array(2, rows, cols, typenum);
    PyArrayObject *o = (PyArrayObject *)out;
    if (!PyArray_Check(out) || PyArray_TYPE(o) != typenum || PyArray_NDIM(o) != 2 ||
        !PyArray_IS_C_CONTIGUOUS(o) || !PyArray_ISWRITEABLE(o) || !PyArray_ISALIGNED(o) ||
        PyArray_ISBYTESWAPPED(o) || PyArray_DIM(o, 0) < rows || PyArray_DIM(o, 1) != cols) {
        PyErr_Format(PyExc_ValueError,
                     "out: expected a writeable C-contiguous 2-D array of the input dtype "
                     "with at least %lld rows and %lld columns",
                     (long long)rows, (long long)cols);
        return NULL;
    }
    if (PyArray_DIM(o, 0) == rows) {
        Py_INCREF(out);
        return out;
    }
    return PySequence_GetSlice(out, 0, (Py_ssize_t)rows);
}

static int score_arg(int score, lb_score_fn *out)
{
    if (score != LB_SCORE_SOFTMAX && score != LB_SCORE_SIGMOID) {
        PyErr_Format(PyExc_ValueError, "score: expected 0 (softmax) or 1 (sigmoid), got %d",
                     score);
        return -1;
    }
    *out = (lb_score_fn)score;
    return 0;
}

/* route(logits[T,E], k, score, renormalize, bias[E] f64 | None, groups,
 *       group_k, threads) -> (experts, weights, scores, counts, aux_sums) */
static PyObject *py_route(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"logits", "k", "score", "renormalize", "bias",
                             "groups", "group_k", "threads", NULL};
    PyObject *z_o, *bias_o = Py_None, *threads = Py_None;
    unsigned long long k, groups = 0, group_k = 0;
    int score = 0, renorm = 1, nt;
    lb_score_fn fn;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OK|ipOKKO:route", kwlist, &z_o, &k,
                                     &score, &renorm, &bias_o, &groups, &group_k,
                                     &threads) ||
        score_arg(score, &fn) < 0)
        return NULL;
    PyArrayObject *z = float_array(z_o, "logits", 2), *bias = NULL;
    if (!z)
        return NULL;
    PyObject *ex = NULL, *w = NULL, *s = NULL, *c = NULL, *sums = NULL;
    uint64_t T = (uint64_t)PyArray_DIM(z, 0), E = (uint64_t)PyArray_DIM(z, 1);
    lb_dtype dt = lb_py_dtype_of(z);
    if (E == 0 || k == 0 || k > E) {
        PyErr_Format(PyExc_ValueError, "k: expected 1 <= k <= E = %llu, got %llu",
                     (unsigned long long)E, k);
        goto fail;
    }
    if (bias_o != Py_None) {
        if (!(bias = exact_array(bias_o, "bias", NPY_FLOAT64, 1)))
            goto fail;
        if ((uint64_t)PyArray_DIM(bias, 0) != E) {
            PyErr_Format(PyExc_ValueError, "bias: expected %llu elements, got %lld",
                         (unsigned long long)E, (long long)PyArray_DIM(bias, 0));
            goto fail;
        }
    }
    if (lb_py_threads(threads, T * E, &nt) < 0)
        goto fail;
    int tn = lb_py_typenum(dt);
    ex = new_array(2, (npy_intp)T, (npy_intp)k, NPY_INT32);
    w = new_array(2, (npy_intp)T, (npy_intp)k, tn);
    s = new_array(2, (npy_intp)T, (npy_intp)E, tn);
    c = new_array(1, (npy_intp)E, 0, NPY_INT64);
    sums = new_array(1, (npy_intp)E, 0, NPY_FLOAT64);
    if (!ex || !w || !s || !c || !sums)
        goto fail;
    lb_route_opts o = {fn, renorm, bias ? (const double *)PyArray_DATA(bias) : NULL,
                       groups, group_k};
    lb_error err = {0};
    lb_status st;
    const void *zd = PyArray_DATA(z);
    int32_t *exd = PyArray_DATA((PyArrayObject *)ex);
    void *wd = PyArray_DATA((PyArrayObject *)w), *sd = PyArray_DATA((PyArrayObject *)s);
    int64_t *cd = PyArray_DATA((PyArrayObject *)c);
    double *sumd = PyArray_DATA((PyArrayObject *)sums);
    LB_NOGIL(T * E, st = lb_moe_route(zd, dt, T, E, k, &o, exd, wd, sd, cd, sumd,
                                      nt, &err));
    if (st == LB_EINVAL) {
        PyErr_SetString(PyExc_ValueError,
                        "route: inconsistent groups / group_k / k for this E");
        goto fail;
    }
    if (st != LB_OK) {
        lb_py_raise(st, &err, "route", "logits", z);
        goto fail;
    }
    Py_DECREF(z);
    Py_XDECREF(bias);
    return Py_BuildValue("(NNNNN)", ex, w, s, c, sums);
fail:
    Py_XDECREF(z);
    Py_XDECREF(bias);
    Py_XDECREF(ex);
    Py_XDECREF(w);
    Py_XDECREF(s);
    Py_XDECREF(c);
    Py_XDECREF(sums);
    return NULL;
}

/* balance_stats(scores[T,E] | None, score, experts[T,k] i32, E, mask | None,
 *               seg_len, threads) -> (counts[B,E], valid[B], sums[B,E] | None)
 * With scores None only the counts are computed.                           */
static PyObject *py_balance_stats(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"scores", "score", "experts", "E", "mask", "seg_len",
                             "threads", NULL};
    PyObject *s_o, *ex_o, *mask_o, *threads = Py_None;
    unsigned long long E, seg;
    int score, nt;
    lb_score_fn fn;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiOKOK|O:balance_stats", kwlist, &s_o,
                                     &score, &ex_o, &E, &mask_o, &seg, &threads) ||
        score_arg(score, &fn) < 0)
        return NULL;
    PyArrayObject *s = NULL, *ex = NULL, *mask = NULL;
    PyObject *c = NULL, *v = NULL, *sums = NULL;
    if (!(ex = exact_array(ex_o, "experts", NPY_INT32, 2)))
        return NULL;
    uint64_t T = (uint64_t)PyArray_DIM(ex, 0), k = (uint64_t)PyArray_DIM(ex, 1);
    if (s_o != Py_None) {
        if (!(s = float_array(s_o, "scores", 2)))
            goto fail;
        if ((uint64_t)PyArray_DIM(s, 0) != T || (uint64_t)PyArray_DIM(s, 1) != E) {
            PyErr_SetString(PyExc_ValueError, "scores: expected shape (T, E)");
            goto fail;
        }
    }
    if (E == 0 || k == 0 || (T && (seg == 0 || T % seg))) {
        PyErr_SetString(PyExc_ValueError,
                        "balance_stats: need E >= 1, k >= 1 and T a multiple of seg_len");
        goto fail;
    }
    if (optional_mask(mask_o, T, &mask) < 0 || lb_py_threads(threads, T * E, &nt) < 0)
        goto fail;
    uint64_t B = T ? T / seg : 0;
    c = new_array(2, (npy_intp)B, (npy_intp)E, NPY_INT64);
    v = new_array(1, (npy_intp)B, 0, NPY_INT64);
    if (s)
        sums = new_array(2, (npy_intp)B, (npy_intp)E, NPY_FLOAT64);
    if (!c || !v || (s && !sums))
        goto fail;
    lb_error err = {0};
    lb_status st;
    lb_dtype dt = s ? lb_py_dtype_of(s) : LB_F64;
    const void *sd = s ? PyArray_DATA(s) : NULL;
    const int32_t *exd = PyArray_DATA(ex);
    const uint8_t *md = mask_data(mask);
    int64_t *cd = PyArray_DATA((PyArrayObject *)c), *vd = PyArray_DATA((PyArrayObject *)v);
    double *sumd = sums ? PyArray_DATA((PyArrayObject *)sums) : NULL;
    LB_NOGIL(T * E, st = lb_moe_balance_stats(sd, dt, T, E, fn, exd, k, md, seg, cd, vd,
                                              sumd, nt, &err));
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "experts: expert id at flat position %llu is outside [0, %llu)",
                     (unsigned long long)err.index, E);
        goto fail;
    }
    if (st != LB_OK) {
        lb_py_raise(st, &err, "balance_stats", "scores", NULL);
        goto fail;
    }
    Py_XDECREF(s);
    Py_DECREF(ex);
    Py_XDECREF(mask);
    if (!sums) {
        sums = Py_None;
        Py_INCREF(sums);
    }
    return Py_BuildValue("(NNN)", c, v, sums);
fail:
    Py_XDECREF(s);
    Py_XDECREF(ex);
    Py_XDECREF(mask);
    Py_XDECREF(c);
    Py_XDECREF(v);
    Py_XDECREF(sums);
    return NULL;
}

/* balance_grad(scores[T,E], score, g[B,E] f64, seg_len, mask | None, threads)
 *   -> grad[T,E] in the scores' dtype */
static PyObject *py_balance_grad(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"scores", "score", "g", "seg_len", "mask", "threads", NULL};
    PyObject *s_o, *g_o, *mask_o, *threads = Py_None;
    unsigned long long seg;
    int score, nt;
    lb_score_fn fn;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiOKO|O:balance_grad", kwlist, &s_o,
                                     &score, &g_o, &seg, &mask_o, &threads) ||
        score_arg(score, &fn) < 0)
        return NULL;
    PyArrayObject *s = NULL, *g = NULL, *mask = NULL;
    PyObject *grad = NULL;
    if (!(s = float_array(s_o, "scores", 2)) || !(g = exact_array(g_o, "g", NPY_FLOAT64, 2)))
        goto fail;
    uint64_t T = (uint64_t)PyArray_DIM(s, 0), E = (uint64_t)PyArray_DIM(s, 1);
    if (E == 0 || (T && (seg == 0 || T % seg)) ||
        (uint64_t)PyArray_DIM(g, 0) != (T ? T / seg : 0) ||
        (uint64_t)PyArray_DIM(g, 1) != E) {
        PyErr_SetString(PyExc_ValueError,
                        "balance_grad: need E >= 1, T a multiple of seg_len and g of "
                        "shape (T / seg_len, E)");
        goto fail;
    }
    if (optional_mask(mask_o, T, &mask) < 0 || lb_py_threads(threads, T * E, &nt) < 0)
        goto fail;
    lb_dtype dt = lb_py_dtype_of(s);
    if (!(grad = new_array(2, (npy_intp)T, (npy_intp)E, lb_py_typenum(dt))))
        goto fail;
    lb_status st;
    const void *sd = PyArray_DATA(s);
    const double *gd = PyArray_DATA(g);
    const uint8_t *md = mask_data(mask);
    void *out = PyArray_DATA((PyArrayObject *)grad);
    LB_NOGIL(T * E, st = lb_moe_balance_grad(sd, dt, T, E, fn, gd, seg, md, out, nt));
    if (st != LB_OK) {
        lb_py_raise(st, NULL, "balance_grad", "scores", NULL);
        goto fail;
    }
    Py_DECREF(s);
    Py_DECREF(g);
    Py_XDECREF(mask);
    return grad;
fail:
    Py_XDECREF(s);
    Py_XDECREF(g);
    Py_XDECREF(mask);
    Py_XDECREF(grad);
    return NULL;
}

/* z_loss(logits[T,E], mask | None, grad_scale, want_grad, threads)
 *   -> (sum of lse^2 over valid rows, grad | None) */
static PyObject *py_z_loss(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"logits", "mask", "grad_scale", "want_grad", "threads", NULL};
    PyObject *z_o, *mask_o, *threads = Py_None;
    double scale;
    int want = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOd|pO:z_loss", kwlist, &z_o, &mask_o,
                                     &scale, &want, &threads))
        return NULL;
    PyArrayObject *z = NULL, *mask = NULL;
    PyObject *grad = NULL;
    if (!(z = float_array(z_o, "logits", 2)))
        return NULL;
    uint64_t T = (uint64_t)PyArray_DIM(z, 0), E = (uint64_t)PyArray_DIM(z, 1);
    if (E == 0) {
        PyErr_SetString(PyExc_ValueError, "logits: expected at least one expert column");
        goto fail;
    }
    if (optional_mask(mask_o, T, &mask) < 0 || lb_py_threads(threads, T * E, &nt) < 0)
        goto fail;
    lb_dtype dt = lb_py_dtype_of(z);
    if (want && !(grad = new_array(2, (npy_intp)T, (npy_intp)E, lb_py_typenum(dt))))
        goto fail;
    double loss = 0.0;
    lb_error err = {0};
    lb_status st;
    const void *zd = PyArray_DATA(z);
    const uint8_t *md = mask_data(mask);
    void *gd = grad ? PyArray_DATA((PyArrayObject *)grad) : NULL;
    LB_NOGIL(T * E, st = lb_moe_z_loss(zd, dt, T, E, md, scale, &loss, gd, nt, &err));
    if (st != LB_OK) {
        lb_py_raise(st, &err, "z_loss", "logits", z);
        goto fail;
    }
    Py_DECREF(z);
    Py_XDECREF(mask);
    if (!grad) {
        grad = Py_None;
        Py_INCREF(grad);
    }
    return Py_BuildValue("(dN)", loss, grad);
fail:
    Py_XDECREF(z);
    Py_XDECREF(mask);
    Py_XDECREF(grad);
    return NULL;
}

/* plan(experts[T,k] i32, E, mask | None, capacity (-1: none), drop,
 *      weights[T,k] | None, threads) -> (offsets[E+1], rows[N], position[T,k]) */
static PyObject *py_plan(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"experts", "E", "mask", "capacity", "drop", "weights",
                             "threads", NULL};
    PyObject *ex_o, *mask_o, *w_o, *threads = Py_None;
    unsigned long long E;
    long long cap;
    int drop, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OKOLiO|O:plan", kwlist, &ex_o, &E,
                                     &mask_o, &cap, &drop, &w_o, &threads))
        return NULL;
    if (drop != LB_DROP_PROBS && drop != LB_DROP_POSITION) {
        PyErr_Format(PyExc_ValueError, "drop: expected 0 (probs) or 1 (position), got %d",
                     drop);
        return NULL;
    }
    PyArrayObject *ex = NULL, *mask = NULL, *w = NULL;
    PyObject *off = NULL, *rows = NULL, *pos = NULL, *res = NULL;
    if (!(ex = exact_array(ex_o, "experts", NPY_INT32, 2)))
        return NULL;
    uint64_t T = (uint64_t)PyArray_DIM(ex, 0), k = (uint64_t)PyArray_DIM(ex, 1);
    if (E == 0 || E > INT32_MAX || k == 0) {
        PyErr_SetString(PyExc_ValueError, "plan: need E >= 1 and k >= 1");
        goto fail;
    }
    if (w_o != Py_None) {
        if (!(w = float_array(w_o, "weights", 2)))
            goto fail;
        if ((uint64_t)PyArray_DIM(w, 0) != T || (uint64_t)PyArray_DIM(w, 1) != k) {
            PyErr_SetString(PyExc_ValueError, "weights: expected the shape of experts");
            goto fail;
        }
    } else if (drop == LB_DROP_PROBS && cap >= 0) {
        PyErr_SetString(PyExc_ValueError, "weights: drop by probs needs the weights");
        goto fail;
    }
    if (optional_mask(mask_o, T, &mask) < 0 || lb_py_threads(threads, T * k, &nt) < 0)
        goto fail;
    off = new_array(1, (npy_intp)(E + 1), 0, NPY_INT64);
    rows = new_array(1, (npy_intp)(T * k), 0, NPY_INT64);
    pos = new_array(2, (npy_intp)T, (npy_intp)k, NPY_INT64);
    if (!off || !rows || !pos)
        goto fail;
    lb_error err = {0};
    lb_status st;
    const int32_t *exd = PyArray_DATA(ex);
    const uint8_t *md = mask_data(mask);
    uint64_t capacity = cap < 0 ? UINT64_MAX : (uint64_t)cap;
    const void *wd = w ? PyArray_DATA(w) : NULL;
    lb_dtype dt = w ? lb_py_dtype_of(w) : LB_F64;
    int64_t *od = PyArray_DATA((PyArrayObject *)off), *rd = PyArray_DATA((PyArrayObject *)rows);
    int64_t *pd = PyArray_DATA((PyArrayObject *)pos);
    LB_NOGIL(T * k, st = lb_moe_plan(exd, T, k, E, md, capacity, (lb_drop_policy)drop, wd,
                                     dt, od, rd, pd, nt, &err));
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "experts: expert id at flat position %llu is outside [0, %llu)",
                     (unsigned long long)err.index, E);
        goto fail;
    }
    if (st != LB_OK) {
        lb_py_raise(st, &err, "dispatch", "experts", NULL);
        goto fail;
    }
    /* the used prefix of rows */
    PyObject *used = PySequence_GetSlice(rows, 0, (Py_ssize_t)od[E]);
    if (!used)
        goto fail;
    res = Py_BuildValue("(NNN)", off, used, pos);
    off = pos = NULL;
fail:
    Py_XDECREF(ex);
    Py_XDECREF(mask);
    Py_XDECREF(w);
    Py_XDECREF(off);
    Py_XDECREF(rows);
    Py_XDECREF(pos);
    return res;
}

/* scatter(x[T,H], position[T,k] i64, n, weights[T,k] | None, threads, out)
 *   -> out[n,H] */
static PyObject *py_scatter(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "position", "n", "weights", "threads", "out", NULL};
    PyObject *x_o, *p_o, *w_o, *threads = Py_None, *out_o = Py_None;
    unsigned long long n;
    int nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOKO|OO:scatter", kwlist, &x_o, &p_o, &n,
                                     &w_o, &threads, &out_o))
        return NULL;
    PyArrayObject *x = NULL, *p = NULL, *w = NULL;
    PyObject *out = NULL;
    if (!(x = float_array(x_o, "x", 2)) || !(p = exact_array(p_o, "position", NPY_INT64, 2)))
        goto fail;
    uint64_t T = (uint64_t)PyArray_DIM(x, 0), H = (uint64_t)PyArray_DIM(x, 1);
    uint64_t k = (uint64_t)PyArray_DIM(p, 1);
    lb_dtype dt = lb_py_dtype_of(x);
    if ((uint64_t)PyArray_DIM(p, 0) != T || k == 0 || n > T * k) {
        PyErr_SetString(PyExc_ValueError,
                        "position: expected shape (T, k >= 1) for x of T rows, n <= T * k");
        goto fail;
    }
    if (w_o != Py_None) {
        if (!(w = float_array(w_o, "weights", 2)))
            goto fail;
        if (lb_py_dtype_of(w) != dt || (uint64_t)PyArray_DIM(w, 0) != T ||
            (uint64_t)PyArray_DIM(w, 1) != k) {
            PyErr_SetString(PyExc_ValueError, "weights: expected (T, k) in the dtype of x");
            goto fail;
        }
    }
    if (lb_py_threads(threads, n * H, &nt) < 0 ||
        !(out = output_rows(out_o, (npy_intp)n, (npy_intp)H, lb_py_typenum(dt))))
        goto fail;
    lb_status st;
    const void *xd = PyArray_DATA(x), *wd = w ? PyArray_DATA(w) : NULL;
    const int64_t *pd = PyArray_DATA(p);
    void *od = PyArray_DATA((PyArrayObject *)out);
    LB_NOGIL(n * H, st = lb_moe_scatter(xd, dt, T, H, k, pd, wd, n, od, nt));
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "position: the kept positions must map one-to-one onto [0, %llu)", n);
        goto fail;
    }
    if (st != LB_OK) {
        lb_py_raise(st, NULL, "dispatch", "position", NULL);
        goto fail;
    }
    Py_DECREF(x);
    Py_DECREF(p);
    Py_XDECREF(w);
    return out;
fail:
    Py_XDECREF(x);
    Py_XDECREF(p);
    Py_XDECREF(w);
    Py_XDECREF(out);
    return NULL;
}

/* Shared argument handling of combine and combine_dot: y[N,H] and
 * position[T,k]; returns 0 or -1 with an exception.                       */
static int combine_args(PyObject *y_o, PyObject *p_o, PyArrayObject **y,
                        PyArrayObject **p)
{
    *y = *p = NULL;
    if (!(*y = float_array(y_o, "expert_out", 2)) ||
        !(*p = exact_array(p_o, "position", NPY_INT64, 2)))
        return -1;
    return 0;
}

/* The arrays of combine's backward: grad_out[T,H], expert_out y[N,H] and
 * position[T,k] (int64), grad_out in y's dtype, k >= 1.  -1 with an
 * exception set; the arrays taken so far are in *g, *y, *p (else NULL)
 * for the caller to release either way.                                  */
static int combine_grad_args(PyObject *g_o, PyObject *y_o, PyObject *p_o, PyArrayObject **g,
                             PyArrayObject **y, PyArrayObject **p)
{
    *g = NULL;
    if (combine_args(y_o, p_o, y, p) < 0 || !(*g = float_array(g_o, "grad_out", 2)))
        return -1;
    if (lb_py_dtype_of(*g) != lb_py_dtype_of(*y) || PyArray_DIM(*g, 0) != PyArray_DIM(*p, 0) ||
        PyArray_DIM(*g, 1) != PyArray_DIM(*y, 1) || PyArray_DIM(*p, 1) == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "grad_out: expected shape (T, H) in the dtype of expert_out");
        return -1;
    }
    return 0;
}

/* combine(y[N,H], position[T,k], weights[T,k] | None, threads, out)
 *   -> out[T,H] */
static PyObject *py_combine(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"y", "position", "weights", "threads", "out", NULL};
    PyObject *y_o, *p_o, *w_o, *threads = Py_None, *out_o = Py_None;
    int nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|OO:combine", kwlist, &y_o, &p_o, &w_o,
                                     &threads, &out_o))
        return NULL;
    PyArrayObject *y, *p, *w = NULL;
    PyObject *out = NULL;
    if (combine_args(y_o, p_o, &y, &p) < 0)
        goto fail;
    uint64_t n = (uint64_t)PyArray_DIM(y, 0), H = (uint64_t)PyArray_DIM(y, 1);
    uint64_t T = (uint64_t)PyArray_DIM(p, 0), k = (uint64_t)PyArray_DIM(p, 1);
    lb_dtype dt = lb_py_dtype_of(y);
    if (w_o != Py_None) {
        if (!(w = float_array(w_o, "weights", 2)))
            goto fail;
        if (lb_py_dtype_of(w) != dt || (uint64_t)PyArray_DIM(w, 0) != T ||
            (uint64_t)PyArray_DIM(w, 1) != k) {
            PyErr_SetString(PyExc_ValueError,
                            "weights: expected the shape of position, in the dtype of y");
            goto fail;
        }
    }
    if (k == 0) {
        PyErr_SetString(PyExc_ValueError, "position: expected k >= 1 columns");
        goto fail;
    }
    if (lb_py_threads(threads, T * H * k, &nt) < 0 ||
        !(out = output_rows(out_o, (npy_intp)T, (npy_intp)H, lb_py_typenum(dt))))
        goto fail;
    if (out_o != Py_None && (PyArray_DATA((PyArrayObject *)out) == PyArray_DATA(y))) {
        PyErr_SetString(PyExc_ValueError, "out: must not be expert_out itself");
        goto fail;
    }
    lb_status st;
    const void *yd = PyArray_DATA(y), *wd = w ? PyArray_DATA(w) : NULL;
    const int64_t *pd = PyArray_DATA(p);
    void *od = PyArray_DATA((PyArrayObject *)out);
    LB_NOGIL(T * H * k, st = lb_moe_combine(yd, dt, n, H, pd, T, k, wd, od, nt));
    if (st != LB_OK) {
        lb_py_raise(st, NULL, "combine", "position", NULL);
        goto fail;
    }
    Py_DECREF(y);
    Py_DECREF(p);
    Py_XDECREF(w);
    return out;
fail:
    Py_XDECREF(y);
    Py_XDECREF(p);
    Py_XDECREF(w);
    Py_XDECREF(out);
    return NULL;
}

/* combine_dot(grad_out[T,H], y[N,H], position[T,k], threads) -> gw[T,k] */
static PyObject *py_combine_dot(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"grad_out", "y", "position", "threads", NULL};
    PyObject *g_o, *y_o, *p_o, *threads = Py_None;
    int nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|O:combine_dot", kwlist, &g_o, &y_o,
                                     &p_o, &threads))
        return NULL;
    PyArrayObject *g = NULL, *y, *p;
    PyObject *out = NULL;
    if (combine_grad_args(g_o, y_o, p_o, &g, &y, &p) < 0)
        goto fail;
    uint64_t n = (uint64_t)PyArray_DIM(y, 0), H = (uint64_t)PyArray_DIM(y, 1);
    uint64_t T = (uint64_t)PyArray_DIM(p, 0), k = (uint64_t)PyArray_DIM(p, 1);
    lb_dtype dt = lb_py_dtype_of(y);
    if (lb_py_threads(threads, T * H * k, &nt) < 0 ||
        !(out = new_array(2, (npy_intp)T, (npy_intp)k, lb_py_typenum(dt))))
        goto fail;
    lb_status st;
    const void *gd = PyArray_DATA(g), *yd = PyArray_DATA(y);
    const int64_t *pd = PyArray_DATA(p);
    void *od = PyArray_DATA((PyArrayObject *)out);
    LB_NOGIL(T * H * k, st = lb_moe_combine_dot(gd, yd, dt, n, H, pd, T, k, od, nt));
    if (st != LB_OK) {
        lb_py_raise(st, NULL, "combine_backward", "position", NULL);
        goto fail;
    }
    Py_DECREF(g);
    Py_DECREF(y);
    Py_DECREF(p);
    return out;
fail:
    Py_XDECREF(g);
    Py_XDECREF(y);
    Py_XDECREF(p);
    Py_XDECREF(out);
    return NULL;
}

/* combine_backward(grad_out[T,H], y[N,H], position[T,k], weights[T,k] | None,
 *                  need_y, need_weights, threads)
 *   -> (grad_y[N,H] | None, grad_weights[T,k] | None): combine's backward
 * (moe_scatter and moe_combine_dot) in one pass over grad_out.            */
static PyObject *py_combine_backward(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"grad_out", "y",           "position", "weights",
                             "need_y",   "need_weights", "threads",  NULL};
    PyObject *g_o, *y_o, *p_o, *w_o, *threads = Py_None;
    int need_y = 1, need_w = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|ppO:combine_backward", kwlist, &g_o,
                                     &y_o, &p_o, &w_o, &need_y, &need_w, &threads))
        return NULL;
    PyArrayObject *g = NULL, *y, *p, *w = NULL;
    PyObject *gy = NULL, *gw = NULL;
    if (combine_grad_args(g_o, y_o, p_o, &g, &y, &p) < 0)
        goto fail;
    uint64_t n = (uint64_t)PyArray_DIM(y, 0), H = (uint64_t)PyArray_DIM(y, 1);
    uint64_t T = (uint64_t)PyArray_DIM(p, 0), k = (uint64_t)PyArray_DIM(p, 1);
    lb_dtype dt = lb_py_dtype_of(y);
    if (!need_y && !need_w) {
        PyErr_SetString(PyExc_ValueError, "need_y, need_weights: expected at least one True");
        goto fail;
    }
    if (w_o != Py_None) {
        if (!(w = float_array(w_o, "weights", 2)))
            goto fail;
        if (lb_py_dtype_of(w) != dt || (uint64_t)PyArray_DIM(w, 0) != T ||
            (uint64_t)PyArray_DIM(w, 1) != k) {
            PyErr_SetString(PyExc_ValueError,
                            "weights: expected the shape of position, in the dtype of y");
            goto fail;
        }
    }
    if (lb_py_threads(threads, T * H * k, &nt) < 0 ||
        (need_y && !(gy = new_array(2, (npy_intp)n, (npy_intp)H, lb_py_typenum(dt)))) ||
        (need_w && !(gw = new_array(2, (npy_intp)T, (npy_intp)k, lb_py_typenum(dt)))))
        goto fail;
    lb_status st;
    const void *gd = PyArray_DATA(g), *yd = PyArray_DATA(y), *wd = w ? PyArray_DATA(w) : NULL;
    const int64_t *pd = PyArray_DATA(p);
    void *gyd = gy ? PyArray_DATA((PyArrayObject *)gy) : NULL;
    void *gwd = gw ? PyArray_DATA((PyArrayObject *)gw) : NULL;
    LB_NOGIL(T * H * k,
             st = lb_moe_combine_backward(gd, yd, dt, n, H, pd, T, k, wd, gyd, gwd, nt));
    if (st == LB_ERANGE && gy) {
        PyErr_Format(PyExc_ValueError,
                     "position: the kept positions must map one-to-one onto [0, %llu)",
                     (unsigned long long)n);
        goto fail;
    }
    if (st != LB_OK) {
        lb_py_raise(st, NULL, "combine_backward", "position", NULL);
        goto fail;
    }
    Py_DECREF(g);
    Py_DECREF(y);
    Py_DECREF(p);
    Py_XDECREF(w);
    PyObject *res = Py_BuildValue("(OO)", gy ? gy : Py_None, gw ? gw : Py_None);
    Py_XDECREF(gy);
    Py_XDECREF(gw);
    return res;
fail:
    Py_XDECREF(g);
    Py_XDECREF(y);
    Py_XDECREF(p);
    Py_XDECREF(w);
    Py_XDECREF(gy);
    Py_XDECREF(gw);
    return NULL;
}

static PyObject *py_sum_rows(PyObject *self, PyObject *arg)
{
    uint64_t E;
    if (lb_py_u64(arg, "E", 0, &E) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(lb_moe_sum_rows(E));
}

#define KW METH_VARARGS | METH_KEYWORDS
#define FN(f) (PyCFunction)(void (*)(void))(f)

PyMethodDef lb_moe_methods[] = {
    {"moe_route", FN(py_route), KW,
     "moe_route(logits, k, score, renormalize, bias, groups, group_k, threads)"},
    {"moe_balance_stats", FN(py_balance_stats), KW,
     "moe_balance_stats(scores, score, experts, E, mask, seg_len, threads)"},
    {"moe_balance_grad", FN(py_balance_grad), KW,
     "moe_balance_grad(scores, score, g, seg_len, mask, threads)"},
    {"moe_z_loss", FN(py_z_loss), KW,
     "moe_z_loss(logits, mask, grad_scale, want_grad, threads)"},
    {"moe_plan", FN(py_plan), KW,
     "moe_plan(experts, E, mask, capacity, drop, weights, threads)"},
    {"moe_scatter", FN(py_scatter), KW,
     "moe_scatter(x, position, n, weights, threads, out)"},
    {"moe_combine", FN(py_combine), KW, "moe_combine(y, position, weights, threads)"},
    {"moe_combine_dot", FN(py_combine_dot), KW,
     "moe_combine_dot(grad_out, y, position, threads)"},
    {"moe_combine_backward", FN(py_combine_backward), KW,
     "moe_combine_backward(grad_out, y, position, weights, need_y, need_weights, threads)"},
    {"moe_sum_rows", py_sum_rows, METH_O, "moe_sum_rows(E): rows per column-sum partial"},
    {NULL, NULL, 0, NULL},
};
