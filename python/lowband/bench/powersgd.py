"""Benchmark suite: PowerSGD's orthogonalisation (modified Gram-Schmidt over
the columns of a tall n x r matrix, in place) against torch's
``_orthogonalize_gram_schmidt`` (the code of its powerSGD_hook) and NumPy's
QR; each implementation first copies the matrix (it works in place), and
the copy column is that copy alone."""
import numpy as np

from lowband.bench.harness import Case
from lowband.powersgd import orthogonalize


def cases(ctx):
    out = []
    torch_gs = None
    if ctx.torch:
        try:
            from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import (
                _orthogonalize_gram_schmidt as torch_gs)
        except Exception:  # torch built without distributed
            torch_gs = None
    for r in (1, 4):
        n = max(ctx.size // r, 1)
        a = ctx.normal(n * r).reshape(n, r)
        work = np.empty_like(a)

        def lowband_orth(a=a, work=work):
            work[...] = a
            return orthogonalize(work, threads=ctx.threads)

        others = {"numpy": (lambda a=a: np.linalg.qr(a)[0])}
        if torch_gs is not None:
            t = ctx.torch.from_numpy(a)
            tw = ctx.torch.empty(1, n, r)

            def torch_orth(t=t, tw=tw):
                tw[0].copy_(t)
                torch_gs(tw)
                return tw
            others["torch"] = torch_orth
        out.append(Case(f"orthogonalize {n}x{r}", lowband_orth, others, a.nbytes, ctx.copier(a),
                        {"torch": 1.0}))
    return out
