"""Benchmark suite: Seide's two-means sign, majority vote over packed signs
(signSGD / Signum) and natural/linear dithering, against the NumPy way of
doing the same work and a copy of the same data."""
import numpy as np

import lowband
from lowband.bench.harness import Case


def _numpy_two_means(x):
    pos = x >= 0
    npos = int(pos.sum())
    a = x[pos].sum(dtype=np.float64) / max(npos, 1)
    b = -x[~pos].sum(dtype=np.float64) / max(x.size - npos, 1)
    return np.packbits(pos, bitorder="little"), np.float32(a), np.float32(b)


def _numpy_vote(codes, n):
    count = np.zeros(n, np.int32)
    for c in codes:
        count += np.unpackbits(c, count=n, bitorder="little")
    return np.packbits(2 * count >= len(codes), bitorder="little")


def _numpy_dither_natural(x, levels, rng):
    """Natural dithering without the entropy coder (levels + signs as int8)."""
    norm = np.abs(x).max()
    r = np.abs(x) / norm
    _, e = np.frexp(r)
    a = e - 1
    small = a < 1 - levels
    lo = np.where(small, 0, a + levels)
    t = np.where(small, np.ldexp(r, levels - 1), np.ldexp(r, -a) - 1.0)
    m = lo + (rng.random(x.size, dtype=np.float32) < t)
    return np.where(x < 0, -m, m).astype(np.int8), norm


def _numpy_fedzip(x, ratio, iters=4):
    k = max(1, int(ratio * x.size))
    keep = np.argpartition(np.abs(x), x.size - k)[x.size - k:]
    v = np.zeros_like(x)
    v[keep] = x[keep]
    c = np.array([v.min(), (v.min() + v.max()) / 2, v.max()], np.float64)
    for _ in range(iters):
        lab = np.abs(v[:, None] - c[None, :].astype(np.float32)).argmin(axis=1)
        c = np.array([v[lab == j].mean() if (lab == j).any() else c[j] for j in range(3)])
    return lab, c


def cases(ctx):
    x = ctx.normal()
    n, nb = x.size, x.nbytes
    copy = ctx.copier(x)
    rng = np.random.default_rng(0)
    W = 8
    signs = [lowband.sign(ctx.normal(key=f"vote{w}"), scale="none") for w in range(W)]
    codes = [s.codes for s in signs]
    vote_bytes = sum(c.nbytes for c in codes)
    out = [
        Case("sign two_means (per tensor)", lambda: lowband.sign(x, scale="two_means"),
             {"numpy": lambda: _numpy_two_means(x)}, nb, copy, {"numpy": 5},
             note="numpy: packbits(x >= 0) + the two masked means"),
        Case(f"majority vote of {W} packed sign payloads", lambda: lowband.majority_vote(signs),
             {"numpy": lambda: _numpy_vote(codes, n)}, vote_bytes, ctx.copier(np.concatenate(codes)),
             {"numpy": 10}, note="input = the W packed streams; numpy unpacks, sums, repacks"),
        Case("dither natural 8 levels (max norm)", lambda: lowband.dither(x, 8, seed=1),
             {"numpy": lambda: _numpy_dither_natural(x, 8, rng)}, nb, copy,
             note="numpy: levels and signs only, no Elias-gamma coding"),
    ]
    if ctx.quick:
        return out
    q = lowband.dither(x, 8, seed=1)
    dense = np.empty(n, np.float32)
    out.append(Case("dither decode (8 levels)", lambda: q.dequantize(out=dense), {}, nb, copy))
    out.append(Case("dither linear 4 levels (l2 norm)",
                    lambda: lowband.dither(x, 4, partition="linear", norm="l2", seed=1), {}, nb, copy))
    out.append(Case("fedzip 1% (top-z, 3-means, gap coding)", lambda: lowband.fedzip(x, 0.01),
                    {"numpy": lambda: _numpy_fedzip(x, 0.01)}, nb, copy,
                    note="numpy: argpartition top-z + 4 Lloyd iterations, no coding"))
    tm = lowband.sign(x, scale="two_means", block=4096)
    out.append(Case("dequantize two_means (4096)", lambda: tm.dequantize(out=dense), {}, nb, copy))
    return out
