"""Matplotlib figures of a sweep: learning curves, accuracy-vs-setting plots and bar charts.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so rendering works headless
(Agg, via ``savefig``) and the same objects display in a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from .runs import Arm, Run
from .stats import summarize

# (metric column, axis label with unit, multiplier applied to the values)
Panel = tuple[str, str, float]
ACC_PANEL: Panel = ("val/acc", "validation accuracy (%)", 100.0)
LOSS_PANEL: Panel = ("val/loss", "validation loss (cross-entropy, nats)", 1.0)
FIG_DPI = 120  # dots per inch of saved PNGs
PANEL_SIZE = (5.2, 3.8)  # inches, width x height of one panel


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def mean_curve(runs: Sequence[Run], key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and std over runs of one ``epochs.csv`` column (epochs where any run has it)."""
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, value in zip(*run.curve(key), strict=True):
            by_epoch.setdefault(int(epoch), []).append(float(value) * scale)
    epochs = np.array(sorted(by_epoch), dtype=int)
    mean = np.array([np.mean(by_epoch[e]) for e in epochs])
    std = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0 for e in epochs])
    return epochs, mean, std


def _new(panels: int, title: str) -> tuple[Figure, list]:
    fig = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), dpi=FIG_DPI, layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    fig.suptitle(title)
    return fig, axes


def _legend_label(arm: Arm) -> str:
    return f"{arm.label} (n={len(arm.completed)})"


def curves_figure(arms: Sequence[Arm], title: str, panels: Sequence[Panel] = (ACC_PANEL, LOSS_PANEL)) -> Figure:
    """One panel per metric, validation metric vs epoch; one line per arm (mean over its completed seeds)
    with a ±1 std band."""
    fig, axes = _new(len(panels), title)
    seen: set[int] = set()
    for arm, color in zip(arms, _colors(len(arms)), strict=True):
        for ax, (key, _, scale) in zip(axes, panels, strict=True):
            epochs, mean, std = mean_curve(arm.completed, key, scale)
            if epochs.size == 0:
                continue
            seen.update(epochs.tolist())
            ax.plot(epochs, mean, marker="o", ms=3, color=color, label=_legend_label(arm))
            low, high = mean - std, mean + std
            if scale == 100.0:  # a percentage band stays within [0, 100]
                low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)
    for ax, (_, label, _) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if 0 < len(seen) <= 20:
            ax.set_xticks(sorted(seen))  # whole epochs only
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
    if any(ax.has_data() for ax in axes):
        axes[0].legend(fontsize="small", title="mean over seeds; band: ±1 std", title_fontsize="small")
    return fig


def time_curves_figure(arms: Sequence[Arm], title: str, thresholds: Sequence[float] = ()) -> Figure:
    """Validation accuracy vs cumulative training time, one line per run (seeds differ in time, so they are
    not averaged); dashed lines mark the time-to-accuracy thresholds."""
    fig, (ax,) = _new(1, title)
    for arm, color in zip(arms, _colors(len(arms)), strict=True):
        for i, run in enumerate(arm.completed):
            epochs, acc = run.curve("val/acc")
            ep_t, secs = run.elapsed()
            t_of = dict(zip(ep_t.tolist(), secs.tolist(), strict=True))
            pts = [(t_of[e], a * 100) for e, a in zip(epochs.tolist(), acc.tolist(), strict=True) if e in t_of]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, color=color, alpha=0.8, label=_legend_label(arm) if i == 0 else None)
    for t in thresholds:
        ax.axhline(t * 100, ls="--", lw=0.8, color="grey")
        ax.annotate(f"{t:.0%}", (0, t * 100), xycoords=("axes fraction", "data"), fontsize="small", color="grey",
                    va="bottom")
    ax.set_xlim(left=0)
    ax.set_xlabel("elapsed training time (s, whole epochs incl. validation)")
    ax.set_ylabel(ACC_PANEL[1])
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    return fig


def _value(run: Run, key: str) -> float:
    """A run's final metric; for per-epoch timings (``time/...``) their mean over epochs."""
    if key.startswith("time/"):
        _, secs = run.curve(key)
        return float(np.mean(secs)) if secs.size else math.nan
    return run.final(key)


def sweep_figure(
    arms: Sequence[Arm],
    x_key: str,
    x_label: str,
    title: str,
    panels: Sequence[Panel] = (ACC_PANEL,),
    choice: float | None = None,
    choice_label: str = "report's choice",
) -> Figure:
    """Each panel: a final metric (mean ± std over seeds, individual seeds as dots) against the numeric swept
    value ``x_key``; ``choice`` (the report's pick) is marked."""
    fig, axes = _new(len(panels), title)
    xs = [float(arm.values.get(x_key) or math.nan) for arm in arms]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        means, stds, pts_x = [], [], []
        for x, arm in zip(xs, arms, strict=True):
            vals = [_value(r, key) * scale for r in arm.completed]
            s = summarize(vals)
            means.append(s.mean)
            stds.append(0.0 if math.isnan(s.std) else s.std)
            ax.scatter([x] * len(vals), vals, s=12, color="grey", alpha=0.6, zorder=3)
            pts_x.append(x)
        ax.errorbar(pts_x, means, yerr=stds, marker="o", capsize=4, color="C0", label="mean ± std over seeds")
        if choice is not None:
            ax.axvline(choice, ls="--", color="C3", label=choice_label)
        ax.set_xticks(sorted(x for x in pts_x if not math.isnan(x)))  # the swept values themselves
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def bars_figure(arms: Sequence[Arm], title: str, published: dict[str, float] | None = None) -> Figure:
    """Final validation accuracy per arm (mean ± std, seeds as dots), the report's number as a red marker."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(arms) + 2), PANEL_SIZE[1]), dpi=FIG_DPI, layout="constrained")
    ax = fig.subplots()
    fig.suptitle(title)
    labels = [arm.label for arm in arms]
    pos = np.arange(len(arms))
    ticks = [label.replace(", ", "\n") for label in labels]  # multi-key arms: one key per line
    for i, arm in enumerate(arms):
        vals = [r.final("val/acc") * 100 for r in arm.completed]
        s = summarize(vals)
        ax.bar(i, s.mean if s.n else 0, yerr=0 if math.isnan(s.std) else s.std, capsize=4, color="C0", alpha=0.8,
               label="ours: mean ± std" if i == 0 else None)
        ax.scatter([i] * len(vals), vals, s=12, color="k", zorder=3, label="ours: one seed" if i == 0 else None)
    marked = False
    for i, label in enumerate(labels):
        if published and label in published:
            ax.scatter(i, published[label] * 100, marker="D", s=40, color="C3", zorder=4,
                       label=None if marked else "report")
            marked = True
    ax.set_xticks(pos, ticks, rotation=20 if len(arms) > 6 else 0, ha="right" if len(arms) > 6 else "center",
                  fontsize="small")
    ax.set_ylabel(ACC_PANEL[1])
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    fig.legend(fontsize="small", loc="outside lower center", ncols=3)  # outside: never over a bar
    return fig


def per_class_figure(
    arms: Sequence[Arm], classes: Sequence[str], title: str, published: dict[str, dict[str, float]] | None = None
) -> Figure:
    """Horizontal grouped bars: per-class validation accuracy of each arm (mean ± std over seeds), with the
    report's per-class numbers as markers of the same colour."""
    height = max(4.0, 0.28 * len(classes) * max(1, len(arms)) + 1.8)
    fig = Figure(figsize=(7.5, height), dpi=FIG_DPI, layout="constrained")
    ax = fig.subplots()
    fig.suptitle(title)
    width = 0.8 / max(len(arms), 1)
    ys = np.arange(len(classes))
    for j, (arm, color) in enumerate(zip(arms, _colors(len(arms)), strict=True)):
        means, stds = [], []
        for cls in classes:
            s = summarize([_class_acc(r, cls) for r in arm.completed])
            means.append(s.mean * 100 if s.n else 0.0)
            stds.append(0.0 if math.isnan(s.std) else s.std * 100)
        off = ys + (j - (len(arms) - 1) / 2) * width
        ax.barh(off, means, xerr=stds, height=width, color=color, alpha=0.8, capsize=2, label=f"ours: {_legend_label(arm)}")
        pub = (published or {}).get(arm.label)
        if pub:
            pv = [pub.get(c, math.nan) * 100 for c in classes]
            ax.scatter(pv, off, marker="D", s=22, color=color, edgecolor="k", zorder=4, label=f"report: {arm.label}")
    ax.set_yticks(ys, classes)
    ax.invert_yaxis()
    ax.set_xlabel("validation accuracy of the class (%)")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3, axis="x")
    fig.legend(fontsize="small", loc="outside lower center", ncols=2)  # outside: bars reach ~90 %
    return fig


def _class_acc(run: Run, cls: str) -> float:
    per = run.metrics.get("per_class_acc") or {}
    if cls == "overall":
        return run.final("val/acc")
    value = per.get(cls)
    return math.nan if value is None else float(value)
