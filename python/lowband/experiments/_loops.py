"""Loops shared by the data-parallel experiments: run every arm of an
experiment through ``run_workers`` and collect its curve, final metrics and
table row."""
from __future__ import annotations

import numpy as np

from .engines import run_workers
from .framework import Curve

__all__ = ["run_arms"]


def run_arms(config, name, worker, labels, *args, same_replicas=True, accuracy_first=False, rank_note=""):
    """For each ``arm, label`` in ``labels``, run ``worker(comm, arm, *args)``
    on ``config.workers`` ranks; the worker returns ``train_data_parallel``'s
    ``(steps, loss, accuracy, bytes, x)``.  Returns ``(arms, metrics,
    table)``: rank 0's Curve per arm, ``{arm}_loss``, ``{arm}_accuracy`` and
    ``{arm}_bytes`` (rank 0's bytes sent) per arm, and one table row per
    label.  ``same_replicas``: raise RuntimeError when the ranks' final
    parameters differ.  ``accuracy_first``: put accuracy before loss in the
    metrics and the rows.  ``rank_note`` is appended to the loss and accuracy
    column names."""
    arms, metrics, table = {}, {}, {}
    for arm, label in labels.items():
        results, sent = run_workers(config, worker, arm, *args)
        steps, loss, acc, nbytes, x = results[0]
        if same_replicas and any(not np.array_equal(r[4], x) for r in results[1:]):
            raise RuntimeError(f"{name}: the replicas of arm {arm!r} disagree")
        arms[arm] = Curve(label, steps, loss, acc, nbytes)
        m = {f"{arm}_loss": loss[-1], f"{arm}_accuracy": acc[-1]}
        row = {f"training loss{rank_note}": loss[-1], f"test accuracy{rank_note}": acc[-1]}
        if accuracy_first:
            m, row = dict(reversed(m.items())), dict(reversed(row.items()))
        metrics.update(m)
        metrics[f"{arm}_bytes"] = int(sent[0])
        table[label] = {**row, "bytes sent per worker": int(sent[0])}
    return arms, metrics, table
