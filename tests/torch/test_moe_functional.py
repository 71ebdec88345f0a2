"""lowband.torch.moe functions: gradcheck in float64, pure-torch twins of
the same math, zero-copy views, bfloat16 logits, the aux-loss attachment."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lowband  # noqa: E402
from lowband import moe as nmoe  # noqa: E402
from lowband.torch import moe  # noqa: E402

T, E = 24, 8


def logits(T=T, E=E, seed=0, dtype=torch.float64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g, dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------- twins ----

def twin_route(z, k, score="softmax", renormalize=None, bias=None, scaling_factor=1.0):
    """Plain torch: the math of lowband.moe.route (no groups)."""
    if renormalize is None:
        renormalize = k > 1
    s = torch.softmax(z, -1) if score == "softmax" else torch.sigmoid(z)
    key = (z if bias is None else s + bias) if score == "softmax" else (
        s if bias is None else s + bias)
    ex = torch.topk(key.detach(), k, dim=-1).indices
    if score == "softmax" and renormalize:
        w = torch.softmax(torch.gather(z, 1, ex), -1)
    else:
        w = torch.gather(s, 1, ex)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ex, w * scaling_factor, s


def twin_lbl(s, ex, score, mask=None, seq_len=None):
    """Canonical loss, plain torch: E * sum f_i P_i, f from counts (no grad)."""
    Tn, En = s.shape
    k = ex.shape[1]
    q = s if score == "softmax" else s / (s.sum(-1, keepdim=True) + 1e-20)
    m = torch.ones(Tn, dtype=torch.bool) if mask is None else mask
    L = Tn if seq_len is None else seq_len
    losses = []
    for a in range(0, Tn, L):
        mm = m[a:a + L]
        n = int(mm.sum())
        if n == 0:
            continue
        c = torch.zeros(En, dtype=s.dtype).index_add_(
            0, ex[a:a + L][mm].reshape(-1), torch.ones(n * k, dtype=s.dtype))
        P = q[a:a + L][mm].sum(0) / n
        losses.append(En * ((c / (k * n)) * P).sum())
    return torch.stack(losses).mean()


def twin_dispatch_combine(x, ex, w, y_fn):
    """Megatron's permute / unpermute: stable argsort, index_select, index_add_."""
    Tn, k = ex.shape
    order = torch.argsort(ex.reshape(-1).long(), stable=True)
    tok = order // k
    tokens = x.index_select(0, tok)
    y = y_fn(tokens)
    out = torch.zeros(Tn, y.shape[1], dtype=y.dtype)
    return out.index_add(0, tok, y * w.reshape(-1)[order, None]), tokens


# ---------------------------------------------------------------- route ----

ROUTE_OPTIONS = [
    dict(k=2),
    dict(k=1),
    dict(k=3, renormalize=False),
    dict(k=2, score="sigmoid"),
    dict(k=2, score="sigmoid", renormalize=True, scaling_factor=2.5),
    dict(k=2, score="sigmoid", bias=True),
    dict(k=2, bias=True, scaling_factor=0.5),
    dict(k=2, groups=4, group_k=2),
]


def _opts(o):
    o = dict(o)
    if o.get("bias") is True:
        o["bias"] = torch.linspace(-0.3, 0.2, E, dtype=torch.float64)
    return o


@pytest.mark.parametrize("opts", ROUTE_OPTIONS, ids=lambda o: ",".join(map(str, o.items())))
def test_route_gradcheck(opts):
    o = _opts(opts)
    k = o.pop("k")
    z = logits()
    cw = torch.linspace(0.5, 2.0, k, dtype=torch.float64)
    cs = torch.linspace(-1, 1, E, dtype=torch.float64)

    def f(z):
        r = moe.route(z, k, **o)
        return (r.weights * cw).sum() + (r.scores * cs).sum() ** 2
    assert torch.autograd.gradcheck(f, (z,))

    def g(z):      # weights only, scores only
        return moe.route(z, k, **o).weights.sin().sum()
    assert torch.autograd.gradcheck(g, (z,))


@pytest.mark.parametrize("opts", [o for o in ROUTE_OPTIONS if "groups" not in o],
                         ids=lambda o: ",".join(map(str, o.items())))
def test_route_matches_torch_twin(opts):
    o = _opts(opts)
    k = o.pop("k")
    z = logits(seed=3)
    z2 = z.detach().clone().requires_grad_(True)
    r = moe.route(z, k, **o)
    ex, w, s = twin_route(z2, k, **o)
    assert torch.equal(r.experts.long(), ex)
    torch.testing.assert_close(r.weights, w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.scores, s, rtol=1e-12, atol=1e-14)
    R = torch.randn(T, k, dtype=torch.float64)
    ((r.weights * R).sum() + r.scores[:, 1].sum()).backward()
    ((w * R).sum() + s[:, 1].sum()).backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)


def test_route_is_numpy_route_zero_copy():
    z = logits(dtype=torch.float32, grad=False)
    r = moe.route(z, 2)
    ref = nmoe.route(z.numpy(), 2)
    assert r.numpy.weights.ctypes.data == r.weights.data_ptr()
    assert r.numpy.scores.ctypes.data == r.scores.data_ptr()
    assert r.numpy._logits.ctypes.data == z.data_ptr()            # logits not copied
    assert np.array_equal(r.experts.numpy(), ref.experts)
    assert r.weights.numpy().tobytes() == ref.weights.tobytes()
    assert torch.equal(r.counts(), torch.from_numpy(ref.counts()))


def test_bfloat16_logits_route_in_float32():
    z = logits(dtype=torch.float32, grad=False).to(torch.bfloat16).requires_grad_(True)
    r = moe.route(z, 2)
    ref = nmoe.route(z.detach().float().numpy(), 2)
    assert r.weights.dtype == torch.float32 and r.scores.dtype == torch.float32
    assert np.array_equal(r.experts.numpy(), ref.experts)
    loss = moe.load_balancing_loss(r) + r.weights[:, 0].sum() + moe.z_loss(z)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    z32 = z.detach().float().requires_grad_(True)
    r32 = moe.route(z32, 2)
    (moe.load_balancing_loss(r32) + r32.weights[:, 0].sum() + moe.z_loss(z32)).backward()
    torch.testing.assert_close(z.grad.float(), z32.grad, rtol=2e-2, atol=4e-3)   # bf16 rounding


def test_route_bad_arguments():
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        moe.route(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="logits: expected a 2-D tensor"):
        moe.route(torch.zeros(3), 1)
    with pytest.raises(TypeError, match="logits: expected a float tensor"):
        moe.route(torch.zeros(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="k"):
        moe.route(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="scaling_factor"):
        moe.route(torch.zeros(2, 3), 1, scaling_factor=0.0)
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        moe.load_balancing_loss(moe.route(torch.zeros(2, 3), 1), mask=torch.ones(2))
    with pytest.raises(TypeError, match="routing: expected a lowband.torch.moe.Routing"):
        moe.load_balancing_loss(nmoe.route(np.zeros((2, 3)), 1))


# --------------------------------------------------------------- losses ----

LOSS_CASES = [
    dict(),
    dict(score="sigmoid"),
    dict(mask=True),
    dict(scope="sequence", seq_len=6),
    dict(scope="sequence", seq_len=8, mask=True, score="sigmoid"),
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda o: ",".join(map(str, o.items())) or "micro")
def test_load_balancing_loss_gradcheck_and_twin(case):
    c = dict(case)
    score = c.pop("score", "softmax")
    mask = None
    if c.pop("mask", False):
        mask = torch.ones(T, dtype=torch.bool)
        mask[[1, 5, 6, 20]] = False
    k = 2
    z = logits(seed=4)

    def f(z):
        return moe.load_balancing_loss(moe.route(z, k, score=score), mask=mask, **c)
    assert torch.autograd.gradcheck(f, (z,))
    loss = f(z)
    loss.backward()
    z2 = z.detach().clone().requires_grad_(True)
    ex, _, s = twin_route(z2, k, score=score)
    want = twin_lbl(s, ex, score, mask, c.get("seq_len"))
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-14)


def test_load_balancing_loss_known_answer():
    # E = 4, k = 1: two tokens with p = [.7, .1, .1, .1] both on expert 0 -> 2.8
    p = torch.tensor([[.7, .1, .1, .1]] * 2, dtype=torch.float64)
    z = p.log().requires_grad_(True)
    loss = moe.load_balancing_loss(moe.route(z, 1))
    assert abs(float(loss.detach()) - 2.8) < 1e-12
    loss.backward()
    # dL/dp = E c / (k T^2) = [2, 0, 0, 0]; dL/dz = p (g - <p, g>)
    torch.testing.assert_close(z.grad[0], torch.tensor([.42, -.14, -.14, -.14],
                                                       dtype=torch.float64))


def test_z_loss_gradcheck_and_twin():
    z = logits(seed=5)
    mask = torch.arange(T) % 3 != 0
    assert torch.autograd.gradcheck(lambda z: moe.z_loss(z, mask), (z,))
    torch.testing.assert_close(moe.z_loss(z, mask),
                               (torch.logsumexp(z[mask], -1) ** 2).mean(), rtol=1e-12, atol=0)
    zz = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    assert abs(float(moe.z_loss(zz)) - 11.834905) < 1e-6


def test_losses_without_grad_are_plain_values():
    z = logits(grad=False)
    r = moe.route(z, 2)
    loss = moe.load_balancing_loss(r)
    assert loss.grad_fn is None and loss.dim() == 0 and loss.dtype == torch.float64


# ------------------------------------------------------- dispatch/combine ----

DISPATCH_CASES = [
    dict(),
    dict(capacity=4),
    dict(capacity=4, drop="position"),
    dict(capacity=3, pad_to_capacity=True),
    dict(mask=True),
    dict(capacity=0),
]


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=lambda o: ",".join(map(str, o.items())) or "dropless")
def test_dispatch_combine_gradcheck(case):
    c = dict(case)
    if c.pop("mask", False):
        c["mask"] = torch.arange(T) % 4 != 1
    H = 5
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    z = logits(seed=8)

    def f(x, z):
        r = moe.route(z, 2)
        plan = moe.dispatch(x, r, **c)
        scale = torch.linspace(0.5, 2, plan.tokens.shape[0], dtype=torch.float64)[:, None]
        return plan.combine(torch.tanh(plan.tokens) * scale)
    assert torch.autograd.gradcheck(f, (x, z))


def test_dispatch_combine_match_index_select_twin():
    H = 7
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    z = logits(seed=9)
    r = moe.route(z, 3)
    plan = moe.dispatch(x, r)
    W1 = torch.randn(H, H, dtype=torch.float64)
    out = plan.combine(plan.tokens @ W1)
    R = torch.randn(T, H, dtype=torch.float64)
    (out * R).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    z2 = z.detach().clone().requires_grad_(True)
    ex, w, _ = twin_route(z2, 3)
    want, tokens = twin_dispatch_combine(x2, ex, w, lambda t: t @ W1)
    (want * R).sum().backward()
    assert torch.equal(plan.tokens, tokens)
    assert torch.equal(plan.offsets, torch.cat([torch.zeros(1, dtype=torch.int64),
                                                torch.bincount(ex.reshape(-1), minlength=E)
                                                .cumsum(0)]))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-10, atol=1e-12)


def test_capacity_and_padding_layout():
    x = torch.arange(T, dtype=torch.float64)[:, None].repeat(1, 3)
    r = moe.route(logits(seed=10, grad=False), 2)
    plan = moe.dispatch(x, r, capacity=2, drop="position")
    ref = nmoe.dispatch(x.numpy(), r.numpy, 2, "position")
    assert torch.equal(plan.tokens, torch.from_numpy(ref.tokens))
    assert torch.equal(plan.position, torch.from_numpy(ref.position))
    padded = moe.dispatch(x, r, capacity=2, drop="position", pad_to_capacity=True)
    assert padded.tokens.shape == (E * 2, 3)
    assert torch.equal(padded.offsets, torch.arange(E + 1) * 2)
    view = padded.tokens.view(E, 2, 3)
    for e in range(E):
        n = int(plan.counts[e])
        assert torch.equal(view[e, :n], plan.expert_tokens(e))
        assert not view[e, n:].any()
    y = torch.randn(E * 2, 3, dtype=torch.float64)
    real = y.view(E, 2, 3)
    compact = torch.cat([real[e, :int(plan.counts[e])] for e in range(E)])
    torch.testing.assert_close(padded.combine(y), plan.combine(compact), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pad_to_capacity: needs a capacity"):
        moe.dispatch(x, r, pad_to_capacity=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_hidden_states_take_the_native_path(dtype):
    x = torch.randn(T, 4, dtype=torch.float32).to(dtype).float()     # exact in dtype
    z = logits(seed=11, dtype=torch.float32)
    r = moe.route(z, 2)
    plan = moe.dispatch(x.to(dtype).requires_grad_(True), r, capacity=5)
    ref = moe.dispatch(x.requires_grad_(True), r, capacity=5)
    assert torch.equal(plan.tokens.float(), ref.tokens)
    out = plan.combine(plan.tokens * 2)
    want = ref.combine(ref.tokens * 2)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_dispatch_is_zero_copy_on_input():
    x = torch.randn(T, 4)
    r = moe.route(logits(dtype=torch.float32, grad=False), 2)
    plan = moe.dispatch(x, r)
    assert plan._plan.native is False
    assert torch.equal(plan.tokens, x[plan.rows // 2])


# ------------------------------------------------------ sinkhorn, attach ----

def megatron_sinkhorn(cost, tol=1e-4):
    """Megatron-Core moe_utils.sinkhorn, verbatim in torch (plus an
    iteration cap)."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps = 0.00000001
    error = 1e9
    d1_old = d1
    for _ in range(10000):
        if error <= tol:
            break
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


def test_sinkhorn_matches_megatron_and_balances():
    z = logits(T=64, E=4, seed=12, grad=False) * 0.5
    z[:, 0] += 2.0                                 # a popular expert
    ours, theirs = moe.sinkhorn(z, tol=1e-7), megatron_sinkhorn(z, tol=1e-7)
    torch.testing.assert_close(ours / ours.sum(), theirs / theirs.sum(), rtol=1e-4, atol=1e-9)
    zz = z.clone().requires_grad_(True)
    r = moe.sinkhorn_route(zz, 1)
    plain = moe.sinkhorn_route(zz, 1, balanced=False)
    assert int(plain.counts()[0]) > 40             # top-1 of the scores: all on expert 0
    assert int(r.counts().max()) <= 20             # balanced: about 64 / 4 each
    assert torch.equal(r.experts.long()[:, 0], torch.argmax(ours, -1))
    torch.testing.assert_close(r.weights[:, 0], torch.sigmoid(z)[torch.arange(64),
                                                                  r.experts.long()[:, 0]])
    r.weights.sum().backward()
    assert zz.grad.abs().sum() > 0
    r2 = moe.sinkhorn_route(logits(seed=13), 2)
    assert r2.score == "softmax" and not r2.numpy.renormalize
    assert torch.autograd.gradcheck(
        lambda z: moe.load_balancing_loss(moe.sinkhorn_route(z, 2)) +
        moe.sinkhorn_route(z, 2).weights.sum(), (logits(seed=13),))


def test_attach_aux_loss_identity_and_gradient():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z = logits(seed=14)
    aux = moe.load_balancing_loss(moe.route(z, 2))
    for scale in (1.0, 0.25):
        x.grad = z.grad = None
        y = moe.attach_aux_loss(x * 2, aux, scale=scale)
        assert torch.equal(y, x * 2)
        (y.sum()).backward(retain_graph=True)
        z_ref = z.detach().clone().requires_grad_(True)
        (scale * moe.load_balancing_loss(moe.route(z_ref, 2))).backward()
        torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-14, atol=0)
        torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    with pytest.raises(ValueError, match="scale"):
        moe.attach_aux_loss(x, aux, float("nan"))


def test_every_isa_path_gives_the_same_bytes(isa):
    z = logits(T=300, E=16, seed=15, dtype=torch.float32)
    r = moe.route(z, 4)
    loss = moe.load_balancing_loss(r)
    loss.backward()
    lowband._core.set_isa(None)
    z2 = z.detach().clone().requires_grad_(True)
    r2 = moe.route(z2, 4)
    loss2 = moe.load_balancing_loss(r2)
    loss2.backward()
    assert torch.equal(r.weights, r2.weights) and float(loss.detach()) == float(loss2.detach())
    assert torch.equal(z.grad, z2.grad)


def megatron_group_limited_topk(scores, topk, num_groups, group_topk):
    """Megatron-Core moe_utils.group_limited_topk (sorted group indices)."""
    Tn, En = scores.shape
    group_scores = scores.view(Tn, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=group_topk, dim=-1)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(Tn, num_groups, En // num_groups).reshape(Tn, -1)
    masked = scores.masked_fill(~score_mask.bool(), float("-inf"))
    return torch.topk(masked, k=topk, dim=-1)


def test_group_by_logits_is_megatrons_softmax_grouping():
    # group A logits [2, 2] (sum 4), group B [4.5, -1] (sum 3.5, but far more probability)
    z = torch.tensor([[2.0, 2.0, 4.5, -1.0]], dtype=torch.float64)
    by_scores = moe.route(z, 2, groups=2, group_k=1)
    by_logits = moe.route(z, 2, groups=2, group_k=1, group_by="logits")
    assert sorted(by_scores.experts[0].tolist()) == [2, 3]
    assert sorted(by_logits.experts[0].tolist()) == [0, 1]
    assert nmoe.route(z.numpy(), 2, groups=2, group_k=1, group_by="logits").experts.tolist() \
        == by_logits.experts.tolist()
    zz = logits(T=40, E=8, seed=16)
    r = moe.route(zz, 4, groups=4, group_k=2, group_by="logits")
    vals, idx = megatron_group_limited_topk(zz.detach(), 4, 4, 2)
    assert torch.equal(r.experts.long().sort(-1).values, idx.sort(-1).values)
    torch.testing.assert_close(r.weights.sort(-1).values, torch.softmax(vals, -1).sort(-1).values)
    assert torch.autograd.gradcheck(
        lambda z: (moe.route(z, 4, groups=4, group_k=2, group_by="logits").weights ** 2).sum()
        + moe.load_balancing_loss(moe.route(z, 4, groups=4, group_k=2, group_by="logits",
                                            renormalize=False)), (zz,))
    with pytest.raises(ValueError, match="group_by"):
        moe.route(zz, 4, groups=4, group_k=2, group_by="logits", score="sigmoid")
    with pytest.raises(ValueError, match="group_by"):
        moe.route(zz, 4, groups=4, group_k=2, group_by="probs")


def test_custom_ops_pass_opcheck_and_gradcheck():
    from lowband.torch._moe_functional import (moe_combine, moe_combine_dot, moe_scatter,
                                               moe_z_loss)
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    r = moe.route(logits(seed=17, grad=False), 2)
    plan = moe.dispatch(x, r, capacity=4)
    pos, n = plan.position, plan.tokens.shape[0]
    w = r.weights.detach().clone().requires_grad_(True)
    y = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(moe_scatter, (x, pos, n, None, None))
    torch.library.opcheck(moe_scatter, (x, pos, n, w, None))
    torch.library.opcheck(moe_combine, (y, pos, w, None))
    torch.library.opcheck(moe_combine, (y, pos, None, 1))
    torch.library.opcheck(moe_combine_dot, (torch.randn(T, 5, dtype=torch.float64),
                                            y.detach(), pos, None))
    torch.library.opcheck(moe_z_loss, (logits(seed=18), torch.arange(T) % 3 > 0, None))
    assert torch.autograd.gradcheck(lambda x, w: moe_scatter(x, pos, n, w, None), (x, w))
    assert torch.autograd.gradcheck(lambda y, w: moe_combine(y, pos, w, None), (y, w))


def test_fused_combine_backward_is_the_two_ops():
    """combine's backward with both gradients runs lowband::moe_combine_grad
    (one pass over the gradient); it must give the bytes of moe_scatter and
    moe_combine_dot, which still run under create_graph (double backward)."""
    from lowband.torch._moe_functional import (moe_combine, moe_combine_dot, moe_combine_grad,
                                               moe_scatter)
    for dtype, cap in ((torch.float32, None), (torch.float64, 4)):
        r = moe.route(logits(seed=19, grad=False), 2)
        x = torch.randn(T, 7, dtype=dtype)
        plan = moe.dispatch(x, r, capacity=cap)
        pos, n = plan.position, plan.tokens.shape[0]
        y = torch.randn(n, 7, dtype=dtype)
        w = r.weights.detach().to(dtype)
        g = torch.randn(T, 7, dtype=dtype)
        gy, gw = moe_combine_grad(g, y, pos, w, None)
        assert torch.equal(gy, moe_scatter(g, pos, n, w, None))
        assert torch.equal(gw, moe_combine_dot(g, y, pos, None))
        torch.library.opcheck(moe_combine_grad, (g, y, pos, w, None))
        yl, wl = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
        moe_combine(yl, pos, wl, None).backward(g)
        assert torch.equal(yl.grad, gy) and torch.equal(wl.grad, gw)
        y2, w2 = y.clone().requires_grad_(True), w.clone().requires_grad_(True)
        gy2, gw2 = torch.autograd.grad(moe_combine(y2, pos, w2, None), (y2, w2), g,
                                       create_graph=True)
        assert torch.equal(gy2.detach(), gy) and torch.equal(gw2.detach(), gw)
        assert gy2.requires_grad      # the differentiable path ran
    yd = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda y: moe_combine(y, pos, w, None), (yd,))


def test_without_custom_op_the_same_formulas_run_as_autograd_functions():
    """torch < 2.4 has no torch.library.custom_op: the fallback must give
    the same values and gradients (checked here by hiding custom_op)."""
    import subprocess
    import sys
    code = """
import torch
del torch.library.custom_op
from lowband.torch import moe
from lowband.torch import _moe_functional as f
assert not f._HAS_CUSTOM_OP
z = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
def fn(x, z):
    r = moe.route(z, 2)
    plan = moe.dispatch(x, r, capacity=5)
    return plan.combine(plan.tokens.sin()).sum() + moe.z_loss(z)
assert torch.autograd.gradcheck(fn, (x, z))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
