"""Turn the runs of one experiment into its artefact: Markdown tables (mean ± std, n, the report's number),
significance lines, PNG figures and the list of runs that were not averaged."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from imagenette_lab.provenance import PROVENANCE_FILE  # one JSON line per multirun, in the sweep folder

from . import figures as F
from .experiments import ExperimentSpec, Published, spec_for
from .runs import Arm, Run, fixed_overrides, group_runs, make_arms, seeds_of, slug, swept_keys
from .stats import Comparison, Summary, summarize, welch
from .tables import Table

DEFAULT_THRESHOLDS = (0.80, 0.85, 0.90)  # the module's default time-to-accuracy thresholds


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
def _acc(runs: Iterable[Run]) -> list[float]:
    return [r.final("val/acc") for r in runs]


def _last(run: Run, key: str) -> float:
    _, values = run.curve(key)
    return float(values[-1]) if values.size else math.nan


def _mean_epoch_s(run: Run, key: str = "time/epoch_s") -> float:
    """Mean over epochs of ``time/epoch_s`` (whole epoch: training, validation, checkpoint) or
    ``time/train_s`` (training batches only)."""
    _, secs = run.curve(key)
    return float(np.mean(secs)) if secs.size else math.nan


def published_for(arm: Arm, spec: ExperimentSpec) -> Published | None:
    return next((p for p in spec.published if arm.matches(p.match)), None)


def reference_arm(arms: Sequence[Arm], spec: ExperimentSpec) -> Arm | None:
    for match in spec.reference:
        for arm in arms:
            if arm.matches(match):
                return arm
    return None


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


# ------------------------------------------------------------------------------------------ tables
def comparisons(arms: Sequence[Arm], spec: ExperimentSpec) -> list[Comparison]:
    """Each arm against the reference (the report's baseline/choice); with no reference and two arms, the
    first against the second."""
    ref = reference_arm(arms, spec)
    if ref is None:
        if len(arms) != 2:
            return []
        a, b = arms
        return [welch(_acc(a.completed), _acc(b.completed), a.label, b.label)]
    return [welch(_acc(a.completed), _acc(ref.completed), a.label, ref.label) for a in arms if a is not ref]


def _n_cell(arm: Arm) -> str:
    left_out = len(arm.runs) - len(arm.completed)
    return f"{len(arm.completed)}" + (f" (+{left_out} not averaged)" if left_out else "")


def main_table(arms: Sequence[Arm], spec: ExperimentSpec, comps: Sequence[Comparison]) -> Table:
    keys = list(arms[0].values) if arms else []
    has_pub = any(published_for(a, spec) for a in arms)
    by_label = {c.a: c for c in comps}
    show_delta = len(comps) > 1
    ref = comps[0].b if comps else ""
    cols = [" / ".join(keys) or "runs", *(c for c, _ in spec.columns), "n", "val acc (%)"]
    cols += ["report (%)"] if has_pub else []
    cols += [f"Δ vs {ref} (pp)"] if show_delta else []
    cols += ["val loss", "train acc, last epoch (%)", "epochs", "s / epoch", "params (M)"]
    table = Table(cols)
    for arm in arms:
        done = arm.completed
        pub = published_for(arm, spec)
        extra = [", ".join(sorted({str(r.config(key)) for r in arm.runs})) for _, key in spec.columns]
        row: list[str] = [arm.label, *extra, _n_cell(arm), summarize(_acc(done)).fmt(100)]
        row += [pub.fmt() if pub else "—"] if has_pub else []
        row += [by_label[arm.label].short() if arm.label in by_label else "(reference)"] if show_delta else []
        epochs = sorted({int(r.metrics.get("epochs_completed") or 0) for r in done})
        params = summarize([float(r.metrics.get("params") or math.nan) for r in done])
        row += [
            summarize([r.final("val/loss") for r in done]).fmt(1, 3),
            summarize([_last(r, "train/acc") for r in done]).fmt(100),
            "–".join(str(e) for e in (epochs[0], epochs[-1])[: 1 if len(epochs) == 1 else 2]) if epochs else "—",
            summarize([_mean_epoch_s(r) for r in done]).fmt(1, 1),
            f"{params.mean / 1e6:.2f}" if params.n else "—",
        ]
        table.add(*row)
    table.caption = (
        "val acc: final validation accuracy (of the best checkpoint), mean ± sample std over seeds; n: completed "
        "seeds averaged. s / epoch: wall time of a whole epoch (training, validation, checkpoint)."
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
            row.append(summarize([F._class_acc(r, cls) for r in arm.completed]).fmt(100))
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
            gap.append((_last(r, "train/acc") - _last(r, "val/acc")) * 100)
            _, rate = r.curve("time/train_images_per_s")
            ips.append(float(np.mean(rate)) if rate.size else math.nan)
        table.add(
            arm.label, str(len(arm.completed)), summarize(best).fmt(1, 1), summarize(rise).fmt(1, 3),
            summarize(gap).fmt(1, 1), summarize([_mean_epoch_s(r, "time/train_s") for r in arm.completed]).fmt(1, 1),
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


# ------------------------------------------------------------------------------------------ provenance
def read_provenance(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The ``provenance.jsonl`` lines of the sweep folders these runs live in."""
    out: list[dict[str, Any]] = []
    for folder in sorted({Path(r.source.split(" (")[0]).parent for r in runs if r.status != "missing"}
                         | {Path(r.source.split(" (")[0]) for r in runs if r.status == "missing"}):
        path = folder / PROVENANCE_FILE
        if path.is_file():
            out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _fmt_seconds(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _provenance_lines(prov: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for p in prov:
        machine = p.get("machine") or {}
        where = ", ".join(str(machine[k]) for k in ("cpu", "cores", "gpu", "os") if machine.get(k))
        if "jobs" in p:
            ended = "jobs " + ", ".join(f"{n} {status}" for status, n in p["jobs"].items())
        else:  # lines written before the Hydra callback recorded job statuses
            ended = f"exit code {p.get('returncode')}"
        lines.append(
            f"- `{p.get('make') or p.get('command')}` — {p.get('started', '?')}, took {_fmt_seconds(p.get('seconds'))} "
            f"(h:mm:ss), {ended}; machine: {where or 'unknown'}"
        )
        if p.get("make") and p.get("command"):
            lines.append(f"  - ran: `{p['command']}`")
    return lines


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
            figs[kind] = F.curves_figure(arms, title)
        elif kind == "curves_time":
            ts = thresholds_of([r for a in arms for r in a.completed])
            figs[kind] = F.time_curves_figure(arms, title, ts)
        elif kind == "sweep" and spec.sweep_x:
            panels: list[F.Panel] = [F.ACC_PANEL]
            if spec.name == "batch_size":
                panels.append(("time/train_s", "training time per epoch (s, validation excluded)", 1.0))
            xs = {float(a.values.get(spec.sweep_x) or math.nan) for a in arms}
            choice = next((c for c in spec.report_choice if c in xs), None)
            label = "report's choice"
            if choice is not None and choice != spec.report_choice[0]:
                label += f" ({spec.report_choice[0]:g}, scaled to {choice:g})"
            figs[kind] = F.sweep_figure(arms, spec.sweep_x, spec.sweep_x_label, title, panels, choice, label)
        elif kind == "bars":
            pub = {a.label: p.value for a in arms if (p := published_for(a, spec))}
            figs[kind] = F.bars_figure(arms, title, pub)
        elif kind == "per_class":
            figs[kind] = F.per_class_figure(arms, _classes(arms), title, spec.per_class)
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
        f"- **Swept:** {', '.join(f'`{k}`' for k in keys) or '(nothing varies)'} · {len(report.arms)} arms · "
        f"seeds {', '.join(seeds) or '—'} · {sum(len(a.completed) for a in report.arms)} completed runs, "
        f"{len(report.problems)} not averaged",
        f"- **Fixed overrides:** {' '.join(f'`{o}`' for o in fixed_overrides(runs)) or '—'}",
        f"- **Code:** git {', '.join(revs) or 'unknown'} · training time of the completed runs: "
        f"{_fmt_seconds(train_s)} (h:mm:ss, summed)",
    ]
    if report.provenance:
        out += ["- **Produced by:**", *["  " + line for line in _provenance_lines(report.provenance)]]
    if report.scale != "full" and spec.quick:
        out += ["", f"> **{report.scale} scale — what it can and cannot say:** {spec.quick}"]
    out += ["", "## Accuracy", "", report.tables["accuracy"].markdown(), ""]
    if report.comparisons:
        out += ["**Significance** (Welch's t-test over seeds; the report drew its conclusions from single runs):", ""]
        out += [f"- {c.sentence()}" for c in report.comparisons]
        tested = sum(c.testable for c in report.comparisons)
        if tested > 1:
            out += [f"- {tested} tests against the reference; p-values are not corrected for multiplicity."]
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
) -> list[Path]:
    """Load runs (from folders, W&B online and/or offline W&B run files), build every artefact and write
    them to ``out_dir/<scale>/``."""
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
    for report in build_reports(runs):
        written += report.write(Path(out_dir) / slug(report.scale))
    return written


def summary_of(arm: Arm, key: str = "val/acc") -> Summary:
    """Summary over an arm's completed seeds of a final metric (for notebooks)."""
    return summarize([r.final(key) for r in arm.completed])
