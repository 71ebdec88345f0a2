/* group_glue.c - bindings of core/group.c (one call for many tensors). */
#include "glue.h"   /* Python.h first: it sets the feature macros */

#include <stdio.h>

/* The arrays and sizes of one group call, owned until group_free(). */
typedef struct {
    Py_ssize_t nseg;
    PyArrayObject **x;   /* inputs (new references)                     */
    const void **xd;     /* their data                                  */
    void **ed;           /* error-feedback states (borrowed data)       */
    uint64_t *n, *k, total;
    lb_sparse *out;
    lb_dtype dt;
} group;

static void group_free(group *g)
{
    for (Py_ssize_t s = 0; g->x && s < g->nseg; s++)
        Py_XDECREF(g->x[s]);
    PyMem_Free(g->x);
    PyMem_Free(g->xd);
    PyMem_Free(g->ed);
    PyMem_Free(g->n);
    PyMem_Free(g->k);
    PyMem_Free(g->out);
}

/* Fills g from the sequence xs_o (vectors named `name`[s], one float dtype)
 * and ks_o (one k[s] <= n[s] each; NULL: no k); 0 or -1 with an exception. */
static int group_parse(group *g, PyObject *xs_o, PyObject *ks_o, const char *name)
{
    memset(g, 0, sizeof(*g));
    PyObject *xs = PySequence_Fast(xs_o, "tensors: expected a sequence of arrays");
    if (!xs)
        return -1;
    PyObject *ks = ks_o ? PySequence_Fast(ks_o, "k: expected a sequence of ints") : NULL;
    if (ks_o && !ks) {
        Py_DECREF(xs);
        return -1;
    }
    int rc = -1;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(xs), a = m ? m : 1;
    if (ks && PySequence_Fast_GET_SIZE(ks) != m) {
        PyErr_Format(PyExc_ValueError, "k: expected %zd values (one per tensor), got %zd", m,
                     PySequence_Fast_GET_SIZE(ks));
        goto done;
    }
    g->x = PyMem_Calloc((size_t)a, sizeof(*g->x));
    g->xd = PyMem_Calloc((size_t)a, sizeof(*g->xd));
    g->ed = PyMem_Calloc((size_t)a, sizeof(*g->ed));
    g->n = PyMem_Calloc((size_t)a, sizeof(*g->n));
    g->k = PyMem_Calloc((size_t)a, sizeof(*g->k));
    g->out = PyMem_Calloc((size_t)a, sizeof(*g->out));
    g->nseg = m;
    if (!g->x || !g->xd || !g->ed || !g->n || !g->k || !g->out) {
        PyErr_NoMemory();
        goto done;
    }
    char label[64];
    for (Py_ssize_t s = 0; s < m; s++) {
        snprintf(label, sizeof label, "%s[%zd]", name, s);
        g->x[s] = lb_py_vector(PySequence_Fast_GET_ITEM(xs, s), label, LB_ALLOW_F32_F64);
        if (!g->x[s])
            goto done;
        lb_dtype dt = lb_py_dtype_of(g->x[s]);
        if (s == 0)
            g->dt = dt;
        else if (dt != g->dt) {
            PyErr_Format(PyExc_TypeError, "%s: expected dtype %s (as %s[0]), got %s", label,
                         g->dt == LB_F32 ? "float32" : "float64", name,
                         dt == LB_F32 ? "float32" : "float64");
            goto done;
        }
        g->xd[s] = PyArray_DATA(g->x[s]);
        g->n[s] = (uint64_t)PyArray_SIZE(g->x[s]);
        g->total += g->n[s];
        snprintf(label, sizeof label, "k[%zd]", s);
        if (ks && lb_py_u64(PySequence_Fast_GET_ITEM(ks, s), label, g->n[s] + 1, g->k + s) < 0)
            goto done;
    }
    rc = 0;
done:
    Py_DECREF(xs);
    Py_XDECREF(ks);
    return rc;
}

/* The list of (indices, values), one per segment; frees every result. */
static PyObject *group_results(group *g)
{
    PyObject *list = PyList_New(g->nseg);
    for (Py_ssize_t s = 0; s < g->nseg; s++) {
        lb_sparse *o = g->out + s;
        PyObject *pair = NULL;
        if (list) {
            PyObject *idx = lb_py_indices(o->indices, o->count, g->n[s]);
            o->indices = NULL;
            PyObject *vals = idx ? lb_py_adopt(o->values, o->count, lb_py_typenum(g->dt)) : NULL;
            o->values = NULL;
            pair = vals ? Py_BuildValue("(NN)", idx, vals) : NULL;
            if (idx && !vals)
                Py_DECREF(idx);
        }
        if (!pair) {
            Py_CLEAR(list);
            lb_sparse_free(o);
            continue;
        }
        PyList_SET_ITEM(list, s, pair);
    }
    return list;
}

/* The exception for a failed group call in segment `seg`. */
static PyObject *group_error(group *g, lb_status st, lb_error *err, uint64_t seg,
                             const char *what, const char *name)
{
    char label[64];
    if ((Py_ssize_t)seg < g->nseg && seg != UINT64_MAX)
        snprintf(label, sizeof label, "%s[%llu]", name, (unsigned long long)seg);
    else   /* not tied to one tensor (out of memory) */
        snprintf(label, sizeof label, "%s", name);
    if (st == LB_EOVERFLOW) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the compensated vector of %s is non-finite at flat index %llu "
                     "(it overflowed; the step is undone)",
                     what, label, (unsigned long long)err->index);
        return NULL;
    }
    if (st == LB_EINVAL && (Py_ssize_t)seg < g->nseg) {
        PyErr_Format(PyExc_ValueError, "k[%llu]: expected at most %llu (the size of %s), got %llu",
                     (unsigned long long)seg, (unsigned long long)g->n[seg], label,
                     (unsigned long long)g->k[seg]);
        return NULL;
    }
    return lb_py_raise(st, err, what, label,
                       (Py_ssize_t)seg < g->nseg ? g->x[seg] : NULL);
}

/* topk_group(xs, ks, check_finite=True, threads=None, name="tensors")
 *   -> [(indices, values), ...] */
static PyObject *py_topk_group(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"xs", "ks", "check_finite", "threads", "name", NULL};
    PyObject *xs, *ks, *threads = Py_None;
    const char *name = "tensors";
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|pOs:topk_group", kwlist, &xs, &ks, &check,
                                     &threads, &name))
        return NULL;
    group g;
    PyObject *res = NULL;
    if (group_parse(&g, xs, ks, name) < 0 || lb_py_threads(threads, g.total, &nt) < 0)
        goto done;
    lb_error err = {0};
    uint64_t seg = UINT64_MAX;
    lb_status st;
    LB_NOGIL(g.total, st = lb_topk_group(g.xd, g.n, g.k, (uint64_t)g.nseg, g.dt, check, nt,
                                         g.out, &err, &seg));
    res = st == LB_OK ? group_results(&g) : group_error(&g, st, &err, seg, "topk_group", name);
done:
    group_free(&g);
    return res;
}

/* ef_topk_group(es, gs, ks, decay, scale, check_finite, threads, name="grads")
 *   -> [(indices, values), ...]; every es[s] updated in place. */
static PyObject *py_ef_topk_group(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"es", "gs", "ks", "decay", "scale", "check_finite", "threads",
                             "name", NULL};
    PyObject *es_o, *gs, *ks, *threads = Py_None;
    const char *name = "grads";
    double decay = 1.0, scale = 1.0;
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|ddpOs:ef_topk_group", kwlist, &es_o, &gs,
                                     &ks, &decay, &scale, &check, &threads, &name))
        return NULL;
    group g;
    PyObject *res = NULL, *es = NULL;
    if (group_parse(&g, gs, ks, name) < 0 || lb_py_threads(threads, g.total, &nt) < 0)
        goto done;
    es = PySequence_Fast(es_o, "es: expected a sequence of arrays");
    if (!es)
        goto done;
    if (PySequence_Fast_GET_SIZE(es) != g.nseg) {
        PyErr_Format(PyExc_ValueError, "es: expected %zd states (one per gradient), got %zd",
                     g.nseg, PySequence_Fast_GET_SIZE(es));
        goto done;
    }
    for (Py_ssize_t s = 0; s < g.nseg; s++) {
        PyObject *o = PySequence_Fast_GET_ITEM(es, s);
        PyArrayObject *e = (PyArrayObject *)o;
        if (!PyArray_Check(o) || lb_py_dtype_of(e) != g.dt || !PyArray_IS_C_CONTIGUOUS(e) ||
            !PyArray_ISWRITEABLE(e) || !PyArray_ISALIGNED(e) || PyArray_ISBYTESWAPPED(e) ||
            (uint64_t)PyArray_SIZE(e) != g.n[s]) {
            PyErr_Format(PyExc_TypeError,
                         "es[%zd]: expected a writeable C-contiguous %s array of %llu elements "
                         "(as %s[%zd])", s, g.dt == LB_F32 ? "float32" : "float64",
                         (unsigned long long)g.n[s], name, s);
            goto done;
        }
        g.ed[s] = PyArray_DATA(e);
    }
    lb_error err = {0};
    uint64_t seg = UINT64_MAX;
    lb_status st;
    LB_NOGIL(g.total, st = lb_ef_topk_group(g.ed, g.xd, g.n, g.k, (uint64_t)g.nseg, g.dt,
                                            decay, scale, check, nt, g.out, &err, &seg));
    res = st == LB_OK ? group_results(&g)
                      : group_error(&g, st, &err, seg, "error feedback", name);
done:
    Py_XDECREF(es);
    group_free(&g);
    return res;
}

/* Per-segment output arrays: arrays[s] of counts[s] elements of `typenum`
 * (new references in a new list *list), their data in data[s].             */
static int new_outputs(group *g, const uint64_t *counts, int typenum, PyObject **list,
                       void **data)
{
    *list = PyList_New(g->nseg);
    if (!*list)
        return -1;
    for (Py_ssize_t s = 0; s < g->nseg; s++) {
        npy_intp dims[1] = {(npy_intp)counts[s]};
        PyObject *a = lb_py_empty(1, dims, typenum);
        if (!a) {
            Py_CLEAR(*list);
            return -1;
        }
        PyList_SET_ITEM(*list, s, a);
        data[s] = PyArray_DATA((PyArrayObject *)a);
    }
    return 0;
}

/* [(first[s], second[s]) ...] from two lists (consumed). */
static PyObject *zip_lists(PyObject *first, PyObject *second, Py_ssize_t m)
{
    PyObject *out = PyList_New(m);
    for (Py_ssize_t s = 0; out && s < m; s++) {
        PyObject *pair = PyTuple_Pack(2, PyList_GET_ITEM(first, s), PyList_GET_ITEM(second, s));
        if (!pair)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, s, pair);
    }
    Py_DECREF(first);
    Py_DECREF(second);
    return out;
}

/* The exception of a failed quantizer group (LB_ERANGE: a scale overflow). */
static PyObject *coded_error(group *g, lb_status st, lb_error *err, uint64_t seg,
                             const char *what, const char *name)
{
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "%s: %s[%llu] is too large for the float32 scale of block %llu", what,
                     name, (unsigned long long)seg, (unsigned long long)err->index);
        return NULL;
    }
    return group_error(g, st, err, seg, what, name);
}

/* Codes (bits per element, packed) and one float32 per block (none when
 * no_scales) for every segment.                                           */
static int coded_outputs(group *g, int bits, uint64_t block, int no_scales, PyObject **codes,
                         PyObject **scales, void **cd, void **sd)
{
    uint64_t *cnt = PyMem_Calloc((size_t)(g->nseg ? g->nseg : 1), sizeof(uint64_t));
    if (!cnt) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t s = 0; s < g->nseg; s++)
        cnt[s] = lb_packed_bytes(g->n[s], bits);
    int rc = new_outputs(g, cnt, NPY_UINT8, codes, cd);
    for (Py_ssize_t s = 0; s < g->nseg; s++)
        cnt[s] = no_scales ? 0 : block ? g->n[s] / block + (g->n[s] % block != 0) : 1;
    if (rc == 0 && new_outputs(g, cnt, NPY_FLOAT32, scales, sd) < 0) {
        Py_CLEAR(*codes);
        rc = -1;
    }
    PyMem_Free(cnt);
    return rc;
}

/* One sign or quantize group call: the parsed tensors, the thread count,
 * and the (codes, scales) outputs with their data pointers cd / sd.        */
typedef struct {
    group g;
    int nt;
    void **cd, **sd;
    PyObject *codes, *scales;
} coded_call;

/* Parse xs and threads, and allocate every segment's codes (bits per
 * element) and scales (per block; none when no_scales).  -1 with an
 * exception set; coded_finish frees c either way.                          */
static int coded_begin(coded_call *c, PyObject *xs, PyObject *threads, int bits,
                       uint64_t block, int no_scales)
{
    *c = (coded_call){0};
    if (group_parse(&c->g, xs, NULL, "tensors") < 0 ||
        lb_py_threads(threads, c->g.total, &c->nt) < 0)
        return -1;
    c->cd = PyMem_Calloc((size_t)(c->g.nseg ? c->g.nseg : 1), sizeof(void *));
    c->sd = PyMem_Calloc((size_t)(c->g.nseg ? c->g.nseg : 1), sizeof(void *));
    if (!c->cd || !c->sd) {
        PyErr_NoMemory();
        return -1;
    }
    return coded_outputs(&c->g, bits, block, no_scales, &c->codes, &c->scales, c->cd, c->sd);
}

/* The call's result ([(codes, scales), ...] when st is LB_OK and no
 * exception is set, else NULL with the error named after `what`); frees c. */
static PyObject *coded_finish(coded_call *c, int ok, lb_status st, lb_error *err,
                              uint64_t seg, const char *what)
{
    PyObject *res = NULL;
    if (ok && st != LB_OK)
        coded_error(&c->g, st, err, seg, what, "tensors");
    else if (ok)
        res = zip_lists(c->codes, c->scales, c->g.nseg);
    if (!res) {
        Py_CLEAR(c->codes);
        Py_CLEAR(c->scales);
    }
    PyMem_Free(c->cd);
    PyMem_Free(c->sd);
    group_free(&c->g);
    return res;
}

/* sign_group(xs, mode, block, check_finite, threads) -> [(codes, scales), ...] */
static PyObject *py_sign_group(PyObject *self, PyObject *args)
{
    PyObject *xs, *threads;
    int mode, check;
    unsigned long long block;
    if (!PyArg_ParseTuple(args, "OiKpO:sign_group", &xs, &mode, &block, &check, &threads))
        return NULL;
    if (mode != LB_SCALE_NONE && mode != LB_SCALE_L1 && mode != LB_SCALE_RMS) {
        PyErr_Format(PyExc_ValueError, "mode: expected 0, 1 or 2, got %d", mode);
        return NULL;
    }
    coded_call c;
    lb_error err = {0};
    uint64_t seg = UINT64_MAX;
    lb_status st = LB_OK;
    int ok = coded_begin(&c, xs, threads, 1, block, mode == LB_SCALE_NONE) == 0;
    if (ok)
        LB_NOGIL(c.g.total, st = lb_sign_group(c.g.xd, c.g.n, (uint64_t)c.g.nseg, c.g.dt, mode,
                                               block, check, c.nt, (uint8_t *const *)c.cd,
                                               (float *const *)c.sd, &err, &seg));
    return coded_finish(&c, ok, st, &err, seg, "sign_group");
}

/* quantize_group(xs, out_dtypes, bits, block, stochastic, seed, step, check_finite,
 *                threads) -> [(codes, scales), ...]; out_dtypes: bytes, one
 * lb_dtype code per tensor (the dtype its payload decodes to).            */
static PyObject *py_quantize_group(PyObject *self, PyObject *args)
{
    PyObject *xs, *threads;
    const char *out_dt;
    Py_ssize_t n_out_dt;
    int bits, stochastic, check;
    unsigned long long block, seed, step;
    if (!PyArg_ParseTuple(args, "Oy#iKpKKpO:quantize_group", &xs, &out_dt, &n_out_dt, &bits,
                          &block, &stochastic, &seed, &step, &check, &threads))
        return NULL;
    if (bits != 1 && bits != 2 && bits != 3 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "bits: expected one of 1, 2, 3, 4, 8, got %d", bits);
        return NULL;
    }
    coded_call c;
    lb_error err = {0};
    uint64_t seg = UINT64_MAX;
    lb_status st = LB_OK;
    int ok = coded_begin(&c, xs, threads, bits, block, 0) == 0;
    if (ok && n_out_dt != c.g.nseg) {
        PyErr_Format(PyExc_ValueError, "out_dtypes: expected %zd codes, got %zd", c.g.nseg,
                     n_out_dt);
        ok = 0;
    }
    if (ok)
        LB_NOGIL(c.g.total, st = lb_quantize_group(c.g.xd, c.g.n, (uint64_t)c.g.nseg, c.g.dt,
                                                   (const uint8_t *)out_dt, bits, block,
                                                   stochastic, seed, step, check, c.nt,
                                                   (uint8_t *const *)c.cd,
                                                   (float *const *)c.sd, &err, &seg));
    return coded_finish(&c, ok, st, &err, seg, "quantize_group");
}

/* randomk_group(xs, ks, seed, step, rescale, check_finite, threads)
 *   -> [(indices, values), ...] */
static PyObject *py_randomk_group(PyObject *self, PyObject *args)
{
    PyObject *xs, *ks, *threads, *res = NULL;
    unsigned long long seed, step;
    int rescale, check, nt;
    if (!PyArg_ParseTuple(args, "OOKKppO:randomk_group", &xs, &ks, &seed, &step, &rescale,
                          &check, &threads))
        return NULL;
    if (step >= LB_MAX_STEP) {
        PyErr_Format(PyExc_ValueError, "step: expected an int in [0, 2**56), got %llu", step);
        return NULL;
    }
    group g;
    if (group_parse(&g, xs, ks, "tensors") < 0 || lb_py_threads(threads, g.total, &nt) < 0)
        goto done;
    for (Py_ssize_t s = 0; s < g.nseg; s++) {   /* results owned by g.out until returned */
        g.out[s].indices = lb_alloc_n(g.k[s] ? g.k[s] : 1, sizeof(uint64_t), 0);
        g.out[s].values = lb_alloc_n(g.k[s] ? g.k[s] : 1, g.dt == LB_F32 ? 4 : 8, 0);
        g.out[s].count = g.k[s];
        if (!g.out[s].indices || !g.out[s].values) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    uint64_t **id = PyMem_Calloc((size_t)(g.nseg ? g.nseg : 1), sizeof(uint64_t *));
    void **vd = PyMem_Calloc((size_t)(g.nseg ? g.nseg : 1), sizeof(void *));
    if (!id || !vd) {
        PyMem_Free(id);
        PyMem_Free(vd);
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t s = 0; s < g.nseg; s++) {
        id[s] = g.out[s].indices;
        vd[s] = g.out[s].values;
    }
    lb_error err = {0};
    uint64_t seg = UINT64_MAX;
    lb_status st;
    LB_NOGIL(g.total, st = lb_randomk_group(g.xd, g.n, g.k, (uint64_t)g.nseg, g.dt, seed, step,
                                            rescale, check, nt, id, vd, &err, &seg));
    PyMem_Free(id);
    PyMem_Free(vd);
    if (st == LB_OK) {
        res = group_results(&g);
        goto done;
    }
    group_error(&g, st, &err, seg, "randomk_group", "tensors");
fail:
    for (Py_ssize_t s = 0; s < g.nseg; s++)
        lb_sparse_free(g.out + s);
done:
    group_free(&g);
    return res;
}

PyMethodDef lb_group_methods[] = {
    {"sign_group", py_sign_group, METH_VARARGS,
     "sign_group(xs, mode, block, check_finite, threads) -> [(codes, scales), ...]"},
    {"quantize_group", py_quantize_group, METH_VARARGS,
     "quantize_group(xs, bits, block, stochastic, seed, step, check_finite, threads) -> "
     "[(codes, scales), ...]"},
    {"randomk_group", py_randomk_group, METH_VARARGS,
     "randomk_group(xs, ks, seed, step, rescale, check_finite, threads) -> "
     "[(indices, values), ...]"},
    {"topk_group", (PyCFunction)(void (*)(void))py_topk_group, METH_VARARGS | METH_KEYWORDS,
     "Exact top-k of every tensor of a group -> [(indices, values), ...]."},
    {"ef_topk_group", (PyCFunction)(void (*)(void))py_ef_topk_group,
     METH_VARARGS | METH_KEYWORDS,
     "Fused EF + top-k step on every tensor of a group -> [(indices, values), ...]."},
    {NULL, NULL, 0, NULL},
};
