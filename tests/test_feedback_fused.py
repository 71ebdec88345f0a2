"""The fused C error-feedback passes give exactly the bytes of the generic
path (compensate with NumPy, compress, subtract the decoded payload)."""
import numpy as np
import pytest

import lowband
from lowband import compressors as C
from lowband import feedback as F
from helpers import FLOATS, LARGE, THREADS, assert_same, make_vector


class GenericTopK(C.TopK):
    """Same compressor, but not recognised by the fused dispatch."""


class GenericChunked(C.ChunkedTopK):
    pass


class GenericRandomK(C.RandomK):
    pass


PAIRS = [
    (lambda: C.TopK(ratio=0.01), lambda: GenericTopK(ratio=0.01)),
    (lambda: C.TopK(ratio=0.001), lambda: GenericTopK(ratio=0.001)),
    (lambda: C.ChunkedTopK(4096, 128), lambda: GenericChunked(4096, 128)),
    (lambda: C.RandomK(ratio=0.01, seed=3), lambda: GenericRandomK(ratio=0.01, seed=3)),
    (lambda: C.RandomK(ratio=0.01, seed=3, rescale=True), lambda: GenericRandomK(ratio=0.01, seed=3, rescale=True)),
]


def run_pair(make_fused, make_generic, make_fb, n, dtype, steps=4, kind="heavy"):
    a, b = make_fb(make_fused(), n, dtype), make_fb(make_generic(), n, dtype)
    for t in range(steps):
        g = make_vector(n, dtype, kind, seed=t)
        pa, pb = a.step(g), b.step(g)
        assert_same(pa.indices, pb.indices, "indices")
        assert_same(pa.values, pb.values, "values")
        assert_same(a.error, b.error, "error")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_fused_equals_generic_large(pair, dtype):
    # LARGE takes top-k's sampled one-pass path
    run_pair(*PAIRS[pair], lambda c, n, dt: F.ErrorFeedback(c, np.zeros(n, dt)), LARGE, dtype)


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_fused_equals_generic_decayed_small(pair):
    run_pair(*PAIRS[pair], lambda c, n, dt: F.DecayedFeedback(c, np.zeros(n, dt), beta=0.95), 70001,
             np.float32, steps=5)


@pytest.mark.parametrize("kind", ["ties", "zeros", "sparse", "equal"])
def test_fused_topk_fallback_paths(kind):
    run_pair(*PAIRS[0], lambda c, n, dt: F.DecayedFeedback(c, np.zeros(n, dt), beta=0.5), LARGE,
             np.float32, steps=2, kind=kind)


@pytest.mark.parametrize("t", THREADS)
def test_fused_thread_independent(t):
    ref = F.ErrorFeedback("topk:0.01", np.zeros(LARGE, np.float32), threads=1)
    fb = F.ErrorFeedback("topk:0.01", np.zeros(LARGE, np.float32), threads=t)
    for s in range(3):
        g = make_vector(LARGE, np.float32, seed=s)
        assert fb.step(g) == ref.step(g)
        assert_same(fb.error, ref.error)


def test_fused_every_isa(isa):
    run_pair(*PAIRS[0], lambda c, n, dt: F.ErrorFeedback(c, np.zeros(n, dt)), LARGE, np.float32, steps=2)
    run_pair(*PAIRS[2], lambda c, n, dt: F.ErrorFeedback(c, np.zeros(n, dt)), 100003, np.float64, steps=2)


@pytest.mark.parametrize("spec", ["topk:0.01", "chunked:4096:128", "randomk:0.01", "threshold:1.0"])
def test_nonfinite_grad_leaves_state_unchanged(spec):
    n = 200003
    fb = F.ErrorFeedback(spec, np.zeros(n, np.float32))
    fb.step(make_vector(n, np.float32))
    before = fb.error.copy()
    g = make_vector(n, np.float32, seed=1)
    g[12345] = np.nan
    with pytest.raises(ValueError, match="flat index 12345"):
        fb.step(g)
    assert_same(fb.error, before)
    assert fb.t == 1


def test_overflow_is_reported():
    n = 100
    fb = F.ErrorFeedback("topk:5", np.zeros(n, np.float32))
    big = np.full(n, 3e38, np.float32)
    fb.step(big)   # the residual keeps 95 entries of 3e38
    with pytest.raises(ValueError, match="overflowed"):
        fb.step(big)


def test_core_rejects_bad_state():
    with pytest.raises(TypeError, match="e: expected a writeable"):
        lowband._core.ef_topk(np.zeros(10, np.float32)[::2], np.zeros(5, np.float32), 1)
    with pytest.raises(TypeError, match="g: expected a float32"):
        lowband._core.ef_topk(np.zeros(10, np.float32), np.zeros(10), 1)
    with pytest.raises(ValueError, match="g: expected 10 elements"):
        lowband._core.ef_topk(np.zeros(10, np.float32), np.zeros(9, np.float32), 1)
    with pytest.raises(ValueError, match="k"):
        lowband._core.ef_topk(np.zeros(10, np.float32), np.zeros(10, np.float32), 11)


class GenericSign(C.Sign):
    pass


class GenericBlockwise(C.Blockwise):
    pass


class GenericLut(C.Lut2Bit):
    pass


class GenericQSGD(C.QSGD):
    pass


class GenericMini(C.MiniFloat):
    pass


QUANT_PAIRS = [
    (lambda: C.Sign("l1"), lambda: GenericSign("l1")),
    (lambda: C.Sign("rms", block=4096), lambda: GenericSign("rms", block=4096)),
    (lambda: C.Blockwise(4), lambda: GenericBlockwise(4)),
    (lambda: C.Blockwise(8, rounding="stochastic", seed=2), lambda: GenericBlockwise(8, rounding="stochastic", seed=2)),
    (lambda: C.Lut2Bit(), lambda: GenericLut()),
    (lambda: C.QSGD(16, seed=1), lambda: GenericQSGD(16, seed=1)),
    (lambda: C.MiniFloat(3, 0), lambda: GenericMini(3, 0)),
]


def run_quant_pair(make_fused, make_generic, make_fb, n, dtype, steps=3):
    a, b = make_fb(make_fused(), n, dtype), make_fb(make_generic(), n, dtype)
    for t in range(steps):
        g = make_vector(n, dtype, "heavy", seed=t)
        assert a.step(g) == b.step(g)
        assert_same(a.error, b.error, "error")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("pair", range(len(QUANT_PAIRS)))
def test_fused_quantizer_feedback_equals_generic(pair, dtype):
    run_quant_pair(*QUANT_PAIRS[pair], lambda c, n, dt: F.ErrorFeedback(c, np.zeros(n, dt)), 300007, dtype)
    run_quant_pair(*QUANT_PAIRS[pair], lambda c, n, dt: F.DecayedFeedback(c, np.zeros(n, dt), beta=0.9),
                   1001, dtype)


def test_fused_sign_every_isa_and_thread_count(isa):
    for t in THREADS:
        run_quant_pair(*QUANT_PAIRS[0], lambda c, n, dt: F.ErrorFeedback(c, np.zeros(n, dt), threads=t),
                       300007, np.float32, steps=2)


@pytest.mark.parametrize("scale,block,n", [("l1", 8, 1003), ("rms", 64, 70001), ("l1", 3, 1000),
                                           ("l1", 131072, 140001), ("rms", None, 131073)])
def test_two_pass_sign_blocks_every_isa(isa, scale, block, n):
    """The two-pass kernel (whole-byte blocks, several pieces per block) and
    its fallback (block 3) against the generic path, both dtypes and with
    decay; the learning-rate rescaling goes through the transaction."""
    for dt in FLOATS:
        for t in THREADS:
            run_quant_pair(lambda: C.Sign(scale, block=block), lambda: GenericSign(scale, block=block),
                           lambda c, n, d: F.DecayedFeedback(c, np.zeros(n, d), beta=0.5, threads=t),
                           n, dt, steps=2)
    a = F.ErrorFeedback(C.Sign(scale, block=block), np.zeros(n, np.float32))
    b = F.ErrorFeedback(GenericSign(scale, block=block), np.zeros(n, np.float32))
    for t, lr in enumerate([0.1, 0.1, 0.05, 0.05]):
        g = make_vector(n, np.float32, "heavy", seed=t)
        assert a.step(g, lr=lr) == b.step(g, lr=lr)
        assert_same(a.error, b.error, "error")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")   # the generic path overflows on purpose
@pytest.mark.parametrize("dtype", FLOATS)
def test_two_pass_sign_failure_leaves_state(isa, dtype):
    """A non-finite gradient, an overflowing p or (float64) an overflowing
    block sum raise and leave the state byte for byte; the next step then
    matches the generic path."""
    n = 4099
    big = np.finfo(dtype).max
    a = F.ErrorFeedback(C.Sign("l1", block=8), np.zeros(n, dtype))
    b = F.ErrorFeedback(GenericSign("l1", block=8), np.zeros(n, dtype))
    g = make_vector(n, dtype, "heavy", seed=1)
    nan = g.copy()
    nan[77] = np.nan
    cases = [(None, nan), (np.full(n, big * 0.75, dtype), np.full(n, big * 0.75, dtype))]
    if dtype == np.float64:   # every p finite, the block sum is not
        cases.append((np.full(n, big / 2, dtype), g))
    for state, gb in cases:
        for fb in (a, b):
            fb.step(g)
            if state is not None:
                fb.load_state_dict({**fb.state_dict(), "arrays": {"error": state.copy()}})
            before, t = fb.error.copy(), fb.t
            with pytest.raises(ValueError):
                fb.step(gb)
            assert fb.error.tobytes() == before.tobytes() and fb.t == t
        assert_same(a.error, b.error, "error")
        a.reset(), b.reset()
    g = make_vector(n, dtype, "heavy", seed=2)
    assert a.step(g) == b.step(g)
    assert_same(a.error, b.error, "error")


def test_residual_rejects_half_state():
    from lowband import _schemes
    x = make_vector(100)
    with pytest.raises(TypeError, match="subtracting"):
        _schemes.SCHEMES["blockwise"].residual(lowband.quantize(x, 4), np.zeros(100, np.float16), None)
    with pytest.raises(TypeError, match="e: expected a writeable"):
        _schemes.SCHEMES["sign"].residual(lowband.sign(x), np.zeros(100, np.float16), None)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale,block", [("l1", None), ("rms", 7), ("none", None), ("l1", 100000)])
def test_sign_residual_equals_table_subtract(scale, block, dtype):
    from lowband import _core, _schemes
    e = make_vector(300007, dtype, "negzero", seed=4)
    q = lowband.sign(e, scale=scale, block=block)
    a, b = e.copy(), e.copy()
    _schemes.SCHEMES["sign"].residual(q, a, None)
    _schemes._Table.residual(_schemes.SCHEMES["sign"], q, b, None)
    assert_same(a, b)


def _failing_grads(n, dtype, at):
    """(label, state or None, gradient) cases that must fail: a NaN and an
    Inf in g, and an overflow of p = e + g from finite e and g."""
    big = np.finfo(dtype).max
    nan = make_vector(n, dtype, "heavy", seed=5)
    nan[at] = np.nan
    inf = make_vector(n, dtype, "heavy", seed=6)
    inf[at] = -np.inf
    state = make_vector(n, dtype, "heavy", seed=7)
    state[at] = big * 0.75
    over = make_vector(n, dtype, "heavy", seed=8)
    over[at] = big * 0.75
    return [("nan", None, nan, "flat index"), ("inf", None, inf, "flat index"),
            ("overflow", state, over, "overflowed")]


def _check_topk_failures(n, dtype, threads):
    """A failing EF + top-k step (NaN or Inf in g, p overflowing to Inf)
    raises and leaves the state byte for byte, with no snapshot taken (the
    kernel reads e and g only until it knows the step succeeds); the next
    step then matches the generic path."""
    at = n - 3
    for t in threads:
        a = F.ErrorFeedback(C.TopK(ratio=0.01), np.zeros(n, dtype), threads=t)
        b = F.ErrorFeedback(GenericTopK(ratio=0.01), np.zeros(n, dtype), threads=t)
        for label, state, gb, msg in _failing_grads(n, dtype, at):
            for fb in (a, b):
                fb.step(make_vector(n, dtype, "heavy", seed=1))
                if state is not None:
                    fb.load_state_dict({**fb.state_dict(), "arrays": {"error": state.copy()}})
                before, steps = fb.error.copy(), fb.t
                with pytest.raises(ValueError, match=msg if fb is a else None):   # the twin's own words
                    fb.step(gb)
                assert fb.error.tobytes() == before.tobytes(), label
                assert fb.t == steps
            assert a._backup is None   # the fused step never copied the state
            g = make_vector(n, dtype, "heavy", seed=9)
            assert a.step(g) == b.step(g)
            assert_same(a.error, b.error, "error")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")   # the generic twin overflows on purpose
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [700, 50021])   # serial, radix on p computed aside
def test_topk_failure_leaves_state_without_snapshot(isa, dtype, n):
    _check_topk_failures(n, dtype, (1, 2))


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_failure_leaves_state_sampled_path(dtype):
    # LARGE: the sampled read-only collect pass
    _check_topk_failures(LARGE, dtype, (2,))


def test_topk_failure_reports_first_bad_index():
    """g's first non-finite element is reported (before an overflow of p at
    a lower index); with g finite, p's first non-finite element."""
    n = LARGE
    fb = F.ErrorFeedback("topk:0.01", np.zeros(n, np.float32))
    state = np.zeros(n, np.float32)
    state[[10, 20]] = 3e38
    fb.load_state_dict({**fb.state_dict(), "arrays": {"error": state}})
    g = make_vector(n, np.float32, seed=2)
    g[[10, 20]] = 3e38
    g[500000] = np.nan
    with pytest.raises(ValueError, match="flat index 500000"):
        fb.step(g)
    g[500000] = 1.0
    with pytest.raises(ValueError, match="overflowed.*|.*index 10"):
        fb.step(g)
    assert fb.error.tobytes() == state.tobytes()


@pytest.mark.parametrize("t", THREADS)
def test_grouped_topk_failure_leaves_every_state(t):
    """One bad tensor in a group fails the whole grouped step (one C call)
    with every segment's state unchanged and no snapshot; ErrorFeedback.
    step_group likewise."""
    sizes = [3000, LARGE, 70001, 900]
    grads = [make_vector(s, np.float32, "heavy", seed=i) for i, s in enumerate(sizes)]
    group = F.GroupedErrorFeedback("topk:0.01", grads, threads=t)
    objs = [F.ErrorFeedback("topk:0.01", g, threads=t) for g in grads]
    group.step(grads)
    F.ErrorFeedback.step_group(objs, grads)
    for bad in range(len(sizes)):
        for label, state, gb, msg in _failing_grads(sizes[bad], np.float32, sizes[bad] // 2):
            if state is not None:
                group.errors[bad][:] = state
                objs[bad].error[:] = state
            gs = [g * np.float32(0.5) for g in grads]
            gs[bad] = gb
            before, singles = group.error.copy(), [o.error.copy() for o in objs]
            with pytest.raises(ValueError, match=msg):
                group.step(gs)
            with pytest.raises(ValueError, match=msg):
                F.ErrorFeedback.step_group(objs, gs)
            assert group.error.tobytes() == before.tobytes(), (bad, label)
            assert all(o.error.tobytes() == s.tobytes() for o, s in zip(objs, singles)), (bad, label)
            assert group._backup is None and all(o._backup is None for o in objs)
    # the states still agree with each other and step on identically
    out_g, out_s = group.step(grads), F.ErrorFeedback.step_group(objs, grads)
    assert out_g == out_s
    assert_same(group.error, np.concatenate([o.error for o in objs]))


@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "zeros", "sparse", "heavy"])
@pytest.mark.parametrize("n", [4099, 20011, 65537])
def test_fused_topk_sampled_small_vectors(kind, n):
    """Vectors from 4 Ki elements take the sampled path with a sample that
    scales with n (or fall back when it misses, as ties do): the same bytes
    as the generic path, for 1 and 2 threads."""
    for t in (1, 2):
        run_pair(lambda: C.TopK(ratio=0.01, threads=t), lambda: GenericTopK(ratio=0.01, threads=t),
                 lambda c, m, dt: F.ErrorFeedback(c, np.zeros(m, dt), threads=t), n, np.float32,
                 steps=3, kind=kind)
