"""NumPy Mixture-of-Experts layers with forward and backward passes.

``MoELayer``: a router, E experts (two-layer MLPs, BLAS through
numpy.matmul on each expert's contiguous rows of the dispatch buffer) and an
optional shared expert; returns the MoE output (add the residual yourself).

``ChainOfExperts``: C iterations over the *same* experts, one router per
iteration, k experts per iteration and the load-balancing loss computed per
iteration (Chain-of-Experts, Wang et al. 2025):
x(0) = x, x(c) = sum_i g_ci E_i(x(c-1)) [+ shared(x(c-1))] [+ x(c-1) with
inner_residual], output x(C) [+ x with outer_residual].  With C = 1 and the
inner residual it equals x + MoELayer(x).

Both keep ``params`` and ``grads`` dicts of arrays (the same keys), so any
optimizer can step them; ``backward`` includes the gradients of the
auxiliary losses (``aux_coef`` * load balancing + ``z_coef`` * z-loss).
"""
from __future__ import annotations

import numpy as np

from . import moe as _moe
from ._validate import check_choice, check_finite_number, check_int, from_torch

_ACTIVATIONS = ("relu", "silu")
_AUX_SCOPES = ("micro", "sequence", "global")


def _act(h, kind):
    if kind == "relu":
        return np.maximum(h, 0)
    return h / (1 + np.exp(-h))


def _act_grad(h, kind):
    if kind == "relu":
        return (h > 0).astype(h.dtype)
    s = 1 / (1 + np.exp(-h))
    return s * (1 + h * (1 - s))


def _mlp(x, w1, b1, w2, b2, kind):
    """(y, h): y = act(x @ w1 + b1) @ w2 + b2, h the pre-activation."""
    h = x @ w1 + b1
    return _act(h, kind) @ w2 + b2, h


def _mlp_backward(x, h, gy, w1, w2, kind):
    """(gx, gw1, gb1, gw2, gb2) of _mlp for the output gradient gy."""
    a = _act(h, kind)
    gh = (gy @ w2.T) * _act_grad(h, kind)
    return gh @ w1.T, x.T @ gh, gh.sum(axis=0), a.T @ gy, gy.sum(axis=0)


class _MoEBase:
    """Parameters, routing steps and expert computation shared by MoELayer
    and ChainOfExperts."""

    def __init__(self, d_model, d_ff, num_experts, k, routers, *, score, renormalize,
                 shared_expert, capacity_factor, drop, aux_coef, aux_scope, seq_len,
                 allreduce, z_coef, activation, seed, dtype):
        H = self.d_model = check_int(d_model, "d_model", 1)
        F = self.d_ff = check_int(d_ff, "d_ff", 1)
        E = self.num_experts = check_int(num_experts, "num_experts", 1)
        self.k = check_int(k, "k", 1, E)
        self.score = check_choice(score, "score", _moe._SCORES)
        self.renormalize = renormalize
        self.activation = check_choice(activation, "activation", _ACTIVATIONS)
        self.capacity_factor = (None if capacity_factor is None else
                                check_finite_number(capacity_factor, "capacity_factor", lo=0.0,
                                                    lo_open=True))
        self.drop = check_choice(drop, "drop", _moe._DROPS)
        self.aux_coef = check_finite_number(aux_coef, "aux_coef", lo=0.0)
        self.z_coef = check_finite_number(z_coef, "z_coef", lo=0.0)
        self.aux_scope = check_choice(aux_scope, "aux_scope", _AUX_SCOPES)
        self.seq_len = None if seq_len is None else check_int(seq_len, "seq_len", 1)
        if self.aux_scope == "sequence" and self.seq_len is None:
            raise TypeError("seq_len: aux_scope='sequence' needs seq_len")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {self.dtype}")
        self.balancers = [_moe.LoadBalancer(E, self.k, allreduce) for _ in range(routers)] \
            if self.aux_scope == "global" else []
        rng = np.random.default_rng(seed)

        def init(shape, fan_in):
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(self.dtype)

        self.params = {
            "router": init((routers, H, E), H),
            "w1": init((E, H, F), H), "b1": np.zeros((E, F), self.dtype),
            "w2": init((E, F, H), F), "b2": np.zeros((E, H), self.dtype),
        }
        self.shared_expert = bool(shared_expert)
        if self.shared_expert:
            self.params.update(shared_w1=init((H, F), H), shared_b1=np.zeros(F, self.dtype),
                               shared_w2=init((F, H), F), shared_b2=np.zeros(H, self.dtype))
        self.grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        self.aux_loss = 0.0

    def reset_balance(self):
        """Empties the global-batch buffers (at each optimizer step)."""
        for b in self.balancers:
            b.reset()

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def _input(self, x):
        x = np.asarray(from_torch(x, "x"))
        if x.dtype != self.dtype:
            raise TypeError(f"x: expected dtype {self.dtype} (the layer's), got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x: expected shape (T, {self.d_model}), got {x.shape}")
        return np.ascontiguousarray(x)

    def _step(self, x, i, k, mask, micro_batch):
        """One routed pass over the experts with router i: returns the
        output and what backward needs; adds the aux losses."""
        P = self.params
        logits = x @ P["router"][i]
        r = _moe.route(logits, k, score=self.score, renormalize=self.renormalize)
        cap = None
        if self.capacity_factor is not None:
            valid = x.shape[0] if mask is None else int(mask.sum())
            cap = _moe.capacity(valid, self.num_experts, k, self.capacity_factor)
        plan = _moe.dispatch(x, r, cap, self.drop, mask=mask)
        y = np.empty((plan.tokens.shape[0], self.d_model), self.dtype)
        h = np.empty((plan.tokens.shape[0], self.d_ff), self.dtype)
        off = plan.offsets
        for e in range(self.num_experts):
            a, b = off[e], off[e + 1]
            if a < b:
                y[a:b], h[a:b] = _mlp(plan.tokens[a:b], P["w1"][e], P["b1"][e], P["w2"][e],
                                      P["b2"][e], self.activation)
        out = plan.combine(y)
        gz = np.zeros_like(logits)
        if self.aux_coef:
            if self.aux_scope == "global":
                bal = self.balancers[i]
                mb = bal.accumulate(r, mask, micro_batch=micro_batch)
                loss, g = bal.loss(r, mask, micro_batch=mb)
            else:
                scope = "micro" if self.aux_scope == "micro" else "sequence"
                loss, g = _moe.load_balancing_loss(
                    r, scope=scope, seq_len=self.seq_len if scope == "sequence" else None,
                    mask=mask)
            self.aux_loss += self.aux_coef * loss
            gz += self.aux_coef * g
        if self.z_coef:
            loss, g = _moe.z_loss(logits, mask)
            self.aux_loss += self.z_coef * loss
            gz += self.z_coef * g
        sh = None
        if self.shared_expert:
            ys, hs = _mlp(x, P["shared_w1"], P["shared_b1"], P["shared_w2"], P["shared_b2"],
                          self.activation)
            out = out + ys
            sh = hs
        return out, dict(x=x, i=i, routing=r, plan=plan, y=y, h=h, gz=gz, sh=sh)

    def _step_backward(self, c, gout):
        """Gradient with respect to the step's input; accumulates the
        parameter gradients."""
        P, G = self.params, self.grads
        plan, x = c["plan"], c["x"]
        gy, gw = plan.combine_backward(gout, c["y"])
        gtok = np.empty_like(plan.tokens)
        off = plan.offsets
        for e in range(self.num_experts):
            a, b = off[e], off[e + 1]
            if a < b:
                gx_e, gw1, gb1, gw2, gb2 = _mlp_backward(plan.tokens[a:b], c["h"][a:b], gy[a:b],
                                                         P["w1"][e], P["w2"][e], self.activation)
                gtok[a:b] = gx_e
                G["w1"][e] += gw1
                G["b1"][e] += gb1
                G["w2"][e] += gw2
                G["b2"][e] += gb2
        gx = plan.dispatch_backward(gtok)
        gz = c["routing"].backward(gw) + c["gz"]
        G["router"][c["i"]] += x.T @ gz
        gx += gz @ P["router"][c["i"]].T
        if self.shared_expert:
            gxs, gw1, gb1, gw2, gb2 = _mlp_backward(x, c["sh"], gout, P["shared_w1"],
                                                    P["shared_w2"], self.activation)
            gx += gxs
            G["shared_w1"] += gw1
            G["shared_b1"] += gb1
            G["shared_w2"] += gw2
            G["shared_b2"] += gb2
        return gx


class MoELayer(_MoEBase):
    """A Mixture-of-Experts feed-forward layer in NumPy.

    ``forward(x [T, d_model], mask=None, micro_batch=None)`` returns the MoE
    output (no residual) and sets ``aux_loss`` and ``routing``;
    ``backward(grad_out)`` returns the gradient with respect to x and sets
    ``grads`` (including the auxiliary losses' gradients).

    score/renormalize: see :func:`lowband.moe.route`.  ``capacity_factor``
    None: dropless.  ``aux_scope``: "micro", "sequence" (needs ``seq_len``)
    or "global" (a :class:`LoadBalancer` with ``allreduce``; call
    ``reset_balance()`` at each optimizer step).
    """

    def __init__(self, d_model, d_ff, num_experts, k, *, score="softmax", renormalize=None,
                 shared_expert=False, capacity_factor=None, drop="probs", aux_coef=1e-2,
                 aux_scope="micro", seq_len=None, allreduce=None, z_coef=0.0,
                 activation="relu", seed=0, dtype=np.float64):
        super().__init__(d_model, d_ff, num_experts, k, 1, score=score, renormalize=renormalize,
                         shared_expert=shared_expert, capacity_factor=capacity_factor, drop=drop,
                         aux_coef=aux_coef, aux_scope=aux_scope, seq_len=seq_len,
                         allreduce=allreduce, z_coef=z_coef, activation=activation, seed=seed,
                         dtype=dtype)
        self.routing = None
        self._cache = None

    def forward(self, x, mask=None, *, micro_batch=None):
        x = self._input(x)
        mask = _moe._mask(mask, x.shape[0])
        self.aux_loss = 0.0
        out, self._cache = self._step(x, 0, self.k, mask, micro_batch)
        self.routing = self._cache["routing"]
        return out

    def backward(self, grad_out):
        if self._cache is None:
            raise RuntimeError("backward: call forward first")
        self.zero_grad()
        return self._step_backward(self._cache, np.asarray(from_torch(grad_out, "grad_out"), self.dtype))


class ChainOfExperts(_MoEBase):
    """Chain-of-Experts: ``iterations`` sequential passes through the same
    experts, each with its own router and k experts per token (use k/C of
    a comparable MoE for matched compute), the shared expert (if any) run
    every iteration, and the load-balancing loss per iteration (summed
    into ``aux_loss``).  ``routings`` holds each iteration's Routing.
    """

    def __init__(self, d_model, d_ff, num_experts, iterations, k, *, inner_residual=True,
                 outer_residual=False, score="softmax", renormalize=None, shared_expert=False,
                 capacity_factor=None, drop="probs", aux_coef=1e-2, aux_scope="micro",
                 seq_len=None, allreduce=None, z_coef=0.0, activation="relu", seed=0,
                 dtype=np.float64):
        self.iterations = check_int(iterations, "iterations", 1)
        super().__init__(d_model, d_ff, num_experts, k, self.iterations, score=score,
                         renormalize=renormalize, shared_expert=shared_expert,
                         capacity_factor=capacity_factor, drop=drop, aux_coef=aux_coef,
                         aux_scope=aux_scope, seq_len=seq_len, allreduce=allreduce,
                         z_coef=z_coef, activation=activation, seed=seed, dtype=dtype)
        self.inner_residual = bool(inner_residual)
        self.outer_residual = bool(outer_residual)
        self.routings = []
        self._caches = None

    def forward(self, x, mask=None, *, micro_batch=None):
        x = self._input(x)
        mask = _moe._mask(mask, x.shape[0])
        self.aux_loss = 0.0
        self._caches = []
        h = x
        for i in range(self.iterations):
            out, cache = self._step(h, i, self.k, mask, micro_batch)
            self._caches.append(cache)
            h = out + h if self.inner_residual else out
        self.routings = [c["routing"] for c in self._caches]
        return h + x if self.outer_residual else h

    def backward(self, grad_out):
        if self._caches is None:
            raise RuntimeError("backward: call forward first")
        self.zero_grad()
        g = np.asarray(from_torch(grad_out, "grad_out"), self.dtype)
        top = g
        for cache in reversed(self._caches):
            gin = self._step_backward(cache, g)
            g = gin + g if self.inner_residual else gin
        return g + top if self.outer_residual else g
