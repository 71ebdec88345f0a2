"""Input generators and assertions shared by the kernel tests."""
import numpy as np

FLOATS = (np.float32, np.float64)
THREADS = (1, 2, 4)
# 0, 1, small primes, non-multiples of the block/chunk sizes, and sizes past
# the GIL/threading grain (65536) and the sampled fast path (2**20).
SIZES = (0, 1, 2, 3, 7, 31, 97, 1000, 4099, 65537, 300007)
LARGE = (1 << 20) + 7

KINDS = ("normal", "ties", "equal", "zeros", "negzero", "sparse", "heavy")


def make_vector(n, dtype=np.float32, kind="normal", seed=0):
    """A float vector of n elements with a given structure:
    normal   standard normal
    ties     values from a tiny set (many exact ties, both signs)
    equal    every element the same
    zeros    all +0.0
    negzero  a mix of +0.0, -0.0 and a few normals
    sparse   mostly zeros, 1% normals
    heavy    Student-t(1): a few huge magnitudes
    """
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "ties":
        x = rng.choice(np.array([-2.0, -1.0, 1.0, 2.0, 0.5]), n)
    elif kind == "equal":
        x = np.full(n, -1.25)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "negzero":
        x = rng.choice(np.array([0.0, -0.0]), n)
        few = rng.random(n) < 0.05
        x[few] = rng.standard_normal(int(few.sum()))
    elif kind == "sparse":
        x = np.zeros(n)
        few = rng.random(n) < 0.01
        x[few] = rng.standard_normal(int(few.sum()))
    elif kind == "heavy":
        x = rng.standard_t(1, n)
    else:
        raise ValueError(kind)
    return x.astype(dtype)


def same_bytes(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if a.tobytes() != b.tobytes():
        bad = np.flatnonzero(a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8))
        raise AssertionError(f"{what}: bytes differ (first differing byte {bad[0]})")


def assert_sparse_matches(p, indices, values, shape=None):
    """A Sparse equals a reference (indices, values) pair byte for byte."""
    assert_same(p.indices, np.asarray(indices).astype(p.indices.dtype), "indices")
    assert_same(p.values, values, "values")
    if shape is not None:
        assert p.shape == tuple(shape)


def unchanged(fn, x, *args, **kwargs):
    """Calls fn(x, ...) and asserts that x was not modified."""
    before = x.copy()
    out = fn(x, *args, **kwargs)
    assert same_bytes(before, x), "the input was modified"
    return out


def noncontiguous(x):
    """A strided view with the same values as x (x must be 1-D)."""
    big = np.empty(2 * x.size, dtype=x.dtype)
    big[::2] = x
    big[1::2] = np.nan
    view = big[::2]
    assert not view.flags.c_contiguous or x.size <= 1
    return view


def child_env(**extra):
    """The environment for a child Python process that must import the same
    lowband as this one (the installed copy in CI, the source tree with its
    in-place build when developing): its folder goes first on PYTHONPATH."""
    import os
    import lowband
    home = os.path.dirname(os.path.dirname(os.path.abspath(lowband.__file__)))
    path = os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)
