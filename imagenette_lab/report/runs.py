"""Load training runs from sweep folders, offline: each job's ``metrics.json`` and ``epochs.csv``.

Besides the runs that wrote a ``metrics.json``, two kinds of non-results are kept so the report can list
them instead of silently averaging over what happens to be there:

* ``no-metrics``: a job folder Hydra created (``.hydra/``) whose run died before its first epoch ended;
* ``missing``: a job the sweep asked for (expanded from the sweep's ``multirun.yaml``) with no folder at all,
  e.g. because Hydra's sequential launcher stopped at an earlier failure.

Grouping runs into arms (the swept values, seed excluded) is written by hand: it only needs the override
strings Hydra records, and no library groups Hydra jobs.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from imagenette_lab.callbacks import EPOCHS_FILE, METRICS_FILE, read_epochs_csv
from imagenette_lab.run_identity import SUPERSEDED_DIR, is_location_key

COMPLETED = "completed"
SEED_KEY = "seed"
# Keys that select the experiment/scale themselves: they name the section, they are never an arm.
CONTEXT_KEYS = ("experiment", "scale")
# An experiment's arm group (conf/experiment/arm/<experiment>/), swept as ``experiment/arm/<name>@_global_``
ARM_KEY = re.compile(r"experiment/arm/[\w-]+@_global_")


def arm_key(experiment: str) -> str:
    """The override key that sweeps ``experiment``'s arm group (``conf/experiment/arm/<experiment>/``)."""
    return f"experiment/arm/{experiment}@_global_"


def display_key(key: str) -> str:
    """How a swept key is shown on pages: an experiment's arm group is just ``arm``."""
    return "arm" if ARM_KEY.fullmatch(key) else key


def override_key(override: str) -> str:
    """``+model.width=0.5`` -> ``model.width``: Hydra's add prefix dropped (``~``, delete, is kept: a deleted
    key is not a value of that key)."""
    return override.split("=", 1)[0].lstrip("+")


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """Hydra override strings as ``{key: value}``, location-only keys (paths, archive...) dropped."""
    out: dict[str, str] = {}
    for item in overrides:
        if is_location_key(override_key(item)):
            continue
        key = override_key(item)
        out[key] = item.split("=", 1)[1] if "=" in item else ""
    return out


@dataclass
class Run:
    """One training job: where it came from, how it ended, what it was asked to vary, what it measured."""

    source: str  # the job folder (or a W&B run path)
    status: str  # completed | running | failed | interrupted | no-metrics | missing
    experiment: str
    scale: str
    overrides: dict[str, str]  # this job's task overrides, key -> value (seed included)
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json as run.py wrote it
    epochs: list[dict[str, float]] = field(default_factory=list)  # epochs.csv rows, 1-based "epoch"

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def seed(self) -> str | None:
        seed = self.overrides.get(SEED_KEY, self.metrics.get("seed"))
        return None if seed is None else str(seed)

    @property
    def error(self) -> str | None:
        return self.metrics.get("error")

    def final(self, key: str) -> float:
        """A value of the final validation (the best checkpoint's), NaN when absent."""
        value = (self.metrics.get("final") or {}).get(key)
        return math.nan if value is None else float(value)

    def config(self, dotted: str, default: Any = None) -> Any:
        """A value of the run's resolved config by dotted key, e.g. ``data.resize``."""
        node: Any = self.metrics.get("config") or {}
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) of one ``epochs.csv`` column, epochs without the value skipped."""
        pts = [(r["epoch"], r.get(key, math.nan)) for r in self.epochs]
        pts = [(e, v) for e, v in pts if v == v]
        return np.array([p[0] for p in pts], dtype=int), np.array([p[1] for p in pts], dtype=float)

    def elapsed(self) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, cumulative seconds at the end of each epoch) from ``time/epoch_s`` (whole epochs, as
        the module's time-to-accuracy record counts them)."""
        epochs, secs = self.curve("time/epoch_s")
        return epochs, np.cumsum(secs)


# ------------------------------------------------------------------------------------------ loading
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sweep_context(job_dir: Path) -> tuple[str, str]:
    """(experiment, scale) from the folder layout ``multiruns/<experiment>/<scale>/<job>``."""
    parts = job_dir.resolve().parts
    if len(parts) >= 4 and parts[-4] == "multiruns":
        return parts[-3], parts[-2]
    return "adhoc", "full"


def _context(overrides: dict[str, str], experiment: Any, scale: Any, job_dir: Path) -> tuple[str, str]:
    # The command line's experiment=/scale= win: they are what the user asked for.
    exp_dir, scale_dir = _sweep_context(job_dir)
    exp = overrides.get("experiment") or experiment or exp_dir
    return str(exp), str(overrides.get("scale") or scale or scale_dir)


def load_run(job_dir: Path) -> Run:
    """The run in one job folder (``metrics.json`` + ``epochs.csv``; or a ``no-metrics`` entry)."""
    metrics = _read_json(job_dir / METRICS_FILE)
    if metrics is None:
        hydra_overrides = job_dir / ".hydra" / "overrides.yaml"
        raw = OmegaConf.to_container(OmegaConf.load(hydra_overrides)) if hydra_overrides.is_file() else []
        overrides = parse_overrides(raw or [])
        cfg_file = job_dir / ".hydra" / "config.yaml"
        cfg = OmegaConf.load(cfg_file) if cfg_file.is_file() else OmegaConf.create()
        exp, scale = _context(overrides, cfg.get("experiment_name"), cfg.get("scale_name"), job_dir)
        status = "no-metrics" if not (job_dir / METRICS_FILE).exists() else "unreadable"
        log = job_dir / "run.log"
        error = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        return Run(str(job_dir), status, exp, scale, overrides, {"error": error[0] if error else None})
    overrides = parse_overrides(metrics.get("overrides") or [])
    exp, scale = _context(
        overrides, metrics.get("experiment"), (metrics.get("config") or {}).get("scale_name"), job_dir
    )
    return Run(
        str(job_dir), str(metrics.get("status", "unknown")), exp, scale, overrides, metrics,
        read_epochs_csv(job_dir / EPOCHS_FILE),
    )


def _job_dirs(root: Path) -> list[Path]:
    """Job folders: those holding a ``metrics.json`` or Hydra's ``.hydra/`` (a job that died early)."""
    if (root / METRICS_FILE).is_file() or (root / ".hydra").is_dir():
        return [root]
    found = {p.parent for p in root.rglob(METRICS_FILE)} | {p.parent for p in root.rglob(".hydra")}
    return sorted(p for p in found if SUPERSEDED_DIR not in p.relative_to(root).parts)  # rerun=restart's old results


def load_runs(*paths: str | Path) -> list[Run]:
    """Every run under the given sweep folders (searched recursively), plus the jobs their sweeps planned
    but never started (status ``missing``)."""
    runs: list[Run] = []
    seen: set[Path] = set()
    sweeps_seen: set[Path] = set()
    for p in paths:
        root = Path(p)
        if root.is_file() and root.name == METRICS_FILE:
            root = root.parent
        if not root.exists():
            raise FileNotFoundError(f"sweep folder {root} does not exist; pass a folder under logs/multiruns/")
        for job in _job_dirs(root):
            if job.resolve() not in seen:
                seen.add(job.resolve())
                runs.append(load_run(job))
        sweeps = [root] if (root / "multirun.yaml").is_file() else sorted(q.parent for q in root.rglob("multirun.yaml"))
        for sweep in sweeps:
            if sweep.resolve() not in sweeps_seen:
                sweeps_seen.add(sweep.resolve())
                runs.extend(missing_jobs(sweep, runs))
    return runs


# ------------------------------------------------------------------------------------------ sweeps
def expand_sweep(params: dict[str, Any], task: Sequence[str] = ()) -> list[dict[str, str]]:
    """The jobs (override dicts) of a sweep, expanded as Hydra's basic sweeper does: ``params`` (the
    ``hydra.sweeper.params``) first, command-line ``task`` overrides replacing the same keys, then the
    cartesian product."""
    strings = [f"{k}={v}" for k, v in params.items()] + list(task)
    by_key: dict[str, list[str]] = {}
    for ov in OverridesParser.create().parse_overrides(strings):
        key = ov.get_key_element()
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [ov.get_value_element_as_str()]
        by_key[key] = [f"{key}={v}" for v in values]
    return [parse_overrides(combo) for combo in itertools.product(*by_key.values())]


def expected_jobs(sweep_dir: Path) -> list[dict[str, str]]:
    """The jobs a sweep's ``multirun.yaml`` asked for (see :func:`expand_sweep`); [] when the file cannot be
    resolved (a custom sweeper, a broken config)."""
    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        params = OmegaConf.to_container(cfg.hydra.sweeper.get("params") or {}, resolve=True) or {}
        task = list(cfg.hydra.overrides.task)
    except Exception:  # any resolution failure just means: no expectation to check against
        return []
    return expand_sweep(params, task)


def missing_jobs(sweep_dir: Path, runs: Sequence[Run]) -> list[Run]:
    """``missing`` entries for the jobs of ``sweep_dir``'s sweep that have no folder among ``runs``."""
    sweep = sweep_dir.resolve()
    present = [r.overrides for r in runs if Path(r.source).resolve().parent == sweep]
    out = []
    for job in expected_jobs(sweep_dir):
        if job not in present:
            exp, scale = _context(job, None, None, sweep / "job")
            out.append(Run(f"{sweep_dir} (never started)", "missing", exp, scale, job))
    return out


# ------------------------------------------------------------------------------------------ grouping
def group_runs(runs: Iterable[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (experiment, scale), in first-seen order."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.experiment, run.scale), []).append(run)
    return groups


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between runs (seed and the experiment/scale selectors excluded),
    in the order they first appear."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    skip = {SEED_KEY, *CONTEXT_KEYS}
    return [k for k in keys if k not in skip and len({r.overrides.get(k) for r in runs}) > 1]


def natural_key(value: str | None) -> tuple[int, float, str]:
    """Sort numbers numerically and before words: 32 < 64 < 128; None (the default) first."""
    if value is None:
        return (0, 0.0, "")
    try:
        return (1, float(value), "")
    except ValueError:
        return (2, 0.0, value)


@dataclass
class Arm:
    """All runs of one combination of swept values (one row of a table, one curve of a figure)."""

    values: dict[str, str | None]  # swept key -> value (None = that run did not set it)
    runs: list[Run]

    @property
    def label(self) -> str:
        """``hybrid`` for a single swept word; ``resize=280`` for numbers and booleans, which need their key."""
        if not self.values:
            return "all runs"
        items = [(display_key(k).rsplit(".", 1)[-1], "default" if v is None else str(v)) for k, v in self.values.items()]
        if len(items) == 1 and re.fullmatch(r"[A-Za-z][\w-]*", items[0][1]) and items[0][1] not in ("True", "False"):
            return items[0][1]
        return ", ".join(f"{k}={v}" for k, v in items)

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.completed]

    def matches(self, match: dict[str, Sequence[str]]) -> bool:
        """True when every key of ``match`` has one of the listed values in this arm (or its runs)."""
        for key, allowed in match.items():
            value = self.values.get(key)
            if value is None and self.runs:
                value = self.runs[0].overrides.get(key)
            if value is None or str(value) not in {str(a) for a in allowed}:
                return False
        return True


def make_arms(runs: Sequence[Run], order: Sequence[str] = ()) -> list[Arm]:
    """Split runs into arms by their swept values; arms sorted by ``order`` (values listed first, in that
    order), then naturally (numbers numerically)."""
    keys = swept_keys(runs)
    arms: dict[tuple[str | None, ...], Arm] = {}
    for run in runs:
        key = tuple(run.overrides.get(k) for k in keys)
        arms.setdefault(key, Arm(dict(zip(keys, key, strict=True)), [])).runs.append(run)
    rank = {v: i for i, v in enumerate(order)}

    def sort_key(item: tuple[tuple[str | None, ...], Arm]) -> list[Any]:
        return [(rank.get(str(v), len(rank)), natural_key(v)) for v in item[0]]

    return [arm for _, arm in sorted(arms.items(), key=sort_key)]


def fixed_overrides(runs: Sequence[Run]) -> list[str]:
    """Overrides every run shares (the sweep's fixed settings), for the report's header."""
    keys = set(swept_keys(runs)) | {SEED_KEY}
    common: dict[str, str] | None = None
    for run in runs:
        items = {k: v for k, v in run.overrides.items() if k not in keys}
        common = items if common is None else {k: v for k, v in common.items() if items.get(k) == v}
    return [f"{k}={v}" for k, v in (common or {}).items()]


def seeds_of(runs: Sequence[Run]) -> list[str]:
    return sorted({r.seed for r in runs if r.seed is not None}, key=natural_key)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    return _SAFE.sub("_", text).strip("_") or "x"
