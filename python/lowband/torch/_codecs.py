"""Torch-native codecs for ``compression_hook`` on tensors the C core cannot
read (CUDA and other devices), selectable on CPU with ``backend="torch"``.

Same semantics as the C path, codec by codec: top-k by magnitude (indices
sent ascending), chunked top-k (the k largest |x| of each chunk, ties to the
lower index, as lowband's kernel orders them), threshold (every |x| >= tau),
random-k on lowband's shared-seed indices, scaled sign (code 1 for x >= 0;
scale "l1" = mean |x|, "rms" = ||x|| / sqrt(n) or "none", per block or per
tensor chunk), blockwise absmax quantization (scale = the smallest float32
>= absmax / Q, nearest-even or stochastic rounding), QSGD (norm per block or
chunk, stochastic levels) and float16/bfloat16 casts.  Random numbers
(random-k indices, the 24-bit uniforms of stochastic rounding and QSGD) are
lowband's Philox streams drawn by the C core on the host, so both backends
draw the same ones.  The collectives are the C path's too.  Sparse
messages are the C path's: the selection runs on the device, the k
selected (index, value) pairs go to the host as a ``lowband.Sparse``
payload, which the hook all-gathers as ``lowband.encode`` bytes (header,
the smallest index encoding, CRC-32C) and averages with
``lowband.aggregate`` exactly as for CPU tensors; only the mean goes back
to the device.  Random-k values and casts are allreduced, quantized codes
take the two-phase compressed allreduce with worker and server error; a
quantized message is exactly the payload's arrays (float32 scales and the
LSB-first packed codes), byte for byte, without lowband's header and
checksum.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _core
from .._payload import Sparse, index_dtype
from .._schemes import QSGDScheme, nblocks, packed_bytes
from .._validate import resolve_k
from ..compressors import QSGD, Blockwise, Cast, ChunkedTopK, Identity, RandomK, Sign, Threshold, TopK, from_spec
from ..sim import chunk_bounds
from ._interop import as_numpy

__all__ = ["check_supported", "TorchSlot", "compress_bucket", "sparse_messages"]

_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_BITS = None


SUPPORTED = ("topk:K", "chunked:CHUNK:K (1-D chunks)", "threshold:TAU", "randomk:K",
             "sign[:l1|rms|none][:block=B]", "blockwise:BITS[:block=B][:rounding=nearest|stochastic]",
             "qsgd:LEVELS[:block=B]", "fp16", "bf16", "none")

# lowband.h's Philox stream domains (LB_DOMAIN_STOCHASTIC_ROUND, LB_DOMAIN_QSGD)
_DOMAIN_STOCHASTIC_ROUND, _DOMAIN_QSGD = 3, 4


def _supported(comp):
    if isinstance(comp, (TopK, RandomK, Cast, Identity, Threshold, Blockwise, QSGD)):
        return True
    if isinstance(comp, Sign):
        return comp.scale != "two_means"
    return isinstance(comp, ChunkedTopK) and not isinstance(comp.chunk, tuple)


def check_supported(comp, feedback):
    """ValueError unless the torch backend implements this combination."""
    if not _supported(comp):
        raise ValueError(f"compressor: backend='torch' implements {', '.join(SUPPORTED)}; "
                         f"got {comp.spec!r}")
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


def _pack_codes(codes, bits):
    """uint8 codes (< 2^bits) -> lowband's LSB-first bit stream."""
    if bits == 1:
        return _pack(codes != 0)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    return _pack(((codes.view(-1, 1) >> shifts) & 1).view(-1) != 0)


def _unpack_codes(packed, bits, n):
    if bits == 1:
        return _unpack(packed, n).to(torch.uint8)
    b = _unpack(packed, n * bits).view(n, bits).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    return (b << shifts).sum(dim=1, dtype=torch.uint8)


def _f32_up(v):
    """The smallest float32 >= v (v float64 >= 0), as lowband rounds scales."""
    f = v.float()
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, float("inf"))), f)


def _block_rows(x, block, fill=0.0):
    """x (n,) as (blocks, width) rows padded with ``fill`` (block 0: one row)."""
    n = x.numel()
    width = block or max(n, 1)
    rows = -(-n // width) if block else 1
    if rows * width == n:
        return x.view(rows, width)
    pad = x.new_full((rows * width - n,), fill)
    return torch.cat([x, pad]).view(rows, width)


def _per_element(v, block, n):
    return v.repeat_interleave(block or max(n, 1))[:n] if n else v[:0]


def _uniforms24(seed, step, domain, n, device):
    """lowband's 24-bit uniform of each element (the C core's Philox stream,
    drawn on the host: the same numbers as every other backend)."""
    words = _core.philox(seed, step, domain, 0, n) >> np.uint32(8)
    return torch.from_numpy(words.astype(np.int32)).to(device)


def _uniforms16(seed, step, domain, n, device):
    """Stochastic blockwise rounding's 16-bit draw of each element, as the
    24-bit uniform u * 2^8 (the C core's stream: element 128 g + 64 h +
    16 l + j takes bits [16 h, 16 h + 16) of word l of Philox block 16 g + j)."""
    groups = -(-n // 128)
    w = _core.philox(seed, step, domain, 0, 64 * groups).reshape(groups, 16, 4).transpose(0, 2, 1)
    u = np.stack([w & np.uint32(0xFFFF), w >> np.uint32(16)], axis=1).reshape(-1)[:n]
    return torch.from_numpy((u << np.uint32(8)).astype(np.int32)).to(device)


def _smq(x, unit, L, u24):
    """Sign-magnitude codes: L + round(|x| / unit), L - ... for x < 0, in x's
    precision (nearest even, or stochastic with the 24-bit uniforms)."""
    t = x.abs() / unit
    if u24 is None:
        level = torch.round(t)
    else:
        f = torch.floor(t)
        level = f + (u24.to(x.dtype) < (t - f) * float(1 << 24)).to(x.dtype)
    level = torch.clamp(level, max=float(L))
    zero = unit == 0
    level = torch.where(zero, torch.zeros_like(level), level)
    codes = torch.where((x < 0) & ~zero, L - level, L + level)
    return codes.to(torch.uint8)


class _Quant:
    """A quantizer's fixed-size message: float32 scales (one per block, or
    per tensor) then the packed codes: the arrays of lowband's payload, so
    the bytes on the wire are the same count."""

    def __init__(self, comp):
        self.comp = comp
        if isinstance(comp, Sign):
            self.bits, self.block = 1, comp.block or 0
        elif isinstance(comp, Blockwise):
            self.bits, self.block = comp.bits, comp.block
        else:
            self.bits, self.block = QSGDScheme.code_bits(comp.levels), comp.block or 0

    def nscales(self, n):
        if isinstance(self.comp, Sign) and self.comp.scale == "none":
            return 0
        return nblocks(n, self.block)

    def size(self, n):
        return 4 * self.nscales(n) + packed_bytes(n, self.bits)

    def encode(self, x, comp):
        """(message, decoded) of x; ``comp`` is the slot's compressor (its
        step counter numbers the random streams as the C path does)."""
        c = self.comp
        n = x.numel()
        out_dtype = x.dtype
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()           # half inputs are quantized from float32, as in C
        if isinstance(c, Sign):
            codes = (x >= 0).to(torch.uint8)
            if c.scale == "none" or n == 0:
                scales = torch.zeros(self.nscales(n), dtype=torch.float32, device=x.device)
            else:
                rows = _block_rows(x.double(), self.block)
                counts = torch.full((rows.shape[0],), float(rows.shape[1]), dtype=torch.float64,
                                    device=x.device)
                counts[-1] = n - (rows.shape[0] - 1) * rows.shape[1]
                v = rows.abs().sum(dim=1) if c.scale == "l1" else rows.square().sum(dim=1)
                scales = (v / counts if c.scale == "l1" else (v / counts).sqrt()).float()
        elif isinstance(c, Blockwise):
            Q = 1 if c.bits == 1 else (1 << (c.bits - 1)) - 1
            if n == 0:
                scales = torch.zeros(self.nscales(0), dtype=torch.float32, device=x.device)
                codes = x.new_zeros(0, dtype=torch.uint8)
            else:
                scales = _f32_up(_block_rows(x.double().abs(), self.block).amax(dim=1) / Q)
            stochastic = c.rounding == "stochastic"
            step = comp.step
            if stochastic:
                comp.step += 1
            if n:
                unit = _per_element(scales, self.block, n).to(x.dtype)
                u24 = _uniforms16(c.seed, step, _DOMAIN_STOCHASTIC_ROUND, n, x.device) if stochastic else None
                if c.bits == 1:
                    if u24 is None:
                        codes = (x >= 0).to(torch.uint8)
                    else:
                        p = (x / unit + 1) * 0.5
                        codes = (u24.to(x.dtype) < p * float(1 << 24)).to(torch.uint8)
                    codes[unit == 0] = 1
                else:
                    codes = _smq(x, unit, Q, u24)
        else:   # QSGD
            step = comp.step
            comp.step += 1
            sums = _block_rows(x.double(), self.block).square().sum(dim=1) if n else \
                torch.zeros(self.nscales(0), dtype=torch.float64, device=x.device)
            scales = _f32_up(sums.sqrt())
            if n:
                unit = (scales.to(x.dtype) / c.levels).to(x.dtype)
                codes = _smq(x, _per_element(unit, self.block, n), c.levels,
                             _uniforms24(c.seed, step, _DOMAIN_QSGD, n, x.device))
            else:
                codes = x.new_zeros(0, dtype=torch.uint8)
        msg = torch.cat([scales.contiguous().view(torch.uint8), _pack_codes(codes, self.bits)])
        return msg, self._values(codes, scales, n, out_dtype)

    def _values(self, codes, scales, n, dtype):
        """table[code] * scale in the work precision (float64 for float64,
        else float32), then rounded to dtype: lowband's table decoder."""
        c = self.comp
        wd = torch.float64 if dtype == torch.float64 else torch.float32
        code = codes.to(wd)
        if isinstance(c, Sign):
            v = 2 * code - 1
            if c.scale != "none":
                v = v * _per_element(scales.to(wd), self.block, n)
        elif isinstance(c, Blockwise):
            v = (2 * code - 1) if c.bits == 1 else code - ((1 << (c.bits - 1)) - 1)
            v = v * _per_element(scales.to(wd), self.block, n)
        else:
            unit = scales.to(wd) / c.levels
            v = (code - c.levels) * _per_element(unit, self.block, n)
        return v.to(dtype)

    def decode(self, msg, n, dtype):
        k = self.nscales(n)
        scales = msg[:4 * k].clone().view(torch.float32)   # (offsets need not be aligned)
        codes = _unpack_codes(msg[4 * k:], self.bits, n)
        return self._values(codes, scales, n, dtype)


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
        self.quant = _Quant(self.comp) if isinstance(self.comp, (Sign, Blockwise, QSGD)) else None
        if self.quant is not None:
            if feedback == "ef":
                b = chunk_bounds(n, comm.world_size)
                self.worker = torch.zeros(n, dtype=grad.dtype, device=grad.device)
                self.server = torch.zeros(b[comm.rank + 1] - b[comm.rank], dtype=grad.dtype, device=grad.device)
        elif feedback == "ef":
            self.error = torch.zeros(n, dtype=grad.dtype, device=grad.device)
        if isinstance(self.comp, (TopK, RandomK)):
            self.k = resolve_k(n, self.comp.k, self.comp.ratio)
        elif isinstance(self.comp, ChunkedTopK):
            c, kc = self.comp.chunk, self.comp.k_per_chunk
            self.k = (n // c) * kc + min(kc, n % c)

    def save(self):
        return {"t": self.t, "comp_step": self.comp.step, **{k: (None if getattr(self, k) is None else getattr(self, k).detach().cpu().clone())
                                for k in ("error", "worker", "server")}}

    def load(self, saved, where):
        for k in ("error", "worker", "server"):
            mine, theirs = getattr(self, k), saved.get(k)
            if (mine is None) != (theirs is None) or (mine is not None and theirs.shape != mine.shape):
                raise ValueError(f"state: {where} {k} does not fit this tensor")
            if mine is not None:
                mine.copy_(theirs)
        self.t = int(saved["t"])
        self.comp.step = int(saved.get("comp_step", 0))

    def compensated(self, g):
        """p = g + e (a new tensor) with EF, else g itself."""
        return g + self.error if self.error is not None else g


def compress_bucket(comm, pairs, collective):
    """pairs: (TorchSlot, grad view) of the summable and quantized codecs;
    each grad <- its mean over ranks."""
    comp = pairs[0][0].comp
    if isinstance(comp, (TopK, ChunkedTopK, Threshold)):
        raise TypeError("compress_bucket: sparse codecs go through sparse_messages and the allgather")
    if isinstance(comp, (Sign, Blockwise, QSGD)):
        _two_phase(comm, pairs)
    else:
        _summable(comm, pairs)


def _magnitude_keys(p):
    """Integers that order like |p| (the raw bits with the sign cleared, as
    lowband's selection kernels compare: Inf above finite values, NaN above
    Inf)."""
    if p.dtype == torch.float64:
        return p.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    if p.dtype == torch.float32:
        return p.view(torch.int32) & 0x7FFFFFFF
    return p.abs()


def _chunk_top(keys, chunk, k):
    """Positions of the k largest keys of each ``chunk`` (ties to the lower
    position; a last, shorter chunk keeps min(k, its size)), ascending."""
    n = keys.numel()
    full = n // chunk
    picks = []
    if full and k:
        order = torch.sort(keys[:full * chunk].view(full, chunk), dim=1, descending=True, stable=True).indices
        base = torch.arange(full, device=keys.device).view(-1, 1) * chunk
        picks.append((order[:, :k] + base).view(-1))
    rest = n - full * chunk
    if rest and k:
        order = torch.sort(keys[full * chunk:], descending=True, stable=True).indices
        picks.append(order[:min(k, rest)] + full * chunk)
    if not picks:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    return torch.cat(picks).sort().values


def _select(st, p):
    """Ascending int64 positions that ``st``'s sparsifier keeps of p."""
    comp = st.comp
    if isinstance(comp, TopK):
        return torch.topk(p.abs(), st.k, sorted=False).indices.sort().values
    if isinstance(comp, ChunkedTopK):
        return _chunk_top(_magnitude_keys(p), comp.chunk, comp.k_per_chunk)
    mag = p.abs()     # Threshold: |p| >= tau, NaN counted as +Inf
    return torch.nonzero((mag >= comp.tau) | torch.isnan(mag)).view(-1)


def sparse_messages(pairs):
    """The ``lowband.Sparse`` payload of each (TorchSlot, grad) pair, equal
    to the C path's: the selection and the error update run on the
    gradient's device, then the k (index, value) pairs go to the host
    (``.cpu()``: a no-op for CPU tensors) as the payload's arrays, to be
    sent through the C path's allgather of encoded payloads."""
    out = []
    for st, g in pairs:
        p = st.compensated(g.reshape(-1))
        idx = _select(st, p)
        vals = p[idx]
        if st.error is not None:
            st.error.copy_(p)
            st.error[idx] = 0
        st.t += 1
        values = as_numpy(vals.cpu(), "values")
        out.append(Sparse._make(idx.cpu().numpy().astype(index_dtype(st.n)), values, (st.n,), values.dtype))
    return out


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


def _two_phase(comm, pairs):
    """Quantized codes (sign, blockwise, QSGD) through DeepSpeed's two-phase
    compressed allreduce, in the C path's order and arithmetic: chunk j of
    every tensor (compensated by the worker error) goes to rank j in one
    ``all_to_all_single``, which averages the decoded chunks, adds its
    server error, re-quantizes, and all-gathers the replies."""
    W, rank = comm.world_size, comm.rank
    to_rank = [[] for _ in range(W)]
    bounds = []
    for st, g in pairs:
        x = g.reshape(-1)
        z = x + st.worker if st.worker is not None else x
        b = chunk_bounds(st.n, W)
        bounds.append(b)
        for j in range(W):
            msg, dec = st.quant.encode(z[b[j]:b[j + 1]], st.comp)
            if st.worker is not None:
                torch.sub(z[b[j]:b[j + 1]], dec, out=st.worker[b[j]:b[j + 1]])
            to_rank[j].append(msg)
        st.t += 1
    in_splits = [sum(m.numel() for m in row) for row in to_rank]
    send = torch.cat([m for row in to_rank for m in row])
    # what rank i sends here: its messages for this rank's chunks
    mine = [st.quant.size(b[rank + 1] - b[rank]) for (st, _), b in zip(pairs, bounds)]
    out_splits = [sum(mine)] * W
    recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=send.device)
    comm._all_to_all(recv, send, out_splits, in_splits).wait()
    replies = []
    for t, ((st, g), b) in enumerate(zip(pairs, bounds)):
        L = b[rank + 1] - b[rank]
        at = [i * out_splits[0] + sum(mine[:t]) for i in range(W)]
        total = st.quant.decode(recv[at[0]:at[0] + mine[t]], L, g.dtype).clone()
        for i in range(1, W):
            total += st.quant.decode(recv[at[i]:at[i] + mine[t]], L, g.dtype)
        total /= W
        if st.server is not None:
            total = total + st.server
        msg, dec = st.quant.encode(total, st.comp)
        if st.server is not None:
            torch.sub(total, dec, out=st.server)
        replies.append(msg)
    reply = torch.cat(replies)
    widths = [sum(st.quant.size(b[i + 1] - b[i]) for (st, _), b in zip(pairs, bounds)) for i in range(W)]
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
            size = st.quant.size(L)
            g.view(-1)[b[i]:b[i + 1]] = st.quant.decode(rows[i, pos:pos + size], L, g.dtype)
            pos += size
