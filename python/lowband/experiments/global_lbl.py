"""Global-batch vs micro-batch load balancing (Demons in the Detail, Qiu et
al., ACL 2025): the ``global-lbl`` experiment.

Claim: computing the load-balancing loss over the global batch (counts
summed over all micro-batches and data-parallel ranks of an optimizer step)
lets experts specialise by domain clearly more than the usual micro-batch
loss, at similar overall balance.  A micro-batch holds a few sequences,
usually from one domain, so the micro-batch loss asks every domain to use
every expert equally; the global loss only asks the mixture of domains to.

Data: D domains; a sequence comes from one domain, its tokens carry a
noisy domain signature ``mu_d + noise`` (the router can see the domain) and
a random input ``u``; the target is the domain's own map
``tanh(A_d u)`` (A_d a random orthogonal matrix times 1.5), so experts that
specialise by domain help.  Model: ``x + MoELayer(x)`` (softmax top-k,
renormalised as in Megatron and the paper's Qwen models), the prediction is
read from the u-part of the output; Adam on the mean squared error plus the
load-balancing loss.

Batching: one optimizer step = ``accum`` micro-steps x ``ranks`` simulated
data-parallel ranks, each rank's micro-batch one sequence of ``seq_len``
tokens of one random domain.  The ranks of a micro-step run as one forward
call over their concatenated micro-batches: the micro-batch loss is
computed per rank (``scope="sequence"`` with seq_len = the micro-batch: the
mean of the ranks' losses, eq. 3), the global loss by a
``lowband.moe.LoadBalancer`` whose buffer accumulates the counts of every
micro-step and rank of the optimizer step (Algorithm 1: what an all-reduce
of E + 1 counts delivers; P over the concatenation is the mean of the
ranks' P, so the gradient is the data-parallel average); the tests check
this against W separate ranks with a real all-reduce (``lowband.sim.Cluster``).

Metrics (``specialisation``): the mutual information between a token's
domain and its picked experts over H(domain), the top expert's share per
domain, and the busiest expert's load over the mean.  The full size also
sweeps the load-balancing coefficient and pools the loss over 2 ranks'
micro-batches (the paper's "balance batch size" between micro and global).
"""
from __future__ import annotations

import numpy as np

from .. import moe
from .._moe_task import Adam, Residual
from ..sim import _ring_bytes
from .framework import Check, Curve, Experiment, Result, _pyplot, plot_heatmap, progress

_NAMES = {1: "micro-batch LBL", "global": "global-batch LBL"}


class DomainTask:
    """D domains of tokens: x = [mu_d + sigma * noise (sig dims), u (dim)],
    target tanh(A_d u)."""

    def __init__(self, num_domains=4, dim=8, sig_dim=8, sigma=0.5, seed=0):
        rng = np.random.default_rng(seed)
        self.D, self.dim, self.sig_dim, self.sigma = num_domains, dim, sig_dim, sigma
        self.mu = rng.standard_normal((num_domains, sig_dim))
        self.maps = [1.5 * np.linalg.qr(rng.standard_normal((dim, dim)))[0]
                     for _ in range(num_domains)]
        self.d_model = sig_dim + dim

    def tokens(self, domains, rng):
        """(x [T, d_model], target [T, dim]) for the per-token domain labels."""
        domains = np.asarray(domains)
        T = domains.size
        u = rng.standard_normal((T, self.dim))
        x = np.empty((T, self.d_model))
        x[:, :self.sig_dim] = self.mu[domains] + self.sigma * rng.standard_normal((T, self.sig_dim))
        x[:, self.sig_dim:] = u
        target = np.empty((T, self.dim))
        for d in range(self.D):
            rows = domains == d
            target[rows] = np.tanh(u[rows] @ self.maps[d].T)
        return x, target

    def sequences(self, n, seq_len, rng):
        """n sequences (each of one random domain): (x, target, domain per token)."""
        seq_dom = rng.integers(self.D, size=n)
        dom = np.repeat(seq_dom, seq_len)
        x, y = self.tokens(dom, rng)
        return x, y, dom


def specialisation(freq, weights=None):
    """Metrics of an expert_frequency matrix F [D, E] (rows sum to k).

    mi: mutual information (bits) between a token's domain and the expert of
    one of its picks, over H(domain) (0: the experts ignore the domain; 1:
    every expert serves a single domain).  top_share: mean over domains of
    the fraction of the domain's tokens that pick its most used expert
    (uniform routing: k / E).  max_load: the largest expert's share of all
    picks over the mean share (1: perfect overall balance).
    """
    F = np.asarray(freq, np.float64)
    D, E = F.shape
    k = F.sum(axis=1).max()
    pd = np.full(D, 1.0 / D) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    joint = pd[:, None] * F / k
    pe = joint.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log2(joint / (pd[:, None] * pe[None, :])), 0.0)
    hd = -float(np.sum(pd[pd > 0] * np.log2(pd[pd > 0])))
    return dict(mi=float(terms.sum()) / hd if hd > 0 else 0.0,
                top_share=float(F.max(axis=1).mean()),
                max_load=float(pe.max() * E))


def make_model(task, *, balance, ranks, seq_len, num_experts=8, k=2, d_ff=16, aux_coef=0.1,
               seed=0):
    """x + MoELayer(x) (softmax top-k, renormalised) with the load-balancing
    loss pooled over ``balance`` sequences: 1 is the micro-batch loss (one
    rank's micro-batch), 1 < b <= ranks pools b ranks' micro-batches of the
    same micro-step, "global" the whole optimizer step (a LoadBalancer)."""
    if balance == "global":
        scope = dict(aux_scope="global")
    else:
        if not 1 <= balance <= ranks or ranks % balance:
            raise ValueError(f"balance: expected 'global' or a divisor of ranks = {ranks}, got {balance!r}")
        scope = dict(aux_scope="sequence", seq_len=balance * seq_len)
    return Residual(moe.MoELayer(task.d_model, d_ff, num_experts, k, renormalize=True,
                                 aux_coef=aux_coef, seed=seed, **scope))


def evaluate(model, task, x, y, dom):
    """(test MSE, expert frequency [D, E]) on held-out tokens."""
    out = model.forward(x)
    mse = float(((out[:, task.sig_dim:] - y) ** 2).mean())
    return mse, moe.expert_frequency(model.layer.routing, dom, task.D)


def micro_step_grads(model, task, x, y, accum):
    """Forward + backward of one micro-step (the ranks' micro-batches
    concatenated); its gradients are added into ``model.grads`` (the
    layers accumulate, like torch); returns the task loss of the micro-step."""
    out = model.forward(x)
    sd = task.sig_dim
    diff = out[:, sd:] - y
    g = np.zeros_like(out)
    g[:, sd:] = 2.0 * diff / diff.size / accum
    model.backward(g)
    return float((diff ** 2).mean())


def train(task, balance, *, steps, ranks=4, accum=2, seq_len=32, num_experts=8, k=2, d_ff=16,
          aux_coef=0.1, lr=3e-3, seed=0, eval_every=25, eval_seqs=64, bar=None):
    """Trains one model; returns histories and the final metrics.

    ``bar(iterable, desc)``: wraps the step loop (a progress bar) or None.
    """
    rng = np.random.default_rng(seed)
    # the layer adds aux_coef * dLBL/dlogits at every micro-step: divide by
    # the micro-steps so that both losses are averaged over them (Megatron)
    model = make_model(task, balance=balance, ranks=ranks, seq_len=seq_len,
                       num_experts=num_experts, k=k, d_ff=d_ff, aux_coef=aux_coef / accum,
                       seed=seed + 1)
    layer = model.layer
    xt, yt, dt = task.sequences(eval_seqs, seq_len, np.random.default_rng(seed + 10_000))
    opt = Adam(model.params, lr=lr)
    hist = dict(step=[], train_loss=[], lbl=[], test_mse=[], mi=[], top_share=[], max_load=[])
    it = range(1, steps + 1)
    for step in (it if bar is None else bar(it, f"global-lbl: {_NAMES.get(balance, balance)}, seed {seed}")):
        model.zero_grad()          # the micro-steps accumulate into model.grads
        loss = lbl = 0.0
        for _ in range(accum):
            x, y, _ = task.sequences(ranks, seq_len, rng)
            loss += micro_step_grads(model, task, x, y, accum) / accum
            lbl += layer.aux_loss / aux_coef if aux_coef else 0.0
        opt.step(model.grads)
        layer.reset_balance()
        if step % eval_every == 0 or step == steps:
            mse, freq = evaluate(model, task, xt, yt, dt)
            hist["step"].append(step)
            hist["train_loss"].append(loss)
            hist["lbl"].append(lbl)
            hist["test_mse"].append(mse)
            for key, v in specialisation(freq).items():
                hist[key].append(v)
    mse, freq = evaluate(model, task, xt, yt, dt)
    return dict(history=hist, test_mse=mse, freq=freq.tolist(), params=layer.params,
                **specialisation(freq))


# --------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------

THRESHOLDS = {
    # specialisation: normalised MI(domain; expert), 0 = none, 1 = one domain per expert
    "min_mi_gain": 0.1,          # global MI at least 0.1 above micro's ...
    "min_mi_ratio": 1.5,         # ... and at least 1.5x it
    "min_top_share_gain": 0.1,   # each domain's top expert takes 10 points more of its tokens
    # overall balance: the busiest expert's load over the mean load
    "max_load": 1.5,             # global: the busiest expert under 1.5x the mean
    "max_load_gap": 0.2,         # and within 0.2 of the micro-batch loss's
    # the paper's quality gain (lower perplexity), here test MSE
    "max_mse_ratio": 1.0,        # global's test MSE below micro's
}

# the model and data of every size: 4 domains, 8 experts of width 16, top-2
_COMMON = {"num_domains": 4, "num_experts": 8, "k": 2, "d_ff": 16, "seq_len": 32, "accum": 2,
           "aux_coef": 0.1, "lr": 3e-3, "eval_every": 25}
SIZES = {
    "smoke": dict(_COMMON, steps=250, seeds=1, sweep_coef=[], sweep_balance=[]),
    "quick": dict(_COMMON, steps=600, seeds=3, sweep_coef=[], sweep_balance=[]),
    "full": dict(_COMMON, steps=1500, seeds=3, sweep_coef=[0.01, 0.03, 0.3], sweep_balance=[2]),
}

ARMS = {"micro": "micro-batch LBL", "global": "global-batch LBL"}


def _bytes_per_step(p, params, ranks):
    """Bytes one rank sends per optimizer step: the gradient all-reduce
    (ring, float64) plus, for the global loss, E + 1 int64 counts per
    micro-step."""
    n = int(sum(a.size for a in params.values()))
    grad = _ring_bytes(n, 8, ranks)
    return grad, grad + p["accum"] * _ring_bytes(p["num_experts"] + 1, 8, ranks)


def _mean(rs, key):
    return float(np.mean([r[key] for r in rs]))


def _train_arm(p, balance, seed, ranks, coef=None, bar=None):
    task = DomainTask(p["num_domains"], seed=seed)
    return train(task, balance, steps=p["steps"], ranks=ranks, accum=p["accum"],
                 seq_len=p["seq_len"], num_experts=p["num_experts"], k=p["k"], d_ff=p["d_ff"],
                 aux_coef=p["aux_coef"] if coef is None else coef, lr=p["lr"], seed=seed,
                 eval_every=p["eval_every"], bar=bar)


def run(config):
    p, W = config.params, config.workers
    seeds = [config.seed + i for i in range(p["seeds"])]

    def bar(it, desc):
        return progress(it, desc, enabled=config.progress)

    runs = {arm: [_train_arm(p, 1 if arm == "micro" else "global", s, W, bar=bar) for s in seeds]
            for arm in ARMS}
    grad_bytes, global_bytes = _bytes_per_step(p, runs["micro"][0]["params"], W)
    arms, metrics, table = {}, {}, {}
    for arm, label in ARMS.items():
        rs = runs[arm]
        h = rs[0]["history"]
        per = grad_bytes if arm == "micro" else global_bytes
        curve = Curve(label)
        for i, step in enumerate(h["step"]):
            curve.add(step, np.mean([r["history"]["test_mse"][i] for r in rs]), step * per)
        arms[arm] = curve
        for key in ("mi", "top_share", "max_load", "test_mse"):
            metrics[f"{arm}_{key}"] = _mean(rs, key)
        metrics[f"{arm}_mi_per_seed"] = [r["mi"] for r in rs]
        table[label] = {"MI(domain; expert) / H(domain)": metrics[f"{arm}_mi"],
                        "top expert's share per domain": metrics[f"{arm}_top_share"],
                        "busiest expert / mean load": metrics[f"{arm}_max_load"],
                        "test MSE": metrics[f"{arm}_test_mse"],
                        "MI per seed": ", ".join(f"{v:.3f}" for v in metrics[f"{arm}_mi_per_seed"]),
                        "bytes sent per worker": int(p["steps"] * per)}
    # full size: the load-balancing coefficient and the balance batch size
    sweep = {}
    for coef in p["sweep_coef"]:
        for arm in ARMS:
            rs = [_train_arm(p, 1 if arm == "micro" else "global", s, W, coef, bar) for s in seeds]
            sweep[f"{arm}, coef {coef}"] = rs
            table[f"{ARMS[arm]}, coefficient {coef}"] = {
                "MI(domain; expert) / H(domain)": _mean(rs, "mi"),
                "top expert's share per domain": _mean(rs, "top_share"),
                "busiest expert / mean load": _mean(rs, "max_load"), "test MSE": _mean(rs, "test_mse")}
    for b in [b for b in p["sweep_balance"] if b < W and W % b == 0]:   # pools of b ranks
        rs = [_train_arm(p, b, s, W, bar=bar) for s in seeds]
        sweep[f"balance {b}"] = rs
        table[f"LBL over {b} ranks' micro-batches"] = {
            "MI(domain; expert) / H(domain)": _mean(rs, "mi"),
            "top expert's share per domain": _mean(rs, "top_share"),
            "busiest expert / mean load": _mean(rs, "max_load"), "test MSE": _mean(rs, "test_mse")}
    metrics["sweep"] = {k: {"mi": _mean(rs, "mi"), "top_share": _mean(rs, "top_share"),
                            "max_load": _mean(rs, "max_load"), "test_mse": _mean(rs, "test_mse")}
                        for k, rs in sweep.items()}
    first = {arm: np.asarray(runs[arm][0]["freq"]) / p["k"] for arm in ARMS}
    D, E = first["micro"].shape
    heat = np.vstack([first["micro"], first["global"]])
    rows = [f"micro: domain {d}" for d in range(D)] + [f"global: domain {d}" for d in range(D)]

    def draw_heat(path):
        plot_heatmap(path, heat, rows, [f"E{e}" for e in range(E)],
                     title=f"expert load per domain (share of the domain's picks), seed {seeds[0]}",
                     xlabel="expert", ylabel="balance scope: domain")

    def draw_spec(path):
        _plot_specialisation(path, runs, sweep, p)

    return Result(metrics, arms, metric="test MSE", figures=[("expert_load.png", draw_heat),
                                                             ("specialisation.png", draw_spec)],
                  table=table, notes=[
        f"{p['num_domains']} domains, {p['num_experts']} experts (MLP {8 + 8}-{p['d_ff']}-16), "
        f"top-{p['k']} softmax renormalised, LBL coefficient {p['aux_coef']}, Adam lr {p['lr']}",
        f"one optimizer step: {p['accum']} micro-steps x {W} ranks, one sequence of "
        f"{p['seq_len']} tokens (one domain) per rank and micro-step; {p['steps']} steps; "
        f"seeds {seeds} (numbers are means over seeds)",
        "metrics on 64 held-out sequences (16 per domain on average): MI between a token's "
        "domain and each of its picked experts over H(domain); the top expert's share of a "
        "domain's tokens (uniform routing: k/E = 0.25); the busiest expert's share of all "
        "picks over the mean (1 = perfectly balanced)",
        "the ranks of a micro-step run as one forward call over their concatenated micro-batches "
        "(micro LBL per rank's micro-batch; global LBL from a LoadBalancer buffer over the whole "
        "step): the same gradients as separate ranks with an all-reduce of E + 1 counts "
        "(tests/test_experiments_moe.py checks it against lowband.sim.Cluster)"])


def _plot_specialisation(path, runs, sweep, p):
    plt = _pyplot()
    ncols = 2 if p["sweep_coef"] else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.0), squeeze=False)
    ax = axes[0][0]
    for (arm, label), color in zip(ARMS.items(), ("C0", "C1")):
        rs = runs[arm]
        h = rs[0]["history"]
        ax.plot(h["step"], np.mean([r["history"]["mi"] for r in rs], axis=0), color=color,
                label=f"{label}: MI(domain; expert) / H(domain)")
        ax.plot(h["step"], np.mean([r["history"]["top_share"] for r in rs], axis=0), "--",
                color=color, label=f"{label}: top expert's share per domain")
    ax.set_xlabel("step")
    ax.set_ylabel("specialisation by domain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if p["sweep_coef"]:
        ax = axes[0][1]
        coefs = sorted(p["sweep_coef"] + [p["aux_coef"]])
        for arm, label in ARMS.items():
            mi = [_mean(runs[arm] if c == p["aux_coef"] else sweep[f"{arm}, coef {c}"], "mi")
                  for c in coefs]
            ax.plot(coefs, mi, marker="o", label=label)
        for key, rs in sweep.items():
            if key.startswith("balance "):
                ax.plot([p["aux_coef"]], [_mean(rs, "mi")], "s", color="C2",
                        label=f"LBL pooled over {key.split()[1]} ranks' micro-batches")
        ax.set_xscale("log")
        ax.set_xlabel("load-balancing coefficient")
        ax.set_ylabel("MI(domain; expert) / H(domain)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def judge(m, t):
    gain = m["global_mi"] - m["micro_mi"]
    ratio = m["global_mi"] / max(m["micro_mi"], 1e-12)
    top = m["global_top_share"] - m["micro_top_share"]
    gap = m["global_max_load"] - m["micro_max_load"]
    mse = m["global_test_mse"] / m["micro_test_mse"]
    return [
        Check("mi_gain", "global MI(domain; expert) exceeds micro's by min_mi_gain and by min_mi_ratio x",
              [m["global_mi"], m["micro_mi"]], [t["min_mi_gain"], t["min_mi_ratio"]],
              gain >= t["min_mi_gain"] and ratio >= t["min_mi_ratio"],
              "the load-balancing coefficient is too weak to bind the micro-batch arm (both "
              "specialise) or too strong for the global arm; see the coefficient sweep of the full size"),
        Check("top_share_gain", "each domain's top expert takes min_top_share_gain more of its tokens under global",
              [m["global_top_share"], m["micro_top_share"]], t["min_top_share_gain"],
              top >= t["min_top_share_gain"],
              "the routers have not yet separated the domains in a short run"),
        Check("balance", "global's busiest expert under max_load x the mean, within max_load_gap of micro's",
              [m["global_max_load"], m["micro_max_load"]], [t["max_load"], t["max_load_gap"]],
              m["global_max_load"] <= t["max_load"] and gap <= t["max_load_gap"],
              "the global loss lets the domains' experts drift out of balance at this coefficient"),
        Check("quality", "global test MSE / micro test MSE below max_mse_ratio", mse, t["max_mse_ratio"],
              mse < t["max_mse_ratio"],
              "specialisation does not pay off on this task at this size"),
    ]


EXPERIMENT = Experiment(
    name="global-lbl", title="Global-batch load balancing (Demons in the Detail)",
    paper="Qiu et al., ACL 2025 (arXiv 2501.11873)",
    claim="Computing the load-balancing loss over the global batch instead of each micro-batch "
          "lets experts specialise by domain clearly more, at similar overall balance, and "
          "improves the model.",
    thresholds=THRESHOLDS, sizes=SIZES, run=run, judge=judge, engines=("sim",), workers=4,
    setup="Sequences from distinct domains (each token carries a noisy domain signature; the "
          "target is the domain's own nonlinear map); a residual MoE layer trained with Adam "
          "and either the micro-batch load-balancing loss (each rank's micro-batch: one "
          "sequence, one domain) or the global-batch loss (the counts of every micro-batch "
          "and rank of the optimizer step, lowband.moe.LoadBalancer).  --workers sets the "
          "simulated data-parallel ranks.")

