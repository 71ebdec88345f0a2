"""Benchmark suite: ``lowband.torch.moe`` forward + backward against plain
torch autograd doing the same math.

Targets (2 threads): route + load-balancing loss, forward and backward to
the logits, at T = 65536, E = 64, k = 2 and 8 at least 5x the plain torch
version (softmax, topk, renormalised softmax of the top-k, bincount, the
canonical loss; autograd); dispatch + combine, forward and backward to x
and the routing weights, at H = 1024 at least 3x torch's index_select /
index_add_ (Megatron's permute / unpermute).  "+w" cases also push a
gradient through the routing weights.  Runs only when torch is installed.
"""
import importlib.util

import numpy as np

from .harness import Case

RUN_BY_DEFAULT = importlib.util.find_spec("torch") is not None


def cases(ctx):
    torch = ctx.torch
    if torch is None:
        return []
    from lowband.torch import moe

    out = []
    T, E = max(256, min(65536, ctx.size // 256)), 64   # 65536 at the default 16 Mi
    z0 = torch.from_numpy(ctx.rng.standard_normal((T, E), dtype=np.float32))

    def lowband_route(k, through_weights):
        def run():
            z = z0.detach().requires_grad_(True)
            r = moe.route(z, k)
            loss = moe.load_balancing_loss(r)
            if through_weights:
                loss = loss + r.weights[:, 0].sum()
            loss.backward()
            return z.grad
        return run

    def torch_route(k, through_weights):
        def run():
            z = z0.detach().requires_grad_(True)
            p = torch.softmax(z, dim=-1)
            zs, idx = torch.topk(z, k, dim=-1)
            w = torch.softmax(zs, dim=-1)
            counts = torch.bincount(idx.reshape(-1), minlength=E)
            f = counts.to(p.dtype) / (T * k)
            loss = E * (f * p.mean(dim=0)).sum()
            if through_weights:
                loss = loss + w[:, 0].sum()
            loss.backward()
            return z.grad
        return run

    for k in (2, 8):
        for tw in ((False, True) if not ctx.quick else (False,)):
            out.append(Case(
                f"route+lbl fwd+bwd{' +w' if tw else ''} E={E} k={k}", lowband_route(k, tw),
                {"torch": torch_route(k, tw)}, z0.numel() * 4, ctx.copier(z0.numpy()),
                {"torch": 5}, note=f"T={T}; autograd to the logits"))

    H, k = 1024, 2
    x0 = torch.from_numpy(ctx.rng.standard_normal((T, H), dtype=np.float32))
    r = moe.route(z0, k)
    g = torch.ones(T, H)
    experts = r.experts.long()
    w0 = r.weights.detach()

    def lowband_dc():
        x = x0.detach().requires_grad_(True)
        r.weights = w0.detach().requires_grad_(True)
        plan = moe.dispatch(x, r)
        plan.combine(plan.tokens).backward(g)
        return x.grad, r.weights.grad

    def torch_dc():
        x = x0.detach().requires_grad_(True)
        w = w0.detach().requires_grad_(True)
        order = torch.argsort(experts.reshape(-1), stable=True)
        tok = order // k
        tokens = x.index_select(0, tok)
        y = torch.zeros(T, H).index_add(0, tok, tokens * w.reshape(-1)[order, None])
        y.backward(g)
        return x.grad, w.grad

    xs = [np.empty_like(x0.numpy()) for _ in range(k)]

    def copy_k():
        for dst in xs:
            np.copyto(dst, x0.numpy())

    out.append(Case(f"dispatch+combine fwd+bwd H={H} k={k}", lowband_dc, {"torch": torch_dc},
                    x0.numel() * 4, copy_k, {"torch": 3},
                    note=f"T={T}; grads of x and weights; copy = x copied k times"))
    return out
