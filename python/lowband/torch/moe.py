"""Mixture-of-Experts for PyTorch (``lowband.torch.moe``).

Functions with gradients on lowband's C kernels (see ``lowband.moe`` for
the definitions)::

    r = moe.route(logits, k=2)                 # Routing: experts, weights, scores (tensors)
    aux = moe.load_balancing_loss(r)           # 0-dim tensor, canonical LBL (1 = balanced)
    plan = moe.dispatch(x, r, capacity=None)   # plan.tokens [N, H], expert-major
    y = plan.combine(expert_out)               # [T, H], differentiable in both inputs
    y = moe.attach_aux_loss(y, aux, scale=1.0) # aux gets gradient `scale`; y unchanged

The global-batch loss of "Demons in the Detail" over data-parallel ranks
and gradient-accumulation micro-batches: :class:`GlobalLoadBalancer`.
Layers: :class:`MoE` and :class:`ChainOfExperts` (SwiGLU or MLP experts,
shared expert, capacity, expert parallelism over a process group).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import _moe_core as _np_moe
from .._validate import check_choice, check_finite_number, check_int
from ._moe_functional import (Dispatch, Routing, _loss_tensor, _mask_view, _routing,
                              attach_aux_loss, capacity, dispatch, load_balancing_loss, route,
                              sinkhorn, sinkhorn_route, z_loss)

__all__ = [
    "Routing", "route", "sinkhorn", "sinkhorn_route", "load_balancing_loss", "z_loss",
    "Dispatch", "dispatch", "capacity", "attach_aux_loss", "GlobalLoadBalancer", "MoE",
    "ChainOfExperts",
]


# --------------------------------------------------------------------------
# the global-batch load balancer
# --------------------------------------------------------------------------

def _in_backward():
    return torch._C._current_graph_task_id() != -1


class GlobalLoadBalancer:
    """The global-batch load-balancing loss over data-parallel ranks and
    gradient-accumulation micro-batches ("Demons in the Detail", Alg. 1).

    ``accumulate(routing, mask=None, micro_batch=None)`` adds the micro-batch's
    expert counts and valid-token count, summed over ``process_group``
    (default: the whole world when torch.distributed is initialised, else
    this process alone) with **one** ``all_reduce`` of E + 1 int64 numbers;
    ``loss(routing, mask=None, micro_batch=None)`` returns the loss as a
    0-dim tensor differentiable with respect to ``routing.logits``:
    ``E * sum_i f_i * P_i`` with f from the buffer (this step's micro-batches
    so far, all ranks) and P from this rank's micro-batch; ``reset()`` at
    the optimizer step (or ``reset_on_step(optimizer)`` once).

    Gradient contract: each rank's loss is multiplied by ``W * T_j / N``
    (W ranks, T_j this rank's valid tokens, N all ranks' valid tokens in
    this micro-batch), so that data-parallel gradient *averaging* (DDP)
    gives exactly the gradient of the loss over the concatenated global
    micro-batch, padding included, and the mean over ranks of the returned
    values is that loss (Megatron-LM #3672, where the gradient came out
    1/dp_size too small, is the bug this avoids).  Do not divide by W again.

    ``sync="micro"`` (default): one all_reduce per new micro-batch; micro-
    batch s uses the counts of micro-batches 1..s (causal, Alg. 1).
    ``sync="step"``: ``accumulate`` counts locally; after the step's last
    ``accumulate`` call ``sync()`` (one all_reduce of E + M numbers for M
    micro-batches; all ranks need the same M), then every ``loss`` of the
    step uses f of the whole global batch; for loops that run every
    forward before the backwards.

    Activation checkpointing: recomputing a micro-batch must not count it
    twice.  Pass the same ``micro_batch`` id (any hashable; the layers take
    it in ``forward``) and the second ``accumulate`` is a no-op and
    ``loss`` reuses the snapshot; an ``accumulate`` without an id during a
    backward pass (a recompute) raises RuntimeError.
    """

    def __init__(self, num_experts, k, process_group=None, *, sync="micro"):
        self.process_group = process_group
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            world = dist.get_world_size(process_group)
            allreduce = self._allreduce
        else:
            world, allreduce = 1, None
        self._lb = _np_moe.LoadBalancer(num_experts, k, allreduce, world_size=world, sync=sync)

    def _allreduce(self, a):
        dist.all_reduce(torch.from_numpy(a), group=self.process_group)    # in place, zero-copy
        return a

    num_experts = property(lambda self: self._lb.num_experts)
    k = property(lambda self: self._lb.k)
    world_size = property(lambda self: self._lb.world_size)
    sync_mode = property(lambda self: self._lb.sync_mode)

    @property
    def counts(self):
        """int64 [E] tensor: the buffered picks (all micro-batches and ranks)."""
        return torch.from_numpy(self._lb.counts)

    @property
    def tokens(self):
        """Valid tokens behind the buffer (all micro-batches and ranks)."""
        return self._lb.tokens

    @property
    def fractions(self):
        """float64 [E] tensor: f = counts / (k * tokens)."""
        return torch.from_numpy(np.asarray(self._lb.fractions, np.float64))

    def reset(self):
        """Empties the buffer (once per optimizer step)."""
        self._lb.reset()

    def reset_on_step(self, optimizer):
        """Resets after every ``optimizer.step()`` (a step post-hook);
        returns the hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.reset())

    def sync(self):
        """sync="step": the one all_reduce of the step (see the class doc)."""
        self._lb.sync()

    def accumulate(self, routing, mask=None, *, micro_batch=None):
        """Adds the micro-batch's counts (all ranks); returns its id."""
        r = _routing(routing)
        if micro_batch is None and _in_backward():
            raise RuntimeError("accumulate: called during backward (activation recomputation?) "
                               "without a micro_batch id; pass the id of the forward so the "
                               "micro-batch is not counted twice")
        return self._lb.accumulate(r.numpy, _mask_view(mask, r.num_tokens),
                                   micro_batch=micro_batch)

    def loss(self, routing, mask=None, *, micro_batch=None):
        """The loss of this micro-batch (0-dim tensor with gradient; see the
        class doc for its data-parallel scale)."""
        r = _routing(routing)
        if micro_batch is None and _in_backward() and not (
                self._lb._last is not None and self._lb._last[0] is r.numpy):
            raise RuntimeError("loss: called during backward without a micro_batch id")
        loss, grad_fn = self._lb._loss_lazy(r.numpy, _mask_view(mask, r.num_tokens),
                                            micro_batch, None)
        return _loss_tensor(r.logits, loss, grad_fn)

    def __repr__(self):
        return (f"GlobalLoadBalancer(E={self.num_experts}, k={self.k}, "
                f"world_size={self.world_size}, sync={self.sync_mode!r}, tokens={self.tokens})")


# --------------------------------------------------------------------------
# experts and expert parallelism
# --------------------------------------------------------------------------

_ACTIVATIONS = ("swiglu", "relu", "gelu", "silu")


def _act(h, kind):
    if kind == "relu":
        return torch.relu(h)
    if kind == "gelu":
        return torch.nn.functional.gelu(h)
    return torch.nn.functional.silu(h)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the reverse
    exchange (output and input splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_rows, in_splits, out_splits, group):
        ctx.meta = (x.shape[0], in_splits, out_splits, group)
        out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        rows, in_splits, out_splits, group = ctx.meta
        gx = g.new_empty((rows,) + tuple(g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=group)
        return gx, None, None, None, None


class _Experts(nn.Module):
    """E_local expert FFNs stored as [E_local, ...] parameters.
    ``forward(tokens, counts)``: tokens grouped by expert, counts[e] rows
    for local expert e; returns the outputs in the same rows."""

    def __init__(self, num_local, hidden, ffn_hidden, activation, bias, dtype, device):
        super().__init__()
        self.activation = activation
        kw = dict(dtype=dtype, device=device)
        self.w1 = nn.Parameter(torch.empty(num_local, hidden, ffn_hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(num_local, ffn_hidden, hidden, **kw))
        self.w3 = (nn.Parameter(torch.empty(num_local, hidden, ffn_hidden, **kw))
                   if activation == "swiglu" else None)
        self.b1 = nn.Parameter(torch.zeros(num_local, ffn_hidden, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_local, hidden, **kw)) if bias else None
        for w, fan_in in ((self.w1, hidden), (self.w2, ffn_hidden), (self.w3, hidden)):
            if w is not None:
                nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def one(self, e, t):
        h = t @ self.w1[e]
        if self.b1 is not None:
            h = h + self.b1[e]
        if self.activation == "swiglu":
            a = torch.nn.functional.silu(h) * (t @ self.w3[e])
        else:
            a = _act(h, self.activation)
        y = a @ self.w2[e]
        return y + self.b2[e] if self.b2 is not None else y

    def forward(self, tokens, counts):
        outs, start = [], 0
        for e, c in enumerate(counts):
            c = int(c)
            if c:
                outs.append(self.one(e, tokens[start:start + c]))
            start += c
        if not outs:
            return tokens.new_zeros((0, self.w2.shape[2]))
        return torch.cat(outs)


class _SharedExpert(nn.Module):
    def __init__(self, hidden, ffn_hidden, activation, bias, dtype, device):
        super().__init__()
        self.inner = _Experts(1, hidden, ffn_hidden, activation, bias, dtype, device)

    def forward(self, x):
        return self.inner.one(0, x)


# --------------------------------------------------------------------------
# the layers
# --------------------------------------------------------------------------

_AUX_SCOPES = ("micro", "sequence", "global")


class _MoEBase(nn.Module):
    def __init__(self, hidden, ffn_hidden, num_experts, k, routers, *, score, renormalize,
                 groups, group_k, group_by, scaling_factor, router, activation, bias,
                 shared_expert,
                 capacity_factor, drop, pad_to_capacity, aux_coef, aux_scope, seq_len,
                 process_group, z_coef, aux_scale, expert_parallel_group, dtype, device):
        super().__init__()
        self.hidden = check_int(hidden, "hidden", 1)
        self.ffn_hidden = check_int(ffn_hidden, "ffn_hidden", 1)
        E = self.num_experts = check_int(num_experts, "num_experts", 1)
        self.k = check_int(k, "k", 1, E)
        self.score = check_choice(score, "score", _np_moe._SCORES)
        self.renormalize = renormalize
        self.groups, self.group_k, self.group_by = groups, group_k, group_by
        self.scaling_factor = check_finite_number(scaling_factor, "scaling_factor", lo=0.0,
                                                  lo_open=True)
        self.router_kind = check_choice(router, "router", ("topk", "sinkhorn"))
        self.activation = check_choice(activation, "activation", _ACTIVATIONS)
        self.capacity_factor = (None if capacity_factor is None else
                                check_finite_number(capacity_factor, "capacity_factor", lo=0.0,
                                                    lo_open=True))
        self.drop = check_choice(drop, "drop", _np_moe._DROPS)
        self.pad_to_capacity = bool(pad_to_capacity)
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity: needs a capacity_factor, got None")
        self.aux_coef = check_finite_number(aux_coef, "aux_coef", lo=0.0)
        self.z_coef = check_finite_number(z_coef, "z_coef", lo=0.0)
        self.aux_scale = check_finite_number(aux_scale, "aux_scale")
        self.aux_scope = check_choice(aux_scope, "aux_scope", _AUX_SCOPES)
        self.seq_len = None if seq_len is None else check_int(seq_len, "seq_len", 1)
        if self.aux_scope == "sequence" and self.seq_len is None:
            raise TypeError("seq_len: aux_scope='sequence' needs seq_len")
        self.balancers = ([GlobalLoadBalancer(E, self.k, process_group)
                           for _ in range(routers)] if self.aux_scope == "global" else [])
        self.ep_group = expert_parallel_group
        if expert_parallel_group is not None:
            self.ep_size = dist.get_world_size(expert_parallel_group)
            self.ep_rank = dist.get_rank(expert_parallel_group)
        else:
            self.ep_size, self.ep_rank = 1, 0
        if E % self.ep_size:
            raise ValueError(f"num_experts: must be a multiple of the expert-parallel group size "
                             f"{self.ep_size}, got {E}")
        self.num_local_experts = E // self.ep_size
        kw = dict(dtype=dtype, device=device)
        self.routers = nn.ParameterList(
            [nn.Parameter(torch.empty(E, self.hidden, **kw)) for _ in range(routers)])
        for w in self.routers:
            nn.init.uniform_(w, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))
        self.experts = _Experts(self.num_local_experts, self.hidden, self.ffn_hidden,
                                self.activation, bias, dtype, device)
        if shared_expert is True:
            shared_expert = self.ffn_hidden
        self.shared = (None if not shared_expert else
                       _SharedExpert(self.hidden, check_int(shared_expert, "shared_expert", 1),
                                     self.activation, bias, dtype, device))
        self.aux_loss = None
        self.routings = []

    def reset_balance(self):
        """Empties the global-batch buffers (once per optimizer step)."""
        for b in self.balancers:
            b.reset()

    def _route(self, logits, i):
        if self.router_kind == "sinkhorn":
            return sinkhorn_route(logits, self.k, balanced=self.training,
                                  scaling_factor=self.scaling_factor)
        return route(logits, self.k, score=self.score, renormalize=self.renormalize,
                     groups=self.groups, group_k=self.group_k, group_by=self.group_by,
                     scaling_factor=self.scaling_factor)

    def _run_experts(self, plan):
        """Expert outputs for plan.tokens (local experts, or exchanged with
        the expert-parallel group)."""
        counts = plan.counts if not plan.padded else torch.full(
            (self.num_experts,), plan.capacity, dtype=torch.int64)
        if self.ep_group is None:
            return self.experts(plan.tokens, counts.tolist())
        W, El = self.ep_size, self.num_local_experts
        send = counts.reshape(W, El)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.ep_group)
        in_splits = send.sum(dim=1).tolist()
        out_splits = recv.sum(dim=1).tolist()
        got = _AllToAll.apply(plan.tokens, sum(out_splits), in_splits, out_splits, self.ep_group)
        # received: source-major [source][local expert]; the experts want expert-major
        rc = recv.numpy()
        start = np.concatenate([[0], np.cumsum(rc.reshape(-1))[:-1]]).reshape(W, El)
        perm = np.concatenate([np.arange(start[s, e], start[s, e] + rc[s, e])
                               for e in range(El) for s in range(W)] or [np.zeros(0, np.int64)])
        perm_t = torch.from_numpy(perm.astype(np.int64)).to(got.device)
        y = self.experts(got.index_select(0, perm_t), rc.sum(axis=0).tolist())
        inv = torch.empty_like(perm_t)
        inv[perm_t] = torch.arange(perm_t.numel(), device=perm_t.device)
        back = y.index_select(0, inv)
        return _AllToAll.apply(back, plan.tokens.shape[0], out_splits, in_splits, self.ep_group)

    def _step(self, x, i, mask, micro_batch):
        """One routed pass with router i; returns (output, aux tensor or None)."""
        logits = x @ self.routers[i].t()
        r = self._route(logits, i)
        cap = None
        if self.capacity_factor is not None:
            valid = x.shape[0] if mask is None else int(mask.sum())
            cap = capacity(valid, self.num_experts, self.k, self.capacity_factor)
        plan = dispatch(x, r, cap, self.drop, mask=mask, pad_to_capacity=self.pad_to_capacity)
        out = plan.combine(self._run_experts(plan))
        if self.shared is not None:
            out = out + self.shared(x)
        aux = None
        if self.training and self.aux_coef:
            if self.aux_scope == "global":
                bal = self.balancers[i]
                key = bal.accumulate(r, mask, micro_batch=micro_batch)
                aux = self.aux_coef * bal.loss(r, mask, micro_batch=key)
            else:
                aux = self.aux_coef * load_balancing_loss(
                    r, scope=self.aux_scope, mask=mask,
                    seq_len=self.seq_len if self.aux_scope == "sequence" else None)
        if self.training and self.z_coef:
            zl = self.z_coef * z_loss(logits, mask)
            aux = zl if aux is None else aux + zl
        return out, aux, r

    def _input(self, x, mask):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x: expected a last dimension of {self.hidden}, got shape "
                             f"{tuple(x.shape)}")
        flat = x.reshape(-1, self.hidden)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask: expected a bool tensor (True = valid token)")
            if mask.numel() != flat.shape[0]:
                raise ValueError(f"mask: expected {flat.shape[0]} elements (one per token), got "
                                 f"shape {tuple(mask.shape)}")
            mask = mask.reshape(-1)
        return flat, mask

    def _finish(self, y, x, aux):
        self.aux_loss = None if aux is None else aux.detach()
        if aux is not None:
            y = attach_aux_loss(y, aux, self.aux_scale)
        return y.reshape(x.shape)


_DOC_OPTIONS = """
    Options: ``score``/``renormalize``/``groups``/``group_k``/``group_by``/
    ``scaling_factor`` as :func:`route`; ``router="sinkhorn"`` Megatron's
    Sinkhorn router instead (:func:`sinkhorn_route`, balanced in training);
    ``activation`` "swiglu" (w2 (silu(x w1) * x w3)), "relu", "gelu" or
    "silu" (w2 act(x w1 + b1) + b2 with ``bias``); ``shared_expert`` False,
    True (an FFN of ffn_hidden) or its hidden size, run on every token;
    ``capacity_factor`` None (dropless) or the factor of
    :func:`capacity` with ``drop`` and ``pad_to_capacity``; auxiliary
    losses ``aux_coef`` * load balancing (``aux_scope`` "micro",
    "sequence" with ``seq_len``, or "global": a :class:`GlobalLoadBalancer`
    per router over ``process_group``, one all_reduce per micro-batch) +
    ``z_coef`` * z-loss,
    attached to the output with :func:`attach_aux_loss` and ``aux_scale``
    (pass 1 / micro-batches when you divide the main loss by it) and
    reported in ``aux_loss``.  In ``eval()`` mode no auxiliary loss is
    computed and the balancers are not touched.
    ``expert_parallel_group``: the experts are split evenly across its
    ranks (rank r holds experts r*E/W ... (r+1)*E/W - 1 in ``experts``);
    every rank routes its own tokens and exchanges them with
    ``all_to_all_single`` (uneven splits); the router and the shared
    expert are replicated (average or sum their gradients like data
    parallelism).  ``forward(x [..., hidden], mask=None, micro_batch=None)``:
    pass ``micro_batch`` ids under activation checkpointing with the
    global scope."""


class MoE(_MoEBase):
    __doc__ = """A Mixture-of-Experts feed-forward layer: router, top-k routing,
    dispatch, E experts, weighted combine (the residual is yours).
    ``routing`` holds the last forward's :class:`Routing`.
    """ + _DOC_OPTIONS

    def __init__(self, hidden, ffn_hidden, num_experts, k, *, score="softmax",
                 renormalize=None, groups=None, group_k=None, group_by="scores",
                 scaling_factor=1.0,
                 router="topk", activation="swiglu", bias=False, shared_expert=False,
                 capacity_factor=None, drop="probs", pad_to_capacity=False, aux_coef=1e-2,
                 aux_scope="micro", seq_len=None, process_group=None,
                 z_coef=0.0, aux_scale=1.0, expert_parallel_group=None, dtype=None,
                 device=None):
        super().__init__(hidden, ffn_hidden, num_experts, k, 1, score=score,
                         renormalize=renormalize, groups=groups, group_k=group_k,
                         group_by=group_by,
                         scaling_factor=scaling_factor, router=router, activation=activation,
                         bias=bias, shared_expert=shared_expert, capacity_factor=capacity_factor,
                         drop=drop, pad_to_capacity=pad_to_capacity, aux_coef=aux_coef,
                         aux_scope=aux_scope, seq_len=seq_len, process_group=process_group,
                         z_coef=z_coef, aux_scale=aux_scale,
                         expert_parallel_group=expert_parallel_group, dtype=dtype, device=device)
        self.routing = None

    def forward(self, x, mask=None, *, micro_batch=None):
        flat, m = self._input(x, mask)
        y, aux, self.routing = self._step(flat, 0, m, micro_batch)
        self.routings = [self.routing]
        return self._finish(y, x, aux)


class ChainOfExperts(_MoEBase):
    __doc__ = """Chain-of-Experts (Wang et al. 2025): ``iterations`` C sequential
    passes through the same experts (and shared expert), one router per
    iteration, k experts per pass, the auxiliary losses per iteration
    (summed): x(0) = x, x(c) = sum_i g_ci E_i(x(c-1)) [+ shared(x(c-1))]
    [+ x(c-1) with ``inner_residual``]; output x(C) [+ x with
    ``outer_residual``].  The defaults are the authors' configuration
    (ZihanWang314/CoE, coe_deepseekv2): ``renormalize=False``
    (norm_topk_prob false, also for k > 1), SwiGLU experts, the inner
    residual.  ``routings`` holds each iteration's :class:`Routing`.
    """ + _DOC_OPTIONS

    def __init__(self, hidden, ffn_hidden, num_experts, k, *, iterations=2,
                 inner_residual=True, outer_residual=False, score="softmax",
                 renormalize=False, groups=None, group_k=None, group_by="scores",
                 scaling_factor=1.0,
                 router="topk", activation="swiglu", bias=False, shared_expert=False,
                 capacity_factor=None, drop="probs", pad_to_capacity=False, aux_coef=1e-2,
                 aux_scope="micro", seq_len=None, process_group=None,
                 z_coef=0.0, aux_scale=1.0, expert_parallel_group=None, dtype=None,
                 device=None):
        self_iterations = check_int(iterations, "iterations", 1)
        super().__init__(hidden, ffn_hidden, num_experts, k, self_iterations, score=score,
                         renormalize=renormalize, groups=groups, group_k=group_k,
                         group_by=group_by,
                         scaling_factor=scaling_factor, router=router, activation=activation,
                         bias=bias, shared_expert=shared_expert, capacity_factor=capacity_factor,
                         drop=drop, pad_to_capacity=pad_to_capacity, aux_coef=aux_coef,
                         aux_scope=aux_scope, seq_len=seq_len, process_group=process_group,
                         z_coef=z_coef, aux_scale=aux_scale,
                         expert_parallel_group=expert_parallel_group, dtype=dtype, device=device)
        self.iterations = self_iterations
        self.inner_residual = bool(inner_residual)
        self.outer_residual = bool(outer_residual)

    def forward(self, x, mask=None, *, micro_batch=None):
        flat, m = self._input(x, mask)
        h, total, self.routings = flat, None, []
        for i in range(self.iterations):
            out, aux, r = self._step(h, i, m, micro_batch)
            self.routings.append(r)
            if aux is not None:
                total = aux if total is None else total + aux
            h = out + h if self.inner_residual else out
        if self.outer_residual:
            h = h + flat
        return self._finish(h, x, total)
