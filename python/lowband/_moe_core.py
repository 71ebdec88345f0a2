"""The kernels and functions behind ``lowband.moe`` (routing, load
balancing, dispatch/combine, metrics).  ``lowband.moe`` re-exports them with
the layers of ``_moe_layers``; both import this module, which imports
neither.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np

from . import _core
from ._validate import (from_torch, as_float_array, check_choice, check_finite_number, check_int,
                        check_threads)

__all__ = [
    "Routing", "route", "load_balancing_loss", "LoadBalancer", "z_loss", "bias_update",
    "capacity", "dispatch", "Dispatch", "expert_frequency", "topk_score_sum",
]

_SCORES = ("softmax", "sigmoid")
_SCOPES = ("micro", "sequence")
_SELECTIONS = ("routed", "plain")
_DROPS = ("probs", "position")


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------

def _is_int(v):
    return not isinstance(v, (bool, np.bool_)) and hasattr(v, "__index__")


def _matrix(a, name, rows=None, cols=None):
    """A float32/float64 2-D array (contiguous), with the given sizes."""
    a = as_float_array(a, name)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {a.shape}")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got shape {a.shape}")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"{name}: expected {cols} columns, got shape {a.shape}")
    return a


def _logits(logits, name="logits"):
    z = _matrix(logits, name)
    if z.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one expert column, got shape {z.shape}")
    return z


def _mask(mask, T, name="mask"):
    """None, or a bool array of T elements (any shape; True = valid token)
    as a flat contiguous array."""
    if mask is None:
        return None
    m = np.asarray(from_torch(mask, name))
    if m.dtype != np.bool_:
        raise TypeError(f"{name}: expected a bool array (True = valid token), got dtype {m.dtype}")
    if m.size != T:
        raise ValueError(f"{name}: expected {T} elements (one per token), got shape {m.shape}")
    return np.ascontiguousarray(m.reshape(-1))


def _routing(routing, name="routing"):
    if not isinstance(routing, Routing):
        raise TypeError(f"{name}: expected a lowband.moe.Routing, got {type(routing).__name__}")
    return routing


def _seq_len(scope, seq_len, T):
    check_choice(scope, "scope", _SCOPES)
    if scope == "micro":
        if seq_len is not None:
            raise ValueError(f"seq_len: only used with scope='sequence', got seq_len={seq_len!r}")
        return T
    if seq_len is None:
        raise TypeError("seq_len: scope='sequence' needs seq_len (tokens per sequence)")
    s = check_int(seq_len, "seq_len", 1)
    if T % s:
        raise ValueError(f"seq_len: the {T} tokens must be whole sequences, got seq_len={s}")
    return s


# --------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------

class Routing:
    """The result of :func:`route` for T tokens and E experts.

    ``experts`` int32 [T, k] (descending choice key: the logit, or score +
    bias), ``weights`` [T, k] (combine weights, the logits' dtype),
    ``scores`` [T, E] (softmax or sigmoid of the logits).  ``counts()`` gives
    the picks per expert; ``backward(grad_weights)`` the gradient with
    respect to the logits of anything computed from the weights.
    """

    def __init__(self, experts, weights, scores, *, score="softmax", renormalize=False,
                 bias=None, groups=None, group_k=None, _counts=None, _sums=None, _logits=None):
        self.experts = experts
        self.weights = weights
        self.scores = scores
        self.score = score
        self.renormalize = bool(renormalize)
        self.bias = bias
        self.groups = groups
        self.group_k = group_k
        self._counts = _counts
        self._sums = _sums
        self._logits = _logits

    @classmethod
    def from_arrays(cls, experts, weights, scores, *, score="softmax", renormalize=False):
        """A Routing from your own router's arrays: experts [T, k] (distinct
        ids in [0, E) per token), weights [T, k] and scores [T, E] (same float
        dtype).  ``score`` and ``renormalize`` say how weights derive from the
        scores (they define ``backward``)."""
        check_choice(score, "score", _SCORES)
        scores = _logits(scores, "scores")
        T, E = scores.shape
        ex = np.asarray(from_torch(experts, "experts"))
        if not np.issubdtype(ex.dtype, np.integer):
            raise TypeError(f"experts: expected an integer array, got dtype {ex.dtype}")
        if ex.ndim != 2 or ex.shape[0] != T or not 1 <= ex.shape[1] <= E:
            raise ValueError(f"experts: expected shape ({T}, k) with 1 <= k <= {E}, got {ex.shape}")
        if ex.size and (ex.min() < 0 or ex.max() >= E):
            raise ValueError(f"experts: ids must be in [0, {E}), got range [{ex.min()}, {ex.max()}]")
        srt = np.sort(ex, axis=1)
        if ex.shape[1] > 1 and (srt[:, 1:] == srt[:, :-1]).any():
            raise ValueError("experts: every token must pick distinct experts")
        w = _matrix(weights, "weights", T, ex.shape[1])
        if w.dtype != scores.dtype:
            raise TypeError(f"weights: expected dtype {scores.dtype} (that of scores), got {w.dtype}")
        if not (np.isfinite(w).all() and np.isfinite(scores).all()):
            raise ValueError("weights/scores: expected finite values")
        return cls(np.ascontiguousarray(ex, np.int32), w, scores, score=score,
                   renormalize=renormalize)

    @property
    def num_tokens(self):
        return self.scores.shape[0]

    @property
    def num_experts(self):
        return self.scores.shape[1]

    @property
    def k(self):
        return self.experts.shape[1]

    @property
    def dtype(self):
        return self.scores.dtype

    def __repr__(self):
        return (f"Routing(T={self.num_tokens}, E={self.num_experts}, k={self.k}, score={self.score!r}, "
                f"renormalize={self.renormalize}, dtype={self.dtype})")

    def counts(self, mask=None, *, threads=None):
        """int64 [E]: (token, slot) picks per expert among the valid tokens."""
        mask = _mask(mask, self.num_tokens)
        if mask is None and self._counts is not None:
            return self._counts.copy()
        c, _, _ = _core.moe_balance_stats(None, 0, self.experts, self.num_experts, mask,
                                          max(self.num_tokens, 1), check_threads(threads))
        return c[0] if c.shape[0] else np.zeros(self.num_experts, np.int64)

    def aux_scores(self):
        """float64 [T, E]: the distribution the load-balancing loss averages
        (softmax scores; sigmoid scores over their row sum + 1e-20)."""
        q = self.scores.astype(np.float64)
        if self.score == "sigmoid":
            q /= (q.sum(axis=1, keepdims=True) + 1e-20)
        return q

    def top(self, m):
        """The first m slots (highest keys) as a Routing with the same scores
        (weights are not renormalised).  ``load_balancing_loss(r.top(1))`` is
        the first-choice convention of DeepSpeed's top-1/top-2 and Tutel."""
        m = check_int(m, "m", 1, self.k)
        return Routing(np.ascontiguousarray(self.experts[:, :m]),
                       np.ascontiguousarray(self.weights[:, :m]), self.scores,
                       score=self.score, renormalize=self.renormalize)

    def backward(self, grad_weights):
        """Gradient with respect to the logits [T, E] (the routing dtype) of a
        loss whose gradient with respect to ``weights`` is ``grad_weights``.
        The selection (and any bias or group limit) is piecewise constant
        and gets no gradient."""
        gw = _matrix(grad_weights, "grad_weights", self.num_tokens, self.k).astype(np.float64)
        T, E = self.scores.shape
        rows = np.arange(T)[:, None]
        ex = self.experts
        w = self.weights.astype(np.float64)
        gz = np.zeros((T, E))
        if self.score == "softmax":
            if self.renormalize:     # softmax over the selected logits
                gz[rows, ex] = w * (gw - (w * gw).sum(axis=1, keepdims=True))
            else:                    # the selected entries of softmax over all E
                p = self.scores.astype(np.float64)
                gz[rows, ex] = gw
                gz = p * (gz - (p * gz).sum(axis=1, keepdims=True))
        else:
            s = self.scores.astype(np.float64)[rows, ex]
            if self.renormalize:     # s / (sum of selected s + 1e-20)
                denom = s.sum(axis=1, keepdims=True) + 1e-20
                gs = (gw - (w * gw).sum(axis=1, keepdims=True)) / denom
            else:
                gs = gw
            gz[rows, ex] = gs * s * (1.0 - s)
        return gz.astype(self.dtype)

    def _plain_experts(self, threads):
        """A fresh top-k of the unbiased, ungrouped scores (Megatron's aux)."""
        if self.bias is None and not self.groups:
            return self.experts
        if self._logits is None:
            raise ValueError("selection='plain' needs a Routing made by route()")
        out = _core.moe_route(self._logits, self.k, _SCORES.index(self.score), self.renormalize,
                              None, 0, 0, threads)
        return out[0]


def route(logits, k, *, score="softmax", renormalize=None, bias=None, groups=None,
          group_k=None, group_by="scores", threads=None):
    """Routes T tokens to k of E experts.  ``logits`` [T, E], float32 or
    float64 (finite; ValueError naming the first bad flat index).

    ``score="softmax"``: scores = softmax(logits); the k largest logits are
    chosen; ``renormalize`` (default: True when k > 1) makes the weights a
    softmax over the selected logits (Megatron's default, Mixtral), else
    the weights are the selected scores (Switch, DeepSeek-V2, CoE).

    ``score="sigmoid"``: scores = sigmoid(logits) (DeepSeek-V3); the weights
    are the selected scores, divided by their sum + 1e-20 with
    ``renormalize``.

    ``bias`` (E finite numbers, e.g. from :func:`bias_update`) is added to
    the scores to choose the experts but never enters the weights.
    ``groups``/``group_k``: experts form ``groups`` contiguous groups; only
    the ``group_k`` groups whose top-(k // group_k) choice scores sum
    highest are selectable (group-limited routing).  Ties go to the lower
    expert (or group) index.  Computed in the logits' precision, selection
    keys in double.

    ``group_by="logits"`` (softmax, no bias): a group's score is the sum of
    its top-(k // group_k) *logits* instead of scores, which is what
    Megatron-Core's group-limited routing does with softmax unless
    ``moe_router_pre_softmax`` is set (its top-k runs on the raw logits).
    The groups' order can differ from the scores' (a sum of logits is not
    a sum of their exponentials).
    """
    z = _logits(logits)
    T, E = z.shape
    check_choice(score, "score", _SCORES)
    k = check_int(k, "k", 1, E)
    if renormalize is None:
        renormalize = k > 1
    elif not isinstance(renormalize, (bool, np.bool_)):
        raise TypeError(f"renormalize: expected None or a bool, got {type(renormalize).__name__}")
    elif renormalize and k == 1:
        raise ValueError("renormalize: True with k=1 gives every token weight 1 and the router "
                         "no gradient; pass renormalize=False (or None)")
    b = None
    if bias is not None:
        b = as_float_array(bias, "bias")
        if b.shape != (E,):
            raise ValueError(f"bias: expected shape ({E},), got {b.shape}")
        if not np.isfinite(b).all():
            raise ValueError("bias: expected finite values")
        b = np.ascontiguousarray(b, np.float64)
    g = gk = 0
    if groups is not None or group_k is not None:
        if groups is None or group_k is None:
            raise TypeError(f"groups/group_k: give both or neither, got groups={groups!r}, "
                            f"group_k={group_k!r}")
        g = check_int(groups, "groups", 1, E)
        if E % g:
            raise ValueError(f"groups: must divide E = {E}, got {g}")
        gk = check_int(group_k, "group_k", 1, g)
        if k < gk or k > gk * (E // g):
            raise ValueError(f"k: group-limited routing needs group_k <= k <= group_k * E / groups "
                             f"= {gk * (E // g)}, got k={k}")
    check_choice(group_by, "group_by", ("scores", "logits"))
    if group_by == "logits" and g > 1:
        if score != "softmax" or b is not None:
            raise ValueError("group_by: 'logits' is Megatron's softmax grouping; it takes "
                             f"score='softmax' and no bias, got score={score!r}, "
                             f"bias={'None' if b is None else 'given'}")
        return _route_grouped_by_logits(z, k, renormalize, g, gk, check_threads(threads))
    experts, weights, scores, counts, sums = _core.moe_route(
        z, k, _SCORES.index(score), bool(renormalize), b, g, gk, check_threads(threads))
    return Routing(experts, weights, scores, score=score, renormalize=renormalize, bias=b,
                   groups=g if g > 1 else None, group_k=gk if g > 1 else None,
                   _counts=counts, _sums=sums, _logits=z)


def _route_grouped_by_logits(z, k, renormalize, groups, group_k, threads):
    """Softmax routing whose groups rank by the sum of their top-(k //
    group_k) logits (Megatron-Core without pre-softmax).  Ties go to the
    lower group and expert index."""
    T, E = z.shape
    per, m = E // groups, k // group_k
    z64 = z.astype(np.float64)
    top = -np.sort(-z64.reshape(T, groups, per), axis=2)[:, :, :m]
    group_score = np.zeros((T, groups))
    for j in range(m):                       # largest first, like the kernel's sums
        group_score += top[:, :, j]
    chosen = np.argsort(-group_score, axis=1, kind="stable")[:, :group_k]
    allowed = np.zeros((T, groups), bool)
    allowed[np.arange(T)[:, None], chosen] = True
    key = np.where(np.repeat(allowed, per, axis=1), z64, -np.inf)
    experts = np.ascontiguousarray(np.argsort(-key, axis=1, kind="stable")[:, :k], np.int32)
    _, _, scores, _, _ = _core.moe_route(z, k, 0, False, None, 0, 0, threads)
    rows = np.arange(T)[:, None]
    if renormalize:                          # softmax over the selected logits
        zs = z[rows, experts]
        w = np.exp(zs - zs.max(axis=1, keepdims=True)) if T else zs
        weights = np.ascontiguousarray(w / w.sum(axis=1, keepdims=True), z.dtype)
    else:
        weights = np.ascontiguousarray(scores[rows, experts])
    return Routing(experts, weights, scores, score="softmax", renormalize=renormalize,
                   groups=groups, group_k=group_k, _logits=z)


# --------------------------------------------------------------------------
# load balancing
# --------------------------------------------------------------------------

def _balance_terms(counts, count_tokens, sums, score_tokens, k):
    """Canonical LBL over B segments and its weights g = dL/dq.

    counts [B, E] int, count_tokens [B] (f_i = c_i / (k * count_tokens)),
    sums [B, E] (P_i = sums_i / score_tokens), score_tokens [B].  Segments
    with no tokens are left out; the loss is the mean over the others.
    """
    counts = np.asarray(counts, np.float64)
    B, E = counts.shape
    ct = np.asarray(count_tokens, np.float64)
    st = np.asarray(score_tokens, np.float64)
    live = (ct > 0) & (st > 0)
    g = np.zeros((B, E))
    nb = int(live.sum())
    if nb == 0:
        return 0.0, g
    f = counts[live] / (k * ct[live, None])
    P = np.asarray(sums, np.float64)[live] / st[live, None]
    loss = float(E * (f * P).sum() / nb)
    g[live] = E * f / (st[live, None] * nb)
    return loss, g


def _stats(routing, mask, seg_len, experts, threads, want_sums=True):
    """(counts [B, E], valid [B], sums [B, E]) of a routing (C kernel), from
    the values cached by route() when they are the same thing."""
    T = routing.num_tokens
    if (want_sums and mask is None and seg_len == T and T and experts is routing.experts
            and routing._sums is not None):
        return routing._counts[None], np.array([T], np.int64), routing._sums[None]
    return _core.moe_balance_stats(routing.scores if want_sums else None,
                                   _SCORES.index(routing.score), experts, routing.num_experts,
                                   mask, max(seg_len, 1), threads)


def load_balancing_loss(routing, *, scope="micro", seq_len=None, mask=None, selection="routed",
                        threads=None):
    """(loss, gradient with respect to the logits [T, E]) of the canonical
    load-balancing loss of one micro-batch.

    ``scope="micro"``: f and P over all valid tokens of the micro-batch.
    ``scope="sequence"``: over each sequence of ``seq_len`` tokens (T must
    be a multiple), averaged over the sequences that have valid tokens
    (DeepSeek-V2/V3 and Chain-of-Experts' seq_aux).  For the global batch
    use :class:`LoadBalancer`.

    ``mask`` (bool, T elements, True = valid) removes padding from the
    counts, the score sums and both denominators.  ``selection="routed"``
    counts the routed experts (with bias and group limit); ``"plain"`` a
    fresh top-k of the unbiased, ungrouped scores (Megatron's aux scores).
    Balanced routing gives 1; f gets no gradient.
    """
    loss, grad = _lbl_lazy(routing, scope, seq_len, mask, selection, threads)
    return loss, grad()


def _grad_fn(r, g, seg, mask, threads):
    """The gradient kernel call, deferred (lowband.torch runs it in backward)."""
    return lambda: _core.moe_balance_grad(r.scores, _SCORES.index(r.score), g, max(seg, 1),
                                          mask, threads)


def _lbl_lazy(routing, scope, seq_len, mask, selection, threads):
    """load_balancing_loss as (loss, a callable giving the gradient)."""
    r = _routing(routing)
    T, k = r.num_tokens, r.k
    seg = _seq_len(scope, seq_len, T)
    mask = _mask(mask, T)
    check_choice(selection, "selection", _SELECTIONS)
    threads = check_threads(threads)
    experts = r.experts if selection == "routed" else r._plain_experts(threads)
    counts, valid, sums = _stats(r, mask, seg, experts, threads)
    loss, g = _balance_terms(counts, valid, sums, valid, k)
    return loss, _grad_fn(r, g, seg, mask, threads)


def _allreduced(allreduce, vec):
    out = allreduce(vec.copy())
    if not isinstance(out, np.ndarray):
        raise TypeError(f"allreduce: expected it to return an ndarray, got {type(out).__name__}")
    if out.shape != vec.shape:
        raise ValueError(f"allreduce: expected a result of shape {vec.shape}, got {out.shape}")
    if not np.issubdtype(out.dtype, np.integer):
        raise TypeError(f"allreduce: expected an integer result (counts), got dtype {out.dtype}")
    if (out < 0).any():
        raise ValueError("allreduce: returned negative counts")
    return out.astype(np.int64)


class LoadBalancer:
    """The global-batch load-balancing loss ("Demons in the Detail", Alg. 1).

    Keeps an int64 count buffer (E) and a valid-token count across the
    micro-batches of one optimizer step and, through ``allreduce``, across
    data-parallel workers: ``allreduce(a)`` takes an int64 array (the E
    counts and the valid-token count, E + 1 numbers: all that travels) and
    returns the element-wise sum over workers.  ``comm`` (a
    ``lowband.sim`` communicator, e.g. the ``comm`` of ``Cluster.run``, or a
    ``TorchCommunicator``) sets both ``allreduce`` and ``world_size`` from
    the communicator.  None and None: one worker.

    Per micro-batch: ``accumulate(routing, mask, micro_batch=i)`` adds its
    (all-reduced) counts, then ``loss(routing, micro_batch=i)`` returns
    ``E * sum_i f_i * P_i`` with f from the buffer so far (this step's
    micro-batches up to this one, all workers) and P from this worker's
    micro-batch, and its gradient with respect to the logits.

    Gradient contract.  ``world_size=None``: the plain per-worker loss; the
    mean over workers of the losses is the global loss when every worker
    has the same number of valid tokens.  ``world_size=W`` (set by
    ``comm``): the loss is multiplied by ``W * T_j / N`` (T_j this worker's
    valid tokens, N all workers' in this micro-batch), so that the usual
    data-parallel gradient *averaging* gives exactly the gradient of the
    loss over the concatenated global micro-batch, whatever the padding;
    the mean of the returned losses is that loss.

    ``sync="micro"`` (default): one ``allreduce`` per new micro-batch (E + 1
    numbers).  ``sync="step"``: ``accumulate`` only counts locally; after
    the step's last micro-batch has been accumulated, ``sync()`` makes one
    ``allreduce`` of E + M numbers (counts and the M micro-batches' valid
    tokens; every worker must have the same M) and every ``loss`` then uses
    f of the whole step (for loops that run all forwards before the
    backwards, e.g. one backward of the summed loss).

    Accumulating the same ``micro_batch`` id again (activation
    recomputation) changes nothing and ``loss`` reuses that micro-batch's
    snapshot.  ``reset()`` at the optimizer step.
    """

    def __init__(self, num_experts, k, allreduce=None, *, world_size=None, comm=None,
                 sync="micro"):
        self.num_experts = check_int(num_experts, "num_experts", 1)
        self.k = check_int(k, "k", 1, self.num_experts)
        if comm is not None:
            if allreduce is not None or world_size is not None:
                raise TypeError("comm: give comm, or allreduce (and world_size), not both")
            if not (callable(getattr(comm, "allreduce", None)) and hasattr(comm, "world_size")):
                raise TypeError(f"comm: expected a communicator with allreduce() and world_size, "
                                f"got {type(comm).__name__}")
            allreduce, world_size = comm.allreduce, comm.world_size
        if allreduce is not None and not callable(allreduce):
            raise TypeError(f"allreduce: expected None or a callable, got {type(allreduce).__name__}")
        self.allreduce = allreduce
        self.world_size = None if world_size is None else check_int(world_size, "world_size", 1)
        self.sync_mode = check_choice(sync, "sync", ("micro", "step"))
        self._auto = itertools.count()
        self.reset()

    def reset(self):
        """Empties the buffer (call once per optimizer step)."""
        self._counts = np.zeros(self.num_experts, np.int64)
        self._tokens = 0
        self._records = {}
        self._last = None
        self._pending = []          # sync="step": (key, local counts, local valid) per micro-batch
        self._step_masks = {}
        self._synced = False

    @property
    def counts(self):
        """int64 [E]: the buffered picks (all micro-batches and workers)."""
        return self._counts.copy()

    @property
    def tokens(self):
        """Valid tokens behind the buffer."""
        return self._tokens

    @property
    def fractions(self):
        """f = counts / (k * tokens) (zeros while empty)."""
        if self._tokens == 0:
            return np.zeros(self.num_experts)
        return self._counts / (self.k * self._tokens)

    def _check(self, routing):
        r = _routing(routing)
        if r.num_experts != self.num_experts or r.k != self.k:
            raise ValueError(f"routing: expected E={self.num_experts}, k={self.k}, "
                             f"got E={r.num_experts}, k={r.k}")
        return r

    def _local(self, r, mask, threads):
        c, v, _ = _core.moe_balance_stats(None, 0, r.experts, self.num_experts, mask,
                                          max(r.num_tokens, 1), check_threads(threads))
        if c.shape[0]:
            return c[0], int(v[0])
        return np.zeros(self.num_experts, np.int64), 0

    def accumulate(self, routing, mask=None, *, micro_batch=None, threads=None):
        """Adds this micro-batch's valid counts (summed over workers) to the
        buffer and returns its id (``micro_batch``, or a new one).  A known
        id is not counted again."""
        r = self._check(routing)
        mask = _mask(mask, r.num_tokens)
        key = ("auto", next(self._auto)) if micro_batch is None else micro_batch
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"micro_batch: expected a hashable id, got {type(key).__name__}") from None
        if key in self._records:
            self._last = (r, key)
            return key
        counts, valid = self._local(r, mask, threads)
        if self.sync_mode == "step":
            if self._synced:
                raise RuntimeError("accumulate: sync='step' and this step is already synced; "
                                   "call reset() at the optimizer step first")
            self._pending.append((key, counts, valid))
            self._records[key] = None       # filled by sync()
            self._step_masks[key] = mask
        else:
            local = np.zeros(self.num_experts + 1, np.int64)
            local[:-1], local[-1] = counts, valid
            total = local if self.allreduce is None else _allreduced(self.allreduce, local)
            self._counts += total[:-1]
            self._tokens += int(total[-1])
            self._records[key] = (self._counts.copy(), self._tokens, mask, int(total[-1]))
        self._last = (r, key)
        return key

    def sync(self):
        """sync="step": one allreduce of the step's counts and per-micro-batch
        valid tokens (E + M numbers); afterwards every ``loss`` of the step
        uses f of the whole step.  A no-op with sync="micro"."""
        if self.sync_mode == "micro" or self._synced:
            return
        E, M = self.num_experts, len(self._pending)
        local = np.zeros(E + M, np.int64)
        for m, (_, counts, valid) in enumerate(self._pending):
            local[:E] += counts
            local[E + m] = valid
        total = local if self.allreduce is None else _allreduced(self.allreduce, local)
        self._counts = total[:E].copy()
        self._tokens = int(total[E:].sum())
        for m, (key, _, _) in enumerate(self._pending):
            self._records[key] = (self._counts, self._tokens, self._step_masks[key],
                                  int(total[E + m]))
        self._synced = True

    def loss(self, routing, mask=None, *, micro_batch=None, threads=None):
        """(loss, gradient with respect to the logits) for this micro-batch.

        ``micro_batch`` given: that micro-batch's snapshot (accumulated now
        if new).  None: the micro-batch just accumulated with this same
        Routing object, else this routing is accumulated as a new one."""
        loss, grad = self._loss_lazy(routing, mask, micro_batch, threads)
        return loss, grad()

    def _loss_lazy(self, routing, mask, micro_batch, threads):
        r = self._check(routing)
        if micro_batch is None and self._last is not None and self._last[0] is r:
            key = self._last[1]
        else:
            key = self.accumulate(r, mask, micro_batch=micro_batch, threads=threads)
        if self._records[key] is None:
            raise RuntimeError("loss: sync='step' needs sync() after the step's last "
                               "accumulate (f is that of the whole step)")
        counts, tokens, stored, global_valid = self._records[key]
        mask = _mask(mask, r.num_tokens)
        if mask is not None and (stored is None or not np.array_equal(mask, stored)):
            raise ValueError(f"mask: differs from the mask accumulated for micro-batch {key!r}")
        threads = check_threads(threads)
        T = r.num_tokens
        if T == 0:
            return 0.0, lambda: np.zeros(r.scores.shape, r.dtype)
        _, valid, sums = _stats(r, stored, T, r.experts, threads)
        loss, g = _balance_terms(counts[None], [tokens], sums, valid, self.k)
        if self.world_size is not None:
            scale = self.world_size * float(valid[0]) / global_valid if global_valid else 0.0
            loss, g = loss * scale, g * scale
        return loss, _grad_fn(r, g, T, stored, threads)


def z_loss(logits, mask=None, *, threads=None):
    """(loss, gradient [T, E]) of the router z-loss: the mean over valid
    tokens of logsumexp(logits_t)^2 (ST-MoE; Megatron multiplies by its
    coefficient).  ``mask``: bool, True = valid token."""
    z = _logits(logits)
    mask = _mask(mask, z.shape[0])
    valid = z.shape[0] if mask is None else int(mask.sum())
    scale = 1.0 / valid if valid else 0.0
    total, grad = _core.moe_z_loss(z, mask, scale, True, check_threads(threads))
    return (total / valid if valid else 0.0), grad


def bias_update(bias, counts, rate=1e-3):
    """Aux-loss-free balancing (DeepSeek-V3): a new bias with
    ``b_i + rate * sign(mean(c) - c_i)`` (sign(0) = 0; the comparison is
    exact in integers).  ``counts``: integer picks per expert (all-reduced
    over workers, padding excluded); ``bias``: float32/float64 [E]."""
    b = as_float_array(bias, "bias")
    if b.ndim != 1:
        raise ValueError(f"bias: expected a 1-D array [E], got shape {b.shape}")
    c = np.asarray(from_torch(counts, "counts"))
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"counts: expected an integer array (exact counts, never float), got dtype {c.dtype}")
    if c.shape != b.shape:
        raise ValueError(f"counts: expected shape {b.shape} (that of bias), got {c.shape}")
    if (c < 0).any():
        raise ValueError("counts: expected non-negative counts")
    rate = check_finite_number(rate, "rate", lo=0.0)
    c = [int(v) for v in c]                      # exact, whatever the sizes
    total = sum(c)
    diff = np.array([(total > len(c) * v) - (total < len(c) * v) for v in c], np.float64)
    return (b.astype(np.float64) + rate * diff).astype(b.dtype)


def capacity(tokens, num_experts, k, factor, *, min_capacity=0):
    """Expert capacity ``max(min_capacity, ceil(tokens * k / E * factor))``,
    exact (Megatron: min_capacity 0; DeepSpeed: 8; Tutel: k * ceil-based)."""
    T = check_int(tokens, "tokens", 0)
    E = check_int(num_experts, "num_experts", 1)
    k = check_int(k, "k", 1, E)
    f = check_finite_number(factor, "factor", lo=0.0, lo_open=True)
    m = check_int(min_capacity, "min_capacity", 0)
    return max(m, math.ceil(Fraction(f) * T * k / E))


# --------------------------------------------------------------------------
# dispatch and combine
# --------------------------------------------------------------------------

class Dispatch:
    """Tokens grouped by expert (from :func:`dispatch`).

    ``tokens`` [N, H]: expert-major, token-ascending copies of x's rows;
    expert i owns rows ``offsets[i]:offsets[i+1]``.  ``rows`` [N]: the
    assignment t*k + s of each row (``token_index`` = rows // k);
    ``position`` [T, k]: the row of each assignment, -1 if dropped.
    """

    def __init__(self, tokens, offsets, rows, position, weights, threads):
        self.tokens = tokens
        self.offsets = offsets
        self.rows = rows
        self.position = position
        self.weights = weights
        self._threads = threads

    @property
    def num_experts(self):
        return self.offsets.size - 1

    @property
    def counts(self):
        """int64 [E]: rows per expert (after capacity)."""
        return np.diff(self.offsets)

    @property
    def token_index(self):
        return self.rows // self.position.shape[1]

    @property
    def kept(self):
        """bool [T, k]: assignments that were dispatched."""
        return self.position >= 0

    @property
    def num_dropped(self):
        return int(self.position.size - self.rows.size)

    def expert_tokens(self, i):
        """The rows of ``tokens`` that expert i processes."""
        i = check_int(i, "i", 0, self.num_experts - 1)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def _rows_like(self, a, name):
        a = _matrix(a, name, self.rows.size)
        if a.dtype != self.tokens.dtype:
            raise TypeError(f"{name}: expected dtype {self.tokens.dtype} (that of x), got {a.dtype}")
        return a

    def combine(self, expert_out, *, out=None):
        """[T, H'] with row t = sum over kept slots s of weights[t, s] *
        expert_out[position[t, s]] (added in slot order; dropped slots add
        nothing).  An inverse-map gather: no atomics, deterministic.
        ``out``: an optional [T, H'] array to write (reused buffers avoid
        the page faults of fresh memory)."""
        y = self._rows_like(expert_out, "expert_out")
        res = _core.moe_combine(y, self.position, self.weights, self._threads,
                                _out_rows(out, self.position.shape[0], y, "expert_out"))
        return res if out is None else out

    def combine_backward(self, grad_out, expert_out):
        """(grad_expert_out [N, H'], grad_weights [T, k]) of combine, given
        the gradient [T, H'] of its output (one pass over grad_out: each
        token's gradient row is read once for both)."""
        y = self._rows_like(expert_out, "expert_out")
        g = _matrix(grad_out, "grad_out", self.position.shape[0], y.shape[1])
        if g.dtype != y.dtype:
            raise TypeError(f"grad_out: expected dtype {y.dtype}, got {g.dtype}")
        return _core.moe_combine_backward(g, y, self.position, self.weights, True, True,
                                          self._threads)

    def dispatch_backward(self, grad_tokens):
        """[T, H]: the gradient with respect to x of a loss whose gradient
        with respect to ``tokens`` is ``grad_tokens`` (each token's rows
        summed in slot order)."""
        g = self._rows_like(grad_tokens, "grad_tokens")
        return _core.moe_combine(g, self.position, None, self._threads)


def _out_rows(out, rows, like, like_name):
    """None, or a C-contiguous writeable [>= rows, H] array of like's dtype
    that does not overlap ``like``."""
    if out is None:
        return None
    out = from_torch(out, "out")
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected None or an ndarray, got {type(out).__name__}")
    if out.dtype != like.dtype:
        raise TypeError(f"out: expected dtype {like.dtype}, got {out.dtype}")
    if out.ndim != 2 or out.shape[0] < rows or out.shape[1] != like.shape[1]:
        raise ValueError(f"out: expected shape (>= {rows}, {like.shape[1]}), got {out.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable and out.flags.aligned
            and out.dtype.isnative):
        raise ValueError("out: expected a writeable, C-contiguous, aligned native-endian array")
    if np.may_share_memory(out, like):
        raise ValueError(f"out: must not overlap {like_name}")
    return out


def dispatch(x, routing, capacity=None, drop="probs", *, mask=None, out=None, threads=None):
    """Groups the rows of x [T, H] by expert for ``routing``: a stable
    counting sort of the T*k assignments (no argsort), expert-major and
    token-ascending; x is then read once, in order, and each token written
    to its rows.

    ``capacity`` (None: dropless; else an int >= 0, see :func:`capacity`)
    caps the rows per expert: ``drop="probs"`` keeps those with the largest
    routing weights (ties to the lower token), ``"position"`` the first
    ones.  ``mask`` (bool, True = valid) leaves padding tokens out.
    ``out``: an optional [>= T*k, H] buffer for the tokens (they are its
    first rows), reused across steps to avoid fresh memory.
    Returns a :class:`Dispatch`.
    """
    r = _routing(routing)
    x = _matrix(x, "x", r.num_tokens)
    check_choice(drop, "drop", _DROPS)
    cap = -1 if capacity is None else check_int(capacity, "capacity", 0, (1 << 62))
    mask = _mask(mask, r.num_tokens)
    threads = check_threads(threads)
    w = np.ascontiguousarray(r.weights, x.dtype)
    offsets, rows, position = _core.moe_plan(r.experts, r.num_experts, mask, cap,
                                             _DROPS.index(drop), w, threads)
    out = _out_rows(out, rows.size, x, "x")
    tokens = _core.moe_scatter(x, position, rows.size, None, threads, out)
    return Dispatch(tokens, offsets, rows, position, w, threads)


# --------------------------------------------------------------------------
# specialisation metrics
# --------------------------------------------------------------------------

def expert_frequency(routing, domains, num_domains=None, mask=None):
    """float64 [D, E]: for each domain d, the fraction of its valid tokens
    that pick expert i ("expert selection frequency" of Demons in the
    Detail; each row sums to k; a uniform router gives k / E).  ``domains``:
    an int label in [0, D) per token."""
    r = _routing(routing)
    d = np.asarray(from_torch(domains, "domains"))
    if not np.issubdtype(d.dtype, np.integer):
        raise TypeError(f"domains: expected integer labels, got dtype {d.dtype}")
    if d.size != r.num_tokens:
        raise ValueError(f"domains: expected {r.num_tokens} labels, got shape {d.shape}")
    d = d.reshape(-1)
    if d.size and d.min() < 0:
        raise ValueError(f"domains: expected labels >= 0, got {d.min()}")
    D = (int(d.max()) + 1 if d.size else 0) if num_domains is None else check_int(num_domains, "num_domains", 1)
    if d.size and d.max() >= D:
        raise ValueError(f"domains: expected labels < num_domains = {D}, got {d.max()}")
    mask = _mask(mask, r.num_tokens)
    live = np.ones(r.num_tokens, bool) if mask is None else mask
    E = r.num_experts
    picks = np.zeros((D, E))
    np.add.at(picks, (np.repeat(d[live], r.k), r.experts[live].reshape(-1)), 1.0)
    per = np.bincount(d[live], minlength=D).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(per[:, None] > 0, picks / per[:, None], 0.0)


def topk_score_sum(routing, mask=None):
    """Mean over valid tokens of the load-balancing distribution's mass on
    the selected experts ("TopK score sum"; uniform routing gives k / E)."""
    r = _routing(routing)
    mask = _mask(mask, r.num_tokens)
    q = r.aux_scores()
    mass = np.take_along_axis(q, r.experts.astype(np.int64), axis=1).sum(axis=1)
    if mask is not None:
        mass = mass[mask]
    return float(mass.mean()) if mass.size else 0.0
