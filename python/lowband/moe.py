"""Mixture-of-Experts routing, load balancing and layers (``lowband.moe``).

Routing (C, OpenMP)::

    r = moe.route(logits, k=2)                 # Routing: experts, weights, scores
    loss, dlogits = moe.load_balancing_loss(r) # canonical LBL and its gradient
    plan = moe.dispatch(x, r, capacity=None)   # tokens grouped by expert
    y = plan.combine(expert_out)               # weighted sum per token

The canonical load-balancing loss is ``LBL = E * sum_i f_i * P_i`` with
``f_i = c_i / (T * k)`` (``c_i`` picks of expert i among the T valid
tokens) and ``P_i`` the mean over valid tokens of the full score
distribution (softmax scores; sigmoid scores normalised over the E
experts).  Balanced routing gives 1.  Gradients flow only through P.
``LoadBalancer`` computes it over the global batch (all micro-batches of an
optimizer step and all data-parallel workers; "Demons in the Detail").
docs/moe.md gives the conversions to Hugging Face, DeepSpeed, Megatron and
other conventions.

Every kernel is deterministic: the same bytes for any thread count.
"""
from __future__ import annotations

from ._moe_core import (Dispatch, LoadBalancer, Routing, bias_update, capacity, dispatch,
                        expert_frequency, load_balancing_loss, route, topk_score_sum, z_loss)
from ._moe_layers import ChainOfExperts, MoELayer

__all__ = [
    "Routing", "route", "load_balancing_loss", "LoadBalancer", "z_loss", "bias_update",
    "capacity", "dispatch", "Dispatch", "expert_frequency", "topk_score_sum",
    "MoELayer", "ChainOfExperts",
]

for _obj in (Routing, Dispatch, LoadBalancer, route, load_balancing_loss, z_loss, bias_update,
             capacity, dispatch, expert_frequency, topk_score_sum):
    _obj.__module__ = __name__     # documented and pickled as lowband.moe.<name>
del _obj
