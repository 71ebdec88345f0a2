"""Error feedback on heterogeneous problems.

Part A (EF14: Seide et al. 2014 / Karimireddy et al. 2019; EF21:
Richtárik et al. 2021; EControl: Gao, Islamov, Stich, ICLR 2024): on least
squares whose workers' optima differ, gradient descent where each worker
sends the top 1% of its gradient stalls far from the optimum, while EF14,
EF21 and EControl converge.  A sweep over the spread of the workers'
optima (0 = homogeneous) records where each method ends: EControl's claim
is convergence under arbitrary heterogeneity with a contractive compressor.

Part B (Error Feedback Reloaded, Richtárik, Gasanov, Burlachenko 2024):
with workers of very different smoothness constants L_i, EF21-W with its
step size 1/(L + L_AM xi(alpha)) needs fewer rounds than EF21 with the
classic 1/(L + L_QM xi(alpha)), by up to L_QM / L_AM (non-convex logistic
regression on scikit-learn's breast cancer, Top-1).
"""
from __future__ import annotations

import math

import numpy as np

from .. import feedback as F
from ..compressors import TopK
from ..sparsify import aggregate
from .data import LeastSquares, breast_cancer
from .engines import run_workers
from .framework import Check, Curve, Experiment, Result, plot_curves, progress

THRESHOLDS = {
    "stall_distance": 0.5,        # top-k without feedback ends farther than this from x* ...
    "stall_movement": 0.05,       # ... and moves less than this over the second half
    "ef14_distance": 0.1,         # EF14 (smaller step: it plateaus at a distance ~ step)
    "ef21_distance": 1e-3,
    "econtrol_distance": 1e-3,
    "ef21w_min_speedup": 1.25,    # rounds(EF21, old step) / rounds(EF21-W, new step)
    "sweep_econtrol_distance": 1e-3,  # EControl ends this close to x* at every heterogeneity level
}

SIZES = {
    "smoke": {"d": 50, "m": 100, "steps": {"none": 100, "ef14": 200, "ef21": 200, "econtrol": 200},
              "clients": 10, "max_rounds": 500, "target": 1e-1,
              "sweep": {"spreads": (0.0, 4.0), "steps": 200}},
    "quick": {"d": 100, "m": 200, "steps": {"none": 600, "ef14": 1500, "ef21": 1000, "econtrol": 1500},
              "clients": 10, "max_rounds": 4000, "target": 1e-2,
              "sweep": {"spreads": (0.0, 1.0, 4.0, 16.0), "steps": 1500}},
    "full": {"d": 200, "m": 400, "steps": {"none": 2000, "ef14": 6000, "ef21": 3000, "econtrol": 4000},
             "clients": 20, "max_rounds": 30000, "target": 2e-3,
             "sweep": {"spreads": (0.0, 1.0, 4.0, 16.0, 64.0), "steps": 4000}},
}

# arm: step size in units of 1/L.  EF14 with heterogeneous workers plateaus at
# a distance proportional to the step (the EControl paper's observation), so
# it gets a smaller one; EControl uses eta = k/d.
STEP = {"none": 0.1, "ef14": 0.01, "ef21": 0.1, "econtrol": 0.1}
LABELS = {"none": "top-1% without feedback", "ef14": "EF14", "ef21": "EF21", "econtrol": "EControl"}


def _compressed_gd(comm, prob, arm, steps, lr, show):
    """Each worker sends top-1% of its gradient through the arm's feedback;
    the messages are allgathered and every rank applies the same update."""
    d = prob.d
    topk = TopK(ratio=0.01)
    like = np.zeros(d)
    fb = {"none": None, "ef14": F.ErrorFeedback(topk, like), "ef21": F.EF21(topk, like),
          "econtrol": F.EControl(topk, like, eta=0.01)}[arm]
    server = F.EF21Server(like) if arm in ("ef21", "econtrol") else None
    x = np.zeros(d)
    rec = ([0], [prob.distance(x)], [0])
    every = max(1, steps // 60)
    for t in progress(range(1, steps + 1), f"error-feedback: {arm}", steps, show and comm.rank == 0):
        g = prob.grad(comm.rank, x)
        payload = topk.compress(g) if fb is None else fb.step(g)
        received = comm.allgather(payload)
        x -= lr * (server.update(received) if server else aggregate(received, op="mean"))
        if t % every == 0 or t == steps:
            for lst, v in zip(rec, (t, prob.distance(x), comm.bytes_sent)):
                lst.append(v)
    return (*rec, x)


# --------------------------------------------------------------------------
# Part A': EControl's heterogeneity sweep (Gao, Islamov, Stich 2024, sec. 6)
# --------------------------------------------------------------------------

SWEEP_ARMS = ("ef14", "ef21", "econtrol")


def _sweep_key(spread):
    return f"h{spread:g}".replace(".", "p")


def _sweep_run(prob, arm, steps, lr):
    """The arm's feedback with top-1% on every worker of ``prob`` in one
    loop (mean of the decoded messages, as in part A); returns the final
    ||x - x*|| / ||x*||."""
    topk = TopK(ratio=0.01)
    like = np.zeros(prob.d)
    fbs = [{"ef14": F.ErrorFeedback(topk, like), "ef21": F.EF21(topk, like),
            "econtrol": F.EControl(topk, like, eta=0.01)}[arm] for _ in range(prob.W)]
    server = F.EF21Server(like) if arm in ("ef21", "econtrol") else None
    x = np.zeros(prob.d)
    for _ in range(steps):
        msgs = [fb.step(prob.grad(r, x)) for r, fb in enumerate(fbs)]
        x -= lr * (server.update(msgs) if server else aggregate(msgs, op="mean"))
    return prob.distance(x)


def _sweep(config, sweep):
    """Final distance of every arm at every spread of the workers' optima
    (spread 0: the same optimum up to the label noise)."""
    out = {arm: [] for arm in SWEEP_ARMS}
    p = config.params
    for spread in progress(sweep["spreads"], "error-feedback: heterogeneity sweep", len(sweep["spreads"]),
                           config.progress):
        prob = LeastSquares(W=config.workers, d=p["d"], m=p["m"], spread=spread, seed=config.seed)
        for arm in SWEEP_ARMS:
            out[arm].append(_sweep_run(prob, arm, sweep["steps"], STEP[arm] / prob.L))
    return out


def _plot_sweep(path, spreads, dist):
    from .framework import _pyplot
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arm, ys in dist.items():
        ax.plot(spreads, ys, marker="o", label=LABELS[arm])
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("spread of the workers' optima (heterogeneity)")
    ax.set_ylabel("final ||x - x*|| / ||x*||")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("top-1% with feedback vs heterogeneity")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# Part B: EF21 vs EF21-W on non-convex logistic regression
# --------------------------------------------------------------------------

LAMBDA = 1e-3


class Logistic:
    """f_i(x) = mean log(1 + exp(-y a.x)) + lam * sum x_j^2 / (1 + x_j^2) on
    client i's rows, whose features are scaled by ``scales[i]``."""

    def __init__(self, clients, seed):
        a, y = breast_cancer()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        parts = np.array_split(order, clients)
        scales = np.geomspace(1.0, 30.0, clients)
        self.A = [scales[i] * a[p] for i, p in enumerate(parts)]
        self.y = [y[p] for p in parts]
        self.n, self.d = clients, a.shape[1]
        self.L_i = np.array([np.linalg.norm(ai, 2) ** 2 / (4 * len(ai)) + 2 * LAMBDA for ai in self.A])

    def grad(self, i, x):
        a, y = self.A[i], self.y[i]
        s = -y / (1.0 + np.exp(np.clip(y * (a @ x), -50, 50)))
        return a.T @ s / len(y) + LAMBDA * 2 * x / (1 + x * x) ** 2

    def full_grad(self, x):
        return np.mean([self.grad(i, x) for i in range(self.n)], axis=0)

    def smoothness(self):
        """(L of f: bounded by the Hessian at 0's largest eigenvalue bound, L_AM, L_QM)."""
        big = np.vstack([a / math.sqrt(self.n * len(a)) for a in self.A])
        L = np.linalg.norm(big, 2) ** 2 / 4 + 2 * LAMBDA
        return float(L), float(np.mean(self.L_i)), float(np.sqrt(np.mean(self.L_i ** 2)))


def _xi(alpha):
    r = math.sqrt(1 - alpha)
    return r / (1 - r)


def _ef21_run(prob, weighted, gamma, max_rounds, target, show):
    """EF21 (weighted=False) or EF21-W from x = 0 with Top-1 until
    ||grad f||^2 <= target * ||grad f(0)||^2.  Returns (rounds or None,
    curve steps, curve ||grad||^2 relative, bytes per client)."""
    topk = TopK(1)
    like = np.zeros(prob.d)
    w = prob.L_i / prob.L_i.sum() * prob.n
    clients = [F.EF21W(topk, like, w[i]) if weighted else F.EF21(topk, like) for i in range(prob.n)]
    server = F.EF21Server(like, weights=list(w) if weighted else None)
    x = np.zeros(prob.d)
    g0 = float(np.sum(prob.full_grad(x) ** 2))
    # EF21's start: h_i = g_i(x0) sent once in full (the same for both arms)
    for i, c in enumerate(clients):
        c.h[:] = prob.grad(i, x) / (w[i] if weighted else 1.0)
    server.g[:] = np.mean([(w[i] if weighted else 1.0) * c.h for i, c in enumerate(clients)], axis=0)
    sent = prob.d * 8
    steps, norms, nbytes, reached = [0], [1.0], [sent], None
    label = "EF21-W" if weighted else "EF21"
    for t in progress(range(1, max_rounds + 1), f"error-feedback: {label}", max_rounds, show):
        x -= gamma * server.g
        msgs = [c.step(prob.grad(i, x)) for i, c in enumerate(clients)]
        sent += msgs[0].nbytes
        server.update(msgs)
        if t % 10 == 0:
            rel = float(np.sum(prob.full_grad(x) ** 2)) / g0
            steps.append(t)
            norms.append(rel)
            nbytes.append(sent)
            if rel <= target:
                reached = t
                break
    return reached, steps, norms, nbytes


def run(config):
    p = config.params
    prob = LeastSquares(W=config.workers, d=p["d"], m=p["m"], spread=1.0, seed=config.seed)
    arms, metrics, table = {}, {}, {}
    for arm in ("none", "ef14", "ef21", "econtrol"):
        results, sent = run_workers(config, _compressed_gd, prob, arm, p["steps"][arm], STEP[arm] / prob.L,
                                    config.progress)
        steps, dist, nbytes, x = results[0]
        if any(not np.array_equal(r[3], x) for r in results[1:]):
            raise RuntimeError(f"error-feedback: the replicas of arm {arm!r} disagree")
        arms[arm] = Curve(LABELS[arm], steps, dist, [], nbytes)
        metrics[f"{arm}_distance"] = dist[-1]
        metrics[f"{arm}_bytes"] = int(sent[0])
        half = len(dist) // 2
        metrics[f"{arm}_movement"] = abs(dist[-1] - dist[half])
        table[LABELS[arm]] = {"step (x 1/L)": STEP[arm], "steps": steps[-1], "final ||x - x*|| / ||x*||": dist[-1],
                              "bytes sent per worker": int(sent[0])}

    sweep = p["sweep"]
    sweep_dist = _sweep(config, sweep)
    for arm, ys in sweep_dist.items():
        for spread, v in zip(sweep["spreads"], ys):
            metrics[f"sweep_{arm}_{_sweep_key(spread)}_distance"] = v
    metrics["sweep_econtrol_max_distance"] = max(sweep_dist["econtrol"])
    for arm in SWEEP_ARMS:
        for spread, v in zip(sweep["spreads"], sweep_dist[arm]):
            table[f"{LABELS[arm]}, sweep, spread {spread:g}"] = {
                "step (x 1/L)": STEP[arm], "steps": sweep["steps"], "final ||x - x*|| / ||x*||": v}

    lg = Logistic(p["clients"], config.seed)
    L, L_am, L_qm = lg.smoothness()
    xi = _xi(1.0 / lg.d)
    gamma_old, gamma_new = 1 / (L + L_qm * xi), 1 / (L + L_am * xi)
    b_arms = {}
    for key, weighted, gamma in (("ef21_old", False, gamma_old), ("ef21w_new", True, gamma_new)):
        reached, steps, norms, nbytes = _ef21_run(lg, weighted, gamma, p["max_rounds"], p["target"],
                                                  config.progress)
        label = "EF21, 1/(L + L_QM xi)" if not weighted else "EF21-W, 1/(L + L_AM xi)"
        b_arms[key] = Curve(label, steps, norms, [], nbytes)
        metrics[f"{key}_rounds"] = reached if reached is not None else float("inf")
        table[label] = {"step (x 1/L)": gamma * L, "steps": steps[-1],
                        "rounds to target": reached if reached is not None else "not reached",
                        "bytes sent per worker": nbytes[-1]}
    metrics.update(L=L, L_AM=L_am, L_QM=L_qm, ratio_QM_AM=L_qm / L_am,
                   ef21w_speedup=metrics["ef21_old_rounds"] / metrics["ef21w_new_rounds"])
    title = f"EF21 vs EF21-W, Top-1, {lg.n} clients (L_QM/L_AM = {L_qm / L_am:.2f})"
    return Result(metrics, arms, metric="||x - x*|| / ||x*||", table=table, figures=[
        ("ef21w.png", lambda path: plot_curves(path, b_arms, "||grad f||^2 / ||grad f(x0)||^2", "loss", title)),
        ("heterogeneity.png", lambda path: _plot_sweep(path, sweep["spreads"], sweep_dist))],
        notes=[f"part A: least squares, {config.workers} workers, d = {p['d']}, {p['m']} rows each, local "
               f"optima spread 1.0; top-1% (TopK ratio 0.01) of each worker's message; allgather; "
               f"EControl eta = 0.01",
               f"part A sweep: the same problem with local optima spread "
               f"{', '.join(f'{v:g}' for v in sweep['spreads'])}, {sweep['steps']} steps per arm and "
               f"level, the part A step sizes, all workers in one loop",
               f"part B: non-convex logistic regression (lambda = {LAMBDA}) on breast cancer, "
               f"{lg.n} clients with features scaled by 1..30 (geometric), Top-1 of d = {lg.d}; stop at "
               f"||grad f||^2 <= {p['target']} ||grad f(0)||^2; L = {L:.4g}, L_AM = {L_am:.4g}, "
               f"L_QM = {L_qm:.4g}"])


def judge(m, t):
    checks = [
        Check("no_feedback_stalls", "top-1% without feedback ends far from x* and stops moving",
              [m["none_distance"], m["none_movement"]], [t["stall_distance"], t["stall_movement"]],
              m["none_distance"] > t["stall_distance"] and m["none_movement"] < t["stall_movement"],
              "the workers' optima are not different enough for the biased updates to stall"),
    ]
    for arm in ("ef14", "ef21", "econtrol"):
        checks.append(Check(f"{arm}_converges", f"{LABELS[arm]} ends within {arm}_distance of x*",
                            m[f"{arm}_distance"], t[f"{arm}_distance"], m[f"{arm}_distance"] < t[f"{arm}_distance"],
                            "too few steps at this size for the feedback to cancel the compression bias"))
    checks.append(Check("ef21w_faster", "rounds(EF21, 1/(L+L_QM xi)) / rounds(EF21-W, 1/(L+L_AM xi))",
                        m["ef21w_speedup"], t["ef21w_min_speedup"], m["ef21w_speedup"] >= t["ef21w_min_speedup"],
                        f"L_QM / L_AM is only {m['ratio_QM_AM']:.2f} here, or a run did not reach the target"))
    sweep = sorted((k, v) for k, v in m.items() if k.startswith("sweep_econtrol_h") and k.endswith("_distance"))
    worst = max(sweep, key=lambda kv: kv[1]) if sweep else ("none", float("inf"))
    checks.append(Check("econtrol_any_heterogeneity",
                        "EControl ends within sweep_econtrol_distance of x* at every heterogeneity level",
                        m["sweep_econtrol_max_distance"], t["sweep_econtrol_distance"],
                        m["sweep_econtrol_max_distance"] <= t["sweep_econtrol_distance"],
                        f"worst level {worst[0]!s} ends at {worst[1]:.3g}: too few steps at this size, or "
                        f"EControl's eta too small for that heterogeneity"))
    return checks


EXPERIMENT = Experiment(
    name="error-feedback", title="Error feedback: EF14, EF21, EControl, EF21-W",
    paper="Seide et al. 2014; Richtárik et al. 2021 (EF21); Gao, Islamov, Stich, ICLR 2024 (EControl); "
          "Richtárik, Gasanov, Burlachenko 2024 (Error Feedback Reloaded, arXiv 2402.10774)",
    claim="On a heterogeneous problem top-k 1% without feedback stalls while EF14, EF21 and EControl "
          "converge, EControl reaches x* at every heterogeneity level, and EF21-W with its step size "
          "beats EF21 when the workers' smoothness constants differ.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim", "torch"), workers=4,
    setup="Part A runs the workers on the engine (allgather of the compressed messages); part B is "
          "a server and its clients in one loop (every client's message goes to the server once).")
