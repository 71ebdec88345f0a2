"""Benchmark suite: quantization, bit packing and the decode of a top-k
payload (issue targets included)."""
import numpy as np

import lowband
from lowband import _reference
from lowband.bench.harness import Case


def _numpy_sign(x):
    return np.packbits(x >= 0, bitorder="little"), np.float32(np.abs(x).mean())


def _numpy_blockwise4(x, block=64):
    b = x.reshape(-1, block)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(7)
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)), -7, 7).astype(np.int8) + 7
    q = q.reshape(-1).astype(np.uint8)
    return q[0::2] | (q[1::2] << 4), d


def _torch_blockwise4(torch, t, block=64):
    b = t.view(-1, block)
    d = b.abs().amax(dim=1, keepdim=True) / 7
    q = (torch.round(b / d.clamp_min(1e-30)).clamp_(-7, 7) + 7).to(torch.uint8).view(-1)
    return q[0::2] | (q[1::2] << 4), d


def _numpy_stochastic4(x, rng, block=64):
    b = x.reshape(-1, block)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(7)
    t = b / np.where(d == 0, 1, d)
    q = np.floor(t + rng.random(t.shape, dtype=np.float32)).astype(np.int8) + 7
    q = q.reshape(-1).astype(np.uint8)
    return q[0::2] | (q[1::2] << 4), d


def cases(ctx):
    x = ctx.normal()
    n, nb = x.size, x.nbytes
    torch = ctx.torch
    t = torch.from_numpy(x) if torch else None
    copy = ctx.copier(x)
    rng = np.random.default_rng(0)
    out = [
        Case("sign+pack (l1 scale)", lambda: lowband.sign(x),
             {"numpy": lambda: _numpy_sign(x),
              "torch": (lambda: (torch.sign(t), t.abs().mean())) if torch else None},
             nb, copy, {"copy": 1.5, "numpy": 5}, note="numpy: packbits(x >= 0) + mean|x|"),
        Case("blockwise 4-bit nearest (64)", lambda: lowband.quantize(x, 4, block=64),
             {"numpy": lambda: _numpy_blockwise4(x),
              "torch": (lambda: _torch_blockwise4(torch, t)) if torch else None},
             nb, copy, {"copy": 2, "numpy": 10}),
        Case("blockwise 4-bit stochastic (64)",
             lambda: lowband.quantize(x, 4, block=64, rounding="stochastic", seed=1),
             {"numpy": lambda: _numpy_stochastic4(x, rng)}, nb, copy, {"copy": 3}),
    ]
    topk = lowband.topk(x, ratio=0.01)
    wire = lowband.encode(topk)
    dense = np.empty(n, np.float32)

    def decode_topk():
        return lowband.decode(wire).to_dense(out=dense)

    def numpy_decode():
        d = np.zeros(n, np.float32)
        d[topk.indices] = topk.values
        return d

    out.append(Case("decode 1% top-k payload", decode_topk, {"numpy": numpy_decode}, nb, copy,
                    {"copy": 1}, note="decode(bytes) + to_dense; copy = the dense vector"))
    if ctx.quick:
        return out
    q4 = lowband.quantize(x, 4, block=64)
    out.append(Case("dequantize blockwise 4-bit", lambda: q4.dequantize(out=dense),
                    {"numpy": lambda: ((np.stack([q4.codes & 15, q4.codes >> 4], 1).reshape(-1, 64)
                                        .astype(np.float32) - 7) * q4.scales[:, None])},
                    nb, copy))
    out.append(Case("qsgd 127 levels", lambda: lowband.qsgd(x, 127, seed=1), {}, nb, copy))
    out.append(Case("e3m0 minifloat (128)", lambda: lowband.minifloat(x, 3, 0, block=128),
                    {"numpy": lambda: _reference.minifloat(x, 3, 0, 128)}, nb, copy, {"copy": 2},
                    note="numpy: the NumPy twin (float64 arithmetic)"))
    v = topk.values
    out.append(Case("lut2bit of 1% top-k values", lambda: lowband.lut2bit(v), {}, v.nbytes,
                    ctx.copier(v)))
    out.append(Case("cast bfloat16", lambda: lowband.cast(x, "bfloat16"), {}, nb, copy))
    out.append(Case("cast float16", lambda: lowband.cast(x, "float16"),
                    {"numpy": lambda: x.astype(np.float16),
                     "torch": (lambda: t.half()) if torch else None}, nb, copy))
    return out
