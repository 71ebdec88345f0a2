"""SparseLoCo per tensor (Sarfi et al. 2025, the authors' tplr code):
each tensor tiled on its own (tiles never cross a tensor boundary), its
own 2-bit statistics and error buffer; checked against a twin built from
lowband's public top-k, 2-bit and aggregate functions."""
import math

import numpy as np
import pytest

import lowband
import lowband.optim as O
import lowband.sim as sim

SHAPES = [(96, 16), (16,), (40, 64), (64,)]


def test_tile_rule():
    base = lowband.Chain(lowband.ChunkedTopK(4096, 128), "lut2bit")
    cases = {(96, 16): ((48, 16), 24), (128, 128): ((64, 64), 128), (128, 100): ((64, 50), 100),
             (7, 3, 5): ((7, 15), 3), (128,): (128, 4), (10000,): (4096, 128), (3,): (3, 1)}
    for shape, (tile, k) in cases.items():
        comp = O._tensor_compressor(base, shape)
        assert comp.first.chunk == tile and comp.first.k_per_chunk == k, shape
        assert comp.then.spec == "lut2bit"
    assert O._tensor_compressor(lowband.from_spec("minifloat:e3m0"), (8, 8)).spec == "minifloat:e3m0"


def twin(x0, grads, W, H, chunk, k, beta, shapes, lr):
    """SparseLoCo with inner SGD, one process, per tensor: e = beta*e + delta;
    payload = lut2bit(top-k per tile(e)); e -= decoded; contributor mean."""
    sizes = [math.prod(s) for s in shapes]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    xg = x0.copy()
    local = [x0.copy() for _ in range(W)]
    err = [[np.zeros(n) for n in sizes] for _ in range(W)]
    for t, step in enumerate(grads, 1):
        for r in range(W):
            local[r] -= lr * step[r]
        if t % H:
            continue
        for j, shape in enumerate(shapes):
            lo, hi = bounds[j], bounds[j + 1]
            payloads = []
            for r in range(W):
                e = err[r][j]
                e *= beta
                e += xg[lo:hi] - local[r][lo:hi]
                if len(shape) == 2:
                    side = math.isqrt(chunk)         # 64 for the paper's 4096
                    h = max(d for d in range(1, side + 1) if shape[0] % d == 0)
                    w = max(d for d in range(1, side + 1) if shape[1] % d == 0)
                    tile, kt = (h, w), max(1, round(h * w * k / chunk))
                    s = lowband.topk_chunked(e.reshape(shape), tile, kt)
                else:
                    c = min(chunk, shape[0])
                    s = lowband.topk_chunked(e, c, max(1, round(c * k / chunk)))
                q = lowband.Lut2Bit().compress(s.values)
                p = lowband.Sparse._make(s.indices, q, s.shape, s.dtype, s.seed, s.step)
                e -= sim.decoded(p)
                payloads.append(lowband.decode(lowband.encode(p)))
            xg[lo:hi] -= lowband.aggregate(payloads, op="contributor_mean").reshape(-1)
        local = [xg.copy() for _ in range(W)]
    return xg


def test_per_tensor_sparseloco_matches_twin():
    W, H, steps = 3, 2, 6
    n = sum(math.prod(s) for s in SHAPES)
    rng = np.random.default_rng(0)
    grads = [[rng.standard_normal(n) * (1 + 10 * (r == 0)) for r in range(W)] for _ in range(steps)]
    x0 = rng.standard_normal(n)
    cluster = sim.Cluster(W)

    def fn(comm):
        x = x0.copy()
        opt = O.DiLoCo.sparseloco(x, comm, O.SGD(x, 0.1), H=H, chunk=256, k=8, tensors=SHAPES)
        for step in grads:
            opt.step(step[comm.rank])
        return opt

    opts = cluster.run(fn)
    want = twin(x0, grads, W, H, 256, 8, 0.95, SHAPES, 0.1)
    for opt in opts:
        np.testing.assert_allclose(opt.x_global, want, rtol=1e-12, atol=1e-13)
    assert len(opts[0].feedbacks) == len(SHAPES)
    # the state dict round-trips with the per-tensor buffers
    state = opts[0].state_dict()
    assert set(state["children"]) == {"inner"} | {f"feedback.{j}" for j in range(len(SHAPES))}
    assert state["hyper"]["tensors"] == [list(s) for s in SHAPES]


def test_the_smaller_tensor_keeps_its_update():
    """Two 64x64 tensors of 20x different scale: one set of 2-bit statistics
    over the flat vector loses the small tensor's update; per tensor it
    survives."""
    W, shapes = 2, [(64, 64), (64, 64)]
    rng = np.random.default_rng(1)
    scale = np.concatenate([np.ones(4096), np.full(4096, 0.05)])
    grads = [[rng.standard_normal(8192) * scale for _ in range(W)]]
    x0 = np.zeros(8192)

    def run(tensors, values="lut2bit"):
        def fn(comm):
            x = x0.copy()
            opt = O.DiLoCo.sparseloco(x, comm, O.SGD(x, 1.0), H=1, tensors=tensors, values=values)
            opt.step(grads[0][comm.rank])
            return opt.x_global
        return sim.Cluster(W).run(fn)[0]

    # the same coordinates are selected either way (the 64x64 tiles are the
    # flat 4096-chunks here); only the 2-bit statistics differ
    exact = run(shapes, values=None)[4096:]
    errors = {}
    for name, tensors in (("flat", None), ("per tensor", shapes)):
        got = run(tensors)[4096:]
        assert np.array_equal(got != 0, exact != 0)
        errors[name] = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    print(errors)
    assert errors["per tensor"] < 0.5 and errors["flat"] > 0.9


def test_tensors_argument_checks():
    x = np.zeros(20)
    comm = sim.Cluster(1)
    with pytest.raises(ValueError, match="tensors"):
        comm.run(lambda c: O.DiLoCo(x, c, O.SGD(x, 0.1), H=2, tensors=[(4, 4)]))
    with pytest.raises(ValueError, match="layers"):
        comm.run(lambda c: O.DiLoCo(x, c, O.SGD(x, 0.1), H=2, tensors=[(4, 4), (4,)], layers=[10, 10]))
