"""Summaries over seeds and the significance line for two-arm comparisons (Welch's t-test via scipy), with
the Benjamini-Hochberg correction (scipy's ``false_discovery_control``) when a page tests several arms."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

ALPHA = 0.05  # significance level of the comparisons
CONFIDENCE = 0.95  # coverage of the confidence intervals


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1) and count of one metric over seeds."""

    n: int
    mean: float
    std: float  # NaN when n < 2

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        """``87.3 ± 0.4`` (``87.3`` when n = 1, ``—`` when n = 0), values multiplied by ``scale``."""
        if self.n == 0 or math.isnan(self.mean):
            return "—"
        if self.n == 1 or math.isnan(self.std):
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the finite values (NaNs, i.e. runs that did not record the metric, are left out)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return Summary(0, math.nan, math.nan)
    return Summary(int(arr.size), float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan)


@dataclass(frozen=True)
class Comparison:
    """Welch's t-test of arm ``a`` against arm ``b`` (difference a − b, in the metric's units × scale)."""

    a: str
    b: str
    n_a: int
    n_b: int
    diff: float
    ci_low: float  # NaN when untestable
    ci_high: float
    t: float
    df: float
    p: float
    note: str = ""  # why no test was possible, when it was not
    p_adj: float = math.nan  # Benjamini-Hochberg adjusted p when the page tests several arms (see adjust_bh)

    @property
    def testable(self) -> bool:
        return not math.isnan(self.p)

    @property
    def adjusted(self) -> bool:
        return not math.isnan(self.p_adj)

    @property
    def p_decisive(self) -> float:
        """The p-value the verdict uses: the adjusted one when several arms were tested."""
        return self.p_adj if self.adjusted else self.p

    @property
    def significant(self) -> bool:
        return self.testable and self.p_decisive < ALPHA

    def short(self, unit: str = "pp") -> str:
        """``+1.2 pp (p=0.04)`` for a table cell."""
        if math.isnan(self.diff):
            return "—"
        head = f"{self.diff:+.1f} {unit}"
        if not self.testable:
            return f"{head} (n/a)"
        return f"{head} (p={self.p:.2g}, BH {self.p_adj:.2g})" if self.adjusted else f"{head} (p={self.p:.2g})"

    def sentence(self, unit: str = "pp", metric: str = "validation accuracy") -> str:
        """One line for the report: difference, CI, test statistic, p and what it means."""
        if math.isnan(self.diff):
            return f"**{self.a} vs {self.b}**: no completed runs to compare ({self.note})."
        head = f"**{self.a} − {self.b}** ({metric}): {self.diff:+.2f} {unit}"
        if not self.testable:
            return f"{head}; no test: {self.note}."
        verdict = (
            f"significant at α = {ALPHA}" if self.significant
            else f"not significant at α = {ALPHA}: the seeds cannot tell these arms apart"
        )
        adjusted = f", Benjamini-Hochberg adjusted p = {self.p_adj:.3g}" if self.adjusted else ""
        return (
            f"{head}, {CONFIDENCE:.0%} CI [{self.ci_low:+.2f}, {self.ci_high:+.2f}] {unit}; Welch's t = {self.t:.2f}, "
            f"df = {self.df:.1f}, p = {self.p:.3g}{adjusted} (n = {self.n_a} vs {self.n_b} seeds) — {verdict}."
        )


def welch(a: Sequence[float], b: Sequence[float], label_a: str, label_b: str, scale: float = 100.0) -> Comparison:
    """Welch's unequal-variance t-test (scipy) of ``a`` vs ``b`` over seeds, values multiplied by ``scale``
    (100: accuracies in percentage points). Needs at least 2 values per arm and some spread."""
    xa = np.asarray([v for v in a if not math.isnan(v)], dtype=float) * scale
    xb = np.asarray([v for v in b if not math.isnan(v)], dtype=float) * scale
    nan = math.nan
    if xa.size == 0 or xb.size == 0:
        return Comparison(label_a, label_b, xa.size, xb.size, nan, nan, nan, nan, nan, nan, "an arm has no completed run")
    diff = float(xa.mean() - xb.mean())
    if xa.size < 2 or xb.size < 2:
        return Comparison(
            label_a, label_b, xa.size, xb.size, diff, nan, nan, nan, nan, nan,
            "needs at least 2 seeds per arm (a single run per arm is what the report had)",
        )
    if np.ptp(xa) == 0 and np.ptp(xb) == 0:
        return Comparison(label_a, label_b, xa.size, xb.size, diff, nan, nan, nan, nan, nan, "no spread across seeds")
    with warnings.catch_warnings():  # near-identical samples only cost precision, the numbers stay right
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(xa, xb, equal_var=False)
        ci = res.confidence_interval(CONFIDENCE)
    return Comparison(
        label_a, label_b, int(xa.size), int(xb.size), diff, float(ci.low), float(ci.high),
        float(res.statistic), float(res.df), float(res.pvalue),
    )


def adjust_bh(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons with Benjamini-Hochberg adjusted p-values (scipy's ``false_discovery_control``) when
    more than one of them is testable; unchanged otherwise. The adjustment controls the false discovery rate
    over the arms a page tests against its reference."""
    tested = [i for i, c in enumerate(comparisons) if c.testable]
    if len(tested) < 2:
        return list(comparisons)
    adjusted = stats.false_discovery_control([comparisons[i].p for i in tested], method="bh")
    out = list(comparisons)
    for i, p_adj in zip(tested, adjusted, strict=True):
        out[i] = replace(out[i], p_adj=float(p_adj))
    return out
