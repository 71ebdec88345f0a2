/*
 * glue.h - shared helpers of the CPython/NumPy glue (the only place that
 * includes Python.h).  Every binding follows one pattern:
 *
 *   1. parse and check arguments (TypeError / ValueError naming them),
 *      converting arrays to C-contiguous, aligned, native-endian copies when
 *      needed (lb_py_vector);
 *   2. resolve the thread count (lb_py_threads: threads= argument, else
 *      lowband.set_num_threads(), else lb_glue_auto_threads(); 1 in a
 *      forked child and below LB_GRAIN elements);
 *   3. run the core function with the GIL released when the input is large
 *      (LB_NOGIL), never touching Python objects inside;
 *   4. turn the lb_status into an exception (lb_py_raise) or wrap the
 *      results into arrays that own their memory (lb_py_adopt).
 */
#ifndef LB_GLUE_H
#define LB_GLUE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef LB_GLUE_MAIN
#define NO_IMPORT_ARRAY
#endif
#define PY_ARRAY_UNIQUE_SYMBOL lowband_ARRAY_API
#include <numpy/arrayobject.h>

#include "lowband.h"

/* Runs `stmt` without the GIL when `work` (elements) reaches LB_GRAIN. */
#define LB_NOGIL(work, stmt)                                                   \
    do {                                                                       \
        if ((uint64_t)(work) >= LB_GRAIN) {                                    \
            Py_BEGIN_ALLOW_THREADS stmt;                                       \
            Py_END_ALLOW_THREADS                                               \
        } else {                                                               \
            stmt;                                                              \
        }                                                                      \
    } while (0)

/* Module-wide settings (process-wide by nature). */
extern int lb_glue_default_threads;   /* 0: unset                          */
extern int lb_glue_forked_child;      /* set in a child after os.fork()    */
extern PyObject *lb_glue_FormatError; /* lowband.FormatError (a ValueError) */

/* dtype of an ndarray as lb_dtype, or 0. */
lb_dtype lb_py_dtype_of(PyArrayObject *a);
int lb_py_typenum(lb_dtype dt);

/* New reference to a C-contiguous, aligned, native-endian ndarray with the
 * same values as `obj` (a copy only when needed); its dtype must be one of
 * `allowed` (bit set of 1 << lb_dtype).  TypeError naming `name` otherwise. */
PyArrayObject *lb_py_vector(PyObject *obj, const char *name, unsigned allowed);

#define LB_ALLOW_F32_F64 ((1u << LB_F32) | (1u << LB_F64))

/* threads= argument -> team size for `work` elements; -1 with an exception. */
int lb_py_threads(PyObject *threads, uint64_t work, int *nthreads);

/* The default team size now: lowband.set_num_threads(n) if set, else the
 * smallest of omp_get_max_threads() (OMP_NUM_THREADS), the CPUs in the
 * process's affinity mask and torch.get_num_threads() when torch is loaded;
 * 1 in a forked child.                                                     */
int lb_glue_auto_threads(void);

/* Python int in [0, limit) -> *out; -1 with TypeError/ValueError naming
 * `name` otherwise.  limit 0 means 2^64.                                   */
int lb_py_u64(PyObject *obj, const char *name, uint64_t limit, uint64_t *out);

/* Raises the exception for `st` (never LB_OK) and returns NULL.  `what`
 * names the operation; `arr`, when given, is the input the error index
 * points into (its value is quoted for LB_ENONFINITE).                     */
PyObject *lb_py_raise(lb_status st, const lb_error *err, const char *what,
                      const char *argname, PyArrayObject *arr);

/* A new uninitialised C-contiguous ndarray for a kernel's output.  Large
 * ones (>= LB_POOL_MIN bytes) take their memory from the scratch cache
 * (scratch.h) and give it back when the array is freed, so the next call's
 * output pages are already mapped instead of being faulted and zeroed by
 * the kernel (a memory pool, like torch's caching allocator; bounded, and
 * emptied by lowband.release_memory()).                                    */
#define LB_POOL_MIN ((size_t)1 << 20)
PyObject *lb_py_empty(int nd, const npy_intp *dims, int typenum);

/* 1-D ndarray of `count` elements that takes ownership of malloc'd `buf`
 * (freed with the array); frees buf and returns NULL on failure.          */
PyObject *lb_py_adopt(void *buf, uint64_t count, int typenum);

/* The index array of a sparse result: uint32 when n < 2^32 (converted from
 * the core's uint64 and `idx` freed), else uint64 adopting `idx`.          */
PyObject *lb_py_indices(uint64_t *idx, uint64_t count, uint64_t n);

/* The float input of an encoder: lb_py_vector(obj, name, float32/float64),
 * its element count in *n and the team size for it (threads=) in
 * *nthreads; NULL with an exception (no reference held).                 */
PyArrayObject *lb_py_float_input(PyObject *obj, const char *name, PyObject *threads, uint64_t *n,
                                 int *nthreads);

/* A decoder's coded stream: a C-contiguous uint8 ndarray (TypeError naming
 * `codes` otherwise); its data and length in *data and *len.  0 or -1.    */
int lb_py_stream_arg(PyObject *obj, const uint8_t **data, uint64_t *len);

/* A decoder's value table and output, when out_obj is not None: `table`
 * must be `count` contiguous float64 values (ValueError naming `tname`),
 * out_obj a writeable contiguous float32/float64 ndarray of n elements
 * (TypeError naming `out`).  Sets *table_data, *out and *dt (left alone
 * when out_obj is None).  0 or -1 with an exception.                      */
int lb_py_decode_target(PyObject *table, const char *tname, uint64_t count, PyObject *out_obj,
                        uint64_t n, const double **table_data, void **out, lb_dtype *dt);

/* Raises for a failed stream decode (`st` != LB_OK) of n elements and
 * returns NULL: LB_EFORMAT as a ValueError naming `codes` and the `kind`
 * of stream (the element where it broke, or a stream that does not end
 * after the last element), anything else through lb_py_raise(`what`).    */
PyObject *lb_py_decode_error(lb_status st, const lb_error *err, uint64_t n, const char *kind,
                             const char *what);

/* METH_FASTCALL argument parsing for the per-call hot paths (a small
 * tensor's call costs what its argument parsing costs): lb_fc_args checks
 * the count (TypeError naming `fname` otherwise); the converters follow
 * PyArg_ParseTuple's "K" (an int, masked to 64 bits), "i" (an int in C
 * int range) and "p" (truth value).  0 or -1 with an exception.          */
int lb_fc_args(const char *fname, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi);
int lb_fc_K(PyObject *o, unsigned long long *v);
int lb_fc_i(PyObject *o, int *v);
int lb_fc_p(PyObject *o, int *v);

/* Half the largest finite value of the dtype of wire code `code` (1
 * float32, 2 float64, 3 float16, 4 bfloat16; 0 for another): a largest
 * code times largest scale below it cannot round to Inf on the way to
 * that dtype (the fast bound of _schemes._Table.check_range).           */
double lb_py_safe_bound(unsigned code);

/* Method tables of the binding files, concatenated by module.c. */
extern PyMethodDef lb_core_methods[];
extern PyMethodDef lb_sparsify_methods[];
extern PyMethodDef lb_wire_methods[];
extern PyMethodDef lb_quant_methods[];
extern PyMethodDef lb_feedback_methods[];
extern PyMethodDef lb_moe_methods[];
extern PyMethodDef lb_sign_methods[];
extern PyMethodDef lb_dither_methods[];
extern PyMethodDef lb_fedzip_methods[];
extern PyMethodDef lb_group_methods[];

#endif /* LB_GLUE_H */
