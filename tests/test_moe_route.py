"""moe.route against its NumPy twin (byte for byte), known answers, ties,
bias and group limits, thread counts, the routing gradient and bad input."""
import numpy as np
import pytest

from lowband import _core, _moe_core, moe
from lowband import _reference as ref
from helpers import FLOATS, THREADS, assert_same, unchanged
from test_moe_support import assert_grad, logits

ROWS = (0, 1, 2, 3, 7, 31, 97, 1000, 4099)
CONFIGS = [  # (score, renormalize)
    ("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]


def check_against_twin(z, k, **kw):
    r = unchanged(moe.route, z, k, **kw)
    score = kw.get("score", "softmax")
    renorm = kw.get("renormalize")
    renorm = (k > 1) if renorm is None else renorm
    want = ref.moe_route(z, k, score, renorm, kw.get("bias"), kw.get("groups") or 0,
                         kw.get("group_k") or 0)
    for name, got, exp in zip(("experts", "weights", "scores", "counts", "sums"),
                              (r.experts, r.weights, r.scores, r._counts, r._sums), want):
        assert_same(got, exp, name)
    assert r.experts.dtype == np.int32 and r.weights.dtype == z.dtype
    return r


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T", ROWS)
def test_matches_twin_over_sizes(T, dtype):
    for E in (1, 5, 8, 64):
        for k in sorted({1, min(E, 2), min(E, 3), E}):
            for score, renorm in CONFIGS:
                if renorm and k == 1:
                    continue
                z = logits(T, E, dtype, seed=T * 7 + E + k, scale=3.0)
                check_against_twin(z, k, score=score, renormalize=renorm)


@pytest.mark.parametrize("dtype", FLOATS)
def test_large_inputs_cross_the_grain_and_chunks(dtype):
    # 65537 x 8: many column-sum chunks, threaded; 3001 x 64 the same with wide rows
    for T, E, k in ((65537, 8, 2), (3001, 64, 8)):
        z = logits(T, E, dtype, seed=T, scale=4.0)
        for score, renorm in CONFIGS[:3]:
            check_against_twin(z, k, score=score, renormalize=renorm, threads=2)


@pytest.mark.parametrize("dtype", FLOATS)
def test_extreme_logits_flush_but_stay_finite(dtype):
    z = logits(200, 16, dtype, seed=4, scale=300.0)
    for score, renorm in CONFIGS:
        r = check_against_twin(z, 2, score=score, renormalize=renorm)
        assert np.isfinite(r.weights).all() and np.isfinite(r.scores).all()


@pytest.mark.parametrize("dtype", FLOATS)
def test_ties_go_to_the_lower_expert(dtype):
    z = np.array([[1, 3, 3, 1], [0, 0, 0, 0], [2, 1, 2, 2]], dtype)
    r = moe.route(z, 3)
    assert r.experts.tolist() == [[1, 2, 0], [0, 1, 2], [0, 2, 3]]
    ties = np.random.default_rng(0).choice(np.array([-1.0, 0.0, 0.5, 2.0]), (3000, 12)).astype(dtype)
    for score, renorm in CONFIGS:
        check_against_twin(ties, 4, score=score, renormalize=renorm)
        check_against_twin(ties, 4, score=score, renormalize=renorm, groups=3, group_k=2,
                           bias=np.linspace(0, 0.25, 12))


def test_known_score_functions():
    # hand-checked: z = [1, 2, 3, 0], k = 2 selects [2, 1]
    z = np.array([[1.0, 2.0, 3.0, 0.0]])
    cases = {("softmax", True): [0.731059, 0.268941], ("softmax", False): [0.643914, 0.236883],
             ("sigmoid", True): [0.519575, 0.480425]}
    for (score, renorm), want in cases.items():
        r = moe.route(z, 2, score=score, renormalize=renorm)
        assert r.experts.tolist() == [[2, 1]]
        np.testing.assert_allclose(r.weights[0], want, atol=5e-7)
    assert abs(moe.route(z, 2, renormalize=False).weights.sum() - 0.880797) < 5e-7
    np.testing.assert_allclose(moe.route(z, 1, renormalize=False).scores[0],
                               np.exp(z[0]) / np.exp(z[0]).sum(), rtol=1e-15)
    np.testing.assert_allclose(moe.route(z, 1, score="sigmoid").scores[0],
                               1 / (1 + np.exp(-z[0])), rtol=1e-15)


def test_group_limited_known_case():
    # section 6.8: scores [.9, 0, .8, .75], 2 groups, k = 2, group_k = 1
    s = np.array([[0.9, 1e-12, 0.8, 0.75]])
    z = np.log(s / (1 - s))                      # sigmoid scores = s
    assert moe.route(z, 2, score="sigmoid").experts.tolist() == [[0, 2]]
    assert sorted(moe.route(z, 2, score="sigmoid", groups=2, group_k=1).experts[0]) == [2, 3]
    zs = np.log(s)                               # softmax scores proportional to s
    assert sorted(moe.route(zs, 2).experts[0]) == [0, 2]
    assert sorted(moe.route(zs, 2, groups=2, group_k=1).experts[0]) == [2, 3]


def test_bias_changes_the_choice_not_the_weights():
    s = np.array([[0.9, 0.8, 0.3, 0.2]])
    z = np.log(s / (1 - s))
    plain = moe.route(z, 2, score="sigmoid")
    biased = moe.route(z, 2, score="sigmoid", bias=np.array([0.0, 0.0, 1.0, 1.0]))
    assert plain.experts.tolist() == [[0, 1]] and biased.experts.tolist() == [[2, 3]]
    np.testing.assert_allclose(biased.weights[0], [0.6, 0.4], rtol=1e-12)
    np.testing.assert_array_equal(biased.scores, plain.scores)
    raw = moe.route(z, 2, score="sigmoid", renormalize=False, bias=np.array([0, 0, 1.0, 1]))
    np.testing.assert_allclose(raw.weights[0], [0.3, 0.2], rtol=1e-12)
    soft = moe.route(np.log(s), 2, bias=np.array([0, 0, 1.0, 1]))
    assert soft.experts.tolist() == [[2, 3]]


@pytest.mark.parametrize("dtype", FLOATS)
def test_bias_and_groups_match_twin(dtype):
    for T, E in ((1, 8), (97, 16), (4099, 64)):
        z = logits(T, E, dtype, seed=E, scale=2.0)
        bias = np.random.default_rng(E).standard_normal(E) * 0.1
        for score, renorm in CONFIGS:
            check_against_twin(z, 4, score=score, renormalize=renorm, bias=bias)
            check_against_twin(z, 4, score=score, renormalize=renorm, groups=4, group_k=2)
            check_against_twin(z, 4, score=score, renormalize=renorm, bias=bias, groups=E // 2,
                               group_k=2)
            r = check_against_twin(z, 4, score=score, renormalize=renorm, groups=4, group_k=2,
                                   bias=bias.astype(np.float32))
            allowed_groups = np.unique(r.experts // (E // 4), axis=None)
            assert allowed_groups.size <= 4
            assert all(np.unique(row // (E // 4)).size <= 2 for row in r.experts)


def test_byte_identical_for_any_thread_count():
    z = logits(20011, 64, np.float32, seed=9, scale=2.0)
    bias = np.linspace(-0.1, 0.1, 64)
    for kw in (dict(), dict(score="sigmoid", bias=bias, groups=8, group_k=4)):
        base = moe.route(z, 8, threads=1, **kw)
        for t in THREADS:
            r = moe.route(z, 8, threads=t, **kw)
            for a in ("experts", "weights", "scores", "_counts", "_sums"):
                assert_same(getattr(r, a), getattr(base, a), a)


def test_every_isa_path_agrees(isa):
    # the scalar (SSE2) and AVX2 builds of the row kernels give the same bytes
    for dtype in FLOATS:
        z = logits(3001, 64, dtype, seed=12, scale=2.0)
        check_against_twin(z, 8, threads=2)
        check_against_twin(z, 2, score="sigmoid", bias=np.linspace(0, 0.1, 64), groups=8,
                           group_k=2)
        r = moe.route(z, 4)
        loss, grad = moe.load_balancing_loss(r, scope="sequence", seq_len=3001)
        counts, valid, sums = ref.moe_balance_stats(r.scores, "softmax", r.experts, 64, None, 3001)
        want_loss, g = _moe_core._balance_terms(counts, valid, sums, valid, 4)
        assert loss == want_loss
        assert_same(grad, ref.moe_balance_grad(r.scores, "softmax", g, 3001, None))
        total, zg = ref.moe_z_loss(z, None, 1 / 3001)
        zl = moe.z_loss(z)
        assert zl[0] == total / 3001
        assert_same(zl[1], zg)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_logits_raise_with_the_first_index(bad, dtype):
    for T, E in ((5, 4), (20000, 16)):
        z = logits(T, E, dtype, seed=1)
        z[T // 2, 3] = bad
        z[T - 1, 0] = bad
        with pytest.raises(ValueError, match=f"flat index {(T // 2) * E + 3}\\b"):
            moe.route(z, 2, threads=2)


def test_layouts_are_read_not_misread():
    z = logits(40, 9, np.float64, seed=3)
    base = moe.route(z, 3)
    t = np.asfortranarray(z)
    assert_same(moe.route(t, 3).weights, base.weights)
    big = np.empty((40, 18))
    big[:, ::2] = z
    assert_same(moe.route(big[:, ::2], 3).scores, base.scores)
    assert_same(moe.route(z.astype(">f8"), 3).experts, base.experts)
    assert_same(moe.route(z.tolist(), 3).weights, base.weights)


def test_counts_and_mask():
    z = logits(500, 8, seed=2)
    r = moe.route(z, 3)
    assert r.counts().tolist() == np.bincount(r.experts.ravel(), minlength=8).tolist()
    mask = np.random.default_rng(0).random(500) < 0.6
    want = np.bincount(r.experts[mask].ravel(), minlength=8)
    assert r.counts(mask).tolist() == want.tolist()
    assert r.counts(mask.reshape(20, 25)).dtype == np.int64
    assert moe.route(z[:0], 3).counts().tolist() == [0] * 8


@pytest.mark.parametrize("score,renorm", CONFIGS)
def test_routing_backward_by_finite_differences(score, renorm):
    T, E, k = 6, 7, 3
    z0 = logits(T, E, seed=11, scale=1.5)
    R = np.random.default_rng(5).standard_normal((T, k))
    bias = np.linspace(0.2, -0.2, E)
    for kw in (dict(), dict(bias=bias), dict(groups=7, group_k=3)):
        r = moe.route(z0, k, score=score, renormalize=renorm, **kw)
        f = lambda z: float((moe.route(z, k, score=score, renormalize=renorm, **kw).weights * R).sum())
        assert_grad(r.backward(R), f, z0)
    rs = moe.route(z0.astype(np.float32), k, score=score, renormalize=renorm)
    assert rs.backward(R).dtype == np.float32


def test_top_and_from_arrays():
    z = logits(30, 6, seed=4)
    r = moe.route(z, 3)
    r1 = r.top(1)
    assert r1.k == 1 and (r1.experts[:, 0] == r.experts[:, 0]).all()
    custom = moe.Routing.from_arrays(r.experts.astype(np.int64), r.weights, r.scores,
                                     renormalize=True)
    np.testing.assert_array_equal(custom.backward(np.ones((30, 3))), r.backward(np.ones((30, 3))))
    assert "T=30" in repr(r)
    with pytest.raises(ValueError, match="distinct"):
        moe.Routing.from_arrays(np.zeros((30, 2), np.int32), r.weights[:, :2], r.scores)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\)"):
        moe.Routing.from_arrays(r.experts + 5, r.weights, r.scores)
    with pytest.raises(TypeError, match="experts: expected an integer array"):
        moe.Routing.from_arrays(r.experts * 1.0, r.weights, r.scores)
    with pytest.raises(TypeError, match="weights: expected dtype float64"):
        moe.Routing.from_arrays(r.experts, r.weights.astype(np.float32), r.scores)
    with pytest.raises(ValueError, match="weights: expected 30 rows"):
        moe.Routing.from_arrays(r.experts, r.weights[:3], r.scores)
    with pytest.raises(ValueError, match="finite"):
        moe.Routing.from_arrays(r.experts, r.weights * np.nan, r.scores)
    with pytest.raises(ValueError, match="m: expected an int in"):
        r.top(4)


Z = logits(10, 8, seed=0)


@pytest.mark.parametrize("args,kwargs,exc,msg", [
    ((Z[0], 2), {}, ValueError, r"logits: expected a 2-D array, got shape \(8,\)"),
    ((Z.astype(int), 2), {}, TypeError, "logits: expected a float32 or float64 array, got dtype int64"),
    ((np.zeros((3, 0)), 1), {}, ValueError, "logits: expected at least one expert column"),
    ((Z, 0), {}, ValueError, r"k: expected an int in \[1, 8\], got 0"),
    ((Z, 9), {}, ValueError, r"k: expected an int in \[1, 8\], got 9"),
    ((Z, 2.0), {}, TypeError, "k: expected an int, got float"),
    ((Z, True), {}, TypeError, "k: expected an int, got bool"),
    ((Z, 2), dict(score="relu"), ValueError, "score: expected one of 'softmax', 'sigmoid', got 'relu'"),
    ((Z, 2), dict(score=1), TypeError, "score: expected one of"),
    ((Z, 2), dict(renormalize="yes"), TypeError, "renormalize: expected None or a bool, got str"),
    ((Z, 1), dict(renormalize=True), ValueError, "renormalize: True with k=1"),
    ((Z, 2), dict(bias=np.zeros(7)), ValueError, r"bias: expected shape \(8,\), got \(7,\)"),
    ((Z, 2), dict(bias=np.full(8, np.nan)), ValueError, "bias: expected finite values"),
    ((Z, 2), dict(bias=np.zeros(8, int)), TypeError, "bias: expected a float32 or float64 array"),
    ((Z, 2), dict(groups=2), TypeError, "groups/group_k: give both or neither"),
    ((Z, 2), dict(groups=3, group_k=1), ValueError, "groups: must divide E = 8, got 3"),
    ((Z, 2), dict(groups=4, group_k=5), ValueError, r"group_k: expected an int in \[1, 4\], got 5"),
    ((Z, 2), dict(groups=4, group_k=3), ValueError, "k: group-limited routing needs"),
    ((Z, 5), dict(groups=4, group_k=2), ValueError, "k: group-limited routing needs"),
    ((Z, 2), dict(groups=0, group_k=1), ValueError, "groups: expected an int in"),
    ((Z, 2), dict(threads=0), ValueError, "threads"),
    ((Z, 2), dict(threads=1.5), TypeError, "threads"),
])
def test_bad_arguments(args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        moe.route(*args, **kwargs)


def test_core_entry_point_refuses_bad_input_without_crashing():
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= E"):
        _core.moe_route(z, 5)
    with pytest.raises(ValueError, match="inconsistent groups"):
        _core.moe_route(z, 2, 0, True, None, 3, 1)
    with pytest.raises(ValueError, match="bias: expected 4 elements"):
        _core.moe_route(z, 2, 0, True, np.zeros(3))
    with pytest.raises(TypeError, match="bias: expected an ndarray of dtype float64"):
        _core.moe_route(z, 2, 0, True, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="score: expected 0"):
        _core.moe_route(z, 2, 7)
    with pytest.raises(ValueError, match="expected 2 dimension"):
        _core.moe_route(np.zeros(4), 1)


@pytest.mark.parametrize("E,k", [(E, k) for E in (4, 16, 17, 37, 64, 100)
                                 for k in (1, 2, 3, 4, 8, 16) if k <= E])
def test_small_k_selection_paths_agree_with_twin(isa, E, k):
    # AVX-512 selects k <= 8 of E <= 64 float32 experts sixteen rows at a
    # time (one per lane; the tail by extraction) and 8 < k <= 16 by
    # repeated extraction; AVX2 k <= 8 of 16 <= E <= 256 eight rows at a
    # time (the rest one by one); every path must give the twin's choice,
    # ties too
    rng = np.random.default_rng(E * 100 + k)
    z = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 0.5, 2.0], np.float32), (300, E))
    z[::7] = rng.standard_normal((len(z[::7]), E)).astype(np.float32)
    r = moe.route(z, k)
    experts, weights, scores, counts, _ = ref.moe_route(z, k, renormalize=k > 1)   # route's default
    np.testing.assert_array_equal(r.experts, experts)
    np.testing.assert_array_equal(r.weights, weights)
    np.testing.assert_array_equal(r.counts(), counts)


@pytest.mark.parametrize("E", [8, 24, 40, 64])
def test_fused_softmax_rows_agree_with_twin(isa, E):
    # float32 softmax with E % 8 == 0 <= 64 and k <= 8 takes a one-pass row
    # on AVX2 / AVX-512 (8 or 16 lane maxima bound the candidates; up to 16
    # ranked all-pairs, up to 32 one by one, more by the generic row):
    # ties, maxima of +0 and -0, exponentials that underflow and every
    # output must equal the twin's bytes
    rng = np.random.default_rng(E)
    z = rng.standard_normal((600, E)).astype(np.float32)
    z[1::6] = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 2.0], np.float32), (100, E))
    z[2::6] = rng.choice(np.array([-3.0, -0.0, 0.0], np.float32), (100, E))
    z[3::6] *= 60                        # exp(z - max) below exp(-87): flushed to 0
    z[4::6] = rng.choice(np.array([1.0, 1.5], np.float32), (100, E))   # many candidates
    z[5::6, ::3] = 7.0                   # ties at the maximum
    for k in sorted({1, 2, 3, 5, 8} & set(range(1, E + 1))):
        for renorm in ((False, True) if k > 1 else (False,)):
            r = moe.route(z, k, renormalize=renorm, threads=2)
            want = ref.moe_route(z, k, renormalize=renorm)
            for name, got, exp in zip(("experts", "weights", "scores", "counts", "sums"),
                                      (r.experts, r.weights, r.scores, r._counts, r._sums),
                                      want):
                assert_same(got, exp.astype(got.dtype) if name == "experts" else exp, name)
