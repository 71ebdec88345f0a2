"""Benchmark suite: error feedback fused with its compressor vs the unfused
NumPy/torch sequence (p = e + g; compress p; e = p - D(C(p)))."""
import numpy as np

import lowband
from lowband.bench.harness import Case


def cases(ctx):
    n = ctx.size
    g = ctx.normal()
    torch = ctx.torch
    copy = ctx.copier(g)
    out = []
    k = max(1, n // 100)

    fb = lowband.ErrorFeedback("topk:0.01", np.zeros(n, np.float32))
    e_np = np.zeros(n, np.float32)

    def numpy_ef_topk():
        p = e_np + g
        idx = np.argpartition(np.abs(p), n - k)[n - k:]
        vals = p[idx]
        e_np[:] = p
        e_np[idx] = 0
        return idx, vals

    if torch:
        tg = torch.from_numpy(g)
        te = torch.zeros(n)

        def torch_ef_topk():
            te.add_(tg)
            vals, idx = torch.topk(te.abs(), k, sorted=False)
            sent = te[idx]
            te[idx] = 0
            return idx, sent

    out.append(Case("EF + topk 1% (fused)", lambda: fb.step(g),
                    {"numpy": numpy_ef_topk, "torch": torch_ef_topk if torch else None},
                    g.nbytes, copy, {"numpy": 10, "copy": 2.5}))
    c = min(4096, n)   # chunk (whole chunks at any power-of-two size), 1/32 of it kept
    kc = max(1, c // 32)
    fbc = lowband.ErrorFeedback(f"chunked:{c}:{kc}", np.zeros(n, np.float32))
    rows = e_np[: n - n % c].reshape(-1, c)

    def numpy_ef_chunked():
        p = rows + g[: rows.size].reshape(-1, c)
        idx = np.argpartition(np.abs(p), c - kc, axis=1)[:, -kc:]
        vals = np.take_along_axis(p, idx, axis=1)
        np.put_along_axis(p, idx, 0, axis=1)
        rows[:] = p
        return idx, vals

    out.append(Case("EF + chunked 128/4096 (fused)", lambda: fbc.step(g), {"numpy": numpy_ef_chunked},
                    g.nbytes, copy, note="" if c == 4096 else f"{kc}/{c}: the vector is one chunk"))
    fbs = lowband.ErrorFeedback("sign:l1", np.zeros(n, np.float32))
    e_sign = np.zeros(n, np.float32)

    def numpy_ef_sign():
        p = e_sign + g
        s = np.float32(np.abs(p).mean())
        bits = np.packbits(p >= 0, bitorder="little")
        e_sign[:] = p - np.where(p >= 0, s, -s)
        return bits, s

    if torch:
        te_s = torch.zeros(n)

        def torch_ef_sign():
            te_s.add_(tg)
            s = te_s.abs().mean()
            sgn = te_s >= 0
            te_s.sub_(torch.where(sgn, s, -s))
            return sgn, s

    out.append(Case("EF + sign l1 (fused)", lambda: fbs.step(g),
                    {"numpy": numpy_ef_sign, "torch": torch_ef_sign if torch else None},
                    g.nbytes, copy, {"copy": 2}))
    if ctx.quick:
        return out
    fbq = lowband.ErrorFeedback("blockwise:4", np.zeros(n, np.float32))
    out.append(Case("EF + blockwise 4-bit (fused)", lambda: fbq.step(g), {}, g.nbytes, copy))
    fbr = lowband.ErrorFeedback("randomk:0.01", np.zeros(n, np.float32))
    out.append(Case("EF + randomk 1%", lambda: fbr.step(g), {}, g.nbytes, copy))
    return out
