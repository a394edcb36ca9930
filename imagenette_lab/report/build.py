"""Turn the runs of one experiment into its artefact: Markdown tables (mean ± std, n, the report's number),
significance lines, PNG figures, where the page departs from the report and the runs that were not averaged.

Two accuracies per arm: the *best* epoch's (the best checkpoint re-validated; optimistic, because the
same validation set chose that epoch) and the *last* epoch's (fixed in advance by the epoch count). The
significance tests use the last epoch's, Benjamini-Hochberg corrected when a page tests several arms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from . import figures
from .experiments import CPU_SCALE, ExperimentSpec, Match, Published, spec_for
from .fidelity import common_departures, data_lines, fmt_seconds, provenance_lines, read_provenance
from .measures import best_acc, last_acc, last_value, mean_epoch_s, thresholds_of, time_to
from .runs import Arm, Run, display_key, fixed_overrides, group_runs, make_arms, seeds_of, slug, swept_keys
from .stats import Comparison, adjust_bh, summarize, welch
from .tables import Table


@dataclass
class ExperimentReport:
    """Everything rendered for one (experiment, scale): tables, comparisons, figures and the Markdown page."""

    experiment: str
    scale: str
    spec: ExperimentSpec
    arms: list[Arm]
    tables: dict[str, Table]
    comparisons: list[Comparison]
    figures: dict[str, Figure]
    problems: list[Run]  # runs left out of the averages, with why
    provenance: list[dict[str, Any]] = field(default_factory=list)
    markdown: str = ""

    @property
    def stem(self) -> str:
        return slug(self.experiment)

    def figure_file(self, kind: str) -> str:
        return f"{self.stem}_{kind}.png"

    def write(self, folder: str | Path) -> list[Path]:
        """Write ``<experiment>.md`` and its PNGs into ``folder``; returns the paths written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for kind, fig in self.figures.items():
            path = folder / self.figure_file(kind)
            fig.savefig(path)
            written.append(path)
        md = folder / f"{self.stem}.md"
        md.write_text(self.markdown)
        return [md, *written]

    def _repr_markdown_(self) -> str:
        return self.markdown


# ------------------------------------------------------------------------------------------ helpers
def published_for(arm: Arm, spec: ExperimentSpec) -> Published | None:
    return next((p for p in spec.published if arm.matches(p.match)), None)


def reference_arm(arms: Sequence[Arm], spec: ExperimentSpec) -> Arm | None:
    for match in spec.reference:
        for arm in arms:
            if arm.matches(match):
                return arm
    return None


def _arm(arms: Sequence[Arm], match: Match) -> Arm | None:
    return next((a for a in arms if a.matches(match)), None)


# ------------------------------------------------------------------------------------------ tables
def comparisons(arms: Sequence[Arm], spec: ExperimentSpec) -> list[Comparison]:
    """The spec's explicit pairs, else each arm against the reference (the report's baseline/choice); with no
    reference and two arms, the first against the second. Welch's t-test on the last epoch's accuracy,
    Benjamini-Hochberg adjusted when more than one test is made."""
    pairs: list[tuple[Arm, Arm]] = []
    for match_a, match_b in spec.pairs:
        a, b = _arm(arms, match_a), _arm(arms, match_b)
        if a is not None and b is not None:
            pairs.append((a, b))
    ref = reference_arm(arms, spec)
    if not pairs and ref is not None:
        pairs = [(a, ref) for a in arms if a is not ref]
    elif not pairs and len(arms) == 2:
        pairs = [(arms[0], arms[1])]
    return adjust_bh([welch(last_acc(a.completed), last_acc(b.completed), a.label, b.label) for a, b in pairs])


def _n_cell(arm: Arm) -> str:
    left_out = len(arm.runs) - len(arm.completed)
    return f"{len(arm.completed)}" + (f" (+{left_out} not averaged)" if left_out else "")


def main_table(arms: Sequence[Arm], spec: ExperimentSpec, comps: Sequence[Comparison]) -> Table:
    keys = [display_key(k) for k in arms[0].values] if arms else []
    has_pub = any(published_for(a, spec) for a in arms)
    refs = {c.b for c in comps}
    by_label = {c.a: c for c in comps} if len(refs) == 1 else {}  # one Δ column needs one common baseline
    show_delta = len(comps) > 1 and len(refs) == 1
    ref = comps[0].b if comps else ""
    cols = [" / ".join(keys) or "runs", *(c for c, _ in spec.columns), "n", "val acc, best epoch (%)",
            "val acc, last epoch (%)"]
    cols += ["report (%)"] if has_pub else []
    cols += [f"Δ last vs {ref} (pp)"] if show_delta else []
    cols += ["val loss", "train acc, last epoch (%)", "epochs", "s / epoch", "params (M)"]
    table = Table(cols)
    for arm in arms:
        done = arm.completed
        pub = published_for(arm, spec)
        extra = [", ".join(sorted({str(r.config(key)) for r in arm.runs})) for _, key in spec.columns]
        row: list[str] = [arm.label, *extra, _n_cell(arm), summarize(best_acc(done)).fmt(100),
                          summarize(last_acc(done)).fmt(100)]
        row += [pub.fmt() if pub else "—"] if has_pub else []
        row += [by_label[arm.label].short() if arm.label in by_label else "(reference)"] if show_delta else []
        epochs = sorted({int(r.metrics.get("epochs_completed") or 0) for r in done})
        params = summarize([float(r.metrics.get("params") or math.nan) for r in done])
        row += [
            summarize([r.final("val/loss") for r in done]).fmt(1, 3),
            summarize([last_value(r, "train/acc") for r in done]).fmt(100),
            "–".join(str(e) for e in (epochs[0], epochs[-1])[: 1 if len(epochs) == 1 else 2]) if epochs else "—",
            summarize([mean_epoch_s(r) for r in done]).fmt(1, 1),
            f"{params.mean / 1e6:.2f}" if params.n else "—",
        ]
        table.add(*row)
    table.caption = (
        "val acc, best epoch: the best checkpoint re-validated, i.e. the epoch the validation set itself chose "
        "(optimistic); val acc, last epoch: the last epoch's validation accuracy, fixed in advance by the epoch "
        "count, which the significance tests use. Both mean ± sample std over seeds; n: completed seeds averaged. "
        "s / epoch: wall time of a whole epoch (training, validation, checkpoint)."
    )
    return table


def per_class_table(arms: Sequence[Arm], spec: ExperimentSpec) -> Table:
    classes = _classes(arms)
    cols = ["class"]
    for arm in arms:
        cols.append(f"{arm.label}: ours (%)")
        if arm.label in spec.per_class:
            cols.append(f"{arm.label}: report (%)")
    table = Table(cols)
    for cls in [*classes, "overall"]:
        row = [f"**{cls}**" if cls == "overall" else cls]
        for arm in arms:
            row.append(summarize([figures._class_acc(r, cls) for r in arm.completed]).fmt(100))
            if arm.label in spec.per_class:
                pub = spec.per_class[arm.label].get(cls)
                row.append("—" if pub is None else f"{pub * 100:.1f}")
        table.add(*row)
    table.caption = "Per-class validation accuracy (recall of the class) of the best checkpoint, mean ± std over seeds."
    return table


def _classes(arms: Sequence[Arm]) -> list[str]:
    for arm in arms:
        for run in arm.completed:
            names = run.metrics.get("class_names") or list(run.metrics.get("per_class_acc") or {})
            if names:
                return list(names)
    return []


def _hit_cell(hits: Sequence[tuple[float, float] | None], index: int, digits: int) -> str:
    got = [h[index] for h in hits if h is not None]
    if not got:
        return f"not reached (0/{len(hits)})"
    return f"{summarize(got).fmt(1, digits)} ({len(got)}/{len(hits)})"


def time_to_acc_table(arms: Sequence[Arm]) -> Table:
    runs = [r for a in arms for r in a.completed]
    ts = thresholds_of(runs)
    cols = [" / ".join(arms[0].values) or "runs", "n"]
    for t in ts:
        cols += [f"epochs to {t:.0%}", f"s to {t:.0%}"]
    table = Table(cols)
    for arm in arms:
        row = [arm.label, str(len(arm.completed))]
        for t in ts:
            hits = [time_to(r, t) for r in arm.completed]
            row += [_hit_cell(hits, 0, 1), _hit_cell(hits, 1, 0)]
        table.add(*row)
    table.caption = (
        "First epoch (and training seconds, validation included) at which validation accuracy reached each "
        "threshold, mean ± std over the seeds that reached it (reached/total)."
    )
    return table


def overfit_table(arms: Sequence[Arm]) -> Table:
    table = Table(
        [" / ".join(arms[0].values) or "runs", "n", "epoch of lowest val loss", "val loss rise after its minimum",
         "train − val acc, last epoch (pp)", "training s / epoch", "training images / s"]
    )
    for arm in arms:
        best, rise, gap, ips = [], [], [], []
        for r in arm.completed:
            epochs, loss = r.curve("val/loss")
            if loss.size:
                best.append(float(epochs[int(np.argmin(loss))]))
                rise.append(float(loss[-1] - loss.min()))
            gap.append((last_value(r, "train/acc") - last_value(r, "val/acc")) * 100)
            _, rate = r.curve("time/train_images_per_s")
            ips.append(float(np.mean(rate)) if rate.size else math.nan)
        table.add(
            arm.label, str(len(arm.completed)), summarize(best).fmt(1, 1), summarize(rise).fmt(1, 3),
            summarize(gap).fmt(1, 1), summarize([mean_epoch_s(r, "time/train_s") for r in arm.completed]).fmt(1, 1),
            summarize(ips).fmt(1, 0),
        )
    table.caption = (
        "Overfitting shows as an early minimum of the validation loss, a rise after it and a growing "
        "train − val accuracy gap. Training s / epoch and images / s count the training batches only."
    )
    return table


def problems_table(problems: Sequence[Run]) -> Table:
    table = Table(["run", "status", "epochs done", "error"])
    for run in problems:
        done = run.metrics.get("epochs_completed")
        planned = run.metrics.get("max_epochs")
        epochs = "—" if done is None else f"{done}/{planned}" if planned else str(done)
        table.add(_short_source(run), run.status, epochs, (run.error or "—")[:200])
    table.caption = "These runs are listed, not averaged: rerun the same command to resume or start them."
    return table


def _short_source(run: Run) -> str:
    path = Path(run.source.split(" (")[0])
    name = path.name if run.status != "missing" else ",".join(f"{k}={v}" for k, v in run.overrides.items())
    return f"`{name}`"


# ------------------------------------------------------------------------------------------ build
def build_report(runs: Sequence[Run], experiment: str | None = None, scale: str | None = None) -> ExperimentReport:
    """The artefact of one experiment at one scale from its runs (other experiments' runs are ignored)."""
    if experiment is not None:
        runs = [r for r in runs if r.experiment == experiment and (scale is None or r.scale == scale)]
    if not runs:
        raise ValueError(f"no runs of experiment {experiment!r} (scale {scale!r}) found; check the sweep folder")
    experiment, scale = runs[0].experiment, runs[0].scale
    spec = spec_for(experiment)
    arms = make_arms(runs, spec.order)
    comps = comparisons(arms, spec)
    tables = {"accuracy": main_table(arms, spec, comps)}
    if "per_class" in spec.extras:
        tables["per_class"] = per_class_table(arms, spec)
    if "time_to_acc" in spec.extras:
        tables["time_to_acc"] = time_to_acc_table(arms)
    if "overfit" in spec.extras:
        tables["overfit"] = overfit_table(arms)
    figs = build_figures(arms, spec, scale)
    problems = [r for r in runs if not r.completed]
    prov = [p for p in read_provenance(runs) if p.get("experiment", experiment) == experiment]
    report = ExperimentReport(experiment, scale, spec, arms, tables, comps, figs, problems, prov)
    report.markdown = render_markdown(report, runs)
    return report


def build_figures(arms: Sequence[Arm], spec: ExperimentSpec, scale: str) -> dict[str, Figure]:
    title = f"{spec.title} ({scale} scale)"
    figs: dict[str, Figure] = {}
    for kind in spec.figures:
        if kind == "curves":
            figs[kind] = figures.curves_figure(arms, title)
        elif kind == "curves_time":
            ts = thresholds_of([r for a in arms for r in a.completed])
            figs[kind] = figures.time_curves_figure(arms, title, ts)
        elif kind == "sweep" and spec.sweep_x:
            panels: list[figures.Panel] = [figures.ACC_PANEL]
            if spec.name == "batch_size":
                panels.append(("time/train_s", "training time per epoch (s, validation excluded)", 1.0))
            xs = {float(a.values.get(spec.sweep_x) or math.nan) for a in arms}
            choice = next((c for c in spec.report_choice if c in xs), None)
            label = "report's choice"
            if choice is not None and choice != spec.report_choice[0]:
                label += f" ({spec.report_choice[0]:g}, scaled to {choice:g})"
            figs[kind] = figures.sweep_figure(arms, spec.sweep_x, spec.sweep_x_label, title, panels, choice, label)
        elif kind == "bars":
            pub = {a.label: p.value for a in arms if (p := published_for(a, spec))}
            figs[kind] = figures.bars_figure(arms, title, pub)
        elif kind == "per_class":
            figs[kind] = figures.per_class_figure(arms, _classes(arms), title, spec.per_class)
    return figs


def render_markdown(report: ExperimentReport, runs: Sequence[Run]) -> str:
    spec = report.spec
    seeds = seeds_of([r for r in runs if r.status != "missing"])
    keys = swept_keys(runs)
    revs = sorted({f"{r.metrics.get('git_rev', '')[:10]}{'+dirty' if r.metrics.get('git_dirty') else ''}"
                   for r in runs if r.metrics.get("git_rev")})
    train_s = sum(float(r.metrics.get("train_seconds") or 0) for r in runs if r.completed)
    out = [
        f"# {spec.title} — {report.scale} scale",
        "",
        f"- **Reproduces:** {spec.section}. **The report:** {spec.claim}",
        f"- **Swept:** {', '.join(f'`{display_key(k)}`' for k in keys) or '(nothing varies)'} · "
        f"{len(report.arms)} arms · "
        f"seeds {', '.join(seeds) or '—'} · {sum(len(a.completed) for a in report.arms)} completed runs, "
        f"{len(report.problems)} not averaged",
        f"- **Fixed overrides:** {' '.join(f'`{o}`' for o in fixed_overrides(runs)) or '—'}",
        f"- **Code:** git {', '.join(revs) or 'unknown'} · training time of the completed runs: "
        f"{fmt_seconds(train_s)} (h:mm:ss, summed)",
    ]
    out += data_lines(runs)
    if report.provenance:
        out += ["- **Produced by:**", *["  " + line for line in provenance_lines(report.provenance)]]
    if report.scale == "quick" and spec.quick:
        out += ["", f"> **quick scale — what it can and cannot say:** {spec.quick}"]
    elif report.scale == "cpu":
        note = " ".join(filter(None, (CPU_SCALE, spec.cpu)))
        out += ["", f"> **cpu scale — what it can and cannot say:** {note}"]
    departures = [*common_departures(runs, report.scale), *spec.departures]
    out += ["", "## Where this departs from the report", "", *[f"- {d}" for d in departures]]
    out += ["", "## Accuracy", "", report.tables["accuracy"].markdown(), ""]
    if report.comparisons:
        out += ["**Significance** (Welch's t-test over seeds on the **last** epoch's validation accuracy; the "
                "report drew its conclusions from single runs):", ""]
        out += [f"- {c.sentence()}" for c in report.comparisons]
        if any(c.adjusted for c in report.comparisons):
            tested = sum(c.testable for c in report.comparisons)
            out += [f"- {tested} tests on this page: p-values are Benjamini-Hochberg adjusted (false discovery "
                    "rate, scipy's `false_discovery_control`), and significance is judged on the adjusted ones."]
        out += [""]
    titles = {"per_class": "Per-class accuracy (Table 1)", "time_to_acc": "Time to accuracy",
              "overfit": "Overfitting and speed"}
    for name, table in report.tables.items():
        if name != "accuracy":
            out += [f"## {titles.get(name, name)}", "", table.markdown(), ""]
    if report.figures:
        out += ["## Figures", ""]
        out += [f"![{spec.title}: {kind}]({report.figure_file(kind)})\n" for kind in report.figures]
    if report.problems:
        out += ["## Runs not averaged", "", problems_table(report.problems).markdown(), ""]
    return "\n".join(out).rstrip() + "\n"


def build_reports(runs: Sequence[Run]) -> list[ExperimentReport]:
    """One report per (experiment, scale) found among ``runs``."""
    return [build_report(group) for group in group_runs(runs).values()]


def render(
    sweep_dirs: Sequence[str | Path] = (),
    out_dir: str | Path = "docs/results",
    wandb_path: str | None = None,
    experiments: Sequence[str] = (),
    wandb_offline: Sequence[str | Path] = (),
    claims: bool = False,
    pages: bool = True,
) -> list[Path]:
    """Load runs (from folders, W&B online and/or offline W&B run files), build every artefact and write
    them to ``out_dir/<scale>/``; with ``claims``, also ``out_dir/CLAIMS.md`` from every run loaded (so give
    it all the sweeps: a claim whose experiment is absent reads *not yet run*); ``pages=False`` writes
    CLAIMS.md only."""
    from .claims import CLAIMS_FILE, claims_markdown
    from .runs import load_runs
    from .wandb_source import load_offline_wandb_runs, load_wandb_runs

    runs = load_runs(*sweep_dirs) if sweep_dirs else []
    if wandb_path:
        runs += load_wandb_runs(wandb_path, experiments)
    if wandb_offline:
        runs += load_offline_wandb_runs(*wandb_offline)
    if experiments:
        runs = [r for r in runs if r.experiment in experiments]
    if not runs:
        raise FileNotFoundError(
            f"no runs found in {', '.join(map(str, sweep_dirs)) or wandb_path}: run a sweep first "
            "(e.g. `make table1 SCALE=quick`) or point at logs/multiruns/<experiment>/<scale>"
        )
    written: list[Path] = []
    reports = build_reports(runs)
    for report in reports if pages else []:
        written += report.write(Path(out_dir) / slug(report.scale))
    if claims:
        path = Path(out_dir) / CLAIMS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(claims_markdown(reports, path.parent))
        written.append(path)
    return written
