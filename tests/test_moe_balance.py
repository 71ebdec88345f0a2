"""Load balancing: the canonical loss and its gradient against the twins and
finite differences, hand-checked known answers (Demons in the Detail, Megatron), the
global-batch LoadBalancer over simulated workers and micro-batches, the
conversions to other frameworks, z-loss, bias update, capacity."""
import numpy as np
import pytest

from lowband import _core, _moe_core, moe
from lowband import _reference as ref
from helpers import FLOATS, THREADS, assert_same
from test_moe_support import FakeWorld, assert_grad, logits

SCORES = ("softmax", "sigmoid")


def twin_loss(r, scope="micro", seq_len=None, mask=None):
    """The loss and gradient from the NumPy twins of the two kernels."""
    T = r.num_tokens
    seg = T if scope == "micro" else seq_len
    counts, valid, sums = ref.moe_balance_stats(r.scores, r.score, r.experts, r.num_experts,
                                                mask, seg)
    loss, g = _moe_core._balance_terms(counts, valid, sums, valid, r.k)
    return loss, ref.moe_balance_grad(r.scores, r.score, g, seg, mask)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("score", SCORES)
def test_loss_and_gradient_match_twins(score, dtype):
    rng = np.random.default_rng(0)
    for T, E, k, seq in ((0, 4, 1, 1), (1, 1, 1, 1), (7, 5, 2, 7), (96, 8, 2, 8), (4099, 64, 8, 4099),
                         (3000, 64, 4, 1500), (70000, 4, 2, 35000), (2048, 3, 1, 1)):
        r = moe.route(logits(T, E, dtype, seed=T + E, scale=2.0), k, score=score,
                      renormalize=k > 1)
        for mask in (None, rng.random(T) < 0.7):
            for scope in ("micro", "sequence"):
                sl = seq if scope == "sequence" else None
                loss, grad = moe.load_balancing_loss(r, scope=scope, seq_len=sl, mask=mask)
                want_loss, want_grad = twin_loss(r, scope, sl, mask)
                assert loss == want_loss
                assert_same(grad, want_grad, f"grad T={T} E={E} {scope}")


def test_core_stats_match_twin_with_partials_inside_segments():
    # segments longer than one column-sum chunk (1024 rows for E = 64)
    r = moe.route(logits(6144, 64, np.float32, seed=3), 4)
    mask = np.random.default_rng(1).random(6144) < 0.5
    for seg in (6144, 3072, 2048, 1, 3):
        got = _core.moe_balance_stats(r.scores, 0, r.experts, 64, mask, seg)
        want = ref.moe_balance_stats(r.scores, "softmax", r.experts, 64, mask, seg)
        for a, b in zip(got, want):
            assert_same(a, b)


def test_cached_and_recomputed_statistics_agree():
    r = moe.route(logits(5000, 16, np.float32, seed=5), 2)
    a = moe.load_balancing_loss(r)
    b = moe.load_balancing_loss(r, mask=np.ones(5000, bool))
    assert a[0] == b[0]
    assert_same(a[1], b[1])


def test_invariants_give_one():
    # f uniform: 1 for any P.  P uniform: 1 for any routing.
    scores = np.random.default_rng(2).dirichlet(np.ones(4), size=2)
    r = moe.Routing.from_arrays(np.array([[0, 1], [2, 3]]), np.full((2, 2), 0.5), scores)
    assert moe.load_balancing_loss(r)[0] == pytest.approx(1.0, abs=1e-15)
    for k in (1, 2, 3):
        u = moe.route(np.zeros((10, 4)), k, renormalize=False)
        assert u.experts[:, 0].tolist() == [0] * 10           # all ties -> lowest ids
        assert moe.load_balancing_loss(u)[0] == pytest.approx(1.0, abs=1e-15)
    s = moe.route(np.zeros((6, 4)), 2, score="sigmoid")
    assert moe.load_balancing_loss(s)[0] == pytest.approx(1.0, abs=1e-12)


GROUP_A = np.log(np.array([[0.7, 0.1, 0.1, 0.1]] * 2))
GROUP_B = np.log(np.array([[0.1, 0.7, 0.1, 0.1]] * 2))


def test_micro_sequence_and_global_known_answers():
    # section 6.3: E = 4, k = 1
    ra, rb = moe.route(GROUP_A, 1), moe.route(GROUP_B, 1)
    assert moe.load_balancing_loss(ra)[0] == pytest.approx(2.8)
    assert moe.load_balancing_loss(rb)[0] == pytest.approx(2.8)
    both = moe.route(np.concatenate([GROUP_A, GROUP_B]), 1)
    assert moe.load_balancing_loss(both)[0] == pytest.approx(1.6)
    assert moe.load_balancing_loss(both, scope="sequence", seq_len=2)[0] == pytest.approx(2.8)
    world = FakeWorld(2)

    def worker(rank, allreduce):
        lb = moe.LoadBalancer(4, 1, allreduce=allreduce)
        r = moe.route([GROUP_A, GROUP_B][rank], 1)
        lb.accumulate(r)
        return lb.loss(r), lb.fractions
    (la, ga), fa = world.run(worker)[0]
    (lb_, gb), fb = world.run(worker)[1]
    assert la == pytest.approx(1.6) and lb_ == pytest.approx(1.6)
    np.testing.assert_allclose(fa, [0.5, 0.5, 0, 0])
    # section 6.4: dL/dz per token; the global one after averaging over W = 2
    _, gm = moe.load_balancing_loss(ra)
    np.testing.assert_allclose(gm, [[0.42, -0.14, -0.14, -0.14]] * 2, atol=1e-12)
    np.testing.assert_allclose(ga / 2, [[0.07, 0.01, -0.04, -0.04]] * 2, atol=1e-12)
    np.testing.assert_allclose(gb / 2, [[0.01, 0.07, -0.04, -0.04]] * 2, atol=1e-12)


def test_hf_layer_concatenation_known_answer():
    # the same data as two layers: HF concatenates them (1.6), a per-layer mean gives 2.8
    layers = [moe.route(GROUP_A, 1), moe.route(GROUP_B, 1)]
    concat = moe.route(np.concatenate([GROUP_A, GROUP_B]), 1)
    assert moe.load_balancing_loss(concat)[0] == pytest.approx(1.6)
    assert np.mean([moe.load_balancing_loss(r)[0] for r in layers]) == pytest.approx(2.8)


# ---- conversions to other frameworks, each transcribed from its formula ----

def hf_loss(z, k, mask=None):
    """transformers' load_balancing_loss_func (Mixtral/Qwen-MoE), in NumPy."""
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]
    onehot = np.zeros(top.shape + (z.shape[1],))
    np.put_along_axis(onehot, top[..., None], 1.0, axis=2)
    if mask is None:
        tokens_per_expert = onehot.mean(0)                 # [k, E]
        prob_per_expert = p.mean(0)
    else:
        m = mask.astype(float)
        tokens_per_expert = (onehot * m[:, None, None]).sum(0) / m.sum()
        prob_per_expert = (p * m[:, None]).sum(0) / m.sum()
    return float((tokens_per_expert * prob_per_expert[None]).sum() * z.shape[1])


def megatron_loss(probs, counts, T, k, E):
    """switch_load_balancing_loss_func with coeff 1: E / (k T^2) * sum S_i c_i."""
    return float(E / (k * T * T) * (probs.sum(0) * counts).sum())


def deepspeed_topk_loss(gates, top, E, k):
    me = gates.mean(0)
    mask = np.zeros_like(gates)
    np.put_along_axis(mask, top, 1.0, axis=1)
    ce = mask.mean(0)
    return float((me * ce).mean() * E * E / k)


def deepspeed_top2_loss(gates, top):
    """top2gating: the aux loss uses the first choice's mask only."""
    E = gates.shape[1]
    me = gates.mean(0)
    mask1 = np.zeros_like(gates)
    mask1[np.arange(gates.shape[0]), top[:, 0]] = 1.0
    ce = mask1.mean(0)
    return float((me * ce).mean() * E * E)


def test_conversions_on_a_known_case():
    # E = 4, k = 2, uniform P, balanced routing: Megatron 1, HF 2, DeepSpeed-topk 1
    z = np.zeros((2, 4))
    r = moe.Routing.from_arrays(np.array([[0, 1], [2, 3]]), np.full((2, 2), 0.5),
                                np.full((2, 4), 0.25))
    canonical = moe.load_balancing_loss(r)[0]
    assert canonical == pytest.approx(1.0)
    assert megatron_loss(r.scores, r.counts(), 2, 2, 4) == pytest.approx(canonical)
    assert deepspeed_topk_loss(r.scores, r.experts, 4, 2) == pytest.approx(canonical)
    assert 2 * canonical == pytest.approx(2.0)      # HF = k x canonical
    del z


@pytest.mark.parametrize("k", [1, 2, 4])
def test_conversions_on_random_routing(k):
    z = logits(300, 8, seed=k, scale=2.0)
    r = moe.route(z, k)
    canonical = moe.load_balancing_loss(r)[0]
    assert hf_loss(z, k) == pytest.approx(k * canonical, rel=1e-12)
    assert megatron_loss(r.scores, r.counts(), 300, k, 8) == pytest.approx(canonical, rel=1e-12)
    assert deepspeed_topk_loss(r.scores, r.experts, 8, k) == pytest.approx(canonical, rel=1e-12)
    if k >= 2:   # DeepSpeed top-2 and Tutel count the first choice only
        assert deepspeed_top2_loss(r.scores, r.experts) == pytest.approx(
            moe.load_balancing_loss(r.top(1))[0], rel=1e-12)
    mask = np.random.default_rng(k).random(300) < 0.8
    assert hf_loss(z, k, mask) == pytest.approx(k * moe.load_balancing_loss(r, mask=mask)[0],
                                                rel=1e-12)
    # MegaBlocks averages the per-layer losses over L layers
    layers = [moe.route(logits(300, 8, seed=10 + i), k) for i in range(3)]
    per_layer = [moe.load_balancing_loss(x)[0] for x in layers]
    mb = sum(8 / (3 * 300 * k) * (x.counts() * x.scores.mean(0)).sum() for x in layers)
    assert mb == pytest.approx(np.mean(per_layer), rel=1e-12)


# ---- gradients by finite differences ----

@pytest.mark.parametrize("score", SCORES)
def test_micro_and_sequence_gradients(score):
    T, E, k = 12, 5, 2
    z0 = logits(T, E, seed=7, scale=1.5)
    mask = np.array([True, False] * 6)
    for kw in (dict(), dict(mask=mask), dict(scope="sequence", seq_len=4),
               dict(scope="sequence", seq_len=3, mask=mask)):
        f = lambda z: moe.load_balancing_loss(moe.route(z, k, score=score), **kw)[0]
        _, grad = moe.load_balancing_loss(moe.route(z0, k, score=score), **kw)
        assert_grad(grad, f, z0)
        if "mask" in kw:
            assert (grad[~mask] == 0).all()


def test_plain_selection_ignores_bias_and_groups():
    T, E, k = 10, 8, 2
    z0 = logits(T, E, seed=8)
    bias = np.array([0, 0, 0, 0, 5.0, 5.0, 5.0, 5.0])
    routed = moe.route(z0, k, score="sigmoid", bias=bias)
    assert (routed.experts >= 4).all()
    plain_loss, plain_grad = moe.load_balancing_loss(routed, selection="plain")
    unbiased = moe.route(z0, k, score="sigmoid")
    want = moe.load_balancing_loss(unbiased)
    assert plain_loss == want[0]
    assert_same(plain_grad, want[1])
    assert moe.load_balancing_loss(routed)[0] != plain_loss
    f = lambda z: moe.load_balancing_loss(moe.route(z, k, score="sigmoid", bias=bias),
                                          selection="plain")[0]
    assert_grad(plain_grad, f, z0)
    g = moe.route(z0, 4, groups=4, group_k=2)
    assert moe.load_balancing_loss(g, selection="plain")[0] == moe.load_balancing_loss(
        moe.route(z0, 4))[0]


def test_global_gradient_by_finite_differences():
    others = [moe.route(logits(9, 6, seed=s), 2) for s in (1, 2)]
    z0 = logits(7, 6, seed=3)
    mask = np.array([1, 1, 0, 1, 1, 1, 0], bool)

    def loss_at(z, want_grad=False):
        lb = moe.LoadBalancer(6, 2)
        for i, o in enumerate(others):
            lb.accumulate(o, micro_batch=i)
        r = moe.route(z, 2)
        lb.accumulate(r, mask, micro_batch="me")
        out = lb.loss(r, mask, micro_batch="me")
        return out if want_grad else out[0]
    _, grad = loss_at(z0, True)
    assert_grad(grad, loss_at, z0)


# ---- the global-batch buffer ----

def test_workers_mean_global_loss_equals_micro_loss_on_everything():
    W, T, E, k = 4, 64, 8, 2
    zs = [logits(T, E, seed=100 + w, scale=2.0) * (1 + w) for w in range(W)]
    world = FakeWorld(W)

    def worker(rank, allreduce):
        lb = moe.LoadBalancer(E, k, allreduce=allreduce)
        r = moe.route(zs[rank], k)
        lb.accumulate(r)
        return lb.loss(r)
    results = world.run(worker)
    everything = moe.route(np.concatenate(zs), k)
    want_loss, want_grad = moe.load_balancing_loss(everything)
    assert np.mean([l for l, _ in results]) == pytest.approx(want_loss, rel=1e-12)
    # after data-parallel averaging, each worker's gradient is the global one
    np.testing.assert_allclose(np.concatenate([g for _, g in results]) / W, want_grad,
                               rtol=1e-10, atol=1e-15)
    for sent in world.sent:          # only E counts and one token count travel
        assert sent.shape == (E + 1,) and sent.dtype == np.int64


def test_buffer_follows_algorithm_1_over_micro_batches_and_workers():
    W, M, E, k = 2, 3, 6, 2
    zs = [[logits(10 + 5 * m, E, seed=10 * w + m, scale=2.0) for m in range(M)] for w in range(W)]
    world = FakeWorld(W)

    def worker(rank, allreduce):
        lb = moe.LoadBalancer(E, k, allreduce=allreduce)
        seen = []
        for m in range(M):
            r = moe.route(zs[rank][m], k)
            lb.accumulate(r, micro_batch=m)
            seen.append((lb.counts, lb.tokens, lb.loss(r, micro_batch=m)[0], r))
        return seen
    out = world.run(worker)
    for m in range(M):
        counts = sum(moe.route(zs[w][j], k).counts() for w in range(W) for j in range(m + 1))
        tokens = sum(zs[w][j].shape[0] for w in range(W) for j in range(m + 1))
        for w in range(W):
            c, t, loss, r = out[w][m]
            assert c.tolist() == counts.tolist() and t == tokens     # steps 1..m, all workers
            P = r.scores.mean(0)
            assert loss == pytest.approx(E * (counts / (k * tokens) * P).sum(), rel=1e-12)
    every = moe.route(np.concatenate([z for row in zs for z in row]), k)
    np.testing.assert_allclose(counts / (k * tokens), every.counts() / (k * every.num_tokens))


def test_recomputation_does_not_double_count():
    lb = moe.LoadBalancer(5, 2)
    r1, r2 = moe.route(logits(8, 5, seed=1), 2), moe.route(logits(8, 5, seed=2), 2)
    lb.accumulate(r1, micro_batch=0)
    first = lb.loss(r1, micro_batch=0)
    counts = lb.counts
    assert lb.accumulate(r1, micro_batch=0) == 0
    assert lb.counts.tolist() == counts.tolist()
    lb.accumulate(r2, micro_batch=1)
    again = lb.loss(moe.route(logits(8, 5, seed=1), 2), micro_batch=0)    # recomputed forward
    assert again[0] == first[0]
    assert_same(again[1], first[1])
    assert lb.tokens == 16
    # accumulate(r) then loss(r) counts once; loss(r) alone accumulates
    lb.reset()
    assert lb.tokens == 0 and lb.counts.tolist() == [0] * 5
    lb.accumulate(r1)
    lb.loss(r1)
    assert lb.tokens == 8
    lb.loss(r2)
    assert lb.tokens == 16


def test_unequal_and_empty_micro_batches():
    lb = moe.LoadBalancer(4, 1)
    small, big = moe.route(logits(10, 4, seed=1), 1), moe.route(logits(30, 4, seed=2), 1)
    lb.accumulate(small)
    lb.accumulate(big)
    want = (small.counts() + big.counts()) / 40.0      # weighted by tokens, not micro-steps
    np.testing.assert_allclose(lb.fractions, want)
    empty = moe.route(logits(6, 4, seed=3), 1)
    none = np.zeros(6, bool)
    lb.accumulate(empty, none, micro_batch="pad")
    np.testing.assert_allclose(lb.fractions, want)     # unchanged
    loss, grad = lb.loss(empty, micro_batch="pad")
    assert loss == 0.0 and (grad == 0).all()
    assert moe.LoadBalancer(4, 1).loss(moe.route(logits(0, 4), 1))[0] == 0.0
    assert (moe.LoadBalancer(4, 1).fractions == 0).all()


def test_load_balancer_bad_input():
    lb = moe.LoadBalancer(4, 2)
    r = moe.route(logits(5, 4), 2)
    with pytest.raises(ValueError, match="routing: expected E=4, k=2, got E=4, k=1"):
        lb.accumulate(moe.route(logits(5, 4), 1))
    with pytest.raises(TypeError, match="routing: expected a lowband.moe.Routing"):
        lb.loss(np.zeros((5, 4)))
    with pytest.raises(TypeError, match="micro_batch: expected a hashable id"):
        lb.accumulate(r, micro_batch=[1])
    lb.accumulate(r, np.ones(5, bool), micro_batch=1)
    with pytest.raises(ValueError, match="mask: differs from the mask accumulated"):
        lb.loss(r, np.zeros(5, bool), micro_batch=1)
    with pytest.raises(ValueError, match=r"num_experts: expected an int >= 1, got 0"):
        moe.LoadBalancer(0, 1)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 4\], got 5"):
        moe.LoadBalancer(4, 5)
    with pytest.raises(TypeError, match="allreduce: expected None or a callable"):
        moe.LoadBalancer(4, 2, allreduce=3)
    for bad, exc, msg in ((lambda a: a.tolist(), TypeError, "return an ndarray"),
                          (lambda a: a[:2], ValueError, r"result of shape \(5,\)"),
                          (lambda a: a * 1.0, TypeError, "integer result"),
                          (lambda a: -a - 1, ValueError, "negative")):
        with pytest.raises(exc, match=msg):
            moe.LoadBalancer(4, 2, allreduce=bad).accumulate(r)


# ---- z-loss, bias update, capacity ----

def test_z_loss_known_answers():
    assert moe.z_loss(np.array([[1.0, 2.0, 3.0, 0.0]]))[0] == pytest.approx(11.834905, abs=1e-6)
    assert moe.z_loss(np.zeros((3, 4)))[0] == pytest.approx(np.log(4) ** 2, rel=1e-15)
    assert moe.z_loss(np.zeros((0, 4)))[0] == 0.0


@pytest.mark.parametrize("dtype", FLOATS)
def test_z_loss_matches_twin(dtype):
    rng = np.random.default_rng(1)
    for T, E in ((1, 1), (7, 5), (1000, 64), (70001, 4)):
        z = logits(T, E, dtype, seed=T, scale=5.0)
        for mask in (None, rng.random(T) < 0.5):
            valid = T if mask is None else int(mask.sum())
            loss, grad = moe.z_loss(z, mask)
            total, want = ref.moe_z_loss(z, mask, 1.0 / valid if valid else 0.0)
            assert loss == (total / valid if valid else 0.0)
            assert_same(grad, want)


def test_z_loss_gradient_and_threads():
    z0 = logits(6, 5, seed=2, scale=3.0)
    mask = np.array([1, 0, 1, 1, 0, 1], bool)
    for m in (None, mask):
        assert_grad(moe.z_loss(z0, m)[1], lambda z: moe.z_loss(z, m)[0], z0)
    big = logits(30000, 16, np.float32, seed=4)
    base = moe.z_loss(big, threads=1)
    for t in THREADS:
        got = moe.z_loss(big, threads=t)
        assert got[0] == base[0]
        assert_same(got[1], base[1])
    bad = big.copy()
    bad[20000, 3] = np.nan
    with pytest.raises(ValueError, match=f"flat index {20000 * 16 + 3}"):
        moe.z_loss(bad)
    with pytest.raises(TypeError, match="mask: expected a bool array"):
        moe.z_loss(z0, np.ones(6))
    with pytest.raises(ValueError, match="logits: expected a 2-D array"):
        moe.z_loss(z0[0])


def test_bias_update():
    b = moe.bias_update(np.zeros(4), np.array([6, 2, 0, 0]), 1e-3)      # section 6.6
    np.testing.assert_allclose(b, [-0.001, 0, 0.001, 0.001])
    b32 = moe.bias_update(np.ones(3, np.float32), np.array([1, 1, 1], np.uint8), 0.5)
    assert b32.dtype == np.float32 and b32.tolist() == [1, 1, 1]       # sign(0) = 0
    huge = np.array([2 ** 62, 2 ** 62, 2 ** 62 + 3], np.int64)
    assert moe.bias_update(np.zeros(3), huge, 1.0).tolist() == [1.0, 1.0, -1.0]
    with pytest.raises(TypeError, match="counts: expected an integer array"):
        moe.bias_update(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"counts: expected shape \(4,\)"):
        moe.bias_update(np.zeros(4), np.zeros(3, int))
    with pytest.raises(ValueError, match="non-negative"):
        moe.bias_update(np.zeros(2), np.array([1, -1]))
    with pytest.raises(ValueError, match="rate: expected a finite number"):
        moe.bias_update(np.zeros(2), np.array([1, 1]), -1.0)
    with pytest.raises(ValueError, match="bias: expected a 1-D array"):
        moe.bias_update(np.zeros((2, 2)), np.ones((2, 2), int))


def test_capacity():
    assert moe.capacity(8, 4, 2, 1.0) == 4                          # section 6.7: Megatron
    assert moe.capacity(8, 4, 2, 1.0, min_capacity=8) == 8          # DeepSpeed
    assert moe.capacity(10, 4, 1, 1.25) == 4                        # ceil(3.125)
    assert moe.capacity(0, 4, 1, 2.0) == 0
    assert moe.capacity(3, 3, 1, 0.1) == 1
    with pytest.raises(ValueError, match="factor: expected a finite number in"):
        moe.capacity(8, 4, 2, 0.0)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 4\], got 5"):
        moe.capacity(8, 4, 5, 1.0)
    with pytest.raises(TypeError, match="tokens: expected an int"):
        moe.capacity(8.0, 4, 2, 1.0)


def test_balance_is_byte_identical_for_any_thread_count():
    r = moe.route(logits(40000, 64, np.float32, seed=6), 8, score="sigmoid")
    mask = np.random.default_rng(2).random(40000) < 0.9
    for kw in (dict(), dict(mask=mask, scope="sequence", seq_len=2000)):
        base = moe.load_balancing_loss(r, threads=1, **kw)
        for t in THREADS:
            got = moe.load_balancing_loss(r, threads=t, **kw)
            assert got[0] == base[0]
            assert_same(got[1], base[1])


R = moe.route(logits(12, 4), 2)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(scope="global"), ValueError, "scope: expected one of 'micro', 'sequence', got 'global'"),
    (dict(scope="sequence"), TypeError, "seq_len: scope='sequence' needs seq_len"),
    (dict(scope="sequence", seq_len=5), ValueError, "seq_len: the 12 tokens must be whole sequences"),
    (dict(scope="sequence", seq_len=0), ValueError, "seq_len: expected an int >= 1, got 0"),
    (dict(seq_len=4), ValueError, "seq_len: only used with scope='sequence'"),
    (dict(mask=np.ones(12)), TypeError, "mask: expected a bool array .True = valid token., got dtype float64"),
    (dict(mask=np.ones(11, bool)), ValueError, r"mask: expected 12 elements \(one per token\)"),
    (dict(selection="best"), ValueError, "selection: expected one of 'routed', 'plain'"),
    (dict(threads=-1), ValueError, "threads"),
])
def test_load_balancing_loss_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        moe.load_balancing_loss(R, **kwargs)


def test_load_balancing_loss_needs_a_routing_and_valid_ids():
    with pytest.raises(TypeError, match="routing: expected a lowband.moe.Routing, got ndarray"):
        moe.load_balancing_loss(R.scores)
    bad = np.array(R.experts)
    bad[5, 1] = 9
    with pytest.raises(ValueError, match=r"experts: expert id at flat position 11 is outside \[0, 4\)"):
        _core.moe_balance_stats(R.scores, 0, bad, 4, None, 12)
    with pytest.raises(ValueError, match="T a multiple of seg_len"):
        _core.moe_balance_stats(R.scores, 0, R.experts, 4, None, 5)
    with pytest.raises(ValueError, match=r"g of shape"):
        _core.moe_balance_grad(R.scores, 0, np.zeros((2, 4)), 12, None)
    with pytest.raises(TypeError, match="experts: expected an ndarray of dtype int32"):
        _core.moe_balance_stats(None, 0, R.experts.astype(np.int64), 4, None, 12)
