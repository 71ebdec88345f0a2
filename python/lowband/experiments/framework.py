"""The machinery every experiment shares: configuration, curves, checks,
verdicts, results.json / report.md / PNG writers, progress bars and the
MoE heatmap helper.  The contract an experiment module follows is in the
package docstring (``lowband.experiments``)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time

import numpy as np

__all__ = ["Experiment", "Config", "Curve", "Check", "Result", "SIZES", "ENGINES", "progress",
           "plot_curves", "plot_heatmap", "write_outputs", "verdict_of", "fmt"]

SIZES = ("smoke", "quick", "full")
ENGINES = ("sim", "torch")
VERDICTS = ("holds", "partly holds", "does not hold")


# --------------------------------------------------------------------------
# Declarations
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Experiment:
    """One paper's claim as a runnable experiment (see the package doc)."""
    name: str
    title: str
    paper: str
    claim: str
    thresholds: dict
    sizes: dict
    run: object            # run(config) -> Result
    judge: object          # judge(metrics, thresholds) -> [Check]
    engines: tuple = ("sim",)
    workers: int = 4
    setup: str = ""

    def __post_init__(self):
        missing = [s for s in SIZES if s not in self.sizes]
        if missing:
            raise ValueError(f"sizes: experiment {self.name!r} lacks the sizes {missing}")
        bad = [e for e in self.engines if e not in ENGINES]
        if bad:
            raise ValueError(f"engines: expected a subset of {ENGINES}, got {self.engines}")


@dataclasses.dataclass
class Config:
    """What one run of an experiment is asked to do.  ``params`` is the
    experiment's size table entry for ``size`` (filled in by ``configure``)."""
    name: str
    size: str = "quick"
    seed: int = 0
    workers: int = 4
    engine: str = "sim"
    out: str = "lowband-results"
    progress: bool = True
    params: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, key):
        return self.params[key]

    def as_json(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Curve:
    """One arm's trajectory: ``steps`` (x), ``loss`` and optionally
    ``accuracy`` at those steps, and ``bytes`` (cumulative bytes one worker
    has sent by then)."""
    label: str
    steps: list = dataclasses.field(default_factory=list)
    loss: list = dataclasses.field(default_factory=list)
    accuracy: list = dataclasses.field(default_factory=list)
    bytes: list = dataclasses.field(default_factory=list)

    def add(self, step, loss, bytes_sent, accuracy=None):
        self.steps.append(int(step))
        self.loss.append(float(loss))
        self.bytes.append(int(bytes_sent))
        if accuracy is not None:
            self.accuracy.append(float(accuracy))

    def as_json(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Check:
    """One thresholded comparison.  ``holds`` is computed from ``measured``
    and ``threshold`` by the experiment's ``judge``; ``why`` is read only
    when it does not hold."""
    name: str
    statement: str
    measured: object
    threshold: object
    holds: bool
    why: str = ""

    def as_json(self):
        return {"name": self.name, "statement": self.statement, "measured": _jsonable(self.measured),
                "threshold": _jsonable(self.threshold), "holds": bool(self.holds), "why": self.why}


@dataclasses.dataclass
class Result:
    """What ``run(config)`` returns.  ``metrics``: the measured scalars
    the checks read; ``arms``: curves keyed by arm; ``metric``: what the
    curves' ``loss`` is called on the plots; ``figures``: extra plots as
    (file name, draw(path)) pairs; ``table``: report rows
    (arm -> {column: value}); ``notes``: setup lines for the report."""
    metrics: dict
    arms: dict = dataclasses.field(default_factory=dict)
    metric: str = "training loss"
    log_loss: bool = True
    figures: list = dataclasses.field(default_factory=list)
    table: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)


def verdict_of(checks):
    """"holds" when every check holds, "does not hold" when none does,
    "partly holds" otherwise."""
    n = sum(bool(c.holds) for c in checks)
    if checks and n == len(checks):
        return "holds"
    return "does not hold" if n == 0 else "partly holds"


# --------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------

def progress(iterable, desc, total=None, enabled=True):
    """A tqdm progress bar on stderr (plain iteration when disabled or
    when tqdm is not installed)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:       # the experiments extra brings tqdm
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                mininterval=0.5)


# --------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# --------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path, arms, metric="training loss", field="loss", title="", log_y=True):
    """``field`` of every arm against steps (left) and against bytes sent
    per worker (right, log x).  Returns path, or None when no arm has it."""
    arms = {k: c for k, c in arms.items() if getattr(c, field)}
    if not arms:
        return None
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, c in arms.items():
        y = getattr(c, field)
        a.plot(c.steps[:len(y)], y, label=c.label)
        xb = np.asarray(c.bytes[:len(y)], dtype=np.float64)
        sent = xb > 0          # the log axis starts at the first bytes sent
        b.plot(xb[sent], np.asarray(y)[sent], marker=".", label=c.label)
    for ax, xl in ((a, "step"), (b, "bytes sent per worker")):
        ax.set_xlabel(xl)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if log_y and field == "loss" and all(v > 0 for c in arms.values() for v in getattr(c, field)):
            ax.set_yscale("log")
    b.set_xscale("log")
    a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_heatmap(path, matrix, row_labels, col_labels, title="", xlabel="", ylabel="",
                 cmap="viridis", value_fmt="{:.2f}"):
    """A heatmap of ``matrix`` (rows x cols) with labelled axes and the
    values written in the cells (e.g. expert load per domain).  Returns path."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix: expected shape ({len(row_labels)}, {len(col_labels)}), got {m.shape}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * m.shape[1] + 2), max(3.0, 0.45 * m.shape[0] + 1.5)))
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    ax.set_xticks(range(m.shape[1]), [str(c) for c in col_labels], fontsize=8)
    ax.set_yticks(range(m.shape[0]), [str(r) for r in row_labels], fontsize=8)
    if m.size <= 400:
        hi = np.nanmax(m) if m.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, value_fmt.format(m[i, j]), ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > 0.6 * hi else "white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------

def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else str(f)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def fmt(v):
    """A number for a report table."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return str(f)
        if f != 0 and (abs(f) < 1e-3 or abs(f) >= 1e6):
            return f"{f:.3e}"
        return f"{f:.4g}"
    return str(v)


def _cell(text):
    return str(text).replace("|", "\\|")


def _table_md(table):
    if not table:
        return ""
    cols = []
    for row in table.values():
        cols += [c for c in row if c not in cols]
    lines = ["| arm | " + " | ".join(_cell(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm, row in table.items():
        lines.append(f"| {_cell(arm)} | " + " | ".join(_cell(fmt(row[c])) if c in row else "" for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(exp, config, result, checks, seconds):
    """DIR/NAME/results.json, report.md and the PNG plots; returns the
    summary dict (name, verdict, paths, seconds)."""
    folder = os.path.join(config.out, exp.name)
    os.makedirs(folder, exist_ok=True)
    verdict = verdict_of(checks)
    plots = []
    title = f"{exp.title} ({config.size}, seed {config.seed})"
    p = plot_curves(os.path.join(folder, "loss.png"), result.arms, result.metric, "loss", title,
                    result.log_loss)
    if p:
        plots.append(p)
    p = plot_curves(os.path.join(folder, "accuracy.png"), result.arms, "accuracy", "accuracy", title)
    if p:
        plots.append(p)
    for fname, draw in result.figures:
        path = os.path.join(folder, fname)
        draw(path)
        plots.append(path)
    bytes_sent = {k: (c.bytes[-1] if c.bytes else 0) for k, c in result.arms.items()}
    doc = {
        "name": exp.name, "title": exp.title, "paper": exp.paper, "claim": exp.claim,
        "config": config.as_json(), "thresholds": exp.thresholds, "metrics": result.metrics,
        "checks": [c.as_json() for c in checks], "verdict": verdict, "bytes_sent": bytes_sent,
        "arms": {k: c.as_json() for k, c in result.arms.items()}, "table": result.table,
        "plots": [os.path.basename(p) for p in plots], "seconds": seconds,
        "environment": {"python": platform.python_version(), "numpy": np.__version__,
                        "platform": platform.platform()},
    }
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
    lines = [f"# {exp.title}: {verdict}", "", f"**Paper:** {exp.paper}", "",
             f"**Claim:** {exp.claim}", "", "## Setup", ""]
    if exp.setup:
        lines += [exp.setup, ""]
    lines += [f"- size `{config.size}`, seed {config.seed}, {config.workers} workers, "
              f"engine `{config.engine}`, {seconds:.1f} s",
              f"- parameters: `{json.dumps(_jsonable(config.params))}`"]
    lines += [f"- {n}" for n in result.notes]
    lines += ["", "## Thresholds (stated before the run)", ""]
    lines += [f"- `{k}` = {fmt(v)}" for k, v in exp.thresholds.items()]
    lines += ["", "## Measured", "", _table_md(result.table), "", "## Checks", "",
              "| check | measured | threshold | holds |", "|---|---|---|---|"]
    for c in checks:
        measured = c.measured if not isinstance(c.measured, (list, tuple)) else ", ".join(fmt(m) for m in c.measured)
        lines.append(f"| {_cell(c.statement)} | {_cell(fmt(measured))} "
                     f"| {_cell(fmt(c.threshold))} | {'yes' if c.holds else '**no**'} |")
    lines += ["", f"## Verdict: {verdict}", ""]
    failed = [c for c in checks if not c.holds]
    if failed:
        lines += ["Where the claim does not hold at this scale, and why:", ""]
        lines += [f"- **{c.statement}**: {c.why or 'no explanation recorded'}" for c in failed]
    else:
        lines += ["Every check holds at this scale."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"name": exp.name, "title": exp.title, "verdict": verdict, "seconds": seconds,
            "report": os.path.join(folder, "report.md"), "results": os.path.join(folder, "results.json"),
            "plots": plots, "failed": [(c.statement, c.why) for c in failed]}


def write_index(out, summaries, seconds):
    """DIR/index.md: one row per experiment, linking its report."""
    lines = ["# lowband reproductions", "", f"Total time: {seconds:.1f} s", "",
             "| experiment | verdict | time (s) | report |", "|---|---|---|---|"]
    for s in summaries:
        rel = os.path.relpath(s["report"], out)
        lines.append(f"| {s['title']} (`{s['name']}`) | {s['verdict']} | {s['seconds']:.1f} | [{rel}]({rel}) |")
    path = os.path.join(out, "index.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0
