"""Reproductions of the papers' claims: ``python -m lowband reproduce``.

Each experiment is one module of this package, named in ``REGISTRY``
(experiment name -> module).  ``python -m lowband reproduce --list`` lists
them; ``python -m lowband reproduce NAME... | --all [--quick] [--out DIR]
[--workers W] [--engine sim|torch] [--seed S]`` runs them and writes, for
each, DIR/NAME/results.json, DIR/NAME/report.md and PNG plots (``--all``
also DIR/index.md).  No name runs ``DEFAULT``, in quick mode unless
``--full`` is given.  Needs the ``experiments`` extra (tqdm, matplotlib,
scikit-learn).

The contract of an experiment module
------------------------------------
A module defines ``EXPERIMENT = Experiment(...)`` (``.framework``) with

``name``        the registry name (``"dgc"``); also the output folder.
``title``       a short title; ``paper``: authors, venue, arXiv id.
``claim``       the paper's claim in one sentence, as tested here.
``thresholds``  a dict of the numbers the verdict compares against (the
                paper's claim scaled down), fixed in the module before any
                run: the report prints them above the measurements.
``sizes``       ``{"smoke": {...}, "quick": {...}, "full": {...}}``: the
                parameters of each size (steps, model width, ...).  "quick"
                is the ``--quick`` run (10-40 s on two cores, at most 2
                min), "full" the default (at most 15 min), "smoke" a smaller
                quick run used only by the test suite; all three run the
                same code.
``run``         ``run(config) -> Result``: trains every arm and returns the
                measured ``metrics`` (a flat dict of numbers), the ``arms``
                (``Curve``: loss, optionally accuracy, and cumulative bytes
                sent per worker at each recorded step), a ``table`` for the
                report, optional ``notes`` and extra ``figures``.  It reads
                ``config.params`` (the size's parameters), ``config.seed``,
                ``config.workers`` and runs its workers through
                ``engines.run_workers(config, fn, ...)`` (``config.engine``:
                "sim", the in-process cluster, or "torch", gloo processes).
                Long loops go through ``framework.progress`` (tqdm, stderr).
``judge``       ``judge(metrics, thresholds) -> [Check]``: each check
                compares measured numbers with a threshold and sets
                ``holds`` from that comparison alone; its ``why`` (the
                reason when it does not hold at this scale) is printed only
                for the checks that fail.  The verdict is "holds" (every
                check holds), "does not hold" (none) or "partly holds".
``engines``     the engines it supports (``("sim",)`` or ``("sim", "torch")``);
``workers``     its default number of workers; ``setup`` a paragraph for
                the report.

Plots: the framework draws ``loss.png`` (the arms' loss against steps and
against bytes sent per worker) and ``accuracy.png`` (when the curves carry
accuracy); ``framework.plot_heatmap`` draws matrices such as the expert
load per domain, for ``Result.figures``.  Data and models shared by the
experiments live in ``.data``.

Adding an experiment: write the module and add its name to ``REGISTRY``.
"""
from __future__ import annotations

import importlib
import os
import time

from .framework import SIZES, Config, Experiment

__all__ = ["REGISTRY", "DEFAULT", "load", "names", "run_one", "run_many", "Config", "Experiment"]

# experiment name -> module in this package (listed in --list order)
REGISTRY = {
    "dgc": "dgc",
    "error-feedback": "error_feedback",
    "onebit-adam": "onebit_adam",
    "powersgd": "powersgd",
    "diloco": "diloco",
    "sparseloco": "sparseloco",
    "streaming-diloco": "streaming_diloco",
    "one-byte": "one_byte",
    "signum": "signum",
    "dithering": "dithering",
    "zero-one-adam": "zero_one_adam",
    "onebit-lamb": "onebit_lamb",
    "global-lbl": "global_lbl",
    "chain-of-experts": "chain_of_experts",
    "scafcom": "scafcom",
    "fedspeed": "fedspeed",
    "dadao": "dadao",
    "co2": "co2",
    "fed-sb": "fed_sb",
    "dimat": "dimat",
    "fedzip": "fedzip",
}

# what `python -m lowband reproduce` runs without names (quick: within 5 minutes)
DEFAULT = ("dgc", "error-feedback", "onebit-adam", "sparseloco", "one-byte")


def names():
    """The registered experiments whose module is present, in order."""
    out = []
    for name, module in REGISTRY.items():
        spec = importlib.util.find_spec(f"{__name__}.{module}")
        if spec is not None:
            out.append(name)
    return out


def load(name):
    """The ``Experiment`` registered as ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"name: expected one of {', '.join(REGISTRY)}, got {name!r}")
    module = importlib.import_module(f"{__name__}.{REGISTRY[name]}")
    exp = module.EXPERIMENT
    if exp.name != name:
        raise ValueError(f"experiment module {module.__name__} declares name {exp.name!r}, registered as {name!r}")
    return exp


def configure(exp, size="quick", seed=0, workers=None, engine="sim", out="lowband-results", progress=True):
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    if engine not in exp.engines:
        raise ValueError(f"engine: experiment {exp.name!r} runs on {', '.join(exp.engines)}, got {engine!r}")
    workers = exp.workers if workers is None else int(workers)
    if workers < 2:
        raise ValueError(f"workers: expected at least 2, got {workers}")
    return Config(name=exp.name, size=size, seed=int(seed), workers=workers, engine=engine, out=out,
                  progress=progress, params=dict(exp.sizes[size]))


def run_one(name, size="quick", *, seed=0, workers=None, engine="sim", out="lowband-results",
            progress=True):
    """Run one experiment, write its outputs, return its summary dict
    (name, title, verdict, seconds, report, results, plots, failed)."""
    from .framework import write_outputs
    exp = load(name)
    config = configure(exp, size, seed, workers, engine, out, progress)
    t0 = time.perf_counter()
    with _one_blas_thread():
        result = exp.run(config)
    checks = exp.judge(result.metrics, exp.thresholds)
    return write_outputs(exp, config, result, checks, time.perf_counter() - t0)


def _one_blas_thread():
    """The workers are threads (or processes) that each call BLAS on small
    matrices: a multi-threaded BLAS per worker oversubscribes the cores
    (tens of times slower on two cores), so BLAS runs single-threaded."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:       # scikit-learn (the experiments extra) brings it
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1, "blas")


def run_many(selection, size="quick", *, index=False, out="lowband-results", **kwargs):
    """Run the named experiments in order; with ``index`` also write
    out/index.md.  Returns (summaries, index path or None, seconds)."""
    from .framework import write_index
    t0 = time.perf_counter()
    summaries = [run_one(n, size, out=out, **kwargs) for n in selection]
    seconds = time.perf_counter() - t0
    path = write_index(out, summaries, seconds) if index else None
    return summaries, path, seconds


def main(argv):
    """``python -m lowband reproduce ...``; returns the exit status."""
    import argparse
    parser = argparse.ArgumentParser(
        prog="python -m lowband reproduce",
        description="Run the papers' claims as experiments; write results.json, report.md and plots.")
    parser.add_argument("names", nargs="*", help="experiments to run (default: %s)" % " ".join(DEFAULT))
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--all", action="store_true", help="run every experiment and write index.md")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick size (seconds to a minute or two each)")
    mode.add_argument("--full", action="store_true", help="the full size (the default when names are given)")
    mode.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="lowband-results", help="output folder (default ./lowband-results)")
    parser.add_argument("--workers", type=int, default=None, help="workers (default: each experiment's)")
    parser.add_argument("--engine", choices=("sim", "torch"), default="sim",
                        help="sim: in-process cluster; torch: gloo processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.list:
        for n in names():
            exp = load(n)
            print(f"{n:18s} {exp.title} ({exp.paper})\n{'':18s} {exp.claim}")
        return 0
    if args.all and args.names:
        parser.error("give experiment names or --all, not both")
    selection = names() if args.all else (args.names or list(DEFAULT))
    unknown = [n for n in selection if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown experiment(s) {', '.join(unknown)}; --list shows them")
    default_quick = not args.names and not args.all
    size = "smoke" if args.smoke else "quick" if (args.quick or (default_quick and not args.full)) else "full"
    if args.engine == "torch":
        selection = [n for n in selection if "torch" in load(n).engines] if args.all else selection
    os.makedirs(args.out, exist_ok=True)
    summaries, index, seconds = run_many(selection, size, index=args.all or len(selection) > 1,
                                         out=args.out, seed=args.seed, workers=args.workers,
                                         engine=args.engine, progress=not args.no_progress)
    width = max(len(s["name"]) for s in summaries)
    print(f"\n{'experiment':{width}s}  verdict         time")
    for s in summaries:
        print(f"{s['name']:{width}s}  {s['verdict']:14s} {s['seconds']:6.1f} s")
        for statement, why in s["failed"]:
            print(f"{'':{width}s}    not held: {statement}")
    print(f"\ntotal {seconds:.1f} s")
    for s in summaries:
        print(f"{s['name']}: {s['report']}  plots: {', '.join(s['plots'])}")
    if index:
        print(f"index: {index}")
    print(f"reports and plots are in {os.path.abspath(args.out)}")
    return 0
