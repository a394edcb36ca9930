"""The report tool: sweep folders (or W&B runs) -> Markdown tables and PNG figures beside the report's numbers.

Command line: ``python -m imagenette_lab.report SWEEP_DIR... [--out docs/results] [--wandb ENTITY/PROJECT]``.

Function API::

    from imagenette_lab.report import load_runs, build_report, build_reports, render

    runs = load_runs("logs/multiruns/table1/quick")   # every job, failed and never-started ones included
    report = build_report(runs)                        # tables, significance, figures, Markdown
    report.tables["accuracy"]; report.comparisons; report.figures["curves"]; report.problems
    report.write("docs/results/quick")                 # table1.md + table1_*.png
    render(["logs/multiruns"], "docs/results")         # every experiment and scale found
"""

from .build import ExperimentReport, build_report, build_reports, problems_table, render
from .experiments import EXPERIMENTS, ExperimentSpec, Published, spec_for
from .runs import (
    Arm,
    Run,
    expand_sweep,
    expected_jobs,
    group_runs,
    load_run,
    load_runs,
    make_arms,
    swept_keys,
)
from .stats import Comparison, Summary, summarize, welch
from .tables import Table
from .wandb_source import load_wandb_runs, run_from_wandb

__all__ = [
    "EXPERIMENTS",
    "Arm",
    "Comparison",
    "ExperimentReport",
    "ExperimentSpec",
    "Published",
    "Run",
    "Summary",
    "Table",
    "build_report",
    "build_reports",
    "expand_sweep",
    "expected_jobs",
    "group_runs",
    "load_run",
    "load_runs",
    "load_wandb_runs",
    "make_arms",
    "problems_table",
    "render",
    "run_from_wandb",
    "spec_for",
    "summarize",
    "swept_keys",
    "welch",
]
