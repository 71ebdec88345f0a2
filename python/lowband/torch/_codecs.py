"""Torch-native codecs for ``compression_hook`` on tensors the C core cannot
read (CUDA and other devices), selectable on CPU with ``backend="torch"``.

Same semantics as the C path: top-k by magnitude (indices sent ascending),
random-k on lowband's shared-seed indices (drawn by the C core on the host:
k integers), scaled sign (LSB-first packed bits, code 1 for x >= 0, scale
"l1" = mean |x|, "rms" = ||x|| / sqrt(n), or "none", per tensor chunk in the
two-phase allreduce), float16/bfloat16 casts (round to nearest even), and
the same collectives: top-k messages are all-gathered (one gather per
bucket), random-k values and casts are allreduced, sign codes take the
two-phase compressed allreduce with worker and server error.  On the wire a
message carries the same data as the lowband payload (indices as int32,
values in the gradient's dtype, packed bits plus one float32 scale) without
lowband's header and checksum: every size follows from the tensor shapes
and the compressor, so no size exchange is needed.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _core
from .._validate import resolve_k
from ..compressors import Cast, Identity, RandomK, Sign, TopK, from_spec
from ..sim import chunk_bounds

__all__ = ["check_supported", "TorchSlot", "compress_bucket"]

_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_BITS = None


def check_supported(comp, feedback):
    """ValueError unless the torch backend implements this combination."""
    ok = isinstance(comp, (TopK, RandomK, Cast, Identity)) or (isinstance(comp, Sign) and comp.block is None)
    if not ok:
        raise ValueError(f"compressor: backend='torch' implements topk, randomk, sign (no block), "
                         f"fp16/bf16 casts and none, got {comp.spec!r}")
    if feedback not in ("ef", "none"):
        raise ValueError(f"feedback: backend='torch' implements 'ef' and 'none', got {feedback!r}")


def _pack(bits):
    """bool (n,) -> uint8 (ceil(n/8),), LSB first."""
    n = bits.numel()
    pad = (-n) % 8
    b = torch.cat([bits.to(torch.uint8), bits.new_zeros(pad, dtype=torch.uint8)]) if pad else bits.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (b.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack(packed, n):
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) & weights) != 0).view(-1)[:n]


class TorchSlot:
    """One tensor's state for the torch codecs (flat tensors on the
    gradient's device)."""

    def __init__(self, spec, feedback, grad, comm):
        self.comp = from_spec(spec)
        self.feedback = feedback
        n = grad.numel()
        self.n = n
        self.t = 0
        self.error = None
        self.worker = self.server = None
        if isinstance(self.comp, Sign):
            if feedback == "ef":
                b = chunk_bounds(n, comm.world_size)
                self.worker = torch.zeros(n, dtype=grad.dtype, device=grad.device)
                self.server = torch.zeros(b[comm.rank + 1] - b[comm.rank], dtype=grad.dtype, device=grad.device)
        elif feedback == "ef":
            self.error = torch.zeros(n, dtype=grad.dtype, device=grad.device)
        if isinstance(self.comp, (TopK, RandomK)):
            self.k = resolve_k(n, self.comp.k, self.comp.ratio)
            if n >= 2**31:
                raise ValueError(f"grad: backend='torch' sends int32 indices, got {n} elements")

    def save(self):
        return {"t": self.t, **{k: (None if getattr(self, k) is None else getattr(self, k).detach().cpu().clone())
                                for k in ("error", "worker", "server")}}

    def load(self, saved, where):
        for k in ("error", "worker", "server"):
            mine, theirs = getattr(self, k), saved.get(k)
            if (mine is None) != (theirs is None) or (mine is not None and theirs.shape != mine.shape):
                raise ValueError(f"state: {where} {k} does not fit this tensor")
            if mine is not None:
                mine.copy_(theirs)
        self.t = int(saved["t"])

    def compensated(self, g):
        """p = g + e (a new tensor) with EF, else g itself."""
        return g + self.error if self.error is not None else g


def _sign_chunk(z, scale_mode):
    """(float32 scale, packed uint8 codes, decoded) of one chunk."""
    n = z.numel()
    if n == 0 or scale_mode == "none":
        scale = torch.ones((), dtype=torch.float32, device=z.device)
    elif scale_mode == "l1":
        scale = z.double().abs().sum().div(n).float()
    else:
        scale = z.double().square().sum().div(n).sqrt().float()
    bits = z >= 0
    dec = torch.where(bits, scale.to(z.dtype), -scale.to(z.dtype))
    return scale, _pack(bits), dec


def _sign_bytes(scale, packed):
    return torch.cat([scale.reshape(1).view(torch.uint8), packed])


def _sign_decode(msg, n, dtype):
    scale = msg[:4].clone().view(torch.float32)[0].to(dtype)   # (offsets need not be aligned)
    bits = _unpack(msg[4:], n)
    return torch.where(bits, scale, -scale)


def compress_bucket(comm, pairs, collective):
    """pairs: (TorchSlot, grad view); each grad <- its mean over ranks."""
    comp = pairs[0][0].comp
    if isinstance(comp, TopK):
        _topk(comm, pairs)
    elif isinstance(comp, Sign):
        _sign(comm, pairs)
    else:
        _summable(comm, pairs)


def _topk(comm, pairs):
    W = comm.world_size
    msgs, sizes = [], []
    for st, g in pairs:
        p = st.compensated(g.reshape(-1))
        idx = torch.topk(p.abs(), st.k, sorted=False).indices.sort().values
        vals = p[idx]
        if st.error is not None:
            st.error.copy_(p)
            st.error[idx] = 0
        msg = torch.cat([idx.to(torch.int32).view(torch.uint8), vals.contiguous().view(torch.uint8)])
        msgs.append(msg)
        sizes.append(msg.numel())
        st.t += 1
    send = torch.cat(msgs)
    out = torch.empty(W * send.numel(), dtype=torch.uint8, device=send.device)
    comm._all_gather(out, send).wait()
    rows = out.view(W, -1)
    pos = 0
    for (st, g), size in zip(pairs, sizes):
        flat = g.view(-1)
        flat.zero_()
        k = st.k
        for r in range(W):
            msg = rows[r, pos:pos + size]
            idx = msg[:4 * k].view(torch.int32).long()
            vals = msg[4 * k:].view(g.dtype)
            flat.index_add_(0, idx, vals)
        flat.div_(W)
        pos += size


def _summable(comm, pairs):
    W = comm.world_size
    parts = []
    for st, g in pairs:
        p = st.compensated(g.reshape(-1))
        comp = st.comp
        if isinstance(comp, RandomK):
            step = st.t if st.error is not None else comp.step
            if st.error is None:
                comp.step += 1
            idx = torch.from_numpy(_core.randomk_indices(st.n, st.k, comp.seed, step).astype(np.int64))
            idx = idx.to(p.device)
            vals = p[idx]
            if comp.rescale and st.k:
                vals = vals * (st.n / st.k)
            if st.error is not None:
                st.error.copy_(p)
                st.error[idx] -= vals
            parts.append((vals, idx))
        elif isinstance(comp, Cast):
            codes = p.to(_HALF[comp.dtype])
            if st.error is not None:
                torch.sub(p, codes.to(p.dtype), out=st.error)
            parts.append((codes, None))
        else:   # Identity
            if st.error is not None:
                st.error.zero_()
            parts.append((p.clone() if p.data_ptr() == g.data_ptr() else p, None))
        st.t += 1
    by_dtype = {}
    for t, (vals, _) in enumerate(parts):
        by_dtype.setdefault(vals.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([parts[t][0] for t in ts])
        flat.div_(W)
        comm.allreduce(flat, out=flat)
        pos = 0
        for t in ts:
            st, g = pairs[t]
            vals, idx = parts[t]
            mean = flat[pos:pos + vals.numel()]
            pos += vals.numel()
            out = g.view(-1)
            if idx is None:
                out.copy_(mean)
            else:
                out.zero_()
                out[idx] = mean.to(out.dtype)


def _sign(comm, pairs):
    W, rank = comm.world_size, comm.rank
    mode = pairs[0][0].comp.scale
    to_rank = [[] for _ in range(W)]
    bounds = []
    for st, g in pairs:
        x = g.reshape(-1)
        z = x + st.worker if st.worker is not None else x
        b = chunk_bounds(st.n, W)
        bounds.append(b)
        for j in range(W):
            scale, packed, dec = _sign_chunk(z[b[j]:b[j + 1]], mode)
            if st.worker is not None:
                torch.sub(z[b[j]:b[j + 1]], dec, out=st.worker[b[j]:b[j + 1]])
            to_rank[j].append(_sign_bytes(scale, packed))
        st.t += 1
    in_splits = [sum(m.numel() for m in row) for row in to_rank]
    send = torch.cat([m for row in to_rank for m in row])
    # what rank i sends here: its messages for this rank's chunks
    mine = [[4 + -(-(b[rank + 1] - b[rank]) // 8) for b in bounds] for _ in range(W)]
    out_splits = [sum(row) for row in mine]
    recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=send.device)
    comm._all_to_all(recv, send, out_splits, in_splits).wait()
    replies = []
    pos = 0
    decoded = [[None] * W for _ in pairs]
    for i in range(W):
        for t, b in enumerate(bounds):
            size = mine[i][t]
            decoded[t][i] = recv[pos:pos + size]
            pos += size
    for t, ((st, g), b) in enumerate(zip(pairs, bounds)):
        L = b[rank + 1] - b[rank]
        total = _sign_decode(decoded[t][0], L, g.dtype).clone()
        for i in range(1, W):
            total += _sign_decode(decoded[t][i], L, g.dtype)
        total /= W
        if st.server is not None:
            total = total + st.server
        scale, packed, dec = _sign_chunk(total, mode)
        if st.server is not None:
            torch.sub(total, dec, out=st.server)
        replies.append(_sign_bytes(scale, packed))
    reply = torch.cat(replies)
    widths = [sum(4 + -(-(b[i + 1] - b[i]) // 8) for b in bounds) for i in range(W)]
    width = max(widths)
    padded = torch.zeros(width, dtype=torch.uint8, device=reply.device)
    padded[:reply.numel()] = reply
    gathered = torch.empty(W * width, dtype=torch.uint8, device=reply.device)
    comm._all_gather(gathered, padded).wait()
    rows = gathered.view(W, width)
    for i in range(W):
        pos = 0
        for (st, g), b in zip(pairs, bounds):
            L = b[i + 1] - b[i]
            size = 4 + -(-L // 8)
            g.view(-1)[b[i]:b[i + 1]] = _sign_decode(rows[i, pos:pos + size], L, g.dtype)
            pos += size
