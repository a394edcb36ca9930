"""Per-run measures the pages and the claims read: best and last validation accuracy, per-epoch values,
mean epoch time and the time to reach an accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .runs import Run

DEFAULT_THRESHOLDS = (0.80, 0.85, 0.90)  # fractions: the module's default time-to-accuracy thresholds


def best_acc(runs: Iterable[Run]) -> list[float]:
    """Best epoch's validation accuracy (the best checkpoint re-validated: optimistic, the same validation set
    chose the epoch)."""
    return [r.final("val/acc") for r in runs]


def last_value(run: Run, key: str) -> float:
    """The last epoch's value of an ``epochs.csv`` column, NaN when absent."""
    _, values = run.curve(key)
    return float(values[-1]) if values.size else math.nan


def first_value(run: Run, key: str) -> float:
    """The first epoch's value of an ``epochs.csv`` column, NaN when absent."""
    _, values = run.curve(key)
    return float(values[0]) if values.size else math.nan


def last_acc(runs: Iterable[Run]) -> list[float]:
    """Last epoch's validation accuracy: what the significance tests use (not chosen on the validation set)."""
    return [last_value(r, "val/acc") for r in runs]


def mean_epoch_s(run: Run, key: str = "time/epoch_s") -> float:
    """Mean over epochs of ``time/epoch_s`` (whole epoch: training, validation, checkpoint) or
    ``time/train_s`` (training batches only), seconds."""
    _, secs = run.curve(key)
    return float(np.mean(secs)) if secs.size else math.nan


def time_to(run: Run, threshold: float) -> tuple[float, float] | None:
    """(epoch, seconds) at which validation accuracy first reached ``threshold``; None if never.

    Uses the module's record (``metrics.json`` ``time_to_acc``, seconds including validation) when it has this
    threshold, else the first epoch in ``epochs.csv`` (seconds: summed ``time/epoch_s`` of the epochs so far)."""
    recorded = run.metrics.get("time_to_acc") or {}
    key = f"{threshold:.2f}"
    if key in recorded:
        hit = recorded[key]
        return None if hit is None else (float(hit["epoch"]), float(hit["seconds"]))
    epochs, acc = run.curve("val/acc")
    ep_t, secs = run.elapsed()
    t_of = dict(zip(ep_t.tolist(), secs.tolist(), strict=True))
    for e, a in zip(epochs.tolist(), acc.tolist(), strict=True):
        if a >= threshold:
            return float(e), t_of.get(e, math.nan)
    return None


def thresholds_of(runs: Sequence[Run]) -> list[float]:
    """The recorded time-to-accuracy thresholds worth showing: those some run reached, the next one up, and
    0.80 (the report's)."""
    found = sorted({float(k) for r in runs for k in (r.metrics.get("time_to_acc") or {})} or DEFAULT_THRESHOLDS)
    reached = [t for t in found if any(time_to(r, t) for r in runs)]
    unreached = [t for t in found if t not in reached]
    return sorted({*reached, *unreached[:1], *(t for t in found if abs(t - 0.80) < 1e-9)})
