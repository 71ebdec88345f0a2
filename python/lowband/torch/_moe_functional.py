"""Autograd functions on lowband's MoE kernels (the functional half of
``lowband.torch.moe``).

Every function takes and returns torch tensors; CPU float32/float64 tensors
reach the C kernels as zero-copy NumPy views (``detach().contiguous()``),
and the kernels' outputs come back as tensors over the same memory.
bfloat16/float16 logits are routed in float32 (the router precision of
Megatron-Core); hidden states of other dtypes or devices take a torch-native
path with the same semantics.  Gradients are those of ``lowband.moe``:
each function here is the NumPy function of the same name plus its
backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .. import _core
from .. import _moe_core as _np_moe
from .._validate import check_choice, check_finite_number, check_int, check_threads

__all__ = [
    "Routing", "route", "sinkhorn", "sinkhorn_route", "load_balancing_loss", "z_loss",
    "Dispatch", "dispatch", "attach_aux_loss", "capacity",
]

capacity = _np_moe.capacity


# --------------------------------------------------------------------------
# tensors <-> arrays
# --------------------------------------------------------------------------

def _tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _view(t):
    """Zero-copy NumPy view of a CPU float32/float64/int/bool tensor (a copy
    only when it is not contiguous)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def _kernel_dtype(t):
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _logits_view(z, name="logits"):
    z = _tensor(z, name)
    if z.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [tokens, experts], got shape "
                         f"{tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got dtype {z.dtype}")
    if _kernel_dtype(z):
        return _view(z)
    return _view(z.detach().to("cpu", torch.float32))    # bf16/f16 or another device


def _mask_view(mask, T):
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = valid token), got dtype "
                            f"{mask.dtype}")
        mask = _view(mask.to("cpu"))
    return _np_moe._mask(mask, T)


def _back(a, like):
    """A tensor over the array a, on like's device."""
    t = torch.from_numpy(a)
    return t if like.device.type == "cpu" else t.to(like.device)


# --------------------------------------------------------------------------
# C kernels as torch.library custom ops (torch >= 2.4), else autograd.Function
# --------------------------------------------------------------------------

_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")


def _custom_op(name, impl, fake, setup=None, backward=None):
    """``impl`` as the custom op ``name`` (with its fake kernel and
    autograd), or as an autograd.Function with the same formulas."""
    if _HAS_CUSTOM_OP:
        op = torch.library.custom_op(name, mutates_args=(), device_types="cpu")(impl)
        op.register_fake(fake)
        if backward is not None:
            torch.library.register_autograd(name, backward, setup_context=setup)
        return op
    if backward is None:
        return impl

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        return _Fn.apply(*args)
    call.__name__ = call.__qualname__ = impl.__name__
    call.__doc__ = impl.__doc__
    return call


# --------------------------------------------------------------------------
# a precomputed gradient and the aux-loss attachment
# --------------------------------------------------------------------------

class _LazyGrad(torch.autograd.Function):
    """value (0-dim) whose gradient with respect to ``x`` is grad_fn() (an
    ndarray shaped like x, computed by the C kernel in backward: nothing
    for forwards without backward, and a fresh tensor that autograd takes
    over without a copy): backward is grad_out * grad_fn()."""

    @staticmethod
    def forward(ctx, x, value, grad_fn):
        ctx.grad_fn, ctx.like = grad_fn, (x.dtype, x.device)
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        dtype, device = ctx.like
        grad_x = torch.from_numpy(np.ascontiguousarray(ctx.grad_fn())).to(device, dtype)
        if g.device.type == "cpu" and float(g) == 1.0:
            return grad_x, None, None          # the common case: no T x E multiply
        return grad_x.mul_(g.to(dtype)), None, None


def _loss_tensor(x, loss, grad_fn):
    """(loss float, callable giving the gradient ndarray) -> a 0-dim tensor
    with x in its graph."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    value = torch.tensor(loss, dtype=dt, device=x.device)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return value
    return _LazyGrad.apply(x, value, grad_fn)


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, aux, scale):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.aux_meta
        return g, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def attach_aux_loss(x, aux_loss, scale=1.0):
    """Returns x (the identity, same values) with ``aux_loss`` attached: the
    backward of anything computed from the result also gives ``aux_loss``
    the gradient ``scale`` (as if ``scale * aux_loss`` had been added to the
    loss), while the loss you report stays the main loss.

    Megatron-Core's ``MoEAuxLossAutoScaler`` does this with a class-level
    scale that the training loop sets; here it is an argument.  Pass the
    factor you apply to the main loss before backward: 1 for a plain loop,
    ``1 / num_micro_batches`` when you divide each micro-batch's loss by the
    number of micro-batches, times the loss scaler's factor under mixed
    precision.  Use the returned tensor (discarding it attaches nothing).
    """
    x = _tensor(x, "x")
    aux_loss = _tensor(aux_loss, "aux_loss")
    scale = check_finite_number(scale, "scale")
    if not aux_loss.requires_grad:
        return x
    return _AttachAuxLoss.apply(x, aux_loss, float(scale))


# --------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------

class Routing:
    """The result of :func:`route` (tensors).

    ``experts`` int32 [T, k] (no gradient), ``weights`` [T, k] (combine
    weights, times ``scaling_factor``; differentiable with respect to the
    logits), ``scores`` [T, E] (softmax or sigmoid of the logits;
    differentiable), ``logits`` (the input).  float32 logits give float32
    weights and scores, float64 float64, bfloat16/float16 float32.
    ``counts(mask=None)``: int64 [E] picks per expert.  ``numpy`` is the
    :class:`lowband.moe.Routing` over the same memory.
    """

    def __init__(self, numpy_routing, logits, experts, weights, scores, scaling_factor=1.0):
        self.numpy = numpy_routing
        self.logits = logits
        self.experts = experts
        self.weights = weights
        self.scores = scores
        self.scaling_factor = scaling_factor

    @property
    def num_tokens(self):
        return self.numpy.num_tokens

    @property
    def num_experts(self):
        return self.numpy.num_experts

    @property
    def k(self):
        return self.numpy.k

    @property
    def score(self):
        return self.numpy.score

    def counts(self, mask=None):
        """int64 [E]: (token, slot) picks per expert among the valid tokens."""
        return _back(self.numpy.counts(_mask_view(mask, self.num_tokens)), self.logits)

    def __repr__(self):
        return (f"lowband.torch.moe.Routing(T={self.num_tokens}, E={self.num_experts}, "
                f"k={self.k}, score={self.score!r}, renormalize={self.numpy.renormalize}, "
                f"scaling_factor={self.scaling_factor})")


def _weights_backward(r, gw):
    """Gradient [T, E] with respect to the logits of a loss whose gradient
    with respect to the (unscaled) weights is gw [T, k] (Routing.backward of
    lowband.moe, in torch ops)."""
    T, E = r.scores.shape
    ex = torch.from_numpy(r.experts).long()
    w = torch.from_numpy(r.weights)
    gw = gw.to(w.dtype)
    gz = torch.zeros((T, E), dtype=w.dtype)
    if r.score == "softmax":
        dot = (w * gw).sum(dim=1, keepdim=True)
        if r.renormalize:                    # softmax over the selected logits
            gz.scatter_(1, ex, w * (gw - dot))
        else:                                # selected entries of softmax over all E
            p = torch.from_numpy(r.scores)
            torch.mul(p, -dot, out=gz)
            gz.scatter_add_(1, ex, w * gw)
    else:
        s = torch.gather(torch.from_numpy(r.scores), 1, ex)
        if r.renormalize:                    # s / (sum of selected s + 1e-20)
            gs = (gw - (w * gw).sum(dim=1, keepdim=True)) / (s.sum(dim=1, keepdim=True) + 1e-20)
        else:
            gs = gw
        gz.scatter_(1, ex, gs * s * (1 - s))
    return gz


def _scores_backward(r, gs):
    """Gradient with respect to the logits of a loss with gradient gs [T, E]
    with respect to the scores."""
    s = torch.from_numpy(r.scores)
    gs = gs.to(s.dtype)
    if r.score == "softmax":
        return s * (gs - (s * gs).sum(dim=1, keepdim=True))
    return gs * s * (1 - s)


class _RouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, z, k, score, renormalize, bias, groups, group_k, group_by,
                scaling_factor, threads, holder):
        r = _np_moe.route(z, k, score=score, renormalize=renormalize, bias=bias,
                          groups=groups, group_k=group_k, group_by=group_by, threads=threads)
        holder.append(r)
        ctx.r, ctx.sf, ctx.dtype = r, scaling_factor, logits.dtype
        ctx.set_materialize_grads(False)
        w = _back(r.weights, logits)
        if scaling_factor != 1.0:
            w = w * scaling_factor
        experts = _back(r.experts, logits)
        ctx.mark_non_differentiable(experts)
        return w, _back(r.scores, logits), experts

    @staticmethod
    @once_differentiable
    def backward(ctx, gw, gs, _gex):
        r, gz = ctx.r, None
        if gw is not None:
            gz = _weights_backward(r, gw.cpu() * ctx.sf)
        if gs is not None:
            g2 = _scores_backward(r, gs.cpu())
            gz = g2 if gz is None else gz + g2
        if gz is not None:
            gz = gz.to(device=gw.device if gw is not None else gs.device, dtype=ctx.dtype)
        return (gz,) + (None,) * 11


def route(logits, k, *, score="softmax", renormalize=None, bias=None, groups=None,
          group_k=None, group_by="scores", scaling_factor=1.0, threads=None):
    """Routes T tokens to k of E experts (``lowband.moe.route`` with
    gradients): ``logits`` [T, E] float32/float64/bfloat16/float16.

    Options as ``lowband.moe.route``: ``score`` "softmax" (the k largest
    logits; ``renormalize`` None = True for k > 1: softmax over the selected
    logits) or "sigmoid" (DeepSeek-V3; ``renormalize``: divide by the sum of
    the selected scores + 1e-20); ``bias`` [E] chooses but never weighs
    (aux-loss-free balancing; a tensor or array); ``groups``/``group_k``
    group-limited routing (``group_by="logits"``: groups ranked by their
    top logits, as Megatron-Core's softmax without pre-softmax).
    ``scaling_factor`` multiplies the weights
    (Megatron's ``moe_router_topk_scaling_factor``, DeepSeek's
    ``routed_scaling_factor``).  ``weights`` and ``scores`` of the result
    are differentiable with respect to the logits; selection, bias and
    groups are piecewise constant and get no gradient.
    """
    z = _logits_view(logits)
    sf = check_finite_number(scaling_factor, "scaling_factor", lo=0.0, lo_open=True)
    if isinstance(bias, torch.Tensor):
        bias = _view(bias.to("cpu", torch.float64))
    holder = []
    w, s, ex = _RouteFn.apply(logits, z, k, score, renormalize, bias, groups, group_k,
                              group_by, float(sf), check_threads(threads), holder)
    return Routing(holder[0], logits, ex, w, s, float(sf))


def sinkhorn(logits, *, tol=1e-4, max_iters=1000):
    """The Sinkhorn-normalised assignment matrix of Megatron-Core's
    ``sinkhorn`` (BASE-layer style balanced routing): ``d1 * exp(z) * d0``
    with row and column scalings iterated until the mean change of d1 is
    below ``tol``.  Computed in float64 on ``exp(z - max z)`` (the same
    fixed point without overflow); no gradient."""
    z = _tensor(logits, "logits")
    tol = check_finite_number(tol, "tol", lo=0.0, lo_open=True)
    max_iters = check_int(max_iters, "max_iters", 1)
    with torch.no_grad():
        cost = z.detach().double()
        cost = torch.exp(cost - cost.max()) if cost.numel() else cost
        T, E = cost.shape
        d0 = torch.ones(T, dtype=cost.dtype, device=cost.device)
        d1 = torch.ones(E, dtype=cost.dtype, device=cost.device)
        eps = 1e-8
        for _ in range(max_iters):
            d0 = (1.0 / T) / ((d1 * cost).sum(dim=1) + eps)
            d1_new = (1.0 / E) / ((d0[:, None] * cost).sum(dim=0) + eps)
            err = (d1 - d1_new).abs().mean()
            d1 = d1_new
            if err <= tol:
                break
        return d1 * cost * d0[:, None]


def sinkhorn_route(logits, k, *, balanced=True, tol=1e-4, max_iters=1000, scaling_factor=1.0):
    """Megatron-Core's ``sinkhorn`` router: with ``balanced`` (Megatron: in
    training) the experts are the top k of :func:`sinkhorn`'s balanced
    assignment, else of the scores; the weights are the selected scores,
    not renormalised: sigmoid scores for k = 1, softmax for k > 1.  Returns
    a :class:`Routing` (score "sigmoid" or "softmax", renormalize False),
    usable with every function here.  Ties go to torch.topk's choice."""
    z = _tensor(logits, "logits")
    if z.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor, got shape {tuple(z.shape)}")
    E = z.shape[1]
    k = check_int(k, "k", 1, E)
    sf = check_finite_number(scaling_factor, "scaling_factor", lo=0.0, lo_open=True)
    zf = z if _kernel_dtype(z) else z.float()
    score = "sigmoid" if k == 1 else "softmax"
    scores = torch.sigmoid(zf) if k == 1 else torch.softmax(zf, dim=-1)
    with torch.no_grad():
        key = sinkhorn(zf, tol=tol, max_iters=max_iters) if balanced else scores
        experts = torch.topk(key, k, dim=-1).indices
    weights = torch.gather(scores, 1, experts)
    r = _np_moe.Routing.from_arrays(_view(experts.cpu()), _view(weights.cpu()),
                                    _view(scores.cpu()), score=score, renormalize=False)
    ex = torch.from_numpy(r.experts).to(z.device)
    return Routing(r, z, ex, weights * sf if sf != 1.0 else weights, scores, float(sf))


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------

def _routing(routing):
    if not isinstance(routing, Routing):
        raise TypeError(f"routing: expected a lowband.torch.moe.Routing, got "
                        f"{type(routing).__name__}")
    return routing


def load_balancing_loss(routing, *, scope="micro", seq_len=None, mask=None,
                        selection="routed", threads=None):
    """The canonical load-balancing loss ``E * sum_i f_i * P_i`` (f_i =
    c_i / (T k), P_i the mean score; balanced routing gives 1) as a 0-dim
    tensor, differentiable with respect to ``routing.logits`` (through P
    only).  ``scope`` "micro" or "sequence" (with ``seq_len``: the mean of
    per-sequence losses over T / seq_len contiguous sequences), ``mask``
    (True = valid token) and ``selection`` as ``lowband.moe``.  For the
    global batch use :class:`GlobalLoadBalancer`."""
    r = _routing(routing)
    loss, grad_fn = _np_moe._lbl_lazy(r.numpy, scope, seq_len, _mask_view(mask, r.num_tokens),
                                      selection, threads)
    return _loss_tensor(r.logits, loss, grad_fn)


def _moe_z_loss(logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                threads: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean over valid tokens of logsumexp(logits_t)^2 as a 0-dim tensor of
    the logits' dtype, its gradient [T, E])."""
    z = _view(logits)
    loss, grad = _np_moe.z_loss(z, None if mask is None else _view(mask), threads=threads)
    return torch.tensor(loss, dtype=logits.dtype), torch.from_numpy(grad)


def _z_fake(logits, mask=None, threads=None):
    return logits.new_empty(()), torch.empty_like(logits)


def _z_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _z_backward(ctx, g_loss, g_grad):
    grad, = ctx.saved_tensors
    return grad * g_loss, None, None


moe_z_loss = _custom_op("lowband::moe_z_loss", _moe_z_loss, _z_fake, _z_setup, _z_backward)


def z_loss(logits, mask=None, *, threads=None):
    """Router z-loss (ST-MoE): the mean over valid tokens of
    logsumexp(logits_t)^2, a 0-dim tensor differentiable with respect to
    ``logits`` (the ``lowband::moe_z_loss`` op; bfloat16/float16 logits in
    float32, other devices in torch ops)."""
    z = _tensor(logits, "logits")
    _logits_view(z)                                   # argument checks
    m = None
    if mask is not None:
        m = torch.from_numpy(_mask_view(mask, z.shape[0]))
    if z.device.type != "cpu":
        lse = torch.logsumexp(z.float(), dim=-1) ** 2
        return lse.mean() if m is None else lse[m.to(z.device)].mean()
    zk = z if _kernel_dtype(z) else z.float()
    return moe_z_loss(zk, m, check_threads(threads))[0]


# --------------------------------------------------------------------------
# dispatch and combine
# --------------------------------------------------------------------------

# The dispatch / combine kernels as torch.library custom ops (opaque nodes
# under torch.compile, checked with torch.library.opcheck).  position [T, k]
# int64 maps assignment (t, s) to its row, -1 when dropped; the kept rows
# cover [0, n) once.

def _moe_scatter(x: torch.Tensor, position: torch.Tensor, n: int,
                 weights: Optional[torch.Tensor] = None,
                 threads: Optional[int] = None) -> torch.Tensor:
    """[n, H]: row position[t, s] = x[t] (times weights[t, s] when given)."""
    w = None if weights is None else _view(weights)
    return torch.from_numpy(_core.moe_scatter(_view(x), _view(position), n, w, threads))


def _moe_combine(y: torch.Tensor, position: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 threads: Optional[int] = None) -> torch.Tensor:
    """[T, H]: out[t] = sum over kept slots s of weights[t, s] * y[position[t, s]]
    (added in slot order onto zero; one writer per token)."""
    w = None if weights is None else _view(weights)
    return torch.from_numpy(_core.moe_combine(_view(y), _view(position), w, threads))


def _moe_combine_dot(g: torch.Tensor, y: torch.Tensor, position: torch.Tensor,
                     threads: Optional[int] = None) -> torch.Tensor:
    """[T, k]: <g[t], y[position[t, s]]> (0 for dropped slots)."""
    return torch.from_numpy(_core.moe_combine_dot(_view(g), _view(y), _view(position), threads))


def _moe_combine_grad(g: torch.Tensor, y: torch.Tensor, position: torch.Tensor,
                      weights: Optional[torch.Tensor] = None,
                      threads: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(moe_scatter(g, position, y.shape[0], weights), moe_combine_dot(g, y,
    position)), the backward of moe_combine, in one pass over g."""
    w = None if weights is None else _view(weights)
    gy, gw = _core.moe_combine_backward(_view(g), _view(y), _view(position), w, True, True,
                                        threads)
    return torch.from_numpy(gy), torch.from_numpy(gw)


def _scatter_fake(x, position, n, weights=None, threads=None):
    return x.new_empty((n, x.shape[1]))


def _combine_fake(y, position, weights=None, threads=None):
    return y.new_empty((position.shape[0], y.shape[1]))


def _combine_dot_fake(g, y, position, threads=None):
    return y.new_empty(tuple(position.shape))


def _combine_grad_fake(g, y, position, weights=None, threads=None):
    return y.new_empty(tuple(y.shape)), y.new_empty(tuple(position.shape))


def _scatter_setup(ctx, inputs, output):
    x, position, n, weights, threads = inputs
    ctx.threads = threads
    ctx.save_for_backward(x if weights is not None else None, position, weights)


def _scatter_backward(ctx, g):
    x, position, weights = ctx.saved_tensors
    gx = moe_combine(g, position, weights, ctx.threads) if ctx.needs_input_grad[0] else None
    gw = None
    if weights is not None and ctx.needs_input_grad[3]:
        gw = moe_combine_dot(x, g, position, ctx.threads)
    return gx, None, None, gw, None


def _combine_setup(ctx, inputs, output):
    y, position, weights, threads = inputs
    ctx.threads, ctx.n = threads, y.shape[0]
    ctx.save_for_backward(y if weights is not None else None, position, weights)


def _combine_backward(ctx, g):
    y, position, weights = ctx.saved_tensors
    need_y = ctx.needs_input_grad[0]
    need_w = weights is not None and ctx.needs_input_grad[2]
    if need_y and need_w and not torch.is_grad_enabled():
        # both in one pass over g (the fused op has no double backward: under
        # create_graph the two differentiable ops below run instead)
        gy, gw = moe_combine_grad(g, y, position, weights, ctx.threads)
        return gy, None, gw, None
    gy = moe_scatter(g, position, ctx.n, weights, ctx.threads) if need_y else None
    gw = moe_combine_dot(g, y, position, ctx.threads) if need_w else None
    return gy, None, gw, None


moe_combine_dot = _custom_op("lowband::moe_combine_dot", _moe_combine_dot, _combine_dot_fake)
moe_combine_grad = _custom_op("lowband::moe_combine_grad", _moe_combine_grad, _combine_grad_fake)
moe_scatter = _custom_op("lowband::moe_scatter", _moe_scatter, _scatter_fake, _scatter_setup,
                         _scatter_backward)
moe_combine = _custom_op("lowband::moe_combine", _moe_combine, _combine_fake, _combine_setup,
                         _combine_backward)


class _Plan:
    """The dispatch plan arrays (lowband.moe.dispatch's counting sort)."""

    def __init__(self, offsets, rows, position, k, num_tokens, threads, native):
        self.offsets, self.rows, self.position = offsets, rows, position
        self.k, self.num_tokens, self.threads, self.native = k, num_tokens, threads, native
        self._cache = {}

    def _t(self, name, fn, device):
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(np.ascontiguousarray(fn())).to(device)
        return self._cache[key]

    def rows_t(self, device):
        return self._t("rows", lambda: self.rows, device)

    def token_index_t(self, device):
        return self._t("tok", lambda: self.rows // self.k, device)

    def position_t(self):
        return self._t("pos", lambda: self.position, "cpu")

    def scatter(self, x):
        """tokens [n, H] (differentiable)."""
        if self.native:
            return x.index_select(0, self.token_index_t(x.device))
        return moe_scatter(x, self.position_t(), int(self.rows.size), None, self.threads)

    def combine(self, y, weights):
        """[T, H] (differentiable in y and weights); the kernel when y is a
        CPU float32/float64 tensor, else torch's index_add_."""
        w = weights.to(y.dtype)
        if _kernel_dtype(y):
            return moe_combine(y, self.position_t(), w, self.threads)
        wk = w.reshape(-1).index_select(0, self.rows_t(y.device))
        out = y.new_zeros((self.num_tokens, y.shape[1]))
        return out.index_add(0, self.token_index_t(y.device), y * wk[:, None])



class Dispatch:
    """Tokens grouped by expert (from :func:`dispatch`).

    ``tokens`` [N, H] (differentiable with respect to x): expert-major,
    token-ascending copies of x's rows; expert i owns rows
    ``offsets[i]:offsets[i+1]`` (int64 [E+1] tensor; with
    ``pad_to_capacity`` every expert owns ``capacity`` rows, its tokens
    first, then zero rows).  ``counts`` int64 [E]: real rows per expert.
    ``position`` [T, k]: the (unpadded) row of each assignment, -1 if
    dropped.  ``combine(expert_out)`` gives the weighted sum per token,
    differentiable with respect to expert_out and the routing weights.
    """

    def __init__(self, tokens, plan, weights, capacity, padded, dest):
        self.tokens = tokens
        self._plan = plan
        self._weights = weights
        self.capacity = capacity
        self.padded = padded
        self._dest = dest
        E = plan.offsets.size - 1
        self.counts = torch.from_numpy(np.diff(plan.offsets))
        if padded:
            self.offsets = torch.arange(E + 1, dtype=torch.int64) * capacity
        else:
            self.offsets = torch.from_numpy(plan.offsets)
        self.position = torch.from_numpy(plan.position)
        self.rows = torch.from_numpy(plan.rows)

    @property
    def num_experts(self):
        return self.counts.numel()

    @property
    def num_dropped(self):
        return int(self._plan.position.size - self._plan.rows.size)

    def expert_tokens(self, i):
        i = check_int(i, "i", 0, self.num_experts - 1)
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def combine(self, expert_out):
        """[T, H'] with row t = sum over kept slots s of weights[t, s] *
        expert_out[row of (t, s)] (one writer per token, deterministic)."""
        y = _tensor(expert_out, "expert_out")
        if y.dim() != 2 or y.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"expert_out: expected shape ({self.tokens.shape[0]}, H'), got "
                             f"{tuple(y.shape)}")
        if self.padded:
            y = y.index_select(0, self._dest.to(y.device))
        return self._plan.combine(y, self._weights)


def dispatch(x, routing, capacity=None, drop="probs", *, mask=None, pad_to_capacity=False,
             threads=None):
    """Groups the rows of x [T, H] by expert (``lowband.moe.dispatch`` with
    gradients): a stable counting sort, expert-major and token-ascending.

    ``capacity`` None (dropless) or the rows per expert
    (:func:`capacity`); ``drop`` "probs" keeps each expert's largest
    weights, "position" its first tokens; ``mask`` (True = valid) leaves
    padding tokens out; ``pad_to_capacity`` (Megatron's
    ``moe_pad_expert_input_to_capacity``) gives every expert exactly
    ``capacity`` rows (zero rows after its tokens): static shapes
    ``[E * capacity, H]``, ``tokens.view(E, capacity, H)``.
    Returns a :class:`Dispatch`.
    """
    r = _routing(routing)
    x = _tensor(x, "x")
    T, E, k = r.num_tokens, r.num_experts, r.k
    if x.dim() != 2 or x.shape[0] != T:
        raise ValueError(f"x: expected shape ({T}, H), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a float tensor, got dtype {x.dtype}")
    check_choice(drop, "drop", _np_moe._DROPS)
    cap = -1 if capacity is None else check_int(capacity, "capacity", 0, (1 << 62))
    if not isinstance(pad_to_capacity, (bool, np.bool_)):
        raise TypeError(f"pad_to_capacity: expected a bool, got {type(pad_to_capacity).__name__}")
    if pad_to_capacity and capacity is None:
        raise ValueError("pad_to_capacity: needs a capacity, got capacity=None")
    threads = check_threads(threads)
    m = _mask_view(mask, T)
    w_sel = np.ascontiguousarray(r.numpy.weights)        # the drop policy's order
    offsets, rows, position = _core.moe_plan(r.numpy.experts, E, m, cap,
                                             _np_moe._DROPS.index(drop), w_sel, threads)
    native = not _kernel_dtype(x)
    plan = _Plan(offsets, rows, position, k, T, threads, native)
    tokens = plan.scatter(x)
    dest = None
    if pad_to_capacity:
        counts = np.diff(offsets)
        expert_of_row = np.repeat(np.arange(E), counts)
        dest_np = expert_of_row * cap + (np.arange(rows.size) - offsets[:-1][expert_of_row])
        dest = torch.from_numpy(dest_np).to(x.device)
        padded = tokens.new_zeros((E * cap, x.shape[1]))
        tokens = padded.index_copy(0, dest, tokens)
    return Dispatch(tokens, plan, r.weights, None if capacity is None else cap,
                    bool(pad_to_capacity), dest)
