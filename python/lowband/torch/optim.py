"""Communication-efficient ``torch.optim`` optimizers over a process group.

``OneBitAdam``  1-bit Adam (Tang et al., ICML 2021) with DeepSpeed's
                exchange (deepspeed/runtime/comm/nccl.py): Adam with a dense
                gradient allreduce for ``freeze_step`` steps, then frozen
                variance and momentum averaged by the two-phase 1-bit
                compressed allreduce with worker and server error, padded to
                a multiple of W * lcm(W, 8).
``DGC``         Deep Gradient Compression (Lin et al., ICLR 2018): momentum
                correction, momentum-factor masking, local clipping,
                sampled top-k with sparsity warm-up, sparse allgather; dense
                allreduce for 1-D tensors (biases).
``Signum``      signSGD / Signum with majority vote (Bernstein et al. 2018,
                2019): local momentum, 1-bit signs allgathered, vote in C.
``ZeroOneAdam`` 0/1 Adam (Lu et al. 2022) and ``OneBitLamb`` 1-bit LAMB (Li
``OneBitLamb``  et al. 2021), DeepSpeed's update rules (one layer per
                parameter tensor for LAMB's trust ratios).
``DiLoCo``      DiLoCo (Douillard et al. 2023): any torch inner optimizer,
                outer Nesterov SGD every ``sync_every`` steps on the averaged
                outer gradient; ``DiLoCo.sparseloco`` (Sarfi et al. 2025:
                chunked top-k + 2-bit values + decayed error feedback +
                contributor mean) and ``DiLoCo.streaming`` (Douillard et al.
                2025: strided fragments, overlap, E3M0 outer gradients).

Each is a ``torch.optim.Optimizer`` whose update is lowband's NumPy
optimizer (``lowband.optim``: the same arithmetic as in ``lowband.sim``)
running on a zero-copy view of the parameters: at construction the
parameters (one group, all float32 or all float64, on the CPU) are copied
into one flat buffer and each ``p.data`` becomes a view of it, so the C
kernels update them in place.  Each step copies the gradients into one flat
buffer (``p.grad`` None counts as zero).  Collectives go through
``lowband.torch.ProcessGroupCommunicator(process_group, deterministic)``,
or through ``comm=`` (any lowband communicator, e.g. a
``lowband.sim.Cluster`` rank).  ``process_group`` is an attribute, never
part of ``param_groups`` or ``state_dict``.

Every rank must call ``step`` in lockstep and start from the same parameter
values.  ``state_dict()`` adds the NumPy optimizer's state (error buffers,
moments, outer copies, counters) as tensors under ``"lowband"``; error
buffers are rank-local, so each rank saves and loads its own state dict.
``param_groups[0]["lr"]`` (and the other hyper-parameters listed in each
class) is read at every step, so learning-rate schedulers work.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple, Union

import numpy as np
import torch

from .. import optim as _np_optim
from .._validate import check_int

__all__ = ["OneBitAdam", "DGC", "DiLoCo", "Signum", "ZeroOneAdam", "OneBitLamb"]

Params = Union[Iterable[torch.Tensor], Iterable[dict]]


def _to_tensors(obj: Any) -> Any:
    """A state dict with every ndarray as a tensor (torch.load(weights_only=True) safe)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_tensors(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_tensors(v) for v in obj)
    return obj


def _to_arrays(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _to_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_arrays(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_arrays(v) for v in obj)
    return obj


class _FlatOptimizer(torch.optim.Optimizer):
    """Shared machinery: the flat parameter buffer, the communicator, the
    gradient gather, hyper-parameter sync and the state dict."""

    _SYNCED: Tuple[str, ...] = ("lr",)      # group keys copied onto the core each step

    def __init__(self, params: Params, defaults: dict, process_group: Any, comm: Any,
                 deterministic: bool) -> None:
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"params: expected one parameter group, got {len(self.param_groups)}")
        ps = self.param_groups[0]["params"]
        if not ps:
            raise ValueError("params: expected at least one parameter, got none")
        dtypes = {p.dtype for p in ps}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise TypeError(f"params: expected all float32 or all float64 tensors, got {sorted(map(str, dtypes))}")
        devices = {p.device.type for p in ps}
        if devices != {"cpu"}:
            raise TypeError(f"params: expected CPU tensors, got devices {sorted(devices)}")
        dtype = next(iter(dtypes))
        self.shapes = [tuple(p.shape) for p in ps]
        sizes = [p.numel() for p in ps]
        self._bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        flat = torch.empty(self._bounds[-1], dtype=dtype)
        with torch.no_grad():
            for p, a, b in zip(ps, self._bounds[:-1], self._bounds[1:]):
                flat[a:b].copy_(p.detach().reshape(-1))
                p.data = flat[a:b].view_as(p)
        self.flat = flat
        self._grad = torch.zeros_like(flat)
        self.process_group = process_group
        if comm is None:
            from .comm import ProcessGroupCommunicator
            comm = ProcessGroupCommunicator(process_group, deterministic=deterministic)
        self.comm = comm
        self.core = self._make_core(flat.numpy(), comm)

    def _make_core(self, flat: np.ndarray, comm: Any) -> Any:
        raise NotImplementedError

    def _sync(self) -> None:
        group = self.param_groups[0]
        for key in self._SYNCED:
            setattr(self.core, self._core_name(key), self._core_value(key, group[key]))

    def _core_name(self, key: str) -> str:
        return key

    def _core_value(self, key: str, value: Any) -> Any:
        return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)

    def _flat_grad(self) -> np.ndarray:
        g = self._grad
        for p, a, b in zip(self.param_groups[0]["params"], self._bounds[:-1], self._bounds[1:]):
            if p.grad is None:
                g[a:b].zero_()
            elif p.grad.is_sparse:
                raise TypeError("grad: sparse gradients are not supported")
            else:
                g[a:b].copy_(p.grad.reshape(-1))
        return g.numpy()

    def _check_views(self) -> None:
        for i, (p, a) in enumerate(zip(self.param_groups[0]["params"], self._bounds[:-1])):
            if p.numel() and p.data_ptr() != self.flat[a:].data_ptr():
                raise RuntimeError(f"params[{i}]: its storage was replaced after the optimizer was "
                                   "built (it must stay a view of the optimizer's flat buffer)")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One step on every rank (collective)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_views()
        self._sync()
        self._core_step()
        return loss

    def _core_step(self) -> None:
        self.core.step(self._flat_grad())

    # -- state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lowband"] = _to_tensors(self.core.state_dict())
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "lowband" not in state_dict:
            raise ValueError("state_dict: expected a state dict of a lowband.torch optimizer "
                             "(with a 'lowband' entry)")
        sd = dict(state_dict)
        core = sd.pop("lowband")
        super().load_state_dict(sd)
        self._sync()
        self.core.load_state_dict(_to_arrays(core))


class OneBitAdam(_FlatOptimizer):
    """1-bit Adam with DeepSpeed's semantics (module doc and
    ``lowband.optim.OneBitAdam``): no bias correction; warm-up steps
    (``freeze_step`` of them) average the gradient with a dense allreduce;
    afterwards v is frozen and m = compressed_allreduce(b1*m + (1-b1)*g_local).
    ``momentum_mask`` ("auto" or 0/1 values) is DeepSpeed's ``exp_avg_mask``.
    ``exchange="chunked"`` uses lowband's unpadded chunked exchange instead.
    Synced each step from the group: lr, weight_decay."""

    _SYNCED = ("lr", "weight_decay")

    def __init__(self, params: Params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, freeze_step: int,
                 process_group: Any = None, comm: Any = None, deterministic: bool = False,
                 momentum_mask: Any = None, error_feedback: bool = True,
                 exchange: str = "deepspeed") -> None:
        self._args = dict(betas=tuple(betas), eps=eps, freeze_step=freeze_step, momentum_mask=momentum_mask,
                          error_feedback=error_feedback, exchange=exchange)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, process_group, comm, deterministic)

    def _make_core(self, flat, comm):
        g = self.defaults
        a = self._args
        return _np_optim.OneBitAdam(flat, comm, g["lr"], a["betas"], a["eps"], g["weight_decay"],
                                    freeze_step=a["freeze_step"], momentum_mask=a["momentum_mask"],
                                    error_feedback=a["error_feedback"], exchange=a["exchange"])

    @property
    def compressing(self) -> bool:
        """Whether the next step is in the compression stage."""
        return bool(self.core.compressing)


class DGC(_FlatOptimizer):
    """Deep Gradient Compression (``lowband.optim.DGCSGD``): every
    parameter with more than one dimension is compressed (sampled top-
    ``ratio`` of the momentum-corrected accumulator, allgathered), 1-D ones
    (biases) take a dense allreduce and local momentum.  ``clip``: local
    L2 clipping per tensor (pass the paper's N^-1/2-rescaled value);
    ``warmup_steps``: steps per stage of the sparsity warm-up.  Synced each
    step from the group: lr, weight_decay."""

    _SYNCED = ("lr", "weight_decay")

    def __init__(self, params: Params, lr: float, momentum: float = 0.9, ratio: float = 0.001, *,
                 nesterov: bool = False, clip: Optional[float] = None, masking: bool = True,
                 warmup_steps: Optional[int] = None, weight_decay: float = 0.0, exact: bool = False,
                 sample_ratio: float = 0.01, seed: int = 0, process_group: Any = None, comm: Any = None,
                 deterministic: bool = False) -> None:
        self._args = dict(momentum=momentum, ratio=ratio, nesterov=nesterov, clip=clip, masking=masking,
                          warmup_steps=warmup_steps, exact=exact, sample_ratio=sample_ratio, seed=seed)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, process_group, comm, deterministic)

    def _make_core(self, flat, comm):
        a = self._args
        return _np_optim.DGCSGD(flat, comm, self.defaults["lr"], a["momentum"], a["ratio"],
                                nesterov=a["nesterov"], clip=a["clip"], masking=a["masking"],
                                warmup_steps=a["warmup_steps"], weight_decay=self.defaults["weight_decay"],
                                tensors=[s if s else (1,) for s in self.shapes], exact=a["exact"],
                                sample_ratio=a["sample_ratio"], seed=a["seed"])


class _TorchInner:
    """The inner optimizer seen by lowband.optim.DiLoCo: a torch optimizer
    stepping the same parameters (its state is saved by DiLoCo itself)."""

    def __init__(self, optimizer: torch.optim.Optimizer, flat: np.ndarray) -> None:
        self.optimizer = optimizer
        self.params = flat

    def step(self, grad: Any) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DiLoCo(_FlatOptimizer):
    """DiLoCo over a process group (``lowband.optim.DiLoCo``).

    ``inner_optimizer``: a torch optimizer over the same parameters (e.g.
    ``torch.optim.AdamW(model.parameters())``), or a factory called with
    the parameters.  Each ``step()`` is one inner step (the inner
    optimizer reads ``p.grad``); after every ``sync_every`` (H) inner steps
    a fragment's outer step runs: delta = x_global - x_local, averaged by a
    dense allreduce (``compressor=None``) or sent compressed (allgather;
    ``feedback=beta``: decayed error feedback; ``aggregate``: "mean" or
    "contributor_mean"), outer SGD with ``outer_momentum`` (Nesterov) and
    ``outer_lr`` (the group's "lr"), then x_local = x_global (``overlap``
    steps later, mixed with ``alpha``).  ``fragments`` (Streaming DiLoCo):
    P fragments, strided over the parameter tensors, staggered by H/P.
    ``state_dict()`` holds the inner optimizer's state dict too.
    """

    def __init__(self, params: Params, inner_optimizer: Any, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, sync_every: int = 500, *, compressor: Any = None,
                 fragments: Optional[int] = None, nesterov: bool = True, feedback: Optional[float] = None,
                 aggregate: str = "mean", overlap: int = 0, alpha: float = 0.0, process_group: Any = None,
                 comm: Any = None, deterministic: bool = False) -> None:
        self._args = dict(inner=inner_optimizer, outer_momentum=outer_momentum, H=sync_every,
                          compressor=compressor, fragments=fragments, nesterov=nesterov, feedback=feedback,
                          aggregate=aggregate, overlap=overlap, alpha=alpha)
        defaults = dict(lr=outer_lr, outer_momentum=outer_momentum)
        super().__init__(params, defaults, process_group, comm, deterministic)

    def _core_name(self, key: str) -> str:
        return "outer_lr" if key == "lr" else key

    def _make_core(self, flat, comm):
        a = self._args
        inner = a["inner"]
        if not isinstance(inner, torch.optim.Optimizer):
            if not callable(inner):
                raise TypeError(f"inner_optimizer: expected a torch optimizer or a factory, "
                                f"got {type(inner).__name__}")
            inner = inner(self.param_groups[0]["params"])
            if not isinstance(inner, torch.optim.Optimizer):
                raise TypeError(f"inner_optimizer: the factory returned {type(inner).__name__}, "
                                "expected a torch optimizer")
        mine = {id(p) for p in self.param_groups[0]["params"]}
        theirs = {id(p) for g in inner.param_groups for p in g["params"]}
        if mine != theirs:
            raise ValueError("inner_optimizer: it must optimise exactly the parameters given to DiLoCo")
        self.inner_optimizer = inner
        P = 1 if a["fragments"] is None else check_int(a["fragments"], "fragments", 1)
        layers = [max(int(np.prod(s)), 1) for s in self.shapes] if P > 1 else None
        return _np_optim.DiLoCo(flat, comm, _TorchInner(inner, flat), a["H"], outer_lr=self.defaults["lr"],
                                outer_momentum=a["outer_momentum"], nesterov=a["nesterov"],
                                compressor=a["compressor"], feedback=a["feedback"], aggregate=a["aggregate"],
                                fragments=P, layers=layers, overlap=a["overlap"], alpha=a["alpha"])

    def _core_step(self) -> None:
        self.last_synced = self.core.step(None)

    @classmethod
    def sparseloco(cls, params: Params, inner_optimizer: Any, sync_every: int = 15, *, chunk: int = 4096,
                   k: int = 128, values: Optional[str] = "lut2bit", beta: float = 0.95,
                   **kwargs: Any) -> "DiLoCo":
        """SparseLoCo (Sarfi et al. 2025): top-``k`` per ``chunk`` with 2-bit
        LUT values, decayed error feedback ``beta``, contributor-mean
        aggregation, no outer momentum, outer lr 1."""
        from ..compressors import Chain, ChunkedTopK
        sparsifier = ChunkedTopK(chunk, k)
        compressor = sparsifier if values is None else Chain(sparsifier, values)
        return cls(params, inner_optimizer, 1.0, 0.0, sync_every, compressor=compressor, nesterov=False,
                   feedback=beta, aggregate="contributor_mean", **kwargs)

    @classmethod
    def streaming(cls, params: Params, inner_optimizer: Any, sync_every: int, fragments: int, *,
                  overlap: int = 1, alpha: float = 0.5, compressor: Any = "minifloat:e3m0",
                  outer_lr: float = 0.7, outer_momentum: float = 0.9, **kwargs: Any) -> "DiLoCo":
        """Streaming DiLoCo (Douillard et al. 2025): ``fragments`` strided
        over the parameter tensors, staggered syncs, overlap 1 with mixing
        0.5, E3M0 outer gradients, outer Nesterov SGD (0.7, 0.9)."""
        return cls(params, inner_optimizer, outer_lr, outer_momentum, sync_every, compressor=compressor,
                   fragments=fragments, overlap=overlap, alpha=alpha, **kwargs)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["inner"] = self.inner_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        inner = sd.pop("inner", None)
        if inner is None:
            raise ValueError("state_dict: expected a DiLoCo state dict (with an 'inner' entry)")
        super().load_state_dict(sd)
        self.inner_optimizer.load_state_dict(inner)


class Signum(_FlatOptimizer):
    """signSGD / Signum with majority vote (``lowband.optim.Signum``): each
    rank's momentum stays local, its signs are allgathered and every rank
    steps by lr * (majority sign + wd * x).  Synced each step from the
    group: lr, weight_decay."""

    _SYNCED = ("lr", "weight_decay")

    def __init__(self, params: Params, lr: float = 1e-4, beta: float = 0.9, weight_decay: float = 0.0, *,
                 process_group: Any = None, comm: Any = None, deterministic: bool = False) -> None:
        self._args = dict(beta=beta)
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay)
        super().__init__(params, defaults, process_group, comm, deterministic)

    def _make_core(self, flat, comm):
        return _np_optim.Signum(flat, comm, self.defaults["lr"], self._args["beta"],
                                self.defaults["weight_decay"])


class ZeroOneAdam(_FlatOptimizer):
    """0/1 Adam (``lowband.optim.ZeroOneAdam``, DeepSpeed's rule): variance
    refreshed on an exponentially sparser schedule with 1-bit momentum
    rounds between, then frozen variance and local steps with 1-bit
    synchronisation.  Synced each step from the group: lr, weight_decay."""

    _SYNCED = ("lr", "weight_decay")

    def __init__(self, params: Params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, var_freeze_step: int,
                 var_update_scaler: int = 16, local_step_scaler: int = 32678, local_step_clipper: int = 16,
                 momentum_mask: Any = None, exchange: str = "deepspeed", process_group: Any = None,
                 comm: Any = None, deterministic: bool = False) -> None:
        self._args = dict(betas=tuple(betas), eps=eps, var_freeze_step=var_freeze_step,
                          var_update_scaler=var_update_scaler, local_step_scaler=local_step_scaler,
                          local_step_clipper=local_step_clipper, momentum_mask=momentum_mask,
                          exchange=exchange)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, process_group, comm, deterministic)

    def _make_core(self, flat, comm):
        a = dict(self._args)
        return _np_optim.ZeroOneAdam(flat, comm, self.defaults["lr"], a.pop("betas"), a.pop("eps"),
                                     self.defaults["weight_decay"], **a)


class OneBitLamb(_FlatOptimizer):
    """1-bit LAMB (``lowband.optim.OneBitLamb``, DeepSpeed's rule) with one
    trust ratio per parameter tensor.  Synced each step from the group: lr,
    weight_decay."""

    _SYNCED = ("lr", "weight_decay")

    def __init__(self, params: Params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, freeze_step: int, max_coeff: float = 10.0,
                 min_coeff: float = 0.01, coeff_beta: float = 0.9, factor_max: float = 4.0,
                 factor_min: float = 0.5, factor_threshold: float = 0.1, momentum_mask: Any = None,
                 exchange: str = "deepspeed", process_group: Any = None, comm: Any = None,
                 deterministic: bool = False) -> None:
        self._args = dict(betas=tuple(betas), eps=eps, freeze_step=freeze_step, max_coeff=max_coeff,
                          min_coeff=min_coeff, coeff_beta=coeff_beta, factor_max=factor_max,
                          factor_min=factor_min, factor_threshold=factor_threshold,
                          momentum_mask=momentum_mask, exchange=exchange)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, process_group, comm, deterministic)

    def _make_core(self, flat, comm):
        a = dict(self._args)
        layers = [max(1, int(np.prod(s))) for s in self.shapes]
        return _np_optim.OneBitLamb(flat, comm, self.defaults["lr"], a.pop("betas"), a.pop("eps"),
                                    self.defaults["weight_decay"], layers=layers, **a)
