"""lowband.torch.moe.MoE and ChainOfExperts: the NumPy layers as twins,
SwiGLU against a per-token torch loop, training-loop behaviour (eval,
gradient accumulation, activation checkpointing)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowband import moe as nmoe  # noqa: E402
from lowband.torch import moe  # noqa: E402

H, F, E, T = 6, 5, 4, 12


def copy_from_numpy(t, n):
    P = n.params
    with torch.no_grad():
        for i, w in enumerate(t.routers):
            w.copy_(torch.from_numpy(P["router"][i].T))
        for a in ("w1", "b1", "w2", "b2"):
            getattr(t.experts, a).copy_(torch.from_numpy(P[a]))
            if t.shared is not None:
                getattr(t.shared.inner, a).copy_(torch.from_numpy(P["shared_" + a])[None])


@pytest.mark.parametrize("kind", ["moe", "coe"])
@pytest.mark.parametrize("kw", [
    dict(aux_coef=0.1, z_coef=0.01, shared_expert=True, capacity_factor=1.0),
    dict(aux_scope="global", score="sigmoid", activation="silu", mask=True),
    dict(aux_scope="sequence", seq_len=4, drop="position", capacity_factor=1.0),
], ids=["micro-shared-capacity", "global-sigmoid-mask", "sequence-position"])
def test_layers_equal_the_numpy_layers(kind, kw):
    kw = dict(kw, activation=kw.get("activation", "relu"))
    mask = None
    if kw.pop("mask", False):
        mask = np.arange(T) % 5 != 2
    if kind == "moe":
        n = nmoe.MoELayer(H, F, E, 2, seed=1, **kw)
        t = moe.MoE(H, F, E, 2, bias=True, dtype=torch.float64, **kw)
    else:
        n = nmoe.ChainOfExperts(H, F, E, 2, 2, seed=1, **kw)
        t = moe.ChainOfExperts(H, F, E, 2, iterations=2, bias=True, dtype=torch.float64, **kw)
    copy_from_numpy(t, n)
    x = np.random.default_rng(0).standard_normal((T, H))
    R = np.random.default_rng(1).standard_normal((T, H))
    out = n.forward(x, mask, micro_batch=0)
    n.zero_grad()
    gx = n.backward(R)
    xt = torch.tensor(x, requires_grad=True)
    y = t(xt, None if mask is None else torch.from_numpy(mask), micro_batch=0)
    (y * torch.from_numpy(R)).sum().backward()
    np.testing.assert_allclose(y.detach().numpy(), out, rtol=1e-12, atol=1e-13)
    assert abs(float(t.aux_loss) - n.aux_loss) <= 1e-12 * n.aux_loss
    np.testing.assert_allclose(xt.grad.numpy(), gx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(torch.stack([w.grad.T for w in t.routers]).numpy(),
                               n.grads["router"], rtol=1e-10, atol=1e-12)
    for a in ("w1", "b1", "w2", "b2"):
        np.testing.assert_allclose(getattr(t.experts, a).grad.numpy(), n.grads[a], rtol=1e-10,
                                   atol=1e-12)


def swiglu_twin(layer, x, i):
    """Per token: sum over its experts of weight * w2 (silu(x w1) * x w3),
    plus the shared expert; routing from torch's softmax and top-k."""
    e = layer.experts
    logits = x @ layer.routers[i].t()
    p = torch.softmax(logits, -1)
    top = torch.topk(logits.detach(), layer.k, -1).indices
    w = torch.gather(p, 1, top)
    out = []
    for t in range(x.shape[0]):
        acc = layer.shared(x[t:t + 1])[0] if layer.shared is not None else 0
        for s in range(layer.k):
            j = int(top[t, s])
            h = torch.nn.functional.silu(x[t] @ e.w1[j]) * (x[t] @ e.w3[j])
            acc = acc + w[t, s] * (h @ e.w2[j])
        out.append(acc)
    return torch.stack(out)


def test_swiglu_chain_matches_a_per_token_loop():
    torch.manual_seed(0)
    layer = moe.ChainOfExperts(H, F, E, 2, iterations=2, shared_expert=3, aux_coef=0.0,
                               dtype=torch.float64)
    assert layer.activation == "swiglu" and layer.renormalize is False
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (y.sin().sum()).backward()
    got = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    h = x2
    for i in range(2):        # the twin, with router i
        h = swiglu_twin(layer, h, i) + h
    torch.testing.assert_close(y, h, rtol=1e-12, atol=1e-13)
    h.sin().sum().backward()
    want = [p.grad for p in layer.parameters()] + [x2.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_padding_to_capacity_changes_nothing_but_shapes():
    torch.manual_seed(1)
    a = moe.MoE(H, F, E, 2, capacity_factor=1.0, dtype=torch.float64)
    b = moe.MoE(H, F, E, 2, capacity_factor=1.0, pad_to_capacity=True, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(T, H, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), rtol=1e-13, atol=1e-14)


def test_eval_forwards_do_not_touch_the_balancer():
    torch.manual_seed(2)
    layer = moe.MoE(H, F, E, 2, aux_scope="global", dtype=torch.float64)
    x = torch.randn(2, 6, H, dtype=torch.float64)           # [batch, seq, hidden]
    y = layer(x)
    assert y.shape == x.shape and layer.aux_loss is not None
    bal = layer.balancers[0]
    assert bal.tokens == 12
    layer.eval()
    with torch.no_grad():
        y_eval = layer(torch.randn(3, H, dtype=torch.float64))
    assert bal.tokens == 12 and layer.aux_loss is None and y_eval.shape == (3, H)
    torch.testing.assert_close(layer(x), y.detach())


def test_gradient_accumulation_and_reset_on_step():
    torch.manual_seed(3)
    layer = moe.MoE(H, F, E, 2, aux_scope="global", aux_scale=0.5, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    bal = layer.balancers[0]
    bal.reset_on_step(opt)
    xs = [torch.randn(T, H, dtype=torch.float64) for _ in range(2)]
    for i, x in enumerate(xs):
        (layer(x, micro_batch=i).sum() * 0.5).backward()
    acc = layer.routers[0].grad.clone()
    assert bal.tokens == 2 * T
    opt.step()
    assert bal.tokens == 0                                   # reset by the step hook
    # the next step sees only its own micro-batches: the same data give the
    # same accumulated gradient (without the reset f would mix in step 1)
    layer.zero_grad()
    for i, x in enumerate(xs):
        (layer(x, micro_batch=i).sum() * 0.5).backward()
    torch.testing.assert_close(layer.routers[0].grad, acc, rtol=1e-13, atol=1e-15)
    layer.zero_grad()
    for i, x in enumerate(xs):
        (layer(x, micro_batch=i + 2).sum() * 0.5).backward()
    assert not torch.allclose(layer.routers[0].grad, acc)    # a step that was not reset


def test_activation_checkpointing_counts_once():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(4)
    layer = moe.ChainOfExperts(H, F, E, 2, iterations=2, aux_scope="global", dtype=torch.float64)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    y = checkpoint(lambda v: layer(v, micro_batch=0), x, use_reentrant=False)
    y.sum().backward()
    assert all(b.tokens == T for b in layer.balancers)
    g = layer.routers[1].grad.clone()
    layer.reset_balance()
    layer.zero_grad()
    layer(x, micro_batch=0).sum().backward()
    torch.testing.assert_close(layer.routers[1].grad, g, rtol=1e-13, atol=1e-15)
    layer.reset_balance()
    y = checkpoint(layer, x, use_reentrant=False)           # no id: refused, never double counted
    with pytest.raises(RuntimeError, match="micro_batch id"):
        y.sum().backward()


def test_sinkhorn_router_and_group_options_run():
    torch.manual_seed(5)
    layer = moe.MoE(8, F, 8, 2, router="sinkhorn", aux_coef=0.0, dtype=torch.float64)
    x = torch.randn(T, 8, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.routing.numpy.renormalize is False
    g = moe.MoE(8, F, 8, 2, groups=4, group_k=2, scaling_factor=2.0, dtype=torch.float64)
    out = g(x)
    assert out.shape == x.shape and torch.allclose(g.routing.weights.sum(-1),
                                                   torch.full((T,), 2.0, dtype=torch.float64))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="pad_to_capacity"):
        moe.MoE(H, F, E, 2, pad_to_capacity=True)
    with pytest.raises(TypeError, match="seq_len"):
        moe.MoE(H, F, E, 2, aux_scope="sequence")
    with pytest.raises(ValueError, match="activation"):
        moe.MoE(H, F, E, 2, activation="tanh")
    layer = moe.MoE(H, F, E, 2)
    with pytest.raises(ValueError, match="x: expected a last dimension of 6"):
        layer(torch.zeros(3, 5))
    with pytest.raises(TypeError, match="mask: expected a bool tensor"):
        layer(torch.zeros(3, H), torch.ones(3))
