"""Dispatch and combine: the counting-sort plan, capacity drops, scatter and
inverse-map combine against their twins, backward passes by finite
differences, thread counts and bad input."""
import numpy as np
import pytest

from lowband import _core, moe
from lowband import _reference as ref
from helpers import FLOATS, THREADS, assert_same
from test_moe_support import assert_grad, logits


def plan_twin(r, w, capacity=None, drop="probs", mask=None):
    return ref.moe_plan(r.experts, r.num_experts, mask, capacity, drop, w)


def check_dispatch(x, r, capacity=None, drop="probs", mask=None):
    before = x.copy()
    p = moe.dispatch(x, r, capacity, drop, mask=mask)
    assert_same(x, before, "x changed")
    w = r.weights.astype(x.dtype)
    offsets, rows, position = plan_twin(r, w, capacity, drop, mask)
    assert_same(p.offsets, offsets, "offsets")
    assert_same(p.rows, rows, "rows")
    assert_same(p.position, position, "position")
    assert_same(p.tokens, ref.moe_scatter(x, position, rows.size), "tokens")
    assert_same(p.tokens, x[rows // r.k], "tokens in expert-major order")
    y = np.tanh(p.tokens) * 2 + 1 if p.tokens.size else p.tokens
    assert_same(p.combine(y), ref.moe_combine(y, position, w), "combine")
    g = np.cos(np.arange(x.size, dtype=x.dtype).reshape(x.shape))
    gy, gw = p.combine_backward(g, y)
    assert_same(gy, ref.moe_scatter(g, position, rows.size, w), "grad expert_out")
    assert_same(gw, ref.moe_combine_dot(g, y, position), "grad weights")
    assert_same(p.dispatch_backward(y), ref.moe_combine(y, position), "dispatch backward")
    return p


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T", [0, 1, 2, 3, 7, 31, 97, 1000, 4099])
def test_matches_twin_over_sizes(T, dtype):
    rng = np.random.default_rng(T)
    for E, k, H in ((1, 1, 3), (5, 2, 8), (16, 4, 17)):
        r = moe.route(logits(T, E, dtype, seed=T + E, scale=2.0), k)
        x = rng.standard_normal((T, H)).astype(dtype)
        for cap in (None, 0, 1, max(1, T * k // (2 * E)), T):
            for drop in ("probs", "position"):
                check_dispatch(x, r, cap, drop)
        check_dispatch(x, r, max(1, T // E), "probs", mask=rng.random(T) < 0.6)


@pytest.mark.parametrize("dtype", FLOATS)
def test_large_streaming_and_ties(dtype):
    # outputs past 8 MB take the streaming-store path; equal weights tie
    T, E, k, H = 16384, 8, 2, 80
    z = np.random.default_rng(1).choice(np.array([0.0, 1.0, 2.0]), (T, E)).astype(dtype)
    r = moe.route(z, k, renormalize=False)
    x = np.random.default_rng(2).standard_normal((T, H)).astype(dtype)
    for cap in (None, moe.capacity(T, E, k, 1.0)):
        check_dispatch(x, r, cap, "probs")
    check_dispatch(x[:, :7].copy(), r, None)      # odd H: no vector stores


def test_order_and_unit_weights():
    # section 6.10: expert-major, token-ascending; combine(dispatch) = k * x
    r = moe.route(logits(50, 6, seed=3), 2)
    x = np.random.default_rng(0).standard_normal((50, 4))
    p = moe.dispatch(x, r)
    experts = r.experts.reshape(-1)[p.rows]
    assert (np.diff(experts) >= 0).all()
    for e in range(6):
        tok = p.token_index[p.offsets[e]:p.offsets[e + 1]]
        assert (np.diff(tok) > 0).all() and (r.experts[tok] == e).any(axis=1).all()
        assert_same(p.expert_tokens(e), x[tok])
    unit = moe.Routing.from_arrays(r.experts, np.ones((50, 2)), r.scores)
    q = moe.dispatch(x, unit)
    assert_same(q.combine(q.tokens), 2 * x)
    assert_same(q.dispatch_backward(q.tokens), 2 * x)
    assert p.counts.tolist() == r.counts().tolist() and p.num_dropped == 0


def test_capacity_drop_known_case():
    # section 6.7: one expert, probs [.3, .9, .5, .8], capacity 2
    w = np.array([[0.3], [0.9], [0.5], [0.8]])
    r = moe.Routing.from_arrays(np.zeros((4, 1), np.int32), w, np.ones((4, 2)) * 0.5)
    x = np.arange(8.0).reshape(4, 2)
    probs = moe.dispatch(x, r, capacity=2, drop="probs")
    assert probs.token_index.tolist() == [1, 3]
    assert probs.position.ravel().tolist() == [-1, 0, -1, 1]
    position = moe.dispatch(x, r, capacity=2, drop="position")
    assert position.token_index.tolist() == [0, 1] and position.num_dropped == 2
    out = probs.combine(probs.tokens)
    assert_same(out, np.array([[0, 0], [0.9 * 2, 0.9 * 3], [0, 0], [0.8 * 6, 0.8 * 7]]))
    assert moe.dispatch(x, r, capacity=0).tokens.shape == (0, 2)
    tie = moe.Routing.from_arrays(np.zeros((4, 1), np.int32), np.full((4, 1), 0.5),
                                  np.ones((4, 2)) * 0.5)
    assert moe.dispatch(x, tie, capacity=3).token_index.tolist() == [0, 1, 2]


def test_mask_leaves_padding_out():
    r = moe.route(logits(20, 4, seed=5), 2)
    x = np.random.default_rng(1).standard_normal((20, 3))
    mask = np.arange(20) % 3 != 0
    p = moe.dispatch(x, r, mask=mask)
    assert (p.position[~mask] == -1).all() and (p.position[mask] >= 0).all()
    assert (p.combine(p.tokens)[~mask] == 0).all()
    assert p.tokens.shape[0] == 2 * mask.sum()


def test_backward_by_finite_differences():
    T, E, k, H = 9, 4, 2, 3
    rng = np.random.default_rng(7)
    z0 = logits(T, E, seed=2)
    x0 = rng.standard_normal((T, H))
    R = rng.standard_normal((T, H))

    def loss(z, x):
        r = moe.route(z, k)
        p = moe.dispatch(x, r, capacity=4)
        return float((p.combine(np.tanh(p.tokens)) * R).sum())

    r = moe.route(z0, k)
    p = moe.dispatch(x0, r, capacity=4)
    assert p.num_dropped > 0
    y = np.tanh(p.tokens)
    gy, gw = p.combine_backward(R, y)
    gx = p.dispatch_backward(gy * (1 - y ** 2))
    assert_grad(gx, lambda x: loss(z0, x), x0)
    assert_grad(r.backward(gw), lambda z: loss(z, x0), z0)
    assert_grad(gy, lambda yy: float((p.combine(yy) * R).sum()), y)
    # weights as free variables
    w0 = r.weights.copy()

    def by_weights(w):
        q = moe.dispatch(x0, moe.Routing.from_arrays(r.experts, w, r.scores), capacity=4)
        return float((q.combine(np.tanh(q.tokens)) * R).sum())
    assert_grad(gw, by_weights, w0)
    assert (gw[p.position < 0] == 0).all()


def test_every_isa_path_agrees(isa):
    r = moe.route(logits(3000, 16, np.float32, seed=9), 4)
    x = np.random.default_rng(8).standard_normal((3000, 96)).astype(np.float32)
    check_dispatch(x, r, moe.capacity(3000, 16, 4, 1.0), "probs")
    check_dispatch(x.astype(np.float64), r, None)


def test_byte_identical_for_any_thread_count():
    T, E, k, H = 40000, 64, 2, 32
    r = moe.route(logits(T, E, np.float32, seed=8), k)
    x = np.random.default_rng(3).standard_normal((T, H)).astype(np.float32)
    cap = moe.capacity(T, E, k, 1.0)
    base = moe.dispatch(x, r, cap, threads=1)
    y = base.tokens * 0.5
    ref_out = base.combine(y)
    ref_back = base.combine_backward(x, y)
    for t in THREADS:
        p = moe.dispatch(x, r, cap, threads=t)
        for a in ("offsets", "rows", "position", "tokens"):
            assert_same(getattr(p, a), getattr(base, a), a)
        assert_same(p.combine(y), ref_out)
        for a, b in zip(p.combine_backward(x, y), ref_back):
            assert_same(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
def test_combine_backward_kernel_is_scatter_and_dot(dtype, isa):
    # the fused combine backward, each output alone or both, over thread
    # counts, with dropped slots, with and without weights, streaming sizes
    # (rows of 136 float32 alternate between 64- and 32-byte alignment)
    rng = np.random.default_rng(5)
    for T, E, k, H, cap in ((97, 5, 2, 9, 20), (9000, 8, 2, 136, None)):
        r = moe.route(logits(T, E, dtype, seed=T), k)
        p = moe.dispatch(rng.standard_normal((T, H)).astype(dtype), r, cap)
        n = p.rows.size
        y = rng.standard_normal((n, H)).astype(dtype)
        g = rng.standard_normal((T, H)).astype(dtype)
        for w in (p.weights, None):
            want_gy = _core.moe_scatter(g, p.position, n, w)
            want_gw = _core.moe_combine_dot(g, y, p.position)
            assert_same(want_gy, ref.moe_scatter(g, p.position, n, w))
            assert_same(want_gw, ref.moe_combine_dot(g, y, p.position))
            for t in THREADS:
                gy, gw = _core.moe_combine_backward(g, y, p.position, w, True, True, t)
                assert_same(gy, want_gy)
                assert_same(gw, want_gw)
                gy, none = _core.moe_combine_backward(g, y, p.position, w, True, False, t)
                assert none is None
                assert_same(gy, want_gy)
                none, gw = _core.moe_combine_backward(g, y, p.position, w, False, True, t)
                assert none is None
                assert_same(gw, want_gw)


def test_large_outputs_are_page_aligned():
    # pool outputs start on a page: a row copy whose destination sits a few
    # bytes past its source modulo 4096 stalls every load (4K aliasing)
    r = moe.route(logits(4096, 8, np.float32, seed=6), 2)
    x = np.random.default_rng(6).standard_normal((4096, 64)).astype(np.float32)
    p = moe.dispatch(x, r)
    assert p.tokens.nbytes >= 1 << 20 and p.tokens.ctypes.data % 4096 == 0
    assert p.combine(p.tokens).ctypes.data % 4096 == 0
    assert _core.empty((1 << 18,), np.float32).ctypes.data % 4096 == 0


def test_reused_output_buffers():
    r = moe.route(logits(300, 8, seed=4), 2)
    x = np.random.default_rng(4).standard_normal((300, 16))
    want = moe.dispatch(x, r, capacity=60)
    y = want.tokens * 3.0
    buf = np.full((600, 16), np.nan)
    out = np.full((300, 16), np.nan)
    got = moe.dispatch(x, r, capacity=60, out=buf)
    assert np.shares_memory(got.tokens, buf) and got.tokens.shape == want.tokens.shape
    assert_same(got.tokens, want.tokens)
    res = got.combine(y, out=out)
    assert res is out or np.shares_memory(res, out)
    assert_same(out, want.combine(y))
    with pytest.raises(ValueError, match=r"out: expected shape \(>= \d+, 16\)"):
        moe.dispatch(x, r, out=np.empty((10, 16)))
    with pytest.raises(TypeError, match="out: expected dtype float64, got float32"):
        moe.dispatch(x, r, out=np.empty((600, 16), np.float32))
    big = np.zeros((900, 16))
    big[:300] = x
    with pytest.raises(ValueError, match="out: must not overlap x"):
        moe.dispatch(big[:300], r, out=big)
    with pytest.raises(ValueError, match="out: must not overlap expert_out"):
        got.combine(y, out=y[:300])
    with pytest.raises(ValueError, match="out: expected a writeable"):
        got.combine(y, out=np.empty((16, 300)).T)
    with pytest.raises(TypeError, match="out: expected None or an ndarray"):
        got.combine(y, out=[0])


def test_bad_arguments():
    r = moe.route(logits(10, 4), 2)
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match=r"x: expected 10 rows, got shape \(9, 3\)"):
        moe.dispatch(x[:9], r)
    with pytest.raises(TypeError, match="x: expected a float32 or float64 array, got dtype int64"):
        moe.dispatch(x.astype(int), r)
    with pytest.raises(ValueError, match=r"x: expected a 2-D array"):
        moe.dispatch(x[0], r)
    with pytest.raises(TypeError, match="routing: expected a lowband.moe.Routing"):
        moe.dispatch(x, "r")
    with pytest.raises(ValueError, match=r"capacity: expected an int in \[0, "):
        moe.dispatch(x, r, capacity=-1)
    with pytest.raises(TypeError, match="capacity: expected an int, got float"):
        moe.dispatch(x, r, capacity=2.5)
    with pytest.raises(ValueError, match="drop: expected one of 'probs', 'position', got 'random'"):
        moe.dispatch(x, r, drop="random")
    with pytest.raises(ValueError, match="mask: expected 10 elements"):
        moe.dispatch(x, r, mask=np.ones(3, bool))
    p = moe.dispatch(x, r)
    with pytest.raises(ValueError, match="expert_out: expected 20 rows"):
        p.combine(np.zeros((19, 3)))
    with pytest.raises(TypeError, match="expert_out: expected dtype float64 .that of x., got float32"):
        p.combine(np.zeros((20, 3), np.float32))
    with pytest.raises(ValueError, match=r"grad_out: expected 3 columns"):
        p.combine_backward(np.zeros((10, 2)), np.zeros((20, 3)))
    with pytest.raises(TypeError, match="grad_out: expected dtype float64"):
        p.combine_backward(np.zeros((10, 3), np.float32), np.zeros((20, 3)))
    with pytest.raises(ValueError, match="grad_tokens: expected 20 rows"):
        p.dispatch_backward(np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"i: expected an int in \[0, 3\], got 4"):
        p.expert_tokens(4)


def test_core_entry_points_check_indices():
    ex = np.array([[0, 1], [2, 5]], np.int32)
    with pytest.raises(ValueError, match=r"expert id at flat position 3 is outside \[0, 4\)"):
        _core.moe_plan(ex, 4, None, -1, 0, None)
    with pytest.raises(ValueError, match="drop by probs needs the weights"):
        _core.moe_plan(ex % 4, 4, None, 1, 0, None)
    x = np.zeros((2, 3))
    for bad in ([[0, 4], [1, 2]], [[0, 0], [1, 2]], [[0, 1], [-1, 2]], [[0, 1], [1, -5]]):
        with pytest.raises(ValueError, match=r"position: the kept positions must map one-to-one onto \[0, 4\)"):
            _core.moe_scatter(x, np.array(bad, np.int64), 4, None)
    with pytest.raises(ValueError, match="n <= T"):
        _core.moe_scatter(x, np.array([[0, 1], [2, 3]], np.int64), 5, None)
    with pytest.raises(ValueError, match="combine"):
        _core.moe_combine(np.zeros((4, 3)), np.array([[0, 4], [1, 2]], np.int64), None)
    with pytest.raises(ValueError, match="combine"):
        _core.moe_combine(np.zeros((4, 3)), np.array([[0, -2], [1, 2]], np.int64), None)
    with pytest.raises(ValueError, match="combine_backward"):
        _core.moe_combine_dot(np.zeros((2, 3)), np.zeros((4, 3)), np.array([[0, 9], [1, 2]], np.int64))
    with pytest.raises(TypeError, match="position: expected an ndarray of dtype int64"):
        _core.moe_combine(np.zeros((4, 3)), np.array([[0, 1], [1, 2]], np.int32), None)
    pos = np.array([[0, 1], [2, 3]], np.int64)
    cb = _core.moe_combine_backward
    with pytest.raises(ValueError, match=r"position: the kept positions must map one-to-one onto \[0, 4\)"):
        cb(np.zeros((2, 3)), np.zeros((4, 3)), np.array([[0, 0], [1, 2]], np.int64), None)
    with pytest.raises(ValueError, match="combine_backward"):
        cb(np.zeros((2, 3)), np.zeros((4, 3)), np.array([[0, 9], [1, 2]], np.int64), None, False)
    with pytest.raises(ValueError, match="need_y, need_weights: expected at least one True"):
        cb(np.zeros((2, 3)), np.zeros((4, 3)), pos, None, False, False)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(T, H\)"):
        cb(np.zeros((2, 2)), np.zeros((4, 3)), pos, None)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(T, H\)"):
        cb(np.zeros((2, 3), np.float32), np.zeros((4, 3)), pos, None)
    with pytest.raises(ValueError, match="weights: expected the shape of position"):
        cb(np.zeros((2, 3)), np.zeros((4, 3)), pos, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="weights: expected the shape of position"):
        _core.moe_combine(np.zeros((4, 3)), np.array([[0, 1], [1, 2]], np.int64), np.zeros((2, 3)))
