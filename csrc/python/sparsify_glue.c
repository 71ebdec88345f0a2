/* sparsify_glue.c - bindings of core/sparsify.c and core/scatter.c. */
#include "glue.h"

/* (indices, values) from a core result; consumes s. */
static PyObject *sparse_result(lb_sparse *s, uint64_t n, lb_dtype dt)
{
    PyObject *idx = lb_py_indices(s->indices, s->count, n);
    s->indices = NULL;
    if (!idx) {
        lb_sparse_free(s);
        return NULL;
    }
    PyObject *vals = lb_py_adopt(s->values, s->count, lb_py_typenum(dt));
    s->values = NULL;
    if (!vals) {
        Py_DECREF(idx);
        return NULL;
    }
    return Py_BuildValue("(NN)", idx, vals);
}

/* topk(x, k, check_finite=True, threads=None) -> (indices, values)
 * (positional arguments: the per-call path of small tensors)            */
static PyObject *py_topk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *x_o, *k_o, *threads = Py_None;
    int check = 1, nt;
    uint64_t k;
    if (lb_fc_args("topk", nargs, 2, 4) < 0 || (nargs > 2 && lb_fc_p(args[2], &check) < 0))
        return NULL;
    x_o = args[0];
    k_o = args[1];
    if (nargs > 3)
        threads = args[3];
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(x);
    lb_dtype dt = lb_py_dtype_of(x);
    if (lb_py_u64(k_o, "k", n + 1, &k) < 0 || lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    lb_sparse out;
    lb_error err = {0};
    lb_status st;
    const void *data = PyArray_DATA(x);
    LB_NOGIL(n, st = lb_topk(data, n, dt, k, check, nt, &out, &err));
    if (st != LB_OK) {
        lb_py_raise(st, &err, "topk", "x", x);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    return sparse_result(&out, n, dt);
}

/* threshold(x, tau, check_finite=True, threads=None) -> (indices, values) */
static PyObject *py_threshold(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "tau", "check_finite", "threads", NULL};
    PyObject *x_o, *threads = Py_None;
    double tau;
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Od|pO:threshold", kwlist, &x_o,
                                     &tau, &check, &threads))
        return NULL;
    if (!(tau >= 0.0)) {
        PyErr_Format(PyExc_ValueError, "tau: expected a number >= 0, got %R",
                     PyTuple_GET_ITEM(args, 1 < PyTuple_GET_SIZE(args) ? 1 : 0));
        return NULL;
    }
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(x);
    lb_dtype dt = lb_py_dtype_of(x);
    if (lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    lb_sparse out;
    lb_error err = {0};
    lb_status st;
    const void *data = PyArray_DATA(x);
    LB_NOGIL(n, st = lb_threshold(data, n, dt, tau, check, nt, &out, &err));
    if (st != LB_OK) {
        lb_py_raise(st, &err, "threshold", "x", x);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    return sparse_result(&out, n, dt);
}

/* topk_chunked(x, chunk, k_per_chunk, check_finite=True, threads=None) */
static PyObject *py_topk_chunked(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "chunk", "k_per_chunk", "check_finite",
                             "threads", NULL};
    PyObject *x_o, *chunk_o, *k_o, *threads = Py_None;
    int check = 1, nt;
    uint64_t chunk, kpc;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pO:topk_chunked", kwlist,
                                     &x_o, &chunk_o, &k_o, &check, &threads))
        return NULL;
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(x);
    lb_dtype dt = lb_py_dtype_of(x);
    if (lb_py_u64(chunk_o, "chunk", LB_MAX_CHUNK + 1, &chunk) < 0 ||
        lb_py_u64(k_o, "k_per_chunk", chunk + 1, &kpc) < 0 ||
        lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    if (chunk == 0) {
        Py_DECREF(x);
        PyErr_SetString(PyExc_ValueError, "chunk: expected an int >= 1, got 0");
        return NULL;
    }
    lb_sparse out;
    lb_error err = {0};
    lb_status st;
    const void *data = PyArray_DATA(x);
    LB_NOGIL(n, st = lb_topk_chunked(data, n, dt, chunk, kpc, check, nt, &out, &err));
    if (st != LB_OK) {
        lb_py_raise(st, &err, "topk_chunked", "x", x);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    return sparse_result(&out, n, dt);
}

/* topk_tiled(x, rows, cols, tile_rows, tile_cols, k, check_finite, threads) */
static PyObject *py_topk_tiled(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "rows", "cols", "tile_rows", "tile_cols",
                             "k_per_tile", "check_finite", "threads", NULL};
    PyObject *x_o, *threads = Py_None;
    unsigned long long rows, cols, th, tw, kpt;
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OKKKKK|pO:topk_tiled", kwlist,
                                     &x_o, &rows, &cols, &th, &tw, &kpt, &check,
                                     &threads))
        return NULL;
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(x);
    lb_dtype dt = lb_py_dtype_of(x);
    if ((cols && rows > n / cols) || rows * cols != n || th == 0 || tw == 0 ||
        th > LB_MAX_TILE || tw > LB_MAX_TILE || kpt > th * tw) {
        Py_DECREF(x);
        PyErr_SetString(PyExc_ValueError, "topk_tiled: inconsistent shape or tile");
        return NULL;
    }
    if (lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    lb_sparse out;
    lb_error err = {0};
    lb_status st;
    const void *data = PyArray_DATA(x);
    LB_NOGIL(n, st = lb_topk_tiled(data, rows, cols, dt, th, tw, kpt, check, nt,
                                   &out, &err));
    if (st != LB_OK) {
        lb_py_raise(st, &err, "topk_chunked", "x", x);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    return sparse_result(&out, n, dt);
}

/* topk_sampled(x, k, sample_ratio, seed, step, check_finite, threads)
 *   -> (indices, values, info dict) */
static PyObject *py_topk_sampled(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "k", "sample_ratio", "seed", "step",
                             "check_finite", "threads", NULL};
    PyObject *x_o, *k_o, *seed_o, *step_o, *threads = Py_None;
    double sample_ratio;
    int check = 1, nt;
    uint64_t k, seed, step;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOdOO|pO:topk_sampled", kwlist,
                                     &x_o, &k_o, &sample_ratio, &seed_o, &step_o,
                                     &check, &threads))
        return NULL;
    if (!(sample_ratio > 0.0 && sample_ratio <= 1.0)) {
        PyErr_Format(PyExc_ValueError,
                     "sample_ratio: expected a number in (0, 1], got %g", sample_ratio);
        return NULL;
    }
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(x);
    lb_dtype dt = lb_py_dtype_of(x);
    if (lb_py_u64(k_o, "k", n + 1, &k) < 0 || lb_py_u64(seed_o, "seed", 0, &seed) < 0 ||
        lb_py_u64(step_o, "step", LB_MAX_STEP, &step) < 0 ||
        lb_py_threads(threads, n, &nt) < 0) {
        Py_DECREF(x);
        return NULL;
    }
    lb_sparse out;
    lb_sampled_info info;
    lb_error err = {0};
    lb_status st;
    const void *data = PyArray_DATA(x);
    LB_NOGIL(n, st = lb_topk_sampled(data, n, dt, k, sample_ratio, seed, step,
                                     check, nt, &out, &info, &err));
    if (st != LB_OK) {
        lb_py_raise(st, &err, "topk_sampled", "x", x);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    PyObject *pair = sparse_result(&out, n, dt);
    if (!pair)
        return NULL;
    PyObject *d = Py_BuildValue("{s:K,s:K,s:O,s:d}", "num_samples",
                                (unsigned long long)info.num_samples, "iterations",
                                (unsigned long long)info.iterations, "exact_fallback",
                                info.exact_fallback ? Py_True : Py_False, "threshold",
                                info.threshold);
    if (!d) {
        Py_DECREF(pair);
        return NULL;
    }
    PyObject *res = Py_BuildValue("(OON)", PyTuple_GET_ITEM(pair, 0),
                                  PyTuple_GET_ITEM(pair, 1), d);
    Py_DECREF(pair);
    return res;
}

/* randomk_indices(n, k, seed, step, threads=None) -> ascending indices
 * (uint32 when n <= 2^32, else uint64); threads None: one thread */
static PyObject *py_randomk_indices(PyObject *self, PyObject *args)
{
    PyObject *n_o, *k_o, *seed_o, *step_o, *threads = Py_None;
    uint64_t n, k, seed, step;
    int nt = 1;
    if (!PyArg_ParseTuple(args, "OOOO|O:randomk_indices", &n_o, &k_o, &seed_o, &step_o,
                          &threads))
        return NULL;
    if (lb_py_u64(n_o, "n", (uint64_t)1 << 62, &n) < 0 ||
        lb_py_u64(k_o, "k", n + 1, &k) < 0 || lb_py_u64(seed_o, "seed", 0, &seed) < 0 ||
        lb_py_u64(step_o, "step", LB_MAX_STEP, &step) < 0 ||
        (threads != Py_None && lb_py_threads(threads, n, &nt) < 0))
        return NULL;
    lb_status st;
    PyObject *res = NULL;
    uint64_t *idx = NULL;
    if (n <= 0xFFFFFFFFull) {   /* straight into a (pooled) uint32 array */
        npy_intp dims[1] = {(npy_intp)k};
        res = lb_py_empty(1, dims, NPY_UINT32);
        if (!res)
            return NULL;
        uint32_t *out = PyArray_DATA((PyArrayObject *)res);
        LB_NOGIL(k, st = lb_randomk_indices32(n, k, seed, step, nt, out));
    } else {
        idx = lb_alloc_n(k, sizeof(uint64_t), 0);
        if (!idx)
            return PyErr_Format(PyExc_MemoryError,
                                "randomk: out of memory allocating %llu indices (k)",
                                (unsigned long long)k);
        LB_NOGIL(k, st = lb_randomk_indices(n, k, seed, step, idx));
    }
    if (st != LB_OK) {
        free(idx);
        Py_XDECREF(res);
        if (st == LB_ENOMEM)
            return PyErr_Format(PyExc_MemoryError,
                                "randomk: out of memory allocating the index set of "
                                "%llu draws from %llu elements", (unsigned long long)
                                (k > n / 2 ? n - k : k), (unsigned long long)n);
        return lb_py_raise(st, NULL, "randomk", "", NULL);
    }
    return res ? res : lb_py_indices(idx, k, n);
}

/* gather(x, indices, scale=1.0, check_finite=True, threads=None) -> values */
static PyObject *py_gather(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "indices", "scale", "check_finite", "threads", NULL};
    PyObject *x_o, *i_o, *threads = Py_None;
    double scale = 1.0;
    int check = 1, nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|dpO:gather", kwlist, &x_o, &i_o,
                                     &scale, &check, &threads))
        return NULL;
    PyArrayObject *x = lb_py_vector(x_o, "x", LB_ALLOW_F32_F64);
    if (!x)
        return NULL;
    /* uint32 indices (randomk's for n < 2^32) are used as they are */
    int narrow = PyArray_Check(i_o) && PyArray_TYPE((PyArrayObject *)i_o) == NPY_UINT32;
    PyArrayObject *ix = (PyArrayObject *)PyArray_FROMANY(
        i_o, narrow ? NPY_UINT32 : NPY_UINT64, 1, 1,
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (!ix) {
        Py_DECREF(x);
        return NULL;
    }
    uint64_t n = (uint64_t)PyArray_SIZE(x), k = (uint64_t)PyArray_SIZE(ix);
    lb_dtype dt = lb_py_dtype_of(x);
    if (lb_py_threads(threads, k, &nt) < 0) {
        Py_DECREF(x);
        Py_DECREF(ix);
        return NULL;
    }
    npy_intp dims[1] = {(npy_intp)k};
    PyObject *vals = lb_py_empty(1, dims, lb_py_typenum(dt));
    if (!vals) {
        Py_DECREF(x);
        Py_DECREF(ix);
        return NULL;
    }
    lb_error err = {0};
    lb_status st;
    const void *xd = PyArray_DATA(x);
    const void *id = PyArray_DATA(ix);
    void *vd = PyArray_DATA((PyArrayObject *)vals);
    LB_NOGIL(k, st = narrow ? lb_gather_u32(xd, n, dt, id, k, scale, check, nt, vd, &err)
                            : lb_gather(xd, n, dt, id, k, scale, check, nt, vd, &err));
    Py_DECREF(ix);
    if (st != LB_OK) {
        Py_DECREF(vals);
        lb_py_raise(st, &err, "randomk", "x", x);
        Py_DECREF(x);
        return NULL;
    }
    Py_DECREF(x);
    return vals;
}

static const char *AGG_OPS[] = {"sum", "mean", "contributor_mean"};

/* aggregate(payloads: sequence of (indices, values), n, op, out, threads)
 * Writes into `out` (1-D C-contiguous array of n elements, float32/64) and
 * returns it.  The Python layer checks types and dtypes first; the core
 * re-checks every index.                                                   */
static PyObject *py_aggregate(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"payloads", "op", "out", "threads", NULL};
    PyObject *seq_o, *out_o, *threads = Py_None;
    const char *op_s;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OsO!|O:aggregate", kwlist, &seq_o,
                                     &op_s, &PyArray_Type, &out_o, &threads))
        return NULL;
    int op = -1;
    for (int i = 0; i < 3; i++)
        if (strcmp(op_s, AGG_OPS[i]) == 0)
            op = i;
    if (op < 0) {
        PyErr_Format(PyExc_ValueError,
                     "op: expected 'sum', 'mean' or 'contributor_mean', got '%s'", op_s);
        return NULL;
    }
    PyArrayObject *out = (PyArrayObject *)out_o;
    lb_dtype dt = lb_py_dtype_of(out);
    if ((dt != LB_F32 && dt != LB_F64) || !PyArray_IS_C_CONTIGUOUS(out) ||
        !PyArray_ISWRITEABLE(out) || !PyArray_ISALIGNED(out) ||
        PyArray_ISBYTESWAPPED(out)) {
        PyErr_SetString(PyExc_TypeError,
                        "out: expected a writeable C-contiguous float32 or float64 array");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(seq_o, "payloads: expected a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t np = PySequence_Fast_GET_SIZE(seq);
    lb_sparse_view *views = lb_alloc_n((uint64_t)np, sizeof(lb_sparse_view), 1);
    PyObject **keep = lb_alloc_n((uint64_t)np, 2 * sizeof(PyObject *), 1);
    PyObject *result = NULL;
    uint64_t n = (uint64_t)PyArray_SIZE(out), total = 0;
    int nt;
    if (!views || !keep) {
        PyErr_Format(PyExc_MemoryError, "aggregate: out of memory allocating %zd payload views",
                     np);
        goto done;
    }
    for (Py_ssize_t w = 0; w < np; w++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, w);
        PyObject *io, *vo;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_Format(PyExc_TypeError, "payloads[%zd]: expected (indices, values)", w);
            goto done;
        }
        io = PyTuple_GET_ITEM(item, 0);
        vo = PyTuple_GET_ITEM(item, 1);
        if (!PyArray_Check(io) || !PyArray_Check(vo)) {
            PyErr_Format(PyExc_TypeError, "payloads[%zd]: expected ndarrays", w);
            goto done;
        }
        PyArrayObject *ia = (PyArrayObject *)io, *va = (PyArrayObject *)vo;
        int it = PyArray_TYPE(ia);
        if ((it != NPY_UINT32 && it != NPY_UINT64) || PyArray_NDIM(ia) != 1 ||
            PyArray_NDIM(va) != 1 || PyArray_SIZE(ia) != PyArray_SIZE(va) ||
            lb_py_dtype_of(va) != dt || !PyArray_IS_C_CONTIGUOUS(ia) ||
            !PyArray_IS_C_CONTIGUOUS(va) || !PyArray_ISALIGNED(ia) ||
            !PyArray_ISALIGNED(va) || PyArray_ISBYTESWAPPED(ia) ||
            PyArray_ISBYTESWAPPED(va)) {
            PyErr_Format(PyExc_TypeError,
                         "payloads[%zd]: expected contiguous 1-D uint32/uint64 indices "
                         "and values of the output dtype, of equal length", w);
            goto done;
        }
        keep[2 * w] = io;
        keep[2 * w + 1] = vo;
        views[w].indices = PyArray_DATA(ia);
        views[w].values = PyArray_DATA(va);
        views[w].count = (uint64_t)PyArray_SIZE(ia);
        views[w].index_width = it == NPY_UINT32 ? 4 : 8;
        total += views[w].count;
    }
    if (lb_py_threads(threads, n > total ? n : total, &nt) < 0)
        goto done;
    lb_error err = {0};
    lb_status st;
    void *od = PyArray_DATA(out);
    LB_NOGIL(n + total, st = lb_aggregate(views, (uint64_t)np, n, dt, (lb_agg_op)op,
                                          od, nt, &err));
    if (st == LB_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "payloads[%llu]: an index is >= the dense size %llu",
                     (unsigned long long)err.index, (unsigned long long)n);
        goto done;
    }
    if (st == LB_EINVAL && err.index < (uint64_t)np) {
        PyErr_Format(PyExc_ValueError,
                     "payloads[%llu]: indices are not strictly ascending",
                     (unsigned long long)err.index);
        goto done;
    }
    if (st != LB_OK) {
        lb_py_raise(st, &err, "aggregate", "payloads", NULL);
        goto done;
    }
    Py_INCREF(out_o);
    result = out_o;
done:
    free(views);
    free(keep);
    Py_DECREF(seq);
    return result;
}

PyMethodDef lb_sparsify_methods[] = {
    {"topk", (PyCFunction)(void (*)(void))py_topk, METH_FASTCALL,
     "Exact top-k by magnitude -> (indices, values)."},
    {"threshold", (PyCFunction)(void (*)(void))py_threshold, METH_VARARGS | METH_KEYWORDS,
     "All |x| >= tau -> (indices, values)."},
    {"topk_chunked", (PyCFunction)(void (*)(void))py_topk_chunked,
     METH_VARARGS | METH_KEYWORDS, "Top-k inside each contiguous chunk."},
    {"topk_tiled", (PyCFunction)(void (*)(void))py_topk_tiled,
     METH_VARARGS | METH_KEYWORDS, "Top-k inside each 2-D tile."},
    {"topk_sampled", (PyCFunction)(void (*)(void))py_topk_sampled,
     METH_VARARGS | METH_KEYWORDS, "DGC sampled top-k -> (indices, values, info)."},
    {"randomk_indices", py_randomk_indices, METH_VARARGS,
     "randomk_indices(n, k, seed, step, threads=None: 1) -> k sorted distinct indices."},
    {"gather", (PyCFunction)(void (*)(void))py_gather, METH_VARARGS | METH_KEYWORDS,
     "gather(x, indices, scale=1.0) -> x[indices] * scale."},
    {"aggregate", (PyCFunction)(void (*)(void))py_aggregate, METH_VARARGS | METH_KEYWORDS,
     "aggregate(payloads, op, out) -> out."},
    {NULL, NULL, 0, NULL},
};
