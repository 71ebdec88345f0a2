"""Benchmark suite: MoE routing + load-balancing loss, dispatch + combine.

Targets (issue 5, 2 threads): softmax + top-k + counts + loss and gradient
for T = 65536, E = 64, k = 2 and 8 at least 5x faster than torch;
dispatch + combine for T = 65536, H = 1024, E = 64, k = 2 at least 3x
faster than torch's index_select / index_add_ and within 2x of copying x
k times.  Every implementation does the same work on the same data.  The
copy writes into preallocated arrays; "out=" rows do the same for lowband
(fresh 512 MB outputs cost page faults that no copy pays).
"""
import numpy as np

from lowband import moe
from lowband.bench.harness import Case


def _numpy_route_lbl(z, k):
    """Softmax, top-k (argpartition), renormalised weights, counts, the
    canonical loss and its gradient with respect to the logits."""
    T, E = z.shape
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argpartition(-z, k - 1, axis=1)[:, :k]
    zs = np.take_along_axis(z, idx, axis=1)
    w = np.exp(zs - zs.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    counts = np.bincount(idx.reshape(-1), minlength=E)
    f = counts / (T * k)
    loss = E * float((f * p.mean(axis=0)).sum())
    g = (E * f / T).astype(z.dtype)
    grad = p * (g - (p * g).sum(axis=1, keepdims=True))
    return w, loss, grad


def _torch_route_lbl(torch, z, k):
    T, E = z.shape
    p = torch.softmax(z, dim=-1)
    zs, idx = torch.topk(z, k, dim=-1)
    w = torch.softmax(zs, dim=-1)
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    f = counts.double() / (T * k)
    loss = E * float((f * p.mean(dim=0).double()).sum())
    g = (E * f / T).float()
    grad = p * (g - (p * g).sum(dim=-1, keepdim=True))
    return w, loss, grad


def _lowband_route_lbl(z, k):
    r = moe.route(z, k)
    return r.weights, *moe.load_balancing_loss(r)


def _numpy_dispatch_combine(x, experts, weights):
    """Stable argsort by expert, gather, and combine through the inverse map."""
    T, k = experts.shape
    order = np.argsort(experts.reshape(-1), kind="stable")
    tokens = x[order // k]
    pos = np.empty(T * k, np.int64)
    pos[order] = np.arange(T * k)
    pos = pos.reshape(T, k)
    out = weights[:, 0, None] * tokens[pos[:, 0]]
    for s in range(1, k):
        out += weights[:, s, None] * tokens[pos[:, s]]
    return out


def _torch_dispatch_combine(torch, x, experts, weights):
    """Megatron's permute (stable argsort, index_select) and unpermute
    (multiply by the probs, index_add_: its deterministic mode)."""
    T, k = experts.shape
    order = torch.argsort(experts.reshape(-1), stable=True)
    tok = order // k
    tokens = x.index_select(0, tok)
    out = torch.zeros_like(x)
    out.index_add_(0, tok, tokens * weights.reshape(-1)[order, None])
    return out


def cases(ctx):
    torch = ctx.torch
    out = []
    T, E = max(256, min(65536, ctx.size // 256)), 64  # 65536 at the default 16 Mi
    z = ctx.rng.standard_normal((T, E), dtype=np.float32)
    tz = torch.from_numpy(z) if torch else None
    for k in (2, 8):
        out.append(Case(
            f"route+lbl T={T} E={E} k={k}", lambda k=k: _lowband_route_lbl(z, k),
            {"numpy": lambda k=k: _numpy_route_lbl(z, k),
             "torch": (lambda k=k: _torch_route_lbl(torch, tz, k)) if torch else None},
            z.nbytes, ctx.copier(z), {"torch": 5},
            note="softmax + top-k + counts + loss + grad"))
    H, k = 1024, 2
    x = ctx.rng.standard_normal((T, H), dtype=np.float32)
    r = moe.route(z, k)
    xs = [np.empty_like(x) for _ in range(k)]

    def copy_k():
        for dst in xs:
            np.copyto(dst, x)

    def lowband_dc():
        plan = moe.dispatch(x, r)
        return plan.combine(plan.tokens)

    buf = np.empty((T * k, H), np.float32)
    out_buf = np.empty_like(x)

    def lowband_dc_out():
        plan = moe.dispatch(x, r, out=buf)
        return plan.combine(plan.tokens, out=out_buf)

    tx = torch.from_numpy(x) if torch else None
    te = torch.from_numpy(r.experts.astype(np.int64)) if torch else None
    tw = torch.from_numpy(r.weights) if torch else None
    out.append(Case(
        f"dispatch+combine T={T} H={H} E={E} k={k}", lowband_dc,
        {"numpy": lambda: _numpy_dispatch_combine(x, r.experts, r.weights),
         "torch": (lambda: _torch_dispatch_combine(torch, tx, te, tw)) if torch else None},
        x.nbytes, copy_k, {"torch": 3, "copy": 2}, note="copy = x copied k times"))
    out.append(Case(
        f"dispatch+combine out= H={H} k={k}", lowband_dc_out,
        {"numpy": lambda: _numpy_dispatch_combine(x, r.experts, r.weights),
         "torch": (lambda: _torch_dispatch_combine(torch, tx, te, tw)) if torch else None},
        x.nbytes, copy_k, {"torch": 3, "copy": 2},
        note="lowband into reused buffers, like the copy"))
    if ctx.quick:
        return out
    plan = moe.dispatch(x, r)
    y = plan.tokens
    g = np.ones_like(x)

    def torch_backward():
        order = torch.argsort(te.reshape(-1), stable=True)
        tok = order // k
        ty = torch.from_numpy(y)
        gy = tx.index_select(0, tok) * tw.reshape(-1)[order, None]      # grad of expert_out
        gw = (tx.index_select(0, tok) * ty).sum(-1)                     # grad of weights
        gx = torch.zeros_like(tx).index_add_(0, tok, ty)                # grad of x
        return gy, gw, gx

    def lowband_backward():
        gy, gw = plan.combine_backward(g, y)
        return gy, gw, plan.dispatch_backward(y)

    out.append(Case(f"dispatch+combine backward H={H}", lowband_backward,
                    {"torch": torch_backward if torch else None}, x.nbytes, copy_k,
                    note="copy = x copied k times"))
    out.append(Case(
        f"z_loss T={T} E={E}", lambda: moe.z_loss(z),
        {"numpy": lambda: (np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)) ** 2,
         "torch": (lambda: torch.logsumexp(tz, dim=-1).square().mean()) if torch else None},
        z.nbytes, ctx.copier(z), note="loss + grad (lowband); loss only (others)"))
    return out
