"""lowband.optim: each optimizer against a plain NumPy twin of its update
rule, replica consistency, schedules, state dicts and argument checks."""
import functools

import numpy as np
import pytest

import lowband
import lowband.optim as O
import lowband.sim as sim
from helpers import assert_same, make_vector
from problems import LeastSquares
from test_sim import compressed_allreduce_twin

F64 = np.float64


def grads_for(W, steps, n, dtype=F64, seed=0):
    """grads[t][r]: a fixed heavy-tailed gradient per step and rank."""
    return [[make_vector(n, dtype, "heavy", seed=1000 * seed + 10 * t + r) for r in range(W)]
            for t in range(steps)]


def rank_mean(arrays):
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return total / len(arrays)


def run_steps(W, make_opt, grads, x0, extra=None):
    """Every rank builds its optimizer on a copy of x0 and steps through
    grads; returns (params per rank, optimizer per rank, cluster)."""
    cluster = sim.Cluster(W)

    def fn(comm):
        x = x0.copy()
        opt = make_opt(x, comm)
        for step in grads:
            opt.step(step[comm.rank])
        return x, opt

    res = cluster.run(fn)
    return [r[0] for r in res], [r[1] for r in res], cluster


def assert_replicas_agree(xs):
    for r, x in enumerate(xs[1:], 1):
        assert_same(x, xs[0], f"rank {r} vs rank 0")


# ---------------------------------------------------------------------------
# SGD / AdamW (local and data-parallel)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw"])
def test_dense_optimizers_match_torch(kind):
    torch = pytest.importorskip("torch")
    n, steps = 50, 6
    x0 = make_vector(n, F64, seed=3)
    grads = [make_vector(n, F64, seed=t) for t in range(steps)]
    x = x0.copy()
    tx = torch.tensor(x0.copy(), requires_grad=True)
    if kind == "adamw":
        ours = O.AdamW(x, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
        theirs = torch.optim.AdamW([tx], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    else:
        nest = kind == "sgd_nesterov"
        ours = O.SGD(x, 0.1, 0.9, nesterov=nest, weight_decay=0.01)
        theirs = torch.optim.SGD([tx], lr=0.1, momentum=0.9, nesterov=nest, weight_decay=0.01)
    for g in grads:
        ours.step(g)
        tx.grad = torch.tensor(g)
        theirs.step()
    np.testing.assert_allclose(x, tx.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [O.SGD, O.AdamW])
def test_data_parallel_baselines_step_on_the_rank_mean(cls):
    W, n, steps = 3, 40, 4
    grads = grads_for(W, steps, n)
    x0 = make_vector(n, F64, seed=1)
    make = (lambda x, comm: cls(x, 0.05, comm=comm))
    xs, _, cluster = run_steps(W, make, grads, x0)
    assert_replicas_agree(xs)
    local = x0.copy()
    opt = cls(local, 0.05)
    for step in grads:
        opt.step(rank_mean(step))
    assert_same(xs[0], local)
    assert cluster.by_collective["allreduce"]["sent"][0] == steps * 2 * (W - 1) * -(-n // W) * 8


# ---------------------------------------------------------------------------
# 1-bit Adam
# ---------------------------------------------------------------------------

def onebit_adam_twin(x0, grads, lr, betas, eps, wd, freeze_step, W):
    """DeepSpeed's 1-bit Adam in plain NumPy (one process, all ranks)."""
    b1, b2 = betas
    n = x0.size
    x = x0.copy()
    m, v = np.zeros(n), np.zeros(n)
    bounds = sim.chunk_bounds(n, W)
    we = [np.zeros(n) for _ in range(W)]
    se = [np.zeros(bounds[j + 1] - bounds[j]) for j in range(W)]
    sign = lowband.Sign("rms")
    for t, step in enumerate(grads):
        if t < freeze_step:
            g = rank_mean(step)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * (g * g)
        else:
            local = [b1 * m + (1 - b1) * g for g in step]   # every rank's momentum
            m, we, se = compressed_allreduce_twin(local, sign.compress, we, se)
        x = x - lr * (m / (np.sqrt(v) + eps) + wd * x)
    return x, m, v


def test_onebit_adam_matches_twin():
    W, n, steps, freeze = 4, 203, 9, 4
    grads = grads_for(W, steps, n)
    x0 = make_vector(n, F64, seed=5)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    xs, opts, cluster = run_steps(W, lambda x, c: O.OneBitAdam(x, c, **hp, freeze_step=freeze), grads, x0)
    assert_replicas_agree(xs)
    want_x, want_m, want_v = onebit_adam_twin(x0, grads, hp["lr"], hp["betas"], hp["eps"],
                                              hp["weight_decay"], freeze, W)
    np.testing.assert_allclose(xs[0], want_x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(opts[0].exp_avg, want_m, rtol=1e-12, atol=1e-13)
    assert_same(opts[0].exp_avg_sq, opts[3].exp_avg_sq)
    np.testing.assert_allclose(opts[0].exp_avg_sq, want_v, rtol=1e-12)
    # traffic: the compressed stage moves signs (about 2 bits per element
    # per rank) plus headers, far below the dense allreduce of the warm-up
    dense = cluster.by_collective["allreduce"]["sent"][0] / freeze
    compressed = (cluster.by_collective["alltoall"]["sent"][0]
                  + cluster.by_collective["allgather"]["sent"][0]) / (steps - freeze)
    assert compressed < dense / 4


def test_onebit_adam_warmup_is_exact_adam_without_bias_correction():
    W, n, steps = 2, 31, 5
    grads = grads_for(W, steps, n)
    x0 = make_vector(n, F64, seed=6)
    xs, opts, _ = run_steps(W, lambda x, c: O.OneBitAdam(x, c, lr=0.1, freeze_step=steps), grads, x0)
    x, m, v = x0.copy(), np.zeros(n), np.zeros(n)
    for step in grads:
        g = rank_mean(step)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + (1 - 0.999) * (g * g)
        x = x - 0.1 * (m / (np.sqrt(v) + 1e-8))
    np.testing.assert_allclose(xs[0], x, rtol=1e-13, atol=1e-15)
    assert opts[0].t == steps and opts[0].compressing      # the next step would compress


def test_onebit_adam_masks_and_ablation():
    W, n, steps = 2, 64, 6
    grads = grads_for(W, steps, n)
    for step in grads:
        for g in step:
            g[:8] = 0                      # entries whose gradient is always zero
    x0 = make_vector(n, F64, seed=2)
    xs, opts, _ = run_steps(W, lambda x, c: O.OneBitAdam(x, c, lr=0.01, freeze_step=2,
                                                         momentum_mask="auto"), grads, x0)
    assert_same(xs[0][:8], x0[:8])          # masked entries never move
    assert np.array_equal(opts[0].momentum_mask, (np.arange(n) >= 8).astype(F64))
    xs, opts, _ = run_steps(W, lambda x, c: O.OneBitAdam(x, c, lr=0.01, freeze_step=2,
                                                         error_feedback=False), grads, x0)
    assert opts[0].worker_error is None and "worker_error" not in opts[0].state_dict()["arrays"]
    assert_replicas_agree(xs)
    given = np.ones(n)
    given[-3:] = 0
    xs, _, _ = run_steps(W, lambda x, c: O.OneBitAdam(x, c, lr=0.01, freeze_step=0, momentum_mask=given),
                         grads, x0)
    assert_same(xs[0][-3:], x0[-3:])


# ---------------------------------------------------------------------------
# DGC
# ---------------------------------------------------------------------------

def dgcsgd_twin(x0, grads, W, lr, mu, ratio, wd, shapes, nesterov=False, warmup_steps=None):
    """DGCSGD in one process: DGC memories per rank for matrices, dense
    average + local momentum for vectors, weight-decay momentum."""
    x = x0.copy()
    sizes = [int(np.prod(s)) for s in shapes]
    starts = np.cumsum([0] + sizes)
    mem = {(r, i): lowband.DGC(np.zeros(sizes[i]), ratio, momentum=mu, nesterov=nesterov,
                               warmup_steps=warmup_steps)
           for r in range(W) for i, s in enumerate(shapes) if len(s) > 1}
    u = {i: np.zeros(sizes[i]) for i, s in enumerate(shapes) if len(s) == 1}
    b = np.zeros_like(x)
    for step in grads:
        d = np.empty_like(x)
        for i, s in enumerate(shapes):
            sl = slice(starts[i], starts[i + 1])
            if len(s) > 1:
                d[sl] = lowband.aggregate([mem[r, i].step(step[r][sl]) for r in range(W)], op="mean")
            else:
                g = rank_mean([step[r][sl] for r in range(W)])
                u[i] = mu * (u[i] + g) if nesterov else mu * u[i] + g
                d[sl] = u[i] + g if nesterov else u[i]
        b = mu * b + wd * x
        d += wd * x + mu * b if nesterov else b
        x = x - lr * d
    return x


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgcsgd_matches_twin(nesterov):
    W, steps = 3, 12
    shapes = [(20, 30), (30,), (30, 7), (7,)]
    n = sum(int(np.prod(s)) for s in shapes)
    grads = grads_for(W, steps, n, seed=4)
    x0 = make_vector(n, F64, seed=8)
    hp = dict(lr=0.05, momentum=0.9, ratio=0.01, weight_decay=1e-3, nesterov=nesterov, warmup_steps=3)
    xs, opts, cluster = run_steps(W, lambda x, c: O.DGCSGD(x, c, tensors=shapes, **hp), grads, x0)
    assert_replicas_agree(xs)
    want = dgcsgd_twin(x0, grads, W, 0.05, 0.9, 0.01, 1e-3, shapes, nesterov, warmup_steps=3)
    np.testing.assert_allclose(xs[0], want, rtol=1e-12, atol=1e-14)
    assert len(opts[0].memories) == 2 and len(opts[0].dense) == 2
    # one allgather per matrix per step, one allreduce of the 37 bias entries
    assert cluster.by_collective["allreduce"]["sent"][0] == steps * 2 * (W - 1) * -(-37 // W) * 8


def test_dgcsgd_whole_vector_and_clip():
    W, n, steps = 2, 500, 5
    grads = grads_for(W, steps, n)
    x0 = np.zeros(n)
    xs, opts, _ = run_steps(W, lambda x, c: O.DGCSGD(x, c, 0.1, ratio=0.01, clip=1.0), grads, x0)
    assert_replicas_agree(xs)
    assert len(opts[0].memories) == 1 and not opts[0].dense
    # each step moves at most k = 5 coordinates per rank
    assert 0 < np.count_nonzero(xs[0]) <= steps * W * 5


# ---------------------------------------------------------------------------
# DiLoCo
# ---------------------------------------------------------------------------

def test_diloco_with_one_inner_step_is_data_parallel_sgd():
    W, n, steps = 3, 30, 5
    grads = grads_for(W, steps, n)
    x0 = make_vector(n, F64, seed=9)
    make = lambda x, c: O.DiLoCo(x, c, O.SGD(x, 0.1), H=1, outer_lr=1.0, outer_momentum=0.0)  # noqa: E731
    xs, opts, _ = run_steps(W, make, grads, x0)
    assert_replicas_agree(xs)
    ref = x0.copy()
    for step in grads:
        ref -= 0.1 * rank_mean(step)
    np.testing.assert_allclose(xs[0], ref, rtol=1e-12, atol=1e-14)


def diloco_twin(x0, grads, W, inner_lr, H, outer_lr, mu):
    """Plain DiLoCo, one process: W local SGD replicas, outer Nesterov."""
    xg, buf = x0.copy(), np.zeros_like(x0)
    local = [x0.copy() for _ in range(W)]
    for t, step in enumerate(grads, 1):
        for r in range(W):
            local[r] -= inner_lr * step[r]
        if t % H == 0:
            delta = rank_mean([xg - local[r] for r in range(W)])
            buf = mu * buf + delta
            xg = xg - outer_lr * (delta + mu * buf)
            local = [xg.copy() for _ in range(W)]
    return local, xg


def test_diloco_matches_twin():
    W, n, steps, H = 3, 40, 13, 4
    grads = grads_for(W, steps, n)
    x0 = make_vector(n, F64, seed=10)
    xs, opts, cluster = run_steps(W, lambda x, c: O.DiLoCo(x, c, functools.partial(O.SGD, lr=0.05), H=H),
                                  grads, x0)
    local, xg = diloco_twin(x0, grads, W, 0.05, H, 0.7, 0.9)
    for r in range(W):
        np.testing.assert_allclose(xs[r], local[r], rtol=1e-12, atol=1e-14)
        assert_same(opts[r].x_global, opts[0].x_global)
    np.testing.assert_allclose(opts[0].x_global, xg, rtol=1e-12, atol=1e-14)
    # 3 syncs, each a dense allreduce of n float64
    assert cluster.bytes_sent[0] == 3 * 2 * (W - 1) * -(-n // W) * 8


def test_streaming_schedule_fragments_and_overlap():
    W, H, P, tau = 2, 6, 3, 2
    layers = [2, 3, 2, 3, 2, 3]
    n = sum(layers)
    grads = grads_for(W, 20, n)
    x0 = make_vector(n, F64, seed=11)
    cluster = sim.Cluster(W)

    def fn(comm):
        x = x0.copy()
        opt = O.DiLoCo(x, comm, O.SGD(x, 0.1), H=H, fragments=P, layers=layers, overlap=tau,
                       compressor=None)
        log = []
        for t, step in enumerate(grads, 1):
            synced = opt.step(step[comm.rank])
            for p in range(P):
                log.append((t, p, bool(np.array_equal(x[opt.fragments[p]], opt.x_global[opt.fragments[p]]))))
            log.append((t, "synced", tuple(synced)))
        return opt, log

    (opt, log), _ = cluster.run(fn)
    # strided fragments: fragment p holds layers p and p + 3
    assert np.array_equal(opt.fragments[0], np.r_[0:2, 7:10])
    assert np.array_equal(opt.fragments[1], np.r_[2:5, 10:12])
    assert opt.offsets == [0, 2, 4]
    synced = {t: s for t, what, s in log if what == "synced"}
    assert {t: s for t, s in synced.items() if s} == {6: (0,), 8: (1,), 10: (2,), 12: (0,), 14: (1,),
                                                      16: (2,), 18: (0,), 20: (1,)}
    # alpha = 0: local == global on a fragment exactly tau steps after its sync
    equal = {(t, p): e for t, p, e in log if p != "synced"}
    assert equal[6 + tau, 0] and not equal[6 + tau - 1, 0]
    assert equal[8 + tau, 1] and not equal[8 + tau - 1, 1]
    assert not equal[8 + tau, 0]       # fragment 0 has taken more inner steps since


def test_overlap_mixing_with_alpha():
    W, H = 2, 3
    n = 12
    grads = grads_for(W, 4, n)
    x0 = make_vector(n, F64, seed=12)
    cluster = sim.Cluster(W)

    def fn(comm):
        x = x0.copy()
        opt = O.DiLoCo(x, comm, O.SGD(x, 0.1), H=H, overlap=1, alpha=0.5)
        for step in grads[:3]:
            opt.step(step[comm.rank])
        before, xg = x.copy(), opt.x_global.copy()
        opt.step(grads[3][comm.rank])           # inner step 4, then the mix of the step-3 sync
        inner = before - 0.1 * grads[3][comm.rank]
        return x, 0.5 * inner + 0.5 * xg

    for got, want in cluster.run(fn):
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)


def test_sparseloco_configuration_and_consistency():
    W, n, steps = 3, 10000, 12
    grads = grads_for(W, steps, n, dtype=np.float32)
    x0 = make_vector(n, np.float32, seed=13)

    def make(x, comm):
        return O.DiLoCo.sparseloco(x, comm, O.AdamW(x, lr=1e-3, weight_decay=0.1), H=4)

    xs, opts, cluster = run_steps(W, make, grads, x0)
    opt = opts[0]
    assert opt.compressor.spec == "chunked:4096:128+lut2bit"
    assert (opt.beta, opt.aggregate, opt.outer_lr, opt.outer_momentum) == (0.95, "contributor_mean", 1.0, 0.0)
    for r in range(1, W):
        assert_same(opts[r].x_global, opt.x_global)
    # 3 syncs; each rank sends 128 of every 4096 (3.1%) with 2-bit values
    sent = cluster.by_collective["allgather"]["sent"][0] / 3 / (W - 1)
    assert sent < n * 4 * 0.05
    # the residual keeps what was not sent: e != 0, and |e| stays finite
    assert np.isfinite(opt.feedbacks[0].error).all() and np.count_nonzero(opt.feedbacks[0].error) > n // 2


def test_streaming_with_e3m0_outer_gradients():
    W, n, steps = 2, 600, 8
    grads = grads_for(W, steps, n)
    x0 = make_vector(n, F64, seed=14)

    def make(x, comm):
        return O.DiLoCo.streaming(x, comm, O.SGD(x, 0.01), H=4, fragments=2)

    xs, opts, cluster = run_steps(W, make, grads, x0)
    opt = opts[0]
    assert opt.compressor.spec == "minifloat:e3m0" and (opt.overlap, opt.alpha) == (1, 0.5)
    assert_same(opts[1].x_global, opt.x_global)
    assert not np.array_equal(opt.x_global, x0)
    # E3M0: 4 bits per element (+ scales and header) instead of 64
    per_sync = cluster.by_collective["allgather"]["sent"][0] / (W - 1) / 3
    assert per_sync < (n / 2) * 8 / 10


def test_diloco_compressed_mean_without_feedback():
    W, n, steps = 2, 100, 4
    grads = grads_for(W, steps, n)
    x0 = np.zeros(n)
    xs, opts, _ = run_steps(W, lambda x, c: O.DiLoCo(x, c, O.SGD(x, 0.1), H=2, compressor="topk:5",
                                                      outer_momentum=0.0, outer_lr=1.0), grads, x0)
    # two syncs, each moves at most 5 coordinates per rank
    assert np.count_nonzero(opts[0].x_global) <= 2 * W * 5
    assert_replicas_agree(xs)


# ---------------------------------------------------------------------------
# Just One Byte
# ---------------------------------------------------------------------------

def test_perturbation_is_standard_normal_and_reproducible():
    z = O.perturbation(7, 3, 1, 2, 200001)
    assert z.dtype == F64 and z.shape == (200001,)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z ** 4) - 3) < 0.1             # normal kurtosis
    assert_same(z, O.perturbation(7, 3, 1, 2, 200001))
    assert_same(z[:1001], O.perturbation(7, 3, 1, 2, 1001))      # prefix-stable
    others = [O.perturbation(8, 3, 1, 2, 100), O.perturbation(7, 4, 1, 2, 100),
              O.perturbation(7, 3, 0, 2, 100), O.perturbation(7, 3, 1, 3, 100)]
    assert all(not np.array_equal(z[:100], o) for o in others)
    assert O.perturbation(0, 0, 0, 0, 0).shape == (0,)
    with pytest.raises(ValueError, match="machine"):
        O.perturbation(0, 0, 1 << 16, 0, 5)


def zo_problem(W):
    prob = LeastSquares(W=W, d=20, m=30, spread=0.2, seed=1)
    return prob, (lambda rank: (lambda x: float(np.sum((prob.A[rank] @ x - prob.b[rank]) ** 2) / 60)))


@pytest.mark.parametrize("scalar_dtype", ["float64", "float16"])
def test_seed_replay_equals_full_vector_update_bit_for_bit(scalar_dtype):
    W, steps = 3, 15
    prob, loss_of = zo_problem(W)
    results = {}
    for mode in ("replay", "full"):
        cluster = sim.Cluster(W)

        def fn(comm):
            x = np.zeros(prob.d)
            opt = O.SeedReplayZO(x, comm, lr=200.0, eps=1e-3, samples=4, seed=5, mode=mode,
                                 scalar_dtype=scalar_dtype)
            for _ in range(steps):
                opt.step(loss_of(comm.rank))
            return x

        xs = cluster.run(fn)
        assert_replicas_agree(xs)
        results[mode] = (xs[0], cluster.bytes_sent.copy())
    assert_same(results["replay"][0], results["full"][0])
    assert prob.loss(results["replay"][0]) < 0.8 * prob.loss(np.zeros(prob.d))
    # replay sends 4 scalars per round; full sends 4 vectors of d = 20
    itemsize = np.dtype(scalar_dtype).itemsize
    replay_per_round = lowband.Dense(np.zeros(4, scalar_dtype)).nbytes
    assert results["replay"][1][0] == steps * (W - 1) * replay_per_round
    assert results["full"][1][0] == steps * (W - 1) * lowband.Dense(np.zeros((4, 20))).nbytes
    assert replay_per_round - 4 * itemsize < 100


def test_seed_replay_step_is_the_projected_gradient_average():
    # one rank, one sample: x1 = x0 - lr*eps*p*z with p the central difference
    prob, loss_of = zo_problem(1)
    x = make_vector(prob.d, F64, seed=3)
    x0 = x.copy()

    def fn(comm):
        opt = O.SeedReplayZO(x, comm, lr=0.5, eps=1e-4, samples=1, seed=9)
        return opt.step(loss_of(0))

    loss = sim.Cluster(1).run(fn)[0]
    z = O.perturbation(9, 0, 0, 0, prob.d)
    lp, lm = loss_of(0)(x0 + 1e-4 * z), loss_of(0)(x0 - 1e-4 * z)
    p = (lp - lm) / 2e-4
    assert_same(x, x0 - (0.5 * p * 1e-4) * z)
    assert loss == pytest.approx((lp + lm) / 2)


# ---------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------

def _dgc(x, c):
    return O.DGCSGD(x, c, 0.1, ratio=0.05, tensors=[(10, 6), (6,)], weight_decay=1e-3)


MAKERS = {
    "sgd": lambda x, c: O.SGD(x, 0.1, 0.9, comm=c),
    "adamw": lambda x, c: O.AdamW(x, comm=c),
    "onebit": lambda x, c: O.OneBitAdam(x, c, lr=0.01, freeze_step=2, momentum_mask="auto"),
    "dgc": _dgc,
    "diloco": lambda x, c: O.DiLoCo(x, c, O.AdamW(x), H=3, compressor="topk:7", feedback=0.9,
                                    fragments=2, overlap=1, alpha=0.5),
    "sparseloco": lambda x, c: O.DiLoCo.sparseloco(x, c, O.SGD(x, 0.1), H=2, chunk=16, k=4),
    "zo": lambda x, c: O.SeedReplayZO(x, c, samples=2),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_dict_round_trip_continues_exactly(name):
    W, n = 2, 66
    make = MAKERS[name]
    grads = grads_for(W, 9, n)
    x0 = make_vector(n, F64, seed=15)
    prob_loss = lambda r: (lambda x: float(np.sum((x - r) ** 2)))   # noqa: E731

    def advance(opt, step, rank):
        if isinstance(opt, O.SeedReplayZO):
            opt.step(prob_loss(rank))
        else:
            opt.step(step[rank])

    def fn(comm):
        x = x0.copy()
        opt = make(x, comm)
        for step in grads[:4]:
            advance(opt, step, comm.rank)
        saved, saved_x = opt.state_dict(), x.copy()
        for step in grads[4:]:
            advance(opt, step, comm.rank)
        y = saved_x.copy()
        twin = make(y, comm)
        twin.load_state_dict(saved)
        for step in grads[4:]:
            advance(twin, step, comm.rank)
        return x, y, saved

    for x, y, saved in sim.Cluster(W).run(fn):
        assert_same(x, y)
        assert saved["t"] == 4


class _FakeComm:
    rank, world_size = 0, 2

    def __getattr__(self, name):
        if name in ("allreduce", "allgather", "alltoall", "broadcast", "barrier", "compressed_allreduce"):
            return lambda *a, **k: None
        raise AttributeError(name)


def test_load_state_dict_refuses_mismatches():
    x = np.zeros(66)
    opt = O.OneBitAdam(x, _FakeComm(), freeze_step=3)
    state = opt.state_dict()
    with pytest.raises(ValueError, match="expected a OneBitAdam state_dict, got 'SGD'"):
        opt.load_state_dict(O.SGD(x, 0.1, 0.9).state_dict())
    with pytest.raises(ValueError, match="expected a OneBitAdam state_dict, got 'list'"):
        opt.load_state_dict([])
    with pytest.raises(ValueError, match="hyper-parameters"):
        O.OneBitAdam(x, _FakeComm(), freeze_step=4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\['arrays'\]\['exp_avg'\]: expected shape \(65,\), got \(66,\)"):
        O.OneBitAdam(np.zeros(65), _FakeComm(), freeze_step=3).load_state_dict(state)
    with pytest.raises(TypeError, match=r"state\['arrays'\]\['exp_avg'\]: expected dtype float32, got float64"):
        O.OneBitAdam(np.zeros(66, np.float32), _FakeComm(), freeze_step=3).load_state_dict(state)
    bad = dict(state, arrays={k: v for k, v in state["arrays"].items() if k != "worker_error"})
    with pytest.raises(ValueError, match="expected arrays"):
        opt.load_state_dict(bad)
    before = opt.state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict(dict(state, t=-1))
    assert before["t"] == opt.t          # nothing half-loaded


# ---------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------

def test_bad_arguments():
    comm = _FakeComm()
    x = np.zeros(10)
    with pytest.raises(TypeError, match="params: expected a float32 or float64 ndarray, got list"):
        O.SGD([0.0] * 3, 0.1)
    with pytest.raises(TypeError, match="params: expected a float32 or float64 ndarray, got dtype int64"):
        O.SGD(np.zeros(3, np.int64), 0.1)
    with pytest.raises(ValueError, match="params: expected a writeable C-contiguous array"):
        O.SGD(np.zeros(10)[::2], 0.1)
    with pytest.raises(TypeError, match="comm: expected a lowband.sim communicator"):
        O.OneBitAdam(x, object(), freeze_step=1)
    with pytest.raises(ValueError, match="lr: expected a finite number in \\[0.0, inf\\], got -1"):
        O.SGD(x, -1)
    with pytest.raises(ValueError, match="nesterov: Nesterov momentum needs momentum > 0"):
        O.SGD(x, 0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas\\[1\\]"):
        O.AdamW(x, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas: expected a pair"):
        O.AdamW(x, betas=0.9)
    with pytest.raises(TypeError, match="freeze_step"):
        O.OneBitAdam(x, comm)
    with pytest.raises(ValueError, match="freeze_step: expected an int >= 0, got -1"):
        O.OneBitAdam(x, comm, freeze_step=-1)
    with pytest.raises(ValueError, match="momentum_mask: expected 10 elements, got 3"):
        O.OneBitAdam(x, comm, freeze_step=1, momentum_mask=np.ones(3))
    with pytest.raises(ValueError, match="momentum_mask: expected one of 'auto'"):
        O.OneBitAdam(x, comm, freeze_step=1, momentum_mask="always")
    with pytest.raises(ValueError, match="tensors: the shapes hold 12 elements, params has 10"):
        O.DGCSGD(x, comm, 0.1, tensors=[(3, 4)])
    with pytest.raises(ValueError, match="tensors\\[0\\]: expected an int >= 1, got 0"):
        O.DGCSGD(x, comm, 0.1, tensors=[(0, 4)])
    with pytest.raises(TypeError, match="tensors: expected a list of shapes"):
        O.DGCSGD(x, comm, 0.1, tensors="10")
    with pytest.raises(ValueError, match="ratio"):
        O.DGCSGD(x, comm, 0.1, ratio=2.0)
    with pytest.raises(ValueError, match="inner: the inner optimizer must update the same params array"):
        O.DiLoCo(x, comm, O.SGD(np.zeros(10), 0.1), H=2)
    with pytest.raises(TypeError, match="inner: expected an optimizer"):
        O.DiLoCo(x, comm, 3, H=2)
    with pytest.raises(ValueError, match="H: expected an int >= 1, got 0"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=0)
    with pytest.raises(ValueError, match="overlap: expected an int in \\[0, 1\\], got 2"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=2, overlap=2)
    with pytest.raises(ValueError, match="feedback: error feedback needs a compressor"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=2, feedback=0.9)
    with pytest.raises(ValueError, match="aggregate: 'contributor_mean' needs a sparsifying compressor"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=2, compressor="minifloat:e3m0", aggregate="contributor_mean")
    with pytest.raises(ValueError, match="aggregate: expected one of 'mean', 'contributor_mean'"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=2, aggregate="sum")
    with pytest.raises(ValueError, match="fragments: expected at most H = 2 fragments"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=2, fragments=3)
    with pytest.raises(ValueError, match="layers: the sizes add up to 9, params has 10"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=4, fragments=2, layers=[4, 5])
    with pytest.raises(ValueError, match="fragments: expected at most 2 fragments"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=4, fragments=3, layers=[5, 5])
    with pytest.raises(ValueError, match="alpha"):
        O.DiLoCo(x, comm, O.SGD(x, 0.1), H=2, alpha=1.5)
    with pytest.raises(ValueError, match="mode: expected one of 'replay', 'full'"):
        O.SeedReplayZO(x, comm, mode="vector")
    with pytest.raises(ValueError, match="scalar_dtype"):
        O.SeedReplayZO(x, comm, scalar_dtype="int16")
    with pytest.raises(ValueError, match="eps: expected a finite number in \\(0.0, inf\\]"):
        O.SeedReplayZO(x, comm, eps=0)
    with pytest.raises(TypeError, match="seed"):
        O.SeedReplayZO(x, comm, seed=None)
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        O.SeedReplayZO(x, comm).step(3.0)
    opt = O.SGD(x, 0.1)
    with pytest.raises(ValueError, match="grad: expected shape \\(10,\\), got \\(9,\\)"):
        opt.step(np.zeros(9))
    with pytest.raises(TypeError, match="grad: expected dtype float64 \\(the params'\\), got float32"):
        opt.step(np.zeros(10, np.float32))
    with pytest.raises(TypeError, match="grad: expected an ndarray, got list"):
        opt.step([0.0] * 10)


def test_inner_factories():
    x = np.zeros(10)
    for inner in (O.AdamW, functools.partial(O.SGD, lr=0.1), lambda p: O.SGD(p, 0.2)):
        opt = O.DiLoCo(x, _FakeComm(), inner, H=2)
        assert opt.inner.params is x
