"""Benchmark suite: many tensors at once.  A model of 100 tensors shaped
like a transformer's (3 of 4 Mi elements, 97 of 1-64 Ki) compressed with
top-k 1% (+ EF14) as one grouped call, against the same work tensor by
tensor from Python ("loop") and on one flat buffer of the same total size
("flat", the target: the grouped call within 1.2x of it, i.e. flat / grouped
>= 0.83).  The model shrinks with --size below 16 Mi."""
import numpy as np

import lowband
from lowband.bench.harness import Case

BIG, N_BIG = 4 << 20, 3
SMALL = [1 << 10, 2 << 10, 4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10]
N_TENSORS = 100


def model_sizes(size):
    """The element counts of the 100 tensors, scaled by size / 16 Mi (<= 1)."""
    f = min(1.0, size / (16 << 20))
    sizes = [BIG] * N_BIG + [SMALL[i % len(SMALL)] for i in range(N_TENSORS - N_BIG)]
    return [max(1, int(s * f)) for s in sizes]


def cases(ctx):
    sizes = model_sizes(ctx.size)
    total = sum(sizes)
    flat_g = ctx.normal(total, key="group")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    grads = [flat_g[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    copy = ctx.copier(flat_g)
    targets = {"flat": 1 / 1.2, "loop": 1.0}
    note = f"{len(sizes)} tensors, {total} elements"
    spec = "topk:0.01"

    group = lowband.GroupedErrorFeedback(spec, grads)
    flat = lowband.ErrorFeedback(spec, flat_g)
    each = [lowband.ErrorFeedback(spec, g) for g in grads]
    objs = [lowband.ErrorFeedback(spec, g) for g in grads]
    out = [Case("EF + topk 1%, 100 tensors, grouped", lambda: group.step(grads),
                {"flat": lambda: flat.step(flat_g),
                 "loop": lambda: [fb.step(g) for fb, g in zip(each, grads)],
                 "step_group": lambda: lowband.ErrorFeedback.step_group(objs, grads)},
                flat_g.nbytes, copy, targets, note)]
    out.append(Case("topk 1%, 100 tensors, grouped", lambda: lowband.topk_group(grads, ratio=0.01),
                    {"flat": lambda: lowband.topk(flat_g, ratio=0.01),
                     "loop": lambda: [lowband.topk(g, ratio=0.01) for g in grads]},
                    flat_g.nbytes, copy, targets, note))
    return out
