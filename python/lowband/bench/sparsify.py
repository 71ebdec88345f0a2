"""Benchmark suite: sparsification and aggregation (issue targets included)."""
import numpy as np

import lowband
from lowband.bench.harness import Case


def _numpy_sampled(x, k, sample_ratio=0.01):
    """The NumPy way of DGC's selection: threshold from a strided sample."""
    a = np.abs(x)
    s = a[:: int(1 / sample_ratio)]
    ks = max(1, int(np.ceil(k / x.size * s.size)))
    thr = np.partition(s, s.size - ks)[s.size - ks]
    idx = np.flatnonzero(a >= thr)
    return idx, x[idx]


def _torch_sampled(torch, t, k, sample_ratio=0.01):
    a = t.abs()
    s = a[:: int(1 / sample_ratio)]
    ks = max(1, int(np.ceil(k / t.numel() * s.numel())))
    thr = torch.topk(s, ks, sorted=False).values.min()
    idx = torch.nonzero(a >= thr).view(-1)
    return idx, t[idx]


def cases(ctx):
    x = ctx.normal()
    n = x.size
    nb = x.nbytes
    torch = ctx.torch
    t = torch.from_numpy(x) if torch else None
    copy = ctx.copier(x)
    out = []
    for label, ratio in (("1%", 0.01), ("0.1%", 0.001)):
        k = int(round(ratio * n))
        out.append(Case(
            f"topk {label}", lambda k=k: lowband.topk(x, k),
            {"numpy": lambda k=k: np.argpartition(np.abs(x), n - k)[n - k:],
             "torch": (lambda k=k: torch.topk(t.abs(), k)) if torch else None},
            nb, copy, {"numpy": 10, "torch": 20, "copy": 3}))
    for label, ratio in (("0.1%", 0.001), ("1%", 0.01)):
        k = int(round(ratio * n))
        out.append(Case(
            f"topk_sampled {label}", lambda ratio=ratio: lowband.topk_sampled(x, ratio, seed=1),
            {"numpy": lambda k=k: _numpy_sampled(x, k),
             "torch": (lambda k=k: _torch_sampled(torch, t, k)) if torch else None},
            nb, copy, {"copy": 2}))
    # aggregate: 8 workers' 1% top-k payloads into one dense mean
    payloads = [lowband.topk(ctx.normal(key=f"worker{w}"), ratio=0.01) for w in range(8)]
    dense = np.empty(n, np.float32)

    def numpy_agg():
        acc = np.zeros(n, np.float32)
        for p in payloads:
            acc[p.indices] += p.values
        acc /= np.float32(len(payloads))
        return acc

    def torch_agg():
        acc = torch.zeros(n)
        for ti, tv in tpay:
            acc.index_add_(0, ti, tv)
        return acc.div_(len(tpay))

    tpay = [(torch.from_numpy(p.indices.astype(np.int64)), torch.from_numpy(p.values)) for p in payloads] if torch else []
    out.append(Case("aggregate 8 x 1% (mean)", lambda: lowband.aggregate(payloads, op="mean", out=dense),
                    {"numpy": numpy_agg, "torch": torch_agg if torch else None},
                    nb, copy, {"copy": 2}, note="copy = one dense vector"))
    if ctx.quick:
        return out
    p1 = payloads[0]
    out.append(Case("to_dense 1%", lambda: p1.to_dense(out=dense),
                    {"numpy": lambda: np.put(np.zeros(n, np.float32), p1.indices, p1.values),
                     "torch": (lambda: torch.zeros(n).index_copy_(0, tpay[0][0], tpay[0][1])) if torch else None},
                    nb, copy))
    k = max(1, n // 100)
    rng = np.random.default_rng(0)
    out.append(Case("randomk 1%", lambda: lowband.randomk(x, k, seed=1, step=2),
                    {"numpy": lambda: x[np.sort(rng.choice(n, k, replace=False))],
                     "torch": (lambda: t[torch.sort(torch.randperm(n)[:k]).values]) if torch else None},
                    nb, copy, {"numpy": 3}))
    tau = 2.576  # ~1% of a standard normal
    out.append(Case("threshold ~1%", lambda: lowband.threshold(x, tau),
                    {"numpy": lambda: x[np.flatnonzero(np.abs(x) >= tau)],
                     "torch": (lambda: t[torch.nonzero(t.abs() >= tau).view(-1)]) if torch else None},
                    nb, copy))
    c = min(4096, n)   # chunk (whole chunks at any power-of-two size), 1/32 of it kept
    kc = max(1, c // 32)
    rows = x[: n - n % c].reshape(-1, c)
    trows = t[: rows.size].view(-1, c) if torch else None
    out.append(Case("topk_chunked 128/4096", lambda: lowband.topk_chunked(x, c, kc),
                    {"numpy": lambda: np.argpartition(np.abs(rows), c - kc, axis=1)[:, -kc:],
                     "torch": (lambda: torch.topk(trows.abs(), kc, dim=1)) if torch else None},
                    nb, copy, {"copy": 2}, note="" if c == 4096 else f"{kc}/{c}: the vector is one chunk"))
    return out
