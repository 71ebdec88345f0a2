"""Zero-copy views between CPU tensors and NumPy arrays.

bfloat16 has no NumPy dtype in torch's eyes: it crosses as a uint16 view of
the same memory, then as an ``ml_dtypes.bfloat16`` view when ml_dtypes is
installed (what lowband's kernels take).
"""
from __future__ import annotations

import numpy as np
import torch

from .._validate import BFLOAT16

__all__ = ["as_numpy", "as_tensor"]


def as_numpy(t, name="tensor"):
    """A NumPy array sharing memory with the CPU tensor ``t`` (no copy).

    A tensor that requires grad raises TypeError (pass ``t.detach()``); a
    non-contiguous one ValueError (its elements must be read in C order).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.requires_grad:
        raise TypeError(f"{name}: the tensor requires grad; pass {name}.detach()")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous())")
    if t.dtype == torch.bfloat16:
        u = t.view(torch.int16).numpy().view(np.uint16)
        return u.view(BFLOAT16) if BFLOAT16 is not None else u
    return t.numpy()


def as_tensor(a):
    """A CPU tensor sharing memory with the NumPy array ``a`` (bfloat16
    arrays become bfloat16 tensors through a uint16 view)."""
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
