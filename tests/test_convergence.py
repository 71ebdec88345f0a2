"""Convergence outcomes on small problems (seconds each), run on the
in-process cluster: compression with and without error feedback, 1-bit
Adam against Adam, DGC against dense momentum SGD, and byte counters equal
to the payload sizes."""
import numpy as np
import pytest

import lowband
import lowband.optim as O
import lowband.sim as sim
from lowband import feedback as F
from problems import MLP, LeastSquares, digits, worker_batches

W = 4


# ---------------------------------------------------------------------------
# Top-k 1% on heterogeneous least squares: no feedback stalls, EF14, EF21
# and EControl reach the optimum
# ---------------------------------------------------------------------------

LS = LeastSquares(W=W, d=100, m=200, spread=1.0, seed=0)

# arm: (step size in units of 1/L, steps).  EF14 with heterogeneous workers
# plateaus at a distance proportional to the step (the EControl paper's
# observation), so it gets a smaller step; EControl uses eta = delta = k/d.
ARMS = {"none": (0.1, 600), "ef14": (0.01, 1500), "ef21": (0.1, 1000), "econtrol": (0.1, 1500)}


def compressed_gd(comm, prob, arm, steps, lr):
    """Gradient descent where each worker sends top-1% of its gradient
    (through the arm's feedback), the messages are allgathered and every
    rank applies the same update.  Returns (x, distances every 100 steps,
    this rank's payload sizes)."""
    d = prob.d
    topk = lowband.TopK(ratio=0.01)
    like = np.zeros(d)
    feedback = {"none": None, "ef14": F.ErrorFeedback(topk, like), "ef21": F.EF21(topk, like),
                "econtrol": F.EControl(topk, like, eta=0.01)}[arm]
    server = F.EF21Server(like) if arm in ("ef21", "econtrol") else None
    x = np.zeros(d)
    distances, sizes = [], []
    for t in range(steps):
        g = prob.grad(comm.rank, x)
        payload = topk.compress(g) if feedback is None else feedback.step(g)
        sizes.append(payload.nbytes)
        received = comm.allgather(payload)
        direction = server.update(received) if server else lowband.aggregate(received, op="mean")
        x -= lr * direction
        if (t + 1) % 100 == 0:
            distances.append(prob.distance(x))
    return x, distances, sizes


def run_arm(arm):
    cluster = sim.Cluster(W)
    scale, steps = ARMS[arm]
    results = cluster.run(compressed_gd, LS, arm, steps, scale / LS.L)
    xs = [r[0] for r in results]
    for x in xs[1:]:
        assert np.array_equal(x, xs[0])
    return results[0][1], [r[2] for r in results], cluster


def assert_counters_equal_payload_sizes(cluster, sizes):
    """allgather: each rank sends its payload to W-1 peers and receives
    every other rank's payload; nothing else is counted."""
    total = [sum(s) for s in sizes]
    for r in range(W):
        assert cluster.bytes_sent[r] == (W - 1) * total[r]
        assert cluster.bytes_received[r] == sum(total) - total[r]


def test_topk_without_feedback_stalls():
    distances, sizes, cluster = run_arm("none")
    print("distances", distances)
    # far from the optimum and no longer moving: a fixed point of the biased updates
    assert distances[-1] > 0.5
    assert abs(distances[-1] - distances[2]) < 0.05
    assert_counters_equal_payload_sizes(cluster, sizes)


@pytest.mark.parametrize("arm,tolerance", [("ef14", 0.1), ("ef21", 1e-4), ("econtrol", 1e-3)])
def test_error_feedback_reaches_the_optimum(arm, tolerance):
    distances, sizes, cluster = run_arm(arm)
    print("distances", distances)
    assert distances[-1] < tolerance
    assert_counters_equal_payload_sizes(cluster, sizes)


# ---------------------------------------------------------------------------
# MLP on digits
# ---------------------------------------------------------------------------

X_TRAIN, X_TEST, Y_TRAIN, Y_TEST = digits()
BATCH = 32


def train_mlp(comm, mlp, make_opt, steps):
    """This rank's optimizer after `steps` minibatch steps on its shard."""
    x = mlp.init(seed=0)
    opt = make_opt(x, comm)
    for xb, yb in worker_batches(X_TRAIN, Y_TRAIN, comm.rank, W, BATCH, steps):
        opt.step(mlp.loss_grad(x, xb, yb)[1])
    return opt


def evaluate(mlp, make_opt, steps, model=lambda opt: opt.params):
    """(train loss, test accuracy, bytes rank 0 sent) of `model(opt)`, the
    parameters every replica agrees on."""
    cluster = sim.Cluster(W)
    xs = [model(opt) for opt in cluster.run(train_mlp, mlp, make_opt, steps)]
    for x in xs[1:]:
        assert np.array_equal(x, xs[0])
    return (mlp.loss(xs[0], X_TRAIN, Y_TRAIN), mlp.accuracy(xs[0], X_TEST, Y_TEST),
            int(cluster.bytes_sent[0]))


def test_onebit_adam_with_warmup_tracks_adam():
    """1-bit Adam's repro: Adam; 1-bit with 20% warm-up; 0% warm-up; 20%
    warm-up without error feedback.  Digits has pixels that are always 0,
    so the momentum mask ("auto", DeepSpeed's exp_avg_mask) is on."""
    mlp, steps = MLP((64, 64, 10)), 500

    def onebit(freeze, ef=True):
        return lambda x, comm: O.OneBitAdam(x, comm, lr=1e-3, freeze_step=freeze, error_feedback=ef,
                                            momentum_mask="auto")

    adam_loss, adam_acc, adam_bytes = evaluate(mlp, onebit(steps), steps)   # never compresses: Adam
    loss, acc, sent = evaluate(mlp, onebit(steps // 5), steps)
    no_ef_loss, _, _ = evaluate(mlp, onebit(steps // 5, ef=False), steps)
    no_warmup_loss, _, _ = evaluate(mlp, onebit(0), steps)
    print(f"Adam {adam_loss:.4f}/{adam_acc:.4f} ({adam_bytes} B), 1-bit {loss:.4f}/{acc:.4f} ({sent} B), "
          f"no EF {no_ef_loss:.4f}, no warm-up {no_warmup_loss:.4f}")
    assert loss < 1.25 * adam_loss and acc > adam_acc - 0.01
    assert sent < 0.3 * adam_bytes
    assert no_ef_loss > 2 * adam_loss
    assert no_warmup_loss > 1.0


class NaiveTopK(O.Optimizer):
    """The naive arm: top-k of the raw gradient, no memory, allgather,
    momentum SGD on the average."""

    def __init__(self, params, comm, lr, momentum, ratio):
        super().__init__(params, comm)
        self.sgd = O.SGD(params, lr, momentum)
        self.topk = lowband.TopK(ratio=ratio)

    def step(self, grad):
        self.sgd.step(lowband.aggregate(self.comm.allgather(self.topk.compress(grad)), op="mean"))


def test_dgc_at_999_per_mille_sparsity_matches_dense_sgd_on_digits():
    """DGC's repro: dense momentum SGD, naive top-k and DGC at 0.1% density.
    The sparsity warm-up takes 30 steps per stage (4 stages: 20% of the run;
    the paper spends one epoch per stage out of 90 or more)."""
    mlp, steps = MLP((64, 128, 10)), 600
    dense_loss, dense_acc, dense_bytes = evaluate(
        mlp, lambda x, comm: O.SGD(x, 0.05, 0.9, comm=comm), steps)
    dgc_loss, dgc_acc, dgc_bytes = evaluate(
        mlp, lambda x, comm: O.DGCSGD(x, comm, 0.05, 0.9, ratio=0.001, tensors=mlp.shapes,
                                      warmup_steps=30), steps)
    naive_loss, naive_acc, _ = evaluate(
        mlp, lambda x, comm: NaiveTopK(x, comm, 0.05, 0.9, ratio=0.001), steps)
    print(f"dense {dense_acc:.4f} ({dense_bytes} B), DGC {dgc_acc:.4f} ({dgc_bytes} B), naive {naive_acc:.4f}")
    assert dense_acc > 0.95
    assert dgc_acc >= dense_acc - 0.01
    assert dgc_bytes < dense_bytes / 10       # warm-up stages included
    assert naive_acc < dgc_acc - 0.02


def test_sparseloco_and_streaming_diloco_on_digits():
    """SparseLoCo's and Streaming DiLoCo's repros, shortened: 4 replicas,
    H = 10 AdamW steps.  SparseLoCo (3.1% per 256-chunk, 2-bit values)
    needs its decayed error feedback; E3M0 outer gradients cost little
    against fp64 ones in streaming (P = 2, tau = 1, alpha = 0.5)."""
    mlp, steps, H = MLP((64, 64, 64, 10)), 400, 10
    layers = [int(np.prod(s)) for s in mlp.shapes]
    inner = lambda p: O.AdamW(p, lr=1e-3, weight_decay=0.0)   # noqa: E731
    arms = {
        "diloco": lambda x, c: O.DiLoCo(x, c, inner, H),
        "sparseloco": lambda x, c: O.DiLoCo.sparseloco(x, c, inner, H, chunk=256, k=8),
        "sparseloco_no_ef": lambda x, c: O.DiLoCo(
            x, c, inner, H, outer_lr=1.0, outer_momentum=0.0, nesterov=False,
            compressor="chunked:256:8+lut2bit", aggregate="contributor_mean"),
        "streaming_e3m0": lambda x, c: O.DiLoCo.streaming(x, c, inner, H, 2, layers=layers),
        "streaming_fp64": lambda x, c: O.DiLoCo.streaming(x, c, inner, H, 2, layers=layers, compressor=None),
    }
    out = {name: evaluate(mlp, make, steps, model=lambda opt: opt.x_global) for name, make in arms.items()}
    print({k: (round(a, 4), round(b, 4), c) for k, (a, b, c) in out.items()})
    loss = {k: v[0] for k, v in out.items()}
    sent = {k: v[2] for k, v in out.items()}
    assert out["sparseloco"][1] > 0.95 and out["streaming_e3m0"][1] > 0.95
    assert loss["sparseloco"] < 0.3 * loss["sparseloco_no_ef"]
    assert sent["sparseloco"] < sent["diloco"] / 50
    assert abs(loss["streaming_e3m0"] - loss["streaming_fp64"]) < 0.1 * loss["streaming_fp64"]
    assert sent["streaming_e3m0"] < sent["streaming_fp64"] / 6

