"""The judges of ``CLAIMS.md``: one function per claim of the report, reading the reports of one scale
(:mod:`imagenette_lab.report.claims` lists the claims; :mod:`imagenette_lab.report.verdicts` the rules)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import stats as sps

from .build import ExperimentReport
from .experiments import OPTIMIZER_ARM, TABLE1, TABLE1_ARM
from .fidelity import facts_of
from .figures import _class_acc
from .measures import first_value, last_acc, mean_epoch_s
from .runs import Arm, Run
from .stats import summarize
from .verdicts import (
    ABS_PP,
    EQUIV_PP,
    FAIL_ACC,
    FAILS,
    HOLDS,
    UNRESOLVED,
    Finding,
    arm_by,
    beats,
    diffs,
    direction,
    distinct,
    few_seeds,
    find_arm,
    fmt_arm,
    learns,
    no_difference,
    norm_of,
    out_of_regime,
    rate_of,
    sooner,
    welch_tests,
)

Reports = dict[str, ExperimentReport]  # experiment -> its report at one scale
Judge = Callable[[Reports], Finding | None]  # None: the experiment has not run at this scale


def need(*names: str) -> Callable[[Callable[..., Finding]], Judge]:
    """A judge of the given experiments' reports; None (not yet run) when one is missing."""

    def wrap(fn: Callable[..., Finding]) -> Judge:
        def judge(reports: Reports) -> Finding | None:
            return fn(*(reports[n] for n in names)) if all(n in reports for n in names) else None

        return judge

    return wrap


@need("architectures")
def resnets_beat_googlenet(rep: ExperimentReport) -> Finding:
    g = find_arm(rep, model="googlenet")
    resnets = [a for m in ("resnet34", "resnet50", "resnet50d") if (a := find_arm(rep, model=m)) is not None]
    return beats(rep, [(a, g) for a in resnets] or [(None, g)])


@need("architectures")
def hybrid_doubles_cost(rep: ExperimentReport) -> Finding:
    h, m = find_arm(rep, model="hybrid"), find_arm(rep, model="mobilenetv2")
    if h is None or m is None or not h.completed or not m.completed:
        return Finding("—", UNRESOLVED, "the hybrid or MobileNetV2 arm is missing")
    params = [float(a.completed[0].metrics.get("params") or math.nan) for a in (h, m)]
    secs = [summarize([mean_epoch_s(r, "time/train_s") for r in a.completed]).mean for a in (h, m)]
    ratio = params[0] / params[1]
    ours = (f"hybrid {params[0] / 1e6:.1f} M vs MobileNetV2 {params[1] / 1e6:.1f} M params ({ratio:.1f}×); "
            f"training s/epoch {secs[0] / secs[1]:.1f}×")
    if 1.5 <= ratio <= 2.5:
        return Finding(ours, HOLDS, f"the two-pass model has {ratio:.1f}× MobileNetV2's parameters")
    return Finding(ours, FAILS, "as built here (the ResNet pass's dense 3×3 over 6× the channels dominates), "
                   f"the two-pass model has {ratio:.1f}× MobileNetV2's parameters, not ~2×")


@need("table1")
def hybrid_beats_resnet50(rep: ExperimentReport) -> Finding:
    h = arm_by(rep, TABLE1_ARM, "hybrid")
    return beats(rep, [(h, arm_by(rep, TABLE1_ARM, "resnet50_lr1e-3")), (h, arm_by(rep, TABLE1_ARM, "resnet50"))])


@need("table1")
def table1_numbers(rep: ExperimentReport) -> Finding:
    arms = [(arm_by(rep, TABLE1_ARM, "hybrid"), 0.89), (arm_by(rep, TABLE1_ARM, "resnet50_lr1e-3"), 0.87)]
    if any(a is None for a, _ in arms):
        return Finding("—", UNRESOLVED, "an arm of this claim is missing from the sweep")
    ours = ", ".join(fmt_arm(a) for a, _ in arms)
    if few := few_seeds([a for a, _ in arms]):
        return Finding(ours, UNRESOLVED, few)
    if rep.scale != "full":
        return Finding(ours, UNRESOLVED, "absolute accuracies depend on the scale's resolution and epochs")
    off = [(a.label, summarize(last_acc(a.completed)).mean * 100 - pub * 100) for a, pub in arms]
    far = [f"{label} {d:+.1f} pp" for label, d in off if abs(d) > ABS_PP]
    return Finding(ours, FAILS if far else HOLDS, f"off by {', '.join(far)}" if far
                   else f"both within ±{ABS_PP:g} pp of the report's")


@need("table1")
def per_class(rep: ExperimentReport) -> Finding:
    h, r = arm_by(rep, TABLE1_ARM, "hybrid"), arm_by(rep, TABLE1_ARM, "resnet50_lr1e-3")
    if h is None or r is None or not h.completed or not r.completed:
        return Finding("—", UNRESOLVED, "an arm of this claim is missing from the sweep")
    classes = [c for c in TABLE1["hybrid"] if c != "overall"]
    lead = {c: np.mean([_class_acc(x, c) for x in h.completed]) - np.mean([_class_acc(x, c) for x in r.completed])
            for c in classes}
    behind = [c for c, d in lead.items() if d < 0]
    ours = f"hybrid ahead in {len(classes) - len(behind)}/10 classes; ResNet50 (lr 1e-3) ahead in: {', '.join(behind) or 'none'}"
    if regime := out_of_regime(rep):
        return Finding(ours, UNRESOLVED, regime)
    k = len(classes) - len(behind)
    verdict = HOLDS if k >= 8 else FAILS if k <= 5 else UNRESOLVED
    return Finding(ours, verdict, f"rule: hybrid ahead (mean over seeds) in ≥ 8 classes holds, ≤ 5 does not; here {k}")


@need("dropout")
def dropout_no_gain(rep: ExperimentReport) -> Finding:
    bn = [a for a in rep.arms if norm_of(a) == "batch"]
    base = next((a for a in bn if rate_of(a) == 0), None)
    others = [a for a in bn if rate_of(a) > 0]
    if base is None or not others:
        return Finding("—", UNRESOLVED, "the BatchNorm arms with and without dropout are missing")
    comps = welch_tests([(a, base) for a in others])
    ours = ", ".join(fmt_arm(a) for a in [base, *others])
    if any(not c.testable for c in comps):
        return Finding(ours, UNRESOLVED, next(c.note for c in comps if not c.testable))
    if any(c.significant and c.diff > 0 for c in comps):
        return Finding(ours, FAILS, f"some dropout improves accuracy: {diffs(comps)}")
    if regime := out_of_regime(rep):
        return Finding(ours, UNRESOLVED, f"{regime}: {diffs(comps)}")
    return Finding(ours, HOLDS, f"no dropout arm beats BatchNorm alone: {diffs(comps)}")


def fail_to_learn(norms: tuple[str, ...]) -> Judge:
    @need("dropout")
    def judge(rep: ExperimentReport) -> Finding:
        arms = [a for a in rep.arms if norm_of(a) in norms and rate_of(a) > 0]
        base = [a for a in rep.arms if norm_of(a) in norms and rate_of(a) == 0]
        fixed = [a for a in rep.arms if norm_of(a) == "none_zero_init" and rate_of(a) > 0]
        if not arms:
            return Finding("—", UNRESOLVED, "no dropout arm of this kind in the sweep")
        fail, learn = learns(arms)
        ours = ", ".join(fmt_arm(a) for a in [*base, *arms])
        if fixed and "none" in norms:
            ours += "; with the zero-init fix: " + ", ".join(fmt_arm(a) for a in fixed)
        if base and learns(base)[0]:
            return Finding(ours, UNRESOLVED, "the arm without dropout fails to learn too")
        if not learn:
            return Finding(ours, HOLDS, f"every dropout arm ends at ≤ {FAIL_ACC:.0%} (twice chance)")
        if not fail:
            return Finding(ours, FAILS, f"every dropout arm learns (> {FAIL_ACC:.0%})")
        return Finding(ours, UNRESOLVED, f"fail to learn: {', '.join(a.label for a in fail)}; learn: "
                       f"{', '.join(a.label for a in learn)}")
    return judge


@need("dropout")
def dropout_slower(rep: ExperimentReport) -> Finding:
    bn = [a for a in rep.arms if norm_of(a) == "batch"]
    base = next((a for a in bn if rate_of(a) == 0), None)
    others = [a for a in bn if rate_of(a) > 0]
    if base is None or not others:
        return Finding("—", UNRESOLVED, "the BatchNorm arms with and without dropout are missing")
    if few := few_seeds([base, *others]):
        return Finding("—", UNRESOLVED, few)

    def secs(arm: Arm) -> list[float]:
        return [mean_epoch_s(r, "time/train_s") for r in arm.completed]

    ratios = {a.label: summarize(secs(a)).mean / summarize(secs(base)).mean for a in others}
    ours = "training s/epoch vs no dropout: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items())
    comps = welch_tests([(a, base) for a in others], secs, scale=1.0)
    if all(v < 1.15 for v in ratios.values()):
        return Finding(ours, FAILS, "every dropout arm within 15 % of the time without dropout (on this machine)")
    if all(v >= 1.5 for v in ratios.values()) and all(c.significant for c in comps):
        return Finding(ours, HOLDS, "every dropout arm ≥ 1.5× slower, significantly (on this machine)")
    return Finding(ours, UNRESOLVED, "between 'drastic' (≥ 1.5×) and 'no cost' (< 1.15×)")


@need("activation")
def mish_same_accuracy(rep: ExperimentReport) -> Finding:
    return no_difference(rep, find_arm(rep, act="mish"), find_arm(rep, act="relu6"))


@need("activation")
def mish_sooner(rep: ExperimentReport) -> Finding:
    return sooner(find_arm(rep, act="mish"), find_arm(rep, act="relu6"))


@need("blurpool")
def blurpool_lowers(rep: ExperimentReport) -> Finding:
    off = arm_by(rep, "model.blurpool", "false", "False")
    on = arm_by(rep, "model.blurpool", "true", "True")
    return beats(rep, [(off, on)])


@need("lr_schedule")
def cosine_beats_constant(rep: ExperimentReport) -> Finding:
    return beats(rep, [(arm_by(rep, "sched", "cosine", "cosine_full"), find_arm(rep, sched="constant"))])


@need("lr_schedule")
def schedule_sooner(rep: ExperimentReport) -> Finding:
    return sooner(arm_by(rep, "sched", "cosine", "cosine_full"), find_arm(rep, sched="constant"))


@need("resize")
def resize_280(rep: ExperimentReport) -> Finding:
    choice = arm_by(rep, "data.resize", "280") or arm_by(rep, "data.resize", "40")
    if choice is None:
        return Finding("—", UNRESOLVED, "the 280 px arm (40 px at the quick scale) is missing")
    others = [a for a in rep.arms if a is not choice and a.completed]
    means = {a.label: summarize(last_acc(a.completed)).mean for a in [choice, *others]}
    top = max(means, key=lambda k: -math.inf if math.isnan(means[k]) else means[k])
    ours = f"best mean: {top}; {fmt_arm(choice)}"
    runs: list[Run] = [r for a in rep.arms for r in a.completed]
    facts = facts_of(runs[0]) if runs else None
    largest = max(int(r.config("data.resize") or 0) for r in runs) if runs else 0
    if facts and facts.square_px and largest > facts.square_px:
        return Finding(ours, UNRESOLVED, f"this archive stores {facts.square_px}×{facts.square_px} squashed images: "
                       "larger resizes only upsample them")
    comps = welch_tests([(a, choice) for a in others])
    if any(c.significant and c.diff > 0 for c in comps) and not out_of_regime(rep):
        return Finding(ours, FAILS, f"a size beats {choice.label}: {diffs([c for c in comps if c.significant])}")
    if regime := out_of_regime(rep):
        return Finding(ours, UNRESOLVED, regime)
    if top == choice.label:
        return Finding(ours, HOLDS, f"{choice.label} has the best mean and no size beats it significantly")
    return Finding(ours, UNRESOLVED, f"{top} has the best mean, not significantly")


@need("normalize")
def normalization_matters(rep: ExperimentReport) -> Finding:
    own, imagenet = find_arm(rep, data__normalize="dataset"), find_arm(rep, data__normalize="imagenet")
    found = no_difference(rep, own, imagenet)  # "no difference" holding means the choice does not matter
    flip = {HOLDS: FAILS, FAILS: HOLDS}
    return Finding(found.ours, flip.get(found.verdict, found.verdict), found.reason)


@need("optimizer")
def adam_beats_sgd(rep: ExperimentReport) -> Finding:
    adam = arm_by(rep, OPTIMIZER_ARM, "adam")
    return beats(rep, [(adam, arm_by(rep, OPTIMIZER_ARM, "sgd")), (adam, arm_by(rep, OPTIMIZER_ARM, "sgd_linear"))])


@need("optimizer")
def adam_faster_start(rep: ExperimentReport) -> Finding:
    adam = arm_by(rep, OPTIMIZER_ARM, "adam")
    pairs = [(adam, arm_by(rep, OPTIMIZER_ARM, "sgd")), (adam, arm_by(rep, OPTIMIZER_ARM, "sgd_linear"))]
    if any(a is None or b is None for a, b in pairs):
        return Finding("—", UNRESOLVED, "an arm of this claim is missing from the sweep")
    def first(arm: Arm) -> list[float]:
        return [first_value(r, "val/acc") for r in arm.completed]

    present = [(a, b) for a, b in pairs if a is not None and b is not None]
    comps = welch_tests(present, first)
    verdict, why = direction(comps)  # an early-training claim: no accuracy regime needed
    arms = distinct(x for pair in present for x in pair)
    return Finding("after epoch 1: " + ", ".join(fmt_arm(a, first(a)) for a in arms), verdict, f"{why}: {diffs(comps)}")


@need("batch_size")
def time_inverse_batch(rep: ExperimentReport) -> Finding:
    pts = [(float(a.values.get("data.batch_size") or math.nan),
            summarize([mean_epoch_s(r, "time/train_s") for r in a.completed]).mean) for a in rep.arms]
    pts = [(b, t) for b, t in pts if b > 0 and t > 0]
    if few := few_seeds(rep.arms):
        return Finding("—", UNRESOLVED, few)
    if len(pts) < 3:
        return Finding("—", UNRESOLVED, "fewer than 3 batch sizes with timings")
    slope = float(np.polyfit(np.log([b for b, _ in pts]), np.log([t for _, t in pts]), 1)[0])
    ours = "training s/epoch: " + ", ".join(f"batch {b:g} {t:.0f} s" for b, t in pts) + f"; log-log slope {slope:.2f}"
    if -1.25 <= slope <= -0.75:
        return Finding(ours, HOLDS, "slope ≈ −1: time per epoch ∝ 1 / batch (on this machine)")
    if slope > -0.5:
        return Finding(ours, FAILS, "time per epoch barely depends on the batch size (on this machine)")
    return Finding(ours, UNRESOLVED, "slope between −0.5 and −0.75 or below −1.25")


@need("batch_size")
def larger_overfit_earlier(rep: ExperimentReport) -> Finding:
    xs, ys = [], []
    for arm in rep.arms:
        for r in arm.completed:
            epochs, loss = r.curve("val/loss")
            if loss.size:
                xs.append(float(arm.values.get("data.batch_size") or math.nan))
                ys.append(float(epochs[int(np.argmin(loss))]))
    if len(set(xs)) < 3 or len(set(ys)) < 2:
        return Finding("—", UNRESOLVED, "too few batch sizes or no variation in the epoch of lowest val loss")
    rho, p = sps.spearmanr(xs, ys)
    ours = f"Spearman ρ(batch, epoch of lowest val loss) = {rho:.2f}, p = {p:.2g} ({len(xs)} runs)"
    if regime := out_of_regime(rep):
        return Finding(ours, UNRESOLVED, regime)
    if p < 0.05:
        return Finding(ours, HOLDS if rho < 0 else FAILS, "larger batches reach their lowest val loss "
                       + ("earlier" if rho < 0 else "later"))
    return Finding(ours, UNRESOLVED, "no significant rank correlation")


@need("dataset_size")
def size_limits(rep: ExperimentReport) -> Finding:
    full = arm_by(rep, "data.train_fraction", "1.0", "1")
    smaller = [a for a in rep.arms if a is not full and a.completed]
    if full is None or not smaller:  # the largest fraction below 100 % (75 % in the experiment's sweep)
        return Finding("—", UNRESOLVED, "the 100 % arm or a smaller one is missing")
    less = max(smaller, key=lambda a: float(a.values.get("data.train_fraction") or 0))
    ours = ", ".join(fmt_arm(a) for a in rep.arms)
    (c,) = welch_tests([(full, less)])
    if not c.testable:
        return Finding(ours, UNRESOLVED, c.note)
    if regime := out_of_regime(rep):
        return Finding(ours, UNRESOLVED, f"{regime}: {diffs([c])}")
    if c.significant and c.diff > 0:
        return Finding(ours, HOLDS, f"accuracy still rises from 75 % to 100 % of the data: {diffs([c])}")
    if c.significant or (c.ci_low > -EQUIV_PP and c.ci_high < EQUIV_PP):
        return Finding(ours, FAILS, f"no gain from the last 25 % of the data: {diffs([c])}")
    return Finding(ours, UNRESOLVED, diffs([c]))


@need("label_noise")
def noise_hurts(rep: ExperimentReport) -> Finding:
    found = beats(rep, [(arm_by(rep, "data.label_noise", "0"), arm_by(rep, "data.label_noise", "5"))])
    return Finding(found.ours, found.verdict, found.reason + " (5 % noise added on purpose, not ImageNette's own)")


def counts(reports: Reports) -> Finding | None:
    """The image counts every run's data check recorded (``metrics.json`` ``data.images``), from any page."""
    for rep in reports.values():
        for arm in rep.arms:
            for run in arm.completed:
                images = (run.metrics.get("data") or {}).get("images")
                if images:
                    ours = f"{images.get('train', 0):,} train / {images.get('val', 0):,} val images"
                    ok = images.get("train") == 9469 and images.get("val") == 3925
                    return Finding(ours, HOLDS if ok else FAILS, "counted by the data check of every run"
                                   if ok else "this archive is not the full imagenette2 split")
    return None


