"""Benchmark suite: the wire format (encode / decode of a 1% top-k payload)."""
import numpy as np

import lowband
from lowband.bench.harness import Case


def cases(ctx):
    x = ctx.normal()
    n = x.size
    copy = ctx.copier(x)
    p = lowband.topk(x, ratio=0.01)
    b = lowband.encode(p)
    dense = np.empty(n, np.float32)
    torch = ctx.torch
    idx64 = p.indices.astype(np.int64)

    def numpy_decode():
        # the NumPy way: raw int64 indices + float32 values, scattered
        raw = idx64.tobytes() + p.values.tobytes()
        k = p.nnz
        i = np.frombuffer(raw, np.int64, k)
        v = np.frombuffer(raw, np.float32, k, offset=8 * k)
        out = np.zeros(n, np.float32)
        out[i] = v
        return out

    def lowband_decode_dense():
        return lowband.decode(b).to_dense(out=dense)

    out = [
        Case("decode 1% topk payload", lambda: lowband.decode(b), {}, x.nbytes, copy, {"copy": 1},
             note=f"{len(b)} bytes"),
        Case("decode + to_dense 1%", lowband_decode_dense,
             {"numpy": numpy_decode,
              "torch": (lambda: torch.zeros(n).index_copy_(0, torch.from_numpy(idx64),
                                                          torch.from_numpy(p.values))) if torch else None},
             x.nbytes, copy, {"copy": 1}),
        Case("encode 1% topk payload", lambda: lowband.encode(p), {}, x.nbytes, copy),
    ]
    return out
