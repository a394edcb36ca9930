"""The verdict rules of ``CLAIMS.md`` (see :mod:`imagenette_lab.report.claims`): which arms a claim compares,
how their seeds are tested and when a scale cannot resolve a claim. Written by hand: they are this project's
reading of the report's claims, stated in the rendered file."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .build import ExperimentReport
from .experiments import DROPOUT_ARM
from .measures import last_acc, time_to
from .runs import Arm
from .stats import Comparison, adjust_bh, summarize, welch

HOLDS, FAILS, UNRESOLVED = "holds", "does not hold", "not resolved at this scale"
NOT_RUN, NOT_TESTED = "not yet run", "not tested here"
REGIME_ACC = 0.80  # fraction: below this best-arm accuracy a scale cannot resolve the report's accuracy claims
EQUIV_PP = 1.0  # percentage points: "no difference" holds when the 95 % CI of the difference lies within ±this
FAIL_ACC = 0.20  # fraction: "fails to learn" = validation accuracy at most twice chance (10 classes)
ABS_PP = 2.0  # percentage points: an absolute number of the report is reproduced within ±this (full scale only)


@dataclass(frozen=True)
class Finding:
    """One cell pair of CLAIMS.md: our numbers at a scale and the verdict with its one-line reason."""

    ours: str  # our numbers, mean ± std (n)
    verdict: str
    reason: str  # one line


# ------------------------------------------------------------------------------------------ helpers
# An arm whose jobs have not completed (a sweep still running, or failed jobs) counts as missing: a claim is
# judged only on arms with at least one completed run.
def find_arm(rep: ExperimentReport, **match: str) -> Arm | None:
    want = {k.replace("__", "."): (v,) for k, v in match.items()}
    return next((a for a in rep.arms if a.matches(want) and a.completed), None)


def arm_by(rep: ExperimentReport, key: str, *values: str) -> Arm | None:
    return next((a for a in rep.arms if a.matches({key: values}) and a.completed), None)


def fmt_arm(arm: Arm, values: Sequence[float] | None = None, scale: float = 100.0, unit: str = "") -> str:
    s = summarize(last_acc(arm.completed) if values is None else values)
    return f"{arm.label} {s.fmt(scale)}{unit} (n={s.n})"


def best_mean(rep: ExperimentReport) -> float:
    means = [summarize(last_acc(a.completed)).mean for a in rep.arms]
    return max((m for m in means if not math.isnan(m)), default=math.nan)


def out_of_regime(rep: ExperimentReport) -> str:
    """Why this scale cannot resolve an accuracy claim ('' when it can)."""
    best = best_mean(rep)
    if math.isnan(best) or best < REGIME_ACC:
        return f"best arm at {best * 100:.0f} %, below the report's {REGIME_ACC:.0%}+ regime"
    return ""


def few_seeds(arms: Iterable[Arm | None]) -> str:
    """Why the arms cannot be judged ('' when every arm has at least 2 completed seeds)."""
    short = [a.label for a in arms if a is not None and len(a.completed) < 2]
    return f"needs at least 2 seeds per arm ({'; '.join(short)}: fewer)" if short else ""


def distinct(arms: Iterable[Arm]) -> list[Arm]:
    """``arms`` without repeats, in order (arms are compared by identity: they are not hashable)."""
    out: list[Arm] = []
    for arm in arms:
        if not any(arm is seen for seen in out):
            out.append(arm)
    return out


def welch_tests(
    pairs: Sequence[tuple[Arm, Arm]], values: Callable[[Arm], Sequence[float]] | None = None, scale: float = 100.0
) -> list[Comparison]:
    """Welch's test of each (a, b) pair on ``values`` (default: last-epoch accuracy), BH-adjusted when several."""
    get = values or (lambda arm: last_acc(arm.completed))
    return adjust_bh([welch(get(a), get(b), a.label, b.label, scale) for a, b in pairs])


def diffs(comps: Sequence[Comparison], unit: str = "pp") -> str:
    return "; ".join(f"{c.a} − {c.b} {c.short(unit)}" for c in comps)


def direction(comps: Sequence[Comparison], regime: str = "") -> tuple[str, str]:
    """Verdict of 'every a beats its b' from Welch tests (BH-adjusted when several)."""
    if any(not c.testable for c in comps):
        return UNRESOLVED, next(c.note for c in comps if not c.testable)
    if regime:
        return UNRESOLVED, regime
    if any(c.significant and c.diff < 0 for c in comps):
        return FAILS, "significantly the other way"
    if all(c.significant and c.diff > 0 for c in comps):
        return HOLDS, "significant in the report's direction"
    return UNRESOLVED, "the seeds cannot tell the arms apart"


def beats(rep: ExperimentReport, pairs: Sequence[tuple[Arm | None, Arm | None]], regime: bool = True) -> Finding:
    """'Every a is more accurate than its b' (``regime``: unresolved below ``REGIME_ACC``)."""
    present = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(present) < len(pairs):
        return Finding("—", UNRESOLVED, "an arm of this claim has no completed run in the sweep")
    comps = welch_tests(present)
    arms = distinct(x for pair in present for x in pair)
    verdict, why = direction(comps, out_of_regime(rep) if regime else "")
    return Finding(", ".join(fmt_arm(a) for a in arms), verdict, f"{why}: {diffs(comps)}")


def no_difference(rep: ExperimentReport, a: Arm | None, b: Arm | None) -> Finding:
    """'a and b are as accurate': holds when the 95 % CI of a − b lies within ±``EQUIV_PP``."""
    if a is None or b is None:
        return Finding("—", UNRESOLVED, "an arm of this claim has no completed run in the sweep")
    (c,) = welch_tests([(a, b)])
    ours = f"{fmt_arm(a)}, {fmt_arm(b)}"
    if not c.testable:
        return Finding(ours, UNRESOLVED, c.note)
    if regime := out_of_regime(rep):
        return Finding(ours, UNRESOLVED, f"{regime}: {diffs([c])}")
    if c.significant:
        return Finding(ours, FAILS, f"the arms differ: {diffs([c])}")
    if c.ci_low > -EQUIV_PP and c.ci_high < EQUIV_PP:
        return Finding(ours, HOLDS, f"95 % CI [{c.ci_low:+.1f}, {c.ci_high:+.1f}] pp within ±{EQUIV_PP:g} pp")
    return Finding(ours, UNRESOLVED, f"no significant difference, but the 95 % CI [{c.ci_low:+.1f}, "
                   f"{c.ci_high:+.1f}] pp is wider than ±{EQUIV_PP:g} pp")


def epochs_to(arm: Arm, threshold: float = 0.80) -> list[float]:
    """Epochs to reach ``threshold`` per completed run (NaN when never reached)."""
    return [hit[0] if (hit := time_to(r, threshold)) else math.nan for r in arm.completed]


def sooner(fast: Arm | None, slow: Arm | None, threshold: float = 0.80) -> Finding:
    """'``fast`` reaches ``threshold`` in fewer epochs than ``slow``'."""
    if fast is None or slow is None:
        return Finding("—", UNRESOLVED, "an arm of this claim has no completed run in the sweep")
    ef, es = epochs_to(fast, threshold), epochs_to(slow, threshold)
    rf, rs = sum(not math.isnan(e) for e in ef), sum(not math.isnan(e) for e in es)
    secs = {a.label: summarize([h[1] if (h := time_to(r, threshold)) else math.nan for r in a.completed])
            for a in (fast, slow)}
    ours = "; ".join(f"{a.label}: {summarize(e).fmt(1, 1)} epochs, {secs[a.label].fmt(1, 0)} s ({r}/{len(e)} reached)"
                     for a, e, r in ((fast, ef, rf), (slow, es, rs)))
    label = f"{threshold:.0%}"
    if rf == rs == 0:
        return Finding(ours, UNRESOLVED, f"no run reached {label}")
    if rf == len(ef) and rs == 0:
        return Finding(ours, HOLDS, f"only {fast.label} reached {label}")
    if rs == len(es) and rf == 0:
        return Finding(ours, FAILS, f"only {slow.label} reached {label}")
    if rf < len(ef) or rs < len(es):
        return Finding(ours, UNRESOLVED, f"not every seed reached {label}")
    (c,) = welch_tests([(slow, fast)], lambda arm: epochs_to(arm, threshold), scale=1.0)
    verdict, why = direction([c])
    return Finding(ours, verdict, f"{why} (epochs; seconds shown, machine-dependent): {diffs([c], 'epochs')}")


def learns(arms: Sequence[Arm]) -> tuple[list[Arm], list[Arm]]:
    """(arms that fail to learn, arms that learn): mean last-epoch accuracy at most / above ``FAIL_ACC``."""
    fail = [a for a in arms if summarize(last_acc(a.completed)).mean <= FAIL_ACC]
    return fail, [a for a in arms if a not in fail and a.completed]


def rate_of(arm: Arm) -> float:
    return float(arm.values.get("model.block_drop_rate") or 0)


def norm_of(arm: Arm) -> str:
    return str(arm.values.get(DROPOUT_ARM) or (arm.runs[0].config("model.norm") if arm.runs else ""))
