/* powersgd_glue.c - bindings of core/powersgd.c (PowerSGD). */
#include "glue.h"

/* powersgd_orthogonalize(a, epsilon=0.0, threads=None) -> None
 * a: a writeable, C-contiguous, aligned, native float32/float64 array with
 * at least two dimensions, orthogonalised in place over its last axis (the
 * columns of each trailing n x r matrix).                                  */
static PyObject *py_powersgd_orthogonalize(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"a", "epsilon", "threads", NULL};
    PyObject *a_o, *threads = Py_None;
    double epsilon = 0.0;
    int nt;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|dO:powersgd_orthogonalize", kwlist, &a_o,
                                     &epsilon, &threads))
        return NULL;
    if (!PyArray_Check(a_o)) {
        PyErr_Format(PyExc_TypeError, "a: expected an ndarray, got %.100s", Py_TYPE(a_o)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)a_o;
    lb_dtype dt = lb_py_dtype_of(a);
    if (dt != LB_F32 && dt != LB_F64) {
        PyErr_SetString(PyExc_TypeError, "a: expected a float32 or float64 array");
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a) ||
        PyArray_ISBYTESWAPPED(a)) {
        PyErr_SetString(PyExc_ValueError,
                        "a: expected a writeable, C-contiguous, aligned native-endian array "
                        "(it is orthogonalised in place)");
        return NULL;
    }
    int nd = PyArray_NDIM(a);
    if (nd < 2) {
        PyErr_Format(PyExc_ValueError, "a: expected at least 2 dimensions (n, r), got %d", nd);
        return NULL;
    }
    if (!(epsilon >= 0.0) || epsilon > 1e300) {
        PyErr_Format(PyExc_ValueError, "epsilon: expected a finite number >= 0, got %g", epsilon);
        return NULL;
    }
    npy_intp *dims = PyArray_DIMS(a);
    uint64_t r = (uint64_t)dims[nd - 1], n = (uint64_t)dims[nd - 2], batch = 1;
    for (int d = 0; d < nd - 2; d++)
        batch *= (uint64_t)dims[d];
    uint64_t work = (uint64_t)PyArray_SIZE(a);
    if (lb_py_threads(threads, work, &nt) < 0)
        return NULL;
    lb_error err = {0};
    lb_status st;
    void *data = PyArray_DATA(a);
    LB_NOGIL(work, st = lb_powersgd_orthogonalize(data, batch, n, r, dt, epsilon, nt, &err));
    if (st != LB_OK) {
        if (st == LB_EOVERFLOW) {
            PyErr_SetString(PyExc_ValueError,
                            "a: a column norm overflows (values too large to orthogonalise)");
            return NULL;
        }
        return lb_py_raise(st, &err, "powersgd_orthogonalize", "a", a);
    }
    Py_RETURN_NONE;
}

PyMethodDef lb_powersgd_methods[] = {
    {"powersgd_orthogonalize", (PyCFunction)(void (*)(void))py_powersgd_orthogonalize,
     METH_VARARGS | METH_KEYWORDS,
     "powersgd_orthogonalize(a, epsilon=0.0, threads=None): in-place modified "
     "Gram-Schmidt over the columns of a's trailing n x r matrices."},
    {NULL, NULL, 0, NULL},
};
